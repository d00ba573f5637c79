"""Arithmetic on dicts of tensors (the ``params`` / ``hparams`` trees), out of place and vmap-safe."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._host import _under_transform

# torch has no public pytree module: torch.utils._pytree is private, though torch.func walks its own arguments with
# it. It is imported here only; the rest of bilevel reaches it as `tree.pytree` (or the two names below), and
# tests/test_dependencies.py pins what bilevel uses of it, so a torch release that changes it fails one named test.
from torch.utils import _pytree as pytree  # noqa: E402

tree_flatten, tree_unflatten = pytree.tree_flatten, pytree.tree_unflatten

Tree = dict[str, Tensor]


def map(fn: Callable[..., Tensor], tree: Tree, *rest: Tree) -> Tree:  # noqa: A001 - mirrors jax.tree.map
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def add(a: Tree, b: Tree) -> Tree:
    return {k: a[k] + b[k] for k in a}


def sub(a: Tree, b: Tree) -> Tree:
    return {k: a[k] - b[k] for k in a}


def scale(s, a: Tree) -> Tree:
    return {k: s * v for k, v in a.items()}


def axpy(s, x: Tree, y: Tree) -> Tree:
    """``s * x + y``."""
    return {k: s * x[k] + y[k] for k in x}


def neg(a: Tree) -> Tree:
    return {k: -v for k, v in a.items()}


def vdot(a: Tree, b: Tree) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def norm(a: Tree) -> Tensor:
    return torch.sqrt(vdot(a, a))


def norm_value(a: Tree) -> Tensor:
    """``norm(a)`` as a value outside every autograd graph (a diagnostic): ``torch.nn.utils.get_total_norm``, one
    fused kernel over the leaves, where it can run (no ``torch.func`` transform, one dtype); a few ops per leaf
    otherwise."""
    with torch.no_grad():
        leaves = list(a.values())
        if _under_transform() or len({v.dtype for v in leaves}) > 1:
            return norm(a).detach()
        return torch.nn.utils.get_total_norm(leaves)


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def where(cond: Tensor, a: Tree, b: Tree) -> Tree:
    """Elementwise ``a if cond else b`` with a scalar boolean ``cond``: the masked update of every solver."""
    return {k: torch.where(cond, a[k], b[k]) for k in a}


def all_finite(a: Tree) -> Tensor:
    """Whether every entry is finite: one sum per leaf, which a NaN or inf poisons (a total beyond the dtype's range,
    a divergence in any case, counts as non-finite too). Four times cheaper than ``isfinite(v).all()`` per leaf on
    a conv4 (this runs once per inner solve of every task)."""
    return torch.isfinite(sum(v.sum() for v in a.values()))


def flatten(a: Tree) -> Tensor:
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(flat: Tensor, like: Tree) -> Tree:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = flat[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def describe(a: Tree) -> str:
    """``{name: shape}`` for error messages."""
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in a.items()) + "}"
