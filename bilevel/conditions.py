"""Optimality conditions ``F(params, hparams, batch) = 0`` that define the inner solution w*(λ).

Argmins and fixed points are both rewritten as roots (optimistix's ``_rewrite_fn``), so one ``root_vjp`` serves
every implicit method. ``symmetric`` records whether ``∂F/∂w`` is symmetric, which decides the linear solvers
that apply (CG needs it).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from torch.func import grad

from . import tree
from .types import Batch, HParams, LossFn, Params


class Condition(NamedTuple):
    """``fn(params, hparams, batch) -> residual`` with the structure of ``params``; zero at the solution."""

    fn: Callable[[Params, HParams, Batch], Params]
    symmetric: bool
    name: str = "condition"


def stationarity(inner_loss: LossFn) -> Condition:
    """``∇_w inner_loss(w, λ) = 0``: the inner solution is a minimiser. ``∂F/∂w`` is the (symmetric) Hessian.
    With ``inner_loss = proximal(loss, reg)`` this is iMAML's condition ``∇L(w) + reg (w − θ) = 0``."""
    return Condition(grad(inner_loss), True, "stationarity")


def fixed_point(map_fn: Callable[[Params, HParams, Batch], Params]) -> Condition:
    """``w − T(w, λ) = 0``: the inner solution is a fixed point of ``T``. ``∂F/∂w = I − ∂T/∂w`` is not symmetric
    in general: use ``GMRES``, ``NormalCG``, ``Neumann`` or ``fixed_point_iteration`` for the adjoint."""
    return Condition(lambda w, h, b: tree.sub(w, map_fn(w, h, b)), False, "fixed_point")
