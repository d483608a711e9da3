"""What the Numba CPU kernels of every operator share: box geometry and taps, the banded
accumulation of input gradients, layout copies, scratch and result buffers. Threads, and how work
is cut into jobs for them, are in ``threads.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
import weakref

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic, overload
from torch import Tensor

from .half_types import HALF_TYPES, carry, kernel_array, narrow, widen
from .threads import ranges, workers

JIT = dict(nogil=True, cache=True)


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorise the calling kernel's loops with the widest vectors the CPU has:
    512-bit on AVX-512 CPUs, for which LLVM prefers 256-bit ones by default. Call it first in a
    kernel. Only the instructions change, not the arithmetic (no contraction, no reassociation),
    so the results are the same bits; CPUs without AVX-512 compile as before."""
    def codegen(context, builder, signature, args):
        # llvmlite names no string attributes; LLVM reads this one from the function definition.
        # Where that cannot be done the kernel compiles as before (tests/test_cpu_kernels.py checks it).
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # noqa: BLE001 - a preference, never a requirement
            pass
        return context.get_dummy_value()
    return types.none(), codegen


_TILE = 32  # side of the square blocks of the tiled copy back to NCHW
_BLOCK = 8  # channels per pass of the blocked copy to channels-last


# Spare elements at the end of each row of a [rows, C] scratch that is later read a column at a
# time (one channel across bins or pixels, to transpose it). Rows of 256 channels are 1 KiB
# apart, so such a column falls in 4 of the L1 cache's 64 sets and misses on nearly every
# element; one more cache line per row spreads it over all of them. The pad is never read.
ROW_PAD = 16


@numba.njit(**JIT)
def nchw_to_nhwc(x, b, r0, r1, out, tiled):
    """Rows ``[r0, r1)`` of image ``b``: ``out[b, r, q, c] = x[b, c, r, q]`` (half bit patterns
    copied as they are into a half ``out``, widened into a float32 one).

    Two orders, the same bytes: ``tiled`` (blocked) takes 8 channels at a time along the whole
    pixel row, reading 8 source rows in order and writing 8 consecutive elements per pixel;
    otherwise the destination is written in order, one pixel's channels after another. Which is
    faster depends on the host and on the map (streaming was 2-3.5x faster than 32 x 32 tiles on an
    Intel Xeon for 3-56 MB maps; on an AMD EPYC, from memory, the 8-channel blocks took 0.66 / 1.67
    / 5.67 ms on the adaptive, P3 and P2 float32 maps against 0.77 / 2.28 / 9.10 for 32 x 32 tiles
    and 1.66 / 1.51 / 6.70 streaming), so :func:`tune_layout_copies` picks it by timing both."""
    channels, width = x.shape[1], x.shape[3]
    if not tiled:
        for r in range(r0, r1):
            for q in range(width):
                for c in range(channels):
                    out[b, r, q, c] = carry(x[b, c, r, q], out)
        return
    for r in range(r0, r1):
        c0 = 0
        while c0 + _BLOCK <= channels:
            for q in range(width):
                for c in range(_BLOCK):
                    out[b, r, q, c0 + c] = carry(x[b, c0 + c, r, q], out)
            c0 += _BLOCK
        for c in range(c0, channels):
            for q in range(width):
                out[b, r, q, c] = carry(x[b, c, r, q], out)


