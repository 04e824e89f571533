"""Test helper: turn a saved HF-format checkpoint (config.json + safetensors, e.g. a tiny
random-weight hybrid model from ``test_model_support.save_hf``) into a GPTQ (v1 / v2,
symmetric or not, act-order or not), AWQ-GEMM or compressed-tensors ``pack-quantized``
checkpoint, choosing per module which linears are quantized - so one fused layer of the
decoder can get quantized and dense parts, as real quantizers leave Qwen3.5's narrow
``in_proj_b`` / ``in_proj_a`` dense beside int4 ``in_proj_qkv`` / ``in_proj_z``.

Each chosen linear W [N, K] is quantized round-to-nearest per group of K (the layouts of
``minikernels/quant/checkpoints.py``'s docstring, packed by ``test_model_support``'s
packers, independently of minikernels.quant); the dequantized weights are returned and can
be written as a dense checkpoint of the same model: the reference a loaded quantized model
must equal.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from test_model_support import awq_tensors, gptq_tensors, pack_bytes_of_4, pack_rows_of_8

METHODS = ("gptq", "awq", "compressed-tensors")
#: how a config names the linears its quantizer left dense
DENSE_KEYS = ("none", "modules_to_not_convert", "dynamic", "ignore")
#: 2-D tensors inside a layer that are not linears a quantizer takes (routers, gates)
_NOT_LINEAR = re.compile(r"\.(mlp\.gate|shared_expert_gate|router|feed_forward\.router|"
                         r"mlp\.router)$")


@dataclass
class QuantizedCheckpoint:
    """What :func:`quantize_checkpoint` wrote."""

    path: str
    #: checkpoint module name -> its dequantized weight [N, K] (fp32)
    quantized: dict[str, torch.Tensor] = field(default_factory=dict)
    #: linears (2-D ``.weight`` in the decoder layers, and lm_head) left dense
    dense: list[str] = field(default_factory=list)
    #: the dense checkpoint of the dequantized weights (when asked for)
    dense_path: str | None = None


def _matches(patterns: Sequence[str] | Callable[[str], bool], module: str) -> bool:
    if callable(patterns):
        return bool(patterns(module))
    return any(re.search(p, module) for p in patterns)


def _linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint modules that are linears a quantizer may take: 2-D ``.weight`` tensors in
    the decoder layers (not routers / gates), and ``lm_head``."""
    out = []
    for name, t in tensors.items():
        if not name.endswith(".weight") or t.dim() != 2:
            continue
        module = name[:-len(".weight")]
        if module == "lm_head" or (re.search(r"(^|\.)layers\.\d+\.", module) and
                                   not _NOT_LINEAR.search(module)):
            out.append(module)
    return out


