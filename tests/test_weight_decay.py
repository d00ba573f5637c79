"""Weight-decay tuning: hypergradients against the closed-form ridge answer, scikit-learn mappings, a short tuning
run, the experiment script, and the errors for bad inputs."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf.errors import ConfigKeyError

import bilevel as bl
from tasks.weight_decay.config import load_config
from tasks.weight_decay.experiment import run
from tasks.weight_decay.problems import init_hparams, make_task, ridge_hypergrad, ridge_solution
from tasks.weight_decay.tuning import (grid_values, hypergradient_descent, make_method, make_solver, search,
                                       sklearn_reference, solve_inner)

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
    with pytest.raises(ConfigKeyError):
        load_config([], ["outer.lerning_rate=0.1"])
    with pytest.raises(ValueError, match="first-order.*identically zero"):
        load_config([], ["outer.method=reptile"])
    with pytest.raises(ValueError, match=r"outer.init_wd=0.0.*> 0"):
        load_config([], ["outer.init_wd=0.0"])
    with pytest.raises(ValueError, match=r"outer.init_wd=-1.0"):
        load_config([], ["outer.init_wd=-1.0"])
    with pytest.raises(ValueError, match=r"data.name='cifar10' is not one of"):
        load_config([], ["data.name=cifar10"])
    with pytest.raises(ValueError, match="outer.method='newton' is not one of"):
        load_config([], ["outer.method=newton"])


def test_bad_task_inputs(tmp_path, ridge_scalar):
    with pytest.raises(ValueError, match="Unknown data set 'cifar10'"):
        make_task("cifar10")
    with pytest.raises(ValueError, match="ridge is for the regression set"):
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
