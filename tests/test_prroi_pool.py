"""Precise RoI Pooling against the numerical-integration oracle in ``oracle_prroi.py``, mmcv's
published values, the original implementation's test, finite differences, and the op's contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle_prroi
import roialign
from cases import random_case

# Every test runs once per CPU backend (conftest's ``backend`` fixture).
pytestmark = pytest.mark.usefixtures("backend")

# mmcv tests/test_ops/test_prroi_pool.py: 2 x 2 output, spatial_scale 1; (input, rois) and
# (output, input gradient, box gradient) of out.backward(ones).
MMCV_INPUTS = [([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]]),
               ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]]),
               ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
                [[0., 0., 0., 3., 3.]])]
MMCV_OUTPUTS = [([[[[1.75, 2.25], [2.75, 3.25]]]], [[[[1., 1.], [1., 1.]]]], [[0., 2., 4., 2., 4.]]),
                ([[[[1.75, 2.25], [2.75, 3.25]], [[3.25, 2.75], [2.25, 1.75]]]],
                 [[[[1., 1.], [1., 1.]], [[1., 1.], [1., 1.]]]], [[0., 0., 0., 0., 0.]]),
                ([[[[3.75, 6.91666651], [10.08333302, 13.25]]]],
                 [[[[0.11111111, 0.22222224, 0.22222222, 0.11111111], [0.22222224, 0.444444448, 0.44444448, 0.22222224],
                    [0.22222224, 0.44444448, 0.44444448, 0.22222224], [0.11111111, 0.22222224, 0.22222224, 0.11111111]]]],
                 [[0.0, 3.33333302, 6.66666603, 3.33333349, 6.66666698]])]


def _run(x, rois, output_size, scale, grad=None):
    x = x.detach().clone().requires_grad_()
    rois = rois.detach().clone().requires_grad_()
    out = roialign.prroi_pool(x, rois, output_size, scale)
    if grad is None:
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(grad)
    return out.detach(), x.grad, rois.grad, grad


# --- Published values ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(3))
def test_mmcv_published_values(index, dtype):
    (x, rois), (want, want_gx, want_gr) = MMCV_INPUTS[index], MMCV_OUTPUTS[index]
    x, rois = torch.tensor(x, dtype=dtype), torch.tensor(rois, dtype=dtype)
    out, gx, gr, _ = _run(x, rois, 2, 1.0, torch.ones(rois.shape[0], x.shape[1], 2, 2, dtype=dtype))
    for got, expected in ((out, want), (gx, want_gx), (gr, want_gr)):
        torch.testing.assert_close(got, torch.tensor(expected, dtype=dtype), atol=1e-6, rtol=1e-6)


def test_unit_bins_equal_a_two_by_two_average_pool():
    # The original implementation's test: PrRoIPool2D(7, 7, 0.5) on boxes of 14 image pixels
    # (7 map pixels) equals avg_pool2d(features, 2, stride=1) at the box's corner.
    x = torch.rand(4, 16, 24, 32, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0, 0, 0, 14, 14], [1, 14, 14, 28, 28]], dtype=torch.float32)
    out = roialign.PrRoIPool(7, 0.5)(x, rois)
    pooled = torch.nn.functional.avg_pool2d(x, 2, stride=1)
    want = torch.stack([pooled[0, :, 0:7, 0:7], pooled[1, :, 7:14, 7:14]])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


# --- Against the oracle -------------------------------------------------------------------------


def _case(seed):
    case = random_case(seed)
    return case.x, case.rois, case.output_size, case.spatial_scale


@pytest.mark.parametrize("seed", range(100))
def test_matches_oracle_float64(seed):
    x, rois, output_size, scale = _case(seed)
    out, gx, gr, grad = _run(x, rois, output_size, scale)
    want = oracle_prroi.prroi_pool(x.numpy(), rois.numpy(), scale, output_size)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-10, rtol=1e-10)
    want_gx = oracle_prroi.input_gradient(grad.numpy(), x.shape, rois.numpy(), scale, output_size)
    np.testing.assert_allclose(gx.numpy(), want_gx, atol=1e-10, rtol=1e-10)
    finite = torch.isfinite(rois).all(1)
    assert torch.isnan(gr[~finite, 1:]).all() and (gr[finite, 0] == 0).all()


@pytest.mark.parametrize("seed", range(0, 100, 5))
def test_matches_oracle_float32(seed):
    x, rois, output_size, scale = _case(seed)
    out = roialign.prroi_pool(x.float(), rois.float(), output_size, scale)
    want = oracle_prroi.prroi_pool(x.numpy(), rois.float().double().numpy(), scale, output_size)
    np.testing.assert_allclose(out.double().numpy(), want, atol=2e-5, rtol=1e-5)


def _awkward_boxes(rng, h, w, k):
    """Boxes with positive width and height, inside, across the edge, and far larger than the map."""
    boxes = []
    for i in range(k):
        lo = rng.uniform(-3, [w + 1, h + 1])
        size = rng.uniform(0.2, 3.0, 2) * (1 if i % 3 else 8)
        boxes.append([float(rng.integers(2)), lo[0], lo[1], lo[0] + size[0], lo[1] + size[1]])
    return torch.tensor(boxes, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(12))
def test_box_gradient_matches_finite_differences(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    x = torch.from_numpy(rng.standard_normal((2, 2, h, w)))
    rois = _awkward_boxes(rng, h, w, 4)
    output_size = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    _, _, gr, grad = _run(x, rois, output_size, 1.0)
    want = oracle_prroi.box_gradient_fd(x.numpy(), rois.numpy(), 1.0, output_size, grad.numpy())
    np.testing.assert_allclose(gr.numpy(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.interpreter_heavy
def test_gradcheck_with_respect_to_input_and_boxes():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((2, 3, 6, 7))).requires_grad_()
    rois = _awkward_boxes(rng, 6, 7, 3)
    index, coords = rois[:, :1], rois[:, 1:].clone().requires_grad_()  # the batch index is not perturbed
    assert torch.autograd.gradcheck(lambda a, b: roialign.prroi_pool(a, torch.cat((index, b), 1), (2, 3), 1.0),
                                    (x, coords))


# --- Degenerate bins: the limit of the mean ----------------------------------------------------


def test_a_point_box_is_the_interpolated_value():
    x = torch.rand(1, 2, 5, 6, dtype=torch.float64)
    px, py = 2.3, 1.6
    out = roialign.prroi_pool(x, torch.tensor([[0, px, py, px, py]], dtype=torch.float64), 2, 1.0)
    x0, y0, fx, fy = 2, 1, px - 2, py - 1
    want = ((1 - fy) * ((1 - fx) * x[0, :, y0, x0] + fx * x[0, :, y0, x0 + 1])
            + fy * ((1 - fx) * x[0, :, y0 + 1, x0] + fx * x[0, :, y0 + 1, x0 + 1]))
    torch.testing.assert_close(out[0], want[:, None, None].expand(2, 2, 2), atol=1e-14, rtol=0)


@pytest.mark.parametrize("axis", [0, 1])
def test_output_and_box_gradient_are_continuous_as_a_box_flattens(axis):
    x = torch.rand(1, 3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = [0, 1.3, 2.2, 5.7, 5.1]
    results = []
    for width in (0.0, 1e-9, 1e-7):
        box = list(base)
        box[3 + axis] = box[1 + axis] + width
        results.append(_run(x, torch.tensor([box], dtype=torch.float64), (2, 3), 1.0))
    (o0, g0, r0, _), (o1, g1, r1, _), (o2, g2, r2, _) = results
    torch.testing.assert_close(o1, o0, atol=1e-8, rtol=0)
    torch.testing.assert_close(g1, g0, atol=1e-8, rtol=0)
    torch.testing.assert_close(r1, r0, atol=1e-6, rtol=0)
    torch.testing.assert_close(r2, r0, atol=1e-5, rtol=0)
    assert r0[0, 3 + axis] != 0  # unlike mmcv, a flat box still has a gradient for its far edge


def test_inverted_box_pools_at_its_first_corner():
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    inverted = roialign.prroi_pool(x, torch.tensor([[0, 4.0, 3.0, 1.0, 1.0]], dtype=torch.float64), 2)
    point = roialign.prroi_pool(x, torch.tensor([[0, 4.0, 3.0, 4.0, 3.0]], dtype=torch.float64), 2)
    torch.testing.assert_close(inverted, point, atol=0, rtol=0)


# --- dtypes, layouts, bad boxes -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_follow_float32(dtype):
    x, rois, output_size, scale = _case(7)
    out, gx, gr, _ = _run(x.to(dtype), rois.to(dtype), output_size, scale)
    assert out.dtype == dtype and gx.dtype == dtype
    want = roialign.prroi_pool(x.to(dtype).float(), rois.to(dtype).float(), output_size, scale)
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2, equal_nan=True)


def test_channels_last_and_strided_inputs():
    x, rois, output_size, scale = _case(9)
    base = _run(x, rois, output_size, scale)
    cl = _run(x.contiguous(memory_format=torch.channels_last), rois, output_size, scale, base[3])
    strided = _run(torch.cat((x, x), 3)[..., :x.shape[3]], rois, output_size, scale, base[3])
    for other in (cl, strided):
        torch.testing.assert_close(other[0], base[0], equal_nan=True)
        torch.testing.assert_close(other[1], base[1])
    leaf = x.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    roialign.prroi_pool(leaf, rois, output_size, scale).sum().backward()
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last)


def test_nan_box_gives_nan_for_that_box_only_and_inputs_are_untouched():
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0], [0, float("nan"), 1.0, 4.0, 4.0], [0, 1.0, 1.0, float("inf"), 4.0]],
                        dtype=torch.float64)
    x0, r0 = x.clone(), rois.clone()
    out, gx, gr, _ = _run(x, rois, 2, 1.0)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
    assert torch.isfinite(gx).all() and torch.isfinite(gr[0]).all() and torch.isnan(gr[1:, 1:]).all()
    only_first = _run(x, rois[:1], 2, 1.0, _run(x, rois, 2, 1.0)[3][:1])
    torch.testing.assert_close(gx, only_first[1])
    assert torch.equal(x, x0)
    torch.testing.assert_close(rois, r0, equal_nan=True, atol=0, rtol=0)


def test_box_whose_width_overflows_is_not_finite(backend):
    # Finite corners whose difference overflows (1.7e308 - -1.7e308 = inf): bin 0 started at
    # x1 + 0 * inf = NaN, which the Numba kernels turned into pixel index INT64_MIN (a segfault)
    # and the reference one into an IndexError from inside. Such a box is not finite: NaN output,
    # NaN box gradient, nothing added to the input gradient; the other box is unaffected.
    x = torch.rand(1, 3, 9, 11, dtype=torch.float64)
    rois = torch.tensor([[0, -1.7e308, -1.7e308, 1.7e308, 1.7e308], [0, 1.0, 2.0, 6.0, 7.5],
                         [0, 1.0, -1.7e308, 6.0, 1.7e308]], dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        out, gx, gr, _ = _run(x.contiguous(memory_format=layout), rois, 2, 1.0)
        assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[1]).all()
        assert torch.isnan(gr[[0, 2], 1:]).all() and torch.isfinite(gr[1]).all()
        torch.testing.assert_close(gx, _run(x, rois[1:2], 2, 1.0, _run(x, rois, 2, 1.0)[3][1:2])[1])


def test_huge_box_is_cheap():
    import time

    x = torch.rand(1, 4, 20, 20, dtype=torch.float64)
    rois = torch.tensor([[0, -1e7, -1e7, 1e7, 1e7], [0, -1e30, 3.0, 1e30, 3.5]], dtype=torch.float64)
    start = time.perf_counter()
    out, gx, gr, _ = _run(x, rois, 2, 1.0)
    assert time.perf_counter() - start < 10
    assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gr).all()
    # Bins of 10^7 x 10^7 pixels: the map lies in bin (1, 1) but for half of its first row's and
    # column's hats, which reach into the bins before (every hat integrates to 1).
    half = torch.full((20,), 0.5, dtype=torch.float64)
    half[1:] = 0
    side = (half, torch.where(torch.arange(20) == 0, 0.5, 1.0).double())  # bin 0: pixel 0's left half
    for q in range(2):
        for p in range(2):
            want = torch.einsum("j,i,cji->c", side[q], side[p], x[0]) / 1e14
            torch.testing.assert_close(out[0, :, q, p], want, atol=0, rtol=1e-6)


@pytest.mark.interpreter_heavy
def test_backward_is_bitwise_deterministic_on_cpu():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 40, 50, generator=gen)
    xy = torch.rand(300, 2, generator=gen) * 300
    rois = torch.cat((torch.randint(0, 2, (300, 1), generator=gen).float(), xy, xy + 4 + torch.rand(300, 2) * 100), 1)
    grads = []
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        leaf, boxes = x.clone().requires_grad_(), rois.clone().requires_grad_()
        roialign.prroi_pool(leaf, boxes, 7, 1 / 8).square().sum().backward()
        grads.append((leaf.grad, boxes.grad))
    torch.set_num_threads(2)
    for g, r in grads[1:]:
        assert torch.equal(g, grads[0][0]) and torch.equal(r, grads[0][1])


# --- API and the op -----------------------------------------------------------------------------


def test_list_of_boxes_and_the_module():
    x = torch.rand(2, 3, 8, 9)
    boxes = [torch.tensor([[1.0, 1.0, 5.0, 6.0]]), torch.tensor([[0.0, 2.0, 3.0, 7.0], [2.0, 2.0, 4.0, 4.0]])]
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 0.0, 2.0, 3.0, 7.0], [1, 2.0, 2.0, 4.0, 4.0]])
    module = roialign.PrRoIPool((2, 3), 0.5)
    torch.testing.assert_close(module(x, boxes), roialign.prroi_pool(x, rois, (2, 3), 0.5))
    assert repr(module) == "PrRoIPool(output_size=(2, 3), spatial_scale=0.5)"


@pytest.mark.parametrize("call, error, match", [
    (lambda x, r: roialign.prroi_pool(x, r, 0), ValueError, "output_size must be positive"),
    (lambda x, r: roialign.prroi_pool(x, r, 2, -1.0), ValueError, "spatial_scale must be finite and positive"),
    (lambda x, r: roialign.prroi_pool(x, r, 2, "1"), TypeError, "spatial_scale must be a float"),
    (lambda x, r: roialign.prroi_pool(x, r[:, :4], 2), ValueError, r"rois must have shape \[K, 5\]"),
    (lambda x, r: roialign.prroi_pool(x[0], r, 2), ValueError, "input must be a 4-D tensor"),
    (lambda x, r: roialign.prroi_pool(x.long(), r, 2), TypeError, "input must be a floating-point tensor"),
    (lambda x, r: roialign.prroi_pool(x, r + torch.tensor([3.0, 0, 0, 0, 0]), 2), IndexError, r"rois\[:, 0\]"),
    (lambda x, r: roialign.prroi_pool(x.numpy(), r, 2), TypeError, "input must be a torch.Tensor"),
    (lambda x, r: roialign.PrRoIPool((2, 0)), ValueError, "output_size must be positive"),
])
def test_bad_arguments_are_named(call, error, match):
    x, rois = torch.rand(1, 2, 5, 5), torch.tensor([[0, 0.0, 0, 2, 2]])
    with pytest.raises(error, match=match):
        call(x, rois)


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_inputs(channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(2, 2, 5, 5).contiguous(memory_format=memory_format).requires_grad_()
    # A backward with boxes first, so that buffers the CPU kernels reuse hold other values.
    roialign.prroi_pool(x, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 1.0, 0.0, 3.0, 2.0]]), 3).sum().backward()
    x.grad = None
    out = roialign.prroi_pool(x, torch.zeros(0, 5), 3)
    assert out.shape == (0, 2, 3, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # an image without boxes gets a zero gradient
    x.grad = None
    roialign.prroi_pool(x, torch.tensor([[1, 0.0, 0.0, 4.0, 4.0]]), 3).sum().backward()
    assert torch.equal(x.grad[0], torch.zeros_like(x[0])) and x.grad[1].abs().sum() > 0


def _sample_inputs():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 7, 9, dtype=dtype, generator=gen)
        rois = torch.tensor([[0, 1.0, 1.5, 5.0, 6.0], [1, -2.0, 0.5, 4.0, 3.0]], dtype=dtype)
        yield (x, rois, 1.0, 2, 3)
        yield (x.requires_grad_(), rois.clone().requires_grad_(), 0.5, 3, 2)


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    args = list(_sample_inputs())[index]
    torch.library.opcheck(torch.ops.roialign.prroi_pool.default, args)


def test_compile_fullgraph_and_export():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.5, 5.0, 6.0], [1, -2.0, 0.5, 4.0, 3.0]])
    model = roialign.PrRoIPool(3, 1.0)
    eager = model(x, rois)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rois), eager)
    exported = torch.export.export(model, (x, rois))
    assert any("prroi_pool" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x, rois), eager)


def test_only_the_gradients_asked_for():
    x, rois, output_size, scale = _case(11)
    _, want_gx, want_gr, go = _run(x, rois, output_size, scale)
    leaf = x.detach().clone().requires_grad_()
    roialign.prroi_pool(leaf, rois.detach(), output_size, scale).backward(go)
    torch.testing.assert_close(leaf.grad, want_gx)
    boxes = rois.detach().clone().requires_grad_()
    roialign.prroi_pool(x.detach(), boxes, output_size, scale).backward(go)
    torch.testing.assert_close(boxes.grad, want_gr, equal_nan=True)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_is_refused_with_a_clear_error(dynamo, tmp_path):
    x, rois = torch.rand(1, 1, 4, 4), torch.tensor([[0, 0.0, 0, 2, 2]])
    match = "no ONNX equivalent|No ONNX function found for .*roialign.prroi_pool"
    with pytest.raises(Exception, match=match):
        torch.onnx.export(roialign.PrRoIPool(2), (x, rois), str(tmp_path / "m.onnx"), dynamo=dynamo)
