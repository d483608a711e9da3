"""``ROIAlign``: the seed's ``nn.Module``, a thin wrapper around :func:`roialign.roi_align`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .functional import check_scalars, output_size_pair, roi_align

__all__ = ["ROIAlign"]


class ROIAlign(nn.Module):
    """RoIAlign with the signature of ``torch_npu.contrib.module.ROIAlign`` and detectron2's ``ROIAlign``.

    Args:
        output_size: ``(height, width)`` of each output, or an int for a square one.
        spatial_scale: factor from box coordinates to feature-map pixels.
        sampling_ratio: samples per bin along each axis; ``0`` (or any value ``<= 0``) picks
            ``ceil(box size / output size)`` for each box.
        aligned: if True (the default), shift boxes by -0.5 pixel so that pixel centres sit at
            integer + 0.5; if False, the original Detectron convention.

    Shape:
        - input: ``[N, C, H, W]``
        - rois: ``[K, 5]`` of ``(batch index, x1, y1, x2, y2)``, or a list of ``[L_i, 4]`` tensors
        - output: ``[K, C, height, width]``
    """

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = True) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        check_scalars(spatial_scale, sampling_ratio, aligned)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
