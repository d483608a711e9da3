"""Dtypes, memory layouts, mixed dtypes and empty inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
import roialign
from cases import random_case

LOW_PRECISION = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's magnitude


@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("seed", range(0, 300, 7))
def test_half_types_accumulate_in_float32(backend, seed, dtype):
    case = random_case(seed)
    x = case.x.to(dtype).requires_grad_()
    out = torch.ops.roialign.roi_align(x, case.rois.float(), *case.args())
    grad_out = torch.ones_like(out)
    out.backward(grad_out)
    want, gx, _ = oracle.roi_align(x.detach().double().numpy(), case.rois.numpy(), *case.args(),
                                   grad_out=grad_out.double().numpy())
    assert out.dtype == dtype and x.grad.dtype == dtype
    tol = LOW_PRECISION[dtype]
    torch.testing.assert_close(out.double(), torch.from_numpy(want), atol=tol * (1 + np.abs(want).max(initial=0)),
                               rtol=tol, equal_nan=True)
    torch.testing.assert_close(x.grad.double(), torch.from_numpy(gx), atol=tol * (1 + np.abs(gx).max(initial=0)),
                               rtol=tol)


def _layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2] + 3, x.shape[3] * 2, dtype=x.dtype)
    view = wide[:, ::2, 1:-2, ::2]
    view.copy_(x)
    yield "strided view", view
    yield "permuted", x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)


@pytest.mark.parametrize("seed", [3, 11, 42])
def test_every_layout_gives_the_same_result(backend, seed):
    case = random_case(seed)
    x = torch.randn(2, 5, 9, 11)
    rois = torch.tensor([[0, 1.0, 1.0, 15.0, 12.0], [1, -4.0, 2.0, 6.0, 30.0], [1, 3.0, 3.0, 3.5, 9.0]])
    results = {}
    for name, xv in _layouts(x):
        xv = xv.detach().requires_grad_()
        out = roialign.roi_align(xv, rois, (3, 4), 0.7, case.sampling_ratio, case.aligned)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape))
        if name == "channels_last":  # the output and the input gradient keep the input's layout
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            assert xv.grad.is_contiguous(memory_format=torch.channels_last)
        else:
            assert out.is_contiguous()
        results[name] = (out, xv.grad)
    for name, (out, grad) in results.items():
        torch.testing.assert_close(out, results["contiguous"][0], atol=1e-5, rtol=1e-6, msg=name)
        torch.testing.assert_close(grad, results["contiguous"][1], atol=1e-4, rtol=1e-6, msg=name)


def test_mixed_dtypes_cast_rois(backend):
    x = torch.randn(1, 2, 6, 6)
    rois64 = torch.tensor([[0, 0.3, 0.4, 4.2, 5.1]], dtype=torch.float64, requires_grad=True)
    out = roialign.roi_align(x, rois64, 2, sampling_ratio=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, roialign.roi_align(x, rois64.detach().float(), 2, sampling_ratio=2))
    out.sum().backward()
    assert rois64.grad.dtype == torch.float64


def test_list_of_boxes_equals_rois_tensor(backend):
    x = torch.randn(2, 3, 10, 10)
    b0, b1 = torch.tensor([[1.0, 1, 6, 7], [2, 2, 9, 4]]), torch.tensor([[0.0, 0, 9, 9]])
    rois = torch.tensor([[0, 1.0, 1, 6, 7], [0, 2, 2, 9, 4], [1, 0, 0, 9, 9]])
    torch.testing.assert_close(roialign.roi_align(x, [b0, b1], 3, 1.0, 2), roialign.roi_align(x, rois, 3, 1.0, 2))


@pytest.mark.parametrize("shape, k", [((2, 3, 8, 8), 0), ((0, 3, 10, 10), 0), ((1, 0, 8, 8), 2), ((1, 3, 0, 5), 2)])
def test_empty_inputs(backend, shape, k):
    x = torch.randn(shape, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1, 4, 4]] * k).reshape(k, 5).requires_grad_()
    out = roialign.ROIAlign((7, 7), 1.0, 0)(x, rois)
    assert out.shape == (k, shape[1], 7, 7) and (out == 0).all()
    out.sum().backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()
    assert rois.grad.shape == rois.shape and (rois.grad == 0).all()


def test_backward_is_bitwise_deterministic(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 9, 11, generator=gen)
    rois = torch.tensor([[0, 1.0, 1.0, 15.0, 12.0], [1, -4.0, 2.0, 6.0, 30.0], [0, 3.0, 3.0, 3.5, 9.0],
                         [0, 2.0, 1.0, 13.0, 14.0], [1, 0.5, 0.5, 8.0, 8.0]])
    grads = []
    for _ in range(3):
        xv, rv = x.clone().requires_grad_(), rois.clone().requires_grad_()
        out = roialign.roi_align(xv, rv, (3, 2), 0.7, 0, True)
        out.backward(torch.linspace(-2, 3, out.numel()).reshape(out.shape))
        grads.append((xv.grad, rv.grad))
    for gx, gr in grads[1:]:
        assert torch.equal(gx, grads[0][0]) and torch.equal(gr, grads[0][1])


def _pooling_ops():
    yield "avg", lambda x, r: roialign.roi_align(x, r, (3, 4), 0.7, 2, True)
    yield "max", lambda x, r: roialign.roi_align(x, r, (3, 4), 0.7, 2, True, mode="max")
    yield "onnx_max", lambda x, r: roialign.roi_align(x, r, (3, 4), 0.7, 0, True, mode="onnx_max")
    yield "prroi", lambda x, r: roialign.prroi_pool(x, r, (3, 4), 0.7)
    yield "rotated", lambda x, r: roialign.roi_align_rotated(
        x, torch.cat((r[:, :1], (r[:, 1:3] + r[:, 3:5]) / 2, r[:, 3:5] - r[:, 1:3], r[:, 1:2] * 10), dim=1),
        (3, 4), 0.7, 2, aligned=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op", [name for name, _ in _pooling_ops()])
def test_gradient_of_any_layout_gives_the_same_bits(op, dtype):
    """A channels_last output gradient (read in place by the CPU kernels, which transpose any
    other) and a strided one give the same input and box gradients as an NCHW one, for every
    operator."""
    fn = dict(_pooling_ops())[op]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 9, 11, generator=gen).to(dtype)
    rois = torch.tensor([[0, 1.0, 1.0, 15.0, 12.0], [1, -4.0, 2.0, 6.0, 30.0], [0, 3.0, 3.0, 3.5, 9.0],
                         [1, 0.5, 0.5, 8.0, 8.0]], dtype=dtype)
    grad = torch.randn(4, 6, 3, 4, generator=gen).to(dtype)
    wide = torch.zeros(4, 6, 3, 8, dtype=dtype)
    wide[..., ::2] = grad
    results = []
    for g in (grad, grad.contiguous(memory_format=torch.channels_last), wide[..., ::2]):
        for layout in (torch.contiguous_format, torch.channels_last):
            xv = x.contiguous(memory_format=layout).detach().requires_grad_()
            rv = rois.clone().requires_grad_()
            with roialign.use_backend("numba"):
                fn(xv, rv).backward(g)
            results.append((xv.grad, rv.grad))
    for gx, gr in results[1:]:
        assert torch.equal(gx, results[0][0]) and torch.equal(gr, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_tile_ordered_forward_equals_box_by_box(seed, dtype, monkeypatch):
    """The channels_last forward pools bins tile by tile, in tiles whose side follows the L2
    cache; with its tap tables over budget it goes box by box. The same bits for any tile side,
    NaN boxes and missing images included."""
    from roialign.kernels.cpu import roi_align as cpu

    side = [1, 2, 3, 8, 64, 1 << 20][seed % 6]  # from one pixel to one tile for the whole map
    monkeypatch.setattr(cpu, "tile_side", lambda pixel_bytes: side)
    case = random_case(seed)
    x = case.x.to(dtype).contiguous(memory_format=torch.channels_last)
    rois = case.rois.clone()
    rois[::5, 1] = float("nan")
    rois[1::7, 0] = x.shape[0] + 3  # an image that does not exist pools to 0
    with roialign.use_backend("numba"):
        rows = cpu.forward(x, rois, *case.args())
        with cpu._box_by_box():
            boxes = cpu.forward(x, rois, *case.args())
    assert rows.is_contiguous(memory_format=torch.channels_last) and boxes.stride() == rows.stride()
    assert torch.equal(rows.nan_to_num(1234.5), boxes.nan_to_num(1234.5))
    assert rows[::5].isnan().all() or x.shape[1] == 0
