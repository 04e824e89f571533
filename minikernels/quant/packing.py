"""Nibble (and byte) packing helpers shared by the int4 format, the RTN quantizer and the
importers (bytes: 8-bit GPTQ / compressed-tensors weights).

All helpers work on any device and return int32 words; nibble j of a word sits at bits
4j..4j+3 (lowest nibble first), the layout of :mod:`minikernels.ops.reference`.
"""
from __future__ import annotations

import torch
from torch import Tensor

_SHIFTS = (0, 4, 8, 12, 16, 20, 24, 28)


def _shifts(device: torch.device, dtype: torch.dtype = torch.int32) -> Tensor:
    return torch.tensor(_SHIFTS, device=device, dtype=dtype)


def pack_nibbles(q: Tensor, order: tuple[int, ...] | None = None) -> Tensor:
    """Pack integers 0..15 along the LAST dim, 8 per int32 word: [..., 8W] -> [..., W].

    Slot i (bits 4i..4i+3) of word w holds q[..., 8w + order[i]] (order = 0..7 by default;
    AWQ uses 0,2,4,6,1,3,5,7).
    """
    if q.shape[-1] % 8:
        raise ValueError(f"the packed dim must be a multiple of 8, got {q.shape[-1]}")
    q = q.to(torch.int64).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    if order is not None:
        q = q[..., list(order)]
    words = (q << _shifts(q.device, torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # to int32 two's complement
    return words.to(torch.int32)


def unpack_nibbles(words: Tensor, order: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`pack_nibbles`: int32 [..., W] -> int32 [..., 8W] in 0..15."""
    q = (words.to(torch.int32).unsqueeze(-1) >> _shifts(words.device)) & 0xF
    if order is not None:
        inverse = [0] * 8
        for slot, col in enumerate(order):
            inverse[col] = slot
        q = q[..., inverse]
    return q.reshape(*words.shape[:-1], words.shape[-1] * 8)


def pack_bytes(q: Tensor) -> Tensor:
    """Pack integers 0..255 along the LAST dim, 4 per int32 word: [..., 4W] -> [..., W];
    byte j (bits 8j..8j+7) of word w holds q[..., 4w + j] (GPTQ's 8-bit packing)."""
    if q.shape[-1] % 4:
        raise ValueError(f"the packed dim must be a multiple of 4, got {q.shape[-1]}")
    q = q.to(torch.int64).reshape(*q.shape[:-1], q.shape[-1] // 4, 4)
    shifts = torch.tensor((0, 8, 16, 24), device=q.device, dtype=torch.int64)
    words = (q << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # to int32 two's complement
    return words.to(torch.int32)


def unpack_bytes(words: Tensor) -> Tensor:
    """Inverse of :func:`pack_bytes`: int32 [..., W] -> int32 [..., 4W] in 0..255."""
    shifts = torch.tensor((0, 8, 16, 24), device=words.device, dtype=torch.int32)
    q = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xFF
    return q.reshape(*words.shape[:-1], words.shape[-1] * 4)
