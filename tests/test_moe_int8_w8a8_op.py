"""``mk.ops.fused_moe_int8_w8a8`` (fused_moe with INT8 W8A8 experts: int8 weights with one
fp32 scale per output row, activations quantized per token, exact int32 sums; vLLM's
``use_int8_w8a8`` with ``per_channel_quant``) against the reference and an independent
per-(token, slot) fp64 formula written out here: random shapes (no tokens, one token, odd
H / I, k > E so an expert repeats in a row), fp16 / bf16 / fp32 x, both backends, every
tensor argument a strided view, poisoned scratch buffers, the kernels' tile dispatch and
its AOT specs, the activations (gelu_tanh, swigluoai with biases, non-gated relu2),
opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import DTYPES, HALF_DTYPES, assert_close, examples, gate_act_by_hand, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_test_utils import lora_delta_by_hand, random_moe_lora

import minikernels as mk
from minikernels.ops import _alloc, reference

BACKENDS = ["reference", "triton"]
FORMULA_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


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


def _quantize_row(v):
    """One row (fp32) to int8 per the contract, written out: s = max|v| / 127,
    q = clamp(round_half_even(v / s), -128, 127) (0 for an all-zero row)."""
    s = v.abs().max() / 127.0
    q = torch.zeros_like(v) if s == 0 else torch.round(v / s).clamp(-128, 127)
    return q.double(), float(s)


def _by_hand(x, w13, s13, w2, s2, tw, ids, activation="silu", gated=True, b13=None,
             b2=None, lora=None):
    """Per (token, slot) in fp64: x's row quantized, the integer sums in fp64 (exact),
    scaled by the two scales, + bias, the activation, rounded to x.dtype, quantized
    again, the down GEMM likewise, times the router weight."""
    inter = w2.shape[2]
    w13d, w2d = w13.cpu().double(), w2.cpu().double()
    s13d, s2d = s13.cpu().double(), s2.cpu().double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t, row in enumerate(ids.cpu().tolist()):
        xq, sx = _quantize_row(x[t].cpu().float())
        for j, e in enumerate(row):
            gu = sx * s13d[e] * (w13d[e] @ xq)
            if b13 is not None:
                gu = gu + b13[e].cpu().double()
            slot = -1 if lora is None else int(lora.token_slots[t])
            if slot >= 0:        # LoRA on the unquantized x, rounded to x.dtype
                gu = gu + lora_delta_by_hand(lora.a13, lora.b13, lora.scaling, slot, e,
                                      x[t].cpu().double(), x.dtype)
            if activation == "swigluoai":
                g_, u_ = gu[:inter].clamp(max=7.0), gu[inter:].clamp(-7.0, 7.0)
                act = (u_ + 1) * g_ * torch.sigmoid(1.702 * g_)
            elif gated:
                act = gate_act_by_hand(gu[:inter], activation) * gu[inter:]
            else:
                act = gate_act_by_hand(gu, activation)
            aq, sa = _quantize_row(act.to(x.dtype).float())
            y = sa * s2d[e] * (w2d[e] @ aq)
            if b2 is not None:
                y = y + b2[e].cpu().double()
            if slot >= 0:        # on the intermediate before its quantization
                y = y + lora_delta_by_hand(lora.a2, lora.b2, lora.scaling, slot, e,
                                    act.to(x.dtype).double(), x.dtype)
            out[t] += float(tw[t, j]) * y
    return out


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
        y = mk.ops.fused_moe_int8_w8a8(*args)
    want = reference.fused_moe_int8_w8a8(*args)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(*args)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


def test_reference_is_vllms_per_expert_recipe(device):
    """The reference's definition through public ops, as vLLM's test_int8_moe builds its
    reference per expert: scaled_int8_quant(x), scaled_mm with the per-token and
    per-channel scales, silu_and_mul, scaled_int8_quant of the intermediate, scaled_mm,
    the router weights. And W8A8 is not W8A16: the activations' rounding moves the
    result (by well under the int8 step of each row)."""
    x, w13, s13, w2, s2, tw, ids = _inputs(7, 80, 40, 3, 2, torch.bfloat16, device, 4)
    out = torch.zeros(7, 80, dtype=torch.float32, device=device)
    with mk.use_backend("reference"):
        xq, sx, _ = mk.ops.scaled_int8_quant(x)
        for t in range(7):
            for j in range(2):
                e = int(ids[t, j])
                gu = mk.ops.scaled_mm(xq[t:t + 1], w13[e].t(), sx[t:t + 1], s13[e],
                                      torch.float32)
                act = mk.ops.silu_and_mul(gu).to(x.dtype)
                aq, sa, _ = mk.ops.scaled_int8_quant(act)
                out[t] += tw[t, j] * mk.ops.scaled_mm(aq, w2[e].t(), sa, s2[e],
                                                      torch.float32)[0]
        got = mk.ops.fused_moe_int8_w8a8(x, w13, s13, w2, s2, tw, ids)
    torch.testing.assert_close(got, out.to(x.dtype), rtol=0, atol=0)
    w8a16 = reference.fused_moe_int8(x, w13, s13, w2, s2, tw, ids)
    assert 1e-3 < _rel_err(got, w8a16.double().cpu()) < 5e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    t, h, inter, e, k = 6, 64, 32, 3, 2
    args = _inputs(t, h, inter, e, k, dtype, device, 3)
    x, w13, s13, w2, s2, tw, ids = args
    want = reference.fused_moe_int8_w8a8(*args)

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
    w2p = torch.zeros(e, h, inter + 16, dtype=torch.int8, device=device)[:, :, 16:]
    w2p.copy_(w2)                               # aligned rows of a padded buffer
    assert not any(v.is_contiguous() for v in (*views, xr, w13p, s13p, w2p))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8_w8a8(*views)
        y2 = mk.ops.fused_moe_int8_w8a8(xr, w13p, s13p, w2p, *views[4:])
    assert_close(y, want, scale=2.0)
    assert_close(y2, want, scale=2.0)


def test_tile_dispatch_and_registered_specs(device):
    """16-byte aligned int8 rows with K a multiple of BLOCK_K take unmasked vector loads
    (EVEN_K); K = 48 halves BLOCK_K to 32 masked (int8 MMA's K step is 32); unaligned
    weights take masked 32-wide tiles; all match the reference. Every (BLOCK_M, BLOCK_N,
    kind, dtype, ACT, GATED) the launcher picks has an AOT spec at a BLOCK_K no smaller
    than the dispatched one (tests/test_aot_compile.py: no spills)."""
    from minikernels.ops.triton import moe_int8_w8a8 as w8a8
    from minikernels.ops.triton.registry import all_kernels

    # (t, h, inter, e, k), gate-up (EVEN_K, BLOCK_K), down (EVEN_K, BLOCK_K)
    cases = [((9, 256, 128, 3, 2), (True, 128), (True, 128)),
             ((9, 96, 64, 3, 2), (True, 32), (True, 64)),
             ((9, 64, 48, 3, 2), (True, 64), (False, 32)),        # I = 48: ragged down K
             ((9, 200, 40, 3, 2), (False, 32), (False, 32))]      # unaligned rows
    with mk.use_backend("triton"), \
            spy_launches(w8a8, "moe_w8a8_gate_up_kernel", "EVEN_K") as even13, \
            spy_launches(w8a8, "moe_w8a8_gate_up_kernel", "BLOCK_K") as bk13, \
            spy_launches(w8a8, "moe_w8a8_down_kernel", "EVEN_K") as even2, \
            spy_launches(w8a8, "moe_w8a8_down_kernel", "BLOCK_K") as bk2:
        for i, (shape, want13, want2) in enumerate(cases):
            args = _inputs(*shape, torch.float16, device, 20 + i)
            y = mk.ops.fused_moe_int8_w8a8(*args)
            assert (even13[i], bk13[i]) == want13, shape
            assert (even2[i], bk2[i]) == want2, shape
            assert_close(y, reference.fused_moe_int8_w8a8(*args), scale=2.0)

    registered = {}
    for s in all_kernels():
        if s.fn in (w8a8.moe_w8a8_gate_up_kernel, w8a8.moe_w8a8_down_kernel):
            c = s.constexprs
            key = (s.fn.__name__, c["BLOCK_M"], c["BLOCK_N"], c["EVEN_K"], c["ALIGNED"],
                   s.num_warps, s.num_stages, s.signature["bias_ptr"],   # x's dtype
                   c.get("ACT", "silu"), c.get("GATED", True))
            registered[key] = max(registered.get(key, 0), c["BLOCK_K"])
    assert len(registered) >= 60
    for dt in ("*fp16", "*bf16", "*fp32"):
        for n_pairs in (1, 100, 1000, 64 * 20, 64 * 40, 64 * 100):
            for k_dim, aligned in ((4096, True), (2880, True), (1536, True), (48, True),
                                   (1040, True), (200, False), (4096, False)):
                for gate_up in (True, False):
                    cfg = w8a8.moe_w8a8_config(n_pairs, 64, k_dim, aligned, gate_up)
                    fn = "moe_w8a8_gate_up_kernel" if gate_up else "moe_w8a8_down_kernel"
                    acts = ((("silu", True), ("gelu_tanh", True), ("relu2", False))
                            if gate_up and dt != "*fp32" else (("silu", True),))
                    for act, gated in acts:
                        key = (fn, cfg.block_m, cfg.block_n, cfg.even_k, aligned,
                               cfg.num_warps, cfg.num_stages, dt, act, gated)
                        assert key in registered and registered[key] >= cfg.block_k, key


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_biases_and_nongated(dtype, device):
    """gelu_tanh; GPT-OSS's swigluoai with expert biases (added after the scales); and
    non-gated relu2 experts (w13 [E, I, H], act(up)): the gate-up launch gets each ACT /
    GATED / HAS_BIAS; every result matches the reference and the fp64 formula, aligned
    (EVEN_K) and on odd sizes (masked)."""
    from minikernels.ops.triton import moe_int8_w8a8 as w8a8

    for i, (t, h, inter, e, k) in enumerate([(8, 64, 32, 3, 2), (5, 37, 19, 3, 3)]):
        for activation, gated, bias in (("gelu_tanh", True, False),
                                        ("swigluoai", True, True), ("relu2", False, False)):
            args = _inputs(t, h, inter, e, k, dtype, device, 30 + i, gated=gated)
            kw = {"activation": activation, "gated": gated}
            if bias:
                g = torch.Generator().manual_seed(i)
                kw["w13_bias"] = torch.randn(e, 2 * inter, generator=g).to(dtype).to(device)
                kw["w2_bias"] = torch.randn(e, h, generator=g).to(dtype).to(device)
            with mk.use_backend("triton"), \
                    spy_launches(w8a8, "moe_w8a8_gate_up_kernel", "ACT") as acts, \
                    spy_launches(w8a8, "moe_w8a8_gate_up_kernel", "HAS_BIAS") as biased:
                y = mk.ops.fused_moe_int8_w8a8(*args, **kw)
            assert (acts, biased) == ([activation], [bias])
            want = reference.fused_moe_int8_w8a8(*args, **kw)
            assert_close(y, want, scale=2.0)
            exact = _by_hand(*args, activation, gated, kw.get("w13_bias"), kw.get("w2_bias"))
            assert _rel_err(want, exact) <= FORMULA_TOL[dtype], activation
            assert _rel_err(y, exact) <= FORMULA_TOL[dtype], activation
            assert _rel_err(y, _by_hand(*args[:5], args[5], args[6], "silu", gated)) \
                > 2 * FORMULA_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); odd sizes
    at T = 1; an all-zero token row (scale 0: its output is the biases' alone); the
    scratch buffers are poisoned, so a pair the kernels skip turns the output NaN."""
    assert _alloc.poison_enabled()
    args = _inputs(0, 64, 32, 3, 2, torch.float16, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8_w8a8(*args)
    assert y.shape == (0, 64) and y.dtype == torch.float16
    args = _inputs(5, 72, 40, 1, 4, torch.bfloat16, device, 1)
    tw, ids = args[5], args[6]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8_w8a8(*args)
        y1 = mk.ops.fused_moe_int8_w8a8(*args[:5], tw.sum(1, keepdim=True), ids[:, :1])
    assert_close(y, y1, scale=2.0)
    assert _rel_err(y, _by_hand(*args)) <= FORMULA_TOL[torch.bfloat16]
    args = _inputs(1, 33, 7, 2, 3, torch.float16, device, 2)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8_w8a8(*args)
    assert _rel_err(y, _by_hand(*args)) <= FORMULA_TOL[torch.float16]
    x, w13, s13, w2, s2, tw, ids = _inputs(4, 64, 32, 3, 2, torch.float32, device, 5)
    x[2] = 0.0
    b2 = torch.randn(3, 64, device=device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8_w8a8(x, w13, s13, w2, s2, tw, ids, w2_bias=b2)
    zero_row = (tw[2, :, None] * b2[ids[2].long()]).sum(0)
    torch.testing.assert_close(y[2], zero_row, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_row_scales_are_per_output_row(dtype, device):
    """Zero scales on some rows zero exactly those outputs' contributions: a down row
    scaled 0 gives an exactly-zero output column, whatever the weights."""
    x, w13, s13, w2, s2, tw, ids = _inputs(6, 48, 24, 2, 2, dtype, device, 9)
    s2 = s2.clone()
    s2[:, 5] = 0.0
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int8_w8a8(x, w13, s13, w2, s2, tw, ids)
    assert bool((y[:, 5] == 0).all()) and bool((y[:, 4] != 0).any())
    assert_close(y, reference.fused_moe_int8_w8a8(x, w13, s13, w2, s2, tw, ids), scale=2.0)


def test_opcheck_and_compile(device):
    args = _inputs(5, 64, 32, 3, 2, torch.float16, device, 2)
    x, w13, s13, w2, s2, tw, ids = args
    op = torch.ops.minikernels.fused_moe_int8_w8a8
    with mk.use_backend("triton"):
        torch.library.opcheck(op, tuple(args))
        torch.library.opcheck(op, (x[:0], w13, s13, w2, s2, tw[:0], ids[:0]))
        torch.library.opcheck(op, tuple(args), {"activation": "gelu_tanh"})
        torch.library.opcheck(op, (x, w13[:, :32].contiguous(), s13[:, :32].contiguous(),
                                   w2, s2, tw, ids), {"activation": "relu2", "gated": False})

    def layer(*a):
        return mk.ops.fused_moe_int8_w8a8(*a) + a[0]

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*args)
    assert_close(got, reference.fused_moe_int8_w8a8(*args) + x, scale=2.0)


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
        (with_(w13=w13[0]), "w13 must be 3-D"),
        (with_(w13=w13[:, :63]), "w13's second dim"),
        (with_(s13=s13.half()), "w13_scale must have dtype"),
        (with_(s13=s13[:, :1]), r"w13_scale must have shape \[E = 3, 64\]"),
        (with_(w2=w2[:, :, :16]), r"w2 must have shape \[E = 3, 64, 32\]"),
        (with_(w2=w2.float()), "w2 must have dtype"),
        (with_(s2=s2[:, :0]), r"w2_scale must have shape \[E = 3, 64\]"),
        (with_(tw=tw.half()), "topk_weights"),
        (with_(tw=tw[:, :1]), "topk_weights must have"),
        (with_(ids=ids.float()), "topk_ids"),
        (with_(ids=ids[:3]), "topk_ids must have shape"),
        (with_(ids=torch.full_like(ids, 3)), "topk_ids values"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe_int8_w8a8(*bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.ops.fused_moe_int8_w8a8(*args, activation="relu")
    with pytest.raises(ValueError, match="w13_bias"):
        mk.ops.fused_moe_int8_w8a8(*args, w13_bias=torch.zeros(3, 63, dtype=x.dtype,
                                                               device=device))
    with mk.use_backend("triton"), pytest.raises(ValueError, match="activation must be"):
        torch.ops.minikernels.fused_moe_int8_w8a8(*args, activation="relu")


@pytest.mark.parametrize("t", [5, 40])          # BGMV (< 32 pairs) and SGMV LoRA paths
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora(t, dtype, device):
    """Per-token LoRA on the W8A8 experts (MoELoRA, mixed slots): the updates act on the
    unquantized inputs (d13 from x, d2 from the intermediate before its quantization),
    added before the activation / the router weight; matches the reference and the fp64
    formula; all slots -1 is bit-identical to no LoRA, tokens at slot -1 get the base
    rows exactly; the LoRA launch sets HAS_DELTA; opcheck with the LoRA arguments."""
    from minikernels.ops.triton import moe_int8_w8a8 as w8a8

    h, inter, e, k = 64, 32, 3, 2
    args = _inputs(t, h, inter, e, k, dtype, device, 50 + t)
    lora = random_moe_lora(t, h, inter, e, 2, 4, dtype, device, t)
    with mk.use_backend("triton"), \
            spy_launches(w8a8, "moe_w8a8_down_kernel", "HAS_DELTA") as has_delta:
        y = mk.ops.fused_moe_int8_w8a8(*args, lora=lora)
        base = mk.ops.fused_moe_int8_w8a8(*args)
        none = mk.ops.fused_moe_int8_w8a8(*args, lora=lora._replace(
            token_slots=torch.full_like(lora.token_slots, -1)))
    assert has_delta == [True, False, True]
    want = reference.fused_moe_int8_w8a8(*args, lora)
    assert_close(y, want, scale=2.0)
    exact = _by_hand(*args, lora=lora)
    assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
    assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
    assert torch.equal(none, base)
    rows = lora.token_slots == -1
    assert torch.equal(y[rows], base[rows]) and not torch.equal(y[~rows], base[~rows])
    if t == 5 and dtype == torch.float16:
        with mk.use_backend("triton"):
            torch.library.opcheck(torch.ops.minikernels.fused_moe_int8_w8a8,
                                  (*args, *lora))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_and_prefill_shapes_and_cuda_graph(dtype):
    """A decode and a prefill batch at model size on the GPU (64 experts, k 8), then the
    decode call captured in a CUDA graph (no host sync: the sort and both quantizations
    run on the device) and replayed on new inputs and routing."""
    for t in (256, 2048):
        args = _inputs(t, 1024, 768, 64, 8, dtype, "cuda", 7)
        with mk.use_backend("triton"):
            y = mk.ops.fused_moe_int8_w8a8(*args)
        assert_close(y, reference.fused_moe_int8_w8a8(*args), scale=2.0)
    args = _inputs(256, 1024, 768, 64, 8, dtype, "cuda", 8)
    x, tw, ids = args[0], args[5], args[6]
    with mk.use_backend("triton"):
        mk.ops.fused_moe_int8_w8a8(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe_int8_w8a8(*args)
        x.copy_(torch.randn(x.shape, device="cuda"))
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        tw.copy_(torch.rand(tw.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe_int8_w8a8(*args), scale=2.0)
