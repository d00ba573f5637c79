"""Solvers for indefinite systems, the iMAML reference system, dtype-aware tolerances, divergence, skip_task and
counted warnings."""

import warnings

import pytest
import torch

import bilevel as bl
from bilevel import tree
from bilevel.diagnostics import warning_counts

from problems import f64, fewshot_tasks, mlp_params, ridge_data, ridge_exact, ridge_inner, ridge_outer, task_loss


def operator(matrix):
    as_tree = lambda x: {"a": x[:3], "b": x[3:].reshape(2, 2)}  # noqa: E731 - a two-tensor tree
    mv = lambda v: as_tree(matrix @ tree.flatten(v))  # noqa: E731
    return bl.LinearOperator(mv, mv, True), as_tree


def indefinite(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    eigenvalues = torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=f64)
    return q @ torch.diag(eigenvalues) @ q.T


# --- MINRES and truncated CG ------------------------------------------------------------------------------------
def test_minres_matches_dense_solve_on_an_indefinite_system():
    matrix = indefinite()
    op, as_tree = operator(matrix)
    b = torch.randn(7, dtype=f64)
    x, info = bl.MINRES(steps=7)(op, as_tree(b))
    assert torch.allclose(tree.flatten(x), torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)
    assert bool(info.converged) and bool(info.indefinite) and float(info.curvature) < 0
    true = torch.linalg.norm(b - matrix @ tree.flatten(x)) / torch.linalg.norm(b)
    assert float(info.residual) == pytest.approx(float(true), abs=1e-9)  # the recurrence's residual is the true one
    # CG on the same system meets negative curvature; MINRES flags it at the same step budget (its Lanczos pivots)
    for k in range(1, 8):
        _, cg_info = bl.CG(steps=k, tol=0.0)(op, as_tree(b))
        _, mr_info = bl.MINRES(steps=k, tol=0.0)(op, as_tree(b))
        assert bool(cg_info.indefinite) == bool(mr_info.indefinite), k
    assert bool(cg_info.indefinite)


def test_minres_residual_never_grows_and_damping_shifts_the_system():
    matrix = indefinite(seed=1)
    op, as_tree = operator(matrix)
    b = as_tree(torch.randn(7, dtype=f64))
    residuals = [float(bl.MINRES(steps=k, tol=0.0)(op, b)[1].residual) for k in range(1, 8)]
    assert all(r2 <= r1 + 1e-12 for r1, r2 in zip(residuals, residuals[1:])), residuals
    x, _ = bl.MINRES(steps=7, damping=0.7)(op, b)
    expected = torch.linalg.solve(matrix + 0.7 * torch.eye(7, dtype=f64), tree.flatten(b))
    assert torch.allclose(tree.flatten(x), expected, rtol=1e-8)


def test_minres_under_vmap_equals_a_loop():
    matrices = torch.stack([indefinite(seed=s) for s in range(3)])
    bs = torch.randn(3, 7, dtype=f64)

    def solve(m, b):
        op = bl.LinearOperator(lambda v: {"x": m @ v["x"]}, None, True)
        x, info = bl.MINRES(steps=5, tol=1e-3)(op, {"x": b})
        return x["x"], info.residual, info.steps

    xs, res, steps = torch.func.vmap(solve)(matrices, bs)
    for i in range(3):
        x, r, s = solve(matrices[i], bs[i])
        assert torch.allclose(xs[i], x, rtol=1e-10) and torch.allclose(res[i], r) and int(steps[i]) == int(s)


def test_truncated_cg_stops_at_negative_curvature_with_the_last_iterate():
    matrix = indefinite(seed=2)
    op, as_tree = operator(matrix)
    b = as_tree(torch.randn(7, dtype=f64))
    x, info = bl.TruncatedCG(steps=7)(op, b)
    assert bool(info.indefinite) and float(info.curvature) <= 0
    k = int(info.steps)
    assert 1 <= k < 7
    x_cg, _ = bl.CG(steps=k)(op, b)  # the same iterate as CG before the negative direction
    assert torch.allclose(tree.flatten(x), tree.flatten(x_cg), rtol=1e-12)
    xf, bf = tree.flatten(x), tree.flatten(b)
    assert float(0.5 * xf @ matrix @ xf - bf @ xf) < 0  # it decreased the quadratic model from x = 0
    # on a positive-definite system it is CG
    spd = matrix @ matrix + torch.eye(7, dtype=f64)
    op, _ = operator(spd)
    x1, i1 = bl.TruncatedCG(steps=7)(op, b)
    x2, _ = bl.CG(steps=7)(op, b)
    assert torch.allclose(tree.flatten(x1), tree.flatten(x2)) and not bool(i1.indefinite) and bool(i1.converged)


