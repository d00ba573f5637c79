r"""Neural ODEs: ``odeint`` with the adjoint method, usable inside ``torch.func`` transforms.

The layer returns the solution of the initial value problem

    dh/dt = f(t, h, *args),    h(t₀) = h0,

at the times ``t = (t₀, t₁, ..., t_N)`` (stacked: ``ys[i] = h(t_i)``, ``ys[0] = h0``).

**The adjoint backward** (Pontryagin; Chen et al. 2018, https://arxiv.org/abs/1806.07366). With ``L`` a function of
the outputs and the adjoint ``a(t) = ∂L/∂h(t)``,

    da/dt = −aᵀ ∂f/∂h,        dL/dθ = ∫_{t₀}^{t_N} aᵀ ∂f/∂θ dt,

solved backward in time from ``a(t_N) = ∂L/∂ys[N]`` together with ``h`` itself (the augmented state
``(h, a, g_θ)``), adding ``∂L/∂ys[i]`` to ``a`` at each output time. Nothing of the forward trajectory is stored
but the outputs ``ys``: memory is flat in the number of solver steps. The price is a second ODE solve, and a
gradient that is that of the *continuous* solution: it approaches the derivative of the discrete forward solve as
the step (or tolerance) shrinks, with an error of the solver's order, and it is not the exact gradient of the
computed output. ``adjoint=False`` backpropagates through the solver's operations instead: the exact gradient of
the discrete computation, with memory growing with the steps.

Solvers, written with torch ops only:

| method     | order | steps                                                                        | f per step |
|------------|-------|------------------------------------------------------------------------------|------------|
| ``euler``  | 1     | fixed: ``ceil(|t_{i+1} − t_i| / step_size)`` equal steps per interval         | 1          |
| ``rk4``    | 4     | fixed, as ``euler`` (classic Runge–Kutta)                                     | 4          |
| ``dopri5`` | 5(4)  | adaptive: Dormand–Prince with error control ``rtol``, ``atol``                 | 6 (FSAL)   |

Deviations from torchdiffeq 0.2.5 (the reference, ``_impl/rk_common.py``, ``misc.py``, ``adjoint.py``):

- ``dopri5`` lands exactly on every output time (the step is clipped) instead of interpolating dense output;
  the step-size controller (safety 0.9, growth ≤ 10, shrink ≥ 0.2 after a rejection, no shrink after an
  acceptance, Hairer's initial step) is torchdiffeq's, but runs outside autograd (``adjoint=False`` does not
  differentiate the step sizes, as diffrax's ``RecursiveCheckpointAdjoint`` does not).
- every loop is a masked loop with a fixed budget (``max_steps`` steps per batch entry), so the solve runs under
  ``vmap`` with one step-size sequence per entry, each the one a solve of that entry alone takes; the loop stops
  once every entry has reached the output time (read on the host every ``check_every`` iterations).
- ``rk4`` is the classic 1/6-1/3-1/3-1/6 rule (torchdiffeq's ``rk4`` is the 3/8 rule).
- the adjoint error norm is the maximum of the RMS norms of ``h``, ``a`` and the parameter integrals, as
  torchdiffeq's default ``_mixed_norm``. The derivative in ``t`` is computed from its closed form
  (``dL/dt_i = ȳ_i·f(t_i, y_i)``, ``dL/dt_0 = −a(t_0)·f(t_0, h0)``) instead of torchdiffeq's integrated time
  adjoint; both are that of the continuous solution.

Failures are reported, never hidden: reaching ``max_steps`` before the end time, a step size that underflows, or
a NaN/inf in the solution raise (``on_nonconvergence`` / ``on_nonfinite``; under ``vmap`` only the returned
``ODEInfo`` says so, as with the other layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor
from .tree import tree_flatten, tree_unflatten

from .diagnostics import POLICIES, NonConvergenceError, NonFiniteError, _policy
from ._host import _all_true, _cadence, _check_every_ok, _check_now, _under_vmap, _unwrapped
from .root_find import Record

METHODS = ("euler", "rk4", "dopri5")
FIXED = ("euler", "rk4")


class ODEInfo(NamedTuple):
    """How an ODE solve went (forward, or the adjoint solve backward). A NamedTuple of tensors, so it passes
    through ``vmap`` (one per problem).

    Attributes:
        nfe: evaluations of ``f`` (for the adjoint solve: of the augmented dynamics, each one ``f`` and one VJP).
        accepted: accepted steps.
        rejected: rejected steps (adaptive solver only).
        converged: the last output time was reached within ``max_steps`` with a step size that did not underflow.
        nonfinite: a NaN or inf appeared in the solution.
        rtol, atol: the tolerances the solve was run with (``0`` for fixed-step solvers, which have none).
    """

    nfe: Tensor
    accepted: Tensor
    rejected: Tensor
    converged: Tensor
    nonfinite: Tensor
    rtol: Tensor
    atol: Tensor


# Dormand–Prince 5(4) (Dormand & Prince 1980; Hairer, Nørsett & Wanner, Table II.5.2): nodes, stage weights,
# 5th-order solution weights (equal to the last stage row: FSAL) and the 5th − 4th order error weights.
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
         -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
_SAFETY, _GROW, _SHRINK = 0.9, 10.0, 0.2


def _comb(y, h, ks, weights):
    """``y + h Σ w_j k_j`` for a state that is a tuple of tensors."""
    out = []
    for i, yi in enumerate(y):
        acc = yi
        for w, k in zip(weights, ks):
            if w != 0.0:
                acc = acc + (h * w).to(yi.dtype) * k[i]
        out.append(acc)
    return tuple(out)


def _where(mask, a, b):
    return tuple(torch.where(mask, x, y) for x, y in zip(a, b))


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def _norm(parts) -> Tensor:
    """Maximum over the state's tensors of their RMS norm (torchdiffeq's ``_mixed_norm``)."""
    return torch.stack([_rms(p) for p in parts]).amax()


def _finite(y) -> Tensor:
    return torch.stack([torch.isfinite(x).all() for x in y]).all()


def _dopri_step(fn, t, y, k1, h):
    ks = [k1]
    for c, a in zip(_DP_C, _DP_A):
        ks.append(fn(t + c * h, _comb(y, h, ks, a)))
    y_new = _comb(y, h, ks[:6], _DP_A[-1])
    err = tuple(e - yi for e, yi in zip(_comb(y, h, ks, _DP_E), y))
    return y_new, err, ks[-1]


def _fixed_step(method, fn, t, y, h):
    if method == "euler":
        return _comb(y, h, [fn(t, y)], (1.0,))
    k1 = fn(t, y)
    k2 = fn(t + h / 2, _comb(y, h, [k1], (0.5,)))
    k3 = fn(t + h / 2, _comb(y, h, [k2], (0.5,)))
    k4 = fn(t + h, _comb(y, h, [k3], (1.0,)))
    return _comb(y, h, [k1, k2, k3, k4], (1 / 6, 1 / 3, 1 / 3, 1 / 6))


def _initial_step(fn, t0, y0, f0, direction, rtol, atol, order=5):
    """Hairer, Nørsett & Wanner, Sec. II.4 (as torchdiffeq's ``_select_initial_step``), without Python branches."""
    scale = [atol + rtol * y.abs() for y in y0]
    d0 = _norm([y / s for y, s in zip(y0, scale)]).to(t0.dtype)
    d1 = _norm([f / s for f, s in zip(f0, scale)]).to(t0.dtype)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
    f1 = fn(t0 + direction * h0, _comb(y0, direction * h0, [f0], (1.0,)))
    d2 = _norm([(a - b) / s for a, b, s in zip(f1, f0, scale)]).to(t0.dtype) / h0
    dmax = torch.maximum(d1, d2)
    flat = dmax <= 1e-15
    h1 = torch.where(flat, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / torch.where(flat, torch.ones_like(dmax), dmax)) ** (1.0 / (order + 1)))
    return torch.minimum(100 * h0, h1)


