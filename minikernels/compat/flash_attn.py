"""FlashAttention 2's Python interface (``flash_attn.flash_attn_interface``) on minikernels.

    from minikernels.compat.flash_attn import flash_attn_func, flash_attn_with_kvcache
    out = flash_attn_func(q, k, v, causal=True)                 # [B, S, H, D]

The names, argument names, defaults (note ``causal=False``, as FlashAttention's), layouts
and return shapes are FlashAttention 2's:

- ``flash_attn_func`` / ``flash_attn_qkvpacked_func`` / ``flash_attn_kvpacked_func``:
  padded batches ``[B, S, H, D]`` (packed: ``qkv [B, S, 3, H, D]``, ``kv [B, S, 2, Hk, D]``);
- ``flash_attn_varlen_func`` (+ ``_qkvpacked`` / ``_kvpacked``): varlen ``[total, H, D]``
  with int32 ``cu_seqlens``; ``block_table`` makes k / v paged caches;
- ``flash_attn_with_kvcache``: incremental decoding over a KV cache, contiguous
  ``[B_cache, S_cache, Hk, D]`` or paged ``[num_blocks, page, Hk, D]`` + ``block_table``:
  appends ``k`` / ``v`` in place at ``cache_seqlens`` (rotated by ``rotary_cos`` /
  ``rotary_sin`` when given), then attends; ``cache_batch_idx``, ``cache_leftpad``.

Masks (bottom-right causal, ``window_size=(left, right)``, rows that see no key give 0),
``softcap``, ALiBi ``alibi_slopes`` ([H] or [B, H] fp32, bias -slope * |i + Sk - Sq - j|),
GQA / MQA (H a multiple of Hk) are FlashAttention's. The math is
:func:`minikernels.ops.flash_attention` (and, for one query per sequence over a cache,
:func:`minikernels.ops.paged_decode_attention`, which honours ``num_splits``).

Differences, by design:
- forward only (inference): ``dropout_p`` must be 0, no backward; ``deterministic`` is
  accepted (the forward is deterministic);
- a query row that sees no key has LSE -inf (log 0; FlashAttention 2 reports +inf), so
  states merge with :func:`minikernels.ops.merge_attn_states`;
- ``return_attn_probs=True`` returns exact softmax probabilities ``[B, H, Sq, Sk]``
  (padded to the max lengths for varlen), computed in fp32 by plain PyTorch: a test aid,
  O(Sq * Sk) memory, as FlashAttention's own;
- q may also be fp32; rotary dims need only be even (FlashAttention: multiples of 16);
  page sizes are any (FlashAttention 2: multiples of 256);
- head dims up to 512, as the ops take (FlashAttention 2 and 3 refuse more than 256):
  Gemma 4's 512-wide full-attention heads run through this interface too; 513 and up are
  refused by the ops, naming the head dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._validation import (
    FLOAT_DTYPES,
    check_index_range,
    check_tensor,
    index_checks_active,
)
from ..ops import reference

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
]

#: the largest block of a paged view our kernels take (minikernels.ops.attention)
_MAX_BLOCK = 256


# ------------------------------------------------------------------------ arguments


def _window(window_size: object) -> tuple[int, int]:
    """FlashAttention's (left, right), -1 = unbounded."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size!r}")
    out = []
    for side in window_size:
        if isinstance(side, Tensor) and side.numel() == 1:
            side = int(side.item())
        if not isinstance(side, int) or isinstance(side, bool) or side < -1:
            raise ValueError(f"window_size entries must be ints >= -1 (-1 = unbounded), got "
                             f"{window_size!r}")
        out.append(side)
    return out[0], out[1]


def _check_common(dropout_p: float, return_attn_probs: bool) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: minikernels is inference-only (forward "
                         f"without dropout), got {dropout_p!r}")
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got "
                        f"{type(return_attn_probs).__name__}")


