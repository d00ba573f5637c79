"""The run folder of a training run: one run per folder, a lock, safe checkpoints, and divergence checks.

A run folder holds one run's files: ``checkpoint.pt``, ``best.pt``, ``results.json``, ``curves.png``, ``wandb/`` and
the ``eval-*.json`` of ``--eval-only``. Training claims it before any work:

- a folder that holds a run is refused unless the run is resumed (``--resume``) or replaced (``--overwrite``, which
  deletes the old run's files first, so two runs' files are never mixed);
- ``run.lock`` (the owner's pid, host and start time) is held for the run's lifetime; a second run in the same
  folder is refused with the holder named, and a lock whose process is gone (same host) is taken over;
- the folder must be writable (checked by writing a probe file and the lock) before the data is loaded;
- temporary files left by a write that was killed before its rename are removed.

Checkpoints are loaded with ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, so a
crafted file cannot run code. Divergence (:func:`divergence`, :func:`weights_problem`) is checked at every
meta-step from the run's history alone, so a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["RunFolder", "RunFolderError", "DivergenceError", "DivergenceWarning", "Divergence", "load_checkpoint",
           "divergence", "weights_problem", "check_step", "check_resume", "RUN_FILES", "LOCK"]

RUN_FILES = ("checkpoint.pt", "best.pt", "results.json", "curves.png", "wandb", "eval-*.json")  # one run's files
LOCK = "run.lock"

# Divergence thresholds (see docs/failure-modes.md). The loss of a uniform guess over N classes is log N; a trained
# or training model is below it, so a query loss 10x above it for a whole window is divergence, not noise.
LOSS_FACTOR = 10.0
LOSS_WINDOW = 10          # meta-steps; the median over the window ignores single spikes
WARMUP = 200              # meta-steps before "accuracy at chance" counts (the demo leaves chance within ~10 steps)
CHANCE_WINDOW = 50        # meta-steps averaged for the chance test
CHANCE_MARGIN = 1.25      # mean accuracy <= 1.25 / N is "at chance"
SKIP_WINDOW = 10          # more than half of these meta-steps skipped (non-finite) is divergence
WEIGHT_FACTOR = 100.0     # weights whose norm grew 100x since initialisation have exploded


class RunFolderError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message says why and what to do."""


class DivergenceError(RuntimeError):
    """Training diverged; the message names the meta-step, what was seen and the likely cause."""


class DivergenceWarning(RuntimeWarning):
    """Training shows a sign of divergence and ``meta.on_divergence="warn"`` lets it continue."""


class Divergence(NamedTuple):
    """A sign of divergence: ``kind`` is ``"loss"``, ``"chance"`` or ``"skipped"``; ``message`` says what was seen."""

    kind: str
    message: str


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


