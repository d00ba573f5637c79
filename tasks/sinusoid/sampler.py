"""Seeded sinusoid regression tasks: ``y = A sin(x − φ)``, A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5].

The ranges and the form ``A sin(x − φ)`` are those of the MAML reference code (cbfinn/maml,
``data_generator.generate_sinusoid_batch``). Task ``i`` of meta-step ``step`` is drawn from its own generator seeded
by ``(seed, step, i)`` (numpy's ``SeedSequence``), never from the global RNG: sampling has no state to checkpoint,
a resumed run sees the same tasks as an uninterrupted one, and validation / test streams are fixed by their seeds.
Deviation from the reference: the reference draws every task of a meta-batch from numpy's global RNG in sequence,
so its task stream depends on everything sampled before.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Tasks", "SinusoidSampler"]


class Tasks(NamedTuple):
    """A stack of sinusoid tasks.

    Attributes:
        support_x, support_y: ``[tasks, K, 1]`` inputs and targets the inner loop adapts on.
        query_x, query_y: ``[tasks, Q, 1]`` fresh points of the same sinusoids (the outer loss).
        amplitude, phase: ``[tasks]`` the task parameters A and φ.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor

    @property
    def support(self):
        return self.support_x, self.support_y

    @property
    def query(self):
        return self.query_x, self.query_y


class SinusoidSampler:
    """Draws K-shot sinusoid tasks with Q query points each.

    Args:
        shots: K, support points per task (the reference's ``update_batch_size``).
        queries: Q, query points per task (the reference uses Q = K).
        amplitude, phase, x_range: ``(low, high)`` of the uniform distributions of A, φ and x.
        seed: seed of the task stream (independent of the global RNG).
        device: where the tasks are put; they are drawn on the CPU, so every device sees the same tasks.

    Raises:
        ValueError: a count below 1 or a range with ``low > high`` (named).
    """

    def __init__(self, *, shots: int = 10, queries: int = 10, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0), seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
        if shots < 1 or queries < 1:
            raise ValueError(f"SinusoidSampler: shots and queries must be >= 1, got {shots} and {queries}.")
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"SinusoidSampler: {name}=({low}, {high}) needs low <= high.")
        self.shots, self.queries, self.seed, self.dtype, self.device = shots, queries, seed, dtype, torch.device(device)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def _generator(self, step: int, index: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, step, index]).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(seed)

    def sample(self, step: int, tasks: int, start: int = 0) -> Tasks:
        """Tasks ``start .. start+tasks-1`` of meta-step ``step`` (the same whatever else was sampled before)."""
        n = self.shots + self.queries
        u = torch.stack([torch.rand(2 + n, generator=self._generator(step, start + i), dtype=torch.float64)
                         for i in range(tasks)])
        (a_lo, a_hi), (p_lo, p_hi), (x_lo, x_hi) = self.amplitude, self.phase, self.x_range
        amplitude, phase = a_lo + (a_hi - a_lo) * u[:, 0], p_lo + (p_hi - p_lo) * u[:, 1]
        x = x_lo + (x_hi - x_lo) * u[:, 2:, None]
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        x, y, amplitude, phase = (t.to(self.device, self.dtype) for t in (x, y, amplitude, phase))
        k = self.shots
        return Tasks(x[:, :k], y[:, :k], x[:, k:], y[:, k:], amplitude, phase)
