"""Op family: block-wise FP8 W8A8 (DeepSeek-V3 / vLLM's block FP8 linear), with vLLM's
names, semantics and layouts.

Ops: ``minikernels::per_token_group_quant_fp8`` (dynamic fp8 quantization of activations,
one fp32 scale per token and group of columns) and ``minikernels::w8a8_block_fp8_matmul``
(fp8 activations x fp8 weight with per-token-group and per-weight-block scales).
Layouts and the exact math: :mod:`minikernels.ops.reference`.
Backends: reference; triton (ops/triton/fp8_w8a8.py). fp8 tensor cores exist on sm_89+
only: on CUDA devices of capability < (8, 9) (A100, ...) both ops take the reference path
whatever backend is asked for. Tests: tests/test_fp8_w8a8.py.

Typical use (a Linear whose weight is stored as 128 x 128 fp8 blocks)::

    x_q, x_s = per_token_group_quant_fp8(x, 128)            # x [T, K] bf16
    y = w8a8_block_fp8_matmul(x_q, w_q, x_s, w_s, [128, 128], output_dtype=torch.bfloat16)
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_positive_float, check_shape, check_tensor
from . import _alloc, reference

logger = logging.getLogger("minikernels")

FP8_DTYPE = torch.float8_e4m3fn
OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_tensor_cores(device: torch.device) -> bool:
    """True on CUDA devices with fp8 tensor cores (capability >= (8, 9))."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def _which(op: str, device: torch.device) -> str:
    """The op's backend: 'reference' or 'triton' (the latter only where fp8 runs)."""
    which = _backend.resolve(op, device)
    if which != "reference" and device.type == "cuda" and not fp8_tensor_cores(device):
        if op not in _warned:
            _warned.add(op)
            logger.warning("minikernels: %s needs fp8 tensor cores (sm_89+); using the "
                           "reference path on this GPU", op)
        return "reference"
    return "reference" if which == "reference" else "triton"


# ------------------------------------------------------------ per-token-group quantization

