"""vLLM's three Triton attention entry points on minikernels' attention ops.

    from minikernels.compat.vllm_attention import (context_attention_fwd,
                                                   decode_attention_fwd, unified_attention)
    # was: from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    unified_attention(q, k_cache, v_cache, out, cu_seqlens_q, max_seqlen_q, seqused_k,
                      max_seqlen_k, softmax_scale, True, (-1, -1), block_table, 0.0,
                      None, k_descale, v_descale)            # writes out, returns None

Names, positional order, defaults, layouts and the in-place ``out`` / ``o`` / ``lse``
writes are vLLM's (followed: vllm-project/vllm, vllm/v1/attention/ops/ at commit
001394336840 for triton_unified_attention.py, 0420dfc4327c for prefix_prefill.py and
0155494b1dca for triton_decode_attention.py; vllm/attention/ops/ in older releases). Each
returns None, as vLLM's do. Errors are ValueError / TypeError naming vLLM's argument;
what minikernels cannot compute raises NotImplementedError naming the argument.

Mapping (vLLM -> minikernels):

    unified_attention       vLLM V1's TRITON_ATTN backend: varlen queries (prefill, chunked
                            prefill, decode, mixed) over paged caches k / v [num_blocks,
                            block_size, num_kv_heads, head_size] (views of vLLM's
                            [num_blocks, 2, ...] cache). -> ops.flash_attention with
                            block_table (cu_seqlens_k = cumsum(seqused_k)); a batch of one
                            query per sequence -> ops.paged_decode_attention. Pages over 256
                            tokens are split into sub-blocks (compat.flash_attn's view).
    context_attention_fwd   prefix-cached prefill: new tokens' q / k / v plus each
                            sequence's cached context in vLLM's legacy caches (k_cache
                            [num_blocks, num_kv_heads, head_size / x, block_size, x],
                            v_cache [num_blocks, num_kv_heads, head_size, block_size]).
                            The context rows the block table names are gathered (fp8:
                            dequantized to q's dtype, as vLLM's kernel does) and put in
                            front of the new tokens' k / v, then ops.flash_attention runs
                            varlen: a per-call copy of the context, as
                            compat.vllm_ops.paged_attention_v1 makes of legacy caches.
    decode_attention_fwd    the SGLang-derived decode kernel (vLLM's TRITON_MLA backend):
                            one query per sequence over k_buffer / v_buffer, [num_tokens,
                            num_kv_heads, D] (page_size 1, req_to_token holds token slots)
                            or [num_pages, page_size, num_kv_heads, D] (req_to_token holds
                            page ids). -> ops.paged_decode_attention (num_splits =
                            num_kv_splits), o and lse (natural log) written.

Masks and scores as vLLM's kernels: causal, bottom-right aligned (a sequence's new tokens
are its last ones: query i sits at seq_len - query_len + i); sliding windows keep keys with
position - key < window (unified_attention: window_size[0] + 1; context_attention_fwd:
sliding_window); softcap ``cap * tanh(s / cap)`` on the scaled score; ALiBi (unified
attention's slope * (key - context_len) differs from FlashAttention's -slope * |pos - key|
by a per-row constant, the same softmax; with sinks it is applied exactly); sinks are one
extra logit per q head (in scaled-score units) that takes probability mass and no value;
GQA / MQA; fp8 (e4m3 / e5m2) caches with per-tensor (or per-kv-head) descales;
fp16 / bf16 / fp32.

Refused (NotImplementedError naming the argument): unified_attention's ``q_descale``
(fp8 queries; vLLM asserts it is None), ``qq_bias`` (spec-decode tree bias),
``mm_prefix_range`` / ``prefix_lens`` (bidirectional prefix ranges), ``use_alibi_sqrt=True``,
``kv_quant_mode`` other than NONE / FP8_PER_TENSOR and ``k_scale_cache`` / ``v_scale_cache``
(per-token-head int8 / fp8, int4, nvfp4 caches): minikernels' attention has no bias
input, no bidirectional ranges and no per-token scales. decode_attention_fwd with
``v_buffer``'s head size unlike ``k_buffer``'s (MLA's 576 / 512) or a head size over 512:
minikernels' attention uses one head size for q, k and v, up to 512.

Differences, by design:
- the split-softmax scratch is validated and left unwritten: unified_attention's
  ``softmax_segm_output`` / ``softmax_segm_max`` / ``softmax_segm_expsum`` (and
  ``seq_threshold_3D`` / ``num_par_softmax_segments`` / ``num_prefills`` /
  ``num_decodes`` / ``split_launch``: launch hints), decode_attention_fwd's
  ``attn_logits``. minikernels splits long sequences itself (split-KV merged by LSE).
- output quantization (``output_scale`` / ``fp8_out_scale``): fp8 e4m3 ``out`` =
  clamp(result * (1 / scale), +-448), the result rounded to q's dtype first (vLLM
  quantizes its fp32 accumulator: an fp8 ulp apart at rare ties). Plain PyTorch after the op.
- a decode row with seq_len 0 gives zeros and lse -inf (vLLM's kernel writes NaN there).
- supersets: strided views for every tensor (vLLM's decode kernel assumes pages stored
  token-strided), ``k_descale`` / ``v_descale`` per kv head (a [num_seqs, num_kv_heads]
  descale must be the same for every sequence; vLLM reads element 0), ``alibi_slopes``
  [num_seqs, num_heads], ``causal=False`` for unified_attention (vLLM asserts causal);
  context_attention_fwd takes the later releases' ``causal`` and ``softcap`` keywords.
  Any block / page size; head sizes in [1, 512].
- checks vLLM's kernels skip: ``max_input_len`` / ``max_seqlen_q`` / ``max_seqlen_k``
  below a real length, block-table entries out of range, seq lens past the table,
  query lengths past seq lens (context_attention_fwd).
- older signatures: decode_attention_fwd's form without ``lse`` (before vLLM added it) is
  recognised by an integer tensor in lse's place; unified_attention's and
  context_attention_fwd's later keywords are all accepted; passing unified_attention's
  older positional order (a tensor where ``seq_threshold_3D`` goes) is a TypeError:
  pass those by keyword, as vLLM's own callers do.
- context_attention_fwd's ALiBi path is vLLM's: causal, no sinks, fp8 output or
  softcap; vLLM's ALiBi kernel ignores ``sliding_window`` (here: ValueError naming it).
"""
from __future__ import annotations

