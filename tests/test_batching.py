"""Task batching: vmap and threads equal the loop for every method, chunk size and worker count; batch norm
stays right."""

import threading

import pytest
import torch

import bilevel as bl
from bilevel import tree

from problems import f64, fewshot_tasks, maml_problem, maml_reference, mlp_params, task_loss

REG = 2.0
METHODS = {
    "unrolled": (bl.Unrolled(), maml_problem(lr=0.3, steps=2)),
    "first_order": (bl.FirstOrder(), maml_problem(lr=0.3, steps=2)),
    "reptile": (bl.Reptile(), maml_problem(lr=0.3, steps=2)),
    "imaml": (bl.imaml(REG, cg_steps=5),
              bl.Problem(bl.proximal(task_loss, REG), task_loss, bl.GradientDescent(lr=0.2, steps=5),
                         init=bl.meta_init)),
    "neumann": (bl.neumann(steps=5, alpha=0.1), maml_problem(lr=0.3, steps=2)),
    "gmres": (bl.Implicit(bl.GMRES(steps=4)), maml_problem(lr=0.3, steps=2)),
    "jfb": (bl.jfb(), maml_problem(lr=0.3, steps=2)),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_vmap_equals_loop(name, chunk_size):
    method, problem = METHODS[name]
    theta = mlp_params()
    support, query = fewshot_tasks(num_tasks=4)
    kw = dict(on_nonconvergence="ignore")
    loop = bl.meta_grad(method, problem, theta, support, query, batching="loop", **kw)
    vec = bl.meta_grad(method, problem, theta, support, query, batching="vmap", chunk_size=chunk_size, **kw)
    assert tree.norm(tree.sub(loop.grad, vec.grad)) <= 1e-12 * tree.norm(loop.grad)
    assert torch.allclose(loop.outer_loss, vec.outer_loss, rtol=1e-12)
    assert loop.inner_info.steps.shape == (4,) and torch.equal(loop.inner_info.steps, vec.inner_info.steps)
    assert torch.allclose(loop.params["w1"], vec.params["w1"], rtol=1e-12) and vec.params["w1"].shape[0] == 4
    if loop.linear_info is not None:
        assert torch.allclose(loop.linear_info.residual, vec.linear_info.residual, rtol=1e-8, atol=1e-14)


def test_forward_mode_batches_too():
    solver = bl.GradientDescent(lr="inner_lr", steps=3)
    inner = lambda w, h, b: task_loss(w, h, b) + h["l2"] * tree.vdot(w, w)  # noqa: E731
    problem = bl.Problem(inner, task_loss, solver)
    hparams = {"inner_lr": torch.tensor(0.3, dtype=f64), "l2": torch.tensor(0.01, dtype=f64)}
    support, query = fewshot_tasks(num_tasks=3)
    params0 = {k: v.expand(3, *v.shape) for k, v in mlp_params().items()}
    fwd = bl.meta_grad(bl.Forward(), problem, hparams, support, query, params0, batching="vmap")
    rev = bl.meta_grad(bl.Unrolled(), problem, hparams, support, query, params0, batching="loop")
    assert tree.norm(tree.sub(fwd.grad, rev.grad)) <= 1e-12 * tree.norm(rev.grad)


@pytest.mark.parametrize("batching, chunk_size", [("vmap", None), ("vmap", 2), ("loop", None)])
def test_batch_norm_meta_gradient_matches_per_task_autograd(batching, chunk_size):
    """Training-mode batch norm: grad(vmap(.)) is wrong in torch.func (shared/repro/bn_vmap_grad.py); meta_grad
    takes the outer gradient per task, which must equal a per-task torch.autograd reference."""
    theta = mlp_params(batch_norm=True)
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=4)
    out = bl.meta_grad(bl.Unrolled(), maml_problem(lr=0.3, steps=2), theta, (xs, ys), (xq, yq),
                       batching=batching, chunk_size=chunk_size)
    refs = [maml_reference(theta, (xs[i], ys[i]), (xq[i], yq[i]), lr=0.3, steps=2) for i in range(4)]
    expected = {k: torch.stack([r[k] for r in refs]).mean(0) for k in theta}
    assert tree.norm(tree.sub(out.grad, expected)) <= 1e-10 * tree.norm(expected)


