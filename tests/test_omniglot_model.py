"""The reference conv4 (stride-2 convs, spatial mean) and the within-alphabet task sampling of Lake et al."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tasks.omniglot import train
from tasks.omniglot.config import load_config
from tasks.omniglot.data import load_omniglot, resolve_root
from tasks.omniglot.model import Conv4
from tasks.omniglot.sampler import TaskSampler
from tasks.omniglot.splits import alphabet, make_split

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def small():
    if not (resolve_root(DATA) / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot small zips not found under {DATA} (set BILEVEL_DATA)")
    return load_omniglot(("images_background_small1",), DATA, download=False, cache=False)


def reference_conv4(p, x, eps=1e-3):
    """cbfinn/maml ``forward_conv`` without max-pooling, written out with torch.nn.functional."""
    sizes = []
    for i in range(4):
        x = F.conv2d(x, p[f"convs.{i}.weight"], p[f"convs.{i}.bias"], stride=2, padding=1)
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + eps) * p[f"norms.{i}.weight"][:, None, None] \
            + p[f"norms.{i}.bias"][:, None, None]
        x = x.relu()
        sizes.append(x.shape[-1])
    return x.mean((2, 3)) @ p["head.weight"].T + p["head.bias"], sizes


def test_reference_network_sizes_parameters_and_forward():
    torch.manual_seed(0)
    model = Conv4(ways=5).double()
    params = model.init_params()
    assert sum(v.numel() for v in params.values()) == 112_261       # the same count as the max-pool variant
    assert sum(v.numel() for v in Conv4(5, pool="max").parameters()) == 112_261
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    expected, sizes = reference_conv4(params, x)
    assert sizes == [14, 7, 4, 2]
    torch.testing.assert_close(functional_call(model, params, (x,)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.logits(params, x), expected, rtol=1e-12, atol=1e-12)  # the pure function
    # The reference's initialisation: N(0, 1) head weights, zero biases, Xavier-uniform filters.
    assert 0.8 < params["head.weight"].std() < 1.2 and not params["head.bias"].any()
    fan = 64 * 9 + 64 * 9
    assert params["convs.1.weight"].abs().max() <= (6 / fan) ** 0.5


def test_higher_reads_the_fast_weights_it_is_given():
    # higher's `fmodel(x, params=...)` swaps parameters its own way (a forward reading the weights through the layers'
    # attributes once ignored them, while `fmodel(x)` after `diffopt.step` still worked): both must see the weights.
    higher = pytest.importorskip("higher", reason="a benchmark peer (benchmarks/install_peers.sh)")
    model = Conv4(ways=5).double()
    fast = {k: v + 0.1 * torch.randn_like(v) for k, v in model.init_params().items()}
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    fmodel = higher.monkeypatch(model, copy_initial_weights=True)
    names = [name for name, _ in model.named_parameters()]
    torch.testing.assert_close(fmodel(x, params=[fast[k] for k in names]), model.logits(fast, x))


def test_max_pool_variant_is_kept_and_costs_more():
    model = Conv4(ways=5, pool="max")
    x = torch.rand(3, 1, 28, 28)
    assert functional_call(model, model.init_params(), (x,)).shape == (3, 5)
    h = x  # the max-pool network written with the module's own layers
    for conv, norm in zip(model.convs, model.norms):
        h = F.max_pool2d(F.relu(F.batch_norm(conv(h), None, None, norm.weight, norm.bias, training=True, eps=1e-5)), 2)
    torch.testing.assert_close(model.logits(model.init_params(), x), model.head(h.flatten(1)))
    with pytest.raises(ValueError, match="pool='avg'"):
        Conv4(5, pool="avg")


def test_a_max_pool_checkpoint_is_refused_by_the_strided_network(small, tmp_path):
    base = [f"data.root={DATA}", "data.background=images_background_small1", "data.evaluation=null",
            "data.num_train=100", "data.num_val=16", "wandb.mode=disabled", "run.progress=false",
            "eval.val_tasks=4", "eval.test_tasks=4", "inner.test_steps=1", "meta.steps=2", "meta.batch=2",
            "eval.every=0", f"run.dir={tmp_path}", "run.threads=null"]
    train.main(load_config("demo", base + ["model.pool=max"]), small)
    with pytest.raises(ValueError, match="model.pool=max"):
        train.main(load_config("demo", base + ["run.resume=true", "meta.steps=3"]), small)


def test_within_alphabet_tasks_draw_every_class_from_one_alphabet(small):
    pool = list(range(len(small)))
    names = [alphabet(c) for c in small.characters]
    sizes = {a: names.count(a) for a in set(names)}
    ways = 20
    sampler = TaskSampler(small.images, pool, ways=ways, shots=1, queries=1, rotation="none", seed=0,
                          alphabets=names)
    assert set(sampler.skipped) == {a for a, n in sizes.items() if n < ways}
    row_of = {small.images[i, d].numpy().tobytes(): i for i in pool for d in range(small.images.shape[1])}
    seen = set()
    for step in range(30):
        x, _ = sampler._task(step, 0)                                 # [N, K+Q, H, W], no mini-batches
        rows = [row_of[x[c, 0].numpy().tobytes()] for c in range(ways)]
        alphabets = {names[r] for r in rows}
        assert len(alphabets) == 1 and len(set(rows)) == ways
        seen |= alphabets
    assert len(seen) > 1                                              # alphabets vary across tasks
    largest = max(sizes.values())
    with pytest.raises(ValueError, match=f"has {largest} classes; lower task.ways"):
        TaskSampler(small.images, pool, ways=largest + 1, shots=1, queries=1, alphabets=names)


def test_lake_split_can_hold_out_whole_alphabets_for_validation(small):
    class Two:                                  # a background and an "evaluation" set from the small zip
        characters = tuple(c if i % 3 else c.replace("images_background_small1", "images_evaluation", 1)
                           for i, c in enumerate(small.characters))

        def __len__(self):
            return len(self.characters)

    data = Two()
    split = make_split(data, "lake", num_val=30, background="images_background_small1", val_alphabets=True)
    train_a = {alphabet(data.characters[i]) for i in split["train"]}
    val_a = {alphabet(data.characters[i]) for i in split["val"]}
    assert len(split["val"]) >= 30 and not train_a & val_a
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(len(data)))
