"""PNG plots of a tuning run (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """λ (or its 10/50/90% quantiles, for many) and validation / test loss over outer steps."""
    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if "wd" in history[0]:
        ax1.plot(steps, [r["wd"] for r in history], "o-", label="λ")
    else:
        ax1.plot(steps, [r["wd_median"] for r in history], "o-", label="median λ")
        ax1.fill_between(steps, [r["wd_p10"] for r in history], [r["wd_p90"] for r in history], alpha=0.3,
                         label="10-90% of λ")
    ax1.set(yscale="log", xlabel="outer step", ylabel="weight decay λ")
    ax1.legend()
    ax2.plot(steps, [r["val_loss"] for r in history], "o-", label="validation")
    ax2.plot(steps, [r["test_loss"] for r in history], "s--", label="test")
    ax2.set(xlabel="outer step", ylabel="loss")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_landscape(grid: list[dict], history: list[dict], path: Path, title: str, random: list[dict] = ()) -> None:
    """Validation (and test) loss against a scalar λ from the grid, with the hypergradient path drawn on it.

    For many hyperparameters the path is drawn at the geometric mean of λ.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    wd = [p["wd"] for p in grid]
    ax.plot(wd, [p["val_loss"] for p in grid], "-", color="C0", label="grid: validation")
    ax.plot(wd, [p["test_loss"] for p in grid], ":", color="C0", label="grid: test")
    if random:
        ax.plot([p["wd"] for p in random], [p["val_loss"] for p in random], "x", color="C2", label="random search")
    key = "wd" if "wd" in history[0] else "wd_geomean"
    x, y = [r[key] for r in history], [r["val_loss"] for r in history]
    ax.plot(x, y, "o-", color="C3", ms=4, label="hypergradient path" + ("" if key == "wd" else " (geo-mean λ)"))
    ax.plot(x[:1], y[:1], "k>", ms=7)
    ax.set(xscale="log", xlabel="weight decay λ", ylabel="loss")
    lo = min(min(p["val_loss"] for p in grid), min(y))
    hi = max(max(p["val_loss"] for p in grid[: len(grid) * 2 // 3]), max(y))
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
