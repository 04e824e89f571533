"""FlashInfer's Python API on minikernels' ops.

    from minikernels.compat import flashinfer      # instead of: import flashinfer
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                 page_size, q_data_type=torch.bfloat16)
    out, lse = wrapper.run(q, paged_kv_cache, return_lse=True)

Names, argument names, defaults, layouts and return shapes are FlashInfer's. Covered:

- attention: ``single_decode_with_kv_cache``, ``single_prefill_with_kv_cache`` (+
  ``_return_lse``), ``BatchDecodeWithPagedKVCacheWrapper``,
  ``BatchPrefillWithPagedKVCacheWrapper``, ``BatchPrefillWithRaggedKVCacheWrapper``:
  NHD / HND layouts, paged caches as one ``[num_pages, 2, ...]`` tensor or a
  ``(k_cache, v_cache)`` tuple, FlashInfer's CSR page table (``indptr`` / ``indices`` /
  ``last_page_len``), GQA / MQA, ``causal`` (bottom-right), ``window_left``,
  ``logits_soft_cap`` (``cap * tanh(sm_scale * qk / cap)``), ``sm_scale``, ``q_scale`` /
  ``k_scale`` / ``v_scale``, fp8 (e4m3 / e5m2) paged caches, ``return_lse``, ``out`` / ``lse``
  buffers, the wrappers' ``run(sinks=)`` (GPT-OSS's attention sinks: one more logit per
  q head, in the units of the scaled scores; the returned lse includes it);
  ``pos_encoding_mode`` (with ``rope_scale`` / ``rope_theta``) in every function and
  wrapper that takes it (see "Position encodings" below);
- unified attention: ``BatchAttention`` (FlashInfer's persistent mixed decode / prefill
  API: ``plan(qo_indptr, kv_indptr, kv_indices, kv_len_arr, ...)`` with per-request kv
  lengths instead of last-page lengths, ``run(q, kv_cache)`` -> (out, base-2 lse)) and
  ``BatchAttentionWithAttentionSinkWrapper`` (the paged prefill wrapper with
  ``run(q, paged_kv_cache, sink, sm_scale)``), both thin layers over
  ``BatchPrefillWithPagedKVCacheWrapper``;
- ``append_paged_kv_cache``, ``get_batch_indices_positions``, ``get_seq_lens``;
- cascade: ``merge_state``, ``merge_state_in_place``, ``merge_states``,
  ``MultiLevelCascadeAttentionWrapper`` (``plan`` / ``run``, ``begin_forward`` /
  ``forward``: one paged prefill per level over its own page table into one cache, causal
  on the last level only, the levels' base-2 states merged as FlashInfer's ``run``), and
  the deprecated ``BatchDecodeWithSharedPrefixPagedKVCacheWrapper`` /
  ``BatchPrefillWithSharedPrefixPagedKVCacheWrapper`` (``begin_forward`` / ``forward``:
  the prefix as its own k / v, merged with the paged suffixes);
- ``rmsnorm``, ``fused_add_rmsnorm``, ``gemma_rmsnorm``, ``gemma_fused_add_rmsnorm``,
  ``layernorm``, ``silu_and_mul``, ``gelu_and_mul`` (erf), ``gelu_tanh_and_mul``;
  ``rmsnorm_quant``, ``fused_add_rmsnorm_quant`` (static fp8) and
  ``fused_add_rmsnorm_fp8_block_quant`` (1 x 128 blocks, TMA-aligned scales) on
  ``ops.rms_norm_quant``;
- RoPE: ``apply_rope`` / ``apply_rope_pos_ids`` / ``apply_llama31_rope`` /
  ``apply_llama31_rope_pos_ids`` (each with ``_inplace``), ``apply_rope_with_cos_sin_cache``
  (+ ``_inplace``);
- sampling: ``top_k_mask_logits``, ``top_k_renorm_probs``, ``top_p_renorm_probs``,
  ``sampling_from_probs`` / ``_from_logits``, ``top_k`` / ``top_p`` / ``min_p`` /
  ``top_k_top_p_sampling_from_probs``, ``top_k_top_p_sampling_from_logits``,
  ``chain_speculative_sampling`` (speculative decoding's verification, on
  ``ops.rejection_sample``), ``softmax`` (temperature: a number or one per row; FlashInfer's
  temperature-0 rule: a uniform row);
- quantization: ``packbits`` / ``segment_packbits`` (numpy.packbits' bits, per segment
  with FlashInfer's returned int32 indptr);
- the submodule namespaces ``attention``, ``decode``, ``prefill``, ``page``, ``cascade``,
  ``norm``, ``activation``, ``rope``, ``sampling``, ``quantization``
  (``flashinfer.sampling.top_k_mask_logits(...)`` works; ``from ...flashinfer.sampling
  import x`` does not: they are attributes).

LSE: FlashInfer's returned (and ``merge_state``-consumed) log-sum-exp is base 2
(``log2(sum_j 2^(s_j log2 e))`` = natural LSE * log2(e); its kernels keep the running
max in log2 units and write ``m + log2(d)``, and ``cascade.cuh`` says "Both s_a and s_b
are logsumexp values with base 2"). minikernels' ops return natural-log LSE, so this
module converts exactly (times / divided by log2(e)) at the boundary.

Mapping: ``plan`` turns the CSR page table into minikernels' int32 ``block_table``
[B, max_pages] and lengths, on the workspace's device, vectorized (one host sync, as
FlashInfer's plan). Decode runs :func:`minikernels.ops.paged_decode_attention`; paged,
ragged and single prefill and single decode run :func:`minikernels.ops.flash_attention`.
HND caches are passed as transposed views (no copy). Pages larger than 256 tokens (our
kernels' largest block) are split into equal sub-blocks when the cache stores pages back
to back (a contiguous NHD ``(k_cache, v_cache)`` tuple); otherwise attention reads a
contiguous copy and ``append_paged_kv_cache`` (which must write in place) raises a
ValueError naming ``page_size``.

Position encodings (FlashInfer's ``pos_encoding_mode``, applied inside attention; its
variants.cuh ``DefaultAttention``, decode.cuh / prefill.cuh and utils.py). In a request
with qo_len queries and kv_len keys, query row i (0 in decode) sits at kv_len - qo_len + i
and key j at j (positions count within each request's, or cascade level's, own keys):

- "ALIBI": the score of row i and key j is ``sm_scale * q.k + slope_h * (j - i)`` with
  ``get_alibi_slopes(num_qo_heads)`` (2^(-8k/n) for the largest power of two n <=
  heads, then 2^(-4(2k-1)/n)). The ops take those slopes (``alibi_slopes``) with their
  own bias ``-slope * |position - j|``: on the keys a causal row (or a decode query) sees
  that is FlashInfer's bias less slope * (position - i), a constant per row, so the
  output is the same and the returned LSE is moved back to FlashInfer's. Without the
  causal mask FlashInfer's bias is signed (keys after the query gain), so each query row
  runs as its own decode over its request's keys (``ops.paged_decode_attention`` with a
  per-row block table; ragged k / v read as pages of one token).
- "ROPE_LLAMA" (``rope_scale`` default 1, ``rope_theta`` default 1e4): q and k rotated
  Llama / neox style, dims (d, d + head_dim / 2), angle position * rope_theta^(-2d /
  head_dim) / rope_scale (fp32 cos / sin, ``ops.rotary_embedding``). A compat path: every
  run rotates a copy of q and of the keys attention reads (ragged / single k; for paged
  caches the planned requests' tokens, gathered out of the cache ragged, fp8 cast to q's
  dtype, and attended over with ``ops.flash_attention``); the caller's q, k and cache are
  never written. Decode with ROPE_LLAMA runs as one-query prefill, so ``fixed_split_size``
  / ``disable_split_kv`` do not apply to it.

Not covered, each refused by name with a ValueError (never silently ignored):
- "ALIBI" with ``logits_soft_cap`` (FlashInfer caps the biased score, scaled by sm_scale
  a second time; the ops add the bias after the cap), with ``sinks`` (the ops' sink
  logit is not moved with the bias), or with ``causal=False`` and ``window_left >= 0``
  (each row's window would start at a different key of the per-row decode);
  "ROPE_LLAMA" with an odd head_dim; an unknown ``pos_encoding_mode``;
- ``custom_mask`` / ``packed_custom_mask`` (minikernels' attention has no mask input);
- ``use_cuda_graph=True`` (plan() builds new block tables: a captured run would read stale
  ones), ``jit_args``, ``head_dim_vo != head_dim_qk``, more than one
  query per request in decode (``q_len_per_req``), FlashInfer's extra plan inputs
  (``seq_lens``, ``block_tables``, ``prefix_len_ptr``, ...), per-head fp8 tensor scales
  (``scale_q`` / ``scale_k`` / ``scale_v``), fp8 q, fp8 k / v outside paged caches;
- MLA, POD and block-sparse wrappers, quantization other than ``packbits`` /
  ``segment_packbits``, GEMM, MoE and comm APIs.

Other differences: any ``head_dim`` in [1, 512] (the ops' range; FlashInfer compiles a
fixed set, 64 / 128 / 256 and, on its fa2 backend, Gemma 4's 512); everything after
``page_size`` in the decode ``plan()`` is keyword-only
(FlashInfer deprecates passing them positionally); ``single_prefill_with_kv_cache`` keeps
FlashInfer 0.2's positional order (``custom_mask`` 4th; newer versions put fp8 scales
there: pass those by keyword); ``use_tensor_cores``, ``use_fp16_qk_reduction``,
``backend``, ``non_blocking``, ``enable_pdl`` and ``deterministic`` are accepted and have
no effect (fp32 math throughout); ``fixed_split_size`` / ``disable_split_kv`` map onto the
decode op's batch-invariant ``split_size`` / ``num_splits=1``; ``run(window_left=...)``
may differ from the planned value; ``q_scale`` / ``k_scale`` / ``v_scale`` are numbers (a
1-element tensor is read on the host); activations take any even last dim (FlashInfer wants
16-byte rows); ``fused_add_rmsnorm`` normalizes the sum as stored in ``residual``'s dtype;
the samplers draw with ``torch.multinomial`` and ``generator`` (same distribution, not
FlashInfer's random stream); ``BatchPrefillWithSharedPrefixPagedKVCacheWrapper.forward``
takes q's dtype (FlashInfer's ``begin_forward`` has no dtype argument, plans float16 and
refuses others) and the shared-prefix decode wrapper's ``data_type`` sets q's and the
cache's dtype; ``softmax``, ``packbits`` and ``segment_packbits`` are plain PyTorch. The
math is minikernels' ops: the reference on the CPU, Triton / CUDA on the GPU.
"""
from __future__ import annotations

import functools
import math
import operator
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._validation import (
    FLOAT_DTYPES,
    check_index_range,
    check_last_dim_contiguous,
    check_positive_float,
    check_shape,
    check_tensor,
    index_checks_active,
)

__all__ = [
    "BatchAttention", "BatchAttentionWithAttentionSinkWrapper",
    "BatchDecodeWithPagedKVCacheWrapper", "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper", "MultiLevelCascadeAttentionWrapper",
    "activation", "append_paged_kv_cache", "attention",
    "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace", "apply_rope", "apply_rope_inplace",
    "apply_rope_pos_ids", "apply_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace", "cascade", "chain_speculative_sampling",
    "decode", "fused_add_rmsnorm", "fused_add_rmsnorm_fp8_block_quant", "fused_moe",
    "fused_add_rmsnorm_quant", "rmsnorm_quant",
    "gelu_and_mul", "gelu_tanh_and_mul", "gemma_fused_add_rmsnorm", "gemma_rmsnorm",
    "get_batch_indices_positions", "get_seq_lens", "layernorm", "merge_state",
    "merge_state_in_place",
    "merge_states", "min_p_sampling_from_probs", "norm", "packbits", "page", "prefill",
    "quantization", "rmsnorm", "rope", "sampling", "sampling_from_logits",
    "sampling_from_probs", "segment_packbits", "silu_and_mul", "softmax",
    "single_decode_with_kv_cache", "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse", "top_k_mask_logits", "top_k_renorm_probs",
    "top_k_sampling_from_probs", "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs", "top_p_renorm_probs", "top_p_sampling_from_probs",
]

#: FlashInfer's LSE is base 2: lse_2 = lse_e * LOG2E, lse_e = lse_2 * LN2.
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
#: The largest block our paged kernels take (minikernels.ops.attention.MAX_BLOCK_SIZE).
_MAX_BLOCK = 256
_POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")
_KV_LAYOUTS = ("NHD", "HND")
_INT_DTYPES = (torch.int32, torch.int64)
_FP8_KV = (torch.float8_e4m3fn, torch.float8_e5m2)


# ----------------------------------------------------------------------------- arguments


def _int(name: str, value: object, low: int) -> int:
    """An int (numpy ints too, not bool) >= low."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if out < low:
        raise ValueError(f"{name} must be >= {low}, got {out}")
    return out


def _check_pos_encoding_mode(mode: object) -> str:
    if mode not in _POS_ENCODING_MODES:
        raise ValueError(f"pos_encoding_mode must be one of {_POS_ENCODING_MODES}, got "
                         f"{mode!r}")
    return mode  # type: ignore[return-value]


class _PosEncoding:
    """FlashInfer's ``pos_encoding_mode`` with its RoPE parameters, checked.

    "NONE"; "ROPE_LLAMA": q and k rotated inside attention, Llama / neox pairs (i, i + D/2)
    over the whole head at angle position * rope_theta^(-2i / D) / rope_scale (FlashInfer's
    defaults: rope_scale 1, rope_theta 1e4); "ALIBI": FlashInfer's slopes
    (:func:`_alibi_slopes`), the score of query row i and key j gets slope * (j - i).
    FlashInfer applies its soft cap to the ALiBi-biased score scaled by sm_scale once more
    (``cap * tanh((sm_scale * q.k + bias) * sm_scale / cap)``) where minikernels' ops add
    the bias to the capped score, so ALIBI with ``logits_soft_cap`` is refused."""

    def __init__(self, mode: object, rope_scale: float | None = None,
                 rope_theta: float | None = None, soft_cap: float = 0.0) -> None:
        self.mode = _check_pos_encoding_mode(mode)
        self.rope = self.mode == "ROPE_LLAMA"
        self.alibi = self.mode == "ALIBI"
        self.rope_scale, self.rope_theta = 1.0, 1e4
        if self.rope and rope_scale is not None:
            self.rope_scale = check_positive_float("rope_scale", rope_scale)
        if self.rope and rope_theta is not None:
            self.rope_theta = check_positive_float("rope_theta", rope_theta)
        if self.alibi and soft_cap > 0:
            raise ValueError(
                "logits_soft_cap is not supported with pos_encoding_mode='ALIBI' by "
                "minikernels' FlashInfer compat layer: FlashInfer caps the ALiBi-biased "
                "score (scaled by sm_scale twice), minikernels' attention adds the bias "
                "after the cap")


def _segment_positions(indptr: Tensor, nnz: int) -> tuple[Tensor, Tensor]:
    """Ragged rows 0..nnz-1 split by indptr [n + 1] (non-decreasing, indptr[-1] = nnz) ->
    (segment b of each row, its index t - indptr[b] within it), int64 [nnz] each, on
    indptr's device. Vectorized, no host sync."""
    ptr = indptr.long()
    rows = torch.arange(nnz, device=indptr.device)
    b = torch.searchsorted(ptr[1:].contiguous(), rows, right=True)
    b = b.clamp_(max=max(indptr.numel() - 2, 0))
    return b, rows - ptr[b]


def _check_kv_layout(kv_layout: object) -> str:
    if kv_layout not in _KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    return kv_layout  # type: ignore[return-value]


def _refuse_masks(custom_mask: object, packed_custom_mask: object) -> None:
    for name, mask in (("custom_mask", custom_mask), ("packed_custom_mask",
                                                       packed_custom_mask)):
        if mask is not None:
            raise ValueError(f"{name} is not supported by minikernels' FlashInfer compat "
                             f"layer (causal and window_left masks only)")


def _refuse(**kwargs: object) -> None:
    """FlashInfer inputs this layer does not implement: each must keep its default."""
    for name, value in kwargs.items():
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported by minikernels' FlashInfer compat "
                             f"layer (got {value!r}); leave it at its default")


def _dtype(name: str, value: object) -> torch.dtype:
    """FlashInfer's canonicalize_torch_dtype: a torch.dtype or its name ("float16")."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or a dtype name such as 'float16', "
                        f"got {value!r}")
    return value


def _number(name: str, value: object) -> float | None:
    """An optional scale: None, a number, or a 1-element tensor (read on the host)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape "
                             f"{list(value.shape)} (per-head scales are not supported)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _softmax_scale(sm_scale: object, head_dim: int, q_scale: float | None,
                   k_scale: float | None) -> float:
    """FlashInfer's: sm_scale (default 1/sqrt(head_dim)) times q_scale and k_scale."""
    scale = (1.0 / math.sqrt(head_dim) if sm_scale is None
             else check_positive_float("sm_scale", sm_scale))  # type: ignore[arg-type]
    for s in (q_scale, k_scale):
        if s is not None:
            scale *= s
    return scale


def _soft_cap(logits_soft_cap: object) -> float:
    return 0.0 if logits_soft_cap is None else check_positive_float(
        "logits_soft_cap", logits_soft_cap, allow_zero=True)  # type: ignore[arg-type]


def _window(window_left: object) -> int:
    return _int("window_left", window_left, -1)


def _copy_into(name: str, buf: Tensor, value: Tensor) -> Tensor:
    check_tensor(name, buf, dtypes=(value.dtype,), device=value.device)
    check_shape(name, buf, list(value.shape))
    return buf.copy_(value)


