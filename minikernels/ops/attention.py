"""Op family: flash-style attention over varlen batches (prefill, chunked prefill, paged prefix).

Op: ``minikernels::flash_attention``. Backends: reference (CPU, fp32 math) and triton
(minikernels/ops/triton/flash_attn.py: FlashAttention-2 forward on tensor cores, fp16/bf16/fp32).
Conventions follow FlashAttention (>= 2.1): varlen [total_tokens, heads, head_dim] with int32
cu_seqlens, causal masks aligned bottom-right (also with more queries than keys: rows that
see no key give 0 and LSE -inf), local attention ``window_left`` / ``window_right``, GQA when
Hq is a multiple of Hkv, ALiBi (``alibi_slopes`` [Hq] or [B, Hq]), any head dim up to 512
(FlashAttention's 256, plus Gemma 4's 512-wide full-attention heads), paged caches of any
block size 1..256, fp8 (e4m3 / e5m2) paged caches.
``flash_attention_bshd`` is the padded-batch convenience form [B, S, H, D].
Tests: tests/test_flash_attention*.py. Benchmark: ``python -m bench.bench_attention``.
"""
from __future__ import annotations


import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_index_range, check_last_dim_contiguous,
                           check_positive_float, check_shape, check_tensor,
                           index_checks_active, last_dim_contiguous)
from . import reference

#: Widest head dim of the attention family (flash_attention, paged_decode_attention): Gemma 4's
#: full-attention layers use 512 (FlashAttention 2 stops at 256). Dims in (256, 512] run on
#: their own, smaller Triton tiles (flash_attn.py's tables); the CUDA C++ decode kernel stays
#: at {64, 128, 256}, so auto routes them to Triton.
MAX_HEAD_DIM = 512
MAX_BLOCK_SIZE = 256
#: KV-cache dtypes stored with a float32 scale (vLLM's convention: stored * scale ~= value).
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@torch.library.custom_op("minikernels::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     softmax_scale: float, window_left: int, softcap: float,
                     block_table: Tensor | None, window_right: int = -1,
                     k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                     alibi_slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if _backend.resolve("flash_attention", q.device) != "reference":  # no CUDA C++ kernel
        from .triton import flash_attn
        return flash_attn.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal, softmax_scale, window_left,
                                          softcap, block_table, window_right=window_right,
                                          k_scale=k_scale, v_scale=v_scale,
                                          alibi_slopes=alibi_slopes)
    return reference.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, softmax_scale, window_left, softcap,
                                     block_table, window_right, k_scale, v_scale, alibi_slopes)


@_flash_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
      max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
      window_left: int, softcap: float, block_table: Tensor | None, window_right: int = -1,
      k_scale: Tensor | None = None, v_scale: Tensor | None = None,
      alibi_slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device))


def check_head_dim(d: int) -> None:
    """Any head dim in [1, 512]: FlashAttention's [1, 256] and Gemma 4's 512 (64, 80, 96, 128,
    256, 512 are tuned; a dim that is not a multiple of 8 runs without vectorized loads)."""
    if d <= 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] (64, 80, 96, 128, 256, 512 "
                         f"are tuned), got {d}")


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
    """k_cache, v_cache [num_blocks, block_size, Hkv, D] of ``dtype`` or fp8 (e4m3 / e5m2),
    each with its own strides (last dim contiguous), block_size any size in [1, 256]."""
    for name, c in zip(names, (k_cache, v_cache)):
        check_tensor(name, c, dtypes=(dtype, *FP8_KV_DTYPES), ndim=4, device=device)
        check_last_dim_contiguous(name, c)
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{names[1]} must have the dtype of {names[0]} ({k_cache.dtype}), got "
                        f"{v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {list(k_cache.shape)}, "
                         f"got {list(v_cache.shape)}")
    bs = k_cache.shape[1]
    if bs < 1 or bs > MAX_BLOCK_SIZE:
        raise ValueError(f"{names[0]} block_size (dim 1) must be in [1, {MAX_BLOCK_SIZE}], "
                         f"got {bs}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{names[0]} head dim ({k_cache.shape[3]}) must equal q's ({head_dim})")


