"""Linear solvers for the adjoint system: ``x ≈ A⁻¹ b`` from matrix-vector products only.

A solver is a frozen dataclass called as ``solver(operator, b) -> (x, SolveInfo)`` where ``operator`` is a
``LinearOperator`` on ``params``-shaped dicts. Every loop has a fixed step budget with a masked early stop, so the
solvers run unchanged under ``vmap`` (one solve per task). ``SolveInfo.residual`` is the relative residual
``||b − A x|| / ||b||``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from . import tree
from .types import SolveInfo, default_tol

Tree = dict


class LinearOperator(NamedTuple):
    """``A`` by its products. ``mv(x) = A x``; ``rmv(x) = Aᵀ x`` (needed by ``NormalCG``); ``symmetric`` says
    whether ``A = Aᵀ`` (stationarity conditions give a symmetric Hessian; fixed-point maps in general do not)."""

    mv: Callable[[Tree], Tree]
    rmv: Optional[Callable[[Tree], Tree]] = None
    symmetric: bool = False


def _tiny(ref: torch.Tensor) -> torch.Tensor:
    # not ref.new_tensor: under vmap that fails on the meta device, which the device tests run on
    return torch.tensor(torch.finfo(ref.dtype).tiny, dtype=ref.dtype, device=ref.device)


def _tol(tol: Optional[float], ref: torch.Tensor) -> float:
    return default_tol(ref.dtype) if tol is None else tol


def _info(steps, x, rnorm, bnorm, tol, indefinite=None, diverged=None, curvature=None) -> SolveInfo:
    """The ``SolveInfo`` of a linear solve from the residual norm ``||b − A x||`` and ``||b||``."""
    false = torch.zeros_like(bnorm, dtype=torch.bool)
    residual = rnorm / torch.clamp(bnorm, min=_tiny(bnorm))
    nonfinite = ~tree.all_finite(x) | ~torch.isfinite(residual)
    # worse than x = 0: whatever tol says, this is not a solution
    diverged = (residual > 1) | (false if diverged is None else diverged)
    converged = (residual <= _tol(tol, bnorm)) & ~nonfinite & ~diverged
    curvature = torch.full_like(bnorm, float("nan")) if curvature is None else curvature
    return SolveInfo(steps, residual, converged, nonfinite, false if indefinite is None else indefinite, diverged,
                     curvature, bnorm)


def _check(name: str, **fields):
    for key, (value, ok, need) in fields.items():
        if not ok(value):
            raise ValueError(f"{name}({key}={value!r}): {key} must be {need}.")


_STEPS = (lambda v: isinstance(v, int) and v >= 0, "a non-negative int")
_NONNEG = (lambda v: v >= 0, ">= 0")
_TOL = (lambda v: v is None or v >= 0, "None (the dtype's default) or >= 0")


def _damped(operator: LinearOperator, damping: float):
    return operator.mv if not damping else (lambda v: tree.axpy(damping, v, operator.mv(v)))


def _require_symmetric(name: str, operator: LinearOperator):
    if not operator.symmetric:
        raise ValueError(f"{name}: the operator is not symmetric (a fixed-point or general root condition); {name} "
                         "would return a wrong answer. Use NormalCG(), GMRES() or Neumann() instead.")


@dataclass(frozen=True)
class CG:
    """Conjugate gradients on ``(A + damping·I) x = b`` for symmetric positive-definite ``A``.

    Damping (iMAML's λ-regularised system, jaxopt's ``ridge``) also rescues a Hessian that is indefinite away from a
    minimum: CG on an indefinite system does not converge, and ``SolveInfo.indefinite`` records the negative
    curvature it met (``curvature``: the smallest ``pᵀAp / pᵀp``). Differences from scipy's ``cg``: a fixed
    budget (``steps``), a relative tolerance, and masked updates instead of a data-dependent ``while`` so that it
    runs under ``vmap``.

    Args:
        steps: maximum iterations (matrix-vector products).
        tol: stop when ``||r|| <= tol·||b||`` (the recursive residual); ``None``: ``default_tol`` of the dtype.
        damping: added to the diagonal.
    """

    steps: int = 10
    tol: Optional[float] = None
    damping: float = 0.0

    def __post_init__(self):
        _check(type(self).__name__, steps=(self.steps, *_STEPS), tol=(self.tol, *_TOL),
               damping=(self.damping, *_NONNEG))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        _require_symmetric(type(self).__name__, operator)
        return _cg(_damped(operator, self.damping), b, self.steps, self.tol)


@dataclass(frozen=True)
class TruncatedCG(CG):
    """CG that stops at the first direction of non-positive curvature and returns its last iterate, as the inner
    loop of Newton-CG / Steihaug's method (Nocedal & Wright, Algorithm 7.1): on an indefinite system it returns the
    minimiser of the quadratic over the Krylov space built so far instead of following a direction that makes
    things worse. ``SolveInfo.indefinite`` says it stopped there and ``curvature`` holds the curvature met.

    Deviation from Algorithm 7.1: when the very first direction (``b``) has negative curvature, Newton-CG returns
    ``b`` itself; here the step along ``b`` is scaled by ``|bᵀAb|`` (``x = (bᵀb / |bᵀAb|) b``), so the answer keeps
    the units of ``A⁻¹ b`` (a hypergradient, not a descent direction of unknown length).
    """

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        _require_symmetric(type(self).__name__, operator)
        return _cg(_damped(operator, self.damping), b, self.steps, self.tol, truncate=True)


def _cg(mv, b, steps, tol, truncate=False):
    x, r, p = tree.zeros_like(b), b, b
    rs = tree.vdot(r, r)
    bnorm = torch.sqrt(rs)
    tol = _tol(tol, bnorm)
    count = rs.new_zeros((), dtype=torch.long)
    done = bnorm <= 0  # b = 0: x = 0 is exact
    indefinite = torch.zeros_like(done)
    curvature = torch.full_like(rs, float("inf"))
    for k in range(steps):
        ap = mv(p)
        pap = tree.vdot(p, ap)
        curvature = torch.where(done, curvature,
                                torch.minimum(curvature, pap / torch.clamp(tree.vdot(p, p), min=_tiny(rs))))
        negative = ~done & (pap <= 0)
        indefinite = indefinite | negative
        if truncate:
            if k > 0:
                done = done | negative  # keep the last iterate: the quadratic is unbounded along p
            pap = pap.abs()
        alpha = rs / torch.where(pap == 0, torch.ones_like(pap), pap)
        x_new, r_new = tree.axpy(alpha, p, x), tree.axpy(-alpha, ap, r)
        rs_new = tree.vdot(r_new, r_new)
        p_new = tree.axpy(rs_new / torch.clamp(rs, min=_tiny(rs)), p, r_new)
        x, r, p = tree.where(done, x, x_new), tree.where(done, r, r_new), tree.where(done, p, p_new)
        rs = torch.where(done, rs, rs_new)
        count = count + (~done).long()
        done = done | (torch.sqrt(rs) <= tol * bnorm)
        if truncate and k == 0:
            done = done | negative
    curvature = torch.where(torch.isinf(curvature), torch.full_like(curvature, float("nan")), curvature)
    return x, _info(count, x, torch.sqrt(rs), bnorm, tol, indefinite, curvature=curvature)


@dataclass(frozen=True)
class MINRES:
    """MINRES (Paige & Saunders, 1975): minimise ``||b − (A + damping·I) x||`` over the Krylov space, for symmetric
    ``A`` that may be indefinite (a Hessian away from a minimum), with short Lanczos recurrences: one product and a
    handful of vectors per step, unlike GMRES whose memory grows with the steps.

    The recurrences are those of scipy's ``minres`` without preconditioner or shift. Differences: a fixed budget
    with masked updates (vmap-safe), the relative residual ``||r|| / ||b||`` from the recurrence (``phibar``, no
    extra product) as the stopping and convergence measure, ``curvature`` = the smallest Lanczos Rayleigh quotient
    ``vᵀAv`` met, and ``indefinite`` set where CG would meet ``pᵀAp <= 0`` (a non-positive pivot of the Lanczos
    matrix's LDLᵀ, free from the recurrence). The residual never grows, so MINRES cannot diverge; on a
    singular or nearly singular system it stalls instead.

    Args:
        steps: maximum iterations (matrix-vector products).
        tol: stop when ``||r|| <= tol·||b||``; ``None``: ``default_tol`` of the dtype.
        damping: added to the diagonal.
    """

    steps: int = 10
    tol: Optional[float] = None
    damping: float = 0.0

    def __post_init__(self):
        _check("MINRES", steps=(self.steps, *_STEPS), tol=(self.tol, *_TOL), damping=(self.damping, *_NONNEG))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        _require_symmetric("MINRES", operator)
        mv = _damped(operator, self.damping)
        beta1 = tree.norm(b)
        tol, tiny = _tol(self.tol, beta1), _tiny(beta1)
        zero = torch.zeros_like(beta1)
        x, w, w2, r1, r2, y = (tree.zeros_like(b), tree.zeros_like(b), tree.zeros_like(b), b, b, b)
        oldb, beta, dbar, epsln, phibar, cs, sn = zero, beta1, zero, zero, beta1, -torch.ones_like(beta1), zero
        count = beta1.new_zeros((), dtype=torch.long)
        done = beta1 <= 0
        curvature = torch.full_like(beta1, float("inf"))
        # pivots of the LDLᵀ of the Lanczos matrix: one is <= 0 exactly where CG would meet pᵀAp <= 0
        pivot, indefinite = torch.ones_like(beta1), torch.zeros_like(done)
        for k in range(self.steps):
            v = tree.scale(1 / torch.clamp(beta, min=tiny), y)
            y_new = mv(v)
            if k > 0:
                y_new = tree.axpy(-beta / torch.clamp(oldb, min=tiny), r1, y_new)
            alfa = tree.vdot(v, y_new)
            pivot_new = alfa if k == 0 else alfa - beta ** 2 / torch.where(pivot == 0, tiny, pivot)
            y_new = tree.axpy(-alfa / torch.clamp(beta, min=tiny), r2, y_new)
            beta_new = tree.norm(y_new)
            # the rotation that keeps the tridiagonal least-squares problem triangular
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln_new, dbar_new = sn * beta_new, -cs * beta_new
            gamma = torch.clamp(torch.hypot(gbar, beta_new), min=tiny)
            cs_new, sn_new = gbar / gamma, beta_new / gamma
            phi = cs_new * phibar
            w_new = tree.scale(1 / gamma, tree.sub(tree.sub(v, tree.scale(epsln, w2)), tree.scale(delta, w)))
            x_new = tree.axpy(phi, w_new, x)
            keep = lambda old, new: torch.where(done, old, new)  # noqa: E731
            curvature = keep(curvature, torch.minimum(curvature, alfa))
            indefinite = indefinite | (~done & ((pivot_new <= 0) | (alfa <= 0)))
            pivot = keep(pivot, pivot_new)
            x, w2, w = tree.where(done, x, x_new), tree.where(done, w2, w), tree.where(done, w, w_new)
            r1, r2, y = tree.where(done, r1, r2), tree.where(done, r2, y_new), tree.where(done, y, y_new)
            oldb, beta = keep(oldb, beta), keep(beta, beta_new)
            epsln, dbar, cs, sn = keep(epsln, epsln_new), keep(dbar, dbar_new), keep(cs, cs_new), keep(sn, sn_new)
            phibar = keep(phibar, sn_new * phibar)
            count = count + (~done).long()
            done = done | (phibar <= tol * beta1)
        curvature = torch.where(torch.isinf(curvature), torch.full_like(curvature, float("nan")), curvature)
        return x, _info(count, x, phibar, beta1, tol, indefinite, curvature=curvature)


@dataclass(frozen=True)
class NormalCG:
    """CG on the normal equations ``AᵀA x = Aᵀ b``: any invertible ``A`` (non-symmetric Jacobians of fixed-point
    maps), at two products per iteration and a squared condition number. ``residual`` is that of ``A x = b``
    (checked with one more product); ``tol=None``: ``default_tol`` of the dtype."""

    steps: int = 20
    tol: Optional[float] = None

    def __post_init__(self):
        _check("NormalCG", steps=(self.steps, *_STEPS), tol=(self.tol, *_TOL))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        if operator.rmv is None:
            raise ValueError("NormalCG: the operator has no transpose product (rmv).")
        bnorm = tree.norm(b)
        tol = _tol(self.tol, bnorm)
        x, info = _cg(lambda v: operator.rmv(operator.mv(v)), operator.rmv(b), self.steps, tol ** 2)
        return x, _info(info.steps, x, tree.norm(tree.sub(b, operator.mv(x))), bnorm, tol)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j=0}^{K} (I − αA)^j b`` (Lorraine et al., 2020,
    https://arxiv.org/abs/1911.02590), computed as K Richardson steps ``x ← x + α (b − A x)`` from ``x = αb``.

    It converges iff every eigenvalue of ``I − αA`` lies inside the unit disc; for a Hessian with largest eigenvalue
    L that means ``0 < α < 2/L``. ``steps=0`` is the Jacobian-free (zeroth-order) approximation ``A⁻¹ ≈ αI``.

    Divergence is detected for free from the residuals the series computes anyway: a relative residual above 1, or
    one that grew from the first step to the last, sets ``diverged`` (never converged). The growth rate ρ of the
    last two residuals then estimates the largest eigenvalue, ``L ≈ (1 + ρ)/α`` (for positive-definite ``A``),
    reported as ``curvature`` and in the warning.

    Args:
        steps: K, the number of matrix-vector products.
        alpha: α.
        tol: the relative residual that counts as converged. ``None`` (the default): ``default_tol`` of the dtype,
            judged at the end on the residual of the previous iterate (free, and for a convergent series an upper
            bound on that of the returned one), with no early stop. An explicit ``tol`` also stops early once
            reached and checks the returned iterate with one more product. ``float("inf")`` treats the truncated
            series as the method itself (no convergence target; divergence is still reported). With ``steps=0``
            there is no residual to judge unless ``tol`` is given.
    """

    steps: int = 20
    alpha: float = 0.1
    tol: Optional[float] = None

    def __post_init__(self):
        _check("Neumann", steps=(self.steps, *_STEPS), alpha=(self.alpha, lambda v: v > 0, "> 0"),
               tol=(self.tol, *_TOL))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        bnorm = tree.norm(b)
        tol = _tol(self.tol, bnorm)
        stop = self.tol is not None and self.tol != float("inf")  # an explicit target: early stop, exact check
        x, rnorm = tree.scale(self.alpha, b), bnorm  # rnorm: the residual of the previous iterate (x = 0)
        count = bnorm.new_zeros((), dtype=torch.long)
        done = bnorm <= 0
        first = prev = None
        for k in range(self.steps):
            r = tree.sub(b, operator.mv(x))
            if stop or k in (0, self.steps - 2, self.steps - 1):  # norms only where they are read
                prev, rnorm = rnorm, tree.norm(r)
                first = rnorm if k == 0 else first
            if stop:
                done = done | (rnorm <= tol * bnorm)
                x = tree.where(done, x, tree.axpy(self.alpha, r, x))
            else:
                x = tree.axpy(self.alpha, r, x)
            count = count + (~done).long()
        if self.steps == 0 and self.tol is None:
            # nothing measured: the zeroth-order term is the method (JFB); report the residual of x = 0
            false = torch.zeros_like(done)
            return x, SolveInfo(count, torch.ones_like(bnorm), tree.all_finite(x), ~tree.all_finite(x), false,
                                false, torch.full_like(bnorm, float("nan")), bnorm)
        if stop or self.steps == 0:
            prev, rnorm = rnorm, tree.norm(tree.sub(b, operator.mv(x)))
        grew = (rnorm > first) if self.steps >= 2 else torch.zeros_like(done)
        rate = rnorm / torch.clamp(prev, min=_tiny(bnorm)) if self.steps >= 2 else torch.zeros_like(bnorm)
        curvature = torch.where(rate > 1, (1 + rate) / self.alpha, torch.full_like(rate, float("nan")))
        return x, _info(count, x, rnorm, bnorm, tol, diverged=grew, curvature=curvature)


def fixed_point_iteration(steps: int = 50, tol: Optional[float] = None) -> Neumann:
    """``x ← (I − A) x + b``: the adjoint fixed-point iteration of a contractive map (``A = I − ∂T/∂w``), which is
    Neumann with ``α = 1``; divergence (a map that is not contractive) is reported as for ``Neumann``."""
    return Neumann(steps=steps, alpha=1.0, tol=tol)


@dataclass(frozen=True)
class GMRES:
    """GMRES without restarts: minimise ``||b − A x||`` over the Krylov space of dimension ``steps`` (Arnoldi with
    modified Gram-Schmidt). For non-symmetric or indefinite systems; memory grows with ``steps``. A fixed budget:
    ``tol`` (``None``: ``default_tol`` of the dtype) only judges the true residual, checked with one more product."""

    steps: int = 20
    tol: Optional[float] = None

    def __post_init__(self):
        _check("GMRES", steps=(self.steps, *_STEPS), tol=(self.tol, *_TOL))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        flat_b = tree.flatten(b)
        beta = torch.linalg.vector_norm(flat_b)
        count = beta.new_zeros((), dtype=torch.long)
        if self.steps == 0:
            return tree.zeros_like(b), _info(count, tree.zeros_like(b), beta, beta, self.tol)
        mv = lambda v: tree.flatten(operator.mv(tree.unflatten(v, b)))  # noqa: E731
        basis = [flat_b / torch.clamp(beta, min=_tiny(beta))]
        columns = []  # of the (steps+1) x steps Hessenberg matrix
        for j in range(self.steps):
            w = mv(basis[j])
            scale = torch.linalg.vector_norm(w)
            column = [torch.zeros_like(scale) for _ in basis]
            for _ in range(2):  # modified Gram-Schmidt, twice: one pass loses orthogonality ("twice is enough")
                for i, v in enumerate(basis):
                    h = torch.dot(w, v)
                    w = w - h * v
                    column[i] = column[i] + h
            h_next = torch.linalg.vector_norm(w)
            # breakdown: what is left of A v_j after orthogonalisation is round-off (relative to ||A v_j||), so the
            # Krylov space is invariant and the solution already exact; normalising the round-off would add a
            # spurious direction, so the basis gets a zero vector instead
            alive = h_next > 64 * torch.finfo(h_next.dtype).eps * scale
            h_next = torch.where(alive, h_next, torch.zeros_like(h_next))
            column += [h_next] + [torch.zeros_like(h_next)] * (self.steps - j - 1)
            columns.append(torch.stack(column))
            basis.append(torch.where(alive, w / torch.where(alive, h_next, torch.ones_like(h_next)),
                                     torch.zeros_like(w)))
            count = count + 1
        hess = torch.stack(columns, dim=-1)
        rhs = torch.cat([beta.reshape(1), beta.new_zeros(self.steps)])
        y = torch.linalg.pinv(hess) @ rhs  # SVD-based: robust to the zero columns a breakdown leaves
        x = tree.unflatten(torch.stack(basis[:-1], dim=-1) @ y, b)
        return x, _info(count, x, tree.norm(tree.sub(b, operator.mv(x))), beta, self.tol)


@dataclass(frozen=True)
class Dense:
    """Materialise ``A`` column by column (one product per unknown) and solve with ``torch.linalg.solve``.
    Exact up to round-off: the reference in tests and ``check_hypergrad``; only for small problems. ``tol``
    (``None``: ``default_tol`` of the dtype) judges the residual of the solve."""

    damping: float = 0.0
    tol: Optional[float] = None

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        flat_b = tree.flatten(b)
        n = flat_b.numel()
        # a loop, not vmap over the identity: batching cotangents is wrong through batch norm (repro/bn_vmap_grad)
        columns = [tree.flatten(operator.mv(tree.unflatten(e, b))) for e in torch.eye(n, dtype=flat_b.dtype,
                                                                                        device=flat_b.device)]
        matrix = torch.stack(columns, dim=-1) + self.damping * torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
        x = tree.unflatten(torch.linalg.solve(matrix, flat_b), b)
        r = tree.sub(b, tree.axpy(self.damping, x, operator.mv(x)))
        return x, _info(flat_b.new_tensor(n, dtype=torch.long), x, tree.norm(r), tree.norm(b), self.tol)
