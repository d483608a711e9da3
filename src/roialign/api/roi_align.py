"""RoIAlign's public API: the functional ``roi_align`` (torchvision's signature) and ``ROIAlign``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..integrations import onnx as _onnx
from ..kernels.reference.common import compute_dtype
from ..ops import roi_align as _op
from ..ops import roi_align_max as _max_op
from ..ops.common import call_op
from ._args import BoxesLike, boxes_to_rois, check_scalars, fx_leaf, output_size_pair, refuse_script

__all__ = ["roi_align", "ROIAlign"]

MODES = ("avg", "max", "onnx_max")


def check_mode(mode) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    return mode


@fx_leaf
def roi_align(input: Tensor, boxes: BoxesLike, output_size: int | Sequence[int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *, mode: str = "avg") -> Tensor:
    """Crop and resample a feature map at each box, with torchvision's signature and defaults.

    Each box is divided into ``output_size`` bins; a bin's value is the average of a regular
    grid of bilinear samples inside it (``mode="avg"``), or their maximum (``mode="max"``,
    mmcv's ``pool_mode='max'``; ``mode="onnx_max"``, ONNX ``RoiAlign(mode="max")``: the maximum
    of each sample's four weighted corner terms). Differentiable with respect to ``input`` and
    ``boxes``.

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
        mode: ``"avg"`` (default), ``"max"`` or ``"onnx_max"`` (keyword only; see README's
            "Max mode"). ``"onnx_max"`` exports to ONNX as ``RoiAlign(mode="max")``; ``"max"``
            does not export (ONNX has no such function).

    Returns:
        ``[K, C, PH, PW]`` of the input's dtype: channels_last for a channels_last input in
        ``mode="avg"``, else NCHW-contiguous. A box with a NaN or infinite coordinate gives NaN
        in all its outputs; samples outside the image contribute zero.

    Raises:
        TypeError, ValueError: for arguments of the wrong type, shape, value or device.
        IndexError: for a batch index that is not an integer in ``[0, N)``.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor [N, C, H, W]; got {type(input).__name__}")
    pooled_height, pooled_width = output_size_pair(output_size)
    scale = check_scalars(spatial_scale, sampling_ratio, aligned)
    check_mode(mode)
    rois = boxes_to_rois(boxes)
    if rois.dtype.is_floating_point:
        rois = rois.to(compute_dtype(input.dtype))
    if mode != "avg":
        if mode == "max" and _onnx.exporting():
            _onnx.refuse_max_export()
        if _onnx.records_nodes():  # ONNX's own reading becomes RoiAlign(mode="max")
            return _onnx.export_roi_align(input, rois, scale, pooled_height, pooled_width,
                                          int(sampling_ratio), aligned, mode="max")
        return call_op(_max_op.roi_align_max, _max_op.forward_impl, input, rois, scale, pooled_height,
                       pooled_width, int(sampling_ratio), aligned, mode == "onnx_max")
    if _onnx.records_nodes():  # a standard ONNX RoiAlign node, with either exporter
        return _onnx.export_roi_align(input, rois, scale, pooled_height, pooled_width,
                                      int(sampling_ratio), aligned)
    return call_op(_op.roi_align, _op.forward_impl, input, rois, scale, pooled_height, pooled_width,
                   int(sampling_ratio), aligned)


class ROIAlign(nn.Module):
    """RoIAlign with the signature of ``torch_npu.contrib.module.ROIAlign`` and detectron2's ``ROIAlign``.

    Args:
        output_size: ``(height, width)`` of each output, or an int for a square one.
        spatial_scale: factor from box coordinates to feature-map pixels.
        sampling_ratio: samples per bin along each axis; ``0`` (or any value ``<= 0``) picks
            ``ceil(box size / output size)`` for each box.
        aligned: if True (the default), shift boxes by -0.5 pixel so that pixel centres sit at
            integer + 0.5; if False, the original Detectron convention.
        mode: ``"avg"`` (default), ``"max"`` or ``"onnx_max"``, as in :func:`roi_align`.

    Shape:
        - input: ``[N, C, H, W]``
        - rois: ``[K, 5]`` of ``(batch index, x1, y1, x2, y2)``, or a list of ``[L_i, 4]`` tensors
        - output: ``[K, C, height, width]``
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = True, *, mode: str = "avg") -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        check_scalars(spatial_scale, sampling_ratio, aligned)
        self.mode = check_mode(mode)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         mode=self.mode)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
                + (f", mode={self.mode!r}" if self.mode != "avg" else ""))
