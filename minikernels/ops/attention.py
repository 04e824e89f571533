"""Op family: flash-style attention over varlen batches (prefill, chunked prefill, paged prefix).

Op: ``minikernels::flash_attention``. Backends: reference (CPU, fp32 math) and triton
(minikernels/ops/triton/flash_attn.py: FlashAttention-2 forward on tensor cores, fp16/bf16/fp32).
Conventions follow FlashAttention: varlen [total_tokens, heads, head_dim] with int32
cu_seqlens, causal masks aligned bottom-right, GQA when Hq is a multiple of Hkv.
``flash_attention_bshd`` is the padded-batch convenience form [B, S, H, D].
Tests: tests/test_flash_attention*.py. Benchmark: ``python -m bench.bench_attention``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_index_range, check_last_dim_contiguous,
                           check_positive_float, check_tensor, index_checks_active)
from . import reference

MAX_HEAD_DIM = 256


@torch.library.custom_op("minikernels::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     softmax_scale: float, window_left: int, softcap: float,
                     block_table: Tensor | None) -> tuple[Tensor, Tensor]:
    if _backend.resolve("flash_attention", q.device) != "reference":  # no CUDA C++ kernel
        from .triton import flash_attn
        return flash_attn.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal, softmax_scale, window_left,
                                          softcap, block_table)
    return reference.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, softmax_scale, window_left, softcap,
                                     block_table)


@_flash_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
      max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
      window_left: int, softcap: float, block_table: Tensor | None) -> tuple[Tensor, Tensor]:
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device))


def check_head_dim(d: int) -> None:
    if d % 8 or d <= 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}] "
                         f"(64, 80, 96, 128, 256 are tuned), got {d}")


def check_cu_seqlens(name: str, cu: Tensor, device: torch.device) -> None:
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1, device=device)
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got shape {list(cu.shape)}")
    if index_checks_active(cu) and cu.shape[0] > 0:
        if int(cu[0]) != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
        if cu.shape[0] > 1 and bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing")


def check_paged_cache(names: tuple[str, str], k_cache: Tensor, v_cache: Tensor,
                      dtype: torch.dtype, device: torch.device, head_dim: int) -> None:
    """k_cache, v_cache [num_blocks, block_size, Hkv, D], block_size a power of two 8..256."""
    for name, c in zip(names, (k_cache, v_cache)):
        check_tensor(name, c, dtypes=(dtype,), ndim=4, device=device)
        check_last_dim_contiguous(name, c)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {list(k_cache.shape)}, "
                         f"got {list(v_cache.shape)}")
    bs = k_cache.shape[1]
    if bs < 8 or bs > 256 or bs & (bs - 1):
        raise ValueError(f"{names[0]} block_size (dim 1) must be a power of two in [8, 256], "
                         f"got {bs}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{names[0]} head dim ({k_cache.shape[3]}) must equal q's ({head_dim})")


def check_block_table(block_table: Tensor, batch: int, lengths: Tensor, num_blocks: int,
                      block_size: int, device: torch.device) -> None:
    """block_table int32 [batch, max_blocks]; used entries in range; lengths fit the table."""
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=device)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (one per sequence), got "
                         f"{block_table.shape[0]}")
    if not index_checks_active(lengths):
        return
    capacity = block_table.shape[1] * block_size
    if int(lengths.max()) > capacity:
        raise ValueError(f"a sequence length ({int(lengths.max())}) exceeds block_table "
                         f"capacity ({block_table.shape[1]} blocks x {block_size})")
    used = (torch.arange(block_table.shape[1], device=device).unsqueeze(0) * block_size
            < lengths.unsqueeze(1))
    if bool(used.any()):
        check_index_range("block_table (used entries)", block_table[used], 0, num_blocks)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                    softmax_scale: float | None = None, window_left: int = -1,
                    softcap: float = 0.0, block_table: Tensor | None = None,
                    return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Varlen flash attention.

    q [total_q, Hq, D]; k, v [total_k, Hkv, D] (fp16/bf16, fp32 for reference/tests), or
    with ``block_table`` int32 [B, max_blocks] paged caches [num_blocks, block_size, Hkv, D]
    where sequence b's keys are its first cu_seqlens_k[b+1] - cu_seqlens_k[b] cached tokens.
    cu_seqlens_q/k int32 [B + 1]. Causal masks are aligned bottom-right (query i of Lq sees
    key j <= i + Lk - Lq); window_left >= 0 keeps keys j >= i + Lk - Lq - window_left;
    softcap > 0 applies softcap * tanh(s / softcap) to the scaled scores. Returns out
    [total_q, Hq, D] in q.dtype, and with return_lse the natural-log LSE [Hq, total_q] fp32
    (-inf, with output 0, for a query that sees no key).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    d = q.shape[2]
    check_head_dim(d)
    paged = block_table is not None
    kv_ndim = 4 if paged else 3
    check_tensor("k", k, dtypes=(q.dtype,), ndim=kv_ndim, device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), ndim=kv_ndim, device=q.device)
    if paged:
        check_paged_cache(("k", "v"), k, v, q.dtype, q.device, d)
    else:
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
        if k.shape[2] != d:
            raise ValueError(f"k head dim ({k.shape[2]}) must equal q head dim ({d})")
    hq, hkv = q.shape[1], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q "
                         f"{list(cu_seqlens_q.shape)}, got {list(cu_seqlens_k.shape)}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k),
                      ("window_left", window_left)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    if window_left < -1:
        raise ValueError(f"window_left must be -1 (no window) or >= 0, got {window_left}")
    softcap = check_positive_float("softcap", softcap, allow_zero=True)
    scale = (1.0 / math.sqrt(d) if softmax_scale is None
             else check_positive_float("softmax_scale", softmax_scale))
    if index_checks_active(cu_seqlens_q):
        if int(cu_seqlens_q[-1]) != q.shape[0]:
            raise ValueError(f"cu_seqlens_q[-1] ({int(cu_seqlens_q[-1])}) must equal total_q "
                             f"({q.shape[0]})")
        lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        if lens_q.numel() and int(lens_q.max()) > max_seqlen_q:
            raise ValueError(f"max_seqlen_q ({max_seqlen_q}) is below a query length "
                             f"({int(lens_q.max())})")
        if lens_k.numel() and int(lens_k.max()) > max_seqlen_k:
            raise ValueError(f"max_seqlen_k ({max_seqlen_k}) is below a key length "
                             f"({int(lens_k.max())})")
        if not paged and int(cu_seqlens_k[-1]) != k.shape[0]:
            raise ValueError(f"cu_seqlens_k[-1] ({int(cu_seqlens_k[-1])}) must equal total_k "
                             f"({k.shape[0]})")
        if causal and lens_q.numel() and bool((lens_q > lens_k).any()):
            raise ValueError("with causal=True each sequence needs Lq <= Lk "
                             "(queries are the last Lq of its Lk keys)")
        if paged:
            check_block_table(block_table, cu_seqlens_q.shape[0] - 1, lens_k, k.shape[0],
                              k.shape[1], q.device)
    elif paged:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2,
                     device=q.device)
    out, lse = torch.ops.minikernels.flash_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale,
        window_left, softcap, block_table)
    return (out, lse) if return_lse else out


def flash_attention_bshd(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                         softmax_scale: float | None = None, window_left: int = -1,
                         softcap: float = 0.0,
                         return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a padded batch, FlashAttention's ``flash_attn_func`` layout.

    q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] (same dtype and device, Hq a multiple of Hkv).
    Every sequence has Sq queries and Sk keys; causal is aligned bottom-right (needs
    Sq <= Sk). Returns out [B, Sq, Hq, D] in q.dtype, and with return_lse the natural-log
    LSE [B, Hq, Sq] fp32. Other arguments as in :func:`flash_attention`.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=4, device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), ndim=4, device=q.device)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    if k.shape[0] != b:
        raise ValueError(f"k must have batch {b} (like q), got shape {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
    cu_k = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sk
    res = flash_attention(q.reshape(b * sq, hq, d), k.reshape(b * sk, k.shape[2], k.shape[3]),
                          v.reshape(b * sk, v.shape[2], v.shape[3]), cu_q, cu_k, sq, sk,
                          causal=causal, softmax_scale=softmax_scale, window_left=window_left,
                          softcap=softcap, return_lse=return_lse)
    if not return_lse:
        return res.view(b, sq, hq, d)  # type: ignore[union-attr]
    out, lse = res
    return out.view(b, sq, hq, d), lse.view(hq, b, sq).transpose(0, 1).contiguous()
