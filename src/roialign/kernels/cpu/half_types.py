"""float16 and bfloat16 tensors in the Numba kernels, read and written as their 16-bit patterns.

Numba has no half-precision type on the CPU, so a half tensor reaches a kernel as an integer
array of its bit patterns, and the array's type says which format they are in:

- ``uint16``: bfloat16 bits;
- ``int16``: float16 (IEEE binary16) bits.

In a kernel, :func:`widen` turns one element into the float32 it equals (exactly) and
:func:`narrow` rounds a float32 to the element type of the array it is stored into (nearest,
ties to even, as ``Tensor.to`` does). For float32 and float64 arrays both pass values through
unchanged, so one kernel source serves every dtype and compiles to the same code as before for
float32 and float64. float16 uses the CPU's conversion instructions where llvmlite reports them
(x86's F16C), else integer code; both round like torch, the integer code is tested on every host.

Reading halves in place saves the full-map float32 copy that converting first would cost (30-50
ms for a 28 MB bfloat16 map on 2 cores, more than the forward of a few hundred boxes), and the
results are the same bits, since widening is exact and the arithmetic is float32 either way.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload
from torch import Tensor

JIT = dict(nogil=True, cache=True)
HALF_TYPES = (torch.float16, torch.bfloat16)


def kernel_array(t: Tensor) -> np.ndarray:
    """The numpy array a kernel takes for ``t`` (any strides): its values, or for a half dtype its
    bit patterns as ``int16`` (float16) or ``uint16`` (bfloat16)."""
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _bits_from_float(typingctx, value):
    """The bit pattern, as uint32, of the float32 ``value``."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _host_converts_halves() -> bool:
    """Whether the CPU converts float16 in hardware (x86's F16C; every AVX2 CPU has it), so that
    LLVM's half <-> float conversions compile to vector instructions rather than library calls."""
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # features unknown: the integer conversions work everywhere
        return False


_HARDWARE_FLOAT16 = _host_converts_halves()


@intrinsic
def _float_from_float16(typingctx, bits):
    """float32 value of the float16 bit pattern ``bits`` (int16), by the CPU's conversion."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _float16_from_float(typingctx, value):
    """float16 bit pattern (int16) nearest to the float32 ``value``, by the CPU's conversion."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(types.float32), codegen


def widen(value):
    """float32 value of a half bit pattern; a float stays as it is (Numba only)."""
    raise NotImplementedError("widen is compiled into Numba kernels only")


def narrow(value, target):
    """``value`` as an element of the array ``target`` (Numba only)."""
    raise NotImplementedError("narrow is compiled into Numba kernels only")


def carry(value, target):
    """An element read from one array as an element of the array ``target``: the same bits when
    both hold the same half format, else widened (Numba only)."""
    raise NotImplementedError("carry is compiled into Numba kernels only")


_EXPONENT_SHIFT = np.uint32(112 << 23)  # float32 exponent bias (127) minus float16's (15), in place
_SUBNORMAL_UNIT = np.float32(2.0**-24)  # the value of float16's lowest mantissa bit below 2**-14


@overload(widen)
def _widen(value):
    if value == types.uint16:  # bfloat16: the upper half of a float32
        return lambda value: _float_from_bits(np.uint32(value) << np.uint32(16))
    if value == types.int16:  # float16
        if _HARDWARE_FLOAT16:
            return lambda value: _float_from_float16(value)
        return lambda value: widen_float16_bits(value)
    if isinstance(value, types.Float):
        return lambda value: value
    return None


@overload(carry)
def _carry(value, target):
    if not isinstance(target, types.Array):
        return None
    if value in (types.uint16, types.int16) and value == target.dtype:
        return lambda value, target: value
    return lambda value, target: widen(value)


