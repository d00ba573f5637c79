"""The few types every part of bilevel speaks.

``params`` are the inner variables w (a task model's weights), ``hparams`` the outer variables λ
(hyperparameters, or a meta-initialisation θ). Both are ``dict[str, Tensor]``. A ``batch`` is any pytree of
tensors. Every user function has the one signature ``f(params, hparams, batch)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

Params = dict[str, Tensor]
HParams = dict[str, Tensor]
Batch = Any
LossFn = Callable[[Params, HParams, Batch], Tensor]
"""``inner_loss`` / ``outer_loss``: ``(params, hparams, batch) -> scalar``."""


def default_tol(dtype: torch.dtype) -> float:
    """The relative tolerance every solver uses when ``tol=None``: ``sqrt(eps)`` of the dtype.

    About 3.5e-4 in float32 and 1.5e-8 in float64: what an iterative solve built on gradients and
    Hessian-vector products can reach in each dtype (their round-off is ~eps times the problem's scale, amplified
    by its conditioning), and small enough that an unconverged float64 solve is not called converged.
    """
    return torch.finfo(dtype).eps ** 0.5


class SolveInfo(NamedTuple):
    """How well an iterative solve went. A NamedTuple of tensors, so it passes through ``vmap`` (per task).

    What ``converged`` means, for every solver of the engine (``tol=None`` uses ``default_tol`` of the dtype):

    - inner solvers (``GradientDescent``, ``Adam``): ``||∇_w inner_loss(w)|| <= tol`` (absolute) or
      ``<= rtol · ||∇_w inner_loss(w0)||`` (relative to the start; with neither given, ``rtol = default_tol``);
      ``Implicit`` re-judges it at the returned ``w*``.
    - linear solvers (``CG``, ``TruncatedCG``, ``MINRES``, ``GMRES``, ``NormalCG``, ``Neumann``, ``Dense``):
      ``||b − A x|| <= tol · ||b||``, and never when ``diverged`` or ``nonfinite``.
    - root and fixed-point solvers (``bilevel.root_find``): ``||F(z)|| <= tol``, absolute.

    Attributes:
        steps: iterations actually taken (the masked early stop freezes the count once converged).
        residual: the distance to a solution: the gradient norm ``||∇L(w)||`` for inner solvers, the relative
            residual ``||b − A x|| / ||b||`` for linear solvers, ``||F(z)||`` for root solvers.
        converged: ``residual <= tol`` was reached within the step budget.
        nonfinite: a NaN or inf appeared in the iterate or its residual.
        indefinite: a direction of non-positive curvature (``pᵀAp <= 0``) was met, so the system is not positive
            definite (CG's answer is then unreliable). CG, ``TruncatedCG`` and ``MINRES`` look for it.
        diverged: the iteration made things worse: a relative residual above 1 (worse than ``x = 0``) or, for
            ``Neumann``, a residual that grew. Never counted as converged, whatever ``tol`` says.
        curvature: an eigenvalue estimate of ``A`` met on the way: the smallest Rayleigh quotient ``pᵀAp / pᵀp``
            for CG, ``TruncatedCG`` and ``MINRES`` (negative: indefinite); for ``Neumann``, the largest eigenvalue
            implied by the residual's growth rate when it grew (``alpha`` must stay below ``2 / curvature``), else
            NaN. NaN where not measured.
        scale: the problem's own scale: ``||∇L(w0)||`` for inner solvers, ``||b||`` for linear solvers.
    """

    steps: Tensor
    residual: Tensor
    converged: Tensor
    nonfinite: Tensor
    indefinite: Tensor
    # () where a solver does not report them (the root solvers): an empty pytree node passes through vmap
    diverged: Union[Tensor, tuple] = ()
    curvature: Union[Tensor, tuple] = ()
    scale: Union[Tensor, tuple] = ()


class Hypergrad(NamedTuple):
    """What a hypergradient method returns.

    Attributes:
        grad: d outer_loss / d hparams, a dict with the keys, shapes and dtypes of ``hparams``.
        outer_loss: the outer loss at the inner solution.
        params: the inner solution w*(λ) (detached).
        inner_info: the inner solver's ``SolveInfo``.
        linear_info: the adjoint linear solve's ``SolveInfo`` (implicit methods), else ``None``.
        dropped: ``meta_grad(on_nonfinite="skip_task")`` only: the number of tasks left out of the mean because
            their hypergradient was not finite; ``kept`` says which (a bool per task). ``None`` otherwise.
    """

    grad: HParams
    outer_loss: Tensor
    params: Params
    inner_info: SolveInfo
    linear_info: Optional[SolveInfo] = None
    dropped: Optional[Tensor] = None
    kept: Optional[Tensor] = None
