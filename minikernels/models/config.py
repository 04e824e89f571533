"""DecoderConfig: the one config the decoder reads, from a HF config.json or a built-in name.

Covers the Llama family (Llama 2/3/3.1/3.2, Mistral, Granite 3.x, Phi-3 / Phi-3.5 /
Phi-4-mini, SmolLM3), OLMo 2, GLM-4 / GLM-Edge, Qwen2/2.5/Qwen3 and Gemma 1/2/3 (text):
decoder layers with
GQA attention, neox rotary and a gated MLP. Differences are flags:

    qkv_bias        Qwen2 (q/k/v biases); Llama's ``attention_bias`` also sets o_bias
    qk_norm         Qwen3, Gemma 3 (RMSNorm over each q/k head before rotary); OLMo 2
                    (qk_norm_full: over all heads of q / k at once)
    post_norm       OLMo 2: no norm before attention / MLP, one after each (added to the
                    residual stream)
    rope_scaling    Llama 3.1/3.2 ("llama3"), "linear", "yarn" (Qwen long context),
                    "longrope" (Phi-3 / Phi-3.5 / Phi-4-mini)
    partial_rotary_factor   the rotated fraction of each head (Phi-4-mini: 0.75)
    nope_layers     layers without rotary embedding (SmolLM3: every 4th)
    rope_interleaved        GPT-J-style rotary pairs (2i, 2i + 1) (GLM)
    sliding_window  Mistral v0.1 (all layers), Qwen2 with use_sliding_window (layers >=
                    max_window_layers), Gemma 2 (every other layer), Gemma 3 (5 of 6);
                    ``layer_types`` in a config says it per layer
    hidden_act      silu (Llama, Qwen, Mistral), gelu_pytorch_tanh (Gemma), gelu
    Gemma           norm_weight_offset 1 (norms scale by 1 + weight), embed_scale
                    sqrt(hidden), sandwich_norm (Gemma 2/3: norms after attention and MLP
                    too), attention_scale (query_pre_attn_scalar ** -0.5),
                    attn_logit_softcapping / final_logit_softcapping (Gemma 2),
                    sliding_rope_theta (Gemma 3's local layers: their own rope base)
    Granite         embedding_multiplier, residual_multiplier (on each sublayer's output
                    before the residual add), attention_scale (attention_multiplier),
                    logits_scaling (logits divided by it)
    GPT-OSS         attention_sinks, sliding / full layer_types, YaRN; every MLP a mixture
                    of experts with moe_router_bias, moe_expert_biases and moe_activation
                    "swigluoai" (swiglu_alpha / swiglu_limit)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# HF ``architectures`` entry -> our architecture family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MinistralForCausalLM": "ministral",
    "Ministral3ForCausalLM": "ministral3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "GraniteMoeForCausalLM": "granitemoe",
    # Granite-MoE with a shared MLP beside the experts (added ungated)
    "GraniteMoeSharedForCausalLM": "granitemoeshared",
    "OlmoeForCausalLM": "olmoe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    # VaultGemma (1B, trained with differential privacy): Gemma 2 without the sandwich norms
    "VaultGemmaForCausalLM": "vaultgemma",
    "Gemma3ForCausalLM": "gemma3",
    # Gemma 4 (text decoder): sliding / full layers of different head dims and kv heads,
    # proportional rope on the full ones, v RMS-normalized, K = V on full layers, later
    # layers reusing earlier layers' K / V, per-layer input embeddings, a scalar per layer
    "Gemma4ForCausalLM": "gemma4",
    # Gemma 3n (E2B / E4B, text decoder): AltUp's four parallel streams, LAuReL, Gaussian
    # top-k MLP sparsity, per-layer inputs and Gemma 4's K / V sharing and v norm
    "Gemma3nForCausalLM": "gemma3n",
    "GraniteForCausalLM": "granite",
    # HyperCLOVA X SEED: Granite's multipliers (logits multiplied) and sandwich norms
    "HyperCLOVAXForCausalLM": "hyperclovax",
    # Granite SWA: Granite with sliding-window layers, a rope base per layer (0: NoPE) and
    # a learned attention sink per head
    "GraniteSWAForCausalLM": "granite_swa",
    # Granite 4.0's dense attention models (granite-4.0-micro); the Mamba hybrids refused
    "GraniteMoeHybridForCausalLM": "granite_hybrid",
    "Phi3ForCausalLM": "phi3",
    "SmolLM3ForCausalLM": "smollm3",
    "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
    # OLMo Hybrid: OLMo 3's post-norm attention (no rope in the released checkpoints)
    # beside pre-norm Gated DeltaNet layers with separate projections
    "OlmoHybridForCausalLM": "olmo_hybrid",
    "Exaone4ForCausalLM": "exaone4",
    # EXAONE 3.0 / 3.5 (2.4B, 7.8B, 32B): Llama under GPT-2-style tensor names
    # (transformer.h.N.attn.attention.*) and config keys (num_layers, ...)
    "ExaoneForCausalLM": "exaone",
    "HunYuanDenseV1ForCausalLM": "hunyuan",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "HeliumForCausalLM": "helium",
    # Qwen2-VL / Qwen2.5-VL checkpoints with the text fields at the top level (their
    # text decoder; see TEXT_ONLY_WRAPPERS)
    "Qwen2VLForConditionalGeneration": "qwen2",
    "Qwen2_5_VLForConditionalGeneration": "qwen2",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    # LayerNorm families (ops.layer_norm)
    "StableLmForCausalLM": "stablelm",
    "Starcoder2ForCausalLM": "starcoder2",
    # Cohere (Aya Expanse / Aya 23 8B) and Cohere 2 (Command R7B): LayerNorm without a
    # bias, attention and MLP in parallel from one norm, GPT-J rope, logits scaled
    "CohereForCausalLM": "cohere",
    "Cohere2ForCausalLM": "cohere2",
    # Phi-1.5 / Phi-2: Cohere's parallel block with LayerNorm biases, StarCoder 2's
    # non-gated MLP (fc1 / fc2), partial rotary, an lm_head bias
    "PhiForCausalLM": "phi",
    # GPT-NeoX (Pythia, Dolly v2, RedPajama-INCITE): LayerNorms with biases, attention and
    # MLP in parallel from two norms of one stream, q / k / v fused per head, partial rope
    "GPTNeoXForCausalLM": "gpt_neox",
    # Learned absolute position embeddings, LayerNorms, non-gated MLPs: GPT-2 (and
    # DistilGPT2), OPT, GPT-BigCode (StarCoder 1, SantaCoder: multi-query attention)
    "GPT2LMHeadModel": "gpt2",
    "OPTForCausalLM": "opt",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    # GPT-Neo: learned positions, local (sliding-window) layers, unscaled attention
    "GPTNeoForCausalLM": "gpt_neo",
    # BLOOM / BLOOMZ: ALiBi, a LayerNorm on the embeddings, per-head fused q / k / v
    "BloomForCausalLM": "bloom",
    # GPT-J: Phi's parallel block without q / k / v biases, GPT-J rope on rotary_dim dims
    "GPTJForCausalLM": "gptj",
    # Falcon (7B, 11B, and the 40B / 180B layout): parallel attention / MLP from one or
    # two LayerNorms, multi-query or grouped fused q / k / v, rope
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",        # (tiiuae's original RefinedWeb configs)
    # MPT: ALiBi with its own slopes (alibi_bias_max), bias-free LayerNorms and linears
    "MptForCausalLM": "mpt",
    "MPTForCausalLM": "mpt",          # (the hub's mosaicml/mpt-* config.json spelling)
    # Nemotron (Minitron 4B / 8B, Nemotron-Mini): LayerNorm1P (scale 1 + w), a squared-ReLU
    # up / down MLP, partial rope
    "NemotronForCausalLM": "nemotron",
    # Arcee (AFM-4.5B): Llama with a squared-ReLU up / down MLP
    "ArceeForCausalLM": "arcee",
    # Jais 2: Arcee's squared-ReLU MLP with LayerNorms and biases
    "Jais2ForCausalLM": "jais2",
    # Apertus: Llama with q / k norms and a non-gated xIELU MLP (learned per layer)
    "ApertusForCausalLM": "apertus",
    # OLMo 1: LayerNorms without parameters, q / k / v clamped (clip_qkv)
    "OlmoForCausalLM": "olmo",
    # NanoChat: RMSNorms without parameters (also after the embedding and on q / k after
    # rope), a squared-ReLU fc1 / fc2 MLP, a final logit softcap
    "NanoChatForCausalLM": "nanochat",
    # LFM2 (Liquid): a hybrid of gated short-convolution layers and attention layers with
    # q / k norms; the conv layers keep a per-sequence state (engine: a state slot)
    "Lfm2ForCausalLM": "lfm2",
    # LFM2-MoE (LFM2-8B-A1B): LFM2's layers, sigmoid-routed experts after the dense ones
    "Lfm2MoeForCausalLM": "lfm2_moe",
    # LFM3 (Liquid): LFM2's short convs beside sliding-window attention (default rope) and
    # full attention (proportional rope), a sigmoid gate per attention head, sandwich norms
    "Lfm3ForCausalLM": "lfm3",
    # Qwen3.5 (dense): Gated DeltaNet linear-attention layers (a recurrent state per
    # sequence) and, every fourth layer, gated attention with (1 + w) q / k norms
    "Qwen3_5ForCausalLM": "qwen3_5",
    # Qwen3.5 MoE (35B-A3B ...): Qwen3.5's layers with Qwen2-MoE's experts and gated shared
    # expert in every MLP
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    # Falcon-H1: every layer runs Mamba-2 and attention in parallel from one norm (their
    # outputs summed), with muP multipliers on the branches, the MLP and the logits
    "FalconH1ForCausalLM": "falcon_h1",
    # Bamba (IBM): Granite 4.0-H's Mamba-2 layers and attention (half rope) layers, each
    # with a SwiGLU MLP
    "BambaForCausalLM": "bamba",
    # Nemotron-H (Nemotron-H 4B / 8B, NVIDIA Nemotron Nano 2): single-role blocks, each one
    # norm and one of Mamba-2, attention (no rope) or a squared-ReLU MLP
    "NemotronHForCausalLM": "nemotron_h",
    # Mamba (state-spaces' Mamba-1 checkpoints in transformers' layout) and FalconMamba:
    # attention-free, every layer a norm and a Mamba-1 mixer (FalconMamba: B, C and dt
    # RMS-normalized without weights)
    "MambaForCausalLM": "mamba",
    "FalconMambaForCausalLM": "falcon_mamba",
    # Zamba2 (Zyphra): Mamba-2 layers; every few a shared transformer block (attention over
    # [stream, embeddings], a gated MLP, per-invocation low-rank adapters) feeds the Mamba
    # layer's input
    "Zamba2ForCausalLM": "zamba2",
    # Jamba (AI21): Mamba-1 layers (dt / B / C norms with weights) and attention layers
    # without rope, each with a SwiGLU MLP or, every expert_layer_period layers, experts
    "JambaForCausalLM": "jamba",
    # Mamba-2 (state-spaces' mamba2-* in transformers' layout, Mamba-Codestral-7B):
    # attention-free, every layer a norm and a Mamba-2 mixer (the gated norm after the gate)
    "Mamba2ForCausalLM": "mamba2",
    # Zamba (v1, Zyphra's Zamba-7B): multi-head Mamba-1 layers; every attn_layer_period
    # layers one shared transformer block (attention over [stream, embeddings], a gated
    # MLP, no adapters) feeds the Mamba layer's input through the layer's own linear
    "ZambaForCausalLM": "zamba",
    # GPT-OSS (openai/gpt-oss-20b / 120b): attention with q / k / v / o biases, a learned
    # sink per head, sliding / full layers, YaRN; every MLP a mixture of experts with a
    # biased router (softmax over the top-k logits) and biased clamped-SwiGLU experts
    "GptOssForCausalLM": "gpt_oss",
}
#: ``XForSequenceClassification``: the decoder of ``XForCausalLM`` with a ``score`` head
#: (``mk.Classifier`` reads it; the generative model refuses such a checkpoint).
CLASSIFIER_SUFFIX = "ForSequenceClassification"


#: causal LMs not named ``XForCausalLM`` (the classifier's decoder)
_CAUSAL_NAMES = {"GPT2ForCausalLM": "GPT2LMHeadModel"}


def causal_architecture(arch: str) -> str:
    """``QwenXForSequenceClassification`` -> ``QwenXForCausalLM`` (others unchanged;
    ``GPT2ForSequenceClassification`` -> ``GPT2LMHeadModel``)."""
    if arch.endswith(CLASSIFIER_SUFFIX):
        causal = arch[:-len(CLASSIFIER_SUFFIX)] + "ForCausalLM"
        return _CAUSAL_NAMES.get(causal, causal)
    return arch


def is_classifier_architecture(arch: str | None) -> bool:
    return bool(arch) and str(arch).endswith(CLASSIFIER_SUFFIX)


_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "ministral": "ministral",
                "ministral3": "ministral3",
                "qwen2": "qwen2", "qwen3": "qwen3",
                "qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen2_moe", "mixtral": "mixtral", "granitemoe": "granitemoe",
                "granitemoeshared": "granitemoeshared",
                "olmoe": "olmoe",
                "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
                "gemma4_text": "gemma4", "gemma3n_text": "gemma3n",
                "vaultgemma": "vaultgemma",
                "granite": "granite", "granitemoehybrid": "granite_hybrid",
                "granite_swa": "granite_swa", "hyperclovax": "hyperclovax",
                "phi3": "phi3", "smollm3": "smollm3",
                "olmo2": "olmo2", "olmo3": "olmo3", "exaone4": "exaone4",
                "olmo_hybrid": "olmo_hybrid", "exaone": "exaone",
                "mamba": "mamba", "falcon_mamba": "falcon_mamba", "jamba": "jamba",
                "zamba2": "zamba2", "mamba2": "mamba2", "zamba": "zamba",
                "hunyuan_v1_dense": "hunyuan", "ernie4_5": "ernie4_5",
                "helium": "helium", "glm": "glm",
                "glm4": "glm4", "stablelm": "stablelm", "starcoder2": "starcoder2",
                "cohere": "cohere", "cohere2": "cohere2", "phi": "phi",
                "gpt_neox": "gpt_neox", "gpt2": "gpt2", "opt": "opt",
                "gpt_bigcode": "gpt_bigcode", "gpt_neo": "gpt_neo", "bloom": "bloom",
                "gptj": "gptj",
                "falcon": "falcon", "RefinedWeb": "falcon", "RefinedWebModel": "falcon",
                "mpt": "mpt", "nemotron": "nemotron", "arcee": "arcee", "jais2": "jais2",
                "apertus": "apertus",
                "olmo": "olmo", "nanochat": "nanochat", "lfm2": "lfm2", "lfm2_moe": "lfm2_moe",
                "lfm3": "lfm3",
                "qwen3_5_text": "qwen3_5", "qwen3_5": "qwen3_5",
                "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_5_moe": "qwen3_5_moe", "falcon_h1": "falcon_h1",
                "bamba": "bamba",
                "nemotron_h": "nemotron_h", "gpt_oss": "gpt_oss"}
#: the families with learned absolute position embeddings (no rope)
_LEARNED_POSITIONS = ("gpt2", "opt", "gpt_bigcode", "gpt_neo")
_GEMMA = ("gemma", "gemma2", "gemma3", "vaultgemma", "gemma4", "gemma3n")
#: the mixture-of-experts families (models/moe.py)
_MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "granitemoe", "granitemoeshared", "olmoe",
        "qwen3_5_moe", "lfm2_moe", "gpt_oss")
#: LFM2's hybrid decoders (short conv + attention), dense and MoE
_LFM2 = ("lfm2", "lfm2_moe", "lfm3")
#: Qwen3.5's hybrid decoders (Gated DeltaNet + gated attention), dense and MoE
_QWEN3_5 = ("qwen3_5", "qwen3_5_moe")
#: Multimodal architectures whose text decoder is served (text-only prompts): the
#: checkpoint's ``text_config`` and ``language_model`` tensors; the image encoder is not
#: loaded.
TEXT_ONLY_WRAPPERS: dict[str, str | None] = {
    "Gemma3ForConditionalGeneration": "gemma3",
    "Gemma4ForConditionalGeneration": "gemma4",
    "Gemma3nForConditionalGeneration": "gemma3n",
    # Qwen2-VL / Qwen2.5-VL / Qwen3-VL: M-RoPE gives text tokens one position on all three
    # axes, which is plain rope, so text prompts run on the Qwen2 / Qwen3 decoder
    "Qwen2VLForConditionalGeneration": "qwen2",
    "Qwen2_5_VLForConditionalGeneration": "qwen2",
    "Qwen3VLForConditionalGeneration": "qwen3",
    # Qwen3.5 (every size is published multimodal): its hybrid text decoder
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    # Mistral 3 (Ministral 3, Mistral Small 3.x): the family of its text_config's model_type
    "Mistral3ForConditionalGeneration": None}
# transformers' Gemma3TextConfig defaults: a hub config's text_config lists only the
# fields that differ (gemma-3-4b-it: hidden_size, intermediate_size, layers, rope_scaling,
# sliding_window).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {"gemma3": dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, query_pre_attn_scalar=256,
    sliding_window=4096, rope_theta=1e6, rope_local_base_freq=1e4)}
# Top-level fields of a multimodal config that hold for its text decoder.
_CARRIED = ("eos_token_id", "bos_token_id", "tie_word_embeddings", "quantization_config",
            "dtype", "torch_dtype")
#: hidden_act -> the gated MLP's activation op (``ops.silu_and_mul`` / ``gelu_and_mul``)
GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
                     "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                     "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
                     "relu2": "relu2", "xielu": "xielu"}


#: the token mixers a decoder layer may have (DecoderConfig.layer_mixers)
LAYER_MIXERS = ("attention", "short_conv", "gated_deltanet", "mamba", "mamba2",
                "mamba2_attention", "zamba_hybrid", "none")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a config feature is not implemented."""


