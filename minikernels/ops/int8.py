"""Op family: int8 weight-only matmul (W8A16) with group-wise scales and zero points.
Op: ``minikernels::int8_matmul``, the int8 twin of ``int4_matmul``.

Weight layout (see :mod:`minikernels.ops.reference`, "int8 weight"): qweight uint8 [N, K]
(row-major, the stored value q in 0..255), scales and zeros [N, K/G] fp16 / bf16,
W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]; G a positive multiple of 16
dividing K, or -1 (one group per row). Symmetric int8 checkpoints (GPTQ 8-bit, e.g.
Qwen's ``*-GPTQ-Int8``; compressed-tensors W8A16 int8) use zero 128.
``reference.quantize_int8_grouped`` produces it from a dense weight (RTN).
Backends: reference; triton (minikernels/ops/triton/int8_matmul.py: tensor-core GEMM for
M > 16, split-K decode kernel for M <= 16). auto on CUDA: triton. No CUDA C++ kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import HALF_DTYPES, check_tensor
from . import reference
from .fp8 import check_bias, kernel_rows
from .int4 import check_group_scales


@torch.library.custom_op("minikernels::int8_matmul", mutates_args=())
def _int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 bias: Tensor | None) -> Tensor:
    which = _backend.resolve("int8_matmul", x.device)
    if which == "triton":
        from .triton import int8_matmul as tri
        return tri.int8_matmul(x, qweight, scales, zeros, group_size, bias)
    return reference.int8_matmul(x, qweight, scales, zeros, group_size, bias).contiguous()


@_int8_matmul.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
      bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))  # [M, N], contiguous


def check_int8_weight(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      device: torch.device | None = None) -> tuple[int, int, int]:
    """Validate an int8 weight (canonical layout); returns (N, K, groups)."""
    check_tensor("qweight", qweight, dtypes=(torch.uint8,), ndim=2, device=device)
    n, k = qweight.shape
    return n, k, check_group_scales(qweight, n, k, scales, zeros, group_size, 16)


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias) with W [N, K] stored as int8 with group-wise scales and zero
    points (W8A16; see module docstring).

    x          [..., K] fp16 / bf16, any strides.
    qweight    uint8 [N, K], any strides: the stored q in 0..255 (a signed int8 checkpoint
               stores q + 128 with zeros 128).
    scales     [N, K/G] fp16 or bf16 (any strides; read in their own dtype, math in fp32).
    zeros      [N, K/G], scales' dtype: real-valued zero points.
    group_size G: a positive multiple of 16 dividing K (32, 64, 128 typical), or -1 (one
               group per row: per-channel scales [N, 1]).
    bias       [N] in x.dtype, scales.dtype or float32, or None.
    Returns [..., N] in x.dtype: W dequantized in fp32 and rounded to x.dtype in registers,
    fp32 accumulation, one final rounding. Any N; M = 0 rows, N = 0 and K = 0 (G = -1) work.
    """
    check_tensor("x", x, dtypes=HALF_DTYPES, min_ndim=1)
    n, k, _ = check_int8_weight(qweight, scales, zeros, group_size, device=x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x last dim ({x.shape[-1]}) must equal K = qweight.shape[1] ({k})")
    check_bias(bias, n, (x.dtype, scales.dtype, torch.float32), x.device)
    y = torch.ops.minikernels.int8_matmul(kernel_rows(x, k), qweight, scales.contiguous(),
                                          zeros.contiguous(), group_size, bias)
    return y.view(*x.shape[:-1], n)