def _integrate(fn: Callable, y0: tuple, t: Tensor, method: str, rtol: float, atol: float,
               step_size: Optional[float], max_steps: int, check_every: int, reset: Optional[list] = None,
               jump: Optional[Callable] = None) -> tuple[list, ODEInfo]:
    """Integrate ``dy/dt = fn(t, y)`` (``y`` a tuple of tensors) through the times ``t``; return the states at
    every ``t[i]`` and the stats. ``reset(i, y)`` / ``jump(i, y)`` let the adjoint replace or add to the state at
    each output time before the next interval starts. The adaptive loop reads whether every entry is done on the
    host every ``check_every`` iterations (0: never)."""
    zero = torch.zeros((), dtype=torch.long, device=t.device)
    nfe, accepted, rejected = zero, zero, zero
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    nonfinite = ~ok
    outs, y = [y0], y0
    eps = torch.finfo(t.dtype).eps
    if method == "dopri5":
        k1 = fn(t[0], y)
        direction = torch.sign(t[-1] - t[0]) if len(t) > 1 else torch.ones_like(t[0])
        dt = _initial_step(fn, t[0], y, k1, direction, rtol, atol).detach()
        nfe = nfe + 2
    for i in range(1, len(t)):
        ta, tb = t[i - 1], t[i]
        if method in FIXED:
            n = max(1, math.ceil(_largest(tb - ta) / step_size)) if step_size else 1
            h = (tb - ta) / n
            for j in range(n):
                y = _fixed_step(method, fn, ta + j * h, y, h)
            nfe = nfe + n * (1 if method == "euler" else 4)
            accepted = accepted + n
            finite = _finite(y)
            nonfinite, ok = nonfinite | ~finite, ok & finite
        else:
            direction = torch.sign(tb - ta)
            tc = ta
            # max_steps bounds each entry's own accepted + rejected steps: under vmap an entry's steps do not
            # depend on the others', and the masked iterations between two host reads use none of it
            done = (tc == tb) | ~ok | (accepted + rejected >= max_steps)
            for k in range(max_steps):  # an entry not done takes a step per iteration: all are done by the end
                if _check_now(k, check_every) and _all_true(done):
                    break
                remaining = (tb - tc).abs()
                hmag = torch.minimum(dt, remaining)
                last = hmag >= remaining
                y_new, err, k_new = _dopri_step(fn, tc, y, k1, direction * hmag)
                nfe = nfe + 6 * (~done).long()
                scale = [atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y, y_new)]
                # the controller runs outside autograd (adjoint=False differentiates the steps, not their sizes)
                ratio = _norm([e / s for e, s in zip(err, scale)]).detach().to(t.dtype)
                finite = torch.isfinite(ratio) & _finite(y_new)
                accept = ~done & finite & (ratio <= 1)
                reject = ~done & ~accept
                y, k1 = _where(accept, y_new, y), _where(accept, k_new, k1)
                tc = torch.where(accept, torch.where(last, tb, tc + direction * hmag), tc)
                safe_ratio = torch.where(finite & (ratio > 0), ratio, torch.ones_like(ratio))
                factor = torch.clamp(_SAFETY * safe_ratio ** -0.2, max=_GROW)
                factor = torch.where(ratio <= 1, torch.clamp(factor, min=1.0), torch.clamp(factor, min=_SHRINK))
                factor = torch.where(finite, torch.where(ratio == 0, torch.full_like(factor, _GROW), factor),
                                     torch.full_like(factor, _SHRINK))
                dt_new = hmag * factor
                # a step clipped to land on t[i] says little about the step size the problem allows
                dt_new = torch.where(accept & last, torch.maximum(dt_new, dt), dt_new)
                dt = torch.where(done, dt, dt_new)
                accepted, rejected = accepted + accept.long(), rejected + reject.long()
                underflow = reject & (dt <= 16 * eps * torch.maximum(tc.abs(), tb.abs()).clamp(min=1.0))
                nonfinite = nonfinite | (underflow & ~finite)
                ok = ok & ~underflow
                done = done | (tc == tb) | underflow | (accepted + rejected >= max_steps)
            ok = ok & (tc == tb)  # the budget ran out before t[i]
        outs.append(y)
        if reset is not None or jump is not None:
            y = reset(i, y) if reset is not None else y
            y = jump(i, y) if jump is not None else y
            if method == "dopri5" and i < len(t) - 1:
                k1 = fn(tb, y)  # the state changed: the FSAL stage is stale
                nfe = nfe + 1
    like = torch.zeros((), dtype=t.dtype, device=t.device)
    tols = (like + (0.0 if method in FIXED else rtol), like + (0.0 if method in FIXED else atol))
    return outs, ODEInfo(nfe, accepted, rejected, ok & ~nonfinite, nonfinite, *tols)


