"""The decoder on a GPU (auto backend: Triton / CUDA kernels) against the fp32 CPU reference.
Skipped without CUDA."""
from __future__ import annotations

import json
import re

import pytest
import torch
from test_model_support import hf_dirs, hf_logits, random_tokens, rel_err, run_schedule

from minikernels.models import AttentionMetadata, load_model
from minikernels.models.generate import generate_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
__all__ = ["hf_dirs"]

HALF_TOL = {torch.float16: 0.02, torch.bfloat16: 0.06}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama3-rope-tied", "qwen2-window", "qwen3", "mistral-window",
                                  "gemma2-window-softcap", "gemma3", "granite",
                                  "phi3-longrope-partial", "qwen2-yarn", "olmo3-window", "exaone4-hybrid", "ministral3-yarn",
                                  "hunyuan-ntk", "ernie4_5-bias", "helium",
                                  "granite4-dense", "stablelm", "starcoder2-window", "cohere2-window", "phi2",
                                  # one per new path on the GPU (the others' layers are
                                  # these): per-head fused q / k / v and two norms, learned
                                  # positions, ALiBi through both attention kernels, kv-group
                                  # fused q / k / v
                                  "gpt_neox", "gpt2", "bloom", "falcon-new", "granite_swa",
                                  # hybrid recurrent layers (causal conv, gated delta rule)
                                  "lfm2", "qwen3_5", "granite4-h", "falcon_h1", "nemotron_h",
                                  "olmo_hybrid", "jamba-moe", "mamba", "falcon_mamba", "lfm3", "zamba2",
                                  "gemma4", "gemma4-plain", "gemma4-moe", "gemma3n",
                                  "nemotron_h-moe", "nemotron_h-latent",
                                  "qwen3-moe",
                                  "qwen2-moe", "mixtral", "granitemoe", "olmoe"])
def test_gpu_forward_paths_match_transformers(hf_dirs, kind, dtype):
    import copy

    hf, path = hf_dirs[kind]
    model = load_model(path, dtype=dtype, device="cuda")
    seqs = [random_tokens(n, hf.config.vocab_size, 20 + n) for n in (14, 37, 9)]
    refs = [hf_logits(hf, s) for s in seqs]
    # Gemma's extra norms make half precision itself drift further: allow what
    # transformers' own model in this dtype (on the CPU) drifts, and a half more.
    hf_half = copy.deepcopy(hf).to(dtype)
    hf_err = rel_err(torch.cat([hf_logits(hf_half, s) for s in seqs]), torch.cat(refs))
    tol = max(HALF_TOL[dtype], 1.5 * hf_err + 0.005)
    ids = torch.tensor([t for s in seqs for t in s], device="cuda")
    out = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs], device="cuda"), None)
    assert rel_err(out.cpu(), torch.cat(refs)) <= tol
    plan = [[("p", 0, 10), ("p", 1, 17)], [("d", 0), ("p", 1, 20), ("p", 2, 5)],
            [("d", 0), ("d", 2)], [("d", 0), ("d", 2)], [("d", 0), ("d", 2)], [("d", 2)]]
    rows = run_schedule(model, seqs, plan, block_size=16)
    got = torch.stack([r.cpu() for _, _, r in rows])
    ref = torch.stack([refs[i][p] for i, p, _ in rows])
    assert rel_err(got, ref) <= tol


def test_gpu_greedy_matches_cpu_reference_mostly(hf_dirs):
    hf, path = hf_dirs["qwen3"]
    cpu = load_model(path, dtype="float32", device="cpu")
    gpu = load_model(path, dtype="float32", device="cuda")
    prompts = [random_tokens(n, hf.config.vocab_size, n) for n in (5, 11)]
    a = generate_tokens(cpu, prompts, max_new_tokens=8)
    b = generate_tokens(gpu, prompts, max_new_tokens=8)
    assert a == b


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "gemma-3-1b",
                                  "tiny-qwen3-moe"])
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_gpu_builtin_dummy_models_run(name, quantization):
    model = load_model(name, dtype="bfloat16", device="cuda", quantization=quantization)
    out = generate_tokens(model, [[1, 2, 3, 4, 5], list(range(100, 140))], max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    ids = torch.arange(45, device="cuda")
    logits = model(ids, AttentionMetadata.for_prompts([5, 40], device="cuda", last_only=True),
                   None)
    assert logits.shape == (2, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,quant", [("qwen3", "fp8"), ("qwen3-moe", "fp8"),
                                        ("qwen3", "fp8_w8a8"), ("qwen3", "int8"),
                                        ("qwen3-moe", "int8")])
