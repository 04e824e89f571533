"""int8 weight-only matmul (W8A16) with group-wise scales and zero points, in Triton.

Weight (canonical, see minikernels.ops.reference): qweight uint8 [N, K] (any strides),
scales / zeros [N, K/G] (contiguous, fp16 or bf16), W = (q - z) * s with one (s, z) per
row and group of G columns (G = K for per channel). y = x @ W^T (+ bias), x fp16 / bf16.

K tiles never straddle two groups: G is a multiple of 16, so BLOCK_K (a power of two
>= 16) is chosen to divide G, or one group spans K (per channel). So every K tile needs
one scale and one zero per weight row, loaded as [BN] vectors.

(q - z) * s is computed in fp32 ((q - z) is exact for integer zero points, the product is
one fp32 rounding, as in the reference) and rounded once to x's dtype for the dot.

GEMM (M > 16) — per program one [BLOCK_M, BLOCK_N] tile of y, tiles in grouped order:
    for each K tile: load x [BM, BK] and the weight bytes [BN, BK]; dequantize
    (q - z) * s in registers and round to x's dtype; acc += x @ W^T on tensor cores
    (wgmma on sm_90a, mma.sync on sm_80), fp32 accumulator.
    Epilogue: + bias, cast, masked store (any M, N).
Decode (M <= 16) — memory-bound: stream the 1-byte weight at bandwidth. Per program
BLOCK_N outputs and one slice of K (split-K so that N / BLOCK_N x SPLIT fills the SMs):
    M == 1: CUDA-core FMAs, acc[n] += s * (sum_k q[n, k] x[k] - z * sum_k x[k]) (the
    scale and zero applied once per tile, no weight rounding);
    2 <= M <= 16: "swap AB", acc[BN, 16] += W [BN, BK] @ x^T [BK, 16], so the wide weight
    tile is the MMA's M side (wgmma m64n16 on sm_90a) and the padded M the narrow side.
    SPLIT > 1: each split writes its fp32 partial sums to a workspace [SPLIT, M, N] and
    splitk.reduce_splits adds them in split order (+ bias) and casts: deterministic.
The tile / K-tile / epilogue helpers are fp8_matmul.py's (tiling.py and splitk.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .interpreter_rounding import rne_bf16
from .splitk import decode_tile, load_decode_rows, load_decode_vec, store_decode_tile
from .tiling import acc_dot, gemm_tile, load_k_tile, store_gemm_tile


@triton.jit
def _dequant(qb, s, z, dt: tl.constexpr, RNE_BF16: tl.constexpr):
    """uint8 q [BN, BK], fp32 s / z [BN] -> (q - z) * s rounded to dt, [BN, BK]."""
    w = (qb.to(tl.float32) - z[:, None]) * s[:, None]
    if RNE_BF16:   # interpreter only: its fp32 -> bf16 cast truncates
        w = rne_bf16(w)
    return w.to(dt)


@triton.jit
def _group_scale_zero(s_ptr, z_ptr, sz_offs, k0, group):
    """(s, z) in fp32 [BN] of the rows' group holding column k0 (sz_offs: the rows'
    offsets of group 0 in the [N, K/G] scales / zeros; a K tile never straddles groups)."""
    g = k0 // group
    s = tl.load(s_ptr + sz_offs + g).to(tl.float32)
    z = tl.load(z_ptr + sz_offs + g).to(tl.float32)
    return s, z


@triton.jit
def int8_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, K, stride_xm,
                     stride_wn, stride_wk, group, num_groups,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                     RNE_BF16: tl.constexpr = False):
    rm, rn, rm_l, rn_l, rk = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K,
                                       GROUP_M)           # rm_l, rn_l: clamped for loads
    x_ptrs = x_ptr + rm_l[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = qw_ptr + rn_l[:, None].to(tl.int64) * stride_wn + rk[None, :].to(tl.int64) * stride_wk
    sz_offs = rn_l.to(tl.int64) * num_groups                                # [BN], group 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if ALIGNED:     # 16-byte aligned rows, unit K strides (the launcher checked)
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        x = load_k_tile(x_ptrs, k0, rk, K, EVEN_K, 0.0)
        qb = load_k_tile(w_ptrs, k0, rk, K, EVEN_K, 0)
        s, z = _group_scale_zero(s_ptr, z_ptr, sz_offs, k0, group)
        w = _dequant(qb, s, z, x_ptr.dtype.element_ty, RNE_BF16)
        acc = acc_dot(x, tl.trans(w), acc, DOT_F32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    store_gemm_tile(acc, rm, rn, rn_l, bias_ptr, y_ptr, M, N, HAS_BIAS, RNE_BF16)


@triton.jit
def int8_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K,
                     stride_xm, stride_wn, stride_wk, group, num_groups, k_tiles_per_split,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
                     SPLIT: tl.constexpr, DOT_F32: tl.constexpr, RNE_BF16: tl.constexpr = False):
    pid_k, rn, rn_l, rk, k_begin, k_end = decode_tile(N, K, k_tiles_per_split, BLOCK_N,
                                                      BLOCK_K)    # rn_l: clamped for loads
    w_rows = qw_ptr + rn_l[:, None].to(tl.int64) * stride_wn               # [BN, 1]
    sz_offs = rn_l.to(tl.int64) * num_groups                                # [BN], group 0
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            x, qb = load_decode_vec(x_ptr, w_rows, k0, rk, K, stride_wk, ALIGNED, EVEN_K)
            s, z = _group_scale_zero(s_ptr, z_ptr, sz_offs, k0, group)
            # sum_k (q - z) s x = s * (sum_k q x - z sum_k x): one scale and zero per tile
            qx = tl.sum(qb.to(tl.float32) * x[None, :], axis=1)
            acc += s * (qx - z * tl.sum(x, axis=0))
        out = acc[:, None]                                                  # [BN, 1]
    else:
        rm = tl.arange(0, BLOCK_M)
        x_ptrs = x_ptr + (rm % M)[:, None].to(tl.int64) * stride_xm + rk[None, :]
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            x, qb = load_decode_rows(x_ptrs, w_rows, rm, M, k0, rk, K, stride_wk, ALIGNED,
                                     EVEN_K)
            s, z = _group_scale_zero(s_ptr, z_ptr, sz_offs, k0, group)
            w = _dequant(qb, s, z, x_ptr.dtype.element_ty, RNE_BF16)
            acc2 = acc_dot(w, tl.trans(x), acc2, DOT_F32)                      # [BN, BM]
        out = acc2
    store_decode_tile(out, rn, rn_l, pid_k, bias_ptr, y_ptr, ws_ptr, M, N, HAS_BIAS, BLOCK_M,
                      SPLIT, RNE_BF16)


# ----------------------------------------------------------------------------- configs

def block_k_for(want: int, group: int, k: int) -> int:
    """A power of two <= want (>= 16) dividing the group size, so that no K tile straddles
    two groups; when one group spans K (per channel), any width not wider than K needs."""
    return splitk.block_k_dividing(want, group, k)[0]


def gemm_config(m: int, n: int, k: int, group: int, arch: int, aligned: bool = True) -> dict:
    """Tile config for the GEMM path. sm_90: BM >= 64 with 4/8 warps -> wgmma. Unaligned
    rows (byte loads, a pointer per element) take small tiles: no register spills
    (tests/test_aot_compile.py, python -m minikernels.ops.triton.aot)."""
    if not aligned:
        bm, bn, bkw, warps, stages = 64, 64, 32, 4, 3
    elif arch >= 90:
        if m <= 64:
            bm, bn, bkw, warps, stages = 64, 128, 64, 4, 4
        else:
            bm, bn, bkw, warps, stages = 128, 128, 64, 8, 4
    else:
        if m <= 32:
            bm, bn, bkw, warps, stages = 32, 128, 64, 4, 4
        elif m <= 64:
            bm, bn, bkw, warps, stages = 64, 128, 64, 4, 4
        else:
            bm, bn, bkw, warps, stages = 128, 128, 32, 8, 4
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k_for(bkw, group, k), "GROUP_M": 8,
            "num_warps": warps, "num_stages": stages}


def gemv_config(m: int, n: int, k: int, group: int, sms: int, split_k: int | None,
                aligned: bool = True) -> dict:
    """Decode config: BLOCK_N x BLOCK_K weight tiles of 8-16 KB (16-byte vector loads when
    aligned; 2-4 KB of byte loads when not), split-K so that about 4 programs per SM
    stream the weight."""
    bm = splitk.decode_block_m(m)
    if aligned:
        block_k = block_k_for(256 if bm == 1 else 128, group, k)
        bn = 64 if bm == 16 or block_k >= 256 else 128
    else:
        block_k = block_k_for(64 if bm == 1 else 32, group, k)
        bn = 64
    return splitk.decode_config(bm, bn, block_k, n, k, sms, split_k)


# ----------------------------------------------------------------------------- launch

def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                path: str = "auto", split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (last dim contiguous) -> y [M, N] in x.dtype. Inputs validated by the op;
    qweight may have any strides, scales / zeros are made contiguous here.

    path: "auto" (M <= 16 -> gemv, else gemm), "gemm" or "gemv"; split_k forces the
    decode path's split count (tests).
    """
    m, k = x.shape
    y, done = splitk.alloc_output(x, qweight.shape[0], bias)
    if done:
        return y
    group = k if group_size == -1 else group_size
    scales, zeros = scales.contiguous(), zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    arch, sms = splitk.arch_and_sms(splitk.device_index(x))
    interp_bf16 = splitk.interpreter_bf16(x)
    aligned = splitk.aligned_rows(x, qweight)
    tensors = (x, qweight, scales, zeros)
    ints = (m, y.shape[1], k, x.stride(0), qweight.stride(0), qweight.stride(1), group,
            k // group)
    const = {"ALIGNED": aligned, "DOT_F32": interp_bf16, "RNE_BF16": interp_bf16}
    if splitk.pick_path(path, m) == "gemm":
        splitk.launch_gemm(int8_gemm_kernel, tensors, ints, y, bias,
                           gemm_config(m, y.shape[1], k, group, arch, aligned), k, **const)
    else:
        splitk.launch_decode(int8_gemv_kernel, tensors, ints, y, bias,
                             gemv_config(m, y.shape[1], k, group, sms, split_k, aligned), k,
                             rne_bf16=interp_bf16, **const)
    return y


# --------------------------------------------------------------------------- registry
# Aligned configs compile as dispatched for a contiguous weight: Triton's JIT specializes
# a stride of 1 to a constant (stride_wk), and the ALIGNED hints let the byte tiles load
# 16 bytes at a time. Unaligned configs (odd K, padded rows, a transposed weight) compile
# with every stride a runtime value and byte loads.

_ARGS = {"qw_ptr": "*u8", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i64",
         "stride_wn": "i64", "stride_wk": "i64", "group": "i32", "num_groups": "i32",
         "ws_ptr": "*fp32", "k_tiles_per_split": "i32"}

_K = 8192
for _dt in ("fp16", "bf16"):
    _args = {"x_ptr": f"*{_dt}", "s_ptr": f"*{_dt}", "z_ptr": f"*{_dt}", "bias_ptr": f"*{_dt}",
             "y_ptr": f"*{_dt}", **_ARGS}
    for _aligned in (True, False):
        _const = {"EVEN_K": _aligned, "ALIGNED": _aligned, "DOT_F32": False, "RNE_BF16": False,
                  **({"stride_wk": 1} if _aligned else {})}
        _tag = "" if _aligned else ",unaligned"
        # GEMM: arch config x M x group (g128; g32 -> BLOCK_K 32; per channel)
        for _arch, _m in ((90, 64), (90, 4096), (80, 32), (80, 4096)):
            for _g in (128, 32, -1):
                if (_g == -1 or not _aligned) and _m != 4096:
                    continue
                if not _aligned and _g != 128:
                    continue
                _cfg = gemm_config(_m, _K, _K, _K if _g == -1 else _g, _arch, _aligned)
                splitk.register_config(f"int8_matmul_gemm[{_dt},sm{_arch}cfg,M={_m},g={_g}{_tag}]",
                                       int8_gemm_kernel, _cfg, _args, {"HAS_BIAS": False, **_const},
                                       tensor_core=True,
                                       wgmma_expected=_arch >= 90 and _cfg["BLOCK_M"] >= 64,
                                       archs=(_arch,))
        # decode: M = 1 (FMAs) and M = 16 (swap-AB MMA, wgmma m64n16), both archs
        for _m in (1, 16):
            for _g in (128, 32, -1):
                if not _aligned and _g != 128:
                    continue
                _cfg = gemv_config(_m, _K, _K, _K if _g == -1 else _g, 132, None, _aligned)
                splitk.register_config(f"int8_matmul_gemv[{_dt},M={_m},g={_g}{_tag}]",
                                       int8_gemv_kernel, _cfg, _args, {"HAS_BIAS": True, **_const},
                                       tensor_core=_m > 1, wgmma_expected=True)
