"""``mk.ops.fused_moe_mxfp4`` (fused_moe with MXFP4 experts, GPT-OSS's checkpoint format)
against the reference (fused_moe on the fp32-dequantized experts) and an independent
per-token fp64 formula with its own FP4 decoding (a 16-entry table written out here):
random shapes (no tokens, one token, odd token counts, one expert, k > E), H and I in
32 / 64 / 96, fp16 / bf16 (and fp32 x), both backends, expert biases on / off, silu and
swigluoai, every tensor argument a strided view, poisoned scratch buffers (conftest),
non-gated experts, LoRA, opcheck, the dequantization against transformers'
``convert_moe_packed_tensors`` bit for bit, and bad input."""
from __future__ import annotations

import pytest
import torch
from helpers import HALF_DTYPES, assert_close, examples, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import _alloc, reference

BACKENDS = ["reference", "triton"]
FORMULA_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
#: FP4 e2m1 by 4-bit code, written out independently of the library's table
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _mxfp4(e, n, k, g):
    """Random MXFP4 experts: blocks uint8 [E, N, K/32, 16] over every byte value, scales
    uint8 [E, N, K/32] around 2 ** -5 .. 2 ** -3 (rows of norm ~1 for K <= 96; a spread
    of exponents so a wrong scale index shows)."""
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(119, 125, (e, n, k // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def _inputs(t, h, inter, e, k, dtype, device, seed=0, ids_dtype=torch.int64, gated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = _mxfp4(e, (2 if gated else 1) * inter, h, g)
    w2 = _mxfp4(e, h, inter, g)
    tw = torch.rand(t, k, generator=g) + 0.1            # never 1: a dropped weight shows
    ids = torch.randint(0, e, (t, k), generator=g, dtype=ids_dtype)
    return [v.to(device) for v in (x, *w13, *w2, tw, ids)]


def _biases(e, inter, h, dtype, device, seed, gated=True):
    g = torch.Generator().manual_seed(seed + 1000)
    b13 = (torch.randn(e, (2 if gated else 1) * inter, generator=g) * 0.5).to(dtype)
    b2 = (torch.randn(e, h, generator=g) * 0.5).to(dtype)
    return b13.to(device), b2.to(device)


def _dequant_by_hand(blocks, scales):
    """Independent fp64 decoding: element 2j of a block is byte j's low nibble, 2j + 1 its
    high nibble; value FP4[code] * 2 ** (scale - 127)."""
    b = blocks.cpu().long()
    e, n, nb, _ = b.shape
    table = torch.tensor(FP4, dtype=torch.float64)
    vals = torch.empty(e, n, nb, 32, dtype=torch.float64)
    vals[..., 0::2] = table[b % 16]
    vals[..., 1::2] = table[b // 16]
    vals *= 2.0 ** (scales.cpu().double() - 127.0)[..., None]
    return vals.reshape(e, n, nb * 32)


def _by_hand(x, w13b, w13s, w2b, w2s, tw, ids, activation="silu", gated=True, b13=None,
             b2=None, alpha=1.702, limit=7.0):
    """One (token, slot) at a time in fp64 on the hand-decoded experts; the activated
    intermediate rounded to x.dtype (the contract)."""
    w13, w2 = _dequant_by_hand(w13b, w13s), _dequant_by_hand(w2b, w2s)
    inter = w2.shape[2]
    xd, twd = x.cpu().double(), tw.cpu().double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, row in enumerate(ids.cpu().tolist()):
        for j, e in enumerate(row):
            pre = w13[e] @ xd[t]
            if b13 is not None:
                pre = pre + b13[e].cpu().double()
            if not gated:
                act = torch.relu(pre) ** 2 if activation == "relu2" else \
                    pre * torch.sigmoid(pre)
            elif activation == "swigluoai":
                gte = torch.minimum(pre[:inter], torch.tensor(limit, dtype=torch.float64))
                up = pre[inter:].clamp(-limit, limit)
                act = (up + 1) * gte * torch.sigmoid(alpha * gte)
            else:
                assert activation == "silu"
                act = pre[:inter] * torch.sigmoid(pre[:inter]) * pre[inter:]
            act = act.to(x.dtype).double()
            y = w2[e] @ act
            if b2 is not None:
                y = y + b2[e].cpu().double()
            out[t] += twd[t, j] * y
    return out


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-3))


@settings(max_examples=examples(12), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), h=st.sampled_from([32, 64, 96]),
       inter=st.sampled_from([32, 64, 96]), e=st.integers(1, 6), k=st.integers(1, 4),
       dtype=st.sampled_from(HALF_DTYPES), backend=st.sampled_from(BACKENDS),
       ids_dtype=st.sampled_from([torch.int32, torch.int64]), bias=st.booleans(),
       activation=st.sampled_from(["silu", "swigluoai"]), seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, h, inter, e, k, dtype, backend, ids_dtype, bias,
                                       activation, seed, device):
    args = _inputs(t, h, inter, e, k, dtype, device, seed, ids_dtype)
    b13, b2 = _biases(e, inter, h, dtype, device, seed) if bias else (None, None)
    kw = {"activation": activation, "w13_bias": b13, "w2_bias": b2}
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_mxfp4(*args, **kw)
    want = reference.fused_moe_mxfp4(*args, None, activation, True, b13, b2)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(*args, activation, True, b13, b2)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_activations(backend, device):
    """fp32 x: exact fp32 dots (DOT_F32), the formula to fp32 precision."""
    args = _inputs(7, 64, 32, 3, 2, torch.float32, device, 5)
    b13, b2 = _biases(3, 32, 64, torch.float32, device, 5)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_mxfp4(*args, activation="swigluoai", w13_bias=b13, w2_bias=b2)
    assert y.dtype == torch.float32
    exact = _by_hand(*args, "swigluoai", True, b13, b2)
    assert _rel_err(y, exact) <= FORMULA_TOL[torch.float32]


