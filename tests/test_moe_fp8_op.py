"""``mk.ops.fused_moe_fp8`` (fused_moe with FP8 e4m3 experts and block-wise scales, W8A16)
against the reference (fused_moe on the fp32-dequantized experts) and an independent
per-token fp64 formula with its own e4m3 decoding: random shapes (no tokens, one token,
odd expert / token counts, k > E so an expert repeats in a row), H and I not multiples of
the scale block, block sizes (128, 128), (32, 32), (16, 48) and per channel, fp16 / bf16
(and fp32 x), both backends, every tensor argument a strided view, poisoned scratch
buffers, the kernels' tile dispatch and its AOT specs, opcheck, torch.compile and bad
input; ``activation`` gelu / gelu_tanh (silu: the default) on aligned and masked tiles,
told apart in fp32, and its errors; non-gated experts (``gated=False``: w13 [E, I, H],
relu2 and silu) likewise."""
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


def _fp8(e, n, k, block, g):
    """Random fp8 experts: every byte value but the two NaNs (subnormals, -0 and the sign
    bit included), and positive fp32 block scales sized so that W's rows have norm ~1."""
    bn, bk = block
    b = torch.randint(0, 256, (e, n, k), dtype=torch.uint8, generator=g)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)                 # 0x7F / 0xFF: NaN
    s = (torch.rand(e, -(-n // bn), -(-k // bk), generator=g) + 0.5) / (100.0 * k ** 0.5)
    return b.view(torch.float8_e4m3fn), s


def _inputs(t, h, inter, e, k, block, dtype, device, seed=0, ids_dtype=torch.int64,
            gated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13, s13 = _fp8(e, (2 if gated else 1) * inter, h, block, g)
    w2, s2 = _fp8(e, h, inter, block, g)
    tw = torch.rand(t, k, generator=g) + 0.1            # never 1: a dropped weight shows
    ids = torch.randint(0, e, (t, k), generator=g, dtype=ids_dtype)
    return [v.to(device) for v in (x, w13, s13, w2, s2, tw, ids)]


def _decode_e4m3(w):
    """Independent e4m3 decoding in fp64: s eeee mmm, bias 7, subnormals at e = 0."""
    b = w.cpu().view(torch.uint8).long()
    sign = 1.0 - 2.0 * (b >> 7).double()
    ex, man = (b >> 3) & 0xF, (b & 7).double()
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (ex - 7).double())
    sub = man / 8.0 * 2.0 ** -6
    return sign * torch.where(ex == 0, sub, normal)


def _dequant_by_hand(w, s, block):
    """W[e, n, k] = decode(w[e, n, k]) * s[e, n // bn, k // bk] in fp64, never rounded."""
    bn, bk = block
    _, n, k = w.shape
    sd = s.cpu().double()
    return _decode_e4m3(w) * sd[:, torch.arange(n) // bn][:, :, torch.arange(k) // bk]


def _by_hand(x, w13, s13, w2, s2, tw, ids, block, activation="silu", gated=True):
    """Per (token, slot) in fp64 on the hand-dequantized experts; the activated
    intermediate rounded to x.dtype as the contract says."""
    w13d, w2d = _dequant_by_hand(w13, s13, block), _dequant_by_hand(w2, s2, block)
    return moe_by_hand(x, w13d, w2d, tw, ids, activation, gated)


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-3))


@st.composite
def _shapes(draw):
    """(H, I, block): H and I mostly not multiples of the block (a partial last block in
    both dims of both matrices); per channel = (1, K >= max(H, I))."""
    kind = draw(st.sampled_from(["128x128", "32x32", "16x48", "per_channel"]))
    h = draw(st.sampled_from([48, 80, 96, 136, 200]))
    inter = draw(st.sampled_from([16, 40, 56, 72]))
    block = {"128x128": (128, 128), "32x32": (32, 32), "16x48": (16, 48),
             "per_channel": (1, max(h, inter))}[kind]
    return h, inter, block


@settings(max_examples=examples(20), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), shape=_shapes(), e=st.sampled_from([1, 3, 5, 8]),
       k=st.integers(1, 4), dtype=st.sampled_from(HALF_DTYPES),
       backend=st.sampled_from(BACKENDS), ids_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, shape, e, k, dtype, backend, ids_dtype, seed,
                                       device):
    h, inter, block = shape
    args = _inputs(t, h, inter, e, k, block, dtype, device, seed, ids_dtype)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8(*args, block)
    want = reference.fused_moe_fp8(*args, block)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(*args, block)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


@pytest.mark.parametrize("block", [(128, 128), (16, 48)])
def test_fp32_activations(block, device):
    """fp32 x: exact fp32 dots; nothing is rounded but the fp32 sums."""
    args = _inputs(9, 80, 40, 3, 2, block, torch.float32, device, 5)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_fp8(*args, block)
    assert_close(y, reference.fused_moe_fp8(*args, block), scale=2.0)
    assert _rel_err(y, _by_hand(*args, block)) <= FORMULA_TOL[torch.float32]


def test_reference_is_fused_moe_on_fp32_dequantized_experts():
    """The reference's definition, through public functions: each expert dequantized with
    fp8_matmul's dequantize_fp8, kept in fp32 (not rounded to x.dtype), then fused_moe's
    reference (fused_moe itself takes weights in x's dtype only)."""
    block = (32, 32)
    x, w13, s13, w2, s2, tw, ids = _inputs(7, 80, 40, 3, 2, block, torch.float16, "cpu", 4)
    w13d = torch.stack([reference.dequantize_fp8(w13[i], s13[i], block) for i in range(3)])
    w2d = torch.stack([reference.dequantize_fp8(w2[i], s2[i], block) for i in range(3)])
    assert w13d.dtype == torch.float32
    want = reference.fused_moe(x, w13d, w2d, tw, ids)
    got = mk.ops.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, block)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    t, h, inter, e, k, block = 6, 64, 32, 3, 2, (16, 32)
    args = _inputs(t, h, inter, e, k, block, dtype, device, 3)
    x, w13, s13, w2, s2, tw, ids = args
    want = reference.fused_moe_fp8(*args, block)

    def view_of(v, kind):
        if kind == "cols":       # every other column of a wider, offset buffer
            buf = torch.zeros(v.shape[0] + 1, 2 * v.shape[1] + 3, *v.shape[2:],
                              dtype=v.dtype, device=device)
            out = buf[1:, 1:2 * v.shape[1] + 1:2]
        elif kind == "pad":      # [E, N, K] padded in every dim, unit inner stride
            buf = torch.zeros(*(s + 2 for s in v.shape), dtype=v.dtype, device=device)
            out = buf[1:-1, 2:, :v.shape[2]]
        else:                    # transposed storage: the last dim strided
            out = torch.zeros(*v.shape[:-2], v.shape[-1], v.shape[-2], dtype=v.dtype,
                              device=device).transpose(-1, -2)
        if out.dtype == torch.float8_e4m3fn:   # fp8 has no copy_ on every torch build
            out.view(torch.uint8).copy_(v.view(torch.uint8))
        else:
            out.copy_(v)
        return out

    views = [view_of(x, "trans"), view_of(w13, "pad"), view_of(s13, "trans"),
             view_of(w2, "trans"), view_of(s2, "pad"), view_of(tw, "cols"),
             view_of(ids, "trans")]
    xr = torch.zeros(t, 2 * h, dtype=dtype, device=device)[:, h:]       # row-strided x
    xr.copy_(x)
    w13p = view_of(w13, "cols")                                         # every other row
    assert not any(v.is_contiguous() for v in (*views, xr, w13p))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8(*views, block)
        y2 = mk.ops.fused_moe_fp8(xr, w13p, *views[2:], block)
    assert_close(y, want, scale=2.0)
    assert_close(y2, want, scale=2.0)


