"""Hybrid recurrent models in the engine (LFM2: short-conv layers beside attention;
Qwen3.5: Gated DeltaNet layers beside gated attention; Granite 4.0-H: Mamba-2 layers;
Falcon-H1: Mamba-2 and attention in parallel in every layer; Nemotron-H: single-role
Mamba-2 / attention / MLP blocks; the attention-free Mamba and Mamba-2; Zamba / Zamba2:
Mamba-1 / Mamba-2 layers fed by shared attention blocks).

Each running sequence keeps its recurrent state in one slot (its block-table row): greedy
outputs must equal transformers' through everything that moves a sequence between
slots or splits its forward: chunked prefill, async scheduling on and off, slot reuse
after finishing, preemption (recompute from a zero state), aborts, and the decode-graph
runner's static buffers (padding rows touch no slot)."""
from __future__ import annotations

import pytest
import torch
from test_model_support import make_hf_model, random_tokens, save_hf

import minikernels as mk
from minikernels.engine.model_runner import _DecodeGraphs

GREEDY = mk.SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.0, logprobs=0)
LENGTHS = [5, 40, 17, 3, 33, 9]


def _checkpoint(kind: str, tmp_path_factory):
    if kind in _BUILT:
        return _BUILT[kind]
    hf = make_hf_model(kind, seed=3)
    path = save_hf(hf, str(tmp_path_factory.mktemp(kind)))
    prompts = [random_tokens(n, hf.config.vocab_size, 50 + i) for i, n in enumerate(LENGTHS)]
    want, HF_LOGPROBS[path] = [], []
    with torch.no_grad():
        for p in prompts:
            full = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                               eos_token_id=[], pad_token_id=0)[0]
            lp = torch.log_softmax(hf(full[None]).logits[0].float(), -1)
            new = full[len(p):]
            want.append(new.tolist())
            # each generated token's logprob (what a stale state would shift)
            HF_LOGPROBS[path].append(lp[len(p) - 1:-1].gather(1, new[:, None])[:, 0])
    _BUILT[kind] = path, prompts, want
    return _BUILT[kind]


_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    return _checkpoint("lfm2", tmp_path_factory)


@pytest.fixture(scope="module")
def hybrid(request, tmp_path_factory):
    """A hybrid family (the test's indirect parameter): (checkpoint, prompts,
    transformers' greedy tokens)."""
    return _checkpoint(request.param, tmp_path_factory)


#: every family: its state kinds (conv; conv + gated delta; conv + Mamba-2) and cache
#: entries (states only; Falcon-H1's (k, v) + states; Nemotron-H's MLP blocks' ())
FAMILIES = ["lfm2", "qwen3_5", "granite4-h", "falcon_h1", "nemotron_h", "olmo_hybrid",
            "jamba-moe", "mamba", "lfm3", "zamba2", "nemotron_h-moe", "mamba2", "zamba"]
#: the two recurrent ops whose fresh-start / resume flags matter beyond the conv's
STATEFUL = ["qwen3_5", "granite4-h", "mamba"]


#: transformers' logprob of each greedy token, per prompt (by checkpoint path)
HF_LOGPROBS: dict[str, list[torch.Tensor]] = {}


def _llm(path: str, **kw) -> mk.LLM:
    kw.setdefault("block_size", 8)
    return mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, **kw)


def _tokens(llm: mk.LLM, prompts, params=GREEDY) -> list[list[int]]:
    """Greedy tokens; their logprobs must equal transformers' (1e-4)."""
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.llm_engine.check_no_leaks()
    ref = HF_LOGPROBS.get(llm.llm_engine._model_dir)
    if ref is not None and params.logprobs is not None:
        for c, want_lp, p in zip(outs, ref, prompts):
            got = torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            assert (got - want_lp).abs().max() <= 1e-4, (len(p), got, want_lp)
    return [c.token_ids for c in outs]


