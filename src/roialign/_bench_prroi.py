"""CPU benchmark of Precise RoI Pooling (``python benchmarks/bench_cpu.py --op prroi``).

No CPU PrRoIPool exists elsewhere (mmcv's is CUDA-only), so the bar (issue 12) is torchvision's
``roi_align`` with ``sampling_ratio=2`` on the same boxes (aligned=False: PrRoIPool has no
half-pixel shift either); our own ``roi_align`` with the same arguments is shown beside it.
Correctness in the same run: the Numba kernels against the pure-PyTorch ones (on 8 channels,
forward and gradients).
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
    out, scale = workload.out, workload.scale

    def prroi(backend="numba"):
        def run(inp, _):
            with roialign.use_backend(backend):
                return roialign.prroi_pool(inp, rois, out, scale)
        return run

    def ours_roi_align(inp, _):
        with roialign.use_backend("numba"):
            return roialign.roi_align(inp, rois, out, scale, 2, False)

    providers = {}
    try:
        import torchvision.ops

        def tv(inp, _):
            return torchvision.ops.roi_align(inp, rois, out, scale, 2, False)
        tv(torch.zeros(1, 1, 4, 4, dtype=dtype), torch.tensor([[0, 0.0, 0, 2, 2]], dtype=dtype))
        providers["torchvision roi_align sr=2"] = (tv, x)
    except Exception:  # not installed, or not importable beside this torch
        pass
    providers["ours-numba roi_align sr=2"] = (ours_roi_align, x)
    providers["ours-numba prroi_pool"] = (prroi(), x)
    providers["ours-numba prroi_pool channels_last"] = (prroi(), x_cl)
    providers = {k: v for k, v in providers.items() if only is None or k in only}

    # Correctness in the same run: Numba against the pure-PyTorch kernel, on 8 channels.
    results = []
    small = x[:, :8].contiguous()
    for backend in ("numba", "reference"):
        leaf = small.detach().requires_grad_()
        boxes = rois.detach().clone().requires_grad_()
        with roialign.use_backend(backend):
            y = roialign.prroi_pool(leaf, boxes, out, scale)
        y.backward(torch.ones_like(y))
        results.append((y.detach().double(), leaf.grad.double(), boxes.grad.double()))
    (a, ga, ra), (b, gb, rb) = results
    check = [float((a - b).abs().max()), float((ga - gb).abs().max()), float((ra - rb).abs().max())]

    rows = round_robin_rows(workload, dtype, threads, repeats, providers)
    rows.append(dict(workload=workload.name, dtype=str(dtype).replace("torch.", ""), threads=threads,
                     provider="check: prroi_pool numba vs reference (8 channels), output / input grad / box grad",
                     fwd_ms=None, fwd_bwd_ms=None, max_abs_diff=check))
    return rows
