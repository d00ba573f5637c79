"""Configuration schema of the sinusoid workload (OmegaConf structured config).

A run is configured by ``configs/sinusoid/<name>.yaml`` (partial overrides of the defaults below) followed by
command-line ``key=value`` overrides. Unknown keys and wrong types are errors that name the key; values are then
checked by :func:`validate` before anything is built. Defaults are the MAML reference code's sinusoid settings
(cbfinn/maml ``main.py`` flags and README command) unless a comment says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

from tasks import config as base

__all__ = ["SinusoidConfig", "load_config", "validate", "CONFIG_DIR", "METHODS"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "sinusoid"
METHODS = ("maml", "fomaml", "reptile", "imaml", "neumann", "pretrain")


@dataclass
class TaskConfig:
    shots: int = 10                        # K support points (reference: update_batch_size=10)
    queries: int = 10                      # Q query points during meta-training (reference: Q = K)
    amplitude: List[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: List[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: List[float] = field(default_factory=lambda: [-5.0, 5.0])


@dataclass
class ModelConfig:
    hidden: List[int] = field(default_factory=lambda: [40, 40])
    init: str = "torch"                    # torch (nn.Linear default) | maml (reference: N(0, 0.01^2), zero bias)


@dataclass
class InnerConfig:
    solver: str = "gd"                     # gd | adam | scaled (step and momentum from each task's curvature)
    lr: float = 0.01                       # inner learning rate (MAML paper: 0.01)
    steps: int = 1                         # inner steps during meta-training (reference: num_updates=1)
    momentum: float = 0.0                  # gd: heavy-ball momentum
    tol: Optional[float] = None            # inner solver tol (early stop on the gradient norm); None: its default


@dataclass
class MethodConfig:
    name: str = "maml"                     # maml | fomaml | reptile | imaml | neumann | pretrain
    reg: float = 2.0                       # imaml, neumann: proximal lambda of the inner loss
    cg_steps: int = 5                      # imaml: conjugate-gradient steps
    cg_damping: float = 0.0                # imaml: added to the diagonal of the adjoint system
    cg_tol: Optional[float] = None         # imaml: CG tolerance; None: the preset's default
    neumann_steps: int = 20                # neumann: series terms
    neumann_alpha: float = 0.01            # neumann: step of the series (below 2 / largest eigenvalue of H + reg)
    neumann_tol: Optional[float] = None    # neumann: tolerance of the series; None: the preset's default


@dataclass
class MetaConfig:
    batch: int = 25                        # tasks per meta-step (reference: meta_batch_size=25)
    steps: int = 10000                     # meta-steps (reference: 70000)
    optimizer: str = "adam"                # adam | sgd (Reptile: sgd with lr = outer step size)
    lr: float = 1e-3                       # meta learning rate (reference: meta_lr=0.001)
    schedule: str = "constant"             # constant | linear (anneal to 0 at the last step)
    batching: str = "vmap"                 # vmap | loop: how bl.meta_grad runs the tasks (vmap: ~15x faster here)
    on_nonconvergence: str = "ignore"      # ignore | warn | raise; the unconverged fraction is logged either way
    on_nonfinite: str = "skip_step"        # skip_step (drop the meta-step, count it) | raise


@dataclass
class EvalConfig:
    steps: List[int] = field(default_factory=lambda: [1, 10])  # report the MSE after these test-time GD steps
    lr: float = 0.01                       # test-time inner learning rate (reference: update_lr)
    queries: int = 10                      # query points per test task (reference: K)
    every: int = 1000                      # validate every N meta-steps (0: never)
    val_tasks: int = 200                   # tasks per validation (their own fixed stream)
    test_tasks: int = 600                  # tasks in the final test (reference: NUM_TEST_POINTS=600)


@dataclass
class RunConfig:
    name: str = "maml"                     # run name (default folder runs/sinusoid/<name>)
    dir: Optional[str] = None              # output folder for checkpoint.pt, results.json, metrics.csv, curves.png
    seed: int = 0                          # model initialisation and task stream
    checkpoint_every: int = 1000           # meta-steps between atomic checkpoints (0: only at the end)
    log_every: int = 100                   # meta-steps per row of metrics.csv (means over the window)
    threads: Optional[int] = 1             # torch.set_num_threads; None: leave torch's default
    device: str = "auto"                   # auto (the GPU if any, else CPU) | cpu | cuda | cuda:1 ...
    progress: bool = True                  # tqdm progress bar
    resume: bool = False                   # continue from <dir>/checkpoint.pt (also --resume)
    overwrite: bool = False                # delete the run already in <dir> and start afresh (also --overwrite)
    init_from: Optional[str] = None        # start theta from another run's checkpoint.pt (fresh optimizer, step 0)


@dataclass
class SinusoidConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(name: str | None = "maml", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The schema defaults, then ``configs/sinusoid/<name>.yaml`` (or a YAML path), then ``key=value`` overrides.

    Raises:
        FileNotFoundError: no such config (the message lists the available names).
        ValueError: an unknown key, a wrong type or an invalid value (named).
    """
    return base.load_named(SinusoidConfig, CONFIG_DIR, name, overrides, validate)


