"""vLLM's kernel-op API (``vllm._custom_ops``, and the ``torch.ops._C`` out-first ops it
wraps) on minikernels, so code and kernel tests written against vLLM swap one import:

    from minikernels.compat import vllm_ops as ops   # was: from vllm import _custom_ops as ops
    ops.rms_norm(out, x, weight, 1e-6)                # writes out
    ops.fused_add_rms_norm(x, residual, weight, 1e-6) # in place: residual += x, x = norm
    ops.rotary_embedding(positions, q, k, 128, cos_sin_cache, True)   # in place on q, k

Names, positional argument order, defaults, dtypes and layouts are vLLM's. Functions that
vLLM documents as writing their out-parameters or mutating their inputs write the caller's
tensors (``out.copy_(result)``), views with their own strides included, and return None;
the others return what vLLM returns. Errors are ValueError / TypeError naming vLLM's
argument. The math is minikernels' ops (reference on the CPU, Triton / CUDA on a GPU),
except where a function says "plain PyTorch".

Covered (vLLM name -> minikernels op):
    rms_norm(out, input, weight, epsilon)               ops.rms_norm (weight None = ones)
    fused_add_rms_norm(input, residual, weight, epsilon)  ops.rms_norm(residual=...)
    gemma_rms_norm(out, input, weight, epsilon)         ops.gemma_rms_norm     (torch.ops._C)
    fused_add_gemma_rms_norm(input, residual, weight, epsilon)                 (torch.ops._C)
    silu_and_mul / mul_and_silu / gelu_and_mul / gelu_tanh_and_mul(out, input) (torch.ops._C)
    fatrelu_and_mul(out, input, threshold=0.0), swigluoai_and_mul(out, input, alpha=1.702,
        limit=7.0) (interleaved gate / up), gelu_fast / gelu_new / gelu_quick(out, input)
                                                        ops.fatrelu_and_mul /
                                                        swigluoai_and_mul / gelu_variant
    rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox,
                     rope_dim_offset=0, inverse=False)  ops.rotary_embedding
    fused_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps,
                       q_weight, k_weight, cos_sin_cache, is_neox, position_ids)
                                                        ops.qk_norm_rope, in place on qkv
    reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                            kv_cache_dtype, k_scale, v_scale)  ops.write_kv_cache
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                      k_scale, v_scale, interleaved_v=False)
                                                        plain PyTorch (vLLM's legacy
                                                        x-split caches, below)
    paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, scale,
                       block_tables, seq_lens, block_size, max_seq_len, alibi_slopes,
                       kv_cache_dtype, k_scale, v_scale, tp_rank=0,
                       blocksparse_local_blocks=0, blocksparse_vert_stride=0,
                       blocksparse_block_size=64, blocksparse_head_sliding_step=0)
                                                        ops.paged_decode_attention on a
                                                        copy in minikernels' layout
    paged_attention_v2(out, exp_sum, max_logits, tmp_out, query, ... as v1)  the same;
                                                        only out is written
    convert_fp8(output, input, scale=1.0, kv_dtype="fp8")  plain PyTorch (fp8 KV rows)
    swap_blocks(src, dst, [block_size_in_bytes,] block_mapping), copy_blocks(key_caches,
        value_caches, block_mapping), copy_blocks_mla(kv_caches, block_mapping),
        concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale),
        cp_gather_cache(src_cache, dst, block_table, cu_seq_lens, batch_size,
        seq_starts=None), gather_and_maybe_dequant_cache(src_cache, dst, block_table,
        cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts=None)
                                                        plain PyTorch block / row copies
                                                        (compat/vllm_cache_ops.py)
    merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                      output_lse=None, prefill_tokens_with_context=None,
                      output_scale=None)                ops.merge_attn_states
    scaled_int8_quant(input, scale=None, azp=None, symmetric=True)  ops.scaled_int8_quant;
    static_scaled_int8_quant(out, input, scale, azp=None), dynamic_scaled_int8_quant(out,
        input, scales, azp=None)                       the same (torch.ops._C forms)
    apply_repetition_penalties(logits, prompt_mask, output_mask, repetition_penalties)
                                                        plain PyTorch, in place (vLLM's
                                                        formula)
    per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=
        False, tma_aligned_scales=False, use_ue8m0=None)   ops.per_token_group_quant_fp8
    per_token_group_quant_int8(x, group_size, eps=1e-10, dtype=torch.int8)
                                                        plain PyTorch (rounds; vLLM's
                                                        kernel truncates)
    cutlass_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias=None)  ops.scaled_mm; the
                      128 x 128 block-scaled fp8 form: ops.w8a8_block_fp8_matmul
    cutlass_scaled_mm_azp(a, b, scale_a, scale_b, out_dtype, azp_adj, azp=None, bias=None)
                                                        ops.scaled_mm(azp_adj=, azp=)
    triton_scaled_mm(input, weight, scale_a, scale_b, out_dtype, bias=None, ...)
                                                        ops.scaled_mm (compressed-tensors'
                                                        Triton W8A8 GEMM)
    w8a8_block_fp8_matmul / w8a8_triton_block_scaled_mm(A, B, As, Bs, block_size,
        output_dtype=torch.float16)                    ops.w8a8_block_fp8_matmul (fp8_utils)
    per_token_quant_int8(x)                             ops.scaled_int8_quant (int8_utils)
    w8a8_block_int8_matmul(A, B, As, Bs, block_size, output_dtype=torch.float16)
                                                        ops.scaled_mm per K block, summed in
                                                        fp32 (int8_utils; a compat path)
    scaled_fp8_quant(input, scale=None, num_token_padding=None, scale_ub=None,
                     use_per_token_if_dynamic=False, output=None, group_shape=None)
                                                        plain PyTorch (no minikernels op
                                                        has these scale rules)
    static_scaled_fp8_quant(out, input, scale, group_shape=None),
    dynamic_scaled_fp8_quant(out, input, scale), dynamic_per_token_scaled_fp8_quant(out,
        input, scales, scale_ub=None)                  the same (torch.ops._C forms)
    rms_norm_static_fp8_quant(out, input, weight, scale, epsilon),
    fused_add_rms_norm_static_fp8_quant(out, input, residual, weight, scale, epsilon),
    rms_norm_dynamic_per_token_quant(input, weight, epsilon, quant_dtype, scale_ub=None,
        residual=None), rms_norm_per_block_quant(input, weight, epsilon, quant_dtype,
        group_size, scale_ub=None, residual=None, is_scale_transposed=False,
        tma_alignment=0)                               ops.rms_norm_quant (one fused
                                                        kernel; int8 / fp8; section below)
    silu_and_mul_quant(out, input, scale), silu_and_mul_per_block_quant(input,
        group_size, quant_dtype, scale_ub=None, is_scale_transposed=False)
                                                        ops.act_and_mul_quant
    fused_topk(hidden_states, gating_output, topk, renormalize), fused_experts(
        hidden_states, w1, w2, topk_weights, topk_ids, ...), fused_moe(hidden_states, w1,
        w2, gating_output, topk, renormalize, ...)   vLLM's fused-MoE Python API
                                                        (compat/vllm_fused_moe.py):
                                                        ops.fused_moe / _int8 / _fp8;
                                                        int8 W8A8 on ops.scaled_mm
    moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids,
                         experts_ids, num_tokens_post_pad, expert_map=None)
                                                        ops.moe_align_block_size
    topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output,
                 renormalize=False)                     ops.topk_softmax
    topk_sigmoid(topk_weights, topk_ids, token_expert_indices, gating_output,
                 renormalize=False, e_score_correction_bias=None)  ops.topk_sigmoid
    grouped_topk(hidden_states, gating_output, topk, renormalize, num_expert_group=0,
                 topk_group=0, scoring_func="softmax", routed_scaling_factor=1.0,
                 e_score_correction_bias=None)          ops.topk_sigmoid (sigmoid scoring)
    causal_conv1d_fn(x, weight, bias, conv_states, query_start_loc, cache_indices=None,
                     has_initial_state=None, activation="silu", pad_slot_id=-1)
                                                        ops.causal_conv1d (vLLM's
                                                        mamba/ops/causal_conv1d.py; x
                                                        [dim, tokens], out likewise)
    causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, pad_slot_id=-1)
                                                        ops.causal_conv1d (x [batch, dim]
                                                        or [batch, dim, seqlen])
    fused_recurrent_gated_delta_rule(q, k, v, g, beta=None, scale=None,
                 initial_state=None, inplace_final_state=True, cu_seqlens=None,
                 ssm_state_indices=None, num_accepted_tokens=None,
                 use_qk_l2norm_in_kernel=False)         ops.gated_delta_rule (vLLM's
                                                        model_executor.layers.fla.ops;
                                                        unsupported arguments raise
                                                        NotImplementedError)
    selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                 dt_softplus=False, state_batch_indices=None, dst_state_batch_indices=None,
                 pad_slot_id=-1, out=None, num_accepted_tokens=None, cu_seqlens=None, ...)
                                                        ops.mamba2_scan (vLLM's mamba/ops/
                                                        mamba_ssm.py; Mamba-2 decode, one
                                                        A / dt / D / dt_bias per head), or
                                                        ops.selective_scan (Mamba-1's 3-D
                                                        form, per-channel values)
    selective_scan_fwd(u, delta, A, B, C, D_, z_, delta_bias_, delta_softplus,
                       query_start_loc, cache_indices, has_initial_state, ssm_states,
                       pad_slot_id, block_size=1024, ...)  ops.selective_scan (Mamba-1's
                                                        varlen prefill; out into delta,
                                                        gated out into z_)
    selective_scan_fn(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, query_start_loc=None, cache_indices=None,
                      has_initial_state=None, pad_slot_id=-1, ...)
                                                        the same (vLLM's Python wrapper in
                                                        mamba/ops/mamba_ssm.py: returns z,
                                                        or delta)
    gptq_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama,
              use_v2_format, bit)                       ops.int4_matmul (bit 4) /
                                                        ops.int8_matmul (bit 8) on the
                                                        weight converted per call (below);
                                                        the older (..., use_exllama, bit)
                                                        form too
    gptq_shuffle(q_weight, q_perm, bit)                 plain PyTorch, in place (exllama's
                                                        row permutation + word shuffle)
    awq_gemm(input, qweight, scales, qzeros, split_k_iters)   as gptq_gemm (AutoAWQ's GEMM
                                                        layout; note scales before qzeros)
    awq_dequantize(qweight, scales, zeros, split_k_iters, thx, thy)  plain PyTorch, exact

GPTQ / AWQ: the checkpoint words are decoded (decode_gptq / decode_awq, the unpacking
rules of quant/checkpoints.py's from_gptq / from_awq plus exllama's shuffled order; GPTQ
v1 zeros + 1 as vLLM's kernels apply them; act-order g_idx) into a GroupedWeight, which
converts to minikernels' int4 / int8 layout (rows sorted by group, act order as a gather
of the activations' columns) and runs ops.int4_matmul / ops.int8_matmul; fp32
activations or scales, mixed dtypes and uneven g_idx groups run an exact fp32
dequantize + matmul instead. The vLLM functions convert on every call (an unpack and
repack of the K x N weight and a host sync: a compat path; serve such checkpoints through
quant.from_gptq / from_awq + Int4Linear, converted once). Supersets of vLLM: fp16 / bf16
/ fp32 (vLLM's CUDA kernels read fp16), any leading dims on the activations, empty b_g_idx
without exllama (sequential groups), K / N only multiples of what the packing needs.

Legacy caches: vLLM's "x-split" key cache [num_blocks, num_kv_heads, head_size / x,
block_size, x] (x = 16 // element_size) and value cache [num_blocks, num_kv_heads,
head_size, block_size] are not strided views of minikernels' [num_blocks, block_size,
num_kv_heads, head_size] cache (the head dim is split in two, or not unit-stride), so no
op reads or writes them in place: reshape_and_cache writes them with PyTorch indexing, and
paged_attention_v1 / v2 copy the blocks the block table names into minikernels' layout on
every call (a legacy / test path, not a serving one).

Not covered (not defined here; calling them is an AttributeError):
    moe_sum, the other fused quant ops (persistent_masked_m_silu_mul_quant,
        silu_and_mul_nvfp4_quant, ...): no minikernels op computes them (they would be
        plain PyTorch, not a mapping).
    machete / allspark / ggml / fp4 / MLA attention / fp8_ds_mla caches / all-reduce /
        CPU ops: other weight formats (Machete tiles, GGUF blocks, fp4) or features
        minikernels does not have. (Marlin's gptq_marlin_gemm and repacks: see
        minikernels.compat.vllm_marlin, which decodes the Marlin tiles per call.)
    gptq_gemm / gptq_shuffle with bit 2 or 3: minikernels has no 2- / 3-bit weight op
        (a ValueError naming bit, also a NotImplementedError).
    Arguments of covered functions with no minikernels equivalent raise a ValueError
        naming them: moe_align_block_size's scatter_idx, topk_softmax's
        e_score_correction_bias / is_padding, paged_attention_v1 / v2's
        blocksparse_vert_stride > 1 (vLLM's block-sparse mode; the other blocksparse_*
        values and tp_rank are unused otherwise, as in vLLM), reshape_and_cache's
        interleaved_v=True (ROCm's interleaved value cache).

Differences, by design:
    - fp32 math with one rounding to the output dtype (rms_norm: vLLM rounds x * rsqrt to
      the input dtype before multiplying by weight; silu / gelu_and_mul: vLLM rounds the
      activation before the product): results may differ from vLLM's by about an ulp of
      fp16 / bf16.
    - merge_attn_states: where both states are empty (lse -inf or +inf on both sides) the
      output is 0 and output_lse -inf (vLLM's kernels produce NaN there).
    - scaled_fp8_quant: a zero scale (an all-zero input's dynamic scale) quantizes to 0
      (vLLM's kernel writes 448 there, which also dequantizes to 0); rows added by
      num_token_padding are 0 and their per-token scales 0 (vLLM leaves them unwritten).
    - paged_attention_v2 leaves exp_sum / max_logits / tmp_out unwritten (vLLM's
      per-partition softmax scratch; only out is defined, and vLLM's tests read only out).
      paged_attention_v1 / v2 take any block_size in [1, 256] and head_size in [1, 512]
      (vLLM: block sizes 8 / 16 / 32, a fixed list of head sizes), per-head fp8 scales and
      [num_seqs, num_heads] ALiBi slopes; reshape_and_cache takes per-head scales (vLLM's
      kernel reads one). Both read x from key_cache's last dim (vLLM's attention kernel
      assumes 16 // element_size) and take caches with any strides.
    - cutlass_scaled_mm also takes out_dtype float32 and any M, N, K (vLLM: fp16 / bf16);
      positions may be int32 as well as int64; outputs of the returning functions are
      contiguous (vLLM's scaled_int8_quant keeps input's strides).
    - causal_conv1d_fn / causal_conv1d_update write zeros to the outputs of padding
      entries (pad_slot_id; vLLM leaves them unwritten) and take conv states with any
      strides; the prefix-caching, speculative-decoding and varlen-update arguments raise.
    - selective_state_update writes zeros to the outputs of padding rows (vLLM computes
      them from a zero state); in the Mamba-2 head form it rounds y to x's dtype before
      the z gate (vLLM gates in fp32; the per-channel form gates in fp32 too); B / C / z
      in another dtype than x (vLLM's Mamba-1 tests pass fp32 B / C beside bf16 x) run in
      fp32 with one rounding.
    - selective_scan_fwd / selective_scan_fn write zeros to the outputs of padding rows
      (vLLM leaves them unwritten) and, with z_, gate y rounded to u's dtype (vLLM gates
      in fp32): about an ulp; the prefix-caching arguments raise.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops
from .._validation import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_index_range,
    check_positive_float,
    check_shape,
    check_tensor,
    index_checks_active,
)
from ..ops.attention import check_kv_scales
from ..ops.reference import FP8_E4M3_MAX, quantize_kv
from ..quant.checkpoints import AWQ_ORDER
from ..quant.int4 import pack_int4
from ..quant.int8 import INT8_WO_GROUP_MULTIPLE, Int8WoWeight
from ..quant.packing import pack_bytes, pack_nibbles, unpack_bytes, unpack_nibbles
from .vllm_fused_moe import fused_experts, fused_moe, fused_topk
from .vllm_cache_ops import (
    FP8_KV_FORMATS,
    concat_and_cache_mla,
    copy_blocks,
    copy_blocks_mla,
    cp_gather_cache,
    gather_and_maybe_dequant_cache,
    swap_blocks,
)

__all__ = [
    "apply_repetition_penalties", "awq_dequantize", "awq_gemm", "causal_conv1d_fn",
    "causal_conv1d_update",
    "concat_and_cache_mla", "convert_fp8", "copy_blocks", "copy_blocks_mla",
    "cp_gather_cache", "cutlass_scaled_mm", "cutlass_scaled_mm_azp", "fatrelu_and_mul",
    "per_token_quant_int8", "triton_scaled_mm", "w8a8_block_fp8_matmul",
    "w8a8_block_int8_matmul",
    "w8a8_triton_block_scaled_mm",
    "fused_add_gemma_rms_norm", "fused_experts", "fused_moe", "fused_topk",
    "fused_add_rms_norm", "fused_qk_norm_rope", "gelu_fast", "gelu_new", "gelu_quick",
    "fused_recurrent_gated_delta_rule", "gather_and_maybe_dequant_cache",
    "gelu_and_mul", "gelu_tanh_and_mul", "gemma_rms_norm", "gptq_gemm", "gptq_shuffle",
    "merge_attn_states",
    "moe_align_block_size", "mul_and_silu", "paged_attention_v1", "paged_attention_v2",
    "per_token_group_quant_fp8", "per_token_group_quant_int8",
    "reshape_and_cache", "reshape_and_cache_flash", "rms_norm", "rotary_embedding",
    "rms_norm_dynamic_per_token_quant", "rms_norm_per_block_quant",
    "rms_norm_static_fp8_quant", "fused_add_rms_norm_static_fp8_quant",
    "static_scaled_fp8_quant", "dynamic_scaled_fp8_quant",
    "dynamic_per_token_scaled_fp8_quant", "scaled_fp8_quant", "static_scaled_int8_quant",
    "dynamic_scaled_int8_quant", "silu_and_mul_quant",
    "silu_and_mul_per_block_quant", "scaled_int8_quant", "selective_scan_fn", "selective_scan_fwd",
    "selective_state_update", "silu_and_mul", "swap_blocks", "swigluoai_and_mul",
    "grouped_topk", "topk_sigmoid", "topk_softmax",
]

FP8 = torch.float8_e4m3fn
#: vLLM's per-token fp8 scale floor: 1 / (448 * 512)
FP8_MIN_SCALE = 1.0 / (FP8_E4M3_MAX * 512.0)
FP8_KV_CACHE_DTYPES = tuple(FP8_KV_FORMATS)
_FP8_LIKE = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
_INDEX_DTYPES = (torch.int32, torch.int64)
_BLOCK = 128            # cutlass_scaled_mm's block-scaled fp8 form: 128 x 128 blocks


# --------------------------------------------------------------------------- helpers


def _check_out(name: str, out: object, like: Tensor, shape: list[int] | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """An output buffer: a tensor on ``like``'s device with ``dtype`` (default like's) and
    ``shape`` (default like's); any strides."""
    check_tensor(name, out, dtypes=(dtype or like.dtype,), device=like.device)
    check_shape(name, out, list(like.shape) if shape is None else shape)
    return out  # type: ignore[return-value]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _unsupported(name: str, value: object, why: str) -> None:
    if value is not None:
        raise ValueError(f"{name} is not supported by minikernels ({why}); pass None")


# ----------------------------------------------------------------------------- norms


def _norm_args(input: Tensor, weight: Tensor | None, epsilon: float,
               required: bool = False) -> tuple[Tensor, float]:
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    h = input.shape[-1]
    if weight is None:
        if required:
            raise TypeError("weight must be a tensor [hidden_size], got None")
        weight = torch.ones(h, dtype=input.dtype, device=input.device)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=input.device)
    check_shape("weight", weight, [h])
    return weight, check_positive_float("epsilon", epsilon)


