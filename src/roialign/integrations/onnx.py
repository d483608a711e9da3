"""ONNX export: ``roi_align`` becomes one standard ONNX ``RoiAlign`` node, with either exporter.

* ``torch.onnx.export(..., dynamo=True)`` (the default): ``roialign.roi_align`` (and so
  ``ROIAlign``) sees ``torch.onnx.is_in_onnx_export()`` and records the node itself with
  ``torch.onnx.ops.symbolic``; torch.export keeps a custom op opaque, so the switch has to be in
  the Python functional. Where the operators reach the exporter as they are (a model that calls
  ``torch.ops.roialign.*`` directly, an ``ExportedProgram``, a strict capture) pass
  ``custom_translation_table=onnx_translation_table()``.
* ``torch.onnx.export(..., dynamo=False)`` (TorchScript): the trace keeps the op
  ``roialign::roi_align`` and a symbolic registered for it emits the node. The functional
  registers it on its first call under export; call :func:`register_legacy_symbolic` yourself
  for a model that calls ``torch.ops.roialign.roi_align`` directly.

The node: ``RoiAlign(X, rois[:, 1:5], int64(rois[:, 0]))`` with ``mode="avg"``,
``output_height``/``output_width``, ``spatial_scale``, ``sampling_ratio`` (``<= 0``, adaptive,
becomes 0) and ``coordinate_transformation_mode`` ``"half_pixel"`` (``aligned=True``) or
``"output_half_pixel"`` (``aligned=False``, the Mask R-CNN convention).

Opsets: the attribute ``coordinate_transformation_mode`` arrived with RoiAlign-16; RoiAlign-10
always behaves as ``"output_half_pixel"``. So with an opset in 10..15 ``aligned=False`` exports
RoiAlign-10 and ``aligned=True`` raises (RoiAlign-10 cannot express it). The TorchScript exporter
knows the opset when it runs the symbolic, so it applies this rule. The dynamo exporter does not
tell a traced function its opset: it builds the graph at opset ``max(18, opset_version)`` and
down-converts afterwards; ONNX's converter has no RoiAlign 16 -> 15 adapter, so for
``opset_version < 16`` torch logs a warning and keeps opset 18 (the model stays correct).

Half precision: roialign computes float16 and bfloat16 in float32 (boxes included) and rounds
once. RoiAlign requires the boxes in the input's type (float16 boxes would move corners) and
accepts bfloat16 only from RoiAlign-22, past the TorchScript exporter's last opset (20). Both
exporters therefore emit ``Cast(float32) -> RoiAlign -> Cast(back)`` for float16 and bfloat16
inputs, which computes what the eager kernels compute, at any opset >= 16 (>= 13 for bfloat16
with ``aligned=False``, whose Cast needs it).

Nothing here imports onnx or onnxscript at module level: ``import roialign`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..kernels.reference.common import compute_dtype

__all__ = ["exporting", "onnx_translation_table", "records_nodes", "register_legacy_symbolic", "roi_align_attributes"]

try:  # the dynamo exporter's flag (private; absent in some torch release: then only the public check)
    from torch.onnx._internal.exporter import _flags as _dynamo_export_flags
except Exception:  # pragma: no cover
    _dynamo_export_flags = None


def exporting() -> bool:
    """Whether ``torch.onnx.export`` is running, with either exporter.

    ``torch.onnx.is_in_onnx_export()`` says so, except inside a strict ``torch.export`` trace:
    TorchDynamo folds that call to False. The dynamo exporter falls back to a strict trace when
    its first, non-strict one fails; reading its flag as a module attribute keeps the answer
    true there, so that a refusal (rotated, ``mode="max"``, PrRoIPool) still says why. The
    operators that do export stay opaque in such a trace (see :func:`records_nodes`)."""
    return torch.onnx.is_in_onnx_export() or bool(getattr(_dynamo_export_flags, "_is_onnx_exporting", False))


def records_nodes() -> bool:
    """Whether our functionals should record ONNX nodes themselves: under export, except inside a
    TorchDynamo trace, which cannot trace ``torch.onnx.ops.symbolic``; there the operators stay
    opaque and :func:`onnx_translation_table` translates them."""
    return exporting() and not torch.compiler.is_dynamo_compiling()

_OP_NAME = "roialign::roi_align"
# First opset with RoiAlign; first with coordinate_transformation_mode; first Cast to or from bfloat16.
ROI_ALIGN_OPSET = 10
HALF_PIXEL_OPSET = 16
BFLOAT16_CAST_OPSET = 13

# ONNX TensorProto data types.
_FLOAT, _FLOAT16, _DOUBLE, _BFLOAT16, _INT64 = 1, 10, 11, 16, 7
_LEGACY_TYPES = {"Float": _FLOAT, "Half": _FLOAT16, "Double": _DOUBLE, "BFloat16": _BFLOAT16}


def roi_align_attributes(spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
                         aligned: bool, opset: int | None = None, mode: str = "avg") -> dict[str, Any]:
    """The ONNX ``RoiAlign`` attributes for roialign's arguments at ``opset`` (None: 16 or later);
    ``mode`` is ONNX's (``"avg"``, or ``"max"`` for roialign's ``mode="onnx_max"``).

    Raises ``torch.onnx.errors.OnnxExporterError`` where the opset cannot express the op.
    """
    attrs: dict[str, Any] = {
        "mode": mode,
        "output_height": int(pooled_height),
        "output_width": int(pooled_width),
        "sampling_ratio": max(int(sampling_ratio), 0),
        "spatial_scale": float(spatial_scale),
    }
    if opset is not None and opset < ROI_ALIGN_OPSET:
        _fail(f"RoiAlign needs ONNX opset >= {ROI_ALIGN_OPSET}; got opset_version={opset}")
    if opset is None or opset >= HALF_PIXEL_OPSET:
        attrs["coordinate_transformation_mode"] = "half_pixel" if aligned else "output_half_pixel"
    elif aligned:
        _fail(f"roi_align(aligned=True) needs ONNX opset >= {HALF_PIXEL_OPSET} (RoiAlign-16's "
              f"coordinate_transformation_mode='half_pixel'); RoiAlign-{ROI_ALIGN_OPSET} in opset_version={opset} "
              f"only has the aligned=False convention. Export with opset_version >= {HALF_PIXEL_OPSET}.")
    return attrs


_MMCV_MAX_MESSAGE = ("roi_align(mode='max') (mmcv's maximum of bilinear samples) has no ONNX equivalent: ONNX "
                     "RoiAlign(mode='max') takes the maximum of each sample's weighted corner terms, which gives other "
                     "numbers. Use mode='onnx_max' for ONNX's reading.")


def refuse_prroi_export() -> None:
    """PrRoIPool does not export: ONNX has no exact bin integral."""
    _fail("roialign.prroi_pool has no ONNX equivalent: ONNX's RoiAlign samples bins at points, "
          "PrRoIPool integrates over them (export the model with roi_align instead, or keep this step in PyTorch)")


def refuse_rotated_export() -> None:
    """Rotated RoIAlign does not export: ONNX's RoiAlign takes axis-aligned boxes only."""
    _fail("roialign.roi_align_rotated cannot be exported to ONNX: the ONNX standard has no rotated RoiAlign "
          "(RoiAlign takes axis-aligned boxes only). Keep the rotated pooling outside the exported graph, or "
          "export with a custom op of your runtime.")


