"""Compile every registered Triton kernel ahead of time for sm_80 and sm_90a, no GPU needed.

    python -m minikernels.ops.triton.aot [--json out.json] [--filter NAME] [--covering [1|2]]
    python -m minikernels.ops.triton.aot --launches launches.json [--arch 90 --arch 80]

Per spec and arch it reports: compile error (if any), whether the PTX targets the right
arch, whether it contains wgmma / mma.sync, and REG/STACK/LOCAL/SHARED from
``cuobjdump -res-usage`` on the cubin (STACK or LOCAL > 0 means register spills).
Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions).

By default every registered spec is compiled (~1130 specs, ~2080 builds: about 45 CPU
minutes at ~1.3 s a build). ``--covering`` compiles :func:`covering_subset` instead: a
pairwise covering array of each kernel family's configurations (``--covering 2``: ~850
builds), or one that compiles every configuration value at least once (``--covering 1``:
~390 builds). The CPU test suite compiles the value covering by default; ``MK_AOT=pairs``
or ``MK_AOT=all`` (``MK_AOT_ALL=1``) make it compile more.

``--launches`` compiles launches recorded elsewhere (tests/fake_cuda.py records every launch
of an engine built on a fake H200) exactly as the GPU's first launch would: the kernel's
own ``warmup`` (Triton's argument binding and specialization) against a stand-in driver
that names the target. The registry holds representative configurations; this checks the
exact tiles and shapes a given engine runs (tests/test_cuda_dry_run_variants.py).
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
#: Most shared memory one block may use (bytes; CUDA's opt-in per-block maximum, which
#: Triton checks when it loads a kernel: more raises OutOfResources at the first launch):
#: A100 (sm_80) 163 KiB, H100 / H200 (sm_90) 227 KiB.
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}


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


def spec_tags(spec: Any) -> frozenset[str]:
    """A spec's configuration as tags: the comma-separated items of its name's brackets
    ("moe_gate_up[bf16,BM=32,ragged_k]" -> bf16, BM=32, ragged_k) plus one "@sm_XX" per
    arch it is compiled for."""
    inner = spec.name.partition("[")[2].rpartition("]")[0]
    items = {t.strip() for t in inner.split(",") if t.strip()}
    return frozenset(items | {f"@{ARCHS[a]}" for a in spec.archs})


def family_elements(family: list[Any], strength: int = 2) -> list[set[tuple[str, ...]]]:
    """What each spec of one kernel family covers: its tags (:func:`spec_tags`), "!flag"
    for each flag (a tag without "=") that other specs of the family carry and it lacks, so
    the plain variant counts as a value too, and (strength 2) every pair of these."""
    if strength not in (1, 2):
        raise ValueError(f"strength must be 1 (values) or 2 (pairs), got {strength}")
    tags = [spec_tags(spec) for spec in family]
    common = frozenset.intersection(*tags) if tags else frozenset()
    flags = {t for t in frozenset().union(*tags) - common if "=" not in t and t[0] != "@"}
    out = []
    for own in tags:
        values = sorted(own | {f"!{f}" for f in flags - own})
        pairs = {(a, b) for k, a in enumerate(values) for b in values[k + 1:]} \
            if strength == 2 else set()
        out.append({(v,) for v in values} | pairs)
    return out


#: The configurations the GPU run's targets time (issue #12: int4 GEMV / GEMM at M = 1,
#: 16, 4096 with group 128, flash prefill d128 causal, paged decode d128 with 4 query
#: heads per KV head): a covering subset always includes them, so the suite compiles them
#: (wgmma, spills) on every run. tests/test_aot_compile.py checks that each name exists.
HOT_PATH_SPECS = (
    "int4_gemv[bf16,M=1,g=128]", "int4_gemv[bf16,M=16,g=128]",
    "int4_gemm[bf16,sm90cfg,M=4096,g=128]", "int4_gemm[bf16,sm80cfg,M=4096,g=128]",
    "flash_attn[bf16,d128,m128n64w8s3,causal]",
    "paged_decode[bf16,G=4,D=128,bs=16,split=False,softcap=False]",
    "paged_decode[bf16,G=4,D=128,bs=16,split=True,softcap=False]",
)


def covering_subset(specs: list[Any], strength: int = 2) -> list[Any]:
    """A covering subset of ``specs``, in registry order: pairwise (strength 2) or of
    every value (strength 1).

    Specs are grouped into families (the name before "[" and the @triton.jit function).
    Within a family, every configuration value (:func:`family_elements`: tags and absent
    flags) and every pair of values that occur together in some spec also occur together
    in at least one chosen spec: each dtype meets each tile size, each epilogue with and
    without LoRA, each arch, and so on. Most compile failures and register spills come
    from one value or the interaction of two (a tile with a dtype, an epilogue with a
    tile), which this keeps; what it drops is the full product (three-way interactions),
    which the full run (no ``--covering``) checks. Greedy set cover: repeatedly take the
    spec that covers the most uncovered values and pairs (ties: the earlier registered).
    The specs named in HOT_PATH_SPECS are always chosen (and count towards the cover).
    Deterministic: the same registry gives the same subset. Strength 1 only asks that
    every value (each dtype, tile size, flag and its absence, arch) is compiled in some
    spec: about half the builds of strength 2, for a quick check.
    """
    families: dict[tuple[str, Any], list[int]] = {}
    for i, spec in enumerate(specs):
        families.setdefault((spec.name.split("[")[0], spec.fn), []).append(i)
    chosen: list[int] = []
    for members in families.values():
        covers = dict(zip(members, family_elements([specs[i] for i in members],
                                                    strength)))
        uncovered = set().union(*covers.values())
        picked = [i for i in members if specs[i].name in HOT_PATH_SPECS]
        for i in picked:
            uncovered -= covers[i]
        if not picked and not uncovered:     # a family without tags: its one spec
            picked = [members[0]]
        while uncovered:
            best = max(members, key=lambda i: (len(covers[i] & uncovered), -i))
            picked.append(best)
            uncovered -= covers[best]
        chosen.extend(picked)
    return [specs[i] for i in sorted(chosen)]


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


class _TargetDriver:
    """Stands in for Triton's CUDA driver where there is no GPU: it names the target, so a
    kernel's ``warmup`` (Triton's own argument binding, specialization and compile, as the
    first launch on that GPU would run them) compiles for it; nothing is loaded or run."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_device(self) -> int:
        # a jit function keeps its binder and compiled kernels per device: one "device"
        # per arch, so a process compiling for both never reuses the other's
        return self.arch

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")


