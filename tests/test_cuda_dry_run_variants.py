"""The CUDA paths of the engine's variants, dry-run on the CPU (tests/fake_cuda.py; the
checks and the model families: tests/test_cuda_dry_run.py): quantized weights, MoE, fp8
KV, LoRA, the speculative proposers' graphs, built-in models at their real shapes (the GPU
run's serving engine among them), and the sampler on the overlap path."""
from __future__ import annotations

import pathlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import AOT_SUBSET  # noqa: E402
from fake_cuda import A100, HostSync, fake_gpu, fake_h200  # noqa: E402
from test_cuda_dry_run import (GRAPH_SIZES, assert_compiled_ahead,  # noqa: E402,F401
                               build_on_fake_h200, check_engine, checkpoints)
from test_sampler import seq_for  # noqa: E402

from minikernels import ops  # noqa: E402
from minikernels.engine import LLM, SamplingParams  # noqa: E402
from minikernels.engine.sampler import Sampler, needs_host_tokens  # noqa: E402


def _eagle_checkpoints(root: pathlib.Path) -> tuple[str, str]:
    from test_eagle import _bigram_target, _save_oracle_head

    target = _bigram_target(root / "bigram", seed=20)
    _save_oracle_head(root / "head", target, 0.03, 22)
    return str(root / "bigram"), str(root / "head")


