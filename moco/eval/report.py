"""Writing evaluation results: console tables, CSV and JSON files, the loss-curve figure."""

import csv
import json
import math
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def knn_table(
    results: dict[tuple[int, float], float], ks: list[int], temperatures: list[float]
) -> str:
    """Top-1 (%) with one row per k and one column per temperature."""
    lines = ["    k | " + " ".join(f"T={t:<6g}" for t in temperatures)]
    lines.append("-" * len(lines[0]))
    for k in ks:
        lines.append(f"{k:5d} | " + " ".join(f"{results[(k, t)]:8.2f}" for t in temperatures))
    return "\n".join(lines)


def rows_table(rows: list[dict]) -> str:
    """A plain fixed-width table of dicts with the same keys."""
    cells = [[_fmt(v) for v in row.values()] for row in rows]
    widths = [max(len(str(h)), *(len(c[i]) for c in cells)) for i, h in enumerate(rows[0])]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(rows[0], widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return (
            f"{value:.4g}"
            if (value != 0 and abs(value) < 0.01) or math.isnan(value)
            else f"{value:.2f}"
        )
    return str(value)


def plot_loss_curves(
    path: Path, curves: dict[str, np.ndarray], steps_per_epoch: int, title: str
) -> None:
    """Training loss per optimizer against epochs, log scale. Each curve is the trailing mean
    over the last epoch of steps (fewer at the start): single-batch losses are too noisy to
    compare six lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, losses in curves.items():
        sums = np.concatenate([[0.0], np.cumsum(np.asarray(losses, dtype=float))])
        ends = np.arange(1, len(losses) + 1)
        starts = np.maximum(ends - steps_per_epoch, 0)
        trailing = (sums[ends] - sums[starts]) / (ends - starts)
        ax.plot(ends / steps_per_epoch, trailing, label=label, linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
