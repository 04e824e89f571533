"""Op family: paged KV cache — the write op and decode attention.

Ops: ``minikernels::write_kv_cache`` (mutates the caches) and
``minikernels::paged_decode_attention``. Cache layout per layer: k_cache, v_cache
[num_blocks, block_size, Hkv, D]; slot = block * block_size + offset (vLLM's slot_mapping),
slot -1 skips a token (padding rows of a captured CUDA graph). Backends: reference; the
Triton and CUDA kernels plug in here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_index_range, check_last_dim_contiguous,
                           check_positive_float, check_shape, check_tensor)
from . import reference
from .attention import check_block_table, check_head_dim, check_paged_cache


@torch.library.custom_op("minikernels::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    slot_mapping: Tensor) -> None:
    _backend.resolve("write_kv_cache", k.device)
    reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_cache.register_fake
def _(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    return None


@torch.library.custom_op("minikernels::paged_decode_attention", mutates_args=())
def _paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                            seq_lens: Tensor, softmax_scale: float, window_left: int,
                            softcap: float, num_splits: int) -> Tensor:
    _backend.resolve("paged_decode_attention", q.device)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens,
                                            softmax_scale, window_left, softcap)


@_paged_decode_attention.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
      softmax_scale: float, window_left: int, softcap: float, num_splits: int) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor) -> None:
    """Write each token's K/V into its cache slot, in place.

    k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (same dtype as k);
    slot_mapping int32/int64 [T] with slot = block * block_size + offset, -1 = skip.
    """
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("v", v, dtypes=(k.dtype,), ndim=3, device=k.device)
    check_shape("v", v, list(k.shape))
    check_paged_cache(("k_cache", "v_cache"), k_cache, v_cache, k.dtype, k.device, k.shape[2])
    if k_cache.shape[2] != k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but k_cache has {k_cache.shape[2]}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=k.device)
    check_shape("slot_mapping", slot_mapping, [k.shape[0]])
    check_last_dim_contiguous("k", k)
    check_last_dim_contiguous("v", v)
    check_index_range("slot_mapping", slot_mapping, -1, k_cache.shape[0] * k_cache.shape[1])
    torch.ops.minikernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                           seq_lens: Tensor, softmax_scale: float | None = None,
                           window_left: int = -1, softcap: float = 0.0,
                           num_splits: int = 0) -> Tensor:
    """Decode attention: one query per sequence over its paged KV cache.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (q's dtype);
    block_table int32 [B, max_blocks]; seq_lens int32 [B] (cached tokens, the new one
    included). num_splits: 0 = heuristic split-KV, > 0 = that many KV splits. Returns
    [B, Hq, D] in q.dtype; a sequence with seq_len 0 gets zeros.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    d = q.shape[2]
    check_head_dim(d)
    check_paged_cache(("k_cache", "v_cache"), k_cache, v_cache, q.dtype, q.device, d)
    hq, hkv = q.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache kv heads ({hkv})")
    check_last_dim_contiguous("q", q)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, device=q.device)
    check_shape("seq_lens", seq_lens, [q.shape[0]])
    check_index_range("seq_lens", seq_lens, 0, 2**31 - 1)
    check_block_table(block_table, q.shape[0], seq_lens, k_cache.shape[0], k_cache.shape[1],
                      q.device)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left must be -1 (no window) or >= 0, got {window_left!r}")
    softcap = check_positive_float("softcap", softcap, allow_zero=True)
    scale = (1.0 / math.sqrt(d) if softmax_scale is None
             else check_positive_float("softmax_scale", softmax_scale))
    return torch.ops.minikernels.paged_decode_attention(
        q, k_cache, v_cache, block_table, seq_lens, scale, window_left, softcap, num_splits)
