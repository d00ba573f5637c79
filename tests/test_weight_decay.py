"""Weight-decay tuning: hypergradients against the closed-form ridge answer, scikit-learn mappings, a short tuning
run, the experiment script, every tensor of a run on ``device``, and the errors for bad inputs."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import numpy as np

import bilevel as bl
from tasks.config import ConfigError
from tasks.run_folder import RunFolderError
from tasks.weight_decay.config import load_config
from tasks.weight_decay.experiment import run
from tasks.weight_decay.problems import curvature, init_hparams, make_task, ridge_hypergrad, ridge_solution
from tasks.weight_decay.tuning import (fit_step_size, grid_values, hypergradient_descent, make_method, make_solver,
                                       search, sklearn_reference, solve_inner)
from test_sinusoid import OnMeta, made_on_purpose

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BILEVEL_DATA", ROOT / ".." / "shared" / "data"))
CONFIGS = sorted((ROOT / "configs" / "weight_decay").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These problems are tiny: extra intra-op threads only contend (badly, on a shared machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ridge_scalar():
    return make_task("diabetes", "ridge", "scalar", n_train=50, n_val=150)


@pytest.fixture(scope="module")
def ridge_feature():
    return make_task("diabetes", "ridge", "feature", n_train=50, n_val=150)


def hypergrad(task, method, hparams, steps=240):
    # λ = 0.3 keeps the Hessian's condition number near 15: Nesterov GD reaches 1e-11 in about 230 steps.
    solver = make_solver("gd", lr=0.2, steps=steps, tol=1e-11)
    problem = bl.Problem(task.inner_loss, task.outer_loss, solver)
    return bl.hypergrad(method, problem, hparams, task.train, task.val, params0=dict(task.params0),
                        on_nonconvergence="raise")


def test_closed_form_matches_autograd_through_solve(ridge_feature):
    hparams = {"log_wd": torch.linspace(-3, 1, 10, dtype=torch.float64).requires_grad_()}
    w = ridge_solution(ridge_feature, hparams)
    ridge_feature.outer_loss({"W": w}, hparams, ridge_feature.val).backward()
    expected = ridge_hypergrad(ridge_feature, {"log_wd": hparams["log_wd"].detach()})["log_wd"]
    torch.testing.assert_close(hparams["log_wd"].grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,decay", [(name, decay) for name in ("implicit", "neumann", "unrolled")
                                        for decay in ("scalar", "feature")] + [("forward", "scalar")])
def test_ridge_hypergradient_matches_closed_form(name, decay, ridge_scalar, ridge_feature):
    # Forward mode with per-feature decay is covered by test_forward_mode_equals_reverse_mode (it costs one pass
    # through the solver per hyperparameter).
    task = ridge_scalar if decay == "scalar" else ridge_feature
    hparams = init_hparams(task, 0.3)
    # Neumann converges as (1 - αμ)^K with μ ≥ λ = 0.3: α = 0.2, K = 400 leaves a 1e-11 truncation error.
    method = make_method(name, linear_steps=400 if name == "neumann" else 50, linear_tol=1e-12, neumann_alpha=0.2)
    out = hypergrad(task, method, hparams)
    expected = ridge_hypergrad(task, hparams)["log_wd"]
    assert out.grad["log_wd"].shape == expected.shape
    torch.testing.assert_close(out.grad["log_wd"], expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.params["W"], ridge_solution(task, hparams), rtol=1e-8, atol=1e-10)


def test_forward_mode_equals_reverse_mode(ridge_feature):
    # Both differentiate the same finite computation (15 steps, far from converged), so they agree to round-off.
    hparams = {"log_wd": torch.linspace(-2, 0, 10, dtype=torch.float64)}
    solver = make_solver("gd", lr=0.2, steps=15, tol=0.0)
    problem = bl.Problem(ridge_feature.inner_loss, ridge_feature.outer_loss, solver)
    args = (problem, hparams, ridge_feature.train, ridge_feature.val, dict(ridge_feature.params0))
    fwd = bl.Forward()(*args)
    rev = bl.Unrolled()(*args)
    torch.testing.assert_close(fwd.grad["log_wd"], rev.grad["log_wd"], rtol=1e-10, atol=1e-13)
    assert not torch.allclose(rev.grad["log_wd"], ridge_hypergrad(ridge_feature, hparams)["log_wd"], rtol=1e-3)


def test_first_order_hypergradient_is_refused(ridge_scalar):
    for name in ("first_order", "reptile", "FOMAML"):
        with pytest.raises(ValueError, match="identically zero"):
            make_method(name)
    # The core refuses too, when asked directly with a warm start.
    problem = bl.Problem(ridge_scalar.inner_loss, ridge_scalar.outer_loss, make_solver("gd", 0.2, 10, 0.0))
    with pytest.raises(ValueError, match="identically zero"):
        bl.FirstOrder()(problem, init_hparams(ridge_scalar, 0.1), ridge_scalar.train, ridge_scalar.val,
                        params0=dict(ridge_scalar.params0))


@pytest.mark.parametrize("decay", ["scalar", "feature"])
def test_sklearn_mapping_ridge(decay, ridge_scalar, ridge_feature):
    task = ridge_scalar if decay == "scalar" else ridge_feature
    hparams = {"log_wd": torch.linspace(-3, 1, 10, dtype=torch.float64).reshape(task.hparam_shapes()["log_wd"])
               if decay == "feature" else torch.tensor(-1.0, dtype=torch.float64)}
    params = {"W": ridge_solution(task, hparams)}
    ref = sklearn_reference(task, hparams)
    assert ref["val_loss"] == pytest.approx(float(task.data_loss(params, task.val)), rel=1e-9)
    assert ref["test_loss"] == pytest.approx(float(task.data_loss(params, task.test)), rel=1e-9)


def test_sklearn_mapping_logistic():
    task = make_task("digits", "logreg", "feature", n_train=100, n_val=200, n_test=200)
    hparams = {"log_wd": torch.linspace(-2.5, -1, 64, dtype=torch.float64).reshape(64, 1)}
    solver = make_solver("gd", lr=1.0, steps=3000, tol=1e-7)
    params, info = solve_inner(task, solver, hparams, dict(task.params0))
    assert bool(info.converged)
    ref = sklearn_reference(task, hparams)
    assert ref["val_loss"] == pytest.approx(float(task.data_loss(params, task.val)), rel=1e-5)


def test_short_tuning_run_moves_toward_grid_optimum(ridge_scalar):
    task = ridge_scalar
    grid = []  # the 30-point grid, solved in closed form
    for wd in grid_values(1e-4, 10.0, 30):
        hparams = init_hparams(task, wd)
        grid.append((float(task.data_loss({"W": ridge_solution(task, hparams)}, task.val)), wd))
    best_val, best_wd = min(grid)
    assert 1e-2 < best_wd < 1  # an interior optimum, so "toward" means something
    solver = make_solver("gd", lr=0.2, steps=2000, tol=1e-8)  # stable while λ < 0.9
    result = hypergradient_descent(task, "implicit", solver, init_wd=1e-2, steps=8, lr=0.5)
    dist = [abs(math.log(r["wd"] / best_wd)) for r in result.history]
    assert dist[-1] < 0.5 * dist[0]
    assert result.final["val_loss"] < result.history[0]["val_loss"]
    assert result.final["val_loss"] <= best_val * 1.005
    assert result.cost.inner_solves == 9 and result.cost.hvps > 0 and result.nonconverged_steps == 0


def test_grid_search_agrees_with_closed_form(ridge_scalar):
    values = grid_values(0.05, 0.8, 4)
    points, cost = search(ridge_scalar, make_solver("gd", lr=0.2, steps=2000, tol=1e-9), values)
    for p in points:
        w = ridge_solution(ridge_scalar, init_hparams(ridge_scalar, p["wd"]))
        assert p["val_loss"] == pytest.approx(float(ridge_scalar.data_loss({"W": w}, ridge_scalar.val)), rel=1e-8)
    assert cost.inner_solves == 4 and cost.inner_steps == sum(p["inner_steps"] for p in points)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_load(config):
    cfg = load_config([config])
    assert cfg.out_dir.startswith("runs/weight_decay/")


def test_config_overrides_and_errors():
    cfg = load_config([], ["outer.method=neumann", "data.name=diabetes", "model.kind=ridge"])
    assert cfg.outer.method == "neumann" and cfg.data.name == "diabetes"
    assert cfg.out_dir == "runs/weight_decay/diabetes"  # the default folder is named after the data set


@pytest.mark.parametrize("override, message", [
    ("outer.lerning_rate=0.1", r"Key 'lerning_rate' not in 'OuterConfig' \(key outer.lerning_rate\)"),
    ("outer.steps=many", r"outer.steps"),
    ("outer.method=reptile", "first-order.*identically zero"),
    ("outer.method=newton", "outer.method='newton' is not one of"),
    ("outer.init_wd=0.0", r"outer.init_wd=0.0; must be > 0 \(it is tuned as log λ\)"),
    ("outer.init_wd=-1.0", r"outer.init_wd=-1.0"),
    ("data.name=cifar10", r"data.name='cifar10' is not a data set: use a scikit-learn loader name \(breast_cancer"),
    ("data.task=ordinal", r"data.task='ordinal'; use one of auto, regression, binary, multiclass"),
    ("search.grid_points=0", r"search.grid_points=0; must be >= 1"),
    ("search.random_points=-1", r"search.random_points=-1; must be >= 0"),
    ("search.low=20.0", r"need 0 < search.low < search.high"),
    ("threads=0", r"threads=0; must be >= 1"),
    ("inner.lr=-0.1", r"inner.lr=-0.1; must be > 0"),
    ("inner.momentum=1.0", r"inner.momentum=1.0; must be in \[0, 1\)"),
    ("outer.hoag_decay=2.0", r"outer.hoag_decay=2.0; must be in \(0, 1\]"),
    ("data.n_train=0", r"data.n_train=0; must be >= 1"),
    ("model.kind=mlp", r"set inner.lr for model.kind=mlp"),
    ("wandb.mode=cloud", r"wandb.mode='cloud'; use one of offline, online, disabled"),
    ("outer.steps", r"overrides must be key=value"),
    ("device=gpu", r"device='gpu'; use auto, cpu, cuda or cuda:<index>\.$"),
    ("device=cuda:x", r"device='cuda:x'; use auto, cpu, cuda or cuda:<index>\.$"),
])
def test_config_errors_are_one_line_before_any_work(override, message, monkeypatch):
    import tasks.weight_decay.experiment as experiment
    monkeypatch.setattr(experiment, "make_task", lambda *a, **k: pytest.fail("data loaded before validation"))
    with pytest.raises(ConfigError, match=message) as err:
        load_config([], [override])
    assert "\n" not in str(err.value) and str(err.value).startswith("invalid config")


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file '.*nope.yaml' not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: iris\nouter: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*bad.yaml at line \d+"):
        load_config([bad])
    typo = tmp_path / "typo.yaml"
    typo.write_text("outer: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"invalid config from .*typo.yaml: Key 'stpes' not in 'OuterConfig'"):
        load_config([typo])
    with pytest.raises(FileNotFoundError, match=r"data.name='.*missing.csv': no such file"):
        load_config([], [f"data.name={tmp_path / 'missing.csv'}"])
    with pytest.raises(FileNotFoundError, match="search.grid_from"):
        load_config([], [f"search.grid_from={tmp_path / 'results.json'}"])


def test_unwritable_out_dir_fails_before_the_search(tmp_path, monkeypatch):
    import tasks.weight_decay.experiment as experiment
    monkeypatch.setattr(experiment, "make_task", lambda *a, **k: pytest.fail("work started before the folder check"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = load_config([], [f"out_dir={blocker / 'out'}", "wandb.mode=disabled"])
    with pytest.raises(RunFolderError, match=r"run folder .*a_file/out is not writable .*choose another out_dir"):
        run(cfg)


def test_finished_run_is_kept_unless_overwrite(tmp_path, monkeypatch):
    import tasks.weight_decay.experiment as experiment
    monkeypatch.setattr(experiment, "_run", lambda cfg, write, device: {"ran": True})

    def claim(folder, *overrides):
        return run(load_config([], [f"out_dir={folder}", "wandb.mode=disabled", *overrides]))

    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "history.png").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"already holds a run \(results.json, history.png\); replace it with "
                                             r"--overwrite, or choose another out_dir") as err:
        claim(tmp_path)
    assert "--resume" not in str(err.value)  # the script cannot resume: not offered
    assert (tmp_path / "results.json").exists() and not (tmp_path / "run.lock").exists()
    assert claim(tmp_path, "overwrite=true") == {"ran": True}
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "history.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are removed
    assert claim(tmp_path / "fresh" / "nested") == {"ran": True}  # created on demand
    # What an interrupted run left (wandb/ is written from the start) is a run too: replacing it takes --overwrite.
    (tmp_path / "wandb").mkdir()
    with pytest.raises(RunFolderError, match=r"already holds a run \(wandb\)"):
        claim(tmp_path)


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    import tasks.weight_decay.experiment as experiment
    monkeypatch.setattr(experiment, "_run", lambda cfg, write, device: {"ran": True})
    cfg = load_config([], [f"out_dir={tmp_path}", "wandb.mode=disabled"])
    # A live run (this test's parent process) holds the folder: refused, naming it.
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / "run.lock").write_text(json.dumps(holder))
    with pytest.raises(RunFolderError, match=rf"is in use by pid {os.getppid()} on .* \(since earlier\); .*out_dir"):
        run(cfg)
    # A process that has ended left its lock behind: taken over, and released at the end.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(json.dumps({**holder, "pid": int(gone.stdout)}))
    assert run(cfg) == {"ran": True}
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("name, task_type, classes, features", [
    ("iris", "multiclass", 3, 4), ("wine", "multiclass", 3, 13), ("breast_cancer", "binary", 2, 30),
    ("digits", "multiclass", 10, 64), ("diabetes", "regression", 0, 10)])
def test_any_sklearn_loader_by_name(name, task_type, classes, features):
    task = make_task(name)
    assert task.task == task_type and len(task.classes) == classes
    assert task.model == ("ridge" if task_type == "regression" else "logreg")
    assert task.train[0].shape[1] == features
    n = sum(len(part[1]) for part in (task.train, task.val, task.test))
    assert len(task.train[1]) == min(500, int(0.4 * n)) and len(task.val[1]) == min(500, int(0.3 * n))
    if classes:  # every label is a class index
        assert int(torch.cat([task.train[1], task.val[1], task.test[1]]).max()) == classes - 1


def test_digits_inputs_are_scaled_as_before():
    # auto scaling picks "max" for non-negative integer pixels: divide by 16 (the training maximum), then centre,
    # which is what the shipped digits configs were tuned with.
    from tasks.data import load_sklearn_dataset
    task = make_task("digits", n_train=500, n_val=500)
    X, _ = load_sklearn_dataset("digits")
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    train = X[perm[:500]] / 16.0
    torch.testing.assert_close(task.train[0], train - train.mean(0))


def test_csv_and_npz_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 3, generator=g, dtype=torch.float64)
    names = ["setosa", "versicolor", "virginica"]
    labels = [names[int(i)] for i in (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()]
    rows = ["a,b,species,c"] + [f"{x[0]:.6f},{x[1]:.6f},{lab},{x[2]:.6f}" for x, lab in zip(X.tolist(), labels)]
    csv = tmp_path / "flowers.csv"
    csv.write_text("\n".join(rows) + "\n")
    task = make_task(str(csv), target="species")
    assert task.task == "multiclass" and task.classes == tuple(names) and task.train[0].shape[1] == 3
    assert task.name == "logreg/flowers/scalar"
    # Regression: the last column (no header), a continuous target.
    noise = 0.1 * torch.randn(90, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise
    reg = tmp_path / "reg.csv"
    reg.write_text("\n".join(",".join(f"{v:.8f}" for v in row) for row in torch.cat([X, y[:, None]], 1).tolist()))
    task = make_task(str(reg))
    assert task.task == "regression" and task.model == "ridge" and task.train[0].shape == (36, 3)
    w = ridge_solution(task, init_hparams(task, 1e-6))
    assert float(task.data_loss({"W": w}, task.test)) < 0.05  # standardised target: the linear signal is found
    # NPZ with integer labels, forced binary.
    npz = tmp_path / "pairs.npz"
    np.savez(npz, X=X.numpy(), y=(X[:, 0] > 0).long().numpy())
    task = make_task(str(npz), task="binary")
    assert task.task == "binary" and task.classes == ("0", "1")
    with pytest.raises(ValueError, match=r"row 3, column 'b' holds 'oops', not a number"):
        bad = tmp_path / "bad.csv"
        bad.write_text("a,b,y\n1,2,0\n1,oops,1\n")
        make_task(str(bad))
    with pytest.raises(ValueError, match=r"'holes': 1 examples hold missing or non-finite values \(first: example 1"):
        holes = tmp_path / "holes.csv"
        holes.write_text("a,b,y\n1,2,0\n1,nan,1\n3,4,1\n")
        make_task(str(holes))
    with pytest.raises(ValueError, match=r"no target column 'label'; columns are \['a', 'b', 'species', 'c'\]"):
        make_task(str(csv), target="label")
    with pytest.raises(ValueError, match=r"'one_class': the target has a single value; nothing to classify"):
        one = tmp_path / "one_class.csv"
        one.write_text("a,y\n1,cat\n2,cat\n3,cat\n4,cat\n")
        make_task(str(one), n_train=2, n_val=1)
    with pytest.raises(ValueError, match=r"data.task='binary' but the target has 3 distinct values"):
        make_task(str(csv), target="species", task="binary")
    with pytest.raises(ValueError, match=r"no array \['y'\] in the NPZ file"):
        np.savez(tmp_path / "x_only.npz", X=X.numpy())
        make_task(str(tmp_path / "x_only.npz"))


def test_sklearn_mapping_binary():
    # Two classes: our two-column softmax against scikit-learn's sigmoid at C = 2 / (n λ).
    task = make_task("breast_cancer", n_train=200, n_val=150)
    hparams = init_hparams(task, 1e-2)
    solver = make_solver("gd", lr=None, steps=3000, tol=1e-9)
    params, info = solve_inner(task, solver, hparams, dict(task.params0))
    assert bool(info.converged)
    ref = sklearn_reference(task, hparams)
    assert ref["val_loss"] == pytest.approx(float(task.data_loss(params, task.val)), rel=1e-6)
    assert ref["test_loss"] == pytest.approx(float(task.data_loss(params, task.test)), rel=1e-6)


def test_automatic_step_size_bounds_the_hessian():
    task = make_task("iris")
    L = curvature(task)
    params = {k: torch.randn_like(v) for k, v in task.params0.items()}
    flat = torch.cat([v.reshape(-1) for v in params.values()])
    shapes = {k: v.shape for k, v in params.items()}

    def loss(vector):
        out, i = {}, 0
        for k, shape in shapes.items():
            out[k] = vector[i:i + math.prod(shape)].reshape(shape)
            i += math.prod(shape)
        return task.data_loss(out, task.train)

    top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])
    assert top <= L * (1 + 1e-9) and top > 0.2 * L  # a bound, and not a loose one
    solver = fit_step_size(task, make_solver("gd", None, 10, 1e-6), init_hparams(task, 0.5))
    assert solver.lr == pytest.approx(1 / (L + 0.5))


def test_cli_runs_iris_and_names_errors(tmp_path, capsys):
    from tasks.weight_decay.experiment import cli
    args = ["data.name=iris", f"out_dir={tmp_path}", "wandb.mode=disabled", "progress=false", "search.grid_points=3",
            "search.random_points=0", "search.low=0.01", "search.high=1.0", "outer.steps=2", "outer.init_wd=0.1",
            "inner.steps=2000", "inner.tol=1e-5"]
    results = cli(args)
    assert results["task"] == "logreg/iris/scalar" and results["task_type"] == "multiclass"
    assert results["sklearn"]["at_grid_best"]["val_loss"] == pytest.approx(results["grid"]["best"]["val_loss"],
                                                                            rel=1e-3)
    assert "results in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: run folder .* already holds a run \(results.json, history.png"):
        cli(args)
    with pytest.raises(SystemExit, match=r"^error: invalid config: search.grid_points=0; must be >= 1"):
        cli(args + ["search.grid_points=0"])
    with pytest.raises(SystemExit, match=r"^error: unknown option '--resume'"):
        cli(args + ["--resume"])
    assert cli(args + ["--overwrite"])["task"] == "logreg/iris/scalar"


def test_bad_task_inputs(tmp_path, ridge_scalar):
    with pytest.raises(ValueError, match="data.name='cifar10' is not a data set"):
        make_task("cifar10")
    with pytest.raises(ValueError, match="ridge is for regression targets"):
        make_task("digits", "ridge")
    with pytest.raises(ValueError, match="decay 'feature' is for linear models"):
        make_task("digits", "mlp", "feature")
    with pytest.raises(ValueError, match="must be a positive finite number"):
        init_hparams(ridge_scalar, 0.0)
    with pytest.raises(ValueError, match="must be a positive finite number"):
        init_hparams(ridge_scalar, -1e-3)
    with pytest.raises(FileNotFoundError, match=r"missing file .*train-images-idx3-ubyte\.gz"):
        (tmp_path / "mnist").mkdir()
        make_task("mnist", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"need 1500 examples but the data set has only 442"):
        make_task("diabetes", "ridge", n_train=1000, n_val=500)


def test_experiment_writes_results_and_plots(tmp_path):
    cfg = load_config([ROOT / "configs" / "weight_decay" / "ridge_diabetes.yaml"], [
        f"out_dir={tmp_path}", "wandb.mode=disabled", "progress=false", "search.grid_points=4",
        "search.random_points=2", "search.low=0.01", "search.high=0.8", "inner.lr=0.2", "outer.init_wd=0.05",
        "outer.steps=3"])
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == results["task"] == "ridge/diabetes/scalar"
    assert saved["splits"] == {"train": 50, "val": 150, "test": 242}
    assert len(saved["hypergrad"]["history"]) == 3 and len(saved["grid"]["points"]) == 4
    assert saved["grid"]["cost"]["inner_solves"] == 4 and saved["hypergrad"]["cost"]["seconds"] > 0
    assert saved["sklearn"]["at_hypergrad"]["val_loss"] == pytest.approx(saved["hypergrad"]["final"]["val_loss"],
                                                                         rel=1e-4)
    for name in ("history.png", "landscape.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"no MNIST copy under {DATA}")
def test_mnist_task_splits():
    task = make_task("mnist", "mlp", "parameter", n_train=100, n_val=50, n_test=20, hidden=8, root=str(DATA))
    assert task.train[0].shape == (100, 784) and task.val[0].shape == (50, 784) and task.test[0].shape == (20, 784)
    assert task.hparam_shapes() == {"log_wd.W1": (784, 8), "log_wd.W2": (8, 10)}
    hparams = init_hparams(task, 1e-3)
    assert float(task.penalty(task.params0, hparams)) > 0


@pytest.mark.filterwarnings("ignore:.*inner solves:RuntimeWarning")  # meta has no values: nothing converges
@pytest.mark.parametrize("overrides", [
    ["data.name=diabetes", "model.decay=feature", "outer.method=implicit"],   # and the scikit-learn reference
    ["data.name=iris", "outer.method=forward", "search.sklearn=false"],
    ["data.name=iris", "model.kind=mlp", "model.decay=parameter", "model.hidden=4", "inner.lr=0.1",
     "outer.method=unrolled", "search.sklearn=false"],
], ids=["ridge", "logreg", "mlp"])
def test_every_tensor_of_a_tuning_run_follows_device(overrides, monkeypatch):
    """A whole run (grid and random search, hypergradient descent, the final solves, scikit-learn) with ``device``
    resolved to ``meta``: a tensor made without ``device=`` would show up on the CPU. Only the data is made on the
    CPU, on purpose: it is read, split and scaled there, and moved once."""
    import tasks.weight_decay.experiment as experiment
    asked = []
    monkeypatch.setattr(experiment, "resolve_device", lambda *a: asked.append(a) or torch.device("meta"))
    cfg = load_config([], ["wandb.mode=disabled", "progress=false", "search.grid_points=2", "search.random_points=1",
                           "outer.steps=2", "inner.steps=30", "device=cuda:1", *overrides])
    with OnMeta() as seen:
        results = run(cfg, write=False)
    assert made_on_purpose(seen.made, {"make_task"}) == set()
    assert results["device"] == "meta" and asked == [("cuda:1", "device")]
    task = make_task("iris", "mlp", "parameter", hidden=4, device="meta")
    assert all(t.device.type == "meta" for t in (*task.train, *task.val, *task.test, *task.params0.values()))
    assert all(t.device.type == "meta" for t in init_hparams(task, 0.1).values())


def test_an_unavailable_cuda_device_is_one_line_before_any_work(tmp_path, monkeypatch):
    from tasks.weight_decay.experiment import cli
    import tasks.weight_decay.experiment as experiment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(experiment, "make_task", lambda *a, **k: pytest.fail("data loaded before the device check"))
    with pytest.raises(SystemExit, match=r"^error: invalid config: device=cuda but this torch build or machine has no "
                                         r"CUDA device; use device=cpu or auto\.$"):
        cli(["data.name=iris", f"out_dir={tmp_path / 'out'}", "wandb.mode=disabled", "device=cuda"])
    assert not (tmp_path / "out").exists()  # not even the output folder was claimed
