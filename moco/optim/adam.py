"""Adam with the bias corrections folded into the learning rate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from moco.optim.base import ElementwiseOptimizer, check_positive, check_unit_interval


class Adam(ElementwiseOptimizer):
    """Adam, per step, with ``m`` and ``v`` starting at zero and ``t`` at 0::

        t <- t + 1
        lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
        m <- m + (1 - b1) * (g - m)
        v <- v + (1 - b2) * (g^2 - v)
        p <- p - lr_t * m / (sqrt(v) + eps)

    ``t`` is counted per parameter (a parameter without a gradient does not advance it).
    ``eps`` is added to ``sqrt(v)``, not to the bias-corrected ``sqrt(v_hat)`` as in
    ``torch.optim.Adam``: this equals torch's rule with ``eps / sqrt(1 - b2^t)`` in place of
    ``eps``, so the two are close unless gradients are tiny.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
    ) -> None:
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (need two values b1, b2)")
        check_unit_interval("beta1 (betas[0])", betas[0])
        check_unit_interval("beta2 (betas[1])", betas[1])
        check_positive("eps", eps)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        firsts = self._zero_state(params, "exp_avg")
        seconds = self._zero_state(params, "exp_avg_sq")
        step_sizes = []
        for p in params:
            state = self.state[p]
            state["step"] = t = state.get("step", 0) + 1
            lr_t = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
            step_sizes.append(-lr_t)
        torch._foreach_lerp_(firsts, grads, 1.0 - beta1)  # m + (1 - b1) * (g - m)
        torch._foreach_lerp_(seconds, torch._foreach_mul(grads, grads), 1.0 - beta2)
        denominators = torch._foreach_sqrt(seconds)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, firsts, denominators, step_sizes)
