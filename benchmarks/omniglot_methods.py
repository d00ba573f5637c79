"""Benchmark every hypergradient method and batching option on the Omniglot conv4 meta-step, beside the peers.

    python -m benchmarks.omniglot_methods                      # every suite, then the tables
    python -m benchmarks.omniglot_methods --suite peers methods --repeats 3 --threads 1
    python -m benchmarks.omniglot_methods --tables             # print the tables from the results file only

Workload (``benchmarks/workload.py``): conv4 (``tasks.omniglot.model.Conv4``), 5-way 1-shot, 15 queries per class,
meta-batch 32, inner SGD lr 0.4, iMAML λ = 2 with 5 CG steps. Suites:

- ``peers``: second-order MAML by a plain torch.autograd loop, higher, learn2learn and TorchOpt, and TorchOpt's
  implicit iMAML (CG and normal-CG), at 1 and 5 inner steps;
- ``methods``: bilevel's Unrolled, FirstOrder, Reptile, imaml (CG-5), neumann (5 terms), jfb, each with
  ``batching="loop"``, ``"vmap"`` and ``"vmap"`` with ``chunk_size=8``, at 1 and 5 inner steps;
- ``memory``: peak memory of Unrolled against imaml as the inner steps grow (1, 5, 10, 20, 50; loop batching).

Every configuration runs in a fresh process (``benchmarks/measure.py``) so that its peak resident set is its own.
Results are appended to a JSON-lines file as they come (a rerun skips configurations already there unless
``--fresh``), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "omniglot_methods.jsonl"
METHODS = ("unrolled", "first_order", "reptile", "imaml", "neumann", "jfb")
BATCHINGS = (("loop", None), ("vmap", None), ("vmap", 8))
MEMORY_STEPS = (1, 5, 10, 20, 50)


def suite_configs(suite: str) -> list[dict]:
    if suite == "peers":
        return ([{"impl": impl, "steps": s} for s in (1, 5) for impl in ("autograd", "higher", "learn2learn",
                                                                          "torchopt")]
                + [{"impl": "torchopt_implicit", "method": m, "steps": s} for s in (1, 5) for m in ("cg", "normal_cg")])
    if suite == "methods":
        return [{"impl": "bilevel", "method": m, "steps": s, "batching": b, "chunk_size": c}
                for s in (1, 5) for m in METHODS for b, c in BATCHINGS]
    if suite == "memory":
        return [{"impl": "bilevel", "method": m, "steps": s} for m in ("unrolled", "imaml") for s in MEMORY_STEPS]
    raise ValueError(f"unknown suite {suite!r}; choose from peers, methods, memory")


def key_of(config: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.workload import Config

    return Config(**config).key()


def run(config: dict, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.measure", json.dumps(config), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--mem-limit-gb", str(args.mem_limit_gb)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout,
                          check=False)  # a failed configuration is recorded, not fatal
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        record = json.loads(lines[-1])
    else:
        record = {"key": key_of(config), "config": config, "error": proc.stderr.strip().splitlines()[-1:]}
    record.update(returncode=proc.returncode, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), command=" ".join(cmd[1:3]) + f" '{cmd[3]}' " + " ".join(cmd[4:]))
    return record


def load(path: Path) -> dict[str, dict]:
    """The latest record of each configuration (per thread count) in a results file."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records[(r["key"], r.get("threads"))] = r
    return records


def fmt_time(r: dict | None) -> str:
    if r is None:
        return "—"
    if "median_s" not in r:
        return "failed" if "memory" not in str(r.get("error")) else "> mem limit"
    return f"{r['median_s']:.2f} ({r['median_cpu_s']:.2f})"


def fmt_mem(r: dict | None) -> str:
    if r is None:
        return "—"
    if "peak_rss_gb" not in r:
        return "failed"
    return f"{r['peak_rss_gb']:.2f}" + ("" if "median_s" in r else "+")


