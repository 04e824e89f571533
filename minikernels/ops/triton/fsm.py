"""Token automata (structured outputs' "outlines" backend) in Triton: one step of many
automata (fsm_advance), and the logits mask of their states (fsm_mask_logits).

fsm_advance: a 1-D grid over the constrained rows, BLOCK rows per program. Each row reads
its automaton state (through its grammar's slot), its sampled token and the state's
packed table word; an allowed token moves the state to the exception listed for (state,
token) - a binary search over the sorted int64 keys ``state << 32 | token``, ``n_iter``
halvings - or else to the state's default next state; a stop token keeps the state and
marks the slot done. Rows never depend on each other (distinct slots).

fsm_mask_logits: a 2-D grid over (constrained row, vocab block), as the bitmask kernel
(ops/triton/bitmask.py), with one more indirection: each program reads its row's slot,
the slot's state, and BLOCK // 32 words of that state's table row, expands them to bits
and stores -inf where a bit is 0 or the column is past the vocabulary; allowed logits are
never written, and the mask is never materialised per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

BLOCK = 128
MASK_BLOCK = 4096


@triton.jit
def fsm_advance_kernel(state_ptr, codes_ptr, out_ptr, slots_ptr, rows_ptr, tokens_ptr,
                       table_ptr, default_ptr, exc_keys_ptr, exc_next_ptr, eos_ptr,
                       n_rows, vocab_size, table_row_stride, n_exc, n_iter,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_rows
    slot = tl.load(slots_ptr + offs, mask=m, other=0).to(tl.int64)
    row = tl.load(rows_ptr + offs, mask=m, other=0).to(tl.int64)
    tok = tl.load(tokens_ptr + row, mask=m, other=-1).to(tl.int64)
    s = tl.load(state_ptr + slot, mask=m, other=0)
    c = tl.load(codes_ptr + slot, mask=m, other=0).to(tl.int32)
    in_vocab = (tok >= 0) & (tok < vocab_size)
    safe = tl.where(in_vocab, tok, 0)
    word = tl.load(table_ptr + s * table_row_stride + (safe >> 5), mask=m, other=0)
    bit = (word >> (safe & 31).to(tl.int32)) & 1
    ok = m & in_vocab & (c == 0) & (bit != 0)
    stop = ok & (tl.load(eos_ptr + safe, mask=m, other=0) != 0)
    # the exception for (state, token), if any: lower bound of key in the sorted keys
    key = (s << 32) | safe
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + n_exc
    for _ in range(n_iter):
        live = lo < hi
        mid = (lo + hi) // 2
        k_mid = tl.load(exc_keys_ptr + mid, mask=m & live, other=0)
        right = k_mid < key
        lo = tl.where(live & right, mid + 1, lo)
        hi = tl.where(live & (k_mid >= key), mid, hi)
    inside = lo < n_exc
    hit = inside & (tl.load(exc_keys_ptr + lo, mask=m & inside, other=-1) == key)
    nxt = tl.where(hit, tl.load(exc_next_ptr + lo, mask=m & hit, other=0),
                   tl.load(default_ptr + s, mask=m, other=0))
    tl.store(state_ptr + slot, tl.where(ok & (stop == 0), nxt, s), mask=m)
    tl.store(codes_ptr + slot, tl.where(stop, 1, c).to(tl.int8), mask=m)
    tl.store(out_ptr + offs, tl.where(ok, stop.to(tl.int32), 2).to(tl.int8), mask=m)


def fsm_advance(state: torch.Tensor, codes: torch.Tensor, slots: torch.Tensor,
                rows: torch.Tensor, tokens: torch.Tensor, table: torch.Tensor,
                default: torch.Tensor, exc_keys: torch.Tensor, exc_next: torch.Tensor,
                eos: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Contiguous int64 state / int8 codes (in place), slots / rows / tokens (contiguous
    int32 or int64), table int32 [N, W] (unit column stride), default / exc_keys /
    exc_next int64, eos uint8 [V]; returns int8 [R]."""
    n = slots.shape[0]
    out = torch.empty(n, dtype=torch.int8, device=slots.device)
    if n == 0:
        return out
    n_exc = exc_keys.shape[0]
    keys = exc_keys if n_exc else default           # (never read without exceptions)
    fsm_advance_kernel[(triton.cdiv(n, BLOCK),)](
        state, codes, out, slots, rows, tokens, table, default, keys,
        exc_next if n_exc else default, eos, n, vocab_size, table.stride(0), n_exc,
        max(n_exc, 1).bit_length(), BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def fsm_mask_logits_kernel(logits_ptr, state_ptr, slots_ptr, rows_ptr, table_ptr,
                           n_cols, vocab_size, logits_row_stride, table_row_stride,
                           BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    s = tl.load(state_ptr + tl.load(slots_ptr + i).to(tl.int64))
    start = tl.program_id(1) * BLOCK
    words = start // 32 + tl.arange(0, BLOCK // 32)
    packed = tl.load(table_ptr + s * table_row_stride + words,
                     mask=words * 32 < vocab_size, other=0)
    bits = (packed[:, None] >> tl.arange(0, 32)[None, :]) & 1          # [BLOCK/32, 32]
    cols = start + tl.arange(0, BLOCK)
    blocked = tl.reshape(bits == 0, [BLOCK]) | (cols >= vocab_size)
    # fp32 -inf, cast by the store to the logits' dtype (see ops/triton/bitmask.py)
    tl.store(logits_ptr + row * logits_row_stride + cols,
             tl.full([BLOCK], float("-inf"), tl.float32), mask=blocked & (cols < n_cols))


def fsm_mask_logits(logits: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
                    rows: torch.Tensor, table: torch.Tensor, vocab_size: int) -> None:
    """logits [B, V] (unit column stride), state int64 [S] contiguous, slots / rows
    contiguous int32 or int64 [R], table int32 [N, W] (unit column stride); vocab_size
    <= 32 * W. In place."""
    n, cols = rows.shape[0], logits.shape[1]
    if n == 0 or cols == 0:
        return
    grid = (n, triton.cdiv(cols, MASK_BLOCK))
    fsm_mask_logits_kernel[grid](
        logits, state, slots, rows, table, cols, vocab_size, logits.stride(0),
        table.stride(0), BLOCK=MASK_BLOCK, num_warps=4)


for _idx in ("i32", "i64"):
    for _tok in ("i32", "i64"):
        register(KernelSpec(
            name=f"fsm_advance[slots={_idx},tokens={_tok}]", fn=fsm_advance_kernel,
            signature={"state_ptr": "*i64", "codes_ptr": "*i8", "out_ptr": "*i8",
                       "slots_ptr": f"*{_idx}", "rows_ptr": f"*{_idx}",
                       "tokens_ptr": f"*{_tok}", "table_ptr": "*i32", "default_ptr": "*i64",
                       "exc_keys_ptr": "*i64", "exc_next_ptr": "*i64", "eos_ptr": "*u8",
                       "n_rows": "i32", "vocab_size": "i32", "table_row_stride": "i64",
                       "n_exc": "i64", "n_iter": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, num_warps=4, num_stages=1))

for _dt in ("fp32", "fp16", "bf16"):
    for _idx in ("i32", "i64"):
        register(KernelSpec(
            name=f"fsm_mask_logits[{_dt},idx={_idx}]", fn=fsm_mask_logits_kernel,
            signature={"logits_ptr": f"*{_dt}", "state_ptr": "*i64", "slots_ptr": f"*{_idx}",
                       "rows_ptr": f"*{_idx}", "table_ptr": "*i32", "n_cols": "i32",
                       "vocab_size": "i32", "logits_row_stride": "i64",
                       "table_row_stride": "i64", "BLOCK": "constexpr"},
            constexprs={"BLOCK": MASK_BLOCK}, num_warps=4, num_stages=1))
