"""Learning curves and time to accuracy of Omniglot runs, finished or still training.

Usage::

    python -m tasks.omniglot.report runs/omniglot/maml_5w1s runs/omniglot/fomaml_5w1s ...

For each run folder it reads ``checkpoint.pt`` (the curves are in its history, so a run still training can be
reported; its ``curves.png`` is redrawn, while a finished run keeps the one its test drew), and prints one Markdown
row: method, setting, meta-steps x tasks reached, training CPU minutes, best validation accuracy, the CPU minutes
and meta-steps at which validation first reached 95 % and 97 %, and the test accuracy of ``results.json``. A
combined plot of validation accuracy against training CPU minutes and against meta-steps goes to ``--out``
(default ``runs/omniglot/curves.png``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .run_folder import load_checkpoint
from .train import _plot_curves

__all__ = ["summarise", "main"]


def _first_reaching(history: dict, level: float):
    for step, acc, cpu in zip(history["val_step"], history["val_acc"], history.get("val_cpu", [])):
        if acc >= level and not math.isnan(cpu):
            return step, cpu / 60
    return None


def summarise(run: Path) -> dict:
    """The figures of one run folder, from its ``checkpoint.pt``."""
    state = load_checkpoint(run / "checkpoint.pt")
    cfg, history = state["config"], state["history"]
    t = cfg["task"]
    best = max(range(len(history["val_acc"])), key=history["val_acc"].__getitem__, default=None)
    return {
        "run": run.name, "method": cfg["method"]["name"], "setting": f"{t['ways']}-way {t['shots']}-shot",
        "steps": state["step"], "batch": cfg["meta"]["batch"], "cpu_min": state.get("cpu", float("nan")) / 60,
        "best_val": None if best is None else (history["val_step"][best], history["val_acc"][best],
                                               history["val_ci"][best]),
        "to95": _first_reaching(history, 0.95), "to97": _first_reaching(history, 0.97), "history": history,
        "config": cfg, "test": _test(run),
    }


def _test(run: Path):
    """``(accuracy, ci95, step tested)`` from the run's ``results.json``, or ``None`` while it trains."""
    path = run / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results["test"]["accuracy"], results["test"]["ci95"], results["tested_weights"]["step"]


def _row(s: dict) -> str:
    def reach(r):
        return "not yet" if r is None else f"{r[1]:.0f} min (step {r[0]:,})"
    val = "–" if s["best_val"] is None else f"{100 * s['best_val'][1]:.2f} ± {100 * s['best_val'][2]:.2f} % " \
                                           f"(step {s['best_val'][0]:,})"
    test = "–" if s["test"] is None else f"{100 * s['test'][0]:.2f} ± {100 * s['test'][1]:.2f} % " \
                                         f"(step {s['test'][2]:,})"
    return (f"| {s['run']} | {s['method']} | {s['setting']} | {s['steps']:,} x {s['batch']} | {s['cpu_min']:.0f} | "
            f"{val} | {reach(s['to95'])} | {reach(s['to97'])} | {test} |")


def _plot_combined(path: Path, runs: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors  # the default cycle repeats after 10 runs
    for s, color in zip(runs, colors * (1 + len(runs) // len(colors))):
        h = s["history"]
        label = f"{s['run']} ({s['method']}, {s['setting']})"
        ax_t.plot([c / 60 for c in h.get("val_cpu", [])], h["val_acc"], "o-", ms=2, color=color, label=label)
        ax_s.plot(h["val_step"], h["val_acc"], "o-", ms=2, color=color, label=label)
    for ax, xlabel in ((ax_t, "training CPU minutes (one thread)"), (ax_s, "meta-step")):
        ax.axhline(0.95, color="grey", lw=0.6, ls="--")
        ax.axhline(0.97, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    ax_s.legend(fontsize=7)
    fig.suptitle("Omniglot: validation accuracy (best-so-far weights are what the test uses)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding checkpoint.pt")
    parser.add_argument("--out", type=Path, default=Path("runs/omniglot/curves.png"), help="combined plot")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "checkpoint.pt").is_file()]
    if missing:
        raise SystemExit(f"error: no checkpoint.pt in {', '.join(missing)}; give training run folders.")
    runs = [summarise(r) for r in args.runs]
    print("| run | method | setting | meta-steps x tasks | CPU min | best validation | to 95 % val | to 97 % val | "
          "test (600 tasks) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in runs:
        print(_row(s))
        if s["test"] is None:   # a finished run keeps the curves its test drew (their title holds the result)
            _plot_curves(args.runs[runs.index(s)] / "curves.png", s["history"],
                         f"{s['run']}: {s['method']}, {s['setting']}; {s['steps']} meta-steps x {s['batch']} tasks, "
                         f"{s['cpu_min']:.0f} CPU min")
    _plot_combined(args.out, runs)
    return runs


if __name__ == "__main__":
    main()
