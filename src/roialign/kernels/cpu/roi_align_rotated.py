"""Rotated RoIAlign CPU kernels in Numba: forward, input gradient and box gradient.

A rotated sample reads its own four pixels (the axis-aligned kernel's separable tap merging
does not apply), so the kernels walk each bin's sample grid and, per sample, run over the
channels of its four taps: features are read channels-last (``[N, H, W, C]``, an NCHW input
is transposed once per call by ``common``), so each tap is one contiguous, vectorised run.

Only the samples whose box-local coordinates fall in the map's extent seen from the box
(``reference.common.local_extent``, widened for rounding) are visited; each is then
tested exactly, so a huge box costs no more than the map.

Threads and determinism are those of ``roi_align``: jobs own boxes (forward, box gradient) or
bands of rows of one image (input gradient, boxes in a fixed order), so results are bitwise
identical for any number of threads. Geometry comes from the pure-PyTorch backend's
``geometry`` (float32, or float64 for float64 input; cos and sin from float64), so every
backend samples the same points.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from ..reference.common import angle_factor, compute_dtype, local_extent, rotated_row_span
from ..reference.roi_align_rotated import geometry
from .buffers import result_tensor
from .common import (JIT, band_of, band_order, channel_runs, compute_type, store_band, visible_samples,
                     wide_vectors)
from .layout import channels_last_map
from .threads import TAP_BAND_BYTES, band_rows, ranges, workers

# Bytes per band of the input gradient (``threads.TAP_BAND_BYTES``; tests set it to vary the bands).
BAND_BYTES = TAP_BAND_BYTES


# ----------------------------------------------------------------------------------------------
# One sample.


@numba.njit(inline="always", **JIT)
def _axis(pos, size, T):
    """Clamp one coordinate of an on-map sample: (low, high, frac, moves)."""
    moves = pos > 0
    if pos <= 0:
        pos = T(0.0)
    low = int(pos)
    if low >= size - 1:
        return size - 1, size - 1, T(0.0), False
    return low, low + 1, pos - T(low), moves


@numba.njit(inline="always", **JIT)
def _sample(yc, ys, xc, xs, ph, pw, j, i, cy, cx, height, width, T):
    """Sample ``(j, i)`` of bin ``(ph, pw)`` from the box's tables: whether it lands on the map,
    then its rows, columns, fractions and whether each axis moves it (see :func:`_axis`). A
    position that is not a number (a finite box so huge that a sample's offset overflowed, times a
    zero sine) is off the map, as in the reference kernels; it once became pixel index INT64_MIN."""
    y = yc[ph, j] - xs[pw, i] + cy
    x = ys[ph, j] + xc[pw, i] + cx
    if not (y >= -1 and y <= height and x >= -1 and x <= width):
        return False, 0, 0, 0, 0, T(0.0), T(0.0), False, False
    ya, yb, ly, moves_y = _axis(y, height, T)
    xa, xb, lx, moves_x = _axis(x, width, T)
    return True, ya, yb, xa, xb, ly, lx, moves_y, moves_x


@numba.njit(inline="always", **JIT)
def _local(geo, grid, k, p, i, pooled, axis, T):
    """Box-local coordinate of sample ``i`` of bin ``p`` along box axis 0 (y, height) or 1 (x, width)."""
    size = geo[k, 3 - axis]
    bin_size = size / T(pooled)
    base = -size / T(2.0) + T(p) * bin_size
    return base + T(i + 0.5) * bin_size / T(grid[k, axis])


@numba.njit(inline="always", **JIT)
def _sample_range(geo, grid, extent, k, p, pooled, axis, T):
    size = geo[k, 3 - axis]
    bin_size = size / T(pooled)
    base = -size / T(2.0) + T(p) * bin_size
    return visible_samples(base, bin_size, grid[k, axis], extent[k, 2 * axis], extent[k, 2 * axis + 1])


# ----------------------------------------------------------------------------------------------
# Per-box tables. A sample's position is ``y = yy cos - xx sin + cy``, ``x = yy sin + xx cos + cx``
# (the published order): the four products depend on the row or on the column only, so they are
# tabulated once per box, ``[bin, sample]`` along each box axis, for the visible samples.


@numba.njit(**JIT)
def _table_capacity(geo, grid, extent, order, lo, hi, pooled_h, pooled_w, T):
    """The most visible samples of any bin along y and along x, over boxes ``order[lo:hi]``."""
    cap_y = 1
    cap_x = 1
    for j in range(lo, hi):
        k = order[j]
        if grid[k, 0] < 0:
            continue
        for p in range(pooled_h):
            a, b = _sample_range(geo, grid, extent, k, p, pooled_h, 0, T)
            cap_y = max(cap_y, b - a)
        for p in range(pooled_w):
            a, b = _sample_range(geo, grid, extent, k, p, pooled_w, 1, T)
            cap_x = max(cap_x, b - a)
    return cap_y, cap_x


@numba.njit(**JIT)
def _tables(cap_y, cap_x, pooled_h, pooled_w, T):
    """Buffers for :func:`_fill` holding ``cap_y`` and ``cap_x`` samples per bin (see
    :func:`_table_capacity`): first and count, then the products with cos and with sin, along y
    then along x; and the merge buffer of a bin."""
    return (np.empty(pooled_h, np.int64), np.empty(pooled_h, np.int64), np.empty((pooled_h, cap_y), T),
            np.empty((pooled_h, cap_y), T), np.empty(pooled_w, np.int64), np.empty(pooled_w, np.int64),
            np.empty((pooled_w, cap_x), T), np.empty((pooled_w, cap_x), T), np.zeros(_MERGE_CELLS, T))


@numba.njit(**JIT)
def _fill(geo, grid, extent, k, pooled, axis, T, first, count, times_cos, times_sin):
    """Fill one axis of box ``k``'s tables."""
    cos, sin = geo[k, 4], geo[k, 5]
    for p in range(pooled):
        a, b = _sample_range(geo, grid, extent, k, p, pooled, axis, T)
        first[p] = a
        count[p] = b - a
        for i in range(a, b):
            v = _local(geo, grid, k, p, i, pooled, axis, T)
            times_cos[p, i - a] = v * cos
            times_sin[p, i - a] = v * sin


