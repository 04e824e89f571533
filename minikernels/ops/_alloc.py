"""Output allocation for kernels, with a poison mode for tests.

Kernel wrappers allocate their outputs with :func:`empty`. With poisoning on
(``set_poison(True)`` or MINIKERNELS_POISON=1) every such buffer is pre-filled with NaN
(floats) or -0x5A5A5A5A-like sentinels (ints), so an element a kernel forgot to write fails
the comparison against the reference instead of passing on lucky zeros.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_poison = os.environ.get("MINIKERNELS_POISON", "0") == "1"


def set_poison(enabled: bool) -> None:
    global _poison
    _poison = bool(enabled)


def poison_enabled() -> bool:
    return _poison


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison and t.numel():
        if t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(-1515870811)  # 0xA5A5A5A5 as int32
    return t