def test_gpu_fp8_model_matches_cpu(hf_dirs, kind, quant, dtype):
    """RTN fp8 on load (ops.fp8_matmul / fused_moe_fp8, or the W8A8 ops, on the GPU kernels,
    decode and prefill shapes) -- and INT8 W8A8 on load (scaled_int8_quant + scaled_mm,
    fused_moe_int8 experts) -- against the same model in fp32 on the CPU reference; the
    built-ins run through the engine with CUDA graphs."""
    from minikernels.engine import LLM, SamplingParams

    hf, path = hf_dirs[kind]
    cpu = load_model(path, dtype="float32", device="cpu", quantization=quant)
    gpu = load_model(path, dtype=dtype, device="cuda", quantization=quant)
    seqs = [random_tokens(n, hf.config.vocab_size, 30 + n) for n in (14, 37, 1)]
    ids = [torch.tensor([t for s in seqs for t in s], device=d) for d in ("cpu", "cuda")]
    want = cpu(ids[0], AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    got = gpu(ids[1], AttentionMetadata.for_prompts([len(s) for s in seqs], device="cuda"),
              None)
    assert rel_err(got.float().cpu(), want) <= HALF_TOL[dtype]
    llm = LLM("qwen2.5-0.5b" if kind == "qwen3" else "tiny-qwen3-moe", dtype=dtype,
              quantization=quant, num_kv_blocks=256)
    outs = llm.generate([[1, 2, 3], list(range(100, 160))],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle", "eagle3"])
def test_gpu_speculative_verify_graphs_token_identical(tmp_path, method):
    """Speculative verification steps replay CUDA graphs (model_runner._VerifyGraphs):
    greedy tokens equal with graphs on and off (enforce_eager) and without speculation,
    at batch 1 and 5 (bucket 8: padding rows), and the verification graphs replay."""
    from test_engine import _make_hf, tokens

    from minikernels.engine import LLM, SamplingParams

    _make_hf("llama").save_pretrained(str(tmp_path))
    path = str(tmp_path)
    cfg = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
           if method == "ngram" else
           {"method": "draft_model", "model": path, "num_speculative_tokens": 4})
    if method.startswith("eagle"):   # the target's hidden states captured inside graphs
        from test_eagle import _bigram_target, _save_head, _save_oracle_head

        if method == "eagle":    # a bigram target and a head agreeing with it partly
            bigram = _bigram_target(tmp_path / "bigram", seed=20)
            _save_oracle_head(tmp_path / "head", bigram, 0.03, 22)
            path = str(tmp_path / "bigram")
        else:                    # a random EAGLE-3 head: drafts, acceptance by chance
            _save_head(tmp_path / "head", method, 1, own_embed=False, draft_vocab=200,
                       aux=[0, 1, 1])
        cfg = {"method": method, "model": str(tmp_path / "head"), "num_speculative_tokens": 3}
    prompts = [([5 + i, 40 + 3 * i, 77, 9 + i] * 12)[:17 + 6 * i] for i in range(5)]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    def run(spec, eager, ps):
        llm = LLM(path, dtype="float32", device="cuda", tokenizer=None, block_size=16,
                  num_kv_blocks=256, max_num_seqs=8, speculative_config=spec,
                  enforce_eager=eager)
        return llm, tokens(llm.generate(ps, sp, use_tqdm=False))

    for ps in (prompts[:1], prompts):
        _, want = run(None, False, ps)
        off, eager = run(cfg, True, ps)
        assert off.llm_engine.runner.verify_graphs is None
        llm, got = run(cfg, False, ps)
        assert eager == want and got == want
        vg = llm.llm_engine.runner.verify_graphs
        assert vg is not None and vg.sizes == [1, 2, 4, 8] and vg.num_replays > 0
        assert llm.stats()["spec_num_draft_tokens"] > 0
        if method.startswith("eagle"):   # the head's steady catch-up replays its graphs
            cg = llm.llm_engine.proposer.catch_up_graphs
            assert cg is not None and cg.num_replays > 0
        if method == "eagle3":
            assert llm.llm_engine.proposer.num_stale == 0
        else:
            assert llm.stats()["spec_num_accepted_tokens"] > 0
        if method == "draft_model":   # the target drafting for itself: its steady
            # catch-up (2 tokens per row: all drafts accepted) replays its graphs
            st, dvg = llm.stats(), llm.llm_engine.proposer.runner.verify_graphs
            assert dvg is not None and dvg.num_replays > 0
            assert st["spec_num_accepted_tokens"] >= 0.9 * st["spec_num_draft_tokens"]


@pytest.mark.parametrize("kind", ["llama", "qwen3-moe"])
def test_gpu_lora_graphs_equal_eager_and_peft(tmp_path, kind):
    """LoRA on the GPU: the decode CUDA graphs read each token's adapter slot from their
    static buffer; greedy tokens of a batch mixing two adapters and the base model equal
    the eager engine's and PEFT's own (on the CPU, fp32). Qwen3-MoE: PEFT puts the
    gate / up / down adapters on the experts' stacked parameters (the fused MoE op's LoRA
    path). (Skipped where peft is not installed: the H200 image has no package index.)"""
    pytest.importorskip("peft")
    from test_lora import ALL, make_adapter
    from test_model_support import make_hf_model, save_hf

    from minikernels.engine import LLM, LoRARequest, SamplingParams

    hf = make_hf_model(kind, seed=3)
    base = save_hf(hf, str(tmp_path / "base"))
    paths = [str(tmp_path / "a1"), str(tmp_path / "a2")]
    refs = [make_adapter(hf, paths[0], r=4, alpha=8, targets=ALL, seed=1),
            make_adapter(hf, paths[1], r=2, alpha=4, targets=["q_proj", "down_proj"], seed=2)]
    loras = [LoRARequest("a1", 1, paths[0]), None, LoRARequest("a2", 2, paths[1])]
    prompts = [random_tokens(n, 300, 60 + n) for n in (9, 13, 6)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(eager):
        llm = LLM(base, dtype="float32", device="cuda", tokenizer=None, block_size=16,
                  num_kv_blocks=64, max_num_seqs=8, enforce_eager=eager, enable_lora=True,
                  max_loras=2, max_lora_rank=8)
        assert (llm.llm_engine.runner.graphs is None) == eager
        return [o.outputs[0].token_ids
                for o in llm.generate(prompts, sp, use_tqdm=False, lora_request=loras)]

    graphs, eager = run(False), run(True)
    want = []
    for prompt, ref in zip(prompts, [refs[0], hf, refs[1]]):
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(prompt):].tolist())
    assert eager == want and graphs == want


