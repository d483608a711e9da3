"""The benchmark scripts run: the CUDA one in its --smoke mode (CPU tensors, Triton interpreter)."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_cuda_smoke_checks_correctness_and_writes_csv(tmp_path):
    out = tmp_path / "cuda.csv"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py"), "--smoke", "--csv", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {row["provider"] for row in rows} >= {"ours-triton", "ours-triton channels_last"}
    for row in rows:
        assert float(row["fwd_ms"]) > 0 and float(row["fwd_bwd_ms"]) > 0
        assert float(row["max_abs_diff_vs_ours"]) < 1e-5 and float(row["max_abs_grad_diff_vs_ours"]) < 1e-5
        assert row["ours_bitwise_deterministic"] == "True"
