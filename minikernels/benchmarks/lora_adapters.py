"""Random PEFT LoRA adapters for a model config, written without peft (the GPU image has
no package index): what ``minikernels bench serve --num-loras N`` serves.

An adapter targets every projection a served model takes adapters on (PEFT's names, see
minikernels/models/lora.py): q / k / v / o of every layer; gate / up / down of the dense
layers' MLP; Qwen2-MoE's shared expert; the experts of the sparse layers in PEFT's
``target_parameters`` layout on the stacked experts (A [E * r, in] expert-major, B [out,
r * E] expert-innermost; gate_up at rank 2r with alpha 2 alpha, as PEFT writes it).
A ~ N(0, 1 / in), B ~ N(0, (0.02)^2 / r): an update of a few percent of the base output.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..models.config import DecoderConfig

_PREFIX = "base_model.model.model.layers"


def _pair(out: dict, key: str, r: int, k_in: int, n_out: int, gen: "torch.Generator",
          dtype: "torch.dtype") -> None:
    import torch

    out[f"{key}.lora_A.weight"] = (torch.randn(r, k_in, generator=gen) / k_in ** 0.5).to(dtype)
    out[f"{key}.lora_B.weight"] = (torch.randn(n_out, r, generator=gen) * 0.02 / r ** 0.5
                                   ).to(dtype)


def random_adapter_tensors(config: "DecoderConfig", rank: int, seed: int = 0,
                           dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
    """{PEFT tensor name: tensor} of a random rank-``rank`` adapter for ``config``."""
    import torch

    dtype = dtype or torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    c = config
    h = c.hidden_size
    out: dict[str, torch.Tensor] = {}
    for i in range(c.num_layers):
        attn = f"{_PREFIX}.{i}.self_attn"
        for proj, k_in, n_out in (("q_proj", h, c.q_size), ("k_proj", h, c.kv_size),
                                  ("v_proj", h, c.kv_size), ("o_proj", c.q_size, h)):
            _pair(out, f"{attn}.{proj}", rank, k_in, n_out, gen, dtype)
        mlp = f"{_PREFIX}.{i}.mlp"
        if not c.is_moe(i):
            inter = c.intermediate_size
            for proj, k_in, n_out in (("gate_proj", h, inter), ("up_proj", h, inter),
                                      ("down_proj", inter, h)):
                _pair(out, f"{mlp}.{proj}", rank, k_in, n_out, gen, dtype)
            continue
        if c.shared_expert_intermediate_size:
            inter = c.shared_expert_intermediate_size
            for proj, k_in, n_out in (("gate_proj", h, inter), ("up_proj", h, inter),
                                      ("down_proj", inter, h)):
                _pair(out, f"{mlp}.shared_expert.{proj}", rank, k_in, n_out, gen, dtype)
        e, inter = c.num_experts, c.moe_intermediate_size
        # the inner wrapper: gate_up_proj [E, 2I, H] at rank 2r; the outer: down_proj
        _pair(out, f"{mlp}.experts.base_layer", 2 * rank * e, h, 2 * inter, gen, dtype)
        _pair(out, f"{mlp}.experts", rank * e, inter, h, gen, dtype)
    return out


def write_random_adapter(config: "DecoderConfig", path: str, rank: int,
                         seed: int = 0) -> str:
    """Write a random PEFT adapter (adapter_config.json + adapter_model.safetensors) for
    ``config`` into ``path``; returns ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = random_adapter_tensors(config, rank, seed)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg: dict = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"]}
    if config.num_experts:
        cfg["target_parameters"] = ["gate_up_proj", "down_proj"]
        cfg["rank_pattern"] = {r".*\.gate_up_proj": 2 * rank}
        cfg["alpha_pattern"] = {r".*\.gate_up_proj": 4 * rank}
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    return path
