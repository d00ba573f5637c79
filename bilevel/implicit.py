"""The implicit function theorem: one vector-Jacobian product of a solution, for every implicit method."""

from __future__ import annotations

from typing import Callable

from torch.func import jvp, vjp

from . import tree
from .conditions import Condition
from .linear_solve import LinearOperator
from .types import Batch, HParams, Params, SolveInfo


def root_vjp(condition: Condition, params: Params, hparams: HParams, batch: Batch, cotangent: Params,
             linear_solver: Callable, hvp: str = "rev") -> tuple[HParams, SolveInfo, Params]:
    r"""Pull a cotangent on the solution w*(λ) of ``F(w, λ) = 0`` back to λ.

    Differentiating ``F(w*(λ), λ) = 0`` gives ``∂w*/∂λ = −A⁻¹ B`` with ``A = ∂F/∂w`` and ``B = ∂F/∂λ`` at ``w*``.
    For a cotangent ``ḡ`` on ``w*``:

        ḡᵀ ∂w*/∂λ = uᵀ B,   where   Aᵀ u = −ḡ,

    so one linear solve (with ``linear_solver``, from products with ``Aᵀ`` only) and one VJP in λ. The result is
    the derivative of the *exact* solution: it is only as good as ``F(params) ≈ 0`` and the linear solve, which is
    why both residuals are returned.

    Args:
        condition: the optimality condition (``stationarity``, ``fixed_point``, or your own ``Condition``).
        params: the solution w* (detached).
        hparams: λ.
        batch: data the condition depends on.
        cotangent: ḡ, with the structure of ``params``.
        linear_solver: ``(LinearOperator, b) -> (x, SolveInfo)``, e.g. ``CG()``.
        hvp: how products with ``Aᵀ`` are formed. ``"rev"`` (default) builds the VJP of ``F`` once and reuses its
            graph for every product (reverse-over-reverse for a stationarity condition); ``"fwd"`` takes a JVP
            per product (forward-over-reverse, symmetric ``A`` only). On the conv4 Omniglot network (CPU, torch
            2.13) a reused VJP costs 1.7-2.4 gradients per product and a fresh JVP 3.6-3.9
            (``benchmarks/hvp_ratio.py``); ``torch.func.linearize`` takes seconds to build and has no vmap rule.

    Returns:
        ``(hparams cotangent uᵀB, SolveInfo of the linear solve, F(params))``; ``F(params)`` is the residual of the
        condition at the given solution, a free by-product of the VJP.
    """
    if hvp not in ("rev", "fwd"):
        raise ValueError(f"root_vjp(hvp={hvp!r}): hvp must be 'rev' or 'fwd'.")
    if hvp == "fwd" and not condition.symmetric:
        raise ValueError(f"root_vjp(hvp='fwd'): forward-mode products give A v, not Aᵀ v; the {condition.name} "
                         "condition is not symmetric. Use hvp='rev'.")

    def f_params(w):
        return condition.fn(w, hparams, batch)

    residual, vjp_params = vjp(f_params, params)
    if not isinstance(residual, dict) or residual.keys() != params.keys():
        got = sorted(residual) if isinstance(residual, dict) else type(residual).__name__
        raise ValueError(f"root_vjp: {condition.name}(params, hparams, batch) returned {got}, expected a dict with the "
                         f"params keys {sorted(params)}.")

    def a_mv(v):  # A v
        return jvp(f_params, (params,), (v,))[1]

    def at_mv(v):  # Aᵀ v, reusing the graph built above
        return vjp_params(v)[0]

    operator = LinearOperator(mv=a_mv if hvp == "fwd" else at_mv, rmv=a_mv, symmetric=condition.symmetric)
    u, info = linear_solver(operator, tree.neg(cotangent))
    _, vjp_hparams = vjp(lambda h: condition.fn(params, h, batch), hparams)
    return vjp_hparams(u)[0], info, residual
