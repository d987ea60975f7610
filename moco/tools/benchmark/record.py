"""The record of one measurement: the timed steps after warm-up, their median and CPU time,
peak memory with the way it was measured, and the settings that shape the numbers."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch

from moco.tools.benchmark.memory import PeakMemory
from moco.tools.benchmark.settings import Settings
from moco.tools.benchmark.timing import Clock
from moco.tools.benchmark.workload import precision

if TYPE_CHECKING:
    from omegaconf import DictConfig


def result(
    cfg: DictConfig, settings: Settings, clocks: list[Clock], memory: PeakMemory, **extra: object
) -> dict:
    """JSON-ready numbers of ``clocks`` (``settings.warmup`` warm-up steps, then timed ones)."""
    measured = clocks[settings.warmup :]
    median = statistics.median(c.wall for c in measured)
    return {
        "images_per_s": cfg.data.batch_size / median,
        "median_step_s": median,
        "step_s": [c.wall for c in measured],
        "cpu_user_s": [c.user for c in measured],
        "cpu_sys_s": [c.sys for c in measured],
        "warmup_step_s": [c.wall for c in clocks[: settings.warmup]],
        "peak_memory_mb": memory.peak_mb,
        "memory_at_start_mb": memory.start_mb,
        "memory_method": memory.method,
        "precision": precision(cfg),
        "threads": torch.get_num_threads(),
        **extra,
    }
