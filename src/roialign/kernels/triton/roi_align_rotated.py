"""Rotated RoIAlign kernels in Triton: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (for tests).

- forward: one program per box and block of channels computes a [channels x bins x samples]
  tile: each step takes the next few visible samples of every bin at once (a rotated sample
  is not separable into a row and a column, so each one gets its own four taps) and sums them
  into the bins. The input is read through its strides, so NCHW, channels_last and strided
  views need no copy.
- input gradient, deterministic without atomics: one program per (image, band of rows, block of
  channels) owns that part of ``grad_input`` and walks the image's boxes in a fixed order,
  skipping those whose row span (``reference.common.rotated_row_span``) misses the band, and
  bins too far from it, and scattering only the taps whose row is in it, one sample at a time.
  It accumulates in float32 (float64) into an [N, H, W, C] buffer, so that every
  read-modify-write is a run of contiguous channels.
- box gradient: one program per box, a [bins x samples] tile per step summed over channel
  blocks; d/d(cx, cy, w, h, theta) by the chain rule of the reference kernel.

The launchers are plain PyTorch code around the kernel launches; under ``common.traced()``
they launch through ``torch.library.wrap_triton``, so that torch.compile records the kernels.
Box geometry is computed on the host by the reference kernel's ``geometry`` (the angle reduced
in float64, the rest in the compute dtype, non-finite boxes emptied, their outputs set to NaN
here) and handed over in float64, which holds float32 values exactly. So are the visible
samples: per row (column) of bins, the first sample and the number of samples whose box-local
coordinate can land on the map (``local_extent`` + ``sample_range``), so that a huge box costs
no more than the map. Sample positions follow the published order of operations.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.common import angle_factor, compute_dtype, local_extent, rotated_row_span, rotation, sample_range
from ..reference.roi_align_rotated import geometry
from .common import block_c, channels_last_on_gpu, launcher

_BAND_ROWS = 1  # rows of grad_input owned by one program (tune_cuda.py on an H200: 1 beat 2, 4 and 8)
_BACKWARD_BLOCK_C = 64  # channels per program in the input gradient: 256 contiguous bytes in float32
_TILE = 2048  # elements of a [channels x bins x samples] tile (tune_cuda.py on an H200, 2026-11-30: 2048 beat 4096
# on all four workloads, 11.9 against 13.4 ms in all)
_ADAPTIVE_SAMPLES = 64  # samples per bin and step when their number is adaptive
_FORWARD_WARPS = 8  # warps per forward program (tune_cuda.py on an H200: 8 beat 4)
_BACKWARD_WARPS = 0  # warps per input-gradient program; 0: one per 32 channels
_MAX_COUNT = 2**31 - 1


@triton.jit
def _box(params_ptr, k, like):
    """Box ``k``'s geometry in ``like``'s dtype (see ``_plan`` for the columns)."""
    p = params_ptr + k * 11
    cx = tl.load(p + 0).to(like.dtype)
    cy = tl.load(p + 1).to(like.dtype)
    cos = tl.load(p + 2).to(like.dtype)
    sin = tl.load(p + 3).to(like.dtype)
    bin_h = tl.load(p + 4).to(like.dtype)
    bin_w = tl.load(p + 5).to(like.dtype)
    grid_h = tl.load(p + 6).to(like.dtype)
    grid_w = tl.load(p + 7).to(like.dtype)
    count = tl.load(p + 8).to(like.dtype)
    return cx, cy, cos, sin, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _local(base, bin_size, grid, i):
    """Box-local coordinate of sample ``i`` of a bin starting at ``base``."""
    return base + ((i.to(tl.float64) + 0.5).to(base.dtype) * bin_size) / grid


@triton.jit
def _taps(pos, last, inside):
    """Interpolation along one axis of size ``last + 1``: (low, high, frac, moves), int64
    indices. A clamped coordinate, or one on the last row (column), does not move the sample;
    outside samples sit harmlessly at 0."""
    moves = inside & (pos > 0)
    pos = tl.where(moves, pos, 0.0).to(pos.dtype)
    low = pos.to(tl.int64)  # int64: no overflow checks in the interpreter, none needed on the GPU
    inner = low < last  # no "~" on int1 (older interpreters)
    low = tl.where(inner, low, last)
    high = tl.where(inner, low + 1, low)
    frac = tl.where(inner, pos - low.to(pos.dtype), 0.0).to(pos.dtype)
    return low, high, frac, moves & inner


@triton.jit
def _sample(yy, xx, cx, cy, cos, sin, H, W, live):
    """Turn box-local ``(yy, xx)`` around the centre; whether it lands in [-1, H] x [-1, W], and its taps."""
    y = yy * cos - xx * sin + cy
    x = yy * sin + xx * cos + cx
    inside = live & (y >= -1) & (y <= H) & (x >= -1) & (x <= W)
    ylo, yhi, ly, my = _taps(y, H - 1, inside)
    xlo, xhi, lx, mx = _taps(x, W - 1, inside)
    return inside, ylo, yhi, ly, my, xlo, xhi, lx, mx


@triton.jit
def _lanes(first_ptr, count_ptr, base_ptr, at, mask, like):
    """First visible sample, their number and the box-local start of the bin rows (columns) at ``at``."""
    first = tl.load(first_ptr + at, mask=mask, other=0)
    count = tl.load(count_ptr + at, mask=mask, other=0)
    base = tl.load(base_ptr + at, mask=mask, other=0.0).to(like.dtype)
    return first, count, base


@triton.jit
def _grid_sample(q, fy, ny, by, fx, nx, bx, bin_h, bin_w, grid_h, grid_w):
    """The ``q``-th visible sample of a bin, row-major over its visible ``ny x nx`` samples:
    (valid, sample indices iy and ix, box-local yy and xx)."""
    width = tl.maximum(nx, 1)
    ty = q // width
    iy = fy + ty
    ix = fx + (q - ty * width)
    valid = q < ny.to(tl.int64) * nx
    return valid, iy, ix, _local(by, bin_h, grid_h, iy), _local(bx, bin_w, grid_w, ix)


@triton.jit
def _forward_kernel(x_ptr, params_ptr, first_ptr, count_ptr, base_ptr, batch_ptr, out_ptr, N, C, H, W,
                    sxn, sxc, sxh, sxw, PH, PW, BLOCK_C: tl.constexpr, BLOCK_BINS: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """Program (box, block of channels): a [channels x bins x samples] tile. Each step takes the
    next ``BLOCK_S`` visible samples of every bin; lanes past their bin's samples, or whose
    sample misses [-1, H] x [-1, W], are masked."""
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    bins = PH * PW
    j = tl.arange(0, BLOCK_BINS)
    jmask = j < bins
    ph = j // PW
    pw = j % PW
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    like = tl.zeros((), acc_dtype)
    cx, cy, cos, sin, bin_h, bin_w, grid_h, grid_w, count = _box(params_ptr, k, like)
    fy, ny, by = _lanes(first_ptr, count_ptr, base_ptr, k * (PH + PW) + ph, jmask, like)
    fx, nx, bx = _lanes(first_ptr, count_ptr, base_ptr, k * (PH + PW) + PH + pw, jmask, like)
    b = tl.load(batch_ptr + k)
    ok = (b >= 0) & (b < N)
    plane = (x_ptr + b.to(tl.int64) * sxn + c.to(tl.int64) * sxc)[:, None, None]
    cmask3 = cmask[:, None, None]
    # The sample math runs on [1 x bins x samples] tensors, not [bins x samples] ones expanded
    # later: Triton 3.4-3.7 fail to compile some tile shapes of the latter (mismatched layouts).
    s = tl.arange(0, BLOCK_S)[None, None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_BINS), acc_dtype)
    for q0 in range(0, tl.max(ny.to(tl.int64) * nx, 0), BLOCK_S):
        valid, iy, ix, yy, xx = _grid_sample(q0 + s, fy[None, :, None], ny[None, :, None], by[None, :, None],
                                             fx[None, :, None], nx[None, :, None], bx[None, :, None], bin_h, bin_w,
                                             grid_h, grid_w)
        inside, ylo, yhi, ly, my, xlo, xhi, lx, mx = _sample(yy, xx, cx, cy, cos, sin, H, W, valid & ok)
        m = cmask3 & inside
        f00 = tl.load(plane + (ylo * sxh + xlo * sxw), mask=m, other=0.0).to(acc_dtype)
        f01 = tl.load(plane + (ylo * sxh + xhi * sxw), mask=m, other=0.0).to(acc_dtype)
        f10 = tl.load(plane + (yhi * sxh + xlo * sxw), mask=m, other=0.0).to(acc_dtype)
        f11 = tl.load(plane + (yhi * sxh + xhi * sxw), mask=m, other=0.0).to(acc_dtype)
        hy = 1.0 - ly
        hx = 1.0 - lx
        acc += tl.sum((hy * hx) * f00 + (hy * lx) * f01 + (ly * hx) * f10 + (ly * lx) * f11, axis=2)
    offsets = (k * C + c[:, None]) * bins + j[None, :]
    tl.store(out_ptr + offsets, acc / count, mask=cmask[:, None] & jmask[None, :])


@triton.jit
def _backward_input_kernel(grad_ptr, params_ptr, first_ptr, count_ptr, base_ptr, order_ptr, spans_ptr, bounds_ptr,
                           out_ptr, C, H, W, PH, PW, n_bands, BAND: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (image b, band of rows, channel block): the only writer of that part of ``out``.

    ``out`` is [N, H, W, C] and ``grad`` is [K, PH, PW, C], so every read and write is a run of
    contiguous channels. The image's boxes are walked in a fixed order (``order``, grouped by
    image); ``spans`` holds, in the same order, the rows each box can touch, so that boxes that
    miss the band cost two loads, and so do bins whose centre is too far from it. Samples go
    one at a time (two of them may share a pixel); each of its four taps is a [channels]
    read-modify-write, the taps outside the band, or repeated at the map's edge, masked."""
    pid = tl.program_id(0)
    b = pid // n_bands
    r0 = (pid % n_bands) * BAND
    r1 = r0 + BAND
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    image = out_ptr + b.to(tl.int64) * H * W * C + c
    dt = grad_ptr.dtype.element_ty
    like = tl.zeros((), dt)
    # The per-sample loop is written out (no helpers), with int64 indices: the interpreter pays
    # for every call and checks every int32 operation for overflow. A sample can touch a row of
    # the band only if r0 - 1 <= y <= r1.
    y_min = (r0 - 1).to(dt)
    y_max = tl.minimum(r1, H).to(dt)
    x_max = W + tl.zeros((), dt)
    h_last = H - 1 + tl.zeros((), tl.int64)
    w_last = W - 1 + tl.zeros((), tl.int64)
    r0_64 = r0.to(tl.int64)
    r1_64 = r1.to(tl.int64)
    for j in range(tl.load(bounds_ptr + b), tl.load(bounds_ptr + b + 1)):
        row_first = tl.load(spans_ptr + 2 * j)
        row_last = tl.load(spans_ptr + 2 * j + 1)
        if (row_first < r1) & (row_last >= r0):
            k = tl.load(order_ptr + j).to(tl.int64)
            cx, cy, cos, sin, bin_h, bin_w, grid_h, grid_w, count = _box(params_ptr, k, like)
            # How far a bin's samples reach from its centre, in rows, with room for rounding.
            reach = (0.5 * (bin_h * tl.abs(cos) + bin_w * tl.abs(sin)) + 2.0
                     + 1e-5 * (tl.abs(cx) + tl.abs(cy) + PH * bin_h + PW * bin_w))
            for ph in range(PH):
                at_y = k * (PH + PW) + ph
                by = tl.load(base_ptr + at_y).to(dt)
                yc_cos = (by + 0.5 * bin_h) * cos
                fy = tl.load(first_ptr + at_y)
                ny = tl.load(count_ptr + at_y)
                for pw in range(PW):
                    at_x = k * (PH + PW) + PH + pw
                    bx = tl.load(base_ptr + at_x).to(dt)
                    y_c = yc_cos - (bx + 0.5 * bin_w) * sin + cy
                    if (y_c - reach < r1) & (y_c + reach >= r0):
                        fx = tl.load(first_ptr + at_x)
                        nx = tl.load(count_ptr + at_x)
                        go = tl.load(grad_ptr + ((k * PH + ph) * PW + pw) * C + c, mask=cmask, other=0.0)
                        g = go / count
                        for ty in range(0, ny):
                            yy = by + (((fy + ty).to(tl.float64) + 0.5).to(dt) * bin_h) / grid_h
                            y_cos = yy * cos
                            y_sin = yy * sin
                            for tx in range(0, nx):
                                xx = bx + (((fx + tx).to(tl.float64) + 0.5).to(dt) * bin_w) / grid_w
                                y = y_cos - xx * sin + cy
                                x = y_sin + xx * cos + cx
                                if (y >= y_min) & (y <= y_max) & (x >= -1.0) & (x <= x_max):
                                    y = tl.maximum(y, 0.0).to(dt)
                                    x = tl.maximum(x, 0.0).to(dt)
                                    ylo = y.to(tl.int64)
                                    xlo = x.to(tl.int64)
                                    y_in = ylo < h_last
                                    x_in = xlo < w_last
                                    ylo = tl.where(y_in, ylo, h_last)
                                    xlo = tl.where(x_in, xlo, w_last)
                                    ly = tl.where(y_in, y - ylo.to(dt), 0.0).to(dt)
                                    lx = tl.where(x_in, x - xlo.to(dt), 0.0).to(dt)
                                    # Four [channels] read-modify-writes, not one [4 x channels]
                                    # one: a pixel's channel c must always be handled by the same
                                    # thread, or a later sample's read of it can race this write.
                                    hy = 1.0 - ly
                                    hx = 1.0 - lx
                                    top_in = (ylo >= r0_64) & (ylo < r1_64)
                                    low_in = y_in & (ylo + 1 >= r0_64) & (ylo + 1 < r1_64)
                                    p = image + (ylo * W + xlo) * C
                                    m = cmask & top_in
                                    tl.store(p, tl.load(p, mask=m, other=0.0) + (hy * hx).to(dt) * g, mask=m)
                                    m = cmask & top_in & x_in
                                    tl.store(p + C, tl.load(p + C, mask=m, other=0.0) + (hy * lx).to(dt) * g, mask=m)
                                    p = p + W * C
                                    m = cmask & low_in
                                    tl.store(p, tl.load(p, mask=m, other=0.0) + (ly * hx).to(dt) * g, mask=m)
                                    m = cmask & low_in & x_in
                                    tl.store(p + C, tl.load(p + C, mask=m, other=0.0) + (ly * lx).to(dt) * g, mask=m)


