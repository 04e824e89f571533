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


def build_rope_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                     rope_scaling: Mapping[str, Any] | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """The cos/sin cache for :func:`rotary_embedding`: fp32 [max_position, rotary_dim].

    Row p is cat(cos(p * inv_freq), sin(p * inv_freq)) with
    inv_freq[i] = base ** (-2i / rotary_dim). ``rope_scaling`` is a HF config's dict:
    None / {"rope_type": "default"}, {"rope_type": "linear", "factor": f} (positions / f) or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1/3.2).
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    positions = torch.arange(max_position, dtype=torch.float32)
    kind = "default"
    if rope_scaling:
        kind = str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)  # type: ignore[arg-type]
    elif kind == "linear":
        positions = positions / float(rope_scaling["factor"])  # type: ignore[index]
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported "
                         "(supported: default, linear, llama3)")
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


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
