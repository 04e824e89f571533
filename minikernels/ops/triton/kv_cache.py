"""Paged KV-cache write (vLLM's reshape_and_cache) in Triton.

Algorithm: a grid over (token, kv-head block). Each program loads the token's slot
(slot = block * block_size + offset; -1 = skip, every store masked off) and copies a
[BLOCK_H, D] tile of k and of v into cache block slot // block_size, row slot % block_size.
Every tensor has its own strides (a vLLM-style [num_blocks, 2, block, Hkv, D] cache split
into k and v views works), and block_size may be any size. Same-dtype caches get a plain
copy; fp8 caches (QUANT) get fp8(clamp(x / scale, +-max)) with a per-tensor or per-head
float32 scale, rounded to nearest even (max: 448 for e4m3, 57344 for e5m2). Without e4m3
hardware (sm_80) an e4m3 cache comes as bytes (an int8 view) and the rounding is done in
integer ops (fp8_bits.py); e5m2 is encoded that way on every GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fp8_bits
from .fp8_bits import e4m3_bytes_from, e5m2_bytes_from
from .registry import KernelSpec, register

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3 value
E5M2_MAX = tl.constexpr(57344.0)  # largest finite e5m2 value


@triton.jit
def _round_fp8_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest e4m3 value, ties to even, still fp32.

    Only the Triton interpreter needs this: its fp32 -> fp8 cast mis-rounds when rounding
    carries into the next binade (31.6 -> 16). A value that is already an e4m3 number
    converts exactly. e4m3: 3 mantissa bits, normal exponents from -6, subnormal step 2^-9.
    """
    ax = tl.abs(x)
    e = tl.floor(tl.math.log2(tl.maximum(ax, 1e-30)))
    e = tl.maximum(e, -6.0)
    step = tl.math.exp2(e - 3.0)
    y = ax / step                       # exact: step is a power of two
    r = tl.floor(y + 0.5)
    tie_to_odd = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
    r = tl.where(tie_to_odd, r - 1.0, r)
    return tl.where(ax == 0, x, tl.where(x < 0, -r * step, r * step))   # keeps -0


@triton.jit
def write_kv_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, n_heads,
                          head_dim, block_size, k_tok_stride, k_head_stride, v_tok_stride,
                          v_head_stride, kc_blk_stride, kc_tok_stride, kc_head_stride,
                          vc_blk_stride, vc_tok_stride, vc_head_stride,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
                          SCALE_PER_HEAD: tl.constexpr, EXACT_ROUND: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    mask = (heads[:, None] < n_heads) & (d[None, :] < head_dim)
    mask = mask & ((heads * 0 + slot) >= 0)[:, None]   # slot -1: nothing to write
    safe = tl.maximum(slot, 0)
    blk = safe // block_size
    off = safe % block_size
    kc = kc_ptr + blk * kc_blk_stride + off * kc_tok_stride
    vc = vc_ptr + blk * vc_blk_stride + off * vc_tok_stride
    k = tl.load(k_ptr + tok * k_tok_stride + heads[:, None] * k_head_stride + d[None, :],
                mask=mask, other=0.0)
    v = tl.load(v_ptr + tok * v_tok_stride + heads[:, None] * v_head_stride + d[None, :],
                mask=mask, other=0.0)
    if QUANT:
        if SCALE_PER_HEAD:
            ks = tl.load(ks_ptr + heads, mask=heads < n_heads, other=1.0)[:, None]
            vs = tl.load(vs_ptr + heads, mask=heads < n_heads, other=1.0)[:, None]
        else:
            ks = tl.load(ks_ptr)
            vs = tl.load(vs_ptr)
        # an IEEE division (div_rn), as the reference's: the fp8 rounding sees the same value
        k = tl.math.div_rn(k.to(tl.float32), ks)
        v = tl.math.div_rn(v.to(tl.float32), vs)
        if kc_ptr.dtype.element_ty == tl.float8e5:   # e5m2: encoded in software everywhere
            k = e5m2_bytes_from(tl.clamp(k, -E5M2_MAX, E5M2_MAX)).to(tl.float8e5, bitcast=True)
            v = e5m2_bytes_from(tl.clamp(v, -E5M2_MAX, E5M2_MAX)).to(tl.float8e5, bitcast=True)
        else:
            k = tl.clamp(k, -FP8_MAX, FP8_MAX)
            v = tl.clamp(v, -FP8_MAX, FP8_MAX)
        if kc_ptr.dtype.element_ty == tl.int8:  # no e4m3 hardware: the cache as bytes
            k = e4m3_bytes_from(k).to(tl.int8, bitcast=True)
            v = e4m3_bytes_from(v).to(tl.int8, bitcast=True)
        elif EXACT_ROUND and kc_ptr.dtype.element_ty == tl.float8e4nv:
            k = _round_fp8_e4m3(k)
            v = _round_fp8_e4m3(v)
    tl.store(kc + heads[:, None] * kc_head_stride + d[None, :],
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + heads[:, None] * vc_head_stride + d[None, :],
             v.to(vc_ptr.dtype.element_ty), mask=mask)


