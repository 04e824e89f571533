"""quantize_model: RTN int4 (or block-wise fp8, or int8 W8A8) for any torch model, in place.

Each ``nn.Linear`` is replaced by :class:`Int4Linear` (``method="fp8"``:
:class:`Fp8Linear`; ``method="int8"``: :class:`Int8Linear`). A module that quantizes
itself exposes the duck-typed hook ``quantize_int4_(group_size, symmetric) -> bool``
(fp8: ``quantize_fp8_(block_size) -> bool``; int8: ``quantize_int8_() -> bool``; e.g. minikernels' own ``FusedLinear``, so ``mk.quantize_model(causal_lm)`` works);
the hook converts its dense weights in place, and its submodules are left to it. nn does
not import models: the hook is how it reaches their layers.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .fp8_linear import Fp8Linear
from .int4_linear import Int4Linear
from .int8_linear import Int8Linear

logger = logging.getLogger("minikernels")

HOOK = "quantize_int4_"
FP8_HOOK = "quantize_fp8_"
INT8_HOOK = "quantize_int8_"
METHODS = ("int4", "fp8", "int8")


def _skipped(name: str, skip: Sequence[str]) -> bool:
    """name matches an entry s when it is s, ends with '.s', or lies under 's.'."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or
               f".{s}." in f".{name}." for s in skip)


def _has_hook(module: nn.Module, hook: str = HOOK) -> bool:
    return callable(getattr(module, hook, None))


def pick_group_size(k: int, group_size: int) -> int:
    """group_size if it divides K, else the largest power-of-two divisor >= 32 below it, else
    -1 (one group per row) when K is a multiple of 8, as ``FusedLinear`` and
    ``load_model(quantization="int4")`` choose."""
    if group_size == -1 or k % group_size == 0:
        return group_size
    g = group_size
    while g >= 32:
        if k % g == 0:
            return g
        g //= 2
    return -1


@dataclass
class QuantizeSummary:
    """What :func:`quantize_model` did: converted layers (name -> int4 group size, fp8
    block size (bn, bk), or "channel" for int8) and layers kept dense (name -> reason). Set as
    ``model.quantization_summary``."""

    converted: dict[str, int | tuple[int, int] | str] = field(default_factory=dict)
    kept_dense: dict[str, str] = field(default_factory=dict)
    method: str = "int4"

    def __str__(self) -> str:
        sizes = sorted({str(g) for g in self.converted.values()}, reverse=True)
        what = {"int4": "group size", "fp8": "block size"}.get(self.method, "scales per")
        text = (f"quantize_model: {len(self.converted)} linear layers to {self.method} "
                f"({what} {', '.join(sizes) or '-'}), {len(self.kept_dense)} kept dense")
        if self.kept_dense:
            names = list(self.kept_dense)
            text += ": " + ", ".join(names[:8]) + (f" (+{len(names) - 8} more)"
                                                   if len(names) > 8 else "")
        return text


