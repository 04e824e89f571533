"""KV-cache dtype names (vLLM's ``kv_cache_dtype``) and what they mean.

"auto": the model's dtype. "fp8" / "fp8_e4m3": torch.float8_e4m3fn, stored as
fp8(clamp(x / scale, +-448)) with each attention layer's float32 k_scale / v_scale
(minikernels.ops.kv_cache has the convention). Kept free of heavy imports: CLIs read it.
"""
from __future__ import annotations

import torch

#: kv_cache_dtype name -> the cache dtype (None = the model's dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def resolve_kv_cache_dtype(name: object) -> torch.dtype | None:
    """"auto" -> None (the model's dtype); "fp8" / "fp8_e4m3" -> torch.float8_e4m3fn."""
    if not isinstance(name, str) or name.lower() not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got "
                         f"{name!r}")
    return KV_CACHE_DTYPES[name.lower()]
