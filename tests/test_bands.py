"""The input gradient is accumulated in bands of rows that skip the boxes which cannot reach them.

The numba and Triton backends both use :func:`roialign.kernels.reference.roi_align.row_span` to skip
boxes; these tests check that its bound holds (also where float32 rounding moves samples far
outside a gigantic box's exact extent) and that band boundaries change nothing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import oracle
import roialign
from roialign.kernels.reference.roi_align import row_span


def _gigantic_boxes(seed: int, k: int, height: int, width: int) -> torch.Tensor:
    """Boxes with one edge near the map and the other 3e7 to 1.1e8 pixels above or below it.

    float32 positions of their samples are off by up to tens of pixels. With adaptive sampling
    and 7 bins a bin has fewer than 2^24 samples (beyond that, the published kernels differ in
    how they round a sample's index)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(k):
        far = -(10.0 ** rng.uniform(7.5, 8.05))
        near = rng.uniform(-3, height + 5)
        y1, y2 = (far, near) if rng.integers(2) else (height - near, height - far)
        x1 = rng.uniform(0, width / 2)
        rows.append([0, x1, y1, x1 + rng.uniform(1, width), y2])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("aligned", [False, True])
def test_row_span_holds_every_row_a_gigantic_box_touches(aligned):
    """The reference backend (which does not use row_span) puts gradient only inside the span."""
    height, width = 40, 12
    rois = _gigantic_boxes(0, 60, height, width)
    spans = row_span(rois, 1.0, aligned, height)
    x = torch.zeros(1, 1, height, width, requires_grad=True)
    touched_outside = 0
    for k in range(rois.shape[0]):
        x.grad = None
        with roialign.use_backend("reference"):
            roialign.roi_align(x, rois[k:k + 1], (7, 2), 1.0, 0, aligned).sum().backward()
        rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
        if len(rows):
            first, last = int(spans[k, 0]), int(spans[k, 1])
            assert first <= int(rows.min()) and int(rows.max()) <= last, (rois[k].tolist(), rows.tolist(), first, last)
            # Rounding really does carry samples of such boxes beyond their exact extent.
            y_max = float(torch.maximum(rois[k, 2], rois[k, 4])) - (0.5 if aligned else 0.0)
            touched_outside += int(rows.max()) > y_max + 2
    assert touched_outside > 0


def test_row_span_of_ordinary_and_non_finite_boxes():
    rois = torch.tensor([[0, 0.0, 2.3, 5.0, 7.9], [0, 0.0, 7.9, 5.0, 2.3], [0, 0, -50.0, 5, -40.0],
                         [0, 0, float("nan"), 5, 3.0], [0, 0, 3.0, 5, float("inf")]])
    spans = row_span(rois, 1.0, False, 20).tolist()
    assert spans[0][0] <= 2 and spans[0][1] >= 9  # taps of a sample at 7.9 read rows 7 and 8
    assert spans[1][0] <= 2 and spans[1][1] >= 9  # inverted (and raised to one row high from 7.9)
    assert spans[2] == [0, 0]  # far above the map: clamped to the first row
    assert spans[3] == [0, 19] and spans[4][1] == 19


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_boxes_across_many_bands_match_oracle(backend, aligned, sampling_ratio):
    """A tall map: boxes start, end and cross band boundaries at every row offset."""
    gen = torch.Generator().manual_seed(sampling_ratio)
    height, width = 53, 6
    x = torch.randn(2, 3, height, width, generator=gen, dtype=torch.float64)
    y1 = torch.arange(-3.0, height + 2, 3.7)
    k = len(y1)
    rois = torch.stack((torch.arange(k) % 2.0, torch.rand(k, generator=gen) * 3, y1,
                        3 + torch.rand(k, generator=gen) * 3, y1 + 1 + torch.rand(k, generator=gen) * 17), 1)
    rois = rois.to(torch.float64)
    grad_out = torch.randn(k, 3, 3, 2, generator=gen, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    out = roialign.roi_align(xg, rois, (3, 2), 1.0, sampling_ratio, aligned)
    out.backward(grad_out)
    want, gx, _ = oracle.roi_align(x.numpy(), rois.numpy(), 1.0, 3, 2, sampling_ratio, aligned,
                                   grad_out=grad_out.numpy(), geometry=np.float64)
    torch.testing.assert_close(out.detach(), torch.from_numpy(want), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(xg.grad, torch.from_numpy(gx), atol=1e-10, rtol=1e-10)


@pytest.fixture
def one_row_bands(monkeypatch):
    """Bands of a single row, so that a box skipped for a row it does reach shows at once."""
    if importlib.util.find_spec("numba") is not None:
        from roialign.kernels.cpu import roi_align as cpu_roi_align
        monkeypatch.setattr(cpu_roi_align, "BAND_BYTES", 1)
    if importlib.util.find_spec("triton") is not None:
        from roialign.kernels.triton import roi_align as triton_roi_align
        monkeypatch.setattr(triton_roi_align, "_BAND_ROWS", 1)


@pytest.mark.parametrize("aligned", [False, True])
def test_gigantic_boxes_match_oracle(backend, aligned, one_row_bands):
    """Samples that rounding carries far beyond a box's exact extent still reach the right rows."""
    height, width = 32, 3
    # Found with _gigantic_boxes: float32 rounding carries samples of these boxes 2-3 rows below
    # their lower edge. The third is the first mirrored (its samples run upwards).
    rois = torch.tensor([[0, 0.24, -76480128.0, 3.23, 21.43], [0, 0.13, -66578664.0, 1.48, 19.23],
                         [0, 0.24, height - 21.43, 3.23, height + 76480128.0]])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, height, width, generator=gen)
    grad_out = torch.randn(rois.shape[0], 2, 7, 1, generator=gen)
    xg = x.clone().requires_grad_()
    out = roialign.roi_align(xg, rois, (7, 1), 1.0, 0, aligned)
    out.backward(grad_out)
    want, gx, _ = oracle.roi_align(x.double().numpy(), rois.double().numpy(), 1.0, 7, 1, 0, aligned,
                                   grad_out=grad_out.double().numpy(), geometry=np.float32)
    # Each sample weighs about 1e-7 (1 / samples per bin): compare far below that.
    torch.testing.assert_close(out.detach().double(), torch.from_numpy(want), atol=1e-11, rtol=1e-4)
    torch.testing.assert_close(xg.grad.double(), torch.from_numpy(gx), atol=1e-11, rtol=1e-4)
    assert np.abs(gx).max() > 1e-8