@pytest.mark.parametrize(("hybrid", "kw"), [
    # async scheduling (the default), prompts prefilled in chunks, two slots reused by
    # the later requests: every family
    *[(kind, {"max_num_batched_tokens": 16, "max_num_seqs": 2}) for kind in FAMILIES],
    ("qwen3_5", {"async_scheduling": False}),
], indirect=["hybrid"], ids=[f"{k}-async-chunked-reuse" for k in FAMILIES] + ["qwen3_5-sync"])
def test_greedy_equals_transformers(hybrid, kw):
    path, prompts, want = hybrid
    llm = _llm(path, **kw)
    eng = llm.llm_engine
    assert eng.block_manager.enable_prefix_caching and eng._ckpt is not None   # checkpoints
    assert eng.block_manager.max_rows == eng.scheduler.max_num_seqs
    assert _tokens(llm, prompts) == want


@pytest.mark.parametrize("hybrid", STATEFUL, indirect=True)
def test_preemption_recomputes_from_a_zero_state(hybrid):
    path, prompts, want = hybrid
    llm = _llm(path, num_kv_blocks=14, max_num_seqs=4)
    assert _tokens(llm, prompts) == want
    assert llm.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("hybrid", STATEFUL, indirect=True)
def test_abort_frees_the_slot_for_a_fresh_sequence(hybrid):
    """A request aborted mid-decode leaves its slot with a stale state; the request that
    takes the slot next starts from zeros (has_initial_state False)."""
    path, prompts, want = hybrid
    llm = _llm(path, max_num_seqs=1, async_scheduling=False)
    eng = llm.llm_engine
    eng.add_request("a", prompts[1], GREEDY)
    for _ in range(4):
        eng.step()
    assert eng.requests["a"].seqs[0].block_row == 0
    eng.abort_request("a")
    b = eng.add_request("b", prompts[2], GREEDY)
    while eng.has_unfinished():
        eng.step()
    seq = b.seqs[0]
    assert seq.output_token_ids == want[2]
    got = torch.tensor([lp[t].logprob for t, lp in zip(seq.output_token_ids, seq.logprobs)])
    assert (got - HF_LOGPROBS[path][2]).abs().max() <= 1e-4
    eng.check_no_leaks()


class EagerDecodeGraphs(_DecodeGraphs):
    """The decode-graph runner with each bucket run eagerly from its static buffers."""

    def _capture(self, bs):
        return lambda: self._forward(bs)


@pytest.mark.parametrize("hybrid", ["falcon_h1", "nemotron_h", "jamba-moe", "zamba2", "zamba"],
                         indirect=True)
def test_decode_graph_buffers_carry_the_state_slots(hybrid):
    """Decode steps replayed from the static buffers (bucket 8 for 3 to 6 rows: padding
    rows with state slot -1) give transformers' tokens."""
    path, prompts, want = hybrid
    llm = _llm(path)
    runner = llm.llm_engine.runner
    runner.graphs = EagerDecodeGraphs(runner.model, runner.kv_caches, [1, 2, 4, 8],
                                      runner.max_blocks_per_seq, runner.config.vocab_size,
                                      with_state=True)
    replays = []
    run = runner.graphs.run
    runner.graphs.run = lambda inputs: replays.append(inputs.meta.num_decode) or run(inputs)
    assert _tokens(llm, prompts) == want
    assert len(replays) >= 5 and any(n not in (1, 2, 4, 8) for n in replays)


def test_seeded_sampling_is_reproducible(lfm2):
    path, prompts, _ = lfm2
    params = mk.SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2, ignore_eos=True)
    runs = [[[c.token_ids for c in o.outputs]
             for o in _llm(path, **kw).generate(prompts[:3], params, use_tqdm=False)]
            for kw in ({}, {"async_scheduling": False}, {"max_num_batched_tokens": 16})]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize(("hybrid", "accepts"), [("qwen3_5", "none"), ("falcon_h1", "some"),
                                                 ("mamba", "all")],
                         indirect=["hybrid"])
