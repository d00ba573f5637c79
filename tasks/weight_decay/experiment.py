"""One tuning experiment from a config: baselines and hypergradient descent on the same task, results and plots.

    python examples/tune_weight_decay.py data.name=iris
    python examples/tune_weight_decay.py data.name=path/to/table.csv data.target=label --overwrite
    python examples/tune_weight_decay.py configs/weight_decay/digits_scalar.yaml outer.method=neumann
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tasks.config import ConfigError, check_writable
from tasks.omniglot.run_folder import _alive  # one liveness test for every run lock

from .config import validate
from .plots import plot_history, plot_landscape
from .problems import make_task
from .tuning import (Cost, best, grid_values, hypergradient_descent, make_solver, random_values, search,
                     sklearn_reference)


def reused_grid(cfg, task_name: str):
    """The grid of an earlier run on the same task with the same inner solver and search range (its cost too)."""
    earlier = json.loads(Path(cfg.search.grid_from).read_text())
    same = {"task": earlier["task"] == task_name,
            "inner": earlier["config"]["inner"] == OmegaConf.to_container(cfg.inner),
            "data": earlier["config"]["data"] == OmegaConf.to_container(cfg.data),
            "search": all(earlier["config"]["search"][k] == cfg.search[k] for k in ("low", "high", "grid_points"))}
    if not all(same.values()):
        raise ValueError(f"search.grid_from={cfg.search.grid_from!r} was run with a different "
                         f"{[k for k, v in same.items() if not v]}; its grid is not comparable.")
    return earlier["grid"]["points"], Cost(**earlier["grid"]["cost"])


RUN_FILES = ("results.json", "history.png", "landscape.png", "wandb")  # what one run writes


def claim_out_dir(out_dir: str, overwrite: bool = False) -> Path:
    """Make ``out_dir`` ready for one run, before any work, as the Omniglot script does with its run folder.

    The folder is created and proven writable (a read-only folder is found now, not at ``results.json`` after the
    search). A folder holding a finished run (``results.json``) is refused unless ``overwrite``, which deletes that
    run's files first so two runs' files are never mixed. Stray files of an unfinished run are replaced silently.
    :func:`run` also holds ``run.lock`` in the folder while it works, so two runs never share a folder.

    Raises:
        tasks.config.ConfigError: the folder is not writable, or holds a finished run and ``overwrite`` is off.
    """
    out = check_writable(out_dir, "out_dir")
    if (out / "results.json").exists():
        if not overwrite:
            raise ConfigError(f"invalid config: out_dir={str(out_dir)!r} already holds a finished run (results.json); "
                              f"replace it with --overwrite (overwrite=true) or choose another out_dir.")
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return out


def run(cfg, write: bool = True) -> dict:
    """Run grid search, random search and hypergradient descent as ``cfg`` says; return (and write) the results.

    Writes ``<out_dir>/results.json``, ``history.png`` and ``landscape.png`` when ``write``. Before any work the
    config is validated and, when ``write``, ``out_dir`` is claimed (:func:`claim_out_dir`).
    """
    validate(cfg)
    lock = None
    if write:
        out = check_writable(cfg.out_dir, "out_dir")
        lock = _lock(out)  # before looking at the folder's contents: two runs cannot both pass the check
    threads = torch.get_num_threads()
    try:
        if write:
            claim_out_dir(cfg.out_dir, cfg.overwrite)
        torch.set_num_threads(cfg.threads)
        return _run(cfg, write)
    finally:
        torch.set_num_threads(threads)
        if lock is not None:
            lock.unlink(missing_ok=True)


LOCK = "run.lock"


def _lock(out: Path) -> Path:
    """Hold ``<out>/run.lock`` (pid, host, start) for the run; refuse a folder another live run holds.

    A lock left by a process that is gone (same host) is taken over, as the Omniglot script does.
    """
    path = out / LOCK
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"invalid config: out_dir={str(out)!r} holds an unreadable {LOCK}; if no run uses "
                                  f"the folder, delete that file.") from None
            if host == socket.gethostname() and not _alive(pid):
                path.unlink(missing_ok=True)  # its owner is gone: take it over
                continue
            raise ConfigError(f"invalid config: out_dir={str(out)!r} is in use by pid {pid} on {host} (since "
                              f"{holder.get('started', '?')}); wait for that run or choose another out_dir.") from None
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return path
    raise ConfigError(f"invalid config: out_dir={str(out)!r}: could not take {LOCK}; another run started at the "
                      f"same time. Choose another out_dir.")


def _run(cfg, write: bool) -> dict:
    import wandb

    cpu_start = time.process_time()
    task = make_task(cfg.data.name, cfg.model.kind, cfg.model.decay, cfg.data.n_train, cfg.data.n_val,
                     cfg.data.n_test, cfg.data.noise_features, cfg.model.hidden, cfg.data.seed, cfg.data.root,
                     target=cfg.data.target, task=cfg.data.task, scaling=cfg.data.scaling)
    solver = make_solver(cfg.inner.solver, cfg.inner.lr, cfg.inner.steps, cfg.inner.tol, cfg.inner.momentum)
    n_hparams = sum(math.prod(s) for s in task.hparam_shapes().values())
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_ = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, config=OmegaConf.to_container(cfg),
                      name=f"{task.name}/{cfg.outer.method}", dir=str(out), reinit="finish_previous")
    try:
        if cfg.search.grid_from:
            grid, grid_cost = reused_grid(cfg, task.name)
        else:
            grid, grid_cost = search(task, solver, grid_values(cfg.search.low, cfg.search.high,
                                                               cfg.search.grid_points), progress=cfg.progress,
                                     desc="grid")
        rand, rand_cost = ([], None)
        if cfg.search.random_points:
            rand, rand_cost = search(task, solver, random_values(cfg.search.low, cfg.search.high,
                                                                 cfg.search.random_points, cfg.data.seed),
                                     progress=cfg.progress, desc="random")
        method_kwargs = dict(linear_steps=cfg.outer.linear_steps, linear_tol=cfg.outer.linear_tol,
                             neumann_alpha=cfg.outer.neumann_alpha, truncate=cfg.outer.truncate)
        tuned = hypergradient_descent(
            task, cfg.outer.method, solver, cfg.outer.init_wd, cfg.outer.steps, cfg.outer.lr, cfg.outer.max_log_step,
            method_kwargs, cfg.outer.hoag, cfg.outer.hoag_tol0, cfg.outer.hoag_decay, cfg.outer.warm_start,
            on_step=lambda k, r: run_.log({f"hypergrad/{n}": v for n, v in r.items() if v is not None}, step=k),
            progress=cfg.progress)
    finally:
        run_.finish()

    grid_best = best(grid)
    rel_gap = (tuned.final["val_loss"] - grid_best["val_loss"]) / abs(grid_best["val_loss"])
    results = {
        "task": task.name,
        "task_type": task.task,
        "classes": len(task.classes),
        "n_hparams": n_hparams,
        "splits": {"train": len(task.train[1]), "val": len(task.val[1]), "test": len(task.test[1])},
        "config": OmegaConf.to_container(cfg),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "hypergrad": {"final": tuned.final, "cost": tuned.cost.as_dict(), "history": tuned.history,
                      "nonconverged_steps": tuned.nonconverged_steps, "refit_from_init": tuned.refit,
                      "val_gap_to_grid_best": rel_gap},
        "grid": {"best": grid_best, "cost": grid_cost.as_dict(), "points": grid,
                 "reused_from": cfg.search.grid_from},
        "random": {"best": best(rand) if rand else None, "cost": rand_cost.as_dict() if rand_cost else None,
                   "points": rand},
    }
    if cfg.search.sklearn:
        results["sklearn"] = {
            "at_grid_best": sklearn_reference(task, {"log_wd": torch.tensor(math.log(grid_best["wd"]))}),
            "at_hypergrad": sklearn_reference(task, tuned.hparams),
        }
    if n_hparams > 1:
        results["hypergrad"]["log_wd"] = {k: v.tolist() for k, v in tuned.hparams.items()}
    if cfg.data.noise_features and cfg.model.decay == "feature":
        log_wd = tuned.hparams["log_wd"].reshape(-1)
        d = log_wd.numel() - cfg.data.noise_features
        results["hypergrad"]["geomean_wd_real_features"] = math.exp(float(log_wd[:d].mean()))
        results["hypergrad"]["geomean_wd_noise_features"] = math.exp(float(log_wd[d:].mean()))
    results["cpu_minutes"] = (time.process_time() - cpu_start) / 60
    if write:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        title = f"{task.name}, {cfg.outer.method}"
        plot_history(tuned.history, out / "history.png", title)
        plot_landscape(grid, tuned.history, out / "landscape.png", title, rand)
    return results


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    h, g = results["hypergrad"], results["grid"]
    lines = [
        f"{results['task']} ({results.get('task_type', '?')}, {results['n_hparams']} hparams, splits "
        f"{results['splits']}, {results.get('cpu_minutes', 0):.2f} CPU min)",
        f"  hypergradient: val {h['final']['val_loss']:.5f} test {h['final']['test_loss']:.5f} "
        f"({h['cost']['inner_solves']} solves, {h['cost']['inner_steps']} inner steps, {h['cost']['hvps']} HVPs, "
        f"{h['cost']['seconds']:.1f}s); val gap to grid best {100 * h['val_gap_to_grid_best']:+.2f}%",
        f"  grid-{len(g['points'])}: best λ {g['best']['wd']:.3g} val {g['best']['val_loss']:.5f} "
        f"test {g['best']['test_loss']:.5f} ({g['cost']['inner_solves']} solves, {g['cost']['inner_steps']} inner "
        f"steps, {g['cost']['seconds']:.1f}s)",
    ]
    if results["random"]["best"]:
        r = results["random"]
        lines.append(f"  random-{len(r['points'])}: best λ {r['best']['wd']:.3g} val {r['best']['val_loss']:.5f} "
                     f"test {r['best']['test_loss']:.5f} ({r['cost']['seconds']:.1f}s)")
    if results.get("sklearn"):
        for k, v in results["sklearn"].items():
            if v:
                lines.append(f"  scikit-learn {k}: val {v['val_loss']:.5f} test {v['test_loss']:.5f}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> dict:
    """Parse ``[--overwrite] [config.yaml ...] [key=value ...]``, run, print the summary.

    Errors in the command line, the config, the data or the output folder end the program with one line
    (``error: ...``); set ``BILEVEL_TRACEBACK=1`` for the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return {}
    files, overrides = [], []
    for arg in argv:
        if arg == "--overwrite":
            overrides.append("overwrite=true")
        elif arg.startswith("--"):
            raise SystemExit(f"error: unknown option {arg!r}; use --overwrite, YAML config files and key=value "
                             f"overrides.")
        elif "=" in arg:
            overrides.append(arg)
        else:
            files.append(arg)
    from .config import load_config

    try:
        cfg = load_config(files, overrides)
        results = run(cfg)
    except (ValueError, OSError) as err:  # bad config, data or folder: the message, not a traceback
        if os.environ.get("BILEVEL_TRACEBACK"):
            raise
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
    print(summary(results))
    print(f"results in {cfg.out_dir}/")
    return results
