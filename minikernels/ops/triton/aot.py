"""Compile every registered Triton kernel ahead of time for sm_80 and sm_90a, no GPU needed.

    python -m minikernels.ops.triton.aot [--json out.json] [--filter NAME]

Per spec and arch it reports: compile error (if any), whether the PTX targets the right
arch, whether it contains wgmma / mma.sync, and REG/STACK/LOCAL/SHARED from
``cuobjdump -res-usage`` on the cubin (STACK or LOCAL > 0 means register spills).
Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

ARCHS = {80: "sm_80", 90: "sm_90a"}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    usage: dict[str, int] = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


def compile_one(name: str, arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .registry import all_kernels

    spec = next(s for s in all_kernels() if s.name == name)
    result: dict[str, Any] = {"name": name, "arch": ARCHS[arch], "tensor_core": spec.tensor_core,
                              "wgmma_expected": spec.wgmma_expected}
    try:
        kernel = triton.compile(
            ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                      attrs={(spec.fn.arg_names.index(a),): [["tt.divisibility", 16]]
                             for a in spec.divisible_by_16}),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # reported, not raised: the test names the failing spec
        result["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        return result
    ptx = kernel.asm["ptx"]
    result.update(ptx_target=f".target {ARCHS[arch]}" in ptx, wgmma="wgmma" in ptx,
                  mma_sync="mma.sync" in ptx, shared=kernel.metadata.shared)
    if os.path.exists(_cuobjdump()):
        result["usage"] = resource_usage(kernel.asm["cubin"])
    return result


def compile_all(names: list[str] | None = None, jobs: int | None = None) -> list[dict[str, Any]]:
    from .registry import all_kernels

    work = [(s.name, arch) for s in all_kernels() if names is None or s.name in names
            for arch in s.archs]
    jobs = jobs or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--filter", help="only specs whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels ahead of time", file=sys.stderr)
        return 2
    from .registry import all_kernels

    names = [s.name for s in all_kernels() if not args.filter or args.filter in s.name]
    results = compile_all(names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = 0
    for r in results:
        u = r.get("usage", {})
        status = "ERROR" if "error" in r else (
            "SPILL" if u.get("STACK", 0) or u.get("LOCAL", 0) else "ok")
        bad += status != "ok"
        print(f"{status:5s} {r['arch']:7s} {r['name']:50s} reg={u.get('REG')} "
              f"smem={r.get('shared')} wgmma={r.get('wgmma')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