def test_speculative_decoding_rolls_back_rejected_drafts(hybrid, accepts, tmp_path):
    """n-gram and draft-model speculation on hybrid models: each verification step
    snapshots its rows' states; a row with a rejected draft gets its state back and
    recomputes its accepted tokens next step. Tokens and logprobs equal no speculation,
    drafts were both accepted and rejected, and no slot or block leaks."""
    path, _, _ = hybrid
    prompts = [([5, 6, 7, 8, 9, 10] * 8)[:n] for n in (20, 33, 41)] + \
        [[11, 12, 13, 11, 12, 13, 11, 12]]
    params = mk.SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0, logprobs=0)

    def run(**kw):
        llm = _llm(path, **kw)
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.check_no_leaks()
        return outs, llm.llm_engine

    want, _ = run()
    draft = save_hf(make_hf_model("llama", seed=5), str(tmp_path / "draft"))   # same vocab
    for spec in ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                  "prompt_lookup_max": 3},
                 {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}):
        got, eng = run(speculative_config=spec)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], spec["method"]
        for a, b in zip(got, want):
            assert max(abs(x[t].logprob - y[t].logprob)
                       for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids)) <= 1e-4
        drafted, accepted = eng.spec_draft_tokens_total, eng.spec_accepted_tokens_total
        if spec["method"] == "draft_model":
            assert drafted > accepted
        else:      # (these random models' n-gram drafts: all rejected, some, all accepted)
            assert {"none": accepted == 0, "some": 0 < accepted < drafted,
                    "all": accepted == drafted > 0}[accepts]


