"""configure_malloc: what malloc=no-mmap changes in the process, measured by page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moco.errors import ConfigError
from moco.run.hardware import configure_malloc

# Allocates and frees a 64 MB tensor eight times; prints the minor page faults of the last four,
# the steady state of a training loop (measured: the first two, now and then a third, still fault
# in both modes while the heap settles). glibc by default mmaps such a block afresh and faults in
# every page again, 16384 per allocation; with no-mmap the freed heap memory is reused: 0.
PROBE = """
import resource, sys, torch
from moco.run.hardware import configure_malloc
print(configure_malloc(sys.argv[1]))
def touch():
    x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, every page written
    del x
for _ in range(4):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_no_mmap_reuses_freed_memory_instead_of_faulting_it_in_again():
    applied, faults_default = page_faults("default")
    assert applied == "False"
    applied, faults_no_mmap = page_faults("no-mmap")
    assert applied == "True"
    assert faults_default > 4 * 10_000  # 64 MB / 4 kB pages = 16384 faulted in, each time
    assert faults_no_mmap < faults_default / 4  # measured: 0


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="malloc=fast is unknown"):
        configure_malloc("fast")
