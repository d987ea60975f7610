"""The Results table and kNN-per-epoch figure from a results directory.

    python scripts/results_table.py runs/results [--figure docs/figures/knn_per_epoch.png]
        [--curves docs/curves]

Reads what scripts/reproduce_results.sh wrote (moco/eval/results.py says where); prints the
Markdown table and writes it to <results>/results.md. With --curves, each run's kNN curve is
saved there as CSV, and the figure draws every row with a saved curve, also those whose run
directory is gone (a results directory that holds only the runs made since).
"""

import argparse
from pathlib import Path

from moco.eval.results import (
    Row,
    knn_per_epoch,
    knn_per_minute,
    load_curve,
    markdown_table,
    plot_knn_per_epoch,
    save_curve,
    table_row,
)

GOAL, BUDGET_MINUTES = 88.0, 60  # the recipe's goal: kNN top-1 (%) within one hour of training

ROWS = [
    Row("raw", "raw pixels"),
    Row("random", "random-init ResNet-18 (the recipe's stem)"),
    Row("moco_v1", "MoCo v1, recipe"),
    Row("moco_v2", "MoCo v2, recipe"),
    Row("moco_v2_long", "MoCo v2, recipe, longer run"),
    Row("moco_v3_fashion_mnist", "MoCo v3 (ResNet-18), recipe"),
    Row("supervised", "supervised reference, the same hour (labels, not MoCo)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--figure", type=Path, help="default: <results>/knn_per_epoch.png")
    parser.add_argument("--curves", type=Path, help="where each run's kNN curve is kept (CSV)")
    args = parser.parse_args()
    if not args.results.is_dir():
        parser.error(f"{args.results} is not a directory: run scripts/reproduce_results.sh first")
    rows = [table_row(args.results, r) for r in ROWS if (args.results / f"knn_{r.name}").is_dir()]
    table = markdown_table(rows)
    (args.results / "results.md").write_text(table)
    print(table)
    curves, minutes = {}, {}
    for r in ROWS:
        run, saved = args.results / r.name, args.curves and args.curves / f"{r.name}.csv"
        trained = (run / "logs" / "metrics.csv").is_file()
        if saved and trained:
            save_curve(run, saved)
        if saved and saved.is_file():
            curves[r.label], minutes[r.label] = load_curve(saved)
        elif trained:
            curves[r.label], minutes[r.label] = knn_per_epoch(run), knn_per_minute(run)
    figure = args.figure or args.results / "knn_per_epoch.png"
    note = "online monitor: 10k-image bank, 5k test images, k=200, T=0.1"
    plot_knn_per_epoch(
        curves, figure, note, per_minute=minutes, goal=GOAL, budget_minutes=BUDGET_MINUTES
    )
    print(f"Figure: {figure}")


if __name__ == "__main__":
    main()
