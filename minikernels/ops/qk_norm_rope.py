"""Op family: per-head RMSNorm of q and k fused with rotary embedding.

Op: ``minikernels::qk_norm_rope`` (Qwen3's, Gemma 3's and OLMoE-style attention: q_norm /
k_norm over each head, then RoPE). Backends: reference, triton. One launch reads q and k
once and writes the rotated, normalized heads; the unfused path is three (q's norm, k's
norm, rotary) plus the copies that make their inputs contiguous. vLLM's
``fused_qk_norm_rope`` maps onto it (minikernels.compat.vllm_ops).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_finite_float, check_index_range,
                           check_positive_float, check_shape, check_tensor,
                           last_dim_contiguous)
from . import reference


@torch.library.custom_op("minikernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                  positions: Tensor, cos_sin_cache: Tensor, eps: float,
                  is_neox_style: bool = True, weight_offset: float = 0.0,
                  vllm_rounding: bool = False) -> tuple[Tensor, Tensor]:
    if _backend.resolve("qk_norm_rope", q.device) == "triton":
        from .triton import qk_norm_rope as kernel
        return kernel.qk_norm_rope(q, k, q_weight, k_weight, positions.contiguous(),
                                   cos_sin_cache, eps, is_neox_style, weight_offset,
                                   vllm_rounding)
    qo, ko = reference.qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache, eps,
                                    is_neox_style, weight_offset, vllm_rounding)
    return qo.contiguous(), ko.contiguous()


@_qk_norm_rope.register_fake
def _(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
      positions: Tensor, cos_sin_cache: Tensor, eps: float, is_neox_style: bool = True,
      weight_offset: float = 0.0, vllm_rounding: bool = False) -> tuple[Tensor, Tensor]:
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def _check_weight(name: str, w: Tensor | None, head_dim: int, device: torch.device
                  ) -> Tensor | None:
    if w is None:
        return None
    check_tensor(name, w, dtypes=FLOAT_DTYPES, ndim=1, device=device)
    check_shape(name, w, [head_dim])
    return w.contiguous()


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                 positions: Tensor, cos_sin_cache: Tensor, eps: float = 1e-6,
                 is_neox_style: bool = True, weight_offset: float = 0.0,
                 vllm_rounding: bool = False) -> tuple[Tensor, Tensor]:
    """RMSNorm over each head of q and k, then rotary embedding; returns new (q, k).

    q [..., Hq, D], k [..., Hkv, D]: fp16 / bf16 / fp32, one dtype, any strides (e.g. the
    q and k columns of a fused qkv projection viewed per head); q_weight / k_weight [D]
    (any float dtype; None: no weight); positions int32 / int64 with shape q.shape[:-2];
    cos_sin_cache [max_position, rot_dim] (:func:`minikernels.ops.build_rope_cache`), rot_dim
    even and <= D. Outputs are contiguous, shaped and typed like q and k.

    Per head: y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset) in fp32, rounded to
    the dtype (weight_offset 1.0: Gemma's ``1 + weight``), then the first rot_dim dims
    rotate as :func:`minikernels.ops.rotary_embedding` (``is_neox_style`` True: pairs (i,
    rot_dim/2 + i); False: GPT-J's (2i, 2i + 1)) and are rounded once more. The result is
    ``rotary_embedding(rms_norm(q, q_weight), rms_norm(k, k_weight))``
    (:func:`minikernels.ops.reference.qk_norm_rope`). ``vllm_rounding=True`` computes what
    vLLM's fused_qk_norm_rope kernel does instead: the normalized value is not rounded
    before the rotation (one rounding in all).
    """
    for name, flag in (("is_neox_style", is_neox_style), ("vllm_rounding", vllm_rounding)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("k", k, dtypes=(q.dtype,), min_ndim=2, device=q.device)
    lead, d = q.shape[:-2], q.shape[-1]
    if k.shape[:-2] != lead or k.shape[-1] != d:
        raise ValueError(f"k must have shape [{', '.join(map(str, lead))}, Hkv, {d}] to "
                         f"match q {list(q.shape)}, got {list(k.shape)}")
    q_weight = _check_weight("q_weight", q_weight, d, q.device)
    k_weight = _check_weight("k_weight", k_weight, d, q.device)
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), device=q.device)
    if positions.shape != lead:
        raise ValueError(f"positions must have shape {list(lead)} (q.shape[:-2]), got "
                         f"{list(positions.shape)}")
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2, device=q.device)
    rot = cos_sin_cache.shape[-1]
    if rot % 2 or rot > d or rot == 0:
        raise ValueError(f"cos_sin_cache last dim (rot_dim) must be even and <= head dim "
                         f"{d}, got {rot}")
    eps = check_positive_float("eps", eps)
    weight_offset = check_finite_float("weight_offset", weight_offset)
    check_index_range("positions", positions, 0, cos_sin_cache.shape[0])
    q3 = last_dim_contiguous(q).reshape(-1, *q.shape[-2:])
    k3 = last_dim_contiguous(k).reshape(-1, *k.shape[-2:])
    qo, ko = torch.ops.minikernels.qk_norm_rope(
        q3, k3, q_weight, k_weight, positions.reshape(-1), cos_sin_cache.contiguous(), eps,
        is_neox_style, weight_offset, vllm_rounding)
    return qo.view(q.shape), ko.view(k.shape)
