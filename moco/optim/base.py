"""Shared machinery of the six element-wise optimizers in :mod:`moco.optim`.

Each rule subclasses :class:`ElementwiseOptimizer` and only writes ``_update``: the update of
one list of parameters that share a device and a dtype, with their gradients (weight decay
already added), using ``torch._foreach_*`` ops. This base class

* validates the hyper-parameters common to all rules (``lr``, ``weight_decay``),
* runs the closure and returns its loss,
* skips parameters whose ``grad`` is ``None`` and refuses sparse gradients,
* adds ``weight_decay * p`` to the gradient (without touching ``p.grad``),
* creates state tensors lazily, as zeros shaped like the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


def check_non_negative(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value >= 0``."""
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value > 0``."""
    if not value > 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be > 0)")


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")


class ElementwiseOptimizer(Optimizer):
    """Base class: param-group iteration, weight decay, sparse refusal, lazy state."""

    def __init__(self, params: Iterable, defaults: dict) -> None:
        check_non_negative("learning rate (lr)", defaults["lr"])
        check_non_negative("weight_decay", defaults["weight_decay"])
        super().__init__(params, defaults)

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """Apply the rule to ``params`` (same device and dtype) given their gradients."""
        raise NotImplementedError

    def _zero_state(self, params: list[Tensor], key: str) -> list[Tensor]:
        """The state tensor ``key`` of every parameter, created as zeros on first use."""
        tensors = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tensors.append(state[key])
        return tensors

    def _grouped(self, group: dict) -> dict[tuple, tuple[list[Tensor], list[Tensor]]]:
        """Parameters of ``group`` that have a gradient, keyed by (device, dtype)."""
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            params, grads = buckets.setdefault((p.device, p.dtype), ([], []))
            params.append(p)
            grads.append(p.grad)
        return buckets

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one update of every parameter that has a gradient.

        ``closure`` (optional) re-evaluates the model and returns the loss; its value is
        returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params, grads in self._grouped(group).values():
                if group["weight_decay"] != 0:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                self._update(group, params, grads)
        return loss
