"""Weight-decay tuning problems on real data: fixed train / validation / test splits, models, and losses.

The inner problem trains the model with an L2 penalty whose strength is the hyperparameter,

    inner_loss(w, λ) = data_loss(w; train) + 1/2 Σ_k Σ_i exp(log_wd_{k,i}) w_{k,i}²,

and the outer problem is the plain validation loss, outer_loss(w) = data_loss(w; val). Biases are never decayed.
Hyperparameters live in log space, ``hparams = {"log_wd": tensor}``, with the tensor's shape saying how decay is
shared: ``[]`` one scalar, ``[D, 1]`` one per input feature (linear models), or the weight's own shape (one per
parameter, Lorraine et al. 2020). Models with several weight matrices under per-parameter decay use one key per
weight, ``"log_wd.W1"``, ``"log_wd.W2"``.

Splits are drawn once from a seeded permutation (never the global RNG); the test set is only ever evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tasks.data import load_idx_dataset, load_sklearn_dataset

__all__ = [
    "DECAYS",
    "DATASETS",
    "MODELS",
    "WeightDecayTask",
    "init_hparams",
    "make_task",
    "ridge_solution",
    "ridge_hypergrad",
]

DATASETS = ("diabetes", "digits", "mnist", "fashion-mnist")
MODELS = ("ridge", "logreg", "mlp")
DECAYS = ("scalar", "feature", "parameter")


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
    """

    name: str
    model: str
    decay: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    params0: dict[str, torch.Tensor]
    decayed: tuple[str, ...]

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
    dtype = task.train[0].dtype
    return {k: torch.full(s, math.log(weight_decay), dtype=dtype) for k, s in task.hparam_shapes().items()}


def _split(n: int, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    if sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} need {sum(sizes)} examples but the data set has only {n}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm[: sum(sizes)], list(sizes)))


def make_task(
    dataset: str,
    model: str = "logreg",
    decay: str = "scalar",
    n_train: int = 500,
    n_val: int = 500,
    n_test: int | None = None,
    noise_features: int = 0,
    hidden: int = 64,
    seed: int = 0,
    root: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> WeightDecayTask:
    """Build a task with fixed, seeded splits.

    Splits: scikit-learn sets are permuted with ``seed`` and cut into train / val / test (``n_test=None``: all the
    rest). MNIST and Fashion-MNIST take train and val from the official training set (disjoint, seeded) and test
    from the official test set (the first ``n_test`` images, all 10,000 if None). Inputs: diabetes and its target are
    standardised with the training statistics (so ridge needs no intercept); digits pixels are divided by
    16 and image pixels by 255, then centred with the training mean. ``noise_features`` appends that many standard normal columns (seeded).

    Args:
        dataset: one of ``DATASETS``.
        model: ``"ridge"`` (diabetes only), ``"logreg"`` or ``"mlp"`` (classification sets).
        decay: ``"scalar"``, ``"feature"`` (linear models) or ``"parameter"``.
        root: data folder for MNIST / Fashion-MNIST (default: the ``BILEVEL_DATA`` environment variable).
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown data set {dataset!r}: choose one of {list(DATASETS)}.")
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}: choose one of {list(MODELS)}.")
    if decay not in DECAYS:
        raise ValueError(f"Unknown decay sharing {decay!r}: choose one of {list(DECAYS)}.")
    if (model == "ridge") != (dataset == "diabetes"):
        raise ValueError(
            f"model {model!r} does not fit data set {dataset!r}: ridge is for the regression set 'diabetes', "
            f"logreg and mlp for the classification sets {list(DATASETS[1:])}."
        )
    if decay == "feature" and model == "mlp":
        raise ValueError("decay 'feature' is for linear models (ridge, logreg); use 'scalar' or 'parameter' for mlp.")
    if n_train <= 0 or n_val <= 0 or noise_features < 0:
        raise ValueError(f"need n_train > 0, n_val > 0, noise_features >= 0 (got {n_train}, {n_val}, {noise_features}).")

    if dataset in ("diabetes", "digits"):
        X, y = load_sklearn_dataset(dataset)
        n_test = max(X.shape[0] - n_train - n_val, 0) if n_test is None else n_test
        tr, va, te = _split(X.shape[0], (n_train, n_val, n_test), seed)
        parts = [(X[i], y[i]) for i in (tr, va, te)]
    else:
        images, labels = load_idx_dataset(dataset, "train", root)
        tr, va = _split(images.shape[0], (n_train, n_val), seed)
        test_images, test_labels = load_idx_dataset(dataset, "test", root)
        n_test = test_images.shape[0] if n_test is None else n_test
        parts = [(images[tr], labels[tr]), (images[va], labels[va]), (test_images[:n_test], test_labels[:n_test])]
        parts = [(x.reshape(x.shape[0], -1).double() / 255.0, t) for x, t in parts]

    if dataset == "diabetes":
        mean, std = parts[0][0].mean(0), parts[0][0].std(0)
        y_mean, y_std = parts[0][1].mean(), parts[0][1].std()
        parts = [((x - mean) / std, (t - y_mean) / y_std) for x, t in parts]
    else:  # centring (with the training mean) makes the Hessian far better conditioned for gradient descent
        if dataset == "digits":
            parts = [(x / 16.0, t) for x, t in parts]
        mean = parts[0][0].mean(0)
        parts = [(x - mean, t) for x, t in parts]

    if noise_features:
        g = torch.Generator().manual_seed(10_000 + seed)
        parts = [(torch.cat([x, torch.randn(x.shape[0], noise_features, generator=g, dtype=x.dtype)], 1), t)
                 for x, t in parts]
    parts = [(x.to(dtype), t.to(dtype) if t.is_floating_point() else t) for x, t in parts]

    D = parts[0][0].shape[1]
    C = 10
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
    data_name = dataset + (f"+{noise_features}noise" if noise_features else "")
    return WeightDecayTask(f"{model}/{data_name}/{decay}", model, decay, *parts, params0, decayed)


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
