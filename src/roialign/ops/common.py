"""What the custom operators share: the batch-index check, the rule for calling an operator's
implementation without the dispatcher, and the rule that lets torch.compile see through an
operator into its Triton kernels on CUDA."""

from __future__ import annotations

import math
from types import ModuleType

import numba
import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from .. import _backend
from ..kernels.reference.common import is_channels_last  # noqa: F401 (the operators' rule for layouts)


MAX_SAMPLING_RATIO = 1024  # samples per bin side: a million per bin


def check_sampling_ratio(sampling_ratio: int) -> None:
    """ValueError naming ``sampling_ratio`` beyond ``MAX_SAMPLING_RATIO`` (or below -2**31).

    A fixed ratio ``s`` takes ``s * s`` samples per bin, and every operator visits those that can
    land on the map: at 1024, a million per bin, far beyond any detector's (0 to 4) and beyond
    the point where more samples change the average (``prroi_pool`` gives the bin's exact
    average). Much larger ratios exhausted memory or ran for hours, or overflowed the kernels'
    integers."""
    if sampling_ratio > MAX_SAMPLING_RATIO or sampling_ratio < -(2**31):
        raise ValueError(f"sampling_ratio must be at most {MAX_SAMPLING_RATIO} samples per bin side, or <= 0 "
                         f"(down to -2**31) for adaptive sampling; got {sampling_ratio!r}")


def check_tensors(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, fields: str) -> None:
    """Shape, dtype and device checks of an operator's features and boxes; ``fields`` names the
    box columns (``rois`` must be ``[K, len(fields)]``). Shared by real and fake implementations."""
    if input.dim() != 4:
        raise ValueError(f"input must be a 4-D tensor [N, C, H, W]; got {input.dim()}-D with shape {list(input.shape)}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input must be a floating-point tensor; got dtype {input.dtype}")
    width = len(fields.split(","))
    if rois.dim() != 2 or rois.shape[1] != width:
        raise ValueError(f"rois must have shape [K, {width}] ({fields}); got {list(rois.shape)}")
    if not rois.dtype.is_floating_point:
        raise TypeError(f"rois must be a floating-point tensor; got dtype {rois.dtype}")
    if input.device != rois.device:
        raise ValueError(f"input and rois must be on the same device; got input on {input.device} and rois on {rois.device}")
    if pooled_height <= 0 or pooled_width <= 0:
        raise ValueError(f"output_size must be positive; got ({pooled_height}, {pooled_width})")


def check_scale(spatial_scale: float, name: str = "spatial_scale") -> None:
    """ValueError naming ``spatial_scale`` unless it is finite and positive (the API checks its type
    too; this covers direct calls of the operators, which would otherwise give NaN or zeros)."""
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"{name} must be finite and positive; got {spatial_scale!r}")


def check_backward(grad: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, fields: str, *,
                   input: Tensor | None = None, input_shape: tuple[int, int, int, int] | None = None,
                   values: bool = True, spatial_scale: float | None = None) -> None:
    """Checks of a backward operator's arguments: ``rois`` as the forward checks them (with the
    features ``input``, or their shape ``input_shape`` where the operator takes only that), and
    ``grad`` the ``[K, C, PH, PW]`` gradient of the forward's output for those boxes and features.

    Autograd always passes consistent arguments; a direct call with others would have the kernels
    index outside their buffers, so it is a ValueError, TypeError or IndexError naming the argument.
    ``values=False`` (fake implementations) skips the batch indices, which need the boxes' values;
    ``spatial_scale``, when given, is checked with :func:`check_scale`."""
    if spatial_scale is not None:
        check_scale(spatial_scale)
    if input is not None:
        check_tensors(input, rois, pooled_height, pooled_width, fields)
        batch_size, channels = input.shape[0], input.shape[1]
    else:
        if any(v < 0 for v in input_shape):
            raise ValueError(f"batch_size, channels, height and width must be >= 0; got {list(input_shape)}")
        batch_size, channels = input_shape[0], input_shape[1]
        width = len(fields.split(","))
        if rois.dim() != 2 or rois.shape[1] != width or not rois.dtype.is_floating_point:
            raise ValueError(f"rois must be a floating-point tensor of shape [K, {width}] ({fields}); "
                             f"got {rois.dtype} of shape {list(rois.shape)}")
        if pooled_height <= 0 or pooled_width <= 0:
            raise ValueError(f"output_size must be positive; got ({pooled_height}, {pooled_width})")
    if not grad.dtype.is_floating_point:
        raise TypeError(f"grad must be a floating-point tensor; got dtype {grad.dtype}")
    if input is not None and grad.dtype != input.dtype:
        raise TypeError(f"grad must have the input's dtype {input.dtype}; got {grad.dtype}")
    expected = [rois.shape[0], channels, pooled_height, pooled_width]
    if list(grad.shape) != expected:
        raise ValueError(f"grad must have the forward output's shape [K, C, PH, PW] = {expected}; "
                         f"got {list(grad.shape)}")
    if grad.device != rois.device:
        raise ValueError(f"grad and rois must be on the same device; got grad on {grad.device} and rois on {rois.device}")
    if values:
        check_batch_index(rois, batch_size)