def check_kv_scales(cache_names: tuple[str, str], k_cache: Tensor, k_scale: object,
                    v_scale: object) -> tuple[Tensor | None, Tensor | None]:
    """Scales of an fp8 cache -> flat float32 tensors [1] or [Hkv] on the cache's device.

    fp8 caches need both (a float or a float32 tensor with 1 or Hkv elements, > 0); other
    caches take none. A float becomes a tensor here (pass tensors inside CUDA graphs).
    When one is per tensor and the other per head, both come back per head (the kernels
    decide per-head scaling once for the pair).
    """
    fp8 = k_cache.dtype in FP8_KV_DTYPES
    if not fp8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{name} is only for fp8 caches; {cache_names[0]} is "
                                 f"{str(k_cache.dtype).replace('torch.', '')}")
        return None, None
    hkv = k_cache.shape[2]
    out = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"{name} is required with an fp8 cache ({cache_names[0]} is "
                             f"{str(k_cache.dtype).replace('torch.', '')}): a float32 tensor "
                             f"of 1 (per tensor) or {hkv} (per kv head) elements")
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            s = torch.tensor([float(s)], dtype=torch.float32, device=k_cache.device)
        check_tensor(name, s, dtypes=(torch.float32,), device=k_cache.device)
        if s.numel() not in (1, hkv):
            raise ValueError(f"{name} must have 1 (per tensor) or {hkv} (per kv head) "
                             f"elements, got shape {list(s.shape)}")
        if index_checks_active(s) and not bool((s > 0).all() & torch.isfinite(s).all()):
            raise ValueError(f"{name} must be finite and > 0")
        out.append(s.reshape(-1).contiguous())
    if out[0].numel() != out[1].numel():
        # the kernels take one "per head" flag for both: give the per-tensor one a value
        # per head too
        out = [t.expand(hkv).contiguous() if t.numel() == 1 else t for t in out]
    return out[0], out[1]


def check_alibi_slopes(alibi_slopes: object, batch: int, heads: int,
                       device: torch.device) -> Tensor | None:
    """ALiBi slopes (FlashAttention's ``alibi_slopes``): None, or float32 [Hq] or [B, Hq]
    on q's device (finite). Returns them with a contiguous last dim."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"alibi_slopes must be a float32 tensor [{heads}] or [{batch}, "
                        f"{heads}] or None, got {type(alibi_slopes).__name__}")
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=device)
    if list(alibi_slopes.shape) not in ([heads], [batch, heads]):
        raise ValueError(f"alibi_slopes must have shape [{heads}] (per q head) or [{batch}, "
                         f"{heads}] (per sequence and head), got {list(alibi_slopes.shape)}")
    if index_checks_active(alibi_slopes) and alibi_slopes.numel() and \
            not bool(torch.isfinite(alibi_slopes).all()):
        raise ValueError("alibi_slopes must be finite")
    return last_dim_contiguous(alibi_slopes)


def check_sinks(sinks: object, heads: int, device: torch.device) -> Tensor | None:
    """Attention sinks (GPT-OSS's / FlashInfer's ``sinks``): None, or one logit per q
    head, [Hq] of a float dtype on q's device (any stride); returned as fp32."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor):
        raise TypeError(f"sinks must be a float tensor [{heads}] or None, got "
                        f"{type(sinks).__name__}")
    check_tensor("sinks", sinks, dtypes=FLOAT_DTYPES, ndim=1, device=device)
    check_shape("sinks", sinks, [heads])
    sinks = sinks.float()
    if index_checks_active(sinks) and sinks.numel() and not bool(torch.isfinite(sinks).all()):
        raise ValueError("sinks must be finite")
    return sinks


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor, heads_dim: int
                ) -> tuple[Tensor, Tensor]:
    """Attention with a sink logit per head from attention without: each row's softmax
    gains exp(sink), so its output scales by sigmoid(lse - sink) and its lse becomes
    logaddexp(lse, sink). out [..., H, D] and lse with the heads at ``heads_dim`` (0 for
    flash_attention's [Hq, T], 1 for paged decode's [B, Hq]); sinks fp32 [H]. A row that
    sees no key (lse -inf) keeps output 0, and its lse is the sink's."""
    shape = [1] * lse.ndim
    shape[heads_dim] = -1
    sink = sinks.view(shape)
    weight = torch.sigmoid(lse - sink)
    if heads_dim == 0:                        # [Hq, T] -> [T, Hq]
        weight = weight.t()
    out = (out.float() * weight.unsqueeze(-1)).to(out.dtype)
    return out, torch.logaddexp(lse, sink)