import enum
import inspect
import math
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._validation import (
    FLOAT_DTYPES,
    check_index_range,
    check_positive_float,
    check_shape,
    check_tensor,
    index_checks_active,
)
from ..ops.attention import FP8_KV_DTYPES, MAX_HEAD_DIM, check_sinks
from ..ops.reference import FP8_E4M3_MAX
from .flash_attn import _split_pages, _window
from .vllm_cache_ops import FP8_KV_FORMATS
from .vllm_ops import _legacy_caches

__all__ = ["KVQuantMode", "context_attention_fwd", "decode_attention_fwd",
           "unified_attention"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_FP8_OUT = torch.float8_e4m3fn
#: kv_cache_dtype strings of a non-quantized cache (vLLM's "auto" and the dtype names its
#: tests pass, e.g. "float16")
_PLAIN_KV_CACHE_DTYPES = {"auto": None, "float16": torch.float16, "half": torch.float16,
                          "bfloat16": torch.bfloat16, "float": torch.float32,
                          "float32": torch.float32}


class KVQuantMode(enum.IntEnum):
    """The two of vLLM's ``vllm.v1.kv_cache_interface.KVQuantMode`` values this module
    takes (vLLM's own enum, or a plain int, works the same)."""

    NONE = 0
    FP8_PER_TENSOR = 1


# ----------------------------------------------------------------------------- helpers


def _int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _refuse(name: str, value: object, why: str) -> None:
    """An argument minikernels cannot compute: anything but None is refused."""
    if value is not None:
        raise NotImplementedError(f"{name} is not supported by minikernels ({why}); pass "
                                  f"None")


def _number(name: str, value: object) -> float:
    """A float argument vLLM passes as a number or a 1-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape "
                             f"{list(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _scale_tensor(name: str, value: object, heads: int, device: torch.device,
                  per_head: bool) -> Tensor:
    """A dequantization scale -> float32 [1] or (per_head) [heads] on ``device``.

    Takes a number, or a float32 tensor of 1 element, or of shape [heads] / [num_seqs,
    heads] (per_head; vLLM's descale layout, every row the same: vLLM's kernels read
    element 0). Finite and > 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor([float(value)], dtype=torch.float32, device=device)
    check_tensor(name, value, dtypes=(torch.float32,), device=device)
    assert isinstance(value, Tensor)
    if value.numel() == 1:
        s = value.reshape(1)
    elif per_head and value.dim() in (1, 2) and value.shape[-1] == heads:
        s = value if value.dim() == 1 else value[0]
        if value.dim() == 2 and index_checks_active(value) and \
                not bool((value == s).all()):
            raise ValueError(f"{name} [num_seqs, num_kv_heads] must be the same for every "
                             f"sequence (minikernels takes per-tensor or per-kv-head "
                             f"scales; vLLM's kernel reads element 0 only)")
    else:
        want = f"1 element, [{heads}] or [num_seqs, {heads}]" if per_head else "1 element"
        raise ValueError(f"{name} must have {want}, got shape {list(value.shape)}")
    if index_checks_active(s) and not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0")
    return s.reshape(-1).contiguous()


def _output_scale(name: str, value: object, device: torch.device) -> Tensor | None:
    """vLLM's fp8 output scale: None or a float32 tensor (or number) with 1 element."""
    if value is None:
        return None
    return _scale_tensor(name, value, 1, device, per_head=False)


def _check_out(name: str, out: object, shape: list[int], dtype: torch.dtype,
               device: torch.device) -> Tensor:
    check_tensor(name, out, dtypes=(dtype,), device=device)
    assert isinstance(out, Tensor)
    check_shape(name, out, shape)
    return out


def _finish(result: Tensor, out_scale: Tensor | None) -> Tensor:
    """The op's result as vLLM's kernel stores it: with an fp8 output scale,
    fp8 e4m3 of clamp(result * (1 / scale), +-448)."""
    if out_scale is None:
        return result
    inv = 1.0 / out_scale.reshape(())
    return (result.float() * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_FP8_OUT)


def _index_tensor(name: str, t: object, ndim: int, device: torch.device) -> Tensor:
    check_tensor(name, t, dtypes=_INDEX_DTYPES, ndim=ndim, device=device)
    assert isinstance(t, Tensor)
    return t


def _check_table(name: str, table: Tensor, lens: Tensor, num_pages: int, page: int,
                 lens_name: str) -> None:
    """Every sequence's length fits its row of ``table`` (pages of ``page`` tokens) and
    the entries it uses are page ids in [0, num_pages) (vLLM's kernels read them
    unchecked)."""
    if not index_checks_active(lens):
        return
    if bool((lens < 0).any()):
        raise ValueError(f"{lens_name} must be >= 0, got min {int(lens.min())}")
    capacity = table.shape[1] * page
    if int(lens.max()) > capacity:
        raise ValueError(f"{lens_name} ({int(lens.max())}) exceeds {name}'s capacity "
                         f"({table.shape[1]} entries x {page} tokens)")
    used = (torch.arange(table.shape[1], device=table.device).unsqueeze(0) * page
            < lens.unsqueeze(1).to(table.device))
    if bool(used.any()):
        check_index_range(f"{name} (the entries {lens_name} uses)", table[used], 0,
                          num_pages)


def _as_int32(name: str, t: Tensor) -> Tensor:
    """An int32 / int64 index tensor as int32 (values must fit)."""
    if t.dtype == torch.int32:
        return t
    check_index_range(name, t, -(2**31), 2**31)
    return t.to(torch.int32)


def _rows_of(cu: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(sequence, index within the sequence) of each of the ``total`` rows of a varlen
    batch with offsets ``cu`` [B + 1] (no host sync)."""
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:].to(torch.int64), t, right=True)
    return seq, t - cu.to(torch.int64)[seq]


# ------------------------------------------------------------------- unified attention


def _kv_quant_mode(kv_quant_mode: object) -> int:
    """vLLM's KVQuantMode (an IntEnum) or an int -> 0 (NONE) or 1 (FP8_PER_TENSOR)."""
    if isinstance(kv_quant_mode, bool) or not isinstance(kv_quant_mode, int):
        raise TypeError(f"kv_quant_mode must be vLLM's KVQuantMode (an int enum), got "
                        f"{type(kv_quant_mode).__name__}")
    mode = int(kv_quant_mode)
    if mode not in (0, 1):
        name = getattr(kv_quant_mode, "name", str(mode))
        raise NotImplementedError(
            f"kv_quant_mode {name} is not supported by minikernels (its attention reads "
            f"fp16 / bf16 / fp32 caches and fp8 caches with per-tensor or per-head scales, "
            f"not per-token-head int8 / fp8, int4 or nvfp4 caches); pass KVQuantMode.NONE "
            f"or KVQuantMode.FP8_PER_TENSOR")
    return mode


def _check_scratch(seq_threshold_3D: object, num_par_softmax_segments: object,
                   softmax_segm_output: object, softmax_segm_max: object,
                   softmax_segm_expsum: object, num_prefills: object, num_decodes: object,
                   split_launch: object, heads: int, device: torch.device) -> None:
    """vLLM's launch hints and split-softmax scratch: checked, never written."""
    for name, value in (("seq_threshold_3D", seq_threshold_3D),
                        ("num_par_softmax_segments", num_par_softmax_segments)):
        if isinstance(value, Tensor):
            raise TypeError(f"{name} must be an int or None, got a tensor (vLLM's older "
                            f"positional order, alibi_slopes / output_scale here: pass "
                            f"those by keyword)")
        if value is not None:
            _int(name, value, 0)
    for name, value in (("num_prefills", num_prefills), ("num_decodes", num_decodes)):
        if value is not None:
            _int(name, value, 0)
    if split_launch is not None:
        _bool("split_launch", split_launch)
    for name, value, ndim in (("softmax_segm_output", softmax_segm_output, 4),
                              ("softmax_segm_max", softmax_segm_max, 3),
                              ("softmax_segm_expsum", softmax_segm_expsum, 3)):
        if value is not None:
            check_tensor(name, value, dtypes=(torch.float32,), ndim=ndim, device=device)
            assert isinstance(value, Tensor)
            if value.shape[1] != heads:
                raise ValueError(f"{name} must have shape [num_tokens, {heads}, "
                                 f"num_segments{', head_size_padded' if ndim == 4 else ''}]"
                                 f", got {list(value.shape)}")


def _unified_kv_scales(k: Tensor, k_descale: object, v_descale: object,
                       device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """fp8 caches: k_descale / v_descale become the op's per-tensor (or per-head) scales.
    Other caches: the descales are not read (vLLM's backend passes them for every cache)."""
    hkv = k.shape[2]
    if k.dtype not in FP8_KV_DTYPES:
        return None, None
    scales = []
    for name, s in (("k_descale", k_descale), ("v_descale", v_descale)):
        if s is None:
            raise ValueError(f"{name} is required with an fp8 cache (k is "
                             f"{str(k.dtype).replace('torch.', '')}): a float32 tensor of "
                             f"1 element (vLLM: [num_seqs, num_kv_heads] expanded from one)")
        scales.append(_scale_tensor(name, s, hkv, device, per_head=True))
    if scales[0].numel() != scales[1].numel():     # the kernels decide per-head once
        scales = [t.expand(hkv).contiguous() for t in scales]
    return scales[0], scales[1]


def unified_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Tensor,
                      max_seqlen_q: int, seqused_k: Tensor, max_seqlen_k: int,
                      softmax_scale: float, causal: bool, window_size: tuple[int, int],
                      block_table: Tensor, softcap: float, q_descale: Tensor | None,
                      k_descale: Tensor | None, v_descale: Tensor | None,
                      seq_threshold_3D: int | None = None,
                      num_par_softmax_segments: int | None = None,
                      softmax_segm_output: Tensor | None = None,
                      softmax_segm_max: Tensor | None = None,
                      softmax_segm_expsum: Tensor | None = None,
                      alibi_slopes: Tensor | None = None,
                      output_scale: Tensor | None = None,
                      qq_bias: Tensor | None = None, sinks: Tensor | None = None,
                      mm_prefix_range: Tensor | None = None, use_alibi_sqrt: bool = False,
                      kv_quant_mode: int = KVQuantMode.NONE,
                      k_scale_cache: Tensor | None = None,
                      v_scale_cache: Tensor | None = None, *,
                      num_prefills: int | None = None, num_decodes: int | None = None,
                      split_launch: bool | None = None,
                      prefix_lens: Tensor | None = None) -> None:
    """vLLM's ``unified_attention`` (TRITON_ATTN): varlen queries over paged caches,
    writing ``out`` in place.

    q [num_tokens, num_heads, head_size] fp16 / bf16 / fp32; k, v [num_blocks, block_size,
    num_kv_heads, head_size] (any strides, last dim contiguous; block_size any >= 1) of q's
    dtype, or float8_e4m3fn / float8_e5m2 dequantized with k_descale / v_descale (float32,
    1 element, or [num_seqs, num_kv_heads] / [num_kv_heads] per kv head; unread for other
    caches). cu_seqlens_q int32 [num_seqs + 1] (sequence b's new tokens are q rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1]; rows past cu_seqlens_q[-1] are left alone);
    seqused_k int32 [num_seqs]: sequence b's tokens in the cache (its new ones included,
    last); block_table int32 [num_seqs, max_blocks]. max_seqlen_q / max_seqlen_k: upper
    bounds of the query / key lengths. out like q (any strides), or float8_e4m3fn with
    output_scale (float32, 1 element: out = fp8(clamp(result / output_scale, +-448))).

    Query i of sequence b sits at seqused_k[b] - query_len + i and sees keys j <= its
    position (causal; causal=False: every key, with window_size[1] >= 0 bounding the
    right) with position - j <= window_size[0] (window_size[0] >= 0; vLLM passes
    (sliding_window - 1, 0)). Scores: softmax_scale * q.k, softcap * tanh(s / softcap)
    when softcap > 0, then ALiBi slope * (j - context_len) (alibi_slopes float32
    [num_heads] or [num_seqs, num_heads]; causal only). sinks [num_heads]: one extra logit
    per head. The scratch / launch-hint arguments are checked and unused; q_descale,
    qq_bias, mm_prefix_range, prefix_lens, use_alibi_sqrt=True, k_scale_cache /
    v_scale_cache and other kv_quant_modes raise NotImplementedError.
    """
    _refuse("q_descale", q_descale, "fp8 queries: minikernels' attention takes fp16 / "
            "bf16 / fp32 q; vLLM's kernel asserts q_descale is None")
    _refuse("qq_bias", qq_bias, "its attention has no query-query bias input")
    _refuse("mm_prefix_range", mm_prefix_range, "bidirectional multimodal prefix ranges: "
            "its masks are causal or local windows")
    _refuse("prefix_lens", prefix_lens, "PrefixLM bidirectional prefixes: its masks are "
            "causal or local windows")
    if _bool("use_alibi_sqrt", use_alibi_sqrt):
        raise NotImplementedError("use_alibi_sqrt=True (-slope * sqrt(distance)) is not "
                                  "supported by minikernels (its ALiBi is linear); pass "
                                  "False")
    mode = _kv_quant_mode(kv_quant_mode)
    _refuse("k_scale_cache", k_scale_cache, "per-token-head KV scales")
    _refuse("v_scale_cache", v_scale_cache, "per-token-head KV scales")

    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    dev = q.device
    tokens, hq, d = q.shape
    _check_scratch(seq_threshold_3D, num_par_softmax_segments, softmax_segm_output,
                   softmax_segm_max, softmax_segm_expsum, num_prefills, num_decodes,
                   split_launch, hq, dev)
    for name, c in (("k", k), ("v", v)):
        check_tensor(name, c, dtypes=(q.dtype, *FP8_KV_DTYPES), ndim=4, device=dev)
    if v.dtype != k.dtype:
        raise TypeError(f"v must have the dtype of k ({k.dtype}), got {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k's head size ({k.shape[3]}) must equal q's ({d})")
    num_blocks, block_size, hkv, _ = k.shape
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k's kv heads ({hkv})")
    causal = _bool("causal", causal)
    left, right = _window(window_size)
    softmax_scale = check_positive_float("softmax_scale", softmax_scale)
    softcap = check_positive_float("softcap", softcap, allow_zero=True)
    out_scale = _output_scale("output_scale", output_scale, dev)
    _check_out("out", out, [tokens, hq, d], q.dtype if out_scale is None else _FP8_OUT, dev)
    if mode == KVQuantMode.FP8_PER_TENSOR and k.dtype not in FP8_KV_DTYPES:
        raise ValueError(f"kv_quant_mode FP8_PER_TENSOR needs fp8 caches (float8_e4m3fn / "
                         f"float8_e5m2); k is {str(k.dtype).replace('torch.', '')}")
    check_sinks(sinks, hq, dev)
    if alibi_slopes is not None and not causal:
        raise ValueError("alibi_slopes needs causal=True (vLLM's bias slope * (key - "
                         "context_len) is defined for causal attention only)")

    cu_q = _index_tensor("cu_seqlens_q", cu_seqlens_q, 1, dev)
    if cu_q.dtype != torch.int32:
        raise TypeError(f"cu_seqlens_q must have dtype int32, got {cu_q.dtype}")
    used = _index_tensor("seqused_k", seqused_k, 1, dev)
    if used.dtype != torch.int32:
        raise TypeError(f"seqused_k must have dtype int32, got {used.dtype}")
    batch = used.shape[0]
    check_shape("cu_seqlens_q", cu_q, [batch + 1])
    table = _index_tensor("block_table", block_table, 2, dev)
    if table.dtype != torch.int32:
        raise TypeError(f"block_table must have dtype int32, got {table.dtype}")
    check_shape("block_table", table, [batch, None])
    _int("max_seqlen_q", max_seqlen_q, 0)
    _int("max_seqlen_k", max_seqlen_k, 0)
    total = tokens
    if index_checks_active(cu_q):
        total = int(cu_q[-1])
        if int(cu_q[0]) != 0 or bool((cu_q[1:] < cu_q[:-1]).any()):
            raise ValueError("cu_seqlens_q must start at 0 and be non-decreasing")
        if total > tokens:
            raise ValueError(f"cu_seqlens_q[-1] ({total}) exceeds q's tokens ({tokens})")
    _check_table("block_table", table, used, num_blocks, block_size, "seqused_k")
    if total == 0:
        return
    k_scale, v_scale = _unified_kv_scales(k, k_descale, v_descale, dev)

    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    cu_k[1:] = torch.cumsum(used, 0)
    kr, vr, tr = _split_pages(k, v, table)
    qs = q[:total]
    if max_seqlen_q == 1 and total == batch:
        # one query per sequence (decode): the split-KV decode op; with one query, vLLM's
        # ALiBi bias equals the op's (context_len = seq_len - 1)
        result = ops.paged_decode_attention(
            qs, kr, vr, tr, used, softmax_scale, left, softcap, k_scale=k_scale,
            v_scale=v_scale, alibi_slopes=alibi_slopes, sinks=sinks)
    elif sinks is not None and alibi_slopes is not None:
        result = _alibi_sinks(qs, kr, vr, cu_q, cu_k, tr, max_seqlen_q, max_seqlen_k,
                              softmax_scale, left, softcap, k_scale, v_scale, alibi_slopes,
                              sinks, total)
    else:
        result = ops.flash_attention(
            qs, kr, vr, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal=causal,
            softmax_scale=softmax_scale, window_left=left, softcap=softcap, block_table=tr,
            window_right=right, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes,
            sinks=sinks)
    out[:total].copy_(_finish(result, out_scale))


def _alibi_sinks(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, table: Tensor,
                 max_q: int, max_k: int, scale: float, left: int, softcap: float,
                 k_scale: Tensor | None, v_scale: Tensor | None, alibi_slopes: Tensor,
                 sinks: Tensor, total: int) -> Tensor:
    """Causal attention with ALiBi and sinks as vLLM's kernel computes it.

    vLLM's bias slope * (j - context_len) is the op's -slope * (pos - j) plus slope * i
    (i: the query's index among its sequence's new tokens): a per-row shift, which the
    softmax over keys ignores but the sink logit does not. So: the op without sinks (LSE
    of its own bias), then each row's sink weight from its LSE shifted by slope * i."""
    out, lse = ops.flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                   softmax_scale=scale, window_left=left, softcap=softcap,
                                   block_table=table, return_lse=True, k_scale=k_scale,
                                   v_scale=v_scale, alibi_slopes=alibi_slopes)
    seq, idx = _rows_of(cu_q, total)
    slopes = alibi_slopes.float()
    slope = (slopes.unsqueeze(0).expand(total, -1) if slopes.dim() == 1
             else slopes[seq])                                          # [T, Hq]
    shifted = lse.t() + slope * idx.unsqueeze(1).float()                # [T, Hq]
    weight = torch.sigmoid(shifted - sinks.float().unsqueeze(0))        # no key: 0
    return (out.float() * weight.unsqueeze(-1)).to(out.dtype)


# ------------------------------------------------------------- prefix-prefill (legacy)


def _cache_format(kv_cache_dtype: object, q_dtype: torch.dtype
                  ) -> tuple[tuple[torch.dtype, ...], torch.dtype | None]:
    """kv_cache_dtype -> (allowed cache dtypes, fp8 format or None)."""
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in FP8_KV_FORMATS:
        fmt = FP8_KV_FORMATS[kv_cache_dtype]
        return (torch.uint8, fmt), fmt
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in _PLAIN_KV_CACHE_DTYPES:
        named = _PLAIN_KV_CACHE_DTYPES[kv_cache_dtype]
        if named is not None and named != q_dtype:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} must name q's dtype "
                             f"({q_dtype}) (vLLM's kernel multiplies q by the cache as is)")
        return (q_dtype,), None
    raise ValueError(f"kv_cache_dtype must be 'auto', a float dtype name like q's "
                     f"('float16', 'bfloat16', 'float'), 'fp8', 'fp8_e4m3' or 'fp8_e5m2', "
                     f"got {kv_cache_dtype!r}")