def test_gpu_embedder_and_classifier_match_cpu():
    """The one-pass models on the GPU kernels (varlen flash attention, last-token rows):
    Embedder vectors and Classifier probabilities equal the fp32 CPU reference, and the
    async path packs concurrent callers the same way."""
    import asyncio

    import minikernels as mk

    texts = ["a short one", "a somewhat longer input for the varlen batch", "x"]
    for device_kw in ({"device": "cpu"}, {"device": "cuda"}):
        emb = mk.Embedder("tiny-qwen3", dtype="float32", **device_kw)
        clf = mk.Classifier("tiny", dtype="float32", classifier_from_token=["0", "1", "2"],
                            **device_kw)
        got = (emb.embed(texts), clf.classify(texts),
               asyncio.run(clf.classify_async([clf.tokenize(t) for t in texts])))
        emb.close()
        clf.close()
        if device_kw["device"] == "cpu":
            want = got
            continue
        for g, w in zip(got, want):
            assert g.device.type == "cpu" and rel_err(g, w) <= 1e-3


@pytest.mark.parametrize("kind", ["qwen3-moe", "qwen2-moe", "mixtral"])
def test_gpu_int4_moe_matches_cpu_reference(hf_dirs, kind):
    """RTN int4 MoE models (int4 experts through fused_moe_int4's Triton kernels, int4
    attention / dense layers) on the GPU in fp16 against the same int4 model on the CPU
    reference ops (fp32 model, activations rounded to fp16 for the int4 ops)."""
    _, path = hf_dirs[kind]
    kw = dict(quantization="int4", group_size=32)
    cpu = load_model(path, dtype="float32", device="cpu", **kw)
    gpu = load_model(path, dtype="float16", device="cuda", **kw)
    assert gpu.layers[0].mlp.experts.is_int4
    seqs = [random_tokens(n, 300, 40 + n) for n in (14, 5)]
    ids = [t for s in seqs for t in s]
    want = cpu(torch.tensor(ids), AttentionMetadata.for_prompts([14, 5]), None)
    got = gpu(torch.tensor(ids, device="cuda"),
              AttentionMetadata.for_prompts([14, 5], device="cuda"), None)
    assert rel_err(got.float().cpu(), want) <= 0.03