@dataclass
class DecoderConfig:
    """Shape and flavour of a decoder (fields follow HF names where one exists)."""

    # "llama" | "mistral" | "ministral" | "ministral3" | "qwen2" | "qwen3" | "gemma"
    # | "gemma2" | "gemma3"
    # | "granite"
    # | "phi3" | "smollm3" | "olmo2" | "olmo3" | "glm" | "glm4" | "qwen3_moe" | "mixtral"
    # | "granitemoe"
    # | "olmoe" | "qwen2_moe" | "stablelm" | "starcoder2" | ...
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # Each head rotates its first int(head_dim * partial_rotary_factor) dims.
    partial_rotary_factor: float = 1.0
    # Layers that use no position embedding at all (NoPE; SmolLM3).
    nope_layers: list[int] | None = None
    # Rotary pairs (2i, 2i + 1) (GPT-J style, GLM) instead of (i, rotary_dim / 2 + i).
    rope_interleaved: bool = False
    # NanoChat: rotate by the negated angles
    rope_reversed: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    sliding_window: int | None = None
    # Layers that use the sliding window (None = all layers when sliding_window is set).
    sliding_window_layers: list[int] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    qk_norm_full: bool = False     # OLMo 2: the q / k norms span all heads
    qk_norm_after_rope: bool = False   # HunYuan: per-head q / k norms after rope
    post_norm: bool = False        # OLMo 2: x + norm(attn(x)), then x + norm(mlp(x))
    # the layers post_norm applies to (None = all; OLMo Hybrid: its attention layers)
    post_norm_layers: list[int] | None = None
    # "rms" (RMSNorm) or "layer" (LayerNorm: StableLM, StarCoder 2; with a bias when
    # norm_bias); rms_norm_eps is the eps of either.
    norm_type: str = "rms"
    norm_bias: bool = False
    # False: the MLP is down(act(up(x))) (StarCoder 2's c_fc / c_proj), not gated.
    mlp_gated: bool = True
    # Cohere: h + attn(norm(h)) + mlp(norm(h)), one norm per layer (no
    # post_attention_layernorm).
    parallel_residual: bool = False
    # GPT-NeoX: in a parallel block the MLP reads its own norm of the stream
    # (post_attention_layernorm), h + attn(norm1(h)) + mlp(norm2(h)).
    parallel_mlp_norm: bool = False
    lm_head_bias: bool = False     # Phi-2: the lm_head has a bias
    # "rope"; "learned": a table of absolute position embeddings (GPT-2, OPT,
    # GPT-BigCode) added to the token embeddings, row position + position_offset (OPT: 2);
    # "alibi" (BLOOM): each head's scores biased by -slope * distance. With either no layer
    # rotates.
    position_embedding: str = "rope"
    position_offset: int = 0
    # Fused q / k / v rows stored per kv head, [kv_heads, (its q heads, k, v), head_dim]
    # (GPT-NeoX, BLOOM, GPT-BigCode without multi-query: one q head per group; Falcon's
    # new decoder architecture): the loader reorders them to q, k, v blocks.
    qkv_grouped: bool = False
    # BLOOM: a norm of the token embeddings before the first layer
    embed_norm: bool = False
    # ALiBi slopes: None = BLOOM's (nn.layers.alibi_slopes); a number = MPT's with this
    # alibi_bias_max (nn.layers.mpt_alibi_slopes)
    alibi_max_bias: float | None = None
    # False (OLMo 1, NanoChat): norms without weight or bias (q / k norms too)
    norm_affine: bool = True
    # Granite SWA / GPT-OSS: a learned sink logit per head in every attention softmax
    attention_sinks: bool = False
    # OLMo 1: q, k and v clamped to [-clip_qkv, clip_qkv]; None = off
    clip_qkv: float | None = None
    hidden_act: str = "silu"
    # Hybrid recurrent decoders: each layer's token mixer, "attention", "short_conv"
    # (LFM2's gated depthwise causal convolution: in_proj -> B, C, x; C * conv(B * x);
    # out_proj) or "gated_deltanet" (Qwen3.5's linear attention: a short conv over q / k /
    # v, the gated delta rule, a gated RMSNorm); None = attention everywhere. A
    # non-attention layer has no KV cache: it keeps a fixed-size state per sequence (the
    # engine's state slots).
    layer_mixers: list[str] | None = None
    # Which layers have an MLP (None = all). Nemotron-H's blocks are single-role: a mixer
    # without an MLP, or an MLP alone (mixer "none").
    layer_mlps: list[bool] | None = None
    conv_kernel: int = 0            # the causal convolution's width (conv_L_cache, ...)
    conv_bias: bool = False         # biases on the conv layers' in / out projections, conv
    # Gated DeltaNet's heads: q / k heads of linear_key_head_dim, v heads of
    # linear_value_head_dim (a multiple of the q / k heads)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    # Mamba-2 (Granite 4.0-H): mamba_num_heads heads of mamba_head_dim (their product the
    # inner width), B / C in mamba_num_groups groups of mamba_state_size, in_proj giving
    # [gate z | x B C | dt], dt clamped to mamba_dt_limit after softplus
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_num_groups: int = 0
    mamba_state_size: int = 0
    mamba_proj_bias: bool = False               # in_proj's bias
    mamba_out_bias: bool = False                # out_proj's bias
    mamba_dt_limit: tuple[float, float] = (0.0, float("inf"))
    # Mamba-1 ("mamba" layers: Mamba, FalconMamba, Jamba): in_proj gives [x | z] of
    # mamba_inner_size each, x runs through the conv, x_proj gives [dt (mamba_dt_rank) | B |
    # C (mamba_state_size each)], dt_proj widens dt to one step per channel; A is
    # [inner, N] (a decay per channel and state). mamba_bcdt_norm: RMS norms of dt, B and C
    # before use, "" none, "plain" (FalconMamba: no weights) or "weighted" (Jamba), of eps
    # mamba_bcdt_eps. mamba_proj_bias / mamba_out_bias: the in / out projections' biases.
    mamba_inner_size: int = 0
    mamba_dt_rank: int = 0
    mamba_bcdt_norm: str = ""
    mamba_bcdt_eps: float = 1e-6
    # Zamba (v1): the Mamba-1 mixer split into this many independent heads of
    # mamba_inner_size / heads channels, each with its own x_proj / dt_proj (dt rank
    # mamba_dt_rank per head) and its own B / C; in_proj's rows interleave x and z
    # ([x_0, z_0, x_1, z_1, ...], the checkpoint's layout). 1 = plain Mamba-1.
    mamba1_num_heads: int = 1
    # the Mamba-2 gated norm's eps (None = rms_norm_eps; Zamba2: 1e-5)
    mamba_norm_eps: float | None = None
    # Per-layer attention shapes (Gemma 4's full layers: a wider head_dim, fewer kv heads);
    # None = head_dim / num_kv_heads everywhere
    layer_head_dims: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    # Gemma 4: layers whose v is k's projection (before k's norm; no v_proj), v
    # RMS-normalized per head without weights (v_norm), layers that read an earlier
    # layer's K / V instead of their own (kv_shared_from[i]: that layer; no k / v
    # projections), per-layer MLP widths, per-layer input embeddings (PLE:
    # per_layer_input_size dims per layer, from a table of per_layer_vocab_size tokens and a
    # projection of the embeddings) and a learned scalar per layer scaling its output stream
    k_eq_v_layers: list[int] | None = None
    v_norm: bool = False
    kv_shared_from: list[int | None] | None = None
    layer_intermediate_sizes: list[int] | None = None
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    layer_scalars: bool = False
    # Gemma 3n: AltUp's parallel streams (altup_num_inputs; the layers run on stream
    # altup_active_idx, whose corrected output is scaled with altup_correct_scale), LAuReL's
    # low-rank residual branch (laurel_rank) and the MLP gate's Gaussian top-k sparsity
    # per layer (activation_sparsity: the share zeroed, 0 = dense)
    altup_num_inputs: int = 0
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    laurel_rank: int = 0
    activation_sparsity: list[float] | None = None
    # Zamba2: "zamba_hybrid" layers first run one of zamba_shared_blocks shared transformer
    # blocks (in turn): attention over cat(stream, embeddings) (2 H wide; head_dim from
    # it) and a gated MLP, each call with its own low-rank adapters (rank
    # zamba_adapter_rank; on the MLP's gate_up always, on q / k / v with
    # zamba_attention_adapters); a per-layer linear maps the block's output into the Mamba-2
    # layer's input (the residual stream skips it)
    # Zamba (v1) has the same hybrid layer with a multi-head Mamba-1 mixer (zamba_mamba
    # "mamba") and no adapters (zamba_adapter_rank 0).
    zamba_shared_blocks: int = 0
    zamba_adapter_rank: int = 0
    zamba_attention_adapters: bool = False
    zamba_mamba: str = "mamba2"
    # the output y (+ D x) gated by silu(z): normalized per group after the gate (Granite),
    # before it (mamba_norm_before_gate), or not at all (mamba_rms_norm False: Falcon-H1)
    mamba_rms_norm: bool = True
    mamba_norm_before_gate: bool = False
    # Falcon-H1's muP multipliers: the mamba branch's input and output, each section of its
    # in_proj output ([z, x, B, C, dt]), the attention branch's input and output, the keys,
    # the MLP's gate (before the activation) and output. 1 / None = off.
    mamba_in_multiplier: float = 1.0
    mamba_out_multiplier: float = 1.0
    mamba_ssm_multipliers: list[float] | None = None
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    attention_key_multiplier: float = 1.0
    mlp_gate_multiplier: float = 1.0
    mlp_down_multiplier: float = 1.0
    # Qwen3.5 / Qwen3-Next: q_proj also gives a gate per head ([q | gate] per head); the
    # attention output is multiplied by sigmoid(gate) before o_proj
    attn_output_gate: bool = False
    # LFM3: a gate per head, sigmoid(g_proj(x)) [T, heads], scales each head's attention
    # output before o_proj (x: the layer's normed input)
    attn_head_gate: bool = False
    # OLMo Hybrid's Gated DeltaNet: q / k / v / g / b / a as six projections (parts of the
    # one fused in_proj), beta scaled (2: "negative eigenvalues"), its gated norm's eps
    # (None = rms_norm_eps)
    gdn_separate_projections: bool = False
    gdn_beta_scale: float = 1.0
    gdn_norm_eps: float | None = None
    # Gemma: RMSNorm scales by (weight + norm_weight_offset); embeddings times embed_scale
    # (rounded to the model dtype, as transformers does); sandwich_norm adds norms after
    # attention and after the MLP (post_attention_layernorm is then the former,
    # pre_/post_feedforward_layernorm wrap the MLP).
    norm_weight_offset: float = 0.0
    embed_scale: float = 1.0
    sandwich_norm: bool = False
    # Softmax scale of attention scores; None = head_dim ** -0.5.
    attention_scale: float | None = None
    # c * tanh(x / c) on attention scores / on the final logits; None = off.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Rope base of the sliding-window layers (Gemma 3's local layers, default rope, no
    # scaling); None = every layer uses rope_theta / rope_scaling.
    sliding_rope_theta: float | None = None
    # Llama 4 / Ministral 3 attention temperature: after rope, each query is scaled by
    # 1 + beta * log(1 + floor(position / length)) (rope_parameters'
    # llama_4_scaling_beta, original_max_position_embeddings); None = off.
    llama4_scaling_beta: float | None = None
    llama4_scaling_length: int | None = None
    # Granite: embeddings times embedding_multiplier (a number, as transformers applies
    # it), attention / MLP outputs times residual_multiplier before each residual add,
    # logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Mixture of experts (Qwen3-MoE): the layers in moe_layers run num_experts SiLU-gated
    # experts of moe_intermediate_size, num_experts_per_tok per token, chosen by a softmax
    # router (the top-k probabilities renormalized when norm_topk_prob); the others a
    # dense MLP of intermediate_size. num_experts 0: dense everywhere.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: list[int] | None = None
    # Qwen2-MoE: a shared expert (a dense SiLU-gated MLP of this size) added to every MoE
    # layer's output, scaled by sigmoid(shared_expert_gate(x)); 0 = none.
    shared_expert_intermediate_size: int = 0
    # False (Granite 4.0-H MoE): the shared expert's output is added as is, no sigmoid gate
    shared_expert_gated: bool = True
    # The router: "softmax" (top-k of the softmax), or "sigmoid" (LFM2-MoE: experts chosen
    # by sigmoid(logit) + a learned per-expert bias when moe_expert_bias, weighted by the
    # sigmoids, renormalized when norm_topk_prob), times moe_routed_scaling
    moe_router: str = "softmax"
    moe_expert_bias: bool = False
    moe_routed_scaling: float = 1.0
    # Gemma 4 (26B-A4B): every layer runs the experts beside its dense MLP (router
    # "gemma4": on the weightless-normed stream times a learned scale / sqrt(H), softmax
    # top-k renormalized, times a learned per-expert scale)
    moe_beside_mlp: bool = False
    # Nemotron 3 (router "group_sigmoid", DeepSeek-V3's): sigmoid scores of an fp32 router,
    # plus a learned per-expert bias to choose, the best moe_topk_groups of moe_num_groups
    # expert groups (a group's score: its top two), top-k within them, weights the scores
    # (renormalized with norm_topk_prob) times moe_routed_scaling; experts non-gated
    # (moe_gated_experts False: down(act(up(x)))), optionally in a latent space of
    # moe_latent_size (projections in and out)
    moe_num_groups: int = 1
    moe_topk_groups: int = 1
    moe_gated_experts: bool = True
    moe_latent_size: int = 0
    # GPT-OSS: the router linear has a bias (moe_router_bias); each expert has biases on
    # its gate / up rows and its down output (moe_expert_biases); the experts' activation
    # differs from hidden_act (moe_activation: "swigluoai", the clamped SwiGLU with
    # swiglu_alpha / swiglu_limit; "" = the config's activation)
    moe_router_bias: bool = False
    moe_expert_biases: bool = False
    moe_activation: str = ""
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # HF quantization_config (GPTQ/AWQ checkpoints), None for dense checkpoints.
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str | None = None         # the checkpoint's stored dtype, informational
    hf_architecture: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not (0.0 < self.partial_rotary_factor <= 1.0) or self.rotary_dim % 2 or \
                self.rotary_dim == 0:
            raise UnsupportedModelError(
                f"partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} "
                f"rotated dims of {self.head_dim}; it must be a positive even number")
        if self.hidden_act not in GATED_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported "
                                        f"(MLPs with {sorted(GATED_ACTIVATIONS)})")
        if self.norm_type not in ("rms", "layer"):
            raise ValueError(f"config.norm_type must be 'rms' or 'layer', got "
                             f"{self.norm_type!r}")
        if self.norm_type == "layer" and self.qk_norm:
            raise UnsupportedModelError("LayerNorm models with q / k norms are not supported")
        if not self.mlp_gated and self.num_experts and self.moe_gated_experts:
            raise UnsupportedModelError("non-gated MLPs with gated experts are not supported")
        if self.position_embedding not in ("rope", "learned", "alibi"):
            raise ValueError(f"config.position_embedding must be 'rope', 'learned' or "
                             f"'alibi', got {self.position_embedding!r}")
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ValueError(f"config.position_offset must be an int >= 0, got "
                             f"{self.position_offset!r}")
        if self.activation in ("relu", "relu2", "xielu") and self.mlp_gated:
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r}: ReLU-gated MLPs "
                                        "are not supported (ReLU: non-gated MLPs, OPT's; "
                                        "squared ReLU: Nemotron's / Arcee's)")
        if self.parallel_mlp_norm and not self.parallel_residual:
            raise ValueError("config.parallel_mlp_norm needs parallel_residual")
        if self.parallel_residual and (self.post_norm or self.sandwich_norm):
            raise UnsupportedModelError("parallel residual layers with post / sandwich "
                                        "norms are not supported")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"config.num_experts_per_tok must be in [1, num_experts = "
                                 f"{self.num_experts}], got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"config.moe_intermediate_size must be > 0, got "
                                 f"{self.moe_intermediate_size}")
            if self.moe_router not in ("softmax", "sigmoid", "gemma4", "group_sigmoid"):
                raise ValueError(f"config.moe_router must be 'softmax', 'sigmoid', 'gemma4' "
                                 f"or 'group_sigmoid', got {self.moe_router!r}")
            if self.moe_num_groups < 1 or self.num_experts % self.moe_num_groups or \
                    not 1 <= self.moe_topk_groups <= self.moe_num_groups:
                raise ValueError(f"config.moe_num_groups ({self.moe_num_groups}) must divide "
                                 f"num_experts ({self.num_experts}) and moe_topk_groups "
                                 f"({self.moe_topk_groups}) be in [1, moe_num_groups]")
            if not self.moe_routed_scaling > 0:
                raise ValueError(f"config.moe_routed_scaling must be > 0, got "
                                 f"{self.moe_routed_scaling!r}")
            if self.moe_activation not in ("", "silu", "gelu", "gelu_tanh", "swigluoai"):
                raise UnsupportedModelError(f"config.moe_activation {self.moe_activation!r} "
                                            "is not supported ('silu', 'gelu', 'gelu_tanh', "
                                            "'swigluoai', or '' for the MLP's)")
            if self.moe_gated_experts and self.expert_activation not in (
                    "silu", "gelu", "gelu_tanh", "swigluoai"):
                raise UnsupportedModelError(f"experts with hidden_act {self.hidden_act!r} "
                                            "are not supported (SiLU- or GELU-gated "
                                            "experts)")
            if self.expert_activation == "swigluoai" and not self.moe_gated_experts:
                raise UnsupportedModelError("swigluoai experts must be gated")
            for name in ("swiglu_alpha", "swiglu_limit"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        not math.isfinite(value):
                    raise ValueError(f"config.{name} must be a finite number, got {value!r}")
            if self.swiglu_limit <= 0:
                raise ValueError(f"config.swiglu_limit must be > 0, got {self.swiglu_limit!r}")
        if self.layer_mixers is not None:
            if len(self.layer_mixers) != self.num_layers:
                raise ValueError(f"config.layer_mixers must name one mixer per layer "
                                 f"({self.num_layers}), got {len(self.layer_mixers)}")
            unknown = sorted(set(self.layer_mixers) - set(LAYER_MIXERS))
            if unknown:
                raise UnsupportedModelError(f"layer mixers {unknown} are not supported "
                                            f"(supported: {list(LAYER_MIXERS)})")
            recurrent = set(self.layer_mixers) - {"attention"}
            if recurrent and not 2 <= self.conv_kernel <= 8:
                raise ValueError(f"config.conv_kernel must be in [2, 8] for "
                                 f"{sorted(recurrent)} layers, got {self.conv_kernel!r}")
            if "zamba_hybrid" in self.layer_mixers:
                if not isinstance(self.zamba_shared_blocks, int) or self.zamba_shared_blocks < 1:
                    raise ValueError(f"config.zamba_shared_blocks must be an int >= 1 for "
                                     f"zamba_hybrid layers, got {self.zamba_shared_blocks!r}")
                if not isinstance(self.zamba_adapter_rank, int) or self.zamba_adapter_rank < 0:
                    raise ValueError(f"config.zamba_adapter_rank must be an int >= 0 (0: no "
                                     f"adapters), got {self.zamba_adapter_rank!r}")
                if self.zamba_attention_adapters and not self.zamba_adapter_rank:
                    raise ValueError("config.zamba_attention_adapters needs "
                                     "zamba_adapter_rank >= 1")
                if self.zamba_mamba not in ("mamba2", "mamba"):
                    raise ValueError(f"config.zamba_mamba must be 'mamba2' (Zamba2) or 'mamba' "
                                     f"(Zamba), got {self.zamba_mamba!r}")
                if self.zamba_attention_adapters and self.num_kv_heads != self.num_heads:
                    raise UnsupportedModelError("Zamba2's q / k / v adapters need as many kv "
                                                "heads as heads (transformers' shapes)")
            # the Mamba flavour of each layer kind (Zamba's hybrid layers: zamba_mamba)
            kinds = {self.zamba_mamba if m == "zamba_hybrid" else m for m in self.layer_mixers}
            if {"mamba2", "mamba2_attention"} & kinds:
                for name in ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
                             "mamba_state_size"):
                    value = getattr(self, name)
                    if not isinstance(value, int) or value <= 0:
                        raise ValueError(f"config.{name} must be a positive int for mamba2 "
                                         f"layers, got {value!r}")
                if self.mamba_num_heads % self.mamba_num_groups:
                    raise ValueError(f"mamba_num_groups ({self.mamba_num_groups}) must divide "
                                     f"mamba_num_heads ({self.mamba_num_heads})")
            if "mamba" in kinds:
                for name in ("mamba_inner_size", "mamba_dt_rank", "mamba_state_size"):
                    value = getattr(self, name)
                    if not isinstance(value, int) or value <= 0:
                        raise ValueError(f"config.{name} must be a positive int for mamba "
                                         f"layers, got {value!r}")
                if self.mamba_state_size > 256:
                    raise UnsupportedModelError(f"Mamba state size {self.mamba_state_size} "
                                                f"is not supported (at most 256)")
                heads = self.mamba1_num_heads
                if not isinstance(heads, int) or heads < 1 or self.mamba_inner_size % heads:
                    raise ValueError(f"config.mamba1_num_heads ({heads!r}) must be an int >= 1 "
                                     f"dividing the Mamba inner size ({self.mamba_inner_size})")
                if heads > 1 and self.mamba_bcdt_norm:
                    raise UnsupportedModelError("multi-head Mamba-1 layers with dt / B / C "
                                                "norms are not supported")
                if self.mamba_bcdt_norm not in ("", "plain", "weighted"):
                    raise ValueError(f"config.mamba_bcdt_norm must be '', 'plain' or "
                                     f"'weighted', got {self.mamba_bcdt_norm!r}")
                # (Zamba: hidden_act is the shared block's MLP's; its Mamba's activation,
                # hidden_mamba_act, is checked when its config.json is read)
                if self.activation != "silu" and "zamba_hybrid" not in self.layer_mixers:
                    raise UnsupportedModelError(f"Mamba layers with hidden_act "
                                                f"{self.hidden_act!r} are not supported (SiLU)")
            if "gated_deltanet" in self.layer_mixers:
                for name in ("linear_num_key_heads", "linear_num_value_heads",
                             "linear_key_head_dim", "linear_value_head_dim"):
                    value = getattr(self, name)
                    if not isinstance(value, int) or value <= 0:
                        raise ValueError(f"config.{name} must be a positive int for "
                                         f"gated_deltanet layers, got {value!r}")
                if self.linear_num_value_heads % self.linear_num_key_heads:
                    raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) "
                                     f"must be a multiple of linear_num_key_heads "
                                     f"({self.linear_num_key_heads})")
            if self.layer_mlps is not None and len(self.layer_mlps) != self.num_layers:
                raise ValueError(f"config.layer_mlps must hold one flag per layer "
                                 f"({self.num_layers}), got {len(self.layer_mlps)}")
            empty = [i for i in range(self.num_layers)
                     if self.mixer(i) == "none" and not self.has_mlp(i)]
            if empty:
                raise ValueError(f"layers {empty} have neither a mixer nor an MLP")
        for name in ("layer_head_dims", "layer_num_kv_heads", "layer_intermediate_sizes",
                     "kv_shared_from"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_layers:
                raise ValueError(f"config.{name} must hold one entry per layer "
                                 f"({self.num_layers}), got {len(value)}")
        if self.layer_num_kv_heads is not None:
            bad = [i for i, kv in enumerate(self.layer_num_kv_heads)
                   if kv < 1 or self.num_heads % kv]
            if bad:
                raise ValueError(f"layers {bad}: kv heads must divide num_attention_heads "
                                 f"({self.num_heads})")
        if self.kv_shared_from is not None:
            for i, src in enumerate(self.kv_shared_from):
                if src is None:
                    continue
                if not 0 <= src < i or self.kv_shared_from[src] is not None or \
                        self.is_sliding(src) != self.is_sliding(i) or \
                        self.layer_head_dim(src) != self.layer_head_dim(i) or \
                        self.layer_kv_heads(src) != self.layer_kv_heads(i):
                    raise ValueError(f"layer {i} cannot read layer {src}'s K / V (an earlier "
                                     f"layer of the same kind and shape with its own K / V)")
        for name in ("attention_scale", "attn_logit_softcapping", "final_logit_softcapping",
                     "sliding_rope_theta", "embedding_multiplier", "residual_multiplier",
                     "logits_scaling", "llama4_scaling_length"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"config.{name} must be a positive number or None, got "
                                 f"{value!r}")

    @property
    def activation(self) -> str:
        """The MLP's activation: "silu", "gelu" (erf), "gelu_tanh" or (non-gated MLPs
        only) "relu"."""
        return GATED_ACTIVATIONS[self.hidden_act]

    @property
    def expert_activation(self) -> str:
        """The experts' activation: ``moe_activation`` (GPT-OSS: "swigluoai"), else the
        MLP's (:attr:`activation`)."""
        return self.moe_activation or self.activation

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that rotate (the first ones; transformers' rounding)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else \
            self.head_dim ** -0.5

    def mixer(self, layer: int) -> str:
        """``layer``'s token mixer: "attention" or a recurrent one ("short_conv")."""
        return "attention" if self.layer_mixers is None else self.layer_mixers[layer]

    def layer_head_dim(self, layer: int) -> int:
        """``layer``'s attention head dim (Gemma 4's full layers: their own)."""
        return self.head_dim if self.layer_head_dims is None else self.layer_head_dims[layer]

    def layer_kv_heads(self, layer: int) -> int:
        """``layer``'s kv heads (Gemma 4's full layers: their own)."""
        return self.num_kv_heads if self.layer_num_kv_heads is None else \
            self.layer_num_kv_heads[layer]

    def layer_intermediate_size(self, layer: int) -> int:
        """``layer``'s dense MLP width (Gemma 4's KV-sharing layers: double with
        use_double_wide_mlp)."""
        return self.intermediate_size if self.layer_intermediate_sizes is None else \
            self.layer_intermediate_sizes[layer]

    def kv_source(self, layer: int) -> int | None:
        """The earlier layer whose K / V ``layer`` reads (Gemma 4), or None (its own)."""
        return None if self.kv_shared_from is None else self.kv_shared_from[layer]

    @property
    def uniform_attention_shapes(self) -> bool:
        """Whether every layer has head_dim / num_kv_heads and its own K / V."""
        return self.layer_head_dims is None and self.layer_num_kv_heads is None and \
            self.kv_shared_from is None

    def has_mlp(self, layer: int) -> bool:
        """Whether ``layer`` has an MLP (every layer but Nemotron-H's mixer-only blocks)."""
        return self.layer_mlps is None or bool(self.layer_mlps[layer])

    def has_attention(self, layer: int) -> bool:
        """Whether ``layer`` attends over a KV cache (alone, or beside Mamba-2)."""
        return self.mixer(layer) in ("attention", "mamba2_attention", "zamba_hybrid")

    @property
    def is_recurrent(self) -> bool:
        """Whether some layers keep a per-sequence recurrent state (hybrid models)."""
        return self.layer_mixers is not None and any(
            m not in ("attention", "none") for m in self.layer_mixers)

    def is_moe(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is the mixture of experts."""
        return self.num_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window."""
        return self.sliding_window is not None and (
            self.sliding_window_layers is None or layer in self.sliding_window_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window_left(self, layer: int) -> int:
        """Keys a token may look back on in ``layer`` (flash_attention's window_left), -1 = all."""
        if not self.is_sliding(layer):
            return -1
        # HF: key j is visible to query i when i - j < sliding_window.
        return self.sliding_window - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ from HF
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
                ) -> "DecoderConfig":
        """Build from a HF config.json dict (transformers 4.x or 5.x spelling)."""
        archs = list(hf.get("architectures") or [])
        family = None
        text = hf.get("text_config")
        if isinstance(text, Mapping):
            # A multimodal checkpoint: serve its text decoder when it is one of ours.
            wrapper = next((a for a in archs if a in TEXT_ONLY_WRAPPERS), None)
            if wrapper is None and not archs and hf.get("model_type") == "gemma3":
                wrapper = "Gemma3ForConditionalGeneration"
            if wrapper is None:
                raise UnsupportedModelError(
                    f"multimodal architecture {archs or hf.get('model_type')!r} is not "
                    f"supported (text-only serving of {sorted(TEXT_ONLY_WRAPPERS)})")
            family = TEXT_ONLY_WRAPPERS[wrapper] or _MODEL_TYPES.get(
                str(text.get("model_type", "")))
            if family is None:
                raise UnsupportedModelError(
                    f"{wrapper} with a {text.get('model_type')!r} text decoder is not "
                    f"supported")
            hf = _text_config(hf, text, family)
            archs = [wrapper]
        for a in archs:
            if family is None and a in SUPPORTED_ARCHITECTURES:
                family = SUPPORTED_ARCHITECTURES[a]
            causal = causal_architecture(a)
            if family is None and causal in SUPPORTED_ARCHITECTURES:
                family = SUPPORTED_ARCHITECTURES[causal]   # a classifier: same decoder
        if family is None and not archs:
            family = _MODEL_TYPES.get(str(hf.get("model_type", "")))
        if family == "llama" and hf.get("model_type") == "exaone":
            family = "exaone"     # (transformers saves EXAONE as LlamaForCausalLM)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        if hf.get("use_bidirectional_attention") not in (None, False, "vision"):
            # ("vision": image tokens attend both ways, text stays causal: text-only serving)
            raise UnsupportedModelError("use_bidirectional_attention (an embedding model) is "
                                        "not supported: this decoder is causal")

        if family == "granite_hybrid":
            hf = _granite_hybrid(hf)
        if family in _KEY_READERS:      # the older families' own config keys -> ours
            hf = _KEY_READERS[family](hf, family)
        learned = family in _LEARNED_POSITIONS
        bloom, gptj, falcon = family == "bloom", family == "gptj", family == "falcon"
        mpt, nemotron = family == "mpt", family == "nemotron"
        nanochat = family == "nanochat"

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ValueError(f"config.json is missing {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or hidden // heads)
        num_layers = int(need("num_hidden_layers"))
        rope_theta, rope_scaling, sliding_rope_theta = _rope_from_hf(hf, family)
        alpha = _ntk_alpha(hf)
        if alpha is not None:
            rope_theta *= alpha ** (head_dim / (head_dim - 2))
        partial = hf.get("partial_rotary_factor")
        params = hf.get("rope_parameters")
        if partial is None and isinstance(params, Mapping):
            partial = params.get("partial_rotary_factor")
        if gptj and hf.get("rotary_dim"):     # rotary_dim of head_dim rotate (GPT-J style)
            partial = _rotary_fraction(int(hf["rotary_dim"]), head_dim)
        window, window_layers = _sliding_window_from_hf(hf, family, num_layers)
        if window is None or family not in ("gemma3", "gemma4", "gemma3n", "olmo3", "lfm3"):
            sliding_rope_theta = None
        layer_nope = None
        if hf.get("layer_rope_theta"):         # Granite SWA: a rope base per layer
            rope_theta, sliding_rope_theta, layer_nope = _layer_rope_thetas(
                hf["layer_rope_theta"], num_layers, window_layers, rope_theta)

        eos: list[int] = []
        for src in (generation_config or {}, hf):
            e = src.get("eos_token_id")
            for v in (e if isinstance(e, list) else [e]):
                if v is not None and int(v) not in eos:
                    eos.append(int(v))
        bos = hf.get("bos_token_id")
        if bos is None and generation_config:
            bos = generation_config.get("bos_token_id")

        attention_bias = bool(hf.get("attention_bias", False))
        if family in ("ernie4_5", "starcoder2"):        # one flag for every linear's bias
            attention_bias = bool(hf.get("use_bias", family == "starcoder2"))
        if family == "stablelm":
            _check_stablelm(hf)
        cohere = family in ("cohere", "cohere2")
        if cohere and hf.get("use_qk_norm"):
            raise UnsupportedModelError("Cohere with use_qk_norm (per-head LayerNorms of q "
                                        "and k) is not supported")
        if family == "phi" and hf.get("qk_layernorm"):
            raise UnsupportedModelError("Phi with qk_layernorm is not supported")
        if family == "phi":
            attention_bias = True              # q / k / v and dense all have biases
        neox = family == "gpt_neox"
        if neox:
            attention_bias = bool(hf.get("attention_bias", True))
            if partial is None:                # transformers 4.x / the hub's spelling
                partial = hf.get("rotary_pct", 0.25)
            if not isinstance(params, Mapping) and "rope_theta" not in hf:
                rope_theta = float(hf.get("rotary_emb_base", 10000.0))
        if learned or bloom:
            attention_bias = True
        if falcon:
            attention_bias = bool(hf.get("bias", False))
        layer_norm = family in ("stablelm", "starcoder2", "phi", "gpt_neox", "gptj",
                                "falcon", "mpt", "nemotron", "olmo", "jais2") or cohere or \
            learned or bloom
        gemma = family in _GEMMA
        return cls(
            architecture=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=float(partial) if partial is not None else
            (0.5 if family in ("glm", "glm4", "nemotron") else
             0.25 if family in ("stablelm",) + _QWEN3_5 else
             0.5 if family == "bamba" else 1.0),
            rope_interleaved=family in ("glm", "glm4", "ernie4_5", "helium", "gptj") or cohere,
            rms_norm_eps=float(hf.get("layer_norm_eps", 1e-5))
            if family in ("stablelm", "phi", "gpt_neox", "gptj", "falcon", "mpt", "jais2") or
            cohere or learned or bloom else
            float(hf.get("norm_eps", 1e-5)) if nemotron or family in _LFM2 else
            1e-5 if family == "olmo" else         # (OLMo 1's LayerNorm: a fixed eps)
            float(hf.get("norm_epsilon", 1e-5)) if family == "starcoder2" else
            float(hf.get("rms_norm_eps", 1e-6)),
            norm_type="layer" if layer_norm else "rms",
            norm_bias=layer_norm and not cohere and not mpt and family != "olmo",
            norm_affine=family not in ("olmo", "nanochat"),
            rope_reversed=nanochat,
            attention_sinks=family in ("granite_swa", "gpt_oss"),
            embed_norm=bloom or nanochat,
            clip_qkv=_positive_or_none(hf.get("clip_qkv")) if family == "olmo" else None,
            parallel_residual=cohere or family in ("phi", "gptj") or (
                neox and bool(hf.get("use_parallel_residual", True))) or (
                falcon and hf["_falcon_parallel"]),
            parallel_mlp_norm=(neox and bool(hf.get("use_parallel_residual", True))) or (
                falcon and hf["_falcon_norms"] == 2),
            lm_head_bias=family in ("phi", "gptj"),
            mlp_gated=family not in ("starcoder2", "phi", "gpt_neox", "gptj", "falcon",
                                     "mpt", "nemotron", "arcee", "nanochat", "jais2",
                                     "apertus", "nemotron_h") and
            not learned and not bloom,
            position_embedding="learned" if learned else "alibi" if bloom or mpt else "rope",
            alibi_max_bias=float(hf["_alibi_bias_max"]) if mpt else None,
            position_offset=2 if family == "opt" else 0,
            qkv_grouped=neox or bloom or (family == "gpt_bigcode" and
                                          not hf.get("multi_query", True)) or (
                falcon and hf["_falcon_grouped"]),

            tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                            gemma or family in ("starcoder2",) + _LFM2 or
                                            cohere or learned or bloom or falcon or mpt)),
            eos_token_ids=eos,
            bos_token_id=None if bos is None else int(bos),
            sliding_window=window,
            sliding_window_layers=window_layers,
            qkv_bias=(family == "qwen2" or attention_bias or
                      (family == "qwen2_moe" and bool(hf.get("qkv_bias", True))) or
                      (family == "stablelm" and bool(hf.get("use_qkv_bias", False)))) and
            family != "gpt_neo",              # (GPT-Neo: a bias on out_proj only)
            o_bias=family not in ("qwen2", "qwen2_moe", "glm", "glm4", "helium")
            and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) or (
                family in ("ernie4_5", "starcoder2", "phi") and attention_bias) or neox or \
            learned or bloom or gptj,
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma3n", "olmo2", "olmo3", "olmoe",
                               "exaone4", "hunyuan", "nanochat", "apertus", *_LFM2,
                               "olmo_hybrid",
                               *_QWEN3_5),
            layer_mixers=hf.get("_layer_mixers"),
            layer_mlps=hf.get("_layer_mlps"),
            conv_kernel=int(hf.get("conv_L_cache", 3)) if family in _LFM2 else
            int(hf.get("linear_conv_kernel_dim", 4)) if family in _QWEN3_5 + ("olmo_hybrid",)
            else
            hf.get("_conv", (0, False))[0],
            conv_bias=bool(hf.get("conv_bias", False)) if family in _LFM2 else
            hf.get("_conv", (0, False))[1],
            **hf.get("_mamba", {}),
            **hf.get("_fields", {}),
            **({k: int(hf.get(k, d)) for k, d in (
                ("linear_num_key_heads", 16), ("linear_num_value_heads", 32),
                ("linear_key_head_dim", 128), ("linear_value_head_dim", 128))}
               if family in _QWEN3_5 else {}),
            attn_output_gate=family in _QWEN3_5,
            qk_norm_after_rope=family in ("hunyuan", "nanochat"),
            qk_norm_full=family in ("olmo2", "olmo3", "olmoe", "olmo_hybrid"),
            post_norm=family in ("olmo2", "olmo3", "exaone4", "olmo_hybrid"),
            hidden_act=_activation_from_hf(hf, family),
            norm_weight_offset=1.0 if (gemma and family not in ("gemma4", "gemma3n")) or
            nemotron or
            family in _QWEN3_5 else 0.0,
            embed_scale=hidden ** 0.5 if gemma else 1.0,
            sandwich_norm=bool(hf.get("_sandwich_norm")) or
            family in ("gemma2", "gemma3", "gemma4", "glm4") or (
                family == "hyperclovax" and bool(hf.get("use_post_norm", True))),
            attention_scale=_attention_scale(hf, family),
            attn_logit_softcapping=_positive_or_none(hf.get("attn_logit_softcapping", 50.0))
            if family in ("gemma2", "vaultgemma") else None,
            final_logit_softcapping=_positive_or_none(hf.get(
                "final_logit_softcapping",
                30.0 if family in ("gemma2", "vaultgemma") else None)),
            sliding_rope_theta=sliding_rope_theta,
            llama4_scaling_beta=_llama4_scaling(hf)[0],
            llama4_scaling_length=_llama4_scaling(hf)[1],
            nope_layers=(_nope_layers_from_hf(hf, num_layers) if family == "smollm3" else
                         layer_nope if layer_nope is not None else
                         list(range(num_layers)) if learned or bloom or mpt or
                         family == "nemotron_h" or hf.get("_nope") else
                         # Granite 4.0 without rope (position_embedding_type not "rope")
                         list(range(num_layers)) if family == "granite_hybrid" and
                         hf.get("position_embedding_type") != "rope" else
                         # EXAONE 4's hybrid models: no rope on the global layers
                         [i for i in range(num_layers) if i not in window_layers]
                         if family in ("exaone4", "cohere2") and window_layers else None),
            **(_granite_from_hf(hf) if family in ("granite", "granitemoe", "granitemoeshared",
                                                  "granite_hybrid",
                                                  "granite_swa")
               else _hyperclovax_from_hf(hf) if family == "hyperclovax" else {}),
            # Cohere multiplies the logits by logit_scale: Granite's division by its inverse
            **({"logits_scaling": 1.0 / float(hf.get("logit_scale", 0.0625))} if cohere
               else {}),
            **(_moe_from_hf(hf, family, num_layers) if family in _MOE else
               hf.get("_moe", {})),
            quantization_config=dict(hf["quantization_config"])
            if hf.get("quantization_config") else None,
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            hf_architecture=archs[0] if archs else None,
        )


