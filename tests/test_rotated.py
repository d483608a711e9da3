"""Rotated RoIAlign: every backend against the float64 loop oracle, the peers' published values,
the axis-aligned op at angle 0, finite differences, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import oracle_rotated
import roialign
from cases import random_case

# --- Random cases -------------------------------------------------------------------------------


def random_rotated_case(seed: int):
    """A random problem with every awkward kind of rotated box, in one of the two conventions."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    h, w = int(rng.integers(1, 11)), int(rng.integers(1, 11))
    scale = float(rng.choice([1.0, 0.5, 0.25, 2.0]))
    pooled = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    sampling_ratio = int(rng.integers(-1, 4))
    aligned, clockwise, degrees = (bool(rng.integers(2)) for _ in range(3))
    rois = []
    for _ in range(int(rng.integers(1, 7))):
        kind = rng.choice(["inside", "partial", "outside", "empty", "thin", "large", "quarter"])
        cx, cy = rng.uniform(0, w / scale), rng.uniform(0, h / scale)
        bw, bh = rng.uniform(0.2, 1.0, 2) * np.array([w, h]) / scale
        angle = rng.uniform(-400, 400)
        if kind == "partial":
            cx, cy = cx + rng.choice([-1, 1]) * w / scale * 0.6, cy - h / scale * 0.4
        elif kind == "outside":
            cx += rng.choice([-1, 1]) * 3 * (w + h) / scale
        elif kind == "empty":
            bw, bh = (0.0, bh) if rng.integers(2) else (0.0, 0.0)
        elif kind == "thin":
            bh = rng.uniform(0, 0.3)
        elif kind == "large":
            bw, bh = rng.uniform(1.5, 4, 2) * (w + h) / scale
        elif kind == "quarter":
            angle = 90.0 * int(rng.integers(-8, 9))
        if not degrees:
            angle = math.radians(angle)
        rois.append([float(rng.integers(n)), cx, cy, bw, bh, angle])
    x = torch.from_numpy(rng.standard_normal((n, c, h, w)))
    return x, torch.tensor(rois, dtype=torch.float64), scale, pooled, sampling_ratio, aligned, clockwise, degrees


def _run(x, rois, scale, pooled, sr, aligned, clockwise, degrees, dtype, grad_out):
    xt = x.to(dtype).clone().requires_grad_()
    rt = rois.clone().requires_grad_()
    out = roialign.roi_align_rotated(xt, rt, pooled, scale, sr, aligned=aligned, clockwise=clockwise,
                                     angle_unit="degrees" if degrees else "radians")
    out.backward(grad_out.to(dtype))
    return out.detach().double(), xt.grad.double(), rt.grad


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(60))
def test_matches_oracle(backend, seed, dtype):
    x, rois, scale, pooled, sr, aligned, clockwise, degrees = random_rotated_case(seed)
    g = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((rois.shape[0], x.shape[1], *pooled)))
    out, gx, gr = _run(x, rois, scale, pooled, sr, aligned, clockwise, degrees, dtype, g)
    geometry = np.float64 if dtype == torch.float64 else np.float32
    want, want_gx, want_gr = oracle_rotated.roi_align_rotated(x.numpy(), rois.numpy(), scale, *pooled, sr, aligned,
                                                              clockwise, degrees, grad_out=g.numpy(),
                                                              geometry=geometry)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out.numpy(), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(gx.numpy(), want_gx, rtol=tol, atol=tol)
    # The box gradient sums many terms of either sign: relative to its scale.
    np.testing.assert_allclose(gr.numpy(), want_gr, rtol=tol * 10, atol=tol * 10 * (1 + np.nanmax(abs(want_gr))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_float32(backend, dtype):
    x, rois, scale, pooled, sr, aligned, clockwise, degrees = random_rotated_case(3)
    g = torch.ones(rois.shape[0], x.shape[1], *pooled, dtype=torch.float64)
    xh = x.to(dtype).double()  # the values a half input can hold
    want = _run(xh, rois, scale, pooled, sr, aligned, clockwise, degrees, torch.float32, g)
    got = _run(xh, rois, scale, pooled, sr, aligned, clockwise, degrees, dtype, g)
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


# --- Published values -------------------------------------------------------------------------


def _rot90(t: torch.Tensor, times: int) -> torch.Tensor:
    for _ in range(times % 4):
        t = t.transpose(0, 1).flip(0)
    return t


DETECTRON2_ANGLE_0 = [[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0], [12.0, 12.5, 13.0, 13.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_detectron2_forward_output_0_90_180_270(backend, dtype):
    img = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5).to(dtype)
    expected = torch.tensor(DETECTRON2_ANGLE_0, dtype=torch.float64)
    for i in range(4):
        rois = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0, 90.0 * i]])
        out = roialign.ROIAlignRotated((4, 4), 1.0, 0)(img, rois)
        # Exact: quarter turns use exact cos and sin, so the samples are the unrotated ones.
        torch.testing.assert_close(out[0, 0].double(), _rot90(expected, -i), rtol=0, atol=0)


