"""Per-request engine parameters: prompt_logprobs, priority, cache_salt (issue 15).

prompt_logprobs are checked against transformers' log-softmax on a tiny HF model, with
chunked prefill, preemption, a warm prefix cache, n > 1, and overlap on and off. Priority
scheduling is checked by finishing order; cache salts by cached prompt tokens (not by
timing). Every test compares overlap on and off and leaves every KV block free.
"""
from __future__ import annotations

import pytest
import torch

from minikernels.engine import LLM, SamplingParams
from test_engine import _make_hf, assert_all_free, make_llm, prompts_of

LENGTHS = [1, 2, 9, 23, 37]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = _make_hf("llama", seed=3)
    path = tmp_path_factory.mktemp("llama_plp")
    model.save_pretrained(str(path))
    prompts = prompts_of(LENGTHS, seed=9)
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), dim=-1)
               for p in prompts]
    return str(path), prompts, ref


def check_prompt_logprobs(outs, prompts, ref, k: int) -> None:
    """Each output's prompt_logprobs equals transformers' log-softmax (vLLM's shape)."""
    for o, p, r in zip(outs, prompts, ref):
        pl = o.prompt_logprobs
        assert len(pl) == len(p) and pl[0] is None
        for i in range(1, len(p)):
            entry, row = pl[i], r[i - 1]
            assert p[i] in entry
            assert entry[p[i]].logprob == pytest.approx(row[p[i]].item(), abs=2e-4)
            assert entry[p[i]].rank == int((row > row[p[i]]).sum()) + 1
            top = torch.topk(row, k)
            by_rank = {lp.rank: t for t, lp in entry.items() if lp.rank <= k}
            assert [by_rank[j] for j in range(1, k + 1)] == top.indices.tolist()
            assert len(entry) <= k + 1


@pytest.mark.parametrize("kw,num_prompts", [
    (dict(), 5),                                                   # whole prompts
    (dict(max_num_batched_tokens=2, max_num_seqs=3), 3),           # 1- and 2-token chunks
    (dict(max_num_batched_tokens=7, max_num_seqs=4), 5),           # chunked prefill
    (dict(num_kv_blocks=8, enable_prefix_caching=False, max_num_batched_tokens=16), 5),
])
def test_prompt_logprobs_match_transformers(hf, kw, num_prompts):
    path, prompts, ref = hf
    prompts, ref = prompts[:num_prompts], ref[:num_prompts]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=3,
                            n=2)
    results = []
    for overlap in (True, False):
        llm = make_llm(path, async_scheduling=overlap, **kw)
        # Warm the prefix cache with the same prompts: prompt_logprobs must not hit it.
        plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                     ignore_eos=True), use_tqdm=False)
        assert all(o.prompt_logprobs is None for o in plain)
        outs = llm.generate(prompts, params, use_tqdm=False)
        check_prompt_logprobs(outs, prompts, ref, 3)
        assert all(o.num_cached_tokens == 0 for o in outs)
        # The sampled tokens do not change.
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids
                                                          for o in plain]
        results.append(outs)
        if "num_kv_blocks" in kw:
            assert llm.stats()["num_preemptions"] > 0
        assert_all_free(llm)
    # Overlap on = off: the same tokens, the same prompt logprobs (up to the float noise
    # of different batch shapes when preemption differs).
    for a, b in zip(*results):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert sorted(ea) == sorted(eb)
            assert all(ea[t].logprob == pytest.approx(eb[t].logprob, abs=1e-5) for t in ea)


