"""Lossless import of GPTQ and AWQ (GEMM) checkpoints into the canonical int4 layout.

Both formats store W [N, K] transposed (K first, like the math x @ W^T); the published
packing rules are:

GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq" = v1 or "gptq_v2"):
    qweight int32 [K / 8, N]     word r, slot j (bits 4j..) = q[k = 8r + j, n]
    qzeros  int32 [K / G, N / 8] word c, slot j = zero[g, n = 8c + j]; v1 stores zero - 1
    scales  [K / G, N]
    g_idx   int32 [K] (optional): group of each input column; act-order checkpoints
            permute it. We sort K by g_idx (stable) so groups are contiguous and keep the
            permutation: Int4Weight.perm, applied to x's last dim by the layer.
AWQ GEMM (AutoAWQ):
    qweight int32 [K, N / 8]     word c, slot i = q[k, n = 8c + ORDER[i]], ORDER 0,2,4,6,1,3,5,7
    qzeros  int32 [K / G, N / 8] same order; the zero is stored as is
    scales  [K / G, N]
compressed-tensors "pack-quantized" (llm-compressor's W4A16; symmetric int4):
    weight_packed int32 [N, K / 8]  word c, slot j (bits 4j..) = q[n, k = 8c + j] + 8
                                    (q signed in [-8, 7], stored offset by 8)
    weight_scale  [N, K / G] (group) or [N, 1] (channel)
    weight_g_idx  int32 [K] (optional, actorder "group"): as GPTQ's g_idx
    weight_shape  [N, K]
    so it is the canonical layout with every zero 8.
Dequantized: W[n, k] = (q - zero) * scale, as in the canonical format.

Which modules a checkpoint quantized (:func:`module_quantization`): quantizers leave some
linears dense (routers, narrow projections, ``lm_head``) and say so in the config under
their own keys - AutoAWQ / transformers ``modules_to_not_convert`` (substrings of the
module name), GPTQModel ``dynamic`` (regexes matched in order: ``-:`` skips the module,
``+:`` or none overrides ``bits`` / ``group_size`` / ``desc_act`` / ``sym`` for it),
compressed-tensors ``ignore`` and the config
groups' ``targets`` (a name, a ``re:`` regex or the class name ``Linear``), fp8
``ignored_layers``.

8-bit variants (``bits=8``; weight-only INT8, W8A16 -> :class:`~minikernels.quant.int8.
Int8WoWeight`, uint8 q [N, K], run by ``ops.int8_matmul``): GPTQ packs 4 values per word
(qweight [K / 4, N], byte j = q[4r + j, n]; qzeros [K / G, N / 4]; v1 stores zero - 1;
Qwen's ``*-GPTQ-Int8``), compressed-tensors ``pack-quantized`` 8-bit packs 4 signed
values + 128 per word along K (weight_packed [N, K / 4]; zero 128).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .._validation import HALF_DTYPES, check_tensor
from .int4 import Int4Weight
from .packing import pack_nibbles, unpack_bytes, unpack_nibbles

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _group_size(k: int, groups: int) -> int:
    if groups <= 0 or k % groups:
        raise ValueError(f"scales has {groups} groups, which does not divide K = {k}")
    g = k // groups
    return -1 if groups == 1 else g


def from_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None = None,
              checkpoint_format: str = "gptq", bits: int = 4) -> Any:
    """Convert a 4-bit GPTQ layer (module docstring) to an :class:`Int4Weight`, losslessly
    (``bits=8``: an 8-bit one to an :class:`~minikernels.quant.int8.Int8WoWeight`).

    checkpoint_format: "gptq" (v1: stored zero = zero - 1) or "gptq_v2" (zero as stored).
    g_idx: None or int [K]; an act-order g_idx yields a weight with ``perm`` set.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got "
                         f"{checkpoint_format!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    per = 32 // bits                      # values per int32 word
    unpack = unpack_nibbles if bits == 4 else unpack_bytes
    check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2)
    check_tensor("qzeros", qzeros, dtypes=(torch.int32,), ndim=2, device=qweight.device)
    check_tensor("scales", scales, dtypes=HALF_DTYPES + (torch.float32,), ndim=2,
                 device=qweight.device)
    k, n = qweight.shape[0] * per, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape [groups, N = {n}], got {list(scales.shape)}")
    if n % per or list(qzeros.shape) != [groups, n // per]:
        raise ValueError(f"qzeros must have shape [{groups}, N / {per} = {n / per:g}] (N "
                         f"multiple of {per}), got {list(qzeros.shape)}")
    if scales.dtype == torch.float32:
        scales = scales.half()
    g = _group_size(k, groups)
    zeros = unpack(qzeros)                                           # [groups, N]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    q = unpack(qweight.t().contiguous())                             # [N, K]
    q, perm = _sort_by_group(q, g_idx, k, k // groups, groups)
    zeros = zeros.t().to(scales.dtype).contiguous()
    if bits == 8:
        from .int8 import Int8WoWeight
        return Int8WoWeight(q.to(torch.uint8), scales.t().contiguous(), zeros, g, perm)
    return Int4Weight(pack_nibbles(q), scales.t().contiguous(), zeros, g, perm)


def _sort_by_group(q: Tensor, g_idx: Tensor | None, k: int, gs: int, groups: int
                   ) -> tuple[Tensor, Tensor | None]:
    """(q [N, K] with its columns sorted by group, the permutation or None): an
    act-order ``g_idx`` (each input column's group) made contiguous, stably."""
    if g_idx is None:
        return q, None
    check_tensor("g_idx", g_idx, dtypes=(torch.int32, torch.int64), ndim=1, device=q.device)
    if g_idx.shape[0] != k:
        raise ValueError(f"g_idx must have shape [K = {k}], got {list(g_idx.shape)}")
    g_idx = g_idx.to(torch.int64)
    order = torch.argsort(g_idx, stable=True)
    expected = torch.arange(k, device=g_idx.device) // gs
    if not torch.equal(g_idx[order], expected):
        raise ValueError(f"g_idx must assign exactly K / groups = {gs} columns to each of "
                         f"the {groups} groups")
    if torch.equal(order, torch.arange(k, device=order.device)):
        return q, None
    return q[:, order], order


def compressed_tensors_scheme(qc: dict[str, Any]) -> dict[str, Any]:
    """The weight-only scheme of a compressed-tensors ``pack-quantized``
    ``quantization_config`` (what llm-compressor writes for W4A16 and W8A16):
    {"group_size": G, or -1 for one scale per output channel, "bits": 4 or 8}. ValueError
    naming what is not supported (other formats, activation quantization, other bit
    widths, asymmetric weights, several schemes)."""
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (only "
                         "pack-quantized int4 / int8 weights, int-quantized int8, "
                         "float-quantized fp8)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    sizes, bits = set(), set()
    for name, group in groups.items():
        w = group.get("weights") or {}
        if group.get("input_activations"):
            raise ValueError(f"config_groups.{name}: activation quantization is not "
                             "supported with pack-quantized weights (weight-only)")
        if w.get("num_bits") not in (4, 8) or w.get("type", "int") != "int":
            raise ValueError(f"config_groups.{name}: {w.get('num_bits')}-bit "
                             f"{w.get('type')} weights are not supported (int4, int8)")
        bits.add(int(w["num_bits"]))
        if not w.get("symmetric", True):
            raise ValueError(f"config_groups.{name}: asymmetric weights are not supported")
        strategy = w.get("strategy")
        if strategy == "group":
            sizes.add(int(w["group_size"]))
        elif strategy == "channel":
            sizes.add(-1)
        else:
            raise ValueError(f"config_groups.{name}: strategy {strategy!r} is not supported "
                             "(group, channel)")
    if len(sizes) != 1:
        raise ValueError(f"config_groups use several group sizes {sorted(sizes)}")
    if len(bits) != 1:
        raise ValueError(f"config_groups use several bit widths {sorted(bits)}")
    return {"group_size": sizes.pop(), "bits": bits.pop()}


def from_compressed_tensors(weight_packed: Tensor, weight_scale: Tensor,
                            g_idx: Tensor | None = None, bits: int = 4) -> Any:
    """Convert a compressed-tensors pack-quantized int4 layer (module docstring) to an
    :class:`Int4Weight`, losslessly (``bits=8``: an 8-bit one to an
    :class:`~minikernels.quant.int8.Int8WoWeight`)."""
    check_tensor("weight_packed", weight_packed, dtypes=(torch.int32,), ndim=2)
    check_tensor("weight_scale", weight_scale, dtypes=HALF_DTYPES + (torch.float32,), ndim=2,
                 device=weight_packed.device)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    per = 32 // bits
    n, k = weight_packed.shape[0], weight_packed.shape[1] * per
    if weight_scale.shape[0] != n:
        raise ValueError(f"weight_scale must have shape [N = {n}, groups], got "
                         f"{list(weight_scale.shape)}")
    groups = weight_scale.shape[1]
    if weight_scale.dtype == torch.float32:
        weight_scale = weight_scale.half()
    g = _group_size(k, groups)
    unpacked = unpack_nibbles(weight_packed) if bits == 4 else unpack_bytes(weight_packed)
    q, perm = _sort_by_group(unpacked, g_idx, k, k // groups, groups)
    zeros = torch.full((n, groups), float(1 << (bits - 1)), dtype=weight_scale.dtype,
                       device=q.device)
    if bits == 8:
        from .int8 import Int8WoWeight
        return Int8WoWeight(q.to(torch.uint8), weight_scale.contiguous(), zeros, g, perm)
    return Int4Weight(pack_nibbles(q), weight_scale.contiguous(), zeros, g, perm)


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Int4Weight:
    """Convert a 4-bit AWQ GEMM layer (module docstring) to an :class:`Int4Weight`."""
    check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2)
    check_tensor("qzeros", qzeros, dtypes=(torch.int32,), ndim=2, device=qweight.device)
    check_tensor("scales", scales, dtypes=HALF_DTYPES + (torch.float32,), ndim=2,
                 device=qweight.device)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape [groups, N = {n}], got {list(scales.shape)}")
    if list(qzeros.shape) != [groups, n // 8]:
        raise ValueError(f"qzeros must have shape [{groups}, {n // 8}], got "
                         f"{list(qzeros.shape)}")
    if k % 8:
        raise ValueError(f"K ({k}) must be a multiple of 8")
    if scales.dtype == torch.float32:
        scales = scales.half()
    g = _group_size(k, groups)
    q = unpack_nibbles(qweight, AWQ_ORDER)                           # [K, N]
    zeros = unpack_nibbles(qzeros, AWQ_ORDER)                        # [groups, N]
    return Int4Weight(pack_nibbles(q.t().contiguous()), scales.t().contiguous(),
                      zeros.t().to(scales.dtype).contiguous(), g)


def to_gptq(weight: Int4Weight, checkpoint_format: str = "gptq") -> dict[str, Tensor]:
    """Export to GPTQ tensors (qweight, qzeros, scales, g_idx); inverse of from_gptq.

    v1 cannot store a zero of 0 (stored as -1); such weights need "gptq_v2".
    """
    q = weight.unpack()                                              # [N, K] (permuted)
    n, k = q.shape
    gs = weight.effective_group_size
    zeros = weight.zeros.float().round().to(torch.int64)             # [N, groups]
    if checkpoint_format == "gptq":
        zeros = zeros - 1
        if (zeros < 0).any():
            raise ValueError("a zero-point of 0 cannot be stored in GPTQ v1; use gptq_v2")
    g_idx = torch.arange(k, device=q.device) // gs
    if weight.perm is not None:
        inv = torch.empty_like(weight.perm)
        inv[weight.perm] = torch.arange(k, device=q.device)
        q = q[:, inv]
        g_idx = g_idx[inv]
    return {"qweight": pack_nibbles(q).t().contiguous(),
            "qzeros": pack_nibbles(zeros.t().contiguous()),
            "scales": weight.scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}


def to_awq(weight: Int4Weight) -> dict[str, Tensor]:
    """Export to AWQ GEMM tensors (qweight, qzeros, scales); inverse of from_awq."""
    if weight.perm is not None:
        raise ValueError("AWQ has no act-order permutation; this weight has perm set")
    q = weight.unpack()
    zeros = weight.zeros.float().round().to(torch.int64)
    return {"qweight": pack_nibbles(q.t().contiguous(), AWQ_ORDER),
            "qzeros": pack_nibbles(zeros.t().contiguous(), AWQ_ORDER),
            "scales": weight.scales.t().contiguous()}


#: per-module settings GPTQModel's ``dynamic`` may override
_DYNAMIC_KEYS = ("bits", "group_size", "desc_act", "sym")


def _ct_match(entry: Any, module: str) -> bool:
    """A compressed-tensors ``ignore`` / ``targets`` entry against a module name: a
    ``re:`` regex (re.match), the class name ``Linear`` (every linear), or a name (the
    module itself or a trailing part of its dotted name)."""
    entry = str(entry)
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    if entry == "Linear":
        return True
    return module == entry or module.endswith("." + entry)


def _dynamic_rules(qc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """GPTQModel's ``dynamic`` as (sign "+" / "-", regex, overrides), in order; ValueError
    naming a malformed entry."""
    dyn = qc.get("dynamic")
    if dyn is None:
        return []
    if not isinstance(dyn, dict):
        raise ValueError(f"quantization_config.dynamic must be a dict of regex -> "
                         f"overrides, got {type(dyn).__name__}")
    rules = []
    for key, over in dyn.items():
        sign, pattern = ("-", key[2:]) if key.startswith("-:") else \
            ("+", key[2:] if key.startswith("+:") else key)
        if not isinstance(over, dict):
            raise ValueError(f"quantization_config.dynamic[{key!r}] must be a dict, got "
                             f"{type(over).__name__}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"quantization_config.dynamic[{key!r}]: bad regex: {exc}") \
                from None
        extra = sorted(set(over) - set(_DYNAMIC_KEYS))
        if sign == "+" and extra:
            raise ValueError(f"quantization_config.dynamic[{key!r}]: overrides {extra} are "
                             f"not supported (only {list(_DYNAMIC_KEYS)})")
        if sign == "+" and "bits" in over and over["bits"] not in (4, 8):
            raise ValueError(f"quantization_config.dynamic[{key!r}]: bits must be 4 or 8, "
                             f"got {over['bits']!r}")
        if sign == "+" and "group_size" in over and (
                not isinstance(over["group_size"], int) or
                (over["group_size"] <= 0 and over["group_size"] != -1)):
            raise ValueError(f"quantization_config.dynamic[{key!r}]: group_size must be a "
                             f"positive int or -1, got {over['group_size']!r}")
        rules.append((sign, pattern, over))
    return rules


def module_rule(qc: dict[str, Any] | None, module: str) -> tuple[dict[str, Any] | None, str]:
    """How ``qc`` (a ``quantization_config``) treats one checkpoint module (its tensors'
    common prefix, e.g. ``model.layers.0.linear_attn.in_proj_a``).

    Returns (None, reason) when the config leaves the module dense (the reason names the
    config key and entry), else (overrides, "") with GPTQModel ``dynamic``'s per-module
    settings ({} for the base ones). ValueError naming a malformed config entry.
    """
    if not qc:
        return None, "no quantization_config"
    method = str(qc.get("quant_method", "")).lower()
    for key in ("modules_to_not_convert", "ignored_layers"):
        entries = qc.get(key) or []
        if not isinstance(entries, (list, tuple)):
            raise ValueError(f"quantization_config.{key} must be a list, got "
                             f"{type(entries).__name__}")
        for entry in entries:
            hit = (str(entry) in module) if key == "modules_to_not_convert" else \
                module == str(entry) or module.endswith("." + str(entry))
            if hit:
                return None, f"quantization_config.{key} entry {entry!r}"
    if method == "gptq":
        for sign, pattern, over in _dynamic_rules(qc):
            if re.match(pattern, module):
                if sign == "-":
                    return None, f"quantization_config.dynamic entry '-:{pattern}'"
                return {k: over[k] for k in _DYNAMIC_KEYS if k in over}, ""
    if method == "compressed-tensors":
        for entry in qc.get("ignore") or []:
            if _ct_match(entry, module):
                return None, f"quantization_config.ignore entry {entry!r}"
        groups = qc.get("config_groups") or {}
        targets = [t for g in groups.values() if isinstance(g, dict)
                   for t in (g.get("targets") or ["Linear"])]
        if groups and not any(_ct_match(t, module) for t in targets):
            return None, "no quantization_config.config_groups target matches it"
    return {}, ""


def module_quantization(qc: dict[str, Any] | None, module: str) -> dict[str, Any] | None:
    """None when ``qc`` leaves checkpoint module ``module`` dense, else its per-module
    overrides ({} for the config's base settings); see :func:`module_rule`."""
    return module_rule(qc, module)[0]
