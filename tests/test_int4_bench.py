"""bench/bench_int4.py runs end to end on the CPU in --smoke mode."""
from __future__ import annotations

import json
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_int4_smoke(tmp_path, monkeypatch):
    # The script's own entry (``python -m bench.bench_int4 --smoke``), run in this process:
    # the suite's interpreter (TRITON_INTERPRET=1, set by conftest) and its imports serve it.
    monkeypatch.setenv("MINIKERNELS_BENCH_OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_int4.py", "--smoke"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("bench.bench_int4", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    data = json.loads((tmp_path / "int4_matmul.json").read_text())
    rows = data["rows"]
    assert {r["peer"] for r in rows} >= {"mk_reference", "mk_triton"}
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert {r["M"] for r in rows} == {1, 3, 17}
    assert (tmp_path / "int4_matmul.md").exists() and (tmp_path / "int4_matmul.png").exists()
