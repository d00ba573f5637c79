"""Meta-steps per second of the Omniglot script with 1 and 2 processes (torchrun, gloo on CPU).

    python -m benchmarks.distributed [--steps 20] [--batch 8] [--config fomaml_5w1s]

Each run trains ``--steps`` meta-steps with one intra-op thread per process and the same global meta-batch, then
the script prints the training wall time and meta-steps/s read from each run's ``results.json``. On a 2-core
machine two processes can at best approach 2x one process; the all-reduce is one message per meta-step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(processes: int, args, out: Path) -> dict:
    overrides = ["--config", args.config, f"meta.batch={args.batch}", f"meta.steps={args.steps}", "eval.every=0",
                 "eval.test_tasks=10", "wandb.mode=disabled", "run.threads=1", "run.checkpoint_every=0",
                 "run.progress=false", f"run.dir={out}"]
    script = str(ROOT / "examples" / "omniglot_fewshot.py")
    launcher = [sys.executable, script] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", script]
    subprocess.run(launcher + overrides, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads((out / "results.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--config", default="fomaml_5w1s")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            result = run(processes, args, Path(tmp) / f"p{processes}")
            seconds = result["train_wall_time_s"]
            rows.append((processes, seconds, args.steps / seconds, result["test"]))
    print(f"{args.config}, meta-batch {args.batch}, {args.steps} meta-steps, load {os.getloadavg()[0]:.1f}")
    print("| processes | training wall s | meta-steps/s | test accuracy (10 tasks) |")
    print("|---|---|---|---|")
    for processes, seconds, rate, test in rows:
        acc = test.get("accuracy") if isinstance(test, dict) else test
        print(f"| {processes} | {seconds:.1f} | {rate:.2f} | {acc} |")


if __name__ == "__main__":
    main()
