"""The CPU benchmark runs for every operator, checks correctness in the same run and writes CSV."""

from __future__ import annotations

import ast
import csv

import pytest

from roialign import _bench


@pytest.mark.parametrize("op, ours", [("roi_align", "ours-numba"), ("rotated", "ours-numba rotated"),
                                      ("max", "ours-numba max"), ("prroi", "ours-numba prroi_pool")])
def test_bench_cpu_runs_each_operator(op, ours, tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    _bench.main(["--op", op, "--workloads", "adaptive", "--repeats", "1", "--threads", "1", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    timed = {row["provider"]: row for row in rows if row["fwd_ms"]}
    assert ours in timed and float(timed[ours]["fwd_ms"]) > 0 and float(timed[ours]["fwd_bwd_ms"]) > 0
    checks = [row for row in rows if not row["fwd_ms"]]
    assert checks or op == "roi_align"
    for row in checks:  # numba against the reference kernels, or the zero-angle rotated against torchvision
        diffs = ast.literal_eval(row["max_abs_diff"])
        assert max(diffs if isinstance(diffs, (list, tuple)) else [diffs]) < 1e-4, row
    assert "x tv" in capsys.readouterr().out