def _varlen_probs(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
                  max_k: int, scale: float, causal: bool, window: tuple[int, int],
                  softcap: float, alibi_slopes: Tensor | None,
                  block_table: Tensor | None) -> Tensor:
    """Softmax probabilities [B, H, max_q, max_k] fp32 (zero padded) of a varlen batch."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    batch = len(cq) - 1
    probs = torch.zeros(batch, q.shape[1], max_q, max_k, dtype=torch.float32, device=q.device)
    for b in range(batch):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if block_table is None:
            kb = k[ck[b]:ck[b + 1]]
        else:
            kb = reference.gather_paged(k, block_table[b], lk)
        slopes = None if alibi_slopes is None else (
            alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b])
        s, visible = reference.attention_scores(q[cq[b]:cq[b + 1]], kb, scale, causal,
                                                window[0], softcap, window[1], slopes)
        probs[b, :, :lq, :lk] = reference.attention_probs(s, visible)[0]
    return probs


def _unpack(name: str, packed: Tensor, layout: str) -> tuple[Tensor, ...]:
    """A packed argument (qkv / kv) split into its tensors (views): ``layout`` is its
    documented shape, e.g. "[B, S, 3, H, D]", the stacking dim third from last with its
    size written out; checked: a float dtype, the layout's rank and the stacking size."""
    dims = layout.strip("[]").split(", ")
    check_tensor(name, packed, dtypes=FLOAT_DTYPES, ndim=len(dims))
    if packed.shape[-3] != int(dims[-3]):
        raise ValueError(f"{name} must have shape {layout}, got {list(packed.shape)}")
    return packed.unbind(-3)


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return head_dim ** -0.5 if softmax_scale is None else softmax_scale


