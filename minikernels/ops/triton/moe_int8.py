"""Mixture-of-experts MLP with INT8 experts and per-output-channel scales (W8A16) in
Triton: ``fused_moe`` of ops/triton/moe.py with int8 weight tiles in the K loop (vLLM's
``fused_experts(..., use_int8_w8a16=True)`` layout).

Weights: w13 [E, 2I, H] and w2 [E, H, I] int8, scales fp32 [E, 2I] and [E, H]:
W_e[n, k] = weight[e, n, k] * scale[e, n] (one scale per output row).

Algorithm: the three steps of ops/triton/moe.py (its ``sort_pairs_by_expert`` puts the T*k
(token, slot) pairs into expert-sorted BLOCK_M tiles with moe_align's kernels, no sync).
  1. ``moe_int8_gate_up_kernel``: program (b, n) gathers the x rows of tile b's pairs and,
     per K tile, loads expert e's gate and up bytes as [BN, BK], converts them to x.dtype
     in registers (every int8 value is exact in fp16 / bf16 / fp32) and accumulates
     dot(x, q^T) in fp32. The row scales do not depend on k, so they multiply the fp32
     accumulators once after the K loop: gate = acc_g * scale[n], up = acc_u * scale[I + n]
     (the dequantized weight is never rounded to x.dtype). silu(gate) * up, rounded to
     x.dtype, goes to act [T*k, I].
  2. ``moe_int8_down_kernel``: act @ q2[e]^T the same way, times scale2[e, n], times
     topk_weights[t, j] in fp32, into an fp32 buffer [T*k, H].
  3. out = buffer.view(T, k, H).sum(1), rounded once to x.dtype.
Rows past the edge are clamped for the loads (gate row n % I, up row I + n % I, token of a
padding pair = the last one) and masked at the store. LoRA on the experts (optional):
moe.py's ``pair_lora`` / ``gate_up_delta`` / ``down_delta``; step 1 adds the pair's d13
row to its (scaled) gate / up accumulators before the epilogue, step 2 its d2 row before
the router weight (clamped loads as above), behind the constexpr ``HAS_DELTA``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter_rounding import rne_bf16
from .moe import (
    _rows_aligned,
    down_delta,
    gate_up_delta,
    moe_config,
    pair_lora,
    sort_pairs_by_expert,
)
from .registry import KernelSpec, register


@dataclass(frozen=True)
class MoeInt8Config:
    block_m: int
    block_n: int
    block_k: int
    even_k: bool
    num_warps: int = 4
    num_stages: int = 3


def moe_int8_config(n_pairs: int, num_experts: int, dtype: torch.dtype, k_dim: int,
                    aligned: bool, gate_up: bool) -> MoeInt8Config:
    """One kernel's tiles (K = H for gate-up, I for down); fp8 MoE's tiles (the same one-
    byte weight tiles, without its per-K-tile partial sums). BLOCK_M from moe.py's
    ``moe_config`` (16 / 32 / 64 by the average pairs per expert; 64 -> wgmma on sm_90a).
    16-byte aligned rows: a 64-wide N tile (32 for gate-up at BLOCK_M 64: it holds two
    accumulators) and K tiles of 128 bytes (64 at BLOCK_M 64): vector loads; BLOCK_K is
    halved down to 16 while it does not divide K (so K needs no mask); a K that 16 does
    not divide either is masked (EVEN_K False). Unaligned rows (byte loads, a pointer per
    element) and fp32 x ("ieee" dots on FMAs) take small tiles and a masked K. Every size
    here compiles without spills for sm_80 and sm_90a (the registered specs; a smaller
    BLOCK_K than the registered one holds fewer registers)."""
    bm = moe_config(n_pairs, num_experts, torch.float16).block_m
    if dtype == torch.float32:
        bm, bn, block_k, stages = min(bm, 32), 32, 16, 2
    elif aligned:
        bn = 32 if gate_up and bm == 64 else 64
        block_k, stages = (128 if bm <= 32 else 64), 3
    else:
        bn, block_k, stages = 32, 32, 2
    if aligned:
        while k_dim % block_k and block_k > 16:
            block_k //= 2
    return MoeInt8Config(bm, bn, block_k, aligned and k_dim % block_k == 0, 4, stages)


@triton.jit
def _int8_dot(a, wb, acc, DOT_F32: tl.constexpr):
    """acc + a @ wb^T in fp32 for int8 weight bytes wb [BN, BK]: wb converted in registers
    to a's dtype (tensor cores), or to fp32 with DOT_F32 (fp32 x; bf16 under the
    interpreter, whose int8 -> bf16 cast is wrong); every int8 value is exact in both."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), tl.trans(wb.to(tl.float32)), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(wb.to(a.dtype)), acc)


