"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, module_dir
from pytorch_lightning.plugins.io import TorchCheckpointIO

from moco.errors import ConfigError, TrainingDiverged
from moco.run.checkpointing import AtomicCheckpointIO, newest_checkpoint, resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS_PER_EPOCH = 12  # 96 images / batch 8
# Tiny, deterministic, with everything that draws random numbers switched on: the batched
# augmentations, the sampler's shuffle, shuffle-BN's permutation.
RUN = [*TINY_RUN, f"trainer.max_epochs={EPOCHS}", "trainer.deterministic=true"]
# The views made per image in two loader workers instead (the path of image folders).
PER_IMAGE = ["augment.batched=false", "data.num_workers=2"]
# Columns that hold wall-clock times, which differ between any two runs.
CLOCK_COLUMNS = ("time/train_s", "time/epoch_s", "throughput/images_per_s")


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/pretrain.py", f"hydra.run.dir={run_dir}", *RUN, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(run_dir, *extra),
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metric_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "logs" / "metrics.csv").open() as f:
        return [
            {k: v for k, v in row.items() if v and k not in CLOCK_COLUMNS}
            for row in csv.DictReader(f)
        ]


def _assert_same_training(expected_dir: Path, resumed_dir: Path) -> None:
    """Every parameter and buffer (the queue too), the optimizer and the log are the same."""
    expected, resumed = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
        for d in (expected_dir, resumed_dir)
    )
    assert expected["epoch"] == resumed["epoch"] == EPOCHS - 1
    assert expected["global_step"] == resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    weights, other = expected["state_dict"], resumed["state_dict"]
    assert weights.keys() == other.keys()
    different = [k for k in weights if not torch.equal(weights[k], other[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
    assert torch.equal(weights["queue.keys"], other["queue.keys"])  # named: the point
    momenta = [expected["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]]
    assert momenta[0].keys() == momenta[1].keys()
    for key in momenta[0]:
        assert torch.equal(momenta[0][key]["momentum_buffer"], momenta[1][key]["momentum_buffer"])
    # Each step's and each epoch's row once, with the values of the uninterrupted run.
    assert _metric_rows(resumed_dir) == _metric_rows(expected_dir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Iterator[Path]:
    """An uninterrupted run, batched augmentations."""
    with module_dir(tmp_path_factory, "straight") as run_dir:
        _train(run_dir)
        yield run_dir


@pytest.fixture(scope="module")
def straight_per_image(tmp_path_factory) -> Iterator[Path]:
    """An uninterrupted run, views made per image in loader workers."""
    with module_dir(tmp_path_factory, "straight_per_image") as run_dir:
        _train(run_dir, *PER_IMAGE)
        yield run_dir


def _epoch_logged(run_dir: Path, epoch: int) -> bool:
    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return False
    with path.open() as f:
        return any(
            r.get("train/loss_epoch") and r.get("epoch") == str(epoch) for r in csv.DictReader(f)
        )


def _start_and_kill_when(
    run_dir: Path, ready, *extra: str, env=None, signum=signal.SIGKILL, exit_within_s=300
):
    """Start a training run, wait until ``ready()``, send it ``signum``; return its exit code
    and stderr. A run still alive ``exit_within_s`` seconds after the signal fails the test."""
    process = subprocess.Popen(
        _command(run_dir, *extra),
        cwd=REPO,
        env=env or _env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 600
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "not ready after 10 minutes"
        time.sleep(0.02)
    process.send_signal(signum)
    try:
        code = process.wait(timeout=exit_within_s)
    except subprocess.TimeoutExpired:
        process.kill()  # its loader workers follow when they see their parent gone
        process.wait()
        pytest.fail(f"the run was still alive {exit_within_s} s after {signum!r}")
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert (run_dir / "checkpoints").is_dir(), stderr[-3000:]
    return code, stderr


def _resumed_step(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("Resuming from"))
    return int(line.rsplit("(step ", 1)[1].rstrip(")"))


@pytest.mark.slow
def test_sigkill_after_an_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, straight):
    interrupted = tmp_path / "interrupted"
    first = interrupted / "checkpoints" / "epoch000.ckpt"
    _start_and_kill_when(interrupted, lambda: first.exists() and _epoch_logged(interrupted, 0))
    # Killed mid-run: the last epoch's checkpoint was never written.
    assert not (interrupted / "checkpoints" / f"epoch{EPOCHS - 1:03d}.ckpt").exists()
    # resume=auto is the default: the same run directory continues from its newest checkpoint.
    result = _train(interrupted)
    assert "Resuming from" in result.stdout
    _assert_same_training(straight, interrupted)

    # The run's training clock went on from the count in epoch 0's checkpoint.
    before_kill = torch.load(first, weights_only=True)
    final = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)
    seconds = [c["callbacks"]["TrainingClock"]["seconds"] for c in (before_kill, final)]
    assert 0 < seconds[0] < seconds[1]
    with (interrupted / "logs" / "metrics.csv").open() as f:
        logged = [float(r["time/train_s"]) for r in csv.DictReader(f) if r.get("time/train_s")]
    assert len(logged) == EPOCHS and logged == sorted(logged)
    assert logged[-1] == pytest.approx(seconds[1], rel=1e-6)  # logged as float32


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_goes_on_with_the_next_batch(tmp_path, straight_per_image):
    """Checkpoints every 5 steps; killed part-way through epoch 1, the run resumes from that
    batch (not from the epoch's start) and ends as if never stopped: the images of the epoch's
    second part, their augmentations in the workers and the optimizer all line up."""
    interrupted = tmp_path / "mid_epoch"
    folder = interrupted / "checkpoints"
    every = ["checkpoint.every_n_steps=5", *PER_IMAGE]

    def within_epoch_1() -> bool:
        # last.ckpt is a file again, written after epoch 0's checkpoint (not the file of step 11
        # that is still there for a moment before the link to epoch 0's replaces it).
        last, first = folder / "last.ckpt", folder / "epoch000.ckpt"
        try:
            return not last.is_symlink() and last.stat().st_mtime_ns > first.stat().st_mtime_ns
        except FileNotFoundError:
            return False

    _start_and_kill_when(interrupted, within_epoch_1, *every)
    assert not (folder / "epoch001.ckpt").exists()
    result = _train(interrupted, *every)
    step = _resumed_step(result.stdout)
    assert STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH, step  # part-way through epoch 1
    _assert_same_training(straight_per_image, interrupted)


@pytest.mark.slow
def test_a_crash_between_an_epochs_checkpoint_and_its_log_row_loses_no_row(tmp_path, straight):
    """Lightning logs an epoch's row just after the epoch's checkpoint. A run killed in between
    has the checkpoint but not the row; the row travels in the checkpoint and is written back."""
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    (crashed / "logs").mkdir()
    shutil.copy(straight / "checkpoints" / "epoch001.ckpt", crashed / "checkpoints")
    with (straight / "logs" / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if not (r.get("train/loss_epoch") and r["epoch"] == "1")]
        columns = reader.fieldnames
    with (crashed / "logs" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) < 2 * STEPS_PER_EPOCH)
    assert not _epoch_logged(crashed, 1)
    _train(crashed)
    assert _epoch_logged(crashed, 1)
    _assert_same_training(straight, crashed)


def _slurm_env(tmp_path: Path, restarts: int) -> dict:
    """A srun task of job 4242, with a stand-in scontrol that records its calls."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        scontrol = bin_dir / "scontrol"
        scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls"}\n')
        scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NAME": "moco",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "node1",
        "SLURM_RESTART_COUNT": str(restarts),
    }
    return {**_env(), **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
def test_slurm_stop_signals_checkpoint_requeue_and_the_requeued_job_ends_the_same(
    tmp_path, straight_per_image
):
    """SIGUSR1 (the time limit is near) in epoch 1 and SIGTERM (preemption) in epoch 2, sent to
    every process of the run as SLURM does, the loader workers too: each time the run writes
    last.ckpt between two steps, requeues the job and exits; each start of the requeued job
    resumes in the same directory; the end equals an uninterrupted run."""
    run_dir = tmp_path / "runs" / "synthetic" / "slurm-4242"  # the job's, across requeues
    folder = run_dir / "checkpoints"
    command = [sys.executable, str(REPO / "scripts" / "pretrain.py"), *RUN, *PER_IMAGE]

    def stop_when(epoch_done: int, signum: signal.Signals, restarts: int) -> str:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_slurm_env(tmp_path, restarts),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a process group of its own: the run and its workers
        )
        epoch_file = folder / f"epoch{epoch_done:03d}.ckpt"
        deadline = time.monotonic() + 600
        while not epoch_file.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # into the next epoch, whose loader workers are running
        os.killpg(process.pid, signum)
        assert process.wait(timeout=300) == 128 + signum
        stderr = process.stderr.read().decode()
        process.stderr.close()
        return stderr

    stderr = stop_when(0, signal.SIGUSR1, restarts=0)
    assert "SIGUSR1 at step " in stderr and "the job is requeued" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert (folder / "last.ckpt").is_file() and not (folder / "last.ckpt").is_symlink()
    stderr = stop_when(1, signal.SIGTERM, restarts=1)
    assert "SIGTERM at step " in stderr and "the job is requeued" in stderr, stderr[-3000:]
    assert (tmp_path / "scontrol_calls").read_text() == "requeue 4242\nrequeue 4242\n"

    done = subprocess.run(
        command, cwd=tmp_path, env=_slurm_env(tmp_path, 2), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert 2 * STEPS_PER_EPOCH < _resumed_step(done.stdout) < 3 * STEPS_PER_EPOCH
    assert [p.name for p in (tmp_path / "runs" / "synthetic").iterdir()] == ["slurm-4242"]
    _assert_same_training(straight_per_image, run_dir)


@pytest.mark.slow
def test_a_stop_signal_ends_a_run_whose_knn_monitor_keeps_loader_workers(tmp_path):
    """The kNN monitor keeps its loader workers from one epoch to the next, and loader workers
    ignore SIGTERM. Lightning gives a fit that ends on an exception (here the stop signal's
    checkpoint-and-exit) no teardown hook: unless the monitor lets go of its workers then,
    Python's exit, which terminates and joins them, waits for ever."""
    run_dir = tmp_path / "run"
    monitor = ["eval.enabled=true", "eval.bank_size=32", "eval.test_size=16", "eval.k=5"]
    code, stderr = _start_and_kill_when(
        run_dir,
        lambda: _epoch_logged(run_dir, 0),  # the monitor has run once: its workers are up
        *monitor,
        signum=signal.SIGTERM,
        exit_within_s=60,
    )
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM at step " in stderr, stderr[-3000:]


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
    # The message names the setting that differs, so the user knows which override to add.
    with pytest.raises(ConfigError, match=r"different model .*settings: dim 8 -> \d+.*resume=none"):
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
