"""Max-mode RoIAlign kernels in Triton: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (for tests).

The sample tables come from the pure-PyTorch kernel (``reference.roi_align_max._axis``): per box,
per bin row (column), the candidate samples along that axis with their taps, weights, whether
they are real, on the map and move with the box, and their position derivatives. The kernels
only combine a row table and a column table, so they see exactly the samples, in exactly the
order, that the other backends see.

- forward: one program per box and block of channels, a [channels x bins] tile; every bin steps
  through its candidate samples in row-major order together, keeping a running maximum and,
  for the backward, the winner's code ``(row << 32) | (column << 2) | corner`` (row and column
  are table indices; -1 when no sample with a gradient won).
- input gradient, deterministic without atomics: one program per (image, block of channels)
  owns that part of ``grad_input`` ([N, H, W, C]) and walks the image's boxes in a fixed order;
  each channel's winner is decoded and its taps updated. A [channels] read-modify-write keeps
  each channel with one thread, so successive updates of a pixel never race.
- box gradient: one program per box, bins one after another, channels in blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.common import compute_dtype
from ..reference.roi_align_max import _axis
from .common import block_c, channels_last_on_gpu, launcher

_BLOCK_C_BACKWARD = 32  # channels per input-gradient program


@triton.jit
def _table(ptr, k, p, s, P, S, mask, other):
    return tl.load(ptr + (k * P + p) * S + s, mask=mask, other=other)


@triton.jit
def _forward_kernel(x_ptr, ylow_ptr, yhigh_ptr, yfrac_ptr, yin_ptr, yreal_ptr, xlow_ptr, xhigh_ptr, xfrac_ptr,
                    xin_ptr, xreal_ptr, batch_ptr, out_ptr, arg_ptr, C, sxn, sxc, sxh, sxw, PH, PW, SY, SX,
                    ONNX: tl.constexpr, RECORD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_BINS: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    j = tl.arange(0, BLOCK_BINS)
    jmask = j < PH * PW
    ph = j // PW
    pw = j % PW
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.load(batch_ptr + k).to(tl.int64)
    plane = x_ptr + b * sxn + c.to(tl.int64)[:, None] * sxc
    best = tl.full((BLOCK_C, BLOCK_BINS), float("-inf"), acc_dtype)
    won = tl.full((BLOCK_C, BLOCK_BINS), -1, tl.int64)
    m2 = cmask[:, None] & jmask[None, :]
    for sy in range(0, SY):
        row_code = (sy + tl.zeros((), tl.int64)) << 32
        y0 = _table(ylow_ptr, k, ph, sy, PH, SY, jmask, 0)
        y1 = _table(yhigh_ptr, k, ph, sy, PH, SY, jmask, 0)
        ly = _table(yfrac_ptr, k, ph, sy, PH, SY, jmask, 0.0).to(acc_dtype)
        yin = _table(yin_ptr, k, ph, sy, PH, SY, jmask, 0) != 0
        yreal = _table(yreal_ptr, k, ph, sy, PH, SY, jmask, 0) != 0
        for sx in range(0, SX):
            x0 = _table(xlow_ptr, k, pw, sx, PW, SX, jmask, 0)
            x1 = _table(xhigh_ptr, k, pw, sx, PW, SX, jmask, 0)
            lx = _table(xfrac_ptr, k, pw, sx, PW, SX, jmask, 0.0).to(acc_dtype)
            xin = _table(xin_ptr, k, pw, sx, PW, SX, jmask, 0) != 0
            xreal = _table(xreal_ptr, k, pw, sx, PW, SX, jmask, 0) != 0
            real = (yreal & xreal)[None, :]
            inside = (yin & xin)[None, :]
            m = m2 & inside
            f00 = tl.load(plane + (y0 * sxh + x0 * sxw)[None, :], mask=m, other=0.0).to(acc_dtype)
            f01 = tl.load(plane + (y0 * sxh + x1 * sxw)[None, :], mask=m, other=0.0).to(acc_dtype)
            f10 = tl.load(plane + (y1 * sxh + x0 * sxw)[None, :], mask=m, other=0.0).to(acc_dtype)
            f11 = tl.load(plane + (y1 * sxh + x1 * sxw)[None, :], mask=m, other=0.0).to(acc_dtype)
            hy = (1.0 - ly)[None, :]
            hx = (1.0 - lx)[None, :]
            lyb = ly[None, :]
            lxb = lx[None, :]
            code = (tl.zeros((BLOCK_C, BLOCK_BINS), tl.int64) + row_code) | ((sx + tl.zeros((), tl.int64)) << 2)
            if ONNX:
                v = (hy * hx) * f00
                q = tl.zeros((BLOCK_C, BLOCK_BINS), tl.int64)
                t = (hy * lxb) * f01
                q = tl.where(t > v, 1, q)
                v = tl.where(t > v, t, v)
                t = (lyb * hx) * f10
                q = tl.where(t > v, 2, q)
                v = tl.where(t > v, t, v)
                t = (lyb * lxb) * f11
                q = tl.where(t > v, 3, q)
                v = tl.where(t > v, t, v)
                code = code | q
            else:
                v = (hy * hx) * f00 + (hy * lxb) * f01 + (lyb * hx) * f10 + (lyb * lxb) * f11
            v = tl.where(inside, v, 0.0)
            code = tl.where(inside, code, -1)
            better = real & (v > best)
            best = tl.where(better, v, best)
            won = tl.where(better, code, won)
    empty = best == float("-inf")
    out = tl.where(empty, 0.0, best)
    tl.store(out_ptr + (k * C + c[:, None]) * (PH * PW) + j[None, :], out, mask=m2)
    if RECORD:
        tl.store(arg_ptr + (k * (PH * PW) + j[None, :]) * C + c[:, None], tl.where(empty, -1, won), mask=m2)


@triton.jit
def _backward_input_kernel(grad_ptr, arg_ptr, ylow_ptr, yhigh_ptr, yfrac_ptr, xlow_ptr, xhigh_ptr, xfrac_ptr, order_ptr,
                           bounds_ptr, out_ptr, C, H, W, PH, PW, SY, SX, ONNX: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    image = out_ptr + b.to(tl.int64) * H * W * C + c
    dt = out_ptr.dtype.element_ty
    for i in range(tl.load(bounds_ptr + b), tl.load(bounds_ptr + b + 1)):
        k = tl.load(order_ptr + i).to(tl.int64)
        for j in range(0, PH * PW):
            ph = j // PW
            pw = j % PW
            code = tl.load(arg_ptr + (k * (PH * PW) + j) * C + c, mask=cmask, other=-1)
            live = cmask & (code >= 0)
            sy = tl.where(live, code >> 32, 0)
            sx = tl.where(live, (code >> 2) & 0x3FFFFFFF, 0)
            q = code & 3
            y0 = tl.load(ylow_ptr + (k * PH + ph) * SY + sy, mask=live, other=0)
            y1 = tl.load(yhigh_ptr + (k * PH + ph) * SY + sy, mask=live, other=0)
            ly = tl.load(yfrac_ptr + (k * PH + ph) * SY + sy, mask=live, other=0.0).to(dt)
            x0 = tl.load(xlow_ptr + (k * PW + pw) * SX + sx, mask=live, other=0)
            x1 = tl.load(xhigh_ptr + (k * PW + pw) * SX + sx, mask=live, other=0)
            lx = tl.load(xfrac_ptr + (k * PW + pw) * SX + sx, mask=live, other=0.0).to(dt)
            g = tl.load(grad_ptr + (k * C + c) * (PH * PW) + j, mask=live, other=0.0).to(dt)
            hy = 1.0 - ly
            hx = 1.0 - lx
            if ONNX:
                row = tl.where(q < 2, y0, y1)
                col = tl.where((q % 2) == 0, x0, x1)
                w = tl.where(q < 2, hy, ly) * tl.where((q % 2) == 0, hx, lx)
                p = image + (row * W + col) * C
                tl.store(p, tl.load(p, mask=live, other=0.0) + g * w, mask=live)
            else:
                p = image + (y0 * W + x0) * C
                tl.store(p, tl.load(p, mask=live, other=0.0) + g * (hy * hx), mask=live)
                p = image + (y0 * W + x1) * C
                tl.store(p, tl.load(p, mask=live, other=0.0) + g * (hy * lx), mask=live)
                p = image + (y1 * W + x0) * C
                tl.store(p, tl.load(p, mask=live, other=0.0) + g * (ly * hx), mask=live)
                p = image + (y1 * W + x1) * C
                tl.store(p, tl.load(p, mask=live, other=0.0) + g * (ly * lx), mask=live)


@triton.jit
def _backward_rois_kernel(grad_ptr, arg_ptr, x_ptr, ylow_ptr, yhigh_ptr, yfrac_ptr, ymoves_ptr, ydstart_ptr, ydend_ptr,
                          xlow_ptr, xhigh_ptr, xfrac_ptr, xmoves_ptr, xdstart_ptr, xdend_ptr, batch_ptr, out_ptr, C,
                          sxn, sxc, sxh, sxw, PH, PW, SY, SX, ONNX: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    acc_dtype = out_ptr.dtype.element_ty
    b = tl.load(batch_ptr + k).to(tl.int64)
    dx1 = tl.zeros((BLOCK_C,), acc_dtype)
    dy1 = tl.zeros((BLOCK_C,), acc_dtype)
    dx2 = tl.zeros((BLOCK_C,), acc_dtype)
    dy2 = tl.zeros((BLOCK_C,), acc_dtype)
    for j in range(0, PH * PW):
        ph = j // PW
        pw = j % PW
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            code = tl.load(arg_ptr + (k * (PH * PW) + j) * C + c, mask=cmask, other=-1)
            live = cmask & (code >= 0)
            sy = tl.where(live, code >> 32, 0)
            sx = tl.where(live, (code >> 2) & 0x3FFFFFFF, 0)
            q = code & 3
            at_y = (k * PH + ph) * SY + sy
            at_x = (k * PW + pw) * SX + sx
            y0 = tl.load(ylow_ptr + at_y, mask=live, other=0)
            y1 = tl.load(yhigh_ptr + at_y, mask=live, other=0)
            ly = tl.load(yfrac_ptr + at_y, mask=live, other=0.0).to(acc_dtype)
            my = tl.load(ymoves_ptr + at_y, mask=live, other=0) != 0
            x0 = tl.load(xlow_ptr + at_x, mask=live, other=0)
            x1 = tl.load(xhigh_ptr + at_x, mask=live, other=0)
            lx = tl.load(xfrac_ptr + at_x, mask=live, other=0.0).to(acc_dtype)
            mx = tl.load(xmoves_ptr + at_x, mask=live, other=0) != 0
            plane = x_ptr + b * sxn + c.to(tl.int64) * sxc
            f00 = tl.load(plane + y0 * sxh + x0 * sxw, mask=live, other=0.0).to(acc_dtype)
            f01 = tl.load(plane + y0 * sxh + x1 * sxw, mask=live, other=0.0).to(acc_dtype)
            f10 = tl.load(plane + y1 * sxh + x0 * sxw, mask=live, other=0.0).to(acc_dtype)
            f11 = tl.load(plane + y1 * sxh + x1 * sxw, mask=live, other=0.0).to(acc_dtype)
            g = tl.load(grad_ptr + (k * C + c) * (PH * PW) + j, mask=live, other=0.0).to(acc_dtype)
            hy = 1.0 - ly
            hx = 1.0 - lx
            if ONNX:
                d_y = tl.where(q == 0, -hx * f00, tl.where(q == 1, -lx * f01, tl.where(q == 2, hx * f10, lx * f11)))
                d_x = tl.where(q == 0, -hy * f00, tl.where(q == 1, hy * f01, tl.where(q == 2, -ly * f10, ly * f11)))
            else:
                d_y = hx * (f10 - f00) + lx * (f11 - f01)
                d_x = hy * (f01 - f00) + ly * (f11 - f10)
            gy = tl.where(live & my, g * d_y, 0.0)
            gx = tl.where(live & mx, g * d_x, 0.0)
            dy1 += gy * tl.load(ydstart_ptr + at_y, mask=live, other=0.0).to(acc_dtype)
            dy2 += gy * tl.load(ydend_ptr + at_y, mask=live, other=0.0).to(acc_dtype)
            dx1 += gx * tl.load(xdstart_ptr + at_x, mask=live, other=0.0).to(acc_dtype)
            dx2 += gx * tl.load(xdend_ptr + at_x, mask=live, other=0.0).to(acc_dtype)
    tl.store(out_ptr + k * 4 + 0, tl.sum(dx1, axis=0))
    tl.store(out_ptr + k * 4 + 1, tl.sum(dy1, axis=0))
    tl.store(out_ptr + k * 4 + 2, tl.sum(dx2, axis=0))
    tl.store(out_ptr + k * 4 + 3, tl.sum(dy2, axis=0))


# ----------------------------------------------------------------------------------------------
# Launchers.


def _tables(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool):
    """The row and column sample tables of every box (contiguous, int64 / compute dtype / int8),
    whether each box is finite, and its batch index."""
    n, _, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    r = rois.detach().to(dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * spatial_scale - offset for i in range(1, 5))
    ys, fin_y = _axis(y1, y2, h, pooled_height, sampling_ratio, aligned)
    xs, fin_x = _axis(x1, x2, w, pooled_width, sampling_ratio, aligned)

    def pack(axis):
        return (axis.low.contiguous(), axis.high.contiguous(), axis.frac.contiguous(),
                axis.inside.to(torch.int8).contiguous(), axis.real.to(torch.int8).contiguous(),
                axis.moves.to(torch.int8).contiguous(), axis.d_start.contiguous(), axis.d_end.contiguous())

    batch = r[:, 0].long().clamp(0, max(n - 1, 0)).to(torch.int32).contiguous()
    return pack(ys), pack(xs), fin_y & fin_x, batch


def _run(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
         sampling_ratio: int, aligned: bool, onnx: bool, record: bool):
    input = channels_last_on_gpu(input)
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    ys, xs, finite, batch = _tables(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    sy, sx = ys[0].shape[2], xs[0].shape[2]
    out = torch.empty((k, c, pooled_height, pooled_width), dtype=dtype, device=input.device)
    arg = torch.empty((k, pooled_height * pooled_width, c) if record else (1,), dtype=torch.int64,
                      device=input.device)
    bins = triton.next_power_of_2(pooled_height * pooled_width)
    block = max(1, min(block_c(c), 4096 // bins))
    if sy * sx == 0:
        out.zero_()
        arg.fill_(-1)
    else:
        launcher(_forward_kernel)[(k, triton.cdiv(c, block))](
            input, ys[0], ys[1], ys[2], ys[3], ys[4], xs[0], xs[1], xs[2], xs[3], xs[4], batch, out, arg, c,
            *input.stride(), pooled_height, pooled_width, sy, sx, ONNX=onnx, RECORD=record, BLOCK_C=block,
            BLOCK_BINS=bins)
    out = torch.where(finite[:, None, None, None], out, torch.full_like(out, float("nan")))
    return out, arg, ys, xs, finite, batch, input


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
            sampling_ratio: int, aligned: bool, onnx: bool) -> Tensor:
    out, *_ = _run(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, onnx, False)
    return out.to(input.dtype)


def backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             sampling_ratio: int, aligned: bool, onnx: bool, channels_last: bool, want_input: bool = True,
             want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, box gradient ``[K, 5]``); one not wanted is zeros."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    dtype = compute_dtype(input.dtype)
    _, arg, ys, xs, finite, batch, feat = _run(input, rois, spatial_scale, pooled_height, pooled_width,
                                               sampling_ratio, aligned, onnx, True)
    sy, sx = ys[0].shape[2], xs[0].shape[2]
    g = grad.detach().to(dtype).contiguous()
    grad_feat = torch.zeros((n, h, w, c), dtype=dtype, device=input.device)
    if want_input and sy * sx > 0:
        order = torch.argsort(batch, stable=True)
        bounds = torch.searchsorted(batch[order].contiguous(),
                                    torch.arange(n + 1, device=input.device, dtype=torch.int32))
        block = block_c(c, _BLOCK_C_BACKWARD)
        launcher(_backward_input_kernel)[(n, triton.cdiv(c, block))](
            g, arg, ys[0], ys[1], ys[2], xs[0], xs[1], xs[2], order.to(torch.int32).contiguous(),
            bounds.to(torch.int32).contiguous(), grad_feat, c, h, w, pooled_height, pooled_width, sy, sx, ONNX=onnx,
            BLOCK_C=block, num_warps=max(1, block // 32))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_input = grad_feat.permute(0, 3, 1, 2).to(input.dtype, memory_format=memory_format)
    box = torch.zeros((k, 4), dtype=dtype, device=input.device)
    if want_rois and sy * sx > 0:
        launcher(_backward_rois_kernel)[(k,)](
            g, arg, feat, ys[0], ys[1], ys[2], ys[5], ys[6], ys[7], xs[0], xs[1], xs[2], xs[5], xs[6], xs[7], batch,
            box, c, *feat.stride(), pooled_height, pooled_width, sy, sx, ONNX=onnx, BLOCK_C=block_c(c, 64))
    box = box * spatial_scale
    if want_rois:
        box = torch.where(finite[:, None], box, torch.full_like(box, float("nan")))
    return grad_input, torch.cat((torch.zeros_like(box[:, :1]), box), 1).to(rois.dtype)
