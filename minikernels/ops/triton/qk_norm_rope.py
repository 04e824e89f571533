"""Per-head RMSNorm of q and k fused with rotary embedding, in Triton.

Algorithm: a grid over (token, head block); the head blocks of q come first, then those
of k. A program loads its [BLOCK_H, D] tile of heads once, reduces sum(x^2) per head in
fp32 and normalizes: y = x * rsqrt(mean + eps) * (w + w_offset), rounded to the output
dtype as ``rms_norm`` stores it (ROUND_NORMED off, vLLM's rounding: kept in fp32). Each
rotated dim d then needs its pair partner p(d)
(neox: d +- rot/2; GPT-J: d xor 1): the tile is read a second time at the partners'
columns (from cache) and normalized the same way, and
    out[d] = y[d] * cos[i] - y[p] * sin[i]   (first element of the pair)
    out[d] = y[d] * cos[i] + y[p] * sin[i]   (second element)
with i the pair's index, as ``rotary_embedding`` computes it; dims past rot_dim keep y.
One rounding at the store. Outputs are fresh contiguous [T, H, D] tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

#: elements of one program's tile ([BLOCK_H, BLOCK_D]); bounds registers per thread
TILE = 1024


@triton.jit
def _round_to(v, dst, ROUND: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 -> the destination dtype's nearest value, still fp32 (the stored rounding);
    ROUND False: v as it is (vLLM's rounding)."""
    if ROUND:
        if RNE_BF16:
            v = rne_bf16(v)
        v = v.to(dst.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _norm_rope_heads(src, dst, heads, n_heads, src_head_stride, head_dim, w_ptr, cache_row,
                     eps, w_offset, HAS_WEIGHT: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_D: tl.constexpr, IS_NEOX: tl.constexpr, ROUND_NORMED: tl.constexpr,
                     RNE_BF16: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    m = (heads < n_heads)[:, None] & dmask[None, :]
    rows = src + heads[:, None] * src_head_stride
    x = tl.load(rows + d[None, :], mask=m, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)
    rotated = d < 2 * HALF
    if IS_NEOX:          # pairs (i, HALF + i)
        first = d < HALF
        partner = tl.where(first, d + HALF, d - HALF)
        pair = tl.where(first, d, d - HALF)
    else:                # GPT-J: pairs (2i, 2i + 1)
        first = (d % 2) == 0
        partner = d ^ 1
        pair = d // 2
    partner = tl.where(rotated, partner, d)
    pair = tl.where(rotated, pair, 0)
    xp = tl.load(rows + partner[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32) + w_offset
        wp = tl.load(w_ptr + partner, mask=dmask, other=0.0).to(tl.float32) + w_offset
        y = _round_to(x * inv[:, None] * w[None, :], dst, ROUND_NORMED, RNE_BF16)
        yp = _round_to(xp * inv[:, None] * wp[None, :], dst, ROUND_NORMED, RNE_BF16)
    else:
        y = _round_to(x * inv[:, None], dst, ROUND_NORMED, RNE_BF16)
        yp = _round_to(xp * inv[:, None], dst, ROUND_NORMED, RNE_BF16)
    cmask = rotated & dmask
    cos = tl.load(cache_row + pair, mask=cmask, other=1.0).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF + pair, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = tl.where(first[None, :], y * cos - yp * sin, y * cos + yp * sin)
    out = tl.where(rotated[None, :], out, y)
    if RNE_BF16:
        out = rne_bf16(out)
    tl.store(dst + heads[:, None] * head_dim + d[None, :], out.to(dst.dtype.element_ty),
             mask=m)


@triton.jit
def qk_norm_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, pos_ptr, cache_ptr,
                        q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
                        cache_stride, n_q_heads, n_k_heads, head_dim, eps, w_offset,
                        HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                        IS_NEOX: tl.constexpr, ROUND_NORMED: tl.constexpr,
                        RNE_BF16: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cache_row = cache_ptr + pos * cache_stride
    if blk < q_blocks:
        heads = blk * BLOCK_H + tl.arange(0, BLOCK_H)
        _norm_rope_heads(q_ptr + tok * q_tok_stride, qo_ptr + tok * n_q_heads * head_dim,
                         heads, n_q_heads, q_head_stride, head_dim, qw_ptr, cache_row, eps,
                         w_offset, HAS_QW, HALF, BLOCK_D, IS_NEOX, ROUND_NORMED, RNE_BF16)
    else:
        heads = (blk - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _norm_rope_heads(k_ptr + tok * k_tok_stride, ko_ptr + tok * n_k_heads * head_dim,
                         heads, n_k_heads, k_head_stride, head_dim, kw_ptr, cache_row, eps,
                         w_offset, HAS_KW, HALF, BLOCK_D, IS_NEOX, ROUND_NORMED, RNE_BF16)


def block_h(n_heads: int, block_d: int) -> int:
    """Heads per program: as many as fit TILE elements (at least one), up to n_heads."""
    return max(1, min(triton.next_power_of_2(max(n_heads, 1)), TILE // block_d))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, eps: float, is_neox_style: bool = True,
                 weight_offset: float = 0.0, vllm_rounding: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous), weights [D] contiguous or None,
    positions [T] contiguous, cache [P, rot] contiguous -> contiguous (q, k) outputs.
    vllm_rounding: the normalized value is not rounded before the rotation."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qo = _alloc.empty((t, hq, d), q.dtype, q.device)
    ko = _alloc.empty((t, hkv, d), k.dtype, k.device)
    if t == 0 or d == 0 or hq + hkv == 0:
        return qo, ko
    block_d = triton.next_power_of_2(d)
    bh = block_h(max(hq, hkv), block_d)
    grid = (t, triton.cdiv(hq, bh) + triton.cdiv(hkv, bh))
    rne = q.dtype == torch.bfloat16 and _backend.interpreter_enabled()
    qk_norm_rope_kernel[grid](
        q, k, qo, ko, q_weight if q_weight is not None else q,
        k_weight if k_weight is not None else k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        hq, hkv, d, float(eps), float(weight_offset),
        HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
        HALF=cos_sin_cache.shape[-1] // 2, BLOCK_D=block_d, BLOCK_H=bh,
        IS_NEOX=is_neox_style, ROUND_NORMED=not vllm_rounding, RNE_BF16=rne, num_warps=4)
    return qo, ko


# Qwen3 (D 128, full rotary), Gemma 3 (D 256; 1 + w), partial rotary, GPT-J pairs, and
# vLLM's rounding (the compat layer's fused_qk_norm_rope).
for _dt in ("fp16", "bf16"):
    for _d, _rot, _neox, _round in ((128, 128, True, True), (64, 64, True, True),
                                    (256, 256, True, True), (128, 64, True, True),
                                    (128, 128, False, True), (128, 128, True, False)):
        _style = ("" if _neox else ",gptj") + ("" if _round else ",vllm")
        register(KernelSpec(
            name=f"qk_norm_rope[{_dt},D={_d},rot={_rot}{_style}]", fn=qk_norm_rope_kernel,
            signature={"q_ptr": f"*{_dt}", "k_ptr": f"*{_dt}", "qo_ptr": f"*{_dt}",
                       "ko_ptr": f"*{_dt}", "qw_ptr": f"*{_dt}", "kw_ptr": f"*{_dt}",
                       "pos_ptr": "*i64", "cache_ptr": "*fp32", "q_tok_stride": "i64",
                       "q_head_stride": "i64", "k_tok_stride": "i64",
                       "k_head_stride": "i64", "cache_stride": "i64", "n_q_heads": "i32",
                       "n_k_heads": "i32", "head_dim": "i32", "eps": "fp32",
                       "w_offset": "fp32", "HAS_QW": "constexpr", "HAS_KW": "constexpr",
                       "HALF": "constexpr", "BLOCK_D": "constexpr", "BLOCK_H": "constexpr",
                       "IS_NEOX": "constexpr", "ROUND_NORMED": "constexpr",
                       "RNE_BF16": "constexpr"},
            constexprs={"HAS_QW": True, "HAS_KW": True, "HALF": _rot // 2, "BLOCK_D": _d,
                        "BLOCK_H": TILE // _d, "IS_NEOX": _neox, "ROUND_NORMED": _round,
                        "RNE_BF16": False},
            num_warps=4, num_stages=1))