def test_detectron2_empty_box(backend):
    x = torch.rand(1, 1, 10, 10)
    out = roialign.ROIAlignRotated((7, 7), 1.0, 0)(x, torch.tensor([[0, 2.0, 3.0, 0.0, 0.0, 0.0]]))
    assert out.shape == (1, 1, 7, 7) and (out == 0).all()


def test_spatial_scale_scales_the_box(backend):
    """Boxes twice as large at spatial_scale 0.5 sample the same points (exact: dyadic scales)."""
    x = torch.rand(1, 2, 20, 20, dtype=torch.float64)
    rois = torch.tensor([[0, 9.5, 8.0, 9.0, 6.0, 30.0], [0, 3.25, 12.0, 4.5, 7.0, -75.0]], dtype=torch.float64)
    double = rois.clone()
    double[:, 1:5] *= 2
    a = roialign.ROIAlignRotated((5, 5), 1.0, 0)(x, rois)
    b = roialign.ROIAlignRotated((5, 5), 0.5, 0)(x, double)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.interpreter_heavy
@pytest.mark.parametrize("transpose", [False, True])
def test_detectron2_gradcheck(backend, transpose):
    x = torch.rand(1, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if transpose:
        x = x.transpose(2, 3)
    x.requires_grad_()
    rois = torch.tensor([[0, 4.5, 4.5, 9, 9, 0], [0, 2, 7, 4, 4, 0], [0, 7, 7, 4, 4, 0]], dtype=torch.float64)

    def f(inp):
        return roialign.ROIAlignRotated((5, 5), 0.5, 1)(inp, rois)

    assert torch.autograd.gradcheck(f, (x,))


MMCV_INPUTS = [([[[[1., 2.], [3., 4.]]]], [[0., 0.5, 0.5, 1., 1., 0]]),
               ([[[[1., 2.], [3., 4.]]]], [[0., 0.5, 0.5, 1., 1., math.pi / 2]]),
               ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0.5, 0.5, 1., 1., 0]]),
               ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
                [[0., 1.5, 1.5, 3., 3., 0]]),
               ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
                [[0., 1.5, 1.5, 3., 3., math.pi / 2]])]
_G4 = [[0.47265625, 0.42968750, 0.42968750, 0.04296875], [0.42968750, 0.39062500, 0.39062500, 0.03906250],
       [0.42968750, 0.39062500, 0.39062500, 0.03906250], [0.04296875, 0.03906250, 0.03906250, 0.00390625]]
