"""Flash attention forward (prefill) over varlen batches, optionally over a paged KV cache.

Algorithm (FlashAttention-2 forward, one program per (query tile, q head, sequence)):
  1. Load the BLOCK_M x D tile of queries once; find the key range [lo, hi) any of its rows
     can see (query i of Lq sits at position p = i + Lk - Lq, bottom-right aligned, so with
     Lq > Lk the first rows sit before every key; a right bound keeps j <= p + window_right,
     causal being window_right = 0; a left window keeps j >= p - window_left). Keys
     outside are never read.
  2. Walk that range in BLOCK_N key tiles, in three loops: a masked loop over the window's
     left edge, an unmasked loop over tiles every row sees fully, and a masked loop over the
     diagonal and the end of the sequence (only these pay for the mask).
  3. Per tile: s = q k^T (tensor cores, fp32 accumulate), scaled into the log2 domain
     (optional softcap * tanh(s / softcap) first, then the optional ALiBi bias
     -slope * |p - j|); online softmax with exp2: keep the row max
     m and the row sum l, rescale the fp32 accumulator by exp2(m_old - m_new), acc += p v.
  4. out = acc / l, lse = (m + log2 l) * ln 2. A row that saw no key has l == 0: it gets
     output 0 and lse -inf (m starts finite, so no inf - inf ever makes a NaN).
GQA: q head h reads kv head h // (Hq // Hkv). Paged mode: key j of sequence b lives in
cache block block_table[b, j // PAGE_SIZE], slot j % PAGE_SIZE (gathered per key row, so any
page size works with any BLOCK_N). FP8 paged caches (KV_SCALE): tiles convert exactly to q's
dtype; the kv head's k_scale folds into the score scale, its v_scale multiplies acc / l.
Without e4m3 hardware (sm_80) the cache comes as bytes (int8 views), decoded in software
to value / 256 (fp8_bits.py), the 256 folded into both scales.
Grid (Hq, B, query tiles), heavy (late) query tiles first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _alloc
from . import fp8_bits
from .fp8_bits import byte_scale, fp8_tile_to
from .registry import KernelSpec, register

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _kv_rows(offs_n, seqlen_k, bt_row, stride_tok, stride_blk, PAGED: tl.constexpr,
             PAGE_SIZE: tl.constexpr, MASK_N: tl.constexpr):
    """Element offsets of key rows offs_n of one sequence (relative to its kv-head base)."""
    if PAGED:
        if MASK_N:
            blk = tl.load(bt_row + offs_n // PAGE_SIZE, mask=offs_n < seqlen_k, other=0)
        else:
            blk = tl.load(bt_row + offs_n // PAGE_SIZE)
        return blk.to(tl.int64) * stride_blk + (offs_n % PAGE_SIZE) * stride_tok
    else:
        return offs_n * stride_tok


@triton.jit
def _attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, start, end, seqlen_k, q_hi, offs_d,
                stride_kt, stride_kb, stride_vt, stride_vb, qk_scale, cap_in, cap_out,
                window_span, q_pos, alibi, MASKED: tl.constexpr, RIGHT_BOUND: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                PAGE_SIZE: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                KV_SCALE: tl.constexpr, ALIGNED: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Accumulate key tiles [start, end) into (acc, l_i, m_i); masks only when MASKED.

    Row r sees keys q_hi[r] - window_span <= j <= q_hi[r] (q_hi = position + window_right,
    window_span = window_left + window_right): one vector of bounds, like plain causal.
    HAS_ALIBI: scores get -alibi * |q_pos[r] - j| (alibi: the head's slope * log2 e).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k_rows = _kv_rows(offs_n, seqlen_k, bt_row, stride_kt, stride_kb, PAGED, PAGE_SIZE,
                          MASKED)
        v_rows = _kv_rows(offs_n, seqlen_k, bt_row, stride_vt, stride_vb, PAGED, PAGE_SIZE,
                          MASKED)
        k_ptrs = k_base + k_rows[:, None] + offs_d[None, :]
        v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
        if ALIGNED:  # 16-byte aligned rows (the launcher checked): vectorized async copies
            k_ptrs = tl.multiple_of(k_ptrs, [1, 16])
            v_ptrs = tl.multiple_of(v_ptrs, [1, 16])
        if MASKED:
            kv_mask = offs_n[:, None] < seqlen_k
            if not EVEN_D:
                kv_mask = kv_mask & d_ok
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
        if KV_SCALE or UPCAST:  # fp8 -> q's dtype is exact; interpreter: fp32
            k = fp8_tile_to(k, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            # softcap * tanh(scale * s / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1)
            x = s * cap_in
            s = (1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)) * cap_out
        else:
            s = s * qk_scale
        if HAS_ALIBI:
            s -= alibi * tl.abs(q_pos[:, None] - offs_n[None, :]).to(tl.float32)
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if RIGHT_BOUND:
                visible = visible & (offs_n[None, :] <= q_hi[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] >= q_hi[:, None] - window_span)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        if KV_SCALE or UPCAST:
            v = fp8_tile_to(v, q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, bt_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_kb, stride_vt, stride_vh, stride_vb,
        stride_ot, stride_oh, stride_lse, stride_bt, group, qk_scale, cap_in, cap_out,
        window_left, window_right, ks_ptr, vs_ptr, al_ptr, stride_al,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, RIGHT_BOUND: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, KV_SCALE: tl.constexpr,
        SCALE_PER_HEAD: tl.constexpr, ALIGNED: tl.constexpr, HAS_ALIBI: tl.constexpr):
    # grid (Hq, B, query tiles), launched x-fastest: every head and sequence of one tile row
    # runs together (GQA heads share K/V in L2) and the heavy tiles (late in the sequence:
    # more keys under causal) are launched first, so the light ones fill the last wave
    head = tl.program_id(0)
    seq = tl.program_id(1)
    start_m = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    seqlen_q = tl.load(cu_q_ptr + seq + 1) - q_start
    if start_m * BLOCK_M >= seqlen_q:
        return
    k_start = tl.load(cu_k_ptr + seq)
    seqlen_k = tl.load(cu_k_ptr + seq + 1) - k_start
    kv_head = head // group
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
    if ALIGNED:
        q_ptrs = tl.multiple_of(q_ptrs, [1, 16])
    q_mask = offs_m[:, None] < seqlen_q
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if UPCAST:  # interpreter only: its tl.dot multiplies bf16 as raw uint16 bits
        q = q.to(tl.float32)

    if PAGED:
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    else:
        k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
        bt_row = bt_ptr

    # key positions: row i sits at i + Lk - Lq; [lo, hi) = keys some row sees,
    # [full_lo, full_hi) = keys every row sees (no mask needed there)
    q_pos = offs_m + (seqlen_k - seqlen_q)                  # each row's position
    q_hi = q_pos + window_right                             # last key each row may see
    alibi = 0.0
    if HAS_ALIBI:  # slopes [Hq] (stride_al 0) or [B, Hq], into the log2 domain
        alibi = tl.load(al_ptr + seq * stride_al + head) * 1.4426950408889634
    window_span = window_left + window_right
    pos_first = start_m * BLOCK_M + (seqlen_k - seqlen_q)
    pos_last = tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q) - 1 + (seqlen_k - seqlen_q)
    hi = seqlen_k
    full_hi = seqlen_k
    if RIGHT_BOUND:  # may be <= 0 (Lq > Lk: rows before every key): loops run empty
        hi = tl.minimum(hi, pos_last + window_right + 1)
        full_hi = tl.minimum(full_hi, pos_first + window_right + 1)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos_first - window_left, 0)
        full_lo = tl.maximum(pos_last - window_left, 0)
    lo_al = (lo // BLOCK_N) * BLOCK_N
    mid_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    mid_hi = (full_hi // BLOCK_N) * BLOCK_N
    no_full = (mid_hi <= mid_lo) | (hi <= lo)
    mid_lo = tl.where(no_full, lo_al, mid_lo)
    mid_hi = tl.where(no_full, lo_al, mid_hi)

    v_scale = 1.0
    if KV_SCALE:  # fp8 cache: fold the kv head's scales (see module doc)
        if SCALE_PER_HEAD:
            k_scale = tl.load(ks_ptr + kv_head)
            v_scale = tl.load(vs_ptr + kv_head)
        else:
            k_scale = tl.load(ks_ptr)
            v_scale = tl.load(vs_ptr)
        k_scale = k_scale * byte_scale(k_ptr)   # a cache read as bytes holds value / 256
        v_scale = v_scale * byte_scale(v_ptr)
        qk_scale = qk_scale * k_scale
        cap_in = cap_in * k_scale

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: no inf - inf on empty rows
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:  # left window edge: masked
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, bt_row, lo_al, mid_lo, seqlen_k, q_hi, offs_d,
            stride_kt, stride_kb, stride_vt, stride_vb, qk_scale, cap_in, cap_out, window_span,
            q_pos, alibi, True, RIGHT_BOUND, HAS_WINDOW, HAS_SOFTCAP, PAGED, PAGE_SIZE, EVEN_D,
            HEAD_DIM, BLOCK_N, DOT_PRECISION, UPCAST, KV_SCALE, ALIGNED, HAS_ALIBI)
    acc, l_i, m_i = _attn_tiles(  # interior: every row sees every key
        acc, l_i, m_i, q, k_base, v_base, bt_row, mid_lo, mid_hi, seqlen_k, q_hi, offs_d,
        stride_kt, stride_kb, stride_vt, stride_vb, qk_scale, cap_in, cap_out, window_span,
        q_pos, alibi, False, RIGHT_BOUND, HAS_WINDOW, HAS_SOFTCAP, PAGED, PAGE_SIZE, EVEN_D,
        HEAD_DIM, BLOCK_N, DOT_PRECISION, UPCAST, KV_SCALE, ALIGNED, HAS_ALIBI)
    acc, l_i, m_i = _attn_tiles(  # diagonal and sequence end: masked
        acc, l_i, m_i, q, k_base, v_base, bt_row, mid_hi, hi, seqlen_k, q_hi, offs_d,
        stride_kt, stride_kb, stride_vt, stride_vb, qk_scale, cap_in, cap_out, window_span,
        q_pos, alibi, True, RIGHT_BOUND, HAS_WINDOW, HAS_SOFTCAP, PAGED, PAGE_SIZE, EVEN_D,
        HEAD_DIM, BLOCK_N, DOT_PRECISION, UPCAST, KV_SCALE, ALIGNED, HAS_ALIBI)

    empty = l_i == 0.0
    inv_l = v_scale / tl.where(empty, 1.0, l_i)
    out = acc * inv_l[:, None]
    log_l = tl.math.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), (m_i + log_l) * 0.6931471805599453)  # ln 2
    o_base = o_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    if ALIGNED:
        o_ptrs = tl.multiple_of(o_ptrs, [1, 16])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + head.to(tl.int64) * stride_lse + q_start + offs_m, lse,
             mask=offs_m < seqlen_q)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class FlashConfig:
    """Tile shape and launch options of one kernel instance."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per-arch tables keyed by padded head dim (BLOCK_D). Every entry compiles without register
