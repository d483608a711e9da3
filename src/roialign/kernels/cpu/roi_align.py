"""RoIAlign CPU kernels in Numba: forward, input gradient and box gradient.

Layout: the kernels read features channels-last (``[N, H, W, C]``), so that every bilinear tap
is one contiguous run of channels that the compiler vectorises. An NCHW input is transposed
once per call (by the thread pool of ``common``); for a handful of boxes on a large map a
planar kernel that reads NCHW directly is used instead, since the transpose would cost more
than the work. A channels_last input gets a channels_last output, pooled bin by bin in tiles of
the map (``_forward_bins``); an NCHW one is pooled box by box.

Threads (``threads.workers``): each job owns its part of the output (boxes, or bins, for
the forward, boxes for the box gradient, an image and a band of rows for the input gradient),
and each part is computed in a fixed order: results are bitwise identical from run to run and
for any number of threads, without atomics or locks.

Nothing is compiled at import; ``cache=True`` keeps the machine code on disk for the next
process. Geometry is computed in the rois' dtype (float32, or float64 for float64 inputs), in
the order of operations of the published kernels; accumulation is in float64 for float64
features and float32 for the others. float16 and bfloat16 maps are read and written in place
as bit patterns (``half_types``): no float32 copy of the map is made for them.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch
from torch import Tensor

from ..reference.common import compute_dtype, is_channels_last
from ..reference.roi_align import row_span
from .buffers import result_tensor
from .common import (JIT, ROW_PAD, aligned_empty, axis_aligned_box, band_of, band_order, bin_run, box_geometry,
                     channel_runs, counting_order, store_band, visible_samples, weigh_taps, wide_vectors)
from .half_types import HALF_TYPES, bfloat16_word, bfloat16_words, kernel_array, narrow, weigh_words, widen
from .layout import channels_last_map
from .threads import BAND_BYTES as L2_SHARE_BYTES, TAP_BAND_BYTES, band_rows, ranges, workers

# Bytes per band of the input gradient (``threads.TAP_BAND_BYTES``; tests set it to vary the bands).
BAND_BYTES = TAP_BAND_BYTES


# ----------------------------------------------------------------------------------------------
# Geometry: one box, one axis.


@numba.njit(**JIT)
def _tap_capacity(start, length, grid, pooled, size, T):
    """The most taps (two per visible sample) that any bin of this axis can have."""
    bin_size = length / T(pooled)
    most = 0
    for p in range(pooled):
        first, last = visible_samples(start + T(p) * bin_size, bin_size, grid, -1.0, size)
        most = max(most, last - first)
    return 2 * most


@numba.njit(inline="always", **JIT)
def _add_tap(index, weight, d_start, d_end, p, n, i, w, ds, de):
    """Append a tap to bin ``p`` (which has ``n``), or merge it into one of the last two with the
    same pixel: samples move monotonically, so a repeated pixel is always among those two."""
    for m in range(max(n - 2, 0), n):
        if index[p, m] == i:
            weight[p, m] += w
            d_start[p, m] += ds
            d_end[p, m] += de
            return n
    index[p, n] = i
    weight[p, n] = w
    d_start[p, n] = ds
    d_end[p, n] = de
    return n + 1


@numba.njit(**JIT)
def _axis_taps(start, length, fixed, grid, pooled, size, T, index, weight, d_start, d_end, count, derivatives):
    """Fill the taps of every bin along one axis: ``index``/``weight``/``d_start``/``d_end`` are
    ``[pooled, capacity]`` and ``count[p]`` says how many are used. Samples that read the same
    pixel share one tap (their weights add). ``d_*`` are the derivatives of the weight with
    respect to the (scaled) box start and end, holding ``grid`` fixed; 0 unless ``derivatives``
    (only the box gradient reads them; without their two divisions per sample, adaptive's
    channels_last forward took 0.90-0.96 of the time)."""
    bin_size = length / T(pooled)
    for p in range(pooled):
        base = start + T(p) * bin_size
        first, last = visible_samples(base, bin_size, grid, -1.0, size)
        n = 0
        for i in range(first, last):
            pos = base + T(i + 0.5) * bin_size / T(grid)
            if pos < -1 or pos > size:
                continue
            moves = pos > 0
            if pos <= 0:
                pos = T(0.0)
            low = int(pos)
            if low >= size - 1:
                low = size - 1
                high = low
                frac = T(0.0)
                moves = False
            else:
                high = low + 1
                frac = pos - T(low)
            ds, de = 0.0, 0.0
            if derivatives and moves:
                t = (p + (i + 0.5) / grid) / pooled
                ds = 1.0 if fixed else 1.0 - t
                de = 0.0 if fixed else t
            n = _add_tap(index, weight, d_start, d_end, p, n, low, T(1.0) - frac, -ds, -de)
            n = _add_tap(index, weight, d_start, d_end, p, n, high, frac, ds, de)
        count[p] = n


@numba.njit(**JIT)
def _capacity(rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T):
    """The largest tap counts, along y and along x, of the boxes ``order[lo:hi]``."""
    cap_y = 1
    cap_x = 1
    for j in range(lo, hi):
        k = order[j]
        y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = axis_aligned_box(
            rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if finite:
            cap_y = max(cap_y, _tap_capacity(y1, roi_h, grid_h, pooled_h, height, T))
            cap_x = max(cap_x, _tap_capacity(x1, roi_w, grid_w, pooled_w, width, T))
    return cap_y, cap_x


@numba.njit(**JIT)
def _box_taps(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T,
              yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn, derivatives=False):
    """Fill the y and x taps of box ``k``; returns whether the box is finite and its sample count
    ``max(grid_h * grid_w, 1)`` (as float64: the product of two large counts overflows int64)."""
    y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = axis_aligned_box(
        rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
    if finite:
        _axis_taps(y1, roi_h, fixed_h, grid_h, pooled_h, height, T, yi, yw, yd0, yd1, yn, derivatives)
        _axis_taps(x1, roi_w, fixed_w, grid_w, pooled_w, width, T, xi, xw, xd0, xd1, xn, derivatives)
    return finite, max(np.float64(grid_h) * np.float64(grid_w), 1.0)


@numba.njit(**JIT)
def _axis_buffers(pooled, capacity, T):
    return (np.empty((pooled, capacity), dtype=np.int64), np.empty((pooled, capacity), dtype=T),
            np.empty((pooled, capacity), dtype=np.float64), np.empty((pooled, capacity), dtype=np.float64),
            np.empty(pooled, dtype=np.int64))


@numba.njit(**JIT)
def _tap_buffers(rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T):
    """Tap buffers (index, weight, d_start, d_end, count) along y then x, large enough for every
    box ``order[lo:hi]``: allocated once per job, refilled per box by ``_box_taps``."""
    cap_y, cap_x = _capacity(rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w,
                             height, width, T)
    return _axis_buffers(pooled_h, cap_y, T) + _axis_buffers(pooled_w, cap_x, T)


# ----------------------------------------------------------------------------------------------
# Kernels. ``out``/``grad`` are [K, C, PH * PW]; channels-last features are [N, H, W, C]. Each
# kernel handles the boxes ``order[lo:hi]`` and sizes its tap buffers once for all of them.


@numba.njit(**JIT)
def _forward_nhwc(feat, rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T, out,
                  grouped, planar_out):
    """``grouped``: gather each bin's taps and add them eight or four per pass
    (``common.weigh_taps``), else one tap per pass. The same bits either way; see
    ``GROUPED_RUN_BYTES``. ``out`` is [K, C, PH * PW] when ``planar_out``, else channels-last,
    [K, PH * PW, C]."""
    wide_vectors()
    n_img, height, width, channels = feat.shape
    pixels = feat.reshape(n_img * height * width, channels)
    bins = pooled_h * pooled_w
    yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn = _tap_buffers(
        rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T)
    acc = np.empty((bins, channels + ROW_PAD), dtype=T)  # read by columns at the end
    at = np.empty(yi.shape[1] * xi.shape[1], dtype=np.int64)  # a bin's taps of nonzero weight
    weight = np.empty(yi.shape[1] * xi.shape[1], dtype=T)
    for j in range(lo, hi):
        k = order[j]
        b = int(rois[k, 0])
        finite, count = _box_taps(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width,
                                  T, yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn)
        if not finite or b < 0 or b >= n_img:
            out[k, :, :] = narrow(T(np.nan) if not finite else T(0.0), out)
            continue
        count = T(count)
        base = b * height * width
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                i = ph * pooled_w + pw
                if not grouped:
                    for c in range(channels):
                        acc[i, c] = 0
                n = 0
                for ty in range(yn[ph]):
                    wy = yw[ph, ty]
                    if wy == 0:
                        continue
                    row = yi[ph, ty] * width
                    for tx in range(xn[pw]):
                        w = wy * xw[pw, tx]
                        if w == 0:
                            continue
                        if grouped:
                            at[n] = row + xi[pw, tx]
                            weight[n] = w
                            n += 1
                        else:
                            p = base + row + xi[pw, tx]
                            for c in range(channels):
                                acc[i, c] += w * widen(pixels[p, c])
                if grouped:
                    weigh_taps(acc, i, pixels, base, at, weight, 0, n, T(0.0))
        if planar_out:
            for c in range(channels):
                for i in range(bins):
                    out[k, c, i] = narrow(acc[i, c] / count, out)
        else:
            for i in range(bins):
                for c in range(channels):
                    out[k, i, c] = narrow(acc[i, c] / count, out)


@numba.njit(**JIT)
def _row_order_taps(rois, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, n_img, T,
                    yi, yw, yn, xi, xw, xn, count, batch, key, out):
    """Taps of boxes ``[lo, hi)`` into the [K, ...] tables of :func:`_forward_bins`, with each box's
    sample count and image, and ``key[k, ph]``: where bin row ``ph`` starts reading (image, then
    pixel row), or -1 for a box whose output is filled here (NaN when not finite, else 0: an image
    that does not exist). :func:`_tile_order` reads only whether a key is -1."""
    yd0, yd1 = np.empty(yi.shape[1:]), np.empty(yi.shape[1:])
    xd0, xd1 = np.empty(xi.shape[1:]), np.empty(xi.shape[1:])
    for k in range(lo, hi):
        finite, n = _box_taps(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width,
                              T, yi[k], yw[k], yd0, yd1, yn[k], xi[k], xw[k], xd0, xd1, xn[k])
        b = int(rois[k, 0]) if finite else -1
        if not finite or b < 0 or b >= n_img:
            out[k, :, :] = narrow(T(np.nan) if not finite else T(0.0), out)
            key[k, :] = -1
            continue
        count[k] = T(n)
        batch[k] = b
        for ph in range(pooled_h):
            key[k, ph] = b * height + (yi[k, ph, 0] if yn[k, ph] > 0 else 0)


@numba.njit(**JIT)
def _tile_order(key, yi, yn, xi, xn, batch, height, width, side):
    """The bins to pool (``(k * PH + ph) * PW + pw``, for the boxes with ``key[k, ph] >= 0``), in
    tiles of ``side`` x ``side`` pixels: by image, band of ``side`` rows, block of ``side``
    columns (where each bin starts reading), then pixel row, ties in index order. Only the order
    of the bins changes with ``side``, never a bin's sum."""
    n_box, pooled_h = key.shape
    pooled_w = xi.shape[1]
    bands, blocks = (height + side - 1) // side, (width + side - 1) // side
    tile = np.empty((n_box, pooled_h, pooled_w), np.int64)
    for k in range(n_box):
        for ph in range(pooled_h):
            row = yi[k, ph, 0] if yn[k, ph] > 0 else 0
            band = (batch[k] * bands + row // side) * blocks
            for pw in range(pooled_w):
                if key[k, ph] < 0:
                    tile[k, ph, pw] = -1
                else:
                    col = xi[k, pw, 0] if xn[k, pw] > 0 else 0
                    tile[k, ph, pw] = (band + col // side) * side + row % side
    return counting_order(tile.reshape(-1))


@numba.njit(inline="always", **JIT)
def _bin_taps(yi, yw, yn, xi, xw, xn, k, ph, pw, width, at, weight):
    """The taps of nonzero weight of bin ``(ph, pw)`` of box ``k`` (from the [K, ...] tables of
    :func:`_row_order_taps`): returns their number ``n``, pixel ``at[t]`` of the image (row *
    width + column) with weight ``weight[t]`` for ``t < n``, in the order rows, then columns, as
    every forward adds them."""
    n = 0
    for ty in range(yn[k, ph]):
        wy = yw[k, ph, ty]
        if wy == 0:
            continue
        row = yi[k, ph, ty] * width
        for tx in range(xn[k, pw]):
            w = wy * xw[k, pw, tx]
            if w == 0:
                continue
            at[n] = row + xi[k, pw, tx]
            weight[n] = w
            n += 1
    return n


@numba.njit(**JIT)
def _forward_bins(feat, items, lo, hi, yi, yw, yn, xi, xw, xn, count, batch, T, out, grouped):
    """Bins ``items[lo:hi]`` (``(k * PH + ph) * PW + pw``) of the forward into the channels-last
    ``out`` ([K, PH * PW, C]), in that order: tile by tile (:func:`_tile_order`), so that the
    bins reading a patch of the map are pooled while it is in cache. Each bin is summed exactly
    as :func:`_forward_nhwc` sums it."""
    wide_vectors()
    n_img, height, width, channels = feat.shape
    pixels = feat.reshape(n_img * height * width, channels)
    pooled_h, pooled_w = yi.shape[1], xi.shape[1]
    acc = np.empty((1, channels), dtype=T)
    at = np.empty(yi.shape[2] * xi.shape[2], dtype=np.int64)  # the bin's taps of nonzero weight
    weight = np.empty(yi.shape[2] * xi.shape[2], dtype=T)
    for j in range(lo, hi):
        row_of_bins = items[j] // pooled_w
        pw = items[j] - row_of_bins * pooled_w
        k = row_of_bins // pooled_h
        ph = row_of_bins - k * pooled_h
        base = batch[k] * height * width
        if grouped:
            n = _bin_taps(yi, yw, yn, xi, xw, xn, k, ph, pw, width, at, weight)
            weigh_taps(acc, 0, pixels, base, at, weight, 0, n, T(0.0))
        else:
            for c in range(channels):
                acc[0, c] = 0
            for ty in range(yn[k, ph]):
                wy = yw[k, ph, ty]
                if wy == 0:
                    continue
                row = base + yi[k, ph, ty] * width
                for tx in range(xn[k, pw]):
                    w = wy * xw[k, pw, tx]
                    if w == 0:
                        continue
                    p = row + xi[k, pw, tx]
                    for c in range(channels):
                        acc[0, c] += w * widen(pixels[p, c])
        samples = count[k]
        for c in range(channels):
            out[k, ph * pooled_w + pw, c] = narrow(acc[0, c] / samples, out)


@numba.njit(**JIT)
def _forward_bins_words(words, items, lo, hi, yi, yw, yn, xi, xw, xn, count, batch, T, out):
    """:func:`_forward_bins` (grouped) for a bfloat16 map read as words of two channels
    (``half_types.bfloat16_words``: [N, H, W, C / 2] uint32) into ``out`` as words ([K, PH * PW,
    C / 2]): the same taps, sums and rounding, so the same bits."""
    wide_vectors()
    n_img, height, width, half = words.shape
    pixels = words.reshape(n_img * height * width, half)
    pooled_h, pooled_w = yi.shape[1], xi.shape[1]
    even = np.empty((1, half), dtype=T)  # channels 0, 2, 4, ... of the bin
    odd = np.empty((1, half), dtype=T)  # channels 1, 3, 5, ...
    at = np.empty(yi.shape[2] * xi.shape[2], dtype=np.int64)
    weight = np.empty(yi.shape[2] * xi.shape[2], dtype=T)
    for j in range(lo, hi):
        row_of_bins = items[j] // pooled_w
        pw = items[j] - row_of_bins * pooled_w
        k = row_of_bins // pooled_h
        ph = row_of_bins - k * pooled_h
        n = _bin_taps(yi, yw, yn, xi, xw, xn, k, ph, pw, width, at, weight)
        weigh_words(even, odd, 0, pixels, batch[k] * height * width, at, weight, 0, n, T(0.0))
        samples = count[k]
        for c in range(half):
            out[k, ph * pooled_w + pw, c] = bfloat16_word(even[0, c] / samples, odd[0, c] / samples)


@numba.njit(**JIT)
def _forward_nchw(feat, rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T, out):
    wide_vectors()
    n_img, channels, height, width = feat.shape
    yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn = _tap_buffers(
        rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T)
    for j in range(lo, hi):
        k = order[j]
        b = int(rois[k, 0])
        finite, count = _box_taps(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width,
                                  T, yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn)
        if not finite or b < 0 or b >= n_img:
            out[k, :, :] = narrow(T(np.nan) if not finite else T(0.0), out)
            continue
        count = T(count)
        for c in range(channels):
            plane = feat[b, c]
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    s = T(0.0)
                    for ty in range(yn[ph]):
                        wy = yw[ph, ty]
                        if wy == 0:
                            continue
                        row = plane[yi[ph, ty]]
                        for tx in range(xn[pw]):
                            w = wy * xw[pw, tx]
                            if w != 0:
                                s += w * widen(row[xi[pw, tx]])
                    out[k, c, ph * pooled_w + pw] = narrow(s / count, out)


@numba.njit(**JIT)
def _backward_input_rows(grad_t, rois, order, lo, hi, rows_of_box, b, r0, r1, spatial_scale, aligned, sampling_ratio,
                         pooled_h, pooled_w, T, grad_feat, planar):
    """Rows ``[r0, r1)`` of image ``b`` of the input gradient, accumulated over the image's boxes in
    order (``grad_t`` is the output gradient as [K, PH * PW, C], half bit patterns widened one bin
    at a time). A channels-last ``grad_feat`` ([N, H, W, C]) is accumulated in place; a ``planar``
    one ([N, C, H, W]) through a channels-last band that is then transposed into it. Each call owns
    its rows: no other call writes them."""
    wide_vectors()
    band = band_of(grad_feat, b, r0, r1, planar)
    width, channels = band.shape[1], grad_t.shape[2]
    height = grad_feat.shape[2] if planar else grad_feat.shape[1]
    yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn = _tap_buffers(
        rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T)
    widened = aligned_empty(channels, T)
    for j in range(lo, hi):
        k = order[j]
        if rows_of_box[k, 1] < r0 or rows_of_box[k, 0] >= r1:
            continue
        finite, count = _box_taps(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width,
                                  T, yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn)
        if not finite:
            continue
        count = T(count)
        for ph in range(pooled_h):
            hits = False
            for ty in range(yn[ph]):
                if r0 <= yi[ph, ty] < r1 and yw[ph, ty] != 0:
                    hits = True
            if not hits:
                continue
            for pw in range(pooled_w):
                g = bin_run(grad_t, k, ph * pooled_w + pw, widened)
                for ty in range(yn[ph]):
                    wy = yw[ph, ty]
                    r = yi[ph, ty]
                    if wy == 0 or r < r0 or r >= r1:
                        continue
                    for tx in range(xn[pw]):
                        w = wy * xw[pw, tx] / count
                        if w == 0:
                            continue
                        pixel = band[r - r0, xi[pw, tx]]
                        for c in range(channels):
                            pixel[c] += w * g[c]
    store_band(grad_feat, band, b, r0, planar)


@numba.njit(**JIT)
def _backward_rois_nhwc(grad, feat, rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w,
                        T, grad_rois):
    """Box gradient of boxes ``order[lo:hi]``: d/d(x1, y1, x2, y2) into ``grad_rois[:, 1:5]``."""
    n_img, height, width, channels = feat.shape
    yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn = _tap_buffers(
        rois, order, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width, T)
    g = aligned_empty(channels, T)
    for j in range(lo, hi):
        k = order[j]
        b = int(rois[k, 0])
        finite, count = _box_taps(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, height, width,
                                  T, yi, yw, yd0, yd1, yn, xi, xw, xd0, xd1, xn, True)
        if not finite:
            grad_rois[k, 1:5] = np.nan
            continue
        if b < 0 or b >= n_img:
            continue
        gx1 = 0.0
        gy1 = 0.0
        gx2 = 0.0
        gy2 = 0.0
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for c in range(channels):
                    g[c] = widen(grad[k, c, ph * pooled_w + pw])
                for ty in range(yn[ph]):
                    r = yi[ph, ty]
                    for tx in range(xn[pw]):
                        pixel = feat[b, r, xi[pw, tx]]
                        s = T(0.0)
                        for c in range(channels):
                            s += g[c] * widen(pixel[c])
                        s64 = np.float64(s)
                        wy = np.float64(yw[ph, ty])
                        wx = np.float64(xw[pw, tx])
                        gx1 += s64 * wy * xd0[pw, tx]
                        gx2 += s64 * wy * xd1[pw, tx]
                        gy1 += s64 * yd0[ph, ty] * wx
                        gy2 += s64 * yd1[ph, ty] * wx
        scale = spatial_scale / count
        grad_rois[k, 1] = gx1 * scale
        grad_rois[k, 2] = gy1 * scale
        grad_rois[k, 3] = gx2 * scale
        grad_rois[k, 4] = gy2 * scale


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, torch tensors out.


# The forward gathers a bin's taps and adds several per pass over the channels (``common.weigh_taps``)
# when a pixel's channels (in the accumulation type) take at least this many bytes; for shorter
# runs the gathering costs more than it saves. Both give the same bits (tested). Measured (2
# threads, Intel Xeon, median of 9 alternations against one tap per pass, whole forward): 256
# channels 0.84-0.97 of the time in float64, 0.94-1.02 in float32 and bfloat16; 64 channels
# 1.04-1.11 in float32 and bfloat16 (256 bytes), 0.99 in float64 (512 bytes). 1024 bytes until the
# seventh session of 2026-11-30; since eight taps per pass for float maps, runs of 512 bytes gain
# too (AMD EPYC, 2 threads, median of 16-24 alternations, channels_last / NCHW input): float64 on
# 64 channels 0.92 / 0.90 (adaptive) and 0.93 / 0.92 (a P3 map, 512 boxes); float32 on 128
# channels 0.94 / 0.96-0.98; bfloat16 on 128 channels 0.94-0.96 / 0.97-1.00, float16 0.91-0.98 /
# 0.98-1.00. Runs of 256 bytes still do not (float32 on 64 channels: 1.00-1.01 / 0.96-0.98).
GROUPED_RUN_BYTES = 512


# The forward pools bins tile by tile (``_forward_bins``, in :func:`_tile_order`), from tap tables
# of every box built first, when those tables take at most this many bytes (a few hundred KB for
# a detector's boxes; a huge box with dense adaptive sampling can need far more); else box by box
# (``_forward_nhwc``). The same bits either way (tested). Measured (one thread, Intel Xeon,
# float32, median of 15 alternations, kernels only), bin rows in the order of the pixel rows they
# read took 0.68 of the box-by-box time on mask-14, 0.63 on boxhead-P2, where boxes overlap and a
# box's pixels no longer fit in L2; tiles of bins then took 0.85 of the bin rows' time in
# float32 and 0.73 in float64 (boxhead-P2, two threads).
ROW_ORDER_TABLE_BYTES = 64 << 20


def tile_side(pixel_bytes: int) -> int:
    """Side, in pixels, of the tiles in which the channels-last forward pools its bins: the
    square whose pixels (plus the two-pixel margin a bin reads beyond where it starts) fill one
    thread's share of the L2 cache (``threads.BAND_BYTES``, read from the OS), within [8, 64].
    Only the order of the bins depends on it, never a result.

    Measured (Intel Xeon, 2 MB of L2 per core, boxhead-P2 channels_last, the kernel alone, two
    threads, medians of 11 alternations): bins in tiles of 8 to 64 pixels took 10.2-11.3 ms in
    float32 and 20.7-22.2 ms in float64, against 12.0-12.7 and 28.3-30.0 ms for bin rows in the
    order of their pixel rows; bins one by one in row order, without tiles, 11.5 and 25.2 ms.
    This rule gives 43 pixels for float32 and 30 for float64 there."""
    side = math.isqrt(max(1, L2_SHARE_BYTES // max(1, pixel_bytes))) - 2
    return max(8, min(64, side))


def _image_size(input: Tensor) -> tuple[int, int, int]:
    """Images, height and width of an [N, C, H, W] map."""
    return input.shape[0], input.shape[2], input.shape[3]


def _planar_is_cheaper(k: int, shape: torch.Size, pooled: int, sampling_ratio: int) -> bool:
    """Reading NCHW directly beats transposing the whole map when there is little work per pixel."""
    n, c, h, w = shape
    taps = 4 * (sampling_ratio * sampling_ratio if sampling_ratio > 0 else 4)
    return k * pooled * taps < n * h * w


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, channels_last_out: bool | None = None) -> Tensor:
    """``channels_last_out``: the output's layout (default: the input's). The bin rows are pooled
    in row order only for a channels_last input and output."""
    dtype = compute_dtype(input.dtype)
    k, c = rois.shape[0], input.shape[1]
    geometry, T = box_geometry(rois, dtype)
    x = input.detach()
    channels_last = is_channels_last(x)
    if channels_last_out is None:
        channels_last_out = channels_last
    if channels_last_out:  # one run of channels per bin
        out_cl = result_tensor((k, pooled_height, pooled_width, c), input.dtype)
        out_np = kernel_array(out_cl.view(k, pooled_height * pooled_width, c))
        out = out_cl.permute(0, 3, 1, 2)
    else:
        out = result_tensor((k, c, pooled_height, pooled_width), input.dtype)
        out_np = kernel_array(out.view(k, c, pooled_height * pooled_width))
    grouped = c * torch.finfo(dtype).bits // 8 >= GROUPED_RUN_BYTES
    n, _, h, w = x.shape
    by_rows = channels_last and channels_last_out
    if by_rows:  # the tables' size (an NCHW input's box-by-box jobs size their own buffers)
        cap_y, cap_x = _capacity(geometry, np.arange(k), 0, k, spatial_scale, aligned, sampling_ratio, pooled_height,
                                 pooled_width, h, w, T)
        table_bytes = k * (pooled_height * cap_y + pooled_width * cap_x) * (8 + np.dtype(T).itemsize)
        by_rows = table_bytes <= ROW_ORDER_TABLE_BYTES
    if not by_rows:
        # Box by box, in band order; each box is pooled alone, so the order never changes a result.
        order, parts = band_order(geometry, spatial_scale, *_image_size(input)), ranges(k, 4 * workers.size())
        if not channels_last and _planar_is_cheaper(k, x.shape, pooled_height * pooled_width, sampling_ratio):
            workers.run(_forward_nchw, [(kernel_array(x.contiguous()), geometry, order, lo, hi, spatial_scale,
                                         aligned, sampling_ratio, pooled_height, pooled_width, T, out_np)
                                        for lo, hi in parts])
            return out
        with channels_last_map(x) as feat:
            workers.run(_forward_nhwc, [(feat, geometry, order, lo, hi, spatial_scale, aligned, sampling_ratio,
                                         pooled_height, pooled_width, T, out_np, grouped, not channels_last_out)
                                        for lo, hi in parts])
        return out
    with channels_last_map(x) as feat:
        yi, yn = np.empty((k, pooled_height, cap_y), np.int64), np.zeros((k, pooled_height), np.int64)
        xi, xn = np.empty((k, pooled_width, cap_x), np.int64), np.zeros((k, pooled_width), np.int64)
        yw, xw = np.empty((k, pooled_height, cap_y), T), np.empty((k, pooled_width, cap_x), T)
        count, batch = np.empty(k, T), np.zeros(k, np.int64)
        key = np.empty((k, pooled_height), np.int64)
        # One job per thread: a box's taps cost about the same for every box, and each job
        # more costs the pool a hand-over (about 3 µs each, measured on 2 cores).
        workers.run(_row_order_taps, [(geometry, lo, hi, spatial_scale, aligned, sampling_ratio, pooled_height,
                                       pooled_width, h, w, n, T, yi, yw, yn, xi, xw, xn, count, batch, key, out_np)
                                      for lo, hi in ranges(k, workers.size())])
        items = _tile_order(key, yi, yn, xi, xn, batch, h, w, tile_side(c * x.element_size()))
        parts = ranges(items.size, 4 * workers.size())
        # bfloat16 grouped: read and written as words of two channels where they fit (the same
        # bits). Measured against element by element (whole forward, AMD EPYC, alternating, 24
        # rounds): one thread 0.98 of the time on mask-14, 0.96 on boxhead-P2, 0.93 on train-P3;
        # two threads 1.00, 0.97 and 0.94-0.97.
        words, out_words = (bfloat16_words(feat), bfloat16_words(out_np)) if grouped else (None, None)
        if words is not None and out_words is not None:
            workers.run(_forward_bins_words, [(words, items, lo, hi, yi, yw, yn, xi, xw, xn, count, batch, T,
                                               out_words) for lo, hi in parts])
            return out
        workers.run(_forward_bins, [(feat, items, lo, hi, yi, yw, yn, xi, xw, xn, count, batch, T, out_np, grouped)
                                    for lo, hi in parts])
    return out


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    geometry, T = box_geometry(rois, dtype)
    with channel_runs(grad, dtype, halves=True) as grad_t:
        # Boxes grouped by image, each group in its original order: a fixed order of accumulation,
        # and each job owns a band of rows of one image, so the result does not depend on threads.
        batch = torch.from_numpy(geometry[:, 0]).long()
        order = torch.argsort(batch, stable=True).numpy()
        bounds = torch.searchsorted(batch[order].contiguous(), torch.arange(batch_size + 1)).numpy()
        rows = row_span(rois, spatial_scale, aligned, height).numpy()
        # A half gradient is accumulated in float32 bands and rounded as each band is stored.
        if channels_last:
            grad_input = result_tensor((batch_size, height, width, channels), grad.dtype)
            target = kernel_array(grad_input)
            result = grad_input.permute(0, 3, 1, 2)
        else:
            grad_input = result_tensor((batch_size, channels, height, width), grad.dtype)
            target, result = kernel_array(grad_input), grad_input
        band = band_rows(BAND_BYTES, width * channels * torch.finfo(dtype).bits // 8, height, batch_size)
        jobs = [(grad_t, geometry, order, int(bounds[b]), int(bounds[b + 1]), rows, b, r0, min(height, r0 + band),
                 spatial_scale, aligned, sampling_ratio, pooled_height, pooled_width, T, target, not channels_last)
                for b in range(batch_size) for r0 in range(0, height, band)]
        workers.run(_backward_input_rows, jobs)
    return result


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    geometry, T = box_geometry(rois, dtype)
    k, c = rois.shape[0], input.shape[1]
    grad_np = kernel_array(grad.detach().contiguous().view(k, c, -1))
    grad_rois = np.zeros((k, 5), dtype=np.float64)
    order, parts = band_order(geometry, spatial_scale, *_image_size(input)), ranges(k, 4 * workers.size())
    with channels_last_map(input) as feat:
        workers.run(_backward_rois_nhwc, [(grad_np, feat, geometry, order, lo, hi, spatial_scale, aligned,
                                            sampling_ratio, pooled_height, pooled_width, T, grad_rois)
                                           for lo, hi in parts])
    return torch.from_numpy(grad_rois).to(rois.dtype)


@contextlib.contextmanager
def _box_by_box():
    """The forward's box-by-box order (see ``ROW_ORDER_TABLE_BYTES``) for the duration of a ``with`` block."""
    global ROW_ORDER_TABLE_BYTES
    saved, ROW_ORDER_TABLE_BYTES = ROW_ORDER_TABLE_BYTES, -1
    try:
        yield
    finally:
        ROW_ORDER_TABLE_BYTES = saved


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel for every floating dtype."""
    for dtype in (torch.float32, torch.float64) + HALF_TYPES:
        x = torch.zeros(1, 2, 3, 3, dtype=dtype)
        rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]] * 40, dtype=dtype)
        g = torch.zeros(40, 2, 1, 1, dtype=dtype)
        forward(x, rois, 1.0, 1, 1, 0, True)
        forward(x, rois[:1], 1.0, 1, 1, 0, True)
        x_cl = torch.zeros(1, 2, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        forward(x_cl, rois, 1.0, 1, 1, 0, True)
        if dtype == torch.bfloat16:  # enough channels for the grouped sums, read as words
            wide = torch.zeros(1, GROUPED_RUN_BYTES // 4, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
            forward(wide, rois[:1], 1.0, 1, 1, 0, True)
        with _box_by_box():
            forward(x_cl, rois, 1.0, 1, 1, 0, True)
        for channels_last in (False, True):
            backward_input(g, rois, 1.0, 1, 1, 1, 2, 3, 3, 0, True, channels_last)
        backward_rois(g, x, rois, 1.0, 1, 1, 0, True)
