"""Max-mode RoIAlign (``mode="max"``, mmcv's; ``mode="onnx_max"``, ONNX's) against the float64 loop
oracle in ``oracle_max.py``, the published ONNX values, and the op's contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle_max
import roialign
from cases import random_case

MODES = ("max", "onnx_max")

# Every test runs once per CPU backend (conftest's ``backend`` fixture: numba and the
# pure-PyTorch reference; Triton has no max kernel yet and falls back to the reference).
pytestmark = pytest.mark.usefixtures("backend")

ONNX_X = np.array([float(v) for v in """
0.2764 0.7150 0.1958 0.3416 0.4638 0.0259 0.2963 0.6518 0.4856 0.7250
0.9637 0.0895 0.2919 0.6753 0.0234 0.6132 0.8085 0.5324 0.8992 0.4467
0.3265 0.8479 0.9698 0.2471 0.9336 0.1878 0.4766 0.4308 0.3400 0.2162
0.0206 0.1720 0.2155 0.4394 0.0653 0.3406 0.7724 0.3921 0.2541 0.5799
0.4062 0.2194 0.4473 0.4687 0.7109 0.9327 0.9815 0.6320 0.1728 0.6119
0.3097 0.1283 0.4984 0.5068 0.4279 0.0173 0.4388 0.0430 0.4671 0.7119
0.1011 0.8477 0.4726 0.1777 0.9923 0.4042 0.1869 0.7795 0.9946 0.9689
0.1366 0.3671 0.7011 0.6234 0.9867 0.5585 0.6985 0.5609 0.8788 0.9928
0.5697 0.8511 0.6711 0.9406 0.8751 0.7496 0.1650 0.1049 0.1559 0.2514
0.7012 0.4056 0.7879 0.3461 0.0415 0.2998 0.5094 0.3727 0.5482 0.0502""".split()], dtype=np.float32).reshape(1, 1, 10, 10)
ONNX_ROIS = [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9]]
# onnx/backend/test/case/node/roialign.py, test_roialign_mode_max (output_half_pixel, sr 2, 5 x 5).
ONNX_Y = [
    [[0.3445228, 0.37310338, 0.37865096, 0.446696, 0.37991184],
     [0.4133513, 0.5455125, 0.6651902, 0.55805874, 0.27110294],
     [0.21223956, 0.40924096, 0.8417618, 0.792561, 0.37196714],
     [0.46835402, 0.39741728, 0.8012819, 0.4969306, 0.5495158],
     [0.3595896, 0.5196813, 0.5403741, 0.23814403, 0.19992709]],
    [[0.30517197, 0.5086199, 0.3189761, 0.4054401, 0.47630402],
     [0.50862, 0.8477, 0.37808004, 0.24936005, 0.79384017],
     [0.17620805, 0.29368007, 0.44870415, 0.4987201, 0.63148826],
     [0.51066005, 0.8511, 0.5368801, 0.9406, 0.70008016],
     [0.4487681, 0.51066035, 0.5042561, 0.5643603, 0.42004836]],
    [[0.21062402, 0.3510401, 0.37416005, 0.5967599, 0.46507207],
     [0.32336006, 0.31180006, 0.6236001, 0.9946, 0.7751202],
     [0.35744014, 0.5588001, 0.35897616, 0.7030401, 0.6353923],
     [0.5996801, 0.27940005, 0.17948808, 0.35152006, 0.31769615],
     [0.3598083, 0.40752012, 0.2385281, 0.43856013, 0.26313624]],
]


def fargs(case):
    """The functional's arguments after the boxes."""
    return case.output_size, case.spatial_scale, case.sampling_ratio, case.aligned


def _run(x, rois, case_args, mode, grad=None):
    x = x.detach().clone().requires_grad_()
    rois = rois.detach().clone().requires_grad_()
    out = roialign.roi_align(x, rois, *case_args, mode=mode)
    if grad is None:
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(grad)
    return out.detach(), x.grad, rois.grad, grad


# --- Published values ---------------------------------------------------------------------------


def test_onnx_published_max_values():
    out = roialign.roi_align(torch.from_numpy(ONNX_X), torch.tensor(ONNX_ROIS, dtype=torch.float32), 5, 1.0, 2,
                             False, mode="onnx_max")
    torch.testing.assert_close(out[:, 0], torch.tensor(ONNX_Y), atol=1e-6, rtol=0)


