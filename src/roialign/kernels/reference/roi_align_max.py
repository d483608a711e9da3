"""Max-mode RoIAlign in pure PyTorch: vectorised tensor operations that run on any device.

A bin's value is the largest of its samples' values (``mode="max"``, mmcv's reading: the
bilinear value; ``mode="onnx_max"``, the ONNX reference's: the largest of the four weighted
corner terms). Unlike the average, a maximum cannot be split into row and column taps, so every
sample of a bin is gathered. A sample outside ``[-1, H] x [-1, W]`` has value 0 and takes part,
so along each axis the samples that can land on the map are kept plus one more on each side:
one outside sample stands for all those on its side (they all have value 0, no gradient, and
the same place before or after the others in row-major order, which decides ties). So a huge
box costs no more than the image. The first sample in row-major order wins a tie, and the
first corner for ``onnx_max``; a bin without samples is 0.

Gradients are explicit: the winning sample's four pixels get the output gradient times their
bilinear weights (for ``onnx_max``, the chosen corner only), and the box gets the derivative of
the winning sample's position. Boxes and channels are processed in chunks that keep every
temporary under ``_BUDGET`` elements.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .common import compute_dtype

_BUDGET = 1 << 22  # elements of the largest gathered block
_MAX_GRID = float(2**52)


class _Axis(NamedTuple):
    """Samples of every bin along one axis, ``[boxes, pooled, samples]``."""

    low: Tensor  # int64 pixel of the low tap (0 for samples off the map)
    high: Tensor  # int64 pixel of the high tap
    frac: Tensor  # weight of the high tap
    inside: Tensor  # the sample is real and lands in [-1, size]
    real: Tensor  # the sample exists (not padding)
    moves: Tensor  # d position moves the interpolation (not clamped, not on the last pixel)
    d_start: Tensor  # d position / d (scaled box start)
    d_end: Tensor  # d position / d (scaled box end)


def _axis(start: Tensor, end: Tensor, size: int, pooled: int, sampling_ratio: int, aligned: bool) -> tuple[_Axis, Tensor]:
    """The samples along one axis of boxes spanning ``[start, end]`` (scaled and shifted), and
    whether each box's geometry is finite."""
    dtype, device = start.dtype, start.device
    length = end - start
    clamped = torch.zeros_like(length, dtype=torch.bool) if aligned else length < 1
    length = torch.where(clamped, torch.ones_like(length), length)
    finite = torch.isfinite(start) & torch.isfinite(end) & torch.isfinite(length)
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(length, sampling_ratio, dtype=torch.float64)
    else:
        grid = torch.ceil(bin_size).double().clamp(0, _MAX_GRID)
    grid = torch.where(finite, grid, torch.zeros_like(grid))
    p = torch.arange(pooled, device=device, dtype=dtype)
    base = start[:, None] + p * bin_size[:, None]  # [B, P]
    # Indices that can land in [-1, size], plus one spare for rounding and one outside
    # representative on each side.
    step = bin_size.double()[:, None] / grid.clamp(min=1)[:, None]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    a = torch.ceil((-1 - base.double()) / safe - 0.5)
    b = torch.floor((size - base.double()) / safe - 0.5)
    g = grid[:, None].expand_as(a)
    first = torch.where(step > 0, (a - 2).clamp(min=0), torch.zeros_like(a))
    last = torch.where(step > 0, (b + 3).clamp(min=0), g)
    first = torch.minimum(first, g).nan_to_num(0.0)
    last = torch.minimum(last, g).nan_to_num(0.0)
    count = (last - first).clamp(min=0)
    n = int(count.max().item()) if count.numel() else 0
    i = first[..., None] + torch.arange(n, device=device, dtype=torch.float64)  # [B, P, S]
    real = torch.arange(n, device=device) < count[..., None]
    gridc = grid.to(dtype).clamp(min=1)[:, None, None]
    pos = base[..., None] + (i.to(dtype) + 0.5) * bin_size[:, None, None] / gridc  # the published order
    inside = real & (pos >= -1) & (pos <= size)
    pos = torch.where(inside, pos.clamp(min=0), torch.zeros_like(pos))
    low = pos.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low.to(dtype))
    moves = inside & ~edge & (pos > 0)
    t = (p[:, None] + (i.to(dtype) + 0.5) / gridc) / pooled  # the sample's place in the box, 0..1
    fixed = clamped[:, None, None]
    d_start = torch.where(fixed, torch.ones_like(t), 1 - t)
    d_end = torch.where(fixed, torch.zeros_like(t), t)
    return _Axis(low, high, frac, inside, real, moves, d_start, d_end), finite


class _Chunk(NamedTuple):
    out: Tensor  # [B, C, PH, PW]
    grad_rois: Tensor | None  # [B, 4] d/d (x1, y1, x2, y2) in scaled pixels


