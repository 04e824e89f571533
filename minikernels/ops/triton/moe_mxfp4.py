"""Mixture-of-experts MLP with MXFP4 experts (W4A16, GPT-OSS's checkpoint format) in
Triton: ``fused_moe`` of ops/triton/moe.py with each weight tile decoded from FP4 in the K
loop.

Weights: blocks uint8 [E, N, K/32, 16] (32 FP4 e2m1 codes per block, two per byte, the
even element in the low nibble), scales uint8 [E, N, K/32] (E8M0: 2 ** (s - 127)).
Algorithm: the same three steps as ops/triton/moe.py (its ``sort_pairs_by_expert`` puts the
T*k (token, slot) pairs into expert-sorted BLOCK_M tiles with moe_align's kernels, no sync).
  1. ``moe_mxfp4_gate_up_kernel``: program (b, n) gathers x rows of tile b's pairs; the K
     tile is one MXFP4 block (BLOCK_K = 32): it loads the gate and up rows' 16 bytes of
     that block ([BN, 16] uint8), splits each byte into its low and high nibble (joined:
     low nibble first, [BN, 32]), decodes each code with integer ops (sign = bit 3,
     exponent = bits 2..1, mantissa = bit 0; 2 * |value| = m if exp == 0 else
     (2 + m) << (exp - 1), an integer 0..12), multiplies it by its row's block scale
     2 ** (s - 128) (the E8M0 scale and the halving, built from the exponent bits: exact)
     in fp32, rounds W = value * 2 ** (s - 127) to x.dtype (exact unless it leaves the
     dtype's range) and runs tl.dot(x, W^T) with fp32 accumulation. Then the shared
     epilogue: biases, act(gate) * up (``ACT``; ``GATED`` False: act(up)) rounded to
     x.dtype into act [T*k, I].
  2. ``moe_mxfp4_down_kernel``: act @ W2[e]^T the same way, times topk_weights in fp32, into
     an fp32 buffer [T*k, H].
  3. out = buffer.view(T, k, H).sum(1), rounded once to x.dtype.
H and I are multiples of 32, so no K tile is ragged (no K mask). LoRA on the experts
(optional) as moe_int4.py (``HAS_DELTA``). The kernels read each block's 16 bytes as 4
int32 words (``_as_words``: a view of the uint8 blocks when their bytes are contiguous and
4-byte aligned, else a copy); every other stride (expert, row, block; the scales' three)
is a runtime value. fp32 x: exact ("ieee") dots, smaller tiles.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._moe_common import down_epilogue, gate_up_epilogue, tile_expert, tile_pairs, up_rows
from .int4_matmul import _unpack_nibbles
from .moe import (_act_tag, _bias_sig, _in_order, bias_variants, gate_up_variants, moe_config,
                  moe_launch, pair_lora)
from .registry import KernelSpec, register
from .tiling import acc_dot

BLOCK_K = 32          # one MXFP4 block per K tile


@dataclass(frozen=True)
class MoeMxfp4Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def moe_mxfp4_config(n_pairs: int, num_experts: int, dtype: torch.dtype, lora: bool = False,
                     bias: bool = False) -> MoeMxfp4Config:
    """BLOCK_M from moe.py's ``moe_config`` (16 / 32 / 64 by the average pairs per
    expert); a 64-wide N tile and one 32-deep MXFP4 block per K tile for fp16 / bf16;
    fp32 x ("ieee" dots on FMAs, whose operands sit in registers): BLOCK_M 16 and a
    32-wide N tile. ``lora`` (the LoRA epilogue) or ``bias`` (expert biases: GPT-OSS's
    swigluoai epilogue) at BLOCK_M 64 take 8 warps (4 spill). Every combination is a
    registered spec."""
    bm = moe_config(n_pairs, num_experts, torch.float16).block_m
    if dtype == torch.float32:
        return MoeMxfp4Config(16, 32, BLOCK_K, num_warps=4, num_stages=2)
    return MoeMxfp4Config(bm, 64, BLOCK_K, num_warps=8 if bm == 64 and (lora or bias) else 4,
                          num_stages=3)


@triton.jit
def _fp4_tile(b_ptr, s_ptr, rows, row_ok, g, sb_n, sb_g, ss_n, ss_g,
              BLOCK_N: tl.constexpr):
    """W of block g of rows ``rows`` of one expert (pointers already at the expert):
    [BN, 32] fp32, FP4 value * 2 ** (s - 127), exact; 0 for rows past the end. The
    block's 16 bytes are read as 4 little-endian int32 words (b_ptr: the blocks viewed
    as int32, strides in words), so nibble i of word w is element 8w + i: int4_matmul's
    in-thread unpack."""
    j = tl.arange(0, 4)
    words = tl.load(b_ptr + rows[:, None] * sb_n + g * sb_g + j[None, :],
                    mask=row_ok[:, None], other=0)                            # [BN, 4]
    c = _unpack_nibbles(words, BLOCK_N, 32)                          # [BN, 32] 0..15
    ex = (c >> 1) & 3
    m = c & 1
    mag2 = tl.where(ex == 0, m, (2 + m) << tl.maximum(ex - 1, 0))   # 2 * |value|
    codes = tl.where((c & 8) != 0, -mag2, mag2).to(tl.float32)
    s = tl.load(s_ptr + rows * ss_n + g * ss_g, mask=row_ok, other=0).to(tl.int32)
    # 2 ** (s - 128) from its fp32 bits (exact, integer ops only): exponent field s - 1,
    # or for s <= 1 the subnormals 2 ** -127 (0x400000) / 2 ** -128 (0x200000)
    bits = tl.where(s >= 2, (s - 1) << 23, 0x400000 >> tl.maximum(1 - s, 0))
    scale = bits.to(tl.float32, bitcast=True)
    return codes * scale[:, None]


@triton.jit
def moe_mxfp4_gate_up_kernel(x_ptr, b_ptr, s_ptr, act_ptr, delta_ptr, sorted_ids_ptr,
                             block_expert_ptr, n_pairs, top_k, H, I,
                             HAS_DELTA: tl.constexpr,
                             sx_t, sb_e, sb_n, sb_g, ss_e, ss_n, ss_g,
                             bias_ptr, sbias_e, sbias_n, alpha, limit,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                             RNE_BF16: tl.constexpr = False,
                             ACT: tl.constexpr = "silu", GATED: tl.constexpr = True,
                             HAS_BIAS: tl.constexpr = False):
    """act[p, n-block] = act(gate) * up for the pairs p of tile pid_m: x [T, H], blocks
    [E, 2I, H/32, 16] uint8 (non-gated: [E, I, ...], act(up) stored), scales [E, 2I, H/32]
    uint8; per K block W decoded and scaled in registers, rounded to x.dtype, then
    tl.dot with fp32 accumulation; masked loads."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:               # past the last real tile (the grid is a static upper bound)
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    g_rows = offs_n.to(tl.int64)                     # gate rows n, up rows I + n
    u_rows = up_rows(g_rows, I, GATED)               # (non-gated experts: the up rows n)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * sx_t + offs_k[None, :]                     # [BM, BK]
    bp = b_ptr + e * sb_e
    sp = s_ptr + e * ss_e
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # read only when GATED
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, H // BLOCK_K):
        a = tl.load(x_ptrs, mask=live[:, None], other=0.0)
        # DOT_F32: fp32 x, and the interpreter's bf16 tl.dot (wrong there): same values
        if GATED:
            wg = _fp4_tile(bp, sp, g_rows, n_ok, g, sb_n, sb_g, ss_n, ss_g, BLOCK_N)
            acc_g = acc_dot(a, tl.trans(wg.to(x_ptr.dtype.element_ty)), acc_g, DOT_F32)
        wu = _fp4_tile(bp, sp, u_rows, n_ok, g, sb_n, sb_g, ss_n, ss_g, BLOCK_N)
        acc_u = acc_dot(a, tl.trans(wu.to(x_ptr.dtype.element_ty)), acc_u, DOT_F32)
        x_ptrs += BLOCK_K
    gate_up_epilogue(acc_g, acc_u, act_ptr, delta_ptr, pair, live, offs_n, offs_n, n_pairs,
                     I, HAS_DELTA, CLAMPED=False, ACT=ACT, GATED=GATED,
                     RNE_BF16=RNE_BF16, bias_ptr=bias_ptr, e=e, sb_e=sbias_e,
                     sb_n=sbias_n, alpha=alpha, limit=limit, HAS_BIAS=HAS_BIAS)