def _blocks(n_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 4096 // block_d))
    return block_h, block_d


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """k, v [T, Hkv, D] and caches [NB, BS, Hkv, D]: last dims contiguous, other strides
    free; slot_mapping contiguous; k_scale / v_scale fp32 (numel 1 or Hkv) for fp8 caches."""
    t, hkv, d = k.shape
    if t == 0:
        return
    quant = k_scale is not None
    # sm_80: fp8 caches as bytes
    k_cache, v_cache = fp8_bits.kernel_view(k_cache), fp8_bits.kernel_view(v_cache)
    block_h, block_d = _blocks(hkv, d)
    grid = (t, triton.cdiv(hkv, block_h))
    write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if quant else slot_mapping, v_scale if quant else slot_mapping,
        hkv, d, k_cache.shape[1], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=block_h, BLOCK_D=block_d, QUANT=quant,
        SCALE_PER_HEAD=quant and k_scale.numel() > 1,
        EXACT_ROUND=quant and not k.is_cuda, num_warps=4)


def _register() -> None:
    strides = {name: "i64" for name in (
        "k_tok_stride", "k_head_stride", "v_tok_stride", "v_head_stride", "kc_blk_stride",
        "kc_tok_stride", "kc_head_stride", "vc_blk_stride", "vc_tok_stride", "vc_head_stride")}
    consts = ("BLOCK_H", "BLOCK_D", "QUANT", "SCALE_PER_HEAD", "EXACT_ROUND")
    # (input dtype, cache dtype, archs): fp8 caches as e4m3 on sm_90a, as bytes (encoded
    # in software, fp8_bits.py) on sm_80; e5m2 (encoded in software) on both
    combos = [(dt, dt, (80, 90)) for dt in ("fp16", "bf16", "fp32")]
    combos += [(dt, "fp8e4nv", (90,)) for dt in ("fp16", "bf16")]
    combos += [(dt, "i8", (80,)) for dt in ("fp16", "bf16")]
    combos += [(dt, "fp8e5", (80, 90)) for dt in ("fp16", "bf16")]    # e5m2, both archs
    for dt, cdt, archs in combos:
        quant = cdt != dt
        for idx in ("i32", "i64"):
            for hkv, d in ((8, 128), (2, 64), (4, 256), (4, 512)):  # 512: Gemma 4
                for per_head in ((False, True) if quant else (False,)):
                    bh, bd = _blocks(hkv, d)
                    sig = {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "kc_ptr": f"*{cdt}",
                           "vc_ptr": f"*{cdt}", "slot_ptr": f"*{idx}",
                           "ks_ptr": "*fp32" if quant else f"*{idx}",
                           "vs_ptr": "*fp32" if quant else f"*{idx}",
                           "n_heads": "i32", "head_dim": "i32", "block_size": "i32",
                           **strides, **{c: "constexpr" for c in consts}}
                    scale = ",per_head" if per_head else ""
                    register(KernelSpec(
                        name=f"write_kv_cache[{dt}->{cdt}{scale},slot={idx},Hkv={hkv},D={d}]",
                        fn=write_kv_cache_kernel, signature=sig,
                        constexprs={"BLOCK_H": bh, "BLOCK_D": bd, "QUANT": quant,
                                    "SCALE_PER_HEAD": per_head, "EXACT_ROUND": False},
                        num_warps=4, num_stages=1, archs=archs))


_register()
