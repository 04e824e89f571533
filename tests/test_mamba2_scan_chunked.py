"""mamba2_scan's chunked (SSD) Triton path (ops/triton/mamba_chunked.py) against the
reference (interpreter on CPU): varlen batches with sequences of several chunks, partial
last chunks, sequences shorter than a chunk, empty sequences, padding rows, initial states
on / off (stale NaN slots), G 1 / 2, odd P / N, fp32 / fp16 / bf16, every tensor argument
a strided view; the dispatch threshold on max_seqlen; a prefill split over two calls;
transformers' mamba2_chunk_scan on a long sequence. Outputs and scratch are poisoned
(NaN-filled) before the kernels write them (conftest). The tests force the chunked path
(threshold 1) with 16-token chunks unless they say otherwise."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, spy_launches
from hypothesis import given
from hypothesis import strategies as st
from test_mamba2_scan import _gen, _inputs, _params, _strided

import minikernels as mk
from minikernels.ops import reference
from minikernels.ops.triton import mamba as triton_mamba
from minikernels.ops.triton import mamba_chunked

INF = math.inf
STATE_TOL = dict(atol=5e-5, rtol=5e-5)     # test_mamba2_scan's state tolerance


@pytest.fixture
def chunked(monkeypatch):
    """Every launch with a token takes the chunked path, in 16-token chunks."""
    monkeypatch.setattr(triton_mamba, "CHUNKED_MIN_SEQLEN", 1)
    monkeypatch.setattr(mamba_chunked, "CHUNK", 16)


def _paths():
    """Spies on both paths' last kernels: (recurrent launches, chunked launches)."""
    return (spy_launches(triton_mamba, "mamba2_scan_kernel", "BLOCK_P"),
            spy_launches(mamba_chunked, "mamba2_chunk_scan_kernel", "CHUNK"))


def _check(lens, h, g, p, n, dtype, *, seed, state="flags", strided=False, pad=(),
           d_on=True, bias_on=True, softplus=True, limit=(0.0, INF), narrow=False,
           max_seqlen=None):
    """One batch through the Triton backend vs the reference: outputs (the dtype's
    tolerance x 2), the pool (fp32 to 5e-5), the slots no sequence owns (NaN) untouched.
    state: None (no pool), "all" (every live sequence starts from its slot) or "flags"
    (has_initial_state alternating, the False slots stale NaN). pad: padding rows (slot
    -1, NaN inputs). narrow: dt / A / D / dt_bias in x's dtype, int64 indices."""
    gen = _gen(seed)
    x, dt, bm, cm, cu = _inputs(lens, h, g, p, n, dtype, gen)
    a, d, bias = _params(h, gen)
    if narrow:
        dt, a, d, bias = dt.to(dtype), a.to(dtype), d.to(dtype), bias.to(dtype)
        cu = cu.long()
    d, bias = (d if d_on else None), (bias if bias_on else None)
    for i in pad:                                            # padding rows: NaN inputs
        for t in (x, dt, bm, cm):
            t[cu[i]:cu[i + 1]] = float("nan")
    pool = slots = flags = None
    if state is not None:
        k = len(lens)
        pool = torch.full((k + 3, h, p, n), float("nan"))
        order = torch.randperm(k + 3, generator=gen)
        slots = order[:k].clone()
        slots[list(pad)] = -1
        if narrow:
            slots = slots.long()
        else:
            slots = slots.int()
        live = slots[slots >= 0].long()
        pool[live] = torch.randn(live.numel(), h, p, n, generator=gen)
        if state == "flags":
            flags = torch.arange(k) % 2 == 0
            for i in range(k):
                if not flags[i] and slots[i] >= 0:
                    pool[slots[i].long()] = float("nan")        # stale: must not be read
    want_pool = None if pool is None else pool.clone()
    want = reference.mamba2_scan(x, dt, a, bm, cm, cu, D=d, dt_bias=bias,
                                 dt_softplus=softplus, dt_limit=limit, state=want_pool,
                                 state_indices=slots, has_initial_state=flags)
    args = [x, dt, a, bm, cm, cu, d, bias, pool, slots, flags]
    if strided:
        args = [None if t is None else _strided(t, gen) for t in args]
        pool = args[8]
    x_, dt_, a_, bm_, cm_, cu_, d_, bias_, pool_, slots_, flags_ = args
    recurrent, chunk = _paths()
    with mk.use_backend("triton"), recurrent as rec, chunk as chk:
        got = mk.ops.mamba2_scan(x_, dt_, a_, bm_, cm_, cu_seqlens=cu_, D=d_, dt_bias=bias_,
                                 dt_softplus=softplus, dt_limit=limit, state=pool_,
                                 state_indices=slots_, has_initial_state=flags_,
                                 max_seqlen=max_seqlen)
    assert_close(got, want, scale=2)
    for i in pad:
        assert torch.equal(got[cu[i]:cu[i + 1]], torch.zeros_like(got[cu[i]:cu[i + 1]]))
    if pool is not None:
        owned = torch.zeros(pool.shape[0], dtype=torch.bool)
        owned[slots[slots >= 0].long()] = True
        assert torch.isnan(pool[~owned]).all()                    # nobody's slot untouched
        torch.testing.assert_close(pool[owned], want_pool[owned], **STATE_TOL)
    return rec, chk


