"""FlashAttention 3's Python interface (``flash_attn_interface``, the Hopper package) on
minikernels.

    from minikernels.compat.flash_attn3 import flash_attn_func, flash_attn_with_kvcache
    out = flash_attn_func(q, k, v, causal=True)                               # [B, S, H, D]
    out, lse = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)  # lse [B, H, S]

Argument names, order and defaults follow ``hopper/flash_attn_interface.py`` of
Dao-AILab/flash-attention (commit 01afd16d248c4c7d0f9aed1914084f16c490eaed); so do the
return values:

- ``flash_attn_func`` / ``flash_attn_varlen_func``: ``out``, or ``(out, softmax_lse)`` with
  ``return_attn_probs=True`` (FlashAttention 3 returns no probabilities, unlike 2's
  three-tuple). softmax_lse is fp32, natural log: [B, H, Sq] padded, [H, total_q] varlen.
- ``flash_attn_with_kvcache``: ``out``, or with ``return_softmax_lse=True``
  ``(out, softmax_lse, out_accum, softmax_lse_accum)`` as FlashAttention 3's current
  interface returns; the two split-KV partials are empty tensors here (minikernels merges
  its splits inside the kernel).

The math is FlashAttention 2's compat module (:mod:`minikernels.compat.flash_attn`) and
thus :func:`minikernels.ops.flash_attention` / :func:`minikernels.ops.paged_decode_attention`:
bottom-right causal masks, ``window_size=(left, right)``, ``softcap``, GQA / MQA, rows that
see no key give out 0 and LSE -inf.

FlashAttention 3 only arguments:
- ``seqused_q`` / ``seqused_k`` (varlen, int32 [B]): sequence b uses its first seqused
  queries / keys; unused query rows are returned as 0 (LSE -inf). With ``seqused_k`` and
  no ``cu_seqlens_k``, k / v may be padded batches [B, Sk, Hk, D];
- ``page_table`` (kvcache): FlashAttention 2's ``block_table``; any page size;
- fp8: q / k / v float8_e4m3fn (or e5m2) with fp32 ``q_descale`` / ``k_descale`` /
  ``v_descale`` [B, Hk] (flash_attn_func and varlen): the inputs are dequantized to bf16
  (x * descale[b, kv head]) and the output is bf16, as FlashAttention 3's fp8 output;
- ``num_splits``, ``pack_gqa``, ``sm_margin``, ``scheduler_metadata``, ``deterministic``:
  launch / backward hints, accepted and unused (kvcache's ``num_splits`` is honoured by the
  one-query kernel).

Refused (NotImplementedError naming the argument): ``qv`` (the extra query-value product
of MLA decoding), ``attention_chunk`` > 0 (chunked local attention), kvcache's varlen
queries ``cu_seqlens_q`` / ``cu_seqlens_k_new`` / ``max_seqlen_q``, ``rotary_seqlens``,
and fp8 in ``flash_attn_with_kvcache`` (the cache is written in place in its own dtype;
use the fp8 paged-cache ops directly). Forward only: no backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._validation import check_tensor
from . import flash_attn as _fa2

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# ------------------------------------------------------------------------ arguments


def _refuse_fa3_only(qv: Tensor | None, attention_chunk: int) -> None:
    """NotImplementedError for the FlashAttention 3 features minikernels' ops lack."""
    if qv is not None:
        raise NotImplementedError("qv (an extra q_v @ v^T score term, FlashAttention 3's MLA "
                                  "decode path) is not supported by minikernels; pass "
                                  "qv=None")
    if not isinstance(attention_chunk, int) or isinstance(attention_chunk, bool) \
            or attention_chunk < 0:
        raise ValueError(f"attention_chunk must be an int >= 0, got {attention_chunk!r}")
    if attention_chunk > 0:
        raise NotImplementedError(f"attention_chunk={attention_chunk} (chunked local "
                                  f"attention) is not supported by minikernels; pass 0")


def _check_hints(num_splits: object, pack_gqa: object, sm_margin: object) -> None:
    """Launch hints: type-checked, otherwise unused."""
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        raise TypeError(f"pack_gqa must be None or a bool, got {type(pack_gqa).__name__}")
    if not isinstance(sm_margin, int) or isinstance(sm_margin, bool) or sm_margin < 0:
        raise ValueError(f"sm_margin must be an int >= 0, got {sm_margin!r}")


