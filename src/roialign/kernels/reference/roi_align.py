"""RoIAlign in pure PyTorch: vectorised tensor operations that run on any device.

This is the fallback for devices without a fast kernel, not the test oracle. The bilinear
sample of RoIAlign is separable: a sample at (y, x) reads rows ``y_low, y_high`` with weights
``(1 - ly, ly)`` and columns ``x_low, x_high`` with ``(1 - lx, lx)``, and its validity test
(``-1 <= y <= H`` and ``-1 <= x <= W``) is a product of a row test and a column test. So each
axis is reduced on its own to a list of *taps* (a pixel index and a weight) per output bin,
and a bin's value is the sum over row taps x column taps of ``wy * wx * feature``. Only the
samples that can land inside ``[-1, H]`` are generated, so a huge box costs no more than the
image it covers. Work is done in chunks of boxes and channels (and, for a box with more taps
than that, windows of its taps) so that no temporary grows beyond ``_BUDGET`` elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .common import compute_dtype

_BUDGET = 1 << 22  # elements of the largest gathered block
_BOX_BLOCK = 1024  # boxes whose geometry is built together, before any split
_MAX_GRID = float(2**52)  # adaptive sample counts are capped where float64 stops being exact


def row_span(rois: Tensor, spatial_scale: float, aligned: bool, height: int) -> Tensor:
    """[K, 2] int64: the first and last feature row that any tap of each box can touch.

    A conservative bound, used to skip boxes when the input gradient is accumulated in bands of
    rows. Sample positions are computed in float32 for float32 input, so a box whose corners
    are of magnitude M can place samples about 1e-6 * M outside its exact extent: the margin
    grows with M. Non-finite boxes span every row (they contribute nothing anyway).
    """
    offset = 0.5 if aligned else 0.0
    y = rois[:, 2:5:2].double() * spatial_scale - offset  # y1, y2
    lo = torch.minimum(y[:, 0], y[:, 1])
    hi = torch.maximum(y[:, 0], torch.maximum(y[:, 1], y[:, 0] + 1))  # unaligned boxes are >= 1 high
    margin = 2 + 4e-6 * y.abs().sum(1)
    first = (lo - margin).floor().nan_to_num(0.0)
    last = (hi + margin).ceil().nan_to_num(float(height))
    return torch.stack((first, last), 1).clamp(0, max(height - 1, 0)).long()


class AxisTaps(NamedTuple):
    """The row (or column) taps of every output bin of a chunk of boxes along one axis.

    Shapes are ``[boxes, pooled, taps]``; padding taps have index 0 and weight 0.
    """

    index: Tensor  # pixel index, always inside [0, size)
    weight: Tensor  # interpolation weight, 0 for samples outside [-1, size]
    d_start: Tensor  # d weight / d (scaled box start along this axis)
    d_end: Tensor  # d weight / d (scaled box end along this axis)
    grid: Tensor  # [boxes] samples per bin along this axis (float64)
    finite: Tensor  # [boxes] box coordinates and size are finite

    def window(self, start: int, stop: int) -> AxisTaps:
        """Taps ``start:stop`` of every bin (a bin's value is a sum over its taps, so windows add)."""
        if start == 0 and stop >= self.index.shape[-1]:
            return self
        return AxisTaps(*(f[..., start:stop] for f in self[:4]), self.grid, self.finite)


class AxisSamples(NamedTuple):
    """Which samples of each bin along one axis can land on the map, before any tap is built.

    ``[boxes]`` or ``[boxes, pooled]``; bin ``p``'s candidate samples are ``first[b, p] + i`` for
    ``i`` in ``[0, count[b, p])``.
    """

    base: Tensor  # [B, P] where each bin starts (compute dtype)
    bin_size: Tensor  # [B] (compute dtype)
    grid: Tensor  # [B] samples per bin along this axis (float64)
    first: Tensor  # [B, P] (float64)
    count: Tensor  # [B, P] (float64)
    clamped: Tensor  # [B] an unaligned box shorter than one pixel, stretched to one
    finite: Tensor  # [B] box coordinates and size are finite

    def rows(self, a: int, b: int) -> AxisSamples:
        """Boxes ``a:b`` of this block."""
        return AxisSamples(*(field[a:b] for field in self))

    def taps(self) -> int:
        """Taps per bin of the block's tables (two per candidate sample)."""
        return 2 * int(self.count.max().item()) if self.count.numel() else 0


def axis_samples(start: Tensor, end: Tensor, size: int, pooled: int, sampling_ratio: int,
                 aligned: bool) -> AxisSamples:
    """The candidate samples of boxes spanning ``[start, end]`` in feature-map pixels (already
    scaled and shifted by the ``aligned`` offset): ``[B, P]`` numbers only, so that a block's
    tables can be sized before they are made."""
    length = end - start
    if aligned:
        clamped = torch.zeros_like(length, dtype=torch.bool)
    else:
        clamped = length < 1
        length = torch.where(clamped, torch.ones_like(length), length)
    finite = torch.isfinite(start) & torch.isfinite(end) & torch.isfinite(length)
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(length, sampling_ratio, dtype=torch.float64)
    else:
        grid = torch.ceil(bin_size).double().clamp(0, _MAX_GRID)
    grid = torch.where(finite, grid, torch.zeros_like(grid))

    # Samples of bin p sit at base + (i + 0.5) * step, i in [0, grid). Keep those that can fall
    # in [-1, size] (one spare each side; the exact test in axis_taps decides), so that a box far
    # larger than the image costs no more than the image.
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    base = start[:, None] + p * bin_size[:, None]  # [B, P]
    step = bin_size.double()[:, None] / grid.clamp(min=1)[:, None]
    safe_step = torch.where(step == 0, torch.ones_like(step), step)
    a = (-1 - base.double()) / safe_step - 0.5
    b = (size - base.double()) / safe_step - 0.5
    lo = torch.where(step > 0, torch.ceil(a), torch.ceil(b))
    hi = torch.where(step > 0, torch.floor(b), torch.floor(a))
    every = step == 0
    lo = torch.where(every, torch.zeros_like(lo), lo)
    hi = torch.where(every, grid[:, None] - 1, hi)
    g = grid[:, None].expand_as(lo)
    first = torch.minimum(torch.maximum(lo - 1, torch.zeros_like(lo)), g)
    last = torch.minimum(torch.maximum(hi + 2, torch.zeros_like(hi)), g)
    first = torch.nan_to_num(first, nan=0.0)
    count = torch.nan_to_num((last - first).clamp(min=0), nan=0.0)
    return AxisSamples(base, bin_size, grid, first, count, clamped, finite)


def axis_taps(s: AxisSamples, size: int) -> AxisTaps:
    """The taps of the candidate samples ``s`` along an axis of ``size`` pixels: ``[B, P, 2S]``,
    S the most candidates of any bin of the block."""
    dtype, device = s.base.dtype, s.base.device
    pooled = s.base.shape[1]
    n_samples = s.taps() // 2
    p = torch.arange(pooled, device=device, dtype=dtype)
    i = s.first[..., None] + torch.arange(n_samples, device=device, dtype=torch.float64)  # [B, P, S]
    real = torch.arange(n_samples, device=device) < s.count[..., None]
    gridc = s.grid.to(dtype).clamp(min=1)[:, None, None]
    # Same operation order as the published kernels: base + ((i + 0.5) * bin) / grid.
    pos = s.base[..., None] + (i.to(dtype) + 0.5) * s.bin_size[:, None, None] / gridc
    inside = real & (pos >= -1) & (pos <= size)
    pos = torch.where(inside, pos.clamp(min=0), torch.zeros_like(pos))
    low = pos.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low.to(dtype))
    keep = inside.to(dtype)

    # d pos / d start and d pos / d end, holding the sample count fixed.
    clamped = s.clamped[:, None, None]
    t = (p[:, None] + (i.to(dtype) + 0.5) / gridc) / pooled
    t = torch.where(clamped, torch.zeros_like(t), t)
    dpos_start = torch.where(clamped, torch.ones_like(t), 1 - t)
    dfrac = (inside & ~edge & (pos > 0)).to(dtype)

    def taps(lo_part: Tensor, hi_part: Tensor) -> Tensor:
        return torch.stack((lo_part, hi_part), dim=-1).flatten(-2)

    return AxisTaps(
        index=taps(low, high),
        weight=taps((1 - frac) * keep, frac * keep),
        d_start=taps(-dfrac * dpos_start, dfrac * dpos_start),
        d_end=taps(-dfrac * t, dfrac * t),
        grid=s.grid,
        finite=s.finite,
    )


