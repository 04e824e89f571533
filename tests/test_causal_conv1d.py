"""causal_conv1d (Mamba / LFM2 / Qwen3.5 GDN short conv over varlen sequences with a state
pool): the reference against an independent per-sequence F.conv1d over (state ++ x), the
Triton kernel against the reference over random batches (odd D, W 2..8, empty / length-1 /
long sequences, T = 0, padding rows, fresh slots, every tensor argument a view with its own
strides, poisoned outputs), chunked prefill and token-by-token decode equal to one whole
run, errors, opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA
from helpers import DTYPES, assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

KERNEL_BACKENDS = ["triton"]           # no CUDA C++ kernel for this op


def _view(t: torch.Tensor, gen: torch.Generator, permute: bool) -> torch.Tensor:
    """t's values as a view into a larger tensor (every dim padded and offset by one, the
    last dim stepped by 2, the first two dims' storage order swapped when permute)."""
    shape = list(t.shape)
    big_shape = [s + 3 for s in shape[:-1]] + [2 * shape[-1] + 3]
    order = list(range(len(shape)))
    if permute and len(shape) >= 2:
        order[0], order[1] = order[1], order[0]
    if t.dtype.is_floating_point:
        big = torch.randn([big_shape[i] for i in order], generator=gen).to(t.dtype)
    else:
        big = torch.randint(-3, 3, [big_shape[i] for i in order], generator=gen).to(t.dtype)
    big = big.to(t.device).permute(*[order.index(i) for i in range(len(shape))])
    idx = [slice(1, 1 + s) for s in shape[:-1]] + [slice(1, 1 + 2 * shape[-1], 2)]
    view = big[tuple(idx)]
    view.copy_(t)
    return view


def _batch(gen: torch.Generator, lens: list[int], dim: int, width: int, dtype: torch.dtype,
           device: str, *, state: bool = True, slots_extra: int = 2, pad_rows: int = 0,
           fresh: float = 0.3, state_dtype: torch.dtype | None = None) -> dict:
    """Random op arguments: x [T, D], weight [D, W], bias [D], cu_seqlens, a pool of
    N + slots_extra slots with distinct random slots (pad_rows of them -1) and random
    has_initial_state flags."""
    n, total = len(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(),
                      dtype=torch.int32)
    args = dict(x=torch.randn(total, dim, generator=gen).to(dtype),
                weight=(torch.randn(dim, width, generator=gen) / width ** 0.5).to(dtype),
                bias=torch.randn(dim, generator=gen).to(dtype), cu_seqlens=cu)
    if state:
        slots = n + slots_extra
        idx = torch.randperm(slots, generator=gen)[:n]
        idx[torch.randperm(n, generator=gen)[:pad_rows]] = -1
        args.update(conv_state=torch.randn(slots, dim, width - 1, generator=gen).to(
                        state_dtype or dtype),
                    state_indices=idx,
                    has_initial_state=torch.rand(n, generator=gen) >= fresh)
    return {k: v.to(device) for k, v in args.items()}


def _by_conv1d(x, weight, bias, cu_seqlens, conv_state=None, state_indices=None,
               has_initial_state=None, silu=False):
    """Independent spec: per sequence, F.conv1d (groups = D) over concat(init, x_i) in
    fp32. Returns (out fp32 [T, D], {slot: new state fp32 [D, W - 1]})."""
    total, dim = x.shape
    width = weight.shape[1]
    out = torch.zeros(total, dim, dtype=torch.float32)
    states = {}
    cu = cu_seqlens.cpu().tolist()
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        slot = -1 if conv_state is None else int(state_indices[i])
        if conv_state is not None and slot < 0:
            continue                                  # padding row: zeros, no state
        init = torch.zeros(dim, width - 1)
        if slot >= 0 and (has_initial_state is None or bool(has_initial_state[i])):
            init = conv_state[slot].float().cpu()
        xx = torch.cat([init, x[a:b].float().cpu().t()], dim=1)
        if b > a:
            y = F.conv1d(xx[None], weight.float().cpu()[:, None, :],
                         None if bias is None else bias.float().cpu(), groups=dim)[0].t()
            out[a:b] = F.silu(y) if silu else y
        if slot >= 0:
            states[slot] = xx[:, xx.shape[1] - (width - 1):]
    return out, states


def _run(backend: str, args: dict, **kw) -> torch.Tensor:
    a = dict(args)
    with mk.use_backend(backend):
        return mk.ops.causal_conv1d(a.pop("x"), a.pop("weight"), a.pop("bias"), **a, **kw)


