"""Inner solvers: the same trajectories as torch.optim, a masked early stop that stays vmap-safe."""

import pytest
import torch

import bilevel as bl

from problems import f64, ridge_data, ridge_inner

TRAIN, _ = ridge_data()
H = {"log_l2": torch.tensor(-1.0, dtype=f64)}


@pytest.mark.parametrize("solver, make_optim", [
    (bl.GradientDescent(lr=0.1, steps=15), lambda p: torch.optim.SGD(p, lr=0.1)),
    (bl.GradientDescent(lr=0.1, steps=15, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (bl.GradientDescent(lr=0.1, steps=15, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    (bl.Adam(lr=0.05, steps=15), lambda p: torch.optim.Adam(p, lr=0.05)),
])
def test_trajectory_matches_torch_optim(solver, make_optim):
    w = torch.zeros(5, dtype=f64, requires_grad=True)
    opt = make_optim([w])
    for _ in range(solver.steps):
        opt.zero_grad()
        ridge_inner({"w": w}, H, TRAIN).backward()
        opt.step()
    params, info = solver(ridge_inner, {"w": torch.zeros(5, dtype=f64)}, H, TRAIN)
    assert torch.allclose(params["w"], w.detach(), rtol=1e-12, atol=1e-14)
    assert int(info.steps) == solver.steps and not bool(info.nonfinite)


def test_masked_early_stop_freezes_converged_tasks_under_vmap():
    solver = bl.GradientDescent(lr=0.5, steps=400, tol=1e-8)
    scales = torch.tensor([1.0, 4.0, 0.0], dtype=f64)  # the last task starts at its solution

    def solve(s):
        loss = lambda w, h, b: 0.5 * (s * (w["x"] - 1)) ** 2  # noqa: E731 - curvature s², converges at different speeds
        return solver(loss, {"x": torch.zeros((), dtype=f64)}, {}, None)

    params, info = torch.func.vmap(solve)(scales)
    assert info.converged.tolist() == [True, False, True]  # s=4: lr·s² = 8 > 2, diverges
    assert info.steps[0] < 400 and info.steps[2] == 0
    assert float(info.residual[0]) <= 1e-8
    assert bool(info.nonfinite[1]) and not bool(info.nonfinite[0])


def test_proximal_pulls_toward_hparams():
    loss = bl.proximal(lambda w, h, b: 0.0 * w["x"].sum(), reg=3.0)
    params, info = bl.GradientDescent(lr=0.2, steps=200, tol=1e-12)(loss, {"x": torch.zeros(3, dtype=f64)},
                                                                      {"x": torch.ones(3, dtype=f64)}, None)
    assert torch.allclose(params["x"], torch.ones(3, dtype=f64)) and bool(info.converged)
    with pytest.raises(ValueError, match="reg must be > 0"):
        bl.proximal(loss, reg=-1.0)


def test_default_tolerance_is_judged_at_the_end_relative_to_the_start():
    loss = lambda w, h, b: 0.5 * ((w["x"] - 3.0) ** 2).sum()  # noqa: E731 - gradient norm 3·sqrt(2) at 0
    w0 = {"x": torch.zeros(2, dtype=f64)}
    _, short = bl.GradientDescent(lr=0.5, steps=2)(loss, w0, {}, None)
    _, long = bl.GradientDescent(lr=0.5, steps=40)(loss, w0, {}, None)
    assert float(short.scale) == pytest.approx(3 * 2 ** 0.5) and int(short.steps) == 2
    assert not bool(short.converged) and bool(long.converged) and int(long.steps) == 40  # no early stop
    assert float(long.residual) <= bl.default_tol(f64) * float(long.scale)
    # float32: the same solve is converged at float32's default, which float64's would refuse
    _, long32 = bl.GradientDescent(lr=0.5, steps=14)(loss, {"x": torch.zeros(2)}, {}, None)
    assert bool(long32.converged) and float(long32.residual) > bl.default_tol(f64) * float(long32.scale)


def test_rtol_stops_early_relative_to_the_start_and_resuming_keeps_the_scale():
    loss = lambda w, h, b: 0.5 * (b * (w["x"] - 1.0) ** 2).sum()  # noqa: E731
    solver = bl.GradientDescent(lr=0.1, steps=400, rtol=1e-3)
    batch = torch.tensor([10.0, 1.0], dtype=f64)
    _, info = solver(loss, {"x": torch.zeros(2, dtype=f64)}, {}, batch)
    assert bool(info.converged) and int(info.steps) < 400
    assert float(info.residual) <= 1e-3 * float(info.scale)
    head_params, state, head = solver.run(loss, {"x": torch.zeros(2, dtype=f64)}, {}, batch, steps=3)
    _, _, tail = solver.run(loss, head_params, {}, batch, steps=397, state=state, info=head)
    assert float(tail.scale) == float(info.scale) and int(tail.steps) == int(info.steps)


def test_a_converged_solve_stops_at_once_on_the_cpu():
    # the early stop is read on the host every step on the CPU (every 8 elsewhere): no gradient is evaluated after
    # the one that showed convergence
    calls = {"n": 0}

    def loss(w, h, b):
        calls["n"] += 1
        return 0.5 * ((w["x"] - 1.0) ** 2).sum()

    params, info = bl.GradientDescent(lr=0.5, steps=400, tol=1e-8)(loss, {"x": torch.zeros(3, dtype=f64)}, {}, None)
    assert bool(info.converged) and 20 <= int(info.steps) < 40
    assert calls["n"] == int(info.steps) + 1
