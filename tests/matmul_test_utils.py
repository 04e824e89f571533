"""Helpers shared by the weight-only matmul tests (test_int8_matmul, test_fp8_matmul)."""
from __future__ import annotations

import torch


def strided(t: torch.Tensor | None, how: str) -> torch.Tensor | None:
    """The same values as a view with its own strides ("rows": padded rows; "t": a
    transposed buffer, so the last dim is strided; "every2": every other element)."""
    if t is None or how == "none":
        return t
    if how == "rows":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype, device=t.device)
        big[..., :t.shape[-1]] = t
        return big[..., :t.shape[-1]]
    if how == "t":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]
