"""Diagnostics: turn the per-task ``SolveInfo`` of a hypergradient into errors or warnings, outside ``vmap``.

Inside transforms status is only returned (a tensor cannot raise under ``vmap``); the policy runs here, once per
call, with one host sync. Non-finite values are never handed on silently.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .linear_solve import CG, Neumann
from .types import Hypergrad, SolveInfo

POLICIES = ("raise", "warn", "ignore")


class NonConvergenceError(RuntimeError):
    """An inner or adjoint solve did not reach its tolerance and the policy is ``"raise"``."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared in a solve, the outer loss or the hypergradient."""


class NonConvergenceWarning(UserWarning):
    """An inner or adjoint solve did not reach its tolerance and the policy is ``"warn"``."""


def _tasks(mask: torch.Tensor) -> str:
    mask = mask.reshape(-1)
    bad = mask.nonzero().reshape(-1).tolist()
    if mask.numel() == 1:
        return "the task"
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return f"{len(bad)}/{mask.numel()} tasks (index {shown})"


def _worst(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x.reshape(-1)[mask.reshape(-1)].max())


def _policy(policy: str, error: type, message: str):
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, NonConvergenceWarning if error is NonConvergenceError else RuntimeWarning,
                      stacklevel=4)


def check(out: Hypergrad, method, on_nonconvergence: str = "warn", on_nonfinite: str = "raise",
          solver_tol: Optional[float] = None) -> bool:
    """Apply the policies to a (possibly batched) ``Hypergrad``; return ``True`` when everything is finite and
    converged where the method needs it.

    Which convergence matters depends on the method: the implicit ones need ``F(w*) ≈ 0`` and a converged adjoint
    solve; ``Unrolled``, ``Forward``, ``FirstOrder`` and ``Reptile`` differentiate (or approximate) the finite
    computation, so for them only non-finite values are errors.
    """
    for name, value in (("on_nonconvergence", on_nonconvergence), ("on_nonfinite", on_nonfinite)):
        if value not in POLICIES:
            raise ValueError(f"{name}={value!r}: must be one of {POLICIES}.")
    call = repr(method)
    grad_bad = ~torch.stack([torch.isfinite(g).all() for g in out.grad.values()]).all()
    loss_bad = ~torch.isfinite(out.outer_loss)
    inner_bad = out.inner_info.nonfinite
    linear_bad = out.linear_info.nonfinite if out.linear_info is not None else torch.zeros_like(inner_bad)
    if bool(grad_bad | loss_bad.any() | inner_bad.any() | linear_bad.any()):
        where = "; ".join(f"{w} ({_tasks(m)})" for w, m in
                          (("the inner solve", inner_bad), ("the adjoint linear solve", linear_bad),
                           ("the outer loss", loss_bad)) if bool(m.any())) or "the hypergradient"
        _policy(on_nonfinite, NonFiniteError,
                f"{call}: the hypergradient is not finite: NaN or inf in {where}. Likely fixes: a smaller inner "
                "learning rate or fewer inner steps (divergence), damping for the adjoint solve, a smaller Neumann "
                "alpha, or float64.")
        return False
    problems = []
    if getattr(method, "linear_solver", None) is not None:  # implicit methods rely on both solves
        info: SolveInfo = out.inner_info
        bad = ~info.converged
        if bool(bad.any()):
            problems.append(
                f"the inner solve did not converge on {_tasks(bad)}: ||F(w)|| = {_worst(info.residual, bad):.3g} > "
                f"solver tol {solver_tol}, so the implicit hypergradient (that of the exact solution) is "
                "approximate. Likely fixes: more inner steps, a larger inner lr, a positive solver tol that the "
                "budget can reach, or Unrolled() to differentiate the finite computation.")
        linfo: SolveInfo = out.linear_info
        bad = ~linfo.converged
        if bool(bad.any()):
            solver = method.linear_solver
            hint = "more steps"
            if bool(linfo.indefinite.any()):
                hint = (f"CG met negative curvature on {_tasks(linfo.indefinite)}: the system is indefinite (a "
                        "Hessian away from a minimum); add damping > 0, or use GMRES()")
            elif isinstance(solver, Neumann):
                hint = "more steps, or a smaller alpha (the series converges only for alpha < 2/L)"
            elif isinstance(solver, CG):
                hint = "more steps, or damping > 0"
            problems.append(f"the adjoint linear solve {solver!r} did not converge on {_tasks(bad)}: relative "
                            f"residual {_worst(linfo.residual, bad):.3g}. Likely fix: {hint}.")
    if problems:
        _policy(on_nonconvergence, NonConvergenceError, f"{call}: " + " Also, ".join(problems))
    return not problems
