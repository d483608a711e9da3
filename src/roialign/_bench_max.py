"""CPU benchmark of max-mode RoIAlign (``python benchmarks/bench_cpu.py --op max``).

The bar (issue 12): torchvision's ``roi_align`` (average; its CPU kernel is single-threaded, as is
mmcv's max kernel, which has the same structure) on the same boxes; our own average kernel is
shown beside it. A maximum needs every sample's value, so our average's tap merging does not
apply to it. Correctness in the same run: the Numba max kernels against the pure-PyTorch ones
(on 8 channels, forward and gradients).
"""

from __future__ import annotations

import torch

import roialign

from ._bench import Workload, round_robin_rows


def bench_workload(workload: Workload, dtype: torch.dtype, threads: int, repeats: int, quick: bool,
                   only: set[str] | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    x, rois = workload.data(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out, scale, sr = workload.out, workload.scale, workload.sampling_ratio

    def ours(mode, backend="numba"):
        def run(inp, _):
            with roialign.use_backend(backend):
                return roialign.roi_align(inp, rois, out, scale, sr, True, mode=mode)
        return run

    providers = {}
    try:
        import torchvision.ops

        def tv(inp, _):
            return torchvision.ops.roi_align(inp, rois, out, scale, sr, True)
        tv(torch.zeros(1, 1, 4, 4, dtype=dtype), torch.tensor([[0, 0.0, 0, 2, 2]], dtype=dtype))
        providers["torchvision (avg)"] = (tv, x)
    except Exception:  # not installed, or not importable beside this torch
        pass
    providers["ours-numba (avg)"] = (ours("avg"), x)
    providers["ours-numba max"] = (ours("max"), x)
    providers["ours-numba max channels_last"] = (ours("max"), x_cl)
    providers["ours-numba onnx_max"] = (ours("onnx_max"), x)
    providers = {k: v for k, v in providers.items() if only is None or k in only}

    # Correctness in the same run: Numba against the pure-PyTorch kernels, on 8 channels.
    check = {}
    small = x[:, :8].contiguous()
    for mode in ("max", "onnx_max"):
        results = []
        for backend in ("numba", "reference"):
            leaf = small.detach().requires_grad_()
            boxes = rois.detach().clone().requires_grad_()
            with roialign.use_backend(backend):
                y = roialign.roi_align(leaf, boxes, out, scale, sr, True, mode=mode)
            y.backward(torch.ones_like(y))
            results.append((y.detach().double(), leaf.grad.double(), boxes.grad.double()))
        (a, ga, ra), (b, gb, rb) = results
        check[f"{mode}: numba vs reference (8 channels), output / input grad / box grad"] = (
            float((a - b).abs().max()), float((ga - gb).abs().max()), float((ra - rb).abs().max()))

    rows = round_robin_rows(workload, dtype, threads, repeats, providers)
    for what, diffs in check.items():
        rows.append(dict(workload=workload.name, dtype=str(dtype).replace("torch.", ""), threads=threads,
                         provider=f"check: {what}", fwd_ms=None, fwd_bwd_ms=None, max_abs_diff=diffs))
    return rows
