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
``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` give a target its own rank / alpha
(its scaling is folded into its B). A fused projection (Phi-3's ``qkv_proj`` /
``gate_up_proj``, GPT-NeoX's ``query_key_value``) is served as its parts' adapters: each
part takes the one A and its own rows of B.

Mixture-of-experts models: the attention projections of every layer, the MLP of the dense
layers (``mlp_only_layers``), Qwen2-MoE's shared expert and the experts take adapters; the
router does not. Experts: one adapter per projection of each expert
(``mlp.experts.{e}.{gate_proj|up_proj|down_proj}``, Mixtral's
``block_sparse_moe.experts.{e}.{w1|w3|w2}``: transformers 4.x modules), or PEFT's
``target_parameters`` on transformers 5's stacked ``experts.gate_up_proj`` [E, 2I, H] /
``experts.down_proj`` (one wrapper per parameter: A [E * r, in] expert-major, B [out,
r * E] expert-innermost). A sparse layer's slots: a13 [S, E, 2R, H] / b13 [S, E, 2I, 2R]
(band 0 the gate adapter, band 1 the up adapter; a stacked gate_up adapter spans both, so
up to rank 2R) and a2 [S, E, R, I] / b2 [S, E, H, R], applied inside ``ops.fused_moe``
(``ops.MoELoRA``): each (token, expert) pair adds its adapter's update to the expert's
gate / up pre-activations and to its down output. Refused by name: DoRA, biases,
``modules_to_save`` (new heads or embeddings), targets other than these projections, a
dense-MLP target on a sparse layer. (``fan_in_fan_out``, PEFT's flag for GPT-2's Conv1D
layers, only changes how PEFT merges; the factors and the forward are the same.)

Tensor parallel (a model built with ``tp``): each rank's slots hold its shard of every
adapter, cut like the base weights (models/parallel.py ``shard_tensor``). Column-parallel
layers (qkv, gate_up, the recurrent mixers' in_proj / dt_proj) keep A whole and take the
rows of B that match the rank's output rows (its q / kv heads, its intermediate slice,
its mixer heads / channels per section); row-parallel layers (o, down, the mixers'
out_proj, Mamba-1's x_proj) take the
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
from .parallel import parallel_style, shard_tensor

#: HF projection -> (our fused module, part index)
_TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
            "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
            "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
            "down_proj": ("mlp.down_proj", 0)}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Qwen2-MoE's shared expert (a dense SiLU-gated MLP beside the experts)
_SHARED_TARGETS = {"shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", 0),
                   "shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", 1),
                   "shared_expert.down_proj": ("mlp.shared_expert.down_proj", 0)}
#: a layer's projection: layer, block (None: OPT's fc1 / fc2 sit in the layer itself),
#: projection, half (BLOOM's / GPT-J's layers are ``transformer.h.{i}``)
_NAME_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\."
                      r"(?:(self_attn|mlp|attention|self_attention|attn\.attention|attn|ffn|"
                      r"feed_forward)\.)?"
                      r"((?:shared_expert\.)?(?:\w+_proj|c_fc|fc1|fc2|dense|dense_h_to_4h|"
                      r"dense_4h_to_h|fc_in|fc_out|w1|w2|w3))"
                      r"\.lora_([AB])(?:\.default)?\.weight$")
#: hybrid recurrent models' mixers (Qwen3.5's linear_attn, LFM2's conv, the Mamba-2
#: layers' mamba): HF module -> (our fused module, part index)
_RECURRENT_TARGETS = {
    "linear_attn.in_proj_qkv": ("linear_attn.in_proj", 0),
    "linear_attn.in_proj_z": ("linear_attn.in_proj", 1),
    "linear_attn.in_proj_b": ("linear_attn.in_proj", 2),
    "linear_attn.in_proj_a": ("linear_attn.in_proj", 3),
    "linear_attn.out_proj": ("linear_attn.out_proj", 0),
    "conv.in_proj": ("conv.in_proj", 0), "conv.out_proj": ("conv.out_proj", 0),
    "mamba.in_proj": ("mamba.in_proj", 0), "mamba.out_proj": ("mamba.out_proj", 0),
    # Mamba-1's (Jamba, Mamba, FalconMamba) two inner projections
    "mamba.x_proj": ("mamba.x_proj", 0), "mamba.dt_proj": ("mamba.dt_proj", 0)}
#: the mixer each recurrent block belongs to
_RECURRENT_MIXERS = {"linear_attn": ("gated_deltanet",), "conv": ("short_conv",),
                     "mamba": ("mamba", "mamba2", "mamba2_attention")}
#: (Mamba / FalconMamba name each layer's Mamba-1 mixer "mixer": read as "mamba")
_RECURRENT_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(linear_attn|conv|mamba|mixer)\.(\w+)"
                           r"\.lora_([AB])(?:\.default)?\.weight$")
#: one expert's projection (transformers 4.x modules; Mixtral's w1 / w3 / w2)
_EXPERT_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                        r"(\w+)\.lora_([AB])(?:\.default)?\.weight$")
#: a projection stored fused (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's
#: query_key_value): PEFT adapts it as one module, one A and B's rows over the parts
_FUSED_RE = re.compile(r"^(.*(?:^|\.)(?:layers|h|blocks)\.(\d+)\.)(self_attn\.qkv_proj|"
                       r"mlp\.gate_up_proj|attention\.query_key_value|"
                       r"self_attention\.query_key_value|attn\.c_attn|attn\.Wqkv)"
                       r"\.lora_([AB])((?:\.default)?\.weight)$")
_EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                "w1": "gate", "w3": "up", "w2": "down"}
#: stacked experts (transformers 5) through PEFT's target_parameters: one wrapper per
#: parameter, nested (``experts.base_layer.lora_A`` is the inner one)
_STACKED_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\."
                         r"((?:base_layer\.)*)lora_([AB])(?:\.default)?\.weight$")


class LoRAError(ValueError):
    """An adapter this model cannot serve (the message names the field or tensor)."""


@dataclass
class LoRAAdapter:
    """One PEFT LoRA adapter: rank, scaling, its (A [r, in], B [out, r]) per (layer, HF
    projection) and, for mixture-of-experts layers, its experts' (A [E, r, in], B [E, out,
    r]) per (layer, kind): kind "gate" / "up" / "down" (one adapter per projection of each
    expert) or "gate_up" (one adapter over the stacked gate and up rows: PEFT's
    target_parameters on transformers 5's ``experts.gate_up_proj``)."""

    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    experts: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def needed_rank(self) -> int:
        """The smallest max_lora_rank whose slots hold this adapter (a stacked gate_up
        adapter spans the gate and up bands: up to twice the slot rank)."""
        ranks = [a.shape[0] for a, _ in self.weights.values()]
        ranks += [-(-a.shape[1] // 2) if kind == "gate_up" else a.shape[1]
                  for (_, kind), (a, _) in self.experts.items()]
        return max(ranks, default=self.rank)

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

        tensors = [t for fpath in files for t in load_file(fpath).items()]
        weights, experts = _parse_tensors(tensors, config, _Ranks(cfg, scaling), path)
        if not weights and not experts:
            raise LoRAError(f"{path}: the adapter holds no LoRA weights")
        return cls(name or os.path.basename(os.path.normpath(path)), rank, scaling, weights,
                   experts)


class _Ranks:
    """Each target's rank and scaling: ``r`` / ``lora_alpha``, or the first matching
    ``rank_pattern`` / ``alpha_pattern`` key (PEFT's rule: the key is a regex matching the
    end of the target's name after a dot, e.g. ``.*\\.gate_up_proj``; PEFT itself writes
    such patterns when it maps an MoE's gate_proj / up_proj targets onto transformers 5's
    stacked ``gate_up_proj`` at twice the rank). A target whose scaling differs from the
    adapter's has it folded into its B, so one scaling per slot serves every target."""

    def __init__(self, cfg: dict[str, Any], scaling: float) -> None:
        self.r = int(cfg["r"])
        self.alpha = float(cfg.get("lora_alpha", self.r))
        self.rslora = bool(cfg.get("use_rslora"))
        self.rank_pattern = dict(cfg.get("rank_pattern") or {})
        self.alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        self.scaling = scaling

    @staticmethod
    def _match(patterns: dict[str, Any], name: str) -> Any:
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return None

    def rank(self, name: str) -> int:
        r = self._match(self.rank_pattern, name)
        return self.r if r is None else int(r)

    def fold(self, name: str, b: Tensor) -> Tensor:
        """B times this target's scaling over the adapter's (1: B itself)."""
        alpha = self._match(self.alpha_pattern, name)
        alpha = self.alpha if alpha is None else float(alpha)
        r = self.rank(name)
        own = alpha / math.sqrt(r) if self.rslora else alpha / r
        return b if own == self.scaling else b * (own / self.scaling)


def _parse_tensors(tensors: list[tuple[str, Tensor]], config: DecoderConfig, ranks: _Ranks,
                   path: str) -> tuple[dict, dict]:
    """(weights, experts) of :class:`LoRAAdapter` from an adapter's tensors (PEFT's
    names: ``model.layers.{i}.{self_attn|mlp}.{proj}``, ``...mlp.shared_expert.{proj}``,
    ``...mlp.experts.{e}.{proj}`` or Mixtral's ``block_sparse_moe.experts.{e}.w1|w2|w3``,
    and the stacked ``...mlp.experts.{gate_up_proj|down_proj}`` of target_parameters)."""
    halves: dict[tuple[int, str], dict[str, Tensor]] = {}
    # non-gated MLPs: StarCoder 2's c_fc / Phi's fc1 / GPT-NeoX's dense_h_to_4h is the one
    # part of gate_up_proj, c_proj / fc2 / dense_4h_to_h down_proj; Phi's and GPT-NeoX's
    # attention output is "dense"
    aliases = {"c_fc": "gate_proj", "c_proj": "down_proj", "fc1": "gate_proj",
               "fc2": "down_proj", "dense_h_to_4h": "gate_proj",
               "dense_4h_to_h": "down_proj"} if not config.mlp_gated else {}
    if config.architecture in ("phi", "gpt_neox", "bloom", "falcon"):
        aliases["dense"] = "o_proj"
    if config.architecture in ("opt", "gptj", "gpt_neo"):  # out_proj (OPT: fc1 / fc2 in
        # the layer; GPT-Neo: attn.attention.{q,k,v,out}_proj)
        aliases["out_proj"] = "o_proj"
    if config.architecture == "gptj":          # GPT-J: attn.out_proj, mlp.fc_in / fc_out
        aliases.update(fc_in="gate_proj", fc_out="down_proj")
    if config.architecture == "mpt":           # MPT: attn.out_proj, ffn.up_proj / down_proj
        aliases.update(out_proj="o_proj", up_proj="gate_proj")
    if config.architecture in ("lfm2", "lfm2_moe", "lfm3"):   # feed_forward.w1 / w3 / w2
        aliases.update(w1="gate_proj", w3="up_proj", w2="down_proj")
    if config.architecture in ("nemotron", "arcee", "jais2", "nemotron_h"):
        aliases["up_proj"] = "gate_proj"       # (their non-gated MLP's one up projection)
    # projections named by their block: GPT-2's / GPT-BigCode's attn.c_proj is the
    # attention output (mlp.c_proj the MLP's down projection)
    block_aliases = {("attn", "c_proj"): "o_proj"} \
        if config.architecture in ("gpt2", "gpt_bigcode") else {}
    if config.architecture in ("lfm2", "lfm2_moe"):   # LFM2's attention output
        block_aliases[("self_attn", "out_proj")] = "o_proj"
    attn_blocks = config.architecture in ("gptj", "gpt2", "gpt_bigcode", "mpt")
    hf_proj: dict[tuple[int, str], str] = {}     # PEFT's own name of each aliased target
    if config.architecture in ("granite_hybrid", "granitemoeshared"):   # fused shared MLP
        mlp = ".mlp.shared_expert." if config.num_experts else ".mlp."
        tensors = [(k.replace(".shared_mlp.input_linear.", f"{mlp}gate_up_proj.").replace(
            ".shared_mlp.output_linear.", f"{mlp}down_proj."), t) for k, t in tensors]
    if config.architecture == "nemotron_h":    # each block's one "mixer", by its kind
        tensors = [(_nemotron_h_key(k, config), t) for k, t in tensors]
    tensors = _split_fused(tensors, config, hf_proj, path)
    per_expert: dict[tuple[int, str], dict[int, dict[str, Tensor]]] = {}
    stacked: dict[tuple[int, str], dict[str, Tensor]] = {}
    names: dict[tuple[int, str], str] = {}     # PEFT's module name of each expert target
    for key, tensor in tensors:
        m = _NAME_RE.search(key)
        if m is not None and m.group(2) in ("attn", "ffn") and not attn_blocks:
            m = None     # "attn." / "ffn." blocks: GPT-J's, GPT-2's, GPT-BigCode's, MPT's
        if m is not None and m.group(2) is None and m.group(3) not in ("fc1", "fc2"):
            m = None     # only OPT's fc1 / fc2 sit in the layer itself
        if m is not None:
            layer, block, proj, half = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            alias = block_aliases.get((block, proj)) or aliases.get(proj)
            if alias is not None:
                hf_proj[(layer, alias)] = proj
                proj = alias
            elif not config.mlp_gated and proj in ("gate_proj", "up_proj"):
                raise LoRAError(f"{path}: {key!r} targets a gated MLP projection; this "
                                f"model's MLP is not gated (c_fc / c_proj)")
            target = (_TARGETS.get(proj) or _SHARED_TARGETS.get(proj) or (None,))[0]
            if target is None or layer >= config.num_layers:
                raise LoRAError(f"{path}: {key!r} targets a module this model does not have")
            sparse = config.is_moe(layer)
            if proj in _SHARED_TARGETS and not (sparse and
                                                config.shared_expert_intermediate_size):
                raise LoRAError(f"{path}: {key!r} targets a shared expert layer {layer} "
                                "does not have")
            if proj in _TARGETS and target.startswith("mlp.") and sparse:
                raise LoRAError(f"{path}: {key!r} targets a dense MLP projection, but layer "
                                f"{layer} is a mixture-of-experts layer (its experts are "
                                "``mlp.experts.{e}.*``)")
            if target.startswith("self_attn.") and not config.has_attention(layer):
                raise LoRAError(f"{path}: {key!r} targets attention in layer {layer}, a "
                                f"{config.mixer(layer)} layer of this model")
            if (proj in ("k_proj", "v_proj") and config.kv_source(layer) is not None) or (
                    proj == "v_proj" and config.k_eq_v_layers is not None and
                    layer in config.k_eq_v_layers):
                raise LoRAError(f"{path}: {key!r} targets a projection layer {layer} does "
                                "not have (Gemma 4: it reads another layer's K / V, or its "
                                "v is its k)")
            if target.startswith("mlp.") and not config.has_mlp(layer):
                raise LoRAError(f"{path}: {key!r} targets an MLP in layer {layer}, which has "
                                "none in this model")
            halves.setdefault((layer, proj), {})[half] = tensor
            continue
        m = _RECURRENT_RE.search(key)
        if m is not None:
            layer, block = int(m.group(1)), m.group(2)
            if block == "mixer" and config.architecture in ("mamba", "falcon_mamba", "mamba2"):
                block = "mamba"
            target = f"{block}.{m.group(3)}"
            if block == "mixer" or (target in ("mamba.x_proj", "mamba.dt_proj") and
                                    layer < config.num_layers and
                                    config.mixer(layer) != "mamba"):
                kind = config.mixer(layer) if layer < config.num_layers else "missing"
                raise LoRAError(f"{path}: {key!r} targets a module this model does not have "
                                f"(layer {layer} is a {kind} layer)")
            if target not in _RECURRENT_TARGETS or layer >= config.num_layers or \
                    config.mixer(layer) not in _RECURRENT_MIXERS[block]:
                kind = config.mixer(layer) if layer < config.num_layers else "missing"
                raise LoRAError(f"{path}: {key!r} targets a module this model does not have "
                                f"(layer {layer} is a {kind} layer)")
            halves.setdefault((layer, target), {})[m.group(4)] = tensor
            continue
        m = _EXPERT_RE.search(key)
        if m is not None and m.group(3) in _EXPERT_PROJ:
            layer, expert = int(m.group(1)), int(m.group(2))
            names[(layer, _EXPERT_PROJ[m.group(3)])] = key.split(".lora_")[0]
            _check_expert_layer(config, layer, key, path)
            if expert >= config.num_experts:
                raise LoRAError(f"{path}: {key!r}: expert {expert} of {config.num_experts}")
            kind = _EXPERT_PROJ[m.group(3)]
            per_expert.setdefault((layer, kind), {}).setdefault(expert, {})[m.group(4)] = tensor
            continue
        m = _STACKED_RE.search(key)
        if m is not None:
            layer = int(m.group(1))
            if config.architecture == "gpt_oss":
                raise LoRAError(f"{path}: {key!r}: LoRA on GPT-OSS's stacked experts (x @ W "
                                "layout, gate / up interleaved) is not supported")
            _check_expert_layer(config, layer, key, path)
            stacked.setdefault((layer, m.group(2)), {})[m.group(3)] = tensor
            names[(layer, m.group(2))] = key.split(".experts.")[0] + ".experts"
            continue
        raise LoRAError(f"{path}: unexpected adapter tensor {key!r} (only lora_A / lora_B of "
                        "the attention, MLP, shared-expert and expert projections are "
                        "supported)")
    weights = {}
    for (layer, proj), pair in sorted(halves.items()):
        a, b = _both_halves(pair, f"layers.{layer}.{proj}", path)
        if proj in _RECURRENT_TARGETS:
            k_in, n_out = _recurrent_shape(config, proj)
            name = f"model.layers.{layer}.{proj}"
        else:
            k_in, n_out = _projection_shape(config, proj, layer)
            name = (f"model.layers.{layer}.{'self_attn' if proj in _ATTENTION else 'mlp'}."
                    f"{hf_proj.get((layer, proj), proj)}")
        rank = ranks.rank(name)
        _check_shapes(a, b, [rank, k_in], [n_out, rank], f"layers.{layer}.{proj}", path)
        weights[(layer, proj)] = (a, ranks.fold(name, b))
    experts = {}
    e_count = config.num_experts
    for (layer, kind), by_expert in sorted(per_expert.items()):
        k_in, n_out = _expert_shape(config, kind)
        name = names[(layer, kind)]
        rank = ranks.rank(name)
        pairs = {}
        for expert, pair in sorted(by_expert.items()):
            where = f"layers.{layer}.experts.{expert}.{kind}"
            pairs[expert] = _both_halves(pair, where, path)
            _check_shapes(*pairs[expert], [rank, k_in], [n_out, rank], where, path)
        dtype = next(iter(pairs.values()))[0].dtype
        a = torch.zeros(e_count, rank, k_in, dtype=dtype)    # experts it leaves out: zeros
        b = torch.zeros(e_count, n_out, rank, dtype=dtype)
        for expert, (ea, eb) in pairs.items():
            a[expert], b[expert] = ea, eb
        experts[(layer, kind)] = (a, ranks.fold(name, b))
    for (layer, depth), pair in sorted(stacked.items()):
        where = f"layers.{layer}.experts.{depth}lora"
        a, b = _both_halves(pair, where, path)
        kind, (k_in, n_out) = _stacked_kind(config, a, b, ranks, names[(layer, depth)],
                                            where, path)
        name = f"{names[(layer, depth)]}.{kind}_proj"
        rank = ranks.rank(name)
        if (layer, kind) in experts:
            raise LoRAError(f"{path}: {where}: layer {layer}'s experts have two {kind} "
                            "adapters")
        # PEFT's ParamWrapper: A [E * r, in] (expert-major rows), B [out, r * E] (expert
        # innermost): expert e's factors are A.view(E, r, in)[e], B.view(out, r, E)[..., e]
        experts[(layer, kind)] = (a.reshape(e_count, rank, k_in),
                                  ranks.fold(name, b.reshape(n_out, rank, e_count)
                                             .permute(2, 0, 1)))
    for layer in {lyr for lyr, _ in experts}:
        kinds = {k for lyr, k in experts if lyr == layer}
        if "gate_up" in kinds and kinds & {"gate", "up"}:
            raise LoRAError(f"{path}: layer {layer}'s experts have both a stacked gate_up "
                            "adapter and per-expert gate / up adapters")
    return weights, experts


_NEMOTRON_H_MIXER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mixer\.")
_NEMOTRON_H_BLOCKS = {"mamba2": "mamba", "attention": "self_attn", "none": "mlp"}


def _nemotron_h_key(key: str, config: DecoderConfig) -> str:
    """A Nemotron-H adapter key under the decoder's block names: layer i's ``mixer`` is its
    mamba, self_attn or (MLP blocks) mlp."""
    m = _NEMOTRON_H_MIXER_RE.search(key)
    if m is None or int(m.group(1)) >= config.num_layers:
        return key
    block = _NEMOTRON_H_BLOCKS[config.mixer(int(m.group(1)))]
    return key[:m.start()] + m.group(0).replace(".mixer.", f".{block}.") + key[m.end():]


def _split_fused(tensors: list[tuple[str, Tensor]], config: DecoderConfig,
                 hf_proj: dict[tuple[int, str], str], path: str) -> list[tuple[str, Tensor]]:
    """``tensors`` with each fused projection's adapter (Phi-3's ``qkv_proj`` /
    ``gate_up_proj``, GPT-NeoX's ``query_key_value``) as its parts' adapters: every part
    takes the one A [r, in] and its own rows of B [out, r] (q / k / v, or gate / up), so
    x A^T B^T is unchanged. GPT-NeoX's B rows are per head [heads, (q, k, v), head_dim]:
    reordered as its weight is. ``hf_proj`` records PEFT's module name of each part."""
    out: list[tuple[str, Tensor]] = []
    for key, tensor in tensors:
        m = _FUSED_RE.match(key)
        if m is None:
            out.append((key, tensor))
            continue
        prefix, layer, fused, half, suffix = m.groups()
        if fused.startswith("attn.") and config.architecture not in ("gpt2", "gpt_bigcode",
                                                                     "mpt"):
            out.append((key, tensor))        # not this model's layout: refused below
            continue
        attention = not fused.startswith("mlp.")
        if attention:
            parts = ("q_proj", "k_proj", "v_proj")
            sizes = [config.q_size, config.kv_size, config.kv_size]
        else:
            if not config.mlp_gated:
                raise LoRAError(f"{path}: {key!r} targets a gated MLP projection; this "
                                "model's MLP is not gated")
            parts, sizes = ("gate_proj", "up_proj"), [config.intermediate_size] * 2
        chunks: list[Tensor] = [tensor] * len(parts)
        if half == "B":
            if tensor.ndim != 2 or tensor.shape[0] != sum(sizes):
                raise LoRAError(f"{path}: {key!r}: expected [{sum(sizes)}, r] (the fused "
                                f"{' + '.join(map(str, sizes))} rows), got "
                                f"{list(tensor.shape)}")
            if config.qkv_grouped:             # GPT-NeoX's / BLOOM's / Falcon's layout
                from .loader import grouped_qkv_to_blocks

                tensor = grouped_qkv_to_blocks(tensor, config)
            chunks = list(tensor.split(sizes))
        block = "self_attn" if attention else "mlp"
        for part, chunk in zip(parts, chunks):
            hf_proj[(int(layer), part)] = fused.split(".")[1]
            out.append((f"{prefix}{block}.{part}.lora_{half}{suffix}", chunk))
    return out


def _both_halves(pair: dict[str, Tensor], where: str, path: str) -> tuple[Tensor, Tensor]:
    if set(pair) != {"A", "B"}:
        raise LoRAError(f"{path}: {where} has lora_{''.join(pair)} without its other half")
    return pair["A"], pair["B"]


def _check_shapes(a: Tensor, b: Tensor, want_a: list[int], want_b: list[int], where: str,
                  path: str) -> None:
    if list(a.shape) != want_a or list(b.shape) != want_b:
        raise LoRAError(f"{path}: {where} lora_A / lora_B have shapes {list(a.shape)} / "
                        f"{list(b.shape)}; expected {want_a} / {want_b}")


def _check_expert_layer(config: DecoderConfig, layer: int, key: str, path: str) -> None:
    if layer >= config.num_layers or not config.is_moe(layer):
        raise LoRAError(f"{path}: {key!r} targets experts that layer {layer} of this model "
                        "does not have")


def _expert_shape(config: DecoderConfig, kind: str) -> tuple[int, int]:
    """(in, out) features of one expert's projection of ``kind``."""
    h, i = config.hidden_size, config.moe_intermediate_size
    return {"gate": (h, i), "up": (h, i), "gate_up": (h, 2 * i), "down": (i, h)}[kind]


def _stacked_kind(config: DecoderConfig, a: Tensor, b: Tensor, ranks: "_Ranks",
                  module: str, where: str, path: str) -> tuple[str, tuple[int, int]]:
    """Which stacked expert parameter a target_parameters adapter wraps, from its shapes:
    gate_up has (in, out) = (H, 2I), down (I, H); the two never coincide."""
    e = config.num_experts
    for kind in ("gate_up", "down"):
        k_in, n_out = _expert_shape(config, kind)
        rank = ranks.rank(f"{module}.{kind}_proj")
        if list(a.shape) == [e * rank, k_in] and list(b.shape) == [n_out, e * rank]:
            return kind, (k_in, n_out)
    ru, rd = ranks.rank(f"{module}.gate_up_proj"), ranks.rank(f"{module}.down_proj")
    raise LoRAError(f"{path}: {where} lora_A / lora_B have shapes {list(a.shape)} / "
                    f"{list(b.shape)}; expected the stacked experts' gate_up_proj "
                    f"([{e * ru}, {config.hidden_size}] / "
                    f"[{2 * config.moe_intermediate_size}, {e * ru}]) or down_proj "
                    f"([{e * rd}, {config.moe_intermediate_size}] / "
                    f"[{config.hidden_size}, {e * rd}])")


def _check_config(cfg: dict[str, Any], where: str) -> None:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    # (fan_in_fan_out, set for GPT-2's Conv1D layers, only changes how PEFT merges an
    # adapter into the weight; A [r, in] and B [out, r] and the forward are the same)
    if cfg.get("use_dora"):
        raise LoRAError(f"{where}: use_dora is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{where}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    for target in cfg.get("target_parameters") or ():
        if str(target).rsplit(".", 1)[-1] not in ("gate_up_proj", "down_proj"):
            raise LoRAError(f"{where}: target_parameters entry {target!r} is not supported "
                            "(only the stacked experts' gate_up_proj / down_proj)")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported "
                        "(adapters that replace whole modules, e.g. lm_head)")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for v in pattern.values()):
            raise LoRAError(f"{where}: {key} must map target patterns to positive numbers, "
                            f"got {pattern!r}")
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise LoRAError(f"{where}: r must be a positive int, got {r!r}")


def _projection_shape(config: DecoderConfig, proj: str, layer: int = 0) -> tuple[int, int]:
    """(in, out) features of an HF projection of ``config``'s decoder layer ``layer``
    (Gemma 4's layers differ in head dim, kv heads and MLP width)."""
    c = config
    q_size = c.num_heads * c.layer_head_dim(layer)
    kv_size = c.layer_kv_heads(layer) * c.layer_head_dim(layer)
    inter = c.layer_intermediate_size(layer)
    q_out = q_size * (2 if c.attn_output_gate else 1)      # (Qwen3.5: [q | gate] per head)
    return {"q_proj": (c.hidden_size, q_out), "k_proj": (c.hidden_size, kv_size),
            "v_proj": (c.hidden_size, kv_size), "o_proj": (q_size, c.hidden_size),
            "gate_proj": (c.hidden_size, inter),
            "up_proj": (c.hidden_size, inter),
            "down_proj": (inter, c.hidden_size),
            "shared_expert.gate_proj": (c.hidden_size, c.shared_expert_intermediate_size),
            "shared_expert.up_proj": (c.hidden_size, c.shared_expert_intermediate_size),
            "shared_expert.down_proj": (c.shared_expert_intermediate_size, c.hidden_size)}[proj]


def _recurrent_shape(config: DecoderConfig, target: str) -> tuple[int, int]:
    """(in, out) features of a hybrid model's recurrent-mixer projection (HF's name)."""
    c, h = config, config.hidden_size
    key_size = c.linear_num_key_heads * c.linear_key_head_dim
    value_size = c.linear_num_value_heads * c.linear_value_head_dim
    if target.startswith("mamba.") and c.layer_mixers and "mamba" in c.layer_mixers:
        inner1, rank, n = c.mamba_inner_size, c.mamba_dt_rank, c.mamba_state_size
        return {"mamba.in_proj": (h, 2 * inner1), "mamba.out_proj": (inner1, h),
                "mamba.x_proj": (inner1, rank + 2 * n), "mamba.dt_proj": (rank, inner1)}[target]
    inner = c.mamba_num_heads * c.mamba_head_dim
    gn = c.mamba_num_groups * c.mamba_state_size
    return {"linear_attn.in_proj_qkv": (h, 2 * key_size + value_size),
            "linear_attn.in_proj_z": (h, value_size),
            "linear_attn.in_proj_b": (h, c.linear_num_value_heads),
            "linear_attn.in_proj_a": (h, c.linear_num_value_heads),
            "linear_attn.out_proj": (value_size, h),
            "conv.in_proj": (h, 3 * h), "conv.out_proj": (h, h),
            "mamba.in_proj": (h, 2 * inner + 2 * gn + c.mamba_num_heads),
            "mamba.out_proj": (inner, h)}[target]


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


class _ExpertLoRA:
    """One sparse layer's expert slot weights, read by the fused MoE op (``ops.MoELoRA``):
    a13 [S, E, 2R, H] and b13 [S, E, 2I, 2R] (band 0: the gate adapter, or one adapter
    over the stacked gate and up rows; band 1: the up adapter), a2 [S, E, R, I] and b2
    [S, E, H, R] (down). I is this rank's share under tensor parallel. Non-gated experts
    (Nemotron 3): b13 [S, E, I, 2R], the up adapter's rows 0:I (band 1)."""

    def __init__(self, experts: Any, slots: _Slots, max_loras: int, rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        e, h, i, r = experts.num_experts, experts.hidden, experts.inter, rank
        self.rank, self.inter = r, i
        self.gated = getattr(experts, "gated", True)
        self.a13 = torch.zeros(max_loras, e, 2 * r, h, dtype=dtype, device=device)
        self.b13 = torch.zeros(max_loras, e, 2 * i if self.gated else i, 2 * r, dtype=dtype,
                               device=device)
        self.a2 = torch.zeros(max_loras, e, r, i, dtype=dtype, device=device)
        self.b2 = torch.zeros(max_loras, e, h, r, dtype=dtype, device=device)
        self.slots = slots

    def write(self, slot: int, kind: str, a: Tensor, b: Tensor) -> None:
        """Slot ``slot``'s adapter of ``kind`` (this rank's shard: a [E, r, in_local], b
        [E, out_local, r])."""
        r, i = a.shape[1], self.inter
        if kind == "down":
            self.a2[slot, :, :r].copy_(a)
            self.b2[slot, :, :, :r].copy_(b)
            return
        band = self.rank if kind == "up" else 0      # a stacked gate_up: both bands
        if not self.gated and kind != "up":
            raise LoRAError(f"a {kind!r} adapter on non-gated experts (they have up_proj and "
                            "down_proj only)")
        rows = {"gate": slice(0, i), "up": slice(i, 2 * i) if self.gated else slice(0, i),
                "gate_up": slice(0, 2 * i)}[kind]
        self.a13[slot, :, band:band + r].copy_(a)
        self.b13[slot, :, rows, band:band + r].copy_(b)

    def clear(self, slot: int) -> None:
        for t in (self.a13, self.b13, self.a2, self.b2):
            t[slot].zero_()

    def op_args(self) -> Any:
        """``ops.MoELoRA`` of the current step, None without token slots."""
        slots = self.slots.token_slots
        if slots is None:
            return None
        return ops.MoELoRA(self.a13, self.b13, self.a2, self.b2, slots, self.slots.scaling)


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
        self._experts: dict[int, _ExpertLoRA] = {}
        for i, layer in enumerate(model.layers):
            sparse = model.config.is_moe(i)
            targets = ["self_attn.qkv_proj", "self_attn.o_proj"] \
                if getattr(layer, "self_attn", True) is not None else []
            if getattr(layer, "mlp", True) is None:
                pass                  # (Nemotron-H's mixer-only blocks)
            elif not sparse:
                targets += ["mlp.gate_up_proj", "mlp.down_proj"]
            elif layer.mlp.shared_expert is not None:
                targets += ["mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj"]
            for block in ("linear_attn", "conv", "mamba"):   # hybrid models' mixers
                if getattr(layer, block, None) is not None:
                    targets += [f"{block}.in_proj", f"{block}.out_proj"]
                    if hasattr(getattr(layer, block), "x_proj"):    # Mamba-1
                        targets += [f"{block}.x_proj", f"{block}.dt_proj"]
            for target in targets:
                linear = layer.get_submodule(target)
                lora = _LayerLoRA(linear, self._slots, max_loras, max_lora_rank, dtype, dev)
                linear.__dict__["lora"] = lora
                self._layers[f"layers.{i}.{target}"] = lora
            if sparse:       # the router takes no adapter; the experts do
                experts = layer.mlp.experts
                lora = _ExpertLoRA(experts, self._slots, max_loras, max_lora_rank, dtype, dev)
                experts.__dict__["lora"] = lora
                self._experts[i] = lora

    def activate(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write ``adapter`` into ``slot`` (whatever was there is replaced)."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"slot must be in [0, {self.max_loras}), got {slot}")
        if adapter.needed_rank() > self.max_lora_rank:
            raise LoRAError(f"adapter {adapter.name!r} needs max_lora_rank >= "
                            f"{adapter.needed_rank()} (rank {adapter.rank}), above "
                            f"max_lora_rank {self.max_lora_rank}")
        with torch.no_grad():
            for name, lora in self._layers.items():
                layer = int(name.split(".")[1])
                target = name.split(".", 2)[2]
                for proj, (t, part) in (*_TARGETS.items(), *_SHARED_TARGETS.items(),
                                        *_RECURRENT_TARGETS.items()):
                    if t != target or part >= len(lora.sizes):   # (a non-gated MLP: 1)
                        continue
                    a, b = adapter.weights.get((layer, proj), (None, None))
                    if a is not None and b is not None:
                        a, b = self._shard(f"layers.{layer}.{target}", part, a, b)
                    lora.write(slot, part, a, b)
            for layer, lora in self._experts.items():
                lora.clear(slot)
                for kind in ("gate_up", "gate", "up", "down"):
                    if (layer, kind) in adapter.experts:
                        lora.write(slot, kind, *self._shard_experts(
                            kind, *adapter.experts[(layer, kind)]))
            self._slots.scaling[slot] = adapter.scaling
        self.names[slot] = adapter.name

    def _shard(self, module: str, part: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's (A [r, K_rank], B [N_rank, r]) of one part (module docstring)."""
        if self.tp is None or self.tp.size == 1:
            return a, b
        cfg = self.model.config
        style = parallel_style(cfg, module)
        if style == "column":                                 # B's rows
            return a, shard_tensor(cfg, self.tp, module, part, "weight", b)
        if style == "row":                                    # A's columns
            return shard_tensor(cfg, self.tp, module, None, "weight", a), b
        return a, b                                           # replicated

    def _shard_experts(self, kind: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's share of the experts' (A [E, r, in], B [E, out, r]): the experts'
        intermediate rows [s0, s1) (models/parallel.py): B's gate / up rows, A's down
        columns."""
        if self.tp is None or self.tp.size == 1:
            return a, b
        i = self.model.config.moe_intermediate_size
        s0, s1 = self.tp.split(i, "moe_intermediate_size")
        if kind == "down":
            return a[:, :, s0:s1], b
        if kind == "gate_up":
            return a, torch.cat([b[:, s0:s1], b[:, i + s0:i + s1]], dim=1)
        return a, b[:, s0:s1]

    def deactivate(self, slot: int) -> None:
        """Zero ``slot`` (tokens still pointing at it get no update)."""
        with torch.no_grad():
            for lora in self._layers.values():
                lora.a[slot].zero_()
                lora.b[slot].zero_()
            for expert_lora in self._experts.values():
                expert_lora.clear(slot)
            self._slots.scaling[slot] = 0.0
        self.names[slot] = None

    def tensors(self) -> list[Tensor]:
        """Every slot tensor (scalings, the layers' A / B, the experts' A / B): what
        sleep mode empties and refills."""
        out = [self._slots.scaling]
        for lora in self._layers.values():
            out += [lora.a, lora.b]
        for e in self._experts.values():
            out += [e.a13, e.b13, e.a2, e.b2]
        return out

    def set_token_slots(self, token_slots: Tensor | None) -> None:
        """Each token's slot for the following forwards (int32/int64 [T] on the model's
        device, -1 = the base model), or None: no LoRA at all."""
        self._slots.token_slots = token_slots

    @property
    def token_slots(self) -> Tensor | None:
        return self._slots.token_slots
