"""configure_malloc: what malloc=no-mmap changes in the process, seen in its heap mapping."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moco.errors import ConfigError
from moco.run.hardware import configure_malloc

# Allocates a 64 MB tensor, then frees it; prints the size of the process's [heap] mapping (MB)
# before, while it lives and after. glibc by default serves a block that large with a fresh
# mmap, which free() unmaps: the heap does not grow. With no-mmap it comes from the heap, which
# keeps it after free() for the next step's tensors. (Whether the kept pages also spare the
# next step its page faults depends on the machine: on some, re-touching them faulted in none,
# on others in one to four of four allocations; the mapping itself is what the setting decides.)
PROBE = """
import sys, torch
from moco.run.hardware import configure_malloc
print(configure_malloc(sys.argv[1]))
def heap_mb():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            return (high - low) >> 20
    return 0
before = heap_mb()
x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, every page written
during = heap_mb()
del x
print(before, during, heap_mb())
"""


def heap_sizes(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], [int(mb) for mb in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
def test_no_mmap_serves_large_blocks_from_the_heap_and_keeps_them_after_free():
    applied, (before, during, after) = heap_sizes("default")
    assert applied == "False"
    assert during - before < 64  # a fresh mapping of its own, not the heap
    applied, (before, during, after) = heap_sizes("no-mmap")
    assert applied == "True"
    assert during - before >= 64  # the 64 MB came from the heap...
    assert after == during  # ...and stay there after free()


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="malloc=fast is unknown"):
        configure_malloc("fast")