# ------------------------------------------------------------------------ padded batches


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False
                    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Attention over a padded batch.

    q [B, Sq, H, D]; k, v [B, Sk, Hk, D] (fp16 / bf16 / fp32, one dtype, H a multiple of
    Hk, any strides with a contiguous last dim). Returns out [B, Sq, H, D] in q.dtype; with
    return_attn_probs also softmax_lse [B, H, Sq] fp32 (natural log) and the probabilities
    [B, H, Sq, Sk] fp32.
    """
    _check_common(dropout_p, return_attn_probs)
    left, right = _window(window_size)
    res = ops.flash_attention_bshd(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   window_left=left, softcap=softcap,
                                   return_lse=return_attn_probs, window_right=right,
                                   alibi_slopes=alibi_slopes)
    if not return_attn_probs:
        return res  # type: ignore[return-value]
    out, lse = res
    b, sq, h, d = q.shape
    sk = k.shape[1]
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
    cu_k = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sk
    probs = _varlen_probs(q.reshape(b * sq, h, d), k.reshape(b * sk, k.shape[2], d), v, cu_q,
                          cu_k, sq, sk, _scale(softmax_scale, d), causal, (left, right),
                          softcap, alibi_slopes, None)
    return out, lse, probs


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0,
                              softmax_scale: float | None = None, causal: bool = False,
                              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False
                              ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attn_func` with qkv [B, S, 3, H, D] (q, k, v stacked on dim 2)."""
    q, k, v = _unpack("qkv", qkv, "[B, S, 3, H, D]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False
                             ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attn_func` with kv [B, Sk, 2, Hk, D] (k, v stacked on dim 2)."""
    k, v = _unpack("kv", kv, "[B, Sk, 2, Hk, D]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# ------------------------------------------------------------------------ varlen


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Tensor | None = None, *,
                           seqused_k: Tensor | None = None, out: Tensor | None = None
                           ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Attention over a varlen batch.

    q [total_q, H, D]; k, v [total_k, Hk, D], or with block_table (int32 [B, max_blocks])
    paged caches [num_blocks, page, Hk, D] where sequence b's keys are its first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] cached tokens. cu_seqlens_q / _k int32 [B + 1].
    Keyword extras of the vLLM / FlashAttention 3 interfaces: ``seqused_k`` int32 [B]
    (sequence b uses only its first seqused_k[b] keys; with block_table, cu_seqlens_k may
    be None) and vLLM's ``out`` (written in place and returned).
    Returns out [total_q, H, D] in q.dtype; with return_attn_probs also softmax_lse
    [H, total_q] fp32 (natural log) and the probabilities [B, H, max_seqlen_q,
    max_seqlen_k] fp32 (zero padded).
    """
    _check_common(dropout_p, return_attn_probs)
    left, right = _window(window_size)
    if seqused_k is not None:
        k, v, cu_seqlens_k, block_table = _used_keys(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                     max_seqlen_k, block_table, seqused_k)
    elif cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k is required unless seqused_k is given")
    if block_table is not None and isinstance(k, Tensor) and isinstance(v, Tensor) \
            and isinstance(block_table, Tensor) and k.dim() == 4 and v.shape == k.shape:
        k, v, block_table = _split_pages(k, v, block_table)
    res = ops.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal=causal, softmax_scale=softmax_scale, window_left=left,
                              softcap=softcap, block_table=block_table,
                              return_lse=return_attn_probs, window_right=right,
                              alibi_slopes=alibi_slopes)
    result, lse = res if return_attn_probs else (res, None)
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=q.device)
        if out.shape != result.shape:
            raise ValueError(f"out must have shape {list(result.shape)}, got "
                             f"{list(out.shape)}")
        result = out.copy_(result)
    if not return_attn_probs:
        return result
    probs = _varlen_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          _scale(softmax_scale, q.shape[-1]), causal, (left, right), softcap,
                          alibi_slopes, block_table)
    return result, lse, probs


def _used_keys(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor | None, max_seqlen_k: int, block_table: Tensor | None,
               seqused_k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(k, v, cu_seqlens_k, block_table) that use only seqused_k[b] keys of sequence b:
    cu_seqlens_k from their sum; varlen k / v become one-token blocks of a paged view
    (no copy) whose table row b starts at cu_seqlens_k[b]."""
    batch = cu_seqlens_q.shape[0] - 1
    check_tensor("seqused_k", seqused_k, dtypes=(torch.int32,), ndim=1, device=q.device)
    if seqused_k.shape[0] != batch:
        raise ValueError(f"seqused_k must have {batch} entries (one per sequence), got "
                         f"{seqused_k.shape[0]}")
    if block_table is None:
        if cu_seqlens_k is None:
            raise ValueError("cu_seqlens_k is required with seqused_k unless block_table "
                             "is given (where each sequence's keys start)")
        check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,), ndim=1,
                     device=q.device)
        check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3, device=q.device)
        if index_checks_active(seqused_k) and batch and bool(
                (seqused_k > cu_seqlens_k[1:] - cu_seqlens_k[:-1]).any()):
            raise ValueError("seqused_k exceeds a sequence's keys in cu_seqlens_k")
        width = max(1, int(max_seqlen_k))
        starts = cu_seqlens_k[:-1].long().unsqueeze(1)
        block_table = (starts + torch.arange(width, device=q.device)).clamp_max(
            max(k.shape[0] - 1, 0)).to(torch.int32)
        k, v = k.unsqueeze(1), v.unsqueeze(1)           # [total_k, 1, Hk, D]
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(seqused_k, 0)
    return k, v, cu, block_table


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0,
                                     softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                                     deterministic: bool = False,
                                     return_attn_probs: bool = False
                                     ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attn_varlen_func` with qkv [total, 3, H, D] and one cu_seqlens."""
    q, k, v = _unpack("qkv", qkv, "[total, 3, H, D]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0,
                                    softmax_scale: float | None = None, causal: bool = False,
                                    window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                                    deterministic: bool = False,
                                    return_attn_probs: bool = False
                                    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attn_varlen_func` with kv [total_k, 2, Hk, D]."""
    k, v = _unpack("kv", kv, "[total_k, 2, Hk, D]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


# ------------------------------------------------------------------------ KV cache


def _pow2_divisor(*values: int) -> int:
    """The largest power of two <= _MAX_BLOCK dividing every value (0 divides by all)."""
    g = _MAX_BLOCK
    while g > 1 and any(v % g for v in values):
        g //= 2
    return g


def _token_rows(cache: Tensor) -> int | None:
    """Rows per batch entry if the tokens of a [B, S, Hk, D] cache lie at one stride
    (token (b, t) at (b * rows + t) * stride(1)), else None."""
    bc, s = cache.shape[0], cache.shape[1]
    s0, s1 = cache.stride(0), cache.stride(1)
    if bc == 1 or s == 0:
        return s
    if s1 > 0 and s0 % s1 == 0 and s0 // s1 >= s:
        return s0 // s1
    return None


def _as_blocks(cache: Tensor, num_tokens: int, block: int) -> Tensor:
    """A token-strided cache viewed as [num_tokens / block, block, Hk, D] (no copy)."""
    _, _, h, d = cache.shape
    return cache.as_strided((num_tokens // block, block, h, d),
                            (block * cache.stride(1), cache.stride(1), cache.stride(2),
                             cache.stride(3)))


def _contiguous_cache_view(k_cache: Tensor, v_cache: Tensor, cache_rows: Tensor,
                           starts: Tensor, has_leftpad: bool
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """A [B_cache, S, Hk, D] cache as paged caches plus a block table whose row b starts
    at token ``starts[b]`` of cache row ``cache_rows[b]`` (views when the layout allows;
    a cache whose tokens are not at one stride is read from a contiguous copy)."""
    bc, s = k_cache.shape[0], k_cache.shape[1]
    rows_k, rows_v = _token_rows(k_cache), _token_rows(v_cache)
    if rows_k is None or rows_k != rows_v:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
        rows_k = s
    rows = rows_k
    block = _pow2_divisor(rows, s)
    if has_leftpad:
        # a row starting mid-block needs blocks that divide its start: the lowest set bit
        # of every nonzero start bounds the block (per token if the host cannot look)
        if index_checks_active(starts):
            low = starts & -starts
            low = low[low > 0]
            if low.numel():
                block = min(block, int(low.min()))
        else:
            block = 1
    num_tokens = (bc - 1) * rows + s if bc else 0
    k_blocks, v_blocks = _as_blocks(k_cache, num_tokens, block), \
        _as_blocks(v_cache, num_tokens, block)
    width = max(1, -(-s // block))
    first = (cache_rows.long() * rows + starts.long()) // block
    table = first.unsqueeze(1) + torch.arange(width, device=first.device)
    table = table.clamp_max(max(num_tokens // block - 1, 0)).to(torch.int32)
    return k_blocks, v_blocks, table


def _split_pages(k_cache: Tensor, v_cache: Tensor,
                 block_table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Paged caches with pages over _MAX_BLOCK tokens as sub-blocks our kernels take
    (views when every page's tokens lie at one stride, else a contiguous copy)."""
    num_pages, page = k_cache.shape[0], k_cache.shape[1]
    if page <= _MAX_BLOCK:
        return k_cache, v_cache, block_table
    rows, rows_v = _token_rows(k_cache), _token_rows(v_cache)
    if rows is None or rows != rows_v:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
        rows = page
    block = _pow2_divisor(rows, page)
    num_tokens = (num_pages - 1) * rows + page
    k_blocks = _as_blocks(k_cache, num_tokens, block)
    v_blocks = _as_blocks(v_cache, num_tokens, block)
    table = (block_table.long().unsqueeze(2) * (rows // block)
             + torch.arange(page // block, device=block_table.device))
    return k_blocks, v_blocks, table.reshape(block_table.shape[0], -1).to(torch.int32)


def _rotate(q: Tensor, k: Tensor, rotary_cos: Tensor, rotary_sin: Tensor,
            cache_seqlens: Tensor, rotate_q_per_token: bool,
            interleaved: bool) -> tuple[Tensor, Tensor]:
    """Rotate q [B, Sq, H, D] and k [B, Sn, Hk, D] at positions cache_seqlens[b] + i (q: or
    cache_seqlens[b] for every token when not rotate_q_per_token)."""
    check_tensor("rotary_cos", rotary_cos, dtypes=FLOAT_DTYPES, ndim=2, device=q.device)
    check_tensor("rotary_sin", rotary_sin, dtypes=(rotary_cos.dtype,), ndim=2,
                 device=q.device)
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"rotary_sin must have the shape of rotary_cos "
                         f"{list(rotary_cos.shape)}, got {list(rotary_sin.shape)}")
    cos_sin = torch.cat([rotary_cos, rotary_sin], dim=-1)       # [seqlen_ro, rotary_dim]
    base = cache_seqlens.long().unsqueeze(1)
    pos_k = base + torch.arange(k.shape[1], device=q.device)
    pos_q = base + torch.arange(q.shape[1], device=q.device) if rotate_q_per_token \
        else base.expand(q.shape[0], q.shape[1])
    neox = not interleaved
    if q.shape[1] == k.shape[1] and rotate_q_per_token:
        return ops.rotary_embedding(q, k, pos_q, cos_sin, neox)
    q_rot = ops.rotary_embedding(q, q, pos_q, cos_sin, neox)[0]
    k_rot = ops.rotary_embedding(k, k, pos_k, cos_sin, neox)[0]
    return q_rot, k_rot


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                            k: Tensor | None = None, v: Tensor | None = None,
                            rotary_cos: Tensor | None = None,
                            rotary_sin: Tensor | None = None,
                            cache_seqlens: int | Tensor | None = None,
                            cache_batch_idx: Tensor | None = None,
                            cache_leftpad: Tensor | None = None,
                            block_table: Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True,
                            alibi_slopes: Tensor | None = None, num_splits: int = 0,
                            return_softmax_lse: bool = False
                            ) -> Tensor | tuple[Tensor, Tensor]:
    """Append new keys / values to a KV cache in place, then attend (incremental decoding).

    q [B, Sq, H, D]. k_cache, v_cache: [B_cache, S_cache, Hk, D] (no block_table), or paged
    [num_blocks, page, Hk, D] with block_table int32 [B, max_blocks]; q's dtype, last dim
    contiguous, any other strides. k, v [B, Sn, Hk, D] (optional, together): written to the
    cache at positions cache_seqlens[b] .. cache_seqlens[b] + Sn - 1 (in place).
    cache_seqlens: int or int32 [B], tokens already cached (required with k / v; default
    the whole cache). cache_batch_idx int32 [B]: cache row of each sequence (contiguous
    cache only; default b). cache_leftpad int32 [B]: the cache row's first valid token
    (contiguous cache only; default 0); keys are tokens [leftpad, cache_seqlens + Sn).
    rotary_cos / rotary_sin [seqlen_ro, rotary_dim / 2] (with k / v): k is rotated at
    positions cache_seqlens + i, q likewise when causal or local, else all of q at
    cache_seqlens; ``rotary_interleaved`` True pairs dims (2i, 2i + 1) (GPT-J), False
    (i, i + rotary_dim / 2) (GPT-NeoX). Masks, softcap, ALiBi: as flash_attn_func, over the
    Lk = cache_seqlens + Sn - leftpad keys. num_splits: KV splits of the one-query kernel
    (0 = heuristic; used when Sq == 1).

    Returns out [B, Sq, H, D] in q.dtype; with return_softmax_lse also softmax_lse
    [B, H, Sq] fp32 (natural log, -inf for a row that sees no key).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    dev = q.device
    batch, sq, hq, d = q.shape
    paged = block_table is not None
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, dtypes=(q.dtype,), ndim=4, device=dev)
        if c.shape[-1] != d:
            raise ValueError(f"{name} head dim ({c.shape[-1]}) must equal q's ({d})")
        if c.stride(-1) != 1 and c.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {list(k_cache.shape)}, got "
                         f"{list(v_cache.shape)}")
    hk = k_cache.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of k_cache heads ({hk})")
    left, right = _window(window_size)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together (or neither)")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos / rotary_sin need k and v (the new tokens to rotate)")
    if paged:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=dev)
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (one per sequence), got "
                             f"{block_table.shape[0]}")
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                raise ValueError(f"{name} is for a contiguous cache, not with block_table")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=dev)
            if t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{name} must have shape [{batch}, seqlen_new, {hk}, {d}], "
                                 f"got {list(t.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {list(k.shape)}, got "
                             f"{list(v.shape)}")
        new = k.shape[1]
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with k / v (where to append them)")
    seqlens = _cache_seqlens(cache_seqlens, batch, capacity, dev)
    cache_rows = torch.arange(batch, dtype=torch.int64, device=dev)
    if cache_batch_idx is not None:
        check_tensor("cache_batch_idx", cache_batch_idx, dtypes=(torch.int32, torch.int64),
                     ndim=1, device=dev)
        if cache_batch_idx.shape[0] != batch:
            raise ValueError(f"cache_batch_idx must have {batch} entries, got "
                             f"{cache_batch_idx.shape[0]}")
        check_index_range("cache_batch_idx", cache_batch_idx, 0, k_cache.shape[0])
        cache_rows = cache_batch_idx.long()
    elif not paged and k_cache.shape[0] < batch:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {batch} (pass "
                         f"cache_batch_idx)")
    starts = torch.zeros(batch, dtype=torch.int64, device=dev)
    if cache_leftpad is not None:
        check_tensor("cache_leftpad", cache_leftpad, dtypes=(torch.int32, torch.int64), ndim=1,
                     device=dev)
        if cache_leftpad.shape[0] != batch:
            raise ValueError(f"cache_leftpad must have {batch} entries, got "
                             f"{cache_leftpad.shape[0]}")
        starts = cache_leftpad.long()
    if index_checks_active(seqlens):
        if new and batch and int((seqlens + new).max()) > capacity:
            raise ValueError(f"cache_seqlens + seqlen_new ({int((seqlens + new).max())}) "
                             f"exceeds the cache ({capacity} tokens per sequence)")
        if cache_leftpad is not None and batch and bool((starts > seqlens + new).any() |
                                                        (starts < 0).any()):
            raise ValueError("cache_leftpad must be in [0, cache_seqlens + seqlen_new]")
    if batch == 0 or sq == 0:
        out = torch.zeros(q.shape, dtype=q.dtype, device=dev)
        lse = torch.full((batch, hq, sq), float("-inf"), dtype=torch.float32, device=dev)
        return (out, lse) if return_softmax_lse else out

    if rotary_cos is not None:
        q, k = _rotate(q, k, rotary_cos, rotary_sin, seqlens, causal or left >= 0 or
                       right >= 0, rotary_interleaved)
    if k is not None and new:
        pos = seqlens.unsqueeze(1) + torch.arange(new, device=dev)          # [B, Sn]
        if paged:
            page = k_cache.shape[1]
            blocks = torch.gather(block_table.long(), 1, pos // page)
            if index_checks_active(blocks):
                check_index_range("block_table (entries written)", blocks, 0,
                                  k_cache.shape[0])
            k_cache[blocks, pos % page] = k
            v_cache[blocks, pos % page] = v
        else:
            rows = cache_rows.unsqueeze(1).expand(batch, new)
            k_cache[rows, pos] = k
            v_cache[rows, pos] = v

    lens_k = (seqlens + new - starts).to(torch.int32)
    if paged:
        k_read, v_read, table = _split_pages(k_cache, v_cache, block_table)
    else:
        k_read, v_read, table = _contiguous_cache_view(k_cache, v_cache, cache_rows, starts,
                                                           cache_leftpad is not None)
    scale = _scale(softmax_scale, d)
    if sq == 1:
        # one query at the last position: causal or not, it sees keys [Lk - 1 - left, Lk)
        out, lse = ops.paged_decode_attention(
            q[:, 0], k_read, v_read, table, lens_k, scale, left, softcap, num_splits,
            return_lse=True, alibi_slopes=alibi_slopes)
        out, lse = out.unsqueeze(1), lse.unsqueeze(2)
    else:
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev) * sq
        cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
        cu_k[1:] = torch.cumsum(lens_k, 0)
        max_k = table.shape[1] * k_read.shape[1]
        out, lse = ops.flash_attention(
            q.reshape(batch * sq, hq, d), k_read, v_read, cu_q, cu_k, sq, max_k,
            causal=causal, softmax_scale=scale, window_left=left, softcap=softcap,
            block_table=table, return_lse=True, window_right=right,
            alibi_slopes=alibi_slopes)
        out = out.view(batch, sq, hq, d)
        lse = lse.view(hq, batch, sq).transpose(0, 1)
    return (out, lse.contiguous()) if return_softmax_lse else out


def _cache_seqlens(cache_seqlens: int | Tensor | None, batch: int, capacity: int,
                   device: torch.device) -> Tensor:
    """cache_seqlens as int64 [B] (None = every sequence fills the cache)."""
    if cache_seqlens is None:
        return torch.full((batch,), capacity, dtype=torch.int64, device=device)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity:
            raise ValueError(f"cache_seqlens must be in [0, {capacity}], got {cache_seqlens}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int64, device=device)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=device)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have {batch} entries, got "
                         f"{cache_seqlens.shape[0]}")
    check_index_range("cache_seqlens", cache_seqlens, 0, capacity + 1)
    return cache_seqlens.long()
