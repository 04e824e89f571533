"""Speculative decoding with a draft model (engine/draft_model.py) in the engine.

Greedy outputs token-identical with and without speculation over many prompts (a draft
close to the target, an unrelated small draft, the target itself as draft: every draft
accepted; dense and int4 targets; overlap; preemption with a tiny pool; chunked prefill;
prefix caching; mixed batches with rows that cannot draft), stops land exactly as without
speculation (EOS, stop ids, stop strings, max_tokens, min_tokens), seeded sampling
reproduces run to run, aborts, the shared KV budget, config validation, and a chi-square
test that temperature > 0 output follows the target distribution. Every test leaves both
KV pools (target and draft) fully free. CPU, tiny models (as test_engine.py).
"""
from __future__ import annotations

import random

import pytest
import torch
from test_engine import assert_all_free, tokens
from test_model_support import randomize_
from test_spec_decode import bench_module, mixed_stop_params, save_target_and_near

from minikernels.engine import LLM, SamplingParams
from minikernels.engine.spec_decode import SpeculativeConfig


def _save_llama(path, vocab: int, layers: int, hidden: int, seed: int, scale: float,
                heads: int = 4, kv_heads: int = 2) -> torch.nn.Module:
    """A small random transformers Llama (weights N(0, scale), norms around 1)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = randomize_(transformers.LlamaForCausalLM(cfg).float().eval(), seed + 1, scale)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """target (test_engine's llama, V = 300); near: the target with noisy weights (most
    drafts accepted, some not); small: an unrelated 1-layer llama (V = 300: mostly
    rejected)."""
    root = tmp_path_factory.mktemp("spec_draft")
    save_target_and_near(root)
    _save_llama(root / "small", 300, 1, 32, seed=3, scale=0.1, heads=2, kv_heads=1)
    return {k: str(root / k) for k in ("target", "near", "small")}


def spec(model: str, k: int = 3, **kw) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k, **kw}


def make(path, spec_cfg=None, **kw):
    kw.setdefault("block_size", 8)
    return LLM(path, dtype="float32", device="cpu", tokenizer=None,
               speculative_config=spec_cfg, **kw)


def assert_both_free(llm: LLM) -> None:
    assert_all_free(llm)
    prop = llm.llm_engine.proposer
    if prop is not None and hasattr(prop, "bm"):
        assert prop.bm.num_free_blocks == prop.bm.num_blocks, "draft KV pool leaked"
        assert not prop.states


def prompts_of(n: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(3, 300) for _ in range(r.randrange(1, 40))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline(paths):
    prompts = prompts_of(10)
    return prompts, tokens(make(paths["target"]).generate(prompts, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("draft,kw", [
    ("near", {"async_scheduling": True}),
    ("small", {"async_scheduling": False}),
    ("near", {"num_kv_blocks": 9, "enable_prefix_caching": False}),     # preemption
    ("near", {"max_num_batched_tokens": 8, "max_num_seqs": 4}),         # chunked prefill
    ("target", {}),                                                      # all accepted
], ids=["near-overlap", "small", "near-preempt", "near-chunked", "self"])
def test_greedy_identical_with_draft_model(paths, baseline, draft, kw):
    prompts, want = baseline
    llm = make(paths["target"], spec(paths[draft]), **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(outs) == want
    st = llm.stats()
    assert st["spec_num_draft_tokens"] > 0
    if draft == "target":      # the target drafting for itself: every draft accepted
        assert st["spec_num_accepted_tokens"] == st["spec_num_draft_tokens"]
    elif draft == "near":
        assert 0 < st["spec_num_accepted_tokens"] < st["spec_num_draft_tokens"]
    if "num_kv_blocks" in kw:
        assert st["num_preemptions"] > 0
        assert llm.llm_engine.proposer.bm.num_blocks == 9
    m = [o.metrics for o in outs]
    assert sum(x["spec_num_draft_tokens"] for x in m) == st["spec_num_draft_tokens"]
    assert_both_free(llm)


def test_int4_target_and_auto_int4_draft(paths):
    prompts = prompts_of(6, seed=1)
    want = tokens(make(paths["target"], quantization="int4").generate(prompts, GREEDY,
                                                                      use_tqdm=False))
    # the same checkpoint as draft is quantized too ("auto"): identical -> all accepted
    llm = make(paths["target"], spec(paths["target"]), quantization="int4")
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
    st = llm.stats()
    assert st["spec_num_accepted_tokens"] == st["spec_num_draft_tokens"] > 0
    assert llm.llm_engine.proposer.runner.model.quantization == "int4"
    assert_both_free(llm)
    llm = make(paths["target"], spec(paths["near"], quantization=None), quantization="int4")
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
    assert llm.llm_engine.proposer.runner.model.quantization is None
    assert_both_free(llm)


def test_prefix_cache_hits_with_draft_model(paths):
    """The draft pool's prefix cache: sequences sharing a prefix (and a rerun) reuse the
    draft's K/V of it, so the draft computes fewer tokens; the target drafting for
    itself still gets every draft accepted (a wrong cached block would cost some); a
    cache salt keeps requests apart in both pools; sleep forgets the draft's cache."""
    base = prompts_of(1, seed=4)[0] * 2
    prompts = [base + [5, 6, 7], base + [9], base]
    want = tokens(make(paths["target"]).generate(prompts, GREEDY, use_tqdm=False))
    for draft in ("near", "target"):
        llm = make(paths["target"], spec(paths[draft]))
        prop = llm.llm_engine.proposer
        assert tokens(llm.generate(prompts[:1], GREEDY, use_tqdm=False)) == want[:1]
        first = prop.num_catch_up_tokens
        assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
        again = prop.num_catch_up_tokens - first
        assert llm.stats()["prefix_cache_hit_tokens"] > 0
        assert prop.bm.num_hit_tokens >= 3 * (len(base) // 8) * 8 - 8
        prop.check_invariants()
        assert_both_free(llm)
        st = llm.stats()
        if draft == "target":
            assert st["spec_num_accepted_tokens"] == st["spec_num_draft_tokens"] > 0
    off = make(paths["target"], spec(paths["near"]), enable_prefix_caching=False)
    assert tokens(off.generate(prompts, GREEDY, use_tqdm=False)) == want
    assert off.llm_engine.proposer.bm.num_hit_tokens == 0
    # the three prompts again: cached draft blocks cover all but each one's last block
    assert again < off.llm_engine.proposer.num_catch_up_tokens - 2 * len(base) + 16
    # salts: no hit across them, in either pool
    salted = [SamplingParams(temperature=0.0, max_tokens=4, cache_salt=s) for s in "ab"]
    hits = prop.bm.num_hit_tokens
    llm.generate([base, base], salted, use_tqdm=False)
    assert prop.bm.num_hit_tokens == hits
    llm.llm_engine.sleep(1)
    llm.llm_engine.wake_up()
    assert not prop.bm.cached
    assert_both_free(llm)


def test_mixed_batch_and_stops_land_exactly(paths):
    """Rows with penalties and logprobs and a sampled row next to plain greedy ones (all
    draft); stop ids, max_tokens, min_tokens and EOS stop at the same token."""
    prompts = prompts_of(10, seed=2)
    ref = tokens(make(paths["target"]).generate(prompts, GREEDY, use_tqdm=False))
    params = mixed_stop_params(ref) + [
        SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)]
    greedy_rows = list(range(9))
    for async_scheduling in (True, False):
        want = make(paths["target"], async_scheduling=async_scheduling).generate(
            prompts, params, use_tqdm=False)
        llm = make(paths["target"], spec(paths["near"]), async_scheduling=async_scheduling)
        got = llm.generate(prompts, params, use_tqdm=False)
        for i in greedy_rows:
            assert got[i].outputs[0].token_ids == want[i].outputs[0].token_ids, i
            assert got[i].outputs[0].finish_reason == want[i].outputs[0].finish_reason
            assert got[i].outputs[0].stop_reason == want[i].outputs[0].stop_reason
        for g, w in zip(got[3].outputs[0].logprobs, want[3].outputs[0].logprobs):
            assert list(g) == list(w)     # same tokens and ranks; values up to batch shape
            assert all(g[t].rank == w[t].rank and abs(g[t].logprob - w[t].logprob) < 1e-4
                       for t in g)
        assert got[2].metrics["spec_num_draft_tokens"] > 0      # penalties: drafted
        assert got[3].metrics["spec_num_draft_tokens"] > 0      # logprobs: drafted
        assert got[9].metrics["spec_num_draft_tokens"] > 0
        assert len(got[9].outputs[0].token_ids) == 12
        assert llm.stats()["spec_num_accepted_tokens"] > 0
        assert_both_free(llm)


