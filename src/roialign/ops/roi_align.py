"""The custom operators ``torch.ops.roialign.roi_align`` and its two backward operators.

One schema, one fake (shape) implementation and one autograd formula for every device; the
real implementation picks a kernel with :func:`roialign._backend.select`. The input-gradient
operator receives the input's shape instead of the input, as torchvision's does; the
box-gradient operator needs the input's values and is only called when boxes require grad.
On CUDA, torch.compile traces through all three into the Triton kernels (``common``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .common import (check_backward, check_batch_index, check_sampling_ratio, check_scale, check_tensors,
                     checked_rois, is_channels_last, register_triton_decomposition)

__all__ = ["roi_align", "roi_align_backward", "roi_align_backward_rois"]


_FIELDS = "batch index, x1, y1, x2, y2"


def _check_tensors(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int,
                   sampling_ratio: int) -> None:
    check_tensors(input, rois, pooled_height, pooled_width, _FIELDS)
    check_sampling_ratio(sampling_ratio)


def forward_impl(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                 sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign forward: ``[N, C, H, W]`` features and ``[K, 5]`` boxes to ``[K, C, PH, PW]``,
    channels_last when the input is (:func:`output_format`). The operator's implementation (see
    ``common.call_op``)."""
    _check_tensors(input, rois, pooled_height, pooled_width, sampling_ratio)
    check_scale(spatial_scale)
    check_batch_index(rois, input.shape[0])
    return _forward(_backend.select(input.device, "roi_align"), input, rois, spatial_scale, pooled_height, pooled_width,
                    sampling_ratio, aligned)


roi_align = torch.library.custom_op("roialign::roi_align", forward_impl, mutates_args=())


def output_format(input: Tensor) -> torch.memory_format:
    """The output's layout: channels_last for a channels_last input, as PyTorch's own pooling
    operators and Intel Extension for PyTorch's RoIAlign do (the CPU kernel then writes each bin's
    channels as one run, in the order that keeps the map in cache), else NCHW-contiguous."""
    return torch.channels_last if is_channels_last(input) else torch.contiguous_format


def _forward(kernel, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
             memory_format=None):
    """The forward in ``memory_format`` (default: :func:`output_format`)."""
    k, c = rois.shape[0], input.shape[1]
    memory_format = output_format(input) if memory_format is None else memory_format
    if k == 0 or input.numel() == 0:
        return input.new_zeros((k, c, pooled_height, pooled_width)).contiguous(memory_format=memory_format)
    out = kernel.forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                         channels_last_out=memory_format == torch.channels_last)
    return out.contiguous(memory_format=memory_format)  # a no-op where the kernel wrote that layout


@roi_align.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check_tensors(input, rois, pooled_height, pooled_width, sampling_ratio)
    return torch.empty((rois.shape[0], input.shape[1], pooled_height, pooled_width), dtype=input.dtype,
                       device=input.device, memory_format=output_format(input))


@torch.library.custom_op("roialign::roi_align_backward", mutates_args=())
def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                       batch_size: int, channels: int, height: int, width: int, sampling_ratio: int,
                       aligned: bool, channels_last: bool) -> Tensor:
    """Gradient of ``roi_align`` with respect to its input, laid out as the input was."""
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input_shape=(batch_size, channels, height, width),
                   spatial_scale=spatial_scale)
    check_sampling_ratio(sampling_ratio)
    return _backward_input(_backend.select(grad.device, "roi_align"), grad, rois, spatial_scale, pooled_height, pooled_width,
                           batch_size, channels, height, width, sampling_ratio, aligned, channels_last)


def _backward_input(kernel, grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                    width, sampling_ratio, aligned, channels_last):
    shape = (batch_size, channels, height, width)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if rois.shape[0] == 0 or grad.numel() == 0 or height * width == 0:
        return grad.new_zeros(shape).contiguous(memory_format=memory_format)
    return kernel.backward_input(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                 height, width, sampling_ratio, aligned, channels_last)


@roi_align_backward.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned, channels_last):
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input_shape=(batch_size, channels, height, width),
                   values=False)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device,
                       memory_format=memory_format)


@torch.library.custom_op("roialign::roi_align_backward_rois", mutates_args=())
def roi_align_backward_rois(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                            pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient of ``roi_align`` with respect to the boxes: ``[K, 5]``, zero in the batch-index column."""
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input=input, spatial_scale=spatial_scale)
    check_sampling_ratio(sampling_ratio)
    return _backward_rois(_backend.select(input.device, "roi_align"), grad, input, rois, spatial_scale, pooled_height,
                          pooled_width, sampling_ratio, aligned)


def _backward_rois(kernel, grad, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    if rois.shape[0] == 0 or input.numel() == 0:
        return rois.new_zeros(rois.shape)
    return kernel.backward_rois(grad, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                aligned)


@roi_align_backward_rois.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    check_backward(grad, rois, pooled_height, pooled_width, _FIELDS, input=input, values=False)
    return rois.new_empty(rois.shape)


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    # The input's values are needed only for the box gradient.
    ctx.save_for_backward(rois, input if ctx.needs_input_grad[1] else None)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    ctx.input_shape = tuple(input.shape)
    ctx.channels_last = is_channels_last(input)


def _backward(ctx, grad):
    rois, input = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    grad_input = grad_rois = None
    if ctx.needs_input_grad[0]:
        n, c, h, w = ctx.input_shape
        grad_input = roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w,
                                        sampling_ratio, aligned, ctx.channels_last)
    if ctx.needs_input_grad[1]:
        grad_rois = roi_align_backward_rois(grad, input, rois, spatial_scale, pooled_height, pooled_width,
                                            sampling_ratio, aligned)
    return grad_input, grad_rois, None, None, None, None, None


roi_align.register_autograd(_backward, setup_context=_setup_context)


# torch.compile on CUDA: the traced forward checks the batch indices through an opaque op, then
# runs the Triton launcher (see ``common.register_triton_decomposition``).


def _traced_forward(kernel, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check_tensors(input, rois, pooled_height, pooled_width, sampling_ratio)
    rois = checked_rois(rois, input.shape[0])
    return _forward(kernel, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


register_triton_decomposition(roi_align, "roi_align", _traced_forward, lambda input, *rest: input.device)
register_triton_decomposition(roi_align_backward, "roi_align", _backward_input, lambda grad, *rest: grad.device)
register_triton_decomposition(roi_align_backward_rois, "roi_align", _backward_rois, lambda grad, input, *rest: input.device)
