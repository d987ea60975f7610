"""Nesterov's accelerated gradient, in look-ahead coordinates."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from moco.optim.base import ElementwiseOptimizer, check_unit_interval


class Nesterov(ElementwiseOptimizer):
    """Nesterov momentum: the gradient is taken at the look-ahead point.

    The rule, on the "true" parameters ``theta`` with velocity ``v`` (zero at first)::

        theta_ahead = theta - momentum * v
        g = grad J(theta_ahead)
        v <- momentum * v + lr * g
        theta <- theta - v

    A training loop only has the gradient at the parameters the model holds, so the model
    holds the look-ahead point ``phi = theta - momentum * v`` and one step is::

        v_new = momentum * v + lr * g        (g = gradient at phi)
        phi <- phi + momentum * v - (1 + momentum) * v_new

    which is exactly the sequence of look-ahead points of the rule above. With a constant
    ``lr`` it coincides with ``torch.optim.SGD(momentum=momentum, nesterov=True)``.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        check_unit_interval("momentum", momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        momentum = group["momentum"]
        velocities = self._zero_state(params, "velocity")
        torch._foreach_add_(params, velocities, alpha=momentum)  # phi + momentum * v
        torch._foreach_mul_(velocities, momentum)
        torch._foreach_add_(velocities, grads, alpha=group["lr"])  # v_new
        torch._foreach_add_(params, velocities, alpha=-(1.0 + momentum))
