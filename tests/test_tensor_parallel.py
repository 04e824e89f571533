"""Tensor parallel on CPU (gloo): TP=2 logits equal TP=1 within fp32 tolerance for tiny
saved HF models of each family, dense and int4 (RTN on load), cache-less prefill and a
paged schedule (chunked prefill + decode); greedy LLM.generate token-identical.

The model check spawns the 2 ranks once and runs every case in them (spawn + import is
most of the cost)."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import spawn_ranks
from test_model_support import make_hf_model, random_tokens, rel_err, run_schedule, save_hf

from minikernels.models import AttentionMetadata, load_model
from minikernels.models.parallel import TensorParallel, attention_shard, shard_tensor

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# case -> (CASES kind, overrides): KV heads split (2 over 2 ranks) and replicated (1 kv
# head on 2 ranks), tied and untied heads, q/k norm, biases on row-parallel layers, a
# sliding window, a vocab that does not split evenly (301 -> 151 + 150 + 1 padding row),
# Gemma 2's final softcap on gathered logits, Gemma 3's two rope bases and q/k norms,
# Granite's residual multiplier after the all-reduce, Phi-3's fused tensors split per rank.
# Mixtures of experts (each expert's intermediate split, one all-reduce): Qwen3-MoE's and
# Mixtral's per-expert tensors, Granite-MoE's stacked ones ([E, 2I, H]: the loader's path
# for transformers 5's stacked names too) and its multiplier after the all-reduce,
# Qwen2-MoE's shared expert (64: group 32 divides each rank's K, so int4 is exact slices).
TP_CASES = {
    "llama": ("llama", {}),
    "llama-bias": ("llama-bias-linear-rope", {"vocab_size": 301}),
    "qwen2-tied-kv1": ("qwen2-tied", {"num_key_value_heads": 1}),
    "qwen3": ("qwen3", {}),
    "mistral-window": ("mistral-window", {}),
    "gemma2-softcap": ("gemma2-window-softcap", {"vocab_size": 301}),
    "gemma3": ("gemma3", {}),
    "granite": ("granite", {}),
    # HyperCLOVA X: the multiplier after each sandwich norm, after the all-reduce
    "hyperclovax": ("hyperclovax", {}),
    "phi3": ("phi3-longrope-partial", {}),
    "glm4": ("glm4", {}),
    # StarCoder 2: LayerNorms (replicated), o / down biases added once, a one-part up
    "starcoder2": ("starcoder2-window", {}),
    # Cohere 2: attention and MLP in parallel (two all-reduces summed), NoPE global layer
    "cohere2": ("cohere2-window", {}),
    # Phi-2: the lm_head bias is vocab-parallel (each rank its rows)
    "phi2": ("phi2", {}),
    # GPT-NeoX: per-head interleaved q / k / v reordered before each rank takes its heads;
    # two norms of one stream in a parallel block
    "gpt_neox": ("gpt_neox", {}),
    # Learned positions (replicated): GPT-2's Conv1D weights transposed before each rank
    # takes its rows, GPT-BigCode's one k / v head replicated and its per-head q / k / v
    "gpt2": ("gpt2", {}),
    "gpt_bigcode-mqa": ("gpt_bigcode-mqa", {}),
    "gpt_bigcode-mha": ("gpt_bigcode-mha", {}),
    # BLOOM: each rank its heads' ALiBi slopes (6 heads, 3 per rank; head_dim 32, so
    # int4 group 32 divides each rank's K)
    "bloom": ("bloom", {"hidden_size": 192}),
    # GPT-J: partial GPT-J rope, the lm_head bias vocab-parallel
    "gptj": ("gptj", {}),
    # Falcon: one k / v head replicated (7B); kv-head groups of fused q / k / v split per
    # rank, two norms (the new decoder architecture)
    "falcon-7b": ("falcon-7b", {}),
    "falcon-new": ("falcon-new", {"ffn_hidden_size": 128}),
    # Nemotron's LayerNorm1P (replicated) and squared-ReLU MLP
    "nemotron": ("nemotron", {}),
    # Apertus: its xIELU parameters replicated on every rank
    "apertus": ("apertus", {}),
    # NanoChat: parameter-free norms (the embedding's, q / k after reversed rope)
    "nanochat": ("nanochat", {}),
    # Granite SWA: each rank its heads' attention sinks; NoPE and a second rope base
    "granite_swa": ("granite_swa", {}),
    # MPT: each rank its heads' MPT slopes (6 heads, head_dim 32 for int4 group 32)
    "mpt": ("mpt", {"hidden_size": 192}),
    # OLMo 2 / OLMoE: q / k norms over every head (an all-reduced sum of squares), kv
    # heads split and (kv1) replicated
    "olmo2": ("olmo2", {}),
    "olmo2-kv1": ("olmo2", {"num_key_value_heads": 1}),
    "olmoe": ("olmoe", {"intermediate_size": 64}),
    # MoE: expert sizes of 64 / 128, so int4 group 32 divides H and each rank's I (the
    # experts are int4 too). int4 rounds each rank's partial sums to fp16 (~1e-3): a
    # router near-tie within that margin flips an expert and moves a token's logits by
    # ~0.16 (seen with qwen3-moe at 64), so these seeded models have none.
    "qwen3-moe": ("qwen3-moe", {"moe_intermediate_size": 128}),
    "qwen2-moe": ("qwen2-moe", {"moe_intermediate_size": 64,
                                "shared_expert_intermediate_size": 64}),
    "mixtral": ("mixtral", {"intermediate_size": 64}),
    "granitemoe": ("granitemoe", {"intermediate_size": 64}),
}
QUANT = (None, "int4")
GROUP = 32       # divides every per-rank K here, so TP int4 == slices of TP=1 int4
SEQS = [random_tokens(13, 300, 1), random_tokens(9, 300, 2)]
PLAN = [[("p", 0, 7), ("p", 1, 6)], [("d", 1), ("p", 0, 4)], [("d", 0), ("d", 1)],
        [("d", 0), ("d", 1)]]


def _logits(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ids = torch.tensor(SEQS[0] + SEQS[1])
        whole = model(ids, AttentionMetadata.for_prompts([len(s) for s in SEQS]))
        steps = run_schedule(model, SEQS, PLAN, block_size=4)
    return whole, torch.stack([row for _, _, row in steps])


def _rank_main(rank: int, world: int, port: int, dirs: dict[str, str], out: str,
               qdirs: dict[str, str], quants: tuple = QUANT, group: int = GROUP) -> None:
    """One rank of a ``world``-rank gloo group: every model of ``dirs`` in each of
    ``quants`` (RTN group ``group``) and the checkpoints of ``qdirs`` -> rank{r}.pt."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tp = TensorParallel.from_default_group()
        res = {}
        for name, path in dirs.items():
            for q in quants:
                m = load_model(path, dtype="float32", device="cpu", quantization=q,
                               group_size=group, tensor_parallel=tp)
                res[(name, q)] = _logits(m)
        for name, path in qdirs.items():   # GPTQ / AWQ checkpoints
            m = load_model(path, dtype="float32", device="cpu", tensor_parallel=tp)
            res[(name, "ckpt")] = _logits(m)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    from minikernels.distributed import free_port

    return free_port()


