"""``torch.ops.roialign.multiscale_roi_align``: RoIAlign over a feature pyramid in one operator.

Pooling each box from its level needs the boxes of each level, whose number depends on the
data; done with tensor ops in Python, that selection breaks torch.compile's graph at every
level (pytorch#114220). As one custom op with a static output shape, ``[K, C, PH, PW]``, the
pooler compiles with ``fullgraph=True`` and exports as one node. The op and its two backward
ops run the ``roi_align`` kernels of the backend in force on each level's boxes.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import _backend
from ..kernels.reference.common import compute_dtype
from .common import check_backward, check_batch_index, check_sampling_ratio, check_scale, is_channels_last
from .roi_align import _FIELDS, _backward_input, _backward_rois, _check_tensors, _forward

__all__ = ["multiscale_roi_align", "multiscale_roi_align_backward", "multiscale_roi_align_backward_rois"]

# dtypes travel to the backward op as integers (a schema has no list of dtypes). Signatures use
# typing.List: torch 2.5's schema inference does not know the builtin list[...].
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float], pooled_height: int,
           pooled_width: int, sampling_ratio: int) -> None:
    if len(features) == 0 or len(features) != len(scales):
        raise ValueError(f"features and scales must have the same, non-zero length; got {len(features)} feature maps "
                         f"and {len(scales)} scales")
    for feature in features:
        _check_tensors(feature, rois, pooled_height, pooled_width, sampling_ratio)
    first = features[0]
    for i, feature in enumerate(features[1:], 1):
        if feature.shape[:2] != first.shape[:2]:
            raise ValueError(f"every feature map must have the batch size and channels of the first, "
                             f"{list(first.shape[:2])}; features[{i}] has {list(feature.shape[:2])}")
    _check_level_tensor(levels, rois)


def _check_level_tensor(levels: Tensor, rois: Tensor) -> None:
    if levels.shape != (rois.shape[0],) or levels.dtype != torch.int64:
        raise ValueError(f"levels must be an int64 tensor of shape [K] = [{rois.shape[0]}]; "
                         f"got {levels.dtype} of shape {list(levels.shape)}")


def _check_scales(scales: list[float]) -> None:
    for i, scale in enumerate(scales):
        check_scale(scale, f"scales[{i}]")


def _check_levels(levels: Tensor, count: int) -> None:
    if levels.numel() and bool(((levels < -1) | (levels >= count)).any()):
        raise IndexError(f"levels must lie in [-1, {count}) (-1: no level); got values from {int(levels.min())} "
                         f"to {int(levels.max())}")


def _check_backward(grad: Tensor, rois: Tensor, levels: Tensor, scales: list[float], pooled_height: int,
                    pooled_width: int, sizes: list[int], dtypes: list[int], channels_last: list[bool],
                    sampling_ratio: int, values: bool = True) -> None:
    """The input-gradient operator's checks (it has the maps' sizes, dtypes and layouts, not the
    maps); ``values=False`` skips those of the batch indices and levels."""
    count = len(scales)
    if count == 0 or len(sizes) != 4 * count or len(dtypes) != count or len(channels_last) != count:
        raise ValueError(f"scales, sizes (N, C, H, W per map), dtypes and channels_last must describe the same, "
                         f"non-zero number of feature maps; got {count} scales, {len(sizes)} sizes, {len(dtypes)} "
                         f"dtypes and {len(channels_last)} layouts")
    if any(not 0 <= d < len(_DTYPES) for d in dtypes):
        raise ValueError(f"dtypes must index {[str(d) for d in _DTYPES]}; got {list(dtypes)}")
    if any(sizes[4 * i: 4 * i + 2] != sizes[:2] for i in range(count)):
        raise ValueError(f"every feature map must have the batch size and channels of the first; got sizes {list(sizes)}")
    _check_level_tensor(levels, rois)
    for i in range(count):
        check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input_shape=tuple(sizes[4 * i: 4 * i + 4]),
                       values=values and i == 0)
    check_sampling_ratio(sampling_ratio)
    if values:
        _check_scales(scales)
        _check_levels(levels, count)


def _compute_rois(rois: Tensor, dtype: torch.dtype) -> Tensor:
    """The boxes as roi_align's functional passes them for features of ``dtype``."""
    return rois.to(compute_dtype(dtype))


def _level_index(levels: Tensor, level: int) -> Tensor:
    return torch.nonzero(levels == level).squeeze(1)


