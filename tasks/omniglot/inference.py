"""Use a meta-trained checkpoint on new few-shot tasks: adapt to a support set, then classify queries.

Example::

    from tasks.omniglot.inference import FewShotClassifier

    clf = FewShotClassifier.load("runs/omniglot/demo/checkpoint.pt")
    task = clf.adapt(["a1.png", "b1.png", "c1.png"], ["a", "b", "c"])   # PNG paths or [n, 28, 28] tensors
    task.predict(["q1.png", "q2.png"])           # -> ["b", "a"]
    task.predict_proba(["q1.png", "q2.png"])     # -> tensor [2, 3] of class probabilities (order: task.classes)

Images may be PNG paths (any size; resized to 28x28 and inverted like the training data) or tensors in the
training format, ``[n, 28, 28]`` or ``[n, 1, 28, 28]`` floats in ``[0, 1]`` with bright strokes. Batch norm is
transductive as in training: query predictions use the statistics of the query batch, so classify queries in
batches (not one at a time) as in the meta-test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

import bilevel as bl

from .model import Conv4, cross_entropy_loss

__all__ = ["FewShotClassifier", "AdaptedTask", "load_images"]


def load_images(images, size: int = 28) -> torch.Tensor:
    """PNG paths or image tensors -> float ``[n, 1, size, size]`` in ``[0, 1]`` with bright strokes."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"images: expected a tensor [n, {size}, {size}] or [n, 1, {size}, {size}], "
                             f"got {tuple(images.shape)}; resize to {size}x{size} or pass PNG paths.")
        return x
    out = []
    for path in images:
        try:
            with Image.open(path) as im:
                im = im.convert("L").resize((size, size), resample=Image.LANCZOS)
        except Exception as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        out.append(1.0 - np.asarray(im, dtype=np.float32) / 255.0)   # Omniglot strokes are dark on white
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


@dataclass
class AdaptedTask:
    """The model adapted to one support set."""

    model: Conv4
    params: dict
    classes: list

    def predict_proba(self, images) -> torch.Tensor:
        """Class probabilities ``[n, N]`` of ``images``, columns in the order of :attr:`classes`."""
        with torch.no_grad():
            return F.softmax(functional_call(self.model, self.params, (load_images(images),)), -1)

    def predict(self, images) -> list:
        """The most probable class label of each image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(-1).tolist()]


class FewShotClassifier:
    """A meta-learned initialisation plus the inner solver that adapts it to a task.

    Args:
        hparams: the meta-learned initial weights of :class:`Conv4`.
        inner_lr, inner_steps: the test-time inner solver (gradient descent on the support loss).
        reg: iMAML's proximal strength when the checkpoint was meta-trained with it (``None`` otherwise).
    """

    def __init__(self, hparams: dict, inner_lr: float, inner_steps: int, reg: float | None = None,
                 solver: str = "gd"):
        ways, channels = hparams["head.weight"].shape
        self.hparams, self.ways = {k: v.detach() for k, v in hparams.items()}, ways
        self.channels, self.reg = channels, reg
        make = bl.Adam if solver == "adam" else bl.GradientDescent
        self.solver = make(lr=inner_lr, steps=inner_steps)

    @classmethod
    def load(cls, path: str | Path, inner_steps: int | None = None, inner_lr: float | None = None):
        """Load a training checkpoint (``checkpoint.pt``); test-time inner settings default to the config's."""
        state = torch.load(path, weights_only=False, map_location="cpu")
        cfg = state["config"]
        inner = cfg["inner"]
        reg = cfg["method"]["reg"] if cfg["method"]["name"] in ("imaml", "neumann") else None
        return cls(state["hparams"], inner_lr or inner["test_lr"] or inner["lr"], inner_steps or inner["test_steps"],
                   reg, inner["solver"])

    def adapt(self, images, labels: Sequence[Hashable]) -> AdaptedTask:
        """Fine-tune on a support set of any N-way K-shot task; ``labels`` may be any hashable values.

        For N different from the meta-training N, the head starts from the mean of the meta-learned class rows
        for every class (labels are random during meta-training, so no row is tied to a class).
        """
        x = load_images(images)
        labels = list(labels)
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
        model = Conv4(len(classes), self.channels)
        loss = cross_entropy_loss(model)
        inner_loss = bl.proximal(loss, self.reg) if self.reg else loss
        params, _ = self.solver(inner_loss, dict(hparams), hparams, (x, y))
        return AdaptedTask(model, {k: v.detach() for k, v in params.items()}, classes)
