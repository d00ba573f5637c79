"""Testing a trained initialisation: test-time adaptation chosen on validation tasks, and evaluate-only runs.

Test-time adaptation need not be training's: a model meta-trained with one inner step at lr 0.4 may test better
with ten steps at 0.1. With ``eval.select=true`` the inner lr and step count used for testing (and stored in the
checkpoint for the inference API) are chosen from ``eval.lr_grid`` x ``eval.steps_grid`` by validation accuracy on
``eval.select_tasks`` validation tasks, the same tasks for every candidate; ties go to fewer steps, then the
smaller lr. Test tasks are never looked at before the choice is made.

``python examples/omniglot_fewshot.py --eval-only run.dir=<folder> [inner.test_lr=.. inner.test_steps=..]
[eval.select=true] [eval.weights=best|last]`` tests a run's checkpoint with the given (or validation-chosen) test
settings and writes its own ``eval-*.json`` beside the run's files, never replacing one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .config import PROXIMAL, OmniglotConfig, test_reg, validate
from ..run_folder import atomic_write
from .solvers import inner_solver

__all__ = ["test_solver", "test_reg", "select_test_adaptation", "evaluate_only", "EVAL_KEYS"]

# What an evaluate-only run may change on the command line: how to test, not what was trained.
EVAL_KEYS = ("inner.test_lr", "inner.test_steps", "inner.test_reg", "eval.", "data.root", "data.download",
             "data.cache", "run.dir", "run.name", "run.threads", "run.device", "run.progress", "wandb.")


def test_solver(cfg: DictConfig, lr: float, steps: int):
    """The config's inner solver (``inner.solver``; Adam with ``inner.beta1``) with the given lr and steps: the
    training solver before any mini-batching, and the test-time one."""
    return inner_solver(cfg.inner.solver, lr, steps, cfg.inner.beta1)


def select_test_adaptation(work, hparams, evaluate) -> dict:
    """Validation accuracy of every (lr, steps) of the grids; returns ``{"lr", "steps", "grid"}`` of the best."""
    e = work.cfg.eval
    grid = []
    for lr in e.lr_grid:
        for steps in e.steps_grid:
            solver = test_solver(work.cfg, lr, steps)
            val = evaluate(work, hparams, "val", e.select_tasks, solver=solver)
            grid.append({"lr": lr, "steps": steps, "accuracy": val["accuracy"], "ci95": val["ci95"]})
    best = max(grid, key=lambda g: (g["accuracy"], -g["steps"], -g["lr"]))
    return {"lr": best["lr"], "steps": best["steps"], "tasks": e.select_tasks, "grid": grid}


def _unique(path: Path) -> Path:
    """``path``, or ``path`` with ``-2``, ``-3``, ... before the suffix if it exists: nothing is overwritten."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def evaluate_only(run_dir: Path, overrides: list[str], build, evaluate, load_checkpoint) -> dict:
    """Test the checkpoint in ``run_dir`` with the test settings of ``overrides``; write ``eval-*.json``.

    Args:
        run_dir: the training run's folder (holding ``best.pt`` and/or ``checkpoint.pt``).
        overrides: ``key=value`` test settings (only keys under :data:`EVAL_KEYS`).
        build, evaluate, load_checkpoint: the training script's functions (passed in to avoid an import cycle).

    Raises:
        ValueError: no checkpoint in ``run_dir``, or an override that would change what was trained.
    """
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(EVAL_KEYS)]
    if bad:
        raise ValueError(f"--eval-only changes how a checkpoint is tested, not what was trained: {bad} not allowed "
                         f"(allowed: inner.test_lr, inner.test_steps, inner.test_reg, eval.*, data.root, run.*).")
    last = run_dir / "checkpoint.pt"
    if not last.is_file():
        raise ValueError(f"--eval-only: no checkpoint.pt in {run_dir}; give run.dir=<a training run's folder>.")
    state = load_checkpoint(last)
    cfg = OmegaConf.merge(OmegaConf.structured(OmniglotConfig), state["config"],
                          OmegaConf.from_dotlist(list(overrides)))
    cfg.run.dir, cfg.run.resume = str(run_dir), False
    # The test settings are the command line's: selection only when asked for here, not inherited from training.
    cfg.eval.select = any(o.replace(" ", "") in ("eval.select=true", "eval.select=True") for o in overrides)
    validate(cfg)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    weights = cfg.eval.weights
    source = run_dir / "best.pt" if weights == "best" and (run_dir / "best.pt").is_file() else last
    chosen = load_checkpoint(source) if source != last else state
    work = build(cfg)
    hparams = {k: v.to(work.device) for k, v in chosen["hparams"].items()}
    if cfg.eval.select:
        adaptation = select_test_adaptation(work, hparams, evaluate)
    else:
        adaptation = {"lr": cfg.inner.test_lr or cfg.inner.lr, "steps": cfg.inner.test_steps}
    adaptation["reg"] = test_reg(cfg)
    test = evaluate(work, hparams, "test", cfg.eval.test_tasks,
                    solver=test_solver(cfg, adaptation["lr"], adaptation["steps"]))
    results = {
        "run": str(run_dir), "weights": {"file": source.name, "step": chosen["step"], "val": chosen.get("val")},
        "trained_steps": state["step"], "test": test, "test_adaptation": adaptation,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "overrides": list(overrides),
    }
    proximal = adaptation["reg"] or cfg.method.name in PROXIMAL
    reg = f"-reg{adaptation['reg']:g}" if proximal else ""
    name = f"eval-step{chosen['step']}-lr{adaptation['lr']:g}x{adaptation['steps']}{reg}.json"
    path = _unique(run_dir / name)
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode()))
    lam = f", proximal lambda {adaptation['reg']:g}" if adaptation["reg"] else ""
    print(f"{run_dir.name} ({source.name}, meta-step {chosen['step']}): test accuracy "
          f"{100 * test['accuracy']:.2f} +- {100 * test['ci95']:.2f} % (95% CI, {test['tasks']} tasks; inner lr "
          f"{adaptation['lr']:g} x {adaptation['steps']} steps{lam}) -> {path}")
    return results
