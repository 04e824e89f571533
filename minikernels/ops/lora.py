"""Op family: LoRA. Op: ``minikernels::lora_delta`` (punica's BGMV: each token through
its own adapter, shrink then expand), what a batch that mixes LoRA adapters adds to a
linear layer's output. Backends: reference, triton (ops/triton/lora.py).
Tests: tests/test_lora_op.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_index_range, check_tensor
from . import reference


@torch.library.custom_op("minikernels::lora_delta", mutates_args=())
def _lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, token_slots: Tensor,
                scaling: Tensor) -> Tensor:
    if _backend.resolve("lora_delta", x.device) == "triton":
        from .triton import lora as triton_lora
        return triton_lora.lora_delta(x, lora_a, lora_b, token_slots, scaling)
    return reference.lora_delta(x, lora_a, lora_b, token_slots, scaling)


@_lora_delta.register_fake
def _(x: Tensor, lora_a: Tensor, lora_b: Tensor, token_slots: Tensor,
      scaling: Tensor) -> Tensor:
    return torch.empty((x.shape[0], lora_b.shape[1]), dtype=x.dtype, device=x.device)


def lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, token_slots: Tensor,
               scaling: Tensor) -> Tensor:
    """The LoRA update of each token: y [T, N] in x.dtype,
    y[t] = scaling[s] * lora_b[s] @ (lora_a[s] @ x[t]) with s = token_slots[t], and 0 for
    tokens whose slot is -1 (no adapter).

    x [T, K] fp16/bf16/fp32; lora_a [S, R, K] and lora_b [S, N, R] in x's dtype (S adapter
    slots of rank R; a smaller adapter is zero-padded to R); token_slots int32/int64 [T]
    in [-1, S); scaling fp32 [S] (lora_alpha / r, or / sqrt(r) for rsLoRA). Every tensor
    may be a view with its own strides. fp32 accumulation; the rank-R intermediate is
    not rounded; y is rounded once.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("lora_a", lora_a, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("lora_b", lora_b, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("token_slots", token_slots, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=x.device)
    check_tensor("scaling", scaling, dtypes=(torch.float32,), ndim=1, device=x.device)
    s, r, k = lora_a.shape
    if k != x.shape[1]:
        raise ValueError(f"lora_a must have shape [S, R, K = {x.shape[1]}], got "
                         f"{list(lora_a.shape)}")
    if lora_b.shape[0] != s or lora_b.shape[2] != r:
        raise ValueError(f"lora_b must have shape [S = {s}, N, R = {r}], got "
                         f"{list(lora_b.shape)}")
    if token_slots.shape[0] != x.shape[0]:
        raise ValueError(f"token_slots must have one entry per token ({x.shape[0]}), got "
                         f"{token_slots.shape[0]}")
    if scaling.shape[0] != s:
        raise ValueError(f"scaling must have one entry per slot ({s}), got "
                         f"{scaling.shape[0]}")
    if token_slots.numel():
        check_index_range("token_slots", token_slots, -1, s)
    return torch.ops.minikernels.lora_delta(x, lora_a, lora_b, token_slots, scaling)