def test_tile_dispatch_and_registered_specs(device):
    """Aligned rows with K a multiple of BLOCK_K take unmasked vector loads (EVEN_K);
    a ragged K or unaligned rows take masked ones; all match the reference. Every
    (BLOCK_M, BLOCK_N, kind, dtype) the launcher picks has an AOT spec, at a BLOCK_K no
    smaller than the dispatched one (tests/test_aot_compile.py: no spills)."""
    from minikernels.ops.triton import moe_fp8

    cases = [((9, 256, 128, 3, 2, (128, 128)), True, 128),
             ((9, 64, 32, 3, 2, (32, 32)), True, 32),
             ((9, 80, 48, 3, 2, (16, 48)), True, 16),
             ((9, 200, 40, 3, 2, (128, 128)), False, 32)]     # H = 200: unaligned rows
    with mk.use_backend("triton"), \
            spy_launches(moe_fp8, "moe_fp8_gate_up_kernel", "EVEN_K") as even, \
            spy_launches(moe_fp8, "moe_fp8_gate_up_kernel", "BLOCK_K") as bks:
        for i, ((t, h, inter, e, k, block), want_even, want_bk) in enumerate(cases):
            args = _inputs(t, h, inter, e, k, block, torch.float16, device, 20 + i)
            y = mk.ops.fused_moe_fp8(*args, block)
            assert (even[i], bks[i]) == (want_even, want_bk), (h, inter, block)
            assert_close(y, reference.fused_moe_fp8(*args, block), scale=2.0)

    assert_w8a16_dispatch_registered(
        "moe_fp8",
        lambda n_pairs, tdt, kdim, bk, aligned, gate_up: moe_fp8.moe_fp8_config(
            n_pairs, 64, tdt, kdim, bk, aligned, gate_up),
        ((4096, 128, True), (2880, 128, True), (40, 40, True), (1040, 16, True),
         (200, 128, False), (4096, 128, False)))


