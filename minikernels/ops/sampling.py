"""Op family: sampling filters. Op: ``minikernels::top_k_top_p_mask_logits``.

Top-k, min-p and top-p (nucleus) filtering of a batch of logits rows, each row with its
own parameters, as vLLM's ``apply_top_k_top_p`` / FlashInfer's ``top_k_mask_logits`` and
``top_k_top_p_sampling_from_logits`` filter: the tokens a filter drops get -inf, so a
softmax / sampler afterwards draws from the renormalized rest. The Triton kernel finds
each filter's logit threshold by a radix search over the row (no sort of the vocabulary).
Spec: ``reference.top_k_top_p_mask_logits``. Backends: reference, triton
(ops/triton/sampling.py). Tests: tests/test_sampling_mask.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor, index_checks_active
from . import _alloc, reference


@torch.library.custom_op("minikernels::top_k_top_p_mask_logits", mutates_args=())
def _top_k_top_p_mask_logits(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None,
                             min_p: Tensor | None) -> Tensor:
    if _backend.resolve("top_k_top_p_mask_logits", logits.device) == "triton":
        from .triton import sampling as triton_sampling
        out = _alloc.empty(logits.shape, logits.dtype, logits.device)
        triton_sampling.top_k_top_p_mask_logits(
            out, logits,
            # k >= V and k <= 0 both mean "off": clamped before narrowing to int32
            top_k.clamp(0, logits.shape[1]).to(torch.int32).contiguous()
            if top_k is not None else None,
            top_p.to(torch.float32).contiguous() if top_p is not None else None,
            min_p.to(torch.float32).contiguous() if min_p is not None else None)
        return out
    return reference.top_k_top_p_mask_logits(logits, top_k, top_p, min_p).contiguous()


@_top_k_top_p_mask_logits.register_fake
def _(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None,
      min_p: Tensor | None) -> Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _per_row(name: str, value: object, rows: int, device: torch.device, integer: bool,
             low: float, high: float, off: float) -> Tensor | None:
    """A filter parameter as a [rows] tensor on ``device``; None when it is off for every
    row (None, or a number equal to ``off``). Numbers are range-checked here, tensors
    when index checks are on (not under graph capture)."""
    if value is None:
        return None
    kind = "an int" if integer else "a number"
    if isinstance(value, Tensor):
        check_tensor(name, value, ndim=1, device=device,
                     dtypes=(torch.int32, torch.int64) if integer else FLOAT_DTYPES)
        if value.shape[0] != rows:
            raise ValueError(f"{name} must have shape [{rows}] (one value per logits row), "
                             f"got {list(value.shape)}")
        if index_checks_active(value) and rows and not integer and not bool(
                ((value >= low) & (value <= high)).all()):
            raise ValueError(f"{name} values must be in [{low}, {high}]")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        raise TypeError(f"{name} must be None, {kind} or a tensor, got "
                        f"{type(value).__name__}")
    if not integer and not (low <= value <= high):       # also refuses NaN
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    if value == off or (integer and value <= 0):
        return None
    return torch.full((rows,), value, dtype=torch.int32 if integer else torch.float32,
                      device=device)


def top_k_top_p_mask_logits(logits: Tensor, top_k: int | Tensor | None = None,
                            top_p: float | Tensor | None = None,
                            min_p: float | Tensor | None = None) -> Tensor:
    """Set to -inf every logit that top-k, min-p or top-p filtering drops; a new tensor.

    logits [B, V] fp32/fp16/bf16 (finite or -inf; any row stride), e.g. temperature-scaled
    model logits. Each parameter is None (off), one number for every row, or a tensor [B]:
    top_k int (k <= 0 or k >= V: off for that row); top_p in [0, 1] (1: off; 0 keeps only
    the largest logit); min_p in [0, 1] (0: off). Returns [B, V] in logits' dtype
    (contiguous): the kept logits unchanged, the rest -inf. Filters apply in the order top-k, min-p, top-p, each on the
    tokens the previous kept (vLLM's order):
      top-k   the k largest logits (ties with the k-th kept too);
      min-p   probability >= min_p * the row's largest probability;
      top-p   the smallest set of largest logits holding >= top_p of the kept
              probability (ties at its edge kept together; the largest always kept).
    See :func:`minikernels.ops.reference.top_k_top_p_mask_logits` for the exact rule.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    rows = logits.shape[0]
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= logits.shape[1]:
        top_k = None                         # "all tokens" (also beyond int32: 2**70)
    k = _per_row("top_k", top_k, rows, logits.device, True, -math.inf, math.inf, 0)
    p = _per_row("top_p", top_p, rows, logits.device, False, 0.0, 1.0, 1.0)
    mp = _per_row("min_p", min_p, rows, logits.device, False, 0.0, 1.0, 0.0)
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    return torch.ops.minikernels.top_k_top_p_mask_logits(logits, k, p, mp)
