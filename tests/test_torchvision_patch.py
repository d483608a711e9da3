"""``roialign.patch_torchvision()``: torchvision's detectors and ops on roialign, with the same numbers."""

import io
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torchvision.models import detection
from torchvision.ops import poolers

import roialign
from op_counter import CountOps

ORIGINAL_ROI_ALIGN = torchvision.ops.roi_align
ORIGINAL_ROIALIGN_CLASS = torchvision.ops.RoIAlign


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with torchvision's own op in place."""
    roialign.unpatch_torchvision()
    yield
    roialign.unpatch_torchvision()
    assert poolers.roi_align is ORIGINAL_ROI_ALIGN


MODELS = {
    "maskrcnn": (detection.maskrcnn_resnet50_fpn, ["box_roi_pool", "mask_roi_pool"]),
    "fasterrcnn": (detection.fasterrcnn_resnet50_fpn, ["box_roi_pool"]),
    "keypointrcnn": (detection.keypointrcnn_resnet50_fpn, ["box_roi_pool", "keypoint_roi_pool"]),
}


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    builder, _ = MODELS[name]
    extra = {"num_keypoints": 5} if name == "keypointrcnn" else {}
    model = builder(weights=None, weights_backbone=None, num_classes=3 if name != "keypointrcnn" else 2,
                    min_size=160, max_size=224, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=60,
                    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=60, box_batch_size_per_image=64,
                    box_detections_per_img=15, box_score_thresh=0.0, **extra)
    return model.to(dtype)


def images_and_targets(name, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 200, 180, generator=gen, dtype=dtype), torch.rand(3, 170, 224, generator=gen, dtype=dtype)]
    targets = []
    for image in images:
        h, w = image.shape[1:]
        xy = torch.rand(3, 2, generator=gen, dtype=dtype) * torch.tensor([w / 2, h / 2], dtype=dtype)
        boxes = torch.cat((xy, xy + 20 + torch.rand(3, 2, generator=gen, dtype=dtype) * 60), 1)
        target = {"boxes": boxes, "labels": torch.tensor([1, 2, 1] if name != "keypointrcnn" else [1, 1, 1])}
        if name == "maskrcnn":
            target["masks"] = torch.zeros(3, h, w, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(target["masks"], boxes.long().tolist()):
                m[y1:y2, x1:x2] = 1
        if name == "keypointrcnn":
            kx = boxes[:, :1] + torch.rand(3, 5, generator=gen, dtype=dtype) * (boxes[:, 2:3] - boxes[:, :1])
            ky = boxes[:, 1:2] + torch.rand(3, 5, generator=gen, dtype=dtype) * (boxes[:, 3:4] - boxes[:, 1:2])
            target["keypoints"] = torch.stack((kx, ky, torch.ones_like(kx)), 2)
        targets.append(target)
    return images, targets


def pooler_inputs(model, images, pool_names):
    """What each pooler receives in an eval forward: (features, boxes, image shapes)."""
    seen = {}
    handles = [getattr(model.roi_heads, name).register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args)) for name in pool_names]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list(MODELS))
def test_poolers_losses_and_gradients_match_unpatched(name):
    model = build(name).eval()
    images, targets = images_and_targets(name)
    _, pool_names = MODELS[name]
    seen = pooler_inputs(model, images, pool_names)
    assert set(seen) == set(pool_names)
    for pool_name, args in seen.items():
        pool = getattr(model.roi_heads, pool_name)
        with torch.no_grad(), CountOps() as unpatched_ops:
            want = pool(*args)
        with torch.no_grad(), roialign.patch_torchvision(), CountOps() as patched_ops:
            got = pool(*args)
        assert want.shape[0] > 0 and want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert unpatched_ops.count("roialign") == 0 and unpatched_ops.count("torchvision") > 0
        assert patched_ops.count("torchvision") == 0 and patched_ops.count("roialign") > 0

    # Train mode: the same proposals and samples (same seed), the same losses and gradients.
    model.train()

    def step():
        model.zero_grad()
        torch.manual_seed(2)
        with CountOps() as ops:
            losses = model(images, targets)
            sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in losses.items()}, grads, ops

    want_losses, want_grads, ops = step()
    assert ops.count("roialign") == 0
    with roialign.patch_torchvision():
        got_losses, got_grads, ops = step()
    # Forward and backward of every pooler call and, for Mask R-CNN, the mask targets, all ours.
    assert ops.count("torchvision") == 0
    assert ops.calls.get("roialign.roi_align.default", 0) >= len(pool_names) + (name == "maskrcnn")
    assert ops.calls.get("roialign.roi_align_backward.default", 0) >= 1
    assert set(got_losses) == set(want_losses)
    for key in want_losses:
        torch.testing.assert_close(got_losses[key], want_losses[key], atol=1e-6, rtol=1e-5)
    assert set(got_grads) == set(want_grads)
    # float32 rounding differences of 1e-7 grow through a ResNet-50's backward: compare each
    # parameter's gradient as a whole (norm of the difference), not element by element; some
    # gradients are themselves rounding noise (a keypoint bias's is 4e-8), hence the 1e-6 floor.
    for key in want_grads:
        difference, size = float((got_grads[key] - want_grads[key]).norm()), float(want_grads[key].norm())
        assert difference <= 1e-4 * size + 1e-6, (key, difference, size)


