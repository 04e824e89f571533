"""Op family: structured outputs. Op: ``minikernels::apply_token_bitmask`` (in place).

A grammar engine (xgrammar) fills a packed allowed-token bitmask per constrained request;
this op sets every disallowed logit to -inf before sampling. Layout and semantics follow
xgrammar's ``apply_token_bitmask_inplace``: bitmask int32 [B, ceil(V / 32)], bit t % 32 of
word t // 32 is token t, 1 = allowed; ``indices`` names the logits rows to mask (row r uses
bitmask row r); other rows are untouched. Backends: reference, triton
(ops/triton/bitmask.py). Tests: tests/test_bitmask.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_index_range, check_tensor
from . import reference


def apply_token_bitmask_unchecked(logits: Tensor, bitmask: Tensor, indices: Tensor | None,
                                  vocab_size: int) -> None:
    """:func:`apply_token_bitmask` on the backend's implementation directly: no checks and
    no dispatcher (tens of microseconds of host time per call). For a caller that built
    the bitmask and indices itself (the engine's structured outputs): logits rows with a
    unit column stride, bitmask int32 contiguous rows, indices contiguous and in range."""
    if _backend.resolve("apply_token_bitmask", logits.device) == "triton":
        from .triton import bitmask as triton_bitmask
        triton_bitmask.apply_token_bitmask(logits, bitmask, indices, vocab_size)
    else:
        reference.apply_token_bitmask(logits, bitmask, indices, vocab_size)


@torch.library.custom_op("minikernels::apply_token_bitmask", mutates_args=("logits",))
def _apply_token_bitmask(logits: Tensor, bitmask: Tensor, indices: Tensor | None,
                         vocab_size: int) -> None:
    apply_token_bitmask_unchecked(logits, bitmask, indices, vocab_size)


@_apply_token_bitmask.register_fake
def _(logits: Tensor, bitmask: Tensor, indices: Tensor | None, vocab_size: int) -> None:
    return None


def apply_token_bitmask(logits: Tensor, bitmask: Tensor, indices: Tensor | None = None,
                        vocab_size: int | None = None) -> None:
    """Set logits[r, t] = -inf where token t is not allowed by bitmask[r], in place.

    logits [B, V] fp32/fp16/bf16 (any row stride, unit column stride); bitmask int32
    [B, W] with W >= ceil(vocab_size / 32) (xgrammar's layout; 1 bit = allowed); indices
    int32/int64 [R] (distinct rows of logits to mask; None = all rows); vocab_size: the
    columns that carry tokens (default min(V, 32 * W)); columns from vocab_size on (e.g. a
    padded lm_head) are left alone.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("bitmask", bitmask, dtypes=(torch.int32,), ndim=2, device=logits.device)
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask must have one row per logits row ({logits.shape[0]}), got "
                         f"shape {list(bitmask.shape)}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("logits must be contiguous in its last dim (it is written in place)")
    if bitmask.shape[1] > 1 and bitmask.stride(1) != 1:
        bitmask = bitmask.contiguous()
    if vocab_size is None:
        vocab_size = min(logits.shape[1], 32 * bitmask.shape[1])
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 0:
        raise ValueError(f"vocab_size must be an int >= 0, got {vocab_size!r}")
    if vocab_size > logits.shape[1] or -(-vocab_size // 32) > bitmask.shape[1]:
        raise ValueError(f"vocab_size ({vocab_size}) exceeds logits ({logits.shape[1]} "
                         f"columns) or bitmask ({bitmask.shape[1]} words = "
                         f"{32 * bitmask.shape[1]} tokens)")
    if indices is not None:
        check_tensor("indices", indices, dtypes=(torch.int32, torch.int64), ndim=1,
                     device=logits.device)
        indices = indices.contiguous()
        check_index_range("indices", indices, 0, logits.shape[0])
    torch.ops.minikernels.apply_token_bitmask(logits, bitmask, indices, vocab_size)