def test_prompt_logprobs_zero_gives_the_prompt_token_only_and_skips_the_cache(hf):
    path, prompts, ref = hf
    llm = make_llm(path)
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate(prompts[-1:], greedy, use_tqdm=False)
    before = llm.stats()
    out = llm.generate(prompts[-1:], SamplingParams(temperature=0, max_tokens=2,
                                                    ignore_eos=True, prompt_logprobs=0),
                       use_tqdm=False)
    check_prompt_logprobs(out, prompts[-1:], ref[-1:], 0)
    assert all(len(e) == 1 for e in out[0].prompt_logprobs[1:])
    after = llm.stats()
    # Not a prefix-cache query (and no hit) ...
    assert after["prefix_cache_queried_tokens"] == before["prefix_cache_queried_tokens"]
    assert after["prefix_cache_hit_tokens"] == before["prefix_cache_hit_tokens"]
    # ... but a plain request still hits the blocks it computed.
    again = llm.generate(prompts[-1:], greedy, use_tqdm=False)
    assert again[0].num_cached_tokens > 0
    assert llm.stats()["prefix_cache_queried_tokens"] == \
        after["prefix_cache_queried_tokens"] + len(prompts[-1])
    assert_all_free(llm)


def test_one_token_chunk_mid_prompt_is_a_prefill_chunk(hf):
    # With a budget of 2 a decode row and a one-token prompt chunk share a step; that
    # chunk is not the prompt's last token, so it must not be treated as a decode row.
    path, prompts, _ = hf
    prompts = prompts[:3]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(path).generate(prompts, greedy,
                                                                     use_tqdm=False)]
    for overlap in (True, False):
        llm = make_llm(path, max_num_batched_tokens=2, max_num_seqs=4,
                       async_scheduling=overlap)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert got == want
        assert_all_free(llm)


# ---------------------------------------------------------------------------- priority
def finish_order(llm: LLM, requests: list[tuple[str, list[int], SamplingParams]]) -> list[str]:
    eng = llm.llm_engine
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    order = []
    while eng.has_unfinished():
        for req in eng.step():
            if req.finished:
                order.append(req.request_id)
    return order


def test_priority_orders_admission_ties_by_arrival():
    prompts = prompts_of([5, 6, 7, 8, 9], seed=2)
    prios = [3, 0, 3, -1, 0]
    orders = []
    for overlap in (True, False):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
                  max_num_seqs=1, async_scheduling=overlap)
        reqs = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                            priority=pr))
                for i, (p, pr) in enumerate(zip(prompts, prios))]
        orders.append(finish_order(llm, reqs))
        assert_all_free(llm)
    assert orders[0] == orders[1] == ["r3", "r1", "r4", "r0", "r2"]


def test_preemption_takes_the_lowest_priority_first():
    # Three long requests in a pool too small for all: the lowest priority (largest
    # value) is preempted, not the newest arrival.
    prompts = prompts_of([20, 20, 20], seed=4)
    for overlap in (True, False):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=9, block_size=8,
                  async_scheduling=overlap, enable_prefix_caching=False)
        eng = llm.llm_engine
        prios = [0, 5, -2]      # r1 is the lowest priority; r2 (newest) the highest
        reqs = [eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=30,
                                                           ignore_eos=True, priority=pr))
                for i, (p, pr) in enumerate(zip(prompts, prios))]
        while eng.has_unfinished():
            eng.step()
        pre = [r.metrics["num_preemptions"] for r in reqs]
        assert pre[1] > 0 and pre[2] == 0, pre
        assert_all_free(llm)


def test_priority_outputs_equal_fcfs_outputs():
    prompts = prompts_of([3, 17, 40, 9, 25], seed=6)
    base = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True)
            for i in range(5)]
    prio = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True,
                           priority=(7 * i) % 3) for i in range(5)]
    outs = []
    for params in (base, prio):
        for overlap in (True, False):
            llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=10, block_size=8,
                      max_num_seqs=3, async_scheduling=overlap)
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                       use_tqdm=False)])
            assert_all_free(llm)
    assert outs[0] == outs[1] == outs[2] == outs[3]


