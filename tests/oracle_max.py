"""The specification of max-mode RoIAlign: explicit float64 loops over boxes, bins, channels and samples.

Two readings of "max":

- ``"max"`` (mmcv's ``pool_mode='max'``): a bin's value is the largest of its samples' bilinear
  values; a sample outside ``[-1, H] x [-1, W]`` has value 0 and takes part; the first sample in
  row-major order (sample row, then sample column) wins a tie; a bin without samples is 0. The
  gradient of a bin goes to the winning sample only: its four pixels with their bilinear
  weights (no division by the sample count), and its position's derivative to the box.
- ``"onnx_max"`` (the ONNX reference and onnxruntime): a sample's value is the largest of its
  four weighted corner terms ``w_i * f_i`` (first corner wins a tie, corners in the order
  (low, low), (low, high), (high, low), (high, high)); then the largest over samples as above.
  The gradient goes to the selected corner of the winning sample.

Sample positions are computed as in ``oracle.roi_align`` (geometry precision, published order of
operations); everything else is float64.
"""

from __future__ import annotations

import math

import numpy as np

from oracle import _bilinear


def _sample(plane, y, x, onnx):
    """(value [C], d value/dy [C], d value/dx [C], taps) of one sample; taps are (row, col, weight [C])
    lists of the pixels that the value depends on, with the weight per channel."""
    c, h, w = plane.shape
    value, d_y, d_x, taps = _bilinear(plane, y, x)
    if not onnx or not taps:
        return value, d_y, d_x, [(r, q, np.full(c, wt)) for r, q, wt in taps]
    # The weighted corner terms; derivatives of each corner's weight by y and x.
    (r0, q0, w00), (_, q1, w01), (r1, _, w10), (_, _, w11) = taps
    hy, hx = w00 + w01, w00 + w10  # 1 - ly and 1 - lx (the weights sum per row and column)
    ly, lx = 1.0 - hy, 1.0 - hx
    moves_y, moves_x = _moves(y, h), _moves(x, w)
    corners = [(r0, q0, w00, -hx, -hy), (r0, q1, w01, -lx, hy), (r1, q0, w10, hx, -ly), (r1, q1, w11, lx, ly)]
    value = np.empty(c)
    d_y = np.zeros(c)
    d_x = np.zeros(c)
    chosen = []
    for ch in range(c):
        best = None
        for i, (r, q, wt, dwy, dwx) in enumerate(corners):
            term = wt * plane[ch, r, q]
            if best is None or term > best[0]:
                best = (term, i)
        value[ch] = best[0]
        r, q, wt, dwy, dwx = corners[best[1]]
        d_y[ch] = dwy * plane[ch, r, q] if moves_y else 0.0
        d_x[ch] = dwx * plane[ch, r, q] if moves_x else 0.0
        chosen.append(best[1])
    taps_c = []
    for i, (r, q, wt, _, _) in enumerate(corners):
        taps_c.append((r, q, np.where(np.array(chosen) == i, wt, 0.0)))
    return value, d_y, d_x, taps_c


def _moves(pos, size):
    """Whether a sample at ``pos`` (inside [-1, size]) moves with its coordinate."""
    return pos > 0 and math.floor(pos) < size - 1


def roi_align_max(x, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, mode="max", grad_out=None,
                  geometry=np.float32):
    """Forward, and with ``grad_out`` also the input and box gradients, as float64 arrays."""
    assert mode in ("max", "onnx_max")
    onnx = mode == "onnx_max"
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
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                best = None  # per channel: value, d_y, d_x, taps, ty, tx of the winning sample
                for iy in range(grid_h):
                    yy = y1 + g(ph) * bin_h + g(iy + 0.5) * bin_h / g(grid_h)
                    ty = (ph + (iy + 0.5) / grid_h) / pooled_h
                    for ix in range(grid_w):
                        xx = x1 + g(pw) * bin_w + g(ix + 0.5) * bin_w / g(grid_w)
                        tx = (pw + (ix + 0.5) / grid_w) / pooled_w
                        value, d_y, d_x, taps = _sample(x[b], float(yy), float(xx), onnx)
                        if best is None:
                            best = [[value[ch], d_y[ch], d_x[ch], taps, ch, ty, tx] for ch in range(c)]
                            continue
                        for ch in range(c):
                            if value[ch] > best[ch][0]:  # strict: the first sample wins a tie
                                best[ch] = [value[ch], d_y[ch], d_x[ch], taps, ch, ty, tx]
                if best is None:
                    continue  # no samples: 0, no gradient
                for ch in range(c):
                    value, d_y, d_x, taps, _, ty, tx = best[ch]
                    out[k, ch, ph, pw] = value
                    if grad_out is None:
                        continue
                    go = float(grad_out[k, ch, ph, pw])
                    for r, q, wt in taps:
                        grad_x[b, ch, r, q] += go * wt[ch]
                    sy, sx = go * d_y, go * d_x
                    grad_rois[k, 1] += sx * (1.0 if fixed_w else 1.0 - tx) * spatial_scale
                    grad_rois[k, 3] += sx * (0.0 if fixed_w else tx) * spatial_scale
                    grad_rois[k, 2] += sy * (1.0 if fixed_h else 1.0 - ty) * spatial_scale
                    grad_rois[k, 4] += sy * (0.0 if fixed_h else ty) * spatial_scale
    return out, grad_x, grad_rois