MMCV_OUTPUTS = [([[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
                ([[[[1.5, 1], [1.75, 1.25]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
                ([[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
                 [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
                ([[[[1.9375, 4.75], [7.5625, 10.375]]]], [[_G4]]),
                ([[[[7.5625, 1.9375], [10.375, 4.75]]]], [[_G4]])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(MMCV_INPUTS)))
def test_mmcv_published_values(backend, case, dtype):
    from roialign.compat.mmcv import RoIAlignRotated

    x = torch.tensor(MMCV_INPUTS[case][0], dtype=dtype, requires_grad=True)
    rois = torch.tensor(MMCV_INPUTS[case][1], dtype=dtype)
    out = RoIAlignRotated((2, 2), 1.0, 2, aligned=True, clockwise=False)(x, rois)
    out.backward(torch.ones_like(out))
    atol = 1e-3 if dtype in (torch.float32, torch.float64) else 1e-2  # mmcv's test uses 1e-3
    np.testing.assert_allclose(out.detach().double().numpy(), MMCV_OUTPUTS[case][0], atol=atol)
    np.testing.assert_allclose(x.grad.double().numpy(), MMCV_OUTPUTS[case][1], atol=atol)


def test_mmcv_equals_detectron2_in_radians(backend):
    from roialign.compat.mmcv import RoIAlignRotated

    x, rois, scale, pooled, sr, *_ = random_rotated_case(11)
    x = x.float()
    radians = rois.clone()
    radians[:, 5] = torch.deg2rad(rois[:, 5])
    a = roialign.roi_align_rotated(x, rois, pooled, scale, sr)
    b = RoIAlignRotated(pooled, scale, sr)(x, radians)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # clockwise=True is the negated angle.
    flipped = radians.clone()
    flipped[:, 5] = -flipped[:, 5]
    c = RoIAlignRotated(pooled, scale, sr, clockwise=True)(x, flipped)
    torch.testing.assert_close(b, c, rtol=0, atol=0)


# --- Angle 0 is roi_align(aligned=True) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(10))
def test_angle_zero_equals_roi_align(backend, seed, dtype):
    case = random_case(300 + seed)
    r = case.rois
    if r.shape[0] == 0:
        return
    r = r[(r[:, 3] >= r[:, 1]) & (r[:, 4] >= r[:, 2])]  # rotated boxes have no inverted form
    rotated = torch.stack([r[:, 0], (r[:, 1] + r[:, 3]) / 2, (r[:, 2] + r[:, 4]) / 2, r[:, 3] - r[:, 1],
                           r[:, 4] - r[:, 2], torch.zeros_like(r[:, 0])], 1)
    # The corner box that the centre form stands for, rounded as the centre form is.
    corners = torch.stack([r[:, 0], rotated[:, 1] - rotated[:, 3] / 2, rotated[:, 2] - rotated[:, 4] / 2,
                           rotated[:, 1] + rotated[:, 3] / 2, rotated[:, 2] + rotated[:, 4] / 2], 1)
    x = case.x.to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = roialign.roi_align(xa, corners.to(dtype), case.output_size, case.spatial_scale, case.sampling_ratio, True)
    b = roialign.roi_align_rotated(xb, rotated.to(dtype), case.output_size, case.spatial_scale, case.sampling_ratio)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    a.backward(g)
    b.backward(g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)


# --- Gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_oracle_box_gradient_matches_finite_differences(seed):
    x, rois, scale, pooled, sr, aligned, clockwise, degrees = random_rotated_case(700 + seed)
    x, rois = x.numpy(), rois.numpy()
    g = np.random.default_rng(seed).standard_normal((rois.shape[0], x.shape[1], *pooled))
    args = (scale, *pooled, sr, aligned, clockwise, degrees)
    _, _, analytic = oracle_rotated.roi_align_rotated(x, rois, *args, grad_out=g, geometry=np.float64)

    def loss(r):
        return (oracle_rotated.roi_align_rotated(x, r, *args, geometry=np.float64)[0] * g).sum()

    base, eps, compared = loss(rois), 1e-7, 0
    for k in range(rois.shape[0]):
        for j in range(1, 6):
            plus, minus = rois.copy(), rois.copy()
            plus[k, j] += eps
            minus[k, j] -= eps
            right, left = (loss(plus) - base) / eps, (base - loss(minus)) / eps
            if abs(right - left) > 1e-4 * (1 + abs(right)):
                continue  # a kink or a jump (an adaptive sample count changes)
            compared += 1
            assert analytic[k, j] == pytest.approx((right + left) / 2, abs=1e-5, rel=1e-5), (k, j)
    assert compared >= 3 * rois.shape[0]


def test_oracle_input_gradient_is_the_adjoint():
    x, rois, scale, pooled, sr, aligned, clockwise, degrees = random_rotated_case(5)
    x, rois = x.numpy(), rois.numpy()
    g = np.random.default_rng(1).standard_normal((rois.shape[0], x.shape[1], *pooled))
    out, gx, _ = oracle_rotated.roi_align_rotated(x, rois, scale, *pooled, sr, aligned, clockwise, degrees,
                                                  grad_out=g, geometry=np.float64)
    np.testing.assert_allclose((out * g).sum(), (x * gx).sum(), rtol=1e-12)


@pytest.mark.interpreter_heavy
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("unit", ["degrees", "radians"])
def test_gradcheck_input_and_boxes(backend, aligned, unit):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    angles = [17.0, -130.0, 71.0] if unit == "degrees" else [0.3, -2.2, 1.2]
    coords = torch.tensor([[3.3, 3.1, 4.2, 2.7, angles[0]], [1.2, 5.6, 5.3, 3.9, angles[1]],
                           [6.1, 0.7, 3.4, 4.6, angles[2]]], dtype=torch.float64, requires_grad=True)
    batch = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)

    def f(inp, boxes):
        return roialign.roi_align_rotated(inp, torch.cat((batch, boxes), 1), (3, 2), 1.0, 2, aligned=aligned,
                                          clockwise=True, angle_unit=unit)

    assert torch.autograd.gradcheck(f, (x, coords), atol=1e-6)


# --- Exactness at extremes, determinism, layouts ----------------------------------------------


def test_huge_angles_are_reduced_exactly(backend):
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    base = torch.tensor([[0, 4.2, 3.9, 5.0, 3.0, 30.0]], dtype=torch.float64)
    a = roialign.roi_align_rotated(x, base, 3)
    for turns in (1, 1000, 2777, -2777):
        r = base.clone()
        r[0, 5] += 360.0 * turns  # exact in float64
        torch.testing.assert_close(roialign.roi_align_rotated(x, r, 3), a, rtol=0, atol=0)
    # 1e6 degrees is 280 degrees: exactly, in float32 too (1e6 is a float32).
    r = torch.tensor([[0, 4.2, 3.9, 5.0, 3.0, 1e6]])
    s = torch.tensor([[0, 4.2, 3.9, 5.0, 3.0, 280.0]])
    torch.testing.assert_close(roialign.roi_align_rotated(x.float(), r, 3), roialign.roi_align_rotated(x.float(), s, 3),
                               rtol=0, atol=0)


def test_huge_boxes_are_cheap(backend):
    x = torch.randn(1, 3, 12, 12)
    rois = torch.tensor([[0, 5.0, 6.0, 1e7, 3e7, 33.0]])
    out = roialign.roi_align_rotated(x, rois, 2, 1.0, 0)  # adaptive: 1.5e13 samples per bin, few on the map
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    want, _, _ = oracle_rotated.roi_align_rotated(x.numpy(), rois.numpy(), 1.0, 2, 2, 0)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-9)


# Boxes far beyond the map, some beyond what float32 counts exactly, centred near a 7 x 6 map:
# (width, height, angle) in pixels and degrees, adaptive sampling. The oracle visits them in
# its own loops (cheaply, as one side is small: at most 64 samples per bin along it).
HUGE_BOXES = [(1e9, 3.0, 30.0), (3.0, 1e13, -60.0), (1e16, 2.5, 10.0), (2.0, 3e7, 90.0), (1e30, 7.0, -135.0),
              (4e7, 1.5, 0.0)]
HUGE_FLOAT64_BOXES = [(1e100, 3.0, 20.0), (2.5, 1e300, 45.0)]  # beyond float32's range


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_boxes_match_the_oracle(backend, dtype):
    """Adaptive sample counts stop at 2^24 per axis in float32 and 2^52 in float64, and the extent
    visited is widened for the rounding of the compute dtype: huge boxes, even float64 boxes far
    beyond float32's range, cost about as much as the map, and give the oracle's numbers."""
    rng = np.random.default_rng(7)
    sizes = HUGE_BOXES + (HUGE_FLOAT64_BOXES if dtype == torch.float64 else [])
    rois = torch.tensor([[0, 3.0 + rng.uniform(-2, 2), 3.5 + rng.uniform(-2, 2), w, h, a] for w, h, a in sizes],
                        dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((1, 2, 7, 6)))
    g = torch.from_numpy(rng.standard_normal((rois.shape[0], 2, 2, 2)))
    out, gx, gr = _run(x, rois, 1.0, (2, 2), 0, True, False, True, dtype, g)
    geometry = np.float64 if dtype == torch.float64 else np.float32
    want, want_gx, want_gr = oracle_rotated.roi_align_rotated(x.numpy(), rois.numpy(), 1.0, 2, 2, 0, grad_out=g.numpy(),
                                                              geometry=geometry)
    assert (np.abs(want).sum((1, 2, 3)) > 0).sum() >= 4  # samples land on the map (not for samples 1e14 apart)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out.numpy(), want, rtol=tol, atol=tol * 1e-3 * np.abs(want).max())
    np.testing.assert_allclose(gx.numpy(), want_gx, rtol=tol, atol=tol * 1e-3 * np.abs(want_gx).max())
    # Per box: the centre and angle derivatives are of the map's scale, the size ones tiny.
    scale = np.abs(want_gr).max(1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    np.testing.assert_allclose(gr.numpy() / scale, want_gr / scale, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("cpu_backend", ["numba", "reference"])  # the Triton interpreter takes minutes here
@pytest.mark.parametrize("dtype, side", [(torch.float32, 1e36), (torch.float32, 3e38), (torch.float64, 1e300)])
def test_boxes_huge_along_both_axes_give_finite_numbers(cpu_backend, dtype, side):
    # Both sides so huge that a sample's box-local offset overflows to infinity; times the zero
    # sine of a multiple of 90 degrees that made NaN positions, which the Numba kernels took for
    # samples on the map: NaN outputs, and reads at pixel index INT64_MIN (a segfault on a large
    # map). Every sample lies off the 30 x 40 map or is one of 2^48 (2^104) samples: about 0.
    x = torch.ones(1, 2, 30, 40, dtype=dtype, requires_grad=True)
    for angle in (0.0, 90.0, 37.0):
        rois = torch.tensor([[0, 20.0, 15.0, side, side, angle]], dtype=dtype, requires_grad=True)
        for sampling_ratio in (0, 1024):
            with roialign.use_backend(cpu_backend):
                out = roialign.roi_align_rotated(x, rois, 2, 1.0, sampling_ratio)
                gx, gr = torch.autograd.grad(out.sum(), (x, rois))
            assert torch.isfinite(out).all() and out.abs().max() < 1e-6, (angle, sampling_ratio, out)
            assert torch.isfinite(gx).all() and torch.isfinite(gr[:, :2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_boxes_visit_a_bounded_number_of_samples(dtype):
    """However large or far a box, the samples of a bin tested along either axis stay bounded:
    the rounding margin on each side is about 33 units in the last place of the box's size plus
    its reach to the map (at most about 1.5 sizes when it covers the map), and a capped sample
    count spaces samples ``size / (pooled * 2^24)`` (float32) apart: 33 * 2.5 * 2^24 * 2^-23 *
    pooled, about 170 * pooled samples per side, plus the map itself (every backend uses this
    extent)."""
    from roialign.kernels.reference import roi_align_rotated as ref_rotated

    height, width = 12, 10
    rows = [[0, 5.0, 6.0, s, t, a] for s in (1e7, 1e13, 1e16, 3e38) for t in (2.0, 1e9, 1e16, 3e38)
            for a in (0.0, 30.0, 90.0, -100.0)]
    far = 4e11  # centres far away along the box's long axis, which passes over the map
    # (In float32, such a centre rounds positions by thousands of pixels unless the box is
    # axis-aligned, and every sample within that must be tested: only 0 degrees is bounded so.)
    for a in (0.0, 30.0, -75.0) if dtype == torch.float64 else (0.0, 90.0):
        r = math.radians(a)
        rows.append([0, 5.0 - far * math.sin(r), 6.0 - far * math.cos(r), 1e6, 1e12, a])
    rows += [[0, v, 6.0, 3e7, 2.0, 0.0] for v in (1e7, -1e7)]
    if dtype == torch.float64:
        rows += [[0, 5.0, 6.0, s, t, 33.0] for s in (1e100, 1e300) for t in (3.0, 1e200)]
    rois = torch.tensor(rows, dtype=torch.float64)
    for pooled in ((2, 2), (7, 7)):
        geo = ref_rotated.geometry(rois, 1.0, pooled, 0, True, True, False, dtype)
        assert geo.finite.all()
        counts = ref_rotated.visible_counts(geo, 0, rois.shape[0], height, width, pooled)
        for k in range(rois.shape[0]):
            assert int(counts[k].max()) <= 2 * 170 * max(pooled) + 2 * (height + width) + 8, (rows[k], pooled, counts[k])


def test_cpu_visits_every_sample_a_much_wider_extent_finds(monkeypatch):
    """The extent's rounding margins are tight; widening them 100-fold (and the same along both
    axes) must not add one sample: the CPU kernels give the same bits either way."""
    pytest.importorskip("numba")
    from roialign.kernels.cpu import roi_align_rotated as cpu_rotated

    rng = np.random.default_rng(3)
    for dtype in (torch.float32, torch.float64):
        rows = [[0, 3.0 + rng.uniform(-3, 3), 3.5 + rng.uniform(-3, 3), w, h, rng.uniform(-180, 180)]
                for w, h in ((1e7, 3.0), (2.0, 3e8), (1e9, 1e9), (5e5, 40.0), (1e13, 1e4))]
        for a in (0.0, 20.0, -90.0):  # centres 1e8 away along the box's long axis
            r = math.radians(a)
            rows.append([0, 3.0 - 1e8 * math.sin(r), 3.5 - 1e8 * math.cos(r), 300.0, 4e8, a])
        rois = torch.tensor(rows, dtype=torch.float64)
        x = torch.from_numpy(rng.standard_normal((1, 3, 7, 6))).to(dtype)
        g = torch.from_numpy(rng.standard_normal((rois.shape[0], 3, 3, 2))).to(dtype)
        results = []
        for widen in (0.0, 1.0):
            def extent(cx, cy, cos, sin, height, width, w, h, dt, real=cpu_rotated.local_extent, widen=widen):
                y_lo, y_hi, x_lo, x_hi = real(cx, cy, cos, sin, height, width, w, h, dt)
                unit = 4e-4 if dt == torch.float32 else 4e-4 * 2.0**-29
                more = widen * (2.0 + unit * (cx.double().abs() + cy.double().abs() + w.double() + h.double()
                                              + height + width))
                return y_lo - more, y_hi + more, x_lo - more, x_hi + more

            monkeypatch.setattr(cpu_rotated, "local_extent", extent)
            xg, rg = x.clone().requires_grad_(), rois.clone().requires_grad_()
            with roialign.use_backend("numba"):
                out = roialign.roi_align_rotated(xg, rg, (3, 2), 1.0, 0)
            out.backward(g)
            results.append((out.detach(), xg.grad, rg.grad))
        assert results[0][0].abs().sum() > 0
        for a, b in zip(*results):
            assert torch.equal(a, b), dtype


def test_reference_takes_a_huge_box_in_windows_of_its_samples(monkeypatch):
    """The pure-PyTorch kernels take a box whose samples near the map exceed their memory budget
    in windows of those samples; any window size gives the same numbers."""
    from roialign.kernels.reference import roi_align_rotated as ref_rotated

    rng = np.random.default_rng(4)
    rois = torch.tensor([[0, 3.0, 3.5, 1e9, 3.0, 30.0], [1, 2.0, 4.0, 9.0, 7.0, -40.0], [0, 3.0, 3.0, 5.0, 1e8, 95.0]],
                        dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((2, 3, 7, 6)))
    g = torch.from_numpy(rng.standard_normal((3, 3, 2, 2)))
    results = []
    for budget in (ref_rotated._BUDGET, 64, 5):
        monkeypatch.setattr(ref_rotated, "_BUDGET", budget)
        xg, rg = x.clone().requires_grad_(), rois.clone().requires_grad_()
        with roialign.use_backend("reference"):
            out = roialign.roi_align_rotated(xg, rg, 2, 1.0, 0)
        out.backward(g)
        results.append((out.detach(), xg.grad, rg.grad))
    assert results[0][0].abs().sum() > 0
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_non_finite_boxes_give_nan_for_that_box_only(backend):
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    good = [0, 3.0, 3.0, 2.0, 2.0, 10.0]
    rows = [good] + [[0] + [math.nan if i == j else v for i, v in enumerate(good[1:])] for j in range(5)]
    rows += [[0, math.inf, 3.0, 2.0, 2.0, 0.0], [0, 3.0, 3.0, 2.0, 2.0, -math.inf]]
    rois = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    out = roialign.roi_align_rotated(x, rois, 2)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
    out[0].sum().backward()  # the NaN boxes receive no gradient from this loss...
    assert torch.isfinite(x.grad).all()
    x.grad = None
    out = roialign.roi_align_rotated(x, rois, 2)
    out.backward(torch.ones_like(out))  # ...and their own NaN outputs do not spill into the input gradient
    assert torch.isfinite(x.grad).all()
    assert torch.isnan(rois.grad[1:, 1:]).all() and torch.isfinite(rois.grad[0]).all()


@pytest.mark.interpreter_heavy
def test_deterministic_and_thread_independent(backend):
    x, rois, scale, pooled, sr, aligned, clockwise, degrees = random_rotated_case(21)
    x = torch.randn(2, 16, 30, 40)
    rois = torch.cat([rois[:, :1].clamp(max=1), torch.rand(rois.shape[0], 5, dtype=torch.float64) * 30], 1)
    rois = rois.repeat(20, 1)
    results = []
    for threads in (1, 2, 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(_run(x.double(), rois, 1.0, (3, 3), 2, True, False, True, torch.float32,
                                torch.ones(rois.shape[0], 16, 3, 3, dtype=torch.float64)))
        finally:
            torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, layout):
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    rois = torch.tensor([[0, 4.0, 4.0, 5.0, 3.0, 25.0], [1, 6.0, 3.0, 7.0, 5.0, -60.0]], dtype=torch.float64)
    if layout == "channels_last":
        y = x.contiguous(memory_format=torch.channels_last)
    else:
        y = torch.randn(2, 5, 18, 11, dtype=torch.float64)[:, :, ::2]
        y.copy_(x)
    a = roialign.roi_align_rotated(x, rois, 3, 1.0, 2)
    yr = y.clone().requires_grad_() if layout == "channels_last" else y.requires_grad_()
    b = roialign.roi_align_rotated(yr, rois, 3, 1.0, 2)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    b.sum().backward()
    if layout == "channels_last":
        assert yr.grad.is_contiguous(memory_format=torch.channels_last)


# --- The op -----------------------------------------------------------------------------------


def _sample_inputs():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 7, 9, dtype=dtype, generator=gen)
        rois = torch.tensor([[0, 3.0, 3.0, 4.0, 2.0, 30.0], [1, 5.0, 2.0, 3.0, 5.0, -100.0]], dtype=dtype)
        yield (x, rois, 1.0, 2, 3, 0, True, False, True)
        yield (x.requires_grad_(), rois.clone().requires_grad_(), 0.5, 3, 2, 2, False, True, False)


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    args = list(_sample_inputs())[index]
    torch.library.opcheck(torch.ops.roialign.roi_align_rotated.default, args)


def test_compile_fullgraph_and_export():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 3.0, 3.0, 4.0, 2.0, 30.0], [1, 5.0, 2.0, 3.0, 5.0, -100.0]])
    model = roialign.ROIAlignRotated((3, 3), 1.0, 2)
    eager = model(x, rois)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rois), eager)
    exported = torch.export.export(model, (x, rois))
    assert any("roi_align_rotated" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x, rois), eager)


def test_list_of_boxes_and_module_repr():
    x = torch.randn(2, 3, 8, 8)
    boxes = [torch.tensor([[3.0, 3.0, 4.0, 2.0, 30.0]]), torch.tensor([[5.0, 2.0, 3.0, 5.0, -10.0]])]
    rois = torch.tensor([[0, 3.0, 3.0, 4.0, 2.0, 30.0], [1, 5.0, 2.0, 3.0, 5.0, -10.0]])
    torch.testing.assert_close(roialign.roi_align_rotated(x, boxes, 2), roialign.roi_align_rotated(x, rois, 2))
    assert "sampling_ratio=2" in repr(roialign.ROIAlignRotated(7, 0.25, 2))


BAD = [
    (lambda x, r: roialign.roi_align_rotated(x, r[:, :5], 2), ValueError, r"rois must have shape \[K, 6\]"),
    (lambda x, r: roialign.roi_align_rotated(x[0], r, 2), ValueError, r"input must be a 4-D tensor"),
    (lambda x, r: roialign.roi_align_rotated(x, r.long(), 2), TypeError, r"rois must be a floating-point"),
    (lambda x, r: roialign.roi_align_rotated(x.long(), r, 2), TypeError, r"input must be a floating-point"),
    (lambda x, r: roialign.roi_align_rotated(x, r * torch.tensor([1, 1, 1, -1, 1, 1.0]), 2), ValueError,
     r"width, height\) must be >= 0"),
    (lambda x, r: roialign.roi_align_rotated(x, r + torch.tensor([5, 0, 0, 0, 0, 0.0]), 2), IndexError,
     r"batch indices"),
    (lambda x, r: roialign.roi_align_rotated(x, r, 0), ValueError, r"output_size must be positive"),
    (lambda x, r: roialign.roi_align_rotated(x, r, 2, angle_unit="deg"), ValueError, r"angle_unit must be"),
    (lambda x, r: roialign.roi_align_rotated(x, r, 2, clockwise=1), TypeError, r"clockwise must be a bool"),
    (lambda x, r: roialign.roi_align_rotated(x, r, 2, -1.0), ValueError, r"spatial_scale must be finite and positive"),
    (lambda x, r: roialign.roi_align_rotated(x, [r[:, 1:5]], 2), ValueError, r"boxes\[0\] must have shape \[L, 5\]"),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input_raises_clearly(backend, index):
    fn, error, message = BAD[index]
    x = torch.randn(2, 3, 6, 6)
    rois = torch.tensor([[0, 3.0, 3.0, 2.0, 2.0, 10.0]])
    x0, r0 = x.clone(), rois.clone()
    with pytest.raises(error, match=message):
        fn(x, rois)
    assert torch.equal(x, x0) and torch.equal(rois, r0)  # nothing the caller passed is modified


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_raises_clearly(tmp_path, dynamo):
    from torch.onnx.errors import OnnxExporterError

    model = roialign.ROIAlignRotated(2, 1.0, 2).eval()
    args = (torch.randn(1, 2, 6, 6), torch.tensor([[0, 3.0, 3.0, 2.0, 2.0, 10.0]]))
    # TorchScript exporter: our message; dynamo exporter: its own, naming the op it cannot translate.
    message = "roialign.roi_align_rotated" if dynamo else "no rotated RoiAlign"
    with pytest.raises(OnnxExporterError, match=message):
        torch.onnx.export(model, args, str(tmp_path / "m.onnx"), dynamo=dynamo)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_bands_of_any_height_give_the_same_bits(monkeypatch, layout):
    pytest.importorskip("numba")
    from roialign.kernels.cpu import roi_align_rotated as cpu_rotated
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 20, 24, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=gen).float(), torch.rand(30, 2, generator=gen) * 24,
                      2 + torch.rand(30, 2, generator=gen) * 12, torch.rand(30, 1, generator=gen) * 180 - 90], 1)
    grad = torch.randn(30, 6, 3, 3, generator=gen)
    results = []
    for band_bytes in (cpu_rotated.BAND_BYTES, 1, 24 * 6 * 4 * 3):  # default, one row, three rows
        monkeypatch.setattr(cpu_rotated, "BAND_BYTES", band_bytes)
        xg = x.detach().clone().requires_grad_()
        with roialign.use_backend("numba"):
            roialign.roi_align_rotated(xg, rois, 3, 1.0, 2).backward(grad)
        results.append(xg.grad)
    assert results[0].abs().sum() > 0
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_cpu_box_order_is_a_permutation_and_changes_no_bit(monkeypatch):
    """The CPU forward and box gradient visit boxes in band order of their bounds on the map (for
    cache reuse); each box is pooled on its own, so any order gives the same bits, NaN and huge
    boxes included."""
    pytest.importorskip("numba")
    from roialign.kernels.cpu import roi_align_rotated as cpu_rotated
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 30, 26, generator=gen, dtype=torch.float64)
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=gen).double(),
                      torch.rand(40, 2, generator=gen, dtype=torch.float64) * 30,
                      1 + torch.rand(40, 2, generator=gen, dtype=torch.float64) * 15,
                      torch.rand(40, 1, generator=gen, dtype=torch.float64) * 360 - 180], 1)
    rois[3, 1] = math.nan
    rois[4, 3] = math.inf
    rois[5, 3:5] = 1e9  # covers the whole map
    rois[6, 3:5] = 0.0  # empty
    rois[7, 1:3] = -500.0  # off the map
    grad = torch.randn(40, 5, 3, 2, generator=gen, dtype=torch.float64)
    boxes = rois.detach()
    table, _, _, batch, _, _, _ = cpu_rotated._prepare(boxes, 0.5, (3, 2), 2, True, False, True, torch.float64,
                                                      30, 26, 2)
    order = cpu_rotated._box_order(table, batch, 2, 30, 26)
    assert sorted(order.tolist()) == list(range(40))
    assert (np.diff(batch[order]) >= 0).all()  # image by image
    assert not np.array_equal(order, np.arange(40))  # the random boxes are not already in order
    results = []
    for reorder in (None, lambda o: o[::-1].copy(), lambda o: np.random.default_rng(3).permutation(o)):
        if reorder is not None:
            monkeypatch.setattr(cpu_rotated, "_box_order", lambda *args, f=reorder: f(order))
        xg, rg = x.clone().requires_grad_(), rois.clone().requires_grad_()
        with roialign.use_backend("numba"):
            out = roialign.roi_align_rotated(xg, rg, (3, 2), 0.5, 2)
        out.backward(grad)
        results.append((out.detach(), xg.grad, rg.grad))
    assert results[0][0][3].isnan().all() and results[0][0][0].isfinite().all()
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
