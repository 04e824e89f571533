"""load_model: a CausalLM from a local HF checkpoint directory, a hub id or a built-in name.

Hub ids ("Qwen/Qwen2.5-0.5B-Instruct") resolve to a snapshot in the Hugging Face cache
(:mod:`.hub`: HF_HOME, HF_HUB_OFFLINE, revision, HF_TOKEN; safetensors only).

HF directory: config.json (+ generation_config.json), weights in ``model.safetensors`` or
shards listed by ``model.safetensors.index.json`` (pickle ``*.bin`` only with
allow_pickle=True). HF tensor names map onto the fused layers:

    model.layers.{i}.self_attn.{q,k,v}_proj.*   -> layers.{i}.self_attn.qkv_proj  parts 0, 1, 2
    model.layers.{i}.mlp.{gate,up}_proj.*       -> layers.{i}.mlp.gate_up_proj    parts 0, 1
    everything else keeps its name without the ``model.`` prefix

Quantization:
    quantization=None     dense, unless config.json has a GPTQ/AWQ quantization_config
                          (then its int4 weights load onto the int4 kernels)
    quantization="int4"   RTN int4 (group 128, asymmetric) of every linear layer on load;
                          lm_head too only with quantize_lm_head=True. A GPTQ/AWQ
                          checkpoint loads as is. Streaming: the linear layers are built
                          without dense weights and each checkpoint tensor is quantized on
                          the target device as soon as it is read, then dropped, so the
                          peak is the int4 model plus one dense tensor (built-in names:
                          one random dense layer at a time).
    "gptq" / "awq"        insist that the checkpoint is in that format.
    "mxfp4" / "dense"     GPT-OSS MXFP4 checkpoints only: keep the experts MXFP4 (the
                          default for them), or dequantize them to the model dtype.
    quantization="fp8"    block-wise RTN fp8 (e4m3, one fp32 scale per 128 x 128 block) of
                          every linear layer on load, streaming as int4 does; the matmuls
                          run W8A16 (``ops.fp8_matmul``). An fp8 checkpoint loads as is.
                          Mixture-of-experts experts too (``ops.fused_moe_fp8``).
    quantization="fp8_w8a8"  the same weights ("fp8": RTN, or an fp8 checkpoint as is),
                          and the linears run W8A8 as vLLM runs fp8 checkpoints:
                          activations quantized per token and 128-wide K group
                          (``ops.per_token_group_quant_fp8`` + ``ops.w8a8_block_fp8_matmul``;
                          fp8 tensor cores on sm_89+). Opt-in until a GPU run has measured
                          it against W8A16. Mixture-of-experts experts with block scales
                          run W8A8 too (``ops.fused_moe_fp8_w8a8``: bk a multiple of 32
                          dividing H and I; others stay W8A16). On a GPU without fp8
                          tensor cores (A100) it runs W8A16 instead, with a warning.
    quantization="int8"   INT8 W8A8 (SmoothQuant-style, without smoothing): per-channel
                          symmetric RTN int8 of every linear layer on load, streaming as
                          int4 does, activations quantized per token at run time
                          (``ops.scaled_int8_quant`` + ``ops.scaled_mm``, exact int32
                          accumulation; int8 tensor cores on sm_80+). A compressed-tensors
                          int8 W8A8 checkpoint loads as is. Mixture-of-experts experts
                          are int8 too, run W8A8 the same way
                          (``ops.fused_moe_int8_w8a8``); W8A16 (``ops.fused_moe_int8``)
                          for a weight-only int8 checkpoint or asymmetric activations.

INT8 checkpoints (compressed-tensors ``format: "int-quantized"``, llm-compressor's W8A8:
int8 ``weight`` + ``weight_scale`` per channel or tensor; :mod:`minikernels.quant.int8`)
load onto int8 parts; a static ``input_scale`` is not needed (activations are quantized
per token) and is ignored. Weight-only int8 checkpoints (GPTQ ``bits: 8``,
compressed-tensors ``pack-quantized`` 8-bit or ``int-quantized`` without
``input_activations``) load onto W8A16 parts (``ops.int8_matmul``).

FP8 checkpoints (quantization_config ``quant_method: "fp8"``, block-wise like
Qwen/Qwen3-*-FP8 or per-tensor, and compressed-tensors 8-bit float weights: per tensor,
channel or block) load onto fp8 parts: :mod:`minikernels.quant.fp8` says which tensors.
Their layers left dense (``lm_head``, ``modules_to_not_convert``) load dense.

GPT-OSS MXFP4 checkpoints (``quant_method: "mxfp4"``, the official openai/gpt-oss
releases): the experts' ``*_blocks`` / ``*_scales`` are paired as they stream in and, by
default (quantization=None or "mxfp4"), kept MXFP4 (w13's rows de-interleaved, under
tensor parallel each rank's I/P slice; ``ops.fused_moe_mxfp4``, ~4.25 bits per weight);
with quantization="dense" dequantized to the model dtype (:mod:`.gpt_oss`) and loaded as
a dense GPT-OSS checkpoint's stacked experts, with "int4" / "fp8" / "int8" dequantized
and RTN-quantized. Every other tensor is dense. mxfp4 on another family, and GPT-OSS
with another quant_method, are refused by name; so are quantization="mxfp4" / "dense"
for any other checkpoint.

Quantized checkpoints (int4, int8, fp8) may leave any linear, or any *part* of a fused one
(Qwen3.5's ``in_proj_b`` / ``in_proj_a`` beside int4 ``in_proj_qkv`` / ``in_proj_z``),
dense: each part loads as the checkpoint holds it (``FusedLinear.set_dense_shard``). The
quantization_config's ``modules_to_not_convert``, GPTQModel ``dynamic`` (``-:`` dense,
``+:`` per-module bits / group size) and compressed-tensors ``ignore`` / ``targets`` are
honoured (:func:`minikernels.quant.checkpoints.module_rule`): quantized tensors of a
module they name dense are refused, and missing tensors are named as the checkpoint
spells them (:func:`checkpoint_name`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .config import (DecoderConfig, UnsupportedModelError, builtin_config,
                     is_classifier_architecture, list_models)
from .decoder import (CausalLM, DecoderLayer, GatedDeltaNet, Mamba2Mixer, MambaMixer,
                      fuse_w8a8_inputs)
from .gemma3n import AltUp
from .gpt_oss import (Mxfp4Experts, Mxfp4Stack, convert_dense, mxfp4_checkpoint, mxfp4_native,
                      shard_mxfp4)
from .nemotron_moe import GroupSigmoidRouter
from .hub import resolve_model
from ..nn.layers import XIELU
from ..ops.fp8_w8a8 import fp8_tensor_cores
from ..quant.fp8 import fp8_from_checkpoint
from .linear import FusedLinear, pick_group_size, set_fp8_activations, set_int8_activations
from .moe import (FusedExperts, SparseMoE, set_fp8_expert_activations,
                  set_int8_expert_activations)
from .parallel import (TensorParallel, mlp_intermediate_size, row_parallel_group_size,
                       shard_tensor)

logger = logging.getLogger("minikernels")

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
QUANTIZATIONS = (None, "int4", "gptq", "awq", "fp8", "fp8_w8a8", "int8", "mxfp4", "dense")
#: an int8 W8A8 checkpoint's tensors of a linear besides its int8 ``weight``
_INT8_SCALES = ("weight_scale", "input_scale", "input_zero_point")
#: the fp8 checkpoint tensors of a linear besides its fp8 ``weight``
_FP8_SCALES = ("weight_scale_inv", "weight_scale")
#: static activation scales / bounds of fp8 checkpoints: not needed (activations stay 16-bit)
_FP8_ACTIVATION_SCALES = ("input_scale", "input_scale_ub")


class CheckpointError(ValueError):
    """A checkpoint directory is unusable: missing files, tensors, or wrong shapes."""


def parse_dtype(dtype: str | torch.dtype, config: DecoderConfig | None = None,
                device: torch.device | None = None) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' (and short forms) | 'auto' | a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key == "auto":
        stored = _DTYPES.get(str(config.torch_dtype).lower().replace("torch.", "")) \
            if config is not None and config.torch_dtype else None
        if stored in (torch.bfloat16, torch.float16):
            return stored
        return torch.float32 if device is not None and device.type == "cpu" else torch.bfloat16
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected bfloat16, float16, float32 or auto")
    return _DTYPES[key]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def no_cuda_message(device: str = "cuda") -> str:
    """One line for device='cuda' where torch cannot use a GPU (a CPU build, or no GPU)."""
    if torch.version.cuda is None:
        return (f"device {device!r} asked for, but this torch ({torch.__version__}) is a "
                "CPU-only build: install a CUDA build of torch, or use --device cpu")
    return (f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
            "(check the driver and CUDA_VISIBLE_DEVICES), or use --device cpu")


# --------------------------------------------------------------------- name mapping
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(\w+)$")
_NORM_RE = re.compile(r"^layers\.(\d+)\.(input_layernorm|post_attention_layernorm|"
                      r"pre_feedforward_layernorm(?:_2)?|post_feedforward_layernorm(?:_[12])?)\."
                      r"(weight|bias)$")
_SHARDS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0),
           "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
_QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx",                # GPTQ / AWQ
                  "weight_packed", "weight_scale", "weight_g_idx")        # compressed-tensors
#: each int4 part's tensor that must arrive (recorded as "qweight")
_PRIMARY_INT4 = ("qweight", "weight_packed")
#: fp8 KV-cache scales as vLLM's fp8 checkpoints store them (one per layer, or per kv head)
_KV_SCALE_RE = re.compile(r"^layers\.(\d+)\.self_attn\.(k_scale|v_scale)$")
#: attention sinks (Granite SWA, GPT-OSS): one logit per q head of layer N
_SINKS_RE = re.compile(r"^layers\.(\d+)\.self_attn\.sinks$")
#: Apertus's learned xIELU parameters of layer N's MLP
_XIELU_RE = re.compile(r"^layers\.(\d+)\.mlp\.act_fn\.(alpha_p|alpha_n|beta|eps)$")
#: recurrent mixers: LFM2's short conv (in / out projections, the depthwise kernel)
_CONV_PROJ_RE = re.compile(r"^layers\.(\d+)\.conv\.(in_proj|out_proj)\.(\w+)$")
_CONV_KERNEL_RE = re.compile(r"^layers\.(\d+)\.conv\.conv\.(weight|bias)$")
#: Qwen3.5's Gated DeltaNet: four input projections fused as parts of in_proj, out_proj,
#: the conv kernel, the gated norm, and the per-head dt_bias / A_log
_GDN_IN_PARTS = {"in_proj_qkv": 0, "in_proj_z": 1, "in_proj_b": 2, "in_proj_a": 3}
_GDN_IN_RE = re.compile(r"^layers\.(\d+)\.linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|"
                        r"in_proj_a|out_proj)\.(\w+)$")
_GDN_MODULE_RE = re.compile(r"^layers\.(\d+)\.(linear_attn|mamba)\.(conv1d|norm)\."
                            r"(weight|bias)$")
_GDN_PARAM_RE = re.compile(r"^layers\.(\d+)\.linear_attn\.(dt_bias|A_log)$")
#: OLMo Hybrid's six separate projections (the parts of our in_proj), o_proj, o_norm
_GDN_SPLIT_PARTS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "g_proj": 3, "b_proj": 4,
                    "a_proj": 5}
_GDN_CONV_SPLIT_RE = re.compile(r"^layers\.(\d+)\.linear_attn\.(q|k|v)_conv1d\.weight$")
_GDN_SPLIT_RE = re.compile(r"^layers\.(\d+)\.linear_attn\.(q_proj|k_proj|v_proj|g_proj|b_proj|"
                           r"a_proj|o_proj|o_norm)\.(\w+)$")
#: Granite 4.0-H's Mamba-2 layers: one in_proj ([z | x B C | dt]), out_proj, conv1d, the
#: gated norm (above), dt_bias / A_log / D
_MAMBA_PROJ_RE = re.compile(r"^layers\.(\d+)\.mamba\.(in_proj|out_proj|x_proj)\.(\w+)$")
_MAMBA_PARAM_RE = re.compile(r"^layers\.(\d+)\.mamba\.(dt_bias|A_log|D|x_proj_weight|"
                             r"dt_proj_weight)$")     # (Zamba: per-head x / dt projections)
#: Mamba-1's dt projection (its bias is the scan's dt_bias) and Jamba's dt / B / C norms
#: Gemma 3n: the model's AltUp stream projections, and each layer's AltUp and LAuReL
#: (linears: part 0; norms and the output scale: parameters)
_ALTUP_RE = re.compile(r"^((?:altup_projections|altup_unembed_projections)\.\d+|"
                       r"layers\.\d+\.(?:altup|laurel)(\.(?:correction_coefs|prediction_coefs|"
                       r"modality_router|linear_left|linear_right))?(?:\.(?:router_norm|"
                       r"post_laurel_norm))?)\.(weight|correct_output_scale)$")
#: Gemma 4's per-layer input path and layer scalar
_PLE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(per_layer_input_gate|per_layer_projection|"
                           r"post_per_layer_input_norm|layer_scalar)(?:\.(\w+))?$")
#: Zamba2's shared blocks and a hybrid layer's own linear and adapters (after renaming)
_ZAMBA2_BLOCK_RE = re.compile(r"^shared_blocks\.(\d+)\.(input_layernorm|pre_ff_layernorm|"
                              r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(\w+)$")
_ZAMBA2_LAYER_RE = re.compile(r"^layers\.(\d+)\.(linear|zamba_adapters\.(?:qkv_a\.([qkv])|"
                              r"[qkv]_b|gate_up_[ab]))\.(\w+)$")
#: LFM3's per-head attention gate (g_proj in transformers, gate_proj in checkpoints)
_HEAD_GATE_RE = re.compile(r"^layers\.(\d+)\.self_attn\.(?:g_proj|gate_proj)\.(\w+)$")
_MAMBA1_DT_RE = re.compile(r"^layers\.(\d+)\.mamba\.dt_proj\.(\w+)$")
_MAMBA1_NORM_RE = re.compile(r"^layers\.(\d+)\.mamba\.(dt|b|c)_layernorm\.weight$")
#: mixture of experts: per-expert projections (the hub's names), transformers 5's stacked
#: ones (non-gated experts, Nemotron 3's: up_proj [E, I, H]), and the router (models/moe.py)
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.(mlp|moe)\.experts\.(\d+)\."
                        r"(gate_proj|up_proj|down_proj)\.(\w+)$")
_STACKED_EXPERTS_RE = re.compile(r"^layers\.(\d+)\.(mlp|moe)\.experts\."
                                 r"(gate_up_proj|up_proj|down_proj|w13_bias|w2_bias)$")
#: (the router's bias: GPT-OSS's)
_ROUTER_RE = re.compile(r"^layers\.(\d+)\.(mlp|moe)\.(gate|shared_expert_gate)\."
                        r"(weight|bias)$")
#: Nemotron 3's expert blocks: the router's correction bias, the latent projections
_NEMOTRON_MOE_RE = re.compile(r"^layers\.(\d+)\.mlp\.(gate|fc1_latent_proj|fc2_latent_proj)\."
                              r"(e_score_correction_bias|weight|bias)$")
#: Gemma 4's router scales (its experts sit beside the MLP: "moe")
_ROUTER_SCALE_RE = re.compile(r"^layers\.(\d+)\.moe\.(router_scale|per_expert_scale)$")
_EXPERT_BIAS_RE = re.compile(r"^layers\.(\d+)\.mlp\.expert_bias$")      # LFM2-MoE
_SHARED_EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.shared_expert\.(\w+)\.(\w+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.bias_correction|\.wf_?\w*|\.weight_shape)$"
                      r"|^score\.(weight|bias)$"   # a classifier's head: mk.Classifier reads it
                      # GPT-NeoX's / GPT-2's stored causal-mask buffers
                      r"|\.attention\.(masked_)?bias$|\.attn\.(masked_)?bias$"   # GPT-2
                      # Qwen3.5 / Qwen3-Next: the multi-token-prediction head (not served)
                      r"|^mtp\."
                      # Gemma 4: K / V weights of the layers that read an earlier layer's
                      r"|^_unused\.")


#: A multimodal checkpoint's text decoder (Gemma 3 4B+): transformers' two spellings.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
#: Its image encoder and projector: not read (the decoder serves text only).
_NON_TEXT = re.compile(r"^(model\.)?(vision_tower|vision_model|multi_modal_projector|visual|"
                       r"audio_tower|embed_vision|embed_audio)\.")


def is_non_text_tensor(name: str) -> bool:
    """A multimodal checkpoint's vision tower / projector tensor (skipped unread)."""
    return _NON_TEXT.match(name) is not None


