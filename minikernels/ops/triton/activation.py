"""Gated activations (SwiGLU / GeGLU gates) in Triton.

Algorithm: a 2-D grid over (row, column block); each program loads gate = x[r, c] and
up = x[r, I + c] for BLOCK columns, computes act(gate) * up in fp32 and stores y[r, c].
ACT (constexpr) picks the activation: "silu" g / (1 + e^-g); "gelu" g * Phi(g) with
Phi(g) = (1 + erf(g / sqrt 2)) / 2; "gelu_tanh" 0.5 g (1 + tanh(sqrt(2/pi)(g + 0.044715 g^3))).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .registry import KernelSpec, register

BLOCK = 1024
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def gate_activation(gate, ACT: tl.constexpr):
    """act(gate) of an fp32 tensor, ACT one of ACTIVATIONS (the fused MoE kernels'
    epilogues call it too), or "relu2": relu(g)^2 (the non-gated MoE experts' only)."""
    if ACT == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACT == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    elif ACT == "relu2":
        r = tl.maximum(gate, 0.0)
        act = r * r
    else:  # gelu_tanh; tanh(u) = 1 - 2 / (e^{2u} + 1), no libdevice tanh; |u| <= 10
        # already gives tanh = +-1 in fp32, and keeps e^{2u} finite
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        u = tl.minimum(tl.maximum(u, -10.0), 10.0)
        act = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    return act


@triton.jit
def gated_activation_kernel(x_ptr, y_ptr, inter, x_row_stride, BLOCK: tl.constexpr,
                            ACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = gate_activation(gate, ACT)
    tl.store(y_ptr + row * inter + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


def gated_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> contiguous act(x[..., :I]) * x[..., I:] [..., I]
    in x.dtype; act one of ACTIVATIONS."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    y = _alloc.empty((*x.shape[:-1], inter), x.dtype, x.device)
    rows = x2.shape[0]
    if rows and inter:
        grid = (rows, triton.cdiv(inter, BLOCK))
        gated_activation_kernel[grid](x2, y, inter, x2.stride(0), BLOCK=BLOCK, ACT=act,
                                      num_warps=4)
    return y


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> contiguous [..., I] in x.dtype."""
    return gated_activation(x, "silu")


for _act in ACTIVATIONS:
    for _dt in ("fp16", "bf16", "fp32"):
        register(KernelSpec(
            name=f"{'silu' if _act == 'silu' else _act}_and_mul[{_dt}]",
            fn=gated_activation_kernel,
            signature={"x_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", "inter": "i32",
                       "x_row_stride": "i64", "BLOCK": "constexpr", "ACT": "constexpr"},
            constexprs={"BLOCK": BLOCK, "ACT": _act}, num_warps=4, num_stages=1))
