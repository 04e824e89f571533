"""The int4 weight format (docs/int4_format.md) and round-to-nearest quantization.

Canonical layout (the spec is :mod:`minikernels.ops.reference`), for W [N, K] like
nn.Linear.weight:

    qweight  int32 [N, K // 8]   nibble j (bits 4j..4j+3) of word w = q[n, 8w + j], 0..15
    scales   fp16/bf16 [N, K // G]
    zeros    same dtype as scales, [N, K // G], integer zero-points (8 when symmetric)
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G];  G = K when group_size = -1

Optional ``perm`` (int64 [K], act-order checkpoints): the packed matrix holds the columns
of W in the order ``perm``, so ``y = x @ W.T = int4_matmul(x[..., perm], ...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import reference
from .packing import pack_nibbles, unpack_nibbles

GROUP_SIZES = (32, 64, 128, -1)


@dataclass
class Int4Weight:
    """An int4 weight W [N, K] in the canonical layout (module docstring)."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    group_size: int
    perm: Tensor | None = None

    def __post_init__(self) -> None:
        from ..ops.int4 import check_int4_weight

        check_int4_weight(self.qweight, self.scales, self.zeros, self.group_size)
        if self.perm is not None:
            k = self.qweight.shape[1] * 8
            if not isinstance(self.perm, Tensor) or self.perm.shape != (k,):
                raise ValueError(f"perm must be a tensor of shape [{k}] (a permutation of K)")
            self.perm = self.perm.to(device=self.qweight.device, dtype=torch.int64)

    @property
    def shape(self) -> torch.Size:
        """(N, K) of the dequantized weight."""
        return torch.Size((self.qweight.shape[0], self.qweight.shape[1] * 8))

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype this weight pairs with (the dtype of its scales)."""
        return self.scales.dtype

    @property
    def effective_group_size(self) -> int:
        return self.shape[1] if self.group_size == -1 else self.group_size

    def unpack(self) -> Tensor:
        """The integers q [N, K] (int32, 0..15) in packed (possibly permuted) column order."""
        return unpack_nibbles(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [N, K] in original column order (perm undone), computed in fp32 exactly as the
        reference, then cast to ``dtype``."""
        w = reference.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Int4Weight:
        """Move to ``device``; ``dtype`` (fp16/bf16) converts scales and zeros."""
        sd = dtype or self.scales.dtype
        device = self.qweight.device if device is None else torch.device(device)
        return Int4Weight(self.qweight.to(device), self.scales.to(device, sd),
                          self.zeros.to(device, sd), self.group_size,
                          None if self.perm is None else self.perm.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.qweight, self.scales, self.zeros) if t is not None)


def _check_group(group_size: object, k: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size == -1:
        return k
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be -1 (per channel) or a positive multiple of 8, "
                         f"got {group_size}")
    if k % group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({group_size})")
    return group_size


@torch.no_grad()
def quantize_int4(weight: Tensor, group_size: int = 128, symmetric: bool = False,
                  scale_dtype: torch.dtype | None = None) -> Int4Weight:
    """Round-to-nearest int4 quantization of ``weight`` [N, K] (nn.Linear layout).

    Asymmetric: per group, scale = (max - min) / 15 over the group's range widened to
    include 0, zero = round(-min / scale) in 0..15. Symmetric: zero = 8, scale = absmax / 7
    (q - 8 in -8..7). q = clamp(round(w / scale) + zero, 0, 15) using the scale as stored
    (rounded to ``scale_dtype``), so dequantize() is as close as the stored scale allows.
    scale_dtype: fp16/bf16; default the weight's dtype when it is fp16/bf16, else fp16.
    K must be a multiple of 8 and of group_size.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [N, K], got {weight.dtype} "
                         f"{list(weight.shape)}")
    n, k = weight.shape
    if k % 8:
        raise ValueError(f"weight K ({k}) must be a multiple of 8 (8 nibbles per int32)")
    g = _check_group(group_size, k)
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) \
            else torch.float16
    if scale_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
    q, scale, zero = reference.rtn_groups(weight.float().reshape(n, k // g, g), 4, symmetric,
                                          scale_dtype)
    return Int4Weight(pack_nibbles(q.reshape(n, k)), scale, zero, group_size)


def pack_int4(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
              perm: Tensor | None = None) -> Int4Weight:
    """Build an Int4Weight from integers q [N, K] (0..15) and scales/zeros [N, K // G]."""
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [N, K], got shape {list(q.shape)}")
    return Int4Weight(pack_nibbles(q), scales.contiguous(), zeros.to(scales.dtype).contiguous(),
                      group_size, perm)
