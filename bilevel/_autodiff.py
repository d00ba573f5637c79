"""Gradients by plain ``torch.autograd`` at the top level, by ``torch.func`` under a transform: the same numbers.

Every method is written with ``torch.func`` so that it runs under ``vmap``, ``jvp`` and ``grad``. Outside every
transform, ``torch.func.grad`` would still wrap each operation of the loss and of its backward pass: a MAML
meta-step on 1-query tasks written with it costs 1.38x the same by plain autograd
(``benchmarks/per_task_overhead.py``); there these helpers call ``torch.autograd.grad`` instead. Inputs that
autograd already tracks stay tracked (``create_graph``), so a result remains differentiable exactly when
``torch.func.grad``'s would be.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad

from ._host import _under_transform
from .tree import pytree

Tree = dict


def _leaves(tree: Tree, keep_tracked: bool, others=()) -> Tree:
    """``tree`` with every tensor an input of its own: tracked tensors kept connected to their graph (if asked),
    others as fresh leaves.

    Own identity matters: with ``meta_init`` the params *are* the hparams' tensors, and ``autograd.grad`` with respect
    to a tensor the loss also reads as an hparam would add that path too, where ``torch.func.grad(argnums=0)`` takes
    the partial derivative with respect to params alone. A tracked tensor that is also one of ``others`` becomes a
    ``view_as`` alias, whose uses are its own.
    """
    shared = {id(t) for t in others}
    return {k: (v.view_as(v) if id(v) in shared else v) if keep_tracked and v.requires_grad
            else v.detach().requires_grad_() for k, v in tree.items()}


def _autograd(value: torch.Tensor, inputs: list, create_graph: bool) -> list:
    # an output that depends on no input (a truncated solve cut from θ) has gradient zero, as in torch.func
    if not value.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(value, inputs, create_graph=create_graph, allow_unused=True))


def _zeros_for_none(like: Tree, found) -> Tree:
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(like.items(), found)}


def grads(fn: Callable, *trees: Tree):
    """``(grads, aux)`` of ``fn(*trees) -> (scalar, aux)``: ``torch.func.grad(fn, argnums=(0, 1, ...),
    has_aux=True)(*trees)``. At the top level, with inputs that autograd does not track, by ``torch.autograd``.
    """
    if _under_transform() or any(v.requires_grad for t in trees for v in t.values()):
        return grad(fn, argnums=tuple(range(len(trees))), has_aux=True)(*trees)
    with torch.enable_grad():
        leaves = [_leaves(t, keep_tracked=False) for t in trees]
        value, aux = fn(*leaves)
        found = iter(_autograd(value, [v for t in leaves for v in t.values()], create_graph=False))
    return tuple(_zeros_for_none(t, [next(found) for _ in t]) for t in trees), aux


def gradient(loss: Callable) -> Callable:
    """``(params, hparams, batch) -> ∇_params loss``: ``torch.func.grad(loss)``. At the top level by
    ``torch.autograd.grad``, with ``create_graph`` when autograd tracks ``params`` or ``hparams`` (``Unrolled``
    differentiating through the inner steps) and on detached leaves otherwise (a solve under ``no_grad``)."""
    func_grad = grad(loss)

    def gradient_fn(params, hparams, batch):
        if _under_transform():
            return func_grad(params, hparams, batch)
        tracked = torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad
                                                  for v in pytree.tree_leaves((params, hparams)))
        with torch.enable_grad():
            leaves = _leaves(params, keep_tracked=tracked, others=pytree.tree_leaves(hparams))
            found = _autograd(loss(leaves, hparams, batch), list(leaves.values()), create_graph=tracked)
        return _zeros_for_none(params, found)

    return gradient_fn
