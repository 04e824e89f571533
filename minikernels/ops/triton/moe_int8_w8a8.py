"""Mixture-of-experts MLP with INT8 W8A8 experts in Triton: int8 activations times int8
weights on integer tensor cores, exact int32 accumulation (vLLM's ``fused_experts(...,
use_int8_w8a8=True, per_channel_quant=True)``; compressed-tensors int8 W8A8 MoE
checkpoints).

Weights: w13 [E, 2I, H] and w2 [E, H, I] int8 with fp32 scales [E, 2I] and [E, H]
(W_e[n, k] = weight[e, n, k] * scale[e, n], one scale per output row). Activations:
quantized per token (symmetric, s = max|row| / 127, round half to even) by
int8_w8a8.py's ``scaled_int8_quant`` kernel, twice: x before the gate-up GEMM, and the
activated intermediate before the down GEMM (one scale per (token, slot) pair's row).

Algorithm (the steps of ops/triton/moe.py, whose ``moe_launch`` sorts the T*k (token, slot)
pairs into expert-sorted BLOCK_M tiles with moe_align's kernels, no host sync):
  0. x_q, s_x = scaled_int8_quant(x)                      int8 [T, H], fp32 [T, 1]
  1. ``moe_w8a8_gate_up_kernel``: program (b, n) gathers the x_q rows of tile b's pairs
     and, per K tile, dots them with expert e's gate and up bytes ([BN, BK] each) into
     two int32 accumulators (int8 x int8 tensor-core MMA; exact while H <= 131072).
     After the K loop, in fp32: gate = s_x[t] * (s13[e, n] * float(acc_g)),
     up = s_x[t] * (s13[e, I + n] * float(acc_u)) (scaled_mm's epilogue order), + the
     expert's bias, act(gate) * up (``ACT``; non-gated experts: act(up)), rounded to
     x.dtype, to act [T*k, I] (_moe_common.py's ``gate_up_epilogue``).
  2. act_q, s_act = scaled_int8_quant(act)                int8 [T*k, I], fp32 [T*k, 1]
  3. ``moe_w8a8_down_kernel``: act_q[p] @ w2[e]^T in int32 the same way, then
     s_act[p] * (s2[e, n] * float(acc)), + the expert's bias, times topk_weights[t, j]
     in fp32, into an fp32 buffer [T*k, H] (``down_epilogue``).
  4. out = buffer.view(T, k, H).sum(1), rounded once to x.dtype.
Rows past the edge are clamped for the loads (gate row n % I, up row I + n % I, the
last pair for padding rows) and masked at the store; a ragged K (not a multiple of
BLOCK_K) loads zeros past its end, which add nothing to an integer sum. The int8 rows
of x_q / act_q are contiguous buffers of this launcher; the weights may be any views.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._moe_common import down_epilogue, gate_up_epilogue, tile_expert, tile_pairs, up_rows
from .int8_w8a8 import scaled_int8_quant
from .moe import (_act_tag, _bias_sig, _in_order, _rows_aligned, gate_up_variants,
                  moe_config, moe_launch, pair_lora)
from .registry import KernelSpec, register
from .tiling import load_k_tile

# int8 MMA consumes K in steps of 32 (m16n8k32 on sm_80; wgmma k32 on sm_90a)
MIN_BLOCK_K = 32


@dataclass(frozen=True)
class MoeW8A8Config:
    block_m: int
    block_n: int
    block_k: int
    even_k: bool
    num_warps: int = 4
    num_stages: int = 3


def moe_w8a8_config(n_pairs: int, num_experts: int, k_dim: int, aligned: bool,
                    gate_up: bool) -> MoeW8A8Config:
    """One kernel's tiles (K = H for gate-up, I for down). BLOCK_M from ``moe_config``
    (16 / 32 / 64 by the average pairs per expert; 64 -> wgmma on sm_90a). Both operands
    are one byte, so 16-byte aligned rows take a 64-wide N tile (32 for gate-up at
    BLOCK_M 64: two accumulators) and K tiles of 128 bytes (64 at BLOCK_M 64), halved
    while they do not divide K, down to 32 (int8 MMA's K step); a K that 32 does not
    divide is masked (EVEN_K False). Unaligned rows (a byte load per element) take
    32 x 32 tiles, masked. The x dtype does not matter: both dots are int8."""
    bm = moe_config(n_pairs, num_experts, torch.float16).block_m
    if aligned:
        bn = 32 if gate_up and bm == 64 else 64
        block_k, stages = (128 if bm <= 32 else 64), 3
        while k_dim % block_k and block_k > MIN_BLOCK_K:
            block_k //= 2
    else:
        bn, block_k, stages = 32, MIN_BLOCK_K, 2
    return MoeW8A8Config(bm, bn, block_k, aligned and k_dim % block_k == 0, 4, stages)


@triton.jit
def _int8_dot(a, wb, acc):
    """acc + a @ wb^T for int8 a [BM, BK] and weight bytes wb [BN, BK]: exact int32.
    out_dtype names the accumulator's type (triton 3.6 defaults it to fp32)."""
    return tl.dot(a, tl.trans(wb), acc, out_dtype=tl.int32)


@triton.jit
def moe_w8a8_gate_up_kernel(xq_ptr, sx_ptr, w_ptr, s_ptr, act_ptr, delta_ptr,
                            sorted_ids_ptr, block_expert_ptr, n_pairs, top_k, H, I, sw_e,
                            sw_n, sw_k,
                            ss_e, ss_n, bias_ptr, sb_e, sb_n, alpha, limit,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                            ALIGNED: tl.constexpr, RNE_BF16: tl.constexpr = False,
                            ACT: tl.constexpr = "silu", GATED: tl.constexpr = True,
                            HAS_BIAS: tl.constexpr = False,
                            HAS_DELTA: tl.constexpr = False):
    """act[p, n-block] = act(gate) * up for the pairs p of tile pid_m: xq int8 [T, H]
    (contiguous) with per-token scales sx fp32 [T], w int8 [E, 2I, H] (non-gated:
    [E, I, H], act(up) stored) with row scales s fp32 [E, 2I]; act [T*k, I] in x.dtype.
    Loads clamped (rows n % I, the last pair), the store masked."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:               # past the last real tile (the grid is a static upper bound)
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    tok = (tl.minimum(pair, n_pairs - 1) // top_k).to(tl.int64)   # clamped: loads unmasked
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % I                                 # columns clamped for the loads
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = xq_ptr + tok[:, None] * H + offs_k[None, :]                         # [BM, BK]
    w_base = w_ptr + e * sw_e + offs_k[None, :].to(tl.int64) * sw_k
    g_ptrs = w_base + n_l[:, None].to(tl.int64) * sw_n           # read only when GATED
    u_ptrs = w_base + up_rows(n_l, I, GATED)[:, None].to(tl.int64) * sw_n
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, H, BLOCK_K):
        if ALIGNED:  # 16-byte aligned rows, unit inner strides (the launcher checked)
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            if GATED:
                g_ptrs = tl.multiple_of(g_ptrs, [1, 16])
            u_ptrs = tl.multiple_of(u_ptrs, [1, 16])
        a = load_k_tile(x_ptrs, k0, offs_k, H, EVEN_K, 0)         # H % BK == 0: no mask
        if GATED:
            acc_g = _int8_dot(a, load_k_tile(g_ptrs, k0, offs_k, H, EVEN_K, 0), acc_g)
        acc_u = _int8_dot(a, load_k_tile(u_ptrs, k0, offs_k, H, EVEN_K, 0), acc_u)
        x_ptrs += BLOCK_K
        if GATED:
            g_ptrs += BLOCK_K * sw_k
        u_ptrs += BLOCK_K * sw_k
    # dequantize in fp32 in scaled_mm's order: s_x[t] * (s_w[n] * float(acc))
    s_tok = tl.load(sx_ptr + tok)[:, None]
    s_base = s_ptr + e * ss_e
    gate = s_tok * (tl.load(s_base + n_l.to(tl.int64) * ss_n)[None, :]
                    * acc_g.to(tl.float32))                    # read only when GATED
    up = s_tok * (tl.load(s_base + up_rows(n_l, I, GATED).to(tl.int64) * ss_n)[None, :]
                  * acc_u.to(tl.float32))
    gate_up_epilogue(gate, up, act_ptr, delta_ptr, pair, live, offs_n, n_l, n_pairs, I,
                     HAS_DELTA=HAS_DELTA, CLAMPED=True, ACT=ACT, GATED=GATED,
                     RNE_BF16=RNE_BF16, bias_ptr=bias_ptr, e=e, sb_e=sb_e, sb_n=sb_n,
                     alpha=alpha, limit=limit, HAS_BIAS=HAS_BIAS)


@triton.jit
def moe_w8a8_down_kernel(aq_ptr, sa_ptr, w_ptr, s_ptr, tw_ptr, out_ptr, delta_ptr,
                         sorted_ids_ptr, block_expert_ptr, n_pairs, top_k, H, I, sw_e, sw_n,
                         sw_k, ss_e,
                         ss_n, stw_t, stw_j, bias_ptr, sb_e, sb_n,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
                         HAS_BIAS: tl.constexpr = False,
                         HAS_DELTA: tl.constexpr = False):
    """buf[p, n-block] = s_act[p] * (s2[e, n] * (act_q[p] @ q2[e]^T)) * topk_weights[t, j]
    for the pairs p of tile pid_m: act_q int8 [T*k, I] (contiguous) with per-pair scales
    sa fp32 [T*k], w int8 [E, H, I] with row scales s fp32 [E, H]; buf fp32 [T*k, H].
    Loads clamped, the store masked."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    pair_l = tl.minimum(pair, n_pairs - 1).to(tl.int64)       # clamped for the loads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = aq_ptr + pair_l[:, None] * I + offs_k[None, :]                      # [BM, BK]
    w_ptrs = (w_ptr + e * sw_e + n_l[:, None].to(tl.int64) * sw_n
              + offs_k[None, :].to(tl.int64) * sw_k)                             # [BN, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, I, BLOCK_K):
        if ALIGNED:
            a_ptrs = tl.multiple_of(a_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        a = load_k_tile(a_ptrs, k0, offs_k, I, EVEN_K, 0)         # I % BK == 0: no mask
        acc = _int8_dot(a, load_k_tile(w_ptrs, k0, offs_k, I, EVEN_K, 0), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sw_k
    y = tl.load(sa_ptr + pair_l)[:, None] * (
        tl.load(s_ptr + e * ss_e + n_l.to(tl.int64) * ss_n)[None, :] * acc.to(tl.float32))
    down_epilogue(y, tw_ptr, out_ptr, delta_ptr, pair_l, live, offs_n, n_l, top_k, H,
                  stw_t, stw_j, HAS_DELTA=HAS_DELTA, CLAMPED=True, bias_ptr=bias_ptr, e=e,
                  sb_e=sb_e, sb_n=sb_n, HAS_BIAS=HAS_BIAS)


def fused_moe_int8_w8a8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                        w2: torch.Tensor, w2_scale: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        lora: Sequence[torch.Tensor] | None = None,
                        activation: str = "silu", gated: bool = True,
                        w13_bias: torch.Tensor | None = None,
                        w2_bias: torch.Tensor | None = None, alpha: float = 1.702,
                        limit: float = 7.0) -> torch.Tensor:
    """See minikernels.ops.fused_moe_int8_w8a8 (inputs checked there; any strides): lora
    the six tensors of minikernels.ops.MoELoRA, or None (``HAS_DELTA``: moe.py's d13 /
    d2 rows added before the activation / the router weight); activation / gated the
    gate-up epilogue's ``ACT`` / ``GATED``; w13_bias / w2_bias (x.dtype, or None):
    ``HAS_BIAS``, added after the scales; alpha / limit: swigluoai's."""
    t, h = x.shape
    if t == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    n_pairs, num_experts = t * topk_ids.shape[1], w13.shape[0]
    inter = w2.shape[2]
    x_q, s_x, _ = scaled_int8_quant(x, None, None, True)                # [T, H], [T, 1]
    # each kernel's rows: its int8 activations (contiguous, so aligned when K % 16 == 0)
    # and its weight
    aligned13 = h % 16 == 0 and _rows_aligned(w13)
    aligned2 = inter % 16 == 0 and _rows_aligned(w2)
    cfg13 = moe_w8a8_config(n_pairs, num_experts, h, aligned13, True)
    cfg2 = moe_w8a8_config(n_pairs, num_experts, inter, aligned2, False)
    run = moe_launch(x, topk_ids, num_experts, inter, cfg13.block_m,
                     pair_lora(lora, topk_ids), w13_bias, w2_bias, alpha, limit)

    def tiles(cfg: MoeW8A8Config, aligned: bool) -> dict:
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                "EVEN_K": cfg.even_k, "ALIGNED": aligned, "HAS_DELTA": run.has_delta,
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    # gate_up_args: act, the LoRA d13 rows (from x), sorted_ids, block_expert, n_pairs,
    # top_k, H, I
    moe_w8a8_gate_up_kernel[run.grid(inter, cfg13.block_n)](
        x_q, s_x, w13, w13_scale, *run.gate_up_args(), *w13.stride(), *w13_scale.stride(),
        RNE_BF16=run.interp_bf16, ACT=activation, GATED=gated, **run.gate_up_bias(),
        **tiles(cfg13, aligned13))
    act_q, s_act, _ = scaled_int8_quant(run.act, None, None, True)     # [T*k, I], [T*k, 1]
    # down_args: topk_weights, buf, the LoRA d2 rows (from act, before its quantization),
    # sorted_ids, block_expert, n_pairs, top_k, H, I
    moe_w8a8_down_kernel[run.grid(h, cfg2.block_n)](
        act_q, s_act, w2, w2_scale, *run.down_args(topk_weights), *w2.stride(),
        *w2_scale.stride(), topk_weights.stride(0), topk_weights.stride(1),
        **run.down_bias(), **tiles(cfg2, aligned2))
    return run.result()


# --------------------------------------------------------------------------- registry
# As dispatched: x dtype (the intermediate's and the biases' type; both dots are int8)
# fp16 / bf16 / fp32 x BLOCK_M 16 / 32 / 64 x three row kinds, each at its widest BLOCK_K:
#   aligned    16-byte aligned int8 rows, K a multiple of BLOCK_K: unit inner strides as
#              constants, pointers and outer strides multiples of 16 (vector loads);
#   ragged_k   aligned rows of a K that 32 does not divide: BLOCK_K 32, masked;
#   unaligned  every stride a runtime value, byte loads, K masked.
# Each gate-up spec once per (ACT, GATED) of moe.py's ``gate_up_variants``; the aligned
# fp16 / bf16 tiles also with LoRA (HAS_DELTA) and with expert biases (swigluoai gate-up;
# down).

def _register(dt: str, kind: str, cfg: MoeW8A8Config, gate_up: bool, act: str = "silu",
              gated: bool = True, bias: bool = False, lora: bool = False) -> None:
    aligned = kind != "unaligned"
    const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "EVEN_K": cfg.even_k, "ALIGNED": aligned, "HAS_BIAS": bias, "HAS_DELTA": lora}
    unit = {"sw_k": 1} if aligned else {}
    ints = {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32"}
    strides = {n: "i64" for n in ("sw_e", "sw_n", "sw_k", "ss_e", "ss_n")}
    if gate_up:
        fn, name = moe_w8a8_gate_up_kernel, "moe_int8_w8a8_gate_up"
        sig = {"xq_ptr": "*i8", "sx_ptr": "*fp32", "act_ptr": f"*{dt}"}
        div = ("xq_ptr", "act_ptr", "H")
        const.update(RNE_BF16=False, ACT=act, GATED=gated)           # RNE: interpreter only
    else:
        fn, name = moe_w8a8_down_kernel, "moe_int8_w8a8_down"
        sig = {"aq_ptr": "*i8", "sa_ptr": "*fp32", "tw_ptr": "*fp32", "out_ptr": "*fp32",
               "stw_t": "i64", "stw_j": "i64"}
        div = ("aq_ptr", "out_ptr", "I")
    sig.update({**_bias_sig(dt, gate_up), "w_ptr": "*i8", "s_ptr": "*fp32",
                "delta_ptr": f"*{dt}",
                "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", **ints, **strides,
                **{c: "constexpr" for c in (*const, *unit)}})
    div += ("w_ptr", "s_ptr", "delta_ptr", "sorted_ids_ptr", "sw_e", "sw_n")
    register(KernelSpec(
        name=f"{name}[{dt},BM={cfg.block_m},{kind}" + (",lora" if lora else "")
        + _act_tag(act, gated) + (",bias" if bias else "") + "]",
        fn=fn, signature=_in_order(fn, sig), constexprs={**const, **unit},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, tensor_core=True,
        wgmma_expected=cfg.block_m >= 64, divisible_by_16=div if aligned else ()))


for _dt in ("fp16", "bf16", "fp32"):
    # ragged_k: a multiple of 16 (aligned int8 rows) that 32 does not divide
    for _kind, _k in (("aligned", 4096), ("ragged_k", 4112), ("unaligned", 4104)):
        for _avg in (8, 32, 256):          # one spec per BLOCK_M that moe_config picks
            for _gate_up in (True, False):
                _cfg = moe_w8a8_config(_avg * 64, 64, _k, _kind != "unaligned", _gate_up)
                assert _cfg.even_k == (_kind == "aligned")
                for _act, _gated in (gate_up_variants(_dt, _cfg.block_m) if _gate_up
                                     else (("silu", True),)):
                    _register(_dt, _kind, _cfg, _gate_up, _act, _gated)
                    if _kind == "aligned" and _dt != "fp32":        # + LoRA (HAS_DELTA)
                        _register(_dt, _kind, _cfg, _gate_up, _act, _gated, lora=True)
                if _kind == "aligned" and _dt != "fp32":   # + expert biases (GPT-OSS-like)
                    _register(_dt, _kind, _cfg, _gate_up, "swigluoai" if _gate_up else "silu",
                              True, bias=True)
