"""Memory of the Numba CPU kernels: fresh buffers (with huge pages where the OS gives them),
scratch buffers that live for one call, and recycled memory for large results. Memory stays
bounded: a few idle buffers are kept between calls, and :func:`release_scratch` frees them.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
import weakref

import torch
from torch import Tensor


_HUGE_PAGE = 1 << 21
_libc = None


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.empty``, with transparent huge pages requested for large buffers on Linux.

    A fresh buffer of tens of MB costs more in 4 KiB page faults than the kernel that fills it;
    2 MiB pages cut that cost about threefold here. Where madvise is unavailable this is plain
    ``torch.empty``.
    """
    global _libc
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return t
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE; a refusal only costs speed
    except (OSError, AttributeError):
        pass
    return t


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * dtype.itemsize


class _Scratch:
    """Buffers that live only during one call, kept between calls: channels-last copies of NCHW
    maps, max-mode winners, the output gradient transposed to channel runs, PrRoIPool's integral
    images.

    Fresh pages cost as much as the copy that fills them (faulting and zeroing 55 MB took about
    15 ms next to a 16 ms copy on 2 threads), so such a buffer is given back afterwards. The
    ``_KEEP`` most recently given back stay idle (a feature pyramid's levels each find theirs);
    a request takes the smallest idle one that holds it without wasting more than half of it.
    Memory stays bounded by ``_KEEP`` buffers; :func:`release_scratch` frees them.
    """

    _KEEP = 4

    def __init__(self) -> None:
        self._lock = threading.RLock()  # results are given back by finalizers: any thread, any time
        self._idle: list[Tensor] = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> Tensor:
        with self._lock:
            fits = [i for i, buf in enumerate(self._idle) if nbytes <= buf.numel() <= 2 * nbytes]
            if fits:
                return self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
        return empty((max(1, nbytes),), torch.uint8)

    def give(self, buf: Tensor) -> None:
        with self._lock:
            self._idle = (self._idle + [buf])[-self._KEEP:]

    def release(self) -> None:
        with self._lock:
            self._idle = []


_scratch = _Scratch()


class _Results(_Scratch):
    """Memory for large results (outputs, input gradients), recycled once the caller is done.

    Each call used to return fresh pages, and faulting them in cost 20-25% of a forward: on the
    Intel Xeon host, writing a fresh 50 MB output took 13-14 ms against 5 ms for pages already
    mapped. A result of at least ``_POOLED`` bytes is therefore a tensor over one of our buffers,
    whose memory comes back here when the last tensor sharing it is gone (its storage holds a
    NumPy array, and that array's finalizer gives the buffer back); the next call of that size
    reuses it. Until then nothing else touches it, views and autograd included. The ``_KEEP``
    most recently given back stay idle (about the size of a feature pyramid's level each);
    :func:`release_scratch` frees them. Such a tensor behaves like any other except that, as one
    made by ``torch.from_numpy``, its storage cannot grow (``resize_`` to more elements raises).
    """

    # Two at first: too few once results of several sizes take turns (a forward's output and an
    # input gradient per pyramid level, or one workload in several dtypes): a float32 output took
    # the idle buffer of a float64 one twice its size, and every float64 call then faulted in
    # fresh pages (train-P3 in four dtypes in one round robin, NCHW, 3 rounds: float64's 98 MB
    # outputs were faulted in for 7 of its 10 calls with two kept, 3 with four, the first ones;
    # float64's forward 3.0x float32's time, against 1.7x with four kept). Four were still too
    # few for six sizes (boxhead-P2 in four dtypes: float64's 111 MB input gradient faulted in
    # for 10 of 20 calls; float64 NCHW forward+backward 90-92 ms with eight kept, 108-111 with
    # four) and for a pyramid's step (an output and an input gradient per level).
    _KEEP = 8
    # 8 MiB at first; lowered because mid-sized results paid for their pages too, once other
    # operators ran between our calls (as in a model, or in the benchmark's round robin, where
    # torchvision's buffers come and go). PrRoIPool's adaptive workload (a 2.5 MB output, a 4 MB
    # input gradient), as multiples of torchvision's speed in two runs each of
    # ``bench_cpu.py --op prroi --workloads adaptive`` (AMD EPYC, 2 threads): NCHW forward 2.69 and
    # 2.39x before, 2.87 and 2.88x with results from 256 KiB recycled (float64: 2.40, 2.07 against
    # 2.60, 2.55x); forward+backward 4.0-4.9x before, 5.2-5.9x after. Below it, glibc's heap
    # usually hands out pages already mapped.
    _POOLED = 256 << 10

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = _nbytes(shape, dtype)
        if nbytes < self._POOLED:
            return empty(shape, dtype)
        buf = self.take(nbytes)
        memory = buf.numpy()[:nbytes]
        weakref.finalize(memory, self.give, buf)
        return torch.from_numpy(memory).view(dtype).view(shape)


_results = _Results()


def result_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor to return to the caller: recycled memory when large (see :class:`_Results`)."""
    return _results.tensor(shape, dtype)


def release_scratch() -> None:
    """Free the idle scratch and result buffers (see :class:`_Scratch` and :class:`_Results`)."""
    _scratch.release()
    _results.release()


@contextlib.contextmanager
def scratch_buffers():
    """A function ``buffer(shape, dtype) -> Tensor`` handing out scratch tensors (contents
    undefined) that go back to the pool when the ``with`` block ends."""
    taken: list[Tensor] = []

    def buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = _nbytes(shape, dtype)
        taken.append(_scratch.take(nbytes))
        return taken[-1][:nbytes].view(dtype).view(shape)

    try:
        yield buffer
    finally:
        for buf in taken:
            _scratch.give(buf)


@contextlib.contextmanager
def scratch(shape: tuple[int, ...], dtype: torch.dtype):
    """A scratch tensor (contents undefined) for the duration of a ``with`` block, from the same
    pool as :func:`channels_last_map`'s copies: for large buffers that do not outlive a call."""
    with scratch_buffers() as buffer:
        yield buffer(shape, dtype)
