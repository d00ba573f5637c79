"""Omniglot data: loader, cache, splits, task sampler, rotations and the conv4 model (small official zips)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.omniglot.data import load_omniglot, resolve_root
from tasks.omniglot.model import Conv4
from tasks.omniglot.sampler import TaskSampler
from tasks.omniglot.splits import make_split

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SMALL1 = "images_background_small1"   # 5 alphabets, 136 characters (official file)
SMALL2 = "images_background_small2"   # 5 alphabets, 156 characters (official file)


@pytest.fixture(scope="module")
def small():
    if not (resolve_root(DATA) / f"{SMALL1}.zip").is_file():
        pytest.skip(f"Omniglot small zips not found under {DATA} (set BILEVEL_DATA)")
    return load_omniglot((SMALL1, SMALL2), DATA, download=False, cache=False)


def _write_set(root: Path, name: str, chars: int = 3, drawings: int = 20, size: int = 105, bad: str | None = None):
    """A fake set in the official layout: character c, drawing d is a filled square at a position set by (c, d)."""
    for c in range(chars):
        folder = root / name / "Alpha" / f"character{c + 1:02d}"
        folder.mkdir(parents=True)
        for d in range(drawings):
            path = folder / f"{c + 1:04d}_{d + 1:02d}.png"
            if path.name == bad:
                path.write_bytes(b"not a png")
                continue
            img = np.ones((size, size), dtype=bool)
            img[5 * c: 5 * c + 30, 4 * d: 4 * d + 20] = False   # strokes are black (False) in Omniglot PNGs
            Image.fromarray(img).save(path)


def test_loader_counts_shapes_and_value_range(small):
    assert small.images.shape == (136 + 156, 20, 28, 28)
    assert small.images.dtype == torch.uint8
    assert len(small.subset(SMALL1 + "/")) == 136 and len(small.subset(SMALL2 + "/")) == 156
    # Strokes are inverted to bright values, the background is dark: a mostly-zero image.
    assert small.images.float().mean() < 60 and small.images.max() > 200
    assert small.characters[0] == f"{SMALL1}/Balinese/character01"


def test_zip_and_folder_give_the_same_tensor_and_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    _write_set(tmp_path / "folder", "setA")
    with zipfile.ZipFile(tmp_path / "setA.zip", "w") as z:
        for p in sorted((tmp_path / "folder").rglob("*.png")):
            z.write(p, p.relative_to(tmp_path / "folder").as_posix())
    from_folder = load_omniglot(("setA",), tmp_path / "folder", download=False)
    from_zip = load_omniglot(("setA",), tmp_path, download=False)
    assert torch.equal(from_folder.images, from_zip.images)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2        # one cache file per source
    # A second load reads the cache: removing the PNGs does not matter as long as the zip is unchanged.
    again = load_omniglot(("setA",), tmp_path, download=False)
    assert torch.equal(again.images, from_zip.images)


def test_missing_data_names_the_place_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background"):
        load_omniglot(("images_background",), tmp_path, download=False, cache=False)


def test_corrupt_png_is_named(tmp_path):
    _write_set(tmp_path, "setB", bad="0002_07.png")
    with pytest.raises(ValueError, match="0002_07.png"):
        load_omniglot(("setB",), tmp_path, download=False, cache=False)


def test_incomplete_character_and_wrong_size_are_rejected(tmp_path):
    _write_set(tmp_path / "a", "setC", drawings=19)
    with pytest.raises(ValueError, match="19 drawings"):
        load_omniglot(("setC",), tmp_path / "a", download=False, cache=False)
    _write_set(tmp_path / "b", "setD", size=64)
    with pytest.raises(ValueError, match="size"):
        load_omniglot(("setD",), tmp_path / "b", download=False, cache=False)


def test_official_set_structure_is_checked(tmp_path):
    _write_set(tmp_path, "images_evaluation", chars=2)
    with pytest.raises(ValueError, match="expected 659"):
        load_omniglot(("images_evaluation",), tmp_path, download=False, cache=False)


def test_splits_are_disjoint_fixed_and_independent_of_global_rng(small):
    torch.manual_seed(123)
    import random
    random.seed(5)
    maml = make_split(small, "maml", num_train=200, num_val=30)
    random.seed(6)
    assert make_split(small, "maml", num_train=200, num_val=30) == maml
    assert make_split(small, "maml", num_train=200, num_val=30, seed=2) != maml
    assert [len(maml[k]) for k in ("train", "val", "test")] == [200, 30, 292 - 230]
    sets = [set(maml[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(len(small)))

    lake = make_split(small, "lake", num_val=20, background=SMALL1)
    assert all(small.characters[i].startswith(SMALL1) for i in lake["train"] + lake["val"])
    assert all(small.characters[i].startswith(SMALL2) for i in lake["test"])
    assert len(lake["val"]) == 20 and not set(lake["train"]) & set(lake["val"])


def test_sampler_shapes_labels_and_reproducibility(small):
    pool = list(range(50))
    s = TaskSampler(small.images, pool, ways=5, shots=2, queries=3, rotation="none", seed=7)
    t = s.sample(step=4, tasks=6)
    assert t.support.shape == (6, 10, 1, 28, 28) and t.query.shape == (6, 15, 1, 28, 28)
    assert t.support.dtype == torch.float32 and 0 <= t.support.min() and t.support.max() <= 1
    assert torch.equal(t.support_labels[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    assert torch.equal(t.query_labels[0], torch.arange(5).repeat_interleave(3))
    # Same (seed, step, index) -> same task, whatever else was sampled; slices compose (distributed sharding).
    assert torch.equal(s.sample(4, 6).support, t.support)
    assert torch.equal(s.sample(4, 2, start=3).query, t.query[3:5])
    assert not torch.equal(s.sample(5, 6).support, t.support)
    images = small.images[pool].float() / 255
    for task in range(6):
        for label in range(5):
            # Each label is one character; its support and query drawings are distinct drawings of that character.
            sup = t.support[task, t.support_labels[task] == label, 0]
            qry = t.query[task, t.query_labels[task] == label, 0]
            matches = [(c, d) for x in torch.cat([sup, qry]) for c in range(50) for d in range(20)
                       if torch.equal(images[c, d], x)]
            chars = {c for c, _ in matches}
            assert len(chars) == 1 and len({d for _, d in matches}) == 5


def test_rotation_modes(small):
    pool = list(range(10))
    base = small.images[pool].float() / 255

    def rotation_of(x):
        for c in range(10):
            for d in range(20):
                for k in range(4):
                    if torch.equal(torch.rot90(base[c, d], k, dims=(-2, -1)), x):
                        return c, k
        raise AssertionError("image not found in the pool under any rotation")

    seen = set()
    for mode in ("classes", "per_task"):
        s = TaskSampler(small.images, pool, ways=8, shots=1, queries=2, rotation=mode, seed=0)
        for step in range(5):
            t = s.sample(step, 2)
            for task in range(2):
                found = [rotation_of(t.support[task, i, 0]) for i in range(8)]
                for i, (c, k) in enumerate(found):   # queries share the class's character and rotation
                    for q in (2 * i, 2 * i + 1):
                        assert rotation_of(t.query[task, q, 0]) == (c, k)
                    seen.add((mode, k))
                if mode == "per_task":   # one character appears at most once per task
                    assert len({c for c, _ in found}) == 8
    assert {k for m, k in seen if m == "classes"} == {0, 1, 2, 3} == {k for m, k in seen if m == "per_task"}
    # "classes": 4 x 10 = 40 classes are available, so 12-way tasks are possible from 10 characters.
    assert TaskSampler(small.images, pool, ways=12, shots=1, queries=1, rotation="classes").sample(0, 1) \
        .support.shape[1] == 12


def test_sampler_rejects_impossible_tasks(small):
    with pytest.raises(ValueError, match="lower task.ways"):
        TaskSampler(small.images, range(4), ways=5, shots=1, queries=1)
    with pytest.raises(ValueError, match="shots \\+ queries"):
        TaskSampler(small.images, range(10), ways=5, shots=5, queries=16)


def test_conv4_shapes_and_transductive_batch_norm():
    torch.manual_seed(0)
    model = Conv4(ways=5)
    params = model.init_params()
    # 3x3 convs 1->64 and 3 x 64->64 with biases, 4 batch-norm affine pairs, a 64->5 head.
    assert sum(v.numel() for v in params.values()) == 640 + 3 * 36_928 + 4 * 128 + 325
    x = torch.rand(7, 1, 28, 28, dtype=torch.float32)
    out = torch.func.functional_call(model, params, (x,))
    assert out.shape == (7, 5)
    assert not any(b for b in model.buffers())                   # no running statistics anywhere
    # Transductive: a sample's output depends on the rest of the batch (batch statistics), in train and eval mode.
    model.eval()
    alone = torch.func.functional_call(model, params, (x[:3],))
    assert not torch.allclose(alone, out[:3])
    assert torch.allclose(torch.func.functional_call(model, params, (x,)), out)


def test_download_checks_the_md5_and_explains_a_missing_network(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded.*Put images_evaluation.zip"):
        load_omniglot(("images_evaluation",), tmp_path, download=True, cache=False)

    class Corrupt(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Corrupt(b"truncated zip"))
    with pytest.raises(ValueError, match="md5"):
        load_omniglot(("images_evaluation",), tmp_path, download=True, cache=False)
    assert not list(tmp_path.iterdir())                      # nothing half-written is left behind
