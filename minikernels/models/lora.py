"""LoRA adapters on the decoder: PEFT checkpoints loaded into adapter slots, applied per
token (a batch can mix adapters and the base model).

    manager = LoRAManager(model, max_loras=4, max_lora_rank=16)
    adapter = LoRAAdapter.load("path/to/peft_adapter", model.config)
    manager.activate(0, adapter)                   # slot 0 holds it
    manager.set_token_slots(slots)                 # int32 [T]: each token's slot, -1 = none
    logits = model(ids, meta, kv_caches)           # every linear adds its LoRA update

Each adapted linear layer (q / k / v / o projections, gate / up / down of the MLP) keeps
stacked slot weights: A [max_loras, P * R, K] and B [max_loras, N, P * R] for its P fused
parts (q, k, v or gate, up) with R = max_lora_rank: a part's A rows and B columns occupy
its own R-wide band (B is block diagonal across parts, zero elsewhere), and a smaller
adapter is zero-padded. The update is ``mk.ops.lora_delta`` (BGMV for decode, SGMV for
prefill) added to the layer's output: y = x W^T (+ b) + scaling[s] * B[s] (A[s] x). A
slot's weights are written in place, so CUDA graphs captured over the buffers stay valid as adapters come and go.

PEFT format (adapter_config.json + adapter_model.safetensors): tensors
``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight`` [r, in] and
``.lora_B.weight`` [out, r]; scaling = lora_alpha / r (lora_alpha / sqrt(r) with
``use_rslora``). Mixture-of-experts models: the attention projections of every layer and
the MLP projections of their dense layers (``mlp_only_layers``) take adapters; the experts,
the router and Qwen2-MoE's shared expert do not. Refused by name: DoRA, biases,
``modules_to_save`` (new heads or embeddings), ``fan_in_fan_out``, targets other than the
seven projections (expert and shared-expert targets included), an MLP target on a sparse
layer, rank-pattern overrides.

Tensor parallel (a model built with ``tp``): each rank's slots hold its shard of every
adapter, cut like the base weights (models/parallel.py ``shard_tensor``). Column-parallel
layers (qkv, gate_up) keep A whole and take the rows of B that match the rank's output
rows (its q / kv heads, its intermediate slice); row-parallel layers (o, down) take the
columns of A that match the rank's input slice and keep B whole, so each rank adds the
partial update scaling * B (A_r x_r) to its partial output and the layer's all-reduce sums
them into the full one. No extra communication per step.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .config import DecoderConfig
from .linear import FusedLinear
from .parallel import shard_tensor

#: HF projection -> (our fused module, part index)
_TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
            "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
            "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
            "down_proj": ("mlp.down_proj", 0)}
_NAME_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                      r"(?:\.default)?\.weight$")


class LoRAError(ValueError):
    """An adapter this model cannot serve (the message names the field or tensor)."""


@dataclass
class LoRAAdapter:
    """One PEFT LoRA adapter: rank, scaling and its (A, B) per (layer, HF projection)."""

    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, config: DecoderConfig, name: str | None = None) -> "LoRAAdapter":
        """Read a PEFT adapter directory; LoRAError naming what does not fit ``config``."""
        cfg_path = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(cfg_path):
            raise LoRAError(f"{path} has no adapter_config.json (not a PEFT adapter)")
        with open(cfg_path, encoding="utf-8") as f:
            cfg: dict[str, Any] = json.load(f)
        _check_config(cfg, cfg_path)
        rank = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", rank))
        scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        files = [os.path.join(path, f) for f in ("adapter_model.safetensors",)
                 if os.path.isfile(os.path.join(path, f))]
        if not files:
            raise LoRAError(f"{path} has no adapter_model.safetensors")
        from safetensors.torch import load_file

        halves: dict[tuple[int, str], dict[str, Tensor]] = {}
        for name_ in (t for fpath in files for t in load_file(fpath).items()):
            key, tensor = name_
            m = _NAME_RE.search(key)
            if m is None:
                if ".experts." in key or ".shared_expert." in key:
                    raise LoRAError(f"{path}: {key!r}: LoRA on mixture-of-experts experts is "
                                    "not supported yet (attention and dense-MLP targets are)")
                raise LoRAError(f"{path}: unexpected adapter tensor {key!r} (only lora_A / "
                                "lora_B of the attention and MLP projections are supported)")
            layer, proj, half = int(m.group(1)), m.group(2), m.group(3)
            if proj not in _TARGETS or layer >= config.num_layers:
                raise LoRAError(f"{path}: {key!r} targets a module this model does not have")
            if _TARGETS[proj][0].startswith("mlp.") and config.is_moe(layer):
                raise LoRAError(f"{path}: {key!r} targets the MLP of layer {layer}, a "
                                "mixture-of-experts layer (its experts take no LoRA yet)")
            halves.setdefault((layer, proj), {})[half] = tensor
        weights = {}
        for (layer, proj), pair in sorted(halves.items()):
            if set(pair) != {"A", "B"}:
                raise LoRAError(f"{path}: layers.{layer}.{proj} has lora_{''.join(pair)} "
                                "without its other half")
            a, b = pair["A"], pair["B"]
            k_in, n_out = _projection_shape(config, proj)
            if list(a.shape) != [rank, k_in] or list(b.shape) != [n_out, rank]:
                raise LoRAError(f"{path}: layers.{layer}.{proj} lora_A / lora_B have shapes "
                                f"{list(a.shape)} / {list(b.shape)}; expected [{rank}, "
                                f"{k_in}] / [{n_out}, {rank}]")
            weights[(layer, proj)] = (a, b)
        if not weights:
            raise LoRAError(f"{path}: the adapter holds no LoRA weights")
        return cls(name or os.path.basename(os.path.normpath(path)), rank, scaling, weights)


def _check_config(cfg: dict[str, Any], where: str) -> None:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise LoRAError(f"{where}: {key} is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{where}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("target_parameters"):
        raise LoRAError(f"{where}: target_parameters {cfg['target_parameters']} (LoRA on "
                        "parameters such as stacked mixture-of-experts experts) is not "
                        "supported yet (attention and dense-MLP targets are)")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported "
                        "(adapters that replace whole modules, e.g. lm_head)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoRAError(f"{where}: {key} is not supported (one rank per adapter)")
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise LoRAError(f"{where}: r must be a positive int, got {r!r}")


def _projection_shape(config: DecoderConfig, proj: str) -> tuple[int, int]:
    """(in, out) features of an HF projection of ``config``'s decoder layer."""
    c = config
    return {"q_proj": (c.hidden_size, c.q_size), "k_proj": (c.hidden_size, c.kv_size),
            "v_proj": (c.hidden_size, c.kv_size), "o_proj": (c.q_size, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size)}[proj]