@numba.njit(**JIT)
def nhwc_to_nchw(x, b, r0, r1, out, tiled):
    """Rows ``[r0, r1)`` of image ``b``: ``out[b, c, r, q] = x[b, r, q, c]``, the inverse of
    :func:`nchw_to_nhwc`, in the same two orders (streaming: the destination in order)."""
    width, channels = x.shape[2], x.shape[3]
    if not tiled:
        for r in range(r0, r1):
            for c in range(channels):
                for q in range(width):
                    out[b, c, r, q] = x[b, r, q, c]
        return
    tile = np.empty((_TILE, _TILE), x.dtype)
    for r in range(r0, r1):
        for q0 in range(0, width, _TILE):
            for c0 in range(0, channels, _TILE):
                if q0 + _TILE <= width and c0 + _TILE <= channels:
                    for q in range(_TILE):
                        for c in range(_TILE):
                            tile[c, q] = x[b, r, q0 + q, c0 + c]
                    for c in range(_TILE):
                        for q in range(_TILE):
                            out[b, c0 + c, r, q0 + q] = tile[c, q]
                else:
                    for q in range(q0, min(width, q0 + _TILE)):
                        for c in range(c0, min(channels, c0 + _TILE)):
                            out[b, c, r, q] = x[b, r, q, c]


# Whether the layout copies use their tiled order (to channels-last: 8-channel blocks; back: 32 x 32
# tiles) rather than the streaming one, per kind of map: "aliased" for maps whose channel planes lie
# a multiple of 4 KiB apart, "tiled" for the others. An x86 L1 data cache takes a line's set from
# address bits inside the 4 KiB page, so the same pixel of every such plane falls in one set: the
# streaming copy to channels-last, which reads one pixel of every channel in turn, then misses on
# nearly every read once the channels outnumber the set's ways, while the other order reads a few
# planes along runs of pixels. The adaptive map (64 x 128 x 128 float32, 64 KiB planes) took 1.60 ms
# streaming and 0.45 ms in 32 x 32 tiles, and the P3 map (100 x 136 planes) 2.8 ms streaming and
# 4.2 ms in tiles (AMD EPYC, 2 threads, one direction, warm). Defaults (when ``warmup()`` was not
# called): streaming for other maps, measured faster on the hosts where it was compared (README, "On
# an Intel Xeon host"), tiled for aliased ones; :func:`tune_layout_copies` times both kinds.
_LAYOUT_COPY = {"tiled": False, "aliased": True}
_ALIASING_BYTES = 4096


def _tiled_order(plane_bytes: int) -> bool:
    """The copy order for a map whose channel planes are ``plane_bytes`` apart."""
    return _LAYOUT_COPY["aliased" if plane_bytes % _ALIASING_BYTES == 0 else "tiled"]


