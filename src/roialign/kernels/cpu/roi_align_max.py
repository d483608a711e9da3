"""Max-mode RoIAlign on the CPU: Numba kernels on our thread pool, bitwise deterministic.

The semantics are ``kernels/reference/roi_align_max.py``'s (mmcv's ``"max"`` or ONNX's
``"onnx_max"``; outside samples are 0 and take part; the first sample, and the first corner,
win ties; empty bins are 0). The feature map is read channels-last, so a sample's four taps are
four contiguous runs of channels. A maximum needs every sample's value, so the tap merging of
the average kernel does not apply: each sample costs four reads per channel.

- forward: threads take runs of boxes; each bin keeps a running maximum per channel. For the
  backward the same pass also records, per (box, bin, channel), which sample won (and which
  corner, for ``onnx_max``): ``(row << 32) | (column << 2) | corner``, the sample's row and
  column counted from the bin's first candidate, or -1 when nothing that has a gradient won (an
  empty bin, an off-map sample). Shifts decode it; divisions cost more than the rest of the
  backward.
- input gradient: each thread owns a block of channels of the whole gradient and walks every
  box in order, so each element has one writer and a fixed order of accumulation. Per bin, the
  taps of each candidate sample are computed once and added to the channels it won.
- box gradient: one box per job; per bin, each candidate sample's derivative is summed over the
  channels it won.

Along each axis the candidate samples are those that can land in ``[-1, size]`` with one spare
(``common.visible_samples``) plus one more on each side: that one stands for every off-map
sample on its side (value 0, the same place in row-major order), so a huge box is cheap.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch
from torch import Tensor

from ..reference.common import compute_dtype
from .buffers import result_tensor, scratch
from .common import (JIT, axis_aligned_box, band_order, box_geometry, channel_runs, visible_samples,
                     wide_vectors)
from .layout import channels_last_map, planar_from_channels_last
from .threads import ranges, workers


@numba.njit(inline="always", **JIT)
def _candidates(base, bin_size, grid, size):
    first, last = visible_samples(base, bin_size, grid, -1.0, size)
    return max(first - 1, 0), min(last + 1, grid)


@numba.njit(inline="always", **JIT)
def _tap(pos, size, T):
    """(inside, low, high, frac, moves) of a sample coordinate along an axis of ``size`` pixels."""
    if not (pos >= -1.0 and pos <= size):
        return False, 0, 0, T(0.0), False
    p = pos if pos > 0 else T(0.0)
    low = int(p)
    if low >= size - 1:
        return True, size - 1, size - 1, T(0.0), False
    return True, low, low + 1, p - T(low), pos > 0


@numba.njit(**JIT)
def _forward(feat, geometry, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, onnx, T,
             out, arg, record):
    """Boxes ``order[lo:hi]``: ``out[k, c, bin]``; with ``record``, ``arg[k, bin, c]`` too."""
    wide_vectors()
    _, height, width, channels = feat.shape
    best = np.empty(channels, T)
    won = np.empty(channels, np.int64)
    for k in order[lo:hi]:
        y1, roi_h, _, grid_h, x1, roi_w, _, grid_w, finite = axis_aligned_box(
            geometry, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        b = int(geometry[k, 0])
        if not finite:
            out[k, :, :] = np.nan
            if record:
                arg[k, :, :] = -1
            continue
        bin_h = roi_h / T(pooled_h)
        bin_w = roi_w / T(pooled_w)
        for ph in range(pooled_h):
            base_y = y1 + T(ph) * bin_h
            fy, ly_ = _candidates(base_y, bin_h, grid_h, height)
            for pw in range(pooled_w):
                base_x = x1 + T(pw) * bin_w
                fx, lx_ = _candidates(base_x, bin_w, grid_w, width)
                best[:] = -np.inf
                won[:] = -1
                any_sample = False
                for iy in range(fy, ly_):
                    y = base_y + T(iy + 0.5) * bin_h / T(grid_h)
                    y_in, y0, y1_, fy_, _ = _tap(y, height, T)
                    for ix in range(fx, lx_):
                        any_sample = True
                        x = base_x + T(ix + 0.5) * bin_w / T(grid_w)
                        x_in, x0, x1_, fx_, _ = _tap(x, width, T)
                        s = ((iy - fy) << 32) | ((ix - fx) << 2)  # shifts, not divisions, to decode
                        if not (y_in and x_in):
                            for c in range(channels):
                                if T(0.0) > best[c]:
                                    best[c] = T(0.0)
                                    won[c] = -1
                            continue
                        hy, hx = T(1.0) - fy_, T(1.0) - fx_
                        w00, w01, w10, w11 = hy * hx, hy * fx_, fy_ * hx, fy_ * fx_
                        r00, r01, r10, r11 = feat[b, y0, x0], feat[b, y0, x1_], feat[b, y1_, x0], feat[b, y1_, x1_]
                        if onnx:
                            for c in range(channels):
                                v, q = w00 * r00[c], 0
                                t = w01 * r01[c]
                                if t > v:
                                    v, q = t, 1
                                t = w10 * r10[c]
                                if t > v:
                                    v, q = t, 2
                                t = w11 * r11[c]
                                if t > v:
                                    v, q = t, 3
                                if v > best[c]:
                                    best[c] = v
                                    won[c] = s + q
                        else:
                            for c in range(channels):
                                v = w00 * r00[c] + w01 * r01[c] + w10 * r10[c] + w11 * r11[c]
                                if v > best[c]:
                                    best[c] = v
                                    won[c] = s
                j = ph * pooled_w + pw
                if not any_sample:
                    out[k, :, j] = 0.0
                    if record:
                        arg[k, j, :] = -1
                    continue
                for c in range(channels):
                    out[k, c, j] = best[c]
                if record:
                    arg[k, j, :] = won


@numba.njit(**JIT)
def _axis_tables(start, bin_size, grid, pooled, size, T):
    """Taps of every bin's candidate samples along one axis of a box, bins one after another:
    (first candidate and table offset per bin; low, high, frac, moves and the sample's place in
    the box, 0..1, per candidate)."""
    first = np.empty(pooled, np.int64)
    offset = np.empty(pooled + 1, np.int64)
    offset[0] = 0
    for p in range(pooled):
        lo, hi = _candidates(start + T(p) * bin_size, bin_size, grid, size)
        first[p] = lo
        offset[p + 1] = offset[p] + (hi - lo)
    n = offset[pooled]
    low = np.empty(n, np.int64)
    high = np.empty(n, np.int64)
    frac = np.empty(n, T)
    moves = np.empty(n, np.bool_)
    place = np.empty(n, np.float64)
    for p in range(pooled):
        base = start + T(p) * bin_size
        for i in range(offset[p + 1] - offset[p]):
            idx = first[p] + i
            pos = base + T(idx + 0.5) * bin_size / T(grid)
            _, low[offset[p] + i], high[offset[p] + i], frac[offset[p] + i], moves[offset[p] + i] = _tap(pos, size, T)
            place[offset[p] + i] = (p + (idx + 0.5) / grid) / pooled
    return first, offset, low, high, frac, moves, place


_FEW = 16  # up to this many candidate samples in a bin, _few_winners instead of decoding per channel


@numba.njit(inline="always", **JIT)
def _few_winners(grad, arg, k, j, b, oy, ny, ox, nx, y0, y1_, fry, x0, x1_, frx, onnx, c0, c1, T, grad_feat):
    """One bin's input gradient, candidate by candidate: for each, every channel adds its output
    gradient masked by "this candidate won" (no branch, no division: runs of channels the
    compiler vectorises). Cheaper than decoding each channel's winner when a bin has few."""
    for iyr in range(ny):
        iy = oy + iyr
        ly = fry[iy]
        hy = T(1.0) - ly
        for ixr in range(nx):
            ix = ox + ixr
            lx = frx[ix]
            hx = T(1.0) - lx
            code = (iyr << 32) | (ixr << 2)
            t00 = grad_feat[b, y0[iy], x0[ix]]
            t01 = grad_feat[b, y0[iy], x1_[ix]]
            t10 = grad_feat[b, y1_[iy], x0[ix]]
            t11 = grad_feat[b, y1_[iy], x1_[ix]]
            if onnx:  # the corner that won gets the gradient; one pass for all four (same sums, same order)
                w00, w01, w10, w11 = hy * hx, hy * lx, ly * hx, ly * lx
                for c in range(c0, c1):
                    q = arg[k, j, c] - code
                    g = grad[k, j, c]
                    t00[c] += (g if q == 0 else T(0.0)) * w00
                    t01[c] += (g if q == 1 else T(0.0)) * w01
                    t10[c] += (g if q == 2 else T(0.0)) * w10
                    t11[c] += (g if q == 3 else T(0.0)) * w11
            else:
                w00, w01, w10, w11 = hy * hx, hy * lx, ly * hx, ly * lx
                for c in range(c0, c1):
                    g = grad[k, j, c] if arg[k, j, c] == code else T(0.0)
                    t00[c] += g * w00
                    t01[c] += g * w01
                    t10[c] += g * w10
                    t11[c] += g * w11


