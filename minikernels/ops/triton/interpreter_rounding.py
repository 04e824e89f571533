"""Rounding helpers for Triton's CPU interpreter (tests run the kernels there).

The interpreter's fp32 -> bf16 cast truncates, where the GPU rounds to nearest even. A
kernel that stores (or multiplies in) bf16 calls :func:`rne_bf16` first, under a
constexpr set only when it runs in the interpreter: the value is then already a bf16
value, so the cast that follows drops zero bits and the compiled GPU code is untouched.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rne_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still fp32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
