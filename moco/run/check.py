"""The checks a composed config gets before any work starts, beyond what its schema enforces.

Types, closed choices and unknown keys are the schema's job (moco/run/schema.py): OmegaConf
refuses them while Hydra composes, and ``omegaconf_error_line`` turns its report into the
project's one line. Here: references that do not resolve, required values left unset, ranges,
and the rules that span several keys. Every failure is one ``ConfigError`` line.
"""

import dataclasses
import itertools
import typing
from enum import Enum
from types import UnionType
from typing import Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from moco.data.augment import probabilities, view_recipes
from moco.encoders import BACKBONES, resolve_stem, strided_block_inputs
from moco.errors import ConfigError
from moco.model import queue_too_small
from moco.optim import PRETRAINING_ONLY
from moco.run.hardware import precision_for, uses_cuda
from moco.run.loggers import check_loggers

PRECISIONS = (
    *("auto", "32", "16", "bf16", "64"),
    *("16-true", "32-true", "bf16-true", "64-true", "bf16-mixed", "16-mixed"),
)
MONITOR_HINT = "(conf/eval/knn_monitor.yaml; eval.enabled=false turns the monitor off)"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def show(value) -> str:
    """A value as written on the command line (null, true) or, for a string, quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def setting(key: str, value) -> str:
    """``key=value`` as the user typed it on the command line when they did (a typed float turns
    their 0 into 0.0), else as the config holds it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            name, _, text = override.lstrip("+~").partition("=")
            if name == key:
                return f"{key}={text}"
    return f"{key}={value}"


# ---------------------------------------------------------------- what the schema refused
def _field_type(exc: OmegaConfBaseException):
    """The schema's type of the key ``exc`` is about, without Optional; None if unknown."""
    owner, key = getattr(exc, "object_type", None), getattr(exc, "key", None)
    if not (dataclasses.is_dataclass(owner) and isinstance(key, str)):
        return None
    kind = typing.get_type_hints(owner).get(key)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 and typing.get_origin(kind) in (Union, UnionType) else kind


def omegaconf_error_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's several-line report of a value the schema refused, as one line."""
    key = getattr(exc, "full_key", None) or ""
    value = getattr(exc, "value", None)
    kind = _field_type(exc)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return f"{key}={value} is unknown: use one of {', '.join(m.value for m in kind)}"
    must = {bool: "must be true or false", int: "must be a whole number", float: "must be a number"}
    if kind in must:
        return f"{key}={show(value)} {must[kind]}"
    text = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    return f"{key}: {text}" if key else text


def not_a_key(key: str, trainer: bool = True) -> str:
    """``trainer``: the config has Trainer arguments, the one place that takes new keys."""
    free = ", except Trainer arguments (+trainer.<name>=...)" if trainer else ""
    return (
        f"{key} is not a key of the config: check its spelling (--cfg job prints the config); "
        f"new keys (+{key}=...) are refused too{free}"
    )


def unknown_key(node: DictConfig, prefix: str = "") -> str | None:
    """The first key that its node's schema does not have (Hydra's ``+key=value`` adds keys even
    to typed nodes, so a misspelt ``+model.tempreature=0.1`` would otherwise be ignored)."""
    schema = OmegaConf.get_type(node)
    typed = dataclasses.is_dataclass(schema) and not getattr(schema, "accepts_new_keys", False)
    known = {f.name for f in dataclasses.fields(schema)} if typed else None
    for key, child in node.items_ex(resolve=False):
        if known is not None and key not in known:
            return f"{prefix}{key}"
        # A typed node left null (logger.wandb when W&B is not chosen) has no type and no keys.
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not None:
            found = unknown_key(child, f"{prefix}{key}.")
            if found:
                return found
    return None


def _reference_error(exc: OmegaConfBaseException) -> ConfigError:
    if not isinstance(exc, InterpolationResolutionError):
        return ConfigError(omegaconf_error_line(exc))
    reason = str(exc).strip().splitlines()[0]
    return ConfigError(f"{exc.full_key}: {reason}: fix or remove this ${{...}} reference")


def known_and_set(cfg: DictConfig) -> None:
    """Refuse keys their schema does not have and required values left at ???."""
    extra = unknown_key(cfg)
    if extra:
        raise ConfigError(not_a_key(extra, "trainer" in cfg))
    try:
        missing = OmegaConf.missing_keys(cfg)
    except OmegaConfBaseException as exc:  # a broken ${...} on the way
        raise _reference_error(exc) from None
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is required: set it on the command line, e.g. {key}=...")


