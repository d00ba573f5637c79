"""learn2learn interop against the real learn2learn: its task sets over a local TensorDataset, its OmniglotCNN, and
meta-gradients checked against its own ``l2l.algorithms.MAML`` on the same tasks.

learn2learn is installed by ``tools/install_learn2learn.sh`` (run by ``.ci/run``): in CI a missing install is a
failure, not a skip.
"""

import importlib.util
import os
import random
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel.interop import learn2learn as bl_l2l

if importlib.util.find_spec("learn2learn") is None:
    if os.environ.get("CI"):
        raise RuntimeError("learn2learn is not installed in CI: .ci/run must run tools/install_learn2learn.sh.")
    pytest.skip("learn2learn is not installed (bash tools/install_learn2learn.sh)", allow_module_level=True)

l2l = bl_l2l.load()
from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels  # noqa: E402

WAYS, SHOTS, CLASSES, PER_CLASS = 3, 1, 8, 4


@pytest.fixture(scope="module")
def taskset():
    """A learn2learn Taskset over a local TensorDataset of random 28x28 'drawings' (no download)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(CLASSES * PER_CLASS, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(X, y))
    random.seed(0)  # learn2learn's transforms draw from the global `random` module
    return l2l.data.Taskset(meta, task_transforms=[NWays(meta, WAYS), KShots(meta, 2 * SHOTS), LoadData(meta),
                                                   RemapLabels(meta)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return l2l.vision.models.OmniglotCNN(output_size=WAYS, hidden_size=8, layers=2).double()


def test_split_is_learn2learn_fast_adapt_split(taskset):
    X, y = taskset.sample()
    (xs, ys), (xq, yq) = bl_l2l.split_task((X, y), WAYS, SHOTS)
    # learn2learn's examples/vision/maml_omniglot.py, fast_adapt: even positions adapt, the others evaluate.
    adaptation = np.zeros(X.shape[0], dtype=bool)
    adaptation[np.arange(SHOTS * WAYS) * 2] = True
    adaptation = torch.from_numpy(adaptation)
    assert torch.equal(xs, X[adaptation]) and torch.equal(ys, y[adaptation])
    assert torch.equal(xq, X[~adaptation]) and torch.equal(yq, y[~adaptation])
    assert sorted(ys.tolist()) == sorted(yq.tolist()) == sorted(list(range(WAYS)) * SHOTS)


def test_meta_batches_stack_tasks(taskset):
    batches = list(bl_l2l.meta_batches(taskset, 4, WAYS, SHOTS, num_batches=2, dtype=torch.float32))
    assert len(batches) == 2
    (xs, ys), (xq, yq) = batches[0]
    assert xs.shape == xq.shape == (4, WAYS * SHOTS, 1, 28, 28) and xs.dtype == torch.float32
    assert ys.shape == yq.shape == (4, WAYS * SHOTS) and ys.dtype == torch.long


def learn2learn_meta_grad(model, inner, outer, lr, steps, first_order):
    """What learn2learn's MAML examples compute: per task clone, adapt, query loss; gradients averaged over tasks."""
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    maml.zero_grad()
    tasks = inner[0].shape[0]
    for i in range(tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(inner[0][i]), inner[1][i]))
        (F.cross_entropy(learner(outer[0][i]), outer[1][i]) / tasks).backward()
    return {name: p.grad.clone() for name, p in maml.module.named_parameters()}


@pytest.mark.parametrize("method, first_order, batching", [
    (bl.Unrolled(), False, "loop"), (bl.Unrolled(), False, "vmap"), (bl.FirstOrder(), True, "loop"),
    (bl.Unrolled(), False, "threads")])
def test_meta_grad_matches_learn2learn_maml(taskset, model, method, first_order, batching):
    lr, steps = 0.4, 2
    inner, outer = next(bl_l2l.meta_batches(taskset, 4, WAYS, SHOTS))
    loss = bl_l2l.module_loss(model)
    problem = bl.Problem(loss, loss, bl.GradientDescent(lr=lr, steps=steps), init=bl.meta_init)
    out = bl.meta_grad(method, problem, bl_l2l.meta_params(model), inner, outer, batching=batching)
    expected = learn2learn_meta_grad(model, inner, outer, lr, steps, first_order)
    assert out.grad.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(out.grad[name], expected[name], rtol=1e-9, atol=1e-12)
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-3  # not two zero gradients agreeing


def test_module_loss_leaves_the_module_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = bl_l2l.module_loss(model)
    X = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    value = loss(bl_l2l.meta_params(model), {}, (X, torch.tensor([0, 1, 2, 0, 1, 2])))
    assert value.shape == () and torch.isfinite(value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics too


def test_module_call_is_the_module_in_training_mode(model):
    X = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    call = bl_l2l.module_call(model)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(call(bl_l2l.meta_params(model), X), model(X), rtol=1e-12, atol=1e-12)


def test_module_call_is_safe_from_several_threads(model):
    # functional_call on one shared module swaps its parameters during a call: two threads would see each other's
    # weights. module_call gives each thread its own copy; concurrent calls with different weights stay right.
    call = bl_l2l.module_call(model)
    X = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    weights = [{k: v + 0.1 * j for k, v in bl_l2l.meta_params(model).items()} for j in range(4)]
    with torch.no_grad():
        expected = [call(w, X) for w in weights]
    results, barrier = {}, threading.Barrier(4)

    def work(j):
        barrier.wait()
        with torch.no_grad():
            results[j] = [call(weights[j], X) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected[j]) for j in range(4) for r in results[j])


def test_load_twice_gives_the_same_package():
    # A second call (another page, another test) must not trip over the package the first call left in sys.modules.
    assert bl_l2l.load() is l2l
    assert importlib.util.find_spec("learn2learn") is not None


def test_bad_inputs_are_named(taskset, model):
    X, y = taskset.sample()
    with pytest.raises(ValueError, match=r"needs at least 2·ways·shots = 12 .*KShots\(k=4\)"):
        bl_l2l.split_task((X, y), WAYS, 2)
    with pytest.raises(TypeError, match="a task is \\(X, y\\)"):
        bl_l2l.split_task(X, WAYS, SHOTS)
    with pytest.raises(ValueError, match=r"meta_batches\(tasks_per_batch=0\)"):
        next(bl_l2l.meta_batches(taskset, 0, WAYS, SHOTS))
    with pytest.raises(TypeError, match="sample\\(\\) method"):
        next(bl_l2l.meta_batches([(X, y)], 2, WAYS, SHOTS))
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        bl_l2l.module_loss(lambda x: x)