def _rtn(w: torch.Tensor, bits: int, sym: bool, ct: bool, v1: bool, g_idx: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of w [N, K] per group (``g_idx``: each column's group): unsigned q
    [N, K] in [0, 2^bits), zeros [N, groups] (ints), fp16 scales [N, groups], so that
    W_dq = (q - zeros[:, g_idx]) * scales[:, g_idx]. ``sym``: zero 2^(bits-1) (GPTQ sym: the
    range over 2^bits - 1 steps; compressed-tensors: absmax / (2^bits - 1) * 2, signed q
    stored offset); ``v1``: no zero of 0 (GPTQ v1 stores zero - 1)."""
    n, k = w.shape
    groups = int(g_idx.max()) + 1
    top = (1 << bits) - 1
    mid = 1 << (bits - 1)
    q = torch.empty(n, k, dtype=torch.int64)
    zeros = torch.empty(n, groups, dtype=torch.int64)
    scales = torch.empty(n, groups, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        x = w[:, cols].double()
        if sym:
            amax = x.abs().amax(1).clamp_min(1e-8)
            s = (2 * amax / top) if not ct else (amax / (top / 2))
            z = torch.full((n,), mid, dtype=torch.int64)
        else:
            lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
            s = ((hi - lo) / top).clamp_min(1e-8)
            z = torch.round(-lo / s).to(torch.int64).clamp(1 if v1 else 0, top)
        s16 = s.to(torch.float16)
        qi = torch.round(x / s16.double()[:, None]) + z[:, None]
        q[:, cols] = qi.clamp(0, top).to(torch.int64)
        zeros[:, g], scales[:, g] = z, s16
    return q, zeros, scales


def quantize_checkpoint(src: str, dst: str, method: str, *,
                        quantize: Sequence[str] | Callable[[str], bool] | None = None,
                        group: int = 32, bits: int = 4, sym: bool = False,
                        act_order: bool | Sequence[str] = False,
                        checkpoint_format: str = "gptq", dense_key: str = "none",
                        overrides: dict[str, dict[str, int]] | None = None,
                        dense_path: str | None = None, seed: int = 0) -> QuantizedCheckpoint:
    """Write ``src`` (a HF checkpoint directory) to ``dst`` as a ``method`` checkpoint.

    quantize: regexes (re.search on the checkpoint module name, e.g.
        ``r"linear_attn\\.in_proj_(qkv|z)$"``) or a predicate choosing the linears to
        quantize; None = every linear whose shape the format can pack (K and N multiples
        of 8, K of the group). The others stay dense (their ``.weight`` as is).
    group: group size along K (-1: one group per output channel).
    bits: 4, or 8 (GPTQ, compressed-tensors).
    sym: symmetric (GPTQ; compressed-tensors always is, AWQ never).
    act_order: GPTQ / compressed-tensors act-order: a shuffled ``g_idx`` on every quantized
        linear (True) or on those matching these regexes.
    checkpoint_format: GPTQ "gptq" (v1: zeros stored minus 1) or "gptq_v2".
    dense_key: how the config names the linears left dense: "none" (it does not: the loader
        must see it from the tensors), "modules_to_not_convert" (AutoAWQ / transformers:
        names), "dynamic" (GPTQModel: ``-:`` regexes) or "ignore" (compressed-tensors).
    overrides: GPTQ only: {regex: {"bits": b, "group_size": g}} per module (GPTQModel's
        ``dynamic`` "+:" entries), applied to the modules the regex matches (re.match).
    dense_path: also write the dense checkpoint of the dequantized weights there.

    Returns the dequantized weights of the quantized modules and the names left dense.
    ValueError naming the argument or the module on bad input.
    """
    from safetensors.torch import load_file, save_file

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dense_key not in DENSE_KEYS:
        raise ValueError(f"dense_key must be one of {DENSE_KEYS}, got {dense_key!r}")
    if bits not in ((4,) if method == "awq" else (4, 8)):
        raise ValueError(f"bits {bits!r} is not supported by {method}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got "
                         f"{checkpoint_format!r}")
    if overrides and method != "gptq":
        raise ValueError("overrides (GPTQModel's dynamic) need method='gptq'")
    if group != -1 and group <= 0:
        raise ValueError(f"group must be positive or -1, got {group}")
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"src {src!r} holds no safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(os.path.join(src, f)))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    ct = method == "compressed-tensors"
    v1 = method == "gptq" and checkpoint_format == "gptq"
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = dict(tensors)
    result = QuantizedCheckpoint(dst)

    def settings(module: str) -> tuple[int, int]:
        for pattern, over in (overrides or {}).items():
            if re.match(pattern, module):
                return int(over.get("bits", bits)), int(over.get("group_size", group))
        return bits, group

    def packable(module: str, w: torch.Tensor) -> bool:
        b, g = settings(module)
        n, k = w.shape
        per = 32 // b
        return k % per == 0 and n % per == 0 and (g == -1 or k % g == 0) and k % 8 == 0

    linears = _linears(tensors)
    for module in linears:
        w = tensors[f"{module}.weight"].float()
        chosen = packable(module, w) if quantize is None else _matches(quantize, module)
        if not chosen:
            result.dense.append(module)
            continue
        if not packable(module, w):
            raise ValueError(f"quantize chose {module} {list(w.shape)}, which {method} "
                             f"cannot pack with bits {settings(module)[0]}, group "
                             f"{settings(module)[1]}")
        b, g = settings(module)
        n, k = w.shape
        gs = k if g == -1 else g
        shuffled = act_order is True or (not isinstance(act_order, bool) and
                                         _matches(act_order, module))
        if shuffled and method == "awq":
            raise ValueError("AWQ has no act-order")
        if shuffled:
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[torch.randperm(k, generator=gen)] = torch.arange(k) // gs
        else:
            g_idx = torch.arange(k) // gs
        q, zeros, scales = _rtn(w, b, sym or ct, ct, v1, g_idx)
        wdq = (q.float() - zeros.float()[:, g_idx]) * scales.float()[:, g_idx]
        if ct:
            parts = {"weight_packed": (pack_rows_of_8 if b == 4 else pack_bytes_of_4)(q),
                     "weight_scale": scales, "weight_shape": torch.tensor([n, k])}
            if shuffled:
                parts["weight_g_idx"] = g_idx.to(torch.int32)
        elif method == "gptq":
            parts = gptq_tensors(q, zeros, scales, g_idx, v1=v1, bits=b)
        else:
            parts = awq_tensors(q, zeros, scales)
        for kind, t in parts.items():
            out[f"{module}.{kind}"] = t.contiguous()
        dequantized[f"{module}.weight"] = wdq.to(tensors[f"{module}.weight"].dtype)
        result.quantized[module] = wdq
    for name, t in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module in result.quantized and name.endswith(".weight"):
            continue
        out[name] = t.contiguous()

    qc = _quantization_config(method, bits, group, sym, act_order, checkpoint_format)
    if "lm_head" in result.quantized:
        if method == "gptq":
            qc["lm_head"] = True
        elif method == "compressed-tensors":
            qc["ignore"].remove("lm_head")
    if overrides:
        qc["dynamic"] = {f"+:{p}": dict(o) for p, o in overrides.items()}
    if dense_key != "none" and result.dense:
        _declare_dense(qc, dense_key, result.dense)
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    _write_config(src, dst, {**cfg, "quantization_config": qc})
    if dense_path is not None:
        os.makedirs(dense_path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in dequantized.items()},
                  os.path.join(dense_path, "model.safetensors"), metadata={"format": "pt"})
        _write_config(src, dense_path, cfg)
        result.dense_path = dense_path
    return result


def _quantization_config(method: str, bits: int, group: int, sym: bool,
                         act_order: bool | Sequence[str], checkpoint_format: str
                         ) -> dict[str, Any]:
    """The quantization_config each tool writes (GPTQModel, AutoAWQ, llm-compressor)."""
    desc = act_order is True or (not isinstance(act_order, bool) and bool(act_order))
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc,
                "sym": sym, "lm_head": False, "checkpoint_format": checkpoint_format}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                "zero_point": True}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                            "strategy": "channel" if group == -1 else "group",
                            "group_size": None if group == -1 else group,
                            "actorder": "group" if desc else None, "dynamic": False,
                            "observer": "minmax"}}}}


def _declare_dense(qc: dict[str, Any], key: str, modules: list[str]) -> None:
    """Name the dense ``modules`` in ``qc`` under ``key`` as that tool does."""
    if key == "modules_to_not_convert":
        qc["modules_to_not_convert"] = list(modules)
    elif key == "dynamic":     # GPTQModel: negative matches first, then the overrides
        qc["dynamic"] = {**{f"-:^{re.escape(m)}$": {} for m in modules},
                         **qc.get("dynamic", {})}
    else:
        qc["ignore"] = sorted(set(qc.get("ignore", [])) |
                              {f"re:^{re.escape(m)}$" for m in modules})


def _write_config(src: str, dst: str, cfg: dict[str, Any]) -> None:
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    gen = os.path.join(src, "generation_config.json")
    if os.path.isfile(gen) and os.path.abspath(src) != os.path.abspath(dst):
        shutil.copy(gen, os.path.join(dst, "generation_config.json"))
