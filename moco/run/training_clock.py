"""Training time of a run, counted across all of its parts when it is stopped and resumed."""

import time

import pytorch_lightning as pl


class TrainingClock(pl.Callback):
    """Logs ``time/train_s`` at the end of every epoch: the seconds spent in training epochs so
    far (the steps, the data wait and the epoch-end work such as the kNN monitor; not start-up or
    the checkpoint writes), summed over every part of the run.

    The sum travels in the checkpoints, so a run that was stopped and resumed reports its whole
    training time, where a clock around the command would see only the last part.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._epoch_started: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_started is None:
            return
        self.seconds += time.monotonic() - self._epoch_started
        self._epoch_started = None
        # Rank 0's clock: the ranks wait for each other every step, so they agree closely.
        pl_module.log("time/train_s", self.seconds, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = float(state_dict["seconds"])
