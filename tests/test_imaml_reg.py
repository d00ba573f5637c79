"""iMAML's proximal strength is one number: ``imaml(reg)`` refuses a problem built on ``proximal(loss, r)`` with
another ``r`` (before this check the method's ``reg`` was only checked to be positive, and a mismatch went unseen)."""

import pytest
import torch

import bilevel as bl


def problem(reg):
    X, y = torch.randn(3, 8, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    loss = lambda w, h, b: ((b[0] @ w["w"] - b[1]) ** 2).mean()  # noqa: E731
    prob = bl.Problem(bl.proximal(loss, reg), loss, bl.GradientDescent(lr=0.1, steps=200, tol=1e-10),
                      init=bl.meta_init)
    return prob, {"w": torch.zeros(4, dtype=torch.float64)}, (X, y)


@pytest.mark.parametrize("system", ["paper", "reference"])
def test_imaml_refuses_a_different_proximal_strength(system):
    prob, hparams, batch = problem(2.0)
    message = r"imaml\(reg=1.0\) but the problem's inner loss is proximal\(\.\.\., reg=2.0\)"
    with pytest.raises(ValueError, match=message):
        bl.meta_grad(bl.imaml(1.0, system=system), prob, hparams, batch, batch)


def test_imaml_with_the_same_strength_runs_and_matches_dense():
    prob, hparams, batch = problem(2.0)
    out = bl.meta_grad(bl.imaml(2.0, cg_steps=10), prob, hparams, batch, batch, on_nonconvergence="raise")
    dense = bl.meta_grad(bl.Implicit(bl.Dense()), prob, hparams, batch, batch)
    torch.testing.assert_close(out.grad["w"], dense.grad["w"], rtol=1e-8, atol=1e-10)
