"""The custom operators ``torch.ops.roialign.prroi_pool`` and its backward operator.

Precise RoI Pooling over axis-aligned boxes ``[K, 5] = (batch index, x1, y1, x2, y2)``: each
bin's value is the mean of the bilinearly interpolated map over the bin (pixels at integer
coordinates, no half-pixel shift). One backward operator returns the input and box gradients
together and computes only those autograd asks for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .common import check_backward, check_batch_index, check_scale, check_tensors, gradient_like, is_channels_last

__all__ = ["prroi_pool", "prroi_pool_backward"]

_OPERATOR = "prroi_pool"


def _check_tensors(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int) -> None:
    check_tensors(input, rois, pooled_height, pooled_width, "batch index, x1, y1, x2, y2")


def forward_impl(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    """PrRoIPool forward: ``[N, C, H, W]`` features and ``[K, 5]`` boxes to ``[K, C, PH, PW]``.
    The operator's implementation (see ``common.call_op``)."""
    _check_tensors(input, rois, pooled_height, pooled_width)
    check_scale(spatial_scale)
    check_batch_index(rois, input.shape[0])
    k, c = rois.shape[0], input.shape[1]
    if k == 0 or input.numel() == 0:
        return input.new_zeros((k, c, pooled_height, pooled_width))
    kernel = _backend.select(input.device, _OPERATOR)
    return kernel.forward(input, rois, spatial_scale, pooled_height, pooled_width)


prroi_pool = torch.library.custom_op("roialign::prroi_pool", forward_impl, mutates_args=())


@prroi_pool.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    _check_tensors(input, rois, pooled_height, pooled_width)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("roialign::prroi_pool_backward", mutates_args=())
def prroi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int, channels_last: bool, want_input: bool = True,
                        want_rois: bool = True) -> tuple[Tensor, Tensor]:
    """Gradients of ``prroi_pool``: the input's (in the input's layout) and the boxes' ``[K, 5]``;
    one not wanted (``want_input``, ``want_rois``) is not computed and comes back as zeros."""
    check_backward(grad, rois, pooled_height, pooled_width, "batch index, x1, y1, x2, y2", input=input,
                   spatial_scale=spatial_scale)
    if rois.shape[0] == 0 or input.numel() == 0:
        return gradient_like(input, rois, channels_last)
    kernel = _backend.select(input.device, _OPERATOR)
    return kernel.backward(grad, input, rois, spatial_scale, pooled_height, pooled_width, channels_last, want_input,
                           want_rois)


@prroi_pool_backward.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width, channels_last, want_input=True, want_rois=True):
    check_backward(grad, rois, pooled_height, pooled_width, "batch index, x1, y1, x2, y2", input=input, values=False)
    return gradient_like(input, rois, channels_last, zeros=False)


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(input, rois)
    ctx.params = (spatial_scale, pooled_height, pooled_width)
    ctx.channels_last = is_channels_last(input)


def _backward(ctx, grad):
    input, rois = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    grad_input, grad_rois = prroi_pool_backward(grad, input, rois, *ctx.params, ctx.channels_last,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (grad_input if ctx.needs_input_grad[0] else None, grad_rois if ctx.needs_input_grad[1] else None,
            None, None, None)


prroi_pool.register_autograd(_backward, setup_context=_setup_context)
