"""moco.run.within_epoch: when checkpoints are written within an epoch, and the SLURM requeue.
The end-to-end runs (SIGKILL, SIGUSR1 and SIGTERM, then resume) are in tests/test_resume.py."""

import signal
from types import SimpleNamespace

import pytest

from moco.errors import Preempted
from moco.run.within_epoch import WithinEpochCheckpoints, requeue_slurm_job


class _Trainer(SimpleNamespace):
    """What the callback reads of Lightning's Trainer; records the checkpoints it is asked for."""

    def __init__(self, log_every_n_steps: int = 10) -> None:
        super().__init__(
            global_step=0, world_size=1, is_global_zero=True, log_every_n_steps=log_every_n_steps
        )
        self.saved_at: list[int] = []

    def save_checkpoint(self, path, weights_only=False) -> None:
        assert not weights_only  # the whole training state, optimizer included
        self.saved_at.append(self.global_step)


def _steps(callback, trainer, steps) -> None:
    for step in steps:
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, step - 1)


def test_every_n_steps_skips_steps_that_log_a_row():
    trainer = _Trainer(log_every_n_steps=10)
    _steps(WithinEpochCheckpoints("last.ckpt", every_n_steps=5), trainer, range(1, 32))
    # 10, 20 and 30 log a row after their hooks: the checkpoint waits one step.
    assert trainer.saved_at == [5, 11, 15, 21, 25, 31]


def test_when_every_step_logs_checkpoints_are_not_held_back():
    trainer = _Trainer(log_every_n_steps=1)
    _steps(WithinEpochCheckpoints("last.ckpt", every_n_steps=4), trainer, range(1, 9))
    assert trainer.saved_at == [4, 8]


def test_every_minutes_counts_from_the_last_checkpoint(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("moco.run.within_epoch.time.monotonic", lambda: now[0])
    trainer = _Trainer()
    callback = WithinEpochCheckpoints("last.ckpt", every_minutes=2)
    callback.on_train_start(trainer, None)
    now[0] += 100
    _steps(callback, trainer, [1])
    assert trainer.saved_at == []
    callback.on_save_checkpoint(trainer, None, {})  # an epoch's checkpoint restarts the clock
    now[0] += 100
    _steps(callback, trainer, [2])
    assert trainer.saved_at == []
    now[0] += 21
    _steps(callback, trainer, [3])
    assert trainer.saved_at == [3]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_writes_a_checkpoint_between_steps_and_stops(signum, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    trainer = _Trainer(log_every_n_steps=10)
    callback = WithinEpochCheckpoints("runs/x/checkpoints/last.ckpt")
    callback.on_train_start(trainer, None)
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        _steps(callback, trainer, range(1, 10))
        signal.raise_signal(signum)  # during step 10; the handler only raises a flag
        with pytest.raises(Preempted) as stop:
            _steps(callback, trainer, range(10, 20))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert trainer.saved_at == [11]  # step 10 logs a row: the next step, then stop
    assert stop.value.exit_code == 128 + signum
    name = signal.Signals(signum).name
    assert str(stop.value) == (
        f"{name} at step 11: checkpoint runs/x/checkpoints/last.ckpt written; "
        "start it again to resume"
    )


def _fake_scontrol(tmp_path, monkeypatch, exit_code: int = 0):
    calls = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit {exit_code}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return calls


def test_requeue_names_the_job_or_the_array_task(tmp_path, monkeypatch):
    calls = _fake_scontrol(tmp_path, monkeypatch)
    for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert requeue_slurm_job() is False  # not under SLURM: nothing is called
    assert not calls.exists()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() is True
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job() is True
    assert calls.read_text() == "requeue 4242\nrequeue 4200_3\n"


def test_a_refused_requeue_is_reported_as_not_requeued(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, exit_code=1)  # e.g. a job submitted with --no-requeue
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() is False
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no scontrol at all
    assert requeue_slurm_job() is False
