"""benchmarks/l2l_time_to_accuracy.py: both sides start alike and agree on the first meta-gradient; a short run
reports a reached and an unreached target honestly and stops at its budget; an experiment run in two sessions
ends with the weights of one run in one session, its clocks added up; checkpoints are neither overwritten nor
resumed with other options; a signal ends a session at the next round boundary; bilevel's task threads
(``--bilevel-batching threads``) compute the loop's meta-gradient.

Synthetic images (1,210 characters of random pixels: the MAML split needs more than 1,200), so no download.
"""

import importlib.util
import json
import os
import re
import signal
import threading

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
        hit = r["reached"]["0"]
        assert (hit["step"], hit["wall_min"], hit["cpu_min"]) == (0, 0.0, 0.0) and hit["experiment_min"] > 0
        assert r["reached"]["0.999"] is None   # random pixels: query drawings are unrelated to support drawings
        assert r["median_cpu_s"] > 0 and r["train_cpu_s"] >= r["median_cpu_s"]
    printed = capsys.readouterr().out
    assert printed.count("not reached") == 2 and "| learn2learn | " in printed and "| bilevel | " in printed
    assert (tmp_path / "tta.ckpt.pt").exists()   # the default checkpoint, beside --out


def test_bad_options_are_named(data, tmp_path, capsys):
    for argv, message in ((["--val-every", "0"], "--val-every must be positive"),
                          (["--targets", "95"], r"--targets are accuracies in \[0, 1\]"),
                          (["--bilevel-workers", "2"], "--bilevel-workers applies to --bilevel-batching threads only"),
                          (["--bilevel-batching", "threads", "--bilevel-workers", "0"],
                           "--bilevel-workers must be positive")):
        with pytest.raises(SystemExit):
            tta.main(argv + ["--out", str(tmp_path / "x.jsonl")], data=data)
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.jsonl").exists()


SHORT = ["--val-every", "1", "--val-tasks", "4", "--targets", "0.999"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def diff(a, b, ref=None) -> float:
    """``‖a − b‖ / ‖ref‖`` over all the tensors of the dicts (``ref``: ``b``)."""
    ref = b if ref is None else ref
    norm = lambda d: torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))  # noqa: E731
    return float(norm({k: a[k] - b[k] for k in a}) / norm(ref))


