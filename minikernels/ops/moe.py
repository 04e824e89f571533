"""Op family: mixture of experts. Op: ``minikernels::fused_moe`` (each token through its
top-k experts' gated MLPs, weighted and summed: the MLP of Qwen3-MoE, OLMoE, Mixtral,
Granite-MoE). Backends: reference (ops/reference.py), triton (ops/triton/moe.py).
Tests: tests/test_moe_op.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_index_range, check_tensor
from . import reference


@torch.library.custom_op("minikernels::fused_moe", mutates_args=())
def _fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
               topk_ids: Tensor) -> Tensor:
    if _backend.resolve("fused_moe", x.device) == "triton":
        from .triton import moe as triton_moe
        return triton_moe.fused_moe(x, w13, w2, topk_weights, topk_ids)
    return reference.fused_moe(x, w13, w2, topk_weights, topk_ids)


@_fused_moe.register_fake
def _(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor,
              topk_ids: Tensor) -> Tensor:
    """A mixture-of-experts MLP with SiLU-gated experts: out [T, H] in x.dtype,
    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t]))
    with e = topk_ids[t, j].

    x [T, H] fp16/bf16/fp32; w13 [E, 2I, H] in x's dtype (each expert's gate_proj rows,
    then its up_proj rows); w2 [E, H, I] in x's dtype (down_proj); topk_weights [T, k]
    fp32 (the router's weights, already normalized as the model wants); topk_ids [T, k]
    int32/int64 in [0, E) (the same expert twice in a row is allowed: both count). Every
    tensor may be a view with its own strides. fp32 accumulation; the activated [I]
    intermediate is rounded to x.dtype; out is rounded once.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("w13", w13, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("w2", w2, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                 device=x.device)
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2,
                 device=x.device)
    e, two_i, h = w13.shape
    if h != x.shape[1]:
        raise ValueError(f"w13 must have shape [E, 2I, H = {x.shape[1]}], got "
                         f"{list(w13.shape)}")
    if two_i == 0 or two_i % 2:
        raise ValueError(f"w13's second dim must be 2I > 0 (gate rows then up rows), got "
                         f"{two_i}")
    if tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w2 must have shape [E = {e}, H = {h}, I = {two_i // 2}], got "
                         f"{list(w2.shape)}")
    if topk_ids.shape[0] != x.shape[0] or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T = {x.shape[0]}, k >= 1], got "
                         f"{list(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {list(topk_ids.shape)}, "
                         f"got {list(topk_weights.shape)}")
    if topk_ids.numel():
        check_index_range("topk_ids", topk_ids, 0, e)
    return torch.ops.minikernels.fused_moe(x, w13, w2, topk_weights, topk_ids)
