"""End to end: scripts/pretrain.py as a user runs it, in a subprocess."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tiny but real: 512 synthetic 16-px images, batch 16, 2 epochs (64 steps), shuffle-BN with 2
# splits. The queue holds one batch, so it is full of real keys after the first step: with a
# large queue of random initial keys the first epoch's loss is artificially low and a 2-epoch
# run cannot show learning. Mild augmentation for the same reason (time budget of a test).
TINY_RUN = [
    "data=synthetic",
    "data.num_train=512",
    "data.image_size=16",
    "data.batch_size=16",
    "model.bn_splits=2",
    "model.queue_size=16",
    "optimizer.lr=0.5",
    "augment.crop_scale=[0.6,1.0]",
    "augment.color_jitter.p=0",
    "augment.grayscale_p=0",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
]


def run_pretrain(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/pretrain.py", f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def epoch_losses(metrics_csv: Path) -> list[float]:
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    return [float(r["train/loss_epoch"]) for r in sorted(rows, key=lambda r: int(r["epoch"]))]


@pytest.mark.slow
def test_two_epochs_write_checkpoints_and_lower_the_loss(tmp_path):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert sorted(p.name for p in checkpoints.glob("epoch*.ckpt")) == [
        "epoch000.ckpt",
        "epoch001.ckpt",
    ]
    assert f"Last checkpoint: {checkpoints / 'last.ckpt'}" in result.stdout
    assert (run_dir / "config.yaml").is_file()

    metrics = run_dir / "logs" / "metrics.csv"
    with metrics.open() as f:  # the online kNN monitor is on by default: one value per epoch
        knn = [float(r["knn_top1"]) for r in csv.DictReader(f) if r.get("knn_top1")]
    assert len(knn) == 2 and all(10.0 < v <= 100.0 for v in knn), knn  # %; chance is 10

    losses = epoch_losses(metrics)
    assert len(losses) == 2
    assert losses[1] < losses[0], f"loss did not go down: {losses}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.queue_size=8", "model.queue_size=8 is smaller than the 16 keys"),
        ("model.temperature=0", "model.temperature=0 must be > 0"),
        ("model.momentum=1.0", "model.momentum=1.0 must be in [0, 1)"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, override, message):
    run_dir = tmp_path / "run"
    result = run_pretrain(
        run_dir, "data=synthetic", "data.batch_size=16", "model.bn_splits=2", override
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: ") and message in lines[0], (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not run_dir.exists(), "a failed start must not leave a run directory behind"


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    run_dir = tmp_path / "run"
    result = run_pretrain(
        run_dir,
        f"data.root={tmp_path / 'empty'}",
        f"data.system_root={tmp_path / 'nowhere'}",
        "data.download=false",
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "data.root" in result.stderr
    assert not run_dir.exists()
