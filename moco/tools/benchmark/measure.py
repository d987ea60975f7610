"""One measurement in this process: a variant alone (:func:`measure`), or the step variants a
step of each in turn (:func:`measure_interleaved`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from moco.tools.benchmark.levers import measure_levers
from moco.tools.benchmark.loop import measure_loop
from moco.tools.benchmark.memory import PeakMemory, use_malloc
from moco.tools.benchmark.record import result
from moco.tools.benchmark.settings import (
    Settings,
    compose,
    is_loop,
    loop_workers,
    validate_variant,
)
from moco.tools.benchmark.steps import STEP_MAKERS, StepMaker
from moco.tools.benchmark.timing import Clock, threads, time_steps

if TYPE_CHECKING:
    from omegaconf import DictConfig


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No Lightning banners or 'self.log outside the Trainer' warnings in the benchmark output."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def measure_step(cfg: DictConfig, settings: Settings, make_step: StepMaker) -> dict:
    """A step variant alone: its setup, warm-up and timed steps under one peak-memory window."""
    device = settings.device
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        step = make_step(cfg, device)
        setup_s = time.perf_counter() - start
        times = time_steps(step, settings.warmup, settings.steps, device)
    return result(cfg, settings, times, memory, setup_s=setup_s)


def measure_interleaved(variants: list[str], settings: Settings) -> dict[str, dict]:
    """The step variants in one process, one step of each in turn (the order rotating).

    On a machine shared with other jobs the load changes within minutes, so variants measured
    one after the other can differ a lot for no reason of their own; taken in turn, step by
    step, they share the load alike. Memory is then the largest rise of the process's RSS
    during one step over its RSS before the step: what the step itself allocates (peak RSS
    would include the other variants' models).
    """
    for v in variants:
        if v not in STEP_MAKERS:
            raise ValueError(f"{v} cannot be interleaved: only {', '.join(STEP_MAKERS)}")
    cfg = compose(settings)
    use_malloc(settings.malloc)
    device = settings.device
    with threads(settings.threads), quiet():
        steps = {v: STEP_MAKERS[v](cfg, device) for v in variants}
        times: dict[str, list[Clock]] = {v: [] for v in variants}
        rises: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(settings.warmup + settings.steps):
            shift = i % len(variants)
            for v in variants[shift:] + variants[:shift]:
                with PeakMemory(device) as memory, Clock(device) as clock:
                    steps[v](i)
                times[v].append(clock)
                rises[v].append(memory.peak_mb - memory.start_mb)
        method = memory.method
        lifetime = "ru_maxrss" in method  # no reset possible: a rise says nothing
        results = {}
        for v in variants:
            results[v] = result(cfg, settings, times[v], memory)
            results[v].update(
                peak_memory_mb=math.nan if lifetime else max(rises[v]),
                memory_at_start_mb=math.nan,
                memory_method=f"interleaved: largest rise during one step of {method}",
                interleaved_with=variants,
            )
    return results


def measure(variant: str, settings: Settings) -> dict:
    """Run one measurement in this process."""
    validate_variant(variant)
    cfg = compose(settings, num_workers=loop_workers(variant))
    use_malloc(settings.malloc)
    with threads(settings.threads), quiet():
        if is_loop(variant):
            return measure_loop(cfg, settings)
        if variant == "levers":
            return measure_levers(cfg, settings)
        return measure_step(cfg, settings, STEP_MAKERS[variant])
