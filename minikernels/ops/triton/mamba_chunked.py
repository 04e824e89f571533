"""Mamba-2's selective state-space scan, the CHUNKED (SSD) form for prefill, in Triton.

The op (minikernels/ops/mamba.py, spec in reference.mamba2_scan) runs, per sequence and
head h, a [P, N] fp32 state S through its tokens (g = h // (H / G), the B / C group of h):

    d_t = clamp(softplus(dt_t + dt_bias));  S = exp(d_t A) S + d_t outer(x_t, B_t)
    y_t = S C_t + D x_t

The recurrent kernel (mamba.py) does exactly that, one token at a time: right for decode,
slow for prefill (thousands of dependent steps, no tensor cores). Mamba-2's state-space
duality (SSD) splits each sequence into chunks of CHUNK tokens (chunks never cross a
sequence boundary; a sequence's last chunk is partial). With dA = d A and cum_l the
running sum of dA inside the chunk (cum_l = dA_0 + ... + dA_l), unrolling the
recurrence over a chunk that starts from the state S_in gives

    y_l = exp(cum_l) C_l S_in^T                                   (the carried state)
        + sum_{s <= l} (C_l . B_s) exp(cum_l - cum_s) d_s x_s      (inside the chunk)
        + D x_l
    S_out = exp(cum_last) S_in + sum_l exp(cum_last - cum_l) d_l outer(x_l, B_l)

The second line is a causal, decay-masked "attention" of the chunk with itself: two
matrix products, on tensor cores. Only the state passing from chunk to chunk stays
sequential, and it is a cheap elementwise step. Four launches:

  1. mamba2_chunk_cumsum_kernel   per (chunk, block of heads): d and cum (fp32 scratch)
  2. mamba2_chunk_state_kernel    per (chunk, head, P x N tile): the chunk's own state
                                  sum_l exp(cum_last - cum_l) d_l outer(x_l, B_l) (tl.dot)
  3. mamba2_state_passing_kernel  per (sequence, head, slice of P*N): S walks the chunks
                                  in order, S = exp(cum_last) S + chunk state; each chunk's
                                  incoming S kept (over its chunk state, in place); the
                                  final S written to the sequence's slot
  4. mamba2_chunk_scan_kernel     per (chunk, head, P tile): the outputs y_l (two tl.dots
                                  over N for C S_in^T and C B^T, one over the chunk for
                                  the masked scores @ x)

Chunk numbering without a host sync: sequence i's chunks take the slots
first_i = cu_seqlens[i] // CHUNK + i onward. These ranges never overlap (the gap between
two sequences' first slots is at least their chunk count) and all lie below
T // CHUNK + N_seq, which sizes the scratch; a slot no chunk takes (a "gap") does
nothing. A program of launches 1, 2, 4 finds its sequence by a binary search over
first_i (increasing in i). Padding rows (state slot -1) run with every token masked
(zero inputs, zero outputs), read and write no state.

Precision: d, cum, the chunk states and S are fp32, and the dots accumulate in fp32. The
chunk-state product keeps fp32 precision on 16-bit tensor cores (its fp32 operand, the
decay-weighted B, is split into 2 fp16 / 3 bf16 parts), so the states written to the pool
match the recurrent kernel's to fp32 rounding; the output dots take S_in and the masked
scores rounded once to x's dtype (as mamba_ssm's kernels do). fp32 x dots in "ieee"
fp32. y is rounded once to x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register
from .tiling import acc_dot

#: tokens per chunk (each chunk's intra-chunk scores are a [CHUNK, CHUNK] tile)
CHUNK = 64
#: the largest P / N tile of the tensor-core kernels (and the smallest: tl.dot needs 16)
MAX_BLOCK, MIN_BLOCK = 64, 16
#: elements of the state one program of the state-passing kernel walks through the chunks
PASS_BLOCK = 1024
#: 16-bit parts of the decay-weighted B in the chunk-state product (about fp32's precision)
SPLITS = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


@triton.jit
def _locate_chunk(cu_ptr, slot_ptr, j, n_seq, search_steps, CHUNK: tl.constexpr,
                  HAS_STATE: tl.constexpr):
    """Chunk slot j -> (seq, start, length, live_length): the sequence owning slot j,
    the chunk's first token, its token count (<= 0 for a gap slot past the sequence's
    chunks) and the count to compute on (0 for a padding row: every load masked)."""
    # largest seq with first_seq = cu[seq] // CHUNK + seq <= j (first_0 = 0 <= j)
    lo = j * 0
    hi = lo + n_seq
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        ok = tl.load(cu_ptr + mid).to(tl.int32) // CHUNK + mid <= j
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    bos = tl.load(cu_ptr + lo).to(tl.int32)
    eos = tl.load(cu_ptr + lo + 1).to(tl.int32)
    start = bos + (j - bos // CHUNK - lo) * CHUNK
    length = tl.minimum(eos - start, CHUNK)
    live = length
    if HAS_STATE:
        live = tl.where(tl.load(slot_ptr + lo) >= 0, length, 0)
    return lo, start, length, live


@triton.jit
def _operand(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """An fp32 tile as a tl.dot operand of x's dtype (one rounding; RNE_BF16: the
    interpreter's truncating bf16 cast made round-to-nearest-even)."""
    if RNE_BF16:
        v = rne_bf16(v)
    return v.to(dtype)


