"""float16 and bfloat16 in the Numba kernels: the bit-pattern conversions against torch's, and
half maps read and written in place give exactly what converting to float32 first gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import numba  # noqa: E402

import roialign  # noqa: E402
from roialign.kernels.cpu import roi_align as cpu_roi_align  # noqa: E402
from roialign.kernels.cpu.half_types import (bfloat16_word, bfloat16_words, even_channel, kernel_array, narrow,  # noqa: E402
                                             narrow_float16_bits, odd_channel, widen, widen_float16_bits)

HALVES = [torch.float16, torch.bfloat16]


@numba.njit
def _widen_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = widen(bits[i])


@numba.njit
def _widen_float16_integer(bits, out):
    for i in range(bits.shape[0]):
        out[i] = widen_float16_bits(bits[i])


@numba.njit
def _narrow_all(values, out):
    for i in range(values.shape[0]):
        out[i] = narrow(values[i], out)


@numba.njit
def _narrow_float16_integer(values, out):
    for i in range(values.shape[0]):
        out[i] = narrow_float16_bits(values[i])


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: the same bits, or both NaN (NaN payloads differ between torch's own paths)."""
    return (a.view(torch.int16 if a.element_size() == 2 else torch.int32)
            == b.view(torch.int16 if b.element_size() == 2 else torch.int32)) | (a.float().isnan() & b.float().isnan())


