"""A measurement in a fresh Python process, so that its peak RSS is its own.

The protocol: the parent runs ``python -m moco.tools.benchmark '<json request>'`` (the variant,
or a list of variants to interleave, and the settings); the child prints one line
``BENCHMARK_RESULT <json>`` with the result, last. Whatever else the child prints is ignored, and
its stderr is shown when no result line comes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from moco.tools.benchmark.measure import measure, measure_interleaved
from moco.tools.benchmark.memory import process_peak_rss_mb
from moco.tools.benchmark.settings import Settings

RESULT_TAG = "BENCHMARK_RESULT "
# The child runs from the checkout this package is in, so that ``-m`` finds this checkout's
# ``moco`` even when another one is installed, as the parent found it.
REPO_ROOT = Path(__file__).resolve().parents[3]


def measure_isolated(variant: str | list[str], settings: Settings) -> dict:
    """Run one measurement (a list: interleaved) in a fresh Python process, so that its peak
    RSS is its own."""
    payload = json.dumps({"variant": variant, "settings": dataclasses.asdict(settings)})
    env = dict(os.environ)
    if settings.threads > 0:  # also the OpenMP pool size, before torch starts it
        env["OMP_NUM_THREADS"] = str(settings.threads)
    proc = subprocess.run(
        [sys.executable, "-m", "moco.tools.benchmark", payload],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"benchmark {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def child(payload: str) -> None:
    """The child's side: measure the request in ``payload`` and print its result line."""
    request = json.loads(payload)
    settings = request["settings"]
    settings["overrides"] = tuple(settings["overrides"])  # JSON has no tuples
    if isinstance(request["variant"], list):
        results = measure_interleaved(request["variant"], Settings(**settings))
        print(RESULT_TAG + json.dumps(results), flush=True)
        return
    result = measure(request["variant"], Settings(**settings))
    result["peak_rss_process_mb"] = process_peak_rss_mb()
    if not request["settings"]["device"].startswith("cuda") and "peak_memory_mb" in result:
        # A fresh process: its lifetime peak is this measurement's peak.
        result["peak_memory_mb"] = result["peak_rss_process_mb"]
        result["memory_method"] = "peak RSS of a fresh process (ru_maxrss)"
    print(RESULT_TAG + json.dumps(result), flush=True)
