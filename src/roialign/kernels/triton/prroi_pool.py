"""Precise RoI Pooling kernels in Triton: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (for tests).

The geometry (each bin's integral-image entries and coefficients) and the integral image itself
(float64 prefix sums, channels last) come from the pure-PyTorch kernel
(``reference.prroi_pool``), so every backend reads the same entries with the same coefficients.

- forward: one program per (box, bin, block of channels) sums its at most 6 x 6 entries in float64.
- input gradient, deterministic without atomics: the (entry, coefficient) pairs of every bin are
  sorted by the integral-image element they touch (a stable sort, so in box order); one program
  per (element, block of channels) sums its run in that order. Suffix sums (the adjoint of the
  prefix sums) finish it.
- box gradient: one program per (box, bin); per entry and channel, the integral image times the
  output gradient, weighted by the four edge-derivative coefficients; the bins' partial sums are
  added up per box afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import prroi_pool as shared
from ..reference.common import compute_dtype
from .common import block_c, launcher


@triton.jit
def _forward_kernel(s_ptr, batch_ptr, xi_ptr, xv_ptr, yi_ptr, yv_ptr, out_ptr, C, H1, W1, PH, PW,
                    ENTRIES: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q = j // PW
    p = j % PW
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    b = tl.load(batch_ptr + k)
    image = s_ptr + b * H1 * W1 * C
    acc = tl.zeros((BLOCK_C,), tl.float64)
    for ey in tl.static_range(ENTRIES):
        r = tl.load(yi_ptr + (k * PH + q) * ENTRIES + ey)
        cy = tl.load(yv_ptr + (k * PH + q) * ENTRIES + ey)
        for ex in tl.static_range(ENTRIES):
            col = tl.load(xi_ptr + (k * PW + p) * ENTRIES + ex)
            cx = tl.load(xv_ptr + (k * PW + p) * ENTRIES + ex)
            row = tl.load(image + (r * W1 + col) * C + c, mask=cmask, other=0.0)
            acc += (cy * cx) * row
    tl.store(out_ptr + (k * C + c) * (PH * PW) + j, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _backward_input_kernel(grad_ptr, source_ptr, coef_ptr, start_ptr, count_ptr, target_ptr, grad_s_ptr, C,
                           BLOCK_C: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    start = tl.load(start_ptr + u)
    count = tl.load(count_ptr + u)
    acc = tl.zeros((BLOCK_C,), tl.float64)
    for e in range(start, start + count):
        source = tl.load(source_ptr + e)
        coef = tl.load(coef_ptr + e)
        acc += coef * tl.load(grad_ptr + source * C + c, mask=cmask, other=0.0).to(tl.float64)
    tl.store(grad_s_ptr + tl.load(target_ptr + u) * C + c, acc, mask=cmask)


@triton.jit
def _backward_rois_kernel(s_ptr, grad_ptr, batch_ptr, xi_ptr, xv_ptr, xds_ptr, xde_ptr, yi_ptr, yv_ptr, yds_ptr,
                          yde_ptr, out_ptr, C, H1, W1, PH, PW, ENTRIES: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q = j // PW
    p = j % PW
    b = tl.load(batch_ptr + k)
    image = s_ptr + b * H1 * W1 * C
    x_start = tl.zeros((BLOCK_C,), tl.float64)
    x_end = tl.zeros((BLOCK_C,), tl.float64)
    y_start = tl.zeros((BLOCK_C,), tl.float64)
    y_end = tl.zeros((BLOCK_C,), tl.float64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        g = tl.load(grad_ptr + ((k * PH * PW) + j) * C + c, mask=cmask, other=0.0).to(tl.float64)
        for ey in tl.static_range(ENTRIES):
            ybin = (k * PH + q) * ENTRIES + ey
            r = tl.load(yi_ptr + ybin)
            cy, cys, cye = tl.load(yv_ptr + ybin), tl.load(yds_ptr + ybin), tl.load(yde_ptr + ybin)
            for ex in tl.static_range(ENTRIES):
                xbin = (k * PW + p) * ENTRIES + ex
                col = tl.load(xi_ptr + xbin)
                cx, cxs, cxe = tl.load(xv_ptr + xbin), tl.load(xds_ptr + xbin), tl.load(xde_ptr + xbin)
                v = g * tl.load(image + (r * W1 + col) * C + c, mask=cmask, other=0.0)
                x_start += (cy * cxs) * v
                x_end += (cy * cxe) * v
                y_start += (cys * cx) * v
                y_end += (cye * cx) * v
    base = out_ptr + (k * PH * PW + j) * 4
    tl.store(base + 0, tl.sum(x_start, 0))
    tl.store(base + 1, tl.sum(x_end, 0))
    tl.store(base + 2, tl.sum(y_start, 0))
    tl.store(base + 3, tl.sum(y_end, 0))


def _prepare(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int):
    n, c, h, w = input.shape
    finite, x, y = shared.geometry(rois, spatial_scale, pooled_height, pooled_width, h, w)
    batch = rois[:, 0].detach().long()  # checked by the op: integers in [0, N), even for non-finite boxes
    return finite, batch, [t.contiguous() for t in x], [t.contiguous() for t in y]


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    n, c, h, w = input.shape
    k = rois.shape[0]
    finite, batch, (xi, xv, _, _), (yi, yv, _, _) = _prepare(input, rois, spatial_scale, pooled_height, pooled_width)
    s = shared.integral_image(input)
    out = input.new_empty((k, c, pooled_height, pooled_width), dtype=compute_dtype(input.dtype))
    block = block_c(c)
    launcher(_forward_kernel)[(k, pooled_height * pooled_width, triton.cdiv(c, block))](
        s, batch, xi, xv, yi, yv, out, c, h + 1, w + 1, pooled_height, pooled_width,
        ENTRIES=shared.ENTRIES, BLOCK_C=block)
    out = torch.where(finite[:, None, None, None], out, torch.full_like(out, math.nan))
    return out.to(input.dtype)


def backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             channels_last: bool, want_input: bool = True, want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, box gradient ``[K, 5]``); one not wanted is zeros."""
    n, c, h, w = input.shape
    k, bins = rois.shape[0], pooled_height * pooled_width
    finite, batch, x, y = _prepare(input, rois, spatial_scale, pooled_height, pooled_width)
    grad_t = grad.detach().to(compute_dtype(grad.dtype)).permute(0, 2, 3, 1).contiguous()  # [K, PH, PW, C]
    block = block_c(c)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_input = torch.zeros_like(input, memory_format=memory_format)
    if want_input:
        (xi, xv, _, _), (yi, yv, _, _) = x, y
        coef = (yv[:, :, None, :, None] * xv[:, None, :, None, :]).reshape(-1)  # [K, PH, PW, 6, 6]
        target = ((batch[:, None, None, None, None] * (h + 1) + yi[:, :, None, :, None]) * (w + 1)
                  + xi[:, None, :, None, :]).reshape(-1)
        source = torch.arange(k * bins, device=input.device).view(k, pooled_height, pooled_width, 1, 1)
        source = source.expand(k, pooled_height, pooled_width, shared.ENTRIES, shared.ENTRIES).reshape(-1)
        keep = (coef != 0) & finite.repeat_interleave(bins * shared.ENTRIES * shared.ENTRIES)
        target, order = torch.sort(target[keep], stable=True)
        coef, source = coef[keep][order].contiguous(), source[keep][order].contiguous()
        targets, counts = torch.unique_consecutive(target, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        grad_s = torch.zeros((n * (h + 1) * (w + 1), c), dtype=torch.float64, device=input.device)
        if targets.numel():
            launcher(_backward_input_kernel)[(targets.numel(), triton.cdiv(c, block))](
                grad_t, source, coef, starts, counts, targets, grad_s, c, BLOCK_C=block)
        grad_feat = shared.suffix_image(grad_s.view(n, h + 1, w + 1, c))
        grad_input.copy_(grad_feat.permute(0, 3, 1, 2))
    if not want_rois:
        return grad_input, rois.new_zeros(rois.shape)
    s = shared.integral_image(input)
    partial = torch.zeros((k, pooled_height, pooled_width, 4), dtype=torch.float64, device=input.device)
    launcher(_backward_rois_kernel)[(k, bins)](
        s, grad_t, batch, *x, *y, partial, c, h + 1, w + 1, pooled_height, pooled_width,
        ENTRIES=shared.ENTRIES, BLOCK_C=block)
    grad_rois = shared.box_gradient(rois, spatial_scale, finite, partial[..., 0].sum(1), partial[..., 1].sum(1),
                                    partial[..., 2].sum(2), partial[..., 3].sum(2))
    return grad_input, grad_rois.to(rois.dtype)
