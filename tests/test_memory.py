"""Bounded work and memory: many boxes, and boxes far larger than the image."""

from __future__ import annotations

import time

import pytest
import torch

import roialign


def test_two_hundred_thousand_boxes(backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    k = 200_000
    xy = torch.rand(k, 2, generator=gen) * 14
    rois = torch.cat((torch.randint(0, 2, (k, 1), generator=gen).float(), xy, xy + 3), 1).requires_grad_()
    xg = x.clone().requires_grad_()
    out = roialign.roi_align(xg, rois, 2, 1.0, 2, True)
    out.sum().backward()
    assert out.shape == (k, 4, 2, 2) and out.isfinite().all() and xg.grad.isfinite().all()
    with roialign.use_backend("numba" if backend != "numba" else "reference"):
        other = roialign.roi_align(x, rois.detach()[::499], 2, 1.0, 2, True)
    torch.testing.assert_close(out.detach()[::499], other, atol=1e-5, rtol=1e-5)


def test_gigantic_adaptive_boxes_finish_quickly(backend):
    """Adaptive sampling of [0, 0, 0, 1e9, 1e9] asks for ~2e16 samples per bin; only those that can
    land on the image are visited, forward and backward."""
    x = torch.randn(1, 8, 40, 50, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 1e9, 1e9], [0, -1e9, -1e9, 1e9, 1e9], [0, -5e8, 3.0, 20.0, 1e9]],
                        requires_grad=True)
    start = time.perf_counter()
    out = roialign.roi_align(x, rois, 7, 1.0, 0, False)
    out.sum().backward()
    assert time.perf_counter() - start < 30
    assert out.isfinite().all() and x.grad.isfinite().all() and rois.grad.isfinite().all()


@pytest.mark.parametrize("boxes", [1024, 96])  # outputs of boxes x 64 x 7 x 7 floats: 12.8 MB, 1.2 MB
def test_large_results_are_reused_only_once_nothing_shares_them(boxes):
    """The Numba backend hands out large outputs over recycled memory: a buffer must not come back
    while any view of it lives, must come back once none does, and must give the same values."""
    from roialign.kernels.cpu.buffers import _Results, release_scratch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 32, 32, generator=gen)
    xy = torch.rand(boxes, 2, generator=gen) * 24
    rois = torch.cat((torch.zeros(boxes, 1), xy, xy + 6), 1)
    assert boxes * 64 * 49 * 4 >= _Results._POOLED
    with roialign.use_backend("numba"):
        release_scratch()
        first = roialign.roi_align(x, rois, 7, 1.0, 2, True)
        expected = first.clone()
        ptr = first.data_ptr()
        view = first[5:9]
        del first
        second = roialign.roi_align(x * 2, rois, 7, 1.0, 2, True)  # the view still holds the first buffer
        assert second.data_ptr() != ptr
        assert torch.equal(view, expected[5:9])
        del view
        third = roialign.roi_align(x, rois, 7, 1.0, 2, True)  # nothing holds it now: reused
        assert third.data_ptr() == ptr
        assert torch.equal(third, expected) and torch.equal(second, 2 * expected)
        xg = x.clone().requires_grad_()
        out = roialign.roi_align(xg, rois, 7, 1.0, 2, True)
        out.backward(torch.ones_like(out))
        del out
        again = x.clone().requires_grad_()
        out = roialign.roi_align(again, rois, 7, 1.0, 2, True)
        out.backward(torch.ones_like(out))
        assert torch.equal(again.grad, xg.grad)
        release_scratch()


def test_results_pool_keeps_a_pyramid_step_and_no_more():
    """Idle result buffers stay bounded by ``_KEEP``, and that bound holds an output and an input
    gradient for each of four pyramid levels: the second training step reuses every one of them."""
    from roialign.kernels.cpu import buffers

    levels = [torch.randn(1, 256, 128 // 2**i, 160 // 2**i) for i in range(4)]  # 21 MB down to 0.33 MB
    boxes = torch.tensor([[0, 2.0, 3.0, 40.0, 30.0]]).repeat(40, 1)

    def step():
        xs = [x.clone().requires_grad_() for x in levels]
        outs = [roialign.roi_align(x, boxes[: 20 + 8 * i], 7, 1.0 / 2**i, 2, True)  # 1.0 MB to 2.2 MB
                for i, x in enumerate(xs)]
        for out in outs:
            out.backward(torch.ones_like(out))
        return [x.grad.data_ptr() for x in xs] + [out.data_ptr() for out in outs]

    with roialign.use_backend("numba"):
        buffers.release_scratch()
        first = step()
        assert len(buffers._results._idle) == 8 == buffers._Results._KEEP
        assert sorted(step()) == sorted(first)  # every buffer found again
        for size in range(1, 20):  # many more sizes than kept: the pool stays bounded
            roialign.roi_align(levels[0], boxes[:size] + 0, 14, 1.0, 0, True)
            assert len(buffers._results._idle) <= buffers._Results._KEEP
        buffers.release_scratch()
