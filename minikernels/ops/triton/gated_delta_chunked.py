"""Gated DeltaNet linear attention (Qwen3-Next / Qwen3.5), the CHUNKED form, in Triton:
the prefill path of ``gated_delta_rule`` (the recurrent kernel in gated_delta.py steps one
token at a time; this one takes CHUNK tokens per step with tensor-core products).

Per sequence and value head the op runs a [dk, dv] fp32 state S through its tokens
(S = S * exp(g_t); S = S + outer(k_t, beta_t (v_t - k_t^T S)); o_t = (scale q_t)^T S).
Cut each sequence into chunks of C tokens (the last one partial; chunks never cross a
sequence boundary). Inside a chunk, with gc_i = g_1 + ... + g_i the cumulative log-decay
(fp32) and S the state entering the chunk, the C rank-1 updates condense into (the WY / UT
representation of the Gated DeltaNet paper; transformers' torch_chunk_gated_delta_rule):

    A  = strictly-lower( beta_i (k_i . k_j) exp(gc_i - gc_j) )               [C, C]
    T  = (I + A)^-1                                  (forward substitution, unit lower)
    w  = T @ (beta exp(gc) k)                                                 [C, dk]
    u  = T @ (beta v)                                                         [C, dv]
    v' = u - w @ S                    (each token's delta, once the entering S is known)
    P  = causal( scale (q_i . k_j) exp(gc_i - gc_j) )     (diagonal included) [C, C]
    o  = (scale exp(gc) q) @ S + P @ v'
    S  = exp(gc_last) S + (exp(gc_last - gc) k)^T @ v'

(Why: token i's delta is beta_i (v_i - k_i^T S_{i-1}), and S_{i-1} is the decayed entering
state plus the decayed deltas of the chunk's earlier tokens; collecting the deltas gives
(I + A) v' = beta v - beta exp(gc) (k S), i.e. v' = u - w S. With use_qk_l2norm, q and k
are l2-normalized rows: the norms are per-row scales, applied to the products.)

Two kernels:
  1. ``gdn_chunk_prepare_kernel``, one program per (sequence, chunk, value head), all in
     parallel: everything that does not depend on S. gc, the chunk's k k^T and q k^T
     Gram matrices, P, A, T by forward substitution, w, u, and the row scales of q and k
     (fp32 scratch, rows indexed like the tokens).
  2. ``gdn_chunk_state_kernel``, one program per (sequence, value head, BLOCK_V columns
     of dv), walking its chunks in order: v', the outputs, the state update. Its state
     tile lives in memory, not registers: in the sequence's slot of the pool (updated in
     place chunk by chunk, the last update being the final state), or in a scratch row
     without a pool. Each chunk streams it through registers in slices (BLOCK_KS rows
     for v' and o, BLOCK_KU rows for the update; barriers between the reads and the
     writes), so no program holds a [dk, BLOCK_V] tile beside the chunk's [C, dk]
     operands: that spills at dk 128 (fp32 products keep both halves of each operand in
     registers, see below). The slices are L1 / L2 hits; dk only sets loop trip counts.
Precision: the fp32 state and outputs match the recurrent kernel's fp32 tolerances, so
products of fp32 operands must be about as accurate as fp32 FMAs: tl.dot with
input_precision "tf32x3" (three tf32 tensor-core products, hi*hi + hi*lo + lo*hi) where
neither operand is exact in tf32 (w @ S, P @ v', kernel 1's T products), and two tf32
products against the hi / lo halves of the other operand where one operand is a raw
fp16 / bf16 row (q @ S, k^T @ v'; fp16 and bf16 values are exact in tf32). The q / k
Gram products of fp16 / bf16 inputs are exact half-precision products with fp32 sums.
fp32 inputs take tf32x3 throughout. The interpreter computes every product in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

#: tokens per chunk (a module attribute read per call: the tests use 16 to span several
#: chunks cheaply; a power of two >= 16, tl.dot's minimum)
CHUNK = 64
#: the feature slice kernel 1 loads at a time (it walks dk and dv in BLOCK_D slices)
BLOCK_D = 16
#: precision of tl.dot on fp32 operands ("tf32x3" ~ fp32 on tensor cores; "ieee" = FMAs)
DOT_PRECISION = "tf32x3"


@triton.jit
def _split_tf32(x):
    """fp32 x = hi + lo exactly, hi with tf32's 10 mantissa bits (the low 13 cleared):
    a tf32 product of an operand exact in tf32 (fp16 / bf16 values) with hi and with lo
    is then as accurate as an fp32 product, in two tensor-core passes (tf32x3 takes
    three, and splits both operands in registers)."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def gdn_chunk_prepare_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, cu_ptr, slot_ptr,
        w_ptr, u_ptr, p_ptr, gc_ptr, qsc_ptr, ksc_ptr,
        scale, DK, DV, MAX_CHUNKS,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_bt, stride_bh,
        stride_wt, stride_wh, stride_ut, stride_uh, stride_pt, stride_ph, stride_ct,
        stride_ch,
        GROUP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_L2NORM: tl.constexpr, HAS_STATE: tl.constexpr, DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr):
    """Per (sequence, chunk, value head), into fp32 scratch rows of the chunk's tokens:
    gc; qsc = scale rq exp(gc), ksc = rk exp(gc_last - gc) (rq, rk: the l2norm's
    1 / |row|, or 1); P [C, C]; w = T @ (beta exp(gc) rk k); u = T @ (beta v)."""
    pid = tl.program_id(0)
    seq = pid // MAX_CHUNKS
    chunk = pid % MAX_CHUNKS
    head = tl.program_id(1)                       # value head; q / k head = head // GROUP
    qk_head = head // GROUP
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    start = bos + chunk * CHUNK
    live = start < eos                            # chunks past the sequence's end: idle
    if HAS_STATE:                                 # padding rows: kernel 2 writes zeros
        live = live & (tl.load(slot_ptr + seq) >= 0)
    if live:
        n_in = tl.minimum(eos - start, CHUNK).to(tl.int32)   # tokens in this chunk
        offs_c = tl.arange(0, CHUNK)
        rows = start + offs_c
        in_chunk = offs_c < n_in
        offs_d = tl.arange(0, BLOCK_D)
        ii = offs_c[:, None]
        jj = offs_c[None, :]

        # cumulative log-decay; rows past the end get g = beta = 0 (they change nothing)
        g = tl.load(g_ptr + rows * stride_gt + head * stride_gh, mask=in_chunk,
                    other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rows * stride_bt + head * stride_bh, mask=in_chunk,
                       other=0.0).to(tl.float32)
        gc = tl.cumsum(g, axis=0)
        gc_last = tl.sum(tl.where(offs_c == n_in - 1, gc, 0.0), axis=0)

        # Gram matrices k k^T and q k^T of the raw rows, dk in BLOCK_D slices (fp16 /
        # bf16 products are exact in fp32), and the rows' squared norms
        kk = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
        qk = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
        k_sq = tl.zeros([CHUNK], dtype=tl.float32)
        q_sq = tl.zeros([CHUNK], dtype=tl.float32)
        for d0 in range(0, DK, BLOCK_D):
            cd = in_chunk[:, None] & ((d0 + offs_d) < DK)[None, :]
            kb = tl.load(k_ptr + rows[:, None] * stride_kt + qk_head * stride_kh
                         + (d0 + offs_d)[None, :] * stride_kd, mask=cd, other=0.0)
            qb = tl.load(q_ptr + rows[:, None] * stride_qt + qk_head * stride_qh
                         + (d0 + offs_d)[None, :] * stride_qd, mask=cd, other=0.0)
            if DOT_F32:   # fp32 inputs; and the interpreter's bf16 tl.dot (wrong there)
                kb = kb.to(tl.float32)
                qb = qb.to(tl.float32)
                kk = tl.dot(kb, tl.trans(kb), kk, input_precision=PRECISION)
                qk = tl.dot(qb, tl.trans(kb), qk, input_precision=PRECISION)
            else:
                kk = tl.dot(kb, tl.trans(kb), kk)
                qk = tl.dot(qb, tl.trans(kb), qk)
            if USE_L2NORM:
                kf = kb.to(tl.float32)
                qf = qb.to(tl.float32)
                k_sq += tl.sum(kf * kf, axis=1)
                q_sq += tl.sum(qf * qf, axis=1)
        rk = tl.full([CHUNK], 1.0, tl.float32)
        rq = tl.full([CHUNK], 1.0, tl.float32)
        if USE_L2NORM:   # transformers' / FLA's l2norm: x * rsqrt(sum(x^2) + 1e-6)
            rk = 1.0 / tl.sqrt(k_sq + 1e-6)
            rq = 1.0 / tl.sqrt(q_sq + 1e-6)

        # the row scales kernel 2 applies to raw q rows (outputs) and to v' (update)
        tl.store(gc_ptr + rows * stride_ct + head * stride_ch, gc, mask=in_chunk)
        tl.store(qsc_ptr + rows * stride_ct + head * stride_ch,
                 scale * rq * tl.exp(gc), mask=in_chunk)
        tl.store(ksc_ptr + rows * stride_ct + head * stride_ch,
                 rk * tl.exp(gc_last - gc), mask=in_chunk)

        # exp(gc_i - gc_j) on and below the diagonal, 0 above (the exponent masked first)
        decay = tl.exp(tl.where(ii >= jj, gc[:, None] - gc[None, :], float("-inf")))
        norms = rk[None, :] * decay
        p = qk * (scale * rq)[:, None] * norms
        tl.store(p_ptr + rows[:, None] * stride_pt + head * stride_ph + jj, p,
                 mask=in_chunk[:, None])
        a = tl.where(ii > jj, kk * (beta * rk)[:, None] * norms, 0.0)

        # T = (I + A)^-1 by forward substitution on M = T - I (strictly lower):
        # (I + A)(I + M) = I  =>  row r of M = -(A_r + A_r M), from the rows above it
        m = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
        for r in range(1, n_in):
            a_r = tl.sum(tl.where(ii == r, a, 0.0), axis=0)             # A[r, :]
            m_r = -(a_r + tl.sum(a_r[:, None] * m, axis=0))             # -(A_r + A_r M)
            m = tl.where(ii == r, m_r[None, :], m)
        t_mat = m + tl.where(ii == jj, 1.0, 0.0)

        # w = T @ (beta exp(gc) rk k) and u = T @ (beta v), slice by slice
        kscale = beta * tl.exp(gc) * rk
        for d0 in range(0, DK, BLOCK_D):
            cd = in_chunk[:, None] & ((d0 + offs_d) < DK)[None, :]
            kb = tl.load(k_ptr + rows[:, None] * stride_kt + qk_head * stride_kh
                         + (d0 + offs_d)[None, :] * stride_kd, mask=cd, other=0.0)
            wb = tl.dot(t_mat, kb.to(tl.float32) * kscale[:, None],
                        input_precision=PRECISION)
            tl.store(w_ptr + rows[:, None] * stride_wt + head * stride_wh
                     + (d0 + offs_d)[None, :], wb, mask=cd)
        for d0 in range(0, DV, BLOCK_D):
            cd = in_chunk[:, None] & ((d0 + offs_d) < DV)[None, :]
            vb = tl.load(v_ptr + rows[:, None] * stride_vt + head * stride_vh
                         + (d0 + offs_d)[None, :] * stride_vd, mask=cd, other=0.0)
            ub = tl.dot(t_mat, vb.to(tl.float32) * beta[:, None],
                        input_precision=PRECISION)
            tl.store(u_ptr + rows[:, None] * stride_ut + head * stride_uh
                     + (d0 + offs_d)[None, :], ub, mask=cd)


