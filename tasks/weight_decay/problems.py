"""Weight-decay tuning problems on real data: fixed train / validation / test splits, models, and losses.

The inner problem trains the model with an L2 penalty whose strength is the hyperparameter,

    inner_loss(w, λ) = data_loss(w; train) + 1/2 Σ_k Σ_i exp(log_wd_{k,i}) w_{k,i}²,

and the outer problem is the plain validation loss, outer_loss(w) = data_loss(w; val). Biases are never decayed.
Hyperparameters live in log space, ``hparams = {"log_wd": tensor}``, with the tensor's shape saying how decay is
shared: ``[]`` one scalar, ``[D, 1]`` one per input feature (linear models), or the weight's own shape (one per
parameter, Lorraine et al. 2020). Models with several weight matrices under per-parameter decay use one key per
weight, ``"log_wd.W1"``, ``"log_wd.W2"``.

Any data set works without code: a scikit-learn loader by name (``iris``, ``wine``, ``breast_cancer``,
``diabetes``, ``digits``, ...), a CSV or NPZ file, or the image sets ``mnist`` / ``fashion-mnist``. The task type
(``regression``, ``binary``, ``multiclass``) is read from the target or set explicitly; regression uses ridge
regression, classification a softmax model with one output per class (logistic regression or an MLP).

Splits are drawn once from a seeded permutation (never the global RNG); the test set is only ever evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import numpy as np

from tasks.data import IDX_DATASETS, load_idx_dataset, load_sklearn_dataset, load_table, sklearn_loaders

__all__ = [
    "DECAYS",
    "IMAGE_SETS",
    "MODELS",
    "TASKS",
    "SCALINGS",
    "curvature",
    "data_source",
    "WeightDecayTask",
    "init_hparams",
    "make_task",
    "ridge_solution",
    "ridge_hypergrad",
]

IMAGE_SETS = tuple(IDX_DATASETS)  # mnist, fashion-mnist: official train / test files under the data root
MODELS = ("auto", "ridge", "logreg", "mlp")  # auto: ridge for regression, logreg for classification
DECAYS = ("scalar", "feature", "parameter")
TASKS = ("auto", "regression", "binary", "multiclass")
SCALINGS = ("auto", "standard", "max", "none")
MAX_CLASSES = 20  # auto: integer-valued numeric targets with at most this many distinct values are class labels


@dataclass(frozen=True)
class WeightDecayTask:
    """One weight-decay tuning problem.

    Attributes:
        name: short description, e.g. ``"logreg/digits+64noise/feature"``.
        model: ``"ridge"``, ``"logreg"`` or ``"mlp"``.
        decay: ``"scalar"``, ``"feature"`` or ``"parameter"``.
        train, val, test: batches ``(X, y)``; X float ``[N, D]``, y float ``[N]`` (ridge) or int64 ``[N]``.
        params0: the starting weights (zeros for linear models, a seeded draw for the MLP).
        decayed: names of the weights that carry a penalty.
        task: ``"regression"``, ``"binary"`` or ``"multiclass"``.
        classes: the class names, in label order (empty for regression).
    """

    name: str
    model: str
    decay: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    params0: dict[str, torch.Tensor]
    decayed: tuple[str, ...]
    task: str = "multiclass"
    classes: tuple[str, ...] = ()

    def data_loss(self, params, batch):
        """Mean loss on ``batch``: half the squared error (ridge) or the cross-entropy (classifiers)."""
        X, y = batch
        if self.model == "ridge":
            return 0.5 * ((X @ params["W"] - y) ** 2).mean()
        if self.model == "logreg":
            logits = X @ params["W"] + params["b"]
        else:
            logits = torch.relu(X @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
        return F.cross_entropy(logits, y)

    def penalty(self, params, hparams):
        """1/2 Σ exp(log_wd) ⊙ w² over the decayed weights."""
        total = 0.0
        for k in self.decayed:
            log_wd = hparams[f"log_wd.{k}"] if f"log_wd.{k}" in hparams else hparams["log_wd"]
            total = total + 0.5 * (torch.exp(log_wd) * params[k] ** 2).sum()
        return total

    def inner_loss(self, params, hparams, batch):
        return self.data_loss(params, batch) + self.penalty(params, hparams)

    def outer_loss(self, params, hparams, batch):
        # No direct λ term: the validation loss depends on λ only through the trained weights, which is why
        # first-order methods (that drop dw*/dλ) return an identically zero hypergradient here.
        return self.data_loss(params, batch)

    def accuracy(self, params, batch):
        if self.model == "ridge":
            raise ValueError("accuracy is defined for classifiers only, not for ridge regression.")
        X, y = batch
        if self.model == "logreg":
            logits = X @ params["W"] + params["b"]
        else:
            logits = torch.relu(X @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
        return (logits.argmax(-1) == y).double().mean()

    def hparam_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the ``hparams`` entries for this task's decay sharing."""
        if self.decay == "scalar":
            return {"log_wd": ()}
        if self.decay == "feature":
            shape = self.params0["W"].shape
            return {"log_wd": (shape[0],) + (1,) * (len(shape) - 1)}
        if len(self.decayed) == 1:
            return {"log_wd": tuple(self.params0[self.decayed[0]].shape)}
        return {f"log_wd.{k}": tuple(self.params0[k].shape) for k in self.decayed}


