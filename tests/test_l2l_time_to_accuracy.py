"""benchmarks/l2l_time_to_accuracy.py: both sides start alike and agree on the first meta-gradient; a short run
reports a reached and an unreached target honestly and stops at its budget.

Synthetic images (1,210 characters of random pixels: the MAML split needs more than 1,200), so no download.
"""

import importlib.util
import json
import os
import re

import pytest
import torch

if importlib.util.find_spec("learn2learn") is None:
    if os.environ.get("CI"):
        raise RuntimeError("learn2learn is not installed in CI: .ci/run must run tools/install_learn2learn.sh.")
    pytest.skip("learn2learn is not installed (bash tools/install_learn2learn.sh)", allow_module_level=True)

import bilevel as bl  # noqa: E402
from benchmarks import l2l_time_to_accuracy as tta  # noqa: E402
from tasks.omniglot.data import OmniglotImages  # noqa: E402


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1210, 20, 28, 28), dtype=torch.uint8, generator=g)
    return OmniglotImages(images, tuple(f"images_background/Alphabet/character{i:04d}" for i in range(1210)))


def test_same_weights_and_meta_gradient_on_the_first_batch(data):
    model, l2l_side, bl_side, train, _ = tta.build(data)
    inner, outer = tta.batches(train.sample(0, tta.META_BATCH))
    assert inner[0].dtype == torch.float32 and inner[0].shape == (32, 5, 1, 28, 28) and outer[0].shape[1] == 5
    check = tta.check_same_start((l2l_side, bl_side), inner, outer)
    assert check["grad_rel_diff"] <= 1e-5 and check["grad_norm"] > 1e-2   # not two zero gradients agreeing

    # The check can fail: first-order MAML is not learn2learn's second-order meta-gradient ...
    first_order = tta.BilevelMAML(model, method=bl.FirstOrder())
    with pytest.raises(RuntimeError, match=r"meta-gradients of learn2learn and bilevel .* differ by"):
        tta.check_same_start((l2l_side, first_order), inner, outer)
    # ... and weights that differ by one step of size 1e-4 are refused.
    bl_side.params["classifier.bias"] += 1e-4
    with pytest.raises(RuntimeError, match="start from different weights"):
        tta.check_same_start((l2l_side, bl_side), inner, outer)


def test_short_run_reports_reached_and_not_reached(data, tmp_path, capsys):
    out = tmp_path / "tta.jsonl"
    # a step budget, not a time budget: how far a run gets in some seconds depends on the machine's load
    results = tta.main(["--max-steps", "2", "--val-every", "1", "--val-tasks", "4", "--targets", "0", "0.999",
                        "--out", str(out)], data=data)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records][0] == "start" and records[0]["grad_rel_diff"] <= 1e-5
    assert [r["impl"] for r in records if r["kind"] == "result"] == ["learn2learn", "bilevel"]
    vals = [r for r in records if r["kind"] == "val"]
    assert sorted({r["step"] for r in vals}) == [0, 1, 2] and len(vals) == 2 * 3   # both, at every meta-step
    for r in results:
        assert r["stopped"] == "max-steps" and r["meta_steps"] == 2
        # accuracy >= 0 holds at the validation before training: reached at step 0 after 0 minutes
        assert r["reached"]["0"] == {"step": 0, "wall_min": 0.0, "cpu_min": 0.0}
        assert r["reached"]["0.999"] is None   # random pixels: query drawings are unrelated to support drawings
        assert r["median_cpu_s"] > 0 and r["train_cpu_s"] >= r["median_cpu_s"]
    printed = capsys.readouterr().out
    assert printed.count("not reached") == 2 and "| learn2learn | " in printed and "| bilevel | " in printed


def test_bad_options_are_named(data, tmp_path, capsys):
    for argv, message in ((["--val-every", "0"], "--val-every must be positive"),
                          (["--targets", "95"], r"--targets are accuracies in \[0, 1\]")):
        with pytest.raises(SystemExit):
            tta.main(argv + ["--out", str(tmp_path / "x.jsonl")], data=data)
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.jsonl").exists()
