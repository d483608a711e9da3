"""CPU benchmark of rotated RoIAlign (``python benchmarks/bench_cpu.py --op rotated``).

The workloads are ``bench_cpu``'s, with each box turned by a random angle about its centre.
No CPU peer has a multi-threaded rotated kernel: detectron2's and mmcv's are single-threaded
loops with the structure of torchvision's axis-aligned one, so the bar is torchvision's
``roi_align`` on the same boxes unrotated (same centres and sizes), and our own axis-aligned
kernel on those boxes is shown beside it. Correctness in the same run: the Numba rotated kernel
against the pure-PyTorch one, and, with the angles set to 0, against torchvision.
"""

from __future__ import annotations

import torch

import roialign

from ._bench import Workload, round_robin_rows


def rotated_data(workload: Workload, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Features, rotated boxes ``[K, 6]`` (angles uniform in [-180, 180) degrees) and the same
    boxes unrotated as corner boxes ``[K, 5]``."""
    x, corners = workload.data(dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    c = corners.double()
    angle = torch.rand(c.shape[0], generator=gen, dtype=torch.float64) * 360 - 180
    rotated = torch.stack([c[:, 0], (c[:, 1] + c[:, 3]) / 2, (c[:, 2] + c[:, 4]) / 2, c[:, 3] - c[:, 1],
                           c[:, 4] - c[:, 2], angle], 1).to(dtype)
    return x, rotated, corners


def bench_workload(workload: Workload, dtype: torch.dtype, threads: int, repeats: int, quick: bool,
                   only: set[str] | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    x, rotated, corners = rotated_data(workload, dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out, scale, sr = workload.out, workload.scale, workload.sampling_ratio

    def ours_rotated(backend):
        def run(inp, _):
            with roialign.use_backend(backend):
                return roialign.roi_align_rotated(inp, rotated, out, scale, sr)
        return run

    def ours_axis(inp, _):
        with roialign.use_backend("numba"):
            return roialign.roi_align(inp, corners, out, scale, sr, True)

    providers = {}
    try:
        import torchvision.ops

        def tv(inp, _):
            return torchvision.ops.roi_align(inp, corners, out, scale, sr, True)
        tv(torch.zeros(1, 1, 4, 4, dtype=dtype), torch.tensor([[0, 0.0, 0, 2, 2]], dtype=dtype))
        providers["torchvision (axis-aligned)"] = (tv, x)
    except Exception:  # not installed, or not importable beside this torch
        pass
    providers["ours-numba (axis-aligned)"] = (ours_axis, x)
    if not quick:
        providers["ours-reference rotated"] = (ours_rotated("reference"), x)
    providers["ours-numba rotated"] = (ours_rotated("numba"), x)
    providers["ours-numba rotated channels_last"] = (ours_rotated("numba"), x_cl)
    providers = {k: v for k, v in providers.items() if only is None or k in only}

    # Correctness in the same run.
    numba_rotated = ours_rotated("numba")(x, None)
    with roialign.use_backend("reference"):
        reference = roialign.roi_align_rotated(x[:, :8].contiguous(), rotated, out, scale, sr)
    check = {"rotated: numba vs reference (8 channels)":
             float((numba_rotated[:, :8].double() - reference.double()).abs().max())}
    if any(name.startswith("torchvision") for name in providers):
        flat = rotated.clone()
        flat[:, 5] = 0
        with roialign.use_backend("numba"):
            zero = roialign.roi_align_rotated(x, flat, out, scale, sr)
        check["angle 0: numba rotated vs torchvision"] = float(
            (zero.double() - providers["torchvision (axis-aligned)"][0](x, None).double()).abs().max())
    del numba_rotated, reference

    rows = round_robin_rows(workload, dtype, threads, repeats, providers)
    for what, diff in check.items():
        rows.append(dict(workload=workload.name, dtype=str(dtype).replace("torch.", ""), threads=threads,
                         provider=f"check: {what}", fwd_ms=None, fwd_bwd_ms=None, max_abs_diff=diff))
    return rows
