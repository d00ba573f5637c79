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
from torch.func import jvp

from . import tree
from ._autodiff import grads
from .conditions import Condition, stationarity
from .implicit import root_vjp
from .inner import InnerSolver
from .linear_solve import CG, GMRES, MINRES, LinearOperator, Neumann, TruncatedCG
from .types import Batch, HParams, Hypergrad, LossFn, Params, SolveInfo, default_tol

Tree = dict


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
    def outer(w, h):
        loss = problem.outer_loss(w, h, batch)
        return loss, loss.detach()

    (g_params, g_hparams), loss = grads(outer, params, hparams)
    return g_params, g_hparams, loss


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

        (g,), (loss, params, info) = grads(outer, hparams)
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
    own verdict or the same test at w*: ``||F(w*)|| <= tol``, or ``<= rtol · ||F(w0)||``), and ``linear_info``
    carries the adjoint solve's residual.

    Args:
        linear_solver: ``CG()`` (symmetric positive definite: stationarity, iMAML), ``MINRES()`` or
            ``TruncatedCG()`` (symmetric indefinite: a Hessian away from a minimum), ``GMRES()`` or ``NormalCG()``
            (any), ``Neumann()`` / ``fixed_point_iteration()``, ``Dense()`` (small, exact).
        condition: the optimality condition; ``None`` means ``stationarity(problem.inner_loss)``.
        hvp: ``"rev"`` or ``"fwd"`` products, see ``root_vjp``.
        reg: set by ``imaml(reg)``: the proximal strength the method assumes. A problem whose inner loss is
            ``proximal(loss, r)`` with ``r != reg`` is refused, so the number lives in one place.

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
    reg: Optional[float] = None

    def __post_init__(self):
        if self.hvp not in ("rev", "fwd"):
            raise ValueError(f"Implicit(hvp={self.hvp!r}): hvp must be 'rev' or 'fwd'.")
        if self.condition is not None and not isinstance(self.condition, Condition):
            raise TypeError("Implicit(condition=...): expected a Condition, e.g. stationarity(loss) or fixed_point(T).")

    def __call__(self, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                 params0: Optional[Params] = None) -> Hypergrad:
        if self.reg is not None:
            carried = getattr(getattr(problem.inner_loss, "__wrapped__", problem.inner_loss), "reg", None)
            if carried is not None and carried != self.reg:
                raise ValueError(f"imaml(reg={self.reg!r}) but the problem's inner loss is proximal(..., "
                                 f"reg={carried!r}); use one number for both (e.g. one variable).")
        condition = self.condition or stationarity(problem.inner_loss)
        params, info = problem.solve(hparams, inner_batch, params0)
        hparams = tree.detach(hparams)
        g_params, g_hparams, loss = _outer_grads(problem, params, hparams, outer_batch)
        g_implicit, linear_info, residual = root_vjp(condition, params, hparams, inner_batch, g_params,
                                                     self.linear_solver, self.hvp)
        # the inner solve is judged again at w* itself by the solver's own rule; with no explicit tolerance,
        # relative to the gradient norm at the start, or absolute when no step ran (params0 is a solution found
        # elsewhere, there is no start to compare with)
        rnorm = tree.norm(residual).detach()
        solver = problem.solver
        scale = info.scale if isinstance(info.scale, torch.Tensor) else torch.full_like(rnorm, float("nan"))
        scale = torch.where(torch.isnan(scale), torch.ones_like(rnorm), scale)
        if solver.tol is None and solver.rtol is None:
            ok = rnorm <= default_tol(rnorm.dtype) * scale
        else:
            ok = (rnorm <= (-1.0 if solver.tol is None else solver.tol)) | \
                 (rnorm <= (-1.0 if solver.rtol is None else solver.rtol) * scale)
        nonfinite = info.nonfinite | ~torch.isfinite(rnorm)
        info = info._replace(residual=rnorm, converged=(info.converged | ok) & ~nonfinite, nonfinite=nonfinite,
                             scale=scale)
        return Hypergrad(tree.add(g_hparams, g_implicit), loss, params, info, linear_info)


IMAML_SOLVERS = {"cg": CG, "truncated_cg": TruncatedCG, "minres": MINRES, "gmres": GMRES}
"""Krylov methods ``imaml(solver=...)`` accepts, by name."""


@dataclass(frozen=True)
class IMAMLSystem:
    """The iMAML adjoint system in the form chosen by ``imaml(system=...)``, solved by ``solver``.

    ``Implicit`` hands every linear solver the operator of the proximal stationarity condition, ``A = H + reg·I``
    (``H`` the Hessian of the task loss at w*), and the hypergradient is ``−reg·u`` with ``u`` the returned
    solution (``∂F/∂θ = −reg·I``). This wrapper solves ``M v = g`` for the meta-gradient ``v`` and returns
    ``u = −v / reg``:

    - ``system="paper"``: ``M = I + H/reg`` (Rajeswaran et al. 2019, eq. 7). The same CG iterates as ``CG`` on
      ``A`` (CG is invariant to scaling the system), so ``imaml(system="paper")`` uses ``CG`` directly.
    - ``system="reference"``: ``M = (1 + coef)·I + H / (reg + lam_damping)``, what the authors' code solves
      (aravindr93/imaml_dev, ``Learner.matrix_evaluator`` with ``regu_coef = --cg_damping`` and its default
      ``lam_damping=10``). With the Omniglot defaults (coef 1, lam_damping 10, reg 2) this is ``(H + 24·I) v =
      12·g``: the paper's ``H + 2I`` with 22 added to the diagonal, and a meta-gradient 6 times that of the paper's
      system at the same damping. The shift makes the system positive definite on the conv4 network at init.
    """

    solver: Callable
    reg: float
    system: str = "reference"
    coef: float = 1.0
    lam_damping: float = 10.0

    def operator(self, operator: LinearOperator) -> LinearOperator:
        """``M`` from the proximal operator ``A = H + reg·I``."""
        if self.system == "paper":
            mv = lambda v: tree.scale(1 / self.reg, operator.mv(v))  # noqa: E731
        else:
            s = self.reg + self.lam_damping
            # (1 + coef) v + (A − reg I) v / s, with the reg·I of A folded into the diagonal term
            mv = lambda v: tree.axpy((1 + self.coef) - self.reg / s, v, tree.scale(1 / s, operator.mv(v)))  # noqa
        return LinearOperator(mv=mv, rmv=mv, symmetric=operator.symmetric)

    def __call__(self, operator: LinearOperator, b: Tree) -> tuple[Tree, SolveInfo]:
        x, info = self.solver(self.operator(operator), b)
        return tree.scale(1 / self.reg, x), info


