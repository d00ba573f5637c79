"""MAML over a family of ODE systems: a Neural ODE meta-learned across damped oscillators, tasks batched by vmap.

    python examples/ode_maml.py
    python examples/ode_maml.py meta_steps=300 method=first_order

Each task is a damped oscillator ``x'' + 2ζω x' + ω² x = 0`` with its own frequency ``ω ~ U[1, 2]`` and damping
``ζ ~ U[0.05, 0.3]``, observed as the state ``h = (x, x')`` at ``points`` times in ``[0, horizon]``. The support
set is one trajectory from a random unit initial state, the query set another one from a different start. The
model is a Neural ODE ``dh/dt = W h + MLP(h)`` (2-32-2, tanh) solved by ``odeint`` (Dormand–Prince, adjoint
backward); MAML adapts all its weights by ``inner_steps`` gradient steps on the support MSE and meta-learns
the initialisation θ on the query MSE after adaptation, with ``bl.meta_grad(..., batching="vmap")``: every task of
the meta-batch is solved in one vmapped call, each with its own adaptive step sizes, and the second-order MAML
gradient differentiates the inner gradient (itself an adjoint solve) by a second adjoint solve.

This needs ``odeint`` to run under ``torch.func.grad`` of ``torch.func.grad`` and under ``vmap``, which
torchdiffeq 0.2.5's ``odeint_adjoint`` does not (it raises at the first ``torch.func.grad``).

Reported on ``eval_tasks`` held-out tasks: the query MSE of θ without adaptation, and after ``inner_steps``
adaptation steps, before and after meta-training. Keys (``key=value``): see ``Config``. Writes
``<out_dir>/results.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import bilevel as bl  # noqa: E402
from bilevel.layers import odeint  # noqa: E402
from tasks import config  # noqa: E402
from tasks.run_folder import ResultsFolder  # noqa: E402


@dataclass
class Config:
    meta_steps: int = 100  # outer (Adam) steps
    meta_batch: int = 8  # tasks per outer step
    inner_steps: int = 2  # gradient steps of adaptation
    inner_lr: float = 0.1
    meta_lr: float = 3e-3
    points: int = 10  # observed times per trajectory
    horizon: float = 3.0
    rtol: float = 1e-5  # dopri5 tolerances (float32)
    atol: float = 1e-6
    method: str = "maml"  # "maml" (second order, Unrolled) or "first_order" (FirstOrder)
    eval_tasks: int = 32
    eval_every: int = 50
    threads: int = 1
    seed: int = 0
    out_dir: str = "runs/layers/ode_maml"
    overwrite: bool = False  # replace the results of an earlier run in out_dir (also: --overwrite)


class Field(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.linear.weight)
        nn.init.normal_(self.mlp[2].weight, std=0.01)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h):
        return self.linear(h) + self.mlp(h)


def sample_tasks(n: int, cfg: Config, generator: torch.Generator):
    """``n`` oscillators: (support, query) batches, each ``(h0, t, ys)`` with a leading task dimension."""
    omega = 1 + torch.rand(n, generator=generator)
    zeta = 0.05 + 0.25 * torch.rand(n, generator=generator)
    t = torch.linspace(0, cfg.horizon, cfg.points).expand(n, -1).contiguous()

    def trajectory():
        angle = 2 * torch.pi * torch.rand(n, generator=generator)
        h0 = torch.stack([angle.cos(), angle.sin()], -1)
        A = torch.zeros(n, 2, 2)
        A[:, 0, 1], A[:, 1, 0], A[:, 1, 1] = 1.0, -omega ** 2, -2 * zeta * omega
        # linear dynamics: the exact solution is exp(tA) h0
        ys = torch.linalg.matrix_exp(t[..., None, None] * A[:, None]) @ h0[:, None, :, None]
        return h0, t, ys.squeeze(-1)

    return trajectory(), trajectory()


def make_problem(field: Field, cfg: Config):
    def mse(params, batch):
        h0, t, ys = batch
        pred = odeint(lambda s, h, p: functional_call(field, p, (h,)), h0, t, params, rtol=cfg.rtol, atol=cfg.atol)
        return ((pred - ys) ** 2).mean()

    inner_loss = lambda params, hparams, batch: mse(params, batch)  # noqa: E731
    outer_loss = lambda params, hparams, batch: mse(params, batch)  # noqa: E731
    solver = bl.GradientDescent(lr=cfg.inner_lr, steps=cfg.inner_steps)
    return bl.Problem(inner_loss, outer_loss, solver, init=bl.meta_init), mse


def evaluate(problem, mse, hparams, tasks) -> dict:
    """Mean query MSE over the tasks, without adaptation and after the inner steps (one task at a time)."""
    (s_h0, s_t, s_y), (q_h0, q_t, q_y) = tasks
    before, after = [], []
    for i in range(len(s_h0)):
        support, query = (s_h0[i], s_t[i], s_y[i]), (q_h0[i], q_t[i], q_y[i])
        before.append(float(mse(hparams, query)))
        params, _ = problem.solver(problem.inner_loss, dict(hparams), hparams, support)
        after.append(float(mse(params, query)))
    return dict(query_mse_unadapted=sum(before) / len(before), query_mse_adapted=sum(after) / len(after))


def run(cfg: Config) -> dict:
    if cfg.method not in ("maml", "first_order"):
        raise ValueError(f"method={cfg.method!r}: must be 'maml' or 'first_order'.")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    folder = ResultsFolder(cfg.out_dir, cfg.overwrite)  # before any work: an earlier run's results are kept
    field = Field()
    hparams = {k: v.detach().clone().requires_grad_() for k, v in field.named_parameters()}
    problem, mse = make_problem(field, cfg)
    method = bl.Unrolled() if cfg.method == "maml" else bl.FirstOrder()
    opt = torch.optim.Adam(hparams.values(), lr=cfg.meta_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    eval_tasks = sample_tasks(cfg.eval_tasks, cfg, torch.Generator().manual_seed(cfg.seed + 1))
    detached = lambda: {k: v.detach() for k, v in hparams.items()}  # noqa: E731
    history = [dict(step=0, **evaluate(problem, mse, detached(), eval_tasks))]
    print(json.dumps(history[-1]))
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(1, cfg.meta_steps + 1):
        support, query = sample_tasks(cfg.meta_batch, cfg, g)
        out_grad = bl.meta_grad(method, problem, detached(), support, query, batching="vmap")
        opt.zero_grad()
        for k, v in hparams.items():
            v.grad = out_grad.grad[k]
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.meta_steps:
            history.append(dict(step=step, meta_loss=float(out_grad.outer_loss),
                                **evaluate(problem, mse, detached(), eval_tasks)))
            print(json.dumps(history[-1]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    results = dict(config=asdict(cfg), history=history, seconds_per_meta_step=wall / cfg.meta_steps,
                   cpu_minutes=cpu / 60)
    folder.save(results)
    return results


def main(argv):
    config.run_from_argv(run, Config, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