# ---------------------------------------------------------------------------- cache salt
def test_cache_salt_keeps_prefix_caches_apart():
    prompt = prompts_of([41], seed=8)[0]           # 5 full blocks of 8
    for overlap in (True, False):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
                  async_scheduling=overlap)

        def run(salt):
            return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4,
                                                         ignore_eos=True, cache_salt=salt),
                                use_tqdm=False)[0]

        first = run("alice")
        assert first.num_cached_tokens == 0
        assert run("bob").num_cached_tokens == 0          # another salt: no hit
        assert run(None).num_cached_tokens == 0           # unsalted: no hit either
        hit = run("alice")
        assert hit.num_cached_tokens == 40                # same salt: its blocks
        assert run(None).num_cached_tokens == 40          # unsalted shares with unsalted
        assert hit.outputs[0].token_ids == first.outputs[0].token_ids
        st = llm.stats()
        assert st["prefix_cache_hit_tokens"] == 80
        assert st["prefix_cache_queried_tokens"] == 5 * 41
        assert_all_free(llm)


def test_bad_new_params_are_refused_by_name():
    with pytest.raises(TypeError, match="priority"):
        SamplingParams(priority=1.5)
    with pytest.raises(TypeError, match="priority"):
        SamplingParams(priority=True)
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")
    with pytest.raises(TypeError, match="cache_salt"):
        SamplingParams(cache_salt=b"x")
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(TypeError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=1.0)
    for bad in (1e-50, 1e-40, 1e39, 0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)
    SamplingParams(repetition_penalty=0.01, priority=-(2 ** 70), cache_salt="x",
                   prompt_logprobs=0)


