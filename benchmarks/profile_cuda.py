"""Where a CUDA forward+backward spends its time: per-kernel device times from torch.profiler.

For each workload, one warm-up and then ``--iters`` profiled forward+backward passes of ours
(NCHW input) and of torchvision's CUDA roi_align; prints the kernels (and copies) by total device
time per pass. A guide for tuning the Triton kernels, not a benchmark: use bench_cuda.py for times.

    python benchmarks/profile_cuda.py --workloads boxhead-P2,mask-14 --dtype float32

``--smoke`` runs the script's logic on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import torch  # noqa: E402

import roialign  # noqa: E402
from roialign._bench import CUDA_SMOKE as SMOKE  # noqa: E402
from roialign._bench import TRAIN_BATCH, WORKLOADS  # noqa: E402



def _passes(fn, x, rois, grad, iters):
    for _ in range(iters):
        leaf = x.detach().requires_grad_()
        fn(leaf, rois).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(list(WORKLOADS) + [TRAIN_BATCH.name]))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8, help="kernels listed per provider")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    known = {w.name: w for w in list(WORKLOADS.values()) + [TRAIN_BATCH]}
    if args.smoke:
        device, workloads, activities = "cpu", [SMOKE], [torch.profiler.ProfilerActivity.CPU]
    else:
        device, workloads = "cuda", [known[n] for n in args.workloads.split(",")]
        activities = [torch.profiler.ProfilerActivity.CUDA]
    dtype = getattr(torch, args.dtype)
    for w in workloads:
        x, rois = w.data(torch.float32)
        x, rois = x.to(device, dtype), rois.to(device, dtype)
        providers = {"ours": lambda a, r: roialign.roi_align(a, r, w.out, w.scale, w.sampling_ratio, True)}
        try:
            import torchvision.ops

            providers["torchvision"] = lambda a, r: torchvision.ops.roi_align(a, r, w.out, w.scale,
                                                                               w.sampling_ratio, True)
        except ImportError:
            pass
        for name, fn in providers.items():
            grad = torch.ones_like(fn(x, rois))
            _passes(fn, x, rois, grad, 1)
            if device == "cuda":
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                _passes(fn, x, rois, grad, args.iters)
                if device == "cuda":
                    torch.cuda.synchronize()
            events = prof.key_averages()
            key = "device_time_total" if device == "cuda" else "cpu_time_total"
            rows = sorted(events, key=lambda e: getattr(e, "self_" + key, 0.0), reverse=True)
            total = sum(getattr(e, "self_" + key, 0.0) for e in events)
            print(f"== {w.name} {args.dtype} {name}: {total / args.iters / 1e3:.3f} ms of self time per pass")
            for e in rows[:args.rows]:
                per_pass = getattr(e, "self_" + key, 0.0) / args.iters / 1e3
                if per_pass > 0:
                    print(f"   {per_pass:8.3f} ms  x{e.count // args.iters:<3d} {e.key[:90]}")


if __name__ == "__main__":
    main()