def _every_half(dtype):
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _hard_floats(dtype):
    """Random float32 bit patterns, every half value, the midpoints between neighbours (ties) and
    the floats just either side of each midpoint."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.randint(-2**31, 2**31, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    halves = _every_half(dtype).float()
    finite = halves[halves.isfinite()].unique()
    mids = ((finite[:-1].double() + finite[1:].double()) / 2).float()
    return torch.cat([noise.view(torch.float32), halves, mids, torch.nextafter(mids, torch.tensor(np.inf)),
                      torch.nextafter(mids, torch.tensor(-np.inf)),
                      torch.tensor([65519.0, 65520.0, -65520.0, 2.0**-25, -(2.0**-25), 3e-45, 0.0, -0.0])])


@pytest.mark.parametrize("dtype", HALVES)
def test_widen_gives_torchs_float_for_every_bit_pattern(dtype):
    halves = _every_half(dtype)
    got = np.empty(halves.numel(), np.float32)
    _widen_all(kernel_array(halves), got)
    assert bool(_same(torch.from_numpy(got), halves.float()).all())


def test_integer_float16_widening_matches_torch_for_every_bit_pattern():
    """The conversion used where the CPU has no half instructions, tested on every host."""
    halves = _every_half(torch.float16)
    got = np.empty(halves.numel(), np.float32)
    _widen_float16_integer(kernel_array(halves), got)
    assert bool(_same(torch.from_numpy(got), halves.float()).all())


@pytest.mark.parametrize("dtype", HALVES)
def test_narrow_rounds_like_torch(dtype):
    values = _hard_floats(dtype)
    got = torch.empty(values.numel(), dtype=dtype)
    _narrow_all(values.numpy(), kernel_array(got))
    assert bool(_same(got, values.to(dtype)).all())


def test_integer_float16_narrowing_rounds_like_torch():
    values = _hard_floats(torch.float16)
    got = torch.empty(values.numel(), dtype=torch.float16)
    _narrow_float16_integer(values.numpy(), kernel_array(got))
    assert bool(_same(got, values.to(torch.float16)).all())


@numba.njit
def _split_words(words, even, odd):
    for i in range(words.shape[0]):
        even[i] = even_channel(words[i])
        odd[i] = odd_channel(words[i])


@numba.njit
def _pack_words(even, odd, out):
    for i in range(out.shape[0]):
        out[i] = bfloat16_word(even[i], odd[i])


def test_bfloat16_words_widen_and_round_both_channels_like_torch():
    """A word of two bfloat16 channels: each half widens to torch's float (every bit pattern in
    each half, against a shuffled partner), and packing rounds each float as torch does."""
    halves = _every_half(torch.bfloat16)
    partners = halves[torch.randperm(halves.numel(), generator=torch.Generator().manual_seed(2))]
    pairs = torch.stack((halves, partners), dim=1).contiguous()  # [P, 2]: channel 0 low, channel 1 high
    words = bfloat16_words(kernel_array(pairs))
    assert words is not None and words.shape == (halves.numel(), 1)
    even, odd = np.empty(halves.numel(), np.float32), np.empty(halves.numel(), np.float32)
    _split_words(words[:, 0], even, odd)
    assert bool(_same(torch.from_numpy(even), halves.float()).all())
    assert bool(_same(torch.from_numpy(odd), partners.float()).all())
    values = _hard_floats(torch.bfloat16)
    flipped = values.flip(0)
    packed = torch.empty(values.numel(), 2, dtype=torch.bfloat16)
    _pack_words(values.numpy(), flipped.numpy(), bfloat16_words(kernel_array(packed))[:, 0])
    assert bool(_same(packed[:, 0], values.to(torch.bfloat16)).all())
    assert bool(_same(packed[:, 1], flipped.to(torch.bfloat16)).all())


def test_bfloat16_words_only_where_two_channels_fit_a_word():
    x = torch.zeros(2, 6, 5, 8, dtype=torch.bfloat16)
    assert bfloat16_words(kernel_array(x)).shape == (2, 6, 5, 4)
    assert bfloat16_words(kernel_array(x[..., :7])) is None  # an odd number of channels
    assert bfloat16_words(kernel_array(x[..., ::2])) is None  # channels not contiguous
    assert bfloat16_words(kernel_array(x.view(-1)[1:1 + 240].view(2, 6, 5, 4))) is None  # not 4-byte aligned
    assert bfloat16_words(kernel_array(x.half())) is None  # float16 bits
    words = bfloat16_words(kernel_array(x))
    words[0, 0, 0, 0] = 0x40003F80  # 1.0 in channel 0, 2.0 in channel 1: a view, not a copy
    assert x[0, 0, 0, :2].tolist() == [1.0, 2.0]


def test_kernel_array_views_the_bits_without_copying():
    x = torch.randn(3, 4).to(torch.bfloat16)
    assert kernel_array(x).dtype == np.uint16 and kernel_array(x.half()).dtype == np.int16
    kernel_array(x)[0, 0] = 0x3F80  # the bits of 1.0
    assert x[0, 0].item() == 1.0


def _map(dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 30, 41, generator=gen) * 3
    # subnormal, signed zero and infinite values of the half type, read as they are
    tiny = torch.finfo(dtype).smallest_normal
    x[0, :4, 0, :6] = torch.tensor([tiny / 4, -tiny / 64, -0.0, float("inf"), 65000.0, -tiny / 2])
    x = x.to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided view":
        wide = torch.zeros(2, 74, 30, 82, dtype=dtype)
        view = wide[:, ::2, :, ::2]
        view.copy_(x)
        return view
    return x


@pytest.mark.parametrize("planar", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided view"])
@pytest.mark.parametrize("dtype", HALVES)
def test_half_maps_give_the_bits_of_a_float32_computation(dtype, layout, planar, monkeypatch):
    """Reading the half map in place (and rounding the input gradient as it is stored) gives
    bit for bit the forward, input gradient and box gradient of converting to float32 first."""
    monkeypatch.setattr(cpu_roi_align, "_planar_is_cheaper", lambda *args: planar)
    x = _map(dtype, layout, seed=5)
    before = x.clone()
    gen = torch.Generator().manual_seed(6)
    k = 200
    xy = torch.rand(k, 2, generator=gen) * 70 - 10
    rois = torch.cat((torch.randint(0, 2, (k, 1), generator=gen).float(), xy,
                      xy + torch.rand(k, 2, generator=gen) * 40), 1)
    grad_out = torch.randn(k, 37, 4, 3, generator=gen).to(dtype)
    results = []
    for features in (x.float(), x):
        features = features.detach().requires_grad_()
        boxes = rois.clone().requires_grad_()
        with roialign.use_backend("numba"):
            out = roialign.roi_align(features, boxes, (4, 3), 0.5, 2, True)
            out.backward(grad_out.to(out.dtype))
        results.append((out, features.grad, boxes.grad))
    (out32, grad32, box32), (out16, grad16, box16) = results
    assert out16.dtype == dtype and grad16.dtype == dtype
    assert grad16.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert bool(_same(out16, out32.to(dtype)).all())
    assert bool(_same(grad16, grad32.to(dtype)).all())
    assert bool(((box16 == box32) | (box16.isnan() & box32.isnan())).all())
    assert bool(_same(x, before).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channels_last_view_copies_nchw_halves_as_bits_and_views_channels_last_ones(monkeypatch, dtype):
    """An NCHW half map is transposed as its bit patterns (no widening: half the bytes); a
    channels_last one is viewed in place. Every order of the copy gives the same bits."""
    from roialign.kernels.cpu import layout

    x = torch.randn(2, 40, 5, 35).to(dtype)
    x[0, 3, 2, 7] = float("nan")
    want = kernel_array(x.permute(0, 2, 3, 1).contiguous())
    for block in layout.BLOCKS:
        for key in list(layout._TO_CHANNELS_LAST):
            monkeypatch.setitem(layout._TO_CHANNELS_LAST, key, block)
        copied = layout.channels_last_view(x)
        assert copied.dtype == want.dtype and np.array_equal(copied.view(np.uint16), want.view(np.uint16))
    bits = layout.channels_last_view(x.contiguous(memory_format=torch.channels_last))
    assert bits.dtype == want.dtype
    assert np.array_equal(bits.view(np.uint16), want.view(np.uint16))

