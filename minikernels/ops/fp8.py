"""Op family: fp8 (e4m3) weight-only matmul (W8A16) with block-wise scales.
Op: ``minikernels::fp8_matmul``.

Weight layout (see :mod:`minikernels.ops.reference`, "fp8 weights"): weight
float8_e4m3fn [N, K], weight_scale float32 [ceil(N / bn), ceil(K / bk)] for block_size
(bn, bk), W[n, k] = weight[n, k] * weight_scale[n // bn, k // bk] — DeepSeek-V3 /
Qwen3-FP8 checkpoints' layout with block (128, 128) (their ``weight_scale_inv``); per
tensor is block (N, K) with a [1, 1] scale, per channel block (1, K) with an [N, 1] scale.
``reference.quantize_fp8`` produces it from a dense weight.
Backends: reference; triton (minikernels/ops/triton/fp8_matmul.py: tensor-core GEMM for
M > 16, split-K decode kernel for M <= 16; no fp8 hardware needed, so sm_80 runs it too).
auto on CUDA: triton. No CUDA C++ kernel.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_shape, check_tensor, last_dim_contiguous
from . import reference


# The op takes the weight's bytes (weight.view(torch.uint8), a free view; float8_e4m3fn
# is accepted too): torch's schema checks (opcheck, SchemaCheckMode) compare inputs with
# allclose, which float8 tensors do not support on the CPU.
@torch.library.custom_op("minikernels::fp8_matmul", mutates_args=())
def _fp8_matmul(x: Tensor, weight: Tensor, weight_scale: Tensor, block_size: list[int],
                bias: Tensor | None) -> Tensor:
    which = _backend.resolve("fp8_matmul", x.device)
    if which == "triton":
        from .triton import fp8_matmul as tri
        return tri.fp8_matmul(x, weight, weight_scale, block_size, bias)
    return reference.fp8_matmul(x, weight.view(torch.float8_e4m3fn), weight_scale,
                                tuple(block_size), bias).contiguous()


@_fp8_matmul.register_fake
def _(x: Tensor, weight: Tensor, weight_scale: Tensor, block_size: list[int],
      bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))  # [M, N], contiguous


def kernel_rows(x: Tensor, k: int) -> Tensor:
    """x [..., K] as the [M, K] matrix the weight-only matmul kernels take (fp8 here, int8
    too): last dim contiguous, real rows (an expanded x, row stride < K, is copied)."""
    x2 = last_dim_contiguous(x).reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
    if x2.shape[0] > 1 and x2.stride(0) < k:
        x2 = x2.contiguous()
    return x2


def check_bias(bias: Tensor | None, n: int, dtypes: tuple[torch.dtype, ...],
               device: torch.device) -> None:
    """A weight-only matmul's optional bias (fp8 here, int4 and int8 too): None, or [N]
    (any strides) in one of ``dtypes`` (repeats dropped) on ``device``."""
    if bias is not None:
        check_tensor("bias", bias, dtypes=tuple(dict.fromkeys(dtypes)), ndim=1, device=device)
        check_shape("bias", bias, [n])


def check_block_size(block_size: object, k: int) -> tuple[int, int]:
    """(bn, bk) from a pair of positive ints with bk % 16 == 0 or bk >= K."""
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in block_size):
        raise TypeError(f"block_size must be a pair of ints (bn, bk), got {block_size!r}")
    bn, bk = block_size
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block_size must be positive, got {tuple(block_size)}")
    if bk % 16 and bk < k:
        raise ValueError(f"block_size bk ({bk}) must be a multiple of 16 or >= K ({k}), so "
                         f"that a kernel K tile never straddles two scale blocks; got "
                         f"block_size {tuple(block_size)}")
    return bn, bk


def check_fp8_weight(weight: Tensor, weight_scale: Tensor, block_size: object,
                     device: torch.device | None = None) -> tuple[int, int, int, int]:
    """Validate an fp8 weight and its block scales; returns (N, K, bn, bk)."""
    check_tensor("weight", weight, dtypes=(torch.float8_e4m3fn,), ndim=2, device=device)
    n, k = weight.shape
    bn, bk = check_block_size(block_size, k)
    check_tensor("weight_scale", weight_scale, dtypes=(torch.float32,), ndim=2,
                 device=weight.device)
    check_shape("weight_scale", weight_scale, [-(-n // bn), -(-k // bk)])
    return n, k, bn, bk


def fp8_matmul(x: Tensor, weight: Tensor, weight_scale: Tensor,
               block_size: tuple[int, int] | list[int], bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T (+ bias) with W [N, K] stored as fp8 e4m3 with block scales (W8A16).

    x            [..., K] fp16 / bf16 / fp32, any strides.
    weight       [N, K] torch.float8_e4m3fn, any strides. The NaN bytes 0x7F / 0xFF are not
                 valid weights (a saturating quantizer never writes them; results undefined).
    weight_scale [ceil(N / bn), ceil(K / bk)] float32, any strides: multiplies the weight
                 (a checkpoint's ``weight_scale_inv``).
    block_size   (bn, bk) positive ints: W[n, k] = weight[n, k] * weight_scale[n // bn, k // bk].
                 bk must be a multiple of 16 or >= K. (128, 128): DeepSeek-V3 / Qwen3-FP8;
                 (N, K): per tensor; (1, K): per channel.
    bias         [N] in x.dtype or float32, or None.
    Returns [..., N] in x.dtype: fp32 math, rounded once. M = 0 rows, N = 0 and K = 0 work.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    n, k, bn, bk = check_fp8_weight(weight, weight_scale, block_size, device=x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x last dim ({x.shape[-1]}) must equal K = weight.shape[1] ({k})")
    check_bias(bias, n, (x.dtype, torch.float32), x.device)
    y = torch.ops.minikernels.fp8_matmul(kernel_rows(x, k), weight.view(torch.uint8),
                                         weight_scale, [bn, bk], bias)
    return y.view(*x.shape[:-1], n)
