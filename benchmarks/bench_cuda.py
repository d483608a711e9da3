"""CUDA benchmark of roialign's Triton kernels against torchvision's CUDA roi_align.

Needs a CUDA device (and, for the peer, torchvision). Times with ``triton.testing.do_bench``
(CUDA events, median of many runs, L2 cleared between runs); checks every provider's forward
against ours in the same run; prints a table and writes CSV.

    python benchmarks/bench_cuda.py --dtypes float32,float16,bfloat16 --csv cuda.csv

Providers: ``torchvision`` (atomic backward), ``torchvision deterministic`` (the same call under
``torch.use_deterministic_algorithms(True)``), ``ours-triton`` (NCHW and channels_last input).
"""

from __future__ import annotations

import argparse
import csv

import torch

import roialign
from roialign._bench import WORKLOADS, Workload

TRAIN_BATCH = Workload("train-batch", 8, 256, 200, 272, 8 * 512, 1 / 4, 7, 2)


def _providers(w: Workload, aligned: bool):
    def ours(x, rois):
        with roialign.use_backend("triton"):
            return roialign.roi_align(x, rois, w.out, w.scale, w.sampling_ratio, aligned)

    providers = {"ours-triton": (ours, False), "ours-triton channels_last": (ours, True)}
    try:
        import torchvision.ops

        def tv(x, rois):
            return torchvision.ops.roi_align(x, rois, w.out, w.scale, w.sampling_ratio, aligned)

        def tv_deterministic(x, rois):
            torch.use_deterministic_algorithms(True)
            try:
                return tv(x, rois)
            finally:
                torch.use_deterministic_algorithms(False)

        providers["torchvision"] = (tv, False)
        providers["torchvision deterministic"] = (tv_deterministic, False)
    except ImportError:
        pass
    return providers


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--aligned", choices=("true", "false"), default="true")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    aligned = args.aligned == "true"
    print(f"roialign {roialign.__version__}; torch {torch.__version__}; {torch.cuda.get_device_name()}")
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for w in list(WORKLOADS.values()) + [TRAIN_BATCH]:
            x, rois = w.data(torch.float32)
            x, rois = x.cuda().to(dtype), rois.cuda().to(dtype)
            providers = _providers(w, aligned)
            ref = providers["ours-triton"][0](x, rois).float()
            for name, (fn, channels_last) in providers.items():
                xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                diff = float((fn(xi, rois).float() - ref).abs().max())
                leaf = xi.detach().requires_grad_()
                grad = torch.ones_like(fn(xi, rois))
                fwd = triton.testing.do_bench(lambda: fn(xi, rois))
                both = triton.testing.do_bench(lambda: fn(leaf, rois).backward(grad))
                rows.append(dict(workload=w.name, dtype=str(dtype).replace("torch.", ""), provider=name,
                                 fwd_ms=round(fwd, 3), fwd_bwd_ms=round(both, 3), max_abs_diff_vs_ours=diff))
                print(f"{w.name:<12} {rows[-1]['dtype']:<9} {name:<26} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                      f"max diff {diff:.1e}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
