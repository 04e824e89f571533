"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a, no GPU needed.

Fails on a compile error, on register spills (cuobjdump reports STACK/LOCAL bytes), on
more shared memory than a block of that arch may use (Triton would raise OutOfResources at
the first launch on the GPU), and, for tensor-core kernels, when the sm_90a PTX lacks
wgmma (sm_80 must show mma.sync).
Compilation runs once, in a subprocess without TRITON_INTERPRET (which the CPU test
session sets), through ``python -m minikernels.ops.triton.aot``: started by conftest.py
when collection ends, in the background (it overlaps the other tests), and read here,
at the end of the run.

Which configurations (MK_AOT, conftest.py): by default a covering subset of each kernel
family's registered specs that compiles every configuration value at least once (each
dtype, tile size, flag and its absence, arch: ``aot.covering_subset`` strength 1, ~20% of
the builds); ``MK_AOT=pairs`` compiles every pair of values that occur together (~40%),
``MK_AOT=all`` (or ``MK_AOT_ALL=1``) every spec, about 45 CPU minutes: run it after
changing a kernel's tiles or the registry, and before a GPU run:
``MK_AOT=all pytest tests/test_aot_compile.py``.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from conftest import AOT_SUBSET  # noqa: E402
from minikernels.ops.triton.aot import (  # noqa: E402
    HOT_PATH_SPECS, SMEM_LIMIT, covering_subset, family_elements)
from minikernels.ops.triton.registry import KernelSpec, all_kernels  # noqa: E402

ALL_SPECS = all_kernels()
SPECS = ALL_SPECS if AOT_SUBSET == "all" else \
    covering_subset(ALL_SPECS, 1 if AOT_SUBSET == "values" else 2)
NAMES = [s.name for s in SPECS]
CASES = [(s.name, arch) for s in SPECS for arch in ("sm_80", "sm_90a")
         if {"sm_80": 80, "sm_90a": 90}[arch] in s.archs]


@pytest.fixture(scope="session")
def aot_results(request) -> dict[tuple[str, str], dict]:
    """Every spec's compile result, from the background compile conftest.py started when
    collection ended (it overlaps the other tests; conftest.wait_for_aot_compile)."""
    from conftest import wait_for_aot_compile
    with open(wait_for_aot_compile(request.config)) as f:
        return {(r["name"], r["arch"]): r for r in json.load(f)}


def test_registry_is_populated():
    families = {name.split("[")[0] for name in NAMES}
    assert {"rms_norm", "gated_activation", "rotary"} <= families
    assert families == {s.name.split("[")[0] for s in ALL_SPECS}, "a kernel family is not compiled"


@pytest.mark.parametrize("strength", [1, 2])
def test_covering_subset_covers_every_value_and_pair(strength: int):
    """In every family, each configuration value (and with strength 2 each pair of values
    that occur together in a registered spec) occurs in a compiled spec, and each kernel
    function is compiled."""
    chosen = {s.name for s in covering_subset(ALL_SPECS, strength)}
    assert len(chosen) < len(ALL_SPECS)
    assert {s.fn for s in ALL_SPECS if s.name in chosen} == {s.fn for s in ALL_SPECS}
    families: dict = {}
    for s in ALL_SPECS:
        families.setdefault((s.name.split("[")[0], s.fn), []).append(s)
    for (family, _), members in families.items():
        covers = family_elements(members, strength)
        if strength == 2:
            assert all(any(len(e) == 2 for e in c) for c in covers if len(c) > 1)
        want = set().union(*covers)
        got = set().union(*(c for s, c in zip(members, covers) if s.name in chosen))
        assert want <= got, f"{family}: {sorted(want - got)[:5]} not compiled"


@pytest.mark.parametrize("strength", [1, 2])
def test_hot_path_specs_are_always_compiled(strength: int):
    """The configurations the GPU run times (aot.HOT_PATH_SPECS) exist and every covering
    subset compiles them on both archs; tensor-core ones must show wgmma on sm_90a."""
    by_name = {s.name: s for s in ALL_SPECS}
    assert set(HOT_PATH_SPECS) <= set(by_name), set(HOT_PATH_SPECS) - set(by_name)
    chosen = {s.name for s in covering_subset(ALL_SPECS, strength)}
    assert set(HOT_PATH_SPECS) <= chosen
    for name in HOT_PATH_SPECS:
        assert by_name[name].archs == (80, 90), name
    flash = by_name["flash_attn[bf16,d128,m128n64w8s3,causal]"]
    assert flash.tensor_core and flash.wgmma_expected


@pytest.mark.parametrize(("name", "arch"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_compiles_without_spills(aot_results, name: str, arch: str):
    r = aot_results[(name, arch)]
    assert "error" not in r, r["error"]
    assert r["ptx_target"], f"PTX not built for {arch}"
    usage = r.get("usage")
    if usage is not None:
        assert usage.get("STACK", 0) == 0 and usage.get("LOCAL", 0) == 0, \
            f"{name} spills registers on {arch}: {usage}"
    assert r["shared"] <= SMEM_LIMIT[arch], \
        f"{name} needs {r['shared']} bytes of shared memory on {arch} (at most " \
        f"{SMEM_LIMIT[arch]}): OutOfResources at its first launch"
    if r["tensor_core"]:
        if arch == "sm_90a" and r["wgmma_expected"]:
            assert r["wgmma"], f"{name}: no wgmma in sm_90a PTX"
        if arch == "sm_80":
            assert r["mma_sync"], f"{name}: no mma.sync in sm_80 PTX"


def test_covering_subset_on_a_known_family():
    """Two factors of 2 and 3 values plus a flag: all 12 combinations registered; a pairwise
    cover needs 6 (each dtype meets each tile, each of them with and without the flag)."""
    def fn():  # stands in for a @triton.jit function
        pass

    specs = [KernelSpec(name=f"k[{d},BM={m}{',lora' if lora else ''}]", fn=fn, signature={})
             for d in ("fp16", "bf16") for m in (16, 32, 64) for lora in (False, True)]
    other = KernelSpec(name="other", fn=len, signature={})
    chosen = covering_subset(specs + [other])
    assert other in chosen and len(chosen) == 7
    names = [s.name for s in chosen]
    for d in ("fp16", "bf16"):
        assert any(n.startswith(f"k[{d}") and "lora" in n for n in names)
        assert any(n.startswith(f"k[{d}") and "lora" not in n for n in names)
    for m in (16, 32, 64):
        assert sum(f"BM={m}" in n for n in names) == 2
    assert chosen == [s for s in specs + [other] if s in chosen], "registry order is kept"
    assert [s.name for s in covering_subset(specs)] == names[:-1], "deterministic"
    # strength 1: three specs hold every value (each tile once; both dtypes, the flag
    # and its absence among them)
    values = [s.name for s in covering_subset(specs, 1)]
    assert len(values) == 3 and all(sum(f"BM={m}" in n for n in values) == 1
                                    for m in (16, 32, 64))
    for part in ("fp16", "bf16"):
        assert any(part in n for n in values)
    assert any("lora" in n for n in values) and any("lora" not in n for n in values)
    with pytest.raises(ValueError, match="strength"):
        covering_subset(specs, 3)
