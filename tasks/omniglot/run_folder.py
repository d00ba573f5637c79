"""The Omniglot script's run folder and its divergence checks.

The run folder itself (one run per folder, ``run.lock``, writable before any work, ``--resume`` / ``--overwrite``,
checkpoints loaded with ``weights_only=True``) is :class:`tasks.run_folder.RunFolder`; here it holds the Omniglot
script's files, :data:`RUN_FILES`: ``checkpoint.pt``, ``best.pt``, ``results.json``, ``curves.png``, ``wandb/`` and
the ``eval-*.json`` of ``--eval-only``. Divergence (:func:`divergence`, :func:`weights_problem`) is checked at every
meta-step from the run's history alone, so a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from tasks import run_folder
from tasks.run_folder import LOCK, RunFolderError, load_checkpoint

__all__ = ["RunFolder", "RunFolderError", "DivergenceError", "DivergenceWarning", "Divergence", "load_checkpoint",
           "divergence", "weights_problem", "check_step", "check_resume", "RUN_FILES", "LOCK"]

RUN_FILES = ("checkpoint.pt", "best.pt", "results.json", "curves.png", "wandb", "eval-*.json")  # one run's files

# Divergence thresholds (see docs/failure-modes.md). The loss of a uniform guess over N classes is log N; a trained
# or training model is below it, so a query loss 10x above it for a whole window is divergence, not noise.
LOSS_FACTOR = 10.0
LOSS_WINDOW = 10          # meta-steps; the median over the window ignores single spikes
WARMUP = 200              # meta-steps before "accuracy at chance" counts (the demo leaves chance within ~10 steps)
CHANCE_WINDOW = 50        # meta-steps averaged for the chance test
CHANCE_MARGIN = 1.25      # mean accuracy <= 1.25 / N is "at chance"
SKIP_WINDOW = 10          # more than half of these meta-steps skipped (non-finite) is divergence
WEIGHT_FACTOR = 100.0     # weights whose norm grew 100x since initialisation have exploded


class DivergenceError(RuntimeError):
    """Training diverged; the message names the meta-step, what was seen and the likely cause."""


class DivergenceWarning(RuntimeWarning):
    """Training shows a sign of divergence and ``meta.on_divergence="warn"`` lets it continue."""


class Divergence(NamedTuple):
    """A sign of divergence: ``kind`` is ``"loss"``, ``"chance"`` or ``"skipped"``; ``message`` says what was seen."""

    kind: str
    message: str


class RunFolder(run_folder.RunFolder):
    """:class:`tasks.run_folder.RunFolder` holding the Omniglot script's files (:data:`RUN_FILES`) by default."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 files: tuple[str, ...] = RUN_FILES):
        super().__init__(path, files=files, resume=resume, overwrite=overwrite)


def check_resume(saved, cfg, step: int, path: Path) -> None:
    """Refuse a resume that would change the run's meaning; warn about changed ``meta`` and test-time settings.

    ``run.seed`` sets the task stream, so a new seed would splice two runs; ``meta.steps`` below the reached step
    would label further-trained weights as a shorter run. Changing, e.g., ``meta.lr`` is allowed and named.
    """
    if saved.run.seed != cfg.run.seed:
        raise RunFolderError(f"--resume: run.seed={cfg.run.seed} but {path} was trained with run.seed="
                             f"{saved.run.seed}, which sets the task stream; resume with run.seed={saved.run.seed} "
                             f"or start a new run.")
    if cfg.meta.steps < step:
        raise RunFolderError(f"--resume: {path} is at step {step} but meta.steps={cfg.meta.steps}; those weights "
                             f"are not a {cfg.meta.steps}-step result. Use meta.steps >= {step}, or start a new run.")
    changed = [f"meta.{k}: {saved.meta[k]} -> {cfg.meta[k]}" for k in cfg.meta
               if k != "steps" and k in saved.meta and saved.meta[k] != cfg.meta[k]]
    changed += [f"inner.{k}: {saved.inner[k]} -> {cfg.inner[k]}" for k in cfg.inner
                if k.startswith("test_") and k in saved.inner and saved.inner[k] != cfg.inner[k]]
    if changed:
        warnings.warn(f"--resume of {path} with changed settings: {'; '.join(changed)}.", UserWarning,
                      stacklevel=3)


def weights_norm(hparams: dict) -> float:
    """Euclidean norm of all weights together (float64)."""
    return math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in hparams.values()))


def weights_problem(hparams: dict, initial_norm: float) -> str | None:
    """Why ``hparams`` must not be kept (non-finite or exploded weights), or ``None``."""
    bad = [k for k, v in hparams.items() if not torch.isfinite(v).all()]
    if bad:
        return f"the weights are non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    norm = weights_norm(hparams)
    if norm > WEIGHT_FACTOR * initial_norm:
        return (f"the weights exploded: norm {norm:.3g}, {norm / initial_norm:.3g}x their initial norm "
                f"{initial_norm:.3g}")
    return None


