"""Fp8Linear: a drop-in for nn.Linear with an fp8 (e4m3) weight and block-wise scales
(W8A16, minikernels.ops.fp8_matmul).

    lin8 = Fp8Linear.from_linear(nn.Linear(4096, 4096), block_size=(128, 128))
    y = lin8(x)                      # x [..., K] fp16 / bf16 / fp32; y in x's dtype

Buffers (all in state_dict, so torch.save / safetensors round-trip with load_state_dict):
weight float8_e4m3fn [N, K], weight_scale fp32 [ceil(N/bn), ceil(K/bk)] (W = weight *
weight_scale[n // bn, k // bk]: the layout of DeepSeek-V3 / Qwen3-FP8 checkpoints, whose
``weight_scale_inv`` it is), bias [N] or absent. Any in / out features work.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..quant.fp8 import Fp8Weight, quantize_fp8
from ._quantized import bias_dtype, copy_buffers


class Fp8Linear(nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] stored as e4m3 + block scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size: Sequence[int] = (128, 128), dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        bn, bk = (int(b) for b in block_size)
        if bn <= 0 or bk <= 0 or (bk % 16 and bk < in_features):
            raise ValueError(f"block_size must be positive with bk a multiple of 16 or >= "
                             f"in_features ({in_features}), got {tuple(block_size)}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = (bn, bk)
        self.register_buffer("weight", torch.zeros(out_features, in_features,
                                                   dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones(
            -(-out_features // bn), -(-in_features // bk), dtype=torch.float32,
            device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_fp8_weight(cls, weight: Fp8Weight, bias: Tensor | None = None) -> Fp8Linear:
        """Wrap an :class:`~minikernels.quant.fp8.Fp8Weight` (quantize_fp8, or a
        checkpoint's via ``fp8_from_checkpoint``)."""
        n, k = weight.shape
        mod = cls(k, n, bias=bias is not None, block_size=weight.block_size,
                  dtype=bias_dtype(bias), device=weight.weight.device)
        return copy_buffers(mod, weight=weight.weight, weight_scale=weight.scale, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear,
                    block_size: Sequence[int] = (128, 128)) -> Fp8Linear:
        """Block-wise RTN fp8 of an nn.Linear (amax / 448 per block)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = quantize_fp8(linear.weight.detach(), tuple(block_size))
        return cls.from_fp8_weight(w, linear.bias)

    def fp8_weight(self) -> Fp8Weight:
        return Fp8Weight(self.weight, self.weight_scale, self.block_size)

    def dequantize(self) -> Tensor:
        """W [out_features, in_features] fp32."""
        return self.fp8_weight().dequantize()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.fp8_matmul(x, self.weight, self.weight_scale, self.block_size, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={list(self.block_size)}")
