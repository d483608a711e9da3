"""Layout copies of the Numba CPU kernels: NCHW feature maps to channels-last and back, run on
our thread pool in one of two orders, chosen per kind of map (see :func:`tune_layout_copies`).
Both orders copy the same bytes, so the choice never changes a result.
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
_BLOCK = 8  # channels per pass of the blocked copy to channels-last


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
