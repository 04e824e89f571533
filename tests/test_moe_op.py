"""``mk.ops.fused_moe`` (each token through its top-k gated experts, weighted and summed)
against the fp32 reference and an independent per-token fp64 formula: random shapes (no
tokens, one token, odd sizes that are not multiples of the tiles, one expert, k > E so an
expert repeats in a row), every dtype, both backends, every tensor argument a strided
view, poisoned scratch buffers (conftest: an unwritten row turns the output NaN), the
host-side expert sort, opcheck, torch.compile and bad input; ``activation`` silu (the
default) / gelu / gelu_tanh on aligned and odd shapes, and its errors; non-gated experts
(``gated=False``, w13 [E, I, H]: Nemotron 3's relu2, and silu) against the reference and
the fp64 formula, strided, opcheck / compile, and their errors by name."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import examples, DTYPES, MOE_ACTIVATIONS, assert_close, moe_by_hand, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import _alloc, reference

BACKENDS = ["reference", "triton"]
FORMULA_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GELUS = ["gelu", "gelu_tanh"]


def _inputs(t, h, inter, e, k, dtype, device, seed=0, ids_dtype=torch.int64, gated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, (2 if gated else 1) * inter, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    tw = torch.rand(t, k, generator=g) + 0.1            # never 1: a dropped weight shows
    ids = torch.randint(0, e, (t, k), generator=g, dtype=ids_dtype)
    return [v.to(device) for v in (x, w13, w2, tw, ids)]


_by_hand = moe_by_hand    # the independent fp64 formula (tests/helpers.py)


def _rel_err(got, exact):
    # relative to the largest output; an output that cancels to near 0 (fp16 subnormals;
    # fp32 with H = 1: seen at 1e-4, whose terms are O(1)) is judged against 1e-2
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-2))


@settings(max_examples=examples(30), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17, 64]), h=st.sampled_from([1, 33, 64, 130]),
       inter=st.sampled_from([1, 16, 33, 128]), e=st.sampled_from([1, 3, 8]),
       k=st.sampled_from([1, 2, 4]), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS), ids_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, h, inter, e, k, dtype, backend, ids_dtype, seed,
                                       device):
    x, w13, w2, tw, ids = _inputs(t, h, inter, e, k, dtype, device, seed, ids_dtype)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids)
    want = reference.fused_moe(x, w13, w2, tw, ids)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(x, w13, w2, tw, ids)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    t, h, inter, e, k = 6, 40, 24, 3, 2
    x, w13, w2, tw, ids = _inputs(t, h, inter, e, k, dtype, device, 3)
    want = reference.fused_moe(x, w13, w2, tw, ids)
    xv = torch.randn(9, 2 * h + 3, device=device).to(dtype)[2:8, 1:2 * h + 1:2]
    xv.copy_(x)
    w13v = torch.randn(e, h, 2 * inter, device=device).to(dtype).transpose(1, 2)  # H strided
    w13v.copy_(w13)
    w2v = torch.randn(e + 1, h + 5, inter + 2, device=device).to(dtype)[1:, 2:h + 2, 1:inter + 1]
    w2v.copy_(w2)
    twv = torch.zeros(t, 2 * k + 1, device=device)[:, 1::2]
    twv.copy_(tw)
    idsv = torch.zeros(k, t, dtype=ids.dtype, device=device).t()                  # [T, k]
    idsv.copy_(ids)
    assert not any(v.is_contiguous() for v in (xv, w13v, w2v, twv, idsv))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(xv, w13v, w2v, twv, idsv)
    assert_close(y, want, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_views_take_the_vectorized_path(dtype, device):
    """Row-strided views whose rows start 16-byte aligned, H and I multiples of the K
    tile: the launches pass EVEN_K and ALIGNED (the vector-load hints); odd sizes do not."""
    from minikernels.ops.triton import moe as triton_moe

    t, h, inter, e, k = 20, 128, 128, 4, 2
    x, w13, w2, tw, ids = _inputs(t, h, inter, e, k, dtype, device, 5)
    want = reference.fused_moe(x, w13, w2, tw, ids)
    xv = torch.zeros(t, 2 * h, device=device, dtype=dtype)[:, :h]
    xv.copy_(x)
    w13v = torch.zeros(e, 2 * inter + 8, h + 64, device=device, dtype=dtype)[:, 8:, :h]
    w13v.copy_(w13)
    w2v = torch.zeros(e, h, inter + 64, device=device, dtype=dtype)[:, :, 64:]
    w2v.copy_(w2)
    with mk.use_backend("triton"), \
            spy_launches(triton_moe, "moe_gate_up_kernel", "ALIGNED") as al1, \
            spy_launches(triton_moe, "moe_gate_up_kernel", "EVEN_K") as ev1, \
            spy_launches(triton_moe, "moe_down_kernel", "ALIGNED") as al2, \
            spy_launches(triton_moe, "moe_down_kernel", "EVEN_K") as ev2:
        y = mk.ops.fused_moe(xv, w13v, w2v, tw, ids)
        assert (al1, ev1, al2, ev2) == ([True], [True], [True], [True])
        x2, w13b, w2b, tw2, ids2 = _inputs(3, 33, 17, 2, 2, dtype, device, 6)
        y2 = mk.ops.fused_moe(x2, w13b, w2b, tw2, ids2)
        assert (al1[1], ev1[1], al2[1], ev2[1]) == (False, False, False, False)
        # aligned rows, K not a multiple of the K tile: masked loads with the hints (a
        # registered spec; its own narrower tile at BLOCK_M 32)
        x3, w13c, w2c, tw3, ids3 = _inputs(24, 136, 72, 3, 2, dtype, device, 7)
        y3 = mk.ops.fused_moe(x3, w13c, w2c, tw3, ids3)
        assert (al1[2], ev1[2], al2[2], ev2[2]) == (True, False, True, False)
    assert_close(y, want, scale=2.0)
    assert_close(y2, reference.fused_moe(x2, w13b, w2b, tw2, ids2), scale=2.0)
    assert_close(y3, reference.fused_moe(x3, w13c, w2c, tw3, ids3), scale=2.0)


@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_matches_reference_and_formula(dtype, activation, device):
    """activation= gelu / gelu_tanh on an aligned shape (the vector-load tiles) and an
    odd one (masked, unaligned): the gate-up launch gets it as its ACT constexpr; the
    result matches the reference and the fp64 formula with that activation written out
    (helpers.gate_act_by_hand), and so does the reference. (silu: the tests above, and
    explicitly in test_activations_are_told_apart.)"""
    from minikernels.ops.triton import moe as triton_moe

    for i, (t, h, inter, e, k) in enumerate([(8, 128, 128, 3, 2), (5, 33, 17, 3, 3)]):
        x, w13, w2, tw, ids = _inputs(t, h, inter, e, k, dtype, device, 30 + i)
        with mk.use_backend("triton"), \
                spy_launches(triton_moe, "moe_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe(x, w13, w2, tw, ids, activation=activation)
        assert acts == [activation]
        want = reference.fused_moe(x, w13, w2, tw, ids, activation=activation)
        assert y.shape == (t, h) and y.dtype == dtype
        assert_close(y, want, scale=2.0)
        exact = _by_hand(x, w13, w2, tw, ids, activation)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


def test_activations_are_told_apart(device):
    """In fp32 each activation's kernel result is within 1e-5 of its own formula and far
    from the others' (gelu vs gelu_tanh differ by ~1e-4 of the output here), so the
    epilogue applies the one asked for; silu stays the default, bit for bit."""
    x, w13, w2, tw, ids = _inputs(9, 40, 24, 3, 2, torch.float32, device, 40)
    x = x * 2                                     # gates of O(2): where the GELUs differ
    with mk.use_backend("triton"):
        got = {a: mk.ops.fused_moe(x, w13, w2, tw, ids, activation=a)
               for a in MOE_ACTIVATIONS}
        torch.testing.assert_close(mk.ops.fused_moe(x, w13, w2, tw, ids), got["silu"],
                                   rtol=0, atol=0)
    exact = {a: _by_hand(x, w13, w2, tw, ids, a) for a in MOE_ACTIVATIONS}
    for a in MOE_ACTIVATIONS:
        for b in MOE_ACTIVATIONS:
            err = _rel_err(got[a], exact[b])
            assert err <= 1e-5 if a == b else err > 2e-5, (a, b, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); the
    scratch buffers are poisoned, so a pair the kernels skip turns the output NaN."""
    assert _alloc.poison_enabled()
    x, w13, w2, tw, ids = _inputs(0, 33, 16, 3, 2, torch.float32, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids)
    assert y.shape == (0, 33) and y.dtype == torch.float32
    x, w13, w2, tw, ids = _inputs(5, 33, 16, 1, 4, torch.float32, device, 1)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids)
        y1 = mk.ops.fused_moe(x, w13, w2, tw.sum(1, keepdim=True), ids[:, :1])
    assert_close(y, y1)
    assert _rel_err(y, _by_hand(x, w13, w2, tw, ids)) <= 1e-5


