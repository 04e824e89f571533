"""Op family: int4 weight-only matmul (W4A16). Op: ``minikernels::int4_matmul``.

Weight layout: see :mod:`minikernels.ops.reference` (qweight int32 [N, K/8] packed along K,
lowest nibble first; scales/zeros [N, K/G] fp16/bf16); docs/int4_format.md.
Backends: reference; triton (minikernels/ops/triton/int4_matmul.py: tensor-core GEMM for
M > 16, split-K GEMV for M <= 16); cuda (csrc/int4_gemv.cu: decode kernel for M <= 16).
auto on CUDA: Triton; once a GPU run has validated the CUDA kernel (backend.CUDA_VALIDATED),
M <= CUDA_MAX_M -> cuda when the extension is built. Until then cuda is opt-in
(use_backend("cuda")).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import HALF_DTYPES, check_shape, check_tensor, last_dim_contiguous
from . import _alloc, reference
from .fp8 import check_bias

CUDA_MAX_M = 16     # the CUDA decode kernel handles M <= 16 (two n8 MMA tiles)


def _cuda_ok(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int) -> bool:
    """Shapes the CUDA decode kernel supports (16-byte aligned rows and pointers)."""
    m, k = x.shape
    return (m <= CUDA_MAX_M and k % 32 == 0 and x.dtype in (torch.float16, torch.bfloat16)
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and qweight.data_ptr() % 16 == 0)


def _run_cuda(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
              bias: Tensor | None) -> Tensor:
    ext = _backend.cuda_extension()
    m, k = x.shape
    n = qweight.shape[0]
    y = _alloc.empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    if scales.dtype != x.dtype:
        scales, zeros = scales.to(x.dtype), zeros.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()  # the kernel reads bias[n]
    ext.int4_gemv(y, x, qweight, scales, zeros, bias, k if group_size == -1 else group_size,
                  torch.cuda.current_stream(x.device).cuda_stream)
    return y


@torch.library.custom_op("minikernels::int4_matmul", mutates_args=())
def _int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 bias: Tensor | None) -> Tensor:
    which = _backend.resolve("int4_matmul", x.device,
                             cuda_ok=lambda: _cuda_ok(x, qweight, scales, group_size),
                             prefer_cuda=lambda: x.shape[0] <= CUDA_MAX_M)
    if which == "cuda":
        return _run_cuda(x, qweight, scales, zeros, group_size, bias)
    if which == "triton":
        from .triton import int4_matmul as tri
        return tri.int4_matmul(x, qweight, scales, zeros, group_size, bias)
    return reference.int4_matmul(x, qweight, scales, zeros, group_size, bias).contiguous()


@_int4_matmul.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
      bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))  # [M, N], contiguous


def check_group_scales(qweight: Tensor, n: int, k: int, scales: Tensor, zeros: Tensor,
                       group_size: int, multiple: int) -> int:
    """Validate group_size (-1: one group per row, or a positive multiple of ``multiple``
    dividing K) and the group-wise scales / zeros [N, K/G] (fp16 / bf16, one dtype, on
    qweight's device) of an N x K integer weight; returns the group count. Shared by the
    int4 and int8 weight-only ops."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size == -1:
        groups = 1
    elif group_size <= 0 or group_size % multiple:
        raise ValueError(f"group_size must be -1 (per channel) or a positive multiple of "
                         f"{multiple}, got {group_size}")
    elif k % group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({group_size})")
    else:
        groups = k // group_size
    check_tensor("scales", scales, dtypes=HALF_DTYPES, ndim=2, device=qweight.device)
    check_shape("scales", scales, [n, groups])
    check_tensor("zeros", zeros, dtypes=(scales.dtype,), ndim=2, device=qweight.device)
    check_shape("zeros", zeros, [n, groups])
    return groups


def check_int4_weight(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      device: torch.device | None = None) -> tuple[int, int, int]:
    """Validate an int4 weight; returns (N, K, groups)."""
    check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2, device=device)
    n, k = qweight.shape[0], qweight.shape[1] * 8
    return n, k, check_group_scales(qweight, n, k, scales, zeros, group_size, 8)


def int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias) with W [N, K] stored as int4 (see module docstring).

    x [..., K] fp16/bf16 (any strides); qweight int32 [N, K/8]; scales and zeros
    [N, K/G] fp16 or bf16 (converted to x.dtype by the kernels); group_size a positive
    multiple of 8 dividing K (32, 64, 128 typical) or -1 (per channel); N a multiple of 8;
    bias [N] or None. Returns [..., N] in x.dtype (fp32 accumulation). M = 0 rows is fine.
    """
    check_tensor("x", x, dtypes=HALF_DTYPES, min_ndim=1)
    n, k, _ = check_int4_weight(qweight, scales, zeros, group_size, device=x.device)
    if n % 8:
        raise ValueError(f"qweight rows N ({n}) must be a multiple of 8")
    if x.shape[-1] != k:
        raise ValueError(f"x last dim ({x.shape[-1]}) must equal K = 8 * qweight.shape[1] ({k})")
    check_bias(bias, n, (x.dtype, scales.dtype, torch.float32), x.device)
    x = last_dim_contiguous(x)
    x2 = x.reshape(-1, k)
    if x2.shape[0] > 1 and x2.stride(0) < k:    # e.g. expanded rows: give the kernels real rows
        x2 = x2.contiguous()
    y = torch.ops.minikernels.int4_matmul(x2, qweight.contiguous(), scales.contiguous(),
                                          zeros.contiguous(), group_size, bias)
    return y.view(*x.shape[:-1], n)