def test_stop_strings_land_exactly_builtin_models():
    """Built-in names as target and draft ("tiny" and "tiny-qwen3": same byte vocab)."""
    prompts = ["abcabcabcabc", "hello hello hello hello", "xyz"]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=128)
    tok = plain.get_tokenizer()
    stops = []
    for o in plain.generate(prompts, sp, use_tqdm=False):   # text around token 12
        ids = o.outputs[0].token_ids
        s = tok.decode(ids[12:14], skip_special_tokens=False)[:4]
        if s and s not in tok.decode(ids[:6], skip_special_tokens=False):
            stops.append(s)
    assert stops
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stops)
    want = plain.generate(prompts, sp, use_tqdm=False)
    for draft in ("tiny-qwen3", "tiny"):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=128,
                  speculative_config=spec(draft, k=4))
        got = llm.generate(prompts, sp, use_tqdm=False)
        assert [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].stop_reason)
                for o in got] == [(o.outputs[0].text, o.outputs[0].token_ids,
                                   o.outputs[0].stop_reason) for o in want]
        assert any(o.outputs[0].stop_reason in stops for o in got)
        assert llm.stats()["spec_num_draft_tokens"] > 0
        assert_both_free(llm)


def test_seeded_sampling_reproducible(paths):
    prompts = prompts_of(6, seed=3)
    sp = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=i,
                         max_tokens=20, ignore_eos=True) for i in range(6)]
    runs = []
    for _ in range(2):
        llm = make(paths["target"], spec(paths["near"]))
        runs.append(tokens(llm.generate(prompts, sp, use_tqdm=False)))
        st = llm.stats()
        assert 0 < st["spec_num_accepted_tokens"] < st["spec_num_draft_tokens"]
        assert_both_free(llm)
    assert runs[0] == runs[1]
    alone = tokens(make(paths["target"], spec(paths["near"])).generate(
        prompts[:1], sp[:1], use_tqdm=False))
    assert alone[0] == runs[0][0]      # independent of the rest of the batch
    llm = make(paths["target"], spec(paths["near"]))
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=16, n=2,
                                                ignore_eos=True), use_tqdm=False)
    assert all(len(c.token_ids) == 16 for o in outs for c in o.outputs)
    assert_both_free(llm)


