"""Diagnostics: turn the per-task ``SolveInfo`` of a hypergradient into errors or warnings, outside ``vmap``.

Inside transforms status is only returned (a tensor cannot raise under ``vmap``); the policy runs here, once per
call, with one host sync. Non-finite values are never handed on silently.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import Counter
from typing import Optional

import torch

from .linear_solve import Neumann
from .types import Hypergrad, SolveInfo

POLICIES = ("raise", "warn", "ignore")
NONFINITE_POLICIES = POLICIES + ("skip_task",)
"""``on_nonfinite`` of ``meta_grad`` also takes ``"skip_task"``: drop the tasks whose hypergradient is not finite."""


class NonConvergenceError(RuntimeError):
    """An inner or adjoint solve did not reach its tolerance and the policy is ``"raise"``."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared in a solve, the outer loss or the hypergradient."""


class NonConvergenceWarning(UserWarning):
    """An inner or adjoint solve did not reach its tolerance and the policy is ``"warn"``."""


_BILEVEL_DIR = os.path.dirname(os.path.abspath(__file__))
_COUNTS: Counter = Counter()


def warning_counts() -> dict:
    """How often each cause was met since the last ``reset_warnings()``: ``{(call site, cause): count}``, the call
    site being ``"file:line"`` of the first frame outside bilevel."""
    return dict(_COUNTS)


def reset_warnings() -> None:
    """Forget the counts, so that every cause warns again on its next occurrence."""
    _COUNTS.clear()


