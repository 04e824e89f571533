"""gated_delta_rule's chunked Triton path (ops/triton/gated_delta_chunked.py; interpreter on
CPU) against the reference: varlen batches whose sequences span several chunks, end in
partial chunks, are shorter than a chunk, empty or single decode tokens; padding rows,
initial states on / off (stale NaN slots ignored), Hv = 2 Hk, l2norm on / off, odd head
dims, fp32 / fp16 / bf16, every tensor argument a strided view, poisoned outputs, the
two-call round trip, no-pool calls; the dispatch between the recurrent and the chunked
kernels on max_seqlen. Most cases use 16-token chunks (several chunks at few tokens);
one runs the 64-token chunks the GPU uses."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, spy_launches
from hypothesis import given
from hypothesis import strategies as st
from test_gated_delta_rule import _gen, _inputs, _view

import minikernels as mk
from minikernels.ops import reference
from minikernels.ops.triton import gated_delta as triton_recurrent
from minikernels.ops.triton import gated_delta_chunked as triton_chunked

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def chunked(monkeypatch):
    """Every launch with a max_seqlen takes the chunked path, in 16-token chunks."""
    monkeypatch.setattr(triton_recurrent, "CHUNKED_MIN_SEQLEN", 0)
    monkeypatch.setattr(triton_chunked, "CHUNK", 16)
    return triton_chunked


def _run(args, cu, state, slots, flags, scale, l2norm, max_seqlen):
    """The op on the Triton backend; asserts that the chunked state kernel ran."""
    with spy_launches(triton_chunked, "gdn_chunk_state_kernel", "CHUNK") as seen:
        with mk.use_backend("triton"):
            got = mk.ops.gated_delta_rule(*args, cu_seqlens=cu, state=state,
                                          state_indices=slots, has_initial_state=flags,
                                          scale=scale, use_qk_l2norm=l2norm,
                                          max_seqlen=max_seqlen)
    assert seen == [triton_chunked.CHUNK]
    return got


# (lens, hk, hv, dk, dv, dtype, l2norm, pool, views): lengths over chunks of 16
CASES = [
    ([40, 0, 5, 17, 1], 1, 2, 12, 24, torch.float32, False, "init", False),
    ([33, 16, 2], 2, 4, 24, 8, torch.bfloat16, True, "flags", True),
    ([0, 48, 7], 1, 1, 8, 12, torch.float16, True, "padding", False),
    ([21, 1, 1, 30], 2, 2, 32, 32, torch.float32, True, "flags", True),
    ([64, 9], 1, 2, 16, 24, torch.float16, False, "none", True),
    ([15, 0, 0, 50], 1, 2, 24, 12, torch.bfloat16, False, "padding", True),
]


@pytest.mark.parametrize("lens, hk, hv, dk, dv, dtype, l2norm, pool, views", CASES,
                         ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_reference(chunked, device, lens, hk, hv, dk, dv, dtype, l2norm, pool,
                           views):
    """pool: "none" (state=None), "init" (every sequence from its slot), "flags"
    (has_initial_state mixed; the fresh slots hold stale NaNs), "padding" (-1 rows with
    NaN inputs, flags mixed)."""
    gen = _gen(sum(lens) + dk)
    n = len(lens)
    q, k, v, g, beta, cu = _inputs(lens, hk, hv, dk, dv, dtype, gen, l2norm=l2norm,
                                   device=device)
    if dtype != torch.float32:
        g, beta = g.to(dtype), beta.to(dtype)
    state = slots = flags = None
    if pool != "none":
        state = torch.randn(n + 2, hv, dk, dv, generator=gen).to(device)
        slots = torch.randperm(n + 2, generator=gen)[:n].to(device)
        if pool in ("flags", "padding"):
            flags = torch.arange(n, device=device) % 2 == 0
            state[slots[~flags]] = float("nan")          # stale: must not be read
        if pool == "padding":
            slots[1::2] = -1
            for i in range(1, n, 2):                     # padding rows' inputs: NaN
                lo, hi = int(cu[i]), int(cu[i + 1])
                q[lo:hi], v[lo:hi], g[lo:hi] = float("nan"), float("nan"), float("nan")
    want_state = None if state is None else state.clone()
    want = reference.gated_delta_rule(q, k, v, g, beta, cu, want_state, slots, flags, None,
                                      l2norm)
    args = [q, k, v, g, beta]
    if views:
        args = [_view(x, gen) for x in args]
        cu = _view(cu, gen)
        if state is not None:
            state, slots = _view(state, gen), _view(slots, gen)
            flags = None if flags is None else _view(flags, gen)
    got = _run(args, cu, state, slots, flags, None, l2norm, max(lens))
    if pool == "padding":   # zero outputs (from NaN inputs), the slots left alone
        for i in range(1, n, 2):
            lo, hi = int(cu[i]), int(cu[i + 1])
            assert torch.equal(got[lo:hi], torch.zeros_like(got[lo:hi]))
    assert_close(got, want, scale=2)
    if state is not None:   # written slots equal, the others untouched (NaN stays NaN)
        torch.testing.assert_close(state, want_state, atol=2e-4, rtol=2e-4,
                                   equal_nan=True)


@given(data=st.data())
def test_random_batches(chunked, device, data):
    """Random varlen batches (0..5 sequences of 0..40 tokens: empty, decode, partial,
    exact and multi-chunk), dims 1..32, dtypes, gates' dtype, scale, pools with padding
    rows and flags, views: the chunked path equals the reference."""
    gen = _gen(data.draw(st.integers(0, 2**16)))
    n = data.draw(st.integers(0, 5))
    lens = data.draw(st.lists(st.sampled_from([0, 1, 2, 7, 16, 17, 31, 40]), min_size=n,
                              max_size=n))
    hk = data.draw(st.sampled_from([1, 2]))
    hv = hk * data.draw(st.sampled_from([1, 2]))
    dk = data.draw(st.sampled_from([1, 8, 12, 24, 32]))
    dv = data.draw(st.sampled_from([1, 8, 12, 24, 32]))
    dtype = data.draw(st.sampled_from(DTYPES))
    l2norm = data.draw(st.booleans())
    q, k, v, g, beta, cu = _inputs(lens, hk, hv, dk, dv, dtype, gen, l2norm=l2norm,
                                   device=device)
    if data.draw(st.booleans()):
        g, beta = g.to(dtype), beta.to(dtype)
    scale = data.draw(st.sampled_from([None, 0.3]))
    cu = cu.to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    state = slots = flags = None
    if data.draw(st.booleans()):
        state = torch.randn(n + 2, hv, dk, dv, generator=gen).to(device)
        slots = torch.randperm(n + 2, generator=gen)[:n]
        slots = torch.where(torch.rand(n, generator=gen) < 0.25, -1, slots).to(device)
        if data.draw(st.booleans()):
            flags = (torch.rand(n, generator=gen) < 0.6).to(device)
    want_state = None if state is None else state.clone()
    want = reference.gated_delta_rule(q, k, v, g, beta, cu, want_state, slots, flags, scale,
                                      l2norm)
    args = [q, k, v, g, beta]
    if data.draw(st.booleans()):
        args = [_view(x, gen) for x in args]
        cu = _view(cu, gen)
        if state is not None:
            state, slots = _view(state, gen), _view(slots, gen)
            flags = None if flags is None else _view(flags, gen)
    max_seqlen = max(lens, default=0) + data.draw(st.sampled_from([0, 5]))
    with spy_launches(triton_chunked, "gdn_chunk_state_kernel", "CHUNK") as seen:
        with mk.use_backend("triton"):
            got = mk.ops.gated_delta_rule(*args, cu_seqlens=cu, state=state,
                                          state_indices=slots, has_initial_state=flags,
                                          scale=scale, use_qk_l2norm=l2norm,
                                          max_seqlen=max_seqlen)
    assert len(seen) == (1 if n and (sum(lens) or state is not None) else 0)
    assert_close(got, want, scale=2)
    if state is not None:
        torch.testing.assert_close(state, want_state, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunk_64(device, monkeypatch, dtype):
    """The GPU's 64-token chunks: a full chunk, one partial past it, a short sequence."""
    monkeypatch.setattr(triton_recurrent, "CHUNKED_MIN_SEQLEN", 0)
    assert triton_chunked.CHUNK == 64
    gen = _gen(7)
    lens, hk, hv, dk, dv = [64, 70, 3], 1, 2, 16, 16
    q, k, v, g, beta, cu = _inputs(lens, hk, hv, dk, dv, dtype, gen, l2norm=True,
                                   device=device)
    state = torch.randn(3, hv, dk, dv, generator=gen).to(device)
    slots = torch.tensor([2, 0, 1], device=device)
    want_state = state.clone()
    want = reference.gated_delta_rule(q, k, v, g, beta, cu, want_state, slots, None, None,
                                      True)
    got = _run([q, k, v, g, beta], cu, state, slots, None, None, True, 70)
    assert_close(got, want, scale=2)
    torch.testing.assert_close(state, want_state, atol=2e-4, rtol=2e-4)