def test_abort_and_preemption_free_both_pools(paths):
    llm = make(paths["target"], spec(paths["near"]), num_kv_blocks=12,
               enable_prefix_caching=False)
    eng = llm.llm_engine
    for i, p in enumerate(prompts_of(5, seed=5)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=40,
                                                   ignore_eos=True))
    for _ in range(40):
        eng.step()
        eng.check_no_leaks()
        if eng.spec_draft_tokens_total and eng.proposer.bm.num_free_blocks < 12:
            break
    assert eng.spec_draft_tokens_total > 0
    eng.abort_request("r0")
    eng.abort_request("r3")
    eng.check_no_leaks()
    while eng.has_unfinished():
        eng.step()
        eng.check_no_leaks()
    assert eng.scheduler.num_preemptions > 0
    assert_both_free(llm)


def test_kv_budget_is_shared(paths, monkeypatch):
    """Automatic sizing splits one budget: both pools get as many blocks, and the
    target's shrinks by its share of the bytes per token."""
    import minikernels.engine.model_runner as mr

    monkeypatch.setattr(mr, "CPU_KV_POOL_BYTES", 1 << 20)
    alone = make(paths["target"])
    both = make(paths["target"], spec(paths["small"]))
    tm = alone.llm_engine.runner.model
    dm = both.llm_engine.proposer.runner.model
    bt, bd = tm.kv_bytes_per_token(), dm.kv_bytes_per_token()
    assert alone.llm_engine.runner.num_blocks == (1 << 20) // (bt * 8)
    n = both.llm_engine.runner.num_blocks
    assert n == (1 << 20) // ((bt + bd) * 8) < alone.llm_engine.runner.num_blocks
    assert both.llm_engine.proposer.bm.num_blocks == n
    assert both.llm_engine.proposer.runner.num_blocks == n