def test_reference_is_fused_moe_on_dequantized_experts():
    """The reference's definition through the public ops: dequantize (fp32, exact), then
    fused_moe; and the dequantization equals the hand decoding exactly."""
    x, w13b, w13s, w2b, w2s, tw, ids = _inputs(7, 64, 32, 3, 2, torch.float32, "cpu", 4)
    w13 = reference.dequantize_mxfp4_experts(w13b, w13s)
    w2 = reference.dequantize_mxfp4_experts(w2b, w2s)
    assert w13.dtype == torch.float32 and w13.shape == (3, 64, 64)
    assert torch.equal(w13.double(), _dequant_by_hand(w13b, w13s))
    assert torch.equal(w2.double(), _dequant_by_hand(w2b, w2s))
    want = mk.ops.fused_moe(x, w13, w2, tw, ids)
    got = mk.ops.fused_moe_mxfp4(x, w13b, w13s, w2b, w2s, tw, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dequant_matches_transformers_bit_for_bit():
    """reference.dequantize_mxfp4_experts (and models/gpt_oss.py's loader dequant) give
    exactly transformers' ``convert_moe_packed_tensors`` (bf16, x @ W layout [E, K, N]),
    over every byte value and a wide range of scale exponents."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    from minikernels.models.gpt_oss import mxfp4_expert_weight

    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    blocks[0, 0, :, :] = torch.arange(256, dtype=torch.uint8).view(16, 16)[:4]
    scales = torch.randint(90, 165, (3, 40, 4), dtype=torch.uint8, generator=g)
    theirs = mxfp4.convert_moe_packed_tensors(blocks.clone(), scales.clone(),
                                              dtype=torch.bfloat16)
    ours = reference.dequantize_mxfp4_experts(blocks, scales)
    assert theirs.shape == (3, 128, 40)
    assert torch.equal(ours.to(torch.bfloat16).transpose(1, 2), theirs)
    assert torch.equal(ours.bfloat16(), ours.float().bfloat16())          # exact in bf16
    assert torch.equal(mxfp4_expert_weight(blocks, scales, torch.bfloat16), theirs)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_argument_as_a_strided_view(dtype, device):
    t, h, inter, e, k = 6, 64, 64, 3, 2
    args = _inputs(t, h, inter, e, k, dtype, device, 3)
    b13, b2 = _biases(e, inter, h, dtype, device, 3)
    want = reference.fused_moe_mxfp4(*args, None, "swigluoai", True, b13, b2)

    def view_of(v, kind):
        if kind == "cols":       # every other column of a wider, offset buffer
            buf = torch.zeros(v.shape[0] + 1, 2 * v.shape[1] + 3, *v.shape[2:],
                              dtype=v.dtype, device=device)
            out = buf[1:, 1:2 * v.shape[1] + 1:2]
        elif kind == "words":    # blocks padded in every dim, 4-byte aligned: the kernels
            buf = torch.zeros(v.shape[0] + 2, v.shape[1] + 2, v.shape[2] + 1, 20,
                              dtype=v.dtype, device=device)   # read them as int32 in place
            out = buf[1:-1, 2:, 1:, :16]
        elif kind == "pad":      # padded in every dim, unit inner stride
            buf = torch.zeros(*(s + 2 for s in v.shape), dtype=v.dtype, device=device)
            out = buf[(slice(1, -1), slice(2, None), *(slice(0, s) for s in v.shape[2:]))]
        else:                    # transposed storage: the last dim strided
            out = torch.zeros(*v.shape[:-2], v.shape[-1], v.shape[-2], dtype=v.dtype,
                              device=device).transpose(-1, -2)
        out.copy_(v)
        return out

    x, w13b, w13s, w2b, w2s, tw, ids = args
    views = [view_of(x, "trans"), view_of(w13b, "words"), view_of(w13s, "trans"),
             view_of(w2b, "trans"), view_of(w2s, "pad"), view_of(tw, "cols"),
             view_of(ids, "trans")]
    bviews = [view_of(b13, "cols"), view_of(b2, "trans")]
    xr = torch.zeros(t, 2 * h, dtype=dtype, device=device)[:, h:]       # row-strided x
    xr.copy_(x)
    assert not any(v.is_contiguous() for v in (*views, *bviews, xr))
    from minikernels.ops.triton.moe_mxfp4 import _as_words
    assert _as_words(views[1]).data_ptr() == views[1].data_ptr()     # no copy: strides
    with mk.use_backend("triton"):
        kw = {"activation": "swigluoai", "w13_bias": bviews[0], "w2_bias": bviews[1]}
        y = mk.ops.fused_moe_mxfp4(*views, **kw)
        y2 = mk.ops.fused_moe_mxfp4(xr, *views[1:], **kw)
    assert_close(y, want, scale=2.0)
    assert_close(y2, want, scale=2.0)


@pytest.mark.parametrize("activation", ["relu2", "silu"])
def test_nongated(activation, device):
    """gated=False: w13 [E, I, H/32, 16] / [E, I, H/32], the up rows only, act(up)."""
    from minikernels.ops.triton import moe_mxfp4

    args = _inputs(5, 64, 32, 3, 3, torch.float16, device, 60, gated=False)
    with mk.use_backend("triton"), \
            spy_launches(moe_mxfp4, "moe_mxfp4_gate_up_kernel", "GATED") as gated:
        y = mk.ops.fused_moe_mxfp4(*args, activation=activation, gated=False)
    assert gated == [False]
    assert_close(y, reference.fused_moe_mxfp4(*args, None, activation, False), scale=2.0)
    exact = _by_hand(*args, activation, gated=False)
    assert _rel_err(y, exact) <= FORMULA_TOL[torch.float16]


def test_lora_matches_reference(device):
    """Per-token LoRA on the MXFP4 experts (HAS_DELTA), as the other fused MoE ops."""
    t, h, inter, e, k, s, r = 6, 64, 32, 3, 2, 2, 4
    args = _inputs(t, h, inter, e, k, torch.float16, device, 11)
    g = torch.Generator().manual_seed(12)
    lora = mk.ops.MoELoRA(*(((torch.randn(*shape, generator=g) * 0.2).half().to(device))
                            for shape in ((s, e, 2 * r, h), (s, e, 2 * inter, 2 * r),
                                          (s, e, r, inter), (s, e, h, r))),
                          torch.tensor([0, -1, 1, 1, 0, -1], device=device),
                          torch.tensor([0.5, 2.0], device=device))
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_mxfp4(*args, lora=lora)
    want = reference.fused_moe_mxfp4(*args, lora)
    assert_close(y, want, scale=2.0)
    assert (y - mk.ops.fused_moe_mxfp4(*args)).abs().max() > 0.01     # the LoRA counted


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); the
    scratch buffers are poisoned, so a pair the kernels skip turns the output NaN."""
    assert _alloc.poison_enabled()
    args = _inputs(0, 64, 32, 3, 2, torch.bfloat16, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_mxfp4(*args)
    assert y.shape == (0, 64) and y.dtype == torch.bfloat16
    args = _inputs(5, 32, 32, 1, 4, torch.bfloat16, device, 1)
    tw, ids = args[5], args[6]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_mxfp4(*args)
        y1 = mk.ops.fused_moe_mxfp4(*args[:5], tw.sum(1, keepdim=True), ids[:, :1])
    assert_close(y, y1, scale=2.0)
    assert _rel_err(y, _by_hand(*args)) <= FORMULA_TOL[torch.bfloat16]


def test_opcheck(device):
    args = _inputs(5, 64, 32, 3, 2, torch.bfloat16, device, 2)
    b13, b2 = _biases(3, 32, 64, torch.bfloat16, device, 2)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe_mxfp4, tuple(args),
                              {"w13_bias": b13, "w2_bias": b2, "activation": "swigluoai"})
        empty = (args[0][:0], *args[1:5], args[5][:0], args[6][:0])
        torch.library.opcheck(torch.ops.minikernels.fused_moe_mxfp4, empty)


def test_every_dispatched_config_is_registered():
    """Each tile config the launcher can pick has an AOT spec (gate-up with silu and
    swigluoai + biases, down with and without biases)."""
    from minikernels.ops.triton import moe_mxfp4
    from minikernels.ops.triton.registry import all_kernels

    registered = {(s.fn.__name__, s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"],
                   s.num_warps, s.num_stages, s.constexprs["DOT_F32"],
                   s.signature["x_ptr" if "x_ptr" in s.signature else "act_ptr"],
                   s.constexprs.get("ACT", "silu"), s.constexprs["HAS_BIAS"])
                  for s in all_kernels() if s.fn.__name__.startswith("moe_mxfp4")}
    for n_pairs in (1, 100, 1000, 64 * 20, 64 * 40, 64 * 100):
        for dt, tdt in (("*fp16", torch.float16), ("*bf16", torch.bfloat16),
                        ("*fp32", torch.float32)):
            for bias in (False, True) if dt != "*fp32" else (False,):
                cfg = moe_mxfp4.moe_mxfp4_config(n_pairs, 64, tdt, bias=bias)
                common = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                          dt == "*fp32", dt)
                act = "swigluoai" if bias else "silu"
                assert ("moe_mxfp4_gate_up_kernel", *common, act, bias) in registered
                assert ("moe_mxfp4_down_kernel", *common, "silu", bias) in registered


