"""What a run reports: the rounds of a variant merged into one result, the throughput ratios,
the table printed per case, and the machine the numbers come from."""

from __future__ import annotations

import math
import os
import platform
import statistics

import torch

from moco.tools.benchmark.settings import Settings, is_loop


def merge_rounds(results: list[dict], settings: Settings) -> dict:
    """One result from several rounds: the median over all timed steps, the largest peak."""
    if "ms" in results[0]:  # levers: the median of each candidate's per-round medians
        ms = {n: statistics.median(r["ms"][n] for r in results) for n in results[0]["ms"]}
        return {**results[0], "ms": ms}
    steps = [t for r in results for t in r["step_s"]]
    median = statistics.median(steps)
    merged = dict(results[0])
    merged.update(
        images_per_s=settings.batch / median,
        median_step_s=median,
        best_step_s=min(steps),
        step_s=steps,
        cpu_user_s=[t for r in results for t in r["cpu_user_s"]],
        cpu_sys_s=[t for r in results for t in r["cpu_sys_s"]],
        round_median_step_s=[r["median_step_s"] for r in results],
        warmup_step_s=[t for r in results for t in r["warmup_step_s"]],
        peak_memory_mb=max(r["peak_memory_mb"] for r in results),
        wall_s=sum(r["wall_s"] for r in results),
    )
    return merged


def ratios(results: dict) -> dict:
    """Throughput ratios: moco/floor, moco/official and loop/floor (per loop variant)."""

    def ips(name: str) -> float | None:
        r = results.get(name)
        return r["images_per_s"] if r and "images_per_s" in r else None

    out = {}
    pairs = [("moco", "floor"), ("moco", "official")]
    pairs += [(name, "floor") for name in results if is_loop(name)]
    pairs += [(name, "moco") for name in ("moco_noclone", "moco_compiled") if name in results]
    pairs += [("floor", "floor_nchw"), ("floor", "floor_plain_convs")]
    for a, b in pairs:
        if ips(a) and ips(b):
            out[f"{a}/{b}"] = ips(a) / ips(b)
    return out


def _median_cpu(result: dict, *kinds: str) -> float:
    """Median over the timed steps of their CPU seconds of ``kinds`` (user, sys) summed."""
    per_step = zip(*(result.get(f"cpu_{k}_s", [math.nan]) for k in kinds), strict=True)
    return statistics.median(sum(parts) for parts in per_step)


def format_table(settings: Settings, results: dict, ratio: dict, rounds: int = 1) -> str:
    """The printed table of one case: a row per timed variant, the ratios, the levers."""
    lines = [
        f"{settings.label()}; median over {rounds} round(s) x {settings.steps} steps, each after "
        f"{settings.warmup} warm-up steps",
        f"{'variant':<16}{'img/s':>9}{'s/step':>9}{'best s':>9}{'cpu s':>8}{'sys s':>8}"
        f"{'mem MB':>10}  notes",
    ]
    for name, r in results.items():
        if "images_per_s" not in r:
            continue
        notes = [r["precision"]]
        if "num_workers" in r:
            notes.append(f"{r['num_workers']} workers")
        if name in ("official",):
            notes[-1:] = ["fp32 NCHW"]
        if name == "moco_compiled":
            notes.append(f"first step {r['warmup_step_s'][0]:.0f} s (compile)")
        lines.append(
            f"{name:<16}{r['images_per_s']:>9.1f}{r['median_step_s']:>9.3f}"
            f"{r.get('best_step_s', min(r['step_s'])):>9.3f}"
            f"{_median_cpu(r, 'user', 'sys'):>8.2f}{_median_cpu(r, 'sys'):>8.2f}"
            f"{r['peak_memory_mb']:>10.0f}  {', '.join(notes)}"
        )
    lines.append("ratios (throughput): " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    lines.append("cpu s / sys s: CPU seconds of all threads per step, user+system / system only")
    methods = {r["memory_method"] for r in results.values() if "memory_method" in r}
    if methods:
        lines.append("peak memory: " + "; ".join(sorted(methods)))
    if "levers" in results:
        lev = results["levers"]
        lines.append(
            f"levers (ms per call, median; queue {lev['queue_mb']:.0f} MB, "
            f"logits {lev['logits_mb']:.0f} MB, {lev['parameter_tensors']} parameter tensors):"
        )
        lines += [f"  {name:<50}{ms:>9.2f}" for name, ms in lev["ms"].items()]
    return "\n".join(lines)


def machine_info() -> dict:
    """Versions, CPU and load of this machine: what the numbers of a run depend on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "default_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
