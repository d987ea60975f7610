"""The ``levers`` variant: micro-timings of the pieces a MoCo step adds to the floor (momentum
update, queue copy, loss), ours next to the official way, to see which piece is worth changing."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moco.tools.benchmark.official import info_nce_divided_logits
from moco.tools.benchmark.settings import Settings
from moco.tools.benchmark.timing import median_ms
from moco.tools.benchmark.workload import build_moco

if TYPE_CHECKING:
    from omegaconf import DictConfig


def measure_levers(cfg: DictConfig, settings: Settings, repeats: int = 15) -> dict:
    """Milliseconds per call of the pieces a MoCo step adds to the floor, and alternatives."""
    from moco.losses import contrastive_top1, info_nce
    from moco.momentum import momentum_update

    device, m = settings.device, cfg.model.momentum
    model = build_moco(cfg, device)
    q_params = list(model.encoder_q.parameters())
    k_params = list(model.encoder_k.parameters())

    # zip without strict=, as the official code: the check would be a cost it does not pay.
    @torch.no_grad()
    def loop_out_of_place() -> None:  # the official implementation
        for p_q, p_k in zip(q_params, k_params):  # noqa: B905
            p_k.data = p_k.data * m + p_q.data * (1.0 - m)

    @torch.no_grad()
    def loop_in_place() -> None:
        for p_q, p_k in zip(q_params, k_params):  # noqa: B905
            p_k.mul_(m).add_(p_q, alpha=1.0 - m)

    n, dim = cfg.data.batch_size, cfg.model.dim
    q = F.normalize(torch.randn(n, dim, device=device), dim=1).requires_grad_()
    k = F.normalize(torch.randn(n, dim, device=device), dim=1)
    keys = model.queue.keys
    temperature = cfg.model.temperature
    logits = info_nce(q, k, keys, temperature)[1].detach()  # N x (1+K)

    def loss_fwd_bwd(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            q.grad = None
            loss, _ = fn(q, k, keys, temperature)
            loss.backward()

        return run

    candidates = {
        "momentum_foreach_lerp (ours)": lambda: momentum_update(
            model.encoder_q, model.encoder_k, m
        ),
        "momentum_python_loop_out_of_place (official)": loop_out_of_place,
        "momentum_python_loop_in_place": loop_in_place,
        "queue_clone (ours and official, per step)": keys.clone,
        "contrastive_top1 on the logits (ours, per step)": lambda: contrastive_top1(logits),
        "info_nce_fwd_bwd (moco.losses)": loss_fwd_bwd(info_nce),
        "info_nce_fwd_bwd, logits divided by T (official)": loss_fwd_bwd(info_nce_divided_logits),
    }
    # Interleaved rounds, so that load from other jobs hits every candidate alike.
    rounds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(3):
        for name, fn in candidates.items():
            rounds[name].append(median_ms(fn, repeats))
    return {
        "ms": {name: statistics.median(v) for name, v in rounds.items()},
        "queue_mb": keys.numel() * keys.element_size() / 2**20,
        "logits_mb": n * (1 + keys.shape[0]) * 4 / 2**20,
        "parameter_tensors": len(q_params),
        "threads": torch.get_num_threads(),
    }
