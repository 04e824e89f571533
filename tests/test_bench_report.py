"""The README's performance block from one GPU run's result files (issue #12,
minikernels/benchmarks/report.py).

A fake result folder is written with the benchmarks' own writers (plumbing.write_results /
write_json) and, where a benchmark has one, its own row function (attention.run_shape,
ops._time_case, serve.run_offline / run_latency / run_decode_b1, serve_vs_hf.hf_*,
engine._row, bench_spec_decode._finish), so a schema change breaks these tests. The rows
int4.py and paged_decode.py build inline are mirrored here, and
test_benchmarks_still_write_these_keys checks their sources still use those keys. Checked:
met / missed exactly at each target's boundary, "no data" for absent files and rows, the
README markers and --check. No GPU; a few seconds.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from minikernels.benchmarks import plumbing, report

ROOT = Path(__file__).resolve().parents[1]
CEILINGS = {"copy_bytes_per_s": 4.3e12, "bf16_matmul_flops": 7.9e14}


# --------------------------------------------------------------------- int4_matmul
def int4_row(m: int, peer: str, us: float, speedup: float | None, bw_frac: float | None,
             correct: bool = True, shape: str = report.INT4_SHAPE) -> dict[str, Any]:
    """A row as benchmarks/int4.py's run() appends it (then adds speedup_vs_cublas)."""
    return {"shape": shape, "M": m, "peer": peer, "us": us, "bw_frac": bw_frac,
            "tflops": 1.0, "flops_frac": 0.4, "max_err": 0.0, "correct": correct,
            "speedup_vs_cublas": speedup}


def int4_meta(group: int = 128) -> dict[str, Any]:
    return {"dtype": "bfloat16", "group_size": group, "smoke": False,
            "copy_bandwidth_GBps": CEILINGS["copy_bytes_per_s"] / 1e9,
            "bf16_matmul_TFLOPs": CEILINGS["bf16_matmul_flops"] / 1e12,
            "weight_copies_rotated": "enough to exceed 2x a 50 MB L2"}


def int4_rows(bw: float, small: float, large: float) -> list[dict[str, Any]]:
    """Every M of int4.M_VALUES on the target shape: cuBLAS, a slower mk_triton and the
    fastest of ours (mk_cuda to M = 16, mk_auto above) at the given figures (``small`` at
    M = 16, more below it); a faster mk_cuda row with a wrong output at M = 1 and a faster
    other shape, both of which must not count."""
    from minikernels.benchmarks import int4

    rows = []
    for m in int4.M_VALUES:
        x = large if m == 4096 else small if m == 16 else small + 1 if m < 16 else 1.0
        ours = "mk_cuda" if m <= 16 else "mk_auto"
        rows += [int4_row(m, "cublas_bf16", 100.0, 1.0, 0.3),
                 int4_row(m, "tinygemm", 50.0, 2.0, 0.6),
                 int4_row(m, "mk_triton", 110.0 / x, x / 1.1, 0.5),
                 int4_row(m, ours, 100.0 / x, x, bw if m == 1 else 0.5)]
    rows.append(int4_row(1, "mk_cuda", 1.0, 100.0, 0.99, correct=False))
    rows.append(int4_row(1, "mk_cuda", 1.0, 100.0, 0.99, shape="4096->6144"))
    return rows


# ----------------------------------------------------------------------- attention
class _Stub:
    """A stand-in kernel for attention.run_shape: zeros of the output's shape; its time is
    looked up by name in the stubbed _time."""

    def __init__(self, name: str, q: torch.Tensor, bhsd: bool) -> None:
        self.name = name
        self.shape = (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) if bhsd else q.shape

    def __call__(self) -> torch.Tensor:
        return torch.zeros(self.shape)


