"""Clocks: wall time and the process's CPU time of a step, and the thread count they run with."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def now(device: str) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA runs asynchronously,
    so without the synchronize a step would be timed by its launch, not its work)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


class Clock:
    """Wall time, and CPU time of all threads of this process (user, system), of a block.

    On a machine shared with other jobs the wall time of a step swings with their load; the
    system time (page faults, zeroing fresh memory) does much less, and shows what the
    allocator costs.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall = self.user = self.sys = 0.0

    def __enter__(self) -> Clock:
        start = now(self.device)
        t = os.times()
        self.wall, self.user, self.sys = start, t.user, t.system
        return self

    def __exit__(self, *exc: object) -> None:
        end = now(self.device)
        t = os.times()
        self.wall, self.user, self.sys = end - self.wall, t.user - self.user, t.system - self.sys


def time_steps(step: Callable[[int], None], warmup: int, steps: int, device: str) -> list[Clock]:
    """Wall and CPU seconds of each of ``warmup + steps`` calls of ``step``."""
    clocks = []
    for i in range(warmup + steps):
        with Clock(device) as clock:
            step(i)
        clocks.append(clock)
    return clocks


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn``, after one untimed call (warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (0: left as they are) inside ``with``."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
