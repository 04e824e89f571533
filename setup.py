"""Build script: pure Python always; the CUDA extension ``minikernels._C`` when possible.

MINIKERNELS_BUILD_CUDA=0 skips the extension, =1 forces it (and fails loudly if it
cannot be built), unset builds it only when an importable CUDA build of torch and
nvcc (CUDA_HOME) are present. Archs come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0a").
With a CPU-only torch, or inside pip's isolated build env (torch absent), the build
prints one line saying the extension was skipped.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup


def cuda_sources(root: str = ".") -> list[str]:
    """The files ``minikernels._C`` compiles, relative to ``root``: every csrc/*.cu, then
    csrc/bindings.cpp. (MANIFEST.in ships csrc/ in the sdist; tests/test_packaging.py checks
    that an unpacked sdist has each of these and every header they include.)"""
    cus = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "*.cu")))
    return [p.replace(os.sep, "/") for p in cus] + ["csrc/bindings.cpp"]


def _skip(reason: str) -> dict:
    # PEP 517 runs setup.py once per hook; say it once, in the build step, not metadata.
    if any(cmd in sys.argv for cmd in ("egg_info", "dist_info")):
        return {}
    print(f"minikernels: CUDA extension skipped ({reason}); Triton and reference backends only.",
          file=sys.stderr)
    return {}


def _cuda_extension_kwargs() -> dict:
    flag = os.environ.get("MINIKERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return _skip("MINIKERNELS_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if flag == "1":
            raise RuntimeError("MINIKERNELS_BUILD_CUDA=1 but torch is not importable "
                               "(build with --no-build-isolation)") from exc
        return _skip("torch not importable in the build environment")
    if torch.version.cuda is None or CUDA_HOME is None:
        if flag == "1":
            raise RuntimeError("MINIKERNELS_BUILD_CUDA=1 but torch has no CUDA "
                               f"(torch.version.cuda={torch.version.cuda}) or nvcc is missing "
                               f"(CUDA_HOME={CUDA_HOME})")
        return _skip("no CUDA build of torch or no nvcc")

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = cuda_sources(here)
    ext = CUDAExtension(
        name="minikernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr"],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":   # pip / build run this file as __main__; tests import it
    setup(**_cuda_extension_kwargs())
