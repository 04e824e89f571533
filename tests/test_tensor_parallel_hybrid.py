"""Tensor parallel for hybrid models (models/parallel_recurrent.py) and models whose layers
differ in attention shape (Gemma 4), on CPU (gloo): TP=2 logits equal TP=1 for tiny saved
HF models of every sharded recurrent mixer and of Gemma 4, dense and
int4 (RTN on load), cache-less and over a paged schedule whose recurrent states sit in
shuffled slots (chunked prefill, then decode); greedy LLM.generate token-identical.

One spawn of 2 ranks runs every case (spawn + import is most of the cost)."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import spawn_ranks
from test_model_support import make_hf_model, save_hf
from test_tensor_parallel import GROUP, QUANT, _free_port, _rank_main, check_logits

from minikernels.models import load_model
from minikernels.models.config import DecoderConfig
from minikernels.models.parallel import TensorParallel, parallel_style, shard_tensor
from minikernels.models.parallel_recurrent import check_mixers, mamba2_shard

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# case -> (test_model_support CASES kind, overrides). Widths chosen so int4 group 32
# divides every rank's K slice (then TP int4 equals slices of TP=1 int4).
HYBRID_CASES = {
    # Qwen3.5 MoE: Gated DeltaNet (fused in_proj [qkv | z | b | a], one conv; Hk 2, Hv 4
    # over 2 ranks) beside gated attention (q rows [q | gate] per head), experts and the
    # gated shared expert
    "qwen3_5_moe": ("qwen3_5_moe", {"linear_value_head_dim": 16, "moe_intermediate_size": 64,
                                    "shared_expert_intermediate_size": 64}),
    # OLMo Hybrid: six separate projections and three conv pieces, beta scale; full q / k
    # norms
    "olmo_hybrid": ("olmo_hybrid", {"linear_value_head_dim": 16}),
    # LFM3: the short conv's b / c / u channels, per-head sigmoid gates (g_proj)
    "lfm3": ("lfm3", {}),
    # Mamba-2: 2 groups over 2 ranks (each its group, norms local), Granite 4.0-H's
    # multipliers; one group over 2 ranks (B / C replicated, the gated norm's sum of
    # squares all-reduced) with experts
    "granite4-h": ("granite4-h", {"shared_intermediate_size": 128}),
    "granite4-h-moe": ("granite4-h-moe", {"intermediate_size": 64,
                                          "shared_intermediate_size": 64}),
    # Falcon-H1: Mamba-2 beside attention (two all-reduces summed), muP section scales
    "falcon_h1": ("falcon_h1", {}),
    # Mamba-1: x_proj row-parallel (all-reduced before Jamba's dt / B / C norms), dt_proj
    # column-parallel, in_proj biases; Jamba with experts; attention-free Mamba (dt_rank 5:
    # its int4 dt_proj stays dense)
    "jamba-moe": ("jamba-moe", {"intermediate_size": 64}),
    # Nemotron 3: non-gated experts in a latent space (router and latent projections
    # replicated), a non-gated shared expert: one all-reduce; Mamba-2 blocks
    "nemotron_h-latent": ("nemotron_h-latent", {"moe_intermediate_size": 64,
                                                "moe_shared_expert_intermediate_size": 64}),
    "mamba": ("mamba", {}),
    # Zamba2: Mamba-2 layers and hybrid layers calling two shared blocks in turn (their
    # attention over [stream, embeddings] and MLP sharded, each caller's adapters' B rows
    # cut alike, its linear replicated)
    "zamba2": ("zamba2", {"intermediate_size": 128}),
    # Mamba-2 (attention-free): 2 groups over 2 ranks, biases on in_proj / out_proj
    "mamba2": ("mamba2", {}),
    # Gemma 4: full layers with their own head dim and one kv head (replicated on both
    # ranks) and K = V, the last layers reading earlier layers' K / V, double-wide MLPs
    # there, per-layer inputs (replicated); and the experts beside the MLP
    "gemma4": ("gemma4", {"intermediate_size": 128}),
    "gemma4-moe": ("gemma4-moe", {"moe_intermediate_size": 64}),
}
#: other configs the tests below build from the same models
EXTRA_CASES = {"qwen3_5": ("qwen3_5", {"linear_value_head_dim": 16}), "jamba": ("jamba", {}),
               "gemma3n": ("gemma3n", {}), "zamba": ("zamba", {})}


@pytest.fixture(scope="module")
def hybrid_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {name: save_hf(make_hf_model(kind, **over), str(tmp_path_factory.mktemp(name)))
            for name, (kind, over) in HYBRID_CASES.items()}


def test_hybrid_tp2_logits_equal_tp1(hybrid_dirs, tmp_path):
    spawn_ranks(_rank_main, (2, _free_port(), hybrid_dirs, str(tmp_path), {}), 2)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    # Gemma 4's tiny model is ill-conditioned (int4 itself moves its logits by ~100%:
    # softcap, per-layer inputs, K = V): the fp16 partial sums' rounding grows to ~1.5%
    # there (fp32 is exact to 2e-5, so the cut is right), ~1/70 of what int4 itself changes
    check_logits(ranks, hybrid_dirs, QUANT, GROUP, int4_tol={"gemma4": 0.02})


def test_hybrid_llm_generate_tp2_token_identical(hybrid_dirs, tmp_path, monkeypatch):
    """LLM(tensor_parallel_size=2) on hybrid models: each rank's state slots hold its
    channels of every sequence's state; greedy tokens equal TP=1 through chunked prefill,
    prefix caching (state checkpoints copied on every rank) and batched decode, eagerly
    and through the lock-step decode-graph protocol (each row's state slot from a static
    buffer; test_tensor_parallel_tp4's CPU stand-in for the graphs). Gemma 4 too: its
    layers' K / V of different shapes in each rank's hybrid pools, shared K / V read."""
    import minikernels as mk
    from minikernels.distributed.graphs import TensorParallelDecodeGraphs
    from minikernels.engine.model_runner import graph_batch_sizes
    from test_tensor_parallel_tp4 import EagerGraphs

    monkeypatch.setenv("MK_TP_GRAPH_LOG", str(tmp_path))   # before the workers spawn

    prompts = [[5, 9, 17, 33, 2, 8, 19, 4, 11, 3, 7, 21, 6], [5, 9, 17, 33, 2, 8, 40, 1],
               [12, 14, 16]]
    params = mk.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for name in ("qwen3_5_moe", "granite4-h-moe", "gemma4"):
        kw = dict(dtype="float32", device="cpu", max_num_batched_tokens=8, block_size=4,
                  enable_prefix_caching=True, state_checkpoint_interval=8, max_model_len=64)
        want = [o.outputs[0].token_ids for o in mk.LLM(hybrid_dirs[name], **kw).generate(
            [{"prompt_token_ids": p} for p in prompts], params)]
        llm = mk.LLM(hybrid_dirs[name], tensor_parallel_size=2, **kw)
        try:
            for run in range(2):     # the second run resumes from state checkpoints
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
                assert [o.outputs[0].token_ids for o in outs] == want, (name, run)
            assert outs[0].num_cached_tokens >= 8, name
            if name == "gemma4":     # (its hybrid KV pools' graph buffers: test_hybrid_kv.py)
                continue
            runner = llm.llm_engine.runner
            runner.graphs = TensorParallelDecodeGraphs(
                llm.llm_engine.model, runner.kv_caches, graph_batch_sizes(4),
                runner.max_blocks_per_seq, llm.llm_engine.model.config.vocab_size,
                runner_cls=EagerGraphs, with_state=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
            assert [o.outputs[0].token_ids for o in outs] == want, (name, "graphs")
        finally:
            llm.llm_engine.model.close()
    logs = [open(os.path.join(tmp_path, f"rank{r}")).read() for r in range(2)]
    assert logs[0] == logs[1] and logs[0].count("replay") >= 2 * 4


def test_hybrid_ngram_speculation_tp2_token_identical(hybrid_dirs):
    """n-gram speculation on a hybrid model under TP=2: each verification snapshots the
    rows' state slots and a rejection restores them, on every rank (copy_states); greedy
    tokens equal TP=1 without speculation, and drafts are accepted (and rejected)."""
    import minikernels as mk

    path = hybrid_dirs["falcon_h1"]        # (drafts both accepted and rejected here)
    prompts = [([5 + i, 40 + 3 * i, 77, 9 + i] * 6)[:15 + 4 * i] for i in range(3)]
    params = mk.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", block_size=4, max_model_len=64, max_num_seqs=4)
    want = [o.outputs[0].token_ids for o in mk.LLM(path, **kw).generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    llm = mk.LLM(path, tensor_parallel_size=2, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3}, **kw)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params)]
        st = llm.stats()
    finally:
        llm.llm_engine.model.close()
    assert got == want
    assert 0 < st["spec_num_accepted_tokens"] < st["spec_num_draft_tokens"]


def _config(case: str) -> DecoderConfig:
    import json
    import tempfile

    kind, over = {**HYBRID_CASES, **EXTRA_CASES}[case]
    with tempfile.TemporaryDirectory() as d:
        save_hf(make_hf_model(kind, **over), d)
        with open(os.path.join(d, "config.json")) as f:
            return DecoderConfig.from_hf(json.load(f))


def test_mamba2_groups_and_refusals_without_processes():
    """Which B / C group each rank reads (groups split, or replicated when the ranks
    outnumber them), the cut of a fused Mamba-2 in_proj, and the sizes refused by name."""
    import dataclasses

    c = _config("granite4-h")                # 8 heads of 16, 2 groups of state 12
    assert [(s.h0, s.nh, s.g0, s.ng, s.norm_span) for s in
            (mamba2_shard(c, r, 2) for r in range(2))] == [(0, 4, 0, 1, 1), (4, 4, 1, 1, 1)]
    assert [(s.h0, s.g0, s.norm_span) for s in (mamba2_shard(c, r, 4) for r in range(4))] \
        == [(0, 0, 2), (2, 0, 2), (4, 1, 2), (6, 1, 2)]
    inner, gn, h = 8 * 16, 2 * 12, 8
    w = torch.arange(2 * inner + 2 * gn + h, dtype=torch.float32)[:, None]
    got = shard_tensor(c, TensorParallel(1, 2), "layers.0.mamba.in_proj", 0, "weight", w)
    want = torch.cat([w[64:128], w[inner + 64:inner + 128], w[2 * inner + 12:2 * inner + 24],
                      w[2 * inner + gn + 12:2 * inner + 2 * gn], w[-4:]])
    assert torch.equal(got, want)
    assert parallel_style(c, "layers.0.mamba.in_proj") == "column"
    assert parallel_style(c, "layers.0.mamba.out_proj") == "row"
    b = torch.ones(64)
    assert not shard_tensor(c, TensorParallel(1, 2), "layers.0.mamba.out_proj", 0, "bias",
                            b).any()
    with pytest.raises(ValueError, match=r"mamba_num_groups \(3\)"):
        check_mixers(dataclasses.replace(c, mamba_num_heads=6, mamba_num_groups=3), 2)
    with pytest.raises(ValueError, match=r"must divide mamba_num_heads \(8\)"):
        check_mixers(c, 3)
    from minikernels.models.parallel import check_config
    with pytest.raises(ValueError, match="Gemma 3n"):
        check_config(_config("gemma3n"), TensorParallel(0, 2))
    with pytest.raises(ValueError, match="multi-head Mamba-1"):     # (Zamba)
        check_config(_config("zamba"), TensorParallel(0, 2))
    with pytest.raises(ValueError, match="linear_num_value_heads"):
        check_mixers(dataclasses.replace(_config("qwen3_5"), linear_num_key_heads=4,
                                         linear_num_value_heads=6), 4)


def test_gated_delta_and_mamba1_cuts_without_processes():
    """Qwen3.5's fused [q | k | v] rows and per-value-head parameters; Mamba-1's x / z rows,
    its x_proj columns (row-parallel) and dt_proj rows (column-parallel)."""
    c = _config("qwen3_5")              # Hk 2 x dk 8, Hv 4 x dv 16
    tp = TensorParallel(1, 2)
    w = torch.arange(2 * 16 + 64, dtype=torch.float32)[:, None]
    got = shard_tensor(c, tp, "layers.0.linear_attn.in_proj", 0, "weight", w)
    assert torch.equal(got, torch.cat([w[8:16], w[24:32], w[32 + 32:32 + 64]]))
    a_log = torch.arange(4.)
    assert torch.equal(shard_tensor(c, tp, "layers.0.linear_attn", None, "A_log", a_log),
                       a_log[2:])
    assert parallel_style(c, "layers.1.self_attn.qkv_proj") == "column"
    c = _config("jamba")                # inner 2 x 64 = 128
    x = torch.arange(256 * 3, dtype=torch.float32).reshape(256, 3)
    assert torch.equal(shard_tensor(c, tp, "layers.0.mamba.in_proj", 0, "weight", x),
                       torch.cat([x[64:128], x[192:]]))
    xp = torch.arange(30 * 128, dtype=torch.float32).reshape(30, 128)
    assert torch.equal(shard_tensor(c, tp, "layers.0.mamba.x_proj", 0, "weight", xp),
                       xp[:, 64:])
    assert parallel_style(c, "layers.0.mamba.x_proj") == "row"
    assert parallel_style(c, "layers.0.mamba.dt_proj") == "column"


@pytest.mark.parametrize("kind,targets", [
    # Gated DeltaNet's fused parts (q / k / v rows per head range, z, a) and out_proj
    # (row-parallel), gated attention's q (rows [q | gate] per head) and o
    ("qwen3_5", ["q_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_a", "out_proj"]),
    # Mamba-1: in_proj's x / z rows and x_proj's columns (row-parallel, all-reduced)
    ("jamba", ["in_proj", "x_proj", "out_proj", "q_proj"]),
])
def test_hybrid_lora_tp2_token_identical(kind, targets, tmp_path):
    """PEFT adapters on the recurrent mixers' projections under TP=2: each rank's slots
    hold the rows / columns its shard of the projection has (column-parallel B rows per
    section, row-parallel A columns); greedy tokens equal TP=1 with the same adapter."""
    import minikernels as mk
    from minikernels.engine import LoRARequest
    from test_lora import make_adapter

    family, over = EXTRA_CASES[kind]
    hf = make_hf_model(family, seed=3, **over)
    base = save_hf(hf, str(tmp_path / "base"))
    path = str(tmp_path / "lora")
    make_adapter(hf, path, r=4, alpha=8, targets=targets, seed=1)
    prompts = [[5, 9, 17, 33, 2, 8, 19, 4, 11], [12, 14, 16, 3, 7, 1]]
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8,
              block_size=4, max_model_len=64)
    request = LoRARequest("a", 1, path)

    def greedy(llm: mk.LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            lora_request=request)
        return [o.outputs[0].token_ids for o in outs]

    want = greedy(mk.LLM(base, **kw))
    base_tokens = [o.outputs[0].token_ids for o in mk.LLM(base, **kw).generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    assert want != base_tokens               # the adapter changes the tokens
    llm = mk.LLM(base, tensor_parallel_size=2, **kw)
    try:
        assert greedy(llm) == want
    finally:
        llm.llm_engine.model.close()


def test_hybrid_weight_sync_and_sleep_tp2(tmp_path):
    """RL loops on a hybrid model under TP=2: after sleep / wake_up (every rank's state
    pool emptied and refilled) and after load_weights of other weights (each rank copies
    its rows / columns of every mixer tensor), greedy tokens equal TP=1 with the same
    weights."""
    import minikernels as mk

    family, over = EXTRA_CASES["qwen3_5"]
    path = save_hf(make_hf_model(family, **over), str(tmp_path / "m"))
    new = make_hf_model(family, seed=7, **over).state_dict()
    prompts = [{"prompt_token_ids": p} for p in ([5, 9, 17, 33, 2, 8, 19, 4], [12, 14, 16])]
    params = mk.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", block_size=4, max_model_len=64)

    def greedy(llm: mk.LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    one = mk.LLM(path, **kw)
    want = greedy(one)
    one.load_weights(new.items())
    want_new = greedy(one)
    assert want_new != want
    llm = mk.LLM(path, tensor_parallel_size=2, **kw)
    try:
        llm.sleep(1)
        llm.wake_up()
        assert greedy(llm) == want
        llm.load_weights(new.items())
        assert greedy(llm) == want_new
    finally:
        llm.llm_engine.model.close()