def _text_config(hf: Mapping[str, Any], text: Mapping[str, Any], family: str
                 ) -> dict[str, Any]:
    """A multimodal config's text decoder: transformers' defaults for that text config,
    then the top-level fields that apply to the text decoder, then ``text_config``."""
    carried = {k: hf[k] for k in _CARRIED if hf.get(k) is not None}
    merged = {**_TEXT_DEFAULTS.get(family, {}), **carried,
              **{k: v for k, v in text.items() if v is not None or k not in carried}}
    if "tie_word_embeddings" in carried:
        # the wrapper model ties (or not) by its own config (transformers 5): a
        # checkpoint saved tied has no lm_head tensor, whatever text_config says
        merged["tie_word_embeddings"] = carried["tie_word_embeddings"]
    return merged


def _ntk_alpha(hf: Mapping[str, Any]) -> float | None:
    """HunYuan's rope: "dynamic" with a fixed ``alpha`` (NTK-aware): the base times
    alpha ** (d / (d - 2)), the same at every length. None when absent."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or str(
            params.get("rope_type", params.get("type", ""))) != "dynamic":
        return None
    alpha = params.get("alpha")
    return float(alpha) if alpha else None


def _llama4_scaling(hf: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """(beta, length) of the Llama 4 / Ministral 3 query scaling, from rope_parameters
    (or rope_scaling); (None, None) when absent or zero."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        params = params["full_attention"]
    beta = params.get("llama_4_scaling_beta") if isinstance(params, Mapping) else None
    if not beta:
        return None, None
    length = params.get("original_max_position_embeddings") or \
        hf.get("original_max_position_embeddings")
    if not length:
        raise UnsupportedModelError("llama_4_scaling_beta needs "
                                    "original_max_position_embeddings")
    return float(beta), int(length)


