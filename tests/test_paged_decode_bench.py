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
            "sdpa_contiguous", "minikernels_triton_fp8kv", "minikernels_triton_bytes_fp8kv",
            "reference_fp8kv"} <= impls
    fp8 = [r for r in timed if r["impl"].endswith("_fp8kv")]
    assert fp8 and all(r["kv_dtype"] == "fp8_e4m3" for r in fp8)
    for r in timed:
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-3, r
    assert paths["md"].exists() and paths["png"].exists()