# Taps of a bin are merged (weights of samples that read the same pixel added) in a dense patch
# over the bin's pixel bounding box, when that patch is small next to the number of taps: small
# bins (small boxes, fine sampling) read few distinct pixels many times. Larger bins read
# their taps one by one.
_MERGE_CELLS = 1024


@numba.njit(inline="always", **JIT)
def _bin_patch(geo, k, ph, pw, pooled_h, pooled_w, height, width, taps):
    """Rows and columns ``r0, q0, rows, cols`` of the pixels bin ``(ph, pw)`` can read (from its
    four corners, one pixel of margin for rounding), or ``rows = 0`` when not worth merging."""
    w, h, cos, sin = np.float64(geo[k, 2]), np.float64(geo[k, 3]), np.float64(geo[k, 4]), np.float64(geo[k, 5])
    cx, cy = np.float64(geo[k, 0]), np.float64(geo[k, 1])
    y_lo = -h / 2 + ph * h / pooled_h
    x_lo = -w / 2 + pw * w / pooled_w
    min_y = min_x = np.inf
    max_y = max_x = -np.inf
    for yy in (y_lo, y_lo + h / pooled_h):
        for xx in (x_lo, x_lo + w / pooled_w):
            y = yy * cos - xx * sin + cy
            x = yy * sin + xx * cos + cx
            min_y, max_y, min_x, max_x = min(min_y, y), max(max_y, y), min(min_x, x), max(max_x, x)
    if not (max_y - min_y < 64 and max_x - min_x < 64):
        return 0, 0, 0, 0
    r0 = int(max(np.floor(min_y) - 1, 0.0))
    r1 = int(min(max(np.floor(max_y), 0.0) + 2, height - 1.0))
    q0 = int(max(np.floor(min_x) - 1, 0.0))
    q1 = int(min(max(np.floor(max_x), 0.0) + 2, width - 1.0))
    rows, cols = r1 - r0 + 1, q1 - q0 + 1
    if rows <= 0 or cols <= 0 or rows * cols > min(_MERGE_CELLS, 2 * taps):
        return 0, 0, 0, 0
    return r0, q0, rows, cols


