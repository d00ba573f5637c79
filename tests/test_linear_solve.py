"""Every linear solver against torch.linalg.solve, on SPD, indefinite and non-symmetric systems."""

import pytest
import torch

import bilevel as bl
from bilevel import tree

f64 = torch.float64


def operator(matrix, symmetric):
    as_tree = lambda x: {"a": x[:3], "b": x[3:].reshape(2, 2)}  # noqa: E731 - a two-tensor tree
    mv = lambda v: as_tree(matrix @ tree.flatten(v))  # noqa: E731
    rmv = lambda v: as_tree(matrix.T @ tree.flatten(v))  # noqa: E731
    return bl.LinearOperator(mv, rmv, symmetric), as_tree


def spd(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=f64)
    return m @ m.T + n * torch.eye(n, dtype=f64)


def nonsymmetric(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n, dtype=f64) * 3 + 0.5 * torch.randn(n, n, generator=g, dtype=f64)


@pytest.mark.parametrize("solver, kind", [
    (bl.CG(steps=7), "spd"), (bl.CG(steps=30, damping=0.5), "spd"),
    (bl.GMRES(steps=7), "spd"), (bl.GMRES(steps=7), "nonsym"),
    (bl.NormalCG(steps=30), "nonsym"), (bl.Dense(), "nonsym"), (bl.Dense(damping=0.5), "spd"),
    (bl.Neumann(steps=400, alpha=0.05, tol=1e-12), "spd"),
])
def test_solvers_match_dense_solve(solver, kind):
    matrix = spd() if kind == "spd" else nonsymmetric()
    op, as_tree = operator(matrix, symmetric=kind == "spd")
    b = torch.randn(7, dtype=f64)
    damping = getattr(solver, "damping", 0.0)
    expected = torch.linalg.solve(matrix + damping * torch.eye(7, dtype=f64), b)
    x, info = solver(op, as_tree(b))
    assert torch.allclose(tree.flatten(x), expected, rtol=1e-8, atol=1e-10)
    assert bool(info.converged) and not bool(info.nonfinite)
    assert x["b"].shape == (2, 2) and x["a"].dtype == f64


def test_neumann_partial_sums_and_jfb():
    matrix = spd()
    op, as_tree = operator(matrix, True)
    b, alpha = torch.randn(7, dtype=f64), 0.02
    m = torch.eye(7, dtype=f64) - alpha * matrix
    for k in (0, 1, 5):
        expected = alpha * sum(torch.linalg.matrix_power(m, j) @ b for j in range(k + 1))
        x, info = bl.Neumann(steps=k, alpha=alpha)(op, as_tree(b))
        assert torch.allclose(tree.flatten(x), expected, rtol=1e-12)
        assert int(info.steps) == k


def test_neumann_diverges_when_alpha_too_large_and_says_so():
    matrix = spd()
    op, as_tree = operator(matrix, True)
    lmax = torch.linalg.eigvalsh(matrix).max().item()
    _, info = bl.Neumann(steps=50, alpha=2.5 / lmax, tol=1e-8)(op, as_tree(torch.randn(7, dtype=f64)))
    assert not bool(info.converged) and float(info.residual) > 1


def test_cg_flags_indefinite_systems_and_damping_fixes_them():
    eig = torch.tensor([-2.0, 1, 2, 3, 4, 5, 6], dtype=f64)
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=f64))
    matrix = q @ torch.diag(eig) @ q.T
    op, as_tree = operator(matrix, True)
    b = as_tree(torch.randn(7, dtype=f64))
    _, info = bl.CG(steps=5)(op, b)
    assert bool(info.indefinite) and not bool(info.converged)
    _, info = bl.CG(steps=7, damping=3.0)(op, b)
    assert not bool(info.indefinite) and bool(info.converged)


def test_cg_refuses_non_symmetric_operators():
    op, as_tree = operator(nonsymmetric(), symmetric=False)
    with pytest.raises(ValueError, match="not symmetric.*GMRES"):
        bl.CG()(op, as_tree(torch.ones(7, dtype=f64)))


def test_forced_nonconvergence_is_reported():
    op, as_tree = operator(spd(), True)
    x, info = bl.CG(steps=2)(op, as_tree(torch.randn(7, dtype=f64)))
    assert not bool(info.converged) and int(info.steps) == 2 and float(info.residual) > 1e-6


def test_zero_rhs_and_vmap():
    op, as_tree = operator(spd(), True)
    x, info = bl.CG()(op, as_tree(torch.zeros(7, dtype=f64)))
    assert float(tree.norm(x)) == 0 and bool(info.converged)
    matrices = torch.stack([spd(seed=s) for s in range(3)])
    bs = torch.randn(3, 7, dtype=f64)

    def solve(matrix, b):
        op_, as_tree_ = operator(matrix, True)
        x_, info_ = bl.CG(steps=7)(op_, as_tree_(b))
        return tree.flatten(x_), info_.steps

    xs, steps = torch.func.vmap(solve)(matrices, bs)
    assert torch.allclose(xs, torch.linalg.solve(matrices, bs), rtol=1e-8)
    assert steps.shape == (3,)


@pytest.mark.parametrize("bad", [lambda: bl.CG(steps=-1), lambda: bl.CG(tol=-1.0), lambda: bl.CG(damping=-0.1),
                                 lambda: bl.Neumann(alpha=0.0), lambda: bl.GMRES(steps=2.5)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="must be"):
        bad()


def test_gmres_with_more_steps_than_unknowns_stays_exact():
    """After n steps the Krylov space is the whole space; later steps must not add round-off directions."""
    for seed in range(5):
        matrix = nonsymmetric(seed=seed)
        op, as_tree = operator(matrix, symmetric=False)
        b = torch.randn(7, dtype=f64)
        x, info = bl.GMRES(steps=12)(op, as_tree(b))
        assert torch.allclose(tree.flatten(x), torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)
        assert bool(info.converged)
    x, info = bl.GMRES(steps=30, tol=1e-12)(op, as_tree(b))  # a much larger budget, still exact
    assert bool(info.converged)