@settings(max_examples=examples(30), deadline=None)
@given(t=st.integers(0, 40), k=st.integers(1, 4), e=st.integers(1, 9),
       block_m=st.sampled_from([1, 4, 16]), seed=st.integers(0, 10 ** 6))
def test_sort_pairs_by_expert(t, k, e, block_m, seed):
    from minikernels.ops.triton.moe import sort_pairs_by_expert

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (t, k), generator=g)
    sorted_ids, block_expert = sort_pairs_by_expert(ids, e, block_m)
    n = t * k
    counts = torch.bincount(ids.flatten(), minlength=e)
    need = int(((counts + block_m - 1) // block_m).sum())
    assert sorted_ids.dtype == block_expert.dtype == torch.int32
    assert block_expert.shape[0] >= need and sorted_ids.shape[0] == block_expert.shape[0] * block_m
    assert int((block_expert >= 0).sum()) == need and bool((block_expert[need:] == -1).all())
    live = sorted_ids[sorted_ids < n]
    assert sorted(live.tolist()) == list(range(n))                 # each pair exactly once
    assert bool((sorted_ids[sorted_ids >= n] == n).all())
    flat = ids.flatten()
    for b, ex in enumerate(block_expert.tolist()):
        tile = sorted_ids[b * block_m:(b + 1) * block_m]
        real = tile[tile < n].long()
        if ex < 0:
            assert real.numel() == 0
        else:
            assert real.numel() and bool((flat[real] == ex).all())
    for ex in range(e):                                            # stable: pair order kept
        mine = [p for p in live.tolist() if flat[p] == ex]
        assert mine == sorted(mine)


def test_opcheck_and_compile(device):
    x, w13, w2, tw, ids = _inputs(5, 24, 16, 3, 2, torch.float32, device, 2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe, (x, w13, w2, tw, ids))
        torch.library.opcheck(torch.ops.minikernels.fused_moe,
                              (x[:0], w13, w2, tw[:0], ids[:0]))

    def block(x, w13, w2, tw, ids):
        return mk.ops.fused_moe(x, w13, w2, tw, ids) + x

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, w13, w2, tw, ids)
    assert_close(got, reference.fused_moe(x, w13, w2, tw, ids) + x)


def test_activation_opcheck_compile_and_errors(device):
    """The activation through the custom op (opcheck, torch.compile); anything but silu /
    gelu / gelu_tanh is refused by name, at the public op and at the custom op."""
    x, w13, w2, tw, ids = _inputs(5, 24, 16, 3, 2, torch.float32, device, 2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe, (x, w13, w2, tw, ids),
                              {"activation": "gelu_tanh"})

    def block(x, w13, w2, tw, ids):
        return mk.ops.fused_moe(x, w13, w2, tw, ids, activation="gelu") + x

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, w13, w2, tw, ids)
    assert_close(got, reference.fused_moe(x, w13, w2, tw, ids, activation="gelu") + x)
    allowed = r"activation must be one of \('silu', 'gelu', 'gelu_tanh', 'swigluoai'\), got "
    for bad in ("relu", "SiLU", "gelu_pytorch_tanh", "swiglu", ""):
        with pytest.raises(ValueError, match=allowed + repr(bad)):
            mk.ops.fused_moe(x, w13, w2, tw, ids, activation=bad)
        with mk.use_backend("triton"), pytest.raises(ValueError, match=allowed):
            torch.ops.minikernels.fused_moe(x, w13, w2, tw, ids, activation=bad)
    with pytest.raises(TypeError, match="activation must be a str"):
        mk.ops.fused_moe(x, w13, w2, tw, ids, activation=None)


