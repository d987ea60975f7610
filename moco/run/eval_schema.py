"""Typed schemas of the offline evaluations (conf/knn.yaml, probe.yaml, compare.yaml) and of
export (conf/export.yaml); moco/run/schema.py says how schemas are used."""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from moco.eval.probe import NORMALISATIONS
from moco.run.export_formats import FORMATS
from moco.run.schema import DataConfig, Layer, SchedulerConfig, ViewConfig, choices

Normalisation = choices("Normalisation", NORMALISATIONS)
ExportFormat = choices("ExportFormat", FORMATS)


@dataclass
class RandomInitConfig:
    seed: int = 0


@dataclass
class FeaturesConfig:
    layer: Layer = MISSING
    batch_size: int = MISSING
    device: str = MISSING
    train_limit: int | None = MISSING
    test_limit: int | None = MISSING
    seed: int = MISSING
    cache_dir: str | None = MISSING
    progress: bool = MISSING
    random_init: RandomInitConfig = field(default_factory=RandomInitConfig)


@dataclass
class ProbeConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    normalize: Normalisation = MISSING
    augment: bool = MISSING
    augmentation: ViewConfig = MISSING
    seed: int = MISSING
    validation: int = MISSING
    threads: int | None = MISSING
    lr_by_optimizer: dict[str, float] = MISSING


@dataclass
class KnnReportConfig:
    k: int = MISSING
    temperature: float = MISSING


@dataclass
class NeighboursPictureConfig:
    queries: int = MISSING
    neighbours: int = MISSING


@dataclass
class KnnSweepConfig:
    ks: list[int] = MISSING
    temperatures: list[float] = MISSING
    report: KnnReportConfig = MISSING
    picture: NeighboursPictureConfig = MISSING


@dataclass
class EvalConfig:
    """Common to knn.yaml, probe.yaml and compare.yaml."""

    checkpoint: str = MISSING
    # checkpoint=random: the experiment whose encoder to build (a key named experiment would be
    # taken by Hydra for the experiment group of conf/)
    random_from: str | None = MISSING
    data: DataConfig = MISSING
    features: FeaturesConfig = MISSING


@dataclass
class KnnEvalConfig(EvalConfig):
    knn: KnnSweepConfig = MISSING


@dataclass
class ProbeEvalConfig(EvalConfig):
    probe: ProbeConfig = MISSING
    optimizer: Any = MISSING
    scheduler: SchedulerConfig = MISSING


@dataclass
class CompareEvalConfig(EvalConfig):
    probe: ProbeConfig = MISSING
    optimizers: dict[str, Any] = MISSING
    scheduler: SchedulerConfig = MISSING


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    format: ExportFormat = MISSING
    output: str | None = MISSING


TOP_LEVEL = {
    "knn": KnnEvalConfig,
    "probe": ProbeEvalConfig,
    "compare": CompareEvalConfig,
    "export": ExportConfig,
}
