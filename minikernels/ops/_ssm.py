"""Argument checks shared by the two selective state-space scans, ``mamba2_scan``
(Mamba-2: H heads of head dim P, x [T, H, P]) and ``selective_scan`` (Mamba-1: Dm channels,
x [T, Dm]). Both read B and C [T, G, N] in x's dtype, G groups dividing the scan's heads /
channels, and optional per-head / per-channel vectors D and dt_bias. Errors name the op
argument and the scan's own dim names (``H`` / ``Dm``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_tensor


def check_bc(B: object, C: object, x: Tensor, *, units: str, dim: str, size: int,
             max_state: int) -> tuple[int, int]:
    """B, C [T, G, N] in x's dtype on x's device (any strides): x's T rows, G groups
    dividing x's ``size`` ``units`` (units="heads", dim="H", size=8: an error reads
    "x's heads (H = 8)"), the state size N in [1, max_state], C of B's shape.
    Returns (G, N)."""
    total = x.shape[0]
    check_tensor("B", B, dtypes=(x.dtype,), ndim=3, device=x.device)
    check_tensor("C", C, dtypes=(x.dtype,), ndim=3, device=x.device)
    groups, dstate = B.shape[1], B.shape[2]
    if B.shape[0] != total:
        raise ValueError(f"B must have T = {total} rows like x, got shape {list(B.shape)}")
    if groups == 0 or size % groups != 0:
        raise ValueError(f"B's groups (G = {groups}) must divide x's {units} "
                         f"({dim} = {size})")
    if not 1 <= dstate <= max_state:
        raise ValueError(f"B's state size N (its dim 2) must be in [1, {max_state}], got "
                         f"shape {list(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {list(B.shape)}, got {list(C.shape)}")
    return groups, dstate


def check_optional_vectors(vectors: dict[str, Tensor | None], dim: str, size: int,
                           dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    """Optional 1-D vectors {op argument name: tensor or None} (D, dt_bias) of shape
    [``dim`` = ``size``] (one entry per head / channel) in one of ``dtypes`` on
    ``device``."""
    for name, t in vectors.items():
        if t is not None:
            check_tensor(name, t, dtypes=dtypes, ndim=1, device=device)
            if t.shape[0] != size:
                raise ValueError(f"{name} must have shape [{dim} = {size}], got "
                                 f"{list(t.shape)}")