def attention_rows(monkeypatch: pytest.MonkeyPatch, vs_sdpa: float) -> list[dict[str, Any]]:
    """Rows from attention.run_shape itself (d128 causal 4k, d64 full 1k), the kernels
    stubbed: cuDNN is the fastest SDPA backend, ours takes its time / ``vs_sdpa``."""
    from minikernels.benchmarks import attention

    times = {"minikernels": 1e-3 / vs_sdpa, "sdpa_flash": 2e-3, "sdpa_cudnn": 1e-3,
             "sdpa_efficient": 3e-3, "flex_attention": None}
    monkeypatch.setattr(attention, "_ours", lambda q, k, v, causal, config=None:
                        _Stub("minikernels", q, False))
    monkeypatch.setattr(attention, "_sdpa", lambda name, q, k, v, causal: _Stub(name, q, True))
    monkeypatch.setattr(attention, "_flex", lambda q, k, v, causal, compile_it:
                        _Stub("flex_attention", q, False))
    monkeypatch.setattr(attention, "_time", lambda fn, device, smoke: times[fn.name])
    cpu = torch.device("cpu")
    return [attention.run_shape(128, 4096, 4096, True, cpu, True, CEILINGS["bf16_matmul_flops"]),
            attention.run_shape(64, 1024, 4096, False, cpu, True, CEILINGS["bf16_matmul_flops"])]


def attention_meta() -> dict[str, Any]:
    return {"tokens": 16384, "dtype": "bfloat16", "heads": "2048 / head_dim",
            "ceilings": CEILINGS, "smoke": False, "index_checks": False}


# -------------------------------------------------------------------- paged_decode
def paged_row(impl: str, us: float, frac: float | None, speedup: float | None,
              kv: str = "bfloat16", batch: int = 64, context: int = 4096) -> dict[str, Any]:
    """A timed row as paged_decode.bench_shape appends it (then speedup_vs_gather_sdpa)."""
    return dict(batch=batch, context=context, impl=impl, kv_dtype=kv, us=us,
                gb_per_s=1000.0, frac_copy_bw=frac, max_abs_err=0.0,
                speedup_vs_gather_sdpa=speedup)


def paged_rows(frac: float, speedup: float) -> list[dict[str, Any]]:
    """64 x 4096: ours (cuda fastest, at the given figures), a triton row, the invariant and
    fp8 rows (not counted for the bf16 target), gather + SDPA, a skipped flex row; and a
    faster other shape."""
    return [paged_row("minikernels_triton", 120.0, frac * 0.9, speedup * 0.9),
            paged_row("minikernels_triton_invariant", 50.0, 0.99, 9.0),
            paged_row("minikernels_cuda", 100.0, frac, speedup),
            paged_row("minikernels_triton_fp8kv", 40.0, 0.99, 9.0, kv="fp8_e4m3"),
            paged_row("gather_sdpa", 100.0 * speedup, 0.3, 1.0),
            paged_row("sdpa_contiguous", 90.0, 0.95, 2.2),
            dict(batch=64, context=4096, impl="flex_paged", skipped="block mask too large"),
            paged_row("minikernels_cuda", 1.0, 0.99, 9.0, batch=8)]


def paged_meta(hkv: int = 8, d: int = 128) -> dict[str, Any]:
    return dict(shapes=f"Hq=32, Hkv={hkv}, D={d}, block=16", dtype="bf16", ceilings=CEILINGS,
                smoke=False, bytes="2 * B * ctx * Hkv * D * elem")


# ---------------------------------------------------------------------------- ops
def ops_rows() -> list[dict[str, Any]]:
    """Rows from ops._time_case itself (GPU path on CPU tensors: triton, the torch peer and
    an extra peer), no-op kernels."""
    from minikernels.backend import use_backend
    from minikernels.benchmarks import ops

    rows: list[dict[str, Any]] = []
    for case in (ops.Case("rms_norm+residual", "4096x4096", lambda: None, 1e8, 0,
                          ("triton", "cuda"), lambda: None),
                 ops.Case("w8a8_block_fp8_matmul", "M=16 8192x8192", lambda: None, 1e8, 1e12,
                          ("triton",), lambda: None,
                          extra_peers=(("_scaled_mm rowwise", lambda: None),))):
        ops._time_case(case, rows, True, "cpu", 3, CEILINGS, lambda: None, use_backend)
    us = {"triton": 10.0, "torch": 20.0, "_scaled_mm rowwise": 15.0}   # not the no-ops' noise
    for r in rows:
        r["us"] = us[r["backend"]]
    return rows


