"""One tuning experiment from a config: baselines and hypergradient descent on the same task, results and plots.

    python examples/tune_weight_decay.py data.name=iris
    python examples/tune_weight_decay.py data.name=path/to/table.csv data.target=label --overwrite
    python examples/tune_weight_decay.py configs/weight_decay/digits_scalar.yaml outer.method=neumann
    python examples/tune_weight_decay.py data.name=iris device=cpu   # auto (default: the GPU if any), cuda:1 ...
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tasks.config import resolve_device
from tasks.run_folder import RunFolder

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


def run(cfg, write: bool = True) -> dict:
    """Run grid search, random search and hypergradient descent as ``cfg`` says; return (and write) the results.

    Writes ``<out_dir>/results.json``, ``history.png`` and ``landscape.png`` when ``write``. Before any work the
    config is validated, ``device`` must name a device this machine has, and, when ``write``, ``out_dir`` is claimed
    as a :class:`tasks.run_folder.RunFolder`: it must be writable, a folder holding a run (any of :data:`RUN_FILES`)
    is refused unless ``overwrite``, which deletes that run's files first, and ``run.lock`` keeps a second run out
    until this one ends. Every tensor of the run is put on ``device``; the data is read on the CPU and moved once.

    Raises:
        tasks.config.ConfigError: an invalid config, or a CUDA ``device`` this machine does not have.
        tasks.run_folder.RunFolderError: ``out_dir`` is not writable, in use, or holds a run and ``overwrite`` is off.
    """
    validate(cfg)
    device = resolve_device(cfg.device, "device")
    folder = (RunFolder(cfg.out_dir, files=RUN_FILES, overwrite=cfg.overwrite, checkpoint=None, key="out_dir")
              if write else None)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads)
        return _run(cfg, write, device)
    finally:
        torch.set_num_threads(threads)
        if folder is not None:
            folder.release()


def _run(cfg, write: bool, device: torch.device) -> dict:
    import wandb

    cpu_start = time.process_time()
    task = make_task(cfg.data.name, cfg.model.kind, cfg.model.decay, cfg.data.n_train, cfg.data.n_val,
                     cfg.data.n_test, cfg.data.noise_features, cfg.model.hidden, cfg.data.seed, cfg.data.root,
                     target=cfg.data.target, task=cfg.data.task, scaling=cfg.data.scaling, device=device)
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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
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
            "at_grid_best": sklearn_reference(task, {"log_wd": torch.tensor(math.log(grid_best["wd"]),
                                                                            device=device)}),
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