def refuse_max_export() -> None:
    """``mode="max"`` does not export: ONNX's max is another function."""
    _fail(_MMCV_MAX_MESSAGE)


def _zeroes_reversed_boxes(sampling_ratio: int, aligned: bool) -> bool:
    """Whether the export replaces boxes reversed along an axis (x2 < x1 or y2 < y1) by zeros.

    With ``aligned=True`` and adaptive sampling such a box has no samples along that axis, so
    roialign (and torchvision) give it zeros; onnxruntime sizes its sample table from the
    negative count and fails ("Integer overflow") when one axis only is reversed. An all-zero
    box has no samples either, so the exported model gives the same zeros."""
    return aligned and sampling_ratio <= 0


def _fail(message: str):
    from torch.onnx.errors import OnnxExporterError

    raise OnnxExporterError(message)


# --- Called by roialign.roi_align while torch.onnx.export runs ---------------------------------


def export_roi_align(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     sampling_ratio: int, aligned: bool, mode: str = "avg") -> Tensor:
    """What ``roi_align`` does under ``torch.onnx.export``, for the exporter that is running
    (``mode``: ONNX's, ``"avg"`` or ``"max"``)."""
    from ..ops import roi_align as op
    from ..ops import roi_align_max as max_op

    if torch.jit.is_tracing():
        # TorchScript exporter: trace the op as usual; the registered symbolic emits RoiAlign.
        register_legacy_symbolic()
        if mode == "max":
            return max_op.roi_align_max(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                        aligned, True)
        return op.roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    # The dynamo exporter (torch.export, then translation): record the ONNX node directly.
    op._check_tensors(input, rois, pooled_height, pooled_width, sampling_ratio)
    compute = compute_dtype(input.dtype)
    x = input.to(compute)
    boxes = rois[:, 1:5].to(compute)
    if _zeroes_reversed_boxes(sampling_ratio, aligned):
        reversed_ = (boxes[:, 2:3] < boxes[:, 0:1]) | (boxes[:, 3:4] < boxes[:, 1:2])
        boxes = torch.where(reversed_, torch.zeros((), dtype=compute), boxes)
    out = torch.onnx.ops.symbolic(
        "RoiAlign",
        (x, boxes, rois[:, 0].to(torch.int64)),
        roi_align_attributes(spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode=mode),
        dtype=compute,
        shape=(rois.shape[0], input.shape[1], pooled_height, pooled_width),
    )
    return out.to(input.dtype)


