"""Typed schema of the ``logger`` group (conf/logger/): which experiment trackers a pretraining
run writes to besides the CSV log, which is always on (moco/run/loggers.py).

Several options of the group can be chosen at once (``logger=[csv,wandb,mlflow]``); Hydra merges
each into the one ``logger`` node, so each option fills its own key here and a backend that was
not chosen stays null. moco/run/schema.py says how schemas are used.
"""

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING


class WandbMode(str, Enum):
    # Its own small enum rather than moco.run.schema.choices: schema.py imports this module.
    online = "online"
    offline = "offline"  # kept in the run directory's wandb/ for `wandb sync`
    disabled = "disabled"  # W&B calls do nothing

    def __str__(self) -> str:
        return self.value


@dataclass
class TensorBoardConfig:
    """No settings: the event files go beside metrics.csv, in the run directory's logs/."""


@dataclass
class WandbConfig:
    project: str = MISSING
    entity: str | None = MISSING
    mode: WandbMode = MISSING
    tags: list[str] = MISSING


@dataclass
class MlflowConfig:
    experiment_name: str = MISSING
    tracking_uri: str | None = MISSING  # null: a SQLite store in the run directory


@dataclass
class LoggerConfig:
    tensorboard: TensorBoardConfig | None = None
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None