def compile_launch(launch: dict[str, Any], arch: int) -> dict[str, Any]:
    """Compile one recorded launch exactly as the GPU's first launch would: launch =
    {"module", "kernel", "args": every argument by name (a tensor as its dtype's name,
    "torch.bfloat16"; scalars and constexprs as values), "constexprs": the constexpr
    arguments' names, "num_warps", "num_stages"}.
    Returns compile_one's fields (error, shared, usage, wgmma, mma_sync)."""
    import importlib

    import torch
    from triton.runtime import driver
    from triton.runtime.jit import MockTensor

    result: dict[str, Any] = {"name": launch["name"], "arch": ARCHS[arch]}
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    kwargs = {k: MockTensor(getattr(torch, v[len("torch."):]))
              if isinstance(v, str) and v.startswith("torch.") else v
              for k, v in launch["args"].items()}
    for opt in ("num_warps", "num_stages"):
        if launch.get(opt) is not None:
            kwargs[opt] = launch[opt]
    # (reset_active() would look for a real driver: put back whatever was active)
    previous = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(arch))
    try:
        kernel = fn.warmup(grid=(1,), **kwargs)
    except Exception as exc:  # reported, not raised: the caller names the launch
        result["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        return result
    finally:
        driver._active = previous
    ptx = kernel.asm["ptx"]
    result.update(wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                  shared=kernel.metadata.shared)
    if os.path.exists(_cuobjdump()):
        result["usage"] = resource_usage(kernel.asm["cubin"])
    return result


def _specialized(value: Any) -> Any:
    """What Triton's specialization keeps of a launch argument: an int's width, whether it
    is 1 and whether 16 divides it (not its value); other values as they are."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ("i64" if not -2**31 <= value < 2**31 else "i32", value == 1, value % 16 == 0)
    if isinstance(value, float):
        return "fp32"
    return value


def unique_launches(launches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One launch per distinct compiled kernel (the same kernel, constexprs, dtypes,
    options and integer specializations compile to the same binary)."""
    seen: dict[str, dict[str, Any]] = {}
    for launch in launches:
        exact = set(launch.get("constexprs", ()))
        key = json.dumps([launch["module"], launch["kernel"], launch.get("num_warps"),
                          launch.get("num_stages"),
                          sorted((k, v if k in exact else _specialized(v))
                                 for k, v in launch["args"].items())],
                         default=str)
        seen.setdefault(key, launch)
    return list(seen.values())


def compile_launches(launches: list[dict[str, Any]], archs: tuple[int, ...] = (90,),
                     jobs: int | None = None) -> list[dict[str, Any]]:
    """compile_launch for every distinct launch and arch, in parallel processes."""
    work = [(launch, arch) for launch in unique_launches(launches) for arch in archs]
    jobs = jobs or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_launch, *zip(*work))) if work else []


def status(result: dict[str, Any]) -> str:
    """ERROR, SPILL (stack or local memory), SMEM (over the arch's block limit) or ok."""
    u = result.get("usage", {})
    return "ERROR" if "error" in result else (
        "SPILL" if u.get("STACK", 0) or u.get("LOCAL", 0) else
        "SMEM" if result.get("shared", 0) > SMEM_LIMIT[result["arch"]] else "ok")


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
    parser.add_argument("--launches", help="compile the launches recorded in this JSON "
                        "file (a list of compile_launch records) instead of the registry")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                        help="with --launches: the archs (default 90; repeat for more)")
    parser.add_argument("--covering", type=int, nargs="?", const=2, choices=(1, 2),
                        help="compile a covering subset (covering_subset), not all: of "
                             "every pair of configuration values (2, the default) or of "
                             "every value (1)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels ahead of time", file=sys.stderr)
        return 2
    if args.launches:
        with open(args.launches) as f:
            results = compile_launches(json.load(f), tuple(args.arch or (90,)))
    else:
        from .registry import all_kernels

        specs = covering_subset(all_kernels(), args.covering) if args.covering else \
            all_kernels()
        names = [s.name for s in specs if not args.filter or args.filter in s.name]
        results = compile_all(names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = 0
    for r in results:
        u = r.get("usage", {})
        state = status(r)
        bad += state != "ok"
        print(f"{state:5s} {r['arch']:7s} {r['name']:50s} reg={u.get('REG')} "
              f"smem={r.get('shared')} wgmma={r.get('wgmma')}")
        if "error" in r:
            print("      " + r["error"].strip().splitlines()[-1][:300])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
