"""The custom operators ``torch.ops.roialign.roi_align_rotated`` and its two backward operators.

Rotated boxes are ``[K, 6] = (batch index, centre x, centre y, width, height, angle)``. The
conventions are parameters: ``aligned`` (the -0.5 shift; False is the legacy form with sizes
raised to at least 1), ``clockwise`` (negates the angle) and ``degrees`` (else radians). One
schema, fake and autograd formula for every device, as for ``roi_align``; the kernel comes from
:func:`roialign._backend.select`. The box gradient is ``[K, 6]``: zero for the batch index,
then d/d(centre x, centre y, width, height, angle), the angle in the caller's unit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .common import check_backward, check_batch_index, check_sampling_ratio, check_scale, check_tensors, is_channels_last

__all__ = ["roi_align_rotated", "roi_align_rotated_backward", "roi_align_rotated_backward_rois"]

_OPERATOR = "roi_align_rotated"


_FIELDS = "batch index, centre x, centre y, width, height, angle"


def _check_tensors(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int,
                   sampling_ratio: int) -> None:
    check_tensors(input, rois, pooled_height, pooled_width, _FIELDS)
    check_sampling_ratio(sampling_ratio)


def check_sizes(rois: Tensor) -> None:
    """ValueError for a negative width or height (NaN passes: that box's output is NaN)."""
    if rois.shape[0] == 0:
        return
    bad = (rois[:, 3:5] < 0).any(1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"rois[:, 3:5] (width, height) must be >= 0; rois[{k}] has width {float(rois[k, 3])} "
                         f"and height {float(rois[k, 4])}")


def forward_impl(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                 sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool) -> Tensor:
    """Rotated RoIAlign forward: ``[N, C, H, W]`` features and ``[K, 6]`` boxes to ``[K, C, PH, PW]``.
    The operator's implementation (see ``common.call_op``)."""
    _check_tensors(input, rois, pooled_height, pooled_width, sampling_ratio)
    check_scale(spatial_scale)
    check_batch_index(rois, input.shape[0])
    check_sizes(rois)
    k, c = rois.shape[0], input.shape[1]
    if k == 0 or input.numel() == 0:
        return input.new_zeros((k, c, pooled_height, pooled_width))
    kernel = _backend.select(input.device, _OPERATOR)
    return kernel.forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                          clockwise, degrees)


roi_align_rotated = torch.library.custom_op("roialign::roi_align_rotated", forward_impl, mutates_args=())


@roi_align_rotated.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees):
    _check_tensors(input, rois, pooled_height, pooled_width, sampling_ratio)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roialign::roi_align_rotated_backward", mutates_args=())
def roi_align_rotated_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                               pooled_width: int, batch_size: int, channels: int, height: int, width: int,
                               sampling_ratio: int, aligned: bool, clockwise: bool, degrees: bool,
                               channels_last: bool) -> Tensor:
    """Gradient of ``roi_align_rotated`` with respect to its input, laid out as the input was."""
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input_shape=(batch_size, channels, height, width),
                   spatial_scale=spatial_scale)
    check_sampling_ratio(sampling_ratio)
    shape = (batch_size, channels, height, width)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if rois.shape[0] == 0 or grad.numel() == 0 or height * width == 0:
        return grad.new_zeros(shape).contiguous(memory_format=memory_format)
    kernel = _backend.select(grad.device, _OPERATOR)
    return kernel.backward_input(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                 height, width, sampling_ratio, aligned, clockwise, degrees, channels_last)


@roi_align_rotated_backward.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned, clockwise, degrees, channels_last):
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input_shape=(batch_size, channels, height, width),
                   values=False)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device,
                       memory_format=memory_format)


@torch.library.custom_op("roialign::roi_align_rotated_backward_rois", mutates_args=())
def roi_align_rotated_backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float,
                                    pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                                    clockwise: bool, degrees: bool) -> Tensor:
    """Gradient of ``roi_align_rotated`` with respect to the boxes: ``[K, 6]``, zero in the batch-index column."""
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input=input, spatial_scale=spatial_scale)
    check_sampling_ratio(sampling_ratio)
    if rois.shape[0] == 0 or input.numel() == 0:
        return rois.new_zeros(rois.shape)
    kernel = _backend.select(input.device, _OPERATOR)
    return kernel.backward_rois(grad, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                aligned, clockwise, degrees)


@roi_align_rotated_backward_rois.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees):
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input=input, values=False)
    return rois.new_empty(rois.shape)


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees = inputs
    ctx.save_for_backward(rois, input if ctx.needs_input_grad[1] else None)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees)
    ctx.input_shape = tuple(input.shape)
    ctx.channels_last = is_channels_last(input)


def _backward(ctx, grad):
    rois, input = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, clockwise, degrees = ctx.params
    grad_input = grad_rois = None
    if ctx.needs_input_grad[0]:
        n, c, h, w = ctx.input_shape
        grad_input = roi_align_rotated_backward(grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w,
                                                sampling_ratio, aligned, clockwise, degrees, ctx.channels_last)
    if ctx.needs_input_grad[1]:
        grad_rois = roi_align_rotated_backward_rois(grad, input, rois, spatial_scale, pooled_height, pooled_width,
                                                    sampling_ratio, aligned, clockwise, degrees)
    return grad_input, grad_rois, None, None, None, None, None, None, None


roi_align_rotated.register_autograd(_backward, setup_context=_setup_context)
