"""Speculative decoding (n-gram) in the engine: greedy outputs token-identical with and
without speculation over many prompts (repetitive and random; overlap on and off; tiny
pool with preemption; chunked prefill; prefix caching; mixed batches with sequences that
cannot draft), stops land exactly as without speculation (EOS, stop ids, stop strings,
max_tokens, min_tokens), seeded sampling reproduces run to run, aborts and the batch-size
threshold; every test leaves every KV block free. CPU, tiny models (as test_engine.py)."""
from __future__ import annotations

import random

import pytest
import torch
from test_engine import _make_hf, assert_all_free, tokens

from minikernels.engine import LLM, SamplingParams
from minikernels.engine.spec_decode import NgramProposer, SpeculativeConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 4}


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a short random phrase (n-gram drafts get accepted) and plain
    random prompts (drafts mostly rejected)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append([r.randrange(3, 300) for _ in range(r.randrange(1, 30))])
        else:
            phrase = [r.randrange(3, 300) for _ in range(r.randrange(2, 9))]
            out.append((phrase * 8)[:r.randrange(4, 45)])
    return out


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("spec_llama")
    _make_hf("llama").save_pretrained(str(p))
    return str(p)


def make(path, spec=None, **kw):
    kw.setdefault("block_size", 8)
    return LLM(path, dtype="float32", device="cpu", tokenizer=None, speculative_config=spec,
               **kw)


GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline(path):
    prompts = repetitive_prompts(8)
    return prompts, tokens(make(path).generate(prompts, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("kw", [
    {"async_scheduling": True},
    {"num_kv_blocks": 7, "enable_prefix_caching": False},     # preemption
    {"max_num_batched_tokens": 8, "max_num_seqs": 4},          # chunked prefill, cut drafts
], ids=["overlap", "preempt", "chunked"])
def test_greedy_identical_with_speculation(path, baseline, kw):
    prompts, want = baseline
    llm = make(path, NGRAM, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(outs) == want
    st = llm.stats()
    assert st["spec_num_draft_tokens"] > 0 and st["spec_num_accepted_tokens"] > 0
    assert 1.0 < st["spec_mean_acceptance_length"] <= 4.0
    if "num_kv_blocks" in kw:
        assert st["num_preemptions"] > 0
    m = [o.metrics for o in outs]
    assert sum(x["spec_num_draft_tokens"] for x in m) == st["spec_num_draft_tokens"]
    assert sum(x["spec_num_accepted_tokens"] for x in m) == st["spec_num_accepted_tokens"]
    assert_all_free(llm)


def test_prefix_cache_hits_with_speculation(path):
    base = repetitive_prompts(1, seed=4)[0] * 2
    prompts = [base + [5, 6, 7], base + [9], base]
    want = tokens(make(path).generate(prompts, GREEDY, use_tqdm=False))
    llm = make(path, NGRAM)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
    # again: hits blocks written by speculative steps (only known tokens are cached)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
    assert llm.stats()["prefix_cache_hit_tokens"] > 0
    assert_all_free(llm)


def save_target_and_near(root) -> None:
    """root/target: test_engine's llama (V = 300); root/near: the target with noisy
    weights (a draft close to it: most drafts accepted, not all)."""
    target = _make_hf("llama")
    target.save_pretrained(str(root / "target"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    target.save_pretrained(str(root / "near"))


def mixed_stop_params(ref: list[list[int]]) -> list[SamplingParams]:
    """Greedy rows that end every way (stop ids, max_tokens, min_tokens, EOS id 2, a stop
    id met late) or carry penalties / logprobs (rows 2 and 3); ref: each prompt's plain
    greedy tokens, where the stop ids are taken from."""
    stop_ids = [ref[0][5], ref[1][9]]
    return [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=stop_ids, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=6, stop_token_ids=stop_ids),
        SamplingParams(temperature=0, max_tokens=20),                       # EOS (id 2)
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ref[7][3]]),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    ]


def test_mixed_batch_and_stops_land_exactly(path):
    """Rows with penalties and logprobs next to plain ones (all draft); stop ids,
    max_tokens, min_tokens and EOS stop at the same token as without speculation."""
    prompts = repetitive_prompts(9, seed=2)
    ref = tokens(make(path).generate(prompts, GREEDY, use_tqdm=False))
    params = mixed_stop_params(ref)
    for async_scheduling in (True, False):
        want = make(path, async_scheduling=async_scheduling).generate(prompts, params,
                                                                      use_tqdm=False)
        llm = make(path, NGRAM, async_scheduling=async_scheduling)
        got = llm.generate(prompts, params, use_tqdm=False)
        assert tokens(got) == tokens(want)
        assert [o.outputs[0].finish_reason for o in got] == \
            [o.outputs[0].finish_reason for o in want]
        assert [o.outputs[0].stop_reason for o in got] == \
            [o.outputs[0].stop_reason for o in want]
        assert_logprobs_close(got[3].outputs[0].logprobs, want[3].outputs[0].logprobs)
        assert llm.stats()["spec_num_accepted_tokens"] > 0
        assert_all_free(llm)


def assert_logprobs_close(got, want, tol: float = 1e-4) -> None:
    """Same entries (token ids, ranks, order) with logprob values equal within fp32
    tolerance (verification scores several positions in one forward: not bit-equal)."""
    assert got is not None and want is not None and len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for t in g:
            assert g[t].rank == w[t].rank and g[t].decoded_token == w[t].decoded_token
            assert abs(g[t].logprob - w[t].logprob) <= tol, (t, g[t], w[t])


def test_stop_strings_land_exactly():
    prompts = ["abcabcabcabc", "hello hello hello hello", "xyz"]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=128)
    text = [o.outputs[0].text for o in plain.generate(prompts, sp, use_tqdm=False)]
    stops = [t[len(t) // 2:len(t) // 2 + 2] for t in text if len(t) >= 4] or ["zz"]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stops)
    want = plain.generate(prompts, sp, use_tqdm=False)
    spec = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=128,
               speculative_config=NGRAM)
    got = spec.generate(prompts, sp, use_tqdm=False)
    assert [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].stop_reason)
            for o in got] == [(o.outputs[0].text, o.outputs[0].token_ids,
                               o.outputs[0].stop_reason) for o in want]
    assert_all_free(spec)