# ------------------------------------------------------------------------- serving
class FakeEngine:
    """Just enough of LLMEngine for serve.run_offline / run_latency / run_decode_b1:
    each request finishes on the next step with all its tokens."""

    device = torch.device("cpu")
    vocab_size = 1000
    model = SimpleNamespace(weight_bytes=lambda: 1e9, kv_bytes_per_token=lambda: 1e4)

    def __init__(self) -> None:
        self.pending: list[SimpleNamespace] = []

    def add_request(self, rid: str, prompt: list[int], params: Any,
                    arrival_time: float | None = None) -> SimpleNamespace:
        req = SimpleNamespace(finished=False, arrival_time=arrival_time or time.perf_counter(),
                              seqs=[SimpleNamespace(num_output_tokens=params.max_tokens)])
        self.pending.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[SimpleNamespace]:
        done, self.pending = self.pending, []
        now = time.perf_counter()
        for r in done:
            r.first_token_time, r.finish_time, r.finished = now, now + 1e-3, True
        return done


def serve_rows() -> list[dict[str, Any]]:
    """offline, latency and decode-b1 rows from serve.py's own functions."""
    from minikernels.benchmarks import serve

    llm = SimpleNamespace(llm_engine=FakeEngine())
    work = serve.make_workload(4, (4, 8), (2, 3), 1000)
    return [serve.run_offline(llm, work), serve.run_latency(llm, work, 1e6),
            serve.run_decode_b1(llm, 8, 4, CEILINGS["copy_bytes_per_s"])]


def serve_meta(**kw: Any) -> dict[str, Any]:
    return {"model": "qwen2.5-0.5b", "dtype": "bfloat16", "quantization": None,
            "device": "h200", "kv_cache_dtype": "auto", "num_loras": 0,
            "copy_bytes_per_s": CEILINGS["copy_bytes_per_s"], **kw}


def serve_vs_hf_rows(tok_s: float, hf_tok_s: float) -> list[dict[str, Any]]:
    """serve_vs_hf.main's rows from its own functions (a stub transformers model), ours
    and hf-static's offline output_tok_s set; hf-cb fails (no generate_batch)."""
    from minikernels.benchmarks import serve_vs_hf as svh

    ours = serve_rows()
    hf = SimpleNamespace(generate=lambda **kw: None)
    work = [([1, 2, 3], 3), ([4, 5], 2)]
    rows = [{"system": "minikernels", **r} for r in ours]
    rows += [svh.hf_static(hf, work, 2, 0.6, "cpu"), svh.hf_continuous(hf, work, 0.6, "cpu"),
             svh.hf_decode_b1(hf, 8, 4, "cpu", ours[2]["floor_tok_s"])]
    rows[0]["output_tok_s"], rows[3]["output_tok_s"] = tok_s, hf_tok_s
    return rows


def serve_vs_hf_meta(model: str = "qwen2.5-0.5b") -> dict[str, Any]:
    return {"model": model, "dtype": "bfloat16", "quantization": None, "requests": 256,
            "smoke": False, "ceilings": CEILINGS, "speedup_vs_best_hf_offline": None}


# -------------------------------------------------------------- spec decode, engine
def spec_rows() -> list[dict[str, Any]]:
    """Rows as bench_spec_decode.timing_run appends them, through its own _finish."""
    from bench import bench_spec_decode

    def row(batch: int, method: str, ms: float, agreement: float | None = None) -> dict:
        return {"batch": batch, "method": method, "agreement": agreement, "ms_per_token": ms,
                "speedup": None, "tok_per_s": batch / ms * 1e3,
                "mean_acceptance_length": None if agreement is None else 3.1,
                "acceptance_rate": agreement, "steps_per_generate": 40.0,
                "draft_share": None if agreement is None else 0.2, "generate_s": 0.5,
                "prefill_only_s": 0.01, "generate_spread": 0.02,
                "tokens_per_generate": 128.0, "outputs_as_planned": 1.0, "engine_init_s": 2.0}
    return bench_spec_decode._finish([row(1, "draft-0.9", 2.0, 0.9), row(1, "off", 4.0),
                                      row(8, "off", 5.0), row(8, "ngram", 4.0)])


