"""Entry points: one task (``hypergrad``) or a meta-batch of tasks (``meta_grad``), with diagnostics applied."""

from __future__ import annotations

from typing import Optional

import torch
from torch.func import vmap
from .tree import pytree

from . import tree
from .diagnostics import check
from .methods import Problem
from .types import Batch, HParams, Hypergrad, Params

BATCHING = ("loop", "vmap")


def _validate(call: str, problem: Problem, hparams: HParams, params0: Optional[Params]):
    if not isinstance(problem, Problem):
        raise TypeError(f"{call}: problem must be a bilevel.Problem, got {type(problem).__name__}.")
    for name, value in (("hparams", hparams), ("params0", params0)):
        if value is None and name == "params0":
            continue
        if not isinstance(value, dict) or not value:
            raise TypeError(f"{call}: {name} must be a non-empty dict[str, Tensor], got {type(value).__name__}.")
        bad = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{call}: {name} entries {bad} are not tensors.")
    if params0 is not None and problem.init is not None:
        ref = problem.init(hparams)
        if ref.keys() != params0.keys() or any(ref[k].shape != params0[k].shape for k in ref):
            raise ValueError(f"{call}: params0 {tree.describe(params0)} does not match problem.init(hparams) "
                             f"{tree.describe(ref)}.")


def hypergrad(method, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
              params0: Optional[Params] = None, *, on_nonconvergence: str = "warn",
              on_nonfinite: str = "raise") -> Hypergrad:
    """``d outer_loss(w*(λ), λ) / dλ`` for one task, by ``method``, with the diagnostics policy applied.

    Args:
        method: a hypergradient method (``Unrolled()``, ``Implicit(CG())``, ``imaml(reg)``, ...).
        problem: the ``Problem``.
        hparams: λ, a dict of tensors; the returned gradient has the same keys, shapes, dtypes and devices.
        inner_batch: data of the inner problem (the support set; the training split).
        outer_batch: data of the outer problem (the query set; the validation split).
        params0: where the inner solve starts (warm start); default ``problem.init(hparams)``.
        on_nonconvergence: ``"raise" | "warn" | "ignore"`` when a solve the method relies on did not converge.
        on_nonfinite: ``"raise" | "warn" | "ignore"`` for NaN or inf anywhere (never silent by default).

    Returns:
        A ``Hypergrad``.
    """
    _validate("hypergrad", problem, hparams, params0)
    out = method(problem, hparams, inner_batch, outer_batch, params0)
    check(out, method, on_nonconvergence, on_nonfinite, problem.solver.tol)
    return out


def meta_grad(method, problem: Problem, hparams: HParams, inner_batches: Batch, outer_batches: Batch,
              params0: Optional[Params] = None, *, batching: str = "loop", chunk_size: Optional[int] = None,
              on_nonconvergence: str = "warn", on_nonfinite: str = "raise") -> Hypergrad:
    """The mean hypergradient over a meta-batch of tasks stacked along dim 0 of every batch tensor.

    The outer gradient is always taken per task and then averaged (``vmap(grad)``, never ``grad(vmap)``): the
    latter is wrong through training-mode batch norm in torch.func (``shared/repro/bn_vmap_grad.py``).

    Args:
        inner_batches, outer_batches: pytrees of tensors with a leading task dimension T.
        params0: an optional per-task start, stacked along dim 0.
        batching: ``"loop"`` runs the tasks one after another (lowest memory; on CPU also the fastest for the
            conv4 Omniglot network); ``"vmap"`` vectorises them with ``torch.func.vmap`` (faster on accelerators
            for small models), ``chunk_size`` tasks at a time (``None`` = all).
        other arguments: as ``hypergrad``.

    Returns:
        A ``Hypergrad`` whose ``grad`` and ``outer_loss`` are means over tasks while ``params``,
        ``inner_info`` and ``linear_info`` keep the task dimension.
    """
    if batching not in BATCHING:
        raise ValueError(f"meta_grad(batching={batching!r}): must be one of {BATCHING}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"meta_grad(chunk_size={chunk_size!r}): must be None or a positive int.")
    leaves = [(name, x) for name, value in (("inner_batches", inner_batches), ("outer_batches", outer_batches),
                                            ("params0", params0)) for x in pytree.tree_leaves(value)
              if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] if x.dim() else None for _, x in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        shapes = ", ".join(f"{name}: {tuple(x.shape)}" for name, x in leaves)
        raise ValueError(f"meta_grad: every tensor in inner_batches, outer_batches (and params0) needs the same "
                         f"leading task dimension; got {shapes or 'no tensors'}.")
    (num_tasks,) = sizes
    if params0 is not None:
        _validate("meta_grad", problem, hparams, {k: v[0] for k, v in params0.items()})
    else:
        _validate("meta_grad", problem, hparams, None)

    def per_task(inner_batch, outer_batch, start):
        out = method(problem, hparams, inner_batch, outer_batch, start)
        # vmap returns tensors only: an absent linear_info travels as an empty tuple
        return out if out.linear_info is not None else out._replace(linear_info=())

    if batching == "vmap":
        in_dims = (0, 0, None if params0 is None else 0)
        out = vmap(per_task, in_dims=in_dims, randomness="different", chunk_size=chunk_size)(
            inner_batches, outer_batches, params0)
    else:
        take = lambda value, i: pytree.tree_map(lambda x: x[i], value)  # noqa: E731
        outs = [per_task(take(inner_batches, i), take(outer_batches, i),
                         None if params0 is None else take(params0, i)) for i in range(num_tasks)]
        out = pytree.tree_map(lambda *xs: torch.stack(xs), *outs)
    out = out._replace(grad={k: v.mean(0) for k, v in out.grad.items()}, outer_loss=out.outer_loss.mean(0),
                       linear_info=out.linear_info or None)
    check(out, method, on_nonconvergence, on_nonfinite, problem.solver.tol)
    return out
