"""GPT-OSS's experts on the fused MoE ops: ``activation="swigluoai"`` (the clamped SwiGLU,
(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit)) with
its ``alpha`` / ``limit``, and the optional per-expert biases ``w13_bias`` [E, 2I] (added
to the gate / up pre-activations) and ``w2_bias`` [E, H] (added to each expert's down
output before the router weight), on all four fused ops (dense, int4, fp8, int8 experts).

Against the fp32 reference and an independent per-(token, slot) fp64 formula written here:
random shapes (no tokens, one token, odd sizes, one expert, k > E), fp16 / bf16 / fp32,
both backends, each bias alone, both or none, a limit that clamps and one that does not;
every tensor argument (the biases too) a view with its own strides; poisoned scratch
buffers (conftest); the launches' HAS_BIAS / ACT constexprs; the AOT specs GPT-OSS's
shapes dispatch to; torch.compile with the new arguments (their opcheck:
tests/test_op_contract.py); bad input named."""
from __future__ import annotations

import pytest
import torch
from helpers import examples, DTYPES, assert_close, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st
from test_strided_views import view_of

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", "triton"]
FORMULA_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ALPHA = 1.702


def _inputs(t, h, inter, e, k, dtype, device, seed=0):
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights, topk_ids, w13_bias [E, 2I],
    w2_bias [E, H]: gates / ups of O(1), so a limit of 1 clamps a good share of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    tw = torch.rand(t, k, generator=g) + 0.1
    ids = torch.randint(0, e, (t, k), generator=g)
    b13 = (torch.randn(e, 2 * inter, generator=g) * 0.5).to(dtype)
    b2 = (torch.randn(e, h, generator=g) * 0.5).to(dtype)
    return [v.to(device) for v in (x, w13, w2, tw, ids, b13, b2)]


def _by_hand(x, w13, w2, tw, ids, b13=None, b2=None, alpha=ALPHA, limit=7.0):
    """The op's contract in fp64, one (token, slot) at a time: gate / up = w13[e] @ x[t]
    (+ w13_bias[e]); g = min(gate, limit), u = clamp(up, -limit, limit); the intermediate
    (u + 1) * g * sigmoid(alpha g) rounded to x.dtype; + w2_bias[e] after the down
    projection, then times the router weight. [T, H] fp64 on the CPU."""
    inter = w2.shape[2]
    xd, w13d, w2d, twd = (v.double().cpu() for v in (x, w13, w2, tw))
    b13d = None if b13 is None else b13.double().cpu()
    b2d = None if b2 is None else b2.double().cpu()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t, row in enumerate(ids.cpu().tolist()):
        for j, e in enumerate(row):
            gu = w13d[e] @ xd[t]
            if b13d is not None:
                gu = gu + b13d[e]
            gate, up = gu[:inter], gu[inter:]
            gate = torch.minimum(gate, torch.tensor(limit, dtype=torch.float64))
            up = up.clamp(-limit, limit)
            act = ((up + 1) * gate / (1 + torch.exp(-alpha * gate))).to(x.dtype).double()
            y = w2d[e] @ act
            if b2d is not None:
                y = y + b2d[e]
            out[t] += twd[t, j] * y
    return out


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-2))


