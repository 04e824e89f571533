"""Construction helpers shared by the quantized drop-ins for nn.Linear (Int4Linear,
Fp8Linear, Int8Linear): the dtype a module keeps its bias in and the copy of a quantized
weight's tensors into a freshly built module's buffers."""
from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

_Module = TypeVar("_Module", bound=nn.Module)


def bias_dtype(bias: Tensor | None) -> torch.dtype:
    """The dtype of a module's bias buffer built around ``bias``: bias's own dtype when it
    is a floating tensor, else bfloat16 (no bias, or an integer one)."""
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16


@torch.no_grad()
def copy_buffers(module: _Module, **tensors: Tensor | None) -> _Module:
    """Copy each given tensor into ``module``'s buffer of that name (shapes as the module
    built them, dtypes converted by ``copy_``), without autograd; a None (no bias, no
    act-order permutation) is skipped, leaving the module's buffer as it is. Returns
    ``module``."""
    for name, t in tensors.items():
        if t is not None:
            getattr(module, name).copy_(t)
    return module
