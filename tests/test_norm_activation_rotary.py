"""rms_norm, layer_norm, silu_and_mul, gelu_and_mul and rotary_embedding kernels against the fp32
reference.

On CPU the Triton kernels run under the interpreter; on a GPU the same tests run on cuda
(plus the CUDA C++ rms_norm kernel).
"""
from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends
from helpers import DTYPES, assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference as ref

ROWS = st.sampled_from([0, 1, 2, 3, 7, 16])
HIDDEN = st.sampled_from([1, 8, 33, 64, 100, 128, 257, 1000])
dtypes = st.sampled_from(DTYPES)


# ----------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("backend", kernel_backends())
@given(rows=ROWS, hidden=HIDDEN, dtype=dtypes, with_residual=st.booleans(),
       lead3d=st.booleans(), offset=st.sampled_from([0.0, 1.0, -0.5]),
       seed=st.integers(0, 2**31))
def test_rms_norm_matches_reference(device, backend, rows, hidden, dtype, with_residual,
                                    lead3d, offset, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 2, hidden) if lead3d else (rows, hidden)
    x = torch.randn(shape, generator=g).to(device, dtype)
    # Llama-style weights near 1; Gemma-style (offset 1) weights near 0
    w = (torch.rand(hidden, generator=g) + 0.5 - offset).to(device, dtype)
    r = torch.randn(shape, generator=g).to(device, dtype) if with_residual else None
    with mk.use_backend(backend):
        out = mk.ops.rms_norm(x, w, eps=1e-5, residual=r, weight_offset=offset)
    if r is None:
        assert_close(out, ref.rms_norm(x, w, 1e-5, offset))
    else:
        y_ref, h_ref = ref.fused_add_rms_norm(x, r, w, 1e-5, offset)
        assert_close(out[0], y_ref)
        # the sum is rounded to the activation dtype once, to nearest even (the Triton
        # kernels round so under the interpreter too: interpreter_rounding)
        if backend == "triton":
            assert torch.equal(out[1], h_ref)
        assert_close(out[1], h_ref)