def test_seeded_sampling_reproducible_and_unseeded_runs(path):
    prompts = repetitive_prompts(6, seed=3)
    sp = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i, max_tokens=20,
                         ignore_eos=True) for i in range(6)]
    runs = []
    for _ in range(2):
        llm = make(path, NGRAM)
        runs.append(tokens(llm.generate(prompts, sp, use_tqdm=False)))
        assert llm.stats()["spec_num_draft_tokens"] > 0
        assert_all_free(llm)
    assert runs[0] == runs[1]
    # A seeded request's output does not depend on the rest of the batch.
    alone = tokens(make(path, NGRAM).generate(prompts[:1], sp[:1], use_tqdm=False))
    assert alone[0] == runs[0][0]
    llm = make(path, NGRAM)
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=16,
                                                ignore_eos=True), use_tqdm=False)
    assert all(len(t) == 16 for t in tokens(outs))
    assert_all_free(llm)


def test_abort_mid_generation_frees_blocks(path):
    llm = make(path, NGRAM)
    eng = llm.llm_engine
    for i, p in enumerate(repetitive_prompts(4, seed=5)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=40,
                                                   ignore_eos=True))
    for _ in range(12):
        eng.step()
        if eng.spec_draft_tokens_total:
            break
    assert eng.spec_draft_tokens_total > 0
    eng.abort_request("r0")
    eng.abort_request("r1")
    while eng.has_unfinished():
        eng.step()
    assert_all_free(llm)