def map_name(name: str) -> tuple[str, int | None, str] | None:
    """HF tensor name -> (our module path, part index or None, tensor kind); None = unknown.

    kind: 'weight' | 'bias' (dense), 'qweight' | 'qzeros' | 'scales' | 'g_idx' (int4), or
    'k_scale' | 'v_scale' (fp8 KV-cache scales of layer N's attention). A multimodal
    checkpoint's ``language_model.model.*`` / ``model.language_model.*`` names map as
    ``model.*``.
    """
    for prefix, plain in _TEXT_PREFIXES:
        if name.startswith(prefix):
            name = plain + name[len(prefix):]
            break
    n = name[len("model."):] if name.startswith("model.") else name
    if n in ("embed_tokens.weight", "norm.weight", "norm.bias", "embed_positions.weight",
             "embed_norm.weight", "embed_norm.bias", "embed_tokens_per_layer.weight",
             "per_layer_projection_norm.weight"):
        return n.rsplit(".", 1)[0], None, n.rsplit(".", 1)[1]
    if name.startswith("lm_head."):
        kind = name.split(".", 1)[1]
        return "lm_head", 0, kind
    if n == "per_layer_model_projection.weight":        # (Gemma 4)
        return "per_layer_model_projection", 0, "weight"
    m = _ALTUP_RE.match(n)
    if m:
        linear = m.group(2) is not None or m.group(1).startswith("altup_")
        return m.group(1), (0 if linear else None), m.group(3)
    m = _PLE_LAYER_RE.match(n)
    if m:
        layer, module, kind = m.groups()
        if module == "layer_scalar":
            return f"layers.{layer}", None, "layer_scalar"
        if module == "post_per_layer_input_norm":
            return f"layers.{layer}.{module}", None, kind
        return f"layers.{layer}.{module}", 0, kind
    m = _NORM_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}", None, m.group(3)
    m = _KV_SCALE_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.self_attn.attn", None, m.group(2)
    m = _SINKS_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.self_attn.attn", None, "sinks"
    m = _CONV_PROJ_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.conv.{m.group(2)}", 0, m.group(3)
    m = _CONV_KERNEL_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.conv.conv", None, m.group(2)
    m = _GDN_IN_RE.match(n)
    if m:
        layer, proj, kind = m.groups()
        if proj == "out_proj":
            return f"layers.{layer}.linear_attn.out_proj", 0, kind
        return f"layers.{layer}.linear_attn.in_proj", _GDN_IN_PARTS[proj], kind
    m = _GDN_MODULE_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3)}", None, m.group(4)
    m = _GDN_PARAM_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.linear_attn", None, m.group(2)
    m = _GDN_CONV_SPLIT_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.linear_attn.conv1d", "qkv".index(m.group(2)), "weight"
    m = _GDN_SPLIT_RE.match(n)
    if m:
        layer, proj, kind = m.groups()
        if proj == "o_norm":
            return f"layers.{layer}.linear_attn.norm", None, kind
        if proj == "o_proj":
            return f"layers.{layer}.linear_attn.out_proj", 0, kind
        return f"layers.{layer}.linear_attn.in_proj", _GDN_SPLIT_PARTS[proj], kind
    m = _MAMBA_PROJ_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.mamba.{m.group(2)}", 0, m.group(3)
    m = _MAMBA_PARAM_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.mamba", None, m.group(2)
    m = _ZAMBA2_BLOCK_RE.match(n)
    if m:
        block, part, kind = m.groups()
        if part in ("input_layernorm", "pre_ff_layernorm"):
            return f"shared_blocks.{block}.{part}", None, kind
        where, proj = part.split(".")
        target, shard = _SHARDS[proj]
        return f"shared_blocks.{block}.{where}.{target}", shard, kind
    m = _ZAMBA2_LAYER_RE.match(n)
    if m:
        layer, module, qkv, kind = m.groups()
        if qkv:
            return f"layers.{layer}.zamba_adapters.qkv_a", "qkv".index(qkv), kind
        return f"layers.{layer}.{module}", 0, kind
    m = _HEAD_GATE_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.self_attn.g_proj", 0, m.group(2)
    m = _MAMBA1_DT_RE.match(n)
    if m:
        if m.group(2) == "bias":
            return f"layers.{m.group(1)}.mamba", None, "dt_bias"
        return f"layers.{m.group(1)}.mamba.dt_proj", 0, m.group(2)
    m = _MAMBA1_NORM_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.mamba.{m.group(2)}_layernorm", None, "weight"
    m = _XIELU_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.mlp.act_fn", None, m.group(2)
    m = _EXPERT_RE.match(n)
    if m and (m.group(5) == "weight" or m.group(5) in _QUANT_TENSORS + _FP8_SCALES
              or m.group(5) in _FP8_ACTIVATION_SCALES):
        # an int4 expert tensor: kind "<projection>:<tensor>" (e.g. "gate_proj:qweight")
        kind = m.group(4) if m.group(5) == "weight" else f"{m.group(4)}:{m.group(5)}"
        return f"layers.{m.group(1)}.{m.group(2)}.experts", int(m.group(3)), kind
    m = _STACKED_EXPERTS_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}.experts", None, m.group(3)
    m = _ROUTER_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3)}", None, m.group(4)
    m = _ROUTER_SCALE_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.moe", None, m.group(2)
    m = _NEMOTRON_MOE_RE.match(n)
    if m:
        layer, module, kind = m.groups()
        if module == "gate":
            return f"layers.{layer}.mlp.gate", None, kind
        return f"layers.{layer}.mlp.{module}", 0, kind
    m = _EXPERT_BIAS_RE.match(n)
    if m:
        return f"layers.{m.group(1)}.mlp", None, "expert_bias"
    m = _SHARED_EXPERT_RE.match(n)
    if m and m.group(2) in _SHARDS:
        target, shard = _SHARDS[m.group(2)]
        return f"layers.{m.group(1)}.mlp.shared_expert.{target}", shard, m.group(3)
    m = _LAYER_RE.match(n)
    if m:
        layer, block, proj, kind = m.groups()
        if proj in ("q_norm", "k_norm") and kind == "weight":
            return f"layers.{layer}.self_attn.{proj}", None, "weight"
        if proj in _SHARDS and kind != "weight_shape":   # (compressed-tensors metadata)
            target, shard = _SHARDS[proj]
            return f"layers.{layer}.{block}.{target}", shard, kind
    return None


#: q/k/v and gate/up stored fused (Phi-3): split into the parts' own names.
_FUSED_RE = re.compile(r"^(model\.(?:layers|shared_blocks)\.\d+\.)(self_attn\.qkv_proj|"
                       r"mlp\.gate_up_proj|"
                       r"mlp\.shared_expert\.gate_up_proj)\.(\w+)$")
_PART_NAMES = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj"),
               "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
               "mlp.shared_expert.gate_up_proj": ("mlp.shared_expert.gate_proj",
                                                  "mlp.shared_expert.up_proj")}


def _unfuse(name: str, tensor: Any, config: DecoderConfig) -> Iterator[tuple[str, Any]]:
    """(name, tensor) as the loader reads it: a fused ``qkv_proj`` / ``gate_up_proj``
    weight or bias (Phi-3's checkpoints) becomes its q / k / v (gate / up) row blocks under
    the parts' names; anything else passes through. Safetensors slices (tensor-parallel
    loading) read only each part's rows. Per-head fused q / k / v (GPT-NeoX, GPT-BigCode)
    is reordered first, and GPT-2's Conv1D weights ([in, out]) are transposed. GPT-OSS's
    stacked experts ([E, in, out], gate / up interleaved) and their biases take the
    decoder's layouts (models/gpt_oss.py ``convert_dense``)."""
    if config.architecture == "gpt_oss" and ".mlp.experts." in name:
        yield from convert_dense(name, tensor)
        return
    if config.architecture == "gpt2" and _CONV1D_RE.search(name):
        tensor = _materialized(tensor).t().contiguous()
    m = _FUSED_RE.match(name)
    if m is None:
        yield name, tensor
        return
    prefix, fused, kind = m.groups()
    if config.qkv_grouped and fused == "self_attn.qkv_proj" and kind in ("weight", "bias"):
        try:
            tensor = grouped_qkv_to_blocks(_materialized(tensor), config)
        except ValueError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
    sizes = [config.q_size, config.kv_size, config.kv_size] if fused.endswith("qkv_proj") \
        else [config.shared_expert_intermediate_size] * 2 if "shared_expert" in fused \
        else [config.intermediate_size] * 2
    shape = list(tensor.get_shape()) if hasattr(tensor, "get_shape") else list(tensor.shape)
    if kind in _FP8_SCALES + _FP8_ACTIVATION_SCALES:
        full = sizes
        sizes = _fused_fp8_scale_rows(name, shape, sizes, config)
        if sizes is None:     # one value for the fused tensor: every part has it
            for part in _PART_NAMES[fused]:
                yield f"{prefix}{part}.{kind}", tensor
            return
        if config.qkv_grouped and fused == "self_attn.qkv_proj":
            if sizes != full:
                raise CheckpointError(f"{name}: block-scaled fp8 of a grouped fused q / k / "
                                      "v layer is not supported")
            tensor = grouped_qkv_to_blocks(_materialized(tensor), config)   # per channel
    elif kind not in ("weight", "bias"):
        yield from _unfuse_quantized(name, prefix, fused, kind, tensor, shape, sizes, config)
        return
    if shape[0] != sum(sizes):
        raise CheckpointError(f"{name}: shape mismatch: expected {sum(sizes)} rows "
                              f"({' + '.join(map(str, sizes))}), got {shape[0]}")
    start = 0
    for part, size in zip(_PART_NAMES[fused], sizes):
        yield f"{prefix}{part}.{kind}", tensor[start:start + size]
        start += size


#: int4 / int8 tensors and the axis that runs over a layer's output features N:
#: "n" (one column or row per output), "words" (packed along N: 32 / bits per int32),
#: "k" (along the input only: every part shares it)
_QUANT_N_AXES = {("gptq", "qweight"): (1, "n"), ("gptq", "qzeros"): (1, "words"),
                 ("gptq", "scales"): (1, "n"), ("gptq", "g_idx"): (0, "k"),
                 ("awq", "qweight"): (1, "words"), ("awq", "qzeros"): (1, "words"),
                 ("awq", "scales"): (1, "n"),
                 ("compressed-tensors", "weight_packed"): (0, "n"),
                 ("compressed-tensors", "weight_scale"): (0, "n"),
                 ("compressed-tensors", "weight_g_idx"): (0, "k"),
                 ("compressed-tensors", "weight_shape"): (0, "shape")}


def _unfuse_quantized(name: str, prefix: str, fused: str, kind: str, tensor: Any,
                      shape: list[int], sizes: list[int], config: DecoderConfig
                      ) -> Iterator[tuple[str, Tensor]]:
    """A GPTQ / AWQ / compressed-tensors tensor of a fused q / k / v (gate / up) layer
    (Phi-3's, Falcon's, MPT's, GPT-NeoX's, BLOOM's checkpoints) as its parts' tensors:
    each part takes its output features (columns of a GPTQ qweight / scales, rows of
    compressed-tensors' weight_packed / weight_scale, whole int32 words of what is packed
    along N: AWQ's qweight, the zeros), in the decoder's [q; k; v] order (a grouped
    layout regrouped); what runs along K only (g_idx) is every part's."""
    quant = _checkpoint_quant(config) or {}
    method = quant.get("method")
    axis_kind = _QUANT_N_AXES.get((method, kind))
    if axis_kind is None:
        raise CheckpointError(f"{name}: {kind} tensors of a fused "
                              f"{fused.split('.')[1]} are not supported ({method}); load "
                              "the dense checkpoint with quantization='int4'")
    axis, what = axis_kind
    t = _materialized(tensor)
    if what == "shape":                # compressed-tensors' [N, K] record: each part's own
        for part, size in zip(_PART_NAMES[fused], sizes):
            yield f"{prefix}{part}.{kind}", torch.tensor([size, int(t[1])], dtype=t.dtype)
        return
    if what == "k":
        for part in _PART_NAMES[fused]:
            yield f"{prefix}{part}.{kind}", t
        return
    n = sum(sizes)
    order = torch.arange(n)
    if config.qkv_grouped and fused == "self_attn.qkv_proj":
        order = grouped_qkv_to_blocks(order, config)   # the source feature of each row
    pack = 32 // int(quant.get("bits", 4)) if what == "words" else 1
    if shape[axis] * pack != n:
        raise CheckpointError(f"{name}: shape mismatch: expected {n // pack} along dim "
                              f"{axis} ({' + '.join(map(str, sizes))} features"
                              f"{f' / {pack} per int32' if pack > 1 else ''}), got "
                              f"{shape[axis]}")
    for part, rows in zip(_PART_NAMES[fused], order.split(sizes)):
        if pack > 1:
            runs = rows.view(-1, pack)
            if bool((runs[:, 0] % pack).any()) or not torch.equal(
                    runs, runs[:, :1] + torch.arange(pack)):
                raise CheckpointError(f"{name}: the fused parts do not split into whole "
                                      f"int32 words of {pack} features")
            rows = runs[:, 0] // pack
        yield f"{prefix}{part}.{kind}", t.index_select(axis, rows.to(t.device)).contiguous()


