"""torch.onnx.export of roialign: one standard ONNX RoiAlign node, with both exporters, run in onnxruntime.

Every exported model is checked against roialign's eager output on several fresh random inputs,
with a different number of boxes from the one it was exported with. Float32 tolerance: onnxruntime
and roialign compute the same formula in float32 but in a different order (bilinear weights, sum
of the samples, division by their count), so they differ by rounding, a few float32 ulps of the
largest sample (|x| < ~5 here, ulp ~5e-7) summed over at most a few hundred samples per bin; 1e-5
bounds that with a margin while catching any real difference (a half-pixel shift, a missed
sample, a wrong batch index), which moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import roialign
from cases import random_box

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from roialign.integrations import onnx as roialign_onnx  # noqa: E402
from torch.onnx.errors import OnnxExporterError  # noqa: E402

# torch's dynamo exporter needs onnxscript; the TorchScript one only onnx.
needs_onnxscript = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                                      reason="torch.onnx.export(dynamo=True) needs onnxscript")
EXPORTERS = [pytest.param(True, id="dynamo", marks=needs_onnxscript), pytest.param(False, id="torchscript")]
# Every kind of box, inverted ones included (see test_boxes_reversed_along_one_axis_give_zeros).
KINDS = ("inside", "partial", "outside", "empty", "inverted", "point", "large")
HEIGHT, WIDTH = 12, 15


def export(module, args, dynamo, names, dynamic, opset=None, table=None) -> bytes:
    """The ONNX model as bytes; ``dynamic``: {input name: {axis: dimension name}}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if dynamo:
            dims: dict[str, torch.export.Dim] = {}
            shapes = tuple({axis: dims.setdefault(d, torch.export.Dim(d)) for axis, d in dynamic.get(name, {}).items()}
                           for name in names)
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=list(names),
                                        dynamic_shapes=shapes, custom_translation_table=table, verbose=False)
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=list(names),
                          dynamic_axes=dynamic)
        return buffer.getvalue()


