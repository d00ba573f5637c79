"""A QP layer: sparsemax as a projection, a constraint set learned from projected points, and a timing against
cvxpylayers.

    python examples/qp_layer.py
    python examples/qp_layer.py steps=500 timing_batch=128

1. **Sparsemax** (Martins & Astudillo 2016, https://arxiv.org/abs/1602.02068): ``sparsemax(x) = argmin_z
   ||z − x||² s.t. z ≥ 0, 1ᵀz = 1``, a QP with ``Q = 2I, q = −2x, G = −I, h = 0, A = 1ᵀ, b = 1``. Its value and
   Jacobian are compared in float64 with the closed form (a threshold τ: ``z = max(x − τ, 0)``; Jacobian
   ``diag(s) − s sᵀ / |s|`` on the support ``s``).
2. **Learning a constraint set**: points ``x`` in the plane are projected onto an unknown polygon ``{z: G*z ≤ h*}``
   (``m`` sides); the layer ``z(x; G, h) = argmin ||z − x||² s.t. Gz ≤ h`` learns ``G, h`` from the pairs
   ``(x, proj(x))`` by Adam on the squared error, every step one batched QP solve and its KKT backward.
3. **Timing**: forward + backward of a batch of random feasible QPs (``timing_n`` unknowns, ``timing_m``
   inequalities, ``timing_p`` equalities), ours and cvxpylayers' (``diffcp``) on the same problems, interleaved in
   one process over ``timing_repeats`` rounds, CPU time (``time.process_time``), with the largest difference of
   their solutions and gradients.

Keys (``key=value``, unknown keys are errors): see ``Config``. Writes ``<out_dir>/results.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bilevel.layers import qp  # noqa: E402
from tasks import config  # noqa: E402
from tasks.run_folder import ResultsFolder  # noqa: E402

DT = torch.float64


@dataclass
class Config:
    steps: int = 300  # Adam steps learning the polygon
    batch: int = 64  # points per step
    sides: int = 5  # m, sides of the true polygon (and of the learned one)
    lr: float = 0.05
    timing_batch: int = 64  # QPs per timed call
    timing_n: int = 10
    timing_m: int = 20
    timing_p: int = 2
    timing_repeats: int = 5
    threads: int = 1
    seed: int = 0
    out_dir: str = "runs/layers/qp_layer"
    overwrite: bool = False  # replace the results of an earlier run in out_dir (also: --overwrite)


def sparsemax_qp(x):
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype)
    return qp(2 * eye, -2 * x, -eye, torch.zeros(n, dtype=x.dtype), torch.ones(1, n, dtype=x.dtype),
              torch.ones(1, dtype=x.dtype))


def sparsemax_closed_form(x):
    """Martins & Astudillo's algorithm: sort, find the support size k, threshold τ."""
    z, _ = torch.sort(x, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    cumulative = z.cumsum(-1)
    support = 1 + k * z > cumulative
    size = support.sum()
    tau = (cumulative[size - 1] - 1) / size
    return torch.clamp(x - tau, min=0)


def sparsemax_check(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(8, generator=g, dtype=DT)).requires_grad_()  # scaled for a support of several entries
    z, ref = sparsemax_qp(x), sparsemax_closed_form(x)
    jac = torch.stack([torch.autograd.grad(z[i], x, retain_graph=True)[0] for i in range(8)])
    s = (ref > 0).to(DT)
    jac_ref = torch.diag(s) - torch.outer(s, s) / s.sum()
    return dict(support=int(s.sum()), value_max_abs_err=float((z - ref).detach().abs().max()),
                jacobian_max_abs_err=float((jac - jac_ref).abs().max()))


def polygon(m: int):
    angles = torch.arange(m, dtype=DT) * 2 * torch.pi / m + 0.3
    return torch.stack([angles.cos(), angles.sin()], -1), torch.ones(m, dtype=DT)  # G*, h*: unit-distance sides


def learn_constraints(cfg: Config, g: torch.Generator) -> dict:
    G_true, h_true = polygon(cfg.sides)
    eye = torch.eye(2, dtype=DT)
    project = lambda x, G, h: qp(eye, -x, G, h)  # noqa: E731  argmin ½||z||² − xᵀz = projection of x
    # each side is a unit normal at an angle and an offset (G = [cos θ, sin θ], h): (G, h) and (cG, ch) are the
    # same set, and the angle form leaves that scale out of the learning; the start is rotated by 0.5 rad
    theta = (torch.arange(cfg.sides, dtype=DT) * 2 * torch.pi / cfg.sides + 0.8).requires_grad_()
    offset = (0.5 * torch.ones(cfg.sides, dtype=DT)).requires_grad_()
    sides = lambda: (torch.stack([theta.cos(), theta.sin()], -1), offset)  # noqa: E731
    opt = torch.optim.Adam([theta, offset], lr=cfg.lr)
    test_x = 2.5 * torch.randn(512, 2, generator=g, dtype=DT)
    with torch.no_grad():
        test_y = project(test_x, G_true, h_true)
    errors = []
    t0 = time.process_time()
    for step in range(cfg.steps + 1):
        if step % max(1, cfg.steps // 5) == 0 or step == cfg.steps:
            with torch.no_grad():
                test_mse = float(((project(test_x, *sides()) - test_y) ** 2).sum(-1).mean())
                errors.append(dict(step=step, test_mse=test_mse))
            print(json.dumps(errors[-1]))
        if step == cfg.steps:
            break
        x = 2.5 * torch.randn(cfg.batch, 2, generator=g, dtype=DT)
        with torch.no_grad():
            y = project(x, G_true, h_true)
        loss = ((project(x, *sides()) - y) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dict(history=errors, cpu_seconds=time.process_time() - t0)


def random_feasible(batch, n, m, p, g):
    L = torch.randn(batch, n, n, generator=g, dtype=DT)
    q = torch.randn(batch, n, generator=g, dtype=DT)
    G = torch.randn(batch, m, n, generator=g, dtype=DT)
    z0 = torch.randn(batch, n, 1, generator=g, dtype=DT)
    h = (G @ z0).squeeze(-1) + torch.rand(batch, m, generator=g, dtype=DT)
    A = torch.randn(batch, p, n, generator=g, dtype=DT)
    b = (A @ z0).squeeze(-1)
    return [x.requires_grad_() for x in (L, q, G, h, A, b)]


def timing(cfg: Config, g: torch.Generator) -> dict:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    n, m, p = cfg.timing_n, cfg.timing_m, cfg.timing_p
    params = [cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((p, n)),
              cp.Parameter(p)]
    x = cp.Variable(n)
    # Q = LᵀL + 0.1 I through L: DPP, as cvxpylayers requires
    objective = 0.5 * cp.sum_squares(params[0] @ x) + 0.05 * cp.sum_squares(x) + params[1] @ x
    problem = cp.Problem(cp.Minimize(objective), [params[2] @ x <= params[3], params[4] @ x == params[5]])
    layer = CvxpyLayer(problem, parameters=params, variables=[x])
    eye = 0.1 * torch.eye(n, dtype=DT)

    def ours(L, q, G, h, A, b):
        return qp(L.transpose(-1, -2) @ L + eye, q, G, h, A, b)

    def theirs(*data):
        return layer(*data, solver_args={"eps": 1e-10})[0]

    cpu = {"bilevel": [], "cvxpylayers": []}
    worst_z = worst_g = 0.0
    diffs, fd_err = [], {}
    for _ in range(cfg.timing_repeats):
        data = random_feasible(cfg.timing_batch, n, m, p, g)
        w = torch.randn(cfg.timing_batch, n, generator=g, dtype=DT)
        results = {}
        for name, fn in (("bilevel", ours), ("cvxpylayers", theirs)):  # interleaved: same load on both
            t0 = time.process_time()
            z = fn(*data)
            grads = torch.autograd.grad((z * w).sum(), data)
            cpu[name].append(time.process_time() - t0)
            results[name] = (z.detach(), grads)
        worst_z = max(worst_z, float((results["bilevel"][0] - results["cvxpylayers"][0]).abs().max()))
        # per problem, the largest gradient difference over all inputs; where the two disagree, central finite
        # differences in h decide which is right
        diff = torch.stack([(a - c).abs().flatten(1).amax(1) for a, c in zip(results["bilevel"][1],
                                                                              results["cvxpylayers"][1])]).amax(0)
        i = int(diff.argmax())
        if float(diff[i]) > worst_g:
            worst_g = float(diff[i])
            L, q, G, h, A, b = (x[i].detach() for x in data)
            value = lambda h: float(ours(L, q, G, h, A, b) @ w[i])  # noqa: E731
            fd = torch.tensor([(value(h + 1e-6 * e) - value(h - 1e-6 * e)) / 2e-6 for e in torch.eye(m, dtype=DT)],
                              dtype=DT)
            fd_err = {name: float((results[name][1][3][i] - fd).abs().max()) for name in results}
        diffs.extend(diff.tolist())
    median = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    return dict(cpu_seconds_median=median, ratio_cvxpylayers_over_bilevel=median["cvxpylayers"] / median["bilevel"],
                solution_max_abs_diff=worst_z, grad_max_abs_diff=worst_g,
                grad_abs_diff_median=sorted(diffs)[len(diffs) // 2],
                worst_problem_dh_error_vs_finite_differences=fd_err,
                shape=dict(batch=cfg.timing_batch, n=n, m=m, p=p))


def run(cfg: Config) -> dict:
    import warnings

    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    folder = ResultsFolder(cfg.out_dir, cfg.overwrite)  # before any work: an earlier run's results are kept
    results = dict(config=asdict(cfg), sparsemax=sparsemax_check(cfg.seed))
    print("sparsemax vs closed form (float64):", json.dumps(results["sparsemax"]))
    results["constraint_set"] = learn_constraints(cfg, g)
    with warnings.catch_warnings():  # cvxpylayers 1.2 on numpy 2 warns about __array__ on every call
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        results["timing"] = timing(cfg, g)
    print("timing:", json.dumps(results["timing"]))
    folder.save(results)
    return results


def main(argv):
    config.run_from_argv(run, Config, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
