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
from bilevel import _host
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
    monkeypatch.setattr(_host, "_CAN_UNWRAP", False)
    assert _host._unwrapped(torch.ones(2)) is None
    slow = solve()
    assert same(slow, fast) and bool(fast[1].converged.all())
    assert calls["n"] > fast_calls  # the fallback really ran: no early end of the line search under vmap
    # outside vmap the fallback reads the plain tensor, as before
    assert _host._all_true(torch.tensor([True, True])) and not _host._all_true(torch.tensor([True, False]))


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
    tolerance on the inner solver reads convergence on the host (every 8 steps off the CPU), which meta cannot do."""
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


# qp and odeint: the same cadence for the interior-point loop and the adaptive ODE loop

from bilevel import ode as ode_module, qp as qp_module  # noqa: E402
from bilevel.layers import Record, odeint, qp  # noqa: E402
from test_qp import gram, random_qp  # noqa: E402


def qp_batch():
    """Four QPs that need different numbers of interior-point iterations (the batch is solved under vmap)."""
    L, q, G, h, A, b = (x.detach() for x in random_qp(n=4, m=5, p=1, seed=3))
    qs = torch.stack([q, 3 * q, -q, 0.1 * q]).requires_grad_()
    return gram(L).requires_grad_(), qs, G.requires_grad_(), h.requires_grad_(), A, b


def qp_outputs(**kw):
    """Solutions, forward SolveInfo and gradients in every input of a batch and of its first problem alone."""
    Q, qs, G, h, A, b = qp_batch()
    out = []
    for q in (qs, qs[0]):
        z, info = qp(Q, q, G, h, A, b, return_info=True, **kw)
        out += [z, info, torch.autograd.grad((z * torch.arange(1.0, 5.0, dtype=DT)).sum(), (Q, qs, G, h))]
    return out


@pytest.mark.parametrize("every", [3, 8, 0])
def test_qp_check_every_never_changes_the_result(every):
    reference = qp_outputs()
    assert len(set(reference[1].steps.tolist())) > 1  # the batch entries stop at different iterations
    assert same(qp_outputs(check_every=every), reference)


@pytest.mark.parametrize("every,reads", [(1, 20), (8, 3), (3, 7), (0, 0)])
def test_qp_host_reads_follow_check_every(every, reads):
    """``tol=0`` is never met, so the budget of 20 iterations runs; the reads outside the loop (the input checks,
    the failure classification) are the same for every ``check_every``, so the loop's are the difference."""
    L, q, G, h, A, b = (x.detach() for x in random_qp(seed=4))

    def count(**kw):
        with HostReads() as host:
            qp(gram(L), q, G, h, A, b, steps=20, tol=0.0, on_nonconvergence="ignore", on_nonfinite="ignore", **kw)
        return host.count

    assert count(check_every=every) - count(check_every=0) == reads == (every and math.ceil(20 / every))
    assert count() == count(check_every=1)  # the CPU default


def ode_problem():
    """``h' = tanh(W h) + 0.1 sin t`` for three W that need different numbers of steps, three output intervals."""
    g = torch.Generator().manual_seed(0)
    W = 0.5 * torch.randn(3, 3, generator=g, dtype=DT)
    h0 = torch.randn(3, generator=g, dtype=DT)
    return torch.stack([W, 4 * W, -W]), h0, torch.linspace(0, 1, 4, dtype=DT)


def tanh_field(t, h, W):
    return torch.tanh(W @ h) + 0.1 * torch.sin(t)


def ode_outputs(adjoint=True, method="dopri5", max_steps=40, **kw):
    """Outputs, forward ODEInfo and gradients in W and h0, for the batch under vmap and its second problem alone
    (they need 8 to 18 steps forward or backward: ``max_steps=40`` keeps ``check_every=0`` quick)."""
    Ws, h0, t = ode_problem()
    kw["max_steps"] = max_steps

    def solve(W, h0):
        ys, info = odeint(tanh_field, h0, t, W, adjoint=adjoint, method=method, return_info=True, **kw)
        return (ys[1:] ** 2).sum(), (ys, info)

    both = torch.func.grad(solve, argnums=(0, 1), has_aux=True)
    return [vmap(both, in_dims=(0, None))(Ws, h0), both(Ws[1], h0)]


