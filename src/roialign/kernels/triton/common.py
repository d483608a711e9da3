"""What the Triton kernels of every operator share: launching under torch.compile, block sizes."""

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import triton
from torch import Tensor

_tracing: contextvars.ContextVar[bool] = contextvars.ContextVar("roialign_triton_tracing", default=False)


@contextlib.contextmanager
def traced() -> Iterator[None]:
    """Launch kernels through ``torch.library.wrap_triton``, so that a graph being traced by
    torch.compile records them (see ``roialign.ops``); eager calls launch them directly."""
    token = _tracing.set(True)
    try:
        yield
    finally:
        _tracing.reset(token)


def launcher(kernel):
    """``kernel`` itself, or its ``wrap_triton`` wrapper inside ``traced()``."""
    return torch.library.wrap_triton(kernel) if _tracing.get() else kernel


def block_c(channels: int, largest: int = 128) -> int:
    """A power-of-two block of channels for ``channels``, between 16 and ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(int(channels))))


def channels_last_on_gpu(input: Tensor) -> Tensor:
    """``input`` in channels-last layout on a GPU, where the kernels' channel blocks then read
    contiguous runs (NCHW reads strided by H x W cost several times the copy, measured on an
    H200); elsewhere (Triton's interpreter) as it is: the kernels take any strides."""
    if input.is_cuda and input.shape[1] > 1 and input.stride(1) != 1:
        return input.contiguous(memory_format=torch.channels_last)
    return input
