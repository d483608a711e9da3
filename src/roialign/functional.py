"""The public functional API: argument checks, box formats, docstrings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["roi_align"]

BoxesLike = Tensor | Sequence[Tensor]


def output_size_pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    """``7`` or ``(7, 7)`` to ``(7, 7)``; ValueError/TypeError naming ``output_size`` otherwise."""
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        pair = (int(output_size), int(output_size))
    elif isinstance(output_size, Sequence) and not isinstance(output_size, str) and len(output_size) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in output_size):
        pair = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"output_size must be an int or a pair of ints (height, width); got {output_size!r}")
    if min(pair) <= 0:
        raise ValueError(f"output_size must be positive; got {output_size!r}")
    return pair


def check_scalars(spatial_scale: float, sampling_ratio: int, aligned: bool) -> None:
    """TypeError/ValueError naming the argument for a bad ``spatial_scale``, ``sampling_ratio`` or ``aligned``."""
    if not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool):
        raise TypeError(f"spatial_scale must be a float; got {spatial_scale!r}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be finite and positive; got {spatial_scale!r}")
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive sampling); got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool; got {aligned!r}")


def boxes_to_rois(boxes: BoxesLike) -> Tensor:
    """A ``[K, 5]`` tensor as is, or a list of per-image ``[L_i, 4]`` tensors joined into one."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, Sequence) or isinstance(boxes, str):
        raise TypeError(f"boxes must be a [K, 5] tensor or a list of [L, 4] tensors; got {type(boxes).__name__}")
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise TypeError(f"boxes[{i}] must be a tensor of shape [L, 4]; got {type(b).__name__}")
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape [L, 4] (x1, y1, x2, y2); got {list(b.shape)}")
        parts.append(torch.cat((torch.full_like(b[:, :1], i), b), dim=1))
    if not parts:
        raise ValueError("boxes must not be an empty list: pass one [L, 4] tensor per image, or a [0, 5] tensor")
    return torch.cat(parts, dim=0)


def roi_align(input: Tensor, boxes: BoxesLike, output_size: int | Sequence[int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Crop and resample a feature map at each box, with torchvision's signature and defaults.

    Each box is divided into ``output_size`` bins; a bin's value is the average of a regular
    grid of bilinear samples inside it. Differentiable with respect to ``input`` and ``boxes``.

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or float64, in any memory
            layout (contiguous, channels_last or a strided view).
        boxes: a ``[K, 5]`` tensor of ``(batch index, x1, y1, x2, y2)`` in input-image
            coordinates, or a list of ``N`` tensors ``[L_i, 4]`` of ``(x1, y1, x2, y2)``, one per
            image. Any floating dtype; they are cast to float32 (float64 for float64 input).
        output_size: ``(PH, PW)`` or an int for a square output.
        spatial_scale: factor from box coordinates to feature-map pixels (e.g. ``1 / 16``).
        sampling_ratio: samples per bin along each axis; ``<= 0`` picks
            ``ceil(box size / output size)`` for each box (adaptive).
        aligned: if True, shift the box by -0.5 pixel (pixel centres at integer + 0.5), as in
            detectron2; if False, the original Mask R-CNN convention, with boxes at least one
            pixel wide and high.

    Returns:
        ``[K, C, PH, PW]``, NCHW-contiguous, of the input's dtype. A box with a NaN or infinite
        coordinate gives NaN in all its outputs; samples outside the image contribute zero.

    Raises:
        TypeError, ValueError: for arguments of the wrong type, shape, value or device.
        IndexError: for a batch index that is not an integer in ``[0, N)``.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor [N, C, H, W]; got {type(input).__name__}")
    pooled_height, pooled_width = output_size_pair(output_size)
    check_scalars(spatial_scale, sampling_ratio, aligned)
    rois = boxes_to_rois(boxes)
    if rois.dtype.is_floating_point:
        rois = rois.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
    return ops.roi_align(input, rois, float(spatial_scale), pooled_height, pooled_width, int(sampling_ratio), aligned)
