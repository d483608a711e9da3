"""Sweep the Triton kernels' launch parameters on a CUDA device and time each choice.

The launch parameters are module constants of ``roialign.kernels.triton.roi_align`` and
``roi_align_rotated`` (forward tile size and warps; input-gradient band height, channel block
and warps). For each setting this script times the forward launcher and the input-gradient
launcher on the benchmark workloads (``triton.testing.do_bench``, median), reports whether the
result is bitwise equal to the shipped setting's, and times torchvision's CUDA ``roi_align``
forward and fwd+bwd on the same data for scale. No setting changes an order of accumulation (the
interpreter's results are equal, which the tests check), but compiled forwards can differ in the
last bits between settings: the compiler fuses multiply-adds differently (seen on an H200). The
input gradients were bitwise equal under every setting there.

    python benchmarks/tune_cuda.py --dtypes float32,bfloat16 --csv tune.csv

``--smoke`` runs the script's logic on one tiny workload on CPU tensors through Triton's
interpreter: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import torch  # noqa: E402

from roialign._bench import WORKLOADS, Workload  # noqa: E402

SMOKE = Workload("smoke", 1, 16, 12, 10, 6, 1 / 2, 2, 2)

FORWARD = {"_FORWARD_TILE": (1024, 2048, 4096), "_FORWARD_WARPS": (2, 4, 8)}
BACKWARD = {"_BAND_ROWS": (1, 2, 4), "_BACKWARD_BLOCK_C": (16, 32, 64)}
ROTATED_FORWARD = {"_TILE": (2048, 4096), "_FORWARD_WARPS": (4, 8)}
ROTATED_BACKWARD = {"_BAND_ROWS": (1, 2, 4, 8), "_BACKWARD_BLOCK_C": (32, 64)}


def _wall_clock_ms(fn, repeats=2):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _settings(space: dict, smoke: bool):
    names = list(space)
    combos = list(itertools.product(*space.values()))
    return [dict(zip(names, c)) for c in (combos[:2] if smoke else combos)]


def _sweep(module, space, run, timer, smoke, label, rows, meta):
    shipped = {name: getattr(module, name) for name in space}
    want = run()
    try:
        for setting in _settings(space, smoke):
            for name, value in setting.items():
                setattr(module, name, value)
            got = run()
            same = torch.equal(got, want)
            ms = timer(run)
            rows.append(dict(meta, kernel=label, setting=" ".join(f"{k.strip('_')}={v}" for k, v in setting.items()),
                             shipped=setting == shipped, ms=round(ms, 4), bitwise_equal_to_shipped=same))
            mark = "*" if setting == shipped else " "
            print(f"{meta['workload']:<11} {meta['dtype']:<9} {label:<17}{mark} {rows[-1]['setting']:<58} "
                  f"{ms:8.3f} ms  equal {same}")
    finally:
        for name, value in shipped.items():
            setattr(module, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--ops", default="roi_align,roi_align_rotated")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--best", default=None,
                        help="write, as JSON, each kernel's setting with the least total time over the sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through the Triton interpreter")
    args = parser.parse_args()
    if args.smoke:
        device, workloads, dtypes, timer = "cpu", [SMOKE], [torch.float32], _wall_clock_ms
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tune_cuda.py needs a CUDA device (or --smoke)")
        import triton.testing

        device, workloads = "cuda", [WORKLOADS[name] for name in args.workloads.split(",")]
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=40)
        print(f"torch {torch.__version__}; {torch.cuda.get_device_name()}")
    from roialign._bench_rotated import rotated_data
    from roialign.kernels.triton import roi_align as axis
    from roialign.kernels.triton import roi_align_rotated as rotated

    ops = args.ops.split(",")
    rows = []
    for dtype in dtypes:
        for w in workloads:
            meta = dict(workload=w.name, dtype=str(dtype).replace("torch.", ""))
            x, boxes, corners = rotated_data(w, torch.float32)
            x, boxes, corners = x.to(device, dtype), boxes.to(device, dtype), corners.to(device, dtype)
            n, c, h, wd = x.shape
            grad = torch.randn(corners.shape[0], c, w.out, w.out, generator=torch.Generator().manual_seed(1))
            grad = grad.to(device, dtype)
            args_axis = (w.scale, w.out, w.out, w.sampling_ratio, True)
            if "roi_align" in ops:
                _sweep(axis, FORWARD, lambda: axis.forward(x, corners, *args_axis), timer, args.smoke,
                       "forward", rows, meta)
                _sweep(axis, BACKWARD, lambda: axis.backward_input(grad, corners, w.scale, w.out, w.out, n, c, h, wd,
                                                                   w.sampling_ratio, True, False),
                       timer, args.smoke, "input gradient", rows, meta)
                try:
                    import torchvision.ops
                except ImportError:
                    torchvision = None
                if torchvision is not None and not args.smoke:
                    leaf = x.detach().requires_grad_()

                    def tv_both():
                        leaf.grad = None
                        torchvision.ops.roi_align(leaf, corners, w.out, w.scale, w.sampling_ratio, True).backward(grad)
                    fwd = timer(lambda: torchvision.ops.roi_align(x, corners, w.out, w.scale, w.sampling_ratio, True))
                    both = timer(tv_both)
                    rows.append(dict(meta, kernel="torchvision forward", setting="", shipped=False, ms=round(fwd, 4),
                                     bitwise_equal_to_shipped=""))
                    rows.append(dict(meta, kernel="torchvision fwd+bwd", setting="", shipped=False, ms=round(both, 4),
                                     bitwise_equal_to_shipped=""))
                    print(f"{w.name:<11} {meta['dtype']:<9} torchvision forward {fwd:8.3f} ms, fwd+bwd {both:8.3f} ms")
            if "roi_align_rotated" in ops:
                rot = (w.scale, w.out, w.out, w.sampling_ratio, True, False, True)
                _sweep(rotated, ROTATED_FORWARD, lambda: rotated.forward(x, boxes, *rot), timer, args.smoke,
                       "rotated forward", rows, meta)
                _sweep(rotated, ROTATED_BACKWARD,
                       lambda: rotated.backward_input(grad, boxes, w.scale, w.out, w.out, n, c, h, wd,
                                                      w.sampling_ratio, True, False, True, False),
                       timer, args.smoke, "rotated input grad", rows, meta)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.best:
        with open(args.best, "w") as f:
            json.dump(best_settings(rows), f, indent=1)


MODULES = {"forward": "roi_align", "input gradient": "roi_align", "rotated forward": "roi_align_rotated",
           "rotated input grad": "roi_align_rotated"}


def best_settings(rows: list[dict]) -> dict:
    """{module: {constant: value}}: per kernel, the setting with the least time summed over every
    workload and dtype swept (only settings timed on all of them)."""
    best = {}
    for kernel, module in MODULES.items():
        totals, counts = {}, {}
        for row in rows:
            if row["kernel"] == kernel:
                totals[row["setting"]] = totals.get(row["setting"], 0.0) + row["ms"]
                counts[row["setting"]] = counts.get(row["setting"], 0) + 1
        complete = [s for s in totals if counts[s] == max(counts.values())]
        if complete:
            chosen = min(complete, key=totals.get)
            print(f"best {kernel}: {chosen} ({totals[chosen]:.3f} ms in all)")
            for item in chosen.split():
                name, value = item.split("=")
                best.setdefault(module, {})["_" + name] = int(value)
    return best


if __name__ == "__main__":
    main()