def test_mmcv_reading_differs_from_onnx_on_the_published_case():
    # operators.md: interpolate-then-max gives [0.5671, 0.52823, 0.45819, 0.65813, 0.64594] for roi 0, row 0.
    out = roialign.roi_align(torch.from_numpy(ONNX_X), torch.tensor(ONNX_ROIS, dtype=torch.float32), 5, 1.0, 2,
                             False, mode="max")
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.5671, 0.52823, 0.45819, 0.65813, 0.64594]),
                               atol=1e-4, rtol=0)
    for k, oracle_mode in ((0, "onnx_max"), (0, "max")):
        want, _, _ = oracle_max.roi_align_max(ONNX_X, ONNX_ROIS, 1.0, 5, 5, 2, False, oracle_mode)
        got = roialign.roi_align(torch.from_numpy(ONNX_X), torch.tensor(ONNX_ROIS, dtype=torch.float32), 5, 1.0, 2,
                                 False, mode=oracle_mode)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


# --- Against the oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(120))
def test_matches_oracle_float64(seed, mode):
    case = random_case(seed)
    out, gx, gr, go = _run(case.x, case.rois, fargs(case), mode)
    want, want_gx, want_gr = oracle_max.roi_align_max(case.x.detach().numpy(), case.rois.detach().numpy(),
                                                      case.spatial_scale, *case.output_size, case.sampling_ratio,
                                                      case.aligned, mode, go.numpy(), geometry=np.float64)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(gx.numpy(), want_gx, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(gr.numpy(), want_gr, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(0, 120, 4))
def test_matches_oracle_float32(seed, mode):
    case = random_case(seed)
    x, rois = case.x.float(), case.rois.float()
    out, gx, gr, go = _run(x, rois, fargs(case), mode)
    want, want_gx, want_gr = oracle_max.roi_align_max(x.detach().numpy(), rois.detach().numpy(), case.spatial_scale,
                                                      *case.output_size, case.sampling_ratio, case.aligned, mode,
                                                      go.double().numpy(), geometry=np.float32)
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(gx.numpy(), want_gx, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(gr.numpy(), want_gr, atol=2e-3, rtol=1e-3)


# --- The semantics, case by case -----------------------------------------------------------------------


def test_outside_samples_count_as_zero_and_empty_bins_are_zero():
    x = -torch.ones(1, 1, 4, 4, dtype=torch.float64)  # every value inside the map is negative
    inside = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], dtype=torch.float64)
    # x from -6.5 to 2.5 after the shift: the left bin's samples are off the map, the right bin's on it
    partly = torch.tensor([[0, -6.0, 0.5, 3.0, 2.5]], dtype=torch.float64)
    empty = torch.tensor([[0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)  # aligned, adaptive: no samples
    for mode in MODES:
        assert (roialign.roi_align(x, inside, 1, 1.0, 2, True, mode=mode) < 0).all()
        out = roialign.roi_align(x, partly, (1, 2), 1.0, 2, True, mode=mode)
        assert out[0, 0, 0, 0] == 0
        # mmcv: the right bin's samples are all on the map. ONNX: one of them sits on a pixel
        # column (weight 0 on its right corners), and a zero-weighted corner term, 0, beats -1.
        assert out[0, 0, 0, 1] == (-1 if mode == "max" else 0)
        assert roialign.roi_align(x, empty, 2, 1.0, 0, True, mode=mode).eq(0).all()
        # mmcv's sentinel never leaks: no -10000 or -FLT_MAX anywhere
        assert roialign.roi_align(x, empty, 2, 1.0, 0, True, mode=mode).abs().max() < 1


def test_first_sample_wins_a_tie_and_takes_the_gradient():
    x = torch.full((1, 1, 6, 6), 2.0, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
    out = roialign.roi_align(x, rois, 1, 1.0, 2, False, mode="max")  # four samples of equal value 2
    out.backward(torch.ones_like(out))
    # The first sample (row-major) sits at (2, 2): all of its weight on pixel (2, 2).
    want = torch.zeros(6, 6, dtype=torch.float64)
    want[2, 2] = 1.0
    torch.testing.assert_close(x.grad[0, 0], want)


def test_gradient_goes_to_the_winning_sample_without_division():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64, generator=gen)
    rois = torch.tensor([[0, 0.3, 0.7, 6.1, 5.2]], dtype=torch.float64)
    _, gx, _, _ = _run(x, rois, ((1, 1), 1.0, 3, True), "max", torch.ones(1, 2, 1, 1, dtype=torch.float64))
    # One sample per channel gets it all: its bilinear weights sum to 1.
    torch.testing.assert_close(gx.sum((2, 3)), torch.ones(1, 2, dtype=torch.float64))
    assert int((gx[0, 0] != 0).sum()) <= 4


@pytest.mark.parametrize("mode", MODES)
def test_box_gradient_matches_finite_differences(mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 9, 11, dtype=torch.float64, generator=gen)
    # Boxes whose samples are not placed symmetrically about a pixel: there, onnx_max has ties
    # between the corner terms of two samples (equal weights on one pixel), a kink.
    rois = torch.tensor([[0, 1.37, 2.13, 7.71, 6.58], [0, 3.21, 0.64, 9.13, 8.29]], dtype=torch.float64)
    args = ((2, 3), 1.0, 2, True)
    _, _, gr, go = _run(x, rois, args, mode)
    eps = 1e-6
    for k in range(2):
        for j in range(1, 5):
            hi, lo = rois.clone(), rois.clone()
            hi[k, j] += eps
            lo[k, j] -= eps
            fd = ((roialign.roi_align(x, hi, *args, mode=mode) - roialign.roi_align(x, lo, *args, mode=mode)) * go
                  ).sum() / (2 * eps)
            assert abs(float(fd) - float(gr[k, j])) < 1e-5, (k, j, float(fd), float(gr[k, j]))
    assert (gr[:, 0] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_input_gradcheck(mode):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = torch.tensor([[0, 0.4, 0.9, 5.3, 4.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roialign.roi_align(t, rois, 2, 1.0, 2, True, mode=mode), (x,))


# --- Dtypes, layouts, bad input, determinism ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_types_follow_float32(dtype, mode):
    case = random_case(5)
    x = case.x.to(dtype)
    out = roialign.roi_align(x, case.rois.float(), *fargs(case), mode=mode)
    assert out.dtype == dtype
    want = roialign.roi_align(x.float(), case.rois.float(), *fargs(case), mode=mode)
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2, equal_nan=True)


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_and_strided_inputs(mode):
    case = random_case(7)
    base = _run(case.x, case.rois, fargs(case), mode)
    cl = _run(case.x.contiguous(memory_format=torch.channels_last), case.rois, fargs(case), mode, base[3])
    torch.testing.assert_close(cl[0], base[0], equal_nan=True)
    torch.testing.assert_close(cl[1], base[1])
    x = case.x.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    roialign.roi_align(x, case.rois, *fargs(case), mode=mode).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
def test_nan_box_gives_nan_for_that_box_only_and_inputs_are_untouched(mode):
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0], [0, float("nan"), 1.0, 4.0, 4.0]], dtype=torch.float64)
    x0, r0 = x.clone(), rois.clone()
    out = roialign.roi_align(x, rois, 2, 1.0, 2, True, mode=mode)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    assert torch.equal(x, x0)
    torch.testing.assert_close(rois, r0, equal_nan=True, atol=0, rtol=0)


@pytest.mark.interpreter_heavy
def test_backward_is_bitwise_deterministic_on_cpu():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 40, 50, generator=gen)
    xy = torch.rand(300, 2, generator=gen) * 300
    rois = torch.cat((torch.randint(0, 2, (300, 1), generator=gen).float(), xy, xy + 4 + torch.rand(300, 2) * 100), 1)
    grads = []
    for _ in range(2):
        leaf = x.clone().requires_grad_()
        roialign.roi_align(leaf, rois, 7, 1 / 8, 2, True, mode="max").square().sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.interpreter_heavy
