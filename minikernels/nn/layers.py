"""Drop-in nn.Modules over minikernels ops: RMSNorm, LayerNorm, RotaryEmbedding,
PagedAttention (and QuantizedActivation, what an RMSNorm hands a W8A8 linear).

Each module is a thin shell: its parameters/buffers, and one call into ``minikernels.ops``.
They are what :mod:`minikernels.models` builds its decoder from, and can be dropped into
other models that use the same layouts (varlen tokens ``[T, heads, head_dim]``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class QuantizedActivation(NamedTuple):
    """A normed activation already quantized for the W8A8 linear it feeds (what
    :class:`RMSNorm` returns once :meth:`RMSNorm.quantize_for` names that linear).

    q [..., K] int8 or float8_e4m3fn; scales fp32 [..., 1] (one per token) or
    [..., K / group_size] (per token and group); dtype: the activation's own dtype (the
    linear's output dtype). ``shape`` is q's, so code reading x.shape still works.
    """

    q: Tensor
    scales: Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


class RMSNorm(nn.Module):
    """y = x / rms(x) * (weight + weight_offset) over the last dim, optionally fused with a
    residual add. ``weight_offset`` 0 is Llama's RMSNorm, 1 Gemma's (weights stored
    around 0); a new module's scale is 1 either way.

    forward(x) -> y; forward(x, residual) -> (rms_norm(x + residual), x + residual),
    the sum rounded to x.dtype (it is the next residual). x [..., H]; weight [H].
    ``elementwise_affine=False`` (NanoChat): no parameter, scale 1 (the weight is a buffer
    of ones, never read from a checkpoint).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, weight_offset: float = 0.0,
                 elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight_offset = float(weight_offset)
        self.elementwise_affine = bool(elementwise_affine)
        weight = torch.full((hidden_size,), 1.0 - self.weight_offset, dtype=dtype,
                            device=device)
        if self.elementwise_affine:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight, persistent=False)

    def quantize_for(self, consumer: nn.Module | None, quant_dtype: torch.dtype | None = None,
                     group_size: int | None = None) -> None:
        """Hand ``consumer`` (the one module that reads this norm's output: a W8A8 linear)
        the output already quantized: forward then returns a :class:`QuantizedActivation`
        from one ``ops.rms_norm_quant`` launch (int8 per token, or fp8 per token and
        ``group_size`` columns), equal to what the linear's own quantizer would make of
        this norm's output. While the consumer carries LoRA adapters (they read the 16-bit
        input) the plain output is returned. None undoes it. Kept out of the module tree
        (no state_dict entry)."""
        self.__dict__["_quantize_for"] = None if consumer is None else \
            (consumer, quant_dtype, group_size)

    def forward(self, x: Tensor, residual: Tensor | None = None
                ) -> Tensor | QuantizedActivation | tuple[Tensor | QuantizedActivation, Tensor]:
        target = self.__dict__.get("_quantize_for")
        if target is not None and "lora" not in target[0].__dict__:
            out = ops.rms_norm_quant(x, self.weight, self.eps, target[1], residual=residual,
                                     group_size=target[2], weight_offset=self.weight_offset)
            qa = QuantizedActivation(out[0], out[1], x.dtype)
            return qa if residual is None else (qa, out[2])
        return ops.rms_norm(x, self.weight, self.eps, residual=residual,
                            weight_offset=self.weight_offset)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        offset += "" if self.elementwise_affine else ", elementwise_affine=False"
        return f"{self.weight.shape[0]}, eps={self.eps}{offset}"


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dim on ``ops.layer_norm`` (bias optional),
    optionally fused with a residual add.

    forward(x) -> y; forward(x, residual) -> (layer_norm(x + residual), x + residual),
    the sum rounded to x.dtype. x [..., H]; weight, bias [H]. The scale is
    ``weight + weight_offset`` (1: Nemotron's LayerNorm1P, weights stored as scale - 1;
    added in fp32). ``elementwise_affine=False`` (OLMo 1): no parameters, scale 1 and no
    bias (the weight is a buffer of ones, never read from a checkpoint).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, weight_offset: float = 0.0,
                 elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight_offset = float(weight_offset)
        self.elementwise_affine = bool(elementwise_affine)
        ones = torch.ones(hidden_size, dtype=dtype, device=device)
        if self.elementwise_affine:
            self.weight = nn.Parameter(ones - self.weight_offset)
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) \
                if bias else None
        else:
            self.register_buffer("weight", ones, persistent=False)
            self.bias = None

    def forward(self, x: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        weight = self.weight if not self.weight_offset else \
            self.weight.float() + self.weight_offset
        return ops.layer_norm(x, weight, self.bias, self.eps, residual=residual)

    def extra_repr(self) -> str:
        extra = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        extra += "" if self.elementwise_affine else ", elementwise_affine=False"
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}{extra}"


