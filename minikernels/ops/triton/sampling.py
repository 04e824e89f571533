"""Top-k / min-p / top-p logits masking in Triton, without sorting the vocabulary.

Algorithm: one program per row, streaming the row in BLOCK chunks (a row never has to
fit on chip). Every logit maps to a 32-bit key that orders like the float (``_sort_key``),
so "keep the tokens whose logit is >= a threshold" is "keep keys >= T", and each filter
only has to find its T:

1. one pass: the row max m (kept tokens' weights are e = exp(x - m));
2. top-k: T_k = the k-th largest key, by a radix search from the top 4 bits down: in each
   of 8 passes, count the keys >= each of the 16 candidates prefix | d << shift and keep
   the largest d whose count is still >= k (counts of nested sets: no sort, no scratch);
3. top-p: the same search on kept mass instead of counts finds U = the largest key whose
   kept tokens at or above it hold >= top_p of the kept mass Z (Z summed on the first
   pass); every key >= U is kept, which is exactly "the strictly larger kept tokens hold
   less than top_p" (ties kept together), and U <= the max key keeps the largest logit;
4. one pass writes x where key >= max(T_k, U) and e >= min_p, else -inf.

Passes over the row: 2 + 8 per active filter among top-k and top-p (min-p is a compare).
Rows without a filter skip its passes. Spec: ``reference.top_k_top_p_mask_logits``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

BLOCK = 1024


@triton.jit
def _sort_key(x):
    """fp32 -> uint32 ordered like the floats (-inf lowest; -0.0 and +0.0 equal)."""
    x = tl.where(x == 0.0, 0.0, x)
    u = x.to(tl.uint32, bitcast=True)
    sign = u >> 31
    # negative: flip every bit (larger magnitude -> smaller key); positive: set the top bit.
    # (u ^ 0xFFFFFFFF, not ~u: triton 3.6's interpreter inverts through a -1 that numpy 2
    # refuses for uint32.)
    return tl.where(sign == 1, u ^ 0xFFFFFFFF, u | 0x80000000)


@triton.jit
def _load_row(row_ptr, start, V, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    in_row = cols < V
    x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    return cols, in_row, x


@triton.jit
def top_k_top_p_mask_kernel(logits_ptr, out_ptr, top_k_ptr, top_p_ptr, min_p_ptr, V,
                            logits_row_stride, out_row_stride,
                            HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
                            HAS_MIN_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    digits = tl.arange(0, 16).to(tl.uint32)

    # -- 1. row max (a row of -inf gets m = 0: every weight is then 0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        cols, in_row, x = _load_row(row_ptr, start, V, BLOCK)
        m = tl.maximum(m, x)
    m = tl.max(m, axis=0)
    max_key = _sort_key(m)
    m = tl.where(m == float("-inf"), 0.0, m)

    # -- 2. top-k threshold T_k (0 = keep all)
    t_k = tl.zeros([], tl.uint32)
    if HAS_TOP_K:
        k = tl.load(top_k_ptr + row).to(tl.int64)
        if (k > 0) & (k < V):
            for p in tl.static_range(8):            # 4-bit digits, top first
                shift = 28 - 4 * p
                cand = t_k | (digits << shift)
                count = tl.zeros([16], tl.int32)
                for start in range(0, V, BLOCK):
                    cols, in_row, x = _load_row(row_ptr, start, V, BLOCK)
                    key = _sort_key(x)
                    ge = (key[:, None] >= cand[None, :]) & in_row[:, None]
                    count += tl.sum(ge.to(tl.int32), axis=0)
                # counts shrink as d grows: the number of candidates still >= k, minus 1
                d = tl.sum((count >= k).to(tl.int32), axis=0) - 1
                t_k = t_k | (tl.maximum(d, 0).to(tl.uint32) << shift)

    min_p = 0.0
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + row).to(tl.float32)

    # -- 3. top-p threshold U on the mass kept by top-k and min-p (0 = keep all)
    t_p = tl.zeros([], tl.uint32)
    if HAS_TOP_P:
        top_p = tl.load(top_p_ptr + row).to(tl.float32)
        if top_p < 1.0:
            target = 0.0
            for p in tl.static_range(8):            # 4-bit digits, top first
                shift = 28 - 4 * p
                cand = t_p | (digits << shift)
                mass = tl.zeros([16], tl.float32)
                total = tl.zeros([BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    cols, in_row, x = _load_row(row_ptr, start, V, BLOCK)
                    key = _sort_key(x)
                    e = tl.exp(x - m)
                    e = tl.where(in_row & (key >= t_k) & (e >= min_p), e, 0.0)
                    if p == 0:
                        total += e
                    mass += tl.sum(tl.where(key[:, None] >= cand[None, :], e[:, None], 0.0),
                                   axis=0)
                if p == 0:
                    target = top_p * tl.sum(total, axis=0)
                # mass of nested sets shrinks as d grows (same terms, same order)
                d = tl.sum((mass >= target).to(tl.int32), axis=0) - 1
                t_p = t_p | (tl.maximum(d, 0).to(tl.uint32) << shift)
            t_p = tl.minimum(t_p, max_key)          # the largest logit always stays

    # -- 4. write: kept logits unchanged, the rest -inf
    threshold = tl.maximum(t_k, t_p)
    out_row = out_ptr + row * out_row_stride
    for start in range(0, V, BLOCK):
        cols, in_row, x = _load_row(row_ptr, start, V, BLOCK)
        keep = _sort_key(x) >= threshold
        if HAS_MIN_P:
            keep = keep & (tl.exp(x - m) >= min_p)
        y = tl.where(keep, x, float("-inf"))      # exact: x is the logit widened
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=in_row)


def top_k_top_p_mask_logits(out: torch.Tensor, logits: torch.Tensor,
                            top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                            min_p: torch.Tensor | None) -> None:
    """out [B, V] (contiguous) <- masked logits [B, V] (unit column stride); per-row
    top_k int32 [B], top_p / min_p fp32 [B] (contiguous), None = off for every row."""
    B, V = logits.shape
    if B == 0 or V == 0:
        return
    block = min(BLOCK, max(16, triton.next_power_of_2(V)))
    top_k_top_p_mask_kernel[(B,)](
        logits, out, top_k if top_k is not None else out, top_p if top_p is not None else out,
        min_p if min_p is not None else out, V, logits.stride(0), out.stride(0),
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None,
        HAS_MIN_P=min_p is not None, BLOCK=block, num_warps=8 if block >= 1024 else 4)


for _dt in ("fp32", "bf16"):
    for _k, _p, _m in ((True, True, False), (False, True, False), (True, False, False),
                       (True, True, True)):
        register(KernelSpec(
            name=f"top_k_top_p_mask[{_dt},k={_k},p={_p},min_p={_m}]",
            fn=top_k_top_p_mask_kernel,
            signature={"logits_ptr": f"*{_dt}", "out_ptr": f"*{_dt}", "top_k_ptr": "*i32",
                       "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "V": "i32",
                       "logits_row_stride": "i64", "out_row_stride": "i64",
                       "HAS_TOP_K": "constexpr", "HAS_TOP_P": "constexpr",
                       "HAS_MIN_P": "constexpr", "BLOCK": "constexpr"},
            constexprs={"HAS_TOP_K": _k, "HAS_TOP_P": _p, "HAS_MIN_P": _m, "BLOCK": BLOCK},
            num_warps=8, num_stages=1))
