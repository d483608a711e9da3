"""mmcv's RoIAlign signatures (``mmcv.ops.RoIAlign``, ``mmcv.ops.roi_align``, ``mmcv.ops.RoIAlignRotated``
and ``mmcv.ops.roi_align_rotated``) on roialign's kernels.

For mmdetection and other OpenMMLab code: the argument names, order and defaults are mmcv's
(``sampling_ratio=0``, ``aligned=True``, then ``pool_mode`` and ``use_torchvision``), and the
numbers are those of :func:`roialign.roi_align` with the same arguments, whose average mode has
mmcv's semantics. Differences from mmcv:

- ``pool_mode='max'`` is :func:`roialign.roi_align` with ``mode="max"`` (mmcv's reading: the
  largest bilinear sample), except that a bin without samples is 0, not mmcv's sentinel
  (-10000 on the CPU, -FLT_MAX on CUDA), and the boxes get a gradient too.
- ``use_torchvision`` is accepted and ignored: roialign's kernel is always used (mmcv's two
  paths give the same numbers for ``avg``).
- The result is differentiable with respect to ``rois`` as well as ``input`` (mmcv gives no
  box gradient).
- ``mmdeploy`` and other code that checks ``isinstance(layer, mmcv.ops.RoIAlign)`` will not
  recognise :class:`RoIAlign`.
- Rotated: angles in radians, ``clockwise=True`` negates them, ``aligned=False`` is the legacy
  form (no -0.5 shift, sizes raised to one pixel), as in mmcv; unlike mmcv, the boxes (centre,
  size and angle) get a gradient, angles are reduced in float64 before trigonometry, and a
  negative width or height is an error rather than an undefined result.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..api._args import boxes_to_rois, check_scalars, fx_leaf, output_size_pair, refuse_script
from ..api.roi_align import roi_align as _roi_align
from ..api.roi_align_rotated import check_rotation_args
from ..api.roi_align_rotated import roi_align_rotated as _roi_align_rotated

__all__ = ["RoIAlign", "roi_align", "RoIAlignRotated", "roi_align_rotated"]


def _check_pool_mode(pool_mode: object) -> None:
    """Accept ``'avg'`` and ``'max'``; ValueError naming ``pool_mode`` otherwise."""
    if pool_mode in ("avg", "max"):
        return
    raise ValueError(f"pool_mode must be 'avg' or 'max'; got {pool_mode!r}")


def _renamed_keywords(owner: str, **renamed: str) -> Callable[[Callable], Callable]:
    """Let ``fn`` take each deprecated keyword ``old=`` of ``renamed`` as ``renamed[old]=``.

    A deprecated keyword gives a DeprecationWarning; passing it together with its new name (as a
    keyword or positionally) is a TypeError. The wrapped function keeps ``fn``'s signature.
    """
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renamed.items():
                if old not in kwargs:
                    continue
                if new in kwargs or new in signature.bind_partial(*args).arguments:
                    raise TypeError(f"{owner} got both {old!r} (deprecated) and {new!r}; pass only {new!r}")
                warnings.warn(f"{old!r} is deprecated in {owner}; use {new!r} instead",
                              DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


@fx_leaf
def roi_align(input: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float = 1.0,
              sampling_ratio: int = 0, pool_mode: str = "avg", aligned: bool = True) -> Tensor:
    """RoIAlign with ``mmcv.ops.roi_align``'s signature: arguments in mmcv's order and with its defaults.

    Each box is divided into ``output_size`` bins; a bin's value is the average of a regular grid
    of bilinear samples inside it. Same numbers as ``roialign.roi_align(input, rois, output_size,
    spatial_scale, sampling_ratio, aligned)``. One node in ``torch.fx.symbolic_trace`` graphs.

    Args:
        input: features ``[N, C, H, W]``, float16, bfloat16, float32 or float64.
        rois: ``[K, 5]`` tensor of ``(batch index, x1, y1, x2, y2)`` in input-image coordinates.
            (A list of ``N`` per-image ``[L_i, 4]`` tensors is also accepted, as in
            :func:`roialign.roi_align`.)
        output_size: ``(PH, PW)`` of each output, or an int for a square one.
        spatial_scale: factor from box coordinates to feature-map pixels (e.g. ``1 / 16``).
        sampling_ratio: samples per bin along each axis; ``0`` (or any value ``<= 0``) picks
            ``ceil(box size / output size)`` for each box, as in mmcv.
        pool_mode: ``'avg'`` or ``'max'`` (the largest bilinear sample of each bin; a bin
            without samples is 0).
        aligned: if True (the default), shift boxes by -0.5 pixel so that pixel centres sit at
            integer + 0.5; if False, the original Mask R-CNN convention, with boxes at least one
            pixel wide and high.

    Returns:
        ``[K, C, PH, PW]`` of the input's dtype. Unlike mmcv, differentiable with respect to
        ``rois`` as well as ``input``.

    Raises:
        ValueError: for a ``pool_mode`` other than ``'avg'`` and ``'max'``; and, with TypeError and
            IndexError, for the bad arguments :func:`roialign.roi_align` rejects.
    """
    _check_pool_mode(pool_mode)
    rois = boxes_to_rois(rois, name="rois")  # so that a bad list's error names mmcv's argument
    return _roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode=pool_mode)


class RoIAlign(nn.Module):
    """RoIAlign with ``mmcv.ops.RoIAlign``'s signature, for mmdetection's RoI extractors.

    mmdetection builds the layer as ``RoIAlign(spatial_scale=1 / stride, **cfg)`` with ``cfg`` such as
    ``dict(output_size=7, sampling_ratio=0)``, and reads ``.output_size`` as a pair.

    Args:
        output_size: ``(height, width)`` of each output, or an int for a square one; stored as a
            pair of ints in ``.output_size``. mmcv's deprecated keyword ``out_size`` is accepted
            with a DeprecationWarning.
        spatial_scale: factor from box coordinates to feature-map pixels (e.g. ``1 / 16``).
        sampling_ratio: samples per bin along each axis; ``0`` (or any value ``<= 0``) picks
            ``ceil(box size / output size)`` for each box. mmcv's deprecated keyword
            ``sample_num`` is accepted with a DeprecationWarning.
        pool_mode: ``'avg'`` or ``'max'``, as in :func:`roi_align`.
        aligned: if True (the default), shift boxes by -0.5 pixel so that pixel centres sit at
            integer + 0.5; if False, the original Mask R-CNN convention.
        use_torchvision: accepted for compatibility and ignored: roialign's kernel is always
            used, and gives the numbers mmcv gives on either of its paths.

    Shape:
        - input: ``[N, C, H, W]``
        - rois: ``[K, 5]`` of ``(batch index, x1, y1, x2, y2)``
        - output: ``[K, C, height, width]``, differentiable with respect to ``input`` and (unlike
          mmcv) ``rois``.

    Raises:
        TypeError: for a deprecated keyword passed together with its new name, and for arguments
            of the wrong type.
        ValueError: for a ``pool_mode`` other than ``'avg'`` and ``'max'``, and out-of-range values.
    """

    __prepare_scriptable__ = refuse_script

    @_renamed_keywords("RoIAlign", out_size="output_size", sample_num="sampling_ratio")
    def __init__(self, output_size: int | Sequence[int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 pool_mode: str = "avg", aligned: bool = True, use_torchvision: bool = False) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        check_scalars(spatial_scale, sampling_ratio, aligned)
        _check_pool_mode(pool_mode)
        if not isinstance(use_torchvision, bool):
            raise TypeError(f"use_torchvision must be a bool; got {use_torchvision!r}")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Pool ``input`` ``[N, C, H, W]`` at ``rois`` ``[K, 5]``; returns ``[K, C, *output_size]``."""
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.pool_mode, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, pool_mode={self.pool_mode}, "
                f"aligned={self.aligned}, use_torchvision={self.use_torchvision}")