def test_huge_box_is_cheap():
    import time

    x = -torch.rand(1, 4, 20, 20) - 0.1
    rois = torch.tensor([[0, -1e7, -1e7, 1e7, 1e7]])
    start = time.perf_counter()
    for mode in MODES:  # 10^7 samples per bin along each axis, nearly all off the map
        assert roialign.roi_align(x, rois, 2, 1.0, 0, True, mode=mode).eq(0).all()  # off-map samples (0) win
        out = roialign.roi_align(-x, rois, 2, 1.0, 0, True, mode=mode)
        assert (out > 0).all() and (out <= 1.1).all()
    assert time.perf_counter() - start < 10


def test_bad_mode_is_refused():
    x, rois = torch.rand(1, 1, 4, 4), torch.tensor([[0, 0.0, 0, 2, 2]])
    with pytest.raises(ValueError, match="mode must be one of"):
        roialign.roi_align(x, rois, 2, mode="mean")
    with pytest.raises(ValueError, match="mode must be one of"):
        roialign.ROIAlign(2, 1.0, 2, mode=None)
    assert "mode='max'" in repr(roialign.ROIAlign(2, 1.0, 2, mode="max"))
    assert "mode" not in repr(roialign.ROIAlign(2, 1.0, 2))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])  # ids: see the next test
