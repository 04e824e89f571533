"""INT8 W8A8 in Triton (SmoothQuant-style, vLLM's compressed-tensors int8 scheme):
activation quantization per token (or per tensor) and the scaled int8 GEMM.

Layouts and the exact math: minikernels.ops.reference (scaled_int8_quant, scaled_mm).
Every tensor is read through its own strides.

scaled_int8_quant — one program per row of x:
    dynamic: pass 1 reduces the row (max |x|, or min and max) over K tiles and derives
             the row's scale (and zero point); static: the scale (and azp) is loaded;
    pass 2 (the same tile still in registers when the row fits one tile):
             q = clamp(round_half_even(x / s) (+ azp), -128, 127) -> int8.
    Divisions are IEEE (div_rn; Triton's `/` is approximate on CUDA) and the rounding is
    written out (`_round_half_even`), so the interpreter and the GPU give the reference's
    bits.

scaled_mm — per program one [BLOCK_M, BLOCK_N] tile of out (grouped tile order):
    for each K tile of its K range:
        acc += A_tile @ B_tile on tensor cores (int8 x int8 -> exact int32; fp8 -> fp32)
    asymmetric activations (vLLM's cutlass_scaled_mm_azp): acc -= azp[m] * azp_adj[n]
        in int32 (azp_adj = the column sums of b; a per-tensor azp comes folded into it)
    epilogue in fp32: out = scale_a[m] * (scale_b[n] * float(acc)) (+ bias[n]), one cast.
    Decode (M <= 16): BLOCK_M 16 and split-K: SPLIT programs per tile each write their
    partial accumulator (int32 for int8: exact, so the split changes no bit) to a
    workspace [SPLIT, M, N]; `scaled_mm_reduce_kernel` adds them in split order and runs
    the same epilogue (deterministic: no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register
from .splitk import GEMV_MAX_M, arch_and_sms, device_index, split_plan
from .tiling import grouped_tile

TWO_23 = tl.constexpr(8388608.0)          # 2^23: fp32 values this large are integers
AZP_MAX = tl.constexpr(2147483520.0)      # largest fp32 below 2^31
_REDUCE_BLOCK = 1024


def _empty_int8(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int8 output buffer; in poison mode (tests) filled with 0xA5 (-91), a byte the
    int8 sentinel of _alloc cannot hold, so an unwritten element fails the comparison."""
    t = torch.empty(shape, dtype=torch.int8, device=device)
    if _alloc.poison_enabled() and t.numel():
        t.fill_(-91)
    return t


# ------------------------------------------------------------------- quantization

@triton.jit
def _round_half_even(v):
    """fp32 v rounded to the nearest integer, ties to even (torch.round): adding and
    subtracting 2^23 (sign of v) leaves v's integer part, rounded by the fp32 adder in
    round-to-nearest-even; |v| >= 2^23 is already an integer. Same bits in the
    interpreter and on the GPU (no libdevice call)."""
    big = tl.where(v < 0, -TWO_23, TWO_23)
    r = (v + big) - big
    return tl.where(tl.abs(v) < TWO_23, r, v)


@triton.jit
def _safe_div(x, s):
    """x / s, IEEE-rounded; 0 where s == 0 (an all-zero row's scale)."""
    return tl.where(s == 0, 0.0, tl.math.div_rn(x, tl.where(s == 0, 1.0, s)))


@triton.jit
def _quantize_store(x, s, azp_f, q_ptrs, mask, ASYM: tl.constexpr):
    v = _round_half_even(_safe_div(x, s))
    if ASYM:
        v = v + azp_f
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    tl.store(q_ptrs, v.to(tl.int8), mask=mask)


@triton.jit
def _row_scale(amax, lo, hi, SYMMETRIC: tl.constexpr):
    """(scale, azp as fp32) of a row from its max |x| (symmetric) or min / max."""
    if SYMMETRIC:
        return tl.math.div_rn(amax, 127.0), 0.0
    same = lo == hi           # a constant row: widen the range to include 0
    lo = tl.where(same, tl.minimum(lo, 0.0), lo)
    hi = tl.where(same, tl.maximum(hi, 0.0), hi)
    s = tl.math.div_rn(hi - lo, 255.0)
    azp = _round_half_even(-128.0 - _safe_div(lo, s))
    return s, tl.minimum(tl.maximum(azp, -2147483648.0), AZP_MAX)