@triton.jit
def gdn_chunk_state_kernel(
        q_ptr, k_ptr, o_ptr, w_ptr, u_ptr, p_ptr, gc_ptr, qsc_ptr, ksc_ptr,
        cu_ptr, state_ptr, slot_ptr, init_ptr, DK, DV,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_ot, stride_oh, stride_wt, stride_wh, stride_ut, stride_uh,
        stride_pt, stride_ph, stride_ct, stride_ch,
        stride_ss, stride_sh, stride_sk, stride_sv,
        GROUP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_KS: tl.constexpr,
        BLOCK_KU: tl.constexpr, BLOCK_V: tl.constexpr, HAS_STATE: tl.constexpr,
        HAS_INIT_FLAGS: tl.constexpr, EXACT_QK: tl.constexpr, PRECISION: tl.constexpr,
        RNE_BF16: tl.constexpr):
    """Per (sequence, value head, BLOCK_V columns), chunk after chunk, with S the state
    tile in memory (the slot, or scratch row `seq` without a pool):
        v' = u - w S;  o = qsc * (q S) + P v';  S = exp(gc_last) S + k^T (ksc * v')."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    qk_head = head // GROUP
    offs_ks = tl.arange(0, BLOCK_KS)
    offs_ku = tl.arange(0, BLOCK_KU)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    v_ok = offs_v < DV
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)

    # where S lives, and whether the sequence starts from it or from zeros
    if HAS_STATE:
        row = tl.load(slot_ptr + seq).to(tl.int64)
        padding = row < 0
        from_state = row >= 0
        if HAS_INIT_FLAGS:
            from_state = from_state & (tl.load(init_ptr + seq) != 0)
    else:
        row = seq.to(tl.int64)
        padding = row < 0                          # never
        from_state = row < 0                       # never: zeros
    s_base = state_ptr + row * stride_ss + head * stride_sh + offs_v[None, :] * stride_sv

    if padding:   # a padding row: zero outputs, its slot neither read nor written
        for c0 in range(bos, eos, CHUNK):
            rows = c0 + offs_c
            tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_v[None, :],
                     tl.zeros([CHUNK, BLOCK_V], dtype=o_ptr.dtype.element_ty),
                     mask=(rows < eos)[:, None] & v_ok[None, :])
    else:
        for c0 in range(bos, eos, CHUNK):
            rows = c0 + offs_c
            in_chunk = rows < eos
            cv = in_chunk[:, None] & v_ok[None, :]
            last = tl.minimum(eos, c0 + CHUNK) - 1
            chunk_decay = tl.exp(tl.load(gc_ptr + last * stride_ct + head * stride_ch))
            qsc = tl.load(qsc_ptr + rows * stride_ct + head * stride_ch, mask=in_chunk,
                          other=0.0)
            ksc = tl.load(ksc_ptr + rows * stride_ct + head * stride_ch, mask=in_chunk,
                          other=0.0)
            # the state entering the chunk: zeros for a fresh sequence's first chunk
            dk_read = tl.where((c0 == bos) & (from_state == 0), 0, DK)

            # v' = u - w @ S and q @ S, S streamed in BLOCK_KS-row slices
            vs = tl.zeros([CHUNK, BLOCK_V], dtype=tl.float32)
            qs = tl.zeros([CHUNK, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, DK, BLOCK_KS):
                ks = k0 + offs_ks
                ck = in_chunk[:, None] & (ks < DK)[None, :]
                s = tl.load(s_base + ks[:, None] * stride_sk,
                            mask=(ks < dk_read)[:, None] & v_ok[None, :], other=0.0)
                w = tl.load(w_ptr + rows[:, None] * stride_wt + head * stride_wh
                            + ks[None, :], mask=ck, other=0.0)
                vs = tl.dot(w, s, vs, input_precision=PRECISION)
                q = tl.load(q_ptr + rows[:, None] * stride_qt + qk_head * stride_qh
                            + ks[None, :] * stride_qd, mask=ck, other=0.0).to(tl.float32)
                if EXACT_QK:   # q exact in tf32: two tf32 products on S's halves
                    s_hi, s_lo = _split_tf32(s)
                    qs = tl.dot(q, s_hi, qs, input_precision="tf32")
                    qs = tl.dot(q, s_lo, qs, input_precision="tf32")
                else:
                    qs = tl.dot(q, s, qs, input_precision=PRECISION)
            u = tl.load(u_ptr + rows[:, None] * stride_ut + head * stride_uh
                        + offs_v[None, :], mask=cv, other=0.0)
            v_new = u - vs

            # o = qsc * (q @ S) + P @ v'
            p = tl.load(p_ptr + rows[:, None] * stride_pt + head * stride_ph
                        + offs_c[None, :], mask=in_chunk[:, None], other=0.0)
            o = tl.dot(p, v_new, qs * qsc[:, None], input_precision=PRECISION)
            if RNE_BF16:   # interpreter only (see interpreter_rounding)
                o = rne_bf16(o)
            tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_v[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=cv)

            # S = exp(gc_last) S + k^T @ (ksc * v'), slice by slice, back in place
            v_new = v_new * ksc[:, None]
            v_hi, v_lo = _split_tf32(v_new)
            tl.debug_barrier()     # every thread's reads of S before anyone's writes
            for k0 in range(0, DK, BLOCK_KU):
                ks = k0 + offs_ku
                s_ptrs = s_base + ks[:, None] * stride_sk
                s = tl.load(s_ptrs, mask=(ks < dk_read)[:, None] & v_ok[None, :],
                            other=0.0)
                kt = tl.load(k_ptr + rows[None, :] * stride_kt + qk_head * stride_kh
                             + ks[:, None] * stride_kd,
                             mask=(ks < DK)[:, None] & in_chunk[None, :], other=0.0)
                kt = kt.to(tl.float32)
                if EXACT_QK:   # k exact in tf32: two tf32 products on v''s halves
                    s = tl.dot(kt, v_hi, s * chunk_decay, input_precision="tf32")
                    s = tl.dot(kt, v_lo, s, input_precision="tf32")
                else:
                    s = tl.dot(kt, v_new, s * chunk_decay, input_precision=PRECISION)
                tl.store(s_ptrs, s, mask=(ks < DK)[:, None] & v_ok[None, :])
            tl.debug_barrier()     # the new S visible to every thread of the program

        if HAS_STATE:   # an empty sequence that starts fresh still leaves a zero state
            if (eos == bos) & (from_state == 0):
                for k0 in range(0, DK, BLOCK_KS):
                    ks = k0 + offs_ks
                    tl.store(s_base + ks[:, None] * stride_sk,
                             tl.zeros([BLOCK_KS, BLOCK_V], dtype=tl.float32),
                             mask=(ks < DK)[:, None] & v_ok[None, :])


def launch_config(dk: int, dv: int) -> dict[str, int]:
    """Kernel 2's tiles: S slices of BLOCK_KS = 32 rows for v' / o (their [C, 32] w and q
    operands) and BLOCK_KU = 64 rows for the update (M = 64: wgmma on sm_90a; 32 would
    fall back to mma.sync), BLOCK_V = 32 dv columns; fewer at small dk / dv (tl.dot's
    minimum is 16). 4 warps. At C 64, dk 128 this is the largest tiling that compiles
    without spills on sm_80 and sm_90a (BLOCK_KS 64 or BLOCK_V 64 spill)."""
    ks = 32 if dk > 16 else 16
    return {"BLOCK_KS": ks, "BLOCK_KU": 64 if dk > 32 else ks,
            "BLOCK_V": 32 if dv > 16 else 16, "num_warps": 4}


def gated_delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             g: torch.Tensor, beta: torch.Tensor, cu_seqlens: torch.Tensor,
                             state: torch.Tensor | None, state_indices: torch.Tensor | None,
                             has_initial_state: torch.Tensor | None, scale: float,
                             use_qk_l2norm: bool, max_seqlen: int) -> torch.Tensor:
    """The op's contract (gated_delta.gated_delta_rule) through the two chunked kernels.
    max_seqlen must bound every sequence's length: it sizes kernel 1's grid (a longer
    sequence would read unwritten scratch past its first max_seqlen tokens)."""
    from .. import _alloc

    total, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    o = _alloc.empty((total, hv, dv), v.dtype, v.device)
    n = cu_seqlens.shape[0] - 1
    if n == 0 or (total == 0 and state is None):
        return o
    chunk, dev, f32 = CHUNK, v.device, torch.float32
    # fp32 scratch, rows indexed like the tokens: w, u, P, and gc / qsc / ksc
    w = torch.empty((total, hv, dk), dtype=f32, device=dev)
    u = torch.empty((total, hv, dv), dtype=f32, device=dev)
    p = torch.empty((total, hv, chunk), dtype=f32, device=dev)
    gc, qsc, ksc = torch.empty((3, total, hv), dtype=f32, device=dev).unbind(0)
    interp_bf16 = splitk.interpreter_bf16(v)
    has_state = state is not None
    slots = state_indices if has_state else cu_seqlens        # unused pointers: any tensor
    max_chunks = triton.cdiv(min(max_seqlen, total), chunk)
    if max_chunks > 0:
        gdn_chunk_prepare_kernel[(n * max_chunks, hv)](
            q, k, v, g, beta, cu_seqlens, slots, w, u, p, gc, qsc, ksc,
            scale, dk, dv, max_chunks, *q.stride(), *k.stride(), *v.stride(), *g.stride(),
            *beta.stride(), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
            p.stride(0), p.stride(1), *gc.stride(),
            GROUP=hv // hk, CHUNK=chunk, BLOCK_D=BLOCK_D, USE_L2NORM=use_qk_l2norm,
            HAS_STATE=has_state, DOT_F32=q.dtype == torch.float32 or interp_bf16,
            PRECISION=DOT_PRECISION, num_warps=8, num_stages=1)
    # S's home: the pool in place, else a zero-started scratch row per sequence
    st = state if has_state else torch.empty((n, hv, dk, dv), dtype=f32, device=dev)
    cfg = launch_config(dk, dv)
    gdn_chunk_state_kernel[(n, hv, triton.cdiv(dv, cfg["BLOCK_V"]))](
        q, k, o, w, u, p, gc, qsc, ksc, cu_seqlens, st, slots,
        has_initial_state if has_initial_state is not None else cu_seqlens, dk, dv,
        *q.stride(), *k.stride(), o.stride(0), o.stride(1), w.stride(0), w.stride(1),
        u.stride(0), u.stride(1), p.stride(0), p.stride(1), *gc.stride(), *st.stride(),
        GROUP=hv // hk, CHUNK=chunk, BLOCK_KS=cfg["BLOCK_KS"], BLOCK_KU=cfg["BLOCK_KU"],
        BLOCK_V=cfg["BLOCK_V"], HAS_STATE=has_state,
        HAS_INIT_FLAGS=has_state and has_initial_state is not None,
        EXACT_QK=q.dtype != torch.float32, PRECISION=DOT_PRECISION, RNE_BF16=interp_bf16,
        num_warps=cfg["num_warps"], num_stages=1)
    return o


# Qwen3-Next / Qwen3.5 (dk = dv = 128, Hv = 2 Hk), bf16 and fp16, 64-token chunks, the
# in-kernel l2norm, a state pool with has_initial_state flags; g / beta in fp32. Unit
# feature strides and 16-divisible pointers / row strides, as Triton's run-time
# specialization sees contiguous [T, H, d] rows and the launcher's scratch buffers.
for _dt in ("bf16", "fp16"):
    _name = f"[{_dt},dk=dv=128,chunk=64,l2norm=1,state=1]"
    _sig = {"q_ptr": f"*{_dt}", "k_ptr": f"*{_dt}", "v_ptr": f"*{_dt}", "g_ptr": "*fp32",
            "beta_ptr": "*fp32", "cu_ptr": "*i32", "slot_ptr": "*i32", "w_ptr": "*fp32",
            "u_ptr": "*fp32", "p_ptr": "*fp32", "gc_ptr": "*fp32", "qsc_ptr": "*fp32",
            "ksc_ptr": "*fp32", "scale": "fp32", "DK": "i32", "DV": "i32",
            "MAX_CHUNKS": "i32"}
    _unit = ("stride_qd", "stride_kd", "stride_vd", "stride_gh", "stride_bh", "stride_ch")
    for _s in ("stride_qt", "stride_qh", "stride_qd", "stride_kt", "stride_kh", "stride_kd",
               "stride_vt", "stride_vh", "stride_vd", "stride_gt", "stride_gh", "stride_bt",
               "stride_bh", "stride_wt", "stride_wh", "stride_ut", "stride_uh", "stride_pt",
               "stride_ph", "stride_ct", "stride_ch"):
        _sig[_s] = "constexpr" if _s in _unit else "i64"
    _const = {"GROUP": 2, "CHUNK": 64, "BLOCK_D": BLOCK_D, "USE_L2NORM": True,
              "HAS_STATE": True, "DOT_F32": False, "PRECISION": DOT_PRECISION,
              **{_s: 1 for _s in _unit}}
    _sig.update({_c: "constexpr" for _c in ("GROUP", "CHUNK", "BLOCK_D", "USE_L2NORM",
                                             "HAS_STATE", "DOT_F32", "PRECISION")})
    register(KernelSpec(
        name="gdn_chunk_prepare" + _name, fn=gdn_chunk_prepare_kernel, signature=_sig,
        constexprs=_const, num_warps=8, num_stages=1, tensor_core=True,
        divisible_by_16=("q_ptr", "k_ptr", "v_ptr", "w_ptr", "u_ptr", "p_ptr", "stride_qt",
                         "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                         "stride_wt", "stride_wh", "stride_ut", "stride_uh", "stride_pt",
                         "stride_ph")))

    _cfg = launch_config(128, 128)
    _sig = {"q_ptr": f"*{_dt}", "k_ptr": f"*{_dt}", "o_ptr": f"*{_dt}", "w_ptr": "*fp32",
            "u_ptr": "*fp32", "p_ptr": "*fp32", "gc_ptr": "*fp32", "qsc_ptr": "*fp32",
            "ksc_ptr": "*fp32", "cu_ptr": "*i32", "state_ptr": "*fp32", "slot_ptr": "*i32",
            "init_ptr": "*i1", "DK": "i32", "DV": "i32"}
    _unit = ("stride_qd", "stride_kd", "stride_ch", "stride_sv")
    for _s in ("stride_qt", "stride_qh", "stride_qd", "stride_kt", "stride_kh", "stride_kd",
               "stride_ot", "stride_oh", "stride_wt", "stride_wh", "stride_ut", "stride_uh",
               "stride_pt", "stride_ph", "stride_ct", "stride_ch", "stride_ss", "stride_sh",
               "stride_sk", "stride_sv"):
        _sig[_s] = "constexpr" if _s in _unit else "i64"
    _const = {"GROUP": 2, "CHUNK": 64, "BLOCK_KS": _cfg["BLOCK_KS"],
              "BLOCK_KU": _cfg["BLOCK_KU"], "BLOCK_V": _cfg["BLOCK_V"], "HAS_STATE": True,
              "HAS_INIT_FLAGS": True, "EXACT_QK": True, "PRECISION": DOT_PRECISION,
              "RNE_BF16": False, **{_s: 1 for _s in _unit}}
    _sig.update({_c: "constexpr" for _c in ("GROUP", "CHUNK", "BLOCK_KS", "BLOCK_KU",
                                             "BLOCK_V", "HAS_STATE", "HAS_INIT_FLAGS",
                                             "EXACT_QK", "PRECISION", "RNE_BF16")})
    register(KernelSpec(
        name="gdn_chunk_state" + _name, fn=gdn_chunk_state_kernel, signature=_sig,
        constexprs=_const, num_warps=_cfg["num_warps"], num_stages=1, tensor_core=True,
        divisible_by_16=("q_ptr", "k_ptr", "o_ptr", "w_ptr", "u_ptr", "p_ptr", "state_ptr",
                         "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_ot",
                         "stride_oh", "stride_wt", "stride_wh", "stride_ut", "stride_uh",
                         "stride_pt", "stride_ph", "stride_ss", "stride_sh", "stride_sk")))
