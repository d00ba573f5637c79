"""The regression network of Finn et al. (2017) for sinusoids: 1 → 40 → 40 → 1, ReLU, no normalisation.

As the MAML reference code (cbfinn/maml, ``maml.construct_fc_weights`` / ``forward_fc`` with ``--norm=None``) and
its loss ``utils.mse`` (mean squared error over the points of a task). Initialisation, ``init``:

- ``"torch"`` (the shipped configs): PyTorch's ``nn.Linear`` default, U(−1/√fan_in, 1/√fan_in) for weights and
  biases, as learn2learn's sine example. A deviation from the reference, on purpose: with the reference's
  N(0, 0.01²) weights and zero biases the network starts almost flat (hidden gradients ~1e-4 of the output
  layer's), which the reference's 70,000 meta-steps absorb but a budget of a few thousand does not.
- ``"maml"``: the reference's truncated normal (std 0.01) weights, zero biases.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["SineMLP", "INITS", "mse_loss"]

INITS = ("torch", "maml")


class SineMLP(nn.Module):
    """``x [.., 1] -> y [.., 1]``; call it through :func:`torch.func.functional_call` with a params dict.

    Args:
        hidden: widths of the hidden ReLU layers (``(40, 40)`` in the paper).
        init: ``"torch"`` or ``"maml"`` (see the module docstring).
    """

    def __init__(self, hidden=(40, 40), init: str = "torch"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"SineMLP: init={init!r}; use one of {INITS}.")
        if not hidden or min(hidden) < 1:
            raise ValueError(f"SineMLP: hidden={list(hidden)} needs at least one layer, each of width >= 1.")
        widths = (1, *hidden, 1)
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        if init == "maml":
            with torch.no_grad():
                for layer in self.net:
                    if isinstance(layer, nn.Linear):
                        nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)  # TF: cut at 2 std
                        layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def init_params(self) -> dict[str, torch.Tensor]:
        """Fresh leaf tensors (``requires_grad=True``) holding the current weights: the meta-parameters θ."""
        return {k: v.detach().clone().requires_grad_(True) for k, v in self.named_parameters()}


def mse_loss(model: SineMLP):
    """``(params, hparams, batch) -> mean squared error`` on ``batch = (x, y)``, the task loss of every method."""
    def loss(params, hparams, batch):
        x, y = batch
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()
    return loss