def _block_ids(b_loc: Tensor, k_cache: Tensor, is_block_table_ptr: bool) -> Tensor:
    """b_loc as block ids int64: vLLM's is_block_table_ptr form holds each block's byte
    address ((address - k_cache's) // the block stride in bytes; 0 entries stay 0)."""
    if not is_block_table_ptr:
        return b_loc.long()
    stride = k_cache.stride(0) * k_cache.element_size()
    base = k_cache.data_ptr()
    return torch.where(b_loc > 0, (b_loc.long() - base) // stride, b_loc.long())


def context_attention_fwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, kv_cache_dtype: str,
                          k_cache: Tensor, v_cache: Tensor, b_loc: Tensor,
                          b_start_loc: Tensor, b_seq_len: Tensor, max_seq_len: int | None,
                          max_input_len: int, k_scale: Tensor, v_scale: Tensor,
                          alibi_slopes: Tensor | None = None,
                          sliding_window: int | None = None, sm_scale: float | None = None,
                          skip_decode: bool = False, fp8_out_scale: Tensor | None = None,
                          sinks: Tensor | None = None, is_block_table_ptr: bool = False,
                          causal: bool = True, softcap: float = 0.0) -> None:
    """vLLM's ``context_attention_fwd`` (prefix prefill): each sequence's new tokens attend
    to its cached context and to themselves, writing ``o`` in place.

    q [num_tokens, num_heads, head_size] fp16 / bf16 / fp32; k, v [num_tokens,
    num_kv_heads, head_size] (q's dtype): the new tokens' keys / values (rows as q's).
    k_cache [num_blocks, num_kv_heads, head_size // x, block_size, x], v_cache
    [num_blocks, num_kv_heads, head_size, block_size] (vLLM's legacy layouts, as
    compat.vllm_ops.reshape_and_cache writes them; any strides): q's dtype for
    kv_cache_dtype "auto" (or q's dtype name, e.g. "float16"), uint8 or the float8 format
    for "fp8" / "fp8_e4m3" / "fp8_e5m2", dequantized as (cache * k_scale).to(q's dtype)
    (k_scale / v_scale float32, 1 element or [num_kv_heads]; unread otherwise).
    b_loc [num_seqs, max_blocks] int32 / int64 block table (is_block_table_ptr: block
    byte addresses); b_start_loc int32 [num_seqs + 1]: sequence b's new tokens are rows
    b_start_loc[b]:b_start_loc[b + 1] (b_start_loc[0] == 0); b_seq_len int32 / int64
    [num_seqs]: context + new tokens, the context being the first b_seq_len[b] -
    query_len cached tokens. max_input_len >= every query length; max_seq_len unused.
    o like q (any strides), or float8_e4m3fn with fp8_out_scale (float32, 1 element).

    Query i sits at context_len + i and sees every context token and new tokens <= i
    (causal; causal=False: every new token), restricted to position - key <
    sliding_window when sliding_window > 0. sm_scale default head_size ** -0.5; softcap
    (later releases) caps the scaled scores; alibi_slopes float32 [num_heads]: bias
    -slope * (position - key) (vLLM's ALiBi kernel: causal, no sinks / fp8 output /
    sliding_window); sinks [num_heads]. skip_decode: rows of sequences with one new token
    are left unwritten.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    dev = q.device
    tokens, hq, d = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=3, device=dev)
    check_shape("v", v, list(k.shape))
    hkv = k.shape[1]
    if k.shape[2] != d:
        raise ValueError(f"k's head size ({k.shape[2]}) must equal q's ({d})")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k's kv heads ({hkv})")
    dtypes, fp8 = _cache_format(kv_cache_dtype, q.dtype)
    _, block_size, x = _legacy_caches(k_cache, v_cache, dtypes, hkv, d, dev,
                                      ("k_cache", "v_cache"))
    if fp8 is not None:
        kc, vc = k_cache.view(fp8), v_cache.view(fp8)
        ks = _scale_tensor("k_scale", k_scale, hkv, dev, per_head=True)
        vs = _scale_tensor("v_scale", v_scale, hkv, dev, per_head=True)
    else:
        kc, vc, ks, vs = k_cache, v_cache, None, None
    causal = _bool("causal", causal)
    skip_decode = _bool("skip_decode", skip_decode)
    is_block_table_ptr = _bool("is_block_table_ptr", is_block_table_ptr)
    window = 0 if sliding_window is None else _int("sliding_window", sliding_window,
                                                    -(2**63))
    window = max(window, 0)
    scale = d ** -0.5 if sm_scale is None else check_positive_float("sm_scale", sm_scale)
    softcap = check_positive_float("softcap", softcap, allow_zero=True)
    out_scale = _output_scale("fp8_out_scale", fp8_out_scale, dev)
    _check_out("o", o, [tokens, hq, d], q.dtype if out_scale is None else _FP8_OUT, dev)
    if max_seq_len is not None:
        _int("max_seq_len", max_seq_len, 0)
    max_input_len = _int("max_input_len", max_input_len, 0)
    if alibi_slopes is not None:
        for name, bad, why in (("sinks", sinks is not None, "sinks"),
                               ("fp8_out_scale", out_scale is not None, "fp8 output"),
                               ("causal", not causal, "non-causal attention"),
                               ("sliding_window", window > 0,
                                "a sliding window (vLLM's ALiBi kernel ignores it)"),
                               ("softcap", softcap > 0, "softcap")):
            if bad:
                raise ValueError(f"{name}: vLLM's ALiBi prefix-prefill kernel has no {why};"
                                 f" pass alibi_slopes=None or drop {name}")
    if not causal and window > 0:
        raise NotImplementedError("sliding_window with causal=False: vLLM's kernel defines "
                                  "no two-sided window; pass sliding_window=None")

    start = _index_tensor("b_start_loc", b_start_loc, 1, dev)
    seq_len = _index_tensor("b_seq_len", b_seq_len, 1, dev)
    b_loc = _index_tensor("b_loc", b_loc, 2, dev)
    batch = seq_len.shape[0]
    check_shape("b_start_loc", start, [batch + 1])
    check_shape("b_loc", b_loc, [batch, None])
    # host copies: the per-call gather below is sized by them (a legacy / test path)
    start_h = start.cpu().long()
    lens_h = seq_len.cpu().long()
    q_lens_h = start_h[1:] - start_h[:-1]
    if batch and (int(start_h[0]) != 0 or bool((q_lens_h < 0).any())):
        raise ValueError("b_start_loc must start at 0 and be non-decreasing")
    total = int(start_h[-1])
    if total > tokens or total > k.shape[0]:
        raise ValueError(f"b_start_loc[-1] ({total}) exceeds the new tokens in q "
                         f"({tokens}) or k / v ({k.shape[0]})")
    if batch and int(q_lens_h.max()) > max_input_len:
        raise ValueError(f"max_input_len ({max_input_len}) is below a query length "
                         f"({int(q_lens_h.max())}): vLLM's kernel would skip rows")
    ctx_h = lens_h - q_lens_h
    if bool((ctx_h < 0).any()):
        raise ValueError("b_seq_len must be >= each sequence's new tokens (b_start_loc[b + 1]"
                         " - b_start_loc[b]): it counts the context and the new tokens")
    blocks = _block_ids(b_loc, k_cache, is_block_table_ptr)
    _check_table("b_loc", blocks, ctx_h.to(dev), k_cache.shape[0], block_size,
                 "the context (b_seq_len - query length)")
    if total == 0:
        return

    # every sequence's keys: its context (gathered from the legacy caches) then its new
    # tokens, as one varlen batch
    total_ctx = int(ctx_h.sum())
    cu_k_h = torch.zeros(batch + 1, dtype=torch.int64)
    cu_k_h[1:] = torch.cumsum(lens_h, 0)
    kk = torch.empty(int(cu_k_h[-1]), hkv, d, dtype=q.dtype, device=dev)
    vv = torch.empty_like(kk)
    new_seq = torch.repeat_interleave(torch.arange(batch), q_lens_h)
    new_dst = cu_k_h[new_seq] + ctx_h[new_seq] + (torch.arange(total) - start_h[new_seq])
    kk[new_dst.to(dev)] = k[:total]
    vv[new_dst.to(dev)] = v[:total]
    if total_ctx:
        ctx_seq = torch.repeat_interleave(torch.arange(batch), ctx_h)
        pos = torch.arange(total_ctx) - torch.repeat_interleave(
            torch.cumsum(ctx_h, 0) - ctx_h, ctx_h)
        blk = blocks[ctx_seq.to(dev), (pos // block_size).to(dev)]
        off = (pos % block_size).to(dev)
        k_rows = kc[blk, :, :, off, :].reshape(total_ctx, hkv, d)   # [n, H, D/x, x]
        v_rows = vc[blk, :, :, off]                                  # [n, H, D]
        if fp8 is not None:
            # vLLM's kernel: (cache.to(fp32) * scale).to(q's dtype)
            k_rows = (k_rows.float() * ks.view(-1, 1)).to(q.dtype)
            v_rows = (v_rows.float() * vs.view(-1, 1)).to(q.dtype)
        ctx_dst = (cu_k_h[ctx_seq] + pos).to(dev)
        kk[ctx_dst] = k_rows
        vv[ctx_dst] = v_rows
    cu_q = start.to(torch.int32)
    cu_k = cu_k_h.to(dev, torch.int32)
    max_k = int(lens_h.max()) if batch else 0
    result = ops.flash_attention(q[:total], kk, vv, cu_q, cu_k, max_input_len, max_k,
                                 causal=causal, softmax_scale=scale, window_left=window - 1,
                                 softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    result = _finish(result, out_scale)
    if skip_decode:
        keep = (q_lens_h != 1)[new_seq].to(dev)
        o[:total][keep] = result[keep]
    else:
        o[:total].copy_(result)


# ------------------------------------------------------------------- decode (SGLang's)


def _paged_buffer(name: str, buf: Tensor, page_size: int) -> Tensor:
    """k_buffer / v_buffer -> a [num_pages, page_size, H, D] view (no copy): a token
    buffer [num_tokens, H, D] cut into pages of page_size tokens (trailing tokens that
    fill no page are not addressable), or a paged buffer [num_pages, page_size, H, D]."""
    if buf.dim() == 4:
        if buf.shape[1] != page_size:
            raise ValueError(f"page_size ({page_size}) must equal {name}'s page size (dim 1"
                             f" of [num_pages, page_size, num_kv_heads, head_size]: "
                             f"{buf.shape[1]})")
        return buf
    n, h, dd = buf.shape
    return buf.as_strided((n // page_size, page_size, h, dd),
                          (page_size * buf.stride(0), buf.stride(0), buf.stride(1),
                           buf.stride(2)))


def _decode_attention(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor,
                      lse: Tensor | None, req_to_token: Tensor, b_seq_len: Tensor,
                      attn_logits: Tensor, num_kv_splits: int, sm_scale: float,
                      page_size: int = 1, logit_cap: float = 0.0,
                      k_scale: Tensor | None = None) -> None:
    """vLLM's current ``decode_attention_fwd`` signature; see :func:`decode_attention_fwd`."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    dev = q.device
    batch, hq, d = q.shape
    for name, buf in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        check_tensor(name, buf, dtypes=(q.dtype, *FP8_KV_DTYPES), ndim=(3, 4), device=dev)
    if v_buffer.dtype != k_buffer.dtype:
        raise TypeError(f"v_buffer must have the dtype of k_buffer ({k_buffer.dtype}), got "
                        f"{v_buffer.dtype}")
    if k_buffer.shape[-1] != d:
        raise ValueError(f"k_buffer's head size ({k_buffer.shape[-1]}) must equal q's ({d})")
    if d > MAX_HEAD_DIM:
        raise NotImplementedError(f"q / k_buffer head size {d} is not supported by "
                                  f"minikernels (its attention takes head sizes up to "
                                  f"{MAX_HEAD_DIM}; vLLM's MLA decode uses 576)")
    if v_buffer.shape[-1] != d:
        raise NotImplementedError(f"v_buffer's head size ({v_buffer.shape[-1]}) unlike "
                                  f"k_buffer's ({d}) is not supported by minikernels (its "
                                  f"attention uses one head size for q, k and v)")
    if v_buffer.shape[:-1] != k_buffer.shape[:-1] or v_buffer.dim() != k_buffer.dim():
        raise ValueError(f"v_buffer must have k_buffer's shape but the last dim "
                         f"{list(k_buffer.shape[:-1])}, got {list(v_buffer.shape)}")
    hkv = k_buffer.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k_buffer's kv heads "
                         f"({hkv})")
    page_size = _int("page_size", page_size, 1)
    num_kv_splits = _int("num_kv_splits", num_kv_splits, 1)
    sm_scale = check_positive_float("sm_scale", sm_scale)
    logit_cap = check_positive_float("logit_cap", logit_cap, allow_zero=True)
    check_tensor("o", o, dtypes=FLOAT_DTYPES, device=dev)
    check_shape("o", o, [batch, hq, d])
    if lse is not None:
        check_tensor("lse", lse, dtypes=FLOAT_DTYPES, device=dev)
        check_shape("lse", lse, [batch, hq])
    check_tensor("attn_logits", attn_logits, dtypes=(torch.float32,), ndim=4, device=dev)
    check_shape("attn_logits", attn_logits, [batch, hq, num_kv_splits, d + 1])
    table = _index_tensor("req_to_token", req_to_token, (2, 3), dev)
    if table.dim() == 3:
        if table.shape[2] != 1:
            raise ValueError(f"req_to_token must be [batch, entries] (or [batch, entries, "
                             f"1]), got {list(table.shape)}")
        table = table[:, :, 0]
    check_shape("req_to_token", table, [batch, None])
    seq_lens = _index_tensor("b_seq_len", b_seq_len, 1, dev)
    check_shape("b_seq_len", seq_lens, [batch])
    kb = _paged_buffer("k_buffer", k_buffer, page_size)
    vb = _paged_buffer("v_buffer", v_buffer, page_size)
    what = "page ids" if page_size > 1 else "token slots"
    _check_table(f"req_to_token ({what})", table, seq_lens, kb.shape[0], page_size,
                 "b_seq_len")
    table = _as_int32("req_to_token", table)
    seq_lens = _as_int32("b_seq_len", seq_lens)

    scale, out_mult, ks = sm_scale, None, None
    if k_buffer.dtype in FP8_KV_DTYPES:
        # vLLM dequantizes both k and v with k_scale (none: the stored values as they are)
        ks = _scale_tensor("k_scale", 1.0 if k_scale is None else k_scale, hkv, dev,
                           per_head=False)
    elif k_scale is not None:
        # vLLM multiplies the k and v it reads by k_scale even here: scores and outputs
        # are linear in them, so fold it into the scale and the output
        mult = _number("k_scale", k_scale)
        if not math.isfinite(mult) or mult <= 0:
            raise ValueError(f"k_scale must be finite and > 0, got {mult}")
        scale, out_mult = sm_scale * mult, mult
    kb, vb, table = _split_pages(kb, vb, table)
    out, lse_e = ops.paged_decode_attention(q, kb, vb, table, seq_lens, scale, -1,
                                            logit_cap, num_kv_splits, return_lse=True,
                                            k_scale=ks, v_scale=ks)
    if out_mult is not None:
        out = out * out_mult
    o.copy_(out)
    if lse is not None:
        lse.copy_(lse_e)


