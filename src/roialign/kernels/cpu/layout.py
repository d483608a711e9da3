"""Layout copies of the Numba CPU kernels: NCHW feature maps to channels-last and back, run on
our thread pool in one of several orders, chosen per kind of map and element size (see
:func:`tune_layout_copies`). Every order copies the same bytes, so the choice never changes a
result.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch
from torch import Tensor

from .buffers import empty, result_tensor, scratch_buffers
from .common import JIT
from .half_types import carry, kernel_array
from .threads import workers


_TILE = 32  # side of the square blocks of the tiled copy back to NCHW
# Channels per pass of the copy to channels-last (0: the destination in order, see
# :func:`nchw_to_nhwc`); the choice per kind of map and element size is in ``_TO_CHANNELS_LAST``.
BLOCKS = (0, 8, 16, 32, 64)


@numba.njit(inline="always", **JIT)
def _channel_blocks(x, b, r, out, c0, block):
    """Channels ``c0``, ``c0 + 1``, ... of pixel row ``r`` of image ``b``, ``block`` at a time, in
    passes along the row (``block`` source rows read in order, ``block`` consecutive elements
    written per pixel), as long as a whole block remains. Returns the first channel not copied.
    Inlined with a constant ``block``, so that each pass is unrolled."""
    channels, width = x.shape[1], x.shape[3]
    while c0 + block <= channels:
        for q in range(width):
            for c in range(block):
                out[b, r, q, c0 + c] = carry(x[b, c0 + c, r, q], out)
        c0 += block
    return c0


@numba.njit(**JIT)
def nchw_to_nhwc(x, b, r0, r1, out, block):
    """Rows ``[r0, r1)`` of image ``b``: ``out[b, r, q, c] = x[b, c, r, q]`` (half bit patterns
    copied as they are into a half ``out``, widened into a float32 one).

    The same bytes in one of several orders: ``block`` = 0 writes the destination in order, one
    pixel's channels after another (reading one element of every channel plane per pixel);
    ``block`` = 8, 16, 32 or 64 takes that many channels at a time along the whole pixel row
    (the channels left over then 8, then 1 at a time). Which is fastest depends on the host, the
    element size and the map. On the Intel Xeon host (2 threads, one direction, medians of 7-15,
    five processes) the 1 x 256 x 200 x 272 map took 8.2-10.6 / 10.4-14.1 / 6.1-6.9 ms in float32
    / float64 / bfloat16 with ``block`` 0 (the only order besides 8 until 2026-12-01), against
    5.9-7.0 / 9.0-9.4 / 2.8-3.5 ms with its best block (64, 64, 16); the 2 x 256 x 100 x 136 one
    2.1-2.5 / 4.4-6.7 / 2.5-2.7 ms against 2.0-2.4 / 4.4-5.0 / 1.4-1.6 ms with 32 channels. Blocks
    of a size known only at run time, and tiles through a buffer, were slower than all of these.
    :func:`tune_layout_copies` picks per element size by timing them."""
    channels, width = x.shape[1], x.shape[3]
    for r in range(r0, r1):
        if block == 0:
            for q in range(width):
                for c in range(channels):
                    out[b, r, q, c] = carry(x[b, c, r, q], out)
            continue
        c0 = 0
        if block == 64:
            c0 = _channel_blocks(x, b, r, out, c0, 64)
        elif block == 32:
            c0 = _channel_blocks(x, b, r, out, c0, 32)
        elif block == 16:
            c0 = _channel_blocks(x, b, r, out, c0, 16)
        c0 = _channel_blocks(x, b, r, out, c0, 8)
        for c in range(c0, channels):
            for q in range(width):
                out[b, r, q, c] = carry(x[b, c, r, q], out)


@numba.njit(**JIT)
def nhwc_to_nchw(x, b, r0, r1, out, tiled):
    """Rows ``[r0, r1)`` of image ``b``: ``out[b, c, r, q] = x[b, r, q, c]``, the inverse of
    :func:`nchw_to_nhwc`, in one of two orders: ``tiled``, through 32 x 32 tiles of pixels by
    channels, else the destination in order."""
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


# How the layout copies run, per kind of map: "aliased" for maps whose channel planes lie a
# multiple of 4 KiB apart, "other" for the rest. An x86 L1 data cache takes a line's set from
# address bits inside the 4 KiB page, so the same pixel of every such plane falls in one set: the
# copy to channels-last in destination order, which reads one pixel of every channel in turn, then
# misses on nearly every read once the channels outnumber the set's ways, while the other orders
# read a few planes along runs of pixels. The adaptive map (64 x 128 x 128 float32, 64 KiB planes)
# took 1.60 ms in destination order and 0.45 ms in 32 x 32 tiles, and the P3 map (100 x 136 planes)
# 2.8 ms and 4.2 ms (AMD EPYC, 2 threads, one direction, warm).
#
# ``_TO_CHANNELS_LAST[kind, element size]``: the ``block`` of :func:`nchw_to_nhwc` (channels per
# pass, 0 for destination order). ``_TO_PLANAR[kind]``: whether the copy back goes by 32 x 32
# tiles. Defaults (when ``warmup()`` was not called): the blocks measured fastest on the Intel Xeon
# host on the 1 x 256 x 200 x 272 map (see :func:`nchw_to_nhwc`), 16 channels for aliased maps
# (their 64 planes of 4 KiB multiples: 0.35-0.41 ms in float32 against 0.50-0.53 in destination
# order), and for the copy back the order measured faster on the hosts where it was compared.
# :func:`tune_layout_copies` times them all on this host.
_TO_CHANNELS_LAST = {("other", 2): 16, ("other", 4): 64, ("other", 8): 64,
                     ("aliased", 2): 16, ("aliased", 4): 16, ("aliased", 8): 16}
_TO_PLANAR = {"other": False, "aliased": True}
_ALIASING_BYTES = 4096


def _kind(plane_bytes: int) -> str:
    """The kind of map (a key of ``_TO_PLANAR``) whose channel planes are ``plane_bytes`` apart."""
    return "aliased" if plane_bytes % _ALIASING_BYTES == 0 else "other"


def _layout_copy(kernel, src: np.ndarray, out: np.ndarray, n: int, h: int, w: int, c: int, order=None) -> None:
    """Run ``kernel`` (:func:`nchw_to_nhwc` or :func:`nhwc_to_nchw`) on our pool, a job per band
    of about 64K elements of rows of one image, in the order ``order`` (its ``block`` or
    ``tiled``; default: the one chosen for the planar side's kind of map and element size)."""
    if order is None:
        planar = src if kernel is nchw_to_nhwc else out
        kind = _kind(h * w * planar.itemsize)
        order = _TO_CHANNELS_LAST[kind, planar.itemsize] if kernel is nchw_to_nhwc else _TO_PLANAR[kind]
    rows = max(1, (1 << 16) // max(1, w * c))
    workers.run(kernel, [(src, b, r0, min(h, r0 + rows), out, order) for b in range(n) for r0 in range(0, h, rows)])


def planar_from_channels_last(t: Tensor) -> Tensor:
    """``[N, H, W, C]`` contiguous ``t`` as an NCHW-contiguous ``[N, C, H, W]`` tensor, copied by our pool."""
    n, h, w, c = t.shape
    out = result_tensor((n, c, h, w), t.dtype)
    _layout_copy(nhwc_to_nchw, t.numpy(), out.numpy(), n, h, w, c)
    return out


_TUNED_DTYPES = {2: torch.float16, 4: torch.float32, 8: torch.float64}  # halves are copied as 2-byte bits


def tune_layout_copies(shape: tuple[int, int, int, int] = (1, 256, 200, 272), pairs: int = 3,
                       aliased_shape: tuple[int, int, int, int] = (1, 64, 128, 128)) -> dict:
    """Time the orders of both layout copies with the current thread count, alternating, on maps
    of ``shape`` (default: a detector's P2 level, 56 MB in float32; a P3-sized map did not tell
    the float32 blocks apart) and of ``aliased_shape`` (planes a multiple of 4 KiB apart in every
    element size; default: the adaptive benchmark's map), and keep the fastest by median: for
    the copy to channels-last, every ``block`` of :func:`nchw_to_nhwc` per kind of map and element
    size (2, 4 and 8 bytes); for the copy back, both orders per kind of map, in float32. Every
    order gives the same bytes, so this choice never changes a result. Returns ``{kind:
    {"shape": the map's shape, 2: {block: seconds}, 4: ..., 8: ..., "to_planar": {True: seconds,
    False: seconds}}}``."""
    if aliased_shape[2] * aliased_shape[3] * 2 % _ALIASING_BYTES:
        raise ValueError(f"aliased_shape {aliased_shape}: its 2-byte planes are not a multiple of 4 KiB apart")
    if shape[2] * shape[3] * 8 % _ALIASING_BYTES == 0:
        raise ValueError(f"shape {shape}: its float64 planes are a multiple of 4 KiB apart; use aliased_shape")
    report: dict = {}
    for kind, dims in (("other", shape), ("aliased", aliased_shape)):
        report[kind] = {"shape": dims}
        for size, dtype in _TUNED_DTYPES.items():
            median = _time_orders(nchw_to_nhwc, dims, dtype, BLOCKS, pairs)
            _TO_CHANNELS_LAST[kind, size] = min(BLOCKS, key=median.__getitem__)
            report[kind][size] = median
        median = _time_orders(nhwc_to_nchw, dims, torch.float32, (True, False), pairs)
        _TO_PLANAR[kind] = median[True] < median[False]
        report[kind]["to_planar"] = median
    return report


def _time_orders(kernel, shape: tuple[int, int, int, int], dtype: torch.dtype, orders, pairs: int) -> dict:
    """Median seconds of ``kernel`` (one direction) on a map of ``shape`` in ``dtype``, per order,
    over ``pairs`` rounds of all the orders in turn (after one more that compiles or loads the
    kernel and faults the pages in)."""
    import time

    n, c, h, w = shape
    nchw = kernel_array(torch.randn(shape).to(dtype))
    nhwc = kernel_array(empty((n, h, w, c), dtype))
    src, out = (nchw, nhwc) if kernel is nchw_to_nhwc else (nhwc, nchw)
    times: dict = {order: [] for order in orders}
    for i in range(pairs + 1):
        for order in orders:
            start = time.perf_counter()
            _layout_copy(kernel, src, out, n, h, w, c, order)
            if i > 0:
                times[order].append(time.perf_counter() - start)
    return {order: float(np.median(t)) for order, t in times.items()}


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


@contextlib.contextmanager
def channels_last_map(t: Tensor):
    """:func:`channels_last_view` for the duration of a ``with`` block: an NCHW map's copy goes
    to a scratch buffer that later calls reuse. Nothing read from it may outlive the block."""
    with scratch_buffers() as buffer:
        yield channels_last_view(t, buffer)