def _dequant(name: str, x: Tensor, descale: Tensor | None, batch_of_token: Tensor,
             batch: int, heads_k: int) -> Tensor:
    """An fp8 tensor [..., tokens, H, D] (tokens flattened by the caller's batch_of_token
    int64 [tokens]) as bf16 x * descale[b, h // (H / heads_k)]; descale fp32 [B, heads_k]
    (None = 1)."""
    flat = x.reshape(-1, x.shape[-2], x.shape[-1]).to(torch.float32)
    if descale is not None:
        dname = name + "_descale"
        check_tensor(dname, descale, dtypes=(torch.float32,), ndim=2, device=x.device)
        if tuple(descale.shape) != (batch, heads_k):
            raise ValueError(f"{dname} must have shape [{batch}, {heads_k}] (batch, kv "
                             f"heads), got {list(descale.shape)}")
        per_head = descale.repeat_interleave(x.shape[-2] // heads_k, dim=1)   # [B, H]
        flat = flat * per_head[batch_of_token].unsqueeze(-1)
    return flat.to(torch.bfloat16).view(x.shape)


def _fp8_inputs(q: Tensor, k: Tensor, v: Tensor, q_descale: Tensor | None,
                k_descale: Tensor | None, v_descale: Tensor | None, batch: int,
                batch_of_q: Tensor, batch_of_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as bf16 when they are fp8 (all three, FlashAttention 3's fp8 mode); the
    descales are refused, by name, for non-fp8 inputs."""
    fp8 = [t.dtype in _FP8 for t in (q, k, v)]
    if not any(fp8):
        for name, s in (("q_descale", q_descale), ("k_descale", k_descale),
                        ("v_descale", v_descale)):
            if s is not None:
                raise ValueError(f"{name} is only for fp8 inputs; q is {q.dtype}")
        return q, k, v
    if not all(fp8):
        raise ValueError(f"fp8 attention needs q, k and v all fp8, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    hk = k.shape[-2]
    if hk == 0 or q.shape[-2] % hk:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of k heads ({hk})")
    return (_dequant("q", q, q_descale, batch_of_q, batch, hk),
            _dequant("k", k, k_descale, batch_of_k, batch, hk),
            _dequant("v", v, v_descale, batch_of_k, batch, hk))


def _batch_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """int64 [total]: the sequence of each token of a varlen batch."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lens.shape[0], device=cu_seqlens.device),
                                  lens)
    if ids.shape[0] < total:        # tokens past cu_seqlens[-1] belong to no sequence
        ids = torch.cat([ids, ids.new_zeros(total - ids.shape[0])])
    return ids[:total]


# ------------------------------------------------------------------------ padded batches


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None,
                    causal: bool = False, qv: Tensor | None = None,
                    q_descale: Tensor | None = None, k_descale: Tensor | None = None,
                    v_descale: Tensor | None = None,
                    window_size: tuple[int, int] = (-1, -1), attention_chunk: int = 0,
                    softcap: float = 0.0, num_splits: int = 1, pack_gqa: bool | None = None,
                    deterministic: bool = False, sm_margin: int = 0,
                    return_attn_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a padded batch (FlashAttention 3's ``flash_attn_func``).

    q [B, Sq, H, D]; k, v [B, Sk, Hk, D] (fp16 / bf16 / fp32, or all fp8 with descales
    [B, Hk] fp32), H a multiple of Hk, last dim contiguous. Returns out [B, Sq, H, D]
    (q.dtype; bf16 for fp8), and with return_attn_probs=True (out, softmax_lse [B, H, Sq]
    fp32, natural log; -inf for a row that sees no key).
    """
    _refuse_fa3_only(qv, attention_chunk)
    _check_hints(num_splits, pack_gqa, sm_margin)
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got "
                        f"{type(return_attn_probs).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    ids_q = torch.arange(b, device=q.device).repeat_interleave(sq)
    ids_k = torch.arange(b, device=q.device).repeat_interleave(sk)
    q, k, v = _fp8_inputs(q, k, v, q_descale, k_descale, v_descale, b, ids_q, ids_k)
    left, right = _fa2._window(window_size)
    return ops.flash_attention_bshd(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                    window_left=left, softcap=softcap,
                                    return_lse=return_attn_probs, window_right=right)


# ------------------------------------------------------------------------ varlen


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor | None, max_seqlen_q: int,
                           max_seqlen_k: int, seqused_q: Tensor | None = None,
                           seqused_k: Tensor | None = None,
                           softmax_scale: float | None = None, causal: bool = False,
                           qv: Tensor | None = None, q_descale: Tensor | None = None,
                           k_descale: Tensor | None = None, v_descale: Tensor | None = None,
                           window_size: tuple[int, int] = (-1, -1), attention_chunk: int = 0,
                           softcap: float = 0.0, num_splits: int = 1,
                           pack_gqa: bool | None = None, deterministic: bool = False,
                           sm_margin: int = 0, return_attn_probs: bool = False
                           ) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a varlen batch (FlashAttention 3's ``flash_attn_varlen_func``).

    q [total_q, H, D]; k, v [total_k, Hk, D]; cu_seqlens_q / cu_seqlens_k int32 [B + 1].
    seqused_q int32 [B]: sequence b's queries are q[cu_seqlens_q[b] : + seqused_q[b]] (the
    causal / window alignment uses that length; the other rows come back 0, LSE -inf).
    seqused_k int32 [B]: sequence b's keys are its first seqused_k[b]; with seqused_k,
    cu_seqlens_k may be None and k, v padded [B, Sk, Hk, D]. fp8: as flash_attn_func.
    Returns out [total_q, H, D], and with return_attn_probs=True (out, softmax_lse
    [H, total_q] fp32, natural log).
    """
    _refuse_fa3_only(qv, attention_chunk)
    _check_hints(num_splits, pack_gqa, sm_margin)
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got "
                        f"{type(return_attn_probs).__name__}")
    check_tensor("q", q, ndim=3)
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), ndim=1,
                 device=q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k is None and isinstance(k, Tensor) and k.dim() == 4:
        if seqused_k is None:
            raise ValueError("cu_seqlens_k is required unless seqused_k is given")
        check_tensor("k", k, ndim=4, device=q.device)
        if k.shape[0] != batch or v.shape != k.shape:
            raise ValueError(f"padded k / v must have shape [{batch}, Sk, Hk, D] alike, got "
                             f"{list(k.shape)} / {list(v.shape)}")
        sk = k.shape[1]
        cu_seqlens_k = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * sk
        k, v = k.reshape(batch * sk, *k.shape[2:]), v.reshape(batch * sk, *v.shape[2:])
        max_seqlen_k = max(int(max_seqlen_k), sk) if max_seqlen_k is not None else sk
    if k.dtype in _FP8 or q.dtype in _FP8 or any(
            s is not None for s in (q_descale, k_descale, v_descale)):
        if cu_seqlens_k is None:
            raise ValueError("cu_seqlens_k is required for fp8 varlen inputs (which "
                             "sequence each key's descale is)")
        q, k, v = _fp8_inputs(q, k, v, q_descale, k_descale, v_descale, batch,
                              _batch_ids(cu_seqlens_q, q.shape[0]),
                              _batch_ids(cu_seqlens_k, k.shape[0]))
    left, right = _fa2._window(window_size)
    q_all, total_q = q, q.shape[0]
    rows = None
    if seqused_q is not None:
        check_tensor("seqused_q", seqused_q, dtypes=(torch.int32,), ndim=1, device=q.device)
        if seqused_q.shape[0] != batch:
            raise ValueError(f"seqused_q must have {batch} entries (one per sequence), got "
                             f"{seqused_q.shape[0]}")
        lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        if batch and bool(((seqused_q < 0) | (seqused_q.long() > lens_q)).any()):
            raise ValueError("seqused_q must be in [0, cu_seqlens_q[b+1] - cu_seqlens_q[b]]")
        used = seqused_q.long()
        starts = torch.repeat_interleave(cu_seqlens_q[:-1].long(), used)
        offsets = torch.arange(int(used.sum()), device=q.device) - torch.repeat_interleave(
            torch.cumsum(used, 0) - used, used)
        rows = starts + offsets                                   # used query rows
        q = q[rows]
        cu_seqlens_q = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        cu_seqlens_q[1:] = torch.cumsum(seqused_q, 0)
    block_table = None
    if seqused_k is not None:
        k, v, cu_seqlens_k, block_table = _fa2._used_keys(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, None, seqused_k)
    elif cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k is required unless seqused_k is given")
    out, lse = ops.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                   window_left=left, softcap=softcap,
                                   block_table=block_table, return_lse=True,
                                   window_right=right)
    if rows is not None:
        full = torch.zeros(q_all.shape[:-1] + (out.shape[-1],), dtype=out.dtype,
                           device=out.device)
        full[rows] = out
        full_lse = torch.full((lse.shape[0], total_q), float("-inf"), dtype=lse.dtype,
                              device=lse.device)
        full_lse[:, rows] = lse
        out, lse = full, full_lse
    return (out, lse) if return_attn_probs else out


