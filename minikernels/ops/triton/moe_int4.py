"""Mixture-of-experts MLP with int4 experts (W4A16) in Triton: ``fused_moe`` of
ops/triton/moe.py with the weight tiles dequantized in the K loop (int4_matmul's unpack).

Algorithm: the same three steps as ops/triton/moe.py (its ``sort_pairs_by_expert`` puts the
T*k (token, slot) pairs into expert-sorted BLOCK_M tiles with moe_align's kernels, no sync).
  1. ``moe_int4_gate_up_kernel``: program (b, n) gathers x rows of tile b's pairs and, per
     K tile, loads the packed gate and up words of expert e as [BN, BK/8] int32, unpacks the
     8 nibbles of each word (lowest first) into [BN, BK], dequantizes (q - z) * s in fp32,
     rounds to x.dtype (the reference's W), and runs tl.dot(x, W^T) with fp32
     accumulation; stores act(gate) * up rounded to x.dtype into act [T*k, I] (act: the
     constexpr ``ACT``, silu / gelu / gelu_tanh, as moe.py). ``GATED`` False (non-gated
     experts, as moe.py): only the up words (w13 [E, I, H/8]), act(up) stored.
  2. ``moe_int4_down_kernel``: act @ W2[e]^T the same way, times topk_weights in fp32, into
     an fp32 buffer [T*k, H].
  3. out = buffer.view(T, k, H).sum(1), rounded once to x.dtype.

Groups. BLOCK_K is 32 (a multiple of 8 words' nibbles). When the group size of both
matrices (group_size, or H and I for per-channel -1) is a multiple of 32, every K tile lies
inside one group: one scale and zero per row and tile, and K needs no mask (GROUPED).
Otherwise (groups of 8, 16, 24, 40 ..., or per-channel with H or I not a multiple of 32)
the kernels load a scale and zero per (row, packed word) of the tile (a group size is a
multiple of 8, so a word never straddles groups), repeat them over the word's 8 nibbles
in registers, and mask K (not GROUPED).
LoRA on the experts (optional): moe.py's ``pair_lora`` / ``gate_up_delta`` /
``down_delta``; step 1 adds the pair's d13 row to its gate / up accumulators before the
epilogue, step 2 its d2 row before the router weight, behind the constexpr ``HAS_DELTA``.
Scales / zeros of the other half type than x are converted to x.dtype on the host first.
Every tensor's inner dim must be unit-stride (the launcher copies one that is not); all
outer strides are runtime values. Tile setup and epilogues: ops/triton/_moe_common.py
(masked loads, as moe.py).
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
from .interpreter_rounding import rne_bf16
from .moe import (_act_tag, _bias_sig, _in_order, bias_variants, gate_up_variants, moe_config,
                  moe_launch, pair_lora)
from .registry import KernelSpec, register
from .tiling import acc_dot

BLOCK_K = 32


@dataclass(frozen=True)
class MoeInt4Config:
    block_m: int
    block_n: int
    block_k: int
    grouped: bool
    num_warps: int = 4
    num_stages: int = 3


def moe_int4_config(n_pairs: int, num_experts: int, group_h: int, group_i: int,
                    lora: bool = False) -> MoeInt4Config:
    """BLOCK_M from moe.py's ``moe_config`` (16 / 32 / 64 by the average pairs per
    expert); a 64-wide N tile and a 32-deep K tile (the unpacked [BN, BK] weight tile of
    two matrices in registers); GROUPED when each K tile sits in one group of both
    matrices. Every combination is a registered spec (no spills on sm_80 and sm_90a);
    ``lora`` (the LoRA epilogue) at BLOCK_M 64 takes 8 warps (4 spill on sm_90a)."""
    base = moe_config(n_pairs, num_experts, torch.float16)
    grouped = group_h % BLOCK_K == 0 and group_i % BLOCK_K == 0
    return MoeInt4Config(base.block_m, 64, BLOCK_K, grouped,
                         num_warps=8 if lora and base.block_m == 64 else 4,
                         num_stages=3 if grouped else 2)


@triton.jit
def _repeat8(v, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS / 8] -> [ROWS, COLS], column 8w + j = v[:, w]: the joins of
    _unpack_nibbles, so the result has the unpacked nibbles' layout."""
    r = tl.join(v, v)
    r = tl.join(r, r)
    return tl.reshape(tl.join(r, r), (ROWS, COLS))