@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_matches_reference_and_formula(dtype, activation, device):
    """activation= gelu / gelu_tanh on aligned rows with K a multiple of the K tile
    (EVEN_K) and on a ragged K (masked): the gate-up launch gets it as its ACT constexpr;
    the result matches the reference and the fp64 formula with that activation written
    out (helpers.gate_act_by_hand), and is far from the SiLU one."""
    from minikernels.ops.triton import moe_fp8

    for i, (t, h, inter, e, k, block) in enumerate([(8, 64, 32, 3, 2, (32, 32)),
                                                      (5, 72, 40, 3, 2, (16, 48))]):
        args = _inputs(t, h, inter, e, k, block, dtype, device, 30 + i)
        with mk.use_backend("triton"), \
                spy_launches(moe_fp8, "moe_fp8_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe_fp8(*args, block, activation=activation)
        assert acts == [activation]
        want = reference.fused_moe_fp8(*args, block, activation=activation)
        assert_close(y, want, scale=2.0)
        exact = _by_hand(*args, block, activation)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, _by_hand(*args, block)) > 2 * FORMULA_TOL[dtype]


def test_activations_are_told_apart(device):
    """fp32 x: each activation's kernel result is within 1e-5 of its own formula and
    far from the others' (gelu vs gelu_tanh: ~1e-4 here); silu stays the default, bit
    for bit."""
    block = (32, 32)
    args = _inputs(9, 64, 32, 3, 2, block, torch.float32, device, 40)
    args[0] = args[0] * 2                        # gates of O(2): where the GELUs differ
    with mk.use_backend("triton"):
        got = {a: mk.ops.fused_moe_fp8(*args, block, activation=a) for a in MOE_ACTIVATIONS}
        torch.testing.assert_close(mk.ops.fused_moe_fp8(*args, block), got["silu"],
                                   rtol=0, atol=0)
    exact = {a: _by_hand(*args, block, a) for a in MOE_ACTIVATIONS}
    for a in MOE_ACTIVATIONS:
        for b in MOE_ACTIVATIONS:
            err = _rel_err(got[a], exact[b])
            assert err <= 1e-5 if a == b else err > 2e-5, (a, b, err)