def _user_frame() -> tuple[str, int]:
    """``("file:line", stacklevel)`` of the first frame outside bilevel, seen from ``_warn_counted``."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)).startswith(_BILEVEL_DIR):
        frame, level = frame.f_back, level + 1
    return ("?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"), level


def _warn_counted(cause: str, message: str, category: type = None) -> None:
    """Warn once per call site and cause, then again at the 10th, 100th, 1000th ... occurrence with the count, so a
    training loop gets a handful of lines; every occurrence is counted in ``warning_counts()``."""
    site, level = _user_frame()
    _COUNTS[site, cause] += 1
    n = _COUNTS[site, cause]
    if n == 1 or math.log10(n).is_integer():
        suffix = "" if n == 1 else f" [{n}th time here]"
        warnings.warn(message + suffix, category or NonConvergenceWarning, stacklevel=level)


def _tasks(mask: torch.Tensor) -> str:
    mask = mask.reshape(-1)
    if mask.numel() == 1:
        return "the task"
    return f"{int(mask.sum())}/{mask.numel()} tasks"


def _worst(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x.reshape(-1)[mask.reshape(-1)].max())


def _policy(policy: str, error: type, message: str):
    """The raise / warn / ignore policy of ``bilevel.root_find`` and ``bilevel.layers`` (one warning per call)."""
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, NonConvergenceWarning if error is NonConvergenceError else RuntimeWarning,
                      stacklevel=4)


# Fused normalisations whose double backward PyTorch differentiates as if the batch statistics were constants, so
# that third and higher derivatives through them are wrong in training mode (torch <= 2.13: pytorch/pytorch#186256 for
# batch and instance norm, #175754 for layer norm). A differentiable hypergradient whose graph holds one of these
# nodes is wrong as soon as it is differentiated again.
_BATCH_NORM = ("batch norm", "pytorch/pytorch#186256")
_WRONG_ABOVE_SECOND_ORDER = {"NativeBatchNormBackwardBackward0": _BATCH_NORM, "CudnnBatchNormBackwardBackward0":
                             _BATCH_NORM, "MiopenBatchNormBackwardBackward0": _BATCH_NORM,
                             "NativeLayerNormBackwardBackward0": ("layer norm", "pytorch/pytorch#175754")}


def _fused_norm_in_graph(grads) -> Optional[tuple[str, str]]:
    """``(name, upstream issue)`` of the first fused training-mode normalisation in the autograd graph of ``grads``,
    or ``None``."""
    seen, stack = set(), [g.grad_fn for g in grads if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        norm = _WRONG_ABOVE_SECOND_ORDER.get(type(node).__name__)
        if norm is not None and getattr(node, "_saved_train", True):  # eval-mode batch norm is affine: exact
            return norm
        stack.extend(parent for parent, _ in node.next_functions)
    return None


def _linear_problem(solver, info: SolveInfo, bad: torch.Tensor) -> tuple[str, str]:
    """``(cause, message)`` for an unconverged adjoint solve: the fix first, then what happened."""
    base = getattr(solver, "solver", solver)  # IMAMLSystem wraps a Krylov solver
    name = type(base).__name__
    worst = _worst(info.residual, bad)
    diverged = info.diverged if isinstance(info.diverged, torch.Tensor) else torch.zeros_like(bad)
    what = f"the adjoint solve {name} did not converge on"
    if bool((diverged & bad).any()):
        if isinstance(base, Neumann):
            curv = info.curvature.reshape(-1)[(diverged & bad).reshape(-1)]
            curv = curv[torch.isfinite(curv)]
            bound = f"alpha < {2 / float(curv.max()):.3g}" if curv.numel() else "a smaller alpha"
            return "diverged", (f"Use {bound} or CG/MINRES: {what} {_tasks(diverged & bad)}: the Neumann series "
                                f"diverged (residual {worst:.3g}).")
        return "diverged", (f"Add damping or use MINRES(): {what} {_tasks(diverged & bad)}: the residual grew to "
                            f"{worst:.3g}.")
    if bool((info.indefinite & bad).any()):
        return "indefinite", (f"Add damping or use MINRES()/TruncatedCG(): {what} {_tasks(info.indefinite & bad)}: "
                              f"negative curvature (residual {worst:.3g}).")
    hint = {"Neumann": "More steps or a smaller alpha (alpha < 2/L)", "CG": "More steps, or damping > 0"}
    fix = hint.get(name, "More steps or a looser tol")
    return "unconverged", f"{fix}: {what} {_tasks(bad)} (residual {worst:.3g})."


def check(out: Hypergrad, method, on_nonconvergence: str = "warn", on_nonfinite: str = "raise",
          solver_tol: Optional[float] = None) -> bool:
    """Apply the policies to a (possibly batched) ``Hypergrad``; return ``True`` when everything is finite and
    converged where the method needs it.

    Which convergence matters depends on the method: the implicit ones need ``F(w*) ≈ 0`` and a converged adjoint
    solve; ``Unrolled``, ``Forward``, ``FirstOrder`` and ``Reptile`` differentiate (or approximate) the finite
    computation, so for them only non-finite values are errors. Warnings are short, name the fix first, and come
    once per call site and cause (then at the 10th, 100th ... time, with the count); the numbers behind them are in
    ``Hypergrad.inner_info`` / ``linear_info``. A hypergradient that stays differentiable (hparams tracked by
    autograd) is searched for fused training-mode batch or layer norm, whose third derivatives PyTorch gets wrong:
    a warning says so. Tasks dropped by ``on_nonfinite="skip_task"`` (``out.kept``) are
    reported as such and not judged otherwise.
    """
    if on_nonconvergence not in POLICIES:
        raise ValueError(f"on_nonconvergence={on_nonconvergence!r}: must be one of {POLICIES}.")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite={on_nonfinite!r}: must be one of {NONFINITE_POLICIES}.")
    name = type(method).__name__
    if any(g.grad_fn is not None for g in out.grad.values()):  # hparams tracked: the result will be differentiated
        found = _fused_norm_in_graph(out.grad.values())
        if found is not None:
            norm, issue = found
            _warn_counted(f"{norm} third order",
                          f"Write {norm} from primitive ops (docs: failure modes) to differentiate this "
                          f"hypergradient again: PyTorch's fused training-mode {norm} has wrong third "
                          f"derivatives ({issue}).", RuntimeWarning)
    kept = out.kept if out.kept is not None else None
    if kept is not None:
        if not bool(kept.any()):
            raise NonFiniteError(f"{name}: the hypergradient of every task ({kept.numel()}) is NaN or inf; nothing "
                                 "to average. Likely fixes: a smaller inner lr, damping for the adjoint solve, or "
                                 "float64.")
        if not bool(kept.all()):
            _warn_counted("skipped", f"Smaller inner lr or damping: skipped {_tasks(~kept)} with a non-finite "
                                     f"hypergradient (count in Hypergrad.dropped).", RuntimeWarning)
    sel = (lambda m: m & kept) if kept is not None else (lambda m: m)  # noqa: E731
    grad_bad = ~torch.stack([torch.isfinite(g).all() for g in out.grad.values()]).all()
    loss_bad = sel(~torch.isfinite(out.outer_loss)) if out.outer_loss.dim() else ~torch.isfinite(out.outer_loss)
    inner_bad = sel(out.inner_info.nonfinite)
    linear_bad = sel(out.linear_info.nonfinite) if out.linear_info is not None else torch.zeros_like(inner_bad)
    if bool(grad_bad | loss_bad.any() | inner_bad.any() | linear_bad.any()):
        where = "; ".join(f"{w} ({_tasks(m)})" for w, m in
                          (("inner solve", inner_bad), ("adjoint solve", linear_bad),
                           ("outer loss", loss_bad)) if bool(m.any())) or "the hypergradient"
        message = (f"Smaller inner lr, damping or float64 (or on_nonfinite='skip_task'): the {name} hypergradient is "
                   f"not finite, NaN or inf in {where}.")
        if on_nonfinite in ("raise", "skip_task"):  # skip_task got here: no task to drop it from
            raise NonFiniteError(message)
        if on_nonfinite == "warn":
            _warn_counted("nonfinite", message, RuntimeWarning)
        return False
    problems = []  # (cause, message)
    if getattr(method, "linear_solver", None) is not None:  # implicit methods rely on both solves
        info: SolveInfo = out.inner_info
        bad = sel(~info.converged)
        if bool(bad.any()):
            relative = ""
            if isinstance(info.scale, torch.Tensor):  # how far it got from the start
                relative = f", {_worst(info.residual / info.scale, bad):.2g} of the start's"
            problems.append(("inner", f"More inner steps or a larger inner lr: the inner solve did not converge on "
                                      f"{_tasks(bad)} (gradient norm {_worst(info.residual, bad):.3g}{relative})."))
        linfo: SolveInfo = out.linear_info
        bad = sel(~linfo.converged)
        if bool(bad.any()):
            problems.append(_linear_problem(method.linear_solver, linfo, bad))
    if problems and on_nonconvergence == "raise":
        raise NonConvergenceError(f"{name}: " + " Also: ".join(message for _, message in problems))
    if on_nonconvergence == "warn":
        for cause, message in problems:
            _warn_counted(cause, message)
    return not problems