class Chunk(NamedTuple):
    boxes: slice
    channels: slice
    batch: Tensor  # [B] image index of each box, clamped into range
    ys: AxisTaps
    xs: AxisTaps
    scale: Tensor  # [B] 1 / max(grid_h * grid_w, 1), in the compute dtype
    finite: Tensor  # [B]

    def flat_index(self, width: int) -> Tensor:
        """[B, PH*PW, TY*TX] index into a flattened H*W plane."""
        iy, ix = self.ys.index, self.xs.index
        flat = iy[:, :, None, :, None] * width + ix[:, None, :, None, :]
        return flat.flatten(3).flatten(1, 2)

    def weight(self, wy: Tensor, wx: Tensor) -> Tensor:
        """[B, PH*PW, TY*TX] products of a row weight and a column weight, divided by the count."""
        w = wy[:, :, None, :, None] * wx[:, None, :, None, :]
        return w.flatten(3).flatten(1, 2) * self.scale[:, None, None]


def chunks(rois: Tensor, shape: tuple[int, int, int, int], pooled: tuple[int, int], sampling_ratio: int,
           spatial_scale: float, aligned: bool, dtype: torch.dtype) -> Iterator[Chunk]:
    """Split the work into blocks whose gathered values fit ``_BUDGET`` elements, in order: blocks
    of boxes, then of channels; a box whose taps alone exceed it (a large ``sampling_ratio``) is
    taken in windows of its row and column taps, whose sums add. A block's tap tables are sized
    from its sample counts before they are built, so they stay within the budget too. (Only the
    bins of one box, ``PH * PW`` per channel, are never split: the output holds as many.)"""
    n, c, h, w = shape
    bins = pooled[0] * pooled[1]
    rois = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    coords = rois[:, 1:5] * spatial_scale - offset
    batch = rois[:, 0].nan_to_num(0).clamp(0, max(n - 1, 0)).long()

    def build(a: int, b: int, sy: AxisSamples, sx: AxisSamples) -> Iterator[Chunk]:
        ty, tx = max(sy.taps(), 1), max(sx.taps(), 1)
        if b - a > 1 and (b - a) * bins * ty * tx * c > _BUDGET:
            mid = (b - a) // 2
            yield from build(a, a + mid, sy.rows(0, mid), sx.rows(0, mid))
            yield from build(a + mid, b, sy.rows(mid, b - a), sx.rows(mid, b - a))
            return
        ys, xs = axis_taps(sy, h), axis_taps(sx, w)
        scale = (1.0 / (ys.grid * xs.grid).clamp(min=1)).to(dtype)
        finite = ys.finite & xs.finite
        wy, wx = ty, tx
        while bins * wy * wx > _BUDGET and wy * wx > 1:
            wy, wx = (wy, (wx + 1) // 2) if wx >= wy else ((wy + 1) // 2, wx)
        for y0 in range(0, ty, wy):
            for x0 in range(0, tx, wx):
                yw, xw = ys.window(y0, y0 + wy), xs.window(x0, x0 + wx)
                taps = max(yw.index.shape[-1], 1) * max(xw.index.shape[-1], 1)
                step = max(1, _BUDGET // (bins * taps * (b - a)))
                for c0 in range(0, c, step):
                    yield Chunk(slice(a, b), slice(c0, min(c, c0 + step)), batch[a:b], yw, xw, scale, finite)

    for a in range(0, rois.shape[0], _BOX_BLOCK):
        b = min(rois.shape[0], a + _BOX_BLOCK)
        sy = axis_samples(coords[a:b, 1], coords[a:b, 3], h, pooled[0], sampling_ratio, aligned)
        sx = axis_samples(coords[a:b, 0], coords[a:b, 2], w, pooled[1], sampling_ratio, aligned)
        yield from build(a, b, sy, sx)


def _gather(planes: Tensor, chunk: Chunk, width: int) -> tuple[Tensor, Tensor]:
    """Feature values at every tap of the chunk: ``[B, Cc, PH*PW, TY*TX]`` and the flat index."""
    flat = chunk.flat_index(width)
    channels = torch.arange(chunk.channels.start, chunk.channels.stop, device=planes.device)
    values = planes[chunk.batch[:, None, None], channels[None, :, None], flat.flatten(1)[:, None, :]]
    return values.view(flat.shape[0], len(channels), *flat.shape[1:]), flat


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, channels_last_out: bool | None = None) -> Tensor:
    """(``channels_last_out``, the layout the operator will return, is a hint this kernel does not need.)"""
    n, c, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    out = input.new_zeros((rois.shape[0], c, pooled_height, pooled_width), dtype=dtype)
    planes = input.reshape(n, c, h * w)
    for chunk in chunks(rois, (n, c, h, w), (pooled_height, pooled_width), sampling_ratio, spatial_scale,
                        aligned, dtype):
        values, _ = _gather(planes, chunk, w)
        weight = chunk.weight(chunk.ys.weight, chunk.xs.weight)
        block = torch.einsum("bcpt,bpt->bcp", values.to(dtype), weight)
        block = torch.where(chunk.finite[:, None, None], block, torch.full_like(block, math.nan))
        out[chunk.boxes, chunk.channels] += block.view(block.shape[0], block.shape[1], pooled_height, pooled_width)
    return out.to(input.dtype)


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int,
                   aligned: bool, channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    shape = (batch_size, channels, height, width)
    acc = grad.new_zeros(batch_size * channels * height * width, dtype=dtype)
    grad = grad.reshape(grad.shape[0], channels, pooled_height * pooled_width)
    for chunk in chunks(rois, shape, (pooled_height, pooled_width), sampling_ratio, spatial_scale, aligned, dtype):
        weight = chunk.weight(chunk.ys.weight, chunk.xs.weight) * chunk.finite[:, None, None]
        go = grad[chunk.boxes, chunk.channels].to(dtype)  # [B, Cc, P]
        contrib = go[..., None] * weight[:, None]  # [B, Cc, P, T]
        cidx = torch.arange(chunk.channels.start, chunk.channels.stop, device=grad.device)
        plane = (chunk.batch[:, None] * channels + cidx[None, :]) * (height * width)  # [B, Cc]
        flat = chunk.flat_index(width)
        index = plane[:, :, None, None] + flat[:, None]
        acc.index_add_(0, index.flatten(), contrib.flatten())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return acc.view(shape).to(grad.dtype, memory_format=memory_format)


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    n, c, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    acc = rois.new_zeros((rois.shape[0], 4), dtype=dtype)  # d/d (x1, y1, x2, y2) in feature pixels
    planes = input.reshape(n, c, h * w)
    grad = grad.reshape(grad.shape[0], c, pooled_height * pooled_width)
    for chunk in chunks(rois, (n, c, h, w), (pooled_height, pooled_width), sampling_ratio, spatial_scale,
                        aligned, dtype):
        values, _ = _gather(planes, chunk, w)
        go = grad[chunk.boxes, chunk.channels].to(dtype)
        per_tap = torch.einsum("bcpt,bcp->bpt", values.to(dtype), go)
        ys, xs = chunk.ys, chunk.xs
        parts = (chunk.weight(ys.weight, xs.d_start), chunk.weight(ys.d_start, xs.weight),
                 chunk.weight(ys.weight, xs.d_end), chunk.weight(ys.d_end, xs.weight))
        block = torch.stack([(per_tap * part).sum((1, 2)) for part in parts], dim=1)
        acc[chunk.boxes] += torch.where(chunk.finite[:, None], block, torch.full_like(block, math.nan))
    acc = acc * spatial_scale
    return torch.cat((torch.zeros_like(acc[:, :1]), acc), dim=1).to(rois.dtype)
