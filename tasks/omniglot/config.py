"""Configuration schema of the Omniglot workload (OmegaConf structured config).

A run is configured by ``configs/omniglot/<name>.yaml`` (partial overrides of the defaults below) followed by
command-line ``key=value`` overrides. Unknown keys and wrong types are errors that name the key; values are then
checked by :func:`validate` before any data is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from tasks import config as base

__all__ = ["OmniglotConfig", "load_config", "validate", "CONFIG_DIR", "METHODS"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "omniglot"
METHODS = ("maml", "fomaml", "imaml", "reptile", "neumann")
SAMPLINGS = ("any", "within_alphabet")


@dataclass
class DataConfig:
    root: Optional[str] = None             # folder holding the sets; else $BILEVEL_DATA, else ~/.cache/bilevel/data
    background: str = "images_background"  # set names (folder or .zip under root)
    evaluation: Optional[str] = "images_evaluation"
    protocol: str = "maml"                 # maml: 1100/100/423 of all characters | lake: background vs evaluation
    split_seed: int = 1                    # the split's own RNG (random.Random), never the global one
    num_train: int = 1100                  # maml protocol: train characters
    num_val: int = 100                     # validation characters (lake + within_alphabet: at least this many,
                                           # as whole background alphabets)
    rotation: str = "per_task"             # none | classes (x4 classes) | per_task (random per class per task)
    download: bool = True                  # fetch missing official zips (md5-checked)
    cache: bool = True                     # cache the 28x28 tensor under $BILEVEL_CACHE or ~/.cache/bilevel


@dataclass
class TaskConfig:
    ways: int = 5                          # N
    shots: int = 1                         # K support drawings per class
    queries: int = 1                       # Q query drawings per class (MAML reference: Q = K)
    train_shots: Optional[int] = None      # support drawings per class of meta-training tasks; None: shots
                                           # (Reptile reference: 10 for every Omniglot setting)
    sampling: str = "any"                  # any: the N classes from any alphabets | within_alphabet: all N
                                           # from one alphabet (Lake et al. 2015), for every split


@dataclass
class ModelConfig:
    pool: str = "stride"                   # stride: the MAML reference's Omniglot conv4 (stride-2 convs, spatial
                                           # mean) | max: 2x2 max-pooling after stride-1 convs (3x the compute)


@dataclass
class InnerConfig:
    solver: str = "gd"                     # gd | adam (Reptile)
    lr: float = 0.4                        # inner learning rate (MAML Omniglot: 0.4)
    steps: int = 1                         # inner steps during meta-training
    test_steps: int = 10                   # inner steps at validation / test time (MAML: 10)
    batch: Optional[int] = None            # reptile: support examples per inner step, drawn as the reference's
                                           # _mini_batches (reshuffled when used up); None: the whole support set
    beta1: float = 0.9                     # adam: first-moment decay of the meta-training inner loop (Reptile
                                           # reference: 0); test-time adaptation keeps 0.9
    test_lr: Optional[float] = None        # None: same as lr
    test_reg: Optional[float] = None       # proximal lambda of test-time adaptation; None: method.reg for imaml and
                                           # neumann (their training inner loss), else 0; 0: the plain loss (the
                                           # iMAML authors' measure_accuracy.py, --lam 0.0)


@dataclass
class MethodConfig:
    name: str = "maml"                     # maml | fomaml | imaml | reptile | neumann
    truncate: Optional[int] = None         # maml: backpropagate through the last K inner steps only
    reg: float = 2.0                       # imaml: proximal regularisation lambda
    cg_steps: int = 5                      # imaml: conjugate-gradient steps
    neumann_steps: int = 20                # neumann: series terms
    neumann_alpha: float = 0.1             # neumann: step of the series (below 1 / largest Hessian eigenvalue)
    system: str = "paper"                  # imaml: paper ((I + H/reg) v = g) | reference (the authors' code:
                                           # ((1 + coef) I + H/(reg + lam_damping)) v = g)
    solver: str = "cg"                     # imaml: cg | truncated_cg | minres | gmres (the adjoint Krylov method)
    damping: float = 0.0                   # imaml: added to the diagonal of the adjoint system
    tol: Optional[float] = None            # imaml, neumann: adjoint relative residual; None: sqrt(eps) of the dtype
    coef: float = 1.0                      # imaml reference system: the code's --cg_damping (regu_coef)
    lam_damping: float = 10.0              # imaml reference system: lam_damping
    inner_loop: str = "proximal"           # imaml: proximal (inner.steps GD steps on CE + reg/2 ||w - theta||^2,
                                           # the paper's) | reference (the authors' code: inner.steps plain CE
                                           # steps, then one step of inner.lr on reg/2 ||w - theta||^2 alone)


@dataclass
class MetaConfig:
    batch: int = 32                        # tasks per meta-step (meta-batch)
    steps: int = 60000                     # meta-steps
    optimizer: str = "adam"                # adam | sgd (Reptile: sgd with lr = outer step size)
    lr: float = 1e-3                       # meta learning rate
    eps: float = 1e-8                      # Adam's epsilon (the iMAML reference code uses 1e-3)
    schedule: str = "constant"             # constant | linear (anneal to 0 at the last step)
    batching: str = "loop"                 # loop | vmap | threads: how bl.meta_grad runs the tasks
    chunk_size: Optional[int] = None       # vmap chunk size
    workers: Optional[int] = None          # threads: worker threads, one intra-op thread each (null: run.threads)
    precision: Optional[str] = None        # null | bf16 | fp16: autocast the task losses (bl.meta_grad(precision=))
    on_nonconvergence: str = "warn"        # ignore | warn | raise; implicit methods only (fixed-budget inner loops
                                           # and adjoint solves that miss tol); the fraction is logged either way
    on_nonfinite: str = "raise"            # ignore | warn | raise | skip_task (drop a task with a non-finite
                                           # hypergradient, average the rest; the count is logged as "dropped")
    on_divergence: str = "raise"           # raise | warn | ignore: loss far above a uniform guess, accuracy at
                                           # chance after warm-up, mostly skipped steps (non-finite or exploded
                                           # weights always stop the run; see docs/failure-modes.md)


@dataclass
class EvalConfig:
    every: int = 500                       # validate every N meta-steps (0: never)
    val_tasks: int = 100                   # tasks per validation
    test_tasks: int = 600                  # tasks in the final test
    queries: Optional[int] = None          # query drawings per class at val/test; None: task.queries
    sampling: Optional[str] = None         # classes of validation / test tasks: any | within_alphabet;
                                           # None: task.sampling
    weights: str = "best"                  # best: the weights of the best validation (best.pt) | last
    select: bool = False                   # choose the test-time inner lr and steps on validation tasks
    lr_grid: list = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])   # test-time inner lrs tried
    steps_grid: list = field(default_factory=lambda: [1, 5, 10, 20])       # test-time inner steps tried
    select_tasks: int = 200                # validation tasks per candidate


@dataclass
class RunConfig:
    name: str = "demo"                     # run name (default folder runs/omniglot/<name>)
    dir: Optional[str] = None              # output folder for checkpoint.pt, results.json, curves.png
    seed: int = 0                          # model initialisation and task stream
    checkpoint_every: int = 200            # meta-steps between atomic checkpoints (0: only at the end)
    budget_cpu_minutes: Optional[float] = None  # end training (then validate and test) once it has used this much
                                           # CPU time, validation excluded; None: run all meta.steps
    threads: Optional[int] = None          # torch.set_num_threads; None: leave torch's default
    device: str = "auto"                   # auto (this rank's GPU if any, else CPU) | cpu | cuda | cuda:1 ...
    progress: bool = True                  # tqdm progress bar
    resume: bool = False                   # continue from <dir>/checkpoint.pt (also --resume)
    overwrite: bool = False                # delete the run already in <dir> and start afresh (also --overwrite)


@dataclass
class WandbConfig(base.WandbConfig):
    project: str = "bilevel-omniglot"


@dataclass
class OmniglotConfig:
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_config(name: str | None = "demo", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The schema defaults, then ``configs/omniglot/<name>.yaml`` (or a YAML path), then ``key=value`` overrides.

    Raises:
        FileNotFoundError: no such config (the message lists the available names).
        ValueError: an unknown key, a wrong type or an invalid value (named).
    """
    return base.load_named(OmniglotConfig, CONFIG_DIR, name, overrides, validate)


