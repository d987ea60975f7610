"""The Results table and kNN-per-epoch figure, from the outputs of reproduce_results.sh.

Layout of a results directory (what scripts/reproduce_results.sh writes):
- ``<run>/``: a pretraining run (``logs/metrics.csv``, ``checkpoints/``), with ``wall_seconds``
  and ``command`` written by the script around it; the table's time is the run's own count
  (``time/train_s`` in metrics.csv, all parts of a resumed run) where the run logged it, else
  ``wall_seconds`` (the command's wall time: the last part only, if it was resumed);
- ``knn_<row>/knn.json`` and ``compare_<row>/compare.json``: kNN sweep and the linear probe with
  the six optimizers, for every row, the baselines ``raw`` and ``random`` included;
  ``knn_<row>/command``: the kNN command, the table's command for rows without pretraining.

A run's kNN curve is also kept as a small CSV of its own (``save_curve``, in docs/curves/), so
that the figure can still draw a run whose directory is gone, beside runs made later.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

PROBE_OPTIMIZER = "momentum"  # the MoCo protocol's probe optimizer: the table's probe column


@dataclass
class Row:
    name: str  # directory suffix: knn_<name>, compare_<name>, and the run directory if trained
    label: str


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_text(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _minutes(seconds: str | None) -> str:
    return "-" if seconds is None else f"{float(seconds) / 60:.0f} min"


def table_row(results: Path, row: Row) -> dict:
    """The figures of one row; missing pieces are None (the table shows '-')."""
    knn = _read_json(results / f"knn_{row.name}" / "knn.json") or {}
    compare = _read_json(results / f"compare_{row.name}" / "compare.json") or {}
    probe = {r["optimizer"]: r["top1"] for r in compare.get("results", [])}
    run = results / row.name
    return {
        "label": row.label,
        "knn": knn.get("top1", {}).get("top1"),
        "knn_best": knn.get("best", {}).get("top1"),
        "knn_best_at": (
            f"k={knn['best']['k']}, T={knn['best']['temperature']}" if "best" in knn else ""
        ),
        "probe": probe.get(PROBE_OPTIMIZER),
        "probe_range": (min(probe.values()), max(probe.values())) if probe else None,
        "epochs": knn["epoch"] + 1 if knn.get("epoch") is not None else None,
        "wall": _training_seconds(run) or _read_text(run / "wall_seconds"),
        # The pretraining command; for the baselines, the evaluation's.
        "command": _read_text(run / "command")
        or _read_text(results / f"knn_{row.name}" / "command"),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| features | kNN top-1 (k=200, T=0.1) | kNN best of sweep | linear probe "
        f"({PROBE_OPTIMIZER}) | probe, six optimizers | epochs | pretraining | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = _percent(r["knn_best"]) + (f" ({r['knn_best_at']})" if r["knn_best_at"] else "")
        spread = "-" if r["probe_range"] is None else "{:.2f}-{:.2f}".format(*r["probe_range"])
        command = f"`{r['command']}`" if r["command"] else "-"
        lines.append(
            f"| {r['label']} | {_percent(r['knn'])} | {best} | {_percent(r['probe'])} | "
            f"{spread} | {r['epochs'] or '-'} | {_minutes(r['wall'])} | {command} |"
        )
    return "\n".join(lines) + "\n"


def _last_logged(run_dir: Path, key: str) -> str | None:
    """The last value of ``key`` in the run's metrics.csv, or None."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        values = [r[key] for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return values[-1] if values else None


def _training_seconds(run_dir: Path) -> str | None:
    return _last_logged(run_dir, "time/train_s")


def _per_epoch(run_dir: Path, *keys: str) -> dict[str, dict[int, float]]:
    """{key: {epoch (1-based): value}} of each of ``keys`` as the run's metrics.csv logged them
    (last value wins), in one pass over the file."""
    points: dict[str, dict[int, float]] = {key: {} for key in keys}
    with (run_dir / "logs" / "metrics.csv").open() as f:
        for record in csv.DictReader(f):
            for key in keys:
                value = record.get(key)
                if value not in (None, "") and not math.isnan(float(value)):
                    points[key][int(record["epoch"]) + 1] = float(value)
    return points


def knn_per_epoch(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, knn_top1) as the online monitor logged them, in epoch order (1-based epochs)."""
    return sorted(_per_epoch(run_dir, "knn_top1")["knn_top1"].items())


def knn_per_minute(run_dir: Path) -> list[tuple[float, float]]:
    """(training minutes at the end of the epoch, knn_top1), for the epochs with both logged."""
    return [(minutes, knn) for _, minutes, knn in _knn_curve(run_dir) if minutes is not None]


def _knn_curve(run_dir: Path) -> list[tuple[int, float | None, float]]:
    """(epoch, training minutes at its end or None where no clock was logged, knn_top1), in epoch
    order."""
    logged = _per_epoch(run_dir, "knn_top1", "time/train_s")
    knn, seconds = logged["knn_top1"], logged["time/train_s"]
    return [(e, seconds[e] / 60 if e in seconds else None, knn[e]) for e in sorted(knn)]


CURVE_COLUMNS = ("epoch", "training_minutes", "knn_top1")


def save_curve(run_dir: Path, path: Path) -> None:
    """The run's online kNN after each epoch, with the training minutes at that epoch's end
    (empty where the run logged no clock), as CSV with the columns of ``CURVE_COLUMNS``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(CURVE_COLUMNS)
        for epoch, minutes, knn in _knn_curve(run_dir):
            out.writerow([epoch, "" if minutes is None else f"{minutes:.2f}", f"{knn:.2f}"])


def load_curve(path: Path) -> tuple[list[tuple[int, float]], list[tuple[float, float]]]:
    """What ``save_curve`` wrote: (epoch, kNN) and (training minutes, kNN) points, as
    ``knn_per_epoch`` and ``knn_per_minute`` give them for a run directory."""
    with path.open() as f:
        records = list(csv.DictReader(f))
    per_epoch = [(int(r["epoch"]), float(r["knn_top1"])) for r in records]
    per_minute = [
        (float(r["training_minutes"]), float(r["knn_top1"]))
        for r in records
        if r["training_minutes"]
    ]
    return per_epoch, per_minute


def plot_knn_per_epoch(
    curves: dict[str, list[tuple[int, float]]],
    path: Path,
    note: str,
    per_minute: dict[str, list[tuple[float, float]]] | None = None,
    goal: float | None = None,
    budget_minutes: float | None = None,
) -> None:
    """One line per run: kNN top-1 after each epoch; with ``per_minute``, a second panel against
    training minutes (the budget the goal is set in, ``budget_minutes`` a dotted line); ``goal``
    draws a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("epoch", curves)] + ([("training minutes", per_minute)] if per_minute else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (xlabel, panel) in zip(axes[0], panels, strict=True):
        for label, points in panel.items():
            if points:
                xs, values = zip(*points, strict=True)
                ax.plot(xs, values, marker="o", markersize=3, label=label)
        if goal is not None:
            ax.axhline(goal, color="0.3", linestyle="--", linewidth=1, label=f"goal {goal:g}%")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    if per_minute and budget_minutes is not None:
        axes[0][1].axvline(budget_minutes, color="0.3", linestyle=":", linewidth=1, label="budget")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, kNN top-1 during training", fontsize=10)
    fig.text(0.01, 0.01, note, fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
