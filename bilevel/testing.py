"""Checking a hypergradient on your own problem: central finite differences and the dense implicit solution."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from .tree import pytree

from . import tree
from .methods import Implicit, Problem
from .linear_solve import Dense
from .types import Batch, HParams, Params


class HypergradCheck(NamedTuple):
    """Relative errors of a method's hypergradient.

    Attributes:
        fd_error: ``|| d_method − d_fd || / || d_fd ||`` over random directions, where ``d_fd`` are central finite
            differences of ``λ ↦ outer_loss(solver(λ), λ)`` in float64: the derivative of the finite computation.
        dense_error: ``|| g_method − g_dense || / || g_dense ||`` against the implicit hypergradient with a dense
            adjoint solve: the derivative of the exact solution (as far as the inner solver reached it).
        grad: the method's hypergradient (float64).
    """

    fd_error: float
    dense_error: float
    grad: HParams


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check_hypergrad(method, problem: Problem, hparams: HParams, inner_batch: Batch, outer_batch: Batch,
                    params0: Optional[Params] = None, *, eps: float = 1e-6, directions: int = 4,
                    seed: int = 0) -> HypergradCheck:
    """Compare ``method`` on your problem with finite differences and the dense implicit solution, in float64.

    Finite differences measure the derivative of what the inner solver computes; the dense solve measures the
    derivative of the exact inner solution. Methods that differentiate the finite computation (``Unrolled``,
    ``Forward``) should match the first; implicit methods the second, and both when the inner solve converged.
    The dense solve materialises the Hessian: keep ``params`` small (a few thousand entries).

    Example:
        >>> import torch, bilevel as bl
        >>> X, y = torch.randn(30, 4), torch.randn(30)
        >>> inner = lambda w, h, b: ((b[0] @ w["w"] - b[1]) ** 2).mean() + h["l2"].exp() * (w["w"] ** 2).sum()
        >>> outer = lambda w, h, b: ((b[0] @ w["w"] - b[1]) ** 2).mean()
        >>> problem = bl.Problem(inner, outer, bl.GradientDescent(lr=0.2, steps=300))
        >>> c = bl.check_hypergrad(bl.Implicit(bl.CG(steps=10)), problem, {"l2": torch.tensor(-2.0)},
        ...                        (X[:15], y[:15]), (X[15:], y[15:]), params0={"w": torch.zeros(4)})
        >>> c.fd_error < 1e-5 and c.dense_error < 1e-8
        True
    """
    hparams, params0, inner_batch, outer_batch = pytree.tree_map(_to64, (hparams, params0, inner_batch,
                                                                         outer_batch))
    grad = method(problem, hparams, inner_batch, outer_batch, params0).grad
    dense = Implicit(Dense())(problem, hparams, inner_batch, outer_batch, params0).grad

    def value(h):
        w, _ = problem.solve(h, inner_batch, params0)
        with torch.no_grad():
            return problem.outer_loss(w, h, outer_batch)

    gen = torch.Generator().manual_seed(seed)
    fd, est = [], []
    for _ in range(directions):
        v = tree.map(lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device), hparams)
        v = tree.scale(1 / tree.norm(v), v)
        fd.append((value(tree.axpy(eps, v, hparams)) - value(tree.axpy(-eps, v, hparams))) / (2 * eps))
        est.append(tree.vdot(grad, v))
    fd, est = torch.stack(fd), torch.stack(est)
    fd_error = float(torch.linalg.vector_norm(est - fd) / torch.linalg.vector_norm(fd))
    dense_error = float(tree.norm(tree.sub(grad, dense)) / tree.norm(dense))
    return HypergradCheck(fd_error, dense_error, grad)


def saved_bytes(fn):
    """Run ``fn()``; return ``(its output, bytes of the distinct tensor storages autograd saved for backward)``.

    What a backward pass will hold in memory, measured without a GPU: an adjoint or implicit backward saves the
    same bytes whatever the number of solver steps, unrolling saves more with every step.
    """
    seen, total = set(), [0]

    def pack(x):
        key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        # a detached alias: returning x itself would make a saved output reference its own grad_fn, a cycle that is
        # never freed
        return x.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, total[0]
