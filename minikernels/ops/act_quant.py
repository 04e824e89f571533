"""Op family: a gated activation (SwiGLU / GeGLU) fused with int8 / fp8 quantization of its
output (the input of a W8A8 MLP's down projection).

Op: ``minikernels::act_and_mul_quant``. One launch replaces ``silu_and_mul`` /
``gelu_and_mul`` followed by ``scaled_int8_quant`` / ``per_token_group_quant_fp8`` / a
static fp8 quantization, with the same values (the activation's output is rounded to x's
dtype, then quantized), or quantizes the fp32 product directly (``round_to_input=False``:
vLLM's ``silu_and_mul_per_block_quant``). Exact math:
:func:`minikernels.ops.reference.act_and_mul_quant`. Backends: reference; triton
(ops/triton/act_quant.py). float8_e4m3fn output needs sm_89+ on CUDA: below it the
reference path runs (warned once).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_tensor
from . import reference
from .norm_quant import check_quant_scales, quant_backend

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@torch.library.custom_op("minikernels::act_and_mul_quant", mutates_args=())
def _act_and_mul_quant(x: Tensor, activation: str, quant_dtype: torch.dtype,
                       scale: Tensor | None, group_size: int, scale_ub: Tensor | None,
                       min_scale: float, round_to_input: bool) -> tuple[Tensor, Tensor]:
    if x.shape[1] and quant_backend("act_and_mul_quant", x.device, quant_dtype) == "triton":
        from .triton import act_quant
        return act_quant.act_and_mul_quant(x, activation, quant_dtype, scale, group_size,
                                           scale_ub, min_scale, round_to_input)
    q, s = reference.act_and_mul_quant(x, activation, quant_dtype, scale, group_size,
                                       scale_ub, min_scale, round_to_input)
    return q.contiguous(), s.contiguous()


@_act_and_mul_quant.register_fake
def _(x: Tensor, activation: str, quant_dtype: torch.dtype, scale: Tensor | None,
      group_size: int, scale_ub: Tensor | None, min_scale: float,
      round_to_input: bool) -> tuple[Tensor, Tensor]:
    t, inter = x.shape[0], x.shape[1] // 2
    groups = 1 if group_size == 0 else inter // group_size
    return (x.new_empty((t, inter), dtype=quant_dtype),
            x.new_empty((0,) if scale is not None else (t, groups), dtype=torch.float32))


def act_and_mul_quant(x: Tensor, quant_dtype: torch.dtype = torch.int8,
                      activation: str = "silu", *, scale: Tensor | None = None,
                      group_size: int | None = None, scale_ub: Tensor | None = None,
                      min_scale: float | None = None, round_to_input: bool = True
                      ) -> tuple[Tensor, Tensor]:
    """y = act(x[..., :I]) * x[..., I:] quantized to int8 or float8_e4m3fn, in one pass.

    x [..., 2I] fp16/bf16/fp32 (gate, then up), any strides; activation "silu" (SwiGLU),
    "gelu" (erf) or "gelu_tanh"; quant_dtype torch.int8 or torch.float8_e4m3fn. Scales
    (fp32), as :func:`minikernels.ops.rms_norm_quant`: a static ``scale`` (1 element),
    one per token (group_size None / 0; [..., 1]) or per token and group_size columns of
    the I outputs ([..., I / g]); scale_ub and min_scale (default: the unfused quantizer's
    floor) for dynamic scales. round_to_input (default): y rounded to x's dtype first,
    so the result equals ``silu_and_mul`` / ``gelu_and_mul`` then ``scaled_int8_quant`` /
    ``per_token_group_quant_fp8``; False quantizes the fp32 product (vLLM's fused op).
    Returns (q [..., I] quant_dtype, scales; a static scale comes back as given).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x last dim must be even (gate and up halves), got {x.shape[-1]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(round_to_input, bool):
        raise TypeError(f"round_to_input must be a bool, got {type(round_to_input).__name__}")
    inter = x.shape[-1] // 2
    lead = x.shape[:-1]
    static, group, ub, min_scale = check_quant_scales(
        quant_dtype, scale, group_size, scale_ub, min_scale, inter, x.device,
        "the output width I = x's last dim / 2")
    q, s = torch.ops.minikernels.act_and_mul_quant(
        x.reshape(math.prod(lead), 2 * inter), activation, quant_dtype, static, group, ub,
        min_scale, round_to_input)
    return q.view(*lead, inter), scale if scale is not None else s.view(*lead, s.shape[-1])
