"""The headline comparisons, timed side by side in one process: bilevel against the peers on the same meta-step.

    python -m benchmarks.side_by_side --repeats 5 --threads 2

Every implementation is built first, warmed up once, then timed round-robin (one meta-step of each per round), so
that a change in the load of the shared machine hits all of them alike; each ratio is of medians over the same
rounds. Configurations (``benchmarks/workload.py``; 32 tasks, 5-way 1-shot, 15 queries, conv4):

- second-order MAML, 1 inner step: torch.autograd loop, higher, learn2learn, TorchOpt, bilevel ``Unrolled``;
- iMAML with CG-5 on 5 inner steps: TorchOpt's implicit differentiation (``custom_root`` + ``solve_cg``) and
  bilevel's ``imaml``.

Peak memory is not measured here (one process holds every implementation): see ``benchmarks/omniglot_methods.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks.workload import Config, make_step

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "maml1": [Config(impl=i, steps=1) for i in ("autograd", "higher", "learn2learn", "torchopt")]
             + [Config(impl="bilevel", method="unrolled", steps=1)],
    "imaml5": [Config(impl="torchopt_implicit", method="cg", steps=5), Config(impl="bilevel", method="imaml", steps=5)],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batching", default="loop", help="bilevel's batching: loop | vmap")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size (32 in the issue)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "side_by_side.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt still calls functorch.vjp
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    for group in args.groups:
        configs = GROUPS[group]
        for c in configs:
            c.batching = args.batching if c.impl == "bilevel" else "loop"
            c.tasks = args.tasks
        steps = {c.key(): make_step(c) for c in configs}
        for step in steps.values():
            step()  # warm-up
        wall = {k: [] for k in steps}
        cpu = {k: [] for k in steps}
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            for key, step in steps.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - cpu_start)
        load_after = os.getloadavg()
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        ours = next(k for k in steps if k.startswith("bilevel"))
        peers = [k for k in steps if k != ours and not k.startswith("autograd")]
        fastest = min(peers, key=med.get)
        print(f"{group}: {args.threads} thread(s), median of {args.repeats} round-robin rounds, load "
              f"{load_before[0]:.1f} -> {load_after[0]:.1f}, {date}")
        print("| implementation | wall s | CPU s | fastest peer / this (wall) |")
        print("|---|---|---|---|")
        for key in steps:
            print(f"| {key} | {med[key]:.2f} | {med_cpu[key]:.2f} | {med[fastest] / med[key]:.2f}x |")
        print(f"bilevel vs fastest peer ({fastest}): {med[fastest] / med[ours]:.2f}x wall, "
              f"{med_cpu[fastest] / med_cpu[ours]:.2f}x CPU (target >= 2x)\n", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps({"group": group, "threads": args.threads, "repeats": args.repeats, "date": date,
                                "load_before": load_before, "load_after": load_after, "torch": torch.__version__,
                                "wall": wall, "cpu": cpu, "median_s": med, "median_cpu_s": med_cpu,
                                "fastest_peer": fastest, "speedup_wall": med[fastest] / med[ours],
                                "speedup_cpu": med_cpu[fastest] / med_cpu[ours]}) + "\n")


if __name__ == "__main__":
    main()
