"""Per-token LoRA on the experts of the fused MoE ops (``mk.ops.fused_moe`` /
``fused_moe_int4`` / ``fused_moe_fp8`` / ``fused_moe_int8`` with ``lora=MoELoRA(...)``)
against the fp32 reference and an independent per-pair fp64 formula written here (int4 /
fp8 / int8 experts dequantized with the reference helpers): hypothesis shapes (no tokens, odd and aligned
H / I, odd ranks, gate-up and down ranks apart, one expert, k > E, BGMV and SGMV LoRA
paths), slots -1 everywhere /
mixed / all adapted, every dtype, poisoned scratch buffers (conftest), every LoRA tensor
a strided view, lora=None and all-(-1) slots bit-identical to the op without LoRA, the
BGMV fallback for many (slot, expert) groups, opcheck with the LoRA arguments, and bad
input naming the argument; the four ops with ``activation`` gelu / gelu_tanh and LoRA (the
updates go in before the activation); the four ops with non-gated experts (``gated=False``,
relu2: lora_b13 [S, E, I, R13] covers the up rows only) and LoRA."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import examples, DTYPES, HALF_DTYPES, assert_close, gate_act_by_hand
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels import _validation
from minikernels.ops import MoELoRA, reference

FORMULA_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SLOT_MODES = ["mixed", "none", "all"]
GELUS = ["gelu", "gelu_tanh"]


# ------------------------------------------------------------------------ inputs

def _routing(t, h, e, k, dtype, g):
    x = torch.randn(t, h, generator=g).to(dtype)
    tw = torch.rand(t, k, generator=g) + 0.1            # never 1: a dropped weight shows
    ids = torch.randint(0, e, (t, k), generator=g)
    return x, tw, ids


def _lora(t, h, inter, e, s, r, dtype, g, slots="mixed", slots_dtype=torch.int64, r2=None,
          gated=True):
    """Random adapters (gate / up rank r, down rank r2, default r) whose updates are O(1)
    next to the base MLP's (so a dropped or misplaced update shows); slots: "mixed" in
    [-1, S), "none" all -1, "all" in [0, S). gated=False: b13 [S, E, I, r] (up only)."""
    r2 = r if r2 is None else r2
    n13 = (2 if gated else 1) * inter
    a13 = (torch.randn(s, e, r, h, generator=g) / h ** 0.5).to(dtype)
    b13 = (torch.randn(s, e, n13, r, generator=g) / max(r, 1) ** 0.5).to(dtype)
    a2 = (torch.randn(s, e, r2, inter, generator=g) / inter ** 0.5).to(dtype)
    b2 = (torch.randn(s, e, h, r2, generator=g) / max(r2, 1) ** 0.5).to(dtype)
    low = {"mixed": -1, "none": -1, "all": 0}[slots]
    high = 0 if slots == "none" else s
    token_slots = torch.randint(low, high, (t,), generator=g).to(slots_dtype)
    scaling = torch.rand(s, generator=g) + 0.5
    return MoELoRA(a13, b13, a2, b2, token_slots, scaling)


def _int4(e, n, k, group, dtype, g):
    """Random int4 experts over all 32 bits of each word; rows of norm ~1."""
    groups = 1 if group == -1 else k // group
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (e, n, k // 8), dtype=torch.int32, generator=g)
    s = ((torch.rand(e, n, groups, generator=g) + 0.5) / (4.0 * k ** 0.5)).to(dtype)
    z = torch.randint(0, 16, (e, n, groups), generator=g).to(dtype)
    return qw, s, z


def _fp8(e, n, k, block, g):
    """Random fp8 experts (every byte but the NaNs) with positive fp32 block scales."""
    bn, bk = block
    b = torch.randint(0, 256, (e, n, k), dtype=torch.uint8, generator=g)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)
    s = (torch.rand(e, -(-n // bn), -(-k // bk), generator=g) + 0.5) / (100.0 * k ** 0.5)
    return b.view(torch.float8_e4m3fn), s


def _int8(e, n, k, g):
    """Random int8 experts (the whole range) with positive fp32 per-row scales."""
    q = torch.randint(-128, 128, (e, n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(e, n, generator=g) + 0.5) / (64.0 * k ** 0.5)
    return q, s


# ---------------------------------------------------------------- the independent formula

def _by_hand(x, w13, w2, tw, ids, lora, activation="silu", gated=True):
    """One (token, slot) pair at a time in fp64 on dense (or dequantized) experts
    w13 [E, 2I, H], w2 [E, H, I]: the contract of MoELoRA, each LoRA update and the
    activated intermediate act(gate) * up (helpers.gate_act_by_hand) rounded to x.dtype.
    gated=False: w13 [E, I, H] and b13 the up rows, the intermediate act(up).
    Returns [T, H] fp64 on the CPU."""
    inter = w2.shape[2]
    dt = x.dtype
    xd, w13d, w2d, twd = (v.double().cpu() for v in (x, w13, w2, tw))
    a13, b13, a2, b2, slots, scaling = (v.cpu() for v in lora)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t, row in enumerate(ids.cpu().tolist()):
        s = int(slots[t])
        for j, e in enumerate(row):
            gate_up = w13d[e] @ xd[t]
            if s >= 0:
                sc = float(scaling[s])
                d13 = sc * (b13[s, e].double() @ (a13[s, e].double() @ xd[t]))
                gate_up = gate_up + d13.to(dt).double()
            if gated:
                gate, up = gate_up[:inter], gate_up[inter:]
                act = (gate_act_by_hand(gate, activation) * up).to(dt).double()
            else:
                act = gate_act_by_hand(gate_up, activation).to(dt).double()
            y = w2d[e] @ act
            if s >= 0:
                d2 = sc * (b2[s, e].double() @ (a2[s, e].double() @ act))
                y = y + d2.to(dt).double()
            out[t] += twd[t, j] * y
    return out


def _rel_err(got, exact):
    return float((got.double().cpu() - exact).abs().max() / exact.abs().max().clamp_min(1e-2))


def _check(got, want, exact, dtype):
    """Triton vs the reference (the dtype's tolerance), both vs the fp64 formula."""
    assert_close(got, want, scale=2.0)
    if exact.numel():
        assert _rel_err(want, exact) <= FORMULA_TOL[dtype]
        assert _rel_err(got, exact) <= FORMULA_TOL[dtype]


# --------------------------------------------------------------------- dense experts

def _dense(t, h, inter, e, k, s, r, dtype, device, seed, slots="mixed",
           slots_dtype=torch.int64, r2=None, gated=True):
    g = torch.Generator().manual_seed(seed)
    x, tw, ids = _routing(t, h, e, k, dtype, g)
    w13 = (torch.randn(e, (2 if gated else 1) * inter, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    lora = _lora(t, h, inter, e, s, r, dtype, g, slots, slots_dtype, r2, gated)
    return (x.to(device), w13.to(device), w2.to(device), tw.to(device), ids.to(device),
            MoELoRA(*(v.to(device) for v in lora)))


@settings(max_examples=examples(16), deadline=None)
@given(t=st.integers(0, 40), k=st.integers(1, 4), e=st.integers(1, 6),
       s=st.integers(1, 3), r=st.sampled_from([1, 3, 8, 16]),
       r2=st.sampled_from([1, 3, 8, 16]), h=st.sampled_from([33, 64]),
       inter=st.sampled_from([17, 32]), dtype=st.sampled_from(DTYPES),
       slots=st.sampled_from(SLOT_MODES),
       slots_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 10 ** 6))
def test_dense_matches_reference_and_formula(t, k, e, s, r, r2, h, inter, dtype, slots,
                                             slots_dtype, seed, device):
    """Gate / up rank r and down rank r2 independent (gate and up stacked: 2r)."""
    x, w13, w2, tw, ids, lora = _dense(t, h, inter, e, k, s, r, dtype, device, seed, slots,
                                       slots_dtype, r2)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora)
    assert y.shape == (t, h) and y.dtype == dtype
    want = reference.fused_moe(x, w13, w2, tw, ids, lora)
    _check(y, want, _by_hand(x, w13, w2, tw, ids, lora), dtype)


# ---------------------------------------------------------------------- int4 experts

def _int4_case(t, h, inter, e, k, s, r, group, dtype, device, seed, slots="mixed",
               r2=None, gated=True):
    g = torch.Generator().manual_seed(seed)
    x, tw, ids = _routing(t, h, e, k, dtype, g)
    w13 = _int4(e, (2 if gated else 1) * inter, h, group, dtype, g)
    w2 = _int4(e, h, inter, group, dtype, g)
    lora = _lora(t, h, inter, e, s, r, dtype, g, slots, r2=r2, gated=gated)
    return ([v.to(device) for v in (x, *w13, *w2, tw, ids)],
            MoELoRA(*(v.to(device) for v in lora)))


def _int4_dense(args, group):
    """The int4 experts dequantized (reference helper): w13 [E, 2I, H], w2 [E, H, I]."""
    x, q13, s13, z13, q2, s2, z2 = args[:7]
    return (reference.dequantize_int4_experts(q13, s13, z13, group, x.dtype),
            reference.dequantize_int4_experts(q2, s2, z2, group, x.dtype))


@settings(max_examples=examples(12), deadline=None)
@given(t=st.integers(0, 40), k=st.integers(1, 4), e=st.integers(1, 6),
       s=st.integers(1, 3), r=st.sampled_from([1, 5, 16]),
       shape=st.sampled_from([(32, 16, 16), (40, 24, 8), (64, 32, -1), (64, 32, 32)]),
       dtype=st.sampled_from(HALF_DTYPES), slots=st.sampled_from(SLOT_MODES),
       seed=st.integers(0, 10 ** 6))
def test_int4_matches_reference_and_formula(t, k, e, s, r, shape, dtype, slots, seed,
                                            device):
    """Gate and up stacked along R13 = 2r (PEFT's layout), down at rank r."""
    h, inter, group = shape
    args, lora = _int4_case(t, h, inter, e, k, s, 2 * r, group, dtype, device, seed, slots,
                            r2=r)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int4(*args, group, lora=lora)
    want = reference.fused_moe_int4(*args, group, lora)
    w13, w2 = _int4_dense(args, group)
    _check(y, want, _by_hand(args[0], w13, w2, args[7], args[8], lora), dtype)


# ----------------------------------------------------------------------- fp8 experts

def _w8a16_case(experts, t, h, inter, e, k, s, r, dtype, device, seed, slots="mixed",
                r2=None, gated=True):
    """x, w13, s13, w2, s2, tw, ids with one-byte experts (weight, scale) =
    experts(N, K, g), and a LoRA on them."""
    g = torch.Generator().manual_seed(seed)
    x, tw, ids = _routing(t, h, e, k, dtype, g)
    w13, s13 = experts((2 if gated else 1) * inter, h, g)
    w2, s2 = experts(h, inter, g)
    lora = _lora(t, h, inter, e, s, r, dtype, g, slots, r2=r2, gated=gated)
    return ([v.to(device) for v in (x, w13, s13, w2, s2, tw, ids)],
            MoELoRA(*(v.to(device) for v in lora)))


def _fp8_case(t, h, inter, e, k, s, r, block, dtype, device, seed, slots="mixed",
              r2=None, gated=True):
    return _w8a16_case(lambda n, kk, g: _fp8(e, n, kk, block, g), t, h, inter, e, k, s, r,
                       dtype, device, seed, slots, r2, gated)


@settings(max_examples=examples(12), deadline=None)
@given(t=st.integers(0, 40), k=st.integers(1, 4), e=st.integers(1, 6),
       s=st.integers(1, 3), r=st.sampled_from([1, 7, 16]),
       h=st.sampled_from([33, 64]), inter=st.sampled_from([17, 32]),
       block=st.sampled_from([(128, 128), (16, 16), (1, 128)]),
       dtype=st.sampled_from(HALF_DTYPES), slots=st.sampled_from(SLOT_MODES),
       seed=st.integers(0, 10 ** 6))
def test_fp8_matches_reference_and_formula(t, k, e, s, r, h, inter, block, dtype, slots,
                                           seed, device):
    args, lora = _fp8_case(t, h, inter, e, k, s, r, block, dtype, device, seed, slots,
                           r2=max(1, r // 2))
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_fp8(*args, block, lora=lora)
    want = reference.fused_moe_fp8(*args, block, lora)
    x, w13, s13, w2, s2, tw, ids = args
    w13d = reference.dequantize_fp8_experts(w13, s13, block)
    w2d = reference.dequantize_fp8_experts(w2, s2, block)
    _check(y, want, _by_hand(x, w13d, w2d, tw, ids, lora), dtype)


# ----------------------------------------------------------------------- int8 experts

def _int8_case(t, h, inter, e, k, s, r, dtype, device, seed, slots="mixed", r2=None,
               gated=True):
    return _w8a16_case(lambda n, kk, g: _int8(e, n, kk, g), t, h, inter, e, k, s, r,
                       dtype, device, seed, slots, r2, gated)


@settings(max_examples=examples(12), deadline=None)
@given(t=st.integers(0, 40), k=st.integers(1, 4), e=st.integers(1, 6),
       s=st.integers(1, 3), r=st.sampled_from([1, 7, 16]),
       h=st.sampled_from([33, 64]), inter=st.sampled_from([17, 32]),
       dtype=st.sampled_from(DTYPES), slots=st.sampled_from(SLOT_MODES),
       seed=st.integers(0, 10 ** 6))
def test_int8_matches_reference_and_formula(t, k, e, s, r, h, inter, dtype, slots, seed,
                                            device):
    args, lora = _int8_case(t, h, inter, e, k, s, r, dtype, device, seed, slots,
                            r2=max(1, r // 2))
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int8(*args, lora=lora)
    want = reference.fused_moe_int8(*args, lora)
    x, w13, s13, w2, s2, tw, ids = args
    w13d = reference.dequantize_int8_experts(w13, s13)
    w2d = reference.dequantize_int8_experts(w2, s2)
    _check(y, want, _by_hand(x, w13d, w2d, tw, ids, lora), dtype)


# --------------------------------------------------------- no adapter = the base op

def _four_ops(device, t=12, dtype=torch.float16, slots="none", seed=1, activation="silu",
              gated=True):
    """({op: (call(lora) -> out, w13, w2)} for each op on one shared routing, with the
    given activation and gated; w13 / w2 the op's experts dense or dequantized
    (reference helpers)), the lora, and (x, topk_weights, topk_ids)."""
    h, inter, e, k, s, r = 32, 16, 3, 2, 2, 4
    xd, w13, w2, tw, ids, lora = _dense(t, h, inter, e, k, s, r, dtype, device, seed, slots,
                                        gated=gated)
    a4, _ = _int4_case(t, h, inter, e, k, s, r, 16, dtype, device, seed, gated=gated)
    a8, _ = _fp8_case(t, h, inter, e, k, s, r, (16, 16), dtype, device, seed, gated=gated)
    ai8, _ = _int8_case(t, h, inter, e, k, s, r, dtype, device, seed, gated=gated)
    a4[0], a4[-2], a4[-1] = xd, tw, ids
    a8[0], a8[-2], a8[-1] = xd, tw, ids
    ai8[0], ai8[-2], ai8[-1] = xd, tw, ids
    kw = {"activation": activation} if gated else {"activation": activation, "gated": False}
    ops = {
        "dense": (lambda lo: mk.ops.fused_moe(xd, w13, w2, tw, ids, lora=lo, **kw), w13, w2),
        "int4": (lambda lo: mk.ops.fused_moe_int4(*a4, 16, lora=lo, **kw),
                 *_int4_dense(a4, 16)),
        "fp8": (lambda lo: mk.ops.fused_moe_fp8(*a8, (16, 16), lora=lo, **kw),
                reference.dequantize_fp8_experts(a8[1], a8[2], (16, 16)),
                reference.dequantize_fp8_experts(a8[3], a8[4], (16, 16))),
        "int8": (lambda lo: mk.ops.fused_moe_int8(*ai8, lora=lo, **kw),
                 reference.dequantize_int8_experts(ai8[1], ai8[2]),
                 reference.dequantize_int8_experts(ai8[3], ai8[4]))}
    return ops, lora, (xd, tw, ids)


def _three_ops(device, t=12, dtype=torch.float16, slots="none", seed=1):
    """(call(lora) -> out) for each op on one shared routing, and the lora."""
    ops, lora, _ = _four_ops(device, t, dtype, slots, seed)
    return {name: call for name, (call, _, _) in ops.items()}, lora


@pytest.mark.parametrize("t", [5, 40])          # BGMV (< 32 pairs) and SGMV LoRA paths
def test_no_adapter_is_bit_identical(t, device):
    """lora=None is the base path; slots all -1 add exact zeros: torch.equal."""
    calls, lora = _three_ops(device, t=t)
    assert bool((lora.token_slots == -1).all())
    with mk.use_backend("triton"):
        for name, call in calls.items():
            base = call(None)
            assert not torch.isnan(base).any(), name
            assert torch.equal(call(lora), base), name
            assert torch.equal(call(lora._replace(scaling=lora.scaling * 0)), base), name


def test_matches_the_op_without_lora_per_token(device):
    """Mixed slots: the tokens at slot -1 get exactly the base op's rows (each row of the
    output depends only on its own token), the others differ."""
    calls, lora = _three_ops(device, t=40, slots="mixed", seed=4)
    base_rows = lora.token_slots == -1
    assert base_rows.any() and (~base_rows).any()
    with mk.use_backend("triton"):
        for name, call in calls.items():
            base, got = call(None), call(lora)
            assert torch.equal(got[base_rows], base[base_rows]), name
            assert not torch.equal(got[~base_rows], base[~base_rows]), name


def test_reference_backend_through_the_op(device):
    calls, lora = _three_ops(device, t=9, slots="mixed", seed=2)
    for call in calls.values():
        with mk.use_backend("reference"):
            want = call(lora)
        with mk.use_backend("triton"):
            got = call(lora)
        assert_close(got, want, scale=2.0)


@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("t", [5, 40])          # BGMV (< 32 pairs) and SGMV LoRA paths
def test_activation_with_lora(t, activation, device):
    """Each op (dense / int4 / fp8 / int8 experts) with activation= gelu / gelu_tanh and
    mixed slots: the LoRA updates go in before the activation, against the reference and
    the fp64 formula with that activation; slot -1 rows are the op without LoRA (same
    activation) bit for bit; far from the SiLU result."""
    ops, lora, (x, tw, ids) = _four_ops(device, t=t, slots="mixed", seed=6,
                                        activation=activation)
    base_rows = lora.token_slots == -1
    assert base_rows.any() and (~base_rows).any()
    for name, (call, w13, w2) in ops.items():
        with mk.use_backend("reference"):
            want = call(lora)
        with mk.use_backend("triton"):
            got, base = call(lora), call(None)
        _check(got, want, _by_hand(x, w13, w2, tw, ids, lora, activation), torch.float16)
        assert torch.equal(got[base_rows], base[base_rows]), name
        silu = _by_hand(x, w13, w2, tw, ids, lora)
        assert _rel_err(got, silu) > 2 * FORMULA_TOL[torch.float16], name


@pytest.mark.parametrize("activation", ["relu2", "silu"])
@pytest.mark.parametrize("t", [5, 40])          # BGMV (< 32 pairs) and SGMV LoRA paths
def test_nongated_with_lora(t, activation, device):
    """Each op (dense / int4 / fp8 / int8 experts) with non-gated experts (gated=False,
    relu2 and silu) and mixed slots: lora_b13 [S, E, I, R13] updates the up rows before
    the activation, against the reference and the fp64 formula; slot -1 rows are the
    op without LoRA bit for bit, and all slots -1 is the op without LoRA."""
    ops, lora, (x, tw, ids) = _four_ops(device, t=t, slots="mixed", seed=7,
                                        activation=activation, gated=False)
    assert lora.b13.shape[2] == 16                             # I rows, not 2I
    base_rows = lora.token_slots == -1
    assert base_rows.any() and (~base_rows).any()
    unused = lora._replace(token_slots=torch.full_like(lora.token_slots, -1))
    for name, (call, w13, w2) in ops.items():
        assert w13.shape[1] == 16, name
        with mk.use_backend("reference"):
            want = call(lora)
        with mk.use_backend("triton"):
            got, base, none = call(lora), call(None), call(unused)
        exact = _by_hand(x, w13, w2, tw, ids, lora, activation, gated=False)
        _check(got, want, exact, torch.float16)
        assert torch.equal(got[base_rows], base[base_rows]), name
        assert torch.equal(none, base), name
        assert not torch.equal(got[~base_rows], base[~base_rows]), name


def test_nongated_lora_opcheck_and_errors(device):
    """Non-gated experts with LoRA through the custom op (opcheck); a lora_b13 of gated
    experts' 2I rows with gated=False is refused by name (and an I-row one with gated
    experts)."""
    x, w13, w2, tw, ids, lora = _dense(5, 16, 8, 3, 2, 2, 3, torch.float32, device, 2,
                                       gated=False)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe, (x, w13, w2, tw, ids, *lora),
                              {"activation": "relu2", "gated": False})
    b13_2i = torch.zeros(2, 3, 16, 3, device=device)
    with pytest.raises(ValueError, match=r"lora_b13 must have shape \[S, E, I, R13\] = "
                                         r"\[2, 3, 8, 3\] .*gated=False"):
        mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora._replace(b13=b13_2i),
                         activation="relu2", gated=False)
    xg, w13g, w2g, twg, idsg, lorag = _dense(5, 16, 8, 3, 2, 2, 3, torch.float32, device, 2)
    with pytest.raises(ValueError, match=r"lora_b13 must have shape \[S, E, 2I, R13\]"):
        mk.ops.fused_moe(xg, w13g, w2g, twg, idsg, lora=lorag._replace(b13=lora.b13))


# ------------------------------------------------------------------- strided views

def _views(lora: MoELoRA, device) -> MoELoRA:
    """Every LoRA tensor a non-contiguous view with the same values: the weight stacks
    with S and E transposed (they do not merge: the launcher copies) and a strided last
    dim, the slot and scaling vectors every other element."""
    def stack(v):
        s, e, a, b = v.shape
        big = torch.zeros(e, s, a, 2 * b + 1, dtype=v.dtype, device=device)
        view = big.transpose(0, 1)[:, :, :, 1::2]
        view.copy_(v)
        return view

    def vec(v):
        big = torch.zeros(2 * v.shape[0], dtype=v.dtype, device=device)
        big[::2] = v
        return big[::2]

    out = MoELoRA(*(stack(v) for v in lora[:4]), vec(lora.token_slots), vec(lora.scaling))
    assert not any(v.is_contiguous() for v in out if v.numel() > 1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_lora_as_strided_views(dtype, device):
    x, w13, w2, tw, ids, lora = _dense(7, 40, 24, 3, 2, 2, 5, dtype, device, 3)
    want = reference.fused_moe(x, w13, w2, tw, ids, lora)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, lora=_views(lora, device))
    assert_close(y, want, scale=2.0)


def test_quantized_lora_as_strided_views(device):
    args, lora = _int4_case(33, 32, 16, 3, 2, 2, 5, 16, torch.bfloat16, device, 5)
    views = _views(lora, device)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int4(*args, 16, lora=views)
    assert_close(y, reference.fused_moe_int4(*args, 16, lora), scale=2.0)
    args, lora = _fp8_case(6, 33, 17, 3, 2, 3, 3, (16, 16), torch.float16, device, 6)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_fp8(*args, (16, 16), lora=_views(lora, device))
    assert_close(y, reference.fused_moe_fp8(*args, (16, 16), lora), scale=2.0)
    args, lora = _int8_case(6, 33, 17, 3, 2, 3, 3, torch.bfloat16, device, 7)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe_int8(*args, lora=_views(lora, device))
    assert_close(y, reference.fused_moe_int8(*args, lora), scale=2.0)


# -------------------------------------------------------------- the LoRA launch plan

def test_pair_slots_and_bgmv_fallback(device, monkeypatch):
    """Pair p = t * k + j takes virtual slot token_slots[t] * E + topk_ids[t, j] (-1
    without adapter); SGMV from 32 pairs while S*E + 1 groups fit the alignment kernels,
    else BGMV, and both give the reference's result."""
    from minikernels.ops.triton import moe as triton_moe

    x, w13, w2, tw, ids, lora = _dense(20, 24, 16, 4, 2, 3, 4, torch.float32, device, 8)
    plan = triton_moe.pair_lora(lora, ids)
    s = lora.token_slots.long()[:, None]
    want = torch.where(s >= 0, s * 4 + ids, -1).flatten()
    assert torch.equal(plan.slots, want) and plan.grouped
    assert plan.a13.shape == (12, 4, 24) and plan.b2.shape == (12, 24, 4)
    assert torch.equal(plan.scaling, lora.scaling.repeat_interleave(4))
    few = lora._replace(token_slots=lora.token_slots[:15])                # 30 pairs
    assert not triton_moe.pair_lora(few, ids[:15]).grouped
    ref = reference.fused_moe(x, w13, w2, tw, ids, lora)
    monkeypatch.setattr(triton_moe, "LORA_GROUPED_MAX_GROUPS", 12)     # 3 * 4 + 1 > 12
    assert not triton_moe.pair_lora(lora, ids).grouped
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora)
    assert_close(y, ref)
    # both ranks 0: no update can be nonzero, so the kernels take the base path
    empty = MoELoRA(lora.a13[:, :, :0], lora.b13[..., :0], lora.a2[:, :, :0],
                    lora.b2[..., :0], lora.token_slots, lora.scaling)
    assert triton_moe.pair_lora(empty, ids) is None
    # only the down projection adapted (gate / up rank 0)
    down_only = empty._replace(a2=lora.a2, b2=lora.b2)
    with mk.use_backend("triton"):
        y = mk.ops.fused_moe(x, w13, w2, tw, ids, lora=down_only)
    assert_close(y, reference.fused_moe(x, w13, w2, tw, ids, down_only))


# -------------------------------------------------------------------------- opcheck

def test_opcheck_with_lora(device):
    h, inter, e, k, s, r = 16, 8, 3, 2, 2, 3
    x, w13, w2, tw, ids, lora = _dense(5, h, inter, e, k, s, r, torch.float32, device, 2)
    a4, lora16 = _int4_case(4, h, inter, e, k, s, r, 8, torch.float16, device, 3)
    a8, lora8 = _fp8_case(4, h, inter, e, k, s, r, (16, 16), torch.float16, device, 4)
    a8[1], a8[3] = a8[1].view(torch.uint8), a8[3].view(torch.uint8)   # the op's bytes
    ai8, lorai8 = _int8_case(4, h, inter, e, k, s, r, torch.float16, device, 5)
    with mk.use_backend("triton"):
        torch.library.opcheck(torch.ops.minikernels.fused_moe, (x, w13, w2, tw, ids, *lora))
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int4, (*a4, 8, *lora16))
        torch.library.opcheck(torch.ops.minikernels.fused_moe_fp8, (*a8, [16, 16], *lora8))
        torch.library.opcheck(torch.ops.minikernels.fused_moe_int8, (*ai8, *lorai8))


def test_compile_fullgraph_with_lora(device):
    x, w13, w2, tw, ids, lora = _dense(5, 24, 16, 3, 2, 2, 4, torch.float32, device, 2)

    def block(x, w13, w2, tw, ids, lora):
        return mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora) + x

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, w13, w2, tw, ids, lora)
    assert_close(got, reference.fused_moe(x, w13, w2, tw, ids, lora) + x)