@numba.njit(**JIT)
def _backward_input(grad, arg, geometry, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, onnx, c0, c1,
                    T, grad_feat):
    """Channels ``[c0, c1)`` of ``grad_feat`` ([N, H, W, C]) from ``grad`` ([K, bins, C]), every
    box in order. Each channel's winner is decoded from ``arg`` and its taps looked up in the
    bin's tables."""
    wide_vectors()
    _, height, width, _ = grad_feat.shape
    for k in range(grad.shape[0]):
        y1, roi_h, _, grid_h, x1, roi_w, _, grid_w, finite = axis_aligned_box(
            geometry, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if not finite:
            continue
        b = int(geometry[k, 0])
        bin_h = roi_h / T(pooled_h)
        bin_w = roi_w / T(pooled_w)
        fys, oys, y0, y1_, fry, _, _ = _axis_tables(y1, bin_h, grid_h, pooled_h, height, T)
        fxs, oxs, x0, x1_, frx, _, _ = _axis_tables(x1, bin_w, grid_w, pooled_w, width, T)
        for ph in range(pooled_h):
            ny = oys[ph + 1] - oys[ph]
            for pw in range(pooled_w):
                j = ph * pooled_w + pw
                nx = oxs[pw + 1] - oxs[pw]
                if ny * nx <= _FEW:
                    _few_winners(grad, arg, k, j, b, oys[ph], ny, oxs[pw], nx, y0, y1_, fry, x0, x1_, frx, onnx, c0,
                                 c1, T, grad_feat)
                    continue
                for c in range(c0, c1):
                    a = arg[k, j, c]
                    if a < 0:
                        continue
                    iy = (a >> 32) + oys[ph]
                    ix = ((a >> 2) & 0x3FFFFFFF) + oxs[pw]
                    ly, lx = fry[iy], frx[ix]
                    hy, hx = T(1.0) - ly, T(1.0) - lx
                    g = grad[k, j, c]
                    if onnx:
                        q = a & 3
                        r = y0[iy] if q < 2 else y1_[iy]
                        col = x0[ix] if q % 2 == 0 else x1_[ix]
                        wq = (hy if q < 2 else ly) * (hx if q % 2 == 0 else lx)
                        grad_feat[b, r, col, c] += g * wq
                    else:
                        grad_feat[b, y0[iy], x0[ix], c] += g * (hy * hx)
                        grad_feat[b, y0[iy], x1_[ix], c] += g * (hy * lx)
                        grad_feat[b, y1_[iy], x0[ix], c] += g * (ly * hx)
                        grad_feat[b, y1_[iy], x1_[ix], c] += g * (ly * lx)


@numba.njit(**JIT)
def _backward_rois(grad, arg, feat, geometry, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h,
                   pooled_w, onnx, T, out):
    """``out[k] = d loss / d (x1, y1, x2, y2)`` in scaled pixels for boxes ``order[lo:hi]``: each
    channel's winning sample's derivative (looked up as in ``_backward_input``)."""
    _, height, width, channels = feat.shape
    for k in order[lo:hi]:
        y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = axis_aligned_box(
            geometry, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if not finite:
            out[k, :] = np.nan
            continue
        b = int(geometry[k, 0])
        bin_h = roi_h / T(pooled_h)
        bin_w = roi_w / T(pooled_w)
        dx1 = dy1 = dx2 = dy2 = 0.0
        fys, oys, y0, y1_, fry, my, ty = _axis_tables(y1, bin_h, grid_h, pooled_h, height, T)
        fxs, oxs, x0, x1_, frx, mx, tx = _axis_tables(x1, bin_w, grid_w, pooled_w, width, T)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                j = ph * pooled_w + pw
                for c in range(channels):
                    a = arg[k, j, c]
                    if a < 0:
                        continue
                    iy = (a >> 32) + oys[ph]
                    ix = ((a >> 2) & 0x3FFFFFFF) + oxs[pw]
                    if not (my[iy] or mx[ix]):
                        continue
                    ly, lx = fry[iy], frx[ix]
                    hy, hx = T(1.0) - ly, T(1.0) - lx
                    g = grad[k, j, c]
                    f00, f01 = feat[b, y0[iy], x0[ix], c], feat[b, y0[iy], x1_[ix], c]
                    f10, f11 = feat[b, y1_[iy], x0[ix], c], feat[b, y1_[iy], x1_[ix], c]
                    if onnx:
                        q = a & 3
                        if q == 0:
                            sy, sx = -hx * f00, -hy * f00
                        elif q == 1:
                            sy, sx = -lx * f01, hy * f01
                        elif q == 2:
                            sy, sx = hx * f10, -ly * f10
                        else:
                            sy, sx = lx * f11, ly * f11
                    else:
                        sy = hx * (f10 - f00) + lx * (f11 - f01)
                        sx = hy * (f01 - f00) + ly * (f11 - f10)
                    sy = g * sy if my[iy] else T(0.0)
                    sx = g * sx if mx[ix] else T(0.0)
                    dy1 += sy * (1.0 if fixed_h else 1.0 - ty[iy])
                    dy2 += sy * (0.0 if fixed_h else ty[iy])
                    dx1 += sx * (1.0 if fixed_w else 1.0 - tx[ix])
                    dx2 += sx * (0.0 if fixed_w else tx[ix])
        out[k, 0] = dx1
        out[k, 1] = dy1
        out[k, 2] = dx2
        out[k, 3] = dy2


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, torch tensors out.


def _winners(feat: np.ndarray, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             sampling_ratio: int, aligned: bool, onnx: bool, record: bool, dtype: torch.dtype, arg=None):
    """Forward on the channels-last map ``feat``: (output, the winners if ``record``, geometry, T,
    the boxes' order).
    With ``record`` the winners go to ``arg`` ([K, bins, C] int64, every entry written)."""
    k, c = rois.shape[0], feat.shape[3]
    geometry, T = box_geometry(rois, dtype)
    out = result_tensor((k, c, pooled_height, pooled_width), dtype)
    out_np = out.view(k, c, pooled_height * pooled_width).numpy()
    if not record:
        arg = np.empty((0, 0, 0), np.int64)
    order, parts = band_order(geometry, spatial_scale, *feat.shape[:3]), ranges(k, 4 * workers.size())
    workers.run(_forward, [(feat, geometry, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_height,
                            pooled_width, onnx, T, out_np, arg, record) for lo, hi in parts])
    return out, arg, geometry, T, order


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, onnx: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    with channels_last_map(input.detach().to(dtype)) as feat:
        out = _winners(feat, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, onnx, False,
                       dtype)[0]
    return out.to(input.dtype)


def backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             sampling_ratio: int, aligned: bool, onnx: bool, channels_last: bool, want_input: bool = True,
             want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, box gradient ``[K, 5]``); one not wanted is zeros."""
    dtype = compute_dtype(input.dtype)
    n, c, h, w = input.shape
    k = rois.shape[0]
    # The map's copy, the winners and (for NCHW input, whose gradient is copied out) the
    # channels-last gradient live only during this call: scratch buffers, not fresh pages.
    with channels_last_map(input.detach().to(dtype)) as feat, \
            scratch((k, pooled_height * pooled_width, c), torch.int64) as arg, \
            (contextlib.nullcontext(result_tensor((n, h, w, c), dtype)) if channels_last else
             scratch((n, h, w, c), dtype)) as grad_feat:
        return _backward(feat, arg.numpy(), grad_feat.zero_(), grad, input, rois, spatial_scale, pooled_height,
                         pooled_width, sampling_ratio, aligned, onnx, channels_last, want_input, want_rois, dtype)


def _backward(feat: np.ndarray, arg: np.ndarray, grad_feat: Tensor, grad: Tensor, input: Tensor, rois: Tensor,
              spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
              onnx: bool, channels_last: bool, want_input: bool, want_rois: bool,
              dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, c, h, w = input.shape
    k = rois.shape[0]
    _, arg, geometry, T, order = _winners(feat, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                          aligned, onnx, True, dtype, arg)
    with channel_runs(grad, dtype) as grad_t:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if want_input:
            block = max(16, -(-c // workers.size()))
            workers.run(_backward_input, [(grad_t, arg, geometry, spatial_scale, aligned, sampling_ratio, pooled_height,
                                           pooled_width, onnx, c0, min(c, c0 + block), T, grad_feat.numpy())
                                          for c0 in range(0, c, block)])
        if channels_last:
            grad_input = grad_feat.permute(0, 3, 1, 2)
        else:
            grad_input = planar_from_channels_last(grad_feat)
        grad_input = grad_input.to(input.dtype, memory_format=memory_format)
        grad_rois = np.zeros((k, 4), dtype=T)
        if want_rois:
            workers.run(_backward_rois, [(grad_t, arg, feat, geometry, order, lo, hi, spatial_scale, aligned,
                                          sampling_ratio, pooled_height, pooled_width, onnx, T, grad_rois)
                                         for lo, hi in ranges(k, 4 * workers.size())])
    box = torch.from_numpy(grad_rois) * spatial_scale
    return grad_input, torch.cat((torch.zeros_like(box[:, :1]), box), 1).to(rois.dtype)


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64, both readings."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, 2, 3, 3, dtype=dtype)
        rois = torch.tensor([[0, 0.5, 0.5, 2.0, 2.0]] * 4, dtype=dtype)
        g = torch.zeros(4, 2, 1, 1, dtype=dtype)
        for onnx in (False, True):
            forward(x, rois, 1.0, 1, 1, 2, True, onnx)
            backward(g, x, rois, 1.0, 1, 1, 2, True, onnx, False)
