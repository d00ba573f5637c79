"""Time one benchmark configuration and report its peak memory, in a process of its own.

    python -m benchmarks.measure '{"impl": "bilevel", "method": "imaml", "steps": 5}' --repeats 3

Prints one JSON line: the configuration, every timed meta-step (seconds, after ``--warmup`` untimed ones), the
median, the process CPU time of each (less sensitive than wall time to other jobs on a shared machine), the
resident set size after set-up and its peak (``ru_maxrss``: what the process really held, allocator
caches included, unlike ``tracemalloc`` which does not see torch's allocations), and the load average before and
after. A watchdog ends the process, with an error line, if its resident set exceeds ``--mem-limit-gb``: the
machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time
import warnings


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def watchdog(limit_gb: float, record: dict):
    while True:
        if rss_gb() > limit_gb:
            record.update(error=f"resident set above --mem-limit-gb={limit_gb}", peak_rss_gb=rss_gb())
            print(json.dumps(record), flush=True)
            os._exit(3)
        time.sleep(0.05)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="JSON object of benchmarks.workload.Config fields")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (this machine has 2 cores)")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt still calls functorch.vjp
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from benchmarks.workload import Config, make_step

    cfg = Config(**json.loads(args.config))
    record = {"key": cfg.key(), "config": vars(cfg), "threads": args.threads, "torch": torch.__version__,
              "load_before": os.getloadavg()}
    threading.Thread(target=watchdog, args=(args.mem_limit_gb, record), daemon=True).start()

    step = make_step(cfg)
    record["rss_setup_gb"] = rss_gb()
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        grad = step()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if i >= args.warmup:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
    flat = torch.cat([g.detach().flatten() for g in grad.values()])
    record.update(times=times, median_s=statistics.median(times), cpu_times=cpu_times,
                  median_cpu_s=statistics.median(cpu_times), peak_rss_gb=peak_rss_gb(),
                  grad_norm=flat.norm().item(), grad_finite=bool(torch.isfinite(flat).all()),
                  load_after=os.getloadavg())
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
