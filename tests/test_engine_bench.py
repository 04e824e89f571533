"""The serving benchmarks run on CPU: `minikernels bench serve` (downsized) and
bench/bench_serve.py --smoke (engine vs transformers side by side)."""
from __future__ import annotations

import importlib.util
import json
import os

from minikernels.benchmarks.serve import make_workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_workload_is_fixed_by_seed():
    a = make_workload(8, (100, 1024), (100, 1024), 151936, seed=0)
    assert a == make_workload(8, (100, 1024), (100, 1024), 151936, seed=0)
    assert all(100 <= len(p) <= 1024 and 100 <= o <= 1024 for p, o in a)
    assert a != make_workload(8, (100, 1024), (100, 1024), 151936, seed=1)


def test_cli_bench_serve_small(tmp_path, capsys):
    from minikernels.cli import main

    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--num-prompts", "4", "--min-input-len", "8",
               "--max-input-len", "16", "--min-output-len", "4", "--max-output-len", "8",
               "--decode-tokens", "6", "--repeat", "2", "--result-dir", str(tmp_path),
               "--output-json", str(out)])
    assert rc == 0
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"serve.{ext}").exists()
    data = json.loads(out.read_text())
    off = data["rows"][0]
    assert off["runs"] == 2 and off["output_tok_s_min"] <= off["output_tok_s"] <= \
        off["output_tok_s_max"] and off["spread"] >= 0
    phases = {r["phase"]: r for r in data["rows"]}
    assert set(phases) == {"offline", "latency", "decode-b1"}
    assert phases["offline"]["output_tok_s"] > 0
    assert phases["latency"]["ttft_p50_ms"] > 0 and phases["latency"]["tpot_p99_ms"] > 0
    assert data["meta"]["model"] == "tiny"
    assert "output_tok_s" in capsys.readouterr().out


def test_bench_serve_vs_hf_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_serve_script",
                                                  os.path.join(ROOT, "bench", "bench_serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serve_vs_hf.json").read_text())
    systems = {(r["system"], r["phase"]) for r in data["rows"]}
    assert {("minikernels", "offline"), ("minikernels", "latency"),
            ("minikernels", "decode-b1"), ("hf-static", "offline"),
            ("hf-b1", "decode-b1")} <= systems
    assert (tmp_path / "serve_vs_hf.md").exists() and (tmp_path / "serve_vs_hf.png").exists()
    assert data["meta"]["speedup_vs_best_hf_offline"] > 0
    out = capsys.readouterr().out
    assert out.count("| system | phase |") == 1                 # the table, printed once
    import re
    (ratio,) = re.findall(r"speed-up vs best transformers offline: (\S+)", out)
    assert re.fullmatch(r"\d+\.\d\dx", ratio), ratio           # rounded: "1.02x"


def test_cli_bench_engine_small(tmp_path):
    """`minikernels bench engine` end to end on a shrunken workload (JSON fields)."""
    from minikernels.cli import main

    out = tmp_path / "engine.json"
    rc = main(["bench", "engine", "--scale", "0.04", "--gpu-ms", "2", "--block-sizes", "16,64",
               "--no-save", "--output", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    kinds = {(r["workload"], r["path"], r.get("gpu_ms"), r["async"]) for r in rows}
    assert ("steady", "generate", None, True) in kinds and ("steady", "stream", None, True) in kinds
    assert ("steady", "generate", 2.0, False) in kinds
    for r in rows:
        assert r["steps"] > 0 and r["host_ms_median"] > 0
        # The stub's sampling math (an argmax on the CPU) is split out, never negative.
        assert 0 < r["host_ms_excl_stand_in"] <= r["host_ms_median"] + 1e-9
        assert r["stand_in_ms"] > 0
    stream = [r for r in rows if r["path"] == "stream"]
    assert all(0 < r["loop_floor_ms"] for r in stream)
    import importlib.util
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"   # --loop auto
    assert all(r["event_loop"] == loop for r in stream)
    sweep = [r for r in rows if r["workload"] == "block-sweep"]
    assert [r["block_size"] for r in sweep] == [16, 64]
    assert all(0 < r["hit_rate"] <= 1 and r["add_us"] > 0 for r in sweep)


def test_cli_bench_serve_with_lora_adapters(tmp_path, capsys):
    """--num-loras: random PEFT adapters on every projection (the experts too, on the
    built-in MoE), every request through one; the engine ends with no leaked blocks."""
    from minikernels.cli import main

    for model in ("tiny", "tiny-qwen3-moe"):
        out = tmp_path / f"{model}.json"
        rc = main(["bench", "serve", "--model", model, "--num-prompts", "4",
                   "--min-input-len", "8", "--max-input-len", "12", "--min-output-len", "3",
                   "--max-output-len", "5", "--repeat", "1", "--skip-decode",
                   "--num-loras", "3", "--max-lora-rank", "4", "--no-save",
                   "--output-json", str(out)])
        assert rc == 0
        data = json.loads(out.read_text())
        assert data["meta"]["num_loras"] == 3 and data["meta"]["max_lora_rank"] == 4
        assert data["rows"][0]["output_tok_s"] > 0
        assert "3 LoRA adapters of rank 4" in capsys.readouterr().out


def test_random_adapters_load_for_every_family():
    """benchmarks/lora_adapters.py writes what LoRAAdapter reads: dense targets on a
    dense model; on a MoE model also the experts (stacked, gate_up at twice the rank)."""
    import tempfile

    from minikernels.benchmarks.lora_adapters import write_random_adapter
    from minikernels.models.config import builtin_config
    from minikernels.models.lora import LoRAAdapter

    for name, experts in (("tiny", set()), ("tiny-qwen3-moe", {"gate_up", "down"})):
        config = builtin_config(name)
        with tempfile.TemporaryDirectory() as d:
            adapter = LoRAAdapter.load(write_random_adapter(config, d, 4, seed=2), config)
        assert {k for _, k in adapter.experts} == experts
        assert adapter.needed_rank() == 4 and adapter.scaling == 2.0
        assert {(layer, "q_proj") for layer in range(config.num_layers)} <= set(adapter.weights)
