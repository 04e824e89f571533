"""minikernels.compat.vllm_sampling (vLLM V1's topk_topp_sampler): vLLM's
test_topk_topp_sampler recipes (top-k alone equals top-k with a no-op top-p; the masks
against a sort-based formula written here), in-place writes, random_sample's distribution
and per-row generators, the sampler module's logprobs modes, the FlashInfer path, errors."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.compat import vllm_sampling as vs

VOCAB, BATCH = 64, 12


def sorted_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None,
                       p: torch.Tensor | None) -> torch.Tensor:
    """The sort-based formula (vLLM's PyTorch fallback, in this test's words): keep logits
    >= the k-th largest; then, over what is kept, drop the smallest tokens whose cumulative
    probability (ascending) stays <= 1 - p, always keeping the largest."""
    out = logits.float().clone()
    if k is not None:
        kth = out.sort(dim=-1, descending=True).values.gather(
            1, (k.long().clamp(max=out.shape[1]) - 1)[:, None])
        out = out.masked_fill(out < kth, float("-inf"))
    if p is not None:
        vals, idx = out.sort(dim=-1)
        cum = vals.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.float()[:, None]
        drop[:, -1] = False
        out = out.scatter(1, idx, vals.masked_fill(drop, float("-inf")))
    return out.to(logits.dtype)


def _logits(seed: int, dtype=torch.float32) -> torch.Tensor:
    """Distinct values per row (multiples of 1/8, exact in bf16): no ties, where the
    sort-based formula's choice is arbitrary."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(VOCAB, generator=g) / 8 for _ in range(BATCH)]).to(dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_top_k_alone_equals_top_k_with_a_no_op_top_p(device, backend):
    """vLLM's test_topk_impl_equivalence: k in [1, 10), half the rows k = vocab (off);
    apply_top_k_top_p(k, None) == apply_top_k_top_p(k, p=[1.0]) == apply_top_k_only."""
    g = torch.Generator().manual_seed(0)
    logits = _logits(1).to(device)
    k = torch.randint(1, 10, (BATCH,), generator=g)
    k.masked_fill_(torch.randint(0, 2, (BATCH,), generator=g, dtype=torch.bool), VOCAB)
    k = k.to(device)
    with mk.use_backend(backend):
        r1 = vs.apply_top_k_top_p(logits.clone(), k, None)
        r2 = vs.apply_top_k_top_p(logits.clone(), k, torch.tensor([1.0], device=device))
        r3 = vs.apply_top_k_only(logits.clone(), k)
    assert torch.equal(r1, r2) and torch.equal(r1, r3)
    assert torch.equal(r1.cpu(), sorted_top_k_top_p(logits.cpu(), k.cpu(), None))
    off = (k == VOCAB).cpu()
    assert torch.equal(r1.cpu()[off], logits.cpu()[off])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_k", [False, True])
def test_masks_match_the_sort_formula_in_place(dtype, with_k):
    g = torch.Generator().manual_seed(2)
    logits = _logits(3, dtype)
    k = torch.randint(1, VOCAB + 5, (BATCH,), generator=g) if with_k else None
    p = torch.rand(BATCH, generator=g) * 0.9 + 0.05
    p[0] = 1.0
    want = sorted_top_k_top_p(logits, k, p)
    buf = logits.clone()
    out = vs.apply_top_k_top_p(buf, k, p)
    assert out is buf and torch.equal(out, want)
    assert vs.apply_top_k_top_p(buf, None, None) is buf


def test_top_p_keeps_ties_at_its_edge_together():
    """Where the top-p edge falls inside a run of equal logits, the whole run is kept (a
    sort-based top-p keeps an arbitrary part of it)."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])
    # softmax: 0.77, 0.104 x 3, 0.005: p = 0.8 ends inside the run of 1.0s
    out = vs.apply_top_k_top_p(logits.clone(), None, torch.tensor([0.8]))
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, True, True, True, False]]))


def test_random_sample_distribution_and_generators():
    """The exponential race draws token i with probability probs[i]; rows with their own
    generator are reproducible and independent of the others."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 20000
    draws = vs.random_sample(probs.expand(n, -1).contiguous(), {})
    freq = torch.bincount(draws, minlength=5).float() / n
    assert draws.dtype == torch.int64 and draws.shape == (n,)
    assert freq[4] == 0 and torch.allclose(freq, probs, atol=0.015)
    batch = probs.expand(4, -1).contiguous()
    a = vs.random_sample(batch, {1: torch.Generator().manual_seed(7),
                                 3: torch.Generator().manual_seed(8)})
    b = vs.random_sample(batch, {1: torch.Generator().manual_seed(7),
                                 3: torch.Generator().manual_seed(8)})
    assert a[1] == b[1] and a[3] == b[3]
    every = {i: torch.Generator().manual_seed(i) for i in range(4)}
    c = vs.random_sample(batch, every)
    d = vs.random_sample(batch, {i: torch.Generator().manual_seed(i) for i in range(4)})
    assert torch.equal(c, d)
    fp64 = vs.random_sample(batch, {0: torch.Generator().manual_seed(1)}, use_fp64_gumbel=True)
    assert fp64.shape == (4,)


def test_sampler_module_modes_and_flashinfer_path():
    torch.manual_seed(1)
    logits = _logits(4)
    k = torch.full((BATCH,), 3)
    p = torch.full((BATCH,), 0.9)
    for mode in ("raw_logprobs", "processed_logits", "processed_logprobs"):
        sampler = vs.TopKTopPSampler(logprobs_mode=mode)
        ids, processed = sampler(logits.clone(), {}, k, p)
        kept = sorted_top_k_top_p(logits, k, p)
        assert torch.isfinite(kept.gather(1, ids[:, None])).all()
        if mode == "raw_logprobs":
            assert processed is None
        elif mode == "processed_logits":
            assert torch.equal(processed, kept)
        else:
            assert torch.allclose(processed, kept.log_softmax(-1))
    ids = vs.flashinfer_sample(logits.clone(), k, p)
    assert torch.isfinite(sorted_top_k_top_p(logits, k, p).gather(1, ids[:, None])).all()
    for kk, pp in ((k, None), (None, p)):
        ids = vs.flashinfer_sample(logits.clone(), kk, pp)
        assert torch.isfinite(sorted_top_k_top_p(logits, kk, pp).gather(1, ids[:, None])).all()


def test_errors_name_the_argument():
    logits = _logits(5)
    with pytest.raises(ValueError, match="k"):
        vs.apply_top_k_top_p(logits, torch.ones(3, dtype=torch.int64), None)
    with pytest.raises(TypeError, match="k"):
        vs.apply_top_k_top_p(logits, torch.ones(BATCH), None)
    with pytest.raises(ValueError, match="p"):
        vs.apply_top_k_top_p(logits, None, torch.full((BATCH,), 1.5))
    with pytest.raises(TypeError, match="logits"):
        vs.apply_top_k_top_p(logits.long(), None, torch.ones(BATCH))
    with pytest.raises(ValueError, match="generators"):
        vs.random_sample(logits.softmax(-1), {BATCH: torch.Generator()})
    with pytest.raises(ValueError, match="logprobs_mode"):
        vs.TopKTopPSampler(logprobs_mode="logits")
    with pytest.raises(ValueError, match="generators"):
        vs.flashinfer_sample(logits, None, torch.ones(BATCH), {0: torch.Generator()})
