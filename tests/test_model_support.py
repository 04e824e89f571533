"""Shared helpers for the model / loader / generate tests: tiny transformers models saved
with save_pretrained, a paged-cache schedule runner, and GPTQ/AWQ packers written from
the published formats (independently of minikernels.quant)."""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from minikernels.models.generate import build_step_metadata

# name -> (transformers class name, config kwargs)
BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("Llama", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": ("Llama", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-bias-linear-rope": ("Llama", dict(attention_bias=True, mlp_bias=True,
                                             rope_scaling={"rope_type": "linear",
                                                           "factor": 2.0})),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-window": ("Qwen2", dict(use_sliding_window=True, sliding_window=6,
                                   max_window_layers=1)),
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": ("Qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral-window": ("Mistral", dict(sliding_window=6, head_dim=16,
                                       tie_word_embeddings=False)),
    # Ministral 3 (the text decoder of Mistral3ForConditionalGeneration): YaRN with
    # mscale, and Llama 4's query scaling past each 8-token "original context".
    "ministral3-yarn": ("Ministral3", dict(
        head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.5})),
    # Ministral (8B-2410): Mistral with the window on some layers only (layer_types).
    "ministral-window": ("Ministral", dict(sliding_window=6, head_dim=16,
                                           tie_word_embeddings=False,
                                           layer_types=["full_attention",
                                                        "sliding_attention"])),
    # Gemma: (1 + w) norms, sqrt(hidden) embedding scale, gelu-tanh MLP, head_dim != H/heads.
    "gemma": ("Gemma", dict(head_dim=32, hidden_act="gelu_pytorch_tanh")),
    # Gemma 2: sandwich norms, query_pre_attn_scalar, score and logit softcaps (small
    # enough to bend these models' values), sliding window on layer 0.
    "gemma2-window-softcap": ("Gemma2", dict(
        head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
        attn_logit_softcapping=4.0, final_logit_softcapping=6.0)),
    # Gemma 3: q/k norms, a sliding layer with its own rope base, a global layer with
    # linear rope scaling.
    "gemma3": ("Gemma3", dict(
        head_dim=32, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Granite: embedding / residual / attention multipliers, logits scaling, biases.
    "granite": ("Granite", dict(embedding_multiplier=3.0, residual_multiplier=0.3,
                                attention_multiplier=0.1, logits_scaling=2.5,
                                attention_bias=True, tie_word_embeddings=True)),
    # Phi-3: fused qkv_proj / gate_up_proj tensors in the checkpoint, half of each head
    # rotated, LongRoPE short factors (max_position_embeddings == the original context:
    # transformers and minikernels both take the short factors; the long ones:
    # tests/test_model_phi3.py), a sliding window.
    "phi3-longrope-partial": ("Phi3", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=256, sliding_window=6,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                      "long_factor": [2.0, 4.0, 8.0, 16.0]}, tie_word_embeddings=False,
        pad_token_id=0)),
    # Qwen2 with YaRN (the long-context recipe of the Qwen2.5 / Qwen3 model cards).
    "qwen2-yarn": ("Qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64})),
    # SmolLM3: layer 1 without rope (NoPE), tied embeddings.
    "smollm3-nope": ("SmolLM3", dict(no_rope_layers=[1, 0], tie_word_embeddings=True,
                                     pad_token_id=0)),
    # OLMo 2: post-norm layers, q / k norms over all heads.
    "olmo2": ("Olmo2", dict(tie_word_embeddings=False, pad_token_id=0)),
    # EXAONE 4 (hybrid): post-norm layers, per-head q / k norms, a sliding layer with rope
    # and a global layer without (NoPE).
    "exaone4-hybrid": ("Exaone4", dict(tie_word_embeddings=False, pad_token_id=0,
                                       sliding_window=6,
                                       layer_types=["sliding_attention", "full_attention"])),
    # ERNIE 4.5 (0.3B): GPT-J (interleaved) rope over the whole head, one use_bias flag.
    "ernie4_5-bias": ("Ernie4_5", dict(head_dim=16, use_bias=True, tie_word_embeddings=True)),
    # Helium (Kyutai, 2B): Llama with GPT-J (interleaved) rope.
    "helium": ("Helium", dict(head_dim=16, tie_word_embeddings=False, attention_bias=True)),
    # Granite 4.0 dense (granite-4.0-micro): GraniteMoeHybrid with attention layers only,
    # no experts, a fused shared MLP (gate rows, then up), Granite's multipliers, rope.
    "granite4-dense": ("GraniteMoeHybrid", dict(
        layer_types=["attention", "attention"], num_local_experts=0,
        shared_intermediate_size=96, position_embedding_type="rope",
        embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.1,
        logits_scaling=2.5, tie_word_embeddings=True)),
    # Granite 4.0-H (granite-4.0-h-micro / 1b / 350m): Mamba-2 layers (8 heads of 16, two
    # groups of B / C, conv bias) around an attention layer, NoPE, Granite's multipliers
    "granite4-h": ("GraniteMoeHybrid", dict(
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
        shared_intermediate_size=96, position_embedding_type="nope", mamba_n_heads=8,
        mamba_n_groups=2, mamba_d_state=12, mamba_d_conv=4, mamba_expand=2,
        mamba_conv_bias=True, embedding_multiplier=3.0, residual_multiplier=0.3,
        attention_multiplier=0.1, logits_scaling=2.5, tie_word_embeddings=True)),
    # Granite 4.0-H MoE (granite-4.0-h-tiny / small): the H layers with 4 experts (top 2)
    # of 32 beside the ungated shared MLP, rope
    "granite4-h-moe": ("GraniteMoeHybrid", dict(
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=48,
        position_embedding_type="rope", mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8,
        mamba_d_conv=3, mamba_conv_bias=False, residual_multiplier=0.5,
        embedding_multiplier=2.0, tie_word_embeddings=False)),
    # Falcon-H1: Mamba-2 (4 heads, 2 groups, mamba_d_ssm 64) and attention in parallel in
    # every layer, every muP multiplier away from 1, no Mamba norm (y * silu(z))
    "falcon_h1": ("FalconH1", dict(
        head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_conv_bias=True, mamba_rms_norm=False, projectors_bias=False,
        lm_head_multiplier=0.5, embedding_multiplier=2.0, mlp_multipliers=[0.8, 1.3],
        key_multiplier=0.7, attention_in_multiplier=1.2, attention_out_multiplier=0.9,
        ssm_multipliers=[0.5, 1.5, 0.7, 1.2, 0.9], ssm_in_multiplier=1.1,
        ssm_out_multiplier=0.6, tie_word_embeddings=False)),
    # Falcon-H1 with the gated Mamba norm (normalized before the gate, one group)
    "falcon_h1-norm": ("FalconH1", dict(
        head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8,
        mamba_rms_norm=True, mamba_norm_before_gate=True, projectors_bias=True,
        mamba_proj_bias=True, tie_word_embeddings=True)),
    # Nemotron-H: single-role blocks (Mamba-2, MLP, attention without rope, MLP, Mamba-2),
    # squared-ReLU MLPs, 2 groups of B / C
    "nemotron_h": ("NemotronH", dict(
        head_dim=16, intermediate_size=96, layers_block_type=[
            "linear_attention", "mlp", "full_attention", "mlp", "linear_attention"],
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=12,
        conv_kernel=4, layer_norm_epsilon=1e-5, tie_word_embeddings=False)),
    # Nemotron 3 (Nano): expert blocks beside Mamba-2 / attention blocks: 4 non-gated
    # squared-ReLU experts (top 2) in 2 groups (the best 1 kept), a correction bias,
    # scaled weights, a shared expert; and with a latent expert space
    "nemotron_h-moe": ("NemotronH", dict(
        head_dim=16, layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=12, conv_kernel=4,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=32, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=False)),
    "nemotron_h-latent": ("NemotronH", dict(
        head_dim=16, layers_block_type=["moe", "full_attention", "linear_attention", "moe"],
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=12,
        n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=20,
        moe_shared_expert_intermediate_size=24, moe_latent_size=32, n_group=1, topk_group=1,
        routed_scaling_factor=2.0, norm_topk_prob=False, tie_word_embeddings=False)),
    # Bamba: Mamba-2 layers (2 groups) and an attention layer (half rope), SwiGLU MLPs
    "bamba": ("Bamba", dict(
        num_hidden_layers=3, attn_layer_indices=[1], head_dim=16, mamba_n_heads=8,
        mamba_n_groups=2, mamba_d_state=12, mamba_d_conv=4, mamba_proj_bias=True,
        tie_word_embeddings=False)),
    # LFM3: short convs (width 7), a sliding-window layer (default rope, base 1e4) and a
    # full layer (proportional rope: half the pairs turn, base 1e6), per-head sigmoid
    # gates, sandwich norms, q / k norms
    "lfm3": ("Lfm3", dict(
        num_hidden_layers=4, layer_types=["conv", "sliding_attention", "full_attention",
                                          "conv"],
        head_dim=16, sliding_window=5, conv_L_cache=7, tie_word_embeddings=True,
        pad_token_id=0)),
    # Zamba2: Mamba-2 layers (2 groups); three hybrid layers calling two shared blocks in
    # turn (attention over [stream, embeddings] with q / k / v adapters, rope), each with
    # its own adapters and linear; and without attention adapters or rope, one block
    "zamba2": ("Zamba2", dict(
        num_hidden_layers=6, layers_block_type=["mamba", "hybrid", "mamba", "hybrid",
                                                "hybrid", "mamba"],
        num_attention_heads=4, num_key_value_heads=4, n_mamba_heads=4, mamba_ngroups=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, num_mem_blocks=2, adapter_rank=6,
        use_shared_attention_adapter=True, use_mem_rope=True, intermediate_size=96,
        hidden_act="gelu", tie_word_embeddings=True, pad_token_id=0)),
    "zamba2-plain": ("Zamba2", dict(
        num_hidden_layers=3, layers_block_type=["hybrid", "mamba", "hybrid"],
        num_attention_heads=4, num_key_value_heads=2, n_mamba_heads=8, mamba_ngroups=1,
        mamba_d_state=12, num_mem_blocks=1, adapter_rank=4, add_bias_linear=True,
        use_shared_attention_adapter=False, use_mem_rope=False, hidden_act="gelu",
        tie_word_embeddings=True, pad_token_id=0)),     # (transformers ties the blocks then)
    # Granite-MoE with a shared MLP (ungated) beside 4 experts (top 2); Granite's multipliers
    "granitemoeshared": ("GraniteMoeShared", dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        shared_intermediate_size=48, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=False)),
    # Gemma 4 (text): sliding layers (head_dim 16, 2 kv heads, default rope) and full layers
    # (head_dim 32, 1 kv head, proportional rope, K = V), the last two reading layers 2 /
    # 3's K / V (double-wide MLPs there), per-layer inputs (8 dims), logit softcap; and a
    # 31B-like one: no PLE, no sharing, own v on the full layers
    "gemma4": ("Gemma4Text", dict(
        num_hidden_layers=6, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, num_kv_shared_layers=2, use_double_wide_mlp=True,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, sliding_window=5,
        final_logit_softcapping=30.0, intermediate_size=96, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"] * 3)),
    # Gemma 4 26B-A4B-like: 4 GELU experts (top 2) beside every layer's MLP, routed on the
    # stream with learned router / per-expert scales
    "gemma4-moe": ("Gemma4Text", dict(
        num_hidden_layers=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, num_kv_shared_layers=0, hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24,
        sliding_window=4, pad_token_id=0, layer_types=["sliding_attention", "full_attention"])),
    "gemma4-plain": ("Gemma4Text", dict(
        num_hidden_layers=4, head_dim=16, global_head_dim=24, attention_k_eq_v=False,
        num_kv_shared_layers=0, hidden_size_per_layer_input=0, sliding_window=4,
        pad_token_id=0, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "full_attention"])),
    # Gemma 3n (text): AltUp over 4 streams, LAuReL (rank 4), Gaussian top-k on the first two
    # MLPs, MLP widths per layer, per-layer inputs from a smaller table (ids past it read
    # row 0), the last two layers reading layers 3 / 4's K / V, sliding and full layers
    "gemma3n": ("Gemma3nText", dict(
        num_hidden_layers=6, head_dim=16, intermediate_size=[96, 128, 96, 96, 128, 96],
        num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=200,
        sliding_window=5, laurel_rank=4, activation_sparsity_pattern=[0.95, 0.9] + [0.0] * 4,
        final_logit_softcapping=30.0, pad_token_id=0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)),
    # EXAONE 3.x: Llama saved under GPT-2-style names (transformers: LlamaForCausalLM with
    # model_type "exaone"), llama3 rope scaling as EXAONE 3.5
    "exaone": ("Exaone", dict(
        tie_word_embeddings=False, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})),
    # Jamba: Mamba-1 layers (weighted dt / B / C norms, dt rank 6, state 12) and an
    # attention layer without rope, SwiGLU MLPs; and with 4 experts (top 2, not
    # renormalized) on every other layer
    "jamba": ("Jamba", dict(
        num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=1, num_experts=1,
        mamba_d_state=12, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=6,
        mamba_conv_bias=True, mamba_proj_bias=False, tie_word_embeddings=False,
        pad_token_id=0)),
    "jamba-moe": ("Jamba", dict(
        num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, num_experts=4,
        num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        intermediate_size=48, mamba_d_state=8, mamba_d_conv=3, mamba_dt_rank="auto",
        mamba_proj_bias=True, tie_word_embeddings=True, pad_token_id=0)),
    # Mamba (attention-free Mamba-1 layers, no MLPs; biases on the projections) and
    # FalconMamba (B / C / dt RMS-normalized without weights)
    "mamba": ("Mamba", dict(
        num_hidden_layers=3, state_size=12, conv_kernel=4, expand=2, time_step_rank=5,
        use_bias=True, use_conv_bias=True, layer_norm_epsilon=1e-5, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    "falcon_mamba": ("FalconMamba", dict(
        num_hidden_layers=2, state_size=8, conv_kernel=3, expand=2, time_step_rank=6,
        use_bias=False, use_conv_bias=True, mixer_rms_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Mamba-2 (attention-free Mamba-2 layers, no MLPs): 8 heads of 16, two groups of B / C,
    # biases on the projections, untied; and tied, one group, a conv without bias, width 3
    # (transformers' scan chunks of 8 / 16: several chunks per prompt)
    "mamba2": ("Mamba2", dict(
        num_heads=8, head_dim=16, n_groups=2, state_size=12, conv_kernel=4, expand=2,
        chunk_size=8, use_bias=True, use_conv_bias=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=False, pad_token_id=0)),
    "mamba2-tied": ("Mamba2", dict(
        num_hidden_layers=3, num_heads=4, head_dim=32, n_groups=1, state_size=8,
        conv_kernel=3, expand=2, chunk_size=16, use_bias=False, use_conv_bias=False,
        layer_norm_epsilon=1e-6, tie_word_embeddings=True, pad_token_id=0)),
    # Zamba (v1): multi-head Mamba-1 layers (2 heads, each its own x_proj / dt_proj, dt rank
    # 6), two hybrid layers calling the one shared block (attention over [stream,
    # embeddings], 4 heads / 2 kv heads of 32, no rope; a GELU-gated MLP) through their own
    # linear; biases on the Mamba projections
    "zamba": ("Zamba", dict(
        num_hidden_layers=5, layers_block_type=["mamba", "hybrid", "mamba", "mamba", "hybrid"],
        n_mamba_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=6,
        mamba_conv_bias=True, mamba_proj_bias=True, hidden_act="gelu",
        tie_word_embeddings=True, pad_token_id=0)),
    # OLMo Hybrid: Gated DeltaNet layers (separate q / k / v / g / b / a projections,
    # beta in [0, 2]) pre-norm, a post-norm OLMo 3 attention layer (full q / k norms); no
    # rope (the released checkpoints), and with rope
    "olmo_hybrid": ("OlmoHybrid", dict(
        num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                          "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=12, tie_word_embeddings=False, rope_parameters=None,
        pad_token_id=0)),
    "olmo_hybrid-rope": ("OlmoHybrid", dict(
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        tie_word_embeddings=False, linear_allow_neg_eigval=False, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    # HunYuan dense (0.5B - 7B): per-head q / k norms after rope, fixed-alpha NTK rope.
    "hunyuan-ntk": ("HunYuanDenseV1", dict(head_dim=16, tie_word_embeddings=True,
                                           rope_scaling={"type": "dynamic", "alpha": 50.0,
                                                         "factor": 1.0})),
    # OLMo 3: OLMo 2 with sliding-window layers (layer_types) and YaRN on the full
    # layers only (the sliding ones rotate with the plain base).
    "olmo3-window": ("Olmo3", dict(tie_word_embeddings=False, pad_token_id=0,
                                   sliding_window=6, rope_theta=5e5,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64})),
    # GLM (GLM-Edge, glm-4-9b-chat-hf): half of each head rotated in GPT-J pairs, q/k/v
    # biases without an o bias, fused gate_up tensors; GLM-4 (0414) adds sandwich norms.
    "glm": ("Glm", dict(head_dim=16, pad_token_id=0, eos_token_id=2)),
    "glm4": ("Glm4", dict(head_dim=32, pad_token_id=0, eos_token_id=2)),
    # Qwen3-MoE: layer 0 a mixture of 6 experts (top 2, renormalized), layer 1 dense.
    "qwen3-moe": ("Qwen3Moe", dict(head_dim=16, moe_intermediate_size=48, num_experts=6,
                                   num_experts_per_tok=2, norm_topk_prob=True,
                                   decoder_sparse_step=1, mlp_only_layers=[1],
                                   tie_word_embeddings=False)),
    # Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate, layer 1 dense.
    "qwen2-moe": ("Qwen2Moe", dict(moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                   num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                   decoder_sparse_step=1, mlp_only_layers=[1])),
    # Mixtral: block_sparse_moe w1 / w3 / w2 experts, top-k always renormalized.
    "mixtral": ("Mixtral", dict(head_dim=16, num_local_experts=5, num_experts_per_tok=2,
                                intermediate_size=40, tie_word_embeddings=False)),
    # Granite-MoE: stacked input_linear / output_linear experts, router.layer, Granite's
    # multipliers.
    "granitemoe": ("GraniteMoe", dict(num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=40, embedding_multiplier=3.0,
                                      residual_multiplier=0.3, attention_multiplier=0.1,
                                      logits_scaling=2.5, tie_word_embeddings=True)),
    # StableLM 2 (1.6B): LayerNorm with bias, a quarter of each head rotated, q/k/v
    # biases, no o bias.
    "stablelm": ("StableLm", dict(use_qkv_bias=True, layer_norm_eps=1e-5,
                                  tie_word_embeddings=False)),
    # StarCoder 2 (3B / 7B): LayerNorm with bias, biases on every linear, a non-gated
    # gelu-tanh MLP (c_fc / c_proj), a sliding window, tied embeddings.
    "starcoder2-window": ("Starcoder2", dict(use_bias=True, norm_epsilon=1e-5,
                                             hidden_act="gelu_pytorch_tanh", sliding_window=6,
                                             tie_word_embeddings=True)),
    # Cohere (Aya Expanse 8B): LayerNorm without a bias, attention and MLP in parallel,
    # GPT-J rope, logits times logit_scale, tied embeddings.
    "cohere": ("Cohere", dict(logit_scale=0.5, layer_norm_eps=1e-5, pad_token_id=0)),
    # Cohere 2 (Command R7B): as Cohere, sliding layers with rope, a global layer without.
    "cohere2-window": ("Cohere2", dict(logit_scale=0.5, layer_norm_eps=1e-5, pad_token_id=0,
                                       sliding_window=6,
                                       layer_types=["sliding_attention", "full_attention"])),
    # Phi-2: a parallel block with LayerNorm biases, fc1 / fc2 gelu_new MLP, partial
    # rotary, an lm_head bias.
    "phi2": ("Phi", dict(partial_rotary_factor=0.5, layer_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=0)),
    # GPT-NeoX (Pythia): parallel attention / MLP from two LayerNorms, per-head fused
    # q / k / v, partial rope; and the sequential variant.
    "gpt_neox": ("GPTNeoX", dict(num_key_value_heads=None, layer_norm_eps=1e-5,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.5})),
    "gpt_neox-sequential": ("GPTNeoX", dict(num_key_value_heads=None,
                                            use_parallel_residual=False,
                                            hidden_act="gelu_fast")),
    # Learned absolute positions, LayerNorms, non-gated MLPs: GPT-2 (Conv1D weights,
    # fused c_attn), OPT (a position offset of 2, ReLU), GPT-BigCode with multi-query and
    # with per-head fused q / k / v
    "gpt2": ("GPT2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128,
                          bos_token_id=1, eos_token_id=2)),
    "opt": ("OPT", dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1,
                        bos_token_id=2, eos_token_id=2)),
    "gpt_bigcode-mqa": ("GPTBigCode", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                           bos_token_id=1, eos_token_id=2)),
    "gpt_bigcode-mha": ("GPTBigCode", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                           multi_query=False, scale_attn_weights=False,
                                           bos_token_id=1, eos_token_id=2)),
    # GPT-Neo: learned positions, a local layer (window 6) after a global one, no scaling
    "gpt_neo": ("GPTNeo", dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"],
                                                                           1]],
                               window_size=6, max_position_embeddings=256,
                               num_key_value_heads=None)),
    # BLOOM: ALiBi (6 heads: slopes beyond the largest power of two), a LayerNorm on the
    # embeddings, per-head fused q / k / v
    "bloom": ("Bloom", dict(hidden_size=96, n_head=6, n_layer=2, num_attention_heads=6,
                            num_key_value_heads=None, layer_norm_epsilon=1e-5)),
    # GPT-J: one LayerNorm for parallel attention and MLP, GPT-J rope on 6 of 16 dims,
    # an lm_head bias
    "gptj": ("GPTJ", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128,
                          rotary_dim=6, tie_word_embeddings=False, bos_token_id=1,
                          eos_token_id=2)),
    # Falcon: 7B's layout (multi-query, one norm, parallel, no biases); the new decoder
    # architecture (2 kv-head groups of fused [q, q, k, v], ln_attn / ln_mlp); the RW
    # layout (per-head fused q / k / v, sequential, biases)
    "falcon-7b": ("Falcon", dict(num_key_value_heads=None, multi_query=True,
                                 parallel_attn=True, bias=False, ffn_hidden_size=128,
                                 rope_parameters={"rope_type": "default",
                                                  "rope_theta": 5e4})),
    "falcon-new": ("Falcon", dict(num_key_value_heads=None, new_decoder_architecture=True,
                                  num_kv_heads=2, bias=False, ffn_hidden_size=96)),
    "falcon-seq": ("Falcon", dict(num_key_value_heads=None, multi_query=False,
                                  parallel_attn=False, bias=True, ffn_hidden_size=128)),
    # MPT: ALiBi with its own slope order (6 heads), bias-free LayerNorms and linears
    "mpt": ("Mpt", dict(hidden_size=96, num_attention_heads=6, max_seq_len=256,
                        num_key_value_heads=None)),
    # Nemotron: LayerNorm1P (scale 1 + w, with bias), squared-ReLU up / down MLP, rope on
    # half of each head
    "nemotron": ("Nemotron", dict(head_dim=16, norm_eps=1e-5, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5})),
    # Arcee: Llama with a squared-ReLU up / down MLP
    "arcee": ("Arcee", dict(head_dim=16, tie_word_embeddings=False)),
    # HyperCLOVA X: Granite's multipliers (logits multiplied) applied after sandwich norms
    "hyperclovax": ("HyperCLOVAX", dict(head_dim=16, embedding_multiplier=2.0,
                                        residual_multiplier=0.5, attention_multiplier=0.2,
                                        logits_scaling=0.5, tie_word_embeddings=False)),
    # Apertus: q / k norms before rope, a non-gated xIELU MLP, Llama 3 rope
    "apertus": ("Apertus", dict(head_dim=16, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 1e4,
                                                 "factor": 4.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16})),
    # Jais 2: LayerNorms, squared-ReLU up / down with biases, q / k / v / o biases
    "jais2": ("Jais2", dict(head_dim=16, layer_norm_eps=1e-5, tie_word_embeddings=False)),
    # OLMo 1: parameter-free LayerNorms, q / k / v clamped to +-0.3 (bites on these weights)
    "olmo": ("Olmo", dict(clip_qkv=0.3, tie_word_embeddings=False)),
    # NanoChat: parameter-free RMSNorms (after the embedding too, on q / k after rope),
    # squared-ReLU fc1 / fc2, a final logit softcap
    "nanochat": ("NanoChat", dict(num_attention_heads=4, num_key_value_heads=4,
                                  final_logit_softcapping=3.0, tie_word_embeddings=False)),
    # VaultGemma: Gemma 2's attention (query_pre_attn_scalar, softcaps, a sliding layer)
    # and (1 + w) norms without its sandwich norms
    "vaultgemma": ("VaultGemma", dict(head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
                                      attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
                                      layer_types=["sliding_attention", "full_attention"])),
    # Granite SWA: Granite's multipliers, a global layer then sliding ones (window 6), its
    # own rope base on the global layer, NoPE on the last, learned attention sinks
    "granite_swa": ("GraniteSWA", dict(num_hidden_layers=3, sliding_window=6,
                                       embedding_multiplier=2.0, residual_multiplier=0.5,
                                       attention_multiplier=0.2, logits_scaling=2.0,
                                       layer_rope_theta=[5e5, 1e4, 0])),
    # OLMoE: q / k norms over all heads, 8 experts, top 3 not renormalized.
    # LFM2: gated short-conv layers (recurrent state) around an attention layer with q / k
    # norms; the MLP width auto-adjusted (128 -> 96); conv / projection biases
    "lfm2": ("Lfm2", dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                          conv_L_cache=3, conv_bias=True, block_multiple_of=32,
                          norm_eps=1e-5, tie_word_embeddings=True)),
    # Qwen3.5: Gated DeltaNet layers (conv + gated delta rule, recurrent state; Hv = 2 Hk)
    # and a gated attention layer with (1 + w) q / k norms, partial rope
    "qwen3_5": ("Qwen3_5", dict(num_hidden_layers=3, head_dim=16,
                                layer_types=["linear_attention", "full_attention",
                                             "linear_attention"],
                                linear_num_key_heads=2, linear_num_value_heads=4,
                                linear_key_head_dim=8, linear_value_head_dim=12,
                                linear_conv_kernel_dim=4, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 0.5})),
    # Qwen3.5 MoE: Qwen3.5's layers, 4 experts (top 2, renormalized) beside the gated
    # shared expert in every MLP
    "qwen3_5_moe": ("Qwen3_5Moe", dict(num_hidden_layers=2, head_dim=16,
                                       layer_types=["linear_attention", "full_attention"],
                                       linear_num_key_heads=2, linear_num_value_heads=4,
                                       linear_key_head_dim=8, linear_value_head_dim=12,
                                       num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48,
                                       tie_word_embeddings=False)),
    # LFM2-MoE: LFM2's layers, one dense MLP then 4 sigmoid-routed experts (top 2, chosen
    # with a per-expert bias, renormalized, scaled)
    "lfm2_moe": ("Lfm2Moe", dict(num_hidden_layers=3, layer_types=["conv", "full_attention",
                                                                  "conv"],
                                 intermediate_size=96, moe_intermediate_size=32,
                                 num_dense_layers=1, num_experts=4, num_experts_per_tok=2,
                                 routed_scaling_factor=1.5, norm_eps=1e-5,
                                 tie_word_embeddings=True)),
    "olmoe": ("Olmoe", dict(num_experts=8, num_experts_per_tok=3, intermediate_size=40,
                            norm_topk_prob=False, pad_token_id=0, eos_token_id=2,
                            tie_word_embeddings=False)),
}
# transformers config classes not named {family}Config
_CONFIG_CLASSES = {"Gemma3": "Gemma3TextConfig", "Qwen3_5": "Qwen3_5TextConfig",
                   "Qwen3_5Moe": "Qwen3_5MoeTextConfig"}
