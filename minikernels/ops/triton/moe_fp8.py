"""Mixture-of-experts MLP with FP8 (e4m3) experts and block-wise scales (W8A16) in Triton:
``fused_moe`` of ops/triton/moe.py with fp8_matmul.py's weight tiles in the K loop.

Weights: w13 [E, 2I, H] and w2 [E, H, I] as float8_e4m3fn bytes (read as uint8), scales
fp32 [E, ceil(N / bn), ceil(K / bk)]: W_e[n, k] = weight[e, n, k] * scale[e, n // bn, k // bk].

Algorithm: the three steps of ops/triton/moe.py (its ``sort_pairs_by_expert`` puts the T*k
(token, slot) pairs into expert-sorted BLOCK_M tiles with moe_align's kernels, no sync).
  1. ``moe_fp8_gate_up_kernel``: program (b, n) gathers the x rows of tile b's pairs and,
     per K tile, loads expert e's gate and up bytes as [BN, BK], turns them into W / 256
     exactly (fp8_bits.py's ``e4m3_bytes_as_fp16``, no fp8 hardware: sm_80 and the interpreter
     run it), and adds dot(x, (W / 256)^T) * 256 * scale[n // bn, k0 // bk] to an fp32
     accumulator: the dequantized weight is never rounded to x.dtype. act(gate) * up
     (the constexpr ``ACT``: silu / gelu / gelu_tanh, as moe.py), rounded to x.dtype,
     goes to act [T*k, I]. ``GATED`` False (non-gated experts, as moe.py): only the up
     bytes (w13 [E, I, H], scales [E, ceil(I / bn), ...]), act(up) stored.
  2. ``moe_fp8_down_kernel``: act @ W2[e]^T the same way, times topk_weights[t, j] in fp32,
     into an fp32 buffer [T*k, H].
  3. out = buffer.view(T, k, H).sum(1), rounded once to x.dtype.
A K tile never straddles two scale blocks: BLOCK_K divides bk (bk % 16 == 0), or one block
spans the matrix's K (per channel). Rows past the edge are clamped for the loads (gate row
n % I, up row I + n % I, token of a padding pair = the last one) and masked at the store.
LoRA on the experts (optional): moe.py's ``pair_lora`` / ``gate_up_delta`` /
``down_delta``; step 1 adds the pair's d13 row to its gate / up accumulators before the
epilogue, step 2 its d2 row before the router weight (clamped loads as above), behind the
constexpr ``HAS_DELTA``. Tile setup and epilogues: ops/triton/_moe_common.py (clamped
loads, ``CLAMPED``); K tiles: tiling.py's ``load_k_tile``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._moe_common import down_epilogue, gate_up_epilogue, tile_expert, tile_pairs, up_rows
from .fp8_bits import e4m3_bytes_as_fp16
from .fp8_matmul import block_k_for
from .moe import MoeW8A16Config, fused_moe_w8a16, moe_w8a16_config, register_w8a16_moe
from .tiling import acc_dot, load_k_tile

MoeFp8Config = MoeW8A16Config


def moe_fp8_config(n_pairs: int, num_experts: int, dtype: torch.dtype, k_dim: int, bk: int,
                   aligned: bool, gate_up: bool) -> MoeFp8Config:
    """One kernel's tiles (K = H for gate-up, I for down; bk already clamped to K):
    moe.py's ``moe_w8a16_config`` (the gate-up tile at BLOCK_M 64 also holds two per-tile
    partials), whose widest BLOCK_K is first cut to the largest power of two <= it
    dividing bk (``block_k_for``: a tile never straddles two scale blocks). Smaller scale
    blocks give a smaller BLOCK_K than the registered one: fewer registers."""
    return moe_w8a16_config(n_pairs, num_experts, dtype, k_dim, aligned, gate_up,
                            fit_block_k=lambda want: block_k_for(want, bk, k_dim)[0])


@triton.jit
def moe_fp8_gate_up_kernel(x_ptr, w_ptr, s_ptr, act_ptr, delta_ptr, sorted_ids_ptr,
                           block_expert_ptr, n_pairs, top_k, H, I, block_n, block_k,
                           HAS_DELTA: tl.constexpr,
                           sx_t, sx_h, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k,
                           bias_ptr, sb_e, sb_n, alpha, limit,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                           ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                           RNE_BF16: tl.constexpr = False, ACT: tl.constexpr = "silu",
                           GATED: tl.constexpr = True, HAS_BIAS: tl.constexpr = False):
    """act[p, n-block] = act(gate) * up for the pairs p of tile pid_m: x [T, H] in x.dtype,
    w [E, 2I, H] e4m3 bytes (non-gated: [E, I, H], act(up) stored), s fp32 [E, ceil(2I /
    block_n), ceil(H / block_k)]; per K tile dot(x, (W / 256)^T) * 256 * scale in fp32.
    Loads clamped (rows n % I, the last pair), the store masked."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:               # past the last real tile (the grid is a static upper bound)
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    tok = (tl.minimum(pair, n_pairs - 1) // top_k).to(tl.int64)   # clamped: loads unmasked
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % I                                 # columns clamped for the loads
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_h               # [BM, BK]
    w_base = w_ptr + e * sw_e + offs_k[None, :].to(tl.int64) * sw_k
    # gate rows n (read only when GATED), up rows I + n (non-gated: n), as [BN, BK] tiles
    g_ptrs = w_base + n_l[:, None].to(tl.int64) * sw_n
    u_ptrs = w_base + up_rows(n_l, I, GATED)[:, None].to(tl.int64) * sw_n
    s_base = s_ptr + e * ss_e                        # the rows' scale blocks, [BN]
    sg_ptrs = s_base + (n_l // block_n).to(tl.int64) * ss_n
    su_ptrs = s_base + (up_rows(n_l, I, GATED) // block_n).to(tl.int64) * ss_n
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # read only when GATED
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if ALIGNED:  # 16-byte aligned rows, unit inner strides (the launcher checked)
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            if GATED:
                g_ptrs = tl.multiple_of(g_ptrs, [1, 16])
            u_ptrs = tl.multiple_of(u_ptrs, [1, 16])
        a = load_k_tile(x_ptrs, k0, offs_k, H, EVEN_K, 0.0)       # H % BK == 0: no mask
        if GATED:
            wg = load_k_tile(g_ptrs, k0, offs_k, H, EVEN_K, 0)
        wu = load_k_tile(u_ptrs, k0, offs_k, H, EVEN_K, 0)
        if GATED:
            wg = e4m3_bytes_as_fp16(wg).to(a.dtype)                         # W / 256, exact
        wu = e4m3_bytes_as_fp16(wu).to(a.dtype)
        kb = (k0 // block_k) * ss_k          # the tile's scale block (never straddled)
        if GATED:
            sg = tl.load(sg_ptrs + kb) * 256.0
        su = tl.load(su_ptrs + kb) * 256.0
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_g += acc_dot(a, tl.trans(wg), zero, DOT_F32) * sg[None, :]
        acc_u += acc_dot(a, tl.trans(wu), zero, DOT_F32) * su[None, :]
        x_ptrs += BLOCK_K * sx_h
        if GATED:
            g_ptrs += BLOCK_K * sw_k
        u_ptrs += BLOCK_K * sw_k
    gate_up_epilogue(acc_g, acc_u, act_ptr, delta_ptr, pair, live, offs_n, n_l, n_pairs, I,
                     HAS_DELTA, CLAMPED=True, ACT=ACT, GATED=GATED,
                     RNE_BF16=RNE_BF16, bias_ptr=bias_ptr, e=e, sb_e=sb_e, sb_n=sb_n,
                     alpha=alpha, limit=limit, HAS_BIAS=HAS_BIAS)


@triton.jit
def moe_fp8_down_kernel(act_ptr, w_ptr, s_ptr, tw_ptr, out_ptr, delta_ptr, sorted_ids_ptr,
                        block_expert_ptr, n_pairs, top_k, H, I, block_n, block_k,
                        HAS_DELTA: tl.constexpr,
                        sw_e, sw_n, sw_k, ss_e, ss_n, ss_k, stw_t, stw_j,
                        bias_ptr, sb_e, sb_n,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
                        HAS_BIAS: tl.constexpr = False):
    """buf[p, n-block] = (act[p] @ W2[e]^T) * topk_weights[t, j] for the pairs p of tile
    pid_m: act [T*k, I] in x.dtype, w [E, H, I] e4m3 bytes, s fp32 [E, ceil(H / block_n),
    ceil(I / block_k)], buf fp32 [T*k, H]. Loads clamped, the store masked."""
    pid_m, pid_n, e = tile_expert(block_expert_ptr)
    if e < 0:
        return
    pair, live = tile_pairs(sorted_ids_ptr, pid_m, n_pairs, BLOCK_M)
    pair_l = tl.minimum(pair, n_pairs - 1).to(tl.int64)       # clamped for the loads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_l = offs_n % H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair_l[:, None] * I + offs_k[None, :]                    # [BM, BK]
    w_ptrs = (w_ptr + e * sw_e + n_l[:, None].to(tl.int64) * sw_n
              + offs_k[None, :].to(tl.int64) * sw_k)                            # [BN, BK]
    s_ptrs = s_ptr + e * ss_e + (n_l // block_n).to(tl.int64) * ss_n            # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if ALIGNED:
            a_ptrs = tl.multiple_of(a_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [1, 16])
        a = load_k_tile(a_ptrs, k0, offs_k, I, EVEN_K, 0.0)       # I % BK == 0: no mask
        wb = load_k_tile(w_ptrs, k0, offs_k, I, EVEN_K, 0)
        w = e4m3_bytes_as_fp16(wb).to(a.dtype)                              # W / 256, exact
        s = tl.load(s_ptrs + (k0 // block_k) * ss_k) * 256.0
        acc += acc_dot(a, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                       DOT_F32) * s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sw_k
    down_epilogue(acc, tw_ptr, out_ptr, delta_ptr, pair_l, live, offs_n, n_l, top_k, H,
                  stw_t, stw_j, HAS_DELTA, CLAMPED=True, bias_ptr=bias_ptr, e=e,
                  sb_e=sb_e, sb_n=sb_n, HAS_BIAS=HAS_BIAS)


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                  w2: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, block_size: list[int],
                  lora: Sequence[torch.Tensor] | None = None,
                  activation: str = "silu", gated: bool = True,
                  w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                  alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """See minikernels.ops.fused_moe_fp8 (inputs checked there; any strides). w13 / w2 are
    the fp8 weights' bytes (uint8) or the float8_e4m3fn tensors themselves. lora: the six
    tensors of minikernels.ops.MoELoRA, or None; activation: the gate-up epilogue's
    ``ACT`` (silu / gelu / gelu_tanh / swigluoai; non-gated also relu2); gated: its
    ``GATED`` (False: w13 [E, I, H], the up rows only); w13_bias / w2_bias (x.dtype,
    or None): ``HAS_BIAS``, added after the block scales; alpha / limit: swigluoai's."""
    t, h = x.shape
    if t == 0:
        return _alloc.empty((t, h), x.dtype, x.device)
    n13, inter = w13.shape[1], w2.shape[2]          # n13: 2I gated, I non-gated
    w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)     # the bits; converted in-kernel
    # a block past the matrix edge partitions like one of the matrix's size (fits in i32)
    bn, bk = int(block_size[0]), int(block_size[1])
    bn13, bk13, bn2, bk2 = min(bn, n13), min(bk, h), min(bn, h), min(bk, inter)
    n_pairs, num_experts = t * topk_ids.shape[1], w13.shape[0]

    def config(k_dim: int, aligned: bool, gate_up: bool) -> MoeFp8Config:
        return moe_fp8_config(n_pairs, num_experts, x.dtype, k_dim,
                              bk13 if gate_up else bk2, aligned, gate_up)

    return fused_moe_w8a16(moe_fp8_gate_up_kernel, moe_fp8_down_kernel, x, w13, w13_scale,
                           w2, w2_scale, topk_weights, topk_ids, lora, config,
                           args13=(bn13, bk13), args2=(bn2, bk2), activation=activation,
                           gated=gated, w13_bias=w13_bias, w2_bias=w2_bias, alpha=alpha,
                           limit=limit)


# --------------------------------------------------------------------------- registry
# moe.py's ``register_w8a16_moe`` at 128 x 128 scale blocks: every dispatched (dtype,
# BLOCK_M, row kind) at its widest BLOCK_K, gate-up and down, + LoRA twins of the aligned
# fp16 / bf16 specs. Smaller scale blocks (bk 16 / 32 / 48 ...) or a K that the widest
# tile does not divide give a smaller BLOCK_K of the same kind: fewer registers.

register_w8a16_moe(
    "moe_fp8", moe_fp8_gate_up_kernel, moe_fp8_down_kernel, "*u8",
    {"n_pairs": "i32", "top_k": "i32", "H": "i32", "I": "i32", "block_n": "i32",
     "block_k": "i32"}, ("ss_e", "ss_n", "ss_k"),
    lambda n_pairs, dtype, k_dim, aligned, gate_up: moe_fp8_config(
        n_pairs, 64, dtype, k_dim, 128, aligned, gate_up))
