"""``mk.ops.fused_moe_int4`` (fused_moe with int4 experts, W4A16) against the reference
(fused_moe on the dequantized experts) and an independent per-token fp64 formula with its
own nibble unpacking: random shapes (no tokens, one token, odd token counts, one expert,
k > E so an expert repeats in a row), group sizes 8 / 16 / 32 / 64 / 128 and per-channel
(-1), with H and I multiples of 32 (one scale per K tile) or not (per-word scales, masked
K), fp16 / bf16, both backends, every tensor argument a strided view, scales of the other
half dtype, poisoned scratch buffers, opcheck, torch.compile and bad input; ``activation``
gelu / gelu_tanh (silu: the default) on grouped and ungrouped shapes, and its errors;
non-gated experts (``gated=False``: w13 [E, I, H/8], relu2 and silu) likewise."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import examples, HALF_DTYPES, assert_close, moe_by_hand, spy_launches
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import _alloc, reference

BACKENDS = ["reference", "triton"]
FORMULA_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GELUS = ["gelu", "gelu_tanh"]


def _int4(e, n, k, group, dtype, g, zero_frac=False):
    """Random int4 experts: qweight int32 [E, N, K/8] over all 32 bits (every nibble
    value, the sign bit included), scales sized so W has rows of norm ~1, zeros in 0..15
    (fractional ones when zero_frac: the format's float zero points)."""
    groups = 1 if group == -1 else k // group
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (e, n, k // 8), dtype=torch.int32, generator=g)
    s = ((torch.rand(e, n, groups, generator=g) + 0.5) / (4.0 * k ** 0.5)).to(dtype)
    z = torch.randint(0, 16, (e, n, groups), generator=g).float()
    if zero_frac:
        z = z + 0.5 * torch.randint(0, 2, z.shape, generator=g)
    return qw, s, z.to(dtype)


def _inputs(t, h, inter, e, k, group, dtype, device, seed=0, ids_dtype=torch.int64,
            scale_dtype=None, zero_frac=False, gated=True):
    g = torch.Generator().manual_seed(seed)
    sdt = scale_dtype or dtype
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = _int4(e, (2 if gated else 1) * inter, h, group, sdt, g, zero_frac)
    w2 = _int4(e, h, inter, group, sdt, g, zero_frac)
    tw = torch.rand(t, k, generator=g) + 0.1            # never 1: a dropped weight shows
    ids = torch.randint(0, e, (t, k), generator=g, dtype=ids_dtype)
    return [v.to(device) for v in (x, *w13, *w2, tw, ids)]


def _dequant_by_hand(qw, s, z, group, dtype):
    """Independent dequantization in fp64: nibble j of word w is column 8w + j; group of
    column c is c // G; scales / zeros first converted to x.dtype (the contract), W
    rounded to x.dtype."""
    e, n, kw = qw.shape
    k = kw * 8
    words = qw.cpu().long() & 0xFFFFFFFF                        # unsigned 32-bit
    q = torch.empty(e, n, k, dtype=torch.float64)
    for j in range(8):
        q[:, :, j::8] = ((words // 16 ** j) % 16).double()
    gs = k if group == -1 else group
    col_group = torch.arange(k) // gs
    sd = s.cpu().to(dtype).double()[:, :, col_group]
    zd = z.cpu().to(dtype).double()[:, :, col_group]
    return ((q - zd) * sd).to(dtype).double()


def _by_hand(x, w13q, w13s, w13z, w2q, w2s, w2z, tw, ids, group, activation="silu",
             gated=True):
    """Per (token, slot) in fp64 on the hand-dequantized experts; the activated
    intermediate rounded to x.dtype as the contract says."""
    w13 = _dequant_by_hand(w13q, w13s, w13z, group, x.dtype)
    w2 = _dequant_by_hand(w2q, w2s, w2z, group, x.dtype)
    return moe_by_hand(x, w13, w2, tw, ids, activation, gated)


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-3))


@st.composite
def _shapes(draw):
    group = draw(st.sampled_from([-1, 8, 16, 32, 64, 128]))
    if group == -1:        # per channel: multiples of 32 (one scale per K tile) or not
        h = draw(st.sampled_from([24, 40, 64, 96]))
        inter = draw(st.sampled_from([8, 32, 56, 64]))
    else:
        h = group * draw(st.sampled_from([1, 2]))
        inter = group * draw(st.sampled_from([1, 2] if group < 128 else [1]))
    assume(h <= 128 and inter <= 128)
    return h, inter, group


@settings(max_examples=examples(30), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), shape=_shapes(), e=st.integers(1, 8),
       k=st.integers(1, 4), dtype=st.sampled_from(HALF_DTYPES),
       backend=st.sampled_from(BACKENDS), ids_dtype=st.sampled_from([torch.int32, torch.int64]),
       zero_frac=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, shape, e, k, dtype, backend, ids_dtype, zero_frac,
                                       seed, device):
    h, inter, group = shape
    args = _inputs(t, h, inter, e, k, group, dtype, device, seed, ids_dtype,
                   zero_frac=zero_frac)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int4(*args, group)
    want = reference.fused_moe_int4(*args, group)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(*args, group)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


def test_reference_is_fused_moe_on_dequantized_experts():
    """The reference's definition, through the public ops: dequantize each expert with
    int4's dequantize_int4 (scales in x.dtype), round to x.dtype, then fused_moe."""
    x, w13q, w13s, w13z, w2q, w2s, w2z, tw, ids = _inputs(7, 64, 32, 3, 2, 32,
                                                           torch.float16, "cpu", 4)
    w13 = torch.stack([reference.dequantize_int4(w13q[i], w13s[i], w13z[i], 32)
                       for i in range(3)]).half()
    w2 = torch.stack([reference.dequantize_int4(w2q[i], w2s[i], w2z[i], 32)
                      for i in range(3)]).half()
    want = mk.ops.fused_moe(x, w13, w2, tw, ids)
    got = mk.ops.fused_moe_int4(x, w13q, w13s, w13z, w2q, w2s, w2z, tw, ids, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    t, h, inter, e, k, group = 6, 64, 32, 3, 2, 32
    args = _inputs(t, h, inter, e, k, group, dtype, device, 3)
    x, w13q, w13s, w13z, w2q, w2s, w2z, tw, ids = args
    want = reference.fused_moe_int4(*args, group)

    def view_of(v, kind):
        if kind == "trans" and v.shape[-1] == 1:
            kind = "pad"         # a size-1 last dim has no stride to get wrong
        if kind == "cols":       # every other column of a wider, offset buffer
            buf = torch.zeros(v.shape[0] + 1, 2 * v.shape[1] + 3, *v.shape[2:],
                              dtype=v.dtype, device=device)
            out = buf[1:, 1:2 * v.shape[1] + 1:2]
        elif kind == "pad":      # [E, N, K'] padded in every dim, unit inner stride
            buf = torch.zeros(*(s + 2 for s in v.shape), dtype=v.dtype, device=device)
            out = buf[1:-1, 2:, :v.shape[2]]
        else:                    # transposed storage: the last dim strided (copied)
            out = torch.zeros(*v.shape[:-2], v.shape[-1], v.shape[-2], dtype=v.dtype,
                              device=device).transpose(-1, -2)
        out.copy_(v)
        return out

    xv = view_of(x, "trans")
    views = [xv, view_of(w13q, "pad"), view_of(w13s, "trans"), view_of(w13z, "pad"),
             view_of(w2q, "trans"), view_of(w2s, "pad"), view_of(w2z, "trans"),
             view_of(tw, "cols"), view_of(ids, "trans")]
    xr = torch.zeros(t, 2 * h, dtype=dtype, device=device)[:, h:]       # row-strided x
    xr.copy_(x)
    assert not any(v.is_contiguous() for v in (*views, xr))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int4(*views, group)
        y2 = mk.ops.fused_moe_int4(xr, *views[1:], group)
    assert_close(y, want, scale=2.0)
    assert_close(y2, want, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scales_of_the_other_half_dtype(backend, device):
    """bf16 scales / zeros with fp16 x (and the reverse): converted to x.dtype first, as
    int4_matmul's kernels do."""
    for xdt, sdt in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        args = _inputs(5, 64, 64, 4, 2, 64, xdt, device, 8, scale_dtype=sdt)
        with mk.use_backend(backend):
            y = mk.ops.fused_moe_int4(*args, 64)
        cast = list(args)
        for i in (2, 3, 5, 6):
            cast[i] = args[i].to(xdt)
        assert_close(y, reference.fused_moe_int4(*cast, 64), scale=2.0)
        assert _rel_err(y, _by_hand(*args, 64)) <= FORMULA_TOL[xdt]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_grouped_dispatch(dtype, device):
    """One scale per row and K tile (GROUPED) when both matrices' group sizes are
    multiples of 32; per-word scales and masked K otherwise; both match the reference."""
    from minikernels.ops.triton import moe_int4

    cases = [((20, 64, 64, 4, 2, 32), True), ((20, 128, 64, 4, 2, 64), True),
             ((9, 96, 64, 3, 2, -1), True), ((9, 40, 24, 3, 2, -1), False),
             ((9, 64, 32, 3, 3, 8), False), ((9, 64, 32, 3, 2, 16), False)]
    with mk.use_backend("triton"), \
            spy_launches(moe_int4, "moe_int4_gate_up_kernel", "GROUPED") as g1, \
            spy_launches(moe_int4, "moe_int4_down_kernel", "GROUPED") as g2:
        for i, ((t, h, inter, e, k, group), grouped) in enumerate(cases):
            args = _inputs(t, h, inter, e, k, group, dtype, device, 10 + i)
            y = mk.ops.fused_moe_int4(*args, group)
            assert (g1[i], g2[i]) == (grouped, grouped), (h, inter, group)
            assert_close(y, reference.fused_moe_int4(*args, group), scale=2.0)


@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_activation_matches_reference_and_formula(dtype, activation, device):
    """activation= gelu / gelu_tanh with one scale per K tile (GROUPED) and with
    per-channel scales whose K is not a multiple of 32 (per-word scales, masked K): the
    gate-up launch gets it as its ACT constexpr; the result matches the reference and
    the fp64 formula with that activation written out (helpers.gate_act_by_hand)."""
    from minikernels.ops.triton import moe_int4

    for i, (t, h, inter, e, k, group) in enumerate([(8, 64, 64, 3, 2, 32),
                                                      (5, 40, 24, 3, 2, -1)]):
        args = _inputs(t, h, inter, e, k, group, dtype, device, 30 + i)
        with mk.use_backend("triton"), \
                spy_launches(moe_int4, "moe_int4_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe_int4(*args, group, activation=activation)
        assert acts == [activation]
        want = reference.fused_moe_int4(*args, group, activation=activation)
        assert_close(y, want, scale=2.0)
        exact = _by_hand(*args, group, activation)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        if activation == "gelu_tanh":       # far from the SiLU result: ACT took effect
            assert _rel_err(y, _by_hand(*args, group)) > 2 * FORMULA_TOL[dtype]


def test_activation_opcheck_and_errors(device):
    """The activation through the custom op (opcheck); anything but silu / gelu /
    gelu_tanh is refused by name, at the public op and at the custom op."""
    args = _inputs(5, 64, 32, 3, 2, 32, torch.float16, device, 2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int4, (*args, 32),
                              {"activation": "gelu_tanh"})
    allowed = r"activation must be one of \('silu', 'gelu', 'gelu_tanh', 'swigluoai'\), got "
    for bad in ("relu", "gelu_new", ""):
        with pytest.raises(ValueError, match=allowed + repr(bad)):
            mk.ops.fused_moe_int4(*args, 32, activation=bad)
        with mk.use_backend("triton"), pytest.raises(ValueError, match=allowed):
            torch.ops.minikernels.fused_moe_int4(*args, 32, activation=bad)
    with pytest.raises(TypeError, match="activation must be a str"):
        mk.ops.fused_moe_int4(*args, 32, activation=1)


def test_every_dispatched_config_is_registered():
    """Each (BLOCK_M, BLOCK_N, BLOCK_K, GROUPED, stages) the launcher can pick has an AOT
    spec (compiled without spills by tests/test_aot_compile.py); the gate-up kernel's
    with ACT silu and gelu_tanh, and non-gated (GATED False) with relu2."""
    from minikernels.ops.triton import moe_int4
    from minikernels.ops.triton.registry import all_kernels

    registered = {(s.fn.__name__, s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"],
                   s.constexprs["BLOCK_K"], s.constexprs["GROUPED"], s.num_warps,
                   s.num_stages, s.signature["x_ptr" if "x_ptr" in s.signature
                                              else "act_ptr"],
                   (s.constexprs.get("ACT", "silu"), s.constexprs.get("GATED", True)))
                  for s in all_kernels() if s.fn.__name__.startswith("moe_int4")}
    for n_pairs in (1, 100, 1000, 5000, 64 * 20, 64 * 40, 64 * 100):
        for gh, gi in ((32, 32), (128, 64), (40, 24), (8, 8), (1024, 768)):
            cfg = moe_int4.moe_int4_config(n_pairs, 64, gh, gi)
            for fn in ("moe_int4_gate_up_kernel", "moe_int4_down_kernel"):
                acts = ((("silu", True), ("gelu_tanh", True), ("relu2", False))
                        if "gate_up" in fn else (("silu", True),))
                for dt, act in ((d, a) for d in ("*fp16", "*bf16") for a in acts):
                    key = (fn, cfg.block_m, cfg.block_n, cfg.block_k, cfg.grouped,
                           cfg.num_warps, cfg.num_stages, dt, act)
                    assert key in registered, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); the
    scratch buffers are poisoned, so a pair the kernels skip turns the output NaN."""
    assert _alloc.poison_enabled()
    args = _inputs(0, 64, 32, 3, 2, 32, torch.float16, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int4(*args, 32)
    assert y.shape == (0, 64) and y.dtype == torch.float16
    args = _inputs(5, 64, 32, 1, 4, -1, torch.float16, device, 1)
    tw, ids = args[7], args[8]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int4(*args, -1)
        y1 = mk.ops.fused_moe_int4(*args[:7], tw.sum(1, keepdim=True), ids[:, :1], -1)
    assert_close(y, y1, scale=2.0)
    assert _rel_err(y, _by_hand(*args, -1)) <= FORMULA_TOL[torch.float16]


def test_opcheck_and_compile(device):
    args = _inputs(5, 64, 32, 3, 2, 32, torch.float16, device, 2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int4, (*args, 32))
        empty = (args[0][:0], *args[1:7], args[7][:0], args[8][:0], 32)
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int4, empty)

    def block(*a):
        return mk.ops.fused_moe_int4(*a, 32) + a[0]

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*args)
    assert_close(got, reference.fused_moe_int4(*args, 32) + args[0], scale=2.0)


def test_errors_name_the_argument(device):
    args = _inputs(4, 64, 32, 3, 2, 32, torch.float16, device)
    x, w13q, w13s, w13z, w2q, w2s, w2z, tw, ids = args

    def with_(**kw):
        names = ["x", "w13q", "w13s", "w13z", "w2q", "w2s", "w2z", "tw", "ids", "group"]
        vals = dict(zip(names, (*args, 32)))
        vals.update(kw)
        return [vals[n] for n in names]

    for bad, match in [
        (with_(x=x[0]), "x"),
        (with_(x=x.float()), "x must have dtype"),
        (with_(x=x[:, :60]), "multiple of 8"),
        (with_(x=x[:, :56]), "w13_qweight must have shape"),
        (with_(w13q=w13q.float()), "w13_qweight must have dtype"),
        (with_(w13q=w13q[:, :, :4]), "w13_qweight must have shape"),
        (with_(w13q=w13q[:, :63]), "w13_qweight's second dim"),
        (with_(w13q=w13q[:, :60], w13s=w13s[:, :60], w13z=w13z[:, :60]),
         "intermediate size I must be a multiple of 8"),
        (with_(w13s=w13s.float()), "w13_scales must have dtype"),
        (with_(w13s=w13s[:, :, :1]), "w13_scales must have shape"),
        (with_(w13z=w13z.bfloat16()), "w13_zeros must have dtype"),
        (with_(w13z=w13z[:2]), "w13_zeros must have shape"),
        (with_(w2q=w2q.to(torch.int64)), "w2_qweight must have dtype"),
        (with_(w2q=w2q[:, :, :2]), "w2_qweight must have shape"),
        (with_(w2q=w2q[:2]), "w2_qweight must have shape"),
        (with_(w2s=w2s[:, :, :0]), "w2_scales must have shape"),
        (with_(w2s=w2s.int()), "w2_scales must have dtype"),
        (with_(w2z=w2z[:, :32]), "w2_zeros must have shape"),
        (with_(w2z=w2z.float()), "w2_zeros must have dtype"),
        (with_(tw=tw.half()), "topk_weights"),
        (with_(tw=tw[:, :1]), "topk_weights must have"),
        (with_(ids=ids.float()), "topk_ids"),
        (with_(ids=ids[:3]), "topk_ids must have shape"),
        (with_(ids=torch.full_like(ids, 3)), "topk_ids values"),
        (with_(ids=torch.full_like(ids, -1)), "topk_ids values"),
        (with_(group=64), r"group_size \(64\) must divide H \(64\) and I \(32\)"),
        (with_(group=12), "positive multiple of 8"),
        (with_(group=0), "positive multiple of 8"),
        (with_(group=-2), "positive multiple of 8"),
        (with_(group=32.0), "group_size must be an int"),
        (with_(group=True), "group_size must be an int"),
        (with_(group=-1), "w13_scales must have shape"),    # per channel: one group
        (with_(group=16), "w13_scales must have shape"),    # scales sized for G = 32
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe_int4(*bad)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [128, -1])
def test_gpu_decode_shape_and_cuda_graph(dtype, group):
    """A decode batch at model size on the GPU (256 tokens, 64 experts, k 8), then the
    same call captured in a CUDA graph (the host-side sort has no sync) and replayed on
    new routing."""
    args = _inputs(256, 1024, 768, 64, 8, group, dtype, "cuda", 7)
    tw, ids = args[7], args[8]
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int4(*args, group)
        assert_close(y, reference.fused_moe_int4(*args, group), scale=2.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe_int4(*args, group)
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        tw.copy_(torch.rand(tw.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe_int4(*args, group), scale=2.0)


NONGATED = ["relu2", "silu"]


@pytest.mark.parametrize("activation", NONGATED)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_nongated_matches_reference_and_formula(dtype, activation, device):
    """gated=False (w13_qweight [E, I, H/8] and its scales / zeros [E, I, H/G], the up
    rows only; act(up)) with one scale per K tile (GROUPED) and per-channel scales whose
    K is not a multiple of 32 (per-word scales, masked K): the gate-up launch gets
    GATED False and the ACT; the result matches the reference and the fp64 formula on
    the hand-dequantized experts (relu2: max(u, 0)^2)."""
    from minikernels.ops.triton import moe_int4

    for i, (t, h, inter, e, k, group) in enumerate([(8, 64, 64, 3, 2, 32),
                                                      (5, 40, 24, 3, 3, -1)]):
        args = _inputs(t, h, inter, e, k, group, dtype, device, 60 + i, gated=False)
        assert args[1].shape == (e, inter, h // 8)
        with mk.use_backend("triton"), \
                spy_launches(moe_int4, "moe_int4_gate_up_kernel", "GATED") as gated, \
                spy_launches(moe_int4, "moe_int4_gate_up_kernel", "ACT") as acts:
            y = mk.ops.fused_moe_int4(*args, group, activation=activation, gated=False)
        assert (gated, acts) == ([False], [activation])
        want = reference.fused_moe_int4(*args, group, activation=activation, gated=False)
        assert y.shape == (t, h) and y.dtype == dtype
        assert_close(y, want, scale=2.0)
        exact = _by_hand(*args, group, activation, gated=False)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
        if activation == "relu2":           # far from the SiLU result: ACT took effect
            assert _rel_err(y, _by_hand(*args, group, "silu", gated=False)) > \
                2 * FORMULA_TOL[dtype]


def test_nongated_edges_opcheck_and_errors(device):
    """Non-gated int4 experts: no tokens; the custom op (opcheck); relu2 with gated
    experts and a w13_qweight of gated experts' 2I rows with gated=False are refused by
    name."""
    args = _inputs(5, 64, 32, 3, 2, 32, torch.float16, device, 62, gated=False)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int4, (*args, 32),
                              {"activation": "relu2", "gated": False})
        empty = (args[0][:0], *args[1:7], args[7][:0], args[8][:0], 32)
        y = mk.ops.fused_moe_int4(*empty, activation="relu2", gated=False)
    assert y.shape == (0, 64)
    gated_args = _inputs(5, 64, 32, 3, 2, 32, torch.float16, device, 62)
    with pytest.raises(ValueError, match=r"activation 'relu2' .*pass gated=False"):
        mk.ops.fused_moe_int4(*gated_args, 32, activation="relu2")
    with mk.use_backend("triton"), pytest.raises(ValueError, match=r"pass gated=False"):
        torch.ops.minikernels.fused_moe_int4(*gated_args, 32, activation="relu2")
    with pytest.raises(ValueError, match=r"w13_qweight must have I = 32 rows per expert "
                                         r"with gated=False"):
        mk.ops.fused_moe_int4(*gated_args, 32, activation="relu2", gated=False)
    x, w13q, w13s, w13z = args[:4]
    with pytest.raises(ValueError, match=r"w13_scales must have shape \[E = 3, 32, K / G"):
        mk.ops.fused_moe_int4(x, w13q, gated_args[2], *args[3:], 32, gated=False)
    with pytest.raises(ValueError, match=r"w13_qweight must have shape \[E, I, H / 8 = 8\]"):
        mk.ops.fused_moe_int4(x, w13q[:, :, :4], *args[2:], 32, gated=False)
