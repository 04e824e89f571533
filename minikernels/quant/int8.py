"""INT8 weights: W8A8 (SmoothQuant-style) and weight-only W8A16 -- the containers, RTN
quantization, checkpoints.

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
strategy ``channel`` (``weight_scale`` [N, 1]) or ``tensor`` (one value), and 8-bit int
``input_activations``, symmetric or asymmetric (a zero point per token: ``scaled_int8_quant
(symmetric=False)`` and ``scaled_mm`` with the weight's row sums, vLLM's
``cutlass_scaled_mm_azp``). Dynamic per-token activations run as stored; static
per-tensor ones (an ``input_scale``, and ``input_zero_point`` when asymmetric, per layer)
run dynamic per token too, which is never less accurate (the stored ones are ignored).
Not supported (a ValueError naming it): asymmetric weights, group-wise int8 W8A8
weights. Weights without activation quantization load weight-only (W8A16, below).

Weight-only INT8 (W8A16, :class:`Int8WoWeight`, run by :func:`minikernels.ops.int8_matmul`):

    qweight  uint8 [N, K]        the stored value q in 0..255
    scales   [N, K / G] fp16 / bf16,  zeros [N, K / G] (real-valued, as int4's)
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G];  G = -1: one group per row
    perm     int64 [K] or None   act-order: stored column j multiplies input column perm[j]

Read from GPTQ 8-bit checkpoints (Qwen's ``*-GPTQ-Int8``; :func:`from_gptq` with
``bits=8``: 4 values per int32 word), compressed-tensors ``pack-quantized`` 8-bit
(symmetric: zero 128) and compressed-tensors ``int-quantized`` weights without activation
quantization (signed int8 [N, K] + ``weight_scale`` per channel or group: q = w + 128,
zero 128).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

INT8_FORMATS = ("int-quantized", "naive-quantized")
INT8_WO_GROUP_MULTIPLE = 16     # int8_matmul's group sizes: multiples of 16 (or -1)
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


@dataclass
class Int8WoWeight:
    """A weight-only int8 weight W [N, K] (W8A16; module docstring)."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    group_size: int
    perm: Tensor | None = None

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D uint8 tensor, got {self.qweight.dtype} "
                             f"{list(self.qweight.shape)}")
        n, k = self.qweight.shape
        g = self.effective_group_size
        if g <= 0 or k % g or (self.group_size != -1 and
                               self.group_size % INT8_WO_GROUP_MULTIPLE):
            raise ValueError(f"group_size must be -1 or a multiple of "
                             f"{INT8_WO_GROUP_MULTIPLE} dividing K = {k}, got "
                             f"{self.group_size}")
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if list(t.shape) != [n, k // g]:
                raise ValueError(f"{name} must have shape [{n}, {k // g}], got "
                                 f"{list(t.shape)}")
        if self.perm is not None:
            if self.perm.shape != (k,):
                raise ValueError(f"perm must have shape [{k}] (a permutation of K)")
            self.perm = self.perm.to(device=self.qweight.device, dtype=torch.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.qweight.shape[0]), int(self.qweight.shape[1])

    @property
    def effective_group_size(self) -> int:
        return int(self.qweight.shape[1]) if self.group_size == -1 else int(self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [N, K] in the input's column order (perm undone), fp32 math."""
        g = self.effective_group_size
        s = self.scales.float().repeat_interleave(g, dim=1)
        z = self.zeros.float().repeat_interleave(g, dim=1)
        w = (self.qweight.float() - z) * s
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "Int8WoWeight":
        """Move to ``device``; ``dtype`` (fp16 / bf16) converts scales and zeros."""
        sd = dtype or self.scales.dtype
        device = self.qweight.device if device is None else torch.device(device)
        return Int8WoWeight(self.qweight.to(device), self.scales.to(device, sd),
                            self.zeros.to(device, sd), self.group_size,
                            None if self.perm is None else self.perm.to(device))


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
    """The INT8 scheme of a compressed-tensors ``int-quantized`` ``quantization_config``,
    or None when it is not one.

    Returns {"method": "compressed-tensors", "strategy": "channel" | "tensor" | "group",
    "activations": "dynamic" | "static" (W8A8) or None (weight-only, W8A16), "group_size":
    G (group strategy) or -1, "activation_symmetric": False for asymmetric activations
    (a zero point per token at run time)}. ValueError naming what is not supported.
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
        if strategy not in ("channel", "tensor", "group"):
            raise ValueError(f"config_groups.{name}: int8 weight strategy {strategy!r} is "
                             "not supported (channel, tensor; group without activation "
                             "quantization)")
        if strategy == "group" and a:
            raise ValueError(f"config_groups.{name}: group-wise int8 weights with activation "
                             "quantization (W8A8) are not supported (channel, tensor)")
        if not a:             # weight-only (W8A16): channel or group scales
            if strategy == "group":
                gs = int(w.get("group_size") or 0)
                if gs <= 0 or gs % INT8_WO_GROUP_MULTIPLE:
                    raise ValueError(f"config_groups.{name}: int8 group_size {gs} is not "
                                     f"supported (a multiple of {INT8_WO_GROUP_MULTIPLE})")
                schemes.add(("group", None, gs))
            else:
                schemes.add((strategy, None, -1))
            continue
        if a.get("type", "int") != "int" or a.get("num_bits") != 8:
            raise ValueError(f"config_groups.{name}: {a.get('num_bits')}-bit {a.get('type')} "
                             "input_activations are not supported (only 8-bit int)")
        dynamic = bool(a.get("dynamic", False))
        if a.get("strategy", "token" if dynamic else "tensor") not in ("token", "tensor"):
            raise ValueError(f"config_groups.{name}: input_activations strategy "
                             f"{a.get('strategy')!r} is not supported (token, tensor)")
        schemes.add((strategy, "dynamic" if dynamic else "static", -1,
                     bool(a.get("symmetric", True))))
    schemes = {s if len(s) == 4 else (*s, True) for s in schemes}
    if len(schemes) != 1:
        raise ValueError(f"config_groups use several int8 schemes "
                         f"{sorted(map(str, schemes))}")
    strategy, activations, group, symmetric = schemes.pop()
    return {"method": "compressed-tensors", "strategy": strategy, "activations": activations,
            "group_size": group, "activation_symmetric": symmetric}


def int8_wo_from_checkpoint(weight: Tensor, scale: Tensor) -> Int8WoWeight:
    """A weight-only compressed-tensors int8 layer (signed int8 ``weight`` [N, K] and
    ``weight_scale``: one value, [N, 1] per channel or [N, K / G] per group) -> an
    :class:`Int8WoWeight` (q = weight + 128, zero 128), losslessly."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    n, k = weight.shape
    sd = scale.dtype if scale.dtype in (torch.float16, torch.bfloat16) else torch.float16
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"weight_scale must have one value, [N = {n}, 1] or [N, K / G] "
                         f"(G dividing K = {k}), got {list(scale.shape)}")
    groups = scale.shape[1]
    q = (weight.to(torch.int16) + 128).to(torch.uint8)
    zeros = torch.full((n, groups), 128.0, dtype=sd, device=weight.device)
    return Int8WoWeight(q, scale.to(sd).contiguous(), zeros, -1 if groups == 1 else k // groups)


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