def _largest(x: Tensor) -> float:
    """``max |x|`` on the host, over every batch entry under ``vmap`` (one step count for the whole batch)."""
    plain = _unwrapped(x)
    if plain is None and _under_vmap():
        try:
            return float(x.abs().max())
        except RuntimeError as err:  # x is batched, and this torch cannot read its entries
            raise ValueError("odeint(step_size=...): under vmap over t this torch cannot read every entry's "
                             "interval length to count the steps; vmap over h0 or args with t shared, or use "
                             "method='dopri5'.") from err
    return float((x if plain is None else plain).abs().max())


def _recorded(info: ODEInfo) -> Optional[ODEInfo]:
    """``info`` for a ``Record``, with every batch entry under ``vmap``; ``None`` under a ``torch.func`` transform
    if this torch cannot read the entries (a wrapped tensor would be dead once the transform returns)."""
    plain = [_unwrapped(x) for x in info]
    if plain[0] is None:
        return None if _under_vmap() else ODEInfo(*(x.detach() for x in info))
    return ODEInfo(*(x.detach() for x in plain))


@dataclass(frozen=True)
class _Spec:
    f: Callable
    treedef: Any
    constants: tuple
    method: str
    rtol: float
    atol: float
    step_size: Optional[float]
    max_steps: int
    check_every: int
    adjoint_rtol: float
    adjoint_atol: float
    on_nonconvergence: str
    on_nonfinite: str
    record: Optional[Record]

    def args(self, tensors) -> list:
        it = iter(tensors)
        return tree_unflatten([next(it) if c is _TENSOR else c for c in self.constants], self.treedef)


