"""Library misuse as a new user would make it: a named error at hypergrad / meta_grad instead of a bare torch one."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def inner_loss(params, hparams, batch):
    x, y = batch
    return ((x @ params["w"] - y) ** 2).mean() + hparams["reg"] * (params["w"] ** 2).sum()


def outer_loss(params, hparams, batch):
    x, y = batch
    return ((x @ params["w"] - y) ** 2).mean()


def swapped(hparams, params, batch):   # the arguments in the wrong order
    return inner_loss(params, hparams, batch)


@pytest.fixture()
def data():
    torch.manual_seed(0)
    return torch.randn(20, 3), torch.randn(20)


def problem(loss=inner_loss):
    return bl.Problem(loss, outer_loss, bl.GradientDescent(lr=0.1, steps=20))


P0 = {"w": torch.zeros(3)}
REG = {"reg": torch.tensor(0.1)}


def test_an_integer_hyperparameter_is_named(data):
    with pytest.raises(TypeError, match=r"hparams \{'reg': 'torch.int64'\}.*floating"):
        bl.hypergrad(bl.Unrolled(), problem(), {"reg": torch.tensor(1)}, data, data, P0)


def test_float64_data_with_float32_params_names_both_dtypes(data):
    x, y = data
    with pytest.raises(TypeError, match=r"mix floating dtypes.*params0 float32.*inner_batch float64"):
        bl.hypergrad(bl.Unrolled(), problem(), REG, (x.double(), y.double()), data, P0)
    stacked = (x.double()[None].expand(2, -1, -1), y.double()[None].expand(2, -1))
    for batching in ("loop", "vmap"):
        with pytest.raises(TypeError, match=r"mix floating dtypes.*float64"):
            bl.meta_grad(bl.Unrolled(), problem(), REG, stacked, stacked, {"w": torch.zeros(2, 3)},
                         batching=batching)


def test_a_loss_with_swapped_arguments_is_explained(data):
    with pytest.raises(TypeError, match=r"KeyError 'w' \(a key of params\).*loss\(params, hparams, batch\)"):
        bl.hypergrad(bl.Unrolled(), problem(swapped), REG, data, data, P0)


def test_nan_in_the_data_is_blamed_on_the_data(data):
    x, y = data
    x = x.clone()
    x[3, 1] = float("nan")
    with pytest.raises(bl.NonFiniteError, match=r"inputs hold NaN or inf \(inner_batch, outer_batch\)"):
        bl.hypergrad(bl.Unrolled(), problem(), REG, (x, y), (x, y), P0)
    with pytest.raises(bl.NonFiniteError, match=r"inputs hold NaN or inf \(inner_batches\)"):
        bl.meta_grad(bl.Unrolled(), problem(), REG, (x[None], y[None]), data and (data[0][None], data[1][None]),
                     {"w": torch.zeros(1, 3)})


def test_the_correct_call_still_works(data):
    out = bl.hypergrad(bl.Unrolled(), problem(), REG, data, data, P0)
    assert torch.isfinite(out.grad["reg"])
