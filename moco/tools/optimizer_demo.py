"""Toy functions of the source documents and a helper that records an optimizer's path.

Used by ``scripts/optimizer_demo.py`` (the figures) and by the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def valley(p: Tensor) -> Tensor:
    """f(x, y) = x^2 / 20 + y^2: a long, narrow valley along x (minimum at the origin)."""
    return p[0] ** 2 / 20.0 + p[1] ** 2


def bowl_1d(p: Tensor) -> Tensor:
    """f(x) = 4 x^2 (minimum at 0)."""
    return 4.0 * p[0] ** 2


def run_path(
    optimizer_cls: type[torch.optim.Optimizer],
    fn: Callable[[Tensor], Tensor],
    start: Sequence[float],
    steps: int,
    **hyper: float,
) -> Tensor:
    """Minimise ``fn`` from ``start`` for ``steps`` steps; return the visited points.

    The parameter is one float64 tensor; the result has shape ``(steps + 1, len(start))``,
    row 0 being ``start``. ``hyper`` goes to ``optimizer_cls`` (e.g. ``lr=0.1``).
    """
    param = torch.tensor(list(start), dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_cls([param], **hyper)
    path = [param.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        fn(param).backward()
        optimizer.step()
        path.append(param.detach().clone())
    return torch.stack(path)


def steps_to_reach(fn: Callable[[Tensor], Tensor], path: Tensor, threshold: float) -> int | None:
    """First step index ``k`` with ``fn(path[k]) < threshold``, or ``None`` if never."""
    for k, point in enumerate(path):
        if float(fn(point)) < threshold:
            return k
    return None
