"""Inner solvers: train the task model ``params`` for fixed ``hparams``.

Every solver is a frozen dataclass with optax's shape, ``init(params) -> state`` and
``update(grads, state, params, hparams) -> (params, state)``, written out of place with ``torch.func.grad`` so
that ``Unrolled`` and ``Forward`` can differentiate through it and ``vmap`` can batch it over tasks.
``solver(inner_loss, params0, hparams, batch) -> (params, SolveInfo)`` runs a fixed budget of ``steps``.
Convergence: ``||∇_w inner_loss(w)|| <= tol`` (absolute) or ``<= rtol · ||∇_w inner_loss(w0)||`` (relative to
the start). With neither given (the default) it is judged once, at the end, at ``rtol = default_tol`` of the dtype,
and the loop does no norm or finiteness work per step (the speed of MAML's short inner loops). An explicit ``tol``
or ``rtol`` adds a masked early stop that freezes a task once reached (no ``.item()``, no Python branch on a
tensor, so it stays vmap-safe and every task in a batch runs the same number of iterations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from .tree import pytree

from . import tree
from ._autodiff import gradient
from ._host import _cadence, _check_now, _under_vmap
from .types import HParams, LossFn, Params, SolveInfo, default_tol

Rate = Union[float, str]
"""A step size: a number, or the name of an ``hparams`` entry (a learned inner learning rate)."""


def _where(cond, new, old):
    return pytree.tree_map(lambda a, b: torch.where(cond, a, b), new, old)


@dataclass(frozen=True)
class InnerSolver:
    """Base class: the fixed-budget loop shared by every inner solver.

    Args:
        steps: number of iterations (the budget; >= 0).
        tol: absolute gradient norm at which a task stops early and counts as converged (0: never).
        rtol: the same relative to the gradient norm at the start. With neither, convergence is judged at the end
            at ``rtol = default_tol`` of the dtype, with no early stop.
    """

    steps: int
    tol: Optional[float] = None
    rtol: Optional[float] = None

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"{name}(steps={self.steps!r}): steps must be a non-negative int.")
        for key in ("tol", "rtol"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ValueError(f"{name}({key}={value!r}): {key} must be None (no early stop) or >= 0.")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("lr", "momentum", "eps") and isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{name}({f.name}={v!r}): must be >= 0.")

    def init(self, params: Params) -> Any:
        raise NotImplementedError

    def update(self, grads: Params, state: Any, params: Params, hparams: HParams) -> tuple[Params, Any]:
        raise NotImplementedError

    def __call__(self, inner_loss: LossFn, params0: Params, hparams: HParams, batch) -> tuple[Params, SolveInfo]:
        params, _, info = self.run(inner_loss, params0, hparams, batch)
        return params, info

    def run(self, inner_loss: LossFn, params: Params, hparams: HParams, batch, steps: int | None = None,
            state: Any = None, info: SolveInfo | None = None) -> tuple[Params, Any, SolveInfo]:
        """Run ``steps`` iterations (default ``self.steps``) from ``params`` and optimizer ``state``.

        Resuming from a returned ``(params, state, info)`` continues the same trajectory, which is how
        ``Unrolled(truncate=K)`` splits the budget into a detached head and a differentiated tail.

        ``info.residual`` is the gradient norm at the last iterate where the gradient was evaluated: the
        returned params themselves once converged, the iterate one step earlier otherwise. ``info.scale`` is the
        gradient norm at the start (NaN when no step ran).
        """
        steps = self.steps if steps is None else steps
        state = self.init(params) if state is None else state
        grad_fn = gradient(inner_loss)
        ref = next(iter(params.values()))
        fresh = info is None or not isinstance(info.scale, torch.Tensor)
        if fresh:  # the flags are never changed in place: one false and one NaN serve them all
            false, nan = ref.new_zeros((), dtype=torch.bool), ref.new_full((), float("nan"))
            info = SolveInfo(steps=ref.new_zeros((), dtype=torch.long), residual=ref.new_full((), float("inf")),
                             converged=false, nonfinite=false, indefinite=false, diverged=false, curvature=nan,
                             scale=nan)
        count, residual, done, bad = info[:4]
        scale = info.scale  # a resumed run keeps the scale of the first start
        early = self.tol is not None or self.rtol is not None  # static: per-step norms and masks only if asked
        tol = -1.0 if self.tol is None else self.tol
        rtol = (-1.0 if early else default_tol(ref.dtype)) if self.rtol is None else self.rtol
        # outside vmap a converged solve can simply stop (the masked steps would change nothing); the check is a host
        # read, made every step on the CPU and every few off it (bilevel._host's cadence)
        can_stop = early and (tol > 0 or rtol > 0) and not _under_vmap()
        every = _cadence(None, ref.device)
        for step in range(steps):
            if can_stop and _check_now(step, every) and bool(done):
                break
            g = grad_fn(params, hparams, batch)
            if early or step == 0 or step == steps - 1:
                gnorm = tree.norm_value(g)
                if step == 0:
                    scale = gnorm if fresh else torch.where(torch.isnan(scale), gnorm, scale)
                residual = gnorm
            new_params, new_state = self.update(g, state, params, hparams)
            if early:
                bad = bad | ~torch.isfinite(gnorm)
                done = done | (residual <= tol) | (residual <= rtol * scale)
                new_params, new_state = tree.where(done, params, new_params), _where(done, state, new_state)
                count = count + (~done).long()
            params, state = new_params, new_state
        if not early and steps:
            count = count + steps
            done = (residual <= tol) | (residual <= rtol * scale)
        if steps and not early:
            bad = bad | ~torch.isfinite(residual)
        bad = bad | ~tree.all_finite(params)
        done = done & ~bad
        return params, state, SolveInfo(count, residual, done, bad, info.indefinite, info.diverged, info.curvature,
                                        scale)


def _rate(rate: Rate, hparams: HParams):
    if isinstance(rate, str):
        if rate not in hparams:
            raise KeyError(f"learning rate {rate!r} names no hparams entry; hparams keys: {sorted(hparams)}")
        return hparams[rate]
    return rate


@dataclass(frozen=True)
class GradientDescent(InnerSolver):
    """Gradient descent with optional heavy-ball or Nesterov momentum.

    ``v ← μ v + ∇L(w)``; ``w ← w − η v`` (heavy ball) or ``w ← w − η (∇L(w) + μ v)`` (Nesterov); μ = 0 is plain GD.

    Args:
        lr: step size η, a number or the name of an ``hparams`` entry.
        steps: see ``InnerSolver``.
        tol: see ``InnerSolver``.
        momentum: μ.
        nesterov: use the Nesterov form.

    Example:
        >>> import torch, bilevel as bl
        >>> loss = lambda w, h, b: ((w["x"] - b) ** 2).sum()
        >>> w, info = bl.GradientDescent(lr=0.25, steps=50)(loss, {"x": torch.zeros(2)}, {}, torch.ones(2))
        >>> torch.allclose(w["x"], torch.ones(2)), bool(info.converged)  # gradient norm at float32's sqrt(eps)
        (True, True)
    """

    lr: Rate = 0.1
    momentum: float = 0.0
    nesterov: bool = False

    def init(self, params):
        return tree.zeros_like(params) if self.momentum else ()

    def update(self, grads, state, params, hparams):
        lr = _rate(self.lr, hparams)
        if not self.momentum:
            return tree.axpy(-lr, grads, params), state
        velocity = tree.axpy(self.momentum, state, grads)
        direction = tree.axpy(self.momentum, velocity, grads) if self.nesterov else velocity
        return tree.axpy(-lr, direction, params), velocity


@dataclass(frozen=True)
class Adam(InnerSolver):
    """Adam (Kingma & Ba, 2015), out of place: ``w ← w − η m̂ / (sqrt(v̂) + ε)`` with bias-corrected moments."""

    lr: Rate = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, params):
        ref = next(iter(params.values()))
        return (ref.new_zeros(()), tree.zeros_like(params), tree.zeros_like(params))

    def update(self, grads, state, params, hparams):
        lr, (b1, b2) = _rate(self.lr, hparams), self.betas
        t, m, v = state
        t = t + 1
        m = tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = tree.map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        params = tree.map(lambda w, m_, v_: w - lr * (m_ / c1) / (torch.sqrt(v_ / c2) + self.eps), params, m, v)
        return params, (t, m, v)


def proximal(inner_loss: LossFn, reg: float) -> LossFn:
    """The iMAML inner loss: ``inner_loss(w, θ, batch) + reg/2 · Σ_k ||w_k − θ_k||²``.

    ``hparams`` hold the meta-initialisation θ under the same keys as ``params``. Its stationarity condition
    ``∇L(w) + reg (w − θ) = 0`` gives the iMAML hypergradient ``(I + H/reg)⁻¹ ∇L_out(w*)`` (Rajeswaran et al.,
    2019, https://arxiv.org/abs/1909.04630).
    """
    if not reg > 0:
        raise ValueError(f"proximal(reg={reg!r}): reg must be > 0 (it is the strength of the pull towards θ).")

    def proximal_loss(params, hparams, batch):
        pull = sum(((params[k] - hparams[k]) ** 2).sum() for k in params)
        return inner_loss(params, hparams, batch) + 0.5 * reg * pull

    proximal_loss.reg = reg  # imaml(reg) checks that it assumes this same number
    return proximal_loss


def meta_init(hparams: HParams) -> Params:
    """``init`` for meta-learning: the task model starts from the meta-parameters θ (``params0 = hparams``)."""
    return dict(hparams)
