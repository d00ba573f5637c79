"""Omniglot entry points under misuse and faults: nothing lost, nothing silently wrong, no code run from a file.

Each test reproduces one failure seen by trying the script, the data loader and the inference API as a careful
and as a hostile user would: the run folder, locks and checkpoints; the image cache and local zips; divergence;
and the inputs of :class:`~tasks.omniglot.inference.FewShotClassifier`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.omniglot import data as omniglot_data
from tasks.omniglot import train
from tasks.omniglot.config import load_config
from tasks.omniglot.data import load_omniglot, resolve_root
from tasks.omniglot.inference import FewShotClassifier, load_images
from tasks.omniglot.model import Conv4
from tasks.omniglot.run_folder import DivergenceError, DivergenceWarning, RunFolderError, load_checkpoint

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SMALL_SET = "images_background_small1"
SMALL = [f"data.root={DATA}", f"data.background={SMALL_SET}", "data.evaluation=null", "data.num_train=100",
         "data.num_val=16", "wandb.mode=disabled", "run.progress=false", "eval.val_tasks=2", "eval.test_tasks=2",
         "inner.test_steps=1", "run.threads=null", "method.name=fomaml", "meta.batch=2", "eval.every=0"]


@pytest.fixture(scope="module")
def small():
    if not (resolve_root(DATA) / f"{SMALL_SET}.zip").is_file():
        pytest.skip(f"Omniglot small zips not found under {DATA} (set BILEVEL_DATA)")
    return load_omniglot((SMALL_SET,), DATA, download=False, cache=False)


def cfg(run_dir, *overrides):
    return load_config("demo", SMALL + [f"run.dir={run_dir}"] + list(overrides))


def _ran(path):  # called by unpickling a hostile checkpoint; must never run
    Path(path).write_text("code ran on load")


class _Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _ran, (self.marker,)


# ---- checkpoints: nothing is unpickled beyond tensors and plain containers -------------------------------------

def test_a_checkpoint_holding_code_is_refused_by_resume_and_inference(small, tmp_path):
    run = tmp_path / "run"
    train.main(cfg(run, "meta.steps=1"), small)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["config"]["run"]["name"] = _Hostile(marker)
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(RunFolderError, match=r"checkpoint\.pt.*refus"):
        train.main(cfg(run, "meta.steps=2", "run.resume=true"), small)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*refus"):
        FewShotClassifier.load(run / "checkpoint.pt")
    assert not marker.exists()


def test_the_projects_own_checkpoint_loads_with_weights_only(small, tmp_path):
    train.main(cfg(tmp_path, "meta.steps=1", "meta.optimizer=adam"), small)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)   # plain containers only
    assert state["step"] == 1 and isinstance(state["config"], dict)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_named(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "hparams": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(RunFolderError, match=r"checkpoint\.pt.*damaged"):
        load_checkpoint(path)


# ---- the run folder: one run per folder, a lock, writable before any work --------------------------------------

def test_a_finished_run_is_not_overwritten_without_a_flag(small, tmp_path):
    train.main(cfg(tmp_path, "meta.steps=2"), small)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(RunFolderError, match=r"--resume.*--overwrite"):
        train.main(cfg(tmp_path, "meta.steps=1"), small)
    assert (tmp_path / "results.json").read_text() == before
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    (tmp_path / "eval-step2-lr0.4x1.json").write_text("{}")   # what --eval-only adds to a run folder
    (tmp_path / "notes.txt").write_text("mine")                # not a run's file: kept
    out = train.main(cfg(tmp_path, "meta.steps=1", "run.overwrite=true"), small)
    assert json.loads((tmp_path / "results.json").read_text())["meta_steps"] == 1 == out["meta_steps"]
    assert not (tmp_path / "eval-step2-lr0.4x1.json").exists() and (tmp_path / "notes.txt").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    with pytest.raises(ValueError, match="run.resume and run.overwrite"):
        cfg(tmp_path, "run.overwrite=true", "run.resume=true")


def test_resume_of_a_folder_with_results_but_no_checkpoint_is_refused(small, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(RunFolderError, match="no checkpoint"):
        train.main(cfg(tmp_path, "meta.steps=1", "run.resume=true"), small)


def test_a_live_lock_names_its_holder_and_a_dead_ones_is_taken_over(small, tmp_path, capsys):
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 4242, "host": "other-host", "started": "earlier"}))
    with pytest.raises(RunFolderError, match=r"pid 4242 on other-host"):
        train.main(cfg(tmp_path, "meta.steps=1"), small)
    assert not (tmp_path / "checkpoint.pt").exists()
    dead = 2 ** 22 + 17  # above the default pid_max, so no process holds it
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    train.main(cfg(tmp_path, "meta.steps=1"), small)
    assert "no longer running" in capsys.readouterr().err
    assert not (tmp_path / "run.lock").exists()   # released at the end


def test_the_lock_is_held_during_the_run_and_released_after_a_crash(small, tmp_path, monkeypatch):
    seen = {}

    def crash(*a, **k):
        seen["lock"] = json.loads((tmp_path / "run.lock").read_text())
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train, "meta_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg(tmp_path, "meta.steps=1"), small)
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert not (tmp_path / "run.lock").exists()


def test_an_unwritable_run_folder_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(train, "build", lambda *a, **k: pytest.fail("data loaded before the folder was checked"))
    with pytest.raises(RunFolderError, match=r"a_file.*not writable"):
        train.main(cfg(blocker / "run", "meta.steps=1"))
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(RunFolderError, match="not writable"):
            train.main(cfg(ro / "run", "meta.steps=1"))


def test_stray_temporary_files_are_removed_on_the_next_start(small, tmp_path):
    train.main(cfg(tmp_path, "meta.steps=1"), small)
    stray = tmp_path / "checkpoint.ptab12cd.tmp"   # what a write killed before its rename leaves
    stray.write_bytes(b"half")
    train.main(cfg(tmp_path, "meta.steps=2", "run.resume=true"), small)
    assert not stray.exists()


def test_resume_refuses_another_seed_and_fewer_steps_than_reached(small, tmp_path):
    train.main(cfg(tmp_path, "meta.steps=3"), small)
    with pytest.raises(RunFolderError, match=r"run.seed=1 but .* run.seed=0"):
        train.main(cfg(tmp_path, "meta.steps=4", "run.seed=1", "run.resume=true"), small)
    with pytest.raises(RunFolderError, match=r"step 3.*meta.steps=2"):
        train.main(cfg(tmp_path, "meta.steps=2", "run.resume=true"), small)


# ---- divergence: stopped or recorded, never reported as success, never checkpointed ----------------------------

def test_a_huge_inner_learning_rate_is_reported_as_divergence(small, tmp_path):
    with pytest.raises(DivergenceError, match=r"meta-step \d+.*inner.lr"):
        train.main(cfg(tmp_path, "meta.steps=30", "inner.lr=1e4", "run.checkpoint_every=1"), small)
    assert not (tmp_path / "results.json").exists()
    if (tmp_path / "checkpoint.pt").exists():   # whatever was kept is finite and not far from its start
        for v in load_checkpoint(tmp_path / "checkpoint.pt")["hparams"].values():
            assert torch.isfinite(v).all()


def test_exploding_weights_are_never_checkpointed(small, tmp_path):
    with pytest.raises(DivergenceError, match=r"weights.*meta.lr"):
        train.main(cfg(tmp_path, "meta.steps=5", "meta.lr=1e3", "run.checkpoint_every=1",
                       "meta.on_divergence=warn"), small)
    init = Conv4(5).init_params()
    norm0 = math.sqrt(sum(v.double().pow(2).sum() for v in init.values()))
    if (tmp_path / "checkpoint.pt").exists():
        kept = load_checkpoint(tmp_path / "checkpoint.pt")["hparams"]
        assert math.sqrt(sum(v.double().pow(2).sum() for v in kept.values())) < 100 * norm0


def test_warn_mode_records_divergence_and_skipped_steps_in_the_results(small, tmp_path, monkeypatch):
    real = train.meta_step
    calls = {"n": 0}

    def nan_on_odd_steps(*a, **k):  # a non-finite hypergradient at steps 1 and 3
        grad, loss, acc, out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (1, 3):
            grad = {k: torch.full_like(v, float("nan")) for k, v in grad.items()}
        return grad, loss, acc, out

    monkeypatch.setattr(train, "meta_step", nan_on_odd_steps)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        out = train.main(cfg(tmp_path, "meta.steps=4", "meta.on_nonfinite=warn"), small)
    assert len([w for w in record if "non-finite" in str(w.message)]) == 1   # once per cause
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["skipped_steps"] == [1, 3] == out["skipped_steps"]


def test_warn_mode_warns_once_per_sign_and_records_it(small, tmp_path, monkeypatch):
    real = train.meta_step

    def loss_far_above_a_guess(*a, **k):
        grad, loss, acc, out = real(*a, **k)
        return grad, loss * 1e6, acc, out

    monkeypatch.setattr(train, "meta_step", loss_far_above_a_guess)
    with pytest.warns(DivergenceWarning, match=r"meta-step 10: the query loss") as record:
        train.main(cfg(tmp_path, "meta.steps=12", "meta.on_divergence=warn"), small)
    assert len(record) == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(d["step"], d["kind"]) for d in saved["divergence"]] == [(10, "loss")]
    with pytest.raises(DivergenceError, match=r"meta-step 10: the query loss.*inner.lr=0.4"):
        train.main(cfg(tmp_path / "raise", "meta.steps=12"), small)


def test_divergence_check_flags_loss_chance_accuracy_and_skips():
    from tasks.omniglot.run_folder import divergence

    ok = {"step": list(range(1, 301)), "loss": [1.6 - i / 300 for i in range(300)],
          "acc": [0.2 + i / 600 for i in range(300)], "skipped": []}
    assert divergence(ok, ways=5) is None
    high = dict(ok, loss=[1.6] * 5 + [1e5] * 295)
    assert divergence(dict(high, step=high["step"][:15], loss=high["loss"][:15], acc=high["acc"][:15]),
                      ways=5).kind == "loss"
    chance = dict(ok, acc=[0.2] * 300)
    assert divergence(chance, ways=5).kind == "chance"
    assert divergence(dict(chance, step=ok["step"][:50], loss=ok["loss"][:50], acc=[0.2] * 50), ways=5) is None
    skipped = dict(ok, skipped=list(range(250, 301)))
    assert "non-finite" in divergence(skipped, ways=5).message


# ---- one-line errors instead of tracebacks ---------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("run.threads=-1", "run.threads"), ("meta.chunk_size=0", "meta.chunk_size"),
    ("meta.on_divergence=maybe", "meta.on_divergence"),
])
def test_more_invalid_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("demo", [override])


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("meta:\n  steps: [1, 2\n")
    with pytest.raises(ValueError, match=r"broken\.yaml"):
        load_config(str(path))


def test_cuda_on_a_cpu_build_and_too_many_ways_are_one_line_errors(small, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: .*run.device=cuda"):
        train.cli([*SMALL, f"run.dir={tmp_path / 'a'}", "run.device=cuda", "meta.steps=1"])
    with pytest.raises(SystemExit, match=r"^error: .*lower task.ways"):
        train.cli([*SMALL, f"run.dir={tmp_path / 'b'}", "task.ways=40", "meta.steps=1"])


# ---- data: the image cache is derived, a damaged zip is named -------------------------------------------------

def _cached_load(monkeypatch, tmp_path):
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    return load_omniglot((SMALL_SET,), DATA, download=False)


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong_contents"])
def test_a_damaged_cache_is_named_and_rebuilt(small, tmp_path, monkeypatch, damage):
    _cached_load(monkeypatch, tmp_path)
    (path,) = (tmp_path / "cache").glob("*.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"images": torch.zeros(3, 20, 28, 28, dtype=torch.uint8), "characters": ["a", "b", "c"]}, path)
    with pytest.warns(RuntimeWarning, match=rf"{path.name}.*rebuil"):
        again = _cached_load(monkeypatch, tmp_path)
    assert torch.equal(again.images, small.images) and again.characters == small.characters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_cached_load(monkeypatch, tmp_path).images, small.images)   # the rebuilt cache is good


def test_an_unwritable_cache_warns_and_continues(small, tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "blocker" / "cache"))
    decoded = []
    real = omniglot_data._decode
    monkeypatch.setattr(omniglot_data, "_decode", lambda *a: decoded.append(1) or real(*a))
    with pytest.warns(RuntimeWarning, match="without a cache") as record:
        images = load_omniglot((SMALL_SET,), DATA, download=False)
    assert torch.equal(images.images, small.images)
    assert len(record) == 1 and decoded   # one warning, and given before the decoding (below)
    with pytest.warns(RuntimeWarning, match="without a cache"):
        with pytest.raises(KeyboardInterrupt):
            monkeypatch.setattr(omniglot_data, "_decode", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
            load_omniglot((SMALL_SET,), DATA, download=False)


def test_a_truncated_zip_is_named_and_replaced_by_a_verified_download(tmp_path, monkeypatch):
    source = resolve_root(DATA) / f"{SMALL_SET}.zip"
    if not source.is_file():
        pytest.skip("small Omniglot zip not found")
    payload = source.read_bytes()
    (tmp_path / f"{SMALL_SET}.zip").write_bytes(payload[: len(payload) // 3])
    with pytest.raises(ValueError, match=rf"{SMALL_SET}\.zip.*damaged"):
        load_omniglot((SMALL_SET,), tmp_path, download=False, cache=False)

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return payload

    monkeypatch.setattr(omniglot_data.urllib.request, "urlopen", lambda url, timeout: Response())
    with pytest.warns(RuntimeWarning, match="damaged.*download"):
        images = load_omniglot((SMALL_SET,), tmp_path, download=True, cache=False)
    assert images.images.shape[0] == 136
    assert (tmp_path / f"{SMALL_SET}.zip").read_bytes() == payload


# ---- inference inputs ------------------------------------------------------------------------------------------

@pytest.fixture()
def clf():
    torch.manual_seed(0)
    return FewShotClassifier(Conv4(5).init_params(), inner_lr=0.4, inner_steps=5)


def _support(small, ways=3, shots=2):
    x = small.images[:ways * 10:10, :shots].float().div(255).reshape(ways * shots, 28, 28)
    return x, [c for c in range(ways) for _ in range(shots)]


def test_nonfinite_weights_and_inputs_are_refused(small, clf, tmp_path):
    bad = Conv4(5).init_params()
    bad["convs.2.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"convs.2.weight.*non-finite"):
        FewShotClassifier(bad, inner_lr=0.4, inner_steps=5)
    x, y = _support(small)
    x[1, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        clf.adapt(x, y)
    task = clf.adapt(*_support(small))
    q = small.images[:30:10, 5].float().div(255)
    q[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        task.predict(q)


def test_a_huge_inner_lr_at_adaptation_is_named(small):
    clf = FewShotClassifier(Conv4(5).init_params(), inner_lr=1e8, inner_steps=5)
    with pytest.raises(ValueError, match="inner_lr"):
        clf.adapt(*_support(small)).predict(_support(small)[0])


def test_rgba_png_with_strokes_in_alpha_is_composited(small, tmp_path):
    strokes = small.images[0, 0].numpy()                 # bright strokes, as in training
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = strokes                               # black ink, opaque where drawn, transparent elsewhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ink.png")
    grey = Image.fromarray(255 - strokes)                # the same drawing as an ordinary greyscale PNG
    grey.save(tmp_path / "grey.png")
    a, b = load_images([tmp_path / "ink.png"]), load_images([tmp_path / "grey.png"])
    assert a.abs().sum() > 10 and (a - b).abs().max() < 2 / 255
    Image.new("RGBA", (28, 28), (255, 255, 255, 0)).save(tmp_path / "blank.png")
    with pytest.raises(ValueError, match=r"blank\.png.*blank"):
        load_images([tmp_path / "blank.png"])


def test_a_single_path_string_is_one_image(small, tmp_path):
    Image.fromarray(255 - small.images[0, 0].numpy()).save(tmp_path / "one.png")
    assert load_images(str(tmp_path / "one.png")).shape == (1, 1, 28, 28)
    assert load_images(tmp_path / "one.png").shape == (1, 1, 28, 28)


def test_inner_steps_zero_is_refused_not_replaced(small, tmp_path):
    train.main(cfg(tmp_path, "meta.steps=1"), small)
    with pytest.raises(ValueError, match="inner_steps=0"):
        FewShotClassifier.load(tmp_path / "checkpoint.pt", inner_steps=0)
    assert FewShotClassifier.load(tmp_path / "checkpoint.pt", inner_steps=3).solver.steps == 3


def test_single_query_is_refused_and_the_inductive_mode_does_not_depend_on_the_batch(small, clf):
    task = clf.adapt(*_support(small))
    queries = small.images[:30:10, 5].float().div(255)
    with pytest.raises(ValueError, match=r"one query.*transductive=False"):
        task.predict(queries[:1])
    alone = torch.cat([task.predict_proba(queries[i:i + 1], transductive=False) for i in range(3)])
    together = task.predict_proba(queries, transductive=False)
    torch.testing.assert_close(alone, together)


def test_labels_given_as_a_tensor_name_classes_by_value(small, clf):
    x, y = _support(small)
    task = clf.adapt(x, torch.tensor(y))
    assert task.classes == [0, 1, 2] and task.params["head.weight"].shape[0] == 3


def test_a_config_file_with_a_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.yaml"
    path.write_text(f'run:\n  name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError, match=r"hostile\.yaml"):
        load_config(str(path))
    assert not marker.exists()
