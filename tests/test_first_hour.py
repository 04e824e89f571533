"""A new user's first hour (issue 16): hub model ids (offline, against a hub cache laid out
in a temp dir), one-line errors for the usual mistakes, quantize_model's summary, the CLI's
help and flag names."""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from test_generate import tiny_hf_dir  # noqa: F401  (fixture: a tiny Llama + tokenizer)

import minikernels as mk
from minikernels.cli import main
from minikernels.models.hub import ALLOW_PATTERNS, is_hub_id, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REV = "0123456789abcdef0123456789abcdef01234567"
REV2 = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "acme/tiny-llama"


def _run(code: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full = dict(os.environ, MINIKERNELS_NO_PROGRESS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def hub_cache(tmp_path, tiny_hf_dir):  # noqa: F811
    """HF_HOME with models--acme--tiny-llama/snapshots/<rev>/ (refs/main -> REV) and a second
    snapshot REV2 (no ref), as huggingface_hub lays out its cache; a pickle file too."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--acme--tiny-llama"
    for rev in (REV, REV2):
        shutil.copytree(tiny_hf_dir, repo / "snapshots" / rev)
    (repo / "snapshots" / REV2 / "MARKER").write_text("second")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return home


@pytest.fixture()
def offline_hub(hub_cache, monkeypatch):
    """This process's huggingface_hub pointed at hub_cache, offline (its env is read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


# ------------------------------------------------------------------------ 2. hub ids
def test_is_hub_id():
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("gpt2")
    for path in ("./model", "/abs/model", "../m", "models--a--b", "a/b/c", "m.safetensors"):
        assert not is_hub_id(path), path


def test_hub_id_resolves_from_the_cache_offline(offline_hub):
    path = resolve_model(REPO)
    assert path == str(offline_hub / "hub" / "models--acme--tiny-llama" / "snapshots" / REV)
    other = resolve_model(REPO, revision=REV2)
    assert os.path.isfile(os.path.join(other, "MARKER"))
    m = mk.models.load_model(REPO, dtype="float32", device="cpu")
    assert m.name_or_path == REPO
    tok = mk.models.load_tokenizer(REPO)
    assert tok.encode("hello world") == [1, 4, 5]


def test_llm_with_a_hub_id_offline(offline_hub):
    llm = mk.LLM(REPO, dtype="float32", device="cpu", enforce_eager=True, num_kv_blocks=32,
                 max_model_len=64)
    out = llm.generate(["the cat"], mk.SamplingParams(temperature=0.0, max_tokens=3))
    assert len(out[0].outputs[0].token_ids) >= 1 and isinstance(out[0].outputs[0].text, str)
    assert llm.llm_engine.tokenizer is not None          # the snapshot's own tokenizer
    assert llm.model_name == REPO
    pinned = mk.LLM(REPO, revision=REV2, dtype="float32", device="cpu", num_kv_blocks=32,
                    max_model_len=64)
    assert str(pinned.llm_engine.model.name_or_path).endswith(REV2)   # that snapshot
    with pytest.raises(TypeError, match="revision must be a str"):
        mk.LLM(REPO, revision=3)


def test_hub_id_not_cached_offline_is_one_line(offline_hub):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model("acme/not-downloaded")
    msg = str(info.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "acme/not-downloaded" in msg
    with pytest.raises(FileNotFoundError, match="local HF model directory, a hub id"):
        mk.models.load_model("./no/such/dir")


def test_snapshot_download_asks_only_for_safetensors_config_tokenizer(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model("org/name", revision="v1") == str(tmp_path)
    assert seen["repo_id"] == "org/name" and seen["revision"] == "v1"
    assert "token" not in seen          # HF_TOKEN / `hf auth login`, read by huggingface_hub

    def fetched(f):
        return any(fnmatch.fnmatch(f, p) for p in seen["allow_patterns"])
    for f in ("model.safetensors", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "config.json", "generation_config.json",
              "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "vocab.json", "merges.txt"):
        assert fetched(f), f
    for f in ("pytorch_model.bin", "model.pt", "consolidated.pth", "original/params.json",
              "onnx/model.onnx", "README.md"):
        assert not fetched(f), f
    assert tuple(seen["allow_patterns"]) == ALLOW_PATTERNS


@pytest.mark.slow
def test_cli_generate_with_a_hub_id_offline_env(hub_cache):
    """The real environment variables (HF_HOME, HF_HUB_OFFLINE) in a fresh process."""
    out = _run(f"""
        import sys
        from minikernels.cli import main
        sys.exit(main(["generate", "--model", "{REPO}", "--prompt", "the cat", "--max-tokens",
                       "3", "--dtype", "float32", "--device", "cpu"]))
        """, env={"HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
    missing = _run("""
        import sys
        from minikernels.cli import main
        sys.exit(main(["generate", "--model", "acme/absent", "--prompt", "x"]))
        """, env={"HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 1
    lines = [ln for ln in missing.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "acme/absent" in lines[0] and "Traceback" not in missing.stderr


# -------------------------------------------------------------------- 3. one-line errors
def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_serve_without_fastapi_names_the_extra():
    out = _run("""
        import sys
        sys.modules["fastapi"] = None      # as if the [serve] extra were not installed
        from minikernels.cli import main
        sys.exit(main(["serve", "tiny"]))
        """)
    assert out.returncode == 2
    _one_line_error(out, "fastapi", "[serve]", "pip install")


@pytest.mark.slow
def test_generate_hf_dir_without_transformers_names_the_extra(tiny_hf_dir):  # noqa: F811
    out = _run(f"""
        import sys
        sys.modules["transformers"] = None
        from minikernels.cli import main
        sys.exit(main(["generate", "--model", {tiny_hf_dir!r}, "--prompt", "the cat",
                       "--max-tokens", "2", "--device", "cpu"]))
        """)
    assert out.returncode == 2
    _one_line_error(out, "transformers", "[hf]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["generate", "--model", "tiny", "--prompt", "x"],
                                  ["serve", "tiny"], ["bench", "serve"], ["bench", "ops"]])
def test_device_cuda_without_cuda_is_one_line(argv, capsys):
    assert main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cuda" in err and "--device cpu" in err
    with pytest.raises(ValueError, match="CPU-only build|sees no CUDA GPU"):
        mk.models.load_model("tiny", device="cuda")


def test_generate_loads_the_model_before_the_tokenizer(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["generate", "--model", str(empty), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "config.json" in err and "sentencepiece" not in err.lower() and "\n" not in err


# ------------------------------------------------------------------ 4. quantize_model
def test_quantize_model_picks_a_dividing_group_warns_and_summarizes():
    from minikernels.nn import Int4Linear

    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64),
                          nn.Linear(96, 8), nn.Linear(60, 8))
    model.lm_head = nn.Linear(64, 64)
    with pytest.warns(UserWarning, match=r"kept dense.*4 \(60 -> 8"):
        mk.quantize_model(model, group_size=128)
    assert isinstance(model[0], Int4Linear) and model[0].group_size == 64
    assert isinstance(model[2], Int4Linear) and model[2].group_size == 128
    assert isinstance(model[3], Int4Linear) and model[3].group_size == 32
    assert type(model[4]) is nn.Linear and type(model.lm_head) is nn.Linear
    s = model.quantization_summary
    assert s.converted == {"0": 64, "2": 128, "3": 32}
    assert set(s.kept_dense) == {"4", "lm_head"} and s.kept_dense["lm_head"] == "skip"
    assert "3 linear layers to int4" in str(s) and "2 kept dense" in str(s)


def test_quantize_model_hidden_64_hf_model_converts_every_linear():
    from test_model_support import make_hf_model

    from minikernels.nn import Int4Linear

    model = make_hf_model("llama", hidden_size=64, intermediate_size=128)
    mk.quantize_model(model)                     # group_size 128 > hidden 64
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int4Linear))
               and n != "lm_head"]
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in linears), linears
    assert not {k for k, v in model.quantization_summary.kept_dense.items() if v != "skip"}


# ------------------------------------------------------------------------------ 5. CLI
HELPS = [["--help"], ["generate", "--help"], ["serve", "--help"], ["bench", "--help"],
         ["bench", "ops", "--help"], ["bench", "serve", "--help"], ["bench", "engine", "--help"]]


@pytest.mark.parametrize("argv", HELPS, ids=lambda a: " ".join(a))
def test_help_is_clean_and_shows_defaults(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for bad in ("``", ":mod:", ":class:", ":func:", "imported only when", "None]", "{None"):
        assert bad not in out, (bad, out)
    if argv[-2:] == ["serve", "--help"] and argv[0] == "serve":
        assert "(default: 8000)" in out and "--no-enable-prefix-caching" in out
    if argv[:2] == ["bench", "serve"]:
        assert "--enable-prefix-caching" in out and "--num-prompts" in out
        assert "--no-prefix-caching" not in out     # old spelling: a hidden alias
        assert "--result-dir" in out and "--output-json" in out


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["generate", "--help"],
                                  ["bench", "serve", "--help"], ["bench", "ops", "--help"],
                                  ["serve", "--help"], ["bench", "engine", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(argv):
    """--help is quick (0.1-0.3 s, was 2-3 s): torch (1.4 s to import here) stays unloaded."""
    out = _run(f"""
        import sys, contextlib, io
        from minikernels.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main({argv!r})
            except SystemExit:
                pass
        print("torch" in sys.modules)
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_kv_cache_dtype_names_resolve():
    import torch

    from minikernels.models.kv_cache_dtype import KV_CACHE_DTYPE_NAMES, resolve_kv_cache_dtype

    assert [resolve_kv_cache_dtype(n) for n in KV_CACHE_DTYPE_NAMES] == [
        None, torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e5m2]


def test_flag_names_match_across_commands():
    import argparse

    from minikernels.benchmarks import serve as bench_serve
    from minikernels.server import cli as server_cli

    def flags(add):
        p = argparse.ArgumentParser()
        add(p)
        return {s for a in p._actions for s in a.option_strings}
    serve, bench = flags(server_cli.add_arguments), flags(bench_serve.add_arguments)
    shared = {"--dtype", "--quantization", "--device", "--block-size", "--kv-cache-dtype",
              "--num-kv-blocks", "--gpu-memory-utilization", "--max-num-seqs",
              "--max-num-batched-tokens", "--enable-prefix-caching",
              "--no-enable-prefix-caching", "--enforce-eager", "--max-model-len", "--seed"}
    assert shared <= serve and shared <= bench, (shared - serve, shared - bench)
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    old = p.parse_args(["--no-prefix-caching", "--num-requests", "3", "--output", "x.json"])
    new = p.parse_args(["--no-enable-prefix-caching", "--num-prompts", "3",
                        "--output-json", "x.json"])
    assert vars(old) == vars(new) and new.enable_prefix_caching is False
    with pytest.raises(SystemExit):
        p.parse_args(["--quantization", "None"])


# ----------------------------------------------------------- 9. benchmarks in one home
def test_gpu_validation_commands_still_parse():
    """Every python command of bench/gpu_validation.sh's bench and serve stages still parses
    (run with --help: the same entry points, flags and module paths, no GPU needed)."""
    import re
    import shlex

    script = open(os.path.join(ROOT, "bench", "gpu_validation.sh")).read()
    commands = []
    for line in re.sub(r"\\\n\s*", " ", script).splitlines():
        line = line.strip()
        if line.startswith("python ") and "||" in line and "-m pip " not in line:
            commands.append(line.split("||")[0].replace('"$OUT', '"/tmp/out').strip())
    assert len(commands) >= 7, commands
    joined = " ".join(commands)
    for needed in ("-m minikernels bench ", "-m bench.bench_int4", "-m bench.bench_attention",
                   "-m bench.bench_paged_decode", "bench serve", "--kv-cache-dtype fp8",
                   "bench/bench_serve.py"):
        assert needed in joined, needed
    for cmd in commands:
        code, out, err = _run_main_in_process(shlex.split(cmd)[1:] + ["--help"])
        assert code in (0, None), (cmd, err[-2000:])
        assert "usage:" in out, cmd


def test_gpu_validation_test_stage_lists_real_files_and_parallel_args():
    """The test stage's files exist (pytest given a missing one runs nothing: exit 4), and
    its pytest arguments spread the files over GPU_TEST_WORKERS xdist processes with a
    per-test timeout where the plugins are installed (the image has both), none with
    GPU_TEST_WORKERS=0."""
    import re

    script = open(os.path.join(ROOT, "bench", "gpu_validation.sh")).read()
    code = "\n".join(line.split("#")[0] for line in script.splitlines())
    for name in ("CUDA_TESTS", "GPU_TESTS"):
        body = re.search(r"^" + name + r"=\((.*?)\)", code, re.S | re.M)
        assert body is not None, name
        files = [w for w in body.group(1).split() if w.startswith("tests/")]
        assert files, name
        missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
        assert not missing, (name, missing)
    helper = re.search(r"pytest_parallel_args\(\) \{\n  python - <<'EOF'\n(.*?)\nEOF\n",
                       script, re.S)
    assert helper is not None, "pytest_parallel_args' python heredoc"

    def args(**env: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", helper.group(1)], capture_output=True,
                             text=True, env={**os.environ, **env}, check=True).stdout
        return out.split()

    have_xdist = importlib.util.find_spec("xdist") is not None
    have_timeout = importlib.util.find_spec("pytest_timeout") is not None
    got = args(GPU_TEST_WORKERS="3", GPU_TEST_TIMEOUT="77")
    assert (["-n", "3", "--dist", "loadfile"] == got[:4]) == have_xdist, got
    assert ("77" in got and "thread" in got) == have_timeout, got
    assert "-n" not in args(GPU_TEST_WORKERS="0")


def test_gpu_stage_engines_have_fixed_kv_pools():
    """The test stage runs its files in several processes on one GPU, so an engine that
    may land on cuda (device not "cpu") in those files sizes its KV pool with
    num_kv_blocks: a pool sized by gpu_memory_utilization (0.9 of the card) would take
    the other processes' memory."""
    import ast
    import re

    script = open(os.path.join(ROOT, "bench", "gpu_validation.sh")).read()
    code = "\n".join(line.split("#")[0] for line in script.splitlines())
    files = set()
    for name in ("CUDA_TESTS", "GPU_TESTS"):
        body = re.search(r"^" + name + r"=\((.*?)\)", code, re.S | re.M)
        files |= {w for w in body.group(1).split() if w.startswith("tests/")}
    unsized = []
    for path in sorted(files):
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = getattr(fn, "id", None) or getattr(fn, "attr", None)
            if name not in ("LLM", "AsyncLLM", "LLMEngine"):
                continue
            if any(isinstance(a, ast.Constant) and not isinstance(a.value, str)
                   for a in node.args):
                continue                       # LLM(42): a bad-input test
            kws = {k.arg: k.value for k in node.keywords}
            device = kws.get("device")
            if isinstance(device, ast.Constant) and device.value == "cpu":
                continue
            if "num_kv_blocks" not in kws:
                unsized.append(f"{path}:{node.lineno}")
    assert not unsized, unsized


def test_gpu_wheels_are_closed_under_their_requirements():
    """bench/fetch_gpu_wheels.sh pins every package the H200 image lacks for the server,
    the openai client and the structured-output backends: each pinned package's own
    requirements (markers for the image's python 3.12 on linux, no extras) are pinned
    too or in the image (IMAGE_HAS). Checked from the metadata of the versions installed
    here, for the pins that match them (CI may install newer ones)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    script = open(os.path.join(ROOT, "bench", "fetch_gpu_wheels.sh")).read()
    code = "\n".join(line.split("#")[0] for line in script.splitlines())

    def array(name: str) -> list[str]:
        body = re.search(r"^" + name + r"=\((.*?)\)", code, re.S | re.M)
        assert body is not None, name
        return body.group(1).split()

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = dict(w.split("==") for w in array("WHEELS"))
    assert all(pins.values()), pins
    known = {norm(n) for n in pins} | {norm(n) for n in array("IMAGE_HAS")}
    for needed in ("fastapi", "uvicorn", "openai", "xgrammar", "outlines-core", "jsonschema"):
        assert needed in known, needed
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    checked = 0
    for name, version in pins.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate(env):
                assert norm(req.name) in known, f"{name}=={version} needs {req.name}"
    assert checked or not importlib.util.find_spec("fastapi"), "no pin matches this machine"


def _run_main_in_process(argv: list[str]) -> tuple:
    """``python ARGV`` (``-m module ...`` or ``script.py ...``) run in this process as
    __main__ (what the interpreter would run, without a fresh interpreter's ~2 s of
    imports per command) -> (exit code, stdout, stderr)."""
    import contextlib
    import io
    import runpy

    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if argv[0] == "-m":
                sys.argv = [argv[1]] + argv[2:]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = argv
                runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def test_benchmarks_have_one_home():
    import importlib

    for name in ("plumbing", "ops", "int4", "attention", "paged_decode", "serve",
                 "serve_vs_hf", "engine"):
        importlib.import_module(f"minikernels.benchmarks.{name}")
    for script in ("bench_int4", "bench_attention", "bench_paged_decode", "bench_serve"):
        text = open(os.path.join(ROOT, "bench", f"{script}.py")).read()
        assert "from minikernels.benchmarks." in text and len(text.splitlines()) < 25, script
    from minikernels.cli import BENCHES
    assert all(spec[0].startswith("minikernels.benchmarks.") for spec in BENCHES.values())


def test_bench_ops_writes_a_plot_and_reports_spread(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["bench", "ops", "--device", "cpu", "--rep", "3", "--result-dir",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spread" in out and "CPU timings swing" in out
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"ops.{ext}").stat().st_size > 0
    import json
    rows = json.loads((tmp_path / "ops.json").read_text())["rows"]
    assert all(r["runs"] == 3 and r["p10_us"] <= r["us"] <= r["p90_us"] for r in rows)


def test_bench_ops_keeps_going_past_a_broken_case_and_writes_when_interrupted(
        tmp_path, monkeypatch, capsys):
    """A case that raises is named (rc 1) while the others are still measured; a SIGINT
    (the GPU run's stage cap) still writes the rows measured before it."""
    import json

    from minikernels.benchmarks import ops as bench_ops

    real = bench_ops.op_cases

    def broken(device, dtype, small):
        cases = real(device, dtype, small)[:3]
        cases[1].run = lambda: 1 / 0
        return cases
    monkeypatch.setattr(bench_ops, "op_cases", broken)
    assert main(["bench", "ops", "--device", "cpu", "--rep", "2", "--result-dir",
                 str(tmp_path)]) == 1
    meta = json.loads((tmp_path / "ops.json").read_text())
    assert len(meta["rows"]) == 2 and "ZeroDivisionError" in meta["meta"]["failed"][0]

    def interrupted(device, dtype, small):
        cases = real(device, dtype, small)[:3]

        def stop():
            raise KeyboardInterrupt
        cases[2].run = stop
        return cases
    monkeypatch.setattr(bench_ops, "op_cases", interrupted)
    assert main(["bench", "ops", "--device", "cpu", "--rep", "2", "--result-dir",
                 str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "ops.json").read_text())
    assert len(meta["rows"]) == 2 and meta["meta"]["truncated"]
    assert "interrupted" in capsys.readouterr().out


def test_result_dir_in_help_is_where_files_go(monkeypatch, tmp_path):
    from minikernels.benchmarks import plumbing

    monkeypatch.delenv(plumbing.RESULTS_ENV, raising=False)
    assert plumbing.results_dir("cpu") == plumbing.RESULTS_DIR / "cpu"
    assert plumbing.RESULTS_DIR == plumbing._REPO_ROOT / "bench" / "results"  # a checkout
    monkeypatch.setenv(plumbing.RESULTS_ENV, str(tmp_path))
    assert plumbing.results_dir("cpu") == tmp_path
    import argparse
    p = argparse.ArgumentParser()
    plumbing.add_result_arguments(p, "x")
    assert str(tmp_path) in p.format_help().replace("\n", "").replace(" ", "") or \
        os.path.relpath(tmp_path) in p.format_help()