@triton.jit
def moe_mxfp4_down_kernel(act_ptr, b_ptr, s_ptr, tw_ptr, out_ptr, delta_ptr,
                          sorted_ids_ptr, block_expert_ptr, n_pairs, top_k, H, I,
                          HAS_DELTA: tl.constexpr,
                          sb_e, sb_n, sb_g, ss_e, ss_n, ss_g, stw_t, stw_j,
                          bias_ptr, sbias_e, sbias_n,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                          RNE_BF16: tl.constexpr = False, HAS_BIAS: tl.constexpr = False):
    """buf[p, n-block] = (act[p] @ W2[e]^T) * topk_weights[t, j] for the pairs p of tile
    pid_m: act [T*k, I] in x.dtype, blocks [E, H, I/32, 16] uint8, scales [E, H, I/32]
    uint8, buf fp32 [T*k, H]; masked loads."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    rows = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair64[:, None] * I + offs_k[None, :]                   # [BM, BK]
    bp = b_ptr + e * sb_e
    sp = s_ptr + e * ss_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, I // BLOCK_K):
        a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        w = _fp4_tile(bp, sp, rows, n_ok, g, sb_n, sb_g, ss_n, ss_g, BLOCK_N)
        acc = acc_dot(a, tl.trans(w.to(act_ptr.dtype.element_ty)), acc, DOT_F32)
        a_ptrs += BLOCK_K
    down_epilogue(acc, tw_ptr, out_ptr, delta_ptr, pair64, live, offs_n, offs_n, top_k, H,
                  stw_t, stw_j, HAS_DELTA, CLAMPED=False, bias_ptr=bias_ptr, e=e,
                  sb_e=sbias_e, sb_n=sbias_n, HAS_BIAS=HAS_BIAS)


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels index x's inner dim with stride 1: copy a tensor whose last dim is
    strided (a last dim of size 1 has no stride to honour)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _as_words(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [E, N, G, 16] -> the same bytes as int32 [E, N, G, 4] (a view when
    the bytes of each block are contiguous and every stride and the offset are multiples
    of 4; else a contiguous copy first)."""
    try:
        return blocks.view(torch.int32)
    except RuntimeError:
        return blocks.contiguous().view(torch.int32)