def run(model: bytes, *inputs: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def roialign_nodes(model: bytes, count: int = 1) -> tuple[onnx.ModelProto, list[dict]]:
    """The model (checked by onnx, shapes included) and the attributes of its ``count`` RoiAlign nodes."""
    proto = onnx.load_from_string(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, "a node outside the standard domain"
    nodes = [node for node in proto.graph.node if node.op_type == "RoiAlign"]
    assert len(nodes) == count
    decode = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    return proto, [{a.name: decode(onnx.helper.get_attribute_value(a)) for a in node.attribute} for node in nodes]


def expected_attributes(output_size, spatial_scale, sampling_ratio, aligned, half_pixel_attribute=True) -> dict:
    attrs = {"mode": "avg", "output_height": output_size[0], "output_width": output_size[1],
             "sampling_ratio": max(sampling_ratio, 0), "spatial_scale": pytest.approx(spatial_scale, rel=1e-7)}
    if half_pixel_attribute:
        attrs["coordinate_transformation_mode"] = "half_pixel" if aligned else "output_half_pixel"
    return attrs


def opset(proto: onnx.ModelProto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def random_inputs(seed: int, counts: tuple[int, int], spatial_scale: float, dtype=torch.float32):
    """Features [2, 3, H, W] and boxes: ``counts[i]`` boxes of every kind on image i, as [K, 5] rois."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((2, 3, HEIGHT, WIDTH))).to(dtype)
    rows = [[float(i)] + random_box(rng, HEIGHT, WIDTH, spatial_scale, KINDS[int(rng.integers(len(KINDS)))])
            for i, n in enumerate(counts) for _ in range(n)]
    rois = torch.tensor(rows, dtype=dtype).reshape(-1, 5)
    return x, rois[torch.from_numpy(rng.permutation(len(rows)))]


class Functional(torch.nn.Module):
    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned):
        super().__init__()
        self.args = (output_size, spatial_scale, sampling_ratio, aligned)

    def forward(self, x, rois):
        return roialign.roi_align(x, rois, *self.args)


class FunctionalList(Functional):
    """Boxes as a list of per-image [L, 4] tensors."""

    def forward(self, x, boxes0, boxes1):
        return roialign.roi_align(x, [boxes0, boxes1], *self.args)


def list_inputs(x, rois):
    return (x, *(rois[rois[:, 0] == i, 1:].contiguous() for i in range(2)))


# name: (module kind, output_size, spatial_scale, sampling_ratio, aligned, dtype, opset)
VARIANTS = {
    "tensor-aligned-adaptive": ("tensor", (7, 7), 0.25, -1, True, torch.float32, None),
    "list-unaligned-sr2": ("list", (3, 5), 0.5, 2, False, torch.float32, None),
    "module-aligned-sr0-opset16": ("module", (4, 2), 1 / 3, 0, True, torch.float32, 16),
    "tensor-unaligned-float64": ("tensor", (2, 3), 0.125, -1, False, torch.float64, None),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_matches_eager(dynamo, variant):
    kind, output_size, spatial_scale, sampling_ratio, aligned, dtype, opset_version = VARIANTS[variant]
    if kind == "module":
        module = roialign.ROIAlign(output_size, spatial_scale, sampling_ratio, aligned)
    else:
        module = (FunctionalList if kind == "list" else Functional)(output_size, spatial_scale, sampling_ratio, aligned)
    if kind == "list":
        names, dynamic, prepare = ("x", "boxes0", "boxes1"), {"boxes0": {0: "L0"}, "boxes1": {0: "L1"}}, list_inputs
    else:
        names, dynamic, prepare = ("x", "rois"), {"rois": {0: "K"}}, lambda x, rois: (x, rois)
    x, rois = random_inputs(0, (3, 2), spatial_scale, dtype)
    model = export(module, prepare(x, rois), dynamo, names, dynamic, opset=opset_version)

    proto, (attrs,) = roialign_nodes(model)
    assert attrs == expected_attributes(output_size, spatial_scale, sampling_ratio, aligned)
    if opset_version is not None:
        assert opset(proto) == opset_version
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    for seed, counts in ((1, (4, 3)), (2, (1, 5)), (3, (6, 1))):
        inputs = prepare(*random_inputs(seed, counts, spatial_scale, dtype))
        (got,) = run(model, *inputs)
        torch.testing.assert_close(got, module(*inputs), atol=tolerance, rtol=tolerance)


class HalfPrecision(torch.nn.Module):
    """float16 and bfloat16 features (cast inside, since onnxruntime's Python API has no bfloat16)."""

    def forward(self, x, rois):
        return tuple(roialign.roi_align(x.to(dtype), rois, (3, 4), 0.5, 2, aligned).float()
                     for dtype, aligned in ((torch.float16, True), (torch.bfloat16, False)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_half_precision_is_computed_in_float32(dynamo):
    """RoiAlign between Casts: float32 geometry and sums, one rounding, as roialign does; any opset >= 16."""
    module = HalfPrecision()
    model = export(module, random_inputs(0, (3, 2), 0.5), dynamo, ("x", "rois"), {"rois": {0: "K"}})
    proto, attrs = roialign_nodes(model, count=2)
    assert attrs == [expected_attributes((3, 4), 0.5, 2, True), expected_attributes((3, 4), 0.5, 2, False)]
    x, rois = random_inputs(1, (4, 3), 0.5)
    for got, want, dtype in zip(run(model, x, rois), module(x, rois), (torch.float16, torch.bfloat16)):
        # one rounding apart at most: values below 4 in magnitude, 1 ulp at 4 is 4 * eps
        torch.testing.assert_close(got, want, atol=4 * torch.finfo(dtype).eps, rtol=0)


def test_torchscript_old_opsets():
    """Opset 10-15: aligned=False exports RoiAlign-10 (no coordinate_transformation_mode), aligned=True raises."""
    module = Functional((3, 4), 0.5, -1, False)
    x, rois = random_inputs(0, (3, 2), 0.5)
    model = export(module, (x, rois), False, ("x", "rois"), {"rois": {0: "K"}}, opset=11)
    proto, (attrs,) = roialign_nodes(model)
    assert opset(proto) == 11
    assert attrs == expected_attributes((3, 4), 0.5, -1, False, half_pixel_attribute=False)
    x, rois = random_inputs(1, (4, 3), 0.5)
    torch.testing.assert_close(run(model, x, rois)[0], module(x, rois), atol=1e-5, rtol=1e-5)

    with pytest.raises(OnnxExporterError, match=r"aligned=True\) needs ONNX opset >= 16"):
        export(Functional((3, 4), 0.5, -1, True), (x, rois), False, ("x", "rois"), {}, opset=15)
    with pytest.raises(OnnxExporterError, match="RoiAlign needs ONNX opset >= 10"):
        export(module, (x, rois), False, ("x", "rois"), {}, opset=9)


@needs_onnxscript
def test_dynamo_old_opset_keeps_a_correct_model():
    """The dynamo exporter builds at opset >= 18 and cannot convert RoiAlign below 16: it keeps opset 18.

    Should torch ever convert it down, aligned=True must then fail, not export wrong numbers.
    """
    module = Functional((3, 4), 0.5, -1, True)
    x, rois = random_inputs(0, (3, 2), 0.5)
    try:
        model = export(module, (x, rois), True, ("x", "rois"), {}, opset=15)
    except OnnxExporterError as error:
        assert "opset" in str(error)
        return
    proto, (attrs,) = roialign_nodes(model)
    assert opset(proto) >= 16
    assert attrs == expected_attributes((3, 4), 0.5, -1, True)
    torch.testing.assert_close(run(model, x, rois)[0], module(x, rois), atol=1e-5, rtol=1e-5)


class DirectOp(torch.nn.Module):
    def forward(self, x, rois):
        return torch.ops.roialign.roi_align(x, rois, 0.5, 3, 4, 0, True)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_direct_op_calls(dynamo):
    """torch.ops.roialign.roi_align: the translation table (dynamo) or the registered symbolic (TorchScript)."""
    table = roialign.onnx_translation_table() if dynamo else None
    if dynamo:
        assert list(table) == [getattr(torch.ops.roialign, name).default for name in (
            "roi_align", "roi_align_max", "multiscale_roi_align", "roi_align_rotated", "prroi_pool")]
    else:
        roialign_onnx.register_legacy_symbolic()
    module = DirectOp()
    model = export(module, random_inputs(0, (3, 2), 0.5), dynamo, ("x", "rois"), {"rois": {0: "K"}}, table=table)
    _, (attrs,) = roialign_nodes(model)
    assert attrs == expected_attributes((3, 4), 0.5, 0, True)
    x, rois = random_inputs(1, (2, 5), 0.5)
    torch.testing.assert_close(run(model, x, rois)[0], module(x, rois), atol=1e-5, rtol=1e-5)


def test_import_stays_light():
    code = "import sys, roialign; print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_patched_torchvision_detector():
    """A patched Faster R-CNN exports with the TorchScript exporter (torchvision's own choice for its
    detectors: torch.export fails in torchvision's batched_nms on a data-dependent shape) and detects
    the same objects in onnxruntime."""
    if not hasattr(roialign, "patch_torchvision"):
        pytest.skip("roialign.patch_torchvision does not exist yet")
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    with roialign.patch_torchvision():
        model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
        # Random weights: let batch norm see one batch, or the activations vanish through the
        # backbone; then small heads, so that scores spread out instead of tying or saturating.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        with torch.no_grad():
            model.backbone.train()(torch.rand(2, 3, 320, 320))
        model.eval()
        for weight in (model.rpn.head.cls_logits.weight, model.rpn.head.bbox_pred.weight,
                       model.roi_heads.box_predictor.bbox_pred.weight, model.roi_heads.box_predictor.cls_score.weight):
            torch.nn.init.normal_(weight, std=1e-3)
        image = torch.rand(3, 320, 320)
        with torch.no_grad():
            want = model([image])[0]
        assert len(want["scores"]) > 10
        onnx_model = export(model, ([image],), False, ("image",), {})
    proto, attrs = roialign_nodes(onnx_model, count=2)  # one per pyramid level
    assert all(a["coordinate_transformation_mode"] == "output_half_pixel" for a in attrs)
    boxes, labels, scores = run(onnx_model, image)
    assert torch.equal(labels, want["labels"])
    # Beyond RoIAlign, onnxruntime's and PyTorch's convolutions round differently.
    torch.testing.assert_close(boxes, want["boxes"], atol=0.5, rtol=0)
    torch.testing.assert_close(scores, want["scores"], atol=5e-3, rtol=0)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_multiscale_pooler_exports_one_roialign_per_level(dynamo):
    from collections import OrderedDict

    names = ["p2", "p3", "p4", "p5"]
    shapes = [(128, 160)]

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = roialign.MultiScaleRoIAlign(names, (4, 3), 2)

        def forward(self, p2, p3, p4, p5, boxes):
            return self.pool(OrderedDict(zip(names, (p2, p3, p4, p5))), [boxes], shapes)

    def inputs(count, seed):
        gen = torch.Generator().manual_seed(seed)
        features = [torch.randn(1, 3, 128 // s, 160 // s, generator=gen) for s in (4, 8, 16, 32)]
        side = torch.exp(torch.rand(count, 2, generator=gen) * 5.5)  # 1 to 245 pixels: every level
        start = torch.rand(count, 2, generator=gen) * torch.tensor([140.0, 110.0])
        return (*features, torch.cat((start, start + side), 1))

    head = Head()
    model = export(head, inputs(20, 0), dynamo, ["p2", "p3", "p4", "p5", "boxes"], {"boxes": {0: "boxes"}})
    roialign_nodes(model, count=4)
    for count, seed in ((20, 1), (37, 2), (3, 3)):
        args = inputs(count, seed)
        torch.testing.assert_close(run(model, *args)[0], head(*args), atol=1e-5, rtol=0)


class Pooler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = roialign.MultiScaleRoIAlign(["p3", "p4"], 3, 2)

    def forward(self, p3, p4, boxes):
        return self.pool({"p3": p3, "p4": p4}, [boxes], [(64, 80)])


@needs_onnxscript
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_dynamo_exporter_converts_exported_programs_with_the_translation_table(strict):
    """torch.export.export keeps roialign's ops opaque (it is not an ONNX export, or, strict,
    TorchDynamo cannot trace the node recording); the table translates each of them."""
    table = roialign.onnx_translation_table()
    gen = torch.Generator().manual_seed(0)
    features = (torch.randn(1, 2, 8, 10, generator=gen), torch.randn(1, 2, 4, 5, generator=gen))
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 60, 50], [30, 5, 3, 40], [2, 3, 30, 20]])  # third: no level
    x, rois = random_inputs(2, (3, 2), 0.5)
    for module, args in ((Pooler(), (*features, boxes)), (DirectOp(), (x, rois)), (Functional(3, 0.5, 0, True), (x, rois))):
        program = torch.export.export(module, args, strict=strict)
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert any(target.startswith("roialign.") for target in targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.onnx.export(program, args, dynamo=True, custom_translation_table=table, verbose=False)
        model = model.model_proto.SerializeToString()
        roialign_nodes(model, count=2 if isinstance(module, Pooler) else 1)
        want = module(*args)
        if isinstance(module, Pooler):
            assert torch.equal(want[2], torch.zeros_like(want[2])) and want.abs().sum() > 0
        torch.testing.assert_close(run(model, *args)[0], want, atol=1e-5, rtol=0)


@needs_onnxscript
def test_dynamo_exporter_refusals_hold_in_exported_programs_and_strict_captures():
    table = roialign.onnx_translation_table()
    x = torch.randn(1, 2, 8, 8)

    class Rotated(torch.nn.Module):
        def forward(self, x, rois):
            return roialign.roi_align_rotated(x, rois, 2, 1.0, 2)

    class Precise(torch.nn.Module):
        def forward(self, x, rois):
            return roialign.prroi_pool(x, rois, 2)

    cases = ((Rotated(), torch.tensor([[0, 4.0, 4, 3, 2, 30]]), "no rotated RoiAlign"),
             (Precise(), torch.tensor([[0, 1.0, 1, 6, 6]]), "no ONNX equivalent: ONNX.s RoiAlign samples"))
    for module, rois, message in cases:
        program = torch.export.export(module, (x, rois), strict=True)
        with pytest.raises(Exception, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(program, (x, rois), dynamo=True, custom_translation_table=table, verbose=False)
        with pytest.raises(Exception, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x, rois), dynamo=True, verbose=False)


class MaxFunctional(Functional):
    def forward(self, x, rois):
        return roialign.roi_align(x, rois, *self.args, mode="onnx_max")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_boxes_reversed_along_one_axis_give_zeros(dynamo):
    """With aligned=True and adaptive sampling, a box reversed along one axis has no samples
    (zeros in roialign and torchvision), and onnxruntime's RoiAlign fails on it ("Integer
    overflow"); the export hands it an empty box, which gives the same zeros."""
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5))
    rois = torch.tensor([[0, 14.0, 2, 1, 9], [1, 1, 9, 14, 2], [0, 14, 9, 1, 2], [1, 3, 2, 2.9, 9],
                         [0, 1, 2, 9, 8], [1, 0.5, 0.5, 12, 10]])
    if not dynamo:
        roialign_onnx.register_legacy_symbolic()  # for DirectOp
    for module in (Functional((3, 4), 0.7, 0, True), MaxFunctional((3, 4), 0.7, -1, True), DirectOp()):
        table = roialign.onnx_translation_table() if dynamo else None
        model = export(module, (x, rois), dynamo, ("x", "rois"), {"rois": {0: "K"}}, table=table)
        want = module(x, rois)
        assert torch.equal(want[:4], torch.zeros_like(want[:4])) and bool((want[4:] != 0).all())
        torch.testing.assert_close(run(model, x, rois)[0], want, atol=1e-5, rtol=0)
        (got,) = run(model, x, rois.flip(0))  # and with the box count it was not exported with
        torch.testing.assert_close(got, module(x, rois.flip(0)), atol=1e-5, rtol=0)