# --- TorchScript exporter (dynamo=False) --------------------------------------------------------

_legacy_registered = False


def register_legacy_symbolic() -> None:
    """Teach ``torch.onnx.export(..., dynamo=False)`` to export ``torch.ops.roialign.roi_align``.

    Idempotent. ``roialign.roi_align`` calls it by itself during export; call it once before
    exporting a model that calls ``torch.ops.roialign.roi_align`` directly.
    """
    global _legacy_registered
    if _legacy_registered:
        return
    from torch.onnx import register_custom_op_symbolic

    # Registered from opset 7, the oldest the exporter knows, so that opsets without RoiAlign
    # get our error message rather than "unrecognized namespace".
    register_custom_op_symbolic(_OP_NAME, _legacy_symbolic, 7)
    register_custom_op_symbolic("roialign::roi_align_max", _legacy_symbolic_max, 7)
    _legacy_registered = True


def _legacy_symbolic_max(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, onnx):
    from torch.onnx.symbolic_helper import _maybe_get_const

    if not bool(_maybe_get_const(onnx, "b")):
        _fail(_MMCV_MAX_MESSAGE)
    return _legacy_symbolic(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                            mode="max")


def _legacy_symbolic(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                     mode="avg"):
    from torch.onnx.symbolic_helper import _maybe_get_const

    opset = g.opset
    spatial_scale = float(_maybe_get_const(spatial_scale, "f"))
    pooled_height, pooled_width, sampling_ratio = (
        int(_maybe_get_const(v, "i")) for v in (pooled_height, pooled_width, sampling_ratio))
    aligned = bool(_maybe_get_const(aligned, "b"))
    attrs = roi_align_attributes(spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, opset, mode)

    in_type = _LEGACY_TYPES.get(_scalar_type(input))
    compute = _DOUBLE if in_type == _DOUBLE else _FLOAT
    if in_type == _BFLOAT16 and opset < BFLOAT16_CAST_OPSET:
        _fail(f"roi_align on bfloat16 input needs ONNX opset >= {BFLOAT16_CAST_OPSET} (Cast from bfloat16); "
              f"got opset_version={opset}")
    x = input if in_type == compute else g.op("Cast", input, to_i=compute)
    if _LEGACY_TYPES.get(_scalar_type(rois)) != compute:
        rois = g.op("Cast", rois, to_i=compute)
    boxes = g.op("Gather", rois, g.op("Constant", value_t=torch.tensor([1, 2, 3, 4])), axis_i=1)
    if _zeroes_reversed_boxes(sampling_ratio, aligned):
        column = lambda i: g.op("Slice", boxes, *(g.op("Constant", value_t=torch.tensor([v])) for v in (i, i + 1, 1)))  # noqa: E731
        reversed_ = g.op("Or", g.op("Less", column(2), column(0)), g.op("Less", column(3), column(1)))
        zero = g.op("Constant", value_t=torch.zeros((), dtype=torch.float64 if compute == _DOUBLE else torch.float32))
        boxes = g.op("Where", reversed_, zero, boxes)
    batch = g.op("Cast", g.op("Gather", rois, g.op("Constant", value_t=torch.tensor(0)), axis_i=1), to_i=_INT64)
    out = g.op("RoiAlign", x, boxes, batch, **{_legacy_key(k, v): v for k, v in attrs.items()})
    return out if in_type in (None, compute) else g.op("Cast", out, to_i=in_type)


def _scalar_type(value) -> str | None:
    try:
        return value.type().scalarType()
    except RuntimeError:  # not a complete tensor type
        return None


def _legacy_key(name: str, value: Any) -> str:
    """``g.op`` takes attributes as ``name_<kind>``."""
    return name + {int: "_i", float: "_f", str: "_s"}[type(value)]


# --- Dynamo exporter, direct calls of the op (dynamo=True) ---------------------------------------


