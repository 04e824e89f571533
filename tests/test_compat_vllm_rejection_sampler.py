"""minikernels.compat.vllm_rejection_sampler: vLLM's tests/v1/sample/test_rejection_sampler.py
recipes in this file's words (greedy: perfect match, early / multiple mismatches, several
and empty sequences; parse_output; seeded requests reproducible; the first output token of
random requests distributed as the target, with a draft model's probabilities and with
n-gram point masses), compute_probs' temperature and top-k, errors."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.compat.vllm_rejection_sampler import (PLACEHOLDER_TOKEN_ID,
                                                       RejectionSampler, SamplingMetadata,
                                                       SpecDecodeMetadata, compute_probs,
                                                       expand_batch_to_tokens,
                                                       rejection_sample)

P = PLACEHOLDER_TOKEN_ID
GREEDY = -1.0            # vLLM's GREEDY_TEMPERATURE


def logits_for(output_token_ids: list[list[int]], vocab: int = 100) -> torch.Tensor:
    """Target logits whose argmax at each draft position is the wanted output token
    (vLLM's create_logits_tensor: the last token of each list is the bonus)."""
    rows = [t for tokens in output_token_ids for t in tokens[:-1]]
    logits = torch.full((len(rows), vocab), -100.0)
    logits[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 100.0
    return logits


def greedy(spec: list[list[int]], outputs: list[list[int]], backend="reference"):
    meta = SpecDecodeMetadata.make_dummy(spec, device="cpu")
    bonus = torch.tensor([o[-1] for o in outputs])
    with mk.use_backend(backend):
        return RejectionSampler()(meta, None, logits_for(outputs), bonus,
                                  SamplingMetadata(temperature=None, all_greedy=True,
                                                   all_random=False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("spec,outputs,want", [
    ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]]),                      # perfect match
    ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, P, P]]),                      # early mismatch
    ([[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, P]]),       # several sequences
    ([[1]], [[1, 2]], [[1, 2]]),                                        # one draft
    ([[]], [[5]], [[5]]),                                               # no drafts
    ([[1, 2, 3], [4, 5, 6]], [[1, 5, 6, 7], [4, 8, 6, 9]],
     [[1, 5, P, P], [4, 8, P, P]]),                                     # several mismatches
])
def test_greedy_cases(spec, outputs, want, backend):
    out = greedy(spec, outputs, backend)
    assert out.dtype == torch.int32 and torch.equal(out, torch.tensor(want, dtype=torch.int32))
    assert RejectionSampler.parse_output(out, 100) == [[t for t in row if t != P]
                                                       for row in want]


def _random_batch(b: int, vocab: int, gen: torch.Generator, with_draft_probs: bool):
    spec = [[int(torch.randint(vocab, (1,), generator=gen))] for _ in range(b)]
    target_logits = torch.randn(b, vocab, generator=gen)
    draft_probs = torch.softmax(torch.randn(b, vocab, generator=gen), -1) \
        if with_draft_probs else None
    bonus = torch.randint(vocab, (b,), generator=gen)
    return spec, target_logits, draft_probs, bonus


def test_seeded_requests_are_reproducible():
    gen = torch.Generator().manual_seed(0)
    spec, logits, dprobs, bonus = _random_batch(6, 16, gen, True)
    meta = SpecDecodeMetadata.make_dummy(spec, device="cpu")

    def run(seed_offset: int):
        torch.manual_seed(100 + seed_offset)      # the unseeded requests differ
        sm = SamplingMetadata(temperature=torch.full((6,), 0.8), all_greedy=False,
                              all_random=True,
                              generators={i: torch.Generator().manual_seed(i) for i in (0, 3)})
        return RejectionSampler()(meta, dprobs, logits, bonus, sm)

    a, b = run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_first_token_follows_the_target_distribution(with_draft_probs):
    """Many requests with the same target and (random) drafts: the first emitted token is
    distributed as the target softmax, whatever the draft distribution (exactness of
    rejection sampling); n-gram drafts (None) are point masses."""
    torch.manual_seed(0)
    n, vocab = 20000, 6
    target = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0, -3.0])
    want = torch.softmax(target, -1)
    draft_dist = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 0.0, -1.0, 0.5]), -1)
    drafts = torch.multinomial(draft_dist, n, replacement=True)
    meta = SpecDecodeMetadata.make_dummy([[int(t)] for t in drafts], device="cpu")
    dprobs = draft_dist.expand(n, -1).contiguous() if with_draft_probs else None
    sm = SamplingMetadata(temperature=torch.ones(n), all_greedy=False, all_random=True)
    out = RejectionSampler()(meta, dprobs, target.expand(n, -1).contiguous(),
                             torch.zeros(n, dtype=torch.long), sm)
    freq = torch.bincount(out[:, 0].long(), minlength=vocab).float() / n
    assert torch.allclose(freq, want, atol=0.015), (freq, want)


def test_compute_probs_and_mixed_batches():
    """Temperature per request (greedy rows -1 -> 1), top-k; a batch mixing greedy and
    random requests: greedy rows follow the argmax exactly."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    cu = torch.tensor([2, 3], dtype=torch.int32)
    sm = SamplingMetadata(temperature=torch.tensor([0.5, GREEDY]), all_greedy=False,
                          all_random=False, top_k=torch.tensor([2, 3]))
    probs = compute_probs(logits, cu, sm)
    want0 = torch.softmax(torch.tensor([4.0, 2.0, float("-inf")]), -1)
    assert torch.allclose(probs[0], want0) and torch.allclose(probs[2], torch.softmax(
        logits[2], -1))
    assert torch.equal(expand_batch_to_tokens(torch.tensor([5, -1]), cu, 3, -1, 1),
                       torch.tensor([5, 5, 1]))
    meta = SpecDecodeMetadata.make_dummy([[0, 1], [0]], device="cpu")
    out = RejectionSampler()(meta, None, logits, torch.tensor([7, 8]), sm)
    assert out[1].tolist() == [2, P, P]          # greedy: draft 0 != argmax 2


def test_errors_name_the_argument():
    meta = SpecDecodeMetadata.make_dummy([[1, 2]], device="cpu")
    sm = SamplingMetadata(temperature=None, all_greedy=True, all_random=False)
    probs = torch.randn(2, 10)
    with pytest.raises(ValueError, match="max_spec_len"):
        rejection_sample(meta.draft_token_ids, [2], 1, meta.cu_num_draft_tokens, None, probs,
                         torch.tensor([1]), sm)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        rejection_sample(meta.draft_token_ids, [2], 2, meta.cu_num_draft_tokens, None,
                         probs[:1], torch.tensor([1]), sm)
    with pytest.raises(ValueError, match="bonus_token_ids"):
        rejection_sample(meta.draft_token_ids, [2], 2, meta.cu_num_draft_tokens, None, probs,
                         torch.tensor([1, 2]), sm)
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sample(meta.draft_token_ids, [2], 2, meta.cu_num_draft_tokens,
                         torch.rand(2, 9), probs, torch.tensor([1]), sm)
    with pytest.raises(TypeError, match="draft_token_ids"):
        rejection_sample(meta.draft_token_ids.float(), [2], 2, meta.cu_num_draft_tokens,
                         None, probs, torch.tensor([1]), sm)