@pytest.mark.parametrize("name", ["maskrcnn", "keypointrcnn"])
def test_final_detections_match_in_float64(name):
    # With random weights the scores are close together, and NMS or the top-k can swap two
    # detections on a float32 rounding difference. In float64 the two ops differ by about 1e-16,
    # far below any gap between scores, so the detections must agree exactly in order and closely
    # in value; the test checks that no two kept scores are closer than the tolerance.
    model = build(name, torch.float64).eval()
    images, _ = images_and_targets(name, torch.float64)
    with torch.no_grad():
        want = model(images)
        with roialign.patch_torchvision():
            got = model(images)
    for w, g in zip(want, got):
        assert w["boxes"].shape[0] > 0 and torch.equal(w["labels"], g["labels"])
        assert torch.diff(w["scores"].sort().values).abs().min() > 1e-9
        for key in w:
            torch.testing.assert_close(g[key].double(), w[key].double(), atol=1e-9, rtol=1e-9)


def test_patched_names_and_unpatch_restores_them():
    from torchvision.models.detection import roi_heads

    patch = roialign.patch_torchvision()
    for module in (torchvision.ops, sys.modules["torchvision.ops.roi_align"], poolers, roi_heads):
        assert module.roi_align is not ORIGINAL_ROI_ALIGN
    assert torchvision.ops.RoIAlign is ORIGINAL_ROIALIGN_CLASS  # the class stays: its forward looks roi_align up
    assert sys.modules["torchvision.ops.roi_align"].RoIAlign is ORIGINAL_ROIALIGN_CLASS
    assert "roialign" in repr(patch)
    roialign.unpatch_torchvision()
    for module in (torchvision.ops, sys.modules["torchvision.ops.roi_align"], poolers, roi_heads):
        assert module.roi_align is ORIGINAL_ROI_ALIGN
    assert torchvision.ops.RoIAlign is ORIGINAL_ROIALIGN_CLASS


def test_nesting_patching_twice_and_plain_calls():
    with roialign.patch_torchvision():
        patched = poolers.roi_align
        with roialign.patch_torchvision():
            assert poolers.roi_align is patched
        assert poolers.roi_align is patched  # the inner block restores the state at its entry
    assert poolers.roi_align is ORIGINAL_ROI_ALIGN
    roialign.patch_torchvision()
    roialign.patch_torchvision()  # harmless
    with roialign.patch_torchvision():
        pass
    assert poolers.roi_align is patched
    roialign.unpatch_torchvision()
    assert poolers.roi_align is ORIGINAL_ROI_ALIGN
    roialign.unpatch_torchvision()  # also harmless


