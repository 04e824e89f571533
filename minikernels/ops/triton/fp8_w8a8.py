"""Block-wise FP8 W8A8 in Triton (DeepSeek-V3 / vLLM's block FP8 linear): activation
quantization per token group and the block-scaled fp8 GEMM.

Layouts (see minikernels.ops.reference): A [M, K] fp8 e4m3, As [M, ceil(K / bk)] fp32 (one
scale per token and K group); B [N, K] fp8 e4m3, Bs [ceil(N / bn), ceil(K / bk)] fp32 (one
scale per bn x bk weight block). Every tensor is read through its own strides.

per_token_group_quant_fp8 — per program a tile of BLOCK_M rows x one group of G columns:
    load the tile in fp32; absmax per row (floored at eps); s = absmax / 448;
    q = clamp(x / s, +-448) rounded to nearest-even fp8; store q and s.
    True (IEEE) divisions, so the kernel equals the fp32 reference bit for bit.

w8a8_block_fp8_matmul — per program one [BLOCK_M, BLOCK_N] tile of C:
    for each K tile (BLOCK_K divides bk, so a tile lies in one scale group j):
        partial = A_tile @ B_tile^T on fp8 tensor cores (wgmma on sm_90a), fp32 result
        acc += partial * (As[m, j] * Bs[n // bn, j])        # scale the partial, in fp32
    cast acc to the output dtype, masked store.

fp8 tensor cores exist on sm_89+ and Triton cannot convert fp32 -> fp8e4nv on sm_80, so
both kernels are registered for sm_90a only; the op runs them on capability >= (8, 9)
and on CPU tensors under the interpreter (tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register
from .tiling import grouped_tile

FP8_MAX = tl.constexpr(448.0)   # largest finite float8_e4m3fn


@triton.jit
def _round_fp8_e4m3(v):
    """Interpreter only: v (fp32, |v| <= 448) rounded to nearest-even on the e4m3 grid, so
    the interpreter's (truncating, carry-less) fp32 -> fp8 cast only sees exact values.
    Normal range: drop 20 mantissa bits with RNE; subnormal (< 2^-6): steps of 2^-9,
    rounded by the fp32 addition of 2^14 (whose ulp is 2^-9)."""
    a = tl.abs(v)
    bits = a.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, sub, normal).to(tl.uint32, bitcast=True)
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r | sign).to(tl.float32, bitcast=True)


@triton.jit
def per_token_group_quant_fp8_kernel(
        x_ptr, q_ptr, s_ptr, M, stride_xm, stride_xk, stride_qm, stride_sm, stride_sg,
        eps, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        UE8M0: tl.constexpr, RNE_FP8: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, GROUP_PAD)
    cols = g * GROUP + rc
    mask = (rm[:, None] < M) & (rc[None, :] < GROUP)
    rm64 = rm.to(tl.int64)
    x = tl.load(x_ptr + rm64[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    # one scale per row of the tile: absmax / 448, floored at eps / 448
    absmax = tl.maximum(tl.max(tl.abs(x), axis=1), eps)
    s = tl.math.div_rn(absmax, FP8_MAX)
    if UE8M0:   # round the scale up to a power of two on its exponent bits
        bits = s.to(tl.int32, bitcast=True)
        up = ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (((bits >> 23) + up) << 23).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(x, s[:, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    if RNE_FP8:
        q = _round_fp8_e4m3(q)
    tl.store(q_ptr + rm64[:, None] * stride_qm + cols[None, :],
             q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rm64 * stride_sm + g * stride_sg, s, mask=rm < M)


@triton.jit
def w8a8_block_fp8_matmul_kernel(
        a_ptr, b_ptr, as_ptr, bs_ptr, c_ptr, M, N, K, block_n, block_k,
        stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask,
        stride_bsn, stride_bsk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
        RNE_BF16: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = (rm % M).to(tl.int64)        # clamped rows / columns for loads; stores masked
    rn_l = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_l[:, None] * stride_am + rk[None, :] * stride_ak     # [BM, BK]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_l[None, :] * stride_bn     # [BK, BN]
    as_ptrs = as_ptr + rm_l * stride_asm                                     # [BM]
    bs_ptrs = bs_ptr + (rn_l // block_n) * stride_bsn                        # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        j = k0 // block_k                       # the K scale group this tile lies in
        a_s = tl.load(as_ptrs + j * stride_ask)
        b_s = tl.load(bs_ptrs + j * stride_bsk)
        partial = tl.dot(a, b)                  # fp8 x fp8 -> fp32
        acc += partial * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if RNE_BF16:
        acc = rne_bf16(acc)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# ----------------------------------------------------------------------------- configs

@functools.lru_cache(maxsize=None)
def _arch(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 90           # the interpreter: pretend sm_90
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def block_k_for(bk: int) -> int:
    """The largest power of two <= 128 dividing bk (bk is a multiple of 16)."""
    b = 128
    while bk % b:
        b //= 2
    return b


def matmul_config(m: int, bk: int, arch: int) -> dict:
    """Tile config. sm_90: BLOCK_M >= 64 with 4 / 8 warps -> wgmma; decode-sized M gets
    narrower N tiles so the weight stream is spread over more programs."""
    block_k = block_k_for(bk)
    if m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3 if arch >= 90 else 2)
    return dict(cfg, BLOCK_K=block_k, GROUP_M=8)


# ----------------------------------------------------------------------------- launch

def _device_index(t: torch.Tensor) -> int | None:
    if not t.is_cuda:
        return None
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int, eps: float,
                              x_s: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    """x [M, K] (any strides) -> x_q [M, K] fp8 (contiguous); writes the scales into x_s
    [M, K / group_size] fp32 through its strides. Inputs validated by the op."""
    m, k = x.shape
    x_q = _alloc.empty((m, k), torch.float8_e4m3fn, x.device)
    if m == 0 or k == 0:
        return x_q
    gpad = triton.next_power_of_2(group_size)
    block_m = max(1, min(16, 2048 // gpad))
    grid = (triton.cdiv(m, block_m), k // group_size)
    per_token_group_quant_fp8_kernel[grid](
        x, x_q, x_s, m, x.stride(0), x.stride(1), x_q.stride(0), x_s.stride(0),
        x_s.stride(1), float(eps), GROUP=group_size, GROUP_PAD=gpad, BLOCK_M=block_m,
        UE8M0=use_ue8m0, RNE_FP8=not x.is_cuda, num_warps=4)
    return x_q


def w8a8_block_fp8_matmul(A: torch.Tensor, B: torch.Tensor, As: torch.Tensor,
                          Bs: torch.Tensor, block_size: list[int],
                          output_dtype: torch.dtype) -> torch.Tensor:
    """A [M, K], B [N, K], As [M, ceil(K/bk)], Bs [ceil(N/bn), ceil(K/bk)], all any strides
    -> C [M, N] (contiguous) in output_dtype. Inputs validated by the op."""
    m, k = A.shape
    n = B.shape[0]
    bn, bk = block_size
    c = _alloc.empty((m, n), output_dtype, A.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    cfg = matmul_config(m, bk, _arch(_device_index(A)))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    w8a8_block_fp8_matmul_kernel[grid](
        A, B, As, Bs, c, m, n, k, bn, bk, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        As.stride(0), As.stride(1), Bs.stride(0), Bs.stride(1),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], EVEN_K=k % cfg["BLOCK_K"] == 0,
        RNE_BF16=not A.is_cuda and output_dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return c


# --------------------------------------------------------------------------- registry
# sm_90a only (archs=(90,)): fp8 tensor cores and fp32 -> fp8e4nv need sm_89+. Compiled
# as Triton specializes them at run time for row-major, 16-byte aligned inputs: unit
# strides as constants, pointers / row strides / N / K as multiples of 16.

_OUT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_MM_INTS = {"M": "i32", "N": "i32", "K": "i32", "block_n": "i32", "block_k": "i32",
            "stride_am": "i64", "stride_bn": "i64", "stride_asm": "i64", "stride_ask": "i64",
            "stride_bsn": "i64", "stride_bsk": "i64"}

# (output, M, bk, K a multiple of BLOCK_K); the K-tail specs: K a multiple of 16 but not
# of BLOCK_K (e.g. 4000). K not a multiple of 16 (vLLM's test has 3884) leaves A's rows
# unaligned: byte loads, not pipelined, and it spills on sm_90a; correct but slow.
_MM_CASES = [(out, m, bk, True) for out in ("bf16", "fp16", "fp32") for m in (16, 4096)
             for bk in (128, 64)] + [("bf16", 16, 128, False), ("bf16", 4096, 128, False)]
for _out, _m, _bk, _even in _MM_CASES:
    _cfg = matmul_config(_m, _bk, 90)
    _const = {"stride_ak": 1, "stride_bk": 1, "BLOCK_M": _cfg["BLOCK_M"],
              "BLOCK_N": _cfg["BLOCK_N"], "BLOCK_K": _cfg["BLOCK_K"],
              "GROUP_M": _cfg["GROUP_M"], "EVEN_K": _even, "RNE_BF16": False}
    _sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "as_ptr": "*fp32", "bs_ptr": "*fp32",
            "c_ptr": _OUT[_out], **_MM_INTS, **{c: "constexpr" for c in _const}}
    _div = ("a_ptr", "b_ptr", "as_ptr", "bs_ptr", "c_ptr", "N", "K", "stride_am", "stride_bn")
    register(KernelSpec(
        name=f"w8a8_block_fp8_matmul[{_out},M={_m},bk={_bk}{'' if _even else ',k_tail'}]",
        fn=w8a8_block_fp8_matmul_kernel,
        signature={a: _sig[a] for a in w8a8_block_fp8_matmul_kernel.arg_names},
        constexprs=_const, num_warps=_cfg["num_warps"], num_stages=_cfg["num_stages"],
        tensor_core=True, wgmma_expected=True, archs=(90,), divisible_by_16=_div))

for _dt in ("bf16", "fp16", "fp32"):
    for _g in (128, 64):
        _gp = triton.next_power_of_2(_g)
        _const = {"stride_xk": 1, "stride_sg": 1, "GROUP": _g, "GROUP_PAD": _gp,
                  "BLOCK_M": max(1, min(16, 2048 // _gp)), "UE8M0": False, "RNE_FP8": False}
        _sig = {"x_ptr": f"*{_dt}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32",
                "stride_xm": "i64", "stride_qm": "i64", "stride_sm": "i64",
                "eps": "fp32", **{c: "constexpr" for c in _const}}
        register(KernelSpec(
            name=f"per_token_group_quant_fp8[{_dt},g={_g}]", fn=per_token_group_quant_fp8_kernel,
            signature={a: _sig[a] for a in per_token_group_quant_fp8_kernel.arg_names},
            constexprs=_const, num_warps=4, num_stages=1, archs=(90,),
            divisible_by_16=("x_ptr", "q_ptr", "s_ptr", "stride_xm", "stride_qm", "stride_sm")))
