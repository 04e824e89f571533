"""``mk.ops.fused_moe_fp8_w8a8`` (fused_moe with block-wise FP8 W8A8 experts: fp8 weights
with block scales, activations quantized per token and group of bk columns, fp8 x fp8
GEMMs; vLLM's ``use_fp8_w8a8`` with ``block_shape``) against the reference, vLLM's test
recipe (``torch_w8a8_block_fp8_moe``) and an independent per-(token, slot) fp64 formula
with its own e4m3 decoding: random shapes (no tokens, one token, k > E so an expert
repeats in a row), block sizes (128, 128), (32, 64), (48, 32), fp16 / bf16 / fp32 x, both
backends, every tensor argument a strided view, poisoned scratch buffers, the tile
dispatch and its AOT specs, the activations (gelu_tanh, swigluoai with biases,
non-gated relu2), opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import DTYPES, assert_close, examples, gate_act_by_hand, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_test_utils import lora_delta_by_hand, random_moe_lora

import minikernels as mk
from minikernels.ops import _alloc, reference

BACKENDS = ["reference", "triton"]
FP8 = torch.float8_e4m3fn
FORMULA_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _fp8(e, n, k, block, g):
    """Random fp8 experts: every byte value but the two NaNs (subnormals, -0 and the sign
    bit included), and positive fp32 block scales sized so that W's rows have norm ~1."""
    bn, bk = block
    b = torch.randint(0, 256, (e, n, k), dtype=torch.uint8, generator=g)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)                 # 0x7F / 0xFF: NaN
    s = (torch.rand(e, -(-n // bn), -(-k // bk), generator=g) + 0.5) / (100.0 * k ** 0.5)
    return b.view(FP8), s


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
    b = w.cpu().contiguous().view(torch.uint8).long()
    sign = 1.0 - 2.0 * (b >> 7).double()
    ex, man = (b >> 3) & 0xF, (b & 7).double()
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (ex - 7).double())
    sub = man / 8.0 * 2.0 ** -6
    return sign * torch.where(ex == 0, sub, normal)


def _quantize_groups(v, bk):
    """One row (fp32) per the contract, written out: per group of bk, s = max(max|g|,
    1e-10) / 448, q = fp8(clamp(g / s)) decoded here -> (q fp64 [K], s fp64 [K / bk])."""
    g = v.reshape(-1, bk)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448.0
    q = _decode_e4m3((g / s).clamp(-448, 448).to(FP8)).reshape(-1)
    return q, s.double().reshape(-1)


def _block_gemm(q, sq, w, sw, block):
    """sum over K groups j of (q[group j] . w[n, group j]) * sq[j] * sw[n // bn, j], in
    fp64: q [K], w fp64 [N, K], sw fp64 [ceil(N / bn), K / bk] -> [N]."""
    bn, bk = block
    n = w.shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for j in range(q.shape[0] // bk):
        cols = slice(j * bk, (j + 1) * bk)
        out += (w[:, cols] @ q[cols]) * sq[j] * sw[:, j].repeat_interleave(bn)[:n]
    return out


def _by_hand(x, w13, s13, w2, s2, tw, ids, block, activation="silu", gated=True, b13=None,
             b2=None, lora=None):
    """Per (token, slot) in fp64: x's row quantized per group, each group's partial sum
    scaled, + bias, the activation, rounded to x.dtype, quantized again, the down GEMM
    likewise, times the router weight."""
    inter = w2.shape[2]
    w13d, w2d = _decode_e4m3(w13), _decode_e4m3(w2)
    s13d, s2d = s13.cpu().double(), s2.cpu().double()
    # a block past a matrix's K covers it whole
    block13, block2 = (block[0], min(block[1], x.shape[1])), (block[0], min(block[1], inter))
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t, row in enumerate(ids.cpu().tolist()):
        xq, sx = _quantize_groups(x[t].cpu().float(), block13[1])
        for j, e in enumerate(row):
            gu = _block_gemm(xq, sx, w13d[e], s13d[e], block13)
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
            aq, sa = _quantize_groups(act.to(x.dtype).float(), block2[1])
            y = _block_gemm(aq, sa, w2d[e], s2d[e], block2)
            if b2 is not None:
                y = y + b2[e].cpu().double()
            if slot >= 0:        # on the intermediate before its quantization
                y = y + lora_delta_by_hand(lora.a2, lora.b2, lora.scaling, slot, e,
                                    act.to(x.dtype).double(), x.dtype)
            out[t] += float(tw[t, j]) * y
    return out


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-3))


BLOCKS = [(128, 128), (32, 64), (48, 32)]


@settings(max_examples=examples(16), deadline=None)
@given(t=st.sampled_from([0, 1, 5, 17]), hm=st.sampled_from([1, 2, 3]),
       im=st.sampled_from([1, 2]), e=st.sampled_from([1, 3, 8]), k=st.integers(1, 4),
       block=st.sampled_from(BLOCKS), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS), ids_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 10 ** 6))