@triton.jit
def moe_int8_gate_up_kernel(x_ptr, w_ptr, s_ptr, act_ptr, delta_ptr, sorted_ids_ptr,
                            block_expert_ptr, n_pairs, top_k, H, I,
                            HAS_DELTA: tl.constexpr,
                            sx_t, sx_h, sw_e, sw_n, sw_k, ss_e, ss_n,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                            ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                            RNE_BF16: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:               # past the last real tile (the grid is a static upper bound)
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    live = pair < n_pairs                            # padding rows hold the sentinel
    tok = (tl.minimum(pair, n_pairs - 1) // top_k).to(tl.int64)   # clamped: loads unmasked
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % I                                 # gate rows n, up rows I + n (clamped)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_h               # [BM, BK]
    w_base = w_ptr + e * sw_e + offs_k[None, :].to(tl.int64) * sw_k
    g_ptrs = w_base + n_l[:, None].to(tl.int64) * sw_n                          # [BN, BK]
    u_ptrs = w_base + (I + n_l)[:, None].to(tl.int64) * sw_n
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if ALIGNED:  # 16-byte aligned rows, unit inner strides (the launcher checked)
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            g_ptrs = tl.multiple_of(g_ptrs, [1, 16])
            u_ptrs = tl.multiple_of(u_ptrs, [1, 16])
        if EVEN_K:   # H % BLOCK_K == 0: no mask at all, the loads vectorize
            a = tl.load(x_ptrs)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            k_ok = ((k0 + offs_k) < H)[None, :]
            a = tl.load(x_ptrs, mask=k_ok, other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok, other=0)
            wu = tl.load(u_ptrs, mask=k_ok, other=0)
        acc_g = _int8_dot(a, wg, acc_g, DOT_F32)
        acc_u = _int8_dot(a, wu, acc_u, DOT_F32)
        x_ptrs += BLOCK_K * sx_h
        g_ptrs += BLOCK_K * sw_k
        u_ptrs += BLOCK_K * sw_k
    # the per-row scales, once per output (they do not depend on k)
    s_base = s_ptr + e * ss_e
    acc_g = acc_g * tl.load(s_base + n_l.to(tl.int64) * ss_n)[None, :]
    acc_u = acc_u * tl.load(s_base + (I + n_l).to(tl.int64) * ss_n)[None, :]
    if HAS_DELTA:   # LoRA: the pair's gate / up update, a [T*k, 2I] row in x.dtype
        pair_l = tl.minimum(pair, n_pairs - 1).to(tl.int64)       # clamped, as the loads
        d_ptrs = delta_ptr + pair_l[:, None] * (2 * I) + n_l[None, :]
        acc_g += tl.load(d_ptrs).to(tl.float32)
        acc_u += tl.load(d_ptrs + I).to(tl.float32)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u       # silu(gate) * up in fp32
    if RNE_BF16:  # interpreter only: its fp32 -> bf16 cast truncates; the GPU rounds
        act = rne_bf16(act)
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * I + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty),
             mask=live[:, None] & (offs_n < I)[None, :])