class XIELU(nn.Module):
    """xIELU (Huang et al., Apertus's MLP activation), with its learned parameters:
    x > 0: a_p x^2 + beta x; x <= 0: a_n (expm1(min(x, eps)) - x) + beta x, where
    a_p = softplus(alpha_p) and a_n = beta + softplus(alpha_n). alpha_p, alpha_n [1],
    beta, eps [] are read from the checkpoint (``mlp.act_fn.*``); math in x's dtype."""

    def __init__(self, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.alpha_p = nn.Parameter(torch.zeros(1, **kw), requires_grad=False)
        self.alpha_n = nn.Parameter(torch.zeros(1, **kw), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(0.5, **kw), requires_grad=False)
        self.eps = nn.Parameter(torch.tensor(-1e-6, **kw), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        alpha_p = F.softplus(self.alpha_p.to(x.dtype))
        beta = self.beta.to(x.dtype)
        alpha_n = beta + F.softplus(self.alpha_n.to(x.dtype))
        neg = (torch.expm1(torch.minimum(x, self.eps.to(x.dtype))) - x) * alpha_n
        return torch.where(x > 0, alpha_p * x * x, neg) + beta * x


class RotaryEmbedding(nn.Module):
    """Rotary embedding (neox style, or GPT-J style) with a precomputed fp32 cos/sin cache.

    forward(q [T, Hq, D], k [T, Hkv, D], positions [T]) -> rotated (q, k), contiguous.
    ``rope_scaling`` is a HF config dict (default / linear / llama3). ``is_neox_style``
    as vLLM's: True rotates dims (i, rotary_dim/2 + i) together (Llama/Qwen), False the
    interleaved pairs (2i, 2i + 1) (GPT-J); see :func:`minikernels.ops.rotary_embedding`.
    ``reverse`` rotates by the negated angles (NanoChat's convention).
    """

    def __init__(self, rotary_dim: int, max_position: int, base: float = 10000.0,
                 rope_scaling: Mapping[str, Any] | None = None,
                 device: torch.device | str | None = None, is_neox_style: bool = True,
                 reverse: bool = False) -> None:
        super().__init__()
        if not isinstance(is_neox_style, bool):
            raise TypeError(f"is_neox_style must be a bool, got {type(is_neox_style).__name__}")
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.is_neox_style = is_neox_style
        self.reverse = bool(reverse)
        cache = ops.build_rope_cache(rotary_dim, max_position, base, rope_scaling, device=device)
        if self.reverse:    # NanoChat: rotate by -angle (the sin half negated)
            cache[:, rotary_dim // 2:] = -cache[:, rotary_dim // 2:]
        # Not persistent: rebuilt from the config, never read from a checkpoint.
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return ops.rotary_embedding(q, k, positions, self.cos_sin_cache,
                                    is_neox_style=self.is_neox_style)

    def norm_and_rotate(self, q: Tensor, k: Tensor, positions: Tensor, q_norm: "RMSNorm",
                        k_norm: "RMSNorm") -> tuple[Tensor, Tensor]:
        """``forward(q_norm(q), k_norm(k), positions)`` with per-head norms (weights [D]),
        in one ``ops.qk_norm_rope`` launch (q / k may be strided views, e.g. of a fused
        qkv projection). Norms with different eps or weight offsets run unfused."""
        if q_norm.eps != k_norm.eps or q_norm.weight_offset != k_norm.weight_offset:
            return self(q_norm(q.contiguous()), k_norm(k.contiguous()), positions)
        return ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, positions,
                                self.cos_sin_cache, q_norm.eps, self.is_neox_style,
                                q_norm.weight_offset)

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, max_position={self.max_position}, "
                f"is_neox_style={self.is_neox_style}")


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes, float32 [num_heads] (Press et al.; BLOOM's / MPT's): a
    geometric sequence 2^(-8 i / n) over the largest power of two n <= num_heads, then
    the odd powers of the next power of two's base for the remaining heads."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    n = 2 ** math.floor(math.log2(num_heads))
    # integer powers of an fp32 base (the reference implementations' rounding)
    base = torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float32)
    slopes = base ** torch.arange(1, n + 1, dtype=torch.int32)
    extra = min(n, num_heads - n)
    if extra:
        extra_base = torch.tensor(2.0 ** (-4.0 / n), dtype=torch.float32)
        odd = torch.arange(1, 2 * extra, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, extra_base ** odd])
    return slopes