def _nope_layers_from_hf(hf: Mapping[str, Any], num_layers: int) -> list[int] | None:
    """SmolLM3's layers without rope: ``no_rope_layers[i]`` is 1 where layer i uses rope
    (transformers' default: every ``no_rope_layer_interval``-th layer has none)."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = int(hf.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if not isinstance(flags, list) or len(flags) != num_layers:
        raise ValueError(f"config.no_rope_layers must list one flag per layer ({num_layers})")
    return [i for i, use in enumerate(flags) if not use] or None


def _granite_hybrid(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Granite 4.0 (GraniteMoeHybrid) as Granite: attention layers and Mamba-2 layers
    (layer_types "mamba" / "linear_attention"; the H models). Its MLP is the fused
    ``shared_mlp`` of ``shared_intermediate_size``; with experts (num_local_experts > 0:
    h-tiny, h-small) every layer's MLP is the mixture of experts of ``intermediate_size``
    (top-k softmax, renormalized) plus that shared MLP, ungated."""
    out = {**hf, "intermediate_size": hf.get("shared_intermediate_size",
                                             hf.get("intermediate_size"))}
    experts = int(hf.get("num_local_experts") or 0)
    if experts:
        out["_moe"] = dict(
            num_experts=experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            moe_intermediate_size=int(hf.get("intermediate_size") or 0), norm_topk_prob=True,
            moe_layers=list(range(int(hf.get("num_hidden_layers") or 0))),
            shared_expert_intermediate_size=int(out["intermediate_size"] or 0),
            shared_expert_gated=False)
    n = int(hf.get("num_hidden_layers") or 0)
    kinds = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * n
    names = {"attention": "attention", "full_attention": "attention",
             "mamba": "mamba2", "linear_attention": "mamba2"}
    unknown = sorted({str(k) for k in kinds if k not in names})
    if unknown:
        raise UnsupportedModelError(f"Granite 4.0 layer types {unknown} are not supported "
                                    f"(supported: {sorted(names)})")
    mixers = [names[k] for k in kinds]
    if "mamba2" in mixers:
        inner = int(hf.get("mamba_expand", 2)) * int(hf.get("hidden_size") or 0)
        out["_mamba"] = dict(_mamba2_fields(hf, inner),
                             mamba_out_bias=bool(hf.get("mamba_proj_bias", False)))
        out["_conv"] = (int(hf.get("mamba_d_conv", 4)), bool(hf.get("mamba_conv_bias", True)))
        out["_layer_mixers"] = mixers
    return out


def _json_float(value: Any) -> float:
    """A float from config.json: a number, a string ("inf", "Infinity"), or transformers'
    encoding of non-finite floats ({"__float__": "Infinity"})."""
    if isinstance(value, Mapping) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _layer_rope_thetas(thetas: Any, num_layers: int, window_layers: list[int] | None,
                       default: float) -> tuple[float, float | None, list[int] | None]:
    """(rope_theta, the sliding layers' base or None, the NoPE layers or None) from
    Granite SWA's ``layer_rope_theta`` (a base per layer, 0 = NoPE), when the layers that
    rotate use one base, or one for the sliding and one for the global layers (what the
    decoder has); other patterns are refused by name."""
    if not isinstance(thetas, list) or len(thetas) != num_layers:
        raise ValueError(f"config.layer_rope_theta must list one base per layer "
                         f"({num_layers})")
    nope = [i for i, t in enumerate(thetas) if not t] or None
    used = {float(t) for t in thetas if t}
    if len(used) <= 1:
        return (used.pop() if used else default), None, nope
    sliding = set(window_layers or ())
    by_kind = [{float(t) for i, t in enumerate(thetas) if t and (i in sliding) == s}
               for s in (False, True)]
    if len(used) == 2 and all(len(b) == 1 for b in by_kind):
        return by_kind[0].pop(), by_kind[1].pop(), nope
    raise UnsupportedModelError(f"layer_rope_theta with bases {sorted(used)} other than one "
                                "per attention kind (global / sliding) is not supported")


def _granite_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Granite's multipliers (transformers' GraniteConfig defaults when absent); its
    attention_multiplier is the attention scale."""
    return dict(embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                logits_scaling=float(hf.get("logits_scaling", 1.0)))


def _hyperclovax_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """HyperCLOVA X's multipliers: Granite's, except that its logits are multiplied by
    logits_scaling (the decoder divides by its logits_scaling)."""
    out = _granite_from_hf(hf)
    out["logits_scaling"] = 1.0 / float(hf.get("logits_scaling", 1.0))
    return out


def _with_keys(hf: Mapping[str, Any], pairs: tuple[tuple[str, str], ...],
               keep_ours: bool = False) -> dict[str, Any]:
    """A copy of ``hf`` with each (ours, theirs) pair's value of ``theirs`` (when set)
    under ``ours`` (``keep_ours``: only where ``ours`` is not set already)."""
    out = dict(hf)
    for ours, theirs in pairs:
        if hf.get(theirs) is not None and not (keep_ours and out.get(ours) is not None):
            out[ours] = hf[theirs]
    return out


def _gpt_neo_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-Neo's keys (``num_layers``, ``num_heads``, ``attention_layers`` or the compact
    ``attention_types`` [[["global", "local"], n]], ``window_size``): "local" layers attend
    through a window of window_size tokens; no softmax scaling (scores are plain q.k)."""
    out = _with_keys(hf, (("num_hidden_layers", "num_layers"),
                          ("num_attention_heads", "num_heads"),
                          ("layer_norm_eps", "layer_norm_epsilon"),
                          ("hidden_act", "activation_function")))
    out.setdefault("hidden_act", "gelu_new")
    out.setdefault("layer_norm_eps", 1e-5)
    if out.get("intermediate_size") is None and out.get("hidden_size") is not None:
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    out.pop("num_key_value_heads", None)
    kinds = hf.get("attention_layers")
    if not kinds:
        kinds = [k for types, n in hf.get("attention_types") or () for _ in range(int(n))
                 for k in types]
    if kinds and any(k not in ("global", "local") for k in kinds):
        raise UnsupportedModelError(f"GPT-Neo attention layer types {sorted(set(kinds))} "
                                    "(only global / local)")
    if "local" in kinds:
        out["sliding_window"] = int(hf.get("window_size", 256))
        out["layer_types"] = ["sliding_attention" if k == "local" else "full_attention"
                              for k in kinds]
    out["_attention_scale"] = 1.0
    return out


