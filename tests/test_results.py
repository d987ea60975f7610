"""The Results table and the kNN-per-epoch figure, from a results directory laid out as
scripts/reproduce_results.sh writes it."""

from __future__ import annotations

import json
import runpy
import sys
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


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def fake_results(root: Path) -> None:
    write_json(
        root / "knn_moco_v2" / "knn.json",
        {
            "epoch": 5,
            "top1": {"k": 200, "temperature": 0.1, "top1": 88.5},
            "best": {"k": 20, "temperature": 0.05, "top1": 89.25},
        },
    )
    write_json(
        root / "compare_moco_v2" / "compare.json",
        {"results": [{"optimizer": "sgd", "top1": 85.0}, {"optimizer": "momentum", "top1": 90.5}]},
    )
    run = root / "moco_v2"
    (run / "logs").mkdir(parents=True)
    (run / "wall_seconds").write_text("3540\n")
    (run / "command").write_text("python scripts/pretrain.py +experiment=moco_v2\n")
    # Lightning's CSV logger: one row per logged step, the monitor's value on epoch-end rows.
    (run / "logs" / "metrics.csv").write_text(
        "epoch,knn_top1,step,train/loss_step\n0,,9,7.5\n0,70.5,233,\n1,,243,7.0\n1,80.25,467,\n"
    )


def test_table_row_reads_every_figure(tmp_path):
    fake_results(tmp_path)
    row = table_row(tmp_path, Row("moco_v2", "MoCo v2"))
    assert row["knn"] == 88.5 and row["knn_best"] == 89.25
    assert row["knn_best_at"] == "k=20, T=0.05"
    assert row["probe"] == 90.5 and row["probe_range"] == (85.0, 90.5)
    assert row["epochs"] == 6
    table = markdown_table([row, table_row(tmp_path, Row("raw", "raw pixels"))])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2] == (
        "| MoCo v2 | 88.50 | 89.25 (k=20, T=0.05) | 90.50 | 85.00-90.50 | 6 | 59 min | "
        "`python scripts/pretrain.py +experiment=moco_v2` |"
    )
    assert lines[3] == "| raw pixels | - | - | - | - | - | - | - |"  # nothing evaluated yet


def test_knn_per_epoch_reads_the_monitor_rows_and_plots(tmp_path):
    fake_results(tmp_path)
    points = knn_per_epoch(tmp_path / "moco_v2")
    assert points == [(1, 70.5), (2, 80.25)]
    figure = tmp_path / "fig" / "knn.png"
    plot_knn_per_epoch({"MoCo v2": points}, figure, "note")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_knn_per_minute_pairs_each_epochs_value_with_its_training_clock(tmp_path):
    fake_results(tmp_path)
    # The training clock on the epoch-end rows; epoch 3 has a clock but no kNN value.
    (tmp_path / "moco_v2" / "logs" / "metrics.csv").write_text(
        "epoch,knn_top1,step,time/train_s,train/loss_step\n0,,9,,7.5\n0,70.5,233,150,\n"
        "1,,243,,7.0\n1,80.25,467,300,\n2,,700,450,\n"
    )
    assert knn_per_minute(tmp_path / "moco_v2") == [(2.5, 70.5), (5.0, 80.25)]
    figure = tmp_path / "knn.png"
    curve = {"MoCo v2": knn_per_epoch(tmp_path / "moco_v2")}
    by_minute = {"MoCo v2": knn_per_minute(tmp_path / "moco_v2")}
    plot_knn_per_epoch(curve, figure, "note", per_minute=by_minute, goal=90.0, budget_minutes=60)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_runs_own_training_time_wins_over_the_commands_wall_time(tmp_path):
    """A resumed run's wall_seconds covers its last part only; the run's own count
    (moco.run.training_clock) covers all of it, so the table prefers it when logged."""
    fake_results(tmp_path)
    run = tmp_path / "moco_v2"
    (run / "logs" / "metrics.csv").write_text(
        "epoch,knn_top1,step,time/train_s\n0,70.5,233,1500.0\n1,80.25,467,4200.0\n"
    )
    row = table_row(tmp_path, Row("moco_v2", "MoCo v2"))
    assert row["wall"] == "4200.0"  # not the 3540 s of wall_seconds
    assert "| 70 min |" in markdown_table([row])


def test_a_baseline_row_shows_its_evaluation_command(tmp_path):
    """Rows without pretraining (raw pixels, random init) show the kNN command that made them;
    a pretrained row keeps its pretraining command."""
    fake_results(tmp_path)
    write_json(tmp_path / "knn_raw" / "knn.json", {"top1": {"top1": 81.0}})
    (tmp_path / "knn_raw" / "command").write_text("python scripts/knn_eval.py checkpoint=raw\n")
    (tmp_path / "knn_moco_v2" / "command").write_text("python scripts/knn_eval.py checkpoint=x\n")
    raw = table_row(tmp_path, Row("raw", "raw pixels"))
    assert raw["command"] == "python scripts/knn_eval.py checkpoint=raw"
    assert table_row(tmp_path, Row("moco_v2", "v2"))["command"].startswith(
        "python scripts/pretrain"
    )


def test_a_saved_curve_reads_back_as_the_run_gave_it(tmp_path):
    fake_results(tmp_path)
    (tmp_path / "moco_v2" / "logs" / "metrics.csv").write_text(
        "epoch,knn_top1,step,time/train_s\n0,70.5,233,150\n1,80.25,467,\n"  # epoch 2: no clock
    )
    saved = tmp_path / "curves" / "moco_v2.csv"
    save_curve(tmp_path / "moco_v2", saved)
    assert saved.read_text() == ("epoch,training_minutes,knn_top1\n1,2.50,70.50\n2,,80.25\n")
    per_epoch, per_minute = load_curve(saved)
    assert per_epoch == knn_per_epoch(tmp_path / "moco_v2") == [(1, 70.5), (2, 80.25)]
    assert per_minute == knn_per_minute(tmp_path / "moco_v2") == [(2.5, 70.5)]


def test_the_figure_draws_a_kept_curve_whose_run_is_gone(tmp_path, monkeypatch):
    """results_table.py --curves: a run in the results directory has its curve saved; a row
    without a run but with a saved curve (an earlier run's) is drawn from the CSV."""
    fake_results(tmp_path / "results")
    curves = tmp_path / "curves"
    curves.mkdir()
    (curves / "supervised.csv").write_text("epoch,training_minutes,knn_top1\n1,3.00,85.00\n")
    drawn = {}

    def plot(per_epoch, path, note, per_minute=None, **_):
        drawn.update(per_epoch=per_epoch, per_minute=per_minute)

    monkeypatch.setattr("moco.eval.results.plot_knn_per_epoch", plot)
    script = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"
    argv = [str(script), str(tmp_path / "results"), "--curves", str(curves)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    assert load_curve(curves / "moco_v2.csv")[0] == [(1, 70.5), (2, 80.25)]
    assert drawn["per_epoch"] == {
        "MoCo v2, recipe": [(1, 70.5), (2, 80.25)],
        "supervised reference, the same hour (labels, not MoCo)": [(1, 85.0)],
    }
    assert drawn["per_minute"]["supervised reference, the same hour (labels, not MoCo)"] == [
        (3.0, 85.0)
    ]
