"""Rotated RoIAlign in pure PyTorch: vectorised tensor operations that run on any device.

The fallback for devices without a fast kernel. A rotated sample is not separable into a row
and a column, so every sample gets its own four taps. For each bin, only the samples whose
box-local coordinates fall in the map's extent seen from the box (``common.local_extent``)
are generated, so a huge box costs about as much as the map. Boxes (and, for big ones,
channels; for a box whose samples near the map alone exceed the budget, windows of those
samples) are processed in chunks so that no temporary grows beyond ``_BUDGET`` elements.

The box gradient is analytic: each tap weight's derivative with respect to the sample's y
and x, chained to the box's centre, size and angle. A clamped coordinate, a sample on the last
row or column and a sample outside the map carry no derivative (``roi_align``'s conventions),
and the adaptive sample counts are held fixed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .common import adaptive_grid_limit, angle_factor, compute_dtype, local_extent, rotation, sample_range

_BUDGET = 1 << 22  # elements of the largest gathered block
_BOX_BLOCK = 512  # boxes whose geometry is built together, before any split
_UNBOUNDED = 2**62  # a window end beyond any sample count


class Geometry(NamedTuple):
    """Scaled rotated boxes in the compute dtype; non-finite boxes are replaced by an empty box."""

    cx: Tensor
    cy: Tensor
    width: Tensor
    height: Tensor
    cos: Tensor
    sin: Tensor
    finite: Tensor  # [K] bool
    grid_h: Tensor  # [K] float64 sample counts
    grid_w: Tensor
    fixed_w: Tensor | None  # [K] bool: width raised to one pixel (aligned=False), else None
    fixed_h: Tensor | None


def geometry(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
             degrees: bool, clockwise: bool, dtype: torch.dtype) -> Geometry:
    """Box geometry in the published order of operations (differentiable in ``rois``)."""
    r = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    cx = r[:, 1] * spatial_scale - offset
    cy = r[:, 2] * spatial_scale - offset
    w = r[:, 3] * spatial_scale
    h = r[:, 4] * spatial_scale
    fixed_w = fixed_h = None
    if not aligned:  # the legacy convention: at least one pixel wide and high
        fixed_w, fixed_h = w < 1, h < 1
        w = torch.where(fixed_w, torch.ones_like(w), w)
        h = torch.where(fixed_h, torch.ones_like(h), h)
    cos64, sin64 = rotation(rois[:, 5], degrees, clockwise)
    cos, sin = cos64.to(dtype), sin64.to(dtype)
    finite = torch.stack([v.detach() for v in (cx, cy, w, h, cos, sin)]).isfinite().all(0)

    def clean(v: Tensor, fill: float) -> Tensor:
        return torch.where(finite, v, torch.full_like(v, fill))

    cx, cy, w, h, cos, sin = clean(cx, 0), clean(cy, 0), clean(w, 0), clean(h, 0), clean(cos, 1), clean(sin, 0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(w, sampling_ratio, dtype=torch.float64)
        grid_w = grid_h.clone()
    else:
        limit = adaptive_grid_limit(dtype)
        grid_h = torch.ceil(h.detach() / pooled[0]).double().clamp(0, limit)
        grid_w = torch.ceil(w.detach() / pooled[1]).double().clamp(0, limit)
    zero = torch.zeros_like(grid_h)
    return Geometry(cx, cy, w, h, cos, sin, finite, torch.where(finite, grid_h, zero), torch.where(finite, grid_w, zero),
                    fixed_w, fixed_h)


class Taps(NamedTuple):
    flat: Tensor  # [B, P, S] index into a flattened H*W plane
    weight: Tensor  # [B, P, S] interpolation weight / sample count (0 for padding and outside samples)
    d_box: Tensor | None  # [5, B, P, S] d weight / d (cx, cy, w, h, theta), scaled like ``weight``


def _visible(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, lo: Tensor,
             hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Along one box axis: each bin's start ``[B, P]``, and the first index and count of its
    samples that can land on the map."""
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    base = start[:, None] + p * bin_size[:, None]  # [B, P]
    first, count = sample_range(base.detach(), bin_size.detach()[:, None], grid[:, None], lo[:, None], hi[:, None])
    return base, first, count


