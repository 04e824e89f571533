"""Every registered Triton kernel compiles ahead of time for sm_80 and sm_90a, no GPU needed.

Fails on a compile error, on register spills (cuobjdump reports STACK/LOCAL bytes), and,
for tensor-core kernels, when the sm_90a PTX lacks wgmma (sm_80 must show mma.sync).
Compilation runs once, in a subprocess without TRITON_INTERPRET (which the CPU test
session sets), through ``python -m minikernels.ops.triton.aot``: started by conftest.py
when collection ends, in the background (it overlaps the other tests), and read here,
at the end of the run.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("triton")

from minikernels.ops.triton.registry import all_kernels  # noqa: E402

SPECS = all_kernels()
NAMES = [s.name for s in SPECS]
CASES = [(s.name, arch) for s in SPECS for arch in ("sm_80", "sm_90a")
         if {"sm_80": 80, "sm_90a": 90}[arch] in s.archs]


@pytest.fixture(scope="session")
def aot_results(request) -> dict[tuple[str, str], dict]:
    """Every spec's compile result. conftest.py started the compile in the background
    when collection ended (so it overlaps the other tests); without it (MK_AOT_INLINE=1)
    it runs here."""
    started = getattr(request.config, "_mk_aot", None)
    if started is None:
        from conftest import start_aot_compile
        started = start_aot_compile()
    proc, out, log = started
    try:
        proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("AOT compile run did not finish in 30 minutes")
    if not os.path.exists(out):
        with open(log) as f:
            pytest.fail(f"AOT compile run failed:\n{f.read()[-6000:]}")
    with open(out) as f:
        return {(r["name"], r["arch"]): r for r in json.load(f)}


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
