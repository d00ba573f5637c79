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
from .types import SolveInfo

Tree = dict


class LinearOperator(NamedTuple):
    """``A`` by its products. ``mv(x) = A x``; ``rmv(x) = Aᵀ x`` (needed by ``NormalCG``); ``symmetric`` says
    whether ``A = Aᵀ`` (stationarity conditions give a symmetric Hessian; fixed-point maps in general do not)."""

    mv: Callable[[Tree], Tree]
    rmv: Optional[Callable[[Tree], Tree]] = None
    symmetric: bool = False


def _tiny(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_tensor(torch.finfo(ref.dtype).tiny)


def _info(steps, x, r, bnorm, tol, indefinite=None) -> SolveInfo:
    indefinite = torch.zeros_like(bnorm, dtype=torch.bool) if indefinite is None else indefinite
    residual = tree.norm(r) / torch.clamp(bnorm, min=_tiny(bnorm))
    converged = residual <= tol if tol is not None else torch.isfinite(residual)
    nonfinite = ~tree.all_finite(x) | ~torch.isfinite(residual)
    return SolveInfo(steps, residual, converged & ~nonfinite, nonfinite, indefinite)


def _check(name: str, **fields):
    for key, (value, ok, need) in fields.items():
        if not ok(value):
            raise ValueError(f"{name}({key}={value!r}): {key} must be {need}.")


_STEPS = (lambda v: isinstance(v, int) and v >= 0, "a non-negative int")
_NONNEG = (lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class CG:
    """Conjugate gradients on ``(A + damping·I) x = b`` for symmetric positive-definite ``A``.

    Damping (iMAML's λ-regularised system, jaxopt's ``ridge``) also rescues a Hessian that is indefinite away from a
    minimum: CG on an indefinite system does not converge, and ``SolveInfo.indefinite`` records the negative
    curvature it met. Differences from scipy's ``cg``: a fixed budget (``steps``), a relative tolerance, and
    masked updates instead of a data-dependent ``while`` so that it runs under ``vmap``.

    Args:
        steps: maximum iterations (matrix-vector products).
        tol: stop when ``||r|| <= tol·||b||``.
        damping: added to the diagonal.
    """

    steps: int = 10
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self):
        _check("CG", steps=(self.steps, *_STEPS), tol=(self.tol, *_NONNEG), damping=(self.damping, *_NONNEG))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        if not operator.symmetric:
            raise ValueError("CG: the operator is not symmetric (a fixed-point or general root condition); CG would "
                             "return a wrong answer. Use NormalCG(), GMRES() or Neumann() instead.")
        mv = operator.mv if not self.damping else (lambda v: tree.axpy(self.damping, v, operator.mv(v)))
        return _cg(mv, b, self.steps, self.tol)


def _cg(mv, b, steps, tol):
    x, r, p = tree.zeros_like(b), b, b
    rs = tree.vdot(r, r)
    bnorm = torch.sqrt(rs)
    count = rs.new_zeros((), dtype=torch.long)
    done = bnorm <= 0  # b = 0: x = 0 is exact
    indefinite = torch.zeros_like(done)
    for _ in range(steps):
        ap = mv(p)
        pap = tree.vdot(p, ap)
        indefinite = indefinite | (~done & (pap <= 0))
        alpha = rs / torch.where(pap == 0, torch.ones_like(pap), pap)
        x_new, r_new = tree.axpy(alpha, p, x), tree.axpy(-alpha, ap, r)
        rs_new = tree.vdot(r_new, r_new)
        p_new = tree.axpy(rs_new / torch.clamp(rs, min=_tiny(rs)), p, r_new)
        x, r, p = tree.where(done, x, x_new), tree.where(done, r, r_new), tree.where(done, p, p_new)
        rs = torch.where(done, rs, rs_new)
        count = count + (~done).long()
        done = done | (torch.sqrt(rs) <= tol * bnorm)
    return x, _info(count, x, r, bnorm, tol, indefinite)


@dataclass(frozen=True)
class NormalCG:
    """CG on the normal equations ``AᵀA x = Aᵀ b``: any invertible ``A`` (non-symmetric Jacobians of fixed-point
    maps), at two products per iteration and a squared condition number. ``residual`` is that of ``A x = b``."""

    steps: int = 20
    tol: float = 1e-10

    def __post_init__(self):
        _check("NormalCG", steps=(self.steps, *_STEPS), tol=(self.tol, *_NONNEG))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        if operator.rmv is None:
            raise ValueError("NormalCG: the operator has no transpose product (rmv).")
        x, info = _cg(lambda v: operator.rmv(operator.mv(v)), operator.rmv(b), self.steps, self.tol ** 2)
        r = tree.sub(b, operator.mv(x))
        return x, _info(info.steps, x, r, tree.norm(b), self.tol)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j=0}^{K} (I − αA)^j b`` (Lorraine et al., 2020,
    https://arxiv.org/abs/1911.02590), computed as K Richardson steps ``x ← x + α (b − A x)`` from ``x = αb``.

    It converges iff every eigenvalue of ``I − αA`` lies inside the unit disc; for a Hessian with largest eigenvalue
    L that means ``0 < α < 2/L``. ``steps=0`` is the Jacobian-free (zeroth-order) approximation ``A⁻¹ ≈ αI``.

    Args:
        steps: K, the number of matrix-vector products.
        alpha: α.
        tol: if given, stop once the relative residual is below it and judge convergence by it (one more product
            checks the returned iterate). ``None`` (the default) treats the truncated series as the method itself:
            no stop, no convergence target, and ``residual`` is that of the previous iterate (free).
    """

    steps: int = 20
    alpha: float = 0.1
    tol: Optional[float] = None

    def __post_init__(self):
        _check("Neumann", steps=(self.steps, *_STEPS), alpha=(self.alpha, lambda v: v > 0, "> 0"))
        if self.tol is not None:
            _check("Neumann", tol=(self.tol, *_NONNEG))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        bnorm = tree.norm(b)
        x, r = tree.scale(self.alpha, b), b  # r is the residual of the previous iterate (x = 0)
        count = bnorm.new_zeros((), dtype=torch.long)
        done = bnorm <= 0
        for _ in range(self.steps):
            r_new = tree.sub(b, operator.mv(x))
            if self.tol is not None:
                done = done | (tree.norm(r_new) <= self.tol * bnorm)
            x, r = tree.where(done, x, tree.axpy(self.alpha, r_new, x)), tree.where(done, r, r_new)
            count = count + (~done).long()
        if self.tol is not None and self.steps > 0:
            r = tree.sub(b, operator.mv(x))
        return x, _info(count, x, r, bnorm, self.tol)


def fixed_point_iteration(steps: int = 50, tol: Optional[float] = 1e-10) -> Neumann:
    """``x ← (I − A) x + b``: the adjoint fixed-point iteration of a contractive map (``A = I − ∂T/∂w``), which is
    Neumann with ``α = 1``."""
    return Neumann(steps=steps, alpha=1.0, tol=tol)


@dataclass(frozen=True)
class GMRES:
    """GMRES without restarts: minimise ``||b − A x||`` over the Krylov space of dimension ``steps`` (Arnoldi with
    modified Gram-Schmidt). For non-symmetric or indefinite systems; memory grows with ``steps``."""

    steps: int = 20
    tol: float = 1e-10

    def __post_init__(self):
        _check("GMRES", steps=(self.steps, *_STEPS), tol=(self.tol, *_NONNEG))

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        flat_b = tree.flatten(b)
        beta = torch.linalg.vector_norm(flat_b)
        count = beta.new_zeros((), dtype=torch.long)
        if self.steps == 0:
            return tree.zeros_like(b), _info(count, tree.zeros_like(b), b, beta, self.tol)
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
        return x, _info(count, x, tree.sub(b, operator.mv(x)), beta, self.tol)


@dataclass(frozen=True)
class Dense:
    """Materialise ``A`` column by column (one product per unknown) and solve with ``torch.linalg.solve``.
    Exact up to round-off: the reference in tests and ``check_hypergrad``; only for small problems."""

    damping: float = 0.0

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        flat_b = tree.flatten(b)
        n = flat_b.numel()
        # a loop, not vmap over the identity: batching cotangents is wrong through batch norm (repro/bn_vmap_grad)
        columns = [tree.flatten(operator.mv(tree.unflatten(e, b))) for e in torch.eye(n, dtype=flat_b.dtype,
                                                                                        device=flat_b.device)]
        matrix = torch.stack(columns, dim=-1) + self.damping * torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
        x = tree.unflatten(torch.linalg.solve(matrix, flat_b), b)
        r = tree.sub(b, tree.axpy(self.damping, x, operator.mv(x)))
        return x, _info(flat_b.new_tensor(n, dtype=torch.long), x, r, tree.norm(b), None)
