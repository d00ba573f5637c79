"""Where bilevel's time goes on small tasks: one MAML meta-step written five ways, timed round-robin.

    OMP_NUM_THREADS=1 python -m benchmarks.per_task_overhead --queries 1 --rounds 7

The workload of ``benchmarks/l2l_time_to_accuracy.py``: learn2learn's ``OmniglotCNN``, 32 tasks of 5-way 1-shot with
``--queries`` queries per class, one inner step of lr 0.5, second order. With one query per class every pass sees five
images, so what an implementation does per task besides the convolutions shows. The five:

- ``learn2learn``: its ``MAML`` (``clone``, ``adapt``, ``backward``), as its example;
- ``bilevel``: ``bl.meta_grad(bl.Unrolled(), ...)``, loop batching;
- ``autograd``: the same computation by ``torch.autograd`` alone (``autograd.grad(create_graph=True)``, then
  ``backward``), the floor for this model;
- ``torch.func``: ``torch.func.grad`` of a function that takes the inner step with ``torch.func.grad``, per task;
- ``func inner, autograd outer``: the inner gradient by ``torch.func.grad``, the outer one by ``torch.autograd``,
  which is what ``bilevel`` does at the top level (``bilevel.methods._grads``).

The model runs through ``bilevel.interop.learn2learn.module_call`` in the last three as in ``bilevel``. Prints the
median process CPU seconds per meta-step and the ratio to ``autograd``; every implementation's meta-gradient is
checked against ``autograd``'s first. Appends a JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import grad

import bilevel as bl
from benchmarks.workload import learn2learn_meta_grad
from bilevel.interop import learn2learn as bl_l2l

ROOT = Path(__file__).resolve().parents[1]
WAYS, LR = 5, 0.5


def build(queries: int, tasks: int = 32, seed: int = 0):
    """``{name: meta_step}`` (each returns the meta-gradient dict) on shared random tasks and initial weights."""
    l2l = bl_l2l.load()
    torch.manual_seed(seed)
    model = l2l.vision.models.OmniglotCNN(output_size=WAYS)
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, WAYS, 1, 28, 28, generator=g)
    xq = torch.rand(tasks, WAYS * queries, 1, 28, 28, generator=g)
    ys, yq = torch.arange(WAYS).repeat(tasks, 1), torch.arange(WAYS).repeat(tasks, queries)
    theta = bl_l2l.meta_params(model)
    call = bl_l2l.module_call(model)

    def loss(p, x, y):
        return F.cross_entropy(call(p, x), y)

    maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=LR, first_order=False)

    def learn2learn():
        return learn2learn_meta_grad(maml, ((xs, ys), (xq, yq)), tasks, steps=1)

    problem = bl.Problem(bl_l2l.module_loss(model), bl_l2l.module_loss(model), bl.GradientDescent(lr=LR, steps=1),
                         init=bl.meta_init)

    def bilevel():
        return bl.meta_grad(bl.Unrolled(), problem, theta, (xs, ys), (xq, yq), on_nonconvergence="ignore").grad

    def autograd():
        h = {k: v.clone().requires_grad_() for k, v in theta.items()}
        for i in range(tasks):
            g_ = torch.autograd.grad(loss(h, xs[i], ys[i]), list(h.values()), create_graph=True)
            (loss({k: h[k] - LR * gk for k, gk in zip(h, g_)}, xq[i], yq[i]) / tasks).backward()
        return {k: v.grad for k, v in h.items()}

    def task(h, i):
        g_ = grad(loss)(h, xs[i], ys[i])
        return loss({k: h[k] - LR * g_[k] for k in h}, xq[i], yq[i])

    def func():
        total = None
        for i in range(tasks):
            g_ = grad(task)(theta, i)
            total = g_ if total is None else {k: total[k] + g_[k] for k in g_}
        return {k: v / tasks for k, v in total.items()}

    def func_inner_autograd_outer():
        h = {k: v.clone().requires_grad_() for k, v in theta.items()}
        total = None
        for i in range(tasks):
            g_ = torch.autograd.grad(task(h, i), list(h.values()))
            total = list(g_) if total is None else [a + b for a, b in zip(total, g_)]
        return {k: v / tasks for k, v in zip(h, total)}

    return {"autograd": autograd, "learn2learn": learn2learn, "bilevel": bilevel, "torch.func": func,
            "func inner, autograd outer": func_inner_autograd_outer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1, help="queries per class")
    parser.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "per_task_overhead.jsonl")
    args = parser.parse_args(argv)
    if min(args.queries, args.rounds, args.threads, args.tasks) < 1:
        parser.error("--queries, --rounds, --threads and --tasks must be positive")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    steps = build(args.queries, args.tasks)
    reference = None
    diffs = {}
    for name, step in steps.items():   # warm-up and the same-result check
        g_ = {k: v.detach().clone() for k, v in step().items()}
        reference = reference or g_
        diffs[name] = float(torch.sqrt(sum(((g_[k] - reference[k]) ** 2).sum() for k in reference))
                            / torch.sqrt(sum((v ** 2).sum() for v in reference.values())))
        if not diffs[name] <= 1e-4:
            raise RuntimeError(f"per_task_overhead: {name}'s meta-gradient differs from autograd's by "
                               f"{diffs[name]:.1e} relative; it does not compute the same thing.")
    cpu = {name: [] for name in steps}
    load = os.getloadavg()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            cpu[name].append(time.process_time() - start)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{args.tasks} tasks, 5-way 1-shot, {args.queries} queries per class, {args.threads} thread(s), median of "
          f"{args.rounds} rounds, load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}, {date}")
    print("| implementation | CPU s / meta-step | / autograd | meta-gradient vs autograd |\n|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m:.3f} | {m / med['autograd']:.2f}x | {diffs[name]:.1e} |")
    with args.out.open("a") as f:
        f.write(json.dumps({"date": date, "tasks": args.tasks, "queries": args.queries, "threads": args.threads,
                            "rounds": args.rounds, "load": [load, os.getloadavg()], "cpu": cpu, "median_cpu_s": med,
                            "grad_rel_diff": diffs, "torch": torch.__version__}) + "\n")
    return med


if __name__ == "__main__":
    main()