@pytest.mark.parametrize("backend", kernel_backends())
def test_rms_norm_long_rows_and_strided_input(device, backend):
    # rows longer than the single-pass block stream in chunks; x rows strided (a view)
    big = torch.randn(3, 2 * 9000, device=device, dtype=torch.float16)
    x = big[:, :9000]
    assert not x.is_contiguous()
    w = torch.rand(9000, device=device, dtype=torch.float16) + 0.5
    r = torch.randn(3, 9000, device=device, dtype=torch.float16)
    with mk.use_backend(backend):
        y = mk.ops.rms_norm(x, w)
        y2, h = mk.ops.rms_norm(x, w, residual=r)
    assert_close(y, ref.rms_norm(x, w, 1e-6))
    y2_ref, h_ref = ref.fused_add_rms_norm(x, r, w, 1e-6)
    assert_close(y2, y2_ref)
    assert_close(h, h_ref)
    with mk.use_backend(backend):   # the streamed (two-pass) path with Gemma's offset
        yg, hg = mk.ops.gemma_rms_norm(x, w - 1, residual=r)
    assert_close(yg, y2_ref)
    assert_close(hg, h_ref)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemma_rms_norm_matches_transformers(device, backend, dtype):
    """Against transformers' GemmaRMSNorm (fp32 math, x * (1 + w), cast once), with the
    residual form checked against Gemma's decoder-layer add (in the activation dtype)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(3)
    hidden = 96
    norm = GemmaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g) * 0.3)
    norm = norm.to(device, dtype)
    x = (torch.randn(4, 3, hidden, generator=g) * 2).to(device, dtype)
    r = torch.randn(4, 3, hidden, generator=g).to(device, dtype)
    with mk.use_backend(backend), torch.no_grad():
        y = mk.ops.gemma_rms_norm(x, norm.weight, 1e-6)
        y2, h = mk.ops.gemma_rms_norm(x, norm.weight, 1e-6, residual=r)
        want, want_h = norm(x), r + x
        want2 = norm(want_h)
    assert y.dtype == want.dtype == dtype
    assert_close(y, want)
    assert_close(h, want_h)
    assert_close(y2, want2)
    # and it is not the plain norm: (1 + w) vs w differ by x_normed
    assert not torch.allclose(y.float(), mk.ops.rms_norm(x, norm.weight, 1e-6).float(),
                              atol=1e-2)


# ---------------------------------------------------------------------------- layer_norm
@pytest.mark.parametrize("backend", kernel_backends())
@given(rows=ROWS, hidden=HIDDEN, dtype=dtypes, with_residual=st.booleans(),
       with_bias=st.booleans(), lead3d=st.booleans(), shift=st.sampled_from([0.0, 3.0]),
       seed=st.integers(0, 2**31))
def test_layer_norm_matches_reference(device, backend, rows, hidden, dtype, with_residual,
                                      with_bias, lead3d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 2, hidden) if lead3d else (rows, hidden)
    x = (torch.randn(shape, generator=g) + shift).to(device, dtype)   # mean far from 0 too
    w = (torch.rand(hidden, generator=g) + 0.5).to(device, dtype)
    b = torch.randn(hidden, generator=g).to(device, dtype) if with_bias else None
    r = torch.randn(shape, generator=g).to(device, dtype) if with_residual else None
    with mk.use_backend(backend):
        out = mk.ops.layer_norm(x, w, b, eps=1e-5, residual=r)
    if r is None:
        assert_close(out, ref.layer_norm(x, w, b, 1e-5))
    else:
        y_ref, h_ref = ref.fused_add_layer_norm(x, r, w, b, 1e-5)
        assert_close(out[0], y_ref)
        assert torch.equal(out[1], h_ref)     # one rounding, to nearest even


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_matches_torch_long_rows_and_views(device, backend, dtype):
    """Against torch.nn.functional.layer_norm (fp32, then rounded): rows streamed in
    chunks (9000 > the single-pass block), strided views for x, weight, bias and the
    residual, and an output-poisoning check (every element written)."""
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(3, 2 * 9000, generator=g) * 2 + 5).to(device, dtype)
    x = big[:, ::2]                                   # every other column: a strided view
    wb = torch.rand(2, 9000, generator=g).to(device, dtype) + 0.5
    w, b = wb[0], wb[1] - 1.0
    rbig = torch.randn(9000, 3, generator=g).to(device, dtype)
    r = rbig.t()                                      # transposed residual
    want = torch.nn.functional.layer_norm(x.float(), (9000,), w.float(), b.float(),
                                          1e-5).to(dtype)
    with mk.use_backend(backend):
        y = mk.ops.layer_norm(x, w, b, 1e-5)
        y2, h = mk.ops.layer_norm(x, w, b, 1e-5, residual=r)
    assert_close(y, want)
    h_want = (x.float() + r.float()).to(dtype)
    assert_close(h, h_want)
    assert_close(y2, torch.nn.functional.layer_norm(h_want.float(), (9000,), w.float(),
                                                    b.float(), 1e-5).to(dtype))
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    for bad, kw in (("weight", dict(weight=w[:5])), ("bias", dict(bias=b[:5])),
                    ("eps", dict(eps=0.0)), ("residual", dict(residual=r[:, :4]))):
        args = dict(weight=w, bias=b, eps=1e-5, residual=None)
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=bad):
            mk.ops.layer_norm(x, **args)


# -------------------------------------------------------------------------- silu_and_mul
@given(rows=ROWS, inter=HIDDEN, dtype=dtypes, seed=st.integers(0, 2**31))
def test_silu_and_mul_matches_reference(device, rows, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 2 * inter, generator=g)).to(device, dtype)
    with mk.use_backend("triton"):
        y = mk.ops.silu_and_mul(x)
    assert y.shape == (rows, inter)
    assert_close(y, ref.silu_and_mul(x))


def test_silu_and_mul_strided_rows(device):
    big = torch.randn(4, 3, 64, device=device, dtype=torch.bfloat16)
    x = big[:, 1, :]  # rows strided by 192
    with mk.use_backend("triton"):
        assert_close(mk.ops.silu_and_mul(x), ref.silu_and_mul(x))


# -------------------------------------------------------------------------- gelu_and_mul
@given(rows=ROWS, inter=HIDDEN, dtype=dtypes, approximate=st.sampled_from(["none", "tanh"]),
       seed=st.integers(0, 2**31))
def test_gelu_and_mul_matches_reference(device, rows, inter, dtype, approximate, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 2 * inter, generator=g)).to(device, dtype)
    with mk.use_backend("triton"):
        y = mk.ops.gelu_and_mul(x, approximate=approximate)
    assert y.shape == (rows, inter)
    assert_close(y, ref.gelu_and_mul(x, approximate))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gelu_and_mul_matches_torch_and_transformers(backend, device):
    """Against torch's gelu and transformers' activations (GELUActivation, Gemma's
    GELUTanh / gelu_pytorch_tanh), with large |gate| (tanh / erf saturate), a strided row
    view and 3-D input; gelu_tanh_and_mul is the tanh form."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 5, 2, 96, generator=g).float().to(device) * 4
    big[0, 0, 0, :8] = torch.tensor([-30.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 30.0, 80.0])
    x = big[:, :, 0, :]                                   # [3, 5, 96], rows strided
    gate, up = x[..., :48], x[..., 48:]
    from transformers.activations import ACT2FN
    with mk.use_backend(backend):
        exact = mk.ops.gelu_and_mul(x)
        tanh = mk.ops.gelu_tanh_and_mul(x)
    torch.testing.assert_close(exact, torch.nn.functional.gelu(gate) * up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact, ACT2FN["gelu"](gate) * up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tanh, ACT2FN["gelu_pytorch_tanh"](gate) * up, rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(exact, tanh, rtol=0, atol=0)   # the two forms differ


# ---------------------------------------------------------------------------------- rotary
HEAD_DIMS = st.sampled_from([(16, 16), (64, 64), (64, 32), (80, 80), (96, 64), (128, 128),
                             (256, 256)])


STYLES = pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "gptj"])


