"""quantize_model: replace every nn.Linear of a torch model by Int4Linear (RTN int4)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from .int4_linear import Int4Linear

logger = logging.getLogger("minikernels")


def _skipped(name: str, skip: Sequence[str]) -> bool:
    """name matches an entry s when it is s, ends with '.s', or lies under 's.'."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or
               f".{s}." in f".{name}." for s in skip)


def quantize_model(model: nn.Module, group_size: int = 128, symmetric: bool = False,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace, in place, each nn.Linear of ``model`` by :class:`Int4Linear` and return it.

    skip: module names (or name components, e.g. "lm_head") left dense. Layers the int4
    kernels cannot take (in/out features not multiples of 8, in_features not a multiple of
    group_size) stay dense with one log line each. Works on any nn.Module, including
    Hugging Face transformers models.
    """
    if isinstance(skip, str):
        skip = (skip,)
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if _skipped(full, skip):
                continue
            k, n = child.in_features, child.out_features
            if k % 8 or n % 8 or (group_size != -1 and k % group_size):
                logger.info("quantize_model: %s (%d -> %d) left dense: int4 needs in/out "
                            "features multiples of 8 and of group_size %d", full, k, n,
                            group_size)
                continue
            targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, Int4Linear.from_linear(child, group_size, symmetric))
    return model
