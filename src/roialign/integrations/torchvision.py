"""Make torchvision's detection models and ops run on roialign: ``patch_torchvision()``.

torchvision binds ``roi_align`` by name when its modules are imported: the FPN pooler
(``torchvision.ops.poolers``), the mask-target code of the ROI heads
(``torchvision.models.detection.roi_heads``), ``torchvision.ops.roi_align`` and the module
``torchvision.ops.roi_align`` behind ``RoIAlign``. Each binding is replaced; all of them are
looked up at call time, so existing models switch too. ``RoIAlign`` itself stays torchvision's
class (its ``forward`` calls the module's ``roi_align``), so ``isinstance`` checks hold and
models pickle as torchvision's, patched or not.

The replacement keeps torchvision's signature and defaults (``aligned=False``) and hands inputs
roialign does not handle (quantized tensors) to torchvision's own op.
"""

import importlib
import numbers
import threading
from typing import List, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from ..api._args import fx_call
from ..api.roi_align import roi_align as _roi_align

__all__ = ["patch_torchvision", "unpatch_torchvision", "torchvision_multiscale_base"]

# (module, attribute) pairs that hold torchvision's roi_align function.
_FUNCTION_SITES = (
    ("torchvision.ops", "roi_align"),
    ("torchvision.ops.roi_align", "roi_align"),
    ("torchvision.ops.poolers", "roi_align"),
    ("torchvision.models.detection.roi_heads", "roi_align"),
)

_lock = threading.RLock()
_originals: dict[tuple[str, str], object] = {}  # torchvision's own objects, recorded at the first patch
_replacements: dict[tuple[str, str], object] = {}


def torchvision_multiscale_base() -> type[nn.Module]:
    """``torchvision.ops.MultiScaleRoIAlign`` when torchvision can be imported, else ``nn.Module``."""
    try:
        from torchvision.ops import MultiScaleRoIAlign
    except Exception:  # not installed, or built for another torch (its import then raises RuntimeError)
        return nn.Module
    return MultiScaleRoIAlign


def _import_torchvision():
    try:
        import torchvision
    except ImportError as error:
        raise ImportError("patch_torchvision() needs torchvision (pip install torchvision)") from error
    except Exception as error:
        raise RuntimeError(f"torchvision cannot be imported beside this torch: {error}") from error
    return torchvision


def _modules() -> dict[str, object]:
    """The modules holding the bindings, with a clear error when this torchvision lacks one."""
    torchvision = _import_torchvision()
    found = {}
    for name, attr in _FUNCTION_SITES:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            raise RuntimeError(f"patch_torchvision() does not support torchvision {torchvision.__version__}: "
                               f"{name} cannot be imported ({error})") from error
        if not hasattr(module, attr):
            raise RuntimeError(f"patch_torchvision() does not support torchvision {torchvision.__version__}: "
                               f"{name} has no {attr!r}")
        found[name] = module
    return found


def _rois_for_torchscript(boxes: Union[Tensor, List[Tensor]]) -> Tensor:
    """``boxes_to_rois`` without its argument checks, which TorchScript cannot compile."""
    if isinstance(boxes, Tensor):
        return boxes
    return torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), 1) for i, b in enumerate(boxes)], 0)


# TorchScript compiles this function when a patched model is scripted: inside TorchScript it
# calls torchvision's own kernel (same numbers, and the scripted model can be saved and run
# where torchvision's ops are), since roialign's op is Python. The annotations are for it.
def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision's ``roi_align`` (same signature and defaults), computed by roialign.

    Quantized inputs, which roialign does not handle, and TorchScript go to torchvision's own
    op. See :func:`roialign.roi_align` for the arguments.
    """
    if torch.jit.is_scripting():
        return torch.ops.torchvision.roi_align(input, _rois_for_torchscript(boxes), spatial_scale, output_size[0],
                                               output_size[1], sampling_ratio, aligned)
    else:
        return _eager_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


@torch.jit.unused
def _eager_roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: List[int], spatial_scale: float,
                     sampling_ratio: int, aligned: bool) -> Tensor:
    args = (input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    recorded = fx_call(roi_align, args, {})
    if recorded is not None:
        return recorded
    if isinstance(input, Tensor) and input.is_quantized:
        return _originals[("torchvision.ops.roi_align", "roi_align")](*args)
    return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, _as_bool(aligned))


def _as_bool(aligned):
    """``aligned`` as torchvision's op takes it: a numpy bool or the ints 0 and 1 (from a config) are
    bools there; anything else goes on to roialign's check, which names it."""
    if isinstance(aligned, np.bool_) or (isinstance(aligned, numbers.Integral) and aligned in (0, 1)):
        return bool(aligned)
    return aligned


def _make_replacements() -> None:
    for site in _FUNCTION_SITES:
        _replacements[site] = roi_align


def _state(modules) -> dict[tuple[str, str], object]:
    return {(name, attr): getattr(modules[name], attr) for name, attr in _FUNCTION_SITES}


def _apply(modules, state) -> None:
    for (name, attr), value in state.items():
        setattr(modules[name], attr, value)


class _Patch:
    """Returned by :func:`patch_torchvision`; leaving its ``with`` block restores the state at entry."""

    def __init__(self, modules, previous) -> None:
        self._modules, self._previous = modules, previous

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc_info) -> None:
        with _lock:
            _apply(self._modules, self._previous)

    def __repr__(self) -> str:
        return "<roialign.patch_torchvision: torchvision's roi_align and RoIAlign run on roialign>"


def patch_torchvision() -> _Patch:
    """Make torchvision's ``roi_align``, ``RoIAlign`` and detection models use roialign.

    Works as a plain call (undone by :func:`unpatch_torchvision`) and as a context manager
    (``with roialign.patch_torchvision(): ...``), whose exit restores the bindings as they were
    at entry, so nested blocks work. Patching twice is harmless.

    Models built before or while patched follow the patch: the detectors, ``MultiScaleRoIAlign``
    and ``RoIAlign`` look ``roi_align`` up at call time, so after unpatching they use
    torchvision's op again. ``RoIAlign`` stays torchvision's own class.

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: torchvision cannot be imported beside this torch, or it is a version
            without the names that are patched (the message names the version).
    """
    with _lock:
        modules = _modules()
        previous = _state(modules)
        if not _originals:
            _originals.update(previous)
            _make_replacements()
        _apply(modules, _replacements)
        return _Patch(modules, previous)


def unpatch_torchvision() -> None:
    """Restore torchvision's own ``roi_align`` everywhere (a no-op if never patched)."""
    with _lock:
        if _originals:
            _apply(_modules(), _originals)
