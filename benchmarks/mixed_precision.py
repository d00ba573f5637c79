"""float32 against ``precision="bf16"`` (and ``"fp16"``) for the MAML meta-step on the Omniglot conv4 network.

    OMP_NUM_THREADS=1 python -m benchmarks.mixed_precision --rounds 5

One meta-step is ``bl.meta_grad(bl.Unrolled(), ...)`` (second-order MAML, 1 inner step of lr 0.4) over 8 tasks of
5-way 1-shot with 15 queries per class, drawn by the project's sampler from Omniglot's background set
(``$BILEVEL_DATA``), on ``tasks.omniglot.model.Conv4`` at its initialisation (or ``--weights``). The precisions
run round-robin (one meta-step of each per round, after one warm-up) so a change of machine load hits them alike;
the report is the median process CPU time per meta-step, its ratio to float32, and the cosine of each
meta-gradient to the float32 one (the same tasks every round).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

import bilevel as bl
from tasks.omniglot.config import load_config
from tasks.omniglot.train import build


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pool", default="stride", choices=["stride", "max"], help="Conv4's model.pool")
    parser.add_argument("--weights", default=None, help="a training checkpoint (best.pt) to start from instead of "
                                                         "the initialisation")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = os.environ.get("BILEVEL_DATA", "../shared/data")
    cfg = load_config("demo", [f"data.root={data}", "data.background=images_background_small1",
                               "data.evaluation=null", "data.num_train=100", "data.num_val=16",
                               "wandb.mode=disabled", "run.progress=false", "task.queries=15",
                               f"meta.batch={args.tasks}", "inner.steps=1", "method.name=maml",
                               f"model.pool={args.pool}"])
    work = build(cfg)
    tasks = work.samplers["train"].sample(0, args.tasks)
    inner, outer = (tasks.support, tasks.support_labels), (tasks.query, tasks.query_labels)
    hparams = work.model.init_params()
    if args.weights:
        hparams = {k: v.float() for k, v in torch.load(args.weights, weights_only=True)["hparams"].items()}

    def step(name):
        out = bl.meta_grad(work.method, work.problem, hparams, inner, outer,
                           precision=None if name == "fp32" else name)
        return torch.cat([g.flatten() for g in out.grad.values()])

    grads = {name: step(name) for name in args.precisions}  # warm-up, and the gradients compared
    cpu = {name: [] for name in args.precisions}
    for _ in range(args.rounds):
        for name in args.precisions:
            start = time.process_time()
            step(name)
            cpu[name].append(time.process_time() - start)
    base = statistics.median(cpu["fp32"]) if "fp32" in cpu else None
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{args.threads} thread(s), conv4 pool={args.pool}, {args.tasks} tasks 5-way 1-shot 15 queries, MAML 1 step, "
          f"{args.rounds} rounds, weights: {args.weights or 'initialisation'}")
    print("| precision | CPU s / meta-step (median) | speed-up over fp32 | gradient cosine to fp32 |")
    print("|---|---|---|---|")
    for name in args.precisions:
        med = statistics.median(cpu[name])
        cos = torch.nn.functional.cosine_similarity(grads[name], grads["fp32"], dim=0).item() \
            if "fp32" in grads else float("nan")
        print(f"| {name} | {med:.3f} | {base / med:.2f}x | {cos:.4f} |")


if __name__ == "__main__":
    main()