# ------------------------------------------------------------------------ KV cache


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                            k: Tensor | None = None, v: Tensor | None = None,
                            qv: Tensor | None = None, rotary_cos: Tensor | None = None,
                            rotary_sin: Tensor | None = None,
                            cache_seqlens: int | Tensor | None = None,
                            cache_batch_idx: Tensor | None = None,
                            cache_leftpad: Tensor | None = None,
                            page_table: Tensor | None = None,
                            cu_seqlens_q: Tensor | None = None,
                            cu_seqlens_k_new: Tensor | None = None,
                            max_seqlen_q: int | None = None,
                            rotary_seqlens: Tensor | None = None,
                            q_descale: Tensor | None = None, k_descale: Tensor | None = None,
                            v_descale: Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), attention_chunk: int = 0,
                            softcap: float = 0.0, rotary_interleaved: bool = True,
                            scheduler_metadata: Tensor | None = None, num_splits: int = 0,
                            pack_gqa: bool | None = None, sm_margin: int = 0,
                            return_softmax_lse: bool = False
                            ) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Append k / v to a KV cache in place, then attend (FlashAttention 3's
    ``flash_attn_with_kvcache``).

    q [B, Sq, H, D]. k_cache, v_cache [B_cache, S_cache, Hk, D], or paged
    [num_blocks, page, Hk, D] with page_table int32 [B, max_pages] (any page size); q's
    dtype. k, v [B, Sn, Hk, D]: written at cache_seqlens[b] + i (in place).
    cache_seqlens int or int32 [B]: tokens already cached. cache_batch_idx / cache_leftpad
    int32 [B] (contiguous caches). rotary_cos / rotary_sin [seqlen_ro, rotary_dim / 2]:
    k rotated at cache_seqlens + i, q likewise when causal or local, else at cache_seqlens
    (``rotary_interleaved``: GPT-J pairs when True). num_splits: KV splits of the one-query
    kernel (0 = heuristic). Returns out [B, Sq, H, D], or with return_softmax_lse
    (out, softmax_lse [B, H, Sq] fp32 natural log, out_accum, softmax_lse_accum), the last
    two empty tensors (no split partials are exposed).
    """
    _refuse_fa3_only(qv, attention_chunk)
    _check_hints(num_splits, pack_gqa, sm_margin)
    for name, val in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k_new", cu_seqlens_k_new),
                      ("max_seqlen_q", max_seqlen_q), ("rotary_seqlens", rotary_seqlens)):
        if val is not None:
            raise NotImplementedError(f"{name} (varlen queries / new keys, separate rotary "
                                      f"positions) is not supported by minikernels' "
                                      f"flash_attn_with_kvcache; pass {name}=None")
    fp8 = any(isinstance(t, Tensor) and t.dtype in _FP8 for t in (q, k_cache, v_cache, k, v))
    for name, s in (("q_descale", q_descale), ("k_descale", k_descale),
                    ("v_descale", v_descale)):
        if s is not None or fp8:
            raise NotImplementedError(f"{name if s is not None else 'q / k_cache dtype'}: "
                                      f"fp8 in flash_attn_with_kvcache is not supported by "
                                      f"this interface (use minikernels.ops' fp8 paged "
                                      f"caches with k_scale / v_scale)")
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse must be a bool, got "
                        f"{type(return_softmax_lse).__name__}")
    res = _fa2.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=page_table, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap,
        rotary_interleaved=rotary_interleaved, num_splits=num_splits,
        return_softmax_lse=return_softmax_lse)
    if not return_softmax_lse:
        return res  # type: ignore[return-value]
    out, lse = res
    empty = torch.empty(0, dtype=torch.float32, device=out.device)
    return out, lse, empty, empty.clone()
