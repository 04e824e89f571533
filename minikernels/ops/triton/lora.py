"""LoRA update of mixed-adapter batches in Triton: punica's BGMV for few tokens, a
segmented grouped GEMM (SGMV) for many.

BGMV (one token at a time, decode-sized batches). Two launches over (token, block of
outputs). Shrink: h[t] = A[s] @ x[t] for the token's slot s, the rank-R vector
accumulated in fp32 over K blocks and kept in an fp32 scratch [T, R] (never rounded).
Expand: y[t, n-block] = scaling[s] * B[s][n-block] @ h[t], fp32 accumulation over R
blocks, rounded once on store. A token with slot -1 loads its adapter through slot 0 with
every load masked off and stores zeros, so no branch depends on a loaded value. Each
token's adapter weights stream from memory once per output block: memory bound by design.

SGMV (T >= GROUPED_MIN_TOKENS: prefill and large decode batches). The tokens are sorted
by slot on the device with the fused MoE's expert sort (slot -1 becomes the group S), each
slot's run padded to a multiple of BLOCK_M, so a tile of BLOCK_M tokens shares one
adapter and its A / B blocks are read once per tile instead of once per token:
  1. ``lora_shrink_grouped_kernel``: program (tile, r-block) gathers the tile's x rows and
     computes h = x @ A[s][r-block].T with tl.dot (tensor cores for fp16 / bf16), fp32
     accumulation, into the fp32 scratch h [T, R] at each token's row.
  2. ``lora_expand_grouped_kernel``: program (tile, n-block) computes
     scaling[s] * h @ B[s][n-block].T as an fp32 "ieee" dot (h stays unrounded) and
     stores it rounded to x.dtype; a tile of the no-adapter group stores zeros.
Every token lives in exactly one tile, so every output row is written once.
Under the CPU interpreter bf16 outputs are rounded to nearest even before the store
(``RNE_BF16``; its cast truncates, the GPU's rounds).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter_rounding import rne_bf16
from .moe import sort_pairs_by_expert
from .registry import KernelSpec, register

BLOCK_R = 16
BLOCK_K = 128
BLOCK_N = 64
# the grouped (SGMV) path from this many tokens on: below it, a decode batch's few tokens
# per adapter leave its tiles mostly padding and the sort's launches cost more than BGMV's
# per-token reads of the adapter
GROUPED_MIN_TOKENS = 32
GROUPED_BLOCK_R = 16      # tl.dot's smallest N; a rank above it loops / adds programs
GROUPED_BLOCK_K = 64
GROUPED_BLOCK_N = 64


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, K, R, x_rep,
                       sx_t, sx_k, sa_s, sa_r, sa_k,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    s = tl.maximum(slot, 0)
    k_live = tl.where(slot >= 0, K, 0)      # no adapter: every load masked off
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_live
        xv = tl.load(x_ptr + (t // x_rep) * sx_t + ks * sx_k, mask=kmask,
                     other=0.0).to(tl.float32)
        av = tl.load(a_ptr + s * sa_s + rs[:, None] * sa_r + ks[None, :] * sa_k,
                     mask=(rs[:, None] < R) & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(h_ptr + t * R + rs, acc, mask=rs < R)


@triton.jit
def lora_expand_kernel(h_ptr, b_ptr, slots_ptr, scaling_ptr, y_ptr, N, R,
                       sb_s, sb_n, sb_r, sy_t,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       RNE_BF16: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    s = tl.maximum(slot, 0)
    r_live = tl.where(slot >= 0, R, 0)      # no adapter: every load masked off, y = 0
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rmask = rs < r_live
        hv = tl.load(h_ptr + t * R + rs, mask=rmask, other=0.0)
        bv = tl.load(b_ptr + s * sb_s + ns[:, None] * sb_n + rs[None, :] * sb_r,
                     mask=(ns[:, None] < N) & rmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bv * hv[None, :], axis=1)
    acc = acc * tl.load(scaling_ptr + s)
    if RNE_BF16:  # interpreter only: its fp32 -> bf16 cast truncates (see rne_bf16)
        acc = rne_bf16(acc)
    tl.store(y_ptr + t * sy_t + ns, acc.to(y_ptr.dtype.element_ty), mask=ns < N)


@triton.jit
def lora_shrink_grouped_kernel(x_ptr, a_ptr, sorted_ids_ptr, block_slot_ptr, h_ptr,
                               T, K, R, S, x_rep, sx_t, sx_k, sa_s, sa_r, sa_k,
                               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    s = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if (s < 0) | (s >= S):     # past the last tile, or the no-adapter group: no h needed
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(sorted_ids_ptr + offs_m)
    live = tok < T                                  # padding rows hold the sentinel T
    tok64 = tok.to(tl.int64)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rs < R
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (tok64 // x_rep)[:, None] * sx_t + ks[None, :] * sx_k   # [BM, BK]
    a_ptrs = a_ptr + s * sa_s + rs[None, :] * sa_r + ks[:, None] * sa_k      # [BK, BR]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        xv = tl.load(x_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
        av = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_F32:   # fp32 inputs; and the interpreter's bf16 tl.dot (wrong there)
            acc = tl.dot(xv.to(tl.float32), av.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, av, acc)
        x_ptrs += BLOCK_K * sx_k
        a_ptrs += BLOCK_K * sa_k
    tl.store(h_ptr + tok64[:, None] * R + rs[None, :], acc,
             mask=live[:, None] & r_ok[None, :])


@triton.jit
def lora_expand_grouped_kernel(h_ptr, b_ptr, sorted_ids_ptr, block_slot_ptr, scaling_ptr,
                               y_ptr, T, N, R, S, sb_s, sb_n, sb_r, sy_t,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_R: tl.constexpr, RNE_BF16: tl.constexpr = False):
    pid_m = tl.program_id(0)
    s = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if s < 0:                                       # past the last real tile
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(sorted_ids_ptr + offs_m)
    live = tok < T
    tok64 = tok.to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if s < S:                                       # the group S (slot -1) stores zeros
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < R
            hv = tl.load(h_ptr + tok64[:, None] * R + rs[None, :],
                         mask=live[:, None] & r_ok[None, :], other=0.0)          # [BM, BR]
            bv = tl.load(b_ptr + s * sb_s + ns[None, :] * sb_n + rs[:, None] * sb_r,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)         # [BR, BN]
            # fp32 FMAs: h is never rounded, and R is small next to N
            acc = tl.dot(hv, bv.to(tl.float32), acc, input_precision="ieee")
        acc = acc * tl.load(scaling_ptr + s)
    if RNE_BF16:  # interpreter only: its fp32 -> bf16 cast truncates (see rne_bf16)
        acc = rne_bf16(acc)
    tl.store(y_ptr + tok64[:, None] * sy_t + ns[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=live[:, None] & n_ok[None, :])


def grouped_block_m(t: int, num_slots: int) -> int:
    """BLOCK_M of the grouped path from the average tokens per slot (known on the host
    without a sync; -1 counts as a slot): 16 / 32 for decode-sized groups, 64 for prefill
    (wgmma on sm_90a)."""
    avg = t / (num_slots + 1)
    return 16 if avg <= 16 else 32 if avg <= 48 else 64


def grouped_num_warps(block_m: int) -> int:
    """8 warps for 64-token tiles (4 spill on sm_90a: the fp32 FMA dots' operand tiles)."""
    return 8 if block_m >= 64 else 4


def _interp_bf16(x: torch.Tensor) -> bool:
    """bf16 under the interpreter (CPU tensors): round before the store (never on a GPU)."""
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               token_slots: torch.Tensor, scaling: torch.Tensor,
               grouped: bool | None = None, x_rep: int = 1) -> torch.Tensor:
    """See minikernels.ops.lora_delta (inputs checked there; any strides). ``grouped``:
    force the SGMV (True) or BGMV (False) path; None picks by the token count. ``x_rep``:
    each x row serves x_rep consecutive output rows (row i reads x[i // x_rep]; T =
    x.shape[0] * x_rep = len(token_slots)): the (token, expert) pairs of a MoE layer read
    their token's row without a gathered copy."""
    t = token_slots.shape[0]
    k = x.shape[1]
    _, r, _ = lora_a.shape
    n = lora_b.shape[1]
    y = _alloc.empty((t, n), x.dtype, x.device)
    if t == 0 or n == 0:
        return y
    if r == 0 or k == 0:
        return y.zero_()
    if grouped is None:
        grouped = t >= GROUPED_MIN_TOKENS
    if grouped:
        _grouped(x, lora_a, lora_b, token_slots, scaling, y, x_rep)
        return y
    slots = token_slots.contiguous()
    h = torch.empty(t, r, dtype=torch.float32, device=x.device)
    lora_shrink_kernel[(t, triton.cdiv(r, BLOCK_R))](
        x, lora_a, slots, h, k, r, x_rep, x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4)
    lora_expand_kernel[(t, triton.cdiv(n, BLOCK_N))](
        h, lora_b, slots, scaling.contiguous(), y, n, r,
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, RNE_BF16=_interp_bf16(x), num_warps=4)
    return y


