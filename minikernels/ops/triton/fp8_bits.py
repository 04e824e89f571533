"""float8 in software: e4m3 bytes <-> 16-bit / fp32 values, fp32 -> e5m2 bytes, with
integer and fp32 ops.

Triton compiles e4m3 (fp8e4nv) conversions only for capability 8.9+ (Ada, Hopper). The
fp8 weight kernels always read e4m3 weights as bytes (fp8_matmul through int8 views,
fused_moe_fp8 uint8); fp8 KV caches are read and written as bytes (int8 views of the
float8_e4m3fn cache: the loads sign-extend, which the decode uses) where the GPU has no
e4m3 conversions (A100, sm_80) and natively elsewhere (``kv_cache_as_bytes`` decides per
cache).

Decode (byte b = s eeee mmm): the fp16 bits s 0eeee mmm0000000, i.e. ((b & 0x80) << 8) |
((b & 0x7F) << 7), are exactly value / 256 for every finite byte, normal or subnormal (the
exponent bias drops from 15 to 7; e4m3's subnormal steps of 2^-9 land on fp16 normals
and subnormals), and that fp16 converts exactly to bf16 / fp32. Kernels fold the 256
into a scale they apply anyway. From a sign-extended byte (int8) the same bits are two
operations, (b << 7) & 0xBF80: the sign copies land in bits 15 and 14 and the mask keeps
bit 15 (the KV kernels' decode, memory-bound at decode batch sizes, where an A100's
integer rate is the budget). The NaN bytes (0x7F, 0xFF) are the only ones that decode
to |x| = 480 / 256 > 448 / 256: one half-precision compare makes them NaN. (sm_80 SASS
of the bf16 paged-decode kernel: 1704 instructions with the first, shift-and-mask form
and an integer NaN test, 1544 with the sign-extension, 1392 with the fp16 compare,
against 1360 for a native e5m2 cache.)

Encode (fp32 x, already clamped to +-448): round to nearest even on the fp32 bits. Normal
results (|x| >= 2^-6): rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3
bits by adding 0x7FFFF plus the kept part's lowest bit before the shift (a carry moves
into the exponent, as it must). Subnormal results (|x| < 2^-6, multiples of 2^-9):
|x| * 512 rounded to an integer by the fp32 adder (+ 2^23 - 2^23), 8 landing on the
smallest normal byte 0x08. The sign bit is copied (-0 stays -0); NaN becomes 0x7F.
float8_e5m2 (fp8 KV caches of kv_cache_dtype "fp8_e5m2") is encoded the same way (bias
15, 2 mantissa bits, subnormal step 2^-16) on every GPU: below sm_89 Triton's own fp32 ->
e5m2 goes through fp16 rounded toward zero (PTX cvt.rz.f16x2.f32, seen in the sm_80
build), so a value just past a halfway point can round the wrong way; the write is
memory-bound, so the few integer ops cost nothing that shows. e5m2 is read natively (it
is the top byte of an fp16: exact everywhere).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from . import splitk

#: the least capability (as 89 = 8.9) whose Triton kernels convert e4m3 natively
NATIVE_E4M3_ARCH = 89
#: what ``e4m3_bytes_as_fp16`` leaves out of the value: value = decoded * BYTE_SCALE
BYTE_SCALE = 256.0

_forced: bool | None = None


@triton.jit
def e4m3_bytes_as_fp16(b):
    """e4m3fn bytes (int8: sign-extending, 2 ops; or uint8) -> fp16 holding exactly
    value / 256 (NaN bytes: +-480 / 256)."""
    if b.dtype == tl.int8:
        bits = (b.to(tl.int32) << 7) & 0xBF80
    else:
        bi = b.to(tl.int32)
        bits = ((bi & 0x80) << 8) | ((bi & 0x7F) << 7)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def e4m3_bytes_to(b, dtype: tl.constexpr):
    """e4m3fn bytes (int8: sign-extending, 2 ops; or uint8) -> ``dtype`` (fp16 / bf16 /
    fp32) holding exactly value / 256; the NaN bytes (0x7F, 0xFF) give NaN, as
    float8_e4m3fn's."""
    x = e4m3_bytes_as_fp16(b)
    x = tl.where(tl.abs(x) > 1.75, float("nan"), x)      # NaN bytes: +-480 / 256 = 1.875
    return x.to(dtype)


