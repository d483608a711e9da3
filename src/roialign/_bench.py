"""CPU benchmark: our backends against torchvision and onnxruntime, same data, same threads.

Providers are timed round-robin (one repeat of each in turn; for ``roi_align``, of each provider
in each dtype of a workload) so that drifts in machine load hit all of them alike; each reports
the median, and ratios are medians of the rounds' ratios. Every provider's forward output is compared
with the ``numba`` backend's in the same run, and ``numba`` with the ``reference`` backend.
Run ``python benchmarks/bench_cpu.py --help`` for the full version, ``python -m roialign bench``
for a short one.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import roialign


@dataclass(frozen=True)
class Workload:
    name: str
    n: int
    c: int
    h: int
    w: int
    boxes: int
    scale: float
    out: int
    sampling_ratio: int

    def data(self, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and boxes placed uniformly, sides between 4 pixels and 40% of the image."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.n, self.c, self.h, self.w, generator=gen, dtype=dtype)
        img_h, img_w = self.h / self.scale, self.w / self.scale
        sides = torch.rand(self.boxes, 2, generator=gen, dtype=torch.float64)
        bw = 4 + sides[:, 0] * (0.4 * img_w - 4)
        bh = 4 + sides[:, 1] * (0.4 * img_h - 4)
        x1 = torch.rand(self.boxes, generator=gen, dtype=torch.float64) * (img_w - bw)
        y1 = torch.rand(self.boxes, generator=gen, dtype=torch.float64) * (img_h - bh)
        b = torch.randint(0, self.n, (self.boxes,), generator=gen).double()
        rois = torch.stack((b, x1, y1, x1 + bw, y1 + bh), dim=1).to(dtype)
        return x, rois


WORKLOADS = {
    "boxhead-P2": Workload("boxhead-P2", 1, 256, 200, 272, 1000, 1 / 4, 7, 2),
    "train-P3": Workload("train-P3", 2, 256, 100, 136, 1024, 1 / 8, 7, 2),
    "mask-14": Workload("mask-14", 1, 256, 200, 272, 100, 1 / 4, 14, 2),
    "adaptive": Workload("adaptive", 1, 64, 128, 128, 200, 1.0, 7, 0),
}

# The CUDA scripts' extra workload (8 images, 512 boxes each) and their tiny --smoke problem.
TRAIN_BATCH = Workload("train-batch", 8, 256, 200, 272, 8 * 512, 1 / 4, 7, 2)
CUDA_SMOKE = Workload("smoke", 2, 16, 24, 20, 12, 1 / 4, 3, 2)


def sweep_workloads() -> list[Workload]:
    sweep = [Workload(f"boxes-{k}", 1, 256, 100, 136, k, 1 / 8, 7, 2) for k in (10, 100, 1000, 10000)]
    sweep += [Workload(f"channels-{c}", 1, c, 100, 136, 512, 1 / 8, 7, 2) for c in (16, 64, 1024)]
    return sweep


Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ours(backend: str, workload: Workload, aligned: bool) -> Fn:
    def run(x, rois):
        with roialign.use_backend(backend):
            return roialign.roi_align(x, rois, workload.out, workload.scale, workload.sampling_ratio, aligned)
    return run


def _providers(workload: Workload, aligned: bool, threads: int, quick: bool, dtype: torch.dtype,
               only: set[str] | None = None) -> dict[str, tuple[Fn, bool]]:
    """name -> (function, has backward), restricted to ``only`` when given."""
    providers: dict[str, tuple[Fn, bool]] = {}
    try:
        import torchvision.ops

        def tv(x, rois):
            return torchvision.ops.roi_align(x, rois, workload.out, workload.scale, workload.sampling_ratio, aligned)
        tv(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 0.0, 0, 2, 2]]))
        providers["torchvision"] = (tv, True)
    except Exception:  # not installed, or not importable beside this torch
        pass
    ipex = _ipex_roi_align()
    if ipex is not None:
        # Importing IPEX replaces torchvision's CPU roi_align with its own: no torchvision row here.
        providers.pop("torchvision", None)
        for name in ("ipex", "ipex channels_last"):  # IPEX takes half features with float32 boxes only
            providers[name] = (lambda x, rois, f=ipex: f(x, rois if rois.dtype == torch.float64 else rois.float(),
                                                         workload.out, workload.scale, workload.sampling_ratio,
                                                         aligned), True)
    try:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError("onnxruntime's CPU RoiAlign takes float32 and float64 only")
        from ._peers import OnnxRoiAlign
        peer = OnnxRoiAlign((workload.out, workload.out), workload.scale, workload.sampling_ratio, aligned,
                            dtype=np.float64 if dtype == torch.float64 else np.float32, threads=threads)
        providers["onnxruntime"] = (lambda x, rois: torch.from_numpy(peer(x.numpy(), rois.numpy())), False)
    except Exception:
        pass
    if not quick:
        providers["ours-reference"] = (_ours("reference", workload, aligned), True)
    providers["ours-numba"] = (_ours("numba", workload, aligned), True)
    providers["ours-numba channels_last"] = (_ours("numba", workload, aligned), True)
    return {k: v for k, v in providers.items() if only is None or k in only}


def _ipex_roi_align() -> Callable | None:
    """Intel Extension for PyTorch's roi_align, when it imports (its own venv: see README).

    Importing IPEX 2.8 starts TorchInductor's compile-worker process, which took about 1 s of CPU
    in the 5 s after the import (Intel Xeon host, 2 cores): our channels_last mask-14 float32
    forward took 7.5-16.9 ms then, against 3.0-3.3 ms 15 s later. Nothing here compiles with
    Inductor, so the worker is not started (``TORCHINDUCTOR_COMPILE_THREADS=1`` unless set)."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        import intel_extension_for_pytorch as ipex
        return ipex.nn.functional._roi_align_helper.roi_align
    except Exception:  # not installed, or not built for this torch
        return None


