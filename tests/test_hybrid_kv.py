"""Hybrid KV pools (models/kv_layout.py, engine/block_manager.py): sliding-window layers get
their own block tables and hand back the blocks behind their window.

Proof: the layout plan; the block manager's accounting (releases behind the window,
prefix hits that need the window cached, trim, batched frees, invariants); greedy and
seeded outputs identical with the hybrid pools on and off across long prompts, chunked
prefill, prefix hits, preemption, async scheduling and an fp8 cache; and the capacity it
buys (blocks held by a long sequence, blocks per byte).
"""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.engine.block_manager import BlockManager
from minikernels.engine.model_runner import _DecodeGraphs
from minikernels.engine.sampling_params import SamplingParams
from minikernels.engine.sequence import Request, Sequence
from minikernels.models.config import DecoderConfig, builtin_config
from minikernels.models.decoder import CausalLM
from minikernels.models.kv_layout import KVCacheLayout, plan_kv_layout
from minikernels.models.loader import _init_dummy


def gemma_like(num_layers: int, sliding: list[int], window: int = 8) -> DecoderConfig:
    return DecoderConfig(**{**builtin_config("tiny-gemma3").to_dict(),
                            "num_layers": num_layers, "sliding_window_layers": sliding,
                            "sliding_window": window})


# ------------------------------------------------------------------------ layout


def test_layout_groups_share_slots_without_clashes():
    # Gemma 3's pattern: every 6th layer full; 12 layers -> F = 2, S = 10 -> 5 groups
    cfg = gemma_like(12, [i for i in range(12) if (i + 1) % 6])
    lay = plan_kv_layout(cfg)
    assert lay.hybrid and lay.num_slots == 2 and lay.num_groups == 6 and lay.window == 8
    assert [lay.layer_group[i] for i in (5, 11)] == [0, 0]
    pairs = {(lay.layer_group[i], lay.layer_slot[i]) for i in range(12)}
    assert len(pairs) == 12, "two layers of one group share a cache tensor"
    assert all(0 <= s < lay.num_slots for s in lay.layer_slot)
    # Gemma 2: alternating -> one sliding group; the last group may be padded
    assert plan_kv_layout(gemma_like(6, [0, 2, 4])).num_groups == 2
    odd = plan_kv_layout(gemma_like(7, [0, 1, 2, 4, 5]))        # F = 2, S = 5 -> 3 groups
    assert odd.num_groups == 4 and odd.num_slots == 2
    # fewer sliding than full layers, none, a single layer, or off: one table
    for cfg in (gemma_like(4, [0]), gemma_like(1, [0]), builtin_config("tiny")):
        assert not plan_kv_layout(cfg).hybrid
    # every layer sliding (Mistral v0.1): the first ceil(L / 8) keep every block as group 0
    allw = plan_kv_layout(gemma_like(32, list(range(32))))
    assert allw.num_slots == 4 and allw.num_groups == 8
    assert allw.layer_group[:5] == (0, 0, 0, 0, 1)
    assert plan_kv_layout(gemma_like(3, [0, 1, 2])).num_groups == 3
    assert plan_kv_layout(gemma_like(6, [0, 2, 4]), hybrid=False) == KVCacheLayout.uniform(6)


def test_caches_are_shared_per_slot_and_sized_by_slots():
    cfg = gemma_like(6, [0, 1, 3, 4])
    model = CausalLM(cfg, dtype=torch.float32, device="cpu")
    lay = plan_kv_layout(cfg)
    caches = model.allocate_kv_caches(4, 2, layout=lay)
    assert len({id(k) for k, _ in caches}) == lay.num_slots == 2
    for i in range(6):
        for j in range(6):
            same = caches[i][0] is caches[j][0]
            assert same == (lay.layer_slot[i] == lay.layer_slot[j])
    assert model.kv_bytes_per_token(layout=lay) * 3 == model.kv_bytes_per_token()


# ------------------------------------------------------------------------ block manager


def make_seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    req = Request(str(seq_id), None, tokens, SamplingParams(max_tokens=64))
    return Sequence(seq_id, req, 0)


def step(bm: BlockManager, seq: Sequence, n: int) -> None:
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n


