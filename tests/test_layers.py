"""Implicit layers: gradcheck for every kind, implicit = unrolled at convergence, closed forms, vmap, diagnostics."""

import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, vmap

import bilevel.root_find
from bilevel.diagnostics import NonConvergenceError, NonConvergenceWarning, NonFiniteError
from bilevel.layers import ConditioningWarning, Record, argmin, fixed_point, root
from bilevel.linear_solve import CG, GMRES, Dense, NormalCG, fixed_point_iteration
from bilevel.root_find import Anderson, Broyden, Newton, Picard

DT = torch.float64
# The iterative backward solves are deterministic up to round-off (~1e-17) between two calls on the same graph;
# gradcheck's reentrancy check demands exact equality, so it is given that round-off as its tolerance.
NONDET = 1e-12


def tanh_layer(z, x, W):
    return torch.tanh(W @ z + x)


def make(n=5, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    W = 0.6 * torch.randn(n, n, generator=g, dtype=DT) / n ** 0.5
    x = torch.randn(n, generator=g, dtype=DT)
    return x.requires_grad_(requires_grad), W.requires_grad_(requires_grad)


EXACT = dict(solver=Newton(tol=1e-13))


@pytest.mark.parametrize("backward", [Dense(), GMRES(steps=5, tol=1e-12), NormalCG(steps=30, tol=1e-12),
                                      fixed_point_iteration(steps=200, tol=1e-13)],
                         ids=["Dense", "GMRES", "NormalCG", "fixed_point_iteration"])
def test_fixed_point_gradcheck(backward):
    x, W = make()
    layer = lambda x, W: fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, backward=backward,  # noqa: E731
                                     solver=Anderson(steps=200, tol=1e-13))
    assert gradcheck(layer, (x, W), nondet_tol=NONDET)


def test_fixed_point_gradgradcheck():
    x, W = make(n=4)
    layer = lambda x, W: fixed_point(tanh_layer, torch.zeros(4, dtype=DT), x, W, backward=Dense(), **EXACT)  # noqa
    assert gradgradcheck(layer, (x, W), nondet_tol=NONDET)


def cubic(z, c, A):
    return z ** 3 + A @ z - c


def test_root_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(4, 4, generator=g, dtype=DT)
    A = (B @ B.T / 4 + torch.eye(4, dtype=DT)).requires_grad_()
    c = torch.randn(4, generator=g, dtype=DT).requires_grad_()
    layer = lambda c, A: root(cubic, torch.zeros(4, dtype=DT), c, A, solver=Newton(tol=1e-13))  # noqa: E731
    assert gradcheck(layer, (c, A), nondet_tol=NONDET)
    dense = lambda c, A: root(cubic, torch.zeros(4, dtype=DT), c, A, solver=Newton(tol=1e-13),  # noqa: E731
                              backward=Dense())
    assert gradgradcheck(dense, (c, A), nondet_tol=NONDET)


def ridge(z, X, y, lam):
    return 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z ** 2).sum()


def ridge_closed_form(X, y, lam):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)


def ridge_data(seed=2, m=7, n=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=g, dtype=DT).requires_grad_()
    y = torch.randn(m, generator=g, dtype=DT).requires_grad_()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    return X, y, lam


def test_argmin_gradcheck_and_gradgradcheck():
    X, y, lam = ridge_data()
    layer = lambda X, y, lam: argmin(ridge, torch.zeros(3, dtype=DT), X, y, lam)  # noqa: E731
    assert gradcheck(layer, (X, y, lam), nondet_tol=NONDET)
    dense = lambda X, y, lam: argmin(ridge, torch.zeros(3, dtype=DT), X, y, lam, backward=Dense())  # noqa: E731
    assert gradgradcheck(dense, (X, y, lam), nondet_tol=NONDET)


