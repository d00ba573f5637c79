"""A deep-equilibrium MNIST classifier: the layer z = tanh(W z + U x + b), trained four ways.

    python examples/deq_mnist.py method=unrolled
    python examples/deq_mnist.py method=anderson            # Anderson forward, implicit (GMRES) backward
    python examples/deq_mnist.py method=newton              # Newton forward per example (vmap), implicit backward
    python examples/deq_mnist.py method=jfb                 # Anderson forward, Jacobian-free backward
    python examples/deq_mnist.py method=all train_size=60000 epochs=2

The model follows the implicit-layers tutorial (Kolter, Duvenaud & Johnson, chapter 1): Linear(784, 100), the
fixed point z* = tanh(W z* + x) of a Linear(100, 100) cell, Linear(100, 10), Adam(lr=1e-3), batches of 100.
What changes between methods is only how the fixed point is found and differentiated (``bilevel.layers``):

- ``unrolled``: Picard iteration under autograd, backpropagating through every iteration (gradient of the finite
  computation; memory grows with the iterations);
- ``anderson``: Anderson acceleration outside autograd, backward by the implicit function theorem with GMRES on
  the whole batch (gradient of the exact fixed point);
- ``newton``: dense Newton per example under ``torch.func.vmap`` (the layers' vmap rule), implicit backward with
  GMRES per example;
- ``jfb``: Anderson forward, Jacobian-free backward (``A⁻¹ ≈ I``, Fung et al. 2022).

Keys (``key=value``; unknown keys are errors): see ``Config``. MNIST is read from ``data_root`` or the
``BILEVEL_DATA`` environment variable. Writes ``<out_dir>/<method>/results.json`` (per-epoch metrics) and a
checkpoint after every epoch, from which an interrupted run resumes. wandb is offline unless ``wandb_mode=online``.

Measured quantities: test accuracy (full 10k test set), wall time per training epoch, forward solver iterations per
batch (mean), the bytes autograd saves for the backward pass per training step (max over steps: the memory that
differs between methods), and the process's peak resident memory.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bilevel.layers import fixed_point  # noqa: E402
from bilevel.linear_solve import GMRES  # noqa: E402
from bilevel.root_find import Anderson, Newton, Picard  # noqa: E402
from tasks.data import load_idx_dataset  # noqa: E402
from tasks import config  # noqa: E402

METHODS = ("unrolled", "anderson", "newton", "jfb")


@dataclass
class Config:
    method: str = "anderson"  # unrolled | anderson | newton | jfb | all
    train_size: int = 10000  # first N training images (60000 = all)
    test_size: int = 10000  # first N test images
    epochs: int = 2
    batch_size: int = 100
    hidden: int = 100  # size of z
    lr: float = 1e-3
    tol: float = 1e-3  # ||z − f(z)||₂ over a whole batch (per example for newton: tol / sqrt(batch_size))
    max_iter: int = 100  # forward budget for picard / anderson
    newton_steps: int = 8  # forward budget for newton (quadratic convergence: ~3 steps suffice)
    anderson_memory: int = 5
    gmres_steps: int = 20  # backward budget (implicit methods)
    threads: int = 1
    seed: int = 0
    data_root: Optional[str] = None  # default: $BILEVEL_DATA
    out_dir: str = "runs/layers/deq_mnist"
    wandb_mode: str = "offline"  # offline | online | disabled


class DEQ(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.inject = nn.Linear(784, cfg.hidden)
        self.cell = nn.Linear(cfg.hidden, cfg.hidden)
        self.readout = nn.Linear(cfg.hidden, 10)

    def forward(self, images):
        x = self.inject(images)
        cell = dict(self.cell.named_parameters())

        def f(z, x, cell):
            return torch.tanh(functional_call(self.cell, cell, (z,)) + x)

        cfg, z0 = self.cfg, torch.zeros_like(x)
        common = dict(on_nonconvergence="ignore", return_info=True)  # counted below instead of warned per batch
        if cfg.method == "unrolled":
            z, info = fixed_point(f, z0, x, cell, solver=Picard(steps=cfg.max_iter, tol=cfg.tol), backward="unrolled",
                                  **common)
        elif cfg.method in ("anderson", "jfb"):
            solver = Anderson(steps=cfg.max_iter, tol=cfg.tol, memory=cfg.anderson_memory)
            backward = "jfb" if cfg.method == "jfb" else GMRES(steps=cfg.gmres_steps, tol=1e-6)
            z, info = fixed_point(f, z0, x, cell, solver=solver, backward=backward, **common)
        else:  # one dense Newton solve per example, batched by vmap
            solver = Newton(steps=cfg.newton_steps, tol=cfg.tol / cfg.batch_size ** 0.5)
            one = lambda x: fixed_point(f, torch.zeros_like(x), x, cell, solver=solver,  # noqa: E731
                                        backward=GMRES(steps=cfg.gmres_steps, tol=1e-6), **common)
            z, info = torch.func.vmap(one)(x)
        return self.readout(z), info


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active (the graph memory of a step)."""

    def __init__(self):
        self.storages = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        # a detached alias: returning `t` itself would make a saved output reference its own grad_fn, a cycle
        # that is never freed (and double backward is not needed here)
        return t.detach()

    @property
    def bytes(self):
        return sum(self.storages.values())

    def __enter__(self):
        self.storages = {}
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@functools.lru_cache(maxsize=4)  # method=all reads (and checksums) the files once
def load(split: str, n: int, root):
    images, labels = load_idx_dataset("mnist", split, root)
    return images[:n].reshape(-1, 784).float() / 255.0, labels[:n]