def test_errors_name_the_argument(device):
    args = _inputs(4, 64, 32, 3, 2, torch.float16, device)
    x, w13b, w13s, w2b, w2s, tw, ids = args

    def with_(**kw):
        names = ["x", "w13b", "w13s", "w2b", "w2s", "tw", "ids"]
        vals = dict(zip(names, args))
        vals.update(kw)
        return [vals[n] for n in names]

    for bad, match in [
        (with_(x=x[0]), "x"),
        (with_(x=x.int()), "x must have dtype"),
        (with_(x=x[:, :48]), "H must be a positive multiple of 32"),
        (with_(x=x[:, :32]), "w13_blocks must have shape"),
        (with_(w13b=w13b.to(torch.int8)), "w13_blocks must have dtype"),
        (with_(w13b=w13b[..., 0]), "w13_blocks"),
        (with_(w13b=w13b[:, :, :1]), "w13_blocks must have shape"),
        (with_(w13b=w13b[:, :, :, :8]), "w13_blocks must have shape"),
        (with_(w13b=w13b[:, :63]), "w13_blocks's second dim"),
        (with_(w13b=w13b[:, :48], w13s=w13s[:, :48]), "multiple of 32"),
        (with_(w13s=w13s.float()), "w13_scales must have dtype"),
        (with_(w13s=w13s[:, :, :1]), "w13_scales must have shape"),
        (with_(w2b=w2b.int()), "w2_blocks must have dtype"),
        (with_(w2b=w2b[:2]), "w2_blocks must have shape"),
        (with_(w2b=w2b[:, :32]), "w2_blocks must have shape"),
        (with_(w2s=w2s[:, :, :0]), "w2_scales must have shape"),
        (with_(w2s=w2s.to(torch.int8)), "w2_scales must have dtype"),
        (with_(tw=tw.half()), "topk_weights"),
        (with_(tw=tw[:, :1]), "topk_weights must have"),
        (with_(ids=ids.float()), "topk_ids"),
        (with_(ids=ids[:3]), "topk_ids must have shape"),
        (with_(ids=torch.full_like(ids, 3)), "topk_ids values"),
        (with_(ids=torch.full_like(ids, -1)), "topk_ids values"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe_mxfp4(*bad)
    b13 = torch.zeros(3, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="w13_bias must have shape"):
        mk.ops.fused_moe_mxfp4(*args, w13_bias=b13[:, :32])
    with pytest.raises(TypeError, match="w2_bias must have dtype"):
        mk.ops.fused_moe_mxfp4(*args, w2_bias=torch.zeros(3, 64, device=device))
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.ops.fused_moe_mxfp4(*args, activation="relu")
    with pytest.raises(ValueError, match="limit must be > 0"):
        mk.ops.fused_moe_mxfp4(*args, activation="swigluoai", limit=0.0)
