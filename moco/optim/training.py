"""The optimizer and per-step LR schedule a LightningModule returns from configure_optimizers."""

import math
from collections.abc import Iterable, Mapping

import hydra
import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR

from moco.optim.schedules import lr_factor


def scheduled_optimizer(
    trainer: pl.Trainer,
    params: Iterable[torch.nn.Parameter],
    optimizer: Mapping,
    scheduler: Mapping,
    global_batch: int,
    lr_reference_batch: int,
) -> tuple[dict, int]:
    """``optimizer`` (a Hydra config with ``_target_`` and a base ``lr`` for a global batch of
    ``lr_reference_batch``, scaled linearly to ``global_batch``), stepped every iteration by the
    ``scheduler`` config (``name``, ``warmup_epochs``, for ``step`` ``milestones`` and ``gamma``).

    Returns Lightning's optimizer dict and the number of optimizer steps of the whole run.
    """
    lr = optimizer["lr"] * global_batch / lr_reference_batch
    opt = hydra.utils.instantiate(optimizer, params=params, lr=lr)
    total_steps = int(trainer.estimated_stepping_batches)
    batches = trainer.num_training_batches
    # With only max_steps set, Lightning may not know the epoch length (inf): then an
    # "epoch" of warm-up is taken to be the whole run.
    steps_per_epoch = (
        max(int(batches) // trainer.accumulate_grad_batches, 1)
        if math.isfinite(batches)
        else total_steps
    )
    warmup_steps = min(round(scheduler.get("warmup_epochs", 0) * steps_per_epoch), total_steps)
    schedule = LambdaLR(
        opt,
        lambda step: lr_factor(
            step,
            total_steps,
            scheduler["name"],
            warmup_steps,
            scheduler.get("milestones", ()),
            scheduler.get("gamma", 0.1),
        ),
    )
    config = {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
    return config, total_steps