@pytest.fixture(scope="module")
def tp_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dirs = {}
    for name, (kind, over) in TP_CASES.items():
        dirs[name] = save_hf(make_hf_model(kind, **over), str(tmp_path_factory.mktemp(name)))
    return dirs


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """GPTQ (act-order too: its column-parallel layers shard, row-parallel ones must not
    be act-order, so only q/k/v/gate/up get a shuffled g_idx) and AWQ, group 32; a GPTQ
    Qwen3-MoE (int4 experts sharded along I); fp8
    (compressed-tensors per-channel scales: rows shard with their scales)."""
    from test_fp8_model import write_fp8_checkpoint
    from test_model_support import write_quantized_checkpoint

    dirs = {}
    for name, method, act in (("gptq", "gptq", False), ("awq", "awq", False)):
        d = str(tmp_path_factory.mktemp(name))
        write_quantized_checkpoint(make_hf_model("llama", seed=5), d, method, group=32,
                                   act_order=act)
        dirs[name] = d
    # fused int4 layers split into parts before each rank takes its slice: Phi-3's AWQ
    # qkv_proj / gate_up_proj, Falcon's GPTQ kv-head groups
    dirs["awq-phi3"] = str(tmp_path_factory.mktemp("awq-phi3"))
    write_quantized_checkpoint(make_hf_model("phi3-longrope-partial", seed=5),
                               dirs["awq-phi3"], "awq", group=32)
    dirs["gptq-falcon"] = str(tmp_path_factory.mktemp("gptq-falcon"))
    write_quantized_checkpoint(make_hf_model("falcon-new", seed=5, ffn_hidden_size=128),
                               dirs["gptq-falcon"], "gptq", group=32,
                               linears=("query_key_value", "dense", "_4h", "_4h_to_h"))
    # a GPTQ mixture of experts: each rank reads its slice of every expert's int4 tensors
    dirs["gptq-moe"] = str(tmp_path_factory.mktemp("gptq-moe"))
    write_quantized_checkpoint(make_hf_model("qwen3-moe", seed=5, moe_intermediate_size=64),
                               dirs["gptq-moe"], "gptq", group=32)
    dirs["fp8"] = str(tmp_path_factory.mktemp("fp8"))
    write_fp8_checkpoint(make_hf_model("llama", seed=5), dirs["fp8"], "ct-channel")
    # INT8: W8A8 (compressed-tensors, per-channel scales) and weight-only (GPTQ 8-bit)
    from test_int8_model import write_int8_checkpoint
    dirs["int8"] = str(tmp_path_factory.mktemp("int8"))
    write_int8_checkpoint(make_hf_model("llama", seed=5), dirs["int8"], "channel")
    dirs["gptq8"] = str(tmp_path_factory.mktemp("gptq8"))
    write_quantized_checkpoint(make_hf_model("llama", seed=5), dirs["gptq8"], "gptq",
                               group=32, bits=8)
    return dirs


