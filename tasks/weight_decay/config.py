"""Configuration schema for weight-decay tuning, loaded by the workloads' one helper (:mod:`tasks.config`).

A run is configured by YAML files (partial overrides of the defaults below, merged in order) and ``key=value``
overrides. Unknown keys, wrong types, bad values, a missing file or a data set that names nothing are errors with one
line naming the key and the fix, raised by :func:`load_config` before any data is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from tasks import config as base

from .problems import DECAYS, MODELS, SCALINGS, TASKS, check_data_name

__all__ = ["Config", "load_config", "validate", "METHODS"]

METHODS = ("implicit", "neumann", "unrolled", "forward", "jfb")
# Methods that drop dw*/dλ: on this problem the validation loss has no direct λ term, so they return exactly zero.
FIRST_ORDER = ("first_order", "firstorder", "fomaml", "reptile")


@dataclass
class DataConfig:
    name: str = "digits"  # a scikit-learn loader (iris, wine, breast_cancer, diabetes, digits, ...), mnist,
                          # fashion-mnist, or the path of a .csv / .npz file
    target: Optional[str] = None  # CSV: target column (header name or 0-based index; default the last column);
                                  # NPZ: target key (default y; features under X)
    task: str = "auto"  # auto | regression | binary | multiclass (auto: labels or <= 20 integer values are classes)
    scaling: str = "auto"  # auto | standard | max | none (auto: max for non-negative integer inputs, else standard)
    root: Optional[str] = None  # folder holding mnist/ and fashion-mnist/; None: the BILEVEL_DATA variable
    n_train: Optional[int] = None  # training examples (inner problem); None: min(500, 40 % of a table)
    n_val: Optional[int] = None  # validation examples (outer problem); None: min(500, 30 % of a table)
    n_test: Optional[int] = None  # None: every remaining example (tables) or the full official test set (images)
    noise_features: int = 0  # pure-noise columns appended to the inputs
    seed: int = 0  # fixes the split, the noise features and the MLP initialisation


@dataclass
class ModelConfig:
    kind: str = "auto"  # auto (ridge for regression, logreg for classes) | ridge | logreg | mlp
    decay: str = "scalar"  # scalar | feature | parameter: how many weight decays
    hidden: int = 64  # MLP hidden units


@dataclass
class InnerConfig:
    solver: str = "gd"  # gd | adam
    lr: Optional[float] = None  # inner step size; None: 1 / (curvature bound + largest λ) at every solve (gd)
    momentum: float = 0.9  # gd only (Nesterov)
    steps: int = 2000  # iteration budget of one inner solve
    tol: float = 1e-6  # gradient-norm tolerance of the final (tightest) inner solves


@dataclass
class OuterConfig:
    method: str = "implicit"  # implicit | neumann | unrolled | forward | jfb
    steps: int = 15  # outer (hypergradient) steps
    lr: float = 0.5  # outer Adam step size on log λ
    max_log_step: float = 1.0  # safeguard: no log λ moves more than this per step (a factor e)
    init_wd: float = 1e-3  # starting weight decay λ (> 0)
    linear_steps: int = 50  # CG / Neumann iterations of the adjoint solve
    linear_tol: float = 1e-8  # relative residual of the adjoint solve
    neumann_alpha: float = 0.5  # Neumann step (must be below 2 / largest Hessian eigenvalue)
    truncate: Optional[int] = None  # unrolled: differentiate the last K inner steps only
    hoag: bool = True  # inexact inner solves whose tolerance tightens over outer steps (Pedregosa 2016)
    hoag_tol0: float = 1e-3  # first inner tolerance when hoag is on
    hoag_decay: float = 0.5  # tolerance factor per outer step, down to inner.tol
    warm_start: bool = True  # start each inner solve from the previous solution


@dataclass
class SearchConfig:
    grid_points: int = 30  # log-spaced scalar λ values
    random_points: int = 30  # log-uniform random scalar λ values
    low: float = 1e-6  # search range of λ
    high: float = 10.0
    sklearn: bool = True  # fit scikit-learn at the chosen scalar / per-feature λ as a reference
    grid_from: Optional[str] = None  # results.json of an earlier run on the same task: reuse its grid


@dataclass
class WandbConfig(base.WandbConfig):
    project: str = "bilevel-weight-decay"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    out_dir: Optional[str] = None  # results.json, history.png, landscape.png; None: runs/weight_decay/<data set>
    overwrite: bool = False  # replace a finished run in out_dir (also --overwrite); otherwise such a folder is refused
    progress: bool = True  # tqdm progress bars
    threads: int = 1  # torch intra-op threads: these problems are small, and extra threads only contend
    device: str = "auto"  # auto (the GPU if any, else CPU) | cpu | cuda | cuda:1 ...


def load_config(files=(), overrides=()) -> DictConfig:
    """Merge the schema defaults, YAML ``files`` and ``key=value`` ``overrides`` (in that order), then validate.

    Raises:
        FileNotFoundError: a config file, the data file or ``search.grid_from`` does not exist (named).
        tasks.config.ConfigError: (a ``ValueError``) an unknown key, a wrong type or a bad value (named).
    """
    cfg = base.load(Config, files, overrides, validate=validate)
    if cfg.out_dir is None:
        cfg.out_dir = f"runs/weight_decay/{Path(cfg.data.name).stem}"
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check every choice and range, and that the data set and ``search.grid_from`` exist, before any work."""
    check, choose = base.check, base.choose
    method = cfg.outer.method.lower()
    check(method not in FIRST_ORDER,
          f"outer.method={cfg.outer.method!r} is a first-order method: it drops dw*/dλ, and the validation loss has "
          f"no direct λ term, so its hypergradient for weight decay is identically zero; use one of "
          f"{', '.join(METHODS)}.")
    check(method in METHODS, f"outer.method={cfg.outer.method!r} is not one of {', '.join(METHODS)}.")
    for key, allowed in (("data.task", TASKS), ("data.scaling", SCALINGS), ("model.kind", MODELS),
                         ("model.decay", DECAYS), ("inner.solver", ("gd", "adam")),
                         ("wandb.mode", base.WANDB_MODES)):
        choose(cfg, key, allowed)
    d = cfg.data
    for key in ("n_train", "n_val"):
        check(d[key] is None or d[key] >= 1, f"data.{key}={d[key]}; must be >= 1 (or null for the default).")
    check(d.n_test is None or d.n_test >= 0, f"data.n_test={d.n_test}; must be >= 0 (or null: all the rest).")
    check(d.noise_features >= 0, f"data.noise_features={d.noise_features}; must be >= 0.")
    check(cfg.model.hidden >= 1, f"model.hidden={cfg.model.hidden}; must be >= 1.")
    check(not (cfg.model.decay == "feature" and cfg.model.kind == "mlp"),
          "model.decay=feature is for linear models (ridge, logreg); use scalar or parameter with model.kind=mlp.")
    i, o, sr = cfg.inner, cfg.outer, cfg.search
    check(i.lr is None or i.lr > 0, f"inner.lr={i.lr}; must be > 0 (or null: automatic, for inner.solver=gd).")
    check(i.lr is not None or i.solver == "gd", f"inner.lr=null (automatic) is for inner.solver=gd; set inner.lr for "
                                                f"{i.solver}.")
    check(i.lr is not None or cfg.model.kind != "mlp", "inner.lr=null (automatic) needs a curvature bound, which the "
                                                       "MLP has not; set inner.lr for model.kind=mlp.")
    check(0 <= i.momentum < 1, f"inner.momentum={i.momentum}; must be in [0, 1).")
    check(i.tol >= 0, f"inner.tol={i.tol}; must be >= 0.")
    for key in ("inner.steps", "outer.steps", "outer.linear_steps", "search.grid_points", "threads"):
        value = cfg[key] if "." not in key else cfg[key.split(".")[0]][key.split(".")[1]]
        check(value >= 1, f"{key}={value}; must be >= 1.")
    check(sr.random_points >= 0, f"search.random_points={sr.random_points}; must be >= 0.")
    for key in ("outer.lr", "outer.max_log_step", "outer.init_wd", "outer.neumann_alpha", "outer.hoag_tol0"):
        section, name = key.split(".")
        check(cfg[section][name] > 0, f"{key}={cfg[section][name]}; must be > 0"
                                      + (" (it is tuned as log λ)." if name == "init_wd" else "."))
    check(o.linear_tol >= 0, f"outer.linear_tol={o.linear_tol}; must be >= 0.")
    check(0 < o.hoag_decay <= 1, f"outer.hoag_decay={o.hoag_decay}; must be in (0, 1].")
    check(o.truncate is None or o.truncate >= 1, f"outer.truncate={o.truncate}; must be >= 1 (or null).")
    check(0 < sr.low < sr.high, f"search.low={sr.low}, search.high={sr.high}; need 0 < search.low < search.high.")
    check(not (method == "forward" and cfg.model.decay != "scalar"),
          f"outer.method=forward costs one forward pass per hyperparameter; use it with model.decay=scalar (got "
          f"{cfg.model.decay}), or pick implicit, neumann or unrolled for many hyperparameters.")
    check(cfg.out_dir is None or bool(cfg.out_dir), "out_dir is empty; set out_dir=<folder> (or null).")
    base.check_device(cfg.device, "device")
    try:
        check_data_name(d.name)
    except ValueError as err:
        raise base.ConfigError(f"invalid config: {err}") from None
    if sr.grid_from and not Path(sr.grid_from).is_file():
        raise FileNotFoundError(f"search.grid_from={sr.grid_from!r}: no such results.json.")