def test_matches_reference_and_formula(t, hm, im, e, k, block, dtype, backend, ids_dtype,
                                       seed, device):
    h, inter = hm * block[1], im * block[1]           # bk divides H and I
    args = _inputs(t, h, inter, e, k, block, dtype, device, seed, ids_dtype)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8_w8a8(*args, block)
    want = reference.fused_moe_fp8_w8a8(*args, block)
    assert y.shape == (t, h) and y.dtype == dtype
    assert_close(y, want, scale=2.0)
    if t:
        exact = _by_hand(*args, block)
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(y, exact) <= FORMULA_TOL[dtype]


def torch_w8a8_block_fp8_moe(a, w1, w2, w1_s, w2_s, topk_weight, topk_ids, block):
    """vLLM's test_block_fp8.py reference (its native_w8a8_block_matmul per expert): the
    activations and the intermediate quantized per token group, SiLU-and-mul in the
    activations' dtype, each expert's output in that dtype, the k-sum in it too."""
    b, d = a.shape
    topk = topk_ids.shape[1]
    a = a.view(b, -1, d).repeat(1, topk, 1).reshape(-1, d)
    out = torch.zeros(b * topk, w2.shape[1], dtype=a.dtype, device=a.device)
    topk_weight, topk_ids = topk_weight.view(-1), topk_ids.view(-1)
    a_q, a_s = reference.per_token_group_quant_fp8(a, block[1])
    n = w1.shape[1] // 2
    for i in range(w1.shape[0]):
        mask = topk_ids == i
        if mask.sum():
            h = reference.w8a8_block_fp8_matmul(a_q[mask], w1[i], a_s[mask], w1_s[i],
                                                list(block), a.dtype)
            act = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
            h_q, h_s = reference.per_token_group_quant_fp8(act, block[1])
            out[mask] = reference.w8a8_block_fp8_matmul(h_q, w2[i], h_s, w2_s[i],
                                                        list(block), a.dtype)
    return (out.view(b, -1, w2.shape[1]) * topk_weight.view(b, -1, 1).to(out.dtype)).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_vllms_block_fp8_moe_recipe(backend, dtype, device):
    """vLLM's test_w8a8_block_fp8_fused_moe: (M, N, K, E, topk) = (33, 256, 512, 8, 2)-like
    shapes with (128, 128) blocks; its tolerance (relative mean error < 3%). W8A8 is not
    W8A16: the activations' rounding moves the result."""
    m, n, kdim, e, topk, block = 33, 256, 512, 8, 2, (128, 128)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(m, kdim, generator=g).to(dtype) / 10
    w1 = ((torch.rand(e, 2 * n, kdim, generator=g) - 0.5) * 2 * 448).to(FP8)
    w2 = ((torch.rand(e, kdim, n, generator=g) - 0.5) * 2 * 448).to(FP8)
    w1_s = torch.rand(e, 2 * n // 128, kdim // 128, generator=g) * 1e-2
    w2_s = torch.rand(e, kdim // 128, n // 128, generator=g) * 1e-2
    score = torch.randn(m, e, generator=g).to(dtype)
    tw, ids = torch.topk(torch.softmax(score.float(), -1), topk)
    want = torch_w8a8_block_fp8_moe(a, w1, w2, w1_s, w2_s, tw, ids, block)
    dev = [v.to(device) for v in (a, w1, w1_s, w2, w2_s, tw, ids)]
    with mk.use_backend(backend):
        got = mk.ops.fused_moe_fp8_w8a8(*dev, block)
    rel = (got.cpu().float() - want.float()).abs().mean() / want.float().abs().mean()
    assert rel < 0.03, rel
    w8a16 = reference.fused_moe_fp8(a, w1, w1_s, w2, w2_s, tw, ids, block)
    assert (w8a16.float() - got.cpu().float()).abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_as_a_strided_view(backend, dtype, device):
    t, h, inter, e, k, block = 6, 128, 64, 3, 2, (32, 64)
    args = _inputs(t, h, inter, e, k, block, dtype, device, 3)
    x, w13, s13, w2, s2, tw, ids = args
    want = reference.fused_moe_fp8_w8a8(*args, block)

    def view_of(v, kind):
        raw = v.view(torch.uint8) if v.dtype == FP8 else v
        if kind == "cols":       # every other column of a wider, offset buffer
            buf = torch.zeros(raw.shape[0] + 1, 2 * raw.shape[1] + 3, *raw.shape[2:],
                              dtype=raw.dtype, device=device)
            out = buf[1:, 1:2 * raw.shape[1] + 1:2]
        elif kind == "pad":      # padded in every dim, unit inner stride
            buf = torch.zeros(*(s + 2 for s in raw.shape), dtype=raw.dtype, device=device)
            out = buf[1:-1, 2:, :raw.shape[2]] if raw.dim() == 3 else buf[1:-1, 2:]
        else:                    # transposed storage: the last dim strided
            out = torch.zeros(*raw.shape[:-2], raw.shape[-1], raw.shape[-2], dtype=raw.dtype,
                              device=device).transpose(-1, -2)
        out.copy_(raw)
        return out.view(FP8) if v.dtype == FP8 else out      # same-size dtype: any strides

    views = [view_of(x, "trans"), view_of(w13, "pad"), view_of(s13, "trans"),
             view_of(w2, "trans"), view_of(s2, "cols"), view_of(tw, "cols"),
             view_of(ids, "trans")]
    w13p = view_of(w13, "cols")                               # every other row
    w2p = torch.zeros(e, h, inter + 16, dtype=torch.uint8, device=device)[:, :, 16:]
    w2p.copy_(w2.view(torch.uint8))                 # aligned rows of a padded buffer
    w2p = w2p.view(FP8)
    assert not any(v.is_contiguous() for v in (*views, w13p, w2p))
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8_w8a8(*views, block)
        y2 = mk.ops.fused_moe_fp8_w8a8(views[0], w13p, views[2], w2p, *views[4:], block)
    assert_close(y, want, scale=2.0)
    assert_close(y2, want, scale=2.0)


def test_tile_dispatch_and_registered_specs(device):
    """BLOCK_K is the largest power of two <= 128 (64 at BLOCK_M 64, 32 for unaligned
    weights) dividing bk; aligned weight rows take vector loads, strided ones the
    unaligned tiles; all match the reference. Every (BLOCK_M, BLOCK_N, kind, dtype, ACT, GATED) the launcher picks at
    128 x 128 blocks has an sm_90a AOT spec at a BLOCK_K no smaller than the dispatched
    one (tests/test_aot_compile.py: no spills)."""
    from minikernels.ops.triton import moe_fp8_w8a8 as w8a8
    from minikernels.ops.triton.registry import all_kernels

    # (shape, block, (gate-up BLOCK_K, down BLOCK_K), w13 rows aligned)
    cases = [((9, 256, 128, 3, 2), (128, 128), (128, 128), True),
             ((9, 192, 96, 3, 2), (64, 96), (32, 32), True),
             ((9, 128, 64, 3, 2), (32, 64), (32, 64), False)]
    with mk.use_backend("triton"), \
            spy_launches(w8a8, "moe_fp8_w8a8_gate_up_kernel", "BLOCK_K") as bk13, \
            spy_launches(w8a8, "moe_fp8_w8a8_gate_up_kernel", "ALIGNED") as al13, \
            spy_launches(w8a8, "moe_fp8_w8a8_down_kernel", "BLOCK_K") as bk2:
        for i, (shape, block, want_bk, aligned) in enumerate(cases):
            args = _inputs(*shape, block, torch.float16, device, 20 + i)
            if not aligned:      # w13 rows 8 bytes apart from 16-byte alignment
                buf = torch.zeros(*args[1].shape[:2], shape[1] + 8, dtype=torch.uint8,
                                  device=device)[:, :, 8:]
                buf.copy_(args[1].view(torch.uint8))
                args[1] = buf.view(FP8)
            y = mk.ops.fused_moe_fp8_w8a8(*args, block)
            assert ((bk13[i], bk2[i]), al13[i]) == (want_bk, aligned), shape
            assert_close(y, reference.fused_moe_fp8_w8a8(*args, block), scale=2.0)

    registered = {}
    for s in all_kernels():
        if s.fn in (w8a8.moe_fp8_w8a8_gate_up_kernel, w8a8.moe_fp8_w8a8_down_kernel):
            assert s.archs == (90,)
            c = s.constexprs
            key = (s.fn.__name__, c["BLOCK_M"], c["BLOCK_N"], c["ALIGNED"], s.num_warps,
                   s.num_stages, s.signature["bias_ptr"], c.get("ACT", "silu"),
                   c.get("GATED", True))
            registered[key] = max(registered.get(key, 0), c["BLOCK_K"])
    assert len(registered) >= 40
    for dt in ("*fp16", "*bf16", "*fp32"):
        for n_pairs in (1, 100, 1000, 64 * 20, 64 * 40, 64 * 100):
            for aligned in (True, False):
                for gate_up in (True, False):
                    cfg = w8a8.moe_fp8_w8a8_config(n_pairs, 64, 128, aligned, gate_up)
                    fn = "moe_fp8_w8a8_gate_up_kernel" if gate_up else \
                        "moe_fp8_w8a8_down_kernel"
                    acts = ((("silu", True), ("gelu_tanh", True), ("relu2", False))
                            if gate_up and dt != "*fp32" else (("silu", True),))
                    for act, gated in acts:
                        key = (fn, cfg.block_m, cfg.block_n, aligned, cfg.num_warps,
                               cfg.num_stages, dt, act, gated)
                        assert key in registered and registered[key] >= cfg.block_k, key


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_biases_and_nongated(dtype, device):
    """gelu_tanh; GPT-OSS's swigluoai with expert biases (added after the scales); and
    non-gated relu2 experts (w13 [E, I, H], act(up)): the gate-up launch gets each ACT /
    HAS_BIAS; every result matches the reference and the fp64 formula."""
    from minikernels.ops.triton import moe_fp8_w8a8 as w8a8

    block = (32, 32)
    for i, (t, h, inter, e, k) in enumerate([(8, 64, 32, 3, 2), (5, 96, 64, 3, 3)]):
        for activation, gated, bias in (("gelu_tanh", True, False),
                                        ("swigluoai", True, True), ("relu2", False, False)):
            args = _inputs(t, h, inter, e, k, block, dtype, device, 30 + i, gated=gated)
            kw = {"activation": activation, "gated": gated}
            if bias:
                g = torch.Generator().manual_seed(i)
                kw["w13_bias"] = torch.randn(e, 2 * inter, generator=g).to(dtype).to(device)
                kw["w2_bias"] = torch.randn(e, h, generator=g).to(dtype).to(device)
            with mk.use_backend("triton"), \
                    spy_launches(w8a8, "moe_fp8_w8a8_gate_up_kernel", "ACT") as acts, \
                    spy_launches(w8a8, "moe_fp8_w8a8_gate_up_kernel", "HAS_BIAS") as biased:
                y = mk.ops.fused_moe_fp8_w8a8(*args, block, **kw)
            assert (acts, biased) == ([activation], [bias])
            want = reference.fused_moe_fp8_w8a8(*args, block, **kw)
            assert_close(y, want, scale=2.0)
            exact = _by_hand(*args, block, activation, gated, kw.get("w13_bias"),
                             kw.get("w2_bias"))
            assert _rel_err(want, exact) <= FORMULA_TOL[dtype], activation
            assert _rel_err(y, exact) <= FORMULA_TOL[dtype], activation
            assert _rel_err(y, _by_hand(*args, block, "silu", gated)) > 2 * FORMULA_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    """No tokens; one expert chosen k times by every token (each copy counts); T = 1; an
    all-zero token row (its groups' scales floor at eps: the output is the biases'
    alone); the scratch buffers are poisoned, so a pair the kernels skip turns the
    output NaN."""
    assert _alloc.poison_enabled()
    block = (32, 32)
    args = _inputs(0, 64, 32, 3, 2, block, torch.float16, device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8_w8a8(*args, block)
    assert y.shape == (0, 64) and y.dtype == torch.float16
    args = _inputs(5, 96, 64, 1, 4, block, torch.bfloat16, device, 1)
    tw, ids = args[5], args[6]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8_w8a8(*args, block)
        y1 = mk.ops.fused_moe_fp8_w8a8(*args[:5], tw.sum(1, keepdim=True), ids[:, :1], block)
    assert_close(y, y1, scale=2.0)
    assert _rel_err(y, _by_hand(*args, block)) <= FORMULA_TOL[torch.bfloat16]
    # a bk past both K's (H = 64, I = 32): one quantization group per row in each GEMM
    args = _inputs(6, 64, 32, 3, 2, (16, 128), torch.float16, device, 4)
    assert args[2].shape == (3, 4, 1) and args[4].shape == (3, 4, 1)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8_w8a8(*args, (16, 128))
    assert_close(y, reference.fused_moe_fp8_w8a8(*args, (16, 128)), scale=2.0)
    assert _rel_err(y, _by_hand(*args, (16, 128))) <= FORMULA_TOL[torch.float16]
    x, w13, s13, w2, s2, tw, ids = _inputs(4, 64, 32, 3, 2, block, torch.float32, device, 5)
    x[2] = 0.0
    b2 = torch.randn(3, 64, device=device)
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_fp8_w8a8(x, w13, s13, w2, s2, tw, ids, block, w2_bias=b2)
    zero_row = (tw[2, :, None] * b2[ids[2].long()]).sum(0)
    torch.testing.assert_close(y[2], zero_row, rtol=1e-6, atol=1e-6)


def test_opcheck_and_compile(device):
    block = (32, 32)
    args = _inputs(5, 64, 32, 3, 2, block, torch.float16, device, 2)
    x, w13, s13, w2, s2, tw, ids = args
    raw = (x, w13.view(torch.uint8), s13, w2.view(torch.uint8), s2, tw, ids, [32, 32])
    op = torch.ops.minikernels.fused_moe_fp8_w8a8
    with mk.use_backend("triton"):
        torch.library.opcheck(op, raw)
        torch.library.opcheck(op, (x[:0], *raw[1:5], tw[:0], ids[:0], [32, 32]))
        torch.library.opcheck(op, raw, {"activation": "gelu_tanh"})

    def layer(*a):
        return mk.ops.fused_moe_fp8_w8a8(*a, block) + a[0]

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*args)
    assert_close(got, reference.fused_moe_fp8_w8a8(*args, block) + x, scale=2.0)


def test_errors_name_the_argument(device):
    block = (32, 32)
    args = _inputs(4, 64, 32, 3, 2, block, torch.float16, device)
    x, w13, s13, w2, s2, tw, ids = args
    names = ["x", "w13", "s13", "w2", "s2", "tw", "ids"]

    def with_(**kw):
        vals = dict(zip(names, args))
        vals.update(kw)
        return [vals[n] for n in names]

    for bad, blk, match in [
        (with_(x=x.int()), block, "x must have dtype"),
        (with_(w13=w13.view(torch.uint8)), block, "w13 must have dtype"),
        (with_(w13=w13[:, :63]), block, "w13's second dim"),
        (with_(s13=s13[:, :1]), block, r"w13_scale must have shape"),
        (with_(s2=s2.half()), block, "w2_scale must have dtype"),
        (with_(tw=tw[:, :1]), block, "topk_weights must have"),
        (with_(ids=torch.full_like(ids, 3)), block, "topk_ids values"),
        (args, (32, 48), r"bk \(48\) must be a multiple of 32"),
        (args, (32, 16), r"bk \(16\) must be a multiple of 32"),
        (args, (32, 0), "block_size must be positive"),
        (args, 32, "block_size must be a pair"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            mk.ops.fused_moe_fp8_w8a8(*bad, blk)
    x96 = torch.randn(4, 96, dtype=x.dtype, device=device)     # H = 96: 64 does not divide
    w13b, s13b = _fp8(3, 64, 96, (32, 32), torch.Generator().manual_seed(0))
    w2b, s2b = _fp8(3, 96, 32, (32, 32), torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"divides H \(96\) and I \(32\)"):
        mk.ops.fused_moe_fp8_w8a8(x96, w13b.to(device), s13b.to(device)[:, :, :1],
                                  w2b.to(device), s2b.to(device)[:, :, :1], tw, ids, (32, 64))
    with pytest.raises(ValueError, match="activation must be one of"):
        mk.ops.fused_moe_fp8_w8a8(*args, block, activation="relu")


@pytest.mark.parametrize("t", [5, 40])          # BGMV (< 32 pairs) and SGMV LoRA paths
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora(t, dtype, device):
    """Per-token LoRA on the fp8 W8A8 experts (MoELoRA, mixed slots): the updates act on
    the unquantized inputs (d13 from x, d2 from the intermediate before its
    quantization), added before the activation / the router weight; matches the
    reference and the fp64 formula; all slots -1 is bit-identical to no LoRA, tokens at
    slot -1 get the base rows exactly; the LoRA launch sets HAS_DELTA; opcheck with the
    LoRA arguments."""
    from minikernels.ops.triton import moe_fp8_w8a8 as w8a8

    h, inter, e, k, block = 64, 32, 3, 2, (32, 32)
    args = _inputs(t, h, inter, e, k, block, dtype, device, 50 + t)
    lora = random_moe_lora(t, h, inter, e, 2, 4, dtype, device, t)
    with mk.use_backend("triton"), \
            spy_launches(w8a8, "moe_fp8_w8a8_down_kernel", "HAS_DELTA") as has_delta:
        y = mk.ops.fused_moe_fp8_w8a8(*args, block, lora=lora)
        base = mk.ops.fused_moe_fp8_w8a8(*args, block)
        none = mk.ops.fused_moe_fp8_w8a8(*args, block, lora=lora._replace(
            token_slots=torch.full_like(lora.token_slots, -1)))
    assert has_delta == [True, False, True]
    want = reference.fused_moe_fp8_w8a8(*args, block, lora)
    assert_close(y, want, scale=2.0)
    exact = _by_hand(*args, block, lora=lora)
    assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
    assert _rel_err(y, exact) <= FORMULA_TOL[dtype]
    assert torch.equal(none, base)
    rows = lora.token_slots == -1
    assert torch.equal(y[rows], base[rows]) and not torch.equal(y[~rows], base[~rows])
    if t == 5 and dtype == torch.float16:
        x, w13, s13, w2, s2, tw, ids = args
        raw = (x, w13.view(torch.uint8), s13, w2.view(torch.uint8), s2, tw, ids, [32, 32])
        with mk.use_backend("triton"):
            torch.library.opcheck(torch.ops.minikernels.fused_moe_fp8_w8a8, (*raw, *lora))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_and_prefill_shapes_and_cuda_graph(dtype):
    """A decode and a prefill batch at Qwen3-30B-A3B-FP8's expert size on the GPU (2048 x
    768, 64 experts here, k 8, 128 x 128 blocks), then the decode call captured in a CUDA
    graph (no host sync: the sort and both quantizations run on the device) and replayed
    on new inputs and routing."""
    block = (128, 128)
    for t in (256, 2048):
        args = _inputs(t, 2048, 768, 64, 8, block, dtype, "cuda", 7)
        with mk.use_backend("triton"):
            y = mk.ops.fused_moe_fp8_w8a8(*args, block)
        assert_close(y, reference.fused_moe_fp8_w8a8(*args, block), scale=2.0)
    args = _inputs(256, 2048, 768, 64, 8, block, dtype, "cuda", 8)
    x, tw, ids = args[0], args[5], args[6]
    with mk.use_backend("triton"):
        mk.ops.fused_moe_fp8_w8a8(*args, block)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe_fp8_w8a8(*args, block)
        x.copy_(torch.randn(x.shape, device="cuda"))
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        tw.copy_(torch.rand(tw.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe_fp8_w8a8(*args, block), scale=2.0)