# transformers causal-LM classes not named {family}ForCausalLM
_MODEL_CLASSES = {"GPT2": "GPT2LMHeadModel", "Exaone": "LlamaForCausalLM",
                  "Gemma4Text": "Gemma4ForCausalLM", "Gemma3nText": "Gemma3nForCausalLM"}


def make_hf_model(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny transformers CausalLM with random (non-trivial) weights, fp32, eager attention."""
    import transformers

    family, extra = CASES[kind]
    cfg_cls = getattr(transformers, _CONFIG_CLASSES.get(family, f"{family}Config"))
    model_cls = getattr(transformers, _MODEL_CLASSES.get(family, f"{family}ForCausalLM"))
    kwargs = {**BASE, **extra, **overrides}
    config = cfg_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(model_cls(config).float().eval(), seed + 1)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.08) -> torch.nn.Module:
    """Non-trivial random weights in place (seeded): norms in [0.5, 1.5), biases N(0, 0.1),
    the rest N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)   # (scales: Gemma 4's router)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith(("expert_bias", "e_score_correction_bias")):   # router biases
                # (LFM2-MoE's, Nemotron 3's: buffers there)
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            if name.endswith("layer_scalar"):    # Gemma 4's per-layer output scale
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def save_hf(model: torch.nn.Module, path: str, **kwargs: Any) -> str:
    model.save_pretrained(path, **kwargs)
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@torch.no_grad()
def hf_logits(hf: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    return hf(torch.tensor([list(ids)])).logits[0].float()


def text_logits_err(model: torch.nn.Module, hf: torch.nn.Module,
                    seqs: Sequence[Sequence[int]]) -> float:
    """rel_err of our cache-less logits for text prompts vs transformers' (a multimodal
    wrapper's too: ``hf(input_ids=...)``)."""
    from minikernels.models import AttentionMetadata

    ids = torch.tensor([t for s in seqs for t in s])
    got = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=torch.tensor([list(s)])).logits[0].float()
                         for s in seqs])
    return rel_err(got, ref)


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, vocab) for _ in range(n)]