# ------------------------------------------------------------------ truncate_prompt_tokens
def test_truncate_prompt_tokens_keeps_the_last_k():
    """vLLM's left truncation: the request runs on the last k prompt tokens (or the last
    max_model_len with -1), through LLM.generate and AsyncLLM alike; the output equals
    a request for those k tokens; prompt_token_ids are the kept ones."""
    import asyncio

    from minikernels.engine import AsyncLLM

    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
              max_model_len=48)
    long = prompts_of([60], seed=11)[0]
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate([long[-7:]], SamplingParams(**greedy), use_tqdm=False)[0]
    got = llm.generate([long], SamplingParams(truncate_prompt_tokens=7, **greedy),
                       use_tqdm=False)[0]
    assert got.prompt_token_ids == long[-7:]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    text = "a fairly long prompt " * 8
    ids = llm.get_tokenizer().encode(text)
    out = llm.generate([text], SamplingParams(truncate_prompt_tokens=5, **greedy),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == list(ids[-5:]) and out.prompt == text
    # -1: the context length; the prompt then leaves no room for output -> refused
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([long], SamplingParams(truncate_prompt_tokens=-1, **greedy),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([long], SamplingParams(**greedy), use_tqdm=False)

    async def stream() -> list[int]:
        engine = AsyncLLM(llm)
        try:
            toks = []
            async for o in engine.generate(long, SamplingParams(truncate_prompt_tokens=7,
                                                                **greedy), "t"):
                toks = o.outputs[0].token_ids
                assert o.prompt_token_ids == long[-7:]
            return toks
        finally:
            await engine.shutdown()

    assert asyncio.run(stream()) == want.outputs[0].token_ids
    for bad, err in ((0, ValueError), (-2, ValueError), (2.0, TypeError)):
        with pytest.raises(err, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    assert_all_free(llm)


# ------------------------------------------------------------------ bad_words, detokenize
def test_bad_words_are_never_completed():
    """vLLM's bad_words: a one-token word never appears; a two-token word is cut at its
    second token (its first may still appear). Greedy output equals the unrestricted one
    up to where the word would have been completed; overlap on / off and n-gram
    speculation (such rows are drafted for: each verification position bans what plain
    decoding would ban after the drafts before it) give the same tokens."""
    from minikernels.engine.bad_words import banned_next_tokens

    prompt = "The quick brown fox"
    greedy = dict(temperature=0, max_tokens=20, ignore_eos=True)
    seen: dict[str, list[int]] = {}
    drafted = 0
    for kw in ({"async_scheduling": True}, {"async_scheduling": False},
               {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                       "prompt_lookup_min": 1}},
               # the target drafting for itself: it drafts the banned token, which is cut,
               # and the target's own token there must be drawn with the word banned
               {"speculative_config": {"method": "draft_model", "model": "tiny",
                                       "num_speculative_tokens": 3}}):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8, **kw)
        tok = llm.get_tokenizer()
        base = llm.generate([prompt], SamplingParams(**greedy), use_tqdm=False)[0]
        ids = base.outputs[0].token_ids
        # a printable one-byte token, and a pair of printable ones, from the output
        one = next(i for i, t in enumerate(ids) if 33 <= t < 127)
        pair = next(i for i in range(len(ids) - 1, 0, -1)
                    if 33 <= ids[i] < 127 and 33 <= ids[i - 1] < 127 and
                    ids[i] not in ids[:i - 1] and i > one)
        words = [chr(ids[one]), chr(ids[pair - 1]) + chr(ids[pair])]
        for word, cut in zip(words, (one, pair)):
            res = llm.generate([prompt], SamplingParams(bad_words=[word], **greedy),
                               use_tqdm=False)[0]
            out = res.outputs[0].token_ids
            assert seen.setdefault(word, out) == out, (word, kw)
            drafted += res.metrics["spec_num_draft_tokens"]
            assert out[:cut] == ids[:cut] and out[cut] != ids[cut], (word, kw)
            bad = tok.encode(word, add_special_tokens=False)
            assert all(out[j:j + len(bad)] != bad for j in range(len(out))), word
            assert not any(banned_next_tokens([bad], out[:j]) and out[j] == bad[-1]
                           for j in range(len(out)))
        assert_all_free(llm)
    assert drafted > 0          # the bad-words rows were drafted for


def test_draft_bad_words_bans_per_position():
    """A draft that would complete a bad word is cut there; position j bans what would
    complete a word after the first j drafts."""
    from minikernels.engine.llm_engine import _draft_bad_words

    bad = [[5], [7, 8]]
    assert _draft_bad_words(bad, [1, 2], [7, 3, 4]) == ([7, 3, 4], [[5], [5, 8], [5], [5]])
    assert _draft_bad_words(bad, [1, 7], [8, 3]) == ([], [[5, 8]])
    assert _draft_bad_words(bad, [], [3, 7, 8, 9]) == ([3, 7], [[5], [5], [5, 8]])


def test_bad_words_tokenization_and_checks():
    from minikernels.engine.bad_words import banned_next_tokens, tokenize_bad_words

    class SpaceTok:      # "x" -> [1], " x" -> [2] (a word-start token), "xy" -> [1, 3]
        def encode(self, text, add_special_tokens=True):
            table = {"x": [1], " x": [2], "xy": [1, 3], " xy": [2, 3], "z": [4], " z": [5, 4]}
            return table[text]

    assert tokenize_bad_words(["x", " xy", "z"], SpaceTok(), 10) == [[1], [2], [1, 3],
                                                                   [2, 3], [4]]
    with pytest.raises(ValueError, match="bad_words"):
        tokenize_bad_words(["x"], SpaceTok(), 2)
    with pytest.raises(ValueError, match="bad_words"):
        tokenize_bad_words(["x"], None, 10)
    assert banned_next_tokens([[4], [1, 3], [7, 8, 9]], []) == [4]
    assert banned_next_tokens([[4], [1, 3], [7, 8, 9]], [5, 1]) == [4, 3]
    assert banned_next_tokens([[7, 8, 9]], [7, 8]) == [9]
    assert banned_next_tokens([[7, 8, 9]], [8, 7, 8, 1]) == []
    for bad, err in (("x", TypeError), ([1], TypeError), ([" "], ValueError)):
        with pytest.raises(err, match="bad_words"):
            SamplingParams(bad_words=bad)
    llm = LLM("tiny", dtype="float32", device="cpu", tokenizer=None)
    with pytest.raises(ValueError, match="bad_words"):
        llm.generate([[5, 6, 7]], SamplingParams(bad_words=["x"]), use_tqdm=False)
    assert_all_free(llm)


def test_detokenize_false_returns_ids_only():
    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8)
    kw = dict(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    on = llm.generate(["hello there"], SamplingParams(**kw), use_tqdm=False)[0]
    off = llm.generate(["hello there"], SamplingParams(detokenize=False, **kw),
                       use_tqdm=False)[0]
    assert off.outputs[0].token_ids == on.outputs[0].token_ids and on.outputs[0].text
    assert off.outputs[0].text == ""
    assert all(lp.decoded_token is None for d in off.outputs[0].logprobs for lp in d.values())
    assert all(lp.decoded_token is None for d in off.prompt_logprobs[1:] for lp in d.values())
    assert any(lp.decoded_token for d in on.outputs[0].logprobs for lp in d.values())
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(detokenize=False, stop=["x"])
    with pytest.raises(TypeError, match="detokenize"):
        SamplingParams(detokenize=0)
    with pytest.raises(TypeError, match="spaces_between_special_tokens"):
        SamplingParams(spaces_between_special_tokens=None)
    assert_all_free(llm)


def test_vllm_prompt_dicts():
    """vLLM's TextPrompt / TokensPrompt dicts work wherever prompts do (generate, beam
    search), alone or in a list; unknown keys are refused by name."""
    from minikernels.engine import BeamSearchParams

    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    plain = llm.generate([[5, 6, 7], "hi there"], sp, use_tqdm=False)
    dicts = llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt": "hi there"}], sp,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    one = llm.generate({"prompt_token_ids": [5, 6, 7]}, sp, use_tqdm=False)
    assert one[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    beams = llm.beam_search([{"prompt": "hi there"}], BeamSearchParams(beam_width=2,
                                                                       max_tokens=2))
    assert beams[0].sequences[0].tokens[:-2] == plain[1].prompt_token_ids
    for bad in ({"prompt": "x", "multi_modal_data": {}}, {}):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate(bad, sp, use_tqdm=False)
    assert_all_free(llm)


def test_generate_priority_argument():
    """LLM.generate(priority=[...]) (vLLM's argument) orders admission like
    SamplingParams.priority; a wrong length is refused."""
    llm = LLM("tiny", dtype="float32", device="cpu", max_num_seqs=1, num_kv_blocks=64,
              block_size=8)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [8, 9], [10, 11]], sp, use_tqdm=False,
                        priority=[2, 0, 1])
    order = sorted(range(3), key=lambda i: outs[i].metrics["first_token_time"])
    assert order == [1, 2, 0]
    with pytest.raises(ValueError, match="priority"):
        llm.generate([[5, 6, 7]], sp, use_tqdm=False, priority=[1, 2])
    assert_all_free(llm)