VARIANTS = {
    "int4": ("llama", dict(quantization="int4")),
    "fp8": ("llama", dict(quantization="fp8")),
    "int8": ("llama", dict(quantization="int8")),
    "moe-int4": ("qwen3-moe", dict(quantization="int4")),
    "moe-fp8": ("qwen3-moe", dict(quantization="fp8")),
    "gated-delta-int4": ("qwen3_5", dict(quantization="int4")),
    "fp8-kv": ("llama", dict(kv_cache_dtype="fp8")),
    "fp8-kv-sliding-softcap": ("gemma2-window-softcap", dict(kv_cache_dtype="fp8")),
    "fp8-kv-sinks": ("granite_swa", dict(kv_cache_dtype="fp8")),
    "lora": ("llama", dict(enable_lora=True, max_lora_rank=8)),
    "ngram": ("llama", dict(speculative_config={"method": "ngram",
                                                "num_speculative_tokens": 3})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_variants_capture_on_a_gpu(checkpoints, variant):
    kind, kw = VARIANTS[variant]
    llm, launches = build_on_fake_h200(checkpoints[kind], **kw)
    check_engine(llm, launches)
    if "speculative_config" in kw:
        assert llm.llm_engine.runner.verify_graphs.sizes == GRAPH_SIZES
        assert "flash_attn_fwd_kernel" in {x.kernel for x in launches}


#: engines on a fake A100 (sm_80: no fp8 hardware, 108 SMs, 163 KiB of shared memory per
#: block; the kernels pick their sm_80 tiles and split counts): (family, dtype, options)
A100_CASES = {
    "llama": ("llama", "bfloat16", {}),
    "llama-fp32": ("llama", "float32", {}),
    "int4": ("llama", "bfloat16", dict(quantization="int4")),
    "fp8-weights": ("llama", "bfloat16", dict(quantization="fp8")),
    "int8": ("llama", "bfloat16", dict(quantization="int8")),
    "moe-fp8": ("qwen3-moe", "bfloat16", dict(quantization="fp8")),
    "gemma2-window-softcap": ("gemma2-window-softcap", "bfloat16", {}),
    "mamba2": ("mamba2", "bfloat16", {}),
    "gated-delta": ("qwen3_5", "bfloat16", {}),
    "lora": ("llama", "bfloat16", dict(enable_lora=True, max_lora_rank=8)),
    "fp8-kv": ("llama", "bfloat16", dict(kv_cache_dtype="fp8")),   # e4m3 as bytes
    "fp8-e5m2-kv": ("llama", "bfloat16", dict(kv_cache_dtype="fp8_e5m2")),   # natively
}


@pytest.mark.parametrize("case", sorted(A100_CASES))
def test_engine_runs_on_an_a100(checkpoints, case):
    """The same checks on a fake A100: graphs capture sync-free, eager steps never wait,
    and every launch is a configuration compiled ahead of time *for sm_80* (the fp8 weight
    kernels and fp8 KV caches convert e4m3 bytes in software there)."""
    from test_cuda_dry_run import run_eager_steps

    kind, dtype, kw = A100_CASES[case]
    llm, launches = build_on_fake_h200(checkpoints[kind], dtype, gpu_props=A100, **kw)
    check_engine(llm, launches, arch=80)
    assert_compiled_ahead(run_eager_steps(llm.llm_engine.runner.model, A100), arch=80)


@pytest.mark.skipif(AOT_SUBSET != "all", reason="compiles every launch of the A100 "
                    "engines (~3 CPU-minutes): with MK_AOT=all")
def test_a100_engines_launch_kernels_that_compile(checkpoints, tmp_path):
    """Every distinct launch of the engines on a fake A100 (A100_CASES, the serving
    engine qwen2.5-0.5b int4, buckets to 64, and qwen3-0.6b over an fp8 cache), tiles as an A100 picks them, compiles for
    sm_80 as its first launch there would: no spills, shared memory within 163 KiB."""
    from test_cuda_dry_run import compile_exactly, run_eager_steps

    records = []
    for kind, dtype, kw in A100_CASES.values():
        llm, launches = build_on_fake_h200(checkpoints[kind], dtype, gpu_props=A100, **kw)
        launches += run_eager_steps(llm.llm_engine.runner.model, A100)
        records += [launch.record() for launch in launches]
    with fake_gpu(A100) as gpu:
        llm = LLM("qwen2.5-0.5b", dtype="bfloat16", device="cuda", tokenizer=None,
                  num_kv_blocks=4096, block_size=16, max_num_seqs=64, quantization="int4")
    records += [launch.record() for launch in gpu.launches +
                run_eager_steps(llm.llm_engine.runner.model, A100)]
    with fake_gpu(A100) as gpu:   # head dim 128 over an fp8 cache read as bytes
        llm = LLM("qwen3-0.6b", dtype="bfloat16", device="cuda", tokenizer=None,
                  num_kv_blocks=1024, block_size=16, max_num_seqs=16, kv_cache_dtype="fp8")
    records += [launch.record() for launch in gpu.launches +
                run_eager_steps(llm.llm_engine.runner.model, A100)]
    compiled = compile_exactly(records, tmp_path, archs=(80,))
    assert len(compiled) >= 40


def test_fp8_w8a8_runs_w8a16_without_fp8_tensor_cores(checkpoints, caplog):
    """quantization="fp8_w8a8" on an A100 (no fp8 tensor cores: the W8A8 ops' reference
    path there) loads the same fp8 weights and runs them W8A16 (fp8_matmul), with a
    warning, as vLLM runs FP8 checkpoints on such GPUs; on the H200 it runs W8A8."""
    from minikernels.models.linear import Fp8Part

    def modes(llm):
        model = llm.llm_engine.runner.model
        return model.quantization, {p.activations for p in model.modules()
                                    if isinstance(p, Fp8Part)}

    with caplog.at_level("WARNING", logger="minikernels"):
        llm, launches = build_on_fake_h200(checkpoints["llama"], quantization="fp8_w8a8",
                                           gpu_props=A100)
    assert modes(llm) == ("fp8", {"none"}) and "run W8A16" in caplog.text
    kernels = {x.kernel for x in launches}
    assert "fp8_gemv_kernel" in kernels and not kernels & {
        "w8a8_block_fp8_matmul_kernel", "per_token_group_quant_fp8_kernel"}, kernels
    llm, _ = build_on_fake_h200(checkpoints["llama"], quantization="fp8_w8a8")
    assert modes(llm) == ("fp8_w8a8", {"dynamic"})


def test_fp8_kv_cache_reads_bytes_before_ada(checkpoints):
    """Triton compiles no e4m3 (fp8e4nv) loads or stores for sm_80 ("type fp8e4nv not
    supported in this architecture"): on an A100 the fp8 KV cache's kernels take its bytes
    (int8 views) and convert in software (ops/triton/fp8_bits.py); Ada (8.9) and Hopper keep
    the native e4m3 tiles. The A100_CASES "fp8-kv" engine checks that every such launch
    is an sm_80 spec."""
    import types

    from minikernels.engine.model_runner import index_checks_off

    def cache_dtypes(launches):
        cache_ptr = {"paged_decode_kernel": "k_ptr", "flash_attn_fwd_kernel": "k_ptr",
                     "write_kv_cache_kernel": "kc_ptr"}
        return {str(launch.pointers[cache_ptr[launch.kernel]]) for launch in launches
                if launch.kernel in cache_ptr and launch.constexprs.get(
                    "KV_SCALE", launch.constexprs.get("QUANT"))}

    with fake_gpu(A100) as gpu, index_checks_off():   # (value checks read the device)
        q = torch.randn(2, 4, 128, device="cuda", dtype=torch.bfloat16)
        cache = torch.zeros(8, 16, 2, 128, device="cuda", dtype=torch.float8_e4m3fn)
        table = torch.zeros(2, 2, dtype=torch.int32, device="cuda")
        lens = torch.ones(2, dtype=torch.int32, device="cuda")
        one = torch.ones(2, device="cuda")                   # per kv head, as the engine's
        ops.write_kv_cache(q[:, :2], q[:, :2], cache, cache,
                           torch.zeros(2, dtype=torch.int64, device="cuda"), one, one)
        ops.paged_decode_attention(q, cache, cache, table, lens, k_scale=one, v_scale=one)
        cu = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
        ops.flash_attention(q, cache, cache, cu, cu, 1, 1, block_table=table, k_scale=one,
                            v_scale=one)
    assert cache_dtypes(gpu.launches) == {"torch.int8"}
    assert_compiled_ahead(gpu.launches, arch=80)
    prefill, = [x for x in gpu.launches if x.kernel == "flash_attn_fwd_kernel"]
    assert (prefill.constexprs["BLOCK_M"], prefill.constexprs["BLOCK_N"]) == (128, 32)
    assert prefill.num_warps == 8   # the d128 tile that does not spill with the decode
    ada = types.SimpleNamespace(**{**vars(A100), "name": "L40S (fake)", "minor": 9})
    llm, launches = build_on_fake_h200(checkpoints["llama"], kv_cache_dtype="fp8",
                                       gpu_props=ada)
    assert llm.llm_engine.runner.kv_cache_dtype == torch.float8_e4m3fn
    assert cache_dtypes(launches) == {"torch.float8_e4m3fn"}


def test_draft_model_and_eagle_graphs_capture_on_a_gpu(checkpoints, tmp_path):
    llm, launches = build_on_fake_h200(checkpoints["llama"], speculative_config={
        "method": "draft_model", "model": checkpoints["qwen3"], "num_speculative_tokens": 2})
    check_engine(llm, launches)
    draft = llm.llm_engine.proposer.runner
    assert draft.graphs.sizes == GRAPH_SIZES and draft.verify_graphs is not None
    target, head = _eagle_checkpoints(tmp_path)
    llm, launches = build_on_fake_h200(target, speculative_config={
        "method": "eagle", "model": head, "num_speculative_tokens": 3})
    check_engine(llm, launches)
    proposer = llm.llm_engine.proposer
    assert proposer.graphs.sizes == GRAPH_SIZES and proposer.catch_up_graphs is not None


#: built-in models at their real shapes (dummy weights, fake tensors: no memory): the
#: GPU run's serving engine (qwen2.5-0.5b int4; buckets to 64: its split-KV / split-K
#: plans at real sizes, both decode GEMV tiles and the GEMM) and one model each for
#: softcaps at D 256 (Gemma 2), W8A8 split-K reduces (int8), sinks + MXFP4 experts
#: (GPT-OSS); (model, max_num_seqs, LLM options)
REAL_SHAPES = {
    "qwen2.5-0.5b-int4": ("qwen2.5-0.5b", 64, dict(quantization="int4")),
    "gemma-2-2b": ("gemma-2-2b", 4, {}),
    "llama-3.2-1b-int8": ("llama-3.2-1b", 4, dict(quantization="int8")),
    "gpt-oss-20b": ("gpt-oss-20b", 4, {}),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_real_shapes_capture_on_a_gpu(name):
    model, seqs, kw = REAL_SHAPES[name]
    with fake_h200() as gpu:
        llm = LLM(model, dtype="bfloat16", device="cuda", tokenizer=None, num_kv_blocks=4096,
                  block_size=16, max_num_seqs=seqs, **kw)
    runner = llm.llm_engine.runner
    assert runner.graphs.sizes[-1] == seqs
    off = [n for n, t in [*runner.model.named_parameters(), *runner.model.named_buffers()]
           if not t.is_cuda]
    assert not off, off[:5]
    assert_compiled_ahead(gpu.launches)


#: the engines whose every launch ``MK_AOT=all`` compiles exactly (the GPU run's serving
#: engines, int4 and bf16, buckets to 256, then the other real-shape models): (model,
#: max_num_seqs, LLM options)
EXACT_ENGINES = [("qwen2.5-0.5b", 256, dict(quantization="int4")), ("qwen2.5-0.5b", 256, {}),
                 *REAL_SHAPES.values()]


@pytest.mark.skipif(AOT_SUBSET != "all", reason="compiles every launch of 17 engines "
                    "(~5 CPU-minutes): with MK_AOT=all, before a GPU run")
def test_real_engines_launch_kernels_that_compile(checkpoints, tmp_path):
    """Every kernel the real-shape engines and the variants (quantized, MoE, fp8 KV, LoRA,
    n-gram) launch (their decode-graph captures, then a
    prefill, a mixed and a decode step: the exact tiles, dtypes and integer
    specializations, not the registry's representative ones) compiles for sm_90a as its
    first launch on the H200 would (``aot --launches``: Triton's own warmup
    against a stand-in driver), with no register spills and within the arch's shared
    memory per block (else Triton raises OutOfResources at that launch)."""
    from test_cuda_dry_run import compile_exactly, run_eager_steps

    records = []
    for model, seqs, kw in EXACT_ENGINES:
        with fake_h200() as gpu:
            llm = LLM(model, dtype="bfloat16", device="cuda", tokenizer=None,
                      num_kv_blocks=4096, block_size=16, max_num_seqs=seqs, **kw)
        launches = gpu.launches + run_eager_steps(llm.llm_engine.runner.model)
        records += [launch.record() for launch in launches]
    for kind, kw in VARIANTS.values():      # and the tiny variants the GPU's tests run
        llm, launches = build_on_fake_h200(checkpoints[kind], **kw)
        launches += run_eager_steps(llm.llm_engine.runner.model)
        records += [launch.record() for launch in launches]
    # sm_90a only: the tiles were picked for the fake H200 (an A100 picks its own)
    compiled = compile_exactly(records, tmp_path, archs=(90,))
    assert len({r["name"] for r in compiled}) >= 20 and all(
        r["wgmma"] for r in compiled if r["arch"] == "sm_90a" and
        r["name"].startswith(("int4_gemm_kernel", "flash_attn_fwd_kernel")))


#: batches whose tokens stay on the device between steps (async scheduling): the sampler
#: may upload small per-row tensors (non_blocking) but must not wait for the GPU
OVERLAP_BATCHES = {
    "greedy": [SamplingParams(temperature=0)] * 4,
    "top-k-top-p": [SamplingParams(temperature=0.7, top_k=20, top_p=0.9)] * 4,
    "seeded": [SamplingParams(temperature=0.7, seed=3)] * 4,
    "mixed": [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_p=0.8),
              SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=0.9,
                                                                         top_k=5)],
    "logprobs": [SamplingParams(temperature=0.7, logprobs=3)] * 4,
    "min-tokens": [SamplingParams(temperature=0.7, min_tokens=5)] * 4,
    "logit-bias": [SamplingParams(temperature=0.7, logit_bias={5: 2.0})] * 4,
}


@pytest.mark.parametrize("batch", sorted(OVERLAP_BATCHES))
def test_sampler_does_not_wait_for_the_gpu(batch):
    params = OVERLAP_BATCHES[batch]
    assert not needs_host_tokens(params)
    with fake_h200() as gpu:
        sampler = Sampler(151936, device="cuda")
        seqs = [seq_for(p, output=(4, 5), sampler=sampler, index=i)
                for i, p in enumerate(params)]
        logits = torch.randn(4, 151936, device="cuda")
        with gpu.overlapping():
            out = sampler.sample(logits, seqs, eos_token_ids=[2])
    assert out.tokens.is_cuda and out.tokens.shape == (4,)
    assert_compiled_ahead(gpu.launches)


def test_a_penalty_batch_waits_and_says_so():
    """Penalties read every row's output tokens on the host (needs_host_tokens): their
    upload is a blocking one, which the overlap check reports."""
    params = [SamplingParams(temperature=0.7, repetition_penalty=1.2)] * 4
    assert needs_host_tokens(params)
    with fake_h200() as gpu:
        sampler = Sampler(1000, device="cuda")
        seqs = [seq_for(p, output=(4, 5)) for p in params]
        with gpu.overlapping(), pytest.raises(HostSync, match="penalty_state"):
            sampler.sample(torch.randn(4, 1000, device="cuda"), seqs)
