"""RoIAlign kernels in Triton: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (for tests).

- forward: one program per box and block of channels computes a [channels x bins] tile, all
  bins stepping through the box's sample grid together; the input is read through its strides,
  so NCHW, channels_last and strided views need no copy.
- input gradient, deterministic without atomics: one program per (image, band of rows, block of
  channels) owns that part of ``grad_input`` and walks the image's boxes in a fixed order,
  skipping those whose row span misses the band. It accumulates in float32 (float64) into an
  [N, H, W, C] buffer, so that every read-modify-write is a run of contiguous channels.
- box gradient: one program per box.

The launchers are plain PyTorch code around the kernel launches; under ``traced()`` they launch
through ``torch.library.wrap_triton``, which lets torch.compile record the kernels themselves
(``roialign.ops`` does this for CUDA tensors; see ``common.traced``).

Box coordinates are scaled on the host with the same float32 (float64) operations as every
other backend; sample positions follow the published order of operations. Only samples that
can land in ``[-1, H]`` are visited (the range is computed in float64, with one spare sample on
each side, and the exact test is applied to each). Adaptive sample counts are capped at 2^30.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.common import compute_dtype
from ..reference.roi_align import row_span
from .common import block_c, channels_last_on_gpu, launcher

_MAX_GRID = tl.constexpr(2**30)  # a constexpr: compiled kernels may read no other global
_BAND_ROWS = 1  # rows of grad_input owned by one program (tune_cuda.py on an H200: 1 beat 2, 4 and 8)
_BACKWARD_BLOCK_C = 64  # channels per program in the input gradient: 256 contiguous bytes in float32
_BACKWARD_WARPS = 0  # warps per input-gradient program; 0: one per 32 channels
_FORWARD_TILE = 4096  # elements of a forward [channels x bins] tile
_FORWARD_WARPS = 4  # warps per forward program


@triton.jit
def _box_geometry(coords_ptr, k, PH, PW, sampling_ratio, ALIGNED: tl.constexpr):
    x1 = tl.load(coords_ptr + k * 4 + 0)
    y1 = tl.load(coords_ptr + k * 4 + 1)
    x2 = tl.load(coords_ptr + k * 4 + 2)
    y2 = tl.load(coords_ptr + k * 4 + 3)
    roi_w = x2 - x1
    roi_h = y2 - y1
    if ALIGNED:
        fixed_w = roi_w != roi_w  # False for finite sizes
        fixed_h = roi_h != roi_h
    else:
        fixed_w = roi_w < 1
        fixed_h = roi_h < 1
        roi_w = tl.where(fixed_w, 1.0, roi_w).to(x1.dtype)
        roi_h = tl.where(fixed_h, 1.0, roi_h).to(x1.dtype)
    inf = float("inf")
    finite = ((tl.abs(x1) < inf) & (tl.abs(y1) < inf) & (tl.abs(x2) < inf) & (tl.abs(y2) < inf)
              & (tl.abs(roi_w) < inf) & (tl.abs(roi_h) < inf))
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if sampling_ratio > 0:
        grid_h = sampling_ratio + tl.zeros((), tl.int32)
        grid_w = sampling_ratio + tl.zeros((), tl.int32)
    else:
        grid_h = tl.minimum(tl.maximum(tl.ceil(bin_h.to(tl.float64)), 0.0), _MAX_GRID).to(tl.int32)
        grid_w = tl.minimum(tl.maximum(tl.ceil(bin_w.to(tl.float64)), 0.0), _MAX_GRID).to(tl.int32)
    grid_h = tl.where(finite, grid_h, 0)
    grid_w = tl.where(finite, grid_w, 0)
    return y1, bin_h, fixed_h, grid_h, x1, bin_w, fixed_w, grid_w, finite


@triton.jit
def _visible(base, bin_size, grid, size):
    """[first, last) of the samples of a bin that can land in [-1, size], one spare each side."""
    step = bin_size.to(tl.float64) / tl.maximum(grid, 1).to(tl.float64)
    safe = tl.where(step == 0.0, 1.0, step)
    a = (-1.0 - base.to(tl.float64)) / safe - 0.5
    b = (size - base.to(tl.float64)) / safe - 0.5
    lo = tl.where(step > 0, tl.ceil(a), tl.ceil(b))
    hi = tl.where(step > 0, tl.floor(b), tl.floor(a))
    lo = tl.where(step == 0.0, 0.0, lo)
    hi = tl.where(step == 0.0, grid.to(tl.float64) - 1.0, hi)
    g = grid.to(tl.float64)
    first = tl.minimum(tl.maximum(lo - 1.0, 0.0), g)
    last = tl.minimum(tl.maximum(hi + 2.0, 0.0), g)
    last = tl.maximum(last, first)
    return first.to(tl.int32), last.to(tl.int32)


@triton.jit
def _sample(base, bin_size, grid, i, size):
    """Position of sample ``i`` and its interpolation: (valid, low, high, frac, moves)."""
    offset = ((i + tl.zeros((), tl.float64) + 0.5).to(base.dtype) * bin_size) / grid.to(base.dtype)
    pos = base + offset
    valid = (pos >= -1) & (pos <= size)
    moves = pos > 0
    pos = tl.maximum(pos, 0.0).to(base.dtype)
    low = pos.to(tl.int32)
    inner = low < size - 1  # else on the last row (column) or past it; no "~" on int1 (triton 3.1's interpreter)
    low = tl.where(inner, low, size - 1)
    high = tl.where(inner, low + 1, low)
    frac = tl.where(inner, pos - low.to(base.dtype), 0.0).to(base.dtype)
    return valid, low, high, frac, moves & inner


@triton.jit
def _union(first, last, mask):
    """The smallest range holding every non-empty [first, last) of the lanes in ``mask``."""
    used = mask & (last > first)
    lo = tl.min(tl.where(used, first, 2147483647))
    hi = tl.max(tl.where(used, last, 0))
    return lo, tl.maximum(hi, lo)


@triton.jit
def _forward_kernel(x_ptr, coords_ptr, batch_ptr, out_ptr, N, C, H, W, sxn, sxc, sxh, sxw, PH, PW, sampling_ratio,
                    ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_BINS: tl.constexpr):
    """Program (box, block of channels): a [channels x bins] tile. Every bin of a box has the same
    sample grid, so all bins step through the samples together; lanes whose sample falls outside
    [-1, H] x [-1, W] are masked."""
    k = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    bins = PH * PW
    j = tl.arange(0, BLOCK_BINS)
    jmask = j < bins
    ph = j // PW
    pw = j % PW
    b = tl.load(batch_ptr + k)
    y1, bin_h, fixed_h, grid_h, x1, bin_w, fixed_w, grid_w, finite = _box_geometry(
        coords_ptr, k, PH, PW, sampling_ratio, ALIGNED)
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_C, BLOCK_BINS), acc_dtype)
    base_y = y1 + ph.to(y1.dtype) * bin_h
    base_x = x1 + pw.to(x1.dtype) * bin_w
    yf, yl = _visible(base_y, bin_h, grid_h, H)
    xf, xl = _visible(base_x, bin_w, grid_w, W)
    y_first, y_last = _union(yf, yl, jmask)
    x_first, x_last = _union(xf, xl, jmask)
    ok = (b >= 0) & (b < N)
    y_last = tl.where(ok, y_last, y_first)
    plane = (x_ptr + b.to(tl.int64) * sxn + c.to(tl.int64) * sxc)[:, None]
    for iy in range(y_first, y_last):
        vy, ylo, yhi, ly, _my = _sample(base_y, bin_h, grid_h, iy, H)
        for ix in range(x_first, x_last):
            vx, xlo, xhi, lx, _mx = _sample(base_x, bin_w, grid_w, ix, W)
            m = cmask[:, None] & (vy & vx & jmask)[None, :]
            hy = (1.0 - ly)[None, :]
            hx = (1.0 - lx)[None, :]
            lyb = ly[None, :]
            lxb = lx[None, :]
            rlo = (ylo * sxh)[None, :]
            rhi = (yhi * sxh)[None, :]
            clo = (xlo * sxw)[None, :]
            chi = (xhi * sxw)[None, :]
            f00 = tl.load(plane + rlo + clo, mask=m, other=0.0).to(acc_dtype)
            f01 = tl.load(plane + rlo + chi, mask=m, other=0.0).to(acc_dtype)
            f10 = tl.load(plane + rhi + clo, mask=m, other=0.0).to(acc_dtype)
            f11 = tl.load(plane + rhi + chi, mask=m, other=0.0).to(acc_dtype)
            acc += (hy * hx) * f00 + (hy * lxb) * f01 + (lyb * hx) * f10 + (lyb * lxb) * f11
    count = tl.maximum(grid_h.to(tl.float64) * grid_w.to(tl.float64), 1.0).to(acc_dtype)
    value = tl.where(finite, acc / count, float("nan"))
    offsets = (k * C + c[:, None]).to(tl.int64) * bins + j[None, :]
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & jmask[None, :])


@triton.jit
def _accumulate(ptr, w, g, mask):
    old = tl.load(ptr, mask=mask, other=0.0)
    tl.store(ptr, old + w * g, mask=mask)


@triton.jit
def _backward_input_kernel(grad_ptr, coords_ptr, order_ptr, spans_ptr, bounds_ptr, out_ptr, C, H, W, PH, PW,
                           sampling_ratio, n_bands, BAND: tl.constexpr, ALIGNED: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """Program (image b, band of rows, channel block): the only writer of that part of ``out``.

    ``out`` is [N, H, W, C] and ``grad`` is [K, PH, PW, C], so every read and write is a run of
    contiguous channels. The image's boxes are walked in a fixed order (``order``, grouped by
    image); ``spans`` holds, in the same order, the rows each box can touch, so that boxes that
    miss the band cost two loads."""
    pid = tl.program_id(0)
    b = pid // n_bands
    r0 = (pid % n_bands) * BAND
    r1 = r0 + BAND
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    image = out_ptr + b.to(tl.int64) * H * W * C + c
    first_box = tl.load(bounds_ptr + b)
    last_box = tl.load(bounds_ptr + b + 1)
    for j in range(first_box, last_box):
        row_first = tl.load(spans_ptr + 2 * j)
        row_last = tl.load(spans_ptr + 2 * j + 1)
        if (row_first < r1) & (row_last >= r0):
            k = tl.load(order_ptr + j)
            y1, bin_h, fixed_h, grid_h, x1, bin_w, fixed_w, grid_w, finite = _box_geometry(
                coords_ptr, k, PH, PW, sampling_ratio, ALIGNED)
            count = tl.maximum(grid_h.to(tl.float64) * grid_w.to(tl.float64), 1.0)
            for ph in range(PH):
                base_y = y1 + ph * bin_h
                y_first, y_last = _visible(base_y, bin_h, grid_h, H)
                for iy in range(y_first, y_last):
                    vy, ylo, yhi, ly, _my = _sample(base_y, bin_h, grid_h, iy, H)
                    lo_in = (ylo >= r0) & (ylo < r1)
                    hi_in = (yhi >= r0) & (yhi < r1) & (yhi != ylo)
                    if vy & (lo_in | hi_in):
                        row_lo = image + (ylo * W).to(tl.int64) * C
                        row_hi = image + (yhi * W).to(tl.int64) * C
                        for pw in range(PW):
                            base_x = x1 + pw * bin_w
                            x_first, x_last = _visible(base_x, bin_w, grid_w, W)
                            go = tl.load(grad_ptr + ((k * PH + ph) * PW + pw).to(tl.int64) * C + c, mask=cmask,
                                         other=0.0)
                            g = go / count.to(go.dtype)
                            for ix in range(x_first, x_last):
                                vx, xlo, xhi, lx, _mx = _sample(base_x, bin_w, grid_w, ix, W)
                                if vx:
                                    hy = 1.0 - ly
                                    hx = 1.0 - lx
                                    if lo_in:
                                        _accumulate(row_lo + xlo * C, (hy * hx).to(go.dtype), g, cmask)
                                        _accumulate(row_lo + xhi * C, (hy * lx).to(go.dtype), g, cmask)
                                    if hi_in:
                                        _accumulate(row_hi + xlo * C, (ly * hx).to(go.dtype), g, cmask)
                                        _accumulate(row_hi + xhi * C, (ly * lx).to(go.dtype), g, cmask)


@triton.jit
def _backward_rois_kernel(grad_ptr, x_ptr, coords_ptr, batch_ptr, out_ptr, N, C, H, W, sxn, sxc, sxh, sxw, PH, PW,
                          sampling_ratio, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program per box: d loss / d (x1, y1, x2, y2) in scaled coordinates into ``out[k, 0:4]``."""
    k = tl.program_id(0)
    b = tl.load(batch_ptr + k)
    y1, bin_h, fixed_h, grid_h, x1, bin_w, fixed_w, grid_w, finite = _box_geometry(
        coords_ptr, k, PH, PW, sampling_ratio, ALIGNED)
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    count = tl.maximum(grid_h.to(tl.float64) * grid_w.to(tl.float64), 1.0).to(acc_dtype)
    zero = tl.zeros((), acc_dtype)
    gx1 = zero
    gy1 = zero
    gx2 = zero
    gy2 = zero
    ok = (b >= 0) & (b < N)
    bins = PH * PW
    for ph in range(PH):
        base_y = y1 + ph * bin_h
        y_first, y_last = _visible(base_y, bin_h, grid_h, H)
        y_last = tl.where(ok, y_last, y_first)
        for iy in range(y_first, y_last):
            vy, ylo, yhi, ly, my = _sample(base_y, bin_h, grid_h, iy, H)
            ty = (ph + (iy + 0.5) / grid_h.to(tl.float64)) / PH
            for pw in range(PW):
                base_x = x1 + pw * bin_w
                x_first, x_last = _visible(base_x, bin_w, grid_w, W)
                for ix in range(x_first, x_last):
                    vx, xlo, xhi, lx, mx = _sample(base_x, bin_w, grid_w, ix, W)
                    if vy & vx:
                        tx = (pw + (ix + 0.5) / grid_w.to(tl.float64)) / PW
                        s00 = zero
                        s01 = zero
                        s10 = zero
                        s11 = zero
                        for c0 in range(0, C, BLOCK_C):
                            c = c0 + tl.arange(0, BLOCK_C)
                            m = c < C
                            g = tl.load(grad_ptr + (k * C + c).to(tl.int64) * bins + ph * PW + pw, mask=m,
                                        other=0.0).to(acc_dtype)
                            plane = x_ptr + b.to(tl.int64) * sxn + c.to(tl.int64) * sxc
                            s00 += tl.sum(g * tl.load(plane + ylo * sxh + xlo * sxw, mask=m, other=0.0).to(acc_dtype))
                            s01 += tl.sum(g * tl.load(plane + ylo * sxh + xhi * sxw, mask=m, other=0.0).to(acc_dtype))
                            s10 += tl.sum(g * tl.load(plane + yhi * sxh + xlo * sxw, mask=m, other=0.0).to(acc_dtype))
                            s11 += tl.sum(g * tl.load(plane + yhi * sxh + xhi * sxw, mask=m, other=0.0).to(acc_dtype))
                        hy = 1.0 - ly.to(acc_dtype)
                        hx = 1.0 - lx.to(acc_dtype)
                        dvy = tl.where(my, hx * (s10 - s00) + lx * (s11 - s01), 0.0).to(acc_dtype)
                        dvx = tl.where(mx, hy * (s01 - s00) + ly * (s11 - s10), 0.0).to(acc_dtype)
                        sy_start = tl.where(fixed_h, 1.0, 1.0 - ty).to(acc_dtype)
                        sy_end = tl.where(fixed_h, 0.0, ty).to(acc_dtype)
                        sx_start = tl.where(fixed_w, 1.0, 1.0 - tx).to(acc_dtype)
                        sx_end = tl.where(fixed_w, 0.0, tx).to(acc_dtype)
                        gy1 += dvy * sy_start
                        gy2 += dvy * sy_end
                        gx1 += dvx * sx_start
                        gx2 += dvx * sx_end
    nan = float("nan")
    tl.store(out_ptr + k * 4 + 0, tl.where(finite, gx1 / count, nan))
    tl.store(out_ptr + k * 4 + 1, tl.where(finite, gy1 / count, nan))
    tl.store(out_ptr + k * 4 + 2, tl.where(finite, gx2 / count, nan))
    tl.store(out_ptr + k * 4 + 3, tl.where(finite, gy2 / count, nan))