def init_hparams(task: WeightDecayTask, weight_decay: float) -> dict[str, torch.Tensor]:
    """Every decay set to ``weight_decay`` (> 0), stored as its logarithm."""
    if not (isinstance(weight_decay, (int, float)) and weight_decay > 0 and math.isfinite(weight_decay)):
        raise ValueError(
            f"initial weight decay {weight_decay!r} must be a positive finite number (it is tuned in log space, "
            f"log λ); e.g. outer.init_wd=1e-3."
        )
    X = task.train[0]
    return {k: torch.full(s, math.log(weight_decay), dtype=X.dtype, device=X.device)
            for k, s in task.hparam_shapes().items()}


def _split(n: int, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    if sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} need {sum(sizes)} examples but the data set has only {n}; lower "
                         f"data.n_train / data.n_val / data.n_test.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm[: sum(sizes)], list(sizes)))


def data_source(name: str) -> str:
    """``"file"`` (a ``.csv`` / ``.npz`` path), ``"images"`` (``mnist``, ``fashion-mnist``) or ``"sklearn"``."""
    if str(name).lower().endswith((".csv", ".npz")):
        return "file"
    return "images" if name in IMAGE_SETS else "sklearn"


def check_data_name(name: str) -> None:
    """Fail fast, before any loading, on a data set name that names nothing (one line, with the choices)."""
    source = data_source(name)
    if source == "file":
        from pathlib import Path
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"data.name={name!r}: no such file.")
    elif source == "sklearn":
        from sklearn import datasets
        if name not in sklearn_loaders() and not hasattr(datasets, f"fetch_{name}"):
            raise ValueError(f"data.name={name!r} is not a data set: use a scikit-learn loader name "
                             f"({', '.join(sklearn_loaders())}, ...), {' or '.join(IMAGE_SETS)}, or a .csv / .npz "
                             f"file path.")


def _task_type(y: np.ndarray, task: str, where: str) -> str:
    """The task type of target ``y``: as given, or (``auto``) read from the values."""
    if y.dtype.kind in "USO":  # text labels
        kind = "classification"
    elif y.dtype.kind in "iub":
        kind = "classification"
    else:
        integral = bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
        kind = "classification" if integral and len(np.unique(y)) <= MAX_CLASSES else "regression"
    n_classes = len(np.unique(y)) if kind == "classification" else 0
    if task == "auto":
        if kind == "classification" and n_classes < 2:
            raise ValueError(f"{where}: the target has a single value; nothing to classify.")
        return "regression" if kind == "regression" else ("binary" if n_classes == 2 else "multiclass")
    if task == "regression" and y.dtype.kind in "USO":
        raise ValueError(f"{where}: data.task='regression' but the target holds text labels; use binary or multiclass.")
    if task != "regression":
        n_classes = len(np.unique(y))
        if task == "binary" and n_classes != 2:
            raise ValueError(f"{where}: data.task='binary' but the target has {n_classes} distinct values; use "
                             f"data.task=multiclass (or regression).")
        if n_classes < 2:
            raise ValueError(f"{where}: the target has a single value; nothing to classify.")
    return task


def _scale(parts, scaling: str):
    """Scale inputs with statistics of the training split only.

    ``standard``: each feature to mean 0, std 1. ``max``: divide by the largest |value| of the training inputs, then
    centre each feature (pixel intensities keep their relative scale). ``auto``: ``max`` when every training input
    is a non-negative integer (pixels, counts), else ``standard``. Centring makes gradient descent far better
    conditioned, and the models have no penalty on their biases.
    """
    X = parts[0][0]
    if scaling == "auto":
        scaling = "max" if bool((X >= 0).all()) and bool((X == X.round()).all()) else "standard"
    if scaling == "standard":
        mean, std = X.mean(0), X.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return [((x - mean) / std, t) for x, t in parts]
    if scaling == "max":
        top = X.abs().max()
        parts = [(x / (top if top > 0 else 1.0), t) for x, t in parts]
        mean = parts[0][0].mean(0)
        return [(x - mean, t) for x, t in parts]
    return parts