def test_activation_opcheck_and_errors(device):
    """The activation through the custom op (opcheck); anything but silu / gelu /
    gelu_tanh is refused by name, at the public op and at the custom op."""
    block = (32, 32)
    x, w13, s13, w2, s2, tw, ids = _inputs(5, 64, 32, 3, 2, block, torch.float16, device, 2)
    op_args = (x, w13.view(torch.uint8), s13, w2.view(torch.uint8), s2, tw, ids, list(block))
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_fp8, op_args,
                              {"activation": "gelu_tanh"})
    allowed = r"activation must be one of \('silu', 'gelu', 'gelu_tanh', 'swigluoai'\), got "
    for bad in ("relu", "gelu_new", ""):
        with pytest.raises(ValueError, match=allowed + repr(bad)):
            mk.ops.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, block, activation=bad)
        with mk.use_backend("triton"), pytest.raises(ValueError, match=allowed):
            torch.ops.minikernels.fused_moe_fp8(*op_args, activation=bad)
    with pytest.raises(TypeError, match="activation must be a str"):
        mk.ops.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, block, activation=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); per-tensor
    scales (one block); the scratch buffers are poisoned, so a pair the kernels skip turns
    the output NaN."""
    assert _alloc.poison_enabled()
    args = _inputs(0, 64, 32, 3, 2, (128, 128), torch.float16, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8(*args, (128, 128))
    assert y.shape == (0, 64) and y.dtype == torch.float16
    block = (1 << 20, 1 << 20)                                  # per tensor: scale [E, 1, 1]
    args = _inputs(5, 72, 40, 1, 4, block, torch.bfloat16, device, 1)
    tw, ids = args[5], args[6]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8(*args, block)
        y1 = mk.ops.fused_moe_fp8(*args[:5], tw.sum(1, keepdim=True), ids[:, :1], block)
    assert_close(y, y1, scale=2.0)
    assert _rel_err(y, _by_hand(*args, block)) <= FORMULA_TOL[torch.bfloat16]


def test_opcheck_and_compile(device):
    block = (32, 32)
    args = _inputs(5, 64, 32, 3, 2, block, torch.float16, device, 2)
    x, w13, s13, w2, s2, tw, ids = args
    op_args = (x, w13.view(torch.uint8), s13, w2.view(torch.uint8), s2, tw, ids, list(block))
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_fp8, op_args)
        torch.library.opcheck(torch.ops.minikernels.fused_moe_fp8,
                              (x[:0], *op_args[1:5], tw[:0], ids[:0], list(block)))

    def layer(*a):
        return mk.ops.fused_moe_fp8(*a, block) + a[0]

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*args)
    assert_close(got, reference.fused_moe_fp8(*args, block) + x, scale=2.0)


def test_errors_name_the_argument(device):
    args = _inputs(4, 64, 32, 3, 2, (32, 32), torch.float16, device)
    x, w13, s13, w2, s2, tw, ids = args

    def with_(**kw):
        names = ["x", "w13", "s13", "w2", "s2", "tw", "ids", "block"]
        vals = dict(zip(names, (*args, (32, 32))))
        vals.update(kw)
        return [vals[n] for n in names]

    for bad, match in [
        (with_(x=x[0]), "x must be 2-D"),
        (with_(x=x.int()), "x must have dtype"),
        (with_(x=x[:, :0]), "H must be positive"),
        (with_(x=x[:, :48]), r"w13 must have shape \[E, 2I, H = 48\]"),
        (with_(w13=w13.view(torch.uint8)), "w13 must have dtype"),
        (with_(w13=w13[0]), "w13 must be 3-D"),
        (with_(w13=w13[:, :63]), "w13's second dim"),
        (with_(w13=w13[:, :0]), "w13's second dim"),
        (with_(s13=s13.half()), "w13_scale must have dtype"),
        (with_(s13=s13[:, :1]), r"w13_scale must have shape .* = \[3, 2, 2\]"),
        (with_(s13=s13[0]), "w13_scale must be 3-D"),
        (with_(w2=w2[:, :, :16]), r"w2 must have shape \[E = 3, 64, 32\]"),
        (with_(w2=w2[:2]), "w2 must have shape"),
        (with_(w2=w2.float()), "w2 must have dtype"),
        (with_(s2=s2[:, :, :0]), "w2_scale must have shape"),
        (with_(s2=s2.double()), "w2_scale must have dtype"),
        (with_(tw=tw.half()), "topk_weights"),
        (with_(tw=tw[:, :1]), "topk_weights must have"),
        (with_(ids=ids.float()), "topk_ids"),
        (with_(ids=ids[:3]), "topk_ids must have shape"),
        (with_(ids=torch.full_like(ids, 3)), "topk_ids values"),
        (with_(ids=torch.full_like(ids, -1)), "topk_ids values"),
        (with_(block=(32, 24)), r"block_size bk \(24\) must be a multiple of 16 or >= "),
        (with_(block=(32, 40)), r"bk \(40\) must be a multiple of 16 or >= K \(64\)"),
        (with_(block=(0, 32)), "block_size must be positive"),
        (with_(block=(32, -16)), "block_size must be positive"),
        (with_(block=(32,)), "block_size must be a pair of ints"),
        (with_(block=(32.0, 32)), "block_size must be a pair of ints"),
        (with_(block=(True, 32)), "block_size must be a pair of ints"),
        (with_(block=(64, 32)), "w13_scale must have shape"),   # scales sized for (32, 32)
        (with_(block=(32, 64)), "w13_scale must have shape"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe_fp8(*bad)


def test_per_channel_needs_bk_past_both_matrices(device):
    """bk not a multiple of 16 is per channel only when it spans the K of both matrices:
    (1, 40) covers I = 40 but not H = 64; (1, 64) covers both."""
    x, w13, _, w2, _, tw, ids = _inputs(3, 64, 40, 2, 2, (1, 64), torch.float16, device)
    s13 = torch.rand(2, 80, 1, device=device) / 400
    s2 = torch.rand(2, 64, 1, device=device) / 400
    with pytest.raises(ValueError, match=r"bk \(40\) must be a multiple of 16 or >= K \(64\)"):
        mk.ops.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, (1, 40))
    args = (x, w13, s13, w2, s2, tw, ids)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_fp8(*args, (1, 64))
    assert_close(y, reference.fused_moe_fp8(*args, (1, 64)), scale=2.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(128, 128), (1, 1024)])
def test_gpu_decode_shape_and_cuda_graph(dtype, block):
    """A decode batch at model size on the GPU (256 tokens, 64 experts, k 8), then the
    same call captured in a CUDA graph (the host-side sort has no sync) and replayed on
    new routing."""
    args = _inputs(256, 1024, 768, 64, 8, block, dtype, "cuda", 7)
    tw, ids = args[5], args[6]
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_fp8(*args, block)
        assert_close(y, reference.fused_moe_fp8(*args, block), scale=2.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe_fp8(*args, block)
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        tw.copy_(torch.rand(tw.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe_fp8(*args, block), scale=2.0)


NONGATED = ["relu2", "silu"]


@pytest.mark.parametrize("activation", NONGATED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nongated_matches_reference_and_formula(dtype, activation, device):
    """gated=False (w13 [E, I, H] and w13_scale [E, ceil(I / bn), ceil(H / bk)], the up
    rows only; act(up)) on aligned rows with K a multiple of the K tile, on a ragged K
    with row blocks that do not divide I (masked), and with one row block past I: the
    gate-up launch gets GATED False and the ACT; the result matches the reference and
    the fp64 formula on the hand-decoded experts (relu2: max(u, 0)^2)."""
    from minikernels.ops.triton import moe_fp8

    cases = [(8, 64, 32, 3, 2, (32, 32)), (5, 72, 40, 3, 3, (16, 48)),
             (4, 64, 32, 2, 2, (128, 128))]
    for i, (t, h, inter, e, k, block) in enumerate(cases):
        args = _inputs(t, h, inter, e, k, block, dtype, device, 60 + i, gated=False)
        assert args[1].shape == (e, inter, h)
        with mk.use_backend("triton"), \
                spy_launches(moe_fp8, "moe_fp8_gate_up_kernel", "GATED") as gated, \
                spy_launches(moe_fp8, "moe_fp8_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe_fp8(*args, block, activation=activation, gated=False)
        assert (gated, acts) == ([False], [activation])
        want = reference.fused_moe_fp8(*args, block, activation=activation, gated=False)
        assert y.shape == (t, h) and y.dtype == dtype
        assert_close(y, want, scale=2.0)
        exact = _by_hand(*args, block, activation, gated=False)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        if activation == "relu2":           # far from the SiLU result: ACT took effect
            assert _rel_err(y, _by_hand(*args, block, "silu", gated=False)) > \
                2 * FORMULA_TOL[dtype]


def test_nongated_edges_opcheck_and_errors(device):
    """Non-gated fp8 experts: no tokens; the custom op (opcheck); relu2 with gated
    experts and a w13 of gated experts' 2I rows with gated=False are refused by name."""
    block = (32, 32)
    x, w13, s13, w2, s2, tw, ids = _inputs(5, 64, 32, 3, 2, block, torch.float16, device,
                                           63, gated=False)
    op_args = (x, w13.view(torch.uint8), s13, w2.view(torch.uint8), s2, tw, ids, list(block))
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_fp8, op_args,
                              {"activation": "relu2", "gated": False})
        y = mk.ops.fused_moe_fp8(x[:0], w13, s13, w2, s2, tw[:0], ids[:0], block,
                                 activation="relu2", gated=False)
    assert y.shape == (0, 64)
    _, w13g, s13g, _, _, _, _ = _inputs(5, 64, 32, 3, 2, block, torch.float16, device, 63)
    with pytest.raises(ValueError, match=r"activation 'relu2' .*pass gated=False"):
        mk.ops.fused_moe_fp8(x, w13g, s13g, w2, s2, tw, ids, block, activation="relu2")
    with mk.use_backend("triton"), pytest.raises(ValueError, match=r"pass gated=False"):
        torch.ops.minikernels.fused_moe_fp8(x, w13g.view(torch.uint8), s13g, *op_args[3:],
                                            activation="relu2")
    with pytest.raises(ValueError, match=r"w13 must have I = 32 rows per expert with "
                                         r"gated=False"):
        mk.ops.fused_moe_fp8(x, w13g, s13g, w2, s2, tw, ids, block, gated=False)
    with pytest.raises(ValueError, match=r"w13_scale must have shape .* = \[3, 1, 2\]"):
        mk.ops.fused_moe_fp8(x, w13, s13g, w2, s2, tw, ids, block, activation="relu2",
                             gated=False)