def onnx_translation_table() -> dict[Callable, Callable]:
    """ONNX Script translations of roialign's operators for the dynamo exporter: ``roi_align``,
    ``roi_align_max`` (``onnx=True``) and ``multiscale_roi_align`` become ``RoiAlign`` nodes;
    rotated RoIAlign, ``mode="max"`` and PrRoIPool are refused with the reason.

    Needed where the operators reach the exporter as they are: a model that calls
    ``torch.ops.roialign.*`` directly, an ``ExportedProgram`` made by ``torch.export.export``
    (pass it to ``torch.onnx.export``), or a model the exporter can only capture with a strict
    trace. The functionals, modules and pooler need nothing otherwise::

        torch.onnx.export(model, args, dynamo=True, custom_translation_table=roialign.onnx_translation_table())
    """
    return {torch.ops.roialign.roi_align.default: _roi_align_onnxscript,
            torch.ops.roialign.roi_align_max.default: _roi_align_max_onnxscript,
            torch.ops.roialign.multiscale_roi_align.default: _multiscale_roi_align_onnxscript,
            torch.ops.roialign.roi_align_rotated.default: _refuse_rotated_onnxscript,
            torch.ops.roialign.prroi_pool.default: _refuse_prroi_onnxscript}


def _refuse_rotated_onnxscript(*args, **kwargs):
    refuse_rotated_export()


def _refuse_prroi_onnxscript(*args, **kwargs):
    refuse_prroi_export()


def _multiscale_roi_align_onnxscript(features, rois, levels, scales, pooled_height: int, pooled_width: int,
                                     sampling_ratio: int, aligned: bool):
    """ONNX Script translation of ``torch.ops.roialign.multiscale_roi_align``: one ``RoiAlign`` per
    level on that level's boxes, scattered into a zero result (a box of level -1 stays zero), as
    the pooler records it under export."""
    from onnxscript import opset18 as op

    first = features[0]
    out_type = int(first.dtype) if first.dtype is not None else None
    shape = op.Concat(op.Shape(rois, start=0, end=1), op.Shape(first, start=1, end=2),
                      op.Constant(value_ints=[int(pooled_height), int(pooled_width)]), axis=0)
    result = op.ConstantOfShape(shape, value=_zero_tensor(out_type))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = op.NonZero(op.Equal(levels, op.Constant(value_int=level)))  # [1, M]
        pooled = _roi_align_onnxscript(feature, op.Gather(rois, op.Squeeze(index, op.Constant(value_ints=[0])), axis=0),
                                       float(scale), pooled_height, pooled_width, sampling_ratio, aligned)
        level_type = int(feature.dtype) if feature.dtype is not None else None
        if level_type != out_type and out_type is not None:
            pooled = op.Cast(pooled, to=out_type)
        result = op.ScatterND(result, op.Transpose(index, perm=[1, 0]), pooled)
    return result


def _zero_tensor(onnx_type: int | None):
    """A one-element zero ``onnx.TensorProto`` of ``onnx_type`` (float32 when unknown)."""
    import onnx

    return onnx.helper.make_tensor("zero", onnx_type or _FLOAT, [1], [0])


def _roi_align_max_onnxscript(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int,
                              sampling_ratio: int, aligned: bool, onnx: bool):
    """ONNX Script translation of ``torch.ops.roialign.roi_align_max``: only ONNX's own reading exports."""
    if not onnx:
        _fail(_MMCV_MAX_MESSAGE)
    return _roi_align_onnxscript(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                 mode="max")


def _roi_align_onnxscript(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int,
                          sampling_ratio: int, aligned: bool, mode: str = "avg"):
    """ONNX Script translation of ``torch.ops.roialign.roi_align`` (traced by the exporter, at opset >= 18)."""
    from onnxscript import opset18 as op

    in_type = int(input.dtype) if input.dtype is not None else None
    compute = _DOUBLE if in_type == _DOUBLE else _FLOAT
    x = input if in_type == compute else op.Cast(input, to=compute)
    rois = rois if rois.dtype is not None and int(rois.dtype) == compute else op.Cast(rois, to=compute)
    boxes = op.Gather(rois, op.Constant(value_ints=[1, 2, 3, 4]), axis=1)
    if _zeroes_reversed_boxes(sampling_ratio, aligned):
        column = lambda i: op.Slice(boxes, *(op.Constant(value_ints=[v]) for v in (i, i + 1, 1)))  # noqa: E731
        reversed_ = op.Or(op.Less(column(2), column(0)), op.Less(column(3), column(1)))
        boxes = op.Where(reversed_, op.CastLike(op.Constant(value_float=0.0), boxes), boxes)
    batch = op.Cast(op.Gather(rois, op.Constant(value_int=0), axis=1), to=_INT64)
    out = op.RoiAlign(x, boxes, batch,
                      **roi_align_attributes(spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                                             mode=mode))
    return out if in_type in (None, compute) else op.Cast(out, to=in_type)
