"""Every backend against the float64 loop oracle, the seed's example and the peers' published values."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import roialign
import oracle
from cases import random_case

N_RANDOM = 300


@functools.lru_cache(maxsize=None)
def expected(seed: int, dtype: torch.dtype):
    case = random_case(seed)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(case.rois.shape[0], case.x.shape[1], *case.output_size, generator=gen, dtype=torch.float64)
    x = case.x.to(dtype).double()  # the values the kernel sees
    geometry = np.float64 if dtype == torch.float64 else np.float32
    out, gx, gr = oracle.roi_align(x.numpy(), case.rois.numpy(), *case.args(), grad_out=grad_out.numpy(),
                                   geometry=geometry)
    return case, grad_out, tuple(torch.from_numpy(a) for a in (out, gx, gr))


def run_op(case, grad_out, dtype):
    # Fresh leaves: ``.to`` returns the cached case's own tensor when the dtype already matches.
    x = case.x.to(dtype).clone().requires_grad_()
    rois = case.rois.to(dtype).clone().requires_grad_()
    out = torch.ops.roialign.roi_align(x, rois, *case.args())
    out.backward(grad_out.to(dtype))
    return out, x.grad, rois.grad


TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5)}
BOX_GRAD_TOLERANCE = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=2e-4, rtol=1e-4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_random_cases_match_oracle(backend, seed, dtype):
    case, grad_out, (out_ref, gx_ref, gr_ref) = expected(seed, dtype)
    out, gx, gr = run_op(case, grad_out, dtype)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), out_ref, equal_nan=True, **TOLERANCE[dtype])
    torch.testing.assert_close(gx.double(), gx_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(gr.double(), gr_ref, equal_nan=True, **BOX_GRAD_TOLERANCE[dtype])


def test_random_cases_cover_every_kind_of_box():
    """The random table really contains the awkward cases it claims to."""
    seen = set()
    for seed in range(N_RANDOM):
        case = random_case(seed)
        seen.add(("aligned", case.aligned))
        seen.add(("sampling_ratio", case.sampling_ratio))
        r = case.rois
        if len(r):
            w, h = r[:, 3] - r[:, 1], r[:, 4] - r[:, 2]
            if (w < 0).any() or (h < 0).any():
                seen.add("inverted")
            if (w == 0).any() or (h == 0).any():
                seen.add("empty")
            size = torch.tensor(case.x.shape[-1:-3:-1], dtype=torch.float64).repeat(2) / case.spatial_scale
            if (r[:, 1:3] > size[:2]).all(1).any() or (r[:, 3:5] < -1 / case.spatial_scale).any():
                seen.add("outside")
            if ((r[:, 1:3] < 0) & (r[:, 3:5] > size[:2])).all(1).any():
                seen.add("larger than the image")
        else:
            seen.add("no boxes")
    for want in ["inverted", "empty", "outside", "larger than the image", "no boxes"]:
        assert want in seen
    assert {("sampling_ratio", s) for s in range(-1, 5)} <= seen
    assert {("aligned", False), ("aligned", True)} <= seen


SEED_INPUT = torch.arange(1.0, 37.0).reshape(1, 1, 6, 6)
SEED_ROI = torch.tensor([[0, -2.0, -2.0, 22.0, 22.0]])


def test_seed_example_aligned_false(backend):
    """The torch_npu documentation's example: published output and an input gradient of 0.25."""
    x = SEED_INPUT.clone().requires_grad_()
    roi = SEED_ROI.clone().requires_grad_()
    out = roialign.ROIAlign((3, 3), 0.25, 2, aligned=False)(x, roi)
    out.sum().backward()
    assert out.shape == (1, 1, 3, 3)
    want = torch.tensor([[4.5, 6.5, 8.5], [16.5, 18.5, 20.5], [28.5, 30.5, 32.5]])
    torch.testing.assert_close(out[0, 0], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.25), atol=1e-7, rtol=0)
    assert roi.grad.shape == (1, 5) and roi.grad[0, 0] == 0