# spills for both sm_80 and sm_90a (the AOT test compiles each registered spec for both).
# Starting points, to be swept on the GPU: ``python -m bench.bench_attention --sweep``
# (bench/NOTES.md, "attention"). E.g. sm_90 d128 128x128/8 warps/2 stages fits sm_90a
# (244 regs) but spills 16 B on sm_80, so it is a sweep candidate, not the default.
#
# D in (256, 512] (BLOCK_D 512, Gemma 4's full-attention heads): 32-row query tiles, so no
# wgmma on sm_90a (its tiles have 64 rows) but mma.sync on both archs. A 64-row tile's fp32
# accumulator is 64 x 512 x 4 B = 128 registers a thread over 8 warps, and the kernel's
# other live values (scores, probabilities, row stats, addresses) need ~130 more: every
# 64-row variant tried spills (8 warps, BLOCK_N 16-32, 1-3 stages: 200-580 B of stack on
# sm_90a, up to 40 B on sm_80 where only the plain causal 64 x 16 just fits at 255
# registers; 16 warps: capped at 128 registers, 550-1000 B). Splitting the head dim into two halves
# inside the kernel (two [64, 256] accumulators) keeps the same accumulator registers a
# thread, so it spills alike; recomputing q k^T per half instead costs 1.5x the FLOPs.
# 32 x 32 tiles over 8 warps hold a 64-register accumulator: 176-244 registers with every
# feature (fp8 caches included), no spills; sm_80 2 stages (~98 KB smem), sm_90a 3 stages
# (~162 KB of its 227 KB).
SM90_CONFIGS = {
    16: FlashConfig(128, 128, 8, 3),
    32: FlashConfig(128, 128, 8, 3),
    64: FlashConfig(128, 128, 8, 3),
    128: FlashConfig(128, 64, 8, 3),
    256: FlashConfig(64, 32, 8, 2),
    512: FlashConfig(32, 32, 8, 3),
}
SM80_CONFIGS = {
    16: FlashConfig(128, 64, 8, 3),
    32: FlashConfig(128, 64, 8, 3),
    64: FlashConfig(128, 64, 8, 3),
    128: FlashConfig(128, 64, 8, 3),
    256: FlashConfig(64, 32, 8, 2),
    512: FlashConfig(32, 32, 8, 2),
}
# fp8 paged caches read as bytes (GPUs without e4m3 conversions: sm_80; fp8_bits.py): the
# in-register decode of each K / V tile costs registers. The d128 tile above spills with it
# (m128n64 w8: 255 registers + spills, 840 B of stack at 2 stages; 64 x 64 over 4 warps
# spills 8 B with a softcap); 128 x 32 keeps 173 registers (AOT, sm_80).
E4M3_BYTES_CONFIGS = {
    128: FlashConfig(128, 32, 8, 3),
}
# Rows that are not 16-byte aligned (a head dim that is not a multiple of 8, or an unaligned
# paged cache) load element by element through registers: wide head dims need small tiles
# to stay free of spills (both archs; at BLOCK_D 512 four warps spill 96 B on sm_80).
UNALIGNED_CONFIGS = {
    128: FlashConfig(64, 32, 8, 2),
    256: FlashConfig(16, 16, 4, 2),
    512: FlashConfig(16, 16, 8, 2),
}
#: fp32 q / k / v (exact dots on FMA units; GPU fp32 is for tests): 32 x 32 tiles over 8
#: warps up to BLOCK_D 64, 16 x 16 over 8 warps and 1 stage above (AOT, sm_80 / sm_90a: no
#: spills; 32 x 32 / 4 warps spilled from BLOCK_D 64 on sm_90a, 64 x 32 / 4 warps at 64).
FP32_NARROW_CONFIG = FlashConfig(32, 32, 8, 2)
FP32_WIDE_CONFIG = FlashConfig(16, 16, 8, 1)
INTERPRETER_CONFIG = FlashConfig(16, 16, 1, 1)  # CPU interpreter: small tiles, many programs


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _smem_bytes(cfg: FlashConfig, bd: int, elem: int) -> int:
    return (cfg.block_m * bd + 2 * cfg.num_stages * cfg.block_n * bd) * elem