def test_long_sequence_fp32(chunked, device):
    """A 192-token sequence (12 chunks of 16) in fp32 with a scale: outputs and state at
    the recurrent path's fp32 tolerances (both paths' errors measured against the
    reference, the chunked one not larger than 4x the recurrent one or 2e-5)."""
    gen = _gen(8)
    lens, hk, hv, dk, dv = [192], 1, 1, 32, 32
    q, k, v, g, beta, cu = _inputs(lens, hk, hv, dk, dv, torch.float32, gen, l2norm=True,
                                   device=device)
    g = g * 0.2                                           # slow decay: a long memory
    state = torch.randn(1, hv, dk, dv, generator=gen).to(device)
    slots = torch.tensor([0], device=device)
    want_state = state.clone()
    want = reference.gated_delta_rule(q, k, v, g, beta, cu, want_state, slots, None, 0.3,
                                      True)
    rec_state = state.clone()
    with mk.use_backend("triton"):
        rec = mk.ops.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, state=rec_state,
                                      state_indices=slots, scale=0.3, use_qk_l2norm=True)
    got = _run([q, k, v, g, beta], cu, state, slots, None, 0.3, True, 192)
    assert_close(got, want)
    torch.testing.assert_close(state, want_state, atol=1e-4, rtol=1e-4)
    for chunked_err, rec_err in (((got - want).abs().max(), (rec - want).abs().max()),
                                 ((state - want_state).abs().max(),
                                  (rec_state - want_state).abs().max())):
        assert chunked_err <= max(4 * rec_err, 2e-5), (chunked_err, rec_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(chunked, device, dtype):
    """A 40-token sequence in two calls (25 tokens, then 15 beside a decode row of another
    sequence) equals one call: outputs and final state."""
    gen = _gen(4)
    hk, hv, dk, dv = 1, 2, 16, 24
    q, k, v, g, beta, _ = _inputs([40], hk, hv, dk, dv, dtype, gen, l2norm=True,
                                  device=device)
    dq, dk_, dv_, dg, db, _ = _inputs([1], hk, hv, dk, dv, dtype, gen, l2norm=True,
                                      device=device)
    pool = torch.randn(3, hv, dk, dv, generator=gen).to(device)
    pool[1] = float("nan")                                 # stale, overwritten
    whole_pool = pool.clone()
    idx = lambda *s: torch.tensor(s, device=device)        # noqa: E731
    cat = lambda a, b: torch.cat([a, b])                   # noqa: E731
    whole = _run([q, k, v, g, beta], idx(0, 40).int(), whole_pool, idx(1), idx(False),
                 None, True, 40)
    first = _run([x[:25] for x in (q, k, v, g, beta)], idx(0, 25).int(), pool, idx(1),
                 idx(False), None, True, 25)
    decode_want = pool.clone()
    want_decode = reference.gated_delta_rule(dq, dk_, dv_, dg, db, idx(0, 1), decode_want,
                                             idx(2), None, None, True)
    second = _run([cat(a, b[25:]) for a, b in ((dq, q), (dk_, k), (dv_, v), (dg, g),
                                               (db, beta))],
                  idx(0, 1, 16).int(), pool, idx(2, 1), idx(True, True), None, True, 15)
    assert_close(torch.cat([first, second[1:]]), whole, scale=2)
    assert_close(second[:1], want_decode)
    torch.testing.assert_close(pool[1], whole_pool[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pool[2], decode_want[2], atol=2e-5, rtol=2e-5)


def test_empty_sequences_and_batches(chunked, device):
    """Empty sequences: no outputs; a fresh slot becomes zeros, a continuing one keeps its
    state; a batch of only empty sequences, and one without tokens or pool."""
    gen = _gen(9)
    q, k, v, g, beta, cu = _inputs([0, 0, 20], 1, 1, 8, 8, torch.float32, gen,
                                   device=device)
    pool = torch.randn(4, 1, 8, 8, generator=gen).to(device)
    pool[3] = float("nan")
    want_pool = pool.clone()
    slots = torch.tensor([3, 1, 0], device=device)
    flags = torch.tensor([False, True, True], device=device)
    want = reference.gated_delta_rule(q, k, v, g, beta, cu, want_pool, slots, flags)
    got = _run([q, k, v, g, beta], cu, pool, slots, flags, None, False, 20)
    assert_close(got, want)
    torch.testing.assert_close(pool, want_pool, atol=2e-4, rtol=2e-4)
    assert torch.equal(pool[3], torch.zeros_like(pool[3]))
    none = [x[:0] for x in (q, k, v, g, beta)]
    with mk.use_backend("triton"):
        out = mk.ops.gated_delta_rule(*none, cu_seqlens=cu[:2] * 0, state=pool,
                                      state_indices=slots[:1], max_seqlen=0)
        assert out.shape == (0, 1, 8)
        out = mk.ops.gated_delta_rule(*none, cu_seqlens=cu[:1] * 0, max_seqlen=0)
        assert out.shape == (0, 1, 8)
    assert torch.equal(pool[3], torch.zeros_like(pool[3]))


def test_dispatch_threshold(device):
    """Launches whose max_seqlen reaches CHUNKED_MIN_SEQLEN take the chunked kernels, the
    others (and unknown max_seqlen under graph capture: -1) the recurrent kernel;
    max_seqlen=None is read from cu_seqlens when index checks run."""
    gen = _gen(10)
    threshold = triton_recurrent.CHUNKED_MIN_SEQLEN
    assert threshold == 32
    q, k, v, g, beta, cu = _inputs([threshold, 3], 1, 1, 8, 8, torch.bfloat16, gen,
                                   device=device)
    want = reference.gated_delta_rule(q, k, v, g, beta, cu)

    def paths(**kw):
        with spy_launches(triton_chunked, "gdn_chunk_state_kernel", "CHUNK") as ch, \
                spy_launches(triton_recurrent, "gated_delta_rule_kernel", "GROUP") as rec:
            with mk.use_backend("triton"):
                got = mk.ops.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, **kw)
        assert_close(got, want, scale=2)
        return len(ch), len(rec)

    assert paths(max_seqlen=threshold) == (1, 0)
    assert paths(max_seqlen=4 * threshold) == (1, 0)
    assert paths() == (1, 0)                               # None: longest = threshold
    with mk.use_backend("triton"), \
            spy_launches(triton_recurrent, "gated_delta_rule_kernel", "GROUP") as rec:
        short = mk.ops.gated_delta_rule(q[threshold:], k[threshold:], v[threshold:],
                                        g[threshold:], beta[threshold:],
                                        cu_seqlens=torch.tensor([0, 3], device=device,
                                                                dtype=cu.dtype),
                                        max_seqlen=threshold - 1)
    assert len(rec) == 1
    assert_close(short, want[threshold:])
    with spy_launches(triton_recurrent, "gated_delta_rule_kernel", "GROUP") as rec:
        with mk.use_backend("triton"):
            torch.ops.minikernels.gated_delta_rule(q, k, v, g, beta, cu, None, None, None,
                                                   0.35, False)   # max_seqlen -1
    assert len(rec) == 1


def test_opcheck_chunked(chunked, device):
    gen = _gen(6)
    q, k, v, g, beta, cu = _inputs([20, 0, 2], 1, 2, 5, 6, torch.bfloat16, gen,
                                   device=device)
    pool = torch.randn(4, 2, 5, 6, generator=gen).to(device)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.gated_delta_rule,
                              (q, k, v, g, beta, cu, pool,
                               torch.tensor([3, -1, 0], device=device),
                               torch.tensor([True, False, False], device=device), 0.4, True,
                               20))
