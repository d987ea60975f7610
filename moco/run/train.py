"""The pretraining run: validated config in, trained checkpoint out."""

from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from moco.data import PretrainDataModule
from moco.encoders import resolve_stem
from moco.errors import MocoUserError
from moco.eval.monitor import KNNMonitor
from moco.run.check import check_pretrain
from moco.run.checkpointing import AtomicCheckpointIO, RandomStates, resume_checkpoint
from moco.run.first_screen import RunFacts, RunSummary, quiet_lightning
from moco.run.hardware import configure_malloc, precision_for
from moco.run.loggers import make_loggers
from moco.run.metrics_log import MetricsAcrossResume, carry_over_metrics
from moco.run.skipped_images import ReportSkippedImages
from moco.run.time_budget import TimeBudget, growth_window
from moco.run.training_clock import TrainingClock
from moco.run.warm_start import warm_start
from moco.run.within_epoch import WithinEpochCheckpoints


class SaveConfig(pl.Callback):
    """Writes the resolved config into the run directory, from rank 0 only, once training has
    been set up (so a run that fails to start leaves no config behind)."""

    def __init__(self, cfg: DictConfig, path: Path) -> None:
        self.text, self.path = OmegaConf.to_yaml(cfg, resolve=True), path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(self.text)


def slurm_plugins() -> list:
    """Under SLURM, Lightning's SLURM environment without its requeue handler: the run's own
    (moco/run/within_epoch.py) stops between steps, where a resume is exact."""
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def _trainer_args(cfg: DictConfig) -> dict:
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["precision"] = precision_for(cfg)
    # The data module splits each epoch between the ranks itself (moco/data/sampler.py).
    args["use_distributed_sampler"] = False
    if isinstance(args.get("strategy"), dict):  # e.g. DDPStrategy with options (trainer/ddp.yaml)
        try:
            args["strategy"] = hydra.utils.instantiate(args["strategy"])
        except InstantiationException as exc:  # Hydra wraps the strategy's own one-line error
            if isinstance(exc.__cause__, MocoUserError):
                raise exc.__cause__ from None
            raise
    return args


def _run_facts(cfg: DictConfig, run_dir: Path) -> RunFacts:
    """What the run's first screen names, as plain values."""
    runtime = HydraConfig.get().runtime if HydraConfig.initialized() else None
    model = cfg.model
    return RunFacts(
        experiment=runtime.choices.get("experiment") if runtime else None,
        data=str(cfg.data.name),
        image_size=cfg.data.image_size,
        backbone=str(model.backbone),
        stem=resolve_stem(model.stem, model.image_size),
        batch_size=cfg.data.batch_size,  # per process; the summary multiplies by the world size
        run_dir=run_dir,
        time_budget_minutes=cfg.get("time_budget_minutes"),
        final_relu=model.final_relu,
    )


def pretrain(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Train MoCo as ``cfg`` says, writing logs and checkpoints into ``run_dir``.

    Returns the path of the last checkpoint on rank 0, None on the other ranks.
    """
    check_pretrain(cfg)
    configure_malloc(cfg.malloc)  # before the first big tensor, and before workers fork
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = PretrainDataModule(cfg.data, cfg.augment, cfg.seed)
    datamodule.setup("fit")  # load (and check) the data before anything is written
    model = hydra.utils.instantiate(cfg.model)
    monitor = KNNMonitor.from_config(cfg.eval, cfg.data)  # None when eval.enabled=false
    resume_from = resume_checkpoint(cfg.resume, run_dir, model)  # None: a fresh start
    if resume_from is None and cfg.get("init"):  # a resumed run has its own weights
        rank_zero_only(print)(warm_start(model, cfg.init))

    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        save_last="link",  # last.ckpt links to the newest epoch: one file per epoch on disk
        save_top_k=-1,  # keep one checkpoint per epoch
        every_n_epochs=1,
        # A resumed run rewrites epochNNN.ckpt and moves the last.ckpt link in place; with the
        # counter, Lightning would write last-v1.ckpt beside the stale link instead.
        enable_version_counter=False,
    )
    within_epoch = WithinEpochCheckpoints(
        run_dir / "checkpoints" / "last.ckpt",
        every_n_steps=cfg.checkpoint.every_n_steps,
        every_minutes=cfg.checkpoint.every_minutes,
        requeue=cfg.checkpoint.requeue,
    )
    quiet_lightning()  # before the Trainer: its constructor logs the litlogger tip
    summary = RunSummary(_run_facts(cfg, run_dir))
    clock = TrainingClock()
    budget = cfg.get("time_budget_minutes")
    window = growth_window(cfg.scheduler)
    planner = [TimeBudget(budget, cfg.trainer.max_epochs, clock, window)] if budget else []
    trainer = pl.Trainer(
        **_trainer_args(cfg),
        default_root_dir=run_dir,
        logger=make_loggers(cfg, run_dir, resuming=resume_from is not None),
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        callbacks=[
            # First, so the epoch-end time it measures includes the monitor and the checkpoint.
            summary,
            RandomStates(),
            SaveConfig(cfg, run_dir / "config.yaml"),
            checkpoints,
            LearningRateMonitor(logging_interval="step"),
            ReportSkippedImages(),
        ]
        + ([monitor] if monitor else [])
        # After the monitor, so each epoch's count includes its kNN evaluation; Lightning calls
        # the checkpoint callbacks last, so each checkpoint holds the count of its own epoch
        # and the epoch's log row, taken after everything else has logged. The budget reads
        # the clock after it has counted the epoch.
        + [clock, *planner, MetricsAcrossResume(), within_epoch],
        enable_model_summary=False,
    )
    if resume_from is not None and trainer.is_global_zero:
        print(f"Resuming from {resume_from.path} (step {resume_from.global_step})")
        carry_over_metrics(trainer.loggers[0], resume_from.global_step, resume_from.epoch_row)
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=resume_from.path if resume_from else None,
        weights_only=True,
    )
    return Path(checkpoints.last_model_path) if trainer.is_global_zero else None
