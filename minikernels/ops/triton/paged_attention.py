"""Paged decode attention (one query token per sequence) with split-KV, in Triton.

Algorithm (flash-decoding over a paged cache, GQA-aware):
  grid = (batch, kv_heads, splits). A program owns one sequence, one KV head and one
  contiguous range of that sequence's tokens (a *split*). It loads the GROUP query heads
  that share the KV head as one [GROUP_PAD >= 16, D] tile, so every K/V page is read once
  and QK^T / PV run on tensor cores (tl.dot). It walks its range BLOCK_N tokens at a time:
  token t lives at page block_table[b, t // block_size], row t % block_size; scores are
  scaled (and soft-capped; with ALiBi each head's -slope * (seq_len - 1 - t) added),
  masked outside [window start, seq_len), and folded into an
  online softmax in base 2 (running max m, sum l, accumulator acc).
  One split (SPLIT=False): the program writes acc / l to the output and ln-LSE to lse.
  Several splits: it writes acc / l (fp32) and its base-2 LSE m + log2(l); a second kernel
  (paged_merge_kernel, grid (batch, q_heads)) combines the splits of each row:
  out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M), M = max_i lse_i, and the row's
  LSE ln 2 * (M + log2 sum_i 2^(lse_i - M)).
FP8 caches (float8_e4m3fn, KV_SCALE): tiles are converted to q's dtype (exact: every e4m3
value is an fp16 / bf16 value); the kv head's k_scale folds into the score scale and its
v_scale multiplies acc / l, so the result is attention over k * k_scale, v * v_scale.
Without e4m3 hardware (sm_80) the caches come as bytes (int8 views), decoded in software
to value / 256 (fp8_bits.py), the 256 folded into both scales.
K and V have their own strides; block_size is any size (page = t // block_size).

Split ranges depend only on the sequence's own length (see _split_plan), never on the
batch: with a fixed num_splits or a fixed split_size a sequence's output is bitwise the
same whatever batch it is in. Splits are multiples of BLOCK_N, which depends only on the
head dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from . import fp8_bits
from .fp8_bits import byte_scale, fp8_tile_to
from .registry import KernelSpec, register

LOG2E = 1.4426950408889634


@triton.jit
def _split_plan(seq_len, window_left, num_splits, split_size, BLOCK_N: tl.constexpr):
    """-> (first visible token, tile-aligned start, tokens per split, valid splits)."""
    win_lo = seq_len * 0
    if window_left >= 0:
        win_lo = tl.maximum(seq_len - 1 - window_left, 0)
    lo = (win_lo // BLOCK_N) * BLOCK_N
    span = seq_len - lo
    if split_size > 0:
        chunk = split_size
    else:
        chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, BLOCK_N)
    n_valid = tl.cdiv(span, chunk)
    return win_lo, lo, chunk, n_valid


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at +-inf, no libdevice dependency.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, opart_ptr, lse_ptr, lse_out_ptr,
        ks_ptr, vs_ptr, al_ptr, stride_al, scale, softcap, window_left, num_splits, split_size,
        max_splits,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
        stride_vh, stride_bt, stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr, KV_SCALE: tl.constexpr, SCALE_PER_HEAD: tl.constexpr,
        ALIGNED: tl.constexpr, HAS_ALIBI: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    win_lo, lo, chunk, n_valid = _split_plan(seq_len, window_left, num_splits, split_size,
                                             BLOCK_N)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    row_mask = rows < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + rows
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    qk_scale = scale
    v_scale = 1.0
    if KV_SCALE:  # fp8 cache: dequantize by folding the scales (see module doc)
        if SCALE_PER_HEAD:
            qk_scale = scale * tl.load(ks_ptr + kvh)
            v_scale = tl.load(vs_ptr + kvh)
        else:
            qk_scale = scale * tl.load(ks_ptr)
            v_scale = tl.load(vs_ptr)
        qk_scale = qk_scale * byte_scale(k_ptr)   # a cache read as bytes holds value / 256
        v_scale = v_scale * byte_scale(v_ptr)

    if HAS_ALIBI:  # each q head's slope (slopes [Hq], or [B, Hq] with stride_al), log2 domain
        alibi = tl.load(al_ptr + b.to(tl.int64) * stride_al + heads, mask=row_mask,
                        other=0.0) * 1.4426950408889634

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_head = kvh.to(tl.int64) * stride_kh
    v_head = kvh.to(tl.int64) * stride_vh
    for t0 in range(start, end, BLOCK_N):
        offs = t0 + tl.arange(0, BLOCK_N)
        in_seq = offs < end
        visible = in_seq & (offs >= win_lo)
        page = tl.load(bt_row + offs // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
        in_page = (offs % BLOCK_SIZE).to(tl.int64)
        k_off = page * stride_kb + in_page * stride_kt + k_head
        v_off = page * stride_vb + in_page * stride_vt + v_head
        kv_mask = visible[:, None] & d_mask[None, :]
        k_ptrs = k_ptr + k_off[:, None] + d[None, :]
        v_ptrs = v_ptr + v_off[:, None] + d[None, :]
        if ALIGNED:
            # Rows start 16-byte aligned (the launcher checked: pointer and strides). The
            # JIT infers this; the hint keeps ahead-of-time builds vectorized too.
            k_ptrs = tl.multiple_of(k_ptrs, [1, 16])
            v_ptrs = tl.multiple_of(v_ptrs, [1, 16])
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        if KV_SCALE:
            k = fp8_tile_to(k, q_ptr.dtype.element_ty)
        if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong; same values in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)    # [GROUP_PAD, BLOCK_N]
        if SOFTCAP:
            s = softcap * _tanh(s * (qk_scale / softcap)) * 1.4426950408889634
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if HAS_ALIBI:  # -slope * (seq_len - 1 - t): distance from the newest token
            s += alibi[:, None] * (offs - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if KV_SCALE:
            v = fp8_tile_to(v, q_ptr.dtype.element_ty)
        if DOT_F32:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    o = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    out_mask = row_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # partials: o [B, Hq, max_splits, D] fp32, lse [B, Hq, max_splits] (base 2)
        prow = (b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * max_splits + split
        rows_valid = row_mask & ((rows * 0 + split) < n_valid)   # programs past n_valid idle
        tl.store(opart_ptr + prow[:, None] * HEAD_DIM + d[None, :], o,
                 mask=rows_valid[:, None] & d_mask[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + prow, lse, mask=rows_valid)
    else:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))  # natural log; lse_out [B, Hq] contiguous
        tl.store(lse_out_ptr + b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads, lse,
                 mask=row_mask)


@triton.jit
def paged_merge_kernel(opart_ptr, lse_ptr, lens_ptr, out_ptr, lse_out_ptr, window_left,
                       num_splits, split_size, max_splits, n_q_heads, stride_ob, stride_oh,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    win_lo, lo, chunk, n_valid = _split_plan(seq_len, window_left, num_splits, split_size,
                                             BLOCK_N)
    row = (b.to(tl.int64) * n_q_heads + h) * max_splits
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    m = float("-inf")
    for i in range(0, n_valid):
        m = tl.maximum(m, tl.load(lse_ptr + row + i))
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    total = 0.0
    for i in range(0, n_valid):
        w = tl.exp2(tl.load(lse_ptr + row + i) - m)
        acc += w * tl.load(opart_ptr + (row + i) * HEAD_DIM + d, mask=d_mask, other=0.0)
        total += w
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
             o.to(out_ptr.dtype.element_ty), mask=d_mask)
    lse = tl.where(total > 0, (m + tl.log2(tl.where(total > 0, total, 1.0)))
                   * 0.6931471805599453, float("-inf"))
    tl.store(lse_out_ptr + b.to(tl.int64) * n_q_heads + h, lse)


def block_n(head_dim: int) -> int:
    """Tokens per tile: depends on the head dim only (batch invariance relies on it).

    D in (256, 512] keeps 32: a [GROUP_PAD, 512] fp32 accumulator over 8 warps is 64
    registers a thread, and the whole kernel stays at 108-162 registers without spills
    (sm_80 / sm_90a, fp8 caches included) with ~82 KB of shared memory (bf16 K and V tiles
    of 32 x 512), so no smaller tile is needed for Gemma 4's full-attention layers.
    """
    return 32 if head_dim > 128 else 64  # = kv_cache.tile_tokens


def _d_pad(head_dim: int) -> int:
    """Head dim padded for tl.dot (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def rows_aligned(cache: torch.Tensor) -> bool:
    """Every cache row (one token of one kv head) starts 16-byte aligned."""
    e = cache.element_size()
    return cache.data_ptr() % 16 == 0 and all(s * e % 16 == 0 for s in cache.stride()[:3])


def _group_pad(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def _num_warps(head_dim: int, group_pad: int, fp8_kv: bool = False,
               aligned: bool = True, fp32: bool = False) -> int:
    # fp8 tiles convert to 16-bit in registers, and unaligned rows load element by element
    # through registers: at D >= 128 four warps spill (sm_80 / sm_90a, 3 stages); fp32
    # tiles are twice the registers of 16-bit ones
    if fp32:
        return 16 if _d_pad(head_dim) * group_pad >= 128 * 16 else 8
    if (fp8_kv or not aligned) and _d_pad(head_dim) * group_pad >= 128 * 16:
        return 8
    return 8 if head_dim * group_pad >= 256 * 32 else 4


NUM_STAGES = 3  # cp.async pipeline depth over KV tiles (~55 KB smem at D=128)


def _num_stages(fp32: bool) -> int:
    """Pipeline depth: fp32 K / V tiles (exact dots on FMA units, for fp32 model tests
    and checks) take one stage: three would need ~200 KB of shared memory at D=128."""
    return 1 if fp32 else NUM_STAGES


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window_left: int, softcap: float, grid_splits: int,
                           num_splits: int, split_size: int, use_split: bool,
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None,
                           alibi_slopes: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch (see module doc) -> (out [B, Hq, D] q.dtype, lse [B, Hq] fp32 natural log).

    grid_splits: programs per (seq, kv head); num_splits / split_size: the per-sequence
    split rule; use_split: write partials and merge. Caches: own strides each (vector
    hints when every row is 16-byte aligned); fp8 caches with k_scale / v_scale fp32 (numel
    1 or Hkv); alibi_slopes fp32 [Hq] or [B, Hq] (last dim contiguous) or None.
    """
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    bn = block_n(d)
    gp = _group_pad(group)
    d_pad = _d_pad(d)
    out = _alloc.empty((bsz, hq, d), q.dtype, q.device)
    lse_out = _alloc.empty((bsz, hq), torch.float32, q.device)
    if bsz == 0 or hq == 0:
        return out, lse_out
    fp32 = q.dtype == torch.float32
    prec = "ieee" if fp32 else "tf32"
    if use_split:
        opart = _alloc.empty((bsz, hq, grid_splits, d), torch.float32, q.device)
        lse = _alloc.empty((bsz, hq, grid_splits), torch.float32, q.device)
    else:
        opart = lse = lse_out  # unused
    kv_scale = k_scale is not None
    # sm_80: fp8 caches as bytes
    k_cache, v_cache = fp8_bits.kernel_view(k_cache), fp8_bits.kernel_view(v_cache)
    aligned = rows_aligned(k_cache) and rows_aligned(v_cache)
    has_alibi = alibi_slopes is not None
    paged_decode_kernel[(bsz, hkv, grid_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, opart, lse, lse_out,
        k_scale if kv_scale else lse_out, v_scale if kv_scale else lse_out,
        alibi_slopes if has_alibi else lse_out,
        alibi_slopes.stride(0) if has_alibi and alibi_slopes.ndim == 2 else 0, scale, softcap if softcap > 0 else 1.0, window_left, num_splits, split_size,
        grid_splits, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=gp, HEAD_DIM=d, D_PAD=d_pad, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=bn, SOFTCAP=softcap > 0, SPLIT=use_split, DOT_PRECISION=prec,
        DOT_F32=not q.is_cuda and q.dtype == torch.bfloat16, KV_SCALE=kv_scale,
        SCALE_PER_HEAD=kv_scale and k_scale.numel() > 1, ALIGNED=aligned, HAS_ALIBI=has_alibi,
        num_warps=_num_warps(d, gp, kv_scale, aligned, fp32), num_stages=_num_stages(fp32))
    if use_split:
        paged_merge_kernel[(bsz, hq)](
            opart, lse, seq_lens, out, lse_out, window_left, num_splits, split_size,
            grid_splits, hq, out.stride(0), out.stride(1), HEAD_DIM=d, D_PAD=d_pad, BLOCK_N=bn,
            num_warps=1)
    return out, lse_out


def _decode_signature(dt: str, cache_dt: str) -> dict[str, str]:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{cache_dt}", "v_ptr": f"*{cache_dt}",
           "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": f"*{dt}", "opart_ptr": "*fp32",
           "lse_ptr": "*fp32", "lse_out_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
           "al_ptr": "*fp32", "stride_al": "i64", "scale": "fp32", "softcap": "fp32"}
    for name in ("window_left", "num_splits", "split_size", "max_splits"):
        sig[name] = "i32"
    for name in ("stride_qb", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb",
                 "stride_vt", "stride_vh", "stride_bt", "stride_ob", "stride_oh"):
        sig[name] = "i64"
    for name in ("GROUP", "GROUP_PAD", "HEAD_DIM", "D_PAD", "BLOCK_SIZE", "BLOCK_N", "SOFTCAP",
                 "SPLIT", "DOT_PRECISION", "DOT_F32", "KV_SCALE", "SCALE_PER_HEAD", "ALIGNED",
                 "HAS_ALIBI"):
        sig[name] = "constexpr"
    return sig


def _register() -> None:
    # (q dtype, cache dtype, archs): fp8 caches as e4m3 on sm_90a, as bytes (converted in
    # software, fp8_bits.py) on sm_80, e5m2 natively on both; fp32 (exact dots, one stage: what an fp32 engine's
    # decode graphs run) on both archs.
    combos = [("fp16", "fp16", (80, 90)), ("bf16", "bf16", (80, 90)),
              ("bf16", "fp8e4nv", (90,)), ("fp16", "fp8e4nv", (90,)),
              ("bf16", "i8", (80,)), ("fp16", "i8", (80,)),
              ("bf16", "fp8e5", (80, 90)), ("fp16", "fp8e5", (80, 90)),
              ("fp32", "fp32", (80, 90))]
    shapes = ((4, 128, 16), (8, 128, 16), (1, 64, 16), (4, 256, 16), (7, 128, 32),
              (16, 128, 16), (4, 128, 24), (4, 111, 16), (4, 250, 16),  # 111, 250: unaligned
              (4, 512, 16), (8, 512, 16), (4, 300, 16))  # Gemma 4's full layers; 300 unaligned
    fp32_shapes = ((4, 128, 16), (8, 128, 16), (1, 64, 16), (4, 256, 16), (4, 111, 16),
                   (4, 512, 16))
    for dt, cdt, archs in combos:
        fp8, fp32 = cdt != dt, dt == "fp32"
        for group, d, bs in (fp32_shapes if fp32 else shapes):
            for split, softcap, alibi in ((False, False, False), (True, False, False),
                                      (False, True, False), (True, True, False),
                                      (False, False, True), (True, False, True)):
                # softcaps (Gemma 2: D 256, its 2 q heads per kv head padded to the same
                # 16-row tile as 4) at D 128 / 256 / 512, with and without split-KV
                if softcap and (d not in (128, 256, 512) or group != 4):
                    continue
                if alibi and (fp8 or d not in (128, 512) or group != 4 or bs != 16):
                    continue
                if fp8 and (bs == 24 or group in (7, 16) or d % 8
                            or (softcap and dt == "fp16")):
                    continue
                if cdt == "fp8e5" and (d not in (64, 128) or group == 1):
                    continue     # e5m2 converts like e4m3 does natively: a sample
                gp = _group_pad(group)
                kv = f"{dt}" if not fp8 else f"{dt},kv={cdt}"
                register(KernelSpec(
                    name=f"paged_decode[{kv},G={group},D={d},bs={bs},split={split},"
                         f"softcap={softcap}{',alibi' if alibi else ''}]",
                    fn=paged_decode_kernel, signature=_decode_signature(dt, cdt),
                    constexprs={"GROUP": group, "GROUP_PAD": gp, "HEAD_DIM": d,
                                "D_PAD": _d_pad(d), "BLOCK_SIZE": bs,
                                "BLOCK_N": block_n(d), "SOFTCAP": softcap,
                                "SPLIT": split,
                                "DOT_PRECISION": "ieee" if fp32 else "tf32",
                                "DOT_F32": False, "KV_SCALE": fp8,
                                "SCALE_PER_HEAD": fp8 and group == 4,
                                "ALIGNED": d % 8 == 0, "HAS_ALIBI": alibi},
                    num_warps=_num_warps(d, gp, fp8, d % 8 == 0, fp32),
                    num_stages=_num_stages(fp32), tensor_core=not fp32, archs=archs,
                    # M = GROUP_PAD = 16 rows: Triton may pick mma.sync over wgmma.
                    wgmma_expected=False))
    for dt in ("fp16", "bf16", "fp32"):
        for d in (64, 128, 256, 512):
            register(KernelSpec(
                name=f"paged_merge[{dt},D={d}]", fn=paged_merge_kernel,
                signature={"opart_ptr": "*fp32", "lse_ptr": "*fp32", "lens_ptr": "*i32",
                           "out_ptr": f"*{dt}", "lse_out_ptr": "*fp32", "window_left": "i32",
                           "num_splits": "i32", "split_size": "i32", "max_splits": "i32",
                           "n_q_heads": "i32", "stride_ob": "i64", "stride_oh": "i64",
                           "HEAD_DIM": "constexpr", "D_PAD": "constexpr",
                           "BLOCK_N": "constexpr"},
                constexprs={"HEAD_DIM": d, "D_PAD": d, "BLOCK_N": block_n(d)},
                num_warps=1, num_stages=1))


_register()