def resolved(cfg: DictConfig) -> None:
    """``known_and_set``, then resolve every ${...} reference once (a broken one is a user
    mistake too)."""
    known_and_set(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise _reference_error(exc) from None


# -------------------------------------------------------------------------- pretraining
def check_pretrain(cfg: DictConfig) -> None:
    """Raise ConfigError with one actionable line for the first invalid value found."""
    resolved(cfg)
    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    _check_augment(cfg.augment)
    _check_bf16_one_pixel_maps(cfg)
    require(data.batch_size >= 1, f"{setting('data.batch_size', data.batch_size)} must be >= 1")
    require(data.num_workers >= 0, f"{setting('data.num_workers', data.num_workers)} must be >= 0")
    require(cfg.optimizer.lr > 0, f"{setting('optimizer.lr', cfg.optimizer.lr)} must be > 0")
    require(
        str(trainer.precision) in PRECISIONS,
        f"trainer.precision={trainer.precision} is unknown: use one of {list(PRECISIONS)}",
    )
    require(
        (trainer.max_epochs or -1) > 0 or (trainer.max_steps or -1) > 0,
        "set trainer.max_epochs or trainer.max_steps to a positive number",
    )
    budget = cfg.get("time_budget_minutes")
    if budget is not None:
        name = setting("time_budget_minutes", budget)
        require(budget > 0, f"{name} must be > 0 minutes (null: no budget)")
        require(
            (trainer.max_epochs or -1) > 0,
            f"{name} plans epochs up to trainer.max_epochs: set that > 0, or "
            "time_budget_minutes=null for a run of trainer.max_steps",
        )
    recipe = cfg.get("recipe")
    require(
        recipe is None or recipe == data.name,
        f"this experiment is tuned for data={recipe} (conf/recipe/{recipe}.yaml), not "
        f"data={data.name}: without +experiment the untuned group defaults run on any data set",
    )
    for key in ("every_n_steps", "every_minutes"):
        value = cfg.checkpoint[key]
        require(value >= 0, f"{setting(f'checkpoint.{key}', value)} must be >= 0 (0: off)")
    require(
        cfg.augment.small_crops.count == 0 or "queue_size" in model,
        f"{setting('augment.small_crops.count', cfg.augment.small_crops.count)} adds queries "
        "against MoCo v1/v2's queue: this model has none, use augment.small_crops.count=0",
    )
    if "queue_size" in model:  # MoCo v1/v2; the supervised reference has no MoCo keys to check
        _check_moco(model, data, trainer)
    elif "mlp_dim" in model:  # MoCo v3: no queue, no BN splits
        _check_moco_v3(model, data)
    if cfg.eval.enabled:
        check_knn_monitor(cfg.eval)
    check_loggers(cfg.logger)  # a tracker's package missing


def _check_augment(augment: DictConfig) -> None:
    batched = augment.batched
    require(
        batched in ("auto", True, False),
        f"augment.batched={show(batched)} is unknown: use auto, true or false",
    )
    first, second = view_recipes(augment)
    for where, recipe in (("augment", first), ("augment.second_view", second)):
        _check_view(where, recipe)
    small = augment.small_crops
    count, size = setting("augment.small_crops.count", small.count), small.size
    require(small.count >= 0, f"{count} must be >= 0 (0: no small crops)")
    require(size >= 1, f"{setting('augment.small_crops.size', size)} must be >= 1 px")
    _check_pair("augment.small_crops.scale", small.scale, "area fractions", high=1)


def _check_bf16_one_pixel_maps(cfg: DictConfig) -> None:
    """torch's bf16 convolution on CPUs returns a weight gradient with NaNs, in about a third of
    the steps, for a 3x3 stride-2 convolution over a 1x1 map (torch 2.14; docs/speed.md). A
    ResNet has three such convolutions, so images or small crops that shrink to 1x1 before one
    would stop the run within its first steps."""
    model = cfg.model
    if cfg.backbone.name not in BACKBONES or uses_cuda(cfg.trainer.accelerator):
        return
    if not precision_for(cfg).startswith("bf16"):  # bf16, bf16-mixed, bf16-true
        return
    stem = resolve_stem(model.stem, model.image_size)
    sizes = {"data.image_size": model.image_size}
    if cfg.augment.small_crops.count:
        sizes["augment.small_crops.size"] = cfg.augment.small_crops.size
    for key, size in sizes.items():
        smallest = next(s for s in itertools.count(size) if min(strided_block_inputs(stem, s)) > 1)
        require(
            smallest == size,
            f"{setting(key, size)} px leaves 1x1 maps in the {stem} stem's ResNet, whose "
            f"gradients come out NaN in bf16 on a CPU: use {key}={smallest} or more, or "
            "trainer.precision=32",
        )


def _check_view(where: str, recipe: DictConfig) -> None:
    """One view's recipe (a ViewConfig) at ``where``: probabilities, erasing, affine moves."""
    _check_probabilities(where, recipe)
    _check_erase(where, recipe.erase)
    _check_affine(where, recipe.affine)


def _check_affine(where: str, affine: DictConfig) -> None:
    require(
        0 <= affine.degrees <= 180,
        f"{where}.affine.degrees={affine.degrees} must be in [0, 180] (a rotation of +-degrees)",
    )
    require(
        0 <= affine.translate <= 1,
        f"{where}.affine.translate={affine.translate} must be in [0, 1] (a fraction of the side)",
    )
    _check_pair(f"{where}.affine.scale", affine.scale, "zoom factors")


def _check_erase(where: str, erase: DictConfig) -> None:
    _check_pair(f"{where}.erase.scale", erase.scale, "area fractions", high=1)
    _check_pair(f"{where}.erase.ratio", erase.ratio, "aspect ratios")


def _check_pair(name: str, values, meaning: str, high: float | None = None) -> None:
    """A range setting [low, high] with 0 < low <= high, and high <= ``high`` when given."""
    pair = list(values)
    ok = len(pair) == 2 and 0 < pair[0] <= pair[1] and (high is None or pair[1] <= high)
    bound = "" if high is None else f" <= {high}"
    require(ok, f"{name}={pair} must be [low, high] with 0 < low <= high{bound} ({meaning})")


def _check_probabilities(where: str, recipe: DictConfig) -> None:
    for name, p in probabilities(recipe).items():
        require(0 <= p <= 1, f"{where}.{name}={p} is a probability: use a value in [0, 1]")


def _check_moco(model: DictConfig, data: DictConfig, trainer: DictConfig) -> None:
    require(model.dim >= 1, f"{setting('model.dim', model.dim)} must be >= 1")
    require(
        model.temperature > 0,
        f"{setting('model.temperature', model.temperature)} must be > 0 (papers: 0.07 or 0.2)",
    )
    require(
        0 <= model.momentum < 1,
        f"{setting('model.momentum', model.momentum)} must be in [0, 1) "
        "(papers: 0.999; small data: 0.99)",
    )
    require(
        0 <= model.neighbour_weight <= 1,
        f"{setting('model.neighbour_weight', model.neighbour_weight)} must be in [0, 1] "
        "(0 = MoCo's own-key positives, 1 = all nearest-neighbour positives)",
    )
    require(
        model.bn_splits >= 1,
        f"{setting('model.bn_splits', model.bn_splits)} must be >= 1 (1 = plain BatchNorm)",
    )
    require(
        data.batch_size % model.bn_splits == 0 and data.batch_size >= 2 * model.bn_splits,
        f"{setting('data.batch_size', data.batch_size)} must be a multiple of "
        f"{setting('model.bn_splits', model.bn_splits)} with at least 2 samples per split: "
        "change one of them",
    )
    # The processes the launcher asks for; MoCo.setup checks again with the world Lightning
    # really started (devices=auto is only known then).
    world = trainer.devices * trainer.num_nodes if isinstance(trainer.devices, int) else 1
    problem = queue_too_small(model.queue_size, data.batch_size, world, model.symmetric)
    require(problem is None, problem or "")


def _check_moco_v3(model: DictConfig, data: DictConfig) -> None:
    for key in ("dim", "mlp_dim"):
        require(model[key] >= 1, f"{setting(f'model.{key}', model[key])} must be >= 1")
    require(
        model.temperature > 0,
        f"{setting('model.temperature', model.temperature)} must be > 0 (paper: 1.0 for "
        "ResNets, 0.2 for ViTs)",
    )
    require(
        0 <= model.momentum < 1,
        f"{setting('model.momentum', model.momentum)} must be in [0, 1) (paper: 0.99)",
    )
    # The projector's and predictor's BatchNorm1d cannot normalise a batch of one sample.
    require(
        data.batch_size >= 2,
        f"{setting('data.batch_size', data.batch_size)} must be >= 2: MoCo v3's BatchNorm "
        "needs two samples per process",
    )


def check_knn_monitor(c: DictConfig) -> None:
    rules = [
        (c.every_n_epochs >= 1, "eval.every_n_epochs must be >= 1"),
        (c.k >= 1, "eval.k must be >= 1"),
        (c.temperature > 0, "eval.temperature must be > 0"),
        (c.batch_size >= 1, "eval.batch_size must be >= 1"),
        (c.bank_size is None or c.bank_size >= 1, "eval.bank_size must be >= 1 or null (all)"),
        (c.test_size is None or c.test_size >= 1, "eval.test_size must be >= 1 or null (all)"),
    ]
    for ok, message in rules:
        require(ok, f"{message} {MONITOR_HINT}")


# ------------------------------------------------------------------- offline evaluation
def check_eval(cfg: DictConfig) -> None:
    """knn.yaml, probe.yaml and compare.yaml: one line for the first invalid value."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError(
            "checkpoint is required: checkpoint=runs/.../checkpoints/last.ckpt, raw or random"
        )
    if "probe" in cfg:  # before the lr reference, which such an optimizer has no entry for
        for name, opt in optimizers(cfg).items():
            require(
                opt.get("_target_") not in PRETRAINING_ONLY,
                f"optimizer {name} ({opt._target_}) is for pretraining only: the probe takes one "
                "of the six classic optimizers (sgd, momentum, nesterov, adagrad, rmsprop, adam)",
            )
    # Not resolved here: the probe's lr refers to Hydra's runtime choices (checked below).
    known_and_set(cfg)
    require(
        cfg.random_from is None or cfg.checkpoint == "random",
        f"random_from={cfg.random_from} names the encoder of checkpoint=random only: drop it, "
        "a checkpoint carries its own encoder spec",
    )
    f = cfg.features
    require(f.batch_size >= 1, f"features.batch_size={f.batch_size} must be >= 1")
    for key in ("train_limit", "test_limit"):
        require(
            f[key] is None or f[key] >= 1,
            f"features.{key}={f[key]} must be >= 1 or null (all images)",
        )
    if "knn" in cfg:
        knn = cfg.knn
        require(
            len(knn.ks) > 0 and all(k >= 1 for k in knn.ks),
            f"knn.ks={list(knn.ks)} must be integers >= 1",
        )
        require(
            len(knn.temperatures) > 0 and all(t > 0 for t in knn.temperatures),
            f"knn.temperatures={list(knn.temperatures)} must be > 0",
        )
        require(
            knn.report.k in knn.ks and knn.report.temperature in knn.temperatures,
            "knn.report.k and knn.report.temperature must be among knn.ks and knn.temperatures",
        )
        require(
            knn.picture.queries >= 0 and knn.picture.neighbours >= 1,
            f"knn.picture.queries={knn.picture.queries} must be >= 0 (0: no picture) and "
            f"knn.picture.neighbours={knn.picture.neighbours} >= 1",
        )
    if "probe" in cfg:
        p = cfg.probe
        require(p.epochs >= 1, f"probe.epochs={p.epochs} must be >= 1")
        require(p.batch_size >= 1, f"probe.batch_size={p.batch_size} must be >= 1")
        require(p.validation >= 0, f"probe.validation={p.validation} must be >= 0 (0: none)")
        require(
            not (p.validation and p.augment),
            "probe.validation holds out cached features: use it with probe.augment=false",
        )
        _check_view("probe.augmentation", p.augmentation)
        for name, opt in optimizers(cfg).items():
            try:
                lr = opt.lr
            except InterpolationResolutionError:
                raise ConfigError(
                    f"no probe learning rate for optimizer {name}: add it to probe.lr_by_optimizer "
                    f"(conf/probe/default.yaml) or set optimizer.lr=..."
                ) from None
            require(lr > 0, f"the learning rate of optimizer {name} must be > 0, got {lr}")


def check_export(cfg: DictConfig) -> None:
    """export.yaml: one line for a missing checkpoint or a key export does not have."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: checkpoint=runs/.../checkpoints/last.ckpt")
    known_and_set(cfg)


def optimizers(cfg: DictConfig) -> dict[str, DictConfig]:
    """The optimizer configs: all of ``optimizers`` (compare) or ``optimizer`` (probe)."""
    if "optimizers" in cfg:
        require(
            len(cfg.optimizers) > 0, "optimizers is empty: keep at least one optimizer to compare"
        )
        return dict(cfg.optimizers.items())
    from hydra.core.hydra_config import HydraConfig

    choice = (
        HydraConfig.get().runtime.choices.get("optimizer") if HydraConfig.initialized() else None
    )
    return {choice or cfg.optimizer._target_.rsplit(".", 1)[-1].lower(): cfg.optimizer}
