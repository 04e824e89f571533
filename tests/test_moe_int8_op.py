"""``mk.ops.fused_moe_int8`` (fused_moe with INT8 experts and one fp32 scale per output
row, W8A16: vLLM's ``use_int8_w8a16`` layout) against the reference (fused_moe on the
fp32-dequantized experts) and an independent per-token fp64 formula: random shapes (no
tokens, one token, odd H / I, odd expert / token counts, k > E so an expert repeats in a
row), fp16 / bf16 / fp32 x, both backends, every tensor argument a strided view, poisoned
scratch buffers, the kernels' tile dispatch and its AOT specs, opcheck, torch.compile and
bad input; ``activation`` gelu / gelu_tanh (silu: the default) on aligned and masked
tiles, told apart in fp32, and its errors; non-gated experts (``gated=False``: w13
[E, I, H], relu2 and silu) likewise, their row scales per up row. LoRA on the int8
experts: tests/test_moe_lora_op.py."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import (examples, DTYPES, HALF_DTYPES, MOE_ACTIVATIONS, assert_close, moe_by_hand,
                     spy_launches)
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_test_utils import assert_w8a16_dispatch_registered

import minikernels as mk
from minikernels.ops import _alloc, reference

BACKENDS = ["reference", "triton"]
FORMULA_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
GELUS = ["gelu", "gelu_tanh"]


def _int8(e, n, k, g):
    """Random int8 experts over the whole range (-128 included) and positive fp32 row
    scales sized so that W's rows have norm ~1."""
    q = torch.randint(-128, 128, (e, n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(e, n, generator=g) + 0.5) / (64.0 * k ** 0.5)
    return q, s


def _inputs(t, h, inter, e, k, dtype, device, seed=0, ids_dtype=torch.int64, gated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13, s13 = _int8(e, (2 if gated else 1) * inter, h, g)
    w2, s2 = _int8(e, h, inter, g)
    tw = torch.rand(t, k, generator=g) + 0.1            # never 1: a dropped weight shows
    ids = torch.randint(0, e, (t, k), generator=g, dtype=ids_dtype)
    return [v.to(device) for v in (x, w13, s13, w2, s2, tw, ids)]


def _by_hand(x, w13, s13, w2, s2, tw, ids, activation="silu", gated=True):
    """Per (token, slot) in fp64 on experts dequantized here, W[e, n, k] = q[e, n, k] *
    s[e, n] in fp64 (never rounded); the activated intermediate rounded to x.dtype as
    the contract says."""
    w13d = w13.cpu().double() * s13.cpu().double()[:, :, None]
    w2d = w2.cpu().double() * s2.cpu().double()[:, :, None]
    return moe_by_hand(x, w13d, w2d, tw, ids, activation, gated)


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-3))


@settings(max_examples=examples(24), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), h=st.sampled_from([37, 48, 80, 136]),
       inter=st.sampled_from([16, 19, 40, 56]), e=st.sampled_from([1, 3, 5, 8]),
       k=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS), ids_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, h, inter, e, k, dtype, backend, ids_dtype, seed,
                                       device):
    args = _inputs(t, h, inter, e, k, dtype, device, seed, ids_dtype)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8(*args)
    want = reference.fused_moe_int8(*args)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(*args)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


