"""Mixed precision (``precision=``) and the device path: no tensor of the engine is created on the CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bilevel as bl


class SmallConvBN(nn.Module):
    """Two 3x3 convolutions with training-mode batch norm and a linear head: conv4 in miniature."""

    def __init__(self, ways=3, channels=8):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, channels, 3, stride=2, padding=1),
                                    nn.Conv2d(channels, channels, 3, stride=2, padding=1)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(channels, track_running_stats=False) for _ in range(2)])
        self.head = nn.Linear(channels, ways)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(F.batch_norm(conv(x), None, None, norm.weight, norm.bias, training=True))
        return self.head(x.mean(dim=(2, 3)))


def setup(device="cpu", tasks=4, ways=3, shots=2, queries=4, steps=1):
    torch.manual_seed(0)
    model = SmallConvBN(ways)
    theta = {k: v.detach().clone().to(device) for k, v in model.named_parameters()}
    model = model.to(device)

    def loss(params, hparams, batch):
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    def task(n):
        x = torch.randn(tasks, ways * n, 1, 12, 12)
        y = torch.arange(ways).repeat_interleave(n).expand(tasks, -1)
        return x.to(device), y.to(device)

    solver = bl.GradientDescent(lr=0.4, steps=steps)
    maml = bl.Problem(loss, loss, solver, init=bl.meta_init)
    implicit = bl.Problem(bl.proximal(loss, 1.0), loss, solver, init=bl.meta_init)
    return theta, task(shots), task(queries), maml, implicit


def cosine(a, b):
    a, b = torch.cat([v.flatten() for v in a.values()]), torch.cat([v.flatten() for v in b.values()])
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("method", [bl.Unrolled(), bl.FirstOrder()], ids=["maml", "first_order"])
def test_bf16_meta_gradient_is_close_to_float32(method):
    theta, support, query, problem, _ = setup()
    full = bl.meta_grad(method, problem, theta, support, query)
    half = bl.meta_grad(method, problem, theta, support, query, precision="bf16")
    assert cosine(half.grad, full.grad) >= 0.99
    assert cosine(half.grad, full.grad) < 1.0 - 1e-7  # autocast really ran: the gradients differ
    assert {k: v.dtype for k, v in half.grad.items()} == {k: v.dtype for k, v in theta.items()}
    assert half.outer_loss.dtype == torch.float32
    assert abs(half.outer_loss.item() - full.outer_loss.item()) <= 0.02 * abs(full.outer_loss.item())


def test_precision_in_hypergrad_and_implicit_keeps_float32_adjoint():
    theta, support, query, _, problem = setup(tasks=1, steps=3)
    one = lambda b: tuple(x[0] for x in b)  # noqa: E731
    method = bl.imaml(reg=1.0, cg_steps=5)
    full = bl.hypergrad(method, problem, theta, one(support), one(query), on_nonconvergence="ignore")
    half = bl.hypergrad(method, problem, theta, one(support), one(query), on_nonconvergence="ignore",
                        precision="bf16")
    assert cosine(half.grad, full.grad) >= 0.99
    assert all(v.dtype == torch.float32 for v in half.grad.values())
    assert half.linear_info.residual.dtype == torch.float32


def test_fp16_runs_and_returns_float32():
    theta, support, query, problem, _ = setup()
    out = bl.meta_grad(bl.FirstOrder(), problem, theta, support, query, precision="fp16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.grad.values())


@pytest.mark.parametrize("call", ["hypergrad", "meta_grad"])
def test_bad_precision_is_refused(call):
    theta, support, query, problem, _ = setup(tasks=1)
    with pytest.raises(ValueError, match=r"precision='float16'.*bf16"):
        getattr(bl, call)(bl.Unrolled(), problem, theta, support, query, precision="float16")


def test_omniglot_config_takes_precision():
    from tasks import config
    from tasks.omniglot.config import load_config

    assert load_config("demo", ["meta.precision=bf16"]).meta.precision == "bf16"
    with pytest.raises(config.ConfigError, match="meta.precision='half'; use null, bf16 or fp16"):
        load_config("demo", ["meta.precision=half"])
