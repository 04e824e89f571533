"""Op family: RMSNorm and LayerNorm, each optionally fused with a residual add.

Ops: ``minikernels::rms_norm`` and ``minikernels::fused_add_rms_norm``, each with a
``weight_offset`` (0: Llama's ``x_normed * w``; 1: Gemma's ``x_normed * (1 + w)``).
Backends: reference, triton, cuda (csrc/rms_norm.cu, offset 0 only; auto prefers it on
CUDA once a GPU run has validated it, backend.CUDA_VALIDATED; until then opt-in). ``minikernels::layer_norm`` and ``minikernels::fused_add_layer_norm`` (StableLM,
StarCoder 2, ...; bias optional): reference, triton.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_finite_float, check_positive_float,
                           check_same_dtype, check_shape, check_tensor, last_dim_contiguous)
from . import _alloc, reference


def _cuda_ok(x: Tensor, weight: Tensor, weight_offset: float) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and \
        weight.dtype == x.dtype and weight_offset == 0.0


def _run_cuda(x: Tensor, weight: Tensor, eps: float,
              residual: Tensor | None) -> tuple[Tensor, Tensor | None]:
    ext = _backend.cuda_extension()
    n = x.shape[-1]
    y = _alloc.empty(x.shape, x.dtype, x.device)
    h = _alloc.empty(x.shape, x.dtype, x.device) if residual is not None else None
    ext.rms_norm(y.view(-1, n), x.reshape(-1, n), weight, float(eps),
                 residual.reshape(-1, n) if residual is not None else None,
                 h.view(-1, n) if h is not None else None,
                 torch.cuda.current_stream(x.device).cuda_stream)
    return y, h


@torch.library.custom_op("minikernels::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float = 0.0) -> Tensor:
    which = _backend.resolve("rms_norm", x.device,
                             cuda_ok=lambda: _cuda_ok(x, weight, weight_offset),
                             prefer_cuda=True)
    if which == "cuda":
        return _run_cuda(x, weight, eps, None)[0]
    if which == "triton":
        from .triton import norm
        return norm.rms_norm(x, weight, eps, weight_offset)
    return reference.rms_norm(x, weight, eps, weight_offset).contiguous()


@_rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float, weight_offset: float = 0.0) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("minikernels::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                        weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    which = _backend.resolve("rms_norm", x.device,
                             cuda_ok=lambda: _cuda_ok(x, weight, weight_offset),
                             prefer_cuda=True)
    if which == "cuda":
        y, h = _run_cuda(x, weight, eps, residual)
        return y, h  # type: ignore[return-value]
    if which == "triton":
        from .triton import norm
        return norm.fused_add_rms_norm(x, residual, weight, eps, weight_offset)
    y, h = reference.fused_add_rms_norm(x, residual, weight, eps, weight_offset)
    return y.contiguous(), h.contiguous()


@_fused_add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
      weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _check_input(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., H] fp16 / bf16 / fp32 (any strides) and weight [H] (any float dtype) on x's
    device; returns them with x's last dim and weight made contiguous."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    check_shape("weight", weight, [x.shape[-1]])
    return last_dim_contiguous(x), weight.contiguous()


def _check_residual(x: Tensor, residual: Tensor) -> Tensor:
    """The residual of the fused-add forms: x's shape, dtype and device (any strides);
    returns it with its last dim made contiguous."""
    check_tensor("residual", residual, device=x.device)
    check_same_dtype(("x", "residual"), (x, residual))
    check_shape("residual", residual, list(x.shape))
    return last_dim_contiguous(residual)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None,
             weight_offset: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim, optionally after adding a residual.

    x [..., H] fp16/bf16/fp32 (any strides); weight [H] (any float dtype);
    residual: like x or None. Returns y [..., H] in x.dtype, or with a residual the pair
    (rms_norm(x + residual), x + residual), the sum rounded to x.dtype (the next residual).
    y = x / sqrt(mean(x^2) + eps) * (weight + weight_offset), fp32 math, one rounding:
    weight_offset 0.0 is Llama's RMSNorm, 1.0 Gemma's (see :func:`gemma_rms_norm`).
    """
    x, weight = _check_input(x, weight)
    eps = check_positive_float("eps", eps)
    weight_offset = check_finite_float("weight_offset", weight_offset)
    if residual is None:
        return torch.ops.minikernels.rms_norm(x, weight, eps, weight_offset)
    residual = _check_residual(x, residual)
    return torch.ops.minikernels.fused_add_rms_norm(x, residual, weight, eps, weight_offset)


def gemma_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6,
                   residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Gemma's RMSNorm: y = x / sqrt(mean(x^2) + eps) * (1 + weight), fp32 math, rounded
    to x.dtype (transformers' ``GemmaRMSNorm``, FlashInfer's ``gemma_rmsnorm`` /
    ``gemma_fused_add_rmsnorm``). Shapes, dtypes and the residual form as
    :func:`rms_norm` (which this is, with ``weight_offset=1.0``)."""
    return rms_norm(x, weight, eps, residual=residual, weight_offset=1.0)


@torch.library.custom_op("minikernels::layer_norm", mutates_args=())
def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    if _backend.resolve("layer_norm", x.device) == "triton":
        from .triton import norm
        return norm.layer_norm(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps).contiguous()


@_layer_norm.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("minikernels::fused_add_layer_norm", mutates_args=())
def _fused_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None,
                          eps: float) -> tuple[Tensor, Tensor]:
    if _backend.resolve("layer_norm", x.device) == "triton":
        from .triton import norm
        return norm.fused_add_layer_norm(x, residual, weight, bias, eps)
    y, h = reference.fused_add_layer_norm(x, residual, weight, bias, eps)
    return y.contiguous(), h.contiguous()


@_fused_add_layer_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None,
      eps: float) -> tuple[Tensor, Tensor]:
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5,
               residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim (``nn.LayerNorm``'s math), optionally after adding a
    residual.

    x [..., H] fp16/bf16/fp32 (any strides); weight [H], bias [H] or None (any float
    dtypes); residual: like x or None. Returns y [..., H] in x.dtype, or with a residual
    the pair (layer_norm(x + residual), x + residual), the sum rounded to x.dtype.
    y = (x - mean) / sqrt(var + eps) * weight + bias with the biased variance, fp32
    math, one rounding.
    """
    x, weight = _check_input(x, weight)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
        check_shape("bias", bias, [x.shape[-1]])
        bias = bias.contiguous()
    eps = check_positive_float("eps", eps)
    if residual is None:
        return torch.ops.minikernels.layer_norm(x, weight, bias, eps)
    residual = _check_residual(x, residual)
    return torch.ops.minikernels.fused_add_layer_norm(x, residual, weight, bias, eps)