def evaluate(model, images, labels, batch_size):
    model.eval()
    correct, iters = 0, []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits, info = model(images[i:i + batch_size])
            correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
            iters.append(info.steps.float().mean().item())
    return correct / len(images), sum(iters) / len(iters)


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir) / cfg.method
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y = load("train", cfg.train_size, cfg.data_root)
    test_x, test_y = load("test", cfg.test_size, cfg.data_root)
    torch.manual_seed(cfg.seed)
    model = DEQ(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, start = [], 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume an interrupted run
        state = torch.load(ckpt, weights_only=True)   # tensors and plain containers only: no code from a file
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written with a different config; delete it or use another out_dir.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        history, start = state["history"], state["epoch"]
        torch.set_rng_state(state["rng"])
        print(f"resuming {cfg.method} after epoch {start}")

    import wandb
    run_ = wandb.init(project="bilevel-deq-mnist", name=cfg.method, config=asdict(cfg), mode=cfg.wandb_mode,
                      dir=str(out), reinit=True)
    for epoch in range(start, cfg.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        saved, iters, unconverged, losses = 0, [], 0, []
        t0 = time.perf_counter()
        for i in tqdm(range(0, len(order), cfg.batch_size), desc=f"{cfg.method} epoch {epoch + 1}", leave=False):
            idx = order[i:i + cfg.batch_size]
            with SavedBytes() as graph:
                logits, info = model(train_x[idx])
                loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad()
            loss.backward()
            if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
                raise FloatingPointError(f"{cfg.method}: non-finite gradient at epoch {epoch + 1}, batch "
                                         f"{i // cfg.batch_size}; lower lr or raise the solver budget.")
            opt.step()
            saved = max(saved, graph.bytes)
            iters.append(info.steps.float().mean().item())
            unconverged += int((~info.converged).sum())
            losses.append(loss.item())
        epoch_time = time.perf_counter() - t0
        test_acc, test_iters = evaluate(model, test_x, test_y, cfg.batch_size)
        row = dict(epoch=epoch + 1, train_loss=sum(losses) / len(losses), test_acc=test_acc,
                   epoch_time_s=epoch_time, train_iters=sum(iters) / len(iters), test_iters=test_iters,
                   unconverged_solves=unconverged, saved_for_backward_mb=saved / 2 ** 20,
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        history.append(row)
        run_.log(row)
        print(json.dumps(row))
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), history=history, epoch=epoch + 1,
                        rng=torch.get_rng_state(), config=asdict(cfg)), ckpt)
        results = dict(config=asdict(cfg), history=history, machine=f"{os.cpu_count()}-core CPU, torch "
                       f"{torch.__version__}, {cfg.threads} thread(s)", command=" ".join(sys.argv))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    run_.finish()
    return dict(config=asdict(cfg), history=history)


def main(argv):
    cfg = config.from_argv(Config, argv, __doc__)
    if cfg.method not in METHODS + ("all",):
        raise SystemExit(f"method={cfg.method!r}: use one of {', '.join(METHODS + ('all',))}.")
    for method in METHODS if cfg.method == "all" else (cfg.method,):
        run(replace(cfg, method=method))


if __name__ == "__main__":
    main(sys.argv[1:])
