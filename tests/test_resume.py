"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from moco.errors import ConfigError, TrainingDiverged
from moco.run.checkpointing import AtomicCheckpointIO, newest_checkpoint, resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
# Tiny, deterministic, with everything that draws random numbers switched on: augmentations in a
# data-loader worker, the sampler's shuffle, shuffle-BN's permutation.
RUN = [
    "data=synthetic",
    "data.num_train=96",
    "data.image_size=8",
    "data.batch_size=8",
    "data.num_workers=1",
    "model.bn_splits=2",
    "model.queue_size=40",
    "model.dim=16",
    "eval.enabled=false",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
]


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/pretrain.py", f"hydra.run.dir={run_dir}", *RUN, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _final_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == EPOCHS - 1
    return checkpoint["state_dict"]


def _epoch_logged(run_dir: Path, epoch: int) -> bool:
    """Whether metrics.csv holds the epoch-level row of ``epoch``. Lightning writes it just after
    the epoch's checkpoint, so a kill between the two loses that row (a known gap); the test
    kills after both, where a crash loses nothing."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return False
    with path.open() as f:
        return any(
            r.get("train/loss_epoch") and r.get("epoch") == str(epoch) for r in csv.DictReader(f)
        )


def _kill_after_first_checkpoint(run_dir: Path) -> None:
    process = subprocess.Popen(
        _command(run_dir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = run_dir / "checkpoints" / "epoch000.ckpt"
    deadline = time.monotonic() + 600
    while not (first.exists() and _epoch_logged(run_dir, 0)):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    # Killed mid-run: the last epoch's checkpoint was never written.
    assert not (run_dir / "checkpoints" / f"epoch{EPOCHS - 1:03d}.ckpt").exists()


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = subprocess.run(
        _command(straight), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]

    _kill_after_first_checkpoint(interrupted)
    # resume=auto is the default: the same run directory continues from its newest checkpoint.
    result = subprocess.run(
        _command(interrupted), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout

    expected, resumed = _final_state(straight), _final_state(interrupted)
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
    assert torch.equal(expected["queue.keys"], resumed["queue.keys"])  # named: the point

    # The log of the resumed run still has every epoch's loss.
    with (interrupted / "logs" / "metrics.csv").open() as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert epochs == list(range(EPOCHS))  # epoch 0 from before the kill, each epoch once

    # The run's training clock went on from the count in epoch 0's checkpoint.
    before_kill = torch.load(interrupted / "checkpoints" / "epoch000.ckpt", weights_only=True)
    final = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)
    seconds = [c["callbacks"]["TrainingClock"]["seconds"] for c in (before_kill, final)]
    assert 0 < seconds[0] < seconds[1]
    with (interrupted / "logs" / "metrics.csv").open() as f:
        logged = [float(r["time/train_s"]) for r in csv.DictReader(f) if r.get("time/train_s")]
    assert len(logged) == EPOCHS and logged == sorted(logged)
    assert logged[-1] == pytest.approx(seconds[1], rel=1e-6)  # logged as float32


@pytest.mark.slow
def test_resume_from_a_file_and_resume_none(tmp_path):
    first = tmp_path / "first"
    base = [*RUN[:-2], "trainer.max_epochs=1"]
    run = [sys.executable, "scripts/pretrain.py", *base]
    done = subprocess.run(
        [*run, f"hydra.run.dir={first}"], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = first / "checkpoints" / "epoch000.ckpt"

    # A new run directory that continues from a given file: it trains epoch 1 only.
    second = tmp_path / "second"
    result = subprocess.run(
        [*run, f"hydra.run.dir={second}", "trainer.max_epochs=2", f"resume={checkpoint}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (second / "checkpoints").glob("epoch*")) == ["epoch001.ckpt"]
    assert "(step 12)" in result.stdout  # 96 images / batch 8: one epoch is 12 steps

    # resume=none in a directory with checkpoints starts from scratch (epoch 0 again).
    result = subprocess.run(
        [*run, f"hydra.run.dir={first}", "resume=none"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "Resuming" not in result.stdout, result.stderr[-3000:]


def test_a_diverging_run_stops_naming_the_step_and_writes_no_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*_command(run_dir), "optimizer.lr=1e30"],  # the first update blows the weights up
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the loss became nan at step 1, epoch 0: lower optimizer.lr" in errors[0]
    assert not (run_dir / "checkpoints").exists()


def test_weights_with_nan_are_never_checkpointed(tiny_moco):
    model, _ = tiny_moco()
    state = model.state_dict()
    model.on_save_checkpoint({"state_dict": state})  # finite: fine
    state["encoder_q.head.0.weight"][0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="encoder_q.head.0.weight holds NaN or inf"):
        model.on_save_checkpoint({"state_dict": state})


def test_newest_checkpoint_ignores_links_and_partial_writes(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert newest_checkpoint(tmp_path) is None
    old, new = folder / "epoch000.ckpt", folder / "epoch001.ckpt"
    old.write_bytes(b"0")
    new.write_bytes(b"1")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    (folder / "epoch002.ckpt.partial").write_bytes(b"cut short")  # a write killed midway
    (folder / "last.ckpt").symlink_to(old.name)  # a stale link
    assert newest_checkpoint(tmp_path) == new


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "epoch001.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.ones(3)}, path)

    def die_halfway(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"PK\x03\x04 cut short")  # the first bytes of a zip, no more
        raise OSError("No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", die_halfway)
    with pytest.raises(OSError):
        io.save_checkpoint({"weights": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert newest_checkpoint(tmp_path) == path  # the remains (.partial) are not a candidate


def test_resume_errors_are_one_line_config_errors(tmp_path, tiny_moco):
    model, _ = tiny_moco()
    with pytest.raises(ConfigError, match="resume=.*does not exist"):
        resume_checkpoint(str(tmp_path / "missing.ckpt"), tmp_path, model)
    with pytest.raises(ConfigError, match="is a directory"):
        resume_checkpoint(str(tmp_path), tmp_path, model)
    assert resume_checkpoint("auto", tmp_path, model) is None  # nothing to resume: fresh start
    assert resume_checkpoint("none", tmp_path, model) is None

    other, _ = tiny_moco("model.dim=8")  # another head size: the weights do not fit
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}, path)
    with pytest.raises(ConfigError, match="different model .*resume=none"):
        resume_checkpoint(str(path), tmp_path, model)


def test_resuming_with_changed_settings_warns_and_names_them(tmp_path, tiny_moco, recwarn):
    """A run resumed under another temperature (say, a recipe changed since it started) goes
    on, but not silently; an unchanged one resumes without a word."""
    before, _ = tiny_moco("model.temperature=0.2")
    path = tmp_path / "before.ckpt"
    torch.save({"state_dict": before.state_dict(), "hyper_parameters": dict(before.hparams)}, path)
    same, _ = tiny_moco("model.temperature=0.2")
    assert resume_checkpoint(str(path), tmp_path, same) is not None
    assert not [w for w in recwarn if "differ" in str(w.message)]
    now, _ = tiny_moco("model.temperature=0.1")
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's: temperature 0.2 -> 0.1$"):
        assert resume_checkpoint(str(path), tmp_path, now) is not None
