r"""Implicit layers: differentiable ``fixed_point``, ``root`` and ``argmin`` for use inside any ``nn.Module``.

Each layer returns the solution ``z*`` of an equation in ``z`` whose other inputs (``*args``: layer inputs,
weights, dicts of weights) may require grad; ``loss.backward()`` and any ``torch.optim`` optimizer then work as
with an explicit layer:

    fixed_point(f, z0, *args)       z* = f(z*, *args)                     F(z) = z − f(z)
    root(F, z0, *args)              F(z*, *args) = 0                       F(z) = F(z)
    argmin(objective, z0, *args)    z* = argmin_z objective(z, *args)      F(z) = ∇_z objective(z, *args)

Two more layers live in their own modules and are exported here: ``odeint`` (``bilevel.ode``: Neural ODEs with the
adjoint method) and ``qp`` (``bilevel.qp``: quadratic programs with inequality constraints, differentiated
through their KKT conditions).

The forward solve runs outside autograd with a solver from ``bilevel.root_find``; no iterate is stored. The
backward pass is chosen with ``backward=``:

- a linear solver (``GMRES``, ``NormalCG``, ``CG`` for ``argmin``, ``Neumann``, ``fixed_point_iteration``,
  ``Dense``): the implicit function theorem through ``bilevel.root_vjp``. With ``A = ∂F/∂z`` at ``z*`` and the
  cotangent ``z̄``, it solves ``Aᵀu = −z̄`` and returns ``uᵀ ∂F/∂args``. This is the gradient of the *exact*
  solution, accurate to the extent that the forward solve converged (``||F(z)|| <= solver.tol``) and the
  linear solve did (its own ``tol``).
- ``"jfb"``: Jacobian-free backpropagation (Fung et al. 2022, https://arxiv.org/abs/2103.12803), ``A⁻¹ ≈ I``,
  i.e. ``Neumann(steps=0, alpha=1)``: for a fixed point, the gradient of one application of ``f`` at ``z*``.
  Cheap and a descent direction for contractive ``f``, not the exact gradient.
- ``"unrolled"``: run the forward solver under autograd and backpropagate through its iterations: the gradient
  of the *finite computation* (exact for it whether or not it converged), with memory growing with the steps.

The layers are ``torch.autograd.Function`` subclasses with ``setup_context`` and ``generate_vmap_rule=True``, so they
also run under ``torch.func.vmap`` (one problem per batch entry; the solvers' masked early stop keeps them
vmap-safe) and ``torch.func.grad``. Double backward (``create_graph=True``) is correct when the backward linear
solve is exact (``Dense``, or an iterative solver run to convergence): the saved solution is the layer's own
output, so its dependence on the inputs is differentiated again by the same rule.

Non-convergence of the forward solve or of the backward linear solve follows the engine's policy:
``on_nonconvergence`` / ``on_nonfinite`` in ``"raise" | "warn" | "ignore"``. Under ``vmap`` no Python decision
on tensors is possible, so the policy is skipped there: pass ``return_info=True`` and check the returned
``SolveInfo`` after ``vmap``. ``record=Record()`` keeps the forward and the backward solve's ``SolveInfo``.

Outside ``vmap`` the layers also say when the derivative cannot be trusted, with a ``ConditioningWarning`` (once
per layer and cause): when the forward residual is far looser than the backward solve's tolerance (the implicit
derivative assumes ``F(z*) = 0``), and when ``∂F/∂z`` is nearly singular at the solution, judged from the
backward solve's amplification ``||u|| / ||z̄||`` (a lower bound on ``||(∂F/∂z)⁻¹||``) and two power steps for
``||∂F/∂z||``: a condition number near ``1/eps``, or a forward residual that can move ``z*`` by more than 0.1%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from .tree import tree_flatten, tree_unflatten

from .conditions import Condition
from .diagnostics import POLICIES
from .implicit import root_vjp
from .linear_solve import CG, GMRES, Neumann
from .ode import ODEInfo, odeint
from .qp import InfeasibleError, UnboundedError, qp
from .root_find import (Anderson, ConditioningWarning, Newton, Record, _Probe, _under_vmap, _warn_derivative,
                        _warn_loose_forward, check_solve, fixed_point_residual)
from .types import SolveInfo

__all__ = ["fixed_point", "root", "argmin", "odeint", "ODEInfo", "qp", "InfeasibleError", "UnboundedError", "Record",
           "ConditioningWarning"]

Backward = Union[str, Callable]


@dataclass(frozen=True)
class _Spec:
    """Everything about one layer call that is not a tensor: it rides through ``autograd.Function`` as a
    constant input (``vmap`` gives it ``in_dims=None``)."""

    name: str  # "fixed_point" | "root" | "argmin", for messages
    residual_fn: Callable  # F(z, *args), zero at the solution
    symmetric: bool  # ∂F/∂z symmetric (argmin): CG applies
    solver: Callable
    backward: Callable  # a linear solver
    treedef: Any  # of args, with tensors replaced by slots
    constants: tuple  # the non-tensor leaves of args, in order (None at tensor slots)
    on_nonconvergence: str
    on_nonfinite: str
    record: Optional[Record] = None

    def args(self, tensors) -> list:
        it = iter(tensors)
        leaves = [next(it) if c is _TENSOR else c for c in self.constants]
        return tree_unflatten(leaves, self.treedef)


_TENSOR = object()  # marks a tensor slot in _Spec.constants


class _ImplicitSolve(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(spec: _Spec, z0: Tensor, *tensors: Tensor):
        z, info = spec.solver(spec.residual_fn, z0, *spec.args(tensors))
        # a fresh tensor even if the solver took no step: an output must not alias the input z0
        return z.clone(), info.steps, info.residual, info.converged, info.nonfinite

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, _, *tensors = inputs
        ctx.spec = spec
        ctx.mark_non_differentiable(*output[1:])
        # Saving the output (not a detached copy) is what makes double backward differentiate z*(args) again.
        ctx.save_for_backward(output[0], *tensors)

    @staticmethod
    def backward(ctx, z_bar, *_):
        spec: _Spec = ctx.spec
        z, *tensors = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        if not wanted:
            return (None,) * (2 + len(tensors))

        def condition(params, hparams, batch):
            full = list(tensors)
            for key, value in hparams.items():
                full[int(key)] = value
            return {"z": spec.residual_fn(params["z"], *spec.args(full))}

        hparams = {str(i): tensors[i] for i in wanted}
        probe = _Probe(spec.backward)
        grads, info, residual = root_vjp(Condition(condition, spec.symmetric, spec.name), {"z": z}, hparams, None,
                                         {"z": z_bar}, probe)
        if spec.record is not None:
            spec.record.backward = info
        if not _under_vmap():
            tol = getattr(spec.backward, "tol", None)
            what = f"{spec.name} backward ({type(spec.backward).__name__})"
            check_solve(info, what, tol, "Raise the linear solver's steps, or check that ∂F/∂z is invertible at the "
                        "solution (for a fixed point: that f is contractive there).", spec.on_nonconvergence,
                        spec.on_nonfinite)
            _warn_derivative(what, probe, float(torch.linalg.vector_norm(residual["z"].detach())),
                             float(torch.linalg.vector_norm(z.detach())), z.dtype, getattr(spec.solver, "tol", None))
        out = [None] * len(tensors)
        for key, value in grads.items():
            out[int(key)] = value
        return (None, None, *out)


def _solve(name: str, residual_fn: Callable, symmetric: bool, z0: Tensor, args: tuple, solver, backward: Backward,
           on_nonconvergence: str, on_nonfinite: str, return_info: bool, record: Optional[Record] = None):
    if not isinstance(z0, Tensor) or not z0.is_floating_point():
        raise TypeError(f"{name}: z0 must be a floating-point Tensor (the starting point, shaped like the "
                        f"solution), got {type(z0).__name__ if not isinstance(z0, Tensor) else z0.dtype}.")
    for key, value in (("on_nonconvergence", on_nonconvergence), ("on_nonfinite", on_nonfinite)):
        if value not in POLICIES:
            raise ValueError(f"{name}({key}={value!r}): must be one of {POLICIES}.")
    if not callable(solver):
        raise TypeError(f"{name}(solver=...): expected a solver from bilevel.root_find such as Anderson(), got "
                        f"{type(solver).__name__}.")
    if isinstance(backward, str):
        if backward not in ("jfb", "unrolled"):
            raise ValueError(f"{name}(backward={backward!r}): expected a linear solver (e.g. GMRES()), 'jfb' or "
                             f"'unrolled'.")
        if backward == "jfb":
            backward = Neumann(steps=0, alpha=1.0)
    elif not callable(backward):
        raise TypeError(f"{name}(backward=...): expected a linear solver (e.g. GMRES()), 'jfb' or 'unrolled', got "
                        f"{type(backward).__name__}.")
    if isinstance(backward, CG) and not symmetric:
        raise ValueError(f"{name}(backward=CG(...)): ∂F/∂z is not symmetric for a {name}, so CG would return a "
                         f"wrong gradient. Use GMRES(), NormalCG() or fixed_point_iteration().")

    hint = f"Raise {type(solver).__name__}(steps=...), loosen tol, or start z0 closer to the solution."
    if backward == "unrolled":
        z, info = solver(residual_fn, z0, *args)
    else:
        leaves, treedef = tree_flatten(args)
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        constants = tuple(_TENSOR if isinstance(x, Tensor) else x for x in leaves)
        spec = _Spec(name, residual_fn, symmetric, solver, backward, treedef, constants, on_nonconvergence,
                     on_nonfinite, record)
        # z0 only starts the search: the solution does not depend on it, so it gets no gradient
        z, *fields = _ImplicitSolve.apply(spec, z0.detach(), *tensors)
        info = SolveInfo(*fields, torch.zeros_like(fields[-1]))
    if record is not None:
        record.forward = info
    if not _under_vmap():
        what = f"{name} ({type(solver).__name__})"
        ok = check_solve(info, what, getattr(solver, "tol", None), hint, on_nonconvergence, on_nonfinite)
        exact = backward != "unrolled" and not (isinstance(backward, Neumann) and backward.steps == 0)
        if ok and exact and torch.is_grad_enabled() and any(x.requires_grad for x in tree_flatten(args)[0]
                                                             if isinstance(x, Tensor)):
            _warn_loose_forward(what, float(info.residual), float(torch.linalg.vector_norm(z.detach())),
                                getattr(backward, "tol", None), z.dtype)
    return (z, info) if return_info else z


def _tol(z0, tol: float, ulps: float) -> float:
    """A default tolerance that the dtype of ``z0`` can reach: ``tol``, or ``ulps`` machine epsilons if larger."""
    eps = torch.finfo(z0.dtype).eps if isinstance(z0, Tensor) and z0.is_floating_point() else 0.0
    return max(tol, ulps * eps)


def _default_gmres(z0) -> GMRES:
    # GMRES(steps) beyond the n unknowns divides round-off by round-off after the Krylov space is exhausted and
    # can return a wrong solution, so the default budget is capped at n.
    n = z0.numel() if isinstance(z0, Tensor) else 20
    return GMRES(steps=max(1, min(20, n)), tol=_tol(z0, 1e-8, 1e2))


def _check_like(name: str, what: str, out, z0: Tensor):
    if not isinstance(out, Tensor) or out.shape != z0.shape or out.dtype != z0.dtype:
        got = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name}: {what} returned {got}, but z0 has shape {tuple(z0.shape)}, dtype {z0.dtype}; "
                         f"they must match (as many equations as unknowns: a square Jacobian ∂F/∂z).")


def fixed_point(f: Callable, z0: Tensor, *args, solver=None, backward: Backward = None,
                on_nonconvergence: str = "warn", on_nonfinite: str = "raise", return_info: bool = False,
                record: Optional[Record] = None):
    r"""The fixed point ``z* = f(z*, *args)``, differentiable in ``args``.

    Differentiated equation: ``F(z, args) = z − f(z, args) = 0``, so ``∂F/∂z = I − ∂f/∂z`` (invertible when
    ``f`` is a contraction in ``z``).

    Args:
        f: ``f(z, *args) -> Tensor`` shaped like ``z``; a pure function of its inputs (weights enter through
            ``args``, e.g. ``dict(module.named_parameters())`` with ``torch.func.functional_call``).
        z0: the starting point (no gradient flows to it).
        *args: tensors, or pytrees (dicts, lists, tuples) of tensors and constants.
        solver: a forward solver from ``bilevel.root_find`` (default ``Anderson(steps=50, tol=1e-6)``, absolute
            on ``||z − f(z)||₂``).
        backward: a linear solver for ``(I − ∂f/∂z)ᵀu = −z̄`` (default ``GMRES(steps=min(20, n), tol=1e-8)``, relative),
            ``"jfb"`` or ``"unrolled"``; see the module docstring for which gradient each gives. Default
            tolerances are raised to what the dtype can reach (1000 and 100 machine epsilons: float32).
        on_nonconvergence: ``"raise" | "warn" | "ignore"``, applied to the forward and backward solves
            (outside vmap).
        on_nonfinite: the same choice for NaN or inf in either solve.
        return_info: also return the forward solve's ``SolveInfo``.
        record: a ``Record``; after the backward pass ``record.backward`` holds the adjoint linear solve's
            ``SolveInfo`` (``record.forward`` the forward one).

    Returns:
        ``z*`` (and its ``SolveInfo`` if ``return_info``).

    Example:
        >>> import torch
        >>> from bilevel.layers import fixed_point
        >>> W = (0.3 * torch.eye(3, dtype=torch.float64)).requires_grad_()
        >>> x = torch.ones(3, dtype=torch.float64)
        >>> z = fixed_point(lambda z, x, W: torch.tanh(W @ z + x), torch.zeros(3, dtype=torch.float64), x, W)
        >>> torch.allclose(z, torch.tanh(W @ z + x))
        True
        >>> z.sum().backward(); W.grad.shape
        torch.Size([3, 3])
    """
    solver = Anderson(steps=50, tol=_tol(z0, 1e-6, 1e3)) if solver is None else solver
    backward = _default_gmres(z0) if backward is None else backward
    if isinstance(z0, Tensor):
        with torch.no_grad():
            _check_like("fixed_point(f, z0, *args)", "f(z0, *args)", f(z0, *args), z0)
    return _solve("fixed_point", fixed_point_residual(f), False, z0, args, solver, backward, on_nonconvergence,
                  on_nonfinite, return_info, record)


def root(fn: Callable, z0: Tensor, *args, solver=None, backward: Backward = None, symmetric: bool = False,
         on_nonconvergence: str = "warn", on_nonfinite: str = "raise", return_info: bool = False,
         record: Optional[Record] = None):
    r"""The root ``z*`` of ``fn(z*, *args) = 0``, differentiable in ``args``.

    Differentiated equation: ``F(z, args) = fn(z, args) = 0``; ``∂F/∂z`` must be square and invertible at
    ``z*``. Use it for systems that are neither fixed points nor plain argmins, e.g. the KKT conditions of an
    equality-constrained problem.

    Args:
        fn: ``fn(z, *args) -> Tensor`` shaped like ``z``.
        z0: the starting point (no gradient flows to it).
        *args: tensors, or pytrees of tensors and constants.
        solver: default ``Newton(steps=20, tol=1e-8)`` (dense; for large ``z`` use ``NewtonKrylov`` or
            ``Broyden``).
        backward: a linear solver for ``(∂F/∂z)ᵀu = −z̄`` (default ``GMRES(steps=min(20, n), tol=1e-8)``), ``"jfb"`` or
            ``"unrolled"``. Default tolerances are raised for float32 as in ``fixed_point``.
        symmetric: declare ``∂F/∂z`` symmetric, which allows ``backward=CG(...)``.
        on_nonconvergence: as in ``fixed_point``.
        on_nonfinite: as in ``fixed_point``.
        return_info: as in ``fixed_point``.

    Example:
        >>> import torch
        >>> from bilevel.layers import root
        >>> a = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
        >>> z = root(lambda z, a: z ** 2 - a, torch.ones(2, dtype=torch.float64), a)   # z = sqrt(a)
        >>> z.sum().backward(); a.grad                                                  # 1 / (2 sqrt(a))
        tensor([0.2500, 0.1667], dtype=torch.float64)
    """
    solver = Newton(steps=20, tol=_tol(z0, 1e-8, 1e3)) if solver is None else solver
    backward = _default_gmres(z0) if backward is None else backward
    if isinstance(z0, Tensor):
        with torch.no_grad():
            _check_like("root(fn, z0, *args)", "fn(z0, *args)", fn(z0, *args), z0)
    return _solve("root", fn, symmetric, z0, args, solver, backward, on_nonconvergence, on_nonfinite, return_info,
                  record)


def argmin(objective: Callable, z0: Tensor, *args, solver=None, backward: Backward = None,
           on_nonconvergence: str = "warn", on_nonfinite: str = "raise", return_info: bool = False,
           record: Optional[Record] = None):
    r"""``z* = argmin_z objective(z, *args)``, differentiable in ``args``.

    Differentiated equation: the stationarity condition ``F(z, args) = ∇_z objective(z, args) = 0``, whose
    Jacobian is the (symmetric) Hessian ``∇²_z objective``; it must be positive definite at ``z*`` (a strict
    local minimum), and then ``CG`` solves the adjoint system.

    Args:
        objective: ``objective(z, *args) -> scalar Tensor``.
        z0: the starting point (no gradient flows to it).
        *args: tensors, or pytrees of tensors and constants.
        solver: a root solver applied to ``∇_z objective`` (default ``Newton(steps=20, tol=1e-8)``, i.e. Newton's
            method for minimisation with the dense Hessian; ``Picard(mixing=lr)`` is gradient descent).
        backward: default ``CG(steps=50, tol=1e-10)``; or any other linear solver, ``"jfb"`` or ``"unrolled"``.
            Default tolerances are raised for float32 as in ``fixed_point``.
        on_nonconvergence: as in ``fixed_point``.
        on_nonfinite: as in ``fixed_point``.
        return_info: as in ``fixed_point``.

    Example:
        >>> import torch
        >>> from bilevel.layers import argmin
        >>> lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> y = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> z = argmin(lambda z, y, lam: ((z - y) ** 2).sum() + lam * (z ** 2).sum(), torch.zeros(2, dtype=y.dtype),
        ...            y, lam)                                                         # z = y / (1 + lam)
        >>> torch.allclose(z, y / 3)
        True
    """
    solver = Newton(steps=20, tol=_tol(z0, 1e-8, 1e3)) if solver is None else solver
    backward = CG(steps=50, tol=_tol(z0, 1e-10, 1e2)) if backward is None else backward
    if isinstance(z0, Tensor):
        with torch.no_grad():
            value = objective(z0, *args)
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"argmin(objective, z0, *args): objective(z0, *args) must return a scalar tensor, got "
                             f"{got}; reduce it (e.g. .sum()).")
    return _solve("argmin", torch.func.grad(objective), True, z0, args, solver, backward, on_nonconvergence,
                  on_nonfinite, return_info, record)