def _decode_attention_without_lse(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor,
                                  req_to_token: Tensor, b_seq_len: Tensor,
                                  attn_logits: Tensor, num_kv_splits: int, sm_scale: float,
                                  page_size: int = 1, logit_cap: float = 0.0) -> None:
    """vLLM's older ``decode_attention_fwd`` signature (before ``lse``)."""
    _decode_attention(q, k_buffer, v_buffer, o, None, req_to_token, b_seq_len, attn_logits,
                      num_kv_splits, sm_scale, page_size, logit_cap)


_DECODE_SIG = inspect.signature(_decode_attention)
_DECODE_OLD_SIG = inspect.signature(_decode_attention_without_lse)


def decode_attention_fwd(*args: Any, **kwargs: Any) -> None:
    """vLLM's ``decode_attention_fwd(q, k_buffer, v_buffer, o, lse, req_to_token,
    b_seq_len, attn_logits, num_kv_splits, sm_scale, page_size=1, logit_cap=0.0,
    k_scale=None)``: one query per sequence, writing ``o`` and ``lse`` in place.

    q [batch, num_heads, head_size] fp16 / bf16 / fp32. k_buffer, v_buffer (q's dtype, or
    float8_e4m3fn / float8_e5m2: keys and values are buffer * k_scale, vLLM's one scale
    for both; any strides, last dim contiguous): [num_tokens, num_kv_heads, head_size]
    with page_size 1 (req_to_token [batch, >= max seq len] holds each token's slot) or
    with page_size > 1 cut into pages of page_size tokens, or [num_pages, page_size,
    num_kv_heads, head_size] (req_to_token holds page ids; token t of sequence b is at
    page req_to_token[b, t // page_size], offset t % page_size). req_to_token int32 /
    int64 [batch, n] (or [batch, n, 1]); b_seq_len int32 / int64 [batch]: tokens per
    sequence. o [batch, num_heads, head_size] and lse [batch, num_heads] (natural-log
    LSE), any float dtype, written. attn_logits float32 [batch, num_heads, num_kv_splits,
    head_size + 1]: vLLM's scratch, checked and unwritten. Scores sm_scale * q.k, then
    logit_cap * tanh(s / logit_cap) when logit_cap > 0. k_scale (float32, 1 element) with
    a non-fp8 buffer scales k and v too, as vLLM's kernel does.

    The older form without ``lse`` (``decode_attention_fwd(q, k_buffer, v_buffer, o,
    req_to_token, b_seq_len, attn_logits, num_kv_splits, sm_scale, page_size=1,
    logit_cap=0.0)``) is recognised by an integer tensor in lse's place.
    """
    if len(args) > 4:
        old = isinstance(args[4], Tensor) and not args[4].is_floating_point()
    else:
        old = "lse" not in kwargs and "req_to_token" in kwargs
    sig = _DECODE_OLD_SIG if old else _DECODE_SIG
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"decode_attention_fwd{_DECODE_SIG}: {e}") from None
    if old:
        _decode_attention_without_lse(*bound.args, **bound.kwargs)
    else:
        _decode_attention(*bound.args, **bound.kwargs)


decode_attention_fwd.__signature__ = _DECODE_SIG  # type: ignore[attr-defined]