def _bias_kw(kw: dict) -> dict:
    """MoeLaunch's bias keywords under this module's names (sbias_*: sb_* are the
    blocks' strides here)."""
    out = dict(kw)
    out["sbias_e"], out["sbias_n"] = out.pop("sb_e"), out.pop("sb_n")
    return out


def fused_moe_mxfp4(x: torch.Tensor, w13_blocks: torch.Tensor, w13_scales: torch.Tensor,
                    w2_blocks: torch.Tensor, w2_scales: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    lora: Sequence[torch.Tensor] | None = None,
                    activation: str = "silu", gated: bool = True,
                    w13_bias: torch.Tensor | None = None,
                    w2_bias: torch.Tensor | None = None, alpha: float = 1.702,
                    limit: float = 7.0) -> torch.Tensor:
    """See minikernels.ops.fused_moe_mxfp4 (inputs checked there; any outer strides).
    lora: the six tensors of minikernels.ops.MoELoRA, or None; activation: the gate-up
    epilogue's ``ACT``; gated: its ``GATED`` (False: w13 holds the up rows only);
    w13_bias / w2_bias (x.dtype, or None): ``HAS_BIAS``; alpha / limit: swigluoai's."""
    t, h = x.shape
    num_experts = w13_blocks.shape[0]
    inter = w2_blocks.shape[2] * 32
    if t == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    x = _unit_inner(x)
    w13_blocks, w2_blocks = _as_words(w13_blocks), _as_words(w2_blocks)
    plora = pair_lora(lora, topk_ids)
    cfg = moe_mxfp4_config(t * topk_ids.shape[1], num_experts, x.dtype,
                           lora=plora is not None,
                           bias=w13_bias is not None or w2_bias is not None)
    run = moe_launch(x, topk_ids, num_experts, inter, cfg.block_m, plora, w13_bias, w2_bias,
                     alpha, limit)
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "DOT_F32": run.dot_f32, "RNE_BF16": run.interp_bf16,
              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    moe_mxfp4_gate_up_kernel[run.grid(inter, cfg.block_n)](
        x, w13_blocks, w13_scales, *run.gate_up_args(), run.has_delta, x.stride(0),
        *w13_blocks.stride()[:3], *w13_scales.stride(), ACT=activation, GATED=gated,
        **_bias_kw(run.gate_up_bias()), **consts)
    moe_mxfp4_down_kernel[run.grid(h, cfg.block_n)](
        run.act, w2_blocks, w2_scales, *run.down_args(topk_weights), run.has_delta,
        *w2_blocks.stride()[:3], *w2_scales.stride(), topk_weights.stride(0),
        topk_weights.stride(1), **_bias_kw(run.down_bias()), **consts)
    return run.result()