def _fused_fp8_scale_rows(name: str, shape: list[int], sizes: list[int],
                          config: DecoderConfig) -> list[int] | None:
    """How an fp8 scale of a fused q/k/v (gate/up) weight splits into the parts' scales:
    the parts' scale rows (per channel: their weight rows; block scales: their row blocks,
    when every part is whole blocks), or None for one value shared by every part."""
    if math.prod(shape) == 1:
        return None
    from ..quant.fp8 import fp8_scheme

    scheme = fp8_scheme(config.quantization_config or {}) or {}
    if scheme.get("strategy") == "block":
        bn = scheme["block_size"][0]
        if any(size % bn for size in sizes):
            raise CheckpointError(f"{name}: the fused parts ({' + '.join(map(str, sizes))} "
                                  f"rows) are not whole {bn}-row fp8 blocks")
        return [size // bn for size in sizes]
    return sizes


#: GLM-4's sandwich norms under the names the decoder gives them (Gemma 2's layout):
#: post_self_attn (after attention), post_attention (before the MLP), post_mlp (after it).
_GLM4_NORMS = {"post_self_attn_layernorm": "post_attention_layernorm",
               "post_attention_layernorm": "pre_feedforward_layernorm",
               "post_mlp_layernorm": "post_feedforward_layernorm"}
_GLM4_NORM_RE = re.compile(r"\.(post_self_attn_layernorm|post_attention_layernorm|"
                           r"post_mlp_layernorm)\.")


#: HyperCLOVA X's sandwich norms under the decoder's (Gemma 2's layout): post_norm1 after
#: attention, post_attention_layernorm before the MLP, post_norm2 after it
_HCX_NORMS = {"post_norm1": "post_attention_layernorm",
              "post_attention_layernorm": "pre_feedforward_layernorm",
              "post_norm2": "post_feedforward_layernorm"}
_HCX_NORM_RE = re.compile(r"\.(post_norm1|post_attention_layernorm|post_norm2)\.")

#: Mixtral's and Granite-MoE's ``block_sparse_moe`` tensors under Qwen3-MoE's names
_BSM = r"\.block_sparse_moe\."
_MOE_NAMES = [(re.compile(_BSM + r"experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
              (re.compile(_BSM + r"experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
              (re.compile(_BSM + r"experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
              (re.compile(_BSM + r"(gate|router\.layer|router)\.weight$"), ".mlp.gate.weight"),
              # (transformers 5's in-memory names: stacked experts, the router's weight)
              (re.compile(_BSM + r"experts\.(gate_up_proj|down_proj)$"), r".mlp.experts.\1"),
              (re.compile(_BSM + r"input_linear\.weight$"), ".mlp.experts.gate_up_proj"),
              (re.compile(_BSM + r"output_linear\.weight$"), ".mlp.experts.down_proj")]


def _family_name(name: str, config: DecoderConfig) -> str:
    """A checkpoint tensor name in the decoder's vocabulary (GLM-4's and HunYuan's norms
    and StarCoder 2's MLP renamed; Mixtral's / Granite-MoE's experts and router under
    Qwen3-MoE's names)."""
    if ".block_sparse_moe." in name:
        for pattern, repl in _MOE_NAMES:
            name = pattern.sub(repl, name)
        return name
    if config.architecture == "gpt_oss":     # its router under Qwen3-MoE's name
        return name.replace(".mlp.router.", ".mlp.gate.")
    if config.architecture in ("granite_hybrid", "granitemoeshared"):   # the fused shared MLP (the
        mlp = ".mlp.shared_expert." if config.num_experts else ".mlp."   # experts' beside)
        return name.replace(".shared_mlp.input_linear.", f"{mlp}gate_up_proj.").replace(
            ".shared_mlp.output_linear.", f"{mlp}down_proj.")
    if config.architecture == "starcoder2":   # its non-gated MLP: c_fc, act, c_proj
        return name.replace(".mlp.c_fc.", ".mlp.gate_proj.").replace(
            ".mlp.c_proj.", ".mlp.down_proj.")
    if config.architecture == "phi":          # fc1 / fc2, the o projection "dense", and
        return name.replace(".mlp.fc1.", ".mlp.gate_proj.").replace(       # final_layernorm
            ".mlp.fc2.", ".mlp.down_proj.").replace(".self_attn.dense.", ".self_attn.o_proj.") \
            .replace("model.final_layernorm.", "model.norm.")
    if config.architecture in _FAMILY_NAMES:
        return _renamed(name, *_FAMILY_NAMES[config.architecture])
    if config.architecture in ("nemotron_h", "mamba2"):    # (Mamba-2: the same names)
        return _nemotron_h_name(name, config)
    if config.architecture == "zamba2":
        return _zamba2_name(name, config)
    if config.architecture == "zamba":      # (Zamba2's names in Zamba's spelling)
        return _zamba2_name(name.replace(".shared_transf.", ".shared_transformer.").replace(
            ".mamba.dt_proj_bias", ".mamba.dt_bias"), config)
    if config.architecture == "gemma4" and config.moe_beside_mlp:   # (26B-A4B's experts)
        name = _renamed(name, (), _GEMMA4_MOE_PARTS)
    if config.architecture in ("gemma4", "gemma3n") and config.kv_shared_from is not None:
        m = _GEMMA4_KV_RE.search(name)
        if m and int(m.group(1)) < config.num_layers and \
                config.kv_source(int(m.group(1))) is not None:
            return "_unused." + name      # (a layer reading another's K / V has none)
    if config.architecture in ("gemma4", "gemma3n"):
        return name
    if config.architecture in ("mamba", "falcon_mamba"):
        name = _renamed(name, _MAMBA1_PREFIXES, ())
        return _renamed(name, (), _MAMBA1_PARTS) if name.startswith("model.layers.") else name
    if config.architecture in ("nemotron", "arcee", "jais2"):   # the non-gated one up_proj
        return name.replace(".mlp.up_proj.", ".mlp.gate_proj.")
    if config.architecture == "apertus":      # its up_proj, and its norms' names
        return name.replace(".mlp.up_proj.", ".mlp.gate_proj.").replace(
            ".attention_layernorm.", ".input_layernorm.").replace(
            ".feedforward_layernorm.", ".post_attention_layernorm.")
    if config.architecture == "hyperclovax" and config.sandwich_norm:   # its peri-norms
        return _HCX_NORM_RE.sub(lambda m: f".{_HCX_NORMS[m.group(1)]}.", name)
    if config.architecture == "vaultgemma":   # its one norm before the MLP
        return name.replace(".pre_feedforward_layernorm.", ".post_attention_layernorm.")
    if config.architecture == "nanochat":               # its non-gated fc1 / fc2
        return name.replace(".mlp.fc1.", ".mlp.gate_proj.").replace(".mlp.fc2.",
                                                                    ".mlp.down_proj.")
    if config.architecture == "hunyuan":    # its per-head q / k norms
        return name.replace(".self_attn.query_layernorm.", ".self_attn.q_norm.").replace(
            ".self_attn.key_layernorm.", ".self_attn.k_norm.")
    if config.architecture != "glm4":
        return name
    return _GLM4_NORM_RE.sub(lambda m: f".{_GLM4_NORMS[m.group(1)]}.", name)


#: GPT-NeoX's tensor names -> the decoder's (prefix first; then within a layer)
_NEOX_PREFIXES = (("gpt_neox.embed_in.", "model.embed_tokens."),
                  ("gpt_neox.final_layer_norm.", "model.norm."),
                  ("gpt_neox.layers.", "model.layers."), ("embed_out.", "lm_head."))
_NEOX_PARTS = ((".attention.query_key_value.", ".self_attn.qkv_proj."),
               (".attention.dense.", ".self_attn.o_proj."),
               (".mlp.dense_h_to_4h.", ".mlp.gate_proj."),
               (".mlp.dense_4h_to_h.", ".mlp.down_proj."))


#: GPT-2's / GPT-BigCode's names (with or without the "transformer." prefix)
_GPT2_PREFIXES = (("transformer.wte.", "model.embed_tokens."), ("wte.", "model.embed_tokens."),
                  ("transformer.wpe.", "model.embed_positions."),
                  ("wpe.", "model.embed_positions."), ("transformer.ln_f.", "model.norm."),
                  ("ln_f.", "model.norm."), ("transformer.h.", "model.layers."),
                  ("h.", "model.layers."))
_GPT2_PARTS = ((".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
               (".attn.c_attn.", ".self_attn.qkv_proj."), (".attn.c_proj.", ".self_attn.o_proj."),
               (".mlp.c_fc.", ".mlp.gate_proj."), (".mlp.c_proj.", ".mlp.down_proj."))
#: GPT-Neo's (GPT-2's prefixes; q / k / v / out_proj under attn.attention)
_GPT_NEO_PARTS = ((".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                  (".attn.attention.q_proj.", ".self_attn.q_proj."),
                  (".attn.attention.k_proj.", ".self_attn.k_proj."),
                  (".attn.attention.v_proj.", ".self_attn.v_proj."),
                  (".attn.attention.out_proj.", ".self_attn.o_proj."),
                  (".mlp.c_fc.", ".mlp.gate_proj."), (".mlp.c_proj.", ".mlp.down_proj."))
#: GPT-J's (GPT-2's prefixes; q / k / v / out_proj and fc_in / fc_out in its layers)
_GPTJ_PARTS = ((".ln_1.", ".input_layernorm."), (".attn.q_proj.", ".self_attn.q_proj."),
               (".attn.k_proj.", ".self_attn.k_proj."), (".attn.v_proj.", ".self_attn.v_proj."),
               (".attn.out_proj.", ".self_attn.o_proj."), (".mlp.fc_in.", ".mlp.gate_proj."),
               (".mlp.fc_out.", ".mlp.down_proj."))
#: OPT's names (OPTForCausalLM's "model.decoder.", OPTModel's "decoder.")
_OPT_PREFIXES = (("model.decoder.final_layer_norm.", "model.norm."),
                 ("decoder.final_layer_norm.", "model.norm."),
                 ("model.decoder.", "model."), ("decoder.", "model."))
_OPT_PARTS = ((".self_attn_layer_norm.", ".input_layernorm."),
              (".final_layer_norm.", ".post_attention_layernorm."),
              (".self_attn.out_proj.", ".self_attn.o_proj."), (".fc1.", ".mlp.gate_proj."),
              (".fc2.", ".mlp.down_proj."))

#: BLOOM's names (BloomForCausalLM's "transformer.", BloomModel's none)
_BLOOM_PREFIXES = tuple((f"{t}{theirs}", ours) for t in ("transformer.", "") for theirs, ours in
                        (("word_embeddings_layernorm.", "model.embed_norm."),
                         ("word_embeddings.", "model.embed_tokens."),
                         ("ln_f.", "model.norm."), ("h.", "model.layers.")))
_BLOOM_PARTS = ((".self_attention.query_key_value.", ".self_attn.qkv_proj."),
                (".self_attention.dense.", ".self_attn.o_proj."),
                (".mlp.dense_h_to_4h.", ".mlp.gate_proj."),
                (".mlp.dense_4h_to_h.", ".mlp.down_proj."))

#: Falcon's (BLOOM's names, and the new decoder architecture's two norms)
_FALCON_PARTS = _BLOOM_PARTS + ((".ln_attn.", ".input_layernorm."),
                                (".ln_mlp.", ".post_attention_layernorm."))

#: MPT's (MptForCausalLM's "transformer.", MptModel's none)
_MPT_PREFIXES = tuple((f"{t}{theirs}", ours) for t in ("transformer.", "") for theirs, ours in
                      (("wte.", "model.embed_tokens."), ("norm_f.", "model.norm."),
                       ("blocks.", "model.layers.")))
_MPT_PARTS = ((".norm_1.", ".input_layernorm."), (".norm_2.", ".post_attention_layernorm."),
              (".attn.Wqkv.", ".self_attn.qkv_proj."), (".attn.out_proj.", ".self_attn.o_proj."),
              (".ffn.up_proj.", ".mlp.gate_proj."), (".ffn.down_proj.", ".mlp.down_proj."))


#: LFM2's names (its final norm is "embedding_norm"; the conv layers' names stay)
_LFM2_PREFIXES = (("model.embedding_norm.", "model.norm."),)
_LFM2_PARTS = ((".operator_norm.", ".input_layernorm."),
               (".ffn_norm.", ".post_attention_layernorm."),
               (".self_attn.out_proj.", ".self_attn.o_proj."),
               (".self_attn.q_layernorm.", ".self_attn.q_norm."),
               (".self_attn.k_layernorm.", ".self_attn.k_norm."),
               (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
               (".feed_forward.w2.", ".mlp.down_proj."))


#: LFM3's (LFM2's embedding norm and MLP; sandwich norms; standard attention names)
_LFM3_PARTS = ((".operator_norm.", ".input_layernorm."),
               (".post_operator_norm.", ".post_attention_layernorm."),
               (".ffn_norm.", ".pre_feedforward_layernorm."),
               (".post_ffn_norm.", ".post_feedforward_layernorm."),
               (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
               (".feed_forward.w2.", ".mlp.down_proj."))


#: LFM2-MoE's (LFM2's, and its experts, router and expert bias under Qwen3-MoE's names)
_LFM2_MOE_PARTS = _LFM2_PARTS + ((".feed_forward.experts.", ".mlp.experts."),
                                 (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                                 (".w2.", ".down_proj."), (".feed_forward.gate.", ".mlp.gate."),
                                 (".feed_forward.expert_bias", ".mlp.expert_bias"))

#: Falcon-H1's names (its final norm, the norm before the MLP, the MLP's "feed_forward")
_FALCON_H1_PREFIXES = (("model.final_layernorm.", "model.norm."),)
_FALCON_H1_PARTS = ((".pre_ff_layernorm.", ".post_attention_layernorm."),
                    (".feed_forward.", ".mlp."))


#: Nemotron-H: backbone.* names; each block's one "mixer" named by its kind
_NEMOTRON_H_PREFIXES = (("backbone.embeddings.", "model.embed_tokens."),
                        ("backbone.norm_f.", "model.norm."), ("backbone.", "model."),
                        # (transformers 5's in-memory names: RL weight sync)
                        ("model.embeddings.", "model.embed_tokens."),
                        ("model.norm_f.", "model.norm."))
_NEMOTRON_H_MIXER_RE = re.compile(r"^model\.layers\.(\d+)\.(mixer|norm)\.")
_NEMOTRON_H_MIXERS = {"mamba2": ".mamba.", "attention": ".self_attn.", "none": ".mlp."}


def _nemotron_h_name(name: str, config: DecoderConfig) -> str:
    """A Nemotron-H tensor under the decoder's names: the block norm is the layer's
    input_layernorm; its mixer is the layer's mamba, self_attn or (MLP and expert blocks)
    mlp, whose one up_proj is the non-gated MLP's gate_up_proj part (the shared expert's
    too)."""
    name = _renamed(name, _NEMOTRON_H_PREFIXES, ())
    m = _NEMOTRON_H_MIXER_RE.match(name)
    if m is None:
        return name
    layer = int(m.group(1))
    if m.group(2) == "norm":
        return name.replace(".norm.", ".input_layernorm.", 1)
    if layer >= config.num_layers:
        return name
    new = _NEMOTRON_H_MIXERS[config.mixer(layer)]
    name = name.replace(".mixer.", new, 1)
    if new != ".mlp.":
        return name
    # (Nemotron 3's expert blocks: the shared expert's non-gated up_proj likewise)
    return name.replace(".mlp.up_proj.", ".mlp.gate_proj.").replace(
        ".mlp.shared_experts.up_proj.", ".mlp.shared_expert.gate_proj.").replace(
        ".mlp.shared_experts.", ".mlp.shared_expert.")


#: Gemma 4 (26B-A4B): the experts and router beside the MLP, under "moe"
_GEMMA4_MOE_PARTS = ((".router.proj.", ".moe.gate."), (".router.scale", ".moe.router_scale"),
                     (".router.per_expert_scale", ".moe.per_expert_scale"),
                     (".experts.", ".moe.experts."))
#: Gemma 4: a layer's K / V tensors (unused in the layers that read an earlier layer's)
_GEMMA4_KV_RE = re.compile(r"layers\.(\d+)\.self_attn\.(?:k_proj|v_proj|k_norm|v_norm)\.")


#: EXAONE 3.x: GPT-2-style names around Llama's layers
_EXAONE_PREFIXES = (("transformer.wte.", "model.embed_tokens."),
                    ("transformer.h.", "model.layers."), ("transformer.ln_f.", "model.norm."))
_EXAONE_PARTS = ((".attn.attention.", ".self_attn."), (".self_attn.out_proj.", ".self_attn.o_proj."),
                 (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                 (".mlp.c_fc_0.", ".mlp.gate_proj."), (".mlp.c_fc_1.", ".mlp.up_proj."),
                 (".mlp.c_proj.", ".mlp.down_proj."))


#: Mamba / FalconMamba: backbone.* names (old checkpoints: "embedding"), each layer's
#: norm and mixer
_MAMBA1_PREFIXES = (("backbone.embeddings.", "model.embed_tokens."),
                    ("backbone.embedding.", "model.embed_tokens."),
                    ("backbone.norm_f.", "model.norm."), ("backbone.", "model."),
                    # (transformers 5's in-memory names: RL weight sync)
                    ("model.embeddings.", "model.embed_tokens."),
                    ("model.norm_f.", "model.norm."))
_MAMBA1_PARTS = ((".norm.", ".input_layernorm."), (".mixer.", ".mamba."))


#: Zamba2: a hybrid layer's Mamba part, its shared block's tensors, their adapters
_ZAMBA2_MAMBA_RE = re.compile(r"^model\.layers\.(\d+)\.mamba_decoder\.")
_ZAMBA2_SHARED_RE = re.compile(r"^model\.layers\.(\d+)\.shared_transformer\.(.+)$")
_ZAMBA2_ADAPTER_RE = re.compile(r"^(?:self_attn\.linear_([qkv])_adapter_list|"
                                r"feed_forward\.(gate_up)_proj_adapter_list)\.(\d+)\.([01])\."
                                r"(weight)$")


def _zamba2_name(name: str, config: DecoderConfig) -> str:
    """A Zamba2 tensor under the decoder's names: a hybrid layer's mamba_decoder.* is the
    layer's own (mamba, input_layernorm); shared_transformer.* of the layer that holds a
    block goes to ``model.shared_blocks.{b}`` (b: the block of that hybrid layer, in turn),
    except the adapter lists: entry j belongs to the j-th hybrid layer
    (``model.layers.{i}.zamba_adapters``); the final norm is model.norm."""
    if name.startswith("model.final_layernorm."):
        return "model.norm." + name[len("model.final_layernorm."):]
    m = _ZAMBA2_MAMBA_RE.match(name)
    if m:
        return f"model.layers.{m.group(1)}." + name[m.end():]
    m = _ZAMBA2_SHARED_RE.match(name)
    if m is None:
        return name
    hybrid = [i for i in range(config.num_layers) if config.mixer(i) == "zamba_hybrid"]
    layer, rest = int(m.group(1)), m.group(2)
    a = _ZAMBA2_ADAPTER_RE.match(rest)
    if a:
        proj, j, half = a.group(1) or a.group(2), int(a.group(3)), "ab"[int(a.group(4))]
        if j >= len(hybrid):
            return name
        target = f"qkv_a.{proj}" if proj in "qkv" and half == "a" else f"{proj}_{half}"
        return f"model.layers.{hybrid[j]}.zamba_adapters.{target}.{a.group(5)}"
    if layer not in hybrid:
        return name
    block = hybrid.index(layer) % config.zamba_shared_blocks
    return f"model.shared_blocks.{block}." + rest.replace("feed_forward.", "mlp.")


def _renamed(name: str, prefixes: tuple[tuple[str, str], ...],
             parts: tuple[tuple[str, str], ...]) -> str:
    """``name`` with its first matching prefix and every matching part replaced."""
    for prefix, ours in prefixes:
        if name.startswith(prefix):
            name = ours + name[len(prefix):]
            break
    for part, ours in parts:
        name = name.replace(part, ours)
    return name


#: family -> (its prefixes, its in-layer names) under the decoder's (a fused, grouped
#: query_key_value is regrouped by :func:`_unfuse`)
_FAMILY_NAMES = {"gpt_neox": (_NEOX_PREFIXES, _NEOX_PARTS),
                 "gpt2": (_GPT2_PREFIXES, _GPT2_PARTS),
                 "gpt_bigcode": (_GPT2_PREFIXES, _GPT2_PARTS),
                 "gpt_neo": (_GPT2_PREFIXES, _GPT_NEO_PARTS),
                 "gptj": (_GPT2_PREFIXES, _GPTJ_PARTS),
                 "opt": (_OPT_PREFIXES, _OPT_PARTS),
                 "bloom": (_BLOOM_PREFIXES, _BLOOM_PARTS),
                 "falcon": (_BLOOM_PREFIXES, _FALCON_PARTS),
                 "mpt": (_MPT_PREFIXES, _MPT_PARTS),
                 "lfm2": (_LFM2_PREFIXES, _LFM2_PARTS),
                 "lfm2_moe": (_LFM2_PREFIXES, _LFM2_MOE_PARTS),
                 "lfm3": (_LFM2_PREFIXES, _LFM3_PARTS),
                 "falcon_h1": (_FALCON_H1_PREFIXES, _FALCON_H1_PARTS),
                 "bamba": (_FALCON_H1_PREFIXES, _FALCON_H1_PARTS),     # (the same names)
                 # Jamba: Falcon-H1's names, its experts' router under Qwen3-MoE's name
                 "jamba": (_FALCON_H1_PREFIXES, ((".feed_forward.router.", ".mlp.gate."),)
                           + _FALCON_H1_PARTS),
                 "exaone": (_EXAONE_PREFIXES, _EXAONE_PARTS),
                 # OLMo Hybrid's checkpoint names of its layers' two norms
                 "olmo_hybrid": ((), ((".attention_layer_norm.", ".input_layernorm."),
                                      (".feedforward_layer_norm.",
                                       ".post_attention_layernorm.")))}


def _materialized(tensor: Any) -> Tensor:
    """A tensor from a tensor or a safetensors slice (read whole)."""
    return tensor if isinstance(tensor, Tensor) else tensor[:]


def grouped_qkv_to_blocks(t: Tensor, config: DecoderConfig) -> Tensor:
    """Fused q / k / v rows stored per kv head, [kv_heads, (its q heads, k, v), head_dim]
    (GPT-NeoX's / BLOOM's query_key_value and GPT-BigCode's c_attn: one q head per group;
    Falcon's new decoder architecture: num_heads / kv_heads), reordered to the decoder's
    [q heads; k heads; v heads] blocks (a weight [rows, in] or a bias [rows]; a LoRA B
    [rows, r] too). ValueError on another row count."""
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    rows = (h + 2 * kv) * d
    if t.shape[0] != rows:
        raise ValueError(f"expected {rows} fused q / k / v rows ({kv} groups of "
                         f"{h // kv} q + 1 k + 1 v heads of {d}), got {t.shape[0]}")
    rest = tuple(t.shape[1:])
    g = t.reshape(kv, h // kv + 2, d, *rest)
    return torch.cat([g[:, :-2].reshape(h * d, *rest), g[:, -2].reshape(kv * d, *rest),
                      g[:, -1].reshape(kv * d, *rest)])


#: GPT-2's Conv1D layers store weight [in, out] (nn.Linear's transpose)
_CONV1D_RE = re.compile(r"\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_proj|down_proj))\.weight$")


def check_kv_scale(buffer: Tensor, tensor: Tensor, where: str) -> None:
    """CheckpointError unless ``tensor`` holds 1 or one value per kv head of ``buffer``,
    each finite and > 0 (the values unchecked on a meta tensor: there are none)."""
    values = tensor.float().reshape(-1)
    if values.numel() not in (1, buffer.numel()):
        raise CheckpointError(f"{where}: expected 1 or {buffer.numel()} values, got "
                              f"{values.numel()}")
    if values.device.type != "meta" and \
            not bool(torch.isfinite(values).all() & (values > 0).all()):
        raise CheckpointError(f"{where}: KV-cache scales must be finite and > 0")


_LAYER_INDEX_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _inside_a_layer(name: str, num_layers: int) -> bool:
    """Whether ``name`` belongs to one of the decoder's layers (index < num_layers; a
    checkpoint's extra layers past them, e.g. multi-token-prediction heads, do not)."""
    m = _LAYER_INDEX_RE.search(name)
    return m is not None and int(m.group(1)) < num_layers


def _load_kv_scale(buffer: Tensor, tensor: Tensor, where: str) -> None:
    """An fp8 KV-cache scale from a checkpoint: one value (per layer) or one per kv head."""
    check_kv_scale(buffer, tensor, where)
    values = tensor.float().reshape(-1)
    with torch.no_grad():
        buffer.copy_(values.to(buffer.device).expand(buffer.numel()))


# ------------------------------------------------------------------- checkpoint I/O
def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_files(model_dir: str, allow_pickle: bool = False) -> list[str]:
    """The weight files of a HF directory, safetensors preferred."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {missing}")
        return [os.path.join(model_dir, f) for f in files]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    pickles = sorted(glob.glob(os.path.join(model_dir, "*.bin")) +
                     glob.glob(os.path.join(model_dir, "*.pt")) +
                     glob.glob(os.path.join(model_dir, "*.pth")))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{model_dir} holds only pickle weights ({os.path.basename(pickles[0])}, ...). "
                "Pickle files can run arbitrary code when loaded; convert the checkpoint to "
                "safetensors, or pass allow_pickle=True if you trust its source.")
        return pickles
    raise CheckpointError(f"no weights found in {model_dir} (expected model.safetensors, a "
                          "model.safetensors.index.json with shards, or *.bin with "
                          "allow_pickle=True)")


def _iter_file(path: str, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of a weight file; lazy: safetensors slices (read on indexing).
    A multimodal checkpoint's vision tensors come as (name, None), unread."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if is_non_text_tensor(key):
                    yield key, None
                    continue
                yield key, (f.get_slice(key) if lazy else f.get_tensor(key))
    else:
        # weights_only: tensors and plain containers only, no arbitrary objects.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        yield from state.items()


def _count_tensors(files: list[str]) -> int | None:
    total = 0
    for path in files:
        if not path.endswith(".safetensors"):
            return None
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            total += len(list(f.keys()))
    return total


# --------------------------------------------------------------------- quantization
def _parse_scheme(parse: Any, qc: dict[str, Any]) -> Any:
    """``parse(qc)``, its errors raised as UnsupportedModelError (they name the field)."""
    try:
        return parse(qc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnsupportedModelError(f"quantization_config: {exc}") from None


def _checkpoint_quant(config: DecoderConfig) -> dict[str, Any] | None:
    """Validated GPTQ / AWQ / compressed-tensors int4 settings, or {"method": ..., "fp8":
    scheme} for an fp8 checkpoint, or {"method": ..., "int8": scheme} for an int8 W8A8
    one, from config.quantization_config (None for dense)."""
    qc = config.quantization_config
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if config.architecture == "gpt_oss":
        # the official releases: MXFP4 experts, dequantized on load (a dense model)
        if method == "mxfp4":
            _mxfp4_config(qc)
            return None
        raise UnsupportedModelError(f"GPT-OSS checkpoints quantized with quant_method "
                                    f"{method!r} are not supported (supported: mxfp4, the "
                                    "official releases, or dense bf16 ones)")
    if method == "mxfp4":
        arch = config.hf_architecture or config.architecture
        raise UnsupportedModelError(f"quantization_config.quant_method 'mxfp4' is supported "
                                    f"for GPT-OSS only, not {arch}")
    from ..quant import compressed_tensors_scheme
    from ..quant.fp8 import fp8_scheme
    from ..quant.int8 import int8_scheme

    fp8 = _parse_scheme(fp8_scheme, qc)
    if fp8 is not None:
        return {"method": method, "fp8": fp8}
    int8 = _parse_scheme(int8_scheme, qc)
    if int8 is not None:
        return {"method": method, "int8": int8}
    if method == "compressed-tensors":
        return {"method": method, **_parse_scheme(compressed_tensors_scheme, qc)}
    if method not in ("gptq", "awq"):
        raise UnsupportedModelError(f"quantization_config.quant_method {method!r} is not "
                                    "supported (supported: gptq with 4 or 8 bits, awq with 4 "
                                    "bits, compressed-tensors pack-quantized int4 / int8, "
                                    "int-quantized int8 or float-quantized fp8, fp8, "
                                    "fbgemm_fp8)")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise UnsupportedModelError(f"{method} with {bits} bits is not supported (" + (
            "4 or 8)" if method == "gptq" else "only 4)"))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if bits == 8 and group != -1 and group % 16:
        raise UnsupportedModelError(f"8-bit GPTQ with group_size {group} is not supported "
                                    "(a multiple of 16, or -1)")
    out = {"method": method, "group_size": group, "bits": bits}
    if method == "gptq":
        from ..quant.checkpoints import _dynamic_rules

        _parse_scheme(_dynamic_rules, qc)     # (malformed per-module overrides: by name)
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedModelError(f"GPTQ checkpoint_format {fmt!r} is not supported "
                                        "(supported: gptq, gptq_v2)")
        out["checkpoint_format"] = fmt
    else:
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(f"AWQ version {version!r} is not supported (only gemm)")
        if not qc.get("zero_point", True):
            raise UnsupportedModelError("AWQ without zero_point is not supported")
    return out


def _mxfp4_config(qc: dict[str, Any]) -> None:
    """Check a GPT-OSS mxfp4 quantization_config: only the experts are MXFP4 (their
    ``*_blocks`` / ``*_scales``); ``modules_to_not_convert`` lists what is stored dense
    (informational: dense tensors load as dense whatever it says)."""
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and
                                 all(isinstance(m, str) for m in skip)):
        raise UnsupportedModelError(f"quantization_config.modules_to_not_convert must be a "
                                    f"list of module names, got {skip!r}")


def _iter_checkpoint(path: str, lazy: bool, mxfp4: Mxfp4Experts | None,
                     bar: Any) -> Iterator[tuple[str, Any]]:
    """The tensors of one checkpoint file (``_iter_file``), the progress bar advanced per
    stored tensor; with ``mxfp4`` (a GPT-OSS MXFP4 checkpoint) each expert's blocks /
    scales pair comes out as its dense tensor once both are read."""
    for name, tensor in _iter_file(path, lazy=lazy):
        bar.update(1)
        if mxfp4 is None or tensor is None:
            yield name, tensor
            continue
        try:
            yield from mxfp4.add(name, tensor)
        except ValueError as exc:
            raise CheckpointError(f"{exc} (in {os.path.basename(path)})") from None


_pick_group_size = pick_group_size  # the name this module used before


def _rtn_group(name: str, k: int, group_size: int) -> int:
    g = pick_group_size(k, group_size)
    if g != group_size:
        logger.info("minikernels: %s has K=%d, not a multiple of %d; using group_size %d",
                    name, k, group_size, g)
    return g


def quantize_linears(model: CausalLM, group_size: int = 128, symmetric: bool = False,
                     quantize_lm_head: bool = False, scheme: str = "int4") -> None:
    """RTN-quantize the model's dense linear layers in place: ``scheme`` "int4"
    (canonical layout, ``group_size``), "fp8" (128 x 128 blocks) or "int8" (per channel,
    W8A8).

    A tied lm_head gets its own quantized copy; the embedding keeps the dense table.
    """
    for name, lin in model.linear_layers():
        if lin.weight is None or (name == "lm_head" and not quantize_lm_head):
            continue
        if scheme == "fp8":
            lin.quantize_fp8_()
            continue
        if scheme == "int8":
            lin.quantize_int8_()
            continue
        if not _rtn_quantizable(name, lin, "int4"):
            continue
        _rtn_group(name, lin.in_features, group_size)  # logs a fallback
        lin.quantize_int4_(group_size, symmetric)


def _rtn_quantizable(name: str, lin: FusedLinear, scheme: str | None) -> bool:
    """Whether RTN int4 can take this linear: its K must fill whole int32 words (8
    nibbles). Others stay dense, logged (Mamba-1's dt_proj when dt_rank is not a multiple
    of 8)."""
    if scheme != "int4" or lin.in_features % 8 == 0:
        return True
    logger.info("minikernels: %s has K=%d, not a multiple of 8; left dense", name,
                lin.in_features)
    return False


def _streams_rtn(name: str, config: DecoderConfig, quantize_lm_head: bool) -> bool:
    """Whether RTN-on-load quantizes this linear as its tensors arrive."""
    if name != "lm_head":
        return True
    return quantize_lm_head and not config.tie_word_embeddings


# --------------------------------------------------------------------------- loading
def _load_hf(model_dir: str, dtype: str | torch.dtype, device: torch.device,
             quantization: str | None, allow_pickle: bool, group_size: int,
             quantize_lm_head: bool, tp: TensorParallel | None = None,
             lm_head: bool = True) -> CausalLM:
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{model_dir} has no config.json (not a HF model directory)")
    hf = _read_json(cfg_path)
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
    config = DecoderConfig.from_hf(hf, gen)
    if lm_head and is_classifier_architecture(config.hf_architecture):
        raise CheckpointError(
            f"{model_dir} is a sequence classifier ({config.hf_architecture}: a score head, "
            "no lm_head): load it with minikernels.Classifier, or serve it with --task "
            "classify")
    files = checkpoint_files(model_dir, allow_pickle)
    torch_dtype = parse_dtype(dtype, config, device)

    ckpt_quant = _checkpoint_quant(config)
    fp8_ckpt = ckpt_quant.get("fp8") if ckpt_quant is not None else None
    if fp8_ckpt is not None:
        if quantization not in (None, "fp8"):
            raise CheckpointError(f"quantization={quantization!r} but {model_dir} is an fp8 "
                                  "checkpoint (load it with quantization=None or 'fp8')")
    elif quantization == "fp8" and ckpt_quant is not None:
        raise CheckpointError(f"quantization='fp8' but {model_dir} is a "
                              f"{ckpt_quant['method']} " + ("int8" if "int8" in ckpt_quant
                                                             else f"{ckpt_quant.get('bits', 4)}"
                                                             "-bit") + " checkpoint")
    int8_ckpt = ckpt_quant.get("int8") if ckpt_quant is not None else None
    if int8_ckpt is not None and quantization not in (None, "int8"):
        raise CheckpointError(f"quantization={quantization!r} but {model_dir} is an int8 "
                              "checkpoint (load it with quantization=None or 'int8')")
    if quantization == "int8" and ckpt_quant is not None and int8_ckpt is None:
        kind = "fp8" if fp8_ckpt is not None else f"{ckpt_quant.get('bits', 4)}-bit"
        raise CheckpointError(f"quantization='int8' but {model_dir} is a "
                              f"{ckpt_quant['method']} {kind} checkpoint")
    if quantization in ("gptq", "awq") and (ckpt_quant is None or
                                            ckpt_quant["method"] != quantization):
        found = ckpt_quant["method"] if ckpt_quant else "a dense checkpoint"
        raise CheckpointError(f"quantization={quantization!r} but {model_dir} is {found}")

    mx_ckpt = mxfp4_checkpoint(config)
    if quantization in ("mxfp4", "dense") and not mx_ckpt:
        raise CheckpointError(f"quantization={quantization!r} is for GPT-OSS MXFP4 "
                              f"checkpoints (keep their experts MXFP4, or dequantize them), "
                              f"but {model_dir} is not one")
    # RTN on load streams: no dense weight is allocated for the linears it quantizes.
    rtn = quantization in ("int4", "fp8", "int8") and ckpt_quant is None
    model = CausalLM(config, dtype=torch_dtype, device=device,
                     dense=ckpt_quant is None and not rtn,
                     dense_lm_head=lm_head and not (rtn and quantize_lm_head), tp=tp)
    modules = dict(model.named_modules())
    # (a linear built with a dense weight - Zamba2's low-rank adapters - loads dense and
    # is quantized with the rest after loading)
    mxfp4 = None
    if mx_ckpt:   # native MXFP4 experts unless asked to dequantize (dense or RTN)
        mxfp4 = Mxfp4Experts(torch_dtype, device,
                             native=quantization in (None, "mxfp4"))
    stream = {name for name, mod in modules.items() if isinstance(mod, FusedLinear) and rtn
              and mod.weight is None and _streams_rtn(name, config, quantize_lm_head)
              and _rtn_quantizable(name, mod, quantization)}
    groups: dict[str, int] = {}
    params = {n: p for n, p in model.named_parameters()}

    # What must arrive: every dense tensor, every int4 part.
    expected: set[tuple[str, int | None, str]] = set()
    linear_names: set[str] = set()
    for name, mod in modules.items():
        if isinstance(mod, FusedExperts):
            for e in range(mod.num_experts):
                expected.update((name, e, part) for part in mod.parts)
            if mod.w13_bias is not None:                       # (GPT-OSS)
                expected.update((name, None, b) for b in ("w13_bias", "w2_bias"))
            continue
        if isinstance(mod, FusedLinear):
            if name == "lm_head" and (config.tie_word_embeddings or not lm_head):
                continue
            linear_names.add(name)
            for s in range(len(mod.output_sizes)):
                # (a part arrives as a dense weight or as quantized tensors: either counts)
                if mod.weight is not None or name in stream:
                    expected.add((name, s, "weight"))
                else:
                    expected.add((name, s, "qweight"))
                if mod.bias is not None:
                    expected.add((name, s, "bias"))
        elif isinstance(getattr(mod, "sinks", None), torch.nn.Parameter):
            expected.add((name, None, "sinks"))
        elif isinstance(mod, XIELU):
            expected.update((name, None, p) for p, _ in mod.named_parameters())
        elif isinstance(mod, GatedDeltaNet):
            expected.update((name, None, p) for p in ("dt_bias", "A_log"))
        elif isinstance(mod, (Mamba2Mixer, MambaMixer)):
            expected.update((name, None, p) for p in ("dt_bias", "A_log", "D", "x_proj_weight",
                                                      "dt_proj_weight")
                            if isinstance(getattr(mod, p, None), torch.nn.Parameter))
        elif isinstance(mod, SparseMoE) and mod.router_scale is not None:     # (Gemma 4)
            expected.update((name, None, p) for p in ("router_scale", "per_expert_scale"))
        elif isinstance(mod, GroupSigmoidRouter):                            # (Nemotron 3)
            expected.update((name, None, p) for p in ("weight", "e_score_correction_bias"))
        elif isinstance(mod, AltUp):
            expected.add((name, None, "correct_output_scale"))    # (Gemma 3n)
        elif isinstance(mod, DecoderLayer) and mod.layer_scalar is not None:
            expected.add((name, None, "layer_scalar"))          # (Gemma 4)
        elif isinstance(getattr(mod, "expert_bias", None), torch.nn.Parameter):
            expected.add((name, None, "expert_bias"))           # LFM2-MoE's router bias
        elif name and hasattr(mod, "weight") and isinstance(getattr(mod, "weight"),
                                                            torch.nn.Parameter):
            expected.add((name, None, "weight"))
            if isinstance(getattr(mod, "bias", None), torch.nn.Parameter):   # LayerNorm
                expected.add((name, None, "bias"))

    pending_q: dict[tuple[str, int], dict[str, Tensor]] = {}
    # where each int4 part's tensors came from: (the config that reads them - a module's
    # own bits / group size under GPTQModel's dynamic -, the checkpoint module's name)
    pending_q_from: dict[tuple, tuple[DecoderConfig, str]] = {}
    part_source: dict[tuple[str, int], tuple[str, str]] = {}   # dense / quantized, where
    rules = _ModuleRules(config, ckpt_quant)
    pending_fp8: dict[tuple[str, int], dict[str, Tensor]] = {}
    pending_int8: dict[tuple[str, int], dict[str, Tensor]] = {}
    pending_int8_experts: dict[tuple[str, int, str], dict[str, Tensor]] = {}
    pending_fp8_experts: dict[tuple[str, int, str], dict[str, Tensor]] = {}
    pending_experts: dict[tuple[str, int, str], dict[str, Tensor]] = {}
    seen: set[tuple[str, int | None, str]] = set()
    conv_parts: dict[str, dict[int, Tensor]] = {}   # OLMo Hybrid's split convs so far
    shared_copies: dict[tuple[str, int | None, str], Tensor] = {}    # Zamba2's shared blocks
    unexpected: list[str] = []
    non_text = 0
    total = _count_tensors(files)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"Loading {os.path.basename(os.path.normpath(model_dir))}",
               unit="tensor", disable=os.environ.get("MINIKERNELS_NO_PROGRESS") == "1")
    try:
        for path in files:
            for hf_name, tensor in _iter_checkpoint(path, tp is not None, mxfp4, bar):
                if tensor is None or is_non_text_tensor(hf_name):
                    non_text += 1
                    continue
                if isinstance(tensor, Mxfp4Stack):   # native MXFP4 experts (GPT-OSS)
                    got_mx = _load_mxfp4_experts(modules, hf_name, tensor, tp,
                                                 f"{hf_name}_blocks / _scales (in "
                                                 f"{os.path.basename(path)})")
                    if got_mx is None:
                        unexpected.append(hf_name + "_blocks")
                    else:
                        seen.update(got_mx)
                    continue
                # the quantization_config's word on this checkpoint module: left dense
                # (None: modules_to_not_convert, dynamic "-:", ignore, ...) or its own
                # bits / group size (GPTQModel's dynamic "+:": a config of its own)
                stored = hf_name
                ckpt_module = hf_name.rsplit(".", 1)[0]
                rule = rules.get(ckpt_module)
                tcfg = rules.config_for(rule[0])
                for hf_name, tensor in _unfuse(_family_name(hf_name, config), tensor,
                                               tcfg):
                    target = map_name(hf_name)
                    if target is None:
                        if not _IGNORED.search(hf_name):
                            unexpected.append(hf_name)
                        continue
                    mod_name, shard, kind = target
                    if kind == "weight_shape":    # compressed-tensors' [N, K] record
                        continue
                    if mod_name == "lm_head" and (config.tie_word_embeddings or not lm_head):
                        continue  # tied: lm_head is the embedding table
                    mod = modules.get(mod_name)
                    if mod is None:
                        unexpected.append(hf_name)
                        continue
                    where = f"{hf_name} (in {os.path.basename(path)})" \
                        if hf_name == stored else \
                        f"{hf_name} (stored as {stored} in {os.path.basename(path)})"
                    if mod_name.startswith("shared_blocks."):
                        # a shared block stored under several hybrid layers: one copy loads,
                        # the others must equal it (weights that differ are not shared)
                        key = (mod_name, shard, kind)
                        tensor = _materialized(tensor)
                        first = shared_copies.setdefault(key, tensor)
                        if first is not tensor:
                            if not torch.equal(first, tensor):
                                raise CheckpointError(
                                    f"{where}: differs from another copy of the same shared "
                                    f"block ({mod_name}); Zamba2's hybrid layers share their "
                                    "blocks in turn, so the copies must be equal")
                            continue
                    if rules.int4 and rule[0] is None and (kind in _QUANT_TENSORS or
                                                           ":" in kind):
                        raise CheckpointError(
                            f"{where} is quantized, but {rule[1]} says the checkpoint left "
                            f"{ckpt_module} dense")
                    if tp is not None:   # read only this rank's rows / columns
                        try:
                            tensor = shard_tensor(tcfg, tp, mod_name, shard, kind, tensor)
                        except ValueError as exc:
                            raise CheckpointError(f"{where}: {exc}") from None
                    if kind in ("k_scale", "v_scale"):
                        _load_kv_scale(getattr(mod, kind), tensor, where)
                        continue
                    if tensor.dtype == torch.float8_e4m3fn and (fp8_ckpt is None or not
                                                                isinstance(mod, (FusedLinear,
                                                                                 FusedExperts))):
                        raise CheckpointError(
                            f"{where} is an fp8 tensor but " + (
                                "config.json has no fp8 quantization_config" if fp8_ckpt is None
                                else "this layer loads dense weights only"))
                    if isinstance(mod, FusedExperts) and fp8_ckpt is not None and (
                            ":" in kind or tensor.dtype == torch.float8_e4m3fn):
                        if shard is None:
                            raise CheckpointError(f"{where}: stacked fp8 experts are not "
                                                  "supported (per-expert tensors are)")
                        part, tkind = kind.split(":") if ":" in kind else (kind, "weight")
                        if tkind in _FP8_ACTIVATION_SCALES:
                            continue    # a static activation scale: activations stay 16-bit
                        if not 0 <= shard < mod.num_experts:
                            raise CheckpointError(f"{where}: expert {shard} out of range "
                                                  f"(num_experts {mod.num_experts})")
                        got = pending_fp8_experts.setdefault((mod_name, shard, part), {})
                        got[tkind] = tensor.to(device)
                        if "weight" in got and fp8_ckpt["scale"] in got:
                            del pending_fp8_experts[(mod_name, shard, part)]
                            try:
                                mod.set_fp8_part_(shard, part, fp8_from_checkpoint(
                                    got["weight"], got[fp8_ckpt["scale"]], fp8_ckpt),
                                    fp8_ckpt["block_size"])
                            except ValueError as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                            seen.add((mod_name, shard, part))
                        continue
                    if isinstance(mod, FusedExperts) and int8_ckpt is not None and (
                            ":" in kind or tensor.dtype == torch.int8):
                        if shard is None:
                            raise CheckpointError(f"{where}: stacked int8 experts are not "
                                                  "supported (per-expert tensors are)")
                        part, tkind = kind.split(":") if ":" in kind else (kind, "weight")
                        if tkind in ("input_scale", "input_zero_point"):
                            continue    # static activation scale: the experts run W8A16
                        if not 0 <= shard < mod.num_experts:
                            raise CheckpointError(f"{where}: expert {shard} out of range "
                                                  f"(num_experts {mod.num_experts})")
                        got = pending_int8_experts.setdefault((mod_name, shard, part), {})
                        got[tkind] = tensor.to(device)
                        if "weight" in got and "weight_scale" in got:
                            del pending_int8_experts[(mod_name, shard, part)]
                            if int8_ckpt["strategy"] == "group":
                                raise CheckpointError(f"{where}: group-wise int8 experts are "
                                                      "not supported (per channel or tensor)")
                            from ..quant.int8 import int8_from_checkpoint
                            try:
                                mod.set_int8_part_(shard, part, int8_from_checkpoint(
                                    got["weight"], got["weight_scale"]))
                            except ValueError as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                            seen.add((mod_name, shard, part))
                        continue
                    if isinstance(mod, FusedExperts) and ":" in kind:   # int4 checkpoint
                        if ckpt_quant is None:
                            raise CheckpointError(f"{where} is a quantized tensor but "
                                                  "config.json has no quantization_config")
                        part, tkind = kind.split(":")
                        pending_experts.setdefault((mod_name, shard, part), {})[tkind] = \
                            tensor.to(device)
                        pending_q_from[(mod_name, shard, part)] = (tcfg, ckpt_module)
                        if tkind in _PRIMARY_INT4:
                            seen.add((mod_name, shard, part))
                        continue
                    if isinstance(mod, FusedExperts):
                        if mxfp4 is not None and mxfp4.native and \
                                kind not in EXPERT_BIASES:
                            raise CheckpointError(
                                f"{where}: a dense expert weight in an MXFP4 checkpoint "
                                "whose experts load MXFP4 (load it with "
                                "quantization='dense' to dequantize the MXFP4 ones)")
                        # left dense, or an MXFP4 checkpoint's experts asked dense
                        if mod.is_int4 and (ckpt_quant is not None or
                                            (mx_ckpt and quantization == "dense")):
                            try:
                                mod.make_dense_()
                            except ValueError as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                        fp8 = quantization == "fp8" and mod.w13 is None
                        int8 = quantization == "int8" and mod.w13 is None
                        g = _expert_group(config, mod, group_size) \
                            if mod.is_int4 and not fp8 and not int8 else None
                        seen.update(_load_experts(mod, mod_name, shard, kind, tensor, where,
                                                  g, fp8=fp8, int8=int8))
                        continue
                    if isinstance(mod, FusedLinear) and fp8_ckpt is not None and (
                            kind in _FP8_SCALES + _FP8_ACTIVATION_SCALES or (
                                kind == "weight" and tensor.dtype == torch.float8_e4m3fn)):
                        if kind in _FP8_ACTIVATION_SCALES:
                            continue    # a static activation scale: activations stay 16-bit
                        _claim(part_source, mod_name, shard, "quantized", where)
                        got = pending_fp8.setdefault((mod_name, shard), {})
                        got[kind] = tensor.to(device)
                        if "weight" in got and fp8_ckpt["scale"] in got:
                            del pending_fp8[(mod_name, shard)]
                            try:
                                mod.set_fp8_shard(shard, fp8_from_checkpoint(
                                    got["weight"], got[fp8_ckpt["scale"]], fp8_ckpt))
                            except ValueError as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                            seen.add((mod_name, shard, "qweight"))
                        continue
                    if isinstance(mod, FusedLinear) and int8_ckpt is not None and (
                            kind in _INT8_SCALES or (kind == "weight" and
                                                     tensor.dtype == torch.int8)):
                        if kind in ("input_scale", "input_zero_point"):
                            continue    # static activation scale: quantized per token instead
                        _claim(part_source, mod_name, shard, "quantized", where)
                        got = pending_int8.setdefault((mod_name, shard), {})
                        got[kind] = tensor.to(device)
                        if "weight" in got and "weight_scale" in got:
                            del pending_int8[(mod_name, shard)]
                            from ..quant.int8 import (int8_from_checkpoint,
                                                      int8_wo_from_checkpoint)
                            try:
                                if int8_ckpt["activations"] is None:    # W8A16
                                    mod.set_int4_shard(shard, int8_wo_from_checkpoint(
                                        got["weight"], got["weight_scale"]).to(
                                            dtype=_half_dtype(torch_dtype)))
                                else:
                                    mod.set_int8_shard(shard, int8_from_checkpoint(
                                        got["weight"], got["weight_scale"]))
                            except ValueError as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                            seen.add((mod_name, shard, "qweight"))
                        continue
                    if isinstance(mod, FusedLinear) and tensor.dtype == torch.int8:
                        raise CheckpointError(f"{where} is an int8 tensor but config.json has "
                                              "no int8 W8A8 quantization_config")
                    if isinstance(mod, FusedLinear):
                        if kind in _QUANT_TENSORS:
                            if ckpt_quant is None:
                                raise CheckpointError(f"{where} is a quantized tensor but "
                                                      "config.json has no quantization_config")
                            _claim(part_source, mod_name, shard, "quantized", where)
                            pending_q.setdefault((mod_name, shard), {})[kind] = tensor.to(device)
                            pending_q_from[(mod_name, shard)] = (tcfg, ckpt_module)
                            seen.add((mod_name, shard,
                                      "qweight" if kind in _PRIMARY_INT4 else kind))
                            continue
                        if kind == "weight" and mod_name in stream:
                            # RTN on load: quantize this part on the device, drop the dense copy.
                            g = groups.get(mod_name)
                            if quantization in ("fp8", "int8"):
                                g = 0    # (fp8 blocks / int8 channels need no group size)
                            if g is None and tp is not None and \
                                    mod_name.endswith(("o_proj", "down_proj")):
                                k_full = mod.in_features * tp.size \
                                    if mod_name.endswith("o_proj") \
                                    else mlp_intermediate_size(config, mod_name)[0]
                                g = groups[mod_name] = row_parallel_group_size(
                                    mod_name, k_full, mod.in_features, group_size)
                            if g is None:
                                g = groups[mod_name] = _rtn_group(mod_name, mod.in_features,
                                                                  group_size)
                            dense = tensor.to(device=device, dtype=torch_dtype)
                            del tensor
                            try:
                                if quantization == "fp8":
                                    mod.quantize_fp8_shard_(shard, dense)
                                elif quantization == "int8":
                                    mod.quantize_int8_shard_(shard, dense)
                                else:
                                    mod.quantize_shard_(shard, dense, g)
                            except ValueError as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                            del dense
                            seen.add((mod_name, shard, kind))
                            continue
                        if kind == "weight" and mod.weight is None:
                            # A part the quantizer left dense (modules_to_not_convert, a
                            # narrow in_proj_b / in_proj_a beside int4 in_proj_qkv / z, or
                            # a whole layer): its rows run dense beside the quantized parts
                            # (every part dense: a dense layer).
                            _claim(part_source, mod_name, shard, "dense", where)
                            try:
                                mod.set_dense_shard(shard, tensor.to(device=device,
                                                                     dtype=torch_dtype))
                            except (ValueError, IndexError) as exc:
                                raise CheckpointError(f"{where}: {exc}") from None
                            seen.add((mod_name, shard, kind))
                            continue
                        if kind == "bias" and mod.bias is None:
                            # GPTQ exporters save a (zero) bias for every quantized layer.
                            if not bool(tensor.any()):
                                continue
                            mod.bias = torch.nn.Parameter(torch.zeros(
                                mod.out_features, dtype=torch_dtype, device=device),
                                requires_grad=False)
                        try:
                            mod.load_shard(shard, kind, tensor.to(device=device, dtype=torch_dtype))
                        except ValueError as exc:
                            raise CheckpointError(f"{where}: {exc}") from None
                        seen.add((mod_name, shard, kind))
                    else:
                        param = params.get(f"{mod_name}.{kind}")
                        if param is None:
                            unexpected.append(hf_name)
                            continue
                        if shard is not None:    # OLMo Hybrid: q / k / v convs, one each
                            got = conv_parts.setdefault(mod_name, {})
                            got[shard] = tensor
                            if len(got) == 3:    # their channels concatenated, in order
                                _load_conv_parts(param, [got[i] for i in range(3)], where,
                                                 torch_dtype, lambda joined: joined
                                                 if tp is None else shard_tensor(
                                                     config, tp, mod_name, None, kind,
                                                     joined))
                                seen.add((mod_name, None, kind))
                            continue
                        if tuple(tensor.shape) != tuple(param.shape):
                            raise CheckpointError(f"{where}: shape mismatch: expected "
                                                  f"{list(param.shape)}, got {list(tensor.shape)}")
                        with torch.no_grad():
                            param.copy_(tensor.to(device=device, dtype=torch_dtype))
                        seen.add((mod_name, None, kind))
    finally:
        bar.close()

    if mxfp4 is not None:
        try:
            mxfp4.check_complete()
        except ValueError as exc:
            raise CheckpointError(f"{model_dir}: {exc}") from None
    for (mod_name, e, part), got in sorted(pending_fp8_experts.items()):
        raise CheckpointError(f"model.{mod_name}.{e}.{part}: fp8 expert incomplete: has "
                              f"{sorted(got)}, needs ['weight', {fp8_ckpt['scale']!r}]")
    for (mod_name, shard), got in sorted(pending_fp8.items()):
        need = ["weight (float8_e4m3fn)", fp8_ckpt["scale"]]
        raise CheckpointError(f"{checkpoint_name(mod_name, shard, '*', config)}: fp8 layer "
                              f"incomplete: has "
                              f"{sorted(got)}, needs {need}")
    for (mod_name, e, part), got in sorted(pending_int8_experts.items()):
        raise CheckpointError(f"model.{mod_name}.{e}.{part}: int8 expert incomplete: has "
                              f"{sorted(got)}, needs ['weight (int8)', 'weight_scale']")
    for (mod_name, shard), got in sorted(pending_int8.items()):
        raise CheckpointError(f"{checkpoint_name(mod_name, shard, '*', config)}: int8 layer "
                              f"incomplete: has "
                              f"{sorted(got)}, needs ['weight (int8)', 'weight_scale']")
    # a linear's part counts as loaded whether it came dense or quantized
    for mod_name, shard, kind in list(seen):
        if mod_name in linear_names and kind in ("weight", "qweight"):
            seen.update({(mod_name, shard, "weight"), (mod_name, shard, "qweight")})
    missing = sorted(expected - seen, key=str)
    if missing:
        names = list(dict.fromkeys(_missing_name(config, rules, *m) for m in missing))
        more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
        hint = ""
        if any(k == "qweight" for _, _, k in missing) and rules.int4:
            hint = (" (each quantized linear needs its "
                    + ("weight_packed / weight_scale" if rules.method == "compressed-tensors"
                       else "qweight / qzeros / scales")
                    + ", or a dense .weight where the quantizer left it unquantized)")
        raise CheckpointError(f"{model_dir}: missing tensors: {names[:10]}{more}{hint}")
    inside = [n for n in unexpected if _inside_a_layer(n, config.num_layers)]
    if inside:      # part of a layer this decoder runs: ignoring it would change the math
        more = f" (and {len(inside) - 10} more)" if len(inside) > 10 else ""
        raise CheckpointError(f"{model_dir}: tensors of the decoder layers this "
                              f"{config.hf_architecture or config.architecture} decoder "
                              f"has no place for: {inside[:10]}{more}")
    if unexpected:
        logger.warning("minikernels: ignored %d unexpected tensors in %s: %s",
                       len(unexpected), model_dir, unexpected[:5])
    if non_text:
        logger.info("minikernels: %s: serving the text decoder of %s; %d vision tensors "
                    "not loaded (text-only prompts)", model_dir, config.hf_architecture,
                    non_text)

    if pending_q:
        _import_int4(model, modules, pending_q, {
            key: (rules.quant_for(cfg), module) for key, (cfg, module) in
            pending_q_from.items() if key in pending_q}, torch_dtype)
    for (mod_name, e, part), t in sorted(pending_experts.items()):
        cfg, where = pending_q_from[(mod_name, e, part)]
        quant = rules.quant_for(cfg)
        w = _int4_weight(where, t, quant, torch_dtype)
        if quant.get("bits", 4) == 8:
            raise CheckpointError(f"{where}: 8-bit weight-only experts (GPTQ / "
                                  "compressed-tensors W8A16) are not supported")
        if w.perm is not None:
            raise CheckpointError(f"{where}: act-order (desc_act) int4 experts are not "
                                  "supported (the fused experts read K in order)")
        try:
            modules[mod_name].set_int4_part_(e, part, w, int(quant["group_size"]))
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if quantization in ("int4", "fp8", "int8") or (quantize_lm_head and
                                                   ckpt_quant is not None):
        scheme = "fp8" if quantization == "fp8" or fp8_ckpt is not None else \
            "int8" if quantization == "int8" or int8_ckpt is not None else "int4"
        quantize_linears(model, group_size, quantize_lm_head=quantize_lm_head, scheme=scheme)
    if int8_ckpt is not None and not int8_ckpt.get("activation_symmetric", True):
        set_int8_activations(model, symmetric=False)     # a zero point per token
    elif (quantization == "int8" and int8_ckpt is None) or (
            int8_ckpt is not None and int8_ckpt["activations"] is not None):
        set_int8_expert_activations(model)               # int8 experts run W8A8 too
    return model


def _load_conv_parts(param: Tensor, parts: list[Tensor], where: str,
                     dtype: torch.dtype, cut: Callable[[Tensor], Tensor]) -> None:
    """OLMo Hybrid's conv kernel stored as q / k / v pieces ([channels, 1, W] each): their
    channels concatenated in that order are the Gated DeltaNet's one conv1d weight
    (transformers joins them so on load, whatever the pieces' sizes; tensor parallel
    ``cut`` then takes this rank's channels of the joined kernel)."""
    joined = cut(torch.cat([_materialized(t) for t in parts]))
    if tuple(joined.shape) != tuple(param.shape):
        raise CheckpointError(f"{where}: the q / k / v conv pieces join to "
                              f"{list(joined.shape)}, expected {list(param.shape)}")
    with torch.no_grad():
        param.copy_(joined.to(device=param.device, dtype=dtype))


#: the experts' biases (GPT-OSS: w13_bias [E, 2I] gate then up, w2_bias [E, H])
EXPERT_BIASES = ("w13_bias", "w2_bias")


def check_experts(mod: FusedExperts, expert: int | None, kind: str, tensor: Tensor,
                  where: str) -> None:
    """CheckpointError unless ``tensor`` is one expert's projection in range and of its
    part's shape, or transformers 5's stacked tensor of every expert ([E, 2I, H] /
    [E, H, I]; non-gated experts' up_proj [E, I, H]); meta tensors are checked too
    (nothing is read)."""
    if kind in EXPERT_BIASES:                 # GPT-OSS's [E, 2I] / [E, H]
        bias = getattr(mod, kind)
        if bias is None:
            raise CheckpointError(f"{where}: these experts have no biases")
        if expert is not None or tuple(tensor.shape) != tuple(bias.shape):
            raise CheckpointError(f"{where}: shape mismatch: expected {list(bias.shape)}, "
                                  f"got {list(tensor.shape)}")
        return
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else (kind,)
    if any(p not in mod.parts for p in parts):
        raise CheckpointError(f"{where}: these experts hold {' / '.join(mod.parts)} "
                              f"({'' if mod.gated else 'non-'}gated), not {kind}")
    if expert is None:
        rows = mod.part_shape(parts[0])
        expected = (mod.num_experts, rows[0] * len(parts), rows[1])
    else:
        if not 0 <= expert < mod.num_experts:
            raise CheckpointError(f"{where}: expert {expert} out of range (num_experts "
                                  f"{mod.num_experts})")
        expected = mod.part_shape(kind)
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"{where}: shape mismatch: expected {list(expected)}, got "
                              f"{list(tensor.shape)}")


def _load_experts(mod: FusedExperts, mod_name: str, expert: int | None, kind: str,
                  tensor: Tensor, where: str, group: int | None = None, fp8: bool = False,
                  int8: bool = False) -> list[tuple[str, int, str]]:
    """One expert's projection (or transformers 5's stacked gate_up_proj / down_proj of
    every expert) into w13 / w2, or RTN-quantized into the int4 buffers with ``group`` or
    into the fp8 ones (``fp8``) or the int8 ones (``int8``); the (module, expert, part)
    keys it filled."""
    check_experts(mod, expert, kind, tensor, where)
    if kind in EXPERT_BIASES:     # (dense whatever the experts are)
        bias = getattr(mod, kind)
        with torch.no_grad():
            bias.copy_(tensor.to(device=bias.device, dtype=bias.dtype))
        return [(mod_name, None, kind)]
    if expert is None:   # stacked: [E, 2I, H], [E, H, I] (non-gated up_proj: [E, I, H])
        parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else (kind,)
        experts: Any = range(mod.num_experts)
    else:
        parts, experts = (kind,), (expert,)
    with torch.no_grad():
        for e in experts:
            whole = tensor if expert is not None else tensor[e]
            for i, p in enumerate(parts):
                piece = whole if len(parts) == 1 else whole[i * mod.inter:(i + 1) * mod.inter]
                if fp8:
                    mod.quantize_fp8_part_(e, p, piece.to(mod.dtype))
                elif int8:
                    mod.quantize_int8_part_(e, p, piece.to(mod.dtype))
                elif group is None:
                    target = mod.part(e, p)
                    target.copy_(piece.to(device=target.device, dtype=target.dtype))
                else:
                    mod.quantize_part_(e, p, piece.to(mod.dtype), group)
    return [(mod_name, e, p) for e in experts for p in parts]


_MXFP4_EXPERTS_RE = re.compile(r"^(?:model\.)?(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _load_mxfp4_experts(modules: dict[str, torch.nn.Module], name: str, stack: Mxfp4Stack,
                        tp: TensorParallel | None, where: str
                        ) -> list[tuple[str, int, str]] | None:
    """A GPT-OSS MXFP4 stack (``...mlp.experts.gate_up_proj`` / ``down_proj`` blocks and
    scales) kept MXFP4 in its FusedExperts: w13's rows de-interleaved, this rank's slice
    under tensor parallel (models/gpt_oss.py ``shard_mxfp4``); the (module, expert, part)
    keys it filled, None when no experts module takes it."""
    m = _MXFP4_EXPERTS_RE.match(name)
    mod = modules.get(m.group(1)) if m is not None else None
    if not isinstance(mod, FusedExperts):
        return None
    proj = m.group(2)
    try:
        stack = mxfp4_native(proj, stack)
        if tp is not None and tp.size > 1:
            stack = shard_mxfp4(proj, stack, tp.rank, tp.size)
        mod.set_mxfp4_("w13" if proj == "gate_up_proj" else "w2", *stack)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
    return [(m.group(1), e, p) for e in range(mod.num_experts) for p in parts]


def _expert_group(config: DecoderConfig, mod: FusedExperts, group_size: int) -> int:
    """RTN group of the experts: one size dividing both K = H (w13) and K = I (w2); the
    unsharded experts' when it divides this rank's I slice (then a rank's int4 experts
    equal slices of the unsharded ones), else this slice's own."""
    g = pick_group_size(math.gcd(config.hidden_size, config.moe_intermediate_size),
                        group_size)
    if g != -1 and mod.inter % g == 0:
        return g
    return pick_group_size(math.gcd(config.hidden_size, mod.inter), group_size)


class _ModuleRules:
    """The quantization_config's word on each checkpoint module of a GPTQ / AWQ /
    compressed-tensors (pack-quantized) checkpoint (:func:`minikernels.quant.checkpoints.
    module_rule`, cached by module name): left dense (modules_to_not_convert, GPTQModel's
    dynamic "-:", compressed-tensors' ignore / untargeted) or quantized, with GPTQModel's
    per-module bits / group size read through a config of their own. Other checkpoints
    (dense, fp8, int8 W8A8): every module as the tensors say."""

    def __init__(self, config: DecoderConfig, ckpt_quant: dict[str, Any] | None) -> None:
        self.config = config
        self.qc = config.quantization_config or {}
        self.int4 = ckpt_quant is not None and "fp8" not in ckpt_quant and \
            "int8" not in ckpt_quant
        self.method = ckpt_quant["method"] if ckpt_quant else None
        self._rules: dict[str, tuple[dict[str, Any] | None, str]] = {}
        self._configs: dict[tuple, DecoderConfig] = {}
        self._quants: dict[int, dict[str, Any]] = {}

    def get(self, module: str) -> tuple[dict[str, Any] | None, str]:
        """(None, the config entry that leaves ``module`` dense) or (its overrides, "")."""
        if not self.int4:
            return {}, ""
        rule = self._rules.get(module)
        if rule is None:
            from ..quant.checkpoints import module_rule

            rule = self._rules[module] = _parse_scheme(lambda qc: module_rule(qc, module),
                                                       self.qc)
        return rule

    def config_for(self, overrides: dict[str, Any] | None) -> DecoderConfig:
        """The model config, or a copy whose quantization_config carries a module's own
        ``bits`` / ``group_size`` (GPTQModel's dynamic), which the int4 import and the
        tensor-parallel cuts then read."""
        over = {k: v for k, v in (overrides or {}).items() if k in ("bits", "group_size")}
        if not over or all(self.qc.get(k) == v for k, v in over.items()):
            return self.config
        key = tuple(sorted(over.items()))
        if key not in self._configs:
            qc = {k: v for k, v in self.qc.items() if k != "dynamic"}
            qc.update(over)
            cfg = dataclasses.replace(self.config, quantization_config=qc)
            _checkpoint_quant(cfg)        # (bits / group size the import supports)
            self._configs[key] = cfg
        return self._configs[key]

    def quant_for(self, cfg: DecoderConfig) -> dict[str, Any]:
        """:func:`_checkpoint_quant` of a config :meth:`config_for` returned."""
        if id(cfg) not in self._quants:
            self._quants[id(cfg)] = _checkpoint_quant(cfg) or {}
        return self._quants[id(cfg)]


def _claim(sources: dict[tuple[str, int], tuple[str, str]], module: str, shard: int,
           how: str, where: str) -> None:
    """Record that part ``shard`` of linear ``module`` arrives ``how`` ("dense" or
    "quantized") from tensor ``where``; CheckpointError naming both tensors when the
    checkpoint holds the part both ways."""
    prev = sources.setdefault((module, shard), (how, where))
    if prev[0] != how:
        raise CheckpointError(f"{where} and {prev[1]} are the same part of {module}, one "
                              "dense and one quantized: a checkpoint holds each linear "
                              "either way, not both")


def checkpoint_name(module: str, shard: int | None, kind: str,
                    config: DecoderConfig | None = None) -> str:
    """The checkpoint tensor name that loads into part ``shard`` / ``kind`` of our
    ``module`` (the inverse of :func:`map_name` after the family's renames): e.g.
    ``model.layers.0.linear_attn.in_proj_z.weight`` for (layers.0.linear_attn.in_proj, 1,
    weight), ``backbone.layers.0.mixer.in_proj.qweight`` for a Mamba's. Without a
    ``config`` (or where the family's names are not inverted) the decoder's own name."""
    name = _decoder_name(module, shard, kind, config)
    if config is None:
        return name
    theirs = _family_checkpoint_name(name, config)
    if theirs == name:
        return name
    probe = theirs.rsplit(".", 1)[0] + ".weight"
    renamed = _family_name(probe, config)
    target = map_name(renamed)
    want = map_name(name.rsplit(".", 1)[0] + ".weight")
    if target == want or _FUSED_RE.match(renamed):   # (or stored fused: both parts there)
        return theirs
    return name


def _family_checkpoint_name(name: str, config: DecoderConfig) -> str:
    """The decoder-side name ``name`` under the family's checkpoint names (the inverse of
    :func:`_family_name` for the families whose renames are tables; others unchanged)."""
    arch = config.architecture
    if arch in ("granite_hybrid", "granitemoeshared"):     # the fused shared MLP
        mlp = ".mlp.shared_expert." if config.num_experts else ".mlp."
        for part in ("gate_proj", "up_proj"):
            name = name.replace(f"{mlp}{part}.", ".shared_mlp.input_linear.")
        return name.replace(f"{mlp}down_proj.", ".shared_mlp.output_linear.")
    if arch == "gpt_oss":                                  # its router
        return name.replace(".mlp.gate.", ".mlp.router.")
    if arch in ("mamba", "falcon_mamba"):
        tables = (_MAMBA1_PREFIXES, _MAMBA1_PARTS)
    elif arch in _FAMILY_NAMES:
        tables = _FAMILY_NAMES[arch]
    else:
        return name
    prefixes, parts = tables
    for theirs, ours in parts:
        if ours in name:
            name = name.replace(ours, theirs)
    for theirs, ours in prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def _decoder_name(module: str, shard: int | None, kind: str,
                  config: DecoderConfig | None) -> str:
    """The checkpoint name in the decoder's own vocabulary (Llama / Qwen names, before a
    family's renames) of part ``shard`` / ``kind`` of ``module``."""
    if config is not None and config.architecture == "gpt_oss" and \
            module.endswith(".mlp.experts") and kind in ("gate_proj", "up_proj", "down_proj"):
        # (GPT-OSS stores every expert stacked: gate_up_proj, or its MXFP4 blocks / scales)
        proj = "down_proj" if kind == "down_proj" else "gate_up_proj"
        mx = str((config.quantization_config or {}).get("quant_method", "")) == "mxfp4"
        return f"model.{module}.{proj}" + ("_blocks" if mx else "")
    if config is not None and shard is not None and module.endswith(".linear_attn.in_proj"):
        parts = _GDN_SPLIT_PARTS if config.gdn_separate_projections else _GDN_IN_PARTS
        back = {v: k for k, v in parts.items()}
        if shard in back:
            return f"model.{module[:-len('in_proj')]}{back[shard]}.{kind}"
    if config is not None and module.endswith(".mamba") and kind == "dt_bias":
        layer = re.match(r"^layers\.(\d+)\.", module)
        if layer and int(layer.group(1)) < config.num_layers and \
                config.mixer(int(layer.group(1))) == "mamba":    # Mamba-1: dt_proj's bias
            return f"model.{module}.dt_proj.bias"
    if kind in ("k_scale", "v_scale") and module.endswith(".self_attn.attn"):
        return f"model.{module[:-len('.attn')]}.{kind}"
    return _hf_name(module, shard, kind)


def _missing_name(config: DecoderConfig, rules: _ModuleRules, module: str,
                  shard: int | None, kind: str) -> str:
    """The checkpoint tensor a missing (module, part, kind) should have come from: a
    quantized linear part ("qweight") as its quantized tensor (``qweight``, or
    ``weight_packed``), or as ``weight`` where the quantization_config leaves that module
    dense (or the checkpoint is fp8 / int8, whose quantized weights are ``weight``)."""
    if module.endswith(".experts") and shard is not None and rules.int4:
        base = checkpoint_name(module, shard, kind, config).rsplit(".", 1)[0]  # one expert's
        kind = "qweight"
    elif kind != "qweight":
        return checkpoint_name(module, shard, kind, config)
    else:
        base = checkpoint_name(module, shard, "weight", config).rsplit(".", 1)[0]
    if not rules.int4 or rules.get(base)[0] is None:
        return f"{base}.weight"
    return f"{base}.{'weight_packed' if rules.method == 'compressed-tensors' else 'qweight'}"


def _hf_name(module: str, shard: int | None, kind: str) -> str:
    if module.endswith(".mlp.experts") and kind in EXPERT_BIASES:   # (GPT-OSS)
        return f"model.{module}." + ("gate_up_proj_bias" if kind == "w13_bias" else
                                     "down_proj_bias")
    if kind == "sinks":
        return f"model.{module[:-len('.attn')]}.sinks"
    if module.endswith(".mlp.act_fn"):
        return f"model.{module}.{kind}"
    if module.endswith(".mlp.experts"):
        return f"model.{module}.{shard}.{kind}.weight"
    if module in ("embed_tokens", "norm"):
        return f"model.{module}.{kind}"
    if module == "lm_head":
        return f"lm_head.{kind}"
    back = {v: k for k, v in _SHARDS.items()}
    for fused in ("qkv_proj", "gate_up_proj", "o_proj", "down_proj"):
        if module.endswith("." + fused):
            return f"model.{module[:-len(fused)]}{back[(fused, shard)]}.{kind}"
    return f"model.{module}.{kind}"


def _half_dtype(torch_dtype: torch.dtype) -> torch.dtype:
    """The scales' dtype of weight-only quantized parts: the model's half dtype, else fp16."""
    return torch_dtype if torch_dtype in (torch.float16, torch.bfloat16) else torch.float16


def _int4_weight(name: str, t: dict[str, Tensor], quant: dict[str, Any],
                 torch_dtype: torch.dtype) -> Any:
    """One layer's GPTQ / AWQ / compressed-tensors tensors -> an Int4Weight (canonical
    layout; scales in the model's half dtype, else fp16), or an Int8WoWeight for 8-bit
    GPTQ / compressed-tensors W8A16."""
    from .. import quant as mkq

    scale_dtype = torch_dtype if torch_dtype in (torch.float16, torch.bfloat16) \
        else torch.float16
    ct = quant["method"] == "compressed-tensors"
    need = ("weight_packed", "weight_scale") if ct else ("qweight", "qzeros", "scales")
    missing = [k for k in need if k not in t]
    if missing:
        raise CheckpointError(f"missing tensors: {[f'{name}.{k}' for k in missing]} (the "
                              f"checkpoint has {sorted(t)} of {name})")
    try:
        if ct:
            w = mkq.from_compressed_tensors(t["weight_packed"], t["weight_scale"],
                                            t.get("weight_g_idx"), bits=quant.get("bits", 4))
        elif quant["method"] == "gptq":
            w = mkq.from_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                              checkpoint_format=quant["checkpoint_format"],
                              bits=quant.get("bits", 4))
        else:
            w = mkq.from_awq(t["qweight"], t["qzeros"], t["scales"])
        return w.to(dtype=scale_dtype)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: {exc}") from None


def _import_int4(model: CausalLM, modules: dict[str, Any],
                 pending: dict[tuple[str, int], dict[str, Tensor]],
                 sources: dict[tuple[str, int], tuple[dict[str, Any], str]],
                 torch_dtype: torch.dtype) -> None:
    """Turn GPTQ / AWQ / compressed-tensors tensors into int4 parts of the fused layers.
    ``sources``: each part's (quantization settings - the module's own under GPTQModel's
    dynamic -, checkpoint module name)."""
    for (mod_name, shard), t in sorted(pending.items()):
        quant, name = sources[(mod_name, shard)]
        w = _int4_weight(name, t, quant, torch_dtype)
        try:
            modules[mod_name].set_int4_shard(shard, w)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{name}: {exc}") from None
    for mod_name, mod in modules.items():
        if isinstance(mod, FusedLinear) and not mod.is_ready:
            raise CheckpointError(f"{mod_name}: parts incomplete (a fused linear needs every "
                                  f"part, dense or quantized)")


def _init_dummy(model: CausalLM, seed: int, group_size: int | None = None,
                symmetric: bool = False, scheme: str = "int4") -> None:
    """Deterministic random weights (by seed, per device): N(0, 0.02) matrices, unit norms
    (a Gemma norm's stored weight 0: its scale is 1 + weight).

    A linear built without a dense weight (RTN on load; ``group_size`` given; ``scheme``
    "int4", "fp8" or "int8") draws its dense weight into a temporary, quantizes it and drops it,
    one layer at a time. The draws follow ``named_parameters()`` order of the dense model,
    so the quantized model equals the dense model of the same seed quantized afterwards.
    """
    gen = torch.Generator(device=model.device)
    gen.manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if isinstance(mod, FusedLinear) and mod.weight is None and not mod.is_ready:
                if group_size is None:
                    raise ValueError(f"{mod_name} has no dense weight to initialize")
                w = torch.empty(mod.out_features, mod.in_features, dtype=model.dtype,
                                device=model.device).normal_(0.0, 0.02, generator=gen)
                if scheme == "fp8":
                    mod.quantize_fp8_shard_(None, w)
                elif scheme == "int8":
                    mod.quantize_int8_shard_(None, w)
                else:
                    mod.quantize_shard_(None, w, _rtn_group(mod_name, mod.in_features,
                                                            group_size), symmetric)
                del w
            if isinstance(mod, FusedExperts) and mod.w13 is None:
                # the dense model's w13 then w2 draws, quantized expert by expert
                g = _expert_group(model.config, mod, group_size)
                for kind, shape in (("gate_up_proj", (mod.num_experts, 2 * mod.inter,
                                                      mod.hidden)),
                                    ("down_proj", (mod.num_experts, mod.hidden, mod.inter))):
                    w = torch.empty(shape, dtype=model.dtype, device=model.device).normal_(
                        0.0, 0.02, generator=gen)
                    _load_experts(mod, mod_name, None, kind, w, mod_name, g,
                                  fp8=scheme == "fp8", int8=scheme == "int8")
                    del w
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p_name.endswith("bias"):
                    p.normal_(0.0, 0.02, generator=gen)
                elif p.dim() == 1:
                    p.fill_(1.0 - getattr(mod, "weight_offset", 0.0))
                else:
                    p.normal_(0.0, 0.02, generator=gen)


def _init_dummy_tp(model: CausalLM, tp: TensorParallel, seed: int,
                   group_size: int | None = None, quantize_lm_head: bool = False,
                   scheme: str = "int4") -> None:
    """This rank's shard of the built-in model that :func:`_init_dummy` draws at TP=1.

    A meta-device TP=1 skeleton gives the draw order and the full shapes; each tensor is
    drawn whole (one at a time, on this rank's device, from the same seeded generator)
    and only this rank's rows / columns are kept (:func:`shard_tensor`, as a checkpoint
    is read). So ``LLM(name, tensor_parallel_size=N)`` serves the same weights as
    ``LLM(name)``. RTN int4 shards quantize with the checkpoint path's group sizes.
    """
    config, dev, dtype = model.config, model.device, model.dtype
    rtn = group_size is not None
    ref = CausalLM(config, dtype=dtype, device="meta", dense=not rtn,
                   dense_lm_head=not (rtn and quantize_lm_head))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    seen: set[int] = set()

    def draw(shape: torch.Size, norm: nn.Module | None, bias: bool) -> Tensor:
        t = torch.empty(shape, dtype=dtype, device=dev)
        if norm is not None and not bias:   # unit scale (Gemma: stored 0, scale 1 + w)
            return t.fill_(1.0 - getattr(norm, "weight_offset", 0.0))
        return t.normal_(0.0, 0.02, generator=gen)

    def rtn_group(name: str, mod: FusedLinear, full: FusedLinear) -> int:
        if name.endswith(("o_proj", "down_proj")):
            return row_parallel_group_size(name, full.in_features, mod.in_features,
                                           group_size)
        return _rtn_group(name, mod.in_features, group_size)

    with torch.no_grad():
        for name, full in ref.named_modules():
            mod = modules[name]
            if isinstance(full, FusedExperts) and full.w13 is None:
                g = _expert_group(config, mod, group_size)
                for kind, shape in (("gate_up_proj", (full.num_experts, full.rows13,
                                                      full.hidden)),
                                    ("down_proj", (full.num_experts, full.hidden, full.inter))):
                    w = draw(torch.Size(shape), None, False)
                    _load_experts(mod, name, None, kind,
                                  shard_tensor(config, tp, name, None, kind, w), name, g,
                                  fp8=scheme == "fp8", int8=scheme == "int8")
                    del w
            if isinstance(full, FusedLinear) and full.weight is None and not full.is_ready:
                w = draw(torch.Size((full.out_features, full.in_features)), None, False)
                g = rtn_group(name, mod, full) if scheme == "int4" else 0
                for s, part in enumerate(torch.split(w, full.output_sizes)):
                    shard = shard_tensor(config, tp, name, s, "weight", part)
                    if scheme == "fp8":
                        mod.quantize_fp8_shard_(s, shard)
                    elif scheme == "int8":
                        mod.quantize_int8_shard_(s, shard)
                    else:
                        mod.quantize_shard_(s, shard, g)
                del w
            for p_name, p in full.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                t = draw(p.shape, full if p.dim() == 1 else None, p_name.endswith("bias"))
                if isinstance(full, FusedLinear):
                    for s, part in enumerate(torch.split(t, full.output_sizes)):
                        mod.load_shard(s, p_name, shard_tensor(config, tp, name, s, p_name,
                                                               part))
                else:
                    params[f"{name}.{p_name}" if name else p_name].copy_(
                        shard_tensor(config, tp, name, None, p_name, t))
                del t


def load_model(model: str, dtype: str | torch.dtype = "bfloat16",
               device: str | torch.device | None = None, quantization: str | None = None,
               allow_pickle: bool = False, seed: int = 0, *, group_size: int = 128,
               quantize_lm_head: bool = False, revision: str | None = None,
               tensor_parallel: TensorParallel | None = None,
               lm_head: bool = True) -> CausalLM:
    """Load a :class:`CausalLM` from a local HF directory, a hub id or a built-in name.

    model:        path of a HF checkpoint directory (config.json + safetensors), a Hugging
                  Face hub id ("org/name": downloaded into / read from the HF cache), or a
                  name from :func:`list_models` (random weights, deterministic by ``seed``).
    revision:     hub branch, tag or commit (hub ids only; default the main branch).
    dtype:        'bfloat16' | 'float16' | 'float32' | 'auto' (the checkpoint's) or a dtype.
    device:       default cuda when available, else cpu.
    quantization: None | 'int4' (RTN on load) | 'gptq' | 'awq' | 'fp8' (block-wise RTN on
                  load, or an fp8 checkpoint) | 'fp8_w8a8' (the same, run W8A8; W8A16
                  on GPUs without fp8 tensor cores, with a warning) |
                  'int8' (per-channel RTN int8 on load, or an int8 checkpoint; W8A8) |
                  'mxfp4' / 'dense' (GPT-OSS MXFP4 checkpoints: native MXFP4 experts,
                  the default for them, or dequantized to the model dtype); see module
                  docstring.
    allow_pickle: accept pickle ``*.bin`` weights (only from trusted sources).
    group_size, quantize_lm_head: RTN settings for quantization='int4'.
    tensor_parallel: build and read only this rank's shard (minikernels.models.parallel;
                  built-in names: this rank's shard of the TP=1 model of the same seed).
    lm_head:      False: an untied lm_head is neither read nor allocated (embedding
                  models: only :meth:`CausalLM.hidden_states` runs; their checkpoints often
                  have none). Built-in names always have one.
    """
    if quantization is not None:
        quantization = str(quantization).lower()
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    asked = quantization
    if quantization == "fp8_w8a8":      # fp8 weights; the activations are set at the end
        quantization = "fp8"
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(no_cuda_message(str(device)))
    name = model
    model = resolve_model(model, revision)
    if os.path.isdir(model):
        m = _load_hf(model, dtype, dev, quantization, allow_pickle, group_size,
                     quantize_lm_head, tensor_parallel, lm_head)
    elif model.lower() in list_models():
        if quantization in ("gptq", "awq", "mxfp4", "dense"):
            raise ValueError(f"built-in model {model!r} has dummy dense weights; "
                             f"quantization={quantization!r} is for checkpoints of that "
                             "format (use quantization='int4' to quantize them)")
        config = builtin_config(model)
        rtn = quantization in ("int4", "fp8", "int8")
        scheme = quantization if rtn else "int4"
        m = CausalLM(config, dtype=parse_dtype(dtype, config, dev), device=dev, dense=not rtn,
                     dense_lm_head=not (rtn and quantize_lm_head), tp=tensor_parallel)
        if tensor_parallel is not None and tensor_parallel.size > 1:
            _init_dummy_tp(m, tensor_parallel, seed, group_size if rtn else None,
                           quantize_lm_head, scheme=scheme)
        else:
            _init_dummy(m, seed, group_size if rtn else None, scheme=scheme)
        if rtn:  # what did not stream: a tied lm_head (quantize_lm_head)
            quantize_linears(m, group_size, quantize_lm_head=quantize_lm_head, scheme=scheme)
        if scheme == "int8":
            set_int8_expert_activations(m)               # int8 experts run W8A8 too
    elif os.path.exists(model):
        raise CheckpointError(f"{model} is not a directory (expected a HF model directory)")
    else:
        raise FileNotFoundError(f"{model!r} is not a local HF model directory, a hub id "
                                f"(org/name) or a built-in model name "
                                f"({', '.join(list_models())})")
    m.eval()
    m.requires_grad_(False)
    m.name_or_path = name
    m.quantization = asked if asked else (
        m.config.quantization_config or {}).get("quant_method")
    if asked == "fp8_w8a8":
        if dev.type == "cuda" and not fp8_tensor_cores(dev):
            # no fp8 tensor cores (A100): W8A8 would take the ops' slow reference path;
            # run the same fp8 weights W8A16, as vLLM runs FP8 checkpoints on such GPUs
            logger.warning("minikernels: quantization='fp8_w8a8' needs fp8 tensor cores "
                           "(compute capability 8.9+); %s has none, so its fp8 weights run "
                           "W8A16 (activations stay 16-bit) instead", dev)
            m.quantization = "fp8"
        else:
            set_fp8_activations(m, "dynamic")
            set_fp8_expert_activations(m)          # block-fp8 experts run W8A8 too
    fuse_w8a8_inputs(m)      # W8A8 linears: their norms quantize the activations
    return m
