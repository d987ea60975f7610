"""Gradient descent with momentum, the learning rate inside the velocity."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from moco.optim.base import ElementwiseOptimizer, check_unit_interval


class Momentum(ElementwiseOptimizer):
    """Momentum ("heavy ball"), per step, with the velocity ``v`` starting at zero::

        v <- momentum * v + lr * g
        p <- p - v

    The learning rate is inside ``v``: with a constant ``lr`` this is the path of
    ``torch.optim.SGD(momentum=momentum)``, but when ``lr`` changes the old values stay in
    ``v`` and the paths differ. With a constant gradient the step tends to
    ``lr * g / (1 - momentum)``.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        check_unit_interval("momentum", momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        velocities = self._zero_state(params, "velocity")
        torch._foreach_mul_(velocities, group["momentum"])
        torch._foreach_add_(velocities, grads, alpha=group["lr"])
        torch._foreach_sub_(params, velocities)
