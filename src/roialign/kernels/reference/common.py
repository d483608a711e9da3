"""What the pure-PyTorch kernels of every operator share, and what other backends reuse from them."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def is_channels_last(input: Tensor) -> bool:
    """True for a channels_last input (NHWC in memory) that is not also NCHW-contiguous: the
    operators that preserve the layout return channels_last results for it."""
    return input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotation(angles: Tensor, degrees: bool, clockwise: bool) -> tuple[Tensor, Tensor]:
    """cos and sin of each rotated box's angle, float64, on the angles' device; differentiable.

    The angle is never rounded to float32 before trigonometry. Degrees are reduced modulo 360,
    then to the nearest multiple of 90, which is applied exactly (a quarter turn swaps and
    negates cos and sin): boxes at 0, 90, 180 and 270 degrees, however large the angle, get
    exact 0 and +-1, so that they sample exactly the points of the unrotated box. Radians go to
    float64 cos and sin, whose argument reduction is exact. ``clockwise`` negates the angle.
    NaN or infinite angles give NaN.
    """
    a = angles.double()
    if clockwise:
        a = -a
    if not degrees:
        return torch.cos(a), torch.sin(a)
    a = torch.fmod(a, 360.0)
    quarter = torch.round(a / 90.0).detach()
    rad = (a - 90.0 * quarter) * (math.pi / 180.0)
    c, s = torch.cos(rad), torch.sin(rad)
    turns = torch.remainder(quarter, 4.0)
    cos = torch.where(turns == 0, c, torch.where(turns == 1, -s, torch.where(turns == 2, -c, s)))
    sin = torch.where(turns == 0, s, torch.where(turns == 1, c, torch.where(turns == 2, -s, -c)))
    return cos, sin


def angle_factor(degrees: bool, clockwise: bool) -> float:
    """d theta / d angle, theta being the counter-clockwise angle in radians that the kernels use."""
    return (-1.0 if clockwise else 1.0) * (math.pi / 180.0 if degrees else 1.0)


def rotated_row_span(rois: Tensor, cos: Tensor, sin: Tensor, spatial_scale: float, aligned: bool,
                     height: int) -> Tensor:
    """[K, 2] int64: the first and last feature row that any tap of each rotated box can touch.

    Conservative (float64, with a margin for the float32 rounding of sample positions), like
    ``roi_align.row_span``; non-finite boxes span every row (they contribute nothing anyway).
    """
    offset = 0.5 if aligned else 0.0
    r = rois.double()
    cy = r[:, 2] * spatial_scale - offset
    w, h = r[:, 3] * spatial_scale, r[:, 4] * spatial_scale
    if not aligned:
        w, h = w.clamp(min=1), h.clamp(min=1)
    reach = 0.5 * (h * cos.abs() + w * sin.abs())
    margin = 2 + 4e-6 * (cy.abs() + w.abs() + h.abs())
    first = (cy - reach - margin).floor().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    last = (cy + reach + margin).ceil().nan_to_num(float(height), posinf=float(height), neginf=float(height))
    return torch.stack((first, last), 1).clamp(0, max(height - 1, 0)).long()


def adaptive_grid_limit(dtype: torch.dtype) -> float:
    """The most samples per bin and axis that rotated adaptive sampling takes: 2^24 in float32
    and 2^52 in float64, where the compute dtype stops counting sample indices exactly. With
    ``local_extent``'s margins this bounds the samples a huge box visits beyond the map."""
    return float(2**24) if compute_dtype(dtype) == torch.float32 else float(2**52)


def local_extent(cx: Tensor, cy: Tensor, cos: Tensor, sin: Tensor, height: int, width: int, w: Tensor, h: Tensor,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The map ``[-1, H] x [-1, W]`` seen in each rotated box's own axes (float64): the
    smallest ``[y_lo, y_hi] x [x_lo, x_hi]`` of box-local coordinates holding every sample that
    can land on the map, widened for the rounding of sample positions computed in ``dtype``'s
    compute dtype. Samples outside it need not be visited.

    Rounding, in units in the last place (ulps) of the compute dtype: a sample's box-local
    coordinate is off by a few ulps of the box's size along that axis; its position on the map
    by a few ulps of the products that enter it, which for a sample near the map are bounded by
    the map's box-local extent (``Y``, ``X``: the largest magnitudes of the corners' local
    coordinates), i.e. by ``Y|cos| + X|sin| + H`` in y and ``Y|sin| + X|cos| + W`` in x; an
    error on the map widens the local extent by it turned back into the box's axes. Each axis
    gets half a pixel plus about 33 ulps of all that (a few would do). So a box huge along one
    axis, or far away along an axis it is aligned with, adds nothing along the other, and
    float64 boxes far beyond float32's range stay cheap. Non-finite boxes have been replaced
    by empty ones before this.
    """
    dy = torch.stack((-1.0 - cy, height - cy), -1).double()[..., :, None]
    dx = torch.stack((-1.0 - cx, width - cx), -1).double()[..., None, :]
    c, s = cos.double()[:, None, None], sin.double()[:, None, None]
    local_y = (dy * c + dx * s).flatten(1)
    local_x = (dx * c - dy * s).flatten(1)
    ulps = 4e-6 if compute_dtype(dtype) == torch.float32 else 4e-6 * 2.0**-29
    big_y, big_x = local_y.abs().amax(1), local_x.abs().amax(1)
    ac, as_ = cos.double().abs(), sin.double().abs()
    on_map_y = big_y * ac + big_x * as_ + (height + 1)
    on_map_x = big_y * as_ + big_x * ac + (width + 1)
    m_y = 0.5 + ulps * (ac * on_map_y + as_ * on_map_x + h.double().abs())
    m_x = 0.5 + ulps * (as_ * on_map_y + ac * on_map_x + w.double().abs())
    return (local_y.amin(1) - m_y, local_y.amax(1) + m_y, local_x.amin(1) - m_x, local_x.amax(1) + m_x)


def sample_range(base: Tensor, bin_size: Tensor, grid: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """First index and count of the samples ``base + (i + 0.5) * bin_size / grid``, ``i`` in
    ``[0, grid)``, that can fall in ``[lo, hi]``, with one spare on each side (float64 bounds;
    the caller tests each sample exactly). ``bin_size >= 0``; all broadcast together."""
    g = grid.double()
    step = bin_size.double() / g.clamp(min=1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    a = (lo.double() - base.double()) / safe - 0.5
    b = (hi.double() - base.double()) / safe - 0.5
    first = torch.minimum((torch.ceil(a) - 1).clamp(min=0), g)
    last = torch.minimum((torch.floor(b) + 2).clamp(min=0), g)
    first = torch.where(step > 0, first, torch.zeros_like(first)).nan_to_num(0.0)
    last = torch.where(step > 0, last, g).nan_to_num(0.0)
    return first, (last - first).clamp(min=0)