def test_blocks_behind_the_window_go_back_to_the_pool():
    bm = BlockManager(64, 4, enable_prefix_caching=True, sliding_groups=2, sliding_window=6)
    seq = make_seq(list(range(1, 41)))
    assert bm.num_usable_blocks == 63 and bm.null_block == 63
    step(bm, seq, 16)                       # chunk 0..15: 4 blocks, all in use by the chunk
    assert len(seq.block_table) == 4 and [t is not None for t in seq.swa_blocks] == [True] * 4
    bm.check_invariants([seq])
    step(bm, seq, 8)                        # chunk 16..23 reads keys from 11 on: block 2..
    assert [t is None for t in seq.swa_blocks] == [True, True, False, False, False, False]
    assert (bm.swa_table[:, seq.block_row, :2] == bm.null_block).all()
    assert bm.num_free_blocks == 63 - 6 - 2 * 4
    bm.check_invariants([seq])
    for _ in range(16):                     # decode past block boundaries
        step(bm, seq, 1)
    held = [t for t in seq.swa_blocks if t is not None]
    assert len(seq.block_table) == 10 and len(held) <= 3
    bm.check_invariants([seq])
    bm.free_seq(seq)
    assert bm.num_free_blocks == 63
    bm.check_invariants([])


def test_prefix_hits_need_the_window_in_the_sliding_groups():
    bm = BlockManager(64, 4, enable_prefix_caching=True, sliding_groups=1, sliding_window=6)
    prompt = list(range(1, 30))
    a = make_seq(prompt, 0)
    bm.hash_prompt(a)
    step(bm, a, 29)
    b = make_seq(prompt, 1)
    bm.hash_prompt(b)
    hits = bm.lookup_prefix(b)
    assert len(hits) == 7 and hits.sliding[:5] == [None] * 5      # tokens 28.. need 23..
    assert hits.sliding[5:] == a.swa_blocks[5:7]
    assert bm.allocate(b, 1, hits)
    assert b.num_computed_tokens == 28 and b.swa_lo == 5
    bm.check_invariants([a, b])
    # a finishes; its window blocks stay cached while free; evicting one shortens hits
    bm.free_seq(a)
    bm.free_seq(b)
    bm.check_invariants([])
    c = make_seq(prompt, 2)
    bm.hash_prompt(c)
    tup = bm.swa_cached[c.block_hashes[6]]
    del bm.swa_cached[c.block_hashes[6]]
    for blk in tup:
        bm.blocks[blk].hash = None
    hits = bm.lookup_prefix(c)
    assert len(hits) == 6 and hits.sliding[-1] is not None
    assert bm.allocate(c, 29 - 24, hits)
    bm.check_invariants([c])


def test_trim_batched_free_and_failure_keep_the_accounting():
    bm = BlockManager(40, 4, enable_prefix_caching=False, sliding_groups=2, sliding_window=5)
    seqs = [make_seq(list(range(1, 12)), i) for i in range(9)]
    for s in seqs[:4]:
        step(bm, s, 11)
    bm.trim(seqs[0], 5)
    assert len(seqs[0].block_table) == 2 and len(seqs[0].swa_blocks) == 2
    bm.check_invariants(seqs[:4])
    before = bm.num_free_blocks
    assert not bm.allocate(seqs[4], 11, reserve_blocks=before)   # too small: nothing taken
    assert bm.num_free_blocks == before and not seqs[4].block_table
    for s in seqs[4:6]:
        step(bm, s, 4)
    bm.free_seqs(seqs[:8])                  # the batched path (>= 8 sequences)
    assert bm.num_free_blocks == 39
    bm.check_invariants([])


# ------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def model():
    """6 layers, 4 of them sliding (window 8): 2 cache slots, 3 KV groups."""
    cfg = gemma_like(6, [0, 1, 3, 4], window=8)
    m = CausalLM(cfg, dtype=torch.float32, device="cpu")
    _init_dummy(m, 0, None)
    m.eval().requires_grad_(False)
    return m


def generate(model, prompts, params, **kw):
    llm = mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4, **kw)
    eng = llm.llm_engine
    outs = llm.generate(prompts, params, use_tqdm=False)
    eng.check_no_leaks()
    st = llm.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"]
    return [o.outputs[0].token_ids for o in outs], eng


