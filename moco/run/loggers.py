"""The loggers of a pretraining run: the CSV log always, then the trackers chosen with ``logger=``
(conf/logger/).

The CSV logger comes first: resume, the tests and the result tables read the run directory's
``logs/metrics.csv``, and the training code treats ``trainer.loggers[0]`` as that log.

W&B and MLflow keep their runs outside the run directory. A start that resumes from a checkpoint
continues the tracker runs of the earlier starts rather than opening new ones: each tracker notes
its run id in the run directory's ``logger_runs.json`` as soon as its run exists, and a resuming
start passes it back. A fresh start (``resume=none``, or no checkpoint yet) opens new runs.
"""

import importlib.util
import json
import os
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from pytorch_lightning.utilities import rank_zero_only

from moco.errors import ConfigError

BACKENDS = ("tensorboard", "wandb", "mlflow")
RUNS_FILE = "logger_runs.json"


# --------------------------------------------------------------------------- installed?
def chosen(logger_cfg: DictConfig) -> list[str]:
    """The trackers chosen with ``logger=``: an option that was not chosen leaves its key null."""
    return [name for name in BACKENDS if logger_cfg.get(name) is not None]


def _local_mlflow_store(mlflow_cfg: DictConfig) -> bool:
    uri = mlflow_cfg.tracking_uri
    return uri is None or str(uri).startswith("sqlite:")


def _needed_modules(name: str, backend_cfg: DictConfig) -> list[str]:
    if name == "mlflow" and _local_mlflow_store(backend_cfg):
        # mlflow-skinny leaves out the database layer that a SQLite store runs on.
        return ["mlflow", "sqlalchemy", "alembic"]
    return [name]


def _installed(module: str) -> bool:
    # Looked up, not imported: importing W&B or MLflow takes a while, and this runs first.
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules holds None for it: blocked, so not importable either
        return False


def check_loggers(logger_cfg: DictConfig) -> None:
    """Refuse a chosen tracker whose packages are not installed, before anything is written."""
    for name in chosen(logger_cfg):
        missing = [m for m in _needed_modules(name, logger_cfg[name]) if not _installed(m)]
        if missing:
            packages = " and ".join(missing) + (" packages" if len(missing) > 1 else " package")
            raise ConfigError(f"logger={name} needs the {packages}: pip install -e '.[{name}]'")


# ------------------------------------------------------------------------- run ids kept
class RunRecord:
    """One tracker's entry in ``logger_runs.json``: its run id, and where that run lives (a
    run of another project or tracking store is not continued)."""

    def __init__(self, run_dir: Path, backend: str, where: dict) -> None:
        self.path, self.backend, self.where = run_dir / RUNS_FILE, backend, where
        self._saved: str | None = None

    def _entries(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def run_id(self) -> str | None:
        entry = self._entries().get(self.backend)
        return entry["id"] if entry and entry.get("where") == self.where else None

    def save(self, run_id: str) -> None:
        if run_id == self._saved:  # called after every logging step: write once
            return
        self._saved = run_id
        entries = self._entries()
        entry = {"id": run_id, "where": self.where}
        if entries.get(self.backend) == entry:
            return
        entries[self.backend] = entry
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(entries, indent=2) + "\n")
        os.replace(partial, self.path)  # a start killed mid-write leaves the old file whole


class _NotesRunId:
    """For a tracker whose run lives outside the run directory: note the run's id once the run
    exists. Lightning asks every logger to save after it logs, first at the start of fit."""

    def __init__(self, *, record: RunRecord, **kwargs) -> None:
        super().__init__(**kwargs)
        self._run_record = record

    def save(self) -> None:
        super().save()
        run_id = self.version  # the run id for W&B and MLflow (W&B: None until its run starts)
        if run_id:
            self._run_record.save(str(run_id))


class _WandbRun(_NotesRunId, WandbLogger):
    pass


class _MlflowRun(_NotesRunId, MLFlowLogger):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # A continued run keeps the params it started with: MLflow refuses to change a logged
        # param, and a resumed start may change a few settings (the resume warns of them).
        self._continued = kwargs.get("run_id") is not None

    def log_hyperparams(self, params) -> None:
        if not self._continued:
            super().log_hyperparams(params)


def _wandb(c: DictConfig, run_dir: Path, resuming: bool) -> Logger:
    record = RunRecord(run_dir, "wandb", {"project": c.project, "entity": c.entity})
    return _WandbRun(
        record=record,
        id=record.run_id() if resuming else None,  # Lightning asks W&B to resume a known id
        save_dir=str(run_dir),  # W&B's own files go to the run directory's wandb/
        name=run_dir.name,  # the W&B run is named like its run directory
        project=c.project,
        entity=c.entity,
        mode=str(c.mode),
        tags=list(c.tags),
    )


def _mlflow(c: DictConfig, run_dir: Path, resuming: bool) -> Logger:
    # The configured URI, not the resolved one: a run directory that moved keeps its run.
    where = {"tracking_uri": c.tracking_uri, "experiment_name": c.experiment_name}
    record = RunRecord(run_dir, "mlflow", where)
    local = c.tracking_uri is None
    return _MlflowRun(
        record=record,
        run_id=record.run_id() if resuming else None,
        experiment_name=c.experiment_name,
        run_name=run_dir.name,
        # SQLite: MLflow's choice for a local store (it refuses its plain-file one by default).
        tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}" if local else c.tracking_uri,
        artifact_location=(run_dir.resolve() / "mlartifacts").as_uri() if local else None,
    )


def _tensorboard(c: DictConfig, run_dir: Path, resuming: bool) -> Logger:
    # The CSV log's folder: a resumed run adds its event file beside the earlier ones.
    return TensorBoardLogger(run_dir, name="", version="logs", default_hp_metric=False)


# ----------------------------------------------------------------------------- loggers
def _becomes_rank_zero() -> bool:
    """Whether this process will be global rank 0 of the run.

    Every process of a DDP run builds its loggers before the Trainer has set up the ranks, so
    this reads the launcher's variables, as Lightning does (RANK under torchrun, SLURM_PROCID,
    LOCAL_RANK in the processes Lightning starts itself; NODE_RANK on the other nodes).
    """
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def make_loggers(cfg: DictConfig, run_dir: Path, *, resuming: bool) -> list[Logger]:
    """The run's loggers: CSV first, then the trackers of ``cfg.logger``.

    ``resuming``: the run continues from a checkpoint, so W&B and MLflow continue the runs noted
    in the run directory. Trackers are built in the process that becomes rank 0 only: the others
    would never log, and an MLflow client opens its store as it is built.
    """
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="logs")]
    if not _becomes_rank_zero():
        return loggers
    builders = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}
    for name in chosen(cfg.logger):
        loggers.append(builders[name](cfg.logger[name], run_dir, resuming))
    return loggers
