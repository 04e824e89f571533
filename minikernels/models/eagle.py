"""EAGLE draft heads for speculative decoding (EAGLE-1 and EAGLE-3), as vLLM runs them.

An EAGLE head is one decoder layer that drafts from the *target's* hidden states instead
of re-reading the tokens with a model of its own. Draft position p pairs the target's
hidden state at p (which predicted token p + 1) with the embedding of token p + 1 and
predicts token p + 2; the next draft step feeds the head's own output hidden state and
the token it drafted, at position p + 1. Positions are the target's (rotary at p), and
the head's K/V at position p lives in the target's slot for p (engine/eagle.py).

EAGLE-1 (``method: "eagle"``, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B)::

    x = fc(cat(embed(t_{p+1}), h_p))          # h_p: the target's final-normed state
    x = x + attn(x)                           # no input norm (the first layer has none)
    g = x + mlp(post_attention_layernorm(x))
    logits = target.lm_head(g)                # the target's head; g feeds the next step

EAGLE-3 (``method: "eagle3"``, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B)::

    h_p = fc(cat(s_a, s_b, s_c))              # the residual streams entering target
                                              # layers (2, L // 2, L - 3) by default
    x = attn(cat(input_layernorm(embed(t_{p+1})), hidden_norm(h_p)))   # q/k/v from 2H
    r = h_p + x                               # norm_before_residual: hidden_norm(h_p) + x
    g = r + mlp(post_attention_layernorm(r))  # fed to the next step as is
    logits = lm_head(norm(g))                 # over draft_vocab_size ids; draft id d is
                                              # target id d + d2t[d] (others: -inf)

Checkpoints: a directory (or hub id) with a Llama-style ``config.json`` and safetensors
weights: ``fc.weight`` (+ ``fc.bias``), the layer under ``layers.0.`` (EAGLE-1),
``midlayer.`` (EAGLE-3) or ``model.layers.0.``, EAGLE-3's ``norm.weight``,
``lm_head.weight``, ``d2t`` (``t2d`` is not needed). ``embed_tokens.weight`` is optional:
without it the head shares the target's embedding table. A config with
``eagle_config.eagle_aux_hidden_state_layer_ids`` picks EAGLE-3's target layers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.layers import RMSNorm, RotaryEmbedding
from .config import DecoderConfig
from .decoder import MLP, Attention, CausalLM, HiddenCapture, finish_logits
from .linear import FusedLinear
from .metadata import AttentionMetadata

EAGLE_METHODS = ("eagle", "eagle3")


@dataclass(frozen=True)
class EagleSpec:
    """What a head checkpoint declares, resolved against its target.

    method: "eagle" (EAGLE-1) or "eagle3".
    config: the head layer's DecoderConfig (one Llama layer; rotary table as long as the
        target's context).
    aux_layers: EAGLE-3: the target layers whose incoming residual streams are
        concatenated into fc; None for EAGLE-1 (the final-normed state).
    draft_vocab_size: rows of EAGLE-3's own lm_head (None: the target's lm_head).
    norm_before_residual: EAGLE-3 variant whose residual is the normed hidden state.
    """

    method: str
    config: DecoderConfig
    aux_layers: tuple[int, ...] | None
    draft_vocab_size: int | None
    norm_before_residual: bool = False


class EagleHead(nn.Module):
    """An EAGLE-1 / EAGLE-3 head over a target :class:`CausalLM` (see the module).

    forward(input_ids int64 [T], hidden [T, H] (model dtype), meta, kv_cache) ->
    (logits fp32 [R, target vocab], hidden_out [R, H]) for the rows
    ``meta.logits_indices`` (all T when None). ``hidden`` is :meth:`combine` of the
    target's captured states for positions the target computed, or a previous step's
    ``hidden_out``. kv_cache: one (k, v) pair ``[num_blocks, block_size, Hkv, D]``.
    """

    def __init__(self, spec: EagleSpec, target: CausalLM, dtype: torch.dtype,
                 device: torch.device | str | None = None, own_embedding: bool = False,
                 fc_bias: bool = False) -> None:
        super().__init__()
        c = spec.config
        self.spec = spec
        self.config = c
        self.method = spec.method
        self.__dict__["target"] = target          # shared, not a submodule
        device = torch.device(device) if device is not None else target.device
        H = c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, H, dtype=dtype, device=device) \
            if own_embedding else None
        if self.embed_tokens is not None:
            self.embed_tokens.weight.requires_grad_(False)
        width = 2 * H if spec.aux_layers is None else \
            len(spec.aux_layers) * target.config.hidden_size
        self.fc = FusedLinear(width, H, bias=fc_bias, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(c.rotary_dim, c.max_position_embeddings, c.rope_theta,
                                      c.rope_scaling, device=device,
                                      is_neox_style=not c.rope_interleaved)
        self.self_attn = Attention(c, 0, self.rotary, dtype, device, dense=True)
        self.mlp = MLP(c, dtype, device, dense=True)

        def norm() -> RMSNorm:
            return RMSNorm(H, c.rms_norm_eps, dtype=dtype, device=device)

        self.post_attention_layernorm = norm()
        self.input_layernorm = self.hidden_norm = self.norm = self.lm_head = None
        if self.method == "eagle3":
            attn = self.self_attn    # q / k / v read cat(embedding, hidden): 2H wide
            attn.qkv_proj = FusedLinear(2 * H, [attn.q_size, attn.kv_size, attn.kv_size],
                                        bias=c.qkv_bias, dtype=dtype, device=device)
            self.input_layernorm, self.hidden_norm, self.norm = norm(), norm(), norm()
            if spec.draft_vocab_size is not None:
                self.lm_head = FusedLinear(H, spec.draft_vocab_size, dtype=dtype,
                                           device=device)
        # EAGLE-3: draft id d -> target id d + d2t[d]; None: the vocabularies are equal
        self.register_buffer("d2t", None if spec.draft_vocab_size is None else
                             torch.zeros(spec.draft_vocab_size, dtype=torch.int64,
                                         device=device))
        self._dtype = dtype
        self.target_embed: Tensor | None = None       # use_target_tables (TP)
        self.target_lm_head: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def capture(self, max_tokens: int) -> HiddenCapture:
        """The capture the target must write for this head (install it as
        ``target.hidden_capture`` before CUDA graphs are captured)."""
        t = self.target
        return HiddenCapture(self.spec.aux_layers, t.config.hidden_size, max_tokens,
                             t.dtype, t.device)

    def combine(self, captured: Tensor) -> Tensor:
        """Target states [T, width] -> the head's hidden input [T, H] (EAGLE-3: fc over
        the concatenated layer streams; EAGLE-1: as is, fc runs in the forward)."""
        return self.fc(captured) if self.method == "eagle3" else captured

    def _embed(self, input_ids: Tensor) -> Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(input_ids)
        if self.target_embed is not None:
            return nn.functional.embedding(input_ids, self.target_embed)
        return self.target.embed_tokens(input_ids)

    def _target_logits(self, h: Tensor) -> Tensor:
        """The target's lm_head over h (its own copy under tensor parallel, where the
        target's is vocab-parallel: a collective rank 0 cannot run alone)."""
        if self.target_lm_head is None:
            return self.target.compute_logits(h)
        return finish_logits(nn.functional.linear(h, self.target_lm_head), self.target.config)

    def use_target_tables(self, embed: Tensor | None, lm_head: Tensor | None) -> None:
        """Give the head whole copies of the target's embedding table and lm_head weight
        ([vocab, hidden], on the head's device), used instead of the target's modules
        (tensor parallel: those are vocab-parallel)."""
        dev = self.device
        self.target_embed = None if embed is None else embed.to(dev, self.dtype)
        self.target_lm_head = None if lm_head is None else lm_head.to(dev, self.dtype)

    def forward(self, input_ids: Tensor, hidden: Tensor, meta: AttentionMetadata,
                kv_cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        if hidden.shape[0] != input_ids.shape[0]:
            raise ValueError(f"hidden must have one row per input token ({input_ids.shape[0]}),"
                             f" got {hidden.shape[0]}")
        e = self._embed(input_ids)
        rows = meta.logits_indices
        if self.method == "eagle":
            x = self.fc(torch.cat([e, hidden.to(e.dtype)], dim=-1))
            a = self.self_attn(x, meta, kv_cache)
            x, residual = self.post_attention_layernorm(a, x)
            g = self.mlp(x) + residual
            if rows is not None:
                g = g.index_select(0, rows)
            return self._target_logits(g), g
        hn = self.hidden_norm(hidden)
        residual = hn if self.spec.norm_before_residual else hidden
        a = self.self_attn(torch.cat([self.input_layernorm(e), hn], dim=-1), meta, kv_cache)
        x, residual = self.post_attention_layernorm(a, residual)
        m = self.mlp(x)
        if rows is not None:
            m, residual = m.index_select(0, rows), residual.index_select(0, rows)
        normed, g = self.norm(m, residual)
        if self.lm_head is None:
            return self._target_logits(normed), g
        draft = self.lm_head(normed).float()
        logits = draft.new_full((draft.shape[0], self.target.config.vocab_size),
                                float("-inf"))
        ids = torch.arange(draft.shape[1], device=draft.device) + self.d2t
        logits[:, ids] = draft
        return logits, g

    # ----------------------------------------------------------------- KV cache
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> tuple[Tensor, Tensor]:
        """Zeroed (k, v), each ``[num_blocks, block_size, Hkv, head_dim]`` (model dtype)."""
        shape = (int(num_blocks), int(block_size), self.config.num_kv_heads,
                 self.config.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.num_kv_heads * c.head_dim * torch.empty((), dtype=self.dtype).element_size()


# ---------------------------------------------------------------------- loading
def _layer_key(name: str) -> str | None:
    """A checkpoint name -> the head's name for it (None: not a head tensor)."""
    for prefix in ("model.", "eagle."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for prefix in ("midlayer.", "layers.0."):
        if name.startswith(prefix):
            return name[len(prefix):]
    if name in ("fc.weight", "fc.bias", "norm.weight", "lm_head.weight", "d2t", "t2d",
                "embed_tokens.weight"):
        return "@" + name
    return None


_SHARDS = {"self_attn.q_proj": ("self_attn.qkv_proj", 0),
           "self_attn.k_proj": ("self_attn.qkv_proj", 1),
           "self_attn.v_proj": ("self_attn.qkv_proj", 2),
           "self_attn.o_proj": ("self_attn.o_proj", 0),
           "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
           "mlp.down_proj": ("mlp.down_proj", 0)}
_NORMS = ("input_layernorm", "hidden_norm", "post_attention_layernorm")


def eagle_spec(hf: dict[str, Any], method: str, target: CausalLM) -> EagleSpec:
    """The head's :class:`EagleSpec` from its config.json dict (ValueError naming
    ``speculative_config.method`` / ``model`` when it does not fit the target)."""
    archs = [str(a) for a in hf.get("architectures") or []]
    layer_cfg = hf.get("transformer_layer_config")     # the speculators format
    layer = dict(layer_cfg) if isinstance(layer_cfg, dict) else dict(hf)
    is3 = any("eagle3" in a.lower() for a in archs) or \
        str(hf.get("speculators_model_type", "")).lower() == "eagle3"
    if is3 and method != "eagle3":
        raise ValueError(f"speculative_config.model is an EAGLE-3 head ({archs}): use "
                         f"method 'eagle3', not {method!r}")
    if method == "eagle3" and any(a.endswith("ForCausalLM") and "eagle" not in a.lower()
                                  for a in archs) and not is3:
        raise ValueError(f"speculative_config.model is not an EAGLE-3 head ({archs}): use "
                         f"method 'eagle'")
    tc = target.config
    # Llama's layer, or Qwen2's (q / k / v biases) for heads trained on Qwen2 targets
    arch = "Qwen2ForCausalLM" if archs and archs[0] == "Qwen2ForCausalLM" and not is3 \
        else "LlamaForCausalLM"
    layer.update(architectures=[arch], num_hidden_layers=1,
                 max_position_embeddings=max(int(layer.get("max_position_embeddings") or 0),
                                             int(tc.max_position_embeddings)))
    layer.setdefault("vocab_size", tc.vocab_size)
    config = DecoderConfig.from_hf(layer)
    if method == "eagle" and config.hidden_size != tc.hidden_size:
        raise ValueError(f"speculative_config.model: the EAGLE head's hidden_size "
                         f"({config.hidden_size}) differs from the target's ({tc.hidden_size})")
    aux = None
    draft_vocab = None
    norm_before_residual = False
    if method == "eagle3":
        ec = hf.get("eagle_config") or {}
        ids = ec.get("eagle_aux_hidden_state_layer_ids") if isinstance(ec, dict) else None
        L = tc.num_layers
        aux = tuple(int(i) for i in ids) if ids else (2, L // 2, L - 3) if L >= 4 \
            else tuple(range(min(3, L)))
        if any(not 0 <= i < L for i in aux):
            raise ValueError(f"speculative_config.model: aux hidden-state layers {list(aux)} "
                             f"outside the target's {L} layers")
        target_h = int(hf.get("target_hidden_size") or tc.hidden_size)
        if target_h != tc.hidden_size:
            raise ValueError(f"speculative_config.model: target_hidden_size ({target_h}) "
                             f"differs from the target's hidden_size ({tc.hidden_size})")
        dv = hf.get("draft_vocab_size")
        draft_vocab = int(dv) if dv is not None else int(config.vocab_size)
        norm_before_residual = bool(hf.get("norm_before_residual", False))
    return EagleSpec(method, config, aux, draft_vocab, norm_before_residual)


def load_eagle_head(model: str, method: str, target: CausalLM,
                    revision: str | None = None, target_dir: str | None = None) -> EagleHead:
    """Load an EAGLE head (directory or hub id; safetensors only) for ``target``, in the
    target's dtype and device. ValueError / CheckpointError name what does not fit.

    A tensor-parallel target (``tensor_parallel_size`` > 1) shards its embedding and
    lm_head over the vocabulary: the head then reads whole copies of the ones it needs
    from ``target_dir`` (the target's checkpoint) onto rank 0's device."""
    from .hub import resolve_model
    from .loader import CheckpointError, _iter_file, _read_json, checkpoint_files

    path = resolve_model(model, revision)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"speculative_config.model: no config.json in {path!r}")
    hf = _read_json(cfg_path)
    spec = eagle_spec(hf, method, target)
    tensors: dict[str, Tensor] = {}
    for f in checkpoint_files(path):
        for name, t in _iter_file(f):
            key = _layer_key(name)
            if key is None:
                raise CheckpointError(f"{f}: unexpected tensor {name!r} in an EAGLE head")
            tensors[key] = t
    head = build_eagle_head(spec, target, tensors)
    if getattr(target, "tensor_parallel_size", 1) > 1:
        if target_dir is None:
            raise ValueError("speculative_config: an EAGLE head over a tensor-parallel "
                             "target needs the target's checkpoint directory")
        need_embed = head.embed_tokens is None
        need_head = head.method == "eagle" or head.lm_head is None
        embed, lm_head = _target_tables(target_dir, target.config, need_embed, need_head)
        head.use_target_tables(embed, lm_head)
    return head


def _target_tables(target_dir: str, config: DecoderConfig, embed: bool, lm_head: bool
                   ) -> tuple[Tensor | None, Tensor | None]:
    """Whole ``[vocab, hidden]`` embedding table / lm_head weight read from a checkpoint
    directory (tied: the embedding)."""
    from .loader import CheckpointError, _iter_file, checkpoint_files, map_name

    want = {}
    if embed:
        want["embed_tokens"] = None
    if lm_head:
        want["embed_tokens" if config.tie_word_embeddings else "lm_head"] = None
    for f in checkpoint_files(target_dir):
        for name, t in _iter_file(f, lazy=True):
            target = map_name(name) if t is not None else None
            if target is not None and target[0] in want and target[2] == "weight" and \
                    want[target[0]] is None:
                want[target[0]] = t[:]
    missing = [k for k, v in want.items() if v is None]
    if missing:
        raise CheckpointError(f"{target_dir}: no {missing} tensor for the EAGLE head")
    table = want.get("embed_tokens")
    head = want.get("embed_tokens" if config.tie_word_embeddings else "lm_head") \
        if lm_head else None
    return (table if embed else None), head


def build_eagle_head(spec: EagleSpec, target: CausalLM, tensors: dict[str, Tensor]
                     ) -> EagleHead:
    """An :class:`EagleHead` filled from checkpoint tensors keyed as ``_layer_key``
    names them (layer tensors bare, top-level ones prefixed with '@')."""
    from .loader import CheckpointError

    c = spec.config
    embed = tensors.get("@embed_tokens.weight")
    if embed is not None and tuple(embed.shape) != (target.config.vocab_size, c.hidden_size):
        raise CheckpointError(f"EAGLE head embed_tokens.weight has shape {list(embed.shape)}, "
                              f"expected [{target.config.vocab_size}, {c.hidden_size}] (the "
                              f"target's vocabulary)")
    if embed is None and c.hidden_size != target.config.hidden_size:
        raise CheckpointError("EAGLE head has no embed_tokens.weight and a hidden_size other "
                              "than the target's: its embeddings cannot be shared")
    spec_used = spec
    if spec.method == "eagle3" and "@lm_head.weight" not in tensors:
        if spec.draft_vocab_size not in (None, target.config.vocab_size):
            raise CheckpointError("EAGLE-3 head has draft_vocab_size "
                                  f"{spec.draft_vocab_size} but no lm_head.weight")
        spec_used = EagleSpec(spec.method, c, spec.aux_layers, None, spec.norm_before_residual)
    head = EagleHead(spec_used, target, target.dtype, target.device,
                     own_embedding=embed is not None, fc_bias="@fc.bias" in tensors)
    loaded: set[str] = set()
    for key, t in tensors.items():
        if key == "@t2d":
            continue
        if key == "@d2t":
            if head.d2t is None:
                continue
            if tuple(t.shape) != tuple(head.d2t.shape):
                raise CheckpointError(f"EAGLE head d2t has shape {list(t.shape)}, expected "
                                      f"{list(head.d2t.shape)}")
            ids = torch.arange(t.shape[0]) + t.long()
            if ids.min() < 0 or ids.max() >= target.config.vocab_size:
                raise CheckpointError("EAGLE head d2t maps draft ids outside the target's "
                                      "vocabulary")
            head.d2t.copy_(t.long())
        elif key.startswith("@"):
            mod = {"@fc.weight": (head.fc, "weight"), "@fc.bias": (head.fc, "bias"),
                   "@norm.weight": (head.norm, "weight"),
                   "@lm_head.weight": (head.lm_head, "weight"),
                   "@embed_tokens.weight": (head.embed_tokens, "weight")}[key]
            if mod[0] is None:
                raise CheckpointError(f"EAGLE head ({spec.method}) does not use {key[1:]!r}")
            _copy(getattr(mod[0], mod[1]), t, key[1:])
        else:
            base, _, kind = key.rpartition(".")
            if base in _SHARDS:
                mod_name, shard = _SHARDS[base]
                mod = head.get_submodule(mod_name)
                mod.load_shard(shard, kind, t.to(head.dtype))
            elif base in _NORMS and kind == "weight":
                mod = getattr(head, base)
                if mod is None:
                    raise CheckpointError(f"EAGLE head ({spec.method}) has no {base}")
                _copy(mod.weight, t, key)
            else:
                raise CheckpointError(f"unexpected tensor {key!r} in an EAGLE head")
        loaded.add(key)
    need = {"@fc.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    if spec.method == "eagle3":
        need |= {"input_layernorm.weight", "hidden_norm.weight", "@norm.weight"}
        if head.d2t is not None:
            need.add("@d2t")
    missing = sorted(k.lstrip("@") for k in need - loaded)
    if missing:
        raise CheckpointError(f"EAGLE head checkpoint is missing {missing}")
    return head


def _copy(dst: Tensor, src: Tensor, name: str) -> None:
    from .loader import CheckpointError

    if tuple(dst.shape) != tuple(src.shape):
        raise CheckpointError(f"EAGLE head {name} has shape {list(src.shape)}, expected "
                              f"{list(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def dummy_eagle_head(target: CausalLM, method: str = "eagle", seed: int = 0) -> EagleHead:
    """A random-weight head shaped for ``target`` (its layer is one of the target's:
    same widths, heads and rotary; EAGLE-3: default aux layers, the target's lm_head),
    for benchmarks and tests: N(0, 0.02) weights, unit norms, zero biases."""
    import dataclasses

    if method not in EAGLE_METHODS:
        raise ValueError(f"method must be one of {EAGLE_METHODS}, got {method!r}")
    c = dataclasses.replace(target.config, num_layers=1, quantization_config=None,
                            sliding_window=None, sliding_window_layers=None)
    L = target.config.num_layers
    aux = None if method == "eagle" else \
        ((2, L // 2, L - 3) if L >= 4 else tuple(range(min(3, L))))
    head = EagleHead(EagleSpec(method, c, aux, None), target, target.dtype, target.device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if isinstance(p, Tensor) and p.is_floating_point():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return head.eval()
