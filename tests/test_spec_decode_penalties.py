"""Speculative decoding of rows with penalties, min_tokens and logprobs (n-gram and draft
model): verification position j uses the distribution plain decoding would (penalty
counts over the prompt / outputs *and the drafts before j*, EOS / stop ids masked while
the output is below min_tokens), so greedy outputs are token-identical with and without
speculation in mixed batches, logprobs match (raw target logits, same ranks and top
ids, values within fp32 tolerance), temperature > 0 with penalties follows the exact
plain-decoding distribution (chi-square over an enumerable joint), and seeded sampling
reproduces. CPU, tiny models (as test_engine.py)."""
from __future__ import annotations

import random

import pytest
import torch
from test_engine import assert_all_free, tokens
from test_spec_decode import assert_logprobs_close, save_target_and_near
from test_spec_decode_draft import _chi_square_p, _save_llama

from minikernels.engine import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 4}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """target: test_engine's llama (V = 300); near: the target with noisy weights."""
    root = tmp_path_factory.mktemp("spec_pen")
    save_target_and_near(root)
    return {k: str(root / k) for k in ("target", "near")}


def make(path, spec=None, **kw):
    kw.setdefault("block_size", 8)
    return LLM(path, dtype="float32", device="cpu", tokenizer=None, speculative_config=spec,
               **kw)


def draft(model: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k}


