"""Argument checks and box formats shared by every operator's public API."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from ..ops.common import check_sampling_ratio

BoxesLike = Tensor | Sequence[Tensor]
F = TypeVar("F", bound=Callable)


def _first_proxy(value: object) -> torch.fx.Proxy | None:
    """The first ``torch.fx.Proxy`` in nested tuples, lists and dicts, or None."""
    if isinstance(value, torch.fx.Proxy):
        return value
    if isinstance(value, (tuple, list)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        return None
    for item in items:
        found = _first_proxy(item)
        if found is not None:
            return found
    return None


def fx_call(fn: Callable, args: tuple, kwargs: dict) -> torch.fx.Proxy | None:
    """Under ``torch.fx.symbolic_trace``, record ``fn(*args, **kwargs)`` as one node and return
    its proxy; otherwise (no proxy among the arguments, or under torch.compile) None."""
    if torch.compiler.is_compiling():  # torch.compile traces the body; FX must not
        return None
    proxy = _first_proxy((args, kwargs))
    if proxy is None:
        return None
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)


def fx_leaf(fn: F) -> F:
    """Make ``fn`` one node in ``torch.fx.symbolic_trace`` graphs, however it is reached.

    ``torch.fx.wrap`` only patches the name in the defining module's globals, so a call through
    another binding (``roialign.roi_align``, a patched ``torchvision.ops.roi_align``) would run
    the body on proxies. Checking for proxies at entry records the call wherever it comes from,
    which torchvision's feature extraction and FX quantization rely on.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        recorded = fx_call(wrapper, args, kwargs)
        return fn(*args, **kwargs) if recorded is None else recorded

    return wrapper  # type: ignore[return-value]


def output_size_pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    """``7`` or ``(7, 7)`` to ``(7, 7)``; ValueError/TypeError naming ``output_size`` otherwise."""
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        pair = (int(output_size), int(output_size))
    elif isinstance(output_size, Sequence) and not isinstance(output_size, str) and len(output_size) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in output_size):
        pair = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"output_size must be an int or a pair of ints (height, width); got {output_size!r}")
    if min(pair) <= 0:
        raise ValueError(f"output_size must be positive; got {output_size!r}")
    if pair[0] * pair[1] > 2**31 - 1:  # beyond, sizes overflowed torch's and the kernels' integers
        raise ValueError(f"output_size must have at most 2**31 - 1 bins (height * width); got {output_size!r}")
    return pair


def check_spatial_scale(spatial_scale: float) -> float:
    """``spatial_scale`` as a float; TypeError/ValueError naming it unless finite and positive.

    The test is comparisons only, so that ``torch.compile`` can trace it when the value is a
    symbol (a float argument or module attribute once it has taken two values, or any with
    ``dynamic=True``): it then guards on the comparisons, and the symbol goes to the operator
    as it is, as torchvision's does."""
    if not isinstance(spatial_scale, (numbers.Real, torch.SymFloat)) or isinstance(spatial_scale, bool):
        raise TypeError(f"spatial_scale must be a float; got {spatial_scale!r}")
    if not 0 < spatial_scale < math.inf:  # False for NaN too
        raise ValueError(f"spatial_scale must be finite and positive; got {spatial_scale!r}")
    return spatial_scale * 1.0 if torch.compiler.is_compiling() else float(spatial_scale)  # a symbol stays one


def check_scalars(spatial_scale: float, sampling_ratio: int, aligned: bool) -> float:
    """TypeError/ValueError naming the argument for a bad ``spatial_scale``, ``sampling_ratio`` or
    ``aligned``; returns ``spatial_scale`` as :func:`check_spatial_scale` does."""
    scale = check_spatial_scale(spatial_scale)
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive sampling); got {sampling_ratio!r}")
    check_sampling_ratio(int(sampling_ratio))
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool; got {aligned!r}")
    return scale


def boxes_to_rois(boxes: BoxesLike, fields: str = "x1, y1, x2, y2", name: str = "boxes") -> Tensor:
    """A ``[K, 1 + F]`` tensor as is, or a list of per-image ``[L_i, F]`` tensors joined into one
    with the image index in front; ``fields`` names the F box columns and ``name`` the argument,
    for error messages."""
    if isinstance(boxes, Tensor):
        return boxes
    width = len(fields.split(","))
    if not isinstance(boxes, Sequence) or isinstance(boxes, str):
        raise TypeError(f"{name} must be a [K, {width + 1}] tensor or a list of [L, {width}] tensors; "
                        f"got {type(boxes).__name__}")
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor of shape [L, {width}]; got {type(b).__name__}")
        if b.dim() != 2 or b.shape[1] != width:
            raise ValueError(f"{name}[{i}] must have shape [L, {width}] ({fields}); got {list(b.shape)}")
        parts.append(torch.cat((torch.full_like(b[:, :1], i), b), dim=1))
    if not parts:
        raise ValueError(f"{name} must not be an empty list: pass one [L, {width}] tensor per image, "
                         f"or a [0, {width + 1}] tensor")
    return torch.cat(parts, dim=0)


def refuse_script(module) -> None:
    """``__prepare_scriptable__`` of roialign's modules: ``torch.jit.script`` calls it first, so a
    model holding one fails with this message instead of a TorchScript parse error deep inside."""
    raise RuntimeError(
        f"{type(module).__module__}.{type(module).__qualname__} cannot be compiled by torch.jit.script: "
        "roialign's op is Python code, which TorchScript cannot hold. To script a torchvision model, "
        "keep torchvision's modules and call roialign.patch_torchvision() (the scripted model then runs "
        "torchvision's kernel); torch.compile and torch.export keep roialign's op.")
