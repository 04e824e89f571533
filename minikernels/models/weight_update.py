"""Replacing a built model's weights in place: RL weight sync (``LLM.load_weights``).

A trainer (TRL's GRPO, verl, OpenRLHF, ...) generates with the engine, updates its own
transformers copy of the policy, then pushes the new tensors under their Hugging Face
names (``model.named_parameters()`` or a state dict). :func:`load_weights` maps each name
as the checkpoint loader does (models/loader.py ``map_name``: fused q/k/v and gate/up
parts, Phi-3's fused checkpoints, Mixtral's expert names, per-expert and stacked expert
tensors, norms, embeddings, the router) and **copies into the existing tensors**: no
parameter is replaced, so CUDA graphs captured over them stay valid and nothing is
reallocated. Dense models only: an int4 / fp8 / int8 layer would have to be re-quantized into
buffers of another shape, which is refused by name. A tied lm_head follows its embedding.
A tensor-parallel shard (``model.tp``) takes its rank's rows / columns of each full
tensor, as the checkpoint loader does (models/parallel.py ``shard_tensor``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .decoder import CausalLM
from .linear import FusedLinear
from .loader import (_IGNORED, _family_name, _load_experts, _load_kv_scale, _unfuse,
                     map_name)
from .moe import FusedExperts
from .parallel import shard_tensor


def load_weights(model: CausalLM, weights: "Iterable[tuple[str, Tensor]] | Mapping[str, Tensor]"
                 ) -> int:
    """Copy HF-named tensors into ``model`` in place; returns how many were loaded.

    weights: (name, tensor) pairs or a state dict, any device / floating dtype (cast to
    the model's). Names the loader would ignore (rotary caches, ...) are skipped; an
    unknown name, a shape mismatch or a quantized target raises ValueError naming it.
    """
    config = model.config
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    items = weights.items() if isinstance(weights, Mapping) else weights
    count = 0
    with torch.no_grad():
        for hf_name, tensor in items:
            if not isinstance(tensor, Tensor):
                raise ValueError(f"load_weights: {hf_name!r} is not a tensor")
            for name, t in _unfuse(_family_name(hf_name, config), tensor, config):
                if _load_one(model, modules, params, name, t):
                    count += 1
    return count


def _load_one(model: CausalLM, modules: dict[str, Any], params: dict[str, Tensor],
              name: str, tensor: Tensor) -> bool:
    config = model.config
    target = map_name(name)
    if target is None:
        if _IGNORED.search(name):
            return False
        raise ValueError(f"load_weights: unknown tensor {name!r}")
    mod_name, shard, kind = target
    if mod_name == "lm_head" and config.tie_word_embeddings:
        return False               # tied: the embedding table is the lm_head
    mod = modules.get(mod_name)
    if mod is None:
        raise ValueError(f"load_weights: {name!r} names no module of this model")
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn:
        raise ValueError(f"load_weights: {name!r} must be a dense floating-point tensor, "
                         f"got {tensor.dtype}")
    tp = getattr(model, "tp", None)
    if tp is not None and tp.size > 1:     # this rank's rows / columns of it
        try:
            tensor = shard_tensor(config, tp, mod_name, shard, kind, tensor)
        except ValueError as exc:
            raise ValueError(f"load_weights: {name}: {exc}") from None
    if kind in ("k_scale", "v_scale"):
        _load_kv_scale(getattr(mod, kind), tensor, name)
        return True
    try:
        if isinstance(mod, FusedExperts):
            if mod.w13 is None:
                raise ValueError("the experts are quantized (int4 / fp8 / int8)")
            _load_experts(mod, mod_name, shard, kind, tensor, name)
        elif isinstance(mod, FusedLinear):
            if mod.weight is None and kind == "weight":
                raise ValueError("the layer is quantized (int4 / fp8 / int8)")
            mod.load_shard(shard, kind, tensor.to(device=model.device, dtype=model.dtype))
        else:
            param = params.get(f"{mod_name}.{kind}")
            if param is None:
                raise ValueError("no such parameter")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"shape mismatch: expected {list(param.shape)}, got "
                                 f"{list(tensor.shape)}")
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    except ValueError as exc:
        raise ValueError(f"load_weights: {name}: {exc}") from None
    return True
