"""Time of a Hessian-vector product against one gradient, on the conv4 inner loss of one few-shot task.

    python -m benchmarks.hvp_ratio --threads 1 --repeats 20

The inner loss is iMAML's, ``proximal(cross-entropy, λ=2)`` on a 5-way support set (1 shot: 5 images; 5 shots:
25; and a 75-image batch the size of the query set). Each product ``H v`` is formed as the implicit methods can
form it:

- ``rev, reused``: ``vjp`` of ``∇_w L`` built once per adjoint solve, then one reverse pass per product (what
  ``bl.root_vjp(hvp="rev")`` does; the build is reported separately as it is paid once per solve);
- ``rev, fresh``: the same built anew for every product;
- ``fwd-over-rev``: ``jvp(∇_w L)`` per product (``bl.root_vjp(hvp="fwd")``);
- ``autograd``: ``torch.autograd.grad`` of the gradient with ``create_graph=True`` (what TorchOpt and higher do).

The gradient is ``torch.func.grad(L)``. Times are process CPU time (with one thread, the time the work itself
took, whatever else runs on the shared machine), medians over ``--repeats``; the ratio is product time / gradient
time. The issue's target: an HVP at most 2.5x a gradient.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.func import grad, jvp, vjp

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(batch_size: int, repeats: int) -> dict:
    import bilevel as bl
    from tasks.omniglot.model import Conv4, cross_entropy_loss

    torch.manual_seed(0)
    model = Conv4(5)
    theta = model.init_params()
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in theta.items()}
    batch = (torch.rand(batch_size, 1, 28, 28), torch.arange(5).repeat_interleave(batch_size // 5))
    loss = bl.proximal(cross_entropy_loss(model), 2.0)
    grad_fn = grad(loss)
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def f(w):
        return grad_fn(w, theta, batch)

    _, reused = vjp(f, params)

    def autograd_hvp():
        leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
        g = torch.autograd.grad(loss(leaves, theta, batch), list(leaves.values()), create_graph=True)
        return torch.autograd.grad(g, list(leaves.values()), list(v.values()))

    timings = {
        "gradient": median_time(lambda: f(params), repeats),
        "rev, reused": median_time(lambda: reused(v), repeats),
        "rev, build once": median_time(lambda: vjp(f, params), repeats),
        "rev, fresh": median_time(lambda: vjp(f, params)[1](v), repeats),
        "fwd-over-rev": median_time(lambda: jvp(f, (params,), (v,)), repeats),
        "autograd": median_time(autograd_hvp, repeats),
    }
    # The products agree (a guard against timing something else than H v).
    ref = torch.cat([x.flatten() for x in reused(v)[0].values()])
    fwd = torch.cat([x.flatten() for x in jvp(f, (params,), (v,))[1].values()])
    auto = torch.cat([x.flatten() for x in autograd_hvp()])
    agree = max(((fwd - ref).norm() / ref.norm()).item(), ((auto - ref).norm() / ref.norm()).item())
    return {"batch_size": batch_size, "seconds": timings, "max_relative_difference": agree}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[5, 25, 75])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "hvp_ratio.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"HVP / gradient CPU time, conv4 proximal inner loss, {args.threads} thread(s), median of {args.repeats}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| images | gradient ms | " + " | ".join(f"{k} ms (x grad)" for k in
                                                 ("rev, reused", "rev, build once", "rev, fresh", "fwd-over-rev",
                                                  "autograd")) + " |")
    print("|---|---|---|---|---|---|---|")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.batch_sizes:
        load = os.getloadavg()
        r = measure(n, args.repeats)
        s = r["seconds"]
        cells = " | ".join(f"{1e3 * s[k]:.1f} ({s[k] / s['gradient']:.2f}x)" for k in
                           ("rev, reused", "rev, build once", "rev, fresh", "fwd-over-rev", "autograd"))
        print(f"| {n} | {1e3 * s['gradient']:.1f} | {cells} |", flush=True)
        r.update(threads=args.threads, repeats=args.repeats, load=load, torch=torch.__version__,
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        with args.out.open("a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