class _Slots:
    """What every adapted layer reads at forward time: each token's slot and the slots'
    scalings (shared, so one assignment switches the whole model)."""

    def __init__(self, scaling: Tensor) -> None:
        self.token_slots: Tensor | None = None
        self.scaling = scaling


class _LayerLoRA:
    """One adapted FusedLinear's slot weights (module docstring)."""

    def __init__(self, linear: FusedLinear, slots: _Slots, max_loras: int, rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        parts = len(linear.output_sizes)
        self.rank = rank
        self.offsets = [sum(linear.output_sizes[:i]) for i in range(parts)]
        self.sizes = list(linear.output_sizes)
        self.a = torch.zeros(max_loras, parts * rank, linear.in_features, dtype=dtype,
                             device=device)
        self.b = torch.zeros(max_loras, linear.out_features, parts * rank, dtype=dtype,
                             device=device)
        self.slots = slots

    def write(self, slot: int, part: int, a: Tensor | None, b: Tensor | None) -> None:
        """Slot ``slot``'s weights of part ``part`` (None: zeros)."""
        band = slice(part * self.rank, (part + 1) * self.rank)
        rows = slice(self.offsets[part], self.offsets[part] + self.sizes[part])
        self.a[slot, band].zero_()
        self.b[slot, rows, band].zero_()
        if a is not None and b is not None:
            r = a.shape[0]
            self.a[slot, band][:r].copy_(a)
            self.b[slot, rows, band][:, :r].copy_(b)

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        slots = self.slots.token_slots
        if slots is None:
            return y
        flat = x.reshape(-1, x.shape[-1])
        delta = ops.lora_delta(flat, self.a, self.b, slots, self.slots.scaling)
        return y + delta.view(y.shape)


class LoRAManager:
    """Adapter slots on a model (module docstring). Slot weights live on the model's
    device in its dtype; ``activate`` / ``deactivate`` rewrite a slot in place."""

    def __init__(self, model: Any, max_loras: int = 4, max_lora_rank: int = 16) -> None:
        if not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras must be an int >= 1, got {max_loras!r}")
        if not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be an int >= 1, got {max_lora_rank!r}")
        self.model = model
        self.tp = getattr(model, "tp", None)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.names: list[str | None] = [None] * max_loras
        dev, dtype = model.device, model.dtype
        self._slots = _Slots(torch.zeros(max_loras, dtype=torch.float32, device=dev))
        self._layers: dict[str, _LayerLoRA] = {}
        for i, layer in enumerate(model.layers):
            for target in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                           "mlp.down_proj"):
                if target.startswith("mlp.") and model.config.is_moe(i):
                    continue    # a sparse layer: router + experts, no per-slot LoRA weights
                linear = layer.get_submodule(target)
                lora = _LayerLoRA(linear, self._slots, max_loras, max_lora_rank, dtype, dev)
                linear.__dict__["lora"] = lora
                self._layers[f"layers.{i}.{target}"] = lora

    def activate(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write ``adapter`` into ``slot`` (whatever was there is replaced)."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"slot must be in [0, {self.max_loras}), got {slot}")
        if adapter.rank > self.max_lora_rank:
            raise LoRAError(f"adapter {adapter.name!r} has rank {adapter.rank}, above "
                            f"max_lora_rank {self.max_lora_rank}")
        with torch.no_grad():
            for name, lora in self._layers.items():
                layer = int(name.split(".")[1])
                target = name.split(".", 2)[2]
                for proj, (t, part) in _TARGETS.items():
                    if t != target:
                        continue
                    a, b = adapter.weights.get((layer, proj), (None, None))
                    if a is not None and b is not None:
                        a, b = self._shard(f"layers.{layer}.{target}", part, a, b)
                    lora.write(slot, part, a, b)
            self._slots.scaling[slot] = adapter.scaling
        self.names[slot] = adapter.name

    def _shard(self, module: str, part: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's (A [r, K_rank], B [N_rank, r]) of one part (module docstring)."""
        if self.tp is None or self.tp.size == 1:
            return a, b
        cfg = self.model.config
        if module.endswith(("qkv_proj", "gate_up_proj")):      # column parallel: B's rows
            return a, shard_tensor(cfg, self.tp, module, part, "weight", b)
        return shard_tensor(cfg, self.tp, module, None, "weight", a), b   # row parallel

    def deactivate(self, slot: int) -> None:
        """Zero ``slot`` (tokens still pointing at it get no update)."""
        with torch.no_grad():
            for lora in self._layers.values():
                lora.a[slot].zero_()
                lora.b[slot].zero_()
            self._slots.scaling[slot] = 0.0
        self.names[slot] = None

    def set_token_slots(self, token_slots: Tensor | None) -> None:
        """Each token's slot for the following forwards (int32/int64 [T] on the model's
        device, -1 = the base model), or None: no LoRA at all."""
        self._slots.token_slots = token_slots

    @property
    def token_slots(self) -> Tensor | None:
        return self._slots.token_slots
