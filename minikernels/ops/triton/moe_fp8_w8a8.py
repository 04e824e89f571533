"""Mixture-of-experts MLP with block-wise FP8 W8A8 experts in Triton: fp8 activations times
fp8 weights on fp8 tensor cores (vLLM's ``fused_experts(..., use_fp8_w8a8=True,
block_shape=[bn, bk])``: DeepSeek-V3 / Qwen3-FP8 MoE checkpoints run as vLLM runs them).

Weights: w13 [E, 2I, H] and w2 [E, H, I] float8_e4m3fn with fp32 block scales
[E, ceil(2I / bn), H / bk] and [E, ceil(H / bn), I / bk] (fused_moe_fp8's layout:
W_e[n, k] = weight[e, n, k] * scale[e, n // bn, k // bk]). Activations: quantized per
token and group of bk columns (fp8_w8a8.py's ``per_token_group_quant_fp8`` kernel:
s = max(max|group|, eps) / 448, q = fp8(x / s)), twice: x before the gate-up GEMM, and
the activated intermediate before the down GEMM; each matrix's bk (clamped to its K: a
block past the edge covers the edge) divides its K.

Algorithm (the steps of ops/triton/moe.py, whose ``moe_launch`` sorts the T*k (token,
slot) pairs into expert-sorted BLOCK_M tiles with moe_align's kernels, no host sync):
  0. x_q, s_x = per_token_group_quant_fp8(x, bk)     fp8 [T, H], fp32 [T, H / bk]
  1. ``moe_fp8_w8a8_gate_up_kernel``: program (b, n) gathers the x_q rows of tile b's
     pairs; per K tile (BLOCK_K divides bk: a tile lies in one scale group j) it loads
     expert e's gate and up fp8 tiles [BN, BK], and adds
         dot(x_q, w^T) * (s_x[t, j] * s_w[e, n // bn, j])
     to fp32 accumulators (the fp8 x fp8 dot on tensor cores, fp32 result: the dense
     w8a8_block_fp8_matmul's loop). Then + bias, act(gate) * up (``ACT``; non-gated
     experts: act(up)), rounded to x.dtype, to act [T*k, I] (``gate_up_epilogue``).
  2. act_q, s_act = per_token_group_quant_fp8(act, bk)    fp8 [T*k, I], fp32 [T*k, I / bk]
  3. ``moe_fp8_w8a8_down_kernel``: act_q[p] @ w2[e]^T the same way, + bias, times
     topk_weights[t, j] in fp32, into an fp32 buffer [T*k, H] (``down_epilogue``).
  4. out = buffer.view(T, k, H).sum(1), rounded once to x.dtype.
Rows past the edge are clamped for the loads (gate row n % I, up row I + n % I, the last
pair for padding rows) and masked at the store; K needs no mask (BLOCK_K | bk | K).
fp8 tensor cores (and Triton's fp32 -> fp8e4nv conversion) need sm_89+: the specs are
registered for sm_90a only, and the op takes the reference path on older GPUs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._moe_common import down_epilogue, gate_up_epilogue, tile_expert, tile_pairs, up_rows
from .fp8_w8a8 import per_token_group_quant_fp8
from .moe import (_act_tag, _bias_sig, _in_order, _rows_aligned, gate_up_variants,
                  moe_config, moe_launch, pair_lora)
from .registry import KernelSpec, register

FP8 = torch.float8_e4m3fn
QUANT_EPS = 1e-10           # per_token_group_quant_fp8's floor of a group's max |x|


@dataclass(frozen=True)
class MoeFp8W8A8Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def moe_fp8_w8a8_config(n_pairs: int, num_experts: int, bk: int, aligned: bool,
                        gate_up: bool) -> MoeFp8W8A8Config:
    """One kernel's tiles. BLOCK_M from ``moe_config`` (16 / 32 / 64 by the average pairs
    per expert; 64 -> wgmma on sm_90a). BLOCK_K: the largest power of two <= 128 (64 at
    BLOCK_M 64, which holds more accumulators; 32 for unaligned weights, whose
    per-element pointers spilled at BLOCK_M 32 x 128) dividing bk, at least 32 (fp8
    MMA's K step; the op asks bk % 32 == 0), so a tile never straddles two scale groups
    and K (a multiple of bk) needs no mask. 16-byte aligned weight rows: a 64-wide N tile (32
    for gate-up at BLOCK_M 64: two accumulators and two per-tile partials); other
    weights (a pointer per element): 32-wide, 2 stages."""
    bm = moe_config(n_pairs, num_experts, torch.float16).block_m
    # unaligned weights (a pointer per element): BM 32 x BK 128 spilled, BM 64 x 64
    # took 252 registers on sm_90a
    block_k = (128 if bm <= 32 else 64) if aligned else 32
    while bk % block_k:
        block_k //= 2
    if aligned:
        bn, stages = (32 if gate_up and bm == 64 else 64), 3
    else:
        bn, stages = 32, 2
    return MoeFp8W8A8Config(bm, bn, block_k, 4, stages)


@triton.jit
def moe_fp8_w8a8_gate_up_kernel(xq_ptr, sx_ptr, w_ptr, s_ptr, act_ptr, delta_ptr,
                                sorted_ids_ptr,
                                block_expert_ptr, n_pairs, top_k, H, I, block_n, block_k,
                                ssx_t, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k,
                                bias_ptr, sb_e, sb_n, alpha, limit,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
                                RNE_BF16: tl.constexpr = False, ACT: tl.constexpr = "silu",
                                GATED: tl.constexpr = True, HAS_BIAS: tl.constexpr = False,
                                HAS_DELTA: tl.constexpr = False):
    """act[p, n-block] = act(gate) * up for the pairs p of tile pid_m: xq fp8 [T, H]
    (contiguous) with group scales sx fp32 [T, H / block_k] (row stride ssx_t), w fp8
    [E, 2I, H] (non-gated: [E, I, H], act(up) stored) with block scales s fp32
    [E, ceil(2I / block_n), H / block_k]; act [T*k, I] in x.dtype. Loads clamped (rows
    n % I, the last pair), the store masked."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:               # past the last real tile (the grid is a static upper bound)
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    tok = (tl.minimum(pair, n_pairs - 1) // top_k).to(tl.int64)   # clamped: loads unmasked
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % I                                 # columns clamped for the loads
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = xq_ptr + tok[:, None] * H + offs_k[None, :]                         # [BM, BK]
    sx_ptrs = sx_ptr + tok * ssx_t                                               # [BM]
    w_base = w_ptr + e * sw_e + offs_k[None, :].to(tl.int64) * sw_k
    g_ptrs = w_base + n_l[:, None].to(tl.int64) * sw_n           # read only when GATED
    u_ptrs = w_base + up_rows(n_l, I, GATED)[:, None].to(tl.int64) * sw_n
    s_base = s_ptr + e * ss_e                        # the rows' scale blocks, [BN]
    sg_ptrs = s_base + (n_l // block_n).to(tl.int64) * ss_n
    su_ptrs = s_base + (up_rows(n_l, I, GATED) // block_n).to(tl.int64) * ss_n
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # read only when GATED
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if ALIGNED:  # 16-byte aligned weight rows, unit inner stride (the launcher checked)
            if GATED:
                g_ptrs = tl.multiple_of(g_ptrs, [1, 16])
            u_ptrs = tl.multiple_of(u_ptrs, [1, 16])
        a = tl.load(tl.multiple_of(x_ptrs, [1, 16]))      # H % 32 == 0: aligned rows
        j = k0 // block_k                                 # the tile's scale group
        s_tok = tl.load(sx_ptrs + j)[:, None]
        if GATED:
            sg = tl.load(sg_ptrs + j * ss_k)[None, :]
            acc_g += tl.dot(a, tl.trans(tl.load(g_ptrs))) * (s_tok * sg)
        su = tl.load(su_ptrs + j * ss_k)[None, :]
        acc_u += tl.dot(a, tl.trans(tl.load(u_ptrs))) * (s_tok * su)
        x_ptrs += BLOCK_K
        if GATED:
            g_ptrs += BLOCK_K * sw_k
        u_ptrs += BLOCK_K * sw_k
    gate_up_epilogue(acc_g, acc_u, act_ptr, delta_ptr, pair, live, offs_n, n_l, n_pairs,
                     I, HAS_DELTA=HAS_DELTA, CLAMPED=True, ACT=ACT, GATED=GATED,
                     RNE_BF16=RNE_BF16, bias_ptr=bias_ptr, e=e, sb_e=sb_e, sb_n=sb_n,
                     alpha=alpha, limit=limit, HAS_BIAS=HAS_BIAS)


@triton.jit
def moe_fp8_w8a8_down_kernel(aq_ptr, sa_ptr, w_ptr, s_ptr, tw_ptr, out_ptr, delta_ptr,
                             sorted_ids_ptr,
                             block_expert_ptr, n_pairs, top_k, H, I, block_n, block_k,
                             ssa_p, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k, stw_t, stw_j,
                             bias_ptr, sb_e, sb_n,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
                             HAS_BIAS: tl.constexpr = False,
                             HAS_DELTA: tl.constexpr = False):
    """buf[p, n-block] = (sum over K tiles of dot(act_q, w2^T) * s_act * s_w) *
    topk_weights[t, j] for the pairs p of tile pid_m: act_q fp8 [T*k, I] (contiguous)
    with group scales sa fp32 [T*k, I / block_k] (row stride ssa_p), w fp8 [E, H, I] with
    block scales s fp32 [E, ceil(H / block_n), I / block_k]; buf fp32 [T*k, H]. Loads
    clamped, the store masked."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    pair_l = tl.minimum(pair, n_pairs - 1).to(tl.int64)       # clamped for the loads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = aq_ptr + pair_l[:, None] * I + offs_k[None, :]                      # [BM, BK]
    sa_ptrs = sa_ptr + pair_l * ssa_p                                            # [BM]
    w_ptrs = (w_ptr + e * sw_e + n_l[:, None].to(tl.int64) * sw_n
              + offs_k[None, :].to(tl.int64) * sw_k)                             # [BN, BK]
    s_ptrs = s_ptr + e * ss_e + (n_l // block_n).to(tl.int64) * ss_n             # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if ALIGNED:
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        a = tl.load(tl.multiple_of(a_ptrs, [1, 16]))      # I % 32 == 0: aligned rows
        j = k0 // block_k
        scale = tl.load(sa_ptrs + j)[:, None] * tl.load(s_ptrs + j * ss_k)[None, :]
        acc += tl.dot(a, tl.trans(tl.load(w_ptrs))) * scale
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sw_k
    down_epilogue(acc, tw_ptr, out_ptr, delta_ptr, pair_l, live, offs_n, n_l, top_k, H,
                  stw_t, stw_j, HAS_DELTA=HAS_DELTA, CLAMPED=True, bias_ptr=bias_ptr, e=e,
                  sb_e=sb_e, sb_n=sb_n, HAS_BIAS=HAS_BIAS)


def _quantize(v: torch.Tensor, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_q fp8 [M, K] contiguous, scales fp32 [M, K / bk]) per token group of bk."""
    s = _alloc.empty((v.shape[0], v.shape[1] // bk), torch.float32, v.device)
    return per_token_group_quant_fp8(v, bk, QUANT_EPS, s, False), s


def fused_moe_fp8_w8a8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                       w2: torch.Tensor, w2_scale: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       block_size: list[int], lora: Sequence[torch.Tensor] | None = None,
                       activation: str = "silu", gated: bool = True,
                       w13_bias: torch.Tensor | None = None,
                       w2_bias: torch.Tensor | None = None, alpha: float = 1.702,
                       limit: float = 7.0) -> torch.Tensor:
    """See minikernels.ops.fused_moe_fp8_w8a8 (inputs checked there: min(bk, K) a multiple
    of 32 dividing K, for K = H and I; any strides). w13 / w2: the fp8 weights or their
    bytes (uint8 views); lora the six tensors of minikernels.ops.MoELoRA, or None
    (``HAS_DELTA``: moe.py's d13 / d2 rows added before the activation / the router
    weight); activation / gated the gate-up epilogue's ``ACT`` / ``GATED``; w13_bias / w2_bias
    (x.dtype, or None): ``HAS_BIAS``, added after the scales; alpha / limit:
    swigluoai's."""
    t, h = x.shape
    if t == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    w13, w2 = w13.view(FP8), w2.view(FP8)
    n13, inter = w13.shape[1], w2.shape[2]          # n13: 2I gated, I non-gated
    bn, bk = int(block_size[0]), int(block_size[1])
    # a block past the matrix edge covers the edge (so do the activations' groups)
    bn13, bk13, bn2, bk2 = min(bn, n13), min(bk, h), min(bn, h), min(bk, inter)
    n_pairs, num_experts = t * topk_ids.shape[1], w13.shape[0]
    x_q, s_x = _quantize(x, bk13)
    aligned13, aligned2 = _rows_aligned(w13), _rows_aligned(w2)
    cfg13 = moe_fp8_w8a8_config(n_pairs, num_experts, bk13, aligned13, True)
    cfg2 = moe_fp8_w8a8_config(n_pairs, num_experts, bk2, aligned2, False)
    run = moe_launch(x, topk_ids, num_experts, inter, cfg13.block_m,
                     pair_lora(lora, topk_ids), w13_bias, w2_bias, alpha, limit)

    def tiles(cfg: MoeFp8W8A8Config, aligned: bool) -> dict:
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                "ALIGNED": aligned, "HAS_DELTA": run.has_delta, "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages}

    # gate_up_args: act, the LoRA d13 rows (from x), sorted_ids, block_expert, n_pairs,
    # top_k, H, I
    moe_fp8_w8a8_gate_up_kernel[run.grid(inter, cfg13.block_n)](
        x_q, s_x, w13, w13_scale, *run.gate_up_args(), bn13, bk13, s_x.stride(0),
        *w13.stride(), *w13_scale.stride(), RNE_BF16=run.interp_bf16, ACT=activation,
        GATED=gated, **run.gate_up_bias(), **tiles(cfg13, aligned13))
    act_q, s_act = _quantize(run.act, bk2)
    # down_args: topk_weights, buf, the LoRA d2 rows (from act, before its quantization),
    # sorted_ids, block_expert, n_pairs, top_k, H, I
    moe_fp8_w8a8_down_kernel[run.grid(h, cfg2.block_n)](
        act_q, s_act, w2, w2_scale, *run.down_args(topk_weights), bn2, bk2, s_act.stride(0),
        *w2.stride(), *w2_scale.stride(), topk_weights.stride(0), topk_weights.stride(1),
        **run.down_bias(), **tiles(cfg2, aligned2))
    return run.result()


# --------------------------------------------------------------------------- registry
# sm_90a only (fp8 tensor cores). As dispatched at 128 x 128 scale blocks: x dtype (the
# intermediate's and the biases' type) fp16 / bf16 / fp32 x BLOCK_M 16 / 32 / 64 x two
# weight-row kinds:
#   aligned    16-byte aligned weight rows: unit inner stride as a constant, pointers and
#              outer strides multiples of 16 (vector loads);
#   unaligned  every weight stride a runtime value.
# The fp8 activations are contiguous buffers of the launcher (H, I multiples of 32).
# Each gate-up spec once per (ACT, GATED) of moe.py's ``gate_up_variants``; the aligned
# fp16 / bf16 tiles also with LoRA (HAS_DELTA) and with expert biases (swigluoai gate-up;
# down). A bk of 32 / 64
# gives a smaller BLOCK_K of the same tiles: fewer registers.

def _register(dt: str, kind: str, cfg: MoeFp8W8A8Config, gate_up: bool, act: str = "silu",
              gated: bool = True, bias: bool = False, lora: bool = False) -> None:
    aligned = kind == "aligned"
    const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "ALIGNED": aligned, "HAS_BIAS": bias, "HAS_DELTA": lora}
    unit = {"sw_k": 1, "ss_k": 1} if aligned else {}
    ints = {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32", "block_n": "i32",
            "block_k": "i32"}
    strides = {n: "i64" for n in ("sw_e", "sw_n", "sw_k", "ss_e", "ss_n", "ss_k")}
    if gate_up:
        fn, name = moe_fp8_w8a8_gate_up_kernel, "moe_fp8_w8a8_gate_up"
        sig = {"xq_ptr": "*fp8e4nv", "sx_ptr": "*fp32", "act_ptr": f"*{dt}", "ssx_t": "i64"}
        div = ("xq_ptr", "act_ptr", "H", "I")
        const.update(RNE_BF16=False, ACT=act, GATED=gated)           # RNE: interpreter only
    else:
        fn, name = moe_fp8_w8a8_down_kernel, "moe_fp8_w8a8_down"
        sig = {"aq_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "tw_ptr": "*fp32",
               "out_ptr": "*fp32", "ssa_p": "i64", "stw_t": "i64", "stw_j": "i64"}
        div = ("aq_ptr", "out_ptr", "H", "I")
    sig.update({**_bias_sig(dt, gate_up), "w_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                "delta_ptr": f"*{dt}",
                "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", **ints, **strides,
                **{c: "constexpr" for c in (*const, *unit)}})
    div += ("delta_ptr", "sorted_ids_ptr", "block_k")
    if aligned:
        div += ("w_ptr", "sw_e", "sw_n")
    register(KernelSpec(
        name=f"{name}[{dt},BM={cfg.block_m},{kind}" + (",lora" if lora else "")
        + _act_tag(act, gated) + (",bias" if bias else "") + "]",
        fn=fn, signature=_in_order(fn, sig), constexprs={**const, **unit},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, tensor_core=True,
        wgmma_expected=cfg.block_m >= 64, archs=(90,), divisible_by_16=div))


for _dt in ("fp16", "bf16", "fp32"):
    for _kind in ("aligned", "unaligned"):
        for _avg in (8, 32, 256):          # one spec per BLOCK_M that moe_config picks
            for _gate_up in (True, False):
                _cfg = moe_fp8_w8a8_config(_avg * 64, 64, 128, _kind == "aligned", _gate_up)
                for _act, _gated in (gate_up_variants(_dt, _cfg.block_m) if _gate_up
                                     else (("silu", True),)):
                    _register(_dt, _kind, _cfg, _gate_up, _act, _gated)
                    if _kind == "aligned" and _dt != "fp32":        # + LoRA (HAS_DELTA)
                        _register(_dt, _kind, _cfg, _gate_up, _act, _gated, lora=True)
                if _kind == "aligned" and _dt != "fp32":   # + expert biases (GPT-OSS-like)
                    _register(_dt, _kind, _cfg, _gate_up, "swigluoai" if _gate_up else "silu",
                              True, bias=True)
