"""odeint: closed forms, torchdiffeq as the reference, adjoint = backprop through the same fixed-step solver,
gradcheck, torch.func.grad / vmap (which torchdiffeq cannot run), and failures that are reported."""

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import grad, jvp, vmap

from bilevel.diagnostics import NonConvergenceError, NonFiniteError
from bilevel.layers import ODEInfo, Record, odeint
from bilevel.testing import saved_bytes

DT = torch.float64


def decay(t, h, k):
    return -k * h


def tanh_field(t, h, W):
    return torch.tanh(W @ h) + 0.1 * torch.sin(t)


def problem(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.5 * torch.randn(n, n, generator=g, dtype=DT)).requires_grad_()
    h0 = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    return W, h0, torch.linspace(0, 1, 4, dtype=DT)


@pytest.mark.parametrize("method,kw,tol", [("dopri5", dict(rtol=1e-10, atol=1e-12), 1e-9),
                                           ("rk4", dict(step_size=0.01), 1e-9),
                                           ("euler", dict(step_size=1e-3), 2e-3)])
def test_solution_equals_closed_form(method, kw, tol):
    k = torch.tensor(0.7, dtype=DT)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=DT)
    ys = odeint(decay, torch.ones((), dtype=DT), t, k, method=method, **kw)
    assert torch.allclose(ys, torch.exp(-k * t), rtol=tol, atol=0)


def test_dopri5_is_within_tolerance_as_torchdiffeq_is():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    W, h0, t = problem()
    with torch.no_grad():
        for rtol, atol in ((1e-6, 1e-8), (1e-10, 1e-12)):
            ys, info = odeint(tanh_field, h0, t, W, rtol=rtol, atol=atol, return_info=True)
            ref = torchdiffeq.odeint(lambda s, h: tanh_field(s, h, W), h0, t, rtol=rtol, atol=atol)
            exact = torchdiffeq.odeint(lambda s, h: tanh_field(s, h, W), h0, t, rtol=1e-13, atol=1e-14)
            # both within their tolerance of a much tighter solve, and of each other
            assert (ys - exact).abs().max() < 10 * (atol + rtol * exact.abs().max())
            assert (ref - exact).abs().max() < 10 * (atol + rtol * exact.abs().max())
            assert bool(info.converged) and int(info.accepted) > 0
            assert float(info.rtol) == rtol and float(info.atol) == atol


