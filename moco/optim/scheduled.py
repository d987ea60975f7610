"""The one place where an optimizer and its per-step LR schedule are built from configs.

Pretraining (``MoCo``, ``SupervisedReference``) and the linear probe all come through here, so
the linear lr scaling, the warm-up length and the schedule are the same rule everywhere.
"""

import math
from collections.abc import Callable, Iterable, Mapping

import hydra
import torch
from torch.optim.lr_scheduler import LambdaLR

from moco.optim.schedules import lr_factor


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``base_lr`` is set for ``reference_batch``
    images per step and grows in proportion to the batch actually used."""
    return base_lr * global_batch / reference_batch


def scheduled_optimizer(
    params: Iterable[torch.nn.Parameter],
    optimizer: Mapping,
    scheduler: Mapping,
    total_steps: int | Callable[[], int],
    steps_per_epoch: int,
    lr: float | None = None,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """``optimizer`` (a Hydra config with ``_target_``; ``lr`` overrides its lr) with a schedule
    stepped every iteration: ``scheduler`` holds ``name``, ``warmup_epochs`` and, for ``step``,
    ``milestones`` (fractions of training) and ``gamma``.

    ``total_steps`` may be a function, read at every step, for a run whose length is decided
    while it trains (``moco.run.time_budget``)."""
    kwargs = {} if lr is None else {"lr": lr}
    opt = hydra.utils.instantiate(optimizer, params=params, **kwargs)
    total = total_steps if callable(total_steps) else lambda: total_steps
    warmup = round(scheduler.get("warmup_epochs", 0) * steps_per_epoch)
    name, milestones = scheduler["name"], tuple(scheduler.get("milestones", ()))
    gamma = scheduler.get("gamma", 0.1)

    def factor(step: int) -> float:
        steps = total()  # a warm-up longer than the run ends with it
        return lr_factor(step, steps, name, min(warmup, steps), milestones, gamma)

    schedule = LambdaLR(opt, factor)
    return opt, schedule


def trainer_steps(trainer) -> tuple[int, int]:
    """(optimizer steps of the whole run, optimizer steps per epoch) of a Lightning Trainer.

    With only max_steps set, Lightning may not know the epoch length (inf): then an "epoch" of
    warm-up is taken to be the whole run.
    """
    total = int(trainer.estimated_stepping_batches)
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return total, total
    return total, max(int(batches) // trainer.accumulate_grad_batches, 1)


def lightning_optimizer(
    trainer,
    params: Iterable[torch.nn.Parameter],
    optimizer: Mapping,
    scheduler: Mapping,
    global_batch: int,
    reference_batch: int,
) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns: ``optimizer`` with its lr
    scaled from ``reference_batch`` to ``global_batch`` images, its schedule stepped every step
    over the run's length as the Trainer has it at that step (a time budget may change it)."""
    lr = scaled_lr(optimizer["lr"], global_batch, reference_batch)
    _, steps_per_epoch = trainer_steps(trainer)
    opt, schedule = scheduled_optimizer(
        params, optimizer, scheduler, lambda: trainer_steps(trainer)[0], steps_per_epoch, lr
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
