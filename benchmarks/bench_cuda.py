"""CUDA benchmark of roialign's Triton kernels against torchvision's CUDA roi_align.

Needs a CUDA device (and, for the peer, torchvision). Times with ``triton.testing.do_bench``
(CUDA events, median of many runs, L2 cleared between runs, gradients reset between backward
runs); in the same run it compares every provider's forward output and input gradient with
ours and checks that our input gradient is bitwise identical from run to run; prints a table
and writes CSV.

    python benchmarks/bench_cuda.py --dtypes float32,float16,bfloat16 --csv cuda.csv

Providers: ``torchvision`` (atomic backward), ``torchvision deterministic`` (the same call under
``torch.use_deterministic_algorithms(True)``), ``ours-triton`` (NCHW and channels_last input).
``--max`` adds ``ours-triton max`` (``mode="max"``) and ``--prroi`` adds ``ours-triton prroi_pool``
(NCHW and channels_last): torchvision has neither, so those rows are timed beside the average
rows, and their "diff" columns compare with our pure PyTorch kernel of the same operator run on
the same device instead.

``--smoke`` runs the script's own logic on one tiny workload on CPU tensors through Triton's
interpreter, with a wall-clock timer: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined (roialign defines some)

import torch  # noqa: E402

import roialign  # noqa: E402
from roialign._bench import CUDA_SMOKE as SMOKE  # noqa: E402
from roialign._bench import TRAIN_BATCH, WORKLOADS, Workload  # noqa: E402



def _providers(w: Workload, aligned: bool, with_max: bool = False, with_prroi: bool = False):
    def ours(x, rois, mode="avg", backend="triton"):
        with roialign.use_backend(backend):
            return roialign.roi_align(x, rois, w.out, w.scale, w.sampling_ratio, aligned, mode=mode)

    providers = {"ours-triton": (ours, False), "ours-triton channels_last": (ours, True)}
    if with_max:
        def ours_max(x, rois):
            return ours(x, rois, "max")

        def reference_max(x, rois):
            return ours(x, rois, "max", "reference")

        ours_max.reference = reference_max
        providers["ours-triton max"] = (ours_max, False)
        providers["ours-triton max channels_last"] = (ours_max, True)
    if with_prroi:
        def prroi(x, rois, backend="triton"):
            with roialign.use_backend(backend):
                return roialign.prroi_pool(x, rois, w.out, w.scale)

        prroi.reference = lambda x, rois: prroi(x, rois, "reference")
        providers["ours-triton prroi_pool"] = (prroi, False)
        providers["ours-triton prroi_pool channels_last"] = (prroi, True)
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


def _wall_clock_ms(fn, grad_to_none=None, repeats=3):
    times = []
    for _ in range(repeats):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _input_grad(fn, x, rois, grad):
    leaf = x.detach().requires_grad_()
    fn(leaf, rois).backward(grad)
    return leaf.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--workloads", default=",".join(list(WORKLOADS) + [TRAIN_BATCH.name]))
    parser.add_argument("--aligned", choices=("true", "false"), default="true")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through the Triton interpreter")
    parser.add_argument("--settings", default=None,
                        help="JSON of launch parameters to use instead of the shipped ones (tune_cuda.py --best)")
    parser.add_argument("--max", action="store_true", help="also time mode='max'")
    parser.add_argument("--prroi", action="store_true", help="also time prroi_pool")
    parser.add_argument("--rep", type=float, default=100, help="do_bench's timing budget per measurement, ms")
    args = parser.parse_args()
    if args.smoke:
        device, workloads, dtypes, timer = "cpu", [SMOKE], [torch.float32], _wall_clock_ms
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_cuda.py needs a CUDA device (or --smoke)")
        import triton.testing

        known = {w.name: w for w in list(WORKLOADS.values()) + [TRAIN_BATCH]}
        device, workloads = "cuda", [known[name] for name in args.workloads.split(",")]
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]

        def timer(fn, grad_to_none=None):
            return triton.testing.do_bench(fn, rep=args.rep, grad_to_none=grad_to_none)
        print(f"roialign {roialign.__version__}; torch {torch.__version__}; {torch.cuda.get_device_name()}")
    if args.settings:
        import importlib
        import json

        with open(args.settings) as f:
            for module, constants in json.load(f).items():
                target = importlib.import_module(f"roialign.kernels.triton.{module}")
                for name, value in constants.items():
                    if not hasattr(target, name):
                        raise SystemExit(f"--settings: {module} has no launch parameter {name}")
                    setattr(target, name, value)
                    print(f"setting {module}.{name} = {value}")
    aligned = args.aligned == "true"
    rows = []
    for dtype in dtypes:
        for w in workloads:
            x, rois = w.data(torch.float32)
            x, rois = x.to(device, dtype), rois.to(device, dtype)
            providers = _providers(w, aligned, args.max, args.prroi)
            ours = providers["ours-triton"][0]
            ref = ours(x, rois).float()
            grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            ref_grad = _input_grad(ours, x, rois, grad)
            deterministic = torch.equal(ref_grad, _input_grad(ours, x, rois, grad))
            for name, (fn, channels_last) in providers.items():
                xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                try:
                    reference = getattr(fn, "reference", None)
                    want, want_grad = ((reference(x, rois).float(), _input_grad(reference, x, rois, grad))
                                       if reference else (ref, ref_grad))
                    diff = float((fn(xi, rois).float() - want).abs().max())
                    grad_diff = float((_input_grad(fn, xi, rois, grad).float() - want_grad.float()).abs().max())
                    if reference:
                        first = _input_grad(fn, xi, rois, grad)
                        print(f"{w.name:<12} {name}: input gradient bitwise identical across runs: "
                              f"{torch.equal(first, _input_grad(fn, xi, rois, grad))}")
                    leaf = xi.detach().requires_grad_()
                    fwd = timer(lambda: fn(xi, rois))
                    both = timer(lambda: fn(leaf, rois).backward(grad), grad_to_none=[leaf])
                except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
                    if name.startswith("ours"):
                        raise
                    # A peer that cannot run the workload (torchvision's deterministic CUDA path
                    # asked for 38 GiB on "adaptive" on an H200) is reported, not fatal.
                    message = str(error).splitlines()[0][:120]
                    rows.append(dict(workload=w.name, dtype=str(dtype).replace("torch.", ""), provider=name,
                                     fwd_ms="", fwd_bwd_ms="", max_abs_diff_vs_ours="", max_abs_grad_diff_vs_ours="",
                                     ours_bitwise_deterministic=deterministic, error=message))
                    print(f"{w.name:<12} {rows[-1]['dtype']:<9} {name:<26} failed: {message}")
                    if x.is_cuda:
                        torch.cuda.empty_cache()
                    continue
                rows.append(dict(workload=w.name, dtype=str(dtype).replace("torch.", ""), provider=name,
                                 fwd_ms=round(fwd, 4), fwd_bwd_ms=round(both, 4), max_abs_diff_vs_ours=diff,
                                 max_abs_grad_diff_vs_ours=grad_diff, ours_bitwise_deterministic=deterministic,
                                 error=""))
                print(f"{w.name:<12} {rows[-1]['dtype']:<9} {name:<26} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                      f"max diff {diff:.1e}  grad diff {grad_diff:.1e}")
            print(f"{w.name:<12} ours: input gradient bitwise identical across runs: {deterministic}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
