"""The child process of :func:`moco.tools.benchmark.isolated.measure_isolated`; run the
benchmark with ``scripts/benchmark.py``."""

import sys

from moco.tools.benchmark.isolated import child

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("internal entry point of scripts/benchmark.py: run that script instead")
    child(sys.argv[1])
