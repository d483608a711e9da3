"""Bad input gives a clear Python exception naming the argument; nothing passed in is modified."""

from __future__ import annotations

import math

import pytest
import torch

import roialign

X = torch.randn(2, 3, 8, 8)
ROIS = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 7.0, 3.0]])


@pytest.mark.parametrize("call, error, message", [
    (lambda: roialign.roi_align(X, ROIS[:, :4], 2), ValueError, r"rois must have shape \[K, 5\].*got \[2, 4\]"),
    (lambda: roialign.roi_align(X, ROIS[0], 2), ValueError, r"rois must have shape \[K, 5\]"),
    (lambda: roialign.roi_align(X, [ROIS[:, 1:], ROIS[:, :3]], 2), ValueError, r"boxes\[1\] must have shape \[L, 4\]"),
    (lambda: roialign.roi_align(X, [ROIS[:, 1:], "box"], 2), TypeError, r"boxes\[1\] must be a tensor"),
    (lambda: roialign.roi_align(X, [], 2), ValueError, r"boxes must not be an empty list"),
    (lambda: roialign.roi_align(X, "boxes", 2), TypeError, r"boxes must be"),
    (lambda: roialign.roi_align(X[0], ROIS, 2), ValueError, r"input must be a 4-D tensor"),
    (lambda: roialign.roi_align(X.numpy(), ROIS, 2), TypeError, r"input must be a torch.Tensor"),
    (lambda: roialign.roi_align(X.long(), ROIS, 2), TypeError, r"input must be a floating-point tensor"),
    (lambda: roialign.roi_align(X, ROIS.long(), 2), TypeError, r"rois must be a floating-point tensor"),
    (lambda: roialign.roi_align(X, ROIS, 0), ValueError, r"output_size must be positive"),
    (lambda: roialign.roi_align(X, ROIS, (3, -1)), ValueError, r"output_size must be positive"),
    (lambda: roialign.roi_align(X, ROIS, (3, 2, 1)), TypeError, r"output_size must be an int or a pair"),
    (lambda: roialign.roi_align(X, ROIS, 2.5), TypeError, r"output_size must be an int or a pair"),
    (lambda: roialign.roi_align(X, ROIS, 2**40), ValueError, r"output_size must have at most 2\*\*31 - 1 bins"),
    (lambda: roialign.prroi_pool(X, ROIS, (2**20, 2**12)), ValueError, r"output_size must have at most"),
    (lambda: roialign.roi_align_rotated(X, torch.tensor([[0, 4.0, 4.0, 3.0, 2.0, 30.0]]), 2**70), ValueError,
     r"output_size must have at most"),
    (lambda: roialign.roi_align(X, ROIS, 2, spatial_scale=0.0), ValueError, r"spatial_scale must be finite and positive"),
    (lambda: roialign.roi_align(X, ROIS, 2, spatial_scale=math.nan), ValueError, r"spatial_scale"),
    (lambda: roialign.roi_align(X, ROIS, 2, spatial_scale="1"), TypeError, r"spatial_scale must be a float"),
    (lambda: roialign.roi_align(X, ROIS, 2, sampling_ratio=1.5), TypeError, r"sampling_ratio must be an int"),
    (lambda: roialign.roi_align(X, ROIS, 2, aligned=1), TypeError, r"aligned must be a bool"),
    # Ratios beyond a million samples per bin exhausted memory, ran for hours or overflowed.
    (lambda: roialign.roi_align(X, ROIS, 2, sampling_ratio=1025), ValueError, r"sampling_ratio must be at most 1024"),
    (lambda: roialign.roi_align(X, ROIS, 2, sampling_ratio=10**6, mode="max"), ValueError, r"sampling_ratio"),
    (lambda: roialign.roi_align(X, ROIS, 2, sampling_ratio=2**70), ValueError, r"sampling_ratio.*got 1180591"),
    (lambda: roialign.roi_align(X, ROIS, 2, sampling_ratio=-2**70), ValueError, r"sampling_ratio.*-2\*\*31"),
    (lambda: roialign.roi_align_rotated(X, torch.tensor([[0, 4.0, 4.0, 3.0, 2.0, 30.0]]), 2, 1.0, 10**6), ValueError,
     r"sampling_ratio must be at most 1024"),
    (lambda: roialign.ROIAlign(3, 1.0, 4096), ValueError, r"sampling_ratio must be at most 1024"),
    (lambda: roialign.MultiScaleRoIAlign(["p2"], 7, 2**40), ValueError, r"sampling_ratio must be at most 1024"),
    (lambda: torch.ops.roialign.roi_align(X, ROIS, 1.0, 2, 2, 5000, True), ValueError,
     r"sampling_ratio must be at most 1024"),
    (lambda: torch.ops.roialign.roi_align_rotated(X, torch.tensor([[0, 4.0, 4.0, 3.0, 2.0, 30.0]]), 1.0, 2, 2, 5000,
                                                  True, False, True), ValueError, r"sampling_ratio"),
    (lambda: roialign.roi_align(X, ROIS.to("meta"), 2), ValueError, r"input and rois must be on the same device"),
    (lambda: roialign.roi_align(X, torch.tensor([[2.0, 1, 1, 5, 5]]), 2), IndexError, r"rois\[0, 0\] is 2.0"),
    (lambda: roialign.roi_align(X, torch.tensor([[0, 1, 1, 5, 5], [-1.0, 1, 1, 5, 5]]), 2), IndexError,
     r"rois\[1, 0\] is -1.0"),
    (lambda: roialign.roi_align(X, torch.tensor([[0.5, 1, 1, 5, 5]]), 2), IndexError, r"integer batch indices"),
    (lambda: roialign.roi_align(X, torch.tensor([[math.nan, 1, 1, 5, 5]]), 2), IndexError, r"integer batch indices"),
    (lambda: roialign.roi_align(X[:0], torch.tensor([[0.0, 1, 1, 5, 5]]), 2), IndexError, r"\[0, 0\)"),
    (lambda: roialign.ROIAlign((0, 3), 1.0, 2), ValueError, r"output_size must be positive"),
    (lambda: roialign.ROIAlign(3, -1.0, 2), ValueError, r"spatial_scale"),
    (lambda: roialign.ROIAlign(3, 1.0, None), TypeError, r"sampling_ratio must be an int"),
    (lambda: torch.ops.roialign.roi_align(X, ROIS, 1.0, 0, 2, 2, True), ValueError, r"output_size must be positive"),
])
def test_bad_input_raises_clearly(backend, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        with roialign.use_backend("cuda"):
            pass


def test_nothing_passed_in_is_modified(backend):
    x = torch.randn(2, 3, 8, 8).requires_grad_()
    boxes = [torch.tensor([[1.0, 1.0, 5.0, 5.0]], requires_grad=True), torch.tensor([[0.0, 2.0, 7.0, 3.0]])]
    rois = ROIS.clone().requires_grad_()
    before = [t.detach().clone() for t in (x, rois, *boxes)]
    roialign.roi_align(x, boxes, 2, 0.5, 2, True).sum().backward()
    roialign.ROIAlign(2, 0.5, 0)(x, rois).sum().backward()
    for t, b in zip((x, rois, *boxes), before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 3e38])