@settings(max_examples=examples(16), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), h=st.sampled_from([1, 33, 64]),
       inter=st.sampled_from([1, 16, 33]), e=st.sampled_from([1, 3, 8]),
       k=st.sampled_from([1, 2, 4]), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS),
       biases=st.sampled_from(["both", "w13", "w2", "none"]),
       limit=st.sampled_from([1.0, 7.0]), seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, h, inter, e, k, dtype, backend, biases, limit,
                                       seed, device):
    x, w13, w2, tw, ids, b13, b2 = _inputs(t, h, inter, e, k, dtype, device, seed)
    b13 = b13 if biases in ("both", "w13") else None
    b2 = b2 if biases in ("both", "w2") else None
    kw = dict(activation="swigluoai", w13_bias=b13, w2_bias=b2, alpha=ALPHA, limit=limit)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, **kw)
    want = reference.fused_moe(x, w13, w2, tw, ids, **kw)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(x, w13, w2, tw, ids, b13, b2, ALPHA, limit)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_get_the_activation_and_biases(dtype, device):
    """An aligned shape (vector-load tiles) and an odd one: each launch gets ACT swigluoai
    and HAS_BIAS as given; the clamp and the biases both change the result (limit 1 vs
    7, biases vs none), so each is applied; biases None equal no biases bit for bit."""
    from minikernels.ops.triton import moe as triton_moe

    for i, (t, h, inter, e, k) in enumerate([(8, 128, 128, 3, 2), (5, 33, 17, 3, 3)]):
        x, w13, w2, tw, ids, b13, b2 = _inputs(t, h, inter, e, k, dtype, device, 10 + i)
        with mk.use_backend("triton"), \
                spy_launches(triton_moe, "moe_gate_up_kernel", "ACT") as acts, \
                spy_launches(triton_moe, "moe_gate_up_kernel", "HAS_BIAS") as gb, \
                spy_launches(triton_moe, "moe_down_kernel", "HAS_BIAS") as db:
            y = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="swigluoai", w13_bias=b13,
                                 w2_bias=b2, limit=1.0)
            y7 = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="swigluoai", w13_bias=b13,
                                  w2_bias=b2, limit=7.0)
            y0 = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="swigluoai", limit=1.0)
            y0n = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="swigluoai", limit=1.0,
                                   w13_bias=None, w2_bias=None)
            yb2 = mk.ops.fused_moe(x, w13, w2, tw, ids, activation="swigluoai", limit=1.0,
                                   w2_bias=b2)
        assert acts == ["swigluoai"] * 5
        assert gb == [True, True, False, False, False] and db == [True, True, False, False,
                                                                   True]
        assert torch.equal(y0, y0n)
        for got, b13_, b2_, lim in ((y, b13, b2, 1.0), (y7, b13, b2, 7.0),
                                    (y0, None, None, 1.0), (yb2, None, b2, 1.0)):
            exact = _by_hand(x, w13, w2, tw, ids, b13_, b2_, ALPHA, lim)
            assert _rel_err(got, exact) <= FORMULA_TOL[dtype]
        exact = _by_hand(x, w13, w2, tw, ids, b13, b2, ALPHA, 1.0)
        for other in (y7, y0, yb2):                      # each part of the math matters
            assert _rel_err(other, exact) > 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    """x, the experts, the routing and both biases as views with their own strides (the
    biases' rows padded, storage permuted, and their last dim strided)."""
    t, h, inter, e, k = 6, 40, 24, 3, 2
    x, w13, w2, tw, ids, b13, b2 = _inputs(t, h, inter, e, k, dtype, device, 3)
    kw = dict(activation="swigluoai", limit=1.0)
    want = reference.fused_moe(x, w13, w2, tw, ids, w13_bias=b13, w2_bias=b2, **kw)
    g = torch.Generator().manual_seed(4)
    views = [view_of(x, g, step_last=True), view_of(w13, g, step_last=True, permute=True),
             view_of(w2, g, permute=True), view_of(tw, g, step_last=True),
             view_of(ids, g, permute=True)]
    bviews = (view_of(b13, g, step_last=True, permute=True), view_of(b2, g, step_last=True))
    assert not any(v.is_contiguous() for v in (*views, *bviews))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(*views, w13_bias=bviews[0], w2_bias=bviews[1], **kw)
    assert_close(y, want, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts, its w2 bias
    k times); poisoned scratch buffers (an unwritten pair turns the output NaN)."""
    x, w13, w2, tw, ids, b13, b2 = _inputs(0, 33, 16, 3, 2, torch.float32, device)
    kw = dict(activation="swigluoai", limit=1.0)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, w13_bias=b13, w2_bias=b2, **kw)
    assert y.shape == (0, 33)
    x, w13, w2, tw, ids, b13, b2 = _inputs(5, 33, 16, 1, 4, torch.float32, device, 1)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, w13_bias=b13, w2_bias=b2, **kw)
        y1 = mk.ops.fused_moe(x, w13, w2, tw.sum(1, keepdim=True), ids[:, :1], w13_bias=b13,
                              w2_bias=b2, **kw)
    assert_close(y, y1)
    assert _rel_err(y, _by_hand(x, w13, w2, tw, ids, b13, b2, ALPHA, 1.0)) <= 1e-5


def _quantized(kind: str, w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    """The experts' arguments of fused_moe_<kind> (int4 group 32, fp8 blocks 32 x 32,
    int8 per row), quantized from w13 / w2 by RTN."""
    if kind == "int8":
        s13 = w13.float().abs().amax(-1) / 127
        s2 = w2.float().abs().amax(-1) / 127
        return ((w13.float() / s13[..., None]).round().to(torch.int8), s13,
                (w2.float() / s2[..., None]).round().to(torch.int8), s2)
    if kind == "fp8":
        from minikernels.quant.fp8 import quantize_fp8

        q13 = [quantize_fp8(w, (32, 32)) for w in w13.float()]
        q2 = [quantize_fp8(w, (32, 32)) for w in w2.float()]
        return (torch.stack([q.weight for q in q13]), torch.stack([q.scale for q in q13]),
                torch.stack([q.weight for q in q2]), torch.stack([q.scale for q in q2]))
    from minikernels.quant import quantize_int4

    q13 = [quantize_int4(w, 32) for w in w13]
    q2 = [quantize_int4(w, 32) for w in w2]
    return tuple(torch.stack([getattr(q, a) for q in qs]) for qs in (q13, q2)
                 for a in ("qweight", "scales", "zeros"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int4", "fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_experts(kind, dtype, backend, device):
    """fused_moe_int4 / _fp8 / _int8 with swigluoai and both biases: the reference (the
    dense op on the dequantized experts) and the Triton kernels agree, and the reference
    equals the fp64 formula on the dequantized experts. The biases' rows are views."""
    t, h, inter, e, k = 9, 64, 32, 4, 2
    x, w13, w2, tw, ids, b13, b2 = _inputs(t, h, inter, e, k, dtype, device, 7)
    experts = _quantized(kind, w13, w2)
    op = getattr(mk.ops, f"fused_moe_{kind}")
    ref_op = getattr(reference, f"fused_moe_{kind}")
    extra = {"int4": (32,), "fp8": ((32, 32),), "int8": ()}[kind]
    args = (x, *experts, tw, ids, *extra)
    kw = dict(activation="swigluoai", limit=1.0, w13_bias=b13, w2_bias=b2)
    want = ref_op(*args, **kw)
    g = torch.Generator().manual_seed(8)
    with mk.use_backend(backend):
        y = op(*args, activation="swigluoai", limit=1.0,
               w13_bias=view_of(b13, g, step_last=True), w2_bias=view_of(b2, g, permute=True))
    assert_close(y, want, scale=2.0)
    if kind == "int4":
        d13 = reference.dequantize_int4_experts(*experts[:3], 32, dtype)
        d2 = reference.dequantize_int4_experts(*experts[3:], 32, dtype)
    elif kind == "fp8":
        d13 = reference.dequantize_fp8_experts(experts[0], experts[1], (32, 32))
        d2 = reference.dequantize_fp8_experts(experts[2], experts[3], (32, 32))
    else:
        d13 = reference.dequantize_int8_experts(experts[0], experts[1])
        d2 = reference.dequantize_int8_experts(experts[2], experts[3])
    exact = _by_hand(x, d13, d2, tw, ids, b13, b2, ALPHA, 1.0)
    assert _rel_err(want, exact) <= FORMULA_TOL[dtype]