@triton.jit
def moe_int8_down_kernel(act_ptr, w_ptr, s_ptr, tw_ptr, out_ptr, delta_ptr, sorted_ids_ptr,
                         block_expert_ptr, n_pairs, top_k, H, I,
                         HAS_DELTA: tl.constexpr,
                         sw_e, sw_n, sw_k, ss_e, ss_n, stw_t, stw_j,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    live = pair < n_pairs
    pair_l = tl.minimum(pair, n_pairs - 1).to(tl.int64)       # clamped for the loads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair_l[:, None] * I + offs_k[None, :]                    # [BM, BK]
    w_ptrs = (w_ptr + e * sw_e + n_l[:, None].to(tl.int64) * sw_n
              + offs_k[None, :].to(tl.int64) * sw_k)                            # [BN, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if ALIGNED:
            a_ptrs = tl.multiple_of(a_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        if EVEN_K:   # I % BLOCK_K == 0
            a = tl.load(a_ptrs)
            wb = tl.load(w_ptrs)
        else:
            k_ok = ((k0 + offs_k) < I)[None, :]
            a = tl.load(a_ptrs, mask=k_ok, other=0.0)
            wb = tl.load(w_ptrs, mask=k_ok, other=0)
        acc = _int8_dot(a, wb, acc, DOT_F32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sw_k
    acc = acc * tl.load(s_ptr + e * ss_e + n_l.to(tl.int64) * ss_n)[None, :]   # row scales
    if HAS_DELTA:   # LoRA: the pair's down update, a [T*k, H] row in x.dtype (clamped)
        acc += tl.load(delta_ptr + pair_l[:, None] * H + n_l[None, :]).to(tl.float32)
    # the router weight of (token, slot), fp32, applied before the k-sum
    tok = pair_l // top_k
    slot = pair_l - tok * top_k
    wt = tl.load(tw_ptr + tok * stw_t + slot * stw_j)
    acc = acc * wt[:, None]
    tl.store(out_ptr + pair_l[:, None] * H + offs_n[None, :], acc,
             mask=live[:, None] & (offs_n < H)[None, :])


def fused_moe_int8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                   w2: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor,
                   lora: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """See minikernels.ops.fused_moe_int8 (inputs checked there; any strides). lora: the
    six tensors of minikernels.ops.MoELoRA, or None."""
    t, h = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    n_pairs = t * top_k
    if t == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    # one flag for both kernels: x, the weights and the [T*k, I] intermediate's rows
    aligned = _rows_aligned(x, w13, w2) and inter * x.element_size() % 16 == 0
    cfg13 = moe_int8_config(n_pairs, num_experts, x.dtype, h, aligned, gate_up=True)
    cfg2 = moe_int8_config(n_pairs, num_experts, x.dtype, inter, aligned, gate_up=False)
    sorted_ids, block_expert = sort_pairs_by_expert(topk_ids, num_experts, cfg13.block_m)
    max_blocks = block_expert.shape[0]
    plora = pair_lora(lora, topk_ids)
    # bf16 under the interpreter (CPU tensors): its tl.dot multiplies raw bits and its bf16
    # cast truncates, so both are worked around (as in moe.py); never set on a GPU.
    # fp32 x: exact fp32 ("ieee") dots.
    interp_bf16 = x.device.type != "cuda" and x.dtype == torch.bfloat16
    dot_f32 = x.dtype == torch.float32 or interp_bf16
    act = _alloc.empty((n_pairs, inter), x.dtype, x.device)
    buf = _alloc.empty((n_pairs, h), torch.float32, x.device)
    # without LoRA the delta pointers are x / act themselves, never read (HAS_DELTA off)
    d13 = x if plora is None else gate_up_delta(x, plora, top_k)
    moe_int8_gate_up_kernel[(max_blocks, triton.cdiv(inter, cfg13.block_n))](
        x, w13, w13_scale, act, d13, sorted_ids, block_expert, n_pairs, top_k, h, inter,
        plora is not None,
        x.stride(0), x.stride(1), *w13.stride(), *w13_scale.stride(),
        BLOCK_M=cfg13.block_m, BLOCK_N=cfg13.block_n, BLOCK_K=cfg13.block_k,
        EVEN_K=cfg13.even_k, ALIGNED=aligned, DOT_F32=dot_f32, RNE_BF16=interp_bf16,
        num_warps=cfg13.num_warps, num_stages=cfg13.num_stages)
    d2 = act if plora is None else down_delta(act, plora)
    moe_int8_down_kernel[(max_blocks, triton.cdiv(h, cfg2.block_n))](
        act, w2, w2_scale, topk_weights, buf, d2, sorted_ids, block_expert, n_pairs, top_k,
        h, inter, plora is not None,
        *w2.stride(), *w2_scale.stride(), topk_weights.stride(0), topk_weights.stride(1),
        BLOCK_M=cfg2.block_m, BLOCK_N=cfg2.block_n, BLOCK_K=cfg2.block_k,
        EVEN_K=cfg2.even_k, ALIGNED=aligned, DOT_F32=dot_f32,
        num_warps=cfg2.num_warps, num_stages=cfg2.num_stages)
    return buf.view(t, top_k, h).sum(dim=1).to(x.dtype)


# --------------------------------------------------------------------------- registry
# As dispatched: fp16 / bf16 x BLOCK_M 16 / 32 / 64 (fp32: 16 / 32) x three row kinds,
# each at its widest BLOCK_K:
#   aligned   16-byte aligned rows, K a multiple of BLOCK_K: unit inner strides as
#             constants (Triton's JIT specializes a stride of 1), pointers and outer
#             strides as multiples of 16 as the JIT sees them for aligned tensors, so the
#             byte tiles load 16 at a time;
#   ragged_k  aligned rows, K not a multiple of 16 (a padded view): BLOCK_K 16, masked;
#   unaligned every stride a runtime value, byte loads, K masked.
# A K that the widest tile does not divide gives a smaller BLOCK_K of the same kind:
# fewer registers.

_INTS = {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32"}


def _register(dt: str, kind: str, cfg: MoeInt8Config, gate_up: bool,
              lora: bool = False) -> None:
    aligned = kind != "unaligned"
    const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "EVEN_K": cfg.even_k, "ALIGNED": aligned, "DOT_F32": dt == "fp32",
             "HAS_DELTA": lora}
    if gate_up:
        fn, name = moe_int8_gate_up_kernel, "moe_int8_gate_up"
        unit = {"sx_h": 1, "sw_k": 1} if aligned else {}
        sig = {"x_ptr": f"*{dt}", "act_ptr": f"*{dt}", "sx_t": "i64", "sx_h": "i64"}
        div = ("x_ptr", "act_ptr", "sx_t")
        const["RNE_BF16"] = False                                     # interpreter only
    else:
        fn, name = moe_int8_down_kernel, "moe_int8_down"
        unit = {"sw_k": 1} if aligned else {}
        sig = {"act_ptr": f"*{dt}", "tw_ptr": "*fp32", "out_ptr": "*fp32", "stw_t": "i64",
               "stw_j": "i64"}
        div = ("act_ptr", "out_ptr")
    sig.update({"w_ptr": "*i8", "s_ptr": "*fp32", "delta_ptr": f"*{dt}",
                "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", **_INTS,
                **{n: "i64" for n in ("sw_e", "sw_n", "sw_k", "ss_e", "ss_n")},
                **{c: "constexpr" for c in (*const, *unit)}})
    div += ("w_ptr", "s_ptr", "delta_ptr", "sorted_ids_ptr", "sw_e", "sw_n")
    register(KernelSpec(
        name=f"{name}[{dt},BM={cfg.block_m},{kind}" + (",lora]" if lora else "]"), fn=fn,
        signature={a: sig[a] for a in fn.arg_names}, constexprs={**const, **unit},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, tensor_core=dt != "fp32",
        wgmma_expected=cfg.block_m >= 64, divisible_by_16=div if aligned else ()))


for _dt, _tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
    for _kind, _k in (("aligned", 4096), ("ragged_k", 4104), ("unaligned", 4104)):
        for _avg in (8, 32, 256):          # one spec per BLOCK_M that moe_config picks
            if _dt == "fp32" and _avg == 256:
                continue                                  # fp32: BLOCK_M <= 32
            for _gate_up in (True, False):
                _cfg = moe_int8_config(_avg * 64, 64, _tdt, _k, _kind != "unaligned",
                                       _gate_up)
                assert _cfg.even_k == (_kind == "aligned")
                _register(_dt, _kind, _cfg, _gate_up)
                if _kind == "aligned" and _dt != "fp32":        # + LoRA (HAS_DELTA)
                    _register(_dt, _kind, _cfg, _gate_up, lora=True)
