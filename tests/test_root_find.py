"""Forward root and fixed-point solvers: accuracy against references, vmap equals a loop, honest SolveInfo."""

import numpy as np
import pytest
import scipy.optimize
import torch
from torch.func import vmap

from bilevel.diagnostics import NonConvergenceError, NonConvergenceWarning, NonFiniteError
from bilevel.root_find import Anderson, Broyden, Newton, NewtonKrylov, Picard, check_solve, fixed_point_residual

DT = torch.float64
ALL = [Picard(steps=300, tol=1e-11), Anderson(steps=100, tol=1e-11), Newton(tol=1e-11), NewtonKrylov(tol=1e-11),
       Broyden(steps=100, tol=1e-11)]
IDS = [type(s).__name__ for s in ALL]



def tanh_layer(z, x, W):
    return torch.tanh(W @ z + x)


@pytest.fixture
def deq():
    g = torch.Generator().manual_seed(0)
    n = 8
    W = 0.8 * torch.randn(n, n, generator=g, dtype=DT) / n ** 0.5  # spectral norm < 1 for this seed: contractive
    x = torch.randn(n, generator=g, dtype=DT)
    return W, x


def picard_reference(W, x, iters=2000):
    z = torch.zeros_like(x)
    for _ in range(iters):
        z = tanh_layer(z, x, W)
    return z


@pytest.mark.parametrize("solver", ALL, ids=IDS)
def test_fixed_point_matches_long_iteration(solver, deq):
    W, x = deq
    z, info = solver(fixed_point_residual(tanh_layer), torch.zeros_like(x), x, W)
    assert bool(info.converged) and not bool(info.nonfinite)
    assert float(info.residual) <= 1e-11
    assert 0 < int(info.steps) <= solver.steps
    torch.testing.assert_close(z, picard_reference(W, x), atol=1e-10, rtol=0)


def cubic(z, c, A):
    """A coupled system that is not a contraction: z³ + A z − c = 0 (A positive definite: unique root)."""
    return z ** 3 + A @ z - c


@pytest.mark.parametrize("solver", [Newton(tol=1e-12), NewtonKrylov(tol=1e-12), Broyden(steps=200, tol=1e-12)],
                         ids=["Newton", "NewtonKrylov", "Broyden"])
def test_root_matches_scipy(solver):
    g = torch.Generator().manual_seed(1)
    n = 5
    B = torch.randn(n, n, generator=g, dtype=DT)
    A = B @ B.T / n + torch.eye(n, dtype=DT)
    c = torch.randn(n, generator=g, dtype=DT)
    reference = scipy.optimize.root(lambda z: cubic(torch.from_numpy(z), c, A).numpy(), np.zeros(n), tol=1e-14).x
    z, info = solver(cubic, torch.zeros(n, dtype=DT), c, A)
    assert bool(info.converged), info
    torch.testing.assert_close(z, torch.from_numpy(reference), atol=1e-10, rtol=0)


def test_newton_converges_quadratically_and_anderson_beats_picard(deq):
    W, x = deq
    F = fixed_point_residual(tanh_layer)
    steps = {type(s).__name__: int(s(F, torch.zeros_like(x), x, W)[1].steps) for s in ALL}
    assert steps["Newton"] <= 6
    assert steps["Anderson"] < steps["Picard"]
    assert steps["Broyden"] < steps["Picard"]


@pytest.mark.parametrize("solver", ALL, ids=IDS)
def test_vmap_equals_loop(solver, deq):
    W, _ = deq
    X = torch.randn(4, W.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT) * torch.tensor(
        [[0.1], [1.0], [2.0], [-1.0]], dtype=DT)  # different scales: different step counts per problem
    F = fixed_point_residual(tanh_layer)
    zb, ib = vmap(lambda x: solver(F, torch.zeros_like(x), x, W))(X)
    loop = [solver(F, torch.zeros_like(x), x, W) for x in X]
    torch.testing.assert_close(zb, torch.stack([z for z, _ in loop]), atol=1e-12, rtol=0)
    # the masked early stop freezes each problem at its own step count, exactly as the loop's break does
    assert ib.steps.tolist() == [int(i.steps) for _, i in loop]
    assert ib.converged.all()