def test_non_finite_box_gives_nan_for_that_box_only(backend, bad):
    """A box with a NaN or infinite coordinate (also after scaling) gives NaN output and NaN box gradient;
    the other boxes and the input gradient are unaffected."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [0, 1.0, bad, 5.0, 5.0], [0, 2.0, 2.0, 7.0, 6.0]], requires_grad=True)
    out = roialign.roi_align(x, rois, 3, spatial_scale=4.0, sampling_ratio=0, aligned=True)
    out.sum().backward()
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    assert rois.grad[1, 1:].isnan().all() and rois.grad[[0, 2]].isfinite().all()
    assert x.grad.isfinite().all()
    good = roialign.roi_align(x.detach(), rois.detach()[[0, 2]], 3, spatial_scale=4.0, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(out[[0, 2]], good)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.5, math.nan, math.inf])
def test_batch_index_check_names_the_first_bad_box_in_every_dtype(dtype, bad):
    rois = torch.tensor([[0, 1, 1, 5, 5]] * 6, dtype=dtype)
    rois[3, 0], rois[5, 0] = bad, bad
    with pytest.raises(IndexError, match=r"rois\[3, 0\]"):
        roialign.roi_align(X.to(dtype), rois, 2)
    with pytest.raises(IndexError, match=r"rois\[3, 0\]"):  # a strided view of the boxes, checked in place
        roialign.roi_align(X.to(dtype), torch.cat((rois, rois), dim=1)[:, :5], 2)
    rois[3, 0], rois[5, 0] = 1.0, 0.0
    assert roialign.roi_align(X.to(dtype), rois, 2).shape == (6, X.shape[1], 2, 2)


@pytest.mark.interpreter_heavy
def test_the_largest_sampling_ratio_runs(backend):
    """sampling_ratio=1024, the largest accepted (a million samples per bin), runs on every
    backend: its average is the bin's exact average (PrRoIPool's) to within the midpoint rule's
    error, the rotated op at 0 degrees takes the same samples, and max mode agrees across
    backends."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64)
    rois = torch.tensor([[0, 0.7, 1.2, 5.9, 4.4], [0, 2.0, 0.6, 3.1, 5.4]], dtype=torch.float64)
    out = roialign.roi_align(x, rois, 2, 1.0, 1024, aligned=True)
    shifted = rois.clone()
    shifted[:, 1:] -= 0.5  # PrRoIPool has pixels at integer coordinates, aligned RoIAlign at half-integers
    exact = roialign.prroi_pool(x, shifted, 2, 1.0)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-5)
    assert (out - exact).abs().max() < (roialign.roi_align(x, rois, 2, 1.0, 4, aligned=True) - exact).abs().max()
    centre, size = (rois[:, 1:3] + rois[:, 3:5]) / 2, rois[:, 3:5] - rois[:, 1:3]
    rotated = torch.cat([rois[:, :1], centre, size, torch.zeros(2, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(roialign.roi_align_rotated(x, rotated, 2, 1.0, 1024), out, rtol=0, atol=1e-12)
    most = roialign.roi_align(x, rois, 2, 1.0, 1024, aligned=True, mode="max")
    with roialign.use_backend("reference"):
        want = roialign.roi_align(x, rois, 2, 1.0, 1024, aligned=True, mode="max")
    torch.testing.assert_close(most, want, rtol=0, atol=1e-12)


# Backward operators called directly (autograd always passes consistent arguments): a gradient,
# box tensor or size that does not match would have the kernels index outside their buffers.
G = torch.ones(2, 3, 2, 2)  # the gradient of a 2 x 2 forward of X and ROIS
R6 = torch.tensor([[0, 4.0, 4.0, 3.0, 2.0, 30.0], [1, 3.0, 5.0, 4.0, 4.0, 0.0]])
ops = torch.ops.roialign
MANY = ROIS[:1].repeat(4000, 1)


@pytest.mark.parametrize("call, error, message", [
    (lambda: ops.roi_align_backward(G[:1], MANY, 1.0, 2, 2, 2, 3, 8, 8, 1, True, False), ValueError,
     r"grad must have the forward output's shape \[K, C, PH, PW\] = \[4000, 3, 2, 2\]; got \[1, 3, 2, 2\]"),
    (lambda: ops.roi_align_backward(G, ROIS, 1.0, 2, 2, 2, 64, 8, 8, 1, True, False), ValueError, r"grad must have"),
    (lambda: ops.roi_align_backward(G, ROIS, 1.0, 50, 50, 2, 3, 8, 8, 1, True, False), ValueError, r"grad must have"),
    (lambda: ops.roi_align_backward(G, ROIS, 1.0, 2, 2, 1, 3, 8, 8, 1, True, False), IndexError,
     r"rois\[1, 0\] is 1.0"),
    (lambda: ops.roi_align_backward(G, ROIS, 1.0, 2, 2, -2, 3, 8, 8, 1, True, False), ValueError, r"must be >= 0"),
    (lambda: ops.roi_align_backward(G, ROIS[:, :4], 1.0, 2, 2, 2, 3, 8, 8, 1, True, False), ValueError,
     r"rois must be a floating-point tensor of shape \[K, 5\]"),
    (lambda: ops.roi_align_backward(G.long(), ROIS, 1.0, 2, 2, 2, 3, 8, 8, 1, True, False), TypeError,
     r"grad must be a floating-point"),
    (lambda: ops.roi_align_backward(G, ROIS, 1.0, 0, 2, 2, 3, 8, 8, 1, True, False), ValueError,
     r"output_size must be positive"),
    (lambda: ops.roi_align_backward(G, ROIS, 1.0, 2, 2, 2, 3, 8, 8, 5000, True, False), ValueError, r"sampling_ratio"),
    (lambda: ops.roi_align_backward(G.to("meta"), ROIS, 1.0, 2, 2, 2, 3, 8, 8, 1, True, False), ValueError,
     r"grad and rois must be on the same device"),
    (lambda: ops.roi_align_backward_rois(G[:, :, :1, :1], X, ROIS, 1.0, 9, 9, 1, True), ValueError, r"grad must have"),
    (lambda: ops.roi_align_backward_rois(G, X, ROIS[:, :4], 1.0, 2, 2, 1, True), ValueError, r"rois must have shape"),
    (lambda: ops.roi_align_backward_rois(G.double(), X, ROIS, 1.0, 2, 2, 1, True), TypeError,
     r"grad must have the input's dtype"),
    (lambda: ops.roi_align_backward_rois(G, X.to("meta"), ROIS, 1.0, 2, 2, 1, True), ValueError, r"same device"),
    (lambda: ops.roi_align_rotated_backward(G[:1], R6.repeat(2000, 1), 1.0, 2, 2, 2, 3, 8, 8, 1, True, False, True,
                                            False), ValueError, r"grad must have"),
    (lambda: ops.roi_align_rotated_backward_rois(G, X, R6, 1.0, 3, 3, 1, True, False, True), ValueError,
     r"grad must have"),
    (lambda: ops.roi_align_rotated_backward_rois(G, X[:1], R6, 1.0, 2, 2, 1, True, False, True), IndexError,
     r"batch indices"),
    (lambda: ops.roi_align_max_backward(G[:1], X, MANY, 1.0, 2, 2, 1, True, True, False), ValueError, r"grad must have"),
    (lambda: ops.roi_align_max_backward(G, X, ROIS * torch.tensor([9.0, 1, 1, 1, 1]), 1.0, 2, 2, 1, True, True, False),
     IndexError, r"batch indices"),
    (lambda: ops.prroi_pool_backward(G[:1], X, MANY, 1.0, 2, 2, False), ValueError, r"grad must have"),
    (lambda: ops.prroi_pool_backward(G, X, ROIS, 1.0, 2, 3, False), ValueError, r"grad must have"),
    (lambda: ops.multiscale_roi_align_backward(G, ROIS, torch.tensor([0, 1]), [1.0, 0.5], 2, 2, [2, 3, 8, 8],
                                               [2, 2], [False, False], 1, True), ValueError, r"describe the same"),
    (lambda: ops.multiscale_roi_align_backward(G, ROIS, torch.tensor([0, 1]), [1.0], 2, 2, [2, 3, 8, 8], [7],
                                               [False], 1, True), ValueError, r"dtypes must index"),
    (lambda: ops.multiscale_roi_align_backward(G, ROIS, torch.tensor([0, 1]), [1.0], 2, 2, [2, 3, 8, 8], [2],
                                               [False], 1, True), IndexError, r"levels must lie in"),
    (lambda: ops.multiscale_roi_align_backward(G[:1], ROIS, torch.tensor([0, 0]), [1.0], 2, 2, [2, 3, 8, 8], [2],
                                               [False], 1, True), ValueError, r"grad must have"),
    (lambda: ops.multiscale_roi_align_backward(G, ROIS, torch.tensor([0, 0]), [1.0, 0.5], 2, 2,
                                               [2, 3, 8, 8, 2, 4, 4, 4], [2, 2], [False, False], 1, True), ValueError,
     r"batch size and channels of the first"),
    (lambda: ops.multiscale_roi_align_backward_rois(G, [X], ROIS, torch.tensor([0, 3]), [1.0], 2, 2, 1, True),
     IndexError, r"levels must lie in"),
    (lambda: ops.multiscale_roi_align_backward_rois(G[:1], [X], ROIS, torch.tensor([0, 0]), [1.0], 2, 2, 1, True),
     ValueError, r"grad must have"),
])
def test_backward_operators_check_their_arguments(backend, call, error, message):
    with roialign.use_backend(backend), pytest.raises(error, match=message):
        call()


def test_backward_operators_take_what_autograd_passes(backend):
    # The checks refuse nothing that a forward's own gradient carries: every operator, both layouts.
    x = X.clone().requires_grad_()
    xl = X.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    with roialign.use_backend(backend):
        for features in (x, xl):
            rois = ROIS.clone().requires_grad_()
            rotated = R6.clone().requires_grad_()
            outputs = [roialign.roi_align(features, rois, 2, 1.0, 2, True),
                       roialign.roi_align(features, rois, 2, 1.0, 2, True, mode="max"),
                       roialign.prroi_pool(features, rois, 2),
                       roialign.roi_align_rotated(features, rotated, 2, 1.0, 2)]
            sum(out.sum() for out in outputs).backward()
            assert features.grad.abs().sum() > 0 and rois.grad.abs().sum() > 0 and rotated.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -0.5])
def test_operators_called_directly_check_spatial_scale(backend, scale):
    # The API refuses these before the operators; called directly, they gave NaN or zeros.
    calls = [lambda: ops.roi_align(X, ROIS, scale, 2, 2, 1, True),
             lambda: ops.roi_align_max(X, ROIS, scale, 2, 2, 1, True, False),
             lambda: ops.prroi_pool(X, ROIS, scale, 2, 2),
             lambda: ops.roi_align_rotated(X, R6, scale, 2, 2, 1, True, False, True),
             lambda: ops.roi_align_backward(G, ROIS, scale, 2, 2, 2, 3, 8, 8, 1, True, False),
             lambda: ops.roi_align_backward_rois(G, X, ROIS, scale, 2, 2, 1, True),
             lambda: ops.roi_align_rotated_backward(G, R6, scale, 2, 2, 2, 3, 8, 8, 1, True, False, True, False),
             lambda: ops.roi_align_rotated_backward_rois(G, X, R6, scale, 2, 2, 1, True, False, True),
             lambda: ops.roi_align_max_backward(G, X, ROIS, scale, 2, 2, 1, True, False, False),
             lambda: ops.prroi_pool_backward(G, X, ROIS, scale, 2, 2, False)]
    with roialign.use_backend(backend):
        for call in calls:
            with pytest.raises(ValueError, match="spatial_scale must be finite and positive"):
                call()
        levels = torch.tensor([0, 1])
        for call in (lambda: ops.multiscale_roi_align([X, X], ROIS, levels, [0.5, scale], 2, 2, 1, True),
                     lambda: ops.multiscale_roi_align_backward(G, ROIS, levels, [0.5, scale], 2, 2, [2, 3, 8, 8] * 2,
                                                               [2, 2], [False, False], 1, True),
                     lambda: ops.multiscale_roi_align_backward_rois(G, [X, X], ROIS, levels, [0.5, scale], 2, 2, 1,
                                                                    True)):
            with pytest.raises(ValueError, match=r"scales\[1\] must be finite and positive"):
                call()


@pytest.mark.parametrize("make", [
    lambda: roialign.ROIAlign(7, 0.25, 2),
    lambda: roialign.ROIAlignRotated(7, 0.25, 2),
    lambda: roialign.PrRoIPool(7, 0.25),
    lambda: roialign.MultiScaleRoIAlign(["0", "1"], 7, 2),
    lambda: __import__("roialign.compat.mmcv", fromlist=["RoIAlign"]).RoIAlign(7, 0.25, 2),
    lambda: __import__("roialign.compat.mmcv", fromlist=["RoIAlignRotated"]).RoIAlignRotated(7, 0.25, 2),
], ids=["ROIAlign", "ROIAlignRotated", "PrRoIPool", "MultiScaleRoIAlign", "mmcv.RoIAlign", "mmcv.RoIAlignRotated"])
def test_torch_jit_script_of_a_module_says_why_it_cannot(make):
    # Before, TorchScript failed deep inside with a parse error ("Comprehension ifs are not
    # supported yet", "Compiled functions can't take variable number of arguments").
    import warnings

    module = make()
    inner = torch.nn.Sequential(module)  # inside a model, as a user would meet it
    for target in (module, inner):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
            with pytest.raises(RuntimeError, match=r"cannot be compiled by torch\.jit\.script.*patch_torchvision"):
                torch.jit.script(target)