def test_config_validation_and_vocab_check(paths, tmp_path):
    for bad, msg in (({"method": "draft_model"}, "model"),
                     ({"model": "tiny", "prompt_lookup_max": 3}, "prompt_lookup_max"),
                     ({"method": "ngram", "model": "tiny"}, "model"),
                     ({"model": "tiny", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                     ({"model": "tiny", "quantization": "fp4"}, "quantization"),
                     ({"model": "", "method": "draft_model"}, "model"),
                     ({"model": 3}, "model"),
                     ({"model": "tiny", "draft_tp": 1}, "draft_tp")):
        with pytest.raises(ValueError, match=msg):
            SpeculativeConfig.from_dict(bad)
    cfg = SpeculativeConfig.from_dict({"model": "tiny"})
    assert cfg.method == "draft_model" and cfg.quantization == "auto"
    _save_llama(tmp_path / "v301", 301, 1, 32, seed=0, scale=0.1)
    with pytest.raises(ValueError, match="speculative_config.model.*vocab"):
        make(paths["target"], spec(str(tmp_path / "v301")))
    with pytest.raises(ValueError, match="speculative_config.model.*vocab"):
        LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=16,
            speculative_config=spec("qwen2.5-0.5b"))


def test_serve_flag_passes_draft_model_config():
    import argparse

    from minikernels.server.cli import add_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["tiny", "--speculative-config",
                              ('{"method": "draft_model", "model": "tiny-qwen3", '
                               '"num_speculative_tokens": 3}')])
    kw = engine_kwargs(args)
    assert kw["speculative_config"] == spec("tiny-qwen3")
    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=32,
              speculative_config=kw["speculative_config"])
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    assert_both_free(llm)


# ---------------------------------------------------------------- statistics
def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value; bins expecting < 5 are merged into one."""
    from scipy.stats import chi2

    total = counts.sum().item()
    exp = probs.double() * total
    small = exp < 5
    c = torch.cat([counts.double()[~small], counts.double()[small].sum()[None]])
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    if e[-1] < 5:
        c, e = c[:-1], e[:-1]
    stat = (((c - e) ** 2) / e).sum().item()
    return float(chi2.sf(stat, len(e) - 1))


def test_sampled_output_follows_the_target_distribution(tmp_path):
    """Small vocabulary; many samples of 3 tokens after a fixed prompt, with a draft
    that disagrees often: tokens 2 and 3 come from verification (accepted drafts,
    recovered and bonus tokens); their joint distribution must be the target's (exact,
    by enumerating the target), not the draft's."""
    V, T, TOPK = 12, 0.9, 8
    target = _save_llama(tmp_path / "t", V, 1, 32, seed=11, scale=0.25)
    draft = _save_llama(tmp_path / "d", V, 1, 32, seed=12, scale=0.25)
    prompt = [3, 5, 7]

    @torch.no_grad()
    def dist(model, ctx):
        logits = model(torch.tensor([ctx])).logits[0, -1].double() / T
        kth = torch.topk(logits, TOPK).values[-1]
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), 0)

    def joint23(model):
        """P(t2, t3) over V x V, marginalized over t1."""
        out = torch.zeros(V, V, dtype=torch.float64)
        p1 = dist(model, prompt)
        for a in range(V):
            if p1[a] == 0:
                continue
            p2 = dist(model, prompt + [a])
            for b in range(V):
                if p2[b] > 0:
                    out[b] += p1[a] * p2[b] * dist(model, prompt + [a, b])
        return out

    want, draft_joint = joint23(target), joint23(draft)
    N = 4000
    llm = LLM(str(tmp_path / "t"), dtype="float32", device="cpu", tokenizer=None,
              block_size=16, num_kv_blocks=N + 64, max_num_seqs=N,
              max_num_batched_tokens=4 * N,
              speculative_config=spec(str(tmp_path / "d"), k=2, disable_by_batch_size=N))
    out = llm.generate(prompt, SamplingParams(n=N, temperature=T, top_k=TOPK, max_tokens=3,
                                              ignore_eos=True), use_tqdm=False)[0]
    st = llm.stats()
    assert st["spec_num_draft_tokens"] >= N // 2
    assert 0.2 * st["spec_num_draft_tokens"] < st["spec_num_accepted_tokens"] < \
        0.9 * st["spec_num_draft_tokens"]
    counts = torch.zeros(V * V, dtype=torch.float64)
    for c in out.outputs:
        counts[c.token_ids[1] * V + c.token_ids[2]] += 1
    assert _chi_square_p(counts, want.reshape(-1)) > 1e-4
    assert _chi_square_p(counts, draft_joint.reshape(-1)) < 1e-6   # the test has power
    assert_both_free(llm)