PROXIMAL = ("imaml", "neumann")   # the methods whose inner loss is iMAML's proximal one


def test_reg(cfg: DictConfig) -> float:
    """The proximal lambda of test-time adaptation: ``inner.test_reg``, else the training inner loss's."""
    if cfg.inner.test_reg is not None:
        return float(cfg.inner.test_reg)
    return float(cfg.method.reg) if cfg.method.name in PROXIMAL else 0.0


_check = base.check  # raises tasks.config.ConfigError (a ValueError): "invalid config: <message>"


def validate(cfg: DictConfig) -> None:
    """Reject invalid values with a message naming the key and the allowed values."""
    _check(cfg.data.protocol in ("maml", "lake"), f"data.protocol={cfg.data.protocol!r}; use maml or lake.")
    _check(cfg.data.rotation in ("none", "classes", "per_task"),
           f"data.rotation={cfg.data.rotation!r}; use none, classes or per_task.")
    _check(cfg.data.num_train > 0 and cfg.data.num_val > 0, "data.num_train and data.num_val must be > 0.")
    t = cfg.task
    _check(t.sampling in SAMPLINGS, f"task.sampling={t.sampling!r}; use any or within_alphabet.")
    _check(cfg.model.pool in ("stride", "max"), f"model.pool={cfg.model.pool!r}; use stride or max.")
    _check(t.ways >= 2, f"task.ways={t.ways}; need at least 2 classes.")
    _check(t.shots >= 1 and t.queries >= 1, f"task.shots={t.shots}, task.queries={t.queries}; both must be >= 1.")
    queries = cfg.eval.queries or t.queries
    _check(t.shots + max(t.queries, queries) <= 20,
           f"task.shots + queries = {t.shots} + {max(t.queries, queries)} > 20 drawings per Omniglot character.")
    _check(t.train_shots is None or 1 <= t.train_shots <= 20 - t.queries,
           f"task.train_shots={t.train_shots}; use null (task.shots) or 1 .. 20 - task.queries ({20 - t.queries}).")
    _check(cfg.inner.solver in ("gd", "adam"), f"inner.solver={cfg.inner.solver!r}; use gd or adam.")
    _check(cfg.inner.lr > 0 and (cfg.inner.test_lr is None or cfg.inner.test_lr > 0), "inner.lr must be > 0.")
    _check(cfg.inner.steps >= 1 and cfg.inner.test_steps >= 1, "inner.steps and inner.test_steps must be >= 1.")
    _check(cfg.inner.batch is None or (cfg.inner.batch >= 1 and cfg.method.name == "reptile"),
           f"inner.batch={cfg.inner.batch} with method.name={cfg.method.name}; inner mini-batches are Reptile's "
           f"(method.name=reptile, inner.batch >= 1); use inner.batch=null.")
    _check(0 <= cfg.inner.beta1 < 1 and (cfg.inner.beta1 == 0.9 or cfg.inner.solver == "adam"),
           f"inner.beta1={cfg.inner.beta1} with inner.solver={cfg.inner.solver}; beta1 is Adam's, in [0, 1).")
    _check(cfg.inner.test_reg is None or cfg.inner.test_reg >= 0,
           f"inner.test_reg={cfg.inner.test_reg}; use null (the training inner loss) or a value >= 0.")
    m = cfg.method
    _check(m.name in METHODS, f"method.name={m.name!r}; choose one of {', '.join(METHODS)}.")
    _check(m.truncate is None or m.truncate >= 1, "method.truncate must be None or >= 1.")
    _check(m.reg > 0 and m.cg_steps >= 1, "method.reg must be > 0 and method.cg_steps >= 1.")
    _check(m.neumann_steps >= 1 and m.neumann_alpha > 0, "method.neumann_steps >= 1, method.neumann_alpha > 0.")
    _check(m.system in ("paper", "reference"), f"method.system={m.system!r}; use paper or reference.")
    _check(m.solver in ("cg", "truncated_cg", "minres", "gmres"),
           f"method.solver={m.solver!r}; use cg, truncated_cg, minres or gmres.")
    _check(m.damping >= 0 and (m.tol is None or m.tol >= 0) and m.coef >= 0 and m.lam_damping >= 0,
           "method.damping, method.tol, method.coef and method.lam_damping must be >= 0.")
    _check(not (m.solver == "gmres" and m.damping), "method.damping needs method.solver=cg, truncated_cg or minres.")
    _check(m.inner_loop in ("proximal", "reference"), f"method.inner_loop={m.inner_loop!r}; use proximal or reference.")
    _check(m.inner_loop == "proximal" or (m.name == "imaml" and cfg.inner.solver == "gd"),
           f"method.inner_loop=reference is the iMAML authors' SGD inner loop (method.name=imaml, inner.solver=gd); "
           f"got method.name={m.name}, inner.solver={cfg.inner.solver}: use method.inner_loop=proximal.")
    mc = cfg.meta
    _check(mc.eps > 0, f"meta.eps={mc.eps}; Adam's epsilon must be > 0.")
    _check(mc.batch >= 1 and mc.steps >= 1 and mc.lr > 0, "meta.batch, meta.steps and meta.lr must be positive.")
    _check(mc.optimizer in ("adam", "sgd"), f"meta.optimizer={mc.optimizer!r}; use adam or sgd.")
    _check(mc.schedule in ("constant", "linear"), f"meta.schedule={mc.schedule!r}; use constant or linear.")
    _check(mc.batching in ("loop", "vmap", "threads"), f"meta.batching={mc.batching!r}; use loop, vmap or threads.")
    _check(mc.chunk_size is None or mc.chunk_size >= 1, f"meta.chunk_size={mc.chunk_size}; use null or >= 1.")
    _check(mc.workers is None or (mc.batching == "threads" and mc.workers >= 1),
           f"meta.workers={mc.workers}; use null, or >= 1 with meta.batching=threads.")
    _check(mc.precision in (None, "bf16", "fp16"), f"meta.precision={mc.precision!r}; use null, bf16 or fp16.")
    for key in ("on_nonconvergence", "on_nonfinite", "on_divergence"):
        allowed = ("ignore", "warn", "raise") + (("skip_task",) if key == "on_nonfinite" else ())
        _check(mc[key] in allowed, f"meta.{key}={mc[key]!r}; use {', '.join(allowed)}.")
    e = cfg.eval
    _check(e.sampling in (None,) + SAMPLINGS, f"eval.sampling={e.sampling!r}; use null, any or within_alphabet.")
    _check(e.weights in ("best", "last"), f"eval.weights={e.weights!r}; use best or last.")
    _check(len(e.lr_grid) > 0 and all(isinstance(v, (int, float)) and v > 0 for v in e.lr_grid),
           f"eval.lr_grid={list(e.lr_grid)}; give positive learning rates, e.g. [0.1,0.4].")
    _check(len(e.steps_grid) > 0 and all(isinstance(v, int) and v >= 1 for v in e.steps_grid),
           f"eval.steps_grid={list(e.steps_grid)}; give step counts >= 1, e.g. [1,10].")
    _check(e.select_tasks >= 1, f"eval.select_tasks={e.select_tasks}; must be >= 1.")
    _check(e.every >= 0 and e.val_tasks >= 1 and e.test_tasks >= 1,
           "eval.every must be >= 0, eval.val_tasks and eval.test_tasks >= 1.")
    _check(cfg.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0.")
    _check(cfg.run.budget_cpu_minutes is None or cfg.run.budget_cpu_minutes > 0,
           f"run.budget_cpu_minutes={cfg.run.budget_cpu_minutes}; use null (no budget) or a positive number.")
    _check(cfg.run.threads is None or cfg.run.threads >= 1, f"run.threads={cfg.run.threads}; use null or >= 1.")
    _check(not (cfg.run.resume and cfg.run.overwrite),
           "run.resume and run.overwrite (--resume, --overwrite) exclude each other; pick one.")
    base.check_device(cfg.run.device, "run.device")
    _check(cfg.wandb.mode in ("offline", "online", "disabled"),
           f"wandb.mode={cfg.wandb.mode!r}; use offline, online or disabled.")