def _copy_orders(report: dict) -> str:
    """One line on the layout copies' orders that ``tune_layout_copies`` chose, with their times."""
    parts = []
    for kind in ("other", "aliased"):
        label = " x ".join(map(str, report[kind]["shape"]))
        label += " map (4 KiB-aliased planes)" if kind == "aliased" else " map"
        best = []
        for size in (2, 4, 8):
            times = report[kind][size]
            block = min(times, key=times.__getitem__)
            best.append(f"{size}-byte {block} ({times[block] * 1e3:.2f} ms; 0: {times[0] * 1e3:.2f})")
        back = report[kind]["to_planar"]
        parts.append(f"{label}: to channels-last, channels per pass {', '.join(best)}; back "
                     f"{'tiled' if back[True] < back[False] else 'streaming'} (tiled {back[True] * 1e3:.2f} ms, "
                     f"streaming {back[False] * 1e3:.2f} ms)")
    return "layout copies: " + "; ".join(parts)


def _time_once(fn: Fn, x: torch.Tensor, rois: torch.Tensor, backward: bool) -> float:
    """Seconds of one forward, or of one forward and its backward. The output gradient (ones of
    the output's shape and layout) is the caller's tensor: it is made between the two timed parts,
    outside the time. (Until 2026-11-30 it was made inside: a fresh output-sized tensor whose page
    faults took 0.7-8.5 ms for mask-14's 20 MB float32 output and 8-55 ms for its float64 one,
    depending on the allocator's state, in every provider's forward+backward.)"""
    if backward:
        x = x.detach().requires_grad_()
    start = time.perf_counter()
    out = fn(x, rois)
    elapsed = time.perf_counter() - start
    if backward:
        grad = torch.ones_like(out)
        start = time.perf_counter()
        out.backward(grad)
        elapsed += time.perf_counter() - start
    return elapsed


def round_robin_rows(workload: Workload, dtype: torch.dtype, threads: int, repeats: int,
                     providers: dict[str, tuple[Fn, torch.Tensor]]) -> list[dict]:
    """Time each provider's forward and forward+backward ``repeats`` times, round-robin after one
    warm-up each (compilation, caches, page mappings); one row of medians per provider."""
    timings: dict[tuple[str, bool], list[float]] = {}
    modes = [(name, bwd) for name in providers for bwd in (False, True)]
    for name, bwd in modes:
        _time_once(providers[name][0], providers[name][1], None, bwd)
    for _ in range(repeats):
        for name, bwd in modes:
            timings.setdefault((name, bwd), []).append(_time_once(providers[name][0], providers[name][1], None, bwd))
    return [dict(workload=workload.name, dtype=str(dtype).replace("torch.", ""), threads=threads, provider=name,
                 **_times(timings[(name, False)], timings[(name, True)])) for name in providers]


