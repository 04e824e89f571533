"""``mk.ops.lora_delta`` (each token's LoRA update through its adapter slot) against the
fp32 reference and an independent per-token formula: random shapes (length 1, empty, odd
ranks and sizes, slot -1), every dtype, every tensor argument a strided view, poisoned
outputs, opcheck and bad input."""
from __future__ import annotations

import pytest
import torch
from helpers import examples, DTYPES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", "triton"]


def _inputs(t, k, n, s, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    a = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(s, n, r, generator=g) / max(r, 1) ** 0.5).to(dtype)
    slots = torch.randint(-1, s, (t,), generator=g)
    scaling = torch.rand(s, generator=g) * 2 + 0.25
    return [v.to(device) for v in (x, a, b, slots, scaling)]


def _by_hand(x, a, b, slots, scaling):
    """Independent formula: one token at a time, fp64."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            h = a[s].double().cpu() @ x[i].double().cpu()
            out[i] = scaling[s].double().cpu() * (b[s].double().cpu() @ h)
    return out


@settings(max_examples=examples(25), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), k=st.sampled_from([1, 8, 130]),
       n=st.sampled_from([1, 45, 130]), s=st.sampled_from([1, 3]),
       r=st.sampled_from([1, 8, 33]), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, k, n, s, r, dtype, backend, seed, device):
    x, a, b, slots, scaling = _inputs(t, k, n, s, r, dtype, device, seed)
    with mk.use_backend(backend):
        y = mk.ops.lora_delta(x, a, b, slots, scaling)
    want = reference.lora_delta(x, a, b, slots, scaling)
    assert_close(y, want, scale=2.0)
    exact = _by_hand(x, a, b, slots, scaling)
    if t:
        err = (want.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-6)
        assert float(err) <= {torch.float32: 1e-5, torch.float16: 2e-3,
                              torch.bfloat16: 1.6e-2}[dtype]
    assert bool((y[slots < 0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, device):
    x, a, b, slots, scaling = _inputs(6, 40, 24, 3, 9, torch.float32, device, 3)
    want = reference.lora_delta(x, a, b, slots, scaling)
    big_x = torch.randn(9, 2 * 40 + 3, device=device)
    xv = big_x[2:8, 1:81:2]
    xv.copy_(x)
    av = torch.randn(3, 40, 12, device=device).transpose(1, 2)[:, :9, :]   # [S, R, K] permuted
    av.copy_(a)
    bv = torch.randn(4, 24 + 5, 9 + 2, device=device)[1:, 2:26, 1:10]
    bv.copy_(b)
    sv = torch.zeros(12, dtype=slots.dtype, device=device)[::2]
    sv.copy_(slots)
    cv = torch.zeros(7, device=device)[1::2]
    cv.copy_(scaling)
    with mk.use_backend(backend):
        y = mk.ops.lora_delta(xv, av, bv, sv, cv)
    assert_close(y, want)


def test_int32_slots_and_errors(device):
    x, a, b, slots, scaling = _inputs(4, 16, 8, 2, 4, torch.float32, device)
    want = mk.ops.lora_delta(x, a, b, slots, scaling)
    with mk.use_backend("triton"):
        assert_close(mk.ops.lora_delta(x, a, b, slots.int(), scaling), want)
    torch.library.opcheck(torch.ops.minikernels.lora_delta, (x, a, b, slots, scaling))
    for bad, match in [((x, a.half(), b, slots, scaling), "lora_a"),
                       ((x, a[:, :, :8], b, slots, scaling), "lora_a must have shape"),
                       ((x, a, b[:, :, :3], slots, scaling), "lora_b must have shape"),
                       ((x, a, b, slots[:3], scaling), "token_slots"),
                       ((x, a, b, slots, scaling[:1]), "scaling"),
                       ((x, a, b, slots.float(), scaling), "token_slots"),
                       ((x, a, b, torch.full_like(slots, 2), scaling), r"token_slots values"),
                       ((x, a, b, torch.full_like(slots, -2), scaling), r"token_slots values")]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.lora_delta(*bad)


# ---------------------------------------------------------------- the grouped (SGMV) path

@settings(max_examples=examples(10), deadline=None)
@given(t=st.sampled_from([1, 7, 40, 97]), k=st.sampled_from([1, 70, 130]),
       n=st.sampled_from([1, 45, 130]), s=st.sampled_from([1, 2, 5]),
       r=st.sampled_from([1, 8, 16, 33]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 10 ** 6))
def test_grouped_path_matches_reference_and_bgmv(t, k, n, s, r, dtype, seed, device):
    """Both Triton paths forced at every size (the grouped one with tiles of 16 / 32 / 64
    tokens), against the reference and each other; slot -1 rows come out exactly 0."""
    from minikernels.ops.triton import lora as triton_lora
    x, a, b, slots, scaling = _inputs(t, k, n, s, r, dtype, device, seed)
    want = reference.lora_delta(x, a, b, slots, scaling)
    grouped = triton_lora.lora_delta(x, a, b, slots, scaling, grouped=True)
    bgmv = triton_lora.lora_delta(x, a, b, slots, scaling, grouped=False)
    assert_close(grouped, want, scale=2.0)
    assert_close(grouped, bgmv, scale=2.0)
    assert bool((grouped[slots < 0] == 0).all())


@pytest.mark.parametrize("t", [31, 32, 200])
def test_op_picks_the_grouped_path_by_token_count(t, device, monkeypatch):
    from minikernels.ops.triton import lora as triton_lora
    used = []
    real = triton_lora._grouped
    monkeypatch.setattr(triton_lora, "_grouped", lambda *a: used.append(1) or real(*a))
    x, a, b, slots, scaling = _inputs(t, 48, 40, 3, 8, torch.float16, device, t)
    with mk.use_backend("triton"):
        y = mk.ops.lora_delta(x, a, b, slots, scaling)
    assert bool(used) == (t >= triton_lora.GROUPED_MIN_TOKENS)
    assert_close(y, reference.lora_delta(x, a, b, slots, scaling), scale=2.0)


@pytest.mark.parametrize("slot_pattern", ["one adapter", "none", "runs", "interleaved"])
def test_grouped_path_slot_layouts(slot_pattern, device):
    """Segments as a prefill batch makes them (one adapter, no adapter at all, contiguous
    runs per sequence) and the worst case for tiles (every token a different slot)."""
    from minikernels.ops.triton import lora as triton_lora
    t, s = 150, 4
    x, a, b, _, scaling = _inputs(t, 96, 72, s, 16, torch.bfloat16, device, 7)
    slots = {"one adapter": torch.full((t,), 2),
             "none": torch.full((t,), -1),
             "runs": torch.repeat_interleave(torch.tensor([1, -1, 3, 0, 1]),
                                             torch.tensor([60, 10, 40, 1, 39])),
             "interleaved": torch.arange(t) % (s + 1) - 1}[slot_pattern].to(device)
    y = triton_lora.lora_delta(x, a, b, slots, scaling, grouped=True)
    assert_close(y, reference.lora_delta(x, a, b, slots, scaling), scale=2.0)
    assert bool((y[slots < 0] == 0).all())


def test_grouped_path_strided_views(device):
    from minikernels.ops.triton import lora as triton_lora
    t = 70
    x, a, b, slots, scaling = _inputs(t, 40, 24, 3, 9, torch.float32, device, 5)
    want = reference.lora_delta(x, a, b, slots, scaling)
    xv = torch.randn(t + 3, 2 * 40 + 3, device=device)[2:t + 2, 1:81:2]
    xv.copy_(x)
    av = torch.randn(3, 40, 12, device=device).transpose(1, 2)[:, :9, :]
    av.copy_(a)
    bv = torch.randn(4, 24 + 5, 9 + 2, device=device)[1:, 2:26, 1:10]
    bv.copy_(b)
    sv = torch.zeros(2 * t, dtype=slots.dtype, device=device)[::2]
    sv.copy_(slots)
    cv = torch.zeros(7, device=device)[1::2]
    cv.copy_(scaling)
    y = triton_lora.lora_delta(xv, av, bv, sv, cv, grouped=True)
    assert_close(y, want)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("rep", [1, 3, 8])
def test_repeated_x_rows(grouped, rep, device):
    """x_rep: output row i reads x[i // rep] (a MoE layer's (token, expert) pairs through
    per-pair slots) == the op on x.repeat_interleave(rep) (a gathered copy)."""
    from minikernels.ops.triton import lora as triton_lora
    x, a, b, _, scaling = _inputs(11, 70, 45, 5, 9, torch.float16, device, rep)
    slots = torch.randint(-1, 5, (11 * rep,), generator=torch.Generator().manual_seed(rep))
    slots = slots.to(device)
    xv = torch.randn(11, 150, device=device, dtype=x.dtype)[:, 3:143:2]   # strided rows
    xv.copy_(x)
    y = triton_lora.lora_delta(xv, a, b, slots, scaling, grouped=grouped, x_rep=rep)
    want = reference.lora_delta(x.repeat_interleave(rep, 0), a, b, slots, scaling)
    assert_close(y, want, scale=2.0)
