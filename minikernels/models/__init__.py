"""Decoder models on minikernels ops, and HF checkpoint loading.

    model = mk.models.load_model("path/to/hf_dir" or "qwen3-0.6b", dtype="bfloat16")
    tok = mk.models.load_tokenizer("path/to/hf_dir" or "qwen3-0.6b")
    logits = model(input_ids, meta, kv_caches)      # the contract: AttentionMetadata

Modules: config (DecoderConfig, built-in names), decoder (CausalLM), linear (dense/int4
fused linear), loader (load_model), tokenizer (load_tokenizer), generate (a plain
generation loop and the ``minikernels generate`` CLI).
"""
from .config import (BUILTIN_CONFIGS, SUPPORTED_ARCHITECTURES, DecoderConfig,
                     UnsupportedModelError, builtin_config, list_models)
from .decoder import CausalLM
from .linear import FusedLinear, Int4Part
from .loader import CheckpointError, load_model, quantize_linears
from .metadata import AttentionMetadata
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "AttentionMetadata", "BUILTIN_CONFIGS", "ByteTokenizer", "CausalLM", "CheckpointError",
    "DecoderConfig", "FusedLinear", "HFTokenizer", "Int4Part", "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError", "builtin_config", "list_models", "load_model", "load_tokenizer",
    "quantize_linears",
]