@torch.no_grad()
def run_schedule(model: Any, seqs: Sequence[Sequence[int]],
                 plan: Sequence[Sequence[tuple]], block_size: int = 8, seed: int = 0,
                 kv_dtype: torch.dtype | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """Run steps over a paged cache; returns (seq, position, logits row) for every token.

    plan: steps, each a list of ("d", seq) decode items and ("p", seq, n) prefill chunks
    (decodes are placed first, as the contract says). Blocks are assigned shuffled so the
    block tables are not contiguous.
    """
    needed = [-(-len(s) // block_size) for s in seqs]
    ids = list(range(sum(needed) + 3))
    random.Random(seed).shuffle(ids)
    rows, k = [], 0
    for n in needed:
        rows.append(ids[k:k + n])
        k += n
    recurrent = model.config.is_recurrent
    # recurrent layers (hybrid models): sequence i's state in a shuffled slot
    state_slot = list(range(len(seqs) + 2))
    random.Random(seed + 1).shuffle(state_slot)
    kv = model.allocate_kv_caches(len(ids), block_size, dtype=kv_dtype,
                                  **({"num_state_slots": len(seqs) + 2} if recurrent else {}))
    done = [0] * len(seqs)
    out = []
    for step in plan:
        dec = [it for it in step if it[0] == "d"]
        pre = [it for it in step if it[0] == "p"]
        d_items, p_items, toks, who = [], [], [], []
        for _, i in dec:
            d_items.append((rows[i], done[i] + 1))
            toks.append(seqs[i][done[i]])
            who.append((i, done[i]))
            done[i] += 1
        for _, i, n in pre:
            p_items.append((rows[i], done[i], n))
            toks.extend(seqs[i][done[i]:done[i] + n])
            who.extend((i, p) for p in range(done[i], done[i] + n))
            done[i] += n
        meta = build_step_metadata(d_items, p_items, block_size, model.device, all_logits=True)
        if recurrent:
            order = [i for _, i in dec] + [i for _, i, _ in pre]
            meta.state_indices = torch.tensor([state_slot[i] for i in order], dtype=torch.int32,
                                              device=model.device)
            meta.has_initial_state = torch.tensor(
                [True] * len(dec) + [start > 0 for _, start, _ in p_items], device=model.device)
        logits = model(torch.tensor(toks, dtype=torch.int64, device=model.device), meta, kv)
        out.extend((i, p, logits[j]) for j, (i, p) in enumerate(who))
    return out


# ------------------------------------------------------------------ int4 formats
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words.to(torch.int64) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows_of_8(q: torch.Tensor, order: Sequence[int] = tuple(range(8))) -> torch.Tensor:
    """Pack q [..., 8m] (0..15) along the last dim: slot i of word c holds q[..., 8c+order[i]]."""
    *lead, n = q.shape
    q = q.to(torch.int64).reshape(*lead, n // 8, 8)
    word = torch.zeros(*lead, n // 8, dtype=torch.int64)
    for slot, src in enumerate(order):
        word |= q[..., src] << (4 * slot)
    return _to_int32(word)


def pack_bytes_of_4(q: torch.Tensor) -> torch.Tensor:
    """Pack q [..., 4m] (0..255) along the last dim: byte j of word c holds q[..., 4c+j]."""
    *lead, n = q.shape
    q = q.to(torch.int64).reshape(*lead, n // 4, 4)
    word = torch.zeros(*lead, n // 4, dtype=torch.int64)
    for slot in range(4):
        word |= q[..., slot] << (8 * slot)
    return _to_int32(word)


def gptq_tensors(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, v1: bool = True, bits: int = 4) -> dict[str, torch.Tensor]:
    """GPTQ layer from integers q [N, K], zeros [N, groups] (per group index), scales
    [N, groups]: qweight [K/8, N] packed along K, qzeros [groups, N/8] packed along N
    (v1 stores zero - 1), scales [groups, N], g_idx [K]. bits=8: 4 values per word
    ([K/4, N], [groups, N/4])."""
    pack = pack_rows_of_8 if bits == 4 else pack_bytes_of_4
    qweight = pack(q).t().contiguous()                            # pack along K -> [K/8, N]
    z = zeros.t().contiguous() - (1 if v1 else 0)                  # [groups, N]
    return {"qweight": qweight, "qzeros": pack(z), "scales": scales.t().contiguous(),
            "g_idx": g_idx.to(torch.int32)}


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_tensors(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """AWQ GEMM layer: qweight [K, N/8] (interleaved order), qzeros [groups, N/8], scales
    [groups, N]."""
    return {"qweight": pack_rows_of_8(q.t().contiguous(), AWQ_ORDER),
            "qzeros": pack_rows_of_8(zeros.t().contiguous(), AWQ_ORDER),
            "scales": scales.t().contiguous()}


def write_quantized_checkpoint(hf: torch.nn.Module, path: str, method: str, group: int,
                               act_order: bool = False, seed: int = 0,
                               checkpoint_format: str = "gptq",
                               bits: int = 4,
                               linears: tuple[str, ...] = ("_proj",)) -> dict[str, torch.Tensor]:
    """Save ``hf`` as a GPTQ / AWQ / compressed-tensors ("pack-quantized", symmetric: every
    zero 8; ``group`` -1 = the "channel" strategy) checkpoint with known random integers in
    every linear layer of the decoder blocks; the dense model ``hf`` gets the dequantized
    weights (so it is the reference). ``linears``: the name endings (before ".weight") of
    the layers' linears (OPT's fc1 / fc2 too). Returns {hf linear name: dequantized W}. bits=8
    (GPTQ, compressed-tensors): 8-bit integers, 4 per word (compressed-tensors zero 128)."""
    top = (1 << bits) - 1
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}

    def quantize(base: str, n: int, k: int) -> torch.Tensor:
        """Known random int4 tensors of one [n, k] matrix under ``base`` -> its W."""
        ct = method == "compressed-tensors"
        groups = 1 if group == -1 else k // group
        gsize = k // groups
        q = torch.randint(0, top + 1, (n, k), generator=g)
        lo = 1 if (method == "gptq" and checkpoint_format == "gptq") else 0
        zeros = torch.full((n, groups), (top + 1) // 2) if ct else \
            torch.randint(lo, top + 1, (n, groups), generator=g)
        scales = ((torch.rand(n, groups, generator=g) * 0.02 + 0.005) /
                  (1 if bits == 4 else 16)).half()
        if act_order:
            g_idx = torch.randperm(k, generator=g) % groups
        else:
            g_idx = torch.arange(k) // gsize
        gi = g_idx.long()
        wdq = (q.float() - zeros.float()[:, gi]) * scales.float()[:, gi]
        if ct:   # signed q - 8 stored offset by 8 = q, 8 per int32 along K; [N, ...] layout
            parts = {"weight_packed": (pack_rows_of_8 if bits == 4 else pack_bytes_of_4)(q),
                     "weight_scale": scales,
                     "weight_shape": torch.tensor([n, k])}
            if act_order:
                parts["weight_g_idx"] = g_idx.to(torch.int32)
        elif method == "gptq":
            parts = gptq_tensors(q, zeros, scales, g_idx, v1=checkpoint_format == "gptq",
                                 bits=bits)
        else:
            parts = awq_tensors(q, zeros, scales)
        for kname, t in parts.items():
            tensors[f"{base}.{kname}"] = t
        return wdq

    for name, w in state.items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # transformers 5's stacked experts -> the hub's per-expert int4 tensors
            prefix, stacked = name.rsplit(".", 1)
            projs = ("gate_proj", "up_proj") if stacked == "gate_up_proj" else ("down_proj",)
            rows = w.shape[1] // len(projs)
            wdq = torch.stack([torch.cat([quantize(f"{prefix}.{e}.{p}", rows, w.shape[2])
                                          for p in projs]) for e in range(w.shape[0])])
        elif (".layers." in name or ".h." in name or ".blocks." in name) and \
                name.endswith(tuple(f"{e}.weight" for e in linears)):
            wdq = quantize(name[:-len(".weight")], *w.shape)
        else:
            tensors[name] = w.contiguous()
            continue
        dense[name] = wdq
        with torch.no_grad():
            hf.get_parameter(name).copy_(wdq)
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    qc: dict[str, Any] = {"quant_method": method, "bits": bits, "group_size": group}
    if method == "compressed-tensors":   # what llm-compressor writes for W4A16
        qc = {"quant_method": method, "format": "pack-quantized",
              "quantization_status": "compressed", "ignore": ["lm_head"],
              "config_groups": {"group_0": {
                  "targets": ["Linear"], "input_activations": None,
                  "output_activations": None,
                  "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                              "strategy": "channel" if group == -1 else "group",
                              "group_size": None if group == -1 else group,
                              "actorder": "group" if act_order else None,
                              "dynamic": False, "observer": "minmax"}}}}
    elif method == "gptq":
        qc.update(desc_act=act_order, sym=False, checkpoint_format=checkpoint_format)
    else:
        qc.update(version="gemm", zero_point=True)
    cfg["quantization_config"] = qc
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dense


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, str]]:
    """Every case in CASES as (transformers model, saved directory), built lazily."""
    cache: dict[str, tuple[Any, str]] = {}

    class Lazy(dict):
        def __missing__(self, kind: str) -> tuple[Any, str]:
            model = make_hf_model(kind)
            path = save_hf(model, str(tmp_path_factory.mktemp(kind)))
            self[kind] = (model, path)
            return self[kind]

    return Lazy(cache)


# ------------------------------------------------------------------ quantized checkpoints
def write_known_checkpoint(hf: torch.nn.Module, path: str,
                           matrix: Callable[[dict[str, torch.Tensor], str, int, int],
                                            torch.Tensor],
                           quantization_config: dict[str, Any],
                           linears: tuple[str, ...] = ("_proj",)) -> dict[str, torch.Tensor]:
    """Save ``hf`` as a quantized checkpoint: ``matrix(tensors, base, n, k)`` writes the
    quantized tensors of every decoder linear [n, k] named ``base`` (and of every expert
    projection, as the hub's per-expert tensors) into ``tensors`` and returns the W they
    dequantize to; ``hf`` gets those weights (so it is the reference). Everything else
    is saved as is, with ``quantization_config`` in config.json. Returns {name: W}."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    known: dict[str, torch.Tensor] = {}
    for name, w in hf.state_dict().items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # transformers 5's stacked experts -> the hub's per-expert tensors
            prefix, stacked = name.rsplit(".", 1)
            projs = ("gate_proj", "up_proj") if stacked == "gate_up_proj" else ("down_proj",)
            rows = w.shape[1] // len(projs)
            known[name] = torch.stack([torch.cat([
                matrix(tensors, f"{prefix}.{e}.{p}", rows, w.shape[2]) for p in projs])
                for e in range(w.shape[0])])
        elif (".layers." in name or ".h." in name) and \
                name.endswith(tuple(f"{e}.weight" for e in linears)):
            known[name] = matrix(tensors, name[:-len(".weight")], *w.shape)
        else:
            tensors[name] = w.contiguous()
            continue
        with torch.no_grad():
            hf.get_parameter(name).copy_(known[name])
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return known


def check_rank1_of_2(path: str, known: dict[str, torch.Tensor]) -> None:
    """Tensor parallel rank 1 of 2 of a qwen3-shaped test checkpoint (8 q heads, 4 kv heads
    of 16; ``known`` as :func:`write_known_checkpoint` returns) reads its rows of q / k / v
    and its columns of o / down, exactly."""
    from minikernels.models import load_model
    from minikernels.models.parallel import TensorParallel

    part = load_model(path, dtype="float32", device="cpu", tensor_parallel=TensorParallel(1, 2))
    lp = part.layers[1]
    q, k, v = (known[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(lp.self_attn.qkv_proj.dense_weight(), torch.cat([q[64:], k[32:], v[32:]]))
    for proj, mod in (("mlp.down_proj", lp.mlp.down_proj),
                      ("self_attn.o_proj", lp.self_attn.o_proj)):
        full = known[f"model.layers.1.{proj}.weight"]
        assert torch.equal(mod.dense_weight(), full[:, full.shape[1] // 2:]), proj
