"""The ``loop`` variants: the full pretraining loop, Lightning's Trainer on the project's data
module, so data loading, augmentation and the Trainer's own work count too."""

from __future__ import annotations

import os
import resource
import tempfile
import time
from typing import TYPE_CHECKING

from moco.tools.benchmark.memory import PeakMemory, process_peak_rss_mb
from moco.tools.benchmark.record import result
from moco.tools.benchmark.settings import Settings
from moco.tools.benchmark.timing import Clock, now
from moco.tools.benchmark.workload import build_moco, precision

if TYPE_CHECKING:
    from omegaconf import DictConfig


def measure_loop(cfg: DictConfig, settings: Settings) -> dict:
    """Lightning's fit on the real data module, for ``warmup + steps`` optimizer steps."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from moco.data import PretrainDataModule

    class StepTimer(pl.Callback):
        """Time between the ends of consecutive batches (data wait included); CPU time of the
        main process only (data-loader workers are other processes)."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, float, float]] = []

        def _mark(self) -> None:
            t = os.times()
            self.marks.append((now(settings.device), t.user, t.system))

        def on_train_start(self, trainer, pl_module) -> None:
            self._mark()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._mark()

    timer = StepTimer()
    with PeakMemory(settings.device) as memory, tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pl.seed_everything(0, workers=True, verbose=False)
        datamodule = PretrainDataModule(cfg.data, cfg.augment)
        datamodule.setup("fit")
        model = build_moco(cfg, "cpu")
        trainer = pl.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=1,
            precision=precision(cfg),
            max_steps=settings.warmup + settings.steps,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            logger=CSVLogger(tmp, name="", version="logs"),
            default_root_dir=tmp,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        setup_s = time.perf_counter() - start
        trainer.fit(model, datamodule=datamodule)
    times = []
    for a, b in zip(timer.marks, timer.marks[1:]):  # noqa: B905  (one mark more than steps)
        clock = Clock(settings.device)
        clock.wall, clock.user, clock.sys = (b[i] - a[i] for i in range(3))
        times.append(clock)
    out = result(cfg, settings, times, memory, setup_s=setup_s)
    out["num_workers"] = cfg.data.num_workers
    # The children are the data-loader workers; without workers there are none to report.
    workers_mb = process_peak_rss_mb(resource.RUSAGE_CHILDREN)
    out["largest_child_peak_rss_mb"] = workers_mb if cfg.data.num_workers else 0.0
    return out
