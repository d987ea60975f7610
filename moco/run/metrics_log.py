"""The run's ``logs/metrics.csv`` across stops and resumes: each step and each epoch once.

Two things can lose rows when a run is killed and resumed from its newest checkpoint:
- Lightning's CSV writer holds rows in memory and writes them every so many steps. Here every
  logger writes out what it holds before each checkpoint, so every row logged before a
  checkpoint is on disk by the time the checkpoint is.
- Lightning logs an epoch's row (the epoch means, the kNN accuracy, the training time) just
  after the epoch's checkpoint. The row therefore travels in that checkpoint too, and a run that
  resumes from it writes the row if the log lacks it.
And one thing would make a row wrong: Lightning's running sums behind the epoch means are not in
its checkpoints, so a run resumed part-way through an epoch would log the mean of the epoch's
second part only. They travel in the checkpoints written within an epoch and are added back.
"""

import csv
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

EPOCH_ROW = "epoch_log_row"  # the checkpoint keys
EPOCH_SUMS = "epoch_log_sums"


class MetricsAcrossResume(pl.Callback):
    def __init__(self) -> None:
        self._epoch_row: dict | None = None  # set between an epoch's end and its row's logging
        self._sums_to_add: dict | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning calls this before the checkpoint callbacks and logs the epoch after them.
        # The row is what its logger connector is about to log (a private but stable part of
        # Lightning; tests/test_resume.py checks the row against the one really logged).
        metrics = trainer._logger_connector.metrics["log"]
        row = {name: float(value) for name, value in metrics.items()}
        # Lightning logs the epoch's row at the step count of its last step, with the epoch.
        self._epoch_row = {**row, "epoch": trainer.current_epoch, "step": trainer.global_step - 1}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_row = None  # logged by now

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()
        if self._epoch_row is not None:
            checkpoint[EPOCH_ROW] = self._epoch_row
        else:  # within the epoch
            checkpoint[EPOCH_SUMS] = _epoch_sums(trainer)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._sums_to_add = checkpoint.get(EPOCH_SUMS)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning makes its sums at the first value logged after the resume; add the saved
        # part to them then. The epoch's mean is then that of an uninterrupted run, bit for bit:
        # the first addition is the same two numbers in the other order.
        if self._sums_to_add:
            for key, saved in self._sums_to_add.items():
                metric = trainer._results[key]
                metric.value = metric.value + saved["value"].to(metric.value.device)
                if "count" in saved:
                    count = saved["count"].to(metric.cumulated_batch_size.device)
                    metric.cumulated_batch_size = metric.cumulated_batch_size + count
        self._sums_to_add = None


def _epoch_sums(trainer: pl.Trainer) -> dict:
    """The running sums of the epoch-level values logged by ``training_step`` so far."""
    sums = {}
    for key, metric in trainer._results.items():
        if metric.is_tensor and metric.meta.on_epoch and metric.meta.fx == "training_step":
            saved = {"value": metric.value.detach().cpu()}
            if metric.meta.is_mean_reduction:
                saved["count"] = metric.cumulated_batch_size.detach().cpu()
            sums[key] = saved
    return sums


def carry_over_metrics(logger: CSVLogger, global_step: int, epoch_row: dict | None) -> None:
    """Keep the rows of the run directory's metrics.csv logged before the resumed step.

    Lightning's CSV writer deletes an existing metrics.csv when it starts; without this, a
    resumed run's log would begin where it resumed. Rows at or after the checkpoint's step are
    dropped: those steps are trained again. ``epoch_row`` (from an epoch's checkpoint) is added
    when the log lacks it.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [
                {key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(f)
            ]
    kept = [r for r in rows if "step" in r and r["step"] < global_step]
    if epoch_row and not any(
        r["step"] == epoch_row["step"] and epoch_row.keys() <= r.keys() for r in kept
    ):
        kept.append(dict(epoch_row))
    for row in kept:
        row["step"] = int(row["step"])
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
    logger.experiment.metrics[:0] = kept  # written with the resumed run's first rows