def rms_norm(out: Tensor, input: Tensor, weight: Tensor | None,
             epsilon: float) -> None:
    """out = input / sqrt(mean(input^2) + epsilon) * weight over the last dim (writes out).

    input [..., H] fp16/bf16/fp32 (any strides); weight [H] any float dtype, or None (no
    scale: vLLM's weightless RMSNorm); out like input (shape, dtype), any strides."""
    weight, eps = _norm_args(input, weight, epsilon)
    _check_out("out", out, input)
    out.copy_(ops.rms_norm(input, weight, eps))


def fused_add_rms_norm(input: Tensor, residual: Tensor,
                       weight: Tensor | None, epsilon: float) -> None:
    """In place: residual <- input + residual (rounded to the dtype), then
    input <- rms_norm(residual) * weight. input, residual [..., H] of one dtype and shape
    (any strides); weight [H] or None."""
    weight, eps = _norm_args(input, weight, epsilon)
    _check_out("residual", residual, input)
    y, h = ops.rms_norm(input, weight, eps, residual=residual)
    residual.copy_(h)
    input.copy_(y)


def gemma_rms_norm(out: Tensor, input: Tensor, weight: Tensor,
                   epsilon: float) -> None:
    """Gemma's RMSNorm, ``torch.ops._C.gemma_rms_norm``: out = input / rms * (1 + weight).
    Layouts as :func:`rms_norm` (weight required)."""
    weight, eps = _norm_args(input, weight, epsilon, required=True)
    _check_out("out", out, input)
    out.copy_(ops.gemma_rms_norm(input, weight, eps))


def fused_add_gemma_rms_norm(input: Tensor, residual: Tensor,
                             weight: Tensor, epsilon: float) -> None:
    """``torch.ops._C.fused_add_gemma_rms_norm``: :func:`fused_add_rms_norm` with Gemma's
    (1 + weight) scale, in place on input and residual."""
    weight, eps = _norm_args(input, weight, epsilon, required=True)
    _check_out("residual", residual, input)
    y, h = ops.gemma_rms_norm(input, weight, eps, residual=residual)
    residual.copy_(h)
    input.copy_(y)


# ------------------------------------------------------------------------ activations


def _gated(out: object, input: Tensor) -> int:
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    if input.shape[-1] % 2:
        raise ValueError(f"input last dim must be even ([..., 2 * d]), got "
                         f"{list(input.shape)}")
    d = input.shape[-1] // 2
    _check_out("out", out, input, [*input.shape[:-1], d])
    return d


def silu_and_mul(out: Tensor, input: Tensor) -> None:
    """out = silu(input[..., :d]) * input[..., d:] (``torch.ops._C.silu_and_mul``).
    input [..., 2d] fp16/bf16/fp32; out [..., d] of input's dtype; any strides."""
    _gated(out, input)
    out.copy_(ops.silu_and_mul(input))


def mul_and_silu(out: Tensor, input: Tensor) -> None:
    """out = input[..., :d] * silu(input[..., d:]) (``torch.ops._C.mul_and_silu``; the
    halves are swapped into one copy for :func:`minikernels.ops.silu_and_mul`)."""
    d = _gated(out, input)
    out.copy_(ops.silu_and_mul(torch.cat([input[..., d:], input[..., :d]], dim=-1)))


def gelu_and_mul(out: Tensor, input: Tensor) -> None:
    """out = gelu(input[..., :d]) * input[..., d:], erf GELU (``torch.ops._C.gelu_and_mul``)."""
    _gated(out, input)
    out.copy_(ops.gelu_and_mul(input, "none"))


def gelu_tanh_and_mul(out: Tensor, input: Tensor) -> None:
    """out = gelu_tanh(input[..., :d]) * input[..., d:] (``torch.ops._C.gelu_tanh_and_mul``)."""
    _gated(out, input)
    out.copy_(ops.gelu_and_mul(input, "tanh"))


def fatrelu_and_mul(out: Tensor, input: Tensor, threshold: float = 0.0) -> None:
    """out = fatrelu(input[..., :d]) * input[..., d:], fatrelu(g) = g if g > threshold
    else 0 (``torch.ops._C.fatrelu_and_mul``)."""
    _gated(out, input)
    out.copy_(ops.fatrelu_and_mul(input, threshold))


def swigluoai_and_mul(out: Tensor, input: Tensor, alpha: float = 1.702,
                      limit: float = 7.0) -> None:
    """GPT-OSS's clamped SwiGLU over INTERLEAVED gate / up columns (gate = input[..., 0::2],
    up = input[..., 1::2]; ``torch.ops._C.swigluoai_and_mul``): out [..., d] =
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    _gated(out, input)
    out.copy_(ops.swigluoai_and_mul(input, alpha, limit))


def _pointwise(name: str, out: Tensor, input: Tensor) -> None:
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    _check_out("out", out, input)
    out.copy_(ops.gelu_variant(input, name))


def gelu_fast(out: Tensor, input: Tensor) -> None:
    """out = 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))) (``torch.ops._C.gelu_fast``)."""
    _pointwise("gelu_fast", out, input)


def gelu_new(out: Tensor, input: Tensor) -> None:
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (``torch.ops._C.gelu_new``)."""
    _pointwise("gelu_new", out, input)


def gelu_quick(out: Tensor, input: Tensor) -> None:
    """out = x sigmoid(1.702 x) (``torch.ops._C.gelu_quick``)."""
    _pointwise("gelu_quick", out, input)


# ----------------------------------------------------------------------------- rotary


