"""Precise RoI Pooling (PrRoIPool) in pure PyTorch, and the geometry every backend shares.

The feature map is the bilinear interpolant f(x, y) = sum_ij w[j, i] h(x - i) h(y - j) of its
pixels at integer coordinates (zero outside the map), h(t) = max(0, 1 - |t|). A bin
[xa, xb] x [ya, yb] pools the mean of f over it. That mean is separable:

    out = sum_j sum_i ay_j ax_i w[j, i],    ax_i = (1 / bw) * integral_xa^xb h(x - i) dx

and as the bin's width bw shrinks to 0, ax_i tends to h(xa - i): the mean along a segment, or
the interpolated value at a point, so the output and its box gradient are continuous in the box.

Every backend reads the map through its exclusive integral image S[r, k] = sum_{j<r, i<k} w[j, i]
(float64, channels last), so that a bin costs at most 6 x 6 reads whatever its area. Along each
axis, a bin is a short list of at most ``ENTRIES`` indices into S with three coefficient rows:
the value's and its derivatives with respect to the bin's two edges. Two ways to make the list:

- **taps**, for a bin that touches at most 5 pixels along the axis: the weights ax_i written as
  differences of S (``sum_i ax_i (S[i + 1] - S[i])``), exact to rounding whatever the width;
- **prefix**, for wider bins: ``integral_-inf^x sum_i g_i h(t - i) dt = a0 G[n] + a1 G[n + 1] +
  a2 G[n + 2]`` with ``x = n + t``, ``a0 = (1 - t)^2 / 2``, ``a1 = 1/2 + t - t^2``, ``a2 = t^2 / 2``
  and G the prefix sum of g, so that a bin is (F(xb) - F(xa)) / bw: six entries. Used only for
  bins wider than 3 pixels, where the cancellation of the large S values costs at most a few
  rounding errors of S.

A bin's value is ``sum_ey sum_ex Ay[ey] Ax[ex] S[ky[ey], kx[ex]]``; its derivative with respect
to an edge swaps in that edge's row (``DA`` for the start, ``DB`` for the end); the input's
gradient scatters ``grad * Ay * Ax`` into S's shape and takes suffix sums. The Triton kernels
use these helpers as they are; the Numba kernels compute the same tables per box in their own
module and share ``box_gradient``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

ENTRIES = 6  # entries into the integral image per bin and axis
_MAX_TAPS = ENTRIES - 1  # a bin touching more pixels than this uses the prefix form


class Axis(NamedTuple):
    """One axis of every bin of every box: ``[K, P, ENTRIES]`` indices into S (int64) and the
    coefficients (float64) of the bin's value and of its derivatives by its start and end."""
    index: Tensor
    value: Tensor
    d_start: Tensor
    d_end: Tensor


def integral_image(input: Tensor) -> Tensor:
    """``[N, H + 1, W + 1, C]`` float64: ``S[n, r, k, c] = input[n, c, :r, :k].sum()``."""
    n, c, h, w = input.shape
    s = input.new_zeros((n, h + 1, w + 1, c), dtype=torch.float64)
    s[:, 1:, 1:] = input.detach().permute(0, 2, 3, 1).double().cumsum(1).cumsum(2)
    return s


def suffix_image(grad_s: Tensor) -> Tensor:
    """The adjoint of :func:`integral_image`: ``[N, H + 1, W + 1, C]`` to ``[N, H, W, C]``,
    ``out[j, i] = sum_{r > j, k > i} grad_s[r, k]``."""
    t = grad_s.flip(1).cumsum(1).flip(1)
    t = t.flip(2).cumsum(2).flip(2)
    return t[:, 1:, 1:]


