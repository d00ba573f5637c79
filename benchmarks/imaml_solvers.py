"""The iMAML adjoint system on the Omniglot conv4 network: what each Krylov method reaches per Hessian-vector product.

    python -m benchmarks.imaml_solvers --tasks 4 --checkpoint runs/omniglot/maml_5w1s/checkpoint.pt
    python -m benchmarks.imaml_solvers --workload 32 --checkpoint runs/omniglot/maml_5w1s/checkpoint.pt

For each meta-initialisation θ (the conv4 at initialisation, and the weights of a checkpoint if given) and each of
``--tasks`` 5-way 1-shot training tasks, the proximal inner problem (λ = 2, 16 gradient steps at lr 0.1 from θ, the
iMAML Omniglot setting) is solved, and the adjoint system ``(H + λI) u = −∇L_out(w*)`` is solved by

- ``cg``, ``truncated_cg``, ``minres``, ``gmres``: the paper's system, budgets of ``--budgets`` products;
- ``cg+damp d``: CG on ``H + (λ + d) I``, a biased but better-conditioned system;
- ``reference``: the authors' system ``(2 I + H/12) v = g`` (``bl.imaml(system="reference")``).

Printed per method and budget: the median over tasks of the solver's own relative residual (of the system it
solves: the damped and reference systems are other systems), the median and worst true relative residual
``||b − A x|| / ||b||`` of the paper's system (one extra product each, not counted), the fraction of tasks where
negative curvature was met (CG: ``pᵀAp <= 0``; MINRES: a Lanczos Rayleigh quotient ``<= 0``, a weaker test), and
the cosine between the meta-gradient (the mean over tasks of ``λ·(H + λI)⁻¹ ∇L_out``) and a reference: a long
MINRES (``--reference-steps``, its worst residual printed) on conv4, and, on a small conv4 (8 channels, about
1.9k weights), a dense solve (with the extreme eigenvalues of ``H + λI`` printed: a cosine near 0 for every method
means the exact solution is dominated by a nearly singular direction no short Krylov solve finds).
Process CPU time of the whole run is printed at the end. One intra-op thread.

``--workload TASKS`` prints instead what the Omniglot workload's own meta-step (``configs/omniglot/imaml_5w1s``,
CG-5) records on TASKS tasks with each system: median and worst adjoint residual, the fractions of tasks whose
adjoint solve missed ``default_tol`` or met negative curvature, and the inner solves left unconverged.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
from torch.func import grad, vjp

import bilevel as bl
from bilevel import tree

ROOT = Path(__file__).resolve().parents[1]
REG, INNER_LR, INNER_STEPS = 2.0, 0.1, 16


def solvers(budget: int) -> dict:
    return {
        "cg": bl.CG(steps=budget, tol=0.0),
        "truncated_cg": bl.TruncatedCG(steps=budget, tol=0.0),
        "minres": bl.MINRES(steps=budget, tol=0.0),
        "gmres": bl.GMRES(steps=budget, tol=0.0),
        "cg+damp 1": bl.CG(steps=budget, tol=0.0, damping=1.0),
        "cg+damp 22": bl.CG(steps=budget, tol=0.0, damping=22.0),
        "reference": bl.IMAMLSystem(bl.CG(steps=budget, tol=0.0), REG, "reference"),
    }


def task_systems(model, theta, tasks, count):
    """Per task: the operator ``A = H + λI`` at w* (a reused VJP graph, as ``bl.root_vjp``) and ``b = −∇L_out``."""
    from tasks.omniglot.model import cross_entropy_loss

    loss = cross_entropy_loss(model)
    inner = bl.proximal(loss, REG)
    solver = bl.GradientDescent(lr=INNER_LR, steps=INNER_STEPS)
    out = []
    for i in range(count):
        support = (tasks.support[i], tasks.support_labels[i])
        query = (tasks.query[i], tasks.query_labels[i])
        with torch.no_grad():
            w, _ = solver(inner, tree.detach(theta), tree.detach(theta), support)
        _, at_mv = vjp(lambda p: grad(inner)(p, theta, support), w)
        operator = bl.LinearOperator(mv=lambda v, f=at_mv: f(v)[0], symmetric=True)
        b = tree.neg(grad(loss)(w, theta, query))
        out.append((operator, b))
    return out


def true_residual(operator, b, u) -> float:
    return float(tree.norm(tree.sub(b, operator.mv(u))) / tree.norm(b))


def cosine(a, b) -> float:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return float(fa @ fb / (fa.norm() * fb.norm()))


def meta_gradient(us):
    """The meta-gradient of the paper's system: the mean over tasks of ``−λ·u`` (``∂F/∂θ = −λI``)."""
    return tree.scale(-REG / len(us), {k: sum(u[k] for u in us) for k in us[0]})


def dense_solutions(systems, spectra):
    """Exact solutions from the materialised ``H + λI`` (float64 solve), and its spectrum's extremes per task."""
    us = []
    for operator, b in systems:
        n = tree.flatten(b).numel()
        columns = [tree.flatten(operator.mv(tree.unflatten(e, b))) for e in torch.eye(n)]
        matrix = torch.stack(columns, dim=1).double()
        eigenvalues = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        spectra.append((float(eigenvalues.min()), float(eigenvalues.abs().min()), float(eigenvalues.max())))
        us.append(tree.unflatten(torch.linalg.solve(matrix, tree.flatten(b).double()).float(), b))
    return us


