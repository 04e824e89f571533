"""fp8 (e4m3) weight-only matmul (W8A16) with block-wise scales, in Triton.

Weight (see minikernels.ops.reference): weight float8_e4m3fn [N, K] (read as int8 bytes),
weight_scale fp32 [ceil(N / bn), ceil(K / bk)], W[n, k] = weight[n, k] * scale[n // bn, k // bk].
y = x @ W^T (+ bias), x fp16 / bf16 / fp32, fp32 accumulation, one final rounding.

fp8 -> 16 bits without fp8 hardware (runs on sm_80 and under the interpreter): a byte
b = s eeee mmm becomes the fp16 bits s 0eeee mmm0000000, i.e. ((b & 0x80) << 8) |
((b & 0x7F) << 7), or (b << 7) & 0xBF80 from the sign-extended byte the kernels load
(int8 views; fp8_bits.py). The exponent bias drops from 15 to 7 (the 0 on top), so that
fp16 is exactly W / 256 for every finite e4m3 byte, normal or subnormal; it converts
exactly to bf16 / fp32 as well. The 256 is folded into the scale.

K tiles never straddle two scale blocks: BLOCK_K divides bk (bk % 16 == 0), or one block
covers all of K (bk >= K, ONE_KBLOCK: the scale is applied once, in the epilogue).

GEMM (M > 16) — per program one [BLOCK_M, BLOCK_N] tile of y:
    for each K tile: load x [BM, BK] and the weight bytes [BN, BK]; bytes -> W/256 in x's
    dtype; part = x @ (W/256)^T on tensor cores (wgmma on sm_90a, mma.sync on sm_80), fp32;
    acc += part * 256 * scale[n // bn, k0 // bk] (a per-column fp32 vector).
    Epilogue: + bias, cast, masked store.
Decode (M <= 16) — memory-bound: stream the 1-byte weight at bandwidth. Per program
BLOCK_N outputs and one slice of K (split-K so that N / BLOCK_N x SPLIT fills the SMs):
    M == 1: CUDA-core FMAs, acc[n] += scale * sum_k (W/256)[n, k] x[k];
    2 <= M <= 16: "swap AB", part[BN, 16] = (W/256) [BN, BK] @ x^T [BK, 16], so the wide
    weight tile is the MMA's M side (wgmma m64n16) and the padded M the narrow side.
    SPLIT > 1: each split writes its fp32 partial sums to a workspace [SPLIT, M, N] and a
    small kernel adds them in split order (+ bias) and casts: deterministic (the same bits
    run to run; fp32 atomics would add in arrival order), at the cost of one extra launch
    and SPLIT * M * N * 8 bytes of traffic — tiny beside the weight at M <= 16. The split
    count depends on N, K and the SM count only, not on M.
fp32 x: the dots run in fp32 ("ieee", FMAs): x is never rounded.
Shared with int8_matmul.py: tiling.py's ``gemm_tile`` / ``load_k_tile`` / ``acc_dot`` /
``store_gemm_tile`` (GEMM) and splitk.py's ``decode_tile`` / ``load_decode_vec`` /
``load_decode_rows`` / ``store_decode_tile`` (decode), and the host-side configs' helpers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .fp8_bits import e4m3_bytes_as_fp16
from .splitk import decode_tile, load_decode_rows, load_decode_vec, store_decode_tile
from .tiling import acc_dot, gemm_tile, load_k_tile, store_gemm_tile


@triton.jit
def fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                    stride_xm, stride_wn, stride_wk, stride_sn, stride_sk, block_n, block_k,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ONE_KBLOCK: tl.constexpr,
                    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                    RNE_BF16: tl.constexpr = False):
    rm, rn, rm_l, rn_l, rk = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K,
                                       GROUP_M)           # rm_l, rn_l: clamped for loads
    x_ptrs = x_ptr + rm_l[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_l[:, None].to(tl.int64) * stride_wn + rk[None, :].to(tl.int64) * stride_wk
    s_ptrs = s_ptr + (rn_l // block_n).to(tl.int64) * stride_sn             # [BN], k-block 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if ALIGNED:     # 16-byte aligned rows, unit K strides (the launcher checked)
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        x = load_k_tile(x_ptrs, k0, rk, K, EVEN_K, 0.0)
        wb = load_k_tile(w_ptrs, k0, rk, K, EVEN_K, 0)
        w = e4m3_bytes_as_fp16(wb).to(x.dtype)                                   # W / 256, exact
        if ONE_KBLOCK:      # one scale per column for all of K: apply it in the epilogue
            acc = acc_dot(x, tl.trans(w), acc, DOT_F32)
        else:
            s = tl.load(s_ptrs + (k0 // block_k) * stride_sk) * 256.0
            part = acc_dot(x, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                           DOT_F32)
            acc += part * s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if ONE_KBLOCK:
        acc = acc * (tl.load(s_ptrs) * 256.0)[None, :]
    store_gemm_tile(acc, rm, rn, rn_l, bias_ptr, y_ptr, M, N, HAS_BIAS, RNE_BF16)


@triton.jit
def fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K,
                    stride_xm, stride_wn, stride_wk, stride_sn, stride_sk, block_n, block_k,
                    k_tiles_per_split, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_KBLOCK: tl.constexpr,
                    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, SPLIT: tl.constexpr,
                    DOT_F32: tl.constexpr, RNE_BF16: tl.constexpr = False):
    pid_k, rn, rn_l, rk, k_begin, k_end = decode_tile(N, K, k_tiles_per_split, BLOCK_N,
                                                      BLOCK_K)    # rn_l: clamped for loads
    w_rows = w_ptr + rn_l[:, None].to(tl.int64) * stride_wn                # [BN, 1]
    s_ptrs = s_ptr + (rn_l // block_n).to(tl.int64) * stride_sn             # [BN]
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            x, wb = load_decode_vec(x_ptr, w_rows, k0, rk, K, stride_wk, ALIGNED, EVEN_K)
            part = tl.sum(e4m3_bytes_as_fp16(wb).to(tl.float32) * x[None, :], axis=1)
            if ONE_KBLOCK:
                acc += part
            else:
                acc += part * (tl.load(s_ptrs + (k0 // block_k) * stride_sk) * 256.0)
        if ONE_KBLOCK:
            acc = acc * (tl.load(s_ptrs) * 256.0)
        out = acc[:, None]                                                  # [BN, 1]
    else:
        rm = tl.arange(0, BLOCK_M)
        x_ptrs = x_ptr + (rm % M)[:, None].to(tl.int64) * stride_xm + rk[None, :]
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            x, wb = load_decode_rows(x_ptrs, w_rows, rm, M, k0, rk, K, stride_wk, ALIGNED,
                                     EVEN_K)
            w = e4m3_bytes_as_fp16(wb).to(x.dtype)
            if ONE_KBLOCK:
                acc2 = acc_dot(w, tl.trans(x), acc2, DOT_F32)                  # [BN, BM]
            else:
                s = tl.load(s_ptrs + (k0 // block_k) * stride_sk) * 256.0
                part = acc_dot(w, tl.trans(x), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32),
                            DOT_F32)
                acc2 += part * s[:, None]
        if ONE_KBLOCK:
            acc2 = acc2 * (tl.load(s_ptrs) * 256.0)[:, None]
        out = acc2
    store_decode_tile(out, rn, rn_l, pid_k, bias_ptr, y_ptr, ws_ptr, M, N, HAS_BIAS, BLOCK_M,
                      SPLIT, RNE_BF16)


# ----------------------------------------------------------------------------- configs

def block_k_for(want: int, bk: int, k: int) -> tuple[int, bool]:
    """(BLOCK_K, ONE_KBLOCK): a power of two <= want that divides bk, so that no K tile
    straddles two scale blocks; any (not wider than K needs) when one block spans K."""
    return splitk.block_k_dividing(want, bk, k)


def gemm_config(m: int, n: int, k: int, bk: int, arch: int, fp32: bool,
                aligned: bool = True) -> dict:
    """Tile config for the GEMM path. sm_90: BM >= 64 with 4/8 warps -> wgmma.

    Each K tile's dot goes to a fresh fp32 partial before it is scaled into the
    accumulator (two register tiles), so 128 x 128 tiles take BLOCK_K = 64 unless one
    scale block spans K. Unaligned rows (byte loads, a pointer per element) and fp32 x
    ("ieee" dots on FMAs) take small tiles: no register spills (tests/test_aot_compile.py).
    """
    one = bk >= k
    if fp32:
        bm, bn, bkw, warps, stages = 32, 64, 16, 4, 3
    elif not aligned:
        bm, bn, bkw, warps, stages = 64, 64, 32, 4, 3
    elif arch >= 90:
        if m <= 64:
            bm, bn, bkw, warps, stages = 64, 128, 128, 4, 3
        else:
            bm, bn, bkw, warps, stages = 128, 128, (128 if one else 64), 8, (3 if one else 4)
    else:
        if m <= 32:
            bm, bn, bkw, warps, stages = 32, 128, 64, 4, 4
        elif m <= 64:
            bm, bn, bkw, warps, stages = 64, 128, 64, 4, 4
        else:
            bm, bn, bkw, warps, stages = 128, 128, 64, 8, 3
    block_k, one = block_k_for(bkw, bk, k)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, ONE_KBLOCK=one, GROUP_M=8,
                num_warps=warps, num_stages=stages)


def gemv_config(m: int, n: int, k: int, bk: int, sms: int, split_k: int | None,
                aligned: bool = True) -> dict:
    """Decode config: BLOCK_N x BLOCK_K weight tiles of about 16 KB (vector loads, 128
    bytes per thread in flight per stage; 2-4 KB when unaligned), split-K so that about 4
    programs per SM stream the weight."""
    bm = splitk.decode_block_m(m)
    if aligned:
        block_k, one = block_k_for(256 if bm == 1 else 128, bk, k)
        bn = 64 if bm == 16 or block_k >= 256 else 128
    else:
        block_k, one = block_k_for(64 if bm == 1 else 32, bk, k)
        bn = 64
    return splitk.decode_config(bm, bn, block_k, n, k, sms, split_k, ONE_KBLOCK=one)


# ----------------------------------------------------------------------------- launch

def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_size: tuple[int, int] | list[int], bias: torch.Tensor | None,
               path: str = "auto", split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (last dim contiguous) -> y [M, N] in x.dtype. Inputs validated by the op;
    weight and weight_scale may have any strides.

    path: "auto" (M <= 16 -> gemv, else gemm), "gemm" or "gemv"; split_k forces the
    decode path's split count (tests).
    """
    m, k = x.shape
    n = weight.shape[0]
    # a block past the matrix edge partitions like one of the matrix's size (fits in i32)
    bn, bk = min(int(block_size[0]), n), min(int(block_size[1]), k)
    y, done = splitk.alloc_output(x, n, bias)
    if done:
        return y
    w8 = weight.view(torch.int8)            # the bits (sign-extending loads: fp8_bits.py)
    if bias is not None:
        bias = bias.contiguous()
    arch, sms = splitk.arch_and_sms(splitk.device_index(x))
    interp_bf16 = splitk.interpreter_bf16(x)
    aligned = splitk.aligned_rows(x, w8)
    tensors = (x, w8, weight_scale)
    ints = (m, n, k, x.stride(0), w8.stride(0), w8.stride(1), weight_scale.stride(0),
            weight_scale.stride(1), bn, bk)
    # fp32 x: always fp32 dots ("ieee", FMAs), x is never rounded
    const = {"ALIGNED": aligned, "DOT_F32": x.dtype == torch.float32 or interp_bf16,
             "RNE_BF16": interp_bf16}
    if splitk.pick_path(path, m) == "gemm":
        splitk.launch_gemm(fp8_gemm_kernel, tensors, ints, y, bias,
                           gemm_config(m, n, k, bk, arch, x.dtype == torch.float32, aligned), k,
                           **const)
    else:
        splitk.launch_decode(fp8_gemv_kernel, tensors, ints, y, bias,
                             gemv_config(m, n, k, bk, sms, split_k, aligned), k,
                             rne_bf16=interp_bf16, **const)
    return y


