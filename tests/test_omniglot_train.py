"""Omniglot training: every method learns, resume is exact, configs and inputs are validated, inference works."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import bilevel as bl

from tasks.omniglot import train
from tasks.omniglot.config import load_config
from tasks.omniglot.data import load_omniglot, resolve_root
from tasks.omniglot.inference import FewShotClassifier, load_images
from tasks.omniglot.model import Conv4

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SMALL = [f"data.root={DATA}", "data.background=images_background_small1", "data.evaluation=null",
         "data.num_train=100", "data.num_val=16", "wandb.mode=disabled", "run.progress=false",
         "eval.val_tasks=4", "eval.test_tasks=6", "inner.test_steps=2"]


@pytest.fixture(scope="module")
def small():
    if not (resolve_root(DATA) / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot small zips not found under {DATA} (set BILEVEL_DATA)")
    return load_omniglot(("images_background_small1",), DATA, download=False, cache=False)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: small convolutions gain nothing from more, and a shared machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, *overrides):
    return load_config("demo", SMALL + [f"run.dir={tmp_path}", "run.threads=null"] + list(overrides))


@pytest.mark.parametrize("method, extra", [
    ("maml", []), ("fomaml", []),
    # the implicit methods at iMAML's inner lr 0.1: at 0.4 the proximal inner problem of the reference network
    # (N(0, 1) head, initial loss ~4) is not solved in 3 steps and the implicit gradient is meaningless
    ("imaml", ["inner.steps=3", "inner.lr=0.1", "method.cg_steps=3", "meta.on_nonconvergence=ignore"]),
    ("reptile", ["inner.solver=adam", "inner.lr=0.001", "inner.steps=3"]),
    ("neumann", ["inner.steps=3", "inner.lr=0.1", "method.neumann_steps=5", "method.neumann_alpha=0.01",
                 "meta.on_nonconvergence=ignore"]),
])
def test_a_meta_step_of_each_method_lowers_the_query_loss(small, tmp_path, method, extra):
    torch.manual_seed(0)
    work = train.build(tiny(tmp_path, f"method.name={method}", "task.queries=3", *extra), small)
    hparams = work.model.init_params()
    tasks = work.samplers["train"].sample(0, 2)
    grad, before, _, out = train.meta_step(work, hparams, tasks)
    assert set(grad) == set(hparams) and all(torch.isfinite(g).all() for g in grad.values())
    assert out.params["head.weight"].shape[0] == 2           # per-task solutions are kept
    if method == "reptile":   # Reptile moves theta towards the adapted weights: the tasks' own losses drop at theta
        def support_loss(theta):
            return sum(work.problem.inner_loss(theta, theta, (tasks.support[i], tasks.support_labels[i]))
                       for i in range(2))
        stepped = {k: v - 0.5 * grad[k] for k, v in hparams.items()}
        before, after = support_loss(hparams), support_loss(stepped)
    else:
        stepped = {k: v - 0.003 * grad[k] for k, v in hparams.items()}
        _, after, _, _ = train.meta_step(work, stepped, tasks)
    assert after < before - 1e-3, (method, before.item(), after.item())


def test_threads_batching_gives_the_loop_meta_step(small, tmp_path):
    grads = {}
    for batching in ("loop", "threads"):
        work = train.build(tiny(tmp_path / batching, "method.name=maml", "task.queries=3",
                                f"meta.batching={batching}",
                                *(["meta.workers=2"] if batching == "threads" else [])), small)
        tasks = work.samplers["train"].sample(0, 3)
        grads[batching], _, acc, _ = train.meta_step(work, work.model.init_params(), tasks)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads["loop"].values()))
    diff = torch.sqrt(sum(((grads["loop"][k] - grads["threads"][k]) ** 2).sum() for k in grads["loop"]))
    assert diff <= 1e-5 * norm and acc.shape == (3,)


def test_implicit_nonconvergence_is_reported_not_hidden(small, tmp_path):
    work = train.build(tiny(tmp_path, "method.name=imaml", "inner.steps=2", "method.cg_steps=1"), small)
    with pytest.warns(bl.NonConvergenceWarning, match="did not converge"):
        _, _, _, out = train.meta_step(work, work.model.init_params(), work.samplers["train"].sample(0, 2))
    assert train.unconverged_fraction(out) == 1.0            # 1 CG step on a 112k-dimensional system


def _final_hparams(run_dir: Path):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["hparams"]


def test_resume_after_a_crash_ends_with_the_same_weights(small, tmp_path, monkeypatch):
    args = ["method.name=fomaml", "meta.batch=2", "meta.steps=5", "run.checkpoint_every=2", "eval.every=2",
            "eval.val_tasks=2", "eval.test_tasks=3"]
    straight = train.main(tiny(tmp_path / "a", *args), small)

    real_step, calls = train.meta_step, {"n": 0}

    def crash_on_fourth_step(*a, **k):       # dies after the checkpoint at step 2 and one more step
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*a, **k)

    monkeypatch.setattr(train, "meta_step", crash_on_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny(tmp_path / "b", *args), small)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "b" / "results.json").exists()   # a failed run leaves no results
    assert not list((tmp_path / "b").glob("*.tmp"))          # nor half-written files
    monkeypatch.setattr(train, "meta_step", real_step)
    resumed = train.main(tiny(tmp_path / "b", *args, "run.resume=true"), small)

    a, b = _final_hparams(tmp_path / "a"), _final_hparams(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == straight["test"]
    history = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["history"]
    assert history["step"] == [1, 2, 3, 4, 5] and history["val_step"] == [2, 4, 5]


def test_a_cpu_budget_ends_training_then_tests_and_a_bigger_one_resumes(small, tmp_path, monkeypatch):
    clock, real_step = {"t": 0.0}, train.meta_step

    def ten_cpu_seconds_each(*a, **k):   # a fake process clock: each meta-step costs exactly 10 s
        clock["t"] += 10.0
        return real_step(*a, **k)

    monkeypatch.setattr(train, "meta_step", ten_cpu_seconds_each)
    monkeypatch.setattr(train.time, "process_time", lambda: clock["t"])
    args = ["method.name=fomaml", "meta.batch=2", "meta.steps=10", "run.checkpoint_every=0", "eval.every=5",
            "eval.val_tasks=2", "eval.test_tasks=3"]
    first = train.main(tiny(tmp_path, *args, "run.budget_cpu_minutes=0.5"), small)
    assert first["meta_steps"] == 3 and first["planned_meta_steps"] == 10 and first["train_cpu_time_s"] == 30.0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["history"]["val_step"] == [3]     # validated where it stopped
    again = train.main(tiny(tmp_path, *args, "run.budget_cpu_minutes=0.5", "run.resume=true"), small)
    assert again["meta_steps"] == 3                                        # a spent budget takes no step
    more = train.main(tiny(tmp_path, *args, "run.budget_cpu_minutes=1", "run.resume=true"), small)
    assert more["meta_steps"] == 6
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]["val_step"] == [3, 5, 6]


def test_kill_9_then_resume_ends_with_the_same_weights(small, tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    args = ["method.name=fomaml", "meta.batch=2", "meta.steps=8", "run.checkpoint_every=1", "eval.every=0",
            "eval.test_tasks=2", "run.threads=1"]
    repo = Path(train.__file__).resolve().parents[2]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(repo / "examples" / "omniglot_fewshot.py"), *SMALL, *args,
                             f"run.dir={killed}"], env=dict(os.environ, PYTHONPATH=str(repo)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)                          # wherever it is: mid-step or mid-checkpoint
    proc.wait()
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 8 and not (killed / "results.json").exists()
    train.main(load_config("demo", SMALL + args + [f"run.dir={killed}", "run.resume=true"]), small)
    train.main(load_config("demo", SMALL + args + [f"run.dir={tmp_path / 'straight'}"]), small)
    a, b = _final_hparams(killed), _final_hparams(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_task(small, tmp_path):
    train.main(tiny(tmp_path, "method.name=fomaml", "meta.batch=1", "meta.steps=1", "eval.every=0"), small)
    with pytest.raises(ValueError, match="'task' section differs"):
        train.main(tiny(tmp_path, "method.name=fomaml", "meta.batch=1", "meta.steps=2", "task.ways=4",
                        "run.resume=true"), small)


def test_resume_names_changed_test_settings_and_refuses_changed_training_ones(small, tmp_path):
    args = ["method.name=fomaml", "meta.batch=1", "eval.every=0"]
    train.main(tiny(tmp_path, *args, "meta.steps=1"), small)
    with pytest.warns(UserWarning, match=r"inner.test_steps: 2 -> 3"):   # how it is tested, not what is trained
        train.main(tiny(tmp_path, *args, "meta.steps=2", "inner.test_steps=3", "run.resume=true"), small)
    with pytest.raises(ValueError, match="'inner' section differs"):
        train.main(tiny(tmp_path, *args, "meta.steps=3", "inner.steps=2", "run.resume=true"), small)


def test_script_smoke_run_writes_results_and_curves(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    results = train.cli(["--config", "demo", *SMALL, "meta.steps=3", "meta.batch=2", "eval.every=2",
                         "method.name=fomaml", f"run.dir={run_dir}", "run.threads=null"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["test"]["tasks"] == 6
    assert 0 <= saved["test"]["accuracy"] <= 1 and saved["test"]["ci95"] >= 0
    assert saved["meta_steps"] == 3 and "transductive batch norm" in saved["protocol"]
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("task.ways=1", "task.ways"), ("task.queries=20", "20 drawings"), ("method.name=maml2", "method.name"),
    ("meta.batching=pmap", "meta.batching"), ("wandb.mode=cloud", "wandb.mode"), ("meta.bacth=3", "bacth"),
    ("meta.steps=many", "meta.steps"),
])
def test_invalid_config_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("demo", [override])


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="maml_5w1s"):
        load_config("mamll", [])


def test_impossible_task_fails_before_training(small, tmp_path):
    with pytest.raises(ValueError, match="val split.*lower task.ways"):
        train.build(tiny(tmp_path, "task.ways=20", "data.num_val=5"), small)


def test_every_shipped_config_loads():
    names = sorted(p.stem for p in Path(train.__file__).resolve().parents[2].joinpath("configs", "omniglot")
                   .glob("*.yaml"))
    assert len(names) == 22                  # 5 methods x 4 settings, the demo and Lake's protocol
    for name in names:
        cfg = load_config(name)
        assert cfg.run.name == name


def test_inference_adapts_to_a_known_task_from_pngs(small, tmp_path):
    torch.manual_seed(0)
    hparams = Conv4(5).init_params()
    clf = FewShotClassifier(hparams, inner_lr=0.4, inner_steps=30)
    # A 3-way 2-shot task from 3 characters, given as 105x105 PNGs like the official files (dark strokes).
    paths, labels = [], []
    for c, name in enumerate(["alpha", "beta", "gamma"]):
        for d in range(2):
            img = Image.fromarray(255 - small.images[10 * c, d].numpy()).resize((105, 105))
            paths.append(tmp_path / f"{name}_{d}.png")
            img.save(paths[-1])
            labels.append(name)
    task = clf.adapt(paths, labels)
    assert task.classes == ["alpha", "beta", "gamma"]
    assert task.predict(paths) == labels                       # it fits its own support set
    proba = task.predict_proba(paths)
    assert proba.shape == (6, 3) and torch.allclose(proba.sum(1), torch.ones(6))
    # Tensors in the training format are accepted too and match the PNG route closely.
    tensors = load_images(paths)
    assert tensors.shape == (6, 1, 28, 28)
    assert (tensors - small.images[[0, 0, 10, 10, 20, 20], [0, 1, 0, 1, 0, 1]].float()[:, None] / 255).abs() \
        .mean() < 0.05
    with pytest.raises(ValueError, match="2 classes"):
        clf.adapt(tensors[:2], ["a", "a"])
    with pytest.raises(ValueError, match="cannot read image"):
        clf.adapt([tmp_path / "missing.png", paths[0]], ["a", "b"])


def test_inference_loads_a_training_checkpoint(small, tmp_path):
    train.main(tiny(tmp_path, "method.name=fomaml", "meta.batch=2", "meta.steps=2", "eval.every=0"), small)
    clf = FewShotClassifier.load(tmp_path / "checkpoint.pt")
    assert clf.solver.steps == 2 and clf.ways == 5
    batch = train.build(tiny(tmp_path), small).samplers["test"].sample(0, 1).task(0)
    task = clf.adapt(batch.support[:, 0], batch.support_labels.tolist())
    assert len(task.predict(batch.query)) == batch.query.shape[0]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_imaml_reference_inner_loop_is_the_authors_and_the_default_is_unchanged(small, tmp_path):
    """method.inner_loop=reference against plain autograd in float64: inner.steps CE steps from θ, one step of
    inner.lr on reg/2 ||w − θ||² alone, and the meta-gradient v of the authors' system
    (1 + coef) v + H v / (reg + lam_damping) = g, H the support CE Hessian at those weights (aravindr93/imaml_dev,
    Learner.matrix_evaluator), by a hand-written CG. The default stays the proximal loop, bit for bit."""
    lr, reg, steps, coef, lam_damping = 0.1, 2.0, 3, 1.0, 10.0
    common = ["method.name=imaml", "method.system=reference", f"inner.lr={lr}", f"inner.steps={steps}",
              f"method.reg={reg}", f"method.coef={coef}", f"method.lam_damping={lam_damping}",
              "meta.on_nonconvergence=ignore"]
    work = train.build(tiny(tmp_path, *common, "method.inner_loop=reference", "method.cg_steps=300",
                            "method.tol=1e-12"), small)
    theta = {k: v.double() for k, v in work.model.init_params().items()}
    task = work.samplers["train"].sample(0, 1).task(0)
    inner, outer = (task.support.double(), task.support_labels), (task.query.double(), task.query_labels)
    out = work.method(work.problem, theta, inner, outer)

    def ce(w, batch):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(work.model, w, (batch[0],)), batch[1])

    def step(w, loss_fn):  # one SGD step of size lr, as the authors' inner_opt
        w = {k: v.detach().requires_grad_() for k, v in w.items()}
        grads = torch.autograd.grad(loss_fn(w), list(w.values()))
        return {k: (v - lr * g).detach() for (k, v), g in zip(w.items(), grads)}

    w = dict(theta)
    for _ in range(steps):
        w = step(w, lambda w_: ce(w_, inner))
    w = step(w, lambda w_: 0.5 * reg * sum(((w_[k] - theta[k]) ** 2).sum() for k in w_))  # the pull-back
    for k in w:
        torch.testing.assert_close(out.params[k], w[k], rtol=0, atol=1e-12)

    leaves = {k: v.clone().requires_grad_() for k, v in w.items()}
    g_support = torch.autograd.grad(ce(leaves, inner), list(leaves.values()), create_graph=True)

    def matvec(v):  # the authors' matrix_evaluator
        parts, start = [], 0
        for t in leaves.values():
            parts.append(v[start:start + t.numel()].view_as(t))
            start += t.numel()
        hv = torch.autograd.grad(g_support, list(leaves.values()), grad_outputs=parts, retain_graph=True)
        return (1 + coef) * v + _flat(hv) / (reg + lam_damping)

    g = _flat(torch.autograd.grad(ce(leaves, outer), list(leaves.values())))
    x, r = torch.zeros_like(g), g.clone()
    p, rr = r.clone(), r @ r
    for _ in range(300):
        if rr <= (1e-13 * g.norm()) ** 2:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    v = _flat(out.grad[k] for k in leaves)
    assert bool(out.linear_info.converged)
    assert (matvec(v) - g).norm() <= 1e-10 * g.norm()
    torch.testing.assert_close(v, x, rtol=0, atol=1e-10 * x.abs().max().item())

    # the default (no method.inner_loop) is the proximal loop, built as before the option existed
    tasks = work.samplers["train"].sample(0, 2)
    hparams = work.model.init_params()
    grads = {}
    for name, extra in (("default", []), ("proximal", ["method.inner_loop=proximal"]),
                        ("reference", ["method.inner_loop=reference"])):
        grads[name] = train.meta_step(train.build(tiny(tmp_path, *common, *extra), small), hparams, tasks)[0]
    loss = train.cross_entropy_loss(work.model)
    before = bl.Problem(bl.proximal(loss, reg), loss, bl.GradientDescent(lr=lr, steps=steps), init=bl.meta_init)
    method = bl.imaml(reg=reg, cg_steps=5, system="reference", coef=coef, lam_damping=lam_damping)
    grads["before"] = bl.meta_grad(method, before, hparams, (tasks.support, tasks.support_labels),
                                   (tasks.query, tasks.query_labels), on_nonconvergence="ignore").grad
    for k in hparams:
        assert torch.equal(grads["default"][k], grads["proximal"][k])
        assert torch.equal(grads["default"][k], grads["before"][k])
    assert not all(torch.allclose(grads["reference"][k], grads["proximal"][k], rtol=1e-3) for k in hparams)


@pytest.mark.parametrize("override", ["method.name=neumann", "method.name=maml", "inner.solver=adam"])
def test_reference_inner_loop_is_refused_outside_sgd_imaml(override):
    with pytest.raises(ValueError, match="method.inner_loop=reference"):
        load_config("imaml_5w1s", SMALL + ["method.inner_loop=reference", override])


def test_skip_task_drops_a_non_finite_task_from_the_accuracy_as_from_the_gradient(small, tmp_path):
    work = train.build(tiny(tmp_path, "method.name=maml", "meta.on_nonfinite=skip_task", "task.queries=3"), small)
    hparams = work.model.init_params()
    tasks = work.samplers["train"].sample(0, 3)
    support = tasks.support.clone()
    support[0] = float("nan")                      # task 0 cannot be adapted
    with pytest.warns(RuntimeWarning, match="skipped 1/3 tasks"):
        grad, _, acc, out = train.meta_step(work, hparams, tasks._replace(support=support))
    assert int(out.dropped) == 1 and acc.shape == (2,) and all(torch.isfinite(g).all() for g in grad.values())
    _, _, clean, _ = train.meta_step(work, hparams, tasks)
    assert torch.equal(acc, clean[1:])             # the other two tasks' accuracies, unchanged


REPTILE = ["method.name=reptile", "inner.solver=adam", "task.queries=2"]


def test_reptile_mini_batches_are_the_references_and_the_inner_loop_is_adam_over_them(small, tmp_path):
    """openai/supervised-reptile: each inner step sees the next mini-batch of a shuffled stream of the N·K support
    examples, reshuffled when used up; Adam (beta1 0) runs on across the mini-batches of the task."""
    from torch.func import functional_call
    from tasks.omniglot.sampler import TaskSampler
    steps, size, shots, lr = 7, 3, 2, 0.001       # 21 examples from a support set of 10: 2 shuffles and 1
    cfg = tiny(tmp_path, *REPTILE, f"task.train_shots={shots}", f"inner.steps={steps}", f"inner.batch={size}",
               f"inner.lr={lr}", "inner.beta1=0")
    work = train.build(cfg, small)
    sampler = work.samplers["train"]
    tasks = sampler.sample(5, 2)
    assert tasks.support.shape == (2, steps * size, 1, 28, 28) and tasks.query.shape == (2, 5 * 2, 1, 28, 28)
    assert all(torch.equal(a, b) for a, b in zip(tasks, sampler.sample(5, 2)))      # the task's seed fixes it
    # The same tasks without mini-batches (the generator draws the order after the images).
    plain = TaskSampler(sampler.images[:, 0], range(len(sampler.images)), ways=5, shots=shots, queries=2,
                        rotation="per_task", seed=sampler.seed).sample(5, 2)
    assert torch.equal(plain.query, tasks.query)
    for t in range(2):
        flat = plain.support[t].flatten(1)
        rows = [int((flat == x.flatten()).all(1).nonzero()[0]) for x in tasks.support[t]]
        assert sorted(rows[:10]) == sorted(rows[10:20]) == list(range(10))   # each shuffle: every example once
        assert rows[:10] != rows[10:20]                      # reshuffled, not repeated
        assert torch.equal(tasks.support_labels[t], plain.support_labels[t][rows])
    # float64: the conv biases feed batch norm, so their gradient is 0 in exact arithmetic and Adam turns float32
    # rounding noise there into steps of +-lr, which differ between any two implementations.
    hparams = {k: v.double() for k, v in work.model.init_params().items()}
    tasks = tasks._replace(support=tasks.support.double(), query=tasks.query.double())
    _, _, _, out = train.meta_step(work, hparams, tasks)
    for t in range(2):                                       # plain torch: torch.optim.Adam over the mini-batches
        params = {k: v.detach().clone().requires_grad_() for k, v in hparams.items()}
        opt = torch.optim.Adam(params.values(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        for i in range(steps):
            batch = slice(i * size, (i + 1) * size)
            logits = functional_call(work.model, params, (tasks.support[t, batch],))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(logits, tasks.support_labels[t, batch]).backward()
            opt.step()
        for k in params:
            torch.testing.assert_close(out.params[k][t], params[k].detach(), rtol=0, atol=1e-6)
    # The whole support set at every step (inner.batch=null) is another trajectory.
    whole = train.build(tiny(tmp_path, *REPTILE, f"task.train_shots={shots}", f"inner.steps={steps}",
                             f"inner.lr={lr}", "inner.beta1=0"), small)
    assert whole.samplers["train"].sample(5, 2).support.shape == (2, 5 * shots, 1, 28, 28)
    adapted, _ = whole.problem.solver(whole.problem.inner_loss, dict(hparams), hparams,
                                      (plain.support[0].double(), plain.support_labels[0]))
    assert not torch.allclose(adapted["head.weight"], out.params["head.weight"][0], atol=1e-4)


def test_train_shots_apply_to_meta_training_tasks_only(small, tmp_path):
    work = train.build(tiny(tmp_path, *REPTILE, "task.train_shots=3", "task.shots=1"), small)
    assert work.samplers["train"].sample(0, 2).support.shape == (2, 5 * 3, 1, 28, 28)
    for split in ("val", "test"):
        tasks = work.samplers[split].sample(0, 2)
        assert tasks.support.shape == (2, 5, 1, 28, 28) and tasks.query.shape == (2, 10, 1, 28, 28)


@pytest.mark.parametrize("method", ["maml", "fomaml"])
def test_maml_meta_gradients_are_unchanged_by_the_reptile_keys_at_their_defaults(small, tmp_path, method):
    from tasks.omniglot.sampler import TaskSampler
    work = train.build(tiny(tmp_path, f"method.name={method}", "inner.steps=2"), small)
    sampler = work.samplers["train"]
    tasks = sampler.sample(3, 2)
    before = TaskSampler(sampler.images[:, 0], range(len(sampler.images)), ways=5, shots=1, queries=5,
                         rotation="per_task", seed=sampler.seed).sample(3, 2)   # the sampler's arguments before
    assert all(torch.equal(a, b) for a, b in zip(tasks, before))
    hparams = work.model.init_params()
    loss = train.cross_entropy_loss(work.model)
    problem = bl.Problem(loss, loss, bl.GradientDescent(lr=0.4, steps=2), init=bl.meta_init)
    reference = bl.meta_grad(bl.Unrolled() if method == "maml" else bl.FirstOrder(), problem, hparams,
                             (tasks.support, tasks.support_labels), (tasks.query, tasks.query_labels)).grad
    grad = train.meta_step(work, hparams, tasks)[0]
    assert all(torch.equal(grad[k], reference[k]) for k in hparams)


@pytest.mark.parametrize("overrides, match", [
    (["inner.batch=10"], "inner.batch=10 with method.name=maml"),
    (["task.train_shots=20"], "task.train_shots=20"),
    (["inner.beta1=0"], "inner.beta1=0.0 with inner.solver=gd"),
])
def test_reptile_keys_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("demo", SMALL + overrides)