def _check_triton_rotary(q, k, pos, cache, is_neox_style):
    with mk.use_backend("triton"):
        qo, ko = mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=is_neox_style)
    rq, rk = ref.rotary_embedding(q, k, pos, cache, is_neox_style)
    assert_close(qo, rq)
    assert_close(ko, rk)


def _rotary_inputs(device, tokens, hq, hkv, d, rot, dtype, pos_dtype, seed, max_pos=4096):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, hq, d, generator=g).to(device, dtype)
    k = torch.randn(tokens, hkv, d, generator=g).to(device, dtype)
    cache = mk.ops.build_rope_cache(rot, max_pos, base=10000.0).to(device)
    pos = torch.randint(0, max_pos, (tokens,), generator=g).to(device, pos_dtype)
    return q, k, pos, cache


@STYLES
@given(tokens=st.sampled_from([0, 1, 3, 17]), heads=st.sampled_from([(1, 1), (4, 2), (8, 1),
                                                                     (20, 4)]),
       dims=HEAD_DIMS, dtype=dtypes, pos_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 2**31))
def test_rotary_matches_reference(device, is_neox_style, tokens, heads, dims, dtype, pos_dtype,
                                  seed):
    (hq, hkv), (d, rot) = heads, dims
    q, k, pos, cache = _rotary_inputs(device, tokens, hq, hkv, d, rot, dtype, pos_dtype, seed)
    _check_triton_rotary(q, k, pos, cache, is_neox_style)


@STYLES
@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(64, 64), (96, 32)], ids=["full", "partial"])
def test_rotary_edge_shapes(device, is_neox_style, tokens, dtype, dims):
    # every style x dtype on empty / single / odd token counts, full and partial rotary;
    # int32 positions on odd counts, int64 otherwise
    d, rot = dims
    pos_dtype = torch.int32 if tokens % 2 else torch.int64
    q, k, pos, cache = _rotary_inputs(device, tokens, 5, 3, d, rot, dtype, pos_dtype, tokens)
    with mk.use_backend("triton"):
        qo, ko = mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=is_neox_style)
    assert qo.shape == q.shape and ko.shape == k.shape
    rq, rk = ref.rotary_embedding(q, k, pos, cache, is_neox_style)
    assert_close(qo, rq)
    assert_close(ko, rk)
    # dims past rot_dim are copied bit for bit
    assert torch.equal(qo[..., rot:], q[..., rot:]) and torch.equal(ko[..., rot:], k[..., rot:])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dims", [(32, 32), (48, 16)], ids=["full", "partial"])
def test_rotary_interleaved_is_neox_on_deinterleaved_heads(device, backend, dims):
    # independent formula: GPT-J style == neox style applied to a head whose first rot_dim
    # dims are de-interleaved (evens, then odds), re-interleaved afterwards
    d, rot = dims
    q, k, pos, cache = _rotary_inputs(device, 9, 4, 2, d, rot, torch.float32, torch.int64, 3)
    perm = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2),
                      torch.arange(rot, d)]).to(device)
    inv = torch.argsort(perm)
    with mk.use_backend(backend):
        qo, ko = mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=False)
    nq, nk = ref.rotary_embedding(q[..., perm], k[..., perm], pos, cache, True)
    assert_close(qo, nq[..., inv])
    assert_close(ko, nk[..., inv])