def _grouped(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             token_slots: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor,
             x_rep: int = 1) -> None:
    """The SGMV path into y [T, N] (contiguous)."""
    t = token_slots.shape[0]
    k = x.shape[1]
    num_slots, r, _ = lora_a.shape
    n = lora_b.shape[1]
    block_m = grouped_block_m(t, num_slots)
    # slot -1 -> group S; the expert sort (no host sync) groups tokens by slot
    groups = torch.where(token_slots < 0, num_slots, token_slots).view(t, 1)
    sorted_ids, block_slot = sort_pairs_by_expert(groups, num_slots + 1, block_m)
    tiles = block_slot.shape[0]
    # fp32 inputs: exact fp32 products. bf16 under the interpreter (CPU tensors): its
    # tl.dot multiplies raw bits, so the tile goes through fp32 there
    dot_f32 = x.dtype == torch.float32 or (x.device.type != "cuda"
                                           and x.dtype == torch.bfloat16)
    h = torch.empty(t, r, dtype=torch.float32, device=x.device)
    lora_shrink_grouped_kernel[(tiles, triton.cdiv(r, GROUPED_BLOCK_R))](
        x, lora_a, sorted_ids, block_slot, h, t, k, r, num_slots, x_rep,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        BLOCK_M=block_m, BLOCK_R=GROUPED_BLOCK_R, BLOCK_K=GROUPED_BLOCK_K,
        DOT_F32=dot_f32, num_warps=grouped_num_warps(block_m), num_stages=3)
    lora_expand_grouped_kernel[(tiles, triton.cdiv(n, GROUPED_BLOCK_N))](
        h, lora_b, sorted_ids, block_slot, scaling.contiguous(), y, t, n, r, num_slots,
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=GROUPED_BLOCK_N, BLOCK_R=GROUPED_BLOCK_R,
        RNE_BF16=_interp_bf16(x), num_warps=grouped_num_warps(block_m), num_stages=2)


