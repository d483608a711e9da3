"""Multi-scale pooling for feature pyramids: ``assign_levels`` and ``MultiScaleRoIAlign``.

``MultiScaleRoIAlign`` is the pooler of torchvision's detection models on roialign's op. When
torchvision can be imported it subclasses ``torchvision.ops.MultiScaleRoIAlign``, so that the
detectors' constructors (which check ``isinstance(box_roi_pool, MultiScaleRoIAlign)``) accept
it; without torchvision it is a plain ``nn.Module`` with the same behaviour.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..integrations.onnx import records_nodes as _records_onnx_nodes
from ..integrations.torchvision import torchvision_multiscale_base
from ..ops import multiscale_roi_align as _op
from ..ops.common import refuse_forward_ad
from ._args import BoxesLike, boxes_to_rois, check_scalars, fx_leaf, output_size_pair, refuse_script
from .roi_align import roi_align

__all__ = ["assign_levels", "MultiScaleRoIAlign", "CONVENTIONS"]

CONVENTIONS = ("torchvision", "detectron2", "mmdet")


def _box_sides(boxes: BoxesLike) -> Tensor:
    """``sqrt(area)`` of ``[K, 4]`` / ``[K, 5]`` boxes or a list of ``[L, 4]`` tensors, in the boxes'
    dtype, or in float32 for float16 and bfloat16 boxes (a detector's proposals under autocast):
    torchvision's ``box_area`` upcasts them and detectron2's ``Boxes`` hold float32, and a float16
    area overflows past 256 x 256 pixels."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] not in (4, 5):
            raise ValueError(f"boxes must have shape [K, 4] (x1, y1, x2, y2) or [K, 5] (batch index, x1, y1, x2, y2); "
                             f"got {list(boxes.shape)}")
        corners = boxes[:, -4:]
    else:
        corners = boxes_to_rois(boxes)[:, 1:]
    if not corners.dtype.is_floating_point:
        raise TypeError(f"boxes must be floating point; got dtype {corners.dtype}")
    if corners.dtype in (torch.float16, torch.bfloat16):
        corners = corners.float()
    return torch.sqrt((corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1]))


def _check_convention(convention: object) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(map(repr, CONVENTIONS))}; got {convention!r}")


def _check_int(value: object, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r}")
    return int(value)


def assign_levels(boxes: BoxesLike, min_level: int, max_level: int, *, convention: str = "torchvision",
                  canonical_scale: float = 224, canonical_level: int = 4, finest_scale: float = 56) -> Tensor:
    """The pyramid level of each box (FPN paper, eq. 1), counted from ``min_level`` as 0.

    Each framework places its epsilon differently, which moves boxes that sit exactly on a
    level boundary; ``convention`` picks whose rule to follow (``s = sqrt(box area)``):

    - ``"torchvision"``: ``floor(canonical_level + log2(s / canonical_scale) + 1e-6)``
    - ``"detectron2"``: ``floor(canonical_level + log2(s / canonical_scale + 1e-8))``
    - ``"mmdet"``: ``min_level + floor(log2(s / finest_scale + 1e-6))``

    and the level is clamped to ``[min_level, max_level]``. The arithmetic is done in the boxes'
    dtype (float32 for float16 and bfloat16 boxes, which torchvision and detectron2 upcast too; so
    does roialign for mmdet's rule), in each framework's order of operations, so that ties fall
    the same way.

    A box whose size is not a number (a NaN coordinate, or a negative area: reversed along one
    axis) has no level: it gets -1, and :class:`MultiScaleRoIAlign` gives it a zero output, as
    torchvision's, detectron2's and mmdet's poolers do (they match such a box to no level).

    Args:
        boxes: ``[K, 4]`` boxes ``(x1, y1, x2, y2)``, ``[K, 5]`` rois (the batch-index column is
            ignored) or a list of ``[L_i, 4]`` tensors, one per image.
        min_level, max_level: the finest and coarsest pyramid levels (e.g. 2 and 5 for P2-P5).
        convention: ``"torchvision"``, ``"detectron2"`` or ``"mmdet"``.
        canonical_scale, canonical_level: a box of side ``canonical_scale`` goes to
            ``canonical_level`` (torchvision, detectron2).
        finest_scale: boxes smaller than twice this go to ``min_level`` (mmdet).

    Returns:
        int64 ``[K]``: each box's level minus ``min_level``, or -1 for a box without a size.
    """
    min_level, max_level = _check_int(min_level, "min_level"), _check_int(max_level, "max_level")
    if max_level < min_level:
        raise ValueError(f"max_level must be >= min_level; got min_level={min_level}, max_level={max_level}")
    _check_convention(convention)
    side = _box_sides(boxes)
    if convention == "torchvision":
        level = torch.floor(canonical_level + torch.log2(side / canonical_scale)
                            + torch.tensor(1e-6, dtype=side.dtype, device=side.device))
    elif convention == "detectron2":
        level = torch.floor(canonical_level + torch.log2(side / canonical_scale + 1e-8))
    else:
        level = min_level + torch.floor(torch.log2(side / finest_scale + 1e-6))
    level = level.clamp(min=min_level, max=max_level) - min_level
    return torch.where(torch.isnan(level), torch.full_like(level, -1), level).to(torch.int64)


def infer_scale(feature_size: int, image_size: int) -> float:
    """The power of two nearest to ``feature_size / image_size`` (halves to even), as torchvision infers it.

    Plain Python arithmetic, so that nothing is added to a traced graph. torchvision rounds the
    ``log2`` of the ratio in float32: the two can differ only for a ratio within about 1e-7 of
    ``2 ** (k + 0.5)``, far from any feature pyramid's ``2 ** -k``.
    """
    return 2.0 ** round(math.log2(feature_size / image_size))