def _gpt2_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-2-style config keys (GPT-2, GPT-BigCode, GPT-J: ``n_embd``, ``n_layer``,
    ``n_head``, ``n_inner`` (None: 4 x n_embd), ``n_positions``, ``layer_norm_epsilon``,
    ``activation_function``) under the decoder's; every head its own k / v unless the
    family says otherwise (transformers ignores num_key_value_heads here)."""
    out = _with_keys(hf, (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                          ("num_attention_heads", "n_head"),
                          ("max_position_embeddings", "n_positions"),
                          ("layer_norm_eps", "layer_norm_epsilon"),
                          ("hidden_act", "activation_function")))
    out.setdefault("hidden_act", "gelu_new")
    out.setdefault("layer_norm_eps", 1e-5)
    hidden = out.get("hidden_size")
    if out.get("n_inner") is not None:
        out["intermediate_size"] = out["n_inner"]
    elif hidden is not None:
        out["intermediate_size"] = 4 * int(hidden)
    out.pop("num_key_value_heads", None)
    return out


def _rotary_fraction(rotary_dim: int, head_dim: int) -> float:
    """The partial_rotary_factor whose ``int(head_dim * factor)`` is ``rotary_dim``
    exactly (rotary_dim / head_dim can round just below it)."""
    if not 0 < rotary_dim <= head_dim:
        raise UnsupportedModelError(f"rotary_dim {rotary_dim} must be in (0, head_dim = "
                                    f"{head_dim}]")
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, 2.0)
    return factor


def _learned_positions_config(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """GPT-2's / GPT-BigCode's / OPT's config.json under the decoder's keys
    (hidden_size, num_hidden_layers, intermediate_size, ...), their variants this decoder
    does not have refused by name."""
    out = dict(hf)
    if family in ("gpt2", "gpt_bigcode"):
        if hf.get("add_cross_attention"):
            raise UnsupportedModelError(f"{family} with add_cross_attention is not supported")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise UnsupportedModelError("scale_attn_by_inverse_layer_idx is not supported")
        out = _gpt2_keys(hf)
        if family == "gpt_bigcode" and hf.get("multi_query", True):
            out["num_key_value_heads"] = 1        # multi-query: one k / v head
        if not hf.get("scale_attn_weights", True):
            out["_attention_scale"] = 1.0
    elif family == "gpt_neo":
        out = _gpt_neo_config(hf)
    else:   # OPT
        if not hf.get("do_layer_norm_before", True):
            raise UnsupportedModelError("OPT with do_layer_norm_before=false (opt-350m's "
                                        "post-norm layers) is not supported")
        proj = hf.get("word_embed_proj_dim")
        if proj is not None and proj != hf.get("hidden_size"):
            raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size "
                                        "(project_in / project_out) is not supported")
        if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine",
                                                         True):
            raise UnsupportedModelError("OPT without biases / LayerNorm affine parameters "
                                        "is not supported")
        if hf.get("_remove_final_layer_norm"):
            raise UnsupportedModelError("OPT with _remove_final_layer_norm is not supported")
        out.pop("num_key_value_heads", None)     # every head has its own k / v
        out["intermediate_size"] = hf.get("ffn_dim", hf.get("intermediate_size"))
        out["hidden_act"] = hf.get("activation_function", "relu")
        out.setdefault("layer_norm_eps", 1e-5)
    return out


def _bloom_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """BLOOM's config.json under the decoder's keys (``n_layer``, ``n_head``, the older
    ``n_embed``; MLP 4 x hidden, gelu tanh; no position limit of its own: ALiBi, so
    ``seq_length`` or 2048 bounds the context); its variants refused by name."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedModelError("BLOOM with apply_residual_connection_post_layernorm is "
                                    "not supported")
    out = _with_keys(hf, (("hidden_size", "n_embed"), ("num_hidden_layers", "n_layer"),
                          ("num_attention_heads", "n_head"),
                          ("layer_norm_eps", "layer_norm_epsilon")), keep_ours=True)
    out.setdefault("layer_norm_eps", 1e-5)
    if out.get("hidden_size") is not None:
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    out["hidden_act"] = "gelu_tanh"            # bloom_gelu: the tanh approximation
    out.pop("num_key_value_heads", None)
    out["max_position_embeddings"] = int(hf.get("max_position_embeddings") or
                                      hf.get("seq_length") or 2048)
    return out


def _falcon_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Falcon's config.json under the decoder's keys, with how its layers are laid out
    (``_falcon_parallel``: attention and MLP in parallel; ``_falcon_norms``: 1 or 2
    LayerNorms feeding them; ``_falcon_grouped``: q / k / v fused per kv-head group).

    - new_decoder_architecture (40B / 180B / 11B): num_kv_heads groups, each [its q
      heads, k, v]; parallel; two norms (ln_attn / ln_mlp) unless num_ln_in_parallel_attn
      is 1.
    - else multi_query (7B): [q heads; k; v] with one k / v head; parallel_attn (one norm)
      or sequential.
    - else (the RW models): every head its own k / v, fused per head.
    ALiBi Falcons (falcon-rw) are refused: transformers rounds their biases (slope x
    position) to bf16, which no kernel's -slope x distance reproduces."""
    if hf.get("alibi"):
        raise UnsupportedModelError("Falcon with alibi (falcon-rw) is not supported")
    out = _with_keys(hf, (("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer"),
                          ("num_kv_heads", "n_head_kv"),
                          ("layer_norm_eps", "layer_norm_epsilon")), keep_ours=True)
    out.setdefault("layer_norm_eps", 1e-5)
    heads = out.get("num_attention_heads")
    new = bool(hf.get("new_decoder_architecture", False))
    multi_query = bool(hf.get("multi_query", True))
    out["num_key_value_heads"] = out.get("num_kv_heads", heads) if new else \
        1 if multi_query else heads
    if out.get("hidden_size") is not None:
        out["intermediate_size"] = int(hf.get("ffn_hidden_size") or 4 * int(out["hidden_size"]))
    out["hidden_act"] = str(hf.get("activation", "gelu"))
    out.setdefault("max_position_embeddings", 2048)
    out["_falcon_parallel"] = new or bool(hf.get("parallel_attn", True))
    norms = hf.get("num_ln_in_parallel_attn")
    out["_falcon_norms"] = (2 if norms is None else int(norms)) if new else 1
    out["_falcon_grouped"] = new or not multi_query
    return out


def _mpt_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """MPT's config.json under the decoder's keys (``d_model``, ``n_heads``, ``n_layers``,
    ``expansion_ratio``, ``max_seq_len``; ``attn_config``'s softmax_scale and
    alibi_bias_max); the variants transformers' MPT does not run either refused by name."""
    attn = hf.get("attn_config") or {}
    if not isinstance(attn, Mapping):
        raise ValueError("config.attn_config must be a dict")
    for key, why in (("clip_qkv", "clip_qkv"), ("qk_ln", "qk_ln (q / k LayerNorms)"),
                     ("prefix_lm", "prefix_lm"),
                     ("attn_uses_sequence_id", "attn_uses_sequence_id")):
        if attn.get(key):
            raise UnsupportedModelError(f"MPT with attn_config.{why} is not supported")
    if not attn.get("alibi", True):
        raise UnsupportedModelError("MPT without alibi is not supported")
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
        raise UnsupportedModelError(f"MPT attn_type {attn.get('attn_type')!r} is not "
                                 "supported")
    if not hf.get("no_bias", True):
        raise UnsupportedModelError("MPT with biases (no_bias=false) is not supported")
    if hf.get("logit_scale") is not None:
        raise UnsupportedModelError("MPT with logit_scale is not supported")
    out = _with_keys(hf, (("hidden_size", "d_model"), ("num_attention_heads", "n_heads"),
                          ("num_hidden_layers", "n_layers"),
                          ("max_position_embeddings", "max_seq_len"),
                          ("layer_norm_eps", "layer_norm_epsilon")))
    out.setdefault("layer_norm_eps", 1e-5)
    if out.get("hidden_size") is not None:
        out["intermediate_size"] = int(hf.get("expansion_ratio", 4) * int(out["hidden_size"]))
    out["hidden_act"] = "gelu"
    out.pop("num_key_value_heads", None)
    out["_alibi_bias_max"] = attn.get("alibi_bias_max", 8)
    if attn.get("softmax_scale") is not None:
        out["_attention_scale"] = float(attn["softmax_scale"])
    return out


def _lfm2_config(hf: Mapping[str, Any], adjust_mlp: bool = True) -> dict[str, Any]:
    """LFM2's keys: the MLP width after its auto-adjustment (2/3, times
    block_ffn_dim_multiplier, rounded up to block_multiple_of; transformers' Lfm2MLP; not
    LFM2-MoE's dense MLPs), each layer's mixer from layer_types (or full_attn_idxs),
    tie_embedding."""
    out = dict(hf)
    inter = hf.get("block_ff_dim") or hf.get("intermediate_size")
    if inter is None:
        raise ValueError("config.json is missing 'intermediate_size'")
    inter = int(inter)
    if adjust_mlp and hf.get("block_auto_adjust_ff_dim", True):
        inter = int(2 * inter / 3)
        mult = hf.get("block_ffn_dim_multiplier", 1.0)
        if mult is not None:
            inter = int(mult * inter)
            m = int(hf.get("block_multiple_of", 256))
            inter = m * ((inter + m - 1) // m)
    out["intermediate_size"] = inter
    n = int(hf.get("num_hidden_layers") or 0)
    kinds = hf.get("layer_types")
    if kinds is None:
        full = hf.get("full_attn_idxs")
        full = set(range(n)) if full is None else set(full)
        kinds = ["full_attention" if i in full else "conv" for i in range(n)]
    names = {"full_attention": "attention", "conv": "short_conv",
             "sliding_attention": "attention"}      # (LFM3)
    unknown = sorted({k for k in kinds if k not in names})
    if unknown:
        raise UnsupportedModelError(f"LFM2 layer types {unknown} are not supported "
                                    f"(supported: {sorted(names)})")
    out["_layer_mixers"] = [names[k] for k in kinds]
    if "tie_embedding" in hf:
        out["tie_word_embeddings"] = hf["tie_embedding"]
    return out


def _lfm3_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """LFM3's keys: LFM2's (the MLP width as given), the per-head attention gate
    (use_attention_gate) and sandwich norms (use_sandwich_norm), both on by default."""
    out = _lfm2_config(hf, adjust_mlp=False)
    out["_fields"] = dict(attn_head_gate=bool(hf.get("use_attention_gate", True)))
    out["_sandwich_norm"] = bool(hf.get("use_sandwich_norm", True))
    return out


def _mamba2_fields(hf: Mapping[str, Any], inner: int) -> dict[str, Any]:
    """The Mamba-2 fields shared by Granite 4.0-H and Falcon-H1 (transformers' names)."""
    heads = int(hf.get("mamba_n_heads", 128))
    head_dim = hf.get("mamba_d_head", "auto")
    head_dim = inner // heads if head_dim in (None, "auto") else int(head_dim)
    if heads * head_dim != inner:
        raise ValueError(f"mamba_n_heads ({heads}) x mamba_d_head ({head_dim}) must equal the "
                         f"Mamba inner width ({inner})")
    limit = hf.get("time_step_limit") or (0.0, float("inf"))
    return dict(mamba_num_heads=heads, mamba_head_dim=head_dim,
                mamba_num_groups=int(hf.get("mamba_n_groups", 1)),
                mamba_state_size=int(hf.get("mamba_d_state", 256)),
                mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
                mamba_dt_limit=(_json_float(limit[0]), _json_float(limit[1])))


def _bamba_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Bamba's keys: attention at attn_layer_indices, Mamba-2 elsewhere (Granite 4.0-H's
    mixer: the norm after the gate per group, mamba_proj_bias on both projections);
    transformers always rotates half of each head (partial_rotary_factor 0.5)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    attn = set(hf.get("attn_layer_indices") or ())
    out["_layer_mixers"] = ["attention" if i in attn else "mamba2" for i in range(n)]
    inner = int(hf.get("mamba_expand", 2)) * int(hf.get("hidden_size") or 0)
    out["_mamba"] = dict(_mamba2_fields(hf, inner),
                         mamba_out_bias=bool(hf.get("mamba_proj_bias", False)))
    out["_conv"] = (int(hf.get("mamba_d_conv", 4)), bool(hf.get("mamba_conv_bias", True)))
    out["partial_rotary_factor"] = 0.5
    return out


def _falcon_h1_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Falcon-H1's keys: every layer "mamba2_attention"; the Mamba inner width
    (mamba_d_ssm, else mamba_expand x hidden); its norm options; the muP multipliers
    (lm_head_multiplier as a logits scale)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    hidden = int(hf.get("hidden_size") or 0)
    inner = hf.get("mamba_d_ssm")
    inner = int(inner) if inner is not None else int(hf.get("mamba_expand", 2)) * hidden
    out["_layer_mixers"] = ["mamba2_attention"] * n
    out["_mamba"] = _mamba2_fields(hf, inner)
    out["_conv"] = (int(hf.get("mamba_d_conv", 4)), bool(hf.get("mamba_conv_bias", True)))
    mlp = hf.get("mlp_multipliers") or [1.0, 1.0]
    ssm = hf.get("ssm_multipliers") or [1.0] * 5
    if len(mlp) != 2 or len(ssm) != 5:
        raise ValueError(f"Falcon-H1 needs 2 mlp_multipliers and 5 ssm_multipliers, got "
                         f"{len(mlp)} and {len(ssm)}")
    out["_fields"] = dict(
        mamba_out_bias=bool(hf.get("projectors_bias", False)),
        mamba_rms_norm=bool(hf.get("mamba_rms_norm", False)),
        mamba_norm_before_gate=bool(hf.get("mamba_norm_before_gate", True)),
        mamba_in_multiplier=float(hf.get("ssm_in_multiplier", 1.0)),
        mamba_out_multiplier=float(hf.get("ssm_out_multiplier", 1.0)),
        mamba_ssm_multipliers=[float(v) for v in ssm],
        attention_in_multiplier=float(hf.get("attention_in_multiplier", 1.0)),
        attention_out_multiplier=float(hf.get("attention_out_multiplier", 1.0)),
        attention_key_multiplier=float(hf.get("key_multiplier", 1.0)),
        mlp_gate_multiplier=float(mlp[0]), mlp_down_multiplier=float(mlp[1]),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        logits_scaling=1.0 / float(hf.get("lm_head_multiplier", 1.0)))
    return out


#: Nemotron-H's block kinds (layers_block_type, or hybrid_override_pattern's letters)
_NEMOTRON_H_BLOCKS = {"linear_attention": "M", "mamba": "M", "M": "M",
                      "full_attention": "*", "attention": "*", "*": "*",
                      "mlp": "-", "-": "-", "moe": "E", "E": "E"}


