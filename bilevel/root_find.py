"""Forward solvers for roots ``F(z, *args) = 0`` and fixed points ``z = f(z, *args)``.

Every solver is a frozen dataclass called as ``solver(fn, z0, *args) -> (z, SolveInfo)`` that finds a root of
``fn``; a fixed point of ``f`` is the root of ``F(z) = z − f(z)`` (``fixed_point_residual(f)``), which is how the
implicit layers call them. ``z`` is one tensor of any shape, treated as a flat vector of ``n`` unknowns.

All solvers run a fixed budget of ``steps`` iterations with a masked early stop (an iterate is frozen once
``||F(z)|| <= tol``), so they run unchanged under ``torch.func.vmap``, one problem per batch entry. Outside
``vmap`` the loop also breaks once the problem has converged, which saves the remaining iterations; it reads
that on the host every ``check_every`` iterations (keyword option of every solver: 1 on the CPU, 8 on an
accelerator, where each read is a device-to-host synchronisation; 0 never reads), with the same result for any
value.
``SolveInfo.residual`` is ``||F(z)||₂`` (absolute) at the returned ``z``. The solvers only report; outside
``vmap``, ``check_solve(info, ...)`` applies the engine's raise / warn / ignore policy (the implicit layers call it).

| solver       | cost per step                | converges                          | use for                   |
|--------------|------------------------------|------------------------------------|---------------------------|
| Picard       | one F                        | linearly, if z − F contracts       | contractive maps          |
| Anderson     | one F + an m×m solve         | faster than Picard, same condition | fixed points, medium n    |
| Newton       | n JVPs + an n×n solve        | quadratically near a root          | small systems (n ≲ 10³)   |
|              | + Armijo search on ‖F‖²      | (the search stops overshoot)       |                           |
| NewtonKrylov | k JVPs (GMRES)               | superlinearly near a root          | large systems             |
| Broyden      | one F + low-rank updates     | superlinearly, no Jacobian needed  | large systems             |
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from . import tree
from .diagnostics import POLICIES, NonConvergenceError, NonFiniteError, _policy
from ._host import _all_true, _cadence, _check_every_ok, _check_now, _under_vmap
from .linear_solve import _NONNEG, _STEPS, GMRES, LinearOperator, _check
from .types import SolveInfo

RootFn = Callable[..., Tensor]
"""``F(z, *args) -> Tensor`` shaped like ``z``; the solvers look for ``F(z, *args) = 0``."""


def fixed_point_residual(f: RootFn) -> RootFn:
    """The root form ``F(z) = z − f(z)`` of the fixed-point problem ``z = f(z, *args)``."""
    return lambda z, *args: z - f(z, *args)


class ConditioningWarning(UserWarning):
    """The derivative of a solution is unreliable: ``∂F/∂z`` is nearly singular there, or the forward solve is too
    loose for the accuracy the backward solve is asked for."""


class _Probe:
    """Wraps a linear solver for the adjoint system ``Aᵀu = −z̄`` and measures, outside ``vmap``, the amplification
    ``||u|| / ||z̄||`` (a lower bound on ``||A⁻¹||``) and ``||A||`` by ``power_steps`` power iterations with
    ``Aᵀ`` (a lower bound too): their product is a lower bound on the condition number of ``A``."""

    def __init__(self, solver: Callable, power_steps: int = 2):
        self.solver, self.power_steps = solver, power_steps
        self.amplification = self.norm = None

    def __call__(self, operator: LinearOperator, b):
        x, info = self.solver(operator, b)
        if not _under_vmap():
            with torch.no_grad():
                bnorm = tree.norm(b)
                if float(bnorm) > 0:
                    self.amplification = float(tree.norm(x) / bnorm)
                    v, norm = tree.scale(1 / bnorm, b), 0.0
                    for _ in range(self.power_steps):
                        w = operator.mv(v)
                        norm = float(tree.norm(w))
                        if not norm > 0:
                            break
                        v = tree.scale(1 / norm, w)
                    self.norm = norm
        return x, info


_WARNED: set = set()  # (what, cause): each is warned once per process, whatever the numbers in the message


def _warn_once(what: str, cause: str, message: str, stacklevel: int):
    if (what, cause) not in _WARNED:
        _WARNED.add((what, cause))
        warnings.warn(message, ConditioningWarning, stacklevel=stacklevel + 1)


def _warn_derivative(what: str, probe: _Probe, forward_residual: float, z_norm: float, dtype: torch.dtype,
                     forward_tol: Optional[float] = None):
    """Warn (once per layer and cause, outside ``vmap``) when the implicit derivative cannot be trusted. A forward
    solve that stopped above ``forward_tol`` was already reported by the forward policy: it is not warned again."""
    if probe.amplification is None or probe.norm is None:
        return
    eps = torch.finfo(dtype).eps
    cond = probe.amplification * probe.norm
    shift = probe.amplification * forward_residual
    if cond * eps > 1e-2:
        _warn_once(what, "singular", f"{what}: check that the solution is isolated (∂F/∂z is nearly singular there, "
                   f"condition number >= {cond:.0e}): the derivative has lost most of its digits.", 3)
    elif shift > 1e-3 * max(z_norm, eps ** 0.5) and (forward_tol is None or forward_residual <= forward_tol):
        # the solution is uncertain by more than 0.1% of its size
        _warn_once(what, "shift", f"{what}: tighten the forward solve's tol: its residual {forward_residual:.0e} can "
                   f"move the solution by {shift:.0e} (||(∂F/∂z)⁻¹|| >= {probe.amplification:.0e}), so the "
                   f"derivative is unreliable.", 3)


def _warn_loose_forward(what: str, residual: float, z_norm: float, backward_tol: Optional[float],
                        dtype: torch.dtype):
    """Warn when the forward residual (relative to ``max(||z||, 1)``) is much larger than the backward solve's
    tolerance: the implicit derivative assumes ``F(z*) = 0``, so the strict backward solve buys nothing."""
    eps = torch.finfo(dtype).eps
    tol = eps ** 0.5 if backward_tol is None else max(backward_tol, eps)
    relative = residual / max(z_norm, 1.0)
    if relative > 1e3 * tol and relative > 100 * eps ** 0.5:
        _warn_once(what, "loose", f"{what}: tighten the forward solve's tol: its residual ({relative:.0e} relative) is "
                   f"far looser than the backward tol {tol:.0e}, and the implicit derivative assumes F(z*) = 0.", 4)


class Record:
    """Where a layer leaves the diagnostics of its solves: pass ``record=Record()`` to a layer, run the backward
    pass, then read ``record.forward`` and ``record.backward`` (a ``SolveInfo``, or an ``ODEInfo`` for
    ``odeint``). Under ``vmap`` the fields hold every batch entry (stacked along the vmapped dimension).

    Example:
        >>> import torch
        >>> from bilevel.layers import Record, root
        >>> a = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
        >>> rec = Record()
        >>> z = root(lambda z, a: z ** 2 - a, torch.ones(2, dtype=torch.float64), a, record=rec)
        >>> z.sum().backward(); bool(rec.backward.converged)
        True
    """

    def __init__(self):
        self.forward = None
        self.backward = None

    def __repr__(self):
        return f"Record(forward={self.forward}, backward={self.backward})"


def check_solve(info: SolveInfo, what: str, tol: Optional[float] = None, hint: str = "",
                on_nonconvergence: str = "warn", on_nonfinite: str = "raise") -> bool:
    """Apply the engine's policy to a (possibly batched) ``SolveInfo``, outside ``vmap``; ``True`` if all is well.

    Args:
        info: from a solver call (one problem, or stacked by ``vmap``).
        what: names the solve in the message, e.g. ``"Anderson(steps=50)"``.
        tol: the solver's tolerance, quoted in the message.
        hint: a suggested fix appended to the non-convergence message.
        on_nonconvergence: ``"raise"`` (``NonConvergenceError``), ``"warn"`` (``NonConvergenceWarning``) or
            ``"ignore"``.
        on_nonfinite: ``"raise"`` (``NonFiniteError``), ``"warn"`` (``RuntimeWarning``) or ``"ignore"``.

    Example:
        >>> import torch
        >>> from bilevel.root_find import Picard, check_solve
        >>> z, info = Picard(steps=2, tol=1e-12)(lambda z: z - torch.cos(z), torch.zeros(1))
        >>> check_solve(info, "Picard", 1e-12, on_nonconvergence="ignore")
        False
    """
    for key, value in (("on_nonconvergence", on_nonconvergence), ("on_nonfinite", on_nonfinite)):
        if value not in POLICIES:
            raise ValueError(f"check_solve({key}={value!r}): must be one of {POLICIES}.")
    info = SolveInfo(*(x.detach() if isinstance(x, Tensor) else x for x in info))
    nonfinite = info.nonfinite
    if bool(nonfinite.any()):
        count = f" ({int(nonfinite.sum())} of {nonfinite.numel()} problems)" if nonfinite.dim() else ""
        _policy(on_nonfinite, NonFiniteError, f"{what}: NaN or inf in the solution or its residual{count}. Check the "
                                              f"inputs, or damp the solver.")
    failed = ~info.converged & ~nonfinite
    if bool(failed.any()):
        count = f" ({int(failed.sum())} of {failed.numel()} problems)" if failed.dim() else ""
        _policy(on_nonconvergence, NonConvergenceError,
                f"{what}: did not converge in {int(info.steps.max())} steps: residual "
                f"{float(info.residual[failed].max()):.3g}{'' if tol is None else f' > tol {tol:g}'}{count}. {hint}")
    return not bool(nonfinite.any() | failed.any())


_POS = (lambda v: v > 0, "> 0")


@dataclass(frozen=True)
class _RootSolver:
    """The shared loop: validation, the masked early stop and the ``SolveInfo``. Subclasses define ``step``.

    ``check_every`` (keyword only, in every solver) is how often the loop reads the early stop on the host,
    which is one device-to-host synchronisation on an accelerator: every ``check_every`` iterations (and trials of
    Newton's line search), never with ``0`` (a fixed budget with no host read at all). ``None`` (the default) is 1
    on the CPU and 8 elsewhere. The value changes only how many masked (frozen) iterations run after convergence,
    never the result: ``z`` and ``SolveInfo`` are the same for every ``check_every``.
    """

    steps: int = 50
    tol: float = 1e-6
    check_every: Optional[int] = field(default=None, kw_only=True)

    def __post_init__(self):
        _check(type(self).__name__, steps=(self.steps, *_STEPS), tol=(self.tol, *_NONNEG),
               check_every=(self.check_every, _check_every_ok, "None or an int >= 0"))

    def _cadence(self, z: Tensor) -> int:
        return _cadence(self.check_every, z.device)

    def __call__(self, fn: RootFn, z0: Tensor, *args) -> tuple[Tensor, SolveInfo]:
        """Solve ``fn(z, *args) = 0`` from ``z0``.

        Returns:
            ``(z, info)``: the last iterate and its ``SolveInfo`` (``steps`` taken, ``residual = ||F(z)||``,
            ``converged = residual <= tol``, ``nonfinite``).
        """
        name = type(self).__name__
        if not isinstance(z0, Tensor) or not z0.is_floating_point():
            raise TypeError(f"{name}(fn, z0): z0 must be a floating-point Tensor, got {type(z0).__name__}"
                            f"{'' if not isinstance(z0, Tensor) else ' of dtype ' + str(z0.dtype)}.")
        F = lambda z: fn(z, *args)  # noqa: E731
        r = F(z0)
        if not isinstance(r, Tensor) or r.shape != z0.shape:
            got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(f"{name}(fn, z0): fn(z0) returned shape {got} but z0 has shape {tuple(z0.shape)}; a "
                             f"root needs as many equations as unknowns (a square Jacobian). For a fixed point "
                             f"z = f(z), f must return a tensor shaped like z.")
        z, res = z0, torch.linalg.vector_norm(r)
        state = self.init(F, z, r)
        count = res.new_zeros((), dtype=torch.long)
        done = (res <= self.tol) | ~torch.isfinite(res)
        batched, every = _under_vmap(), self._cadence(z0)
        for k in range(self.steps):
            # the extra iterations between two reads are masked: they change nothing but the time taken
            if not batched and _check_now(k, every) and bool(done):
                break
            z_new, r_new, state = self.step(F, z, r, state, k)
            z, r = torch.where(done, z, z_new), torch.where(done, r, r_new)
            count = count + (~done).long()
            res = torch.linalg.vector_norm(r)
            done = done | (res <= self.tol) | ~torch.isfinite(res)  # a NaN iterate is frozen, then reported
        nonfinite = ~torch.isfinite(res) | ~torch.isfinite(z).all()
        # `indefinite` is a CG notion; a tensor (not None) so that the info can be returned from vmap
        return z, SolveInfo(count, res.detach(), (res <= self.tol) & ~nonfinite, nonfinite, torch.zeros_like(nonfinite))

    def init(self, F, z: Tensor, r: Tensor):
        return None

    def step(self, F, z: Tensor, r: Tensor, state, k: int):
        raise NotImplementedError


@dataclass(frozen=True)
class Picard(_RootSolver):
    """Relaxed fixed-point iteration ``z ← z − β F(z)``; for ``F = z − f(z)`` and ``β = 1`` this is ``z ← f(z)``.

    Converges linearly when ``z ↦ z − βF(z)`` is a contraction (rate: its Lipschitz constant).

    Args:
        steps: maximum iterations (evaluations of ``F``).
        tol: stop once ``||F(z)|| <= tol``.
        mixing: β in (0, 1]; smaller damps oscillations.
    """

    mixing: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check("Picard", mixing=(self.mixing, *_POS))

    def step(self, F, z, r, state, k):
        z_new = z - self.mixing * r
        return z_new, F(z_new), state


@dataclass(frozen=True)
class Anderson(_RootSolver):
    """Anderson acceleration (type II, Walker & Ni 2011) of the iteration ``z ← g(z) = z − F(z)``.

    With the last ``m`` iterates ``z_i`` and residuals ``F_i``, it picks weights ``α = argmin ||Σ α_i F_i||²
    + λ||α||²`` subject to ``Σ α_i = 1`` and steps to ``z ← Σ α_i (z_i − β F_i)``. With ``memory=1`` it is Picard.

    Args:
        steps: maximum iterations (one ``F`` each).
        tol: stop once ``||F(z)|| <= tol``.
        memory: m, the number of past iterates mixed.
        mixing: β in (0, 1].
        regularization: λ relative to the mean squared residual norm; keeps the m×m system well posed when
            iterates become nearly collinear.
    """

    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        _check("Anderson", memory=(self.memory, lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
                    mixing=(self.mixing, *_POS), regularization=(self.regularization, *_NONNEG))

    def init(self, F, z, r):
        return [], []  # past iterates and residuals (flat); Python lists keep every shape static under vmap

    def step(self, F, z, r, state, k):
        zs, rs = state
        zs, rs = (zs + [z.reshape(-1)])[-self.memory:], (rs + [r.reshape(-1)])[-self.memory:]
        Z, R = torch.stack(zs), torch.stack(rs)  # [m, n]
        gram = R @ R.T
        reg = self.regularization * gram.diagonal().mean() + torch.finfo(gram.dtype).tiny
        ones = gram.new_ones(len(zs), 1)
        # min αᵀ(G + λI)α s.t. 1ᵀα = 1  ⇔  α ∝ (G + λI)⁻¹ 1
        a = torch.linalg.solve_ex(gram + reg * torch.eye(len(zs), dtype=gram.dtype, device=gram.device), ones)[0]
        alpha = (a / a.sum()).reshape(-1)
        z_new = (alpha @ (Z - self.mixing * R)).reshape(z.shape)
        return z_new, F(z_new), (zs, rs)


@dataclass(frozen=True)
class Newton(_RootSolver):
    """Newton's method ``z ← z − t J⁻¹ F(z)`` with the dense Jacobian ``J = ∂F/∂z`` (n×n, by forward mode) and a
    backtracking (Armijo) line search on the merit ``½||F||²``.

    The step ``t`` starts at ``damping`` and is halved until ``||F(z − t J⁻¹F)||² <= (1 − 2c·t) ||F(z)||²`` (the
    Armijo condition with ``c = 1e-4``: along the Newton direction the merit's slope is ``−||F||²``), at most
    ``backtracks`` times; if no trial passes, the one with the smallest ``||F||`` is taken. Near a root the full
    step passes and convergence is quadratic; far from it the search stops the overshoot of plain Newton (e.g.
    ``arctan(z) = 0`` from ``|z0| > 1.39`` diverges without it). Each step costs ``n`` JVPs, an n×n solve and
    1 to ``backtracks + 1`` evaluations of ``F``; under ``vmap`` the trials stop once every problem has accepted
    one (read on the host every ``check_every`` trials, like the early stop). A singular ``J`` gives a non-finite
    step, reported as ``info.nonfinite``.

    Args:
        steps: maximum Newton steps.
        tol: stop once ``||F(z)|| <= tol``.
        damping: the first trial step in (0, 1].
        jacobian: ``"fwd"`` (``torch.func.jacfwd``) or ``"rev"`` (``jacrev``, for ops without forward-mode AD).
        backtracks: the most halvings per step; ``0`` is plain (damped) Newton without a line search.
    """

    steps: int = 20
    damping: float = 1.0
    jacobian: str = "fwd"
    backtracks: int = 10

    def __post_init__(self):
        super().__post_init__()
        _check("Newton", damping=(self.damping, *_POS),
                    jacobian=(self.jacobian, lambda v: v in ("fwd", "rev"), '"fwd" or "rev"'),
                    backtracks=(self.backtracks, *_STEPS))

    def init(self, F, z, r):
        return self._cadence(z)  # how often the line search reads `accepted` on the host

    def step(self, F, z, r, state, k):
        jac = (torch.func.jacfwd if self.jacobian == "fwd" else torch.func.jacrev)(F)(z)
        n = z.numel()
        dz = torch.linalg.solve_ex(jac.reshape(n, n), r.reshape(n, 1))[0].reshape(z.shape)
        merit = torch.linalg.vector_norm(r) ** 2
        t = self.damping
        best_z = z - t * dz
        best_r = F(best_z)
        best = torch.linalg.vector_norm(best_r) ** 2
        # a non-finite merit (a problem already done) takes the first trial, whenever the search is read
        accepted = (best <= (1 - 2e-4 * t) * merit) | ~torch.isfinite(merit)
        for j in range(self.backtracks):
            # j = 0 is read whenever reads are on: near a root the full step passes and the search ends there
            if _check_now(j, state) and _all_true(accepted):
                break
            t = t / 2
            z_try = z - t * dz
            r_try = F(z_try)
            value = torch.linalg.vector_norm(r_try) ** 2
            # the first trial that passes wins; until one does, keep the smallest merit (NaN never wins)
            take = ~accepted & ((value <= (1 - 2e-4 * t) * merit) | (value < best) | ~torch.isfinite(best))
            best_z, best_r = torch.where(take, z_try, best_z), torch.where(take, r_try, best_r)
            best = torch.where(take, value, best)
            accepted = accepted | (value <= (1 - 2e-4 * t) * merit)
        return best_z, best_r, state


@dataclass(frozen=True)
class NewtonKrylov(_RootSolver):
    """Inexact Newton: each step solves ``J dz = F(z)`` with a Krylov method that only needs JVPs ``J v``.

    Args:
        steps: maximum Newton steps.
        tol: stop once ``||F(z)|| <= tol``.
        linear_solver: a solver from ``bilevel.linear_solve`` for the non-symmetric system (default
            ``GMRES(steps=20)``: 20 JVPs per Newton step).
        damping: β in (0, 1].
    """

    steps: int = 20
    linear_solver: object = field(default_factory=lambda: GMRES(steps=20, tol=1e-10))
    damping: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check("NewtonKrylov", damping=(self.damping, *_POS))

    def step(self, F, z, r, state, k):
        mv = lambda v: {"z": torch.func.jvp(F, (z,), (v["z"],))[1]}  # noqa: E731
        solver = self.linear_solver
        if isinstance(solver, GMRES) and solver.steps > z.numel():
            # beyond n steps the Krylov space is exhausted and further Arnoldi steps only normalise round-off
            solver = replace(solver, steps=z.numel())
        dz, _ = solver(LinearOperator(mv), {"z": r})
        z_new = z - self.damping * dz["z"]
        return z_new, F(z_new), state


@dataclass(frozen=True)
class Broyden(_RootSolver):
    """Broyden's ("good") quasi-Newton method on the inverse Jacobian, in limited-memory form.

    ``H ≈ J⁻¹`` starts at ``I`` (so the first step is a Picard step for ``F = z − f(z)``) and gets one rank-one
    update per step, ``H ← H + (s − H y) sᵀH / (sᵀH y)`` with ``s = Δz``, ``y = ΔF`` (Sherman-Morrison form of
    Broyden 1965). ``H = I + Σ u_i v_iᵀ`` is stored as its ``steps`` vector pairs, never as an n×n matrix.

    Args:
        steps: maximum iterations (one ``F`` each).
        tol: stop once ``||F(z)|| <= tol``.
    """

    def init(self, F, z, r):
        return [], []

    @staticmethod
    def _apply(us, vs, x, transpose=False):
        # H x = x + Σ u_i (v_iᵀ x);  Hᵀ x = x + Σ v_i (u_iᵀ x)
        if transpose:
            us, vs = vs, us
        return x + sum((u * (v @ x) for u, v in zip(us, vs)), torch.zeros_like(x))

    def step(self, F, z, r, state, k):
        us, vs = state
        z_new = z - self._apply(us, vs, r.reshape(-1)).reshape(z.shape)
        r_new = F(z_new)
        s, y = (z_new - z).reshape(-1), (r_new - r).reshape(-1)
        hy = self._apply(us, vs, y)
        shy = s @ hy
        # skip the update (u = 0) when sᵀHy vanishes, rather than divide by zero
        ok = shy.abs() > torch.finfo(shy.dtype).eps * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(hy)
        u = torch.where(ok, (s - hy) / torch.where(ok, shy, torch.ones_like(shy)), torch.zeros_like(s))
        return z_new, r_new, (us + [u], vs + [self._apply(us, vs, s, transpose=True)])
