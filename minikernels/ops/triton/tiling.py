"""Tile ordering, dot and epilogue shared by the GEMM kernels (int4 / int8 / fp8 matmul,
w8a8_block_fp8_matmul)."""
from __future__ import annotations

import triton
import triton.language as tl

from .interpreter_rounding import rne_bf16


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row tiles walk the
    column tiles together, so each weight tile is reused from L2 while it is there."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def acc_dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b in fp32. DOT_F32: the dot on fp32 inputs ("ieee"): for exact fp32 x, and
    under the interpreter for bf16 (its bf16 tl.dot is wrong; the same values, exact in
    fp32)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def store_gemm_tile(acc, rm, rn, rn_l, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
                    RNE_BF16: tl.constexpr):
    """The fp32 tile acc [BM, BN] of y [M, N] (rows rm, columns rn; rn_l clamped for
    loads): + bias [N], one cast to y's dtype (RNE_BF16: interpreter only, see
    interpreter_rounding), masked store."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_l).to(tl.float32)[None, :]
    if RNE_BF16:
        acc = rne_bf16(acc)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