def _axis_samples(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, lo: Tensor, hi: Tensor,
                  dtype: torch.dtype, window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Box-local coordinates ``[B, pooled, S]`` of the samples of each bin that can land on the
    map along one box axis, from the ``window[0]``-th to before the ``window[1]``-th of them,
    which of them are real (not padding), and their coordinates as a fraction of the box size
    (``-1/2 .. 1/2``: the derivative of the coordinate by the size)."""
    base, first, count = _visible(start, bin_size, grid, pooled, lo, hi)
    first = first + window[0]
    count = (count - window[0]).clamp(0, window[1] - window[0])
    n = int(count.max().item()) if count.numel() else 0
    i = first[..., None] + torch.arange(n, device=start.device, dtype=torch.float64)
    real = torch.arange(n, device=start.device) < count[..., None]
    gridc = grid.to(dtype).clamp(min=1)[:, None, None]
    local = base[..., None] + (i.to(dtype) + 0.5) * bin_size[:, None, None] / gridc
    p64 = torch.arange(pooled, device=start.device, dtype=torch.float64)[None, :, None]
    fraction = (p64 + (i + 0.5) / grid.clamp(min=1)[:, None, None]) / pooled - 0.5
    return local, real, fraction.to(dtype)


def _extent(geo: Geometry, a: int, b: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cx, cy, w, h, cos, sin = (v[a:b].detach() for v in geo[:6])
    return local_extent(cx, cy, cos, sin, height, width, w, h, geo.cx.dtype)


def visible_counts(geo: Geometry, a: int, b: int, height: int, width: int, pooled: tuple[int, int]) -> Tensor:
    """``[b - a, 2]`` int64: for each of boxes ``[a, b)``, the most samples of any of its bins
    that can land on the map, along y and along x."""
    y_lo, y_hi, x_lo, x_hi = _extent(geo, a, b, height, width)
    w, h = geo.width[a:b].detach(), geo.height[a:b].detach()
    most = [_visible(-size / 2, size / n, grid[a:b], n, lo, hi)[2].amax(1)
            for size, grid, n, lo, hi in ((h, geo.grid_h, pooled[0], y_lo, y_hi), (w, geo.grid_w, pooled[1], x_lo, x_hi))]
    return torch.stack(most, 1).long().cpu()


def taps(geo: Geometry, a: int, b: int, height: int, width: int, pooled: tuple[int, int],
         derivatives: bool = False, window: tuple[int, int, int, int] | None = None) -> Taps:
    """The four taps of every sample of boxes ``[a, b)``, flattened per bin; with
    ``derivatives``, also each tap weight's derivative with respect to the box geometry. A
    ``window`` ``(y0, y1, x0, x1)`` keeps, of each bin's samples that can land on the map, those
    from the ``y0``-th to before the ``y1``-th along y and likewise along x."""
    dtype = geo.cx.dtype
    cx, cy, w, h, cos, sin = (v[a:b] for v in geo[:6])
    y_lo, y_hi, x_lo, x_hi = _extent(geo, a, b, height, width)
    y0, y1, x0, x1 = window if window is not None else (0, _UNBOUNDED, 0, _UNBOUNDED)
    yy, real_y, ty = _axis_samples(-h / 2, h / pooled[0], geo.grid_h[a:b], pooled[0], y_lo, y_hi, dtype, (y0, y1))
    xx, real_x, tx = _axis_samples(-w / 2, w / pooled[1], geo.grid_w[a:b], pooled[1], x_lo, x_hi, dtype, (x0, x1))
    yy, ty = yy[:, :, None, :, None], ty[:, :, None, :, None]  # [B, PH, 1, Sy, 1]
    xx, tx = xx[:, None, :, None, :], tx[:, None, :, None, :]  # [B, 1, PW, 1, Sx]
    c, s = cos[:, None, None, None, None], sin[:, None, None, None, None]
    y = yy * c - xx * s + cy[:, None, None, None, None]
    x = yy * s + xx * c + cx[:, None, None, None, None]
    real = real_y[:, :, None, :, None] & real_x[:, None, :, None, :]
    inside = real & (y >= -1) & (y <= height) & (x >= -1) & (x <= width)

    def interpolate(pos: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        moves = inside & (pos > 0)  # a clamped coordinate does not move the sample
        pos = torch.where(moves, pos, torch.zeros_like(pos))
        low = pos.floor().long()
        edge = low >= size - 1
        low = torch.where(edge, torch.full_like(low, size - 1), low)
        high = torch.where(edge, low, low + 1)
        frac = torch.where(edge, torch.zeros_like(pos), pos - low.to(dtype))
        return low, high, frac, (moves & ~edge).to(dtype)

    y_low, y_high, ly, my = interpolate(y, height)
    x_low, x_high, lx, mx = interpolate(x, width)
    hy, hx = 1 - ly, 1 - lx
    count = (geo.grid_h[a:b] * geo.grid_w[a:b]).clamp(min=1).to(dtype)
    keep = inside.to(dtype) / count[:, None, None, None, None]
    bins = pooled[0] * pooled[1]

    def flat_taps(t00: Tensor, t01: Tensor, t10: Tensor, t11: Tensor) -> Tensor:
        return torch.stack((t00, t01, t10, t11), -1).reshape(b - a, bins, -1)

    flat = flat_taps(y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high)
    weight = flat_taps(hy * hx * keep, hy * lx * keep, ly * hx * keep, ly * lx * keep)
    if not derivatives:
        return Taps(flat, weight, None)
    # d weight / d y and d x of each tap, then the chain rule: y = yy cos - xx sin + cy,
    # x = yy sin + xx cos + cx, yy = h * ty, xx = w * tx.
    dy = flat_taps(-hx * my * keep, -lx * my * keep, hx * my * keep, lx * my * keep)
    dx = flat_taps(-hy * mx * keep, hy * mx * keep, -ly * mx * keep, ly * mx * keep)

    def per_tap(v: Tensor) -> Tensor:
        return v.expand(y.shape)[..., None].expand(*y.shape, 4).reshape(b - a, bins, -1)

    ty, tx = per_tap(ty), per_tap(tx)
    cs, sn = cos[:, None, None], sin[:, None, None]
    if geo.fixed_w is not None:  # legacy sizes raised to one pixel do not move with the box
        tx = tx * (~geo.fixed_w[a:b]).to(dtype)[:, None, None]
        ty = ty * (~geo.fixed_h[a:b]).to(dtype)[:, None, None]
    # A sample off the map moves nothing; its local coordinates may have overflowed (boxes near 1e300).
    zero = torch.zeros_like(y)
    yy_t, xx_t = per_tap(torch.where(inside, yy, zero)), per_tap(torch.where(inside, xx, zero))
    d_box = torch.stack((dx, dy, dx * tx * cs - dy * tx * sn, dy * ty * cs + dx * ty * sn,
                         dx * (yy_t * cs - xx_t * sn) - dy * (yy_t * sn + xx_t * cs)))
    return Taps(flat, weight, d_box)


class Chunk(NamedTuple):
    boxes: slice
    channels: slice
    taps: Taps


def chunks(geo: Geometry, shape: tuple[int, int, int, int], pooled: tuple[int, int],
           derivatives: bool = False) -> Iterator[Chunk]:
    """Blocks of boxes (and of channels, for big boxes) whose gathered values fit the budget, in order."""
    n, c, h, w = shape
    bins = pooled[0] * pooled[1]

    def build(a: int, b: int, counts: Tensor) -> Iterator[Chunk]:  # counts: visible_counts of boxes [a, b)
        sy, sx = (int(v) for v in counts.amax(0))
        per_box = bins * max(4 * sy * sx, 1)
        if b - a > 1 and (b - a) * per_box * c > _BUDGET:
            mid = (a + b) // 2
            yield from build(a, mid, counts[:mid - a])
            yield from build(mid, b, counts[mid - a:])
            return
        # One box whose samples near the map alone exceed the budget (huge float32 coordinates,
        # whose rounding widens the extent by many samples) is taken in windows of its samples.
        wy, wx = max(sy, 1), max(sx, 1)
        while bins * 4 * wy * wx > _BUDGET and wy * wx > 1:
            wy, wx = (wy, (wx + 1) // 2) if wx >= wy else ((wy + 1) // 2, wx)
        for y0 in range(0, max(sy, 1), wy):
            for x0 in range(0, max(sx, 1), wx):
                t = taps(geo, a, b, h, w, pooled, derivatives, (y0, y0 + wy, x0, x0 + wx))
                step = max(1, _BUDGET // (bins * max(t.flat.shape[2], 1) * (b - a)))
                for c0 in range(0, c, step):
                    yield Chunk(slice(a, b), slice(c0, min(c, c0 + step)), t)

    k = geo.cx.shape[0]
    for a in range(0, k, _BOX_BLOCK):
        b = min(k, a + _BOX_BLOCK)
        yield from build(a, b, visible_counts(geo, a, b, h, w, pooled))


def _gather(planes: Tensor, batch: Tensor, chunk: Chunk) -> Tensor:
    """Feature values at every tap of the chunk: ``[B, Cc, P, S]``."""
    flat = chunk.taps.flat
    channels = torch.arange(chunk.channels.start, chunk.channels.stop, device=planes.device)
    values = planes[batch[chunk.boxes][:, None, None], channels[None, :, None], flat.flatten(1)[:, None, :]]
    return values.view(flat.shape[0], len(channels), *flat.shape[1:])


def _batch(rois: Tensor, n: int) -> Tensor:
    return rois[:, 0].detach().nan_to_num(0).clamp(0, max(n - 1, 0)).long()


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    n, c, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    pooled = (pooled_height, pooled_width)
    geo = geometry(rois.detach(), spatial_scale, pooled, sampling_ratio, aligned, degrees, clockwise, dtype)
    out = input.new_zeros((rois.shape[0], c, pooled_height * pooled_width), dtype=dtype)
    planes = input.detach().reshape(n, c, h * w)
    batch = _batch(rois, n)
    for chunk in chunks(geo, (n, c, h, w), pooled):
        values = _gather(planes, batch, chunk).to(dtype)
        out[chunk.boxes, chunk.channels] += torch.einsum("bcps,bps->bcp", values, chunk.taps.weight)
    out = torch.where(geo.finite[:, None, None], out, torch.full_like(out, math.nan))
    return out.view(rois.shape[0], c, pooled_height, pooled_width).to(input.dtype)


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   clockwise: bool, degrees: bool, channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    shape = (batch_size, channels, height, width)
    pooled = (pooled_height, pooled_width)
    geo = geometry(rois.detach(), spatial_scale, pooled, sampling_ratio, aligned, degrees, clockwise, dtype)
    acc = grad.new_zeros(batch_size * channels * height * width, dtype=dtype)
    grad = grad.reshape(grad.shape[0], channels, pooled_height * pooled_width)
    batch = _batch(rois, batch_size)
    for chunk in chunks(geo, shape, pooled):
        go = grad[chunk.boxes, chunk.channels].to(dtype)  # [B, Cc, P]
        contrib = go[..., None] * chunk.taps.weight[:, None]  # [B, Cc, P, S]
        cidx = torch.arange(chunk.channels.start, chunk.channels.stop, device=grad.device)
        plane = (batch[chunk.boxes][:, None] * channels + cidx[None, :]) * (height * width)
        index = plane[:, :, None, None] + chunk.taps.flat[:, None]
        acc.index_add_(0, index.flatten(), contrib.flatten())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return acc.view(shape).to(grad.dtype, memory_format=memory_format)


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    n, c, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    pooled = (pooled_height, pooled_width)
    geo = geometry(rois.detach(), spatial_scale, pooled, sampling_ratio, aligned, degrees, clockwise, dtype)
    planes = input.detach().reshape(n, c, h * w)
    grad = grad.reshape(grad.shape[0], c, pooled_height * pooled_width)
    batch = _batch(rois, n)
    acc = rois.new_zeros((rois.shape[0], 5), dtype=dtype)  # d/d (cx, cy, w, h, theta), scaled pixels
    for chunk in chunks(geo, (n, c, h, w), pooled, derivatives=True):
        values = _gather(planes, batch, chunk).to(dtype)
        per_tap = torch.einsum("bcps,bcp->bps", values, grad[chunk.boxes, chunk.channels].to(dtype))
        acc[chunk.boxes] += (per_tap[None] * chunk.taps.d_box).sum((2, 3)).T
    scale = torch.tensor([spatial_scale] * 4 + [angle_factor(degrees, clockwise)], dtype=dtype, device=acc.device)
    acc = torch.where(geo.finite[:, None], acc * scale, torch.full_like(acc, math.nan))
    return torch.cat((torch.zeros_like(acc[:, :1]), acc), dim=1).to(rois.dtype)


__all__ = ["forward", "backward_input", "backward_rois"]