def _nemotron_h_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Nemotron-H's keys: one decoder layer per block (Mamba-2 or attention without an MLP,
    or an MLP alone, or (Nemotron 3) a mixture of experts alone), from layers_block_type or
    the hub's hybrid_override_pattern ("M-M*E..."); attention without rope; its Mamba-2
    fields and eps; the experts' router, shared expert and latent size."""
    out = dict(hf)
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if kinds is None:
        pattern = hf.get("hybrid_override_pattern")
        if not pattern:
            raise ValueError("config.json has neither layers_block_type nor "
                             "hybrid_override_pattern")
        kinds = list(str(pattern))
    unknown = sorted({str(k) for k in kinds if k not in _NEMOTRON_H_BLOCKS})
    if unknown:
        raise UnsupportedModelError(f"Nemotron-H block types {unknown} are not supported")
    blocks = [_NEMOTRON_H_BLOCKS[k] for k in kinds]
    out["num_hidden_layers"] = len(blocks)
    out["_layer_mixers"] = [{"M": "mamba2", "*": "attention", "-": "none", "E": "none"}[b]
                            for b in blocks]
    out["_layer_mlps"] = [b in "-E" for b in blocks]
    if "E" in blocks:        # Nemotron 3: mixture-of-experts blocks
        latent = hf.get("moe_latent_size")
        out["_moe"] = dict(
            num_experts=int(hf.get("n_routed_experts") or 0),
            num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(
                hf.get("moe_shared_expert_intermediate_size") or 0)
            if int(hf.get("n_shared_experts", 1) or 0) else 0,
            shared_expert_gated=False, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            moe_layers=[i for i, b in enumerate(blocks) if b == "E"],
            moe_router="group_sigmoid", moe_expert_bias=True,
            moe_routed_scaling=float(hf.get("routed_scaling_factor", 1.0)),
            moe_num_groups=int(hf.get("n_group", 1) or 1),
            moe_topk_groups=int(hf.get("topk_group", 1) or 1), moe_gated_experts=False,
            moe_latent_size=int(latent) if latent else 0)
    heads, head_dim = int(hf.get("mamba_num_heads", 128)), int(hf.get("mamba_head_dim", 64))
    limit_min = float(hf.get("time_step_min", hf.get("mamba_dt_min", 0.001)))
    out["_mamba"] = dict(
        mamba_num_heads=heads, mamba_head_dim=head_dim,
        mamba_num_groups=int(hf.get("n_groups", hf.get("mamba_n_groups", 8))),
        mamba_state_size=int(hf.get("ssm_state_size", 128)),
        mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
        mamba_out_bias=bool(hf.get("use_bias", False)),
        # (transformers' mixer clamps dt from below at time_step_min)
        mamba_dt_limit=(limit_min, float("inf")))
    out["_conv"] = (int(hf.get("conv_kernel", hf.get("mamba_d_conv", 4))),
                    bool(hf.get("use_conv_bias", hf.get("mamba_conv_bias", True))))
    out["rms_norm_eps"] = float(hf.get("layer_norm_epsilon", 1e-5))
    out["hidden_act"] = hf.get("mlp_hidden_act", "relu2")
    if not hf.get("head_dim") and hf.get("attention_head_dim"):
        out["head_dim"] = hf["attention_head_dim"]
    if hf.get("sliding_window"):
        raise UnsupportedModelError("Nemotron-H with a sliding window is not supported")
    return out


#: the longest sequence of an attention-free model whose config names none (Mamba): a
#: state-space model has no position limit; this bounds the engine's block tables
ATTENTION_FREE_MAX_LEN = 1 << 16


#: transformers' Gemma4TextConfig / Gemma3nTextConfig defaults of the keys that change the
#: math (a config that omits one means the default, as transformers reads it)
_GEMMA4_DEFAULTS: dict[str, Any] = dict(
    hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
    num_kv_shared_layers=0, attention_k_eq_v=False, use_double_wide_mlp=False,
    enable_moe_block=False, sliding_window=512, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                        "partial_rotary_factor": 0.25}})
_GEMMA3N_DEFAULTS: dict[str, Any] = dict(
    hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
    num_kv_shared_layers=15, laurel_rank=64, altup_num_inputs=4, altup_active_idx=0,
    altup_correct_scale=True, sliding_window=512, head_dim=256, final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "default", "rope_theta": 1e6}})


