"""The CPU benchmark runs for every operator, checks correctness in the same run and writes CSV."""

from __future__ import annotations

import ast
import csv
import subprocess
import sys

import pytest
import torch

from roialign import _bench


@pytest.mark.parametrize("op, ours", [("roi_align", "ours-numba"), ("rotated", "ours-numba rotated"),
                                      ("max", "ours-numba max"), ("prroi", "ours-numba prroi_pool")])
def test_bench_cpu_runs_each_operator(op, ours, tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    _bench.main(["--op", op, "--workloads", "adaptive", "--repeats", "1", "--threads", "1", "--csv", str(out),
                 "--malloc", "default"])  # the steady malloc would stay set for the rest of the test process
    rows = list(csv.DictReader(out.open()))
    timed = {row["provider"]: row for row in rows if row["fwd_ms"]}
    assert ours in timed and float(timed[ours]["fwd_ms"]) > 0 and float(timed[ours]["fwd_bwd_ms"]) > 0
    checks = [row for row in rows if not row["fwd_ms"]]
    assert checks or op == "roi_align"
    for row in checks:  # numba against the reference kernels, or the zero-angle rotated against torchvision
        diffs = ast.literal_eval(row["max_abs_diff"])
        assert max(diffs if isinstance(diffs, (list, tuple)) else [diffs]) < 1e-4, row
    assert "x tv" in capsys.readouterr().out


def test_ratios_are_paired_round_by_round():
    # Rounds 2 and 3 are bursts of host noise that slow both providers 4x, and round 5 slows ours
    # alone: paired, the bursts cancel out (ratio 2); the ratio of the medians would be 2.4 / 4.
    peer = dict(fwd_ms=2.4, fwd_runs=[2.0, 8.0, 8.0, 2.4, 2.4], fwd_bwd_ms=None, fwd_bwd_runs=None)
    ours = dict(fwd_ms=4.0, fwd_runs=[1.0, 4.0, 4.0, 1.2, 6.0], fwd_bwd_ms=3.0, fwd_bwd_runs=[3.0] * 5)
    assert _bench.paired_ratio(peer, ours, "fwd_ms") == 2.0
    assert _bench.paired_ratio(ours, peer, "fwd_ms") == 0.5
    assert _bench.paired_ratio(peer, ours, "fwd_bwd_ms") is None  # the peer has no backward
    # Rows without their rounds (or with a different count) fall back to the ratio of medians.
    assert _bench.paired_ratio(dict(peer, fwd_runs=None), ours, "fwd_ms") == 0.6
    assert _bench.paired_ratio(dict(peer, fwd_runs=[2.0, 8.0]), ours, "fwd_ms") == 0.6
    # Each row keeps its rounds, in ms, beside the median.
    row = _bench._times([0.001, 0.003, 0.002], None)
    assert row == dict(fwd_ms=2.0, fwd_bwd_ms=None, fwd_runs=[1.0, 3.0, 2.0], fwd_bwd_runs=None)


def test_a_workloads_dtypes_share_one_round_robin(tmp_path, capsys, monkeypatch):
    # Every dtype's rows come from the same rounds, so a half type's time over float32's is paired.
    out = tmp_path / "cpu.csv"
    calls = []
    timed = _bench._time_once
    monkeypatch.setattr(_bench, "_time_once", lambda fn, x, rois, bwd: calls.append(x.dtype) or timed(fn, x, rois, bwd))
    _bench.main(["--workloads", "adaptive", "--repeats", "2", "--threads", "1", "--dtypes", "float32,bfloat16",
                 "--providers", "ours-numba", "--csv", str(out), "--malloc", "default"])
    rows = {row["dtype"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"float32", "bfloat16"}
    for row in rows.values():
        assert len(ast.literal_eval(row["fwd_runs"])) == 2 and len(ast.literal_eval(row["fwd_bwd_runs"])) == 2
    printed = capsys.readouterr().out
    assert "/ f32 fwd" in printed and "paired by round" in printed
    # a warm-up round and two timed ones, each: float32 forward, forward+backward, then bfloat16's
    assert calls == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_bench_fixes_glibc_malloc_thresholds():
    """--malloc steady (the default) fixes glibc's mmap threshold and turns trimming off: in a
    fresh process, a freed 48 MiB block then stays in the heap (its pages mapped), where glibc's
    own rule would give it back to the OS when freed."""
    code = """
import ctypes, os, sys
from roialign._bench import _steady_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
steady = sys.argv[1] == 'steady'
if steady:
    print(_steady_malloc())
blocks = [libc.malloc(1 << 20) for _ in range(48)]  # 1 MiB each: from the heap once the threshold is 32 MiB
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
before = rss()
for b in reversed(blocks):
    libc.free(b)
print(round((before - rss()) / (1 << 20)))
"""
    steady = subprocess.run([sys.executable, "-c", code, "steady"], capture_output=True, text=True, check=True)
    default = subprocess.run([sys.executable, "-c", code, "default"], capture_output=True, text=True, check=True)
    said, kept_back = steady.stdout.split("\n")[:2]
    assert said == "glibc malloc: mmap threshold 32 MiB, no trimming"
    assert int(kept_back) < 8  # freed, but not given back to the OS
    assert int(default.stdout.split("\n")[0]) > 40  # glibc's defaults: 1 MiB blocks are mmapped, freed at once
