"""Typed schemas of the config groups in conf/: every key's type and, where the set is closed,
its choices. OmegaConf enforces them while Hydra composes, so a wrong type, an unknown choice or a
misspelt key is refused before any code runs. Values live in conf/*.yaml; the defaults here are
only the fallbacks of optional keys, never a second copy of a YAML value.

The closed sets come from the code that implements them (``STEMS``, ``SCHEDULES``, ...), so a new
choice is added in one place. Rules that span several keys are in ``moco.run.check``.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from omegaconf import MISSING

from moco.data.datasets import LOADERS
from moco.encoders import ALL_BACKBONES, HEADS, STEMS
from moco.eval.features import LAYERS
from moco.momentum import MOMENTUM_SCHEDULES
from moco.optim.schedules import SCHEDULES
from moco.run.hardware import MALLOC_MODES
from moco.run.logger_schema import LoggerConfig


class Choice(str, Enum):
    """A closed set of strings: compares equal to its value and prints as it."""

    def __str__(self) -> str:
        return self.value


def choices(name: str, values) -> type[Choice]:
    # OmegaConf matches a YAML string to a member by name: each name is its value.
    return Choice(name, {v: v for v in values})


DataName = choices("DataName", LOADERS)
Backbone = choices("Backbone", ALL_BACKBONES)
Stem = choices("Stem", STEMS)
Head = choices("Head", HEADS)
Schedule = choices("Schedule", SCHEDULES)
MomentumSchedule = choices("MomentumSchedule", MOMENTUM_SCHEDULES)
Layer = choices("Layer", LAYERS)
Malloc = choices("Malloc", MALLOC_MODES)


# ------------------------------------------------------------------------------ data, views
@dataclass
class DataConfig:
    name: DataName = MISSING
    root: str | None = MISSING
    download: bool = False
    image_size: int = MISSING
    channels: int = MISSING
    num_classes: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING


@dataclass
class FashionMnistDataConfig(DataConfig):
    system_root: str | None = MISSING  # where the Debian package puts the files


@dataclass
class SyntheticDataConfig(DataConfig):
    num_train: int = MISSING  # images per split, and the seed that draws them
    num_test: int = MISSING
    seed: int = MISSING


@dataclass
class ColorJitterConfig:
    p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class BlurConfig:
    p: float = 0.0
    sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    min_size: int = 64


@dataclass
class EraseConfig:
    """torchvision's RandomErasing: a rectangle of ``scale`` of the area, aspect ratio in
    ``ratio``, set to the data set's mean (0 after normalisation), with probability ``p``."""

    p: float = 0.0
    scale: list[float] = field(default_factory=lambda: [0.02, 0.33])
    ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])


@dataclass
class AffineConfig:
    """torchvision's RandomAffine without shear, with probability ``p``, right after the crop: a
    rotation uniform in +-``degrees``, a shift of whole pixels up to ``translate`` of the side
    along each axis, a zoom uniform in ``scale``; bilinear, the uncovered border black."""

    p: float = 0.0
    degrees: float = 0.0
    translate: float = 0.0
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])


@dataclass
class ViewConfig:
    """One view's recipe (moco/data/augment.py); the probe's augmentation is one too."""

    crop_scale: list[float] = MISSING
    affine: AffineConfig = field(default_factory=AffineConfig)
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    grayscale_p: float = 0.0
    blur: BlurConfig = field(default_factory=BlurConfig)
    solarize_p: float = 0.0
    flip_p: float = MISSING
    erase: EraseConfig = field(default_factory=EraseConfig)


# The values the second view may set for itself: ViewConfig's, each None (the first view's) by
# default. tests/test_config.py checks that the names stay those of ViewConfig.
@dataclass
class ColorJitterChanges:
    p: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None


@dataclass
class BlurChanges:
    p: float | None = None
    sigma: list[float] | None = None
    min_size: int | None = None