def tables(records: dict, threads: int) -> str:
    def get(**config):
        return records.get((key_of(config), threads))

    out = [(f"Meta-step of 32 tasks (5-way 1-shot, 15 queries, conv4), {threads} thread(s): median wall seconds "
            "(process CPU seconds) | peak RSS GB."), ""]
    out += ["| implementation | 1 step: s | GB | 5 steps: s | GB |", "|---|---|---|---|---|"]
    for impl, method, label in (("autograd", "unrolled", "torch.autograd loop (MAML, 2nd order)"),
                                ("higher", "unrolled", "higher (MAML, 2nd order)"),
                                ("learn2learn", "unrolled", "learn2learn (MAML, 2nd order)"),
                                ("torchopt", "unrolled", "TorchOpt MetaSGD (MAML, 2nd order)"),
                                ("torchopt_implicit", "cg", "TorchOpt implicit iMAML, CG-5"),
                                ("torchopt_implicit", "normal_cg", "TorchOpt implicit iMAML, normal-CG-5")):
        row = [get(impl=impl, method=method, steps=s) for s in (1, 5)]
        out.append(f"| {label} | {fmt_time(row[0])} | {fmt_mem(row[0])} | {fmt_time(row[1])} | {fmt_mem(row[1])} |")
    out += ["", "| bilevel method | batching | 1 step: s | GB | 5 steps: s | GB |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        for batching, chunk in BATCHINGS:
            row = [get(impl="bilevel", method=method, steps=s, batching=batching, chunk_size=chunk) for s in (1, 5)]
            name = batching if chunk is None else f"{batching}, chunk {chunk}"
            out.append(f"| {method} | {name} | {fmt_time(row[0])} | {fmt_mem(row[0])} | {fmt_time(row[1])} "
                       f"| {fmt_mem(row[1])} |")
    out += ["", "Peak RSS (GB) against inner steps, loop batching:", "",
            "| method | " + " | ".join(f"{s} steps" for s in MEMORY_STEPS) + " |",
            "|---|" + "---|" * len(MEMORY_STEPS)]
    for method in ("unrolled", "imaml"):
        row = [get(impl="bilevel", method=method, steps=s) for s in MEMORY_STEPS]
        out.append(f"| {method} | " + " | ".join(fmt_mem(r) for r in row) + " |")
        above = [f"{r['peak_rss_gb'] - r['rss_setup_gb']:.2f}" if r and "rss_setup_gb" in r and "median_s" in r
                 else "—" for r in row]
        out.append(f"| {method}, above set-up | " + " | ".join(above) + " |")
    out += ["", targets(get)]
    return "\n".join(out)


def _ratio(theirs: dict, ours: dict) -> str:
    return (f"{theirs['median_s'] / ours['median_s']:.2f}x wall, "
            f"{theirs['median_cpu_s'] / ours['median_cpu_s']:.2f}x CPU")


def _fastest(records: list, field: str = "median_cpu_s") -> dict | None:
    records = [r for r in records if r and field in r]
    return min(records, key=lambda r: r[field]) if records else None


def targets(get) -> str:
    """The issue's speed and memory targets, as measured ratios (fastest by process CPU time)."""
    lines = ["Targets (speed-ups of bilevel's fastest batching over the peer, by wall and by CPU time):"]
    peer = _fastest([get(impl=p, method="unrolled", steps=1) for p in ("higher", "learn2learn", "torchopt")])
    ours = _fastest([get(impl="bilevel", method="unrolled", steps=1, batching=b, chunk_size=c) for b, c in BATCHINGS])
    if peer and ours:
        lines.append(f"- MAML 1-step, second order: fastest peer {peer['key']} {peer['median_s']:.2f} s "
                     f"({peer['median_cpu_s']:.2f} CPU), bilevel {ours['key']} {ours['median_s']:.2f} s "
                     f"({ours['median_cpu_s']:.2f} CPU): {_ratio(peer, ours)} (target >= 2x)")
    for steps in (1, 5):
        theirs = get(impl="torchopt_implicit", method="cg", steps=steps)
        ours = _fastest([get(impl="bilevel", method="imaml", steps=steps, batching=b, chunk_size=c)
                         for b, c in BATCHINGS])
        if theirs and "median_s" in theirs and ours:
            lines.append(f"- iMAML CG-5, {steps} inner step(s): TorchOpt {theirs['median_s']:.2f} s "
                         f"({theirs['median_cpu_s']:.2f} CPU), bilevel {ours['key']} {ours['median_s']:.2f} s "
                         f"({ours['median_cpu_s']:.2f} CPU): {_ratio(theirs, ours)} (target >= 2x)")
    for method in ("imaml", "unrolled"):
        mem = {s: get(impl="bilevel", method=method, steps=s) for s in (5, 50)}
        if all(r and "peak_rss_gb" in r for r in mem.values()):
            lines.append(f"- {method} peak RSS, 50 steps / 5 steps: "
                         f"{mem[50]['peak_rss_gb'] / mem[5]['peak_rss_gb']:.2f}x"
                         + (" (target <= 1.1x)" if method == "imaml" else ""))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", default=["peers", "methods", "memory"])
    parser.add_argument("--only", default="", help="run only configurations whose key contains this string")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--fresh", action="store_true", help="rerun configurations already in --out")
    parser.add_argument("--tables", action="store_true", help="only print the tables from --out")
    args = parser.parse_args(argv)

    if not args.tables:
        from tqdm import tqdm

        args.out.parent.mkdir(parents=True, exist_ok=True)
        done = load(args.out)
        todo = [c for s in args.suite for c in suite_configs(s)
                if args.only in key_of(c) and (args.fresh or (key_of(c), args.threads) not in done)]
        for config in tqdm(todo, desc="configurations"):
            try:
                record = run(config, args)
            except subprocess.TimeoutExpired:
                record = {"key": key_of(config), "config": config, "threads": args.threads,
                          "error": f"timeout after {args.timeout} s"}
            record.setdefault("threads", args.threads)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(f"{record['key']}: {fmt_time(record)} s, {fmt_mem(record)} GB, load {record.get('load_before')}")
    print(tables(load(args.out), args.threads))


if __name__ == "__main__":
    main()
