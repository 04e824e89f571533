"""Decoder models on minikernels ops, and HF checkpoint loading.

    model = mk.models.load_model("path/to/hf_dir" or "qwen3-0.6b", dtype="bfloat16")
    tok = mk.models.load_tokenizer("path/to/hf_dir" or "qwen3-0.6b")
    logits = model(input_ids, meta, kv_caches)      # the contract: AttentionMetadata

Modules: config (DecoderConfig, built-in names), decoder (CausalLM), linear (dense/int4
fused linear), loader (load_model), hub (hub ids -> the HF cache), tokenizer (load_tokenizer), generate (a plain
generation loop and the ``minikernels generate`` CLI).
"""
from typing import Any

# Loaded on first use (PEP 562), so `minikernels generate --help` does not import torch.
_EXPORTS = {
    "BUILTIN_CONFIGS": "config", "SUPPORTED_ARCHITECTURES": "config", "DecoderConfig": "config",
    "UnsupportedModelError": "config", "builtin_config": "config", "list_models": "config",
    "CausalLM": "decoder", "FusedLinear": "linear", "Int4Part": "linear",
    "CheckpointError": "loader", "load_model": "loader", "quantize_linears": "loader",
    "AttentionMetadata": "metadata", "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer", "resolve_model": "hub",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttentionMetadata", "BUILTIN_CONFIGS", "ByteTokenizer", "CausalLM", "CheckpointError",
    "DecoderConfig", "FusedLinear", "HFTokenizer", "Int4Part", "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError", "builtin_config", "list_models", "load_model", "load_tokenizer",
    "quantize_linears", "resolve_model",
]
