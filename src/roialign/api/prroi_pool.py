"""Precise RoI Pooling's public API: the functional ``prroi_pool`` and ``PrRoIPool`` (mmcv's signature)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..integrations import onnx as _onnx
from ..kernels.reference.common import compute_dtype
from ..ops import prroi_pool as _op
from ..ops.common import call_op
from ._args import BoxesLike, boxes_to_rois, check_spatial_scale, fx_leaf, output_size_pair, refuse_script

__all__ = ["prroi_pool", "PrRoIPool"]


@fx_leaf
def prroi_pool(input: Tensor, boxes: BoxesLike, output_size: int | Sequence[int],
               spatial_scale: float = 1.0) -> Tensor:
    """Precise RoI Pooling (IoU-Net): the exact mean of the bilinearly interpolated map over each bin.

    The map is the bilinear interpolant of its pixels, placed at integer coordinates (no
    half-pixel shift, as in the paper and mmcv) and zero outside the map; each box
    ``[x1, x2] x [y1, y2]`` (times ``spatial_scale``) is divided into ``output_size`` equal bins
    and a bin's value is the integral of the interpolant over it divided by its area, computed
    in closed form: no sampling grid, and continuous in the box. A bin of zero width or height
    (a box with ``x2 <= x1`` or ``y2 <= y1``) takes the limit as it shrinks: the mean along the
    segment, or the interpolated value at the point (mmcv gives 0 and no box gradient there).
    Differentiable with respect to ``input`` and ``boxes``.

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or float64, in any memory layout.
        boxes: a ``[K, 5]`` tensor of ``(batch index, x1, y1, x2, y2)`` in input-image
            coordinates, or a list of ``N`` tensors ``[L_i, 4]``, one per image.
        output_size: ``(PH, PW)`` or an int for a square output.
        spatial_scale: factor from box coordinates to feature-map pixels (e.g. ``1 / 16``).

    Returns:
        ``[K, C, PH, PW]``, NCHW-contiguous, of the input's dtype (computed in float64
        internally). A box with a NaN or infinite coordinate gives NaN in all its outputs.

    Raises:
        TypeError, ValueError: for arguments of the wrong type, shape, value or device.
        IndexError: for a batch index that is not an integer in ``[0, N)``.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor [N, C, H, W]; got {type(input).__name__}")
    pooled_height, pooled_width = output_size_pair(output_size)
    scale = check_spatial_scale(spatial_scale)
    rois = boxes_to_rois(boxes)
    if rois.dtype.is_floating_point:
        rois = rois.to(compute_dtype(input.dtype))
    if _onnx.exporting():
        _onnx.refuse_prroi_export()
    return call_op(_op.prroi_pool, _op.forward_impl, input, rois, scale, pooled_height, pooled_width)


class PrRoIPool(nn.Module):
    """Precise RoI Pooling with mmcv's signature, ``PrRoIPool(output_size, spatial_scale=1.0)``.

    Shape:
        - input: ``[N, C, H, W]``
        - rois: ``[K, 5]`` of ``(batch index, x1, y1, x2, y2)``, or a list of ``[L_i, 4]`` tensors
        - output: ``[K, C, height, width]``
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = check_spatial_scale(spatial_scale)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return prroi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