def box_edges(rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int):
    """Bin edges of every box, float64, and what the box gradient's chain rule needs.

    Returns ``(finite, xs, xe, ys, ye)``: ``finite [K]`` (all four coordinates finite; the
    others are computed on zeros and masked by the caller) and the bins' start and end along x
    ``[K, PW]`` and y ``[K, PH]``. A box of negative width or height has width or height 0; one
    whose width or height overflows (``1.7e308 - -1.7e308``) counts as not finite.
    """
    r = rois.detach().double()
    coords = r[:, 1:5] * spatial_scale
    sides = coords[:, 2:] - coords[:, :2]
    finite = torch.isfinite(coords).all(1) & torch.isfinite(sides).all(1)
    coords = torch.where(finite[:, None], coords, torch.zeros_like(coords))
    x1, y1, x2, y2 = coords.unbind(1)

    def edges(lo: Tensor, hi: Tensor, pooled: int) -> tuple[Tensor, Tensor]:
        size = (hi - lo).clamp(min=0) / pooled
        p = torch.arange(pooled, dtype=torch.float64, device=r.device)
        return lo[:, None] + size[:, None] * p, lo[:, None] + size[:, None] * (p + 1)

    xs, xe = edges(x1, x2, pooled_width)
    ys, ye = edges(y1, y2, pooled_height)
    return finite, xs, xe, ys, ye


def _hat(t: Tensor) -> Tensor:
    return (1 - t.abs()).clamp(min=0)


def _hat_slope(t: Tensor) -> Tensor:
    """h's slope on the right of t (the limit a bin growing from a point sees)."""
    up = (t >= -1) & (t < 0)
    down = (t >= 0) & (t < 1)
    return up.double() - down.double()