def test_gpt_oss_shapes_dispatch_to_registered_specs():
    """GPT-OSS's expert shapes (H = I = 2880: not a multiple of the 128-deep K tile)
    dispatch, for decode and prefill batches, to AOT specs that exist with ACT swigluoai
    and HAS_BIAS (dense: the ragged_k tiles at BLOCK_M 16 / 32, aligned ones at 64; int8
    / fp8: aligned, BLOCK_K halved to divide K; int4: group 64, grouped)."""
    from minikernels.ops.triton.moe import moe_config
    from minikernels.ops.triton.moe_fp8 import moe_fp8_config
    from minikernels.ops.triton.moe_int4 import moe_int4_config
    from minikernels.ops.triton.moe_int8 import moe_int8_config
    from minikernels.ops.triton.registry import all_kernels

    specs = [s for s in all_kernels() if s.constexprs.get("HAS_BIAS")]
    h = inter = 2880

    def has(fn: str, dt: str, **want) -> bool:
        for s in specs:
            c = s.constexprs
            xp = s.signature.get("x_ptr", s.signature.get("act_ptr"))
            if s.fn.__name__ == fn and xp == dt and \
                    all(c.get(key) == v for key, v in want.items() if key != "BLOCK_K") and \
                    c["BLOCK_K"] >= want.get("BLOCK_K", 0):
                return True
        return False

    for tdt, dt in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
        for n_pairs in (4, 1024, 32 * 4096):
            cfg = moe_config(n_pairs, 32, tdt)
            even = h % cfg.block_k == 0
            if not even:
                cfg = moe_config(n_pairs, 32, tdt, even_k=False)
            for fn, act in (("moe_gate_up_kernel", {"ACT": "swigluoai"}),
                            ("moe_down_kernel", {})):
                assert has(fn, dt, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN_K=even,
                           ALIGNED=True, BLOCK_K=cfg.block_k, **act), (fn, dt, n_pairs)
            for name, config in (("moe_int8", moe_int8_config),
                                 ("moe_fp8", lambda *a: moe_fp8_config(*a[:4], 128, *a[4:]))):
                for gate_up in (True, False):
                    c = config(n_pairs, 32, tdt, h if gate_up else inter, True, gate_up)
                    fn = f"{name}_{'gate_up' if gate_up else 'down'}_kernel"
                    act = {"ACT": "swigluoai"} if gate_up else {}
                    assert c.even_k and has(fn, dt, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                                            EVEN_K=True, ALIGNED=True, BLOCK_K=c.block_k,
                                            **act), (fn, dt, n_pairs)
            c = moe_int4_config(n_pairs, 32, 64, 64)
            for fn, act in (("moe_int4_gate_up_kernel", {"ACT": "swigluoai"}),
                            ("moe_int4_down_kernel", {})):
                assert c.grouped and has(fn, dt, BLOCK_M=c.block_m, GROUPED=True, **act)