class RunFolder:
    """Claim ``path`` for one run (see the module docstring); :meth:`release` when the run ends.

    Args:
        path: the run folder (created if missing).
        resume: continue the run held in the folder (``run.resume``).
        overwrite: delete the run held in the folder first (``run.overwrite``).
        files: the names (glob patterns) of what one run writes (default: the Omniglot script's).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 files: tuple[str, ...] = RUN_FILES):
        self.path, self.files = Path(path), tuple(files)
        self.lock = self.path / LOCK
        self.held = False
        if resume and overwrite:
            raise RunFolderError("run.resume and run.overwrite exclude each other; pick one.")
        self._make_writable_folder()
        self._acquire()
        try:
            self._remove_stray_temporaries()
            self._check_contents(resume, overwrite)
        except BaseException:
            self.release()
            raise

    def _make_writable_folder(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"run folder {self.path} is not writable ({err.strerror or err}); choose another "
                                 f"run.dir or fix the permissions of its parent.") from None
        probe = self.path / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(f"run folder {self.path} is not writable ({err.strerror or err}); choose another "
                                 f"run.dir or fix its permissions.") from None

    def _acquire(self) -> None:
        record = {"pid": os.getpid(), "host": _host(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                time.gmtime())}
        tmp = self.path / f"{LOCK}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        try:
            for _ in range(2):
                try:
                    self._create_lock(tmp, record)
                    self.held = True
                    return
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            tmp.unlink(missing_ok=True)
        raise RunFolderError(f"run folder {self.path}: could not take {self.lock}; another run started at the same "
                             f"time. Use another run.dir.")

    def _create_lock(self, tmp: Path, record: dict) -> None:
        """Create the lock exclusively (``FileExistsError`` if it exists) with its content complete."""
        try:
            os.link(tmp, self.lock)   # atomic: the lock appears with its content already written
        except FileExistsError:
            raise
        except OSError:               # a file system without hard links: exclusive create, then write
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))

    def _take_over_if_stale(self) -> None:
        try:
            text = self.lock.read_text()
            holder = json.loads(text)
            pid, host, started = int(holder["pid"]), str(holder["host"]), holder.get("started", "?")
        except FileNotFoundError:
            return   # released meanwhile; try again
        except (OSError, ValueError, KeyError, TypeError):
            raise RunFolderError(f"run folder {self.path} holds an unreadable lock {self.lock}; if no run is using "
                                 f"the folder, delete that file.") from None
        if host == _host() and (pid == os.getpid() or not _alive(pid)):
            # Delete only the lock judged stale: if another start took it over meanwhile, its content differs.
            try:
                if self.lock.read_text() != text:
                    return
            except FileNotFoundError:
                return
            print(f"note: {self.lock} was held by pid {pid} (started {started}), which is no longer running; "
                  f"taking it over.", file=sys.stderr)
            self.lock.unlink(missing_ok=True)
            return
        raise RunFolderError(f"run folder {self.path} is in use by pid {pid} on {host} (since {started}); wait "
                             f"for that run to end or use another run.dir. If that process is gone, delete "
                             f"{self.lock}.")

    def _remove_stray_temporaries(self) -> None:
        for name in self.files:  # what tasks.omniglot.data._atomic_write leaves when killed before its rename
            for stray in self.path.glob(f"{name}*.tmp"):
                stray.unlink(missing_ok=True)

    def _run_files(self) -> list[Path]:
        return [path for pattern in self.files for path in sorted(self.path.glob(pattern))]

    def _check_contents(self, resume: bool, overwrite: bool) -> None:
        files = self._run_files()
        present = [path.name for path in files]
        if not present:
            return
        if overwrite:
            for target in files:
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            print(f"note: --overwrite: deleted {', '.join(present)} of the previous run in {self.path}.",
                  file=sys.stderr)
            return
        if resume:
            if not (self.path / "checkpoint.pt").is_file():
                raise RunFolderError(f"--resume: {self.path} holds {', '.join(present)} but no checkpoint to resume "
                                     f"from; use --overwrite to replace that run or choose another run.dir.")
            return
        raise RunFolderError(f"run folder {self.path} already holds a run ({', '.join(present)}); continue it with "
                             f"--resume, replace it with --overwrite, or choose another run.dir / run.name.")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only).

    Raises:
        RunFolderError: the file is damaged, or holds other objects (refused: unpickling them can run code).
    """
    path = Path(path)
    try:
        state = torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise RunFolderError(
                f"{path}: refused to load: it holds objects other than tensors and plain containers, and "
                f"unpickling those can run arbitrary code. Checkpoints written by this project never do; "
                f"re-save it with plain containers (e.g. OmegaConf.to_container) if you trust it.") from None
        raise RunFolderError(f"{path} is damaged ({reason[0] if reason else 'unpickling failed'}); "
                             f"use an earlier copy or start again with --overwrite.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RunFolderError(f"{path} is damaged or not a checkpoint ({first}); use an earlier copy or start again "
                             f"with --overwrite.") from None
    if not isinstance(state, dict) or not isinstance(state.get("hparams"), dict):
        raise RunFolderError(f"{path} is not an Omniglot training checkpoint (no 'hparams' dict of weights).")
    return state


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
