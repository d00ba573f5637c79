"""Seeded N-way K-shot task sampler producing stacked tensors.

Task ``i`` of meta-step ``step`` is drawn from its own generator seeded by ``(seed, step, i)``. Sampling therefore
has no state to save: a resumed run sees the same tasks as an uninterrupted one, and ranks of a distributed run
each draw their own slice of the global meta-batch and together see exactly the tasks of a one-process run.

Rotations (multiples of 90 degrees) are either new classes (``"classes"``: each character gives 4 classes, as in
Vinyals et al. and Santoro et al.), one random rotation per class per task (``"per_task"``: the MAML reference
code), or not used (``"none"``).

Classes come from any alphabets (``alphabets=None``), or all N classes of a task from one alphabet (Lake et al.'s
one-shot protocol): an alphabet is drawn uniformly among those with at least N classes, the others are skipped
(:attr:`TaskSampler.skipped` names them).

With ``batches=(count, size)`` the support set is returned as the inner loop's stream of ``count`` mini-batches of
``size`` (Reptile's reference, openai/supervised-reptile ``_mini_batches``): the N·K examples are shuffled, cut
into consecutive mini-batches, and reshuffled whenever they run out (a mini-batch may straddle two shuffles).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Tasks", "TaskSampler", "ROTATIONS"]

ROTATIONS = ("none", "classes", "per_task")


class Tasks(NamedTuple):
    """A stack of few-shot tasks. Labels are ``0..N-1`` in a random order of the sampled classes.

    Attributes:
        support: float images ``[tasks, N*K, 1, 28, 28]`` in ``[0, 1]``, class-major (K drawings of label 0 first).
        support_labels: int64 ``[tasks, N*K]``.
        query: ``[tasks, N*Q, 1, 28, 28]``; different drawings of the same classes (and rotations).
        query_labels: int64 ``[tasks, N*Q]``.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor

    def task(self, i: int) -> "Tasks":
        """The ``i``-th task, without the leading dimension."""
        return Tasks(*(t[i] for t in self))