def _env_config() -> FlashConfig | None:
    """MINIKERNELS_FLASH_CONFIG="BLOCK_M,BLOCK_N,num_warps,num_stages" (tuning override)."""
    raw = os.environ.get("MINIKERNELS_FLASH_CONFIG", "").strip()
    if not raw:
        return None
    try:
        bm, bn, w, s = (int(x) for x in raw.split(","))
    except ValueError as exc:
        raise ValueError("MINIKERNELS_FLASH_CONFIG must be 'BLOCK_M,BLOCK_N,num_warps,"
                         f"num_stages', got {raw!r}") from exc
    return FlashConfig(bm, bn, w, s)


def pick_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                aligned: bool = True, kv_bytes: bool = False) -> FlashConfig:
    """The tile config for this head dim / dtype on this device (aligned: every row the
    kernel reads starts 16-byte aligned; kv_bytes: an fp8 cache read as bytes)."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    override = _env_config()
    if override is not None:
        return override
    bd = block_d(head_dim)
    major, _ = torch.cuda.get_device_capability(device)
    cfg = (SM90_CONFIGS if major >= 9 else SM80_CONFIGS)[bd]
    elem = torch.finfo(dtype).bits // 8
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles
        cfg = FP32_NARROW_CONFIG if bd <= 64 else FP32_WIDE_CONFIG
    if kv_bytes and bd in E4M3_BYTES_CONFIGS:
        cfg = E4M3_BYTES_CONFIGS[bd]
    if not aligned and bd in UNALIGNED_CONFIGS:
        cfg = UNALIGNED_CONFIGS[bd]
    smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    while cfg.num_stages > 1 and _smem_bytes(cfg, bd, elem) > smem:  # e.g. sm_86/sm_89
        cfg = FlashConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
    while cfg.block_n > 16 and _smem_bytes(cfg, bd, elem) > smem:
        cfg = FlashConfig(cfg.block_m, cfg.block_n // 2, cfg.num_warps, cfg.num_stages)
    return cfg


# --------------------------------------------------------------------------- launcher


def _rows_aligned(t: torch.Tensor) -> bool:
    """Every row starts 16-byte aligned (pointer and outer strides): what the kernel's
    vector-load hints (ALIGNED) promise."""
    e = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * e % 16 == 0 for s in t.stride()[:-1])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are 16-byte aligned, or when no copy could make them so (a
    head dim whose rows are not a multiple of 16 bytes, e.g. d = 59: the kernel then runs
    without the vector hints); else a fresh contiguous copy."""
    if _rows_aligned(t) or t.shape[-1] * t.element_size() % 16:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    causal: bool, softmax_scale: float, window_left: int, softcap: float,
                    block_table: torch.Tensor | None, config: FlashConfig | None = None,
                    window_right: int = -1, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None,
                    alibi_slopes: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs (see minikernels.ops.attention.flash_attention) -> (out, lse).

    q [total_q, Hq, D]; k, v [total_k, Hkv, D] or paged [num_blocks, block_size, Hkv, D]
    (fp8 paged caches with k_scale / v_scale fp32, numel 1 or Hkv); last dims contiguous.
    alibi_slopes fp32 [Hq] or [B, Hq] (last dim contiguous) or None.
    out [total_q, Hq, D] in q.dtype (contiguous), lse [Hq, total_q] fp32.
    """
    total_q, hq, d = q.shape
    hkv = k.shape[-2]
    out = _alloc.empty((total_q, hq, d), q.dtype, q.device)
    lse = _alloc.empty((hq, total_q), torch.float32, q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch <= 0 or hq == 0 or max_seqlen_q <= 0:
        return out, lse
    paged = block_table is not None
    k, v = fp8_bits.kernel_view(k), fp8_bits.kernel_view(v)   # sm_80: fp8 caches as bytes
    # Varlen q / k / v are copied when that makes their rows 16-byte aligned; a paged cache
    # (the whole pool) never is: an unaligned one runs without the vector hints.
    q = _aligned(q)
    if not paged:
        k, v = _aligned(k), _aligned(v)
    aligned = all(_rows_aligned(t) for t in (q, k, v, out))
    cfg = config or pick_config(d, q.dtype, q.device, aligned, kv_bytes=k.dtype == torch.int8)
    cu_q = cu_seqlens_q.contiguous()
    cu_k = cu_seqlens_k.contiguous()
    if paged:
        bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        stride_kt, stride_kh, stride_kb = k.stride(1), k.stride(2), k.stride(0)
        stride_vt, stride_vh, stride_vb = v.stride(1), v.stride(2), v.stride(0)
        page_size, stride_bt = k.shape[1], bt.stride(0)
    else:
        bt = cu_k  # unused placeholder pointer
        stride_kt, stride_kh, stride_kb = k.stride(0), k.stride(1), 0
        stride_vt, stride_vh, stride_vb = v.stride(0), v.stride(1), 0
        page_size, stride_bt = 1, 0
    has_softcap = softcap > 0
    upcast = q.device.type != "cuda" and q.dtype == torch.bfloat16
    # causal = a right bound at the diagonal (FlashAttention: causal overrides window_right)
    right_bound = bool(causal) or window_right >= 0
    kv_scale = k_scale is not None
    has_alibi = alibi_slopes is not None
    grid = (hq, batch, triton.cdiv(max_seqlen_q, cfg.block_m))
    flash_attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, bt,
        q.stride(0), q.stride(1), stride_kt, stride_kh, stride_kb, stride_vt, stride_vh,
        stride_vb, out.stride(0), out.stride(1), lse.stride(0), stride_bt, hq // hkv,
        softmax_scale * LOG2E, softmax_scale / softcap if has_softcap else 1.0,
        softcap * LOG2E if has_softcap else 1.0, max(window_left, 0),
        0 if causal else max(window_right, 0), k_scale if kv_scale else lse,
        v_scale if kv_scale else lse,
        alibi_slopes if has_alibi else lse,
        alibi_slopes.stride(0) if has_alibi and alibi_slopes.ndim == 2 else 0,
        HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        RIGHT_BOUND=right_bound, HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=has_softcap,
        PAGED=paged, PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        KV_SCALE=kv_scale, SCALE_PER_HEAD=kv_scale and k_scale.numel() > 1, ALIGNED=aligned,
        HAS_ALIBI=has_alibi, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


# --------------------------------------------------------------------------- registry


def _signature(dt: str, kv_dt: str) -> dict[str, str]:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{kv_dt}", "v_ptr": f"*{kv_dt}", "o_ptr": f"*{dt}"}
    sig.update({"lse_ptr": "*fp32", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "bt_ptr": "*i32"})
    for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_kb", "stride_vt",
                 "stride_vh", "stride_vb", "stride_ot", "stride_oh", "stride_lse", "stride_bt",
                 "group"):
        sig[name] = "i32"
    sig.update({"qk_scale": "fp32", "cap_in": "fp32", "cap_out": "fp32", "window_left": "i32",
                "window_right": "i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                "al_ptr": "*fp32", "stride_al": "i32"})
    for name in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "RIGHT_BOUND", "HAS_WINDOW",
                 "HAS_SOFTCAP", "PAGED", "PAGE_SIZE", "DOT_PRECISION", "UPCAST", "KV_SCALE",
                 "SCALE_PER_HEAD", "ALIGNED", "HAS_ALIBI"):
        sig[name] = "constexpr"
    return sig


_registered: set[tuple] = set()


#: fp8 paged-cache kinds -> (the cache pointer's dtype, the spec name's flag)
_FP8_KV = {"e4m3": ("fp8e4nv", "kv=fp8"), "e4m3-bytes": ("i8", "kv=e4m3-bytes"),
           "e5m2": ("fp8e5", "kv=e5m2")}


def _register(dt: str, head_dim: int, cfg: FlashConfig, *, causal: bool = True,
              window: bool = False, softcap: bool = False, page_size: int = 0,
              fp8_kv: str | None = None, alibi: bool = False,
              archs: tuple[int, ...] = (80, 90)) -> None:
    """causal: a right bound (causal, or window_right >= 0); fp8_kv: fp8 paged caches, one
    of _FP8_KV: "e4m3" natively (sm_90a), "e4m3-bytes" as bytes converted in software
    (sm_80, fp8_bits.py), "e5m2" natively (both)."""
    kv_dt, kv_flag = _FP8_KV[fp8_kv] if fp8_kv else (dt, "")
    key = (dt, head_dim, cfg, causal, window, softcap, page_size, kv_dt, alibi)
    if key in _registered:  # sm_80 and sm_90 tables share some entries
        return
    _registered.add(key)
    flags = "".join(f",{f}" for f, on in (("causal", causal), ("window", window),
                                           ("softcap", softcap), (kv_flag, bool(fp8_kv)),
                                           ("alibi", alibi)) if on)
    paged = f",paged{page_size}" if page_size else ""
    register(KernelSpec(
        name=(f"flash_attn[{dt},d{head_dim},m{cfg.block_m}n{cfg.block_n}"
              f"w{cfg.num_warps}s{cfg.num_stages}{flags}{paged}]"),
        fn=flash_attn_fwd_kernel, signature=_signature(dt, kv_dt),
        constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim),
                    "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "RIGHT_BOUND": causal,
                    "HAS_WINDOW": window, "HAS_SOFTCAP": softcap, "PAGED": bool(page_size),
                    "PAGE_SIZE": page_size or 1,
                    "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "UPCAST": False,
                    "KV_SCALE": bool(fp8_kv), "SCALE_PER_HEAD": bool(fp8_kv),
                    "ALIGNED": head_dim % 8 == 0, "HAS_ALIBI": alibi},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, tensor_core=dt != "fp32",
        archs=archs, wgmma_expected=cfg.block_m >= 64))   # wgmma tiles have 64 rows


for _table in (SM90_CONFIGS, SM80_CONFIGS):
    for _d in (64, 128, 256):
        _register("bf16", _d, _table[_d])
_register("bf16", 128, SM90_CONFIGS[128], causal=False)
_register("fp16", 128, SM90_CONFIGS[128], window=True, softcap=True, page_size=16)
_register("fp16", 64, SM90_CONFIGS[64], window=True, softcap=True, page_size=16)
_register("bf16", 80, SM90_CONFIGS[128])
_register("fp16", 96, SM80_CONFIGS[128], page_size=32)
_register("bf16", 128, SM90_CONFIGS[128], window=True, page_size=24)  # any page size
# head dims that are not a multiple of 8 (FlashAttention accepts any d <= 256): no hints
for _table in (SM90_CONFIGS, SM80_CONFIGS):
    _register("bf16", 59, _table[64])
_register("fp16", 111, UNALIGNED_CONFIGS[128], window=True, page_size=16)
_register("bf16", 250, UNALIGNED_CONFIGS[256])
# ALiBi (FlashAttention's alibi_slopes)
for _table in (SM90_CONFIGS, SM80_CONFIGS):
    _register("bf16", 128, _table[128], alibi=True)
_register("fp16", 64, SM90_CONFIGS[64], causal=False, window=True, softcap=True, page_size=16,
          alibi=True)
# prefill chunks over a paged prefix with ALiBi (BLOOM / MPT) and with a softcap but no
# window (Gemma 2's global layers, D 256)
for _table in (SM90_CONFIGS, SM80_CONFIGS):
    _register("bf16", 128, _table[128], page_size=16, alibi=True)
    _register("bf16", 256, _table[256], page_size=16, softcap=True)
# fp32 (exact dots on FMA units: what fp32 engines, the GPU model tests', run): prefill
# chunks over a paged prefix, pick_config's fp32 tiles, each window / softcap choice
_register("fp32", 64, FP32_NARROW_CONFIG, page_size=16)
_register("fp32", 64, FP32_NARROW_CONFIG, window=True, softcap=True, page_size=16)
for _window in (False, True):
    for _softcap in (False, True):
        _register("fp32", 128, FP32_WIDE_CONFIG, window=_window, softcap=_softcap,
                  page_size=16)
_register("fp32", 256, FP32_WIDE_CONFIG, window=True, softcap=True, page_size=16)
# fp8 KV cache: prefill over an fp8 paged prefix (sm_90a: e4m3 converts natively there;
# sm_80: the cache's bytes, converted in software)
for _arch, _table, _kv in ((90, SM90_CONFIGS, "e4m3"),
                           (80, {**SM80_CONFIGS, **E4M3_BYTES_CONFIGS}, "e4m3-bytes"),
                           (90, SM90_CONFIGS, "e5m2"), (80, SM80_CONFIGS, "e5m2")):
    _register("bf16", 128, _table[128], page_size=16, fp8_kv=_kv, archs=(_arch,))
    _register("bf16", 64, _table[64], page_size=16, fp8_kv=_kv, archs=(_arch,))
    _register("fp16", 128, _table[128], window=True, softcap=True, page_size=16,
              fp8_kv=_kv, archs=(_arch,))
# D in (256, 512] (Gemma 4's full-attention layers): each arch's own table entry, built for
# that arch only (sm_90a's 3-stage tile would leave sm_80 under 1 KB of shared memory)
for _arch, _table in ((90, SM90_CONFIGS), (80, SM80_CONFIGS)):
    _cfg = _table[512]
    for _dt in ("bf16", "fp16"):
        _register(_dt, 512, _cfg, archs=(_arch,))
        _register(_dt, 512, _cfg, page_size=16, archs=(_arch,))   # prefill over a paged prefix
    _register("bf16", 512, _cfg, causal=False, archs=(_arch,))
    _register("fp16", 512, _cfg, window=True, softcap=True, page_size=16, archs=(_arch,))
    _register("bf16", 512, _cfg, alibi=True, archs=(_arch,))
    _register("bf16", 264, _cfg, window=True, archs=(_arch,))      # BLOCK_D 512, masked d
    _kv = "e4m3" if _arch == 90 else "e4m3-bytes"
    _register("bf16", 512, _cfg, page_size=16, fp8_kv=_kv, archs=(_arch,))
    _register("fp16", 512, _cfg, window=True, softcap=True, page_size=16, fp8_kv=_kv,
              archs=(_arch,))
_register("bf16", 300, UNALIGNED_CONFIGS[512])                     # not a multiple of 8
_register("fp16", 300, UNALIGNED_CONFIGS[512], window=True, softcap=True, page_size=16,
          alibi=True)
