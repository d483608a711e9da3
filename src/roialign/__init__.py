"""roialign: exact, fast and portable RoIAlign for PyTorch.

``roi_align`` (torchvision's signature) and ``ROIAlign`` (the seed's and detectron2's module)
call one custom operator, ``torch.ops.roialign.roi_align``, whose kernel is chosen per device:
pure PyTorch (any device), Numba (CPU) or Triton (CUDA). ``roi_align_rotated`` and
``ROIAlignRotated`` do the same for rotated boxes (``torch.ops.roialign.roi_align_rotated``),
``prroi_pool`` and ``PrRoIPool`` for Precise RoI Pooling (``torch.ops.roialign.prroi_pool``).
"""

from . import ops  # noqa: F401  (registers torch.ops.roialign.*)
from ._backend import available_backends, current_backend, use_backend
from .api.prroi_pool import PrRoIPool, prroi_pool
from .api.roi_align import ROIAlign, roi_align
from .api.roi_align_rotated import ROIAlignRotated, roi_align_rotated
from .integrations.onnx import onnx_translation_table
from .integrations.torchvision import patch_torchvision, unpatch_torchvision

__version__ = "0.1.0"

__all__ = ["ROIAlign", "roi_align", "ROIAlignRotated", "roi_align_rotated", "PrRoIPool", "prroi_pool", "MultiScaleRoIAlign", "assign_levels", "patch_torchvision", "unpatch_torchvision",
           "onnx_translation_table", "use_backend", "available_backends", "current_backend", "warmup", "__version__"]

# The pooler subclasses torchvision's when torchvision is importable: it is imported on first use,
# so that ``import roialign`` does not import torchvision.
_LAZY = {"MultiScaleRoIAlign": ".api.poolers", "assign_levels": ".api.poolers"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'roialign' has no attribute {name!r}")


def warmup() -> None:
    """Compile the CPU kernels now (or load them from Numba's on-disk cache) instead of on first use,
    and time the orders of the NCHW <-> channels-last copies on this host to keep the fastest, per
    element size, for maps whose channel planes are a multiple of 4 KiB apart and for the others
    (about 1 s; all give the same bytes, so no result depends on the choice)."""
    import torch

    from .kernels.cpu import common as cpu_common
    from .kernels.cpu import layout as cpu_layout
    from .kernels.cpu import roi_align as cpu_roi_align
    from .kernels.cpu import roi_align_max as cpu_roi_align_max
    from .kernels.cpu import prroi_pool as cpu_prroi_pool
    from .kernels.cpu import roi_align_rotated as cpu_roi_align_rotated
    from .ops.common import check_batch_index

    for dtype in (torch.float32, torch.float64):  # every operator's batch-index check
        check_batch_index(torch.zeros(1, 5, dtype=dtype), 1)
    cpu_roi_align.warmup()
    cpu_roi_align_rotated.warmup()
    cpu_roi_align_max.warmup()
    cpu_prroi_pool.warmup()
    cpu_common.warm_channel_runs()
    cpu_layout.tune_layout_copies()