# ----------------------------------------------------------------------------------------------
# Launchers.

def _scaled_boxes(rois: Tensor, spatial_scale: float, aligned: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Box corners in feature pixels ([K, 4], computed as every backend does) and batch indices."""
    rois = rois.detach().to(dtype)
    coords = (rois[:, 1:5] * spatial_scale - (0.5 if aligned else 0.0)).contiguous()
    return coords, rois[:, 0].to(torch.int32).contiguous()


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, channels_last_out: bool | None = None) -> Tensor:
    """(``channels_last_out``, the layout the operator will return, is a hint this kernel does not need.)"""
    input = channels_last_on_gpu(input)
    n, c, h, w = input.shape
    k = rois.shape[0]
    coords, batch = _scaled_boxes(rois, spatial_scale, aligned, compute_dtype(input.dtype))
    out = torch.empty((k, c, pooled_height, pooled_width), dtype=input.dtype, device=input.device)
    bins = triton.next_power_of_2(pooled_height * pooled_width)
    block = max(1, min(block_c(c), _FORWARD_TILE // bins))
    grid = (k, triton.cdiv(c, block))
    launcher(_forward_kernel)[grid](input, coords, batch, out, n, c, h, w, *input.stride(), pooled_height,
                                     pooled_width, sampling_ratio, ALIGNED=aligned, BLOCK_C=block, BLOCK_BINS=bins,
                                     num_warps=_FORWARD_WARPS)
    return out


def backward_input(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   batch_size: int, channels: int, height: int, width: int, sampling_ratio: int, aligned: bool,
                   channels_last: bool) -> Tensor:
    dtype = compute_dtype(grad.dtype)
    coords, batch = _scaled_boxes(rois, spatial_scale, aligned, dtype)
    # Boxes grouped by image, each group in its original order: the fixed order of accumulation.
    order = torch.argsort(batch, stable=True)
    bounds = torch.searchsorted(batch[order].contiguous(),
                                torch.arange(batch_size + 1, device=grad.device, dtype=torch.int32))
    spans = row_span(rois.detach(), spatial_scale, aligned, height)[order].to(torch.int32).contiguous()
    grad_t = grad.to(dtype).permute(0, 2, 3, 1).contiguous()  # [K, PH, PW, C]
    out = torch.zeros((batch_size, height, width, channels), dtype=dtype, device=grad.device)
    block = block_c(channels, _BACKWARD_BLOCK_C)
    n_bands = triton.cdiv(height, _BAND_ROWS)
    grid = (batch_size * n_bands, triton.cdiv(channels, block))
    launcher(_backward_input_kernel)[grid](grad_t, coords, order.to(torch.int32), spans, bounds.to(torch.int32), out,
                                            channels, height, width, pooled_height, pooled_width, sampling_ratio,
                                            n_bands, BAND=_BAND_ROWS, ALIGNED=aligned, BLOCK_C=block,
                                            num_warps=_BACKWARD_WARPS or max(1, block // 32))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return out.permute(0, 3, 1, 2).to(grad.dtype, memory_format=memory_format)


def backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    input = channels_last_on_gpu(input)
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    coords, batch = _scaled_boxes(rois, spatial_scale, aligned, dtype)
    out = torch.empty((k, 4), dtype=dtype, device=input.device)
    launcher(_backward_rois_kernel)[(k,)](grad.contiguous(), input, coords, batch, out, n, c, h, w,
                                           *input.stride(), pooled_height, pooled_width, sampling_ratio,
                                           ALIGNED=aligned, BLOCK_C=block_c(c))
    grad_rois = torch.cat((torch.zeros_like(out[:, :1]), out * spatial_scale), dim=1)
    return grad_rois.to(rois.dtype)