@pytest.mark.parametrize("every", [3, 8, 0])
@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_odeint_check_every_never_changes_the_result(every, adjoint):
    reference = ode_outputs(adjoint)
    assert len(set(reference[0][1][1].accepted.tolist())) > 1  # the batch entries take different numbers of steps
    assert same(ode_outputs(adjoint, check_every=every), reference)
    # the backward (adjoint) solve runs the same loop: its record too
    Ws, h0, t = ode_problem()
    recs = [Record(), Record()]
    for rec, kw in zip(recs, ({}, {"check_every": every})):
        W = Ws[1].clone().requires_grad_()
        odeint(tanh_field, h0, t, W, record=rec, max_steps=40, **kw)[-1].sum().backward()
    assert same(recs[0].backward, recs[1].backward) and same(recs[0].forward, recs[1].forward)


@pytest.mark.parametrize("every", [3, 0])
def test_odeint_check_every_with_a_budget_that_runs_out(every):
    """``max_steps`` below what one of the three problems needs: it fails at the same step for every cadence."""
    kw = dict(max_steps=10, on_nonconvergence="ignore")
    reference = ode_outputs(**kw)
    converged = reference[0][1][1].converged
    assert bool(converged.any()) and not bool(converged.all())
    assert same(ode_outputs(check_every=every, **kw), reference)


def test_odeint_budget_is_per_problem_under_vmap():
    """Each problem's ``max_steps`` counts its own steps, so under vmap it ends as it does alone: a problem that is
    quick in the first interval is not charged the steps another one takes there."""
    Ws, h0, t = ode_problem()
    solve = lambda W: odeint(tanh_field, h0, t, W, max_steps=12, on_nonconvergence="ignore",  # noqa: E731
                             return_info=True)
    ys, info = vmap(solve)(Ws)
    alone = [solve(W) for W in Ws]
    for i, (ys_i, info_i) in enumerate(alone):
        assert all(torch.equal(a[i], b) for a, b in zip(info, info_i)), (i, info, info_i)
        assert torch.allclose(ys[i], ys_i, rtol=0, atol=1e-13)
    assert bool(info.converged.any()) and not bool(info.converged.all())


@pytest.mark.parametrize("every,reads", [(1, 40), (8, 5), (3, 14), (0, 0)])
def test_odeint_host_reads_follow_check_every(every, reads):
    """One output interval and a budget of 40 steps that runs out: the loop reads ``ceil(40 / check_every)``
    times; the other reads (the input checks, the policy) are the same for every ``check_every``."""
    Ws, h0, t = ode_problem()

    def count(**kw):
        with HostReads() as host:
            odeint(tanh_field, h0, t[[0, -1]], Ws[1], rtol=1e-13, atol=1e-13, max_steps=40,
                   on_nonconvergence="ignore", **kw)
        return host.count

    assert count(check_every=every) - count(check_every=0) == reads == (every and math.ceil(40 / every))
    assert count() == count(check_every=1)


@pytest.mark.parametrize("call", [lambda: qp(torch.eye(1), torch.ones(1), check_every=-1),
                                  lambda: odeint(lambda t, h: -h, torch.ones(1), torch.tensor([0.0, 1.0]),
                                                 check_every=2.0)], ids=["qp", "odeint"])
def test_check_every_is_validated(call):
    with pytest.raises(ValueError, match=r"check_every=(-1|2\.0)\): must be None or an int >= 0"):
        call()


# without the private functorch API: the same results, the whole budget under vmap

def test_under_vmap_without_the_interpreter_stack_asks_whether_any_transform_is_active(monkeypatch):
    seen = []
    probe = lambda x: seen.append(_host._under_vmap()) or x  # noqa: E731
    probe(torch.ones(2)), vmap(probe)(torch.ones(2))
    monkeypatch.setattr(_host, "_CAN_READ_STACK", False)
    probe(torch.ones(2)), vmap(probe)(torch.ones(2)), torch.func.grad(lambda x: probe(x).sum())(torch.ones(2))
    # exact with the stack; without it every transform counts (grad too): loops run masked, results the same
    assert seen == [False, True, False, True, True]
    monkeypatch.setattr(_host, "_transforms_active", None)
    assert not _host._under_vmap() and not vmap(lambda x: x * _host._under_vmap())(torch.ones(2)).any()