def _layout_copy(kernel, src: np.ndarray, out: np.ndarray, n: int, h: int, w: int, c: int,
                 tiled: bool | None = None) -> None:
    """Run ``kernel`` (:func:`nchw_to_nhwc` or :func:`nhwc_to_nchw`) on our pool, a job per band
    of about 64K elements of rows of one image, in the order ``tiled`` (default: the one chosen
    for the planar side's kind of map)."""
    if tiled is None:
        planar = src if kernel is nchw_to_nhwc else out
        tiled = _tiled_order(h * w * planar.itemsize)
    rows = max(1, (1 << 16) // max(1, w * c))
    workers.run(kernel, [(src, b, r0, min(h, r0 + rows), out, tiled) for b in range(n) for r0 in range(0, h, rows)])


def planar_from_channels_last(t: Tensor) -> Tensor:
    """``[N, H, W, C]`` contiguous ``t`` as an NCHW-contiguous ``[N, C, H, W]`` tensor, copied by our pool."""
    n, h, w, c = t.shape
    out = result_tensor((n, c, h, w), t.dtype)
    _layout_copy(nhwc_to_nchw, t.numpy(), out.numpy(), n, h, w, c)
    return out


def tune_layout_copies(shape: tuple[int, int, int, int] = (1, 256, 100, 136), pairs: int = 3,
                       aliased_shape: tuple[int, int, int, int] = (1, 64, 128, 128)) -> dict:
    """Time both orders of both layout copies on float32 maps of ``shape`` (default: a detector's
    P3 level, 14 MB) and of ``aliased_shape`` (planes a multiple of 4 KiB apart; default: the
    adaptive benchmark's map, 4 MB) with the current thread count, alternating, and keep for each
    kind of map the order whose summed median time is lower. Both orders give the same bytes, so
    this choice never changes a result. Returns the medians (seconds) and the choices."""
    if aliased_shape[2] * aliased_shape[3] * 4 % _ALIASING_BYTES:
        raise ValueError(f"aliased_shape {aliased_shape}: its float32 planes are not a multiple of 4 KiB apart")
    if shape[2] * shape[3] * 4 % _ALIASING_BYTES == 0:
        raise ValueError(f"shape {shape}: its float32 planes are a multiple of 4 KiB apart; use aliased_shape")
    report = {}
    for kind, prefix, dims in (("tiled", "", shape), ("aliased", "aliased_", aliased_shape)):
        median = _time_copy_orders(dims, pairs)
        _LAYOUT_COPY[kind] = median[True] < median[False]
        report.update({f"{prefix}tiled_s": median[True], f"{prefix}streaming_s": median[False],
                       kind: _LAYOUT_COPY[kind]})
    return report


def _time_copy_orders(shape: tuple[int, int, int, int], pairs: int) -> dict[bool, float]:
    """Median seconds of both copies there and back on a float32 map of ``shape``, per order."""
    import time

    n, c, h, w = shape
    x = torch.randn(shape).numpy()
    nhwc = empty((n, h, w, c), torch.float32).numpy()
    nchw = empty(shape, torch.float32).numpy()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(pairs + 1):
        for tiled in (True, False):
            start = time.perf_counter()
            _layout_copy(nchw_to_nhwc, x, nhwc, n, h, w, c, tiled)
            _layout_copy(nhwc_to_nchw, nhwc, nchw, n, h, w, c, tiled)
            if i > 0:  # the first pair compiles or loads the kernels and faults the pages in
                times[tiled].append(time.perf_counter() - start)
    return {tiled: float(np.median(t)) for tiled, t in times.items()}


_MAX_GRID = 2**52  # adaptive sample counts are capped where float64 stops being exact


@numba.njit(**JIT)
def axis_aligned_box(rois, k, spatial_scale, aligned, sampling_ratio, pooled_h, pooled_w, T):
    """Box ``k`` of ``rois`` ([K, 5] in the compute dtype ``T``) in feature pixels, as every
    axis-aligned kernel sees it: scaled start, size, clamped-size flag and sample count along y
    and x; ``finite`` last."""
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


@numba.njit(inline="always", **JIT)
def visible_samples(base, bin_size, grid, lo, hi):
    """[first, last) of the sample indices ``i`` in [0, grid) whose position
    ``base + (i + 0.5) * bin_size / grid`` can land in [lo, hi], plus one spare each side (the
    caller tests each sample exactly); float64 bounds, so gigantic grids cost nothing."""
    if grid <= 0:
        return 0, 0
    step = np.float64(bin_size) / grid
    if step == 0.0 or not np.isfinite(step):
        return 0, grid
    a = (lo - np.float64(base)) / step - 0.5
    b = (hi - np.float64(base)) / step - 0.5
    if step > 0:
        first_f, last_f = np.ceil(a), np.floor(b)
    else:
        first_f, last_f = np.ceil(b), np.floor(a)
    first = min(max(first_f - 1.0, 0.0), float(grid))
    last = min(max(last_f + 2.0, 0.0), float(grid))
    return int(first), int(max(last, first))


@numba.njit(inline="always", **JIT)
def weigh_taps(acc, i, pixels, base, at, weight, first, n, zero):
    """``acc[i, c] = zero + w[0] * pixels[base + at[0], c] + ... + w[n - 1] * pixels[base +
    at[n - 1], c]`` for every channel ``c``, where ``at`` and ``w`` are ``at[first:]`` and
    ``weight[first:]``, added left to right (half bit patterns widened).

    Each pass over the channels adds the next four entries (or the last two, or the last one):
    the same additions, rounded alike, as one entry per pass, with the row loaded and stored a
    quarter as often. The first pass stores ``zero + ...`` instead of adding to a cleared row
    (the same rounding; with no entries the row is ``zero``): clearing it first was a ``memset``
    call per bin (1 KB for 256 float32 channels), seen with ``perf``.

    Keep the shape of this helper: one loop of passes, no ``return``, no branch around the
    loop. Numba inlines it with a reference count taken on each array it is given and dropped
    at each exit; in this shape LLVM removes both, while a helper that first branched on ``n``
    kept them: eight atomic operations per call. In a loop of calls on cached data, 64 channels
    and one to four entries, that took 2-5x as long (``tests/test_cpu_kernels.py`` checks the
    compiled kernels' loops)."""
    channels = pixels.shape[1]
    e = first
    end = first + n
    while e < max(end, first + 1):
        if end - e >= 4:
            pa, pb, pc, pd = base + at[e], base + at[e + 1], base + at[e + 2], base + at[e + 3]
            wa, wb, wc, wd = weight[e], weight[e + 1], weight[e + 2], weight[e + 3]
            for c in range(channels):
                acc[i, c] = ((acc[i, c] if e > first else zero) + wa * widen(pixels[pa, c])
                             + wb * widen(pixels[pb, c]) + wc * widen(pixels[pc, c]) + wd * widen(pixels[pd, c]))
            e += 4
        elif end - e >= 2:
            pa, pb, wa, wb = base + at[e], base + at[e + 1], weight[e], weight[e + 1]
            for c in range(channels):
                acc[i, c] = (acc[i, c] if e > first else zero) + wa * widen(pixels[pa, c]) + wb * widen(pixels[pb, c])
            e += 2
        elif end - e == 1:
            pa, wa = base + at[e], weight[e]
            for c in range(channels):
                acc[i, c] = (acc[i, c] if e > first else zero) + wa * widen(pixels[pa, c])
            e += 1
        else:
            for c in range(channels):
                acc[i, c] = zero
            e += 1


@numba.njit(**JIT)
def counting_order(key):
    """The indices ``i`` with ``key[i] >= 0``, by key, ties in index order: a stable counting sort
    of small non-negative keys (an image's pixel row, or band and column), in place of a NumPy
    sort and filter whose few calls cost as much as the sorting on a small problem."""
    bound = 0
    for v in key:
        bound = max(bound, v + 1)
    start = np.zeros(bound + 1, np.int64)
    for v in key:
        if v >= 0:
            start[v + 1] += 1
    for v in range(bound):
        start[v + 1] += start[v]
    order = np.empty(start[bound], np.int64)
    for i in range(key.size):
        v = key[i]
        if v >= 0:
            order[start[v]] = i
            start[v] += 1
    return order


@numba.njit(**JIT)
def band_order(boxes, spatial_scale, images, height, width):
    """Every box (``boxes`` [K, 5]: image, x1, y1, x2, y2) by image, then by band of first rows
    read, then by first column read, ties in index order: the order of the box-by-box kernels.
    A band is as tall as the boxes are on average (in pixel rows, each clamped to [1, H]), so
    that consecutive boxes of a job overlap in both directions and read pixels still in cache.
    It only orders the boxes, so an image index out of range, NaN and huge coordinates are just
    clamped into the key, and no result depends on it.

    Against the order by image and first row alone: boxhead-P2's float64 NCHW forward 0.84-0.89
    of the time, elsewhere 0.84-1.02 (README, "fifth session", gives every number)."""
    k_all = boxes.shape[0]
    images = max(images, 1)  # every box gets a key, even with no image to read
    total, counted = 0.0, 0
    for k in range(k_all):
        h = (boxes[k, 4] - boxes[k, 2]) * spatial_scale
        if np.isfinite(h):
            total += min(max(h, 1.0), float(height))
            counted += 1
    band = max(1, int(total / counted)) if counted else 1
    bands = (height + 2) // band + 1
    key = np.empty(k_all, np.int64)
    for k in range(k_all):
        b = np.floor(boxes[k, 0])
        b = min(max(0.0 if np.isnan(b) else b, 0.0), images - 1.0)
        top = np.floor(boxes[k, 2] * spatial_scale)
        top = min(max(0.0 if np.isnan(top) else top, -1.0), float(height))
        left = np.floor(boxes[k, 1] * spatial_scale)
        left = min(max(0.0 if np.isnan(left) else left, -1.0), float(width))
        key[k] = ((int(b) * bands + (int(top) + 1) // band) * (width + 2)) + int(left) + 1
    if images * bands * (width + 2) <= 4 * k_all + (1 << 16):  # the same order, ten times faster
        return counting_order(key)
    return np.argsort(key, kind="mergesort")


@numba.njit(**JIT)
def transpose_boxes(grad, lo, hi, grad_t):
    """``grad_t[k] = grad[k].T`` for boxes ``[lo, hi)``: [K, C, B] to [K, B, C] (half bit
    patterns copied into the same half format, else widened to float32)."""
    for k in range(lo, hi):  # in the destination's order: 2-3x faster than the source's, or tiles
        for i in range(grad.shape[2]):
            row = grad_t[k, i]
            for c in range(grad.shape[1]):
                row[c] = carry(grad[k, c, i], grad_t)


def bin_run(grad_t, k, p, buf):
    """The channels of bin ``p`` of box ``k`` of a :func:`channel_runs` array: a float run as it
    is, a run of half bit patterns widened into ``buf`` (float32, at least C long). Numba only."""
    raise NotImplementedError("bin_run is compiled into Numba kernels only")


@overload(bin_run)
def _bin_run(grad_t, k, p, buf):
    if grad_t.dtype in (types.uint16, types.int16):
        def widened(grad_t, k, p, buf):
            run = grad_t[k, p]
            for c in range(run.shape[0]):
                buf[c] = widen(run[c])
            return buf
        return widened
    return lambda grad_t, k, p, buf: grad_t[k, p]


def band_of(grad_feat, b, r0, r1, planar):
    """The zeroed ``[rows, W, C]`` band in which rows ``[r0, r1)`` of image ``b`` of an input
    gradient are accumulated: ``grad_feat`` itself when it is channels-last ([N, H, W, C]) and
    float, else a float32 or float64 scratch buffer that :func:`store_band` writes into the planar
    ([N, C, H, W]) or half one (Numba only). A planar gradient's band has ``C + ROW_PAD``
    elements per pixel, of which the first C are used."""
    raise NotImplementedError("band_of is compiled into Numba kernels only")


@overload(band_of)
def _band_of(grad_feat, b, r0, r1, planar):
    if grad_feat.dtype in (types.uint16, types.int16):  # half bit patterns: accumulate in float32
        def half_band(grad_feat, b, r0, r1, planar):
            if planar:
                return np.zeros((r1 - r0, grad_feat.shape[3], grad_feat.shape[1] + ROW_PAD), dtype=np.float32)
            return np.zeros((r1 - r0, grad_feat.shape[2], grad_feat.shape[3]), dtype=np.float32)
        return half_band

    def float_band(grad_feat, b, r0, r1, planar):
        if planar:
            band = np.zeros((r1 - r0, grad_feat.shape[3], grad_feat.shape[1] + ROW_PAD), dtype=grad_feat.dtype)
        else:
            band = grad_feat[b, r0:r1]
            band[:] = 0
        return band
    return float_band


def store_band(grad_feat, band, b, r0, planar):
    """Write a band from :func:`band_of` into the gradient: transposed into a planar one, rounded
    into a half one; nothing to do for a float channels-last one, which is the band (Numba only)."""
    raise NotImplementedError("store_band is compiled into Numba kernels only")


@numba.njit(inline="always", **JIT)
def _store_planar(grad_feat, band, b, r0):
    """The band (in cache) into the planar gradient in the destination's order: on an Intel Xeon
    1.0-4.3x faster than writing 16 channel planes at once (64-256 channels, 4-55 MB gradients,
    float32, bfloat16 and float64; the most for few channels)."""
    channels, width = grad_feat.shape[1], grad_feat.shape[3]
    for c in range(channels):
        for rr in range(band.shape[0]):
            for q in range(width):
                grad_feat[b, c, r0 + rr, q] = narrow(band[rr, q, c], grad_feat)


@overload(store_band)
def _store_band(grad_feat, band, b, r0, planar):
    if grad_feat.dtype in (types.uint16, types.int16):
        def store_half(grad_feat, band, b, r0, planar):
            if planar:
                _store_planar(grad_feat, band, b, r0)
                return
            for rr in range(band.shape[0]):
                row = grad_feat[b, r0 + rr]
                for q in range(band.shape[1]):
                    for c in range(band.shape[2]):
                        row[q, c] = narrow(band[rr, q, c], grad_feat)
        return store_half

    def store_float(grad_feat, band, b, r0, planar):
        if planar:
            _store_planar(grad_feat, band, b, r0)
    return store_float


class ComputeType:
    """The float type a kernel computes in, passed as the kernels' ``T`` argument (``T(x)``
    converts to it inside a kernel) and usable as a NumPy dtype outside them.

    Numba types a NumPy scalar class such as ``np.float32`` argument in Python on every call,
    about 5 µs each, and a forward makes a dozen or more such calls; an object naming its Numba
    type in ``_numba_type_`` is typed for well under 1 µs, with the same signature (so the same
    compiled kernel) as the class itself.
    """

    def __init__(self, np_type: type) -> None:
        self.dtype = np.dtype(np_type)  # what np.dtype(self), np.empty(..., self) and the like read
        self._numba_type_ = types.NumberClass(numba.from_dtype(self.dtype))

    def __repr__(self) -> str:
        return f"ComputeType({self.dtype.name})"


FLOAT32, FLOAT64 = ComputeType(np.float32), ComputeType(np.float64)


def compute_type(dtype: torch.dtype) -> ComputeType:
    """The kernels' ``T`` for a compute dtype (float64, else float32)."""
    return FLOAT64 if dtype == torch.float64 else FLOAT32


def box_geometry(rois: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, ComputeType]:
    rois = rois.detach().to(dtype).contiguous()
    return rois.numpy(), compute_type(dtype)


def box_jobs(k: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Boxes in their own order, in a few more parts than threads (boxes differ in cost)."""
    return np.arange(k, dtype=np.int64), ranges(k, 4 * workers.size())


_HUGE_PAGE = 1 << 21
_libc = None


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.empty``, with transparent huge pages requested for large buffers on Linux.

    A fresh buffer of tens of MB costs more in 4 KiB page faults than the kernel that fills it;
    2 MiB pages cut that cost about threefold here. Where madvise is unavailable this is plain
    ``torch.empty``.
    """
    global _libc
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return t
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE; a refusal only costs speed
    except (OSError, AttributeError):
        pass
    return t


def channels_last_view(t: Tensor, buffer=None) -> np.ndarray:
    """[N, H, W, C] numpy view of ``t``, transposed by our own threads when it is not one already.

    A half tensor is read as its bit patterns (see ``half_types``): a channels-last one in place,
    an NCHW one copied as bit patterns too, half the bytes that widening it to float32 would
    write. The copy goes to a fresh buffer, or to ``buffer(shape, dtype)`` (see
    :func:`channels_last_map`).

    Our kernel, not PyTorch's ``copy_``, does the copy (on the threads of :class:`_Workers`): it
    is faster here.
    """
    t = t.detach()
    if t.is_contiguous(memory_format=torch.channels_last):
        return kernel_array(t.permute(0, 2, 3, 1))
    x = kernel_array(t.contiguous())
    n, c, h, w = t.shape
    out = kernel_array((empty if buffer is None else buffer)((n, h, w, c), t.dtype))
    _layout_copy(nchw_to_nhwc, x, out, n, h, w, c)
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * dtype.itemsize


class _Scratch:
    """Buffers that live only during one call, kept between calls: channels-last copies of NCHW
    maps, max-mode winners, the output gradient transposed to channel runs, PrRoIPool's integral
    images.

    Fresh pages cost as much as the copy that fills them (faulting and zeroing 55 MB took about
    15 ms next to a 16 ms copy on 2 threads), so such a buffer is given back afterwards. The
    ``_KEEP`` most recently given back stay idle (a feature pyramid's levels each find theirs);
    a request takes the smallest idle one that holds it without wasting more than half of it.
    Memory stays bounded by ``_KEEP`` buffers; :func:`release_scratch` frees them.
    """

    _KEEP = 4

    def __init__(self) -> None:
        self._lock = threading.RLock()  # results are given back by finalizers: any thread, any time
        self._idle: list[Tensor] = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> Tensor:
        with self._lock:
            fits = [i for i, buf in enumerate(self._idle) if nbytes <= buf.numel() <= 2 * nbytes]
            if fits:
                return self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
        return empty((max(1, nbytes),), torch.uint8)

    def give(self, buf: Tensor) -> None:
        with self._lock:
            self._idle = (self._idle + [buf])[-self._KEEP:]

    def release(self) -> None:
        with self._lock:
            self._idle = []


_scratch = _Scratch()


class _Results(_Scratch):
    """Memory for large results (outputs, input gradients), recycled once the caller is done.

    Each call used to return fresh pages, and faulting them in cost 20-25% of a forward: on the
    Intel Xeon host, writing a fresh 50 MB output took 13-14 ms against 5 ms for pages already
    mapped. A result of at least ``_POOLED`` bytes is therefore a tensor over one of our buffers,
    whose memory comes back here when the last tensor sharing it is gone (its storage holds a
    NumPy array, and that array's finalizer gives the buffer back); the next call of that size
    reuses it. Until then nothing else touches it, views and autograd included. The ``_KEEP``
    most recently given back stay idle (about the size of a feature pyramid's level each);
    :func:`release_scratch` frees them. Such a tensor behaves like any other except that, as one
    made by ``torch.from_numpy``, its storage cannot grow (``resize_`` to more elements raises).
    """

    # Two at first: too few once results of several sizes take turns (a forward's output and an
    # input gradient per pyramid level, or one workload in several dtypes): a float32 output took
    # the idle buffer of a float64 one twice its size, and every float64 call then faulted in
    # fresh pages (train-P3 in four dtypes in one round robin, NCHW, 3 rounds: float64's 98 MB
    # outputs were faulted in for 7 of its 10 calls with two kept, 3 with four, the first ones;
    # float64's forward 3.0x float32's time, against 1.7x with four kept). Four were still too
    # few for six sizes (boxhead-P2 in four dtypes: float64's 111 MB input gradient faulted in
    # for 10 of 20 calls; float64 NCHW forward+backward 90-92 ms with eight kept, 108-111 with
    # four) and for a pyramid's step (an output and an input gradient per level).
    _KEEP = 8
    # 8 MiB at first; lowered because mid-sized results paid for their pages too, once other
    # operators ran between our calls (as in a model, or in the benchmark's round robin, where
    # torchvision's buffers come and go). PrRoIPool's adaptive workload (a 2.5 MB output, a 4 MB
    # input gradient), as multiples of torchvision's speed in two runs each of
    # ``bench_cpu.py --op prroi --workloads adaptive`` (AMD EPYC, 2 threads): NCHW forward 2.69 and
    # 2.39x before, 2.87 and 2.88x with results from 256 KiB recycled (float64: 2.40, 2.07 against
    # 2.60, 2.55x); forward+backward 4.0-4.9x before, 5.2-5.9x after. Below it, glibc's heap
    # usually hands out pages already mapped.
    _POOLED = 256 << 10

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = _nbytes(shape, dtype)
        if nbytes < self._POOLED:
            return empty(shape, dtype)
        buf = self.take(nbytes)
        memory = buf.numpy()[:nbytes]
        weakref.finalize(memory, self.give, buf)
        return torch.from_numpy(memory).view(dtype).view(shape)


_results = _Results()


def result_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor to return to the caller: recycled memory when large (see :class:`_Results`)."""
    return _results.tensor(shape, dtype)


def release_scratch() -> None:
    """Free the idle scratch and result buffers (see :class:`_Scratch` and :class:`_Results`)."""
    _scratch.release()
    _results.release()


@contextlib.contextmanager
def scratch_buffers():
    """A function ``buffer(shape, dtype) -> Tensor`` handing out scratch tensors (contents
    undefined) that go back to the pool when the ``with`` block ends."""
    taken: list[Tensor] = []

    def buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = _nbytes(shape, dtype)
        taken.append(_scratch.take(nbytes))
        return taken[-1][:nbytes].view(dtype).view(shape)

    try:
        yield buffer
    finally:
        for buf in taken:
            _scratch.give(buf)


@contextlib.contextmanager
def channels_last_map(t: Tensor):
    """:func:`channels_last_view` for the duration of a ``with`` block: an NCHW map's copy goes
    to a scratch buffer that later calls reuse. Nothing read from it may outlive the block."""
    with scratch_buffers() as buffer:
        yield channels_last_view(t, buffer)


@contextlib.contextmanager
def scratch(shape: tuple[int, ...], dtype: torch.dtype):
    """A scratch tensor (contents undefined) for the duration of a ``with`` block, from the same
    pool as :func:`channels_last_map`'s copies: for large buffers that do not outlive a call."""
    with scratch_buffers() as buffer:
        yield buffer(shape, dtype)


@contextlib.contextmanager
def channel_runs(grad: Tensor, dtype: torch.dtype, halves: bool = False):
    """The output gradient ``grad`` ([K, C, PH, PW], any strides) as a [K, PH * PW, C] array in
    ``dtype``, each bin's channels one contiguous run, for the duration of a ``with`` block, which
    every backward starts with. A channels-last gradient of that dtype is used in place; any other
    is transposed (half bit patterns widened) by our pool into a scratch buffer.

    With ``halves``, for a kernel that reads its bins through :func:`bin_run`, a half gradient
    stays half bit patterns: used in place when channels-last, else transposed as bit patterns.
    Widening it first cost more than the rest of the backward's extra time over float32 (train-P3's
    bfloat16 gradient: about 9 ms, writing twice its bytes)."""
    grad = grad.detach()
    k, c = grad.shape[0], grad.shape[1]
    if halves and grad.dtype in HALF_TYPES:
        dtype = grad.dtype
    if grad.is_contiguous(memory_format=torch.channels_last):
        runs = grad.permute(0, 2, 3, 1).reshape(k, -1, c)  # a view: the permuted tensor is contiguous
        if runs.dtype == dtype:
            yield kernel_array(runs)
            return
        source = kernel_array(runs).transpose(0, 2, 1)
    else:
        source = kernel_array(grad.contiguous().view(k, c, -1))
    with scratch((k, source.shape[2], c), dtype) as buffer:
        grad_t = kernel_array(buffer)
        workers.run(transpose_boxes, [(source, lo, hi, grad_t) for lo, hi in ranges(k, 4 * workers.size())])
        yield grad_t


def warm_channel_runs() -> None:
    """Compile the transposes that :func:`channel_runs` uses for a channels-last gradient of
    another dtype than the kernel's (the kernels' own warm-ups compile the NCHW ones)."""
    for source, target in ((torch.float32, torch.float64), (torch.float16, torch.float32),
                           (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.float64)):
        with channel_runs(torch.zeros(2, 3, 2, 2, dtype=source).contiguous(memory_format=torch.channels_last), target):
            pass