def test_reference_is_fused_moe_on_fp32_dequantized_experts(device):
    """The reference's definition, through public functions: each expert's int8 rows
    times their scales in fp32 (not rounded to x.dtype), then fused_moe's reference
    (fused_moe itself takes weights in x's dtype only)."""
    x, w13, s13, w2, s2, tw, ids = _inputs(7, 80, 40, 3, 2, torch.float16, device, 4)
    w13d = torch.stack([w13[i].float() * s13[i][:, None] for i in range(3)])
    w2d = torch.stack([w2[i].float() * s2[i][:, None] for i in range(3)])
    want = reference.fused_moe(x, w13d, w2d, tw, ids)
    with mk.use_backend("reference"):
        got = mk.ops.fused_moe_int8(x, w13, s13, w2, s2, tw, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(reference.dequantize_int8_experts(w13, s13), w13d,
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    t, h, inter, e, k = 6, 64, 32, 3, 2
    args = _inputs(t, h, inter, e, k, dtype, device, 3)
    x, w13, s13, w2, s2, tw, ids = args
    want = reference.fused_moe_int8(*args)

    def view_of(v, kind):
        if kind == "cols":       # every other column of a wider, offset buffer
            buf = torch.zeros(v.shape[0] + 1, 2 * v.shape[1] + 3, *v.shape[2:],
                              dtype=v.dtype, device=device)
            out = buf[1:, 1:2 * v.shape[1] + 1:2]
        elif kind == "pad":      # padded in every dim, unit inner stride
            buf = torch.zeros(*(s + 2 for s in v.shape), dtype=v.dtype, device=device)
            out = buf[1:-1, 2:, :v.shape[2]] if v.dim() == 3 else buf[1:-1, 2:]
        else:                    # transposed storage: the last dim strided
            out = torch.zeros(*v.shape[:-2], v.shape[-1], v.shape[-2], dtype=v.dtype,
                              device=device).transpose(-1, -2)
        out.copy_(v)
        return out

    views = [view_of(x, "trans"), view_of(w13, "pad"), view_of(s13, "trans"),
             view_of(w2, "trans"), view_of(s2, "cols"), view_of(tw, "cols"),
             view_of(ids, "trans")]
    xr = torch.zeros(t, 2 * h, dtype=dtype, device=device)[:, h:]       # row-strided x
    xr.copy_(x)
    w13p = view_of(w13, "cols")                                         # every other row
    s13p = view_of(s13, "pad")
    w2p = view_of(w2, "pad")                    # aligned rows of a padded buffer
    assert not any(v.is_contiguous() for v in (*views, xr, w13p, s13p, w2p))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8(*views)
        y2 = mk.ops.fused_moe_int8(xr, w13p, s13p, w2p, *views[4:])
    assert_close(y, want, scale=2.0)
    assert_close(y2, want, scale=2.0)


def test_tile_dispatch_and_registered_specs(device):
    """Aligned rows with K a multiple of BLOCK_K take unmasked vector loads (EVEN_K);
    a ragged K or unaligned rows take masked ones; all match the reference. Every
    (BLOCK_M, BLOCK_N, kind, dtype) the launcher picks has an AOT spec, at a BLOCK_K no
    smaller than the dispatched one (tests/test_aot_compile.py: no spills)."""
    from minikernels.ops.triton import moe_int8

    # (t, h, inter, e, k), pad w2's rows to, gate-up (EVEN_K, BLOCK_K), down (EVEN_K, BK)
    cases = [((9, 256, 128, 3, 2), None, (True, 128), (True, 128)),
             ((9, 80, 48, 3, 2), None, (True, 16), (True, 16)),
             ((9, 64, 40, 3, 2), 48, (True, 64), (False, 16)),   # I = 40: ragged down K
             ((9, 200, 40, 3, 2), None, (False, 32), (False, 32))]   # unaligned rows
    with mk.use_backend("triton"), \
            spy_launches(moe_int8, "moe_int8_gate_up_kernel", "EVEN_K") as even13, \
            spy_launches(moe_int8, "moe_int8_gate_up_kernel", "BLOCK_K") as bk13, \
            spy_launches(moe_int8, "moe_int8_down_kernel", "EVEN_K") as even2, \
            spy_launches(moe_int8, "moe_int8_down_kernel", "BLOCK_K") as bk2:
        for i, ((t, h, inter, e, k), pad, want13, want2) in enumerate(cases):
            args = _inputs(t, h, inter, e, k, torch.float16, device, 20 + i)
            if pad is not None:          # w2 rows 16-byte aligned, K = I not a multiple
                w2p = torch.zeros(e, h, pad, dtype=torch.int8, device=device)[:, :, :inter]
                w2p.copy_(args[3])
                args[3] = w2p
            y = mk.ops.fused_moe_int8(*args)
            assert (even13[i], bk13[i]) == want13, (h, inter)
            assert (even2[i], bk2[i]) == want2, (h, inter)
            assert_close(y, reference.fused_moe_int8(*args), scale=2.0)

    assert_w8a16_dispatch_registered(
        "moe_int8",
        lambda n_pairs, tdt, kdim, aligned, gate_up: moe_int8.moe_int8_config(
            n_pairs, 64, tdt, kdim, aligned, gate_up),
        ((4096, True), (2880, True), (40, True), (1040, True), (200, False), (4096, False)))


@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_matches_reference_and_formula(dtype, activation, device):
    """activation= gelu / gelu_tanh on aligned rows with K a multiple of the K tile
    (EVEN_K) and on odd sizes (unaligned rows, masked): the gate-up launch gets it as its
    ACT constexpr; the result matches the reference and the fp64 formula with that
    activation written out (helpers.gate_act_by_hand), and is far from the SiLU one."""
    from minikernels.ops.triton import moe_int8

    for i, (t, h, inter, e, k) in enumerate([(8, 64, 32, 3, 2), (5, 37, 19, 3, 3)]):
        args = _inputs(t, h, inter, e, k, dtype, device, 30 + i)
        with mk.use_backend("triton"), \
                spy_launches(moe_int8, "moe_int8_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe_int8(*args, activation=activation)
        assert acts == [activation]
        want = reference.fused_moe_int8(*args, activation=activation)
        assert_close(y, want, scale=2.0)
        exact = _by_hand(*args, activation)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, _by_hand(*args)) > 2 * FORMULA_TOL[dtype]


def test_activations_are_told_apart(device):
    """fp32 x: each activation's kernel result is within 1e-5 of its own formula and
    far from the others' (gelu vs gelu_tanh: ~1e-4 here); silu stays the default, bit
    for bit."""
    args = _inputs(9, 64, 32, 3, 2, torch.float32, device, 40)
    args[0] = args[0] * 2                        # gates of O(2): where the GELUs differ
    with mk.use_backend("triton"):
        got = {a: mk.ops.fused_moe_int8(*args, activation=a) for a in MOE_ACTIVATIONS}
        torch.testing.assert_close(mk.ops.fused_moe_int8(*args), got["silu"],
                                   rtol=0, atol=0)
    exact = {a: _by_hand(*args, a) for a in MOE_ACTIVATIONS}
    for a in MOE_ACTIVATIONS:
        for b in MOE_ACTIVATIONS:
            err = _rel_err(got[a], exact[b])
            assert err <= 1e-5 if a == b else err > 2e-5, (a, b, err)


def test_activation_opcheck_and_errors(device):
    """The activation through the custom op (opcheck); anything but silu / gelu /
    gelu_tanh is refused by name, at the public op and at the custom op."""
    args = _inputs(5, 64, 32, 3, 2, torch.float16, device, 2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int8, tuple(args),
                              {"activation": "gelu_tanh"})
    allowed = r"activation must be one of \('silu', 'gelu', 'gelu_tanh', 'swigluoai'\), got "
    for bad in ("relu", "gelu_new", ""):
        with pytest.raises(ValueError, match=allowed + repr(bad)):
            mk.ops.fused_moe_int8(*args, activation=bad)
        with mk.use_backend("triton"), pytest.raises(ValueError, match=allowed):
            torch.ops.minikernels.fused_moe_int8(*args, activation=bad)
    with pytest.raises(TypeError, match="activation must be a str"):
        mk.ops.fused_moe_int8(*args, activation=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); odd sizes
    at T = 1; the scratch buffers are poisoned, so a pair the kernels skip turns the
    output NaN."""
    assert _alloc.poison_enabled()
    args = _inputs(0, 64, 32, 3, 2, torch.float16, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8(*args)
    assert y.shape == (0, 64) and y.dtype == torch.float16
    args = _inputs(5, 72, 40, 1, 4, torch.bfloat16, device, 1)
    tw, ids = args[5], args[6]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8(*args)
        y1 = mk.ops.fused_moe_int8(*args[:5], tw.sum(1, keepdim=True), ids[:, :1])
    assert_close(y, y1, scale=2.0)
    assert _rel_err(y, _by_hand(*args)) <= FORMULA_TOL[torch.bfloat16]
    args = _inputs(1, 33, 7, 2, 3, torch.float16, device, 2)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8(*args)
    assert _rel_err(y, _by_hand(*args)) <= FORMULA_TOL[torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_row_scales_are_per_output_row(dtype, device):
    """Zero scales on some rows zero exactly those outputs' contributions: a down row
    scaled 0 gives an exactly-zero output column, whatever the weights."""
    x, w13, s13, w2, s2, tw, ids = _inputs(6, 48, 24, 2, 2, dtype, device, 9)
    s2 = s2.clone()
    s2[:, 5] = 0.0
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int8(x, w13, s13, w2, s2, tw, ids)
    assert bool((y[:, 5] == 0).all()) and bool((y[:, 4] != 0).any())
    assert_close(y, reference.fused_moe_int8(x, w13, s13, w2, s2, tw, ids), scale=2.0)


def test_opcheck_and_compile(device):
    args = _inputs(5, 64, 32, 3, 2, torch.float16, device, 2)
    x, w13, s13, w2, s2, tw, ids = args
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int8, tuple(args))
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int8,
                              (x[:0], w13, s13, w2, s2, tw[:0], ids[:0]))

    def layer(*a):
        return mk.ops.fused_moe_int8(*a) + a[0]

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*args)
    assert_close(got, reference.fused_moe_int8(*args) + x, scale=2.0)


def test_errors_name_the_argument(device):
    args = _inputs(4, 64, 32, 3, 2, torch.float16, device)
    x, w13, s13, w2, s2, tw, ids = args
    names = ["x", "w13", "s13", "w2", "s2", "tw", "ids"]

    def with_(**kw):
        vals = dict(zip(names, args))
        vals.update(kw)
        return [vals[n] for n in names]

    for bad, match in [
        (with_(x=x[0]), "x must be 2-D"),
        (with_(x=x.int()), "x must have dtype"),
        (with_(x=x[:, :0]), "H must be positive"),
        (with_(x=x[:, :48]), r"w13 must have shape \[E, 2I, H = 48\]"),
        (with_(w13=w13.view(torch.uint8)), "w13 must have dtype"),
        (with_(w13=w13.half()), "w13 must have dtype"),
        (with_(w13=w13[0]), "w13 must be 3-D"),
        (with_(w13=w13[:, :63]), "w13's second dim"),
        (with_(w13=w13[:, :0]), "w13's second dim"),
        (with_(s13=s13.half()), "w13_scale must have dtype"),
        (with_(s13=s13[:, :1]), r"w13_scale must have shape \[E = 3, 64\]"),
        (with_(s13=s13[:, :, None]), "w13_scale must be 2-D"),
        (with_(s13=s13[0]), "w13_scale must be 2-D"),
        (with_(w2=w2[:, :, :16]), r"w2 must have shape \[E = 3, 64, 32\]"),
        (with_(w2=w2[:2]), "w2 must have shape"),
        (with_(w2=w2.float()), "w2 must have dtype"),
        (with_(s2=s2[:, :0]), r"w2_scale must have shape \[E = 3, 64\]"),
        (with_(s2=s2[:2]), "w2_scale must have shape"),
        (with_(s2=s2.double()), "w2_scale must have dtype"),
        (with_(tw=tw.half()), "topk_weights"),
        (with_(tw=tw[:, :1]), "topk_weights must have"),
        (with_(ids=ids.float()), "topk_ids"),
        (with_(ids=ids[:3]), "topk_ids must have shape"),
        (with_(ids=ids[:, :0]), "topk_ids must have shape"),
        (with_(ids=torch.full_like(ids, 3)), "topk_ids values"),
        (with_(ids=torch.full_like(ids, -1)), "topk_ids values"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe_int8(*bad)
    meta = torch.empty_like(s13, device="meta")
    with pytest.raises((ValueError, TypeError), match="w13_scale must be on"):
        mk.ops.fused_moe_int8(*with_(s13=meta))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_and_prefill_shapes_and_cuda_graph(dtype):
    """A decode and a prefill batch at model size on the GPU (64 experts, k 8), then the
    decode call captured in a CUDA graph (the host-side sort has no sync) and replayed on
    new routing."""
    for t in (256, 2048):
        args = _inputs(t, 1024, 768, 64, 8, dtype, "cuda", 7)
        with mk.use_backend("triton"):
            y = mk.ops.fused_moe_int8(*args)
        assert_close(y, reference.fused_moe_int8(*args), scale=2.0)
    args = _inputs(256, 1024, 768, 64, 8, dtype, "cuda", 8)
    tw, ids = args[5], args[6]
    with mk.use_backend("triton"):
        mk.ops.fused_moe_int8(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe_int8(*args)
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        tw.copy_(torch.rand(tw.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe_int8(*args), scale=2.0)


NONGATED = ["relu2", "silu"]


@pytest.mark.parametrize("activation", NONGATED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nongated_matches_reference_and_formula(dtype, activation, device):
    """gated=False (w13 [E, I, H] int8 and w13_scale [E, I], the up rows only; act(up))
    on aligned rows with K a multiple of the K tile (EVEN_K) and on odd sizes (unaligned
    rows, masked; k = 3 of 3 experts): the gate-up launch gets GATED False and the ACT;
    the result matches the reference and the fp64 formula (relu2: max(u, 0)^2)."""
    from minikernels.ops.triton import moe_int8

    for i, (t, h, inter, e, k) in enumerate([(8, 64, 32, 3, 2), (5, 37, 19, 3, 3)]):
        args = _inputs(t, h, inter, e, k, dtype, device, 60 + i, gated=False)
        assert args[1].shape == (e, inter, h) and args[2].shape == (e, inter)
        with mk.use_backend("triton"), \
                spy_launches(moe_int8, "moe_int8_gate_up_kernel", "GATED") as gated, \
                spy_launches(moe_int8, "moe_int8_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe_int8(*args, activation=activation, gated=False)
        assert (gated, acts) == ([False], [activation])
        want = reference.fused_moe_int8(*args, activation=activation, gated=False)
        assert y.shape == (t, h) and y.dtype == dtype
        assert_close(y, want, scale=2.0)
        exact = _by_hand(*args, activation, gated=False)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        if activation == "relu2":           # far from the SiLU result: ACT took effect
            assert _rel_err(y, _by_hand(*args, "silu", gated=False)) > 2 * FORMULA_TOL[dtype]


def test_nongated_row_scales_edges_opcheck_and_errors(device):
    """Non-gated int8 experts: w13_scale scales up row n (a zero scale on up row n of
    every expert equals a zero row n of w13); no tokens; the custom op (opcheck);
    relu2 with gated experts and a w13 of gated experts' 2I rows with gated=False are
    refused by name."""
    x, w13, s13, w2, s2, tw, ids = _inputs(6, 48, 24, 2, 2, torch.float16, device, 64,
                                           gated=False)
    s13z, w13z = s13.clone(), w13.clone()
    s13z[:, 3], w13z[:, 3] = 0.0, 0
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int8(x, w13, s13z, w2, s2, tw, ids, activation="relu2",
                                  gated=False)
        y0 = mk.ops.fused_moe_int8(x, w13z, s13, w2, s2, tw, ids, activation="relu2",
                                   gated=False)
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int8,
                              (x, w13, s13, w2, s2, tw, ids),
                              {"activation": "relu2", "gated": False})
        empty = mk.ops.fused_moe_int8(x[:0], w13, s13, w2, s2, tw[:0], ids[:0],
                                      activation="relu2", gated=False)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    assert_close(y, reference.fused_moe_int8(x, w13, s13z, w2, s2, tw, ids,
                                             activation="relu2", gated=False), scale=2.0)
    assert empty.shape == (0, 48)
    _, w13g, s13g, _, _, _, _ = _inputs(6, 48, 24, 2, 2, torch.float16, device, 64)
    with pytest.raises(ValueError, match=r"activation 'relu2' .*pass gated=False"):
        mk.ops.fused_moe_int8(x, w13g, s13g, w2, s2, tw, ids, activation="relu2")
    with mk.use_backend("triton"), pytest.raises(ValueError, match=r"pass gated=False"):
        torch.ops.minikernels.fused_moe_int8(x, w13g, s13g, w2, s2, tw, ids,
                                             activation="relu2")
    with pytest.raises(ValueError, match=r"w13 must have I = 24 rows per expert with "
                                         r"gated=False"):
        mk.ops.fused_moe_int8(x, w13g, s13g, w2, s2, tw, ids, gated=False)
    with pytest.raises(ValueError, match=r"w13_scale must have shape \[E = 2, 24\]"):
        mk.ops.fused_moe_int8(x, w13, s13g, w2, s2, tw, ids, gated=False)
