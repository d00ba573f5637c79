"""Mixed precision (``precision=``) and the device path: no tensor of the engine is created on the CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_vmap_batching_under_autocast():
    """Without batch norm vmap and autocast agree with the loop; with it torch's vmap rule fails, and the error
    says what to do instead."""
    loss, theta, (x, y) = meta_mlp("cpu")
    mlp = bl.Problem(loss, loss, bl.GradientDescent(lr=0.1, steps=2), init=bl.meta_init)
    loop = bl.meta_grad(bl.Unrolled(), mlp, theta, (x, y), (x, y), precision="bf16")
    vec = bl.meta_grad(bl.Unrolled(), mlp, theta, (x, y), (x, y), precision="bf16", batching="vmap")
    assert cosine(loop.grad, vec.grad) >= 0.999
    theta, support, query, problem, _ = setup()
    with pytest.raises(RuntimeError, match="batching='vmap'.*use batching='loop'"):
        bl.meta_grad(bl.FirstOrder(), problem, theta, support, query, precision="bf16", batching="vmap")


def test_fp16_runs_and_returns_float32():
    theta, support, query, problem, _ = setup()
    out = bl.meta_grad(bl.FirstOrder(), problem, theta, support, query, precision="fp16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.grad.values())


@pytest.mark.parametrize("call", ["hypergrad", "meta_grad"])
def test_bad_precision_is_refused(call):
    theta, support, query, problem, _ = setup(tasks=1)
    with pytest.raises(ValueError, match=r"precision='float16'.*bf16"):
        getattr(bl, call)(bl.Unrolled(), problem, theta, support, query, precision="float16")


def test_precision_refuses_float64_hparams_it_would_not_lower():
    theta, support, query, problem, _ = setup(tasks=1)
    theta = {k: v.double() for k, v in theta.items()}
    with pytest.raises(ValueError, match="hparams are float64; autocast lowers only float32"):
        bl.meta_grad(bl.Unrolled(), problem, theta, support, query, precision="bf16")


def test_omniglot_config_takes_precision():
    from tasks import config
    from tasks.omniglot.config import load_config

    assert load_config("demo", ["meta.precision=bf16"]).meta.precision == "bf16"
    with pytest.raises(config.ConfigError, match="meta.precision='half'; use null, bf16 or fp16"):
        load_config("demo", ["meta.precision=half"])


class CreatedOn(TorchDispatchMode):
    """Records the device of every tensor an operation returns (the engine's own creations included), except
    0-dim CPU tensors: Python numbers become those under vmap, and torch mixes them with any device."""

    def __init__(self):
        super().__init__()
        self.devices = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and not (x.device.type == "cpu" and x.dim() == 0):
                self.devices.setdefault(x.device.type, set()).add(str(func))
        return out


def meta_mlp(device):
    def loss(params, hparams, batch):
        x, y = batch
        return F.cross_entropy(torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"], y)

    theta = {"w1": torch.randn(6, 8), "b1": torch.zeros(8), "w2": torch.randn(8, 3)}
    x, y = torch.randn(4, 6, 6), torch.arange(3).repeat(2).expand(4, 6)
    return loss, {k: v.to(device) for k, v in theta.items()}, (x.to(device), y.to(device))


DEVICE_METHODS = {
    "unrolled": bl.Unrolled(), "first_order": bl.FirstOrder(), "imaml_cg": bl.imaml(reg=1.0, cg_steps=3),
    "implicit_cg_tol": bl.Implicit(bl.CG(steps=3, tol=1e-4)), "reptile": bl.Reptile(),
    "forward": bl.Forward(max_hparams=100),  # the MLP has 80 scalar hparams
    "neumann": bl.neumann(steps=3, alpha=0.1), "jfb": bl.jfb(), "fixed_point_iteration":
    bl.Implicit(bl.fixed_point_iteration(steps=3)), "minres": bl.Implicit(bl.MINRES(steps=3)),
    "truncated_cg": bl.Implicit(bl.TruncatedCG(steps=3)), "gmres": bl.Implicit(bl.GMRES(steps=3)),
    "normal_cg": bl.Implicit(bl.NormalCG(steps=3)), "imaml_minres": bl.imaml(reg=1.0, cg_steps=3, solver="minres"),
}


@pytest.mark.parametrize("method", list(DEVICE_METHODS.values()), ids=list(DEVICE_METHODS))
@pytest.mark.parametrize("batched", [False, True], ids=["one_task", "vmap"])
def test_core_methods_run_on_the_meta_device_and_create_no_cpu_tensor(method, batched):
    """With every input on the ``meta`` device (shapes only, no data), an engine tensor made on the CPU by default
    would either fail to mix with the inputs or show up in ``CreatedOn``: what would break on a GPU. The
    methods are called directly (the diagnostics of ``hypergrad``/``meta_grad`` read values on the host by
    design) with a fixed-budget inner solver (a tolerance checks convergence on the host at every step)."""
    loss, theta, (x, y) = meta_mlp("meta")
    inner = bl.proximal(loss, 1.0) if isinstance(method, bl.Implicit) else loss
    problem = bl.Problem(inner, loss, bl.GradientDescent(lr=0.1, steps=2), init=bl.meta_init)

    def call(xs, ys):  # vmap returns tensors only: the absent parts travel as empty tuples, as in meta_grad
        out = method(problem, theta, (xs, ys), (xs, ys))
        return out._replace(linear_info=out.linear_info or (), dropped=(), kept=())

    with CreatedOn() as created:
        out = vmap(call, randomness="different")(x, y) if batched else call(x[0], y[0])
    assert set(created.devices) == {"meta"}, created.devices
    leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
    assert leaves and all(v.device.type == "meta" for v in leaves)
    lead = (4,) if batched else ()
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.grad.items()} == \
        {k: (lead + tuple(v.shape), v.dtype) for k, v in theta.items()}


def test_weight_decay_summary_takes_its_quantiles_on_the_device_of_the_hparams():
    """On the meta device the only failure left is the final host read of the numbers (a CPU ``q`` tensor
    failed before it: "q tensor must be on the same device as the input tensor")."""
    from tasks.weight_decay.tuning import log_wd_summary

    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        log_wd_summary({"w": torch.zeros(5, device="meta")})
