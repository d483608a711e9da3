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
the winning sample's position. Boxes and channels are processed in chunks (and a box with more
samples than that in windows of them) that keep every temporary under ``_BUDGET`` elements; the
maps are read where they are, never copied per box.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .common import compute_dtype

_BUDGET = 1 << 22  # elements of the largest gathered block
_TEMPORARIES = 8  # tensors of a window's size made at once (corners, weights, terms)
_BOX_BLOCK = 256  # boxes whose tables are built together, before any split
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


class _Span(NamedTuple):
    """Which samples of each bin along one axis are kept, before any table is built."""

    base: Tensor  # [B, P] where each bin starts
    bin_size: Tensor  # [B]
    grid: Tensor  # [B] samples per bin (float64)
    first: Tensor  # [B, P] first kept sample (float64)
    count: Tensor  # [B, P] kept samples (float64)
    clamped: Tensor  # [B] an unaligned box shorter than one pixel, stretched to one
    finite: Tensor  # [B]


def _span(start: Tensor, end: Tensor, size: int, pooled: int, sampling_ratio: int, aligned: bool) -> _Span:
    """The kept samples of every bin along one axis of boxes spanning ``[start, end]`` (scaled
    and shifted): ``[B, P]`` numbers only, so that a block's tables can be sized first."""
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
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
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
    return _Span(base, bin_size, grid, first, count, clamped, finite)


def _axis(start: Tensor, end: Tensor, size: int, pooled: int, sampling_ratio: int, aligned: bool) -> tuple[_Axis, Tensor]:
    """The samples along one axis of boxes spanning ``[start, end]`` (scaled and shifted), and
    whether each box's geometry is finite."""
    dtype, device = start.dtype, start.device
    base, bin_size, grid, first, count, clamped, finite = _span(start, end, size, pooled, sampling_ratio, aligned)
    p = torch.arange(pooled, device=device, dtype=dtype)
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


