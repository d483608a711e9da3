"""The box gradient: the oracle's analytic derivative against finite differences, and gradcheck of every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from cases import random_case


@pytest.mark.parametrize("seed", range(40))
def test_oracle_box_gradient_matches_finite_differences(seed):
    case = random_case(1000 + seed)
    if case.rois.shape[0] == 0:
        case = random_case(5000 + seed)
    x, rois = case.x.numpy(), case.rois.numpy()
    rng = np.random.default_rng(seed)
    grad_out = rng.standard_normal((rois.shape[0], x.shape[1], *case.output_size))
    _, _, analytic = oracle.roi_align(x, rois, *case.args(), grad_out=grad_out, geometry=np.float64)
    eps = 1e-7

    def loss(r):
        return (oracle.roi_align(x, r, *case.args(), geometry=np.float64)[0] * grad_out).sum()

    base = loss(rois)
    compared = 0
    for k in range(rois.shape[0]):
        for j in range(1, 5):
            plus, minus = rois.copy(), rois.copy()
            plus[k, j] += eps
            minus[k, j] -= eps
            right, left = (loss(plus) - base) / eps, (base - loss(minus)) / eps
            if abs(right - left) > 1e-4 * (1 + abs(right)):
                continue  # a kink or a jump (the adaptive sample count changes): no derivative to compare
            compared += 1
            assert analytic[k, j] == pytest.approx((right + left) / 2, abs=1e-5, rel=1e-5), (k, j)
    assert compared >= 2 * rois.shape[0]  # most coordinates are differentiable points
    assert (analytic[:, 0] == 0).all()


def test_oracle_input_gradient_is_the_adjoint():
    """<roi_align(x), g> == <x, grad_x(g)> for the oracle (the input gradient is the exact adjoint)."""
    case = random_case(7)
    x, rois = case.x.numpy(), case.rois.numpy()
    g = np.random.default_rng(1).standard_normal((rois.shape[0], x.shape[1], *case.output_size))
    out, grad_x, _ = oracle.roi_align(x, rois, *case.args(), grad_out=g, geometry=np.float64)
    assert rois.shape[0] > 0
    np.testing.assert_allclose((out * g).sum(), (x * grad_x).sum(), rtol=1e-12)


GRADCHECK_ROIS = [[0, 0.3, 0.7, 4.6, 3.9], [1, -1.3, 2.2, 3.1, 7.4], [0, 2.1, 1.2, 2.9, 1.6], [1, 5.2, -0.8, 1.7, 3.3]]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck_input_and_boxes(backend, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = torch.tensor(GRADCHECK_ROIS, dtype=torch.float64)
    coords = rois[:, 1:].clone().requires_grad_()  # gradcheck must not nudge the batch index

    def f(x, coords):
        return torch.ops.roialign.roi_align(x, torch.cat((rois[:, :1], coords), 1), 0.9, 3, 2, sampling_ratio, aligned)

    assert torch.autograd.gradcheck(f, (x, coords), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_batch_index_column_gets_zero_gradient(backend):
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    rois = torch.tensor(GRADCHECK_ROIS, dtype=torch.float64, requires_grad=True)
    torch.ops.roialign.roi_align(x, rois, 1.0, 2, 2, 2, True).sum().backward()
    assert (rois.grad[:, 0] == 0).all() and (rois.grad[:, 1:] != 0).any()


def _forward_ad_calls():
    import roialign

    x = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    boxes = torch.tensor([[0, 1.0, 1.0, 7.0, 8.0], [0, 2.3, 0.5, 9.0, 6.0]], dtype=torch.float64)
    rotated = torch.tensor([[0, 5.0, 5.0, 6.0, 4.0, 30.0]], dtype=torch.float64)
    pooler = roialign.MultiScaleRoIAlign(["0", "1"], 3, 2)
    return x, boxes, {
        "roi_align": lambda x, b: roialign.roi_align(x, b, 3, 1.0, 2, True),
        "roi_align max": lambda x, b: roialign.roi_align(x, b, 3, 1.0, 2, True, mode="max"),
        "prroi_pool": lambda x, b: roialign.prroi_pool(x, b, 3, 1.0),
        "roi_align_rotated": lambda x, b: roialign.roi_align_rotated(x, rotated.to(b.dtype) + 0 * b[:1, :1], 3, 1.0, 2),
        "MultiScaleRoIAlign": lambda x, b: pooler({"0": x, "1": x[:, :, ::2, ::2]}, [b[:, 1:] * 4], [(40, 40)]),
    }


@pytest.mark.parametrize("name", ["roi_align", "roi_align max", "prroi_pool", "roi_align_rotated", "MultiScaleRoIAlign"])
def test_forward_mode_ad_is_refused_not_silently_zero(backend, name):
    # torch's custom operators (torchvision's included) drop a forward-mode tangent: jvp gave 0,
    # forward_ad a missing tangent. The API refuses it instead; reverse mode is the supported way.
    import torch.autograd.forward_ad as fwad

    x, boxes, calls = _forward_ad_calls()
    fn = calls[name]
    tangent = torch.randn_like(boxes)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda b: fn(x, b), (boxes,), (tangent,))
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda x: fn(x, boxes), (x,), (torch.randn_like(x),))
    with fwad.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            fn(x, fwad.make_dual(boxes, tangent))
        assert torch.equal(fn(x, boxes), fn(x.clone(), boxes.clone()))  # no tangent, no refusal
