"""Momentum (exponential moving average) update of the key encoder."""

import math

import torch
from torch import nn

# How m moves over training: constant, or cosine_momentum below.
MOMENTUM_SCHEDULES = ("constant", "cosine")


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online, for every parameter pair.

    Buffers (BatchNorm running statistics) are not averaged: the key encoder runs in train mode
    and keeps its own statistics, as in the official implementation.
    """
    online_params = list(online.parameters())
    target_params = list(target.parameters())
    if len(online_params) != len(target_params):
        raise ValueError("online and target modules have different parameter lists")
    # One fused call over all tensors instead of a Python loop of ~60 (ResNet-18) small kernels.
    torch._foreach_lerp_(target_params, online_params, 1.0 - m)


def cosine_momentum(base_m: float, step: int, total_steps: int) -> float:
    """BYOL-style schedule: m rises from ``base_m`` to 1 along a half cosine over training."""
    if total_steps <= 0:
        return base_m
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - base_m) * (math.cos(math.pi * progress) + 1.0) / 2.0


def scheduled_momentum(base_m: float, schedule: str, step: int, total_steps: int | None) -> float:
    """m at optimizer step ``step`` of ``total_steps`` under ``schedule`` (MOMENTUM_SCHEDULES);
    ``total_steps`` None (no trainer yet): ``base_m``."""
    if schedule == "cosine" and total_steps is not None:
        return cosine_momentum(base_m, step, total_steps)
    return base_m
