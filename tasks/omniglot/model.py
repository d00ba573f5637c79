"""The conv4 network of Finn et al. (2017) for Omniglot, and the few-shot losses on it.

Two variants, chosen by ``pool`` (config key ``model.pool``):

- ``"stride"`` (the default): the network of the MAML reference code for Omniglot (cbfinn/maml: ``utils.conv_block``
  with its default ``max_pool=False``, then ``reduce_mean`` over the spatial dimensions in ``maml.forward_conv``),
  also learn2learn's ``OmniglotCNN`` (``ConvBase(max_pool=False)`` then ``x.mean(dim=[2, 3])``). Four blocks of
  [3x3 conv with stride 2 (64 channels), batch norm, ReLU] take a 28x28 image to 14, 7, 4 and 2 pixels; the
  spatial mean gives 64 features for the linear head.
- ``"max"``: the reference's choice for MiniImagenet, used here for Omniglot before: [3x3 conv with stride 1 and
  padding 1, batch norm, ReLU, 2x2 max-pool] (28 -> 14 -> 7 -> 3 -> 1), flattened. It costs about 3x the
  arithmetic of the strided network and gives the same parameter count (112,261 for 5-way), so checkpoints record
  which variant they hold.

Batch norm is in the reference code's *transductive* mode: it always normalises with the statistics of the batch
it is given (support and query sets separately) and keeps no running statistics, at meta-training and test time.

Deviations from the reference, on purpose:

- Padding: TensorFlow's 'SAME' pads a stride-2 conv on 28x28 by 0 before and 1 after; PyTorch's ``padding=1`` is
  symmetric (as learn2learn). The feature-map sizes are the same.
- Batch norm: the reference's ``tf.contrib.layers.batch_norm`` has an offset but no scale, and the offsets are
  meta-learned only (not adapted in the inner loop). Here the scale exists (initialised to 1, as learn2learn's
  affine batch norm; learn2learn draws it from U[0, 1]) and every parameter is adapted in the inner loop, as in
  learn2learn. The epsilon is the reference's 1e-3.
- Initialisation (stride variant) is the reference's: Xavier-uniform conv filters, zero biases, head weights from
  N(0, 1), zero head bias. The ``max`` variant keeps the initialisation it was run with here before (head weights
  N(0, 0.01²), batch-norm epsilon 1e-5), so its earlier results stay reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv4", "POOLS", "cross_entropy_loss", "accuracy"]

POOLS = ("stride", "max")


class Conv4(nn.Module):
    """conv4 with transductive batch norm; call it as ``logits(params, x)`` (or through ``functional_call``).

    Args:
        ways: number of output classes (N).
        channels: filters per conv layer (64 for Omniglot in the MAML paper).
        in_channels: 1 for Omniglot.
        pool: ``"stride"`` (the MAML reference's Omniglot network) or ``"max"`` (see the module docstring).
    """

    def __init__(self, ways: int, channels: int = 64, in_channels: int = 1, pool: str = "stride"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Conv4: pool={pool!r}; use one of {POOLS}.")
        self.pool = pool
        stride = 2 if pool == "stride" else 1
        self.eps = 1e-3 if pool == "stride" else 1e-5
        self.convs = nn.ModuleList(nn.Conv2d(c, channels, 3, stride=stride, padding=1)
                                   for c in (in_channels,) + (channels,) * 3)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, eps=self.eps, track_running_stats=False) for _ in range(4))
        self.head = nn.Linear(channels, ways)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.head.weight, std=1.0 if pool == "stride" else 0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same function as `logits`, through the layers themselves: libraries that patch a module's weights
        # (functional_call, higher, learn2learn's clone) run this one. Tests hold the two equal. Every layer is
        # called, not read: higher's `fmodel(x, params=...)` hands each layer its weights when it is called, so
        # `norm.weight` read here would be the old one. Without running statistics a BatchNorm2d normalises by the
        # batch's, in training and eval mode alike (transductive).
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
            if self.pool == "max":
                x = F.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)) if self.pool == "stride" else x.flatten(1))

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The outputs for images ``x`` with the weights ``params`` (keys as ``init_params``).

        A pure function of its arguments: the module's own parameters are not read or swapped, so it is safe from
        several threads at once (``meta_grad(batching="threads")``) and skips ``functional_call``'s bookkeeping,
        a few percent of a meta-step on 1-shot tasks.
        """
        stride = 2 if self.pool == "stride" else 1
        for i in range(len(self.convs)):
            x = F.conv2d(x, params[f"convs.{i}.weight"], params[f"convs.{i}.bias"], stride=stride, padding=1)
            # Batch statistics always (training=True, no running stats): transductive, as the MAML reference.
            x = F.relu(F.batch_norm(x, None, None, params[f"norms.{i}.weight"], params[f"norms.{i}.bias"],
                                    training=True, eps=self.eps))
            if self.pool == "max":
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3)) if self.pool == "stride" else x.flatten(1)
        return F.linear(x, params["head.weight"], params["head.bias"])

    def init_params(self) -> dict[str, torch.Tensor]:
        """The initial weights as a detached ``params`` dict."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}


def cross_entropy_loss(model: Conv4):
    """``loss(params, hparams, batch) = CE(model(params, batch[0]), batch[1])``: the few-shot task loss."""

    def loss(params, hparams, batch):
        images, labels = batch
        return F.cross_entropy(model.logits(params, images), labels)

    return loss


def accuracy(model: Conv4, params, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``images`` classified as ``labels`` by ``model`` with weights ``params``."""
    return (model.logits(params, images).argmax(-1) == labels).float().mean()
