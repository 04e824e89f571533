"""quantize_model: RTN int4 for any torch model, in place.

Each ``nn.Linear`` is replaced by :class:`Int4Linear`. A module that quantizes itself
exposes the duck-typed hook ``quantize_int4_(group_size, symmetric) -> bool`` (e.g.
minikernels' own ``FusedLinear``, so ``mk.quantize_model(causal_lm)`` works); the hook
converts its dense weights to int4 in place, and its submodules are left to it. nn does
not import models: the hook is how it reaches their layers.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from .int4_linear import Int4Linear

logger = logging.getLogger("minikernels")

HOOK = "quantize_int4_"


def _skipped(name: str, skip: Sequence[str]) -> bool:
    """name matches an entry s when it is s, ends with '.s', or lies under 's.'."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or
               f".{s}." in f".{name}." for s in skip)


def _has_hook(module: nn.Module) -> bool:
    return callable(getattr(module, HOOK, None))


def quantize_model(model: nn.Module, group_size: int = 128, symmetric: bool = False,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Quantize ``model`` in place to RTN int4 and return it.

    - each ``nn.Linear`` becomes an :class:`Int4Linear`. Linears the int4 kernels cannot
      take (in/out features not multiples of 8, in_features not a multiple of group_size)
      stay dense with one log line each.
    - each module with a ``quantize_int4_(group_size, symmetric)`` method (minikernels'
      ``FusedLinear``) is quantized by that hook, in place; its submodules are its own.
      ``FusedLinear`` picks a smaller group when K is not a multiple of group_size, as
      ``load_model(quantization="int4")`` does, so both give the same int4 weights.

    skip: module names (or name components, e.g. "lm_head") left dense; matched against
    both kinds. Works on any nn.Module, including Hugging Face transformers models and
    ``minikernels.models.CausalLM``.
    """
    if isinstance(skip, str):
        skip = (skip,)
    hooked: list[tuple[str, nn.Module]] = []
    targets = []
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") or h == "" for h, _ in hooked):
            continue  # inside a module that quantizes itself
        if _has_hook(module):
            hooked.append((name, module))
            continue
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear or _has_hook(child):
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
    for name, module in hooked:
        if name and _skipped(name, skip):
            continue
        getattr(module, HOOK)(group_size, symmetric)
    for parent, child_name, child in targets:
        setattr(parent, child_name, Int4Linear.from_linear(child, group_size, symmetric))
    return model
