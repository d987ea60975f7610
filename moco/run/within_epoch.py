"""Checkpoints within an epoch: every N steps, every M minutes, and when the job is about to be
stopped (SIGUSR1, which SLURM sends ahead of the time limit with ``--signal=USR1@<seconds>``,
or SIGTERM, which it sends on preemption). On a signal the run also asks SLURM to requeue the
job and exits; the requeued job resumes in the same run directory (``resume=auto``).

Lightning's own SLURM handler writes its checkpoint from inside the signal handler, at whatever
point of a training step the signal arrives, and lets SIGTERM pass. Here the handlers only
raise a flag; the checkpoint is written between two steps, where a resumed run continues
exactly as if it had not stopped.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_only

from moco import distributed
from moco.errors import Preempted

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Under DDP the ranks agree on time and signals every this many steps (one tiny all_reduce);
# SLURM leaves 30 s (KillWait) between SIGTERM and SIGKILL, far more than a few steps take.
AGREE_EVERY_N_STEPS = 5


class WithinEpochCheckpoints(Checkpoint):
    """Writes ``path`` (the run's ``checkpoints/last.ckpt``) between steps when one is due.

    A checkpoint is written only after a step that logs no row to the loggers: Lightning logs a
    step's row after the step's hooks, so a checkpoint written after a logging step would be
    on disk before that row, and a crash in between would lose the row for good. A due
    checkpoint waits for the next such step instead (with ``trainer.log_every_n_steps`` > 1 that
    is at most one step later).
    """

    def __init__(
        self, path: Path, every_n_steps: int = 0, every_minutes: float = 0, requeue: bool = True
    ) -> None:
        self.path, self.every_n_steps, self.every_minutes = path, every_n_steps, every_minutes
        self.requeue = requeue
        self._signal: int | None = None  # set by the handler; read between steps
        self._stop_signal: int | None = None  # agreed by every rank
        self._due = False
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------------------ signals
    def _raise_flag(self, signum, frame) -> None:
        self._signal = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own handlers (set when fit starts), which these replace; Lightning
        # puts the handlers from before fit back when it tears down.
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._raise_flag)
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------------------ saving
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._last_save = time.monotonic()  # any checkpoint, the epoch's too, restarts the clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._due = True
        if trainer.world_size == 1 or step % AGREE_EVERY_N_STEPS == 0:
            self._agree(trainer)
        if not self._due or _logs_a_row(trainer, step):
            return
        self._due = False
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state
        if self._stop_signal is not None:
            requeued = self.requeue and trainer.is_global_zero and requeue_slurm_job()
            raise Preempted(self._stop_signal, step, self.path, requeued)

    def _agree(self, trainer: pl.Trainer) -> None:
        """Every rank learns whether any rank got a signal or has its time interval passed."""
        late = bool(self.every_minutes) and (
            time.monotonic() - self._last_save >= 60 * self.every_minutes
        )
        signum = self._signal or 0
        if trainer.world_size > 1:
            flags = torch.tensor([int(late), signum], device=trainer.strategy.root_device)
            flags = distributed.all_reduce_max(flags).tolist()
            late, signum = bool(flags[0]), int(flags[1])
        if signum:
            self._stop_signal = signum
        self._due = self._due or late or bool(signum)


def _logs_a_row(trainer: pl.Trainer, step: int) -> bool:
    # Lightning logs after a step when the count of steps is a multiple of log_every_n_steps.
    # When every step logs (1), no step is free of a row: the checkpoint is not held back then,
    # and a crash in the moment between it and the row's write would lose that one row.
    n = trainer.log_every_n_steps
    return bool(n) and n > 1 and step % n == 0


@rank_zero_only
def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (``scontrol requeue``); False outside SLURM or if
    scontrol refuses (a job submitted with ``--no-requeue``, say)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return False
    return done.returncode == 0
