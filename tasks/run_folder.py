"""The run folder of a training script: one run per folder, a lock, and checkpoints that run no code.

A run folder holds one run's files (the ``files`` a script names: checkpoints, ``results.json``, plots, ``wandb/``).
A script claims it before any work:

- a folder that holds a run (any of its ``files``) is refused unless the run is resumed (``--resume``, for scripts
  that checkpoint) or replaced (``--overwrite``, which deletes the old run's files first, so two runs' files are
  never mixed; other files are kept);
- ``run.lock`` (the owner's pid, host and start time) is held for the run's lifetime; a second run in the same
  folder is refused with the holder named, and a lock whose process is gone (same host) is taken over;
- the folder must be writable (checked by writing a probe file and the lock) before the data is loaded;
- temporary files left by a write that was killed before its rename (``<file>*.tmp``) are removed.

Every file of a run is written by `atomic_write` (a temporary file, fsync, rename, fsync of the folder): a kill at
any moment leaves the previous version or the new one. Checkpoints are loaded with ``torch.load(weights_only=True)``:
only tensors and plain containers are unpickled, so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["RunFolder", "ResultsFolder", "RunFolderError", "atomic_write", "load_checkpoint", "LOCK"]

LOCK = "run.lock"


def atomic_write(path: Path, write) -> None:
    """Run ``write(file)`` on a temporary file beside ``path`` and rename it into place.

    The data is fsynced before the rename and the folder after it, so the new version is durable once this returns
    and a kill at any moment leaves the old or the new file, never a torn one. The file gets a normal file's
    permissions (``mkstemp`` creates 0600). An ``OSError`` (a full disk) names the file and keeps the old version.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise type(err)(err.errno, f"{err.strerror} (writing {path}; its previous version is intact)") from None
        raise
    folder = os.open(path.parent, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class RunFolderError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message says why and what to do."""


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
    """Claim ``path`` for one run (see the module docstring); :meth:`release` (or leave the ``with`` block) at the end.

    Args:
        path: the run folder (created if missing).
        files: the names (glob patterns) of what one run writes; their presence means the folder holds a run.
        resume: continue the run held in the folder.
        overwrite: delete the run held in the folder first.
        checkpoint: the file a resumed run continues from; ``None`` for a script that cannot resume.
        key: the setting that chooses the folder, named in the messages.

    Raises:
        RunFolderError: the folder is not writable, in use by a live run, or holds a run that is neither resumed nor
            overwritten.
    """

    def __init__(self, path: str | os.PathLike, *, files: tuple[str, ...], resume: bool = False,
                 overwrite: bool = False, checkpoint: str | None = "checkpoint.pt", key: str = "run.dir"):
        self.path, self.files, self.checkpoint, self.key = Path(path), tuple(files), checkpoint, key
        self.lock = self.path / LOCK
        self.held = False
        if resume and overwrite:
            raise RunFolderError("run.resume and run.overwrite exclude each other; pick one.")
        if resume and checkpoint is None:
            raise RunFolderError(f"{key}={str(path)!r}: this script cannot resume a run; replace it with "
                                 f"--overwrite or choose another {key}.")
        self._make_writable_folder()
        self._acquire()
        try:
            self._remove_stray_temporaries()
            self._check_contents(resume, overwrite)
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_writable_folder(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"run folder {self.path} is not writable ({err.strerror or err}); choose another "
                                 f"{self.key} or fix the permissions of its parent.") from None
        probe = self.path / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(f"run folder {self.path} is not writable ({err.strerror or err}); choose another "
                                 f"{self.key} or fix its permissions.") from None

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
                             f"time. Use another {self.key}.")

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
                             f"for that run to end or use another {self.key}. If that process is gone, delete "
                             f"{self.lock}.")

    def _remove_stray_temporaries(self) -> None:
        for name in self.files:  # what an atomic write (to <file>*.tmp, then rename) leaves when killed in between
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
            if not (self.path / self.checkpoint).is_file():
                raise RunFolderError(f"--resume: {self.path} holds {', '.join(present)} but no checkpoint to resume "
                                     f"from; use --overwrite to replace that run or choose another {self.key}.")
            return
        keep = ("continue it with --resume, replace it with --overwrite" if self.checkpoint
                else "replace it with --overwrite")
        raise RunFolderError(f"run folder {self.path} already holds a run ({', '.join(present)}); {keep}, or "
                             f"choose another {self.key}.")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False


class ResultsFolder(RunFolder):
    """The run folder of a script that writes one ``results.json`` at its end and cannot resume (the single-file
    examples): claimed before any work, so that an earlier run's results are kept unless ``overwrite`` and a folder
    that cannot be written is found at once; :meth:`save` writes the results and releases the folder."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, key: str = "out_dir"):
        super().__init__(path, files=("results.json",), overwrite=overwrite, checkpoint=None, key=key)

    def save(self, results: dict) -> Path:
        """Write ``results`` to ``results.json`` (atomically) and release the folder; returns the file."""
        path = self.path / "results.json"
        atomic_write(path, lambda f: f.write(json.dumps(results, indent=1).encode()))
        self.release()
        return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True`` (tensors and plain containers only).

    Raises:
        RunFolderError: the file is damaged, holds other objects (refused: unpickling them can run code), or is not
            a training checkpoint (a dict with an ``hparams`` dict of weights).
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
        raise RunFolderError(f"{path} is not a training checkpoint (no 'hparams' dict of weights).")
    return state
