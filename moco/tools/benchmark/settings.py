"""One benchmark case (:class:`Settings`), the variant names, and the project's config composed
for a case: the benchmark builds its model, optimizer and data from the same conf/pretrain.yaml
that pretraining uses, so it measures what a user would train, not a copy that can drift."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omegaconf import DictConfig

MAIN_VARIANTS = ("floor", "moco", "official", "loop")
EXTRA_VARIANTS = ("moco_noclone", "moco_compiled", "floor_nchw", "floor_plain_convs", "levers")
_LOOP = re.compile(r"^loop(?:_w(\d+))?$")


@dataclasses.dataclass
class Settings:
    """One benchmark case. ``None`` means: as the composed config (conf/) says."""

    backbone: str = "resnet18"
    data: str = "fashion_mnist"
    image_size: int | None = None
    channels: int | None = None
    batch: int = 256
    queue_size: int = 65536
    dim: int | None = None
    bn_splits: int | None = None
    precision: str = "32"  # or bf16-mixed, auto
    channels_last: bool = True
    threads: int = 0  # torch intra-op threads; 0: torch's default
    warmup: int = 3
    steps: int = 5
    device: str = "cpu"
    malloc: str = "no-mmap"  # as pretraining sets it (conf/pretrain.yaml); or default
    stem: str = "small"  # backbone.stem; no experiment or data-set recipe is applied
    overrides: tuple[str, ...] = ()  # further Hydra overrides, e.g. data.num_train=64

    def label(self) -> str:
        threads = self.threads or torch.get_num_threads()
        return (
            f"{self.backbone} ({self.stem} stem) {self.data} batch {self.batch} "
            f"K {self.queue_size} "
            f"precision {self.precision} channels_last {'on' if self.channels_last else 'off'} "
            f"threads {threads} malloc {self.malloc}"
        )


def validate_variant(name: str) -> str:
    """``name`` if it is a variant the benchmark knows; a ValueError naming the choices if not."""
    if name in MAIN_VARIANTS or name in EXTRA_VARIANTS or is_loop(name):
        return name
    raise ValueError(
        f"unknown variant {name!r}: use {', '.join(MAIN_VARIANTS + EXTRA_VARIANTS)} or loop_w<n>"
    )


def is_loop(name: str) -> bool:
    """Whether ``name`` is ``loop`` or ``loop_w<n>``: the full pretraining loop."""
    return _LOOP.match(name) is not None


def loop_workers(name: str) -> int | None:
    """n of ``loop_w<n>``; None for ``loop`` (the configured ``data.num_workers``) and for the
    variants that load no data."""
    match = _LOOP.match(name)
    return int(match.group(1)) if match and match.group(1) is not None else None


def compose(settings: Settings, num_workers: int | None = None) -> DictConfig:
    """The ``pretrain`` config for ``settings``, composed as scripts/pretrain.py composes it, and
    validated by the same checks.

    No experiment: conf/pretrain.yaml's group defaults are MoCo v2 with the paper's values, while
    the experiments add a data set's tuned recipe (stem, crops, batch) that would change what
    is measured behind the benchmark's own settings.
    """
    # Imported here, not at the top: scripts/benchmark.py imports this package before it parses
    # its arguments, and --help or a wrong argument should not wait for Hydra and Lightning.
    from moco.run.check import check_pretrain
    from moco.run.experiments import pretrain_config

    s = settings
    overrides = [
        f"data={s.data}",
        f"backbone={s.backbone}",
        f"backbone.stem={s.stem}",
        f"data.batch_size={s.batch}",
        f"model.queue_size={s.queue_size}",
        f"model.channels_last={str(s.channels_last).lower()}",
        f"trainer.precision={s.precision}",
        f"trainer.accelerator={s.device}",
        "eval.enabled=false",
    ]
    optional = {
        "data.image_size": s.image_size,
        "data.channels": s.channels,
        "model.dim": s.dim,
        "model.bn_splits": s.bn_splits,
        "data.num_workers": num_workers,
    }
    overrides += [f"{key}={value}" for key, value in optional.items() if value is not None]
    cfg = pretrain_config([*overrides, *s.overrides])
    check_pretrain(cfg)
    return cfg
