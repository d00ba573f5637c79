"""Tune weight decay: hypergradient descent on log λ, and the grid / random search baselines.

Every method uses the same inner solver on the same splits and is charged with the same counters: inner solves,
inner iterations (gradient evaluations), Hessian-vector products of adjoint solves, and wall time.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

import bilevel as bl

from .problems import WeightDecayTask, curvature, init_hparams

# Inner iterations between two convergence checks of an unbatched solve (a check is one host sync).
CHUNK = 25


@dataclass
class Cost:
    """What a tuning method spent."""

    inner_solves: int = 0
    inner_steps: int = 0  # gradient evaluations of the inner loss that were computed
    hvps: int = 0  # Hessian-vector products of adjoint linear solves
    seconds: float = 0.0

    def as_dict(self):
        return dataclasses.asdict(self)


AUTO = "auto"  # the inner step size from the task's curvature and the current λ (see fit_step_size)


def make_solver(kind: str, lr: float | str | None, steps: int, tol: float, momentum: float = 0.9) -> bl.GradientDescent:
    """The inner solver: Nesterov gradient descent (``"gd"``) or Adam (``"adam"``).

    ``lr=None`` (or ``"auto"``, gradient descent only) sets the step size at every solve to ``1 / (L + max λ)``, with
    ``L`` the task's curvature bound (:func:`tasks.weight_decay.problems.curvature`): stable for every λ of a search
    without hand tuning.
    """
    if lr is None or lr == AUTO:
        if kind != "gd":
            raise ValueError(f"inner.lr=null (automatic) is for inner.solver=gd; set inner.lr for {kind}.")
        lr = AUTO
    if kind == "gd":
        return bl.GradientDescent(lr=lr, steps=steps, momentum=momentum, nesterov=momentum > 0, tol=tol)
    if kind == "adam":
        return bl.Adam(lr=lr, steps=steps, tol=tol)
    raise ValueError(f"inner.solver={kind!r} is not one of ['gd', 'adam'].")


def make_method(name: str, linear_steps: int = 50, linear_tol: float = 1e-8, neumann_alpha: float = 0.5,
                truncate: Optional[int] = None, max_hparams: int = 64):
    """A hypergradient method by config name. First-order methods are refused: they are identically zero here."""
    name = name.lower()
    if name in ("first_order", "firstorder", "fomaml", "reptile"):
        raise ValueError(
            f"method {name!r} is first-order: it drops dw*/dλ, and the validation loss has no direct λ term, so its "
            f"weight-decay hypergradient is identically zero. Use 'implicit', 'neumann', 'unrolled' or 'forward'."
        )
    if name == "implicit":
        return bl.Implicit(bl.CG(steps=linear_steps, tol=linear_tol))
    if name == "neumann":
        return bl.neumann(steps=linear_steps, alpha=neumann_alpha)
    if name == "jfb":
        return bl.jfb(alpha=neumann_alpha)
    if name == "unrolled":
        return bl.Unrolled(truncate=truncate)
    if name == "forward":
        return bl.Forward(max_hparams=max_hparams)
    raise ValueError(f"Unknown method {name!r}: choose one of ['implicit', 'neumann', 'jfb', 'unrolled', 'forward'].")


def fit_step_size(task: WeightDecayTask, solver, hparams):
    """``solver`` with its automatic step size (``lr="auto"``) set to ``1 / (L + max λ)`` for these ``hparams``.

    The inner loss's Hessian is bounded by ``L + max λ`` (data term plus penalty), so gradient descent with this step
    is stable (with Nesterov momentum too) at any λ. Solvers with a fixed step size are returned unchanged.
    """
    if getattr(solver, "lr", None) != AUTO:
        return solver
    L = curvature(task)
    if L is None:
        raise ValueError(f"{task.name}: no curvature bound for model {task.model!r}; set inner.lr.")
    top = max(float(torch.exp(v.detach()).max()) for v in hparams.values())
    return dataclasses.replace(solver, lr=1.0 / (L + top))


def solve_inner(task: WeightDecayTask, solver, hparams, params0, cost: Optional[Cost] = None):
    """Run ``solver`` on the training loss from ``params0`` until ``||∇ inner_loss|| <= solver.tol`` or the budget
    ``solver.steps`` is spent. Unbatched, so it may stop early in Python (checks every ``CHUNK`` iterations) and
    save the compute that the fixed-budget, vmap-safe loop would spend on masked iterations.

    Returns:
        ``(params, info)`` with ``info.steps`` the iterations actually taken.
    """
    solver = fit_step_size(task, solver, hparams)
    params, state, info = params0, None, None
    with torch.no_grad():
        while info is None or (not bool(info.converged) and int(info.steps) < solver.steps):
            steps = min(CHUNK, solver.steps - (0 if info is None else int(info.steps)))
            params, state, info = solver.run(task.inner_loss, params, hparams, task.train, steps=steps,
                                             state=state, info=info)
            if not bool(torch.isfinite(info.residual)):
                break
    if cost is not None:
        cost.inner_solves += 1
        cost.inner_steps += int(info.steps)
    return params, info


def evaluate(task: WeightDecayTask, params) -> dict:
    """Validation and test loss (and accuracy for classifiers) at ``params``."""
    with torch.no_grad():
        out = {"val_loss": float(task.data_loss(params, task.val)),
               "test_loss": float(task.data_loss(params, task.test))}
        if task.model != "ridge":
            out["val_acc"] = float(task.accuracy(params, task.val))
            out["test_acc"] = float(task.accuracy(params, task.test))
    return out


def log_wd_summary(hparams) -> dict:
    """Weight decay λ statistics: the value itself for a scalar, quantiles for many."""
    flat = torch.cat([v.detach().reshape(-1) for v in hparams.values()])
    if flat.numel() == 1:
        return {"wd": float(torch.exp(flat[0]))}
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], dtype=flat.dtype, device=flat.device))
    return {"wd_p10": float(torch.exp(q[0])), "wd_median": float(torch.exp(q[1])), "wd_p90": float(torch.exp(q[2])),
            "wd_geomean": float(torch.exp(flat.mean()))}


@dataclass
class TuneResult:
    """Outcome of hypergradient tuning: the history, the chosen hparams (best validation loss seen), and the cost."""

    history: list = field(default_factory=list)
    hparams: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    nonconverged_steps: int = 0
    refit: Optional[dict] = None  # MLP: retrained from the initialisation at the chosen hparams


def hypergradient_descent(
    task: WeightDecayTask,
    method_name: str,
    solver,
    init_wd: float,
    steps: int,
    lr: float = 0.5,
    max_log_step: float = 1.0,
    method_kwargs: Optional[dict] = None,
    hoag: bool = True,
    hoag_tol0: float = 1e-3,
    hoag_decay: float = 0.5,
    warm_start: bool = True,
    on_step: Optional[Callable[[int, dict], None]] = None,
    progress: bool = False,
) -> TuneResult:
    """Adam on log λ driven by hypergradients, with two safeguards and optional HOAG inexact inner solves.

    Safeguards against overshooting: every log λ entry moves at most ``max_log_step`` per outer step, and the step
    size is halved whenever the validation loss goes up. With ``hoag=True`` the inner tolerance starts at
    ``hoag_tol0`` and shrinks by ``hoag_decay`` per outer step down to ``solver.tol`` (Pedregosa, 2016,
    https://arxiv.org/abs/1602.02355). The chosen hparams are those with the lowest validation loss seen; they get
    one final solve at the tight tolerance ``solver.tol``, whose validation and test losses are reported.

    Implicit methods (implicit, neumann, jfb) solve the inner problem with :func:`solve_inner` (real early exit)
    and then take the hypergradient at that solution; unrolled and forward mode differentiate the solver's own run
    from the warm start, so they pay for its full budget.
    """
    from tqdm.auto import tqdm

    method = make_method(method_name, **(method_kwargs or {}))
    implicit = isinstance(method, bl.Implicit)
    hparams = init_hparams(task, init_wd)
    params = dict(task.params0)
    result = TuneResult()
    cost = result.cost
    m = {k: torch.zeros_like(v) for k, v in hparams.items()}
    v = {k: torch.zeros_like(v) for k, v in hparams.items()}
    b1, b2 = 0.9, 0.999
    best_val, prev_val, step_size = math.inf, math.inf, lr
    start = time.perf_counter()
    for k in tqdm(range(steps), desc=f"{method_name} {task.name}", disable=not progress):
        tol = max(solver.tol, hoag_tol0 * hoag_decay ** k) if hoag else solver.tol
        solver_k = dataclasses.replace(solver, tol=tol)
        params0 = params if warm_start else dict(task.params0)
        presolve_steps = 0
        if implicit:
            params0, info = solve_inner(task, solver_k, hparams, params0, cost)
            presolve_steps = int(info.steps)
            # The solution is already there: one iteration confirms it (converged, so the update is masked).
            solver_k = dataclasses.replace(solver_k, steps=1)
        problem = bl.Problem(task.inner_loss, task.outer_loss, fit_step_size(task, solver_k, hparams), init=None)
        out = bl.hypergrad(method, problem, hparams, task.train, task.val, params0=params0,
                           on_nonconvergence="ignore", on_nonfinite="raise")
        if not implicit:
            cost.inner_solves += 1
        # Unrolled and forward mode compute the solver's whole budget: converged iterations are masked, not skipped.
        cost.inner_steps += int(out.inner_info.steps) if implicit else solver_k.steps
        cost.hvps += int(out.linear_info.steps) if out.linear_info is not None else 0
        converged = bool(out.inner_info.converged)
        result.nonconverged_steps += not converged
        params = out.params
        val = float(out.outer_loss)
        record = {"step": k, "inner_tol": tol, "inner_steps": presolve_steps + int(out.inner_info.steps),
                  "inner_residual": float(out.inner_info.residual), "inner_converged": converged,
                  "linear_residual": None if out.linear_info is None else float(out.linear_info.residual),
                  **evaluate(task, params), **log_wd_summary(hparams), "step_size": step_size,
                  "inner_solves": cost.inner_solves, "seconds": time.perf_counter() - start}
        result.history.append(record)
        if on_step is not None:
            on_step(k, record)
        if val < best_val:
            best_val, result.hparams = val, {n: t.clone() for n, t in hparams.items()}
            result.params = params
        if val > prev_val:
            step_size *= 0.5
        prev_val = val
        # Adam on log λ, each entry's move capped at max_log_step.
        with torch.no_grad():
            for n, g in out.grad.items():
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                update = step_size * (m[n] / (1 - b1 ** (k + 1))) / (torch.sqrt(v[n] / (1 - b2 ** (k + 1))) + 1e-12)
                hparams[n] = hparams[n] - update.clamp(-max_log_step, max_log_step)
    if result.nonconverged_steps:
        warnings.warn(
            f"{task.name}: {result.nonconverged_steps} of {steps} inner solves stopped at the step budget before "
            f"reaching their tolerance; raise inner.steps or inner.lr (see inner_residual in the history).",
            RuntimeWarning, stacklevel=2)
    # Final solve at the chosen λ with the tight tolerance (counted like any other).
    params, info = solve_inner(task, solver, result.hparams, result.params, cost)
    result.params = params
    result.final = {**evaluate(task, params), **log_wd_summary(result.hparams),
                    "inner_converged": bool(info.converged), "inner_residual": float(info.residual)}
    if task.model == "mlp" and warm_start:
        # Warm starts keep training the same network across outer steps, so the MLP has seen many more inner steps
        # than one grid solve: retraining from the initialisation at the chosen λ separates the effect of λ.
        params, info = solve_inner(task, solver, result.hparams, dict(task.params0), cost)
        result.refit = {**evaluate(task, params), "inner_converged": bool(info.converged)}
    cost.seconds = time.perf_counter() - start
    return result


def search(task: WeightDecayTask, solver, values, warm_start: bool = True, progress: bool = False, desc="grid"):
    """Evaluate scalar weight decays ``values`` with the same inner solver (full tolerance).

    Convex problems (ridge, logreg) visit the values from strongest to weakest decay, each solve warm-started at
    the previous solution (continuation; the solution is unique, so only the cost changes). The MLP restarts every
    solve from the same initialisation (its solution depends on the start).

    Returns:
        ``(points, cost)``: a list of dicts (wd, val/test losses, convergence) in the order of ``values``, and the
        ``Cost``.
    """
    from tqdm.auto import tqdm

    cost = Cost()
    start = time.perf_counter()
    order = sorted(range(len(values)), key=lambda i: -values[i])
    points = [None] * len(values)
    params = dict(task.params0)
    for i in tqdm(order, desc=f"{desc} {task.name}", disable=not progress):
        hparams = {k: torch.full(s, math.log(values[i]), dtype=task.train[0].dtype,
                                 device=task.train[0].device)
                   for k, s in task.hparam_shapes().items()}
        params0 = params if warm_start and task.model != "mlp" else dict(task.params0)
        params, info = solve_inner(task, solver, hparams, params0, cost)
        points[i] = {"wd": float(values[i]), **evaluate(task, params), "inner_steps": int(info.steps),
                     "inner_converged": bool(info.converged)}
    cost.seconds = time.perf_counter() - start
    bad = sum(not p["inner_converged"] for p in points)
    if bad:
        warnings.warn(f"{desc} on {task.name}: {bad} of {len(points)} inner solves did not reach tol={solver.tol}.",
                      RuntimeWarning, stacklevel=2)
    return points, cost


def grid_values(low: float, high: float, n: int) -> list[float]:
    return np.logspace(math.log10(low), math.log10(high), n).tolist()


def random_values(low: float, high: float, n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(math.log(low), math.log(high), n)).tolist()


def best(points: list[dict]) -> dict:
    """The search point with the lowest validation loss."""
    return min(points, key=lambda p: p["val_loss"])


def sklearn_reference(task: WeightDecayTask, hparams) -> Optional[dict]:
    """scikit-learn at the same weight decay, as a check on our inner solver.

    Our inner loss is mean_loss + 1/2 Σ_j λ_j ||w_j||² over input features j. scikit-learn's ``Ridge`` minimises
    ||y − Xw||² + α||w||², so α = nλ; ``LogisticRegression`` minimises 1/2 ||w||² + C Σ_i CE_i, so C = 1/(nλ) for
    C > 2 classes (softmax). For two classes scikit-learn fits one weight vector d (a sigmoid) while our softmax has
    two columns w₀, w₁; only d = w₁ − w₀ enters the loss and the penalty is smallest at w₁ = −w₀ = d/2, where it is
    λ/4 ||d||², so C = 2/(nλ).
    Per-feature λ_j maps exactly by rescaling feature j by 1/sqrt(λ_j) (v_j = sqrt(λ_j) w_j) and taking λ = 1.
    Returns None where no exact mapping exists (MLP, per-parameter decay of a multi-class model).
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import log_loss

    if task.model == "mlp" or (task.decay == "parameter" and task.model == "logreg"):
        return None
    lam = torch.exp(hparams["log_wd"]).reshape(-1).double().cpu().numpy()
    X, y = (t.double().cpu().numpy() for t in task.train)
    n = X.shape[0]
    scale = 1.0 / np.sqrt(lam) if lam.size > 1 else np.ones(X.shape[1])
    lam0 = float(lam[0]) if lam.size == 1 else 1.0
    Xv, yv = (t.double().cpu().numpy() for t in task.val)
    Xt, yt = (t.double().cpu().numpy() for t in task.test)
    if task.model == "ridge":
        model = Ridge(alpha=n * lam0, fit_intercept=False, solver="cholesky").fit(X * scale, y)
        losses = [0.5 * np.mean((model.predict(A * scale) - b) ** 2) for A, b in ((Xv, yv), (Xt, yt))]
    else:
        n_classes = len(task.classes)
        C = (2.0 if n_classes == 2 else 1.0) / (n * lam0)
        model = LogisticRegression(C=C, tol=1e-10, max_iter=20_000).fit(X * scale, y)
        if len(model.classes_) != n_classes:
            return None  # a class missing from the training split: the probabilities would not line up
        labels = np.arange(n_classes)
        losses = [log_loss(b, model.predict_proba(A * scale), labels=labels) for A, b in ((Xv, yv), (Xt, yt))]
    return {"val_loss": float(losses[0]), "test_loss": float(losses[1])}
