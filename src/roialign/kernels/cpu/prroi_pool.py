"""Precise RoI Pooling on the CPU: Numba kernels on our thread pool, bitwise deterministic.

The formulas are ``kernels/reference/prroi_pool.py``'s (see there). Per box, one job computes
two tables per axis: the bin's entries into the float64, channels-last integral image (at most
6 per axis), and, when the bin touches few pixels, those pixels' own weights. A box whose bins
are all narrow reads the map itself; the others read the integral image, which is built only
when some box needs it. Either way a table entry is one contiguous run of channels.

- integral image: one pass per (image, block of channels), each row adding its running sum to
  the row above.
- forward: threads take runs of boxes (in band order, for cache reuse), and each box first
  computes its pixel tables itself (a separate pass over the boxes, with tables for all of
  them in memory, took about a fifth of the adaptive forward); only boxes too wide for those
  tables go through the geometry pass, afterwards. Per box, each row the bins read is summed
  along x once for every bin column, then the bins sum their rows, four entries per pass,
  each pass over a whole bin column (or bin row). The sums are in the source's dtype: float64 through
  the integral image; through the map, float32 unless the input is float64 (as in RoIAlign).
- input gradient: the same two steps transposed, band by band of rows from the bottom, into
  the band's gradient (boxes that read the map) or the band's integral-image gradient, whose
  suffix sums (its adjoint) are then added, the column sums carried up to the next band. Each
  job owns one image and a block of channels and walks that image's boxes in order, so each
  element has one writer and a fixed order of accumulation; the bands stay in cache and are
  written straight into the gradient's layout and dtype.
- box gradient: one run of boxes per job; per entry, one dot product over channels with the
  output gradient serves the derivatives by all four edges of the bin.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from ..reference import prroi_pool as shared
from ..reference.common import compute_dtype
from .buffers import empty, result_tensor, scratch_buffers
from .common import JIT, ROW_PAD, band_order, channel_runs, wide_vectors
from .half_types import widen
from .layout import channels_last_map
from .threads import BAND_BYTES, ranges, workers


# The geometry of ``kernels/reference/prroi_pool.py`` (see there), per box: the same formulas,
# without the hundred small tensor operations that cost more than the kernel on small workloads.


@numba.njit(inline="always", **JIT)
def _tap(start, end, i, derivatives):
    """(weight, d/d start, d/d end) of pixel ``i`` in the bin ``[start, end]`` (the derivatives
    0.0 unless ``derivatives``)."""
    u, v, width = start - i, end - i, end - start
    hu = max(0.0, 1.0 - abs(u))
    if width <= 0.0:
        slope = 0.5 if (u >= -1.0 and u < 0.0) else (-0.5 if (u >= 0.0 and u < 1.0) else 0.0)
        return hu, slope, slope
    weight = 0.0
    for lo in (-1.0, 0.0):
        hi = lo + 1.0
        covered = max(0.0, width - max(0.0, lo - u) - max(0.0, v - hi))
        weight += covered * (1.0 - abs(0.5 * (max(u, lo) + min(v, hi))))
    weight /= width
    if not derivatives:
        return weight, 0.0, 0.0
    return weight, (weight - hu) / width, (max(0.0, 1.0 - abs(v)) - weight) / width


@numba.njit(inline="always", **JIT)
def _corner(x, size):
    """(n, a0, a1, a2, da0, da1, da2) of the prefix form at ``x``."""
    x = min(max(x, -3.0), size + 3.0)
    n = np.floor(x)
    t = x - n
    return int(n), (1 - t) ** 2 / 2, 0.5 + t - t * t, t * t / 2, t - 1, 1 - 2 * t, t


@numba.njit(inline="always", **JIT)
def _pixels(start, end, size):
    """(first, count) of the map's pixels whose hats reach into the bin ``[start, end]`` (one,
    of weight 0, for a bin off the map)."""
    first = min(max(np.floor(min(max(start, -1.0), size)), 0.0), size - 1.0)
    last = min(max(np.ceil(min(max(end, -1.0), size)), 0.0), size - 1.0)
    return int(first), max(int(last - first) + 1, 1)


@numba.njit(**JIT)
def _axis(start, end, size, k, p, index, value, d_start, d_end):
    """Row ``[k, p]`` of the four ``Axis`` arrays: the bin ``[start, end]`` along ``size`` pixels."""
    f, taps = _pixels(start, end, size)
    if taps < 6:
        pw, pds, pde = 0.0, 0.0, 0.0
        for e in range(6):
            w, ds, de = _tap(start, end, f + e, True) if e < taps else (0.0, 0.0, 0.0)
            index[k, p, e] = min(f + e, size)
            value[k, p, e], d_start[k, p, e], d_end[k, p, e] = pw - w, pds - ds, pde - de
            pw, pds, pde = w, ds, de
        return
    width = end - start
    n, a0, a1, a2, da0, da1, da2 = _corner(start, size)
    for e, a, da in ((0, a0, da0), (1, a1, da1), (2, a2, da2)):
        index[k, p, e] = min(max(n + e, 0), size)
        value[k, p, e] = -a / width
        d_start[k, p, e] = (-da + value[k, p, e]) / width
        d_end[k, p, e] = -value[k, p, e] / width
    n, a0, a1, a2, da0, da1, da2 = _corner(end, size)
    for e, a, da in ((3, a0, da0), (4, a1, da1), (5, a2, da2)):
        index[k, p, e] = min(max(n + e - 3, 0), size)
        value[k, p, e] = a / width
        d_start[k, p, e] = value[k, p, e] / width
        d_end[k, p, e] = (da - value[k, p, e]) / width


@numba.njit(**JIT)
def _axis_taps(start, end, size, k, p, index, value, d_start, d_end, derivatives):
    """Row ``[k, p]`` of the direct tables: the bin's pixels themselves (index, weight and, if
    ``derivatives``, its derivatives), when there are at most ``index.shape[2]`` of them; returns
    whether there are."""
    f, taps = _pixels(start, end, size)
    fits = taps <= index.shape[2]
    for e in range(index.shape[2]):
        index[k, p, e] = min(f + e, size - 1)
        if fits and e < taps:
            value[k, p, e], d_start[k, p, e], d_end[k, p, e] = _tap(start, end, f + e, derivatives)
        else:
            value[k, p, e], d_start[k, p, e], d_end[k, p, e] = 0.0, 0.0, 0.0
    return fits


@numba.njit(inline="always", **JIT)
def _box_bins(rois, k, spatial_scale, pooled_h, pooled_w):
    """(x1, y1, bin width, bin height, finite) of box ``k`` in pixels; a box with a coordinate,
    a width or a height that is not finite (``1.7e308 - -1.7e308``) is placed at the origin, with
    bins of size 0."""
    x1, y1 = rois[k, 1] * spatial_scale, rois[k, 2] * spatial_scale
    x2, y2 = rois[k, 3] * spatial_scale, rois[k, 4] * spatial_scale
    finite = (np.isfinite(x1) and np.isfinite(y1) and np.isfinite(x2) and np.isfinite(y2)
              and np.isfinite(x2 - x1) and np.isfinite(y2 - y1))
    if not finite:
        x1, y1, x2, y2 = 0.0, 0.0, 0.0, 0.0
    return x1, y1, max(x2 - x1, 0.0) / pooled_w, max(y2 - y1, 0.0) / pooled_h, finite


@numba.njit(**JIT)
def _box_taps(x1, y1, bw, bh, height, width, k, xi, xv, xds, xde, yi, yv, yds, yde, derivatives):
    """Row ``k`` of the direct tables, both axes (see :func:`_axis_taps`); returns whether every
    bin fits them."""
    fits = True
    for p in range(xi.shape[1]):
        fits &= _axis_taps(x1 + bw * p, x1 + bw * (p + 1), width, k, p, xi, xv, xds, xde, derivatives)
    for q in range(yi.shape[1]):
        fits &= _axis_taps(y1 + bh * q, y1 + bh * (q + 1), height, k, q, yi, yv, yds, yde, derivatives)
    return fits


@numba.njit(**JIT)
def _geometry_kernel(rois, spatial_scale, height, width, lo, hi, both, finite, batch, direct, xi, xv, xds, xde, yi, yv,
                     yds, yde, txi, txv, txds, txde, tyi, tyv, tyds, tyde):
    """Boxes ``[lo, hi)``. With ``both`` (the backward), both tables of every box, derivatives
    included; otherwise (the forward) no derivatives, and the integral-image tables only of the
    boxes that do not fit the direct ones (the others' rows stay undefined)."""
    pooled_h, pooled_w = yi.shape[1], xi.shape[1]
    for k in range(lo, hi):
        x1, y1, bw, bh, finite[k] = _box_bins(rois, k, spatial_scale, pooled_h, pooled_w)
        batch[k] = int(rois[k, 0])
        fits = _box_taps(x1, y1, bw, bh, height, width, k, txi, txv, txds, txde, tyi, tyv, tyds, tyde, both)
        direct[k] = fits
        if both or not fits:
            for p in range(pooled_w):
                _axis(x1 + bw * p, x1 + bw * (p + 1), width, k, p, xi, xv, xds, xde)
            for q in range(pooled_h):
                _axis(y1 + bh * q, y1 + bh * (q + 1), height, k, q, yi, yv, yds, yde)


@numba.njit(inline="always", **JIT)
def _updates(k, xi, xv, yi, yv, seen):
    """Channel-run updates of box ``k``'s scatter through the tables (xi, xv, yi, yv): rows it
    reaches times column entries, plus the spreading of the bins' gradients onto those rows."""
    rows, cols, spread = 0, 0, 0
    for q in range(yi.shape[1]):
        for e in range(yi.shape[2]):
            if yv[k, q, e] != 0.0:
                spread += xi.shape[1]
                if seen[yi[k, q, e]] != k:
                    seen[yi[k, q, e]] = k
                    rows += 1
    for p in range(xi.shape[1]):
        for e in range(xi.shape[2]):
            cols += xv[k, p, e] != 0.0
    return float(rows * cols + spread)


@numba.njit(**JIT)
def _path_costs(txi, txv, tyi, tyv, xi, xv, yi, yv, height, lo, hi, cost):
    """``cost[k] = (through the map, through the integral image)`` for boxes ``[lo, hi)``."""
    seen = np.full(height + 2, -1, np.int64)
    for k in range(lo, hi):
        cost[k, 0] = _updates(k, txi, txv, tyi, tyv, seen)
        seen[:] = -1
        cost[k, 1] = _updates(k, xi, xv, yi, yv, seen)
        seen[:] = -1


@numba.njit(**JIT)
def _integral(feat, b, c0, c1, s):
    """``s[b, r, k, c] = feat[b, :r, :k, c].sum()`` for channels ``[c0, c1)``, in one pass: each
    row adds its running sum to the row above (which is still in cache)."""
    wide_vectors()
    height, width = feat.shape[1], feat.shape[2]
    acc = np.empty(c1 - c0, np.float64)
    s[b, 0, :, c0:c1] = 0.0
    for r in range(height):
        acc[:] = 0.0
        s[b, r + 1, 0, c0:c1] = 0.0
        for k in range(width):
            pixel, above, here = feat[b, r, k, c0:c1], s[b, r, k + 1, c0:c1], s[b, r + 1, k + 1, c0:c1]
            for c in range(c1 - c0):
                acc[c] += pixel[c]
                here[c] = above[c] + acc[c]


@numba.njit(inline="always", **JIT)
def _rows_read(k, yi, yv, yds, yde, derivatives, used, shift, r0, r1):
    """Mark ``used[r - r0]`` for the rows ``r`` in ``[r0, r1)`` that box ``k``'s table entries read
    (table row minus ``shift``) with a nonzero value coefficient, or derivative coefficient when
    ``derivatives``; return (first, last), or (r1, r0 - 1) when none."""
    first, last = r1, r0 - 1
    for q in range(yi.shape[1]):
        for ey in range(yi.shape[2]):
            if yv[k, q, ey] != 0.0 or (derivatives and (yds[k, q, ey] != 0.0 or yde[k, q, ey] != 0.0)):
                r = yi[k, q, ey] - shift
                if r0 <= r < r1:
                    used[r - r0] = True
                    first, last = min(first, r), max(last, r)
    return first, last


@numba.njit(inline="always", **JIT)
def _nonzero(index, value, k, p, at, weight, first):
    """Copy the entries of ``(index, value)[k, p]`` whose value is nonzero to ``at[first:]`` and
    ``weight[first:]``; return how many there are."""
    n = 0
    for e in range(index.shape[2]):
        if value[k, p, e] != 0.0:
            at[first + n], weight[first + n] = index[k, p, e], value[k, p, e]
            n += 1
    return n


@numba.njit(inline="always", **JIT)
def _spread_rows(grad, k, yi, yv, shift, r0, r1, first, last, used, c0, spread):
    """``spread[r - r0, p, c] = sum over (q, ey) reading row r of yv[k, q, ey] * grad[k, q * PW + p,
    c0 + c]``, for the rows marked by :func:`_rows_read`."""
    pooled_w, channels = spread.shape[1], spread.shape[2]
    for r in range(first, last + 1):
        if used[r - r0]:
            spread[r - r0] = 0.0
    for q in range(yi.shape[1]):
        for ey in range(yi.shape[2]):
            cy, r = yv[k, q, ey], yi[k, q, ey] - shift
            if cy != 0.0 and r0 <= r < r1:
                for p in range(pooled_w):
                    i = q * pooled_w + p
                    for c in range(channels):
                        spread[r - r0, p, c] += cy * grad[k, i, c0 + c]


@numba.njit(inline="always", **JIT)
def _weigh_strided(acc, i0, src, s0, stride, used, first, last, at, weight, n, zero):
    """For each ``j`` in ``[first, last]`` marked in ``used``: ``acc[i0 + j] = zero + w[0] *
    src[s0 + j * stride + at[0]] + ... + w[n - 1] * src[s0 + j * stride + at[n - 1]]`` (over
    ``src``'s channels), added left to right as in ``common.weigh_taps``, four entries per pass
    (the same additions, so the same bits). Each pass goes over every ``j``, so the entries are
    read once, not once per ``j``, and the first pass stores instead of adding to a cleared row.
    Rows pass: one bin column's sums along x of the box's pixel rows; bins pass: one bin row's
    sums of those. (A ``weigh_taps`` call per row and bin column took 1.08-1.15x the time on
    the adaptive and mask-14 forwards.)"""
    channels = src.shape[1]
    e = 0
    while e < max(n, 1):
        m = min(n - e, 4)
        pa, pb, pc, pd = at[e], at[e + 1], at[e + 2], at[e + 3]
        wa, wb, wc, wd = weight[e], weight[e + 1], weight[e + 2], weight[e + 3]
        for j in range(first, last + 1):
            if used[j]:
                o, i = s0 + j * stride, i0 + j
                if m >= 4:
                    for c in range(channels):
                        acc[i, c] = ((acc[i, c] if e else zero) + wa * widen(src[o + pa, c])
                                     + wb * widen(src[o + pb, c]) + wc * widen(src[o + pc, c])
                                     + wd * widen(src[o + pd, c]))
                elif m == 3:
                    for c in range(channels):
                        acc[i, c] = ((acc[i, c] if e else zero) + wa * widen(src[o + pa, c])
                                     + wb * widen(src[o + pb, c]) + wc * widen(src[o + pc, c]))
                elif m == 2:
                    for c in range(channels):
                        acc[i, c] = (acc[i, c] if e else zero) + wa * widen(src[o + pa, c]) + wb * widen(src[o + pb, c])
                elif m == 1:
                    for c in range(channels):
                        acc[i, c] = (acc[i, c] if e else zero) + wa * widen(src[o + pa, c])
                else:
                    for c in range(channels):
                        acc[i, c] = zero
        e += 4


@numba.njit(**JIT)
def _forward(s, rois, spatial_scale, direct, xi, xv, yi, yv, boxes, deferred, out):
    """Boxes ``boxes``: ``out[k, c, q * PW + p]``. Per box, each row the bins read is first
    summed along x for every bin column (rows are shared by neighbouring bins), then the bins
    sum their rows. Accumulated in the dtype of ``s``: the map's (float32 but for float64 input)
    or the integral image's (float64).

    With ``direct``, ``s`` is the map and each box first computes its direct tables (into the
    job's own, shaped as ``xi`` ... ``yv``, of which only the shapes are read); a box whose bins do
    not fit them is skipped and marked in ``deferred``, one that is not finite gives NaN.
    Otherwise ``s`` is the integral image and the tables are the boxes' integral-image entries."""
    wide_vectors()
    n_img, height, width, channels = s.shape
    pixels = s.reshape(n_img * height * width, channels)
    pooled_h, pooled_w = yi.shape[1], xi.shape[1]
    if direct:
        xi, xv = np.empty((1, pooled_w, xi.shape[2]), np.int64), np.empty((1, pooled_w, xi.shape[2]))
        yi, yv = np.empty((1, pooled_h, yi.shape[2]), np.int64), np.empty((1, pooled_h, yi.shape[2]))
    # the direct tables' derivative slots, which the forward does not read
    slopes_x, slopes_y = np.empty((1, pooled_w, xi.shape[2])), np.empty((1, pooled_h, yi.shape[2]))
    rows = np.empty((pooled_w * height, channels), s.dtype)  # [p * H + r]: row r through bin column p
    bins = np.empty((pooled_h * pooled_w, channels + ROW_PAD), s.dtype)  # read by columns at the end
    used = np.zeros(height, np.bool_)
    entries = max(xi.shape[2], yi.shape[2])
    # a bin column's or a bin row's nonzero entries
    at = np.empty(entries + 3, np.int64)
    weight = np.empty(entries + 3, s.dtype)
    columns = np.ones(pooled_w, np.bool_)
    zero = np.zeros(1, s.dtype)[0]
    for k in boxes:
        t = k  # the box's row of the tables
        if direct:
            t = 0
            x1, y1, bw, bh, finite = _box_bins(rois, k, spatial_scale, pooled_h, pooled_w)
            if not finite:
                out[k] = np.nan
                continue
            if not _box_taps(x1, y1, bw, bh, height, width, 0, xi, xv, slopes_x, slopes_x, yi, yv, slopes_y, slopes_y,
                             False):
                deferred[k] = True
                continue
        base = int(rois[k, 0]) * height * width
        first, last = _rows_read(t, yi, yv, yv, yv, False, used, 0, 0, height)
        for p in range(pooled_w):
            n = _nonzero(xi, xv, t, p, at, weight, 0)
            _weigh_strided(rows, p * height, pixels, base, width, used, first, last, at, weight, n, zero)
        for r in range(first, last + 1):
            used[r] = False
        for q in range(pooled_h):
            n = _nonzero(yi, yv, t, q, at, weight, 0)
            _weigh_strided(bins, q * pooled_w, rows, 0, height, columns, 0, pooled_w - 1, at, weight, n, zero)
        for c in range(channels):
            for i in range(pooled_h * pooled_w):
                out[k, c, i] = bins[i, c]


@numba.njit(inline="always", **JIT)
def _scatter_band(grad, k, yi, yv, xi, xv, shift, r0, r1, c0, spread, used, target):
    """Add box ``k``'s output gradient (channels ``[c0, c0 + target.shape[2])``) to the rows of
    ``target`` that fall in the band of pixel rows ``[r0, r1)``, through the tables (yi, yv, xi, xv):
    per row, the bins' gradients weighed by that row's entries (``spread``), then per column entry.
    Table rows are pixel rows plus ``shift`` (1 for the integral image's)."""
    pooled_w, entries, channels = xi.shape[1], xi.shape[2], target.shape[2]
    first, last = _rows_read(k, yi, yv, yv, yv, False, used, shift, r0, r1)
    _spread_rows(grad, k, yi, yv, shift, r0, r1, first, last, used, c0, spread)
    for r in range(first, last + 1):
        if not used[r - r0]:
            continue
        used[r - r0] = False
        for p in range(pooled_w):
            for ex in range(entries):
                cx = xv[k, p, ex]
                if cx != 0.0:
                    col = xi[k, p, ex]
                    for c in range(channels):
                        target[r - r0, col, c] += cx * spread[r - r0, p, c]


@numba.njit(**JIT)
def _backward_input(grad, boxes, finite, direct, spans, txi, txv, tyi, tyv, xi, xv, yi, yv, b, c0, c1, band_rows,
                    grad_input, planar):
    """Image ``b``'s input gradient, channels ``[c0, c1)``, from its boxes ``boxes`` (in order), into
    ``grad_input`` ([N, C, H, W] when ``planar``, else [N, H, W, C]; float32 or float64).

    Bands of rows, from the bottom: boxes that read the map add their pixels' shares to the band
    (``g``), the others add theirs to the integral image's gradient (``d``), whose suffix sums
    (its adjoint) are then added, carried upwards from band to band in ``carry``. Both are float64
    and stay in cache; each element has one writer and a fixed order of accumulation."""
    wide_vectors()
    height, width = (grad_input.shape[2], grad_input.shape[3]) if planar else (grad_input.shape[1],
                                                                                 grad_input.shape[2])
    channels = c1 - c0
    g = np.empty((band_rows, width, channels))
    d = np.empty((band_rows, width + 1, channels))
    spread = np.empty((band_rows, txi.shape[1], channels))
    used = np.zeros(band_rows, np.bool_)
    carry = np.zeros((width + 1, channels))
    acc = np.empty(channels)
    integral = False
    for k in boxes:
        integral |= finite[k] and not direct[k]
    r1 = height
    while r1 > 0:
        r0 = max(0, r1 - band_rows)
        g[:r1 - r0] = 0.0
        if integral:
            d[:r1 - r0] = 0.0
        for k in boxes:
            if not finite[k] or spans[k, 1] < r0 or spans[k, 0] >= r1:
                continue
            if direct[k]:
                _scatter_band(grad, k, tyi, tyv, txi, txv, 0, r0, r1, c0, spread, used, g)
            else:
                _scatter_band(grad, k, yi, yv, xi, xv, 1, r0, r1, c0, spread, used, d)
        if integral:  # grad_feat[j, i] += sum of the integral image's gradient over [j + 1:, i + 1:]
            for r in range(r1 - 1, r0 - 1, -1):
                acc[:] = 0.0
                row, out = d[r - r0], g[r - r0]
                for i in range(width, 0, -1):
                    for c in range(channels):
                        acc[c] += row[i, c]
                        total = acc[c] + carry[i, c]
                        carry[i, c] = total
                        out[i - 1, c] += total
        if planar:
            for c in range(channels):
                for r in range(r0, r1):
                    dest, src = grad_input[b, c0 + c, r], g[r - r0]
                    for i in range(width):
                        dest[i] = src[i, c]
        else:
            grad_input[b, r0:r1, :, c0:c1] = g[:r1 - r0]
        r1 = r0


@numba.njit(**JIT)
def _backward_rois(grad, s, batch, finite, xi, xv, xds, xde, yi, yv, yds, yde, boxes, gxs, gxe, gys, gye):
    """Boxes ``boxes``: derivatives of ``sum(grad * out)`` by every bin's four edges.

    Every derivative is a table entry's derivative coefficients times one number, the entry's
    dot product with the output gradient: along x, ``sum over rows and channels of the output
    gradient spread onto the row (as for the input gradient) * the entry's pixel of that row``;
    along y, ``sum over bin columns and channels of the output gradient * the entry's row summed
    along x (as in the forward)``. The dot products are accumulated per channel (one multiply-add
    per entry, row and channel) and summed over the channels once per entry."""
    wide_vectors()
    channels = s.shape[3]
    pooled_h, pooled_w, entries = yi.shape[1], xi.shape[1], xi.shape[2]
    rows = np.empty((s.shape[1], pooled_w, channels), np.float64)
    spread = np.empty((s.shape[1], pooled_w, channels), np.float64)
    used = np.zeros(s.shape[1], np.bool_)
    along_x = np.empty((pooled_w, entries, channels))
    along_y = np.empty(channels)
    for k in boxes:
        if not finite[k]:
            continue
        b = batch[k]
        first, last = _rows_read(k, yi, yv, yds, yde, True, used, 0, 0, used.shape[0])
        _spread_rows(grad, k, yi, yv, 0, 0, used.shape[0], first, last, used, 0, spread)
        along_x[:] = 0.0
        for r in range(first, last + 1):
            if not used[r]:
                continue
            used[r] = False
            for p in range(pooled_w):
                for c in range(channels):
                    rows[r, p, c] = 0.0
                for ex in range(entries):
                    cx = xv[k, p, ex]
                    if cx == 0.0 and xds[k, p, ex] == 0.0 and xde[k, p, ex] == 0.0:
                        continue
                    col = xi[k, p, ex]
                    for c in range(channels):
                        pixel = s[b, r, col, c]
                        rows[r, p, c] += cx * pixel
                        along_x[p, ex, c] += spread[r, p, c] * pixel
        for p in range(pooled_w):
            for ex in range(entries):
                if xds[k, p, ex] != 0.0 or xde[k, p, ex] != 0.0:
                    dot = along_x[p, ex].sum()
                    gxs[k, p] += xds[k, p, ex] * dot
                    gxe[k, p] += xde[k, p, ex] * dot
        for q in range(pooled_h):
            for ey in range(entries):
                ds, de = yds[k, q, ey], yde[k, q, ey]
                if ds == 0.0 and de == 0.0:
                    continue
                r = yi[k, q, ey]
                along_y[:] = 0.0
                for p in range(pooled_w):
                    i = q * pooled_w + p
                    for c in range(channels):
                        along_y[c] += grad[k, i, c] * rows[r, p, c]
                dot = along_y.sum()
                gys[k, q] += ds * dot
                gye[k, q] += de * dot


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, torch tensors out.


# A box whose bins touch at most this many pixels along each axis reads the map itself (its
# pixels' weights, a few per bin); wider ones read the integral image (6 x 6 entries per bin),
# which is built only when some box needs it: with few boxes its construction costs more than
# it saves (mask-14: about 30 ms for 100 boxes). Tests set both to 0 to send every box through
# the integral image.
_DIRECT_TAPS = 12
# The backward chooses per box, among those that fit, by counting channel-run updates
# (``_path_costs``): a wide bin costs one update per pixel and row through the map, six per row
# through the integral image, whose rows are fewer too. An image's boxes use the integral image
# only if together they save more than its fixed cost, in the same updates per pixel: the
# suffix sums of the input gradient (about 4, measured against the scatter's: zeroing, two
# running sums, one added store) and the integral image the box gradient reads (about 2, as
# the forward's). Box-gradient updates count twice (row sums, then dot products).
# Counted from the problem's sizes, so a choice, and the bits, never depend on the host.
_DIRECT_TAPS_BACKWARD = 12
_SUFFIX_UNITS, _INTEGRAL_IMAGE_UNITS = 4.0, 2.0


def _integral_image(feat: np.ndarray, buffer=empty) -> np.ndarray:
    """The float64 integral image [N, H + 1, W + 1, C] of ``feat``, in ``buffer(shape, dtype)``."""
    n, h, w, c = feat.shape
    s = buffer((n, h + 1, w + 1, c), torch.float64).numpy()
    block = max(8, -(-c // max(1, workers.size() // n)))
    workers.run(_integral, [(feat, b, c0, min(c, c0 + block), s) for b in range(n) for c0 in range(0, c, block)])
    return s


class _Geometry:
    """Both tables of every box (integral-image entries, and the direct pixel taps) and which
    boxes use which; ``paths()`` yields (source name, boxes in band order, tables)."""

    def __init__(self, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int, images: int,
                 height: int, width: int, taps: int, weights: tuple[float, float] | None = None) -> None:
        """``weights``: (per update, per pixel of fixed cost) to choose paths by cost (the
        backward), or None to send every box that fits through the map (the forward)."""
        k, entries = rois.shape[0], shared.ENTRIES
        r = rois.detach().double().contiguous().numpy()
        self.finite, self.batch, self.direct = np.empty(k, np.bool_), np.empty(k, np.int64), np.empty(k, np.bool_)

        def tables(pooled: int, width_: int) -> list[np.ndarray]:
            return [np.empty((k, pooled, width_), np.int64)] + [np.empty((k, pooled, width_)) for _ in range(3)]

        self.integral = tables(pooled_width, entries) + tables(pooled_height, entries)
        self.taps = tables(pooled_width, taps) + tables(pooled_height, taps)
        jobs = ranges(k, 2 * workers.size())
        workers.run(_geometry_kernel, [(r, spatial_scale, height, width, lo, hi, weights is not None, self.finite,
                                        self.batch, self.direct, *self.integral, *self.taps) for lo, hi in jobs])
        if weights is not None and k:
            self._choose(height, width, weights, jobs)
        self.finite_t = torch.from_numpy(self.finite)
        self.order = band_order(r, spatial_scale, images, height, width)

    def _choose(self, height: int, width: int, weights: tuple[float, float], jobs) -> None:
        cost = np.empty((self.direct.size, 2))
        (txi, txv, _, _, tyi, tyv, _, _), (xi, xv, _, _, yi, yv, _, _) = self.taps, self.integral
        workers.run(_path_costs, [(txi, txv, tyi, tyv, xi, xv, yi, yv, height, lo, hi, cost) for lo, hi in jobs])
        fits = self.direct & self.finite
        cheaper = fits & (cost[:, 0] <= cost[:, 1])
        batch = np.where(self.finite, self.batch, 0)  # a NaN box's image index is no index
        saving = np.bincount(batch, weights=np.where(fits & ~cheaper, cost[:, 0] - cost[:, 1], 0.0)) * weights[0]
        forced = np.bincount(batch, weights=self.finite & ~fits) > 0
        worth = forced | (saving > weights[1] * height * width)
        self.direct = np.where(worth[batch], cheaper, fits)

    def paths(self, boxes: np.ndarray | None = None):
        boxes = self.order if boxes is None else boxes
        direct = self.direct[boxes]
        for name, chosen, tables in (("map", boxes[direct], self.taps), ("integral", boxes[~direct], self.integral)):
            if chosen.size:
                yield name, chosen, tables


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    """Boxes whose bins fit the direct tables, computed per box by the jobs themselves, read the
    map; the others (none, in the usual cases) then read the integral image."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    r = rois.detach().double().contiguous().numpy()
    order = band_order(r, spatial_scale, n, h, w)
    out = result_tensor((k, c, pooled_height, pooled_width), compute_dtype(input.dtype))
    out_np = out.view(k, c, pooled_height * pooled_width).numpy()
    deferred = np.zeros(k, np.bool_)
    shapes = [np.empty((1, size, _DIRECT_TAPS), dtype) for size in (pooled_width, pooled_height)
              for dtype in (np.int64, np.float64)]
    with channels_last_map(input.detach().to(compute_dtype(input.dtype))) as feat, scratch_buffers() as buffer:
        workers.run(_forward, [(feat, r, spatial_scale, True, *shapes, order[lo:hi], deferred, out_np)
                               for lo, hi in ranges(k, 4 * workers.size())])
        if deferred.any():
            geo = _Geometry(rois, spatial_scale, pooled_height, pooled_width, n, h, w, _DIRECT_TAPS)
            boxes = order[deferred[order]]
            assert not geo.direct[boxes].any()  # the same test of the same tables
            xi, xv, _, _, yi, yv, _, _ = geo.integral
            s = _integral_image(feat, buffer)
            workers.run(_forward, [(s, r, spatial_scale, False, xi, xv, yi, yv, boxes[lo:hi], deferred, out_np)
                                   for lo, hi in ranges(boxes.size, 4 * workers.size())])
    return out.to(input.dtype)


def _row_spans(geo: "_Geometry") -> np.ndarray:
    """[K, 2]: the first and last pixel rows each box's input gradient reaches, through the table
    it uses ((int64 max, -1) when it reaches none, so that every band skips it)."""
    spans = np.empty((geo.direct.size, 2), np.int64)
    for chosen, (index, value), shift in ((geo.direct, geo.taps[4:6], 0), (~geo.direct, geo.integral[4:6], 1)):
        rows = index[chosen] - shift
        nonzero = value[chosen] != 0.0
        none = np.iinfo(np.int64).max
        spans[chosen, 0] = np.where(nonzero, rows, none).min(axis=(1, 2), initial=none)
        spans[chosen, 1] = np.where(nonzero, rows, -1).max(axis=(1, 2), initial=-1)
    return spans


def _input_gradient(grad_t: np.ndarray, geo: "_Geometry", input: Tensor, channels_last: bool) -> Tensor:
    """The input gradient in the input's layout and dtype. Jobs: (image, block of channels)."""
    n, c, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    if channels_last:
        grad_input = result_tensor((n, h, w, c), dtype)
        result = grad_input.permute(0, 3, 1, 2)
    else:
        grad_input = result = result_tensor((n, c, h, w), dtype)
    order = np.argsort(geo.batch, kind="stable")
    starts = np.searchsorted(geo.batch[order], np.arange(n + 1))
    spans = _row_spans(geo)
    # One job per thread where the channels allow: every block of an image does the same work,
    # and a wide block is cheaper per channel (each update is one run of the block's channels).
    # The band's three float64 buffers (gradient, integral-image gradient, spread rows) fill
    # about BAND_BYTES.
    blocks = max(1, min(-(-workers.size() // n), c // 32))
    block = -(-c // blocks)
    band_rows = max(1, BAND_BYTES // (8 * block * (2 * w + 1 + geo.taps[0].shape[1])))
    (txi, txv, _, _, tyi, tyv, _, _), (xi, xv, _, _, yi, yv, _, _) = geo.taps, geo.integral
    workers.run(_backward_input, [(grad_t, order[starts[b]:starts[b + 1]], geo.finite, geo.direct, spans, txi, txv,
                                   tyi, tyv, xi, xv, yi, yv, b, c0, min(c, c0 + block), band_rows, grad_input.numpy(),
                                   not channels_last)
                                  for b in range(n) for c0 in range(0, c, block)])
    return result.to(input.dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             channels_last: bool, want_input: bool = True, want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, box gradient ``[K, 5]``); one not wanted is zeros."""
    n, _, h, w = input.shape
    weights = (want_input + 2.0 * want_rois, want_input * _SUFFIX_UNITS + want_rois * _INTEGRAL_IMAGE_UNITS)
    geo = _Geometry(rois, spatial_scale, pooled_height, pooled_width, n, h, w, _DIRECT_TAPS_BACKWARD, weights)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_input, grad_rois = None, rois.new_zeros(rois.shape)
    with channel_runs(grad, torch.float64) as grad_t, scratch_buffers() as buffer:
        if want_input:
            grad_input = _input_gradient(grad_t, geo, input, channels_last)
        if want_rois:
            grad_rois = _box_gradient(grad_t, geo, input, rois, spatial_scale, buffer)
    if grad_input is None:
        grad_input = torch.zeros_like(input, memory_format=memory_format)
    return grad_input, grad_rois


def _box_gradient(grad_t: np.ndarray, geo: "_Geometry", input: Tensor, rois: Tensor, spatial_scale: float,
                  buffer) -> Tensor:
    """The box gradient [K, 5]: the derivatives by the bins' edges, then by the box's coordinates."""
    k, pooled_width, pooled_height = rois.shape[0], geo.taps[0].shape[1], geo.taps[4].shape[1]
    gxs, gxe = np.zeros((k, pooled_width)), np.zeros((k, pooled_width))
    gys, gye = np.zeros((k, pooled_height)), np.zeros((k, pooled_height))
    with channels_last_map(input.detach().to(compute_dtype(input.dtype))) as feat:
        s = _integral_image(feat, buffer) if not geo.direct.all() else None
        for name, boxes, tables in geo.paths():
            source = feat if name == "map" else s
            workers.run(_backward_rois, [(grad_t, source, geo.batch, geo.finite, *tables, boxes[lo:hi], gxs, gxe, gys,
                                          gye) for lo, hi in ranges(boxes.size, 4 * workers.size())])
    grad_rois = shared.box_gradient(rois, spatial_scale, geo.finite_t,
                                    *(torch.from_numpy(t) for t in (gxs, gxe, gys, gye)))
    return grad_rois.to(rois.dtype)


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel, for float32 and float64 input."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, 2, 3, 3, dtype=dtype)
        rois = torch.tensor([[0, 0.5, 0.5, 2.0, 2.0]] * 4, dtype=dtype)
        forward(x, rois, 1.0, 1, 1)
        backward(torch.zeros(4, 2, 1, 1, dtype=dtype), x, rois, 1.0, 1, 1, False)