@triton.jit
def _backward_rois_kernel(grad_ptr, x_ptr, params_ptr, first_ptr, count_ptr, base_ptr, batch_ptr, out_ptr, N, C, H,
                          W, sxn, sxc, sxh, sxw, PH, PW, BLOCK_C: tl.constexpr, BLOCK_BINS: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    """Program per box: d loss / d (cx, cy, w, h, theta) in scaled pixels and radians into
    ``out[k, 0:5]``. Each step is a [bins x samples] tile, as in the forward: the four taps'
    values weighted by the output gradient and summed over channel blocks, then chained to the
    box geometry."""
    k = tl.program_id(0).to(tl.int64)
    bins = PH * PW
    j = tl.arange(0, BLOCK_BINS)
    jmask = j < bins
    ph = j // PW
    pw = j % PW
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    like = tl.zeros((), acc_dtype)
    cx, cy, cos, sin, bin_h, bin_w, grid_h, grid_w, count = _box(params_ptr, k, like)
    # The sample's coordinate as a fraction of the box size, in float64 (0 where the size is fixed).
    gh64 = tl.maximum(tl.load(params_ptr + k * 11 + 6), 1.0)
    gw64 = tl.maximum(tl.load(params_ptr + k * 11 + 7), 1.0)
    move_h = tl.load(params_ptr + k * 11 + 9).to(acc_dtype)
    move_w = tl.load(params_ptr + k * 11 + 10).to(acc_dtype)
    fy, ny, by = _lanes(first_ptr, count_ptr, base_ptr, k * (PH + PW) + ph, jmask, like)
    fx, nx, bx = _lanes(first_ptr, count_ptr, base_ptr, k * (PH + PW) + PH + pw, jmask, like)
    b = tl.load(batch_ptr + k)
    ok = (b >= 0) & (b < N)
    grad_at = (k * C * bins + j)[None, :]
    s = tl.arange(0, BLOCK_S)[None, :]
    zero = tl.zeros((BLOCK_BINS, BLOCK_S), acc_dtype)
    d_cx = zero
    d_cy = zero
    d_w = zero
    d_h = zero
    d_t = zero
    for q0 in range(0, tl.max(ny.to(tl.int64) * nx, 0), BLOCK_S):
        valid, iy, ix, yy, xx = _grid_sample(q0 + s, fy[:, None], ny[:, None], by[:, None], fx[:, None],
                                             nx[:, None], bx[:, None], bin_h, bin_w, grid_h, grid_w)
        fr_y = ((ph[:, None] + (iy.to(tl.float64) + 0.5) / gh64) / PH - 0.5).to(acc_dtype) * move_h
        fr_x = ((pw[:, None] + (ix.to(tl.float64) + 0.5) / gw64) / PW - 0.5).to(acc_dtype) * move_w
        inside, ylo, yhi, ly, my, xlo, xhi, lx, mx = _sample(yy, xx, cx, cy, cos, sin, H, W, valid & ok)
        at00 = (ylo * sxh + xlo * sxw)[None, :, :]
        at01 = (ylo * sxh + xhi * sxw)[None, :, :]
        at10 = (yhi * sxh + xlo * sxw)[None, :, :]
        at11 = (yhi * sxh + xhi * sxw)[None, :, :]
        s00 = zero
        s01 = zero
        s10 = zero
        s11 = zero
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            g = tl.load(grad_ptr + grad_at + (c * bins)[:, None], mask=cm[:, None] & jmask[None, :], other=0.0)
            g = g.to(acc_dtype)[:, :, None]
            m = cm[:, None, None] & inside[None, :, :]
            plane = (x_ptr + b.to(tl.int64) * sxn + c.to(tl.int64) * sxc)[:, None, None]
            s00 += tl.sum(g * tl.load(plane + at00, mask=m, other=0.0).to(acc_dtype), axis=0)
            s01 += tl.sum(g * tl.load(plane + at01, mask=m, other=0.0).to(acc_dtype), axis=0)
            s10 += tl.sum(g * tl.load(plane + at10, mask=m, other=0.0).to(acc_dtype), axis=0)
            s11 += tl.sum(g * tl.load(plane + at11, mask=m, other=0.0).to(acc_dtype), axis=0)
        # d value / d y and d x of the sample, then y = yy cos - xx sin + cy,
        # x = yy sin + xx cos + cx, yy = h * fr_y, xx = w * fr_x.
        dvy = tl.where(my, (1.0 - lx) * (s10 - s00) + lx * (s11 - s01), 0.0).to(acc_dtype)
        dvx = tl.where(mx, (1.0 - ly) * (s01 - s00) + ly * (s11 - s10), 0.0).to(acc_dtype)
        d_cx += dvx
        d_cy += dvy
        d_w += dvx * fr_x * cos - dvy * fr_x * sin
        d_h += dvy * fr_y * cos + dvx * fr_y * sin
        # Off the map a sample moves nothing; its yy and xx may have overflowed (boxes near 1e300).
        d_t += tl.where(inside, dvx * (yy * cos - xx * sin) - dvy * (yy * sin + xx * cos), 0.0).to(acc_dtype)
    out = out_ptr + k * 5
    tl.store(out + 0, tl.sum(tl.sum(d_cx, axis=1), axis=0) / count)
    tl.store(out + 1, tl.sum(tl.sum(d_cy, axis=1), axis=0) / count)
    tl.store(out + 2, tl.sum(tl.sum(d_w, axis=1), axis=0) / count)
    tl.store(out + 3, tl.sum(tl.sum(d_h, axis=1), axis=0) / count)
    tl.store(out + 4, tl.sum(tl.sum(d_t, axis=1), axis=0) / count)


# ----------------------------------------------------------------------------------------------
# Launchers.

class _Plan(NamedTuple):
    params: Tensor  # [K, 11] float64: cx, cy, cos, sin, bin_h, bin_w, grid_h, grid_w, count, move_h, move_w
    first: Tensor  # [K, PH + PW] int64: first visible sample of each bin row, then of each bin column
    count: Tensor  # [K, PH + PW] int32: how many visible samples follow it
    base: Tensor  # [K, PH + PW] float64: box-local start of each bin row (column)
    batch: Tensor  # [K] int32
    finite: Tensor  # [K] bool


def _plan(rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
          aligned: bool, clockwise: bool, degrees: bool, dtype: torch.dtype, height: int, width: int) -> _Plan:
    """The geometry of every box and its visible samples, computed as the reference kernel does."""
    rois = rois.detach()
    geo = geometry(rois, spatial_scale, (pooled_height, pooled_width), sampling_ratio, aligned, degrees, clockwise,
                   dtype)
    y_lo, y_hi, x_lo, x_hi = local_extent(geo.cx, geo.cy, geo.cos, geo.sin, height, width, geo.width, geo.height,
                                          dtype)

    def axis(size: Tensor, pooled: int, grid: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, ...]:
        bin_size = size / pooled
        p = torch.arange(pooled, device=size.device, dtype=dtype)
        base = (-size / 2)[:, None] + p * bin_size[:, None]
        first, count = sample_range(base, bin_size[:, None], grid[:, None], lo[:, None], hi[:, None])
        return bin_size, base, first, count

    bin_h, base_y, first_y, count_y = axis(geo.height, pooled_height, geo.grid_h, y_lo, y_hi)
    bin_w, base_x, first_x, count_x = axis(geo.width, pooled_width, geo.grid_w, x_lo, x_hi)
    ones = torch.ones_like(geo.grid_h)
    move_h = ones if geo.fixed_h is None else (~geo.fixed_h).double()
    move_w = ones if geo.fixed_w is None else (~geo.fixed_w).double()
    count = (geo.grid_h * geo.grid_w).clamp(min=1)
    params = torch.stack([v.double() for v in (geo.cx, geo.cy, geo.cos, geo.sin, bin_h, bin_w)]
                         + [geo.grid_h, geo.grid_w, count, move_h, move_w], 1).contiguous()
    first = torch.cat((first_y, first_x), 1).long().contiguous()
    counts = torch.cat((count_y, count_x), 1).clamp(max=_MAX_COUNT).int().contiguous()
    base = torch.cat((base_y, base_x), 1).double().contiguous()
    return _Plan(params, first, counts, base, rois[:, 0].to(torch.int32).contiguous(), geo.finite)


def _tile(channels: int, pooled_height: int, pooled_width: int, sampling_ratio: int) -> tuple[int, int, int]:
    """(channels, bins, samples) of a [channels x bins x samples] tile: every bin; a bin's samples
    (a guess for adaptive counts), as many as leave room for 16 channels; then the channels."""
    bins = triton.next_power_of_2(pooled_height * pooled_width)
    per_bin = triton.next_power_of_2(sampling_ratio * sampling_ratio) if sampling_ratio > 0 else _ADAPTIVE_SAMPLES
    samples = max(1, min(per_bin, _TILE // (bins * 16)))
    return max(1, min(block_c(channels), _TILE // (bins * samples))), bins, samples


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    input = channels_last_on_gpu(input)
    n, c, h, w = input.shape
    k = rois.shape[0]
    plan = _plan(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees,
                 compute_dtype(input.dtype), h, w)
    # Written in the compute dtype and rounded here: Triton's interpreter truncates float32 to bfloat16.
    out = torch.empty((k, c, pooled_height, pooled_width), dtype=compute_dtype(input.dtype), device=input.device)
    block, bins, samples = _tile(c, pooled_height, pooled_width, sampling_ratio)
    grid = (k, triton.cdiv(c, block))
    launcher(_forward_kernel)[grid](input, plan.params, plan.first, plan.count, plan.base, plan.batch, out, n, c, h,
                                     w, *input.stride(), pooled_height, pooled_width, BLOCK_C=block, BLOCK_BINS=bins,
                                     BLOCK_S=samples, num_warps=_FORWARD_WARPS)
    return torch.where(plan.finite[:, None, None, None], out, torch.full_like(out, float("nan"))).to(input.dtype)


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   clockwise: bool, degrees: bool, channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    plan = _plan(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees,
                 dtype, height, width)
    # Boxes grouped by image, each group in its original order: the fixed order of accumulation.
    order = torch.argsort(plan.batch, stable=True)
    bounds = torch.searchsorted(plan.batch[order].contiguous(),
                                torch.arange(batch_size + 1, device=grad.device, dtype=torch.int32))
    cos, sin = rotation(rois.detach()[:, 5], degrees, clockwise)
    spans = rotated_row_span(rois.detach(), cos, sin, spatial_scale, aligned, height)
    spans = spans[order].to(torch.int32).contiguous()
    grad_t = grad.to(dtype).permute(0, 2, 3, 1).contiguous()  # [K, PH, PW, C]
    out = torch.zeros((batch_size, height, width, channels), dtype=dtype, device=grad.device)
    block = block_c(channels, _BACKWARD_BLOCK_C)
    n_bands = triton.cdiv(height, _BAND_ROWS)
    grid = (batch_size * n_bands, triton.cdiv(channels, block))
    launcher(_backward_input_kernel)[grid](grad_t, plan.params, plan.first, plan.count, plan.base,
                                            order.to(torch.int32), spans, bounds.to(torch.int32), out, channels,
                                            height, width, pooled_height, pooled_width, n_bands, BAND=_BAND_ROWS,
                                            BLOCK_C=block, num_warps=_BACKWARD_WARPS or max(1, block // 32))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return out.permute(0, 3, 1, 2).to(grad.dtype, memory_format=memory_format)


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    input = channels_last_on_gpu(input)
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    plan = _plan(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees,
                 dtype, h, w)
    out = torch.empty((k, 5), dtype=dtype, device=input.device)
    block, bins, samples = _tile(c, pooled_height, pooled_width, sampling_ratio)
    launcher(_backward_rois_kernel)[(k,)](grad.contiguous(), input, plan.params, plan.first, plan.count, plan.base,
                                           plan.batch, out, n, c, h, w, *input.stride(), pooled_height,
                                           pooled_width, BLOCK_C=block, BLOCK_BINS=bins, BLOCK_S=samples)
    out = torch.cat((out[:, :4] * spatial_scale, out[:, 4:] * angle_factor(degrees, clockwise)), dim=1)
    out = torch.where(plan.finite[:, None], out, torch.full_like(out, float("nan")))
    return torch.cat((torch.zeros_like(out[:, :1]), out), dim=1).to(rois.dtype)