def _with_defaults(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``hf`` with ``defaults`` for its missing keys (rope: only when neither
    rope_parameters nor a 4.x rope_theta is given)."""
    out = dict(hf)
    for key, value in defaults.items():
        if key == "rope_parameters" and ("rope_theta" in hf or "rope_scaling" in hf):
            continue
        out.setdefault(key, value)
    return out


def _gemma4_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 4's text keys: layer_types (transformers' default: every sixth layer full, the
    last always full), the full layers' own head_dim / kv heads (per_layer_config as
    transformers 5 writes it, or global_head_dim / num_global_key_value_heads), K = V on
    full layers (attention_k_eq_v), the last num_kv_shared_layers layers reading the K / V
    of the last earlier layer of their kind (double-wide MLPs there with
    use_double_wide_mlp), per-layer input embeddings (hidden_size_per_layer_input), the
    experts beside every MLP (enable_moe_block: num_experts, top_k_experts,
    moe_intermediate_size)."""
    hf = _with_defaults(hf, _GEMMA4_DEFAULTS)
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    if hf.get("enable_moe_block"):     # (26B-A4B: experts beside every layer's MLP)
        out["_moe"] = dict(
            num_experts=int(hf.get("num_experts") or 0),
            num_experts_per_tok=int(hf.get("top_k_experts") or 0),
            moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
            norm_topk_prob=True, moe_layers=[], moe_router="gemma4", moe_beside_mlp=True)
    kinds = list(hf.get("layer_types") or
                 ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    if kinds:
        kinds[-1] = "full_attention"          # (transformers forces the last layer full)
    out["layer_types"] = kinds
    head_dim = int(hf.get("head_dim") or 256)
    kv = int(hf.get("num_key_value_heads") or hf.get("num_attention_heads") or 1)
    dims, kvs = [head_dim] * n, [kv] * n
    per_layer = hf.get("per_layer_config")
    if isinstance(per_layer, Mapping) and per_layer:
        for key, over in per_layer.items():
            i = int(key)
            if 0 <= i < n and isinstance(over, Mapping):
                dims[i] = int(over.get("head_dim", dims[i]))
                kvs[i] = int(over.get("num_key_value_heads", kvs[i]))
    else:
        global_dim = int(hf.get("global_head_dim") or 512)
        global_kv = hf.get("num_global_key_value_heads")
        for i, kind in enumerate(kinds):
            if kind == "full_attention":
                dims[i] = global_dim
                if global_kv is not None and hf.get("attention_k_eq_v", False):
                    kvs[i] = int(global_kv)
    shared = int(hf.get("num_kv_shared_layers") or 0)
    source = _kv_sources(kinds, shared)
    inter = int(hf.get("intermediate_size") or 0)
    wide = bool(hf.get("use_double_wide_mlp", False))
    ple = int(hf.get("hidden_size_per_layer_input") or 0)
    out["_fields"] = dict(
        layer_head_dims=dims if len(set(dims)) > 1 else None,
        layer_num_kv_heads=kvs if len(set(kvs)) > 1 else None,
        k_eq_v_layers=[i for i, k in enumerate(kinds) if k == "full_attention"]
        if hf.get("attention_k_eq_v", False) else None,
        v_norm=True, kv_shared_from=source if shared else None,
        layer_intermediate_sizes=[2 * inter if wide and source[i] is not None else inter
                                  for i in range(n)] if wide and shared else None,
        per_layer_input_size=ple,
        per_layer_vocab_size=int(hf.get("vocab_size_per_layer_input") or 0) if ple else 0,
        layer_scalars=True)
    out["head_dim"] = head_dim
    out["num_key_value_heads"] = kv
    return out


def _kv_sources(kinds: list[str], shared: int) -> list[int | None]:
    """transformers' K / V sharing (Gemma 3n / 4): the last ``shared`` layers read the K / V
    of the last earlier layer of their kind (None: a layer with its own)."""
    n = len(kinds)
    if shared >= n > 0:
        raise UnsupportedModelError("every layer reusing K / V (num_kv_shared_layers = "
                                    "num_hidden_layers) is not supported")
    first = n - shared
    source: list[int | None] = [None] * n
    for i in range(first, n):
        earlier = [j for j in range(first) if kinds[j] == kinds[i]]
        if not earlier:
            raise ValueError(f"layer {i} ({kinds[i]}) reuses K / V, but no earlier layer of "
                             "that kind has its own")
        source[i] = earlier[-1]
    return source


def _gemma3n_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3n's text keys: layer_types (transformers' default: every fifth layer full),
    per-layer MLP widths (intermediate_size a list or a number), K / V sharing
    (num_kv_shared_layers), per-layer inputs, AltUp / LAuReL, the MLP's Gaussian top-k
    sparsity (activation_sparsity_pattern)."""
    hf = _with_defaults(hf, _GEMMA3N_DEFAULTS)
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    kinds = list(hf.get("layer_types") or
                 ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                  for i in range(n)])
    out["layer_types"] = kinds
    inter = hf.get("intermediate_size") or 16384
    sizes = [int(v) for v in inter] if isinstance(inter, list) else [int(inter)] * n
    sparsity = hf.get("activation_sparsity_pattern")
    sparsity = [0.0] * n if sparsity is None else [float(sparsity)] * n \
        if isinstance(sparsity, (int, float)) else [float(v) for v in sparsity]
    if len(sizes) != n or len(sparsity) != n:
        raise ValueError(f"Gemma 3n needs one intermediate_size and one activation sparsity "
                         f"per layer ({n}), got {len(sizes)} and {len(sparsity)}")
    if not all(0.0 <= v < 1.0 for v in sparsity):
        raise ValueError(f"activation_sparsity_pattern values must be in [0, 1), got "
                         f"{sparsity}")
    out["intermediate_size"] = max(sizes) if sizes else 0
    shared = int(hf.get("num_kv_shared_layers") or 0)
    ple = int(hf.get("hidden_size_per_layer_input") or 0)
    streams = int(hf.get("altup_num_inputs", 4))
    active = int(hf.get("altup_active_idx", 0))
    if streams < 1 or not 0 <= active < streams:
        raise ValueError(f"altup_active_idx ({active}) must name one of altup_num_inputs "
                         f"({streams}) streams")
    out["_fields"] = dict(
        kv_shared_from=_kv_sources(kinds, shared) if shared else None, v_norm=True,
        layer_intermediate_sizes=sizes if len(set(sizes)) > 1 else None,
        per_layer_input_size=ple,
        per_layer_vocab_size=int(hf.get("vocab_size_per_layer_input") or 0) if ple else 0,
        altup_num_inputs=streams, altup_active_idx=active,
        altup_correct_scale=bool(hf.get("altup_correct_scale", True)),
        laurel_rank=int(hf.get("laurel_rank", 64)),
        activation_sparsity=sparsity if any(sparsity) else None)
    return out


def _exaone_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """EXAONE 3.x's config keys under Llama's (num_layers, layer_norm_epsilon,
    activation_function), where the Llama name is absent."""
    out = dict(hf)
    for theirs, ours in (("num_layers", "num_hidden_layers"),
                         ("layer_norm_epsilon", "rms_norm_eps"),
                         ("activation_function", "hidden_act")):
        if out.get(ours) is None and out.get(theirs) is not None:
            out[ours] = out[theirs]
    return out


def _dt_rank(value: Any, hidden: int) -> int:
    """Mamba-1's dt rank: an int, or "auto" = ceil(hidden / 16) (transformers' rule)."""
    return -(-hidden // 16) if value in (None, "auto") else int(value)


def _mamba1_config(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Mamba / FalconMamba's keys: attention-free, every layer one norm and a Mamba-1
    mixer (no MLP); intermediate_size (else expand x hidden) the mixer's inner width,
    time_step_rank, state_size, use_bias / use_conv_bias, layer_norm_epsilon; FalconMamba's
    weightless dt / B / C norms of mixer_rms_eps. The attention fields are placeholders
    (one head of 2 dims, as Mamba-2's: no layer attends, and the unused rope table stays
    tiny instead of max positions x hidden)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    hidden = int(hf.get("hidden_size") or 0)
    inner = hf.get("intermediate_size")
    inner = int(inner) if inner else int(hf.get("expand", 2)) * hidden
    out["_layer_mixers"] = ["mamba"] * n
    out["_layer_mlps"] = [False] * n
    out["intermediate_size"] = inner
    out["num_attention_heads"] = out["num_key_value_heads"] = 1
    out["head_dim"] = 2
    bias = bool(hf.get("use_bias", False))
    out["_mamba"] = dict(
        mamba_inner_size=inner, mamba_dt_rank=_dt_rank(hf.get("time_step_rank"), hidden),
        mamba_state_size=int(hf.get("state_size", 16)), mamba_proj_bias=bias,
        mamba_out_bias=bias,
        mamba_bcdt_norm="plain" if family == "falcon_mamba" else "",
        mamba_bcdt_eps=float(hf.get("mixer_rms_eps", 1e-6)))
    out["_conv"] = (int(hf.get("conv_kernel", 4)), bool(hf.get("use_conv_bias", True)))
    out["rms_norm_eps"] = float(hf.get("layer_norm_epsilon", 1e-5))
    out.setdefault("tie_word_embeddings", True)
    out["_nope"] = True
    # (no position limit of their own: a default as long as the engine's bookkeeping
    # serves at a full batch)
    out.setdefault("max_position_embeddings", ATTENTION_FREE_MAX_LEN)
    return out


def _jamba_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Jamba's keys: attention where layer % attn_layer_period == attn_layer_offset (or
    layers_block_type), Mamba-1 elsewhere (mamba_expand x hidden wide, weighted dt / B / C
    norms of rms_norm_eps); no rope; num_experts > 1 puts experts of intermediate_size
    (softmax router, top-k weights not renormalized) where layer % expert_layer_period
    == expert_layer_offset, SwiGLU MLPs elsewhere."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    hidden = int(hf.get("hidden_size") or 0)
    kinds = hf.get("layers_block_type")
    if kinds is None:
        period, offset = int(hf.get("attn_layer_period", 8)), int(hf.get("attn_layer_offset", 4))
        kinds = ["attention" if i % period == offset else "mamba" for i in range(n)]
    unknown = sorted({str(k) for k in kinds if k not in ("attention", "mamba")})
    if unknown or len(kinds) != n:
        raise UnsupportedModelError(f"Jamba layer types {unknown or kinds} are not supported "
                                    f"(one of 'attention' / 'mamba' per layer)")
    out["_layer_mixers"] = list(kinds)
    bias = bool(hf.get("mamba_proj_bias", False))
    out["_mamba"] = dict(
        mamba_inner_size=int(hf.get("mamba_expand", 2)) * hidden,
        mamba_dt_rank=_dt_rank(hf.get("mamba_dt_rank"), hidden),
        mamba_state_size=int(hf.get("mamba_d_state", 16)), mamba_proj_bias=bias,
        mamba_out_bias=bias, mamba_bcdt_norm="weighted",
        mamba_bcdt_eps=float(hf.get("rms_norm_eps", 1e-6)))
    out["_conv"] = (int(hf.get("mamba_d_conv", 4)), bool(hf.get("mamba_conv_bias", True)))
    out["_nope"] = True
    experts = int(hf.get("num_experts", 1) or 1)
    if experts > 1:
        period = int(hf.get("expert_layer_period", 2))
        offset = int(hf.get("expert_layer_offset", 1))
        out["_moe"] = dict(num_experts=experts,
                           num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
                           moe_intermediate_size=int(hf.get("intermediate_size", 0)),
                           norm_topk_prob=False,
                           moe_layers=[i for i in range(n) if i % period == offset])
    return out


#: Zamba2's layer kinds (layers_block_type; "mamba" is the legacy name)
_ZAMBA2_LAYERS = {"mamba": "mamba2", "linear_attention": "mamba2", "hybrid": "zamba_hybrid"}


def _zamba2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Zamba2's keys: each layer Mamba-2 ("mamba" / "linear_attention") or a hybrid layer
    (layers_block_type); the shared blocks' attention 2 H wide (head_dim 2 H / heads,
    softmax scale (head_dim / 2) ** -0.5; rope only with use_mem_rope), their MLP of
    intermediate_size (4 H by default) with add_bias_linear biases; the Mamba-2 fields
    (n_mamba_heads of mamba_expand x H / heads, the gated norm's eps 1e-5, dt clamped from
    below at time_step_min; the conv always has a bias)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    hidden = int(hf.get("hidden_size") or 0)
    heads = int(hf.get("num_attention_heads") or 0)
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if not kinds:
        raise ValueError("config.json has no layers_block_type")
    unknown = sorted({str(k) for k in kinds if k not in _ZAMBA2_LAYERS})
    if unknown or len(kinds) != n:
        raise UnsupportedModelError(f"Zamba2 layer types {unknown or kinds} are not supported "
                                    f"(one of {sorted(_ZAMBA2_LAYERS)} per layer)")
    out["_layer_mixers"] = [_ZAMBA2_LAYERS[k] for k in kinds]
    out["_layer_mlps"] = [False] * n
    if heads and not hf.get("head_dim"):
        out["head_dim"] = 2 * hidden // heads
    out["intermediate_size"] = int(hf.get("intermediate_size") or 4 * hidden)
    bias = bool(hf.get("add_bias_linear", False))
    out["mlp_bias"] = bias
    inner = int(hf.get("mamba_expand", 2)) * hidden
    mheads = int(hf.get("n_mamba_heads", 8))
    out["_mamba"] = dict(
        mamba_num_heads=mheads, mamba_head_dim=inner // mheads,
        mamba_num_groups=int(hf.get("mamba_ngroups", 1)),
        mamba_state_size=int(hf.get("mamba_d_state", 64)), mamba_proj_bias=bias,
        mamba_out_bias=bias,
        mamba_dt_limit=(float(hf.get("time_step_min", 0.001)), float("inf")))
    out["_conv"] = (int(hf.get("mamba_d_conv", 4)), True)
    out["_fields"] = dict(
        mamba_norm_eps=1e-5, zamba_shared_blocks=int(hf.get("num_mem_blocks", 1)),
        zamba_adapter_rank=int(hf.get("adapter_rank", 128)),
        zamba_attention_adapters=bool(hf.get("use_shared_attention_adapter", False)))
    out["_nope"] = not hf.get("use_mem_rope", False)
    out.setdefault("tie_word_embeddings", True)
    return out


def _mamba2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Mamba-2's keys (transformers' Mamba2Config): attention-free, every layer one norm
    and a Mamba-2 mixer (no MLP): num_heads heads of head_dim (their product must be
    expand x hidden_size), n_groups groups of B / C of state_size, conv_kernel /
    use_conv_bias, use_bias on in_proj and out_proj, dt clamped to time_step_limit,
    layer_norm_epsilon for every norm (the mixer's gated norm too).

    The gated norm follows the gate (normalized per group of heads after y * silu(z)), as
    transformers' Mamba2 and mamba_ssm's Mamba2 (its default) run it; neither reads a
    config's norm_before_gate (Mamba-Codestral's says true), and neither does this reader.
    chunk_size is transformers' scan chunking (ops.mamba2_scan chunks its own way);
    residual_in_fp32 is not applied (the residual stream stays in the model dtype, as for
    Mamba-1). rms_norm false (no gated norm) and activations other than SiLU are refused.
    The attention fields are placeholders (one head of 2 dims: no layer attends, and the
    unused rope table stays small)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    hidden = int(hf.get("hidden_size") or 0)
    heads, head_dim = int(hf.get("num_heads", 128)), int(hf.get("head_dim", 64))
    expand = hf.get("expand", 2)
    inner = int(expand * hidden)
    if heads * head_dim != inner:
        raise ValueError(f"config.num_heads ({heads}) x head_dim ({head_dim}) must equal "
                         f"expand ({expand}) x hidden_size ({hidden}) = {inner}")
    act = str(hf.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"Mamba-2 with hidden_act {act!r} is not supported (SiLU)")
    if hf.get("rms_norm", True) is False:
        raise UnsupportedModelError("Mamba-2 with rms_norm false (no gated RMSNorm) is not "
                                    "supported")
    limit = hf.get("time_step_limit") or (0.0, float("inf"))
    if len(limit) != 2:
        raise ValueError(f"config.time_step_limit must be [min, max], got {limit!r}")
    out["_layer_mixers"] = ["mamba2"] * n
    out["_layer_mlps"] = [False] * n
    out["intermediate_size"] = inner
    out["num_attention_heads"] = out["num_key_value_heads"] = 1
    out["head_dim"] = 2
    out["hidden_act"] = "silu"
    bias = bool(hf.get("use_bias", False))
    out["_mamba"] = dict(
        mamba_num_heads=heads, mamba_head_dim=head_dim,
        mamba_num_groups=int(hf.get("n_groups", 8)),
        mamba_state_size=int(hf.get("state_size", 128)), mamba_proj_bias=bias,
        mamba_out_bias=bias, mamba_dt_limit=(_json_float(limit[0]), _json_float(limit[1])))
    out["_conv"] = (int(hf.get("conv_kernel", 4)), bool(hf.get("use_conv_bias", True)))
    out["rms_norm_eps"] = float(hf.get("layer_norm_epsilon", 1e-5))
    out.setdefault("tie_word_embeddings", False)
    out["_nope"] = True
    out.setdefault("max_position_embeddings", ATTENTION_FREE_MAX_LEN)
    return out


#: Zamba's layer kinds (layers_block_type; "mamba" is the legacy name)
_ZAMBA_LAYERS = {"mamba": "mamba", "linear_attention": "mamba", "hybrid": "zamba_hybrid"}
#: transformers' ZambaConfig defaults of the keys that change the math
_ZAMBA_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16, num_key_value_heads=16, n_mamba_heads=2, hidden_act="gelu",
    hidden_mamba_act="silu", rms_norm_eps=1e-5, attn_layer_period=6, attn_layer_offset=4,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto",
    mamba_conv_bias=True, mamba_proj_bias=False, tie_word_embeddings=True,
    max_position_embeddings=4096)


def _zamba_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Zamba (v1)'s keys (transformers' ZambaConfig, its defaults for what a config
    omits): each layer a multi-head Mamba-1 layer ("mamba" / "linear_attention") or a
    hybrid layer ("hybrid"), from layers_block_type or transformers' default pattern
    (layers 0 and 1 Mamba, layer 2 hybrid, then layer 3 + i hybrid where i %
    attn_layer_period == attn_layer_offset); the one shared block: attention over
    cat(stream, embeddings) (attention_hidden_size must be 2 H), heads of
    attention_head_dim (default 2 H / heads), softmax scale (head_dim / 2) ** -0.5, no
    rope, a gated MLP of intermediate_size with hidden_act, no biases; the Mamba-1 fields:
    mamba_expand x H channels in n_mamba_heads heads, each with its own dt rank
    (mamba_dt_rank, "auto" = ceil(H / 16)), mamba_d_state, mamba_d_conv, mamba_conv_bias,
    mamba_proj_bias (in_proj and out_proj), hidden_mamba_act SiLU only; rms_norm_eps for
    every norm."""
    out = _with_defaults(hf, _ZAMBA_DEFAULTS)
    n = int(out.get("num_hidden_layers") or 0)
    hidden = int(out.get("hidden_size") or 0)
    heads = int(out["num_attention_heads"])
    kinds = out.get("layers_block_type") or out.get("layer_types")
    if not kinds:
        period, offset = int(out["attn_layer_period"]), int(out["attn_layer_offset"])
        kinds = ["mamba", "mamba", "hybrid"] + [
            "hybrid" if i % period == offset else "mamba" for i in range(n - 3)]
    unknown = sorted({str(k) for k in kinds if k not in _ZAMBA_LAYERS})
    if unknown or len(kinds) != n:
        raise UnsupportedModelError(f"Zamba layer types {unknown or kinds} are not supported "
                                    f"(one of {sorted(_ZAMBA_LAYERS)} per layer, "
                                    f"num_hidden_layers {n})")
    wide = out.get("attention_hidden_size")
    if wide is not None and int(wide) != 2 * hidden:
        raise UnsupportedModelError(f"config.attention_hidden_size {wide} is not supported "
                                    f"(the shared block reads cat(stream, embeddings): 2 x "
                                    f"hidden_size = {2 * hidden})")
    act = str(out["hidden_mamba_act"])
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"config.hidden_mamba_act {act!r} is not supported "
                                    "(SiLU)")
    out["_layer_mixers"] = [_ZAMBA_LAYERS[k] for k in kinds]
    out["_layer_mlps"] = [False] * n
    head_dim = int(out.get("attention_head_dim") or (2 * hidden // heads if heads else 0))
    out["head_dim"] = head_dim
    out["_attention_scale"] = (head_dim / 2) ** -0.5 if head_dim else None
    mheads = int(out["n_mamba_heads"])
    bias = bool(out["mamba_proj_bias"])
    out["_mamba"] = dict(
        mamba_inner_size=int(out["mamba_expand"]) * hidden,
        mamba_dt_rank=_dt_rank(out["mamba_dt_rank"], hidden),
        mamba_state_size=int(out["mamba_d_state"]), mamba_proj_bias=bias,
        mamba_out_bias=bias, mamba1_num_heads=mheads)
    out["_conv"] = (int(out["mamba_d_conv"]), bool(out["mamba_conv_bias"]))
    out["_fields"] = dict(zamba_shared_blocks=1, zamba_adapter_rank=0, zamba_mamba="mamba")
    out["_nope"] = True
    return out


def _olmo_hybrid_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """OLMo Hybrid's keys: each layer's mixer (default: full attention every fourth layer,
    at least the last), the linear heads' defaults (transformers' OlmoHybridConfig), its
    attention layers post-norm and without rope when rope_parameters has no rope_theta
    (the released checkpoints)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    heads = int(hf.get("num_attention_heads") or 1)
    kinds = hf.get("layer_types")
    if kinds is None:
        kinds = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
        if "full_attention" not in kinds:
            kinds[-1] = "full_attention"
    names = {"full_attention": "attention", "linear_attention": "gated_deltanet"}
    unknown = sorted({str(k) for k in kinds if k not in names})
    if unknown:
        raise UnsupportedModelError(f"OLMo Hybrid layer types {unknown} are not supported")
    out["_layer_mixers"] = [names[k] for k in kinds]
    key_heads = int(hf.get("linear_num_key_heads") or heads)
    key_dim = int(hf.get("linear_key_head_dim") or int(0.75 * int(hf["hidden_size"]) /
                                                        key_heads))
    params = hf.get("rope_parameters")
    nope = not (isinstance(params, Mapping) and params.get("rope_theta") is not None) and \
        hf.get("rope_theta") is None
    out["_fields"] = dict(
        linear_num_key_heads=key_heads,
        linear_num_value_heads=int(hf.get("linear_num_value_heads") or heads),
        linear_key_head_dim=key_dim,
        linear_value_head_dim=int(hf.get("linear_value_head_dim") or 2 * key_dim),
        gdn_separate_projections=True,
        gdn_beta_scale=2.0 if hf.get("linear_allow_neg_eigval", True) else 1.0,
        gdn_norm_eps=1e-5,
        post_norm_layers=[i for i, m in enumerate(out["_layer_mixers"]) if m == "attention"])
    out["_nope"] = nope
    return out


def _qwen3_5_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen3.5's keys: each layer's mixer from layer_types (default: full attention every
    full_attention_interval-th layer, transformers' Qwen3_5TextConfig)."""
    out = dict(hf)
    n = int(hf.get("num_hidden_layers") or 0)
    kinds = hf.get("layer_types")
    if kinds is None:
        every = int(hf.get("full_attention_interval", 4))
        kinds = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    names = {"full_attention": "attention", "linear_attention": "gated_deltanet"}
    unknown = sorted({k for k in kinds if k not in names})
    if unknown:
        raise UnsupportedModelError(f"Qwen3.5 layer types {unknown} are not supported "
                                    f"(supported: {sorted(names)})")
    out["_layer_mixers"] = [names[k] for k in kinds]
    if out.get("intermediate_size") is None and out.get("moe_intermediate_size"):
        out["intermediate_size"] = out["moe_intermediate_size"]   # (MoE: every MLP sparse)
    if out.get("attention_bias"):
        raise UnsupportedModelError("Qwen3.5 with attention_bias is not supported")
    return out


#: family -> its config.json read under the decoder's keys (with what it does not have
#: refused by name): GPT-2-style keys, BLOOM's, Falcon's, MPT's, LFM2's
_KEY_READERS: dict[str, Any] = {
    **{family: _learned_positions_config for family in _LEARNED_POSITIONS},
    "bloom": lambda hf, _: _bloom_config(hf), "gptj": lambda hf, _: _gpt2_keys(hf),
    "falcon": lambda hf, _: _falcon_config(hf), "mpt": lambda hf, _: _mpt_config(hf),
    "lfm2": lambda hf, _: _lfm2_config(hf),
    "lfm2_moe": lambda hf, _: _lfm2_config(hf, adjust_mlp=False),
    "lfm3": lambda hf, _: _lfm3_config(hf),
    **{family: lambda hf, _: _qwen3_5_config(hf) for family in ("qwen3_5", "qwen3_5_moe")},
    "falcon_h1": lambda hf, _: _falcon_h1_config(hf),
    "bamba": lambda hf, _: _bamba_config(hf),
    "nemotron_h": lambda hf, _: _nemotron_h_config(hf),
    "olmo_hybrid": lambda hf, _: _olmo_hybrid_config(hf),
    "mamba": _mamba1_config, "falcon_mamba": _mamba1_config,
    "jamba": lambda hf, _: _jamba_config(hf),
    "zamba2": lambda hf, _: _zamba2_config(hf),
    "mamba2": lambda hf, _: _mamba2_config(hf),
    "zamba": lambda hf, _: _zamba_config(hf),
    "exaone": lambda hf, _: _exaone_config(hf),
    "gemma4": lambda hf, _: _gemma4_config(hf),
    "gemma3n": lambda hf, _: _gemma3n_config(hf),
    "gpt_oss": lambda hf, _: _gpt_oss_config(hf)}

#: transformers' GptOssConfig rope when a config.json names none (YaRN, factor 32 over a
#: 4096-token pretraining context, the correction range not truncated)
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
_GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gpt_oss_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-OSS's config.json with transformers' GptOssConfig defaults filled in for what it
    omits: q / k / v / o biases (``attention_bias`` true), rms_norm_eps 1e-5, a window of
    128 on the sliding layers, ``layer_types`` alternating sliding (even layers) and full,
    rope base 150000 with YaRN (``_GPT_OSS_ROPE``). Refused by field name: layer types
    other than sliding_attention / full_attention, a layer_types list of the wrong
    length, a config without experts (num_local_experts)."""
    out = dict(hf)
    if out.get("attention_bias") is None:
        out["attention_bias"] = True
    if out.get("rms_norm_eps") is None:
        out["rms_norm_eps"] = 1e-5
    if "sliding_window" not in out:
        out["sliding_window"] = 128
    layers = int(out.get("num_hidden_layers") or 0)
    types = out.get("layer_types")
    if not types:
        types = [_GPT_OSS_LAYER_TYPES[i % 2] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise ValueError(f"config.json: layer_types must list one type per layer "
                         f"(num_hidden_layers = {layers}), got {types!r}")
    other = sorted({str(t) for t in types} - set(_GPT_OSS_LAYER_TYPES))
    if other:
        raise UnsupportedModelError(f"GPT-OSS layer_types {other} are not supported "
                                    f"(supported: {list(_GPT_OSS_LAYER_TYPES)})")
    out["layer_types"] = list(types)
    if not out.get("rope_parameters") and not out.get("rope_scaling"):
        out["rope_parameters"] = {**_GPT_OSS_ROPE,
                                  "rope_theta": float(out.get("rope_theta") or 150000.0)}
    experts = out.get("num_local_experts") or out.get("num_experts")
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ValueError(f"config.json: GPT-OSS needs num_local_experts (a positive int: "
                         f"every MLP is a mixture of experts), got {experts!r}")
    return out


def _attention_scale(hf: Mapping[str, Any], family: str) -> float | None:
    """The softmax scale where it is not head_dim ** -0.5: Gemma 2/3's
    query_pre_attn_scalar ** -0.5, Granite's attention_multiplier, GPT-2's 1 without
    scale_attn_weights."""
    if hf.get("_attention_scale") is not None:
        return float(hf["_attention_scale"])
    if family == "zamba2":       # (head_dim / 2) ** -0.5, head_dim = 2 H / heads
        return (int(hf["hidden_size"]) / int(hf["num_attention_heads"])) ** -0.5
    if family in ("gemma2", "gemma3", "vaultgemma"):
        return float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
    if family in ("gemma4", "gemma3n"):      # (q / k are RMS-normalized: no 1 / sqrt(d))
        return 1.0
    if family in ("granite", "granitemoe", "granitemoeshared", "granite_hybrid", "granite_swa",
                  "hyperclovax"):
        return float(hf.get("attention_multiplier", 1.0))
    return None


def _positive_or_none(value: Any) -> float | None:
    return None if value is None or float(value) <= 0 else float(value)


_ROPE_KINDS = ("default", "linear", "llama3", "yarn", "longrope", "proportional")


def _rope_kind(scaling: Mapping[str, Any] | None) -> str:
    kind = str(scaling.get("rope_type", scaling.get("type", "default"))) if scaling else \
        "default"
    kind = "longrope" if kind == "su" else kind     # Phi-3's first name for it
    # Qwen-VL's M-RoPE (mrope_section): text tokens sit at one position on every axis,
    # so for the text decoder it is the default rope (images are not served)
    kind = "default" if kind == "mrope" else kind
    if kind not in _ROPE_KINDS:
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported "
                                    f"(supported: {', '.join(_ROPE_KINDS)})")
    return kind


def _rope_from_hf(hf: Mapping[str, Any], family: str
                  ) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, rope_scaling or None, the sliding layers' rope base or None).

    transformers 5 writes ``rope_parameters`` (per layer type for Gemma 3:
    {"full_attention": {...}, "sliding_attention": {...}}); 4.x and most hub checkpoints
    write rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq)."""
    params = hf.get("rope_parameters")
    local_theta: float | None = None
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        local = params.get("sliding_attention") or {}
        if _rope_kind(local) != "default":
            raise UnsupportedModelError("rope scaling on sliding-window layers is not "
                                        "supported")
        local_theta = float(local.get("rope_theta", 10000.0))
        params = params["full_attention"]
    elif family in ("gemma3", "gemma3n"):
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    elif family == "olmo3":   # its rope_scaling is the full-attention layers' only
        local_theta = float(hf.get("rope_theta", 10000.0))
    default_theta = 1e6 if family in ("gemma3",) + _LFM2 else \
        5e5 if family == "exaone" else 150000.0 if family == "gpt_oss" else 10000.0
    if isinstance(params, Mapping) and params:
        rope_theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        rope_theta = float(hf.get("rope_theta", default_theta))
        scaling = dict(hf.get("rope_scaling") or {})
    if str(scaling.get("rope_type", scaling.get("type", ""))) == "dynamic" and \
            scaling.get("alpha"):
        scaling = {}    # HunYuan's fixed-alpha NTK: a larger static base (_ntk_alpha)
    proportion = scaling.pop("partial_rotary_factor", None)   # (5.x keeps it here; a field
    scaling.pop("llama_4_scaling_beta", None)     # (a query scale: _llama4_scaling)
    kind = _rope_kind(scaling)
    if kind == "proportional":     # (here the share of the frequencies that turn)
        scaling["partial_rotary_factor"] = float(1.0 if proportion is None else proportion)
    scaling.pop("type", None)                     # (4.x spelling of rope_type)
    if kind in ("yarn", "longrope"):
        # The pretraining context: the rope dict's, else the config's (Phi-3 keeps it at
        # the top level), else max_position_embeddings.
        original = scaling.get("original_max_position_embeddings") or \
            hf.get("original_max_position_embeddings")
        if original is None and kind == "longrope":
            raise UnsupportedModelError("longrope needs original_max_position_embeddings")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if not isinstance(scaling.get(key), list):
                raise UnsupportedModelError(f"longrope rope_scaling needs a {key} list")
    return rope_theta, (None if kind == "default" else {**scaling, "rope_type": kind}), \
        local_theta


def _sliding_window_from_hf(hf: Mapping[str, Any], family: str, num_layers: int
                            ) -> tuple[int | None, list[int] | None]:
    """(sliding_window or None, the layers that use it or None = all layers)."""
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3") and \
            not hf.get("use_sliding_window", False):
        window = None
    if family == "gemma":
        window = None
    if window is None:
        return None, None
    layer_types = hf.get("layer_types")
    window_layers: list[int] | None = None
    if isinstance(layer_types, list) and layer_types:
        window_layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    elif family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        start = int(hf.get("max_window_layers", num_layers))
        window_layers = list(range(start, num_layers))
    elif family == "granite_swa":         # transformers' default: every 4th layer global
        window_layers = [i for i in range(num_layers) if i % 4]
    elif family in ("gemma2", "gemma3"):   # transformers' default layer patterns
        pattern = 2 if family == "gemma2" else int(hf.get("sliding_window_pattern", 6))
        window_layers = [i for i in range(num_layers) if (i + 1) % pattern]
    elif family == "exaone4":   # "LLLG" (local / global per layer, repeated) or 4
        pattern = hf.get("sliding_window_pattern", 4)
        if isinstance(pattern, str):
            window_layers = [i for i in range(num_layers) if pattern[i % len(pattern)] == "L"]
        else:
            window_layers = [i for i in range(num_layers) if (i + 1) % int(pattern)]
    if window_layers is not None and not window_layers:
        return None, None
    return int(window), window_layers


def _moe_from_hf(hf: Mapping[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """The expert fields: ``num_experts`` or ``num_local_experts`` (transformers 5 saves
    the latter for Qwen3-MoE). Qwen2/3-MoE: a layer is sparse unless in
    ``mlp_only_layers``, every ``decoder_sparse_step``-th layer; experts of
    ``moe_intermediate_size`` (Qwen2-MoE: plus a shared expert). Mixtral,
    Granite-MoE, OLMoE: every layer, experts of ``intermediate_size``. Mixtral and
    Granite-MoE always renormalize the top-k weights; the others as ``norm_topk_prob``."""
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    layers = list(range(num_layers))
    size = int(hf.get("intermediate_size", 0))
    if family == "gpt_oss":        # every layer; softmax over the top-k logits (= the
        # top-k of the softmax renormalized); biased router and experts, clamped SwiGLU
        experts = int(hf.get("num_local_experts") or hf.get("num_experts"))
        k = hf.get("num_experts_per_tok") or hf.get("experts_per_token") or 4
        return dict(num_experts=experts, num_experts_per_tok=int(k),
                    moe_intermediate_size=size, norm_topk_prob=True, moe_layers=None,
                    moe_router_bias=True, moe_expert_biases=True, moe_activation="swigluoai",
                    swiglu_alpha=_json_float(hf.get("swiglu_alpha", 1.702)),
                    swiglu_limit=_json_float(hf.get("swiglu_limit", 7.0)))
    if family == "lfm2_moe":       # the first num_dense_layers layers are dense
        layers = layers[int(hf.get("num_dense_layers", 2)):]
        return dict(num_experts=experts,
                    num_experts_per_tok=int(hf.get("num_experts_per_tok", 4)),
                    moe_intermediate_size=int(hf.get("moe_intermediate_size", 0)),
                    norm_topk_prob=bool(hf.get("norm_topk_prob", True)), moe_layers=layers,
                    moe_router="sigmoid", moe_expert_bias=bool(hf.get("use_expert_bias", True)),
                    moe_routed_scaling=float(hf.get("routed_scaling_factor", 1.0)))
    if family in ("qwen3_moe", "qwen2_moe", "qwen3_5_moe"):
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        layers = [i for i in layers if i not in dense and (i + 1) % step == 0]
        size = int(hf.get("moe_intermediate_size", 0))
    if hf.get("clip_qkv") is not None:
        raise UnsupportedModelError("clip_qkv is not supported")
    # (Qwen3.5 MoE always renormalizes)
    norm = True if family in ("mixtral", "granitemoe", "granitemoeshared", "qwen3_5_moe") else \
        bool(hf.get("norm_topk_prob", False))
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0) \
        if family in ("qwen2_moe", "qwen3_5_moe") else \
        int(hf.get("shared_intermediate_size", 0) or 0) if family == "granitemoeshared" else 0
    return dict(num_experts=experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 0)),
                moe_intermediate_size=size, norm_topk_prob=norm,
                moe_layers=layers if experts else None, shared_expert_intermediate_size=shared,
                # (Granite's shared MLP is added as is)
                **({"shared_expert_gated": False} if family == "granitemoeshared" else {}))


def _check_stablelm(hf: Mapping[str, Any]) -> None:
    """StableLM's variants this decoder does not have (StableLM 2 12B's)."""
    if hf.get("qk_layernorm"):
        raise UnsupportedModelError("StableLM with qk_layernorm (per-head LayerNorms) is "
                                    "not supported")
    if hf.get("use_parallel_residual"):
        raise UnsupportedModelError("StableLM with use_parallel_residual is not supported")


def _activation_from_hf(hf: Mapping[str, Any], family: str) -> str:
    """The MLP activation's HF name. Gemma 2/3 read ``hidden_activation``; Gemma 1's legacy
    "gelu" means the tanh approximation (transformers maps it so)."""
    if family in _GEMMA:
        act = str(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh")
        return "gelu_pytorch_tanh" if family == "gemma" and act == "gelu" else act
    return str(hf.get("hidden_act", "silu"))


# ----------------------------------------------------------------- built-in names
# Shapes from the published config.json of each model (weights are random: dummy models
# for benchmarks, memory planning and engine tests without a download).

_LLAMA3_EOS = [128001, 128008, 128009]
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, eos_token_ids=[257], bos_token_id=256),
    "tiny-qwen3": dict(architecture="qwen3", vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=2048, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[257],
                       bos_token_id=256, qk_norm=True),
    # Qwen3-MoE's layer: layer 0 a mixture of 8 experts (top 2, renormalized), layer 1 dense.
    "tiny-qwen3-moe": dict(architecture="qwen3_moe", vocab_size=512, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, max_position_embeddings=2048, rope_theta=1e6,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[257],
                           bos_token_id=256, qk_norm=True, num_experts=8,
                           num_experts_per_tok=2, moe_intermediate_size=64,
                           norm_topk_prob=True, moe_layers=[0]),
    # Gemma 3's layer: sliding layer 0 (window 8, rope base 1e4), global layer 1, q/k norms,
    # sandwich norms, gelu-tanh MLP, (1 + w) norms, sqrt(hidden) embedding scale.
    "tiny-gemma3": dict(architecture="gemma3", vocab_size=512, hidden_size=64,
                        intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, max_position_embeddings=2048, rope_theta=1e6,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[257],
                        bos_token_id=256, sliding_window=8, sliding_window_layers=[0],
                        qk_norm=True, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0,
                        embed_scale=8.0, sandwich_norm=True, attention_scale=16 ** -0.5,
                        sliding_rope_theta=1e4),
    # GPT-OSS's layer: a sliding layer (window 8) then a full one, q / k / v / o biases, a
    # sink per head, YaRN (factor 32), 8 biased swigluoai experts (top 2) with a biased
    # router in every layer.
    "tiny-gpt-oss": dict(architecture="gpt_oss", vocab_size=512, hidden_size=64,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, max_position_embeddings=2048, rope_theta=150000.0,
                         rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "truncate": False,
                                       "original_max_position_embeddings": 64},
                         rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_ids=[257],
                         bos_token_id=256, sliding_window=8, sliding_window_layers=[0],
                         qkv_bias=True, o_bias=True, attention_sinks=True, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                         moe_router_bias=True, moe_expert_biases=True,
                         moe_activation="swigluoai"),
    "qwen2.5-0.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_ids=[151645, 151643], bos_token_id=151643, qkv_bias=True),
    "qwen2.5-1.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_ids=[151645, 151643], bos_token_id=151643, qkv_bias=True),
    "qwen3-0.6b": dict(architecture="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True,
                       eos_token_ids=[151645, 151643], bos_token_id=151643, qk_norm=True),
    "llama-3.2-1b": dict(architecture="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                         head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         eos_token_ids=list(_LLAMA3_EOS), bos_token_id=128000),
    "llama-3.1-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         eos_token_ids=list(_LLAMA3_EOS), bos_token_id=128000),
    "llama-3-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False,
                       eos_token_ids=[128001, 128009], bos_token_id=128000),
    "mistral-7b": dict(architecture="mistral", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_ids=[2],
                       bos_token_id=1),
    # Gemma 3 1B: 5 sliding-window layers (512, local rope base 1e4) per global layer.
    "gemma-3-1b": dict(architecture="gemma3", vocab_size=262144, hidden_size=1152,
                       intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1,
                       head_dim=256, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[1, 106],
                       bos_token_id=2, sliding_window=512,
                       sliding_window_layers=[i for i in range(26) if (i + 1) % 6],
                       qk_norm=True, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0,
                       embed_scale=1152 ** 0.5, sandwich_norm=True, attention_scale=256 ** -0.5,
                       sliding_rope_theta=1e4),
    # Gemma 2 2B: sliding window 4096 on every other layer, score and logit softcaps.
    "gemma-2-2b": dict(architecture="gemma2", vocab_size=256000, hidden_size=2304,
                       intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4,
                       head_dim=256, max_position_embeddings=8192, rope_theta=10000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[1, 107],
                       bos_token_id=2, sliding_window=4096,
                       sliding_window_layers=list(range(0, 26, 2)),
                       hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0,
                       embed_scale=2304 ** 0.5, sandwich_norm=True, attention_scale=256 ** -0.5,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}
