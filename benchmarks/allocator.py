"""How the memory allocator changes the speed of one MAML meta-step, for bilevel and for a peer.

    python -m benchmarks.allocator --rounds 5 --repeats 5
    python -m benchmarks.allocator --allocators glibc glibc-thresholds jemalloc jemalloc-retain tcmalloc
    python -m benchmarks.allocator --impls bilevel torchopt --allocators glibc glibc-thresholds --tasks 8

Why: glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` (128 KiB at first, raised as such blocks
are freed, but never above 32 MiB) with a fresh ``mmap``, and gives the top of its heap back to the kernel once more
than ``M_TRIM_THRESHOLD`` is free there. Either way the next meta-step writes to pages the kernel must map anew: one
minor page fault, and a page zeroed, per 4 KiB. The activations of one task of the conv4 network are of that size
(75 queries x 64 channels x 28 x 28 floats = 15 MB), allocated and freed for every task of every meta-step.

Allocators (``--allocators``):

- ``glibc``: the default environment (``MALLOC_*``, ``GLIBC_TUNABLES`` and ``LD_PRELOAD`` removed); the reference
  of every speed-up;
- ``glibc-thresholds``: ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 1 GiB: every block from the
  heap, which is never trimmed, so freed pages are reused rather than returned. ``MALLOC_TOP_PAD_`` is left alone:
  it only enlarges each growth of the heap, and an untrimmed heap stops growing after the warm-up;
- ``jemalloc``, ``tcmalloc``: Debian's ``libjemalloc2`` and ``libtcmalloc-minimal4`` through ``LD_PRELOAD``, fetched
  with ``apt-get download`` and unpacked with ``dpkg -x`` under ``--cache`` (nothing installed, no root needed); one
  that cannot be fetched is skipped with a note;
- ``jemalloc-retain`` (not run by default): jemalloc keeping the pages it frees (``MALLOC_CONF`` with
  ``dirty_decay_ms:-1,muzzy_decay_ms:-1``). By default jemalloc serves blocks above ``oversize_threshold`` (8 MiB)
  from an arena that returns them to the kernel at once, so its large blocks fault like glibc's ``mmap`` ones.

Each (round, allocator) is a process of its own that checks its allocator is the one in effect (the preloaded
library mapped in ``/proc/self/maps`` and jemalloc's ``opt.dirty_decay_ms``; for glibc, whether a 64 MiB block
comes from the heap or from ``mmap``),
builds the workload (``benchmarks/workload.py``), runs ``--warmup`` untimed meta-steps of each implementation, then
``--repeats`` timed ones, the implementations interleaved. Per meta-step it records wall and process CPU time, the
minor page faults (``ru_minflt`` delta) and the peak resident set during that step (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``: memory the allocator keeps from other steps counts, as it is held). Rounds go
over the allocators in turn, starting one further each round, so that a change in the machine's load hits all of
them alike. The table gives medians over all rounds and repeats; raw records go to ``--out`` as JSON lines.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = str(2**30)
# name -> environment variables set in its child (on top of a default environment).
ALLOCATORS = {
    "glibc": {},
    "glibc-thresholds": {"MALLOC_MMAP_THRESHOLD_": GIB, "MALLOC_TRIM_THRESHOLD_": GIB},
    "jemalloc": {},
    "jemalloc-retain": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
    "tcmalloc": {},
}
DEFAULT_ALLOCATORS = ("glibc", "glibc-thresholds", "jemalloc", "tcmalloc")
# name -> (Debian package, the shared library in it to preload)
PRELOADS = {"jemalloc": ("libjemalloc2", "libjemalloc.so.2"), "jemalloc-retain": ("libjemalloc2", "libjemalloc.so.2"),
            "tcmalloc": ("libtcmalloc-minimal4", "libtcmalloc_minimal.so.4")}
# Inherited variables that would change the allocator of the reference run.
CLEARED = ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "MALLOC_CONF", "TCMALLOC_")
IMPLS = ("bilevel", "autograd", "higher", "learn2learn", "torchopt")   # the second-order MAML ones of the workload
PROBE_BYTES = 64 << 20   # above glibc's largest dynamic mmap threshold (32 MiB): from mmap unless raised
CHILD_TIMEOUT_S = 3600
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bilevel-benchmarks"


class FetchError(RuntimeError):
    pass


def fetch_preload(name: str, cache: Path) -> Path:
    """The allocator library of ``name``, unpacked from its Debian package under ``cache`` (fetched once)."""
    package, soname = PRELOADS[name]
    target = cache / package
    found = sorted(target.rglob(soname)) if target.exists() else []
    if found:
        return found[0].resolve()
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise FetchError(f"{' and '.join(missing)} not found, needed to fetch {package}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired:
            raise FetchError(f"apt-get download {package} timed out") from None
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode or not debs:
            last = (proc.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise FetchError(f"apt-get download {package} failed: {last}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True, capture_output=True)
    found = sorted(target.rglob(soname))
    if not found:
        raise FetchError(f"{soname} not found in {debs[0].name}")
    return found[0].resolve()


def child_env(name: str, cache: Path, threads: int) -> dict:
    """The environment of a child process running under allocator ``name``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_",) + CLEARED)}
    env.update(ALLOCATORS[name], OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if name in PRELOADS:
        env["LD_PRELOAD"] = str(fetch_preload(name, cache))
    return env


# ---------------------------------------------------------------- in the child process


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {parts[5] for parts in (line.split() for line in f) if len(parts) >= 6}


def probe_from_heap(nbytes: int = PROBE_BYTES) -> bool:
    """Whether glibc serves a block of ``nbytes`` from its heap (``[heap]``) rather than from its own ``mmap``."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    ptr = libc.malloc(nbytes)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("[heap]"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    return lo <= ptr < hi
        return False
    finally:
        libc.free(ptr)


def jemalloc_dirty_decay_ms(path: str) -> int:
    """jemalloc's ``opt.dirty_decay_ms`` (-1: freed pages are kept), read through its ``mallctl``."""
    lib = ctypes.CDLL(path)
    lib.mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    value, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    if lib.mallctl(b"opt.dirty_decay_ms", ctypes.byref(value), ctypes.byref(size), None, 0):
        raise RuntimeError(f"mallctl('opt.dirty_decay_ms') failed in {path}")
    return value.value


def check_preload(name: str) -> str | None:
    """Raise unless the allocator library of ``name`` (and no other one) is mapped in this process."""
    maps = mapped_files()
    if name in PRELOADS:
        path = os.environ.get("LD_PRELOAD", "")
        if not path or str(Path(path).resolve()) not in maps:
            raise RuntimeError(f"{name}: {path or 'LD_PRELOAD (unset)'} is not mapped in this process; "
                               f"the preload did not take effect")
        if name.startswith("jemalloc") and (jemalloc_dirty_decay_ms(path) == -1) != (name == "jemalloc-retain"):
            raise RuntimeError(f"{name}: jemalloc's dirty_decay_ms is {jemalloc_dirty_decay_ms(path)}; "
                               f"MALLOC_CONF is not as intended")
        return path
    foreign = sorted(p for p in maps if any(soname.split(".")[0] in p for _, soname in PRELOADS.values()))
    if foreign:
        raise RuntimeError(f"{name}: another allocator is mapped ({foreign[0]}); clear LD_PRELOAD")
    return None


def check_thresholds(name: str) -> bool | None:
    """Raise unless glibc's mmap threshold is what ``name`` asks for; run after the timing (it grows the heap)."""
    if name in PRELOADS:
        return None
    from_heap = probe_from_heap()
    if from_heap != (name == "glibc-thresholds"):
        raise RuntimeError(f"{name}: a {PROBE_BYTES >> 20} MiB block came from "
                           f"{'the heap' if from_heap else 'mmap'}; MALLOC_MMAP_THRESHOLD_ is not as intended")
    return from_heap


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return int(match.group(1)) / 1024 if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args) -> dict:
    """Time the meta-steps under the allocator this process was started with; return one JSON-able record."""
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt still calls functorch.vjp
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from benchmarks.workload import Config, make_step

    name = args.child
    record = {"allocator": name, "preload": check_preload(name),
              "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_",) + CLEARED)},
              "threads": args.threads, "tasks": args.tasks, "steps": args.steps, "repeats": args.repeats,
              "warmup": args.warmup, "torch": torch.__version__, "load_before": os.getloadavg()}
    configs = {impl: Config(impl=impl, steps=args.steps, tasks=args.tasks) for impl in args.impls}
    steps = {impl: make_step(cfg) for impl, cfg in configs.items()}
    results = {impl: {"key": configs[impl].key(), "wall": [], "cpu": [], "minflt": [], "majflt": [],
                      "peak_rss_mib": []} for impl in steps}
    grads = {}
    peak_per_step = True
    for i in range(args.warmup + args.repeats):
        for impl, step in steps.items():
            peak_per_step &= reset_peak_rss()
            before = resource.getrusage(resource.RUSAGE_SELF)
            start, cpu_start = time.perf_counter(), time.process_time()
            grads[impl] = step()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            after = resource.getrusage(resource.RUSAGE_SELF)
            if i >= args.warmup:
                r = results[impl]
                r["wall"].append(wall)
                r["cpu"].append(cpu)
                r["minflt"].append(after.ru_minflt - before.ru_minflt)
                r["majflt"].append(after.ru_majflt - before.ru_majflt)
                r["peak_rss_mib"].append(peak_rss_mib())
    for impl, grad in grads.items():
        flat = torch.cat([g.detach().flatten() for g in grad.values()])
        results[impl]["grad_norm"] = flat.norm().item()
    record.update(impls=results, peak_rss_scope="step" if peak_per_step else "process",
                  probe_from_heap=check_thresholds(name), load_after=os.getloadavg())
    return record


