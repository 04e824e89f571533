"""The paged decode benchmark's --smoke mode runs on the CPU and writes its result files."""
from __future__ import annotations

import json


def test_bench_smoke(tmp_path):
    from bench import bench_paged_decode

    paths = bench_paged_decode.main(["--smoke"], out_dir=tmp_path)
    data = json.loads(paths["json"].read_text())
    timed = [r for r in data["rows"] if r.get("us") is not None]
    impls = {r["impl"] for r in timed}
    assert {"minikernels_triton", "minikernels_triton_invariant", "gather_sdpa",
            "sdpa_contiguous"} <= impls
    for r in timed:
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-3, r
    assert paths["md"].exists() and paths["png"].exists()
