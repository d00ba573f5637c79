"""Meta-step time on a GPU: second-order MAML, first-order MAML and iMAML, task batching by loop against vmap.

    python -m benchmarks.gpu                          # on a machine with CUDA
    python -m benchmarks.gpu --device cuda:1 --repeats 20
    python -m benchmarks.gpu --device cpu --tasks 2   # the same code on the CPU, to check the script

The workload is ``benchmarks/workload.py``'s (conv4, 5-way 1-shot, 15 queries per class, meta-batch 32, inner SGD
lr 0.4, iMAML λ = 2), built by its helpers and moved to the device:

- MAML, second order (``Unrolled``), 1 inner step;
- first-order MAML (``FirstOrder``), 1 inner step;
- iMAML (``imaml``, CG-5), 5 inner steps;

each with ``batching="loop"`` and ``batching="vmap"``. Every configuration is warmed up (``--warmup`` untimed steps,
which also let cuDNN pick its kernels), then each of ``--repeats`` meta-steps is timed between two
``torch.cuda.synchronize()`` calls, since CUDA kernels run asynchronously. Prints one Markdown table (median seconds
per meta-step, loop / vmap speed-up, peak memory allocated by torch) and appends the raw numbers to ``--out``.
Without a CUDA device it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from benchmarks.workload import Config, make_bilevel_step, make_data, make_model

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("MAML, second order", "unrolled", 1), ("first-order MAML", "first_order", 1), ("iMAML, CG-5", "imaml", 5))
BATCHINGS = ("loop", "vmap")


def build(cfg: Config, device: torch.device):
    """``workload``'s bilevel meta-step with the model and the data on ``device``."""
    model = make_model(cfg).to(device)
    data = pytree.tree_map(lambda t: t.to(device), make_data(cfg))
    return make_bilevel_step(cfg, model, data)


def time_step(step, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall time of ``repeats`` meta-steps after ``warmup`` ones, and the peak memory (CUDA only)."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # noqa: E731
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grad = step()
        sync()
        times.append(time.perf_counter() - start)
    finite = all(bool(torch.isfinite(g).all()) for g in grad.values())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"times": times, "median_s": statistics.median(times), "peak_gb": peak, "grad_finite": finite}


def measure(cfg: Config, device: torch.device, warmup: int, repeats: int) -> dict:
    try:
        return time_step(build(cfg, device), device, warmup, repeats)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def table(results: dict) -> str:
    def seconds(r):
        return r.get("error") or f"{r['median_s']:.3f}" + ("" if r["grad_finite"] else " (non-finite)")

    def memory(r):
        return "n/a" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}"

    lines = ["| method | inner steps | loop s | vmap s | loop / vmap | peak GB loop | peak GB vmap |",
             "|---|---|---|---|---|---|---|"]
    for label, method, steps in ROWS:
        loop, vmap = results[method]["loop"], results[method]["vmap"]
        ratio = (f"{loop['median_s'] / vmap['median_s']:.2f}x" if "median_s" in loop and "median_s" in vmap
                 else "n/a")
        lines.append(f"| {label} | {steps} | {seconds(loop)} | {seconds(vmap)} | {ratio} | {memory(loop)} | "
                     f"{memory(vmap)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to check the script")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "gpu.jsonl")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu: no GPU found (torch {torch.__version__}, torch.cuda.is_available() is False); "
              f"nothing measured.")
        return 0

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = {}
    for _, method, steps in ROWS:
        results[method] = {}
        for batching in BATCHINGS:
            cfg = Config(impl="bilevel", method=method, steps=steps, batching=batching, tasks=args.tasks)
            results[method][batching] = measure(cfg, device, args.warmup, args.repeats)
            print(f"{cfg.key()}: {results[method][batching].get('median_s', results[method][batching].get('error'))}",
                  file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Meta-step on {name} ({device}), torch {torch.__version__}: conv4, 5-way 1-shot, meta-batch "
          f"{args.tasks}; median of {args.repeats} steps after {args.warmup} warm-up; {date}\n")
    print(table(results), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps({"date": date, "device": str(device), "device_name": name, "torch": torch.__version__,
                            "tasks": args.tasks, "warmup": args.warmup, "repeats": args.repeats,
                            "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