# ------------------------------------------------------------------- chunked vs reference
CASES = {   # lens, H, G, P, N, extra keyword arguments
    # several chunks with a partial last one, a 16-token (one full chunk) sequence,
    # shorter than a chunk, empty, a decode row, a padding row; stale slots; G = 2
    "varlen_flags": ([37, 0, 5, 16, 1, 33], 4, 2, 5, 12, dict(pad=(4,))),
    # G = 1 (heads share B / C), P = N = 24, every live sequence from its slot,
    # a padding row of several chunks
    "g1_all_initial": ([40, 19, 3], 2, 1, 24, 24, dict(state="all", pad=(1,))),
    # no pool (zeros in, nothing written), no D / dt_bias, raw dt with a clamp
    "stateless_raw_dt": ([50, 7], 2, 2, 12, 5, dict(state=None, d_on=False, bias_on=False,
                                                    softplus=False, limit=(0.05, 0.4))),
}


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(chunked, case, dtype):
    lens, h, g, p, n, kw = CASES[case]
    rec, chk = _check(lens, h, g, p, n, dtype, seed=len(case) + 7 * len(str(dtype)), **kw)
    assert chk == [16] and not rec                                # the chunked path ran


@given(data=st.data())
def test_matches_reference_random(chunked, data):
    """Random batches: up to 4 sequences of 0 .. 40 tokens (around the 16-token chunk
    edges), padding rows, state modes, G 1 / 2, odd P / N, dtypes, views."""
    lens = data.draw(st.lists(st.sampled_from([0, 1, 3, 15, 16, 17, 33, 40]), min_size=1,
                              max_size=4))
    g = data.draw(st.sampled_from([1, 2]))
    state = data.draw(st.sampled_from([None, "all", "flags"]))
    pad = () if state is None else tuple(
        i for i in range(len(lens)) if data.draw(st.integers(0, 3)) == 0)
    softplus = data.draw(st.booleans())
    _check(lens, g * data.draw(st.sampled_from([1, 2])), g,
           data.draw(st.sampled_from([5, 12, 24])), data.draw(st.sampled_from([5, 12, 32])),
           data.draw(st.sampled_from(DTYPES)), seed=data.draw(st.integers(0, 2**16)),
           state=state, pad=pad, strided=data.draw(st.booleans()),
           narrow=data.draw(st.booleans()), d_on=data.draw(st.booleans()),
           bias_on=data.draw(st.booleans()), softplus=softplus,
           limit=data.draw(st.sampled_from([(0.0, INF), (0.05, 0.4)]
                                           + [(-INF, INF)] * softplus)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views(chunked, dtype):
    """Every tensor argument (x, dt, A, B, C, cu_seqlens, D, dt_bias, the pool, the slots,
    the flags) a view with strides of its own; narrow dtypes for dt / A / D / dt_bias and
    int64 indices."""
    _check([21, 0, 35, 2], 4, 2, 5, 12, dtype, seed=11, strided=True, pad=(3,),
           narrow=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_tiles(chunked, monkeypatch, dtype):
    """16-wide tiles: P = 24 and N = 40 span several P / N tiles of the state kernel and
    several K steps of the scan kernel (the tests' other shapes fit one 64-wide tile)."""
    monkeypatch.setattr(mamba_chunked, "MAX_BLOCK", 16)
    assert mamba_chunked.launch_config(24, 40)["BLOCK_K"] == 16
    _check([35, 4, 20], 2, 1, 24, 40, dtype, seed=19, pad=(1,))


def test_empty_sequences_only(chunked, monkeypatch):
    """T = 0 with a pool (threshold 0 forces the chunked path): the empty sequences still
    (re)write their slots, the initial state or zeros."""
    monkeypatch.setattr(triton_mamba, "CHUNKED_MIN_SEQLEN", 0)
    gen = _gen(12)
    h, g, p, n = 2, 1, 5, 12
    a, d, bias = _params(h, gen)
    x, dt, bm, cm, _ = _inputs([], h, g, p, n, torch.float16, gen)
    pool = torch.randn(4, h, p, n, generator=gen)
    before = pool.clone()
    recurrent, chunk = _paths()
    with mk.use_backend("triton"), recurrent as rec, chunk as chk:
        y = mk.ops.mamba2_scan(x, dt, a, bm, cm, D=d, dt_bias=bias,
                               cu_seqlens=torch.zeros(4, dtype=torch.int32), state=pool,
                               state_indices=torch.tensor([3, 0, -1]),
                               has_initial_state=torch.tensor([True, False, True]))
    assert chk == [16] and not rec
    assert y.shape == (0, h, p) and y.dtype == torch.float16
    assert torch.equal(pool[[1, 2, 3]], before[[1, 2, 3]])
    assert torch.equal(pool[0], torch.zeros_like(pool[0]))


# ---------------------------------------------------------------------------- dispatch
def test_dispatch_threshold():
    """Default constants (64-token chunks from max_seqlen 32 on): 31 -> the recurrent
    kernel, 32 -> the chunked kernels (here with a 40-token sequence: one partial 64-token
    chunk); None -> the longest length read from cu_seqlens; both paths agree."""
    assert triton_mamba.CHUNKED_MIN_SEQLEN == 32 and mamba_chunked.CHUNK == 64
    gen = _gen(13)
    h, g, p, n = 2, 1, 5, 12
    x, dt, bm, cm, cu = _inputs([31, 2], h, g, p, n, torch.float32, gen)
    a, d, bias = _params(h, gen)
    kw = dict(cu_seqlens=cu, D=d, dt_bias=bias)
    outs = {}
    for name, longest in (("recurrent", 31), ("chunked", 32), ("computed", None)):
        recurrent, chunk = _paths()
        with mk.use_backend("triton"), recurrent as rec, chunk as chk:
            outs[name] = mk.ops.mamba2_scan(x, dt, a, bm, cm, max_seqlen=longest, **kw)
        assert (len(rec), len(chk)) == {"recurrent": (1, 0), "chunked": (0, 1),
                                        "computed": (1, 0)}[name]
    assert_close(outs["chunked"], outs["recurrent"])
    rec_ok, chk_ok = _check([40, 3], h, g, p, n, torch.bfloat16, seed=14, max_seqlen=None)
    assert chk_ok == [64] and not rec_ok                 # None, read from cu_seqlens: 40


def test_dispatch_unknown_length():
    """max_seqlen unknown (-1: index checks off / graph capture, none given): chunked only
    when the mean length T / N_seq (a lower bound of the longest) reaches the threshold."""
    gen = _gen(15)
    h, g, p, n = 2, 1, 5, 12
    a = _params(h, gen)[0]
    for lens, want in (([33, 31], (0, 1)), ([40, 1, 1], (1, 0))):
        x, dt, bm, cm, cu = _inputs(lens, h, g, p, n, torch.float32, gen)
        recurrent, chunk = _paths()
        with recurrent as rec, chunk as chk:
            y = triton_mamba.mamba2_scan(x, dt, a, bm, cm, cu, None, None, True, 0.0, INF,
                                         None, None, None, -1)
        assert (len(rec), len(chk)) == want
        assert_close(y, reference.mamba2_scan(x, dt, a, bm, cm, cu), scale=2)


# ------------------------------------------------------------------ serving: two calls
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_in_two_calls(chunked, dtype):
    """A 45-token prefill run as 21 + 24 tokens (the second call continuing from the slot,
    batched behind a 30-token sequence starting fresh over a stale slot) equals one call
    over all 45 tokens: outputs and final states."""
    gen = _gen(16)
    h, g, p, n = 4, 2, 5, 12
    x, dt, bm, cm, _ = _inputs([45], h, g, p, n, dtype, gen)
    ox, odt, obm, ocm, _ = _inputs([30], h, g, p, n, dtype, gen)
    a, d, bias = _params(h, gen)
    pool = torch.randn(3, h, p, n, generator=gen)
    pool[2] = float("nan")
    whole_pool = pool.clone()
    kw = dict(D=d, dt_bias=bias, dt_limit=(0.0, 1.0))
    idx = lambda *s: torch.tensor(s)                       # noqa: E731
    cat = lambda u, v: torch.cat([u, v])                   # noqa: E731
    with mk.use_backend("triton"):
        whole = mk.ops.mamba2_scan(x, dt, a, bm, cm, cu_seqlens=idx(0, 45).int(),
                                   state=whole_pool, state_indices=idx(0),
                                   has_initial_state=idx(True), **kw)
        first = mk.ops.mamba2_scan(x[:21], dt[:21], a, bm[:21], cm[:21],
                                   cu_seqlens=idx(0, 21).int(), state=pool,
                                   state_indices=idx(0), has_initial_state=idx(True), **kw)
        second = mk.ops.mamba2_scan(cat(ox, x[21:]), cat(odt, dt[21:]), a, cat(obm, bm[21:]),
                                    cat(ocm, cm[21:]), cu_seqlens=idx(0, 30, 54).int(),
                                    state=pool, state_indices=idx(2, 0),
                                    has_initial_state=idx(False, True), **kw)
    assert_close(torch.cat([first, second[30:]]), whole, scale=2)
    torch.testing.assert_close(pool[0], whole_pool[0], **STATE_TOL)
    fresh = torch.zeros(1, h, p, n)
    want_other = reference.mamba2_scan(ox, odt, a, obm, ocm, idx(0, 30), state=fresh,
                                       state_indices=idx(0), **kw)
    assert_close(second[:30], want_other, scale=2)
    torch.testing.assert_close(pool[2], fresh[0], **STATE_TOL)
    torch.testing.assert_close(pool[1], whole_pool[1], rtol=0, atol=0)


# ----------------------------------------------------------------------- transformers
def test_matches_transformers_chunk_scan(chunked):
    """Two 70-token sequences (five 16-token chunks, the last partial) from initial
    states against transformers' mamba2_chunk_scan (its own 32-token chunks)."""
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
        mamba2_chunk_scan,
    )
    gen = _gen(17)
    b, length, h, g, p, n = 2, 70, 4, 2, 5, 12
    x, dt, bm, cm, cu = _inputs([length] * b, h, g, p, n, torch.float32, gen)
    a, d, bias = _params(h, gen)
    h0 = torch.randn(b, h, p, n, generator=gen)
    batch = [t.view(b, length, *t.shape[1:]) for t in (x, dt, bm, cm)]
    want_y, want_s = mamba2_chunk_scan(
        batch[0], batch[1], a, batch[2], batch[3], chunk_size=32, D=d, dt_bias=bias,
        initial_states=h0, dt_softplus=True, dt_limit=(0.0, INF), return_final_states=True)
    pool = torch.full((b + 1, h, p, n), float("nan"))
    slots = torch.tensor([2, 0])
    pool[slots] = h0
    with mk.use_backend("triton"):
        y = mk.ops.mamba2_scan(x, dt, a, bm, cm, cu_seqlens=cu, D=d, dt_bias=bias,
                               state=pool, state_indices=slots, max_seqlen=length)
    assert_close(y.view(b, length, h, p), want_y, scale=10)
    assert_close(pool[slots], want_s, scale=10)
    assert torch.isnan(pool[1]).all()


def test_opcheck(chunked):
    """The op with max_seqlen (its last argument) on the chunked path."""
    gen = _gen(18)
    x, dt, bm, cm, cu = _inputs([20, 0, 3], 4, 2, 5, 12, torch.bfloat16, gen)
    a, d, bias = _params(4, gen)
    pool = torch.randn(4, 4, 5, 12, generator=gen)
    op = torch.ops.minikernels.mamba2_scan
    with mk.use_backend("triton"):
        torch.library.opcheck(op, (x, dt, a, bm, cm, cu, d, bias, True, 0.0, INF, pool,
                                   torch.tensor([3, -1, 0]),
                                   torch.tensor([True, False, False]), 20))
