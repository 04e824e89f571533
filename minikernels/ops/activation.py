"""Op family: gated activations. Op: ``minikernels::silu_and_mul``. Backends: reference, triton."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor, last_dim_contiguous
from . import reference


@torch.library.custom_op("minikernels::silu_and_mul", mutates_args=())
def _silu_and_mul(x: Tensor) -> Tensor:
    if _backend.resolve("silu_and_mul", x.device) == "triton":
        from .triton import activation
        return activation.silu_and_mul(x)
    return reference.silu_and_mul(x).contiguous()


@_silu_and_mul.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def silu_and_mul(x: Tensor) -> Tensor:
    """x [..., 2I] fp16/bf16/fp32 (gate first, then up) -> silu(gate) * up, [..., I]."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x last dim must be even (gate and up halves), got {x.shape[-1]}")
    x = last_dim_contiguous(x)
    return torch.ops.minikernels.silu_and_mul(x)