def test_adjoint_equals_backprop_through_the_same_fixed_step_solver():
    W, h0, t = problem()
    grads = []
    for adjoint in (True, False):
        ys = odeint(tanh_field, h0, t, W, method="rk4", step_size=0.01, adjoint=adjoint)
        grads.append(torch.autograd.grad((ys ** 2).sum(), (W, h0)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("adjoint", [True, False])
def test_linear_ode_gradient_equals_matrix_exponential(adjoint):
    # h' = A h: h(t) = exp(tA) h0, whose derivative in A autograd gives exactly (through matrix_exp)
    W, h0, t = problem(seed=1)
    ys = odeint(lambda s, h, A: A @ h, h0, t, W, rtol=1e-11, atol=1e-13, adjoint=adjoint)
    ref = torch.stack([torch.linalg.matrix_exp(s * W) @ h0 for s in t])
    assert torch.allclose(ys, ref, atol=1e-10, rtol=0)
    ours = torch.autograd.grad((ys[1:] ** 2).sum() + ys[-1].sum(), (W, h0))
    exact = torch.autograd.grad((ref[1:] ** 2).sum() + ref[-1].sum(), (W, h0))
    for a, b in zip(ours, exact):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


def test_gradcheck():
    W, h0, _ = problem(n=2)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    # the adjoint is the continuous gradient: it equals finite differences up to the solve's tolerance
    layer = lambda W, h0: odeint(tanh_field, h0, t, W, rtol=1e-12, atol=1e-12)  # noqa: E731
    assert gradcheck(layer, (W, h0), atol=1e-7, rtol=1e-6, nondet_tol=1e-12)


def test_torch_func_grad_and_vmap_work_through_the_adjoint():
    W, h0, t = problem()
    W, h0 = W.detach(), h0.detach()

    def loss(W, h0):
        return (odeint(tanh_field, h0, t, W)[-1] ** 2).sum()

    g = grad(loss, argnums=(0, 1))(W, h0)
    W_, h0_ = W.clone().requires_grad_(), h0.clone().requires_grad_()
    ref = torch.autograd.grad(loss(W_, h0_), (W_, h0_))
    for a, b in zip(g, ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # one problem per task, each with its own step sizes: vmap equals a loop
    Ws = torch.stack([W, 2 * W, -W])
    batched = vmap(grad(loss), in_dims=(0, None))(Ws, h0)
    looped = torch.stack([grad(loss)(w, h0) for w in Ws])
    assert torch.allclose(batched, looped, atol=1e-12, rtol=0)
    ys, info = vmap(lambda w: odeint(tanh_field, h0, t, w, return_info=True))(Ws)
    assert ys.shape == (3, 4, 3) and info.accepted.shape == (3,) and bool(info.converged.all())
    assert len(set(info.accepted.tolist())) > 1  # the entries took different numbers of steps


def test_torchdiffeq_cannot_run_under_torch_func_grad_or_vmap():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    W, h0, t = problem()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(W.detach())

        def forward(self, s, h):
            return tanh_field(s, h, self.W)

    with pytest.raises(RuntimeError, match="setup_context"):
        grad(lambda h: torchdiffeq.odeint_adjoint(Field(), h, t).sum())(h0.detach())
    with pytest.raises(RuntimeError, match="setup_context"):
        vmap(lambda h: torchdiffeq.odeint_adjoint(Field(), h, t))(torch.stack([h0.detach(), h0.detach()]))
    with pytest.raises(RuntimeError, match="setup_context"):  # its adaptive solver, even without the adjoint
        grad(lambda h: torchdiffeq.odeint(Field(), h, t, method="dopri5").sum())(h0.detach())


def test_forward_mode_through_the_adjoint_layer():
    W, h0, t = problem()
    W, h0 = W.detach(), h0.detach()
    v, V = torch.randn_like(h0), torch.randn_like(W)
    # fixed step: the variational equation under RK4 is the exact derivative of the discrete solve
    tangents = [jvp(lambda h, w: odeint(tanh_field, h, t, w, method="rk4", step_size=0.1, adjoint=adjoint),
                    (h0, W), (v, V))[1] for adjoint in (True, False)]
    assert torch.allclose(tangents[0], tangents[1], atol=1e-14, rtol=0)
    # a boundary value problem by shooting: x'' = −x, x(0) = 0, x(1) = c; root finds x'(0) = c / sin(1) with
    # Newton (jacfwd through odeint), and its derivative in c by the implicit function theorem through the adjoint
    from bilevel.layers import root

    def miss(v, c):
        state0 = torch.cat([torch.zeros(1, dtype=DT), v])
        hs = odeint(lambda s, h: torch.stack([h[1], -h[0]]), state0, torch.tensor([0.0, 1.0], dtype=DT),
                    rtol=1e-10, atol=1e-12)
        return hs[-1, :1] - c

    c = torch.tensor([1.0], dtype=DT, requires_grad=True)
    v0 = root(miss, torch.zeros(1, dtype=DT), c)
    v0.sum().backward()
    assert math.isclose(float(v0.detach()), 1 / math.sin(1), rel_tol=1e-8)
    assert math.isclose(float(c.grad), 1 / math.sin(1), rel_tol=1e-6)


def test_derivative_in_the_times():
    # h(t) = exp(−k (t − t0)): ∂h(t1)/∂t1 = −k h(t1), ∂h(t1)/∂t0 = k h(t1); the other outputs do not move t0's effect
    k = torch.tensor(0.7, dtype=DT)
    t = torch.tensor([0.2, 0.9, 1.5], dtype=DT, requires_grad=True)
    ys = odeint(decay, torch.ones((), dtype=DT), t, k, rtol=1e-11, atol=1e-12)
    (g,) = torch.autograd.grad(ys[1] + 2 * ys[2], t)
    with torch.no_grad():
        exact = torch.stack([k * (ys[1] + 2 * ys[2]), -k * ys[1], -2 * k * ys[2]])
    assert torch.allclose(g, exact, atol=1e-9, rtol=0)
    W, h0, _ = problem(n=2)
    times = torch.tensor([0.0, 0.4, 1.0], dtype=DT, requires_grad=True)
    layer = lambda t, W, h0: odeint(tanh_field, h0, t, W, rtol=1e-12, atol=1e-12)  # noqa: E731
    assert gradcheck(layer, (times, W, h0), atol=1e-7, rtol=1e-6, nondet_tol=1e-12)
    # forward mode in t agrees with the Jacobian the adjoint gives
    v = torch.tensor([0.3, -0.2, 0.5], dtype=DT)
    _, tangent = jvp(lambda s: layer(s, W.detach(), h0.detach()), (times.detach(),), (v,))
    (jac,) = torch.autograd.functional.jacobian(lambda s: layer(s, W.detach(), h0.detach()), (times.detach(),))
    assert torch.allclose(tangent, jac @ v, atol=1e-9)


def test_jvp_without_the_adjoint():
    W, h0, t = problem()
    W, h0 = W.detach(), h0.detach()
    v = torch.randn_like(h0)
    f = lambda h: odeint(tanh_field, h, t, W, method="rk4", step_size=0.05, adjoint=False)[-1]  # noqa: E731
    _, tangent = jvp(f, (h0,), (v,))
    eps = 1e-6
    assert torch.allclose(tangent, (f(h0 + eps * v) - f(h0 - eps * v)) / (2 * eps), atol=1e-8)


def test_backward_in_time_and_record():
    k = torch.tensor(0.3, dtype=DT, requires_grad=True)
    t = torch.tensor([2.0, 1.0, 0.0], dtype=DT)
    rec = Record()
    ys = odeint(decay, torch.ones((), dtype=DT), t, k, record=rec)
    assert torch.allclose(ys, torch.exp(-k * (t - 2)), rtol=1e-6)
    ys[-1].backward()
    assert math.isclose(float(k.grad), 2 * math.exp(0.6), rel_tol=1e-5)  # d/dk exp(2k)
    assert isinstance(rec.forward, ODEInfo) and isinstance(rec.backward, ODEInfo)
    assert bool(rec.backward.converged) and int(rec.backward.nfe) > 0


def test_failures_are_reported():
    one, t = torch.ones((), dtype=DT), torch.tensor([0.0, 2.0], dtype=DT)
    # h' = h², h(0) = 1 blows up at t = 1: the step size underflows before t = 2
    with pytest.raises(NonConvergenceError, match="did not reach"):
        odeint(lambda s, h: h ** 2, one, t)
    with pytest.raises(NonConvergenceError, match="max_steps"):
        odeint(lambda s, h: torch.cos(10 * s) * h, one, t, max_steps=3)
    _, info = odeint(lambda s, h: torch.cos(10 * s) * h, one, t, max_steps=3, on_nonconvergence="ignore",
                     return_info=True)
    assert not bool(info.converged) and int(info.accepted + info.rejected) == 3
    with pytest.raises(NonFiniteError):
        odeint(lambda s, h: h * float("nan"), one, t, method="rk4")
    with pytest.raises(NonFiniteError):
        odeint(lambda s, h: torch.sqrt(1 - s) * h, one, t)  # NaN past t = 1


def test_bad_inputs_name_the_problem():
    one, t = torch.ones(2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    f = lambda s, h: -h  # noqa: E731
    cases = [
        (lambda: odeint(f, one, t, method="rk45"), ValueError, "method"),
        (lambda: odeint(f, one, torch.tensor([0.0, 1.0, 0.5], dtype=DT)), ValueError, "strictly"),
        (lambda: odeint(f, one, torch.tensor(1.0, dtype=DT)), ValueError, "1-D"),
        (lambda: odeint(f, torch.ones(2, dtype=torch.long), t), TypeError, "floating-point"),
        (lambda: odeint(lambda s, h: h.sum(), one, t), ValueError, "shaped like h"),
        (lambda: odeint(f, one, t, step_size=0.1), ValueError, "step_size"),
        (lambda: odeint(f, one, t.clone().requires_grad_(), adjoint=False), ValueError, "t.detach"),
        (lambda: odeint(f, one, t, rtol=-1.0), ValueError, "rtol"),
        (lambda: odeint(f, one, t, max_steps=0), ValueError, "max_steps"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


def test_second_order_through_the_adjoint_equals_backprop():
    # MAML's gradient: the outer derivative of a loss after an inner gradient step, both through odeint
    W, h0, _ = problem(n=2)
    W, h0, t = W.detach(), h0.detach(), torch.tensor([0.0, 0.5], dtype=DT)

    def loss(W, adjoint):
        return (odeint(tanh_field, h0, t, W, rtol=1e-10, atol=1e-10, adjoint=adjoint) ** 2).sum()

    def maml(W, adjoint):
        return loss(W - 0.1 * grad(loss)(W, adjoint), adjoint)

    assert torch.allclose(grad(maml)(W, True), grad(maml)(W, False), atol=1e-8, rtol=0)


@pytest.mark.slow
def test_ode_examples_run_on_tiny_settings(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    def example(name):
        path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"example_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    spiral = example("ode_spiral")
    out = spiral.run(spiral.Config(iters=3, data_size=60, batch_size=4, eval_every=3, rtol=1e-5, atol=1e-6,
                                   out_dir=str(tmp_path / "spiral")))
    assert out["mean_nfe_forward"] > 0 and out["mean_nfe_backward"] > 0 and len(out["history"]) == 2
    maml = example("ode_maml")
    out = maml.run(maml.Config(meta_steps=1, meta_batch=2, inner_steps=1, eval_tasks=2, eval_every=1,
                               out_dir=str(tmp_path / "maml")))
    assert len(out["history"]) == 2 and out["history"][-1]["query_mse_adapted"] > 0
    odenet = example("odenet_mnist")
    out = odenet.run(odenet.Config(train_size=200, test_size=100, out_dir=str(tmp_path / "odenet")))
    assert 0 <= out["test_acc"] <= 1 and out["mean_nfe_backward"] > 0 and out["saved_for_backward_mb"] > 0


def test_the_adjoint_saves_as_much_for_backward_whatever_the_number_of_steps():
    W, h0, _ = problem(n=8)
    t = torch.tensor([0.0, 1.0], dtype=DT)

    def saved(steps, adjoint):
        return saved_bytes(lambda: odeint(tanh_field, h0, t, W, method="rk4", step_size=1 / steps,
                                          adjoint=adjoint))[1]

    assert saved(10, True) == saved(40, True)
    assert saved(40, False) > 3 * saved(10, False) > 3 * saved(10, True)


def test_backward_outside_vmap_with_a_shared_h0_and_batched_args():
    """Saving h0 for forward mode alone once made torch's generated vmap rule hand the adjoint backward an
    unbatched ys here (a shape error); ``torch.func.grad`` inside vmap was not affected."""
    W, h0, t = problem()
    Ws = torch.stack([W.detach(), 2 * W.detach()]).requires_grad_()
    ys = vmap(lambda w: odeint(tanh_field, h0.detach(), t, w), in_dims=(0,))(Ws)
    batched = torch.autograd.grad(ys[:, -1].sum(), Ws)[0]
    looped = torch.stack([grad(lambda w: odeint(tanh_field, h0.detach(), t, w)[-1].sum())(w) for w in Ws.detach()])
    assert torch.allclose(batched, looped, atol=1e-12, rtol=0)