#: checkpoint logits TP=2 vs TP=1: W8A8 quantizes each rank's K slice of a row-parallel
#: layer's input with its own per-token scale (as vLLM), so its logits move by the
#: 8-bit activation rounding (measured 2.8e-3 here); the others differ only by the
#: reduction order / fp16 partial sums (gptq8: 1.2e-3)
CKPT_TOL = {"int8": 1e-2}


def test_tp2_logits_equal_tp1(tp_dirs, quant_dirs, tmp_path):
    spawn_ranks(_rank_main, (2, _free_port(), tp_dirs, str(tmp_path), quant_dirs), 2)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for name, path in quant_dirs.items():
        ref = _logits(load_model(path, dtype="float32", device="cpu"))
        for r, res in enumerate(ranks):
            for got, want in zip(res[(name, "ckpt")], ref):
                err = rel_err(got, want)
                assert err < CKPT_TOL.get(name, 3e-3), (name, r, err)
    check_logits(ranks, tp_dirs, QUANT, GROUP)


def check_logits(ranks: list[dict], dirs: dict[str, str], quants: tuple, group: int,
                 int4_tol: dict[str, float] | None = None) -> None:
    """Every rank's results (``_rank_main``) against TP=1 of the same models: fp32 within
    1e-4; int4 (RTN, group ``group``) within 3e-3 (``int4_tol`` per model name) and 1/5 of
    what int4 itself changes."""
    for name, path in dirs.items():
        refs = {q: _logits(load_model(path, dtype="float32", device="cpu", quantization=q,
                                      group_size=group))
                for q in dict.fromkeys((None,) + tuple(quants))}
        # what int4 itself changes: the TP error must be far below it
        int4_err = rel_err(refs["int4"][0], refs[None][0]) if "int4" in quants else 0.0
        for q in quants:
            ref = refs[q]
            for r, res in enumerate(ranks):
                for got, want in zip(res[(name, q)], ref):
                    assert got.shape == want.shape, (name, q, r)
                    if q is None:   # fp32 end to end: only the reduction order differs
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                                   msg=f"{name} rank {r}")
                    else:
                        # Same int4 weights (group divides each shard), but int4_matmul
                        # returns fp16: a row-parallel layer rounds each rank's partial
                        # sum to fp16 before the all-reduce (TP=1 rounds the whole sum).
                        err = rel_err(got, want)
                        tol = (int4_tol or {}).get(name, 3e-3)
                        assert err < min(tol, int4_err / 5), (name, q, r, err, int4_err)