def _chunk(feat: Tensor, ys: _Axis, xs: _Axis, onnx: bool, grad: Tensor | None, grad_input: Tensor | None,
           batch: Tensor) -> _Chunk:
    """Max pooling of boxes ``feat`` ([B, C, H, W], each box's image, compute dtype); with ``grad``
    ([B, C, PH, PW]) also accumulates into ``grad_input`` ([N, C, H*W]) and returns box gradients."""
    bsz, c, h, w = feat.shape
    ph, sy = ys.low.shape[1:]
    pw, sx = xs.low.shape[1:]
    dtype = feat.dtype

    def grid2(ya: Tensor, xa: Tensor) -> Tensor:  # [B, PH, Sy] x [B, PW, Sx] -> [B, PH, PW, Sy, Sx]
        return ya[:, :, None, :, None] * xa[:, None, :, None, :]

    plane = feat.flatten(2)  # [B, C, H*W]

    def gather(rows: Tensor, cols: Tensor) -> Tensor:  # -> [B, C, PH, PW, Sy, Sx]
        index = (rows[:, :, None, :, None] * w + cols[:, None, :, None, :]).flatten(1)
        return plane.gather(2, index[:, None, :].expand(bsz, c, -1)).view(bsz, c, ph, pw, sy, sx)

    f = [gather(ys.low, xs.low), gather(ys.low, xs.high), gather(ys.high, xs.low), gather(ys.high, xs.high)]
    ly, lx = ys.frac, xs.frac
    hy, hx = 1 - ly, 1 - lx
    weights = [grid2(hy, hx), grid2(hy, lx), grid2(ly, hx), grid2(ly, lx)]  # [B, PH, PW, Sy, Sx]
    inside = ys.inside[:, :, None, :, None] & xs.inside[:, None, :, None, :]
    real = ys.real[:, :, None, :, None] & xs.real[:, None, :, None, :]
    terms = [wt[:, None] * fi for wt, fi in zip(weights, f)]
    if onnx:
        stacked = torch.stack(terms)  # [4, B, C, PH, PW, Sy, Sx]
        corner = stacked.argmax(0, keepdim=True)  # the first corner wins a tie
        value = stacked.gather(0, corner)[0]
        corner = corner[0]
    else:
        value = terms[0] + terms[1] + terms[2] + terms[3]
        corner = None
    value = torch.where(inside[:, None], value, torch.zeros_like(value))
    value = torch.where(real[:, None], value, torch.full_like(value, -math.inf))
    flat = value.flatten(4)  # [B, C, PH, PW, Sy*Sx], row-major within the bin
    if flat.shape[-1] == 0:
        return _Chunk(feat.new_zeros((bsz, c, ph, pw)), feat.new_zeros((bsz, 4)) if grad is not None else None)
    arg = flat.argmax(-1, keepdim=True)  # documented: the first of equal maxima
    best = flat.gather(-1, arg)[..., 0]
    empty = best == -math.inf
    out = torch.where(empty, torch.zeros_like(best), best)
    if grad is None:
        return _Chunk(out, None)

    def pick(t: Tensor) -> Tensor:  # a [B, C, PH, PW, Sy, Sx] (or broadcastable) tensor at the winner
        return t.expand(bsz, c, ph, pw, sy, sx).flatten(4).gather(-1, arg)[..., 0]

    iy, ix = arg[..., 0] // sx, arg[..., 0] % sx  # [B, C, PH, PW]
    live = pick(inside[:, None]) & ~empty
    g = torch.where(live, grad.to(dtype), torch.zeros_like(out))
    ph_i = torch.arange(ph, device=feat.device)[None, None, :, None].expand_as(iy)
    pw_i = torch.arange(pw, device=feat.device)[None, None, None, :].expand_as(ix)
    b_i = torch.arange(bsz, device=feat.device)[:, None, None, None].expand_as(iy)

    def at_y(t: Tensor) -> Tensor:
        return t[b_i, ph_i, iy]

    def at_x(t: Tensor) -> Tensor:
        return t[b_i, pw_i, ix]

    y_low, y_high, y_frac = at_y(ys.low), at_y(ys.high), at_y(ys.frac)
    x_low, x_high, x_frac = at_x(xs.low), at_x(xs.high), at_x(xs.frac)
    fv = [pick(fi) for fi in f]
    hy_, ly_, hx_, lx_ = 1 - y_frac, y_frac, 1 - x_frac, x_frac
    taps = [(y_low, x_low, hy_ * hx_), (y_low, x_high, hy_ * lx_), (y_high, x_low, ly_ * hx_),
            (y_high, x_high, ly_ * lx_)]
    # d weight / d y and d x of each corner, in the corner order above.
    d_w = [(-hx_, -hy_), (-lx_, hy_), (hx_, -ly_), (lx_, ly_)]
    if onnx:
        chosen = pick(corner)
        d_y = torch.zeros_like(out)
        d_x = torch.zeros_like(out)
        for q, ((dwy, dwx), fq) in enumerate(zip(d_w, fv)):
            sel = chosen == q
            d_y = torch.where(sel, dwy * fq, d_y)
            d_x = torch.where(sel, dwx * fq, d_x)
    else:
        chosen = None
        d_y = hx_ * (fv[2] - fv[0]) + lx_ * (fv[3] - fv[1])
        d_x = hy_ * (fv[1] - fv[0]) + ly_ * (fv[3] - fv[2])
    d_y = torch.where(at_y(ys.moves), d_y, torch.zeros_like(d_y))
    d_x = torch.where(at_x(xs.moves), d_x, torch.zeros_like(d_x))

    # Input gradient: a fixed order of index_add_ calls (deterministic on the CPU).
    n_img = grad_input.shape[0]
    base = (batch[:, None, None, None] * c + torch.arange(c, device=feat.device)[None, :, None, None]) * (h * w)
    target = grad_input.view(n_img * c * h * w)
    for q, (r, col, wt) in enumerate(taps):
        weight = wt if chosen is None else torch.where(chosen == q, wt, torch.zeros_like(wt))
        target.index_add_(0, (base + r * w + col).flatten(), (g * weight).flatten().to(target.dtype))

    gy, gx = g * d_y, g * d_x
    dy1 = (gy * at_y(ys.d_start)).sum((1, 2, 3))
    dy2 = (gy * at_y(ys.d_end)).sum((1, 2, 3))
    dx1 = (gx * at_x(xs.d_start)).sum((1, 2, 3))
    dx2 = (gx * at_x(xs.d_end)).sum((1, 2, 3))
    return _Chunk(out, torch.stack((dx1, dy1, dx2, dy2), 1))