def _heads(name: str, t: object, positions: Tensor, head_size: int,
           dtype: torch.dtype | None) -> Tensor:
    """query / key as a [*positions.shape, heads, head_size] view of the caller's tensor."""
    check_tensor(name, t, dtypes=(dtype,) if dtype else FLOAT_DTYPES)
    lead = tuple(positions.shape)
    if t.dim() == len(lead) + 1 and tuple(t.shape[:-1]) == lead and t.shape[-1] and \
            t.shape[-1] % head_size == 0:
        return t.unflatten(-1, (t.shape[-1] // head_size, head_size))
    if t.dim() == len(lead) + 2 and tuple(t.shape[:-2]) == lead and t.shape[-1] == head_size:
        return t
    raise ValueError(f"{name} must have shape [{', '.join(map(str, lead))}, num_heads * "
                     f"{head_size}] or [{', '.join(map(str, lead))}, num_heads, {head_size}] "
                     f"(positions' shape, then heads of head_size), got {list(t.shape)}")


def rotary_embedding(positions: Tensor, query: Tensor, key: Tensor | None, head_size: int,
                     cos_sin_cache: Tensor, is_neox: bool, rope_dim_offset: int = 0,
                     inverse: bool = False) -> None:
    """Rotary embedding, in place on query and key (vLLM's ``rotary_embedding``).

    positions int64 (or int32) [num_tokens] or [batch, seq]; query [*positions.shape,
    num_heads * head_size] or [*positions.shape, num_heads, head_size] fp16/bf16/fp32 (any
    strides, e.g. a slice of a padded or fused qkv buffer); key the same with its own head
    count, or None; cos_sin_cache [max_position, rot_dim] (cos half, then sin half; any
    float dtype) with rot_dim + rope_dim_offset <= head_size: dims rope_dim_offset ..
    rope_dim_offset + rot_dim of each head rotate, neox (is_neox: pairs (i, i + rot_dim/2))
    or GPT-J style (pairs (2i, 2i + 1)); the other dims are unchanged. inverse: rotate by
    -angle (undo the embedding). See :func:`minikernels.ops.rotary_embedding`.
    """
    check_tensor("query", query, dtypes=FLOAT_DTYPES)
    check_tensor("positions", positions, dtypes=_INDEX_DTYPES, ndim=(1, 2),
                 device=query.device)
    head_size = _check_int("head_size", head_size, 1)
    offset = _check_int("rope_dim_offset", rope_dim_offset, 0)
    _check_bool("is_neox", is_neox)
    _check_bool("inverse", inverse)
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2,
                 device=query.device)
    rot = cos_sin_cache.shape[1]
    if rot == 0 or rot % 2 or rot + offset > head_size:
        raise ValueError(f"cos_sin_cache's last dim (rot_dim) must be even, > 0 and with "
                         f"rope_dim_offset ({offset}) at most head_size ({head_size}), "
                         f"got {rot}")
    q = _heads("query", query, positions, head_size, None)
    k = None if key is None else _heads("key", key, positions, head_size, query.dtype)
    cache, pos = cos_sin_cache, positions
    if inverse:  # the rows this call reads, sin negated: rotation by -angle
        check_index_range("positions", positions, 0, cos_sin_cache.shape[0])
        rows = cos_sin_cache[positions.reshape(-1).long()]
        cache = torch.cat([rows[:, :rot // 2], -rows[:, rot // 2:]], dim=1)
        pos = torch.arange(rows.shape[0], device=rows.device).view(positions.shape)
    qs = q[..., offset:]
    ks = qs[..., :1, :] if k is None else k[..., offset:]   # key None: a dummy one-head k
    qo, ko = ops.rotary_embedding(qs, ks, pos, cache, is_neox)
    q[..., offset:offset + rot].copy_(qo[..., :rot])
    if k is not None:
        k[..., offset:offset + rot].copy_(ko[..., :rot])


def fused_qk_norm_rope(qkv: Tensor, num_heads_q: int, num_heads_k: int, num_heads_v: int,
                       head_dim: int, eps: float, q_weight: Tensor, k_weight: Tensor,
                       cos_sin_cache: Tensor, is_neox: bool, position_ids: Tensor) -> None:
    """Qwen3's per-head q / k RMSNorm, then rotary embedding, in place on a fused qkv
    projection (vLLM's ``torch.ops._C.fused_qk_norm_rope``).

    qkv [num_tokens, (num_heads_q + num_heads_k + num_heads_v) * head_dim] fp16 / bf16 /
    fp32 (any row stride): the q heads, then k's, then v's (untouched). q_weight / k_weight
    [head_dim]; cos_sin_cache [max_position, rot_dim] (rot_dim <= head_dim: partial rotary);
    position_ids [num_tokens] int64 / int32. The q and k columns are overwritten with
    :func:`minikernels.ops.qk_norm_rope` of them with vLLM's kernel's arithmetic
    (``vllm_rounding``: fp32 from the load to the one rounding at the store).
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=2)
    hq = _check_int("num_heads_q", num_heads_q, 1)
    hk = _check_int("num_heads_k", num_heads_k, 1)
    hv = _check_int("num_heads_v", num_heads_v, 0)
    d = _check_int("head_dim", head_dim, 1)
    _check_bool("is_neox", is_neox)
    if qkv.shape[1] != (hq + hk + hv) * d:
        raise ValueError(f"qkv must have (num_heads_q + num_heads_k + num_heads_v) * head_dim "
                         f"= {(hq + hk + hv) * d} columns, got {qkv.shape[1]}")
    check_tensor("position_ids", position_ids, dtypes=_INDEX_DTYPES, ndim=1,
                 device=qkv.device)
    check_shape("position_ids", position_ids, [qkv.shape[0]])
    q = qkv[:, :hq * d].unflatten(1, (hq, d))
    k = qkv[:, hq * d:(hq + hk) * d].unflatten(1, (hk, d))
    qo, ko = ops.qk_norm_rope(q, k, q_weight, k_weight, position_ids, cos_sin_cache, eps,
                              is_neox, vllm_rounding=True)
    q.copy_(qo)
    k.copy_(ko)


# --------------------------------------------------------------------------- KV cache


def _same_scale_count(k_scale: object, v_scale: object, heads: int) -> tuple:
    """A per-tensor scale next to a per-head one, expanded to per-head: minikernels' Triton
    KV kernels take per-head-ness from k_scale alone and would misread the other."""
    if isinstance(k_scale, Tensor) and isinstance(v_scale, Tensor) and \
            k_scale.numel() != v_scale.numel() and 1 in (k_scale.numel(), v_scale.numel()):
        return tuple(s.reshape(-1).expand(heads) if s.numel() == 1 else s
                     for s in (k_scale, v_scale))
    return k_scale, v_scale


def _kv_cache_dtype(kv_cache_dtype: object, dtype: torch.dtype, k_scale: object,
                    v_scale: object, heads: int) -> tuple[tuple[torch.dtype, ...], object, object]:
    """vLLM's kv_cache_dtype string -> (allowed cache dtypes, k_scale, v_scale).

    "auto": caches of ``dtype``, scales dropped (vLLM passes 1.0 tensors it does not read).
    "fp8" / "fp8_e4m3" / "fp8_e5m2": uint8 (vLLM's storage) or caches of that float8 format
    (the last allowed dtype: uint8 caches are read as it); the scales pass on (a per-tensor
    one next to a per-head one expanded per head)."""
    if kv_cache_dtype == "auto":
        return (dtype,), None, None
    if kv_cache_dtype in FP8_KV_FORMATS:
        return ((torch.uint8, FP8_KV_FORMATS[kv_cache_dtype]),
                *_same_scale_count(k_scale, v_scale, heads))
    raise ValueError(f"kv_cache_dtype must be 'auto', 'fp8', 'fp8_e4m3' or 'fp8_e5m2', got "
                     f"{kv_cache_dtype!r}")


def _kv_write_args(key: Tensor, value: Tensor, slot_mapping: Tensor, kv_cache_dtype: str,
                   k_scale: object, v_scale: object
                   ) -> tuple[int, tuple[torch.dtype, ...], object, object]:
    """The checks shared by reshape_and_cache and reshape_and_cache_flash: key / value
    [T, H, D] of one float dtype, slot_mapping [n <= T] int32 / int64 (rows past n: CUDA-graph
    padding, ignored, as vLLM's kernels do: they run slot_mapping.size(0) tokens). Returns
    (n, allowed cache dtypes, k_scale, v_scale) as :func:`_kv_cache_dtype`."""
    check_tensor("key", key, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("value", value, dtypes=(key.dtype,), ndim=3, device=key.device)
    check_shape("value", value, list(key.shape))
    check_tensor("slot_mapping", slot_mapping, dtypes=_INDEX_DTYPES, ndim=1, device=key.device)
    n = slot_mapping.shape[0]
    if key.shape[0] < n:
        raise ValueError(f"key has {key.shape[0]} tokens but slot_mapping has {n} slots "
                         f"(key may have more rows, not fewer)")
    return (n, *_kv_cache_dtype(kv_cache_dtype, key.dtype, k_scale, v_scale, key.shape[1]))


def reshape_and_cache_flash(key: Tensor, value: Tensor, key_cache: Tensor,
                            value_cache: Tensor, slot_mapping: Tensor, kv_cache_dtype: str,
                            k_scale: Tensor, v_scale: Tensor) -> None:
    """Write each token's key / value rows into its cache slot, in place.

    key, value [num_tokens, num_kv_heads, head_size] fp16/bf16/fp32 (any strides; rows
    past slot_mapping's length are ignored: CUDA-graph padding); key_cache, value_cache
    [num_blocks, block_size, num_kv_heads, head_size] (each with its own strides, last dim
    contiguous: NHD, or an HND cache permuted to this shape); slot_mapping int64 / int32
    [num_actual_tokens], slot = block * block_size + offset, -1 = skip.
    kv_cache_dtype "auto": caches of key's dtype, k_scale / v_scale unused. "fp8" /
    "fp8_e4m3" ("fp8_e5m2"): caches uint8 (vLLM's storage) or float8_e4m3fn (float8_e5m2)
    holding fp8(clamp(x / scale, +-448 (57344))); k_scale, v_scale float32 with 1 (per
    tensor) or num_kv_heads (per head) elements.
    """
    n, cache_dtypes, k_scale, v_scale = _kv_write_args(key, value, slot_mapping,
                                                       kv_cache_dtype, k_scale, v_scale)
    caches = []
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_tensor(name, c, dtypes=cache_dtypes, ndim=4, device=key.device)
        check_shape(name, c, [None, None, key.shape[1], key.shape[2]])
        caches.append(c.view(cache_dtypes[-1]) if c.dtype == torch.uint8 else c)
    ops.write_kv_cache(key[:n], value[:n], caches[0], caches[1], slot_mapping, k_scale,
                       v_scale)


def _legacy_caches(key_cache: Tensor, value_cache: Tensor, dtypes: tuple[torch.dtype, ...],
                   heads: int | None, head_size: int, device: torch.device,
                   names: tuple[str, str] = ("key_cache", "value_cache")
                   ) -> tuple[int, int, int]:
    """vLLM's legacy ("x-split") paged caches -> (num_kv_heads, block_size, x).

    key_cache [num_blocks, heads, head_size // x, block_size, x], value_cache [num_blocks,
    heads, head_size, block_size] (heads None: any), of one dtype in ``dtypes``, any
    strides. vLLM allocates x = 16 // element_size (8 for fp16 / bf16, 4 for fp32, 16 for
    an fp8 cache); any x dividing head_size is read from key_cache's last dim. ``names``:
    the two arguments' names in errors (vLLM's prefix prefill calls them k_cache /
    v_cache)."""
    kname, vname = names
    check_tensor(kname, key_cache, dtypes=dtypes, ndim=5, device=device)
    check_tensor(vname, value_cache, dtypes=(key_cache.dtype,), ndim=4, device=device)
    check_shape(vname, value_cache, [None, heads, head_size, None])
    num_blocks, heads, _, block_size = value_cache.shape
    x = key_cache.shape[4]
    if x < 1 or head_size % x:
        raise ValueError(f"{kname}'s last dim x ({x}) must divide head_size ({head_size}): "
                         f"{kname} is [num_blocks, num_kv_heads, head_size // x, block_size, "
                         f"x], got {list(key_cache.shape)}")
    check_shape(kname, key_cache, [num_blocks, heads, head_size // x, block_size, x])
    return heads, block_size, x


def _as_bytes(cache: Tensor) -> Tensor:
    """An fp8 cache (uint8 or a float8 format) as a uint8 view of the caller's memory (rows
    move as bytes); other caches as they are."""
    return cache.view(torch.uint8) if cache.dtype in _FP8_LIKE else cache


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor, kv_cache_dtype: str, k_scale: Tensor,
                      v_scale: Tensor, interleaved_v: bool = False) -> None:
    """Write each token's key / value rows into vLLM's legacy paged caches, in place (plain
    PyTorch: advanced-indexing writes into the caller's tensors).

    key, value [num_tokens, num_kv_heads, head_size] fp16/bf16/fp32 (any strides; rows past
    slot_mapping's length are ignored: CUDA-graph padding); slot_mapping int64 / int32
    [num_actual_tokens], slot = block * block_size + offset, -1 = skip.
    key_cache [num_blocks, num_kv_heads, head_size // x, block_size, x]: element d of a
    token's head h lands at [block, h, d // x, offset, d % x]; value_cache [num_blocks,
    num_kv_heads, head_size, block_size]: at [block, h, d, offset] (x = key_cache's last
    dim, 16 // element_size in vLLM; any strides). kv_cache_dtype "auto": caches of key's
    dtype, k_scale / v_scale unused. "fp8" / "fp8_e4m3" / "fp8_e5m2": caches uint8 (vLLM's
    storage) or of that float8 format, holding fp8(clamp(x / scale, +-max)), round to
    nearest even, as :func:`reshape_and_cache_flash`; k_scale, v_scale float32 with 1 (per
    tensor) or num_kv_heads (per head) elements. interleaved_v (vLLM's ROCm interleaved value-cache
    layout) must be False. Duplicate slots: one of the rows wins (vLLM: unspecified too).
    The -1 slots are dropped with a boolean mask (a host sync; not CUDA-graph capturable).
    """
    if _check_bool("interleaved_v", interleaved_v):
        raise ValueError("interleaved_v=True (vLLM's ROCm interleaved value-cache layout) is "
                         "not supported by minikernels; pass False")
    n, cache_dtypes, k_scale, v_scale = _kv_write_args(key, value, slot_mapping,
                                                       kv_cache_dtype, k_scale, v_scale)
    heads, head_size = key.shape[1], key.shape[2]
    _, block_size, x = _legacy_caches(key_cache, value_cache, cache_dtypes, heads, head_size,
                                      key.device)
    check_index_range("slot_mapping", slot_mapping, -1, key_cache.shape[0] * block_size)
    if k_scale is not None:
        # a [num_blocks, block_size, H, D] view of the value cache: check_kv_scales reads the
        # dtype, device and head count (dim 2)
        flash_view = value_cache.view(cache_dtypes[-1]).permute(0, 3, 1, 2)
        k_scale, v_scale = check_kv_scales(("key_cache", "value_cache"), flash_view,
                                           k_scale, v_scale)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    rows = []
    for src, scale in ((key, k_scale), (value, v_scale)):
        r = src[:n][keep]                                          # [m, H, D]
        rows.append(r.to(key_cache.dtype) if scale is None else
                    quantize_kv(r, scale, cache_dtypes[-1]).view(torch.uint8))
    _as_bytes(key_cache)[blocks, :, :, offsets, :] = rows[0].unflatten(-1, (head_size // x, x))
    _as_bytes(value_cache)[blocks, :, :, offsets] = rows[1]


def convert_fp8(output: Tensor, input: Tensor, scale: float = 1.0,
                kv_dtype: str = "fp8") -> None:
    """Convert between an fp8 KV cache and floats, writing output (plain PyTorch).

    kv_dtype "fp8" / "fp8_e4m3" (e4m3) or "fp8_e5m2" (e5m2). fp8 -> float: input uint8 /
    the float8 format, output fp16/bf16/fp32: output = input * scale. float -> fp8: input
    fp16/bf16/fp32, output uint8 / the float8 format: output = fp8(clamp(input / scale,
    +-max)) (max 448 / 57344). Same shapes, any strides; scale > 0."""
    if kv_dtype not in FP8_KV_FORMATS:
        raise ValueError(f"kv_dtype must be 'fp8', 'fp8_e4m3' or 'fp8_e5m2', got "
                         f"{kv_dtype!r}")
    scale = check_positive_float("scale", scale)
    fmt = FP8_KV_FORMATS[kv_dtype]
    fp8_like = (torch.uint8, fmt)
    check_tensor("input", input, dtypes=(*fp8_like, *FLOAT_DTYPES))
    out_dtypes = FLOAT_DTYPES if input.dtype in fp8_like else fp8_like
    check_tensor("output", output, dtypes=out_dtypes, device=input.device)
    check_shape("output", output, list(input.shape))
    if input.dtype in fp8_like:
        output.copy_(input.view(fmt).float() * scale)
    else:
        top = torch.finfo(fmt).max
        output.view(fmt).copy_((input.float() / scale).clamp(-top, top).to(fmt))


# ------------------------------------------------------------ legacy paged attention


def _check_blocksparse(tp_rank: int, blocksparse_local_blocks: int,
                       blocksparse_vert_stride: int, blocksparse_block_size: int,
                       blocksparse_head_sliding_step: int) -> None:
    """vLLM's block-sparse tail: ints; block-sparse attention (vLLM's switch:
    blocksparse_vert_stride > 1) is refused, the other values are then unused (as in vLLM's
    kernels, which read them only in block-sparse mode)."""
    _check_int("tp_rank", tp_rank, 0)
    for name, value in (("blocksparse_local_blocks", blocksparse_local_blocks),
                        ("blocksparse_block_size", blocksparse_block_size),
                        ("blocksparse_head_sliding_step", blocksparse_head_sliding_step)):
        _check_int(name, value, -(2**63))
    if _check_int("blocksparse_vert_stride", blocksparse_vert_stride, -(2**63)) > 1:
        raise ValueError(f"blocksparse_vert_stride > 1 turns on vLLM's block-sparse "
                         f"attention, which minikernels does not have; pass 0 (dense, the "
                         f"default) or 1, got {blocksparse_vert_stride}")


def _legacy_to_paged(key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                     used: Tensor, fp8: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Legacy caches -> (k_cache, v_cache [n, block_size, H, D] contiguous copies, their
    block table int32 [B, max_blocks]).

    Copies the B * max_blocks blocks block_tables names (entries past a sequence's length,
    ``used`` False, read block 0 instead: they may be anything) with a new table 0 .. n - 1,
    or the whole cache and the table as is when that is fewer blocks. fp8 caches (uint8 or
    float8) come back as the float8 format ``fp8``."""
    num_blocks, heads, _, block_size, _ = key_cache.shape
    head_size = value_cache.shape[2]
    batch, width = block_tables.shape
    k, v = _as_bytes(key_cache), _as_bytes(value_cache)
    table = block_tables
    if batch * width < num_blocks:
        idx = torch.where(used, block_tables, 0).reshape(-1).long()
        k, v = k.index_select(0, idx), v.index_select(0, idx)
        table = torch.arange(batch * width, dtype=torch.int32,
                             device=block_tables.device).view(batch, width)
    k = k.permute(0, 3, 1, 2, 4).reshape(-1, block_size, heads, head_size)
    v = v.permute(0, 3, 1, 2).contiguous()
    if key_cache.dtype in _FP8_LIKE:
        k, v = k.view(fp8), v.view(fp8)
    return k, v, table


def _legacy_paged_attention(out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                            num_kv_heads: int, scale: float, block_tables: Tensor,
                            seq_lens: Tensor, block_size: int, max_seq_len: int,
                            alibi_slopes: Tensor | None, kv_cache_dtype: str,
                            k_scale: Tensor, v_scale: Tensor) -> None:
    """paged_attention_v1 / v2's checks and math; writes out."""
    check_tensor("query", query, dtypes=FLOAT_DTYPES, ndim=3)
    batch, q_heads, head_size = query.shape
    dev = query.device
    _check_out("out", out, query)
    kv_heads = _check_int("num_kv_heads", num_kv_heads, 1)
    if q_heads % kv_heads:
        raise ValueError(f"num_kv_heads ({kv_heads}) must divide query's head count "
                         f"({q_heads})")
    scale = check_positive_float("scale", scale)
    cache_dtypes, k_scale, v_scale = _kv_cache_dtype(kv_cache_dtype, query.dtype, k_scale,
                                                     v_scale, kv_heads)
    cache_heads, cache_block, _ = _legacy_caches(key_cache, value_cache, cache_dtypes, None,
                                                 head_size, dev)
    if cache_heads != kv_heads:
        raise ValueError(f"num_kv_heads ({kv_heads}) must equal the caches' head count "
                         f"(value_cache dim 1: {cache_heads})")
    if _check_int("block_size", block_size, 1) != cache_block:
        raise ValueError(f"block_size ({block_size}) must equal the caches' block size "
                         f"(value_cache dim 3, key_cache dim 3: {cache_block})")
    max_seq_len = _check_int("max_seq_len", max_seq_len, 0)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, device=dev)
    check_shape("seq_lens", seq_lens, [batch])
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=dev)
    check_shape("block_tables", block_tables, [batch, None])
    width = block_tables.shape[1]
    check_index_range(f"seq_lens (at most max_seq_len = {max_seq_len})", seq_lens, 0,
                      max_seq_len + 1)
    check_index_range(f"seq_lens (at most block_tables' {width} blocks x {cache_block})",
                      seq_lens, 0, width * cache_block + 1)
    used = (torch.arange(width, device=dev) * cache_block).unsqueeze(0) < \
        seq_lens.unsqueeze(1)
    if index_checks_active(block_tables) and bool(used.any()):
        check_index_range("block_tables (the entries seq_lens uses)", block_tables[used], 0,
                          key_cache.shape[0])
    k, v, table = _legacy_to_paged(key_cache, value_cache, block_tables, used,
                                   cache_dtypes[-1])
    out.copy_(ops.paged_decode_attention(query, k, v, table, seq_lens, scale,
                                         k_scale=k_scale, v_scale=v_scale,
                                         alibi_slopes=alibi_slopes))


def paged_attention_v1(out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                       num_kv_heads: int, scale: float, block_tables: Tensor,
                       seq_lens: Tensor, block_size: int, max_seq_len: int,
                       alibi_slopes: Tensor | None, kv_cache_dtype: str, k_scale: Tensor,
                       v_scale: Tensor, tp_rank: int = 0, blocksparse_local_blocks: int = 0,
                       blocksparse_vert_stride: int = 0, blocksparse_block_size: int = 64,
                       blocksparse_head_sliding_step: int = 0) -> None:
    """Decode attention over vLLM's legacy paged caches, one query per sequence (writes out).

    query [num_seqs, num_heads, head_size] fp16/bf16/fp32 (any strides); out like query
    (any strides). key_cache [num_blocks, num_kv_heads, head_size // x, block_size, x],
    value_cache [num_blocks, num_kv_heads, head_size, block_size] (the layouts
    :func:`reshape_and_cache` writes; any strides): of query's dtype for kv_cache_dtype
    "auto", uint8 or float8_e4m3fn for "fp8" / "fp8_e4m3" (keys = cache * k_scale,
    values = cache * v_scale; k_scale, v_scale float32, 1 or num_kv_heads elements).
    block_tables int32 [num_seqs, max_blocks]: entries past a sequence's length are not
    read; seq_lens int32 [num_seqs], each <= max_seq_len; block_size the caches'.
    out[s, h] = softmax(scale * q . k_j + bias_j) @ v over keys j < seq_lens[s] of kv head
    h // (num_heads / num_kv_heads), fp32 softmax; alibi_slopes float32 [num_heads] (or
    None) adds bias_j = -slope * (seq_len - 1 - j) (vLLM's paged-attention ALiBi).
    seq_len 0 gives zeros. The tail (tp_rank, blocksparse_*) is vLLM's block-sparse mode:
    blocksparse_vert_stride > 1 is refused (ValueError); otherwise unused, as in vLLM.

    The caches are not strided views of minikernels' [num_blocks, block_size, H, D] layout,
    so the blocks the table names (or the whole cache, when smaller) are copied into it,
    then :func:`minikernels.ops.paged_decode_attention` runs: a per-call copy, fine for
    tests and legacy code, not a serving path.
    """
    _check_blocksparse(tp_rank, blocksparse_local_blocks, blocksparse_vert_stride,
                       blocksparse_block_size, blocksparse_head_sliding_step)
    _legacy_paged_attention(out, query, key_cache, value_cache, num_kv_heads, scale,
                            block_tables, seq_lens, block_size, max_seq_len, alibi_slopes,
                            kv_cache_dtype, k_scale, v_scale)


def paged_attention_v2(out: Tensor, exp_sum: Tensor, max_logits: Tensor, tmp_out: Tensor,
                       query: Tensor, key_cache: Tensor, value_cache: Tensor,
                       num_kv_heads: int, scale: float, block_tables: Tensor,
                       seq_lens: Tensor, block_size: int, max_seq_len: int,
                       alibi_slopes: Tensor | None, kv_cache_dtype: str, k_scale: Tensor,
                       v_scale: Tensor, tp_rank: int = 0, blocksparse_local_blocks: int = 0,
                       blocksparse_vert_stride: int = 0, blocksparse_block_size: int = 64,
                       blocksparse_head_sliding_step: int = 0) -> None:
    """:func:`paged_attention_v1` with vLLM's split-softmax scratch buffers (writes out).

    exp_sum, max_logits float32 [num_seqs, num_heads, P] and tmp_out [num_seqs, num_heads,
    P, head_size] of query's dtype (vLLM: P = ceil(max_seq_len / 512), one entry per
    512-token partition; any P is accepted) are checked and left unwritten: vLLM's per-
    partition max logit cannot be had from minikernels' op (it returns one LSE per row), so
    only out is defined, as in vLLM's own tests, which read out alone. minikernels splits
    long sequences itself (split-KV, merged by LSE).
    """
    _check_blocksparse(tp_rank, blocksparse_local_blocks, blocksparse_vert_stride,
                       blocksparse_block_size, blocksparse_head_sliding_step)
    check_tensor("query", query, dtypes=FLOAT_DTYPES, ndim=3)
    batch, q_heads, head_size = query.shape
    check_tensor("exp_sum", exp_sum, dtypes=(torch.float32,), ndim=3, device=query.device)
    check_shape("exp_sum", exp_sum, [batch, q_heads, None])
    parts = exp_sum.shape[2]
    _check_out("max_logits", max_logits, exp_sum)
    _check_out("tmp_out", tmp_out, query, [batch, q_heads, parts, head_size])
    _legacy_paged_attention(out, query, key_cache, value_cache, num_kv_heads, scale,
                            block_tables, seq_lens, block_size, max_seq_len, alibi_slopes,
                            kv_cache_dtype, k_scale, v_scale)


# ------------------------------------------------------------------ merge attn states


def merge_attn_states(output: Tensor, prefix_output: Tensor, prefix_lse: Tensor,
                      suffix_output: Tensor, suffix_lse: Tensor,
                      output_lse: Tensor | None = None,
                      prefill_tokens_with_context: int | None = None,
                      output_scale: Tensor | None = None) -> None:
    """Merge two attention states over disjoint key sets, writing output (and output_lse).

    prefix_output, suffix_output [num_tokens, num_heads, head_size] fp16/bf16/fp32;
    prefix_lse, suffix_lse float32 [num_heads, num_tokens] (natural log; +inf, FA2's empty
    row, counts as -inf: no keys); output [num_tokens, num_heads, head_size] of the inputs'
    dtype, or float8_e4m3fn with output_scale (float32, 1 element): output =
    fp8(clamp(merged / output_scale, +-448)); output_lse float32 [num_heads, num_tokens] or
    None. Tokens from prefill_tokens_with_context on (default: none) take the suffix state
    as is. Every tensor may be a strided view.
    """
    check_tensor("prefix_output", prefix_output, dtypes=FLOAT_DTYPES, ndim=3)
    t, h, d = prefix_output.shape
    dev = prefix_output.device
    check_tensor("suffix_output", suffix_output, dtypes=(prefix_output.dtype,), device=dev)
    check_shape("suffix_output", suffix_output, [t, h, d])
    for name, lse in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        check_tensor(name, lse, dtypes=(torch.float32,), device=dev)
        check_shape(name, lse, [h, t])
    if output_scale is not None:
        check_tensor("output_scale", output_scale, dtypes=(torch.float32,), device=dev)
        if output_scale.numel() != 1:
            raise ValueError(f"output_scale must have 1 element (a per-tensor fp8 scale), "
                             f"got shape {list(output_scale.shape)}")
    out_dtype = FP8 if output_scale is not None else prefix_output.dtype
    _check_out("output", output, prefix_output, [t, h, d], out_dtype)
    if output_lse is not None:
        _check_out("output_lse", output_lse, prefix_lse, [h, t])
    ctx = t if prefill_tokens_with_context is None else \
        min(_check_int("prefill_tokens_with_context", prefill_tokens_with_context, 0), t)

    def empty_as_neg_inf(lse: Tensor) -> Tensor:
        return lse.t().masked_fill(lse.t() == math.inf, -math.inf)     # [t, h]

    work = torch.float32 if output_scale is not None else prefix_output.dtype
    out, lse = ops.merge_attn_states(
        prefix_output[:ctx].to(work), empty_as_neg_inf(prefix_lse)[:ctx],
        suffix_output[:ctx].to(work), empty_as_neg_inf(suffix_lse)[:ctx])
    out = torch.cat([out, suffix_output[ctx:].to(work)])
    lse = torch.cat([lse, suffix_lse.t()[ctx:]])
    if output_scale is not None:
        inv = 1.0 / output_scale.reshape(()).float()
        out = (out.float() * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)
    output.copy_(out)
    if output_lse is not None:
        output_lse.copy_(lse.t())


# ---------------------------------------------------------------------- int8 / fp8 W8A8


def per_token_group_quant_fp8(x: Tensor, group_size: int, eps: float = 1e-10,
                              dtype: torch.dtype | None = None,
                              column_major_scales: bool = False,
                              tma_aligned_scales: bool = False,
                              use_ue8m0: bool | None = None) -> tuple[Tensor, Tensor]:
    """vLLM's ``per_token_group_quant_fp8`` (``fp8_utils``): :func:`minikernels.ops.
    per_token_group_quant_fp8` (the same name, arguments and scale layouts)."""
    return ops.per_token_group_quant_fp8(x, group_size, eps, dtype, column_major_scales,
                                         tma_aligned_scales, use_ue8m0)


def per_token_group_quant_int8(x: Tensor, group_size: int, eps: float = 1e-10,
                               dtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """vLLM's ``per_token_group_quant_int8`` (``int8_utils``): x [..., K] (K % group_size
    == 0) -> (x_q int8 [..., K], x_s fp32 [..., K / group_size]) with, per group of
    group_size consecutive elements, x_s = max(max |x|, eps) / 127 and x_q = clamp(x /
    x_s, -128, 127) rounded to nearest even (vLLM's Triton kernel truncates toward zero:
    results may differ by 1). Plain PyTorch, fp32 math."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if dtype != torch.int8:
        raise TypeError(f"dtype must be torch.int8, got {dtype}")
    g = _check_int("group_size", group_size, 1)
    k = x.shape[-1]
    if k % g:
        raise ValueError(f"group_size must divide x's last dim ({k}), got {g}")
    eps = check_positive_float("eps", eps)
    groups = x.reshape(-1, k // g, g).float()
    s = groups.abs().amax(-1).clamp_min(eps) / 127.0
    q = torch.round(groups / s[..., None]).clamp(-128, 127).to(torch.int8)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // g)


def scaled_int8_quant(input: Tensor, scale: Tensor | None = None,
                      azp: Tensor | None = None, symmetric: bool = True
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """vLLM's ``scaled_int8_quant``: returns (int8 like input, scales, azp or None).
    Dynamic (scale None): per-token fp32 scales [M, 1] (and int32 azp [M, 1] when not
    symmetric); static: scale (and azp) as given. See
    :func:`minikernels.ops.scaled_int8_quant` for the exact math."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    return ops.scaled_int8_quant(input, scale, azp, symmetric)


def static_scaled_int8_quant(out: Tensor, input: Tensor, scale: Tensor,
                             azp: Tensor | None = None) -> None:
    """``torch.ops._C.static_scaled_int8_quant``: out (int8, input's shape) =
    clamp(round(input / scale) (+ azp), -128, 127); scale fp32 numel 1, azp int32 numel 1
    (asymmetric) or None (:func:`minikernels.ops.scaled_int8_quant`)."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    _check_out("out", out, input, dtype=torch.int8)
    q, _, _ = ops.scaled_int8_quant(input, scale, azp, azp is None)
    out.copy_(q)


def dynamic_scaled_int8_quant(out: Tensor, input: Tensor, scales: Tensor,
                              azp: Tensor | None = None) -> None:
    """``torch.ops._C.dynamic_scaled_int8_quant``: per-token int8 into out (input's shape),
    the fp32 scales into scales ([M, 1] or [M]) and, asymmetric, the int32 zero points
    into azp (same shape; None: symmetric) (:func:`minikernels.ops.scaled_int8_quant`)."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    _check_out("out", out, input, dtype=torch.int8)
    m = input.numel() // max(input.shape[-1], 1)
    check_tensor("scales", scales, dtypes=(torch.float32,), device=input.device)
    if scales.numel() != m:
        raise ValueError(f"scales must have one entry per token ({m}), got shape "
                         f"{list(scales.shape)}")
    if azp is not None:
        check_tensor("azp", azp, dtypes=(torch.int32,), device=input.device)
        if azp.numel() != m:
            raise ValueError(f"azp must have one entry per token ({m}), got shape "
                             f"{list(azp.shape)}")
    q, s, z = ops.scaled_int8_quant(input, None, None, azp is None)
    out.copy_(q)
    scales.copy_(s.view(scales.shape))
    if azp is not None:
        azp.copy_(z.view(azp.shape))


def apply_repetition_penalties(logits: Tensor, prompt_mask: Tensor, output_mask: Tensor,
                               repetition_penalties: Tensor) -> None:
    """vLLM's repetition penalty, in place on logits [num_seqs, vocab] (fp16 / bf16 /
    fp32, any strides): where a token is in the prompt or the output (prompt_mask /
    output_mask bool [num_seqs, vocab]) a positive logit is multiplied by 1 / penalty and
    any other by the penalty (repetition_penalties [num_seqs], float). Plain PyTorch, vLLM's
    own formula (its CUDA kernel divides instead of multiplying by the reciprocal: an ulp)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    for name, mask in (("prompt_mask", prompt_mask), ("output_mask", output_mask)):
        check_tensor(name, mask, dtypes=(torch.bool,), ndim=2, device=logits.device)
        check_shape(name, mask, list(logits.shape))
    check_tensor("repetition_penalties", repetition_penalties, dtypes=FLOAT_DTYPES, ndim=1,
                 device=logits.device)
    check_shape("repetition_penalties", repetition_penalties, [logits.shape[0]])
    penalty = repetition_penalties.float()[:, None].expand(logits.shape)
    penalty = torch.where(prompt_mask | output_mask, penalty, 1.0)
    logits.mul_(torch.where(logits > 0, 1.0 / penalty, penalty))


def cutlass_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor,
                      out_dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """out = (scale_a * a) @ (scale_b * b) (+ bias) in out_dtype, shape [*a.shape[:-1], N].

    a [..., K] int8 or float8_e4m3fn; b [K, N] of a's dtype (usually weight.t());
    bias [N] in out_dtype or None; out_dtype fp16 / bf16 (or fp32). Scales fp32:
    scale_a numel 1 or M (per token), scale_b numel 1 or N (per channel)
    (:func:`minikernels.ops.scaled_mm`); or, for fp8, vLLM's block form: scale_a [M, K / 128]
    (one per token and 128 columns), scale_b [K / 128, N / 128] (one per 128 x 128 block),
    sizes rounded up (:func:`minikernels.ops.w8a8_block_fp8_matmul`, bias added in fp32
    before the one rounding).
    """
    check_tensor("a", a, dtypes=(torch.int8, FP8), min_ndim=1)
    check_tensor("b", b, dtypes=(a.dtype,), ndim=2, device=a.device)
    check_tensor("scale_a", scale_a, dtypes=(torch.float32,), device=a.device)
    check_tensor("scale_b", scale_b, dtypes=(torch.float32,), device=a.device)
    k, n = b.shape
    m = math.prod(a.shape[:-1])
    if a.dtype != FP8 or (scale_a.numel() in (1, m) and scale_b.numel() in (1, n)):
        return ops.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias)
    kb, nb = -(-k // _BLOCK), -(-n // _BLOCK)
    if a.shape[-1] != k:
        raise ValueError(f"a's last dim ({a.shape[-1]}) must equal b's first dim K ({k})")
    if list(scale_a.shape) != [m, kb] or list(scale_b.shape) != [kb, nb]:
        raise ValueError(f"scale_a / scale_b must be per tensor / token (numel 1 or {m}) and "
                         f"per tensor / channel (numel 1 or {n}), or 128 x 128 block scales "
                         f"[{m}, {kb}] and [{kb}, {nb}]; got {list(scale_a.shape)} and "
                         f"{list(scale_b.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(out_dtype,), device=a.device)
        check_shape("bias", bias, [n])
    out = ops.w8a8_block_fp8_matmul(a.reshape(m, k), b.t(), scale_a, scale_b.t(),
                                    [_BLOCK, _BLOCK], torch.float32)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).view(*a.shape[:-1], n)


def triton_scaled_mm(input: Tensor, weight: Tensor, scale_a: Tensor, scale_b: Tensor,
                     out_dtype: torch.dtype, bias: Tensor | None = None,
                     block_size_m: int = 32, block_size_n: int = 32, block_size_k: int = 32,
                     use_heuristic: bool = True) -> Tensor:
    """vLLM's ``triton_scaled_mm`` (compressed-tensors' Triton W8A8 GEMM): input [M, K]
    int8 or float8_e4m3fn, weight [K, N] of its dtype, scale_a fp32 [M, 1] or one element,
    scale_b fp32 [N, 1] or one element, bias [N] or None -> [M, N] in out_dtype
    (:func:`minikernels.ops.scaled_mm`). The block sizes and heuristic only tune vLLM's
    launch (ints >= 1 are checked, then unused)."""
    for name, v in (("block_size_m", block_size_m), ("block_size_n", block_size_n),
                    ("block_size_k", block_size_k)):
        _check_int(name, v, 1)
    _check_bool("use_heuristic", use_heuristic)
    check_tensor("input", input, dtypes=(torch.int8, FP8), ndim=2)
    check_tensor("weight", weight, dtypes=(input.dtype,), ndim=2, device=input.device)
    for name, sc in (("scale_a", scale_a), ("scale_b", scale_b)):
        check_tensor(name, sc, dtypes=FLOAT_DTYPES, device=input.device)
    if bias is not None:          # (vLLM adds it in the accumulator's precision)
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=input.device)
        bias = bias.to(out_dtype)
    return ops.scaled_mm(input, weight, scale_a.float(), scale_b.float(), out_dtype, bias)


#: vLLM's fp8_utils names for the block-scaled fp8 GEMM (A [M, K] fp8 per-token-group
#: scales, B [N, K] fp8 per-block scales): :func:`minikernels.ops.w8a8_block_fp8_matmul`.
w8a8_block_fp8_matmul = ops.w8a8_block_fp8_matmul
w8a8_triton_block_scaled_mm = ops.w8a8_block_fp8_matmul


def w8a8_block_int8_matmul(A: Tensor, B: Tensor, As: Tensor, Bs: Tensor,
                           block_size: list[int], output_dtype: torch.dtype = torch.float16
                           ) -> Tensor:
    """vLLM's int8_utils ``w8a8_block_int8_matmul``: C = A @ B.T with block-wise scales.

    A [..., K] int8 with per-token-group scales As [..., ceil(K / bk)] fp32; B [N, K] int8
    with per-block scales Bs [ceil(N / bn), ceil(K / bk)] fp32; block_size [bn, bk].
    C[m, n] = sum_j As[m, j] * Bs[n // bn, j] * (A[m, block j] @ B[n, block j]) in fp32,
    rounded once to output_dtype. Each K block is one ``ops.scaled_mm`` (exact int32 sums,
    scales in its epilogue), summed in fp32: a loop over the K blocks (a compat path)."""
    check_tensor("A", A, dtypes=(torch.int8,), min_ndim=1)
    check_tensor("B", B, dtypes=(torch.int8,), ndim=2, device=A.device)
    if not isinstance(block_size, (list, tuple)) or len(block_size) != 2:
        raise ValueError(f"block_size must be [block_n, block_k], got {block_size!r}")
    bn, bk = (_check_int("block_size", int(v), 1) for v in block_size)
    if output_dtype not in FLOAT_DTYPES:
        raise TypeError(f"output_dtype must be float16, bfloat16 or float32, got "
                        f"{output_dtype}")
    n, k = B.shape
    if A.shape[-1] != k:
        raise ValueError(f"A's last dim ({A.shape[-1]}) must equal B's K ({k})")
    kb, nb = -(-k // bk), -(-n // bn)
    lead = A.shape[:-1]
    m = math.prod(lead)
    check_tensor("As", As, dtypes=(torch.float32,), device=A.device)
    check_shape("As", As, [*lead, kb])
    check_tensor("Bs", Bs, dtypes=(torch.float32,), ndim=2, device=A.device)
    check_shape("Bs", Bs, [nb, kb])
    a2, as2 = A.reshape(m, k), As.reshape(m, kb)
    col_scales = Bs.repeat_interleave(bn, dim=0)[:n]                  # [N, kb]
    out = torch.zeros(m, n, dtype=torch.float32, device=A.device)
    for j in range(kb):
        cols = slice(j * bk, min((j + 1) * bk, k))
        out += ops.scaled_mm(a2[:, cols], B[:, cols].t(), as2[:, j].contiguous(),
                             col_scales[:, j].contiguous(), torch.float32)
    return out.to(output_dtype).view(*lead, n)


def per_token_quant_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM's int8_utils ``per_token_quant_int8``: x [..., K] -> (int8 like x, fp32
    scales [..., 1]), scale = max|x| / 127 per row (:func:`minikernels.ops.scaled_int8_quant`;
    x / scale rounded half to even, where vLLM's Triton kernel rounds x * 127 / max|x| half
    away from zero: a tie or an ulp apart moves one step)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    q, s, _ = ops.scaled_int8_quant(x)
    return q, s.view(*x.shape[:-1], 1)


def cutlass_scaled_mm_azp(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor,
                          out_dtype: torch.dtype, azp_adj: Tensor, azp: Tensor | None = None,
                          bias: Tensor | None = None) -> Tensor:
    """vLLM's ``cutlass_scaled_mm_azp``: int8 a holding asymmetric activations (real value
    scale_a * (a - zero point)) times int8 b [K, N]:
    out = scale_a * scale_b * (a @ b - azp * azp_adj) (+ bias), the subtraction in int32.
    azp_adj int32 [N] or [1, N]: b's column sums (times the zero point for a per-tensor
    one, azp None); azp int32 [M] / [M, 1]: per-token zero points. Scales, bias and
    out_dtype as :func:`cutlass_scaled_mm` (:func:`minikernels.ops.scaled_mm`)."""
    check_tensor("a", a, dtypes=(torch.int8,), min_ndim=1)
    return ops.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, azp_adj, azp)


def _static_fp8_scale(scale: Tensor, m: int, n: int,
                      group_shape: tuple[int, int] | None) -> Tensor:
    """A static scale (per tensor, per channel [N] or per group) -> broadcastable to [m, n]."""
    if group_shape is None:
        if scale.numel() == 1:
            return scale.reshape(1, 1)
        if scale.dim() == 1 and scale.numel() == n:          # vLLM's per-channel [d]
            return scale.reshape(1, n)
        if scale.dim() != 2 or not all(s and size % s == 0 for s, size in
                                       zip(scale.shape, (m, n))):
            raise ValueError(f"scale must have 1 element, shape [{n}] (per channel) or a 2-D "
                             f"group shape dividing [{m}, {n}] (or pass group_shape), got "
                             f"{list(scale.shape)}")
        group_shape = (m // scale.shape[0], n // scale.shape[1])
    if (not isinstance(group_shape, (tuple, list)) or len(group_shape) != 2 or not all(
            isinstance(g, int) and not isinstance(g, bool) and (g == -1 or g >= 1)
            for g in group_shape)):
        raise ValueError(f"group_shape must be two ints (group_m, group_n), each >= 1 or -1 "
                         f"(full extent), got {group_shape!r}")
    gm = m if group_shape[0] == -1 else group_shape[0]
    gn = n if group_shape[1] == -1 else group_shape[1]
    gm, gn = max(gm, 1), max(gn, 1)
    rows, cols = -(-m // gm), -(-n // gn)
    if scale.numel() != rows * cols:
        raise ValueError(f"scale must have {rows} x {cols} elements for group_shape "
                         f"{tuple(group_shape)} on input [{m}, {n}], got {list(scale.shape)}")
    s = scale.reshape(rows, cols)
    return s.repeat_interleave(gm, 0)[:m].repeat_interleave(gn, 1)[:, :n]


def _fp8_mul(x: Tensor, inv: Tensor) -> Tensor:
    return (x * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)


def _reciprocal(s: Tensor) -> Tensor:
    """1 / s in fp32, 0 where s == 0 (a zero scale quantizes to 0, not NaN)."""
    return torch.where(s == 0, torch.zeros_like(s), 1.0 / torch.where(s == 0, 1.0, s))


def scaled_fp8_quant(input: Tensor, scale: Tensor | None = None,
                     num_token_padding: int | None = None, scale_ub: Tensor | None = None,
                     use_per_token_if_dynamic: bool = False, output: Tensor | None = None,
                     group_shape: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Quantize input [M, N] (fp16/bf16/fp32, any strides) to float8_e4m3fn (plain
    PyTorch, fp32 math, saturating at +-448, round to nearest even).

    Dynamic, per tensor (scale None): s = max|input| / 448, returned as float32 [1];
        q = fp8(clamp(input * (1 / s))).
    Dynamic, per token (use_per_token_if_dynamic): s[m] = max(min(max|input[m]|,
        scale_ub) / 448, 1 / (448 * 512)) (scale_ub: float32, 1 element, optional),
        returned as float32 [rows, 1]; q = fp8(clamp(input / s)).
    Static (scale given, float32): 1 element (per tensor), [N] (per channel), or group
        scales [ceil(M / gm), ceil(N / gn)] for group_shape (gm, gn) (-1 = full extent;
        inferred from a 2-D scale's shape when None); q = fp8(clamp(input * (1 / s)));
        returns the given scale.
    num_token_padding: output rows max(M, num_token_padding), the extra rows 0. output:
    an optional float8_e4m3fn [M, N] buffer (any strides) to write instead (not with
    num_token_padding). Returns (output, scale).
    """
    check_tensor("input", input, dtypes=FLOAT_DTYPES, ndim=2)
    m, n = input.shape
    _check_bool("use_per_token_if_dynamic", use_per_token_if_dynamic)
    rows = m
    if num_token_padding:
        rows = max(m, _check_int("num_token_padding", num_token_padding, 0))
    if output is None:
        output = torch.zeros((rows, n), dtype=FP8, device=input.device)
    else:
        if num_token_padding:
            raise ValueError("num_token_padding must be None when output is given "
                             "(vLLM: padding is not supported with an output buffer)")
        _check_out("output", output, input, [m, n], FP8)
    xf = input.float()
    if scale is not None:
        check_tensor("scale", scale, dtypes=(torch.float32,), device=input.device)
        _unsupported("scale_ub", scale_ub, "it bounds dynamic per-token scales only")
        output[:m].copy_(_fp8_mul(xf, _reciprocal(_static_fp8_scale(scale, m, n,
                                                                      group_shape))))
        return output, scale
    if group_shape is not None:
        raise ValueError("group_shape is only for a static scale (scale given)")
    if use_per_token_if_dynamic:
        amax = xf.abs().amax(dim=1, keepdim=True) if n else xf.new_zeros(m, 1)
        if scale_ub is not None:
            check_tensor("scale_ub", scale_ub, dtypes=(torch.float32,), device=input.device)
            if scale_ub.numel() != 1:
                raise ValueError(f"scale_ub must have 1 element, got shape "
                                 f"{list(scale_ub.shape)}")
            amax = torch.minimum(amax, scale_ub.reshape(1, 1))
        s = (amax / FP8_E4M3_MAX).clamp_min(FP8_MIN_SCALE)
        output[:m].copy_((xf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8))
        scales = torch.zeros((rows, 1), dtype=torch.float32, device=input.device)
        scales[:m] = s
        return output, scales
    _unsupported("scale_ub", scale_ub, "it bounds dynamic per-token scales only")
    amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    s = (amax / FP8_E4M3_MAX).reshape(1)
    output[:m].copy_(_fp8_mul(xf, _reciprocal(s)))
    return output, s



def static_scaled_fp8_quant(out: Tensor, input: Tensor, scale: Tensor,
                            group_shape: tuple[int, int] | None = None) -> None:
    """``torch.ops._C.static_scaled_fp8_quant``: out = fp8(clamp(input * (1 / scale)))
    (:func:`scaled_fp8_quant` with a static scale, written into out)."""
    check_tensor("scale", scale, dtypes=(torch.float32,))
    scaled_fp8_quant(input, scale, output=out, group_shape=group_shape)


def dynamic_scaled_fp8_quant(out: Tensor, input: Tensor, scale: Tensor) -> None:
    """``torch.ops._C.dynamic_scaled_fp8_quant``: one scale for the whole tensor
    (max |input| / 448), written into scale (float32, 1 element), the values into out."""
    check_tensor("scale", scale, dtypes=(torch.float32,), device=input.device)
    if scale.numel() != 1:
        raise ValueError(f"scale must have 1 element, got shape {list(scale.shape)}")
    _, s = scaled_fp8_quant(input, output=out)
    scale.copy_(s.reshape(scale.shape))


def dynamic_per_token_scaled_fp8_quant(out: Tensor, input: Tensor, scales: Tensor,
                                       scale_ub: Tensor | None = None) -> None:
    """``torch.ops._C.dynamic_per_token_scaled_fp8_quant``: one scale per row of input
    [M, N] into scales (float32, M elements), the values into out."""
    check_tensor("scales", scales, dtypes=(torch.float32,), device=input.device)
    m = input.shape[0] if input.dim() else 0
    if scales.numel() != m:
        raise ValueError(f"scales must have {m} elements (one per row), got shape "
                         f"{list(scales.shape)}")
    _, s = scaled_fp8_quant(input, scale_ub=scale_ub, use_per_token_if_dynamic=True,
                            output=out)
    scales.copy_(s.reshape(scales.shape))


# ------------------------------------------------------------- fused RMSNorm + quant
# vLLM's fused kernels: the dynamic ones (rms_norm_dynamic_per_token_quant,
# rms_norm_per_block_quant) reproduce vLLM's arithmetic (ops.rms_norm_quant with
# vllm_rounding: the normalized value rounded to the dtype before the weight product, the
# norm of a residual sum taken in fp32, scales floored at vLLM's minimum); the static fp8
# ones equal this module's rms_norm / fused_add_rms_norm followed by
# static_scaled_fp8_quant bit for bit on the CPU (vLLM's test compares exactly those).

_NORM_QUANT_DTYPES = (torch.int8, FP8)
_INT8_MIN_SCALE = float(torch.finfo(torch.float32).eps)    # vLLM's int8 scale floor


def _static_norm_quant_args(out: Tensor, input: Tensor, weight: Tensor, scale: Tensor,
                            epsilon: float) -> tuple[Tensor, float]:
    weight, eps = _norm_args(input, weight, epsilon, required=True)
    _check_out("out", out, input, dtype=FP8)
    check_tensor("scale", scale, dtypes=(torch.float32,), device=input.device)
    if scale.numel() != 1:
        raise ValueError(f"scale must have 1 element (per tensor), got shape "
                         f"{list(scale.shape)}")
    return weight, eps


def rms_norm_static_fp8_quant(out: Tensor, input: Tensor, weight: Tensor, scale: Tensor,
                              epsilon: float) -> None:
    """``torch.ops._C.rms_norm_static_fp8_quant``: out = fp8(clamp(rms_norm(input, weight)
    * (1 / scale), +-448)). input [..., H] fp16/bf16/fp32 (any strides); weight [H]; scale
    float32, 1 element; out float8_e4m3fn like input (any strides)."""
    weight, eps = _static_norm_quant_args(out, input, weight, scale, epsilon)
    q, _ = ops.rms_norm_quant(input, weight, eps, FP8, scale=scale)
    out.copy_(q)


def fused_add_rms_norm_static_fp8_quant(out: Tensor, input: Tensor, residual: Tensor,
                                        weight: Tensor, scale: Tensor,
                                        epsilon: float) -> None:
    """``torch.ops._C.fused_add_rms_norm_static_fp8_quant``: residual <- input + residual
    (rounded to the dtype), out = fp8(clamp(rms_norm(residual) * (1 / scale))); input is
    not written. Layouts as :func:`rms_norm_static_fp8_quant`; residual like input."""
    weight, eps = _static_norm_quant_args(out, input, weight, scale, epsilon)
    _check_out("residual", residual, input)
    q, _, h = ops.rms_norm_quant(input, weight, eps, FP8, residual=residual, scale=scale)
    residual.copy_(h)
    out.copy_(q)


def _check_quant_dtype(quant_dtype: object, scale_ub: Tensor | None) -> None:
    """int8 or float8_e4m3fn; scale_ub with fp8 only (as vLLM's kernels check)."""
    if quant_dtype not in _NORM_QUANT_DTYPES:
        raise TypeError(f"quant_dtype must be torch.int8 or torch.float8_e4m3fn, got "
                        f"{quant_dtype}")
    if scale_ub is not None and quant_dtype != FP8:
        raise ValueError("scale_ub is only supported with quant_dtype float8_e4m3fn "
                         "(as in vLLM)")


def _dynamic_norm_quant(input: Tensor, weight: Tensor, epsilon: float,
                        quant_dtype: torch.dtype, group: int, scale_ub: Tensor | None,
                        residual: Tensor | None) -> tuple[Tensor, Tensor]:
    weight, eps = _norm_args(input, weight, epsilon, required=True)
    _check_quant_dtype(quant_dtype, scale_ub)
    if residual is not None:
        _check_out("residual", residual, input)
    out = ops.rms_norm_quant(
        input, weight, eps, quant_dtype, residual=residual, group_size=group,
        scale_ub=scale_ub, vllm_rounding=True,
        min_scale=_INT8_MIN_SCALE if quant_dtype == torch.int8 else FP8_MIN_SCALE)
    if residual is not None:
        residual.copy_(out[2])
    return out[0], out[1]


def rms_norm_dynamic_per_token_quant(input: Tensor, weight: Tensor, epsilon: float,
                                     quant_dtype: torch.dtype,
                                     scale_ub: Tensor | None = None,
                                     residual: Tensor | None = None
                                     ) -> tuple[Tensor, Tensor]:
    """vLLM's ``rms_norm_dynamic_per_token_quant``: (out, scales) with out = the RMSNorm of
    input (+ residual, which is updated in place to the sum) quantized to quant_dtype
    (int8 / float8_e4m3fn) with one scale per token, scales float32 [tokens, 1]:
    s = max(min(max |y|, scale_ub) / qmax, floor) (floor 1 / (448 * 512) for fp8, FLT_EPSILON
    for int8; scale_ub float32, 1 element, fp8 only). input [..., H] any strides."""
    q, s = _dynamic_norm_quant(input, weight, epsilon, quant_dtype, 0, scale_ub, residual)
    return q, s.reshape(-1, 1)


def rms_norm_per_block_quant(input: Tensor, weight: Tensor, epsilon: float,
                             quant_dtype: torch.dtype, group_size: list[int],
                             scale_ub: Tensor | None = None,
                             residual: Tensor | None = None,
                             is_scale_transposed: bool = False,
                             tma_alignment: int | bool = 0) -> tuple[Tensor, Tensor]:
    """vLLM's ``rms_norm_per_block_quant``: as :func:`rms_norm_dynamic_per_token_quant`
    with one scale per token and group_size[1] columns (group_size = [1, g]; g any
    divisor of H, vLLM's kernel takes 64 / 128). Scales [tokens, H / g] float32:
    row-major; with is_scale_transposed column-major (scales.t() contiguous), its token
    stride padded to a multiple of tma_alignment when given (4: vLLM's TMA-aligned
    layout; True means 4, the older has_tma_aligned_scales flag)."""
    if not isinstance(group_size, (list, tuple)) or len(group_size) != 2:
        raise ValueError(f"group_size must be a list of two ints [1, g], got {group_size!r}")
    g = _check_int("group_size[1]", group_size[1], 1)
    _check_bool("is_scale_transposed", is_scale_transposed)
    align = 4 if tma_alignment is True else _check_int("tma_alignment", int(tma_alignment), 0)
    q, s = _dynamic_norm_quant(input, weight, epsilon, quant_dtype, g, scale_ub, residual)
    m, groups = s.numel() // max(s.shape[-1], 1), s.shape[-1]
    s = s.reshape(m, groups)
    if not is_scale_transposed:
        return q, s
    mpad = -(-m // align) * align if align else m
    out = torch.empty((groups, mpad), dtype=torch.float32, device=s.device)[:, :m].t()
    out.copy_(s)
    return q, out



# ------------------------------------------------------- fused activation + quant


def silu_and_mul_quant(out: Tensor, input: Tensor, scale: Tensor) -> None:
    """``torch.ops._C.silu_and_mul_quant``: out = fp8(clamp(silu_and_mul(input) *
    (1 / scale), +-448)), input [..., 2d] (gate, then up; any strides), scale float32 of
    one element, out float8_e4m3fn [..., d] (any strides). The activation is rounded to
    input's dtype first, so this equals :func:`silu_and_mul` then
    :func:`static_scaled_fp8_quant`."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("scale", scale, dtypes=(torch.float32,), device=input.device)
    if scale.numel() != 1:
        raise ValueError(f"scale must have 1 element (per tensor), got shape "
                         f"{list(scale.shape)}")
    _check_out("out", out, input, [*input.shape[:-1], input.shape[-1] // 2], FP8)
    q, _ = ops.act_and_mul_quant(input, FP8, "silu", scale=scale)
    out.copy_(q)


def silu_and_mul_per_block_quant(input: Tensor, group_size: int, quant_dtype: torch.dtype,
                                 scale_ub: Tensor | None = None,
                                 is_scale_transposed: bool = False
                                 ) -> tuple[Tensor, Tensor]:
    """vLLM's ``silu_and_mul_per_block_quant``: (out [T, d], scales [T, d / group_size])
    for input [T, 2d] (gate, then up): y = silu(gate) * up in fp32 (not rounded to the
    dtype first), quantized to quant_dtype (int8 / float8_e4m3fn) per token and
    group_size columns, s = max(min(max |y|, scale_ub) / qmax, 1 / (qmax * 512)); scales
    row-major, or column-major (scales.t() contiguous) with is_scale_transposed."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, ndim=2)
    g = _check_int("group_size", group_size, 1)
    _check_bool("is_scale_transposed", is_scale_transposed)
    _check_quant_dtype(quant_dtype, scale_ub)
    qmax = 127.0 if quant_dtype == torch.int8 else FP8_E4M3_MAX
    q, s = ops.act_and_mul_quant(input, quant_dtype, "silu", group_size=g, scale_ub=scale_ub,
                                 min_scale=1.0 / (qmax * 512.0), round_to_input=False)
    s = s.reshape(input.shape[0], -1)
    if is_scale_transposed:
        s = torch.empty(s.shape[::-1], dtype=s.dtype, device=s.device).t().copy_(s)
    return q, s


# -------------------------------------------------------------------------------- MoE


def moe_align_block_size(topk_ids: Tensor, num_experts: int, block_size: int,
                         sorted_token_ids: Tensor, experts_ids: Tensor,
                         num_tokens_post_pad: Tensor, expert_map: Tensor | None = None,
                         scatter_idx: Tensor | None = None) -> None:
    """Group the T*k (token, slot) pairs of topk_ids [T, k] (int32 / int64) by expert into
    block_size tiles, writing vLLM's out buffers (all int32, on topk_ids' device, any
    strides):

    sorted_token_ids [>= S] pair ids p = t * k + j, expert 0's first, each expert's run
        padded to a multiple of block_size with the sentinel T*k, which also fills the rest;
        S = min(T*k + E * (block_size - 1), T*k * block_size) (vLLM's buffer size, or more,
        e.g. rounded up to block_size);
    experts_ids [>= ceil(S / block_size)] each tile's expert, -1 past the used tiles
        (with expert_map [E]: the mapped expert, -1 for other ranks' experts);
    num_tokens_post_pad [1] the used length of sorted_token_ids.
    See :func:`minikernels.ops.moe_align_block_size`.
    """
    _unsupported("scatter_idx", scatter_idx, "no scatter-index output")
    check_tensor("topk_ids", topk_ids, dtypes=_INDEX_DTYPES, ndim=2)
    sorted_ids, expert_ids, post = ops.moe_align_block_size(topk_ids, block_size,
                                                            num_experts, expert_map)
    for name, buf, need in (("sorted_token_ids", sorted_token_ids, sorted_ids.shape[0]),
                            ("experts_ids", experts_ids, expert_ids.shape[0]),
                            ("num_tokens_post_pad", num_tokens_post_pad, 1)):
        check_tensor(name, buf, dtypes=(torch.int32,), ndim=1, device=topk_ids.device)
        if buf.shape[0] < need:
            raise ValueError(f"{name} must have at least {need} entries for {topk_ids.numel()} "
                             f"pairs, {num_experts} experts and block_size {block_size}, got "
                             f"{list(buf.shape)}")
    s, b = sorted_ids.shape[0], expert_ids.shape[0]
    sorted_token_ids[:s].copy_(sorted_ids)
    sorted_token_ids[s:].fill_(topk_ids.numel())
    experts_ids[:b].copy_(expert_ids)
    experts_ids[b:].fill_(-1)
    num_tokens_post_pad[:1].copy_(post)


def _router_buffers(topk_weights: Tensor, topk_ids: Tensor, token_expert_indices: Tensor,
                    gating_output: Tensor) -> int:
    """Check vLLM's router out buffers against gating_output [T, E]; returns k."""
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, ndim=2,
                 device=gating_output.device)
    t, e = gating_output.shape
    k = topk_weights.shape[1]
    check_shape("topk_weights", topk_weights, [t, k])
    if not 1 <= k <= e:
        raise ValueError(f"topk_weights must have 1 .. {e} columns (k <= num_experts = "
                         f"gating_output's columns), got {list(topk_weights.shape)}")
    check_tensor("topk_ids", topk_ids, dtypes=_INDEX_DTYPES, device=gating_output.device)
    check_shape("topk_ids", topk_ids, [t, k])
    _check_out("token_expert_indices", token_expert_indices, topk_ids, [t, k], torch.int32)
    return k


def _write_routes(topk_weights: Tensor, topk_ids: Tensor, token_expert_indices: Tensor,
                  weights: Tensor, ids: Tensor) -> None:
    t, k = weights.shape
    topk_weights.copy_(weights)
    topk_ids.copy_(ids)
    slot = torch.arange(k, dtype=torch.int32, device=weights.device)
    token = torch.arange(t, dtype=torch.int32, device=weights.device)
    token_expert_indices.copy_(slot[None, :] * t + token[:, None])


def topk_softmax(topk_weights: Tensor, topk_ids: Tensor, token_expert_indices: Tensor,
                 gating_output: Tensor, renormalize: bool = False,
                 e_score_correction_bias: Tensor | None = None,
                 is_padding: Tensor | None = None) -> None:
    """Softmax top-k routing, writing vLLM's out buffers (any strides).

    gating_output [T, E] fp16/bf16/fp32 router logits; k = topk_weights.shape[1].
    topk_weights [T, k] float (fp32 in vLLM): the softmax probabilities of the k best
    experts, largest first (renormalize: divided by their sum); topk_ids [T, k] int32 /
    int64: their ids (ties: lower id first); token_expert_indices [T, k] int32:
    j * T + t. See :func:`minikernels.ops.topk_softmax`.
    """
    _unsupported("e_score_correction_bias", e_score_correction_bias,
                 "minikernels' softmax router has no score-correction bias (topk_sigmoid "
                 "has)")
    _unsupported("is_padding", is_padding, "no padding mask in minikernels' router")
    k = _router_buffers(topk_weights, topk_ids, token_expert_indices, gating_output)
    weights, ids = ops.topk_softmax(gating_output, k, renormalize, topk_ids.dtype)
    _write_routes(topk_weights, topk_ids, token_expert_indices, weights, ids)


def topk_sigmoid(topk_weights: Tensor, topk_ids: Tensor, token_expert_indices: Tensor,
                 gating_output: Tensor, renormalize: bool = False,
                 e_score_correction_bias: Tensor | None = None) -> None:
    """Sigmoid top-k routing, writing vLLM's out buffers (as :func:`topk_softmax`): the
    experts of the largest sigmoid(logit) (+ e_score_correction_bias [E], which only
    chooses), weights their sigmoid scores (renormalize: divided by their sum). See
    :func:`minikernels.ops.topk_sigmoid`."""
    k = _router_buffers(topk_weights, topk_ids, token_expert_indices, gating_output)
    weights, ids = ops.topk_sigmoid(gating_output, k, renormalize, e_score_correction_bias,
                                    indices_type=topk_ids.dtype)
    _write_routes(topk_weights, topk_ids, token_expert_indices, weights, ids)


def grouped_topk(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool,
                 num_expert_group: int = 0, topk_group: int = 0,
                 scoring_func: str = "softmax", routed_scaling_factor: float = 1.0,
                 e_score_correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """vLLM's group-limited routing (DeepSeek-V3, Nemotron 3) -> (topk_weights fp32 [T, k],
    topk_ids int32 [T, k]): sigmoid scores (+ e_score_correction_bias, which only
    chooses), the experts in num_expert_group groups of which the topk_group best stay
    choosable (a group's score: its two best biased scores, or its best without a bias),
    the top-k of those, weights the unbiased scores (renormalize: over their sum), times
    routed_scaling_factor. ``ops.topk_sigmoid``; scoring_func "sigmoid" only (minikernels'
    grouped router has no softmax scoring: a ValueError naming it)."""
    if scoring_func != "sigmoid":
        raise ValueError(f"scoring_func must be 'sigmoid' (minikernels' grouped router; "
                         f"softmax group routing is not supported), got {scoring_func!r}")
    check_tensor("hidden_states", hidden_states, min_ndim=1)
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2)
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(f"hidden_states has {hidden_states.shape[0]} tokens but "
                         f"gating_output has {gating_output.shape[0]} rows")
    groups = _check_int("num_expert_group", num_expert_group, 0) or 1
    limit = _check_int("topk_group", topk_group, 0) or groups
    scale = float(routed_scaling_factor)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"routed_scaling_factor must be finite and > 0, got "
                         f"{routed_scaling_factor!r}")
    weights, ids = ops.topk_sigmoid(gating_output, topk, renormalize, e_score_correction_bias,
                                    num_groups=groups, topk_groups=limit)
    return (weights * scale if scale != 1.0 else weights), ids


# ------------------------------------------------------- causal conv1d (Mamba / GDN)


def _conv_activation(activation: object) -> str | None:
    """vLLM's activation argument: None / False -> none; "silu" / "swish" / True -> SiLU."""
    if activation is None or activation is False:
        return None
    if activation is True:
        return "silu"
    if isinstance(activation, str) and activation in ("silu", "swish"):
        return activation
    raise ValueError(f"activation must be None, 'silu', 'swish' or a bool, got {activation!r}")


def _conv_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor,
                 state_name: str, x_name: str = "x") -> tuple[Tensor, Tensor, Tensor | None,
                                                              Tensor]:
    """vLLM computes in conv_state's dtype (x is cast to it) and reads / writes the first
    W - 1 columns of a conv_state [..., dim, state_len >= W - 1]; weight / bias of another
    dtype are widened to fp32 (exact)."""
    check_tensor(x_name, x, dtypes=FLOAT_DTYPES)
    check_tensor(state_name, conv_state, dtypes=FLOAT_DTYPES, ndim=3, device=x.device)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    width = weight.shape[1]
    if conv_state.shape[2] < width - 1:
        raise ValueError(f"{state_name} must have shape [..., dim, state_len >= width - 1 = "
                         f"{width - 1}], got {list(conv_state.shape)}")
    x = x.to(conv_state.dtype)
    allowed = (x.dtype, torch.float32)
    if weight.dtype not in allowed:
        weight = weight.float()
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
        if bias.dtype not in allowed:
            bias = bias.float()
    return x, weight, bias, conv_state[:, :, :max(width - 1, 0)]


def _conv_slots(name: str, indices: Tensor | None, n: int, pad_slot_id: int | None,
                device: torch.device) -> Tensor:
    """Each sequence's conv_state line: ``indices`` (None = sequence i uses line i), with
    ``pad_slot_id`` entries mapped to minikernels' -1 (padding row)."""
    if indices is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    check_tensor(name, indices, dtypes=_INDEX_DTYPES, ndim=1, device=device)
    if pad_slot_id is not None:
        _check_int("pad_slot_id", pad_slot_id, -(2**63))
        if pad_slot_id != -1:
            indices = torch.where(indices == pad_slot_id, -1, indices)
    return indices


@contextlib.contextmanager
def _vllm_names(names: dict[str, str]) -> Iterator[None]:
    """Re-raise the op's argument errors under vLLM's argument names."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for ours, theirs in names.items():
            msg = re.sub(rf"\b{ours}\b", theirs, msg)
        raise type(exc)(msg) from None


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Tensor | None, conv_states: Tensor,
                     query_start_loc: Tensor, cache_indices: Tensor | None = None,
                     has_initial_state: Tensor | None = None,
                     activation: str | bool | None = "silu", pad_slot_id: int | None = -1,
                     block_idx_first_scheduled_token: Tensor | None = None,
                     block_idx_last_scheduled_token: Tensor | None = None,
                     initial_state_idx: Tensor | None = None,
                     num_computed_tokens: Tensor | None = None, block_size_to_align: int = 0,
                     metadata: object = None, validate_data: bool = False) -> Tensor:
    """vLLM's varlen (prefill) causal conv1d (``mamba/ops/causal_conv1d.py``): returns out
    [dim, cu_seq_len] in x's dtype and updates conv_states in place.

    x [dim, cu_seq_len] (channel-first; sequences concatenated along dim 1, usually a
    channel-last view), weight [dim, width], bias [dim] or None, conv_states
    [num_cache_lines, dim, state_len >= width - 1] (columns 0 .. width - 2 used, oldest
    first), query_start_loc int32 [batch + 1]; cache_indices [batch] (None: sequence i
    uses line i), entries equal to pad_slot_id are padding; has_initial_state bool
    [batch] (None: every sequence starts from zeros, as vLLM's kernel). activation None /
    False, "silu" / "swish" / True. metadata (vLLM's launch plan) and validate_data are
    accepted and unused; the prefix-caching arguments (block_idx_* / initial_state_idx /
    num_computed_tokens) are not supported. See :func:`minikernels.ops.causal_conv1d`.
    """
    for name, value in (("block_idx_first_scheduled_token", block_idx_first_scheduled_token),
                        ("block_idx_last_scheduled_token", block_idx_last_scheduled_token),
                        ("initial_state_idx", initial_state_idx),
                        ("num_computed_tokens", num_computed_tokens)):
        _unsupported(name, value, "no per-block conv state caching (prefix caching of "
                     "Mamba states)")
    act = _conv_activation(activation)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    out_dtype = x.dtype
    xs, weight, bias, states = _conv_inputs(x, weight, bias, conv_states, "conv_states")
    check_tensor("query_start_loc", query_start_loc, dtypes=_INDEX_DTYPES, ndim=1,
                 device=x.device)
    n = max(query_start_loc.shape[0] - 1, 0)
    slots = _conv_slots("cache_indices", cache_indices, n, pad_slot_id, x.device)
    if has_initial_state is None:
        has_initial_state = torch.zeros(n, dtype=torch.bool, device=x.device)
    with _vllm_names({"cu_seqlens": "query_start_loc", "state_indices": "cache_indices",
                      "conv_state": "conv_states"}):
        out = ops.causal_conv1d(xs.t(), weight, bias, cu_seqlens=query_start_loc,
                                conv_state=states, state_indices=slots,
                                has_initial_state=has_initial_state, activation=act)
    return out.t().to(out_dtype)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor,
                         bias: Tensor | None = None, activation: str | bool | None = None,
                         conv_state_indices: Tensor | None = None,
                         num_accepted_tokens: Tensor | None = None,
                         query_start_loc: Tensor | None = None, max_query_len: int = -1,
                         pad_slot_id: int | None = -1,
                         block_idx_last_scheduled_token: Tensor | None = None,
                         initial_state_idx: Tensor | None = None,
                         retrieve_parent_token: Tensor | None = None,
                         validate_data: bool = False) -> Tensor:
    """vLLM's decode-step causal conv1d: returns out shaped like x (x's dtype) and shifts
    each sequence's conv_state in place.

    x [batch, dim] (one token each) or [batch, dim, seqlen]; conv_state [num_cache_lines,
    dim, state_len >= width - 1] (columns 0 .. width - 2 used, oldest first; always read:
    every sequence continues its state); weight [dim, width]; bias [dim] or None;
    activation None / False, "silu" / "swish" / True; conv_state_indices [batch] (None:
    sequence i uses line i), entries equal to pad_slot_id are padding. The varlen form
    (query_start_loc / max_query_len), speculative decoding (num_accepted_tokens,
    retrieve_parent_token) and prefix caching (block_idx_last_scheduled_token,
    initial_state_idx) are not supported. See :func:`minikernels.ops.causal_conv1d`.
    """
    for name, value, why in (
            ("num_accepted_tokens", num_accepted_tokens, "no speculative conv-state window"),
            ("retrieve_parent_token", retrieve_parent_token, "no EAGLE tree conv states"),
            ("query_start_loc", query_start_loc, "use causal_conv1d_fn or "
             "minikernels.ops.causal_conv1d for varlen batches"),
            ("block_idx_last_scheduled_token", block_idx_last_scheduled_token,
             "no per-block conv state caching"),
            ("initial_state_idx", initial_state_idx, "no per-block conv state caching")):
        _unsupported(name, value, why)
    act = _conv_activation(activation)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    out_dtype, shape = x.dtype, x.shape
    xs, weight, bias, states = _conv_inputs(x, weight, bias, conv_state, "conv_state")
    batch, dim = x.shape[0], x.shape[1]
    seqlen = 1 if x.dim() == 2 else x.shape[2]
    tokens = xs if x.dim() == 2 else xs.transpose(1, 2).reshape(batch * seqlen, dim)
    if conv_state_indices is None and conv_state.shape[0] < batch:
        raise ValueError(f"conv_state must have a line per sequence (batch = {batch}) when "
                         f"conv_state_indices is None, got shape {list(conv_state.shape)}")
    slots = _conv_slots("conv_state_indices", conv_state_indices, batch, pad_slot_id,
                        x.device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=x.device) * seqlen
    with _vllm_names({"state_indices": "conv_state_indices"}):
        out = ops.causal_conv1d(tokens, weight, bias, cu_seqlens=cu, conv_state=states,
                                state_indices=slots, activation=act, max_seqlen=seqlen)
    if x.dim() == 3:
        out = out.view(batch, seqlen, dim).transpose(1, 2).contiguous()
    return out.to(out_dtype).view(shape)


# ------------------------------------------------- linear attention (Gated DeltaNet, FLA)


def _not_implemented(name: str, value: object, why: str) -> None:
    if value is not None:
        raise NotImplementedError(f"{name} is not supported by minikernels ({why}); pass None")


def fused_recurrent_gated_delta_rule(
        q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None = None,
        scale: float | None = None, initial_state: Tensor | None = None,
        inplace_final_state: bool = True, cu_seqlens: Tensor | None = None,
        ssm_state_indices: Tensor | None = None, num_accepted_tokens: Tensor | None = None,
        retrieve_parent_token: Tensor | None = None,
        use_qk_l2norm_in_kernel: bool = False) -> tuple[Tensor, Tensor]:
    """vLLM's ``model_executor.layers.fla.ops.fused_recurrent_gated_delta_rule`` (FLA's
    recurrent gated delta rule with vLLM's continuous-batching state pool) -> (o,
    final_state), on :func:`minikernels.ops.gated_delta_rule`.

    q, k [B, T, H, K], v [B, T, HV, V] (one dtype; HV a multiple of H), g [B, T, HV]
    log-decay, beta [B, T, HV] (None = ones); with cu_seqlens (int32 / int64 [N + 1]) B
    must be 1 and the T tokens are N varlen sequences, else each of the B rows is one
    sequence. scale None = K ** -0.5. o [B, T, HV, V] in v's dtype.
    initial_state [S, HV, K, V] (fp32; fp16 / bf16 pools are read into fp32 and the final
    states rounded back once): sequence i starts from initial_state[ssm_state_indices[i]]
    (ssm_state_indices None: slot i) and its final state is written there in place
    (inplace_final_state=True); final_state is initial_state. ssm_state_indices -1 marks a
    padding row: zero outputs, no slot read or written (vLLM's PAD_SLOT_ID). initial_state
    None: every sequence starts from zeros and final_state is a new fp32 [N, HV, K, V].
    Not supported (NotImplementedError naming the argument): num_accepted_tokens and 2-D
    ssm_state_indices (speculative decoding's per-token slots), retrieve_parent_token
    (EAGLE trees), inplace_final_state=False (vLLM then returns every token's state
    [T, HV, K, V]), per-channel beta [B, T, HV, V].
    Differences: vLLM's kernel indexes slots by ssm_state_indices[i + t] for the t-th
    token of a multi-token sequence (it is only called with one token per row, or with
    2-D indices); here a sequence of any length reads and writes its own slot once.
    """
    _not_implemented("num_accepted_tokens", num_accepted_tokens,
                     "speculative decoding's per-token state slots")
    _not_implemented("retrieve_parent_token", retrieve_parent_token, "EAGLE tree decoding")
    if not isinstance(inplace_final_state, bool):
        raise TypeError(f"inplace_final_state must be a bool, got "
                        f"{type(inplace_final_state).__name__}")
    if not inplace_final_state:
        raise NotImplementedError("inplace_final_state=False is not supported by minikernels "
                                  "(vLLM then returns every token's state [T, HV, K, V]); "
                                  "pass True")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    dev = q.device
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    b, t, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    check_shape("k", k, list(q.shape))
    check_shape("v", v, [b, t, None, None])
    check_tensor("g", g, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    check_shape("g", g, [b, t, hv])
    if beta is None:
        beta = torch.ones(b, t, hv, dtype=torch.float32, device=dev)
    check_tensor("beta", beta, dtypes=FLOAT_DTYPES, ndim=(3, 4), device=dev)
    if beta.dim() == 4:
        raise NotImplementedError("beta of shape [B, T, HV, V] (per-channel betas) is not "
                                  "supported by minikernels; pass [B, T, HV]")
    check_shape("beta", beta, [b, t, hv])
    if cu_seqlens is None:
        cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=dev) * t
    else:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
        if b != 1:
            raise ValueError(f"q must have batch size 1 with cu_seqlens (flatten the "
                             f"sequences into T), got shape {list(q.shape)}")
    n = cu_seqlens.shape[0] - 1
    flat = [x.flatten(0, 1) for x in (q, k, v, g, beta)]

    def run(state: Tensor, slots: Tensor) -> Tensor:
        try:
            return ops.gated_delta_rule(*flat, cu_seqlens=cu_seqlens, state=state,
                                        state_indices=slots, scale=scale,
                                        use_qk_l2norm=use_qk_l2norm_in_kernel)
        except (ValueError, TypeError) as exc:   # the op's errors under vLLM's names
            msg = re.sub(r"\bstate_indices\b", "ssm_state_indices", str(exc))
            msg = re.sub(r"\buse_qk_l2norm\b", "use_qk_l2norm_in_kernel", msg)
            raise type(exc)(msg) from None

    if initial_state is None:
        if ssm_state_indices is not None:
            raise ValueError("ssm_state_indices needs initial_state (the state pool)")
        final = torch.zeros(max(n, 0), hv, dk, dv, dtype=torch.float32, device=dev)
        o = run(final, torch.arange(max(n, 0), device=dev))
        return o.view(b, t, hv, dv), final
    check_tensor("initial_state", initial_state, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    check_shape("initial_state", initial_state, [None, hv, dk, dv])
    slots_total = initial_state.shape[0]
    if ssm_state_indices is None:
        if slots_total < n:
            raise ValueError(f"initial_state must have a slot per sequence (N = {n}) without "
                             f"ssm_state_indices, got shape {list(initial_state.shape)}")
        slots = torch.arange(n, device=dev)
    else:
        check_tensor("ssm_state_indices", ssm_state_indices, dtypes=_INDEX_DTYPES,
                     ndim=(1, 2), device=dev)
        if ssm_state_indices.dim() == 2:
            raise NotImplementedError(
                "ssm_state_indices of shape [N, T] (speculative decoding's per-token state "
                "slots) is not supported by minikernels; pass one slot per sequence [N]")
        check_shape("ssm_state_indices", ssm_state_indices, [n])
        slots = ssm_state_indices
        if index_checks_active(slots):
            lo, hi = int(slots.min()), int(slots.max())
            if lo < -1 or hi >= slots_total:
                raise ValueError(f"ssm_state_indices values must be -1 (padding) or in [0, "
                                 f"{slots_total}), got min {lo} and max {hi}")
            used = slots[slots >= 0]
            if used.unique().numel() != used.numel():
                raise ValueError("ssm_state_indices must be distinct (apart from -1 padding)")
    if initial_state.dtype == torch.float32:
        o = run(initial_state, slots)
    else:   # an fp16 / bf16 pool: the sequences' slots in fp32, rounded back once
        live = slots >= 0
        used = slots[live].long()
        work = initial_state[used].float()
        local = torch.full((n,), -1, dtype=torch.int64, device=dev)
        local[live] = torch.arange(used.shape[0], device=dev)
        o = run(work, local)
        initial_state[used] = work.to(initial_state.dtype)
    return o.view(b, t, hv, dv), initial_state


# ------------------------------------------- Mamba-2 selective state update (mamba_ssm)


def _per_head(name: str, t: Tensor, keep: int, dims: str) -> Tensor:
    """vLLM's expanded per-head value (A [H, P, N], dt [batch, H, P], D / dt_bias [H, P])
    -> its values at index 0 of the dims past the first ``keep`` ones. Values that vary
    along those dims are refused (checked where they are not stride-0 views, when index
    checks are on): minikernels' mamba2_scan takes one A, dt, D, dt_bias per head."""
    first = t
    for d in range(t.dim() - 1, keep - 1, -1):
        first = first.select(d, 0)
    varying = any(t.shape[d] > 1 and t.stride(d) != 0 for d in range(keep, t.dim()))
    if varying and t.numel() and index_checks_active(t):
        ref = first.reshape(*first.shape, *([1] * (t.dim() - keep))).expand_as(t)
        if not bool(((t == ref) | (t.isnan() & ref.isnan())).all()):
            raise ValueError(f"{name} must be constant along its {dims} dims (vLLM's expanded "
                             f"per-head values; minikernels' mamba2_scan takes one value per "
                             f"head), got shape {list(t.shape)} with varying values")
    return first


def _ssu_slots(name: str, indices: Tensor | None, n: int, slots_total: int,
               pad_slot_id: int, device: torch.device) -> Tensor:
    """Each sequence's state slot ([n] or column 0 of [>= n, K]; None = slot i), with
    pad_slot_id entries mapped to -1; values and distinctness checked (index checks on)."""
    if indices is None:
        if slots_total < n:
            raise ValueError(f"state must have a slot per sequence (batch = {n}) without "
                             f"{name}, got {slots_total} slots")
        return torch.arange(n, device=device)
    check_tensor(name, indices, dtypes=_INDEX_DTYPES, ndim=(1, 2), device=device)
    if indices.shape[0] < n:
        raise ValueError(f"{name} must have at least batch = {n} rows, got shape "
                         f"{list(indices.shape)}")
    if indices.dim() == 2:
        if indices.shape[1] < 1:
            raise ValueError(f"{name} must have at least one column, got shape "
                             f"{list(indices.shape)}")
        indices = indices[:, 0]
    indices = indices[:n]
    if n and index_checks_active(indices):
        ok = (indices == pad_slot_id) | ((indices >= 0) & (indices < slots_total))
        if not bool(ok.all()):
            raise ValueError(f"{name} values must be pad_slot_id ({pad_slot_id}) or in [0, "
                             f"{slots_total}), got {indices[~ok][:4].tolist()}")
    indices = torch.where(indices == pad_slot_id, -1, indices.long())
    if n and index_checks_active(indices):
        used = indices[indices >= 0]
        if used.unique().numel() != used.numel():
            raise ValueError(f"{name} must be distinct (apart from pad_slot_id entries)")
    return indices


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                           dt_bias: Tensor | None = None, dt_softplus: bool = False,
                           state_batch_indices: Tensor | None = None,
                           dst_state_batch_indices: Tensor | None = None,
                           pad_slot_id: int = -1, out: Tensor | None = None,
                           num_accepted_tokens: Tensor | None = None,
                           cu_seqlens: Tensor | None = None, is_blackwell: bool = False,
                           enable_stochastic_rounding: bool = False,
                           cache_philox_rounds: int = 0) -> Tensor:
    """vLLM's decode step (``model_executor/layers/mamba/ops/mamba_ssm.py``) on
    :func:`minikernels.ops.mamba2_scan` (Mamba-2: one value per head) or
    :func:`minikernels.ops.selective_scan` (Mamba-1 / per-channel values): writes out (when
    given) and returns it, or returns a new tensor shaped like x; updates the state pool in
    place.

    state [S, H, P, N] or [S, P, N] (fp32 / fp16 / bf16, any strides; fp16 / bf16 pools are
    read into fp32 and the new states rounded back once); x [batch, H, P] or [batch, P];
    dt like x; A [H, P, N] or [P, N]; B, C [batch, G, N] or [batch, N]; D, dt_bias [H, P] or
    [P] or None; z like x or None (out = y * silu(z)). Mamba-2's models pass per-head A,
    dt, D, dt_bias expanded with stride 0 along P (and N) (vLLM's TIE_HDIM path): they run
    on mamba2_scan (values checked equal when index checks are on); the 3-D Mamba-1 form,
    and values varying along P or N, run on selective_scan over the H * P channels (B / C
    group g serves heads g * H / G ...).
    state_batch_indices [batch] (or [batch, K]: column 0; None = slot i); entries equal to
    pad_slot_id are padding rows. dst_state_batch_indices (same layout): where the new
    states go (None = back to the source slots). cu_seqlens [N + 1]: x's rows are N
    varlen sequences, each continuing its slot. is_blackwell (a tuning flag) is ignored;
    num_accepted_tokens (speculative decoding) and enable_stochastic_rounding raise
    NotImplementedError.
    Differences: padding rows' outputs are zeros (vLLM computes them from a zero state);
    on mamba2_scan y is rounded to x's dtype before the z gate (vLLM gates in fp32): about
    an ulp.
    """
    _not_implemented("num_accepted_tokens", num_accepted_tokens,
                     "speculative decoding's per-token state slots")
    if not isinstance(enable_stochastic_rounding, bool):
        raise TypeError(f"enable_stochastic_rounding must be a bool, got "
                        f"{type(enable_stochastic_rounding).__name__}")
    if enable_stochastic_rounding:
        raise NotImplementedError("enable_stochastic_rounding=True is not supported by "
                                  "minikernels (states are rounded to nearest); pass False")
    _check_bool("dt_softplus", dt_softplus)
    _check_int("pad_slot_id", pad_slot_id, -(2**63))
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    dev, shape = x.device, x.shape
    check_tensor("state", state, dtypes=FLOAT_DTYPES, ndim=(3, 4), device=dev)
    ranks = (("dt", dt, (2, 3), 1), ("A", A, (2, 3), 0), ("B", B, (2, 3), 1),
             ("C", C, (2, 3), 1), ("D", D, (1, 2), 0), ("z", z, (2, 3), 1),
             ("dt_bias", dt_bias, (1, 2), 0), ("out", out, (2, 3), 1))
    up = {}
    for name, t, ndims, at in ranks:
        if t is None:
            up[name] = None
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=ndims, device=dev)
        up[name] = t.unsqueeze(at) if t.dim() == ndims[0] else t
    st = state.unsqueeze(1) if state.dim() == 3 else state
    xs = x.unsqueeze(1) if x.dim() == 2 else x
    batch, h, p = xs.shape
    p_dim, n_state = p, st.shape[3]
    if h == 0 or p == 0:
        raise ValueError(f"x must have nheads >= 1 and head dim >= 1, got shape {list(shape)}")
    check_shape("state", st, [None, h, p, None])
    if n_state == 0:
        raise ValueError(f"state must have dstate >= 1, got shape {list(state.shape)}")
    check_shape("dt", up["dt"], [batch, h, p])
    check_shape("A", up["A"], [h, p, n_state])
    groups = up["B"].shape[1]
    check_shape("B", up["B"], [batch, None, n_state])
    if groups == 0 or h % groups:
        raise ValueError(f"B's groups ({groups}) must divide nheads ({h})")
    check_shape("C", up["C"], list(up["B"].shape))
    for name in ("D", "dt_bias"):
        if up[name] is not None:
            check_shape(name, up[name], [h, p])
    if z is not None:
        check_shape("z", up["z"], [batch, h, p])
    if out is not None:
        _check_out("out", out, x)
    if cu_seqlens is None:
        cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    else:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must have N + 1 >= 1 entries, got shape "
                             f"{list(cu_seqlens.shape)}")
        cu = cu_seqlens
    n = cu.shape[0] - 1
    slots_total = st.shape[0]
    src = _ssu_slots("state_batch_indices", state_batch_indices, n, slots_total,
                     pad_slot_id, dev)
    dst = None
    if dst_state_batch_indices is not None:
        dst = _ssu_slots("dst_state_batch_indices", dst_state_batch_indices, n,
                         slots_total, pad_slot_id, dev)
    heads = None if state.dim() == 3 else _one_value_per_head(up, D, dt_bias)
    # the op wants B / C (and, per channel, z) in x's dtype: otherwise all in fp32 (exact
    # widening), one rounding to x's dtype at the end
    mixed = [up["B"], up["C"]] + ([up["z"]] if heads is None and z is not None else [])
    xw = xs.float() if any(t.dtype != x.dtype for t in mixed) else xs
    bw, cw = (t.to(xw.dtype) for t in (up["B"], up["C"]))

    if heads is not None:   # Mamba-2: one A / dt / D / dt_bias per head (mamba2_scan)
        a, dt_h, d_h, bias_h = (_as_op_dtype(t, xw.dtype) for t in heads)

        def run(pool: Tensor, slots: Tensor) -> Tensor:
            with _vllm_names({"state_indices": "state_batch_indices"}):
                return ops.mamba2_scan(xw, dt_h, a, bw, cw, cu_seqlens=cu, D=d_h,
                                       dt_bias=bias_h, dt_softplus=dt_softplus,
                                       dt_limit=(-math.inf, math.inf), state=pool,
                                       state_indices=slots)

        y = _on_pool(st, src, dst, run)
        if z is not None:
            y = y.float() * torch.nn.functional.silu(up["z"].float())
    else:   # Mamba-1 / per-channel values: the h * p channels through selective_scan
        zw = None if z is None else up["z"].to(xw.dtype).flatten(1)
        a, dt_c, d_c, bias_c = (None if t is None else _as_op_dtype(t, xw.dtype)
                                for t in (up["A"].flatten(0, 1), up["dt"].flatten(1),
                                          _flat(up["D"]), _flat(up["dt_bias"])))

        def run(pool: Tensor, slots: Tensor) -> Tensor:
            with _vllm_names({"state_indices": "state_batch_indices"}):
                return ops.selective_scan(xw.flatten(1), dt_c, a, bw, cw, cu_seqlens=cu,
                                          D=d_c, z=zw, dt_bias=bias_c,
                                          dt_softplus=dt_softplus, state=pool,
                                          state_indices=slots)

        y = _on_pool(st, src, dst, run, as_op=lambda p: p.view(p.shape[0], h * p_dim,
                                                                 n_state))
    y = y.to(x.dtype).view(shape)
    if out is None:
        return y
    out.copy_(y)
    return out


def _flat(t: Tensor | None) -> Tensor | None:
    """[H, P] -> [H * P] (a view where the strides allow)."""
    return None if t is None else t.flatten(0, 1)


def _as_op_dtype(t: Tensor | None, x_dtype: torch.dtype) -> Tensor | None:
    """dt / A / D / dt_bias in a dtype the ops take (fp32 or x's), else widened to fp32."""
    return t if t is None or t.dtype in (torch.float32, x_dtype) else t.float()


def _one_value_per_head(up: dict, D: Tensor | None, dt_bias: Tensor | None
                        ) -> tuple[Tensor, ...] | None:
    """Mamba-2's expanded per-head A / dt / D / dt_bias -> one value per head each, or None
    when a value varies along the head dim (or dstate): per-channel values, which
    selective_scan takes (the checks read the values: index checks on)."""
    try:
        return (_per_head("A", up["A"], 1, "head_dim and dstate"),
                _per_head("dt", up["dt"], 2, "head_dim"),
                None if D is None else _per_head("D", up["D"], 1, "head_dim"),
                None if dt_bias is None else _per_head("dt_bias", up["dt_bias"], 1,
                                                       "head_dim"))
    except ValueError as exc:
        if "varying values" in str(exc):
            return None
        raise


def _on_pool(st: Tensor, src: Tensor, dst: Tensor | None,
             run: Callable[[Tensor, Tensor], Tensor],
             as_op: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``run(pool, slots)`` on the caller's state pool, in place, when it can be (fp32, no
    separate destinations, and ``as_op`` (the op's view of the pool, e.g. heads and head
    dims merged into channels) a view of it); otherwise on an fp32 copy of the used slots,
    written back once (rounded to the pool's dtype) to dst, or to src."""
    view = as_op or (lambda t: t)
    if st.dtype == torch.float32 and dst is None:
        try:
            pool = view(st)
        except RuntimeError:            # dims that do not merge into one view
            pool = None
        if pool is not None:
            return run(pool, src)
    live = src >= 0
    used = src[live]
    work = st[used].float()
    local = torch.full((src.shape[0],), -1, dtype=torch.int64, device=src.device)
    local[live] = torch.arange(used.shape[0], device=src.device)
    y = run(view(work), local)
    to = used if dst is None else dst[live]
    keep = to >= 0
    st[to[keep]] = work[keep].to(st.dtype)
    return y


# ----------------------------------------- Mamba-1 selective scan (vLLM's varlen prefill)


def _scan_tokens(name: str, t: Tensor, varlen: bool) -> Tensor:
    """u / delta / z ([dim, T] varlen, or [batch, dim, seqlen]) -> token-major [T', dim]
    (a view where the strides allow: always for varlen)."""
    if varlen:
        return t.t()
    return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1])


def _scan_bc(name: str, t: Tensor, varlen: bool, lead: list[int], device: torch.device
             ) -> Tensor:
    """B / C ([ngroups, dstate, T] or [dstate, T] varlen; [batch, ngroups, dstate, seqlen]
    or [batch, dstate, seqlen]) -> token-major [T', ngroups, dstate]."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=(2, 3) if varlen else (3, 4),
                 device=device)
    if varlen:
        t3 = t.unsqueeze(0) if t.dim() == 2 else t
        check_shape(name, t3, [None, None, lead[0]])
        return t3.permute(2, 0, 1)
    t4 = t.unsqueeze(1) if t.dim() == 3 else t
    check_shape(name, t4, [lead[0], None, None, lead[1]])
    return t4.permute(0, 3, 1, 2).reshape(lead[0] * lead[1], t4.shape[1], t4.shape[2])


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D_: Tensor | None, z_: Tensor | None, delta_bias_: Tensor | None,
                       delta_softplus: bool, query_start_loc: Tensor | None,
                       cache_indices: Tensor | None, has_initial_state: Tensor | None,
                       ssm_states: Tensor, pad_slot_id: int, block_size: int = 1024,
                       block_idx_first_scheduled_token: Tensor | None = None,
                       block_idx_last_scheduled_token: Tensor | None = None,
                       initial_state_idx: Tensor | None = None,
                       cu_chunk_seqlen: Tensor | None = None,
                       last_chunk_indices: Tensor | None = None) -> None:
    """vLLM's Mamba-1 selective scan op (``torch.ops._C.selective_scan_fwd``) on
    :func:`minikernels.ops.selective_scan`: returns None; the output is written IN PLACE
    into delta (y = s . C + D u, before the gate) and, with z_, the gated y * silu(z) into
    z_ (vLLM's ``selective_scan_fn`` returns z_ then, else delta); ssm_states updated in
    place.

    Varlen (query_start_loc int32 [batch + 1] given): u, delta, z_ [dim, T]; B, C [ngroups,
    dstate, T] (or [dstate, T]). Otherwise u, delta, z_ [batch, dim, seqlen] and B, C
    [batch, ngroups, dstate, seqlen] (or [batch, dstate, seqlen]), one sequence per row.
    A [dim, dstate], D_ / delta_bias_ [dim] (fp32); delta in u's dtype; ssm_states
    [num_slots, dim, dstate] (fp32, or u's dtype: read into fp32, the new states rounded
    back once); cache_indices [batch] (None: sequence i uses slot i; entries equal to
    pad_slot_id are padding rows); has_initial_state bool [batch] (None: every sequence
    starts from zeros, as vLLM's kernel). block_size is accepted (it only tiles vLLM's
    prefix-caching mode); the prefix-caching arguments (block_idx_*, initial_state_idx,
    cu_chunk_seqlen, last_chunk_indices) raise a ValueError.
    Differences: padding rows' outputs are zeros (vLLM leaves them unwritten); with z_
    the gate multiplies y rounded to u's dtype (vLLM gates in fp32): about an ulp.
    """
    for name, value in (("block_idx_first_scheduled_token", block_idx_first_scheduled_token),
                        ("block_idx_last_scheduled_token", block_idx_last_scheduled_token),
                        ("initial_state_idx", initial_state_idx),
                        ("cu_chunk_seqlen", cu_chunk_seqlen),
                        ("last_chunk_indices", last_chunk_indices)):
        _unsupported(name, value, "no per-block SSM state caching (prefix caching of "
                     "Mamba states)")
    _check_bool("delta_softplus", delta_softplus)
    _check_int("pad_slot_id", pad_slot_id, -(2**63))
    _check_int("block_size", block_size, 1)
    varlen = query_start_loc is not None
    check_tensor("u", u, dtypes=FLOAT_DTYPES, ndim=2 if varlen else 3)
    dev = u.device
    for name, t in (("delta", delta), ("z_", z_)):
        if t is not None:
            check_tensor(name, t, dtypes=(u.dtype,), device=dev)
            check_shape(name, t, list(u.shape))
    check_tensor("A", A, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    dim = u.shape[0] if varlen else u.shape[1]
    check_shape("A", A, [dim, None])
    if varlen:
        check_tensor("query_start_loc", query_start_loc, dtypes=_INDEX_DTYPES, ndim=1,
                     device=dev)
        cu, lead = query_start_loc, [u.shape[1]]
    else:
        batch, seqlen = u.shape[0], u.shape[2]
        cu = torch.arange(batch + 1, dtype=torch.int32, device=dev) * seqlen
        lead = [batch, seqlen]
    bt, ct = (_scan_bc(name, t, varlen, lead, dev) for name, t in (("B", B), ("C", C)))
    check_tensor("ssm_states", ssm_states, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    check_shape("ssm_states", ssm_states, [None, dim, A.shape[1]])
    n = max(cu.shape[0] - 1, 0)
    slots = _ssu_slots("cache_indices", cache_indices, n, ssm_states.shape[0], pad_slot_id,
                       dev)
    if n:   # an empty sequence writes no state (vLLM's kernel runs no chunk for it)
        slots = torch.where(cu[1:] == cu[:-1], -1, slots)
    if has_initial_state is None:
        has_initial_state = torch.zeros(n, dtype=torch.bool, device=dev)
    xw = u if bt.dtype == ct.dtype == u.dtype else u.float()
    bt, ct = bt.to(xw.dtype), ct.to(xw.dtype)
    dt, a, d, bias = (_as_op_dtype(t, xw.dtype) for t in (delta, A, D_, delta_bias_))

    def run(pool: Tensor, idx: Tensor) -> Tensor:
        with _vllm_names({"cu_seqlens": "query_start_loc", "state_indices": "cache_indices",
                          "dt_bias": "delta_bias_", "dt": "delta", "x": "u"}):
            return ops.selective_scan(_scan_tokens("u", xw, varlen),
                                      _scan_tokens("delta", dt, varlen), a, bt, ct,
                                      cu_seqlens=cu, D=d, dt_bias=bias,
                                      dt_softplus=delta_softplus, state=pool,
                                      state_indices=idx, has_initial_state=has_initial_state)

    y = _on_pool(ssm_states, slots, None, run)
    out = y.to(u.dtype)
    if varlen:
        delta.t().copy_(out)
    else:
        delta.transpose(1, 2).copy_(out.view(lead[0], lead[1], dim))
    if z_ is not None:
        zt = z_.t() if varlen else z_.transpose(1, 2).reshape(-1, dim)
        gated = (y.float() * torch.nn.functional.silu(zt.float())).to(z_.dtype)
        if varlen:
            z_.t().copy_(gated)
        else:
            z_.transpose(1, 2).copy_(gated.view(lead[0], lead[1], dim))


def selective_scan_fn(u: Tensor, ssm_states: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                      C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                      delta_bias: Tensor | None = None, delta_softplus: bool = False,
                      query_start_loc: Tensor | None = None,
                      cache_indices: Tensor | None = None,
                      has_initial_state: Tensor | None = None, pad_slot_id: int = -1,
                      block_size: int = 1024,
                      block_idx_first_scheduled_token: Tensor | None = None,
                      block_idx_last_scheduled_token: Tensor | None = None,
                      initial_state_idx: Tensor | None = None,
                      cu_chunk_seqlen: Tensor | None = None,
                      last_chunk_indices: Tensor | None = None) -> Tensor:
    """vLLM's Python wrapper of that op (``model_executor/layers/mamba/ops/mamba_ssm.py``,
    what its Mamba-1 mixer calls; note ssm_states second): returns z (the gated output,
    written in place) when z is given, else delta (the output, written in place). See
    :func:`selective_scan_fwd` for layouts; the caller's tensors are written whatever
    their strides (vLLM's wrapper first copies inputs whose last dim is strided)."""
    selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, query_start_loc,
                       cache_indices, has_initial_state, ssm_states, pad_slot_id,
                       block_size, block_idx_first_scheduled_token,
                       block_idx_last_scheduled_token, initial_state_idx, cu_chunk_seqlen,
                       last_chunk_indices)
    return delta if z is None else z


# --------------------------------------------------------------------- GPTQ / AWQ GEMMs
#
# The checkpoint layouts (docs/int4_format.md, minikernels/quant/checkpoints.py), W [K, N]
# as the math x @ W:
#   GPTQ  qweight int32 [K * bit / 32, N]: value j of word (r, n) (bits j*bit..) is
#                 q[r*32/bit + j, n]
#         qzeros  int32 [groups, N * bit / 32]: value j of word (g, c) = zero[g, c*32/bit + j];
#                 v1 ("gptq") stores zero - 1 (vLLM's kernels add 1 back), v2 stores zero
#         scales [groups, N]; g_idx int [K]: the group of each row (act order permutes it)
#   AWQ   qweight int32 [K, N / 8]: nibble i of word (k, c) = q[k, 8c + AWQ_ORDER[i]]
#         qzeros  int32 [groups, N / 8] the same order, zero as stored; scales [groups, N]
#   W[k, n] = (q[k, n] - zero[group(k), n]) * scale[group(k), n]


#: Slot i (bits 4i..4i+3) of a 4-bit word that ``gptq_shuffle`` has shuffled holds row
#: 8r + EXLLAMA_ORDER[i] of its 8-row block (vLLM's ``shuffle_4bit_8``: nibbles
#: "77775555 33331111 66664444 22220000", the order exllama's half2 dequant reads).
#: 8-bit words are not shuffled.
EXLLAMA_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
QUANT_GEMM_BITS = (4, 8)


class UnsupportedBitsError(ValueError, NotImplementedError):
    """A bit width minikernels has no weight op for. A ValueError (minikernels' convention:
    it names the argument) and a NotImplementedError (what AutoGPTQ / AutoAWQ raise)."""


def _check_bits(name: str, bits: object, allowed: tuple[int, ...] = QUANT_GEMM_BITS) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
    if bits not in allowed:
        raise UnsupportedBitsError(
            f"{name}={bits} is not supported: minikernels runs "
            f"{' and '.join(str(b) for b in allowed)}-bit weights (ops.int4_matmul"
            f"{', ops.int8_matmul' if 8 in allowed else ''}); 2- and 3-bit GPTQ have no "
            "minikernels op")
    return bits


def _unpack_rows(words: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """int32 [R, N] packed along dim 0 (GPTQ's qweight) -> int32 [R * 32 / bits, N]."""
    t = words.t()
    return (unpack_nibbles(t, order) if bits == 4 else unpack_bytes(t)).t()


def _pack_rows(q: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`_unpack_rows`: int [K, N] -> int32 [K * bits / 32, N]."""
    t = q.t()
    return (pack_nibbles(t, order) if bits == 4 else pack_bytes(t)).t()


def _unpack_cols(words: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """int32 [G, C] packed along dim 1 (qzeros, AWQ's qweight) -> int32 [G, C * 32 / bits]."""
    return unpack_nibbles(words, order) if bits == 4 else unpack_bytes(words)


def _optional_index(name: str, t: object, k: int, device: torch.device) -> Tensor | None:
    """vLLM's "no g_idx / perm": an empty tensor or one on the meta device (its kernels then
    get a null pointer); None is accepted too. Otherwise an int32 / int64 [K] tensor."""
    if t is None:
        return None
    check_tensor(name, t)
    if t.numel() == 0 or t.device.type == "meta":     # any dtype (AutoGPTQ passes a float one)
        return None
    check_tensor(name, t, dtypes=_INDEX_DTYPES, ndim=1, device=device)
    check_shape(name, t, [k])
    return t.to(torch.int64)


def _check_permutation(name: str, perm: Tensor, k: int, what: str) -> None:
    if index_checks_active(perm) and not torch.equal(
            torch.sort(perm).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"{name} must be a permutation of the K = {k} input rows ({what}) "
                         "or empty")


@dataclass(eq=False)
class GroupedWeight:
    """A GPTQ / AWQ weight W [K, N] (y = x @ W) decoded from its checkpoint words: the
    stored integers with their group of each row, ready to run on minikernels' ops.

    q          int32 [K, N], the stored values (0 .. 2^bits - 1) in stored row order.
    zeros      int32 [groups, N], the zero points as the kernels apply them (GPTQ v1's
               stored zero - 1 already undone).
    scales     [groups, N], fp16 / bf16 / fp32 as stored.
    row_group  int64 [K], the group of each stored row.
    perm       int64 [K] or None: stored row k multiplies x[..., perm[k]] (exllama's
               act-order permutation); None = row k multiplies x[..., k].
    W_stored[k, n] = (q[k, n] - zeros[row_group[k], n]) * scales[row_group[k], n]
    """

    q: Tensor
    zeros: Tensor
    scales: Tensor
    row_group: Tensor
    perm: Tensor | None
    bits: int
    _canonical: object = field(default=None, repr=False)
    _tried: bool = field(default=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N)."""
        return int(self.q.shape[0]), int(self.q.shape[1])

    def dequantize(self) -> Tensor:
        """W [K, N] in fp32 in the input's row order (perm undone): exact."""
        w = (self.q.float() - self.zeros.float()[self.row_group]) \
            * self.scales.float()[self.row_group]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w

    def canonical(self) -> object:
        """The same weight in minikernels' layout (an :class:`~minikernels.quant.
        Int4Weight` or :class:`~minikernels.quant.int8.Int8WoWeight`, N x K, rows sorted
        by group, ``perm`` for act order), or None where that layout cannot hold it
        (fp32 scales, groups that are not K / groups contiguous rows after a stable
        sort, a group size that is not a multiple of 8 (int4) / 16 (int8), K or N not a
        multiple of 8 for int4). Built once (a pass over the weight), then kept."""
        if not self._tried:
            self._canonical = self._build_canonical()
            self._tried = True
        return self._canonical

    def _build_canonical(self) -> object:
        k, n = self.shape
        groups = int(self.scales.shape[0])
        if self.scales.dtype not in HALF_DTYPES or groups == 0 or k == 0 or k % groups:
            return None
        g = k // groups
        if (self.bits == 4 and (k % 8 or n % 8)) or \
                (groups > 1 and g % (8 if self.bits == 4 else INT8_WO_GROUP_MULTIPLE)):
            return None
        q, perm = self.q, self.perm
        expected = torch.arange(k, device=q.device) // g
        if not torch.equal(self.row_group, expected):
            order = torch.argsort(self.row_group, stable=True)
            if not torch.equal(self.row_group[order], expected):
                return None
            q = q.index_select(0, order)
            perm = order if perm is None else perm[order]
        if perm is not None and torch.equal(perm, torch.arange(k, device=perm.device)):
            perm = None
        gs = -1 if groups == 1 else g
        scales = self.scales.t().contiguous()
        zeros = self.zeros.t().to(scales.dtype).contiguous()      # <= 256: exact in both
        if self.bits == 4:
            return pack_int4(q.t(), scales, zeros, gs, perm)
        return Int8WoWeight(q.t().to(torch.uint8).contiguous(), scales, zeros, gs, perm)

    def matmul(self, x: Tensor, bias: Tensor | None = None, x_name: str = "a",
               out_dtype: torch.dtype | None = None) -> Tensor:
        """x [..., K] (fp16 / bf16 / fp32, any strides) @ W (+ bias [N]) -> [..., N] in
        ``out_dtype`` (default x.dtype).

        x in fp16 / bf16 with scales of the same dtype and a canonical layout: the
        minikernels op (``ops.int4_matmul`` / ``ops.int8_matmul``: W dequantized in fp32,
        fp32 accumulation, one rounding; on a GPU the kernels round W to x's dtype first).
        Otherwise (fp32 activations, fp32 or other-dtype scales, uneven groups): W
        dequantized exactly in fp32 and one fp32 matmul, rounded once (plain PyTorch)."""
        k, n = self.shape
        check_tensor(x_name, x, dtypes=FLOAT_DTYPES, min_ndim=1, device=self.q.device)
        if x.shape[-1] != k:
            raise ValueError(f"{x_name} must have last dim K = {k} (the weight's input "
                             f"size), got shape {list(x.shape)}")
        if bias is not None:
            check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
            check_shape("bias", bias, [n])
        out_dtype = out_dtype or x.dtype
        c = self.canonical() if x.dtype == self.scales.dtype and x.dtype in HALF_DTYPES \
            else None
        if c is not None:
            xp = x if c.perm is None else x.index_select(-1, c.perm)
            b = bias if bias is None or bias.dtype in (x.dtype, torch.float32) \
                else bias.float()
            run = ops.int4_matmul if self.bits == 4 else ops.int8_matmul
            y = run(xp, c.qweight, c.scales, c.zeros, c.group_size, b)
            return y if y.dtype == out_dtype else y.to(out_dtype)
        w = (self.q.float() - self.zeros.float()[self.row_group]) \
            * self.scales.float()[self.row_group]
        xf = x.float()
        if self.perm is not None:
            xf = xf.index_select(-1, self.perm)
        y = xf @ w
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)


def decode_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None,
                use_exllama: bool, use_v2_format: bool, bits: int,
                names: tuple[str, str, str, str] = ("b_q_weight", "b_gptq_qzeros",
                                                    "b_gptq_scales", "b_g_idx"),
                ) -> GroupedWeight:
    """Decode GPTQ tensors (layout above) as vLLM's ``gptq_gemm`` reads them.

    use_exllama=False: ``g_idx`` [K] is each row's group (None / empty: row k is in group
    k // (K / groups)). use_exllama=True: the weight went through :func:`gptq_shuffle`
    (4-bit words shuffled to EXLLAMA_ORDER; rows permuted when it had a q_perm), ``g_idx``
    is that permutation (None / empty: none) and stored row k is in group k // (K /
    groups). use_v2_format=False: GPTQ v1, zero = stored zero + 1 (vLLM's kernels and
    AutoGPTQ add 1); True: zero as stored. Errors name ``names`` (the caller's argument
    names for qweight, qzeros, scales, g_idx)."""
    nw, nz, ns, ng = names
    bits = _check_bits("bit", bits)
    per = 32 // bits
    check_tensor(nw, qweight, dtypes=(torch.int32,), ndim=2)
    dev = qweight.device
    check_tensor(nz, qzeros, dtypes=(torch.int32,), ndim=2, device=dev)
    check_tensor(ns, scales, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    k, n = qweight.shape[0] * per, qweight.shape[1]
    groups = qzeros.shape[0]
    if groups == 0:
        raise ValueError(f"{nz} must have at least one group row, got shape "
                         f"{list(qzeros.shape)}")
    check_shape(ns, scales, [groups, n])
    if n % per or qzeros.shape[1] != n // per:
        raise ValueError(f"{nz} must have shape [groups, N * {bits} / 32 = {n / per:g}] "
                         f"(N = {n} output columns, a multiple of {per}), got "
                         f"{list(qzeros.shape)}")
    idx = _optional_index(ng, g_idx, k, dev)
    perm = None
    if use_exllama or idx is None:
        if k % groups:
            raise ValueError(f"K = {k} rows must be a multiple of the {groups} groups of "
                             f"{ns} (each group K / groups rows)")
        row_group = torch.arange(k, device=dev) // (k // groups)
        if use_exllama and idx is not None:
            _check_permutation(ng, idx, k, "with use_exllama=True: the q_perm given to "
                               "gptq_shuffle, argsort(g_idx)")
            perm = idx
    else:
        check_index_range(ng, idx, 0, groups)
        row_group = idx
    q = _unpack_rows(qweight, bits, EXLLAMA_ORDER if use_exllama and bits == 4 else None)
    zeros = _unpack_cols(qzeros, bits) + (0 if use_v2_format else 1)
    return GroupedWeight(q, zeros, scales, row_group, perm, bits)


def decode_awq(qweight: Tensor, scales: Tensor, qzeros: Tensor,
               names: tuple[str, str, str] = ("qweight", "scales", "qzeros")
               ) -> GroupedWeight:
    """Decode AutoAWQ's GEMM tensors (layout above; zero as stored, row k in group
    k // (K / groups)). Errors name ``names`` (qweight, scales, qzeros)."""
    nw, ns, nz = names
    check_tensor(nw, qweight, dtypes=(torch.int32,), ndim=2)
    dev = qweight.device
    check_tensor(nz, qzeros, dtypes=(torch.int32,), ndim=2, device=dev)
    check_tensor(ns, scales, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    check_shape(ns, scales, [None, n])
    if groups == 0 or k % groups:
        raise ValueError(f"{ns} must have K / group_size rows, a divisor of K = {k} (one "
                         f"row per group), got shape {list(scales.shape)}")
    check_shape(nz, qzeros, [groups, n // 8])
    q = unpack_nibbles(qweight, AWQ_ORDER)
    zeros = unpack_nibbles(qzeros, AWQ_ORDER)
    row_group = torch.arange(k, device=dev) // (k // groups)
    return GroupedWeight(q, zeros, scales, row_group, None, 4)


def _gptq_bit_args(use_v2_format: object, bit: object) -> tuple[int, bool]:
    if bit is None:
        if isinstance(use_v2_format, int) and not isinstance(use_v2_format, bool):
            return use_v2_format, False      # vLLM before use_v2_format: (..., use_exllama, bit)
        raise TypeError("gptq_gemm() needs bit (vLLM's signature: a, b_q_weight, "
                        "b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, "
                        "use_v2_format, bit)")
    return _check_int("bit", bit, 1), _check_bool("use_v2_format", use_v2_format)


def gptq_gemm(a: Tensor, b_q_weight: Tensor, b_gptq_qzeros: Tensor, b_gptq_scales: Tensor,
              b_g_idx: Tensor | None, use_exllama: bool, use_v2_format: bool | int = False,
              bit: int | None = None) -> Tensor:
    """vLLM's GPTQ GEMM: a [..., K] @ W -> [..., N] in a's dtype (vLLM: a 2-D fp16
    [M, K] -> [M, N]).

    b_q_weight int32 [K * bit / 32, N]; b_gptq_qzeros int32 [groups, N * bit / 32];
    b_gptq_scales [groups, N]; b_g_idx: with use_exllama=False the group of each of the K
    rows (int32 [K]; empty or None: sequential groups, where vLLM's kernel would read a
    null pointer), with use_exllama=True the permutation given to :func:`gptq_shuffle`
    (or empty), b_q_weight then being the shuffled weight; use_v2_format=False is GPTQ
    v1 (zero = stored + 1); bit 4 or 8 (2 / 3: ValueError naming bit). The older
    7-argument form ``gptq_gemm(..., use_exllama, bit)`` is accepted too.

    Runs ``ops.int4_matmul`` / ``ops.int8_matmul`` on the weight converted to minikernels'
    layout on every call (an unpack and repack of the K x N weight, about the cost of
    reading it a few times; act order adds a gather of a's columns), or an exact fp32
    dequantize + matmul where that layout does not apply (fp32 a or scales, uneven
    g_idx groups): see :meth:`GroupedWeight.matmul`."""
    bit, use_v2_format = _gptq_bit_args(use_v2_format, bit)
    _check_bool("use_exllama", use_exllama)
    w = decode_gptq(b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama,
                    use_v2_format, bit)
    return w.matmul(a, x_name="a")


def gptq_shuffle(q_weight: Tensor, q_perm: Tensor | None, bit: int) -> None:
    """vLLM's ``gptq_shuffle``: rewrite a GPTQ qweight int32 [K * bit / 32, N] in place
    into the layout ``gptq_gemm(..., use_exllama=True, ...)`` reads: rows permuted so that
    stored row k is input row q_perm[k] (exllama's make_sequential; q_perm int32 [K], vLLM
    passes argsort(g_idx); empty / None: no permutation), then for 4 bits the nibbles of
    each word reordered to EXLLAMA_ORDER (vLLM's shuffle_4bit_8; 8-bit words keep their
    order). Any strides (written with ``copy_``); returns None."""
    bits = _check_bits("bit", bit)
    check_tensor("q_weight", q_weight, dtypes=(torch.int32,), ndim=2)
    k = q_weight.shape[0] * (32 // bits)
    perm = _optional_index("q_perm", q_perm, k, q_weight.device)
    q = _unpack_rows(q_weight, bits)
    if perm is not None:
        _check_permutation("q_perm", perm, k, "argsort(g_idx)")
        q = q.index_select(0, perm)
    q_weight.copy_(_pack_rows(q, bits, EXLLAMA_ORDER if bits == 4 else None))


def awq_dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, split_k_iters: int,
                   thx: int, thy: int) -> Tensor:
    """vLLM's ``awq_dequantize``: AutoAWQ GEMM tensors (qweight int32 [K, N / 8], scales
    [groups, N], zeros int32 [groups, N / 8]) -> W [K, N] in scales' dtype,
    (q - zero) * scale computed exactly and rounded once (what vLLM's half2 kernel gives).
    split_k_iters, thx, thy (ints >= 0) only shape vLLM's launch and are unused (vLLM's
    kernel with thx / thy != 0 covers just one thx x thy block: a debugging mode; the
    whole matrix is always returned here). Plain PyTorch."""
    for name, value in (("split_k_iters", split_k_iters), ("thx", thx), ("thy", thy)):
        _check_int(name, value, 0)
    w = decode_awq(qweight, scales, zeros, names=("qweight", "scales", "zeros"))
    return w.dequantize().to(scales.dtype)


def awq_gemm(input: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor,
             split_k_iters: int) -> Tensor:
    """vLLM's ``awq_gemm`` (note the order: scales before qzeros): input [..., K] @ W ->
    [..., N] in input's dtype (vLLM: 2-D; its CUDA kernel fp16, its Triton one also bf16 /
    fp32). qweight int32 [K, N / 8], scales [groups, N], qzeros int32 [groups, N / 8]
    (AutoAWQ's GEMM layout); split_k_iters (int >= 1) is vLLM's reduction split and does
    not change the result beyond rounding order. Converted per call and run like
    :func:`gptq_gemm`."""
    _check_int("split_k_iters", split_k_iters, 1)
    return decode_awq(qweight, scales, qzeros).matmul(input, x_name="input")
