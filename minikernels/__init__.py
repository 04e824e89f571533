"""minikernels: hand-written inference kernels (Triton + CUDA C++) for small LLMs.

    import minikernels as mk
    mk.ops.rms_norm(x, w)                 # ops: see minikernels.ops
    with mk.use_backend("triton"): ...    # backends: auto | reference | triton | cuda
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Everything loads on first use, so `import minikernels` (and `minikernels --help`) does
# not import torch. The custom ops register with torch.library when minikernels.ops is
# first imported (mk.ops.<op>, `from minikernels import ops`, or any layer above).
_LAZY = {
    "ops": ("minikernels.ops", None),
    "use_backend": ("minikernels.backend", "use_backend"),
    "current_backend": ("minikernels.backend", "current_backend"),
    "set_index_checks": ("minikernels._validation", "set_index_checks"),
    "index_checks": ("minikernels._validation", "index_checks"),
    "quant": ("minikernels.quant", None),
    "nn": ("minikernels.nn", None),
    "models": ("minikernels.models", None),
    "engine": ("minikernels.engine", None),
    "quantize_model": ("minikernels.nn", "quantize_model"),
    "LLM": ("minikernels.engine", "LLM"),
    "SamplingParams": ("minikernels.engine", "SamplingParams"),
    "RequestOutput": ("minikernels.engine", "RequestOutput"),
    "Embedder": ("minikernels.engine", "Embedder"),
    "Classifier": ("minikernels.engine", "Classifier"),
    "BeamSearchParams": ("minikernels.engine", "BeamSearchParams"),
    "LoRARequest": ("minikernels.engine", "LoRARequest"),
    "StructuredOutputsParams": ("minikernels.engine", "StructuredOutputsParams"),
    "AsyncLLM": ("minikernels.engine", "AsyncLLM"),
    "CompletionOutput": ("minikernels.engine", "CompletionOutput"),
    "RequestOutputKind": ("minikernels.engine", "RequestOutputKind"),
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


__all__ = list(_LAZY)