@fx_leaf
def roi_align_rotated(input: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float = 1.0,
                      sampling_ratio: int = 0, aligned: bool = True, clockwise: bool = False) -> Tensor:
    """Rotated RoIAlign with ``mmcv.ops.roi_align_rotated``'s signature: angles in radians.

    Args:
        input: features ``[N, C, H, W]``.
        rois: ``[K, 6]`` of ``(batch index, cx, cy, w, h, angle in radians)``.
        output_size: ``(PH, PW)`` or an int.
        spatial_scale: factor from box coordinates to feature-map pixels.
        sampling_ratio: samples per bin along each box axis; ``<= 0`` adaptive.
        aligned: True: pixel centres at integer + 0.5; False: mmcv's legacy form (no shift,
            width and height raised to at least one pixel).
        clockwise: if True, the angle is negated (mmrotate's configs use it).

    Returns:
        ``[K, C, PH, PW]``; differentiable with respect to ``input`` and (unlike mmcv) ``rois``.
    """
    rois = boxes_to_rois(rois, "cx, cy, w, h, angle", name="rois")
    return _roi_align_rotated(input, rois, output_size, spatial_scale, sampling_ratio, aligned=aligned,
                              clockwise=clockwise, angle_unit="radians")


class RoIAlignRotated(nn.Module):
    """Rotated RoIAlign with ``mmcv.ops.RoIAlignRotated``'s signature, for mmrotate's RoI extractors.

    Args:
        output_size: ``(height, width)`` or an int; stored as a pair in ``.output_size``. mmcv's
            deprecated keyword ``out_size`` is accepted with a DeprecationWarning.
        spatial_scale: factor from box coordinates to feature-map pixels.
        sampling_ratio: samples per bin along each box axis; ``<= 0`` adaptive. mmcv's
            deprecated keyword ``sample_num`` is accepted with a DeprecationWarning.
        aligned: True: pixel centres at integer + 0.5; False: the legacy form.
        clockwise: if True, a positive angle turns the box clockwise on the screen.

    Shape:
        - input: ``[N, C, H, W]``
        - rois: ``[K, 6]`` of ``(batch index, cx, cy, w, h, angle in radians)``
        - output: ``[K, C, height, width]``
    """

    __prepare_scriptable__ = refuse_script

    @_renamed_keywords("RoIAlignRotated", out_size="output_size", sample_num="sampling_ratio")
    def __init__(self, output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int = 0,
                 aligned: bool = True, clockwise: bool = False) -> None:
        super().__init__()
        self.output_size = output_size_pair(output_size)
        check_scalars(spatial_scale, sampling_ratio, aligned)
        check_rotation_args(clockwise, "radians")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned
        self.clockwise = clockwise

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Pool ``input`` ``[N, C, H, W]`` at ``rois`` ``[K, 6]``; returns ``[K, C, *output_size]``."""
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                 self.aligned, self.clockwise)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, clockwise={self.clockwise}")