def prompts_of(n: int, seed: int = 0) -> list[list[int]]:
    """Half repeat a short phrase (n-gram drafts), half random."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append([r.randrange(3, 300) for _ in range(r.randrange(2, 30))])
        else:
            phrase = [r.randrange(3, 300) for _ in range(r.randrange(2, 6))]
            out.append((phrase * 8)[:r.randrange(8, 40)])
    return out


def mixed_params(ref: list[list[int]]) -> list[SamplingParams]:
    """Penalties of each kind (strong: they change the argmax), min_tokens over stop ids
    the unconstrained output emits early, logprobs, and plain rows."""
    def sp(**kw):
        kw.setdefault("temperature", 0.0)
        kw.setdefault("max_tokens", 20)
        kw.setdefault("ignore_eos", True)
        return SamplingParams(**kw)
    return [
        sp(repetition_penalty=1.8),
        sp(presence_penalty=1.5),
        sp(frequency_penalty=2.0, logprobs=3),
        sp(),
        sp(min_tokens=8, stop_token_ids=[ref[4][1], ref[4][3]]),
        sp(min_tokens=6, stop_token_ids=[ref[5][2]], frequency_penalty=0.7,
           repetition_penalty=1.3, logprobs=0),
        sp(logprobs=2),
        sp(repetition_penalty=0.7, presence_penalty=-0.5, max_tokens=12),
        sp(min_tokens=5, ignore_eos=False, max_tokens=16),                 # EOS (id 2)
        sp(frequency_penalty=1.0, logprobs=1, max_tokens=9),
    ]


@pytest.mark.parametrize("method", ["ngram", "near", "self"])
def test_greedy_penalties_min_tokens_logprobs_identical(paths, method):
    """method "self": the target drafts for itself, so every draft the draft's own
    (penalized) argmax proposes is the target's: only per-position counts that include
    the drafts before each position keep the output identical."""
    prompts = prompts_of(10, seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = tokens(make(paths["target"]).generate(prompts, greedy, use_tqdm=False))
    params = mixed_params(ref)
    spec = NGRAM if method == "ngram" else draft(paths["target" if method == "self"
                                                       else "near"])
    for async_scheduling in (False, True):
        want = make(paths["target"], async_scheduling=async_scheduling).generate(
            prompts, params, use_tqdm=False)
        llm = make(paths["target"], spec, async_scheduling=async_scheduling)
        got = llm.generate(prompts, params, use_tqdm=False)
        assert tokens(got) == tokens(want)
        for g, w, p in zip(got, want, params):
            go, wo = g.outputs[0], w.outputs[0]
            assert (go.finish_reason, go.stop_reason) == (wo.finish_reason, wo.stop_reason)
            if p.logprobs is None:
                assert go.logprobs is None
            else:
                assert_logprobs_close(go.logprobs, wo.logprobs)
                assert len(go.logprobs) == len(go.token_ids)
                assert abs(go.cumulative_logprob - wo.cumulative_logprob) < 1e-3
        # the penalties / min_tokens changed the output (the test has power) ...
        assert tokens(want)[0] != ref[0] and tokens(want)[2] != ref[2]
        assert tokens(want)[4][:8] != ref[4][:8]
        # ... and those rows were drafted for, with drafts accepted
        m = [o.metrics for o in got]
        pen = [m[i] for i in (0, 1, 2, 4, 5, 9)]
        # (n-gram: a penalized output avoids repeating itself, so fewer suffixes match)
        assert sum(x["spec_num_draft_tokens"] > 0 for x in pen) >= (2 if method == "ngram"
                                                                    else 6)
        assert sum(x["spec_num_accepted_tokens"] for x in pen) > 0
        if method == "self":    # the target itself: every draft accepted
            st = llm.stats()
            assert st["spec_num_accepted_tokens"] == st["spec_num_draft_tokens"]
        assert_all_free(llm)


@pytest.mark.parametrize("method", ["ngram", "near"])
def test_seeded_sampling_with_penalties_reproducible(paths, method):
    prompts = prompts_of(4, seed=5)
    params = [SamplingParams(temperature=0.9, seed=11 + i, max_tokens=14, ignore_eos=True,
                             repetition_penalty=1.3, frequency_penalty=0.4, min_tokens=4,
                             top_k=50, logprobs=2) for i in range(4)]
    spec = NGRAM if method == "ngram" else draft(paths["near"])
    runs = []
    for batch in (prompts, prompts[1:]):      # seeded rows do not depend on the batch
        llm = make(paths["target"], spec)
        runs.append(llm.generate(batch, params[-len(batch):], use_tqdm=False))
        assert llm.stats()["spec_num_draft_tokens"] > 0
        assert_all_free(llm)
    again = make(paths["target"], spec).generate(prompts, params, use_tqdm=False)
    assert tokens(again) == tokens(runs[0])
    assert tokens(runs[1]) == tokens(runs[0])[1:]
    for a, b in zip(again, runs[0]):
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


# ---------------------------------------------------------------- statistics
def test_sampled_output_with_penalties_follows_plain_decoding(tmp_path):
    """Small vocabulary; many samples of 3 tokens after a fixed prompt with repetition,
    presence and frequency penalties, min_tokens over a stop id, temperature and top-k.
    Tokens 2 and 3 come from verification (position 0, below min_tokens; position 1, with
    the draft before it counted; max_tokens leaves room for one draft); their joint must be plain decoding's (enumerated
    exactly), for a disagreeing draft model and n-gram drafts."""
    V, T, TOPK, REP, PRES, FREQ, STOP, MIN = 12, 0.9, 9, 1.6, 0.4, 0.8, 4, 2
    target = _save_llama(tmp_path / "t", V, 1, 32, seed=11, scale=0.25)
    _save_llama(tmp_path / "d", V, 1, 32, seed=12, scale=0.25)
    prompt = [3, 5, 7, 3, 5, 9, 0, 1, 2, 4, 6, 8, 10, 11, 3]   # every id: n-gram drafts

    @torch.no_grad()
    def dist(out: list[int], penal: bool = True):
        logits = target(torch.tensor([prompt + out])).logits[0, -1].double()
        if penal:
            counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=V
                                    ).double() if out else torch.zeros(V, dtype=torch.float64)
            seen = counts > 0
            seen[prompt] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / REP, logits * REP),
                                 logits)
            logits = logits - FREQ * counts - PRES * (counts > 0).double()
            if len(out) < MIN:
                logits[STOP] = float("-inf")
        logits = logits / T
        kth = torch.topk(logits, TOPK).values[-1]
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), 0)

    def joint23(penal: bool):
        out = torch.zeros(V, V, dtype=torch.float64)
        p1 = dist([], penal)
        for a in range(V):
            if p1[a] == 0:
                continue
            p2 = dist([a], penal)
            for b in range(V):
                if p2[b] > 0:
                    out[b] += p1[a] * p2[b] * dist([a, b], penal)
        return out

    want, unpenalized = joint23(True).reshape(-1), joint23(False).reshape(-1)
    N = 3000
    params = SamplingParams(n=N, temperature=T, top_k=TOPK, max_tokens=3, ignore_eos=True,
                            repetition_penalty=REP, presence_penalty=PRES,
                            frequency_penalty=FREQ, min_tokens=MIN, stop_token_ids=[STOP])
    for spec in (draft(str(tmp_path / "d"), k=2), dict(NGRAM, num_speculative_tokens=2)):
        spec["disable_by_batch_size"] = N
        llm = LLM(str(tmp_path / "t"), dtype="float32", device="cpu", tokenizer=None,
                  block_size=16, num_kv_blocks=N + 64, max_num_seqs=N,
                  max_num_batched_tokens=4 * N, speculative_config=spec)
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        st = llm.stats()
        assert st["spec_num_draft_tokens"] >= N // 2, spec["method"]
        low = 0.1 if spec["method"] == "draft_model" else 0.005   # n-gram: p(x) is small
        assert low * st["spec_num_draft_tokens"] < st["spec_num_accepted_tokens"] < \
            0.95 * st["spec_num_draft_tokens"], spec["method"]
        counts = torch.zeros(V * V, dtype=torch.float64)
        for c in out.outputs:
            assert len(c.token_ids) == 3      # STOP is masked before token 3
            counts[c.token_ids[1] * V + c.token_ids[2]] += 1
        cv = counts.view(V, V)
        assert cv[STOP].sum() == 0 and cv[:, STOP].sum() > 0.01 * N   # min_tokens boundary
        assert _chi_square_p(counts, want) > 1e-4, spec["method"]
        assert _chi_square_p(counts, unpenalized) < 1e-6      # the test has power
        assert_all_free(llm)
