"""Op family: gated activations (SwiGLU / GeGLU MLPs).

Ops: ``minikernels::silu_and_mul``, ``minikernels::gelu_and_mul`` (vLLM's and FlashInfer's
``silu_and_mul`` / ``gelu_and_mul`` / ``gelu_tanh_and_mul``). Backends: reference, triton.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor, last_dim_contiguous
from . import reference

GELU_APPROXIMATIONS = ("none", "tanh")


@torch.library.custom_op("minikernels::silu_and_mul", mutates_args=())
def _silu_and_mul(x: Tensor) -> Tensor:
    if _backend.resolve("silu_and_mul", x.device) == "triton":
        from .triton import activation
        return activation.gated_activation(x, "silu")
    return reference.silu_and_mul(x).contiguous()


@_silu_and_mul.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("minikernels::gelu_and_mul", mutates_args=())
def _gelu_and_mul(x: Tensor, approximate: str) -> Tensor:
    if _backend.resolve("gelu_and_mul", x.device) == "triton":
        from .triton import activation
        return activation.gated_activation(x, "gelu_tanh" if approximate == "tanh" else "gelu")
    return reference.gelu_and_mul(x, approximate).contiguous()


@_gelu_and_mul.register_fake
def _(x: Tensor, approximate: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _check_gated(x: Tensor) -> Tensor:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x last dim must be even (gate and up halves), got {x.shape[-1]}")
    return last_dim_contiguous(x)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [..., 2I] fp16/bf16/fp32 (gate first, then up) -> silu(gate) * up, [..., I]."""
    return torch.ops.minikernels.silu_and_mul(_check_gated(x))


def gelu_and_mul(x: Tensor, approximate: str = "none") -> Tensor:
    """x [..., 2I] fp16/bf16/fp32 (gate first, then up) -> gelu(gate) * up, [..., I] (GeGLU).

    ``approximate`` as in ``torch.nn.functional.gelu``: "none" (erf, exact) or "tanh"
    (Gemma's ``gelu_pytorch_tanh``). Math in fp32, output in x.dtype (contiguous).
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got "
                         f"{approximate!r}")
    return torch.ops.minikernels.gelu_and_mul(_check_gated(x), approximate)


def gelu_tanh_and_mul(x: Tensor) -> Tensor:
    """``gelu_and_mul(x, approximate="tanh")`` (FlashInfer's / vLLM's name)."""
    return gelu_and_mul(x, "tanh")