def _times(fwd: list[float], both: list[float] | None) -> dict:
    """A row's time fields from its round-robin timings (seconds): the medians in ms, and every
    round's time (``*_runs``), from which :func:`paired_ratio` takes ratios round by round."""
    ms = lambda ts: [round(t * 1e3, 3) for t in ts]  # noqa: E731
    return dict(fwd_ms=round(statistics.median(fwd) * 1e3, 2),
                fwd_bwd_ms=None if both is None else round(statistics.median(both) * 1e3, 2),
                fwd_runs=ms(fwd), fwd_bwd_runs=None if both is None else ms(both))


def paired_ratio(numerator: dict, denominator: dict, field: str) -> float | None:
    """``numerator``'s time / ``denominator``'s for ``field`` (``fwd_ms`` or ``fwd_bwd_ms``): the
    median over rounds of the ratio of the two times taken in the same round, when both rows have
    them, else the ratio of the medians; None when either has no time. Paired, a burst of host
    noise that slows both providers of a round cancels out instead of moving one median."""
    if numerator.get(field) is None or denominator.get(field) is None:
        return None
    runs = field.replace("_ms", "_runs")
    a, b = numerator.get(runs), denominator.get(runs)
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return numerator[field] / denominator[field]


def print_ratio_table(rows: list[dict], peer: str, base: str, base_label: str) -> None:
    """The table of an operator's benchmark: each row's times, ``x tv`` (the ``peer`` provider's
    time / this time) and ``/ <base_label>`` (this time / the ``base`` provider's time); rows
    without times are the run's correctness checks."""
    key = lambda r: (r["workload"], r["dtype"], r["threads"])  # noqa: E731
    peers = {key(r): r for r in rows if r["provider"] == peer}
    bases = {key(r): r for r in rows if r["provider"] == base}
    width = max([30] + [len(r["provider"]) for r in rows if r["fwd_ms"] is not None])
    label = f"/ {base_label}"
    header = (f"{'workload':<12} {'dtype':<8} {'thr':>3} {'provider':<{width}} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'x tv fwd':>8} {'x tv f+b':>8} {label + ' fwd':>12} {label + ' f+b':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["fwd_ms"] is None:
            diffs = r["max_abs_diff"]
            diffs = diffs if isinstance(diffs, (list, tuple)) else [diffs]
            print(f"{r['workload']:<12} {r['dtype']:<8} {r['threads']:>3} {r['provider']}: max abs diff "
                  + " / ".join(f"{d:.1e}" for d in diffs))
            continue

        def ratio(table, field, inverse=False):
            b = table.get(key(r))
            value = None if b is None else (paired_ratio(r, b, field) if inverse else paired_ratio(b, r, field))
            return "-" if value is None else f"{value:.2f}"
        print(f"{r['workload']:<12} {r['dtype']:<8} {r['threads']:>3} {r['provider']:<{width}} {r['fwd_ms']:>9.1f} "
              f"{r['fwd_bwd_ms']:>11.1f} {ratio(peers, 'fwd_ms'):>8} {ratio(peers, 'fwd_bwd_ms'):>8} "
              f"{ratio(bases, 'fwd_ms', True):>12} {ratio(bases, 'fwd_bwd_ms', True):>12}")
    print(f"\n'x tv' = {peer}'s time / this time; '/ {base_label}' = this time / {base}'s time")


def _prepare(workload: Workload, dtype: torch.dtype, threads: int, aligned: bool, quick: bool,
             only: set[str] | None) -> tuple[dict, dict, torch.Tensor, dict]:
    """(providers, their inputs, boxes, max abs differences) of one workload in one dtype: every
    provider's forward checked against ours, ours against the reference, in the same run."""
    x, rois = workload.data(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    providers = _providers(workload, aligned, threads, quick, dtype, only)
    inputs = {name: (x_cl if "channels_last" in name else x) for name in providers}
    with roialign.use_backend("numba"):
        ours = roialign.roi_align(x, rois, workload.out, workload.scale, workload.sampling_ratio, aligned)
    check = {}
    for name, (fn, _) in list(providers.items()):
        try:
            check[name] = float((fn(inputs[name], rois).double() - ours.double()).abs().max())
        except Exception as error:  # e.g. torchvision's CPU kernel has no bfloat16
            print(f"{workload.name} {str(dtype).replace('torch.', '')}: {name} left out: "
                  f"{str(error).strip().splitlines()[-1][:120]}")
            del providers[name]
    inputs = {name: inputs[name] for name in providers}
    if quick:
        reference = _ours("reference", workload, aligned)(x[:, :8].contiguous(), rois)
        check["ours-reference"] = float((reference.double() - ours[:, :8].double()).abs().max())
    return providers, inputs, rois, check


def bench_workload(workload: Workload, dtypes: list[torch.dtype], threads: int, repeats: int, aligned: bool,
                   quick: bool, only: set[str] | None = None) -> list[dict]:
    """Rows of every provider in every dtype of ``dtypes``, all timed in one round robin, so that
    a ratio between dtypes (a half type's time over float32's) is paired by round as well."""
    torch.set_num_threads(threads)
    prepared = {dtype: _prepare(workload, dtype, threads, aligned, quick, only) for dtype in dtypes}
    timings: dict[tuple, list[float]] = {}
    modes = [(dtype, name, bwd) for dtype, (providers, _, _, _) in prepared.items()
             for name, (_, has_bwd) in providers.items() for bwd in ((False, True) if has_bwd else (False,))]

    def once(dtype, name, bwd):
        providers, inputs, rois, _ = prepared[dtype]
        return _time_once(providers[name][0], inputs[name], rois, bwd)
    for mode in modes:  # warm-up: compilation, caches, page mappings
        once(*mode)
    for _ in range(repeats):
        for mode in modes:
            timings.setdefault(mode, []).append(once(*mode))
    rows = []
    for dtype, (providers, _, _, check) in prepared.items():
        name_of = str(dtype).replace("torch.", "")
        for name in providers:
            rows.append(dict(workload=workload.name, dtype=name_of, threads=threads, provider=name,
                             **_times(timings[(dtype, name, False)], timings.get((dtype, name, True))),
                             max_abs_diff_vs_numba=check[name]))
        if quick:
            rows.append(dict(workload=workload.name, dtype=name_of, threads=threads,
                             provider="ours-reference (8 channels, check only)", fwd_ms=None, fwd_bwd_ms=None,
                             max_abs_diff_vs_numba=check["ours-reference"]))
    return rows


def _print_table(rows: list[dict]) -> None:
    at = lambda r, provider: (r["workload"], r["dtype"], r["threads"], provider)  # noqa: E731
    found: dict[tuple, dict] = {at(r, r["provider"]): r for r in rows}
    with_ipex = any(r["provider"].startswith("ipex") for r in rows)
    peer = "ipex" if with_ipex else "tv"
    header = (f"{'workload':<14} {'dtype':<8} {'thr':>3} {'provider':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'x ' + peer + ' fwd':>10} {'x ' + peer + ' f+b':>10} {'/ f32 fwd':>9} {'/ f32 f+b':>9} "
              f"{'max diff':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if with_ipex:  # IPEX on the same layout
            tv = found.get(at(r, "ipex channels_last" if "channels_last" in r["provider"] else "ipex"))
        else:
            tv = found.get(at(r, "torchvision"))

        f32 = found.get((r["workload"], "float32", r["threads"], r["provider"]))

        def ratio(key, a=tv, b=r):
            value = None if a is None or b is None else paired_ratio(a, b, key)
            return "-" if value is None else f"{value:.2f}"
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{r['workload']:<14} {r['dtype']:<8} {r['threads']:>3} {r['provider']:<26} {fmt(r['fwd_ms']):>9} "
              f"{fmt(r['fwd_bwd_ms']):>11} {ratio('fwd_ms'):>10} {ratio('fwd_bwd_ms'):>10} "
              f"{ratio('fwd_ms', r, f32):>9} {ratio('fwd_bwd_ms', r, f32):>9} {r['max_abs_diff_vs_numba']:>9.1e}")
    print("\n'/ f32' = this time / the same provider's float32 time, paired by round (a workload's dtypes "
          "are timed in one round robin)")
    if with_ipex:
        print("'x ipex' = IPEX's time on the same layout / this time (IPEX replaces torchvision's roi_align "
              "once imported, so this run has no torchvision row)")


def _steady_malloc() -> str:
    """Fix glibc's malloc at its long-run state, without trimming; returns what was done.

    glibc gives freed memory at the top of its heap back to the OS ("trims" it) when that top
    exceeds a threshold, inside whichever ``free`` of 64 KiB or more comes next, in whichever call
    that is. In a round robin, memory freed by one provider was then given back inside another
    provider's timed call: on the Intel Xeon host (2026-12-01), our channels_last mask-14 float32
    forward took 7.7-8.5 ms instead of 5.2-5.9 through a whole run in some processes (always the
    same call of the round: its main thread spent about 4 ms in the kernel, with no page fault;
    strace showed ``brk`` shrinking the heap inside it), and IPEX's 9.4-10.7 ms instead of
    6.5-7.1 ms in others. Fixing the mmap threshold at 32 MiB (the highest value glibc's own
    rule gives it in a long-running process; setting any threshold turns that rule off) and
    turning trimming off removed it for both (medians 5.5-5.8 and 6.5-6.7 ms, two processes)."""
    if not sys.platform.startswith("linux"):
        return "the platform's default malloc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return "the platform's default malloc"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, (1 << 31) - 1):
        return "glibc malloc: mmap threshold 32 MiB, no trimming"
    return "glibc malloc: defaults (mallopt refused)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="boxhead-P2 and adaptive only, 3 repeats")
    parser.add_argument("--op", choices=("roi_align", "rotated", "max", "prroi"), default="roi_align",
                        help="rotated: roi_align_rotated on the same workloads with random angles, against "
                             "torchvision's and our axis-aligned kernels on the unrotated boxes; max: "
                             "roi_align(mode='max' / 'onnx_max') against torchvision's and our average; prroi: "
                             "prroi_pool against torchvision's and our roi_align with sampling_ratio=2")
    parser.add_argument("--workloads", default=None, help=f"comma-separated, from {', '.join(WORKLOADS)}, sweep")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: all cores)")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated: float32, float64, bfloat16, float16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--aligned", choices=("true", "false"), default="true")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of: torchvision, onnxruntime, ours-reference, ours-numba, "
                             "'ours-numba channels_last', and ipex, 'ipex channels_last' where Intel Extension for "
                             "PyTorch imports")
    parser.add_argument("--malloc", choices=("steady", "default"), default="steady",
                        help="steady (default): fix glibc's malloc thresholds so that memory one provider frees "
                             "is not given back to the OS inside another's timed call; default: leave them")
    args = parser.parse_args(argv)
    malloc = _steady_malloc() if args.malloc == "steady" else "malloc defaults"

    if args.quick:
        names, repeats = ["boxhead-P2", "adaptive"], 3
    else:
        names, repeats = (args.workloads.split(",") if args.workloads else list(WORKLOADS)), args.repeats
    workloads = []
    for name in names:
        workloads += sweep_workloads() if name == "sweep" else [WORKLOADS[name]]
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [os.cpu_count() or 1]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    only = set(args.providers.split(",")) if args.providers else None

    print(f"roialign {roialign.__version__}; torch {torch.__version__}; numpy {np.__version__}; "
          f"python {platform.python_version()}; {platform.machine()} {_cpu_name()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"aligned={args.aligned}, median of {repeats}, providers timed round-robin"
          f"{' (a workload in all its dtypes)' if args.op == 'roi_align' else ''}; "
          f"'x tv' = torchvision time / provider time, the median over rounds of that round's ratio; {malloc}")
    # What roialign.warmup() does on this host: the fastest orders of the NCHW <-> channels-last copies.
    torch.set_num_threads(threads[0])
    from .kernels.cpu.layout import tune_layout_copies
    print(_copy_orders(tune_layout_copies()) + "\n")
    rows = []
    if args.op == "roi_align":  # a workload's dtypes in one round robin
        for t in threads:
            for workload in workloads:
                rows += bench_workload(workload, dtypes, t, repeats, args.aligned == "true", args.quick, only)
    for dtype in dtypes if args.op != "roi_align" else []:
        for t in threads:
            for workload in workloads:
                if args.op == "rotated":
                    from . import _bench_rotated
                    rows += _bench_rotated.bench_workload(workload, dtype, t, repeats, args.quick, only)
                elif args.op == "max":
                    from . import _bench_max
                    rows += _bench_max.bench_workload(workload, dtype, t, repeats, args.quick, only)
                else:
                    from . import _bench_prroi
                    rows += _bench_prroi.bench_workload(workload, dtype, t, repeats, args.quick, only)
    if args.op == "rotated":
        print_ratio_table(rows, "torchvision (axis-aligned)", "ours-numba (axis-aligned)", "axis")
    elif args.op == "max":
        print_ratio_table(rows, "torchvision (avg)", "ours-numba (avg)", "avg")
    elif args.op == "prroi":
        print_ratio_table(rows, "torchvision roi_align sr=2", "ours-numba roi_align sr=2", "roi_align")
    else:
        _print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.csv}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
