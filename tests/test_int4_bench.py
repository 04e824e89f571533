"""bench/bench_int4.py runs end to end on the CPU in --smoke mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_int4_smoke(tmp_path):
    env = dict(os.environ, MINIKERNELS_BENCH_OUT=str(tmp_path), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_int4", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "int4_matmul.json").read_text())
    rows = data["rows"]
    assert {r["peer"] for r in rows} >= {"mk_reference", "mk_triton"}
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert {r["M"] for r in rows} == {1, 3, 17}
    assert (tmp_path / "int4_matmul.md").exists() and (tmp_path / "int4_matmul.png").exists()