PROMPTS = [list(range(3, 40)), list(range(50, 61)), list(range(100, 130)), [7] * 5]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("kw", [
    dict(num_kv_blocks=300),
    dict(num_kv_blocks=300, max_num_batched_tokens=12, async_scheduling=False),  # chunks
    dict(num_kv_blocks=40, max_num_batched_tokens=8),                # preemption
    dict(num_kv_blocks=300, kv_cache_dtype="fp8"),
])
def test_greedy_outputs_match_one_table(model, kw):
    got, eng = generate(model, PROMPTS, GREEDY, **kw)
    assert eng.kv_layout is not None and eng.kv_layout.num_groups == 3
    want, base = generate(model, PROMPTS, GREEDY, disable_hybrid_kv_cache_manager=True, **kw)
    assert base.kv_layout is None
    assert got == want
    if kw["num_kv_blocks"] == 40:
        assert eng.scheduler.num_preemptions > 0      # (the hybrid pool holds more per seq)


def test_prefix_hits_and_seeded_sampling_match(model):
    shared = list(range(3, 40))
    prompts = [shared + [i, i + 1] for i in range(70, 74)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12) for i in range(4)]
    got, eng = generate(model, prompts, params, num_kv_blocks=400, max_num_seqs=2)
    want, _ = generate(model, prompts, params, num_kv_blocks=400, max_num_seqs=2,
                       disable_hybrid_kv_cache_manager=True)
    assert got == want
    assert eng.block_manager.num_hit_tokens >= 2 * 36     # later requests hit the prefix


def test_every_layer_sliding(tmp_path):
    """A model whose every layer is sliding (Mistral v0.1's shape): its first layer keeps
    every block as group 0, the others release theirs; tokens equal one table."""
    m = CausalLM(gemma_like(4, [0, 1, 2, 3], window=8), dtype=torch.float32, device="cpu")
    _init_dummy(m, 3, None)
    m.eval().requires_grad_(False)
    got, eng = generate(m, PROMPTS, GREEDY, num_kv_blocks=300, max_num_batched_tokens=12)
    assert eng.kv_layout.num_groups == 4 and eng.kv_layout.layer_group == (0, 1, 2, 3)
    want, _ = generate(m, PROMPTS, GREEDY, num_kv_blocks=300, max_num_batched_tokens=12,
                       disable_hybrid_kv_cache_manager=True)
    assert got == want


def test_a_long_sequence_holds_only_its_window_in_the_sliding_groups(model):
    llm = mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                 num_kv_blocks=200)
    eng = llm.llm_engine
    eng.add_request("r", list(range(3, 43)), SamplingParams(temperature=0.0, max_tokens=30,
                                                            ignore_eos=True))
    peak = 0
    while eng.has_unfinished():
        eng.step()
        seqs = [s for r in eng.requests.values() for s in r.seqs]
        for s in seqs:
            held = sum(t is not None for t in s.swa_blocks)
            if len(s.token_ids) > 48:
                # window 8 over blocks of 4: at most 3 blocks (+ the step's own), while
                # the full-attention table holds every block
                assert held <= 4 and len(s.block_table) >= 12, (held, len(s.block_table))
                peak = max(peak, held)
        eng.check_no_leaks()
    assert 0 < peak <= 4


def test_longest_sequence_counts_the_sliding_spans(model):
    """max_model_len: the longest sequence that fits the pool alone, its sliding groups'
    blocks spanning a chunk and the window before it (2 groups x 7 blocks here)."""
    llm = mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                 num_kv_blocks=120, max_num_batched_tokens=16)
    assert llm.max_model_len == (119 - 2 * 7) * 4
    with pytest.raises(ValueError, match="max_model_len"):
        mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4,
               num_kv_blocks=120, max_num_batched_tokens=16, max_model_len=421)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_over_hybrid_pools(model, method):
    """n-gram and draft-model speculation keep the hybrid pools: greedy tokens equal
    speculation off and one table, eager and through the verification graphs' buffers
    (a CPU stand-in); rejected drafts' sliding blocks are trimmed (no leaks)."""
    from test_spec_graphs import EagerVerifyGraphs

    rep = [([5, 6, 7, 8] * 12)[:n] for n in (33, 19, 41)]
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":      # drafts from the prompt: some accepted, some rejected
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:                      # the target as its own draft (its own one-table pool)
        spec["model"] = model
    want, _ = generate(model, rep, GREEDY, num_kv_blocks=300)
    for standin in (False, True):
        llm = mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                     num_kv_blocks=300, speculative_config=spec)
        eng = llm.llm_engine
        assert eng.kv_layout is not None
        if standin:
            eng.runner.capture_verify_graphs(EagerVerifyGraphs)
        got = [o.outputs[0].token_ids for o in llm.generate(rep, GREEDY, use_tqdm=False)]
        eng.check_no_leaks()
        assert got == want
        assert eng.stats()["spec_num_accepted_tokens"] > 0
        if standin:
            assert eng.runner.verify_graphs.num_replays > 0
    one, _ = generate(model, rep, GREEDY, num_kv_blocks=300, speculative_config=spec,
                      disable_hybrid_kv_cache_manager=True)
    assert one == want


