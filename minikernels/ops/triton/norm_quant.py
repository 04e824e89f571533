"""RMSNorm fused with int8 / fp8 quantization of its output, in Triton (vLLM's
rms_norm_dynamic_per_token_quant / rms_norm_per_block_quant / rms_norm_static_fp8_quant).

Algorithm: one program per row. The row is seen as a [CG, GP] tile of groups (per-token
mode: one "group", the whole row, or 4096-column slices of it for long rows):
    pass 1  h = x (+ residual: the sum rounded to x's dtype, stored as the new residual);
            reduce sum(h^2) in fp32 -> rstd = rsqrt(mean + eps)
    y       = h * rstd * (w + w_offset), rounded to x's dtype (= ops.rms_norm's output);
            vLLM's rounding instead: round(round(h * rstd) * w)
    scale   static: loaded; dynamic: max |y| per group or row (min with scale_ub),
            s = max(max / qmax, min_scale)
    store   q = clamp(round_half_even(y / s)) as int8, or fp8(clamp(y / s, +-448)).
A row whose padded tile fits 8192 elements stays in registers (one pass over memory);
longer rows stream: pass 1, (per-token: a pass for the row's max), then the quantizing
pass. Divisions are IEEE (div_rn): given the same rstd the kernel's bits are the
reference's (its fp32 sum of squares may add in another order than torch's).
fp8 output needs sm_89+ (Triton has no fp32 -> e4m3 on sm_80): those specs are sm_90a
only, and the op takes the reference path on older GPUs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .fp8_w8a8 import _round_fp8_e4m3
from .int8_w8a8 import _empty_int8, _round_half_even, _safe_div
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

MAX_TILE = 8192        # padded row tile kept in registers (one pass over memory)
STREAM_TILE = 4096     # columns per slice when a row streams


@triton.jit
def _round_to(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 v rounded to ``dtype`` (nearest even), returned as fp32."""
    if RNE_BF16:        # interpreter only: its bf16 cast truncates (interpreter_rounding)
        v = rne_bf16(v)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _tile(c0, G, H, CG: tl.constexpr, GP: tl.constexpr):
    """Groups c0 .. c0 + CG of the row: group index [CG, 1], column [CG, GP], mask."""
    g = c0 + tl.arange(0, CG)[:, None]
    j = tl.arange(0, GP)[None, :]
    col = g * G + j
    return g, col, (j < G) & (col < H)


