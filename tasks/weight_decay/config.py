"""Configuration schema for weight-decay tuning (OmegaConf structured config; unknown keys are rejected)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

from .problems import DATASETS, DECAYS, MODELS

METHODS = ("implicit", "neumann", "unrolled", "forward", "jfb")
# Methods that drop dw*/dλ: on this problem the validation loss has no direct λ term, so they return exactly zero.
FIRST_ORDER = ("first_order", "firstorder", "fomaml", "reptile")


@dataclass
class DataConfig:
    name: str = "digits"  # diabetes | digits | mnist | fashion-mnist
    root: Optional[str] = None  # folder holding mnist/ and fashion-mnist/; None: the BILEVEL_DATA variable
    n_train: int = 500  # training examples (inner problem)
    n_val: int = 500  # validation examples (outer problem)
    n_test: Optional[int] = None  # None: every remaining example (sklearn sets) or the full official test set
    noise_features: int = 0  # pure-noise columns appended to the inputs
    seed: int = 0  # fixes the split, the noise features and the MLP initialisation


@dataclass
class ModelConfig:
    kind: str = "logreg"  # ridge | logreg | mlp
    decay: str = "scalar"  # scalar | feature | parameter: how many weight decays
    hidden: int = 64  # MLP hidden units


@dataclass
class InnerConfig:
    solver: str = "gd"  # gd | adam
    lr: float = 1.0  # inner step size
    momentum: float = 0.9  # gd only (Nesterov)
    steps: int = 500  # iteration budget of one inner solve
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
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "bilevel-weight-decay"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    out_dir: str = "runs/weight_decay/default"  # results JSON and PNG plots go here
    progress: bool = True  # tqdm progress bars
    threads: int = 1  # torch intra-op threads: these problems are small, and extra threads only contend


def load_config(files=(), overrides=()) -> Config:
    """Merge the schema defaults, YAML ``files`` and ``key=value`` ``overrides`` (in that order), then validate.

    Raises:
        omegaconf.errors.ConfigKeyError: an unknown key (a typo) in a file or override.
        ValueError: a value outside its allowed set or range (see :func:`validate`).
    """
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    for f in files:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(f))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Check choices and ranges, with messages that name the key and the fix."""

    def choose(key, value, allowed):
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed)}.")

    method = cfg.outer.method.lower()
    if method in FIRST_ORDER:
        raise ValueError(
            f"outer.method={cfg.outer.method!r} is a first-order method: it drops dw*/dλ, and the validation loss "
            f"has no direct λ term, so its hypergradient for weight decay is identically zero. Choose one of "
            f"{list(METHODS)}."
        )
    choose("outer.method", method, METHODS)
    choose("data.name", cfg.data.name, DATASETS)
    choose("model.kind", cfg.model.kind, MODELS)
    choose("model.decay", cfg.model.decay, DECAYS)
    choose("inner.solver", cfg.inner.solver, ("gd", "adam"))
    choose("wandb.mode", cfg.wandb.mode, ("offline", "online", "disabled"))
    if not cfg.outer.init_wd > 0:
        raise ValueError(
            f"outer.init_wd={cfg.outer.init_wd!r}: the initial weight decay must be > 0 (it is tuned as log λ)."
        )
    if not 0 < cfg.search.low < cfg.search.high:
        raise ValueError(f"search range must satisfy 0 < search.low < search.high (got {cfg.search.low}, "
                         f"{cfg.search.high}).")
    for key in ("outer.lr", "outer.max_log_step", "inner.lr"):
        section, name = key.split(".")
        if not cfg[section][name] > 0:
            raise ValueError(f"{key}={cfg[section][name]!r} must be > 0.")
    for key in ("outer.steps", "inner.steps", "outer.linear_steps"):
        section, name = key.split(".")
        if cfg[section][name] < 1:
            raise ValueError(f"{key}={cfg[section][name]!r} must be >= 1.")
    if method == "forward" and cfg.model.decay != "scalar":
        raise ValueError(
            f"outer.method='forward' costs one forward pass per hyperparameter; use it with model.decay='scalar' "
            f"(got {cfg.model.decay!r}), or pick implicit / neumann / unrolled for many hyperparameters."
        )
