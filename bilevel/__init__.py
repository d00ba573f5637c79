"""bilevel: meta-learning and bilevel hyperparameter optimisation on torch.func.

The whole public surface is listed in ``__all__``. A bilevel problem is two functions
``inner_loss(params, hparams, batch)`` and ``outer_loss(params, hparams, batch)``, an inner solver, and a
hypergradient method that says how ``d outer_loss(w*(λ), λ) / dλ`` is obtained.
"""

from . import layers, root_find
from .conditions import Condition, fixed_point, stationarity
from .diagnostics import NonConvergenceError, NonConvergenceWarning, NonFiniteError, check
from .methods import (IMAML_SOLVERS, METHODS, FirstOrder, Forward, Implicit, IMAMLSystem, Problem, Reptile,
                      Unrolled, imaml, jfb, neumann)
from .implicit import root_vjp
from .inner import Adam, GradientDescent, InnerSolver, meta_init, proximal
from .linear_solve import (CG, GMRES, MINRES, Dense, LinearOperator, NormalCG, Neumann, TruncatedCG,
                           fixed_point_iteration)
from .meta import hypergrad, meta_grad
from .root_find import Anderson, Broyden, Newton, NewtonKrylov, Picard, check_solve, fixed_point_residual
from .testing import check_hypergrad
from .types import Batch, HParams, Hypergrad, LossFn, Params, SolveInfo, default_tol

__all__ = [
    # types
    "Params", "HParams", "Batch", "LossFn", "SolveInfo", "Hypergrad", "default_tol",
    # inner solvers
    "InnerSolver", "GradientDescent", "Adam", "proximal", "meta_init",
    # the problem and how to differentiate it
    "Problem", "Unrolled", "Forward", "FirstOrder", "Reptile", "Implicit", "imaml", "IMAMLSystem", "IMAML_SOLVERS",
    "neumann", "jfb", "METHODS",
    # the implicit core
    "Condition", "stationarity", "fixed_point", "root_vjp",
    "LinearOperator", "CG", "TruncatedCG", "MINRES", "NormalCG", "GMRES", "Neumann", "fixed_point_iteration",
    "Dense",
    # forward solvers for roots and fixed points; implicit layers live in bilevel.layers (fixed_point, root, argmin)
    "Picard", "Anderson", "Newton", "NewtonKrylov", "Broyden", "check_solve", "fixed_point_residual",
    "layers", "root_find",
    # entry points and diagnostics
    "hypergrad", "meta_grad", "check", "check_hypergrad",
    "NonConvergenceError", "NonConvergenceWarning", "NonFiniteError",
]

__version__ = "0.1.0"