def test_batch_size_threshold_disables_drafts(path):
    prompts = repetitive_prompts(4, seed=6)
    params = [GREEDY] * 3 + [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    want = tokens(make(path).generate(prompts, params, use_tqdm=False))
    counts = []
    for limit in (1, 32):
        llm = make(path, {**NGRAM, "disable_by_batch_size": limit})
        assert tokens(llm.generate(prompts, params, use_tqdm=False)) == want
        counts.append(llm.stats()["spec_num_draft_tokens"])
        assert_all_free(llm)
    # limit 1: drafts only once the long request runs alone
    assert 0 < counts[0] < counts[1]


def test_ngram_proposer_and_config():
    p = NgramProposer(SpeculativeConfig.from_dict(NGRAM))
    assert p.lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]        # longest suffix [1, 2]
    assert p.lookup([1, 2, 3, 1, 2, 3, 1, 2], 3) == [3, 1, 2]  # latest earlier match
    assert p.lookup([7, 8, 9], 3) == []
    assert p.lookup([5, 5], 3) == [5]
    assert p.lookup([1, 2, 1, 2], 0) == []
    for bad, msg in (({"method": "eagle"}, "method"), ({"num_speculative_tokens": 0},
                     "num_speculative_tokens"), ({"prompt_lookup_min": 3,
                     "prompt_lookup_max": 2}, "prompt_lookup_min"), ({"foo": 1}, "foo")):
        with pytest.raises(ValueError, match=msg):
            SpeculativeConfig.from_dict(bad)
    with pytest.raises(TypeError):
        SpeculativeConfig.from_dict("ngram")


@pytest.mark.parametrize("n_min,n_max", [(1, 4), (2, 3), (1, 1), (3, 3)])
def test_ngram_index_equals_the_scan(n_min, n_max):
    """The incremental n-gram index (what propose uses) gives the reference scan's
    proposal after every append, over random repetitive sequences (a 6-token vocabulary:
    many matches) and large ids; release drops a sequence's index."""
    import random

    from minikernels.engine.spec_decode import NgramIndex

    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4,
                                       "prompt_lookup_min": n_min,
                                       "prompt_lookup_max": n_max})
    p = NgramProposer(cfg)
    r = random.Random(n_min * 10 + n_max)
    for trial in range(200):
        idx, toks = NgramIndex(n_min, n_max), []
        vocab = 6 if trial % 4 else 2**21 - 1
        for _ in range(r.randrange(1, 30)):
            toks += [r.randrange(vocab) for _ in range(r.randrange(1, 5))]
            idx.update(toks)
            for k in (0, 1, 3, 5):
                assert idx.lookup(toks, k) == p.lookup(toks, k), (toks, k)

    class Seq:
        seq_id, token_ids = 7, [1, 2, 3, 1, 2]

    assert p.propose([Seq], [4])[0] == [p.lookup(Seq.token_ids, 4)] and 7 in p.indexes
    p.release(Seq)
    assert not p.indexes
    Seq.token_ids = [2**21, 5, 2**21, 5]     # ids past the packing: the scan
    assert p.propose([Seq], [4])[0] == [p.lookup(Seq.token_ids, 4)] and not p.indexes


def test_serve_flag_and_metrics_lines():
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs
    from minikernels.server.metrics import ServerMetrics

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["tiny", "--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert engine_kwargs(args)["speculative_config"] == {"method": "ngram",
                                                         "num_speculative_tokens": 2}
    assert "speculative_config" not in engine_kwargs(parser.parse_args(["tiny"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["tiny", "--speculative-config", "[1]"])
    text = ServerMetrics().render("m", {"spec_num_draft_tokens": 10,
                                        "spec_num_accepted_tokens": 6,
                                        "spec_mean_acceptance_length": 2.5})
    assert "minikernels_spec_decode_num_accepted_tokens_total" in text
    assert "minikernels_spec_decode_mean_acceptance_length" in text


def bench_module():
    """bench/bench_spec_decode.py as a module (bench/ is scripts, not the package)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "bench_spec_decode", pathlib.Path(__file__).parent.parent / "bench" /
        "bench_spec_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_smoke_copying_needs_half_the_forwards():
    import argparse

    mod = bench_module()
    res = mod.run(argparse.Namespace(k=4, tokens=48, requests=1))
    assert res["copy"]["reduction"] >= 2.0 and res["code-edit"]["reduction"] >= 2.0
    assert res["free-text"]["off"]["forwards_per_token"] == pytest.approx(
        res["free-text"]["off"]["forwards"] / res["free-text"]["off"]["tokens"])
