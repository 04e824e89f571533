"""SamplingParams validation and the batched Sampler (greedy, temperature, top-k/p, min-p,
penalties, seeds, min_tokens, logprobs)."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.engine.sampler import Sampler
from minikernels.engine.sampling_params import SamplingParams
from minikernels.engine.sequence import Request, Sequence

V = 32
_ids = iter(range(10**9))


def seq_for(params: SamplingParams, prompt=(1, 2, 3), output=(), sampler: Sampler | None = None,
            index: int = 0) -> Sequence:
    req = Request(f"r{next(_ids)}", None, list(prompt), params)
    gen = None
    if params.seed is not None and sampler is not None:
        gen = sampler.make_generator(params.seed + index)
    s = Sequence(next(_ids), req, index, gen)
    s.token_ids.extend(output)
    return s


# ---------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(min_p=1.1), ValueError, "min_p"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=1.0), TypeError, "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), ValueError, "min_tokens"),
    (dict(n=0), ValueError, "n"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=2**64 - 1, n=2), ValueError, "seed"),
    (dict(seed=-2**63 - 1), ValueError, "seed"),
    (dict(presence_penalty=3.0), ValueError, "presence_penalty"),
    (dict(frequency_penalty=-2.5), ValueError, "frequency_penalty"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(logprobs=-1), ValueError, "logprobs"),
    (dict(stop=[""]), ValueError, "stop"),
    (dict(stop=5), TypeError, "stop"),
    (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"),
    (dict(ignore_eos=1), TypeError, "ignore_eos"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty"),
    (dict(logit_bias={3: 101.0}), ValueError, r"logit_bias\[3\]"),
    (dict(logit_bias={-1: 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={"3": 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={3: float("nan")}), ValueError, r"logit_bias\[3\]"),
    (dict(logit_bias=[1]), TypeError, "logit_bias"),
    (dict(allowed_token_ids=[]), ValueError, "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -2]), ValueError, "allowed_token_ids"),
])
def test_bad_sampling_params_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=rf"SamplingParams\.{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_stop():
    p = SamplingParams(stop="###", stop_token_ids=(5, 6))
    assert p.stop_strings == ["###"] and p.stop_token_ids == [5, 6]
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


# ---------------------------------------------------------------- Sampler
def logits_batch(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3


def test_greedy_is_argmax_and_top_k_1_or_tiny_top_p_is_greedy():
    s = Sampler(V)
    logits = logits_batch(4)
    want = logits.argmax(1).tolist()
    assert s(logits, [seq_for(SamplingParams(temperature=0))] * 4).token_ids == want
    assert s(logits, [seq_for(SamplingParams(top_k=1))] * 4).token_ids == want
    assert s(logits, [seq_for(SamplingParams(top_p=1e-6))] * 4).token_ids == want
    assert s(logits, [seq_for(SamplingParams(min_p=1.0))] * 4).token_ids == want


def test_sampling_follows_the_distribution():
    s = Sampler(V, seed=1)
    row = torch.randn(V) * 1.5
    n = 4000
    params = SamplingParams(temperature=0.7)
    toks = s(row.expand(n, V).clone(), [seq_for(params)] * n).token_ids
    freq = torch.bincount(torch.tensor(toks), minlength=V).float() / n
    probs = torch.softmax(row / 0.7, 0)
    assert (freq - probs).abs().max() < 0.03


def test_top_k_and_top_p_restrict_support():
    s = Sampler(V, seed=2)
    row = torch.linspace(0, 3, V)          # token V-1 most likely
    n = 500
    toks = s(row.expand(n, V).clone(), [seq_for(SamplingParams(top_k=3))] * n).token_ids
    assert set(toks) <= {V - 1, V - 2, V - 3} and len(set(toks)) == 3
    probs = torch.softmax(row, 0)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    toks = s(row.expand(n, V).clone(), [seq_for(SamplingParams(top_p=0.5))] * n).token_ids
    assert set(toks) <= set(order[:keep].tolist())
    toks = s(row.expand(n, V).clone(), [seq_for(SamplingParams(min_p=0.5))] * n).token_ids
    allowed = set(torch.nonzero(probs >= 0.5 * probs.max()).flatten().tolist())
    assert set(toks) <= allowed


def test_seeded_rows_do_not_depend_on_the_batch():
    s = Sampler(V, seed=3)
    logits = logits_batch(6, seed=4)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [s(logits[2:3].clone(), [seq_for(p, sampler=s)]).token_ids[0] for _ in range(8)]
    mixed = []
    for _ in range(8):
        seqs = [seq_for(SamplingParams(temperature=1.0)) for _ in range(6)]
        seqs[2] = seq_for(p, sampler=s)
        mixed.append(s(logits.clone(), seqs).token_ids[2])
    assert alone == mixed
    # The same generator continues: successive draws differ in general.
    g_seq = seq_for(p, sampler=s)
    draws = [s(logits[2:3].clone(), [g_seq]).token_ids[0] for _ in range(20)]
    assert len(set(draws)) > 1


def test_penalties_match_their_formulas():
    s = Sampler(V)
    logits = logits_batch(1, seed=5)
    prompt, out = (1, 2), (3, 3, 4)
    rep = SamplingParams(temperature=0, repetition_penalty=2.0)
    got = s._apply_penalties(logits.clone(), [seq_for(rep, prompt, out)])
    want = logits.clone()
    for t in {1, 2, 3, 4}:
        want[0, t] = want[0, t] / 2 if want[0, t] > 0 else want[0, t] * 2
    torch.testing.assert_close(got, want)
    pf = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    got = s._apply_penalties(logits.clone(), [seq_for(pf, prompt, out)])
    want = logits.clone()
    want[0, 3] -= 0.5 + 2 * 0.25
    want[0, 4] -= 0.5 + 0.25
    torch.testing.assert_close(got, want)
    # A huge frequency penalty steers greedy away from a repeated argmax.
    top = int(logits.argmax())
    p = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert s(logits.clone() * 0.1, [seq_for(p, output=(top,) * 5)]).token_ids[0] != top


def test_min_tokens_suppresses_eos_and_stop_ids():
    s = Sampler(V)
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0
    logits[0, 9] = 9.0
    logits[0, 11] = 8.0
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9])
    assert s(logits, [seq_for(p)], eos_token_ids=[7]).token_ids == [11]
    assert s(logits, [seq_for(p, output=(1, 1))], eos_token_ids=[7]).token_ids == [7]


def test_logprobs_are_raw_log_softmax_with_ranks():
    s = Sampler(V)
    logits = logits_batch(2, seed=6)
    seqs = [seq_for(SamplingParams(temperature=0, logprobs=3)),
            seq_for(SamplingParams(temperature=0))]
    out = s(logits, seqs)
    lp = torch.log_softmax(logits, 1)
    chosen, rank, top_ids, top_lps = out.logprobs[0]
    assert rank == 1 and abs(chosen - float(lp[0].max())) < 1e-5
    assert top_ids == lp[0].topk(3).indices.tolist()
    assert out.logprobs[1] is None


def test_extra_logit_columns_are_ignored():
    s = Sampler(V)
    logits = torch.zeros(2, V + 8)
    logits[:, V + 1] = 100.0   # padded vocab column must never be picked
    logits[:, 5] = 1.0
    assert s(logits, [seq_for(SamplingParams(temperature=0))] * 2).token_ids == [5, 5]


def test_out_of_range_top_k_top_p_and_logprobs_do_not_break_the_batch():
    # A huge top_k (HTTP allows any int) must mean "all tokens", not overflow the int64
    # tensor and kill the step; a top_p that rounds to 0 in fp32 must keep the argmax
    # (not mask every token -> NaN -> token 0); logprobs > vocab returns the whole vocab.
    s = Sampler(V)
    logits = logits_batch(3, seed=7)
    seqs = [seq_for(SamplingParams(temperature=1.0, top_k=2**70, seed=1), sampler=s),
            seq_for(SamplingParams(temperature=1.0, top_p=1e-300)),
            seq_for(SamplingParams(temperature=0, logprobs=10 * V))]
    out = s(logits, seqs)
    ref = s(logits[:1], [seq_for(SamplingParams(temperature=1.0, seed=1), sampler=s)])
    assert out.token_ids[0] == ref.token_ids[0]
    assert out.token_ids[1] == int(logits[1].argmax())
    assert out.token_ids[2] == int(logits[2].argmax())
    _, rank, top_ids, top_lps = out.logprobs[2]
    assert rank == 1 and len(top_ids) == len(top_lps) == V


def test_extreme_repetition_penalty_never_gives_nan():
    # 2e-38 is a valid (normal, finite) fp32 penalty: logits / 2e-38 would overflow to
    # inf (NaN probabilities) without the clamp; with a small temperature too.
    s = Sampler(V)
    logits = logits_batch(2, seed=3) * 10
    for rp in (2e-38, 3e38):
        for temp in (0.0, 1e-4, 1.0):
            p = SamplingParams(temperature=temp, repetition_penalty=rp, seed=0, logprobs=1)
            seqs = [seq_for(p, prompt=(1, 2, 3, 4), output=(5, 6)) for _ in range(2)]
            out = s(logits.clone(), seqs)
            assert all(0 <= t < V for t in out.token_ids)
            penalized = s._apply_penalties(logits.clone(), seqs)
            assert torch.isfinite(penalized).all()
            assert not torch.softmax(penalized / 1e-5, dim=1).isnan().any()


def test_prompt_logprobs_are_log_softmax_of_the_previous_position():
    s = Sampler(V)
    logits = logits_batch(4, seed=7)
    targets = torch.tensor([3, 0, V - 1, 5])
    chosen, ranks, top_lp, top_ids = s.prompt_logprobs(logits, targets, 3)
    ref = torch.log_softmax(logits[:, :V], dim=1)
    torch.testing.assert_close(chosen, ref.gather(1, targets[:, None])[:, 0])
    assert ranks.tolist() == [int((ref[i] > ref[i, t]).sum()) + 1
                              for i, t in enumerate(targets.tolist())]
    torch.testing.assert_close(top_lp, ref.topk(3, dim=1).values)
    assert s.prompt_logprobs(logits, targets, 0)[2] is None


def test_rows_alike_by_interned_key_take_the_uniform_path(monkeypatch):
    """A server batch holds one SamplingParams object per request: rows whose sampling
    fields are equal still sample with scalar parameters (the sampling keys are interned,
    compared by identity); different fields or a row wanting logprobs / penalties /
    min_tokens take the per-row paths, with the same tokens as sampling each alike group
    alone (greedy here, so deterministic)."""
    import minikernels.engine.sampling_params as spm

    s = Sampler(V)
    calls: list[str] = []
    for name in ("_sample_uniform", "_sample_mixed"):
        real = getattr(Sampler, name)
        monkeypatch.setattr(Sampler, name, lambda self, *a, _r=real, _n=name, **k: (
            calls.append(_n), _r(self, *a, **k))[1])
    a, b = SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.7, top_k=5)
    assert a is not b and a.sampling_key is b.sampling_key and a.plain_row
    logits = torch.randn(6, V)
    s.sample(logits, [seq_for(p) for p in (a, b, a, b, a, b)])
    assert calls == ["_sample_uniform"]
    calls.clear()
    s.sample(logits, [seq_for(SamplingParams(temperature=t)) for t in (0.5, 0.7) * 3])
    assert calls == ["_sample_mixed"]
    # greedy rows: alike-but-distinct objects, mixed with a logprobs row (the general path)
    g = [SamplingParams(temperature=0.0) for _ in range(5)] + [
        SamplingParams(temperature=0.0, logprobs=1)]
    assert [p.plain_row for p in g] == [True] * 5 + [False]
    out = s.sample(logits, [seq_for(p) for p in g])
    assert torch.equal(out.tokens, logits.argmax(dim=1))
    # the intern table is bounded: when it starts over, equal keys compare unequal by
    # identity and the batch takes the per-row path, with the same tokens
    monkeypatch.setattr(spm, "_MAX_KEYS", 1)
    x, y = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_p=0.5)
    z = SamplingParams(temperature=0.0)
    assert z.sampling_key == x.sampling_key and z.sampling_key is not x.sampling_key
    calls.clear()
    out = s.sample(logits[:2], [seq_for(x), seq_for(z)])
    assert calls == ["_sample_mixed"] and torch.equal(out.tokens, logits[:2].argmax(dim=1))
    assert y.needs_host_tokens is False
    assert SamplingParams(repetition_penalty=1.2).needs_host_tokens


def test_filters_read_no_values_back_from_the_device(monkeypatch):
    """Per-row top-k / top-p / min-p tensors come from validated SamplingParams: the
    sampler runs the filter op without its data-dependent range check (a device sync per
    step on a GPU), even with index checks on; a direct op call still checks."""
    import minikernels.ops.sampling as sampling_op

    checked = []
    real = sampling_op.index_checks_active
    monkeypatch.setattr(sampling_op, "index_checks_active",
                        lambda t: checked.append(real(t)) or checked[-1])
    s = Sampler(V)
    seqs = [seq_for(SamplingParams(temperature=0.8, top_k=5, top_p=0.9)),
            seq_for(SamplingParams(temperature=1.0, min_p=0.1)),
            seq_for(SamplingParams(temperature=0.5, top_p=0.5, seed=3), sampler=s)]
    out = s(logits_batch(3, seed=1), seqs)
    assert len(out.token_ids) == 3
    assert checked and not any(checked)
    checked.clear()
    mk.ops.top_k_top_p_mask_logits(logits_batch(3), top_p=torch.full((3,), 0.5))
    assert checked == [True]


def test_logit_bias_and_allowed_token_ids():
    """logit_bias adds to its tokens' logits (per row, other rows untouched);
    allowed_token_ids masks every other token; both in the plain and the speculative
    target distribution."""
    s = Sampler(V)
    logits = logits_batch(3, seed=9)
    top = logits.argmax(dim=1)
    force = SamplingParams(temperature=0, logit_bias={7: 100.0})
    bonus = (int(top[1]) + 1) % V
    ban = SamplingParams(temperature=0, logit_bias={int(top[1]): -100.0, bonus: 0.5})
    plain = SamplingParams(temperature=0)
    assert not force.plain_row and plain.plain_row
    got = s(logits, [seq_for(force), seq_for(ban), seq_for(plain)]).token_ids
    second = logits[1].clone()
    second[int(top[1])] -= 100.0
    second[bonus] += 0.5
    assert got == [7, int(second.argmax()), int(top[2])]
    biased = s.apply_logit_bias(logits, [force, ban, plain])
    want = logits.clone()
    want[0, 7] += 100.0
    want[1] = second
    torch.testing.assert_close(biased, want)
    allowed = SamplingParams(temperature=1.0, allowed_token_ids=[3, 5, 30])
    flat = torch.zeros(1, V)
    draws = {s(flat, [seq_for(allowed)]).token_ids[0] for _ in range(40)}
    assert draws <= {3, 5, 30} and len(draws) > 1
    greedy_allowed = SamplingParams(temperature=0, allowed_token_ids=[3, 5])
    pick = s(logits[:1], [seq_for(greedy_allowed)]).token_ids[0]
    assert pick == (3 if logits[0, 3] >= logits[0, 5] else 5)
    # speculative verification's target distribution sees the same edits
    spec_logits = logits[:1, None].expand(1, 3, V).contiguous()
    probs = s.spec_target_probs(spec_logits, [seq_for(force)],
                                torch.zeros(1, 2, dtype=torch.int64), [2])
    assert all(int(probs[0, j].argmax()) == 7 for j in range(3))
