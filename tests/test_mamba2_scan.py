"""mamba2_scan (Mamba-2's selective state-space scan: Granite 4.0-H, Falcon-H1, Nemotron-H,
Bamba, Zamba2): the op against transformers' mamba2_chunk_scan (prefill, initial / final
states, D / dt_bias / softplus / dt_limit variants) and mamba2_selective_state_update
(decode steps) on equal-length batches; the Triton kernel (interpreter on CPU) against the
reference over random varlen batches (odd P / N, groups, empty sequences, decode rows, long
sequences; every tensor argument a view with strides of its own), padding rows, stale
slots ignored, chunked prefill round trips; bad-input errors; opcheck. Outputs are poisoned
(NaN-filled) before the kernels write them (conftest)."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", "triton"]   # no CUDA C++ kernel: "cuda" would fall back to triton
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = math.inf


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """t's values in a view with strides of its own: a larger buffer (filled with noise)
    whose first two dims are stored swapped, every dim offset by one, the last dim strided
    by 3."""
    shape = list(t.shape)
    big = [s + 2 for s in shape]
    big[-1] = 3 * shape[-1] + 2
    order = list(range(len(shape)))
    if len(shape) >= 2:
        order[0], order[1] = 1, 0
    stored = [big[i] for i in order]
    if t.dtype.is_floating_point:
        buf = torch.randn(stored, generator=gen).to(t.dtype)
    else:
        buf = torch.randint(0, 2, stored, generator=gen).to(t.dtype)
    buf = buf.to(t.device).permute(*[order.index(i) for i in range(len(shape))])
    idx = [slice(1, 1 + s) for s in shape]
    idx[-1] = slice(1, 1 + 3 * shape[-1], 3)
    view = buf[tuple(idx)]
    view.copy_(t)
    assert view.shape == t.shape and view.storage_offset() > 0
    return view


def _params(h: int, gen: torch.Generator, device="cpu"):
    """A (negative, -exp(A_log)), D, dt_bias [H] in fp32."""
    a = -torch.exp(torch.rand(h, generator=gen) * 1.5 - 1.0)     # [-1.6, -0.37]
    d = torch.randn(h, generator=gen)
    bias = torch.randn(h, generator=gen) * 0.5
    return a.to(device), d.to(device), bias.to(device)


def _inputs(lens, h, g, p, n, dtype, gen, device="cpu"):
    """x [T, H, P], dt [T, H] (fp32, before bias / softplus), B, C [T, G, N], cu_seqlens."""
    total = sum(lens)
    x = torch.randn(total, h, p, generator=gen)
    dt = torch.randn(total, h, generator=gen) - 1.0
    b = torch.randn(total, g, n, generator=gen)
    c = torch.randn(total, g, n, generator=gen) * n ** -0.5
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()],
                      dtype=torch.int32)
    return (x.to(dtype).to(device), dt.to(device), b.to(dtype).to(device),
            c.to(dtype).to(device), cu.to(device))


# ---------------------------------------------------------------- against transformers
VARIANTS = {   # D, dt_bias, dt_softplus, dt_limit
    "granite": (True, True, True, (0.0, INF)),
    "limit": (True, False, True, (0.2, 0.5)),
    "raw_dt": (False, True, False, (0.0, INF)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("initial", [False, True], ids=["zeros", "initial"])
def test_matches_transformers_chunk_scan(backend, device, variant, initial):
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
        mamba2_chunk_scan,
    )
    gen = _gen(0)
    b, length, h, g, p, n = 3, 7, 4, 2, 6, 5
    with_d, with_bias, softplus, limit = VARIANTS[variant]
    x, dt, bm, cm, cu = _inputs([length] * b, h, g, p, n, torch.float32, gen)
    a, d, bias = _params(h, gen)
    d, bias = (d if with_d else None), (bias if with_bias else None)
    h0 = torch.randn(b, h, p, n, generator=gen) if initial else None
    batch = [t.view(b, length, *t.shape[1:]) for t in (x, dt, bm, cm)]
    want_y, want_s = mamba2_chunk_scan(
        batch[0], batch[1], a, batch[2], batch[3], chunk_size=4, D=d, dt_bias=bias,
        initial_states=h0, dt_softplus=softplus, dt_limit=limit, return_final_states=True)

    pool = torch.full((b + 2, h, p, n), float("nan"), device=device)
    slots = torch.tensor([3, 0, 1], device=device)
    if initial:
        pool[slots] = h0.to(device)
    dev = lambda t: None if t is None else t.to(device)     # noqa: E731
    with mk.use_backend(backend):
        y = mk.ops.mamba2_scan(
            *(t.to(device) for t in (x, dt, a, bm, cm)), cu_seqlens=cu.to(device), D=dev(d),
            dt_bias=dev(bias), dt_softplus=softplus, dt_limit=limit, state=pool,
            state_indices=slots, max_seqlen=length,
            has_initial_state=None if initial else torch.zeros(b, dtype=torch.bool,
                                                               device=device))
    assert_close(y.cpu().view(b, length, h, p), want_y, scale=10)
    assert_close(pool[slots].cpu(), want_s, scale=10)
    assert torch.isnan(pool[[2, 4]]).all()                   # other slots untouched
    if not initial:   # no state at all: zeros in, nothing written
        with mk.use_backend(backend):
            y2 = mk.ops.mamba2_scan(*(t.to(device) for t in (x, dt, a, bm, cm)),
                                    cu_seqlens=cu.to(device), D=dev(d), dt_bias=dev(bias),
                                    dt_softplus=softplus, dt_limit=limit)
        assert_close(y2.cpu().view(b, length, h, p), want_y, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_decode(backend, device):
    """Decode steps (one token per sequence per call, the state in a pool) equal
    transformers' mamba2_selective_state_update on vLLM-style expanded A / dt / D / dt_bias;
    one prefill call over the same tokens gives the same outputs and final states."""
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
        mamba2_selective_state_update,
    )
    gen = _gen(1)
    b, steps, h, g, p, n = 3, 4, 4, 2, 5, 12
    x, dt, bm, cm, _ = _inputs([steps] * b, h, g, p, n, torch.float32, gen)
    a, d, bias = _params(h, gen)
    x, dt, bm, cm = (t.view(b, steps, *t.shape[1:]) for t in (x, dt, bm, cm))
    h0 = torch.randn(b, h, p, n, generator=gen)
    ref_state = h0.clone()
    want = []
    for t in range(steps):
        want.append(mamba2_selective_state_update(
            ref_state, x[:, t], dt[:, t, :, None].expand(b, h, p),
            a[:, None, None].expand(h, p, n), bm[:, t], cm[:, t],
            D=d[:, None].expand(h, p), dt_bias=bias[:, None].expand(h, p), dt_softplus=True))

    slots = torch.tensor([4, 0, 2], device=device)
    pool = torch.full((5, h, p, n), float("nan"), device=device)
    pool[slots] = h0.to(device)
    prefill_pool = pool.clone()
    dev = lambda t: t.to(device)                            # noqa: E731
    with mk.use_backend(backend):
        for t in range(steps):
            y = mk.ops.mamba2_scan(
                dev(x[:, t]), dev(dt[:, t]), dev(a), dev(bm[:, t]), dev(cm[:, t]),
                cu_seqlens=torch.arange(b + 1, dtype=torch.int32, device=device), D=dev(d),
                dt_bias=dev(bias), state=pool, state_indices=slots)
            assert_close(y.cpu(), want[t], scale=2)
        y_all = mk.ops.mamba2_scan(
            *(dev(t.flatten(0, 1)) for t in (x, dt)), dev(a),
            *(dev(t.flatten(0, 1)) for t in (bm, cm)),
            cu_seqlens=torch.arange(0, b * steps + 1, steps, dtype=torch.int32, device=device),
            D=dev(d), dt_bias=dev(bias), state=prefill_pool, state_indices=slots)
    assert_close(pool[slots].cpu(), ref_state, scale=2)
    assert_close(y_all.cpu().view(b, steps, h, p), torch.stack(want, 1), scale=2)
    assert_close(prefill_pool[slots].cpu(), ref_state, scale=2)


# ---------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference(backend, device, data):
    gen = _gen(data.draw(st.integers(0, 2**16)))
    n_seq = data.draw(st.integers(0, 4))
    lens = data.draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 6]), min_size=n_seq,
                              max_size=n_seq))
    if n_seq and data.draw(st.integers(0, 4)) == 0:
        lens[0] = 37                                             # a long prefill
    g = data.draw(st.sampled_from([1, 2]))
    h = g * data.draw(st.sampled_from([1, 2]))
    p = data.draw(st.sampled_from([1, 5, 12, 40]))
    n = data.draw(st.sampled_from([1, 5, 12, 40]))
    dtype = data.draw(st.sampled_from(DTYPES))
    x, dt, bm, cm, cu = _inputs(lens, h, g, p, n, dtype, gen, device=device)
    a, d, bias = _params(h, gen, device)
    if data.draw(st.booleans()):                               # dt in x's dtype
        dt = dt.to(dtype)
    if data.draw(st.booleans()):                               # A / D / dt_bias in x's dtype
        a, d, bias = a.to(dtype), d.to(dtype), bias.to(dtype)
    d = d if data.draw(st.booleans()) else None
    bias = bias if data.draw(st.booleans()) else None
    softplus = data.draw(st.booleans())
    # no clamp from below only after softplus (a negative d would make S grow)
    limit = data.draw(st.sampled_from([(0.0, INF), (0.05, 0.4)]
                                      + [(-INF, INF)] * softplus))
    cu = cu.to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    with_state = data.draw(st.booleans())
    state = slots = flags = None
    if with_state:
        pool_size = n_seq + 2
        state = torch.randn(pool_size, h, p, n, generator=gen).to(device)
        slots = torch.randperm(pool_size, generator=gen)[:n_seq]
        pad = torch.rand(n_seq, generator=gen) < 0.25           # padding rows
        slots = torch.where(pad, -1, slots).to(
            data.draw(st.sampled_from([torch.int32, torch.int64]))).to(device)
        if data.draw(st.booleans()):
            flags = (torch.rand(n_seq, generator=gen) < 0.6).to(device)
    want_state = None if state is None else state.clone()
    want = reference.mamba2_scan(x, dt, a, bm, cm, cu, D=d, dt_bias=bias,
                                 dt_softplus=softplus, dt_limit=limit, state=want_state,
                                 state_indices=slots, has_initial_state=flags)
    if data.draw(st.booleans()):                               # every argument a view
        x, dt, a, bm, cm, cu = (_strided(t, gen) for t in (x, dt, a, bm, cm, cu))
        d, bias = (None if t is None else _strided(t, gen) for t in (d, bias))
        if with_state:
            state, slots = _strided(state, gen), _strided(slots, gen)
            flags = None if flags is None else _strided(flags, gen)
    with mk.use_backend(backend):
        got = mk.ops.mamba2_scan(x, dt, a, bm, cm, cu_seqlens=cu, D=d, dt_bias=bias,
                                 dt_softplus=softplus, dt_limit=limit, state=state,
                                 state_indices=slots, has_initial_state=flags)
    assert_close(got, want, scale=2)
    if with_state:
        torch.testing.assert_close(state, want_state, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend, device):
    """T = 0: no sequences at all, or only empty ones (which still (re)write their slots:
    the initial state, or zeros where has_initial_state is False)."""
    gen = _gen(2)
    h, g, p, n = 2, 1, 3, 4
    a, d, bias = _params(h, gen, device)
    x, dt, bm, cm, _ = _inputs([], h, g, p, n, torch.bfloat16, gen, device=device)
    pool = torch.randn(3, h, p, n, generator=gen).to(device)
    before = pool.clone()
    with mk.use_backend(backend):
        y0 = mk.ops.mamba2_scan(x, dt, a, bm, cm, D=d,
                                cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device))
        y1 = mk.ops.mamba2_scan(x, dt, a, bm, cm, D=d, dt_bias=bias,
                                cu_seqlens=torch.zeros(3, dtype=torch.int32, device=device),
                                state=pool, state_indices=torch.tensor([2, 0], device=device),
                                has_initial_state=torch.tensor([True, False], device=device))
    assert y0.shape == y1.shape == (0, h, p) and y1.dtype == torch.bfloat16
    assert torch.equal(pool[[1, 2]], before[[1, 2]])
    assert torch.equal(pool[0], torch.zeros_like(pool[0]))


# ---------------------------------------------------------- serving: slots, padding, chunks
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_and_stale_slots(backend, device):
    """-1 rows: zero outputs (even from NaN inputs), slot untouched; has_initial_state
    False: the slot's stale (NaN) contents are ignored and overwritten."""
    gen = _gen(3)
    h, g, p, n = 4, 2, 12, 5
    x, dt, bm, cm, cu = _inputs([3, 2, 1], h, g, p, n, torch.bfloat16, gen, device=device)
    a, d, bias = _params(h, gen, device)
    for t in (x, dt, bm, cm):
        t[3:5] = float("nan")                                    # the padding row
    pool = torch.randn(4, h, p, n, generator=gen).to(device)
    pool[2] = float("nan")                                       # stale, not to be read
    before = pool.clone()
    slots = torch.tensor([2, -1, 0], device=device)
    flags = torch.tensor([False, True, True], device=device)
    kw = dict(D=d, dt_bias=bias)
    with mk.use_backend(backend):
        y = mk.ops.mamba2_scan(x, dt, a, bm, cm, cu_seqlens=cu, state=pool,
                               state_indices=slots, has_initial_state=flags, **kw)
    assert torch.equal(y[3:5], torch.zeros_like(y[3:5]))
    assert torch.equal(pool[[1, 3]], before[[1, 3]])
    zero_start = reference.mamba2_scan(x[:3], dt[:3], a, bm[:3], cm[:3], cu[:2], **kw)
    assert_close(y[:3], zero_start)
    fresh = torch.zeros(1, h, p, n, device=device)
    reference.mamba2_scan(x[:3], dt[:3], a, bm[:3], cm[:3], cu[:2], state=fresh,
                          state_indices=torch.tensor([0], device=device), **kw)
    torch.testing.assert_close(pool[2], fresh[0])
    want_state = before.clone()
    want = reference.mamba2_scan(x[5:], dt[5:], a, bm[5:], cm[5:],
                                 torch.tensor([0, 1], device=device), state=want_state,
                                 state_indices=torch.tensor([0], device=device), **kw)
    assert_close(y[5:], want)
    torch.testing.assert_close(pool[0], want_state[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_round_trip(backend, device, dtype):
    """A sequence run in two calls (the second continuing from its slot, batched with a
    decode row of another sequence) equals running it whole: outputs and final state."""
    gen = _gen(4)
    h, g, p, n = 4, 2, 5, 12
    x, dt, bm, cm, _ = _inputs([9], h, g, p, n, dtype, gen, device=device)
    dx, ddt, dbm, dcm, _ = _inputs([1], h, g, p, n, dtype, gen, device=device)
    a, d, bias = _params(h, gen, device)
    pool = torch.randn(3, h, p, n, generator=gen).to(device)
    whole_pool = pool.clone()
    kw = dict(D=d, dt_bias=bias, dt_limit=(0.0, 1.0))
    idx = lambda *s: torch.tensor(s, device=device)           # noqa: E731
    cat = lambda u, v: torch.cat([u, v])                      # noqa: E731
    with mk.use_backend(backend):
        whole = mk.ops.mamba2_scan(x, dt, a, bm, cm, cu_seqlens=idx(0, 9).int(),
                                   state=whole_pool, state_indices=idx(1),
                                   has_initial_state=idx(False), **kw)
        decode_pool = whole_pool.clone()
        want_decode = mk.ops.mamba2_scan(dx, ddt, a, dbm, dcm, cu_seqlens=idx(0, 1).int(),
                                         state=decode_pool, state_indices=idx(2), **kw)
        first = mk.ops.mamba2_scan(x[:4], dt[:4], a, bm[:4], cm[:4],
                                   cu_seqlens=idx(0, 4).int(), state=pool,
                                   state_indices=idx(1), has_initial_state=idx(False), **kw)
        second = mk.ops.mamba2_scan(cat(dx, x[4:]), cat(ddt, dt[4:]), a, cat(dbm, bm[4:]),
                                    cat(dcm, cm[4:]), cu_seqlens=idx(0, 1, 6).int(),
                                    state=pool, state_indices=idx(2, 1),
                                    has_initial_state=idx(True, True), **kw)
    assert_close(torch.cat([first, second[1:]]), whole, scale=2)
    assert_close(second[:1], want_decode)
    torch.testing.assert_close(pool[1], whole_pool[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pool[2], decode_pool[2], atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------- errors, opcheck
def test_errors():
    gen = _gen(5)
    x, dt, bm, cm, cu = _inputs([2, 1], 4, 2, 3, 5, torch.float32, gen)
    a, d, bias = _params(4, gen)
    pool = torch.zeros(3, 4, 3, 5)
    slots = torch.tensor([0, 2])
    f = mk.ops.mamba2_scan

    def call(**over):
        kw = dict(x=x, dt=dt, A=a, B=bm, C=cm, cu_seqlens=cu, D=d, dt_bias=bias, state=pool,
                  state_indices=slots)
        kw.update(over)
        args = [kw.pop(name) for name in ("x", "dt", "A", "B", "C")]
        return f(*args, **kw)

    call()
    meta = {k: t.to("meta") for k, t in dict(x=x, dt=dt, A=a, B=bm, C=cm, cu_seqlens=cu, D=d,
                                                 dt_bias=bias).items()}
    cases = [
        (TypeError, "x must be a torch.Tensor", dict(x=[1.0])),
        (TypeError, "x must have dtype", dict(x=x.int())),
        (ValueError, "x must be 3-D", dict(x=x[0])),
        (ValueError, "x must have H >= 1 heads and head dim P >= 1", dict(x=x[:, :, :0])),
        (TypeError, "dt must have dtype", dict(x=x.half(), B=bm.half(), C=cm.half(),
                                               dt=dt.bfloat16())),
        (ValueError, r"dt must have shape \[T = 3, H = 4\]", dict(dt=dt[:, :2])),
        (ValueError, "dt must be 2-D", dict(dt=dt[..., None])),
        (TypeError, "A must have dtype", dict(A=a.long())),
        (ValueError, r"A must have shape \[H = 4\]", dict(A=a[:3])),
        (TypeError, "B must have dtype", dict(B=bm.half())),
        (TypeError, "C must have dtype", dict(C=cm.double())),
        (ValueError, "B must be 3-D", dict(B=bm[0])),
        (ValueError, "B must have T = 3 rows", dict(B=bm[:2], C=cm[:2])),
        (ValueError, r"B's groups \(G = 3\) must divide x's heads \(H = 4\)",
         dict(B=torch.zeros(3, 3, 5), C=torch.zeros(3, 3, 5))),
        (ValueError, "B's state size N", dict(B=torch.zeros(3, 2, 257),
                                              C=torch.zeros(3, 2, 257), state=None,
                                              state_indices=None)),
        (ValueError, "C must have the shape of B", dict(C=cm[:, :1])),
        (ValueError, r"D must have shape \[H = 4\]", dict(D=d[:2])),
        (TypeError, "dt_bias must have dtype", dict(dt_bias=bias.long())),
        (TypeError, "dt_bias must be a torch.Tensor", dict(dt_bias=0.5)),
        (TypeError, "dt_softplus must be a bool", dict(dt_softplus=1)),
        (TypeError, r"dt_limit must be a \(min, max\) pair", dict(dt_limit=0.5)),
        (TypeError, r"dt_limit\[1\] must be a number", dict(dt_limit=(0.0, "inf"))),
        (ValueError, r"dt_limit\[0\] must not be NaN", dict(dt_limit=(float("nan"), 1.0))),
        (ValueError, "dt_limit must have min <= max", dict(dt_limit=(1.0, 0.5))),
        (TypeError, "cu_seqlens must have dtype", dict(cu_seqlens=cu.float())),
        (ValueError, "cu_seqlens must be 1-D", dict(cu_seqlens=cu[None])),
        (ValueError, "cu_seqlens must have N", dict(cu_seqlens=cu[:0])),
        (ValueError, r"cu_seqlens\[0\] must be 0", dict(cu_seqlens=torch.tensor(
            [1, 2, 3], dtype=torch.int32))),
        (ValueError, "cu_seqlens must be non-decreasing", dict(cu_seqlens=torch.tensor(
            [0, 3, 2, 3], dtype=torch.int32), state_indices=torch.tensor([0, 1, 2]))),
        (ValueError, r"cu_seqlens\[-1\] \(2\) must equal", dict(cu_seqlens=torch.tensor(
            [0, 1, 2], dtype=torch.int32))),
        (TypeError, "state must have dtype", dict(state=pool.half())),
        (ValueError, r"state must have shape \[S, H = 4, P = 3, N = 5\]",
         dict(state=pool[:, :, :2])),
        (ValueError, "state_indices is required", dict(state_indices=None)),
        (ValueError, "state_indices needs state", dict(state=None)),
        (ValueError, "has_initial_state needs state", dict(
            state=None, state_indices=None, has_initial_state=torch.tensor([True, True]))),
        (TypeError, "state_indices must have dtype", dict(state_indices=slots.float())),
        (ValueError, r"state_indices must have shape \[N = 2\]",
         dict(state_indices=slots[:1])),
        (ValueError, r"state_indices values must be -1 \(padding\) or in \[0, 3\)",
         dict(state_indices=torch.tensor([0, 3]))),
        (ValueError, "state_indices values must be", dict(state_indices=torch.tensor([-2, 0]))),
        (ValueError, "state_indices must be distinct", dict(state_indices=torch.tensor([1, 1]))),
        (TypeError, "has_initial_state must have dtype", dict(
            has_initial_state=torch.tensor([1, 0]))),
        (ValueError, r"has_initial_state must have shape \[N = 2\]", dict(
            has_initial_state=torch.tensor([True]))),
        (TypeError, "max_seqlen must be an int", dict(max_seqlen=2.0)),
        (ValueError, "max_seqlen must be >= 0", dict(max_seqlen=-1)),
        (ValueError, r"max_seqlen \(1\) is below a sequence length \(2\)", dict(max_seqlen=1)),
        (ValueError, "state must be on meta", meta),
        (ValueError, "D must be on meta", dict(meta, D=d, state=None, state_indices=None)),
    ]
    for exc, msg, over in cases:
        with pytest.raises(exc, match=msg):
            call(**over)
    call(state_indices=torch.tensor([-1, -1]))                   # repeated padding is fine
    call(state=None, state_indices=None, D=None, dt_bias=None, dt_limit=[0.0, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    gen = _gen(6)
    x, dt, bm, cm, cu = _inputs([3, 0, 2], 4, 2, 5, 6, torch.bfloat16, gen, device=device)
    a, d, bias = _params(4, gen, device)
    pool = torch.randn(4, 4, 5, 6, generator=gen).to(device)
    op = torch.ops.minikernels.mamba2_scan
    with mk.use_backend(backend):
        torch.library.opcheck(op, (x, dt, a, bm, cm, cu, d, bias, True, 0.0, INF, pool,
                                   torch.tensor([3, -1, 0], device=device),
                                   torch.tensor([True, False, False], device=device)))
        torch.library.opcheck(op, (x, dt.bfloat16(), a, bm, cm, cu, None, None, False, 0.1,
                                   2.0, None, None, None))
