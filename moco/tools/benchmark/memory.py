"""Peak memory of a measurement, and the allocator setting it runs under.

Peak memory is the peak resident set size (RSS) on CPU and ``torch.cuda.max_memory_allocated``
on GPU; every number carries the way it was measured (``memory_method``), as the three ways
below do not mean quite the same.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import torch

from moco.run.hardware import configure_malloc


def use_malloc(mode: str) -> None:
    """Set glibc's allocator as pretraining does (``no-mmap``), or leave it (``default``)."""
    if not configure_malloc(mode) and mode != "default":
        raise RuntimeError(f"malloc={mode} needs glibc's mallopt, which this system lacks")


class PeakMemory:
    """Peak memory of the code inside ``with``: GPU allocations, or the process's peak RSS.

    On CPU the peak RSS of the process is reset to the current RSS at entry where Linux allows
    it (/proc/self/clear_refs), so the peak covers this measurement only (plus whatever earlier
    work left resident); otherwise it is the process's lifetime peak (``ru_maxrss``), which is
    exact in a fresh process per measurement.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = ""
        self.peak_mb = math.nan
        self.start_mb = math.nan

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.start_mb = _proc_status_mb("VmRSS")
            self.method = "peak RSS (VmHWM after /proc/self/clear_refs reset)"
        else:
            self.start_mb = _proc_status_mb("VmRSS")
            self.method = "peak RSS of the process (ru_maxrss)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif "VmHWM" in self.method:
            self.peak_mb = _proc_status_mb("VmHWM")
        else:
            self.peak_mb = process_peak_rss_mb()


def process_peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Lifetime peak RSS of this process (``RUSAGE_CHILDREN``: of its largest finished child)."""
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return math.nan