# --------------------------------------------------------------------------- errors

def test_errors_name_the_argument(device):
    x, w13, w2, tw, ids, lora = _dense(4, 16, 8, 3, 2, 2, 3, torch.float32, device, 1)
    a13, b13, a2, b2, slots, scaling = lora
    bad = [
        (lora._replace(b13=None), ValueError, r"lora_b13 \(MoELoRA.b13\) is missing"),
        (lora._replace(scaling=None), ValueError, r"lora_scaling .* is missing"),
        ((a13, b13, a2), TypeError, r"lora must be a minikernels.ops.MoELoRA"),
        ([*lora], TypeError, r"lora must be"),
        (lora._replace(a13=a13.half()), TypeError, r"lora_a13 must have dtype"),
        (lora._replace(a2=a2[0]), ValueError, r"lora_a2 must be 4-D"),
        (lora._replace(a13=a13[:, :, :, :8]), ValueError, r"lora_a13 must have shape"),
        (lora._replace(a13=a13[:, :2]), ValueError, r"lora_a13 must have shape .*E = 3"),
        (lora._replace(b13=b13[:, :, :8]), ValueError, r"lora_b13 must have shape"),
        (lora._replace(b13=b13[:1]), ValueError, r"lora_b13 must have shape"),
        (lora._replace(a2=a2[..., :4]), ValueError, r"lora_a2 must have shape"),
        (lora._replace(a2=a2[:1]), ValueError, r"lora_a2 must have shape"),
        (lora._replace(a2=a2[:, :, :2]), ValueError, r"lora_b2 must have shape .*R2"),
        (lora._replace(b2=b2[..., :2]), ValueError, r"lora_b2 must have shape"),
        (lora._replace(b2=b2[:, :, :8]), ValueError, r"lora_b2 must have shape"),
        (lora._replace(token_slots=slots[:3]), ValueError, r"lora_token_slots must have"),
        (lora._replace(token_slots=slots.float()), TypeError, r"lora_token_slots"),
        (lora._replace(scaling=scaling[:1]), ValueError, r"lora_scaling must have one"),
        (lora._replace(scaling=scaling.half()), TypeError, r"lora_scaling"),
        (lora._replace(token_slots=torch.full_like(slots, 2)), ValueError,
         r"lora_token_slots values must be in \[-1, 2\)"),
        (lora._replace(token_slots=torch.full_like(slots, -2)), ValueError,
         r"lora_token_slots values"),
    ]
    for lo, exc, match in bad:
        with pytest.raises(exc, match=match):
            mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lo)
    # the quantized ops share the checks: one each, against their own I
    args, lora16 = _int4_case(4, 16, 8, 3, 2, 2, 3, 8, torch.float16, device, 1)
    with pytest.raises(ValueError, match=r"lora_a2 must have shape .*I = 8"):
        mk.ops.fused_moe_int4(*args, 8, lora=lora16._replace(a2=lora16.a2[..., :4]))
    args, lora8 = _fp8_case(4, 16, 8, 3, 2, 2, 3, (16, 16), torch.float16, device, 1)
    with pytest.raises(ValueError, match=r"lora_token_slots is missing"):
        torch.ops.minikernels.fused_moe_fp8(
            args[0], args[1].view(torch.uint8), args[2], args[3].view(torch.uint8), args[4],
            args[5], args[6], [16, 16], *lora8[:4], None, lora8.scaling)
    args, lorai8 = _int8_case(4, 16, 8, 3, 2, 2, 3, torch.float16, device, 1)
    with pytest.raises(ValueError, match=r"lora_b13 must have shape .*I = 8"):
        mk.ops.fused_moe_int8(*args, lora=lorai8._replace(b13=lorai8.b13[:, :, :8]))
    with pytest.raises(ValueError, match=r"lora_b2 is missing"):
        torch.ops.minikernels.fused_moe_int8(*args, *lorai8[:3], None, *lorai8[4:])
    with pytest.raises(ValueError, match=r"lora_a13 is missing"):
        torch.ops.minikernels.fused_moe(x, w13, w2, tw, ids, None, *lora[1:])
    # index checks off (graph capture, the engine's validated steps): not read back
    with _validation.index_checks(False), mk.use_backend("reference"):
        mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora._replace(
            token_slots=torch.full_like(slots, -5)))


# -------------------------------------------------------------------------------- GPU

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_shape_and_cuda_graph(dtype):
    """A decode and a prefill batch at model size (64 experts, k 8, 4 adapters of rank
    16), then the decode call captured in a CUDA graph (no host sync with LoRA either)
    and replayed on new routing and slots."""
    for t in (64, 512):
        x, w13, w2, tw, ids, lora = _dense(t, 1024, 768, 64, 8, 4, 16, dtype, "cuda", 7)
        with mk.use_backend("triton"):
            y = mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora)
        assert_close(y, reference.fused_moe(x, w13, w2, tw, ids, lora), scale=2.0)
    x, w13, w2, tw, ids, lora = _dense(64, 1024, 768, 64, 8, 4, 16, dtype, "cuda", 8)
    with mk.use_backend("triton"):
        mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora)          # warm up (JIT)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora)
        ids.copy_(torch.randint(0, 64, ids.shape, device="cuda"))
        lora.token_slots.copy_(torch.randint(-1, 4, lora.token_slots.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(yg, mk.ops.fused_moe(x, w13, w2, tw, ids, lora=lora), scale=2.0)