@triton.jit
def _dequant_rows(qw_ptr, s_ptr, z_ptr, rows, row_ok, k0, K, group, sq_n, ss_n, sz_n,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPED: tl.constexpr,
                  RNE_BF16: tl.constexpr):
    """W[rows, k0:k0+BK] of one expert (pointers already at the expert) in fp32, rounded
    to a value of the scales' dtype: [BN, BK]; 0 for rows past the end (their scale loads
    0); columns past K are (0 - z) * s, finite, and meet zeros of the activation."""
    rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    w_ptrs = qw_ptr + rows[:, None] * sq_n + rw[None, :]
    if GROUPED:   # K % BK == 0 and the tile inside one group
        words = tl.load(w_ptrs, mask=row_ok[:, None], other=0)
    else:
        words = tl.load(w_ptrs, mask=row_ok[:, None] & (rw[None, :] < K // 8), other=0)
    q = _unpack_nibbles(words, BLOCK_N, BLOCK_K).to(tl.float32)
    if GROUPED:
        g = k0 // group
        s = tl.load(s_ptr + rows * ss_n + g, mask=row_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * sz_n + g, mask=row_ok, other=0.0).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
    else:
        # G is a multiple of 8, so each word lies in one group: one scale / zero per word
        # [BN, BK/8], repeated over its 8 nibbles in-thread (the unpack's join layout)
        g = tl.minimum(rw // (group // 8), K // group - 1)
        s = tl.load(s_ptr + rows[:, None] * ss_n + g[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * sz_n + g[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        w = (q - _repeat8(z, BLOCK_N, BLOCK_K)) * _repeat8(s, BLOCK_N, BLOCK_K)
    if RNE_BF16:
        w = rne_bf16(w)
    return w.to(s_ptr.dtype.element_ty)


@triton.jit
def moe_int4_gate_up_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, act_ptr, delta_ptr, sorted_ids_ptr,
                            block_expert_ptr, n_pairs, top_k, H, I, group,
                            HAS_DELTA: tl.constexpr,
                            sx_t, sq_e, sq_n, ss_e, ss_n, sz_e, sz_n,
                            bias_ptr, sb_e, sb_n, alpha, limit,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUPED: tl.constexpr,
                            DOT_F32: tl.constexpr, RNE_BF16: tl.constexpr = False,
                            ACT: tl.constexpr = "silu", GATED: tl.constexpr = True,
                            HAS_BIAS: tl.constexpr = False):
    """act[p, n-block] = act(gate) * up for the pairs p of tile pid_m: x [T, H] fp16 /
    bf16, qw [E, 2I, H/8] int32 packed nibbles (non-gated: [E, I, H/8], act(up) stored),
    s / z [E, 2I, H/group] in x.dtype; each K tile dequantized by ``_dequant_rows``, fp32
    accumulators, masked loads."""
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
    qw = qw_ptr + e * sq_e
    sp = s_ptr + e * ss_e
    zp = z_ptr + e * sz_e
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # read only when GATED
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if GROUPED:
            a = tl.load(x_ptrs, mask=live[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=live[:, None] & ((k0 + offs_k) < H)[None, :], other=0.0)
        if GATED:
            wg = _dequant_rows(qw, sp, zp, g_rows, n_ok, k0, H, group, sq_n, ss_n, sz_n,
                               BLOCK_N, BLOCK_K, GROUPED, RNE_BF16)             # [BN, BK]
        wu = _dequant_rows(qw, sp, zp, u_rows, n_ok, k0, H, group, sq_n, ss_n, sz_n,
                           BLOCK_N, BLOCK_K, GROUPED, RNE_BF16)
        # DOT_F32: the interpreter's bf16 tl.dot is wrong: same values in fp32
        if GATED:
            acc_g = acc_dot(a, tl.trans(wg), acc_g, DOT_F32)
        acc_u = acc_dot(a, tl.trans(wu), acc_u, DOT_F32)
        x_ptrs += BLOCK_K
    gate_up_epilogue(acc_g, acc_u, act_ptr, delta_ptr, pair, live, offs_n, offs_n, n_pairs,
                     I, HAS_DELTA, CLAMPED=False, ACT=ACT, GATED=GATED,
                     RNE_BF16=RNE_BF16, bias_ptr=bias_ptr, e=e, sb_e=sb_e, sb_n=sb_n,
                     alpha=alpha, limit=limit, HAS_BIAS=HAS_BIAS)


@triton.jit
def moe_int4_down_kernel(act_ptr, qw_ptr, s_ptr, z_ptr, tw_ptr, out_ptr, delta_ptr,
                         sorted_ids_ptr, block_expert_ptr, n_pairs, top_k, H, I, group,
                         HAS_DELTA: tl.constexpr,
                         sq_e, sq_n, ss_e, ss_n, sz_e, sz_n, stw_t, stw_j,
                         bias_ptr, sb_e, sb_n,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUPED: tl.constexpr,
                         DOT_F32: tl.constexpr, RNE_BF16: tl.constexpr = False,
                         HAS_BIAS: tl.constexpr = False):
    """buf[p, n-block] = (act[p] @ W2[e]^T) * topk_weights[t, j] for the pairs p of tile
    pid_m: act [T*k, I] fp16 / bf16, qw [E, H, I/8] int32, s / z [E, H, I/group], buf fp32
    [T*k, H]; masked loads."""
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
    qw = qw_ptr + e * sq_e
    sp = s_ptr + e * ss_e
    zp = z_ptr + e * sz_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if GROUPED:
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=live[:, None] & ((k0 + offs_k) < I)[None, :], other=0.0)
        w = _dequant_rows(qw, sp, zp, rows, n_ok, k0, I, group, sq_n, ss_n, sz_n,
                          BLOCK_N, BLOCK_K, GROUPED, RNE_BF16)                  # [BN, BK]
        acc = acc_dot(a, tl.trans(w), acc, DOT_F32)
        a_ptrs += BLOCK_K
    down_epilogue(acc, tw_ptr, out_ptr, delta_ptr, pair64, live, offs_n, offs_n, top_k, H,
                  stw_t, stw_j, HAS_DELTA, CLAMPED=False, bias_ptr=bias_ptr, e=e,
                  sb_e=sb_e, sb_n=sb_n, HAS_BIAS=HAS_BIAS)


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels index every inner dim with stride 1: copy a tensor whose last dim is
    strided (a last dim of size 1 has no stride to honour)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def fused_moe_int4(x: torch.Tensor, w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                   w13_zeros: torch.Tensor, w2_qweight: torch.Tensor,
                   w2_scales: torch.Tensor, w2_zeros: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   group_size: int, lora: Sequence[torch.Tensor] | None = None,
                   activation: str = "silu", gated: bool = True,
                   w13_bias: torch.Tensor | None = None,
                   w2_bias: torch.Tensor | None = None, alpha: float = 1.702,
                   limit: float = 7.0) -> torch.Tensor:
    """See minikernels.ops.fused_moe_int4 (inputs checked there; any outer strides).
    lora: the six tensors of minikernels.ops.MoELoRA, or None; activation: the gate-up
    epilogue's ``ACT`` (silu / gelu / gelu_tanh / swigluoai; non-gated also relu2);
    gated: its ``GATED`` (False: w13 [E, I, H/8], the up rows only); w13_bias / w2_bias
    (x.dtype, or None): ``HAS_BIAS``; alpha / limit: swigluoai's."""
    t, h = x.shape
    num_experts = w13_qweight.shape[0]
    inter = w2_qweight.shape[2] * 8
    if t == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    x, w13_qweight, w2_qweight = (_unit_inner(v) for v in (x, w13_qweight, w2_qweight))
    w13_scales, w13_zeros, w2_scales, w2_zeros = (
        _unit_inner(v.to(x.dtype)) for v in (w13_scales, w13_zeros, w2_scales, w2_zeros))
    group_h = h if group_size == -1 else group_size
    group_i = inter if group_size == -1 else group_size
    plora = pair_lora(lora, topk_ids)
    cfg = moe_int4_config(t * topk_ids.shape[1], num_experts, group_h, group_i,
                          lora=plora is not None)
    run = moe_launch(x, topk_ids, num_experts, inter, cfg.block_m, plora, w13_bias, w2_bias,
                     alpha, limit)
    # bf16 under the interpreter: its tl.dot multiplies raw bits and its bf16 cast
    # truncates, so both are worked around (x is fp16 / bf16); never set on a GPU
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "GROUPED": cfg.grouped, "DOT_F32": run.interp_bf16, "RNE_BF16": run.interp_bf16,
              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    moe_int4_gate_up_kernel[run.grid(inter, cfg.block_n)](
        x, w13_qweight, w13_scales, w13_zeros, *run.gate_up_args(), group_h, run.has_delta,
        x.stride(0), w13_qweight.stride(0), w13_qweight.stride(1), w13_scales.stride(0),
        w13_scales.stride(1), w13_zeros.stride(0), w13_zeros.stride(1), ACT=activation,
        GATED=gated, **run.gate_up_bias(), **consts)
    moe_int4_down_kernel[run.grid(h, cfg.block_n)](
        run.act, w2_qweight, w2_scales, w2_zeros, *run.down_args(topk_weights), group_i,
        run.has_delta, w2_qweight.stride(0), w2_qweight.stride(1), w2_scales.stride(0),
        w2_scales.stride(1), w2_zeros.stride(0), w2_zeros.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), **run.down_bias(), **consts)
    return run.result()


# --------------------------------------------------------------------------- registry
# Every dispatched combination: fp16 / bf16 x BLOCK_M 16 / 32 / 64 (moe_config's choices)
# x GROUPED (one scale per row and K tile, no K mask) or not (per-element scales, K
# masked); gate-up once per (ACT, GATED) of moe.py's ``gate_up_variants``. Inner strides
# are 1 (the launcher guarantees it; not kernel arguments).

_INTS = {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32", "group": "i32",
         "HAS_DELTA": "constexpr"}
_STRIDES = {n: "i64" for n in ("sq_e", "sq_n", "ss_e", "ss_n", "sz_e", "sz_n")}
for _dt in ("fp16", "bf16"):
    for _grouped in (True, False):
        for _avg in (8, 32, 256):          # one spec per BLOCK_M that moe_config picks
            _cfg = moe_int4_config(_avg * 64, 64, 128 if _grouped else 40,
                                   128 if _grouped else 40)
            assert _cfg.grouped == _grouped
            _tag = f"{_dt},BM={_cfg.block_m}" + ("" if _grouped else ",ungrouped")
            _const = {"BLOCK_M": _cfg.block_m, "BLOCK_N": _cfg.block_n,
                      "BLOCK_K": _cfg.block_k, "GROUPED": _grouped, "DOT_F32": False,
                      "RNE_BF16": False}
            _sig_act = {"ACT": "constexpr", "GATED": "constexpr"}   # gate-up's only
            _w = {"qw_ptr": "*i32", "s_ptr": f"*{_dt}", "z_ptr": f"*{_dt}"}
            _sig = {"x_ptr": f"*{_dt}", **_w, "act_ptr": f"*{_dt}",
                    "delta_ptr": f"*{_dt}", "sorted_ids_ptr": "*i32",
                    "block_expert_ptr": "*i32", **_INTS,
                    "sx_t": "i64", **_STRIDES, **_bias_sig(_dt, gate_up=True),
                    **{c: "constexpr" for c in _const}, **_sig_act}
            _sig_down = {"act_ptr": f"*{_dt}", **_w, "tw_ptr": "*fp32", "out_ptr": "*fp32",
                         "delta_ptr": f"*{_dt}", "sorted_ids_ptr": "*i32",
                         "block_expert_ptr": "*i32", **_INTS,
                         **_STRIDES, "stw_t": "i64", "stw_j": "i64",
                         **_bias_sig(_dt, gate_up=False), **{c: "constexpr" for c in _const}}
            for _lora in (False, True) if _grouped else (False,):   # + LoRA (HAS_DELTA)
                _ltag = _tag + (",lora" if _lora else "")
                _lcfg = moe_int4_config(_avg * 64, 64, 128, 128, lora=True) if _lora else _cfg
                _opts = {"num_warps": _lcfg.num_warps, "num_stages": _lcfg.num_stages,
                         "tensor_core": True, "wgmma_expected": _cfg.block_m >= 64}
                # + expert biases (HAS_BIAS: GPT-OSS's swigluoai experts), grouped tiles
                _biased = bias_variants(_dt) if _grouped and not _lora else ()
                for _act, _gated, _bias in (*((a, g, False) for a, g in
                                              gate_up_variants(_dt, _cfg.block_m)), *_biased):
                    register(KernelSpec(
                        name=f"moe_int4_gate_up[{_ltag}{_act_tag(_act, _gated)}"
                        + (",bias]" if _bias else "]"),
                        fn=moe_int4_gate_up_kernel,
                        signature=_in_order(moe_int4_gate_up_kernel, _sig),
                        constexprs={**_const, "HAS_DELTA": _lora, "ACT": _act, "GATED": _gated,
                                    "HAS_BIAS": _bias},
                        **_opts))
                for _bias in (False, True) if _biased else (False,):
                    register(KernelSpec(name=f"moe_int4_down[{_ltag}"
                                        + (",bias]" if _bias else "]"), fn=moe_int4_down_kernel,
                                        signature=_in_order(moe_int4_down_kernel, _sig_down),
                                        constexprs={**_const, "HAS_DELTA": _lora,
                                                    "HAS_BIAS": _bias}, **_opts))
