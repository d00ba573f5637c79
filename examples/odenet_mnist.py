"""An ODE-Net classifier block on MNIST: a residual block replaced by ``odeint`` with the adjoint backward.

    python examples/odenet_mnist.py
    python examples/odenet_mnist.py train_size=60000 epochs=2 adjoint=false

After Chen et al. 2018 (https://arxiv.org/abs/1806.07366, Sec. 7.1, "ODE-Net"), smaller: an image is embedded
by ``Linear(784, width)`` + tanh, carried through ``dh/dt = MLP([h, t])`` (``width``-``hidden``-``width``, tanh;
the time is an input) from ``t = 0`` to ``1`` with Dormand–Prince (``rtol = atol = tol``), and read out by
``Linear(width, 10)``. The paper's ODE-Net uses convolutions and a downsampling stem; this block is
fully connected so that a CPU run takes minutes. Reported: test accuracy, the mean number of function
evaluations forward and backward (``Record``), CPU seconds, and the bytes autograd saved for backward in one step
(the ODE block's share is flat in the number of steps with the adjoint).

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
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bilevel.layers import Record, odeint  # noqa: E402
from bilevel.testing import saved_bytes  # noqa: E402
from tasks.data import load_idx_dataset  # noqa: E402
from tasks import config  # noqa: E402
from tasks.run_folder import ResultsFolder  # noqa: E402


@dataclass
class Config:
    train_size: int = 10000
    test_size: int = 10000
    epochs: int = 1
    batch_size: int = 100
    width: int = 64
    hidden: int = 128
    tol: float = 1e-3  # dopri5 rtol = atol
    adjoint: bool = True
    lr: float = 1e-3
    threads: int = 1
    seed: int = 0
    data_root: Optional[str] = None  # default: $BILEVEL_DATA
    out_dir: str = "runs/layers/odenet_mnist"
    overwrite: bool = False  # replace the results of an earlier run in out_dir (also: --overwrite)


class ODENet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed, self.readout = nn.Linear(784, cfg.width), nn.Linear(cfg.width, 10)
        self.field = nn.Sequential(nn.Linear(cfg.width + 1, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.width))
        self.t = torch.tensor([0.0, 1.0])
        self.record = Record()

    def dynamics(self, s, h, params):
        time_column = s.expand(*h.shape[:-1], 1).to(h.dtype)
        return functional_call(self.field, params, (torch.cat([h, time_column], -1),))

    def forward(self, images):
        h0 = torch.tanh(self.embed(images))
        hs = odeint(self.dynamics, h0, self.t, dict(self.field.named_parameters()), rtol=self.cfg.tol,
                    atol=self.cfg.tol, adjoint=self.cfg.adjoint, record=self.record)
        return self.readout(hs[-1])


def load(split, n, root):
    images, labels = load_idx_dataset("mnist", split, root)
    return images[:n].reshape(-1, 784).float() / 255.0, labels[:n]


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    folder = ResultsFolder(cfg.out_dir, cfg.overwrite)  # before any work: an earlier run's results are kept
    train_x, train_y = load("train", cfg.train_size, cfg.data_root)
    test_x, test_y = load("test", cfg.test_size, cfg.data_root)
    model = ODENet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, nfe_fwd, nfe_bwd, saved = [], [], [], 0
    cpu0 = time.process_time()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(train_x))
        losses = []
        for i in range(0, len(train_x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits, nbytes = saved_bytes(lambda: model(train_x[idx]))
            saved = max(saved, nbytes)
            loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            nfe_fwd.append(int(model.record.forward.nfe))
            if cfg.adjoint:
                nfe_bwd.append(int(model.record.backward.nfe))
        with torch.no_grad():
            acc = sum(int(model(test_x[j:j + 1000]).argmax(1).eq(test_y[j:j + 1000]).sum())
                      for j in range(0, len(test_x), 1000)) / len(test_x)
        history.append(dict(epoch=epoch + 1, train_loss=sum(losses) / len(losses), test_acc=acc))
        print(json.dumps(history[-1]))
    results = dict(config=asdict(cfg), history=history, test_acc=history[-1]["test_acc"],
                   mean_nfe_forward=sum(nfe_fwd) / len(nfe_fwd),
                   mean_nfe_backward=sum(nfe_bwd) / len(nfe_bwd) if nfe_bwd else None,
                   saved_for_backward_mb=saved / 2 ** 20, cpu_minutes=(time.process_time() - cpu0) / 60)
    print(json.dumps({k: v for k, v in results.items() if k not in ("config", "history")}))
    folder.save(results)
    return results


def main(argv):
    config.run_from_argv(run, Config, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