def pyramid_scales(features: Sequence[Tensor], image_shapes: Sequence[Sequence[int]]) -> list[float]:
    """Each feature map's scale from its height and the tallest image, as torchvision infers it."""
    if len(image_shapes) == 0:
        raise ValueError("image_shapes must hold the (height, width) of at least one image")
    height = max(int(shape[0]) for shape in image_shapes)
    return [infer_scale(int(feature.shape[-2]), height) for feature in features]


@fx_leaf
def multiscale_roi_align(x: Mapping[str, Tensor], boxes: Sequence[Tensor], image_shapes: Sequence[Sequence[int]],
                         featmap_names: Sequence[str], output_size: tuple[int, int], sampling_ratio: int,
                         canonical_scale: float, canonical_level: int, aligned: bool, convention: str,
                         finest_scale: float) -> Tensor:
    """Pool each box from the pyramid level it is assigned to; see :class:`MultiScaleRoIAlign`."""
    if not isinstance(x, Mapping):
        raise TypeError(f"x must be a dict of feature maps; got {type(x).__name__}")
    features = [value for name, value in x.items() if name in featmap_names]
    if not features:
        raise ValueError(f"x holds none of the feature maps named in featmap_names {list(featmap_names)}; "
                         f"it has {list(x)}")
    if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence):
        raise TypeError(f"boxes must be a list of [L, 4] tensors, one per image; got {type(boxes).__name__}")
    scales = pyramid_scales(features, image_shapes)
    rois = boxes_to_rois(list(boxes)) if len(boxes) else features[0].new_zeros((0, 5))
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, scales[0], sampling_ratio, aligned)
    # Scales are powers of two, so their log2 is exact.
    min_level, max_level = -round(math.log2(scales[0])), -round(math.log2(scales[-1]))
    levels = assign_levels(rois, min_level, max_level, convention=convention, canonical_scale=canonical_scale,
                           canonical_level=canonical_level, finest_scale=finest_scale)
    if _records_onnx_nodes():  # one RoiAlign node per level, merged by scatter
        return _pooled_level_by_level(features, rois, levels, scales, output_size, sampling_ratio, aligned)
    refuse_forward_ad(rois, *features)
    return _op.multiscale_roi_align(features, rois, levels, scales, output_size[0], output_size[1], sampling_ratio,
                                    aligned)


def _pooled_level_by_level(features, rois, levels, scales, output_size, sampling_ratio, aligned) -> Tensor:
    """The multiscale op's result from one ``roi_align`` per level: what ONNX export records."""
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1]) + tuple(output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = torch.nonzero(levels == level).squeeze(1)
        pooled = roi_align(feature, rois[index], output_size, scale, sampling_ratio, aligned)
        result = result.index_put((index,), pooled.to(result.dtype))
    return result


class MultiScaleRoIAlign(torchvision_multiscale_base()):
    """RoIAlign over a feature pyramid: each box is pooled from the level that suits its size.

    The pooler of torchvision's Faster/Mask/Keypoint R-CNN, on roialign's op, with the same
    results. Scales are inferred on every call from the feature maps' and the tallest image's
    heights (``2 ** round(log2(feature_h / image_h))``); torchvision caches those of the first
    call, which gives the same numbers unless later images change the power of two.

    Args:
        featmap_names: names of the feature maps in ``x`` to pool from, finest first.
        output_size: ``(PH, PW)`` or an int for a square output.
        sampling_ratio: samples per bin along each axis; ``<= 0`` for adaptive.
        canonical_scale, canonical_level: a box of side ``canonical_scale`` is pooled from
            ``canonical_level`` (torchvision and detectron2 conventions).
        aligned: the RoIAlign pixel convention; False (torchvision's detectors) by default.
        convention: level assignment rule, ``"torchvision"``, ``"detectron2"`` or ``"mmdet"``
            (see :func:`assign_levels`).
        finest_scale: the mmdet convention's scale of the finest level.

    Shape:
        - x: dict of ``[N, C, H_l, W_l]`` feature maps (all with the same C)
        - boxes: list of ``N`` tensors ``[L_i, 4]``, ``(x1, y1, x2, y2)`` in image coordinates
        - image_shapes: list of ``N`` ``(height, width)`` of the images fed to the backbone
        - output: ``[sum L_i, C, PH, PW]`` of the first pooled feature map's dtype
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, featmap_names: Sequence[str], output_size: int | Sequence[int], sampling_ratio: int, *,
                 canonical_scale: float = 224, canonical_level: int = 4, aligned: bool = False,
                 convention: str = "torchvision", finest_scale: float = 56) -> None:
        nn.Module.__init__(self)
        if isinstance(featmap_names, str) or not isinstance(featmap_names, Sequence):
            raise TypeError(f"featmap_names must be a list of str; got {featmap_names!r}")
        check_scalars(1.0, sampling_ratio, aligned)
        _check_convention(convention)
        self.featmap_names = list(featmap_names)
        self.output_size = output_size_pair(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_scale = canonical_scale
        self.canonical_level = _check_int(canonical_level, "canonical_level")
        self.aligned = aligned
        self.convention = convention
        self.finest_scale = finest_scale
        # torchvision's attributes, kept for code that reads them; this class infers scales per call.
        self.scales = None
        self.map_levels = None

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        return multiscale_roi_align(x, boxes, image_shapes, self.featmap_names, self.output_size,
                                    self.sampling_ratio, self.canonical_scale, self.canonical_level, self.aligned,
                                    self.convention, self.finest_scale)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, convention={self.convention!r})")
