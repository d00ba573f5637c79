"""qp: cvxpylayers as the reference (solutions and gradients), closed forms, gradcheck, batching = vmap = a loop,
named errors for infeasible and unbounded problems."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import vmap

from bilevel.diagnostics import NonConvergenceError
from bilevel.layers import InfeasibleError, Record, UnboundedError, qp

DT = torch.float64


def random_qp(n=5, m=6, p=2, seed=0):
    """A feasible QP with Q = LᵀL + 0.1 I: h and b are built around a point z0 with slack, so it has a solution."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, n, generator=g, dtype=DT)
    q = torch.randn(n, generator=g, dtype=DT)
    G = torch.randn(m, n, generator=g, dtype=DT)
    z0 = torch.randn(n, generator=g, dtype=DT)
    h = G @ z0 + torch.rand(m, generator=g, dtype=DT)
    A = torch.randn(p, n, generator=g, dtype=DT)
    b = A @ z0
    return [x.requires_grad_() for x in (L, q, G, h, A, b)]


def gram(L):
    return L.T @ L + 0.1 * torch.eye(L.shape[-1], dtype=L.dtype)


# cvxpylayers 1.2 hands numpy a tensor without the copy keyword (numpy 2): its warning, not ours
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solution_and_gradients_equal_cvxpylayers(seed):
    cp = pytest.importorskip("cvxpy")
    CvxpyLayer = pytest.importorskip("cvxpylayers.torch").CvxpyLayer
    L, q, G, h, A, b = data = random_qp(seed=seed)
    n = q.shape[0]
    Lp, qp_, Gp, hp, Ap, bp = (cp.Parameter(x.shape) for x in data)
    x = cp.Variable(n)
    # Q enters through L (Q = LᵀL + 0.1 I) so that the problem is DPP, as cvxpylayers requires
    objective = 0.5 * cp.sum_squares(Lp @ x) + 0.05 * cp.sum_squares(x) + qp_ @ x
    problem = cp.Problem(cp.Minimize(objective), [Gp @ x <= hp, Ap @ x == bp])
    layer = CvxpyLayer(problem, parameters=[Lp, qp_, Gp, hp, Ap, bp], variables=[x])
    ref, = layer(*data, solver_args={"eps": 1e-12})
    z = qp(gram(L), q, G, h, A, b)
    assert torch.allclose(z, ref, atol=1e-6, rtol=0)
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    ours = torch.autograd.grad(z @ w, data)
    theirs = torch.autograd.grad(ref @ w, data)
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, atol=1e-5, rtol=0)


def test_gradcheck_in_every_input():
    L, q, G, h, A, b = random_qp(n=3, m=4, p=1, seed=3)
    Q = gram(L).detach().requires_grad_()
    assert gradcheck(qp, (Q, q, G, h, A, b), atol=1e-6, nondet_tol=1e-10)


def test_closed_forms():
    # projection of y onto the halfspace aᵀz <= c: z = y − max(0, aᵀy − c) a / ||a||²
    y = torch.tensor([2.0, 1.0, -1.0], dtype=DT, requires_grad=True)
    a, c = torch.tensor([1.0, 2.0, 0.5], dtype=DT), torch.tensor([1.0], dtype=DT)
    z = qp(torch.eye(3, dtype=DT), -y, a[None], c)
    assert torch.allclose(z, y - (a @ y - c) * a / (a @ a), atol=1e-9)
    (jac,) = torch.autograd.grad(z[0], y)
    assert torch.allclose(jac, torch.eye(3, dtype=DT)[0] - a[0] * a / (a @ a), atol=1e-8)
    # equality constraints only: the KKT system is linear
    L, q, _, _, A, b = random_qp(seed=4)
    Q = gram(L)
    n, p = q.shape[0], b.shape[0]
    K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(p, p, dtype=DT)], 1)])
    exact = torch.linalg.solve(K, torch.cat([-q, b]))[:n]
    z = qp(Q, q, A=A, b=b)
    assert torch.allclose(z, exact, atol=1e-9)
    for g1, g2 in zip(torch.autograd.grad(z.sum(), (q, A, b)), torch.autograd.grad(exact.sum(), (q, A, b))):
        assert torch.allclose(g1, g2, atol=1e-8)


def test_batch_equals_vmap_equals_loop():
    L, _, G, h, _, _ = random_qp(n=3, m=4, p=0, seed=5)
    Q = gram(L).detach()
    qs = torch.randn(6, 3, dtype=DT, requires_grad=True)
    batched = qp(Q, qs, G, h)
    mapped = vmap(lambda q: qp(Q, q, G, h))(qs)
    looped = torch.stack([qp(Q, q, G, h) for q in qs])
    assert batched.shape == (6, 3)
    assert torch.allclose(batched, looped, atol=1e-12) and torch.allclose(mapped, looped, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), (qs, G, h)) for out in (batched, mapped, looped)]
    for other in grads[1:]:
        for a, c in zip(grads[0], other):
            assert torch.allclose(a, c, atol=1e-10)