def test_seed_example_aligned_true(backend):
    x = SEED_INPUT.clone().requires_grad_()
    out = roialign.ROIAlign((3, 3), 0.25, 2, aligned=True)(x, SEED_ROI)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([2.75, 4.5, 6.5]), atol=1e-6, rtol=0)
    out.sum().backward()
    # Every sample's bilinear weights sum to one, so the gradient sums to 9 bins x 1.
    torch.testing.assert_close(x.grad.sum(), torch.tensor(9.0))


DETECTRON2_INPUT = torch.arange(25.0).reshape(1, 1, 5, 5)
DETECTRON2 = {  # detectron2 tests/layers/test_roi_align.py, test_forward_output: box [1, 1, 3, 3], 4x4, adaptive
    False: [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]],
    True: [[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0], [12.0, 12.5, 13.0, 13.5]],
}


@pytest.mark.parametrize("aligned", [False, True])
def test_detectron2_published_values(backend, aligned):
    out = roialign.ROIAlign((4, 4), 1.0, 0, aligned=aligned)(DETECTRON2_INPUT, torch.tensor([[0, 1.0, 1, 3, 3]]))
    torch.testing.assert_close(out[0, 0], torch.tensor(DETECTRON2[aligned]), atol=1e-6, rtol=1e-5)


def test_detectron2_empty_box(backend):
    """detectron2 test_empty_box: a zero-height box gives zeros, and a zero gradient."""
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = roialign.ROIAlign((7, 7), 1.0, 0, aligned=True)(x, torch.tensor([[0, 3.0, 4, 5, 4]]))
    out.sum().backward()
    assert (out == 0).all() and (x.grad == 0).all()


MMCV = [  # mmcv tests/test_ops/test_roi_align.py: 2x2 output, scale 1, sampling_ratio 2, aligned=True
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]], [[0., 0., 0., 3., 3.]],
     [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875], [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250], [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(MMCV)))
def test_mmcv_published_values(backend, index, dtype):
    x, rois, want_out, want_grad = (torch.tensor(v, dtype=dtype) for v in MMCV[index])
    x.requires_grad_()
    out = roialign.roi_align(x, rois, (2, 2), 1.0, 2, aligned=True)
    out.backward(torch.ones_like(out))
    tol = dict(atol=1e-6, rtol=0) if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(x.grad, want_grad, **tol)


def test_huge_adaptive_box_is_fast_and_exact(backend):
    """[0, 0, 0, 1e9, 1e9] with adaptive sampling: ~2e16 samples per bin, almost all off the image."""
    x = torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rois = torch.tensor([[0, 0, 0, 1e9, 1e9]], dtype=torch.float64)
    out = roialign.roi_align(x, rois, 7, 1.0, 0, aligned=False)
    want, _, _ = oracle.roi_align(x.numpy(), rois.numpy(), 1.0, 7, 7, 0, False, geometry=np.float64)
    assert want[0, :, 0, 0].any() and not want[0, :, 1:].any()
    torch.testing.assert_close(out, torch.from_numpy(want), atol=1e-25, rtol=1e-9)


@pytest.mark.parametrize("center, inside", [(4.0, True), (4.001, False), (-1.0, True), (-1.001, False),
                                            (0.0, True), (3.0, True), (2.5, True)])
def test_sample_on_the_border_of_the_valid_range(backend, center, inside):
    """A sample exactly at -1 or at H (W) still reads the border pixel; one just beyond reads nothing."""
    x = torch.arange(16.0, dtype=torch.float64).reshape(1, 1, 4, 4) + 1
    for axis in (0, 1):
        box = [0, 1.5, 1.5, 2.5, 2.5]  # a single sample at (2, 2), moved along one axis below
        box[1 + axis], box[3 + axis] = center - 0.5, center + 0.5
        rois = torch.tensor([box], dtype=torch.float64)
        out = roialign.roi_align(x, rois, 1, 1.0, 1, aligned=False)
        want, _, _ = oracle.roi_align(x.numpy(), rois.numpy(), 1.0, 1, 1, 1, False, geometry=np.float64)
        assert (want[0, 0, 0, 0] != 0) == inside
        torch.testing.assert_close(out, torch.from_numpy(want), atol=1e-12, rtol=0)