@torch.library.custom_op("roialign::multiscale_roi_align", mutates_args=())
def multiscale_roi_align(features: List[Tensor], rois: Tensor, levels: Tensor, scales: List[float],
                         pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Box ``k`` pooled from ``features[levels[k]]`` at ``scales[levels[k]]``, or zeros where
    ``levels[k]`` is -1 (a box without a size); the first map's dtype."""
    _check(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio)
    _check_scales(scales)
    check_batch_index(rois, features[0].shape[0])
    _check_levels(levels, len(features))
    kernel = _backend.select(rois.device, "roi_align")
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], pooled_height, pooled_width))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = _level_index(levels, level)
        if index.numel() == 0:
            continue
        pooled = _forward(kernel, feature, _compute_rois(rois, feature.dtype)[index], scale, pooled_height,
                          pooled_width, sampling_ratio, aligned, memory_format=torch.contiguous_format)
        result[index] = pooled.to(result.dtype)
    return result


@multiscale_roi_align.register_fake
def _(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned):
    _check(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio)
    first = features[0]
    return first.new_empty((rois.shape[0], first.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roialign::multiscale_roi_align_backward", mutates_args=())
def multiscale_roi_align_backward(grad: Tensor, rois: Tensor, levels: Tensor, scales: List[float],
                                  pooled_height: int, pooled_width: int, sizes: List[int], dtypes: List[int],
                                  channels_last: List[bool], sampling_ratio: int, aligned: bool) -> List[Tensor]:
    """Gradients of every feature map: ``sizes`` holds ``N, C, H, W`` of each, ``dtypes`` indices into ``_DTYPES``."""
    _check_backward(grad, rois, levels, scales, pooled_height, pooled_width, sizes, dtypes, channels_last,
                    sampling_ratio)
    kernel = _backend.select(grad.device, "roi_align")
    grads = []
    for level, scale in enumerate(scales):
        n, c, h, w = sizes[4 * level: 4 * level + 4]
        dtype = _DTYPES[dtypes[level]]
        index = _level_index(levels, level)
        grads.append(_backward_input(kernel, grad[index].to(dtype), _compute_rois(rois, dtype)[index], scale,
                                     pooled_height, pooled_width, n, c, h, w, sampling_ratio, aligned,
                                     channels_last[level]))
    return grads


@multiscale_roi_align_backward.register_fake
def _(grad, rois, levels, scales, pooled_height, pooled_width, sizes, dtypes, channels_last, sampling_ratio, aligned):
    _check_backward(grad, rois, levels, scales, pooled_height, pooled_width, sizes, dtypes, channels_last,
                    sampling_ratio, values=False)
    return [torch.empty(sizes[4 * i: 4 * i + 4], dtype=_DTYPES[dtypes[i]], device=grad.device,
                        memory_format=torch.channels_last if channels_last[i] else torch.contiguous_format)
            for i in range(len(scales))]


@torch.library.custom_op("roialign::multiscale_roi_align_backward_rois", mutates_args=())
def multiscale_roi_align_backward_rois(grad: Tensor, features: List[Tensor], rois: Tensor, levels: Tensor,
                                       scales: List[float], pooled_height: int, pooled_width: int,
                                       sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient with respect to the boxes ``[K, 5]`` (zero in the batch-index column)."""
    _check(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio)
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input=features[0])
    _check_scales(scales)
    _check_levels(levels, len(features))
    kernel = _backend.select(grad.device, "roi_align")
    grad_rois = torch.zeros_like(rois)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = _level_index(levels, level)
        if index.numel() == 0:
            continue
        part = _backward_rois(kernel, grad[index].to(feature.dtype), feature, _compute_rois(rois, feature.dtype)[index],
                              scale, pooled_height, pooled_width, sampling_ratio, aligned)
        grad_rois[index] = part.to(rois.dtype)
    return grad_rois


@multiscale_roi_align_backward_rois.register_fake
def _(grad, features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned):
    _check(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio)
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input=features[0], values=False)
    return torch.empty_like(rois)


def _setup_context(ctx, inputs, output):
    features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    needs_features = ctx.needs_input_grad[1]
    ctx.save_for_backward(rois, levels, *(features if needs_features else ()))
    ctx.params = (scales, pooled_height, pooled_width, sampling_ratio, aligned)
    ctx.sizes = [int(s) for f in features for s in f.shape]
    ctx.dtypes = [_DTYPES.index(f.dtype) for f in features]
    ctx.channels_last = [is_channels_last(f) for f in features]


def _backward(ctx, grad):
    rois, levels, *features = ctx.saved_tensors
    scales, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    grad_features = grad_rois = None
    if ctx.needs_input_grad[0]:
        grad_features = multiscale_roi_align_backward(grad, rois, levels, scales, pooled_height, pooled_width,
                                                      ctx.sizes, ctx.dtypes, ctx.channels_last, sampling_ratio,
                                                      aligned)
    if ctx.needs_input_grad[1]:
        grad_rois = multiscale_roi_align_backward_rois(grad, features, rois, levels, scales, pooled_height,
                                                       pooled_width, sampling_ratio, aligned)
    return grad_features, grad_rois, None, None, None, None, None, None


multiscale_roi_align.register_autograd(_backward, setup_context=_setup_context)
