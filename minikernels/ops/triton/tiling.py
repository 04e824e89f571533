"""Tile ordering, K-tile loads, dot and epilogue shared by the GEMM kernels (int4 / int8 /
fp8 matmul, w8a8_block_fp8_matmul) and the fused-MoE kernels' K loops.

Each is a @triton.jit helper inlined into its kernel; constexpr arguments stay constexpr,
so every specialisation compiles to the code the kernels had when they spelled it out.
``tl.multiple_of`` hints on loop-carried pointers stay in the kernels: a hint on a
helper's argument would not reach the caller's value."""
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
def gemm_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """(rm, rn, rm_l, rn_l, rk) of program ``pid``'s [BLOCK_M, BLOCK_N] tile of y [M, N]
    (``grouped_tile`` order): its rows rm and columns rn, the same clamped into y for the
    loads (rm % M, rn % N; the store is masked), and rk = 0..BLOCK_K-1."""
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm % M, rn % N, tl.arange(0, BLOCK_K)


@triton.jit
def load_k_tile(ptrs, k0, offs_k, K, EVEN_K: tl.constexpr, other):
    """A [R, BK] tile whose columns k0 + offs_k run along K: unmasked when EVEN_K (K a
    multiple of BLOCK_K, so the loads vectorize), else columns past K read ``other``."""
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=((k0 + offs_k) < K)[None, :], other=other)


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