def assert_same_state(a, b):
    """Two nested checkpoint values hold equal tensors and values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def sessions(data, tmp_path_factory):
    """One experiment of 4 meta-steps in two sessions of 2 (``a``), and in one session (``b``)."""
    tmp = tmp_path_factory.mktemp("resume")
    a, b = tmp / "a.jsonl", tmp / "b.jsonl"
    tta.main(["--max-steps", "2", *SHORT, "--out", str(a)], data=data)
    first = (tmp / "a.ckpt.pt").read_bytes()
    resumed = tta.main(["--max-steps", "2", *SHORT, "--out", str(a), "--resume"], data=data)
    whole = tta.main(["--max-steps", "4", *SHORT, "--out", str(b)], data=data)
    return {"a": a, "b": b, "ckpt": tmp / "a.ckpt.pt", "first": first, "resumed": resumed, "whole": whole}


def test_resumed_experiment_ends_with_the_weights_of_one_session(sessions, tmp_path):
    (tmp_path / "first.pt").write_bytes(sessions["first"])
    first = torch.load(tmp_path / "first.pt", weights_only=True)   # tensors and plain values only
    resumed = torch.load(sessions["ckpt"], weights_only=True)
    whole = torch.load(sessions["b"].with_suffix(".ckpt.pt"), weights_only=True)
    assert (first["step"], resumed["step"], whole["step"]) == (2, 4, 4)
    assert (first["session"], resumed["session"], whole["session"]) == (1, 2, 1)
    # Weights and Adam states of both sides, bit for bit; and they moved in the second session.
    assert_same_state(resumed["sides"], whole["sides"])
    for name, side in (("learn2learn", "module"), ("bilevel", "params")):
        assert not torch.equal(first["sides"][name][side]["classifier.weight"],
                               resumed["sides"][name][side]["classifier.weight"])
    assert_same_state(resumed["reached"], whole["reached"])

    # The clocks add up: the first session's per-step times are kept and two more of each appended.
    for name in ("learn2learn", "bilevel"):
        for clock in ("wall", "cpu"):
            kept, total = first["per_step"][name][clock], resumed["per_step"][name][clock]
            assert len(kept) == 2 and len(total) == 4 and torch.equal(total[:2], kept)
            assert resumed["clock"][name][clock] == pytest.approx(float(total.sum()), rel=1e-9)
            assert resumed["clock"][name][clock] > first["clock"][name][clock]
    assert resumed["experiment_s"] > first["experiment_s"] > 0

    # The records: one experiment (one date), each step validated once, the same accuracies as one session.
    a, b = records(sessions["a"]), records(sessions["b"])
    assert [r["kind"] for r in a if r["kind"] in ("start", "resume")] == ["start", "resume"]
    assert len({r["date"] for r in a}) == 1 and next(r for r in a if r["kind"] == "resume")["step"] == 2
    acc = [[(r["impl"], r["step"], r["val_acc"]) for r in rs if r["kind"] == "val"] for rs in (a, b)]
    assert acc[0] == acc[1] and [s for _, s, _ in acc[0]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for r, w in zip(sessions["resumed"], sessions["whole"]):
        assert (r["meta_steps"], r["session_meta_steps"], w["session_meta_steps"]) == (4, 2, 4)
        assert r["experiment_s"] > r["elapsed_s"]   # the first session counts
    assert not list(sessions["ckpt"].parent.glob("*.tmp"))


def test_checkpoints_are_not_overwritten_nor_resumed_with_other_options(sessions, data, tmp_path, capsys):
    ckpt, out = sessions["ckpt"], sessions["a"]
    before = ckpt.read_bytes(), out.read_text()
    for argv, message in (
            ([], r"checkpoint .*a\.ckpt\.pt exists: continue its experiment with --resume, or start a new one with "
                 r"another --checkpoint"),
            (["--resume", "--seed", "1"], r"is another experiment: --seed 0 in the checkpoint, 1 now;"),
            (["--resume", "--val-tasks", "5", "--targets", "0.9"],
             r"--val-tasks 4 in the checkpoint, 5 now; --targets \['0\.999'\] in the checkpoint, \['0\.9'\] now;"),
            (["--resume", "--bilevel-batching", "threads"],
             r"--bilevel-batching loop in the checkpoint, threads now;")):
        with pytest.raises(SystemExit):
            tta.main(["--max-steps", "1", *SHORT, "--out", str(out), *argv], data=data)
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1
    assert (ckpt.read_bytes(), out.read_text()) == before
    with pytest.raises(SystemExit):
        tta.main(["--resume", "--out", str(tmp_path / "new.jsonl")], data=data)
    assert re.search(r"--resume: no checkpoint .*new\.ckpt\.pt", capsys.readouterr().err)


def test_a_signal_ends_the_session_after_its_round(data, tmp_path, monkeypatch):
    out = tmp_path / "sig.jsonl"
    step = tta.BilevelMAML.step

    def step_then_terminate(self, inner, outer):   # SIGTERM in the middle of the first round
        signal.raise_signal(signal.SIGTERM)
        step(self, inner, outer)

    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(tta.BilevelMAML, "step", step_then_terminate)
        results = tta.main(["--max-steps", "3", *SHORT, "--out", str(out)], data=data)
    assert signal.getsignal(signal.SIGTERM) is handler   # main() put the previous handler back
    assert [(r["stopped"], r["meta_steps"]) for r in results] == [("SIGTERM", 1)] * 2   # the round finished
    ckpt = torch.load(tmp_path / "sig.ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["last_val"]) == (1, 0)   # the validation of step 1 left to the next session
    results = tta.main(["--max-steps", "1", *SHORT, "--out", str(out), "--resume"], data=data)
    assert [(r["stopped"], r["meta_steps"]) for r in results] == [("max-steps", 2)] * 2
    assert [r["step"] for r in records(out) if r["kind"] == "val"] == [0, 0, 1, 1, 2, 2]


def test_bilevel_task_threads_compute_the_loop_meta_gradient(sessions, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "threads.jsonl"
    module_loss, callers = tta.bl_l2l.module_loss, set()

    def spied_module_loss(module):   # which threads run bilevel's losses
        loss = module_loss(module)

        def spied(params, hparams, batch):
            callers.add(threading.current_thread().name)
            return loss(params, hparams, batch)
        return spied

    with monkeypatch.context() as m:
        m.setattr(tta.bl_l2l, "module_loss", spied_module_loss)
        # one intra-op thread in this process; two task threads all the same
        tta.main(["--max-steps", "2", *SHORT, "--bilevel-batching", "threads", "--bilevel-workers", "2",
                  "--threads", "1", "--out", str(out)], data=data)
    # the meta-steps in two worker threads (the validation runs in the main thread)
    assert len({name for name in callers if name.startswith("bilevel-tasks")}) == 2
    start = records(out)[0]
    assert start["grad_rel_diff"] <= tta.GRAD_RTOL   # check_same_start held with threads
    assert (start["bilevel_batching"], start["bilevel_workers"]) == ("threads", 2)
    assert start["sides"] == "learn2learn threads=1, bilevel batching=threads workers=2"
    assert "learn2learn threads=1, bilevel batching=threads workers=2;" in capsys.readouterr().out

    # learn2learn's side is the loop run's bit for bit; bilevel's computes the loop's meta-gradient up to rounding.
    (tmp_path / "loop.pt").write_bytes(sessions["first"])
    loop = torch.load(tmp_path / "loop.pt", weights_only=True)
    threads = torch.load(tmp_path / "threads.ckpt.pt", weights_only=True)
    assert (loop["step"], threads["step"]) == (2, 2) and loop["experiment"]["bilevel_batching"] == "loop"
    assert threads["experiment"]["bilevel_batching"] == "threads" and threads["experiment"]["bilevel_workers"] == 2
    assert_same_state(threads["sides"]["learn2learn"], loop["sides"]["learn2learn"])
    _, _, looped, train, _ = tta.build(data)
    threaded = tta.BilevelMAML(tta.build(data)[0], batching="threads", workers=2)
    inner, outer = tta.batches(train.sample(2, tta.META_BATCH))
    for side in (looped, threaded):
        side.load_state_dict(threads["sides"]["bilevel"])   # the weights the threads run reached
    g_loop, g_threads = ({k: v.clone() for k, v in side.meta_grad(inner, outer).items()} for side in (looped, threaded))
    assert diff(g_threads, g_loop) <= tta.GRAD_RTOL

    # Their weights after 2 meta-steps are not allclose: Adam's first steps are lr * g / |g| elementwise, so rounding
    # decides the sign of the steps of the near-zero components (the conv biases before batch norm have gradient 0),
    # and the next gradient moves with them. The threads run is as near the loop run as a loop on the same tasks in
    # reversed order (the same sum rounded otherwise), within a factor 2.
    reversed_ = tta.build(data)[2]
    theta0 = reversed_.hparams()
    for step in range(2):
        inner, outer = tta.batches(train.sample(step, tta.META_BATCH))
        reversed_.step(*(tuple(x.flip(0) for x in batch) for batch in (inner, outer)))
    w_loop, w_threads = loop["sides"]["bilevel"]["params"], threads["sides"]["bilevel"]["params"]
    moved = {k: w_loop[k] - theta0[k] for k in theta0}
    rounding = diff(reversed_.hparams(), w_loop, moved)
    assert 0 < diff(w_threads, w_loop, moved) <= 2 * rounding < 0.1

    with pytest.raises(SystemExit):   # the workers define the experiment too
        tta.main(["--max-steps", "1", *SHORT, "--bilevel-batching", "threads", "--bilevel-workers", "1",
                  "--threads", "1", "--out", str(out), "--resume"], data=data)
    assert re.search(r"--bilevel-workers 2 in the checkpoint, 1 now", capsys.readouterr().err)


def test_report_reads_the_last_experiment_and_tells_a_lucky_crossing_from_one_that_stays(tmp_path, capsys):
    def val(date, impl, step, acc, minutes):
        return {"date": date, "kind": "val", "impl": impl, "step": step, "val_acc": acc, "train_wall_s": 60 * minutes}

    curves = {"learn2learn": [0.80, 0.96, 0.90, 0.97, 0.985], "bilevel": [0.80, 0.90, 0.95, 0.95, 0.96]}
    records = [{"date": "old", "kind": "start", "argv": {"targets": [0.5]}}, val("old", "bilevel", 0, 0.99, 1.0),
               {"date": "new", "kind": "start", "argv": {"targets": [0.95, 0.99]}}]
    for step in range(5):
        records += [val("new", impl, step, curve[step], 2.0 * (step + 1) if impl == "learn2learn" else step + 1)
                    for impl, curve in curves.items()]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert tta.main(["--report", "--out", str(path)]) is None
    rows = capsys.readouterr().out.splitlines()
    # learn2learn's first crossing is its lucky step 1; the mean of 3 first reaches 95 % at its step 4 (0.943 at 3)
    assert rows[2] == ("| 95 % | step 1, 4.00 min | step 2, 3.00 min | step 4, 10.00 min | step 4, 5.00 min | "
                       "1.33x / 2.00x |")
    assert rows[3] == "| 99 % | not reached | not reached | not reached | not reached | - / - |"
    with pytest.raises(SystemExit):
        tta.main(["--report", "--out", str(tmp_path / "missing.jsonl")])
