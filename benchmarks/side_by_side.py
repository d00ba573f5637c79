"""The headline comparisons, timed side by side in one process: bilevel against the peers on the same meta-step.

    python -m benchmarks.side_by_side --threads 1 2 --repeats 5 --readme   # the README's table, on an idle machine

For each thread count, every implementation of a group is built, checked to compute the same meta-gradient as
the group's first (plain torch.autograd or the first peer), warmed up once, then timed round-robin (one meta-step
of each per round), so that a change in the load of the machine hits all of them alike; each ratio is of medians
over the same rounds. ``--threads N`` gives the peers and bilevel's ``loop`` N intra-op threads; with N > 1
bilevel also runs ``batching="threads"`` (N worker threads of one intra-op thread each). Groups
(``benchmarks/workload.py``; 32 tasks, 5-way 1-shot, 15 queries, the reference conv4):

- ``maml1``, ``maml5``: second-order MAML with 1 and 5 inner steps: torch.autograd loop, higher, learn2learn,
  TorchOpt, bilevel ``Unrolled``;
- ``fo1``: first-order MAML, 1 inner step: torch.autograd, learn2learn, bilevel ``FirstOrder``;
- ``imaml5``: iMAML with CG-5 on 5 inner steps: TorchOpt's implicit differentiation (``custom_root`` +
  ``solve_cg``) and bilevel's ``imaml``.

Prints one Markdown table per group and thread count and a summary table (also written to ``--md``; with
``--readme`` it replaces the block between the ``side_by_side`` markers of README.md); appends the raw times to
``--out``. Run it with nothing else on the machine: the load average before and after is in every record.
Peak memory is not measured here (one process holds every implementation): see ``benchmarks/omniglot_methods.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks.workload import Config, make_step

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "maml1": ("MAML second order, 1 step",
              [Config(impl=i, steps=1) for i in ("autograd", "higher", "learn2learn", "torchopt")]
              + [Config(impl="bilevel", method="unrolled", steps=1)]),
    "maml5": ("MAML second order, 5 steps",
              [Config(impl=i, steps=5) for i in ("autograd", "higher", "learn2learn", "torchopt")]
              + [Config(impl="bilevel", method="unrolled", steps=5)]),
    "fo1": ("MAML first order, 1 step",
            [Config(impl=i, method="first_order", steps=1) for i in ("autograd", "learn2learn", "bilevel")]),
    "imaml5": ("iMAML CG-5, 5 inner steps",
               [Config(impl="torchopt_implicit", method="cg", steps=5),
                Config(impl="bilevel", method="imaml", steps=5)]),
}
GRAD_RTOL = {"maml1": 1e-4, "maml5": 1e-4, "fo1": 1e-4,  # float32: the implementations sum in different orders
             "imaml5": 1e-3}  # 5 CG steps on a system that is indefinite at this θ amplify the rounding differences
MARKERS = ("<!-- side_by_side:start -->", "<!-- side_by_side:end -->")


def rel_diff(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    return (num / sum(float((v.double() ** 2).sum()) for v in b.values())) ** 0.5


def run_group(name: str, threads: int, repeats: int, tasks: int) -> dict:
    """Build, check and time one group at ``threads`` intra-op threads; the record of medians and ratios."""
    title, configs = GROUPS[name]
    configs = [dataclasses.replace(c, tasks=tasks) for c in configs]
    if threads > 1:
        configs += [dataclasses.replace(c, batching="threads", workers=threads) for c in configs if c.impl == "bilevel"]
    steps = {c.key(): make_step(c) for c in configs}
    # the same-result check compares like kernels: oneDNN picks other convolution kernels for another intra-op thread
    # count (float32: relative differences of 1e-4 to 1e-3 after 5 inner steps; 1e-16 in float64), and task threads
    # run one intra-op thread each, so they are compared with the group's first implementation on one thread
    torch.set_num_threads(1)
    one_thread = {k: v.detach().clone() for k, v in steps[configs[0].key()]().items()}
    torch.set_num_threads(threads)
    first = None
    diffs = {}
    for key, step in steps.items():   # the warm-up, and the check that every one computes the same thing
        grad = {k: v.detach().clone() for k, v in step().items()}
        first = first or grad
        diffs[key] = rel_diff(grad, one_thread if ":threads" in key else first)
        if not diffs[key] <= GRAD_RTOL[name]:
            raise RuntimeError(f"side_by_side {name}: {key}'s meta-gradient differs from {configs[0].key()}'s by "
                               f"{diffs[key]:.1e} relative (> {GRAD_RTOL[name]:.0e}); they do not compute the same "
                               f"thing.")
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for key, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - cpu_start)
    med = {k: statistics.median(v) for k, v in wall.items()}
    ours = [k for k in steps if k.startswith("bilevel")]
    peers = [k for k in steps if not k.startswith(("bilevel", "autograd"))]
    fastest = min(peers, key=med.get)
    return {"group": name, "title": title, "threads": threads, "repeats": repeats, "tasks": tasks,
            "load_before": load_before, "load_after": os.getloadavg(), "wall": wall, "cpu": cpu, "median_s": med,
            "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}, "grad_rel_diff": diffs,
            "fastest_peer": fastest, "speedup": {k: med[fastest] / med[k] for k in ours}}


def group_table(r: dict) -> str:
    lines = [f"{r['title']}, {r['threads']} thread(s): median of {r['repeats']} round-robin rounds, load "
             f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}", "",
             "| implementation | wall s | CPU s | fastest peer / this | meta-gradient vs first |",
             "|---|---|---|---|---|"]
    for k, s in r["median_s"].items():
        lines.append(f"| {k} | {s:.3f} | {r['median_cpu_s'][k]:.3f} | {r['median_s'][r['fastest_peer']] / s:.2f}x "
                     f"| {r['grad_rel_diff'][k]:.1e} |")
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """One row per group and thread count: the fastest peer against bilevel's loop and threads batching."""
    lines = [f"| meta-step ({records[0]['tasks']} tasks) | threads | fastest peer | bilevel, loop | "
             f"bilevel, task threads |",
             "|---|---|---|---|---|"]
    for r in records:
        med, peer = r["median_s"], r["fastest_peer"]
        cells = []
        for batching in ("loop", "threads"):
            key = next((k for k in r["speedup"] if f":{batching}" in k), None)
            cells.append("–" if key is None else f"{med[key]:.2f} s (**{r['speedup'][key]:.2f}x**)")
        lines.append(f"| {r['title']} | {r['threads']} | {peer.split(':')[0]} {med[peer]:.2f} s | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines)


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    start, end = (text.find(m) for m in MARKERS)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no {MARKERS[0]} ... {MARKERS[1]} block to replace; add the two markers.")
    readme.write_text(text[:start + len(MARKERS[0])] + "\n" + block + "\n" + text[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op thread counts to run")
    parser.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "side_by_side.jsonl")
    parser.add_argument("--md", type=Path, default=ROOT / "runs" / "benchmarks" / "side_by_side.md")
    parser.add_argument("--readme", action="store_true", help="replace the side_by_side block of README.md")
    args = parser.parse_args(argv)
    if min(args.threads) < 1 or args.repeats < 1 or args.tasks < 1:
        parser.error("--threads, --repeats and --tasks must be positive")
    for path in (args.out, args.md):   # writable before any work
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("a").close()
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt still calls functorch.vjp
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    start_cpu, uptime_before = time.process_time(), os.getloadavg()
    records = []
    for threads in args.threads:
        for group in args.groups:
            record = run_group(group, threads, args.repeats, args.tasks)
            records.append(record)
            print(group_table(record) + "\n", flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps({"date": date, "machine": machine(), **record}) + "\n")
    cpu_minutes = (time.process_time() - start_cpu) / 60
    head = (f"`python -m benchmarks.side_by_side --threads {' '.join(map(str, args.threads))} --repeats "
            f"{args.repeats}{' --readme' if args.readme else ''}`, {date[:16].replace('T', ' ')} UTC, {machine()}; "
            f"load average {uptime_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {cpu_minutes:.1f} CPU "
            f"minutes. Median wall seconds per meta-step (ratio: fastest peer / bilevel; > 1 is faster):")
    block = head + "\n\n" + summary_table(records)
    print(block)
    args.md.write_text(block + "\n\n" + "\n\n".join(group_table(r) for r in records) + "\n")
    if args.readme:
        write_readme(ROOT / "README.md", block)
    return records


if __name__ == "__main__":
    main()