class EagerDecodeGraphs(_DecodeGraphs):
    """The decode-graph runner with each bucket run eagerly from its static buffers
    (what its CUDA graph would compute): the hybrid groups' buffers on the CPU."""

    def _capture(self, bs):
        return lambda: self._forward(bs)


def test_decode_graph_buffers_carry_the_group_tables(model):
    llm = mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                 num_kv_blocks=300)
    runner = llm.llm_engine.runner
    runner.graphs = EagerDecodeGraphs(runner.model, runner.kv_caches, [1, 2, 4, 8],
                                      runner.max_blocks_per_seq, model.config.vocab_size,
                                      kv_layout=runner.kv_layout)
    replays = []
    run = runner.graphs.run
    runner.graphs.run = lambda inputs: replays.append(1) or run(inputs)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    want, _ = generate(model, PROMPTS, GREEDY, num_kv_blocks=300,
                       disable_hybrid_kv_cache_manager=True)
    assert len(replays) >= 10 and got == want


def test_eagle_head_over_hybrid_pools(tmp_path):
    """An EAGLE head reads the target's group-0 table (full-attention blocks) while the
    sliding groups hand back theirs: greedy tokens equal no speculation and one table."""
    import transformers
    from test_eagle import HEADS, INTER, KV_HEADS, VOCAB, H, _save_head

    cfg = transformers.MinistralConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=4,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        head_dim=H // HEADS,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(7)
    hf = transformers.MinistralForCausalLM(cfg).float().eval()
    hf.save_pretrained(str(tmp_path / "target"))
    _save_head(tmp_path / "head", "eagle", 1, own_embed=True)
    prompts = [([5, 6, 7, 8, 9] * 9)[:n] for n in (31, 12, 40)]

    def run(spec, **kw):
        llm = mk.LLM(str(tmp_path / "target"), dtype="float32", device="cpu", tokenizer=None,
                     block_size=4, num_kv_blocks=300, speculative_config=spec, **kw)
        toks = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        llm.llm_engine.check_no_leaks()
        return toks, llm.llm_engine

    eagle = {"method": "eagle", "model": str(tmp_path / "head"), "num_speculative_tokens": 3}
    want, plain = run(None)
    got, eng = run(eagle)
    assert plain.kv_layout is not None and eng.kv_layout is not None
    assert eng.spec_draft_tokens_total > 0 and got == want
    one, base = run(eagle, disable_hybrid_kv_cache_manager=True)
    assert base.kv_layout is None and one == want


def test_bench_serve_flag_reaches_the_llm():
    """``bench serve --disable-hybrid-kv-cache-manager`` builds its LLM with it (the GPU
    run measures Gemma 3 with the pools on and off)."""
    from helpers import bench_serve_llm_kwargs

    for argv, want in (([], False), (["--disable-hybrid-kv-cache-manager"], True)):
        seen = bench_serve_llm_kwargs(["--model", "tiny-gemma3", "--no-save", *argv])
        assert seen["disable_hybrid_kv_cache_manager"] is want


def test_the_same_kv_bytes_run_more_sequences_at_once(model):
    """The capacity the pools buy, measured in the engine: with the same KV bytes (a
    hybrid block holds 2 layers' K/V, a plain one 6, so 3x the blocks), sequences
    decoding past the window run 1.5x as many at once or more (7 vs 4 when written: the
    full-attention third of the layers still keeps every block)."""
    prompts = [list(range(3 + i, 63 + i)) for i in range(8)]       # 60 tokens each
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    lay = plan_kv_layout(model.config)
    assert model.kv_bytes_per_token(layout=lay) * 180 == model.kv_bytes_per_token() * 60

    def peak_running(**kw):
        llm = mk.LLM(model, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                     max_num_batched_tokens=16, **kw)
        eng = llm.llm_engine
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        peak = 0
        while eng.has_unfinished():
            eng.step()
            peak = max(peak, len(eng.scheduler.running))
        eng.check_no_leaks()
        return peak

    one = peak_running(num_kv_blocks=60, disable_hybrid_kv_cache_manager=True)
    hybrid = peak_running(num_kv_blocks=180)
    assert 2 * hybrid >= 3 * one, (hybrid, one)
