"""AdaGrad: per-element learning rates from the sum of squared gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from moco.optim.base import ElementwiseOptimizer, check_positive


class AdaGrad(ElementwiseOptimizer):
    """AdaGrad, per step, with ``h`` starting at zero::

    h <- h + g^2
    p <- p - lr * g / (sqrt(h) + eps)
    """

    def __init__(
        self, params: Iterable, lr: float, eps: float = 1e-7, weight_decay: float = 0.0
    ) -> None:
        check_positive("eps", eps)
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        sums = self._zero_state(params, "sum_sq")
        torch._foreach_addcmul_(sums, grads, grads)
        denominators = torch._foreach_sqrt(sums)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"])