def mpt_alibi_slopes(num_heads: int, max_bias: float = 8.0) -> Tensor:
    """MPT's ALiBi slopes, float32 [num_heads]: 2^(-i max_bias / m) for i = 1..m over the
    next power of two m >= num_heads; for other head counts the odd-indexed slopes then
    the even-indexed ones, cut to num_heads (equal to :func:`alibi_slopes` at max_bias 8
    up to fp32 rounding; computed as MPT does, so equal to transformers' bit for bit)."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not max_bias > 0:
        raise ValueError(f"max_bias must be > 0, got {max_bias!r}")
    m = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, m + 1, dtype=torch.int64).float() * (max_bias / m)
    slopes = 1.0 / torch.pow(2, base)
    if m != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


class PagedAttention(nn.Module):
    """Attention over a batch laid out by :class:`minikernels.models.AttentionMetadata`.

    forward(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], meta, kv_cache) -> [T, Hq, D].

    - kv_cache None: cache-less varlen causal attention over whole prompts
      (flash_attention on the contiguous k/v, cu_seqlens_k = meta.cu_seqlens_k).
    - kv_cache (k_cache, v_cache) [num_blocks, block_size, Hkv, D]: the new tokens' K/V are
      written first (write_kv_cache with meta.slot_mapping); then the first
      meta.num_decode tokens attend through paged_decode_attention and the prefill chunks
      after them through flash_attention with meta.prefill_block_table (bottom-right
      causal, so a chunk sees its cached prefix).
    - FP8 caches (float8_e4m3fn, float8_e5m2): K/V are stored as fp8(x / scale) with this layer's
      float32 buffers ``k_scale`` / ``v_scale`` [Hkv] (1.0 unless a checkpoint provides
      them; vLLM's convention) and dequantized inside the attention kernels.
    - ``alibi_slopes`` float32 [Hq] (BLOOM): every kernel adds -slope * (query position -
      key position) to the scores (FlashAttention's ALiBi).
    - ``sinks=True`` (Granite SWA, GPT-OSS): a learned float32 parameter ``sinks`` [Hq],
      one more logit in each head's softmax (ops' ``sinks``), read from the checkpoint's
      ``self_attn.sinks``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 softmax_scale: float | None = None, window_left: int = -1,
                 softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                 sinks: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.window_left = int(window_left)
        self.softcap = float(softcap)
        # fp8 KV-cache scales per kv head (stored value * scale ~= K/V); not in state_dict
        # unless a checkpoint carries them (the loader fills them from *.k_scale / *.v_scale)
        # (on the layer's device: the kernels take them, and sinks, beside q)
        self.register_buffer("k_scale", torch.ones(num_kv_heads, dtype=torch.float32,
                                                   device=device), persistent=False)
        self.register_buffer("v_scale", torch.ones(num_kv_heads, dtype=torch.float32,
                                                   device=device), persistent=False)
        if alibi_slopes is not None and list(alibi_slopes.shape) != [num_heads]:
            raise ValueError(f"alibi_slopes must have shape [{num_heads}], got "
                             f"{list(alibi_slopes.shape)}")
        self.alibi_slopes: Tensor | None
        self.register_buffer("alibi_slopes", None if alibi_slopes is None else
                             alibi_slopes.to(device=device or alibi_slopes.device,
                                             dtype=torch.float32), persistent=False)
        device = self.k_scale.device
        self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device),
                                  requires_grad=False) if sinks else None

    def forward(self, q: Tensor, k: Tensor | None, v: Tensor | None, meta: Any,
                kv_cache: tuple[Tensor, Tensor] | None, write: bool = True) -> Tensor:
        """write=False (Gemma 4's K / V-sharing layers): attend over ``kv_cache`` as an
        earlier layer wrote it this step; k / v are not read (may be None)."""
        num_tokens = q.shape[0]
        if kv_cache is None:
            if meta.cu_seqlens_q is None:
                raise ValueError("a cache-less forward needs meta.cu_seqlens_q/cu_seqlens_k")
            cu_k = meta.cu_seqlens_k if meta.cu_seqlens_k is not None else meta.cu_seqlens_q
            return ops.flash_attention(
                q, k, v, meta.cu_seqlens_q, cu_k, meta.max_seqlen_q,
                max(meta.max_seqlen_k, meta.max_seqlen_q), causal=True,
                softmax_scale=self.softmax_scale, window_left=self.window_left,
                softcap=self.softcap, alibi_slopes=self.alibi_slopes, sinks=self.sinks)

        k_cache, v_cache = kv_cache
        if meta.slot_mapping is None:
            raise ValueError("a forward with kv_caches needs meta.slot_mapping")
        scales = {}
        if k_cache.dtype in ops.attention.FP8_KV_DTYPES:
            scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if write:
            ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, **scales)
        nd = int(meta.num_decode)
        if nd == num_tokens:  # decode-only step: no copy into a shared output
            return ops.paged_decode_attention(
                q, k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens,
                softmax_scale=self.softmax_scale, window_left=self.window_left,
                softcap=self.softcap, alibi_slopes=self.alibi_slopes, sinks=self.sinks, **scales)
        if meta.cu_seqlens_q is None or meta.prefill_block_table is None:
            raise ValueError("prefill tokens need meta.cu_seqlens_q, cu_seqlens_k and "
                             "prefill_block_table")
        prefill = ops.flash_attention(
            q[nd:], k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
            meta.max_seqlen_k, causal=True, softmax_scale=self.softmax_scale,
            window_left=self.window_left, softcap=self.softcap,
            block_table=meta.prefill_block_table, alibi_slopes=self.alibi_slopes, sinks=self.sinks, **scales)
        if nd == 0:
            return prefill
        decode = ops.paged_decode_attention(
            q[:nd], k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens,
            softmax_scale=self.softmax_scale, window_left=self.window_left,
            softcap=self.softcap, alibi_slopes=self.alibi_slopes, sinks=self.sinks, **scales)
        return torch.cat([decode, prefill], dim=0)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window_left={self.window_left}")