def gradient_like(input: Tensor, rois: Tensor, channels_last: bool, zeros: bool = True) -> tuple[Tensor, Tensor]:
    """(input gradient in the input's layout, ``[K, 5]`` box gradient), zeros or uninitialised: what
    a backward operator returns when there is nothing to compute, and its fake implementation."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if zeros:
        return torch.zeros_like(input, memory_format=memory_format), rois.new_zeros(rois.shape)
    return torch.empty_like(input, memory_format=memory_format), rois.new_empty(rois.shape)


# Functions that report dispatcher state: private names, looked up, never assumed (None where
# this torch lacks one, and then every call goes through the dispatcher).
_DISPATCH_STATE = (
    getattr(torch._C, "_len_torch_dispatch_stack", None),  # a TorchDispatchMode (FakeTensorMode, ...)
    getattr(torch._C, "_is_torch_function_mode_enabled", None),  # a TorchFunctionMode (``with torch.device``)
    getattr(torch.autograd, "_profiler_enabled", None),  # torch.profiler records each operator call
    getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None),  # vmap, grad, ...
)


def dispatcher_needed(*tensors: Tensor) -> bool:
    """False when an operator's implementation may be called directly, skipping the custom-op
    layers (autograd wrapper, redispatch, alias checks): 0.07-0.12 ms per call on 2 cores once
    a forward has pushed them out of cache (AMD EPYC, torch 2.8 and 2.14).

    It may when the call would reach our CPU implementation with nothing else happening on the
    way: plain CPU tensors, no gradient to record, and nothing tracing, compiling, exporting,
    profiling, transforming or intercepting calls. Anything else, or a torch whose state cannot be
    read, goes through the dispatcher. Both ways run the same implementation: the same result."""
    for t in tensors:
        if type(t) is not Tensor or t.device.type != "cpu":
            return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    dispatch_modes, function_mode, profiling, transform = _DISPATCH_STATE
    if dispatch_modes is None or function_mode is None or profiling is None or transform is None:
        return True
    return bool(dispatch_modes() or function_mode() or profiling() or transform() is not None)


@numba.njit(nogil=True, cache=True)
def _first_bad_index(rois, batch_size):
    """The first row whose ``rois[:, 0]`` is not an integer in [0, batch_size) (NaN is not), or -1."""
    for k in range(rois.shape[0]):
        b = rois[k, 0]
        if not (b >= 0 and b < batch_size and b == np.floor(b)):
            return k
    return -1


def refuse_forward_ad(*tensors: Tensor) -> None:
    """NotImplementedError if a tensor carries a forward-mode tangent (``torch.func.jvp``,
    ``jacfwd``, ``torch.autograd.forward_ad``): the operators have no forward-mode formula, and
    torch's custom operators (torchvision's too) drop such a tangent without a word, giving a
    zero or missing derivative. Costs nothing outside a forward-mode level (torch's level counter,
    a private name, looked up; without it nothing is refused)."""
    if getattr(_forward_ad, "_current_level", -1) < 0 or torch.compiler.is_compiling():
        return
    for t in tensors:
        if _forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                "roialign's operators have no forward-mode derivative (torch.func.jvp, jacfwd, "
                "torch.autograd.forward_ad); use reverse mode (backward, torch.autograd.grad), which gives "
                "the gradients of the features and of the boxes")


def call_op(op, impl, input: Tensor, rois: Tensor, *args):
    """``op(input, rois, *args)``, or its implementation ``impl`` called directly where
    :func:`dispatcher_needed` allows: how the API calls every forward operator."""
    refuse_forward_ad(input, rois)
    if dispatcher_needed(input, rois):
        return op(input, rois, *args)
    return impl(input, rois, *args)


def check_batch_index(rois: Tensor, batch_size: int) -> None:
    """IndexError unless every box's batch index is an integer in [0, batch_size).

    One reduction and one host synchronisation, whatever the device.
    """
    if rois.shape[0] == 0:
        return
    if rois.device.type == "cpu" and rois.dtype in (torch.float32, torch.float64):
        # The same test compiled: one call, where the tensor operations' dispatch took some 50 µs,
        # and NumPy's eight operations 50-150 µs once a forward had pushed them out of cache.
        first = _first_bad_index(rois.detach().numpy(), batch_size)
        first = None if first < 0 else first
    else:
        index = rois[:, 0]
        bad = ~((index >= 0) & (index < batch_size) & (index == torch.floor(index)))
        first = int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
    if first is not None:
        raise IndexError(f"rois[:, 0] must hold integer batch indices in [0, {batch_size}); "
                         f"rois[{first}, 0] is {float(rois[first, 0])}")


# torch.compile on CUDA: see through the op into the Triton kernels.
#
# Under AOTAutograd (the part of torch.compile that traces the forward and backward graphs),
# an op registered below is replaced by the body of its Triton implementation, launched through
# ``torch.library.wrap_triton``, so that inductor receives the Triton kernels themselves rather
# than an opaque call (as ``torch.library.triton_op`` does for ops made of Triton kernels only).
# Elsewhere, and under torch.export, which keeps custom ops whole, the ops stay opaque. The
# batch-index check needs the boxes' values, so the traced forward keeps it as an opaque op.


@torch.library.custom_op("roialign::checked_rois", mutates_args=())
def checked_rois(rois: Tensor, batch_size: int) -> Tensor:
    """A copy of ``rois`` after :func:`check_batch_index`: the check stays in traced graphs."""
    check_batch_index(rois, batch_size)
    return rois.clone()


@checked_rois.register_fake
def _(rois, batch_size):
    return torch.empty_like(rois)


def _export_switch():
    """torch.export's switch that keeps Triton-backed ops whole (as ``torch.library.triton_op``
    does), or None on a torch without it. A private name: looked up, never assumed."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return None
    return custom_triton_ops_decomposition_disabled


