"""The specification of rotated RoIAlign: slow, explicit float64 loops over boxes, bins and samples.

A box is ``(batch index, centre x, centre y, width, height, angle)``. Sample ``(iy, ix)`` of bin
``(ph, pw)`` sits at box-local ``(yy, xx)`` (the box's own axes, origin at its centre) and is
turned by the angle around the centre::

    yy = -h/2 + ph * h/PH + (iy + 0.5) * (h/PH) / grid_h      (xx likewise with w, PW, grid_w)
    y  = yy * cos(theta) - xx * sin(theta) + cy
    x  = yy * sin(theta) + xx * cos(theta) + cx

The angle is reduced in float64 before any trigonometry (degrees: modulo 360, then to the
nearest multiple of 90, which is applied exactly); cos and sin are then rounded to the
geometry precision, in which the positions are computed in the published order of operations.
Adaptive sample counts (``ceil`` of the bin size) stop at 2^24 per axis with float32 geometry
and 2^52 with float64, where that precision stops counting sample indices exactly; so a huge box
keeps a bounded number of samples near the map. Interpolation and sums are float64. The box gradient is the analytic derivative, holding the
adaptive sample counts fixed; ``tests/test_rotated.py`` checks it against finite differences.
"""

from __future__ import annotations

import math

import numpy as np

from oracle import _bilinear


def rotation(angle: float, degrees: bool, clockwise: bool) -> tuple[float, float]:
    """(cos, sin) of the box angle, in float64, exact at multiples of 90 degrees."""
    a = -angle if clockwise else angle
    if not math.isfinite(a):
        return math.nan, math.nan
    if not degrees:
        return math.cos(a), math.sin(a)
    a = math.fmod(a, 360.0)
    quarter = round(a / 90.0)
    rad = (a - 90.0 * quarter) * (math.pi / 180.0)
    c, s = math.cos(rad), math.sin(rad)
    for _ in range(quarter % 4):
        c, s = -s, c  # one more quarter turn: cos(t + 90) = -sin t, sin(t + 90) = cos t
    return c, s


def _candidates(start, bin_size, grid, lo, hi):
    """Sample indices of a bin to try: those within 2 samples of the ones whose box-local
    coordinate lies in ``[lo, hi]`` (the caller widens it well beyond float32 rounding); every
    one of them is then tested exactly."""
    if grid <= 64 or bin_size == 0:
        return range(grid)
    step = float(bin_size) / grid
    a, b = (lo - float(start)) / step - 0.5, (hi - float(start)) / step - 0.5
    return range(max(0, math.floor(a) - 2), min(grid, math.ceil(b) + 3))