def test_shard_math_without_processes():
    """Head assignment and checkpoint slicing, for sizes the process test does not run."""
    from minikernels.models.config import builtin_config

    c = builtin_config("qwen2.5-0.5b")    # 14 heads, 2 kv heads
    shards = [attention_shard(c, TensorParallel(r, 2)) for r in range(2)]
    assert [(s.q0, s.nq, s.kv0, s.nkv) for s in shards] == [(0, 7, 0, 1), (7, 7, 1, 1)]
    c = builtin_config("tiny")             # 4 heads, 2 kv heads; 4 ranks: kv replicated
    got = [attention_shard(c, TensorParallel(r, 4)) for r in range(4)]
    assert [(s.q0, s.kv0, s.nkv) for s in got] == [(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]
    w = torch.arange(512 * 64.).reshape(512, 64)
    tp = TensorParallel(1, 2)
    emb = shard_tensor(c, tp, "embed_tokens", None, "weight", w)
    assert torch.equal(emb, w[256:])
    o = torch.arange(64 * 64.).reshape(64, 64)
    assert torch.equal(shard_tensor(c, tp, "layers.0.self_attn.o_proj", 0, "weight", o),
                       o[:, 32:])
    b = torch.ones(64)
    assert not shard_tensor(c, tp, "layers.0.self_attn.o_proj", 0, "bias", b).any()
    with pytest.raises(ValueError, match="tensor_parallel_size 3"):
        load_model("tiny", dtype="float32", device="cpu",
                   tensor_parallel=TensorParallel(0, 3))


def test_llm_generate_tp2_token_identical(tp_dirs, monkeypatch):
    """LLM(tensor_parallel_size=2): the scheduler here (rank 0), one spawned worker; greedy
    tokens equal TP=1 through chunked prefill, prefix caching and batched decode. The
    worker starts with "spawn", the library's default (the suite's other launches fork
    from a forkserver: conftest.py)."""
    import minikernels as mk
    from minikernels.distributed import TensorParallelModel

    monkeypatch.setenv("MK_WORKER_MULTIPROC_METHOD", "spawn")

    path = tp_dirs["qwen2-tied-kv1"]
    prompts = [random_tokens(n, 300, 10 + n) for n in (5, 23, 12)]
    prompts.append(prompts[1][:17] + [7, 8])           # shares a cached prefix
    params = mk.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=64,
              max_num_batched_tokens=16, max_num_seqs=3)
    want = [o.outputs[0].token_ids for o in mk.LLM(path, **kw).generate(prompts, params)]
    llm = mk.LLM(path, tensor_parallel_size=2, **kw)
    try:
        model = llm.llm_engine.model
        assert isinstance(model, TensorParallelModel) and model.tensor_parallel_size == 2
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == want
    finally:
        llm.llm_engine.model.close()
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="stopped"):
        model(torch.zeros(1, dtype=torch.int64), AttentionMetadata.for_prompts([1]))


def test_worker_start_method_is_checked(monkeypatch):
    from minikernels.distributed.launch import worker_context, worker_start_method

    monkeypatch.delenv("MK_WORKER_MULTIPROC_METHOD", raising=False)
    assert worker_start_method() == "spawn"
    monkeypatch.setenv("MK_WORKER_MULTIPROC_METHOD", "forkserver")
    assert worker_context().get_start_method() == "forkserver"
    monkeypatch.setenv("MK_WORKER_MULTIPROC_METHOD", "fork")
    with pytest.raises(ValueError, match="MK_WORKER_MULTIPROC_METHOD.*'fork'"):
        worker_context()


