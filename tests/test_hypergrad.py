"""Hypergradients against closed forms, hand-written references, finite differences and each other."""

import pytest
import torch

import bilevel as bl
from bilevel import tree

from problems import (f64, fewshot_tasks, logreg_data, logreg_inner, logreg_outer, maml_problem, maml_reference,
                      mlp_params, ridge_data, ridge_exact, ridge_problem, task_loss)

TRAIN, VAL = ridge_data()
W0 = {"w": torch.zeros(5, dtype=f64)}


def rel(a, b):
    a, b = (tree.flatten(x) if isinstance(x, dict) else x for x in (a, b))
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("log_l2", [torch.tensor(-1.0, dtype=f64), torch.linspace(-2, 0, 5, dtype=f64)])
@pytest.mark.parametrize("method", [bl.Implicit(bl.CG(steps=10)), bl.Implicit(bl.Dense()),
                                    bl.Implicit(bl.GMRES(steps=10)), bl.Implicit(bl.NormalCG(steps=20)),
                                    bl.Implicit(bl.CG(steps=10), hvp="fwd")], ids=repr)
def test_ridge_closed_form(method, log_l2):
    hparams = {"log_l2": log_l2}
    out = bl.hypergrad(method, ridge_problem(), hparams, TRAIN, VAL, params0=W0)
    w, expected = ridge_exact(hparams, TRAIN, VAL)
    assert rel(out.params["w"], w) < 1e-10
    assert rel(out.grad["log_l2"], expected) <= 1e-10
    assert bool(out.inner_info.converged) and bool(out.linear_info.converged)


def test_dense_and_cg_agree_to_1e10():
    hparams = {"log_l2": torch.linspace(-2, 0, 5, dtype=f64)}
    cg = bl.hypergrad(bl.Implicit(bl.CG(steps=10)), ridge_problem(), hparams, TRAIN, VAL, params0=W0).grad
    dense = bl.hypergrad(bl.Implicit(bl.Dense()), ridge_problem(), hparams, TRAIN, VAL, params0=W0).grad
    assert rel(cg, dense) <= 1e-10