def test_argmin_equals_closed_form_and_its_gradient():
    X, y, lam = ridge_data()
    z = argmin(ridge, torch.zeros(3, dtype=DT), X, y, lam)
    z_ref = ridge_closed_form(X, y, lam)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    v = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = torch.autograd.grad(z, (X, y, lam), v)
    want = torch.autograd.grad(z_ref, (X, y, lam), v)  # autograd through torch.linalg.solve of the closed form
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_root_kkt_of_equality_constrained_qp_equals_closed_form():
    # min ½zᵀQz + cᵀz  s.t.  Az = b:  KKT residual [Qz + c + Aᵀν; Az − b] = 0 in (z, ν)
    g = torch.Generator().manual_seed(4)
    n, m = 4, 2
    B = torch.randn(n, n, generator=g, dtype=DT)
    Q = (B @ B.T + torch.eye(n, dtype=DT)).requires_grad_()
    c = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    A = torch.randn(m, n, generator=g, dtype=DT).requires_grad_()
    b = torch.randn(m, generator=g, dtype=DT).requires_grad_()

    def kkt(zn, Q, c, A, b):
        z, nu = zn[:n], zn[n:]
        return torch.cat([Q @ z + c + A.T @ nu, A @ z - b])

    zn = root(kkt, torch.zeros(n + m, dtype=DT), Q, c, A, b)
    K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(m, m, dtype=DT)], 1)])
    zn_ref = torch.linalg.solve(K, torch.cat([-c, b]))
    torch.testing.assert_close(zn, zn_ref, atol=1e-12, rtol=0)
    v = torch.randn(n + m, generator=g, dtype=DT)
    for a, r in zip(torch.autograd.grad(zn, (Q, c, A, b), v), torch.autograd.grad(zn_ref, (Q, c, A, b), v)):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=0)


def test_implicit_equals_unrolled_at_convergence():
    x, W = make(n=6, seed=5)
    z0 = torch.zeros(6, dtype=DT)
    unrolled = fixed_point(tanh_layer, z0, x, W, solver=Picard(steps=500, tol=1e-14), backward="unrolled")
    implicit = fixed_point(tanh_layer, z0, x, W, solver=Anderson(steps=100, tol=1e-14),
                           backward=GMRES(steps=6, tol=1e-12))
    torch.testing.assert_close(implicit, unrolled, atol=1e-13, rtol=0)
    v = torch.randn(6, generator=torch.Generator().manual_seed(6), dtype=DT)
    for a, b in zip(torch.autograd.grad(implicit, (x, W), v, retain_graph=True),
                    torch.autograd.grad(unrolled, (x, W), v)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
    # ... and not before: three unrolled steps give the gradient of a different (finite) computation
    short = fixed_point(tanh_layer, z0, x, W, solver=Picard(steps=3, tol=1e-14), backward="unrolled",
                        on_nonconvergence="ignore")
    assert (torch.autograd.grad(short, W, v)[0] - torch.autograd.grad(implicit, W, v)[0]).abs().max() > 1e-3


def test_jfb_is_one_step_of_f_at_the_fixed_point_and_a_descent_direction():
    x, W = make(n=6, seed=7)
    z0 = torch.zeros(6, dtype=DT)
    z = fixed_point(tanh_layer, z0, x, W, backward="jfb", **EXACT)
    v = torch.randn(6, generator=torch.Generator().manual_seed(8), dtype=DT)
    g_jfb = torch.autograd.grad(z, W, v)[0]
    z_star = z.detach()
    g_one_step = torch.autograd.grad(tanh_layer(z_star, x, W), W, v)[0]  # ∂f/∂W at z*, z* held fixed
    torch.testing.assert_close(g_jfb, g_one_step, atol=1e-13, rtol=0)
    g_exact = torch.autograd.grad(fixed_point(tanh_layer, z0, x, W, backward=Dense(), **EXACT), W, v)[0]
    assert (g_jfb - g_exact).abs().max() > 1e-4  # an approximation ...
    assert (g_jfb * g_exact).sum() > 0  # ... that still points downhill here


def test_vmap_over_a_batch_of_problems_equals_a_loop():
    _, W = make(n=5, seed=9)
    X = torch.randn(4, 5, generator=torch.Generator().manual_seed(10), dtype=DT) * 2
    layer = lambda x, W: fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, **EXACT)  # noqa: E731
    zb, info = vmap(lambda x: fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, return_info=True, **EXACT))(X)
    zl = torch.stack([layer(x, W) for x in X])
    torch.testing.assert_close(zb, zl, atol=1e-13, rtol=0)
    assert info.steps.shape == (4,) and info.converged.all()
    # reverse mode through vmap, with autograd and with torch.func.grad
    g_loop = torch.autograd.grad(zl.sum(), W)[0]
    torch.testing.assert_close(torch.autograd.grad(zb.sum(), W)[0], g_loop)
    g_func = torch.func.grad(lambda W: vmap(lambda x: layer(x, W))(X).sum())(W.detach())
    torch.testing.assert_close(g_func, g_loop)