def roi_align_rotated(x, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned=True, clockwise=False,
                      degrees=True, grad_out=None, geometry=np.float32):
    """Forward, and with ``grad_out`` the input gradient and the box gradient ``[K, 6]``
    (d/d centre x, centre y, width, height, angle in the caller's unit), all float64."""
    x = np.asarray(x, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    n, c, h, w = x.shape
    out = np.zeros((rois.shape[0], c, pooled_h, pooled_w))
    grad_x = np.zeros_like(x)
    grad_rois = np.zeros((rois.shape[0], 6))
    g = geometry
    angle_factor = (-1.0 if clockwise else 1.0) * (math.pi / 180.0 if degrees else 1.0)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        offset = g(0.5) if aligned else g(0.0)
        cx = g(rois[k, 1]) * g(spatial_scale) - offset
        cy = g(rois[k, 2]) * g(spatial_scale) - offset
        roi_w = g(rois[k, 3]) * g(spatial_scale)
        roi_h = g(rois[k, 4]) * g(spatial_scale)
        fixed_w = fixed_h = False
        if not aligned:
            if roi_w < 1:
                roi_w, fixed_w = g(1.0), True
            if roi_h < 1:
                roi_h, fixed_h = g(1.0), True
        cos64, sin64 = rotation(float(rois[k, 5]), degrees, clockwise)
        cos_t, sin_t = g(cos64), g(sin64)
        if not all(np.isfinite(v) for v in (cx, cy, roi_w, roi_h, cos_t, sin_t)):
            out[k] = np.nan
            grad_rois[k, 1:] = np.nan
            continue
        bin_h, bin_w = roi_h / g(pooled_h), roi_w / g(pooled_w)
        # Adaptive counts stop where the geometry precision stops counting sample indices exactly.
        limit = 2**24 if g is np.float32 else 2**52
        grid_h = sampling_ratio if sampling_ratio > 0 else min(max(int(math.ceil(bin_h)), 0), limit)
        grid_w = sampling_ratio if sampling_ratio > 0 else min(max(int(math.ceil(bin_w)), 0), limit)
        count = max(grid_h * grid_w, 1)
        start_h, start_w = -roi_h / g(2.0), -roi_w / g(2.0)
        # The map [-1, H] x [-1, W] in box-local coordinates, for the gigantic-grid shortcut.
        corners = [(yc - float(cy), xc - float(cx)) for yc in (-1.0, h) for xc in (-1.0, w)]
        # Widened well beyond the rounding of positions: units in the last place of the centre and
        # map, and of the box's size along each axis.
        unit = 1e-5 if g is np.float32 else 1e-5 * 2.0**-29
        reach = abs(float(cx)) + abs(float(cy)) + h + w
        margin_y, margin_x = 2.0 + unit * (reach + float(roi_h)), 2.0 + unit * (reach + float(roi_w))
        local_y = [dy * cos64 + dx * sin64 for dy, dx in corners]
        local_x = [-dy * sin64 + dx * cos64 for dy, dx in corners]
        y_range = (min(local_y) - margin_y, max(local_y) + margin_y)
        x_range = (min(local_x) - margin_x, max(local_x) + margin_x)
        for ph in range(pooled_h):
            base_y = start_h + g(ph) * bin_h
            for pw in range(pooled_w):
                base_x = start_w + g(pw) * bin_w
                for iy in _candidates(base_y, bin_h, grid_h, *y_range):
                    yy = base_y + g(iy + 0.5) * bin_h / g(grid_h)
                    ty = -0.5 + (ph + (iy + 0.5) / grid_h) / pooled_h  # yy / h
                    for ix in _candidates(base_x, bin_w, grid_w, *x_range):
                        xx = base_x + g(ix + 0.5) * bin_w / g(grid_w)
                        tx = -0.5 + (pw + (ix + 0.5) / grid_w) / pooled_w
                        yy_cos, xx_sin = yy * cos_t, xx * sin_t
                        yy_sin, xx_cos = yy * sin_t, xx * cos_t
                        y = yy_cos - xx_sin + cy
                        xpos = yy_sin + xx_cos + cx
                        if not (-1.0 <= y <= h and -1.0 <= xpos <= w):
                            continue  # off the map: no value and no derivative (even if yy overflowed)
                        value, d_y, d_x, taps = _bilinear(x[b], float(y), float(xpos))
                        out[k, :, ph, pw] += value / count
                        if grad_out is None:
                            continue
                        go = np.asarray(grad_out[k, :, ph, pw], dtype=np.float64) / count
                        for r, q, wt in taps:
                            grad_x[b, :, r, q] += go * wt
                        sy, sx = float(go @ d_y), float(go @ d_x)
                        c64, s64 = float(cos_t), float(sin_t)
                        grad_rois[k, 1] += sx * spatial_scale
                        grad_rois[k, 2] += sy * spatial_scale
                        if not fixed_w:
                            grad_rois[k, 3] += (sy * -tx * s64 + sx * tx * c64) * spatial_scale
                        if not fixed_h:
                            grad_rois[k, 4] += (sy * ty * c64 + sx * ty * s64) * spatial_scale
                        yy64, xx64 = float(yy), float(xx)
                        d_theta = sy * -(yy64 * s64 + xx64 * c64) + sx * (yy64 * c64 - xx64 * s64)
                        grad_rois[k, 5] += d_theta * angle_factor
    return out, grad_x, grad_rois