@numba.njit(inline="always", **JIT)
def _merge(patch, r0, q0, rows, cols, ya, yb, xa, xb, hy, hx, ly, lx):
    """Add a sample's four weights to the bin's patch if all four taps lie in it (a clamped
    axis adds twice to one cell); False when they do not (the caller reads them itself)."""
    if rows == 0 or ya < r0 or yb >= r0 + rows or xa < q0 or xb >= q0 + cols:
        return False
    cell = (ya - r0) * cols + (xa - q0)
    down, right = (yb - ya) * cols, xb - xa
    patch[cell] += hy * hx
    patch[cell + right] += hy * lx
    patch[cell + down] += ly * hx
    patch[cell + down + right] += ly * lx
    return True


@numba.njit(inline="always", **JIT)
def _add_channels(acc, w, pixel, channels):
    for c in range(channels):
        acc[c] += w * pixel[c]


# ----------------------------------------------------------------------------------------------
# Kernels. ``geo`` is [K, 6] (cx, cy, w, h, cos, sin) in the compute dtype, ``grid`` [K, 2]
# (samples per bin along y and x; -1 for a non-finite box), ``extent`` [K, 4] float64.


@numba.njit(**JIT)
def _forward(feat, geo, grid, extent, batch, order, lo, hi, pooled_h, pooled_w, T, out):
    wide_vectors()
    n_img, height, width, channels = feat.shape
    acc = np.empty(channels, dtype=feat.dtype)
    cap_y, cap_x = _table_capacity(geo, grid, extent, order, lo, hi, pooled_h, pooled_w, T)
    y_first, y_count, yc, ys, x_first, x_count, xc, xs, patch = _tables(cap_y, cap_x, pooled_h, pooled_w, T)
    for j in range(lo, hi):
        k = order[j]
        if grid[k, 0] < 0:  # non-finite box
            out[k, :, :] = np.nan
            continue
        b = batch[k]
        cx, cy = geo[k, 0], geo[k, 1]
        count = T(max(np.float64(grid[k, 0]) * np.float64(grid[k, 1]), 1.0))
        _fill(geo, grid, extent, k, pooled_h, 0, T, y_first, y_count, yc, ys)
        _fill(geo, grid, extent, k, pooled_w, 1, T, x_first, x_count, xc, xs)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                acc[:] = 0
                r0, q0, rows, cols = _bin_patch(geo, k, ph, pw, pooled_h, pooled_w, height, width,
                                                4 * y_count[ph] * x_count[pw])
                for j in range(y_count[ph]):
                    for i in range(x_count[pw]):
                        on_map, ya, yb, xa, xb, ly, lx, _, _ = _sample(yc, ys, xc, xs, ph, pw, j, i, cy, cx, height,
                                                                       width, T)
                        if not on_map:
                            continue
                        hy, hx = T(1.0) - ly, T(1.0) - lx
                        if not _merge(patch, r0, q0, rows, cols, ya, yb, xa, xb, hy, hx, ly, lx):
                            w00, w01, w10, w11 = hy * hx, hy * lx, ly * hx, ly * lx
                            p00, p01, p10, p11 = feat[b, ya, xa], feat[b, ya, xb], feat[b, yb, xa], feat[b, yb, xb]
                            for c in range(channels):
                                acc[c] += w00 * p00[c] + w01 * p01[c] + w10 * p10[c] + w11 * p11[c]
                for cell in range(rows * cols):
                    w = patch[cell]
                    if w != 0:
                        patch[cell] = 0
                        _add_channels(acc, w, feat[b, r0 + cell // cols, q0 + cell % cols], channels)
                for c in range(channels):
                    out[k, c, ph * pooled_w + pw] = acc[c] / count


@numba.njit(**JIT)
def _backward_input_rows(grad_t, geo, grid, extent, order, lo, hi, rows_of_box, b, r0, r1, pooled_h, pooled_w, T,
                         cap_y, cap_x, grad_feat, planar):
    """Rows ``[r0, r1)`` of image ``b`` of the input gradient, over the image's boxes
    ``order[lo:hi]`` in order (``grad_t`` is [K, PH * PW, C]; ``cap_y``, ``cap_x`` the table
    capacity of every box, computed once per call of the launcher). Each call owns its rows."""
    wide_vectors()
    band = band_of(grad_feat, b, r0, r1, planar)
    width, channels = band.shape[1], grad_t.shape[2]
    height = grad_feat.shape[2] if planar else grad_feat.shape[1]
    y_first, y_count, yc, ys, x_first, x_count, xc, xs, patch = _tables(cap_y, cap_x, pooled_h, pooled_w, T)
    for j in range(lo, hi):
        k = order[j]
        if grid[k, 0] < 0 or rows_of_box[k, 1] < r0 or rows_of_box[k, 0] >= r1:
            continue
        cx, cy = geo[k, 0], geo[k, 1]
        count = T(max(np.float64(grid[k, 0]) * np.float64(grid[k, 1]), 1.0))
        _fill(geo, grid, extent, k, pooled_h, 0, T, y_first, y_count, yc, ys)
        _fill(geo, grid, extent, k, pooled_w, 1, T, x_first, x_count, xc, xs)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                p0, q0, rows, cols = _bin_patch(geo, k, ph, pw, pooled_h, pooled_w, height, width,
                                                4 * y_count[ph] * x_count[pw])
                if rows > 0 and (p0 + rows <= r0 or p0 >= r1):
                    continue  # the bin reads no row of this band
                g = grad_t[k, ph * pooled_w + pw]
                for jy in range(y_count[ph]):
                    for ix in range(x_count[pw]):
                        on_map, ya, yb, xa, xb, ly, lx, _, _ = _sample(yc, ys, xc, xs, ph, pw, jy, ix, cy, cx,
                                                                       height, width, T)
                        if not on_map or yb < r0 or ya >= r1:
                            continue
                        hy, hx = T(1.0) - ly, T(1.0) - lx
                        if _merge(patch, p0, q0, rows, cols, ya, yb, xa, xb, hy, hx, ly, lx):
                            continue
                        for row, wy in ((ya, hy), (yb, ly)):
                            if row < r0 or row >= r1:
                                continue
                            for col, wx in ((xa, hx), (xb, lx)):
                                w = wy * wx
                                if w != 0:
                                    _add_channels(band[row - r0, col], w / count, g, channels)
                for cell in range(rows * cols):
                    w = patch[cell]
                    row = p0 + cell // cols
                    if w != 0:
                        patch[cell] = 0
                        if r0 <= row < r1:  # the patch may straddle the band: rows outside are another job's
                            _add_channels(band[row - r0, q0 + cell % cols], w / count, g, channels)
    store_band(grad_feat, band, b, r0, planar)


@numba.njit(**JIT)
def _backward_rois(grad, feat, geo, grid, extent, fixed, batch, order, lo, hi, pooled_h, pooled_w, T, grad_rois):
    """d/d(cx, cy, w, h, theta) of boxes ``order[lo:hi]`` in scaled pixels and radians, float64."""
    n_img, height, width, channels = feat.shape
    g = np.empty(channels, dtype=feat.dtype)
    cap_y, cap_x = _table_capacity(geo, grid, extent, order, lo, hi, pooled_h, pooled_w, T)
    y_first, y_count, yc, ys, x_first, x_count, xc, xs, _ = _tables(cap_y, cap_x, pooled_h, pooled_w, T)
    for j in range(lo, hi):
        k = order[j]
        if grid[k, 0] < 0:
            grad_rois[k, :] = np.nan
            continue
        b = batch[k]
        cx, cy = geo[k, 0], geo[k, 1]
        cos, sin = np.float64(geo[k, 4]), np.float64(geo[k, 5])
        gh, gw = np.float64(max(grid[k, 0], 1)), np.float64(max(grid[k, 1], 1))
        count = max(np.float64(grid[k, 0]) * np.float64(grid[k, 1]), 1.0)
        _fill(geo, grid, extent, k, pooled_h, 0, T, y_first, y_count, yc, ys)
        _fill(geo, grid, extent, k, pooled_w, 1, T, x_first, x_count, xc, xs)
        d_cx = d_cy = d_w = d_h = d_t = 0.0
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for c in range(channels):
                    g[c] = grad[k, c, ph * pooled_w + pw]
                for jy in range(y_count[ph]):
                    ty = (ph + (y_first[ph] + jy + 0.5) / gh) / pooled_h - 0.5  # d yy / d h
                    for ix in range(x_count[pw]):
                        tx = (pw + (x_first[pw] + ix + 0.5) / gw) / pooled_w - 0.5
                        on_map, ya, yb, xa, xb, ly, lx, moves_y, moves_x = _sample(yc, ys, xc, xs, ph, pw, jy, ix, cy,
                                                                                   cx, height, width, T)
                        if not on_map:
                            continue
                        p00, p01, p10, p11 = feat[b, ya, xa], feat[b, ya, xb], feat[b, yb, xa], feat[b, yb, xb]
                        s00 = s01 = s10 = s11 = T(0.0)
                        for c in range(channels):
                            s00 += g[c] * p00[c]
                            s01 += g[c] * p01[c]
                            s10 += g[c] * p10[c]
                            s11 += g[c] * p11[c]
                        hy, hx = 1.0 - np.float64(ly), 1.0 - np.float64(lx)
                        ly64, lx64 = np.float64(ly), np.float64(lx)
                        sy = (hx * (s10 - s00) + lx64 * (s11 - s01)) if moves_y else 0.0
                        sx = (hy * (s01 - s00) + ly64 * (s11 - s10)) if moves_x else 0.0
                        # d(y, x) / d theta = (-(x - cx), y - cy), from the tabulated products.
                        dy_dt = -(np.float64(ys[ph, jy]) + np.float64(xc[pw, ix]))
                        dx_dt = np.float64(yc[ph, jy]) - np.float64(xs[pw, ix])
                        d_cx += sx
                        d_cy += sy
                        d_w += tx * (sx * cos - sy * sin)
                        d_h += ty * (sy * cos + sx * sin)
                        d_t += sx * dx_dt + sy * dy_dt
        grad_rois[k, 0] = d_cx / count
        grad_rois[k, 1] = d_cy / count
        grad_rois[k, 2] = 0.0 if fixed[k, 0] else d_w / count
        grad_rois[k, 3] = 0.0 if fixed[k, 1] else d_h / count
        grad_rois[k, 4] = d_t / count


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, torch tensors out.


def _prepare(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
             clockwise: bool, degrees: bool, dtype: torch.dtype, height: int, width: int, batch_size: int):
    """Per-box arrays for the kernels: geometry, sample counts (-1 for a non-finite box), extent, batch, fixed sizes."""
    geo = geometry(rois.detach(), spatial_scale, pooled, sampling_ratio, aligned, degrees, clockwise, dtype)
    table = torch.stack([geo.cx, geo.cy, geo.width, geo.height, geo.cos, geo.sin], 1).contiguous()
    grid = torch.stack([geo.grid_h, geo.grid_w], 1).long()
    grid[~geo.finite] = -1
    extent = torch.stack(local_extent(geo.cx, geo.cy, geo.cos, geo.sin, height, width, geo.width, geo.height, dtype),
                         1).contiguous()
    batch = rois[:, 0].detach().nan_to_num(0).clamp(0, max(batch_size - 1, 0)).long()
    if geo.fixed_w is None:
        fixed = torch.zeros(rois.shape[0], 2, dtype=torch.bool)
    else:
        fixed = torch.stack([geo.fixed_w, geo.fixed_h], 1)
    return (table.numpy(), grid.numpy(), extent.numpy(), batch.numpy(), fixed.numpy(), compute_type(dtype), geo)


def _box_order(table: np.ndarray, batch: np.ndarray, images: int, height: int, width: int) -> np.ndarray:
    """The boxes in ``common.band_order`` of their axis-aligned bounds on the map (from the
    geometry ``table``: centre, size, cos and sin in pixels), so that a job's consecutive boxes
    read pixels still in cache. Each box is pooled on its own, so no result depends on the order;
    a non-finite box gets some place in it."""
    cx, cy, w, h, cos, sin = (table[:, i].astype(np.float64) for i in range(6))
    half_x = 0.5 * (np.abs(w * cos) + np.abs(h * sin))
    half_y = 0.5 * (np.abs(h * cos) + np.abs(w * sin))
    bounds = np.stack([batch.astype(np.float64), cx - half_x, cy - half_y, cx + half_x, cy + half_y], 1)
    return band_order(bounds, 1.0, images, height, width)


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    n, c, h, w = input.shape
    k = rois.shape[0]
    table, grid, extent, batch, _, T, _ = _prepare(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio,
                                                   aligned, clockwise, degrees, dtype, h, w, n)
    out = result_tensor((k, c, pooled_height, pooled_width), dtype)
    out_np = out.view(k, c, pooled_height * pooled_width).numpy()
    order, parts = _box_order(table, batch, n, h, w), ranges(k, 4 * workers.size())
    with channels_last_map(input.detach().to(dtype)) as feat:
        workers.run(_forward, [(feat, table, grid, extent, batch, order, lo, hi, pooled_height, pooled_width, T,
                                out_np) for lo, hi in parts])
    return out if dtype == input.dtype else out.to(input.dtype)


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   clockwise: bool, degrees: bool, channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    table, grid, extent, batch, _, T, geo = _prepare(rois, spatial_scale, (pooled_height, pooled_width),
                                                     sampling_ratio, aligned, clockwise, degrees, dtype, height,
                                                     width, batch_size)
    with channel_runs(grad, dtype) as grad_t:
        # Boxes grouped by image, each group in its original order; each job owns a band of rows.
        batch_t = torch.from_numpy(batch)
        order = torch.argsort(batch_t, stable=True).numpy()
        bounds = torch.searchsorted(batch_t[order].contiguous(), torch.arange(batch_size + 1)).numpy()
        rows = rotated_row_span(rois.detach(), geo.cos, geo.sin, spatial_scale, aligned, height).numpy()
        if channels_last:
            grad_input = result_tensor((batch_size, height, width, channels), dtype)
            target, result = grad_input.numpy(), grad_input.permute(0, 3, 1, 2)
        else:
            grad_input = result_tensor((batch_size, channels, height, width), dtype)
            target, result = grad_input.numpy(), grad_input
        band = band_rows(BAND_BYTES, width * channels * grad_input.element_size(), height, batch_size)
        cap_y, cap_x = _table_capacity(table, grid, extent, order, 0, order.size, pooled_height, pooled_width, T)
        jobs = [(grad_t, table, grid, extent, order, int(bounds[b]), int(bounds[b + 1]), rows, b, r0,
                 min(height, r0 + band), pooled_height, pooled_width, T, cap_y, cap_x, target, not channels_last)
                for b in range(batch_size) for r0 in range(0, height, band)]
        workers.run(_backward_input_rows, jobs)
    return result if dtype == grad.dtype else result.to(grad.dtype)


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    n, c, h, w = input.shape
    k = rois.shape[0]
    table, grid, extent, batch, fixed, T, _ = _prepare(rois, spatial_scale, (pooled_height, pooled_width),
                                                       sampling_ratio, aligned, clockwise, degrees, dtype, h, w, n)
    grad_np = grad.detach().to(dtype).contiguous().view(k, c, -1).numpy()
    acc = np.zeros((k, 5), dtype=np.float64)
    order, parts = _box_order(table, batch, n, h, w), ranges(k, 4 * workers.size())
    with channels_last_map(input.detach().to(dtype)) as feat:
        workers.run(_backward_rois, [(grad_np, feat, table, grid, extent, fixed, batch, order, lo, hi,
                                      pooled_height, pooled_width, T, acc) for lo, hi in parts])
    scale = np.array([spatial_scale] * 4 + [angle_factor(degrees, clockwise)])
    grad_rois = np.zeros((k, 6), dtype=np.float64)
    grad_rois[:, 1:] = acc * scale
    return torch.from_numpy(grad_rois).to(rois.dtype)


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, 2, 3, 3, dtype=dtype)
        rois = torch.tensor([[0, 1.0, 1.0, 2.0, 2.0, 30.0]] * 4, dtype=dtype)
        g = torch.zeros(4, 2, 1, 1, dtype=dtype)
        forward(x, rois, 1.0, 1, 1, 0, True, False, True)
        for channels_last in (False, True):
            backward_input(g, rois, 1.0, 1, 1, 1, 2, 3, 3, 0, True, False, True, channels_last)
        backward_rois(g, x, rois, 1.0, 1, 1, 0, True, False, True)