@triton.jit
def scaled_int8_quant_kernel(
        x_ptr, q_ptr, s_ptr, azp_ptr, K, stride_xm, stride_xk,
        BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, STATIC: tl.constexpr,
        SYMMETRIC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    cols = tl.arange(0, BLOCK_K)
    ASYM: tl.constexpr = not SYMMETRIC
    if STATIC:                                  # per-tensor scale (and azp) given
        s = tl.load(s_ptr)
        azp_f = tl.load(azp_ptr).to(tl.float32) if ASYM else 0.0
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + (k0 + cols) * stride_xk, mask=mask, other=0.0)
            _quantize_store(x.to(tl.float32), s, azp_f, q_row + k0 + cols, mask, ASYM)
    elif ONE_TILE:                              # the row in registers: read x once
        mask = cols < K
        x = tl.load(x_row + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        hi = tl.max(tl.where(mask, x, -float("inf")), axis=0)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
        s, azp_f = _row_scale(amax, lo, hi, SYMMETRIC)
        tl.store(s_ptr + row, s)
        if ASYM:
            tl.store(azp_ptr + row, azp_f.to(tl.int32))
        _quantize_store(x, s, azp_f, q_row + cols, mask, ASYM)
    else:                                       # pass 1: reduce the row; pass 2: quantize
        amax_v = tl.zeros([BLOCK_K], dtype=tl.float32)
        hi_v = tl.full([BLOCK_K], -float("inf"), dtype=tl.float32)
        lo_v = tl.full([BLOCK_K], float("inf"), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + (k0 + cols) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            if SYMMETRIC:
                amax_v = tl.maximum(amax_v, tl.abs(x))
            else:
                hi_v = tl.maximum(hi_v, tl.where(mask, x, -float("inf")))
                lo_v = tl.minimum(lo_v, tl.where(mask, x, float("inf")))
        s, azp_f = _row_scale(tl.max(amax_v, axis=0), tl.min(lo_v, axis=0),
                              tl.max(hi_v, axis=0), SYMMETRIC)
        tl.store(s_ptr + row, s)
        if ASYM:
            tl.store(azp_ptr + row, azp_f.to(tl.int32))
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + (k0 + cols) * stride_xk, mask=mask, other=0.0)
            _quantize_store(x.to(tl.float32), s, azp_f, q_row + k0 + cols, mask, ASYM)


# ------------------------------------------------------------------------- GEMM

@triton.jit
def _scaled_epilogue(acc, rm, rn, M, N, sa_ptr, sb_ptr, bias_ptr, c_ptr, adj_ptr, azp_ptr,
                     stride_sa, stride_sb, stride_bias, PER_TOKEN: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     AZP: tl.constexpr, RNE_BF16: tl.constexpr):
    """out[m, n] = sa[m] * (sb[n] * float(acc')) (+ bias[n]) in fp32, cast, masked store,
    acc' = acc minus the activations' zero point term (int32, exact): AZP 1 acc - adj[n]
    (a per-tensor zero point folded into adj), AZP 2 acc - azp[m] * adj[n] (per token).
    rm / rn: [BM, 1] / [1, BN] row / column indices (any values; masked here)."""
    m_ok = rm < M
    n_ok = rn < N
    if AZP != 0:
        adj = tl.load(adj_ptr + rn.to(tl.int64), mask=n_ok, other=0)
        if AZP == 2:
            adj = adj * tl.load(azp_ptr + rm.to(tl.int64), mask=m_ok, other=0)
        acc = acc - adj
    if PER_TOKEN:
        sa = tl.load(sa_ptr + rm.to(tl.int64) * stride_sa, mask=m_ok, other=0.0)
    else:
        sa = tl.load(sa_ptr)
    if PER_CHANNEL:
        sb = tl.load(sb_ptr + rn.to(tl.int64) * stride_sb, mask=n_ok, other=0.0)
    else:
        sb = tl.load(sb_ptr)
    out = sa * (sb * acc.to(tl.float32))
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn.to(tl.int64) * stride_bias, mask=n_ok,
                       other=0.0).to(tl.float32)
    if RNE_BF16:   # interpreter only (see interpreter_rounding)
        out = rne_bf16(out)
    tl.store(c_ptr + rm.to(tl.int64) * N + rn, out.to(c_ptr.dtype.element_ty),
             mask=m_ok & n_ok)


