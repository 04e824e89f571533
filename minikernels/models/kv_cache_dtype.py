"""KV-cache dtype names (vLLM's ``kv_cache_dtype``) and what they mean.

"auto": the model's dtype. "fp8" / "fp8_e4m3": torch.float8_e4m3fn, stored as
fp8(clamp(x / scale, +-448)) with each attention layer's float32 k_scale / v_scale
(minikernels.ops.kv_cache has the convention). GPUs of capability 8.9+ (Ada, Hopper)
convert e4m3 natively; on older ones (A100) the kernels read and write the cache as bytes
and convert in software (minikernels.ops.triton.fp8_bits). "fp8_e5m2": torch.float8_e5m2
(vLLM's name: 2 mantissa bits instead of 3, range to +-57344 so uncalibrated scales of 1.0
rarely saturate; read natively on every GPU). Imports no torch until a name is resolved:
CLIs list the names in --help.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: the kv_cache_dtype names, in --help order
KV_CACHE_DTYPE_NAMES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def resolve_kv_cache_dtype(name: object) -> "torch.dtype | None":
    """"auto" -> None (the model's dtype); "fp8" / "fp8_e4m3" -> torch.float8_e4m3fn;
    "fp8_e5m2" -> torch.float8_e5m2."""
    if not isinstance(name, str) or name.lower() not in KV_CACHE_DTYPE_NAMES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPE_NAMES)}, "
                         f"got {name!r}")
    if name.lower() == "auto":
        return None
    import torch

    return torch.float8_e5m2 if name.lower() == "fp8_e5m2" else torch.float8_e4m3fn