def test_truncated_cg_with_negative_curvature_at_the_first_step_keeps_the_scale():
    matrix = -torch.eye(7, dtype=f64) * 2.0
    op, as_tree = operator(matrix)
    b = as_tree(torch.ones(7, dtype=f64))
    x, info = bl.TruncatedCG(steps=5)(op, b)
    assert torch.allclose(tree.flatten(x), torch.full((7,), 0.5, dtype=f64))  # b / |curvature|
    assert int(info.steps) == 1 and bool(info.indefinite) and float(info.curvature) == pytest.approx(-2.0)


# --- the iMAML reference system -----------------------------------------------------------------------------------
def _proximal_setup(reg, dtype=f64):
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=1, dtype=dtype)
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    problem = bl.Problem(bl.proximal(task_loss, reg), task_loss, bl.GradientDescent(lr=0.1, steps=16),
                         init=bl.meta_init)
    return problem, mlp_params(dtype=dtype), support, query


def _flat_hvp(params, support, v):
    """The authors' ``hessian_vector_product``: the task loss (no proximal term) by torch.autograd."""
    leaves = [p.detach().clone().requires_grad_() for p in params.values()]
    loss = task_loss(dict(zip(params, leaves)), {}, support)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, leaves)])


def _cg_solve(f_ax, b, iters):
    """The authors' ``cg_solve`` (x0 = 0, a fixed number of iterations)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rdotr = r.clone(), r @ r
    for _ in range(iters):
        ap = f_ax(p)
        alpha = rdotr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        new = r @ r
        p, rdotr = r + new / rdotr * p, new
    return x


@pytest.mark.parametrize("coef, lam_damping", [(1.0, 10.0), (0.5, 3.0)])
def test_imaml_reference_system_is_the_authors_matrix_evaluator(coef, lam_damping):
    reg = 2.0
    problem, theta, support, query = _proximal_setup(reg)
    w, _ = problem.solve(theta, support, None)

    def evaluator(v):  # Learner.matrix_evaluator(task, lam=reg, regu_coef=coef, lam_damping=lam_damping)
        return (1.0 + coef) * v + _flat_hvp(w, support, v) / (reg + lam_damping)

    # the operator, on a random vector, from the proximal Hessian H + reg·I that Implicit hands the solver
    hessian_op = bl.LinearOperator(
        lambda v: tree.unflatten(_flat_hvp(w, support, tree.flatten(v)) + reg * tree.flatten(v), w), None, True)
    system = bl.IMAMLSystem(bl.CG(steps=5), reg, "reference", coef, lam_damping)
    v = torch.randn(tree.flatten(w).numel(), dtype=f64)
    assert torch.allclose(tree.flatten(system.operator(hessian_op).mv(tree.unflatten(v, w))), evaluator(v),
                          rtol=1e-12, atol=1e-14)
    # the meta-gradient: CG-5 on it from the query gradient, as the authors' training loop
    g_out = torch.func.grad(task_loss)(w, {}, query)
    expected = _cg_solve(evaluator, tree.flatten(g_out), 5)
    method = bl.imaml(reg=reg, cg_steps=5, tol=0.0, system="reference", coef=coef, lam_damping=lam_damping)
    out = bl.hypergrad(method, problem, theta, support, query, on_nonconvergence="ignore")
    assert torch.allclose(tree.flatten(out.grad), expected, rtol=1e-9, atol=1e-12)


def test_imaml_paper_system_is_the_dense_solution():
    reg = 2.0
    problem, theta, support, query = _proximal_setup(reg)
    w, _ = problem.solve(theta, support, None)
    n = tree.flatten(w).numel()
    hessian = torch.stack([_flat_hvp(w, support, e) for e in torch.eye(n, dtype=f64)], dim=1)
    g_out = tree.flatten(torch.func.grad(task_loss)(w, {}, query))
    expected = torch.linalg.solve(torch.eye(n, dtype=f64) + hessian / reg, g_out)
    out = bl.hypergrad(bl.imaml(reg=reg, cg_steps=n), problem, theta, support, query, on_nonconvergence="ignore")
    assert torch.allclose(tree.flatten(out.grad), expected, rtol=1e-7)
    wrapped = bl.Implicit(bl.IMAMLSystem(bl.CG(steps=n), reg, "paper"))
    out2 = bl.hypergrad(wrapped, problem, theta, support, query, on_nonconvergence="ignore")
    assert torch.allclose(tree.flatten(out2.grad), expected, rtol=1e-7)
    for solver in ("minres", "gmres", "truncated_cg"):
        out3 = bl.hypergrad(bl.imaml(reg=reg, cg_steps=n, solver=solver), problem, theta, support, query,
                            on_nonconvergence="ignore")
        assert torch.allclose(tree.flatten(out3.grad), expected, rtol=1e-6), solver


def test_imaml_arguments_are_checked():
    with pytest.raises(ValueError, match="system='authors'"):
        bl.imaml(reg=1.0, system="authors")
    with pytest.raises(ValueError, match="solver='bicg'"):
        bl.imaml(reg=1.0, solver="bicg")


# --- tolerances in every dtype ----------------------------------------------------------------------------------
def test_converged_float32_solve_is_judged_converged_and_does_not_warn():
    f32 = torch.float32
    train, val = ridge_data(dtype=f32)
    problem = bl.Problem(ridge_inner, ridge_outer, bl.GradientDescent(lr=0.5, steps=400))
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bl.hypergrad(bl.Implicit(), problem, hparams, train, val, params0={"w": torch.zeros(5, dtype=f32)})
    assert bool(out.inner_info.converged) and bool(out.linear_info.converged)
    assert 1e-8 < float(out.linear_info.residual) <= bl.default_tol(f32) or float(out.linear_info.residual) <= 1e-8
    as64 = lambda split: tuple(t.double() for t in split)  # noqa: E731
    _, expected = ridge_exact({"log_l2": torch.tensor(-1.0, dtype=f64)}, as64(train), as64(val))
    assert float(out.grad["log_l2"]) == pytest.approx(float(expected), rel=1e-3)


def test_unconverged_float64_solve_is_not_judged_converged():
    train, val = ridge_data()
    problem = bl.Problem(ridge_inner, ridge_outer, bl.GradientDescent(lr=0.5, steps=400))
    out = bl.hypergrad(bl.Implicit(bl.CG(steps=2)), problem, {"log_l2": torch.tensor(-1.0, dtype=f64)}, train, val,
                       params0={"w": torch.zeros(5, dtype=f64)}, on_nonconvergence="ignore")
    assert bool(out.inner_info.converged) and not bool(out.linear_info.converged)
    assert bl.default_tol(f64) < float(out.linear_info.residual) < 0.1  # close, but not a float64 solution


# --- divergence is never success ----------------------------------------------------------------------------------
def _ridge_L(hparams, train):
    X = train[0]
    return float(torch.linalg.eigvalsh(X.T @ X / X.shape[0]).max() + hparams["log_l2"].exp())


def test_diverging_neumann_is_flagged_whatever_tol_says():
    train, val = ridge_data()
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f64)}
    L = _ridge_L(hparams, train)
    problem = bl.Problem(ridge_inner, ridge_outer, bl.GradientDescent(lr=0.5, steps=400))
    w0 = {"w": torch.zeros(5, dtype=f64)}
    for method in (bl.neumann(steps=20, alpha=3 / L), bl.neumann(steps=20, alpha=3 / L, tol=float("inf")),
                   bl.Implicit(bl.Neumann(steps=20, alpha=3 / L, tol=1e-8))):
        bl.diagnostics.reset_warnings()  # the same call site: each method warns afresh
        with pytest.warns(bl.NonConvergenceWarning, match=r"Use alpha < .*the Neumann series diverged"):
            out = bl.hypergrad(method, problem, hparams, train, val, params0=w0)
        info = out.linear_info
        assert bool(info.diverged) and not bool(info.converged) and float(info.residual) > 1
        assert float(info.curvature) == pytest.approx(L, rel=0.05)  # the largest eigenvalue, from the growth rate
    with pytest.raises(bl.NonConvergenceError, match="diverged"):
        bl.hypergrad(bl.neumann(steps=20, alpha=3 / L), problem, hparams, train, val, params0=w0,
                     on_nonconvergence="raise")


def test_diverging_fixed_point_iteration_is_flagged():
    matrix = torch.diag(torch.tensor([0.5, 1.0, 2.5, 3.0, 1.5, 0.7, 1.2], dtype=f64))  # I − A has |3 − 1| = 2
    op, as_tree = operator(matrix)
    _, info = bl.fixed_point_iteration(steps=30)(op, as_tree(torch.ones(7, dtype=f64)))
    assert bool(info.diverged) and not bool(info.converged)
    assert float(info.curvature) == pytest.approx(3.0, rel=1e-3)


def test_slow_neumann_on_logistic_regression_warns():
    sklearn = pytest.importorskip("sklearn.datasets")
    data = sklearn.load_breast_cancer()
    X = torch.tensor(data.data, dtype=f64)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target, dtype=f64)
    train, val = (X[:400], y[:400]), (X[400:], y[400:])

    def inner(w, h, b):
        logits = b[0] @ w["w"]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, b[1]) + 0.5 * h["l2"] * (w["w"] ** 2).sum()

    def outer(w, h, b):
        return torch.nn.functional.binary_cross_entropy_with_logits(b[0] @ w["w"], b[1])

    hparams = {"l2": torch.tensor(1e-3, dtype=f64)}
    loss = lambda w: inner({"w": w}, hparams, train)  # noqa: E731
    w = torch.zeros(X.shape[1], dtype=f64)
    for _ in range(30):  # Newton: the inner solution to round-off, found outside the problem (params0, no steps)
        w = w - torch.linalg.solve(torch.func.hessian(loss)(w), torch.func.grad(loss)(w))
    problem = bl.Problem(inner, outer, bl.GradientDescent(lr=1.0, steps=0, tol=1e-10))
    w0 = {"w": w}
    exact = bl.hypergrad(bl.Implicit(bl.Dense()), problem, hparams, train, val, params0=w0)
    L = float(torch.linalg.eigvalsh(torch.func.hessian(loss)(w)).max())
    with pytest.warns(bl.NonConvergenceWarning, match="Neumann did not converge"):
        out = bl.hypergrad(bl.neumann(steps=200, alpha=1 / L), problem, hparams, train, val, params0=w0)
    rel = float((out.grad["l2"] - exact.grad["l2"]).abs() / exact.grad["l2"].abs())
    # 200 terms leave the hypergradient tens of percent off: the residual says so, and it is not called converged
    assert rel > 0.1 and float(out.linear_info.residual) > 1e-3 and not bool(out.linear_info.diverged)


# --- skip_task ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap", "threads"])
def test_skip_task_averages_the_finite_tasks_and_counts_the_rest(batching):
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=8)
    xs = xs.clone()
    xs[3, 0, 0] = float("nan")  # one bad task of eight
    problem = bl.Problem(task_loss, task_loss, bl.GradientDescent(lr=0.3, steps=2), init=bl.meta_init)
    theta = mlp_params()
    with pytest.warns(RuntimeWarning, match="skipped 1/8 tasks"):
        out = bl.meta_grad(bl.Unrolled(), problem, theta, (xs, ys), (xq, yq), batching=batching,
                           on_nonfinite="skip_task")
    keep = [i for i in range(8) if i != 3]
    rest = bl.meta_grad(bl.Unrolled(), problem, theta, (xs[keep], ys[keep]), (xq[keep], yq[keep]))
    assert int(out.dropped) == 1 and out.kept.tolist() == [i != 3 for i in range(8)]
    for k in theta:
        assert torch.allclose(out.grad[k], rest.grad[k], rtol=1e-12, atol=1e-15)
    assert torch.allclose(out.outer_loss, rest.outer_loss)
    with pytest.raises(bl.NonFiniteError, match="not finite"):  # the default still refuses
        bl.meta_grad(bl.Unrolled(), problem, theta, (xs, ys), (xq, yq), batching=batching)


def test_skip_task_with_every_task_failing_is_an_error():
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=3)
    problem = bl.Problem(task_loss, task_loss, bl.GradientDescent(lr=0.3, steps=2), init=bl.meta_init)
    with pytest.raises(bl.NonFiniteError, match="every task"):
        bl.meta_grad(bl.FirstOrder(), problem, mlp_params(), (xs * float("nan"), ys), (xq, yq),
                     on_nonfinite="skip_task")
    with pytest.raises(bl.NonFiniteError):  # a single task has nothing to average: skip_task means raise
        bl.hypergrad(bl.FirstOrder(), problem, mlp_params(), (xs[0] * float("nan"), ys[0]), (xq[0], yq[0]),
                     on_nonfinite="skip_task")


def test_meta_grad_with_zero_tasks_is_a_value_error():
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=2)
    problem = bl.Problem(task_loss, task_loss, bl.GradientDescent(lr=0.3, steps=1), init=bl.meta_init)
    with pytest.raises(ValueError, match="0 tasks"):
        bl.meta_grad(bl.Unrolled(), problem, mlp_params(), (xs[:0], ys[:0]), (xq[:0], yq[:0]))


# --- warnings a person reads ----------------------------------------------------------------------------------------
def test_a_100_step_loop_warns_a_bounded_number_of_short_times():
    train, val = ridge_data()
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f64)}
    w0 = {"w": ridge_exact(hparams, train, val)[0]}  # the inner solution: only the adjoint solve is short
    problem = bl.Problem(ridge_inner, ridge_outer, bl.GradientDescent(lr=0.5, steps=0, tol=1e-12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):
            bl.hypergrad(bl.Implicit(bl.CG(steps=1)), problem, hparams, train, val, params0=w0)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3, messages  # the 1st, 10th and 100th
    assert "[100th time here]" in messages[-1]
    assert all(len(m) < 200 and m.startswith("More steps") for m in messages), messages
    assert all(w.filename == __file__ for w in caught)  # attributed to the caller's line
    (site, cause), count = next(iter(warning_counts().items()))
    assert cause == "unconverged" and count == 100 and site.startswith(__file__)


@pytest.mark.parametrize("system, solver", [("reference", "cg"), ("paper", "minres")])
def test_imaml_systems_under_vmap_equal_a_loop(system, solver):
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=3)
    problem = bl.Problem(bl.proximal(task_loss, 2.0), task_loss, bl.GradientDescent(lr=0.1, steps=5),
                         init=bl.meta_init)
    method = bl.imaml(reg=2.0, cg_steps=4, system=system, solver=solver)
    loop, vec = (bl.meta_grad(method, problem, mlp_params(), (xs, ys), (xq, yq), batching=b,
                              on_nonconvergence="ignore") for b in ("loop", "vmap"))
    for k in loop.grad:
        assert torch.allclose(loop.grad[k], vec.grad[k], rtol=1e-10, atol=1e-13)
    assert torch.allclose(loop.linear_info.residual, vec.linear_info.residual, rtol=1e-8)
    assert loop.linear_info.indefinite.tolist() == vec.linear_info.indefinite.tolist()


def test_jfb_judges_nothing_by_default_and_checks_its_term_when_given_a_tol():
    train, val = ridge_data()
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f64)}
    w0 = {"w": ridge_exact(hparams, train, val)[0]}
    problem = bl.Problem(ridge_inner, ridge_outer, bl.GradientDescent(lr=0.5, steps=0, tol=1e-12))
    plain = bl.hypergrad(bl.jfb(alpha=0.5), problem, hparams, train, val, params0=w0)  # no warning: an approximation
    assert bool(plain.linear_info.converged) and int(plain.linear_info.steps) == 0
    checked = bl.hypergrad(bl.jfb(alpha=0.5, tol=1e-3), problem, hparams, train, val, params0=w0,
                           on_nonconvergence="ignore")
    assert not bool(checked.linear_info.converged) and 0.01 < float(checked.linear_info.residual) < 1
    assert torch.equal(plain.grad["log_l2"], checked.grad["log_l2"])  # the same answer, now judged
