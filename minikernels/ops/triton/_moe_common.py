"""The pieces every fused-MoE kernel pair shares (moe.py's dense experts, moe_int4.py,
moe_fp8.py, moe_int8.py): which expert and which (token, slot) pairs a program's tile
holds, and the gate-up and down epilogues that run after the K loop.

Layouts (see moe.py): tile b of the expert-sorted pairs is ``sorted_ids[b * BM:(b + 1) *
BM]`` (int32 pair ids p = t * k + j, padding rows hold the sentinel n_pairs = T*k) with
expert ``block_expert[b]`` (int32, -1 past the last real tile); the gate-up kernel writes
act [T*k, I] in x.dtype, the down kernel an fp32 buffer [T*k, H], row p each; the LoRA
deltas are d13 [T*k, 2I] (non-gated experts: [T*k, I]) and d2 [T*k, H] in x.dtype.

Two ways to keep a tile's loads in bounds, picked by the constexpr ``CLAMPED``:
  masked   (dense, int4): padding rows and columns past the edge are masked, other = 0;
  clamped  (fp8, int8): rows and columns are clamped into the matrix (``pair_l`` =
           min(p, n_pairs - 1), ``cols_l`` = n % N) so the loads need no mask; only the
           store is masked.
Expert biases (GPT-OSS's; the constexpr ``HAS_BIAS`` of each kernel, off: the code as
without them): the gate-up epilogue adds the tile's expert's w13 bias row (gate columns
n, up columns I + n; [E, 2I] with strides sb_e / sb_n, x.dtype) to the fp32
accumulators, the down epilogue its w2 bias row ([E, H]) before the router weight.
``ACT`` "swigluoai" (GPT-OSS's clamped SwiGLU: (clamp(u, -limit, limit) + 1) * g'
* sigmoid(alpha * g'), g' = min(g, limit)) reads the runtime fp32 scalars alpha / limit.
Every helper here is inlined into its kernel; the constexprs keep each specialisation's
code what it was when the kernels spelled these parts out (the masks are computed where
the kernels computed them: moving one changes ptxas's register allocation).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activation import gate_activation
from .interpreter_rounding import rne_bf16


@triton.jit
def tile_expert(block_expert_ptr):
    """(pid_m, pid_n, e): this program's tile of pairs, its block of output columns, and
    the tile's expert as int64; e < 0 past the last real tile (the grid is a static upper
    bound: the kernel returns at once)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    return pid_m, pid_n, tl.load(block_expert_ptr + pid_m).to(tl.int64)