def divergence(history: dict, ways: int) -> Divergence | None:
    """What in the training ``history`` shows divergence at its last meta-step, or ``None``.

    Three signs, each over a window of recent meta-steps so that one noisy step does not count:

    - the median query loss of the last ``LOSS_WINDOW`` steps is above ``LOSS_FACTOR`` x log N, where log N is the
      loss of a uniform guess over N classes (the start of a run is near it: 1.6-4 for 5-way conv4); a loss that
      is already that high at the first step counts too, since a first step can diverge;
    - after ``WARMUP`` steps, the mean query accuracy of the last ``CHANCE_WINDOW`` steps is at chance
      (at most ``CHANCE_MARGIN`` / N);
    - more than half of the last ``SKIP_WINDOW`` steps were skipped for a non-finite hypergradient.

    Args:
        history: the training history (``step``, ``loss``, ``acc`` lists and ``skipped`` steps).
        ways: N, the classes per task.
    """
    steps, losses, accs = history["step"], history["loss"], history["acc"]
    if not steps:
        return None
    last = steps[-1]
    finite = [v for v in losses[-LOSS_WINDOW:] if math.isfinite(v)]
    if len(losses) >= LOSS_WINDOW and len(finite) > LOSS_WINDOW // 2:
        median = sorted(finite)[len(finite) // 2]
        if median > LOSS_FACTOR * math.log(ways):
            return Divergence("loss", f"the query loss (median {median:.3g} over the last {LOSS_WINDOW} "
                                      f"meta-steps) is over {LOSS_FACTOR:g}x that of a uniform guess "
                                      f"({math.log(ways):.3g})")
    if last >= WARMUP and len(accs) >= CHANCE_WINDOW:
        mean = sum(accs[-CHANCE_WINDOW:]) / CHANCE_WINDOW
        if mean <= CHANCE_MARGIN / ways:
            return Divergence("chance", f"the query accuracy is at chance after {last} meta-steps (mean "
                                        f"{mean:.3f} over the last {CHANCE_WINDOW}; chance is {1 / ways:.3f})")
    skipped = [s for s in history.get("skipped", []) if s > last - SKIP_WINDOW]
    if len(steps) >= SKIP_WINDOW and len(skipped) > SKIP_WINDOW // 2:
        return Divergence("skipped", f"{len(skipped)} of the last {SKIP_WINDOW} meta-steps were skipped for a "
                                     f"non-finite hypergradient")
    return None


def likely_cause(cfg) -> str:
    """The settings most likely behind a divergence, named with their values."""
    return (f"likely cause: a learning rate too large (inner.lr={cfg.inner.lr}, meta.lr={cfg.meta.lr}); lower "
            f"them, or check the data for non-finite values")


def check_step(cfg, history: dict, hparams: dict, initial_norm: float, checkpoint_path: Path) -> None:
    """After the outer step that ended meta-step ``history["step"][-1]``: stop on divergence, or record it.

    Non-finite or exploded weights always stop the run (they would otherwise be checkpointed). The signs of
    :func:`divergence` follow ``meta.on_divergence``: ``raise`` stops, ``warn`` warns once per kind and records
    ``{"step", "kind", "message"}`` in ``history["divergence"]`` (written to ``results.json``), ``ignore`` does
    neither.

    Raises:
        DivergenceError: naming the meta-step, what was seen, the likely cause and the checkpoint kept.
    """
    step = history["step"][-1]
    kept = (f"{checkpoint_path} still holds the last checkpointed weights" if checkpoint_path.is_file()
            else "No checkpoint was written")
    problem = weights_problem(hparams, initial_norm)
    if problem is not None:
        raise DivergenceError(f"diverged at meta-step {step}: {problem}; {likely_cause(cfg)}. These weights are "
                              f"not checkpointed. {kept[0].upper()}{kept[1:]}.")
    if cfg.meta.on_divergence == "ignore":
        return
    sign = divergence(history, cfg.task.ways)
    if sign is None:
        return
    if cfg.meta.on_divergence == "raise":
        raise DivergenceError(f"diverged at meta-step {step}: {sign.message}; {likely_cause(cfg)}. "
                              f"{kept[0].upper()}{kept[1:]}; meta.on_divergence=warn continues instead.")
    if sign.kind not in {d["kind"] for d in history["divergence"]}:
        history["divergence"].append({"step": step, "kind": sign.kind, "message": sign.message})
        warnings.warn(f"meta-step {step}: {sign.message}; {likely_cause(cfg)}. Recorded in results.json; "
                      f"continuing (meta.on_divergence=warn).", DivergenceWarning, stacklevel=2)
