"""Rotated RoIAlign's public API: ``roi_align_rotated`` and ``ROIAlignRotated`` (detectron2's conventions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..integrations import onnx as _onnx
from ..kernels.reference.common import compute_dtype
from ..ops import roi_align_rotated as _op
from ..ops.common import call_op
from ._args import BoxesLike, boxes_to_rois, check_scalars, fx_leaf, output_size_pair, refuse_script

__all__ = ["roi_align_rotated", "ROIAlignRotated"]

_UNITS = ("degrees", "radians")


def check_rotation_args(clockwise: bool, angle_unit: str) -> None:
    """TypeError/ValueError naming ``clockwise`` or ``angle_unit``."""
    if not isinstance(clockwise, bool):
        raise TypeError(f"clockwise must be a bool; got {clockwise!r}")
    if angle_unit not in _UNITS:
        raise ValueError(f"angle_unit must be 'degrees' or 'radians'; got {angle_unit!r}")


@fx_leaf
def roi_align_rotated(input: Tensor, boxes: BoxesLike, output_size: int | Sequence[int], spatial_scale: float = 1.0,
                      sampling_ratio: int = 0, *, aligned: bool = True, clockwise: bool = False,
                      angle_unit: str = "degrees") -> Tensor:
    """Crop and resample a feature map at each rotated box (detectron2's ``ROIAlignRotated`` by default).

    A box ``(cx, cy, w, h, angle)`` is divided into ``output_size`` bins along its own axes; a
    bin's value is the average of a regular grid of bilinear samples, each turned by the angle
    around the box centre. With the defaults, a positive angle in degrees turns the box
    counter-clockwise as seen on the screen (the image's y axis pointing down), as in
    detectron2. Differentiable with respect to ``input`` and ``boxes`` (centre, size and angle).

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or float64, any layout.
        boxes: a ``[K, 6]`` tensor of ``(batch index, cx, cy, w, h, angle)`` in input-image
            coordinates, or a list of ``N`` tensors ``[L_i, 5]`` of ``(cx, cy, w, h, angle)``.
            Width and height must be >= 0.
        output_size: ``(PH, PW)`` or an int for a square output.
        spatial_scale: factor from box coordinates to feature-map pixels (e.g. ``1 / 16``).
        sampling_ratio: samples per bin along each box axis; ``<= 0`` picks
            ``ceil(box size / output size)`` for each box (adaptive).
        aligned: True (the default, detectron2's only form): pixel centres at integer + 0.5
            (the centre is shifted by -0.5 pixel). False: mmcv's legacy form, no shift and
            width and height raised to at least one pixel.
        clockwise: if True, a positive angle turns the box clockwise on the screen (mmcv's
            ``clockwise=True``, used by mmrotate's configs): the angle is negated.
        angle_unit: ``"degrees"`` (detectron2) or ``"radians"`` (mmcv).

    Returns:
        ``[K, C, PH, PW]``, NCHW-contiguous, of the input's dtype. A box with a NaN or infinite
        coordinate, size or angle gives NaN in all its outputs; samples outside the map give 0.

    Raises:
        TypeError, ValueError: for arguments of the wrong type, shape, value or device, and for
            a negative width or height; ``torch.onnx.errors.OnnxExporterError`` under ONNX
            export (ONNX has no rotated RoiAlign).
        IndexError: for a batch index that is not an integer in ``[0, N)``.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor [N, C, H, W]; got {type(input).__name__}")
    pooled_height, pooled_width = output_size_pair(output_size)
    scale = check_scalars(spatial_scale, sampling_ratio, aligned)
    check_rotation_args(clockwise, angle_unit)
    rois = boxes_to_rois(boxes, "cx, cy, w, h, angle")
    if rois.dtype.is_floating_point and rois.dtype != torch.float64:
        rois = rois.to(compute_dtype(input.dtype))  # float64 angles stay float64
    if _onnx.exporting():
        _onnx.refuse_rotated_export()
    return call_op(_op.roi_align_rotated, _op.forward_impl, input, rois, scale, pooled_height,
                   pooled_width, int(sampling_ratio), aligned, clockwise, angle_unit == "degrees")


class ROIAlignRotated(nn.Module):
    """Rotated RoIAlign with detectron2's ``ROIAlignRotated`` signature and conventions.

    Angles in degrees, counter-clockwise on the screen, continuous coordinates (the -0.5 shift),
    no minimum box size.

    Args:
        output_size: ``(height, width)`` of each output, or an int for a square one.
        spatial_scale: factor from box coordinates to feature-map pixels.
        sampling_ratio: samples per bin along each box axis; ``<= 0`` adaptive.

    Shape:
        - input: ``[N, C, H, W]``
        - rois: ``[K, 6]`` of ``(batch index, cx, cy, w, h, angle in degrees)``, or a list of
          ``[L_i, 5]`` tensors
        - output: ``[K, C, height, width]``
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        check_scalars(spatial_scale, sampling_ratio, True)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}"