for _dt in ("fp32", "fp16", "bf16"):
    for _ix in ("i32", "i64"):
        register(KernelSpec(
            name=f"lora_shrink[{_dt},slots={_ix}]", fn=lora_shrink_kernel,
            signature={"x_ptr": f"*{_dt}", "a_ptr": f"*{_dt}", "slots_ptr": f"*{_ix}",
                       "h_ptr": "*fp32", "K": "i32", "R": "i32", "x_rep": "i32",
                       "sx_t": "i64", "sx_k": "i64", "sa_s": "i64", "sa_r": "i64",
                       "sa_k": "i64", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
            constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=4, num_stages=3))
        register(KernelSpec(
            name=f"lora_expand[{_dt},slots={_ix}]", fn=lora_expand_kernel,
            signature={"h_ptr": "*fp32", "b_ptr": f"*{_dt}", "slots_ptr": f"*{_ix}",
                       "scaling_ptr": "*fp32", "y_ptr": f"*{_dt}", "N": "i32", "R": "i32",
                       "sb_s": "i64", "sb_n": "i64", "sb_r": "i64", "sy_t": "i64",
                       "BLOCK_N": "constexpr", "BLOCK_R": "constexpr",
                       "RNE_BF16": "constexpr"},
            constexprs={"BLOCK_N": BLOCK_N, "BLOCK_R": BLOCK_R, "RNE_BF16": False},
            num_warps=4, num_stages=3))

# the grouped path: one spec per BLOCK_M that grouped_block_m picks, per dtype
for _dt in ("fp32", "fp16", "bf16"):
    for _bm in (16, 32, 64):
        register(KernelSpec(
            name=f"lora_shrink_grouped[{_dt},BM={_bm}]", fn=lora_shrink_grouped_kernel,
            signature={"x_ptr": f"*{_dt}", "a_ptr": f"*{_dt}", "sorted_ids_ptr": "*i32",
                       "block_slot_ptr": "*i32", "h_ptr": "*fp32", "T": "i32", "K": "i32",
                       "R": "i32", "S": "i32", "x_rep": "i32", "sx_t": "i64",
                       "sx_k": "i64", "sa_s": "i64", "sa_r": "i64", "sa_k": "i64",
                       "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_K": "constexpr", "DOT_F32": "constexpr"},
            constexprs={"BLOCK_M": _bm, "BLOCK_R": GROUPED_BLOCK_R,
                        "BLOCK_K": GROUPED_BLOCK_K, "DOT_F32": _dt == "fp32"},
            num_warps=grouped_num_warps(_bm), num_stages=3, tensor_core=_dt != "fp32",
            wgmma_expected=_bm >= 64))
        register(KernelSpec(
            name=f"lora_expand_grouped[{_dt},BM={_bm}]", fn=lora_expand_grouped_kernel,
            signature={"h_ptr": "*fp32", "b_ptr": f"*{_dt}", "sorted_ids_ptr": "*i32",
                       "block_slot_ptr": "*i32", "scaling_ptr": "*fp32", "y_ptr": f"*{_dt}",
                       "T": "i32", "N": "i32", "R": "i32", "S": "i32", "sb_s": "i64",
                       "sb_n": "i64", "sb_r": "i64", "sy_t": "i64",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                       "BLOCK_R": "constexpr", "RNE_BF16": "constexpr"},
            constexprs={"BLOCK_M": _bm, "BLOCK_N": GROUPED_BLOCK_N,
                        "BLOCK_R": GROUPED_BLOCK_R, "RNE_BF16": False},
            num_warps=grouped_num_warps(_bm), num_stages=2))
