"""A gated activation (SwiGLU / GeGLU) fused with int8 / fp8 quantization of its output, in
Triton (what a W8A8 MLP's down projection reads; vLLM's silu_and_mul_quant /
silu_and_mul_per_block_quant).

Algorithm: one program per row of x [T, 2I] (gate = x[:, :I], up = x[:, I:]); the I
outputs are seen as a [CG, GP] tile of groups, as in norm_quant.py:
    y      = act(gate) * up in fp32 (ACT: silu / gelu / gelu_tanh, activation.py's
             gate_activation), rounded to x's dtype when ROUND (= ops.silu_and_mul's output)
    scale  static: loaded; dynamic: max |y| per group or per row (min with scale_ub),
           s = max(max / qmax, min_scale)
    store  q = round_half_even(y / s) saturated to int8, or fp8(clamp(y / s, +-448)).
A row whose padded tile fits 8192 outputs stays in registers; a longer one streams: a
per-token row computes y twice (its max, then the quantizing pass), a grouped row once.
A static scale always streams 1024-column slices (no row reduction to wait for).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .activation import ACTIVATIONS, gate_activation
from .int8_w8a8 import _empty_int8
from .norm_quant import (_dynamic_scale, _round_to, _scale_and_store, _tile, num_warps_for,
                         tile_plan)
from .registry import KernelSpec, register


@triton.jit
def _act_tile(x_row, col, mask, inter, stride_xi, ACT: tl.constexpr, ROUND: tl.constexpr,
              RNE_BF16: tl.constexpr):
    """y = act(gate) * up at output columns ``col``, fp32 (rounded to x's dtype if ROUND)."""
    gate = tl.load(x_row + col * stride_xi, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + (inter + col) * stride_xi, mask=mask, other=0.0).to(tl.float32)
    y = gate_activation(gate, ACT) * up
    if ROUND:
        y = _round_to(y, x_row.dtype.element_ty, RNE_BF16)
    return y


@triton.jit
def act_and_mul_quant_kernel(
        x_ptr, q_ptr, s_ptr, static_ptr, ub_ptr, inter, G, n_slices, n_groups,
        stride_xm, stride_xi, min_scale,
        ACT: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
        PER_TOKEN: tl.constexpr, HAS_UB: tl.constexpr, INT8: tl.constexpr,
        CG: tl.constexpr, GP: tl.constexpr, SINGLE_PASS: tl.constexpr,
        RNE_BF16: tl.constexpr, RNE_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * inter
    s_row = s_ptr + row * n_groups
    QMAX: tl.constexpr = 127.0 if INT8 else 448.0
    s_given = 0.0
    if STATIC:
        s_given = tl.load(static_ptr)
    if SINGLE_PASS:
        g, col, mask = _tile(0, G, inter, CG, GP)
        y = _act_tile(x_row, col, mask, inter, stride_xi, ACT, ROUND, RNE_BF16)
        _scale_and_store(y, g, col, mask, s_given, s_row, q_row, ub_ptr, min_scale,
                         n_groups, not STATIC, PER_TOKEN, STATIC, HAS_UB, INT8, CG, RNE_FP8)
    else:
        if PER_TOKEN and not STATIC:                      # pass 1: the row's max |y|
            amax = tl.zeros([CG, GP], dtype=tl.float32)
            for c0 in range(0, n_slices, CG):
                g, col, mask = _tile(c0, G, inter, CG, GP)
                y = _act_tile(x_row, col, mask, inter, stride_xi, ACT, ROUND, RNE_BF16)
                amax = tl.maximum(amax, tl.abs(y))
            s_given = _dynamic_scale(tl.max(tl.max(amax, axis=1), axis=0), ub_ptr,
                                     min_scale, HAS_UB, QMAX)
            tl.store(s_row, s_given)
        for c0 in range(0, n_slices, CG):                 # quantize
            g, col, mask = _tile(c0, G, inter, CG, GP)
            y = _act_tile(x_row, col, mask, inter, stride_xi, ACT, ROUND, RNE_BF16)
            _scale_and_store(y, g, col, mask, s_given, s_row, q_row, ub_ptr, min_scale,
                             n_groups, not STATIC and not PER_TOKEN, PER_TOKEN, STATIC,
                             HAS_UB, INT8, CG, RNE_FP8)


STATIC_SLICE = 1024     # a static scale needs no row max: 1024-column slices, 4 warps


def plan(inter: int, group_size: int, static: bool) -> tuple[int, int, int, int, bool]:
    """(G, GP, CG, n_slices, single_pass): norm_quant's tile plan, except that a static
    scale streams the row in STATIC_SLICE columns (the gated_activation kernel's tile;
    a whole row in registers spilled on sm_80 with gelu's erf)."""
    if static:
        return STATIC_SLICE, STATIC_SLICE, 1, triton.cdiv(inter, STATIC_SLICE), False
    return tile_plan(inter, group_size)


def act_and_mul_quant(x: torch.Tensor, activation: str, quant_dtype: torch.dtype,
                      scale: torch.Tensor | None, group_size: int,
                      scale_ub: torch.Tensor | None, min_scale: float, round_to_input: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] (any strides) -> (q [T, I] contiguous, scales [T, groups] fp32 row-major,
    or empty when static). Inputs validated by the op; I > 0."""
    t, two_i = x.shape
    inter = two_i // 2
    int8 = quant_dtype == torch.int8
    q = _empty_int8((t, inter), x.device) if int8 else \
        _alloc.empty((t, inter), quant_dtype, x.device)
    per_token = group_size == 0
    groups = 1 if per_token else inter // group_size
    scales = (x.new_empty((0,), dtype=torch.float32) if scale is not None
              else _alloc.empty((t, groups), torch.float32, x.device))
    if t == 0:
        return q, scales
    g, gp, cg, n_slices, single = plan(inter, group_size, scale is not None)
    interp = not x.is_cuda and _backend.interpreter_enabled()
    act_and_mul_quant_kernel[(t,)](
        x, q, scales if scale is None else q, scale if scale is not None else x,
        scale_ub if scale_ub is not None else x, inter, g, n_slices, groups,
        x.stride(0), x.stride(1), float(min_scale),
        ACT=activation, ROUND=round_to_input, STATIC=scale is not None,
        PER_TOKEN=per_token, HAS_UB=scale_ub is not None, INT8=int8, CG=cg, GP=gp,
        SINGLE_PASS=single, RNE_BF16=interp and x.dtype == torch.bfloat16,
        RNE_FP8=interp and not int8, num_warps=num_warps_for(cg * gp))
    return q, scales


# --------------------------------------------------------------------------- registry
# One family: activation x activation dtype x output (int8: sm_80 + sm_90a; fp8: sm_90a)
# x mode (per token / 128-groups / static) x width (one pass: I 4864 (Qwen2.5-0.5B);
# streamed: I 14336).

def _register() -> None:
    for act in ACTIVATIONS:
        for dt in ("bf16", "fp16"):
            for out in ("int8", "fp8"):
                for mode in ("token", "group128", "static"):
                    for inter in (4864, 14336):
                        group = 128 if mode == "group128" else 0
                        g, gp, cg, _, single = plan(inter, group, mode == "static")
                        const = {"stride_xi": 1, "ACT": act, "ROUND": True,
                                 "STATIC": mode == "static", "PER_TOKEN": group == 0,
                                 "HAS_UB": False, "INT8": out == "int8", "CG": cg, "GP": gp,
                                 "SINGLE_PASS": single, "RNE_BF16": False, "RNE_FP8": False}
                        qt = "*i8" if out == "int8" else "*fp8e4nv"
                        sig = {"x_ptr": f"*{dt}", "q_ptr": qt,
                               "s_ptr": qt if mode == "static" else "*fp32",
                               "static_ptr": "*fp32" if mode == "static" else f"*{dt}",
                               "ub_ptr": f"*{dt}", "inter": "i32", "G": "i32",
                               "n_slices": "i32", "n_groups": "i32", "stride_xm": "i64",
                               "min_scale": "fp32", **{c: "constexpr" for c in const}}
                        register(KernelSpec(
                            name=f"act_and_mul_quant[{act},{dt},{out},{mode},I={inter}]",
                            fn=act_and_mul_quant_kernel,
                            signature={a: sig[a] for a in act_and_mul_quant_kernel.arg_names},
                            constexprs=const, num_warps=num_warps_for(cg * gp), num_stages=1,
                            archs=(80, 90) if out == "int8" else (90,)))


_register()
