"""Newton's method with and without its Armijo line search on the fixed points of a trained DEQ layer.

    python benchmarks/newton_line_search.py
    python benchmarks/newton_line_search.py --train-size 60000 --examples 1000

Trains the MNIST DEQ of ``examples/deq_mnist.py`` (``z = tanh(W z + inject(x))``, hidden 100) for one epoch with
Anderson forward and GMRES backward, then solves ``z = f(z)`` for ``--examples`` test images one at a time under
``vmap``, from ``z = 0``, by ``Newton(steps=k, backtracks=0)`` (plain Newton) and ``Newton(steps=k)`` (Armijo
backtracking on ``||F||²``), for each budget ``k``. Reported per solver: the fraction of examples whose residual
``||z − f(z)||₂`` reached ``--tol``, the median and largest residual, and CPU seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilevel.root_find import Newton, fixed_point_residual  # noqa: E402


def _deq_example():
    spec = importlib.util.spec_from_file_location("deq_mnist", ROOT / "examples" / "deq_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    deq = _deq_example()
    cfg = deq.Config(method="anderson", train_size=args.train_size, epochs=1)
    train_x, train_y = deq.load("train", args.train_size, None)
    test_x, _ = deq.load("test", args.examples, None)
    model = deq.DEQ(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0 = time.process_time()
    for i in range(0, len(train_x), cfg.batch_size):
        logits, _ = model(train_x[i:i + cfg.batch_size])
        loss = F.cross_entropy(logits, train_y[i:i + cfg.batch_size])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_cpu = time.process_time() - t0
    cell = {k: v.detach() for k, v in model.cell.named_parameters()}
    with torch.no_grad():
        x = model.inject(test_x)
    fn = fixed_point_residual(lambda z, x: torch.tanh(functional_call(model.cell, cell, (z,)) + x))
    rows = []
    for steps in args.steps:
        for backtracks in (0, 10):
            solver = Newton(steps=steps, tol=args.tol, backtracks=backtracks)
            t0 = time.process_time()
            with torch.no_grad():
                _, info = torch.func.vmap(lambda x: solver(fn, torch.zeros_like(x), x))(x)
            cpu = time.process_time() - t0
            res = info.residual
            rows.append(dict(steps=steps, line_search=backtracks > 0, converged=float(info.converged.float().mean()),
                             median_residual=float(res.median()), max_residual=float(res.max()), cpu_s=cpu))
            print(json.dumps(rows[-1]))
    out = dict(args=vars(args), train_cpu_s=train_cpu, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
