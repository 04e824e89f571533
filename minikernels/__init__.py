"""minikernels: hand-written inference kernels (Triton + CUDA C++) for small LLMs.

    import minikernels as mk
    mk.ops.rms_norm(x, w)                 # ops: see minikernels.ops
    with mk.use_backend("triton"): ...    # backends: auto | reference | triton | cuda
"""
from __future__ import annotations

from typing import Any

from . import ops
from ._validation import index_checks, set_index_checks
from .backend import current_backend, use_backend

__version__ = "0.1.0"

# Heavier layers load on first use so `import minikernels` stays cheap.
_LAZY = {
    "quant": ("minikernels.quant", None),
    "nn": ("minikernels.nn", None),
    "models": ("minikernels.models", None),
    "engine": ("minikernels.engine", None),
    "quantize_model": ("minikernels.nn", "quantize_model"),
    "LLM": ("minikernels.engine", "LLM"),
    "SamplingParams": ("minikernels.engine", "SamplingParams"),
    "RequestOutput": ("minikernels.engine", "RequestOutput"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minikernels' has no attribute {name!r}")


__all__ = ["ops", "use_backend", "current_backend", "set_index_checks", "index_checks", *_LAZY]
