"""Int8Linear: a drop-in for nn.Linear running INT8 W8A8 (SmoothQuant-style, without
smoothing): an int8 weight with one scale per output channel, activations quantized per
token at run time (minikernels.ops.scaled_int8_quant + minikernels.ops.scaled_mm).

    lin8 = Int8Linear.from_linear(nn.Linear(4096, 4096))
    y = lin8(x)                      # x [..., K] fp16 / bf16 / fp32; y in x's dtype

An RMSNorm whose output only this linear reads can quantize it in the same launch
(``norm.quantize_for(lin8, torch.int8)``: the norm then returns a
:class:`~minikernels.nn.layers.QuantizedActivation`, which forward takes as is).

Buffers (all in state_dict, so torch.save / safetensors round-trip with load_state_dict):
weight int8 [N, K], weight_scale fp32 [N, 1] (W = weight * weight_scale: the layout of
compressed-tensors int8 W8A8 checkpoints), bias [N] or absent. Any in / out features work.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..quant.int8 import Int8Weight, quantize_int8
from ._quantized import bias_dtype, copy_buffers
from .layers import QuantizedActivation


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] stored as int8 x per-row scale,
    x quantized to int8 per token; exact int32 accumulation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_int8_weight(cls, weight: Int8Weight, bias: Tensor | None = None) -> Int8Linear:
        """Wrap an :class:`~minikernels.quant.int8.Int8Weight` (quantize_int8, or a
        checkpoint's via ``int8_from_checkpoint``)."""
        n, k = weight.shape
        mod = cls(k, n, bias=bias is not None, dtype=bias_dtype(bias),
                  device=weight.weight.device)
        return copy_buffers(mod, weight=weight.weight, weight_scale=weight.scale.reshape(n, 1),
                            bias=bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Per-channel symmetric RTN int8 of an nn.Linear (max |row| / 127)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls.from_int8_weight(quantize_int8(linear.weight.detach()), linear.bias)

    def int8_weight(self) -> Int8Weight:
        return Int8Weight(self.weight, self.weight_scale.reshape(-1))

    def dequantize(self) -> Tensor:
        """W [out_features, in_features] fp32."""
        return self.int8_weight().dequantize()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor | QuantizedActivation) -> Tensor:
        """x [..., K], or already quantized to int8 per token by the norm before it."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim ({x.shape[-1]}) must equal in_features "
                             f"({self.in_features})")
        if isinstance(x, QuantizedActivation):
            if x.q.dtype != torch.int8 or x.scales.shape[-1] != 1:
                raise ValueError("Int8Linear takes int8 activations with one scale per "
                                 f"token, got {x.q.dtype} with scales "
                                 f"{list(x.scales.shape)}")
            x_q, x_s = x.q, x.scales.reshape(-1, 1)
        else:
            x_q, x_s, _ = ops.scaled_int8_quant(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = ops.scaled_mm(x_q.reshape(-1, self.in_features), self.weight.t(), x_s,
                          self.weight_scale, x.dtype, bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, w8a8=int8")