def engine_rows() -> list[dict[str, Any]]:
    """engine._row itself on a stub engine and timer."""
    from minikernels.benchmarks import engine

    llm = SimpleNamespace(llm_engine=SimpleNamespace(
        block_manager=SimpleNamespace(block_size=16), async_scheduling=True))
    timer = SimpleNamespace(steps=[1e-3, 2e-3, 1.5e-3], steps_excl=[],
                            totals={"schedule": 1e-3, "prepare": 5e-4, "sample": 4e-4})
    return [engine._row("steady", "generate", llm, timer, 0.0, 768, 0.01,
                        SimpleNamespace(max_s=1e-4), gpu_ms=None, device="cuda")]


# --------------------------------------------------------------------- the folder
def write_run(folder: Path, monkeypatch: pytest.MonkeyPatch, *, bw: float = 0.85,
              small: float = 3.3, large: float = 0.85, flash: float = 1.0,
              paged_bw: float = 0.9, paged_x: float = 2.0, tok_s: float = 30_000.0,
              vs_hf: float = 5.0) -> Path:
    """One run's result folder as bench/gpu_validation.sh's stages leave it, with every
    target's figure as given (the defaults: exactly at the targets)."""
    def put(name: str, rows: list, meta: dict) -> None:
        plumbing.write_results(name, rows, meta, out_dir=folder)

    put("int4_matmul", int4_rows(bw, small, large), int4_meta())
    put("attention", attention_rows(monkeypatch, flash), attention_meta())
    put("paged_decode", paged_rows(paged_bw, paged_x), paged_meta())
    put("ops", ops_rows(), {"ceilings": CEILINGS, "dtype": "bfloat16", "downsized": False,
                            "runs": 3, "truncated": False, "failed": []})
    plain = serve_rows()
    put("serve", plain, serve_meta())
    plumbing.write_json(folder / "serve_main.json", plain, serve_meta())
    plumbing.write_json(folder / "serve_fp8kv.json", serve_rows()[:1],
                        serve_meta(kv_cache_dtype="fp8"))
    put("serve_vs_hf", serve_vs_hf_rows(tok_s, tok_s / vs_hf), serve_vs_hf_meta())
    put("spec_decode_timing", spec_rows(), {"mode": "timing", "device": "cuda", "k": 4})
    put("engine", engine_rows(), {"default_block_size": 16, "scale": 1.0})
    return folder


def statuses(folder: Path) -> dict[str, str]:
    return {t.name: t.status for t in report.targets(report.load_run(folder))}


def measured(folder: Path) -> list[str]:
    return [t.measured for t in report.targets(report.load_run(folder))]


# -------------------------------------------------------------------------- tests
def test_targets_met_exactly_at_their_boundaries(tmp_path, monkeypatch):
    folder = write_run(tmp_path, monkeypatch)
    assert set(statuses(folder).values()) == {report.MET}, statuses(folder)
    got = measured(folder)
    assert got[0] == "85.0% (mk_cuda, 23.3 us)"     # not the wrong-output or other-shape row
    assert got[1].startswith("3.30x at M=16 (mk_cuda; lowest of M = 1, 2, 4, 8, 16)")
    assert got[2].startswith("0.85x (mk_auto")
    assert got[3].startswith("1.00x (") and "vs sdpa_cudnn" in got[3]
    assert got[4] == "90.0% (minikernels_cuda, 100 us)" and got[5].startswith("2.00x")
    assert got[6] == "30,000 tok/s" and got[7].startswith("5.00x (vs hf-static")


