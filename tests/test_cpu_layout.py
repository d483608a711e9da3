"""The Numba backend's layout copies (NCHW to channels-last and back, ``kernels/cpu/layout.py``):
every order against ``permute``, the order chosen per kind of map and element size, and the
timing that chooses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import roialign  # noqa: E402


def _every_copy_order(monkeypatch, to_channels_last=None, to_planar=None):
    """Make every kind of map and element size use ``to_channels_last`` (a block) and ``to_planar``."""
    from roialign.kernels.cpu import layout

    for key in list(layout._TO_CHANNELS_LAST):
        monkeypatch.setitem(layout._TO_CHANNELS_LAST, key, layout._TO_CHANNELS_LAST[key] if to_channels_last is None
                            else to_channels_last)
    for key in list(layout._TO_PLANAR):
        monkeypatch.setitem(layout._TO_PLANAR, key, layout._TO_PLANAR[key] if to_planar is None else to_planar)


@pytest.mark.parametrize("block", [0, 8, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 64, 128, 128), (2, 33, 31, 65), (1, 3, 5, 7), (3, 32, 1, 32), (1, 1, 1, 1),
                                   (1, 70, 2, 97), (1, 91, 3, 17), (2, 50, 3, 5), (1, 127, 2, 9)])
def test_nchw_to_nhwc_copy_matches_permute(shape, dtype, block, monkeypatch):
    """The transpose behind every NCHW input, in every order: whole blocks of channels, then the
    channels left over by 8 and by 1 (91 = 64 + 3 x 8 + 3, 127 = 64 + 32 + 16 + 8 + 7)."""
    from roialign.kernels.cpu import layout
    from roialign.kernels.cpu.layout import channels_last_view

    assert block in layout.BLOCKS
    _every_copy_order(monkeypatch, to_channels_last=block)

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
    from roialign.kernels.cpu.layout import planar_from_channels_last

    _every_copy_order(monkeypatch, to_planar=tiled)

    t = torch.randn(*shape, dtype=dtype)
    before = t.clone()
    got = planar_from_channels_last(t)
    assert got.is_contiguous() and got.shape == (shape[0], shape[3], shape[1], shape[2])
    assert torch.equal(got, t.permute(0, 3, 1, 2))
    assert torch.equal(t, before)


@pytest.mark.parametrize("size", [(23, 41), (32, 32)])  # float64 planes of 7544 bytes, and of 8 KiB (aliased)
def test_layout_copy_tuning_picks_the_fastest_order_and_changes_no_result(monkeypatch, size):
    """warmup() times every order of both copies for both kinds of map (and, to channels-last,
    each element size) and keeps the fastest of each; every operator gives the same bits in
    every order."""
    from roialign.kernels.cpu import layout

    _every_copy_order(monkeypatch)
    report = layout.tune_layout_copies((1, 40, 24, 36), pairs=2, aliased_shape=(1, 8, 16, 128))
    for kind, shape in (("other", (1, 40, 24, 36)), ("aliased", (1, 8, 16, 128))):
        assert report[kind]["shape"] == shape
        for element_size in (2, 4, 8):
            times = report[kind][element_size]
            assert set(times) == set(layout.BLOCKS) and min(times.values()) > 0
            assert times[layout._TO_CHANNELS_LAST[kind, element_size]] == min(times.values())
        back = report[kind]["to_planar"]
        assert layout._TO_PLANAR[kind] == (back[True] < back[False]) and min(back.values()) > 0
    with pytest.raises(ValueError, match="aliased_shape"):
        layout.tune_layout_copies((1, 4, 24, 36), pairs=1, aliased_shape=(1, 4, 24, 36))
    with pytest.raises(ValueError, match="shape"):
        layout.tune_layout_copies((1, 4, 16, 32), pairs=1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 91, *size, generator=gen, dtype=torch.float64, requires_grad=True)
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
        for block, tiled in zip(layout.BLOCKS, (True, False, True, False, True)):
            _every_copy_order(monkeypatch, to_channels_last=block, to_planar=tiled)
            out = call()
            inputs = (x, rotated) if name == "rotated" else (x, boxes)
            results.append((out.detach(),) + torch.autograd.grad(out.pow(2).sum(), inputs))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b), name


def test_layout_copy_order_follows_the_plane_stride_and_element_size(monkeypatch):
    """Maps whose planes are a multiple of 4 KiB apart (they alias in the L1 cache) take the
    "aliased" choice, in the planar side's element size (half maps are copied as 2-byte bits),
    and the copy to channels-last takes the block chosen for that element size."""
    from roialign.kernels.cpu import layout

    blocks = {("other", 2): 16, ("other", 4): 32, ("other", 8): 64, ("aliased", 2): 0, ("aliased", 4): 8,
              ("aliased", 8): 16}
    for key, block in blocks.items():
        monkeypatch.setitem(layout._TO_CHANNELS_LAST, key, block)
    monkeypatch.setitem(layout._TO_PLANAR, "other", False)
    monkeypatch.setitem(layout._TO_PLANAR, "aliased", True)
    assert layout._kind(128 * 128 * 4) == layout._kind(64 * 32 * 2) == "aliased"
    assert layout._kind(100 * 136 * 4) == layout._kind(64 * 33 * 2) == "other"
    seen = []
    monkeypatch.setattr(layout.workers, "run", lambda kernel, jobs: seen.append({job[-1] for job in jobs}))
    for h, w, dtype, kind in ((128, 128, torch.float32, "aliased"), (32, 64, torch.float16, "aliased"),
                              (16, 64, torch.float64, "aliased"), (100, 136, torch.float32, "other"),
                              (32, 65, torch.float16, "other"), (32, 65, torch.float64, "other")):
        layout.channels_last_view(torch.zeros(1, 3, h, w, dtype=dtype))
        layout.planar_from_channels_last(torch.zeros(1, h, w, 3, dtype=dtype))
        size = 2 if dtype == torch.float16 else torch.finfo(dtype).bits // 8
        assert seen[-2:] == [{blocks[kind, size]}, {kind == "aliased"}], (h, w, dtype)
