"""The step variants: each maker builds its model and optimizer once and returns ``step(i)``,
one training step on the synthetic views. Only what a variant is about differs between them;
everything else (backbone, views, optimizer, precision) comes from :mod:`.workload`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moco.tools.benchmark.official import OfficialStyleMoCo
from moco.tools.benchmark.workload import (
    autocast,
    build_moco,
    optimizer,
    synthetic_views,
    with_overrides,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig

Step = Callable[[int], None]
StepMaker = Callable[["DictConfig", str], Step]


def floor_step(cfg: DictConfig, device: str, prepare=None) -> Step:
    """Bare encoders: query forward + backward + optimizer step, key forward. ``prepare(model)``,
    if given, alters the model first (another variant's one difference)."""
    model = build_moco(cfg, device)
    if prepare is not None:
        prepare(model)
    encoder_q, encoder_k = model.encoder_q, model.encoder_k
    opt = optimizer(cfg, encoder_q.parameters())
    view_q, view_k = synthetic_views(cfg, device)

    def step(_: int) -> None:
        with autocast(cfg):
            q = encoder_q(view_q)  # N x dim
            with torch.no_grad():
                encoder_k(view_k)
            loss = q.float().square().mean()  # any scalar: backward costs the same
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def floor_plain_convs_step(cfg: DictConfig, device: str) -> Step:
    """As ``floor`` with every 3x3 convolution a plain ``nn.Conv2d``: what the matrix products of
    ``moco.small_map_conv`` save on maps of at most 2x2 pixels."""
    from moco.small_map_conv import use_small_map_convs

    return floor_step(cfg, device, prepare=lambda model: use_small_map_convs(model, enabled=False))


def moco_step(cfg: DictConfig, device: str, compiled: bool = False) -> Step:
    """The LightningModule's own training_step, then backward and optimizer step."""
    model = build_moco(cfg, device)
    if compiled:
        model.encoder_q = torch.compile(model.encoder_q)
        model.encoder_k = torch.compile(model.encoder_k)
    opt = optimizer(cfg, model.encoder_q.parameters())
    batch = (synthetic_views(cfg, device), torch.zeros(cfg.data.batch_size, dtype=torch.long))

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(cfg):
            loss = model.training_step(batch, i)
        loss.backward()
        opt.step()

    return step


def moco_noclone_step(cfg: DictConfig, device: str) -> Step:
    """As ``moco`` but the negatives are the queue buffer itself, enqueued after backward."""
    from moco.divergence import DivergenceGuard
    from moco.losses import contrastive_top1
    from moco.momentum import momentum_update

    model = build_moco(cfg, device)
    opt = optimizer(cfg, model.encoder_q.parameters())
    view_q, view_k = synthetic_views(cfg, device)
    guard = DivergenceGuard()

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(cfg):
            momentum_update(model.encoder_q, model.encoder_k, cfg.model.momentum)
            loss, logits, keys = model.contrast(view_q, view_k, model.queue.keys)
            # What training_step does besides, so that this A/B against ``moco`` differs only in
            # the copy and the order: the divergence guard's per-step work and the top-1.
            guard.observe(loss, i, 0)
            contrastive_top1(logits)
        loss.backward()
        opt.step()
        model.queue.enqueue(keys)  # after backward: the logits no longer need the old buffer

    return step


def official_step(cfg: DictConfig, device: str) -> Step:
    """The official-style plain-PyTorch step (:class:`OfficialStyleMoCo`)."""
    moco = OfficialStyleMoCo(cfg, device)
    opt = optimizer(cfg, moco.encoder_q.parameters())
    view_q, view_k = synthetic_views(cfg, device)

    def step(_: int) -> None:
        loss = moco.forward(view_q, view_k)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


STEP_MAKERS: dict[str, StepMaker] = {
    "floor": floor_step,
    "moco": moco_step,
    "moco_noclone": moco_noclone_step,
    "moco_compiled": lambda cfg, device: moco_step(cfg, device, compiled=True),
    "official": official_step,
    "floor_plain_convs": floor_plain_convs_step,
    "floor_nchw": lambda cfg, device: floor_step(
        with_overrides(cfg, "model.channels_last=false"), device
    ),
}
