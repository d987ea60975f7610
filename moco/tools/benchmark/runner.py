"""A whole benchmark run: every variant of every case, in rounds, each measurement in its own
process (or in this one), then a table per case."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from moco.tools.benchmark.isolated import measure_isolated
from moco.tools.benchmark.measure import measure, measure_interleaved
from moco.tools.benchmark.report import format_table, machine_info, merge_rounds, ratios
from moco.tools.benchmark.settings import Settings, compose, loop_workers, validate_variant
from moco.tools.benchmark.steps import STEP_MAKERS


def run(
    cases: list[Settings],
    variants: list[str],
    isolate: bool = True,
    rounds: int = 1,
    interleave: bool = False,
    report: Callable[[str], None] = print,
) -> dict:
    """Every variant of every case, all of them ``rounds`` times in turn (so that load from
    other jobs spreads over all alike); returns the JSON-ready results with the ratios.

    ``interleave``: the step variants (floor, moco, official, ...) of a case run in one process,
    a step of each in turn (:func:`measure_interleaved`); the others as usual.
    """
    for v in variants:
        validate_variant(v)
    for settings in cases:  # a user mistake ends here, before any measurement
        for variant in variants:
            compose(settings, loop_workers(variant))
    group = [v for v in variants if v in STEP_MAKERS] if interleave else []
    jobs: list[str | list[str]] = ([group] if group else []) + [
        v for v in variants if v not in group
    ]
    out = {"machine": machine_info(), "isolated": isolate, "rounds": rounds, "cases": []}
    out["interleaved"] = group
    per_round: list[dict[str, list[dict]]] = [{v: [] for v in variants} for _ in cases]
    for r in range(rounds):  # cases and variants in turn, so that they share the load alike
        for settings, measured in zip(cases, per_round, strict=True):
            for job in jobs:
                name = " + ".join(job) if isinstance(job, list) else job
                report(f"  round {r + 1}/{rounds}: {name} ({settings.label()}) ...")
                start = time.perf_counter()
                if isolate:
                    result = measure_isolated(job, settings)
                elif isinstance(job, list):
                    result = measure_interleaved(job, settings)
                else:
                    result = measure(job, settings)
                wall = time.perf_counter() - start
                for v, res in result.items() if isinstance(job, list) else [(job, result)]:
                    measured[v].append({**res, "wall_s": wall})
    for settings, measured in zip(cases, per_round, strict=True):
        results = {v: merge_rounds(measured[v], settings) for v in variants}
        case = {"settings": dataclasses.asdict(settings), "results": results}
        case["ratios"] = ratios(results)
        out["cases"].append(case)
        report(format_table(settings, results, case["ratios"], rounds))
    return out