@triton.jit
def _split_dot(a, v, acc, SPLITS: tl.constexpr, DOT_F32: tl.constexpr,
               RNE_BF16: tl.constexpr):
    """acc + a @ v for an fp32 tile v and a tile a of x's dtype, v taken as the sum of
    SPLITS operands of a's dtype (each the rounded remainder of the ones before: 3 bf16 or
    2 fp16 parts carry about fp32's 24 bits), so the state keeps fp32 precision on 16-bit
    tensor cores. SPLITS = 1: one rounding (fp32 x: none)."""
    r = v
    for i in tl.static_range(SPLITS):
        part = _operand(r, a.dtype, RNE_BF16)
        acc = acc_dot(a, part, acc, DOT_F32)
        if i + 1 < SPLITS:
            r = r - part.to(tl.float32)
    return acc


@triton.jit
def mamba2_chunk_cumsum_kernel(
        dt_ptr, a_ptr, dt_bias_ptr, cu_ptr, slot_ptr, dt_out_ptr, cum_ptr,
        dt_min, dt_max, H, n_seq, search_steps,
        stride_dtt, stride_dth, stride_a, stride_dtb,
        CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
        DT_SOFTPLUS: tl.constexpr, HAS_STATE: tl.constexpr):
    """Step 1, per (chunk slot, block of heads): d = clamp(softplus(dt + dt_bias)) and the
    running sum of dA = d A over the chunk's tokens, both fp32 [BLOCK_H, CHUNK], written
    to the scratch [slots, H, CHUNK]. Past the chunk's end (and for padding rows) d = 0,
    so cum stays at the chunk's total: cum[CHUNK - 1] is always the chunk's log-decay."""
    j = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, CHUNK)
    _, start, _, live = _locate_chunk(cu_ptr, slot_ptr, j, n_seq, search_steps, CHUNK,
                                      HAS_STATE)
    h_ok = offs_h < H
    tok = offs_l < live
    rows = (start + offs_l).to(tl.int64)
    d = tl.load(dt_ptr + rows[None, :] * stride_dtt + offs_h[:, None] * stride_dth,
                mask=h_ok[:, None] & tok[None, :], other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        d += tl.load(dt_bias_ptr + offs_h * stride_dtb, mask=h_ok, other=0.0
                     ).to(tl.float32)[:, None]
    if DT_SOFTPLUS:   # torch's softplus (threshold 20), log1p(u) = log(w) u / (w - 1)
        u = tl.exp(tl.minimum(d, 20.0))
        w = 1.0 + u
        sp = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
        d = tl.where(d > 20.0, d, sp)
    d = tl.minimum(tl.maximum(d, dt_min), dt_max)
    d = tl.where(tok[None, :], d, 0.0)
    a = tl.load(a_ptr + offs_h * stride_a, mask=h_ok, other=0.0).to(tl.float32)
    cum = tl.cumsum(d * a[:, None], axis=1)
    out = (j.to(tl.int64) * H + offs_h)[:, None] * CHUNK + offs_l[None, :]
    tl.store(dt_out_ptr + out, d, mask=h_ok[:, None])
    tl.store(cum_ptr + out, cum, mask=h_ok[:, None])


@triton.jit
def mamba2_chunk_state_kernel(
        x_ptr, b_ptr, dt_ptr, cum_ptr, cu_ptr, slot_ptr, states_ptr,
        H, P, N, n_seq, search_steps,
        stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn,
        HEADS_PER_GROUP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_STATE: tl.constexpr, SPLITS: tl.constexpr,
        DOT_F32: tl.constexpr, RNE_BF16: tl.constexpr):
    """Step 2, per (chunk slot, head, [BLOCK_P, BLOCK_N] tile of the state): the state the
    chunk's own tokens leave behind from S_in = 0,
        states[j, h] = sum_l exp(cum_last - cum_l) d_l outer(x_l, B_l) = x^T @ (w * B)
    a tl.dot over the chunk's tokens (w = exp(cum_last - cum) d, 0 past its end); w * B
    split into SPLITS 16-bit parts (the states written to the pool stay fp32-exact)."""
    j = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_p = (tl.program_id(2) // n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tl.program_id(2) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, CHUNK)
    _, start, _, live = _locate_chunk(cu_ptr, slot_ptr, j, n_seq, search_steps, CHUNK,
                                      HAS_STATE)
    p_ok = offs_p < P
    n_ok = offs_n < N
    tok = offs_l < live
    row0 = start.to(tl.int64)          # 64-bit row bases; offsets inside the tiles narrow
    x_rows = x_ptr + row0 * stride_xt + head * stride_xh
    b_rows = b_ptr + row0 * stride_bt + group * stride_bg
    # x^T [BLOCK_P, CHUNK] and B [CHUNK, BLOCK_N] of the chunk's tokens
    xt = tl.load(x_rows + offs_l[None, :] * stride_xt + offs_p[:, None] * stride_xp,
                 mask=p_ok[:, None] & tok[None, :], other=0.0)
    b = tl.load(b_rows + offs_l[:, None] * stride_bt + offs_n[None, :] * stride_bn,
                mask=tok[:, None] & n_ok[None, :], other=0.0)
    sc = (j.to(tl.int64) * H + head) * CHUNK
    cum = tl.load(cum_ptr + sc + offs_l)
    w = tl.exp(tl.load(cum_ptr + sc + CHUNK - 1) - cum) * tl.load(dt_ptr + sc + offs_l)
    acc = _split_dot(xt, b.to(tl.float32) * w[:, None],
                     tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32), SPLITS, DOT_F32,
                     RNE_BF16)
    out = states_ptr + (j.to(tl.int64) * H + head) * P * N
    tl.store(out + offs_p[:, None] * N + offs_n[None, :], acc,
             mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def mamba2_state_passing_kernel(
        states_ptr, cum_ptr, cu_ptr, state_ptr, slot_ptr, init_ptr, H, P, N,
        stride_ss, stride_sh, stride_sp, stride_sn,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_STATE: tl.constexpr,
        HAS_INIT_FLAGS: tl.constexpr):
    """Step 3, per (sequence, head, BLOCK elements of the flattened [P, N] state): S starts
    from the sequence's slot (or zeros) and walks its chunks in order,
        states[j] <- S  (the chunk's incoming state, for step 4);  S = exp(cum_last) S + c
    where c was states[j] (the chunk's own state from step 2); the final S goes back to
    the slot. Elementwise: each program's slice of S stays in registers. A padding row
    walks no chunks and touches no slot; an empty sequence writes its initial state."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    size = P * N
    e_ok = offs < size
    bos = tl.load(cu_ptr + seq).to(tl.int32)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int32)
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    first = bos // CHUNK + seq
    s = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        e_live = tl.where(slot >= 0, size, 0)       # bounds of 0 mask a padding row
        n_chunks = tl.where(slot >= 0, n_chunks, 0)
        e_read = e_live
        if HAS_INIT_FLAGS:
            e_read = tl.where(tl.load(init_ptr + seq) != 0, e_live, 0)
        s_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + (offs // N) * stride_sp + (offs % N) * stride_sn)
        s = tl.load(s_ptrs, mask=offs < e_read, other=0.0)
    for c in range(0, n_chunks):
        jh = (first + c).to(tl.int64) * H + head
        ptrs = states_ptr + jh * size + offs
        own = tl.load(ptrs, mask=e_ok, other=0.0)
        decay = tl.exp(tl.load(cum_ptr + jh * CHUNK + CHUNK - 1))
        tl.store(ptrs, s, mask=e_ok)
        s = s * decay + own
    if HAS_STATE:
        tl.store(s_ptrs, s, mask=offs < e_live)


@triton.jit
def mamba2_chunk_scan_kernel(
        x_ptr, b_ptr, c_ptr, d_ptr, dt_ptr, cum_ptr, states_ptr, cu_ptr, slot_ptr, y_ptr,
        H, P, N, n_seq, search_steps,
        stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn,
        stride_ct, stride_cg, stride_cn, stride_d, stride_yt, stride_yh,
        HEADS_PER_GROUP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr, HAS_D: tl.constexpr, HAS_STATE: tl.constexpr,
        DOT_F32: tl.constexpr, RNE_BF16: tl.constexpr):
    """Step 4, per (chunk slot, head, BLOCK_P columns of P): the chunk's outputs
        y = exp(cum)[:, None] * (C @ S_in^T)                      the incoming state
          + ((C @ B^T) * exp(cum_l - cum_s) d_s [s <= l]) @ x     the chunk itself
          + D x
    C @ S_in^T and C @ B^T accumulate over N in BLOCK_K steps (two loops: fewer tiles
    live at once); the masked scores [CHUNK, CHUNK] then multiply x [CHUNK, BLOCK_P].
    Rounded once to y's dtype."""
    j = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_l = tl.arange(0, CHUNK)
    _, start, length, live = _locate_chunk(cu_ptr, slot_ptr, j, n_seq, search_steps, CHUNK,
                                           HAS_STATE)
    p_ok = offs_p < P
    tok = offs_l < live
    # the chunk's rows as 64-bit base pointers; offsets inside the tiles stay narrow
    row0 = start.to(tl.int64)
    x_rows = x_ptr + row0 * stride_xt + head * stride_xh
    b_rows = b_ptr + row0 * stride_bt + group * stride_bg
    c_rows = c_ptr + row0 * stride_ct + group * stride_cg
    jh = j.to(tl.int64) * H + head
    cum = tl.load(cum_ptr + jh * CHUNK + offs_l)
    d = tl.load(dt_ptr + jh * CHUNK + offs_l)
    s_in = states_ptr + jh * P * N
    n_live = tl.where(live > 0, N, 0)      # padding / gap: nothing read
    dtype = x_ptr.dtype.element_ty

    # the incoming state: y = exp(cum) * (C @ S_in^T)
    y = tl.zeros([CHUNK, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n_live
        cm = tl.load(c_rows + offs_l[:, None] * stride_ct + offs_k[None, :] * stride_cn,
                     mask=tok[:, None] & k_ok[None, :], other=0.0)          # [CHUNK, BK]
        st = tl.load(s_in + offs_p[None, :] * N + offs_k[:, None],
                     mask=k_ok[:, None] & p_ok[None, :], other=0.0)       # [BK, BLOCK_P]
        y = acc_dot(cm, _operand(st, dtype, RNE_BF16), y, DOT_F32)
    y = y * tl.exp(cum)[:, None]

    # the chunk itself: scores = C @ B^T, times the causal decay exp(cum_l - cum_s) d_s
    # for s <= l (0 above the diagonal: exp(-inf)), then @ x
    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n_live
        cm = tl.load(c_rows + offs_l[:, None] * stride_ct + offs_k[None, :] * stride_cn,
                     mask=tok[:, None] & k_ok[None, :], other=0.0)          # [CHUNK, BK]
        bt = tl.load(b_rows + offs_l[None, :] * stride_bt + offs_k[:, None] * stride_bn,
                     mask=k_ok[:, None] & tok[None, :], other=0.0)          # [BK, CHUNK]
        scores = acc_dot(cm, bt, scores, DOT_F32)
    causal = offs_l[:, None] >= offs_l[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
    scores = _operand(scores * decay * d[None, :], dtype, RNE_BF16)
    x = tl.load(x_rows + offs_l[:, None] * stride_xt + offs_p[None, :] * stride_xp,
                mask=tok[:, None] & p_ok[None, :], other=0.0)            # [CHUNK, BLOCK_P]
    y = acc_dot(scores, x, y, DOT_F32)
    if HAS_D:
        y += tl.load(d_ptr + head * stride_d).to(tl.float32) * x.to(tl.float32)
    if RNE_BF16:   # interpreter only (see interpreter_rounding)
        y = rne_bf16(y)
    # every real token is stored (zeros for a padding row); a gap slot (length <= 0) none
    y_rows = y_ptr + row0 * stride_yt + head * stride_yh
    tl.store(y_rows + offs_l[:, None] * stride_yt + offs_p[None, :],
             y.to(y_ptr.dtype.element_ty), mask=(offs_l < length)[:, None] & p_ok[None, :])


def launch_config(p: int, n: int, chunk: int = CHUNK) -> dict[str, int]:
    """Tiles of the tensor-core kernels: BLOCK_P (P columns per program, state and scan),
    BLOCK_N (state columns per program of step 2), BLOCK_K (step 4's steps over N), each
    the next power of two in [16, 64]. Warps: 4 for step 2 (one [BLOCK_P, CHUNK] x
    [CHUNK, BLOCK_N] product), 8 for step 4 (two [CHUNK, 64] fp32 accumulators and the
    [CHUNK, CHUNK] decay tile live at once: 4 warps come near 255 registers on sm_80)."""
    fit = lambda v: min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(v)))  # noqa: E731
    return {"BLOCK_P": fit(p), "BLOCK_N": fit(n), "BLOCK_K": fit(n),
            "state_warps": 4 if chunk <= 64 else 8, "scan_warps": 8}


def num_slots(total: int, n_seq: int, chunk: int = CHUNK) -> int:
    """Chunk slots of a batch: first_i = cu_seqlens[i] // chunk + i and its chunks all lie
    below T // chunk + N_seq (see the module docstring)."""
    return total // chunk + n_seq


def mamba2_scan_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor, cu_seqlens: torch.Tensor, D: torch.Tensor | None,
                        dt_bias: torch.Tensor | None, dt_softplus: bool, dt_min: float,
                        dt_max: float, state: torch.Tensor | None,
                        state_indices: torch.Tensor | None,
                        has_initial_state: torch.Tensor | None, y: torch.Tensor,
                        chunk: int | None = None) -> torch.Tensor:
    """The four launches into y (allocated by the caller, [T, H, P] contiguous); inputs as
    mamba.mamba2_scan takes them (validated; any strides). Scratch (fp32): d and cum
    [slots, H, CHUNK], the chunk states [slots, H, P, N] (then each chunk's S_in)."""
    from .. import _alloc

    chunk = CHUNK if chunk is None else chunk
    total, h, p = x.shape
    groups, n_state = B.shape[1], B.shape[2]
    n = cu_seqlens.shape[0] - 1
    dev = x.device
    slots = num_slots(total, n, chunk)
    steps = (n - 1).bit_length()
    d_chunks = _alloc.empty((slots, h, chunk), torch.float32, dev)
    cum = _alloc.empty((slots, h, chunk), torch.float32, dev)
    states = _alloc.empty((slots, h, p, n_state), torch.float32, dev)
    has_state = state is not None
    slot_ptr = state_indices if has_state else cu_seqlens          # unused: any tensor
    cfg = launch_config(p, n_state, chunk)
    interp_bf16 = splitk.interpreter_bf16(y)
    dots = {"DOT_F32": x.dtype == torch.float32 or interp_bf16, "RNE_BF16": interp_bf16}
    splits = SPLITS[x.dtype]

    block_h = min(16, triton.next_power_of_2(h))
    mamba2_chunk_cumsum_kernel[(slots, triton.cdiv(h, block_h))](
        dt, A, dt_bias if dt_bias is not None else A, cu_seqlens, slot_ptr, d_chunks, cum,
        dt_min, dt_max, h, n, steps, *dt.stride(), A.stride(0),
        dt_bias.stride(0) if dt_bias is not None else 0,
        CHUNK=chunk, BLOCK_H=block_h, HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=dt_softplus, HAS_STATE=has_state, num_warps=4, num_stages=1)

    tiles = triton.cdiv(p, cfg["BLOCK_P"]) * triton.cdiv(n_state, cfg["BLOCK_N"])
    mamba2_chunk_state_kernel[(slots, h, tiles)](
        x, B, d_chunks, cum, cu_seqlens, slot_ptr, states, h, p, n_state, n, steps,
        *x.stride(), *B.stride(),
        HEADS_PER_GROUP=h // groups, CHUNK=chunk, BLOCK_P=cfg["BLOCK_P"],
        BLOCK_N=cfg["BLOCK_N"], HAS_STATE=has_state, SPLITS=splits, **dots,
        num_warps=cfg["state_warps"], num_stages=1)

    mamba2_state_passing_kernel[(n, h, triton.cdiv(p * n_state, PASS_BLOCK))](
        states, cum, cu_seqlens, state if has_state else states, slot_ptr,
        has_initial_state if has_initial_state is not None else cu_seqlens, h, p, n_state,
        *(state.stride() if has_state else (0, 0, 0, 0)),
        CHUNK=chunk, BLOCK=PASS_BLOCK, HAS_STATE=has_state,
        HAS_INIT_FLAGS=has_state and has_initial_state is not None, num_warps=4,
        num_stages=1)

    mamba2_chunk_scan_kernel[(slots, h, triton.cdiv(p, cfg["BLOCK_P"]))](
        x, B, C, D if D is not None else A, d_chunks, cum, states, cu_seqlens, slot_ptr, y,
        h, p, n_state, n, steps, *x.stride(), *B.stride(), *C.stride(),
        D.stride(0) if D is not None else 0, y.stride(0), y.stride(1),
        HEADS_PER_GROUP=h // groups, CHUNK=chunk, BLOCK_P=cfg["BLOCK_P"],
        BLOCK_K=cfg["BLOCK_K"], HAS_D=D is not None, HAS_STATE=has_state, **dots,
        num_warps=cfg["scan_warps"], num_stages=2)
    return y


# Ahead-of-time specs: Granite 4.0-H / Bamba / Nemotron-H layers (P = 64, N = 128; H = 128
# heads in G = 1 group, or G = 8 groups of 16), bf16 and fp16, 64-token chunks, a state
# pool with has_initial_state flags, D, dt_bias and softplus; unit feature strides (as
# Triton's run-time specialization sees contiguous rows); dt in x's dtype (G = 1) or fp32
# (G = 8), as the recurrent kernel's specs. The tensor-core kernels' data pointers and row
# strides compiled as multiples of 16, as the specialization sees these models' aligned
# activations (vectorized loads; without the hints steps 2 and 4 still compile without
# spills: 194 / 237 registers on sm_80, 164 / 180 on sm_90a).
def _spec(name: str, fn, sig: dict[str, str], unit: tuple[str, ...], const: dict,
          num_warps: int, num_stages: int, tensor_core: bool) -> None:
    """Every argument in the kernel's order: the given types, then constexpr (flags and
    unit strides), i64 (other strides) or i32 (sizes)."""
    full = {}
    for arg in fn.arg_names:
        if arg in sig:
            full[arg] = sig[arg]
        elif arg in unit or arg in const:
            full[arg] = "constexpr"
        else:
            full[arg] = "i64" if arg.startswith("stride") else "i32"
    aligned = tuple(a for a, t in full.items() if tensor_core and (
        a.startswith("stride") and t == "i64" or t.startswith("*") and a in _DATA))
    register(KernelSpec(name=name, fn=fn, signature=full,
                        constexprs={**const, **{u: 1 for u in unit}}, num_warps=num_warps,
                        num_stages=num_stages, tensor_core=tensor_core,
                        divisible_by_16=aligned))


_DATA = ("x_ptr", "b_ptr", "c_ptr", "y_ptr", "dt_ptr", "cum_ptr", "states_ptr")


def _register_specs() -> None:
    cfg = launch_config(64, 128)
    for dt_type in ("bf16", "fp16", "fp32"):
        _spec(f"mamba2_chunk_cumsum[dt={dt_type},H=128,CHUNK=64,state=1]",
              mamba2_chunk_cumsum_kernel,
              {"dt_ptr": f"*{dt_type}", "a_ptr": "*fp32", "dt_bias_ptr": "*fp32",
               "cu_ptr": "*i32", "slot_ptr": "*i32", "dt_out_ptr": "*fp32",
               "cum_ptr": "*fp32", "dt_min": "fp32", "dt_max": "fp32"},
              ("stride_dth", "stride_a", "stride_dtb"),
              {"CHUNK": CHUNK, "BLOCK_H": 16, "HAS_DT_BIAS": True, "DT_SOFTPLUS": True,
               "HAS_STATE": True}, 4, 1, False)
    _spec("mamba2_state_passing[P=64,N=128,CHUNK=64,state=1]", mamba2_state_passing_kernel,
          {"states_ptr": "*fp32", "cum_ptr": "*fp32", "cu_ptr": "*i32", "state_ptr": "*fp32",
           "slot_ptr": "*i32", "init_ptr": "*i1"}, ("stride_sn",),
          {"CHUNK": CHUNK, "BLOCK": PASS_BLOCK, "HAS_STATE": True, "HAS_INIT_FLAGS": True},
          4, 1, False)
    for dt in ("bf16", "fp16"):
        for groups in (1, 8):
            ptrs = {"x_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "d_ptr": "*fp32",
                    "dt_ptr": "*fp32", "cum_ptr": "*fp32", "states_ptr": "*fp32",
                    "cu_ptr": "*i32", "slot_ptr": "*i32", "y_ptr": f"*{dt}"}
            common = {"HEADS_PER_GROUP": 128 // groups, "CHUNK": CHUNK,
                      "BLOCK_P": cfg["BLOCK_P"], "HAS_STATE": True, "DOT_F32": False,
                      "RNE_BF16": False}
            tag = f"{dt},P=64,N=128,G={groups},CHUNK=64,state=1"
            _spec(f"mamba2_chunk_state[{tag}]", mamba2_chunk_state_kernel,
                  {k: v for k, v in ptrs.items()
                   if k in mamba2_chunk_state_kernel.arg_names},
                  ("stride_xp", "stride_bn"),
                  {**common, "BLOCK_N": cfg["BLOCK_N"], "SPLITS": 3 if dt == "bf16" else 2},
                  cfg["state_warps"], 1, True)
            _spec(f"mamba2_chunk_scan[{tag}]", mamba2_chunk_scan_kernel, dict(ptrs),
                  ("stride_xp", "stride_bn", "stride_cn", "stride_d"),
                  {**common, "BLOCK_K": cfg["BLOCK_K"], "HAS_D": True},
                  cfg["scan_warps"], 2, True)


_register_specs()
