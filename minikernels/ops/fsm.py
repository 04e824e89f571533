"""Op family: structured outputs. Ops: ``minikernels::fsm_advance`` (state updated in
place) and ``minikernels::fsm_mask_logits`` (logits masked in place).

One decode step of many token automata at once (the "outlines" structured-outputs
backend keeps them on the device: engine/structured_fsm.py): each constrained row's
automaton, in its grammar's slot, takes the row's sampled token. Layouts (N states of
all automata stacked, W = ceil(V / 32) words, E exceptions, S slots, R rows, B sampled
rows):

    state     int64 [S]     each slot's global state id (in place)
    codes     int8  [S]     0 running, 1 done: it accepted a stop token (in place)
    slots     int32 / int64 [R]  each row's slot (distinct)
    rows      int32 / int64 [R]  each row's index into ``tokens``
    tokens    int32 / int64 [B]  the sampled tokens
    table     int32 [N, W]  allowed tokens per state (bit t % 32 of word t // 32)
    default   int64 [N]     the next state of an allowed token without an exception
    exc_keys  int64 [E]     sorted ``state << 32 | token`` of the exceptions ...
    exc_next  int64 [E]     ... and their next states
    eos       bool  [V]     stop tokens (in final states: accepted, the state kept)

Returns int8 [R]: 0 the token moved the automaton on, 1 it was a stop token (now done),
2 refused (not allowed, out of range, or the slot was done; nothing changes). Spec:
:func:`minikernels.ops.reference.fsm_advance`.

``fsm_mask_logits(logits, state, slots, rows, table, vocab_size)`` masks the logits of
the same rows before sampling, straight from the automata: logits [B, V] float (rows
``rows``, distinct) get -inf wherever bit t of ``table[state[slots[i]]]`` is 0, and past
the vocabulary (a padded lm_head), in one launch - no per-row bitmask is gathered. Spec:
:func:`minikernels.ops.reference.fsm_mask_logits`.

Backends: reference, triton (ops/triton/fsm.py). Tests: tests/test_fsm_advance.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import (FLOAT_DTYPES, check_index_range, check_tensor,
                           index_checks_active)
from . import reference

_INDEX = (torch.int32, torch.int64)


def fsm_advance_unchecked(state: Tensor, codes: Tensor, slots: Tensor, rows: Tensor,
                          tokens: Tensor, table: Tensor, default: Tensor, exc_keys: Tensor,
                          exc_next: Tensor, eos: Tensor, vocab_size: int) -> Tensor:
    """:func:`fsm_advance` on the backend's implementation directly: no checks and no
    dispatcher (tens of microseconds of host time per call). For a caller that built every
    array itself (the engine's automata bank): contiguous, dtypes and ranges right."""
    if _backend.resolve("fsm_advance", state.device) == "triton":
        from .triton import fsm as triton_fsm
        return triton_fsm.fsm_advance(state, codes, slots, rows, tokens, table, default,
                                      exc_keys, exc_next, eos.view(torch.uint8), vocab_size)
    return reference.fsm_advance(state, codes, slots, rows, tokens, table, default,
                                 exc_keys, exc_next, eos, vocab_size)


@torch.library.custom_op("minikernels::fsm_advance", mutates_args=("state", "codes"))
def _fsm_advance(state: Tensor, codes: Tensor, slots: Tensor, rows: Tensor, tokens: Tensor,
                 table: Tensor, default: Tensor, exc_keys: Tensor, exc_next: Tensor,
                 eos: Tensor, vocab_size: int) -> Tensor:
    return fsm_advance_unchecked(state, codes, slots, rows, tokens, table, default,
                                 exc_keys, exc_next, eos, vocab_size)


@_fsm_advance.register_fake
def _(state: Tensor, codes: Tensor, slots: Tensor, rows: Tensor, tokens: Tensor,
      table: Tensor, default: Tensor, exc_keys: Tensor, exc_next: Tensor, eos: Tensor,
      vocab_size: int) -> Tensor:
    return torch.empty(slots.shape, dtype=torch.int8, device=slots.device)


def fsm_advance(state: Tensor, codes: Tensor, slots: Tensor, rows: Tensor, tokens: Tensor,
                table: Tensor, default: Tensor, exc_keys: Tensor, exc_next: Tensor,
                eos: Tensor, vocab_size: int | None = None) -> Tensor:
    """Advance the automata of ``slots`` by ``tokens[rows]`` (module docstring); state and
    codes must be contiguous (they are written in place); other tensors may be views.
    vocab_size: tokens at or past it are refused (default: eos's length)."""
    check_tensor("state", state, dtypes=(torch.int64,), ndim=1)
    dev = state.device
    check_tensor("codes", codes, dtypes=(torch.int8,), ndim=1, device=dev)
    for name, t in (("state", state), ("codes", codes)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    if codes.shape[0] != state.shape[0]:
        raise ValueError(f"codes must have one entry per slot ({state.shape[0]}), got "
                         f"{codes.shape[0]}")
    check_tensor("slots", slots, dtypes=_INDEX, ndim=1, device=dev)
    check_tensor("rows", rows, dtypes=_INDEX, ndim=1, device=dev)
    if rows.shape != slots.shape:
        raise ValueError(f"rows must match slots' shape {list(slots.shape)}, got "
                         f"{list(rows.shape)}")
    check_tensor("tokens", tokens, dtypes=_INDEX, ndim=1, device=dev)
    check_tensor("table", table, dtypes=(torch.int32,), ndim=2, device=dev)
    n = table.shape[0]
    check_tensor("default", default, dtypes=(torch.int64,), ndim=1, device=dev)
    if default.shape[0] != n:
        raise ValueError(f"default must have one entry per table row ({n}), got "
                         f"{default.shape[0]}")
    check_tensor("exc_keys", exc_keys, dtypes=(torch.int64,), ndim=1, device=dev)
    check_tensor("exc_next", exc_next, dtypes=(torch.int64,), ndim=1, device=dev)
    if exc_next.shape != exc_keys.shape:
        raise ValueError(f"exc_next must match exc_keys' shape {list(exc_keys.shape)}, got "
                         f"{list(exc_next.shape)}")
    check_tensor("eos", eos, dtypes=(torch.bool,), ndim=1, device=dev)
    if vocab_size is None:
        vocab_size = eos.shape[0]
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or \
            not 0 <= vocab_size <= min(eos.shape[0], 32 * table.shape[1]):
        raise ValueError(f"vocab_size must be an int in [0, min(len(eos), 32 * table "
                         f"words)], got {vocab_size!r}")
    check_index_range("slots", slots, 0, state.shape[0])
    check_index_range("rows", rows, 0, tokens.shape[0])
    if index_checks_active(slots):
        check_index_range("state[slots]", state[slots.long()], 0, n)
    return torch.ops.minikernels.fsm_advance(
        state, codes, slots.contiguous(), rows.contiguous(), tokens.contiguous(),
        table if table.stride(1) == 1 else table.contiguous(), default.contiguous(),
        exc_keys.contiguous(), exc_next.contiguous(), eos.contiguous(), vocab_size)



# ------------------------------------------------------------------------ fsm_mask_logits
def fsm_mask_logits_unchecked(logits: Tensor, state: Tensor, slots: Tensor, rows: Tensor,
                              table: Tensor, vocab_size: int) -> None:
    """:func:`fsm_mask_logits` on the backend's implementation directly: no checks and no
    dispatcher. For a caller that built every argument itself (the engine's automata bank
    and the sampler's logits): unit column strides, contiguous int64 state, contiguous
    slots / rows in range, vocab_size <= min(V, 32 * W)."""
    if _backend.resolve("fsm_mask_logits", logits.device) == "triton":
        from .triton import fsm as triton_fsm
        triton_fsm.fsm_mask_logits(logits, state, slots, rows, table, vocab_size)
    else:
        reference.fsm_mask_logits(logits, state, slots, rows, table, vocab_size)


@torch.library.custom_op("minikernels::fsm_mask_logits", mutates_args=("logits",))
def _fsm_mask_logits(logits: Tensor, state: Tensor, slots: Tensor, rows: Tensor,
                     table: Tensor, vocab_size: int) -> None:
    fsm_mask_logits_unchecked(logits, state, slots, rows, table, vocab_size)


@_fsm_mask_logits.register_fake
def _(logits: Tensor, state: Tensor, slots: Tensor, rows: Tensor, table: Tensor,
      vocab_size: int) -> None:
    return None


def fsm_mask_logits(logits: Tensor, state: Tensor, slots: Tensor, rows: Tensor,
                    table: Tensor, vocab_size: int | None = None) -> None:
    """Mask logits rows ``rows`` by their automata's states, in place (module docstring).

    logits [B, V] fp32 / fp16 / bf16 (any row stride, unit column stride; written in
    place); state int64 [S]; slots, rows int32 / int64 [R] (rows distinct); table int32
    [N, W]; vocab_size: the tokens the automata know (default V); columns from
    min(vocab_size, 32 * W) on are masked too. Views are accepted for every argument but
    logits' columns."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    dev = logits.device
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("logits must be contiguous in its last dim (it is written in place)")
    check_tensor("state", state, dtypes=(torch.int64,), ndim=1, device=dev)
    check_tensor("slots", slots, dtypes=_INDEX, ndim=1, device=dev)
    check_tensor("rows", rows, dtypes=_INDEX, ndim=1, device=dev)
    if rows.shape != slots.shape:
        raise ValueError(f"rows must match slots' shape {list(slots.shape)}, got "
                         f"{list(rows.shape)}")
    check_tensor("table", table, dtypes=(torch.int32,), ndim=2, device=dev)
    if vocab_size is None:
        vocab_size = logits.shape[1]
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 0:
        raise ValueError(f"vocab_size must be a non-negative int, got {vocab_size!r}")
    check_index_range("slots", slots, 0, state.shape[0])
    check_index_range("rows", rows, 0, logits.shape[0])
    if index_checks_active(rows) and rows.numel() and \
            torch.unique(rows).numel() != rows.numel():
        raise ValueError("rows must be distinct (each masks its logits row once)")
    if index_checks_active(slots) and slots.numel():
        check_index_range("state[slots]", state[slots.long()], 0, table.shape[0])
    torch.ops.minikernels.fsm_mask_logits(
        logits, state.contiguous(), slots.contiguous(), rows.contiguous(),
        table if table.stride(1) == 1 or table.shape[1] <= 1 else table.contiguous(),
        min(vocab_size, logits.shape[1], 32 * table.shape[1]))