def test_gpu_load_weights_keeps_cuda_graphs_valid(tmp_path):
    """load_weights copies into the captured tensors: the decode graphs replay the new
    weights (tokens equal a fresh engine built from them)."""
    from test_engine import tokens
    from test_model_support import make_hf_model, save_hf

    from minikernels.engine import LLM, SamplingParams

    a, b = make_hf_model("llama", seed=0), make_hf_model("llama", seed=7)
    pa, pb = save_hf(a, str(tmp_path / "a")), save_hf(b, str(tmp_path / "b"))
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 9, 13, 21] * 5, [3, 4, 5]]

    def make(path):
        return LLM(path, dtype="float32", device="cuda", tokenizer=None, block_size=16,
                   num_kv_blocks=64, max_num_seqs=4)

    want = tokens(make(pb).generate(prompts, sp, use_tqdm=False))
    llm = make(pa)
    assert llm.llm_engine.runner.graphs is not None
    llm.generate(prompts, sp, use_tqdm=False)
    llm.load_weights(b.named_parameters())
    assert tokens(llm.generate(prompts, sp, use_tqdm=False)) == want


def test_gpu_sleep_frees_memory_and_wakes_up(tmp_path):
    """sleep(1) frees the weights, KV pool and graphs on the GPU (memory_allocated drops
    by at least the weights + pool); wake_up() captures the graphs again and generates
    the same tokens."""
    from test_engine import tokens
    from test_model_support import make_hf_model, save_hf

    from minikernels.engine import LLM, SamplingParams

    path = save_hf(make_hf_model("llama", seed=0), str(tmp_path / "a"))
    llm = LLM(path, dtype="float32", device="cuda", tokenizer=None, block_size=16,
              num_kv_blocks=256, max_num_seqs=4)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 9, 13, 21] * 5, [3, 4, 5]]
    want = tokens(llm.generate(prompts, sp, use_tqdm=False))
    eng = llm.llm_engine
    held = eng.model.weight_bytes() + sum(t.numel() * t.element_size()
                                          for pair in eng.runner.kv_caches for t in pair)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    llm.sleep(level=1)
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() >= held
    llm.wake_up()
    assert eng.runner.graphs is not None
    assert tokens(llm.generate(prompts, sp, use_tqdm=False)) == want


def test_gpu_hybrid_kv_pools_token_identical():
    """Hybrid KV pools (Gemma-style sliding + full layers) on the GPU kernels: greedy tokens
    equal with CUDA graphs on and off and with one block table for all layers."""
    import minikernels as mk
    from minikernels.models.config import DecoderConfig, builtin_config
    from minikernels.models.decoder import CausalLM
    from minikernels.models.loader import _init_dummy

    cfg = DecoderConfig(**{**builtin_config("tiny-gemma3").to_dict(), "num_layers": 6,
                           "sliding_window_layers": [0, 1, 3, 4], "sliding_window": 8})
    model = CausalLM(cfg, dtype=torch.bfloat16, device="cuda")
    _init_dummy(model, 0, None)
    model.eval().requires_grad_(False)
    prompts = [list(range(3, 40)), list(range(50, 61)), list(range(100, 170)), [7] * 5]
    params = mk.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = {}
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    for name, kw in (("graphs", {}), ("eager", {"enforce_eager": True}),
                     ("one-table", {"disable_hybrid_kv_cache_manager": True}),
                     ("ngram", {"speculative_config": ngram})):
        llm = mk.LLM(model, dtype="bfloat16", tokenizer=None, block_size=4, num_kv_blocks=400,
                     **kw)
        assert (llm.llm_engine.kv_layout is None) == (name == "one-table")
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                   use_tqdm=False)]
        llm.llm_engine.check_no_leaks()
    assert outs["graphs"] == outs["eager"] == outs["one-table"] == outs["ngram"]


@pytest.mark.parametrize("kind", ["lfm2", "qwen3_5", "granite4-h", "falcon_h1",
                                  "nemotron_h", "jamba-moe", "mamba", "lfm3",
                                  "zamba2"])