_LENS = st.lists(st.one_of(st.integers(0, 3), st.integers(4, 12), st.integers(60, 140)),
                 min_size=0, max_size=4)


@given(data=st.data())
def test_reference_matches_conv1d(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    lens = data.draw(_LENS)
    dim = data.draw(st.sampled_from([1, 5, 33]))
    width = data.draw(st.integers(2, 8))
    dtype = data.draw(st.sampled_from(DTYPES))
    state = data.draw(st.booleans())
    silu = data.draw(st.booleans())
    args = _batch(g, lens, dim, width, dtype, "cpu", state=state,
                  pad_rows=data.draw(st.integers(0, len(lens))) if state else 0)
    if data.draw(st.booleans()):
        args["bias"] = None
    before = args["conv_state"].clone() if state else None
    want, states = _by_conv1d(**{k: (before if k == "conv_state" else v)
                                 for k, v in args.items()}, silu=silu)
    got = reference.causal_conv1d(**args, activation="silu" if silu else None)
    assert_close(got, want.to(dtype))
    if state:
        expect = before.clone()
        for slot, s in states.items():
            expect[slot] = s.to(expect.dtype)
        assert torch.equal(args["conv_state"], expect)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
def test_matches_reference(backend, device, data):
    """Random batches, every tensor argument a view with its own strides (the conv_state
    view is written in place: the buffer around it must stay untouched)."""
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    lens = data.draw(_LENS)
    dim = data.draw(st.sampled_from([3, 37, 130]))
    width = data.draw(st.integers(2, 8))
    dtype = data.draw(st.sampled_from(DTYPES))
    state = data.draw(st.sampled_from([True, True, False]))
    state_dtype = data.draw(st.sampled_from([dtype, torch.float32]))
    args = _batch(g, lens, dim, width, dtype, device, state=state, state_dtype=state_dtype,
                  pad_rows=data.draw(st.integers(0, len(lens))) if state else 0)
    if state and data.draw(st.booleans()):
        args["has_initial_state"] = None
    if data.draw(st.booleans()):
        args["bias"] = None
    if data.draw(st.booleans()):
        args["weight"] = args["weight"].float()
    if state and data.draw(st.booleans()):
        args["state_indices"] = args["state_indices"].long()
    if data.draw(st.booleans()):
        args["cu_seqlens"] = args["cu_seqlens"].long()
    activation = data.draw(st.sampled_from([None, "silu", "swish"]))
    longest = max(lens, default=0)
    max_seqlen = data.draw(st.sampled_from([None, longest, longest + 70]))
    want_state = args["conv_state"].clone() if state else None
    want = reference.causal_conv1d(**{k: (want_state if k == "conv_state" else v)
                                      for k, v in args.items()}, activation=activation)
    views = {k: (None if v is None else _view(v, g, permute=data.draw(st.booleans())))
             for k, v in args.items()}
    if state:
        pool = views["conv_state"]
        buffer = pool._base
        before = buffer.clone()
    got = _run(backend, views, activation=activation, max_seqlen=max_seqlen)
    assert_close(got, want)
    if state:
        assert torch.equal(pool, want_state)
        inside = torch.zeros(buffer.shape, dtype=torch.bool, device=device)
        inside.as_strided(pool.shape, pool.stride(), pool.storage_offset()).fill_(True)
        assert torch.equal(buffer[~inside], before[~inside])     # nothing written around


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padding_rows_and_fresh_slots(backend, device, dtype):
    """Padding rows (-1): zero outputs, no slot touched. has_initial_state False: the
    slot's stale contents (NaN here) are never read, and the slot is rewritten."""
    g = torch.Generator().manual_seed(3)
    lens = [5, 1, 0, 70, 2]
    args = _batch(g, lens, 37, 4, dtype, device, slots_extra=3)
    args["state_indices"] = torch.tensor([4, -1, 0, 7, -1], device=device)
    args["has_initial_state"] = torch.tensor([False, True, False, True, False],
                                             device=device)
    pool = args["conv_state"]
    pool[4] = float("nan")
    pool[0] = float("nan")
    untouched = [s for s in range(pool.shape[0]) if s not in (4, 0, 7)]
    before = pool.clone()
    out = _run(backend, args, activation="silu")
    cu = args["cu_seqlens"].tolist()
    assert not torch.isnan(out).any()
    assert torch.equal(out[cu[1]:cu[2]], torch.zeros_like(out[cu[1]:cu[2]]))
    assert torch.equal(out[cu[4]:cu[5]], torch.zeros_like(out[cu[4]:cu[5]]))
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.equal(pool[0], torch.zeros_like(pool[0]))       # empty + fresh -> zeros
    assert torch.equal(pool[4], args["x"][2:5].t())              # fresh: last 3 inputs
    fresh = _run("reference", {**args, "conv_state": None, "state_indices": None,
                               "has_initial_state": None,
                               "cu_seqlens": args["cu_seqlens"][:2],
                               "x": args["x"][:5]}, activation="silu")
    assert_close(out[:5], fresh)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_and_decode_equal_whole(backend, device, dtype):
    """A sequence run whole equals it run as two prefill chunks, the second continuing
    from the state (has_initial_state True), and then token by token as decode steps
    mixed with another sequence's chunk in one call: outputs and final state."""
    g = torch.Generator().manual_seed(5)
    dim, width = 33, 4
    x = torch.randn(90, dim, generator=g).to(dtype).to(device)
    y = torch.randn(9, dim, generator=g).to(dtype).to(device)
    weight = torch.randn(dim, width, generator=g).to(dtype).to(device)
    bias = torch.randn(dim, generator=g).to(dtype).to(device)
    cu1 = lambda *lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],  # noqa: E731
                                     dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        whole_state = torch.randn(2, dim, width - 1, generator=g).to(dtype).to(device)
        init = whole_state.clone()
        whole = mk.ops.causal_conv1d(x, weight, bias, cu_seqlens=cu1(90),
                                     conv_state=whole_state,
                                     state_indices=torch.tensor([1], device=device),
                                     activation="silu")
        pool = init.clone()
        parts = [mk.ops.causal_conv1d(x[:70], weight, bias, cu_seqlens=cu1(70),
                                      conv_state=pool,
                                      state_indices=torch.tensor([1], device=device),
                                      activation="silu")]
        # chunk 2 (2 tokens, shorter than W - 1) next to another sequence's first chunk
        out = mk.ops.causal_conv1d(torch.cat([y, x[70:72]]), weight, bias,
                                   cu_seqlens=cu1(9, 2), conv_state=pool,
                                   state_indices=torch.tensor([0, 1], device=device),
                                   has_initial_state=torch.tensor([False, True],
                                                                  device=device),
                                   activation="silu")
        parts.append(out[9:])
        for t in range(72, 90):                     # decode, with a padding row beside it
            out = mk.ops.causal_conv1d(x[t:t + 1], weight, bias, cu_seqlens=cu1(1, 0),
                                       conv_state=pool,
                                       state_indices=torch.tensor([1, -1], device=device),
                                       activation="silu", max_seqlen=1)
            parts.append(out)
    # (not bitwise even on the reference: CPU sigmoid differs in vectorized loop tails)
    assert_close(torch.cat(parts), whole)
    assert torch.equal(pool[1], whole_state[1])
    assert torch.equal(pool[0], y[-(width - 1):].t())


