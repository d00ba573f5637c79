"""Entry points: one task (``hypergrad``) or a meta-batch of tasks (``meta_grad``), with diagnostics applied."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Callable, Optional

import torch
from torch.func import vmap
from .tree import pytree

from . import tree
from .diagnostics import NONFINITE_POLICIES, NonFiniteError, check
from .conditions import stationarity
from .methods import Implicit, Problem
from .types import Batch, HParams, Hypergrad, Params

BATCHING = ("loop", "vmap", "threads")
PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``precision=`` values of ``hypergrad`` / ``meta_grad`` and the autocast dtype each one means."""


def _autocast(call: str, method, problem: Problem, hparams: HParams, precision: Optional[str]):
    """``(method, problem)`` whose inner and outer losses run under ``torch.autocast`` at ``precision``.

    Only the loss evaluations (forward and their backward, hence every inner step and the outer gradient) are
    autocast; the losses come back in float32, so the inner parameter updates, the adjoint linear solve of
    ``Implicit`` (its condition keeps the full-precision inner loss, so its Hessian-vector products are float32)
    and the meta-gradient accumulation stay in the dtype of ``params``/``hparams``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{call}(precision={precision!r}): must be one of {list(PRECISIONS)} "
                         f"(None: the dtype of the inputs).")
    if precision is None:
        return method, problem
    device = next(iter(hparams.values())).device.type
    if not torch.amp.is_autocast_available(device):
        raise ValueError(f"{call}(precision={precision!r}): torch has no autocast for device {device!r}; "
                         f"use precision=None there.")
    wide = sorted({str(v.dtype).replace("torch.", "") for v in hparams.values() if v.dtype != torch.float32})
    if wide:
        raise ValueError(f"{call}(precision={precision!r}): hparams are {'/'.join(wide)}; autocast lowers only "
                         f"float32 work, so pass float32 hparams and params or use precision=None.")
    dtype = PRECISIONS[precision]

    def wrap(fn):
        def autocast_loss(params, hparams, batch):
            with torch.autocast(device, dtype=dtype):
                loss = fn(params, hparams, batch)
            return loss.float() if loss.dtype in (torch.bfloat16, torch.float16) else loss

        autocast_loss.__wrapped__ = getattr(fn, "__wrapped__", fn)  # keeps proximal(..., reg) visible to imaml
        return autocast_loss

    if isinstance(method, Implicit) and method.condition is None:
        method = dataclasses.replace(method, condition=stationarity(problem.inner_loss))
    return method, dataclasses.replace(problem, inner_loss=wrap(problem.inner_loss),
                                       outer_loss=wrap(problem.outer_loss))


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
    integer = {k: str(v.dtype) for k, v in hparams.items() if not (v.is_floating_point() or v.is_complex())}
    if integer:
        raise TypeError(f"{call}: hparams {integer} are not floating point; hyperparameters are differentiated, so "
                        f"pass floating tensors (torch.tensor(1.0), not torch.tensor(1)).")
    if params0 is not None and problem.init is not None:
        ref = problem.init(hparams)
        if ref.keys() != params0.keys() or any(ref[k].shape != params0[k].shape for k in ref):
            raise ValueError(f"{call}: params0 {tree.describe(params0)} does not match problem.init(hparams) "
                             f"{tree.describe(ref)}.")


def _explain_failure(call: str, err: Exception, problem: Problem, hparams: HParams, params0, **batches) -> None:
    """Raise a clearer error for two common misuses behind a torch error in a loss; otherwise return.

    Mixed floating dtypes (float32 params, float64 data) fail deep inside torch; and a loss written
    ``loss(hparams, params, batch)`` looks a params key up in hparams. Only inspected after a failure.
    """
    named = [(name, x) for name, value in (("hparams", hparams), ("params0", params0), *batches.items())
             for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    if isinstance(err, RuntimeError) and ("dtype" in str(err) or "scalar type" in str(err)):
        dtypes: dict = {}
        for name, x in named:
            if x.is_floating_point():
                dtypes.setdefault(name, set()).add(str(x.dtype).replace("torch.", ""))
        if len(set().union(*dtypes.values())) > 1:
            listed = ", ".join(f"{name} {'/'.join(sorted(d))}" for name, d in dtypes.items())
            raise TypeError(f"{call}: the inputs mix floating dtypes ({listed}); cast the data or the parameters "
                            f"so they agree (e.g. batch.float() or .double()). torch: {str(err).splitlines()[0]}") \
                from err
    if isinstance(err, KeyError) and err.args:
        params = params0 if params0 is not None else problem.init(hparams) if problem.init is not None else {}
        key = err.args[0]
        if key in params and key not in hparams or key in hparams and key not in params:
            raise TypeError(f"{call}: KeyError {key!r} (a key of {'params' if key in params else 'hparams'}) "
                            f"in a loss: losses are called loss(params, hparams, batch); are two arguments "
                            f"swapped?") from err


def _nonfinite_inputs(hparams: HParams, **batches) -> str:
    """Which inputs hold NaN or inf (checked only once a non-finite value has appeared)."""
    bad = [name for name, value in (("hparams", hparams), *batches.items())
           if any(isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all()
                  for x in pytree.tree_leaves(value))]
    return ", ".join(bad)


def _apply_policy(call: str, out: Hypergrad, method, problem: Problem, on_nonconvergence: str, on_nonfinite: str,
                  hparams: HParams, **inputs) -> Hypergrad:
    """:func:`~bilevel.diagnostics.check` on ``out``; a non-finite result caused by non-finite inputs says so."""
    try:
        check(out, method, on_nonconvergence, on_nonfinite, problem.solver.tol)
    except NonFiniteError as err:
        bad = _nonfinite_inputs(hparams, **inputs)
        if bad:
            raise NonFiniteError(f"{call}: the inputs hold NaN or inf ({bad}); fix them first. {err}") from None
        raise
    return out


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _run_in_threads(run: Callable[[range], tuple], num_tasks: int, workers: int) -> list[tuple]:
    """``run(group)`` for contiguous groups of the tasks, each in a worker thread with one intra-op thread.

    The workers live in a pool kept per size (threads are started once, not per meta-step). Every group finishes
    before an error of any one is raised, so no work of this call outlives it.
    """
    bounds = [round(j * num_tasks / workers) for j in range(workers + 1)]
    groups = [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    with _POOLS_LOCK:
        if len(groups) not in _POOLS:
            # torch.set_num_threads in a worker sets that thread's own OpenMP team size, not the caller's
            _POOLS[len(groups)] = concurrent.futures.ThreadPoolExecutor(
                len(groups), thread_name_prefix="bilevel-tasks", initializer=torch.set_num_threads, initargs=(1,))
        pool = _POOLS[len(groups)]
    futures = [pool.submit(run, group) for group in groups]
    concurrent.futures.wait(futures)
    return [f.result() for f in futures]


def hypergrad(method, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
              params0: Optional[Params] = None, *, on_nonconvergence: str = "warn",
              on_nonfinite: str = "raise", precision: Optional[str] = None) -> Hypergrad:
    """``d outer_loss(w*(λ), λ) / dλ`` for one task, by ``method``, with the diagnostics policy applied.

    Args:
        method: a hypergradient method (``Unrolled()``, ``Implicit(CG())``, ``imaml(reg)``, ...).
        problem: the ``Problem``.
        hparams: λ, a dict of tensors; the returned gradient has the same keys, shapes, dtypes and devices.
        inner_batch: data of the inner problem (the support set; the training split).
        outer_batch: data of the outer problem (the query set; the validation split).
        params0: where the inner solve starts (warm start); default ``problem.init(hparams)``.
        on_nonconvergence: ``"raise" | "warn" | "ignore"`` when a solve the method relies on did not converge.
            Warnings come once per call site and cause, then at the 10th, 100th ... time
            (``bl.diagnostics.warning_counts()`` has every count); the numbers are in ``inner_info``/``linear_info``.
        on_nonfinite: ``"raise" | "warn" | "ignore"`` for NaN or inf anywhere (never silent by default);
            ``"skip_task"`` (for ``meta_grad``) raises here, with a single task there is nothing to fall back on.
        precision: ``None`` (the inputs' dtype), ``"bf16"`` or ``"fp16"``: the inner and outer losses (forward and
            backward) run under ``torch.autocast`` on the device type of ``hparams``; the parameter updates, the
            adjoint linear solve and the returned gradient stay in the dtype of ``params``/``hparams``. fp16
            has no loss scaling: prefer bf16 where the hardware has it.

    Returns:
        A ``Hypergrad``.
    """
    _validate("hypergrad", problem, hparams, params0)
    method, problem = _autocast("hypergrad", method, problem, hparams, precision)
    try:
        out = method(problem, hparams, inner_batch, outer_batch, params0)
    except (RuntimeError, KeyError) as err:
        _explain_failure("hypergrad", err, problem, hparams, params0, inner_batch=inner_batch,
                         outer_batch=outer_batch)
        raise
    return _apply_policy("hypergrad", out, method, problem, on_nonconvergence, on_nonfinite, hparams,
                         params0=params0, inner_batch=inner_batch, outer_batch=outer_batch)


def meta_grad(method, problem: Problem, hparams: HParams, inner_batches: Batch, outer_batches: Batch,
              params0: Optional[Params] = None, *, batching: str = "loop", chunk_size: Optional[int] = None,
              workers: Optional[int] = None, on_nonconvergence: str = "warn", on_nonfinite: str = "raise",
              precision: Optional[str] = None) -> Hypergrad:
    """The mean hypergradient over a meta-batch of tasks stacked along dim 0 of every batch tensor.

    The outer gradient is always taken per task and then averaged (``vmap(grad)``, never ``grad(vmap)``): the
    latter is wrong through training-mode batch norm in torch.func (``shared/repro/bn_vmap_grad.py``). The
    arguments not listed below are as in ``hypergrad``.

    Args:
        inner_batches, outer_batches: pytrees of tensors with a leading task dimension T.
        params0: an optional per-task start, stacked along dim 0.
        batching: ``"loop"`` runs the tasks one after another, adding each task's hypergradient to a running sum
            as it finishes (lowest memory; on CPU also the fastest for the conv4 Omniglot network); ``"vmap"``
            vectorises them with ``torch.func.vmap`` (faster on accelerators for small models), ``chunk_size``
            tasks at a time (``None`` = all); ``"threads"`` splits the tasks into ``workers`` contiguous groups, each
            run as ``"loop"`` does in its own thread with one intra-op thread (task parallelism on a multi-core CPU,
            where the small operations of one task parallelise poorly). With threads the losses must be safe to call
            from several threads at once: pure functions of ``params`` (``functional_call`` on one shared
            ``nn.Module`` is not: it swaps the module's parameters during the call; ``bilevel.interop``'s
            ``module_call`` gives each thread its own copy). The mean sums the groups in task order: deterministic
            for a given ``workers``, equal to ``"loop"`` up to rounding.
        workers: the number of threads of ``batching="threads"``; default ``torch.get_num_threads()``.
        on_nonfinite: as ``hypergrad``, or ``"skip_task"``: leave the tasks whose hypergradient, outer loss or
            solves are not finite out of the mean, count them in ``Hypergrad.dropped`` (and warn); all tasks
            failing is still a ``NonFiniteError``.
        precision: as ``hypergrad``; the running sum of the task hypergradients is kept in the hparams' dtype.
            With batch norm use ``batching="loop"``: torch's vmap rule of its backward fails under autocast.

    Returns:
        A ``Hypergrad`` whose ``grad`` and ``outer_loss`` are means over the (kept) tasks while ``params``,
        ``inner_info`` and ``linear_info`` keep the task dimension.
    """
    if batching not in BATCHING:
        raise ValueError(f"meta_grad(batching={batching!r}): must be one of {BATCHING}.")
    if workers is not None and (batching != "threads" or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"meta_grad(workers={workers!r}): workers is a positive int and applies to "
                         f"batching='threads' only (batching={batching!r}).")
    workers = torch.get_num_threads() if workers is None else workers
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"meta_grad(chunk_size={chunk_size!r}): must be None or a positive int.")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"meta_grad(on_nonfinite={on_nonfinite!r}): must be one of {NONFINITE_POLICIES}.")
    leaves = [(name, x) for name, value in (("inner_batches", inner_batches), ("outer_batches", outer_batches),
                                            ("params0", params0)) for x in pytree.tree_leaves(value)
              if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] if x.dim() else None for _, x in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        shapes = ", ".join(f"{name}: {tuple(x.shape)}" for name, x in leaves)
        raise ValueError(f"meta_grad: every tensor in inner_batches, outer_batches (and params0) needs the same "
                         f"leading task dimension; got {shapes or 'no tensors'}.")
    (num_tasks,) = sizes
    if num_tasks == 0:
        raise ValueError("meta_grad: the meta-batch has 0 tasks (leading dimension 0); pass at least one task.")
    if params0 is not None:
        _validate("meta_grad", problem, hparams, {k: v[0] for k, v in params0.items()})
    else:
        _validate("meta_grad", problem, hparams, None)
    method, problem = _autocast("meta_grad", method, problem, hparams, precision)
    skip = on_nonfinite == "skip_task"

    def per_task(inner_batch, outer_batch, start):
        try:
            out = method(problem, hparams, inner_batch, outer_batch, start)
        except (RuntimeError, KeyError) as err:
            _explain_failure("meta_grad", err, problem, hparams, params0, inner_batches=inner_batches,
                             outer_batches=outer_batches)
            raise
        # vmap returns tensors only: an absent linear_info travels as an empty tuple
        return out._replace(linear_info=() if out.linear_info is None else out.linear_info, dropped=(), kept=())

    def finite(out) -> torch.Tensor:  # one task (or a stack of them): everything finite
        flags = [torch.isfinite(out.outer_loss), ~out.inner_info.nonfinite]
        flags += [~out.linear_info.nonfinite] if len(out.linear_info) else []
        flags += [torch.isfinite(g).flatten(out.outer_loss.dim()).all(-1) for g in out.grad.values()]
        return torch.stack(flags).all(0)

    kept = dropped = None
    if batching == "vmap":
        in_dims = (0, 0, None if params0 is None else 0)
        try:
            out = vmap(per_task, in_dims=in_dims, randomness="different", chunk_size=chunk_size)(
                inner_batches, outer_batches, params0)
        except RuntimeError as err:
            # torch 2.13: the vmap rule of batch norm's backward under autocast mixes bfloat16 and float32
            if precision is not None and "scalar type" in str(err):
                raise RuntimeError(f"meta_grad(precision={precision!r}, batching='vmap'): torch's vmap of this "
                                   f"model under autocast failed (batch norm does); use batching='loop'. torch: "
                                   f"{str(err).splitlines()[0]}") from err
            raise
        if skip:
            kept = finite(out)
            count = kept.sum().clamp(min=1).to(out.outer_loss.dtype)
            mean = lambda x: torch.where(kept.reshape((-1,) + (1,) * (x.dim() - 1)), x, 0).sum(0) / count  # noqa
        else:
            mean = lambda x: x.mean(0)  # noqa: E731
        out = out._replace(grad={k: mean(v) for k, v in out.grad.items()}, outer_loss=mean(out.outer_loss))
    else:
        # the mean accumulates as tasks finish; only the small per-task parts (params, SolveInfo) are stacked
        take = lambda value, i: pytree.tree_map(lambda x: x[i], value)  # noqa: E731

        def run(tasks: range):
            total, losses, rest, oks = None, [], [], []
            for i in tasks:
                out = per_task(take(inner_batches, i), take(outer_batches, i),
                               None if params0 is None else take(params0, i))
                grad, loss = out.grad, out.outer_loss
                if skip:
                    ok = finite(out)
                    oks.append(ok)
                    grad = {k: torch.where(ok, g, 0) for k, g in grad.items()}
                    loss = torch.where(ok, loss, 0)
                total = {k: g.clone() for k, g in grad.items()} if total is None else \
                    {k: total[k].add_(g) for k, g in grad.items()}
                losses.append(loss)
                rest.append((out.params, out.inner_info, out.linear_info))
            return total, losses, rest, oks

        if batching == "loop":
            total, losses, rest, oks = run(range(num_tasks))
        else:
            parts = _run_in_threads(run, num_tasks, workers)   # every group holds a task
            total = {k: sum(p[0][k] for p in parts) for k in parts[0][0]}  # the groups' sums, in task order
            losses, rest, oks = ([x for p in parts for x in p[j]] for j in (1, 2, 3))
        params, inner_info, linear_info = pytree.tree_map(lambda *xs: torch.stack(xs), *rest)
        count = num_tasks
        if skip:
            kept = torch.stack(oks)
            count = kept.sum().clamp(min=1).to(losses[0].dtype)
        out = Hypergrad({k: v / count for k, v in total.items()}, torch.stack(losses).sum(0) / count, params,
                        inner_info, linear_info)
    if skip:
        dropped = (~kept).sum()
    out = out._replace(linear_info=out.linear_info or None, dropped=dropped, kept=kept)
    return _apply_policy("meta_grad", out, method, problem, on_nonconvergence, on_nonfinite, hparams,
                         params0=params0, inner_batches=inner_batches, outer_batches=outer_batches)