def test_inside_an_nn_module_with_torch_optim():
    torch.manual_seed(0)

    class Equilibrium(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.cell = nn.Linear(n, n, dtype=DT)
            nn.init.normal_(self.cell.weight, std=0.3 / n ** 0.5)
            self.readout = nn.Linear(n, 1, dtype=DT)

        def forward(self, x):
            f = lambda z, x, p: torch.tanh(functional_call(self.cell, p, (z,)) + x)  # noqa: E731
            z = fixed_point(f, torch.zeros_like(x), x, dict(self.cell.named_parameters()))
            return self.readout(z).squeeze(-1)

    model = Equilibrium(6)
    X = torch.randn(32, 6, dtype=DT)
    y = torch.sin(X.sum(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.cell.weight.grad is not None and model.cell.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.7 * losses[0]


def test_forced_nonconvergence_warns_or_raises():
    x, W = make()
    short = Picard(steps=2, tol=1e-12)
    with pytest.warns(NonConvergenceWarning, match=r"fixed_point \(Picard\): did not converge in 2 steps"):
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=short)
    with pytest.raises(NonConvergenceError, match="residual"):
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=short, on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=short, on_nonconvergence="ignore",
                              return_info=True)
    assert not bool(info.converged) and int(info.steps) == 2
    # the backward linear solve follows the same policy
    z = fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, backward=GMRES(steps=1, tol=1e-12), **EXACT)
    with pytest.raises(NonConvergenceError, match="backward"):
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, backward=GMRES(steps=1, tol=1e-12),
                    on_nonconvergence="raise", **EXACT).sum().backward()
    with pytest.warns(NonConvergenceWarning, match=r"fixed_point backward \(GMRES\)"):
        z.sum().backward()


def test_nonfinite_raises():
    a = torch.tensor([-1.0, 4.0], dtype=DT, requires_grad=True)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        root(lambda z, a: z ** 2 - a, torch.ones(2, dtype=DT), a, solver=Newton(steps=5))  # no real root of z² = −1


def test_bad_inputs_name_the_problem():
    x, W = make()
    with pytest.raises(ValueError, match=r"root\(fn, z0, \*args\): fn\(z0, \*args\) returned shape \(10,\).*"
                                         r"z0 has shape \(5,\).*square Jacobian"):
        root(lambda z, x: torch.cat([z, x]), torch.zeros(5, dtype=DT), x)
    with pytest.raises(ValueError, match=r"fixed_point\(f, z0, \*args\): f\(z0, \*args\) returned shape \(3,\)"):
        fixed_point(lambda z, x, W: tanh_layer(z, x, W)[:3], torch.zeros(5, dtype=DT), x, W)
    with pytest.raises(ValueError, match=r"dtype torch.float32, but z0 has shape \(5,\), dtype torch.float64"):
        fixed_point(lambda z, x: torch.tanh(z.float() + x.float()), torch.zeros(5, dtype=DT), x)
    with pytest.raises(ValueError, match="must return a scalar tensor, got shape"):
        argmin(lambda z: z ** 2, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="not symmetric for a fixed_point, so CG"):
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, backward=CG())
    with pytest.raises(ValueError, match=r"backward='exact'"):
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, backward="exact")
    with pytest.raises(ValueError, match=r"on_nonconvergence='loud'"):
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, on_nonconvergence="loud")
    with pytest.raises(TypeError, match="z0 must be a floating-point Tensor"):
        root(lambda z: z, [0.0, 1.0])


def test_broyden_forward_with_implicit_backward():
    x, W = make(n=5, seed=11)
    layer = lambda x, W: fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W,  # noqa: E731
                                     solver=Broyden(steps=100, tol=1e-13), backward=Dense())
    assert gradcheck(layer, (x, W), nondet_tol=NONDET)


def test_docstring_examples_run():
    import doctest

    import bilevel.layers
    import bilevel.ode
    import bilevel.qp
    import bilevel.root_find

    for module, examples in ((bilevel.layers, 3), (bilevel.root_find, 2), (bilevel.ode, 1), (bilevel.qp, 1)):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted >= examples and result.failed == 0, module.__name__