def test_rotary_interleaved_matches_transformers_gptj(device):
    gptj_mod = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    apply_rotary_pos_emb = getattr(gptj_mod, "apply_rotary_pos_emb", None)
    create_sinusoidal_positions = getattr(gptj_mod, "create_sinusoidal_positions", None)
    if apply_rotary_pos_emb is None or create_sinusoidal_positions is None:
        pytest.skip("this transformers' GPT-J lacks apply_rotary_pos_emb or "
                    "create_sinusoidal_positions")
    # GPT-J-6B's shape: head dim 256 of which rotary_dim 64 rotate (q, k [B, T, H, D])
    t, hq, d, rot, max_pos = 6, 4, 256, 64, 2048
    q, k, pos, cache = _rotary_inputs(device, t, hq, hq, d, rot, torch.float32, torch.int64, 1,
                                      max_pos)
    sincos = create_sinusoidal_positions(max_pos, rot).to(device)[pos][None]   # [1, T, rot]
    sin, cos = torch.split(sincos, rot // 2, dim=-1)

    def gptj(x):
        x = x[None]
        rotated = apply_rotary_pos_emb(x[..., :rot], sin, cos)
        return torch.cat([rotated, x[..., rot:]], dim=-1)[0]

    with mk.use_backend("triton"):
        qo, ko = mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=False)
    torch.testing.assert_close(qo, gptj(q), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ko, gptj(k), atol=2e-4, rtol=1e-4)


def test_rotary_embedding_module_style(device):
    layer = mk.nn.RotaryEmbedding(32, 64, device=device, is_neox_style=False)
    assert "is_neox_style=False" in repr(layer)
    q, k, pos, cache = _rotary_inputs(device, 3, 2, 1, 32, 32, torch.float32, torch.int64, 2,
                                      64)
    qo, ko = layer(q, k, pos)
    rq, rk = ref.rotary_embedding(q, k, pos, cache, False)
    assert_close(qo, rq)
    assert_close(ko, rk)
    assert mk.nn.RotaryEmbedding(32, 64).is_neox_style is True
    with pytest.raises(TypeError, match="is_neox_style must be a bool"):
        mk.nn.RotaryEmbedding(32, 64, is_neox_style="gptj")


@STYLES
def test_rotary_on_strided_views_of_fused_qkv(device, is_neox_style):
    # q and k are views into a fused qkv projection output: token stride != heads * D
    t, hq, hkv, d = 5, 4, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device, dtype=torch.float16)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    pos = torch.arange(t, device=device)
    cache = mk.ops.build_rope_cache(d, 64).to(device)
    _check_triton_rotary(q, k, pos, cache, is_neox_style)


@STYLES
def test_rotary_batched_leading_dims(is_neox_style):
    q = torch.randn(2, 3, 4, 16)
    k = torch.randn(2, 3, 2, 16)
    pos = torch.arange(6).view(2, 3)
    cache = mk.ops.build_rope_cache(16, 16)
    qo, ko = mk.ops.rotary_embedding(q, k, pos, cache, is_neox_style=is_neox_style)
    rq, rk = ref.rotary_embedding(q, k, pos, cache, is_neox_style)
    assert qo.shape == q.shape and ko.shape == k.shape
    assert_close(qo, rq)
    assert_close(ko, rk)


def test_rotary_matches_transformers_llama3_scaling():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0,
                                   rope_scaling=scaling, max_position_embeddings=131072)
    rope = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 1000, 9000, 70000]])
    x = torch.randn(1, 6, 64)
    cos, sin = rope(x, pos)
    q = torch.randn(1, 4, 6, 64)
    k = torch.randn(1, 2, 6, 64)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    cache = mk.ops.build_rope_cache(64, 131072, base=500000.0, rope_scaling=scaling)
    qo, ko = mk.ops.rotary_embedding(q[0].transpose(0, 1), k[0].transpose(0, 1), pos[0], cache)
    torch.testing.assert_close(qo, q_hf[0].transpose(0, 1), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ko, k_hf[0].transpose(0, 1), atol=2e-4, rtol=1e-4)


def test_build_rope_cache_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="rope_scaling"):
        mk.ops.build_rope_cache(64, 128, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    with pytest.raises(ValueError, match="rotary_dim"):
        mk.ops.build_rope_cache(63, 128)


@pytest.mark.parametrize(("proportion", "factor"), [(0.5, 1.0), (0.25, 2.0), (1.0, 1.0)])
def test_proportional_rope_cache_matches_transformers(proportion, factor):
    """Gemma 4 / LFM3's proportional rope: the first share of the frequency pairs at the
    full head dim's frequencies (divided by factor), the rest standing still; the cache
    equals transformers' inv_freq applied over the whole head dim."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Lfm3Config(
        hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=300,
        rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": proportion,
                                            "factor": factor},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    inv, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, "cpu", layer_type="full_attention")
    cache = mk.ops.build_rope_cache(32, 300, 1e6, {"rope_type": "proportional", "factor": factor,
                                                   "partial_rotary_factor": proportion})
    freqs = torch.outer(torch.arange(300, dtype=torch.float32), inv)
    assert (cache - torch.cat([freqs.cos(), freqs.sin()], dim=-1)).abs().max() <= 1e-6
    still = 16 - int(proportion * 32 // 2)
    if still:
        assert (cache[:, 16 - still:16] == 1).all() and (cache[:, 32 - still:] == 0).all()
