"""One configuration helper for every workload: a dataclass schema, YAML files, ``key=value`` overrides.

A workload declares its schema as nested dataclasses (each default with an inline comment), then calls
:func:`load` with the YAML files and command-line overrides, in that order, and its own ``validate``. Every
mistake is a :class:`ConfigError` (a ``ValueError``) with one line that names the key or the file and the fix, raised
before any data is loaded:

- a missing config file (``FileNotFoundError``, naming the path);
- a YAML syntax error (the file and line);
- an unknown key (a typo), a wrong type (``meta.steps=many``), an override without ``=``;
- a value outside its allowed set or range (the workload's ``validate``, through :func:`check` / :func:`choose`);
- a device setting of another form, or a CUDA device the machine does not have (:func:`resolve_device`, called
  before any work: a config names a device but loads on any machine).

    from tasks import config

    @dataclass
    class Schema:
        steps: int = 10        # outer steps
        wandb: config.WandbConfig = field(default_factory=config.WandbConfig)

    cfg = config.load(Schema, ["my.yaml"], ["steps=5"], validate=my_validate)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ConfigError", "WandbConfig", "WANDB_MODES", "load", "load_named", "parse_cli", "from_argv", "run_from_argv",
           "check", "choose", "check_writable", "check_device", "resolve_device"]

WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    """An invalid configuration: the message names the key (or file) and what to do."""


@dataclass
class WandbConfig:
    mode: str = "offline"                  # offline | online | disabled
    project: str = "bilevel"               # each workload sets its own default project


def _one_line(err: Exception) -> str:
    """omegaconf's messages span several lines (full_key, object_type, ...): keep the first and the key."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{first} (key {key})" if key and str(key) not in first else first


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found"
                                + (" (it is a folder)." if path.is_dir() else "; check the path."))
    try:
        return OmegaConf.load(path)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config from {path}: {_one_line(err)}") from None
    except Exception as err:  # yaml's ScannerError / ParserError: the message carries the line and column
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _one_line(err)
        raise ConfigError(f"invalid config: YAML syntax error in {path}{where}: {problem}.") from None


def load(schema: type, files: Iterable[str | os.PathLike] = (), overrides: Sequence[str] = (),
         validate: Optional[Callable[[DictConfig], None]] = None) -> DictConfig:
    """The ``schema`` defaults, then each YAML file of ``files``, then the ``key=value`` ``overrides``; validated.

    Args:
        schema: the root dataclass (every field with a default).
        files: YAML files merged in order (partial: only the keys they change).
        overrides: command-line ``key=value`` strings, e.g. ``["outer.steps=5", "data.name=iris"]``; a value of
            ``null`` sets ``None``.
        validate: the workload's check of values, called on the merged config.

    Returns:
        An omegaconf ``DictConfig`` in struct mode (reading or setting an unknown key is an error).

    Raises:
        FileNotFoundError: a file of ``files`` does not exist (named).
        ConfigError: a YAML syntax error, an unknown key, a wrong type, a bad override or a bad value (named).
    """
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    layers = [(str(f), _read_yaml(Path(f))) for f in files]
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"invalid config: overrides must be key=value, got {bad} (e.g. outer.steps=5).")
    try:
        layers.append(("the command line", OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config from the command line: {_one_line(err)}") from None
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:  # omegaconf names the key; add where it came from
            raise ConfigError(f"invalid config from {where}: {_one_line(err)}") from None
    if validate is not None:
        validate(cfg)
    return cfg


def load_named(schema: type, config_dir: Path, name: str | None, overrides: Sequence[str] = (),
               validate: Optional[Callable[[DictConfig], None]] = None) -> DictConfig:
    """:func:`load` of ``<config_dir>/<name>.yaml`` (or of ``name`` itself if it is a YAML path).

    ``run.name`` becomes the config's name unless an override sets it; ``name=None`` loads the schema defaults.

    Raises:
        FileNotFoundError: no such config (the message lists the available names).
        ConfigError: as :func:`load`.
    """
    files = []
    if name:
        path = Path(name) if name.endswith((".yaml", ".yml")) else config_dir / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in config_dir.glob("*.yaml"))
            raise FileNotFoundError(f"config {name!r} not found ({path}); available: {', '.join(known)}.")
        files.append(path)
    cfg = load(schema, files, overrides)
    if name and not any(o.split("=", 1)[0].strip() == "run.name" for o in overrides):
        cfg.run.name = Path(name).stem
    if validate is not None:
        validate(cfg)
    return cfg


def parse_cli(argv: Sequence[str], default: str, options: dict[str, Optional[str]]):
    """Split a workload's command line ``[--config NAME] [--flag ...] key=value ...``.

    Args:
        argv: the arguments (without the program name).
        default: the config name when ``--config`` is not given.
        options: each accepted flag and the override it stands for (``{"--resume": "run.resume=true"}``), or
            ``None`` for a flag the caller acts on itself (returned in ``flags``).

    Returns:
        ``(name, overrides, flags)``, or ``None`` for ``-h`` / ``--help`` (the caller prints its usage).

    Raises:
        SystemExit: ``--config`` without a name, or an unknown ``--option`` (one line listing the accepted ones).
    """
    argv, name, overrides, flags = list(argv), default, [], set()
    while argv:
        arg = argv.pop(0)
        if arg in ("-h", "--help"):
            return None
        if arg in options:
            (flags.add(arg) if options[arg] is None else overrides.append(options[arg]))
        elif arg == "--config":
            if not argv:
                raise SystemExit(f"--config needs a name, e.g. --config {default}")
            name = argv.pop(0)
        elif arg.startswith(("--config=", "config=")):
            name = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise SystemExit(f"unknown option {arg!r}; use --config NAME, {', '.join(options)} and key=value "
                             f"overrides.")
        else:
            overrides.append(arg)
    return name, overrides, flags


def from_argv(schema: type, argv: Sequence[str], doc: Optional[str] = None):
    """The ``schema`` dataclass from ``key=value`` arguments: the command line of a single-file example.

    ``--name`` stands for ``name=true`` for a boolean key (``--overwrite``). ``-h`` / ``--help`` prints ``doc`` and
    every key with its default, then exits; a mistake (an unknown key, a wrong type, an argument that is not
    ``key=value``) exits with the one line of :func:`load`.
    """
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    flags = {f"--{key.replace('_', '-')}": f"{key}=true" for key, value in defaults.items() if isinstance(value, bool)}
    argv = [flags.get(a, a) for a in argv]
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n\noptions (key=value, defaults shown):\n"
              + "\n".join(f"  {key}={value}" for key, value in defaults.items()))
        raise SystemExit(0)
    try:
        return OmegaConf.to_object(load(schema, (), argv))
    except ConfigError as err:
        raise SystemExit(f"{str(err).rstrip('.')}. Options: {', '.join(defaults)} (--help for the defaults).") \
            from None