class TaskSampler:
    """Draws N-way K-shot tasks with Q queries per class from a pool of characters.

    Args:
        images: uint8 ``[characters, drawings, H, W]`` (see :class:`tasks.omniglot.data.OmniglotImages`).
        pool: indices of the characters this sampler may use (one split).
        ways, shots, queries: N, K and Q.
        rotation: ``"none"``, ``"classes"`` or ``"per_task"`` (see the module docstring).
        seed: seed of the task stream (independent of the global RNG).
        alphabets: ``None`` (classes from any alphabet) or the alphabet of each character of ``pool``: every task
            then draws its N classes from one alphabet.
        batches: ``None`` (the support set, class-major) or ``(count, size)``: the support is then ``count``
            consecutive mini-batches of ``size`` examples, ``[tasks, count*size, ...]`` (see the module docstring),
            drawn from the task's own generator after its images.

    Raises:
        ValueError: N larger than the classes available (in every alphabet, when sampling within alphabets),
            K + Q larger than the drawings per class, bad names.
    """

    def __init__(self, images: torch.Tensor, pool, *, ways: int, shots: int, queries: int,
                 rotation: str = "none", seed: int = 0, alphabets=None, batches=None):
        pool = torch.as_tensor(list(pool), dtype=torch.long)
        if rotation not in ROTATIONS:
            raise ValueError(f"TaskSampler: rotation={rotation!r}; choose one of {ROTATIONS}.")
        if min(ways, shots, queries) < 1:
            raise ValueError(f"TaskSampler: ways, shots and queries must be >= 1, got {ways}, {shots}, {queries}.")
        if batches is not None and (len(batches) != 2 or min(batches) < 1):
            raise ValueError(f"TaskSampler: batches={batches!r}; use None or (count, size) with both >= 1.")
        classes = len(pool) * (4 if rotation == "classes" else 1)
        if ways > classes:
            raise ValueError(f"TaskSampler: {ways}-way tasks need {ways} classes but this split has {classes} "
                             f"({len(pool)} characters, rotation={rotation!r}); lower task.ways.")
        per_char = 4 if rotation == "classes" else 1
        self.groups, self.skipped = None, {}
        if alphabets is not None:
            alphabets = list(alphabets)
            if len(alphabets) != len(pool):
                raise ValueError(f"TaskSampler: {len(alphabets)} alphabet names for {len(pool)} characters.")
            members: dict[str, list[int]] = {}
            for pos, name in enumerate(alphabets):
                members.setdefault(name, []).append(pos)
            # Classes of an alphabet: its characters (x4 rotations with rotation="classes"), as class indices.
            groups = {name: torch.tensor([p * per_char + r for p in pos for r in range(per_char)])
                      for name, pos in sorted(members.items())}
            self.skipped = {name: len(g) for name, g in groups.items() if len(g) < ways}
            self.groups = [g for name, g in groups.items() if len(g) >= ways]
            if not self.groups:
                largest = max(groups.items(), key=lambda kv: len(kv[1]))
                raise ValueError(f"TaskSampler: {ways}-way tasks within one alphabet, but the largest alphabet of "
                                 f"this split, {largest[0]}, has {len(largest[1])} classes; lower task.ways or "
                                 f"use task.sampling=any.")
        drawings = images.shape[1]
        if shots + queries > drawings:
            raise ValueError(f"TaskSampler: shots + queries = {shots} + {queries} > {drawings} drawings per "
                             f"class; lower task.shots or task.queries.")
        # All 4 rotations precomputed once: sampling is then a single gather (a few hundred microseconds per task).
        self.images = torch.stack([torch.rot90(images[pool], k, dims=(-2, -1)) for k in range(4)], 1)
        self.num_classes, self.drawings = classes, drawings
        self.ways, self.shots, self.queries, self.rotation, self.seed = ways, shots, queries, rotation, seed
        self.batches = None if batches is None else tuple(batches)

    def _task(self, step: int, index: int):
        seed = int(np.random.SeedSequence([self.seed, step, index]).generate_state(1, np.uint64)[0] >> 1)
        g = torch.Generator().manual_seed(seed)
        n, m = self.ways, self.shots + self.queries
        if self.groups is None:
            cls = torch.randperm(self.num_classes, generator=g)[:n]
        else:
            group = self.groups[int(torch.randint(len(self.groups), (), generator=g))]
            cls = group[torch.randperm(len(group), generator=g)[:n]]
        if self.rotation == "classes":
            char, rot = cls // 4, cls % 4
        elif self.rotation == "per_task":
            char, rot = cls, torch.randint(4, (n,), generator=g)
        else:
            char, rot = cls, torch.zeros(n, dtype=torch.long)
        draw = torch.rand(n, self.drawings, generator=g).argsort(1)[:, :m]
        order = None
        if self.batches is not None:   # after the images: the tasks themselves do not depend on batches
            count, size = self.batches
            epochs = -(-count * size // (n * self.shots))
            order = torch.cat([torch.randperm(n * self.shots, generator=g) for _ in range(epochs)])[:count * size]
        return self.images[char[:, None], rot[:, None], draw], order   # [N, K+Q, H, W], [count*size] or None

    def sample(self, step: int, tasks: int, start: int = 0) -> Tasks:
        """Tasks ``start .. start+tasks-1`` of meta-step ``step`` (the same whatever else was sampled before)."""
        drawn = [self._task(step, start + i) for i in range(tasks)]
        x = torch.stack([images for images, _ in drawn]).float().div_(255).unsqueeze(3)
        k = self.shots
        n, h, w = self.ways, x.shape[-2], x.shape[-1]
        labels = torch.arange(n)
        support = x[:, :, :k].reshape(tasks, n * k, 1, h, w)
        support_labels = labels.repeat_interleave(k).expand(tasks, -1).contiguous()
        if self.batches is not None:
            order = torch.stack([o for _, o in drawn])
            support = torch.stack([s[o] for s, o in zip(support, order)])
            support_labels = torch.gather(support_labels, 1, order)
        return Tasks(support, support_labels, x[:, :, k:].reshape(tasks, n * self.queries, 1, h, w),
                     labels.repeat_interleave(self.queries).expand(tasks, -1).contiguous())
