"""Markdown tables from the ``results.json`` files of tuning runs.

    python -m tasks.weight_decay.report runs/weight_decay
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path):
    for path in sorted(root.rglob("results.json")):
        yield path, json.loads(path.read_text())


def table(root: Path) -> str:
    """One line per run: hypergradient against grid (and random) search, validation and test, with costs."""
    lines = [
        "| run | method | hparams | hypergrad val / test | solves | inner steps | HVPs | time | grid-30 best λ | "
        "grid val / test | solves | inner steps | time | random best val / test | val gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in rows(root):
        h, g, rnd = r["hypergrad"], r["grid"], r["random"]
        hc, gc = h["cost"], g["cost"]
        rand = f"{rnd['best']['val_loss']:.4f} / {rnd['best']['test_loss']:.4f}" if rnd.get("best") else "-"
        lines.append(
            f"| {path.parent.relative_to(root)} | {r['config']['outer']['method']} | {r['n_hparams']} | "
            f"{h['final']['val_loss']:.4f} / {h['final']['test_loss']:.4f} | {hc['inner_solves']} | "
            f"{hc['inner_steps']} | {hc['hvps']} | {hc['seconds']:.0f}s | {g['best']['wd']:.2g} | "
            f"{g['best']['val_loss']:.4f} / {g['best']['test_loss']:.4f} | {gc['inner_solves']} | "
            f"{gc['inner_steps']} | {gc['seconds']:.0f}s | {rand} | {100 * h['val_gap_to_grid_best']:+.2f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/weight_decay")))