def test_at_a_kink_the_derivative_is_one_sided_and_finite():
    # projection of y onto z <= 1: dz/dy is 1 for y < 1 and 0 for y > 1; at y = 1 either side (or a blend)
    for value, expected in ((0.5, 1.0), (1.5, 0.0)):
        y = torch.tensor([value], dtype=DT, requires_grad=True)
        (d,) = torch.autograd.grad(qp(torch.eye(1, dtype=DT), -y, torch.eye(1, dtype=DT), torch.ones(1, dtype=DT)), y)
        assert abs(float(d) - expected) < 1e-6
    y = torch.tensor([1.0], dtype=DT, requires_grad=True)
    (d,) = torch.autograd.grad(qp(torch.eye(1, dtype=DT), -y, torch.eye(1, dtype=DT), torch.ones(1, dtype=DT)), y)
    assert torch.isfinite(d).all() and -1e-6 <= float(d) <= 1 + 1e-6


def test_infeasible_and_unbounded_raise_named_errors():
    eye = torch.eye(2, dtype=DT)
    zero = torch.zeros(2, dtype=DT)
    with pytest.raises(InfeasibleError, match="no solution"):  # z₁ <= −1 and z₁ >= 1
        qp(eye, zero, torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT), torch.tensor([-1.0, -1.0], dtype=DT))
    with pytest.raises(InfeasibleError):  # z₁ <= 0 and z₁ = 1
        qp(eye, zero, torch.tensor([[1.0, 0.0]], dtype=DT), torch.zeros(1, dtype=DT),
           torch.tensor([[1.0, 0.0]], dtype=DT), torch.ones(1, dtype=DT))
    flat = torch.diag(torch.tensor([0.0, 1.0], dtype=DT))
    with pytest.raises(UnboundedError, match="unbounded"):  # min z₁ with z₁ free
        qp(flat, torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([[0.0, 1.0]], dtype=DT), torch.ones(1, dtype=DT))
    with pytest.raises(UnboundedError):  # min −z₁ with z₁ >= 0: the iterate runs off
        qp(flat, torch.tensor([-1.0, 0.0], dtype=DT), torch.tensor([[-1.0, 0.0]], dtype=DT), torch.zeros(1, dtype=DT))
    # a batch names how many problems failed
    with pytest.raises(InfeasibleError, match="1 of 2"):
        qp(eye, zero, torch.tensor([[1.0, 0.0]], dtype=DT), torch.tensor([[1.0], [1.0]], dtype=DT),
           torch.tensor([[1.0, 0.0]], dtype=DT), torch.tensor([[0.5], [2.0]], dtype=DT))


def test_nonconvergence_is_reported_and_record_holds_both_solves():
    L, q, G, h, A, b = random_qp(seed=6)
    with pytest.raises(NonConvergenceError, match="did not converge"):
        qp(gram(L), q, G, h, A, b, steps=2)
    rec = Record()
    z, info = qp(gram(L), q, G, h, A, b, return_info=True, record=rec)
    assert bool(info.converged) and int(info.steps) > 2 and rec.forward is info
    z.sum().backward()
    assert rec.backward is not None and bool(rec.backward.converged)


def test_bad_inputs_name_the_problem():
    Q, q = torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT)
    G, h = torch.ones(1, 2, dtype=DT), torch.ones(1, dtype=DT)
    cases = [
        (lambda: qp(Q, q, G), ValueError, "together"),
        (lambda: qp(Q, torch.zeros(3, dtype=DT)), ValueError, "Q must be"),
        (lambda: qp(Q, q, torch.ones(1, 3, dtype=DT), h), ValueError, "G, h"),
        (lambda: qp(Q, q, G, h, torch.ones(3, 2, dtype=DT), torch.ones(3, dtype=DT)), ValueError, "full row rank"),
        (lambda: qp(Q.long(), q), TypeError, "floating-point"),
        (lambda: qp(Q, q, steps=0), ValueError, "steps"),
        (lambda: qp(-Q, q), ValueError, "positive semidefinite"),
        (lambda: qp(Q, torch.tensor([float("nan"), 0.0], dtype=DT)), ValueError, "q contains NaN"),
        (lambda: qp(torch.eye(2, dtype=DT).expand(3, 2, 2), torch.zeros(2, 2, dtype=DT)), ValueError, "broadcast"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_qp_example_runs_on_tiny_settings(tmp_path):
    pytest.importorskip("cvxpylayers")
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "qp_layer.py"
    spec = importlib.util.spec_from_file_location("example_qp_layer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out = module.run(module.Config(steps=2, batch=8, timing_batch=2, timing_repeats=1, out_dir=str(tmp_path)))
    assert out["sparsemax"]["value_max_abs_err"] < 1e-8 and out["sparsemax"]["jacobian_max_abs_err"] < 1e-6
    assert out["timing"]["solution_max_abs_diff"] < 1e-5 and len(out["constraint_set"]["history"]) >= 2
