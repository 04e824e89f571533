"""SiLU-and-mul (SwiGLU gate) in Triton.

Algorithm: a 2-D grid over (row, column block); each program loads gate = x[r, c] and
up = x[r, I + c] for BLOCK columns, computes silu(gate) * up in fp32, stores y[r, c].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .registry import KernelSpec, register

BLOCK = 1024


@triton.jit
def silu_and_mul_kernel(x_ptr, y_ptr, inter, x_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(y_ptr + row * inter + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> contiguous [..., I] in x.dtype."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    y = _alloc.empty((*x.shape[:-1], inter), x.dtype, x.device)
    rows = x2.shape[0]
    if rows and inter:
        grid = (rows, triton.cdiv(inter, BLOCK))
        silu_and_mul_kernel[grid](x2, y, inter, x2.stride(0), BLOCK=BLOCK, num_warps=4)
    return y


for _dt in ("fp16", "bf16", "fp32"):
    register(KernelSpec(
        name=f"silu_and_mul[{_dt}]", fn=silu_and_mul_kernel,
        signature={"x_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", "inter": "i32",
                   "x_row_stride": "i64", "BLOCK": "constexpr"},
        constexprs={"BLOCK": BLOCK}, num_warps=4, num_stages=1))
