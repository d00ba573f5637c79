"""Argmin layers checked against their closed forms: an equality-constrained QP and a ridge-regression head.

    python examples/argmin_layer.py
    python examples/argmin_layer.py steps=300 train_size=5000

1. **KKT layer** (``bilevel.layers.root``): ``z*(Q, c, A, b) = argmin_z ½zᵀQz + cᵀz  s.t.  Az = b`` as the root of
   the KKT residual ``[Qz + c + Aᵀν; Az − b]`` in ``(z, ν)``. Value and gradients in all of ``Q, c, A, b`` are
   compared in float64 with autograd through the closed-form KKT solve ``torch.linalg.solve``.
2. **Ridge head** (``bilevel.layers.argmin``), after R2-D2 (Bertinetto et al. 2019,
   https://arxiv.org/abs/1805.08136): an MLP embeds MNIST images; inside every training step a linear readout is
   fitted on half of the batch by ``W* = argmin_W ||φ(X_s) W − Y_s||² + λ||W||²`` (one-hot targets) and the
   cross-entropy of ``φ(X_q) W*`` on the other half trains the MLP and ``log λ`` by ``loss.backward()`` and Adam.
   At every step the layer's solution and gradients are compared with the closed form
   ``W* = (ΦᵀΦ + λI)⁻¹ ΦᵀY`` differentiated by autograd.

Keys (``key=value``, unknown keys are errors): see ``Config``. Writes ``<out_dir>/results.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bilevel.layers import argmin, root  # noqa: E402
from bilevel.linear_solve import CG  # noqa: E402
from bilevel.root_find import Newton  # noqa: E402
from tasks.data import load_idx_dataset  # noqa: E402
from tasks import config  # noqa: E402
from tasks.run_folder import ResultsFolder  # noqa: E402


@dataclass
class Config:
    steps: int = 200  # training steps of the ridge-head network
    batch_size: int = 200  # half fits the ridge readout, half is scored
    embed: int = 32  # feature dimension: the readout has embed × 10 unknowns
    lr: float = 1e-3
    train_size: int = 10000
    test_size: int = 10000
    fit_size: int = 1000  # training images the readout is fitted on at test time
    threads: int = 1
    seed: int = 0
    data_root: Optional[str] = None  # default: $BILEVEL_DATA
    out_dir: str = "runs/layers/argmin_layer"
    overwrite: bool = False  # replace the results of an earlier run in out_dir (also: --overwrite)


def kkt_check(seed: int = 0, n: int = 6, m: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    B = torch.randn(n, n, generator=g, dtype=dt)
    Q = (B @ B.T + 0.5 * torch.eye(n, dtype=dt)).requires_grad_()
    c = torch.randn(n, generator=g, dtype=dt, requires_grad=True)
    A = torch.randn(m, n, generator=g, dtype=dt, requires_grad=True)
    b = torch.randn(m, generator=g, dtype=dt, requires_grad=True)

    def kkt(zn, Q, c, A, b):
        z, nu = zn[:n], zn[n:]
        return torch.cat([Q @ z + c + A.T @ nu, A @ z - b])

    zn = root(kkt, torch.zeros(n + m, dtype=dt), Q, c, A, b, solver=Newton(tol=1e-12))
    K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(m, m, dtype=dt)], 1)])
    zn_ref = torch.linalg.solve(K, torch.cat([-c, b]))
    v = torch.randn(n + m, generator=g, dtype=dt)
    grads = torch.autograd.grad(zn, (Q, c, A, b), v)
    grads_ref = torch.autograd.grad(zn_ref, (Q, c, A, b), v)
    zn, zn_ref = zn.detach(), zn_ref.detach()
    return dict(value_max_abs_err=float((zn - zn_ref).abs().max()),
                grad_max_rel_err=max(float((x - y).norm() / y.norm()) for x, y in zip(grads, grads_ref)),
                constraint_residual=float((A.detach() @ zn[:n] - b.detach()).abs().max()))


def ridge_objective(W, feats, targets, log_lam):
    return 0.5 * ((feats @ W - targets) ** 2).sum() + 0.5 * log_lam.exp() * (W ** 2).sum()


def ridge_layer(feats, targets, log_lam):
    """``argmin_W ridge_objective``: one Newton step is exact for a quadratic; CG solves the adjoint system."""
    W0 = feats.new_zeros(feats.shape[1], targets.shape[1])
    return argmin(ridge_objective, W0, feats, targets, log_lam, solver=Newton(steps=3, tol=1e-4),
                  backward=CG(steps=100, tol=1e-6))


def ridge_closed_form(feats, targets, log_lam):
    eye = torch.eye(feats.shape[1], dtype=feats.dtype)
    return torch.linalg.solve(feats.T @ feats + log_lam.exp() * eye, feats.T @ targets)


def load(split, n, root):
    images, labels = load_idx_dataset("mnist", split, root)
    return images[:n].reshape(-1, 784).float() / 255.0, labels[:n]


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    folder = ResultsFolder(cfg.out_dir, cfg.overwrite)  # before any work: an earlier run's results are kept
    results = dict(config=asdict(cfg), kkt=kkt_check(cfg.seed))
    print("KKT layer vs closed form (float64):", json.dumps(results["kkt"]))

    train_x, train_y = load("train", cfg.train_size, cfg.data_root)
    test_x, test_y = load("test", cfg.test_size, cfg.data_root)
    embed = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, cfg.embed))
    log_lam = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([*embed.parameters(), log_lam], lr=cfg.lr)
    worst_value, worst_grad, t0, losses = 0.0, 0.0, time.perf_counter(), []
    half = cfg.batch_size // 2
    for step in tqdm(range(cfg.steps), desc="ridge head"):
        idx = torch.randint(len(train_x), (cfg.batch_size,))
        feats = embed(train_x[idx])
        targets = F.one_hot(train_y[idx], 10).float()
        W = ridge_layer(feats[:half], targets[:half], log_lam)
        loss = F.cross_entropy(feats[half:] @ W, train_y[idx][half:])
        # the closed form on the same graph: value and gradients must agree (up to float32 round-off)
        W_ref = ridge_closed_form(feats[:half], targets[:half], log_lam)
        loss_ref = F.cross_entropy(feats[half:] @ W_ref, train_y[idx][half:])
        params = [*embed.parameters(), log_lam]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        grads_ref = torch.autograd.grad(loss_ref, params)
        worst_value = max(worst_value, float((W - W_ref).detach().norm() / W_ref.detach().norm()))
        worst_grad = max(worst_grad, max(float((a - b).norm() / b.norm().clamp_min(1e-12))
                                         for a, b in zip(grads, grads_ref)))
        opt.zero_grad()
        for p, gp in zip(params, grads):
            p.grad = gp
        opt.step()
        losses.append(loss.item())
    train_time = time.perf_counter() - t0

    with torch.no_grad():  # fit the readout once on fit_size training images, score the test set
        W = ridge_layer(embed(train_x[:cfg.fit_size]), F.one_hot(train_y[:cfg.fit_size], 10).float(), log_lam)
        test_acc = (embed(test_x) @ W).argmax(1).eq(test_y).float().mean().item()
    results["ridge_head"] = dict(
        first_loss=losses[0], last_loss=sum(losses[-20:]) / len(losses[-20:]), test_acc=test_acc,
        lam=float(log_lam.detach().exp()), max_rel_err_solution=worst_value, max_rel_err_grad=worst_grad,
        train_time_s=train_time)
    print("ridge head:", json.dumps(results["ridge_head"]))
    folder.save(results)
    return results


def main(argv):
    config.run_from_argv(run, Config, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