def make_task(
    dataset: str,
    model: str = "auto",
    decay: str = "scalar",
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    noise_features: int = 0,
    hidden: int = 64,
    seed: int = 0,
    root: str | None = None,
    dtype: torch.dtype = torch.float64,
    target: str | None = None,
    task: str = "auto",
    scaling: str = "auto",
    device: torch.device | str = "cpu",
) -> WeightDecayTask:
    """Build a task with fixed, seeded splits.

    Splits: tables (scikit-learn sets, CSV / NPZ files) are permuted with ``seed`` and cut into train / val / test;
    ``n_train=None`` takes min(500, 40 %) of the rows, ``n_val=None`` min(500, 30 %), ``n_test=None`` all the rest.
    MNIST and Fashion-MNIST take train and val from the official training set (disjoint, seeded; 500 each by
    default) and test from the official test set (the first ``n_test`` images, all 10,000 if None). Inputs are
    scaled with training statistics (see ``scaling``); a regression target is standardised with the training
    statistics too (so ridge needs no intercept); class labels become ``0..C-1`` in sorted order.
    ``noise_features`` appends that many standard normal columns (seeded).

    Args:
        dataset: a scikit-learn loader name (``iris``, ``digits``, ...), ``mnist`` / ``fashion-mnist``, or the path
            of a ``.csv`` / ``.npz`` file (see :func:`tasks.data.load_table`).
        model: ``"ridge"`` (regression), ``"logreg"`` or ``"mlp"`` (classification), or ``"auto"``.
        decay: ``"scalar"``, ``"feature"`` (linear models) or ``"parameter"``.
        target: the target column (CSV) or key (NPZ); default the last column / ``y``.
        task: ``"regression"``, ``"binary"``, ``"multiclass"`` or ``"auto"``: text labels, integer labels, or
            integer-valued numbers with at most 20 distinct values are classes; anything else is regression.
        scaling: ``"standard"``, ``"max"``, ``"none"`` or ``"auto"`` (``max`` for non-negative integer inputs such
            as pixels, else ``standard``).
        root: data folder for MNIST / Fashion-MNIST (default: the ``BILEVEL_DATA`` environment variable).
        device: where the splits and ``params0`` are put. The data is read, split and scaled on the CPU, and the MLP
            drawn there, so every device gets the same task.
    """
    for key, value, allowed in (("model", model, MODELS), ("decay", decay, DECAYS), ("task", task, TASKS),
                                ("scaling", scaling, SCALINGS)):
        if value not in allowed:
            raise ValueError(f"Unknown {key} {value!r}: choose one of {list(allowed)}.")
    if decay == "feature" and model == "mlp":
        raise ValueError("decay 'feature' is for linear models (ridge, logreg); use 'scalar' or 'parameter' for mlp.")
    if (n_train is not None and n_train <= 0) or (n_val is not None and n_val <= 0) or noise_features < 0:
        raise ValueError(f"need n_train > 0, n_val > 0, noise_features >= 0 (got {n_train}, {n_val}, "
                         f"{noise_features}).")
    check_data_name(dataset)
    source = data_source(dataset)

    if source == "images":
        images, labels = load_idx_dataset(dataset, "train", root)
        n_train, n_val = n_train or 500, n_val or 500
        tr, va = _split(images.shape[0], (n_train, n_val), seed)
        test_images, test_labels = load_idx_dataset(dataset, "test", root)
        n_test = test_images.shape[0] if n_test is None else n_test
        parts = [(images[tr], labels[tr]), (images[va], labels[va]), (test_images[:n_test], test_labels[:n_test])]
        parts = [(x.reshape(x.shape[0], -1).double(), t.numpy()) for x, t in parts]
        y_all = np.concatenate([t for _, t in parts])
    else:
        X, y_all = load_table(dataset, target) if source == "file" else load_sklearn_dataset(dataset)
        y_all = np.asarray(y_all)
        N = X.shape[0]
        n_train = min(500, int(0.4 * N)) if n_train is None else n_train
        n_val = min(500, int(0.3 * N)) if n_val is None else n_val
        n_test = max(N - n_train - n_val, 0) if n_test is None else n_test
        idx = _split(N, (n_train, n_val, n_test), seed)
        parts = [(X[i], y_all[i.numpy()]) for i in idx]
    name = dataset.rsplit("/", 1)[-1].rsplit(".", 1)[0] if source == "file" else dataset
    if source != "images":  # missing values would only show up later, as a NaN loss blamed on the solver
        bad_rows = (~torch.isfinite(X).all(1)).nonzero().flatten().tolist()
        if y_all.dtype.kind == "f":
            bad_rows = sorted(set(bad_rows) | set(np.flatnonzero(~np.isfinite(y_all)).tolist()))
        if bad_rows:
            raise ValueError(f"data set {name!r}: {len(bad_rows)} examples hold missing or non-finite values "
                             f"(first: example {bad_rows[0]}, counted from 0 after any header); remove or fill them.")
    task = _task_type(y_all, task, f"data set {name!r}")
    if model == "auto":
        model = "ridge" if task == "regression" else "logreg"
    if (model == "ridge") != (task == "regression"):
        raise ValueError(f"model {model!r} does not fit data set {name!r}, a {task} task: ridge is for regression "
                         f"targets, logreg and mlp for classes (set model.kind, or data.task if the type is wrong).")

    parts = _scale(parts, scaling)
    if task == "regression":
        y_train = torch.from_numpy(parts[0][1].astype(np.float64))
        y_mean, y_std = y_train.mean(), y_train.std()
        y_std = y_std if y_std > 0 else torch.ones_like(y_std)
        parts = [(x, (torch.from_numpy(t.astype(np.float64)) - y_mean) / y_std) for x, t in parts]
        classes: tuple[str, ...] = ()
    else:
        values, codes = np.unique(y_all, return_inverse=True)
        lookup = {v: i for i, v in enumerate(values.tolist())}
        parts = [(x, torch.tensor([lookup[v] for v in t.tolist()], dtype=torch.int64)) for x, t in parts]
        classes = tuple(str(int(v)) if isinstance(v, float) and v == int(v) else str(v) for v in values.tolist())

    if noise_features:
        g = torch.Generator().manual_seed(10_000 + seed)
        parts = [(torch.cat([x, torch.randn(x.shape[0], noise_features, generator=g, dtype=x.dtype)], 1), t)
                 for x, t in parts]
    parts = [(x.to(device, dtype), t.to(device, dtype) if t.is_floating_point() else t.to(device)) for x, t in parts]

    D = parts[0][0].shape[1]
    C = len(classes)
    if model == "ridge":
        params0, decayed = {"W": torch.zeros(D, dtype=dtype)}, ("W",)
    elif model == "logreg":
        params0, decayed = {"W": torch.zeros(D, C, dtype=dtype), "b": torch.zeros(C, dtype=dtype)}, ("W",)
    else:
        g = torch.Generator().manual_seed(20_000 + seed)
        params0 = {
            "W1": torch.randn(D, hidden, generator=g, dtype=dtype) / math.sqrt(D),
            "b1": torch.zeros(hidden, dtype=dtype),
            "W2": torch.randn(hidden, C, generator=g, dtype=dtype) / math.sqrt(hidden),
            "b2": torch.zeros(C, dtype=dtype),
        }
        decayed = ("W1", "W2")
    params0 = {k: v.to(device) for k, v in params0.items()}
    data_name = name + (f"+{noise_features}noise" if noise_features else "")
    return WeightDecayTask(f"{model}/{data_name}/{decay}", model, decay, *parts, params0, decayed, task, classes)


