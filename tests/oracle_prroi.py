"""A slow, obviously-correct float64 oracle for Precise RoI Pooling, by numerical integration.

The feature map's bilinear interpolant is bilinear on every unit cell between integer
coordinates, and the midpoint rule integrates a bilinear function over a rectangle exactly. So
each bin is cut along the integer lines into rectangles, and each rectangle contributes its area
times the interpolant at its centre, evaluated from the four surrounding pixels (zero outside
the map). A bin of zero width or height averages along its segment the same way (a linear
function's mean is its value at the middle); a bin of zero width and height is the point value.
No closed form, no prefix sums: the kernels' formulas are checked against plain integration.
"""

from __future__ import annotations

import math

import numpy as np


def _pieces(a: float, b: float) -> list[tuple[float, float]]:
    """(middle, length) of [a, b] cut at the integers; a zero-length interval is one point of length 1."""
    if b <= a:
        return [(a, 1.0)]
    cuts = [a] + [float(v) for v in range(math.floor(a) + 1, math.ceil(b))] + [b]
    return [(0.5 * (lo + hi), hi - lo) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


def _interpolation_weights(x: float, y: float, h: int, w: int):
    """(row, col, weight) of the pixels whose hats cover (x, y)."""
    out = []
    for j in (math.floor(y), math.floor(y) + 1):
        for i in (math.floor(x), math.floor(x) + 1):
            wt = max(0.0, 1 - abs(x - i)) * max(0.0, 1 - abs(y - j))
            if wt > 0 and 0 <= j < h and 0 <= i < w:
                out.append((j, i, wt))
    return out


def bin_weights(xa: float, xb: float, ya: float, yb: float, h: int, w: int) -> np.ndarray:
    """[H, W]: the weight of every pixel in the bin's mean."""
    m = np.zeros((h, w))
    xs, ys = _pieces(xa, xb), _pieces(ya, yb)
    total = sum(l for _, l in xs) * sum(l for _, l in ys)
    for mx, lx in xs:
        for my, ly in ys:
            for j, i, wt in _interpolation_weights(mx, my, h, w):
                m[j, i] += lx * ly * wt
    return m / total


def weights(rois: np.ndarray, spatial_scale: float, pooled: tuple[int, int], h: int, w: int) -> np.ndarray:
    """[K, PH, PW, H, W] float64; NaN for boxes with a non-finite coordinate."""
    ph, pw = pooled
    out = np.zeros((len(rois), ph, pw, h, w))
    for k, (_, x1, y1, x2, y2) in enumerate(np.asarray(rois, dtype=np.float64)):
        x1, y1, x2, y2 = (v * spatial_scale for v in (x1, y1, x2, y2))
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            out[k] = math.nan
            continue
        bw, bh = max(x2 - x1, 0.0) / pw, max(y2 - y1, 0.0) / ph
        for q in range(ph):
            for p in range(pw):
                out[k, q, p] = bin_weights(x1 + bw * p, x1 + bw * (p + 1), y1 + bh * q, y1 + bh * (q + 1), h, w)
    return out


def prroi_pool(x: np.ndarray, rois: np.ndarray, spatial_scale: float, pooled: tuple[int, int]) -> np.ndarray:
    """[K, C, PH, PW] float64."""
    x = np.asarray(x, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    m = weights(rois, spatial_scale, pooled, x.shape[2], x.shape[3])
    out = np.empty((len(rois), x.shape[1]) + tuple(pooled))
    for k in range(len(rois)):
        out[k] = np.einsum("qpji,cji->cqp", m[k], x[int(rois[k, 0])])
    return out


def input_gradient(grad: np.ndarray, x_shape, rois: np.ndarray, spatial_scale: float, pooled) -> np.ndarray:
    """The input gradient of ``sum(grad * prroi_pool(x, rois))`` (the pooling is linear in x)."""
    rois = np.asarray(rois, dtype=np.float64)
    m = weights(rois, spatial_scale, pooled, x_shape[2], x_shape[3])
    g = np.zeros(x_shape)
    for k in range(len(rois)):
        if np.isnan(m[k]).any():
            continue
        g[int(rois[k, 0])] += np.einsum("qpji,cqp->cji", m[k], grad[k])
    return g


def box_gradient_fd(x: np.ndarray, rois: np.ndarray, spatial_scale: float, pooled, grad: np.ndarray,
                    step: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``sum(grad * prroi_pool)`` by each box coordinate."""
    rois = np.asarray(rois, dtype=np.float64)
    out = np.zeros_like(rois)
    for k in range(len(rois)):
        for col in range(1, 5):
            vals = []
            for sign in (1, -1):
                r = rois[k:k + 1].copy()
                r[0, col] += sign * step
                vals.append(float((prroi_pool(x, r, spatial_scale, pooled)[0] * grad[k]).sum()))
            out[k, col] = (vals[0] - vals[1]) / (2 * step)
    return out
