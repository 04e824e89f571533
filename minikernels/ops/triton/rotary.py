"""Rotary embedding (neox or GPT-J style) for q and k in one launch, in Triton.

Algorithm: a grid over (token, head block). Each program loads the token's position and
its cos/sin rows (HALF = rot_dim / 2 each), then for a [BLOCK_H, HALF] tile of q heads and
one of k heads loads the pairs (x1_i, x2_i), computes out1 = x1*cos - x2*sin,
out2 = x2*cos + x1*sin in fp32, stores them back to the same dims, and copies the
unrotated tail dims [rot_dim, D) as they are. The style only moves the pairs: neox
(IS_NEOX) pairs dims (i, HALF + i), GPT-J (interleaved) pairs dims (2i, 2i + 1).
Outputs are fresh contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register


@triton.jit
def _rotate_heads(src, dst, heads, n_heads, src_head_stride, head_dim, cos, sin,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                  IS_NEOX: tl.constexpr, RNE_BF16: tl.constexpr):
    hmask = heads < n_heads
    offs = tl.arange(0, BLOCK_HALF)
    m = hmask[:, None] & (offs[None, :] < HALF)
    if IS_NEOX:   # pair i = dims (i, HALF + i): two contiguous halves
        i1 = offs
        i2 = HALF + offs
    else:         # GPT-J: pair i = dims (2i, 2i + 1), interleaved
        i1 = 2 * offs
        i2 = 2 * offs + 1
    s = src + heads[:, None] * src_head_stride
    d = dst + heads[:, None] * head_dim
    x1 = tl.load(s + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(s + i2[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    if RNE_BF16:     # (interpreter only: its bf16 cast truncates; a GPU's rounds to even)
        o1 = rne_bf16(o1)
        o2 = rne_bf16(o2)
    tl.store(d + i1[None, :], o1.to(dst.dtype.element_ty), mask=m)
    tl.store(d + i2[None, :], o2.to(dst.dtype.element_ty), mask=m)
    if BLOCK_TAIL > 0:
        toffs = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        tm = hmask[:, None] & (toffs[None, :] < head_dim)
        tail = tl.load(s + toffs[None, :], mask=tm, other=0.0)
        tl.store(d + toffs[None, :], tail, mask=tm)


@triton.jit
def rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, q_tok_stride,
                  q_head_stride, k_tok_stride, k_head_stride, cache_stride, n_q_heads,
                  n_k_heads, head_dim, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr,
                  RNE_BF16: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cmask = offs < HALF
    cos = tl.load(cache_ptr + pos * cache_stride + offs, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + offs, mask=cmask,
                  other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + tok * q_tok_stride, qo_ptr + tok * n_q_heads * head_dim, heads,
                  n_q_heads, q_head_stride, head_dim, cos, sin, HALF, BLOCK_HALF, BLOCK_TAIL,
                  IS_NEOX, RNE_BF16)
    _rotate_heads(k_ptr + tok * k_tok_stride, ko_ptr + tok * n_k_heads * head_dim, heads,
                  n_k_heads, k_head_stride, head_dim, cos, sin, HALF, BLOCK_HALF, BLOCK_TAIL,
                  IS_NEOX, RNE_BF16)


def _tail_block(head_dim: int, half: int) -> int:
    tail = head_dim - 2 * half
    return triton.next_power_of_2(tail) if tail > 0 else 0


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox_style: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous), positions [T] (contiguous),
    cache [P, rot] (contiguous); is_neox_style False = GPT-J (interleaved) pairs."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    half = cos_sin_cache.shape[-1] // 2
    qo = _alloc.empty((t, hq, d), q.dtype, q.device)
    ko = _alloc.empty((t, hkv, d), k.dtype, k.device)
    if t == 0:
        return qo, ko
    block_h = min(triton.next_power_of_2(max(hq, hkv)), 16)
    grid = (t, triton.cdiv(max(hq, hkv), block_h))
    rotary_kernel[grid](
        q, k, qo, ko, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), cos_sin_cache.stride(0), hq, hkv, d, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_TAIL=_tail_block(d, half),
        BLOCK_H=block_h, IS_NEOX=is_neox_style,
        RNE_BF16=q.dtype == torch.bfloat16 and _backend.interpreter_enabled(), num_warps=4)
    return qo, ko


for _dt in ("fp16", "bf16"):
    for _d, _rot in ((128, 128), (64, 64), (256, 256), (128, 64)):
        for _neox in (True, False):
            _half = _rot // 2
            _style = "" if _neox else ",gptj"
            register(KernelSpec(
                name=f"rotary[{_dt},D={_d},rot={_rot}{_style}]", fn=rotary_kernel,
                signature={"q_ptr": f"*{_dt}", "k_ptr": f"*{_dt}", "qo_ptr": f"*{_dt}",
                           "ko_ptr": f"*{_dt}", "pos_ptr": "*i64", "cache_ptr": "*fp32",
                           "q_tok_stride": "i64", "q_head_stride": "i64",
                           "k_tok_stride": "i64", "k_head_stride": "i64",
                           "cache_stride": "i64", "n_q_heads": "i32", "n_k_heads": "i32",
                           "head_dim": "i32", "HALF": "constexpr", "BLOCK_HALF": "constexpr",
                           "BLOCK_TAIL": "constexpr", "BLOCK_H": "constexpr",
                           "IS_NEOX": "constexpr", "RNE_BF16": "constexpr"},
                constexprs={"HALF": _half, "BLOCK_HALF": _half,
                            "BLOCK_TAIL": _tail_block(_d, _half), "BLOCK_H": 16,
                            "IS_NEOX": _neox, "RNE_BF16": False},
                num_warps=4, num_stages=1))