def _tap_weights(start: Tensor, end: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weight of pixel ``i`` in the bin ``[start, end]`` and its derivatives by start and end.

    Each half of the hat (slope +1 on [-1, 0], -1 on [0, 1]) contributes the fraction of the bin
    it covers times the hat at the middle of the covered part: no difference of large numbers,
    so the weight is exact to rounding for any width, and tends to h(start - i) as the width
    goes to 0.
    """
    u, v = start - i, end - i
    width = end - start
    weight = torch.zeros_like(u)
    for lo, hi in ((-1.0, 0.0), (0.0, 1.0)):
        covered = (width - (lo - u).clamp(min=0) - (v - hi).clamp(min=0)).clamp(min=0)
        middle = 0.5 * (torch.maximum(u, torch.full_like(u, lo)) + torch.minimum(v, torch.full_like(v, hi)))
        weight = weight + covered * (1 - middle.abs())
    point = width <= 0
    safe = torch.where(point, torch.ones_like(width), width)
    weight = torch.where(point, _hat(u), weight / safe)
    d_end = torch.where(point, 0.5 * _hat_slope(u), (_hat(v) - weight) / safe)
    d_start = torch.where(point, 0.5 * _hat_slope(u), (weight - _hat(u)) / safe)
    return weight, d_start, d_end


def _prefix_weights(t: Tensor) -> tuple[Tensor, Tensor]:
    """The three prefix coefficients ``a0, a1, a2`` at fraction ``t`` and their derivatives."""
    a = torch.stack(((1 - t) ** 2 / 2, 0.5 + t - t * t, t * t / 2), -1)
    da = torch.stack((t - 1, 1 - 2 * t, t), -1)
    return a, da


def axis_entries(start: Tensor, end: Tensor, size: int) -> Axis:
    """The integral-image entries of bins ``[start, end]`` (float64 ``[K, P]``, ``end >= start``)
    along an axis of ``size`` pixels."""
    width = end - start
    first = start.clamp(-1.0, float(size)).floor().clamp(0, size - 1)
    last = end.clamp(-1.0, float(size)).ceil().clamp(0, size - 1)
    taps = (last - first + 1).clamp(min=1)
    use_taps = taps <= _MAX_TAPS

    # Taps: pixels first .. first + 4; entry e stands for S[first + e] with coefficient
    # weight[e - 1] - weight[e] (a pixel's weight is S[i + 1] - S[i] in the integral image).
    e = torch.arange(ENTRIES, dtype=torch.float64, device=start.device)
    pixel = first[..., None] + e[:-1]
    inside = e[:-1] < taps[..., None]
    w, ds, de = _tap_weights(start[..., None], end[..., None], pixel)
    w, ds, de = (torch.where(inside, t, torch.zeros_like(t)) for t in (w, ds, de))

    def telescoped(t: Tensor) -> Tensor:
        zero = torch.zeros_like(t[..., :1])
        return torch.cat((zero, t), -1) - torch.cat((t, zero), -1)

    tap_index = first[..., None] + e
    tap_rows = [telescoped(t) for t in (w, ds, de)]

    # Prefix: (F(end) - F(start)) / width, F(x) = a(t) . G[n : n + 3]. Positions beyond the map
    # by more than 2 pixels read S[0] or S[size] only: clamping them keeps the integers small.
    def corner(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x.clamp(-3.0, size + 3.0)
        n = x.floor()
        a, da = _prefix_weights(x - n)
        return n[..., None] + e[:3], a, da

    n_end, a_end, da_end = corner(end)
    n_start, a_start, da_start = corner(start)
    safe = torch.where(use_taps, torch.ones_like(width), width)[..., None]
    value = torch.cat((-a_start, a_end), -1) / safe
    zeros = torch.zeros_like(a_start)
    pre_index = torch.cat((n_start, n_end), -1)
    pre_rows = [value,
                (torch.cat((-da_start, zeros), -1) + value) / safe,
                (torch.cat((zeros, da_end), -1) - value) / safe]

    index = torch.where(use_taps[..., None], tap_index, pre_index).clamp(0, size).long()
    rows = [torch.where(use_taps[..., None], a, b) for a, b in zip(tap_rows, pre_rows)]
    return Axis(index, *rows)


def geometry(rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int, height: int,
             width: int) -> tuple[Tensor, Axis, Axis]:
    """``(finite [K], x axis [K, PW, 6], y axis [K, PH, 6])`` of every box: the shared front end."""
    finite, xs, xe, ys, ye = box_edges(rois, spatial_scale, pooled_height, pooled_width)
    return finite, axis_entries(xs, xe, width), axis_entries(ys, ye, height)


def edge_chain(rois: Tensor, spatial_scale: float, d_start: Tensor, d_end: Tensor, lo: int, pooled: int) -> Tensor:
    """``[K, 2]``: derivatives by the box's two coordinates along an axis (columns ``lo`` and
    ``lo + 2`` of ``rois``) from those by every bin's start and end ``[K, P]``.

    Bin p spans ``[c1 + s p, c1 + s (p + 1)]``, ``s = max(c2 - c1, 0) / P``; an inverted box
    moves with its first coordinate only."""
    r = rois.detach().double()
    positive = ((r[:, lo + 2] - r[:, lo]) >= 0).double()[:, None]
    p = torch.arange(pooled, dtype=torch.float64, device=r.device)
    f_start, f_end = positive * p / pooled, positive * (p + 1) / pooled
    d_c2 = (d_start * f_start + d_end * f_end).sum(1)
    d_c1 = (d_start * (1 - f_start) + d_end * (1 - f_end)).sum(1)
    return torch.stack((d_c1, d_c2), 1) * spatial_scale


def box_gradient(rois: Tensor, spatial_scale: float, finite: Tensor, gx_start: Tensor, gx_end: Tensor,
                 gy_start: Tensor, gy_end: Tensor) -> Tensor:
    """``[K, 5]`` box gradient (batch index 0, NaN for boxes with a non-finite coordinate) from
    the derivatives by every bin's edges."""
    pw, ph = gx_start.shape[1], gy_start.shape[1]
    dx = edge_chain(rois, spatial_scale, gx_start, gx_end, 1, pw)
    dy = edge_chain(rois, spatial_scale, gy_start, gy_end, 2, ph)
    grad = torch.stack((torch.zeros_like(dx[:, 0]), dx[:, 0], dy[:, 0], dx[:, 1], dy[:, 1]), 1)
    return torch.where(finite[:, None], grad, torch.full_like(grad, math.nan))


# ----------------------------------------------------------------------------------------------
# The pure-PyTorch kernel: gathers of the 6 x 6 entries of a chunk of boxes at a time.


_BUDGET = 1 << 23  # entries of the largest gathered block