def test_targets_missed_just_below_show_enough_digits(tmp_path, monkeypatch):
    folder = write_run(tmp_path, monkeypatch, bw=0.8499, small=3.2999, large=0.8499,
                       flash=0.9999, paged_bw=0.8999, paged_x=1.9999, tok_s=29_999.9,
                       vs_hf=4.9999)
    assert set(statuses(folder).values()) == {report.MISSED}, statuses(folder)
    got = measured(folder)
    assert got[0].startswith("84.99%") and got[1].startswith("3.2999x at M=16")
    assert got[2].startswith("0.8499x") and got[3].startswith("0.9999x")
    assert got[4].startswith("89.99%") and got[5].startswith("1.9999x")
    assert got[6] == "29,999.9 tok/s" and got[7].startswith("4.9999x")


def test_a_wrong_int4_output_misses_instead_of_counting(tmp_path):
    rows = [int4_row(m, p, 10.0, 5.0, 0.95, correct=False)
            for m in (1, 16, 4096) for p in ("mk_triton", "mk_cuda")]
    plumbing.write_results("int4_matmul", rows, int4_meta(), out_dir=tmp_path)
    run = report.load_run(tmp_path)
    for t in report.targets(run)[:3]:
        assert t.status == report.MISSED and "wrong output" in t.measured, t


def test_no_data_for_absent_files_and_rows(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    got = report.targets(report.load_run(empty))
    assert [t.status for t in got] == [report.NO_DATA] * len(report.TARGETS)
    assert got[0].measured == "int4_matmul.json absent"
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.BEGIN}\nkept\n{report.END}\n")
    assert report.main([str(empty), "--readme", str(readme)]) == 2   # nothing to write
    assert "kept" in readme.read_text()

    other = tmp_path / "other"    # files present, the targets' rows not

    def put(name: str, rows: list, meta: dict) -> None:
        plumbing.write_results(name, rows, meta, out_dir=other)
    put("int4_matmul", [r for r in int4_rows(0.9, 4.0, 1.0) if r["shape"] != "8192->8192"],
        int4_meta())
    put("attention", attention_rows(monkeypatch, 1.2)[1:], attention_meta())   # d64 only
    put("paged_decode", paged_rows(0.95, 3.0), paged_meta(hkv=4, d=512))    # the d512 run
    put("serve_vs_hf", serve_vs_hf_rows(40_000.0, 1000.0), serve_vs_hf_meta(model="tiny"))
    got = report.targets(report.load_run(other))
    assert [t.status for t in got] == [report.NO_DATA] * len(report.TARGETS), got
    assert [t.measured for t in got[::2]] == [
        "no minikernels row at 8192->8192, M=1", "no minikernels row at 8192->8192, M=4096",
        "paged_decode.json ran Hq=32, Hkv=4, D=512, block=16",
        "serve_vs_hf.json ran tiny (quantization None)"]
    assert got[3].measured == "no row at d128 causal seqlen 4096"

    put("int4_matmul", int4_rows(0.9, 4.0, 1.0), int4_meta(group=32))
    assert report.target_int4_gemv(report.load_run(other)).measured == \
        "int4_matmul.json ran group 32, not 128"
    rows = [r for r in int4_rows(0.9, 4.0, 1.0) if r["peer"] != "cublas_bf16"]
    for r in rows:
        r["speedup_vs_cublas"] = None     # cuBLAS did not run: int4.py writes None
    put("int4_matmul", rows, int4_meta())
    run = report.load_run(other)
    assert report.target_int4_gemv(run).status == report.MET
    assert report.target_int4_large_m(run).status == report.NO_DATA