@triton.jit
def fp8_tile_to(x, dtype: tl.constexpr):
    """A tile of an fp8 KV cache -> ``dtype``: float8_e4m3fn converts natively (value);
    bytes decode in software to value / BYTE_SCALE (the kernel folds ``byte_scale`` of
    the cache pointer into the scales it applies anyway)."""
    if x.dtype == tl.int8:
        y = e4m3_bytes_to(x, dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def byte_scale(cache_ptr):
    """BYTE_SCALE for a cache read as bytes (int8 pointer), else 1.0."""
    if cache_ptr.dtype.element_ty == tl.int8:
        s = 256.0
    else:
        s = 1.0
    return s


@triton.jit
def _fp8_bits_from(x, MANT: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                   SUB_STEPS: tl.constexpr):
    """fp32 x (|x| <= the format's max, or NaN) -> the uint8 bits of the fp8 format with
    MANT mantissa bits and exponent bias BIAS, rounded to nearest even (module doc);
    MIN_NORMAL = 2^(1 - BIAS), SUB_STEPS = 1 / (its subnormal step) = 2^(BIAS + MANT - 1)."""
    SHIFT: tl.constexpr = 23 - MANT
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    lsb = (bits >> SHIFT) & 1
    normal = ((bits + ((1 << (SHIFT - 1)) - 1) + lsb) >> SHIFT) - ((127 - BIAS) << MANT)
    small = tl.where(ax < MIN_NORMAL, ax, 0.0)           # NaN -> 0 here, no invalid cast
    sub = ((small * SUB_STEPS + 8388608.0) - 8388608.0).to(tl.int32)
    mag = tl.where(ax >= MIN_NORMAL, normal, sub)
    mag = tl.where(ax != ax, 0x7F, mag)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    return (mag | sign).to(tl.uint8)


@triton.jit
def e4m3_bytes_from(x):
    """fp32 x with |x| <= 448 (or NaN) -> the uint8 bits of float8_e4m3fn(x), rounded to
    nearest even (see the module doc)."""
    return _fp8_bits_from(x, 3, 7, 0.015625, 512.0)


@triton.jit
def e5m2_bytes_from(x):
    """fp32 x with |x| <= 57344 (or NaN) -> the uint8 bits of float8_e5m2(x), rounded to
    nearest even in one step (see the module doc)."""
    return _fp8_bits_from(x, 2, 15, 0.00006103515625, 65536.0)


def kv_cache_as_bytes(cache: torch.Tensor) -> bool:
    """True when the kernels must read / write this float8_e4m3fn KV cache as bytes: a CUDA
    device below capability 8.9 (or forced by ``emulated_e4m3``, for tests)."""
    if cache.dtype != torch.float8_e4m3fn:
        return False
    if _forced is not None:
        return _forced
    index = splitk.device_index(cache)
    return index is not None and splitk.arch_and_sms(index)[0] < NATIVE_E4M3_ARCH


def kernel_view(cache: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel takes for ``cache``: its int8 view (same shape and strides)
    when ``kv_cache_as_bytes``, else the cache itself."""
    return cache.view(torch.int8) if kv_cache_as_bytes(cache) else cache


@contextlib.contextmanager
def emulated_e4m3(enabled: bool | None = True) -> Iterator[None]:
    """Force (True) or forbid (False) the byte path for fp8 KV caches on every device, or
    restore the per-device choice (None): the interpreter tests run the A100's kernels
    with it."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before
