"""Per-head q / k RMSNorm fused with rotary embedding (ops.qk_norm_rope; vLLM's
fused_qk_norm_rope): the Triton kernel against the fp32 reference over random shapes,
dtypes, rotary styles, partial rotary, weights (none, fp32, Gemma's offset) and strided
views of every tensor argument (bit for bit on inputs whose sums of squares are exact;
within an ulp otherwise); the op equals rms_norm then rotary_embedding; opcheck; errors."""
from __future__ import annotations

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-22}


def grid_values(shape, dtype, gen):
    """Multiples of 1/4 in [-3, 3]: their sums of squares are exact in fp32 in any order,
    so the kernel's reduction order cannot move a bit."""
    return (torch.randint(-12, 13, shape, generator=gen) / 4).to(dtype)


def qk_views(q: torch.Tensor, k: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] as views: "qkv" (columns of one fused projection, NaN
    around them), "heads" (a head stride past D, per-token padding); or as given."""
    if mode == "plain":
        return q, k
    t, hq, d = q.shape
    hk = k.shape[1]
    nan = float("nan")
    if mode == "qkv":
        buf = torch.full((t, 3 + (hq + 2 * hk) * d), nan, dtype=q.dtype, device=q.device)
        qv = buf[:, 3:3 + hq * d].view(t, hq, d)
        kv = buf[:, 3 + hq * d:3 + (hq + hk) * d].view(t, hk, d)
    else:
        qv = torch.full((t, hq + 1, d + 5), nan, dtype=q.dtype, device=q.device)[:, 1:, 2:2 + d]
        kv = torch.full((t + 1, hk, d + 3), nan, dtype=k.dtype, device=k.device)[1:, :, :d]
    qv.copy_(q)
    kv.copy_(k)
    return qv, kv


def strided_1d(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    fill = torch.full((2 * t.shape[0] + 1,), -7 if not t.is_floating_point() else float("nan"),
                      dtype=t.dtype, device=t.device)
    view = fill[1::2]
    view.copy_(t)
    return view


def run(backend, *args, **kw):
    with mk.use_backend(backend):
        return mk.ops.qk_norm_rope(*args, **kw)


@settings(max_examples=examples(30), deadline=None)
@given(tokens=st.sampled_from([0, 1, 3, 7]), hq=st.sampled_from([1, 3, 4, 8]),
       hk=st.sampled_from([1, 2, 3]), dims=st.sampled_from([(16, 16), (16, 8), (20, 12),
                                                             (18, 18), (64, 64), (128, 64),
                                                             (6, 2)]),
       dtype=st.sampled_from(DTYPES), neox=st.booleans(),
       weights=st.sampled_from(["dtype", "fp32", "none", "q_only"]),
       offset=st.sampled_from([0.0, 1.0]), view=st.sampled_from(["plain", "qkv", "heads"]),
       strided_args=st.booleans(), pos_dtype=st.sampled_from([torch.int32, torch.int64]),
       exact=st.booleans(), vllm_rounding=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference(device, tokens, hq, hk, dims, dtype, neox, weights, offset, view,
                           strided_args, pos_dtype, exact, vllm_rounding, seed):
    gen = torch.Generator().manual_seed(seed)
    d, rot = dims
    if exact:
        q, k = grid_values((tokens, hq, d), dtype, gen), grid_values((tokens, hk, d), dtype, gen)
    else:
        q = (torch.randn(tokens, hq, d, generator=gen) * 3).to(dtype)
        k = (torch.randn(tokens, hk, d, generator=gen) * 3).to(dtype)
    wd = torch.float32 if weights == "fp32" else dtype
    qw = None if weights == "none" else (torch.rand(d, generator=gen) + 0.5).to(wd)
    kw = None if weights in ("none", "q_only") else (torch.rand(d, generator=gen) + 0.5).to(wd)
    cache = mk.ops.build_rope_cache(rot, 40, base=100.0)
    pos = torch.randint(0, 40, (tokens,), generator=gen).to(pos_dtype)
    want = run("reference", q, k, qw, kw, pos, cache, 1e-5, neox, offset, vllm_rounding)
    qd, kd = qk_views(q.to(device), k.to(device), view)
    dev = [t.to(device) if t is not None else None for t in (qw, kw, pos)]
    if strided_args:
        dev = [strided_1d(t) for t in dev]
    got = run("triton", qd, kd, dev[0], dev[1], dev[2], cache.to(device), 1e-5, neox, offset,
              vllm_rounding)
    for g, w in zip(got, want):
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        if exact or dtype != torch.float32:
            # half outputs: the normalized value rounds to the dtype before the rotation,
            # so an fp32 ulp of the kernel's sum rarely moves a bit (exact inputs: never)
            if exact:
                assert torch.equal(g, w), (g - w).abs().max()
            else:
                torch.testing.assert_close(g, w, rtol=2 * ULP[dtype], atol=2 * ULP[dtype])
        else:
            torch.testing.assert_close(g, w, rtol=8 * ULP[dtype], atol=8 * ULP[dtype])


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_equals_norm_then_rotary(neox, offset):
    """The op (reference backend) is rms_norm of each head, then rotary_embedding."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 4, 32, generator=gen).bfloat16()
    k = torch.randn(6, 2, 32, generator=gen).bfloat16()
    qw, kw = torch.rand(32, generator=gen).bfloat16(), torch.rand(32, generator=gen).bfloat16()
    cache = mk.ops.build_rope_cache(16, 64)
    pos = torch.tensor([0, 5, 9, 63, 1, 2])
    got = mk.ops.qk_norm_rope(q, k, qw, kw, pos, cache, 1e-6, neox, offset)
    want = mk.ops.rotary_embedding(mk.ops.rms_norm(q, qw, 1e-6, weight_offset=offset),
                                   mk.ops.rms_norm(k, kw, 1e-6, weight_offset=offset), pos,
                                   cache, is_neox_style=neox)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_leading_dims_and_long_heads(device):
    """[B, S, H, D] inputs (positions [B, S]) and a 256-wide head (Gemma 3), with the
    kernel tiling fewer heads per program."""
    gen = torch.Generator().manual_seed(1)
    q = grid_values((2, 3, 5, 256), torch.bfloat16, gen)
    k = grid_values((2, 3, 1, 256), torch.bfloat16, gen)
    w = torch.rand(256, generator=gen).bfloat16()
    cache = mk.ops.build_rope_cache(256, 16)
    pos = torch.randint(0, 16, (2, 3), generator=gen)
    want = reference.qk_norm_rope(q, k, w, w, pos, cache, 1e-6, True, 1.0)
    got = run("triton", q.to(device), k.to(device), w.to(device), w.to(device), pos.to(device),
              cache.to(device), 1e-6, True, 1.0)
    assert got[0].shape == (2, 3, 5, 256) and got[1].shape == (2, 3, 1, 256)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_opcheck(device):
    q = torch.randn(3, 4, 16, device=device, dtype=torch.bfloat16)
    k = torch.randn(3, 2, 16, device=device, dtype=torch.bfloat16)
    w = torch.rand(16, device=device, dtype=torch.bfloat16)
    cache = mk.ops.build_rope_cache(16, 8).to(device)
    pos = torch.tensor([0, 3, 7], device=device)
    op = torch.ops.minikernels.qk_norm_rope
    torch.library.opcheck(op, (q, k, w, w, pos, cache, 1e-6, True, 0.0, False))
    torch.library.opcheck(op, (q, k, None, None, pos, cache, 1e-6, False, 1.0, True))