def test_per_file_tables_and_environment_line(tmp_path, monkeypatch):
    folder = write_run(tmp_path, monkeypatch)
    block = report.render(folder)
    assert block.index("| target |") < block.index("<details>")
    for name in ("int4_matmul", "attention", "paged_decode", "serve_vs_hf", "ops",
                 "spec_decode_timing", "engine"):
        assert f"<code>{name}.json</code>" in block, name
    assert "| serve_main.json |" in block and "| serve_fp8kv.json |" in block
    assert "| serve.json |" not in block            # the same rows as serve_main.json
    assert "| 8192->8192 | 1 | mk_cuda | 23.3 | 85.0% |" in block
    assert "| rms_norm+residual | 4096x4096 | triton | 10 |" in block
    assert "| torch | 20 | 2.00x |" in block and "| _scaled_mm rowwise | 15 | 1.50x |" in block
    assert "| 1 | draft-0.9 | 2 | 2.00x |" in block        # _finish: vs off, same batch
    assert "| 64 | 4096 | minikernels_cuda | 100 |" in block and "skipped" in block
    assert "| hf-cb | offline |" in block and "no generate_batch" in block
    last = block.rstrip().splitlines()[-1]
    env = plumbing.environment()
    assert last.startswith(f"Device: {env['device']}, torch {env['torch']}, "
                           f"triton {env['triton']}")
    assert "copy bandwidth 4.30 TB/s (attention, int4_matmul, ops, paged_decode, serve, " \
        "serve_fp8kv, serve_main, serve_vs_hf);" in last
    assert last.endswith("bf16 matmul 790 TFLOP/s (attention, int4_matmul, ops, paged_decode, "
                         "serve_vs_hf).")
    assert report.render(folder) == block                   # deterministic, for --check


def test_readme_block_is_replaced_and_checked(tmp_path, monkeypatch, capsys):
    folder = write_run(tmp_path / "h200", monkeypatch)
    head, tail = "# x\n\n## Performance\n\n", "\n\n## Layout\n\nmore\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"{head}{report.BEGIN}\nNo GPU run yet.\n{report.END}{tail}")
    args = [str(folder), "--readme", str(readme)]
    assert report.main(args + ["--check"]) == 1
    assert "No GPU run yet." in readme.read_text()               # --check changes nothing
    assert report.main(args) == 0
    text = readme.read_text()
    assert text.startswith(f"{head}{report.BEGIN}\n") and text.endswith(f"\n{report.END}{tail}")
    assert report.read_block(text) == report.render(folder).strip("\n")
    assert report.main(args + ["--check"]) == 0
    assert report.main([str(tmp_path / "h200")]) == 0       # no --readme: printed
    assert report.render(folder).strip() in capsys.readouterr().out
    plumbing.write_results("int4_matmul", int4_rows(0.84, 3.3, 0.85), int4_meta(),
                           out_dir=folder)                 # the files change
    assert report.main(args + ["--check"]) == 1
    assert "84.0%" in capsys.readouterr().err and report.read_block(readme.read_text()) \
        != report.render(folder).strip("\n")
    with pytest.raises(SystemExit):
        report.main([str(folder), "--check"])               # --check needs --readme
    readme.write_text("no markers\n")
    assert report.main(args) == 2 and readme.read_text() == "no markers\n"


def test_unpacked_archive_layout_and_unread_files(tmp_path, monkeypatch):
    """gpu_results.tar.gz unpacked as is puts the files under results/; a JSON that is not
    a results file is named, not read."""
    write_run(tmp_path / "results", monkeypatch, bw=0.9)
    (tmp_path / "results" / "spec_decode.json").write_text('{"config": {}, "results": {}}')
    run = report.load_run(tmp_path)
    assert run.folder == tmp_path / "results" and "int4_matmul" in run.files
    assert run.unread == ["spec_decode.json (no meta / rows)"]
    assert "Not read (not a results file): spec_decode.json" in report.render(tmp_path)


def test_missing_folder_or_readme_is_named(tmp_path, capsys):
    """A results folder or README that does not exist is an error naming the argument."""
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "nope")])
    assert exc.value.code == 2 and "results_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path), "--readme", str(tmp_path / "README.md")])
    assert exc.value.code == 2 and "--readme" in capsys.readouterr().err


def test_repo_readme_has_one_perf_block_in_performance():
    text = (ROOT / "README.md").read_text()
    report.read_block(text)            # exactly one of each marker, in order
    assert text.index("## Performance") < text.index(report.BEGIN) < \
        text.index(report.END) < text.index("## Layout")


def test_readme_block_matches_a_committed_gpu_run():
    folder = ROOT / "bench" / "results" / "h200"
    if not report.load_run(folder).files:
        pytest.skip("no GPU run committed under bench/results/h200 yet")
    assert report.main([str(folder), "--readme", str(ROOT / "README.md"), "--check"]) == 0, \
        "regenerate: python -m minikernels.benchmarks.report bench/results/h200 --readme README.md"


