"""Meta-train conv4 on few-shot Omniglot (MAML, first-order MAML, iMAML, Reptile, Neumann) and test it.

Usage::

    python examples/omniglot_fewshot.py                                   # the demo config (~5 min on 2 cores)
    python examples/omniglot_fewshot.py --config maml_5w1s meta.batch=16  # a paper config with overrides
    python examples/omniglot_fewshot.py --config maml_5w1s --resume       # continue from <run.dir>/checkpoint.pt
    python examples/omniglot_fewshot.py --config maml_5w1s --overwrite    # replace the run held in <run.dir>
    python examples/omniglot_fewshot.py --eval-only --config maml_5w1s eval.select=true  # re-test a checkpoint

A folder that already holds a run is refused without ``--resume`` or ``--overwrite``; errors in the inputs, the
run folder and divergence end the script with one line (``BILEVEL_TRACEBACK=1`` shows the traceback).

Writes ``checkpoint.pt`` (atomically, every ``run.checkpoint_every`` meta-steps), then ``results.json`` (test
accuracy with a 95% confidence interval over ``eval.test_tasks`` tasks) and ``curves.png`` into ``run.dir``
(default ``runs/omniglot/<run.name>``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import vmap
from tqdm.auto import tqdm

import bilevel as bl

from . import distributed as dist
from tasks.config import parse_cli, resolve_device

from .config import PROXIMAL, OmniglotConfig, load_config
from ..run_folder import atomic_write
from .data import load_omniglot
from .evaluation import evaluate_only, select_test_adaptation, test_reg, test_solver
from .model import Conv4, cross_entropy_loss
from .solvers import MiniBatches, PullBack
from .run_folder import (DivergenceError, RunFolder, check_resume, check_step, load_checkpoint,
                         weights_norm)
from .sampler import TaskSampler, Tasks
from .splits import alphabet, make_split

__all__ = ["Workload", "build", "make_method", "evaluate", "main", "cli"]

VAL_SEED, TEST_SEED = 1_000_003, 2_000_003   # task streams of validation / test, offset from run.seed


@dataclass
class Workload:
    """Everything a run needs, built from a config before any training starts."""

    cfg: DictConfig
    model: Conv4
    problem: bl.Problem
    method: object
    test_solver: object
    test_loss: Callable            # the inner loss of test-time adaptation (inner.test_reg)
    samplers: dict[str, TaskSampler]
    device: torch.device = torch.device("cpu")


def make_method(cfg: DictConfig, model: Conv4):
    """``(problem, method, test_solver, test_loss)`` for ``cfg.method.name`` (the methods' registry).

    ``method.inner_loop=reference`` (iMAML): the inner loss is the plain task loss, solved by ``PullBack``, and the
    adjoint system is still built from the proximal stationarity condition, whose Jacobian ``H + reg·I`` (``H`` the
    Hessian of the task loss at the pulled-back weights) ``system=reference`` turns into the authors'
    ``(1 + coef) v + H v / (reg + lam_damping) = g`` (their ``Learner.matrix_evaluator``).
    """
    m, inner = cfg.method, cfg.inner
    loss = cross_entropy_loss(model)
    if m.name in PROXIMAL:  # both solve iMAML's proximal inner problem; they differ in the linear solve
        inner_loss = bl.proximal(loss, m.reg)
    else:
        inner_loss = loss
    solver = test_solver(cfg, inner.lr, inner.steps)
    if inner.batch is not None:   # Reptile only (validate): one step per mini-batch of the sampler's stream
        solver = MiniBatches(steps=inner.steps, solver=solver, size=inner.batch)
    adapt = test_solver(cfg, inner.test_lr or inner.lr, inner.test_steps)
    method = {
        "maml": lambda: bl.Unrolled(truncate=m.truncate),
        "fomaml": lambda: bl.FirstOrder(),
        "imaml": lambda: bl.imaml(reg=m.reg, cg_steps=m.cg_steps, damping=m.damping, tol=m.tol, system=m.system,
                                  solver=m.solver, coef=m.coef, lam_damping=m.lam_damping),
        "reptile": lambda: bl.Reptile(),
        "neumann": lambda: bl.neumann(steps=m.neumann_steps, alpha=m.neumann_alpha, tol=m.tol),
    }[m.name]()
    if m.inner_loop == "reference":
        inner_loss = loss
        solver = PullBack(steps=inner.steps, lr=inner.lr, reg=m.reg)
        method = dataclasses.replace(method, condition=bl.stationarity(bl.proximal(loss, m.reg)))
    reg = test_reg(cfg)
    test_loss = bl.proximal(loss, reg) if reg else loss
    return bl.Problem(inner_loss, loss, solver, init=bl.meta_init), method, adapt, test_loss


def build(cfg: DictConfig, data=None) -> Workload:
    """Load the data, split it, and build the samplers, model and method; every input error is raised here."""
    d, t = cfg.data, cfg.task
    device = resolve_device(cfg.run.device)   # an unavailable device is an error before the data is read
    sets = (d.background,) + ((d.evaluation,) if d.evaluation else ())
    data = data or load_omniglot(sets, d.root, download=d.download, cache=d.cache)
    sampling = {"train": t.sampling, "val": cfg.eval.sampling or t.sampling, "test": cfg.eval.sampling or t.sampling}
    split = make_split(data, d.protocol, seed=d.split_seed, num_train=d.num_train, num_val=d.num_val,
                       background=d.background, val_alphabets=sampling["val"] == "within_alphabet")
    eval_queries = cfg.eval.queries or t.queries
    samplers = {}
    for name, seed, queries in (("train", 0, t.queries), ("val", VAL_SEED, eval_queries),
                                ("test", TEST_SEED, eval_queries)):
        within = sampling[name] == "within_alphabet"
        alphabets = [alphabet(data.characters[i]) for i in split[name]] if within else None
        train = name == "train"   # meta-training tasks: task.train_shots, inner.batch mini-batches (Reptile)
        shots = (t.train_shots or t.shots) if train else t.shots
        batches = (cfg.inner.steps, cfg.inner.batch) if train and cfg.inner.batch else None
        try:
            samplers[name] = TaskSampler(data.images, split[name], ways=t.ways, shots=shots, queries=queries,
                                         rotation=d.rotation, seed=cfg.run.seed + seed, alphabets=alphabets,
                                         batches=batches)
        except ValueError as err:
            raise ValueError(f"{name} split ({d.protocol} protocol): {err}") from None
        if samplers[name].skipped and cfg.run.progress:
            print(f"{name} split: {len(samplers[name].groups)} alphabets with >= {t.ways} classes; skipped "
                  f"{len(samplers[name].skipped)} smaller ones ({', '.join(samplers[name].skipped)}).",
                  file=sys.stderr)
    torch.manual_seed(cfg.run.seed)
    model = Conv4(t.ways, pool=cfg.model.pool)
    problem, method, test_solver, test_loss = make_method(cfg, model)
    return Workload(cfg, model, problem, method, test_solver, test_loss, samplers, device)


def check_model(saved: DictConfig, cfg: DictConfig, path) -> None:
    """Refuse a checkpoint of the other conv4 variant (both have the same parameter names and shapes)."""
    pool = OmegaConf.select(saved, "model.pool", default="max")   # checkpoints from before model.pool: max-pool
    if pool != cfg.model.pool:
        raise ValueError(f"{path} holds a conv4 trained with model.pool={pool}, not model.pool={cfg.model.pool}; "
                         f"add model.pool={pool} to load it.")


def task_accuracy(model, params, images, labels) -> torch.Tensor:
    """Per-task query accuracy for stacked ``params`` / ``images`` (forward only, so vmap is safe with BN)."""
    def one(p, x, y):
        return (model.logits(p, x).argmax(-1) == y).float().mean()
    return vmap(one)(params, images, labels)


def evaluate(work: Workload, hparams, split: str, tasks: int, chunk: int = 50, solver=None) -> dict:
    """Adapt to ``tasks`` fixed tasks of ``split`` with the test-time inner solver; mean accuracy and 95% CI.

    The tasks are the same at every call (the sampler's meta-step 0), so validation curves compare like with like.
    ``solver`` replaces the configured test-time solver (test-time adaptation chosen on validation tasks).
    """
    solver = solver or work.test_solver
    accs = []
    for start in range(0, tasks, chunk):
        batch = work.samplers[split].sample(0, min(chunk, tasks - start), start=start)
        batch = Tasks(*(t.to(work.device) for t in batch))
        for i in range(batch.support.shape[0]):
            task = batch.task(i)
            params, _ = solver(work.test_loss, dict(hparams), hparams,
                                         (task.support, task.support_labels))
            with torch.no_grad():
                logits = work.model.logits(params, task.query)
            accs.append((logits.argmax(-1) == task.query_labels).float().mean())
    accs = torch.stack(accs).double()
    ci = 1.96 * accs.std(unbiased=True).item() / math.sqrt(len(accs)) if len(accs) > 1 else float("nan")
    return {"accuracy": accs.mean().item(), "ci95": ci, "tasks": len(accs)}


def meta_step(work: Workload, hparams, tasks: Tasks):
    """One hypergradient over a stack of tasks: ``(grad, outer_loss, per-task query accuracies, Hypergrad)``."""
    cfg = work.cfg.meta
    inner, outer = (tasks.support, tasks.support_labels), (tasks.query, tasks.query_labels)
    out = bl.meta_grad(work.method, work.problem, hparams, inner, outer, batching=cfg.batching,
                       chunk_size=cfg.chunk_size, workers=cfg.workers, on_nonconvergence=cfg.on_nonconvergence,
                       precision=cfg.precision,
                       # applied after the (all-)reduce, on every rank together; skip_task drops tasks here
                       on_nonfinite="skip_task" if cfg.on_nonfinite == "skip_task" else "ignore")
    with torch.no_grad():
        acc = task_accuracy(work.model, out.params, tasks.query, tasks.query_labels)
    if out.kept is not None:   # skip_task: a dropped task's weights are non-finite; its accuracy is not a result
        acc = acc[out.kept]
    return out.grad, out.outer_loss.detach(), acc, out


def unconverged_fraction(out) -> torch.Tensor:
    """Fraction of tasks whose adjoint linear solve missed its tolerance (implicit methods; 0 for the others)."""
    if out.linear_info is None:
        return torch.zeros(())
    return (~out.linear_info.converged).double().mean()


def adjoint_residual(out) -> torch.Tensor:
    """Median relative residual of the tasks' adjoint solves (implicit methods; 0 for the others)."""
    if out.linear_info is None:
        return torch.zeros(())
    return out.linear_info.residual.double().median()


def _nonfinite(grad, out) -> torch.Tensor:
    if out.kept is not None:  # skip_task: meta_grad already left the non-finite tasks out of the mean
        return torch.stack([~torch.isfinite(g).all() for g in grad.values()]).any()
    flags = [out.inner_info.nonfinite.any(), ~torch.isfinite(out.outer_loss)]
    if out.linear_info is not None:
        flags.append(out.linear_info.nonfinite.any())
    return torch.stack(flags + [~torch.isfinite(g).all() for g in grad.values()]).any()


def make_optimizer(cfg: DictConfig, hparams):
    tensors = list(hparams.values())
    if cfg.meta.optimizer == "adam":
        return torch.optim.Adam(tensors, lr=cfg.meta.lr, eps=cfg.meta.eps)
    return torch.optim.SGD(tensors, lr=cfg.meta.lr)


def meta_lr(cfg: DictConfig, step: int) -> float:
    """The meta learning rate at ``step`` (a pure function of the step, so a resumed run follows it exactly)."""
    if cfg.meta.schedule == "linear":
        return cfg.meta.lr * (1 - step / cfg.meta.steps)
    return cfg.meta.lr


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _plot_curves(path: Path, history: dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = torch.tensor(history["step"], dtype=torch.float64)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    window = max(1, len(steps) // 100)
    for values, ax, label in ((history["loss"], ax_loss, "meta-train query loss"),
                              (history["acc"], ax_acc, "meta-train query accuracy")):
        v = torch.tensor(values, dtype=torch.float64)
        if len(v) >= window:  # moving average: per-step values of a small meta-batch are noisy
            smooth = v.unfold(0, window, 1).mean(1)
            ax.plot(steps[window - 1:], smooth, label=f"{label} (avg of {window})")
        ax.set_xlabel("meta-step")
    if history["val_step"]:
        ax_acc.errorbar(history["val_step"], history["val_acc"], yerr=history["val_ci"], fmt="o-", ms=3,
                        label="validation accuracy (95% CI)")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _protocol(cfg: DictConfig) -> str:
    d, t, i = cfg.data, cfg.task, cfg.inner
    words = {"any": "from any alphabets", "within_alphabet": "from one alphabet per task"}
    test_lam = f", proximal lambda {test_reg(cfg):g}" if test_reg(cfg) else ""
    return (f"{t.ways}-way {t.shots}-shot, {t.queries} train / {cfg.eval.queries or t.queries} test queries per "
            f"class; {d.protocol} split (seed {d.split_seed}); classes {words[t.sampling]} (val/test: "
            f"{words[cfg.eval.sampling or t.sampling]}); rotation {d.rotation}; conv4 ({cfg.model.pool} "
            f"variant) with transductive batch norm (batch statistics of support and query sets, no running "
            f"statistics); inner {i.solver} lr {i.lr} x {i.steps} steps{_inner_loss(cfg)} (test: lr "
            f"{i.test_lr or i.lr} x {i.test_steps}{test_lam})")


def _inner_loss(cfg: DictConfig) -> str:
    m = cfg.method
    if m.name == "neumann" or (m.name == "imaml" and m.inner_loop == "proximal"):
        return f" on the proximal loss (lambda {m.reg:g})"
    if m.name == "imaml":
        return f" on the plain loss, then one step on the proximal term (lambda {m.reg:g}; the authors' loop)"
    return ""


def run_dir_of(cfg: DictConfig) -> Path:
    """``run.dir``, else ``runs/omniglot/<run.name>``."""
    return Path(cfg.run.dir or Path("runs") / "omniglot" / cfg.run.name)


def _training_part(section: DictConfig) -> dict:
    """A config section without its test-time keys (``inner.test_*``), which do not change what is trained."""
    return {k: v for k, v in OmegaConf.to_container(section).items() if not k.startswith("test_")}


def main(cfg: DictConfig, data=None) -> dict:
    """Train (or resume), validate, test; returns the results dict written to ``results.json``.

    Before any work, the main process claims the run folder (:class:`~tasks.omniglot.run_folder.RunFolder`): a
    folder holding a run is refused unless ``run.resume`` or ``run.overwrite``, and ``run.lock`` is held until the
    run ends, however it ends.
    """
    resolve_device(cfg.run.device)   # an unavailable device is an error before any work
    if int(os.environ.get("RANK", "0")) != 0:
        return _main(cfg, data)
    folder = RunFolder(run_dir_of(cfg), resume=cfg.run.resume, overwrite=cfg.run.overwrite)
    try:
        return _main(cfg, data)
    finally:
        folder.release()


def _main(cfg: DictConfig, data=None) -> dict:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    ctx = dist.setup(cfg)
    work = build(cfg, data)
    run_dir = run_dir_of(cfg)
    ckpt_path = run_dir / "checkpoint.pt"
    work.model.to(work.device)
    hparams = work.model.init_params()
    initial_norm = weights_norm(hparams)   # the seed's initialisation, also on resume: for the explosion check
    opt = make_optimizer(cfg, hparams)
    history = {"step": [], "loss": [], "acc": [], "unconverged": [], "residual": [], "dropped": [],
               "val_step": [], "val_acc": [], "val_ci": [],
               "val_time": [], "val_cpu": [], "skipped": [], "divergence": []}
    start, elapsed, cpu, wandb_id = 0, 0.0, 0.0, None
    if cfg.run.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, map_location=work.device)
        saved = OmegaConf.merge(OmegaConf.structured(OmniglotConfig), state["config"])  # new keys: defaults
        check_model(saved, cfg, ckpt_path)
        for key in ("task", "method", "inner", "data"):   # test-time settings may change (check_resume names them)
            if _training_part(saved[key]) != _training_part(cfg[key]):
                raise ValueError(f"--resume: the config's {key!r} section differs from the checkpoint's at "
                                 f"{ckpt_path}; resume with the same settings or use another run.dir.")
        check_resume(saved, cfg, state["step"], ckpt_path)
        with torch.no_grad():
            for k, v in state["hparams"].items():
                hparams[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        history, start, elapsed, wandb_id = state["history"], state["step"], state["elapsed"], state["wandb_id"]
        cpu = state.get("cpu", 0.0)
        for key in ("val_time", "val_cpu"):      # checkpoints from before these curves
            history.setdefault(key, [float("nan")] * len(history["val_step"]))
        history.setdefault("unconverged", [0.0] * len(history["step"]))  # checkpoints from before this metric
        history.setdefault("residual", [0.0] * len(history["step"]))
        history.setdefault("dropped", [0.0] * len(history["step"]))
        history.setdefault("skipped", [])
        history.setdefault("divergence", [])
    elif cfg.run.resume and ctx.is_main:
        print(f"--resume: no checkpoint at {ckpt_path}; starting from scratch.", file=sys.stderr)

    wandb_run = None
    if cfg.wandb.mode != "disabled" and ctx.is_main:
        import wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        wandb_run = wandb.init(project=cfg.wandb.project, name=cfg.run.name, mode=cfg.wandb.mode, dir=str(run_dir),
                               config=OmegaConf.to_container(cfg), id=wandb_id, resume="allow")
        wandb_id = wandb_run.id

    def checkpoint(step):
        if ctx.is_main:
            _save_checkpoint(ckpt_path, {
                "step": step, "hparams": hparams, "optimizer": opt.state_dict(), "history": history,
                "elapsed": elapsed, "cpu": cpu, "wandb_id": wandb_id, "config": OmegaConf.to_container(cfg),
                "ways": cfg.task.ways})

    per_rank = ctx.shard(cfg.meta.batch)
    bar = tqdm(total=cfg.meta.steps, initial=start, unit="meta-step", desc=cfg.run.name, dynamic_ncols=True,
               disable=not (cfg.run.progress and ctx.is_main), mininterval=1.0)
    tic, cpu_tic = time.perf_counter(), time.process_time()
    best = max(history["val_acc"], default=-1.0)
    budget = None if cfg.run.budget_cpu_minutes is None else 60.0 * cfg.run.budget_cpu_minutes
    for step in range(start, cfg.meta.steps):
        if budget is not None and cpu >= budget:   # a resumed run whose budget is already spent
            break
        tasks = work.samplers["train"].sample(step, per_rank, start=ctx.rank * per_rank)
        tasks = Tasks(*(t.to(work.device) for t in tasks))
        grad, loss, acc, out = meta_step(work, hparams, tasks)
        # The budget is judged on the main rank's clock and travels with the metrics, so every rank stops together.
        over = budget is not None and ctx.is_main and cpu + time.process_time() - cpu_tic >= budget
        metrics = {"loss": loss, "acc": acc.mean(), "unconverged": unconverged_fraction(out),
                   "residual": adjoint_residual(out), "dropped": 0 if out.dropped is None else out.dropped,
                   "over_budget": float(over)}
        grad, metrics = ctx.all_reduce_mean(grad, metrics, nonfinite=_nonfinite(grad, out))
        last = step + 1 == cfg.meta.steps or metrics.pop("over_budget") > 0
        if grad is not None:  # None: a non-finite hypergradient somewhere, the step is skipped on every rank
            for group in opt.param_groups:
                group["lr"] = meta_lr(cfg, step)
            for k, v in hparams.items():
                v.grad = grad[k]
            opt.step()
        else:
            history["skipped"].append(step + 1)
        history["step"].append(step + 1)
        for name in ("loss", "acc", "unconverged", "residual", "dropped"):
            history[name].append(metrics[name])
        check_step(cfg, history, hparams, initial_norm, ckpt_path)   # before anything is validated or saved
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}", refresh=False)
        log = {f"train/{k}": v for k, v in metrics.items()} | {"meta_lr": meta_lr(cfg, step)}
        done = step + 1
        if cfg.eval.every and (done % cfg.eval.every == 0 or last) and ctx.is_main:
            # Time to accuracy counts training only: the clocks stop during validation.
            elapsed += time.perf_counter() - tic
            cpu += time.process_time() - cpu_tic
            val = evaluate(work, hparams, "val", cfg.eval.val_tasks)
            tic, cpu_tic = time.perf_counter(), time.process_time()
            history["val_step"].append(done)
            history["val_acc"].append(val["accuracy"])
            history["val_ci"].append(val["ci95"])
            history["val_time"].append(elapsed)
            history["val_cpu"].append(cpu)
            if val["accuracy"] > best:   # the weights the final test uses (best by validation), kept apart
                best = val["accuracy"]
                _save_checkpoint(run_dir / "best.pt", {"step": done, "hparams": hparams, "val": val,
                                                       "config": OmegaConf.to_container(cfg)})
            log.update({"val/acc": val["accuracy"], "val/ci95": val["ci95"]})
            bar.write(f"step {done}: validation accuracy {100 * val['accuracy']:.2f} "
                      f"+- {100 * val['ci95']:.2f} % ({val['tasks']} tasks)")
        if wandb_run is not None:
            wandb_run.log(log, step=done)
        if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0:
            elapsed += time.perf_counter() - tic
            cpu += time.process_time() - cpu_tic
            tic, cpu_tic = time.perf_counter(), time.process_time()
            checkpoint(done)
        if last:
            break
    bar.close()
    elapsed += time.perf_counter() - tic
    cpu += time.process_time() - cpu_tic
    reached = (history["step"] or [0])[-1]
    if reached > start or not ckpt_path.is_file():
        checkpoint(reached)

    results = None
    if ctx.is_main:
        tested = {"file": "checkpoint.pt", "step": reached}
        if cfg.eval.weights == "best" and (run_dir / "best.pt").is_file():   # best by validation, as the papers
            best_state = load_checkpoint(run_dir / "best.pt", map_location=work.device)
            hparams = best_state["hparams"]
            tested = {"file": "best.pt", "step": best_state["step"], "val": best_state["val"]}
        adaptation = {"lr": cfg.inner.test_lr or cfg.inner.lr, "steps": cfg.inner.test_steps}
        if cfg.eval.select:   # test-time lr and steps from validation tasks; kept with the checkpoint
            adaptation = select_test_adaptation(work, hparams, evaluate)
            for path in (ckpt_path, run_dir / "best.pt"):
                if path.is_file():
                    state = load_checkpoint(path, map_location=work.device)
                    _save_checkpoint(path, {**state, "test_adaptation": adaptation})
        adaptation["reg"] = test_reg(cfg)
        test = evaluate(work, hparams, "test", cfg.eval.test_tasks,
                        solver=test_solver(cfg, adaptation["lr"], adaptation["steps"]))
        results = {
            "name": cfg.run.name, "method": cfg.method.name, "protocol": _protocol(cfg),
            "test": test, "tested_weights": tested, "test_adaptation": adaptation,
            "meta_steps": reached, "meta_batch": cfg.meta.batch, "planned_meta_steps": cfg.meta.steps,
            "budget_cpu_minutes": cfg.run.budget_cpu_minutes,
            "train_cpu_time_s": round(cpu, 1),
            "train_wall_time_s": round(elapsed, 1),
            "adjoint_unconverged_fraction": (sum(history["unconverged"]) / len(history["unconverged"])
                                             if history["unconverged"] else 0.0),
            "adjoint_median_residual": (float(torch.tensor(history["residual"]).median())
                                        if history["residual"] else 0.0),
            "dropped_tasks": sum(history["dropped"]),  # meta.on_nonfinite=skip_task (summed over ranks' means)
            "skipped_steps": history["skipped"], "divergence": history["divergence"],
            "final_val": ({"step": history["val_step"][-1], "accuracy": history["val_acc"][-1],
                           "ci95": history["val_ci"][-1]} if history["val_step"] else None),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "world_size": ctx.world_size},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(sys.argv), "config": OmegaConf.to_container(cfg),
        }
        atomic_write(run_dir / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
        t = cfg.task
        _plot_curves(run_dir / "curves.png", history,
                     f"{cfg.run.name}: {cfg.method.name}, {t.ways}-way {t.shots}-shot, {cfg.data.protocol} split, "
                     f"rotation {cfg.data.rotation}, transductive batch norm; {reached} meta-steps x "
                     f"{cfg.meta.batch} tasks\ntest accuracy {100 * test['accuracy']:.2f} +- "
                     f"{100 * test['ci95']:.2f} % (95% CI, {test['tasks']} tasks, inner lr {adaptation['lr']:g} x "
                     f"{adaptation['steps']} steps, {tested['file']} of step {tested['step']})")
        print(f"{cfg.run.name}: test accuracy {100 * test['accuracy']:.2f} +- {100 * test['ci95']:.2f} % "
              f"(95% CI, {test['tasks']} tasks; {reached} meta-steps, {cpu / 60:.1f} CPU min training) "
              f"-> {run_dir / 'results.json'}")
        if history["skipped"] or history["divergence"]:
            print(f"{cfg.run.name}: {len(history['skipped'])} of {reached} meta-steps skipped for a non-finite "
                  f"hypergradient; signs of divergence: {[d['message'] for d in history['divergence']] or 'none'} "
                  f"(both in results.json)", file=sys.stderr)
        if wandb_run is not None:
            wandb_run.summary.update({"test/acc": test["accuracy"], "test/ci95": test["ci95"]})
            wandb_run.finish()
    ctx.close()
    return results


def cli(argv: list[str] | None = None) -> dict:
    """Parse ``[--config NAME] [--resume | --overwrite | --eval-only] key=value ...`` and run :func:`main`."""
    parsed = parse_cli(sys.argv[1:] if argv is None else argv, "demo",
                       {"--resume": "run.resume=true", "--overwrite": "run.overwrite=true", "--eval-only": None})
    if parsed is None:
        print(__doc__)
        return {}
    name, overrides, flags = parsed
    eval_only = "--eval-only" in flags
    if eval_only:   # the checkpoint's own config, with test settings from the command line
        given = dict(o.split("=", 1) for o in overrides if "=" in o)
        run_dir = Path(given.get("run.dir") or Path("runs") / "omniglot" / given.get("run.name", name))
        try:
            return evaluate_only(run_dir, overrides, build, evaluate, load_checkpoint)
        except (ValueError, OSError) as err:
            if os.environ.get("BILEVEL_TRACEBACK"):
                raise
            raise SystemExit(f"error: {' '.join(str(err).split())}") from None
    try:
        cfg = load_config(name, overrides)
    except (ValueError, FileNotFoundError) as err:   # a bad command line: the message, not a traceback
        raise SystemExit(f"error: {err}") from None
    try:
        return main(cfg)
    except (ValueError, OSError, DivergenceError, bl.NonFiniteError) as err:
        # Bad inputs (data, split, device), a refused run folder, divergence: one line, unless asked for more.
        if os.environ.get("BILEVEL_TRACEBACK"):
            raise
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