def _chunks(k: int, c: int, per_channel: int) -> list[tuple[slice, slice]]:
    """Blocks of boxes, then of channels, whose ``per_channel`` entries per box and channel fit
    ``_BUDGET``, in order: ``(boxes, channels)`` slices."""
    budget, per_channel = _BUDGET, max(1, per_channel)
    step = max(1, budget // (per_channel * max(c, 1)))
    c_step = c if step > 1 or per_channel * c <= budget else max(1, budget // per_channel)
    return [(slice(lo, min(k, lo + step)), slice(c0, min(c, c0 + c_step)))
            for lo in range(0, k, step) for c0 in range(0, max(c, 1), max(c_step, 1))]


def _reads(s: Tensor, batch: Tensor, x: Axis, y: Axis, boxes: slice, channels: slice) -> Tensor:
    """``[k, PH, 6, PW, 6, C]`` values of S that the bins of ``boxes`` read, for ``channels``."""
    b = batch[boxes, None, None, None, None]
    ky = y.index[boxes, :, :, None, None]
    kx = x.index[boxes, None, None, :, :]
    return s[..., channels][b, ky, kx]


def forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    n, c, h, w = input.shape
    k = rois.shape[0]
    finite, x, y = geometry(rois, spatial_scale, pooled_height, pooled_width, h, w)
    s = integral_image(input)
    batch = rois[:, 0].long()
    out = input.new_empty((k, c, pooled_height, pooled_width), dtype=torch.float64)
    for boxes, channels in _chunks(k, c, pooled_height * pooled_width * ENTRIES * ENTRIES):
        reads = _reads(s, batch, x, y, boxes, channels)
        out[boxes, channels] = torch.einsum("kqe,kpf,kqepfc->kcqp", y.value[boxes], x.value[boxes], reads)
    out = torch.where(finite[:, None, None, None], out, torch.full_like(out, math.nan))
    return out.to(input.dtype)


def backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
             channels_last: bool, want_input: bool = True, want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, box gradient ``[K, 5]``); one not wanted is zeros."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    finite, x, y = geometry(rois, spatial_scale, pooled_height, pooled_width, h, w)
    batch = rois[:, 0].long()
    g = torch.where(finite[:, None, None, None], grad.detach().double(), torch.zeros((), dtype=torch.float64,
                                                                                     device=grad.device))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_input = torch.zeros_like(input, memory_format=memory_format)
    blocks = _chunks(k, c, pooled_height * pooled_width * ENTRIES * ENTRIES)
    if want_input:
        grad_s = input.new_zeros((n * (h + 1) * (w + 1), c), dtype=torch.float64)
        for boxes, channels in blocks:
            flat = (batch[boxes, None, None, None, None] * (h + 1) + y.index[boxes, :, :, None, None]) * (w + 1) \
                + x.index[boxes, None, None, :, :]
            parts = torch.einsum("kqe,kpf,kcqp->kqepfc", y.value[boxes], x.value[boxes], g[boxes, channels])
            grad_s[:, channels].index_add_(0, flat.reshape(-1), parts.reshape(flat.numel(), parts.shape[-1]))
        grad_feat = suffix_image(grad_s.view(n, h + 1, w + 1, c))
        grad_input.copy_(grad_feat.permute(0, 3, 1, 2))
    grad_rois = rois.new_zeros(rois.shape)
    if want_rois:
        s = integral_image(input)
        gxs = torch.zeros((k, pooled_width), dtype=torch.float64, device=input.device)
        gxe, gys, gye = torch.zeros_like(gxs), gxs.new_zeros((k, pooled_height)), gxs.new_zeros((k, pooled_height))
        for boxes, channels in blocks:
            dots = torch.einsum("kqepfc,kcqp->kqepf", _reads(s, batch, x, y, boxes, channels), g[boxes, channels])
            gxs[boxes] += torch.einsum("kqe,kpf,kqepf->kp", y.value[boxes], x.d_start[boxes], dots)
            gxe[boxes] += torch.einsum("kqe,kpf,kqepf->kp", y.value[boxes], x.d_end[boxes], dots)
            gys[boxes] += torch.einsum("kqe,kpf,kqepf->kq", y.d_start[boxes], x.value[boxes], dots)
            gye[boxes] += torch.einsum("kqe,kpf,kqepf->kq", y.d_end[boxes], x.value[boxes], dots)
        grad_rois = box_gradient(rois, spatial_scale, finite, gxs, gxe, gys, gye).to(rois.dtype)
    return grad_input, grad_rois