def test_speculative_decoding_tp2_token_identical(tp_dirs):
    """Speculation under TP=2: n-gram, and a draft model that runs whole on rank 0 (not
    sharded) beside rank 0's shard; verification rows go through the sharded target.
    Greedy tokens equal TP=1 without speculation; drafts are accepted."""
    import minikernels as mk

    path = tp_dirs["qwen2-tied-kv1"]
    prompts = [([5 + i, 40 + 3 * i, 77, 9 + i] * 6)[:15 + 4 * i] for i in range(3)]
    params = mk.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=96,
              max_num_seqs=4)
    want = [o.outputs[0].token_ids for o in mk.LLM(path, **kw).generate(prompts, params)]
    for spec in ({"method": "ngram", "num_speculative_tokens": 3},
                 {"method": "draft_model", "model": path, "num_speculative_tokens": 3}):
        llm = mk.LLM(path, tensor_parallel_size=2, speculative_config=spec, **kw)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            assert got == want, spec["method"]
            st = llm.stats()
            assert st["spec_num_accepted_tokens"] > 0, spec["method"]
            if spec["method"] == "draft_model":   # the draft itself is not sharded
                draft = llm.llm_engine.proposer.runner.model
                assert getattr(draft, "tp", None) is None
        finally:
            llm.llm_engine.model.close()


@pytest.mark.parametrize("target,method", [("llama", "eagle"), ("qwen2-tied-kv1", "eagle"),
                                           ("llama", "eagle3")])
def test_eagle_tp2_drafts_and_tokens_equal_tp1(tp_dirs, tmp_path, target, method):
    """An EAGLE head over a TP=2 target: the hidden states come from rank 0's shard (whole
    after each all-reduce), the embedding / lm_head it shares are whole copies read from
    the target's checkpoint (tied: the embedding). Its proposals and the greedy tokens
    equal TP=1's."""
    import minikernels as mk
    from test_eagle import _record_proposals, _save_head

    path = tp_dirs[target]
    _save_head(tmp_path / "head", method, 3, own_embed=False,
               draft_vocab=200 if method == "eagle3" else None, aux=[0, 1, 1])
    spec = {"method": method, "model": str(tmp_path / "head"), "num_speculative_tokens": 3}
    prompts = [random_tokens(n, 300, 40 + n) for n in (5, 17, 9)]
    params = mk.SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=96,
              max_num_seqs=4)
    one = mk.LLM(path, speculative_config=spec, **kw)
    log1 = _record_proposals(one)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    llm = mk.LLM(path, tensor_parallel_size=2, speculative_config=spec, **kw)
    try:
        log2 = _record_proposals(llm)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == want
        assert log2 == log1 and len(log1) > 3
        assert llm.llm_engine.proposer.num_stale == 0
        if (target, method) == ("llama", "eagle"):
            # RL weight sync: the head's whole embedding / lm_head copies follow the
            # target's new tensors, so its proposals equal a TP=1 engine of the new
            # checkpoint's
            other = make_hf_model("llama", seed=31)
            new_dir = save_hf(other, str(tmp_path / "new"))
            llm.load_weights(other.named_parameters())
            log2.clear()
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            fresh = mk.LLM(new_dir, speculative_config=spec, **kw)
            log3 = _record_proposals(fresh)
            assert got == [o.outputs[0].token_ids for o in fresh.generate(prompts, params)]
            assert log2 == log3 and len(log3) > 3
    finally:
        llm.llm_engine.model.close()