def test_bilevel_imports_without_the_private_functorch_calls():
    """A torch without them still imports the package, which then takes the fallbacks (torch's own code uses them
    too, so only the import and the probes are run here)."""
    code = ("import torch\n"
            "for name in ('get_interpreter_stack', 'get_unwrapped', 'is_functorch_wrapped_tensor'):\n"
            "    delattr(torch._C._functorch, name)\n"
            "import bilevel, bilevel.layers\n"
            "from bilevel import _host\n"
            "seen = []\n"
            "torch.func.vmap(lambda x: seen.append(_host._under_vmap()) or x)(torch.ones(2))\n"
            "print(_host._CAN_UNWRAP, _host._CAN_READ_STACK, _host._under_vmap(), seen)\n")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "False", "[True]"]


def _count_calls(monkeypatch, module, name: str) -> dict:
    """Replace ``module.name`` by a wrapper that counts its calls in the returned ``{"n": ...}``."""
    calls, real = {"n": 0}, getattr(module, name)

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("stack", [True, False], ids=["interpreter_stack", "no_interpreter_stack"])
def test_qp_without_the_private_api_runs_the_whole_budget_with_the_same_result(monkeypatch, stack):
    reference = qp_outputs()
    calls = _count_calls(monkeypatch, qp_module, "_kkt_matrix")
    qp_outputs()
    fast, calls["n"] = calls["n"], 0
    monkeypatch.setattr(_host, "_CAN_UNWRAP", False)
    monkeypatch.setattr(_host, "_CAN_READ_STACK", stack)
    assert same(qp_outputs(), reference)
    assert calls["n"] > fast  # the batch ran all 50 iterations, masked after convergence


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_odeint_without_the_private_api_runs_the_whole_budget_with_the_same_result(monkeypatch, adjoint):
    kw = dict(max_steps=40)
    reference, fixed = ode_outputs(adjoint, **kw), ode_outputs(adjoint, method="rk4", step_size=0.1)
    calls = _count_calls(monkeypatch, ode_module, "_dopri_step")
    ode_outputs(adjoint, **kw)
    fast, calls["n"] = calls["n"], 0
    monkeypatch.setattr(_host, "_CAN_UNWRAP", False)
    assert same(ode_outputs(adjoint, **kw), reference)
    assert calls["n"] > fast  # under vmap every interval ran its whole budget of masked steps
    # fixed steps: the step count is read from t, which is shared here
    assert same(ode_outputs(adjoint, method="rk4", step_size=0.1), fixed)


def test_odeint_record_and_batched_times_without_the_private_api(monkeypatch):
    """Under vmap a ``Record`` holds every entry; without the API it is left empty rather than holding tensors that
    die with the transform. A fixed-step count over a batched ``t`` cannot be read: a clear error."""
    Ws, h0, t = ode_problem()
    rec = Record()
    vmap(lambda W: odeint(tanh_field, h0, t, W, max_steps=40, record=rec))(Ws)
    assert rec.forward.accepted.shape == (3,)
    monkeypatch.setattr(_host, "_CAN_UNWRAP", False)
    rec = Record()
    vmap(lambda W: odeint(tanh_field, h0, t, W, max_steps=40, record=rec))(Ws)
    assert rec.forward is None
    odeint(tanh_field, h0, t, Ws[0], record=rec)
    assert bool(rec.forward.converged)  # outside vmap the fallback records as before
    ts = torch.stack([t, 2 * t])
    with pytest.raises(ValueError, match=r"odeint\(step_size=...\): under vmap over t this torch cannot read"):
        vmap(lambda t: odeint(tanh_field, h0, t, Ws[0], method="rk4", step_size=0.1))(ts)
    monkeypatch.undo()
    ys = vmap(lambda t: odeint(tanh_field, h0, t, Ws[0], method="rk4", step_size=0.1))(ts)
    assert ys.shape == (2, 4, 3)
