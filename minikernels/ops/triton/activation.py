"""Gated activations (SwiGLU / GeGLU gates) and pointwise GELU variants in Triton.

Gated, algorithm: a 2-D grid over (row, column block); each program loads gate = x[r, c]
and up = x[r, I + c] (INTERLEAVED: x[r, 2c] and x[r, 2c + 1]) for BLOCK columns, computes
act(gate) * up in fp32 and stores y[r, c]. ACT (constexpr) picks the activation: "silu"
g / (1 + e^-g); "gelu" g * Phi(g) with Phi(g) = (1 + erf(g / sqrt 2)) / 2; "gelu_tanh"
0.5 g (1 + tanh(sqrt(2/pi)(g + 0.044715 g^3))); "fatrelu" g where g > p0 else 0;
"swigluoai" (GPT-OSS, interleaved) (clamp(u, -p1, p1) + 1) * g' sigmoid(p0 g'),
g' = min(g, p1). p0 / p1 are fp32 scalars (threshold; alpha, limit), unused otherwise.
Pointwise (``pointwise_activation_kernel``, the same grid over x's rows): "gelu_new" /
"gelu_fast" 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) (two writings of one function),
"gelu_quick" x sigmoid(1.702 x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

BLOCK = 1024
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
#: the gated kernel's other activations (ops.activation: fatrelu_and_mul,
#: swigluoai_and_mul), and the pointwise kernel's
EXTRA_GATED = ("fatrelu", "swigluoai")
POINTWISE = ("gelu_fast", "gelu_new", "gelu_quick")


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
def _tanh_gelu(x, inner):
    """0.5 x (1 + tanh(inner)), tanh(u) = 1 - 2 / (e^{2u} + 1) with |u| clamped to 10."""
    u = tl.minimum(tl.maximum(inner, -10.0), 10.0)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def gated_activation_kernel(x_ptr, y_ptr, inter, x_row_stride, p0, p1, BLOCK: tl.constexpr,
                            ACT: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * x_row_stride
    if ACT == "swigluoai":                     # interleaved: gate 2c, up 2c + 1
        gate = tl.load(x_row + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(gate, p1)
        u = tl.minimum(tl.maximum(up, -p1), p1)
        y = (u + 1.0) * (g / (1.0 + tl.exp(-p0 * g)))
    else:
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == "fatrelu":
            act = tl.where(gate > p0, gate, 0.0)
        else:
            act = gate_activation(gate, ACT)
        y = act * up
    if RNE_BF16:    # interpreter only: round as a GPU's bf16 cast does (interpreter_rounding)
        y = rne_bf16(y)
    tl.store(y_ptr + row * inter + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pointwise_activation_kernel(x_ptr, y_ptr, n, x_row_stride, BLOCK: tl.constexpr,
                                ACT: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == "gelu_quick":
        y = x / (1.0 + tl.exp(-1.702 * x))
    elif ACT == "gelu_fast":
        y = _tanh_gelu(x, 0.7978845608 * x * (1.0 + 0.044715 * x * x))
    else:  # gelu_new
        y = _tanh_gelu(x, 0.7978845608028654 * (x + 0.044715 * x * x * x))
    if RNE_BF16:
        y = rne_bf16(y)
    tl.store(y_ptr + row * n + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def gated_activation(x: torch.Tensor, act: str, p0: float = 0.0, p1: float = 0.0
                     ) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> contiguous act(x[..., :I]) * x[..., I:] [..., I]
    in x.dtype (swigluoai: the interleaved halves); act one of ACTIVATIONS / EXTRA_GATED,
    p0 / p1 its scalars (fatrelu: threshold; swigluoai: alpha, limit)."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    y = _alloc.empty((*x.shape[:-1], inter), x.dtype, x.device)
    rows = x2.shape[0]
    if rows and inter:
        grid = (rows, triton.cdiv(inter, BLOCK))
        gated_activation_kernel[grid](x2, y, inter, x2.stride(0), float(p0), float(p1),
                                      BLOCK=BLOCK, ACT=act, RNE_BF16=_rne(x), num_warps=4)
    return y


def pointwise_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """x [..., n] (last dim contiguous) -> contiguous act(x) in x.dtype; act in POINTWISE."""
    n = x.shape[-1] if x.dim() else 1
    x2 = x.reshape(-1, n)
    y = _alloc.empty(tuple(x.shape), x.dtype, x.device)
    if x2.shape[0] and n:
        grid = (x2.shape[0], triton.cdiv(n, BLOCK))
        pointwise_activation_kernel[grid](x2, y, n, x2.stride(0), BLOCK=BLOCK, ACT=act,
                                          RNE_BF16=_rne(x), num_warps=4)
    return y


def _rne(x: torch.Tensor) -> bool:
    """Round bf16 outputs to nearest even in the kernel: under the interpreter only."""
    return x.dtype == torch.bfloat16 and not x.is_cuda and _backend.interpreter_enabled()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> contiguous [..., I] in x.dtype."""
    return gated_activation(x, "silu")


# one family per kernel (each ACT a value of it): the suite's covering compile then needs
# as many specs as the most values of one kind (5 activations), not every product
for _act in (*ACTIVATIONS, *EXTRA_GATED):
    for _dt in ("fp16", "bf16", "fp32"):
        register(KernelSpec(
            name=f"gated_activation[{_act},{_dt}]",
            fn=gated_activation_kernel,
            signature={"x_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", "inter": "i32",
                       "x_row_stride": "i64", "p0": "fp32", "p1": "fp32",
                       "BLOCK": "constexpr", "ACT": "constexpr", "RNE_BF16": "constexpr"},
            constexprs={"BLOCK": BLOCK, "ACT": _act, "RNE_BF16": False}, num_warps=4,
            num_stages=1))
for _act in POINTWISE:
    for _dt in ("fp16", "bf16", "fp32"):
        register(KernelSpec(
            name=f"pointwise_activation[{_act},{_dt}]", fn=pointwise_activation_kernel,
            signature={"x_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", "n": "i32",
                       "x_row_stride": "i64", "BLOCK": "constexpr", "ACT": "constexpr",
                       "RNE_BF16": "constexpr"},
            constexprs={"BLOCK": BLOCK, "ACT": _act, "RNE_BF16": False}, num_warps=4,
            num_stages=1))
