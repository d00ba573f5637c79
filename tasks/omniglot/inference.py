"""Use a meta-trained checkpoint on new few-shot tasks: adapt to a support set, then classify queries.

Example::

    from tasks.omniglot.inference import FewShotClassifier

    clf = FewShotClassifier.load("runs/omniglot/demo/checkpoint.pt")
    task = clf.adapt(["a1.png", "b1.png", "c1.png"], ["a", "b", "c"])   # PNG paths or [n, 28, 28] tensors
    task.predict(["q1.png", "q2.png"])           # -> ["b", "a"]
    task.predict_proba(["q1.png", "q2.png"])     # -> tensor [2, 3] of class probabilities (order: task.classes)

Images may be PNG paths (any size; resized to 28x28 and inverted like the training data; a transparent background
is composited over white; a single path is one image) or tensors in the training format, ``[n, 28, 28]`` or
``[n, 1, 28, 28]`` floats in ``[0, 1]`` (or uint8 in ``0..255``) with bright strokes. Non-finite weights or pixels
are refused with a named error, as is an adaptation that diverges.

Batch norm is transductive as in training: by default query predictions use the statistics of the query batch, so
classify queries in batches as in the meta-test. A single query would be normalised with its own statistics, which
predicts at about chance level (see docs/failure-modes.md), so it is refused. With ``transductive=False`` each query
is normalised together with the support set instead, and its prediction does not depend on the other queries (see
:meth:`AdaptedTask.predict_proba`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch.func import vmap

import bilevel as bl

from .config import OmniglotConfig, test_reg
from .model import Conv4, cross_entropy_loss
from .run_folder import load_checkpoint
from .solvers import inner_solver

__all__ = ["FewShotClassifier", "AdaptedTask", "load_images"]


def _check_finite(what: str, tensor: torch.Tensor, fix: str) -> None:
    if not torch.isfinite(tensor).all():
        count = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what}: {count} non-finite values (NaN or inf); {fix}")


def _read_png(path, size: int) -> np.ndarray:
    """One image file -> float ``[size, size]`` with bright strokes on 0, as the training data."""
    try:
        with Image.open(path) as im:
            im.load()
            if "A" in im.getbands() or "transparency" in im.info:
                # Strokes may live in the alpha channel (dark ink on a transparent background): composite over
                # white, as a viewer shows it, instead of dropping alpha (which turns the background black).
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert("L").resize((size, size), resample=Image.LANCZOS)
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    x = 1.0 - np.asarray(im, dtype=np.float32) / 255.0   # Omniglot strokes are dark on white
    if x.max() - x.min() < 0.05:
        raise ValueError(f"image {path} is blank (one colour after compositing any transparency over white); "
                         f"expected dark strokes on a light background.")
    return x


def load_images(images, size: int = 28) -> torch.Tensor:
    """PNG paths (a list, or one path) or image tensors -> float ``[n, 1, size, size]`` in ``[0, 1]``, strokes bright.

    Raises:
        ValueError: an unreadable or blank image (named), a tensor of the wrong shape, non-finite pixels, or float
            pixels outside ``[0, 1]``.
    """
    if isinstance(images, torch.Tensor):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"images: expected a tensor [n, {size}, {size}] or [n, 1, {size}, {size}], "
                             f"got {tuple(images.shape)}; resize to {size}x{size} or pass PNG paths.")
        _check_finite("images", x, "fix the input images.")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"images: float pixels in [{x.min():.3g}, {x.max():.3g}], expected [0, 1] with bright "
                             f"strokes; divide 0..255 values by 255 (or pass a uint8 tensor).")
        return x
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    out = [_read_png(path, size) for path in images]
    if not out:
        raise ValueError("images: an empty list; pass at least one image.")
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


@dataclass
class AdaptedTask:
    """The model adapted to one support set."""

    model: Conv4
    params: dict
    classes: list
    support: torch.Tensor | None = None   # the support images, for transductive=False

    def predict_proba(self, images, transductive: bool = True) -> torch.Tensor:
        """Class probabilities ``[n, N]`` of ``images``, columns in the order of :attr:`classes`.

        Args:
            images: PNG paths or tensors (see :func:`load_images`).
            transductive: ``True`` (as in meta-training and the meta-test): batch norm uses the statistics of this
                query batch, so pass the queries together; a batch of one is refused, since one image normalised
                by its own statistics predicts at about chance level. ``False``: each query is normalised together
                with the support set (the forward pass sees the support images plus that one query), so its
                prediction does not depend on the other queries; this mode was not seen in meta-training.

        Raises:
            ValueError: a single query with ``transductive=True``, bad images (see :func:`load_images`), or
                non-finite outputs.
        """
        x = load_images(images)
        with torch.no_grad():
            if transductive:
                if x.shape[0] == 1:
                    raise ValueError("predict: one query under transductive batch norm would be normalised by its "
                                     "own statistics, which predicts at about chance level; pass the queries "
                                     "together, or use transductive=False (normalised with the support set).")
                logits = self.model.logits(self.params, x)
            else:
                if self.support is None:
                    raise ValueError("predict: transductive=False needs the support images; adapt() keeps them.")

                def one(query):   # the last row: the query, normalised with the support set's statistics
                    return self.model.logits(self.params, torch.cat([self.support, query[None]]))[-1]
                logits = vmap(one)(x)
        _check_finite("predict: the logits", logits,
                      "the adaptation diverged (lower inner_lr) or the inputs are broken.")
        return F.softmax(logits, -1)

    def predict(self, images, transductive: bool = True) -> list:
        """The most probable class label of each image (``transductive`` as in :meth:`predict_proba`)."""
        return [self.classes[i] for i in self.predict_proba(images, transductive).argmax(-1).tolist()]


class FewShotClassifier:
    """A meta-learned initialisation plus the inner solver that adapts it to a task.

    Args:
        hparams: the meta-learned initial weights of :class:`Conv4`.
        inner_lr, inner_steps: the test-time inner solver (gradient descent on the support loss); at least one
            step, since the meta-learned head rows are not tied to any class before adaptation.
        reg: iMAML's proximal strength when the checkpoint was meta-trained with it (``None`` otherwise).
        solver: ``"gd"`` or ``"adam"``; ``beta1``: Adam's first-moment decay (Reptile's configs: 0).
        pool: the conv4 variant the weights belong to (``model.pool`` of the training config).

    Raises:
        ValueError: non-finite weights (named), ``inner_steps < 1`` or ``inner_lr <= 0``.
    """

    def __init__(self, hparams: dict, inner_lr: float, inner_steps: int, reg: float | None = None,
                 solver: str = "gd", pool: str = "stride", beta1: float = 0.9):
        for name, value in hparams.items():
            _check_finite(f"weights {name}", value, "the checkpoint comes from a diverged run; use an earlier one.")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r}: adaptation needs at least 1 step (the meta-learned head "
                             f"is not tied to any class before it).")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr={inner_lr!r}: must be > 0.")
        ways, channels = hparams["head.weight"].shape
        self.hparams, self.ways = {k: v.detach() for k, v in hparams.items()}, ways
        self.channels, self.reg, self.pool, self.inner_lr = channels, reg, pool, inner_lr
        self.solver = inner_solver(solver, inner_lr, inner_steps, beta1)

    @classmethod
    def load(cls, path: str | Path, inner_steps: int | None = None, inner_lr: float | None = None):
        """Load a training checkpoint (``checkpoint.pt`` or ``best.pt``); test-time inner settings default to the
        ones chosen on validation tasks (``eval.select=true``), else the config's.

        Only tensors and plain containers are unpickled (``weights_only=True``): a file holding anything else is
        refused, since unpickling it could run code.
        """
        state = load_checkpoint(path)
        cfg = state.get("config")
        if not isinstance(cfg, dict) or not {"inner", "method"} <= set(cfg):
            raise ValueError(f"{path}: no training config in the checkpoint; build FewShotClassifier(hparams, ...) "
                             f"directly instead.")
        full = OmegaConf.merge(OmegaConf.structured(OmniglotConfig), cfg)   # older checkpoints: today's defaults
        inner = cfg["inner"]
        reg = test_reg(full) or None
        pool = (cfg.get("model") or {}).get("pool", "max")   # checkpoints from before model.pool: max-pool
        chosen = state.get("test_adaptation") or {}   # chosen on validation tasks at the end of training
        lr = inner_lr if inner_lr is not None else chosen.get("lr") or inner["test_lr"] or inner["lr"]
        steps = inner_steps if inner_steps is not None else chosen.get("steps") or inner["test_steps"]
        return cls(state["hparams"], lr, steps, reg, inner["solver"], pool, full.inner.beta1)

    def adapt(self, images, labels: Sequence[Hashable]) -> AdaptedTask:
        """Fine-tune on a support set of any N-way K-shot task; ``labels`` may be any hashable values.

        For N different from the meta-training N, the head starts from the mean of the meta-learned class rows
        for every class (labels are random during meta-training, so no row is tied to a class).
        """
        x = load_images(images)
        # A tensor's elements hash by identity, so every one would be a class of its own: compare values instead.
        labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"adapt: {x.shape[0]} images but {len(labels)} labels.")
        classes = list(dict.fromkeys(labels))
        if len(classes) < 2:
            raise ValueError("adapt: the support set needs at least 2 classes.")
        y = torch.tensor([classes.index(c) for c in labels])
        hparams = dict(self.hparams)
        if len(classes) != self.ways:
            hparams["head.weight"] = hparams["head.weight"].mean(0, keepdim=True).expand(len(classes), -1).clone()
            hparams["head.bias"] = hparams["head.bias"].mean(0, keepdim=True).expand(len(classes)).clone()
        model = Conv4(len(classes), self.channels, pool=self.pool)
        loss = cross_entropy_loss(model)
        inner_loss = bl.proximal(loss, self.reg) if self.reg else loss
        params, _ = self.solver(inner_loss, dict(hparams), hparams, (x, y))
        bad = [k for k, v in params.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"adapt: the adapted weights are non-finite ({bad[0]}, ...): the adaptation diverged; "
                             f"lower inner_lr (now {self.inner_lr}).")
        with torch.no_grad():   # fitting the support set must lower its loss; otherwise predictions are noise
            before, after = float(loss(hparams, hparams, (x, y))), float(loss(params, hparams, (x, y)))
        if not after <= before + max(0.1 * before, 1e-3):
            raise ValueError(f"adapt: the support loss rose from {before:.3g} to {after:.3g} over "
                             f"{self.solver.steps} steps: the adaptation diverged; lower inner_lr (now "
                             f"{self.inner_lr}).")
        return AdaptedTask(model, {k: v.detach() for k, v in params.items()}, classes, x)
