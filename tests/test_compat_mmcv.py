"""roialign.compat.mmcv: mmcv's RoIAlign signatures, checked against mmcv's published values."""

import warnings

import pytest
import torch

import roialign
from roialign.compat.mmcv import RoIAlign, roi_align, roi_align_rotated

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# mmcv tests/test_ops/test_roi_align.py (avg mode): pool 2x2, spatial_scale 1, sampling_ratio 2,
# aligned=True; (input, rois) -> (output, input gradient for a gradient of ones).
PUBLISHED_INPUTS = [
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]], [[0., 0., 0., 3., 3.]]),
]
PUBLISHED_OUTPUTS = [
    ([[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875], [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250], [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]
# mmcv's published tolerance is atol 1e-3; the values are exact binary fractions, so float64 must
# match far tighter, and the half types within about one unit in the last place.
TOLERANCES = {
    torch.float64: [dict(atol=1e-3, rtol=0), dict(atol=1e-12, rtol=0)],
    torch.float32: [dict(atol=1e-3, rtol=0), dict(atol=1e-6, rtol=0)],
    torch.float16: [dict(atol=1e-3, rtol=1e-3)],
    torch.bfloat16: [dict(atol=1e-3, rtol=8e-3)],
}


def _published_call(kind: str):
    if kind == "module":
        layer = RoIAlign((2, 2), 1.0, 2, "avg", True)
        return lambda x, rois: layer(x, rois)
    return lambda x, rois: roi_align(x, rois, (2, 2), 1.0, 2, "avg", True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("kind", ["module", "functional"])
@pytest.mark.parametrize("case", range(len(PUBLISHED_INPUTS)))
def test_published_mmcv_values(backend, case, kind, dtype, device):
    if backend == "numba" and device != "cpu":
        pytest.skip("numba runs on CPU tensors only")
    (x, rois), (expected_out, expected_grad) = PUBLISHED_INPUTS[case], PUBLISHED_OUTPUTS[case]
    x = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
    rois = torch.tensor(rois, dtype=dtype, device=device)
    out = _published_call(kind)(x, rois)
    out.backward(torch.ones_like(out))
    assert out.dtype == dtype and x.grad.dtype == dtype
    for tol in TOLERANCES[dtype]:
        torch.testing.assert_close(out.double().cpu(), torch.tensor(expected_out, dtype=torch.float64), **tol)
        torch.testing.assert_close(x.grad.double().cpu(), torch.tensor(expected_grad, dtype=torch.float64), **tol)


def _random_inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 13, 11, generator=g, dtype=dtype)
    k = 6
    xy1 = torch.rand(k, 2, generator=g, dtype=torch.float64) * 30 - 4
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 25
    rois = torch.cat([torch.randint(0, 2, (k, 1), generator=g).double(), xy1, xy1 + wh], dim=1).to(dtype)
    rois[0, 3:] = rois[0, 1:3]  # a degenerate box: aligned=False widens it to one pixel
    return x, rois


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_same_as_torchvision_order_api_bitwise(aligned, sampling_ratio, dtype):
    x, rois = _random_inputs(7 + sampling_ratio + aligned, dtype)
    expected = roialign.roi_align(x, rois, (5, 4), 0.5, sampling_ratio, aligned)
    module = RoIAlign((5, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    assert torch.equal(module(x, rois), expected)
    assert torch.equal(roi_align(x, rois, (5, 4), 0.5, sampling_ratio, "avg", aligned), expected)
    assert torch.equal(roi_align(x, rois, output_size=(5, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio,
                                 aligned=aligned), expected)


def test_gradients_same_as_torchvision_order_api_including_boxes():
    x, rois = _random_inputs(3, torch.float64)
    grads = []
    for call in (lambda a, b: roialign.roi_align(a, b, 3, 0.25, 0, True),
                 lambda a, b: RoIAlign(3, 0.25)(a, b)):
        a, b = x.clone().requires_grad_(), rois.clone().requires_grad_()
        out = call(a, b)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape))
        grads.append((a.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    assert grads[1][1][:, 1:].abs().sum() > 0  # box gradients, which mmcv does not give


def test_defaults_are_mmcvs():
    x, rois = _random_inputs(11)
    expected = roialign.roi_align(x, rois, 7, 1.0, 0, True)
    module = RoIAlign(7)
    assert (module.spatial_scale, module.sampling_ratio, module.pool_mode, module.aligned,
            module.use_torchvision) == (1.0, 0, "avg", True, False)
    assert torch.equal(module(x, rois), expected)
    assert torch.equal(roi_align(x, rois, 7), expected)


def test_output_size_is_a_pair_and_mmdetection_construction():
    layer = RoIAlign(spatial_scale=1 / 16, **dict(output_size=7, sampling_ratio=0))
    assert layer.output_size == (7, 7) and type(layer.output_size) is tuple
    assert all(type(v) is int for v in layer.output_size)
    assert layer.spatial_scale == 1 / 16 and layer.sampling_ratio == 0
    assert RoIAlign([3, 5]).output_size == (3, 5)
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 8.0, 16, 100, 90]])
    assert torch.equal(layer(x, rois), roialign.roi_align(x, rois, 7, 1 / 16, 0, True))
    assert layer(x, rois).shape == (1, 2, 7, 7)


def test_positional_call_as_in_mmdetection_mask_targets():
    x, rois = _random_inputs(5)
    out = roi_align(x, rois, (4, 4), 1.0, 0, "avg", True)
    assert out.shape == (rois.shape[0], x.shape[1], 4, 4)
    assert torch.equal(out, roialign.roi_align(x, rois, (4, 4), 1.0, 0, True))
    # The module's positional order too: output_size, spatial_scale, sampling_ratio, pool_mode,
    # aligned, use_torchvision.
    layer = RoIAlign(4, 0.5, 2, "avg", False, True)
    assert (layer.output_size, layer.spatial_scale, layer.sampling_ratio, layer.pool_mode, layer.aligned,
            layer.use_torchvision) == ((4, 4), 0.5, 2, "avg", False, True)


@pytest.mark.parametrize("use_torchvision", [False, True])
def test_use_torchvision_is_ignored(use_torchvision):
    x, rois = _random_inputs(9)
    assert torch.equal(RoIAlign(3, 0.5, 2, use_torchvision=use_torchvision)(x, rois),
                       roialign.roi_align(x, rois, 3, 0.5, 2, True))


def test_deprecated_aliases_work_and_warn():
    with pytest.warns(DeprecationWarning, match="out_size"):
        layer = RoIAlign(out_size=5, spatial_scale=0.5)
    assert layer.output_size == (5, 5)
    with pytest.warns(DeprecationWarning, match="sample_num"):
        layer = RoIAlign(5, 0.5, sample_num=3)
    assert layer.sampling_ratio == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = RoIAlign(out_size=(2, 3), sample_num=1)
    assert sorted(str(w.message).split("'")[1] for w in caught if w.category is DeprecationWarning) == [
        "out_size", "sample_num"]
    assert caught[0].filename == __file__  # the warning points at the caller
    assert (layer.output_size, layer.sampling_ratio) == ((2, 3), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RoIAlign(output_size=5, sampling_ratio=3)  # the new names do not warn


@pytest.mark.parametrize("kwargs, args", [
    (dict(out_size=5, output_size=5), ()),
    (dict(out_size=5), (5,)),
    (dict(sample_num=2, sampling_ratio=2), (5,)),
    (dict(sample_num=2), (5, 1.0, 2)),
])
def test_alias_and_new_name_together_is_a_type_error(kwargs, args):
    with pytest.raises(TypeError, match="deprecated"):
        RoIAlign(*args, **kwargs)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        RoIAlign(5, sample_number=2)


def test_pool_mode_max_is_mmcv_max_mode():
    import numpy as np
    import oracle_max

    x, rois = _random_inputs(1)
    want = roialign.roi_align(x, rois, 7, 0.5, 0, True, mode="max")
    torch.testing.assert_close(RoIAlign(7, 0.5, pool_mode="max")(x, rois), want)
    torch.testing.assert_close(roi_align(x, rois, 7, 0.5, 0, "max", True), want)
    oracle, _, _ = oracle_max.roi_align_max(x.double().numpy(), rois.double().numpy(), 0.5, 7, 7, 0, True, "max")
    np.testing.assert_allclose(want.double().numpy(), oracle, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("pool_mode", ["foo", "AVG", None, 0])
def test_other_pool_mode_is_a_value_error(pool_mode):
    x, rois = _random_inputs(1)
    with pytest.raises(ValueError, match="pool_mode"):
        RoIAlign(7, pool_mode=pool_mode)
    with pytest.raises(ValueError, match="pool_mode"):
        roi_align(x, rois, 7, 1.0, 0, pool_mode, True)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(output_size=0), ValueError, "output_size"),
    (dict(output_size=2.5), TypeError, "output_size"),
    (dict(output_size=7, spatial_scale=0.0), ValueError, "spatial_scale"),
    (dict(output_size=7, sampling_ratio=1.5), TypeError, "sampling_ratio"),
    (dict(output_size=7, aligned=1), TypeError, "aligned"),
    (dict(output_size=7, use_torchvision="yes"), TypeError, "use_torchvision"),
])
def test_bad_arguments_are_named(kwargs, error, name):
    with pytest.raises(error, match=name):
        RoIAlign(**kwargs)


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("rois, error, match", [
    ("boxes", TypeError, r"^rois must be a \[K, \d\] tensor"),
    ([[1.0, 2.0, 3.0, 4.0]], TypeError, r"^rois\[0\] must be a tensor"),
    ([torch.zeros(2, 3)], ValueError, r"^rois\[0\] must have shape"),
    ([], ValueError, r"^rois must not be an empty list"),
])
def test_bad_rois_lists_name_mmcvs_argument(rotated, rois, error, match):
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(error, match=match):
        (roi_align_rotated if rotated else roi_align)(x, rois, 2)


def test_repr_shows_mmcvs_arguments():
    text = repr(RoIAlign(7, 0.0625, 0))
    assert text == ("RoIAlign(output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=0, pool_mode=avg, "
                    "aligned=True, use_torchvision=False)")


def test_fx_symbolic_trace_of_module():
    module = RoIAlign(5, 0.5, 0, aligned=False)
    gm = torch.fx.symbolic_trace(module)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [roi_align]
    x, rois = _random_inputs(13)
    assert torch.equal(gm(x, rois), module(x, rois))


def test_fx_symbolic_trace_of_functional_inside_a_module():
    class Net(torch.nn.Module):
        def forward(self, x, rois):
            return roi_align(x, rois, (4, 4), 1.0, 0, "avg", True) + 1

    gm = torch.fx.symbolic_trace(Net())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(roi_align) == 1
    x, rois = _random_inputs(17)
    assert torch.equal(gm(x, rois), Net()(x, rois))