@dataclass
class EraseChanges:
    p: float | None = None
    scale: list[float] | None = None
    ratio: list[float] | None = None


@dataclass
class AffineChanges:
    p: float | None = None
    degrees: float | None = None
    translate: float | None = None
    scale: list[float] | None = None


@dataclass
class ViewChanges:
    crop_scale: list[float] | None = None
    affine: AffineChanges = field(default_factory=AffineChanges)
    color_jitter: ColorJitterChanges = field(default_factory=ColorJitterChanges)
    grayscale_p: float | None = None
    blur: BlurChanges = field(default_factory=BlurChanges)
    solarize_p: float | None = None
    flip_p: float | None = None
    erase: EraseChanges = field(default_factory=EraseChanges)


@dataclass
class SmallCropsConfig:
    """Extra queries per image (SwAV's multi-crop): ``count`` crops of ``scale`` of the area,
    resized to ``size`` px, after the first view's recipe without erasing; each is contrasted
    with the image's key. 0: none, the two views of the papers."""

    count: int = 0
    size: int = 18  # with the ImageNet stem, the smallest side that keeps every ResNet map
    # above 1x1, which bf16 on CPUs needs (moco.run.check._check_bf16_one_pixel_maps)
    scale: list[float] = field(default_factory=lambda: [0.2, 0.5])


@dataclass
class AugmentConfig(ViewConfig):
    """The first view's recipe, what the second changes (moco.data.augment.view_recipes), the
    small crops, and where the views are made."""

    name: str = "custom"
    batched: Any = "auto"  # auto, true or false (moco.run.check)
    second_view: ViewChanges = field(default_factory=ViewChanges)
    small_crops: SmallCropsConfig = field(default_factory=SmallCropsConfig)


@dataclass
class BackboneConfig:
    name: Backbone = MISSING
    stem: Stem = MISSING
    final_relu: bool = MISSING


# --------------------------------------------------------------------------------- models
@dataclass
class Instantiated:
    """What Hydra builds: the class, and its arguments passed as they are (the module builds its
    optimizer and schedule itself)."""

    _target_: str = MISSING
    _recursive_: bool = MISSING


@dataclass
class EncoderKeys(Instantiated):
    """The encoder spec of every model config (moco.encoders.EncoderSpec); the YAML points them
    at the backbone and data groups."""

    backbone: Backbone = MISSING
    stem: Stem = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    channels_last: bool = MISSING
    final_relu: bool = MISSING


@dataclass
class TrainingKeys:
    """What every pretraining module needs to build its optimizer and LR schedule."""

    batch_size: int = MISSING
    lr_reference_batch: int = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING


@dataclass
class MocoModelConfig(TrainingKeys, EncoderKeys):
    head: Head = MISSING
    dim: int = MISSING
    queue_size: int = MISSING
    momentum: float = MISSING
    momentum_schedule: MomentumSchedule = MISSING
    temperature: float = MISSING
    bn_splits: int = MISSING
    shuffle_bn: bool = MISSING
    symmetric: bool = MISSING
    neighbour_weight: float = MISSING


@dataclass
class MocoV3ModelConfig(TrainingKeys, EncoderKeys):
    dim: int = MISSING
    mlp_dim: int = MISSING
    momentum: float = MISSING
    momentum_schedule: MomentumSchedule = MISSING
    temperature: float = MISSING
    sync_bn: bool = MISSING


@dataclass
class SupervisedModelConfig(TrainingKeys, EncoderKeys):
    num_classes: int = MISSING


# ------------------------------------------------------------------- optimizer, schedule
@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0


@dataclass
class MomentumOptimizerConfig(OptimizerConfig):  # Momentum, Nesterov, torch.optim.SGD
    momentum: float = MISSING


@dataclass
class AdaGradConfig(OptimizerConfig):
    eps: float = MISSING


@dataclass
class RMSPropConfig(OptimizerConfig):
    alpha: float = MISSING
    eps: float = MISSING
    eps_inside_sqrt: bool = False


