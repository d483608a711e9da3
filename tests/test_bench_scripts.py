"""The benchmark scripts run: the CUDA ones in their --smoke mode (CPU tensors, Triton interpreter)."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--max", "--prroi"]])
def test_bench_cuda_smoke_checks_correctness_and_writes_csv(tmp_path, extra):
    out = tmp_path / "cuda.csv"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py"), "--smoke", "--csv", str(out),
                             *extra], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {row["provider"] for row in rows} >= {"ours-triton", "ours-triton channels_last"}
    if extra:
        assert {row["provider"] for row in rows} >= {"ours-triton max", "ours-triton max channels_last",
                                                     "ours-triton prroi_pool", "ours-triton prroi_pool channels_last"}
    for row in rows:
        assert float(row["fwd_ms"]) > 0 and float(row["fwd_bwd_ms"]) > 0
        assert float(row["max_abs_diff_vs_ours"]) < 1e-5 and float(row["max_abs_grad_diff_vs_ours"]) < 1e-5
        assert row["ours_bitwise_deterministic"] == "True"


def test_tune_cuda_smoke_sweeps_checks_and_picks_settings(tmp_path):
    out, best = tmp_path / "tune.csv", tmp_path / "best.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_cuda.py"), "--smoke", "--csv", str(out),
                             "--best", str(best)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"forward", "input gradient", "rotated forward", "rotated input grad"}
    for row in rows:
        assert float(row["ms"]) > 0
        if row["kernel"] in ("forward", "input gradient", "rotated input grad"):  # no order of summation changes
            assert row["bitwise_equal_to_shipped"] == "True", row
    chosen = json.loads(best.read_text())
    assert set(chosen) == {"roi_align", "roi_align_rotated"}
    from roialign.kernels.triton import roi_align as axis
    from roialign.kernels.triton import roi_align_rotated as rotated
    for module, constants in (("roi_align", axis), ("roi_align_rotated", rotated)):
        for name, value in chosen[module].items():
            assert isinstance(getattr(constants, name), int) and value > 0


def test_profile_cuda_smoke_lists_our_kernels_and_torchvisions():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_cuda.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    headers = [line for line in result.stdout.splitlines() if line.startswith("== smoke float32")]
    assert [h.split()[3].rstrip(":") for h in headers] == ["ours", "torchvision"]
    assert "roialign::roi_align" in result.stdout
