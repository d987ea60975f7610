"""Training time and throughput of a run, counted across all of its parts when it is stopped and
resumed, also part-way through an epoch."""

import time

import pytorch_lightning as pl


class TrainingClock(pl.Callback):
    """Logs at the end of every epoch:

    - ``time/train_s``: the seconds spent in training epochs so far (the steps, the data wait
      and the epoch-end work such as the kNN monitor; not start-up or the checkpoint writes),
      summed over every part of the run;
    - ``time/epoch_s``: the seconds of this epoch, counted the same way;
    - ``throughput/images_per_s``: the images of this epoch's steps (all processes) over the
      seconds up to its last step, so a dashboard shows the speed without the epoch-end work.

    The counts travel in the checkpoints, so a run that was stopped and resumed reports its whole
    training time, where a clock around the command would see only the last part.
    """

    def __init__(self) -> None:
        self.seconds = 0.0  # finished epochs and the counted part of the current one
        self._epoch_s = 0.0  # the current epoch's counted seconds
        self._steps_s = 0.0  # ... up to its last step
        self._images = 0  # ... and its images
        self._since: float | None = None  # counting since; None between epochs

    def _count(self) -> None:
        now = time.monotonic()
        if self._since is not None:
            self.seconds += now - self._since
            self._epoch_s += now - self._since
        self._since = now

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed part-way through an epoch gets no on_train_epoch_start.
        self._since = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_s, self._steps_s, self._images = 0.0, 0.0, 0
        self._since = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count()
        self._steps_s = self._epoch_s
        self._images += len(batch[-1]) * trainer.world_size  # the labels: one per image

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._since is None:
            return
        self._count()
        self._since = None
        # Rank 0's clock: the ranks wait for each other every step, so they agree closely.
        values = {"time/train_s": self.seconds, "time/epoch_s": self._epoch_s}
        if self._steps_s > 0:
            values["throughput/images_per_s"] = self._images / self._steps_s
        pl_module.log_dict(values, rank_zero_only=True)

    def state_dict(self) -> dict:
        # A checkpoint within an epoch holds the epoch's time so far; the clock itself goes on
        # counting from where it was, so saving changes nothing.
        pending = time.monotonic() - self._since if self._since is not None else 0.0
        return {
            "seconds": self.seconds + pending,
            "epoch_s": self._epoch_s + pending,
            "steps_s": self._steps_s,
            "images": self._images,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = float(state_dict["seconds"])
        # Checkpoints written before these were kept hold the total only.
        self._epoch_s = float(state_dict.get("epoch_s", 0.0))
        self._steps_s = float(state_dict.get("steps_s", 0.0))
        self._images = int(state_dict.get("images", 0))
