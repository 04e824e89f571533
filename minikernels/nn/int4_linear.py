"""Int4Linear: a drop-in for nn.Linear with an int4 weight (W4A16, minikernels.ops.int4_matmul).

    lin4 = Int4Linear.from_linear(nn.Linear(4096, 4096), group_size=128)
    y = lin4(x)                      # x [..., K] fp16/bf16 (other dtypes are cast in/out)

Buffers (all in state_dict, so torch.save / safetensors round-trip with load_state_dict):
qweight int32 [N, K/8], scales and zeros [N, K/G] (fp16/bf16), bias [N] or absent, and
perm int64 [K] for act-order GPTQ weights (x[..., perm] feeds the kernel). The layout is
the canonical one (docs/int4_format.md); no backend repacks it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..quant import Int4Weight, quantize_int4
from ._quantized import copy_buffers


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] stored as group-wise int4."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, act_order: bool = False) -> None:
        super().__init__()
        if in_features % 8 or out_features % 8:
            raise ValueError(f"in_features ({in_features}) and out_features ({out_features}) "
                             "must be multiples of 8")
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size must be -1 or divide in_features ({in_features}), "
                             f"got {group_size}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"dtype (of scales) must be float16 or bfloat16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 8,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype,
                                                  device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8.0, dtype=dtype,
                                                 device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)
        self.register_buffer("perm", torch.arange(in_features, device=device)
                             if act_order else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_int4_weight(cls, weight: Int4Weight, bias: Tensor | None = None) -> Int4Linear:
        """Wrap an :class:`Int4Weight` (e.g. from quantize_int4 / from_gptq / from_awq)."""
        n, k = weight.shape
        mod = cls(k, n, bias=bias is not None, group_size=weight.group_size,
                  dtype=weight.scales.dtype, device=weight.qweight.device,
                  act_order=weight.perm is not None)
        return copy_buffers(mod, qweight=weight.qweight, scales=weight.scales,
                            zeros=weight.zeros, bias=bias, perm=weight.perm)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    symmetric: bool = False) -> Int4Linear:
        """RTN-quantize an nn.Linear (scales in its dtype when fp16/bf16, else fp16)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = quantize_int4(linear.weight.detach(), group_size=group_size, symmetric=symmetric)
        return cls.from_int4_weight(w, linear.bias)

    def int4_weight(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [out_features, in_features] in original column order."""
        return self.int4_weight().dequantize(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        if in_dtype not in (torch.float16, torch.bfloat16):
            x = x.to(self.scales.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = ops.int4_matmul(x, self.qweight, self.scales, self.zeros, self.group_size, bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"dtype={self.scales.dtype}, act_order={self.perm is not None}")