def check_window(window_left: object, window_right: object) -> None:
    for name, val in (("window_left", window_left), ("window_right", window_right)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if val < -1:
            raise ValueError(f"{name} must be -1 (unbounded) or >= 0, got {val}")


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
                    return_lse: bool = False, *, window_right: int = -1,
                    k_scale: Tensor | float | None = None,
                    v_scale: Tensor | float | None = None,
                    alibi_slopes: Tensor | None = None,
                    sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Varlen flash attention.

    q [total_q, Hq, D]; k, v [total_k, Hkv, D] (fp16/bf16, fp32 for reference/tests), or
    with ``block_table`` int32 [B, max_blocks] paged caches [num_blocks, block_size, Hkv, D]
    (block_size 1..256, each cache with its own strides, last dim contiguous) where sequence
    b's keys are its first cu_seqlens_k[b+1] - cu_seqlens_k[b] cached tokens. Paged caches
    may be float8_e4m3fn / float8_e5m2 with float32 ``k_scale`` / ``v_scale`` (1 or Hkv
    elements; the keys are k_cache * k_scale). cu_seqlens_q/k int32 [B + 1]. D is any head dim in
    [1, 512]: FlashAttention's [1, 256] and up to Gemma 4's 512 (a D that is not a multiple
    of 8 runs without vectorized loads; D > 256 runs on 32-row tiles, see
    ops/triton/flash_attn.py).

    Masks (FlashAttention's): query i of Lq sits at position p = i + Lk - Lq (bottom-right;
    with Lq > Lk under causal the first rows see no key: output 0, LSE -inf). It sees key j
    when j <= p (causal), j >= p - window_left (window_left >= 0) and j <= p + window_right
    (window_right >= 0, two-sided local attention; causal implies window_right = 0).
    softcap > 0 applies softcap * tanh(s / softcap) to the scaled scores. ALiBi
    (FlashAttention's): with ``alibi_slopes`` float32 [Hq] or [B, Hq], the (scaled, capped)
    score of query position p and key j gets -slope * |p - j| added. Returns out
    [total_q, Hq, D] in q.dtype, and with return_lse the natural-log LSE [Hq, total_q] fp32
    (of the biased scores). Attention sinks (GPT-OSS's, FlashInfer's ``sinks``): with
    ``sinks`` [Hq] (float, in the units of the scaled scores) each head's softmax also
    has that logit, which takes probability mass but contributes no value (output scaled
    by sigmoid(lse - sink); the returned LSE includes the sink).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    d = q.shape[2]
    check_head_dim(d)
    paged = block_table is not None
    kv_ndim = 4 if paged else 3
    kv_dtypes = (q.dtype, *FP8_KV_DTYPES) if paged else (q.dtype,)
    check_tensor("k", k, dtypes=kv_dtypes, ndim=kv_ndim, device=q.device)
    check_tensor("v", v, dtypes=kv_dtypes, ndim=kv_ndim, device=q.device)
    if paged:
        check_paged_cache(("k", "v"), k, v, q.dtype, q.device, d)
        k_scale, v_scale = check_kv_scales(("k", "v"), k, k_scale, v_scale)
    else:
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
        if k.shape[2] != d:
            raise ValueError(f"k head dim ({k.shape[2]}) must equal q head dim ({d})")
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale / v_scale are only for fp8 paged caches (block_table)")
        k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    hq, hkv = q.shape[1], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    q = last_dim_contiguous(q)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q "
                         f"{list(cu_seqlens_q.shape)}, got {list(cu_seqlens_k.shape)}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    check_window(window_left, window_right)
    softcap = check_positive_float("softcap", softcap, allow_zero=True)
    scale = (1.0 / math.sqrt(d) if softmax_scale is None
             else check_positive_float("softmax_scale", softmax_scale))
    alibi_slopes = check_alibi_slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1, hq, q.device)
    sinks = check_sinks(sinks, hq, q.device)
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
        if paged:
            check_block_table(block_table, cu_seqlens_q.shape[0] - 1, lens_k, k.shape[0],
                              k.shape[1], q.device)
    elif paged:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2,
                     device=q.device)
    out, lse = torch.ops.minikernels.flash_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale,
        window_left, softcap, block_table, -1 if causal else window_right, k_scale, v_scale,
        alibi_slopes)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks, heads_dim=0)
    return (out, lse) if return_lse else out


def flash_attention_bshd(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                         softmax_scale: float | None = None, window_left: int = -1,
                         softcap: float = 0.0, return_lse: bool = False, *,
                         window_right: int = -1, alibi_slopes: Tensor | None = None,
                         sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a padded batch, FlashAttention's ``flash_attn_func`` layout.

    q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] (same dtype and device, Hq a multiple of Hkv,
    any strides; D in [1, 512] as in :func:`flash_attention`). Every sequence has Sq
    queries and Sk keys; causal is aligned bottom-right (with Sq > Sk the first Sq - Sk
    rows see no key). Returns out [B, Sq, Hq, D] in q.dtype, and with return_lse the
    natural-log LSE [B, Hq, Sq] fp32. Other arguments (window_left / window_right:
    FlashAttention's window_size; alibi_slopes [Hq] or [B, Hq]; sinks [Hq]) as in
    :func:`flash_attention`.
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
                          softcap=softcap, return_lse=return_lse, window_right=window_right,
                          alibi_slopes=alibi_slopes, sinks=sinks)
    if not return_lse:
        return res.view(b, sq, hq, d)  # type: ignore[union-attr]
    out, lse = res
    return out.view(b, sq, hq, d), lse.view(hq, b, sq).transpose(0, 1).contiguous()
