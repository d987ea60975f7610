"""Plain stochastic gradient descent."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from moco.optim.base import ElementwiseOptimizer


class SGD(ElementwiseOptimizer):
    """Plain gradient descent, per step::

        p <- p - lr * g

    where ``g`` is the gradient plus ``weight_decay * p``.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        torch._foreach_add_(params, grads, alpha=-group["lr"])