@overload(narrow)
def _narrow(value, target):
    if not isinstance(target, types.Array):
        return None
    if target.dtype == types.uint16:  # bfloat16
        return lambda value, target: np.uint16(_bfloat16_bits(np.float32(value)))
    if target.dtype == types.int16:  # float16
        if _HARDWARE_FLOAT16:
            return lambda value, target: _float16_from_float(np.float32(value))
        return lambda value, target: narrow_float16_bits(np.float32(value))
    if isinstance(target.dtype, types.Float):
        dtype = target.dtype
        return lambda value, target: dtype(value)
    return None


@numba.njit(inline="always", **JIT)
def _bfloat16_bits(value):
    """The bfloat16 bit pattern nearest to the float32 ``value`` (ties to even; NaN to 0x7FC0, as
    torch rounds), in the low 16 bits of a uint32."""
    u = _bits_from_float(value)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint32(0x7FC0)  # NaN
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


# A bfloat16 map whose channels are an even number of contiguous elements can also be read as
# uint32 words of two channels: channel 2j in the low half of word j, 2j + 1 in the high half.
# Each half widens with one operation on the whole word (a shift, or a mask), where a bfloat16
# element needs two (a zero-extending load into 32 bits, then the shift); the sums over taps
# spend half their vector operations widening (see roi_align's ``_forward_bins_words``).


def bfloat16_words(a: np.ndarray) -> np.ndarray | None:
    """The bfloat16 kernel array ``a`` (uint16, channels last) as uint32 words of two channels
    ([..., C / 2]), or None where it cannot be: C odd, the channels not contiguous, or the data
    not 4-byte aligned."""
    if (a.dtype != np.uint16 or a.ndim == 0 or a.shape[-1] % 2 or a.strides[-1] != 2
            or any(s % 4 for s in a.strides[:-1]) or a.ctypes.data % 4):
        return None
    return a.view(np.uint32)


_LOW_SHIFT = np.uint32(16)
_HIGH_HALF = np.uint32(0xFFFF0000)


@numba.njit(inline="always", **JIT)
def even_channel(word):
    """float32 value of the bfloat16 in the low half of ``word`` (its even channel)."""
    return _float_from_bits(word << _LOW_SHIFT)


@numba.njit(inline="always", **JIT)
def odd_channel(word):
    """float32 value of the bfloat16 in the high half of ``word`` (its odd channel)."""
    return _float_from_bits(word & _HIGH_HALF)


@numba.njit(inline="always", **JIT)
def bfloat16_word(even, odd):
    """The word of two channels holding ``even`` and ``odd`` rounded to bfloat16, as ``narrow``
    rounds each."""
    return _bfloat16_bits(np.float32(even)) | (_bfloat16_bits(np.float32(odd)) << _LOW_SHIFT)