@pytest.mark.parametrize("doc", ["guide.md", "layers.md"])
def test_documented_snippets_run(doc):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / doc).read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    assert code
    scope = {}
    exec(compile(code, doc, "exec"), scope)
    if doc == "layers.md":  # the DEQ class of the section: a forward and backward pass
        model = scope["DEQ"](n=8)
        model(torch.rand(4, 784)).sum().backward()
        assert model.cell.weight.grad is not None


def _example(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_examples_run_on_tiny_settings(tmp_path):
    deq = _example("deq_mnist")
    for method in deq.METHODS:
        cfg = deq.Config(method=method, train_size=200, test_size=100, epochs=1, newton_steps=3,
                         out_dir=str(tmp_path / "deq"), wandb_mode="disabled")
        (row,) = deq.run(cfg)["history"]
        assert 0.0 <= row["test_acc"] <= 1.0 and row["train_loss"] > 0 and row["train_iters"] >= 1
    # the unrolled graph stores the iterations; the implicit one does not
    mb = {m: deq.json.loads((tmp_path / "deq" / m / "results.json").read_text())["history"][0]
          ["saved_for_backward_mb"] for m in ("unrolled", "anderson")}
    assert mb["unrolled"] > 3 * mb["anderson"]

    argmin_example = _example("argmin_layer")
    out = argmin_example.run(argmin_example.Config(steps=3, train_size=500, test_size=200, fit_size=100,
                                                   out_dir=str(tmp_path / "argmin")))
    assert out["kkt"]["grad_max_rel_err"] < 1e-10
    assert out["ridge_head"]["max_rel_err_solution"] < 1e-3 and out["ridge_head"]["max_rel_err_grad"] < 1e-2

    cleaning = _example("custom_bilevel")
    out = cleaning.run(cleaning.Config(n_train=200, n_val=200, n_test=200, outer_steps=2, inner_steps=3,
                                       retrain_steps=5, out_dir=str(tmp_path / "clean"), wandb_mode="disabled"))
    assert set(out["methods"]) == {"implicit", "unrolled"}
    for result in out["methods"].values():
        assert result["corrupted"] == 100 and 0 <= result["corrupted_low_weight"] <= 100
        assert len(result["history"]) == 2


def test_record_holds_the_forward_and_backward_solve_info():
    x, W = make()
    rec = Record()
    z = fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=Anderson(steps=100, tol=1e-12), record=rec)
    assert rec.forward is not None and rec.backward is None
    z.sum().backward()
    assert bool(rec.forward.converged) and bool(rec.backward.converged) and int(rec.backward.steps) > 0


def test_a_degenerate_root_warns_that_its_derivative_is_unreliable():
    bilevel.root_find._WARNED.clear()  # each cause is warned once per process
    # z² = a at a = 0: Newton converges only linearly, stops at z ≈ 6e-5 and dz/da = 1/(2z) ≈ 8e3, while the true
    # derivative is unbounded; the warning says so
    a = torch.tensor([0.0], dtype=DT, requires_grad=True)
    z = root(lambda z, a: z ** 2 - a, torch.ones(1, dtype=DT), a)
    with pytest.warns(ConditioningWarning, match="tighten the forward"):
        z.sum().backward()
    # a nearly singular linear system, solved exactly: the condition number is what is reported
    A = torch.diag(torch.tensor([1.0, 1e-15], dtype=DT))
    c = torch.ones(2, dtype=DT, requires_grad=True)
    z = root(lambda z, c: A @ z - c, torch.zeros(2, dtype=DT), c, backward=Dense())
    with pytest.warns(ConditioningWarning, match="nearly singular"):
        z.sum().backward()


def test_a_coarse_forward_with_a_strict_backward_warns():
    bilevel.root_find._WARNED.clear()  # each cause is warned once per process
    x, W = make()
    with pytest.warns(ConditioningWarning, match="far looser"):
        z = fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=Anderson(steps=50, tol=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConditioningWarning)
        z.sum().backward()
    # no warning when nothing asks for a derivative, or the forward is tight; and each cause only once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=Anderson(steps=50, tol=1e-2))
        with torch.no_grad():
            fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=Anderson(steps=50, tol=1e-2))
        fixed_point(tanh_layer, torch.zeros(5, dtype=DT), x, W, solver=Anderson(steps=100, tol=1e-12)).sum().backward()
