"""What the Numba CPU kernels of every operator share: box geometry and taps, box orders, the
banded accumulation of input gradients, the output gradient as channel runs. Threads, and how work
is cut into jobs for them, are in ``threads.py``; layout copies in ``layout.py``; scratch and
result buffers in ``buffers.py``.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic, overload
from torch import Tensor

from .buffers import scratch
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


@numba.njit(inline="always", **JIT)
def aligned_empty(n, dtype):
    """An uninitialised 1-D array of ``n`` elements of ``dtype`` that starts on a 64-byte
    boundary (Numba only; reshape it as needed). Numba's own arrays start on 32-byte boundaries,
    so about half of them split every 512-bit load and store across two cache lines. The input
    gradient's float32 bands (half types, planar layouts) come from here: on the Intel Xeon host
    adaptive's bfloat16 channels_last input gradient then took 1.09-1.14x float32's time, against
    1.15-1.18x (its kernel alone, 1 and 2 threads, medians of 41 alternations). Not used for the
    forwards' accumulators: the box-by-box forward's, aligned so, took 1.1-1.4x as long there."""
    raw = np.empty(n + 64, dtype=dtype)
    skip = (64 - raw.ctypes.data % 64) % 64 // raw.itemsize
    return raw[skip:skip + n]


# Spare elements at the end of each row of a [rows, C] scratch that is later read a column at a
# time (one channel across bins or pixels, to transpose it). Rows of 256 channels are 1 KiB
# apart, so such a column falls in 4 of the L1 cache's 64 sets and misses on nearly every
# element; one more cache line per row spreads it over all of them. The pad is never read.
ROW_PAD = 16


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


def eight_per_pass(pixels):
    """Whether :func:`weigh_taps` adds eight entries per pass over ``pixels``' channels: for a
    float32 or float64 map, not for half bit patterns (a constant once compiled; Numba only).
    Against four per pass, whole forward on 256 channels (boxhead-P2, train-P3, mask-14; AMD
    EPYC, 2 threads, median of 24 alternations, two runs; channels_last and NCHW input): float64
    0.94-0.99 of the time, float32 0.97-1.00 (one thread: 0.96-0.98 and 0.97-1.00). Halves were
    no faster (kernel alone, 1.00-1.03): widening each element costs more than the row's loads
    and stores that eight per pass save."""
    raise NotImplementedError("eight_per_pass is compiled into Numba kernels only")


@overload(eight_per_pass)
def _eight_per_pass(pixels):
    eight = pixels.dtype in (types.float32, types.float64)
    return lambda pixels: eight


@numba.njit(inline="always", **JIT)
def weigh_taps(acc, i, pixels, base, at, weight, first, n, zero):
    """``acc[i, c] = zero + w[0] * pixels[base + at[0], c] + ... + w[n - 1] * pixels[base +
    at[n - 1], c]`` for every channel ``c``, where ``at`` and ``w`` are ``at[first:]`` and
    ``weight[first:]``, added left to right (half bit patterns widened).

    Each pass over the channels adds the next eight entries for a float32 or float64 map, else
    the next four (then the last four, two or one): the same additions, rounded alike, as one
    entry per pass, with the row loaded and stored an eighth or a quarter as often (see
    :func:`eight_per_pass`). The first pass stores ``zero + ...`` instead of adding to a cleared row
    (the same rounding; with no entries the row is ``zero``): clearing it first was a ``memset``
    call per bin (1 KB for 256 float32 channels), seen with ``perf``.

    Keep the shape of this helper: one loop of passes, no ``return``, no branch around the
    loop. Numba inlines it with a reference count taken on each array it is given and dropped
    at each exit; in this shape LLVM removes both, while a helper that first branched on ``n``
    kept them: eight atomic operations per call. In a loop of calls on cached data, 64 channels
    and one to four entries, that took 2-5x as long (``tests/test_cpu_kernels.py`` checks the
    compiled kernels' loops)."""
    channels = pixels.shape[1]
    eight = eight_per_pass(pixels)
    e = first
    end = first + n
    while e < max(end, first + 1):
        if eight and end - e >= 8:
            pa, pb, pc, pd = base + at[e], base + at[e + 1], base + at[e + 2], base + at[e + 3]
            pe, pf, pg, ph = base + at[e + 4], base + at[e + 5], base + at[e + 6], base + at[e + 7]
            wa, wb, wc, wd = weight[e], weight[e + 1], weight[e + 2], weight[e + 3]
            we, wf, wg, wh = weight[e + 4], weight[e + 5], weight[e + 6], weight[e + 7]
            for c in range(channels):
                acc[i, c] = ((acc[i, c] if e > first else zero) + wa * widen(pixels[pa, c])
                             + wb * widen(pixels[pb, c]) + wc * widen(pixels[pc, c]) + wd * widen(pixels[pd, c])
                             + we * widen(pixels[pe, c]) + wf * widen(pixels[pf, c]) + wg * widen(pixels[pg, c])
                             + wh * widen(pixels[ph, c]))
            e += 8
        elif end - e >= 4:
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
                shape = (r1 - r0, grad_feat.shape[3], grad_feat.shape[1] + ROW_PAD)
            else:
                shape = (r1 - r0, grad_feat.shape[2], grad_feat.shape[3])
            band = aligned_empty(shape[0] * shape[1] * shape[2], np.float32).reshape(shape)
            band[:] = 0
            return band
        return half_band

    def float_band(grad_feat, b, r0, r1, planar):
        if planar:
            shape = (r1 - r0, grad_feat.shape[3], grad_feat.shape[1] + ROW_PAD)
            band = aligned_empty(shape[0] * shape[1] * shape[2], grad_feat.dtype).reshape(shape)
            band[:] = 0
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
