"""End-to-end engine tests on tiny transformers models (CPU, fp32, reference backend).

Checked: greedy outputs of many concurrent prompts equal transformers' greedy tokens;
preemption (tiny KV pool), chunked prefill and prefix caching leave outputs unchanged;
seeds reproduce sampling; stop conditions; bad inputs raise clear errors; every test
leaves every KV block free.
"""
from __future__ import annotations

import random

import pytest
import torch

import minikernels as mk
from minikernels.engine import LLM, RequestOutput, SamplingParams

VOCAB = 300
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LENGTHS = [1, 3, 7, 8, 9, 17, 30, 45]


def _make_hf(kind: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**common, rope_theta=1e6)
        cls = transformers.Qwen2ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # larger-than-default weights: peaked, tie-free logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def prompts_of(lengths, seed=0) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    model = _make_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(path))
    prompts = prompts_of(LENGTHS)
    expected = [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts]
    return str(path), prompts, expected


def make_llm(path: str, **kw) -> LLM:
    kw.setdefault("block_size", 8)
    return LLM(path, dtype="float32", device="cpu", tokenizer=None, **kw)


def assert_all_free(llm: LLM) -> None:
    eng = llm.llm_engine
    assert not eng.has_unfinished() and not eng.requests
    st = llm.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"] and st["kv_usage"] == 0.0
    eng.check_no_leaks()


def tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# ---------------------------------------------------------------- vs transformers
def test_concurrent_greedy_matches_transformers(hf_dir):
    path, prompts, expected = hf_dir
    llm = make_llm(path)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(outs) == expected
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert_all_free(llm)


def test_tiny_pool_preempts_and_outputs_do_not_change(hf_dir):
    path, prompts, expected = hf_dir
    llm = make_llm(path, num_kv_blocks=8, enable_prefix_caching=False)  # 64 slots
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats()["num_preemptions"] > 0
    assert tokens(outs) == expected
    assert_all_free(llm)


def test_chunked_prefill_equals_unchunked(hf_dir):
    path, prompts, expected = hf_dir
    llm = make_llm(path, max_num_batched_tokens=8, max_num_seqs=4)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(outs) == expected
    assert_all_free(llm)


def test_shared_prefix_hits_the_cache(hf_dir):
    path, _, _ = hf_dir
    base = prompts_of([40], seed=5)[0]
    prompts = [base + tail for tail in prompts_of([3, 5, 9, 1], seed=6)]
    results = {}
    for caching in (False, True):
        llm = make_llm(path, enable_prefix_caching=caching)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        # Again, after the first batch finished: cached blocks are reused from the free list.
        again = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        results[caching] = (tokens(outs), tokens(again), llm.stats())
        assert_all_free(llm)
    assert results[True][0] == results[False][0]
    assert results[True][1] == results[False][1] == results[True][0][:1]
    off, on = results[False][2], results[True][2]
    assert on["prefix_cache_hit_tokens"] >= 3 * 40 + 40 - 8
    assert on["computed_tokens_total"] < off["computed_tokens_total"] - 100
    assert max(o.num_cached_tokens for o in [*llm.generate(prompts[1:2], GREEDY,
                                                           use_tqdm=False)]) == 40


def test_outputs_in_prompt_order_with_per_prompt_params(hf_dir):
    path, prompts, expected = hf_dir
    llm = make_llm(path)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
              for k in range(1, len(prompts) + 1)]
    outs = llm.generate(prompts, params, use_tqdm=True)
    assert [o.outputs[0].token_ids for o in outs] == [e[:k] for e, k in
                                                       zip(expected, range(1, 11))]
    assert_all_free(llm)


# ---------------------------------------------------------------- built-in "tiny"
@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=256)


def test_text_prompt_and_text_output(tiny):
    out = tiny.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0]
    assert out.prompt == "Hello" and out.prompt_token_ids == tiny.tokenizer.encode("Hello")
    c = out.outputs[0]
    assert len(c.token_ids) == 8
    assert c.text == tiny.tokenizer.decode(c.token_ids)
    assert_all_free(tiny)


def test_mk_exports():
    assert mk.LLM is LLM and mk.SamplingParams is SamplingParams
    assert mk.RequestOutput is RequestOutput


def test_seeds_reproduce_sampling(tiny):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=12, ignore_eos=True)
    a = tiny.generate([[5, 6, 7]], p, use_tqdm=False)[0].outputs[0].token_ids
    # Same seed, different batch companions and order: same tokens.
    others = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * 3
    outs = tiny.generate([[1, 2], [5, 6, 7], [9] * 20, [3]], [others[0], p, *others[1:]],
                         use_tqdm=False)
    assert outs[1].outputs[0].token_ids == a
    b = tiny.generate([[5, 6, 7]], SamplingParams(temperature=0.9, top_p=0.95, seed=12,
                                                  max_tokens=12, ignore_eos=True),
                      use_tqdm=False)[0].outputs[0].token_ids
    assert a != b
    assert_all_free(tiny)


def test_stop_token_ids_and_stop_strings(tiny):
    prompt = [10, 20, 30]
    base = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                  ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    stop_id = ids[4]
    out = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                 ignore_eos=True, stop_token_ids=[stop_id]),
                        use_tqdm=False)[0].outputs[0]
    first = ids.index(stop_id)
    assert out.token_ids == ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # A stop string taken from the middle of the greedy text.
    tok = tiny.tokenizer
    text = base.outputs[0].text
    cut = next((i for i in range(2, len(text) - 2) if text[i:i + 2].isprintable()
                and "\ufffd" not in text[i:i + 2]), None)
    if cut is not None:
        stop = text[cut:cut + 2]
        out = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                     ignore_eos=True, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[:text.index(stop)]
        assert tok.decode(out.token_ids).startswith(out.text)
    assert_all_free(tiny)


