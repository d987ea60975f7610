"""scripts/benchmark.py on tiny sizes, in-process: structure and sanity of the output, no timing
thresholds (a benchmark, not a timed test)."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from moco.tools.benchmark import MAIN_VARIANTS, OfficialStyleMoCo, Settings, compose, ratios

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
TINY = [
    "--data", "synthetic", "--image-size", "8", "--batch", "8", "--queue-size", "64",
    "--dim", "16", "--bn-splits", "2", "--warmup", "1", "--steps", "2", "--threads", "1",
    "--override", "data.num_train=32", "--override", "data.num_test=8",
]  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_script(*args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_every_variant_runs_in_process_and_reports_positive_numbers(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    variants = ",".join([*MAIN_VARIANTS, "loop_w0", "moco_noclone", "levers"])
    run_script(
        *TINY, "--variants", variants, "--in-process", "--json", str(out), monkeypatch=monkeypatch
    )

    printed = capsys.readouterr().out
    for heading in (
        "img/s",
        "cpu s",
        "mem MB",
        "moco/floor",
        "moco/official",
        "loop/floor",
        "levers",
    ):
        assert heading in printed, heading
    assert f"Results: {out}" in printed

    report = json.loads(out.read_text())
    assert report["machine"]["torch"] == torch.__version__
    (case,) = report["cases"]
    assert case["settings"]["batch"] == 8 and case["settings"]["threads"] == 1
    results = case["results"]
    assert list(results) == [*MAIN_VARIANTS, "loop_w0", "moco_noclone", "levers"]
    for name, r in results.items():
        if name == "levers":
            assert r["ms"] and all(positive_finite(ms) for ms in r["ms"].values()), r
            continue
        for key in ("images_per_s", "median_step_s", "best_step_s", "peak_memory_mb"):
            assert positive_finite(r[key]), (name, key, r[key])
        assert len(r["step_s"]) == 2 and all(positive_finite(t) for t in r["step_s"])
        assert len(r["warmup_step_s"]) == 1
        assert all(t >= 0 for t in r["cpu_user_s"] + r["cpu_sys_s"])  # CPU seconds per step
        assert r["memory_method"] and r["precision"] in ("32", "32-true")
        assert r["images_per_s"] == pytest.approx(8 / r["median_step_s"])
    assert results["loop_w0"]["num_workers"] == 0
    assert results["loop"]["num_workers"] == compose(Settings(data="synthetic")).data.num_workers
    assert set(case["ratios"]) == {
        "moco/floor", "moco/official", "loop/floor", "loop_w0/floor", "moco_noclone/moco",
    }  # fmt: skip
    assert all(positive_finite(v) for v in case["ratios"].values())


def test_interleaved_step_variants_report_their_own_numbers(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    args = ["--variants", "floor,moco,official", "--interleave", "--in-process", "--json", str(out)]
    run_script(*TINY, *args, monkeypatch=monkeypatch)
    report = json.loads(out.read_text())
    assert report["interleaved"] == ["floor", "moco", "official"]
    results = report["cases"][0]["results"]
    assert list(results) == ["floor", "moco", "official"]
    for r in results.values():
        assert len(r["step_s"]) == 2 and positive_finite(r["images_per_s"])
        assert r["memory_method"].startswith("interleaved")
        assert math.isnan(r["peak_memory_mb"]) or r["peak_memory_mb"] >= 0


def test_a_bad_setting_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    # 6 keys per step do not fit a queue of 4: the project's own config check says so.
    args = [*TINY, "--queue-size", "4", "--batch", "6", "--bn-splits", "1", "--in-process"]
    with pytest.raises(SystemExit) as exit_info:
        run_script(*args, "--json", str(tmp_path / "x.json"), monkeypatch=monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.queue_size=4 is smaller") and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_a_list_of_stems_makes_one_case_per_stem(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    args = ["--stem", "small,small_pool", "--variants", "floor", "--in-process"]
    run_script(*TINY, *args, "--json", str(out), monkeypatch=monkeypatch)
    cases = json.loads(out.read_text())["cases"]
    assert [case["settings"]["stem"] for case in cases] == ["small", "small_pool"]
    assert all(positive_finite(case["results"]["floor"]["images_per_s"]) for case in cases)


def test_an_unknown_stem_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(*TINY, "--stem", "small,tiny", "--json", str(tmp_path / "x.json"),
                   monkeypatch=monkeypatch)  # fmt: skip
    assert exit_info.value.code == 2
    assert "--stem" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_unknown_variant_is_refused(monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_script("--variants", "floor,warp_drive", monkeypatch=monkeypatch)
    assert exit_info.value.code == 2


def test_official_style_queue_wraps_around_without_k_divisible_by_batch():
    cfg = compose(
        Settings(data="synthetic", image_size=8, batch=8, queue_size=10, dim=4, bn_splits=2)
    )
    moco = OfficialStyleMoCo(cfg, "cpu")
    first, second = torch.full((6, 4), 1.0), torch.full((6, 4), 2.0)
    moco._dequeue_and_enqueue(first)
    moco._dequeue_and_enqueue(second)  # columns 6..9, then 0..1
    assert moco.ptr == 2
    assert torch.equal(moco.queue[0, :2], torch.full((2,), 2.0))
    assert torch.equal(moco.queue[0, 2:6], torch.full((4,), 1.0))
    assert torch.equal(moco.queue[0, 6:], torch.full((4,), 2.0))


def test_ratios_only_pair_measured_variants():
    results = {"floor": {"images_per_s": 10.0}, "moco": {"images_per_s": 9.0}}
    assert ratios(results) == {"moco/floor": pytest.approx(0.9)}
