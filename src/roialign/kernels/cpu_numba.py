"""RoIAlign CPU kernels in Numba: forward, input gradient and box gradient.

Layout: the kernels read features channels-last (``[N, H, W, C]``), so that every bilinear tap
is one contiguous run of channels that the compiler vectorises. An NCHW input is transposed
once per call (by PyTorch's own parallel copy); for a handful of boxes on a large map a
planar kernel that reads NCHW directly is used instead, since the transpose would cost more
than the work.

Threads: the kernels are compiled ``nogil`` and driven by a thread pool of our own, sized by
``torch.get_num_threads()`` and recreated after ``fork``. Work is split so that each thread owns
its part of the output (boxes for the forward and the box gradient, an image and a block of
channels for the input gradient), and each part is computed in a fixed order: results are
bitwise identical from run to run and for any number of threads, without atomics or locks.

Nothing is compiled at import; ``cache=True`` keeps the machine code on disk for the next
process. Geometry is computed in the rois' dtype (float32, or float64 for float64 inputs), in
the order of operations of the published kernels; accumulation is in the features' dtype.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

from .reference import compute_dtype

_JIT = dict(nogil=True, cache=True)
_MAX_GRID = 2**52


# ----------------------------------------------------------------------------------------------
# Geometry: one box, one axis.


@numba.njit(inline="always", **_JIT)
def _visible_samples(base, bin_size, grid, size):
    """[first, last) of the sample indices in [0, grid) that can land in [-1, size], plus one spare each side."""
    if grid <= 0:
        return 0, 0
    step = np.float64(bin_size) / grid
    if step == 0.0 or not np.isfinite(step):
        return 0, grid
    a = (-1.0 - np.float64(base)) / step - 0.5
    b = (size - np.float64(base)) / step - 0.5
    if step > 0:
        lo, hi = np.ceil(a), np.floor(b)
    else:
        lo, hi = np.ceil(b), np.floor(a)
    first = min(max(lo - 1.0, 0.0), float(grid))
    last = min(max(hi + 2.0, 0.0), float(grid))
    return int(first), int(max(last, first))


@numba.njit(**_JIT)
def _box(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T):
    """Scaled start, size, clamped-size flag and sample count along y and x; ``finite`` last."""
    offset = T(0.5) if aligned else T(0.0)
    scale = T(spatial_scale)
    x1 = T(rois[k, 1]) * scale - offset
    y1 = T(rois[k, 2]) * scale - offset
    x2 = T(rois[k, 3]) * scale - offset
    y2 = T(rois[k, 4]) * scale - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    fixed_w = False
    fixed_h = False
    if not aligned:
        if roi_w < 1:
            roi_w = T(1.0)
            fixed_w = True
        if roi_h < 1:
            roi_h = T(1.0)
            fixed_h = True
    finite = (np.isfinite(x1) and np.isfinite(y1) and np.isfinite(x2) and np.isfinite(y2)
              and np.isfinite(roi_w) and np.isfinite(roi_h))
    grid_h = 0
    grid_w = 0
    if finite:
        if sampling_ratio > 0:
            grid_h = sampling_ratio
            grid_w = sampling_ratio
        else:
            grid_h = int(min(max(np.ceil(roi_h / T(pooled_h)), 0.0), _MAX_GRID))
            grid_w = int(min(max(np.ceil(roi_w / T(pooled_w)), 0.0), _MAX_GRID))
    return y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite


@numba.njit(**_JIT)
def _tap_capacity(start, length, grid, pooled, size, T):
    """The most taps (two per visible sample) that any bin of this axis can have."""
    bin_size = length / T(pooled)
    most = 0
    for p in range(pooled):
        first, last = _visible_samples(start + T(p) * bin_size, bin_size, grid, size)
        most = max(most, last - first)
    return 2 * most


@numba.njit(**_JIT)
def _axis_taps(start, length, fixed, grid, pooled, size, T, index, weight, d_start, d_end, count):
    """Fill the taps of every bin along one axis: ``index``/``weight``/``d_start``/``d_end`` are
    ``[pooled, capacity]`` and ``count[p]`` says how many are used. ``d_*`` are the derivatives of
    the weight with respect to the (scaled) box start and end, holding ``grid`` fixed."""
    bin_size = length / T(pooled)
    for p in range(pooled):
        base = start + T(p) * bin_size
        first, last = _visible_samples(base, bin_size, grid, size)
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
            t = (p + (i + 0.5) / grid) / pooled
            ds = 1.0 if fixed else 1.0 - t
            de = 0.0 if fixed else t
            slope = 1.0 if moves else 0.0
            index[p, n] = low
            weight[p, n] = T(1.0) - frac
            d_start[p, n] = -slope * ds
            d_end[p, n] = -slope * de
            index[p, n + 1] = high
            weight[p, n + 1] = frac
            d_start[p, n + 1] = slope * ds
            d_end[p, n + 1] = slope * de
            n += 2
        count[p] = n


@numba.njit(**_JIT)
def _taps_for(start, length, fixed, grid, pooled, size, T):
    capacity = max(_tap_capacity(start, length, grid, pooled, size, T), 1)
    index = np.empty((pooled, capacity), dtype=np.int64)
    weight = np.empty((pooled, capacity), dtype=T)
    d_start = np.empty((pooled, capacity), dtype=np.float64)
    d_end = np.empty((pooled, capacity), dtype=np.float64)
    count = np.empty(pooled, dtype=np.int64)
    _axis_taps(start, length, fixed, grid, pooled, size, T, index, weight, d_start, d_end, count)
    return index, weight, d_start, d_end, count


# ----------------------------------------------------------------------------------------------
# Kernels. ``out``/``grad`` are [K, C, PH * PW]; channels-last features are [N, H, W, C].


@numba.njit(**_JIT)
def _forward_nhwc(feat, rois, box_lo, box_hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T, out):
    n_img, height, width, channels = feat.shape
    bins = pooled_h * pooled_w
    acc = np.empty((bins, channels), dtype=feat.dtype)
    for k in range(box_lo, box_hi):
        b = int(rois[k, 0])
        y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = _box(
            rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if not finite or b < 0 or b >= n_img:
            fill = np.nan if not finite else 0.0
            out[k, :, :] = fill
            continue
        yi, yw, _, _, yn = _taps_for(y1, roi_h, fixed_h, grid_h, pooled_h, height, T)
        xi, xw, _, _, xn = _taps_for(x1, roi_w, fixed_w, grid_w, pooled_w, width, T)
        count = T(max(grid_h * grid_w, 1))
        acc[:, :] = 0
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                a = acc[ph * pooled_w + pw]
                for ty in range(yn[ph]):
                    wy = yw[ph, ty]
                    if wy == 0:
                        continue
                    r = yi[ph, ty]
                    for tx in range(xn[pw]):
                        w = wy * xw[pw, tx]
                        if w == 0:
                            continue
                        q = xi[pw, tx]
                        for c in range(channels):
                            a[c] += w * feat[b, r, q, c]
        for c in range(channels):
            for j in range(bins):
                out[k, c, j] = acc[j, c] / count


@numba.njit(**_JIT)
def _forward_nchw(feat, rois, box_lo, box_hi, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T, out):
    n_img, channels, height, width = feat.shape
    for k in range(box_lo, box_hi):
        b = int(rois[k, 0])
        y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = _box(
            rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if not finite or b < 0 or b >= n_img:
            fill = np.nan if not finite else 0.0
            out[k, :, :] = fill
            continue
        yi, yw, _, _, yn = _taps_for(y1, roi_h, fixed_h, grid_h, pooled_h, height, T)
        xi, xw, _, _, xn = _taps_for(x1, roi_w, fixed_w, grid_w, pooled_w, width, T)
        count = T(max(grid_h * grid_w, 1))
        for c in range(channels):
            plane = feat[b, c]
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    s = T(0.0)
                    for ty in range(yn[ph]):
                        wy = yw[ph, ty]
                        if wy == 0:
                            continue
                        r = yi[ph, ty]
                        for tx in range(xn[pw]):
                            s += wy * xw[pw, tx] * plane[r, xi[pw, tx]]
                    out[k, c, ph * pooled_w + pw] = s / count


@numba.njit(**_JIT)
def _backward_input_nhwc(grad, rois, order, first_box, last_box, b, c_lo, c_hi, spatial_scale, aligned,
                         sampling_ratio, pooled_h, pooled_w, T, grad_feat):
    """Accumulate image ``b``, channels ``[c_lo, c_hi)`` of ``grad_feat`` over its boxes, in order."""
    _, height, width, _ = grad_feat.shape
    g = np.empty(c_hi - c_lo, dtype=grad_feat.dtype)
    for j in range(first_box, last_box):
        k = order[j]
        y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = _box(
            rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if not finite:
            continue
        yi, yw, _, _, yn = _taps_for(y1, roi_h, fixed_h, grid_h, pooled_h, height, T)
        xi, xw, _, _, xn = _taps_for(x1, roi_w, fixed_w, grid_w, pooled_w, width, T)
        count = T(max(grid_h * grid_w, 1))
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                if yn[ph] == 0 or xn[pw] == 0:
                    continue
                for c in range(c_lo, c_hi):
                    g[c - c_lo] = grad[k, c, ph * pooled_w + pw] / count
                for ty in range(yn[ph]):
                    wy = yw[ph, ty]
                    if wy == 0:
                        continue
                    r = yi[ph, ty]
                    for tx in range(xn[pw]):
                        w = wy * xw[pw, tx]
                        if w == 0:
                            continue
                        q = xi[pw, tx]
                        for c in range(c_lo, c_hi):
                            grad_feat[b, r, q, c] += w * g[c - c_lo]


@numba.njit(**_JIT)
def _backward_rois_nhwc(grad, feat, rois, box_lo, box_hi, spatial_scale, aligned, sampling_ratio, pooled_h,
                        pooled_w, T, grad_rois):
    """Box gradient of boxes ``[box_lo, box_hi)``: d/d(x1, y1, x2, y2) into ``grad_rois[:, 1:5]``."""
    n_img, height, width, channels = feat.shape
    g = np.empty(channels, dtype=feat.dtype)
    for k in range(box_lo, box_hi):
        b = int(rois[k, 0])
        y1, roi_h, fixed_h, grid_h, x1, roi_w, fixed_w, grid_w, finite = _box(
            rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T)
        if not finite:
            grad_rois[k, 1:5] = np.nan
            continue
        if b < 0 or b >= n_img:
            continue
        yi, yw, yd0, yd1, yn = _taps_for(y1, roi_h, fixed_h, grid_h, pooled_h, height, T)
        xi, xw, xd0, xd1, xn = _taps_for(x1, roi_w, fixed_w, grid_w, pooled_w, width, T)
        count = max(grid_h * grid_w, 1)
        gx1 = 0.0
        gy1 = 0.0
        gx2 = 0.0
        gy2 = 0.0
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for c in range(channels):
                    g[c] = grad[k, c, ph * pooled_w + pw]
                for ty in range(yn[ph]):
                    r = yi[ph, ty]
                    for tx in range(xn[pw]):
                        q = xi[pw, tx]
                        s = T(0.0)
                        for c in range(channels):
                            s += g[c] * feat[b, r, q, c]
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
# Threads.


class _Workers:
    """A thread pool for ``nogil`` kernels, sized by ``torch.get_num_threads()``, recreated after fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # The parent's threads do not exist in a forked child: never touch their pool there.
        self._lock = threading.Lock()
        self._pool, self._size = None, 0

    def size(self) -> int:
        return max(1, torch.get_num_threads())

    def run(self, fn, jobs) -> None:
        """Call ``fn(*job)`` for every job, on up to ``size()`` threads; re-raise the first error."""
        n = self.size()
        if n == 1 or len(jobs) <= 1:
            for job in jobs:
                fn(*job)
            return
        with self._lock:
            if self._pool is None or self._size != n:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool, self._size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="roialign"), n
            pool = self._pool
        for future in [pool.submit(fn, *job) for job in jobs]:
            future.result()


