"""Hypergradient methods: how ``d outer_loss(w*(λ), λ) / dλ`` is obtained.

A method is a frozen dataclass called as ``method(problem, hparams, inner_batch, outer_batch, params0=None)`` and
returning a ``Hypergrad``; it is the analogue of optimistix's ``adjoint`` argument: the bilevel problem stays the
same, only the way of differentiating it changes. Calls are pure and vmap-safe (one task); they never raise on
non-convergence: ``bilevel.hypergrad`` / ``bilevel.meta_grad`` apply the diagnostics policy afterwards.

Two meanings of "the hypergradient" coexist and each method states which one it returns:
- the derivative of the *finite computation* actually run (``Unrolled``, ``Forward``): exact for that
  computation, whether or not the inner solver converged;
- the derivative of the *converged solution* w*(λ) through the implicit function theorem (``Implicit`` and its
  presets): exact only as ``∇_w inner_loss(w) → 0`` and the adjoint solve converges, hence the residuals
  in ``Hypergrad.inner_info`` and ``Hypergrad.linear_info``.
``FirstOrder`` and ``Reptile`` are meta-learning approximations that assume ``∂w/∂θ ≈ I``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.func import grad, grad_and_value, jvp

from . import tree
from .conditions import Condition, stationarity
from .implicit import root_vjp
from .inner import InnerSolver
from .linear_solve import CG, Neumann
from .types import Batch, HParams, Hypergrad, LossFn, Params, SolveInfo


def _scalar(fn: LossFn, name: str) -> LossFn:
    def checked(params, hparams, batch):
        out = fn(params, hparams, batch)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{name}(params, hparams, batch) must return a scalar tensor, got {shape}; "
                             "reduce it (e.g. .mean()) over the batch.")
        return out

    checked.__wrapped__ = fn
    return checked


@dataclass(frozen=True)
class Problem:
    """A bilevel problem ``min_λ outer_loss(w*(λ), λ)`` s.t. ``w*(λ) ≈ argmin_w inner_loss(w, λ)``.

    Args:
        inner_loss: ``(params, hparams, batch) -> scalar``, minimised by ``solver`` on the inner batch.
        outer_loss: ``(params, hparams, batch) -> scalar``, evaluated at the inner solution on the outer batch.
        solver: an ``InnerSolver`` (``GradientDescent``, ``Adam``) with its step budget.
        init: ``hparams -> params0``, where the inner solve starts. ``meta_init`` for meta-learning (the solve
            starts from θ and ``Unrolled`` differentiates through that start); ``None`` when every call passes
            ``params0`` (hyperparameter optimisation, warm starts).
    """

    inner_loss: LossFn
    outer_loss: LossFn
    solver: InnerSolver
    init: Optional[Callable[[HParams], Params]] = None

    def __post_init__(self):
        if not isinstance(self.solver, InnerSolver):
            raise TypeError(f"Problem(solver=...): expected an InnerSolver such as GradientDescent(lr=..., steps=...), "
                            f"got {type(self.solver).__name__}.")
        for name in ("inner_loss", "outer_loss"):
            fn = getattr(self, name)
            if not callable(fn):
                raise TypeError(f"Problem({name}=...): expected a function (params, hparams, batch) -> scalar.")
            if getattr(fn, "__wrapped__", None) is None:
                object.__setattr__(self, name, _scalar(fn, name))

    def start(self, hparams: HParams, params0: Optional[Params]) -> Params:
        if params0 is not None:
            return params0
        if self.init is None:
            raise ValueError("Problem has init=None: pass params0=... (the inner starting point) to the call, or "
                             "give Problem(init=meta_init) for meta-learning.")
        return self.init(hparams)

    def solve(self, hparams: HParams, batch: Batch, params0: Optional[Params]) -> tuple[Params, SolveInfo]:
        """The inner solve with no derivative information kept (first-order and implicit methods)."""
        with torch.no_grad():  # torch.func.grad inside the solver still works; no autograd graph is kept
            w0 = tree.detach(self.start(hparams, params0))
            params, info = self.solver(self.inner_loss, w0, tree.detach(hparams), batch)
        return tree.detach(params), info


def _outer_grads(problem: Problem, params: Params, hparams: HParams, batch: Batch):
    """``(∂L_out/∂w, ∂L_out/∂λ)`` at fixed ``w`` and the outer loss."""
    (g_params, g_hparams), loss = grad_and_value(problem.outer_loss, argnums=(0, 1))(params, hparams, batch)
    return g_params, g_hparams, loss.detach()


@dataclass(frozen=True)
class Unrolled:
    """Reverse mode through the inner solver: the exact gradient of the finite computation (backprop through
    ``solver.steps`` updates; MAML's second-order meta-gradient). Memory grows linearly with the steps.

    Args:
        truncate: if set to K, differentiate only the last K inner steps; the first ``steps − K`` run detached
            (truncated backpropagation, Shaban et al. 2019). With ``init=meta_init`` the path through the start is
            then cut, so keep ``truncate=None`` for MAML.
    """

    truncate: Optional[int] = None

    def __post_init__(self):
        if self.truncate is not None and (not isinstance(self.truncate, int) or self.truncate < 0):
            raise ValueError(f"Unrolled(truncate={self.truncate!r}): truncate must be None or a non-negative int.")

    def __call__(self, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                 params0: Optional[Params] = None) -> Hypergrad:
        solver, steps = problem.solver, problem.solver.steps
        tail = steps if self.truncate is None else min(self.truncate, steps)

        def outer(h):
            w, state, info = problem.start(h, params0), None, None
            if tail < steps:
                with torch.no_grad():
                    w, state, info = solver.run(problem.inner_loss, tree.detach(w), tree.detach(h), inner_batch,
                                                steps=steps - tail)
                w, state = tree.detach(w), tree.pytree.tree_map(torch.Tensor.detach, state)
            w, _, info = solver.run(problem.inner_loss, w, h, inner_batch, steps=tail, state=state, info=info)
            loss = problem.outer_loss(w, h, outer_batch)
            return loss, (loss.detach(), tree.detach(w), info)

        g, (loss, params, info) = grad(outer, has_aux=True)(hparams)
        return Hypergrad(g, loss, params, info)


@dataclass(frozen=True)
class Forward:
    """Forward mode through the inner solver: one JVP per scalar hyperparameter (Franceschi et al., 2017,
    https://arxiv.org/abs/1703.01785). The same value as ``Unrolled`` (the finite computation), with memory
    independent of the number of inner steps and time proportional to the number of hyperparameters.

    Args:
        max_hparams: refuse more scalar hyperparameters than this (use ``Unrolled`` or ``Implicit`` then).
    """

    max_hparams: int = 64

    def __call__(self, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                 params0: Optional[Params] = None) -> Hypergrad:
        n = sum(v.numel() for v in hparams.values())
        if n > self.max_hparams:
            raise ValueError(f"Forward: {n} scalar hyperparameters, more than max_hparams={self.max_hparams}; forward "
                             "mode costs one pass through the inner solver per hyperparameter. Use Unrolled() or "
                             "Implicit(), or raise max_hparams.")

        def outer(h):
            w, info = problem.solver(problem.inner_loss, problem.start(h, params0), h, inner_batch)
            return problem.outer_loss(w, h, outer_batch), (w, info)

        derivs = []
        flat = tree.flatten(hparams)
        for e in torch.eye(n, dtype=flat.dtype, device=flat.device):
            loss, dloss, (w, info) = jvp(outer, (hparams,), (tree.unflatten(e, hparams),), has_aux=True)
            derivs.append(dloss)
        return Hypergrad(tree.unflatten(torch.stack(derivs), hparams), loss.detach(), tree.detach(w), info)


def _check_meta_init(name: str, problem: Problem, hparams: HParams, params0: Optional[Params]) -> Params:
    """First-order methods assume ``params0 = θ = hparams``; any other use would silently return zero."""
    zero_msg = ("The first-order hypergradient ignores how the inner solution depends on hparams, so for "
                "hyperparameters such as a weight decay or a learning rate it is identically zero: use Implicit(), "
                "Unrolled() or Forward() instead.")
    if params0 is not None:
        raise ValueError(f"{name}: params0 was given, but {name} starts the inner solve from the meta-initialisation "
                         f"(Problem(init=meta_init), params0=None). {zero_msg}")
    w0 = problem.start(hparams, None)
    if not all(k in hparams and w0[k] is hparams[k] for k in w0):
        raise ValueError(f"{name}: hparams are not the meta-initialisation of params (params keys {sorted(w0)}, "
                         f"hparams keys {sorted(hparams)}; Problem.init must return hparams' own tensors, as "
                         f"meta_init does). {zero_msg}")
    extra = sorted(set(hparams) - set(w0))
    if extra:
        raise ValueError(f"{name}: hparams {extra} are not part of the meta-initialisation; their first-order "
                         f"hypergradient would be zero. {zero_msg}")
    return w0


@dataclass(frozen=True)
class FirstOrder:
    """First-order MAML (Finn et al., 2017, https://arxiv.org/abs/1703.03400): ``∇_w outer_loss(w*)`` applied to the
    meta-initialisation θ, i.e. the approximation ``∂w*/∂θ ≈ I``. Needs ``Problem(init=meta_init)``."""

    def __call__(self, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                 params0: Optional[Params] = None) -> Hypergrad:
        _check_meta_init("FirstOrder", problem, hparams, params0)
        params, info = problem.solve(hparams, inner_batch, None)
        g_params, g_hparams, loss = _outer_grads(problem, params, tree.detach(hparams), outer_batch)
        return Hypergrad(tree.add(g_hparams, g_params), loss, params, info)


@dataclass(frozen=True)
class Reptile:
    """Reptile (Nichol et al., 2018, https://arxiv.org/abs/1803.02999): the meta-direction ``θ − w*``.

    Not a gradient of the outer loss: with an SGD outer optimizer of step ε it gives Reptile's update
    ``θ ← θ + ε (w* − θ)``. ``outer_loss`` is still evaluated (for monitoring). Needs ``Problem(init=meta_init)``.
    """

    def __call__(self, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                 params0: Optional[Params] = None) -> Hypergrad:
        _check_meta_init("Reptile", problem, hparams, params0)
        params, info = problem.solve(hparams, inner_batch, None)
        with torch.no_grad():
            loss = problem.outer_loss(params, tree.detach(hparams), outer_batch)
        return Hypergrad(tree.sub(tree.detach(hparams), params), loss, params, info)


@dataclass(frozen=True)
class Implicit:
    """The implicit function theorem at the inner solution (``root_vjp``): the derivative of the converged w*(λ).

    ``dL_out/dλ = ∂L_out/∂λ + uᵀ ∂F/∂λ`` with ``(∂F/∂w)ᵀ u = −∂L_out/∂w``, solved by ``linear_solver``. Memory is
    independent of the inner steps. The answer is exact only when the inner solve reached ``F(w) = 0`` and the
    linear solve converged: ``inner_info.residual`` is replaced by ``||F(w*)||`` (``converged`` is the solver's
    own verdict or ``||F(w*)|| <= solver.tol``), and ``linear_info`` carries the adjoint solve's residual.

    Args:
        linear_solver: ``CG()`` (symmetric positive definite: stationarity, iMAML), ``GMRES()`` or
            ``NormalCG()`` (any), ``Neumann()`` / ``fixed_point_iteration()``, ``Dense()`` (small, exact).
        condition: the optimality condition; ``None`` means ``stationarity(problem.inner_loss)``.
        hvp: ``"rev"`` or ``"fwd"`` products, see ``root_vjp``.

    Example:
        >>> import torch, bilevel as bl
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> inner = lambda w, h, b: ((b[0] @ w["w"] - b[1]) ** 2).mean() + h["l2"] * (w["w"] ** 2).sum()
        >>> outer = lambda w, h, b: ((b[0] @ w["w"] - b[1]) ** 2).mean()
        >>> problem = bl.Problem(inner, outer, bl.GradientDescent(lr=0.1, steps=500, tol=1e-10))
        >>> out = bl.hypergrad(bl.Implicit(bl.CG(steps=3)), problem, {"l2": torch.tensor(0.1, dtype=torch.float64)},
        ...                    (X[:10], y[:10]), (X[10:], y[10:]), params0={"w": torch.zeros(3, dtype=torch.float64)})
        >>> bool(out.linear_info.converged)
        True
    """

    linear_solver: Callable = field(default_factory=CG)
    condition: Optional[Condition] = None
    hvp: str = "rev"

    def __post_init__(self):
        if self.hvp not in ("rev", "fwd"):
            raise ValueError(f"Implicit(hvp={self.hvp!r}): hvp must be 'rev' or 'fwd'.")
        if self.condition is not None and not isinstance(self.condition, Condition):
            raise TypeError("Implicit(condition=...): expected a Condition, e.g. stationarity(loss) or fixed_point(T).")

    def __call__(self, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                 params0: Optional[Params] = None) -> Hypergrad:
        condition = self.condition or stationarity(problem.inner_loss)
        params, info = problem.solve(hparams, inner_batch, params0)
        hparams = tree.detach(hparams)
        g_params, g_hparams, loss = _outer_grads(problem, params, hparams, outer_batch)
        g_implicit, linear_info, residual = root_vjp(condition, params, hparams, inner_batch, g_params,
                                                     self.linear_solver, self.hvp)
        rnorm = tree.norm(residual).detach()
        info = info._replace(residual=rnorm, converged=info.converged | (rnorm <= problem.solver.tol),
                             nonfinite=info.nonfinite | ~torch.isfinite(rnorm))
        return Hypergrad(tree.add(g_hparams, g_implicit), loss, params, info, linear_info)


def imaml(reg: float, cg_steps: int = 5, damping: float = 0.0, tol: float = 1e-10) -> Implicit:
    """iMAML (Rajeswaran et al., 2019): CG with ``cg_steps`` on the proximal stationarity condition.

    Use with ``Problem(proximal(task_loss, reg), outer_loss, solver, init=meta_init)``; the adjoint system is
    ``(H + reg·I) u = −∇L_out(w*)``, i.e. the paper's ``(I + H/reg) v = ∇L_out``. ``reg`` is checked here only to
    be positive: it is the problem's inner loss that carries it.
    """
    if not reg > 0:
        raise ValueError(f"imaml(reg={reg!r}): reg must be > 0.")
    return Implicit(CG(steps=cg_steps, tol=tol, damping=damping))


def neumann(steps: int = 20, alpha: float = 0.1, condition: Optional[Condition] = None) -> Implicit:
    """Implicit with a truncated Neumann series (Lorraine et al., 2020); converges when ``alpha < 2/L``."""
    return Implicit(Neumann(steps=steps, alpha=alpha), condition)


def jfb(alpha: float = 1.0, condition: Optional[Condition] = None) -> Implicit:
    """Jacobian-free backpropagation (Fung et al., 2022, https://arxiv.org/abs/2103.12803): the zeroth-order
    Neumann term, ``A⁻¹ ≈ αI``. A descent direction for contractive fixed points, at the cost of one VJP."""
    return Implicit(Neumann(steps=0, alpha=alpha), condition)


METHODS = {"unrolled": Unrolled, "forward": Forward, "first_order": FirstOrder, "reptile": Reptile,
           "implicit": Implicit, "imaml": imaml, "neumann": neumann, "jfb": jfb}
"""Methods by name, for configs."""