def test_bad_inputs():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    w = torch.ones(16)
    cache = mk.ops.build_rope_cache(16, 8)
    pos = torch.tensor([0, 1, 2])
    f = mk.ops.qk_norm_rope
    with pytest.raises(ValueError, match="k must have shape"):
        f(q, torch.randn(3, 2, 8), w, w, pos, cache)
    with pytest.raises(TypeError, match="k"):
        f(q, k.half(), w, w, pos, cache)
    with pytest.raises(ValueError, match="q_weight"):
        f(q, k, torch.ones(8), w, pos, cache)
    with pytest.raises(ValueError, match="k_weight"):
        f(q, k, w, torch.ones(2, 16), pos, cache)
    with pytest.raises(ValueError, match="positions"):
        f(q, k, w, w, pos[:2], cache)
    with pytest.raises(ValueError, match="positions"):
        f(q, k, w, w, torch.tensor([0, 1, 8]), cache)
    with pytest.raises(ValueError, match="rot_dim"):
        f(q, k, w, w, pos, mk.ops.build_rope_cache(32, 8))
    with pytest.raises(ValueError, match="eps"):
        f(q, k, w, w, pos, cache, eps=0.0)
    with pytest.raises(ValueError, match="weight_offset"):
        f(q, k, w, w, pos, cache, weight_offset=float("inf"))
    with pytest.raises(TypeError, match="is_neox_style"):
        f(q, k, w, w, pos, cache, is_neox_style=1)
    with pytest.raises(TypeError, match="vllm_rounding"):
        f(q, k, w, w, pos, cache, vllm_rounding=None)
    with pytest.raises(TypeError, match="q"):
        f(q.to(torch.int32), k, w, w, pos, cache)


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma3"])
def test_models_fuse_qk_norm_and_rope(name):
    """Qwen3 / Gemma 3 layers run their q / k norms and RoPE as one qk_norm_rope launch
    (Gemma's (1 + w) norms too); logits equal the unfused layers' (norms, then rotary)
    bit for bit, on the reference backend and on the Triton kernels (interpreter)."""
    from unittest import mock

    from minikernels.models import AttentionMetadata, load_model
    from minikernels.nn.layers import RotaryEmbedding

    m = load_model(name, dtype="bfloat16", device="cpu")
    ids = torch.arange(1, 20)

    def forward(backend):
        with mk.use_backend(backend):
            return m(ids, AttentionMetadata.for_prompts([12, 7]), None)

    calls = []
    real = mk.ops.qk_norm_rope

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    with mock.patch.object(mk.ops, "qk_norm_rope", counted):
        fused = {b: forward(b) for b in ("reference", "triton")}
    assert len(calls) == 2 * len(m.layers)

    def unfused(self, q, k, positions, q_norm, k_norm):
        return self(q_norm(q.contiguous()), k_norm(k.contiguous()), positions)

    with mock.patch.object(RotaryEmbedding, "norm_and_rotate", unfused):
        for backend, logits in fused.items():
            assert torch.equal(logits, forward(backend)), backend