@triton.jit
def scaled_mm_kernel(
        a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, ws_ptr, adj_ptr, azp_ptr, M, N, K,
        k_tiles_per_split, stride_am, stride_ak, stride_bk, stride_bn, stride_sa, stride_sb,
        stride_bias, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, INT8: tl.constexpr,
        PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
        AZP: tl.constexpr, SPLIT: tl.constexpr, RNE_BF16: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = (rm % M).to(tl.int64)        # clamped rows / columns for loads; stores masked
    rn_l = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    kt_lo = pid_k * k_tiles_per_split                           # this split's K tiles
    kt_hi = tl.minimum(kt_lo + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    k_first = kt_lo * BLOCK_K
    a_ptrs = a_ptr + rm_l[:, None] * stride_am + (k_first + rk)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_first + rk)[:, None] * stride_bk + rn_l[None, :] * stride_bn
    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = kt * BLOCK_K + rk < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        # int8: exact int32 accumulation; fp8: fp32. out_dtype names the accumulator's
        # type: triton 3.6 (the H200 image) defaults it to fp32 and refuses an int32 acc
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SPLIT == 1:
        _scaled_epilogue(acc, rm[:, None], rn[None, :], M, N, sa_ptr, sb_ptr, bias_ptr,
                         c_ptr, adj_ptr, azp_ptr, stride_sa, stride_sb, stride_bias,
                         PER_TOKEN, PER_CHANNEL, HAS_BIAS, AZP, RNE_BF16)
    else:                               # partial accumulator -> ws[pid_k, m, n]
        ws = ws_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ws, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def scaled_mm_reduce_kernel(
        ws_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, adj_ptr, azp_ptr, M, N, stride_sa,
        stride_sb, stride_bias, PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr,
        HAS_BIAS: tl.constexpr, AZP: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    """Split-K: acc = the partials summed in split order 0..SPLIT-1 (int32: exact), then
    scaled_mm's epilogue."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mn = M * N                  # M <= 16 on this path: no int32 overflow
    mask = offs < mn
    acc = tl.zeros((BLOCK,), dtype=ws_ptr.dtype.element_ty)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * mn + offs, mask=mask, other=0)
    rm = tl.where(mask, offs // N, M)               # out-of-range -> row M (masked)
    rn = offs % N
    _scaled_epilogue(acc, rm, rn, M, N, sa_ptr, sb_ptr, bias_ptr, c_ptr, adj_ptr, azp_ptr,
                     stride_sa, stride_sb, stride_bias, PER_TOKEN, PER_CHANNEL, HAS_BIAS,
                     AZP, RNE_BF16)


# ----------------------------------------------------------------------------- configs

def mm_config(m: int, n: int, k: int, arch: int, sms: int,
              split_k: int | None = None) -> dict:
    """Tile config. M <= 16 (decode): 16 x 64 tiles, K split so about 4 programs run per
    SM; M <= 64: 64 x 128; larger: 128 x 128 with 8 warps (wgmma on sm_90a from BLOCK_M
    64 on). BLOCK_K 128 (128 bytes of a row per tile: 16-byte vector loads)."""
    if m <= GEMV_MAX_M:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4 if arch >= 90 else 3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4 if arch >= 90 else 3)
    cfg.update(BLOCK_K=128, GROUP_M=8)
    k_tiles = triton.cdiv(k, cfg["BLOCK_K"])
    split, per = 1, k_tiles
    if k_tiles and (m <= GEMV_MAX_M or split_k is not None):
        split, per = split_plan(k_tiles, triton.cdiv(n, cfg["BLOCK_N"]), sms, split_k)
    return dict(cfg, SPLIT=split, K_TILES_PER_SPLIT=per)


# ----------------------------------------------------------------------------- launch

def scaled_int8_quant(x: torch.Tensor, scale: torch.Tensor | None, azp: torch.Tensor | None,
                      symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (any strides) -> (x_q [M, K] int8 contiguous, scales, azp). Dynamic:
    scales [M, 1] fp32 and azp [M, 1] int32 (asymmetric; else an empty [0]); static: the
    given scale / azp are read, and scales / azp come back empty [0]. Validated inputs."""
    m, k = x.shape
    dev = x.device
    x_q = _empty_int8((m, k), dev)
    static = scale is not None
    s = _alloc.empty((0,) if static else (m, 1), torch.float32, dev)
    z = _alloc.empty((0,) if static or symmetric else (m, 1), torch.int32, dev)
    if m == 0:
        return x_q, s, z
    if k == 0:                      # no elements: the scale of an all-zero row
        if not static:
            s.zero_()
            z.fill_(-128)
        return x_q, s, z
    block_k = min(triton.next_power_of_2(k), 4096)
    scaled_int8_quant_kernel[(m,)](
        x, x_q, scale if static else s, azp if azp is not None else z, k, x.stride(0),
        x.stride(1), BLOCK_K=block_k, ONE_TILE=k <= block_k, STATIC=static,
        SYMMETRIC=symmetric, num_warps=4 if block_k <= 1024 else 8)
    return x_q, s, z


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None,
              azp_adj: torch.Tensor | None = None, azp: torch.Tensor | None = None,
              split_k: int | None = None) -> torch.Tensor:
    """a [M, K], b [K, N] (int8 or fp8 e4m3, any strides), scale_a [1] / [M], scale_b
    [1] / [N], bias [N] or None (1-D, any stride), int8 only: azp_adj int32 [N] and azp
    int32 [M] or None (both contiguous) -> out [M, N] (contiguous) in out_dtype.
    split_k forces the K split count (tests). Inputs validated by the op."""
    m, k = a.shape
    n = b.shape[1]
    c = _alloc.empty((m, n), out_dtype, a.device)
    if m == 0 or n == 0:
        return c
    arch, sms = arch_and_sms(device_index(a))
    cfg = mm_config(m, n, k, arch, sms, split_k)
    split = cfg["SPLIT"]
    int8 = a.dtype == torch.int8
    rne = not a.is_cuda and out_dtype == torch.bfloat16
    has_bias = bias is not None
    ws = c
    if split > 1:
        ws = _alloc.empty((split, m, n), torch.int32 if int8 else torch.float32, a.device)
    bias_arg = bias if has_bias else c
    flags = dict(PER_TOKEN=scale_a.numel() != 1, PER_CHANNEL=scale_b.numel() != 1,
                 HAS_BIAS=has_bias, AZP=0 if azp_adj is None else 1 if azp is None else 2,
                 RNE_BF16=rne)
    zp = (azp_adj if azp_adj is not None else scale_a, azp if azp is not None else scale_a)
    strides = (scale_a.stride(0), scale_b.stride(0), bias.stride(0) if has_bias else 0)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    scaled_mm_kernel[grid](
        a, b, scale_a, scale_b, bias_arg, c, ws, *zp, m, n, k, cfg["K_TILES_PER_SPLIT"],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *strides,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], EVEN_K=k % cfg["BLOCK_K"] == 0, INT8=int8, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
    if split > 1:
        scaled_mm_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            ws, scale_a, scale_b, bias_arg, c, *zp, m, n, *strides, SPLIT=split,
            BLOCK=_REDUCE_BLOCK, num_warps=4, **flags)
    return c


