"""Registry of every Triton kernel with representative compile signatures.

Each kernel module calls :func:`register` at import. Tests compile every entry ahead of
time for sm_80 and sm_90a (``triton.compile`` with a ``GPUTarget``), with no GPU present,
and check for register spills and, for tensor-core kernels, ``wgmma`` on sm_90a.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One kernel configuration to compile ahead of time.

    name:        unique, e.g. "rms_norm[bf16,H=4096]".
    fn:          the @triton.jit function.
    signature:   argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr", ...).
    constexprs:  values of the constexpr arguments.
    tensor_core: the kernel uses tl.dot; its sm_90a PTX must contain wgmma
                 (unless wgmma_expected is False, e.g. for tiny-M GEMV tiles).
    archs:       compute capabilities this config is dispatched on (80 -> sm_80,
                 90 -> sm_90a); an sm_90-only tile need not fit sm_80's registers.
    divisible_by_16: arguments (pointers, strides, sizes) compiled as multiples of 16, as
                 Triton's run-time specialization sees them for aligned inputs (lets
                 1-byte element tiles, e.g. fp8, load 16 bytes at a time and pipeline).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    tensor_core: bool = False
    wgmma_expected: bool = True
    archs: tuple[int, ...] = (80, 90)
    divisible_by_16: tuple[str, ...] = ()


_REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"kernel spec {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def all_kernels() -> list[KernelSpec]:
    """Import every kernel module in this package and return all registered specs."""
    import minikernels.ops.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("registry", "aot"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return list(_REGISTRY.values())
