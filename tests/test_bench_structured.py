"""bench/bench_structured.py --smoke runs on the CPU and writes its result files."""
from __future__ import annotations

import json


def test_bench_structured_smoke(tmp_path):
    from bench import bench_structured

    paths = bench_structured.main(["--smoke"], out_dir=tmp_path)
    data = json.loads(paths["json"].read_text())
    rows = data["rows"]
    assert {(r["constraint"], r["constrained"]) for r in rows} == {
        (c, f) for c in ("json", "regex") for f in (0.0, 0.5, 1.0)}
    assert all(r["host_ms"] and r["host_ms"] > 0 for r in rows)
    assert paths["md"].exists() and paths["png"].exists()