def test_neumann_converges_as_terms_grow_when_alpha_below_2_over_L():
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f64)}
    _, expected = ridge_exact(hparams, TRAIN, VAL)
    X = TRAIN[0]
    L = torch.linalg.eigvalsh(X.T @ X / X.shape[0]).max() + hparams["log_l2"].exp()
    # the short series are truncated on purpose: the unconverged ones are judged so (and not warned about here)
    outs = [bl.hypergrad(bl.neumann(steps=k, alpha=float(1.0 / L)), ridge_problem(), hparams, TRAIN, VAL,
                         params0=W0, on_nonconvergence="ignore") for k in (0, 2, 5, 20, 50)]
    errors = [rel(out.grad["log_l2"], expected) for out in outs]
    assert [bool(out.linear_info.converged) for out in outs[1:]] == [False, False, False, True]
    assert all(not bool(out.linear_info.diverged) for out in outs)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_unrolled_approaches_closed_form_as_inner_steps_grow():
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f64)}
    _, expected = ridge_exact(hparams, TRAIN, VAL)
    errors = [rel(bl.hypergrad(bl.Unrolled(), ridge_problem(steps=k, tol=0.0, lr=0.3), hparams, TRAIN, VAL,
                               params0=W0).grad["log_l2"], expected) for k in (5, 20, 80, 300)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_forward_mode_equals_reverse_mode():
    hparams = {"log_l2": torch.linspace(-2, 0, 5, dtype=f64)}
    problem = ridge_problem(steps=30, tol=0.0, lr=0.3)
    fwd = bl.hypergrad(bl.Forward(), problem, hparams, TRAIN, VAL, params0=W0).grad
    rev = bl.hypergrad(bl.Unrolled(), problem, hparams, TRAIN, VAL, params0=W0).grad
    assert rel(fwd, rev) < 1e-12
    momentum = bl.Problem(problem.inner_loss, problem.outer_loss,
                          bl.GradientDescent(lr=0.1, steps=20, momentum=0.9, nesterov=True))
    assert rel(bl.Forward()(momentum, hparams, TRAIN, VAL, W0).grad,
               bl.Unrolled()(momentum, hparams, TRAIN, VAL, W0).grad) < 1e-12


def test_truncated_unrolled_is_the_gradient_of_the_last_steps():
    """truncate=K equals Unrolled on a K-step problem started from the detached (T−K)-step iterate."""
    hparams = {"log_l2": torch.tensor(-1.0, dtype=f64)}
    full = ridge_problem(steps=30, tol=0.0, lr=0.3)
    head = ridge_problem(steps=20, tol=0.0, lr=0.3)
    w20, _ = head.solve(hparams, TRAIN, W0)
    expected = bl.Unrolled()(ridge_problem(steps=10, tol=0.0, lr=0.3), hparams, TRAIN, VAL, w20).grad
    got = bl.Unrolled(truncate=10)(full, hparams, TRAIN, VAL, W0).grad
    assert rel(got, expected) < 1e-12
    assert rel(bl.Unrolled(truncate=30)(full, hparams, TRAIN, VAL, W0).grad,
               bl.Unrolled()(full, hparams, TRAIN, VAL, W0).grad) < 1e-12


@pytest.mark.parametrize("method", [bl.Implicit(bl.CG(steps=20)), bl.Unrolled(), bl.Forward(),
                                    bl.Implicit(bl.GMRES(steps=20))], ids=repr)
def test_logistic_regression_finite_differences(method):
    train, val = logreg_data()
    problem = bl.Problem(logreg_inner, logreg_outer, bl.GradientDescent(lr=1.5, steps=250, tol=1e-11))
    params0 = {"w": torch.zeros(4, dtype=f64), "b": torch.zeros((), dtype=f64)}
    check = bl.check_hypergrad(method, problem, {"log_l2": torch.tensor(-2.0, dtype=f64)}, train, val, params0,
                               directions=2)
    assert check.fd_error < 1e-6 and check.dense_error < 1e-6


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_unrolled_equals_handwritten_reference(steps, batch_norm):
    theta = mlp_params(batch_norm=batch_norm)
    (xs, ys), (xq, yq) = fewshot_tasks()
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    out = bl.hypergrad(bl.Unrolled(), maml_problem(lr=0.3, steps=steps), theta, support, query)
    expected = maml_reference(theta, support, query, lr=0.3, steps=steps)
    assert rel(out.grad, expected) <= 1e-10


def test_first_order_maml_equals_reference():
    theta = mlp_params()
    (xs, ys), (xq, yq) = fewshot_tasks()
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    out = bl.hypergrad(bl.FirstOrder(), maml_problem(lr=0.3, steps=3), theta, support, query)
    expected = maml_reference(theta, support, query, lr=0.3, steps=3, first_order=True)
    assert rel(out.grad, expected) <= 1e-10


def test_reptile_direction():
    theta = mlp_params()
    (xs, ys), (xq, yq) = fewshot_tasks()
    problem = maml_problem(lr=0.3, steps=4)
    out = bl.Reptile()(problem, theta, (xs[0], ys[0]), (xq[0], yq[0]))
    w, _ = bl.GradientDescent(lr=0.3, steps=4)(task_loss, theta, theta, (xs[0], ys[0]))
    assert rel(out.grad, tree.sub(theta, w)) < 1e-14


def test_imaml_equals_dense_solve_of_the_paper_system():
    """iMAML: grad = (I + H/reg)⁻¹ ∇L_out(w*) with H the task-loss Hessian at the proximal solution."""
    theta, reg = mlp_params(), 2.0
    (xs, ys), (xq, yq) = fewshot_tasks()
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    problem = bl.Problem(bl.proximal(task_loss, reg), task_loss, bl.GradientDescent(lr=0.25, steps=400, tol=1e-10),
                         init=bl.meta_init)
    out = bl.hypergrad(bl.imaml(reg, cg_steps=60), problem, theta, support, query)
    w = out.params
    flat_w = tree.flatten(w)
    H = torch.autograd.functional.hessian(lambda v: task_loss(tree.unflatten(v, w), {}, support), flat_w)
    g = tree.flatten(torch.func.grad(task_loss)(w, {}, query))
    expected = torch.linalg.solve(torch.eye(len(g), dtype=f64) + H / reg, g)
    assert rel(tree.flatten(out.grad), expected) <= 1e-8
    assert bool(out.linear_info.converged)


def test_jfb_is_zeroth_order_neumann_on_a_fixed_point():
    """For w = T(w, λ) = a·w + λ (contractive, |a|<1): exact dw/dλ = 1/(1−a); JFB takes the identity instead."""
    a = torch.tensor([0.5, -0.3], dtype=f64)
    T = lambda w, h, b: {"z": a * w["z"] + h["lam"]}  # noqa: E731
    inner = lambda w, h, b: 0.5 * ((w["z"] - T(w, h, b)["z"]) ** 2).sum()  # noqa: E731
    outer = lambda w, h, b: (w["z"] * b).sum()  # noqa: E731
    problem = bl.Problem(inner, outer, bl.GradientDescent(lr=1.0, steps=200, tol=1e-12))
    h, c = {"lam": torch.tensor([1.0, 2.0], dtype=f64)}, torch.tensor([1.0, -1.0], dtype=f64)
    w0 = {"z": torch.zeros(2, dtype=f64)}
    exact = c / (1 - a)
    for method in (bl.Implicit(bl.GMRES(steps=2), bl.fixed_point(T)),
                   bl.Implicit(bl.fixed_point_iteration(steps=200, tol=1e-14), bl.fixed_point(T)),
                   bl.Implicit(bl.NormalCG(steps=4), bl.fixed_point(T))):
        assert rel(bl.hypergrad(method, problem, h, None, c, w0).grad["lam"], exact) < 1e-10
    assert rel(bl.jfb(condition=bl.fixed_point(T))(problem, h, None, c, w0).grad["lam"], c) < 1e-12


@pytest.mark.parametrize("method, proximal", [(bl.Unrolled(), False), (bl.Unrolled(), True), (bl.FirstOrder(), False),
                                              (bl.imaml(2.0, cg_steps=5), True)],
                         ids=["unrolled", "unrolled_proximal", "first_order", "imaml"])
def test_top_level_autograd_path_equals_torch_func_path(method, proximal):
    # At the top level the gradients are plain autograd; under a transform (here: hparams tracked by autograd, which
    # keeps torch.func.grad so the result stays differentiable) they are torch.func. Same numbers, also when the
    # inner loss reads the hparams that the params start as (meta_init + proximal: params and hparams alias).
    theta = mlp_params(batch_norm=True)
    (xs, ys), (xq, yq) = fewshot_tasks()
    problem = maml_problem(lr=0.3, steps=2)
    if proximal:
        problem = bl.Problem(bl.proximal(problem.inner_loss, 2.0), problem.outer_loss, problem.solver,
                             init=bl.meta_init)
    top = method(problem, theta, (xs[0], ys[0]), (xq[0], yq[0]))
    tracked = {k: v.clone().requires_grad_() for k, v in theta.items()}
    inner = method(problem, tracked, (xs[0], ys[0]), (xq[0], yq[0]))
    assert rel(top.grad, tree.detach(inner.grad)) <= 1e-12
    assert torch.equal(top.outer_loss, inner.outer_loss.detach())


def test_hypergrad_of_tracked_hparams_stays_differentiable():
    # hparams that require grad keep the torch.func path, whose result autograd can differentiate again
    inner = lambda w, h, b: ((w["x"] - b) ** 2).sum() * (h["x"] ** 2).sum()  # noqa: E731
    outer = lambda w, h, b: (w["x"] ** 3).sum()  # noqa: E731
    problem = bl.Problem(inner, outer, bl.GradientDescent(lr=0.1, steps=2), init=bl.meta_init)
    theta, b = torch.tensor([0.3, -0.2], dtype=f64), torch.tensor([1.0, 2.0], dtype=f64)
    tracked = theta.clone().requires_grad_()
    (second,) = torch.autograd.grad(bl.Unrolled()(problem, {"x": tracked}, b, b).grad["x"].sum(), [tracked])
    eps, e = 1e-6, torch.eye(2, dtype=f64)
    total = lambda x: bl.Unrolled()(problem, {"x": x}, b, b).grad["x"].sum()  # noqa: E731
    fd = torch.stack([(total(theta + eps * e[i]) - total(theta - eps * e[i])) / (2 * eps) for i in range(2)])
    assert torch.allclose(second, fd, rtol=1e-6, atol=1e-8)


def test_all_finite_sees_nan_inf_and_cancelling_infinities():
    ok = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    assert bool(tree.all_finite(ok))
    for bad in (float("nan"), float("inf"), -float("inf")):
        b = torch.zeros(2, 2)
        b[1, 0] = bad
        assert not bool(tree.all_finite({**ok, "b": b}))
    assert not bool(tree.all_finite({"a": torch.tensor([float("inf"), -float("inf")])}))