def test_roialign_modules_follow_the_patch_and_pickle_as_torchvisions():
    x = torch.randn(2, 3, 20, 24)
    rois = torch.tensor([[0, 1.5, 2.0, 15.3, 17.1], [1, 4.0, 3.0, 30.0, 28.0]])
    before = torchvision.ops.RoIAlign((4, 5), 0.5, 2)
    want = before(x, rois)
    with roialign.patch_torchvision():
        during = torchvision.ops.RoIAlign((4, 5), 0.5, 2)
        assert type(during) is ORIGINAL_ROIALIGN_CLASS and during.aligned is False and repr(during) == repr(before)
        functional = torchvision.ops.roi_align(x, rois, (4, 5), 0.5, 2)
        functional_boxes_list = torchvision.ops.roi_align(x, [rois[:1, 1:], rois[1:, 1:]], (4, 5), 0.5, 2)
        for module in (before, during):  # built before or while patched: roialign now
            with CountOps() as ops:
                got = module(x, rois)
            assert ops.count("roialign") == 1 and ops.count("torchvision") == 0
            assert torch.equal(got, roialign.roi_align(x, rois, (4, 5), 0.5, 2))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # Models holding torchvision's RoIAlign pickle as torchvision's, and load without roialign's patch.
        saved = io.BytesIO()
        torch.save(torch.nn.Sequential(before, during), saved)
    torch.testing.assert_close(functional, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(functional_boxes_list, want, atol=1e-6, rtol=0)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert all(type(m) is ORIGINAL_ROIALIGN_CLASS for m in loaded)
    for module in (during, loaded[0], loaded[1]):  # unpatched: torchvision's op again
        with CountOps() as ops:
            assert torch.equal(module(x, rois), want)
        assert ops.count("roialign") == 0 and ops.count("torchvision") == 1
    assert pickle.loads(pickle.dumps(during)).output_size == (4, 5)


def test_patched_function_takes_aligned_as_torchvision_does():
    # Configs give aligned as 0/1 or a numpy bool; torchvision's op takes those as bools.
    import numpy as np

    x = torch.randn(1, 2, 12, 12)
    rois = torch.tensor([[0, 1.5, 1.0, 9.0, 10.5]])
    with roialign.patch_torchvision():
        for value, want in ((1, True), (0, False), (np.True_, True), (np.False_, False)):
            assert torch.equal(torchvision.ops.roi_align(x, rois, 3, 1.0, 2, value),
                               roialign.roi_align(x, rois, 3, 1.0, 2, want))
            torch.testing.assert_close(torchvision.ops.roi_align(x, rois, 3, 1.0, 2, value),
                                       ORIGINAL_ROI_ALIGN(x, rois, 3, 1.0, 2, value), atol=1e-6, rtol=0)
        with pytest.raises(TypeError, match="aligned must be a bool"):
            torchvision.ops.roi_align(x, rois, 3, 1.0, 2, 2)


def test_quantized_inputs_go_to_torchvision():
    x = torch.quantize_per_tensor(torch.rand(1, 2, 10, 10), 0.05, 3, torch.quint8)
    rois = torch.quantize_per_tensor(torch.tensor([[0, 1.0, 1.0, 8.0, 7.0]]), 0.05, 3, torch.quint8)
    want = ORIGINAL_ROI_ALIGN(x, rois, 3, 1.0, 2)
    with roialign.patch_torchvision(), CountOps() as ops:
        got = torchvision.ops.roi_align(x, rois, 3, 1.0, 2)
    assert got.is_quantized and torch.equal(got.int_repr(), want.int_repr())
    assert ops.count("roialign") == 0


def test_fx_symbolic_trace_and_feature_extraction_of_patched_modules():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.pool = torchvision.ops.RoIAlign(3, 0.5, 2)

        def forward(self, x, rois):
            feat = self.conv(x)
            return self.pool(feat, rois) + torchvision.ops.roi_align(feat, rois, 3, 0.5, 2)

    x = torch.randn(1, 3, 16, 16)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 25.0]])
    with roialign.patch_torchvision():
        head = Head()
        gm = torch.fx.symbolic_trace(head)
        targets = [getattr(n.target, "__module__", "") for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count("roialign.integrations.torchvision") == 2
        with CountOps() as ops:
            assert torch.equal(gm(x, rois), head(x, rois))
        assert ops.count("roialign") == 4 and ops.count("torchvision") == 0
        train_nodes, eval_nodes = get_graph_node_names(head)
        assert "roi_align" in eval_nodes
        extractor = create_feature_extractor(head, return_nodes=["conv", "roi_align"])
        out = extractor(x, rois)
        assert torch.equal(out["roi_align"], roialign.roi_align(head.conv(x), rois, 3, 0.5, 2))


def test_torchscript_of_a_patched_model_uses_torchvisions_kernel(tmp_path):
    x = torch.randn(1, 2, 12, 12)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 10.0]])
    with roialign.patch_torchvision():
        module = torchvision.ops.RoIAlign(3, 1.0, 2)
        scripted = torch.jit.script(module)
        with CountOps() as ops:
            got = scripted(x, rois)
    assert ops.count("torchvision") == 1
    torch.testing.assert_close(got, ORIGINAL_ROI_ALIGN(x, rois, 3, 1.0, 2), atol=0, rtol=0)
    torch.jit.save(scripted, tmp_path / "module.pt")
    assert torch.equal(torch.jit.load(tmp_path / "module.pt")(x, rois), got)


def test_missing_or_unsupported_torchvision_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(poolers, "roi_align")
    with pytest.raises(RuntimeError, match=f"does not support torchvision {re.escape(torchvision.__version__)}.*poolers"):
        roialign.patch_torchvision()
    monkeypatch.undo()
    code = textwrap.dedent("""
        import sys
        sys.modules["torchvision"] = None
        import roialign
        try:
            roialign.patch_torchvision()
        except ImportError as error:
            print(error)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "needs torchvision" in out.stdout
