"""Paged KV-cache write (vLLM's reshape_and_cache) in Triton.

Algorithm: a grid over (token, kv-head block). Each program loads the token's slot
(slot = block * block_size + offset; -1 = skip, every store masked off) and copies a
[BLOCK_H, D] tile of k and of v into row ``slot`` of the flattened caches
[num_blocks * block_size, Hkv, D]. A pure copy: the caches share k's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register


@triton.jit
def write_kv_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_heads, head_dim,
                          k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    mask = (heads[:, None] < n_heads) & (d[None, :] < head_dim)
    src_mask = mask & ((heads * 0 + slot) >= 0)[:, None]   # slot -1: nothing to write
    row = slot * n_heads * head_dim + heads[:, None] * head_dim + d[None, :]
    k = tl.load(k_ptr + tok * k_tok_stride + heads[:, None] * k_head_stride + d[None, :],
                mask=src_mask, other=0.0)
    tl.store(kc_ptr + row, k.to(kc_ptr.dtype.element_ty), mask=src_mask)
    v = tl.load(v_ptr + tok * v_tok_stride + heads[:, None] * v_head_stride + d[None, :],
                mask=src_mask, other=0.0)
    tl.store(vc_ptr + row, v.to(vc_ptr.dtype.element_ty), mask=src_mask)


def _blocks(n_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 4096 // block_d))
    return block_h, block_d


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] (last dim contiguous); caches contiguous [NB, BS, Hkv, D]."""
    t, hkv, d = k.shape
    if t == 0:
        return
    block_h, block_d = _blocks(hkv, d)
    grid = (t, triton.cdiv(hkv, block_h))
    write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, hkv, d, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)


for _dt in ("fp16", "bf16", "fp32"):
    for _idx in ("i32", "i64"):
        for _hkv, _d in ((8, 128), (2, 64), (4, 256)):
            _bh, _bd = _blocks(_hkv, _d)
            register(KernelSpec(
                name=f"write_kv_cache[{_dt},slot={_idx},Hkv={_hkv},D={_d}]",
                fn=write_kv_cache_kernel,
                signature={"k_ptr": f"*{_dt}", "v_ptr": f"*{_dt}", "kc_ptr": f"*{_dt}",
                           "vc_ptr": f"*{_dt}", "slot_ptr": f"*{_idx}", "n_heads": "i32",
                           "head_dim": "i32", "k_tok_stride": "i64", "k_head_stride": "i64",
                           "v_tok_stride": "i64", "v_head_stride": "i64",
                           "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"},
                constexprs={"BLOCK_H": _bh, "BLOCK_D": _bd}, num_warps=4, num_stages=1))
