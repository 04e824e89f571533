"""bench/bench_attention.py end to end on tiny CPU shapes (--smoke): rows, files, accuracy."""
from __future__ import annotations

import json

from bench import bench_attention


def test_bench_attention_smoke(tmp_path):
    paths = bench_attention.main(["--smoke", "--out-dir", str(tmp_path)])
    assert {"json", "md", "png"} <= set(paths)
    data = json.loads(paths["json"].read_text())
    rows = data["rows"]
    assert {(r["causal"], r["head_dim"]) for r in rows} == {(False, 64), (True, 64)}
    for r in rows:
        assert r["minikernels_tflops"] > 0
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 0.05
        assert r["sdpa_flash_tflops"] is not None or r["flex_attention_tflops"] is not None
    assert data["meta"]["flops"].startswith("4*B*S*S*H*D")
    assert "minikernels_tflops" in paths["md"].read_text()


def test_flop_count():
    assert bench_attention.flops(2, 1024, 16, 128, causal=False) == 4 * 2 * 1024**2 * 16 * 128
    assert bench_attention.flops(2, 1024, 16, 128, causal=True) == 2 * 2 * 1024**2 * 16 * 128
