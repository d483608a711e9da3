"""What the custom operators share: the batch-index check and the rule that lets torch.compile
see through an operator into its Triton kernels on CUDA."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from .. import _backend


def check_batch_index(rois: Tensor, batch_size: int) -> None:
    """IndexError unless every box's batch index is an integer in [0, batch_size).

    One reduction and one host synchronisation, whatever the device.
    """
    if rois.shape[0] == 0:
        return
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < batch_size) & (index == torch.floor(index)))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"rois[:, 0] must hold integer batch indices in [0, {batch_size}); rois[{k}, 0] is {float(index[k])}")


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
