"""The Numba backend's layout copies (NCHW to channels-last and back, ``kernels/cpu/layout.py``):
both orders against ``permute``, the order chosen per kind of map, and the timing that chooses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import roialign  # noqa: E402


@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 64, 128, 128), (2, 33, 31, 65), (1, 3, 5, 7), (3, 32, 1, 32), (1, 1, 1, 1),
                                   (1, 70, 2, 97)])
def test_nchw_to_nhwc_copy_matches_permute(shape, dtype, tiled, monkeypatch):
    """The transpose behind every NCHW input, in both orders: whole 32 x 32 blocks and partial edges."""
    from roialign.kernels.cpu import layout
    from roialign.kernels.cpu.layout import channels_last_view

    monkeypatch.setitem(layout._LAYOUT_COPY, "tiled", tiled)
    monkeypatch.setitem(layout._LAYOUT_COPY, "aliased", tiled)

    x = torch.randn(*shape, dtype=dtype)
    before = x.clone()
    got = channels_last_view(x)
    assert got.shape == (shape[0], shape[2], shape[3], shape[1])
    assert np.array_equal(got, x.permute(0, 2, 3, 1).numpy())
    assert torch.equal(x, before)
    view = torch.randn(shape[0], shape[1] + 3, shape[2], shape[3] * 2, dtype=dtype)[:, 2:2 + shape[1], :, ::2]
    assert np.array_equal(channels_last_view(view), view.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 128, 128, 64), (2, 31, 65, 33), (1, 5, 7, 3), (3, 1, 32, 32), (1, 1, 1, 1)])
def test_nhwc_to_nchw_copy_matches_permute(shape, dtype, tiled, monkeypatch):
    """The transpose back, for input gradients of NCHW inputs, in both orders."""
    from roialign.kernels.cpu import layout
    from roialign.kernels.cpu.layout import planar_from_channels_last

    monkeypatch.setitem(layout._LAYOUT_COPY, "tiled", tiled)
    monkeypatch.setitem(layout._LAYOUT_COPY, "aliased", tiled)

    t = torch.randn(*shape, dtype=dtype)
    before = t.clone()
    got = planar_from_channels_last(t)
    assert got.is_contiguous() and got.shape == (shape[0], shape[3], shape[1], shape[2])
    assert torch.equal(got, t.permute(0, 3, 1, 2))
    assert torch.equal(t, before)


@pytest.mark.parametrize("size", [(23, 41), (32, 32)])  # float64 planes of 7544 bytes, and of 8 KiB (aliased)
def test_layout_copy_tuning_picks_an_order_and_changes_no_result(monkeypatch, size):
    """warmup() times both copy orders for both kinds of map and keeps one for each; every
    operator gives the same bits either way."""
    from roialign.kernels.cpu import layout

    for kind in ("tiled", "aliased"):
        monkeypatch.setitem(layout._LAYOUT_COPY, kind, layout._LAYOUT_COPY[kind])
    report = layout.tune_layout_copies((1, 40, 24, 36), pairs=2, aliased_shape=(1, 8, 16, 64))
    for prefix, kind in (("", "tiled"), ("aliased_", "aliased")):
        assert report[kind] is layout._LAYOUT_COPY[kind]
        assert report[kind] == (report[f"{prefix}tiled_s"] < report[f"{prefix}streaming_s"])
        assert report[f"{prefix}streaming_s"] > 0
    with pytest.raises(ValueError, match="aliased_shape"):
        layout.tune_layout_copies((1, 4, 24, 36), pairs=1, aliased_shape=(1, 4, 24, 36))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 37, *size, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.cat([torch.randint(0, 2, (30, 1), generator=gen).double(), torch.rand(30, 2, generator=gen) * 30,
                       torch.rand(30, 2, generator=gen) * 30 + 5], 1)
    boxes[:, 3:] += boxes[:, 1:3]
    boxes.requires_grad_()
    rotated = torch.cat([boxes.detach()[:, :3], torch.rand(30, 2, generator=gen, dtype=torch.float64) * 20 + 1,
                         torch.rand(30, 1, generator=gen, dtype=torch.float64) * 360], 1).requires_grad_()
    calls = {"avg": lambda: roialign.roi_align(x, boxes, 5, 0.5, 2, aligned=True),
             "max": lambda: roialign.roi_align(x, boxes, 5, 0.5, 2, aligned=True, mode="max"),
             "rotated": lambda: roialign.roi_align_rotated(x, rotated, 5, 0.5, 0),
             "prroi": lambda: roialign.prroi_pool(x, boxes, 5, 0.5)}
    for name, call in calls.items():
        results = []
        for tiled in (True, False):
            layout._LAYOUT_COPY["tiled"] = layout._LAYOUT_COPY["aliased"] = tiled
            out = call()
            inputs = (x, rotated) if name == "rotated" else (x, boxes)
            results.append((out.detach(),) + torch.autograd.grad(out.pow(2).sum(), inputs))
        for a, b in zip(*results):
            assert torch.equal(a, b), name


def test_layout_copy_order_follows_the_plane_stride(monkeypatch):
    """Maps whose planes are a multiple of 4 KiB apart (they alias in the L1 cache) take the
    "aliased" choice, in the planar side's element size (half maps are copied as 2-byte bits)."""
    from roialign.kernels.cpu import layout

    monkeypatch.setitem(layout._LAYOUT_COPY, "tiled", False)
    monkeypatch.setitem(layout._LAYOUT_COPY, "aliased", True)
    assert layout._tiled_order(128 * 128 * 4) and layout._tiled_order(64 * 32 * 2)
    assert not layout._tiled_order(100 * 136 * 4) and not layout._tiled_order(64 * 33 * 2)
    seen = []
    monkeypatch.setattr(layout.workers, "run", lambda kernel, jobs: seen.append({job[-1] for job in jobs}))
    for h, w, dtype, want in ((128, 128, torch.float32, True), (32, 64, torch.float16, True),
                              (100, 136, torch.float32, False), (32, 65, torch.float16, False)):
        layout.channels_last_view(torch.zeros(1, 3, h, w, dtype=dtype))
        layout.planar_from_channels_last(torch.zeros(1, h, w, 3, dtype=dtype))
        assert seen[-2:] == [{want}, {want}], (h, w, dtype)