def _run(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
         sampling_ratio: int, aligned: bool, onnx: bool, grad: Tensor | None):
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    r = rois.detach().to(dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * spatial_scale - offset for i in range(1, 5))
    batch = r[:, 0].long().clamp(0, max(n - 1, 0))
    feat_all = input.detach().to(dtype)
    out = torch.empty((k, c, pooled_height, pooled_width), dtype=dtype, device=input.device)
    grad_input = torch.zeros((n, c, h * w), dtype=dtype, device=input.device) if grad is not None else None
    grad_rois = torch.zeros((k, 4), dtype=dtype, device=input.device) if grad is not None else None
    lo = 0
    while lo < k:
        hi = min(k, lo + 256)
        ys, fin_y = _axis(y1[lo:hi], y2[lo:hi], h, pooled_height, sampling_ratio, aligned)
        xs, fin_x = _axis(x1[lo:hi], x2[lo:hi], w, pooled_width, sampling_ratio, aligned)
        per_box = max(1, c * pooled_height * pooled_width * ys.low.shape[2] * xs.low.shape[2] * 8)
        step = max(1, _BUDGET // per_box)
        if step < hi - lo:
            hi = lo + step
            ys, fin_y = _axis(y1[lo:hi], y2[lo:hi], h, pooled_height, sampling_ratio, aligned)
            xs, fin_x = _axis(x1[lo:hi], x2[lo:hi], w, pooled_width, sampling_ratio, aligned)
        finite = fin_y & fin_x
        chunk = _chunk(feat_all[batch[lo:hi]], ys, xs, onnx, None if grad is None else grad[lo:hi].to(dtype),
                       grad_input, batch[lo:hi])
        out[lo:hi] = torch.where(finite[:, None, None, None], chunk.out, torch.full_like(chunk.out, math.nan))
        if grad is not None:
            grad_rois[lo:hi] = torch.where(finite[:, None], chunk.grad_rois, torch.full_like(chunk.grad_rois, math.nan))
        lo = hi
    return out, grad_input, grad_rois


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, onnx: bool) -> Tensor:
    out, _, _ = _run(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, onnx, None)
    return out.to(input.dtype)


def backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             sampling_ratio: int, aligned: bool, onnx: bool, channels_last: bool, want_input: bool = True,
             want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, box gradient ``[K, 5]``); both are computed together
    here, and one not wanted is returned as zeros, as the other kernels do."""
    n, c, h, w = input.shape
    _, grad_input, grad_rois = _run(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                    onnx, grad)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_input = grad_input.view(n, c, h, w).to(input.dtype, memory_format=memory_format)
    grad_rois = torch.cat((torch.zeros_like(grad_rois[:, :1]), grad_rois * spatial_scale), 1).to(rois.dtype)
    if not want_input:
        grad_input = torch.zeros_like(grad_input)
    if not want_rois:
        grad_rois = torch.zeros_like(grad_rois)
    return grad_input, grad_rois
