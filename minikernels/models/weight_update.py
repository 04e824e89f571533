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

All or nothing: every given tensor is checked (name, dtype, shape, quantized target,
tensor-parallel shard) before the first copy, so a bad one leaves the model unchanged.
:func:`check_weights` (``load_weights(..., dry_run=True)``) runs those checks alone and
also takes meta tensors (``torch.empty(shape, dtype=..., device="meta")``), e.g. built
from safetensors headers: a checkpoint on disk validated without reading its data. Only
the given tensors are checked: a subset of the model's is a legitimate update.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .decoder import CausalLM
from .linear import FusedLinear
from .loader import (_IGNORED, CheckpointError, _family_name, _load_experts, _load_kv_scale,
                     _unfuse, check_experts, check_kv_scale, map_name)
from .moe import FusedExperts
from .parallel import shard_tensor

#: what load_weights takes: (HF name, tensor) pairs or a state dict
NamedTensors = Iterable[tuple[str, Tensor]] | Mapping[str, Tensor]


def load_weights(model: CausalLM, weights: NamedTensors, dry_run: bool = False,
                 stream: bool = False) -> int:
    """Copy HF-named tensors into ``model`` in place; returns how many were loaded.

    weights: (name, tensor) pairs or a state dict, any device / floating dtype (cast to
    the model's). Names the loader would ignore (rotary caches, ...) are skipped; an
    unknown name, a shape mismatch or a quantized target raises ValueError naming it.
    Every tensor is checked before the first copy (the pairs are collected into a list
    first: a generator's tensors are held at once), so on an error nothing has changed.

    dry_run: only check (:func:`check_weights`); nothing is copied and meta tensors are
    accepted; returns how many would load. stream: check and copy one tensor at a time
    without holding the set (a bad tensor leaves the earlier ones copied), for a set
    already validated (``dry_run=True`` on meta tensors of the same shapes and dtypes) or
    too large to hold at once.
    """
    if dry_run:
        return check_weights(model, weights)
    if not stream:
        weights = validated(model, weights)
    return _apply(model, weights, copy=True)


def check_weights(model: CausalLM, weights: NamedTensors) -> int:
    """:func:`load_weights`' checks on every tensor of ``weights``, copying nothing: the
    same name mapping, dtype, shape, quantized-target and tensor-parallel shard checks
    with the same ValueErrors. Tensors may be meta tensors (only KV-cache scales' values
    are checked, where they are given). Returns how many tensors would load."""
    return _apply(model, weights, copy=False)


def validated(model: CausalLM, weights: NamedTensors) -> list[tuple[str, Tensor]]:
    """``weights`` as a list of (name, tensor) pairs, after :func:`check_weights` passed
    on all of them (ValueError otherwise)."""
    pairs = list(_items(weights))
    check_weights(model, pairs)
    return pairs


def _items(weights: NamedTensors) -> Iterable[tuple[str, Any]]:
    return weights.items() if isinstance(weights, Mapping) else weights


def _apply(model: CausalLM, weights: NamedTensors, copy: bool) -> int:
    """Check each tensor and, with ``copy``, copy it in; how many loaded (or would)."""
    config = model.config
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    count = 0
    with torch.no_grad():
        for hf_name, tensor in _items(weights):
            if not isinstance(tensor, Tensor):
                raise ValueError(f"load_weights: {hf_name!r} is not a tensor")
            for name, t in _unfuse(_family_name(hf_name, config), tensor, config):
                if _load_one(model, modules, params, name, t, copy):
                    count += 1
    return count


def _load_one(model: CausalLM, modules: dict[str, Any], params: dict[str, Tensor],
              name: str, tensor: Tensor, copy: bool = True) -> bool:
    """Check one (unfused) tensor against its target and, with ``copy``, copy it in;
    False for a tensor that is skipped (ignored names, a tied lm_head)."""
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
    kv_scale = kind in ("k_scale", "v_scale")
    if not copy and not kv_scale:   # shapes and dtypes are all the checks look at
        tensor = _meta(tensor)
    tp = getattr(model, "tp", None)
    if tp is not None and tp.size > 1:     # this rank's rows / columns of it
        try:
            tensor = shard_tensor(config, tp, mod_name, shard, kind, tensor)
        except ValueError as exc:
            raise ValueError(f"load_weights: {name}: {exc}") from None
    if kv_scale:
        (_load_kv_scale if copy else check_kv_scale)(getattr(mod, kind), tensor, name)
        return True
    try:
        if isinstance(mod, FusedExperts):
            if mod.w13 is None:
                raise ValueError("the experts are quantized (int4 / fp8 / int8 / mxfp4): "
                                 "load_weights updates dense experts only")
            if copy:
                _load_experts(mod, mod_name, shard, kind, tensor, name)
            else:
                check_experts(mod, shard, kind, tensor, name)
        elif isinstance(mod, FusedLinear):
            if mod.weight is None and kind == "weight":
                raise ValueError("the layer is quantized (int4 / fp8 / int8)")
            if copy:
                mod.load_shard(shard, kind, tensor.to(device=model.device, dtype=model.dtype))
            else:
                mod.check_shard(shard, kind, tensor.shape)
        else:
            param = params.get(f"{mod_name}.{kind}")
            if param is None:
                raise ValueError("no such parameter")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"shape mismatch: expected {list(param.shape)}, got "
                                 f"{list(tensor.shape)}")
            if copy:
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    except ValueError as exc:
        raise ValueError(f"load_weights: {name}: {exc}") from None
    return True


def _meta(tensor: Tensor) -> Tensor:
    """A data-less stand-in of ``tensor`` (its shape and dtype): checking never allocates."""
    if tensor.device.type == "meta":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
