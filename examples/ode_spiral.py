"""Fit the dynamics of a spiral with a Neural ODE and the adjoint method (torchdiffeq's ``ode_demo`` problem).

    python examples/ode_spiral.py
    python examples/ode_spiral.py iters=2000 adjoint=false

The data are one trajectory of ``dy/dt = (y³) A`` with ``A = [[-0.1, 2], [-2, -0.1]]`` from ``y0 = (2, 0)``
over ``t ∈ [0, 25]`` (1000 points), solved with ``odeint``'s ``dopri5``. The model is
``dy/dt = MLP(y³)`` (2-50-2, tanh) with the same solver; every iteration integrates ``batch_size`` random
sub-trajectories of ``batch_time`` points from their observed start and backpropagates the mean absolute error
through ``odeint`` (adjoint by default). The script reports the error over the whole trajectory before and after
training, the function evaluations forward and backward (``Record``), and the time per iteration.

As in torchdiffeq's ``examples/ode_demo.py``: the problem, the network, RMSprop with lr 1e-3, batches of random
windows. Deviations: the weights enter ``odeint`` as an argument (``functional_call``), not as module state,
and the test error is measured every ``eval_every`` iterations only.

Keys (``key=value``, unknown keys are errors): see ``Config``. Writes ``<out_dir>/results.json``.
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

from bilevel.layers import Record, odeint  # noqa: E402
from tasks import config  # noqa: E402
from tasks.run_folder import ResultsFolder  # noqa: E402


@dataclass
class Config:
    iters: int = 1000  # training iterations
    batch_time: int = 10  # points per training window
    batch_size: int = 20  # windows per iteration
    data_size: int = 1000  # points of the observed trajectory
    lr: float = 1e-3  # RMSprop
    rtol: float = 1e-7  # dopri5 tolerances (torchdiffeq's defaults)
    atol: float = 1e-9
    adjoint: bool = True  # False: backpropagate through the solver's steps
    eval_every: int = 200
    threads: int = 1
    seed: int = 0
    out_dir: str = "runs/layers/ode_spiral"
    overwrite: bool = False  # replace the results of an earlier run in out_dir (also: --overwrite)


TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def true_dynamics(t, y):
    return (y ** 3) @ TRUE_A


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, y):
        return self.net(y ** 3)


def make_data(cfg: Config):
    t = torch.linspace(0.0, 25.0, cfg.data_size)
    y0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        ys = odeint(true_dynamics, y0, t, rtol=cfg.rtol, atol=cfg.atol)
    return t, y0, ys  # ys: (data_size, 1, 2)


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    folder = ResultsFolder(cfg.out_dir, cfg.overwrite)  # before any work: an earlier run's results are kept
    t, y0, true_y = make_data(cfg)
    field = Field()
    opt = torch.optim.RMSprop(field.parameters(), lr=cfg.lr)

    def f(s, y, params):
        return functional_call(field, params, (y,))

    def evaluate():
        with torch.no_grad():
            pred = odeint(f, y0, t, dict(field.named_parameters()), rtol=cfg.rtol, atol=cfg.atol)
        return float((pred - true_y).abs().mean())

    history = [dict(iter=0, test_mae=evaluate())]
    print(f"iter 0: trajectory mean abs error {history[0]['test_mae']:.4f}")
    rec, nfe_fwd, nfe_bwd = Record(), [], []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for it in range(1, cfg.iters + 1):
        start = torch.randint(cfg.data_size - cfg.batch_time, (cfg.batch_size,))
        batch_y0 = true_y[start]  # (B, 1, 2)
        batch_t = t[:cfg.batch_time]
        batch_y = torch.stack([true_y[start + i] for i in range(cfg.batch_time)])  # (T, B, 1, 2)
        pred = odeint(f, batch_y0, batch_t, dict(field.named_parameters()), rtol=cfg.rtol, atol=cfg.atol,
                      adjoint=cfg.adjoint, record=rec)
        loss = (pred - batch_y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfe_fwd.append(int(rec.forward.nfe))
        if cfg.adjoint:
            nfe_bwd.append(int(rec.backward.nfe))
        if it % cfg.eval_every == 0 or it == cfg.iters:
            history.append(dict(iter=it, train_loss=loss.item(), test_mae=evaluate()))
            print(f"iter {it}: train loss {loss.item():.4f}, trajectory mean abs error {history[-1]['test_mae']:.4f}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    results = dict(config=asdict(cfg), history=history, first_test_mae=history[0]["test_mae"],
                   last_test_mae=history[-1]["test_mae"], seconds_per_iter=wall / cfg.iters,
                   cpu_minutes=cpu / 60, mean_nfe_forward=sum(nfe_fwd) / len(nfe_fwd),
                   mean_nfe_backward=sum(nfe_bwd) / len(nfe_bwd) if nfe_bwd else None)
    print(json.dumps({k: v for k, v in results.items() if k not in ("config", "history")}))
    folder.save(results)
    return results


def main(argv):
    config.run_from_argv(run, Config, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