OPS = ["fused_moe", "fused_moe_int4", "fused_moe_fp8", "fused_moe_int8"]


def test_compile(device):
    """A compiled (fullgraph) block calling the public op with swigluoai, its limit and
    both biases (their opcheck: tests/test_op_contract.py)."""
    x, w13, w2, tw, ids, b13, b2 = _inputs(5, 24, 16, 3, 2, torch.float32, device, 2)

    def block(x, w13, w2, tw, ids, b13, b2):
        return mk.ops.fused_moe(x, w13, w2, tw, ids, activation="swigluoai", w13_bias=b13,
                                w2_bias=b2, limit=0.75) + x

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, w13, w2, tw, ids, b13, b2)
    assert_close(got, reference.fused_moe(x, w13, w2, tw, ids, activation="swigluoai",
                                          w13_bias=b13, w2_bias=b2, limit=0.75) + x)


def test_errors_name_the_argument(device):
    x, w13, w2, tw, ids, b13, b2 = _inputs(4, 16, 8, 3, 2, torch.float32, device)
    run = mk.ops.fused_moe
    for kw, match in [
            ({"w13_bias": b13.half()}, "w13_bias"),
            ({"w13_bias": b13[:, :8]}, r"w13_bias must have shape \[E, 2I\] = \[3, 16\]"),
            ({"w13_bias": b13[0]}, "w13_bias"),
            ({"w13_bias": b13[:2]}, r"w13_bias must have shape"),
            ({"w2_bias": b2.double()}, "w2_bias"),
            ({"w2_bias": b2[:, :5]}, r"w2_bias must have shape \[E, H\] = \[3, 16\]"),
            ({"w2_bias": b2[None]}, "w2_bias"),
            ({"w2_bias": b2.to("meta")}, "w2_bias"),
            ({"alpha": float("nan")}, "alpha must be finite"),
            ({"alpha": "1.7"}, "alpha must be a float"),
            ({"alpha": True}, "alpha must be a float"),
            ({"limit": 0.0}, r"limit must be > 0"),
            ({"limit": -7.0}, r"limit must be > 0"),
            ({"limit": float("inf")}, "limit must be finite")]:
        with pytest.raises((ValueError, TypeError), match=match):
            run(x, w13, w2, tw, ids, activation="swigluoai", **kw)
    # swigluoai gates the up projection: not for non-gated experts, named both ways
    with pytest.raises(ValueError, match=r"'swigluoai'.*gated=True"):
        run(x, w13[:, :8], w2, tw, ids, activation="swigluoai", gated=False)
    with mk.use_backend("triton"), pytest.raises(ValueError, match="swigluoai"):
        torch.ops.minikernels.fused_moe(x, w13[:, :8], w2, tw, ids, activation="swigluoai",
                                        gated=False)
    with mk.use_backend("triton"), pytest.raises(ValueError, match="limit must be > 0"):
        torch.ops.minikernels.fused_moe(x, w13, w2, tw, ids, limit=0.0)
    # non-gated experts' biases: [E, I] for w13
    xb, w13n = x, w13[:, :8].contiguous()
    with pytest.raises(ValueError, match=r"w13_bias must have shape \[E, I\] = \[3, 8\]"):
        run(xb, w13n, w2, tw, ids, gated=False, activation="silu", w13_bias=b13)
    y = run(xb, w13n, w2, tw, ids, gated=False, activation="silu", w13_bias=b13[:, :8])
    want = reference.fused_moe(xb, w13n, w2, tw, ids, gated=False, activation="silu",
                               w13_bias=b13[:, :8])
    assert_close(y, want)
    # every quantized op checks the biases the same way
    int8 = _quantized("int8", w13, w2)
    with pytest.raises(ValueError, match=r"w2_bias must have shape"):
        mk.ops.fused_moe_int8(x, *int8, tw, ids, w2_bias=b2[:, :4])
