"""Testing a trained model: best-by-validation weights, test-time adaptation chosen on validation, --eval-only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tasks.omniglot import train
from tasks.omniglot.config import load_config
from tasks.omniglot.data import load_omniglot, resolve_root
from tasks.omniglot.inference import FewShotClassifier

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SMALL = [f"data.root={DATA}", "data.background=images_background_small1", "data.evaluation=null",
         "data.num_train=100", "data.num_val=16", "wandb.mode=disabled", "run.progress=false",
         "eval.val_tasks=4", "eval.test_tasks=6", "inner.test_steps=2", "meta.batch=2", "run.threads=null"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-meta-step demo run validated every 2 steps, with test-time adaptation chosen on validation."""
    if not (resolve_root(DATA) / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot small zips not found under {DATA} (set BILEVEL_DATA)")
    torch.set_num_threads(1)
    small = load_omniglot(("images_background_small1",), DATA, download=False, cache=False)
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("demo", SMALL + [f"run.dir={run}", "meta.steps=6", "eval.every=2", "eval.select=true",
                                       "eval.lr_grid=[0.1,0.4]", "eval.steps_grid=[1,3]", "eval.select_tasks=5"])
    return run, train.main(cfg, small), small


def test_the_final_test_uses_the_best_validation_weights(trained):
    run, results, _ = trained
    history = torch.load(run / "checkpoint.pt", weights_only=True)["history"]
    best_step = history["val_step"][max(range(len(history["val_acc"])), key=history["val_acc"].__getitem__)]
    assert results["tested_weights"]["file"] == "best.pt" and results["tested_weights"]["step"] == best_step
    assert len(history["val_time"]) == len(history["val_step"]) == 3
    assert all(b >= a for a, b in zip(history["val_cpu"], history["val_cpu"][1:]))     # cumulative CPU time


def test_test_time_adaptation_is_the_best_of_the_grid_on_validation(trained):
    run, results, _ = trained
    chosen, grid = results["test_adaptation"], results["test_adaptation"]["grid"]
    assert len(grid) == 4 and {(g["lr"], g["steps"]) for g in grid} == {(0.1, 1), (0.1, 3), (0.4, 1), (0.4, 3)}
    best = max(g["accuracy"] for g in grid)
    assert any(g["accuracy"] == best and (g["lr"], g["steps"]) == (chosen["lr"], chosen["steps"]) for g in grid)
    # stored with the checkpoints and used by the inference API
    assert torch.load(run / "best.pt", weights_only=True)["test_adaptation"]["lr"] == chosen["lr"]
    clf = FewShotClassifier.load(run / "best.pt")
    assert clf.inner_lr == chosen["lr"] and clf.solver.steps == chosen["steps"]


def test_eval_only_tests_a_checkpoint_with_other_settings_and_overwrites_nothing(trained, capsys):
    run, results, _ = trained
    before = (run / "results.json").read_bytes()
    args = ["--eval-only", f"run.dir={run}", f"data.root={DATA}", "inner.test_lr=0.1", "inner.test_steps=1",
            "eval.test_tasks=6"]
    first = train.cli(args)
    second = train.cli(args)
    files = {p.name for p in run.glob("eval-*.json")}
    assert files == {f"eval-step{first['weights']['step']}-lr0.1x1.json",
                     f"eval-step{first['weights']['step']}-lr0.1x1-2.json"}
    assert first["test"] == second["test"]                     # the same fixed test tasks
    assert first["test_adaptation"] == {"lr": 0.1, "steps": 1, "reg": 0.0}
    assert (run / "results.json").read_bytes() == before
    assert json.loads((run / min(files)).read_text())["weights"]["file"] == "best.pt"
    # the configured test settings reproduce the training run's own test
    same = train.cli(["--eval-only", f"run.dir={run}", f"data.root={DATA}", "eval.weights=best",
                      f"inner.test_lr={results['test_adaptation']['lr']}",
                      f"inner.test_steps={results['test_adaptation']['steps']}"])
    assert same["test"] == pytest.approx(results["test"])


def test_eval_only_refuses_to_change_what_was_trained(trained):
    run, _, _ = trained
    with pytest.raises(SystemExit, match="not what was trained.*task.ways=20"):
        train.cli(["--eval-only", f"run.dir={run}", "task.ways=20"])
    with pytest.raises(SystemExit, match="no checkpoint.pt in"):
        train.cli(["--eval-only", f"run.dir={run / 'nothing'}"])


@pytest.mark.parametrize("method, test_reg, expected", [
    ("imaml", None, 2.0),   # the training inner loss: proximal with method.reg
    ("imaml", 0.0, 0.0),    # the iMAML authors' test protocol (measure_accuracy.py --lam 0.0): the plain loss
    ("maml", None, 0.0), ("maml", 0.5, 0.5),
])
def test_test_time_adaptation_minimises_the_loss_inner_test_reg_names(trained, tmp_path, method, test_reg,
                                                                      expected):
    _, _, small = trained
    extra = [] if test_reg is None else [f"inner.test_reg={test_reg}"]
    work = train.build(load_config("demo", SMALL + [f"run.dir={tmp_path}", f"method.name={method}",
                                                    "method.reg=2.0", *extra]), small)
    hparams = work.model.init_params()
    moved = {k: v + 0.01 for k, v in hparams.items()}
    task = work.samplers["train"].sample(0, 1).task(0)
    batch = (task.support, task.support_labels)
    plain = train.cross_entropy_loss(work.model)(moved, hparams, batch)
    distance = sum(float((moved[k] - hparams[k]).pow(2).sum()) for k in hparams)
    assert float(work.test_loss(moved, hparams, batch)) == pytest.approx(float(plain) + expected / 2 * distance,
                                                                         rel=1e-5)


def _fake_run(path: Path, accs, cpus, test=None):
    path.mkdir()
    steps = [100 * (i + 1) for i in range(len(accs))]
    history = {"val_step": steps, "val_acc": accs, "val_ci": [0.01] * len(accs), "val_cpu": cpus,
               "val_time": cpus, "step": steps, "loss": [1.0] * len(accs), "acc": accs}
    cfg = {"task": {"ways": 5, "shots": 1}, "method": {"name": "maml"}, "meta": {"batch": 32}}
    torch.save({"step": steps[-1], "history": history, "config": cfg, "cpu": cpus[-1],
                "hparams": {"w": torch.zeros(1)}},
               path / "checkpoint.pt")
    if test is not None:
        (path / "results.json").write_text(json.dumps({"test": {"accuracy": test, "ci95": 0.007},
                                                       "tested_weights": {"step": steps[-1]}}))
        (path / "curves.png").write_bytes(b"the test's own plot")


def test_report_gives_time_to_accuracy_and_the_test_and_keeps_a_finished_run_s_curves(tmp_path, capsys):
    from tasks.omniglot import report
    _fake_run(tmp_path / "done", [0.90, 0.951, 0.96, 0.972], [600.0, 1200.0, 1800.0, 2400.0], test=0.9687)
    _fake_run(tmp_path / "training", [0.5, 0.6], [60.0, 120.0])
    runs = report.main([str(tmp_path / "done"), str(tmp_path / "training"), "--out", str(tmp_path / "all.png")])
    assert runs[0]["to95"] == (200, 20.0) and runs[0]["to97"] == (400, 40.0) and runs[1]["to95"] is None
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].endswith("| 20 min (step 200) | 40 min (step 400) | 96.87 ± 0.70 % (step 400) |")
    assert rows[3].endswith("| not yet | not yet | – |")
    assert (tmp_path / "done" / "curves.png").read_bytes() == b"the test's own plot"
    assert (tmp_path / "training" / "curves.png").stat().st_size > 1000 and (tmp_path / "all.png").is_file()


def test_reptile_adapts_at_test_time_with_its_adam_beta1_in_the_script_and_the_inference_api(trained, tmp_path):
    _, _, small = trained
    cfg = load_config("reptile_5w1s", SMALL + [f"run.dir={tmp_path}"])
    work = train.build(cfg, small)
    assert cfg.inner.beta1 == 0 and work.test_solver.betas == (0.0, 0.999)
    state = {"hparams": work.model.init_params(), "config": OmegaConf.to_container(cfg), "step": 0}
    torch.save(state, tmp_path / "best.pt")
    assert FewShotClassifier.load(tmp_path / "best.pt").solver.betas == (0.0, 0.999)
