"""Rotated RoIAlign CPU kernels in Numba: forward, input gradient and box gradient.

A rotated sample reads its own four pixels (the axis-aligned kernel's separable tap merging
does not apply), so the kernels walk each bin's sample grid and, per sample, run over the
channels of its four taps: features are read channels-last (``[N, H, W, C]``, an NCHW input
is transposed once per call by ``common``), so each tap is one contiguous, vectorised run.

Only the samples whose box-local coordinates fall in the map's extent seen from the box
(``reference.common.local_extent``, widened for float32 rounding) are visited; each is then
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
from .common import (JIT, band_of, box_jobs, channels_last_view, empty, store_band, transpose_boxes, visible_samples,
                     workers)


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
def _position(geo, k, yy, xx):
    """Map position (y, x) of the box-local point (yy, xx) of box ``k``, in the published order."""
    cx, cy, cos, sin = geo[k, 0], geo[k, 1], geo[k, 4], geo[k, 5]
    return yy * cos - xx * sin + cy, yy * sin + xx * cos + cx


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
# Kernels. ``geo`` is [K, 6] (cx, cy, w, h, cos, sin) in the compute dtype, ``grid`` [K, 2]
# (samples per bin along y and x; 0 for a non-finite box), ``extent`` [K, 4] float64.


@numba.njit(**JIT)
def _forward(feat, geo, grid, extent, batch, lo, hi, pooled_h, pooled_w, T, out):
    n_img, height, width, channels = feat.shape
    acc = np.empty(channels, dtype=feat.dtype)
    for k in range(lo, hi):
        if grid[k, 0] < 0:  # non-finite box
            out[k, :, :] = np.nan
            continue
        b = batch[k]
        count = T(max(np.float64(grid[k, 0]) * np.float64(grid[k, 1]), 1.0))
        for ph in range(pooled_h):
            y0, y1 = _sample_range(geo, grid, extent, k, ph, pooled_h, 0, T)
            for pw in range(pooled_w):
                x0, x1 = _sample_range(geo, grid, extent, k, pw, pooled_w, 1, T)
                acc[:] = 0
                for iy in range(y0, y1):
                    yy = _local(geo, grid, k, ph, iy, pooled_h, 0, T)
                    for ix in range(x0, x1):
                        xx = _local(geo, grid, k, pw, ix, pooled_w, 1, T)
                        y, x = _position(geo, k, yy, xx)
                        if y < -1 or y > height or x < -1 or x > width:
                            continue
                        r0, r1, ly, _ = _axis(y, height, T)
                        q0, q1, lx, _ = _axis(x, width, T)
                        hy, hx = T(1.0) - ly, T(1.0) - lx
                        w00, w01, w10, w11 = hy * hx, hy * lx, ly * hx, ly * lx
                        p00, p01, p10, p11 = feat[b, r0, q0], feat[b, r0, q1], feat[b, r1, q0], feat[b, r1, q1]
                        for c in range(channels):
                            acc[c] += w00 * p00[c] + w01 * p01[c] + w10 * p10[c] + w11 * p11[c]
                for c in range(channels):
                    out[k, c, ph * pooled_w + pw] = acc[c] / count


@numba.njit(**JIT)
def _backward_input_rows(grad_t, geo, grid, extent, order, lo, hi, rows_of_box, b, r0, r1, pooled_h, pooled_w, T,
                         grad_feat, planar):
    """Rows ``[r0, r1)`` of image ``b`` of the input gradient, over the image's boxes
    ``order[lo:hi]`` in order (``grad_t`` is [K, PH * PW, C]). Each call owns its rows."""
    band = band_of(grad_feat, b, r0, r1, planar)
    width, channels = band.shape[1], band.shape[2]
    height = grad_feat.shape[2] if planar else grad_feat.shape[1]
    for j in range(lo, hi):
        k = order[j]
        if grid[k, 0] < 0 or rows_of_box[k, 1] < r0 or rows_of_box[k, 0] >= r1:
            continue
        count = T(max(np.float64(grid[k, 0]) * np.float64(grid[k, 1]), 1.0))
        for ph in range(pooled_h):
            y0, y1 = _sample_range(geo, grid, extent, k, ph, pooled_h, 0, T)
            for pw in range(pooled_w):
                x0, x1 = _sample_range(geo, grid, extent, k, pw, pooled_w, 1, T)
                g = grad_t[k, ph * pooled_w + pw]
                for iy in range(y0, y1):
                    yy = _local(geo, grid, k, ph, iy, pooled_h, 0, T)
                    for ix in range(x0, x1):
                        xx = _local(geo, grid, k, pw, ix, pooled_w, 1, T)
                        y, x = _position(geo, k, yy, xx)
                        if y < -1 or y > height or x < -1 or x > width:
                            continue
                        ya, yb, ly, _ = _axis(y, height, T)
                        if yb < r0 or ya >= r1:
                            continue
                        qa, qb, lx, _ = _axis(x, width, T)
                        hy, hx = T(1.0) - ly, T(1.0) - lx
                        for row, wy in ((ya, hy), (yb, ly)):
                            if row < r0 or row >= r1 or wy == 0:
                                continue
                            for col, wx in ((qa, hx), (qb, lx)):
                                w = wy * wx / count
                                if w == 0:
                                    continue
                                pixel = band[row - r0, col]
                                for c in range(channels):
                                    pixel[c] += w * g[c]
    store_band(grad_feat, band, b, r0, planar)


@numba.njit(**JIT)
def _backward_rois(grad, feat, geo, grid, extent, fixed, batch, lo, hi, pooled_h, pooled_w, T, grad_rois):
    """d/d(cx, cy, w, h, theta) of boxes ``[lo, hi)`` in scaled pixels and radians, float64."""
    n_img, height, width, channels = feat.shape
    g = np.empty(channels, dtype=feat.dtype)
    for k in range(lo, hi):
        if grid[k, 0] < 0:
            grad_rois[k, :] = np.nan
            continue
        b = batch[k]
        cos, sin = np.float64(geo[k, 4]), np.float64(geo[k, 5])
        gh, gw = np.float64(max(grid[k, 0], 1)), np.float64(max(grid[k, 1], 1))
        count = max(np.float64(grid[k, 0]) * np.float64(grid[k, 1]), 1.0)
        d_cx = d_cy = d_w = d_h = d_t = 0.0
        for ph in range(pooled_h):
            y0, y1 = _sample_range(geo, grid, extent, k, ph, pooled_h, 0, T)
            for pw in range(pooled_w):
                x0, x1 = _sample_range(geo, grid, extent, k, pw, pooled_w, 1, T)
                for c in range(channels):
                    g[c] = grad[k, c, ph * pooled_w + pw]
                for iy in range(y0, y1):
                    yy = _local(geo, grid, k, ph, iy, pooled_h, 0, T)
                    ty = (ph + (iy + 0.5) / gh) / pooled_h - 0.5  # d yy / d h
                    for ix in range(x0, x1):
                        xx = _local(geo, grid, k, pw, ix, pooled_w, 1, T)
                        tx = (pw + (ix + 0.5) / gw) / pooled_w - 0.5
                        y, x = _position(geo, k, yy, xx)
                        if y < -1 or y > height or x < -1 or x > width:
                            continue
                        r0, r1, ly, moves_y = _axis(y, height, T)
                        q0, q1, lx, moves_x = _axis(x, width, T)
                        p00, p01, p10, p11 = feat[b, r0, q0], feat[b, r0, q1], feat[b, r1, q0], feat[b, r1, q1]
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
                        yy64, xx64 = np.float64(yy), np.float64(xx)
                        d_cx += sx
                        d_cy += sy
                        d_w += tx * (sx * cos - sy * sin)
                        d_h += ty * (sy * cos + sx * sin)
                        d_t += sx * (yy64 * cos - xx64 * sin) - sy * (yy64 * sin + xx64 * cos)
        grad_rois[k, 0] = d_cx / count
        grad_rois[k, 1] = d_cy / count
        grad_rois[k, 2] = 0.0 if fixed[k, 0] else d_w / count
        grad_rois[k, 3] = 0.0 if fixed[k, 1] else d_h / count
        grad_rois[k, 4] = d_t / count


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, torch tensors out.

_BAND_BYTES = 1 << 20  # rows of input gradient accumulated together: about one L2 cache


def _prepare(rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
             clockwise: bool, degrees: bool, dtype: torch.dtype, height: int, width: int, batch_size: int):
    """Per-box arrays for the kernels: geometry, sample counts (-1 for a non-finite box), extent, batch, fixed sizes."""
    geo = geometry(rois.detach(), spatial_scale, pooled, sampling_ratio, aligned, degrees, clockwise, dtype)
    table = torch.stack([geo.cx, geo.cy, geo.width, geo.height, geo.cos, geo.sin], 1).contiguous()
    grid = torch.stack([geo.grid_h, geo.grid_w], 1).long()
    grid[~geo.finite] = -1
    margin = 0.5 + 4e-6 * (geo.cx.abs() + geo.cy.abs() + geo.width + geo.height).double()
    extent = torch.stack(local_extent(geo.cx, geo.cy, geo.cos, geo.sin, height, width, margin), 1).contiguous()
    batch = rois[:, 0].detach().nan_to_num(0).clamp(0, max(batch_size - 1, 0)).long()
    if geo.fixed_w is None:
        fixed = torch.zeros(rois.shape[0], 2, dtype=torch.bool)
    else:
        fixed = torch.stack([geo.fixed_w, geo.fixed_h], 1)
    T = np.float64 if dtype == torch.float64 else np.float32
    return (table.numpy(), grid.numpy(), extent.numpy(), batch.numpy(), fixed.numpy(), T, geo)


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    n, c, h, w = input.shape
    k = rois.shape[0]
    table, grid, extent, batch, _, T, _ = _prepare(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio,
                                                   aligned, clockwise, degrees, dtype, h, w, n)
    out = empty((k, c, pooled_height, pooled_width), dtype)
    out_np = out.view(k, c, pooled_height * pooled_width).numpy()
    feat = channels_last_view(input.detach().to(dtype))
    _, parts = box_jobs(k)
    workers.run(_forward, [(feat, table, grid, extent, batch, lo, hi, pooled_height, pooled_width, T, out_np)
                           for lo, hi in parts])
    return out if dtype == input.dtype else out.to(input.dtype)


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   clockwise: bool, degrees: bool, channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    table, grid, extent, batch, _, T, geo = _prepare(rois, spatial_scale, (pooled_height, pooled_width),
                                                     sampling_ratio, aligned, clockwise, degrees, dtype, height,
                                                     width, batch_size)
    grad_np = grad.detach().to(dtype).contiguous().view(grad.shape[0], channels, -1).numpy()
    grad_t = empty((grad_np.shape[0], grad_np.shape[2], channels), dtype).numpy()
    workers.run(transpose_boxes, [(grad_np, lo, hi, grad_t) for lo, hi in box_jobs(grad_np.shape[0])[1]])
    # Boxes grouped by image, each group in its original order; each job owns a band of rows.
    batch_t = torch.from_numpy(batch)
    order = torch.argsort(batch_t, stable=True).numpy()
    bounds = torch.searchsorted(batch_t[order].contiguous(), torch.arange(batch_size + 1)).numpy()
    rows = rotated_row_span(rois.detach(), geo.cos, geo.sin, spatial_scale, aligned, height).numpy()
    if channels_last:
        grad_input = empty((batch_size, height, width, channels), dtype)
        target, result = grad_input.numpy(), grad_input.permute(0, 3, 1, 2)
    else:
        grad_input = empty((batch_size, channels, height, width), dtype)
        target, result = grad_input.numpy(), grad_input
    band = max(1, _BAND_BYTES // max(1, width * channels * grad_input.element_size()))
    jobs = [(grad_t, table, grid, extent, order, int(bounds[b]), int(bounds[b + 1]), rows, b, r0,
             min(height, r0 + band), pooled_height, pooled_width, T, target, not channels_last)
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
    feat = channels_last_view(input.detach().to(dtype))
    acc = np.zeros((k, 5), dtype=np.float64)
    _, parts = box_jobs(k)
    workers.run(_backward_rois, [(grad_np, feat, table, grid, extent, fixed, batch, lo, hi, pooled_height,
                                  pooled_width, T, acc) for lo, hi in parts])
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