# --------------------------------------------------------------------------- registry
# Every dispatched combination: fp16 / bf16 x BLOCK_M 16 / 32 / 64 (fp32: 16), the
# gate-up once per (ACT, GATED) of moe.py's ``gate_up_variants``, + LoRA (HAS_DELTA) and
# + expert biases with swigluoai (GPT-OSS's experts) for fp16 / bf16. The blocks' inner
# stride is 1 (the launcher guarantees it; not a kernel argument).

_INTS = {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32", "HAS_DELTA": "constexpr"}
_STRIDES = {n: "i64" for n in ("sb_e", "sb_n", "sb_g", "ss_e", "ss_n", "ss_g")}


def _mx_bias_sig(dt: str, gate_up: bool) -> dict[str, str]:
    sig = _bias_sig(dt, gate_up)
    sig["sbias_e"], sig["sbias_n"] = sig.pop("sb_e"), sig.pop("sb_n")
    return sig


for _dt, _tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16),
                  ("fp32", torch.float32)):
    for _avg in (8, 32, 256):              # one spec per BLOCK_M that moe_config picks
        if _dt == "fp32" and _avg != 8:
            continue                       # fp32: BLOCK_M 16
        _cfg = moe_mxfp4_config(_avg * 64, 64, _tdt)
        _tag = f"{_dt},BM={_cfg.block_m}"
        _const = {"BLOCK_M": _cfg.block_m, "BLOCK_N": _cfg.block_n, "BLOCK_K": _cfg.block_k,
                  "DOT_F32": _dt == "fp32", "RNE_BF16": False}
        _w = {"b_ptr": "*i32", "s_ptr": "*u8"}
        _sig = {"x_ptr": f"*{_dt}", **_w, "act_ptr": f"*{_dt}", "delta_ptr": f"*{_dt}",
                "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", **_INTS,
                "sx_t": "i64", **_STRIDES, **_mx_bias_sig(_dt, gate_up=True),
                **{c: "constexpr" for c in _const}, "ACT": "constexpr", "GATED": "constexpr"}
        _sig_down = {"act_ptr": f"*{_dt}", **_w, "tw_ptr": "*fp32", "out_ptr": "*fp32",
                     "delta_ptr": f"*{_dt}", "sorted_ids_ptr": "*i32",
                     "block_expert_ptr": "*i32", **_INTS, **_STRIDES, "stw_t": "i64",
                     "stw_j": "i64", **_mx_bias_sig(_dt, gate_up=False),
                     **{c: "constexpr" for c in _const}}
        for _lora in (False, True) if _dt != "fp32" else (False,):   # + LoRA (HAS_DELTA)
            _ltag = _tag + (",lora" if _lora else "")

            def _opts(bias: bool, lora: bool = _lora) -> dict:
                cfg = moe_mxfp4_config(_avg * 64, 64, _tdt, lora=lora, bias=bias)
                return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                        "tensor_core": _dt != "fp32",
                        "wgmma_expected": _dt != "fp32" and cfg.block_m >= 64}
            _biased = bias_variants(_dt) if not _lora else ()
            for _act, _gated, _bias in (*((a, g, False) for a, g in
                                          gate_up_variants(_dt, _cfg.block_m)), *_biased):
                register(KernelSpec(
                    name=f"moe_mxfp4_gate_up[{_ltag}{_act_tag(_act, _gated)}"
                    + (",bias]" if _bias else "]"),
                    fn=moe_mxfp4_gate_up_kernel,
                    signature=_in_order(moe_mxfp4_gate_up_kernel, _sig),
                    constexprs={**_const, "HAS_DELTA": _lora, "ACT": _act, "GATED": _gated,
                                "HAS_BIAS": _bias},
                    **_opts(_bias)))
            for _bias in (False, True) if _biased else (False,):
                register(KernelSpec(name=f"moe_mxfp4_down[{_ltag}"
                                    + (",bias]" if _bias else "]"), fn=moe_mxfp4_down_kernel,
                                    signature=_in_order(moe_mxfp4_down_kernel, _sig_down),
                                    constexprs={**_const, "HAS_DELTA": _lora,
                                                "HAS_BIAS": _bias}, **_opts(_bias)))