def test_public_names_at_the_top_level():
    """The contract's names resolve from ``import minikernels as mk`` (vLLM's spelling
    where vLLM has one)."""
    import minikernels as mk

    p = mk.SamplingParams(structured_outputs=mk.StructuredOutputsParams(choice=["a", "b"]),
                          truncate_prompt_tokens=4, output_kind=mk.RequestOutputKind.DELTA)
    assert p.structured_outputs.choice == ["a", "b"]
    for name in ("LLM", "AsyncLLM", "RequestOutput", "CompletionOutput", "LoRARequest",
                 "BeamSearchParams", "StructuredOutputsParams"):
        assert getattr(mk, name) is getattr(mk.engine, name), name


def test_start_and_stop_profile(tmp_path):
    """LLM.start_profile / stop_profile (vLLM's): a torch.profiler trace of the engine's
    work, minikernels' ops in it, written under the given directory."""
    import json

    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=32, block_size=8)
    with pytest.raises(RuntimeError, match="start_profile"):
        llm.stop_profile()
    llm.start_profile(str(tmp_path))
    with pytest.raises(RuntimeError, match="already running"):
        llm.start_profile(str(tmp_path))
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    path = llm.stop_profile()
    assert path.startswith(str(tmp_path))
    names = {e.get("name") or "" for e in json.load(open(path))["traceEvents"]}
    assert any(n.startswith("minikernels::") for n in names)
    assert_all_free(llm)
