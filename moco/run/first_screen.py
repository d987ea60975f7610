"""A run's first screen: what runs, and soon after the start, how long it will take."""

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from moco.run.console import print_line

# The first steps pay for lazy initialisation, allocator growth and data-loader start-up, so they
# are left out of the rate.
WARMUP_STEPS = 5
TIMED_STEPS = 20
_EPOCH_END = "epoch-end work (kNN monitor, checkpoint)"


@dataclass(frozen=True)
class RunFacts:
    """What the summary shows from the config, as resolved (a stem of auto is already small or
    imagenet). The trainer supplies the rest: schedule, devices, precision."""

    experiment: str | None  # the +experiment choice; None: the group defaults alone
    data: str
    image_size: int
    backbone: str
    stem: str
    batch_size: int  # per process
    run_dir: str | Path
    time_budget_minutes: float | None = None  # None: the run has trainer.max_epochs epochs
    final_relu: bool = True  # False: the summary says the last block has no ReLU


def format_duration(seconds: float) -> str:
    """45 s, 52 min, 3 h 01 min: as precise as an estimate deserves."""
    if seconds < 59.5:
        return f"{math.floor(seconds + 0.5)} s"
    minutes = math.floor(seconds / 60 + 0.5)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _rate(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


class RunSummary(pl.Callback):
    """Prints, from rank 0, a short block about the run at fit start, then one line with the
    measured speed and the estimated duration once ``timed_steps`` steps after ``warmup_steps``
    have run, and after the first epoch end, the estimate corrected for the epoch-end work."""

    def __init__(
        self,
        facts: RunFacts,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] = print_line,
        warmup_steps: int = WARMUP_STEPS,
        timed_steps: int = TIMED_STEPS,
    ) -> None:
        self.facts, self.clock, self.write = facts, clock, write
        self.warmup_steps, self.timed_steps = warmup_steps, timed_steps

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total = trainer.estimated_stepping_batches  # also sets up the train data if needed
        accumulate = trainer.accumulate_grad_batches
        per_epoch = trainer.num_training_batches / accumulate  # inf: an iterable data set
        self.per_epoch = math.ceil(per_epoch) if math.isfinite(per_epoch) else None
        self.global_batch = self.facts.batch_size * trainer.world_size * accumulate
        if trainer.is_global_zero:
            self.write(self._summary(trainer))

    def _summary(self, trainer: pl.Trainer) -> str:
        f = self.facts
        epochs = f"{trainer.max_epochs} epoch{'s' if trainer.max_epochs != 1 else ''}"
        schedule = f"{epochs} x {self.per_epoch or '?'} steps"
        if trainer.max_epochs == -1 or self.per_epoch is None:
            schedule = f"max_steps={trainer.max_steps}, {self.per_epoch or '?'} steps per epoch"
        elif -1 < trainer.max_steps < trainer.max_epochs * self.per_epoch:
            schedule += f", max_steps={trainer.max_steps}"
        if f.time_budget_minutes:
            schedule = f"the epochs that fit {f.time_budget_minutes:g} min, at most {schedule}"
        accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        device = f"{accelerator} x {trainer.num_devices}"
        if trainer.num_nodes > 1:
            device += f" x {trainer.num_nodes} nodes"
        device += f", {trainer.world_size} process{'es' if trainer.world_size > 1 else ''}"
        if accelerator == "cpu":
            device += f", {torch.get_num_threads()} threads each"
        rows = {
            "experiment": f.experiment or "none (group defaults)",
            "data": f"{f.data}, {f.image_size} px",
            "backbone": f"{f.backbone}, stem {f.stem}"
            + ("" if f.final_relu else ", no ReLU after the last block"),
            "schedule": f"{schedule} -> {self.total} steps, global batch {self.global_batch}",
            "device": device,
            "precision": str(trainer.precision),
            "run dir": str(f.run_dir),
        }
        return "\n".join(f"{key:<11} {value}" for key, value in rows.items())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint is restored: a resumed run times its own first steps.
        self.start_step = trainer.global_step
        part = self.total - self.start_step if math.isfinite(self.total) else 0  # 0: no end known
        self.warm = min(self.warmup_steps, part // 4)
        self.timed = min(self.timed_steps, part - self.warm)
        self.rate: float | None = None  # optimizer steps per second
        self.epoch_end_s = self.batch_ended = None
        self.busy = 0.0  # seconds in the timed steps, epoch-end work left out
        self.timed_from = self.warm  # the step count at which timing started
        # Where the next timed interval starts; None before timing starts.
        self.tick: float | None = self.clock() if self.warm == 0 else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = self.clock()
        if self.epoch_end_s is None and self.batch_ended is not None:
            self.epoch_end_s = now - self.batch_ended
            # Under a time budget the run's own plan follows each epoch (moco.run.time_budget).
            budget = self.facts.time_budget_minutes
            if self.rate is not None and trainer.is_global_zero and not budget:
                self.write(
                    f"after epoch {trainer.current_epoch}: {format_duration(self.epoch_end_s)} of "
                    f"{_EPOCH_END} -> {self._outlook(trainer)}"
                )
        if self.tick is not None:
            self.tick = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = self.batch_ended = self.clock()
        if self.rate is not None or self.timed < 1:
            return
        done = trainer.global_step - self.start_step
        if self.tick is None:
            if done >= self.warm:  # the end of the warm-up
                self.tick, self.timed_from = now, done
            return
        self.busy += now - self.tick
        self.tick = now
        if done - self.timed_from >= self.timed:
            self.rate = (done - self.timed_from) / max(self.busy, 1e-9)
            if trainer.is_global_zero:
                self.write(self._timing_line(trainer))

    def _outlook(self, trainer: pl.Trainer) -> str:
        """How long the whole run will take, or under a time budget how many epochs fit it."""
        per_end = self.epoch_end_s or 0.0
        epochs = math.ceil(self.total / self.per_epoch) if self.per_epoch else 0
        budget = self.facts.time_budget_minutes
        if budget and self.per_epoch:
            epoch_s = self.per_epoch / self.rate + per_end
            fit = min(max(math.floor(60 * budget / epoch_s), 1), epochs)
            return f"about {fit} epochs fit the {budget:g} min budget"
        whole = self.total / self.rate + epochs * per_end
        left = (self.total - trainer.global_step) / self.rate
        left += (epochs - trainer.current_epoch) * per_end
        whole, left = format_duration(whole), format_duration(left)
        return f"about {whole} for {self.total} steps ({left} left)"

    def _timing_line(self, trainer: pl.Trainer) -> str:
        ends = f"{_EPOCH_END} not included"
        if self.epoch_end_s is not None:  # epochs shorter than the timed steps
            ends = f"with {format_duration(self.epoch_end_s)} per epoch end"
        speed = f"{_rate(self.rate)} it/s, {_rate(self.rate * self.global_batch)} img/s"
        return f"timing: {speed} -> {self._outlook(trainer)}, {ends}"


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Tip" in message and "litlogger" in message)


def quiet_lightning() -> None:
    """Silences messages of Lightning that say nothing true about the run: the tip to install
    litlogger; torch's deprecation of ``LeafSpec``, which Lightning itself calls; and the warning
    that a loader without Lightning's state methods cannot resume part-way through an epoch
    (ours can: the data module keeps the position, moco/data/datamodule.py). Call it once before
    the Trainer is built; other warnings and messages stay."""
    warnings.filterwarnings(
        "ignore",
        message=r"You're resuming from a checkpoint that ended before the epoch ended",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"(pytorch_lightning|lightning_fabric)\.",
    )
    # rank_zero_info logs through this logger; a logger filter drops only its own records.
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_litlogger_tip not in logger.filters:
        logger.addFilter(_not_litlogger_tip)
