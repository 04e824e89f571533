"""bench/bench_hf.py --smoke: every variant runs, agrees with SDPA, and the files are written."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_bench_hf_smoke(tmp_path) -> None:
    from bench import bench_hf

    paths = bench_hf.main(["--smoke", "--batches", "2", "--prompt", "8", "--steps", "1"],
                          out_dir=tmp_path)
    data = json.loads(paths["json"].read_text())
    rows = data["rows"]
    assert {(r["variant"], r["phase"]) for r in rows} == {
        (v, p) for v in bench_hf.VARIANTS for p in ("prefill", "decode")}
    for r in rows:
        assert r["tokens_per_s"] > 0
        if r["variant"] in ("mk_attention", "kernelized"):
            assert r["max_abs_err_logits"] < 1e-4 and r["next_token_agree"] == "2/2"
    assert "kernelized" in data["meta"]["kernelize"]
    assert paths["md"].exists()
