"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a, no GPU needed.

Fails on a compile error, on register spills (cuobjdump reports STACK/LOCAL bytes), and,
for tensor-core kernels, when the sm_90a PTX lacks wgmma (sm_80 must show mma.sync).
Compilation runs once, in a subprocess without TRITON_INTERPRET (which the CPU test
session sets), through ``python -m minikernels.ops.triton.aot``: started by conftest.py
when collection ends, in the background (it overlaps the other tests), and read here,
at the end of the run.

Which configurations: a pairwise covering subset of each kernel family's registered specs
(``aot.covering_subset``: every configuration value, and every pair of values that occur
together, is compiled in some spec; ~40% of the builds), or every spec with MK_AOT_ALL=1
(about 15 CPU minutes; run it after changing a kernel's tiles or the registry, and
before a GPU run: ``MK_AOT_ALL=1 pytest tests/test_aot_compile.py``).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("triton")

from conftest import AOT_ALL  # noqa: E402
from minikernels.ops.triton.aot import covering_subset, family_elements  # noqa: E402
from minikernels.ops.triton.registry import KernelSpec, all_kernels  # noqa: E402

ALL_SPECS = all_kernels()
SPECS = ALL_SPECS if AOT_ALL else covering_subset(ALL_SPECS)
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
    assert families == {s.name.split("[")[0] for s in ALL_SPECS}, "a kernel family is not compiled"


def test_covering_subset_covers_every_value_and_pair():
    """In every family, each configuration value and each pair of values that occur
    together in a registered spec occur together in a compiled one, and each kernel
    function is compiled."""
    chosen = {s.name for s in covering_subset(ALL_SPECS)}
    assert len(chosen) < len(ALL_SPECS)
    assert {s.fn for s in ALL_SPECS if s.name in chosen} == {s.fn for s in ALL_SPECS}
    families: dict = {}
    for s in ALL_SPECS:
        families.setdefault((s.name.split("[")[0], s.fn), []).append(s)
    for (family, _), members in families.items():
        covers = family_elements(members)
        want = set().union(*covers)
        got = set().union(*(c for s, c in zip(members, covers) if s.name in chosen))
        assert want <= got, f"{family}: {sorted(want - got)[:5]} not compiled"


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