# --------------------------------------------------------------------------- registry
# Aligned configs compile as dispatched for a contiguous weight and scale: Triton's JIT
# specializes a stride of 1 to a constant (stride_wk, stride_sk), and the ALIGNED hints
# let the tile loads vectorize. Unaligned configs (odd K, padded rows, a transposed
# weight) compile with every stride a runtime value and byte loads.

_ARGS = {"w_ptr": "*i8", "s_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
         "stride_xm": "i64", "stride_wn": "i64", "stride_wk": "i64", "stride_sn": "i64",
         "stride_sk": "i64", "block_n": "i32", "block_k": "i32", "ws_ptr": "*fp32",
         "k_tiles_per_split": "i32"}

_K = 8192
_BLOCKS = (("128x128", 128), ("per_channel", _K))
for _dt in ("fp16", "bf16", "fp32"):
    _tc = _dt != "fp32"                 # fp32 "ieee" dots: FMAs, no tensor cores
    _args = {"x_ptr": f"*{_dt}", "bias_ptr": f"*{_dt}", "y_ptr": f"*{_dt}", **_ARGS}
    for _aligned in (True, False):
        _const = {"EVEN_K": _aligned, "ALIGNED": _aligned, "DOT_F32": _dt == "fp32",
                  "RNE_BF16": False, **({"stride_wk": 1, "stride_sk": 1} if _aligned else {})}
        _tag = "" if _aligned else ",unaligned"
        # GEMM: arch config x M x (128x128 blocks | per channel: one scale per row)
        for _arch, _m in ((90, 64), (90, 4096), (80, 32), (80, 4096)):
            for _blk, _bk in _BLOCKS:
                if (_blk == "per_channel" or not _aligned) and _m != 4096:
                    continue
                _cfg = gemm_config(_m, _K, _K, _bk, _arch, _dt == "fp32", _aligned)
                splitk.register_config(f"fp8_matmul_gemm[{_dt},sm{_arch}cfg,M={_m},{_blk}{_tag}]",
                                       fp8_gemm_kernel, _cfg, _args, {"HAS_BIAS": False, **_const},
                                       tensor_core=_tc,
                                       wgmma_expected=_arch >= 90 and _cfg["BLOCK_M"] >= 64,
                                       archs=(_arch,))
        # decode: M = 1 (FMAs) and M = 16 (swap-AB MMA, wgmma m64n16), both archs
        for _m in (1, 16):
            for _blk, _bk in _BLOCKS:
                if not _aligned and _blk == "per_channel":
                    continue
                _cfg = gemv_config(_m, _K, _K, _bk, 132, None, _aligned)
                splitk.register_config(f"fp8_matmul_gemv[{_dt},M={_m},{_blk}{_tag}]",
                                       fp8_gemv_kernel, _cfg, _args, {"HAS_BIAS": True, **_const},
                                       tensor_core=_tc and _m > 1, wgmma_expected=True)
                if _aligned and _tc:   # the bias-free decode GEMVs the engine launches
                    splitk.register_config(f"fp8_matmul_gemv[{_dt},M={_m},{_blk},bias=False]",
                                           fp8_gemv_kernel, _cfg, _args,
                                           {"HAS_BIAS": False, **_const},
                                           tensor_core=_m > 1, wgmma_expected=True)