def test_onnx_export_of_mmcv_max_is_refused_with_a_clear_error(dynamo, tmp_path):
    model = roialign.ROIAlign(2, 1.0, 2, mode="max")
    x, rois = torch.rand(1, 1, 4, 4), torch.tensor([[0, 0.0, 0, 2, 2]])
    # The dynamo exporter retries a failed capture with a strict trace, where the refusal must
    # hold too (it did not, once: the error then only said "No ONNX function found").
    with pytest.raises(Exception, match="no ONNX equivalent.*Use mode='onnx_max'"):
        torch.onnx.export(model, (x, rois), str(tmp_path / "m.onnx"), dynamo=dynamo)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("aligned", [False, True])
def test_onnx_export_of_onnx_max_matches_onnxruntime(dynamo, aligned, tmp_path):
    # (Named like test_onnx_export.py's tests: .ci/run deselects the dynamo ones on torch < 2.8,
    # where the dynamo exporter needs the translation table.)
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = roialign.ROIAlign(5, 1.0, 2, aligned, mode="onnx_max")
    x = torch.from_numpy(ONNX_X)
    rois = torch.tensor(ONNX_ROIS + [[0, 2.3, 1.1, 7.9, 4.4]], dtype=torch.float32)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x, rois), path, dynamo=dynamo, opset_version=18)
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "RoiAlign"]
    assert len(nodes) == 1 and any(a.name == "mode" and a.s == b"max" for a in nodes[0].attribute)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (x.numpy(), rois.numpy()))))[0]
    np.testing.assert_allclose(got, model(x, rois).numpy(), atol=1e-6)
    if not aligned:
        np.testing.assert_allclose(got[:3, 0], np.array(ONNX_Y), atol=1e-6)


# --- The op -------------------------------------------------------------------------------------------


def _sample_inputs():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 7, 9, dtype=dtype, generator=gen)
        rois = torch.tensor([[0, 1.0, 1.5, 5.0, 6.0], [1, -2.0, 0.5, 4.0, 3.0]], dtype=dtype)
        yield (x, rois, 1.0, 2, 3, 0, True, False)
        yield (x.requires_grad_(), rois.clone().requires_grad_(), 0.5, 3, 2, 2, False, True)


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    args = list(_sample_inputs())[index]
    torch.library.opcheck(torch.ops.roialign.roi_align_max.default, args)


def test_compile_fullgraph_and_export():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.5, 5.0, 6.0], [1, -2.0, 0.5, 4.0, 3.0]])
    model = roialign.ROIAlign((3, 3), 1.0, 2, mode="max")
    eager = model(x, rois)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rois), eager)
    exported = torch.export.export(model, (x, rois))
    assert any("roi_align_max" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x, rois), eager)


def test_direct_op_call_exports_with_the_translation_table(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Direct(torch.nn.Module):
        def forward(self, x, rois):
            return torch.ops.roialign.roi_align_max(x, rois, 1.0, 5, 5, 2, False, True)

    x, rois = torch.from_numpy(ONNX_X), torch.tensor(ONNX_ROIS, dtype=torch.float32)
    path = str(tmp_path / "direct.onnx")
    torch.onnx.export(Direct(), (x, rois), path, dynamo=True,
                      custom_translation_table=roialign.onnx_translation_table())
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (x.numpy(), rois.numpy()))))[0]
    np.testing.assert_allclose(got[:, 0], np.array(ONNX_Y), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_only_the_gradients_asked_for(mode):
    case = random_case(11)
    _, want_gx, want_gr, go = _run(case.x, case.rois, fargs(case), mode)
    x = case.x.detach().clone().requires_grad_()
    roialign.roi_align(x, case.rois.detach(), *fargs(case), mode=mode).backward(go)
    torch.testing.assert_close(x.grad, want_gx)
    rois = case.rois.detach().clone().requires_grad_()
    roialign.roi_align(case.x.detach(), rois, *fargs(case), mode=mode).backward(go)
    torch.testing.assert_close(rois.grad, want_gr, equal_nan=True)
