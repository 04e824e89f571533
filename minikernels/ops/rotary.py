"""Op family: rotary position embedding (neox or GPT-J style) and its cos/sin cache builder.

Op: ``minikernels::rotary_embedding``. Backends: reference, triton.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_index_range, check_tensor,
                           last_dim_contiguous)
from . import reference


def _llama3_inv_freq(inv_freq: Tensor, scaling: Mapping[str, Any]) -> Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept,
    the band between interpolated smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: Tensor, rotary_dim: int, base: float, max_position: int,
                   scaling: Mapping[str, Any]) -> tuple[Tensor, float]:
    """YaRN (Qwen2.5 / Qwen3 long context): per-frequency blend of the original
    (extrapolated) and the ``factor``-interpolated frequencies, by a linear ramp between
    the dims that rotate ``beta_fast`` and ``beta_slow`` times over the original context;
    cos / sin times ``attention_factor`` (default 0.1 ln(factor) + 1, or the
    mscale / mscale_all_dim ratio). Returns (inv_freq, attention factor)."""
    original = float(scaling.get("original_max_position_embeddings") or max_position)
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else max_position / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all \
            else mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp            # 1: the original frequency (high-frequency dims)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def _longrope_inv_freq(inv_freq: Tensor, max_position: int, scaling: Mapping[str, Any]
                       ) -> tuple[Tensor, float]:
    """LongRoPE (Phi-3 / Phi-3.5 / Phi-4-mini): each frequency divided by its own
    rescale factor, ``long_factor`` when the model's context (``max_position``) exceeds
    ``original_max_position_embeddings`` (as vLLM does at its default max_model_len),
    else ``short_factor``; cos / sin times sqrt(1 + ln(s) / ln(original)), s =
    max_position / original (or ``attention_factor``). Returns (inv_freq, factor)."""
    original = int(scaling["original_max_position_embeddings"])
    ext = scaling["long_factor"] if max_position > original else scaling["short_factor"]
    ext = torch.tensor([float(x) for x in ext], dtype=torch.float32)
    if ext.shape != inv_freq.shape:
        raise ValueError(f"longrope factors must have rotary_dim / 2 = {inv_freq.numel()} "
                         f"entries, got {ext.numel()}")
    attention = scaling.get("attention_factor")
    if attention is None:
        factor = scaling.get("factor")
        s = float(factor) if factor is not None else max_position / original
        attention = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))
    return 1.0 / (ext * (1.0 / inv_freq)), float(attention)


def build_rope_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                     rope_scaling: Mapping[str, Any] | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """The cos/sin cache for :func:`rotary_embedding`: fp32 [max_position, rotary_dim].

    Row p is cat(cos(p * inv_freq), sin(p * inv_freq)) * attention_factor with
    inv_freq[i] = base ** (-2i / rotary_dim). ``rope_scaling`` is a HF config's dict:
    None / {"rope_type": "default"}, {"rope_type": "linear", "factor": f} (positions / f),
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1/3.2), {"rope_type": "yarn", "factor",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor", "truncate"} or {"rope_type": "longrope" (or
    "su"), "short_factor", "long_factor", "original_max_position_embeddings",
    "attention_factor"} or {"rope_type": "proportional", "partial_rotary_factor",
    "factor"} (Gemma 4 / LFM3: pairs past the factor's share do not turn) (transformers' formulas; the attention factor scales cos and sin,
    so q . k by its square). ``max_position`` is the model's context length
    (max_position_embeddings: YaRN's and LongRoPE's default factor derive from it).
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    positions = torch.arange(max_position, dtype=torch.float32)
    attention = 1.0
    kind = "default"
    if rope_scaling:
        kind = str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)  # type: ignore[arg-type]
    elif kind == "linear":
        positions = positions / float(rope_scaling["factor"])  # type: ignore[index]
    elif kind == "yarn":
        inv_freq, attention = _yarn_inv_freq(inv_freq, rotary_dim, base, max_position,
                                             rope_scaling)  # type: ignore[arg-type]
    elif kind in ("longrope", "su"):
        inv_freq, attention = _longrope_inv_freq(inv_freq, max_position,
                                                 rope_scaling)  # type: ignore[arg-type]
    elif kind == "proportional":
        # Gemma 4 / LFM3: the first partial_rotary_factor share of the frequency pairs turn
        # at the full dim's frequencies, the rest not at all (cos 1, sin 0), positions / factor
        turning = int(float(rope_scaling.get("partial_rotary_factor", 1.0))  # type: ignore
                      * rotary_dim // 2)
        inv_freq = inv_freq.clone()
        inv_freq[turning:] = 0.0
        inv_freq = inv_freq / float(rope_scaling.get("factor", 1.0))  # type: ignore[union-attr]
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    freqs = torch.outer(positions, inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    if attention != 1.0:
        cache = cache * attention
    return cache.to(device)


#: rope_scaling types build_rope_cache implements.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "su", "proportional")


@torch.library.custom_op("minikernels::rotary_embedding", mutates_args=())
def _rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                      is_neox_style: bool = True) -> tuple[Tensor, Tensor]:
    if _backend.resolve("rotary_embedding", q.device) == "triton":
        from .triton import rotary
        # the kernel reads positions[token] flat: a strided view gets a compact copy
        return rotary.rotary_embedding(q, k, positions.contiguous(), cos_sin_cache,
                                       is_neox_style)
    qo, ko = reference.rotary_embedding(q, k, positions, cos_sin_cache, is_neox_style)
    return qo.contiguous(), ko.contiguous()


@_rotary_embedding.register_fake
def _(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
      is_neox_style: bool = True) -> tuple[Tensor, Tensor]:
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                     is_neox_style: bool = True) -> tuple[Tensor, Tensor]:
    """Apply rotary embedding to q and k; returns new (q, k).

    q [..., Hq, D], k [..., Hkv, D] (fp16/bf16/fp32, same dtype, any strides);
    positions int32/int64 with shape q.shape[:-2]; cos_sin_cache [max_position, rot_dim]
    (see :func:`build_rope_cache`), rot_dim even and <= D: the first rot_dim dims of each
    head are rotated, the rest pass through. Outputs are contiguous, shaped like q and k.
    ``is_neox_style`` (vLLM's name; FlashInfer's ``interleave`` is its negation) picks the
    pairs that rotate together by (cache[pos, i], cache[pos, rot_dim/2 + i]):
    True (neox, Llama/Qwen): dims (i, rot_dim/2 + i); False (GPT-J, interleaved):
    dims (2i, 2i + 1). See :func:`minikernels.ops.reference.rotary_embedding`.
    """
    if not isinstance(is_neox_style, bool):
        raise TypeError(f"is_neox_style must be a bool, got {type(is_neox_style).__name__}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("k", k, dtypes=(q.dtype,), min_ndim=2, device=q.device)
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), device=q.device)
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2, device=q.device)
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have shape [{', '.join(map(str, lead))}, Hkv, "
                         f"{q.shape[-1]}] to match q {list(q.shape)}, got {list(k.shape)}")
    if positions.shape != lead:
        raise ValueError(f"positions must have shape {list(lead)} (q.shape[:-2]), got "
                         f"{list(positions.shape)}")
    rot = cos_sin_cache.shape[-1]
    if rot % 2 or rot > q.shape[-1] or rot == 0:
        raise ValueError(f"cos_sin_cache last dim (rot_dim) must be even and <= head dim "
                         f"{q.shape[-1]}, got {rot}")
    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k)
    check_index_range("positions", positions, 0, cos_sin_cache.shape[0])
    cos_sin_cache = cos_sin_cache.contiguous()
    q3 = q.reshape(-1, *q.shape[-2:])
    k3 = k.reshape(-1, *k.shape[-2:])
    qo, ko = torch.ops.minikernels.rotary_embedding(q3, k3, positions.reshape(-1),
                                                    cos_sin_cache, is_neox_style)
    return qo.view(q.shape), ko.view(k.shape)