def _scales_buffer(x: Tensor, m: int, groups: int, column_major: bool, tma_aligned: bool,
                   empty) -> Tensor:
    """x_s [m, groups] fp32: row-major, or column-major storage (x_s.t() contiguous, rows
    padded to a multiple of 4 with tma_aligned: vLLM's TMA-aligned layout)."""
    if not column_major:
        return empty((m, groups))
    mpad = -(-m // 4) * 4 if tma_aligned else m
    return empty((groups, mpad))[:, :m].t()


@torch.library.custom_op("minikernels::per_token_group_quant_fp8", mutates_args=())
def _per_token_group_quant_fp8(x: Tensor, group_size: int, eps: float,
                               column_major_scales: bool, tma_aligned_scales: bool,
                               use_ue8m0: bool) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    x_s = _scales_buffer(x, m, k // group_size, column_major_scales, tma_aligned_scales,
                         lambda shape: _alloc.empty(shape, torch.float32, x.device))
    if _which("per_token_group_quant_fp8", x.device) == "triton":
        from .triton import fp8_w8a8 as tri
        x_q = tri.per_token_group_quant_fp8(x, group_size, eps, x_s, use_ue8m0)
        return x_q, x_s
    x_q, s = reference.per_token_group_quant_fp8(x, group_size, eps, use_ue8m0)
    x_s.copy_(s)
    return x_q.contiguous(), x_s


@_per_token_group_quant_fp8.register_fake
def _(x: Tensor, group_size: int, eps: float, column_major_scales: bool,
      tma_aligned_scales: bool, use_ue8m0: bool) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    x_s = _scales_buffer(x, m, k // group_size, column_major_scales, tma_aligned_scales,
                         lambda shape: x.new_empty(shape, dtype=torch.float32))
    return x.new_empty((m, k), dtype=FP8_DTYPE), x_s


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def per_token_group_quant_fp8(x: Tensor, group_size: int, eps: float = 1e-10,
                              dtype: torch.dtype | None = torch.float8_e4m3fn,
                              column_major_scales: bool = False,
                              tma_aligned_scales: bool = False,
                              use_ue8m0: bool | None = False) -> tuple[Tensor, Tensor]:
    """Quantize x to fp8 with one fp32 scale per token (row) and group of ``group_size``
    consecutive elements (vLLM's ``per_token_group_quant_fp8``).

    x [..., K] fp16/bf16/fp32, any strides; K % group_size == 0. For each group:
        absmax = max(max |x|, eps);  x_s = absmax / 448;
        x_q = fp8_e4m3fn(clamp(x / x_s, -448, 448))      (fp32 math, round to nearest even)
    Returns x_q [..., K] float8_e4m3fn (contiguous) and x_s [..., K / group_size] fp32,
    row-major; with column_major_scales the same values in column-major storage (x_s.t()
    contiguous for 2-D x, what CUTLASS / DeepGEMM read), and with tma_aligned_scales too
    its token stride padded to a multiple of 4 (vLLM's TMA-aligned scales; ignored
    without column_major_scales). use_ue8m0: scales rounded up to powers of two.
    dtype: only torch.float8_e4m3fn (None means it, like vLLM's platform default).
    On CUDA devices below capability (8, 9) this runs the reference path.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    k = x.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of x's last dim ({k}), "
                         f"got {group_size}")
    eps = check_positive_float("eps", eps)
    if dtype is not None and dtype != FP8_DTYPE:
        raise TypeError(f"dtype must be torch.float8_e4m3fn, got {dtype}")
    _check_bool("column_major_scales", column_major_scales)
    _check_bool("tma_aligned_scales", tma_aligned_scales)
    use_ue8m0 = False if use_ue8m0 is None else _check_bool("use_ue8m0", use_ue8m0)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    x_q, x_s = torch.ops.minikernels.per_token_group_quant_fp8(
        x2, group_size, eps, column_major_scales, tma_aligned_scales, use_ue8m0)
    return x_q.view(*lead, k), x_s.view(*lead, k // group_size)


# ------------------------------------------------------------------ block-scaled matmul

@torch.library.custom_op("minikernels::w8a8_block_fp8_matmul", mutates_args=())
def _w8a8_block_fp8_matmul(A: Tensor, B: Tensor, As: Tensor, Bs: Tensor,
                           block_size: list[int], output_dtype: torch.dtype) -> Tensor:
    if _which("w8a8_block_fp8_matmul", A.device) == "triton":
        from .triton import fp8_w8a8 as tri
        return tri.w8a8_block_fp8_matmul(A, B, As, Bs, list(block_size), output_dtype)
    return reference.w8a8_block_fp8_matmul(A, B, As, Bs, list(block_size),
                                           output_dtype).contiguous()


@_w8a8_block_fp8_matmul.register_fake
def _(A: Tensor, B: Tensor, As: Tensor, Bs: Tensor, block_size: list[int],
      output_dtype: torch.dtype) -> Tensor:
    return A.new_empty((A.shape[0], B.shape[0]), dtype=output_dtype)


def check_block_size(block_size: object) -> tuple[int, int]:
    """[bn, bk]: two ints, bn >= 1, bk a positive multiple of 16 (one fp8 MMA K step)."""
    if (not isinstance(block_size, (list, tuple)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)):
        raise TypeError(f"block_size must be two ints [block_n, block_k], got {block_size!r}")
    bn, bk = block_size
    if bn <= 0:
        raise ValueError(f"block_size[0] (block_n) must be >= 1, got {bn}")
    if bk <= 0 or bk % 16:
        raise ValueError(f"block_size[1] (block_k) must be a positive multiple of 16, got {bk}")
    return bn, bk


def w8a8_block_fp8_matmul(A: Tensor, B: Tensor, As: Tensor, Bs: Tensor,
                          block_size: list[int], output_dtype: torch.dtype = torch.float16
                          ) -> Tensor:
    """C = A @ B.T with block-wise fp8 scales (vLLM's ``w8a8_block_fp8_matmul``).

    A [..., K] float8_e4m3fn (quantized activations); B [N, K] float8_e4m3fn (weight);
    As [..., ceil(K / bk)] fp32 (per token group scales, e.g. from
    ``per_token_group_quant_fp8(x, bk)``, row- or column-major); Bs [ceil(N / bn),
    ceil(K / bk)] fp32 (per bn x bk weight block); block_size [bn, bk] (bk a multiple of
    16; [128, 128] is DeepSeek-V3's). Every tensor may have any strides. N and K need not
    be multiples of the block size.
        C[m, n] = sum_j (sum_{k in block j} A[m, k] B[n, k]) * As[m, j] * Bs[n // bn, j]
    in fp32, cast to output_dtype (fp16 / bf16 / fp32). Returns [..., N] (contiguous);
    no rows (M = 0) gives an empty C. On CUDA devices below capability (8, 9) (no fp8
    tensor cores) this runs the reference path (fp32 matmuls).
    """
    check_tensor("A", A, dtypes=(FP8_DTYPE,), min_ndim=1)
    check_tensor("B", B, dtypes=(FP8_DTYPE,), ndim=2, device=A.device)
    bn, bk = check_block_size(block_size)
    if output_dtype not in OUTPUT_DTYPES:
        raise TypeError(f"output_dtype must be one of float16, bfloat16, float32, got "
                        f"{output_dtype}")
    n, k = B.shape
    if A.shape[-1] != k:
        raise ValueError(f"A's last dim ({A.shape[-1]}) must equal B's K ({k})")
    kb = -(-k // bk)
    check_tensor("As", As, dtypes=(torch.float32,), device=A.device)
    check_shape("As", As, [*A.shape[:-1], kb])
    check_tensor("Bs", Bs, dtypes=(torch.float32,), ndim=2, device=A.device)
    check_shape("Bs", Bs, [-(-n // bn), kb])
    lead = A.shape[:-1]
    c = torch.ops.minikernels.w8a8_block_fp8_matmul(
        A.reshape(-1, k), B, As.reshape(-1, kb), Bs, [bn, bk], output_dtype)
    return c.view(*lead, n)
