"""The spec: every minikernels op in plain PyTorch with fp32 math.

Kernels are tested against these functions, and they are the CPU path (backend
``reference``). Each returns a fresh tensor in the input's dtype (except where stated)
and never mutates its inputs, except ``write_kv_cache`` which writes the caches and
``causal_conv1d`` which updates its conv_state pool.

Layouts (FlashAttention / vLLM conventions):
    varlen tokens      [total_tokens, heads, head_dim], int32 cu_seqlens [batch + 1]
    paged KV cache     [num_blocks, block_size, kv_heads, head_dim], any strides (last dim
                       contiguous), block_size 1..256; fp16/bf16/fp32, or float8_e4m3fn
                       with float32 scales k_scale / v_scale of numel 1 (per tensor) or
                       kv_heads (per head): stored * scale ~= original (vLLM's convention);
                       writing quantizes with saturation: fp8(clamp(x / scale, +-448))
    block_table        int32 [batch, max_blocks_per_seq]
    slot_mapping       slot = block * block_size + offset; -1 = skip
    int4 weight        qweight int32 [N, K // 8]: nibble j (bits 4j..4j+3) of word w holds
                       column k = 8 * w + j of W [N, K] as an unsigned 0..15 integer;
                       scales, zeros [N, K // G] fp16/bf16 (zeros hold integer zero-points);
                       W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G].
                       group_size = -1 means one group per row (G = K).
    int8 weight        qweight uint8 [N, K] (row-major, nn.Linear layout): the stored value q
                       in 0..255 of W[n, k]; scales, zeros [N, K // G] fp16/bf16 (zeros are
                       real-valued zero-points, 128 for symmetric int8 checkpoints);
                       W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G].
                       G a positive multiple of 16 dividing K, or -1 (one group per row).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# --------------------------------------------------------------------------- norms


def rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float = 0.0) -> Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * (weight + weight_offset), over the last dim.

    x [..., H], weight [H]; fp32 math, rounded to x.dtype once at the end.
    weight_offset 0 is Llama's RMSNorm; 1 is Gemma's ``(1 + weight)`` (FlashInfer's
    ``gemma_rmsnorm``, vLLM's ``GemmaRMSNorm``)."""
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv * (weight.float() + weight_offset)).to(x.dtype)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor,
                       eps: float, weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """h = x + residual (rounded to x.dtype); returns (rms_norm(h), h)."""
    h = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(h, weight, eps, weight_offset), h


def rms_norm_quant(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float,
                   weight_offset: float, quant_dtype: torch.dtype, scale: Tensor | None,
                   group_size: int, scale_ub: Tensor | None, min_scale: float,
                   vllm_rounding: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """RMSNorm (optionally after a residual add) fused with int8 / fp8 quantization.

    x [T, H] fp16/bf16/fp32; weight [H]; residual like x or None. fp32 math:
        h = x + residual, rounded to x.dtype (the new residual, returned)
        y = rms_norm(h): h * rsqrt(mean(h^2) + eps) * (weight + weight_offset), rounded
            to x.dtype once (bit for bit :func:`rms_norm`'s output)
        vllm_rounding (vLLM's fused-quant CUDA kernels): y = round(round_x(h * rsqrt) *
            (weight + weight_offset)), the product rounded to promote(x.dtype,
            weight.dtype); with a dynamic scale the norm reads the unrounded fp32 sum
            x + residual (vLLM's rms_norm_dynamic_per_token_quant), with a static one the
            rounded h (vLLM's fused_add_rms_norm_static_fp8_quant).
    Quantization of y (qmax 127 for int8, 448 for float8_e4m3fn):
        static (scale: fp32, one element): fp8 q = fp8(clamp(y * (1 / scale))); int8
            q = clamp(round(y / scale), -128, 127) (round half to even); no scales
            returned (an empty tensor).
        dynamic (group_size 0: one scale per row; else per row and group of group_size
            consecutive columns): a = max |y| over the group (min(a, scale_ub) when
            given); s = max(a / qmax, min_scale); q = fp8(clamp(y / s, +-448)) or
            clamp(round(y / s), -128, 127). Scales [T, H / group_size] (or [T, 1]) fp32.
    A zero scale quantizes to 0. Divisions are IEEE. Returns (q [T, H] quant_dtype,
    scales, h or None).
    """
    t, n = x.shape
    xf = x.float()
    h = None
    if residual is not None:
        total = xf + residual.float()
        h = total.to(x.dtype)
        xf = total if vllm_rounding and scale is None else h.float()
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) if n else xf.new_zeros(t, 1)
    w = weight.float() + weight_offset
    if vllm_rounding:
        y = (xf * inv).to(x.dtype).float() * w
        y = y.to(torch.promote_types(x.dtype, weight.dtype)).float()
    else:
        y = (xf * inv * w).to(x.dtype).float()
    q, s = quantize_rows(y, quant_dtype, scale, group_size, scale_ub, min_scale)
    return q, s, h


def quantize_rows(y: Tensor, quant_dtype: torch.dtype, scale: Tensor | None,
                  group_size: int, scale_ub: Tensor | None, min_scale: float
                  ) -> tuple[Tensor, Tensor]:
    """The quantization of the fused ops (:func:`rms_norm_quant`, :func:`act_and_mul_quant`):
    y [T, n] fp32 -> (q [T, n] int8 / float8_e4m3fn, scales). Static (scale, one fp32
    element): fp8 q = fp8(clamp(y * (1 / scale))), int8 q = clamp(round(y / scale)), scales
    empty. Dynamic: per row (group_size 0) or per row and group_size columns,
    a = max |y| (min(a, scale_ub)), s = max(a / qmax, min_scale), q = y / s saturated
    (int8: rounded half to even); scales [T, groups]. A zero scale quantizes to 0."""
    t, n = y.shape
    int8 = quant_dtype == torch.int8
    qmax = 127.0 if int8 else FP8_E4M3_MAX

    def quantize(v: Tensor) -> Tensor:
        if int8:
            return torch.round(v).clamp(-128, 127).to(torch.int8)
        return v.clamp(-qmax, qmax).to(torch.float8_e4m3fn)

    if scale is not None:
        s = scale.float().reshape(1, 1)
        if int8:
            v = _int8_div(y, s)
        else:
            v = y * torch.where(s == 0, torch.zeros_like(s), 1.0 / torch.where(s == 0, 1.0, s))
        return quantize(v), y.new_empty(0)
    g = group_size or n
    groups = n // g if g else 1
    yg = y.reshape(t, groups, g if g else 0)
    amax = yg.abs().amax(dim=-1) if g else y.new_zeros(t, groups)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.float().reshape(()))
    s = (amax / qmax).clamp_min(min_scale)
    return quantize(_int8_div(yg, s[..., None])).reshape(t, n), s


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last dim (biased
    variance, as ``nn.LayerNorm``). x [..., H], weight / bias [H] (bias may be None);
    fp32 math, rounded to x.dtype once at the end."""
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    d = xf - mean
    inv = torch.rsqrt(d.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = d * inv * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fused_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None,
                         eps: float) -> tuple[Tensor, Tensor]:
    """h = x + residual (rounded to x.dtype); returns (layer_norm(h), h)."""
    h = (x.float() + residual.float()).to(x.dtype)
    return layer_norm(h, weight, bias, eps), h


# ----------------------------------------------------------------------- activations


def silu_and_mul(x: Tensor) -> Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  ([..., I])."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def gelu_and_mul(x: Tensor, approximate: str = "none") -> Tensor:
    """x [..., 2I] -> gelu(x[..., :I]) * x[..., I:]  ([..., I]), GeGLU. approximate "none":
    gelu(g) = g * Phi(g) (erf); "tanh": 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""
    d = x.shape[-1] // 2
    xf = x.float()
    gate = torch.nn.functional.gelu(xf[..., :d], approximate=approximate)
    return (gate * xf[..., d:]).to(x.dtype)


def fatrelu_and_mul(x: Tensor, threshold: float) -> Tensor:
    """x [..., 2I] -> fatrelu(x[..., :I]) * x[..., I:]  ([..., I]), fatrelu(g) = g where
    g > threshold, else 0 (ProSparse / MiniCPM-S; vLLM's ``fatrelu_and_mul``)."""
    d = x.shape[-1] // 2
    xf = x.float()
    gate = xf[..., :d]
    return (torch.where(gate > threshold, gate, 0.0) * xf[..., d:]).to(x.dtype)


def swigluoai_and_mul(x: Tensor, alpha: float, limit: float) -> Tensor:
    """x [..., 2I] with gate and up INTERLEAVED (gate = x[..., 0::2], up = x[..., 1::2]:
    GPT-OSS's layout, vLLM's ``swigluoai_and_mul``) -> moe_swigluoai(gate, up) [..., I]."""
    xf = x.float()
    return moe_swigluoai(xf[..., 0::2], xf[..., 1::2], alpha, limit).to(x.dtype)


