"""int4 weight-only matmul (W4A16) in Triton: a tensor-core GEMM and a split-K GEMV.

Weight layout (canonical, see minikernels.ops.reference): qweight int32 [N, K/8], nibble j
of word w = q[n, 8w + j]; scales/zeros [N, K/G]; W = (q - z) * s. y = x @ W^T (+ bias).

GEMM (larger M) — algorithm, per program one [BLOCK_M, BLOCK_N] tile of y:
    for each K tile: load x [BM, BK]; load the packed words [BN, BK/8]; unpack the 8 nibbles
    of each word with shifts into [BN, BK]; dequantize (q - z) * s in fp32 (one scale/zero
    per row when the tile sits in one group, else a gathered [BN, BK] scale); round to x's
    dtype; acc += x @ W^T on tensor cores (wgmma on sm_90, mma.sync on sm_80); fp32 acc.
    Epilogue: + bias, cast, masked store.
GEMV / split-K (M <= 16, decode) — per program BLOCK_N outputs and one slice of K:
    M == 1: CUDA-core FMAs, acc[n] += s * sum_k (q - z) x (the scale applied once per tile);
    2 <= M <= 16: "swap AB": acc[BN, 16] += W [BN, BK] @ x^T [BK, 16] so the wide weight
    tile is the MMA's M side (wgmma m64n16 on sm_90) and the padded M is the narrow side.
    With SPLIT > 1 the partial sums go to an fp32 workspace [SPLIT, M, N] and a small
    kernel adds them (+ bias) in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .splitk import decode_tile, store_decode_tile
from .tiling import gemm_tile, store_gemm_tile


@triton.jit
def _unpack_nibbles(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 words [ROWS, COLS / 8] -> nibbles [ROWS, COLS], column 8w + j = nibble j of w.

    Built with joins (each adds a trailing in-thread axis), so every thread unpacks the
    words it loaded and the final reshape moves no data between threads.
    """
    n0 = words & 0xF
    n1 = (words >> 4) & 0xF
    n2 = (words >> 8) & 0xF
    n3 = (words >> 12) & 0xF
    n4 = (words >> 16) & 0xF
    n5 = (words >> 20) & 0xF
    n6 = (words >> 24) & 0xF
    n7 = (words >> 28) & 0xF
    # j = 4a + 2b + c: the first join picks a (slowest), the last picks c (fastest)
    r0 = tl.join(tl.join(n0, n4), tl.join(n2, n6))      # [.., a, b] = n(4a + 2b)
    r1 = tl.join(tl.join(n1, n5), tl.join(n3, n7))      # [.., a, b] = n(4a + 2b + 1)
    return tl.reshape(tl.join(r0, r1), (ROWS, COLS))


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, k0, K, group, num_groups,
                  BLOCK_K: tl.constexpr, SCALE_PER_TILE: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows rn [BN] x columns k0..k0+BK of W in the scales' dtype [BN, BK] (0 beyond K).

    (q - z) * s is exact in fp32 (5-bit integer times an fp16/bf16 scale), so the one
    rounding is the final cast: the same W as the reference's, rounded to x's dtype.
    """
    dt = s_ptr.dtype.element_ty
    rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    w_ptrs = qw_ptr + rn[:, None].to(tl.int64) * (K // 8) + rw[None, :]
    if EVEN_K:
        words = tl.load(w_ptrs)
    else:
        words = tl.load(w_ptrs, mask=rw[None, :] < K // 8, other=0)
    q = _unpack_nibbles(words, rn.shape[0], BLOCK_K).to(tl.float32)
    if SCALE_PER_TILE:
        g = k0 // group
        s = tl.load(s_ptr + rn * num_groups + g).to(tl.float32)
        z = tl.load(z_ptr + rn * num_groups + g).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        g = tl.minimum(rk // group, num_groups - 1)
        idx = rn[:, None] * num_groups + g[None, :]
        s = tl.load(s_ptr + idx).to(tl.float32)
        z = tl.load(z_ptr + idx).to(tl.float32)
        w = (q - z) * s
    return w.to(dt)


@triton.jit
def int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, K, stride_xm,
                     group, num_groups, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     SCALE_PER_TILE: tl.constexpr, EVEN_K: tl.constexpr,
                     DOT_F32: tl.constexpr = False):
    rm, rn, rm_l, rn_l, rk = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K,
                                       GROUP_M)           # rm_l, rn_l: clamped for loads
    x_ptrs = x_ptr + rm_l[:, None].to(tl.int64) * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rn_l, k0, K, group, num_groups,
                          BLOCK_K, SCALE_PER_TILE, EVEN_K)
        if DOT_F32:   # interpreter workaround: its bf16 tl.dot is wrong; same values in fp32
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        x_ptrs += BLOCK_K
    store_gemm_tile(acc, rm, rn, rn_l, bias_ptr, y_ptr, M, N, HAS_BIAS, False)


@triton.jit
def int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K,
                     stride_xm, group, num_groups, k_tiles_per_split,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                     EVEN_K: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr = False):
    pid_k, rn, rn_l, rk, k_begin, k_end = decode_tile(N, K, k_tiles_per_split, BLOCK_N,
                                                      BLOCK_K)    # rn_l: clamped for loads
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + k0 + rk).to(tl.float32)
            else:
                x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            w_ptrs = qw_ptr + rn_l[:, None].to(tl.int64) * (K // 8) + rw[None, :]
            if EVEN_K:
                words = tl.load(w_ptrs)
            else:
                words = tl.load(w_ptrs, mask=rw[None, :] < K // 8, other=0)
            q = _unpack_nibbles(words, BLOCK_N, BLOCK_K).to(tl.float32)
            if SCALE_PER_TILE:
                # sum_k (q - z) s x = s * (sum_k q x - z sum_k x): one scale per tile
                g = k0 // group
                s = tl.load(s_ptr + rn_l * num_groups + g).to(tl.float32)
                z = tl.load(z_ptr + rn_l * num_groups + g).to(tl.float32)
                acc += s * (tl.sum(q * x[None, :], axis=1) - z * tl.sum(x, axis=0))
            else:
                g = tl.minimum((k0 + rk) // group, num_groups - 1)
                idx = rn_l[:, None] * num_groups + g[None, :]
                s = tl.load(s_ptr + idx).to(tl.float32)
                z = tl.load(z_ptr + idx).to(tl.float32)
                acc += tl.sum((q - z) * s * x[None, :], axis=1)
        out = acc[:, None]                                     # [BN, 1]
    else:
        rm = tl.arange(0, BLOCK_M)
        x_ptrs = x_ptr + (rm % M)[:, None].to(tl.int64) * stride_xm + rk[None, :]
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs + k0, mask=rm[:, None] < M, other=0.0)
            else:
                x = tl.load(x_ptrs + k0, mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K),
                            other=0.0)
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rn_l, k0, K, group, num_groups,
                              BLOCK_K, SCALE_PER_TILE, EVEN_K)
            if DOT_F32:
                acc2 = tl.dot(w.to(x.dtype).to(tl.float32), tl.trans(x.to(tl.float32)), acc2,
                              input_precision="ieee")
            else:
                acc2 = tl.dot(w.to(x.dtype), tl.trans(x), acc2)   # [BN, BM]
        out = acc2
    store_decode_tile(out, rn, rn_l, pid_k, bias_ptr, y_ptr, ws_ptr, M, N, HAS_BIAS, BLOCK_M,
                      SPLIT, False)


# ----------------------------------------------------------------------------- configs

def _block_k(cfg_bk: int, group: int, k: int) -> tuple[int, bool]:
    """BLOCK_K and whether each K tile lies inside one group (one scale per row)."""
    bk = cfg_bk
    while bk > 16 and group % bk:
        bk //= 2
    if group % bk == 0:
        return bk, True
    return cfg_bk, False


def gemm_config(m: int, n: int, k: int, group: int, arch: int) -> dict:
    """Tile config for the GEMM path. sm_90: BM >= 64 with 4/8 warps -> wgmma."""
    # BLOCK_K = 32: BK = 64 tiles spill registers on sm_80 with the unpacked weight tile
    if arch >= 90:
        if m <= 64:
            bm, bn, bk, warps, stages = 64, 128, 32, 4, 4
        else:
            bm, bn, bk, warps, stages = 128, 128, 32, 8, 4
    else:
        if m <= 32:
            bm, bn, bk, warps, stages = 32, 128, 64, 4, 4
        elif m <= 64:
            bm, bn, bk, warps, stages = 64, 128, 32, 4, 4
        else:
            bm, bn, bk, warps, stages = 128, 128, 32, 8, 4
    bk, per_tile = _block_k(bk, group, k)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SCALE_PER_TILE=per_tile,
                num_warps=warps, num_stages=stages, GROUP_M=8)


def gemv_config(m: int, n: int, k: int, group: int, sms: int, split_k: int | None) -> dict:
    bm = splitk.decode_block_m(m)
    bk, per_tile = _block_k(256 if bm == 1 else 128, group, k)
    return splitk.decode_config(bm, 64, bk, n, k, sms, split_k, SCALE_PER_TILE=per_tile)


# ----------------------------------------------------------------------------- launch

def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                path: str = "auto", split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (last dim contiguous) -> y [M, N] in x.dtype. Inputs validated by the op.

    path: "auto" (M <= 16 -> gemv, else gemm), "gemm" or "gemv"; split_k forces the GEMV
    split count (tests).
    """
    m, k = x.shape
    y, done = splitk.alloc_output(x, qweight.shape[0], bias)
    if done:
        return y
    group = k if group_size == -1 else group_size
    if scales.dtype != x.dtype:
        scales, zeros = scales.to(x.dtype), zeros.to(x.dtype)
    if bias is not None:
        bias = bias.contiguous()
    arch, sms = splitk.arch_and_sms(splitk.device_index(x))
    dot_f32 = splitk.interpreter_bf16(x)   # (the int4 kernels round no bf16 values of their own)
    tensors = (x, qweight, scales, zeros)
    ints = (m, y.shape[1], k, x.stride(0), group, k // group)
    if splitk.pick_path(path, m) == "gemm":
        splitk.launch_gemm(int4_gemm_kernel, tensors, ints, y, bias,
                           gemm_config(m, y.shape[1], k, group, arch), k, DOT_F32=dot_f32)
    else:
        splitk.launch_decode(int4_gemv_kernel, tensors, ints, y, bias,
                             gemv_config(m, y.shape[1], k, group, sms, split_k), k,
                             rne_bf16=dot_f32, DOT_F32=dot_f32)
    return y


# --------------------------------------------------------------------------- registry

_ARGS = {"qw_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i64",
         "group": "i32", "num_groups": "i32", "ws_ptr": "*fp32", "k_tiles_per_split": "i32"}

for _dt in ("fp16", "bf16"):
    _args = {"x_ptr": f"*{_dt}", "s_ptr": f"*{_dt}", "z_ptr": f"*{_dt}", "bias_ptr": f"*{_dt}",
             "y_ptr": f"*{_dt}", **_ARGS}
    for _arch, _m in ((90, 64), (90, 4096), (80, 32), (80, 4096)):
        for _g in (128, 32):
            splitk.register_config(f"int4_gemm[{_dt},sm{_arch}cfg,M={_m},g={_g}]", int4_gemm_kernel,
                                   gemm_config(_m, 4096, 4096, _g, _arch), _args,
                                   {"HAS_BIAS": False, "EVEN_K": True, "DOT_F32": False},
                                   tensor_core=True, wgmma_expected=_arch >= 90)
    for _m in (1, 16):
        for _g in (128, 32):
            splitk.register_config(f"int4_gemv[{_dt},M={_m},g={_g}]", int4_gemv_kernel,
                                   gemv_config(_m, 4096, 4096, _g, 132, None), _args,
                                   {"HAS_BIAS": True, "EVEN_K": True, "DOT_F32": False},
                                   tensor_core=_m > 1, wgmma_expected=True)
            if _g == 128:   # the bias-free decode GEMVs the engine launches
                splitk.register_config(f"int4_gemv[{_dt},M={_m},g={_g},bias=False]",
                                       int4_gemv_kernel,
                                       gemv_config(_m, 4096, 4096, _g, 132, None), _args,
                                       {"HAS_BIAS": False, "EVEN_K": True, "DOT_F32": False},
                                       tensor_core=_m > 1, wgmma_expected=True)