def test_eos_stops_unless_ignored(tiny):
    eos = sorted(tiny.llm_engine.eos_token_ids)[0]
    # min_tokens masks EOS at first; force EOS by making it the only allowed stop token.
    out = tiny.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=30),
                        use_tqdm=False)[0].outputs[0]
    if eos in out.token_ids:
        assert out.token_ids[-1] == eos and out.finish_reason == "stop"
    else:
        assert len(out.token_ids) == 30 and out.finish_reason == "length"
    assert_all_free(tiny)


def test_n_samples_and_logprobs(tiny):
    p = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True,
                       logprobs=2)
    out = tiny.generate([[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]], p,
                        use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5
        for tok, step in zip(c.token_ids, c.logprobs):
            assert tok in step and step[tok].logprob <= 0.0
            assert len(step) <= 3
        assert abs(c.cumulative_logprob - sum(s[t].logprob for t, s in
                                              zip(c.token_ids, c.logprobs))) < 1e-4
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_all_free(tiny)


def test_bad_requests_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="max_model_len"):
        tiny.generate([[1] * 10], SamplingParams(max_tokens=tiny.max_model_len), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        tiny.generate([[]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        tiny.generate([[10**6]], SamplingParams(), use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        tiny.generate([[1]], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        tiny.generate([[1], [2]], [SamplingParams()] * 3, use_tqdm=False)
    with pytest.raises(TypeError, match="prompt"):
        tiny.generate([3.5], SamplingParams(), use_tqdm=False)
    assert_all_free(tiny)


def test_bad_engine_args():
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM("tiny", dtype="float32", device="cpu", max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=4, block_size=16,
            max_model_len=1000)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=0)
    with pytest.raises(TypeError, match="model"):
        LLM(42)


def test_seeded_sampling_survives_preemption(hf_dir):
    path, prompts, _ = hf_dir
    params = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=10, ignore_eos=True)
              for i in range(len(prompts))]
    big = make_llm(path)
    want = tokens(big.generate(prompts, params, use_tqdm=False))
    small = make_llm(path, num_kv_blocks=8, enable_prefix_caching=False)
    got = tokens(small.generate(prompts, params, use_tqdm=False))
    assert small.stats()["num_preemptions"] > 0
    assert got == want
    assert_all_free(big)
    assert_all_free(small)


def test_interrupted_step_leaves_no_unwritten_blocks_in_the_prefix_cache():
    # Blocks are offered to the prefix cache when scheduled, before the forward writes
    # their K/V. A forward that dies (Ctrl-C in a notebook) must not leave them cached:
    # the next generate with the same prefix would attend over garbage.
    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8)
    eng = llm.llm_engine
    prompt = list(range(10, 50))                       # 5 full blocks
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = llm.generate([prompt + [7]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    eng.block_manager.reset_prefix_cache()

    def dies_mid_forward(inputs, prev_tokens=None):
        for k_cache, v_cache in eng.runner.kv_caches:  # some layers' writes landed...
            k_cache.fill_(float("nan"))
            v_cache.fill_(float("nan"))
        raise KeyboardInterrupt                        # ... then the user hit Ctrl-C

    eng.runner.forward = dies_mid_forward
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt + [9]], greedy, use_tqdm=False)
    del eng.runner.forward                                 # back to the class method
    assert_all_free(llm)
    out = llm.generate([prompt + [7]], greedy, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert_all_free(llm)


def test_chat_renders_conversations_with_the_template(tiny):
    """LLM.chat: one conversation or several, each rendered by the tokenizer's template;
    the output equals generate() on the rendered ids and carries the rendered prompt."""
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    [one] = tiny.chat(convo, p, use_tqdm=False)
    ids = tiny.tokenizer.apply_chat_template(convo, add_generation_prompt=True)
    assert one.prompt_token_ids == ids
    assert one.outputs[0].token_ids == tiny.generate([ids], p, use_tqdm=False)[0] \
        .outputs[0].token_ids
    assert one.prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    two = tiny.chat([convo, [{"role": "user", "content": "Yo"}]], p, use_tqdm=False)
    assert [o.prompt_token_ids for o in two] == [
        ids, tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Yo"}])]
    # continue the assistant's own message instead of starting a new one
    partial = convo + [{"role": "assistant", "content": "Sure, "}]
    [cont] = tiny.chat(partial, p, use_tqdm=False, add_generation_prompt=False,
                       continue_final_message=True)
    assert cont.prompt.endswith("<|im_start|>assistant\nSure, ")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        tiny.chat(partial, p, continue_final_message=True)
    with pytest.raises(TypeError, match="conversation"):
        tiny.chat("Hi", p)
    with pytest.raises(ValueError, match="renders no tools"):
        tiny.chat(convo, p, tools=[{"type": "function", "function": {"name": "f"}}])
    assert_all_free(tiny)


def test_logit_bias_with_and_without_speculation(tiny):
    """logit_bias / allowed_token_ids give the same greedy tokens with n-gram speculation
    (the verifier's target distribution applies them per position) as without; a token id
    outside the vocabulary is refused before anything runs."""
    prompt = [256] + list(b"abcabcabcabc")
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                       logit_bias={ord("c"): -100.0, ord("z"): 3.0},
                       allowed_token_ids=list(range(97, 123)))
    plain = tiny.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids
    assert all(97 <= t < 123 and t != ord("c") for t in plain)
    spec = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    assert spec.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids == plain
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate([prompt], SamplingParams(logit_bias={512: 1.0}), use_tqdm=False)
    assert_all_free(tiny)