def _window(planes: Tensor, batch: Tensor, channels: Tensor, ys: _Axis, xs: _Axis, width: int,
            onnx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The winning sample of every bin among the samples ``ys`` x ``xs`` (a window of them):
    its value ([B, C, PH, PW], -inf where the window has no real sample), its row and column
    in the window, and for ``onnx`` its chosen corner."""
    bsz, ph, sy = ys.low.shape
    pw, sx = xs.low.shape[1:]
    c = channels.shape[0]

    def grid2(ya: Tensor, xa: Tensor) -> Tensor:  # [B, PH, Sy] x [B, PW, Sx] -> [B, PH, PW, Sy, Sx]
        return ya[:, :, None, :, None] * xa[:, None, :, None, :]

    def gather(rows: Tensor, cols: Tensor) -> Tensor:  # -> [B, C, PH, PW, Sy, Sx]
        index = (rows[:, :, None, :, None] * width + cols[:, None, :, None, :]).flatten(1)
        return planes[batch[:, None, None], channels[None, :, None], index[:, None, :]].view(bsz, c, ph, pw, sy, sx)

    f = [gather(ys.low, xs.low), gather(ys.low, xs.high), gather(ys.high, xs.low), gather(ys.high, xs.high)]
    ly, lx = ys.frac, xs.frac
    hy, hx = 1 - ly, 1 - lx
    weights = [grid2(hy, hx), grid2(hy, lx), grid2(ly, hx), grid2(ly, lx)]  # [B, PH, PW, Sy, Sx]
    inside = ys.inside[:, :, None, :, None] & xs.inside[:, None, :, None, :]
    real = ys.real[:, :, None, :, None] & xs.real[:, None, :, None, :]
    terms = [wt[:, None] * fi for wt, fi in zip(weights, f)]
    corner = None
    if onnx:
        stacked = torch.stack(terms)  # [4, B, C, PH, PW, Sy, Sx]
        corner = stacked.argmax(0, keepdim=True)  # the first corner wins a tie
        value = stacked.gather(0, corner)[0]
        corner = corner[0].flatten(4)
    else:
        value = terms[0] + terms[1] + terms[2] + terms[3]
    value = torch.where(inside[:, None], value, torch.zeros_like(value))
    value = torch.where(real[:, None], value, torch.full_like(value, -math.inf))
    flat = value.flatten(4)  # [B, C, PH, PW, Sy*Sx], row-major within the bin
    arg = flat.argmax(-1, keepdim=True)  # documented: the first of equal maxima
    return (flat.gather(-1, arg)[..., 0], arg[..., 0] // sx, arg[..., 0] % sx,
            None if corner is None else corner.gather(-1, arg)[..., 0])


def _beats(value: Tensor, at: Tensor, best: Tensor, best_at: Tensor) -> Tensor:
    """Where a window's winner beats the winner so far: as ``argmax`` over all the samples would
    choose (NaN first, then the larger value, then the first in row-major order ``at``)."""
    nan, best_nan = value.isnan(), best.isnan()
    same = (value == best) | (nan & best_nan)
    return (nan & ~best_nan) | (value > best) | (same & (at < best_at))


def _gradients(planes: Tensor, batch: Tensor, channels: Tensor, ys: _Axis, xs: _Axis, iy: Tensor, ix: Tensor,
               corner: Tensor | None, live: Tensor, grad: Tensor, grad_input: Tensor, n_channels: int,
               width: int) -> Tensor:
    """Adds the winners' input gradient to ``grad_input`` (flat, [N * C * H * W]) and returns the
    box gradient ([B, 4], d/d (x1, y1, x2, y2) in scaled pixels) of channels ``channels``; ``iy``
    and ``ix`` ([B, C, PH, PW]) are the winning samples' places in ``ys`` and ``xs``."""
    bsz, c, ph, pw = iy.shape
    device = planes.device
    ph_i = torch.arange(ph, device=device)[None, None, :, None].expand_as(iy)
    pw_i = torch.arange(pw, device=device)[None, None, None, :].expand_as(ix)
    b_i = torch.arange(bsz, device=device)[:, None, None, None].expand_as(iy)

    def at_y(t: Tensor) -> Tensor:
        return t[b_i, ph_i, iy]

    def at_x(t: Tensor) -> Tensor:
        return t[b_i, pw_i, ix]

    g = torch.where(live & at_y(ys.inside) & at_x(xs.inside), grad, torch.zeros_like(grad))
    y_low, y_high, y_frac = at_y(ys.low), at_y(ys.high), at_y(ys.frac)
    x_low, x_high, x_frac = at_x(xs.low), at_x(xs.high), at_x(xs.frac)
    image, channel = batch[:, None, None, None], channels[None, :, None, None]
    fv = [planes[image, channel, row * width + col]
          for row, col in ((y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high))]
    hy_, ly_, hx_, lx_ = 1 - y_frac, y_frac, 1 - x_frac, x_frac
    taps = [(y_low, x_low, hy_ * hx_), (y_low, x_high, hy_ * lx_), (y_high, x_low, ly_ * hx_),
            (y_high, x_high, ly_ * lx_)]
    # d weight / d y and d x of each corner, in the corner order above.
    d_w = [(-hx_, -hy_), (-lx_, hy_), (hx_, -ly_), (lx_, ly_)]
    if corner is not None:
        d_y = torch.zeros_like(g)
        d_x = torch.zeros_like(g)
        for q, ((dwy, dwx), fq) in enumerate(zip(d_w, fv)):
            sel = corner == q
            d_y = torch.where(sel, dwy * fq, d_y)
            d_x = torch.where(sel, dwx * fq, d_x)
    else:
        d_y = hx_ * (fv[2] - fv[0]) + lx_ * (fv[3] - fv[1])
        d_x = hy_ * (fv[1] - fv[0]) + ly_ * (fv[3] - fv[2])
    d_y = torch.where(at_y(ys.moves), d_y, torch.zeros_like(d_y))
    d_x = torch.where(at_x(xs.moves), d_x, torch.zeros_like(d_x))

    # Input gradient: a fixed order of index_add_ calls (deterministic on the CPU).
    plane = (image * n_channels + channel) * planes.shape[2]
    for q, (r, col, wt) in enumerate(taps):
        weight = wt if corner is None else torch.where(corner == q, wt, torch.zeros_like(wt))
        grad_input.index_add_(0, (plane + r * width + col).flatten(), (g * weight).flatten().to(grad_input.dtype))

    gy, gx = g * d_y, g * d_x
    dy1 = (gy * at_y(ys.d_start)).sum((1, 2, 3))
    dy2 = (gy * at_y(ys.d_end)).sum((1, 2, 3))
    dx1 = (gx * at_x(xs.d_start)).sum((1, 2, 3))
    dx2 = (gx * at_x(xs.d_end)).sum((1, 2, 3))
    return torch.stack((dx1, dy1, dx2, dy2), 1)


def _run(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
         sampling_ratio: int, aligned: bool, onnx: bool, grad: Tensor | None):
    """Max pooling (and with ``grad`` its gradients) in blocks of boxes, then of channels; a box
    whose samples alone exceed the budget is taken in windows of its sample rows and columns,
    the winner carried from window to window. A block's tables are sized from its sample counts
    before they are built."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    device = input.device
    r = rois.detach().to(dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * spatial_scale - offset for i in range(1, 5))
    batch = r[:, 0].long().clamp(0, max(n - 1, 0))
    planes = input.detach().to(dtype).reshape(n, c, h * w)
    out = torch.empty((k, c, pooled_height, pooled_width), dtype=dtype, device=device)
    grad_input = torch.zeros((n * c * h * w,), dtype=dtype, device=device) if grad is not None else None
    grad_rois = torch.zeros((k, 4), dtype=dtype, device=device) if grad is not None else None
    bins = pooled_height * pooled_width
    y_counts = _span(y1, y2, h, pooled_height, sampling_ratio, aligned).count.amax(1)  # [K]
    x_counts = _span(x1, x2, w, pooled_width, sampling_ratio, aligned).count.amax(1)

    def block(a: int, b: int) -> None:
        sy, sx = max(int(y_counts[a:b].max().item()), 1), max(int(x_counts[a:b].max().item()), 1)
        if b - a > 1 and (b - a) * bins * sy * sx * c * _TEMPORARIES > _BUDGET:
            mid = (a + b) // 2
            block(a, mid)
            block(mid, b)
            return
        ys, fin_y = _axis(y1[a:b], y2[a:b], h, pooled_height, sampling_ratio, aligned)
        xs, fin_x = _axis(x1[a:b], x2[a:b], w, pooled_width, sampling_ratio, aligned)
        finite = fin_y & fin_x
        sy, sx = ys.low.shape[2], xs.low.shape[2]
        wy, wx = max(sy, 1), max(sx, 1)
        while bins * wy * wx * _TEMPORARIES > _BUDGET and wy * wx > 1:
            wy, wx = (wy, (wx + 1) // 2) if wx >= wy else ((wy + 1) // 2, wx)
        step = max(1, _BUDGET // (bins * wy * wx * _TEMPORARIES * (b - a)))
        for c0 in range(0, c, step):
            channels = torch.arange(c0, min(c, c0 + step), device=device)
            shape = (b - a, channels.shape[0], pooled_height, pooled_width)
            best = torch.full(shape, -math.inf, dtype=dtype, device=device)
            iy = torch.zeros(shape, dtype=torch.long, device=device)
            ix, corner = torch.zeros_like(iy), (torch.zeros_like(iy) if onnx else None)
            for y0 in range(0, sy, wy):
                for x0 in range(0, sx, wx):
                    win_y = _Axis(*(f[:, :, y0:y0 + wy] for f in ys))
                    win_x = _Axis(*(f[:, :, x0:x0 + wx] for f in xs))
                    value, wiy, wix, wcorner = _window(planes, batch[a:b], channels, win_y, win_x, w, onnx)
                    wiy, wix = wiy + y0, wix + x0
                    take = _beats(value, wiy * sx + wix, best, iy * sx + ix)
                    best = torch.where(take, value, best)
                    iy, ix = torch.where(take, wiy, iy), torch.where(take, wix, ix)
                    if onnx:
                        corner = torch.where(take, wcorner, corner)
            empty = best == -math.inf
            value = torch.where(empty, torch.zeros_like(best), best)
            out[a:b, c0:c0 + shape[1]] = torch.where(finite[:, None, None, None], value, torch.full_like(value, math.nan))
            if grad is not None and sy and sx:
                grad_rois[a:b] += _gradients(planes, batch[a:b], channels, ys, xs, iy, ix, corner, ~empty,
                                             grad[a:b, c0:c0 + shape[1]].to(dtype), grad_input, c, w)
        if grad is not None:
            grad_rois[a:b] = torch.where(finite[:, None], grad_rois[a:b], torch.full_like(grad_rois[a:b], math.nan))

    for a in range(0, k, _BOX_BLOCK):
        block(a, min(k, a + _BOX_BLOCK))
    return out, (grad_input.view(n, c, h * w) if grad_input is not None else None), grad_rois


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
