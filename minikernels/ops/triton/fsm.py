"""One step of many token automata (structured outputs' "outlines" backend) in Triton.

Algorithm: a 1-D grid over the constrained rows, BLOCK rows per program. Each row reads
its automaton state (through its grammar's slot), its sampled token and the state's
packed table word; an allowed token moves the state to the exception listed for (state,
token) - a binary search over the sorted int64 keys ``state << 32 | token``, ``n_iter``
halvings - or else to the state's default next state; a stop token keeps the state and
marks the slot done. Rows never depend on each other (distinct slots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

BLOCK = 128


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
