"""Op family: gated activations (SwiGLU / GeGLU MLPs) and pointwise GELU variants.

Ops: ``minikernels::silu_and_mul``, ``minikernels::gelu_and_mul`` (vLLM's and FlashInfer's
``silu_and_mul`` / ``gelu_and_mul`` / ``gelu_tanh_and_mul``), ``minikernels::
fatrelu_and_mul`` (ProSparse / MiniCPM-S), ``minikernels::swigluoai_and_mul`` (GPT-OSS's
clamped SwiGLU over interleaved gate / up columns), ``minikernels::gelu_variant``
(``gelu_fast`` / ``gelu_new`` / ``gelu_quick``), vLLM's names and layouts. Math in fp32,
one rounding to x.dtype. Backends: reference, triton (ops/triton/activation.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

import math

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor, last_dim_contiguous
from . import reference

GELU_APPROXIMATIONS = ("none", "tanh")
GELU_VARIANTS = reference.GELU_VARIANTS


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


@torch.library.custom_op("minikernels::fatrelu_and_mul", mutates_args=())
def _fatrelu_and_mul(x: Tensor, threshold: float) -> Tensor:
    if _backend.resolve("fatrelu_and_mul", x.device) == "triton":
        from .triton import activation
        return activation.gated_activation(x, "fatrelu", threshold)
    return reference.fatrelu_and_mul(x, threshold).contiguous()


@_fatrelu_and_mul.register_fake
def _(x: Tensor, threshold: float) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("minikernels::swigluoai_and_mul", mutates_args=())
def _swigluoai_and_mul(x: Tensor, alpha: float, limit: float) -> Tensor:
    if _backend.resolve("swigluoai_and_mul", x.device) == "triton":
        from .triton import activation
        return activation.gated_activation(x, "swigluoai", alpha, limit)
    return reference.swigluoai_and_mul(x, alpha, limit).contiguous()


@_swigluoai_and_mul.register_fake
def _(x: Tensor, alpha: float, limit: float) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("minikernels::gelu_variant", mutates_args=())
def _gelu_variant(x: Tensor, kind: str) -> Tensor:
    if _backend.resolve("gelu_variant", x.device) == "triton":
        from .triton import activation
        return activation.pointwise_activation(x, kind)
    return reference.gelu_variant(x, kind).contiguous()


@_gelu_variant.register_fake
def _(x: Tensor, kind: str) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _finite(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def fatrelu_and_mul(x: Tensor, threshold: float = 0.0) -> Tensor:
    """x [..., 2I] fp16/bf16/fp32 (gate first, then up) -> fatrelu(gate) * up, [..., I];
    fatrelu(g) = g where g > threshold, else 0 (vLLM's ``fatrelu_and_mul``)."""
    return torch.ops.minikernels.fatrelu_and_mul(_check_gated(x),
                                                 _finite("threshold", threshold))


def swigluoai_and_mul(x: Tensor, alpha: float = reference.SWIGLUOAI_ALPHA,
                      limit: float = reference.SWIGLUOAI_LIMIT) -> Tensor:
    """x [..., 2I] fp16/bf16/fp32 with gate and up INTERLEAVED (gate = x[..., 0::2], up =
    x[..., 1::2]: GPT-OSS's checkpoint layout, vLLM's ``swigluoai_and_mul``) -> [..., I]:
    g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha * g).
    Defaults: GPT-OSS's alpha 1.702, limit 7.0 (limit > 0)."""
    alpha, limit = _finite("alpha", alpha), _finite("limit", limit)
    if limit <= 0:
        raise ValueError(f"limit must be > 0 (up is clamped to [-limit, limit]), got {limit}")
    return torch.ops.minikernels.swigluoai_and_mul(_check_gated(x), alpha, limit)


def gelu_variant(x: Tensor, kind: str) -> Tensor:
    """Elementwise GELU variant of x (fp16/bf16/fp32, any shape) -> contiguous, x.dtype:
    "gelu_new" / "gelu_fast" (tanh approximation, GPT-2's), "gelu_quick" (x sigmoid(1.702
    x), CLIP's); see reference.gelu_variant."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if kind not in GELU_VARIANTS:
        raise ValueError(f"kind must be one of {GELU_VARIANTS}, got {kind!r}")
    return torch.ops.minikernels.gelu_variant(last_dim_contiguous(x), kind)


def gelu_fast(x: Tensor) -> Tensor:
    """vLLM's ``gelu_fast``: 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2)))."""
    return gelu_variant(x, "gelu_fast")


def gelu_new(x: Tensor) -> Tensor:
    """vLLM's ``gelu_new`` (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return gelu_variant(x, "gelu_new")


def gelu_quick(x: Tensor) -> Tensor:
    """vLLM's ``gelu_quick`` (CLIP's QuickGELU): x sigmoid(1.702 x)."""
    return gelu_variant(x, "gelu_quick")
