"""RMSProp: per-element learning rates from a moving average of squared gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from moco.optim.base import ElementwiseOptimizer, check_positive, check_unit_interval


class RMSProp(ElementwiseOptimizer):
    """RMSProp, per step, with ``h`` starting at zero::

        h <- alpha * h + (1 - alpha) * g^2
        p <- p - lr * g / (sqrt(h) + eps)        (default, eps_inside_sqrt=False)
        p <- p - lr * g / sqrt(h + eps)          (eps_inside_sqrt=True)

    The two placements of ``eps`` come from the two source documents (the second one used
    ``eps=1e-10`` and ``alpha=0.9``). The default placement is the one of
    ``torch.optim.RMSprop``; they differ only where ``eps`` is comparable to ``sqrt(h)``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        alpha: float = 0.99,
        eps: float = 1e-7,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        check_unit_interval("alpha", alpha)
        check_positive("eps", eps)
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "eps_inside_sqrt": bool(eps_inside_sqrt),
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        alpha, eps = group["alpha"], group["eps"]
        averages = self._zero_state(params, "square_avg")
        torch._foreach_mul_(averages, alpha)
        torch._foreach_addcmul_(averages, grads, grads, value=1.0 - alpha)
        if group["eps_inside_sqrt"]:
            denominators = torch._foreach_add(averages, eps)
            torch._foreach_sqrt_(denominators)
        else:
            denominators = torch._foreach_sqrt(averages)
            torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"])
