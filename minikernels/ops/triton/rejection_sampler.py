"""Speculative-decoding rejection sampler in Triton.

Algorithm: one program per batch row. It walks the row's draft tokens in order; for
draft j it loads p_j(x_j) (and q_j(x_j), or 1 for a point-mass n-gram draft) and accepts
when ``u_j * q < p`` (random rows) or when x_j is the argmax of p_j (greedy rows: one
pass over the vocabulary in BLOCK_V tiles, keeping the first maximum). At the first
rejection the row emits ``argmax(max(0, p_j - q_j) / exp_q)`` (the exponential race over
the residual; p_j when the residual is all zero) and stops; if every draft is accepted it
emits the bonus token from p_n the same way. Slots after the emitted token hold -1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

BLOCK_V = 1024
# 8 warps = 4 vocabulary entries per thread. With 4 warps (8 per thread) triton 3.6's
# ptxas (12.8) spilled 8 bytes on sm_90a (draft_probs=False; the H200 image has 3.6);
# 8 warps compile without spills on 3.6 and 3.9 for sm_80 and sm_90a (40-63 regs).
# The result does not depend on it: max and first-index argmax are exact.
NUM_WARPS = 8


@triton.jit
def _race(p_row, q_row, eq_row, x, V, qscale, greedy, HAS_DRAFT: tl.constexpr,
          BLOCK_V: tl.constexpr):
    """Index of the maximum score over the vocabulary (first index on ties).
    greedy: score = p. Else score = max(0, p - qscale * q) / exp_q (q: draft_probs row, or
    a point mass on x without draft probs), or p / exp_q when that is zero everywhere."""
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64)
    fb = tl.full([], float("-inf"), tl.float32)
    fb_i = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        m = cols < V
        p = tl.load(p_row + cols, mask=m, other=0.0).to(tl.float32)
        eq = tl.load(eq_row + cols, mask=m, other=1.0).to(tl.float32)
        if HAS_DRAFT:
            q = tl.load(q_row + cols, mask=m, other=0.0).to(tl.float32)
        else:
            q = tl.where(cols == x, 1.0, 0.0)
        r = tl.maximum(p - qscale * q, 0.0) / eq
        s = tl.where(m, tl.where(greedy, p, r), float("-inf"))
        f = tl.where(m, tl.maximum(p, 0.0) / eq, float("-inf"))
        bm = tl.max(s, axis=0)
        bi = tl.argmax(s, axis=0).to(tl.int64) + start
        upd = bm > best
        best_i = tl.where(upd, bi, best_i)
        best = tl.where(upd, bm, best)
        fm = tl.max(f, axis=0)
        fi = tl.argmax(f, axis=0).to(tl.int64) + start
        upd_f = fm > fb
        fb_i = tl.where(upd_f, fi, fb_i)
        fb = tl.where(upd_f, fm, fb)
    return tl.where(greedy | (best > 0.0), best_i, fb_i)


@triton.jit
def rejection_sample_kernel(out_ptr, draft_ptr, num_draft_ptr, target_ptr, dprobs_ptr,
                            uniform_ptr, expq_ptr, greedy_ptr, K, V,
                            HAS_DRAFT: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(num_draft_ptr + b).to(tl.int64)
    greedy = tl.load(greedy_ptr + b) != 0
    eq_row = expq_ptr + b * V
    pos = n               # where the final (recovered / bonus) token goes
    for j in range(K):
        if j < pos:       # j < n and nothing rejected yet
            x = tl.load(draft_ptr + b * K + j)
            p_row = target_ptr + (b * (K + 1) + j) * V
            q_row = dprobs_ptr + (b * K + j) * V
            p_x = tl.load(p_row + x).to(tl.float32)
            if HAS_DRAFT:
                q_x = tl.load(q_row + x).to(tl.float32)
            else:
                q_x = 1.0
            u = tl.load(uniform_ptr + b * K + j).to(tl.float32)
            acc = u * q_x < p_x
            if greedy:
                acc = _race(p_row, q_row, eq_row, x, V, 0.0, greedy, HAS_DRAFT,
                            BLOCK_V) == x
            tl.store(out_ptr + b * (K + 1) + j, x)
            if not acc:
                pos = tl.minimum(pos, j)
    # The final token at pos: recovered (rejected at pos < n) or bonus (pos == n).
    p_row = target_ptr + (b * (K + 1) + pos) * V
    q_row = dprobs_ptr + (b * K + tl.maximum(tl.minimum(pos, K - 1), 0)) * V
    x = tl.load(draft_ptr + b * K + pos, mask=pos < n, other=-1)
    qscale = tl.where(pos < n, 1.0, 0.0)
    t = _race(p_row, q_row, eq_row, x, V, qscale, greedy, HAS_DRAFT, BLOCK_V)
    tl.store(out_ptr + b * (K + 1) + pos, t)
    for j in range(K + 1):
        if j > pos:
            tl.store(out_ptr + b * (K + 1) + j, -1)


def rejection_sample(out: torch.Tensor, draft_token_ids: torch.Tensor,
                     num_draft_tokens: torch.Tensor, target_probs: torch.Tensor,
                     draft_probs: torch.Tensor | None, uniform: torch.Tensor,
                     exp_q: torch.Tensor, is_greedy: torch.Tensor) -> None:
    """All inputs contiguous (validated by the op); out int64 [B, K + 1] is written."""
    B, K = draft_token_ids.shape
    if B == 0:
        return
    V = target_probs.shape[-1]
    rejection_sample_kernel[(B,)](
        out, draft_token_ids, num_draft_tokens, target_probs,
        draft_probs if draft_probs is not None else target_probs, uniform, exp_q,
        is_greedy, K, V, HAS_DRAFT=draft_probs is not None and K > 0, BLOCK_V=BLOCK_V,
        num_warps=NUM_WARPS)


for _has_draft in (False, True):
    register(KernelSpec(
        name=f"rejection_sample[draft_probs={_has_draft}]", fn=rejection_sample_kernel,
        signature={"out_ptr": "*i64", "draft_ptr": "*i64", "num_draft_ptr": "*i32",
                   "target_ptr": "*fp32", "dprobs_ptr": "*fp32", "uniform_ptr": "*fp32",
                   "expq_ptr": "*fp32", "greedy_ptr": "*i8", "K": "i32", "V": "i32",
                   "HAS_DRAFT": "constexpr", "BLOCK_V": "constexpr"},
        constexprs={"HAS_DRAFT": _has_draft, "BLOCK_V": BLOCK_V},
        num_warps=NUM_WARPS, num_stages=1))
