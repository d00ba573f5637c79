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




def noise_table(root: Path) -> str:
    """Per-feature decay with appended noise features, one line per seed: against the best scalar λ of the grid."""
    lines = [
        "| run | best scalar λ (grid) | scalar val / test | per-feature val / test | test better? | "
        "geo-mean λ real | geo-mean λ noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, r in rows(root):
        h = r["hypergrad"]
        if "geomean_wd_noise_features" not in h:
            continue
        g = r["grid"]["best"]
        lines.append(
            f"| {path.parent.relative_to(root)} | {g['wd']:.2g} | {g['val_loss']:.4f} / {g['test_loss']:.4f} | "
            f"{h['final']['val_loss']:.4f} / {h['final']['test_loss']:.4f} | "
            f"{'yes' if h['final']['test_loss'] < g['test_loss'] else 'no'} | "
            f"{h['geomean_wd_real_features']:.2g} | {h['geomean_wd_noise_features']:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/weight_decay")
    print(table(root) + "\n\n" + noise_table(root))