@triton.jit
def _load_h(x_row, r_row, h_row, col, mask, stride_xh, stride_rh,
            HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr, NORM_FP32_SUM: tl.constexpr,
            RNE_BF16: tl.constexpr):
    """The tile's values the norm reads, in fp32: x, or h = x + r (stored rounded to x's
    dtype when STORE_H; the norm reads the rounded h, or the fp32 sum with
    NORM_FP32_SUM)."""
    v = tl.load(x_row + col * stride_xh, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = v + tl.load(r_row + col * stride_rh, mask=mask, other=0.0).to(tl.float32)
        h = total
        if RNE_BF16:
            h = rne_bf16(h)
        h = h.to(h_row.dtype.element_ty)
        if STORE_H:
            tl.store(h_row + col, h, mask=mask)
        v = total if NORM_FP32_SUM else h.to(tl.float32)
    return v


@triton.jit
def _normed(v, inv, w_ptr, col, mask, stride_w, w_offset, x_dtype: tl.constexpr,
            VLLM_ROUNDING: tl.constexpr, ROUND_PRODUCT: tl.constexpr,
            RNE_BF16: tl.constexpr):
    """y = the norm's output (rounded as the module doc says), fp32."""
    w = tl.load(w_ptr + col * stride_w, mask=mask, other=0.0).to(tl.float32) + w_offset
    if VLLM_ROUNDING:
        y = _round_to(v * inv, x_dtype, RNE_BF16) * w
        if ROUND_PRODUCT:
            y = _round_to(y, x_dtype, RNE_BF16)
    else:
        y = _round_to(v * inv * w, x_dtype, RNE_BF16)
    return y


@triton.jit
def _sum_tile(t, CG: tl.constexpr, GP: tl.constexpr):
    """Sum of a [CG, GP] tile. One slice (CG 1) is summed as a 1-D [GP] vector, the
    shape and warp count norm.py's rms_norm kernel reduces, so that the two kernels' fp32
    sums (and so their rstd) can agree on a GPU too; unverified there until a GPU run."""
    if CG == 1:
        return tl.sum(tl.reshape(t, [GP]), axis=0)
    return tl.sum(tl.sum(t, axis=1), axis=0)


@triton.jit
def _dynamic_scale(amax, ub_ptr, min_scale, HAS_UB: tl.constexpr, QMAX: tl.constexpr):
    if HAS_UB:
        amax = tl.minimum(amax, tl.load(ub_ptr))
    return tl.maximum(tl.math.div_rn(amax, QMAX), min_scale)


@triton.jit
def _quantize_store(y, s, q_row, col, mask, STATIC: tl.constexpr, INT8: tl.constexpr,
                    RNE_FP8: tl.constexpr):
    """q = y / s (static fp8: y * (1 / s)) saturated to int8 (round half to even) or fp8;
    a zero scale gives 0."""
    if STATIC and not INT8:
        v = y * tl.where(s == 0, 0.0, tl.math.div_rn(1.0, tl.where(s == 0, 1.0, s)))
    else:
        v = _safe_div(y, s)
    if INT8:
        v = tl.minimum(tl.maximum(_round_half_even(v), -128.0), 127.0)
        tl.store(q_row + col, v.to(tl.int8), mask=mask)
    else:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if RNE_FP8:     # interpreter only: exact e4m3 values before its truncating cast
            v = _round_fp8_e4m3(v)
        tl.store(q_row + col, v.to(q_row.dtype.element_ty), mask=mask)


@triton.jit
def _scale_and_store(y, g, col, mask, s_given, s_row, q_row, ub_ptr, min_scale, n_groups,
                     FROM_TILE: tl.constexpr, PER_TOKEN: tl.constexpr, STATIC: tl.constexpr,
                     HAS_UB: tl.constexpr, INT8: tl.constexpr, CG: tl.constexpr,
                     RNE_FP8: tl.constexpr):
    """Quantize the tile y and store it, with the scale s_given (a static one, or a row's
    computed by an earlier pass) or, FROM_TILE, the tile's own: the row's (PER_TOKEN: the
    tile is the whole row) or each group's, stored to s_row."""
    QMAX: tl.constexpr = 127.0 if INT8 else 448.0
    s = s_given
    if FROM_TILE:
        if PER_TOKEN:
            s = _dynamic_scale(tl.max(tl.max(tl.abs(y), axis=1), axis=0), ub_ptr,
                               min_scale, HAS_UB, QMAX)
            tl.store(s_row, s)
        else:
            s = _dynamic_scale(tl.max(tl.abs(y), axis=1), ub_ptr, min_scale, HAS_UB, QMAX)
            tl.store(s_row + tl.reshape(g, [CG]), s, mask=tl.reshape(g, [CG]) < n_groups)
            s = s[:, None]
    _quantize_store(y, s, q_row, col, mask, STATIC, INT8, RNE_FP8)


@triton.jit
def rms_norm_quant_kernel(
        x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, h_ptr, static_ptr, ub_ptr,
        H, G, n_slices, n_groups, stride_xm, stride_xh, stride_rm, stride_rh, stride_w,
        eps, w_offset, min_scale,
        HAS_RESIDUAL: tl.constexpr, STATIC: tl.constexpr, PER_TOKEN: tl.constexpr,
        HAS_UB: tl.constexpr, VLLM_ROUNDING: tl.constexpr, NORM_FP32_SUM: tl.constexpr,
        ROUND_PRODUCT: tl.constexpr, INT8: tl.constexpr, CG: tl.constexpr,
        GP: tl.constexpr, SINGLE_PASS: tl.constexpr, RNE_BF16: tl.constexpr,
        RNE_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    r_row = r_ptr + row * stride_rm
    h_row = h_ptr + row * H
    q_row = q_ptr + row * H
    s_row = s_ptr + row * n_groups
    x_dtype: tl.constexpr = x_ptr.dtype.element_ty
    QMAX: tl.constexpr = 127.0 if INT8 else 448.0
    s_given = 0.0
    if STATIC:
        s_given = tl.load(static_ptr)
    if SINGLE_PASS:
        g, col, mask = _tile(0, G, H, CG, GP)
        v = _load_h(x_row, r_row, h_row, col, mask, stride_xh, stride_rh, HAS_RESIDUAL,
                    True, NORM_FP32_SUM, RNE_BF16)
        inv = tl.rsqrt(_sum_tile(v * v, CG, GP) / H + eps)
        y = _normed(v, inv, w_ptr, col, mask, stride_w, w_offset, x_dtype, VLLM_ROUNDING,
                    ROUND_PRODUCT, RNE_BF16)
        _scale_and_store(y, g, col, mask, s_given, s_row, q_row, ub_ptr, min_scale,
                         n_groups, not STATIC, PER_TOKEN, STATIC, HAS_UB, INT8, CG, RNE_FP8)
    else:
        acc = tl.zeros([CG, GP], dtype=tl.float32)
        for c0 in range(0, n_slices, CG):                 # pass 1: sum of squares
            g, col, mask = _tile(c0, G, H, CG, GP)
            v = _load_h(x_row, r_row, h_row, col, mask, stride_xh, stride_rh, HAS_RESIDUAL,
                        True, NORM_FP32_SUM, RNE_BF16)
            acc += v * v
        inv = tl.rsqrt(_sum_tile(acc, CG, GP) / H + eps)
        if PER_TOKEN and not STATIC:                      # pass 2: the row's max |y|
            amax = tl.zeros([CG, GP], dtype=tl.float32)
            for c0 in range(0, n_slices, CG):
                g, col, mask = _tile(c0, G, H, CG, GP)
                v = _load_h(x_row, r_row, h_row, col, mask, stride_xh, stride_rh,
                            HAS_RESIDUAL, False, NORM_FP32_SUM, RNE_BF16)
                y = _normed(v, inv, w_ptr, col, mask, stride_w, w_offset, x_dtype,
                            VLLM_ROUNDING, ROUND_PRODUCT, RNE_BF16)
                amax = tl.maximum(amax, tl.abs(y))
            s_given = _dynamic_scale(tl.max(tl.max(amax, axis=1), axis=0), ub_ptr,
                                     min_scale, HAS_UB, QMAX)
            tl.store(s_row, s_given)
        for c0 in range(0, n_slices, CG):                 # last pass: quantize
            g, col, mask = _tile(c0, G, H, CG, GP)
            v = _load_h(x_row, r_row, h_row, col, mask, stride_xh, stride_rh, HAS_RESIDUAL,
                        False, NORM_FP32_SUM, RNE_BF16)
            y = _normed(v, inv, w_ptr, col, mask, stride_w, w_offset, x_dtype,
                        VLLM_ROUNDING, ROUND_PRODUCT, RNE_BF16)
            _scale_and_store(y, g, col, mask, s_given, s_row, q_row, ub_ptr, min_scale,
                             n_groups, not STATIC and not PER_TOKEN, PER_TOKEN, STATIC,
                             HAS_UB, INT8, CG, RNE_FP8)


def tile_plan(n: int, group_size: int) -> tuple[int, int, int, int, bool]:
    """(G, GP, CG, n_slices, single_pass) for a row of n columns: group_size 0 is one
    scale per row (G = n, or STREAM_TILE-column slices when the row streams)."""
    if group_size == 0:
        gp = triton.next_power_of_2(max(n, 1))
        if gp <= MAX_TILE:
            return max(n, 1), gp, 1, 1, True
        return STREAM_TILE, STREAM_TILE, 1, triton.cdiv(n, STREAM_TILE), False
    groups = n // group_size
    gp = triton.next_power_of_2(group_size)
    cg = triton.next_power_of_2(max(groups, 1))
    if cg * gp <= MAX_TILE:
        return group_size, gp, cg, groups, True
    return group_size, gp, max(1, STREAM_TILE // gp), groups, False


def num_warps_for(tile: int) -> int:
    return max(1, min(16, tile // 256))


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                   eps: float, weight_offset: float, quant_dtype: torch.dtype,
                   scale: torch.Tensor | None, group_size: int, scale_ub: torch.Tensor | None,
                   min_scale: float, vllm_rounding: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] (any strides) -> (q [T, H] contiguous, scales [T, groups] fp32 row-major or
    empty when static, h [T, H] contiguous or empty without a residual). Inputs validated
    by the op; group_size 0 or a divisor of H whose padded group fits MAX_TILE."""
    t, n = x.shape
    int8 = quant_dtype == torch.int8
    q = _empty_int8((t, n), x.device) if int8 else _alloc.empty((t, n), quant_dtype, x.device)
    per_token = group_size == 0
    groups = 1 if per_token else n // group_size
    scales = (x.new_empty((0,), dtype=torch.float32) if scale is not None
              else _alloc.empty((t, groups), torch.float32, x.device))
    h = (_alloc.empty((t, n), x.dtype, x.device) if residual is not None
         else x.new_empty((0,)))
    if t == 0:
        return q, scales, h
    g, gp, cg, n_slices, single = tile_plan(n, group_size)
    interp = not x.is_cuda and _backend.interpreter_enabled()
    rms_norm_quant_kernel[(t,)](
        x, residual if residual is not None else x, weight, q,
        scales if scale is None else q, h if residual is not None else x,
        scale if scale is not None else weight, scale_ub if scale_ub is not None else weight,
        n, g, n_slices, groups, x.stride(0), x.stride(1),
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0, weight.stride(0),
        float(eps), float(weight_offset), float(min_scale),
        HAS_RESIDUAL=residual is not None, STATIC=scale is not None, PER_TOKEN=per_token,
        HAS_UB=scale_ub is not None, VLLM_ROUNDING=vllm_rounding,
        NORM_FP32_SUM=vllm_rounding and scale is None,
        ROUND_PRODUCT=weight.dtype == x.dtype, INT8=int8, CG=cg, GP=gp,
        SINGLE_PASS=single, RNE_BF16=interp and x.dtype == torch.bfloat16,
        RNE_FP8=interp and not int8, num_warps=num_warps_for(cg * gp))
    return q, scales, h


# --------------------------------------------------------------------------- registry
# One family per kernel: activation dtype x output (int8: sm_80 and sm_90a; fp8: sm_90a)
# x mode (per token / 128-groups / static) x residual x row length (one pass / streamed).

def _register() -> None:
    for dt in ("bf16", "fp16"):
        for out in ("int8", "fp8"):
            for mode in ("token", "group128", "static"):
                for res in (False, True):
                    for n in (4096, 16384):
                        group = 128 if mode == "group128" else 0
                        g, gp, cg, _, single = tile_plan(n, group)
                        const = {"stride_xh": 1, "stride_w": 1,
                                 "stride_rh": 1 if res else 0,
                                 "HAS_RESIDUAL": res, "STATIC": mode == "static",
                                 "PER_TOKEN": group == 0, "HAS_UB": False,
                                 "VLLM_ROUNDING": False, "NORM_FP32_SUM": False,
                                 "ROUND_PRODUCT": True, "INT8": out == "int8", "CG": cg,
                                 "GP": gp, "SINGLE_PASS": single, "RNE_BF16": False,
                                 "RNE_FP8": False}
                        qt = "*i8" if out == "int8" else "*fp8e4nv"
                        sig = {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "w_ptr": f"*{dt}",
                               "q_ptr": qt, "s_ptr": "*fp32", "h_ptr": f"*{dt}",
                               "static_ptr": "*fp32", "ub_ptr": "*fp32", "H": "i32",
                               "G": "i32", "n_slices": "i32", "n_groups": "i32",
                               "stride_xm": "i64", "stride_rm": "i64", "eps": "fp32",
                               "w_offset": "fp32", "min_scale": "fp32",
                               **{c: "constexpr" for c in const}}
                        if mode == "static":     # the static scale pointer replaces s_ptr
                            sig["s_ptr"] = qt
                        register(KernelSpec(
                            name=f"rms_norm_quant[{dt},{out},{mode},residual={res},H={n}]",
                            fn=rms_norm_quant_kernel,
                            signature={a: sig[a] for a in rms_norm_quant_kernel.arg_names},
                            constexprs=const, num_warps=num_warps_for(cg * gp),
                            num_stages=1, archs=(80, 90) if out == "int8" else (90,)))


_register()