_workers = _Workers()


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, total))
    edges = np.linspace(0, total, parts + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, torch tensors out.


def _geometry(rois: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, type]:
    rois = rois.detach().to(dtype).contiguous()
    return rois.numpy(), (np.float64 if dtype == torch.float64 else np.float32)


def _planar_is_cheaper(k: int, shape: torch.Size, pooled: int, sampling_ratio: int) -> bool:
    """Reading NCHW directly beats transposing the whole map when there is little work per pixel."""
    n, c, h, w = shape
    taps = 4 * (sampling_ratio * sampling_ratio if sampling_ratio > 0 else 4)
    return k * pooled * taps * 8 < n * h * w


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    k, c = rois.shape[0], input.shape[1]
    geometry, T = _geometry(rois, dtype)
    out = torch.empty((k, c, pooled_height, pooled_width), dtype=dtype)
    out_np = out.view(k, c, pooled_height * pooled_width).numpy()
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    if not channels_last and _planar_is_cheaper(k, input.shape, pooled_height * pooled_width, sampling_ratio):
        feat = input.detach().to(dtype).contiguous().numpy()
        kernel = _forward_nchw
    else:
        feat = input.detach().to(dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
        kernel = _forward_nhwc
    jobs = [(feat, geometry, a, b, spatial_scale, aligned, sampling_ratio, pooled_height, pooled_width, T, out_np)
            for a, b in _ranges(k, 4 * _workers.size())]
    _workers.run(kernel, jobs)
    return out if dtype == input.dtype else out.to(input.dtype)


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    geometry, T = _geometry(rois, dtype)
    grad_np = grad.detach().to(dtype).contiguous().view(grad.shape[0], channels, -1).numpy()
    grad_feat = torch.zeros((batch_size, height, width, channels), dtype=dtype)
    # Boxes grouped by image, each group in its original order: a fixed order of accumulation.
    batch = torch.from_numpy(geometry[:, 0]).long()
    order = torch.argsort(batch, stable=True).numpy()
    bounds = torch.searchsorted(batch[order].contiguous(), torch.arange(batch_size + 1)).numpy()
    blocks = max(1, min(channels // 16, -(-2 * _workers.size() // max(batch_size, 1))))
    jobs = [(grad_np, geometry, order, int(bounds[b]), int(bounds[b + 1]), b, c_lo, c_hi, spatial_scale, aligned,
             sampling_ratio, pooled_height, pooled_width, T, grad_feat.numpy())
            for b in range(batch_size) if bounds[b + 1] > bounds[b]
            for c_lo, c_hi in _ranges(channels, blocks)]
    _workers.run(_backward_input_nhwc, jobs)
    nchw = grad_feat.permute(0, 3, 1, 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return nchw.to(grad.dtype, memory_format=memory_format)


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    dtype = compute_dtype(input.dtype)
    geometry, T = _geometry(rois, dtype)
    k, c = rois.shape[0], input.shape[1]
    grad_np = grad.detach().to(dtype).contiguous().view(k, c, -1).numpy()
    feat = input.detach().to(dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    grad_rois = np.zeros((k, 5), dtype=np.float64)
    jobs = [(grad_np, feat, geometry, a, b, spatial_scale, aligned, sampling_ratio, pooled_height, pooled_width, T,
             grad_rois) for a, b in _ranges(k, 4 * _workers.size())]
    _workers.run(_backward_rois_nhwc, jobs)
    return torch.from_numpy(grad_rois).to(rois.dtype)


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, 2, 3, 3, dtype=dtype)
        rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]] * 40, dtype=dtype)
        g = torch.zeros(40, 2, 1, 1, dtype=dtype)
        forward(x, rois, 1.0, 1, 1, 0, True)
        forward(x, rois[:1], 1.0, 1, 1, 0, True)
        backward_input(g, rois, 1.0, 1, 1, 1, 2, 3, 3, 0, True, False)
        backward_rois(g, x, rois, 1.0, 1, 1, 0, True)
