"""Beam search (``LLM.beam_search``, vLLM's API) against a reference written here that runs
the model directly (cache-less forwards, no engine): same tokens, same cumulative
logprobs, through the batched engine and its prefix cache; beam width 1 is greedy;
finished beams (EOS) compete by vLLM's length-normalized score."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.engine import LLM, BeamSearchParams, SamplingParams
from minikernels.models import AttentionMetadata, load_model


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=256, block_size=8)


@torch.no_grad()
def reference(model, prompt: list[int], width: int, max_tokens: int, eos: set[int],
              length_penalty: float) -> list[tuple[list[int], float]]:
    """Beam search by hand: (all tokens, cum logprob) of the best ``width`` beams."""
    def next_logprobs(tokens: list[int]) -> torch.Tensor:
        meta = AttentionMetadata.for_prompts([len(tokens)], last_only=True)
        return torch.log_softmax(model(torch.tensor(tokens), meta, None)[0], dim=-1)

    live = [(list(prompt), 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        cands = []
        for tokens, cum in live:
            lp = next_logprobs(tokens)
            top = torch.topk(lp, 2 * width)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                item = (tokens + [token], cum + value)
                (finished if token in eos else cands).append(item)
        cands.sort(key=lambda x: x[1], reverse=True)
        live = cands[:width]

    def score(item: tuple[list[int], float]) -> float:
        tokens, cum = item
        n = len(tokens) - (1 if tokens[-1] in eos else 0)
        return cum / n ** length_penalty

    return sorted(finished + live, key=score, reverse=True)[:width]


@pytest.mark.parametrize("width,length_penalty", [(1, 1.0), (3, 1.0), (4, 0.0)])
def test_matches_the_reference(llm, width, length_penalty):
    model = load_model("tiny", dtype="float32", device="cpu")
    prompts = [[256, 72, 105], [256] + list(b"beam search")]
    # a common token as "EOS" makes beams finish and compete with the live ones
    probe = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3,
                                                      ignore_eos=True), use_tqdm=False)
    eos = {probe[0].outputs[0].token_ids[1]}
    saved = llm.llm_engine.eos_token_ids
    llm.llm_engine.eos_token_ids = eos
    try:
        params = BeamSearchParams(beam_width=width, max_tokens=5,
                                  length_penalty=length_penalty)
        outs = llm.beam_search(prompts, params)
    finally:
        llm.llm_engine.eos_token_ids = saved
    for prompt, out in zip(prompts, outs):
        want = reference(model, prompt, width, 5, eos, length_penalty)
        assert len(out.sequences) == len(want) == width
        for seq, (tokens, cum) in zip(out.sequences, want):
            assert seq.tokens == tokens
            assert abs(seq.cum_logprob - cum) <= 1e-4
            assert abs(sum(seq.logprobs) - seq.cum_logprob) <= 1e-4
            assert seq.tokens[:len(prompt)] == prompt
            assert seq.finish_reason == ("stop" if tokens[-1] in eos else "length")
            assert seq.text == llm.tokenizer.decode(seq.output_tokens)
    # the KV blocks of every step's requests are all freed
    assert llm.llm_engine.block_manager.num_free_blocks == \
        llm.llm_engine.block_manager.num_blocks


def test_width_one_is_greedy_and_params_are_checked(llm):
    prompt = [256] + list(b"hello")
    [out] = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=6,
                                                       ignore_eos=True))
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                   ignore_eos=True), use_tqdm=False)
    assert out.sequences[0].output_tokens == greedy[0].outputs[0].token_ids
    assert mk.BeamSearchParams is BeamSearchParams
    for kw in (dict(beam_width=0, max_tokens=1), dict(beam_width=2, max_tokens=0),
               dict(beam_width=True, max_tokens=1),
               dict(beam_width=2, max_tokens=1, length_penalty=float("nan"))):
        with pytest.raises(ValueError, match="BeamSearchParams"):
            BeamSearchParams(**kw)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([prompt], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=10 ** 6))
