"""The accelerator path without an accelerator: host reads on a cadence, the private-API fallback, and the root
solvers and inner solvers on the ``meta`` device (shapes only: a tensor made on the CPU by default shows up)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import vmap
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import bilevel as bl
from bilevel import root_find
from bilevel.root_find import Anderson, Broyden, Newton, NewtonKrylov, Picard, fixed_point_residual
from test_precision import CreatedOn, meta_mlp

DT = torch.float64
SOLVERS = {"Picard": (Picard, dict(steps=300, tol=1e-11)), "Anderson": (Anderson, dict(steps=100, tol=1e-11)),
           "Newton": (Newton, dict(tol=1e-11)), "NewtonKrylov": (NewtonKrylov, dict(tol=1e-11)),
           "Broyden": (Broyden, dict(steps=100, tol=1e-11))}


def tanh_layer(z, x, W):
    return torch.tanh(W @ z + x)


def deq(device="cpu"):
    g = torch.Generator().manual_seed(0)
    W = 0.8 * torch.randn(8, 8, generator=g, dtype=DT) / 8 ** 0.5
    X = torch.randn(4, 8, generator=g, dtype=DT) * torch.tensor([[0.1], [1.0], [2.0], [-1.0]], dtype=DT)
    return W.to(device), X.to(device)


def arctan_starts():
    """``arctan(z) = 0`` from starts where plain Newton overshoots: the line search backtracks a different number of
    times per problem (none from 0.5)."""
    return torch.tensor([[0.5], [1.5], [3.0], [-10.0]], dtype=DT)


def same(a, b):
    """Bitwise equal tensors, or trees of them."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("every", [3, 8, 0])
def test_check_every_never_changes_the_result(name, every):
    """Between two host reads the loop runs masked iterations, which freeze a converged problem: z and SolveInfo
    are bitwise those of a read at every iteration (the CPU default)."""
    cls, kw = SOLVERS[name]
    W, X = deq()
    F = fixed_point_residual(tanh_layer)
    for x in X:
        assert same(cls(**kw, check_every=every)(F, torch.zeros_like(x), x, W), cls(**kw)(F, torch.zeros_like(x), x, W))
    batched = lambda s: vmap(lambda x: s(F, torch.zeros_like(x), x, W))(X)  # noqa: E731
    assert same(batched(cls(**kw, check_every=every)), batched(cls(**kw)))


@pytest.mark.parametrize("every", [3, 8, 0])
def test_check_every_keeps_the_newton_line_search_result(every):
    for z0 in arctan_starts():
        assert same(Newton(tol=1e-12, check_every=every)(torch.arctan, z0), Newton(tol=1e-12)(torch.arctan, z0))
    batched = lambda s: vmap(lambda z0: s(torch.arctan, z0))(arctan_starts())  # noqa: E731
    assert same(batched(Newton(tol=1e-12, check_every=every)), batched(Newton(tol=1e-12)))


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``bool(t)``, ``t.item()``): a synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("every,reads", [(None, 40), (1, 40), (8, 5), (3, 14), (0, 0)])
def test_host_reads_follow_check_every(every, reads):
    W, X = deq()
    with HostReads() as host:  # tol = 0 is never met: the whole budget runs
        Picard(steps=40, tol=0.0, check_every=every)(fixed_point_residual(tanh_layer), torch.zeros_like(X[0]), X[0], W)
    assert host.count == reads == (0 if every == 0 else math.ceil(40 / (every or 1)))


def test_the_default_reads_every_iteration_on_the_cpu_and_every_8th_elsewhere():
    assert Picard()._cadence(torch.zeros(2)) == 1
    assert Picard()._cadence(torch.zeros(2, device="meta")) == 8
    assert Newton(check_every=2)._cadence(torch.zeros(2, device="meta")) == 2
    with pytest.raises(ValueError, match=r"Broyden\(check_every=-1\): check_every must be None or an int >= 0"):
        Broyden(check_every=-1)
    # keyword only: a third positional argument stays the solver's own field
    assert Anderson(10, 1e-6, 3).memory == 3 and Anderson(10, 1e-6, 3).check_every is None