#: Built-ins given by their published config.json (the hub's spelling), read with
#: :meth:`DecoderConfig.from_hf`: vLLM's quickstart models and the older families.
_PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(architectures=["GPT2LMHeadModel"], n_embd=768, n_head=12, n_layer=12,
                 n_positions=1024, vocab_size=50257, activation_function="gelu_new",
                 layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256),
    "opt-125m": dict(architectures=["OPTForCausalLM"], activation_function="relu",
                     hidden_size=768, ffn_dim=3072, num_attention_heads=12,
                     num_hidden_layers=12, max_position_embeddings=2048, vocab_size=50272,
                     word_embed_proj_dim=768, do_layer_norm_before=True, bos_token_id=2,
                     eos_token_id=2, pad_token_id=1),
    "pythia-160m": dict(architectures=["GPTNeoXForCausalLM"], hidden_size=768,
                        intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                        max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                        vocab_size=50304, use_parallel_residual=True, layer_norm_eps=1e-5,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                        hidden_act="gelu"),
    "bloom-560m": dict(architectures=["BloomForCausalLM"], hidden_size=1024, n_head=16,
                       n_layer=24, vocab_size=250880, layer_norm_epsilon=1e-5,
                       bos_token_id=1, eos_token_id=2),
    # GPT-OSS 20B: 24 layers alternating a 128-token sliding window and full attention,
    # 32 biased swigluoai experts (top 4), sinks, YaRN. 20.9B parameters (3.6B active);
    # a built-in's experts are dense (bf16: ~42 GB), a checkpoint's stay MXFP4.
    "gpt-oss-20b": dict(architectures=["GptOssForCausalLM"], hidden_size=2880,
                        intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, vocab_size=201088, rms_norm_eps=1e-5,
                        rope_theta=150000, rope_scaling={
                            "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False,
                            "original_max_position_embeddings": 4096},
                        sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12,
                        max_position_embeddings=131072, tie_word_embeddings=False,
                        attention_bias=True, swiglu_limit=7.0, eos_token_id=200002,
                        pad_token_id=199999),
}
BUILTIN_CONFIGS.update({name: DecoderConfig.from_hf(hf).to_dict()
                        for name, hf in _PUBLISHED_CONFIGS.items()})
# The tiny configs use the byte tokenizer (ids 0..255 bytes, 256 <bos>, 257 <eos>, ...);
# the others use their real vocab sizes, and dummy generations decode only byte ids.


def list_models() -> list[str]:
    """Built-in model names (random weights; see :func:`minikernels.models.load_model`)."""
    return list(BUILTIN_CONFIGS)


def builtin_config(name: str) -> DecoderConfig:
    key = name.lower()
    if key not in BUILTIN_CONFIGS:
        raise KeyError(f"unknown built-in model {name!r}; built-in names: {list_models()}")
    return DecoderConfig(**{k: (list(v) if isinstance(v, list) else
                               dict(v) if isinstance(v, dict) else v)
                            for k, v in BUILTIN_CONFIGS[key].items()})
