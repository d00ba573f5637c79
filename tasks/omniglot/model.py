"""The conv4 network of Finn et al. (2017) and the few-shot losses on it.

Four blocks of [3x3 conv (64 channels, padding 1), batch norm, ReLU, 2x2 max-pool] take a 28x28 image to 64
features, followed by a linear head. Batch norm is in the MAML reference code's *transductive* mode: it always
normalises with the statistics of the batch it is given (support and query sets separately) and keeps no running
statistics, at meta-training and at test time alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["Conv4", "cross_entropy_loss", "accuracy"]


class Conv4(nn.Module):
    """conv4 with transductive batch norm; call it through :func:`torch.func.functional_call`.

    Args:
        ways: number of output classes (N).
        channels: filters per conv layer (64 for Omniglot in the MAML paper).
        in_channels: 1 for Omniglot.
    """

    def __init__(self, ways: int, channels: int = 64, in_channels: int = 1):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, channels, 3, padding=1) for c in (in_channels,) + (channels,) * 3)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, track_running_stats=False) for _ in range(4))
        self.head = nn.Linear(channels, ways)
        # Initialisation of the MAML reference code: Xavier conv filters, zero biases, small head weights.
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            # Batch statistics always (training=True, no running stats): transductive, as the MAML reference.
            x = F.batch_norm(conv(x), None, None, norm.weight, norm.bias, training=True, eps=1e-5)
            x = F.max_pool2d(F.relu(x), 2)
        return self.head(x.flatten(1))

    def init_params(self) -> dict[str, torch.Tensor]:
        """The initial weights as a detached ``params`` dict."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}


def cross_entropy_loss(model: nn.Module):
    """``loss(params, hparams, batch) = CE(model(params, batch[0]), batch[1])``: the few-shot task loss."""

    def loss(params, hparams, batch):
        images, labels = batch
        return F.cross_entropy(functional_call(model, params, (images,)), labels)

    return loss


def accuracy(model: nn.Module, params, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``images`` classified as ``labels`` by ``model`` with weights ``params``."""
    return (functional_call(model, params, (images,)).argmax(-1) == labels).float().mean()