def compare(label, systems, reference_us, budgets, rows):
    reference = meta_gradient(reference_us)
    for budget in budgets:
        for name, solver in solvers(budget).items():
            us, residuals, own, indefinite, steps = [], [], [], 0, 0
            for operator, b in systems:
                u, info = solver(operator, b)
                us.append(u)
                residuals.append(true_residual(operator, b, u))
                own.append(float(info.residual))
                indefinite += int(info.indefinite)
                steps += int(info.steps)
            residuals.sort()
            own.sort()
            rows.append((label, name, budget, steps / len(systems), own[len(own) // 2], residuals[len(residuals) // 2],
                         residuals[-1], indefinite / len(systems), cosine(meta_gradient(us), reference)))


def workload_summary(tasks_count: int, checkpoint, seed: int) -> None:
    """The Omniglot workload's own meta-step (``imaml_5w1s``: CG-5, float32) on ``tasks_count`` tasks, for both
    systems: the adjoint residuals and the fractions the training log records."""
    from tasks.omniglot import train
    from tasks.omniglot.config import load_config

    for system in ("paper", "reference"):
        cfg = load_config("imaml_5w1s", [f"method.system={system}", "wandb.mode=disabled", f"run.seed={seed}",
                                         "meta.on_nonconvergence=ignore"])
        work = train.build(cfg)
        thetas = [("init", work.model.init_params())]
        if checkpoint:
            state = torch.load(checkpoint, weights_only=True, map_location="cpu")   # tensors and containers only
            thetas.append((f"step {state['step']}", dict(state["hparams"])))
        for label, theta in thetas:
            cpu = time.process_time()
            _, _, _, out = train.meta_step(work, theta, work.samplers["train"].sample(0, tasks_count))
            info = out.linear_info
            print(f"| {system} | conv4 {label} | {info.residual.median():.2g} | {info.residual.max():.2g} | "
                  f"{(~info.converged).float().mean():.0%} | {info.indefinite.float().mean():.0%} | "
                  f"{(~out.inner_info.converged).float().mean():.0%} | {time.process_time() - cpu:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="a run's checkpoint.pt: its weights as a trained θ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", type=int, default=0, metavar="TASKS",
                        help="instead: the Omniglot workload's meta-step on TASKS tasks with each iMAML system")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("BILEVEL_DATA", str((ROOT / ".." / "shared" / "data").resolve()))
    from tasks.omniglot import train
    from tasks.omniglot.config import load_config
    from tasks.omniglot.model import Conv4

    cpu0 = time.process_time()
    if args.workload:
        print(f"# imaml_5w1s meta-step (CG-5, λ=2, inner GD lr 0.1 x 16, float32) on {args.workload} tasks; tol = "
              f"default_tol(float32) = {bl.default_tol(torch.float32):.2g}")
        print("| system | θ | adjoint residual, median | worst | adjoint unconverged | negative curvature | "
              "inner unconverged | CPU s |")
        print("|---|---|---|---|---|---|---|---|")
        workload_summary(args.workload, args.checkpoint, args.seed)
        print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 1 thread, "
              f"{(time.process_time() - cpu0) / 60:.1f} CPU minutes")
        return
    cfg = load_config("imaml_5w1s", ["wandb.mode=disabled", f"run.seed={args.seed}"])
    work = train.build(cfg)
    tasks = work.samplers["train"].sample(0, args.tasks)
    thetas = [("conv4 init", work.model, work.model.init_params())]
    if args.checkpoint:
        state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")   # tensors and plain containers
        thetas.append((f"conv4 step {state['step']}", work.model, dict(state["hparams"])))
    rows, ref_info = [], []
    for label, model, theta in thetas:
        systems = task_systems(model, theta, tasks, args.tasks)
        long = [bl.MINRES(steps=args.reference_steps, tol=0.0)(op, b) for op, b in systems]
        ref_info.append((label, max(true_residual(op, b, u) for (op, b), (u, _) in zip(systems, long))))
        compare(label, systems, [u for u, _ in long], args.budgets, rows)
    torch.manual_seed(args.seed)
    small = Conv4(cfg.task.ways, channels=8)
    systems = task_systems(small, small.init_params(), tasks, args.tasks)
    spectra = []
    compare("conv4-8ch init (dense ref)", systems, dense_solutions(systems, spectra), args.budgets, rows)

    print(f"# iMAML adjoint solves: λ={REG}, inner GD lr {INNER_LR} x {INNER_STEPS}, {args.tasks} tasks 5-way 1-shot "
          f"(Omniglot train split, seed {args.seed}); float32")
    for label, worst in ref_info:
        print(f"# reference for {label}: MINRES-{args.reference_steps}, worst true residual {worst:.2g}")
    for i, (low, nearest, high) in enumerate(spectra):
        print(f"# conv4-8ch task {i}: eigenvalues of H + λI in [{low:.3g}, {high:.3g}], smallest |eigenvalue| "
              f"{nearest:.2g}")
    print("| θ | method | budget | products used (mean) | own-system residual, median | paper-system residual, "
          "median | paper-system residual, worst | negative curvature met | meta-grad cosine to reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, name, budget, used, own, med, worst, indef, cos in rows:
        print(f"| {label} | {name} | {budget} | {used:.1f} | {own:.2g} | {med:.2g} | {worst:.2g} | {indef:.0%} | "
              f"{cos:.4f} |")
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread, {(time.process_time() - cpu0) / 60:.1f} CPU minutes")


if __name__ == "__main__":
    main()
