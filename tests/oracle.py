"""The specification: RoIAlign as slow, explicit float64 loops over boxes, bins and samples.

Sample positions are computed in ``geometry`` precision (float32 for float32/half inputs, as
every published kernel does, float64 for float64), in the published order of operations, so
that the oracle and a kernel look at exactly the same points; every interpolation and sum is
in float64. The box gradient is the analytic derivative of each bilinear sample, holding the
adaptive sample count fixed; ``test_oracle_box_gradient_matches_finite_differences`` checks it.
"""

from __future__ import annotations

import math

import numpy as np


def _bilinear(plane: np.ndarray, y: float, x: float):
    """Value, d/dy, d/dx and the four (row, col, weight) taps of one sample; ``plane`` is [C, H, W]."""
    _, h, w = plane.shape
    zero = np.zeros(plane.shape[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return zero, zero, zero, []
    moves_y, moves_x = y > 0, x > 0  # a clamped coordinate does not move the sample
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= h - 1:
        y_low = y_high = h - 1
        ly, moves_y = 0.0, False
    else:
        y_high, ly = y_low + 1, y - y_low
    if x_low >= w - 1:
        x_low = x_high = w - 1
        lx, moves_x = 0.0, False
    else:
        x_high, lx = x_low + 1, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    f00, f01 = plane[:, y_low, x_low], plane[:, y_low, x_high]
    f10, f11 = plane[:, y_high, x_low], plane[:, y_high, x_high]
    value = hy * hx * f00 + hy * lx * f01 + ly * hx * f10 + ly * lx * f11
    d_y = (hx * (f10 - f00) + lx * (f11 - f01)) if moves_y else zero
    d_x = (hy * (f01 - f00) + ly * (f11 - f10)) if moves_x else zero
    taps = [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]
    return value, d_y, d_x, taps


def _candidates(base, bin_size, grid, size):
    """The sample indices of a bin to try: all of them, unless the bin has over 10^5 samples.

    Then (adaptive sampling of a gigantic box) only indices within 2000 of those whose exact
    position lies in [-1, size]: float32 rounding moves a sample by far less than 2000 sample
    spacings, so every sample that can land on the map is tried, and tested exactly.
    """
    if grid <= 100_000:
        return range(grid)
    step = float(bin_size) / grid
    a, b = (-1.0 - float(base)) / step - 0.5, (size - float(base)) / step - 0.5
    lo, hi = min(a, b), max(a, b)
    return range(max(0, math.floor(lo) - 2000), min(grid, math.ceil(hi) + 2000))


def roi_align(x, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, grad_out=None,
              geometry=np.float32):
    """Forward, and with ``grad_out`` also the input and box gradients, all as float64 arrays."""
    x = np.asarray(x, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    n, c, h, w = x.shape
    k_boxes = rois.shape[0]
    out = np.zeros((k_boxes, c, pooled_h, pooled_w))
    grad_x = np.zeros_like(x)
    grad_rois = np.zeros((k_boxes, 5))
    g = geometry
    for k in range(k_boxes):
        b = int(rois[k, 0])
        offset = g(0.5) if aligned else g(0.0)
        x1, y1, x2, y2 = (g(v) * g(spatial_scale) - offset for v in rois[k, 1:5])
        roi_w, roi_h = x2 - x1, y2 - y1
        fixed_w = fixed_h = False
        if not aligned:
            if roi_w < 1:
                roi_w, fixed_w = g(1.0), True
            if roi_h < 1:
                roi_h, fixed_h = g(1.0), True
        if not all(np.isfinite(v) for v in (x1, y1, x2, y2, roi_w, roi_h)):
            out[k] = np.nan
            grad_rois[k, 1:] = np.nan
            continue
        bin_h, bin_w = roi_h / g(pooled_h), roi_w / g(pooled_w)
        grid_h = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(bin_h)), 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(bin_w)), 0)
        count = max(grid_h * grid_w, 1)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for iy in _candidates(y1 + g(ph) * bin_h, bin_h, grid_h, h):
                    yy = y1 + g(ph) * bin_h + g(iy + 0.5) * bin_h / g(grid_h)
                    if bin_h > 0 and yy > h:
                        break  # samples only move further down
                    ty = (ph + (iy + 0.5) / grid_h) / pooled_h
                    for ix in _candidates(x1 + g(pw) * bin_w, bin_w, grid_w, w):
                        xx = x1 + g(pw) * bin_w + g(ix + 0.5) * bin_w / g(grid_w)
                        if bin_w > 0 and xx > w:
                            break
                        tx = (pw + (ix + 0.5) / grid_w) / pooled_w
                        value, d_y, d_x, taps = _bilinear(x[b], float(yy), float(xx))
                        out[k, :, ph, pw] += value / count
                        if grad_out is None:
                            continue
                        go = np.asarray(grad_out[k, :, ph, pw], dtype=np.float64) / count
                        for r, q, wt in taps:
                            grad_x[b, :, r, q] += go * wt
                        sy, sx = float(go @ d_y), float(go @ d_x)
                        grad_rois[k, 1] += sx * (1.0 if fixed_w else 1.0 - tx) * spatial_scale
                        grad_rois[k, 3] += sx * (0.0 if fixed_w else tx) * spatial_scale
                        grad_rois[k, 2] += sy * (1.0 if fixed_h else 1.0 - ty) * spatial_scale
                        grad_rois[k, 4] += sy * (0.0 if fixed_h else ty) * spatial_scale
    return out, grad_x, grad_rois
