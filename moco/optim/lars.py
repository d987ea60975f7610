"""LARS: momentum SGD whose step for each weight matrix is rescaled to that matrix's size.

MoCo v3 trains its ResNets with it (You et al. 2017, "Large Batch Training of Convolutional
Networks"); the rule below is the one of MoCo v3's released optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from moco.optim.base import check_non_negative, check_positive, check_unit_interval


def trust_ratio(param: Tensor, update: Tensor, trust_coefficient: float) -> Tensor:
    """``trust_coefficient * ||param|| / ||update||`` as a 0-d tensor, or 1 when either norm is 0.

    A zero norm means the ratio says nothing about the layer's scale (a zero-initialised matrix,
    a step with no gradient), so the update is left as it is rather than zeroed or made infinite.
    The ratio stays on the device: no host synchronisation per parameter.
    """
    param_norm = torch.linalg.vector_norm(param)
    update_norm = torch.linalg.vector_norm(update)
    one = torch.ones_like(param_norm)
    # torch.where evaluates both branches: the division may give inf or nan where a norm is 0,
    # but that branch is then discarded.
    ratio = trust_coefficient * param_norm / update_norm
    return torch.where((param_norm > 0) & (update_norm > 0), ratio, one)


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling with momentum, per step, ``buf`` starting at zero::

        if p has more than one dimension (conv and linear weights):
            u = g + weight_decay * p
            u <- u * trust_coefficient * ||p|| / ||u||      (1 instead if either norm is 0)
        else (biases, BatchNorm and LayerNorm weights and biases):
            u = g                                           (no decay, no rescaling)
        buf <- momentum * buf + u
        p <- p - lr * buf

    Order matters and follows MoCo v3: the decay is added first and the ratio is taken on the
    decayed update. ``lr`` is outside the buffer (as in ``torch.optim.SGD``, unlike
    :class:`moco.optim.Momentum`), so a schedule that changes ``lr`` scales the whole step at
    once. One-dimensional tensors are told apart by shape, so every parameter can go in one
    group, as MoCo v3 does.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        check_non_negative("learning rate (lr)", lr)
        check_unit_interval("momentum", momentum)
        check_non_negative("weight_decay", weight_decay)
        check_positive("trust_coefficient", trust_coefficient)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    def _update(self, group: dict, p: Tensor) -> Tensor:
        """The step direction ``u`` of one parameter, before momentum."""
        if p.grad.is_sparse:
            raise RuntimeError(
                "LARS does not support sparse gradients; "
                "use dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        if p.ndim <= 1:
            return p.grad
        update = p.grad.add(p, alpha=group["weight_decay"])
        return update.mul_(trust_ratio(p, update, group["trust_coefficient"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient; returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = self._update(group, p)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