def test_benchmark_smoke_draft_rows():
    import argparse

    mod = bench_module()
    res = mod.run(argparse.Namespace(k=3, tokens=24, requests=1, draft_agreement=[1.0, 0.0]))
    for row in res.values():      # a draft that always agrees: k + 1 tokens per forward
        assert row["draft-1"]["accepted_tokens"] == row["draft-1"]["draft_tokens"] > 0
        assert row["reductions"]["draft-1"] >= 2.5
        assert row["draft-0"]["accepted_tokens"] == 0
        assert row["draft-0"]["forwards_per_token"] == pytest.approx(1.0)


def test_benchmark_timing_smoke(tmp_path):
    """bench_spec_decode.py --timing on the CPU: every row timed, speed-ups finite, the
    plan followed; the scripted forwards still run the whole model (lm_head included)."""
    import argparse
    import json
    import math

    from minikernels.models.loader import load_model
    from minikernels.models.metadata import AttentionMetadata

    mod = bench_module()
    # the scripted target computes the real logits (lm_head runs) before replacing them
    inner = load_model("tiny", dtype="float32", device="cpu")
    calls = []
    inner.lm_head.register_forward_hook(lambda *a: calls.append(1))
    wrapped = mod.GraphScripted(inner, 16, 2)
    seq = [5, 9, 7, 11, 13, 6]
    wrapped.set_scripts([seq])
    with torch.inference_mode():
        out = wrapped(torch.tensor(seq[:4]), AttentionMetadata.for_prompts([4]), None)
    assert calls and out.argmax(1).tolist() == seq[1:5]

    args = argparse.Namespace(
        device="cpu", target="tiny", k=3, tokens=8, prompt_len=24, batch_sizes=[1, 2],
        repeats=1, draft_layers=1, draft_hidden=32, draft_agreement=[1.0, 0.5],
        enforce_eager=False)
    rows, meta = mod.timing_run(args)
    paths = mod.write_timing(rows, meta, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert paths["md"].read_text().startswith("# Speculative decoding")
    assert "lm_head" in data["meta"]["logits"] and "target_check" in data["meta"]
    got = {(r["batch"], r["method"]) for r in data["rows"]}
    assert got == {(b, m) for b in (1, 2) for m in ("off", "ngram", "draft-1", "draft-0.5",
                                                    "eagle-1", "eagle-0.5")}
    assert "eagle_check" in data["meta"]
    for r in data["rows"]:
        assert math.isfinite(r["ms_per_token"]) and r["ms_per_token"] > 0
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert r["outputs_as_planned"] == 1.0
        if r["method"] == "off":
            assert r["speedup"] == 1.0 and r["mean_acceptance_length"] is None
        if r["method"] in ("draft-1", "eagle-1"):   # always agrees: all accepted
            assert r["acceptance_rate"] == 1.0 and r["mean_acceptance_length"] > 3
            assert 0 < r["draft_share"] < 1