def act_and_mul_quant(x: Tensor, activation: str, quant_dtype: torch.dtype,
                      scale: Tensor | None, group_size: int, scale_ub: Tensor | None,
                      min_scale: float, round_to_input: bool = True
                      ) -> tuple[Tensor, Tensor]:
    """A gated activation fused with int8 / fp8 quantization of its output.

    x [T, 2I] (gate, then up) fp16/bf16/fp32; activation "silu" / "gelu" / "gelu_tanh".
    y = act(gate) * up in fp32, rounded to x.dtype when round_to_input (then exactly
    :func:`silu_and_mul` / :func:`gelu_and_mul`'s output: what the unfused pair quantizes),
    else quantized from fp32 (vLLM's silu_and_mul_per_block_quant). Quantization:
    :func:`quantize_rows`. Returns (q [T, I], scales [T, I / group_size] / [T, 1], or
    empty when static).
    """
    if activation == "silu":
        y = silu_and_mul(x) if round_to_input else \
            torch.nn.functional.silu(x.float()[..., :x.shape[-1] // 2]) * \
            x.float()[..., x.shape[-1] // 2:]
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        d = x.shape[-1] // 2
        y = gelu_and_mul(x, approximate) if round_to_input else \
            torch.nn.functional.gelu(x.float()[..., :d], approximate=approximate) * \
            x.float()[..., d:]
    return quantize_rows(y.float(), quant_dtype, scale, group_size, scale_ub, min_scale)


#: the pointwise GELU variants (vLLM's ``gelu_fast`` / ``gelu_new`` / ``gelu_quick``)
GELU_VARIANTS = ("gelu_fast", "gelu_new", "gelu_quick")


def gelu_variant(x: Tensor, kind: str) -> Tensor:
    """Elementwise, fp32 math, out in x.dtype. "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi)
    (x + 0.044715 x^3))) (GPT-2's); "gelu_fast": the same function written
    0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))); "gelu_quick": x sigmoid(1.702 x)
    (CLIP's)."""
    xf = x.float()
    if kind == "gelu_quick":
        y = xf * torch.sigmoid(1.702 * xf)
    elif kind == "gelu_fast":
        y = 0.5 * xf * (1.0 + torch.tanh(0.7978845608 * xf * (1.0 + 0.044715 * xf * xf)))
    else:
        y = 0.5 * xf * (1.0 + torch.tanh(0.7978845608028654 * (xf + 0.044715 * xf ** 3)))
    return y.to(x.dtype)


# ---------------------------------------------------------------------------- rotary


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                     is_neox_style: bool = True) -> tuple[Tensor, Tensor]:
    """Rotary embedding on the first ``rot_dim`` dims of each head (neox or GPT-J style).

    q [..., Hq, D], k [..., Hkv, D], positions [...] (int32/int64, same leading shape),
    cos_sin_cache [max_position, rot_dim] (first half cos, second half sin), rot_dim <= D, even.
    With half = rot_dim / 2 and (cos_i, sin_i) = cache[pos, i], cache[pos, half + i] for
    i in [0, half), each pair (x1_i, x2_i) of the head rotates as
        out1_i = x1_i * cos_i - x2_i * sin_i;  out2_i = x2_i * cos_i + x1_i * sin_i
    where the pairs are, as vLLM's ``is_neox_style`` / FlashInfer's ``interleave=False/True``:
        neox (True):    x1_i = head[i],      x2_i = head[half + i]   (two halves)
        GPT-J (False):  x1_i = head[2 * i],  x2_i = head[2 * i + 1]  (interleaved)
    head[rot_dim:] is unchanged. Math in fp32; outputs have q's and k's dtypes.
    """
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cs = cos_sin_cache.float()[positions.long()]          # [..., rot]
    cos = cs[..., :half].unsqueeze(-2)                     # [..., 1, half]
    sin = cs[..., half:].unsqueeze(-2)
    if is_neox_style:                                      # pairs (i, half + i)
        first, second = slice(0, half), slice(half, rot)
    else:                                                  # GPT-J: pairs (2i, 2i + 1)
        first, second = slice(0, rot, 2), slice(1, rot, 2)

    def apply(t: Tensor) -> Tensor:
        tf = t.float()
        x1, x2 = tf[..., first], tf[..., second]
        out = tf.clone()
        out[..., first] = x1 * cos - x2 * sin
        out[..., second] = x2 * cos + x1 * sin
        return out.to(t.dtype)

    return apply(q), apply(k)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                 positions: Tensor, cos_sin_cache: Tensor, eps: float,
                 is_neox_style: bool = True, weight_offset: float = 0.0,
                 vllm_rounding: bool = False) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q and k, then rotary embedding (Qwen3's / Gemma 3's attention).

    q [..., Hq, D], k [..., Hkv, D] (same dtype), q_weight / k_weight [D] (None: no
    weight, the offset unused),
    positions and cos_sin_cache as :func:`rotary_embedding`. Exactly
    ``rotary_embedding(rms_norm(q, q_weight), rms_norm(k, k_weight))``: each head's
    normalized value x * rsqrt(mean(x^2) + eps) * (weight + weight_offset) is rounded to
    q's dtype, then rotated in fp32 and rounded once more. ``vllm_rounding`` (vLLM's
    fused_qk_norm_rope kernel): the normalized value stays in fp32 through the rotation,
    one rounding at the end.
    """
    def norm(x: Tensor, w: Tensor | None) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        if w is not None:
            y = y * (w.float() + weight_offset)
        return y if vllm_rounding else y.to(x.dtype)

    qo, ko = rotary_embedding(norm(q, q_weight), norm(k, k_weight), positions,
                              cos_sin_cache, is_neox_style)
    return qo.to(q.dtype), ko.to(k.dtype)


# ------------------------------------------------------------------------------ int4


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Unpack the canonical int4 layout (module docstring) to W [N, K] in fp32."""
    n, kw = qweight.shape
    k = kw * 8
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(-1) >> shifts) & 0xF                # [N, K/8, 8]
    q = q.reshape(n, k).float()
    g = k if group_size == -1 else group_size
    s = scales.float().repeat_interleave(g, dim=1)[:, :k]
    z = zeros.float().repeat_interleave(g, dim=1)[:, :k]
    return (q - z) * s