_TENSOR = object()


def _report(info: ODEInfo, what: str, hint: str, on_nonconvergence: str, on_nonfinite: str):
    if _under_vmap():
        return
    info = ODEInfo(*(x.detach() for x in info))
    if bool(info.nonfinite.any()):
        _policy(on_nonfinite, NonFiniteError, f"{what}: NaN or inf in the solution. Check f and h0, or use float64.")
    failed = ~info.converged & ~info.nonfinite
    if bool(failed.any()):
        _policy(on_nonconvergence, NonConvergenceError,
                f"{what}: did not reach the last output time ({int(info.accepted.max())} accepted, "
                f"{int(info.rejected.max())} rejected steps). {hint}")


class _OdeAdjoint(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(spec: _Spec, h0: Tensor, t: Tensor, *tensors: Tensor):
        args = spec.args(tensors)
        outs, info = _integrate(lambda s, y: (spec.f(s, y[0], *args),), (h0,), t, spec.method, spec.rtol,
                                spec.atol, spec.step_size, spec.max_steps, spec.check_every)
        return (torch.stack([y[0] for y in outs]), *info)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, h0, t, *tensors = inputs
        ctx.spec = spec
        ctx.mark_non_differentiable(*output[1:])
        # one list for both: torch's generated vmap rule gives the tensors of both calls the batch dims of one
        # (a shared h0 made the saved ys look unbatched to a backward() run outside vmap)
        ctx.save_for_backward(output[0], h0, t, *tensors)
        ctx.save_for_forward(output[0], h0, t, *tensors)

    @staticmethod
    def jvp(ctx, _, h0_dot, t_dot, *tensor_dots):
        # forward mode: the variational equation dḣ/dt = ∂f/∂h ḣ + ∂f/∂θ θ̇ solved alongside h. For a fixed-step
        # Runge–Kutta method this is the exact derivative of the discrete solve (an explicit RK step commutes with
        # linearisation); the adaptive solver controls the error of (h, ḣ) together.
        spec: _Spec = ctx.spec
        _, h0, t, *tensors = ctx.saved_tensors
        moving = [i for i, d in enumerate(tensor_dots) if d is not None]
        h0_dot = torch.zeros_like(h0) if h0_dot is None else h0_dot
        args = spec.args(tensors)
        out0_dot = h0_dot  # ys[0] = h0, whatever t_0
        if t_dot is not None:  # moving t_0 shifts the trajectory: as a change −f(t_0, h0)·ṫ_0 of h0
            h0_dot = h0_dot - spec.f(t[0], h0, *args) * t_dot[0].to(h0.dtype)

        def dynamics(s, state):
            def f_of(h, *chosen):
                full = list(tensors)
                for i, x in zip(moving, chosen):
                    full[i] = x
                return spec.f(s, h, *spec.args(full))

            return torch.func.jvp(f_of, (state[0], *(tensors[i] for i in moving)),
                                  (state[1], *(tensor_dots[i] for i in moving)))

        outs, _ = _integrate(dynamics, (h0, h0_dot), t, spec.method, spec.rtol, spec.atol, spec.step_size,
                             spec.max_steps, spec.check_every)
        tangent = [y[1] for y in outs]
        if t_dot is not None:  # an output time that moves reads the trajectory elsewhere: + f(t_i, y_i)·ṫ_i
            tangent = [out0_dot] + [tangent[i] + spec.f(t[i], outs[i][0], *args) * t_dot[i].to(h0.dtype)
                                    for i in range(1, len(t))]
        return (torch.stack(tangent),) + (None,) * len(ODEInfo._fields)

    @staticmethod
    def backward(ctx, ys_bar, *_):
        spec: _Spec = ctx.spec
        ys, _, t, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wanted = [i for i, need in enumerate(needs[3:]) if need]
        if not (needs[1] or needs[2] or wanted):
            return (None,) * (3 + len(tensors))
        # nothing is detached: the backward is made of differentiable ops, so a second derivative (MAML through an
        # inner gradient step) differentiates the adjoint solve in turn

        def dynamics(s, state):
            # state = (h, a, g_1, ..., g_k); returns (f, −aᵀ∂f/∂h, −aᵀ∂f/∂θ_1, ...), integrated from t_N to t_0
            h, a = state[0], state[1]

            def f_of(h, *chosen):
                full = list(tensors)
                for i, x in zip(wanted, chosen):
                    full[i] = x
                return spec.f(s, h, *spec.args(full))

            fh, pullback = torch.func.vjp(f_of, h, *(tensors[i] for i in wanted))
            cot = pullback(a)
            return (fh, *(-c for c in cot))

        state = (ys[-1], ys_bar[-1], *(torch.zeros_like(tensors[i]) for i in wanted))
        n = len(t)
        rev = t.flip(0)
        # output k of the reversed solve is time t[n-1-k]: restart h from the stored forward state there (as
        # torchdiffeq does) and add that output's cotangent to the adjoint
        reset = lambda k, y: (ys[n - 1 - k], *y[1:])  # noqa: E731
        jump = lambda k, y: (y[0], y[1] + ys_bar[n - 1 - k], *y[2:])  # noqa: E731
        outs, info = _integrate(dynamics, state, rev, spec.method, spec.adjoint_rtol, spec.adjoint_atol,
                                spec.step_size, spec.max_steps, spec.check_every, reset=reset, jump=jump)
        final = outs[-1]
        h0_bar = final[1] + ys_bar[0]
        if spec.record is not None:
            spec.record.backward = _recorded(info)
        _report(info, f"odeint backward (adjoint {spec.method})",
                "Raise max_steps, loosen adjoint_rtol/adjoint_atol, or check that f is smooth along the trajectory.",
                spec.on_nonconvergence, spec.on_nonfinite)
        t_bar = None
        if needs[2]:
            # the trajectory depends on t only through its start: dL/dt_i = ȳ_i · f(t_i, y_i) for i >= 1, and moving
            # t_0 with h(t_0) = h0 held shifts the whole trajectory: dL/dt_0 = −a(t_0) · f(t_0, h0)
            args = spec.args(tensors)
            slopes = [spec.f(t[i], ys[i], *args) for i in range(n)]
            t_bar = torch.stack([-(final[1] * slopes[0]).sum()]
                                + [(ys_bar[i] * slopes[i]).sum() for i in range(1, n)]).to(t.dtype)
        grads = [None] * len(tensors)
        for i, g in zip(wanted, final[2:]):
            grads[i] = g
        return (None, h0_bar if needs[1] else None, t_bar, *grads)


def odeint(f: Callable, h0: Tensor, t: Tensor, *args, method: str = "dopri5", rtol: float = 1e-7,
           atol: float = 1e-9, step_size: Optional[float] = None, adjoint: bool = True,
           adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None, max_steps: int = 4096,
           check_every: Optional[int] = None, on_nonconvergence: str = "raise", on_nonfinite: str = "raise",
           return_info: bool = False, record: Optional[Record] = None):
    r"""Solve ``dh/dt = f(t, h, *args)``, ``h(t[0]) = h0``, differentiable in ``h0`` and ``args``.

    The math, the solvers and when the gradient is exact are in the module docstring (``bilevel.ode``).

    Args:
        f: ``f(t, h, *args) -> Tensor`` shaped like ``h`` (torchdiffeq's and scipy's ``(t, y)`` order); a pure
            function of its inputs: weights enter through ``args`` (e.g. ``dict(module.named_parameters())`` with
            ``torch.func.functional_call``).
        h0: the initial state, a floating-point tensor of any shape.
        t: a 1-D tensor of at least two strictly increasing or strictly decreasing times; differentiable with the
            adjoint (the derivative of the continuous solution) or with a fixed-step method.
        *args: tensors, or pytrees of tensors and constants.
        method: ``"dopri5"`` (adaptive), ``"rk4"`` or ``"euler"`` (fixed step).
        rtol, atol: the adaptive solver's error control: a step is accepted when the RMS of
            ``err / (atol + rtol·max(|h|, |h_new|))`` is at most 1. The defaults are torchdiffeq's; in float32 an
            ``rtol`` below ~1e-6 is near round-off and buys steps, not accuracy.
        step_size: fixed-step solvers: the largest step (each interval of ``t`` is cut into equal steps); ``None``
            takes one step per interval.
        adjoint: ``True``: the adjoint backward (O(1) memory in the steps); forward mode (``torch.func.jvp``,
            ``jacfwd``) solves the variational equation alongside ``h``. ``False``: backpropagate through the
            solver (the exact gradient of the discrete solve).
        adjoint_rtol, adjoint_atol: the backward solve's tolerances (default: ``rtol``, ``atol``).
        max_steps: budget of adaptive steps (accepted + rejected) for the whole solve, forward and backward each
            (under ``vmap``: for each entry).
        check_every: the adaptive loop reads whether every entry has reached the next output time on the host (a
            device-to-host synchronisation on an accelerator) every ``check_every`` steps; ``0`` never (each
            interval of ``t`` then runs the whole ``max_steps``); ``None``: 1 on the CPU, 8 elsewhere. The steps
            between two reads are masked: the result is the same for every value.
        on_nonconvergence: ``"raise" | "warn" | "ignore"`` when ``max_steps`` ends the solve early or the step size
            underflows (default ``"raise"``: the output would be at the wrong time).
        on_nonfinite: the same for NaN/inf in the solution.
        return_info: also return the forward ``ODEInfo``.
        record: a ``bilevel.layers.Record``; after the backward pass ``record.backward`` holds the adjoint solve's
            ``ODEInfo`` (and ``record.forward`` the forward one).

    Returns:
        ``ys`` of shape ``(len(t), *h0.shape)`` with ``ys[i] ≈ h(t[i])`` (and the ``ODEInfo`` if ``return_info``).

    Example:
        >>> import torch
        >>> from bilevel.layers import odeint
        >>> k = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> t = torch.tensor([0.0, 2.0], dtype=torch.float64)
        >>> ys = odeint(lambda t, h, k: -k * h, torch.ones((), dtype=torch.float64), t, k)   # h(t) = exp(-k t)
        >>> bool(torch.isclose(ys[-1], torch.exp(-2 * k), rtol=1e-6))
        True
        >>> ys[-1].backward(); bool(torch.isclose(k.grad, -2 * torch.exp(-2 * k.detach()), rtol=1e-5))
        True
    """
    if not callable(f):
        raise TypeError(f"odeint(f, ...): f must be a function f(t, h, *args), got {type(f).__name__}.")
    if not isinstance(h0, Tensor) or not h0.is_floating_point():
        got = h0.dtype if isinstance(h0, Tensor) else type(h0).__name__
        raise TypeError(f"odeint(f, h0, t): h0 must be a floating-point Tensor (the initial state), got {got}.")
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1 or len(t) < 2:
        got = (f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__)
        raise ValueError(f"odeint(f, h0, t): t must be a 1-D floating-point tensor of at least 2 times, got {got}.")
    if method not in METHODS:
        raise ValueError(f"odeint(method={method!r}): must be one of {METHODS}.")
    for key, value in (("on_nonconvergence", on_nonconvergence), ("on_nonfinite", on_nonfinite)):
        if value not in POLICIES:
            raise ValueError(f"odeint({key}={value!r}): must be one of {POLICIES}.")
    for key, value in (("rtol", rtol), ("atol", atol), ("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if value is not None and not value >= 0:
            raise ValueError(f"odeint({key}={value!r}): tolerances must be >= 0.")
    if method == "dopri5" and rtol == 0 and atol == 0:
        raise ValueError("odeint(rtol=0, atol=0): the adaptive solver needs a positive rtol or atol.")
    if step_size is not None and (method not in FIXED or not step_size > 0):
        raise ValueError(f"odeint(step_size={step_size!r}): step_size is for method='euler' or 'rk4' and must be > 0.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"odeint(max_steps={max_steps!r}): must be an int >= 1.")
    if not _check_every_ok(check_every):
        raise ValueError(f"odeint(check_every={check_every!r}): must be None or an int >= 0.")
    check_every = _cadence(check_every, t.device)
    if t.requires_grad and not adjoint and method not in FIXED:
        raise ValueError("odeint(f, h0, t): with adjoint=False, gradients with respect to t need a fixed-step method "
                         "(the adaptive step sizes are not differentiated); use adjoint=True or pass t.detach().")
    if not _under_vmap():
        dt = t[1:] - t[:-1]
        if not (bool((dt > 0).all()) or bool((dt < 0).all())):
            raise ValueError("odeint(f, h0, t): t must be strictly increasing or strictly decreasing.")
    with torch.no_grad():
        out = f(t[0], h0, *args)
    if not isinstance(out, Tensor) or out.shape != h0.shape:
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"odeint: f(t[0], h0, *args) returned {got}, but h0 has shape {tuple(h0.shape)}; dh/dt must "
                         f"be shaped like h.")
    hint = "Raise max_steps, loosen rtol/atol, or check that the problem is not stiff or blowing up."
    if adjoint:
        leaves, treedef = tree_flatten(args)
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        constants = tuple(_TENSOR if isinstance(x, Tensor) else x for x in leaves)
        spec = _Spec(f, treedef, constants, method, rtol, atol, step_size, max_steps, check_every,
                     rtol if adjoint_rtol is None else adjoint_rtol, atol if adjoint_atol is None else adjoint_atol,
                     on_nonconvergence, on_nonfinite, record)
        ys, *fields = _OdeAdjoint.apply(spec, h0, t, *tensors)
        info = ODEInfo(*fields)
    else:
        outs, info = _integrate(lambda s, y: (f(s, y[0], *args),), (h0,), t, method, rtol, atol, step_size,
                                max_steps, check_every)
        ys = torch.stack([y[0] for y in outs])
    if record is not None:
        record.forward = _recorded(info)
    _report(info, f"odeint ({method})", hint, on_nonconvergence, on_nonfinite)
    return (ys, info) if return_info else ys