def tracing_into_triton_supported() -> bool:
    """Whether this torch lets torch.compile see our Triton kernels (torch >= 2.6: ``wrap_triton``,
    ``CustomOpDef.register_torch_dispatch`` and torch.export's switch). Elsewhere the ops stay
    opaque under torch.compile, which is correct and still compiles."""
    return (hasattr(torch.library, "wrap_triton") and hasattr(checked_rois, "register_torch_dispatch")
            and _export_switch() is not None)


def _triton_for_tracing(device: torch.device, operator: str) -> ModuleType | None:
    """The Triton kernel module when a graph traced on ``device`` should see into it, else None."""
    switch = _export_switch()
    if device.type != "cuda" or switch is None or switch():
        return None
    if _backend.select_name(device) != "triton":
        return None
    return _backend.select(device, operator)


def register_triton_decomposition(op, operator: str, body, device_of) -> None:
    """Under AOTAutograd on CUDA with the Triton backend in force, run ``body(kernel, *args)``
    instead of the opaque ``op``, where ``kernel`` is ``roialign.kernels.triton.<operator>``;
    ``device_of(*args)`` says where the op runs. Nothing is registered on a torch that cannot."""
    if not tracing_into_triton_supported():
        return
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    known = (Tensor, FunctionalTensor, FakeTensor)

    def rule(mode, func, types, args, kwargs):
        if any(not issubclass(t, known) for t in types):
            return NotImplemented
        kernel = _triton_for_tracing(device_of(*args), operator)
        if kernel is None:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        from ..kernels.triton.common import traced

        with mode, traced():
            return body(kernel, *args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)