def test_without_the_private_functorch_api_vmap_runs_the_whole_budget_with_the_same_result(monkeypatch):
    """``_all_true`` reads the batch under vmap through private functorch calls; without them the line search
    runs all its trials (masked), which must give the same result, only more evaluations of F."""
    calls = {"n": 0}

    def F(z):
        calls["n"] += 1
        return torch.arctan(z)

    solve = lambda: vmap(lambda z0: Newton(tol=1e-12)(F, z0))(arctan_starts())  # noqa: E731
    fast = solve()
    fast_calls, calls["n"] = calls["n"], 0
    monkeypatch.setattr(root_find, "_CAN_UNWRAP", False)
    assert root_find._unwrapped(torch.ones(2)) is None
    slow = solve()
    assert same(slow, fast) and bool(fast[1].converged.all())
    assert calls["n"] > fast_calls  # the fallback really ran: no early end of the line search under vmap
    # outside vmap the fallback reads the plain tensor, as before
    assert root_find._all_true(torch.tensor([True, True])) and not root_find._all_true(torch.tensor([True, False]))


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("batched", [False, True], ids=["one_problem", "vmap"])
def test_root_solvers_run_on_the_meta_device_and_create_no_cpu_tensor(name, batched):
    """``check_every=0``: the meta device has no values to read on the host (a read fails, see below). Every op of
    the five solvers (jacfwd, solve_ex, GMRES's lstsq through pinv) has a meta kernel. The implicit layers
    (``bl.layers``) cannot run there: they apply the non-convergence policy, which reads ``SolveInfo`` on the
    host."""
    cls, _ = SOLVERS[name]
    solver = cls(steps=3, tol=1e-6, check_every=0)
    W, X = deq("meta")
    F = fixed_point_residual(tanh_layer)
    with CreatedOn() as created:
        out = vmap(lambda x: solver(F, torch.zeros_like(x), x, W))(X) if batched else solver(F, X[0], X[0], W)
    assert set(created.devices) == {"meta"}, created.devices
    z, info = out
    assert z.device.type == "meta" and z.shape == (X.shape if batched else X[0].shape)
    assert all(v.device.type == "meta" for v in info if isinstance(v, torch.Tensor))


def test_a_host_read_on_meta_fails_and_is_what_check_every_0_removes():
    W, X = deq("meta")
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        Picard(steps=3)(fixed_point_residual(tanh_layer), X[0], X[0], W)


@pytest.mark.parametrize("inner", [bl.Adam(lr=0.1, steps=2), bl.GradientDescent(lr=0.1, steps=2)],
                         ids=["adam", "gradient_descent"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_task", "vmap"])
def test_inner_solvers_run_on_the_meta_device(inner, batched):
    """The meta-method matrix is in test_precision.py (with gradient descent); here the other inner solver. A
    tolerance on the inner solver reads convergence on the host (every 8 steps), which meta cannot do."""
    loss, theta, (x, y) = meta_mlp("meta")
    problem = bl.Problem(loss, loss, inner, init=bl.meta_init)

    def call(xs, ys):
        out = bl.Unrolled()(problem, theta, (xs, ys), (xs, ys))
        return out.grad, out.outer_loss

    with CreatedOn() as created:
        grad, outer = vmap(call, randomness="different")(x, y) if batched else call(x[0], y[0])
    assert set(created.devices) == {"meta"}, created.devices
    assert all(v.device.type == "meta" for v in grad.values()) and outer.device.type == "meta"


def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0(tmp_path):
    """``python -m benchmarks.gpu`` with no CUDA device visible: one line, exit status 0, nothing written."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.jsonl"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(out)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "no GPU found" in run.stdout and not out.exists()
