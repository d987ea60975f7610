"""What every measured step is built from, taken from the composed config the way pretraining
takes it: the model, the optimizer with its scaled lr, the precision, and two synthetic views.

Synthetic views (seeded random tensors) keep data loading and augmentation out of the step
variants; only ``loop`` measures them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from moco.model import MoCo


def precision(cfg: DictConfig) -> str:
    """The Lightning precision string pretraining would run with (``auto`` resolved)."""
    from moco.run.hardware import precision_for

    return precision_for(cfg)


def autocast(cfg: DictConfig) -> contextlib.AbstractContextManager:
    """What Lightning's mixed-precision plugin does around training_step; nothing for fp32."""
    resolved = precision(cfg)
    if resolved.endswith("-mixed"):
        dtype = torch.bfloat16 if resolved.startswith("bf16") else torch.float16
        return torch.autocast(device_type=cfg.trainer.accelerator, dtype=dtype)
    return contextlib.nullcontext()


def optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimizer with the lr scaled by the batch, by the rule MoCo trains with."""
    import hydra

    from moco.optim.scheduled import scaled_lr

    lr = scaled_lr(cfg.optimizer.lr, cfg.data.batch_size, cfg.model.lr_reference_batch)
    return hydra.utils.instantiate(cfg.optimizer, params=params, lr=lr)


def synthetic_views(cfg: DictConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded batches of the configured shape: every variant sees the same tensors."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def build_moco(cfg: DictConfig, device: str) -> MoCo:
    """The project's MoCo LightningModule as the config builds it, seeded, in training mode."""
    import hydra

    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model).to(device).train()


def with_overrides(cfg: DictConfig, *dotlist: str) -> DictConfig:
    """``cfg`` with ``key=value`` overrides merged in (``cfg`` itself is left as it is)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotlist)))
