"""The model benchmark runs in its --smoke mode (tiny image, one pair) and writes its CSV and PNG.

Speed is not asserted; correctness is (the benchmark compares roialign with torchvision in the same run).
"""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

import pytest

from roialign._bench_models import _union_us, is_roi_align_event

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_models_smoke_writes_csv_and_png(tmp_path):
    out_csv, out_png = tmp_path / "models.csv", tmp_path / "models.png"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--smoke", "--csv", str(out_csv),
               "--png", str(out_png)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| model | mode |" in result.stdout

    rows = list(csv.DictReader(out_csv.open()))
    cases = {(r["model"], r["mode"]) for r in rows}
    assert cases == {(m, mode) for m in ("maskrcnn", "mobilenet") for mode in ("eval", "train")}
    for case in cases:
        assert sorted(r["provider"] for r in rows if (r["model"], r["mode"]) == case) == ["roialign", "torchvision"]
    for r in rows:
        assert float(r["step_ms"]) > 0 and float(r["roi_align_ms"]) > 0 and int(r["box_head_rois"]) > 0
        assert float(r["step_min_ms"]) <= float(r["step_ms"]) <= float(r["step_max_ms"])
        if r["mode"] == "train":
            assert float(r["roi_align_bwd_ms"]) > 0
        if r["provider"] != "roialign":
            continue
        assert float(r["box_features_max_rel_diff"]) < 1e-4
        if r["mode"] == "eval":
            assert float(r["scores_max_diff"]) < 1e-4
        else:
            assert float(r["loss_max_diff"]) < 1e-4 and float(r["grads_max_rel_diff"]) < 1e-3
    assert out_png.stat().st_size > 0 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roi_align_time_counts_nested_events_once():
    # The op [0, 10] holding its autograd wrapper [1, 9]; a backward node [20, 30] holding its op [21, 29].
    assert _union_us([(0, 10), (1, 9), (20, 30), (21, 29)]) == 20
    assert _union_us([(0, 10), (5, 15)]) == 15
    assert _union_us([]) == 0
    for name in ("torchvision::roi_align", "torchvision::_roi_align_backward", "roialign::roi_align",
                 "roialign::roi_align_backward", "GeneratedBackwardFor_roialign_roi_align_defaultBackward"):
        assert is_roi_align_event(name)
    for name in ("aten::convolution", "autograd::engine::evaluate_function: "
                 "GeneratedBackwardFor_torchvision_roi_align_defaultBackward", "bench::forward"):
        assert not is_roi_align_event(name)
