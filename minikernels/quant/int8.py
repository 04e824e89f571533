"""INT8 W8A8 weights (SmoothQuant-style): the container, RTN quantization, checkpoints.

Layout (what :func:`minikernels.ops.scaled_mm` runs, with ``b = weight.t()``):

    weight  int8 [N, K]
    scale   float32 [N]            one scale per output channel
    W[n, k] = weight[n, k] * scale[n]

Activations are quantized at run time, one scale per token
(:func:`minikernels.ops.scaled_int8_quant`), so a linear computes
``y[m, n] = x_scale[m] * (scale[n] * sum_k x_q[m, k] * weight[n, k])`` with an exact int32
dot product. Parts stacked along N (q / k / v, gate / up) concatenate losslessly: every
row keeps its own scale.

Checkpoint format (config.json ``quantization_config``), read by :func:`int8_scheme`:
compressed-tensors ``format: "int-quantized"`` (llm-compressor's W8A8 / SmoothQuant
presets, e.g. RedHatAI's ``*-quantized.w8a8``): 8-bit symmetric int ``weights`` with
strategy ``channel`` (``weight_scale`` [N, 1]) or ``tensor`` (one value), and 8-bit
symmetric int ``input_activations``. Dynamic per-token activations run as stored; static
per-tensor ones (an ``input_scale`` per layer) run dynamic per token too, which is never
less accurate (the stored scale is ignored). Not supported (a ValueError naming it):
asymmetric weights or activations, weights without activation quantization (W8A16),
group-wise int8 weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

INT8_FORMATS = ("int-quantized", "naive-quantized")
# Rows per quantize call: bounds the fp32 temporaries for a 128k-row lm_head.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Int8Weight:
    """An int8 weight [N, K] with one fp32 scale per output channel (module docstring)."""

    weight: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        if self.weight.dtype != torch.int8 or self.weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {self.weight.dtype} "
                             f"{list(self.weight.shape)}")
        n = self.weight.shape[0]
        if self.scale.numel() != n:
            raise ValueError(f"scale must have N = {n} values (one per output channel), got "
                             f"{list(self.scale.shape)}")
        self.scale = self.scale.reshape(n).float().contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])

    def dequantize(self) -> Tensor:
        """W [N, K] fp32."""
        return self.weight.float() * self.scale[:, None]


def _quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    wf = w.float()
    scale = wf.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / safe[:, None]).clamp_(-128, 127).to(torch.int8)
    return q, scale


def quantize_int8(w: Tensor) -> Int8Weight:
    """RTN int8 of ``w`` [N, K] (any float dtype), symmetric, one scale per output channel:
    scale = max |w[n, :]| / 127, weight = round(w / scale) (fp32 math, half to even; a
    row of zeros gets scale 0 and zeros). Runs on ``w``'s device in row chunks,
    bit-identical to one call."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor, got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    chunks = [_quantize_rows(w[i:i + rows]) for i in range(0, n, rows)] if n else \
        [_quantize_rows(w)]
    return Int8Weight(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))


def int8_scheme(qc: dict[str, Any]) -> dict[str, Any] | None:
    """The INT8 W8A8 scheme of a ``quantization_config``, or None when it is not one.

    Returns {"method": "compressed-tensors", "strategy": "channel" | "tensor",
    "activations": "dynamic" | "static"}. ValueError naming what is not supported.
    """
    if str(qc.get("quant_method", "")).lower() != "compressed-tensors":
        return None
    if qc.get("format") not in INT8_FORMATS:
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        w = (group or {}).get("weights") or {}
        a = (group or {}).get("input_activations")
        if w.get("type", "int") != "int" or w.get("num_bits") != 8:
            raise ValueError(f"config_groups.{name}: {w.get('num_bits')}-bit {w.get('type')} "
                             f"weights in format {qc.get('format')!r} are not supported "
                             "(only 8-bit int)")
        if not w.get("symmetric", True):
            raise ValueError(f"config_groups.{name}: asymmetric int8 weights are not "
                             "supported")
        strategy = w.get("strategy")
        if strategy not in ("channel", "tensor"):
            raise ValueError(f"config_groups.{name}: int8 weight strategy {strategy!r} is "
                             "not supported (channel, tensor)")
        if not a:
            raise ValueError(f"config_groups.{name}: int8 weights without input_activations "
                             "(W8A16) are not supported (only W8A8)")
        if a.get("type", "int") != "int" or a.get("num_bits") != 8:
            raise ValueError(f"config_groups.{name}: {a.get('num_bits')}-bit {a.get('type')} "
                             "input_activations are not supported (only 8-bit int)")
        if not a.get("symmetric", True):
            raise ValueError(f"config_groups.{name}: asymmetric input_activations are not "
                             "supported")
        dynamic = bool(a.get("dynamic", False))
        if a.get("strategy", "token" if dynamic else "tensor") not in ("token", "tensor"):
            raise ValueError(f"config_groups.{name}: input_activations strategy "
                             f"{a.get('strategy')!r} is not supported (token, tensor)")
        schemes.add((strategy, "dynamic" if dynamic else "static"))
    if len(schemes) != 1:
        raise ValueError(f"config_groups use several int8 schemes {sorted(schemes)}")
    strategy, activations = schemes.pop()
    return {"method": "compressed-tensors", "strategy": strategy, "activations": activations}


def int8_from_checkpoint(weight: Tensor, scale: Tensor) -> Int8Weight:
    """One layer's checkpoint tensors (int8 ``weight`` [N, K] and ``weight_scale``: [N, 1]
    per channel or one value per tensor) -> an :class:`Int8Weight`, losslessly."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    n = weight.shape[0]
    scale = scale.float()
    if scale.numel() == 1:
        scale = scale.reshape(1).expand(n)
    elif scale.numel() != n:
        raise ValueError(f"weight_scale must have one value or N = {n} values, got "
                         f"{list(scale.shape)}")
    return Int8Weight(weight, scale.reshape(n))
