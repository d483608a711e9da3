"""Which kernel runs a call: ``auto`` picks the fastest one available for the tensor's device.

A backend is a folder of :mod:`roialign.kernels` with one module per operator
(``roialign.kernels.<backend>.<operator>``). ``use_backend`` (a context manager, local to the
thread or task) and the ``ROIALIGN_BACKEND`` environment variable force one by name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("reference", "numba", "triton")
_FOLDERS = {"reference": "reference", "numba": "cpu", "triton": "triton"}
_CHOICES = ("auto",) + BACKENDS
_ENV_VAR = "ROIALIGN_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("roialign_backend", default=None)


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, _CHOICES))}; got {name!r}")
    return name


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name == "reference":
        return None
    if name == "numba":
        if device.type != "cpu":
            return f"it runs on CPU tensors only, and the tensors are on {device}"
        if not _has_module("numba"):
            return "numba is not installed (pip install numba)"
        return None
    if name == "triton":
        if not _has_module("triton"):
            return "triton is not installed (it ships with CUDA builds of PyTorch)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), and the tensors are on {device}"
    raise AssertionError(name)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    order = ("triton", "numba", "reference") if device.type == "cuda" else ("numba", "triton", "reference")
    return [name for name in order if _unavailable_reason(name, device) is None]


def current_backend() -> str:
    """The backend name in force: ``use_backend`` first, then ``ROIALIGN_BACKEND``, else ``auto``."""
    name = _forced.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(_ENV_VAR, "auto") or "auto", f"the environment variable {_ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the calls made inside the ``with`` block (in this thread or task).

    Args:
        name: ``"reference"`` (pure PyTorch, any device), ``"numba"`` (CPU), ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"auto"``.

    Raises:
        ValueError: for an unknown name. A known backend that cannot run on the tensors'
            device raises ``RuntimeError`` when the call is made.
    """
    token = _forced.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def select_name(device: torch.device) -> str:
    """The name of the backend that runs on ``device`` under the backend in force."""
    name = current_backend()
    if name == "auto":
        # The Triton interpreter is for testing, never a CPU default.
        fast = "triton" if device.type == "cuda" else "numba"
        name = fast if _unavailable_reason(fast, device) is None else "reference"
    else:
        reason = _unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"roialign backend {name!r} is not available: {reason}")
    return name


def select(device: torch.device, operator: str) -> ModuleType:
    """The kernel module of ``operator`` that runs on ``device`` under the backend in force.

    An operator that the backend has no kernel for yet (see ``NOT_YET``) runs its pure-PyTorch
    kernel, which works on any device."""
    name = select_name(device)
    folder = "reference" if operator in NOT_YET.get(name, ()) else _FOLDERS[name]
    return _kernel_module(folder, operator)


@functools.lru_cache(maxsize=None)
def _kernel_module(folder: str, operator: str) -> ModuleType:
    return importlib.import_module(f"roialign.kernels.{folder}.{operator}")


# Operators a backend has no kernel for yet: they run the pure-PyTorch kernel instead.
NOT_YET: dict[str, frozenset[str]] = {}