def test_forced_nonconvergence_is_reported(deq):
    W, x = deq
    z, info = Picard(steps=3, tol=1e-12)(fixed_point_residual(tanh_layer), torch.zeros_like(x), x, W)
    assert int(info.steps) == 3
    assert not bool(info.converged) and not bool(info.nonfinite)
    assert float(info.residual) > 1e-12
    torch.testing.assert_close(info.residual, torch.linalg.vector_norm(z - tanh_layer(z, x, W)))


@pytest.mark.parametrize("solver", ALL, ids=IDS)
def test_nonfinite_is_reported(solver):
    z, info = solver(lambda z: z - torch.log(z - 2.0), torch.zeros(3, dtype=DT))  # log of a negative: NaN
    assert bool(info.nonfinite) and not bool(info.converged)


def test_already_converged_start_takes_no_step(deq):
    W, x = deq
    z_star = picard_reference(W, x)
    z, info = Anderson(tol=1e-8)(fixed_point_residual(tanh_layer), z_star, x, W)
    assert int(info.steps) == 0 and bool(info.converged)
    torch.testing.assert_close(z, z_star)


def test_singular_newton_reports_nonfinite():
    # F(z) = z² + 1 has a singular Jacobian at z0 = 0: the step is not finite and must be reported, not hidden
    z, info = Newton(steps=5, tol=1e-12)(lambda z: z ** 2 + 1, torch.zeros(2, dtype=DT))
    assert bool(info.nonfinite) and not bool(info.converged)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"returned shape \(6,\) but z0 has shape \(3,\)"):
        Newton()(lambda z: torch.cat([z, z]), torch.zeros(3, dtype=DT))
    with pytest.raises(TypeError, match="z0 must be a floating-point Tensor"):
        Picard()(lambda z: z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Picard\(steps=-1\)"):
        Picard(steps=-1)
    with pytest.raises(ValueError, match=r"Anderson\(memory=0\)"):
        Anderson(memory=0)
    with pytest.raises(ValueError, match=r"Newton\(jacobian='bwd'\)"):
        Newton(jacobian="bwd")
    with pytest.raises(ValueError, match=r"Picard\(mixing=0"):
        Picard(mixing=0.0)


def test_check_solve_applies_the_policy(deq):
    W, x = deq
    F = fixed_point_residual(tanh_layer)
    _, short = Picard(steps=3, tol=1e-12)(F, torch.zeros_like(x), x, W)
    with pytest.raises(NonConvergenceError, match=r"Picard: did not converge in 3 steps: residual .* > tol 1e-12"):
        check_solve(short, "Picard", 1e-12, on_nonconvergence="raise")
    with pytest.warns(NonConvergenceWarning, match="raise steps"):
        assert not check_solve(short, "Picard", 1e-12, "raise steps")
    assert not check_solve(short, "Picard", on_nonconvergence="ignore")
    _, batched = vmap(lambda x: Picard(steps=300, tol=1e-11)(F, torch.zeros_like(x), x, W))(torch.stack([x, x]))
    assert check_solve(batched, "Picard")
    _, nan = Picard()(lambda z: z - torch.log(z - 2.0), torch.zeros(3, dtype=DT))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        check_solve(nan, "Picard")
    with pytest.raises(ValueError, match="on_nonfinite='quiet'"):
        check_solve(nan, "Picard", on_nonfinite="quiet")


def test_newton_line_search_converges_where_plain_newton_overshoots():
    # arctan(z) = 0 from z0 = 1.5: each full Newton step overshoots further (|z| grows), the Armijo search does not
    z0 = torch.tensor([1.5], dtype=DT)
    z, info = Newton(steps=30, tol=1e-12, backtracks=0)(torch.atan, z0)
    assert not bool(info.converged)
    z, info = Newton(steps=30, tol=1e-12)(torch.atan, z0)
    assert bool(info.converged) and abs(float(z)) < 1e-12
    # near a root the full step passes: quadratic convergence is kept (as many steps as without the search)
    near = torch.tensor([0.3], dtype=DT)
    assert int(Newton(steps=30, tol=1e-12)(torch.atan, near)[1].steps) == \
        int(Newton(steps=30, tol=1e-12, backtracks=0)(torch.atan, near)[1].steps)
    # one step size per problem under vmap, and the trials stop once every problem has accepted one
    zs, infos = vmap(lambda z0: Newton(steps=30, tol=1e-12)(torch.atan, z0))(torch.tensor([[1.5], [0.1], [10.0]],
                                                                                           dtype=DT))
    assert bool(infos.converged.all()) and float(zs.abs().max()) < 1e-12
