"""Every registered Triton kernel compiles ahead of time for sm_80 and sm_90a, no GPU needed.

Fails on a compile error, on register spills (cuobjdump reports STACK/LOCAL bytes), and,
for tensor-core kernels, when the sm_90a PTX lacks wgmma (sm_80 must show mma.sync).
Compilation runs once, in a subprocess without TRITON_INTERPRET (which the CPU test
session sets), through ``python -m minikernels.ops.triton.aot``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from minikernels.ops.triton.registry import all_kernels  # noqa: E402

SPECS = all_kernels()
NAMES = [s.name for s in SPECS]
CASES = [(s.name, arch) for s in SPECS for arch in ("sm_80", "sm_90a")
         if {"sm_80": 80, "sm_90a": 90}[arch] in s.archs]


@pytest.fixture(scope="session")
def aot_results(tmp_path_factory) -> dict[tuple[str, str], dict]:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "minikernels.ops.triton.aot", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=1200)
    if not out.exists():
        pytest.fail(f"AOT compile run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {(r["name"], r["arch"]): r for r in json.loads(out.read_text())}


def test_registry_is_populated():
    families = {name.split("[")[0] for name in NAMES}
    assert {"rms_norm", "silu_and_mul", "rotary"} <= families


@pytest.mark.parametrize(("name", "arch"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_compiles_without_spills(aot_results, name: str, arch: str):
    r = aot_results[(name, arch)]
    assert "error" not in r, r["error"]
    assert r["ptx_target"], f"PTX not built for {arch}"
    usage = r.get("usage")
    if usage is not None:
        assert usage.get("STACK", 0) == 0 and usage.get("LOCAL", 0) == 0, \
            f"{name} spills registers on {arch}: {usage}"
    if r["tensor_core"]:
        if arch == "sm_90a" and r["wgmma_expected"]:
            assert r["wgmma"], f"{name}: no wgmma in sm_90a PTX"
        if arch == "sm_80":
            assert r["mma_sync"], f"{name}: no mma.sync in sm_80 PTX"