def _finish(out: Tensor, lse_e: Tensor | None, return_lse: bool, *, v_scale: float | None,
            o_dtype: torch.dtype | None = None, out_buf: Tensor | None = None,
            lse_buf: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Apply FlashInfer's output conventions: ``out *= v_scale``, the output dtype, the
    caller's buffers, and the base-2 LSE (``lse_e`` natural, already [rows, heads])."""
    if v_scale is not None and v_scale != 1.0:
        out = out * v_scale
    if o_dtype is not None and out.dtype != o_dtype:
        out = out.to(o_dtype)
    if out_buf is not None:
        out = _copy_into("out", out_buf, out)
    if not return_lse:
        return out
    assert lse_e is not None
    lse = (lse_e * LOG2E).contiguous()
    if lse_buf is not None:
        lse = _copy_into("lse", lse_buf, lse)
    return out, lse


# -------------------------------------------------------------------------- kv layouts


def _kv_nhd(t: Tensor, kv_layout: str) -> Tensor:
    """A single request's k or v, [kv_len, H, D] (NHD) or [H, kv_len, D] (HND) -> NHD view."""
    return t.transpose(0, 1) if kv_layout == "HND" else t


def _unpack_paged_kv_cache(paged_kv_cache: object, kv_layout: str,
                           name: str = "paged_kv_cache") -> tuple[Tensor, Tensor]:
    """FlashInfer's paged cache -> (k, v) views [num_pages, page_size, H, D] (no copy).
    ``name``: the argument's name in errors (``BatchAttention.run`` calls it kv_cache)."""
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError(f"{name} as a tuple must be (k_cache, v_cache), got "
                             f"{len(paged_kv_cache)} items")
        k, v = paged_kv_cache
        check_tensor(f"{name}[0] (k_cache)", k, ndim=4)
        check_tensor(f"{name}[1] (v_cache)", v, ndim=4)
    elif isinstance(paged_kv_cache, Tensor):
        check_tensor(name, paged_kv_cache, ndim=5)
        if paged_kv_cache.shape[1] != 2:
            raise ValueError(f"{name} as one tensor must be [num_pages, 2, ...] "
                             f"(k, v), got shape {list(paged_kv_cache.shape)}")
        k, v = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    else:
        raise TypeError(f"{name} must be a tensor or a (k_cache, v_cache) tuple, got "
                        f"{type(paged_kv_cache).__name__}")
    if kv_layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k, v


def _sub_blocks(page_size: int) -> int:
    """Sub-blocks per page: the fewest equal parts of at most _MAX_BLOCK tokens."""
    return next(s for s in range(1, page_size + 1)
                if page_size % s == 0 and page_size // s <= _MAX_BLOCK)


def _as_blocks(cache: Tensor, sub: int, kv_layout: str, read_only: bool = False) -> Tensor:
    """[P, page, H, D] -> [P * sub, page / sub, H, D] view (pages stored back to back).
    read_only: a cache stored otherwise is read from a contiguous copy (attention), where
    a write (append) refuses it."""
    if sub == 1:
        return cache
    p, page, h, d = cache.shape
    try:
        return cache.unflatten(1, (sub, page // sub)).view(p * sub, page // sub, h, d)
    except RuntimeError:
        if read_only:
            return cache.contiguous().view(p * sub, page // sub, h, d)
        raise ValueError(
            f"page_size {page} is above the kernels' largest block ({_MAX_BLOCK}): pages are "
            f"split into {sub} blocks of {page // sub}, which needs each page's tokens "
            f"stored back to back (a contiguous NHD (k_cache, v_cache) tuple); this cache "
            f"(kv_layout={kv_layout!r}, strides {tuple(cache.stride())}) is not. Use "
            f"page_size <= {_MAX_BLOCK}") from None


class _PageTable:
    """FlashInfer's CSR page table as minikernels' block table (built in plan())."""

    def __init__(self, names: tuple[str, str, str], indptr: object, indices: object,
                 last_page_len: object, page_size: int, device: torch.device) -> None:
        n_ptr, n_idx, n_last = names
        for name, t in zip(names, (indptr, indices, last_page_len)):
            check_tensor(name, t, dtypes=_INT_DTYPES, ndim=1)
        assert isinstance(indptr, Tensor) and isinstance(indices, Tensor)
        assert isinstance(last_page_len, Tensor)
        if indptr.numel() < 1:
            raise ValueError(f"{n_ptr} must have batch_size + 1 >= 1 entries")
        batch = indptr.numel() - 1
        check_shape(n_last, last_page_len, [batch])
        ptr_h = indptr.to("cpu", torch.int64)     # the host sync (FlashInfer's plan has it too)
        last_h = last_page_len.to("cpu", torch.int64)
        pages_h = ptr_h[1:] - ptr_h[:-1]
        if bool((pages_h < 0).any()):
            raise ValueError(f"{n_ptr} must be non-decreasing")
        if int(ptr_h[0]) < 0 or int(ptr_h[-1]) > indices.numel():
            raise ValueError(f"{n_ptr} values must be in [0, len({n_idx}) = {indices.numel()}]"
                             f", got {int(ptr_h[0])}..{int(ptr_h[-1])}")
        if bool(((last_h < 0) | (last_h > page_size)).any()):
            raise ValueError(f"{n_last} values must be in [0, page_size = {page_size}]")
        if bool(((pages_h == 0) & (last_h != 0)).any()):
            raise ValueError(f"{n_last} must be 0 for a request with no pages")
        seq_h = torch.where(pages_h > 0, (pages_h - 1) * page_size + last_h, 0)
        max_pages = int(pages_h.max()) if batch else 0
        self.page_size, self.sub = page_size, _sub_blocks(page_size)
        self.batch = batch
        self.max_kv_len = int(seq_h.max()) if batch else 0
        self.seq_lens = seq_h.to(device, torch.int32)
        self.cu_seqlens_k = torch.cat([seq_h.new_zeros(1), seq_h.cumsum(0)]).to(
            device, torch.int32)
        ptr = indptr.to(device, torch.int64)
        idx = indices.to(device)
        self.indices_used = idx[int(ptr_h[0]):int(ptr_h[-1])]
        self.total_kv = int(seq_h.sum())
        self._page_ptr = ptr - ptr[0]          # request b's pages: indices_used[ptr b..b+1]
        cols = torch.arange(max(max_pages, 1), device=device)
        valid = cols < (ptr[1:] - ptr[:-1])[:, None]
        if idx.numel():
            at = (ptr[:-1, None] + cols).clamp_(max=idx.numel() - 1)
            table = torch.where(valid, idx[at].long(), 0)
        else:
            table = torch.zeros(valid.shape, dtype=torch.int64, device=device)
        if self.sub > 1:   # page p -> blocks p * sub .. p * sub + sub - 1
            table = (table[:, :, None] * self.sub
                     + torch.arange(self.sub, device=device)).flatten(1)
        self.block_table = table.to(torch.int32)
        self._n_idx = n_idx

    def caches(self, paged_kv_cache: object, kv_layout: str, q: Tensor, num_kv_heads: int,
               kv_dtype: torch.dtype, gather: bool = False,
               cache_name: str = "paged_kv_cache") -> tuple[Tensor, Tensor]:
        """The run()'s cache, checked, as block views [blocks, block_size, Hkv, D] (no
        copy), or with ``gather`` as each request's cached tokens in order: new ragged
        tensors [total_kv, Hkv, D] in q's dtype (request b at cu_seqlens_k[b] ..
        cu_seqlens_k[b+1]; fp8 values cast, not scaled), the cache untouched.
        ``cache_name``: the cache argument's name in errors."""
        k, v = _unpack_paged_kv_cache(paged_kv_cache, kv_layout, cache_name)
        for name, c in ((f"{cache_name} (k)", k), (f"{cache_name} (v)", v)):
            check_tensor(name, c, dtypes=(q.dtype, *_FP8_KV), device=q.device)
            check_last_dim_contiguous(name, c)
            want = [k.shape[0], self.page_size, num_kv_heads, q.shape[-1]]
            if list(c.shape) != want:
                raise ValueError(f"{name} must be [num_pages, page_size={self.page_size}, "
                                 f"num_kv_heads={num_kv_heads}, head_dim={q.shape[-1]}] in "
                                 f"NHD terms (as planned, kv_layout={kv_layout!r}), got "
                                 f"{list(c.shape)}")
        if k.dtype != kv_dtype or v.dtype != kv_dtype:
            raise ValueError(f"{cache_name} has dtype {k.dtype}/{v.dtype} but plan() was "
                             f"given kv_data_type={kv_dtype}")
        check_index_range(self._n_idx, self.indices_used, 0, k.shape[0])
        if gather:
            b, j = _segment_positions(self.cu_seqlens_k, self.total_kv)
            pages = self.indices_used.long()[self._page_ptr[b] + j // self.page_size]
            slots = j % self.page_size
            return k[pages, slots].to(q.dtype), v[pages, slots].to(q.dtype)
        return _as_blocks(k, self.sub, kv_layout, True), _as_blocks(v, self.sub, kv_layout, True)


def _fp8_scales(k_cache: Tensor, k_scale: float | None, v_scale: float | None
                ) -> tuple[Tensor | None, Tensor | None, float | None, float | None]:
    """fp8 caches: FlashInfer's k_scale / v_scale become the op's dequantization scales
    (same math: scores and outputs are linear in k and v). Other caches: folded into
    sm_scale and the output, as FlashInfer does. Returns (op k_scale, op v_scale, folded
    k_scale, folded v_scale)."""
    if k_cache.dtype not in _FP8_KV:
        return None, None, k_scale, v_scale

    def as_tensor(s: float | None) -> Tensor:
        return torch.tensor([1.0 if s is None else s], dtype=torch.float32,
                            device=k_cache.device)
    return as_tensor(k_scale), as_tensor(v_scale), None, None


def _check_planned(name: str, t: Tensor, planned: torch.dtype, arg: str) -> None:
    if t.dtype != planned:
        raise ValueError(f"{name} has dtype {t.dtype} but plan() was given {arg}={planned}")


def _plan_dtypes(q_data_type: object, kv_data_type: object, o_data_type: object,
                 data_type: object = None) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    if data_type is not None:            # FlashInfer's deprecated alias for both
        q_data_type = data_type if q_data_type is None else q_data_type
        kv_data_type = data_type if kv_data_type is None else kv_data_type
    q_dt = _dtype("q_data_type", q_data_type)
    if q_dt not in FLOAT_DTYPES:
        raise ValueError(f"q_data_type must be float16, bfloat16 or float32, got {q_dt}")
    kv_dt = q_dt if kv_data_type is None else _dtype("kv_data_type", kv_data_type)
    if kv_dt not in (q_dt, *_FP8_KV):
        raise ValueError(f"kv_data_type must be q_data_type ({q_dt}), float8_e4m3fn or "
                         f"float8_e5m2, got {kv_dt}")
    o_dt = q_dt if o_data_type is None else _dtype("o_data_type", o_data_type)
    if o_dt not in FLOAT_DTYPES:
        raise ValueError(f"o_data_type must be float16, bfloat16 or float32, got {o_dt}")
    return q_dt, kv_dt, o_dt


def _plan_heads(num_qo_heads: object, num_kv_heads: object, head_dim: object,
                head_dim_vo: object = None) -> tuple[int, int, int]:
    hq = _int("num_qo_heads", num_qo_heads, 1)
    hkv = _int("num_kv_heads", num_kv_heads, 1)
    d = _int("head_dim", head_dim, 1)
    if hq % hkv:
        raise ValueError(f"num_qo_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    if head_dim_vo is not None and _int("head_dim_vo", head_dim_vo, 1) != d:
        raise ValueError(f"head_dim_vo ({head_dim_vo}) must equal head_dim_qk ({d}): "
                         f"minikernels' attention uses one head dim for q, k and v")
    return hq, hkv, d


def _check_q(q: object, rows: int | None, hq: int, d: int, dtype: torch.dtype,
             device: torch.device) -> Tensor:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, device=device)
    assert isinstance(q, Tensor)
    check_shape("q", q, [rows, hq, d])
    _check_planned("q", q, dtype, "q_data_type")
    return q


class _Wrapper:
    """What FlashInfer's attention wrappers share: the workspace and the kv layout."""

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str, use_cuda_graph: bool,
                 jit_args: object) -> None:
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        self._kv_layout = _check_kv_layout(kv_layout)
        if use_cuda_graph:
            raise ValueError("use_cuda_graph=True is not supported by minikernels' FlashInfer "
                             "compat layer: plan() builds new block tables, so a captured "
                             "run() would read stale ones")
        _refuse(jit_args=jit_args)
        self._float_workspace_buffer = float_workspace_buffer
        self.device = float_workspace_buffer.device
        self._planned = False

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return False

    def reset_workspace_buffer(self, float_workspace_buffer: Tensor,
                               int_workspace_buffer: Tensor | None = None) -> None:
        """FlashInfer's; the buffers are not used (the ops allocate their own)."""
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        self._float_workspace_buffer = float_workspace_buffer

    def _require_plan(self) -> None:
        if not self._planned:
            raise RuntimeError(f"{type(self).__name__}.plan() must be called before run()")

    def end_forward(self) -> None:
        """FlashInfer's deprecated no-op."""


# --------------------------------------------------------------------------- attention


class _Rows:
    """Where FlashInfer places each query row: its request ``batch``, its ``index`` i among
    the request's qo_len queries and the request's ``kv_len``; it sits at ``position``
    kv_len - qo_len + i (the queries are the last tokens of the kv; decode: kv_len - 1).
    Device int64 tensors [total_q] from cu_seqlens_q / cu_seqlens_k [B + 1], no host sync."""

    def __init__(self, cu_q: Tensor, cu_k: Tensor, total_q: int) -> None:
        self.batch, self.index = _segment_positions(cu_q, total_q)
        q_lens = (cu_q[1:] - cu_q[:-1]).long()
        self.kv_len = (cu_k[1:] - cu_k[:-1]).long()[self.batch]
        self.position = self.index + self.kv_len - q_lens[self.batch]


@functools.lru_cache(maxsize=64)
def _alibi_slopes(num_heads: int, device: torch.device) -> Tensor:
    """FlashInfer's ``get_alibi_slopes(num_qo_heads)``, float32 [num_heads]: with n the
    largest power of two <= num_heads, 2^(-8k/n) for k = 1..n, then 2^(-4(2k-1)/n) for
    k = 1..num_heads - n (ALiBi's slopes). Cached per device (FlashInfer caches it too)."""
    n = 2 ** math.floor(math.log2(num_heads))
    m = torch.pow(2.0 ** (-8.0 / n), torch.arange(1, 1 + n))
    if n < num_heads:
        m_hat = torch.pow(2.0 ** (-4.0 / n), torch.arange(1, 1 + 2 * (num_heads - n), 2))
        m = torch.cat([m, m_hat])
    return m.float().to(device)


def _alibi(pe: _PosEncoding, num_qo_heads: int, sinks: Tensor | None, device: torch.device
           ) -> Tensor | None:
    """The ops' ``alibi_slopes`` for pos_encoding_mode (None unless "ALIBI")."""
    if not pe.alibi:
        return None
    if sinks is not None:
        raise ValueError("sinks are not supported with pos_encoding_mode='ALIBI' by "
                         "minikernels' FlashInfer compat layer (FlashInfer's bias moves the "
                         "keys' scores relative to the sink differently from the ops')")
    return _alibi_slopes(num_qo_heads, device)


def _alibi_lse(lse_e: Tensor, slopes: Tensor, reference: Tensor) -> Tensor:
    """The ops' ALiBi bias is slope * (j - ref) for the visible keys j of a row (ref: the
    query's position; the last key in decode), FlashInfer's slope * (j - i) (i: the row's
    index among its request's queries, 0 in decode): the softmax is the same, the natural
    LSE [rows, H] moves by slope * (ref - i); ``reference`` [rows] = ref - i."""
    return lse_e + reference.to(lse_e.dtype)[:, None] * slopes[None, :]


def _alibi_rows(q: Tensor, k: Tensor, v: Tensor, cu_k: Tensor, max_k: int,
                block_table: Tensor | None, rows: _Rows, *, scale: float, window_left: int,
                soft_cap: float, slopes: Tensor, k_scale: Tensor | None,
                v_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Non-causal ALiBi. FlashInfer's bias slope * (j - i) is signed: keys after the query
    raise its score, where the ops' bias is -slope * |position - j|. Each query row runs
    as its own decode (``ops.paged_decode_attention``) over all its request's keys, where
    the ops' bias is slope * (j - (kv_len - 1)), a per-row constant away from FlashInfer's.
    Paged k / v: each row takes its request's block-table row; ragged k / v [total_k, Hkv,
    D] are read as pages of one token (an int32 [total_q, max_kv_len] table). A window
    would start at a different key in every row, which the decode op cannot take:
    refused. Returns (out [total_q, Hq, D], natural LSE [total_q, Hq], FlashInfer's)."""
    if window_left >= 0:
        raise ValueError("window_left >= 0 is not supported with pos_encoding_mode='ALIBI' "
                         "and causal=False by minikernels' FlashInfer compat layer (use "
                         "causal=True or window_left=-1)")
    if block_table is None:                      # ragged keys as pages of one token
        cols = torch.arange(max(max_k, 1), device=q.device)
        block_table = (cu_k[:-1, None].long() + cols).clamp_(max=max(k.shape[0] - 1, 0))
        block_table = block_table.to(torch.int32)
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    out, lse = ops.paged_decode_attention(
        q, k, v, block_table[rows.batch], rows.kv_len.to(torch.int32), softmax_scale=scale,
        softcap=soft_cap, return_lse=True, k_scale=k_scale, v_scale=v_scale,
        alibi_slopes=slopes)
    return out, _alibi_lse(lse, slopes, rows.kv_len - 1 - rows.index)


def _attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
               max_k: int, pe: _PosEncoding, *, causal: bool, scale: float,
               window_left: int, soft_cap: float, block_table: Tensor | None = None,
               k_scale: Tensor | None = None, v_scale: Tensor | None = None,
               sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prefill attention (:func:`minikernels.ops.flash_attention`) with FlashInfer's
    ``pos_encoding_mode``. q [total_q, Hq, D]; k / v ragged [total_k, Hkv, D] (NHD views),
    or with ``block_table`` paged block views [blocks, block_size, Hkv, D]; request b's
    queries are the last of its cu_k[b+1] - cu_k[b] keys (bottom-right causal).

    ROPE_LLAMA (ragged k only: paged caches are gathered first, ``_PageTable.caches(...,
    gather=True)``): copies of q and k are rotated, query row i at kv_len - qo_len + i, key
    j at j (its index in its request's keys). ALIBI: causal rows see keys j <= position,
    where the ops' bias slope * (j - position) is FlashInfer's slope * (j - i) moved by a
    per-row constant (the LSE is moved back); non-causal rows: :func:`_alibi_rows`.
    Returns (out [total_q, Hq, D] in q.dtype, natural LSE [total_q, Hq] of FlashInfer's
    scores).
    """
    slopes = _alibi(pe, q.shape[1], sinks, q.device)
    rows = _Rows(cu_q, cu_k, q.shape[0]) if pe.rope or pe.alibi else None
    if pe.rope:
        assert rows is not None and block_table is None
        q = _rope_llama(q, rows.position, pe)
        k = _rope_llama(k, _segment_positions(cu_k, k.shape[0])[1], pe)
    if slopes is not None and not causal:
        assert rows is not None
        return _alibi_rows(q, k, v, cu_k, max_k, block_table, rows, scale=scale,
                           window_left=window_left, soft_cap=soft_cap, slopes=slopes,
                           k_scale=k_scale, v_scale=v_scale)
    out, lse = ops.flash_attention(
        q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale,
        window_left=window_left, softcap=soft_cap, block_table=block_table,
        return_lse=True, k_scale=k_scale, v_scale=v_scale, alibi_slopes=slopes, sinks=sinks)
    lse = lse.t()
    if slopes is not None:
        assert rows is not None
        lse = _alibi_lse(lse, slopes, rows.position - rows.index)
    return out, lse


def _single(q3: Tensor, k: Tensor, v: Tensor, kv_layout: str, causal: bool,
            window_left: object, soft_cap: float, scale: float, pe: _PosEncoding
            ) -> tuple[Tensor, Tensor]:
    """One request: q [L, Hq, D], k / v in kv_layout -> (out [L, Hq, D], natural lse
    [L, Hq]) (:func:`_attention`)."""
    check_tensor("k", k, dtypes=(q3.dtype,), ndim=3, device=q3.device)
    check_tensor("v", v, dtypes=(q3.dtype,), ndim=3, device=q3.device)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    k, v = _kv_nhd(k, kv_layout), _kv_nhd(v, kv_layout)
    if k.shape[2] != q3.shape[2]:
        raise ValueError(f"k head_dim ({k.shape[2]}) must equal q's ({q3.shape[2]}) "
                         f"(kv_layout={kv_layout!r})")
    lq, lk = q3.shape[0], k.shape[0]
    cu_q = torch.tensor([0, lq], dtype=torch.int32, device=q3.device)
    cu_k = torch.tensor([0, lk], dtype=torch.int32, device=q3.device)
    return _attention(q3, k, v, cu_q, cu_k, lq, lk, pe, causal=bool(causal), scale=scale,
                      window_left=_window(window_left), soft_cap=soft_cap)


def single_decode_with_kv_cache(q: Tensor, k: Tensor, v: Tensor, kv_layout: str = "NHD",
                                pos_encoding_mode: str = "NONE",
                                use_tensor_cores: bool = False,
                                q_scale: float | None = None, k_scale: float | None = None,
                                v_scale: float | None = None, window_left: int = -1,
                                logits_soft_cap: float | None = None,
                                sm_scale: float | None = None,
                                rope_scale: float | None = None,
                                rope_theta: float | None = None,
                                return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Decode attention of one request: q [num_qo_heads, head_dim] over its k / v.

    k, v: [kv_len, num_kv_heads, head_dim] (NHD) or [num_kv_heads, kv_len, head_dim] (HND),
    q's dtype (fp16 / bf16 / fp32), any strides with a contiguous last dim. The query
    sits after every key (sees all of them; ``window_left`` >= 0 keeps the last
    window_left + 1). Scores are ``q.k * sm_scale * q_scale * k_scale`` (default sm_scale
    1/sqrt(head_dim)), soft-capped to ``cap * tanh(s / cap)``; the output is multiplied by
    ``v_scale``. Returns out [num_qo_heads, head_dim] in q.dtype, and with return_lse the
    base-2 LSE [num_qo_heads] fp32. ``use_tensor_cores`` has no effect.

    ``pos_encoding_mode`` (FlashInfer's, applied inside attention): "ROPE_LLAMA" rotates
    copies of q (at kv_len - 1) and k (key j at j) with ``rope_scale`` (default 1) and
    ``rope_theta`` (default 1e4), pairs (i, i + head_dim / 2), the caller's k unchanged;
    "ALIBI" adds FlashInfer's bias slope_h * j to key j's score (slopes
    ``get_alibi_slopes(num_qo_heads)``; the LSE is FlashInfer's), not with
    ``logits_soft_cap``.
    """
    cap = _soft_cap(logits_soft_cap)
    pe = _PosEncoding(pos_encoding_mode, rope_scale, rope_theta, cap)
    kv_layout = _check_kv_layout(kv_layout)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=2)
    ks, vs = _number("k_scale", k_scale), _number("v_scale", v_scale)
    scale = _softmax_scale(sm_scale, q.shape[-1], _number("q_scale", q_scale), ks)
    # the query sits after every key: causal attention is the same (and ALiBi's exact path)
    out, lse = _single(q.unsqueeze(0), k, v, kv_layout, True, window_left, cap, scale, pe)
    return _finish(out[0], lse[0], return_lse, v_scale=vs)


def single_prefill_with_kv_cache(q: Tensor, k: Tensor, v: Tensor,
                                 custom_mask: Tensor | None = None,
                                 packed_custom_mask: Tensor | None = None,
                                 causal: bool = False, kv_layout: str = "NHD",
                                 pos_encoding_mode: str = "NONE",
                                 use_fp16_qk_reduction: bool = False,
                                 sm_scale: float | None = None, window_left: int = -1,
                                 logits_soft_cap: float | None = None,
                                 rope_scale: float | None = None,
                                 rope_theta: float | None = None, return_lse: bool = False,
                                 *, scale_q: Tensor | None = None,
                                 scale_k: Tensor | None = None,
                                 scale_v: Tensor | None = None,
                                 o_dtype: torch.dtype | None = None, backend: str = "auto",
                                 k_scale: float | None = None, v_scale: float | None = None
                                 ) -> Tensor | tuple[Tensor, Tensor]:
    """Prefill / append attention of one request: q [qo_len, num_qo_heads, head_dim].

    k, v: [kv_len, num_kv_heads, head_dim] (NHD) or [num_kv_heads, kv_len, head_dim] (HND)
    of q's dtype, any strides with a contiguous last dim. ``causal`` is bottom-right
    aligned (query i sits at position i + kv_len - qo_len and sees keys j <= that;
    a query that sees no key gets 0 and LSE -inf); ``window_left`` >= 0 also drops keys
    before position - window_left. Scale, soft cap, ``k_scale`` / ``v_scale`` as in
    :func:`single_decode_with_kv_cache`; ``o_dtype`` casts the output. Returns out
    [qo_len, num_qo_heads, head_dim], and with return_lse the base-2 LSE
    [qo_len, num_qo_heads] fp32. Refused: custom masks, per-head fp8 ``scale_q`` /
    ``scale_k`` / ``scale_v``.

    ``pos_encoding_mode`` (FlashInfer's, applied inside attention): "ROPE_LLAMA" rotates
    copies of q (query i at kv_len - qo_len + i) and k (key j at j) with ``rope_scale``
    (default 1) and ``rope_theta`` (default 1e4), pairs (i, i + head_dim / 2), the
    caller's k unchanged; "ALIBI" adds FlashInfer's bias slope_h * (j - i) to the score of
    query i and key j (slopes ``get_alibi_slopes(num_qo_heads)``; signed: with
    causal=False later keys gain; the LSE is FlashInfer's), not with ``logits_soft_cap``,
    nor with a window when causal=False.
    """
    _refuse_masks(custom_mask, packed_custom_mask)
    _refuse(scale_q=scale_q, scale_k=scale_k, scale_v=scale_v)
    cap = _soft_cap(logits_soft_cap)
    pe = _PosEncoding(pos_encoding_mode, rope_scale, rope_theta, cap)
    kv_layout = _check_kv_layout(kv_layout)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    ks, vs = _number("k_scale", k_scale), _number("v_scale", v_scale)
    scale = _softmax_scale(sm_scale, q.shape[-1], None, ks)
    out, lse = _single(q, k, v, kv_layout, causal, window_left, cap, scale, pe)
    o_dt = None if o_dtype is None else _dtype("o_dtype", o_dtype)
    return _finish(out, lse, return_lse, v_scale=vs, o_dtype=o_dt)


single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache,
                                                            return_lse=True)


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    """FlashInfer's batch decode over a paged KV cache (one query per request).

    ``plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
    page_size, *, ...)`` once per batch shape (request b owns pages
    ``indices[indptr[b]:indptr[b+1]]``, the last one holding ``last_page_len[b]`` tokens:
    kv_len = (num_pages - 1) * page_size + last_page_len), then ``run(q, paged_kv_cache)``
    per layer with q [batch_size, num_qo_heads, head_dim] of ``q_data_type``.
    paged_kv_cache: [num_pages, 2, page_size, Hkv, D] (NHD) / [num_pages, 2, Hkv,
    page_size, D] (HND), or a tuple of [num_pages, page_size, Hkv, D] / [num_pages, Hkv,
    page_size, D] (each with its own strides, last dim contiguous), of ``kv_data_type`` (q's
    dtype, float8_e4m3fn or float8_e5m2). Returns out [batch_size, num_qo_heads, head_dim] in
    ``o_data_type``, and with return_lse the base-2 LSE [batch_size, num_qo_heads] fp32.
    Runs :func:`minikernels.ops.paged_decode_attention`.

    ``plan(pos_encoding_mode=...)`` (FlashInfer's, applied inside attention): "ALIBI" adds
    FlashInfer's bias slope_h * j to key j's score (slopes
    ``get_alibi_slopes(num_qo_heads)``; the decode op's own bias is slope_h * (j - (kv_len
    - 1)), so the returned LSE is moved to FlashInfer's); not with ``logits_soft_cap`` or
    ``sinks``. "ROPE_LLAMA" (``rope_scale`` default 1, ``rope_theta`` default 1e4) rotates
    q at kv_len - 1 and each key at its index j in its request: a compat path that copies
    each run the planned requests' tokens out of the cache ([sum kv_len, Hkv, D], fp8
    cast to q's dtype), rotates the copies and attends over them with
    :func:`minikernels.ops.flash_attention` (one query per request, so the decode op's
    ``fixed_split_size`` / ``disable_split_kv`` do not apply); the cache is not written.
    """

    #: The page table's argument names in errors (the shared-prefix wrapper's differ).
    _arg_names: tuple[str, str, str] = ("indptr", "indices", "last_page_len")

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, use_tensor_cores: bool = False,
                 paged_kv_indptr_buffer: Tensor | None = None,
                 paged_kv_indices_buffer: Tensor | None = None,
                 paged_kv_last_page_len_buffer: Tensor | None = None, backend: str = "auto",
                 jit_args: list[Any] | None = None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, jit_args)
        self._use_tensor_cores = bool(use_tensor_cores)

    @property
    def use_tensor_cores(self) -> bool:
        return self._use_tensor_cores

    def plan(self, indptr: Tensor, indices: Tensor, last_page_len: Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, *,
             pos_encoding_mode: str = "NONE", window_left: int = -1,
             logits_soft_cap: float | None = None,
             q_data_type: str | torch.dtype | None = "float16",
             kv_data_type: str | torch.dtype | None = None,
             o_data_type: str | torch.dtype | None = None,
             data_type: str | torch.dtype | None = None, sm_scale: float | None = None,
             rope_scale: float | None = None, rope_theta: float | None = None,
             non_blocking: bool = True, block_tables: Tensor | None = None,
             seq_lens: Tensor | None = None, fixed_split_size: int | None = None,
             disable_split_kv: bool = False, q_len_per_req: int = 1) -> None:
        """Build the block table and lengths for a batch (one host sync).

        indptr int32/int64 [batch_size + 1] (non-decreasing), indices [indptr[-1]] page ids,
        last_page_len [batch_size] in [0, page_size] (0 only for a request without pages);
        on any device (copied to the workspace's). ``fixed_split_size`` (pages) runs the
        decode op with that many tokens per KV split (batch-invariant results);
        ``disable_split_kv`` runs one split per request.
        """
        self._planned = False                 # a plan() that raises leaves no stale plan
        pe_mode = _check_pos_encoding_mode(pos_encoding_mode)
        _refuse(block_tables=block_tables, seq_lens=seq_lens)
        if _int("q_len_per_req", q_len_per_req, 1) != 1:
            raise ValueError("q_len_per_req > 1 is not supported: decode takes one query per "
                             "request (use BatchPrefillWithPagedKVCacheWrapper)")
        hq, hkv, d = _plan_heads(num_qo_heads, num_kv_heads, head_dim)
        page_size = _int("page_size", page_size, 1)
        self._q_dt, self._kv_dt, self._o_dt = _plan_dtypes(q_data_type, kv_data_type,
                                                           o_data_type, data_type)
        self._window_left = _window(window_left)
        self._soft_cap = _soft_cap(logits_soft_cap)
        self._pe = _PosEncoding(pe_mode, rope_scale, rope_theta, self._soft_cap)
        self._sm_scale = None if sm_scale is None else check_positive_float("sm_scale",
                                                                            sm_scale)
        self._split_size = 0 if fixed_split_size is None else page_size * _int(
            "fixed_split_size", fixed_split_size, 1)
        self._num_splits = 1 if disable_split_kv else 0
        self._heads = (hq, hkv, d)
        self._table = _PageTable(self._arg_names, indptr, indices, last_page_len, page_size,
                                 self.device)
        self._planned = True

    begin_forward = plan

    def run(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor], *args: Any,
            q_scale: float | None = None, k_scale: float | None = None,
            v_scale: float | None = None, out: Tensor | None = None,
            lse: Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None,
            sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Decode attention for the planned batch; see the class docstring. ``out`` /
        ``lse`` are optional output buffers ([B, Hq, D] o_data_type / [B, Hq] fp32)."""
        self._require_plan()
        if args:
            raise ValueError("extra positional arguments (custom JIT kernels) are not "
                             "supported")
        hq, hkv, d = self._heads
        t, pe = self._table, self._pe
        q = _check_q(q, t.batch, hq, d, self._q_dt, self.device)
        kc, vc = t.caches(paged_kv_cache, self._kv_layout, q, hkv, self._kv_dt,
                          gather=pe.rope)
        op_ks, op_vs, ks, vs = _fp8_scales(kc, _number("k_scale", k_scale),
                                           _number("v_scale", v_scale))
        scale = _softmax_scale(self._sm_scale, d, _number("q_scale", q_scale), ks)
        wl = self._window_left if window_left is None else _window(window_left)
        if pe.rope:         # the gathered tokens, ragged: one query per request, at the end
            cu_q = torch.arange(t.batch + 1, dtype=torch.int32, device=q.device)
            o, lse_e = _attention(q, kc, vc, cu_q, t.cu_seqlens_k, 1, t.max_kv_len, pe,
                                  causal=True, scale=scale, window_left=wl,
                                  soft_cap=self._soft_cap, sinks=sinks)
        else:
            slopes = _alibi(pe, hq, sinks, q.device)
            o, lse_e = ops.paged_decode_attention(
                q, kc, vc, t.block_table, t.seq_lens, softmax_scale=scale, window_left=wl,
                softcap=self._soft_cap, num_splits=self._num_splits,
                split_size=self._split_size, return_lse=True, k_scale=op_ks, v_scale=op_vs,
                alibi_slopes=slopes, sinks=sinks)
            if slopes is not None:                   # FlashInfer's bias: slope * (j - 0)
                lse_e = _alibi_lse(lse_e, slopes, t.seq_lens - 1)
        return _finish(o, lse_e, return_lse, v_scale=vs, o_dtype=self._o_dt, out_buf=out,
                       lse_buf=lse)

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                pos_encoding_mode: str = "NONE", q_scale: float | None = None,
                k_scale: float | None = None, v_scale: float | None = None,
                window_left: int = -1, logits_soft_cap: float | None = None,
                sm_scale: float | None = None, rope_scale: float | None = None,
                rope_theta: float | None = None) -> Tensor:
        """FlashInfer's deprecated form: these arguments replace the planned ones."""
        return self._forward(q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale,
                             v_scale, window_left, logits_soft_cap, sm_scale, rope_scale,
                             rope_theta, False)  # type: ignore[return-value]

    def forward_return_lse(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                           pos_encoding_mode: str = "NONE", q_scale: float | None = None,
                           k_scale: float | None = None, v_scale: float | None = None,
                           window_left: int = -1, logits_soft_cap: float | None = None,
                           sm_scale: float | None = None, rope_scale: float | None = None,
                           rope_theta: float | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` returning (out, base-2 lse) (FlashInfer's deprecated form)."""
        return self._forward(q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale,
                             v_scale, window_left, logits_soft_cap, sm_scale, rope_scale,
                             rope_theta, True)  # type: ignore[return-value]

    def _forward(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                 pos_encoding_mode: str, q_scale: float | None, k_scale: float | None,
                 v_scale: float | None, window_left: int, logits_soft_cap: float | None,
                 sm_scale: float | None, rope_scale: float | None, rope_theta: float | None,
                 return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
        pe_mode = _check_pos_encoding_mode(pos_encoding_mode)
        self._require_plan()
        wl, cap = _window(window_left), _soft_cap(logits_soft_cap)
        pe = _PosEncoding(pe_mode, rope_scale, rope_theta, cap)
        scale = None if sm_scale is None else check_positive_float("sm_scale", sm_scale)
        self._window_left, self._soft_cap, self._sm_scale, self._pe = wl, cap, scale, pe
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale,
                        v_scale=v_scale, return_lse=return_lse)

class _PrefillPlan:
    """The planned masks and scales of a prefill wrapper."""

    def __init__(self, qo_indptr: object, batch: int, device: torch.device, causal: object,
                 pos_encoding_mode: object, window_left: object, logits_soft_cap: object,
                 sm_scale: object, custom_mask: object, packed_custom_mask: object,
                 qo_name: str = "qo_indptr", *, rope_scale: float | None = None,
                 rope_theta: float | None = None) -> None:
        _refuse_masks(custom_mask, packed_custom_mask)
        pe_mode = _check_pos_encoding_mode(pos_encoding_mode)
        check_tensor(qo_name, qo_indptr, dtypes=_INT_DTYPES, ndim=1)
        assert isinstance(qo_indptr, Tensor)
        check_shape(qo_name, qo_indptr, [batch + 1])
        q_h = qo_indptr.to("cpu", torch.int64)
        if int(q_h[0]) != 0 or bool((q_h[1:] < q_h[:-1]).any()):
            raise ValueError(f"{qo_name} must start at 0 and be non-decreasing")
        self.total_q = int(q_h[-1])
        self.max_q = int((q_h[1:] - q_h[:-1]).max()) if batch else 0
        self.cu_q = qo_indptr.to(device, torch.int32)
        self.causal = bool(causal)
        self.window_left = _window(window_left)
        self.soft_cap = _soft_cap(logits_soft_cap)
        self.pe = _PosEncoding(pe_mode, rope_scale, rope_theta, self.soft_cap)
        self.sm_scale = None if sm_scale is None else check_positive_float("sm_scale",
                                                                           sm_scale)

    def replace(self, causal: bool, pos_encoding_mode: str, window_left: int,
                logits_soft_cap: float | None, sm_scale: float | None,
                rope_scale: float | None, rope_theta: float | None) -> None:
        """FlashInfer's deprecated ``forward``: these replace the planned values (all
        checked before any is set)."""
        wl, cap = _window(window_left), _soft_cap(logits_soft_cap)
        pe = _PosEncoding(pos_encoding_mode, rope_scale, rope_theta, cap)
        scale = None if sm_scale is None else check_positive_float("sm_scale", sm_scale)
        self.causal, self.window_left, self.soft_cap = bool(causal), wl, cap
        self.sm_scale, self.pe = scale, pe


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    """FlashInfer's batch prefill / append attention over a paged KV cache.

    ``plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
    num_qo_heads, num_kv_heads, head_dim_qk, page_size, ...)``: request b has queries
    ``q[qo_indptr[b]:qo_indptr[b+1]]`` (the last tokens of its kv_len cached tokens: causal
    is bottom-right aligned) and pages as in :class:`BatchDecodeWithPagedKVCacheWrapper`.
    ``run(q, paged_kv_cache)`` with q [qo_indptr[-1], num_qo_heads, head_dim] returns out of
    q's shape in ``o_data_type``, and with return_lse the base-2 LSE
    [qo_indptr[-1], num_qo_heads] fp32. Cache layouts as the decode wrapper's. Runs
    :func:`minikernels.ops.flash_attention` with a block table.

    ``plan(pos_encoding_mode=...)`` (FlashInfer's, applied inside attention): "ALIBI" adds
    FlashInfer's bias slope_h * (j - i) to the score of query row i (its index among its
    request's queries) and key j (slopes ``get_alibi_slopes(num_qo_heads)``; the returned
    LSE is FlashInfer's); with causal=False the bias is signed (later keys gain), which the
    ops' -slope * |position - j| is not: each query row then runs as its own decode
    (``ops.paged_decode_attention`` over its request's block-table row), and a window is
    refused there. Not with ``logits_soft_cap`` or ``sinks``. "ROPE_LLAMA" (``rope_scale``
    default 1, ``rope_theta`` default 1e4) rotates query row i at kv_len - qo_len + i and
    key j at j: a compat path that copies each run the planned requests' tokens out of
    the cache ([sum kv_len, Hkv, D], fp8 cast to q's dtype), rotates the copies and
    attends over them ragged; the cache is not written.
    """

    #: The plan's argument names in errors (the cascade wrapper's name each level's).
    _arg_names: tuple[str, str, str, str] = ("qo_indptr", "paged_kv_indptr",
                                             "paged_kv_indices", "paged_kv_last_page_len")
    #: The run()'s cache argument in errors (:class:`BatchAttention` names it kv_cache).
    _cache_name: str = "paged_kv_cache"

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: Tensor | None = None,
                 paged_kv_indptr_buf: Tensor | None = None,
                 paged_kv_indices_buf: Tensor | None = None,
                 paged_kv_last_page_len_buf: Tensor | None = None,
                 custom_mask_buf: Tensor | None = None, mask_indptr_buf: Tensor | None = None,
                 backend: str = "auto", jit_args: list[Any] | None = None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, jit_args)

    def plan(self, qo_indptr: Tensor, paged_kv_indptr: Tensor, paged_kv_indices: Tensor,
             paged_kv_last_page_len: Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim_qk: int, page_size: int, head_dim_vo: int | None = None,
             custom_mask: Tensor | None = None, packed_custom_mask: Tensor | None = None,
             causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
             window_left: int = -1, logits_soft_cap: float | None = None,
             rope_scale: float | None = None, rope_theta: float | None = None,
             q_data_type: str | torch.dtype = "float16",
             kv_data_type: str | torch.dtype | None = None,
             o_data_type: str | torch.dtype | None = None, non_blocking: bool = True, *,
             prefix_len_ptr: Tensor | None = None, token_pos_in_items_ptr: Tensor | None = None,
             max_item_len_ptr: Tensor | None = None, seq_lens: Tensor | None = None,
             seq_lens_q: Tensor | None = None, block_tables: Tensor | None = None,
             fixed_split_size: int | None = None, disable_split_kv: bool = False) -> None:
        """Build the block table, cumulative lengths and max lengths (one host sync)."""
        self._planned = False
        _refuse(prefix_len_ptr=prefix_len_ptr, token_pos_in_items_ptr=token_pos_in_items_ptr,
                max_item_len_ptr=max_item_len_ptr, seq_lens=seq_lens, seq_lens_q=seq_lens_q,
                block_tables=block_tables)
        self._heads = _plan_heads(num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo)
        page_size = _int("page_size", page_size, 1)
        self._q_dt, self._kv_dt, self._o_dt = _plan_dtypes(q_data_type, kv_data_type,
                                                           o_data_type)
        qo_name, *table_names = self._arg_names
        self._table = _PageTable(tuple(table_names), paged_kv_indptr,  # type: ignore[arg-type]
                                 paged_kv_indices, paged_kv_last_page_len, page_size,
                                 self.device)
        self._plan = _PrefillPlan(qo_indptr, self._table.batch, self.device, causal,
                                  pos_encoding_mode, window_left, logits_soft_cap, sm_scale,
                                  custom_mask, packed_custom_mask, qo_name,
                                  rope_scale=rope_scale, rope_theta=rope_theta)
        self._planned = True

    begin_forward = plan

    def run(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor], *args: Any,
            q_scale: float | None = None, k_scale: float | None = None,
            v_scale: float | None = None, out: Tensor | None = None,
            lse: Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None,
            sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Prefill attention for the planned batch; see the class docstring."""
        self._require_plan()
        if args:
            raise ValueError("extra positional arguments (custom JIT kernels) are not "
                             "supported")
        hq, hkv, d = self._heads
        t, p = self._table, self._plan
        q = _check_q(q, p.total_q, hq, d, self._q_dt, self.device)
        kc, vc = t.caches(paged_kv_cache, self._kv_layout, q, hkv, self._kv_dt,
                          gather=p.pe.rope, cache_name=self._cache_name)
        op_ks, op_vs, ks, vs = _fp8_scales(kc, _number("k_scale", k_scale),
                                           _number("v_scale", v_scale))
        scale = _softmax_scale(p.sm_scale, d, _number("q_scale", q_scale), ks)
        wl = p.window_left if window_left is None else _window(window_left)
        o, lse_e = _attention(
            q, kc, vc, p.cu_q, t.cu_seqlens_k, p.max_q, t.max_kv_len, p.pe, causal=p.causal,
            scale=scale, window_left=wl, soft_cap=p.soft_cap,
            block_table=None if p.pe.rope else t.block_table, k_scale=op_ks, v_scale=op_vs,
            sinks=sinks)
        return _finish(o, lse_e, return_lse, v_scale=vs, o_dtype=self._o_dt, out_buf=out,
                       lse_buf=lse)

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, k_scale: float | None = None,
                v_scale: float | None = None, window_left: int = -1,
                logits_soft_cap: float | None = None, sm_scale: float | None = None,
                rope_scale: float | None = None, rope_theta: float | None = None) -> Tensor:
        """FlashInfer's deprecated form: ``causal``, ``pos_encoding_mode``,
        ``window_left``, ``logits_soft_cap``, ``sm_scale``, ``rope_scale`` and
        ``rope_theta`` replace the planned ones."""
        return self._forward(q, paged_kv_cache, causal, pos_encoding_mode, k_scale, v_scale,
                             window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta,
                             False)  # type: ignore[return-value]

    def forward_return_lse(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                           causal: bool = False, pos_encoding_mode: str = "NONE",
                           use_fp16_qk_reduction: bool = False, k_scale: float | None = None,
                           v_scale: float | None = None, window_left: int = -1,
                           logits_soft_cap: float | None = None,
                           sm_scale: float | None = None, rope_scale: float | None = None,
                           rope_theta: float | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` returning (out, base-2 lse) (FlashInfer's deprecated form)."""
        return self._forward(q, paged_kv_cache, causal, pos_encoding_mode, k_scale, v_scale,
                             window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta,
                             True)  # type: ignore[return-value]

    def _forward(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                 causal: bool, pos_encoding_mode: str, k_scale: float | None,
                 v_scale: float | None, window_left: int, logits_soft_cap: float | None,
                 sm_scale: float | None, rope_scale: float | None, rope_theta: float | None,
                 return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
        _check_pos_encoding_mode(pos_encoding_mode)
        self._require_plan()
        self._plan.replace(causal, pos_encoding_mode, window_left, logits_soft_cap, sm_scale,
                           rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale,
                        return_lse=return_lse)


class BatchPrefillWithRaggedKVCacheWrapper(_Wrapper):
    """FlashInfer's batch prefill attention over ragged (not paged) k / v.

    ``plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, ...)``: request b
    has queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` and keys ``k[kv_indptr[b]:kv_indptr[b+1]]``
    (both indptrs start at 0). ``run(q, k, v)``: q [qo_indptr[-1], Hq, D]; k, v
    [kv_indptr[-1], Hkv, D] (NHD) or [Hkv, kv_indptr[-1], D] (HND), q's dtype, any strides
    with a contiguous last dim. Returns out of q's shape in ``o_data_type``, and with
    return_lse the base-2 LSE [qo_indptr[-1], Hq] fp32. Runs
    :func:`minikernels.ops.flash_attention`.

    ``plan(pos_encoding_mode=...)``: "ALIBI" as in
    :class:`BatchPrefillWithPagedKVCacheWrapper` (causal=False: each query row a decode
    over its request's keys read as pages of one token, an int32 [qo_indptr[-1],
    max kv_len] table); "ROPE_LLAMA" rotates copies of q (query row i at kv_len - qo_len
    + i) and k (key j of a request at j), the caller's k unchanged.
    """

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: Tensor | None = None,
                 kv_indptr_buf: Tensor | None = None, custom_mask_buf: Tensor | None = None,
                 mask_indptr_buf: Tensor | None = None, backend: str = "auto",
                 jit_args: list[Any] | None = None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, jit_args)

    def plan(self, qo_indptr: Tensor, kv_indptr: Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, head_dim_vo: int | None = None,
             custom_mask: Tensor | None = None, packed_custom_mask: Tensor | None = None,
             causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, window_left: int = -1,
             logits_soft_cap: float | None = None, sm_scale: float | None = None,
             rope_scale: float | None = None, rope_theta: float | None = None,
             q_data_type: str | torch.dtype = "float16",
             kv_data_type: str | torch.dtype | None = None,
             o_data_type: str | torch.dtype | None = None, non_blocking: bool = True, *,
             prefix_len_ptr: Tensor | None = None, token_pos_in_items_ptr: Tensor | None = None,
             max_item_len_ptr: Tensor | None = None, fixed_split_size: int | None = None,
             disable_split_kv: bool = False, seq_lens: Tensor | None = None,
             seq_lens_q: Tensor | None = None) -> None:
        """Copy the indptrs to the device as int32 and find the max lengths (one sync)."""
        self._planned = False
        _refuse(prefix_len_ptr=prefix_len_ptr, token_pos_in_items_ptr=token_pos_in_items_ptr,
                max_item_len_ptr=max_item_len_ptr, seq_lens=seq_lens, seq_lens_q=seq_lens_q)
        self._heads = _plan_heads(num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo)
        self._q_dt, self._kv_dt, self._o_dt = _plan_dtypes(q_data_type, kv_data_type,
                                                           o_data_type)
        if self._kv_dt != self._q_dt:
            raise ValueError(f"kv_data_type must equal q_data_type ({self._q_dt}) for ragged "
                             f"k / v (fp8 is for paged caches), got {self._kv_dt}")
        check_tensor("kv_indptr", kv_indptr, dtypes=_INT_DTYPES, ndim=1)
        if kv_indptr.numel() < 1:
            raise ValueError("kv_indptr must have batch_size + 1 >= 1 entries")
        batch = kv_indptr.numel() - 1
        k_h = kv_indptr.to("cpu", torch.int64)
        if int(k_h[0]) != 0 or bool((k_h[1:] < k_h[:-1]).any()):
            raise ValueError("kv_indptr must start at 0 and be non-decreasing")
        self._total_k = int(k_h[-1])
        self._max_k = int((k_h[1:] - k_h[:-1]).max()) if batch else 0
        self._cu_k = kv_indptr.to(self.device, torch.int32)
        self._plan = _PrefillPlan(qo_indptr, batch, self.device, causal, pos_encoding_mode,
                                  window_left, logits_soft_cap, sm_scale, custom_mask,
                                  packed_custom_mask, rope_scale=rope_scale,
                                  rope_theta=rope_theta)
        self._planned = True

    begin_forward = plan

    def run(self, q: Tensor, k: Tensor, v: Tensor, *args: Any, q_scale: float | None = None,
            k_scale: float | None = None, v_scale: float | None = None,
            out: Tensor | None = None, lse: Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None,
            sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Prefill attention for the planned batch; see the class docstring."""
        self._require_plan()
        if args:
            raise ValueError("extra positional arguments (custom JIT kernels) are not "
                             "supported")
        hq, hkv, d = self._heads
        p = self._plan
        q = _check_q(q, p.total_q, hq, d, self._q_dt, self.device)
        layout = self._kv_layout
        want = [self._total_k, hkv, d] if layout == "NHD" else [hkv, self._total_k, d]
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtypes=(q.dtype,), ndim=3, device=q.device)
            check_shape(name, t, want)
        ks, vs = _number("k_scale", k_scale), _number("v_scale", v_scale)
        scale = _softmax_scale(p.sm_scale, d, _number("q_scale", q_scale), ks)
        wl = p.window_left if window_left is None else _window(window_left)
        o, lse_e = _attention(
            q, _kv_nhd(k, layout), _kv_nhd(v, layout), p.cu_q, self._cu_k, p.max_q,
            self._max_k, p.pe, causal=p.causal, scale=scale, window_left=wl,
            soft_cap=p.soft_cap, sinks=sinks)
        return _finish(o, lse_e, return_lse, v_scale=vs, o_dtype=self._o_dt, out_buf=out,
                       lse_buf=lse)

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                window_left: int = -1, logits_soft_cap: float | None = None,
                sm_scale: float | None = None, rope_scale: float | None = None,
                rope_theta: float | None = None) -> Tensor:
        """FlashInfer's deprecated form: ``causal``, ``pos_encoding_mode``,
        ``window_left``, ``logits_soft_cap``, ``sm_scale``, ``rope_scale`` and
        ``rope_theta`` replace the planned ones."""
        return self._forward(q, k, v, causal, pos_encoding_mode, window_left,
                             logits_soft_cap, sm_scale, rope_scale, rope_theta,
                             False)  # type: ignore[return-value]

    def forward_return_lse(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                           pos_encoding_mode: str = "NONE",
                           use_fp16_qk_reduction: bool = False, window_left: int = -1,
                           logits_soft_cap: float | None = None,
                           sm_scale: float | None = None, rope_scale: float | None = None,
                           rope_theta: float | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` returning (out, base-2 lse) (FlashInfer's deprecated form)."""
        return self._forward(q, k, v, causal, pos_encoding_mode, window_left,
                             logits_soft_cap, sm_scale, rope_scale, rope_theta,
                             True)  # type: ignore[return-value]

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, pos_encoding_mode: str,
                 window_left: int, logits_soft_cap: float | None, sm_scale: float | None,
                 rope_scale: float | None, rope_theta: float | None,
                 return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
        _check_pos_encoding_mode(pos_encoding_mode)
        self._require_plan()
        self._plan.replace(causal, pos_encoding_mode, window_left, logits_soft_cap, sm_scale,
                           rope_scale, rope_theta)
        return self.run(q, k, v, return_lse=return_lse)


# ------------------------------------------------------------------ unified attention


class BatchAttention:
    """FlashInfer's unified batch attention (``flashinfer.BatchAttention``, its persistent
    "holistic" kernel): one ``plan`` / ``run`` for a batch that mixes decode and prefill
    requests over a paged KV cache.

    ``BatchAttention(kv_layout="NHD", device="cuda")``, then ``plan(qo_indptr, kv_indptr,
    kv_indices, kv_len_arr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo,
    page_size, causal=False, sm_scale=None, logits_soft_cap=None,
    q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, use_profiler=False)``:
    request b has the queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` (one for a decode
    request; the last tokens of its keys: ``causal`` is bottom-right aligned) and
    ``kv_len_arr[b]`` cached tokens, token j in page ``kv_indices[kv_indptr[b] + j //
    page_size]`` at slot ``j % page_size``. ``kv_len_arr`` takes the place of the other
    wrappers' ``last_page_len`` (= kv_len - (ceil(kv_len / page_size) - 1) * page_size);
    pages listed beyond ceil(kv_len / page_size) are not read (FlashInfer's kernel reads
    only the tokens below kv_len), fewer pages than that is a ValueError naming
    ``kv_len_arr``. indptrs / indices / lengths int32 or int64 on any device.

    ``run(q, kv_cache, out=None, lse=None, k_scale=None, v_scale=None,
    logits_soft_cap=0.0, profiler_buffer=None, kv_cache_sf=None)`` returns ``(out, lse)``:
    q [qo_indptr[-1], num_qo_heads, head_dim_qk] of ``q_data_type`` (float16 / bfloat16 /
    float32); kv_cache [num_pages, 2, page_size, Hkv, D] (NHD) / [num_pages, 2, Hkv,
    page_size, D] (HND), or a ``(k_cache, v_cache)`` tuple of [num_pages, page_size, Hkv,
    D] / [num_pages, Hkv, page_size, D] (each its own strides, last dim contiguous), of
    ``kv_data_type`` (q's dtype, float8_e4m3fn or float8_e5m2); out [qo_indptr[-1],
    num_qo_heads, head_dim_vo] in q's dtype, lse the base-2 log-sum-exp [qo_indptr[-1],
    num_qo_heads] float32, as FlashInfer's; ``out`` / ``lse`` buffers are written in place
    and returned. Scores are ``q.k * sm_scale * k_scale`` (sm_scale default
    1/sqrt(head_dim_qk)), the output is multiplied by ``v_scale`` (fp8 caches: the ops
    dequantize with them; numbers or 1-element tensors). FlashInfer's kernel takes
    ``run()``'s ``logits_soft_cap`` (``plan()``'s only builds the capped variant): a cap in
    ``run`` without one in ``plan`` is FlashInfer's ValueError, and ``run`` without a cap
    after a capped ``plan`` (a zero cap in FlashInfer's capped kernel) is refused too.

    A thin layer over :class:`BatchPrefillWithPagedKVCacheWrapper` (its page table,
    layouts, cache forms, GQA / MQA, fp8 caches and checks; ``ops.flash_attention`` with a
    block table); errors name this API's arguments. Refused by name: ``use_profiler=True``,
    ``head_dim_vo != head_dim_qk``, ``kv_cache_sf`` (NVFP4 caches); ``profiler_buffer`` is
    ignored, as FlashInfer ignores it without the profiler. Unlike FlashInfer's (head dims
    <= 256), any head dim the ops take, [1, 512].
    """

    def __init__(self, kv_layout: str = "NHD", device: str | torch.device = "cuda") -> None:
        _check_kv_layout(kv_layout)
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device name such as "
                             f"'cuda', 'cuda:0' or 'cpu', got {device!r}") from None
        #: FlashInfer's attribute; unused (the ops allocate their own scratch).
        self.float_workspace_buffer = torch.empty(1, dtype=torch.uint8, device=dev)
        self._prefill = BatchPrefillWithPagedKVCacheWrapper(self.float_workspace_buffer,
                                                            kv_layout)
        self._prefill._arg_names = ("qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr")
        self._prefill._cache_name = "kv_cache"
        self._kv_layout = kv_layout
        self.device = self._prefill.device
        self._planned = False
        self._soft_cap = 0.0

    def plan(self, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
             kv_len_arr: Tensor, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: int, page_size: int, causal: bool = False,
             sm_scale: float | None = None, logits_soft_cap: float | None = None,
             q_data_type: str | torch.dtype = torch.bfloat16,
             kv_data_type: str | torch.dtype = torch.bfloat16,
             use_profiler: bool = False) -> None:
        """Turn ``kv_len_arr`` into last-page lengths (one host sync: kv_indptr and
        kv_len_arr together) and plan the paged prefill over them."""
        self._planned = False
        if use_profiler:
            raise ValueError("use_profiler=True is not supported by minikernels' FlashInfer "
                             "compat layer (FlashInfer's profiler build of its persistent "
                             "kernel has no counterpart here)")
        _int("head_dim_qk", head_dim_qk, 1)
        page_size = _int("page_size", page_size, 1)
        check_tensor("kv_indptr", kv_indptr, dtypes=_INT_DTYPES, ndim=1)
        check_tensor("kv_indices", kv_indices, dtypes=_INT_DTYPES, ndim=1)
        check_tensor("kv_len_arr", kv_len_arr, dtypes=_INT_DTYPES, ndim=1)
        if kv_indptr.numel() < 1:
            raise ValueError("kv_indptr must have batch_size + 1 >= 1 entries")
        batch = kv_indptr.numel() - 1
        check_shape("kv_len_arr", kv_len_arr, [batch])
        host = torch.cat([kv_indptr.long(), kv_len_arr.to(kv_indptr.device).long()]).cpu()
        ptr_h, len_h = host[:batch + 1], host[batch + 1:]
        pages_h = ptr_h[1:] - ptr_h[:-1]
        if bool((pages_h < 0).any()):
            raise ValueError("kv_indptr must be non-decreasing")
        if int(ptr_h[0]) < 0 or int(ptr_h[-1]) > kv_indices.numel():
            raise ValueError(f"kv_indptr values must be in [0, len(kv_indices) = "
                             f"{kv_indices.numel()}], got {int(ptr_h[0])}..{int(ptr_h[-1])}")
        if bool((len_h < 0).any()):
            raise ValueError(f"kv_len_arr values must be >= 0, got {len_h.tolist()}")
        need_h = (len_h + page_size - 1) // page_size
        short = (need_h > pages_h).nonzero()
        if short.numel():
            b = int(short[0])
            raise ValueError(f"kv_len_arr[{b}] = {int(len_h[b])} tokens need "
                             f"{int(need_h[b])} pages of page_size {page_size}, but kv_indptr "
                             f"gives request {b} {int(pages_h[b])}")
        last_h = len_h - (need_h - 1).clamp(min=0) * page_size     # 0 for an empty request
        indptr, indices = ptr_h, kv_indices
        if bool((need_h != pages_h).any()):       # drop the pages past each kv_len
            indptr = torch.cat([need_h.new_zeros(1), need_h.cumsum(0)])
            b_of, j = _segment_positions(indptr, int(indptr[-1]))
            indices = kv_indices[(ptr_h[b_of] + j).to(kv_indices.device)]
        self._prefill.plan(qo_indptr, indptr, indices, last_h, num_qo_heads, num_kv_heads,
                           head_dim_qk, page_size, head_dim_vo=head_dim_vo, causal=causal,
                           sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                           q_data_type=q_data_type, kv_data_type=kv_data_type)
        self._soft_cap = self._prefill._plan.soft_cap
        self._planned = True

    def run(self, q: Tensor, kv_cache: Tensor | tuple[Tensor, Tensor],
            out: Tensor | None = None, lse: Tensor | None = None,
            k_scale: float | Tensor | None = None, v_scale: float | Tensor | None = None,
            logits_soft_cap: float | None = 0.0, profiler_buffer: Tensor | None = None,
            kv_cache_sf: Tensor | tuple[Tensor, Tensor] | None = None
            ) -> tuple[Tensor, Tensor]:
        """Attention for the planned batch: (out, base-2 lse); see the class docstring."""
        if not self._planned:
            raise RuntimeError("BatchAttention.plan() must be called before run()")
        _refuse(kv_cache_sf=kv_cache_sf)
        cap = _soft_cap(logits_soft_cap)
        if cap > 0 and self._soft_cap <= 0:
            raise ValueError(f"logits_soft_cap={cap} in run() but plan() was given none: "
                             f"pass it to plan() too (FlashInfer builds its kernel with or "
                             f"without the cap at plan time)")
        if cap <= 0 < self._soft_cap:
            raise ValueError(f"logits_soft_cap is 0 in run() but plan() was given "
                             f"logits_soft_cap={self._soft_cap}: FlashInfer's kernel takes "
                             f"run()'s value (a zero cap there divides by zero); pass the "
                             f"cap to run() as well")
        self._prefill._plan.soft_cap = cap
        result = self._prefill.run(q, kv_cache, k_scale=k_scale, v_scale=v_scale, out=out,
                                   lse=lse, return_lse=True)
        assert isinstance(result, tuple)
        return result


class BatchAttentionWithAttentionSinkWrapper(BatchPrefillWithPagedKVCacheWrapper):
    """FlashInfer's paged prefill / decode with attention sinks (GPT-OSS): its
    :class:`BatchPrefillWithPagedKVCacheWrapper` with a sink logit per q head.

    ``__init__`` takes the prefill wrapper's arguments plus FlashInfer's build settings
    ``pos_encoding_mode``, ``use_fp16_qk_reduction``, ``q_data_type``, ``kv_data_type``,
    ``head_dim_qk``, ``head_dim_vo`` and ``window_left`` (checked; the ops need no build, so
    ``plan()``'s values govern, as FlashInfer's run checks q and the cache against
    them). ``plan`` is the prefill wrapper's. ``run(q, paged_kv_cache, sink, sm_scale, *,
    ...)``: FlashInfer passes the sink variant's extra inputs positionally: ``sink``
    float [num_qo_heads] (one more logit per q head in the units of the scaled scores:
    ``softmax([s_1 .. s_n, sink])`` without a value for the sink; the returned base-2 lse
    includes it) and ``sm_scale`` (the scale the sink kernel uses; None keeps the
    planned one). ``sinks=`` (the prefill wrapper's keyword) is taken in place of
    ``sink``. Other keywords, layouts, returns as the prefill wrapper's.

    Refused by name: ``pos_encoding_mode`` other than "NONE" (at construction or in plan)
    and ``logits_soft_cap`` in plan (FlashInfer's sink variant has neither),
    ``backend`` other than "fa2" / "fa3" / "auto", and the prefill wrapper's refusals.
    """

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: Tensor | None = None,
                 paged_kv_indptr_buf: Tensor | None = None,
                 paged_kv_indices_buf: Tensor | None = None,
                 paged_kv_last_page_len_buf: Tensor | None = None,
                 custom_mask_buf: Tensor | None = None, mask_indptr_buf: Tensor | None = None,
                 backend: str = "auto", pos_encoding_mode: str = "NONE",
                 use_fp16_qk_reduction: bool = False,
                 q_data_type: str | torch.dtype = torch.bfloat16,
                 kv_data_type: str | torch.dtype = torch.bfloat16, head_dim_qk: int = 128,
                 head_dim_vo: int = 128, window_left: int = -1) -> None:
        if backend not in ("fa2", "fa3", "auto"):
            raise ValueError(f"backend must be 'fa2', 'fa3' or 'auto' (FlashInfer's sink "
                             f"variants), got {backend!r}")
        if _check_pos_encoding_mode(pos_encoding_mode) != "NONE":
            raise ValueError(self._no_pos_encoding(pos_encoding_mode))
        _plan_dtypes(q_data_type, kv_data_type, None)
        _plan_heads(1, 1, _int("head_dim_qk", head_dim_qk, 1), head_dim_vo)
        _window(window_left)
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf,
                         paged_kv_indptr_buf, paged_kv_indices_buf,
                         paged_kv_last_page_len_buf, custom_mask_buf, mask_indptr_buf,
                         backend)

    @staticmethod
    def _no_pos_encoding(mode: object) -> str:
        return (f"pos_encoding_mode={mode!r} is not supported by "
                f"BatchAttentionWithAttentionSinkWrapper (FlashInfer's sink variant applies "
                f"no position encoding): use 'NONE'")

    @functools.wraps(BatchPrefillWithPagedKVCacheWrapper.plan)
    def plan(self, *args: Any, **kwargs: Any) -> None:
        """The prefill wrapper's ``plan``; refuses ``logits_soft_cap`` > 0 and
        ``pos_encoding_mode`` other than "NONE" (the sink variant has neither)."""
        super().plan(*args, **kwargs)
        if self._plan.pe.mode != "NONE":
            self._planned = False
            raise ValueError(self._no_pos_encoding(self._plan.pe.mode))
        if self._plan.soft_cap > 0:
            self._planned = False
            raise ValueError("logits_soft_cap is not supported by "
                             "BatchAttentionWithAttentionSinkWrapper (FlashInfer's sink "
                             "variant has no soft cap): leave it None or 0")

    begin_forward = plan

    def run(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
            sink: Tensor | None = None, sm_scale: float | None = None, *,
            q_scale: float | None = None, k_scale: float | None = None,
            v_scale: float | None = None, out: Tensor | None = None,
            lse: Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None,
            sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Prefill / decode with sinks for the planned batch; see the class docstring."""
        self._require_plan()
        if sink is not None and sinks is not None:
            raise ValueError("pass the sinks once: sink (positional, FlashInfer's) or sinks=")
        name = "sink" if sinks is None else "sinks"
        sink = sink if sinks is None else sinks
        if sink is None:
            raise ValueError("sink is required: run(q, paged_kv_cache, sink, sm_scale) with "
                             "sink float [num_qo_heads]")
        check_tensor(name, sink, dtypes=FLOAT_DTYPES, ndim=1, device=self.device)
        check_shape(name, sink, [self._heads[0]])
        planned = self._plan.sm_scale
        if sm_scale is not None:
            self._plan.sm_scale = check_positive_float("sm_scale", sm_scale)
        try:
            return super().run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale,
                               v_scale=v_scale, out=out, lse=lse, return_lse=return_lse,
                               window_left=window_left, sinks=sink)
        finally:
            self._plan.sm_scale = planned

    run_return_lse = functools.partialmethod(run, return_lse=True)



# ------------------------------------------------------------------------------- pages


def get_seq_lens(kv_indptr: Tensor, kv_last_page_len: Tensor, page_size: int) -> Tensor:
    """Per-request kv lengths: max(num_pages - 1, 0) * page_size + last_page_len
    (FlashInfer's formula), same dtype and device as the inputs."""
    return (torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0) * page_size
            + kv_last_page_len)


def get_batch_indices_positions(append_indptr: Tensor, seq_lens: Tensor, nnz: int
                                ) -> tuple[Tensor, Tensor]:
    """Ragged appended tokens -> (batch_indices, positions), int32 [nnz] each.

    append_indptr int32/int64 [batch_size + 1]: request b appends tokens
    append_indptr[b]:append_indptr[b+1]; seq_lens [batch_size]: its kv length with them, so
    they sit at the last positions seq_lens[b] - n_b .. seq_lens[b] - 1. Vectorized, no
    host sync (nnz must equal append_indptr[-1], checked when index checks are on).
    """
    check_tensor("append_indptr", append_indptr, dtypes=_INT_DTYPES, ndim=1)
    if append_indptr.numel() < 1:
        raise ValueError("append_indptr must have batch_size + 1 >= 1 entries")
    check_tensor("seq_lens", seq_lens, dtypes=_INT_DTYPES, ndim=1)
    batch = append_indptr.numel() - 1
    check_shape("seq_lens", seq_lens, [batch])
    nnz = _int("nnz", nnz, 0)
    dev = append_indptr.device
    if index_checks_active(append_indptr) and int(append_indptr[-1]) != nnz:
        raise ValueError(f"nnz ({nnz}) must equal append_indptr[-1] "
                         f"({int(append_indptr[-1])})")
    ptr = append_indptr.long()
    batch_idx, index = _segment_positions(ptr, nnz)
    counts = ptr[1:] - ptr[:-1]
    positions = index + seq_lens.to(dev).long()[batch_idx] - counts[batch_idx]
    return batch_idx.to(torch.int32), positions.to(torch.int32)


def append_paged_kv_cache(append_key: Tensor, append_value: Tensor, batch_indices: Tensor,
                          positions: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor],
                          kv_indices: Tensor, kv_indptr: Tensor, kv_last_page_len: Tensor,
                          kv_layout: str = "NHD") -> None:
    """Write ragged keys / values into a paged cache, in place.

    append_key, append_value [nnz, num_kv_heads, head_dim] (any strides); token t goes to
    request batch_indices[t] at position positions[t]: page
    ``kv_indices[kv_indptr[b] + pos // page_size]``, slot ``pos % page_size``. The page
    table (kv_indptr, kv_indices, kv_last_page_len) already includes the appended tokens.
    paged_kv_cache as in :class:`BatchDecodeWithPagedKVCacheWrapper` (the cache's dtype, or
    float8_e4m3fn / float8_e5m2: values are cast with saturation at +-448 / +-57344). Runs
    :func:`minikernels.ops.write_kv_cache`.
    """
    kv_layout = _check_kv_layout(kv_layout)
    check_tensor("append_key", append_key, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("append_value", append_value, dtypes=(append_key.dtype,), ndim=3,
                 device=append_key.device)
    check_shape("append_value", append_value, list(append_key.shape))
    nnz, dev = append_key.shape[0], append_key.device
    for name, t in (("batch_indices", batch_indices), ("positions", positions)):
        check_tensor(name, t, dtypes=_INT_DTYPES, ndim=1, device=dev)
        check_shape(name, t, [nnz])
    for name, t in (("kv_indices", kv_indices), ("kv_indptr", kv_indptr),
                    ("kv_last_page_len", kv_last_page_len)):
        check_tensor(name, t, dtypes=_INT_DTYPES, ndim=1, device=dev)
    batch = kv_indptr.numel() - 1
    if batch < 0:
        raise ValueError("kv_indptr must have batch_size + 1 >= 1 entries")
    check_shape("kv_last_page_len", kv_last_page_len, [batch])
    k, v = _unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    page = k.shape[1]
    for name, c in (("paged_kv_cache (k)", k), ("paged_kv_cache (v)", v)):
        check_tensor(name, c, dtypes=(append_key.dtype, *_FP8_KV), device=dev)
        check_shape(name, c, [k.shape[0], page, append_key.shape[1], append_key.shape[2]])
    ptr = kv_indptr.long()
    b = batch_indices.long()
    if index_checks_active(b):
        check_index_range("batch_indices", b, 0, batch)
        seq = get_seq_lens(ptr, kv_last_page_len.long(), page)[b]
        if bool(((positions < 0) | (positions >= seq)).any()):
            raise ValueError("positions must be in [0, kv length of their request) (the page "
                             "table must already include the appended tokens)")
    pos = positions.long()
    slots = kv_indices.long()[ptr[b] + pos // page] * page + pos % page
    sub = _sub_blocks(page)
    kb, vb = _as_blocks(k, sub, kv_layout), _as_blocks(v, sub, kv_layout)
    scale = (torch.ones(1, dtype=torch.float32, device=dev) if k.dtype in _FP8_KV else None)
    ops.write_kv_cache(append_key, append_value, kb, vb, slots, k_scale=scale, v_scale=scale)


# ----------------------------------------------------------------------------- cascade


def _check_state(names: tuple[str, str], v: object, s: object, v_ref: Tensor | None = None
                 ) -> None:
    check_tensor(names[0], v, dtypes=FLOAT_DTYPES if v_ref is None else (v_ref.dtype,),
                 ndim=3, device=None if v_ref is None else v_ref.device)
    assert isinstance(v, Tensor)
    if v_ref is not None:
        check_shape(names[0], v, list(v_ref.shape))
    check_tensor(names[1], s, dtypes=FLOAT_DTYPES, device=v.device)
    check_shape(names[1], s, list(v.shape[:2]))  # type: ignore[arg-type]


def merge_state(v_a: Tensor, s_a: Tensor, v_b: Tensor, s_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two attention states over disjoint key sets (FlashInfer's cascade).

    v_* [seq_len, num_heads, head_dim] (fp16 / bf16 / fp32), s_* [seq_len, num_heads]
    base-2 LSE (as this module's attention returns). Returns (v [seq_len, num_heads,
    head_dim] in v_a's dtype, s [seq_len, num_heads] fp32 base 2); a state with LSE -inf
    contributes nothing. Runs :func:`minikernels.ops.merge_attn_states` (natural-log LSE:
    converted exactly at the boundary).
    """
    _check_state(("v_a", "s_a"), v_a, s_a)
    _check_state(("v_b", "s_b"), v_b, s_b, v_a)
    v, lse = ops.merge_attn_states(v_a, s_a.float() * LN2, v_b, s_b.float() * LN2)
    return v, lse * LOG2E


def merge_state_in_place(v: Tensor, s: Tensor, v_other: Tensor, s_other: Tensor,
                         mask: Tensor | None = None) -> None:
    """``(v, s) <- merge_state(v, s, v_other, s_other)`` in place (s must be fp32);
    ``mask`` bool [seq_len]: merge only the rows where it is True."""
    _check_state(("v", "s"), v, s)
    check_tensor("s", s, dtypes=(torch.float32,))
    _check_state(("v_other", "s_other"), v_other, s_other, v)
    merged_v, merged_s = merge_state(v, s, v_other, s_other)
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), ndim=1, device=v.device)
        check_shape("mask", mask, [v.shape[0]])
        merged_v = torch.where(mask[:, None, None], merged_v, v)
        merged_s = torch.where(mask[:, None], merged_s, s)
    v.copy_(merged_v)
    s.copy_(merged_s)


def merge_states(v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Merge num_states attention states per row: v [seq_len, num_states, num_heads,
    head_dim], s [seq_len, num_states, num_heads] base-2 LSE -> (v [seq_len, num_heads,
    head_dim] in v's dtype, s [seq_len, num_heads] fp32 base 2). Plain PyTorch, fp32 math;
    states with LSE -inf contribute nothing (all -inf: v 0, s -inf)."""
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("s", s, dtypes=FLOAT_DTYPES, device=v.device)
    check_shape("s", s, list(v.shape[:3]))
    lse = s.float() * LN2                                   # natural log
    total = torch.logsumexp(lse, dim=1)                      # [seq, H]
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    w = torch.exp(lse - safe[:, None])                       # 0 for -inf states
    out = (w[..., None] * v.float()).sum(dim=1)
    return out.to(v.dtype), total * LOG2E


def _level_list(name: str, value: object, num_levels: int) -> list[object]:
    """One of the cascade plan's per-level lists (list or tuple, one item per level)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list with one tensor per level, got "
                        f"{type(value).__name__}")
    if len(value) != num_levels:
        raise ValueError(f"{name} must have num_levels = {num_levels} items, got {len(value)}")
    return list(value)


def _check_stride_variant(variant: object) -> None:
    if variant != "independent":
        raise ValueError(f"variant must be 'independent' (FlashInfer's only paged-KV-stride "
                         f"variant), got {variant!r}")


class MultiLevelCascadeAttentionWrapper:
    """FlashInfer's multi-level cascade attention over one paged KV cache.

    Each level is a :class:`BatchPrefillWithPagedKVCacheWrapper` over its own CSR page
    table into the same cache; level i groups the queries with its own ``qo_indptr``
    (e.g. level 0: all queries in one group over the shared prefix's pages, the last
    level: one group per request over its own pages). ``plan(qo_indptr_arr,
    paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len, num_qo_heads,
    num_kv_heads, head_dim, page_size, ...)`` takes one tensor per level in each list
    (every ``qo_indptr_arr[i][-1]`` is the number of queries); ``causal`` applies to the
    last level only (bottom-right within each of its requests; the other levels see all
    their keys, as FlashInfer plans them), ``window_left`` / ``logits_soft_cap`` /
    ``sm_scale`` to every level. ``run(q, paged_kv_cache)``: q [qo_indptr_arr[i][-1],
    num_qo_heads, head_dim] of ``q_data_type``, the cache in any form the prefill wrapper
    takes (NHD / HND, one [num_pages, 2, ...] tensor or a (k_cache, v_cache) tuple). Returns
    out of q's shape and dtype: the last level's attention state merged with each other
    level's (base-2 LSE, :func:`merge_state`, in FlashInfer's order), i.e. attention over
    the union of a query's keys on all levels. A query with no key on a level (a request
    without pages there) takes nothing from it. The ``*_buf_arr`` arguments (FlashInfer's
    CUDA-graph buffers) are accepted and unused; ``use_cuda_graph=True`` is refused.
    ``pos_encoding_mode`` / ``rope_scale`` / ``rope_theta`` go to every level, as
    FlashInfer plans them: RoPE angles and ALiBi distances count within each level's own
    keys (a level's query row i at that level's kv_len - qo_len + i); with "ALIBI" the
    non-causal upper levels take the per-row decode path (no ``window_left`` there).
    """

    def __init__(self, num_levels: int, float_workspace_buffer: Tensor,
                 kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf_arr: list[Tensor] | None = None,
                 paged_kv_indptr_buf_arr: list[Tensor] | None = None,
                 paged_kv_indices_buf_arr: list[Tensor] | None = None,
                 paged_kv_last_page_len_buf_arr: list[Tensor] | None = None) -> None:
        self._num_levels = _int("num_levels", num_levels, 1)
        self._batch_prefill_wrappers = [
            BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout,
                                                use_cuda_graph)
            for _ in range(self._num_levels)]
        for i, w in enumerate(self._batch_prefill_wrappers):
            w._arg_names = (f"qo_indptr_arr[{i}]", f"paged_kv_indptr_arr[{i}]",
                            f"paged_kv_indices_arr[{i}]", f"paged_kv_last_page_len[{i}]")
        self._kv_layout = kv_layout
        self._planned = False

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return False

    def reset_workspace_buffer(self, float_workspace_buffer: Tensor,
                               int_workspace_buffers: list[Tensor]) -> None:
        """FlashInfer's: one int buffer per level; the buffers are not used."""
        buffers = _level_list("int_workspace_buffers", int_workspace_buffers,
                              self._num_levels)
        for w, buf in zip(self._batch_prefill_wrappers, buffers):
            w.reset_workspace_buffer(float_workspace_buffer, buf)  # type: ignore[arg-type]

    def plan(self, qo_indptr_arr: list[Tensor], paged_kv_indptr_arr: list[Tensor],
             paged_kv_indices_arr: list[Tensor], paged_kv_last_page_len: list[Tensor],
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
             window_left: int = -1, logits_soft_cap: float | None = None,
             rope_scale: float | None = None, rope_theta: float | None = None,
             q_data_type: str | torch.dtype = "float16",
             kv_data_type: str | torch.dtype | None = None) -> None:
        """Plan every level (one host sync each). Errors name the level's list item, e.g.
        ``paged_kv_indptr_arr[1]``."""
        self._planned = False
        n = self._num_levels
        levels = zip(self._batch_prefill_wrappers,
                     _level_list("qo_indptr_arr", qo_indptr_arr, n),
                     _level_list("paged_kv_indptr_arr", paged_kv_indptr_arr, n),
                     _level_list("paged_kv_indices_arr", paged_kv_indices_arr, n),
                     _level_list("paged_kv_last_page_len", paged_kv_last_page_len, n))
        for i, (w, qo, ptr, idx, last) in enumerate(levels):
            w.plan(qo, ptr, idx, last, num_qo_heads, num_kv_heads,  # type: ignore[arg-type]
                   head_dim, page_size, causal=bool(causal) if i == n - 1 else False,
                   pos_encoding_mode=pos_encoding_mode,
                   use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale,
                   window_left=window_left, logits_soft_cap=logits_soft_cap,
                   rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                   kv_data_type=kv_data_type)
        totals = [w._plan.total_q for w in self._batch_prefill_wrappers]
        if len(set(totals)) > 1:
            raise ValueError(f"qo_indptr_arr[i][-1] (the number of queries) must be the same "
                             f"on every level, got {totals}")
        self._planned = True

    begin_forward = plan

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """FlashInfer's (before CUDA-graph capture); nothing to prewarm here."""
        _check_stride_variant(variant)

    def run(self, q: Tensor, paged_kv_cache: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Cascade attention for the planned levels; see the class docstring."""
        if not self._planned:
            raise RuntimeError("MultiLevelCascadeAttentionWrapper.plan() must be called "
                               "before run()")
        *upper, last = self._batch_prefill_wrappers
        out, lse = last.run(q, paged_kv_cache, return_lse=True)
        for w in upper:
            out_i, lse_i = w.run(q, paged_kv_cache, return_lse=True)
            out, lse = merge_state(out, lse, out_i, lse_i)
        return out

    forward = run


def _check_shared_kv(k_shared: object, v_shared: object, kv_layout: str, num_kv_heads: int
                     ) -> None:
    """The shared prefix's k / v: [len, Hkv, D] (NHD) or [Hkv, len, D] (HND)."""
    dim = 1 if kv_layout == "NHD" else 0
    for name, t in (("k_shared", k_shared), ("v_shared", v_shared)):
        check_tensor(name, t, ndim=3)
        assert isinstance(t, Tensor)
        if t.shape[dim] != num_kv_heads:
            raise ValueError(f"{name} must have num_kv_heads = {num_kv_heads} heads in dim "
                             f"{dim} (kv_layout={kv_layout!r}), got shape {list(t.shape)}")


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """FlashInfer's (deprecated in favour of :class:`MultiLevelCascadeAttentionWrapper`)
    batch decode over a shared prefix held in its own k / v tensors plus each request's
    paged unique suffix.

    ``begin_forward(unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len,
    num_qo_heads, num_kv_heads, head_dim, page_size, data_type="float16")`` plans the
    suffixes (``data_type``: q's and the cache's dtype). ``forward(q, k_shared, v_shared,
    unique_kv_cache)``: q [batch_size, num_qo_heads, head_dim]; k_shared / v_shared
    [shared_len, num_kv_heads, head_dim] (NHD) or [num_kv_heads, shared_len, head_dim]
    (HND), q's dtype; unique_kv_cache as the decode wrapper's paged cache. Every query
    attends to the whole prefix and to its request's suffix (default scale 1/sqrt(head_dim),
    no window or soft cap, as FlashInfer's); the two states are merged with
    :func:`merge_state`. Returns out [batch_size, num_qo_heads, head_dim] in q's dtype.
    """

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str = "NHD") -> None:
        self._batch_decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer,
                                                                        kv_layout)
        self._batch_decode_wrapper._arg_names = ("unique_kv_indptr", "unique_kv_indices",
                                                 "unique_kv_last_page_len")
        self._kv_layout = kv_layout

    def reset_workspace_buffer(self, float_workspace_buffer: Tensor,
                               int_workspace_buffer: Tensor | None = None) -> None:
        """FlashInfer's; the buffers are not used."""
        self._batch_decode_wrapper.reset_workspace_buffer(float_workspace_buffer,
                                                          int_workspace_buffer)

    def begin_forward(self, unique_kv_indptr: Tensor, unique_kv_indices: Tensor,
                      unique_kv_last_page_len: Tensor, num_qo_heads: int, num_kv_heads: int,
                      head_dim: int, page_size: int,
                      data_type: str | torch.dtype = "float16") -> None:
        """Plan the unique suffixes (one host sync)."""
        dt = _dtype("data_type", data_type)
        if dt not in FLOAT_DTYPES:
            raise ValueError(f"data_type must be float16, bfloat16 or float32, got {dt}")
        self._batch_decode_wrapper.plan(unique_kv_indptr, unique_kv_indices,
                                        unique_kv_last_page_len, num_qo_heads, num_kv_heads,
                                        head_dim, page_size, q_data_type=dt, kv_data_type=dt)

    def forward(self, q: Tensor, k_shared: Tensor, v_shared: Tensor,
                unique_kv_cache: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Decode attention over the shared prefix and each request's suffix."""
        w = self._batch_decode_wrapper
        w._require_plan()
        _check_shared_kv(k_shared, v_shared, w._kv_layout, w._heads[1])
        out_u, lse_u = w.forward_return_lse(q, unique_kv_cache)
        out_s, lse_s = single_prefill_with_kv_cache(
            q, k_shared, v_shared, causal=False, kv_layout=w._kv_layout,
            sm_scale=w._sm_scale, return_lse=True)  # type: ignore[misc]
        return merge_state(out_s, lse_s, out_u, lse_u)[0]


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper:
    """FlashInfer's (deprecated in favour of :class:`MultiLevelCascadeAttentionWrapper`)
    batch prefill / append over a shared prefix held in its own k / v tensors plus each
    request's paged unique suffix.

    ``begin_forward(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
    num_qo_heads, num_kv_heads, head_dim, page_size)`` plans the suffixes as
    :class:`BatchPrefillWithPagedKVCacheWrapper`. ``forward(q, k_shared, v_shared,
    unique_kv_cache, causal=False, use_fp16_qk_reduction=False, sm_scale=None, ...)``: q
    [qo_indptr[-1], num_qo_heads, head_dim] (fp16 / bf16 / fp32; FlashInfer plans float16
    and refuses other dtypes, here the dtype is q's); k_shared / v_shared [shared_len,
    num_kv_heads, head_dim] (NHD) or [num_kv_heads, shared_len, head_dim] (HND) and the
    unique cache in q's dtype. Every query attends to the whole prefix; ``causal``
    (bottom-right) applies within its request's suffix. The two states are merged with
    :func:`merge_state`. Returns out of q's shape and dtype.
    """

    def __init__(self, float_workspace_buffer: Tensor, kv_layout: str = "NHD") -> None:
        self._batch_prefill_wrapper = BatchPrefillWithPagedKVCacheWrapper(
            float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout

    def reset_workspace_buffer(self, float_workspace_buffer: Tensor,
                               int_workspace_buffer: Tensor | None = None) -> None:
        """FlashInfer's; the buffers are not used."""
        self._batch_prefill_wrapper.reset_workspace_buffer(float_workspace_buffer,
                                                           int_workspace_buffer)

    def begin_forward(self, qo_indptr: Tensor, paged_kv_indptr: Tensor,
                      paged_kv_indices: Tensor, paged_kv_last_page_len: Tensor,
                      num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int) -> None:
        """Plan the unique suffixes (one host sync)."""
        self._batch_prefill_wrapper.plan(qo_indptr, paged_kv_indptr, paged_kv_indices,
                                         paged_kv_last_page_len, num_qo_heads, num_kv_heads,
                                         head_dim, page_size)

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """FlashInfer's (before CUDA-graph capture); nothing to prewarm here."""
        _check_stride_variant(variant)

    def forward(self, q: Tensor, k_shared: Tensor, v_shared: Tensor,
                unique_kv_cache: Tensor | tuple[Tensor, Tensor], causal: bool = False,
                use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
                rope_scale: float | None = None, rope_theta: float | None = None) -> Tensor:
        """Prefill attention over the shared prefix and each request's suffix."""
        w = self._batch_prefill_wrapper
        w._require_plan()
        check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
        _check_shared_kv(k_shared, v_shared, w._kv_layout, w._heads[1])
        w._q_dt = w._kv_dt = w._o_dt = q.dtype       # begin_forward has no dtype argument
        out_u, lse_u = w.forward_return_lse(q, unique_kv_cache, causal=causal,
                                            sm_scale=sm_scale)
        out_s, lse_s = single_prefill_with_kv_cache(
            q, k_shared, v_shared, causal=False, kv_layout=w._kv_layout, sm_scale=sm_scale,
            return_lse=True)  # type: ignore[misc]
        return merge_state(out_s, lse_s, out_u, lse_u)[0]


# ---------------------------------------------------------------- norms and activations


def _check_norm(input: object, weight: object) -> Tensor:
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    assert isinstance(input, Tensor)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=input.device)
    check_shape("weight", weight, [input.shape[-1]])  # type: ignore[arg-type]
    return input


def _norm(input: Tensor, weight: Tensor, eps: float, out: Tensor | None,
          offset: float) -> Tensor:
    y = ops.rms_norm(_check_norm(input, weight), weight, eps, weight_offset=offset)
    return y if out is None else _copy_into("out", out, y)  # type: ignore[arg-type]


def _fused_add_norm(input: Tensor, residual: Tensor, weight: Tensor, eps: float,
                    offset: float) -> None:
    _check_norm(input, weight)
    check_tensor("residual", residual, dtypes=(input.dtype,), device=input.device)
    check_shape("residual", residual, list(input.shape))
    y, h = ops.rms_norm(input, weight, eps, residual=residual, weight_offset=offset)
    residual.copy_(h)
    input.copy_(y)


def rmsnorm(input: Tensor, weight: Tensor, eps: float = 1e-6, out: Tensor | None = None,
            enable_pdl: bool | None = None) -> Tensor:
    """``input / sqrt(mean(input^2) + eps) * weight`` over the last dim; input [..., H]
    fp16 / bf16 / fp32 (any strides), weight [H]. Returns a new tensor in input's dtype, or
    writes ``out`` (like input) and returns it. fp32 math."""
    return _norm(input, weight, eps, out, 0.0)


def gemma_rmsnorm(input: Tensor, weight: Tensor, eps: float = 1e-6,
                  out: Tensor | None = None, enable_pdl: bool | None = None) -> Tensor:
    """Gemma's RMSNorm: as :func:`rmsnorm` with ``(1 + weight)``."""
    return _norm(input, weight, eps, out, 1.0)


def fused_add_rmsnorm(input: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6,
                      enable_pdl: bool | None = None) -> None:
    """In place, as FlashInfer: ``residual += input``, then ``input = rmsnorm(residual) *
    weight``. input, residual [..., H] of one dtype; the sum is rounded to that dtype
    (as stored in residual) before it is normalized."""
    _fused_add_norm(input, residual, weight, eps, 0.0)


def gemma_fused_add_rmsnorm(input: Tensor, residual: Tensor, weight: Tensor,
                            eps: float = 1e-6, enable_pdl: bool | None = None) -> None:
    """:func:`fused_add_rmsnorm` with Gemma's ``(1 + weight)``."""
    _fused_add_norm(input, residual, weight, eps, 1.0)


def _static_scale(scale: object, device: torch.device) -> Tensor:
    """FlashInfer's quantization scale: a float or a 1-element fp32 tensor -> fp32 [1]."""
    if isinstance(scale, Tensor):
        check_tensor("scale", scale, dtypes=(torch.float32,), device=device)
        if scale.numel() != 1:
            raise ValueError(f"scale must have 1 element, got shape {list(scale.shape)}")
        return scale.reshape(1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a 1-element tensor, got "
                        f"{type(scale).__name__}")
    return torch.tensor([float(scale)], dtype=torch.float32, device=device)


def _check_fp8_out(name: str, out: object, like: Tensor, shape: list[int]) -> None:
    check_tensor(name, out, dtypes=(torch.float8_e4m3fn,), device=like.device)
    check_shape(name, out, shape)  # type: ignore[arg-type]


def rmsnorm_quant(out: Tensor, input: Tensor, weight: Tensor, scale: float | Tensor,
                  eps: float = 1e-6, enable_pdl: bool | None = None) -> None:
    """RMSNorm + static fp8 quantization into ``out`` (float8_e4m3fn like input):
    ``out = fp8(clamp(rmsnorm(input) * weight * (1 / scale), +-448))``
    (``ops.rms_norm_quant``, one kernel). The normed value is rounded to input's dtype
    first, as ``rmsnorm`` returns it; FlashInfer quantizes the fp32 value, so an element
    near an fp8 rounding boundary may differ by one fp8 step. input [..., H] fp16 / bf16
    / fp32, any strides; scale a float or a 1-element fp32 tensor."""
    _check_norm(input, weight)
    _check_fp8_out("out", out, input, list(input.shape))
    q, _ = ops.rms_norm_quant(input, weight, eps, torch.float8_e4m3fn,
                              scale=_static_scale(scale, input.device))
    out.copy_(q)


def fused_add_rmsnorm_quant(out: Tensor, input: Tensor, residual: Tensor, weight: Tensor,
                            scale: float | Tensor, eps: float = 1e-6,
                            enable_pdl: bool | None = None) -> None:
    """``residual += input`` (in place, rounded to its dtype), then ``out =
    fp8(clamp(rmsnorm(residual) * weight / scale))``; input is not written. Layouts as
    :func:`rmsnorm_quant`."""
    _check_norm(input, weight)
    check_tensor("residual", residual, dtypes=(input.dtype,), device=input.device)
    check_shape("residual", residual, list(input.shape))
    _check_fp8_out("out", out, input, list(input.shape))
    q, _, h = ops.rms_norm_quant(input, weight, eps, torch.float8_e4m3fn, residual=residual,
                                 scale=_static_scale(scale, input.device))
    residual.copy_(h)
    out.copy_(q)


def fused_add_rmsnorm_fp8_block_quant(out: Tensor, block_scale: Tensor, normed_out: Tensor,
                                      input: Tensor, residual: Tensor, weight: Tensor,
                                      eps: float = 1e-6,
                                      enable_pdl: bool | None = None) -> None:
    """``residual += input``; ``normed_out = rmsnorm(residual) * weight`` (input's dtype);
    ``out`` (float8_e4m3fn [B, H]) and ``block_scale`` its quantization per token and 128
    columns, dynamic (``max |normed| / 448`` per block, from the rounded normed values, so
    out equals re-quantizing normed_out). block_scale: fp32 [H / 128, round_up(B, 4)]
    (column-major, TMA-aligned: the logical [B, H / 128] scales are
    ``block_scale.t()[:B]``). input, residual [B, H], H a multiple of 128."""
    _check_norm(input, weight)
    check_tensor("input", input, dtypes=FLOAT_DTYPES, ndim=2)
    b, h = input.shape
    if h % 128:
        raise ValueError(f"input's hidden size must be a multiple of 128, got {h}")
    check_tensor("residual", residual, dtypes=(input.dtype,), device=input.device)
    check_shape("residual", residual, [b, h])
    _check_fp8_out("out", out, input, [b, h])
    check_tensor("normed_out", normed_out, dtypes=(input.dtype,), device=input.device)
    check_shape("normed_out", normed_out, [b, h])
    check_tensor("block_scale", block_scale, dtypes=(torch.float32,), device=input.device)
    check_shape("block_scale", block_scale, [h // 128, -(-b // 4) * 4])
    q, s, summed = ops.rms_norm_quant(input, weight, eps, torch.float8_e4m3fn,
                                      residual=residual, group_size=128)
    normed_out.copy_(ops.rms_norm(summed, weight, eps))
    residual.copy_(summed)
    out.copy_(q)
    block_scale.t()[:b].copy_(s)


def layernorm(input: Tensor, gemma: Tensor, beta: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim (FlashInfer's argument names: ``gemma`` the scale,
    ``beta`` the shift): ``(input - mean) / sqrt(var + eps) * gemma + beta``, biased
    variance, fp32 math, a new tensor in input's dtype (``ops.layer_norm``). input
    [..., H] (FlashInfer: 2-D bf16; here fp16 / bf16 / fp32, any strides), gemma / beta
    [H] (FlashInfer: fp32; here any float dtype)."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    for name, t in (("gemma", gemma), ("beta", beta)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=1, device=input.device)
        check_shape(name, t, [input.shape[-1]])
    return ops.layer_norm(input, gemma, beta, eps)  # type: ignore[return-value]


def _gated(kind: str, input: Tensor, out: Tensor | None) -> Tensor:
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    if input.shape[-1] % 2:
        raise ValueError(f"input last dim must be even (2 * hidden_size), got "
                         f"{input.shape[-1]}")
    y = (ops.silu_and_mul(input) if kind == "silu"
         else ops.gelu_and_mul(input, "tanh" if kind == "gelu_tanh" else "none"))
    return y if out is None else _copy_into("out", out, y)


def silu_and_mul(input: Tensor, out: Tensor | None = None,
                 enable_pdl: bool | None = None) -> Tensor:
    """``silu(input[..., :h]) * input[..., h:]``: input [..., 2h] -> [..., h] (or ``out``)."""
    return _gated("silu", input, out)


def gelu_tanh_and_mul(input: Tensor, out: Tensor | None = None,
                      enable_pdl: bool | None = None) -> Tensor:
    """``gelu_tanh(input[..., :h]) * input[..., h:]`` (tanh approximation)."""
    return _gated("gelu_tanh", input, out)


def gelu_and_mul(input: Tensor, out: Tensor | None = None,
                 enable_pdl: bool | None = None) -> Tensor:
    """``gelu(input[..., :h]) * input[..., h:]`` with the exact (erf) GELU, as FlashInfer."""
    return _gated("gelu", input, out)


# -------------------------------------------------------------------------------- rope


def _inv_freq(rotary_dim: int, rope_scale: float, rope_theta: float,
              llama31: tuple[float, float, float] | None, device: torch.device) -> Tensor:
    """FlashInfer's frequencies: theta^(-2i / rotary_dim) / rope_scale, or Llama 3.1's
    blend (low_freq_factor, high_freq_factor, old_context_len): smooth =
    clamp((old_context_len / wavelength - low) / (high - low), 0, 1), freq = (1 - smooth) *
    freq / rope_scale + smooth * freq."""
    rope_scale = check_positive_float("rope_scale", rope_scale)
    rope_theta = check_positive_float("rope_theta", rope_theta)
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    freq = rope_theta ** (-2.0 * i / rotary_dim)
    if llama31 is None:
        freq = freq / rope_scale
    else:
        low, high, old_len = llama31
        if high <= low:
            raise ValueError(f"high_freq_factor ({high}) must be > low_freq_factor ({low})")
        smooth = ((old_len * freq / (2 * math.pi) - low) / (high - low)).clamp(0.0, 1.0)
        freq = (1 - smooth) * freq / rope_scale + smooth * freq
    return freq.to(device, torch.float32)


def _rope(q: Tensor, k: Tensor, pos_ids: Tensor, rotary_dim: int | None, interleave: bool,
          rope_scale: float, rope_theta: float,
          llama31: tuple[float, float, float] | None = None) -> tuple[Tensor, Tensor]:
    """q [nnz, Hq, D], k [nnz, Hk, D] rotated at pos_ids [nnz]: cos / sin computed per
    token in fp32 (as FlashInfer's kernels) and handed to ops.rotary_embedding."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=3, device=q.device)
    check_tensor("pos_ids", pos_ids, dtypes=_INT_DTYPES, ndim=1, device=q.device)
    nnz, d = q.shape[0], q.shape[2]
    if k.shape[0] != nnz or k.shape[2] != d:
        raise ValueError(f"k must be [{nnz}, num_k_heads, {d}] like q, got {list(k.shape)}")
    check_shape("pos_ids", pos_ids, [nnz])
    if not isinstance(interleave, bool):
        raise TypeError(f"interleave must be a bool, got {type(interleave).__name__}")
    rot = d if rotary_dim is None else _int("rotary_dim", rotary_dim, 2)
    if rot % 2 or rot > d:
        raise ValueError(f"rotary_dim must be even and <= head_dim ({d}), got {rot}")
    cache = _rope_rows(pos_ids, rot, rope_scale, rope_theta, llama31)
    rows = torch.arange(nnz, device=q.device)
    return ops.rotary_embedding(q, k, rows, cache, is_neox_style=not interleave)


def _rope_rows(positions: Tensor, rotary_dim: int, rope_scale: float, rope_theta: float,
               llama31: tuple[float, float, float] | None = None) -> Tensor:
    """One cos / sin row per position: positions [n] -> fp32 [n, rotary_dim] (cos half,
    then sin half; ``ops.rotary_embedding``'s cache layout), angles position * freq
    computed in fp32 as FlashInfer's kernels do (:func:`_inv_freq`)."""
    freq = _inv_freq(rotary_dim, rope_scale, rope_theta, llama31, positions.device)
    angles = positions.float()[:, None] * freq               # [n, rotary_dim / 2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _rope_llama(x: Tensor, positions: Tensor, pe: _PosEncoding) -> Tensor:
    """FlashInfer's in-attention ROPE_LLAMA on a copy: x [n, H, D] rotated at positions [n]
    (int, may be negative), pairs (i, i + D/2) over the whole head (neox style), fp32 math,
    result in x's dtype. Runs ``ops.rotary_embedding``, which rotates a q / k pair sharing
    positions: x goes as q, a one-head view of it as k (that result is dropped)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"pos_encoding_mode='ROPE_LLAMA' needs an even head_dim (it rotates "
                         f"dims i and i + head_dim / 2), got {d}")
    cache = _rope_rows(positions, d, pe.rope_scale, pe.rope_theta)
    rows = torch.arange(x.shape[0], device=x.device)
    return ops.rotary_embedding(x, x[:, :1], rows, cache, is_neox_style=True)[0]


def _offsets_to_pos_ids(q: Tensor, indptr: Tensor, offsets: Tensor) -> Tensor:
    """Ragged (indptr, offsets) -> per-token positions offsets[b] + (t - indptr[b])."""
    check_tensor("indptr", indptr, dtypes=_INT_DTYPES, ndim=1, device=q.device)
    if indptr.numel() < 1:
        raise ValueError("indptr must have batch_size + 1 >= 1 entries")
    check_tensor("offsets", offsets, dtypes=_INT_DTYPES, ndim=1, device=q.device)
    check_shape("offsets", offsets, [indptr.numel() - 1])
    if index_checks_active(indptr) and int(indptr[-1]) != q.shape[0]:
        raise ValueError(f"indptr[-1] ({int(indptr[-1])}) must equal nnz = q.shape[0] "
                         f"({q.shape[0]})")
    b, index = _segment_positions(indptr, q.shape[0])
    return offsets.long()[b] + index


def _inplace(q: Tensor, k: Tensor, result: tuple[Tensor, Tensor]) -> None:
    q.copy_(result[0])
    k.copy_(result[1])


def apply_rope_pos_ids(q: Tensor, k: Tensor, pos_ids: Tensor, rotary_dim: int | None = None,
                       interleave: bool = False, rope_scale: float = 1,
                       rope_theta: float = 1e4) -> tuple[Tensor, Tensor]:
    """RoPE on q [nnz, num_q_heads, head_dim] and k [nnz, num_k_heads, head_dim] at
    positions pos_ids int32/int64 [nnz]; angle = pos * theta^(-2i / rotary_dim) /
    rope_scale. ``rotary_dim`` (default head_dim) first dims rotate: pairs (i, i +
    rotary_dim / 2), or (2i, 2i + 1) with ``interleave``. Returns new (q_rope, k_rope)."""
    return _rope(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta)


def apply_rope_pos_ids_inplace(q: Tensor, k: Tensor, pos_ids: Tensor,
                               rotary_dim: int | None = None, interleave: bool = False,
                               rope_scale: float = 1, rope_theta: float = 1e4) -> None:
    """:func:`apply_rope_pos_ids`, written into q and k."""
    _inplace(q, k, _rope(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta))


def apply_rope(q: Tensor, k: Tensor, indptr: Tensor, offsets: Tensor,
               rotary_dim: int | None = None, interleave: bool = False,
               rope_scale: float = 1, rope_theta: float = 1e4) -> tuple[Tensor, Tensor]:
    """:func:`apply_rope_pos_ids` for ragged q / k: token t of segment b
    (indptr[b] <= t < indptr[b+1], indptr[-1] = nnz) sits at offsets[b] + t - indptr[b]."""
    pos = _offsets_to_pos_ids(q, indptr, offsets)
    return _rope(q, k, pos, rotary_dim, interleave, rope_scale, rope_theta)


def apply_rope_inplace(q: Tensor, k: Tensor, indptr: Tensor, offsets: Tensor,
                       rotary_dim: int | None = None, interleave: bool = False,
                       rope_scale: float = 1, rope_theta: float = 1e4) -> None:
    """:func:`apply_rope`, written into q and k."""
    _inplace(q, k, apply_rope(q, k, indptr, offsets, rotary_dim, interleave, rope_scale,
                              rope_theta))


def apply_llama31_rope_pos_ids(q: Tensor, k: Tensor, pos_ids: Tensor,
                               rotary_dim: int | None = None, interleave: bool = False,
                               rope_scale: float = 8, rope_theta: float = 5e5,
                               low_freq_factor: float = 1, high_freq_factor: float = 4,
                               old_context_len: int = 8192) -> tuple[Tensor, Tensor]:
    """:func:`apply_rope_pos_ids` with Llama 3.1's frequency scaling (FlashInfer's
    defaults: rope_scale 8, theta 5e5, factors 1 / 4, old context 8192)."""
    return _rope(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta,
                 (float(low_freq_factor), float(high_freq_factor), float(old_context_len)))


def apply_llama31_rope_pos_ids_inplace(q: Tensor, k: Tensor, pos_ids: Tensor,
                                       rotary_dim: int | None = None,
                                       interleave: bool = False, rope_scale: float = 8,
                                       rope_theta: float = 5e5, low_freq_factor: float = 1,
                                       high_freq_factor: float = 4,
                                       old_context_len: int = 8192) -> None:
    """:func:`apply_llama31_rope_pos_ids`, written into q and k."""
    _inplace(q, k, apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim, interleave,
                                              rope_scale, rope_theta, low_freq_factor,
                                              high_freq_factor, old_context_len))


def apply_llama31_rope(q: Tensor, k: Tensor, indptr: Tensor, offsets: Tensor,
                       rotary_dim: int | None = None, interleave: bool = False,
                       rope_scale: float = 8, rope_theta: float = 5e5,
                       low_freq_factor: float = 1, high_freq_factor: float = 4,
                       old_context_len: int = 8192) -> tuple[Tensor, Tensor]:
    """:func:`apply_rope` with Llama 3.1's frequency scaling."""
    pos = _offsets_to_pos_ids(q, indptr, offsets)
    return apply_llama31_rope_pos_ids(q, k, pos, rotary_dim, interleave, rope_scale,
                                      rope_theta, low_freq_factor, high_freq_factor,
                                      old_context_len)


def apply_llama31_rope_inplace(q: Tensor, k: Tensor, indptr: Tensor, offsets: Tensor,
                               rotary_dim: int | None = None, interleave: bool = False,
                               rope_scale: float = 8, rope_theta: float = 5e5,
                               low_freq_factor: float = 1, high_freq_factor: float = 4,
                               old_context_len: int = 8192) -> None:
    """:func:`apply_llama31_rope`, written into q and k."""
    _inplace(q, k, apply_llama31_rope(q, k, indptr, offsets, rotary_dim, interleave,
                                      rope_scale, rope_theta, low_freq_factor,
                                      high_freq_factor, old_context_len))


def _rope_cos_sin(positions: Tensor, query: Tensor, key: Tensor, head_size: int,
                  cos_sin_cache: Tensor, is_neox: bool) -> tuple[Tensor, Tensor]:
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2)
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32 (as FlashInfer), got "
                         f"{cos_sin_cache.dtype}")
    head_size = _int("head_size", head_size, 1)
    for name, t in (("query", query), ("key", key)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=(2, 3))
        if t.shape[-1] % head_size or (t.dim() == 3 and t.shape[-1] != head_size):
            raise ValueError(f"{name} must be [nnz, num_heads * head_size] or [nnz, "
                             f"num_heads, head_size] with head_size {head_size}, got "
                             f"{list(t.shape)}")
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    q3 = query.reshape(query.shape[0], -1, head_size)
    k3 = key.reshape(key.shape[0], -1, head_size)
    qo, ko = ops.rotary_embedding(q3, k3, positions, cos_sin_cache, is_neox_style=is_neox)
    return qo.view(query.shape), ko.view(key.shape)


def apply_rope_with_cos_sin_cache(positions: Tensor, query: Tensor, key: Tensor,
                                  head_size: int, cos_sin_cache: Tensor, is_neox: bool = True
                                  ) -> tuple[Tensor, Tensor]:
    """vLLM / SGLang-style RoPE: query [nnz, num_q_heads * head_size] (or 3-D), key
    [nnz, num_k_heads * head_size], positions [nnz], cos_sin_cache fp32
    [max_position, rotary_dim] (cos half, then sin half). ``is_neox``: pairs (i, i +
    rotary_dim / 2), else (2i, 2i + 1). Returns new tensors shaped like query and key.
    Runs :func:`minikernels.ops.rotary_embedding`."""
    return _rope_cos_sin(positions, query, key, head_size, cos_sin_cache, is_neox)


def apply_rope_with_cos_sin_cache_inplace(positions: Tensor, query: Tensor, key: Tensor,
                                          head_size: int, cos_sin_cache: Tensor,
                                          is_neox: bool = True) -> None:
    """:func:`apply_rope_with_cos_sin_cache`, written into query and key."""
    _inplace(query, key, _rope_cos_sin(positions, query, key, head_size, cos_sin_cache,
                                       is_neox))


# ---------------------------------------------------------------------------- sampling


def _row_param(name: str, value: object, rows: int, device: torch.device,
               integer: bool) -> Tensor:
    """A sampling parameter (one number, or a tensor [rows]) as a [rows, 1] tensor."""
    if isinstance(value, Tensor):
        check_tensor(name, value, dtypes=_INT_DTYPES if integer else FLOAT_DTYPES, ndim=1,
                     device=device)
        check_shape(name, value, [rows])
        t = value.long() if integer else value.float()
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'} or a tensor "
                        f"[{rows}], got {type(value).__name__}")
    else:
        t = torch.full((rows,), value, dtype=torch.int64 if integer else torch.float32,
                       device=device)
    checks = index_checks_active(t) if isinstance(value, Tensor) else rows > 0
    if checks:
        if integer and bool((t < 1).any()):
            raise ValueError(f"{name} must be >= 1")
        if not integer and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"{name} must be in [0, 1]")
    return t[:, None]


def _check_probs(name: str, probs: object) -> Tensor:
    check_tensor(name, probs, dtypes=FLOAT_DTYPES, ndim=2)
    assert isinstance(probs, Tensor)
    return probs


def _renorm(p: Tensor, keep: Tensor) -> Tensor:
    kept = torch.where(keep, p, 0.0)
    total = kept.sum(dim=1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(1e-38), kept)


def _top_k_keep(p: Tensor, top_k: object) -> Tensor:
    """Keep p >= the k-th largest value (ties with it kept), k >= V keeps all."""
    k = _row_param("top_k", top_k, p.shape[0], p.device, True).clamp(max=p.shape[1])
    kth = p.sort(dim=1, descending=True).values.gather(1, k - 1)
    return p >= kth


def _top_p_keep(p: Tensor, top_p: object) -> Tensor:
    """Keep a token when the mass of strictly larger tokens is < top_p (ties at the edge
    kept together; the largest always kept): FlashInfer's pivot rule."""
    tp = _row_param("top_p", top_p, p.shape[0], p.device, False)
    vals = p.sort(dim=1, descending=True).values
    before = vals.cumsum(dim=1) - vals                       # mass sorted before each
    n = (before < tp).sum(dim=1, keepdim=True).clamp_min(1)
    return p >= vals.gather(1, n - 1)


def _min_p_keep(p: Tensor, min_p: object) -> Tensor:
    mp = _row_param("min_p", min_p, p.shape[0], p.device, False)
    return p >= mp * p.amax(dim=1, keepdim=True)


def softmax(logits: Tensor, temperature: float | Tensor | None = None,
            enable_pdl: bool | None = None) -> Tensor:
    """Temperature softmax: ``softmax(logits * inv_t)`` per row with FlashInfer's
    ``inv_t = 1 / temperature``, and ``inv_t = 0`` for temperature 0 (its kernel's rule: a
    uniform row, not greedy). logits [B, V] (fp32 / fp16 / bf16, may hold -inf; a row
    of only -inf gives NaN, as torch.softmax); temperature None (1), a number, or a float
    tensor [B] (one per row). Returns fp32 [B, V]. Plain PyTorch, fp32 math;
    ``enable_pdl`` has no effect."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    rows = logits.shape[0]
    if temperature is None:
        temp = torch.ones((rows, 1), dtype=torch.float32, device=logits.device)
    elif isinstance(temperature, Tensor):
        check_tensor("temperature", temperature, dtypes=(*FLOAT_DTYPES, torch.float64),
                     ndim=1, device=logits.device)
        check_shape("temperature", temperature, [rows])
        if index_checks_active(temperature) and bool(torch.isnan(temperature).any()):
            raise ValueError("temperature must not be NaN")
        temp = temperature.float()[:, None]
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be None, a number or a tensor [{rows}], got "
                        f"{type(temperature).__name__}")
    elif math.isnan(temperature):
        raise ValueError("temperature must not be NaN")
    else:
        temp = torch.full((rows, 1), float(temperature), dtype=torch.float32,
                          device=logits.device)
    inv_t = torch.where(temp == 0, torch.zeros_like(temp), 1.0 / temp)
    return torch.softmax(logits.float() * inv_t, dim=-1)


def top_k_mask_logits(logits: Tensor, top_k: int | Tensor) -> Tensor:
    """Set every logit below the row's k-th largest to -inf (ties with it kept; k >=
    vocab keeps all). logits [B, V] (fp32 / fp16 / bf16, may hold -inf), top_k int >= 1 or
    int tensor [B]. Returns a new tensor in logits' dtype. Runs
    :func:`minikernels.ops.top_k_top_p_mask_logits` (same top-k rule as FlashInfer)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    k = _row_param("top_k", top_k, logits.shape[0], logits.device, True)[:, 0]
    return ops.top_k_top_p_mask_logits(logits, top_k=k)


def top_k_renorm_probs(probs: Tensor, top_k: int | Tensor) -> Tensor:
    """Keep each row's top-k probabilities (ties with the k-th kept), zero the rest and
    renormalize. probs [B, V]; top_k int >= 1 or tensor [B]. Returns fp32 [B, V]."""
    p = _check_probs("probs", probs).float()
    return _renorm(p, _top_k_keep(p, top_k))


def top_p_renorm_probs(probs: Tensor, top_p: float | Tensor) -> Tensor:
    """Keep each row's nucleus (the largest probabilities until their mass reaches top_p:
    a token stays when the strictly larger ones hold < top_p), zero the rest and
    renormalize. probs [B, V] (rows sum to 1); top_p in [0, 1] or tensor [B]. fp32."""
    p = _check_probs("probs", probs).float()
    return _renorm(p, _top_p_keep(p, top_p))


top_k_renorm_prob = top_k_renorm_probs     # FlashInfer's older names
top_p_renorm_prob = top_p_renorm_probs


def _draw(probs: Tensor, generator: torch.Generator | None, out_dtype: torch.dtype
          ) -> Tensor:
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(out_dtype)


def _sample(name: str, probs: object, indices: Tensor | None, check_nan: bool,
            generator: torch.Generator | None, keep: Any = None) -> Tensor:
    """Rows picked by ``indices`` (default: all), filtered by keep(p), one draw each."""
    p = _check_probs(name, probs).float()
    out_dtype = torch.int32
    if indices is not None:
        check_tensor("indices", indices, dtypes=_INT_DTYPES, ndim=1, device=p.device)
        check_index_range("indices", indices, 0, p.shape[0])
        p, out_dtype = p[indices.long()], indices.dtype
    if check_nan and bool(torch.isnan(p).any()):
        raise ValueError(f"{name} contains NaN")
    if keep is not None:
        p = _renorm(p, keep(p))
    return _draw(p, generator, out_dtype)


def sampling_from_probs(probs: Tensor, indices: Tensor | None = None,
                        deterministic: bool = True, generator: torch.Generator | None = None,
                        check_nan: bool = False) -> Tensor:
    """One token per row from probs [B, V] (or per ``indices`` entry: row indices[i]).
    Returns int32 [B] (indices' dtype with indices). torch.multinomial with ``generator``:
    FlashInfer's distribution, not its random stream."""
    return _sample("probs", probs, indices, check_nan, generator)


def sampling_from_logits(logits: Tensor, indices: Tensor | None = None,
                         deterministic: bool = True, generator: torch.Generator | None = None,
                         check_nan: bool = False) -> Tensor:
    """:func:`sampling_from_probs` of softmax(logits)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    return _sample("logits", torch.softmax(logits.float(), dim=-1), indices, check_nan,
                   generator)


def top_k_sampling_from_probs(probs: Tensor, top_k: int | Tensor,
                              indices: Tensor | None = None, deterministic: bool = True,
                              generator: torch.Generator | None = None,
                              check_nan: bool = False) -> Tensor:
    """Sample from :func:`top_k_renorm_probs` (top_k per output row)."""
    return _sample("probs", probs, indices, check_nan, generator,
                   lambda p: _top_k_keep(p, top_k))


def top_p_sampling_from_probs(probs: Tensor, top_p: float | Tensor,
                              indices: Tensor | None = None, deterministic: bool = True,
                              generator: torch.Generator | None = None,
                              check_nan: bool = False) -> Tensor:
    """Sample from :func:`top_p_renorm_probs` (top_p per output row)."""
    return _sample("probs", probs, indices, check_nan, generator,
                   lambda p: _top_p_keep(p, top_p))


def min_p_sampling_from_probs(probs: Tensor, min_p: float | Tensor,
                              indices: Tensor | None = None, deterministic: bool = True,
                              generator: torch.Generator | None = None,
                              check_nan: bool = False) -> Tensor:
    """Sample among the tokens with probability >= min_p * the row's largest."""
    return _sample("probs", probs, indices, check_nan, generator,
                   lambda p: _min_p_keep(p, min_p))


def _top_k_top_p_keep(p: Tensor, top_k: object, top_p: object, order: str) -> Tensor:
    if order == "top_k_first":        # top-p over the renormalized top-k
        keep = _top_k_keep(p, top_k)
        return keep & _top_p_keep(_renorm(p, keep), top_p)
    if order == "joint":              # both filters on the original distribution
        return _top_k_keep(p, top_k) & _top_p_keep(p, top_p)
    raise ValueError(f"filter_apply_order must be 'top_k_first' or 'joint', got {order!r}")


def top_k_top_p_sampling_from_probs(probs: Tensor, top_k: int | Tensor,
                                    top_p: float | Tensor, indices: Tensor | None = None,
                                    filter_apply_order: str = "top_k_first",
                                    deterministic: bool = True,
                                    generator: torch.Generator | None = None,
                                    check_nan: bool = False) -> Tensor:
    """Top-k then top-p (``filter_apply_order="top_k_first"``: top-p of the renormalized
    top-k) or both on the original probs (``"joint"``), then one draw per row."""
    if filter_apply_order not in ("top_k_first", "joint"):
        raise ValueError(f"filter_apply_order must be 'top_k_first' or 'joint', got "
                         f"{filter_apply_order!r}")
    return _sample("probs", probs, indices, check_nan, generator,
                   lambda p: _top_k_top_p_keep(p, top_k, top_p, filter_apply_order))


def top_k_top_p_sampling_from_logits(logits: Tensor, top_k: int | Tensor,
                                     top_p: float | Tensor, indices: Tensor | None = None,
                                     filter_apply_order: str = "top_k_first",
                                     deterministic: bool = True,
                                     generator: torch.Generator | None = None,
                                     check_nan: bool = False) -> Tensor:
    """:func:`top_k_top_p_sampling_from_probs` of softmax(logits). "top_k_first" masks
    with :func:`minikernels.ops.top_k_top_p_mask_logits` (top-k, then top-p of the kept
    mass: the same rule) before the softmax."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    if filter_apply_order == "top_k_first" and indices is None:
        rows = logits.shape[0]
        k = _row_param("top_k", top_k, rows, logits.device, True)[:, 0]
        p = _row_param("top_p", top_p, rows, logits.device, False)[:, 0]
        masked = ops.top_k_top_p_mask_logits(logits.float(), top_k=k, top_p=p)
        return _sample("logits", torch.softmax(masked, dim=-1), None, check_nan, generator)
    return top_k_top_p_sampling_from_probs(torch.softmax(logits.float(), dim=-1), top_k,
                                           top_p, indices, filter_apply_order, deterministic,
                                           generator, check_nan)


def _count_buffer(name: str, buf: object, rows: int, device: torch.device) -> Tensor | None:
    if buf is None:
        return None
    check_tensor(name, buf, dtypes=(torch.int32, torch.int64), ndim=1, device=device)
    if buf.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}], got {list(buf.shape)}")
    return buf


def chain_speculative_sampling(draft_probs: Tensor, draft_token_ids: Tensor,
                               target_probs: Tensor,
                               maybe_output_accepted_token_num: Tensor | None = None,
                               maybe_output_emitted_draft_token_num: Tensor | None = None,
                               deterministic: bool = True,
                               generator: torch.Generator | None = None
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Speculative sampling of a chain of drafts (Leviathan et al.), on
    :func:`minikernels.ops.rejection_sample`: draft j is accepted when
    ``u_j * q_j(x_j) < p_j(x_j)`` (probability min(1, p / q)); at the first rejection a
    token is drawn from normalize(max(0, p_j - q_j)); after a whole chain, the bonus
    token from p_n.

    draft_probs [B, n, V], draft_token_ids [B, n] (int32 / int64), target_probs
    [B, n + 1, V] (fp32 probabilities; other float dtypes are converted). Returns
    (output_token_ids int32 [B, n + 1]: the accepted drafts, the drawn token, then -1;
    accepted_num int32 [B]: how many drafts pass their own acceptance test, each
    position considered on its own (FlashInfer's alignment metric, not stopping at the
    first rejection); emitted_num int32 [B]: drafts actually emitted). Given
    ``maybe_output_*`` buffers ([B], int32 / int64), the counts are added to them in place
    and they are returned. The uniforms and the exponential race come from ``generator``
    (FlashInfer's distribution, not its random stream)."""
    check_tensor("draft_probs", draft_probs, dtypes=FLOAT_DTYPES, ndim=3)
    dev = draft_probs.device
    b, n, v = draft_probs.shape
    check_tensor("draft_token_ids", draft_token_ids, dtypes=_INT_DTYPES, ndim=2, device=dev)
    check_tensor("target_probs", target_probs, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    if tuple(draft_token_ids.shape) != (b, n) or tuple(target_probs.shape) != (b, n + 1, v):
        raise ValueError(f"draft_token_ids must be [{b}, {n}] and target_probs "
                         f"[{b}, {n + 1}, {v}] for draft_probs [{b}, {n}, {v}], got "
                         f"{list(draft_token_ids.shape)} and {list(target_probs.shape)}")
    check_index_range("draft_token_ids", draft_token_ids, 0, v)
    accepted_buf = _count_buffer("maybe_output_accepted_token_num",
                                 maybe_output_accepted_token_num, b, dev)
    emitted_buf = _count_buffer("maybe_output_emitted_draft_token_num",
                                maybe_output_emitted_draft_token_num, b, dev)
    q = draft_probs.float()
    p = target_probs.float()
    ids = draft_token_ids.long()
    uniform = torch.rand((b, n), device=dev, generator=generator)
    exp_q = torch.empty((b, v), device=dev).exponential_(generator=generator)
    tokens = ops.rejection_sample(ids, torch.full((b,), n, dtype=torch.int64, device=dev),
                                  p, q, uniform, exp_q, torch.zeros(b, dtype=torch.bool,
                                                                   device=dev))
    emitted = ((tokens != -1).sum(dim=1) - 1).to(torch.int32)
    q_x = q.gather(2, ids[..., None])[..., 0]
    p_x = p[:, :n].gather(2, ids[..., None])[..., 0]
    accepted = (uniform * q_x < p_x).sum(dim=1).to(torch.int32)
    if accepted_buf is not None:
        accepted = accepted_buf.add_(accepted.to(accepted_buf.dtype))
    if emitted_buf is not None:
        emitted = emitted_buf.add_(emitted.to(emitted_buf.dtype))
    return tokens.to(torch.int32), accepted, emitted


# ------------------------------------------------------------------------ quantization

#: Bit weights of a packed byte's 8 elements: the first element is the most (big) or the
#: least (little) significant bit, as numpy.packbits.
_BIT_WEIGHTS = {"big": (128, 64, 32, 16, 8, 4, 2, 1), "little": (1, 2, 4, 8, 16, 32, 64, 128)}


def _bit_weights(bitorder: object, device: torch.device) -> Tensor:
    if bitorder not in _BIT_WEIGHTS:
        raise ValueError(f"bitorder must be 'big' or 'little', got {bitorder!r}")
    return torch.tensor(_BIT_WEIGHTS[bitorder], dtype=torch.int32,  # type: ignore[index]
                        device=device)


def packbits(x: Tensor, bitorder: str = "big") -> Tensor:
    """numpy.packbits of a 1-D tensor: element i (nonzero = 1) is bit i % 8 of byte i // 8
    (the most significant first with bitorder "big", the least with "little"); the last
    byte is padded with 0 bits. x [n] of any dtype. Returns uint8 [(n + 7) // 8] on x's
    device. Plain PyTorch."""
    check_tensor("x", x, ndim=1)
    weights = _bit_weights(bitorder, x.device)
    n = x.shape[0]
    bits = torch.zeros(-(-n // 8) * 8, dtype=torch.int32, device=x.device)
    bits[:n] = (x != 0).to(torch.int32)
    return (bits.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def segment_packbits(x: Tensor, indptr: Tensor, bitorder: str = "big"
                     ) -> tuple[Tensor, Tensor]:
    """:func:`packbits` of each segment ``x[indptr[i]:indptr[i+1]]``, packed back to back.

    x [n] (any dtype, nonzero = 1); indptr int32 / int64 [batch_size + 1], non-decreasing,
    within [0, n], on x's device. Returns (y uint8 [new_indptr[-1]], new_indptr int32
    [batch_size + 1]) with new_indptr[0] = 0 and new_indptr[i+1] - new_indptr[i] =
    (indptr[i+1] - indptr[i] + 7) // 8: y[new_indptr[i]:new_indptr[i+1]] is segment i
    packed (its own zero padding). Vectorized; one host sync (the output size, as
    FlashInfer's).
    """
    check_tensor("x", x, ndim=1)
    check_tensor("indptr", indptr, dtypes=_INT_DTYPES, ndim=1, device=x.device)
    if indptr.numel() < 1:
        raise ValueError("indptr must have batch_size + 1 >= 1 entries")
    weights = _bit_weights(bitorder, x.device)
    ptr = indptr.long()
    seg = ptr[1:] - ptr[:-1]
    new_indptr = torch.cat([ptr.new_zeros(1), ((seg + 7) // 8).cumsum(0)])
    bounds = torch.stack([ptr[0], ptr[-1], new_indptr[-1], seg.min() if seg.numel()
                          else ptr.new_zeros(())]).tolist()    # the one host sync
    if bounds[3] < 0:
        raise ValueError("indptr must be non-decreasing")
    if bounds[0] < 0 or bounds[1] > x.shape[0]:
        raise ValueError(f"indptr values must be in [0, len(x) = {x.shape[0]}], got "
                         f"{bounds[0]}..{bounds[1]}")
    total = bounds[2]
    byte = torch.arange(total, device=x.device)
    b = torch.searchsorted(new_indptr[1:].contiguous(), byte, right=True)
    bit = (byte - new_indptr[b])[:, None] * 8 + torch.arange(8, device=x.device)  # in seg
    valid = bit < seg[b][:, None]
    at = (ptr[b][:, None] + bit).clamp_(max=max(x.shape[0] - 1, 0))
    bits = (x[at] != 0) & valid if x.numel() else valid
    y = (bits.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
    return y, new_indptr.to(torch.int32)


# -------------------------------------------------------------- submodule-style namespaces

decode = SimpleNamespace(
    single_decode_with_kv_cache=single_decode_with_kv_cache,
    BatchDecodeWithPagedKVCacheWrapper=BatchDecodeWithPagedKVCacheWrapper)
prefill = SimpleNamespace(
    single_prefill_with_kv_cache=single_prefill_with_kv_cache,
    single_prefill_with_kv_cache_return_lse=single_prefill_with_kv_cache_return_lse,
    BatchPrefillWithPagedKVCacheWrapper=BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper=BatchPrefillWithRaggedKVCacheWrapper)
attention = SimpleNamespace(
    BatchAttention=BatchAttention,
    BatchAttentionWithAttentionSinkWrapper=BatchAttentionWithAttentionSinkWrapper)
page = SimpleNamespace(append_paged_kv_cache=append_paged_kv_cache,
                       get_batch_indices_positions=get_batch_indices_positions,
                       get_seq_lens=get_seq_lens)
cascade = SimpleNamespace(
    merge_state=merge_state, merge_state_in_place=merge_state_in_place,
    merge_states=merge_states,
    MultiLevelCascadeAttentionWrapper=MultiLevelCascadeAttentionWrapper,
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper=(
        BatchDecodeWithSharedPrefixPagedKVCacheWrapper),
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper=(
        BatchPrefillWithSharedPrefixPagedKVCacheWrapper))
norm = SimpleNamespace(rmsnorm=rmsnorm, fused_add_rmsnorm=fused_add_rmsnorm,
                       gemma_rmsnorm=gemma_rmsnorm,
                       gemma_fused_add_rmsnorm=gemma_fused_add_rmsnorm, layernorm=layernorm,
                       rmsnorm_quant=rmsnorm_quant,
                       fused_add_rmsnorm_quant=fused_add_rmsnorm_quant,
                       fused_add_rmsnorm_fp8_block_quant=fused_add_rmsnorm_fp8_block_quant)
activation = SimpleNamespace(silu_and_mul=silu_and_mul, gelu_tanh_and_mul=gelu_tanh_and_mul,
                             gelu_and_mul=gelu_and_mul)
rope = SimpleNamespace(
    apply_rope=apply_rope, apply_rope_inplace=apply_rope_inplace,
    apply_rope_pos_ids=apply_rope_pos_ids, apply_rope_pos_ids_inplace=apply_rope_pos_ids_inplace,
    apply_llama31_rope=apply_llama31_rope, apply_llama31_rope_inplace=apply_llama31_rope_inplace,
    apply_llama31_rope_pos_ids=apply_llama31_rope_pos_ids,
    apply_llama31_rope_pos_ids_inplace=apply_llama31_rope_pos_ids_inplace,
    apply_rope_with_cos_sin_cache=apply_rope_with_cos_sin_cache,
    apply_rope_with_cos_sin_cache_inplace=apply_rope_with_cos_sin_cache_inplace)
sampling = SimpleNamespace(
    softmax=softmax, chain_speculative_sampling=chain_speculative_sampling,
    top_k_mask_logits=top_k_mask_logits, top_k_renorm_probs=top_k_renorm_probs,
    top_p_renorm_probs=top_p_renorm_probs, top_k_renorm_prob=top_k_renorm_prob,
    top_p_renorm_prob=top_p_renorm_prob, sampling_from_probs=sampling_from_probs,
    sampling_from_logits=sampling_from_logits,
    top_k_sampling_from_probs=top_k_sampling_from_probs,
    top_p_sampling_from_probs=top_p_sampling_from_probs,
    min_p_sampling_from_probs=min_p_sampling_from_probs,
    top_k_top_p_sampling_from_probs=top_k_top_p_sampling_from_probs,
    top_k_top_p_sampling_from_logits=top_k_top_p_sampling_from_logits)
quantization = SimpleNamespace(packbits=packbits, segment_packbits=segment_packbits)
# flashinfer.fused_moe: cutlass_fused_moe and its enums (compat/flashinfer_moe.py)
from . import flashinfer_moe as fused_moe  # noqa: E402  (after this module's names)
