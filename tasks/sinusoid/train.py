"""Meta-train the 40-40 MLP on sinusoid regression (MAML, first-order MAML, Reptile, iMAML, Neumann, or a jointly
trained baseline) and test it on 600 new sinusoids.

Usage::

    python examples/sinusoid.py --config maml                  # MAML, 10-shot, the reference's settings
    python examples/sinusoid.py --config imaml meta.steps=2000 # any key can be overridden as key=value
    python examples/sinusoid.py --config imaml --resume        # continue from <run.dir>/checkpoint.pt
    python examples/sinusoid.py --config maml run.device=cpu   # auto (default: the GPU if any), cpu, cuda:1 ...

Writes ``checkpoint.pt`` (atomically, every ``run.checkpoint_every`` meta-steps), then ``results.json`` (the
post-adaptation MSE after each of ``eval.steps`` test-time gradient steps, with a 95% confidence interval over
``eval.test_tasks`` tasks), ``metrics.csv`` (training curves, ``run.log_every`` meta-steps a row) and ``curves.png``
into ``run.dir`` (default ``runs/sinusoid/<run.name>``).

Test protocol (every method alike, as the MAML paper's Figure 2 and the reference's ``test()``): from the learnt θ,
plain gradient descent at ``eval.lr`` on the K support points' MSE; the MSE on ``eval.queries`` new points of the
same sinusoid after 0, 1, ... steps. iMAML and Neumann train with a different inner problem (the proximal one);
their MSE after that training-time solve is reported too (``test_own_solver``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import grad, vmap
from tqdm.auto import tqdm

import bilevel as bl

from tasks.config import ConfigError, parse_cli, resolve_device
from tasks.run_folder import RunFolder, RunFolderError, atomic_write, load_checkpoint

from .config import load_config
from .inner import CurvatureScaledGD
from .model import SineMLP, mse_loss
from .sampler import SinusoidSampler, Tasks

__all__ = ["Workload", "build", "make_method", "evaluate", "meta_step", "main", "cli"]

VAL_SEED, TEST_SEED = 1_000_003, 2_000_003   # task streams of validation / test, offset from run.seed
IMPLICIT = ("imaml", "neumann")


@dataclass
class Workload:
    """Everything a run needs, built from a config before any training starts."""

    cfg: DictConfig
    model: SineMLP
    task_loss: object
    problem: bl.Problem
    method: object
    samplers: dict[str, SinusoidSampler]
    device: torch.device = torch.device("cpu")


def make_method(cfg: DictConfig, model: SineMLP):
    """``(problem, method)`` for ``cfg.method.name`` (the methods' registry).

    ``pretrain`` is the reference's jointly trained baseline (cbfinn/maml ``--pretrain_iterations``, Adam on the
    tasks' loss at θ itself): ``FirstOrder`` over an inner solver of zero steps is exactly ``∇_θ outer_loss(θ)``.
    It takes the loss on the query points where the reference takes the support points; both are i.i.d. draws of
    the same sinusoid.
    """
    m, inner = cfg.method, cfg.inner
    loss = mse_loss(model)
    inner_loss = bl.proximal(loss, m.reg) if m.name in IMPLICIT else loss
    # tolerances are passed only when set, so that the engine's own defaults apply otherwise
    extra = {} if inner.tol is None else {"tol": inner.tol}
    if inner.solver == "scaled":
        solver = CurvatureScaledGD(reg=m.reg, steps=inner.steps, **extra)
    elif inner.solver == "adam":
        solver = bl.Adam(lr=inner.lr, steps=inner.steps, **extra)
    else:
        solver = bl.GradientDescent(lr=inner.lr, steps=inner.steps, momentum=inner.momentum, **extra)
    cg = {"cg_steps": m.cg_steps, "damping": m.cg_damping} | ({} if m.cg_tol is None else {"tol": m.cg_tol})
    series = {"steps": m.neumann_steps, "alpha": m.neumann_alpha} | ({} if m.neumann_tol is None else
                                                                     {"tol": m.neumann_tol})
    method = {
        "maml": lambda: bl.Unrolled(),
        "fomaml": lambda: bl.FirstOrder(),
        "pretrain": lambda: bl.FirstOrder(),
        "reptile": lambda: bl.Reptile(),
        "imaml": lambda: bl.imaml(reg=m.reg, **cg),
        "neumann": lambda: bl.neumann(**series),
    }[m.name]()
    return bl.Problem(inner_loss, loss, solver, init=bl.meta_init), method


def build(cfg: DictConfig) -> Workload:
    """The samplers, model and method on ``run.device``; every input error is raised here, before any training."""
    t = cfg.task
    device = resolve_device(cfg.run.device)
    ranges = {"amplitude": tuple(t.amplitude), "phase": tuple(t.phase), "x_range": tuple(t.x_range),
              "device": device}
    samplers = {
        "train": SinusoidSampler(shots=t.shots, queries=t.queries, seed=cfg.run.seed, **ranges),
        "val": SinusoidSampler(shots=t.shots, queries=cfg.eval.queries, seed=cfg.run.seed + VAL_SEED, **ranges),
        "test": SinusoidSampler(shots=t.shots, queries=cfg.eval.queries, seed=cfg.run.seed + TEST_SEED, **ranges),
    }
    torch.manual_seed(cfg.run.seed)
    # initialised on the CPU, then moved: the same θ on every device
    model = SineMLP(tuple(cfg.model.hidden), cfg.model.init).to(device)
    problem, method = make_method(cfg, model)
    return Workload(cfg, model, mse_loss(model), problem, method, samplers, device)


def adaptation_curves(work: Workload, hparams, tasks: Tasks, steps: int) -> torch.Tensor:
    """Query MSE ``[steps + 1, tasks]`` after 0..steps test-time GD steps (``eval.lr``) on each task's support."""
    solver = bl.GradientDescent(lr=work.cfg.eval.lr, steps=1)
    theta = {k: v.detach() for k, v in hparams.items()}
    loss = work.task_loss

    def one(support, query):
        w, state, losses = dict(theta), None, [loss(theta, theta, query)]
        for _ in range(steps):
            w, state, _ = solver.run(loss, w, theta, support, state=state)
            losses.append(loss(w, theta, query))
        return torch.stack(losses)

    with torch.no_grad():  # torch.func.grad inside the solver still works; no graph is kept
        return vmap(one)(tasks.support, tasks.query).T


def own_solver_mse(work: Workload, hparams, tasks: Tasks, steps: int | None = None) -> torch.Tensor:
    """Query MSE per task after ``steps`` steps (default: the training budget) of the method's own inner solver on
    its own inner loss (the proximal one for iMAML and Neumann)."""
    theta = {k: v.detach() for k, v in hparams.items()}
    problem = work.problem
    solver = problem.solver if steps is None else dataclasses.replace(problem.solver, steps=steps)

    def one(support, query):
        w, _ = solver(problem.inner_loss, dict(theta), theta, support)
        return problem.outer_loss(w, theta, query)

    with torch.no_grad():
        return vmap(one)(tasks.support, tasks.query)


def _mean_ci(x: torch.Tensor) -> dict:
    """Mean and 95% CI over tasks; ``nonfinite`` counts tasks whose adaptation diverged (they make the mean NaN:
    a diverging protocol is reported, not averaged away)."""
    x = x.double()
    ci = 1.96 * x.std(unbiased=True).item() / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return {"mean": x.mean().item(), "ci95": ci, "nonfinite": int((~torch.isfinite(x)).sum())}


def evaluate(work: Workload, hparams, split: str, tasks: int) -> dict:
    """Post-adaptation MSE on ``tasks`` fixed tasks of ``split``: ``{"steps": {n: {mean, ci95}}, "own_solver_steps":
    {n: {mean, ci95}}, "own_solver": {mean, ci95}, "tasks": tasks}``: after ``n`` test-time GD steps on the MSE (the
    common protocol), after ``n`` steps of the method's own inner solver on its own inner loss, and after its whole
    training-time inner solve. The tasks are the same at every call, so curves compare like with like."""
    batch = work.samplers[split].sample(0, tasks)
    steps = sorted(set(work.cfg.eval.steps))
    curves = adaptation_curves(work, hparams, batch, max(steps))
    return {"steps": {str(n): _mean_ci(curves[n]) for n in steps},
            "own_solver_steps": {str(n): _mean_ci(own_solver_mse(work, hparams, batch, n)) for n in steps},
            "own_solver": _mean_ci(own_solver_mse(work, hparams, batch)), "tasks": tasks}


def meta_step(work: Workload, hparams, tasks: Tasks):
    """One hypergradient over a stack of tasks: ``(grad, metrics, Hypergrad)``.

    ``metrics`` holds the training query MSE after the inner solve and, for the implicit methods, what the
    Hypergrad's ``inner_info`` / ``linear_info`` say per task, summarised: the median inner residual
    ``||∇ inner_loss(w*)||`` relative to ``||∇ inner_loss(θ)||`` (scale-free, so comparable across tasks and
    dtypes), the median relative residual of the adjoint solve, and the fractions of tasks whose adjoint solve
    missed its tolerance or met negative curvature.
    """
    cfg = work.cfg.meta
    out = bl.meta_grad(work.method, work.problem, hparams, tasks.support, tasks.query, batching=cfg.batching,
                       on_nonconvergence=cfg.on_nonconvergence, on_nonfinite="ignore")  # handled by the caller
    metrics = {"loss": out.outer_loss.detach().item()}
    if out.linear_info is not None:
        theta = {k: v.detach() for k, v in hparams.items()}
        with torch.no_grad():
            g0 = vmap(grad(work.problem.inner_loss), in_dims=(None, None, 0))(theta, theta, tasks.support)
            g0 = torch.sqrt(sum((g.reshape(g.shape[0], -1) ** 2).sum(1) for g in g0.values()))
        lin, relative = out.linear_info, out.inner_info.residual / g0.clamp_min(1e-30)
        metrics |= {
            "inner_residual": out.inner_info.residual.median().item(),
            "inner_relative": relative.median().item(),
            "inner_relative_max": relative.max().item(),
            "linear_residual": lin.residual.median().item(),
            "linear_residual_p90": lin.residual.quantile(0.9).item(),
            "linear_residual_max": lin.residual.max().item(),
            "unconverged": (~lin.converged).double().mean().item(),
            "indefinite": lin.indefinite.double().mean().item(),
        }
    return out.grad, metrics, out


def _nonfinite(grad, out) -> bool:
    flags = [out.inner_info.nonfinite.any(), ~torch.isfinite(out.outer_loss)]
    if out.linear_info is not None:
        flags.append(out.linear_info.nonfinite.any())
    return bool(torch.stack(flags + [~torch.isfinite(g).all() for g in grad.values()]).any())


def make_optimizer(cfg: DictConfig, hparams):
    tensors = list(hparams.values())
    if cfg.meta.optimizer == "adam":
        return torch.optim.Adam(tensors, lr=cfg.meta.lr)
    return torch.optim.SGD(tensors, lr=cfg.meta.lr)


def meta_lr(cfg: DictConfig, step: int) -> float:
    """The meta learning rate at ``step`` (a pure function of the step, so a resumed run follows it exactly)."""
    if cfg.meta.schedule == "linear":
        return cfg.meta.lr * (1 - step / cfg.meta.steps)
    return cfg.meta.lr


METRICS = ("loss", "inner_residual", "inner_relative", "inner_relative_max", "linear_residual", "linear_residual_p90",
           "linear_residual_max", "unconverged", "indefinite", "skipped")


def _metrics_rows(history: dict, every: int) -> list[dict]:
    """Means of the per-step metrics over windows of ``every`` meta-steps (the small log that is committed)."""
    rows, n = [], len(history["step"])
    for begin in range(0, n, every):
        end = min(begin + every, n)
        row = {"step": history["step"][end - 1]}
        for key in METRICS:
            values = [v for v in history[key][begin:end] if v is not None]
            row[key] = sum(values) / len(values) if values else ""
        rows.append(row)
    val = dict(zip(history["val_step"], history["val"]))
    for row in rows:
        for k, v in (val.get(row["step"]) or {}).get("steps", {}).items():
            row[f"val_mse_{k}"] = v["mean"]
    return rows


def _write_metrics(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, keys, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def _plot_curves(path: Path, history: dict, title: str, implicit: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if implicit else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    steps = torch.tensor(history["step"], dtype=torch.float64)
    window = max(1, len(steps) // 100)

    def smooth(values):
        v = torch.tensor([float("nan") if x is None else x for x in values], dtype=torch.float64)
        if len(v) < window:
            return steps[:0], v[:0]
        return steps[window - 1:], v.unfold(0, window, 1).nanmean(1)

    axes[0].plot(*smooth(history["loss"]), label=f"meta-train query MSE (avg of {window})")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("MSE after the training-time inner solve")
    if history["val_step"]:
        for n in history["val"][0]["steps"]:
            mean = [v["steps"][n]["mean"] for v in history["val"]]
            ci = [v["steps"][n]["ci95"] for v in history["val"]]
            axes[1].errorbar(history["val_step"], mean, yerr=ci, fmt="o-", ms=3, label=f"{n} GD steps on the MSE")
            if implicit and "own_solver_steps" in history["val"][0]:
                own = [v["own_solver_steps"][n]["mean"] for v in history["val"]]
                axes[1].plot(history["val_step"], own, "s--", ms=3, label=f"{n} steps of its own inner solver")
        axes[1].set_yscale("log")
    axes[1].set_ylabel("validation MSE (95% CI)")
    if implicit:
        for key, label in (("inner_relative", "inner ||F(w*)|| / ||F(θ)|| (median)"),
                           ("linear_residual", "adjoint relative residual (median)"),
                           ("linear_residual_max", "adjoint relative residual (max)"),
                           ("unconverged", "adjoint unconverged fraction"),
                           ("indefinite", "negative-curvature fraction")):
            x, y = smooth(history[key])
            axes[2].plot(x, y, label=label)
        axes[2].set_yscale("symlog", linthresh=1e-4)
        axes[2].set_ylabel("per meta-step, over tasks")
    for ax in axes:
        ax.set_xlabel("meta-step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _protocol(cfg: DictConfig) -> str:
    t, i, e = cfg.task, cfg.inner, cfg.eval
    return (f"y = A sin(x - phase), A ~ U{list(t.amplitude)}, phase ~ U{list(t.phase)}, x ~ U{list(t.x_range)}; "
            f"{t.shots}-shot, {t.queries} train / {e.queries} test query points; "
            f"MLP 1-{'-'.join(map(str, cfg.model.hidden))}-1 ReLU ({cfg.model.init} init); training inner solver "
            f"{i.solver} lr {i.lr}{f' momentum {i.momentum}' if i.momentum else ''} x {i.steps} steps"
            f"{' on the proximal loss (reg ' + str(cfg.method.reg) + ')' if cfg.method.name in IMPLICIT else ''}; "
            f"test: GD lr {e.lr} on the support MSE, query MSE after {list(e.steps)} steps")


def _summary(history: dict, key: str) -> dict | None:
    values = torch.tensor([v for v in history[key] if v is not None], dtype=torch.float64)
    if not len(values):
        return None
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    tail = values[-max(1, len(values) // 10):]
    return {"mean": values.mean().item(), "p10": q[0], "median": q[1], "p90": q[2],
            "last_10pct_mean": tail.mean().item()}


RUN_FILES = ("checkpoint.pt", "results.json", "metrics.csv", "curves.png")   # what one run writes


def main(cfg: DictConfig) -> dict:
    """Train (or resume), validate, test; returns the results dict written to ``results.json``.

    An unavailable ``run.device`` is an error before any work. The run folder is claimed first
    (:class:`~tasks.run_folder.RunFolder`): a folder holding a run is refused unless ``run.resume`` or
    ``run.overwrite``, and ``run.lock`` keeps a second run out until this one ends.
    """
    resolve_device(cfg.run.device)
    folder = RunFolder(Path(cfg.run.dir or Path("runs") / "sinusoid" / cfg.run.name), resume=cfg.run.resume,
                       overwrite=cfg.run.overwrite, files=RUN_FILES)
    try:
        return _main(cfg)
    finally:
        folder.release()


def _main(cfg: DictConfig) -> dict:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    work = build(cfg)
    run_dir = Path(cfg.run.dir or Path("runs") / "sinusoid" / cfg.run.name)
    ckpt_path = run_dir / "checkpoint.pt"
    hparams = work.model.init_params()
    opt = make_optimizer(cfg, hparams)
    history = {"step": [], **{k: [] for k in METRICS}, "val_step": [], "val": []}
    start, elapsed, cpu = 0, 0.0, 0.0
    if cfg.run.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, work.device)   # tensors and plain containers only: no code
        saved = OmegaConf.create(state["config"])
        for key in ("task", "model", "method", "inner", "meta"):
            ours, theirs = OmegaConf.to_container(cfg[key]), OmegaConf.to_container(saved[key])
            if key == "meta" and cfg.meta.schedule == "constant":  # a longer budget only extends a constant schedule
                ours, theirs = {**ours, "steps": None}, {**theirs, "steps": None}
            if ours != theirs:
                raise ValueError(f"--resume: the config's {key!r} section differs from the checkpoint's at "
                                 f"{ckpt_path}; resume with the same settings or use another run.dir.")
        if state["step"] > cfg.meta.steps:
            raise ValueError(f"--resume: the checkpoint at {ckpt_path} is at meta-step {state['step']}, beyond "
                             f"meta.steps={cfg.meta.steps}; raise meta.steps or use another run.dir.")
        with torch.no_grad():
            for k, v in state["hparams"].items():
                hparams[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        history, start, elapsed, cpu = state["history"], state["step"], state["elapsed"], state["cpu"]
        for key in METRICS:  # metrics added since the checkpoint was written: unknown for its steps
            history.setdefault(key, [None] * len(history["step"]))
    else:
        if cfg.run.resume:
            print(f"--resume: no checkpoint at {ckpt_path}; starting from scratch.", file=sys.stderr)
        if cfg.run.init_from:  # a continuation (e.g. a second stage with another reg): theta only
            if not Path(cfg.run.init_from).is_file():
                raise FileNotFoundError(f"run.init_from={cfg.run.init_from}: no such checkpoint; train that run "
                                        "first (configs/sinusoid/imaml.yaml names its first stage) or fix the path.")
            saved = load_checkpoint(cfg.run.init_from, work.device)["hparams"]
            if saved.keys() != hparams.keys() or any(saved[k].shape != hparams[k].shape for k in saved):
                raise ValueError(f"run.init_from={cfg.run.init_from}: its weights do not fit model.hidden="
                                 f"{list(cfg.model.hidden)}.")
            with torch.no_grad():
                for k, v in saved.items():
                    hparams[k].copy_(v)
    history.setdefault("invocations", []).append({  # every command that trained this run, with its start step
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "from_step": start,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})

    def checkpoint(step):
        atomic_write(ckpt_path, lambda f: torch.save({
            "step": step, "hparams": {k: v.detach() for k, v in hparams.items()}, "optimizer": opt.state_dict(),
            "history": history, "elapsed": elapsed, "cpu": cpu, "config": OmegaConf.to_container(cfg)}, f))

    implicit = cfg.method.name in IMPLICIT
    bar = tqdm(total=cfg.meta.steps, initial=start, unit="meta-step", desc=cfg.run.name, dynamic_ncols=True,
               disable=not cfg.run.progress, mininterval=1.0)
    tic, cpu_tic = time.perf_counter(), time.process_time()
    for step in range(start, cfg.meta.steps):
        tasks = work.samplers["train"].sample(step, cfg.meta.batch)
        grad_, metrics, out = meta_step(work, hparams, tasks)
        skipped = _nonfinite(grad_, out)
        if skipped and cfg.meta.on_nonfinite == "raise":
            raise bl.NonFiniteError(f"meta-step {step}: the hypergradient is not finite (NaN or inf); set "
                                    "meta.on_nonfinite=skip_step to drop such steps, or lower inner.lr.")
        if not skipped:
            for group in opt.param_groups:
                group["lr"] = meta_lr(cfg, step)
            for k, v in hparams.items():
                v.grad = grad_[k]
            opt.step()
        history["step"].append(step + 1)
        for key in METRICS:
            history[key].append(float(skipped) if key == "skipped" else metrics.get(key))
        bar.update(1)
        bar.set_postfix(mse=f"{metrics['loss']:.3f}", refresh=False)
        done = step + 1
        if cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.meta.steps):
            val = evaluate(work, hparams, "val", cfg.eval.val_tasks)
            history["val_step"].append(done)
            history["val"].append(val)
            bar.write(f"step {done}: validation MSE " + ", ".join(
                f"{v['mean']:.3f} +- {v['ci95']:.3f} ({n} steps)" for n, v in val["steps"].items()))
        if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0:
            elapsed += time.perf_counter() - tic
            cpu += time.process_time() - cpu_tic
            tic, cpu_tic = time.perf_counter(), time.process_time()
            checkpoint(done)
    bar.close()
    elapsed += time.perf_counter() - tic
    cpu += time.process_time() - cpu_tic
    if start < cfg.meta.steps or not ckpt_path.is_file():
        checkpoint(cfg.meta.steps)

    test = evaluate(work, hparams, "test", cfg.eval.test_tasks)
    skipped = int(sum(history["skipped"]))
    results = {
        "name": cfg.run.name, "method": cfg.method.name, "protocol": _protocol(cfg),
        "test": test, "meta_steps": cfg.meta.steps, "meta_batch": cfg.meta.batch,
        "skipped_steps": skipped,
        "train_wall_time_s": round(elapsed, 1), "train_cpu_time_s": round(cpu, 1),
        "implicit_diagnostics": ({key: _summary(history, key) for key in METRICS[1:-1]} if implicit else None),
        "final_val": ({"step": history["val_step"][-1], **history["val"][-1]} if history["val_step"] else None),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": _device_name(work.device)},
        "engine": _engine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "invocations": history["invocations"],
        "config": OmegaConf.to_container(cfg),
    }
    atomic_write(run_dir / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    _write_metrics(run_dir / "metrics.csv", _metrics_rows(history, cfg.run.log_every))
    shown = ", ".join(f"{v['mean']:.3f} +- {v['ci95']:.3f} ({n} steps)" for n, v in test["steps"].items())
    _plot_curves(run_dir / "curves.png", history,
                 f"{cfg.run.name}: {cfg.method.name}, {cfg.task.shots}-shot sinusoid, {cfg.meta.steps} meta-steps x "
                 f"{cfg.meta.batch} tasks{f', {skipped} skipped' if skipped else ''}\ntest MSE {shown} "
                 f"(95% CI, {test['tasks']} tasks)", implicit)
    print(f"{cfg.run.name}: test MSE {shown} (95% CI, {test['tasks']} tasks; {cfg.meta.steps} meta-steps, "
          f"{cpu / 60:.1f} CPU min) -> {run_dir / 'results.json'}")
    return results


def _engine() -> dict:
    """Which ``bilevel`` ran: its folder, a hash of its sources, and the git commit of the checkout holding it
    (``modified``: uncommitted changes under ``bilevel/``), so a result can be tied to the engine's code."""
    import hashlib
    import subprocess

    root = Path(bl.__file__).resolve().parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))).hexdigest()[:16]
    info = {"path": str(root), "sources_sha256": digest, "commit": None, "modified": None}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        info["commit"] = run("rev-parse", "HEAD")
        info["modified"] = bool(run("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cli(argv: list[str] | None = None) -> dict:
    """Parse ``[--config NAME] [--resume] key=value ...`` and run :func:`main`."""
    parsed = parse_cli(sys.argv[1:] if argv is None else argv, "maml",
                       {"--resume": "run.resume=true", "--overwrite": "run.overwrite=true"})
    if parsed is None:
        print(__doc__)
        return {}
    name, overrides, _ = parsed
    try:
        cfg = load_config(name, overrides)
    except (ValueError, FileNotFoundError) as err:   # a bad command line: the message, not a traceback
        raise SystemExit(f"error: {err}") from None
    try:
        return main(cfg)
    except (RunFolderError, ConfigError) as err:   # a refused run folder, an unavailable device: one line
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
