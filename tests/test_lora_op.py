"""``mk.ops.lora_delta`` (each token's LoRA update through its adapter slot) against the
fp32 reference and an independent per-token formula: random shapes (length 1, empty, odd
ranks and sizes, slot -1), every dtype, every tensor argument a strided view, poisoned
outputs, opcheck and bad input."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_close
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


@settings(max_examples=25, deadline=None)
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