def test_errors_name_the_argument(device):
    x, w13, w2, tw, ids = _inputs(4, 16, 8, 3, 2, torch.float32, device)
    for bad, match in [((x[0], w13, w2, tw, ids), "x"),
                       ((x.int(), w13, w2, tw, ids), "x"),
                       ((x, w13.half(), w2, tw, ids), "w13"),
                       ((x, w13[:, :, :8], w2, tw, ids), r"w13 must have shape"),
                       ((x, w13[:, :15], w2, tw, ids), r"w13's second dim"),
                       ((x, w13, w2.half(), tw, ids), "w2"),
                       ((x, w13, w2[:, :, :4], tw, ids), r"w2 must have shape"),
                       ((x, w13, w2[:2], tw, ids), r"w2 must have shape"),
                       ((x, w13, w2, tw.half(), ids), "topk_weights"),
                       ((x, w13, w2, tw[:, :1], ids), r"topk_weights must have"),
                       ((x, w13, w2, tw[0], ids), "topk_weights"),
                       ((x, w13, w2, tw, ids.float()), "topk_ids"),
                       ((x, w13, w2, tw, ids[:3]), r"topk_ids must have shape"),
                       ((x, w13, w2, tw, torch.full_like(ids, 3)), r"topk_ids values"),
                       ((x, w13, w2, tw, torch.full_like(ids, -1)), r"topk_ids values")]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe(*bad)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_shape_and_cuda_graph(dtype):
    """A decode batch at model size on the GPU (256 tokens, 64 experts, k 8), then the
    same call captured in a CUDA graph (the host-side sort has no sync) and replayed on
    new routing."""
    x, w13, w2, tw, ids = _inputs(256, 1024, 768, 64, 8, dtype, "cuda", 7)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids)
        assert_close(y, reference.fused_moe(x, w13, w2, tw, ids), scale=2.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe(x, w13, w2, tw, ids)
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        tw.copy_(torch.rand(tw.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe(x, w13, w2, tw, ids), scale=2.0)


@requires_cuda
@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gelu_experts_decode_and_prefill(dtype, activation):
    """GELU-gated experts at model size on the GPU (64 experts, k 8): a decode batch
    (BLOCK_M 32) and a prefill one (BLOCK_M 64: wgmma on sm_90a) against the reference."""
    for t in (256, 2048):
        x, w13, w2, tw, ids = _inputs(t, 1024, 768, 64, 8, dtype, "cuda", 9)
        with mk.use_backend("triton"):
            y = mk.ops.fused_moe(x, w13, w2, tw, ids, activation=activation)
        want = reference.fused_moe(x, w13, w2, tw, ids, activation=activation)
        assert_close(y, want, scale=2.0)


# ------------------------------------------------------------------- non-gated experts
NONGATED = ["relu2", "silu"]


@pytest.mark.parametrize("activation", NONGATED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nongated_matches_reference_and_formula(dtype, activation, device):
    """gated=False (w13 [E, I, H], the up rows only; act(up), Nemotron 3's relu2 and a
    SiLU one) on an aligned shape (vector loads, EVEN_K) and an odd one (masked,
    unaligned; k = 3 of 3 experts): the gate-up launch gets GATED False and the ACT; the
    result matches the reference and the fp64 formula written out (relu2: max(u, 0)^2),
    and so does the reference."""
    from minikernels.ops.triton import moe as triton_moe

    for i, (t, h, inter, e, k) in enumerate([(8, 128, 128, 3, 2), (5, 33, 17, 3, 3)]):
        x, w13, w2, tw, ids = _inputs(t, h, inter, e, k, dtype, device, 60 + i, gated=False)
        assert w13.shape == (e, inter, h)
        with mk.use_backend("triton"), \
                spy_launches(triton_moe, "moe_gate_up_kernel", "GATED") as gated, \
                spy_launches(triton_moe, "moe_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe(x, w13, w2, tw, ids, activation=activation, gated=False)
        assert (gated, acts) == ([False], [activation])
        want = reference.fused_moe(x, w13, w2, tw, ids, activation=activation, gated=False)
        assert y.shape == (t, h) and y.dtype == dtype
        assert_close(y, want, scale=2.0)
        exact = _by_hand(x, w13, w2, tw, ids, activation, gated=False)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        with mk.use_backend("reference"):
            torch.testing.assert_close(
                mk.ops.fused_moe(x, w13, w2, tw, ids, activation=activation, gated=False),
                want, rtol=0, atol=0)


def test_nongated_relu2_is_squared_relu(device):
    """In fp32 the non-gated relu2 result is within 1e-5 of max(u, 0)^2's formula and far
    from the non-gated SiLU one and from relu(u) (unsquared); negative up outputs give 0
    (an expert whose up rows all meet x negatively contributes nothing)."""
    x, w13, w2, tw, ids = _inputs(9, 40, 24, 3, 2, torch.float32, device, 70, gated=False)
    with mk.use_backend("triton"):
        got = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="relu2", gated=False)
    exact = _by_hand(x, w13, w2, tw, ids, "relu2", gated=False)
    assert _rel_err(got, exact) <= 1e-5
    assert _rel_err(got, _by_hand(x, w13, w2, tw, ids, "silu", gated=False)) > 1e-2
    xd, w13d, w2d = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    unsquared = torch.zeros_like(exact)
    for t, row in enumerate(ids.cpu().tolist()):
        for j, e in enumerate(row):
            unsquared[t] += tw[t, j].item() * (w2d[e] @ torch.relu(w13d[e] @ xd[t]))
    assert _rel_err(got, unsquared) > 1e-2
    # every up output negative: relu2 gives exactly 0
    x1 = x.abs()
    with mk.use_backend("triton"):
        zero = mk.ops.fused_moe(x1, -w13.abs(), w2, tw, ids, activation="relu2", gated=False)
    assert bool((zero == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nongated_strided_views_and_edges(backend, device):
    """Non-gated experts as strided views (x, w13 with a strided H, w2, routing); no
    tokens; one expert chosen k times (each copy counts); scratch poisoned."""
    assert _alloc.poison_enabled()
    t, h, inter, e, k = 6, 40, 24, 3, 2
    x, w13, w2, tw, ids = _inputs(t, h, inter, e, k, torch.float16, device, 71, gated=False)
    want = reference.fused_moe(x, w13, w2, tw, ids, activation="relu2", gated=False)
    xv = torch.randn(9, 2 * h + 3, device=device).half()[2:8, 1:2 * h + 1:2]
    xv.copy_(x)
    w13v = torch.randn(e, h, inter, device=device).half().transpose(1, 2)     # H strided
    w13v.copy_(w13)
    w2v = torch.randn(e + 1, h + 5, inter + 2, device=device).half()[1:, 2:h + 2, 1:inter + 1]
    w2v.copy_(w2)
    idsv = torch.zeros(k, t, dtype=ids.dtype, device=device).t()
    idsv.copy_(ids)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(xv, w13v, w2v, tw, idsv, activation="relu2", gated=False)
        empty = mk.ops.fused_moe(x[:0], w13, w2, tw[:0], ids[:0], activation="relu2",
                                 gated=False)
        x1, w13b, w2b, tw1, ids1 = _inputs(5, 33, 16, 1, 4, torch.float32, device, 72,
                                           gated=False)
        y4 = mk.ops.fused_moe(x1, w13b, w2b, tw1, ids1, activation="relu2", gated=False)
        y1 = mk.ops.fused_moe(x1, w13b, w2b, tw1.sum(1, keepdim=True), ids1[:, :1],
                              activation="relu2", gated=False)
    assert_close(y, want, scale=2.0)
    assert empty.shape == (0, h)
    assert_close(y4, y1)
    assert _rel_err(y4, _by_hand(x1, w13b, w2b, tw1, ids1, "relu2", gated=False)) <= 1e-5


def test_nongated_opcheck_compile_and_errors(device):
    """gated=False through the custom op (opcheck, torch.compile); relu2 with gated
    experts, a non-bool gated, an unknown activation and a w13 of gated experts' 2I rows
    are refused by name, at the public op and at the custom op."""
    x, w13, w2, tw, ids = _inputs(5, 24, 16, 3, 2, torch.float32, device, 73, gated=False)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe, (x, w13, w2, tw, ids),
                              {"activation": "relu2", "gated": False})

    def block(x, w13, w2, tw, ids):
        return mk.ops.fused_moe(x, w13, w2, tw, ids, activation="relu2", gated=False) + x

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, w13, w2, tw, ids)
    assert_close(got, reference.fused_moe(x, w13, w2, tw, ids, activation="relu2",
                                          gated=False) + x)
    _, w13g, _, _, _ = _inputs(5, 24, 16, 3, 2, torch.float32, device, 73)    # [E, 2I, H]
    relu2_gated = r"activation 'relu2' .*pass gated=False"
    with pytest.raises(ValueError, match=relu2_gated):
        mk.ops.fused_moe(x, w13g, w2, tw, ids, activation="relu2")
    with mk.use_backend("triton"), pytest.raises(ValueError, match=relu2_gated):
        torch.ops.minikernels.fused_moe(x, w13g, w2, tw, ids, activation="relu2")
    with pytest.raises(TypeError, match="gated must be a bool"):
        mk.ops.fused_moe(x, w13, w2, tw, ids, gated=0)
    allowed = (r"activation must be one of \('silu', 'gelu', 'gelu_tanh', 'relu2'\) with "
               r"gated=False, got 'relu'")
    with pytest.raises(ValueError, match=allowed):
        mk.ops.fused_moe(x, w13, w2, tw, ids, activation="relu", gated=False)
    with mk.use_backend("triton"), pytest.raises(ValueError, match=allowed):
        torch.ops.minikernels.fused_moe(x, w13, w2, tw, ids, activation="relu", gated=False)
    # gate and up rows stacked (2I) with gated=False: w13 is the one named
    with pytest.raises(ValueError, match=r"w13 must have I = 16 rows per expert with "
                                         r"gated=False"):
        mk.ops.fused_moe(x, w13g, w2, tw, ids, activation="relu2", gated=False)
    for bad, match in [((x, w13[:, :15], w2), r"w2 must have shape \[E = 3, H = 24, I = 15\]"),
                       ((x, w13[:, :0], w2), r"w13's second dim must be I > 0"),
                       ((x, w13[:, :, :8], w2), r"w13 must have shape \[E, I, H = 24\]")]:
        with pytest.raises(ValueError, match=match):
            mk.ops.fused_moe(*bad, tw, ids, activation="relu2", gated=False)
    # and gated experts given non-gated w13 [E, I, H] (I = 16 even): w2 is named
    with pytest.raises(ValueError, match=r"w2 must have shape \[E = 3, H = 24, I = 8\]"):
        mk.ops.fused_moe(x, w13, w2, tw, ids)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_nongated_relu2_decode_and_prefill(dtype):
    """Nemotron 3 Nano's experts on the GPU (H 2688, I 1856, 128 experts, k 6; non-gated
    relu2): a decode batch (BLOCK_M 16 / 32) and a prefill one (BLOCK_M 64: wgmma on
    sm_90a) against the reference."""
    for t in (64, 2048):
        x, w13, w2, tw, ids = _inputs(t, 2688, 1856, 128, 6, dtype, "cuda", 11, gated=False)
        with mk.use_backend("triton"):
            y = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="relu2", gated=False)
        want = reference.fused_moe(x, w13, w2, tw, ids, activation="relu2", gated=False)
        assert_close(y, want, scale=2.0)