@dataclass
class AdamConfig(OptimizerConfig):  # moco.optim.Adam, torch.optim.AdamW
    betas: list[float] = MISSING
    eps: float = MISSING


@dataclass
class LarsConfig(MomentumOptimizerConfig):
    trust_coefficient: float = MISSING


@dataclass
class SchedulerConfig:
    name: Schedule = MISSING
    warmup_epochs: float = MISSING


@dataclass
class StepSchedulerConfig(SchedulerConfig):
    milestones: list[float] = MISSING  # fractions of training
    gamma: float = MISSING


# ----------------------------------------------------------------------- trainer, monitor
@dataclass
class TrainerConfig:
    """Arguments of pytorch_lightning.Trainer: the ones the project sets, and any other a user
    adds (+trainer.gradient_clip_val=1.0): the Trainer itself checks those."""

    accepts_new_keys: ClassVar[bool] = True

    accelerator: str = MISSING
    devices: Any = MISSING  # a number, a list of device ids or auto
    num_nodes: int = MISSING
    precision: Any = MISSING  # auto or one of Lightning's names (moco.run.check)
    max_epochs: int | None = MISSING
    max_steps: int | None = MISSING
    log_every_n_steps: int = MISSING
    deterministic: bool = MISSING


@dataclass
class DdpTrainerConfig(TrainerConfig):
    strategy: Any = MISSING  # a strategy object's config (moco.distributed.ddp_strategy)


@dataclass
class KnnMonitorConfig:
    enabled: bool = MISSING
    every_n_epochs: int = MISSING
    k: int = MISSING
    temperature: float = MISSING
    bank_size: int | None = MISSING
    test_size: int | None = MISSING
    batch_size: int = MISSING
    layer: Layer = MISSING


@dataclass
class CheckpointConfig:
    every_n_steps: int = MISSING  # 0: no checkpoint within the epoch by step count
    every_minutes: float = MISSING  # 0: none by time
    requeue: bool = MISSING  # requeue a SLURM job stopped by SIGUSR1 or SIGTERM


@dataclass
class PretrainConfig:
    data: DataConfig = MISSING
    augment: AugmentConfig = MISSING
    backbone: BackboneConfig = MISSING
    model: Any = MISSING  # MocoModelConfig, MocoV3ModelConfig or SupervisedModelConfig (its option)
    optimizer: Any = MISSING  # one of the optimizer schemas, typed by its group option
    scheduler: SchedulerConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=csv sets no key
    eval: KnnMonitorConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    seed: int = MISSING
    malloc: Malloc = MISSING
    resume: str = MISSING
    time_budget_minutes: float | None = None  # null: trainer.max_epochs epochs
    # A fresh start's weights: a file moco.weights knows (a pretraining checkpoint, an export,
    # official MoCo v1/v2/v3, torchvision ResNet weights), copied into the query and key
    # encoders (the head too when it fits); null: random. Ignored when the run resumes.
    init: str | None = None
    recipe: str | None = None  # the data set a recipe in conf/recipe/ was tuned for


# Schemas of group options that add keys to their group's common ones (the top-level schemas type
# every group); the option's YAML names its schema. Stored by moco/run/config_store.py.
SCHEMAS = {
    "data_fashion_mnist": FashionMnistDataConfig,
    "data_synthetic": SyntheticDataConfig,
    "model_moco": MocoModelConfig,
    "model_moco_v3": MocoV3ModelConfig,
    "model_supervised": SupervisedModelConfig,
    "optimizer_plain": OptimizerConfig,
    "optimizer_momentum": MomentumOptimizerConfig,
    "optimizer_adagrad": AdaGradConfig,
    "optimizer_rmsprop": RMSPropConfig,
    "optimizer_adam": AdamConfig,
    "optimizer_lars": LarsConfig,
    "scheduler_step": StepSchedulerConfig,
    "trainer_ddp": DdpTrainerConfig,
}
