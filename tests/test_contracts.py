"""Invariants every method keeps: inputs unchanged, output structure = hparams, dtype kept, per-task info."""

import pytest
import torch

import bilevel as bl
from bilevel import tree

from problems import fewshot_tasks, maml_problem, mlp_params, task_loss

REG = 1.0
PROX = bl.Problem(bl.proximal(task_loss, REG), task_loss, bl.GradientDescent(lr=0.2, steps=3), init=bl.meta_init)
CASES = [(bl.Unrolled(), maml_problem()), (bl.Unrolled(truncate=1), maml_problem()),
         (bl.FirstOrder(), maml_problem()), (bl.Reptile(), maml_problem()), (bl.imaml(REG, cg_steps=3), PROX),
         (bl.neumann(steps=3, alpha=0.1), maml_problem()), (bl.jfb(), maml_problem()),
         (bl.Implicit(bl.NormalCG(steps=3)), maml_problem()), (bl.Implicit(bl.Dense()), maml_problem()),
         (bl.Implicit(hvp="fwd"), maml_problem())]


@pytest.mark.parametrize("method, problem", CASES, ids=[repr(m) for m, _ in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(method, problem, dtype):
    theta = mlp_params(dtype=dtype)
    (xs, ys), (xq, yq) = fewshot_tasks(dtype=dtype)
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    before = {k: v.clone() for k, v in theta.items()}
    inputs = [t.clone() for t in (xs, xq)]
    out = bl.hypergrad(method, problem, theta, support, query, on_nonconvergence="ignore")
    assert all(torch.equal(before[k], theta[k]) for k in theta), "hparams were modified"
    assert torch.equal(inputs[0], xs) and torch.equal(inputs[1], xq), "batches were modified"
    assert out.grad.keys() == theta.keys()
    for k in theta:
        assert out.grad[k].shape == theta[k].shape and out.grad[k].dtype == dtype
        assert out.grad[k].device == theta[k].device and not out.grad[k].requires_grad
    assert out.outer_loss.dim() == 0 and out.outer_loss.dtype == dtype
    assert out.params.keys() == theta.keys() and out.inner_info.steps.dim() == 0
    assert bool(torch.isfinite(tree.flatten(out.grad)).all())


def test_learned_inner_learning_rate_is_an_hparam():
    """A learned learning rate (Meta-SGD style): lr names an hparams entry; Unrolled differentiates it."""
    theta = mlp_params()
    hparams = dict(theta, inner_lr=torch.tensor(0.3, dtype=torch.float64))
    init = lambda h: {k: h[k] for k in theta}  # noqa: E731
    problem = bl.Problem(task_loss, task_loss, bl.GradientDescent(lr="inner_lr", steps=2), init=init)
    (xs, ys), (xq, yq) = fewshot_tasks()
    out = bl.hypergrad(bl.Unrolled(), problem, hparams, (xs[0], ys[0]), (xq[0], yq[0]))
    eps = 1e-6
    f = lambda lr: bl.Unrolled()(problem, dict(hparams, inner_lr=lr), (xs[0], ys[0]), (xq[0], yq[0])).outer_loss  # noqa: E731
    fd = (f(hparams["inner_lr"] + eps) - f(hparams["inner_lr"] - eps)) / (2 * eps)
    assert torch.allclose(out.grad["inner_lr"], fd, rtol=1e-6)