def test_serve_flag_reaches_the_engine_kwargs():
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["tiny", "--tensor-parallel-size", "2"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    assert "tensor_parallel_size" not in engine_kwargs(parser.parse_args(["tiny"]))


def test_bench_serve_flag_reaches_the_llm():
    """``bench serve --tensor-parallel-size 2`` builds its LLM with it (a real TP=2 bench
    run on CPU works too but takes ~20 s: see docs/parallel.md)."""
    from helpers import bench_serve_llm_kwargs, spawn_ranks

    seen = bench_serve_llm_kwargs(["--model", "tiny", "-tp", "2", "--no-save"])
    assert seen["tensor_parallel_size"] == 2 and seen["model"] == "tiny"


def test_int4_checkpoint_shards_refuse_what_they_cannot_split():
    """GPTQ act-order on a row-parallel layer, and K slices off group boundaries."""
    from minikernels.models.config import builtin_config

    c = builtin_config("tiny")     # intermediate 128, q_size 64
    c.quantization_config = {"quant_method": "gptq", "group_size": 32, "bits": 4}
    tp = TensorParallel(1, 2)
    g_idx = torch.arange(128, dtype=torch.int32) // 32
    got = shard_tensor(c, tp, "layers.0.mlp.down_proj", 0, "g_idx", g_idx)
    assert torch.equal(got, torch.arange(64, dtype=torch.int32) // 32)
    with pytest.raises(ValueError, match="act-order"):
        shard_tensor(c, tp, "layers.0.mlp.down_proj", 0, "g_idx", g_idx.flip(0))
    c.quantization_config["group_size"] = 128
    with pytest.raises(ValueError, match="group boundaries"):
        shard_tensor(c, tp, "layers.0.mlp.down_proj", 0, "scales", torch.ones(1, 64))


def test_expert_shards_without_processes(tmp_path):
    """Expert tensors read as safetensors slices: each rank's rows of gate_proj / up_proj,
    columns of down_proj; transformers 5's stacked gate_up_proj [E, 2I, H] gives the same
    gate-then-up rows as the per-expert tensors, stacked down_proj the same columns; a
    wrong intermediate size and an indivisible one are refused by name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from minikernels.models.config import DecoderConfig
    from minikernels.models.parallel import check_config

    c = DecoderConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=8,
                      intermediate_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=2, num_experts=3, num_experts_per_tok=2,
                      moe_intermediate_size=6, moe_layers=[0])
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(3, *shape, generator=g) for shape in
                      ((6, 8), (6, 8), (8, 6)))
    path = str(tmp_path / "e.safetensors")
    save_file({"gate_up": torch.cat([gate, up], dim=1), "down": down, "gate1": gate[1].clone(),
               "up1": up[1].clone(), "down1": down[1].clone()}, path)
    mod = "layers.0.mlp.experts"
    with safe_open(path, framework="pt") as f:
        for r in range(2):
            tp = TensorParallel(r, 2)
            rows = slice(3 * r, 3 * r + 3)
            w13 = shard_tensor(c, tp, mod, None, "gate_up_proj", f.get_slice("gate_up"))
            assert torch.equal(w13, torch.cat([gate[:, rows], up[:, rows]], dim=1))
            assert torch.equal(shard_tensor(c, tp, mod, None, "down_proj", f.get_slice("down")),
                               down[:, :, rows])
            for kind, name, want in (("gate_proj", "gate1", gate[1][rows]),
                                     ("up_proj", "up1", up[1][rows]),
                                     ("down_proj", "down1", down[1][:, rows])):
                assert torch.equal(shard_tensor(c, tp, mod, 1, kind, f.get_slice(name)), want)
        with pytest.raises(ValueError, match="moe_intermediate_size 6"):
            shard_tensor(c, TensorParallel(0, 2), mod, 1, "gate_proj", f.get_slice("down1"))
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(6\)"):
        check_config(c, TensorParallel(0, 4))
    c.moe_intermediate_size, c.shared_expert_intermediate_size = 8, 6
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size \(6\)"):
        check_config(c, TensorParallel(0, 4))
    c.moe_layers, c.intermediate_size, c.shared_expert_intermediate_size = None, 6, 0
    check_config(c, TensorParallel(0, 4))   # every layer sparse: intermediate_size unused


#: A built-in-style MoE config (there is none built in yet): layer 0 sparse with a shared
#: expert, layer 1 dense; 64 = each rank's K is 32, so int4 group 16 divides every shard.
_TINY_MOE = dict(architecture="qwen2_moe", vocab_size=512, hidden_size=64,
                 intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, eos_token_ids=[257], bos_token_id=256,
                 qkv_bias=True, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, moe_layers=[0], shared_expert_intermediate_size=64)


@pytest.mark.parametrize("builtin", ["tiny-qwen3", "tiny-moe-test"])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_builtin_tp_shards_are_the_tp1_model_sharded(quant, builtin, monkeypatch):
    """A built-in (random-weight) model under TP: each rank holds its shard of the TP=1
    model of the same seed (so LLM("tiny", tensor_parallel_size=2) == LLM("tiny")); no
    processes, only the weights are built. int4 (RTN on load, group 16 divides every
    shard): each rank's dequantized layers are the shards of the TP=1 dequantized ones.
    The MoE config: experts' w13 / w2 are each rank's intermediate slices."""
    from minikernels.models import config as config_mod
    from minikernels.models.linear import FusedLinear
    from minikernels.models.parallel import shard_tensor

    monkeypatch.setitem(config_mod.BUILTIN_CONFIGS, "tiny-moe-test", _TINY_MOE)

    def dense(mod: FusedLinear) -> torch.Tensor:
        if mod.weight is not None:
            return mod.weight.float()
        return torch.cat([p.dequantize() for p in mod.int4_parts])

    kw = dict(dtype="float32", device="cpu", quantization=quant, group_size=16)
    full = load_model(builtin, **kw)
    full_mods = dict(full.named_modules())
    full_params = dict(full.named_parameters())
    checked = 0
    for r in range(2):
        tp = TensorParallel(r, 2)
        part = load_model(builtin, tensor_parallel=tp, **kw)
        for name, mod in part.named_modules():
            ref = full_mods[name]
            if isinstance(mod, FusedLinear):
                if name == "lm_head" and full.config.tie_word_embeddings:
                    continue
                want = torch.cat([shard_tensor(full.config, tp, name, s, "weight", w)
                                  for s, w in enumerate(torch.split(dense(ref),
                                                                    ref.output_sizes))])
                assert torch.equal(dense(mod), want), name
                checked += 1
            else:
                for p_name, t in mod.named_parameters(recurse=False):
                    key = f"{name}.{p_name}" if name else p_name
                    assert torch.equal(t, shard_tensor(full.config, tp, name, None, p_name,
                                                       full_params[key])), key
                    checked += 1
        if full.config.num_experts:   # spelled out: this rank's 16 of each expert's 32
            experts = part.layers[0].mlp.experts
            assert experts.is_int4 == (quant == "int4")
            want13, want2 = full.layers[0].mlp.experts.dequantized()
            got13, got2 = experts.dequantized()
            rows = slice(16 * r, 16 * r + 16)
            assert torch.equal(got13[:, :16], want13[:, rows])                 # gate
            assert torch.equal(got13[:, 16:], want13[:, 32:][:, rows])         # up
            assert torch.equal(got2, want2[:, :, rows])
    assert checked > 20


def test_hybrid_kv_pools_tp2_token_identical(tp_dirs):
    """Hybrid KV pools under tensor parallel (Gemma 3: a sliding and a full layer): every
    rank allocates the shared-slot layout and each step carries the sliding group's slots
    and tables; greedy tokens equal TP=1 (hybrid) and one table, through chunked prefill,
    prefix hits and decode past the window."""
    import minikernels as mk

    path = tp_dirs["gemma3"]
    prompts = [random_tokens(n, 300, 30 + n) for n in (5, 23, 12)]
    prompts.append(prompts[1][:17] + [7, 8])           # shares a cached prefix
    params = mk.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=96,
              max_num_batched_tokens=16, max_num_seqs=3)
    tp1 = mk.LLM(path, **kw)
    assert tp1.llm_engine.kv_layout is not None
    want = [o.outputs[0].token_ids for o in tp1.generate(prompts, params)]
    one = mk.LLM(path, disable_hybrid_kv_cache_manager=True, **kw)
    assert [o.outputs[0].token_ids for o in one.generate(prompts, params)] == want
    llm = mk.LLM(path, tensor_parallel_size=2, **kw)
    try:
        assert llm.llm_engine.kv_layout is not None
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == want
        llm.llm_engine.check_no_leaks()
    finally:
        llm.llm_engine.model.close()