# --------------------------------------------------------------------------- registry
# Compiled as Triton specializes them at run time for the usual call: a row-major, b =
# weight.t() (column-major: unit K stride), 16-byte aligned pointers, per-token scale_a /
# per-channel scale_b with unit strides; pointers / row strides / N / K multiples of 16.
# int8 on sm_80 and sm_90a; fp8 (e4m3) on sm_90a only (fp8 tensor cores: sm_89+).

_OUT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_IN = {"int8": "*i8", "fp8": "*fp8e4nv"}
_MM_INTS = {"M": "i32", "N": "i32", "K": "i32", "k_tiles_per_split": "i32",
            "stride_am": "i64", "stride_bn": "i64", "stride_bias": "i64"}

# (input, output, M, K a multiple of BLOCK_K, has bias, per-token scale_a, azp mode)
_MM_CASES = ([("int8", out, m, True, False, True, 0) for out in ("bf16", "fp16", "fp32")
              for m in (16, 64, 4096)]
             + [("int8", "bf16", 16, False, True, True, 0),
                ("int8", "bf16", 4096, False, True, True, 0),
                ("fp8", "bf16", 16, True, False, True, 0),
                ("fp8", "bf16", 4096, True, False, True, 0),
                ("fp8", "fp16", 4096, False, True, True, 0)]
             # the bias-free decode steps the engine launches (per-tensor scale_a: static)
             + [("int8", out, 16, even, False, tok, 0) for out in ("bf16", "fp16")
                for even, tok in ((False, False), (True, False), (False, True))]
             # asymmetric activations: per-token zero points (dynamic), per-tensor (static)
             + [("int8", "bf16", m, True, False, True, 2) for m in (16, 64, 4096)]
             + [("int8", "bf16", 4096, False, True, False, 1)])