def int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias): x [..., K] fp16/bf16 -> [..., N] in x.dtype, fp32 accumulation."""
    w = dequantize_int4(qweight, scales, zeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------ int8


def dequantize_int8(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """The canonical int8 layout (module docstring) to W [N, K] in fp32:
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], G = K when group_size = -1."""
    k = qweight.shape[1]
    g = k if group_size == -1 else group_size
    s = scales.float().repeat_interleave(g, dim=1)[:, :k]
    z = zeros.float().repeat_interleave(g, dim=1)[:, :k]
    return (qweight.float() - z) * s


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias), W = dequantize_int8(...) (W8A16): x [..., K] fp16/bf16 ->
    [..., N] in x.dtype; fp32 math, rounded once."""
    w = dequantize_int8(qweight, scales, zeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rtn_groups(wg: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest quantization of weight groups ``wg`` [N, groups, G] (fp32) to
    ``bits``-bit unsigned integers (the int4 and int8 weight-only formats' RTN):

        symmetric:  scale = max |w| / (2^(bits-1) - 1), zero = 2^(bits-1)
        asymmetric: scale = (max - min) / (2^bits - 1) over the group's range widened to
                    include 0, zero = round(-min / scale)
        q = clamp(round(w / scale) + zero, 0, 2^bits - 1)

    (scales stored in ``scale_dtype``, at least its smallest normal; q uses the stored
    scale). Returns (q [N, groups, G] fp32 integers, scale [N, groups], zero [N, groups]
    in scale_dtype)."""
    top = (1 << bits) - 1
    half = 1 << (bits - 1)
    tiny = torch.finfo(scale_dtype).tiny
    if symmetric:
        scale = (wg.abs().amax(-1) / (half - 1)).clamp_min(tiny).to(scale_dtype)
        zero = torch.full_like(scale, float(half), dtype=torch.float32)
    else:
        lo = wg.amin(-1).clamp_max(0)
        hi = wg.amax(-1).clamp_min(0)
        scale = ((hi - lo) / top).clamp_min(tiny).to(scale_dtype)
        zero = torch.round(-lo / scale.float()).clamp(0, top)
    q = (torch.round(wg / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, top)
    return q, scale.contiguous(), zero.to(scale_dtype).contiguous()


def quantize_int8_grouped(w: Tensor, group_size: int = 128, symmetric: bool = False,
                          scale_dtype: torch.dtype | None = None
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest group-wise int8 quantization of w [N, K], the inverse of
    :func:`dequantize_int8` (quant.quantize_int4's recipe with 255 levels).

    Asymmetric: per group, scale = (max - min) / 255 over the group's range widened to
    include 0, zero = round(-min / scale) in 0..255. Symmetric: scale = absmax / 127,
    zero = 128 (q - 128 in -127..127; GPTQ 8-bit / compressed-tensors int8's convention).
    q = clamp(round(w / scale) + zero, 0, 255) using the scale as stored (rounded to
    ``scale_dtype``: fp16 / bf16, default w's dtype when it is one of them, else fp16).
    group_size: a positive multiple of 16 dividing K, or -1 (one group per row).
    Returns (qweight uint8 [N, K], scales [N, K/G], zeros [N, K/G]) in scale_dtype.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor [N, K], got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    if group_size != -1 and (group_size <= 0 or group_size % 16 or k % group_size):
        raise ValueError(f"group_size must be -1 or a positive multiple of 16 dividing K "
                         f"({k}), got {group_size}")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
    g = k if group_size == -1 else group_size
    groups = k // g if g else 1
    if k == 0:
        ones = torch.ones(n, groups, dtype=scale_dtype, device=w.device)
        return torch.empty(n, 0, dtype=torch.uint8, device=w.device), ones, ones * 128
    q, scale, zero = rtn_groups(w.float().reshape(n, groups, g), 8, symmetric, scale_dtype)
    return q.reshape(n, k).to(torch.uint8), scale, zero


# ------------------------------------------------------- block-wise FP8 W8A8 (vLLM's)


def per_token_group_quant_fp8(x: Tensor, group_size: int, eps: float = 1e-10,
                              use_ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Dynamic FP8 quantization of each row's groups of ``group_size`` consecutive elements.

    x [..., K] fp16/bf16/fp32, K % group_size == 0 -> (x_q [..., K] float8_e4m3fn,
    x_s [..., K // group_size] fp32, row-major), all in fp32 math:
        absmax = max(max_g |x|, eps)  (eps in fp32);  x_s = absmax / 448
        (use_ue8m0: x_s rounded up to a power of two, DeepGEMM's UE8M0 scales)
        x_q = fp8(clamp(x / x_s, -448, 448))  (a true division, round to nearest even)
    so x_q * x_s ~= x. vLLM's ``native_per_token_group_quant_fp8`` does the same except
    that it clamps absmax by eps in x's dtype (only groups with max |x| < eps differ).
    """
    k = x.shape[-1]
    xf = x.float().reshape(*x.shape[:-1], k // group_size, group_size)
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    scale = absmax / FP8_E4M3_MAX
    if use_ue8m0:   # 2^ceil(log2(s)) on the exponent bits (exact; s is a normal float)
        bits = scale.view(torch.int32)
        up = ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = (((bits >> 23) + up) << 23).view(torch.float32)
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.squeeze(-1)


def w8a8_block_fp8_matmul(A: Tensor, B: Tensor, As: Tensor, Bs: Tensor,
                          block_size: list[int], output_dtype: torch.dtype = torch.float16
                          ) -> Tensor:
    """C = A @ B.T with block-wise scales (DeepSeek-V3 / vLLM's block FP8 W8A8 linear).

    A [..., K] float8_e4m3fn (activations); As [..., ceil(K / bk)] fp32: one scale per
    token and group of bk columns (``per_token_group_quant_fp8(x, bk)``);
    B [N, K] float8_e4m3fn (weight, nn.Linear layout); Bs [ceil(N / bn), ceil(K / bk)]
    fp32: one scale per bn x bk weight block; block_size = [bn, bk]. Any strides.
        C[m, n] = sum_j (sum_{k in block j} A[m, k] B[n, k]) * (As[m, j] * Bs[n // bn, j])
    in fp32 (each block's partial sum scaled, then added), cast to output_dtype once.
    Returns [..., N]. Loops over K blocks, so memory stays O(M N).
    """
    bn, bk = block_size
    k = A.shape[-1]
    n = B.shape[0]
    a = A.reshape(-1, k).float()
    a_s = As.reshape(-1, As.shape[-1]).float()
    b = B.float()
    c = torch.zeros(a.shape[0], n, dtype=torch.float32, device=A.device)
    for j in range(-(-k // bk)):
        cols = slice(j * bk, min(k, (j + 1) * bk))
        b_s = Bs[:, j].float().repeat_interleave(bn)[:n]                 # per column n
        c += (a[:, cols] @ b[:, cols].t()) * (a_s[:, j:j + 1] * b_s[None, :])
    return c.to(output_dtype).reshape(*A.shape[:-1], n)


# ------------------------------------------------- INT8 W8A8 (vLLM's SmoothQuant-style)
# The compressed-tensors "int-quantized" W8A8 scheme: int8 activations with one fp32 scale
# per token (dynamic) or per tensor (static), optionally asymmetric with an int32 zero
# point (azp); int8 weight [N, K] with one fp32 scale per output channel or per tensor,
# passed to the GEMM transposed (b = weight.t(), [K, N], column-major), like vLLM's
# cutlass_scaled_mm. x / scale is a true (IEEE, correctly rounded) fp32 division, round()
# is round-half-to-even (torch.round), so every kernel reproduces these bit for bit.

INT8_AZP_MAX = 2147483520.0        # largest fp32 below 2^31: azp saturates to [-2^31, this]


def _int8_div(x: Tensor, s: Tensor) -> Tensor:
    """x / s in fp32, 0 where s == 0 (an all-zero row's scale: no NaN / inf)."""
    return torch.where(s == 0, torch.zeros_like(x), x / torch.where(s == 0, 1.0, s))


def scaled_int8_quant(x: Tensor, scale: Tensor | None = None, azp: Tensor | None = None,
                      symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """int8 quantization of activations (vLLM's ``scaled_int8_quant``).

    x [..., K] fp16/bf16/fp32; M = x.numel() // K rows. fp32 math throughout; round() is
    round-half-to-even, x / s an IEEE division; a zero scale divides to 0.
    Dynamic (scale None): one scale per row, returned as [M, 1] fp32.
        symmetric:  s = max|x| / 127;  x_q = clamp(round(x / s), -128, 127);  azp None.
                    An all-zero row gets s = 0 and x_q = 0.
        asymmetric: lo, hi = min(x), max(x); if lo == hi (a constant row c) the range is
                    widened to include 0: lo = min(c, 0), hi = max(c, 0);
                    s = (hi - lo) / 255;  azp = round(-128 - lo / s)  (int32 [M, 1],
                    saturated to the int32 range);
                    x_q = clamp(round(x / s) + azp, -128, 127)   (the + in fp32, like
                    vLLM's test). So lo -> -128 and hi -> 127; a constant row c != 0 gets
                    x_q = 127 (c > 0, azp -128) or -128 (c < 0, azp 127), s = |c| / 255,
                    and s * (x_q - azp) = c up to fp32 rounding; an all-zero row gets
                    s = 0, azp = -128, x_q = -128 (s * (x_q - azp) = 0 exactly).
    Static (scale: fp32, numel 1; azp: int32 numel 1, given iff not symmetric):
        x_q = clamp(round(x / scale) (+ azp), -128, 127); returns (x_q, scale, azp) as given.
    Returns x_q int8 with x's shape (contiguous), the scales, azp (or None).
    """
    k = x.shape[-1]
    m = x.numel() // k if k else math.prod(x.shape[:-1])
    xf = x.float().reshape(m, k)
    if scale is not None:
        s = scale.float().reshape(1, 1)
        q = torch.round(_int8_div(xf, s))
        if azp is not None:
            q = q + azp.reshape(1, 1).float()
        return q.clamp(-128, 127).to(torch.int8).reshape(x.shape), scale, azp
    if symmetric:
        amax = xf.abs().amax(-1, keepdim=True) if k else xf.new_zeros(m, 1)
        s = amax / 127.0
        q = torch.round(_int8_div(xf, s)).clamp(-128, 127)
        return q.to(torch.int8).reshape(x.shape), s, None
    hi = xf.amax(-1, keepdim=True) if k else xf.new_zeros(m, 1)
    lo = xf.amin(-1, keepdim=True) if k else xf.new_zeros(m, 1)
    same = lo == hi
    lo = torch.where(same, lo.clamp(max=0.0), lo)
    hi = torch.where(same, hi.clamp(min=0.0), hi)
    s = (hi - lo) / 255.0
    azp_f = torch.round(-128.0 - _int8_div(lo, s)).clamp(-2.0**31, INT8_AZP_MAX)
    q = (torch.round(_int8_div(xf, s)) + azp_f).clamp(-128, 127)
    return q.to(torch.int8).reshape(x.shape), s, azp_f.to(torch.int32)


def scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor,
              out_dtype: torch.dtype, bias: Tensor | None = None,
              azp_adj: Tensor | None = None, azp: Tensor | None = None) -> Tensor:
    """out = (a @ b) scaled per token / channel (vLLM's ``cutlass_scaled_mm``).

    a [..., K] int8 (or float8_e4m3fn); b [K, N] the same dtype (usually weight.t() of a
    contiguous weight [N, K]); scale_a fp32, numel 1 (per tensor) or M (per token, e.g.
    [M, 1]); scale_b fp32, numel 1 or N (per output channel, e.g. [1, N] / [N, 1]);
    bias [N] in out_dtype or None. Any strides. In this order, in fp32:
        acc[m, n] = sum_k a[m, k] * b[k, n]     (int8: the exact integer, as the int32
                                                 tensor-core accumulator holds it;
                                                 fp8: fp32 accumulation in the kernels)
        acc[m, n] -= azp[m] * azp_adj[n]        (asymmetric int8 activations, vLLM's
                                                 cutlass_scaled_mm_azp: azp_adj int32 [N],
                                                 the column sums of b, times a per-tensor
                                                 zero point when azp is None; azp int32
                                                 [M] per token)
        out[m, n] = scale_a[m] * (scale_b[n] * float32(acc[m, n])) (+ float32(bias[n]))
    then one cast to out_dtype. Returns [..., N]. Here acc is computed in fp64 (exact for
    int8 while |acc| < 2^53; int8 kernels are exact while K <= 131072, int32's range).
    """
    k = a.shape[-1]
    n = b.shape[1]
    acc = a.reshape(math.prod(a.shape[:-1]), k).double() @ b.double()
    if azp_adj is not None:
        adj = azp_adj.double().reshape(1, n)
        acc = acc - (adj if azp is None else azp.double().reshape(-1, 1) * adj)
    acc = acc.float()
    sa = scale_a.float().reshape(-1, 1)
    sb = scale_b.float().reshape(1, -1)
    out = sa * (sb * acc)
    if bias is not None:
        out = out + bias.float().reshape(1, n)
    return out.to(out_dtype).reshape(*a.shape[:-1], n)


# ------------------------------------------------------------------- fp8 weights (W8A16)
# fp8 weight: weight float8_e4m3fn [N, K], weight_scale float32 [ceil(N / bn), ceil(K / bk)]
# for block_size (bn, bk); W[n, k] = float(weight[n, k]) * weight_scale[n // bn, k // bk].
# (DeepSeek-V3 / Qwen3-FP8 checkpoints: (128, 128), the scale named weight_scale_inv.)
# Per tensor: block (N, K), scale [1, 1]; per channel: block (1, K), scale [N, 1].
# The NaN bytes 0x7F / 0xFF are not valid weights (a saturating quantizer never writes them).

FP8_SCALE_EPS = 1e-12               # floor of a block's amax (an all-zero block gets q = 0)


def _fp8_block_index(size: int, block: int, device: torch.device) -> Tensor:
    return torch.div(torch.arange(size, device=device), block, rounding_mode="floor")


def dequantize_fp8(weight: Tensor, weight_scale: Tensor, block_size: tuple[int, int]) -> Tensor:
    """fp8 weight [N, K] (float8_e4m3fn) with block scales -> W [N, K] fp32 (layout above)."""
    n, k = weight.shape
    bn, bk = block_size
    rows = _fp8_block_index(n, bn, weight.device)
    cols = _fp8_block_index(k, bk, weight.device)
    s = weight_scale.float()[rows][:, cols]                   # [N, K]
    return weight.float() * s


def fp8_matmul(x: Tensor, weight: Tensor, weight_scale: Tensor, block_size: tuple[int, int],
               bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias): x [..., K] fp16/bf16/fp32 -> [..., N] in x.dtype, fp32 math,
    rounded once; W = dequantize_fp8(weight, weight_scale, block_size)."""
    w = dequantize_fp8(weight, weight_scale, block_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_fp8(w: Tensor, block_size: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """Block-wise fp8 (e4m3) quantization of a weight, the inverse of :func:`dequantize_fp8`.

    w: [N, K] float (any float dtype; the math is fp32), finite. block_size (bn, bk)
    positive ints; a block larger than the matrix is the whole matrix ((N, K): per tensor,
    (1, K): per channel). Returns (weight, weight_scale):
        weight        float8_e4m3fn [N, K] (contiguous)
        weight_scale  float32 [ceil(N / bn), ceil(K / bk)], the multiplier (a checkpoint's
                      weight_scale_inv): scale = max(amax(|block|), 1e-12) / 448
    q = clamp(w / scale, -448, 448) rounded to nearest even (saturating: never NaN).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    bn, bk = (int(b) for b in block_size)
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block_size must be two positive ints, got {tuple(block_size)}")
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    wf = w.float()
    if n == 0 or k == 0:
        return (torch.empty((n, k), dtype=torch.float8_e4m3fn, device=w.device),
                torch.ones((nb, kb), dtype=torch.float32, device=w.device))
    # a block past the matrix edge partitions rows / columns like one of the matrix's size
    bn, bk = min(bn, n), min(bk, k)
    padded = torch.nn.functional.pad(wf.abs(), (0, kb * bk - k, 0, nb * bn - n))
    amax = padded.view(nb, bn, kb, bk).amax(dim=(1, 3))
    scale = amax.clamp(min=FP8_SCALE_EPS) / FP8_E4M3_MAX     # (448, defined below)
    s = scale[_fp8_block_index(n, bn, w.device)][:, _fp8_block_index(k, bk, w.device)]
    q = (wf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


# ------------------------------------------------------------------------- attention


def attention_scores(q: Tensor, k: Tensor, scale: float, causal: bool, window_left: int,
                     softcap: float, window_right: int = -1,
                     alibi_slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One sequence's masked scores: q [Lq, Hq, D], k [Lk, Hkv, D] ->
    (s [Hq, Lq, Lk] fp32 with -inf where hidden, visible bool [Lq, Lk]).

    Query i sits at absolute position p = i + Lk - Lq (bottom-right alignment; with Lq > Lk
    the first Lq - Lk queries sit before every key). It sees key j when j <= p (causal),
    j >= p - window_left (window_left >= 0) and j <= p + window_right (window_right >= 0;
    causal is window_right = 0 and takes precedence, as in FlashAttention).
    Scores are q.k * scale, then softcap * tanh(s / softcap) when softcap > 0, then
    ALiBi (alibi_slopes fp32 [Hq]): -slope[h] * |p - j| (FlashAttention's bias).
    """
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qf = q.float().transpose(0, 1)                                   # [Hq, Lq, D]
    kf = k.float().transpose(0, 1).repeat_interleave(group, dim=0)   # [Hq, Lk, D]
    s = (qf @ kf.transpose(1, 2)) * scale                            # [Hq, Lq, Lk]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
    kpos = torch.arange(lk, device=q.device).unsqueeze(0)
    if alibi_slopes is not None:
        s = s - alibi_slopes.float().view(hq, 1, 1) * (qpos - kpos).abs()
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= kpos <= qpos
    elif window_right >= 0:
        visible &= kpos <= qpos + window_right
    if window_left >= 0:
        visible &= kpos >= qpos - window_left
    return s.masked_fill(~visible, float("-inf")), visible


def attention_probs(s: Tensor, visible: Tensor, sinks: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Softmax of masked scores from :func:`attention_scores` -> (p [Hq, Lq, Lk] fp32,
    lse [Hq, Lq]); a row that sees no key gets p = 0 and lse -inf. ``sinks`` fp32 [Hq]:
    each head's softmax also has that logit (an attention sink: it takes probability mass
    but contributes no value); the lse then includes it."""
    lse = torch.logsumexp(s, dim=-1)                                 # [Hq, Lq]
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(-1, 1))
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(-1e30))
    p = torch.where(visible, p, torch.zeros((), device=s.device))
    return torch.nan_to_num(p, nan=0.0), lse


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
            softcap: float, window_right: int = -1,
            alibi_slopes: Tensor | None = None,
            sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One sequence. q [Lq, Hq, D], k/v [Lk, Hkv, D] -> (out [Lq, Hq, D] fp32, lse [Hq, Lq]).

    Masks, softcap and ALiBi: :func:`attention_scores` (the lse includes the bias); sinks:
    :func:`attention_probs`. A query that sees no key gets output 0 and lse -inf (the
    sink's logit with sinks).
    """
    s, visible = attention_scores(q, k, scale, causal, window_left, softcap, window_right,
                                  alibi_slopes)
    p, lse = attention_probs(s, visible, sinks)
    group = q.shape[1] // k.shape[1]
    vf = v.float().transpose(0, 1).repeat_interleave(group, dim=0)   # [Hq, Lk, D]
    return (p @ vf).transpose(0, 1), lse                             # [Lq, Hq, D]


def dequantize_kv(rows: Tensor, scale: Tensor | None) -> Tensor:
    """Cache rows [..., Hkv, D] -> fp32; fp8 rows times their (per-tensor or per-head) scale."""
    if scale is None:
        return rows.float()
    return rows.float() * scale.float().reshape(-1, 1)   # [1 or Hkv, 1] broadcasts over D


def gather_paged(cache: Tensor, block_row: Tensor, length: int,
                 scale: Tensor | None = None) -> Tensor:
    """Read tokens 0..length-1 of one sequence from a paged cache -> [length, Hkv, D].

    With ``scale`` (an fp8 cache) the rows come back dequantized in fp32.
    """
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_row.long()[pos // block_size]
    rows = cache[blocks, pos % block_size]
    return rows if scale is None else dequantize_kv(rows, scale)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                    softmax_scale: float | None = None, window_left: int = -1,
                    softcap: float = 0.0, block_table: Tensor | None = None,
                    window_right: int = -1, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None,
                    alibi_slopes: Tensor | None = None,
                    sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Varlen attention -> (out [total_q, Hq, D] in q.dtype, lse [Hq, total_q] fp32).

    Without block_table: k, v [total_k, Hkv, D] with sequence b at rows
    cu_seqlens_k[b]:cu_seqlens_k[b+1]. With block_table [B, max_blocks]: k, v are paged
    caches [num_blocks, block_size, Hkv, D] and sequence b's keys are its first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] cached tokens (fp8 caches are dequantized with
    k_scale / v_scale). max_seqlen_* are upper bounds only. Masks and ALiBi (alibi_slopes
    fp32 [Hq] or [B, Hq]) and attention sinks (fp32 [Hq]): see :func:`_attend`.
    """
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32,
                     device=q.device)
    if sinks is not None:                  # a row that sees no key: all mass on the sink
        lse[:] = sinks.float().view(-1, 1)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1 = cq[b], cq[b + 1]
        lk = ck[b + 1] - ck[b]
        if q1 == q0:
            continue
        if block_table is None:
            kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        else:
            kb = gather_paged(k, block_table[b], lk, k_scale)
            vb = gather_paged(v, block_table[b], lk, v_scale)
        slopes = None if alibi_slopes is None else (
            alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b])
        o, l = _attend(q[q0:q1], kb, vb, scale, causal, window_left, softcap, window_right,
                       slopes, sinks)
        out[q0:q1] = o
        lse[:, q0:q1] = l
    return out.to(q.dtype), lse


# -------------------------------------------------------------------------- paged KV


FP8_E4M3_MAX = 448.0


def quantize_kv(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows [..., Hkv, D] -> fp8 ``dtype`` (float8_e4m3fn or float8_e5m2): round-to-nearest-
    even of x / scale, saturated at the format's largest finite value (448 / 57344)."""
    q = x.float() / scale.float().reshape(-1, 1)
    top = torch.finfo(dtype).max
    return q.clamp(-top, top).to(dtype)


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor, k_scale: Tensor | None = None,
                   v_scale: Tensor | None = None) -> None:
    """k_cache[slot // bs, slot % bs] = k[t] (same for v) for each t with slot_mapping[t] >= 0.

    Same-dtype caches get a plain copy; fp8 caches get quantize_kv(k, k_scale).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    blocks, offsets = slots // bs, slots % bs
    for src, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = src[keep]
        rows = rows.to(cache.dtype) if scale is None else quantize_kv(rows, scale, cache.dtype)
        cache[blocks, offsets] = rows


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                           seq_lens: Tensor, softmax_scale: float | None = None,
                           window_left: int = -1, softcap: float = 0.0,
                           k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                           alibi_slopes: Tensor | None = None,
                           sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One new query per sequence over its paged context -> (out [B, Hq, D] in q.dtype,
    lse [B, Hq] fp32, natural log). Attention sinks (fp32 [Hq]): see :func:`_attend`.

    q [B, Hq, D]; sequence b attends to its cached tokens 0..seq_lens[b]-1 (its own new
    token included: the engine writes it first). seq_lens[b] == 0 gives zeros and lse -inf.
    fp8 caches are dequantized with k_scale / v_scale. ALiBi (alibi_slopes fp32 [Hq] or
    [B, Hq]): key j's score gets -slope * (seq_len - 1 - j) added (vLLM's decode bias).
    """
    b, hq, d = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if sinks is not None:
        lse[:] = sinks.float().view(1, -1)
    for i, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        kb = gather_paged(k_cache, block_table[i], length, k_scale)
        vb = gather_paged(v_cache, block_table[i], length, v_scale)
        slopes = None if alibi_slopes is None else (
            alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[i])
        o, l = _attend(q[i:i + 1], kb, vb, scale, True, window_left, softcap, -1, slopes,
                       sinks)
        out[i] = o[0]
        lse[i] = l[:, 0]
    return out.to(q.dtype), lse


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                           lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over keys A and B from attention over each: out [..., H, D], lse [..., H].

    out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}), lse = log of the
    denominator; a state with lse -inf (no key) contributes nothing.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a.float() - safe).nan_to_num(0.0).unsqueeze(-1)
    wb = torch.exp(lse_b.float() - safe).nan_to_num(0.0).unsqueeze(-1)
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse


# ------------------------------------------------------------ linear attention (Gated DeltaNet)
def _padded_rows(cu_seqlens: Tensor, device: torch.device) -> tuple[int, Tensor, Tensor]:
    """The state-pool references' [N, L] view of varlen tokens: (L = the longest
    sequence, valid [N, L] bool, pos [N, L] token index, 0 past a sequence's end)."""
    cu = cu_seqlens.long().cpu()
    lens = cu[1:] - cu[:-1]
    lmax = int(lens.max()) if lens.numel() else 0
    steps = torch.arange(lmax)
    valid = (steps[None, :] < lens[:, None]).to(device)
    return lmax, valid, torch.where(valid, (cu[:-1, None] + steps[None, :]).to(device), 0)


def _initial_states(state: Tensor | None, state_indices: Tensor | None,
                    has_initial_state: Tensor | None, n: int, shape: tuple[int, ...],
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """(live [N] bool: rows not marked -1, s [N, *shape] fp32: each live row's slot of
    ``state`` where it has an initial state, else zeros)."""
    live = (torch.ones(n, dtype=torch.bool, device=device) if state_indices is None
            else state_indices.to(device) >= 0)
    s = torch.zeros(n, *shape, dtype=torch.float32, device=device)
    if state is not None:
        init = live if has_initial_state is None else live & has_initial_state.to(device)
        s[init] = state[state_indices[init].long()].float()
    return live, s


def _scan_outputs(rows: Tensor, s: Tensor, total: int, valid: Tensor, pos: Tensor,
                  live: Tensor, state: Tensor | None, state_indices: Tensor | None,
                  dtype: torch.dtype) -> Tensor:
    """The state-pool references' epilogue: the per-sequence outputs rows [N, L, *F] fp32
    (:func:`_padded_rows`' layout) back in token order [total, *F], rows of padding
    sequences (not ``live``) and positions past a sequence's end left 0, rounded to
    ``dtype``; each live sequence's final state s [N, ...] written IN PLACE to its slot of
    ``state`` when a pool is given."""
    out = torch.zeros(total, *rows.shape[2:], dtype=torch.float32, device=rows.device)
    keep = valid & live[:, None]
    out[pos[keep]] = rows[keep]
    if state is not None:
        state[state_indices[live].long()] = s[live].to(state.dtype)
    return out.to(dtype)


def _step_sizes(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool) -> Tensor:
    """The selective scans' step sizes d = softplus?(dt + dt_bias), fp32, dt's shape."""
    d = dt.float()
    if dt_bias is not None:
        d = d + dt_bias.float()
    if dt_softplus:
        d = torch.nn.functional.softplus(d)
    return d


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     cu_seqlens: Tensor, state: Tensor | None = None,
                     state_indices: Tensor | None = None,
                     has_initial_state: Tensor | None = None, scale: float | None = None,
                     use_qk_l2norm: bool = False) -> Tensor:
    """The Gated DeltaNet recurrence (Qwen3-Next / Qwen3.5 linear attention) over varlen
    sequences; transformers' ``torch_recurrent_gated_delta_rule`` per sequence.

    q, k [T, Hk, dk], v [T, Hv, dv] (value head h reads q / k head h // (Hv // Hk));
    g [T, Hv] log-decay, beta [T, Hv]; cu_seqlens [N + 1]. Per sequence and value head,
    S [dk, dv] starts from state[state_indices[i]] (when state is given and
    has_initial_state[i], default True) or zeros; for each token t in order:
        S = S * exp(g_t);  delta = beta_t * (v_t - k_t^T S);  S = S + outer(k_t, delta)
        o_t = (scale * q_t)^T S        (scale default dk ** -0.5)
    with q, k first L2-normalized per head (x * rsqrt(sum(x^2) + 1e-6)) when
    use_qk_l2norm. fp32 math, o rounded to v.dtype. Exception to this module's rule: the
    final S is written IN PLACE to state[state_indices[i]] (fp32 [S, Hv, dk, dv]);
    state_indices[i] == -1 marks a padding row: zero outputs, its slot untouched.
    """
    n = cu_seqlens.shape[0] - 1
    hk, dk = q.shape[1], q.shape[2]
    hv, dv = v.shape[1], v.shape[2]
    dev = v.device
    scale = dk ** -0.5 if scale is None else scale
    lmax, valid, pos = _padded_rows(cu_seqlens, dev)
    qf, kf = q.float(), k.float()
    if use_qk_l2norm:
        qf = qf * torch.rsqrt((qf * qf).sum(-1, keepdim=True) + 1e-6)
        kf = kf * torch.rsqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
    qf = (qf * scale).repeat_interleave(hv // hk, dim=1)
    kf = kf.repeat_interleave(hv // hk, dim=1)
    # [N, L] token rows, padded past each sequence's end with g = 0, beta = 0 (S unchanged)
    def rows(x: Tensor) -> Tensor:
        x = x.float()[pos]
        return torch.where(valid.view(n, lmax, *([1] * (x.dim() - 2))), x, 0.0)

    qs, ks, vs, gs, bs = (rows(x) for x in (qf, kf, v, g, beta))
    live, s = _initial_states(state, state_indices, has_initial_state, n, (hv, dk, dv), dev)
    outs = torch.zeros(n, lmax, hv, dv, dtype=torch.float32, device=dev)
    for t in range(lmax):
        s = s * gs[:, t].exp()[..., None, None]
        kv = (s * ks[:, t, :, :, None]).sum(-2)                      # [N, Hv, dv]
        delta = bs[:, t, :, None] * (vs[:, t] - kv)
        s = s + ks[:, t, :, :, None] * delta[:, :, None, :]
        outs[:, t] = (s * qs[:, t, :, :, None]).sum(-2)
    return _scan_outputs(outs, s, v.shape[0], valid, pos, live, state, state_indices,
                         v.dtype)


# ------------------------------------------------------ Mamba-2 selective state-space scan (SSD)
def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor,
                D: Tensor | None = None, dt_bias: Tensor | None = None,
                dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
                state: Tensor | None = None, state_indices: Tensor | None = None,
                has_initial_state: Tensor | None = None) -> Tensor:
    """Mamba-2's selective scan (Granite 4.0-H, Falcon-H1, Nemotron-H, Bamba, Zamba2) over
    varlen sequences; transformers' ``mamba2_chunk_scan`` / ``mamba2_selective_state_update``
    per sequence.

    x [T, H, P], dt [T, H], A [H], B, C [T, G, N] (head h reads group h // (H // G)),
    D, dt_bias [H] or None; cu_seqlens [N_seq + 1]. Per sequence and head, S [P, N] starts
    from state[state_indices[i]] (when state is given and has_initial_state[i], default
    True) or zeros; for each token t in order:
        d = clamp(softplus?(dt_t + dt_bias), dt_limit);  S = S * exp(d A) + d outer(x_t, B_t)
        y_t = S C_t (+ D x_t)
    fp32 math, y rounded to x.dtype. Exception to this module's rule: the final S is written
    IN PLACE to state[state_indices[i]] (fp32 [S, H, P, N]); state_indices[i] == -1 marks a
    padding row: zero outputs, its slot untouched.
    """
    n = cu_seqlens.shape[0] - 1
    total, h, p = x.shape
    g, dstate = B.shape[1], B.shape[2]
    dev = x.device
    d = _step_sizes(dt, dt_bias, dt_softplus).clamp(min=dt_limit[0], max=dt_limit[1])
    bf = B.float().repeat_interleave(h // g, dim=1)
    cf = C.float().repeat_interleave(h // g, dim=1)
    lmax, valid, pos = _padded_rows(cu_seqlens, dev)                      # [N_seq, L]
    xs, ds, bs, cs = (v.float()[pos] for v in (x, d, bf, cf))
    af = A.float()
    live, s = _initial_states(state, state_indices, has_initial_state, n, (h, p, dstate), dev)
    ys = torch.zeros(n, lmax, h, p, dtype=torch.float32, device=dev)
    for t in range(lmax):
        dt_t = ds[:, t]                                                    # [N_seq, H]
        upd = (s * torch.exp(dt_t * af)[..., None, None]
               + (dt_t[..., None] * xs[:, t])[..., None] * bs[:, t, :, None, :])
        s = torch.where(valid[:, t, None, None, None], upd, s)
        ys[:, t] = (s * cs[:, t, :, None, :]).sum(-1)
        if D is not None:
            ys[:, t] += D.float()[:, None] * xs[:, t]
    return _scan_outputs(ys, s, total, valid, pos, live, state, state_indices, x.dtype)


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   dt_bias: Tensor | None = None, dt_softplus: bool = False,
                   state: Tensor | None = None, state_indices: Tensor | None = None,
                   has_initial_state: Tensor | None = None) -> Tensor:
    """Mamba-1's selective scan (Mamba, FalconMamba, Jamba) over varlen sequences;
    mamba_ssm's ``selective_scan_fn`` / ``selective_state_update`` per sequence.

    x [T, Dm], dt [T, Dm], A [Dm, N] (a decay per channel and state), B, C [T, G, N]
    (channel c reads group c // (Dm // G)), D, dt_bias [Dm] or None, z [T, Dm] or None;
    cu_seqlens [N_seq + 1]. Per sequence and channel, s [N] starts from
    state[state_indices[i]] (when state is given and has_initial_state[i], default True) or
    zeros; for each token t in order:
        d = softplus?(dt_t + dt_bias);  s = s * exp(d A) + d x_t B_t;  y_t = s . C_t (+ D x_t)
        y_t = y_t * silu(z_t) (when z is given)
    fp32 math, y rounded to x.dtype. Exception to this module's rule: the final s is written
    IN PLACE to state[state_indices[i]] (fp32 [S, Dm, N]); state_indices[i] == -1 marks a
    padding row: zero outputs, its slot untouched.
    """
    n = cu_seqlens.shape[0] - 1
    total, dm = x.shape
    g, dstate = B.shape[1], B.shape[2]
    dev = x.device
    d = _step_sizes(dt, dt_bias, dt_softplus)
    bf = B.float().repeat_interleave(dm // g, dim=1)                       # [T, Dm, N]
    cf = C.float().repeat_interleave(dm // g, dim=1)
    lmax, valid, pos = _padded_rows(cu_seqlens, dev)                      # [N_seq, L]
    xs, ds, bs, cs = (v.float()[pos] for v in (x, d, bf, cf))
    af = A.float()
    live, s = _initial_states(state, state_indices, has_initial_state, n, (dm, dstate), dev)
    ys = torch.zeros(n, lmax, dm, dtype=torch.float32, device=dev)
    for t in range(lmax):
        dt_t = ds[:, t, :, None]                                           # [N_seq, Dm, 1]
        upd = s * torch.exp(dt_t * af) + dt_t * xs[:, t, :, None] * bs[:, t]
        s = torch.where(valid[:, t, None, None], upd, s)
        ys[:, t] = (s * cs[:, t]).sum(-1)
        if D is not None:
            ys[:, t] += D.float() * xs[:, t]
    if z is not None:     # gated before the scatter: padding rows stay 0 whatever z holds
        ys = ys * torch.nn.functional.silu(z.float()[pos])
    return _scan_outputs(ys, s, total, valid, pos, live, state, state_indices, x.dtype)


# ----------------------------------------------------------------- structured outputs


def unpack_token_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """bitmask int32 [..., W] -> bool [..., vocab_size]: bit t % 32 of word t // 32 (1 =
    allowed; xgrammar's packing). Tokens past 32 * W count as disallowed."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                     # [..., W, 32]
    allowed = bits.reshape(*bitmask.shape[:-1], -1).bool()
    if allowed.shape[-1] < vocab_size:
        pad = torch.zeros(*allowed.shape[:-1], vocab_size - allowed.shape[-1],
                          dtype=torch.bool, device=bitmask.device)
        allowed = torch.cat([allowed, pad], dim=-1)
    return allowed[..., :vocab_size]


def apply_token_bitmask(logits: Tensor, bitmask: Tensor, indices: Tensor | None = None,
                        vocab_size: int | None = None) -> None:
    """In place: logits[r, t] = -inf where bit t of bitmask[r] is 0, for t < vocab_size and
    each row r in ``indices`` (every row when None). logits [B, V]; bitmask int32
    [B, ceil(V / 32)] (row r masks logits row r); vocab_size defaults to
    min(V, 32 * bitmask.shape[1]); columns from vocab_size on are left alone."""
    v = logits.shape[-1] if vocab_size is None else vocab_size
    v = min(v, logits.shape[-1], 32 * bitmask.shape[-1])
    rows = (torch.arange(logits.shape[0], device=logits.device) if indices is None
            else indices.long())
    if rows.numel() == 0 or v == 0:
        return
    allowed = unpack_token_bitmask(bitmask[rows], v)
    block = logits[rows, :v]
    logits[rows, :v] = block.masked_fill(~allowed, float("-inf"))



def fsm_advance(state: Tensor, codes: Tensor, slots: Tensor, rows: Tensor, tokens: Tensor,
                table: Tensor, default: Tensor, exc_keys: Tensor, exc_next: Tensor,
                eos: Tensor, vocab_size: int | None = None) -> Tensor:
    """One step of the token automata of ``slots`` (layouts: minikernels/ops/fsm.py): for
    each row i, with s = state[slots[i]] and t = tokens[rows[i]], t is allowed when the
    slot is not done, 0 <= t < vocab_size and bit t of table[s] is set; an allowed stop
    token (eos[t]) keeps s and marks the slot done (codes = 1); another moves s to the
    exception listed for (s, t) in the sorted keys ``s << 32 | t``, else to default[s].
    In place on state / codes; returns int8 [R]: 0 moved, 1 stop, 2 refused."""
    v = eos.shape[0] if vocab_size is None else vocab_size
    idx, r = slots.long(), rows.long()
    s, c, t = state[idx], codes[idx], tokens[r].long()
    inside = (t >= 0) & (t < v)
    safe = torch.where(inside, t, torch.zeros_like(t))
    word = table[s, safe >> 5].long() if table.shape[0] else torch.zeros_like(t)
    ok = inside & (c == 0) & (((word >> (safe & 31)) & 1) == 1)
    stop = ok & eos[safe]
    nxt = default[s] if default.shape[0] else s
    if exc_keys.numel():
        key = (s << 32) | safe
        at = torch.searchsorted(exc_keys, key).clamp(max=exc_keys.shape[0] - 1)
        nxt = torch.where(exc_keys[at] == key, exc_next[at], nxt)
    state[idx] = torch.where(ok & ~stop, nxt, s)
    codes[idx] = torch.where(stop, torch.ones_like(c), c)
    return torch.where(ok, stop.to(torch.int8), torch.full_like(c, 2))

def fsm_mask_logits(logits: Tensor, state: Tensor, slots: Tensor, rows: Tensor,
                    table: Tensor, vocab_size: int | None = None) -> None:
    """In place: for each i, logits row ``rows[i]`` keeps only the tokens allowed in its
    automaton's state ``s = state[slots[i]]`` (bit t of table[s]; layouts:
    minikernels/ops/fsm.py): column t becomes -inf where that bit is 0 or t >= v, v =
    min(vocab_size, 32 * W) (a padded lm_head's columns are never allowed). Other rows
    are left alone."""
    v = logits.shape[-1] if vocab_size is None else vocab_size
    v = min(v, logits.shape[-1], 32 * table.shape[-1])
    r = rows.long()
    if r.numel() == 0:
        return
    allowed = unpack_token_bitmask(table[state[slots.long()]], v)
    block = logits[r]
    block[:, :v] = block[:, :v].masked_fill(~allowed, float("-inf"))
    block[:, v:] = float("-inf")
    logits[r] = block


# --------------------------------------------------------------------------- speculative decoding
def rejection_sample(draft_token_ids: Tensor, num_draft_tokens: Tensor, target_probs: Tensor,
                     draft_probs: Tensor | None, uniform: Tensor, exp_q: Tensor,
                     is_greedy: Tensor) -> Tensor:
    """Speculative-decoding verification (Leviathan et al. / vLLM's rejection sampler).

    Row b has ``n = num_draft_tokens[b]`` draft tokens ``x_j = draft_token_ids[b, j]``
    (j < n) and target distributions ``p_j = target_probs[b, j]`` (j <= n; p_n gives the
    bonus token). ``q_j = draft_probs[b, j]``, or a point mass on x_j when draft_probs is
    None (n-gram drafts). Walking j = 0, 1, ...:

    * random rows: accept x_j iff ``uniform[b, j] * q_j(x_j) < p_j(x_j)`` (probability
      min(1, p/q)); at the first rejection emit a token from normalize(max(0, p_j - q_j))
      (p_j when that is all zero) and stop;
    * greedy rows (``is_greedy[b]``): accept iff x_j == argmax p_j (first index on ties);
      at the first mismatch emit argmax p_j and stop. Only the argmax of a greedy row's
      target_probs is used (raw logits may be passed);
    * when all n are accepted, emit the bonus token: argmax p_n (greedy) or a sample of p_n.

    Sampling from a distribution r uses the exponential race ``argmax(r / exp_q[b])``
    (exp_q ~ Exp(1), one vector per row: a row samples at most one such token).

    draft_token_ids int64 [B, K]; num_draft_tokens int32/int64 [B] in [0, K];
    target_probs fp32 [B, K + 1, V]; draft_probs fp32 [B, K, V] or None; uniform fp32
    [B, K] in [0, 1); exp_q fp32 [B, V] > 0; is_greedy bool [B].
    Returns int64 [B, K + 1]: the accepted drafts, then the recovered / bonus token, then
    -1 (vLLM's placeholder). Row b holds between 1 and n + 1 tokens.
    """
    B, K = draft_token_ids.shape
    V = target_probs.shape[-1]
    dev = target_probs.device
    out = torch.full((B, K + 1), -1, dtype=torch.int64, device=dev)
    if B == 0:
        return out
    p = target_probs.float()
    x = draft_token_ids.long()
    n = num_draft_tokens.long()
    greedy = is_greedy.bool()
    j = torch.arange(K, device=dev)
    valid = j[None, :] < n[:, None]                                      # [B, K]
    xs = x.clamp(0, V - 1)
    p_x = p[:, :K].gather(2, xs[..., None])[..., 0]                      # [B, K]
    if draft_probs is None:
        q = torch.nn.functional.one_hot(xs, V).float()                    # point masses
    else:
        q = draft_probs.float()
    q_x = q.gather(2, xs[..., None])[..., 0]
    target_argmax = p.argmax(dim=2)                                       # [B, K + 1]
    accept = torch.where(greedy[:, None], xs == target_argmax[:, :K],
                         uniform.float() * q_x < p_x) & valid
    # Number of accepted drafts: the first j that is not accepted.
    num_acc = torch.cumprod(accept.long(), dim=1).sum(dim=1)              # [B]
    # Token emitted after them: recovered (num_acc < n) or bonus (num_acc == n).
    rows = torch.arange(B, device=dev)
    p_at = p[rows, num_acc]                                               # [B, V]
    q_at = torch.zeros_like(p_at)
    has_q = num_acc < n
    if has_q.any():
        q_at[has_q] = q[rows[has_q], num_acc[has_q]]
    resid = (p_at - q_at).clamp_min(0.0)
    resid = torch.where((resid > 0).any(dim=1, keepdim=True), resid, p_at)
    sampled = (resid / exp_q.float()).argmax(dim=1)
    final = torch.where(greedy, target_argmax[rows, num_acc], sampled)
    keep = j[None, :] < num_acc[:, None]
    out[:, :K] = torch.where(keep, x, out[:, :K])
    out[rows, num_acc] = final
    return out


# --------------------------------------------------------------------------- sampling
def top_k_top_p_mask_logits(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None,
                            min_p: Tensor | None) -> Tensor:
    """Keep each row's top-k / min-p / top-p tokens, set the rest to -inf (a new tensor).

    logits [B, V] fp32/fp16/bf16 (finite or -inf); top_k int [B] (k <= 0 or k >= V: off);
    top_p float [B] in (0, 1] (1: off); min_p float [B] in [0, 1] (0: off); None = off for
    every row. Applied in this order, each on the tokens the previous ones kept, with
    e_j = exp(x_j - max(x)) in fp32 (proportional to the softmax probabilities):
      top-k   keep x_j >= the k-th largest logit (ties with it are kept);
      min-p   keep e_j >= min_p (probability >= min_p * the largest probability);
      top-p   keep j when the kept tokens with a strictly larger logit hold less than
              top_p of the kept mass: sum_{i kept, x_i > x_j} e_i < top_p * sum_{i kept} e_i
              (so ties are kept or dropped together, and the largest logit always stays).
    Kept logits are returned unchanged, in logits' dtype.
    """
    x = logits.float()
    B, V = x.shape
    neg_inf = float("-inf")
    if B == 0 or V == 0:
        return logits.clone()
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None:
        k = top_k.to(x.device, torch.int64)
        off = (k <= 0) | (k >= V)
        k = torch.where(off, 1, k)
        kth = torch.topk(x, int(k.max()), dim=1).values.gather(1, (k - 1)[:, None])
        keep &= (x >= kth) | off[:, None]
    kept = x.masked_fill(~keep, neg_inf)
    m = kept.amax(dim=1, keepdim=True)
    m = torch.where(m == neg_inf, 0.0, m)          # a row of -inf: e = 0 everywhere
    e = torch.where(keep, torch.exp(kept - m), 0.0)
    if min_p is not None:
        keep &= e >= min_p.to(x.device, torch.float32)[:, None]
        e = torch.where(keep, e, 0.0)
    if top_p is not None:
        vals = x.masked_fill(~keep, neg_inf).sort(dim=1, descending=True).values
        es = torch.exp(vals - m)                   # dropped tokens sort last, weight 0
        before = torch.cumsum(es, dim=1) - es     # mass of the tokens sorted earlier
        target = top_p.to(x.device, torch.float32)[:, None] * e.sum(dim=1, keepdim=True)
        # The kept tokens are a prefix of the sorted row; extended to the end of the run
        # of ties it stops in, that is "strictly larger mass < target" for ties too. The
        # prefix holds at least the largest logit.
        n = (before < target).sum(dim=1, keepdim=True).clamp_min(1)
        keep &= x >= vals.gather(1, n - 1)
    return logits.masked_fill(~keep, neg_inf)


# ------------------------------------------------------------------- MoE router
def topk_sigmoid(gating_output: Tensor, topk: int, renormalize: bool,
                 correction_bias: Tensor | None = None, renorm_eps: float = 0.0,
                 num_groups: int = 1, topk_groups: int = 1,
                 indices_dtype: torch.dtype = torch.int32) -> tuple[Tensor, Tensor]:
    """The sigmoid top-k MoE router (vLLM's ``topk_sigmoid``; LFM2-MoE, DeepSeek-V3-style
    scoring without the groups).

    gating_output [T, E] fp16/bf16/fp32 router logits; correction_bias [E] or None.
        s      = sigmoid(logits in fp32)
        choice = s + correction_bias (fp32), or the logits themselves without a bias (the
                 same order as s, and exact)
        groups (topk_groups < num_groups; DeepSeek-V3 / Nemotron 3, vLLM's grouped_topk):
                 the E experts in num_groups equal groups; a group's score is the sum of
                 its two largest choices with a bias (its one when it has one expert), its
                 largest without; only the topk_groups best groups (ties: the lower
                 group) stay choosable
        ids    = the topk largest choices, descending; ties: the lower expert id first
        w      = s[ids] (the bias only chooses);  renormalize: w / (sum(w) + renorm_eps)
    A row with a NaN or +inf logit routes to experts 0..topk-1 with weight 0 (as
    :func:`topk_softmax`). Returns (weights fp32 [T, topk], ids [T, topk] indices_dtype)."""
    x = gating_output.float()
    bad = (torch.isnan(x) | (x == math.inf)).any(dim=1)
    x = x.masked_fill(bad[:, None], 0.0)
    scores = torch.sigmoid(x)
    choice = x if correction_bias is None else scores + correction_bias.float()[None, :]
    choice = choice.masked_fill(bad[:, None], 0.0)
    if topk_groups < num_groups:
        t, e = choice.shape
        per = choice.view(t, num_groups, e // num_groups)
        group_scores = per.topk(min(2, per.shape[2]), dim=-1).values.sum(-1) \
            if correction_bias is not None else per.amax(dim=-1)
        best = torch.sort(group_scores, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, best[:, :topk_groups], True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // num_groups, dim=1),
                                    -math.inf)
    ids = torch.sort(choice, dim=1, descending=True, stable=True).indices[:, :topk]
    weights = scores.gather(1, ids).masked_fill(bad[:, None], 0.0)
    if renormalize:
        total = weights.sum(dim=1, keepdim=True) + renorm_eps
        weights = torch.where(total > 0, weights / total, weights)
    return weights, ids.to(indices_dtype)


def topk_softmax(gating_output: Tensor, topk: int, renormalize: bool,
                 indices_dtype: torch.dtype = torch.int32) -> tuple[Tensor, Tensor]:
    """The softmax top-k MoE router (vLLM's ``topk_softmax`` / ``fused_topk``).

    gating_output [T, E] fp16/bf16/fp32 router logits; 1 <= topk <= E. Returns
    (topk_weights fp32 [T, topk], topk_ids [T, topk] in indices_dtype, int32 or int64):
        p   = softmax(logits in fp32) over the E experts
        ids = the topk experts with the largest logits (= the largest p), in descending
              order; equal logits: the lower expert id first (so the choice is exact and
              deterministic: it never depends on how p rounds)
        w   = p[ids];  renormalize: w / sum(w)
    A row whose softmax is not finite (any NaN or +inf logit, or every logit -inf) routes
    to experts 0..topk-1 with weight 0, as vLLM clamps non-finite probabilities to 0:
    finite weights and distinct in-range ids, so a poisoned (e.g. padding) token adds 0.
    """
    x = gating_output.float()
    bad = (torch.isnan(x) | (x == math.inf)).any(dim=1) | (x == -math.inf).all(dim=1)
    x = x.masked_fill(bad[:, None], 0.0)
    probs = torch.softmax(x, dim=1).masked_fill(bad[:, None], 0.0)
    ids = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :topk]
    weights = probs.gather(1, ids)
    if renormalize:
        total = weights.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, weights / total, weights)   # bad rows stay 0
    return weights, ids.to(indices_dtype)


# ------------------------------------------------------ causal conv1d (Mamba / GDN short conv)
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, cu_seqlens: Tensor,
                  conv_state: Tensor | None = None, state_indices: Tensor | None = None,
                  has_initial_state: Tensor | None = None, activation: str | None = None,
                  max_seqlen: int | None = None) -> Tensor:
    """Depthwise causal short convolution over varlen sequences with a per-sequence state
    pool (the conv of Mamba / LFM2 / Qwen3.5's Gated DeltaNet layers; transformers'
    ``causal_conv1d_fn`` / ``causal_conv1d_update``). Updates ``conv_state`` in place.

    x [T, D] (token-major), weight [D, W], bias [D] or None, cu_seqlens [N + 1]; sequence
    i is rows cu[i] .. cu[i+1] - 1. With xx_i = concat(init_i, x_i) along time, init_i
    [D, W - 1] (oldest column first) = conv_state[state_indices[i]] when conv_state is
    given and has_initial_state[i] (None = all True), else zeros:
        out[t, d] = act(bias[d] + sum_k weight[d, k] * xx_i[p + k, d])   (p: t's position)
    act = identity or silu; fp32 math, out rounded once to x.dtype. Afterwards
    conv_state[state_indices[i]] = the last W - 1 columns of xx_i (in conv_state's
    dtype). state_indices[i] = -1 marks a padding row: zero outputs, no state read or
    written. ``max_seqlen`` is ignored here (a launch-size hint for the kernels).
    """
    T, D = x.shape
    W = weight.shape[1]
    dev = x.device
    cu = cu_seqlens.to(dev, torch.int64)
    n = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=T)
    pos = torch.arange(T, device=dev) - cu[:-1][seq]                      # position in seq
    init = torch.zeros(n, D, W - 1, dtype=torch.float32, device=dev)
    slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
    if conv_state is not None:
        slots = state_indices.to(dev, torch.int64)
        use = slots >= 0
        if has_initial_state is not None:
            use &= has_initial_state.to(dev, torch.bool)
        if conv_state.shape[0]:
            old = conv_state[slots.clamp(min=0)].float()
            init = torch.where(use[:, None, None], old, init)
    xf = x.float()
    wf = weight.float()

    def column(seq_of: Tensor, j: Tensor) -> Tensor:
        """Element j of each entry's sequence ([len(j), D]): x row cu[seq] + j when j >= 0,
        else init column W - 1 + j (j in [-(W - 1), len))."""
        rows = (cu[seq_of] + j).clamp(0, max(T - 1, 0))
        from_x = xf[rows] if T else xf.new_zeros(len(j), D)
        from_init = init[seq_of, :, (W - 1 + j).clamp(0, W - 2)] if n else from_x
        return torch.where((j >= 0)[:, None], from_x, from_init)

    acc = torch.zeros(T, D, dtype=torch.float32, device=dev)
    if bias is not None:
        acc += bias.float()
    for k in range(W):
        acc += wf[:, k] * column(seq, pos - (W - 1) + k)
    if activation in ("silu", "swish"):
        acc = acc * torch.sigmoid(acc)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if conv_state is not None:
        acc = torch.where((slots[seq] >= 0)[:, None], acc, 0.0)
        keep = slots >= 0
        if bool(keep.any()):
            ids = torch.arange(n, device=dev)[keep]
            cols = [column(ids, lens[ids] - (W - 1) + c) for c in range(W - 1)]
            conv_state[slots[keep]] = torch.stack(cols, -1).to(conv_state.dtype)
    return acc.to(x.dtype)


# ------------------------------------------------------------------------- LoRA
def lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, token_slots: Tensor,
               scaling: Tensor) -> Tensor:
    """Each token's low-rank update through its adapter slot: y [T, N] in x.dtype with
    y[t] = scaling[s] * lora_b[s] @ (lora_a[s] @ x[t]), s = token_slots[t]; 0 where s < 0.
    fp32 math, the rank-R intermediate not rounded, y rounded once."""
    t, n = x.shape[0], lora_b.shape[1]
    y = torch.zeros(t, n, dtype=torch.float32, device=x.device)
    slots = token_slots.long()
    for s in sorted({int(v) for v in slots.tolist()}):
        if s < 0:
            continue
        rows = (slots == s).nonzero().flatten()
        h = x[rows].float() @ lora_a[s].float().t()                  # [rows, R]
        y[rows] = (h @ lora_b[s].float().t()) * scaling[s].float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------- MoE
#: the gated activations of the fused MoE ops' experts (vLLM's ``activation`` names):
#: "silu" (SwiGLU), "gelu" (erf GeGLU), "gelu_tanh" (tanh-approximated GeGLU: Gemma), all
#: act(gate) * up; and "swigluoai" (GPT-OSS's clamped SwiGLU, ``moe_swigluoai``)
MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")
#: the activations of non-gated experts (``gated=False``: down(act(up(x))); vLLM's
#: "<act>_no_mul"): silu / gelu / gelu_tanh applied to the up projection alone, and
#: "relu2", relu(u)^2 (Nemotron 3's squared-ReLU experts, vLLM's "relu2_no_mul")
MOE_NONGATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2")
#: swigluoai's defaults: GPT-OSS's ``swiglu_alpha`` / ``swiglu_limit`` (vLLM's too)
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


def moe_swigluoai(gate: Tensor, up: Tensor, alpha: float = SWIGLUOAI_ALPHA,
                  limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """GPT-OSS's clamped SwiGLU (vLLM's "swigluoai"), elementwise in the inputs' dtype
    (fp32 here): g = min(gate, limit), u = clamp(up, -limit, limit),
    (u + 1) * g * sigmoid(alpha * g)."""
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    return (u + 1.0) * (g * torch.sigmoid(alpha * g))


def moe_gated_activation(gate_up: Tensor, activation: str = "silu",
                         alpha: float = SWIGLUOAI_ALPHA,
                         limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """gate_up [n, 2I] fp32 (gate columns, then up columns) -> [n, I] fp32:
    act(gate) * up, act = silu, gelu (erf) or gelu_tanh
    (torch.nn.functional.gelu(approximate="tanh")); or, activation "swigluoai",
    ``moe_swigluoai(gate, up, alpha, limit)`` (alpha / limit are read by it alone)."""
    inter = gate_up.shape[1] // 2
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MOE_ACTIVATIONS}, got {activation!r}")
    if activation == "swigluoai":
        return moe_swigluoai(gate, up, alpha, limit)
    return moe_activation(gate, activation) * up


def moe_activation(h: Tensor, activation: str) -> Tensor:
    """act(h) elementwise in h's dtype (fp32 here): silu, gelu (erf), gelu_tanh
    (torch.nn.functional.gelu(approximate="tanh")) or relu2 (relu(h)^2)."""
    if activation == "silu":
        return torch.nn.functional.silu(h)
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.nn.functional.gelu(h, approximate=approximate)
    if activation == "relu2":
        return torch.square(torch.relu(h))
    raise ValueError(f"activation must be one of {MOE_NONGATED_ACTIVATIONS}, got "
                     f"{activation!r}")


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
              topk_ids: Tensor, lora: Sequence[Tensor] | None = None,
              activation: str = "silu", gated: bool = True,
              w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
              alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """A mixture-of-experts MLP: out [T, H] in x.dtype with
    out[t] = sum_j topk_weights[t, j] * (w2[e] @ act_e(x[t]) + w2_bias[e]),
    e = topk_ids[t, j], and act_e(x) = act(g) * u rounded to x.dtype (the kernel stores
    that intermediate), where g = w13[e, :I] @ x + w13_bias[e, :I] and
    u = w13[e, I:] @ x + w13_bias[e, I:], act = silu / gelu / gelu_tanh by ``activation``
    (``moe_gated_activation``); activation "swigluoai" (GPT-OSS): act_e(x) =
    ``moe_swigluoai(g, u, alpha, limit)``. Everything else in fp32; out rounded once.

    w13_bias [E, 2I] / w2_bias [E, H] (x.dtype; each optional, None = no bias; vLLM's
    ``w1_bias`` / ``w2_bias``): the w13 bias is added to the gate / up pre-activations,
    the w2 bias to each expert's down output before the router weight multiplies it.

    gated=False (non-gated experts: Nemotron 3's): w13 [E, I, H] holds each expert's
    up_proj rows only (w13_bias [E, I]) and act_e(x) = act(u) rounded to x.dtype, act =
    silu / gelu / gelu_tanh / relu2 (relu(u)^2) (``moe_activation``).

    lora: optional per-token LoRA on the experts, (a13 [S, E, R13, H], b13 [S, E, 2I, R13]
    (non-gated: [S, E, I, R13], the up rows only), a2 [S, E, R2, I], b2 [S, E, H, R2] in
    x.dtype, token_slots [T] in [-1, S), scaling fp32 [S]) (minikernels.ops.MoELoRA). For
    pair (t, j) with s = token_slots[t] >= 0:
      gate_up += lora_delta(x[t], a13[s, e], b13[s, e], scaling[s])    (x.dtype, as fp32)
      down    += lora_delta(act_e, a2[s, e], b2[s, e], scaling[s])     (before the weight)
    i.e. each update is ``lora_delta``'s math (fp32, the rank-R intermediate unrounded,
    rounded once to x.dtype). s = -1 (or no lora): the base experts alone."""
    t, h = x.shape
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    for e in sorted({int(v) for v in ids.flatten().tolist()}):
        rows, slots = (ids == e).nonzero(as_tuple=True)          # (token, j) pairs
        gate_up = x[rows].float() @ w13[e].float().t()           # [n, 2I] ([n, I])
        if w13_bias is not None:
            gate_up += w13_bias[e].float()
        if lora is not None:
            gate_up += _expert_lora(x[rows], lora, e, rows, down=False)
        if gated:
            act = moe_gated_activation(gate_up, activation, alpha, limit).to(x.dtype)
        else:
            act = moe_activation(gate_up, activation).to(x.dtype)
        y = act.float() @ w2[e].float().t()                      # [n, H]
        if w2_bias is not None:
            y += w2_bias[e].float()
        if lora is not None:
            y += _expert_lora(act, lora, e, rows, down=True)
        out.index_add_(0, rows, y * topk_weights[rows, slots].float()[:, None])
    return out.to(x.dtype)


def _expert_lora(inp: Tensor, lora: Sequence[Tensor], e: int, rows: Tensor,
                 down: bool) -> Tensor:
    """Expert e's LoRA update of the pairs whose tokens are ``rows``: inp [n, K] (x rows,
    or the activated intermediate for the down projection) -> [n, N] fp32, each row
    lora_delta through its token's slot (rounded to inp's dtype; 0 for slot -1)."""
    a13, b13, a2, b2, token_slots, scaling = lora
    a, b = (a2, b2) if down else (a13, b13)
    return lora_delta(inp, a[:, e], b[:, e], token_slots[rows], scaling).float()


def dequantize_int4_experts(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                            dtype: torch.dtype) -> Tensor:
    """Stacked int4 experts qweight [E, N, K/8], scales / zeros [E, N, K/G] -> W [E, N, K]
    in ``dtype``: scales and zeros converted to ``dtype`` first (what the kernels do when
    their dtype differs from the activations'), (q - z) * s in fp32, rounded once."""
    e, n, kw = qweight.shape
    w = dequantize_int4(qweight.reshape(e * n, kw), scales.to(dtype).reshape(e * n, -1),
                        zeros.to(dtype).reshape(e * n, -1), group_size)
    return w.view(e, n, kw * 8).to(dtype)


def fused_moe_int4(x: Tensor, w13_qweight: Tensor, w13_scales: Tensor, w13_zeros: Tensor,
                   w2_qweight: Tensor, w2_scales: Tensor, w2_zeros: Tensor,
                   topk_weights: Tensor, topk_ids: Tensor, group_size: int,
                   lora: Sequence[Tensor] | None = None, activation: str = "silu",
                   gated: bool = True, w13_bias: Tensor | None = None,
                   w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                   limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """fused_moe with int4 experts (W4A16): exactly ``fused_moe`` on the dequantized
    weights in x.dtype (``dequantize_int4_experts``; group_size -1 = one group per row,
    G = H for w13 and G = I for w2), LoRA on the experts and the experts' biases included
    (dense, x.dtype); gated=False: w13 holds I rows (up_proj only), as ``fused_moe``."""
    w13 = dequantize_int4_experts(w13_qweight, w13_scales, w13_zeros, group_size, x.dtype)
    w2 = dequantize_int4_experts(w2_qweight, w2_scales, w2_zeros, group_size, x.dtype)
    return fused_moe(x, w13, w2, topk_weights, topk_ids, lora, activation, gated,
                     w13_bias, w2_bias, alpha, limit)


def dequantize_fp8_experts(weight: Tensor, weight_scale: Tensor,
                           block_size: tuple[int, int]) -> Tensor:
    """Stacked fp8 experts weight [E, N, K] (float8_e4m3fn), weight_scale fp32
    [E, ceil(N / bn), ceil(K / bk)] -> W [E, N, K] fp32: ``dequantize_fp8`` per expert."""
    _, n, k = weight.shape
    bn, bk = block_size
    rows = _fp8_block_index(n, bn, weight.device)
    cols = _fp8_block_index(k, bk, weight.device)
    return weight.float() * weight_scale.float()[:, rows][:, :, cols]


def fused_moe_fp8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor,
                  topk_weights: Tensor, topk_ids: Tensor, block_size: tuple[int, int],
                  lora: Sequence[Tensor] | None = None, activation: str = "silu",
                  gated: bool = True, w13_bias: Tensor | None = None,
                  w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                  limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """fused_moe with FP8 (e4m3) experts and block scales (W8A16): exactly ``fused_moe`` on
    the dequantized experts kept in fp32 (``dequantize_fp8_experts``, not rounded to
    x.dtype: the kernels scale fp32 partial sums), LoRA on the experts and the experts'
    biases included (dense, x.dtype). w13 [E, 2I, H] (gated=False: [E, I, H]), w2
    [E, H, I]."""
    return fused_moe(x, dequantize_fp8_experts(w13, w13_scale, block_size),
                     dequantize_fp8_experts(w2, w2_scale, block_size), topk_weights, topk_ids,
                     lora, activation, gated, w13_bias, w2_bias, alpha, limit)


def dequantize_int8_experts(weight: Tensor, weight_scale: Tensor) -> Tensor:
    """Stacked int8 experts weight [E, N, K] (int8), weight_scale fp32 [E, N] (one scale
    per output row) -> W [E, N, K] fp32: W[e, n, k] = weight[e, n, k] * scale[e, n]."""
    return weight.float() * weight_scale.float()[:, :, None]


def fused_moe_int8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor,
                   topk_weights: Tensor, topk_ids: Tensor,
                   lora: Sequence[Tensor] | None = None, activation: str = "silu",
                   gated: bool = True, w13_bias: Tensor | None = None,
                   w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                   limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """fused_moe with INT8 experts and per-row scales (W8A16, vLLM's ``use_int8_w8a16``):
    exactly ``fused_moe`` on the dequantized experts kept in fp32
    (``dequantize_int8_experts``, not rounded to x.dtype: the kernels scale the fp32
    accumulators), LoRA on the experts and the experts' biases included (dense, x.dtype).
    w13 int8
    [E, 2I, H] with w13_scale [E, 2I] (gated=False: [E, I, H] and [E, I]); w2 int8
    [E, H, I] with w2_scale [E, H]. Rounding points: the activated intermediate
    act(gate) * up (non-gated: act(up)) to x.dtype; the router weight, the k-sum in fp32;
    out rounded once."""
    return fused_moe(x, dequantize_int8_experts(w13, w13_scale),
                     dequantize_int8_experts(w2, w2_scale), topk_weights, topk_ids, lora,
                     activation, gated, w13_bias, w2_bias, alpha, limit)


def fused_moe_int8_w8a8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                        w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                        lora: Sequence[Tensor] | None = None,
                        activation: str = "silu", gated: bool = True,
                        w13_bias: Tensor | None = None, w2_bias: Tensor | None = None,
                        alpha: float = SWIGLUOAI_ALPHA,
                        limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """fused_moe with INT8 W8A8 experts (vLLM's ``use_int8_w8a8`` with
    ``per_channel_quant``): int8 weights with per-row scales, int8 activations with
    per-token scales, exact integer sums. w13 int8 [E, 2I, H] with w13_scale fp32
    [E, 2I] (gated=False: [E, I, H] and [E, I]); w2 int8 [E, H, I] with w2_scale [E, H].
    Per (token t, slot j) with e = topk_ids[t, j], in fp32:
        x_q, s_x = scaled_int8_quant(x)                         (per token, symmetric)
        gate_up  = scaled_mm(x_q[t], w13[e]^T, s_x[t], w13_scale[e]) + w13_bias[e]
                   (s_x * (s_w * float(the exact integer sum)))
        act      = act(gate) * up (non-gated: act(up)), rounded to x.dtype
        a_q, s_a = scaled_int8_quant(act)                       (per pair row)
        y        = scaled_mm(a_q, w2[e]^T, s_a, w2_scale[e]) + w2_bias[e]
    out[t] = sum_j topk_weights[t, j] * y (fp32), rounded once to x.dtype.
    lora: fused_moe's per-token LoRA on the unquantized inputs: gate_up += lora_delta(x[t])
    (after the bias), y += lora_delta(act) (act before its quantization)."""
    t, h = x.shape
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    x_q, s_x, _ = scaled_int8_quant(x)
    ids = topk_ids.long()
    for e in sorted({int(v) for v in ids.flatten().tolist()}):
        rows, slots = (ids == e).nonzero(as_tuple=True)          # (token, j) pairs
        gate_up = scaled_mm(x_q[rows], w13[e].t(), s_x[rows], w13_scale[e].float(),
                            torch.float32, None if w13_bias is None else w13_bias[e])
        if lora is not None:
            gate_up += _expert_lora(x[rows], lora, e, rows, down=False)
        if gated:
            act = moe_gated_activation(gate_up, activation, alpha, limit).to(x.dtype)
        else:
            act = moe_activation(gate_up, activation).to(x.dtype)
        a_q, s_a, _ = scaled_int8_quant(act)
        y = scaled_mm(a_q, w2[e].t(), s_a, w2_scale[e].float(), torch.float32,
                      None if w2_bias is None else w2_bias[e])
        if lora is not None:
            y += _expert_lora(act, lora, e, rows, down=True)
        out.index_add_(0, rows, y * topk_weights[rows, slots].float()[:, None])
    return out.to(x.dtype)


def fused_moe_fp8_w8a8(x: Tensor, w13: Tensor, w13_scale: Tensor, w2: Tensor,
                       w2_scale: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                       block_size: tuple[int, int], lora: Sequence[Tensor] | None = None,
                       activation: str = "silu",
                       gated: bool = True, w13_bias: Tensor | None = None,
                       w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                       limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """fused_moe with block-wise FP8 W8A8 experts (vLLM's ``use_fp8_w8a8`` with
    ``block_shape`` [bn, bk]): fp8 weights with block scales (fused_moe_fp8's layout: w13
    float8_e4m3fn [E, 2I, H] with w13_scale fp32 [E, ceil(2I / bn), H / bk], w2 [E, H, I]
    with [E, ceil(H / bn), I / bk]; gated=False: w13 [E, I, H]) and fp8 activations
    quantized per token and group of bk columns; each matrix's bk, clamped to its K (a
    block past the edge covers the edge), divides that K.
    Per (token t, slot j) with e = topk_ids[t, j], in fp32:
        x_q, s_x = per_token_group_quant_fp8(x, bk)
        gate_up  = w8a8_block_fp8_matmul(x_q[t], w13[e], s_x[t], w13_scale[e]) + bias
                   (each K group's partial sum times s_x * s_w, added in fp32)
        act      = act(gate) * up (non-gated: act(up)), rounded to x.dtype
        a_q, s_a = per_token_group_quant_fp8(act, bk)
        y        = w8a8_block_fp8_matmul(a_q, w2[e], s_a, w2_scale[e]) + w2_bias[e]
    out[t] = sum_j topk_weights[t, j] * y (fp32), rounded once to x.dtype.
    lora: fused_moe's per-token LoRA on the unquantized inputs: gate_up += lora_delta(x[t])
    (after the bias), y += lora_delta(act) (act before its quantization)."""
    t, h = x.shape
    bn, bk = block_size
    bk13, bk2 = min(bk, h), min(bk, w2.shape[2])      # a block past the edge: the edge
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    x_q, s_x = per_token_group_quant_fp8(x, bk13)
    ids = topk_ids.long()
    for e in sorted({int(v) for v in ids.flatten().tolist()}):
        rows, slots = (ids == e).nonzero(as_tuple=True)          # (token, j) pairs
        gate_up = w8a8_block_fp8_matmul(x_q[rows], w13[e], s_x[rows], w13_scale[e],
                                        [bn, bk13], torch.float32)
        if w13_bias is not None:
            gate_up = gate_up + w13_bias[e].float()
        if lora is not None:
            gate_up += _expert_lora(x[rows], lora, e, rows, down=False)
        if gated:
            act = moe_gated_activation(gate_up, activation, alpha, limit).to(x.dtype)
        else:
            act = moe_activation(gate_up, activation).to(x.dtype)
        a_q, s_a = per_token_group_quant_fp8(act, bk2)
        y = w8a8_block_fp8_matmul(a_q, w2[e], s_a, w2_scale[e], [bn, bk2], torch.float32)
        if w2_bias is not None:
            y = y + w2_bias[e].float()
        if lora is not None:
            y += _expert_lora(act, lora, e, rows, down=True)
        out.index_add_(0, rows, y * topk_weights[rows, slots].float()[:, None])
    return out.to(x.dtype)


#: the 16 FP4 (e2m1) values by 4-bit code (bit 3 the sign; OCP MX's table)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4_experts(blocks: Tensor, scales: Tensor) -> Tensor:
    """Stacked MXFP4 experts (GPT-OSS's checkpoint format) blocks uint8 [E, N, K/32, 16]
    (32 FP4 e2m1 codes per block, two per byte: element 2b in byte b's low nibble, 2b + 1
    in its high nibble), scales uint8 [E, N, K/32] (E8M0: 2 ** (s - 127)) -> W [E, N, K]
    fp32: W[e, n, 32g + i] = FP4_E2M1[code] * 2 ** (scales[e, n, g] - 127), exact in fp32
    (bf16 too, short of its range's ends: transformers' ``convert_moe_packed_tensors``
    gives the same values)."""
    e, n, g, _ = blocks.shape
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()   # [E, N, G, 16, 2]
    values = lut[codes].reshape(e, n, g, 32)
    exps = scales.to(torch.int32) - 127
    return torch.ldexp(values, exps.unsqueeze(-1).float()).reshape(e, n, g * 32)


def fused_moe_mxfp4(x: Tensor, w13_blocks: Tensor, w13_scales: Tensor, w2_blocks: Tensor,
                    w2_scales: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                    lora: Sequence[Tensor] | None = None, activation: str = "silu",
                    gated: bool = True, w13_bias: Tensor | None = None,
                    w2_bias: Tensor | None = None, alpha: float = SWIGLUOAI_ALPHA,
                    limit: float = SWIGLUOAI_LIMIT) -> Tensor:
    """fused_moe with MXFP4 experts (W4A16): exactly ``fused_moe`` on the dequantized
    experts rounded to x.dtype (``dequantize_mxfp4_experts``, then one cast: exact for
    bf16 / fp32 short of their range's ends, and for fp16 while |W| is in [2^-24, 65504]),
    LoRA on the experts and the experts' biases included (dense, x.dtype). w13 [E, 2I, H/32, 16] / [E, 2I, H/32]
    (gate rows then up rows; gated=False: [E, I, ...], up rows only), w2
    [E, H, I/32, 16] / [E, H, I/32]."""
    return fused_moe(x, dequantize_mxfp4_experts(w13_blocks, w13_scales).to(x.dtype),
                     dequantize_mxfp4_experts(w2_blocks, w2_scales).to(x.dtype),
                     topk_weights, topk_ids,
                     lora, activation, gated, w13_bias, w2_bias, alpha, limit)


def moe_align_length(n: int, num_experts: int, block_size: int, pad_sorted_ids: bool) -> int:
    """Length of moe_align_block_size's sorted_token_ids for n pairs (vLLM's bound):
    n + E * (block_size - 1), rounded up to a multiple of block_size when pad_sorted_ids,
    and at most n * block_size (every pair alone in a block; the tighter bound for n < E).
    n may be a SymInt (the op's fake implementation)."""
    size = n + num_experts * (block_size - 1)
    if pad_sorted_ids:
        size = -(-size // block_size) * block_size
    return torch.sym_min(size, n * block_size)


def moe_align_block_size(topk_ids: Tensor, block_size: int, num_experts: int,
                         expert_map: Tensor | None = None, pad_sorted_ids: bool = False,
                         ignore_invalid_experts: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """vLLM's MoE alignment: the n = T*k pairs p = t * k + j of topk_ids [T, k] grouped by
    expert into block_size tiles for the grouped GEMMs.

    Returns (all int32):
      sorted_token_ids [S]: expert 0's pairs in increasing p, padded with the sentinel n to
          a multiple of block_size, then expert 1's, ...; the sentinel n after the last run.
          S = moe_align_length(n, E, block_size, pad_sorted_ids).
      expert_ids [ceil(S / block_size)]: the expert of each block; -1 from block
          num_tokens_post_pad / block_size on (vLLM's current kernels fill -1 there too;
          its default expert_map mode then indexes expert_map with that -1: not copied).
      num_tokens_post_pad [1]: the padded length actually used (sum of the runs).
    expert_map int [E] (global -> local expert id, -1 = not on this rank): by default every
    pair is placed by its global expert and a block's expert id is then mapped (blocks of
    other ranks' experts read -1); with ignore_invalid_experts the pairs are keyed by their
    local id and the pairs of experts mapped to -1 are left out. Ids outside [0, E) (only
    possible with index checks off) are left out too.
    """
    n = topk_ids.numel()
    dev = topk_ids.device
    size = moe_align_length(n, num_experts, block_size, pad_sorted_ids)
    keys = topk_ids.reshape(-1).long()
    placed = (keys >= 0) & (keys < num_experts)
    if expert_map is not None and ignore_invalid_experts:
        keys = expert_map.long()[keys.clamp(0, num_experts - 1)]
        placed &= (keys >= 0) & (keys < num_experts)
    keys = torch.where(placed, keys, num_experts)                 # E: not placed
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, keys, torch.ones_like(keys))                           # bincount, no host sync
    padded = (counts + block_size - 1) // block_size * block_size
    padded[num_experts] = 0
    end = torch.cumsum(padded, 0)
    start = end - padded
    order = torch.sort(keys, stable=True).indices                 # by expert, then by p
    expert_of = keys[order]
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[expert_of]
    dest = torch.where(expert_of < num_experts, start[expert_of] + rank, size)
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)                      # slot `size`: left out
    sorted_ids = sorted_ids[:size].clone()
    end = end[:num_experts]
    num_blocks = -(-size // block_size)
    blocks = torch.arange(num_blocks, device=dev)
    ex = torch.searchsorted(end // block_size, blocks, right=True)   # run holding block b
    if expert_map is not None and not ignore_invalid_experts:
        ex = expert_map.long()[ex.clamp(max=num_experts - 1)]
    expert_ids = torch.where(blocks < end[-1] // block_size, ex, -1).to(torch.int32)
    return sorted_ids, expert_ids, end[-1:].to(torch.int32)