def _assert_in_source(obj: Any, *snippets: str) -> None:
    src = inspect.getsource(obj)
    missing = [s for s in snippets if s not in src]
    assert not missing, f"{getattr(obj, '__name__', obj)} no longer has {missing}: " \
                        "update minikernels/benchmarks/report.py and these tests"


def test_benchmarks_still_write_these_keys():
    """The rows mirrored above (int4.py and paged_decode.py build theirs inline) and the
    meta keys report.py reads, as the benchmarks' sources write them; their defaults
    still time the targets' workloads."""
    from bench import bench_spec_decode
    from minikernels.benchmarks import attention, int4, paged_decode, serve, serve_vs_hf

    _assert_in_source(int4, '"shape": f"{k}->{n}", "M": m, "peer": name, "us": t * 1e6',
                      '"bw_frac": (nbytes / t / bw)', '"flops_frac"', '"correct": ok',
                      'r["speedup_vs_cublas"] = (base / (r["us"] / 1e6))',
                      'peers["cublas_bf16"]', 'peers["tinygemm"]', 'peers[f"mk_{b}"]',
                      '["triton", "cuda", "auto"]', '"group_size": group',
                      '"copy_bandwidth_GBps": bw / 1e9',
                      '"bf16_matmul_TFLOPs": flops_peak / 1e12', 'write_results("int4_matmul"')
    assert (8192, 8192) in int4.SHAPES and int4.GROUP == 128
    assert {1, 16, 4096} <= set(int4.M_VALUES)
    assert tuple(attention.PEERS[:3]) == report.SDPA_BACKENDS
    _assert_in_source(attention.run_shape, '"head_dim": d, "causal": causal, "seqlen": s',
                      'row["minikernels_tflops"]', 'row[f"{peer}_tflops"]',
                      'row["best_sdpa_tflops"]', 'row["vs_best_sdpa"]',
                      'row["frac_matmul_ceiling"]')
    _assert_in_source(attention._run, '"ceilings": ceil', 'write_results("attention"',
                      "[64, 128]", " 4096,")
    _assert_in_source(paged_decode.bench_shape, 'impls["minikernels_triton"]',
                      'impls["minikernels_cuda"]', 'impls["gather_sdpa"]',
                      'rows.append(dict(batch=batch, context=ctx, impl=name',
                      'kv_dtype="fp8_e4m3" if is_fp8 else str(inp["q"].dtype)[6:]',
                      'us=seconds * 1e6', 'frac_copy_bw=', 'r["speedup_vs_gather_sdpa"]',
                      'impl=name, skipped=why')
    assert str(torch.bfloat16)[6:] == "bfloat16"
    _assert_in_source(paged_decode.main, "shapes=f\"Hq={cfg['hq']}, Hkv={cfg['hkv']}, "
                      "D={cfg['d']}, block={cfg['block']}\"", "ceilings=ceil",
                      'write_results("paged_decode"')
    assert 64 in paged_decode.BATCHES and 4096 in paged_decode.CONTEXTS
    assert (paged_decode.HKV, paged_decode.D) == (8, 128)
    _assert_in_source(serve.run, '"model": model', '"quantization": args.quantization',
                      '"kv_cache_dtype": args.kv_cache_dtype', '"num_loras": args.num_loras',
                      '"copy_bytes_per_s": copy_bw', 'write_results("serve"',
                      "write_json(args.output_json")
    _assert_in_source(serve_vs_hf.main, 'rows.append({"system": "minikernels", **off})',
                      '"model": model', '"quantization": args.quantization',
                      '"ceilings": ceil', '("qwen2.5-0.5b" if gpu else "tiny")',
                      'write_results("serve_vs_hf"')
    _assert_in_source(bench_spec_decode.timing_run, '"batch": b, "method": label',
                      '"ms_per_token": 1e3 * tpot', '"tok_per_s"', '"mean_acceptance_length"',
                      '"acceptance_rate"', '"draft_share"', '"outputs_as_planned"')
    _assert_in_source(bench_spec_decode.write_timing, 'write_results("spec_decode_timing"')
