"""``assign_levels`` and ``MultiScaleRoIAlign`` against torchvision's pooler, and on their own terms."""

import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign as TorchvisionPooler
from torchvision.ops.poolers import LevelMapper

import roialign

NAMES = ["p2", "p3", "p4", "p5"]


def pyramid(image_shapes, channels=4, dtype=torch.float32, seed=0, names=NAMES, first_stride=4):
    """Random FPN features sized like a padded batch of ``image_shapes`` (strides 4, 8, 16, 32)."""
    gen = torch.Generator().manual_seed(seed)
    height = -(-max(h for h, w in image_shapes) // 32) * 32
    width = -(-max(w for h, w in image_shapes) // 32) * 32
    return OrderedDict((name, torch.randn(len(image_shapes), channels, height // (first_stride << i),
                                          width // (first_stride << i), generator=gen, dtype=dtype))
                       for i, name in enumerate(names))


def random_boxes(count, image_shape, seed, dtype=torch.float32):
    """Boxes of every size from a pixel to the whole image, some partly outside it."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_shape
    side = torch.exp(torch.rand(count, 2, generator=gen, dtype=torch.float64) * torch.log(torch.tensor(1.2 * max(h, w))))
    start = torch.rand(count, 2, generator=gen, dtype=torch.float64) * torch.tensor([w, h]) - 0.1 * side
    return torch.cat((start, start + side), 1).to(dtype)


def boundary_boxes(dtype=torch.float32):
    """Boxes whose side is exactly 224 * 2^k: each sits on a level boundary of the torchvision rule."""
    sides = torch.tensor([28.0, 56, 112, 224, 448, 896], dtype=torch.float64)
    return torch.stack((torch.full_like(sides, 3), torch.full_like(sides, 5), 3 + sides, 5 + sides), 1).to(dtype)


# ------------------------------------------------------------------------------------------------
# assign_levels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchvision_convention_matches_torchvision_level_mapper(dtype):
    boxes = [random_boxes(300, (800, 1000), seed=1, dtype=dtype), boundary_boxes(dtype)]
    for k_min, k_max in [(2, 5), (3, 6), (2, 2)]:
        want = LevelMapper(k_min, k_max)(boxes)
        got = roialign.assign_levels(boxes, k_min, k_max)
        assert torch.equal(got, want)
    assert len(set(roialign.assign_levels(boxes, 2, 5).tolist())) == 4  # every level is used


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_boxes_get_the_levels_of_their_float32_values_as_in_torchvision_and_detectron2(dtype):
    # A detector's proposals are half under autocast. torchvision's box_area upcasts them and
    # detectron2's Boxes hold float32; in the half dtype itself some boxes moved a level, and a
    # float16 area overflows past 256 x 256 pixels (a 300 x 300 box went to the coarsest level).
    boxes = [random_boxes(2000, (800, 1000), seed=3, dtype=dtype), boundary_boxes(dtype),
             torch.tensor([[0.0, 0.0, 300.0, 300.0]], dtype=dtype)]
    assert torch.equal(roialign.assign_levels(boxes, 2, 5), LevelMapper(2, 5)(boxes))
    as_float = [b.float() for b in boxes]
    for convention in ("torchvision", "detectron2", "mmdet"):
        assert torch.equal(roialign.assign_levels(boxes, 2, 5, convention=convention),
                           roialign.assign_levels(as_float, 2, 5, convention=convention))
    assert int(roialign.assign_levels(boxes[2], 2, 5)[0]) == 2  # P4: 4 + log2(300 / 224), as in float32


def test_conventions_place_their_epsilon_differently():
    # Sides just below a boundary, in float64 so that the offsets survive: torchvision's 1e-6 is
    # added outside log2, detectron2's 1e-8 inside it, mmdet's 1e-6 inside it with scale 56.
    def box(side):
        return torch.tensor([[0.0, 0.0, side, side]], dtype=torch.float64)

    def level(side, convention):
        return int(roialign.assign_levels(box(side), 2, 5, convention=convention)[0]) + 2

    assert [level(224.0, c) for c in ("torchvision", "detectron2", "mmdet")] == [4, 4, 4]
    below = 224 * (1 - 4e-7)  # log2(side / 224) = -5.8e-7
    assert level(below, "torchvision") == 4  # -5.8e-7 + 1e-6 >= 0
    assert level(below, "detectron2") == 3  # log2(1 - 4e-7 + 1e-8) < 0
    assert level(112 * (1 - 4e-7), "mmdet") == 3  # log2(2 - 8e-7 + 1e-6) >= 1
    assert level(112 * (1 - 1e-6), "mmdet") == 2  # log2(2 - 2e-6 + 1e-6) < 1
    # Clamped at both ends, and counted from min_level.
    assert [level(1.0, c) for c in ("torchvision", "detectron2", "mmdet")] == [2, 2, 2]
    assert [level(1e5, c) for c in ("torchvision", "detectron2", "mmdet")] == [5, 5, 5]
    assert level(0.0, "torchvision") == 2  # a box of no area goes to the finest level


def test_assign_levels_accepts_rois_and_rejects_bad_arguments():
    boxes = random_boxes(20, (300, 300), seed=2)
    rois = torch.cat((torch.zeros(20, 1), boxes), 1)
    assert torch.equal(roialign.assign_levels(rois, 2, 5), roialign.assign_levels(boxes, 2, 5))
    assert torch.equal(roialign.assign_levels([boxes[:5], boxes[5:]], 2, 5), roialign.assign_levels(boxes, 2, 5))
    with pytest.raises(ValueError, match="convention must be one of"):
        roialign.assign_levels(boxes, 2, 5, convention="caffe2")
    with pytest.raises(ValueError, match="max_level must be >= min_level"):
        roialign.assign_levels(boxes, 5, 2)
    with pytest.raises(ValueError, match=r"boxes must have shape \[K, 4\]"):
        roialign.assign_levels(boxes[:, :3], 2, 5)
    with pytest.raises(TypeError, match="min_level must be an int"):
        roialign.assign_levels(boxes, 2.0, 5)


# ------------------------------------------------------------------------------------------------
# MultiScaleRoIAlign against torchvision's


CASES = {
    "two images": ([(320, 288), (256, 320)], [90, 40]),
    "one image, one box": ([(200, 232)], [1]),
    "three images, one without boxes": ([(256, 256), (224, 192), (160, 256)], [30, 0, 25]),
}


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision(backend, case, sampling_ratio, dtype):
    shapes, counts = CASES[case]
    x = pyramid(shapes, dtype=dtype, seed=len(case))
    boxes = [random_boxes(n, shape, seed=i, dtype=dtype) for i, (n, shape) in enumerate(zip(counts, shapes))]
    boxes[0] = torch.cat((boxes[0], boundary_boxes(dtype)))  # exactly on level boundaries
    want = TorchvisionPooler(NAMES, 7, sampling_ratio)(x, boxes, shapes)
    got = roialign.MultiScaleRoIAlign(NAMES, 7, sampling_ratio)(x, boxes, shapes)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_one_level_empty_levels_no_boxes_and_other_feature_names(backend):
    shapes = [(256, 256)]
    x = pyramid(shapes)
    x["pool"] = torch.randn(1, 4, 4, 4)  # not named: ignored
    small = torch.tensor([[10.0, 10, 20, 24], [30, 30, 41, 37]])  # all on the finest level
    for names, boxes in [(NAMES, [small]), (["p4"], [small]), (NAMES, [torch.zeros(0, 4)]),
                         (["p3", "p5"], [random_boxes(30, shapes[0], seed=3)])]:
        want = TorchvisionPooler(names, (5, 3), 2)(x, boxes, shapes)
        got = roialign.MultiScaleRoIAlign(names, (5, 3), 2)(x, boxes, shapes)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_result_has_the_first_maps_dtype_and_each_level_is_cast():
    shapes = [(256, 256)]
    x = pyramid(shapes, dtype=torch.float64)
    x["p3"] = x["p3"].float()
    x["p4"] = x["p4"].to(torch.bfloat16)
    boxes = [torch.cat((random_boxes(60, shapes[0], seed=4, dtype=torch.float64), boundary_boxes(torch.float64)))]
    got = roialign.MultiScaleRoIAlign(NAMES, 7, 2)(x, boxes, shapes)
    assert got.dtype == torch.float64
    levels = roialign.assign_levels(boxes, 2, 5)
    rois = torch.cat((torch.zeros(len(boxes[0]), 1, dtype=torch.float64), boxes[0]), 1)
    for level, name in enumerate(NAMES):
        index = torch.nonzero(levels == level).squeeze(1)
        assert index.numel() > 0
        want = roialign.roi_align(x[name], rois[index], 7, 1 / (4 << level), 2).to(torch.float64)
        assert torch.equal(got[index], want)


def test_aligned_and_conventions_reach_the_op():
    shapes = [(256, 256)]
    x = pyramid(shapes, dtype=torch.float64)
    boxes = [random_boxes(50, shapes[0], seed=5, dtype=torch.float64)]
    rois = torch.cat((torch.zeros(50, 1, dtype=torch.float64), boxes[0]), 1)
    for convention in ("torchvision", "detectron2", "mmdet"):
        got = roialign.MultiScaleRoIAlign(NAMES, 7, 0, aligned=True, convention=convention)(x, boxes, shapes)
        levels = roialign.assign_levels(boxes, 2, 5, convention=convention)
        for level, name in enumerate(NAMES):
            index = torch.nonzero(levels == level).squeeze(1)
            want = roialign.roi_align(x[name], rois[index], 7, 1 / (4 << level), 0, aligned=True)
            assert torch.equal(got[index], want)


def test_gradients_reach_features_and_boxes(backend):
    shapes = [(256, 224), (192, 256)]
    x = pyramid(shapes, dtype=torch.float64, seed=6)
    boxes = [random_boxes(40, s, seed=7 + i, dtype=torch.float64) for i, s in enumerate(shapes)]
    boxes[1] = torch.cat((boxes[1], boundary_boxes(torch.float64)))  # every level in use
    grad = torch.randn(86, 4, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    x_ours = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    boxes_ours = [b.clone().requires_grad_() for b in boxes]
    roialign.MultiScaleRoIAlign(NAMES, 7, 2)(x_ours, boxes_ours, shapes).backward(grad)
    x_tv = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    TorchvisionPooler(NAMES, 7, 2)(x_tv, boxes, shapes).backward(grad)
    for name in NAMES:
        assert x_ours[name].grad.abs().sum() > 0
        torch.testing.assert_close(x_ours[name].grad, x_tv[name].grad, atol=1e-12, rtol=0)

    # Box gradients: the same as pooling each level's boxes with roi_align (exactly).
    levels = roialign.assign_levels(boxes, 2, 5)
    rois = torch.cat([torch.cat((torch.full((len(b), 1), float(i), dtype=torch.float64), b), 1)
                      for i, b in enumerate(boxes)]).requires_grad_()
    for level, name in enumerate(NAMES):
        index = torch.nonzero(levels == level).squeeze(1)
        roialign.roi_align(x[name], rois[index], 7, 1 / (4 << level), 2).backward(grad[index])
    got = torch.cat([b.grad for b in boxes_ours])
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, rois.grad[:, 1:], atol=0, rtol=0)


def test_boxes_without_a_size_get_no_level_and_a_zero_output_as_in_torchvision(backend):
    # A NaN coordinate, or a box reversed along one axis (negative area), has a NaN size: the
    # peers' level rules then match it to no level and their poolers leave its output zero.
    shapes = [(128, 160), (96, 128)]
    x = pyramid(shapes, dtype=torch.float64, seed=11)
    good = [random_boxes(12, s, seed=12 + i, dtype=torch.float64) for i, s in enumerate(shapes)]
    bad = torch.tensor([[30.0, 10, 10, 40], [5, 50, 60, 20], [float("nan"), 1, 9, 9], [1, 2, 3, float("nan")]],
                       dtype=torch.float64)
    boxes = [torch.cat((good[0][:5], bad[:2], good[0][5:])), torch.cat((bad[2:], good[1]))]
    reversed_both = torch.tensor([[40.0, 45, 10, 12]], dtype=torch.float64)  # positive area: has a level
    assert int(roialign.assign_levels(reversed_both, 2, 5)[0]) >= 0
    for convention in ("torchvision", "detectron2", "mmdet"):
        levels = roialign.assign_levels(boxes, 2, 5, convention=convention)
        assert levels.tolist().count(-1) == 4 and bool((levels >= -1).all() & (levels <= 3).all())
        assert levels[5:7].tolist() == [-1, -1] and levels[14:16].tolist() == [-1, -1]

    features = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    boxes_ours = [b.clone().requires_grad_() for b in boxes]
    got = roialign.MultiScaleRoIAlign(NAMES, 5, 2)(features, boxes_ours, shapes)
    want = TorchvisionPooler(NAMES, 5, 2)(x, boxes, shapes)
    none = torch.tensor([5, 6, 14, 15])
    assert torch.equal(got[none], torch.zeros_like(got[none])) and got.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    got.backward(torch.ones_like(got))
    grad_boxes = torch.cat([b.grad for b in boxes_ours])
    assert torch.equal(grad_boxes[none], torch.zeros_like(grad_boxes[none])) and grad_boxes.abs().sum() > 0
    clean = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    keep = [torch.cat((good[0][:5], good[0][5:])), good[1]]
    roialign.MultiScaleRoIAlign(NAMES, 5, 2)(clean, keep, shapes).sum().backward()
    for name in NAMES:  # the sizeless boxes add nothing to the features' gradients
        assert torch.equal(features[name].grad, clean[name].grad)


def test_gradcheck():
    shapes = [(64, 64)]
    x = pyramid(shapes, channels=2, dtype=torch.float64, seed=9, names=NAMES[:3])
    boxes = torch.tensor([[3.3, 4.1, 28.7, 25.9], [10.2, 6.6, 50.3, 61.7], [1.1, 2.2, 7.3, 6.9]], dtype=torch.float64)
    pool = roialign.MultiScaleRoIAlign(NAMES[:3], 3, 2, canonical_scale=32)
    assert len(set(roialign.assign_levels(boxes, 2, 4, canonical_scale=32).tolist())) == 3

    def f(a, b, c, bx):
        return pool(OrderedDict(zip(NAMES[:3], (a, b, c))), [bx], shapes)

    inputs = [v.requires_grad_() for v in x.values()] + [boxes.requires_grad_()]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Integration: torchvision's detectors, FX, torch.compile, torch.export, without torchvision


def test_torchvision_detectors_accept_it():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    pool = roialign.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    assert isinstance(pool, TorchvisionPooler)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=0)
    model = FasterRCNN(backbone, num_classes=3, box_roi_pool=pool, min_size=128, max_size=160).eval()
    with torch.no_grad():
        model([torch.rand(3, 128, 150)])


def test_works_without_torchvision(tmp_path):
    shapes = [(128, 160)]
    x = pyramid(shapes, seed=10)
    boxes = [random_boxes(30, shapes[0], seed=11)]
    torch.save((x, boxes, shapes), tmp_path / "case.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torchvision"] = None  # any import of torchvision fails
        import torch, roialign
        pool = roialign.MultiScaleRoIAlign({NAMES!r}, 7, 2)
        assert type(pool).__mro__[1] is torch.nn.Module, type(pool).__mro__
        x, boxes, shapes = torch.load({str(tmp_path / "case.pt")!r})
        torch.save(pool(x, boxes, shapes), {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    want = TorchvisionPooler(NAMES, 7, 2)(x, boxes, shapes)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=1e-6, rtol=0)


class _Head(torch.nn.Module):
    """A pooler between tensors, as a model would hold it: FX, compile and export take tensors."""

    def __init__(self, shapes, **kwargs):
        super().__init__()
        self.pool = roialign.MultiScaleRoIAlign(NAMES, 5, 2, **kwargs)
        self.shapes = shapes

    def forward(self, p2, p3, p4, p5, boxes0, boxes1):
        return self.pool(OrderedDict(zip(NAMES, (p2, p3, p4, p5))), [boxes0, boxes1], self.shapes) * 2


def _head_inputs(seed=12):
    shapes = [(256, 224), (224, 256)]
    x = pyramid(shapes, seed=seed)
    return shapes, (*x.values(), random_boxes(35, shapes[0], seed=seed), random_boxes(20, shapes[1], seed=seed + 1))


def test_fx_records_the_pooler_as_one_call():
    shapes, inputs = _head_inputs()
    head = _Head(shapes)
    gm = torch.fx.symbolic_trace(head)
    calls = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")]
    assert calls.count("multiscale_roi_align") == 1
    assert torch.equal(gm(*inputs), head(*inputs))


def test_compiles_without_graph_breaks_forward_and_backward():
    shapes, inputs = _head_inputs()
    head = _Head(shapes)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(head)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(head, fullgraph=True)
    eager_inputs = [t.clone().requires_grad_() for t in inputs]
    compiled_inputs = [t.clone().requires_grad_() for t in inputs]
    want, got = head(*eager_inputs), compiled(*compiled_inputs)
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for a, b in zip(eager_inputs, compiled_inputs):
        assert torch.equal(a.grad, b.grad)


def test_export_keeps_one_op_and_runs():
    shapes, inputs = _head_inputs()
    head = _Head(shapes)
    exported = torch.export.export(head, inputs)
    code = exported.graph_module.code
    assert code.count("roialign.multiscale_roi_align.default") == 1
    _, other = _head_inputs(seed=13)
    assert torch.equal(exported.module()(*other), head(*other))


def test_opcheck_the_multiscale_op():
    gen = torch.Generator().manual_seed(14)
    features = [torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64),
                torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)]
    rois = torch.tensor([[0, 1.0, 1, 20, 30], [1, 5, 5, 60, 50], [0, 2, 3, 9, 9]], dtype=torch.float64)
    levels = torch.tensor([0, 1, 0])
    for requires_grad in (False, True):
        args = ([f.clone().requires_grad_(requires_grad) for f in features], rois.clone().requires_grad_(requires_grad),
                levels, [0.25, 0.125], 3, 2, 2, True)
        torch.library.opcheck(torch.ops.roialign.multiscale_roi_align.default, args)


def test_bad_arguments_are_clear_errors():
    shapes, inputs = _head_inputs()
    x = OrderedDict(zip(NAMES, inputs[:4]))
    pool = roialign.MultiScaleRoIAlign(NAMES, 5, 2)
    with pytest.raises(ValueError, match="none of the feature maps named"):
        roialign.MultiScaleRoIAlign(["c4"], 5, 2)(x, [inputs[4], inputs[5]], shapes)
    with pytest.raises(TypeError, match="boxes must be a list"):
        pool(x, inputs[4], shapes)
    with pytest.raises(ValueError, match="image_shapes must hold"):
        pool(x, [inputs[4], inputs[5]], [])
    with pytest.raises(ValueError, match="convention must be one of"):
        roialign.MultiScaleRoIAlign(NAMES, 5, 2, convention="fpn")
    with pytest.raises(TypeError, match="featmap_names must be a list"):
        roialign.MultiScaleRoIAlign("p2", 5, 2)
    with pytest.raises(IndexError, match="levels must lie in"):
        torch.ops.roialign.multiscale_roi_align([inputs[0]], torch.zeros(1, 5), torch.tensor([1]), [0.25], 2, 2, 2, True)
    with pytest.raises(IndexError, match="levels must lie in"):
        torch.ops.roialign.multiscale_roi_align([inputs[0]], torch.zeros(1, 5), torch.tensor([-2]), [0.25], 2, 2, 2, True)
    with pytest.raises(IndexError, match="batch indices"):
        pool(x, [inputs[4], inputs[5], inputs[5]], shapes)  # three box lists for two images