def test_what_recurrent_models_refuse(lfm2, tmp_path):
    path, _, _ = lfm2
    with pytest.raises(ValueError, match="speculative_config.method 'eagle'"):
        _llm(path, speculative_config={"method": "eagle", "model": path,
                                       "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="draft model with recurrent layers"):
        _llm(save_hf(make_hf_model("llama"), str(tmp_path / "t")),
             speculative_config={"method": "draft_model", "model": path,
                                 "num_speculative_tokens": 2})
    from minikernels.models import load_model
    from minikernels.models.parallel import check_config
    config = load_model(path, dtype="float32", device="cpu").config
    assert config.is_recurrent and config.layer_mixers == ["short_conv", "attention",
                                                           "short_conv"]
    check_config(config, _FakeTP(2))     # sharded by channels (models/parallel_recurrent.py)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide hidden_size"):
        check_config(config, _FakeTP(3))


class _FakeTP:
    """What check_config reads of a TensorParallel: its size."""

    def __init__(self, size: int) -> None:
        self.size = size


def test_state_pool_sizes(lfm2):
    """One slot per max_num_seqs (and per prefix-cache checkpoint); the state is each conv
    layer's last W - 1 inputs."""
    path, _, _ = lfm2
    llm = _llm(path, max_num_seqs=5)
    runner = llm.llm_engine.runner
    assert runner.num_state_slots == 5 + 5      # running sequences, prefix-cache checkpoints
    model = runner.model
    c = model.config
    states = [kv for kv, layer in zip(runner.kv_caches, model.layers) if layer.conv is not None]
    assert len(states) == 2
    assert all(s[0].shape == (10, c.hidden_size, c.conv_kernel - 1) for s in states)
    assert model.state_bytes_per_slot() == 2 * c.hidden_size * (c.conv_kernel - 1) * 4
    # the KV pool counts the one attention layer only
    assert model.kv_bytes_per_token() == 2 * c.num_kv_heads * c.head_dim * 4
    with pytest.raises(ValueError, match="num_state_slots"):
        model.allocate_kv_caches(4, 8)


@pytest.mark.parametrize("kind", ["qwen3_5", "granite4-h", "nemotron_h", "lfm2_moe",
                                  "mamba", "jamba"])
def test_weight_sync_and_sleep_reach_the_recurrent_layers(kind, tmp_path):
    """load_weights (RL weight sync) fills the recurrent layers' own parameters (conv
    kernels, dt_bias, A_log, D, gated norms) by transformers' in-memory names (Nemotron-H's
    model.* too; LFM2-MoE's expert-bias buffers passed beside the parameters), and a sleep
    / wake cycle keeps the weights and rebuilds zeroed state slots: the new model's
    logprobs."""
    path = save_hf(make_hf_model(kind, seed=1), str(tmp_path / "a"))
    other = make_hf_model(kind, seed=2)
    prompts = [random_tokens(n, other.config.vocab_size, 9 + n) for n in (6, 21)]
    llm = _llm(path)
    llm.load_weights(list(other.named_parameters()) + [
        (n, b) for n, b in other.named_buffers() if n.endswith("expert_bias")])
    llm.sleep(level=1)
    llm.wake_up()
    for p, out in zip(prompts, llm.generate(prompts, GREEDY, use_tqdm=False)):
        c = out.outputs[0]
        with torch.no_grad():
            lp = torch.log_softmax(other(torch.tensor([p + c.token_ids])).logits[0], -1)
        want = lp[len(p) - 1:-1].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        got = torch.tensor([d[t].logprob for t, d in zip(c.token_ids, c.logprobs)])
        assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("hybrid", ["qwen3_5", "granite4-h", "falcon_h1", "mamba", "lfm3",
                                    "zamba2", "mamba2", "zamba"], indirect=True)
def test_prefix_caching_resumes_from_state_checkpoints(hybrid):
    """Prefix caching on hybrid models: states are checkpointed every 8 tokens (chunks end
    there), and a request sharing a prefix resumes from the longest checkpointed prefix
    that its KV hits cover. Tokens and logprobs equal no caching, one request at a time
    or batched, with async scheduling on and off; the hits all end at a boundary."""
    path, _, _ = hybrid
    shared = random_tokens(40, 300, 7)
    prompts = [shared + random_tokens(n, 300, 20 + n) for n in (3, 9, 14)] + [shared[:35]]
    want = _tokens_and_lps(_llm(path, block_size=4, enable_prefix_caching=False), prompts)
    for kw in ({}, {"async_scheduling": False}):
        llm = _llm(path, block_size=4, state_checkpoint_interval=8, max_num_seqs=4, **kw)
        eng = llm.llm_engine
        got = [_tokens_and_lps(llm, [p])[0] for p in prompts]   # later ones hit earlier
        got += _tokens_and_lps(llm, prompts)                      # batched, all hit
        for (toks, lps), (want_toks, want_lps) in zip(got, want + want):
            assert toks == want_toks and (lps - want_lps).abs().max() <= 1e-4
        assert eng.block_manager.num_hit_tokens >= 3 * 40 and eng._ckpt.by_hash
        eng.check_no_leaks()
        eng.reset_prefix_cache()
        assert not eng._ckpt.by_hash and not eng._ckpt.pending


def _tokens_and_lps(llm: mk.LLM, prompts) -> list[tuple[list[int], torch.Tensor]]:
    params = mk.SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0, logprobs=0)
    outs = []
    for o in llm.generate(prompts, params, use_tqdm=False):
        c = o.outputs[0]
        if o.num_cached_tokens:       # a hit resumes exactly at a checkpoint boundary
            assert o.num_cached_tokens % 8 == 0
        outs.append((list(c.token_ids), torch.tensor([d[t].logprob for t, d in
                                                      zip(c.token_ids, c.logprobs)])))
    return outs


def test_state_checkpoints_bookkeeping():
    """engine/state_cache.py: chunks end at boundaries; hits are cut to the longest keyed
    checkpoint; a checkpoint is keyed only once its tokens are known; least recently used
    checkpoints are overwritten; duplicates free their slot; clear forgets everything."""
    from minikernels.engine.block_manager import BlockManager
    from minikernels.engine.sequence import Request, Sequence
    from minikernels.engine.state_cache import StateCheckpoints

    bm = BlockManager(64, 4)
    ck = StateCheckpoints(first_slot=10, num_slots=2, interval_blocks=2, block_size=4)
    assert (ck.align_chunk(0, 20), ck.align_chunk(5, 20), ck.align_chunk(8, 3)) == (8, 3, 3)

    def seq(tokens):
        s = Sequence(0, Request("r", None, tokens, mk.SamplingParams(), None), 0)
        bm.hash_prompt(s)
        return s
    a, b, c = seq(list(range(3, 27))), seq(list(range(3, 27))), seq(list(range(50, 74)))
    slots = [ck.take(), ck.take()]
    assert slots == [10, 11] and ck.take() is None          # both wait to be keyed
    ck.add_pending(a, 2, slots[0])
    ck.add_pending(a, 4, slots[1])
    a.token_ids = a.token_ids[:12]                           # block 4's tokens not known
    ck.register_pending(bm)
    assert list(ck.by_hash.values()) == [10] and len(ck.pending) == 1
    a.token_ids = list(range(3, 27))
    ck.register_pending(bm)
    assert sorted(ck.by_hash.values()) == [10, 11] and not ck.pending
    assert ck.cut_hits(b, [0] * 5, bm) == 4 and b.state_restore == 11   # longest keyed
    assert ck.cut_hits(b, [0] * 3, bm) == 2 and b.state_restore == 10
    assert ck.cut_hits(c, [0] * 5, bm) == 0 and c.state_restore == -1
    assert ck.take() == 11                  # b's last hit made 10 the most recent
    assert list(ck.by_hash.values()) == [10]
    ck.add_pending(c, 2, 11)
    ck.clear()
    assert not ck.by_hash and sorted(ck.free) == [10, 11]
    first = ck.take()
    ck.add_pending(a, 2, first)
    ck.register_pending(bm)
    ck.add_pending(b, 2, ck.take())         # b's prefix is a's: a duplicate checkpoint
    ck.register_pending(bm)
    assert list(ck.by_hash.values()) == [first] and len(ck.free) == 1


def test_serve_flags_reach_the_state_checkpoints(lfm2):
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    kw = engine_kwargs(parser.parse_args(["m", "--state-checkpoint-interval", "16",
                                          "--state-checkpoint-slots", "3"]))
    assert (kw["state_checkpoint_interval"], kw["state_checkpoint_slots"]) == (16, 3)
    assert "state_checkpoint_interval" not in engine_kwargs(parser.parse_args(["m"]))
    path, _, _ = lfm2
    eng = _llm(path, state_checkpoint_interval=16, state_checkpoint_slots=3).llm_engine
    assert (eng._ckpt.interval, len(eng._ckpt.free)) == (16, 3)
    with pytest.raises(ValueError, match="state_checkpoint_interval .* multiple of block_size"):
        _llm(path, state_checkpoint_interval=12)


def test_sequence_classifier_on_a_hybrid_decoder(tmp_path):
    """mk.Classifier runs a Qwen3.5 sequence classifier (the cache-less forward: every
    prompt from a zero state) with transformers' probabilities."""
    import transformers
    from test_model_support import BASE, CASES, randomize_

    _, extra = CASES["qwen3_5"]
    cfg = transformers.Qwen3_5TextConfig(**{**BASE, **extra, "num_labels": 3,
                                            "pad_token_id": 0})
    torch.manual_seed(0)
    hf = randomize_(transformers.Qwen3_5ForSequenceClassification(cfg).float().eval(), 1)
    hf.save_pretrained(str(tmp_path))
    clf = mk.Classifier(str(tmp_path), dtype="float32", device="cpu", tokenizer=None)
    prompts = [random_tokens(n, 300, 40 + n) for n in (5, 17, 1)]
    got = clf.classify(prompts)
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([p])).logits[0].float().softmax(-1)
                            for p in prompts])
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize(("kind", "targets"), [
    # Qwen3.5: gated attention's [q | gate] q_proj, the Gated DeltaNet's fused in_proj
    # parts (qkv, z, a) and out_proj (both mixers' out_proj), the MLP
    ("qwen3_5", ["q_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_a",
                 "out_proj", "gate_proj", "down_proj"]),
    # Granite 4.0-H: attention, the Mamba-2 in_proj, the fused shared MLP
    ("granite4-h", ["q_proj", "k_proj", "in_proj", "input_linear", "output_linear"]),
    # LFM2: attention (its out_proj), the short conv's in / out projections, w1 / w2 / w3
    ("lfm2", ["q_proj", "out_proj", "in_proj", "w1", "w2", "w3"]),
    # Jamba: attention, the Mamba-1 in / x / out projections, the dense MLPs; Mamba's
    # "mixer" names (transformers reads dt_proj's weight directly, so PEFT's adapter on it
    # never runs there: not a target here)
    ("jamba", ["q_proj", "in_proj", "x_proj", "out_proj", "gate_proj", "down_proj"]),
    ("mamba", ["in_proj", "x_proj"]),      # (PEFT refuses Mamba's out_proj)
    ("mamba2", ["in_proj"]),               # (and Mamba-2's: its mixer's "mixer" names)
    # Nemotron-H: each block's one "mixer" (the Mamba-2 in_proj, attention, the non-gated
    # MLP's up / down; PEFT refuses its Mamba out_proj)
    ("nemotron_h", ["in_proj", "q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    # Nemotron 3: the same on a model with expert blocks (the experts' LoRA slots sized for
    # non-gated experts, unused here)
    ("nemotron_h-moe", ["in_proj", "q_proj", "o_proj"]),
])
def test_lora_adapters_on_hybrid_models(kind, targets, tmp_path):
    """PEFT adapters on the attention, MLP and recurrent mixers' projections: greedy tokens
    equal PEFT's own generation; a target in a layer without that module is refused by
    name."""
    import shutil

    from safetensors.torch import load_file, save_file
    from test_lora import make_adapter

    from minikernels.engine import LoRARequest
    from minikernels.models.lora import LoRAError

    hf = make_hf_model(kind, seed=3)
    base = save_hf(hf, str(tmp_path / "base"))
    path = str(tmp_path / "lora")
    ref = make_adapter(hf, path, r=4, alpha=8, targets=targets, seed=1)
    llm = _llm(base, enable_lora=True, max_lora_rank=8)
    prompts = [random_tokens(n, 300, 40 + n) for n in (9, 6)]
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=LoRARequest("a", 1, path))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = ref.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == want
    if kind == "qwen3_5":       # layer 0 is a Gated DeltaNet layer: no q_proj there
        bad = str(tmp_path / "bad")
        shutil.copytree(path, bad)
        t = load_file(f"{bad}/adapter_model.safetensors")
        for half, shape in (("A", (4, 64)), ("B", (128, 4))):
            t[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{half}.weight"] = \
                torch.zeros(shape)
        save_file(t, f"{bad}/adapter_model.safetensors")
        with pytest.raises(LoRAError, match="attention in layer 0, a gated_deltanet layer"):
            llm.generate(prompts[:1], params, use_tqdm=False,
                         lora_request=LoRARequest("bad", 2, bad))


def test_beam_search_on_a_hybrid_model(tmp_path):
    """LLM.beam_search (one-token steps per live beam, beams admitted as new requests)
    gives the same beams with prefix caching off, on (default checkpoints) and with
    checkpoints every 8 tokens (beams resuming from their prompts' checkpoints)."""
    path = save_hf(make_hf_model("qwen3_5", seed=3), str(tmp_path / "m"))
    prompts = [{"prompt_token_ids": random_tokens(n, 300, n)} for n in (7, 12)]
    params = mk.BeamSearchParams(beam_width=3, max_tokens=6)
    runs = []
    for kw in ({"enable_prefix_caching": False}, {}, {"state_checkpoint_interval": 8}):
        llm = _llm(path, block_size=4, **kw)
        runs.append([[b.tokens for b in o.sequences]
                     for o in llm.beam_search(prompts, params)])
        llm.llm_engine.check_no_leaks()
    assert runs[0] == runs[1] == runs[2]
    assert llm.llm_engine.block_manager.num_hit_tokens > 0