def run_from_argv(run: Callable, schema: type, argv: Sequence[str], doc: Optional[str] = None):
    """``run(from_argv(schema, argv, doc))``; an output folder that is refused (it holds an earlier run, another run
    holds it, it cannot be written: ``RunFolderError``, raised before any work) ends the program with its one line."""
    from tasks.run_folder import RunFolderError

    cfg = from_argv(schema, argv, doc)
    try:
        return run(cfg)
    except RunFolderError as err:
        raise SystemExit(str(err)) from None


def check(ok: bool, message: str) -> None:
    """Raise ``ConfigError("invalid config: <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid config: {message}")


def choose(cfg: DictConfig, key: str, allowed: Iterable) -> None:
    """``key`` (dotted) must hold one of ``allowed``."""
    allowed = list(allowed)
    value = OmegaConf.select(cfg, key)
    check(value in allowed, f"{key}={value!r}; use one of {', '.join(map(str, allowed))}.")


def check_writable(folder: str | os.PathLike, key: str) -> Path:
    """Create ``folder`` (and its parents) if needed and prove it writable by writing and removing a probe file.

    Called before any work, so that a read-only output location is found in a second, not after the run.

    Raises:
        ConfigError: the folder cannot be created or written, naming ``key`` and the path.
    """
    path = Path(folder).expanduser()
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"invalid config: {key}={str(folder)!r} is not writable ({err.strerror or err}); "
                          f"choose another folder with {key}=...") from None
    return path


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(value: str, key: str = "run.device") -> None:
    """``value`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>`` (the form only: a config loads on any machine)."""
    check(isinstance(value, str) and _DEVICE.fullmatch(value) is not None,
          f"{key}={value!r}; use auto, cpu, cuda or cuda:<index>.")


def resolve_device(value: str, key: str = "run.device") -> torch.device:
    """The ``torch.device`` of a workload's device setting; call it before any work.

    ``auto`` is this process's GPU (``LOCAL_RANK``, 0 outside a distributed launch) when CUDA is available, else the
    CPU. ``cuda`` and ``cuda:<index>`` must name a device this machine has: checked here, because torch only finds
    out at the first tensor placed there.

    Raises:
        ConfigError: a value of another form, or a CUDA device this torch build or machine does not have (named).
    """
    check_device(value, key)
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(count > 0, f"{key}={value} but this torch build or machine has no CUDA device; use {key}=cpu or auto.")
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        check(device.index is None or device.index < count,
              f"{key}={value} but this machine has {count} CUDA device{'s' if count > 1 else ''} ({have}); use "
              f"{'it' if count == 1 else 'one of those'}, {key}=cpu or auto.")
    return device