_check = base.check  # raises tasks.config.ConfigError (a ValueError): "invalid config: <message>"


def _range(cfg, key: str) -> None:
    value = list(cfg.task[key])
    _check(len(value) == 2 and value[0] <= value[1], f"task.{key}={value}; give [low, high] with low <= high.")


def validate(cfg: DictConfig) -> None:
    """Reject invalid values with a message naming the key and the allowed values."""
    t = cfg.task
    _check(t.shots >= 1 and t.queries >= 1, f"task.shots={t.shots}, task.queries={t.queries}; both must be >= 1.")
    for key in ("amplitude", "phase", "x_range"):
        _range(cfg, key)
    _check(cfg.model.init in ("torch", "maml"), f"model.init={cfg.model.init!r}; use torch or maml.")
    _check(len(cfg.model.hidden) >= 1 and min(cfg.model.hidden) >= 1,
           f"model.hidden={list(cfg.model.hidden)}; give at least one layer width >= 1.")
    m, i = cfg.method, cfg.inner
    _check(m.name in METHODS, f"method.name={m.name!r}; choose one of {', '.join(METHODS)}.")
    _check(i.solver in ("gd", "adam", "scaled"), f"inner.solver={i.solver!r}; use gd, adam or scaled.")
    _check(0 <= i.momentum < 1 and (i.momentum == 0 or i.solver == "gd"),
           f"inner.momentum={i.momentum}; use 0 <= momentum < 1, with inner.solver=gd only.")
    _check(i.lr > 0 and (i.tol is None or i.tol >= 0),
           f"inner.lr={i.lr} must be > 0 and inner.tol={i.tol} None or >= 0.")
    if m.name == "pretrain":  # joint training: no inner loop, the task loss is taken at theta itself
        _check(i.steps == 0, f"inner.steps={i.steps} with method.name=pretrain; the jointly trained baseline has "
                             "no inner loop during training, set inner.steps=0.")
    else:
        _check(i.steps >= 1, f"inner.steps={i.steps}; {m.name} needs at least one inner step.")
    _check(m.reg > 0, f"method.reg={m.reg}; the proximal lambda must be > 0.")
    _check(m.cg_steps >= 1 and m.cg_damping >= 0 and (m.cg_tol is None or m.cg_tol >= 0),
           "method.cg_steps must be >= 1, method.cg_damping >= 0 and method.cg_tol None or >= 0.")
    _check(m.neumann_steps >= 0 and m.neumann_alpha > 0 and (m.neumann_tol is None or m.neumann_tol >= 0),
           f"method.neumann_steps={m.neumann_steps} must be >= 0, method.neumann_alpha={m.neumann_alpha} > 0 and "
           f"method.neumann_tol={m.neumann_tol} None or >= 0.")
    mc = cfg.meta
    _check(mc.batch >= 1 and mc.steps >= 1 and mc.lr > 0, "meta.batch, meta.steps and meta.lr must be positive.")
    _check(mc.optimizer in ("adam", "sgd"), f"meta.optimizer={mc.optimizer!r}; use adam or sgd.")
    _check(mc.schedule in ("constant", "linear"), f"meta.schedule={mc.schedule!r}; use constant or linear.")
    _check(mc.batching in ("loop", "vmap"), f"meta.batching={mc.batching!r}; use loop or vmap.")
    _check(mc.on_nonconvergence in ("ignore", "warn", "raise"),
           f"meta.on_nonconvergence={mc.on_nonconvergence!r}; use ignore, warn or raise.")
    _check(mc.on_nonfinite in ("skip_step", "raise"), f"meta.on_nonfinite={mc.on_nonfinite!r}; use skip_step or raise.")
    e = cfg.eval
    _check(len(e.steps) >= 1 and min(e.steps) >= 0, f"eval.steps={list(e.steps)}; give test-time step counts >= 0.")
    _check(e.lr > 0 and e.queries >= 1, f"eval.lr={e.lr} must be > 0 and eval.queries={e.queries} >= 1.")
    _check(e.every >= 0 and e.val_tasks >= 2 and e.test_tasks >= 2,
           "eval.every must be >= 0, eval.val_tasks and eval.test_tasks >= 2 (a confidence interval needs two).")
    r = cfg.run
    _check(r.checkpoint_every >= 0 and r.log_every >= 1, "run.checkpoint_every must be >= 0 and run.log_every >= 1.")
    _check(r.threads is None or r.threads >= 1, f"run.threads={r.threads}; use None or >= 1.")
    base.check_device(r.device, "run.device")
