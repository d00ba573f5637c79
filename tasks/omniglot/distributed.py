"""Data-parallel meta-training with ``torch.distributed`` (launched by ``torchrun``), as a thin layer.

Each rank samples its own slice of the global meta-batch (task ``i`` of a meta-step is seeded by its global index,
see :mod:`tasks.omniglot.sampler`), computes the mean hypergradient of its tasks with ``bl.meta_grad``, and the
means are averaged with one ``all_reduce`` so every rank takes the same outer step. Since every rank holds the
same number of tasks, the average of the rank means is the mean over the global meta-batch: a 2-process run
follows a 1-process run up to float round-off. Backend: NCCL when CUDA is available, gloo otherwise.

Non-finite hypergradients are detected per rank and the flag is reduced with the gradients, so all ranks raise
(or skip) together instead of one rank raising while the others wait in ``all_reduce`` forever.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import bilevel as bl

__all__ = ["Context", "setup"]


@dataclass
class Context:
    """The process's place in the job; ``world_size == 1`` when not launched by ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    on_nonfinite: str = "raise"
    owns_group: bool = False
    warned: bool = False       # the skip warning is given once per run; every skipped step is in results.json

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, meta_batch: int) -> int:
        """Tasks per rank; the global meta-batch must split evenly (so the average of rank means is exact)."""
        if meta_batch % self.world_size:
            raise ValueError(f"meta.batch={meta_batch} is not divisible by the world size {self.world_size}; "
                             f"use a meta-batch that is a multiple of --nproc_per_node.")
        return meta_batch // self.world_size

    def all_reduce_mean(self, grad: dict, metrics: dict, nonfinite: torch.Tensor):
        """Average ``grad`` and the scalar ``metrics`` over ranks; apply the non-finite policy on every rank at once.

        Returns ``(grad, metrics)`` with plain floats in ``metrics``; ``grad`` is ``None`` when the step is to be
        skipped (a non-finite hypergradient on some rank under ``on_nonfinite="warn"`` or ``"ignore"``).
        """
        names = list(metrics)
        device = next(iter(grad.values())).device   # NCCL reduces GPU tensors only
        scalars = torch.stack([torch.as_tensor(metrics[n], dtype=torch.float64, device=device) for n in names]
                              + [nonfinite.to(device, torch.float64).reshape(())])
        if self.world_size > 1:
            keys = list(grad)
            flat = torch.cat([grad[k].reshape(-1).double() for k in keys] + [scalars])
            torch_dist.all_reduce(flat)  # one message for everything; the mean of equal-sized rank means
            flat = flat / self.world_size
            out, i = {}, 0
            for k in keys:
                out[k] = flat[i:i + grad[k].numel()].view_as(grad[k]).to(grad[k].dtype)
                i += grad[k].numel()
            grad, scalars = out, flat[i:]
        metrics = dict(zip(names, scalars[:-1].cpu().tolist()))
        if scalars[-1] > 0 or not all(torch.isfinite(g).all() for g in grad.values()):
            message = ("non-finite hypergradient on at least one rank; lower the inner or meta learning rate, "
                       "or check the data")
            if self.on_nonfinite == "raise":
                raise bl.NonFiniteError(message)
            if self.on_nonfinite == "warn" and not self.warned:
                self.warned = True
                warnings.warn(message + "; the outer step is skipped on every rank (this and later skips are "
                              "listed in results.json as skipped_steps).", RuntimeWarning, stacklevel=2)
            # skip: no outer step on any rank (a zero gradient would still move Adam through its momentum)
            grad = None
        return grad, metrics

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup(cfg) -> Context:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); otherwise a 1-process context.

    Ranks let non-finite hypergradients through ``bl.meta_grad`` (``on_nonfinite="ignore"``) and
    :meth:`Context.all_reduce_mean` applies ``meta.on_nonfinite`` on every rank at once.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(on_nonfinite=cfg.meta.on_nonfinite)
    owns = not torch_dist.is_initialized()
    if owns:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    ctx = Context(torch_dist.get_rank(), torch_dist.get_world_size(), cfg.meta.on_nonfinite, owns)
    ctx.shard(cfg.meta.batch)  # a misconfiguration is an error before any training
    return ctx