def test_errors(device):
    x = torch.zeros(5, 6, device=device)
    w = torch.zeros(6, 4, device=device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    pool = torch.zeros(3, 6, 3, device=device)
    idx = torch.tensor([0, 2], device=device)
    f = mk.ops.causal_conv1d

    def call(**kw):
        a = dict(x=x, weight=w, bias=None, cu_seqlens=cu, conv_state=pool, state_indices=idx)
        a.update(kw)
        return f(a.pop("x"), a.pop("weight"), a.pop("bias"), **a)

    cases = [
        (TypeError, "x must have dtype", dict(x=x.long())),
        (ValueError, "x must be 2-D", dict(x=x[0])),
        (TypeError, "x must be a torch.Tensor", dict(x=[[0.0]])),
        (TypeError, "weight must have dtype", dict(x=x.half(), weight=w.bfloat16())),
        (ValueError, r"weight must have shape \[D = 6", dict(weight=w[:5])),
        (ValueError, "weight's width W", dict(weight=torch.zeros(6, 9, device=device),
                                              conv_state=None, state_indices=None)),
        (ValueError, "weight's width W", dict(weight=w[:, :1], conv_state=None,
                                              state_indices=None)),
        (ValueError, "bias must have shape", dict(bias=torch.zeros(5, device=device))),
        (TypeError, "bias must have dtype", dict(bias=torch.zeros(6, device=device).long())),
        (TypeError, "cu_seqlens must have dtype", dict(cu_seqlens=cu.float())),
        (ValueError, "cu_seqlens must be 1-D", dict(cu_seqlens=cu[None])),
        (ValueError, "cu_seqlens must have N", dict(cu_seqlens=cu[:0])),
        (ValueError, r"cu_seqlens\[-1\] \(4\) must equal",
         dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32, device=device))),
        (ValueError, r"cu_seqlens\[0\] must be 0",
         dict(cu_seqlens=torch.tensor([1, 2, 5], dtype=torch.int32, device=device))),
        (ValueError, "cu_seqlens must be non-decreasing",
         dict(cu_seqlens=torch.tensor([0, 6, 5], dtype=torch.int32, device=device))),
        (ValueError, "activation must be None or 'silu'", dict(activation="gelu")),
        (ValueError, "activation must be None or 'silu'", dict(activation=True)),
        (ValueError, r"conv_state must have shape \[S, D = 6, W - 1 = 3\]",
         dict(conv_state=pool[:, :, :2])),
        (ValueError, "conv_state must be 3-D", dict(conv_state=pool[0])),
        (TypeError, "conv_state must have dtype", dict(conv_state=pool.half())),
        (ValueError, "state_indices is required with conv_state", dict(state_indices=None)),
        (ValueError, "state_indices needs conv_state", dict(conv_state=None)),
        (ValueError, "has_initial_state needs conv_state",
         dict(conv_state=None, state_indices=None,
              has_initial_state=torch.ones(2, dtype=torch.bool, device=device))),
        (ValueError, r"state_indices must have shape \[N = ",
         dict(state_indices=idx[:1])),
        (TypeError, "state_indices must have dtype", dict(state_indices=idx.float())),
        (ValueError, r"state_indices values must be -1 \(padding\) or in \[0, 3\)",
         dict(state_indices=torch.tensor([0, 3], device=device))),
        (ValueError, r"state_indices values must be -1",
         dict(state_indices=torch.tensor([-2, 1], device=device))),
        (ValueError, "state_indices must be distinct",
         dict(state_indices=torch.tensor([1, 1], device=device))),
        (TypeError, "has_initial_state must have dtype",
         dict(has_initial_state=torch.ones(2, device=device))),
        (ValueError, r"has_initial_state must have shape \[N = ",
         dict(has_initial_state=torch.ones(3, dtype=torch.bool, device=device))),
        (TypeError, "max_seqlen must be an int", dict(max_seqlen=3.0)),
        (ValueError, "max_seqlen must be >= 0", dict(max_seqlen=-1)),
        (ValueError, r"max_seqlen \(2\) is below a sequence length \(3\)",
         dict(max_seqlen=2)),
    ]
    if HAS_CUDA:
        cases.append((ValueError, "weight must be on", dict(weight=w.cpu())))
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    # padding rows may repeat -1; an all-padding batch is fine
    call(state_indices=torch.tensor([-1, -1], device=device))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_opcheck(backend, device):
    g = torch.Generator().manual_seed(7)
    a = _batch(g, [3, 0, 9], 10, 4, torch.float32, device, pad_rows=1)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.causal_conv1d,
                              (a["x"], a["weight"], a["bias"], a["cu_seqlens"],
                               a["conv_state"], a["state_indices"], a["has_initial_state"],
                               True, 9))
        torch.library.opcheck(torch.ops.minikernels.causal_conv1d,
                              (a["x"], a["weight"], None, a["cu_seqlens"], None, None, None,
                               False, 9))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_empty_batches(backend, device):
    """N = 0 (T = 0), and T = 0 with empty sequences: fresh slots are zeroed, the others
    keep their state, padding slots are untouched."""
    g = torch.Generator().manual_seed(11)
    a = _batch(g, [], 7, 3, torch.float16, device)
    before = a["conv_state"].clone()
    assert _run(backend, a).shape == (0, 7)
    assert torch.equal(a["conv_state"], before)
    a = _batch(g, [0, 0, 0], 7, 3, torch.float16, device)
    a["state_indices"] = torch.tensor([3, -1, 1], device=device)
    a["has_initial_state"] = torch.tensor([False, False, True], device=device)
    before = a["conv_state"].clone()
    assert _run(backend, a, activation="silu").shape == (0, 7)
    before[3] = 0
    assert torch.equal(a["conv_state"], before)
    assert _run(backend, {**a, "conv_state": None, "state_indices": None,
                          "has_initial_state": None}).shape == (0, 7)
