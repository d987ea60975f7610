"""Validation of the composed pretraining config, before any work starts."""

from omegaconf import DictConfig, OmegaConf

from moco.data.datasets import LOADERS
from moco.encoders import BACKBONES, HEADS
from moco.errors import ConfigError
from moco.optim.schedules import SCHEDULES

PRECISIONS = (
    "auto",
    "32",
    "16",
    "bf16",
    "16-true",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "64",
    "64-true",
)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_pretrain(cfg: DictConfig) -> None:
    """Raise ConfigError with one actionable line for the first invalid value found."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is required: set it on the command line, e.g. {key}=...")

    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    _check(data.name in LOADERS, f"data.name={data.name} is unknown: use one of {sorted(LOADERS)}")
    _check(
        model.backbone in BACKBONES,
        f"backbone {model.backbone} is unknown: use one of {sorted(BACKBONES)}",
    )
    _check(model.head in HEADS, f"model.head={model.head} is unknown: use one of {list(HEADS)}")
    _check(
        cfg.scheduler.name in SCHEDULES,
        f"scheduler.name={cfg.scheduler.name} is unknown: use one of {list(SCHEDULES)}",
    )
    _check(data.batch_size >= 1, f"data.batch_size={data.batch_size} must be >= 1")
    _check(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    _check(model.dim >= 1, f"model.dim={model.dim} must be >= 1")
    _check(
        model.temperature > 0,
        f"model.temperature={model.temperature} must be > 0 (papers: 0.07 or 0.2)",
    )
    _check(
        0 <= model.momentum < 1,
        f"model.momentum={model.momentum} must be in [0, 1) (papers: 0.999; small data: 0.99)",
    )
    _check(
        model.momentum_schedule in ("constant", "cosine"),
        f"model.momentum_schedule={model.momentum_schedule} is unknown: use constant or cosine",
    )
    _check(
        model.bn_splits >= 1,
        f"model.bn_splits={model.bn_splits} must be >= 1 (1 = plain BatchNorm)",
    )
    _check(
        data.batch_size % model.bn_splits == 0 and data.batch_size >= 2 * model.bn_splits,
        f"data.batch_size={data.batch_size} must be a multiple of "
        f"model.bn_splits={model.bn_splits} with at least 2 samples per split: change one of them",
    )
    _check(cfg.optimizer.lr > 0, f"optimizer.lr={cfg.optimizer.lr} must be > 0")
    _check(
        str(trainer.precision) in PRECISIONS,
        f"trainer.precision={trainer.precision} is unknown: use one of {list(PRECISIONS)}",
    )
    _check(
        (trainer.max_epochs or -1) > 0 or (trainer.max_steps or -1) > 0,
        "set trainer.max_epochs or trainer.max_steps to a positive number",
    )

    world = trainer.devices * trainer.num_nodes if isinstance(trainer.devices, int) else 1
    keys_per_step = data.batch_size * world * (2 if model.symmetric else 1)
    which = "global batch x 2, symmetric" if model.symmetric else "global batch"
    _check(
        model.queue_size >= keys_per_step,
        f"model.queue_size={model.queue_size} is smaller than the {keys_per_step} keys "
        f"enqueued per step ({which}): raise model.queue_size or lower data.batch_size",
    )
