"""Sinusoid workload: the task distribution, that training learns, exact resume, every method runs, config errors,
and every tensor of a run on ``run.device``."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import bilevel as bl

from tasks.config import ConfigError, resolve_device
from tasks.sinusoid import train
from tasks.sinusoid.config import load_config
from tasks.sinusoid.sampler import SinusoidSampler

FAST = ["run.progress=false", "eval.every=0", "eval.test_tasks=50", "eval.val_tasks=10", "run.checkpoint_every=0"]


def config(tmp_path, name="maml", *overrides):
    return load_config(name, FAST + [f"run.dir={tmp_path}"] + list(overrides))


def test_sampler_draws_the_reference_distribution():
    tasks = SinusoidSampler(shots=10, queries=10, seed=3).sample(0, 2000)
    a, p, x = tasks.amplitude.double(), tasks.phase.double(), torch.cat([tasks.support_x, tasks.query_x], 1).double()
    assert a.min() >= 0.1 and a.max() <= 5.0 and p.min() >= 0 and p.max() <= math.pi
    assert x.min() >= -5 and x.max() <= 5 and x.shape == (2000, 20, 1)
    # uniform moments: mean and variance within ~5 standard errors of U[low, high]
    for values, low, high in ((a, 0.1, 5.0), (p, 0.0, math.pi), (x.flatten(), -5.0, 5.0)):
        n, var = values.numel(), (high - low) ** 2 / 12
        assert abs(values.mean() - (low + high) / 2) < 5 * math.sqrt(var / n)
        assert abs(values.var() - var) < 5 * var * math.sqrt(0.8 / n)  # var of a uniform's sample variance
    y = torch.cat([tasks.support_y, tasks.query_y], 1).double()
    torch.testing.assert_close(y, a[:, None, None] * torch.sin(x - p[:, None, None]), atol=1e-5, rtol=1e-5)


def test_sampler_is_stateless_and_ignores_the_global_rng():
    sampler = SinusoidSampler(seed=1)
    torch.manual_seed(0)
    whole = sampler.sample(7, 6)
    torch.manual_seed(123)
    torch.rand(10)
    part = sampler.sample(7, 2, start=4)  # tasks 4, 5 of meta-step 7, whatever was drawn before
    for w, p in zip(whole, part):
        torch.testing.assert_close(w[4:], p, rtol=0, atol=0)
    assert not torch.equal(sampler.sample(8, 6).amplitude, whole.amplitude)
    assert not torch.equal(SinusoidSampler(seed=2).sample(7, 6).amplitude, whole.amplitude)


def zero_predictor_mse(tasks) -> float:
    """MSE of predicting y = 0: the best a model that learnt nothing about the task family can do on average."""
    return (tasks.query_y.double() ** 2).mean().item()


def test_a_short_maml_run_beats_the_zero_predictor_and_its_initialisation(tmp_path):
    cfg = config(tmp_path, "maml", "meta.steps=200", "meta.lr=0.003", "eval.test_tasks=200")
    work = train.build(cfg)
    before = train.evaluate(work, work.model.init_params(), "test", 200)
    results = train.main(cfg)
    after = results["test"]["steps"]["10"]["mean"]
    baseline = zero_predictor_mse(work.samplers["test"].sample(0, 200))
    assert baseline == pytest.approx(4.25, rel=0.15)  # E[A^2] E[sin^2] = 8.50 / 2 for the reference's ranges
    assert after < 0.7 * baseline and after < 0.7 * before["steps"]["10"]["mean"]
    assert results["test"]["steps"]["10"]["mean"] < results["test"]["steps"]["1"]["mean"]  # adaptation helps
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["train_cpu_time_s"] >= 0 and saved["machine"]["cpus"]
    assert {"command", "date", "config", "protocol"} <= set(saved)
    assert (tmp_path / "curves.png").stat().st_size > 0
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 1 + 2  # 200 steps, log_every 100


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    common = ["meta.steps=12", "run.checkpoint_every=4", "meta.batch=4", "run.log_every=4"]
    straight = train.main(config(tmp_path / "a", "reptile", *common, "inner.steps=2"))
    real, calls = train.meta_step, {"n": 0}

    def crash_after_nine(*args):
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "meta_step", crash_after_nine)
    with pytest.raises(KeyboardInterrupt):
        train.main(config(tmp_path / "b", "reptile", *common, "inner.steps=2"))
    monkeypatch.setattr(train, "meta_step", real)
    resumed = train.main(config(tmp_path / "b", "reptile", *common, "inner.steps=2", "run.resume=true"))
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    for k in a["hparams"]:
        torch.testing.assert_close(a["hparams"][k], b["hparams"][k], rtol=0, atol=0)
    assert a["history"]["loss"] == b["history"]["loss"] and b["step"] == 12
    assert resumed["test"] == straight["test"]


def test_resume_refuses_a_different_method(tmp_path):
    train.main(config(tmp_path, "maml", "meta.steps=2"))
    with pytest.raises(ValueError, match="'method' section differs"):
        train.main(config(tmp_path, "maml", "meta.steps=2", "method.name=fomaml", "run.resume=true"))


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "imaml_reg10", "imaml", "neumann", "pretrain"])
def test_every_shipped_config_takes_finite_meta_steps(tmp_path, name):
    cfg = config(tmp_path, name, "meta.batch=3")
    work = train.build(cfg)
    hparams = work.model.init_params()
    grad, metrics, out = train.meta_step(work, hparams, work.samplers["train"].sample(0, 3))
    assert set(grad) == set(hparams) and all(torch.isfinite(g).all() for g in grad.values())
    assert math.isfinite(metrics["loss"])
    if name.startswith(("imaml", "neumann")):  # the diagnostics read from inner_info / linear_info
        assert 0 <= metrics["unconverged"] <= 1 and 0 <= metrics["indefinite"] <= 1
        assert math.isfinite(metrics["inner_relative"]) and math.isfinite(metrics["linear_residual"])


def test_the_imaml_config_gives_the_exact_implicit_gradient(tmp_path):
    """CG-5 on the shipped iMAML problem agrees with a dense solve of the same adjoint system (float64)."""
    work = train.build(config(tmp_path, "imaml_reg10", "model.hidden=[10,10]"))  # 141 weights: a cheap dense solve
    theta = {k: v.detach().double() for k, v in work.model.init_params().items()}
    task = work.samplers["train"].sample(0, 1)
    support, query = [tuple(t[0].double() for t in pair) for pair in (task.support, task.query)]
    cg = bl.hypergrad(work.method, work.problem, theta, support, query, on_nonconvergence="ignore")
    dense = bl.hypergrad(bl.Implicit(bl.Dense()), work.problem, theta, support, query, on_nonconvergence="ignore")
    flat = lambda g: torch.cat([v.reshape(-1) for v in g.values()])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(cg.grad), flat(dense.grad), dim=0)
    assert cos > 0.999, cos


def test_a_nonfinite_meta_step_is_skipped_and_counted(tmp_path):
    cfg = config(tmp_path, "maml", "meta.steps=3", "inner.lr=1e30")  # the inner step overflows
    results = train.main(cfg)
    assert results["skipped_steps"] == 3
    with pytest.raises(bl.NonFiniteError, match="meta.on_nonfinite=skip_step"):
        train.main(config(tmp_path / "r", "maml", "meta.steps=3", "inner.lr=1e30", "meta.on_nonfinite=raise"))


@pytest.mark.parametrize("overrides, match", [
    (["method.name=anil"], "method.name='anil'; choose one of"),
    (["inner.steps=3", "method.name=pretrain"], "inner.steps=3 with method.name=pretrain"),
    (["inner.steps=0"], "maml needs at least one inner step"),
    (["task.amplitude=[5.0,0.1]"], r"task.amplitude=\[5.0, 0.1\]"),
    (["meta.batching=pmap"], "meta.batching='pmap'"),
    (["eval.test_tasks=1"], "eval.test_tasks >= 2"),
    (["method.reg=0"], "method.reg=0"),
    (["meta.on_nonfinite=warn"], "meta.on_nonfinite='warn'; use skip_step or raise"),
    (["inner.solver=lbfgs"], "inner.solver='lbfgs'; use gd, adam or scaled"),
    (["inner.momentum=0.5", "inner.solver=adam"], "with inner.solver=gd only"),
    (["task.shot=5"], "shot"),                      # unknown key, named
    (["meta.steps=many"], "meta.steps"),            # wrong type, named
    (["meta.steps"], "key=value"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("maml", overrides)


def test_an_unknown_config_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="available: .*imaml.*maml"):
        load_config("mamll")
    with pytest.raises(SystemExit, match="error: invalid config"):
        train.cli(["--config", "maml", "method.name=nope"])


def test_curvature_scaled_gd_solves_where_a_fixed_step_diverges():
    """A strongly convex quadratic 0.5 wᵀAw − bᵀw + reg/2 ||w||² with eigenvalues of A up to 400: GD at lr 0.01
    diverges (lr > 2/410), the curvature-scaled solver reaches the closed-form solution."""
    from tasks.sinusoid.inner import CurvatureScaledGD

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.0, 400.0, 20, dtype=torch.float64)) @ q.T
    b = torch.randn(20, dtype=torch.float64)
    loss = lambda w, h, batch: 0.5 * w["x"] @ a @ w["x"] - b @ w["x"]  # noqa: E731
    prox = bl.proximal(loss, 10.0)
    theta = {"x": torch.zeros(20, dtype=torch.float64)}
    exact = torch.linalg.solve(a + 10.0 * torch.eye(20, dtype=torch.float64), b)
    # κ = 1.5 · 410 / 10 ≈ 62: the error contracts by about 1 − 1/√κ ≈ 0.87 a step, 1e-9 after 150 steps
    w, _ = CurvatureScaledGD(reg=10.0, steps=150)(prox, dict(theta), theta, None)
    assert torch.linalg.vector_norm(w["x"] - exact) < 1e-6 * torch.linalg.vector_norm(exact)
    w, info = bl.GradientDescent(lr=0.01, steps=60)(prox, dict(theta), theta, None)
    assert not torch.linalg.vector_norm(w["x"] - exact) < torch.linalg.vector_norm(exact)  # diverged
    # vmap over tasks: one curvature estimate per task, the same answers as one by one
    bs = torch.stack([b, 2 * b])
    loss_b = lambda w, h, batch: 0.5 * w["x"] @ a @ w["x"] - batch @ w["x"]  # noqa: E731
    solver = CurvatureScaledGD(reg=10.0, steps=150)
    batched = torch.func.vmap(lambda batch: solver(bl.proximal(loss_b, 10.0), dict(theta), theta, batch)[0]["x"])(bs)
    torch.testing.assert_close(batched[1], 2 * exact, rtol=1e-6, atol=1e-8)


def test_curvature_scaled_gd_rejects_bad_settings():
    from tasks.sinusoid.inner import CurvatureScaledGD

    with pytest.raises(ValueError, match="need reg > 0"):
        CurvatureScaledGD(reg=0.0, steps=5)


def test_init_from_starts_theta_from_another_run(tmp_path):
    first = config(tmp_path / "a", "imaml_reg10", "meta.steps=2", "meta.batch=2", "inner.steps=2")
    train.main(first)
    theta = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["hparams"]
    second = config(tmp_path / "b", "imaml", "meta.steps=1", "meta.lr=1e-12", "meta.batch=2", "inner.steps=2",
                    f"run.init_from={tmp_path / 'a' / 'checkpoint.pt'}")
    train.main(second)
    after = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["hparams"]
    for k in theta:  # one step at a negligible meta learning rate: theta is the first run's
        torch.testing.assert_close(after[k], theta[k], rtol=1e-6, atol=1e-9)
    with pytest.raises(FileNotFoundError, match="run.init_from=.*no such checkpoint"):
        train.main(config(tmp_path / "c", "imaml", "meta.steps=1", f"run.init_from={tmp_path / 'none.pt'}"))


def test_a_finished_run_is_kept_and_init_from_unpickles_no_code(tmp_path):
    import os

    train.main(config(tmp_path / "a", "maml", "meta.steps=1", "meta.batch=2"))
    before = (tmp_path / "a" / "results.json").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train.main(config(tmp_path / "a", "maml", "meta.steps=1", "meta.batch=2"))
    assert (tmp_path / "a" / "results.json").read_bytes() == before and not (tmp_path / "a" / "run.lock").exists()
    train.main(config(tmp_path / "a", "maml", "meta.steps=1", "meta.batch=2", "run.overwrite=true"))

    class Payload:                                   # a checkpoint that would run code when unpickled
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"hparams": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        train.main(config(tmp_path / "b", "maml", "meta.steps=1", f"run.init_from={tmp_path / 'evil.pt'}"))
    assert not (tmp_path / "pwned").exists()


aten = torch.ops.aten


class OnMeta(TorchDispatchMode):
    """Runs a workload on the ``meta`` device (shapes only, no values) and records every tensor made elsewhere.

    A host read of a meta tensor (``.item()``, ``bool()``, ``.cpu()``) has no value to read, so it answers a fixed
    one: ``False`` for a flag (finite, not converged), a large count (a step budget spent) and 0.5 for any other
    number; every early-exit loop then ends and a whole run goes through. A tensor made off the meta device is
    recorded in ``made`` as ``(op, workload functions on the stack)``; one computed from CPU tensors is not (its
    root was recorded), nor a 0-dim CPU tensor (a Python number under vmap).
    """

    def __init__(self):
        super().__init__()
        self.made = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.device.type == "meta":
            if func is aten._local_scalar_dense.default:
                return False if x.dtype == torch.bool else 0.5 if x.is_floating_point() else 10 ** 6
            if func is aten._to_copy.default and torch.device(kwargs.get("device", "meta")).type == "cpu":
                return torch.full(x.shape, 0.5, dtype=kwargs.get("dtype") or x.dtype)
        out = func(*args, **kwargs)
        inputs = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() for t in inputs):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and (t.dim() or t.device.type != "cpu"):
                    self.made.add((str(func), _workload_stack()))
        return out


def _workload_stack() -> tuple[str, ...]:
    """Names of the functions of ``tasks/`` on the current stack, innermost first."""
    frame, names = sys._getframe(), []
    while frame is not None:
        if f"{os.sep}tasks{os.sep}" in frame.f_code.co_filename:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return tuple(names)


def made_on_purpose(made, where) -> set:
    """What ``OnMeta`` saw made off the device, minus what functions ``where`` make on the CPU on purpose."""
    return {(op, stack) for op, stack in made if not set(stack) & set(where)}


@pytest.mark.parametrize("name", ["maml", "reptile", "imaml_reg10", "neumann", "pretrain"])
def test_every_tensor_of_a_run_follows_run_device(tmp_path, monkeypatch, name):
    """A whole run (meta-steps, validation, checkpoints, a resume, test) with ``run.device`` resolved to ``meta``: a
    tensor the workload makes without ``device=`` would show up on the CPU. Only the seeded draws are made on the
    CPU, on purpose (the same tasks and θ on every device): the sampler's and the model initialisation's."""
    asked = []
    monkeypatch.setattr(train, "resolve_device", lambda value: asked.append(value) or torch.device("meta"))
    common = ["meta.steps=2", "meta.batch=2", "eval.every=2", "eval.val_tasks=2", "eval.test_tasks=2",
              "run.checkpoint_every=1", "run.device=cuda:1", "eval.steps=[0,2]", "method.cg_steps=2",
              "method.neumann_steps=2"] + (["inner.steps=2"] if name != "pretrain" else [])
    common += ["inner.solver=gd"] if name == "neumann" else []  # imaml_reg10 covers the curvature-scaled solver
    with OnMeta() as seen:
        train.main(config(tmp_path, name, *common))
        results = train.main(config(tmp_path, name, *common, "run.resume=true"))  # loads the checkpoint
    assert made_on_purpose(seen.made, {"sample", "__init__"}) == set()
    assert {op for op, _ in seen.made} <= {"aten.rand.generator", "aten.empty.memory_format"}  # draws and nn.Linear
    assert results["machine"]["device"] == "meta" and set(asked) == {"cuda:1"}
    work = train.build(config(tmp_path, name, *common))
    assert all(t.device.type == "meta" for t in work.samplers["train"].sample(0, 2))
    assert all(t.device.type == "meta" for t in work.model.init_params().values())


def test_the_tasks_and_theta_are_the_same_on_every_device(tmp_path):
    """Drawn on the CPU and then moved: a device changes where the tasks and θ live, never their values."""
    a = SinusoidSampler(seed=4).sample(3, 5)
    b = SinusoidSampler(seed=4, device="meta").sample(3, 5)
    assert all(x.device.type == "meta" and x.shape == y.shape and x.dtype == y.dtype for x, y in zip(b, a))
    cpu = train.build(config(tmp_path, "maml", "run.device=cpu")).model.init_params()
    again = train.build(config(tmp_path, "maml", "run.device=auto")).model.init_params()  # the CPU here
    assert all(torch.equal(cpu[k], again[k]) for k in cpu)


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:-1", "cpu:0", "CUDA", "mps"])
def test_a_bad_run_device_is_a_config_error(value):
    with pytest.raises(ConfigError, match=rf"^invalid config: run.device='{value}'; use auto, cpu, cuda or "
                                          rf"cuda:<index>\.$"):
        load_config("maml", [f"run.device={value}"])


def test_an_unavailable_cuda_device_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "build", lambda cfg: pytest.fail("work started before the device check"))
    with pytest.raises(SystemExit, match=r"^error: invalid config: run.device=cuda but this torch build or machine "
                                         r"has no CUDA device; use run.device=cpu or auto\.$"):
        train.cli(["--config", "maml", f"run.dir={tmp_path / 'run'}", "run.device=cuda"])
    assert not (tmp_path / "run").exists()  # not even the run folder was claimed


def test_resolve_device_picks_and_checks_the_gpu(monkeypatch):
    """``auto``: this process's GPU when CUDA is available, else the CPU; a CUDA device must exist (closed cases,
    with torch.cuda's answers replaced)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"run.device=cuda:0 but this torch build or machine has no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^invalid config: device=cuda:2 but this machine has 2 CUDA devices "
                                          r"\(cuda:0 to cuda:1\); use one of those, device=cpu or auto\.$"):
        resolve_device("cuda:2", "device")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"has 1 CUDA device \(cuda:0\); use it, run.device=cpu or auto\.$"):
        resolve_device("cuda:1")