# ---------------------------------------------------------------- in the parent process


def spawn(name: str, env: dict, args) -> dict:
    """One child process under allocator ``name``; its record, or RuntimeError with the end of its stderr."""
    cmd = [sys.executable, "-m", "benchmarks.allocator", "--child", name, "--impls", *args.impls,
           "--tasks", str(args.tasks), "--steps", str(args.steps), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name}: the child process took more than {CHILD_TIMEOUT_S} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
        raise RuntimeError(f"{name}: the child process failed: {tail}")
    return json.loads(lines[-1])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def summarise(records: dict[str, list[dict]], impls: list[str]) -> list[dict]:
    """One row per (allocator, impl): medians over every timed meta-step of every round; speed-ups over glibc."""
    rows = []
    for name, recs in records.items():
        for impl in impls:
            runs = [r["impls"][impl] for r in recs]
            pooled = lambda field: [x for run in runs for x in run[field]]  # noqa: E731
            rows.append({"allocator": name, "impl": impl, "key": runs[0]["key"], "rounds": len(runs),
                         "wall_s": statistics.median(pooled("wall")), "cpu_s": statistics.median(pooled("cpu")),
                         "minflt_per_step": statistics.median(pooled("minflt")),
                         "peak_rss_mib": max(pooled("peak_rss_mib")), "grad_norm": runs[0]["grad_norm"]})
    base = {row["impl"]: row for row in rows if row["allocator"] == "glibc"}
    for row in rows:
        ref = base[row["impl"]]
        row["speedup_wall"] = ref["wall_s"] / row["wall_s"]
        row["speedup_cpu"] = ref["cpu_s"] / row["cpu_s"]
        row["grad_rel_diff"] = abs(row["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocators", nargs="+", default=list(DEFAULT_ALLOCATORS), choices=list(ALLOCATORS))
    parser.add_argument("--impls", nargs="+", default=["bilevel", "learn2learn"], choices=IMPLS,
                        help="benchmarks.workload implementations (second-order MAML, bilevel's Unrolled loop)")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--steps", type=int, default=1, help="inner gradient steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (this machine has 2 cores)")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per allocator, taken in turn")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps of each impl per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-steps of each impl per child")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where jemalloc/tcmalloc are unpacked")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "allocator.jsonl")
    parser.add_argument("--child", choices=list(ALLOCATORS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return None
    if "glibc" not in args.allocators:
        parser.error("--allocators must include glibc: every speed-up is over it")
    if min(args.rounds, args.repeats) < 1 or args.warmup < 0:
        parser.error("--rounds and --repeats must be at least 1, --warmup at least 0")

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    uptime_before = uptime()
    notes, envs = [], {}
    for name in dict.fromkeys(args.allocators):
        try:
            envs[name] = child_env(name, args.cache, args.threads)
        except (FetchError, subprocess.CalledProcessError) as err:
            notes.append(f"{name}: skipped ({err})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = {name: [] for name in envs}
    for rnd in range(args.rounds):
        names = list(records)
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            if name not in records:
                continue
            try:
                record = spawn(name, envs[name], args)
            except RuntimeError as err:
                if name == "glibc":
                    raise
                notes.append(f"{name}: dropped in round {rnd} ({err})")
                records.pop(name)
                continue
            record.update(kind="child", round=rnd, date=date)
            records[name].append(record)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    uptime_after = uptime()

    rows = summarise(records, args.impls)
    notes += [f"{r['allocator']}/{r['impl']}: meta-gradient norm differs from glibc's by {r['grad_rel_diff']:.1e}"
              for r in rows if r["grad_rel_diff"] > 1e-4]
    print(f"MAML second order, {args.steps} inner step(s), {args.tasks} tasks, {args.threads} thread(s); medians "
          f"of {args.rounds} round(s) x {args.repeats} meta-steps, one process per allocator and round; {date}")
    print(f"uptime before: {uptime_before}")
    print("| allocator | impl | wall s | CPU s | speed-up over glibc (wall) | speed-up over glibc (CPU) "
          "| minor faults / meta-step | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['allocator']} | {r['impl']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['speedup_wall']:.2f}x "
              f"| {r['speedup_cpu']:.2f}x | {r['minflt_per_step']:.0f} | {r['peak_rss_mib']:.0f} |")
    print(f"uptime after: {uptime_after}")
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()
    with args.out.open("a") as f:
        f.write(json.dumps({"kind": "summary", "date": date, "argv": sys.argv[1:] if argv is None else list(argv),
                            "uptime_before": uptime_before, "uptime_after": uptime_after, "notes": notes,
                            "rows": rows}) + "\n")
    return rows


if __name__ == "__main__":
    main()