def test_hybrid_recurrent_engine_on_cuda(hf_dirs, kind):
    """LFM2 / Qwen3.5 in the engine on cuda: decode-graph replays (state slots in static
    buffers, padding rows -1) give the eager run's tokens, chunked prefill too, and every
    token's logprob is transformers' (fp32 on the CPU) within half-kernel tolerance.
    (Fixed KV pools, as in every GPU test: the test stage runs several processes on one
    GPU, and a pool sized by gpu_memory_utilization would take the others' memory.)"""
    from minikernels import LLM, SamplingParams

    hf, path = hf_dirs[kind]
    prompts = [random_tokens(n, hf.config.vocab_size, 60 + n) for n in (5, 40, 17, 3, 33, 9)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    runs = {}
    for name, kw in (("eager", {"enforce_eager": True}), ("graphs", {}),
                     ("chunked", {"max_num_batched_tokens": 16})):
        llm = LLM(path, dtype="float32", device="cuda", tokenizer=None, block_size=16,
                  num_kv_blocks=256, max_num_seqs=8, **kw)
        if name == "graphs":
            assert llm.llm_engine.runner.graphs is not None
        runs[name] = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
        llm.llm_engine.check_no_leaks()
    eager = [c.token_ids for c in runs["eager"]]
    assert [c.token_ids for c in runs["graphs"]] == eager
    # n-gram speculation (eager verification, state snapshots) on repetitive prompts
    rep = [([5, 6, 7, 8, 9, 10] * 8)[:n] for n in (20, 33, 41)]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    toks = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3}):
        llm = LLM(path, dtype="float32", device="cuda", tokenizer=None, block_size=16,
                  num_kv_blocks=256, max_num_seqs=8, speculative_config=spec)
        toks.append([o.outputs[0].token_ids for o in llm.generate(rep, greedy,
                                                                  use_tqdm=False)])
        llm.llm_engine.check_no_leaks()
    assert toks[0] == toks[1]
    for p, c in zip(prompts, runs["chunked"]):
        full = torch.tensor([p + list(c.token_ids)])
        with torch.no_grad():
            lp = torch.log_softmax(hf(full).logits[0].float(), -1)
        want = lp[len(p) - 1:-1].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        got = torch.tensor([d[t].logprob for t, d in zip(c.token_ids, c.logprobs)])
        assert (got - want).abs().max() <= 0.05


def structured_runs(device: str) -> dict:
    """Constrained requests (JSON schema, regex, choice, an EBNF grammar) beside a free one,
    through the engine on ``device``: the outlines backend with its automata's states on
    the device and on the host, and xgrammar, each with overlap on and off. Checks every
    finished output against its constraint and returns the texts per run."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    pytest.importorskip("outlines_core")
    from test_engine_structured import SCHEMA, _constrained, _texts

    from minikernels import LLM, SamplingParams

    email, grammar = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", 'root ::= "x" [0-9]+ "y"'
    prompts = ["a" * 10, "b" * 12, "c", "d" * 7, "e"]
    params = [_constrained(max_tokens=80), _constrained(max_tokens=60, regex=email),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                             structured_outputs={"choice": ["yes", "no"]}),
              SamplingParams(temperature=1.0, seed=9, max_tokens=30),
              _constrained(max_tokens=40, grammar=grammar)]
    runs, stopped = {}, 0
    for backend, states in (("outlines", True), ("outlines", False), ("xgrammar", None)):
        for overlap in (True, False):
            llm = LLM("tiny", dtype="float32", device=device, block_size=16,
                      num_kv_blocks=256, max_num_seqs=8, async_scheduling=overlap,
                      structured_outputs_config={"backend": backend})
            manager = llm.llm_engine._structured_manager()
            if backend == "outlines":
                # the engine's own choice: states on a GPU (no proposer), host on the CPU
                assert manager.device_states == (device == "cuda")
                manager.device_states = states
            outs = llm.generate(prompts, params, use_tqdm=False)
            llm.llm_engine.check_no_leaks()
            runs[backend, states, overlap] = _texts(outs)
            for out, p in zip(outs, params):
                so = p.structured_outputs
                for c in out.outputs:
                    if so is None or c.finish_reason != "stop":
                        continue
                    stopped += 1
                    if so.kind == "json":
                        jsonschema.validate(json.loads(c.text), SCHEMA)
                    elif so.kind == "regex":
                        assert re.fullmatch(email, c.text), c.text
                    elif so.kind == "choice":
                        assert c.text in ("yes", "no"), c.text
                    else:
                        assert re.fullmatch(r"x[0-9]+y", c.text), c.text
    assert stopped, "no constrained request finished"
    return runs


def test_gpu_structured_outputs_valid_and_device_automata_equal_host():
    """Structured outputs with the engine on cuda (decode graphs, the mask and fsm_advance
    kernels, states on the device, the read-back one step behind): every finished output
    obeys its constraint, and the outlines backend's outputs are the same with its states
    on the device or the host, overlap on or off (xgrammar's likewise among its runs)."""
    runs = structured_runs("cuda")
    for backend in ("outlines", "xgrammar"):
        texts = {json.dumps(v) for k, v in runs.items() if k[0] == backend}
        assert len(texts) == 1, (backend, runs)