def curvature(task: WeightDecayTask) -> float | None:
    """An upper bound on the largest Hessian eigenvalue of the training data loss (without the penalty).

    Ridge: ``λ_max(XᵀX/n)``. Softmax regression: ``λ_max(X̃ᵀX̃/n)/2`` with ``X̃ = [X, 1]`` (the softmax
    cross-entropy's Hessian in the logits is ``diag(p) − ppᵀ ⪯ I/2``). ``None`` for the MLP (no such bound).
    """
    if task.model == "mlp":
        return None
    X = task.train[0]
    if task.model == "logreg":
        X = torch.cat([X, torch.ones_like(X[:, :1])], 1)
    top = float(torch.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    return top if task.model == "ridge" else 0.5 * top


def ridge_solution(task: WeightDecayTask, hparams) -> torch.Tensor:
    """Closed-form ridge weights: w* = (XᵀX/n + diag(λ))⁻¹ Xᵀy/n."""
    X, y = task.train
    n, D = X.shape
    lam = torch.exp(hparams["log_wd"]).reshape(-1).expand(D)
    H = X.T @ X / n + torch.diag(lam)
    return torch.linalg.solve(H, X.T @ y / n)


def ridge_hypergrad(task: WeightDecayTask, hparams) -> dict[str, torch.Tensor]:
    """Closed-form d val_loss / d log λ for ridge.

    From the stationarity condition H w* = Xᵀy/n with H = XᵀX/n + diag(λ): dw*/dλ_j = −H⁻¹ e_j w*_j, so
    d val / d log λ_j = −λ_j w*_j (H⁻¹ g)_j with g = ∇_w val_loss(w*); a scalar λ sums over j.
    """
    if task.model != "ridge":
        raise ValueError(f"ridge_hypergrad needs the ridge task, got {task.model!r}.")
    X, y = task.train
    n, D = X.shape
    log_wd = hparams["log_wd"]
    lam = torch.exp(log_wd).reshape(-1).expand(D)
    H = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / n)
    Xv, yv = task.val
    g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    per_feature = -lam * w * torch.linalg.solve(H, g)
    return {"log_wd": per_feature.sum() if log_wd.dim() == 0 else per_feature.reshape(log_wd.shape)}