def imaml(reg: float, cg_steps: int = 5, damping: float = 0.0, tol: Optional[float] = None,
          system: str = "paper", solver: str = "cg", coef: float = 1.0, lam_damping: float = 10.0) -> Implicit:
    """iMAML (Rajeswaran et al., 2019): a Krylov solve of ``cg_steps`` on the proximal stationarity condition.

    Use with ``Problem(proximal(task_loss, reg), outer_loss, solver, init=meta_init)``. Two systems:

    - ``system="paper"`` (default): ``(I + H/reg) v = ∇L_out(w*)``, i.e. ``(H + reg·I) u = −∇L_out`` for ``u``
      (``damping`` is added to ``H + reg·I``).
    - ``system="reference"``: ``((1 + coef)·I + H / (reg + lam_damping)) v = ∇L_out(w*)``, the system of the
      authors' code with ``--cg_damping coef`` (their Omniglot runs: ``coef=1``, ``lam_damping=10``, ``reg=2``,
      CG-5); see ``IMAMLSystem``. ``damping`` is then added to that system's diagonal.

    The reference code's inner loop differs too: it runs plain SGD on the task loss for ``n_steps`` and then takes
    one gradient step on the proximal term alone, while here the inner solver minimises the proximal loss itself,
    whose stationarity the implicit gradient assumes. Its CG stops on an absolute ``rᵀr < 1e-10``; here the
    stop is relative (``tol``).

    Args:
        reg: λ, the proximal regularisation: the problem's inner loss ``proximal(task_loss, reg)`` carries it, and a
            call with a different ``proximal`` strength is refused (also used by ``system="reference"``).
        cg_steps: the Krylov budget (matrix-vector products).
        damping: added to the diagonal of the solved system.
        tol: relative residual of the solve; ``None``: ``default_tol`` of the dtype.
        system: ``"paper"`` or ``"reference"``.
        solver: ``"cg"``, ``"truncated_cg"``, ``"minres"`` or ``"gmres"`` (see ``IMAML_SOLVERS``).
        coef, lam_damping: the reference system's ``regu_coef`` and ``lam_damping``.
    """
    if not reg > 0:
        raise ValueError(f"imaml(reg={reg!r}): reg must be > 0.")
    if system not in ("paper", "reference"):
        raise ValueError(f"imaml(system={system!r}): use 'paper' ((I + H/reg) v = g) or 'reference' (the authors' "
                         "code: ((1 + coef) I + H/(reg + lam_damping)) v = g).")
    if solver not in IMAML_SOLVERS:
        raise ValueError(f"imaml(solver={solver!r}): use one of {sorted(IMAML_SOLVERS)}.")
    if not (coef >= 0 and lam_damping >= 0):
        raise ValueError(f"imaml(coef={coef!r}, lam_damping={lam_damping!r}): both must be >= 0.")
    make = IMAML_SOLVERS[solver]
    kwargs = {} if solver == "gmres" else {"damping": damping}
    krylov = make(steps=cg_steps, tol=tol, **kwargs)
    if solver == "gmres" and damping:
        raise ValueError("imaml(solver='gmres'): GMRES takes no damping; use cg, truncated_cg or minres.")
    if system == "paper":
        return Implicit(krylov, reg=reg)
    return Implicit(IMAMLSystem(krylov, reg, system, coef, lam_damping), reg=reg)


def neumann(steps: int = 20, alpha: float = 0.1, condition: Optional[Condition] = None,
            tol: Optional[float] = None) -> Implicit:
    """Implicit with a truncated Neumann series (Lorraine et al., 2020); converges when ``alpha < 2/L``. ``tol``:
    see ``Neumann`` (``None``: judged at ``default_tol`` of the dtype; divergence is always reported)."""
    return Implicit(Neumann(steps=steps, alpha=alpha, tol=tol), condition)


def jfb(alpha: float = 1.0, condition: Optional[Condition] = None, tol: Optional[float] = None) -> Implicit:
    """Jacobian-free backpropagation (Fung et al., 2022, https://arxiv.org/abs/2103.12803): the zeroth-order
    Neumann term, ``A⁻¹ ≈ αI``. A descent direction for contractive fixed points, at the cost of one VJP. ``tol``:
    ``None`` judges nothing (the approximation is the method); a number checks ``||b − αAb|| <= tol·||b||`` with
    one more product."""
    return Implicit(Neumann(steps=0, alpha=alpha, tol=tol), condition)


METHODS = {"unrolled": Unrolled, "forward": Forward, "first_order": FirstOrder, "reptile": Reptile,
           "implicit": Implicit, "imaml": imaml, "neumann": neumann, "jfb": jfb}
"""Methods by name, for configs."""

