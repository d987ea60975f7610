"""Validation of the composed pretraining config, before any work starts."""

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moco.data.datasets import LOADERS
from moco.encoders import BACKBONES, HEADS, STEMS
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


# Values compared with numbers below: a wrong type (model.temperature=abc, data.batch_size=16.5,
# model.queue_size=null) must be a ConfigError too, not a TypeError with a traceback.
_WHOLE_NUMBERS = (
    "data.batch_size",
    "data.num_workers",
    "model.dim",
    "model.queue_size",
    "model.bn_splits",
    "trainer.num_nodes",
)
_WHOLE_NUMBERS_OR_NULL = ("trainer.max_epochs", "trainer.max_steps")
_NUMBERS = ("model.temperature", "model.momentum", "optimizer.lr")
_BOOLEANS = ("model.symmetric",)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _show(value) -> str:
    """A value as written on the command line (null, true) or, for a string, quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def _check_types(cfg: DictConfig) -> None:
    def value(key: str):
        return OmegaConf.select(cfg, key)

    for key in _WHOLE_NUMBERS + _WHOLE_NUMBERS_OR_NULL:
        v = value(key)
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (
            v is None and key in _WHOLE_NUMBERS_OR_NULL
        )
        _check(ok, f"{key}={_show(v)} must be a whole number")
    for key in _NUMBERS:
        v = value(key)
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        _check(ok, f"{key}={_show(v)} must be a number")
    for key in _BOOLEANS:
        v = value(key)
        _check(isinstance(v, bool), f"{key}={_show(v)} must be true or false")


def validate_pretrain(cfg: DictConfig) -> None:
    """Raise ConfigError with one actionable line for the first invalid value found."""
    try:  # every ${...} reference, resolved once: a broken one is a user mistake too
        missing = OmegaConf.missing_keys(cfg)
        if not missing:
            OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{exc.full_key}: {reason}: fix or remove this ${{...}} reference"
        ) from None
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is required: set it on the command line, e.g. {key}=...")
    _check_types(cfg)

    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    _check(data.name in LOADERS, f"data.name={data.name} is unknown: use one of {sorted(LOADERS)}")
    _check(
        model.backbone in BACKBONES,
        f"backbone {model.backbone} is unknown: use one of {sorted(BACKBONES)}",
    )
    _check(
        model.get("stem", "auto") in STEMS,
        f"backbone.stem={model.get('stem')} is unknown: use one of {list(STEMS)}",
    )
    _check(model.head in HEADS, f"model.head={model.head} is unknown: use one of {list(HEADS)}")
    _check(
        cfg.scheduler.name in SCHEDULES,
        f"scheduler.name={cfg.scheduler.name} is unknown: use one of {list(SCHEDULES)}",
    )
    batched = cfg.augment.get("batched", "auto")
    _check(
        batched in ("auto", True, False),
        f"augment.batched={_show(batched)} is unknown: use auto, true or false",
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