def test_meta_grad_rejects_mismatched_task_dimensions():
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=4)
    with pytest.raises(ValueError, match="leading task dimension.*inner_batches"):
        bl.meta_grad(bl.Unrolled(), maml_problem(), mlp_params(), (xs, ys), (xq[:3], yq[:3]))
    with pytest.raises(ValueError, match="batching='scan'"):
        bl.meta_grad(bl.Unrolled(), maml_problem(), mlp_params(), (xs, ys), (xq, yq), batching="scan")
    with pytest.raises(ValueError, match="chunk_size=0"):
        bl.meta_grad(bl.Unrolled(), maml_problem(), mlp_params(), (xs, ys), (xq, yq), batching="vmap",
                     chunk_size=0)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("workers", [2, 3, 8])
def test_threads_equal_loop(name, workers):
    # 5 tasks in 2, 3 or (more workers than tasks) 5 uneven groups; pure losses, so threads are safe
    method, problem = METHODS[name]
    theta = mlp_params(batch_norm=True)
    support, query = fewshot_tasks(num_tasks=5)
    kw = dict(on_nonconvergence="ignore")
    loop = bl.meta_grad(method, problem, theta, support, query, batching="loop", **kw)
    par = bl.meta_grad(method, problem, theta, support, query, batching="threads", workers=workers, **kw)
    assert tree.norm(tree.sub(loop.grad, par.grad)) <= 1e-12 * tree.norm(loop.grad)
    assert torch.allclose(loop.outer_loss, par.outer_loss, rtol=1e-12)
    assert torch.equal(loop.inner_info.steps, par.inner_info.steps)
    assert torch.equal(loop.params["w1"], par.params["w1"])  # per-task outputs in task order
    again = bl.meta_grad(method, problem, theta, support, query, batching="threads", workers=workers, **kw)
    assert all(torch.equal(par.grad[k], again.grad[k]) for k in theta)  # deterministic for a given worker count


def test_threads_run_concurrently_in_worker_threads_with_one_intra_op_thread_and_raise_their_errors():
    seen, barrier = set(), threading.Barrier(2, timeout=60)

    def loss(w, h, b):
        name = threading.current_thread().name
        if name not in {n for n, _ in seen}:
            seen.add((name, torch.get_num_threads()))
            barrier.wait()  # each group's first call waits for the other's: they run at the same time
        if bool((b[0] == 99).any()):
            raise RuntimeError("bad task")
        return task_loss(w, h, b)

    problem = bl.Problem(loss, loss, bl.GradientDescent(lr=0.3, steps=1), init=bl.meta_init)
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=4)
    bl.meta_grad(bl.Unrolled(), problem, mlp_params(), (xs, ys), (xq, yq), batching="threads", workers=2,
                 on_nonconvergence="ignore")
    assert len(seen) == 2 and all(n.startswith("bilevel-tasks") and t == 1 for n, t in seen)
    xs = xs.clone()
    xs[3] = 99
    seen.clear()
    barrier.reset()
    with pytest.raises(RuntimeError, match="bad task"):
        bl.meta_grad(bl.Unrolled(), problem, mlp_params(), (xs, ys), (xq, yq), batching="threads", workers=2)


def test_workers_is_checked():
    (xs, ys), (xq, yq) = fewshot_tasks(num_tasks=2)
    for bad, batching in ((0, "threads"), (2.0, "threads"), (2, "loop")):
        with pytest.raises(ValueError, match="workers"):
            bl.meta_grad(bl.Unrolled(), maml_problem(), mlp_params(), (xs, ys), (xq, yq), batching=batching,
                         workers=bad)