def quantize_model(model: nn.Module, group_size: int = 128, symmetric: bool = False,
                   skip: Sequence[str] = ("lm_head",), method: str = "int4",
                   block_size: Sequence[int] = (128, 128)) -> nn.Module:
    """Quantize ``model`` in place to RTN int4 (``method="fp8"``: block-wise RTN fp8 with
    ``block_size``, every ``nn.Linear`` -> :class:`Fp8Linear`, any size; the hook
    ``quantize_fp8_(block_size)``; ``method="int8"``: per-channel RTN int8 run W8A8,
    every ``nn.Linear`` -> :class:`Int8Linear`, any size; the hook ``quantize_int8_()``)
    and return it.

    - each ``nn.Linear`` becomes an :class:`Int4Linear`. When in_features is not a multiple
      of group_size the largest power-of-two group >= 32 that divides it is used (else one
      group per row), as ``FusedLinear`` does. Linears the int4 kernels cannot take at all
      (in/out features not multiples of 8) stay dense, with a warning naming them.
    - the summary (converted, kept dense) is logged at INFO, attached as
      ``model.quantization_summary`` (:class:`QuantizeSummary`), and when a layer stayed
      dense for a reason other than ``skip`` it is also issued as a ``UserWarning``.
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fp8":
        block = tuple(int(b) for b in block_size)
        return _quantize_model_8bit(model, skip, "fp8", FP8_HOOK, (block,),
                                    lambda lin: Fp8Linear.from_linear(lin, block), block)
    if method == "int8":
        return _quantize_model_8bit(model, skip, "int8", INT8_HOOK, (),
                                    Int8Linear.from_linear, "channel")
    summary = QuantizeSummary()
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
                summary.kept_dense[full] = "skip"
                continue
            k, n = child.in_features, child.out_features
            if k % 8 or n % 8:
                summary.kept_dense[full] = (f"{k} -> {n}: int4 needs in and out features "
                                            "that are multiples of 8")
                continue
            targets.append((full, module, child_name, child, pick_group_size(k, group_size)))
    for name, module in hooked:
        if name and _skipped(name, skip):
            summary.kept_dense[name] = "skip"
            continue
        k = getattr(module, "in_features", None)
        if getattr(module, HOOK)(group_size, symmetric) is not False:
            summary.converted[name] = pick_group_size(k, group_size) if k else group_size
        elif getattr(module, "weight", None) is not None:
            summary.kept_dense[name] = f"in_features {k}: int4 needs a multiple of 8"
    for full, parent, child_name, child, g in targets:
        setattr(parent, child_name, Int4Linear.from_linear(child, g, symmetric))
        summary.converted[full] = g
    smaller = sorted({g for g in summary.converted.values() if g != group_size})
    if smaller:
        logger.info("quantize_model: group size %s where in_features is not a multiple of %d",
                    ", ".join(map(str, smaller)), group_size)
    dense = {k: v for k, v in summary.kept_dense.items() if v != "skip"}
    if dense:
        warnings.warn("quantize_model: kept dense (int4 cannot take them): " + "; ".join(
            f"{k} ({v})" for k, v in dense.items()), UserWarning, stacklevel=2)
    return _attach(model, summary)


def _quantize_model_8bit(model: nn.Module, skip: Sequence[str], method: str, hook: str,
                         hook_args: tuple, convert: Callable[[nn.Linear], nn.Module],
                         label: Any) -> nn.Module:
    """quantize_model(method="fp8" | "int8"): every nn.Linear -> ``convert(linear)``,
    modules with ``hook`` call it with ``hook_args``; ``label`` is what the summary
    records per converted layer."""
    summary = QuantizeSummary(method=method)
    hooked: list[tuple[str, nn.Module]] = []
    targets = []
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") or h == "" for h, _ in hooked):
            continue  # inside a module that quantizes itself
        if _has_hook(module, hook):
            hooked.append((name, module))
            continue
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear or _has_hook(child, hook):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if _skipped(full, skip):
                summary.kept_dense[full] = "skip"
            else:
                targets.append((full, module, child_name, child))
    for name, module in hooked:
        if name and _skipped(name, skip):
            summary.kept_dense[name] = "skip"
        elif getattr(module, hook)(*hook_args) is not False:
            summary.converted[name] = label
    for full, parent, child_name, child in targets:
        setattr(parent, child_name, convert(child))
        summary.converted[full] = label
    return _attach(model, summary)


def _note_dense_experts(model: nn.Module, summary: QuantizeSummary) -> None:
    """transformers' mixture-of-experts modules hold their experts as stacked 3-D
    Parameters, not Linears: record them as kept dense, with a warning naming the
    function that quantizes them."""
    from ..hf.experts import _experts_modules

    names = [name for name, _ in _experts_modules(model)]
    if not names:
        return
    why = ("MoE experts (stacked 3-D weights, not nn.Linear): "
           "minikernels.hf.quantize_experts(model, method) or "
           "minikernels.hf.kernelize(model, quantize=method) quantizes them")
    for name in names:
        summary.kept_dense[name] = why
    warnings.warn(f"quantize_model: {len(names)} {why}", UserWarning, stacklevel=3)


def _attach(model: nn.Module, summary: QuantizeSummary) -> nn.Module:
    """Note dense MoE experts, log the summary and set it as
    ``model.quantization_summary``."""
    _note_dense_experts(model, summary)
    logger.info("%s", summary)
    try:
        model.quantization_summary = summary
    except AttributeError:  # pragma: no cover - a model that refuses new attributes
        pass
    return model
