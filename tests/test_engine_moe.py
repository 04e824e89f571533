"""A mixture-of-experts model through the engine (the built-in tiny-qwen3-moe: random
weights, layer 0 eight experts top-2, layer 1 dense), dense and RTN int4 (int4 experts):
greedy tokens equal the plain paged loop and prompt logprobs the cache-less forward,
through chunked prefill, prefix hits, overlap scheduling on and off and n-gram
speculation; seeded sampling equal across schedules. The int4 built-in is the dense
built-in of the same seed quantized."""
from __future__ import annotations

import pytest
import torch
from test_model_support import random_tokens

from minikernels.engine import LLM, SamplingParams
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.generate import generate_tokens
from minikernels.quant import quantize_int4

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[256] + random_tokens(n, 256, n) for n in (5, 19, 30)]


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_engine_equals_the_plain_loop(quantization):
    model = load_model("tiny-qwen3-moe", dtype="float32", device="cpu",
                       quantization=quantization)
    assert model.layers[0].mlp.experts.is_int4 == (quantization == "int4")
    ref = generate_tokens(model, PROMPTS, max_new_tokens=10, block_size=8)
    shared = [PROMPTS[2][:17] + p[1:] for p in PROMPTS]          # a 17-token shared prefix
    ref_shared = generate_tokens(model, shared, max_new_tokens=10, block_size=8)
    # every prompt token's logprob (chunked, paged prefill through the experts) against
    # the cache-less forward; seeded sampling (diverse tokens) equal across schedules
    want_lp = [torch.log_softmax(model(torch.tensor(p), AttentionMetadata.for_prompts(
        [len(p)]), None), -1)[torch.arange(len(p) - 1), torch.tensor(p[1:])] for p in PROMPTS]
    sampled = None
    for kw in (dict(async_scheduling=True), dict(async_scheduling=False),
               dict(max_num_batched_tokens=16),
               dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3})):
        llm = LLM("tiny-qwen3-moe", dtype="float32", device="cpu", num_kv_blocks=64,
                  block_size=8, quantization=quantization, **kw)
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref, kw
        outs = llm.generate(shared, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref_shared, kw
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0),
                            use_tqdm=False)
        for o, p, want in zip(outs, PROMPTS, want_lp):
            got = torch.tensor([lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], p[1:])])
            assert torch.allclose(got, want, atol=1e-4), kw
        if "speculative_config" not in kw:
            outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=7, max_tokens=10,
                                                        ignore_eos=True), use_tqdm=False)
            toks = [o.outputs[0].token_ids for o in outs]
            assert sampled is None or toks == sampled, kw
            sampled = toks
        llm.llm_engine.check_no_leaks()
    assert len({t for row in sampled for t in row}) >= 8      # not a degenerate repeat


def test_int4_builtin_is_the_dense_builtin_quantized():
    dense = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3)
    q = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3,
                   quantization="int4", group_size=32)
    ex, ref = q.layers[0].mlp.experts, dense.layers[0].mlp.experts
    w13, w2 = ex.dequantized()
    assert ex.group_size == 32
    for e in range(ex.num_experts):
        assert torch.equal(w13[e], quantize_int4(ref.w13[e], 32).dequantize())
        assert torch.equal(w2[e], quantize_int4(ref.w2[e], 32).dequantize())