for _in, _out, _m, _even, _bias, _tok, _azp in _MM_CASES:
    for _arch in ((80, 90) if _in == "int8" else (90,)):
        _cfg = mm_config(_m, 4096, 4096, _arch, 132)
        _const = {"stride_ak": 1, "stride_bk": 1, "stride_sa": 1, "stride_sb": 1,
                  "BLOCK_M": _cfg["BLOCK_M"], "BLOCK_N": _cfg["BLOCK_N"],
                  "BLOCK_K": _cfg["BLOCK_K"], "GROUP_M": _cfg["GROUP_M"], "EVEN_K": _even,
                  "INT8": _in == "int8", "PER_TOKEN": _tok, "PER_CHANNEL": True,
                  "HAS_BIAS": _bias, "AZP": _azp, "SPLIT": _cfg["SPLIT"], "RNE_BF16": False}
        _sig = {"a_ptr": _IN[_in], "b_ptr": _IN[_in], "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                "bias_ptr": _OUT[_out], "c_ptr": _OUT[_out],
                "ws_ptr": "*i32" if _in == "int8" else "*fp32",
                "adj_ptr": "*i32" if _azp else "*fp32", "azp_ptr": "*i32" if _azp == 2 else
                "*fp32", **_MM_INTS, **{c: "constexpr" for c in _const}}
        _div = ("a_ptr", "b_ptr", "sa_ptr", "sb_ptr", "bias_ptr", "c_ptr", "ws_ptr", "N", "K",
                "stride_am", "stride_bn")
        register(KernelSpec(
            name=f"scaled_mm[{_in},{_out},M={_m}{'' if _even else ',k_tail'}"
                 f"{',bias' if _bias else ''}{'' if _tok else ',per_tensor'}"
                 f"{('', ',azp', ',azp_token')[_azp]},sm{_arch}]",
            fn=scaled_mm_kernel,
            signature={a: _sig[a] for a in scaled_mm_kernel.arg_names},
            constexprs=_const, num_warps=_cfg["num_warps"], num_stages=_cfg["num_stages"],
            tensor_core=True, wgmma_expected=_cfg["BLOCK_M"] >= 64, archs=(_arch,),
            divisible_by_16=_div))

# (accumulator, output, bias, per-token scale_a): the last two are the bias-free decode
# steps of W8A8 models (split-K at M <= 16), per-token and static per-tensor activations
for _acc, _out, _bias, _tok, _azp in (
        ("int8", "bf16", True, True, 0), ("int8", "fp16", True, True, 0),
        ("fp8", "bf16", True, True, 0), ("int8", "bf16", False, True, 0),
        ("int8", "bf16", False, False, 0), ("int8", "bf16", False, True, 2)):
    _const = {"stride_sa": 1, "stride_sb": 1, "PER_TOKEN": _tok, "PER_CHANNEL": True,
              "HAS_BIAS": _bias, "AZP": _azp, "SPLIT": 4, "BLOCK": _REDUCE_BLOCK,
              "RNE_BF16": False}
    _sig = {"ws_ptr": "*i32" if _acc == "int8" else "*fp32", "sa_ptr": "*fp32",
            "sb_ptr": "*fp32", "bias_ptr": _OUT[_out], "c_ptr": _OUT[_out],
            "adj_ptr": "*i32" if _azp else "*fp32", "azp_ptr": "*i32" if _azp == 2 else
            "*fp32", "M": "i32", "N": "i32", "stride_bias": "i64",
            **{c: "constexpr" for c in _const}}
    register(KernelSpec(
        name=f"scaled_mm_reduce[{_acc},{_out}{',bias' if _bias else ''}"
             f"{'' if _tok else ',per_tensor'}{('', ',azp', ',azp_token')[_azp]}]",
        fn=scaled_mm_reduce_kernel,
        signature={a: _sig[a] for a in scaled_mm_reduce_kernel.arg_names},
        constexprs=_const, num_warps=4, num_stages=1,
        divisible_by_16=("ws_ptr", "c_ptr", "N")))

for _dt in ("bf16", "fp16", "fp32"):
    for _static, _sym, _k in ((False, True, 4096), (False, False, 4096), (True, True, 4096),
                              (True, False, 4096), (False, True, 14336)):
        _bk = min(triton.next_power_of_2(_k), 4096)
        _const = {"stride_xk": 1, "BLOCK_K": _bk, "ONE_TILE": _k <= _bk, "STATIC": _static,
                  "SYMMETRIC": _sym}
        _sig = {"x_ptr": f"*{_dt}", "q_ptr": "*i8", "s_ptr": "*fp32", "azp_ptr": "*i32",
                "K": "i32", "stride_xm": "i64", **{c: "constexpr" for c in _const}}
        register(KernelSpec(
            name=f"scaled_int8_quant[{_dt},{'static' if _static else 'dynamic'},"
                 f"{'sym' if _sym else 'asym'},K={_k}]",
            fn=scaled_int8_quant_kernel,
            signature={a: _sig[a] for a in scaled_int8_quant_kernel.arg_names},
            constexprs=_const, num_warps=4 if _bk <= 1024 else 8, num_stages=1,
            divisible_by_16=("x_ptr", "q_ptr", "K", "stride_xm")))