@numba.njit(inline="always", **JIT)
def weigh_words(even, odd, i, words, base, at, weight, first, n, zero):
    """``common.weigh_taps`` on a bfloat16 map read as words (``words`` [P, C / 2]): row ``i`` of
    ``even`` and of ``odd`` becomes ``zero + w[0] * channel(words[base + at[0], j]) + ... +
    w[n - 1] * channel(...)`` for each word ``j``, where ``at`` and ``w`` are ``at[first:]`` and
    ``weight[first:]``: the same additions, four entries per pass, rounded as ``weigh_taps``
    rounds them, so the same bits. The first pass stores rather than adds; no entries leave
    ``zero``."""
    half = words.shape[1]
    e = first
    end = first + n
    while e < max(end, first + 1):
        if end - e >= 4:
            pa, pb, pc, pd = base + at[e], base + at[e + 1], base + at[e + 2], base + at[e + 3]
            wa, wb, wc, wd = weight[e], weight[e + 1], weight[e + 2], weight[e + 3]
            if e == first:
                for j in range(half):
                    ua, ub, uc, ud = words[pa, j], words[pb, j], words[pc, j], words[pd, j]
                    even[i, j] = (zero + wa * even_channel(ua) + wb * even_channel(ub) + wc * even_channel(uc)
                                  + wd * even_channel(ud))
                    odd[i, j] = (zero + wa * odd_channel(ua) + wb * odd_channel(ub) + wc * odd_channel(uc)
                                 + wd * odd_channel(ud))
            else:
                for j in range(half):
                    ua, ub, uc, ud = words[pa, j], words[pb, j], words[pc, j], words[pd, j]
                    even[i, j] = (even[i, j] + wa * even_channel(ua) + wb * even_channel(ub) + wc * even_channel(uc)
                                  + wd * even_channel(ud))
                    odd[i, j] = (odd[i, j] + wa * odd_channel(ua) + wb * odd_channel(ub) + wc * odd_channel(uc)
                                 + wd * odd_channel(ud))
            e += 4
        elif end - e >= 2:
            pa, pb, wa, wb = base + at[e], base + at[e + 1], weight[e], weight[e + 1]
            if e == first:
                for j in range(half):
                    ua, ub = words[pa, j], words[pb, j]
                    even[i, j] = zero + wa * even_channel(ua) + wb * even_channel(ub)
                    odd[i, j] = zero + wa * odd_channel(ua) + wb * odd_channel(ub)
            else:
                for j in range(half):
                    ua, ub = words[pa, j], words[pb, j]
                    even[i, j] = even[i, j] + wa * even_channel(ua) + wb * even_channel(ub)
                    odd[i, j] = odd[i, j] + wa * odd_channel(ua) + wb * odd_channel(ub)
            e += 2
        elif end - e == 1:
            pa, wa = base + at[e], weight[e]
            if e == first:
                for j in range(half):
                    even[i, j] = zero + wa * even_channel(words[pa, j])
                    odd[i, j] = zero + wa * odd_channel(words[pa, j])
            else:
                for j in range(half):
                    even[i, j] = even[i, j] + wa * even_channel(words[pa, j])
                    odd[i, j] = odd[i, j] + wa * odd_channel(words[pa, j])
            e += 1
        else:  # no entries
            for j in range(half):
                even[i, j] = zero
                odd[i, j] = zero
            e += 1


@numba.njit(**JIT)
def widen_float16_bits(value):
    """float32 value of the float16 bit pattern ``value`` (int16), with integer operations only:
    for CPUs without half conversions (and tested on every host)."""
    h = np.uint32(np.uint16(value))
    magnitude = h & np.uint32(0x7FFF)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    # Zero or subnormal: an integer count of 2**-24, a normal float32.
    small = _float_from_bits(_bits_from_float(np.float32(np.int32(magnitude)) * _SUBNORMAL_UNIT) | sign)
    # Normal: move the exponent to float32's bias; infinity and NaN get the all-ones exponent.
    special = _EXPONENT_SHIFT if magnitude >= np.uint32(0x7C00) else np.uint32(0)
    large = _float_from_bits(((magnitude << np.uint32(13)) + _EXPONENT_SHIFT + special) | sign)
    return small if magnitude < np.uint32(0x0400) else large


@numba.njit(**JIT)
def narrow_float16_bits(value):
    """The float16 bit pattern (int16) nearest to the float32 ``value``, ties to even, with
    integer operations only: for CPUs without half conversions (and tested on every host)."""
    u = _bits_from_float(value)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        h = np.uint32(0x7E00)  # NaN
    elif a >= np.uint32(0x477FF000):  # 65520 and up round to infinity
        h = np.uint32(0x7C00)
    elif a >= np.uint32(0x38800000):  # 2**-14 and up: normal; the carry may bump the exponent
        rounded = a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))
        h = (rounded >> np.uint32(13)) - np.uint32(112 << 10)
    else:  # subnormal or zero: round |value| / 2**-24 to an integer
        exponent = a >> np.uint32(23)
        shift = min(np.uint32(126) - min(exponent, np.uint32(126)), np.uint32(25))
        shift = max(shift, np.uint32(14))
        mantissa = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        q = mantissa >> shift
        rest = mantissa & ((np.uint32(1) << shift) - np.uint32(1))
        tie = np.uint32(1) << (shift - np.uint32(1))
        if rest > tie or (rest == tie and (q & np.uint32(1))):
            q += np.uint32(1)
        h = q
    return np.int16(np.uint16(h | sign))