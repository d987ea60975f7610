"""Pretraining configs composed from code, as scripts/pretrain.py would compose them: the
evaluation builds ``checkpoint=random`` from the experiment it is compared with."""

from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from moco.encoders import EncoderSpec
from moco.errors import ConfigError
from moco.run.config_store import register

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def pretrain_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/pretrain.yaml with ``overrides`` (e.g. ``+experiment=moco_v2``), without Hydra's own
    run settings. Inside a running Hydra app its config search path is used."""
    register()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="pretrain", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def experiment_encoder_spec(experiment: str | None) -> EncoderSpec:
    """The encoder spec that ``+experiment=<experiment>`` pretrains (None: the group defaults).

    The module itself says what its encoder is, so it is built, on the meta device: shapes only,
    no memory and no initialisation cost.
    """
    try:
        cfg = pretrain_config([f"+experiment={experiment}"] if experiment else [])
    except MissingConfigException as exc:
        raise ConfigError(
            f"random_from={experiment} is unknown: use one of {', '.join(exc.options or [])}"
        ) from None
    with torch.device("meta"):
        return hydra.utils.instantiate(cfg.model).encoder_spec
