"""The few types every part of bilevel speaks.

``params`` are the inner variables w (a task model's weights), ``hparams`` the outer variables λ
(hyperparameters, or a meta-initialisation θ). Both are ``dict[str, Tensor]``. A ``batch`` is any pytree of
tensors. Every user function has the one signature ``f(params, hparams, batch)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from torch import Tensor

Params = dict[str, Tensor]
HParams = dict[str, Tensor]
Batch = Any
LossFn = Callable[[Params, HParams, Batch], Tensor]
"""``inner_loss`` / ``outer_loss``: ``(params, hparams, batch) -> scalar``."""


class SolveInfo(NamedTuple):
    """How well an iterative solve went. A NamedTuple of tensors, so it passes through ``vmap`` (per task).

    Attributes:
        steps: iterations actually taken (the masked early stop freezes the count once converged).
        residual: the solver's measure of distance to a solution: gradient norm for inner solvers, relative
            residual ``||b - A x|| / ||b||`` for linear solvers, ``||F(w)||`` for root and fixed-point solvers.
        converged: ``residual <= tol`` was reached within the step budget.
        nonfinite: a NaN or inf appeared in the iterate or its residual.
        indefinite: a direction of non-positive curvature (``pᵀAp <= 0``) was met, so the system is not positive
            definite and CG's answer is unreliable. Only CG looks for it; other solvers report ``False``.
    """

    steps: Tensor
    residual: Tensor
    converged: Tensor
    nonfinite: Tensor
    indefinite: Tensor


class Hypergrad(NamedTuple):
    """What a hypergradient method returns.

    Attributes:
        grad: d outer_loss / d hparams, a dict with the keys, shapes and dtypes of ``hparams``.
        outer_loss: the outer loss at the inner solution.
        params: the inner solution w*(λ) (detached).
        inner_info: the inner solver's ``SolveInfo``.
        linear_info: the adjoint linear solve's ``SolveInfo`` (implicit methods), else ``None``.
    """

    grad: HParams
    outer_loss: Tensor
    params: Params
    inner_info: SolveInfo
    linear_info: Optional[SolveInfo] = None