@triton.jit
def tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M: tl.constexpr):
    """(pair, live) of tile pid_m: its BLOCK_M pair ids (int32 [BM]) and which are real
    (padding rows hold the sentinel n_pairs)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    return pair, pair < n_pairs


@triton.jit
def up_rows(n, I, GATED: tl.constexpr):
    """The up rows of an expert's w13 for output columns n (its gate rows are n): I + n
    when GATED (w13 [E, 2I, K]: gate rows, then up rows); n for non-gated experts (w13
    [E, I, K] holds the up rows only)."""
    if GATED:
        return I + n
    else:
        return n


@triton.jit
def _bias_row(bias_ptr, e, sb_e, sb_n, rows, ok, CLAMPED: tl.constexpr):
    """fp32 [BN]: expert e's bias at ``rows`` (int64 [BN]) of a [E, N] bias (strides
    sb_e / sb_n); CLAMPED: rows already in range, else masked to ``ok`` (0 elsewhere)."""
    ptrs = bias_ptr + e * sb_e + rows * sb_n
    if CLAMPED:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def swigluoai(gate, up, alpha, limit):
    """GPT-OSS's clamped SwiGLU of fp32 tensors: g = min(gate, limit), u = clamp(up,
    -limit, limit), (u + 1) * g * sigmoid(alpha * g) (g / (1 + e^(-alpha g)): 0 where
    the exponential overflows)."""
    g = tl.minimum(gate, limit)
    u = tl.minimum(tl.maximum(up, -limit), limit)
    return (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))


@triton.jit
def gate_up_epilogue(acc_g, acc_u, act_ptr, delta_ptr, pair, live, offs_n, cols_l, n_pairs,
                     I, HAS_DELTA: tl.constexpr, CLAMPED: tl.constexpr, ACT: tl.constexpr,
                     GATED: tl.constexpr, RNE_BF16: tl.constexpr, bias_ptr, e, sb_e, sb_n,
                     alpha, limit, HAS_BIAS: tl.constexpr):
    """Finish a gate-up tile: acc_g / acc_u fp32 [BM, BN] (columns offs_n of I; acc_g is
    not read unless GATED) -> + expert e's bias row (HAS_BIAS: w13_bias[e] gate columns n,
    up columns I + n; clamped columns cols_l when CLAMPED, masked at offs_n otherwise)
    -> + the LoRA delta rows (HAS_DELTA: d13's gate / up halves, or its one up row when
    not GATED; read at clamped columns cols_l when CLAMPED, masked at offs_n otherwise) ->
    act(gate) * up (GATED) or act(up), ACT one of activation.py's ``gate_activation``, or
    ``swigluoai(gate, up, alpha, limit)`` (GATED) -> one rounding to act's dtype
    (RNE_BF16: interpreter only) -> store to act[pair, offs_n], masked to live rows and
    columns < I."""
    if HAS_BIAS:
        b_cols = (cols_l if CLAMPED else offs_n).to(tl.int64)
        b_ok = offs_n < I
        if GATED:
            acc_g += _bias_row(bias_ptr, e, sb_e, sb_n, b_cols, b_ok, CLAMPED)[None, :]
        acc_u += _bias_row(bias_ptr, e, sb_e, sb_n, up_rows(b_cols, I, GATED), b_ok,
                           CLAMPED)[None, :]
    if HAS_DELTA:
        if CLAMPED:
            rows = tl.minimum(pair, n_pairs - 1).to(tl.int64)[:, None]   # as the loads
            cols = cols_l[None, :]
        else:
            rows = pair[:, None].to(tl.int64)
            cols = offs_n[None, :]
        if GATED:   # d13 [T*k, 2I]: gate columns n, up columns I + n
            d_ptrs = delta_ptr + rows * (2 * I) + cols
            if CLAMPED:
                acc_g += tl.load(d_ptrs).to(tl.float32)
                acc_u += tl.load(d_ptrs + I).to(tl.float32)
            else:
                d_ok = live[:, None] & (offs_n < I)[None, :]
                acc_g += tl.load(d_ptrs, mask=d_ok, other=0.0).to(tl.float32)
                acc_u += tl.load(d_ptrs + I, mask=d_ok, other=0.0).to(tl.float32)
        else:       # non-gated: the up update, a [T*k, I] row
            d_ptrs = delta_ptr + rows * I + cols
            if CLAMPED:
                acc_u += tl.load(d_ptrs).to(tl.float32)
            else:
                acc_u += tl.load(d_ptrs, mask=live[:, None] & (offs_n < I)[None, :],
                                 other=0.0).to(tl.float32)
    if GATED:
        if ACT == "swigluoai":                       # GPT-OSS: clamped, up + 1
            act = swigluoai(acc_g, acc_u, alpha, limit)
        else:
            act = gate_activation(acc_g, ACT) * acc_u    # act(gate) * up in fp32
    else:
        act = gate_activation(acc_u, ACT)            # act(up) in fp32
    if RNE_BF16:  # interpreter only: its fp32 -> bf16 cast truncates; the GPU rounds
        act = rne_bf16(act)
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * I + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty),
             mask=live[:, None] & (offs_n < I)[None, :])


@triton.jit
def down_epilogue(acc, tw_ptr, out_ptr, delta_ptr, rows, live, offs_n, cols_l, top_k, H,
                  stw_t, stw_j, HAS_DELTA: tl.constexpr, CLAMPED: tl.constexpr, bias_ptr,
                  e, sb_e, sb_n, HAS_BIAS: tl.constexpr):
    """Finish a down tile: acc fp32 [BM, BN] (columns offs_n of H; rows: the tile's pair
    ids as int64, clamped to n_pairs - 1 when CLAMPED) -> + expert e's w2 bias row
    (HAS_BIAS; at clamped columns cols_l when CLAMPED, masked at offs_n otherwise) -> +
    the LoRA d2 rows (HAS_DELTA; the same columns) -> times the router weight
    topk_weights[t, j] of pair p = t * k + j (fp32, before the k-sum) -> store to the
    fp32 buffer [T*k, H], masked to live rows and columns < H."""
    if HAS_BIAS:
        acc += _bias_row(bias_ptr, e, sb_e, sb_n, (cols_l if CLAMPED else offs_n).to(tl.int64),
                         offs_n < H, CLAMPED)[None, :]
    if HAS_DELTA:   # LoRA: the pair's down update, a [T*k, H] row in x.dtype
        if CLAMPED:
            acc += tl.load(delta_ptr + rows[:, None] * H + cols_l[None, :]).to(tl.float32)
        else:
            acc += tl.load(delta_ptr + rows[:, None] * H + offs_n[None, :],
                           mask=live[:, None] & (offs_n < H)[None, :], other=0.0).to(tl.float32)
    # the router weight of (token, slot), fp32, applied before the k-sum
    tok = rows // top_k
    slot = rows - tok * top_k
    if CLAMPED:
        wt = tl.load(tw_ptr + tok * stw_t + slot * stw_j)
    else:
        wt = tl.load(tw_ptr + tok * stw_t + slot * stw_j, mask=live, other=0.0)
    acc = acc * wt[:, None]
    tl.store(out_ptr + rows[:, None] * H + offs_n[None, :], acc,
             mask=live[:, None] & (offs_n < H)[None, :])
