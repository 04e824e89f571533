"""GPTQ / AWQ compat: vLLM's ``gptq_gemm`` / ``gptq_shuffle`` / ``awq_gemm`` /
``awq_dequantize`` (minikernels.compat.vllm_ops), AutoGPTQ's ``QuantLinear``
(minikernels.compat.auto_gptq) and AutoAWQ's ``WQLinear_GEMM`` + packing utils
(minikernels.compat.awq).

Every result is checked against an fp32 dequantize-then-matmul reference built here from
the integers the test generated, packed by the test's own packers written from the peers'
documented layouts (GPTQ: values packed along K lowest bits first, qzeros along N, v1
stores zero - 1; AWQ: along N in the order 0 2 4 6 1 3 5 7; exllama's shuffle: nibbles
"77775555 33331111 66664444 22220000"), never by the code under test."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import TOL, assert_close
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minikernels as mk
from minikernels.compat import vllm_ops as ops
from minikernels.compat.auto_gptq import (QuantLinear, autogptq_post_init, dequantize_weight,
                                          dynamically_import_QuantLinear,
                                          unpack_4bit_to_32bit_signed)
from minikernels.compat.awq import (WQLinear_GEMM, dequantize_gemm, reverse_awq_order,
                                    unpack_awq, unpack_reorder_pack)

ORDER_AWQ = (0, 2, 4, 6, 1, 3, 5, 7)
EMPTY = torch.empty(0, dtype=torch.int32)


# ----------------------------------------------------------------- the test's packers


def _int32(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight: q [K, N] -> int32 [K * bits / 32, N]; value j of word (r, n) at bits
    j*bits.. is q[r * 32/bits + j, n]."""
    per = 32 // bits
    q = q.to(torch.int64)
    w = torch.zeros(q.shape[0] // per, q.shape[1], dtype=torch.int64)
    for j in range(per):
        w |= (q[j::per] & (2**bits - 1)) << (bits * j)
    return _int32(w)


def pack_n(z: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Packed along the last dim: z [R, C * 32/bits] -> int32 [R, C]; slot i of word c
    holds column c * 32/bits + order[i] (order 0..7 by default; AWQ's for AWQ)."""
    per = 32 // bits
    order = order or tuple(range(per))
    z = z.to(torch.int64)
    w = torch.zeros(z.shape[0], z.shape[1] // per, dtype=torch.int64)
    for i in range(per):
        w |= (z[:, order[i]::per] & (2**bits - 1)) << (bits * i)
    return _int32(w)


def unpack_n(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None):
    per = 32 // bits
    order = order or tuple(range(per))
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(words.shape[0], words.shape[1] * per, dtype=torch.int64)
    for i in range(per):
        out[:, order[i]::per] = (w >> (bits * i)) & (2**bits - 1)
    return out


def unpack_k(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_n(words.t(), bits).t()


def exllama_shuffle_ref(words: torch.Tensor) -> torch.Tensor:
    """vLLM's shuffle_4bit_8 on every word: for i in 0..3 the low nibble of byte i goes to
    bits 4i, the high nibble to bits 4i + 16."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for i in range(4):
        byte = (w >> (8 * i)) & 0xFF
        out |= (byte & 0xF) << (4 * i)
        out |= (byte >> 4) << (4 * i + 16)
    return _int32(out)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scales(g: torch.Generator, shape: tuple[int, ...], bits: int) -> torch.Tensor:
    """Positive scales exactly representable in fp16 and bf16 (so every dtype holds the
    same grid)."""
    top = 40 if bits == 4 else 6
    return torch.randint(4, top, shape, generator=g).float() / 1024


def make_gptq(g: torch.Generator, k: int, n: int, group: int, bits: int, act_order: bool,
              v2: bool) -> dict:
    """Random GPTQ layer: integers, checkpoint tensors, fp32 reference W [K, N]."""
    maxq = 2**bits - 1
    gs = k if group == -1 else group
    groups = k // gs
    q = torch.randint(0, maxq + 1, (k, n), generator=g)
    zeros = torch.randint(0 if v2 else 1, maxq + (1 if v2 else 2), (groups, n), generator=g)
    scales = _scales(g, (groups, n), bits)
    g_idx = torch.arange(k) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    w_ref = (q - zeros[g_idx]).float() * scales[g_idx]
    stored_zeros = zeros if v2 else zeros - 1
    return dict(q=q, zeros=zeros, scales=scales, g_idx=g_idx.to(torch.int32), w=w_ref,
                qweight=pack_k(q, bits), qzeros=pack_n(stored_zeros, bits))


def make_awq(g: torch.Generator, k: int, n: int, group: int) -> dict:
    gs = k if group == -1 else group
    groups = k // gs
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (groups, n), generator=g)
    scales = _scales(g, (groups, n), 4)
    rows = torch.arange(k) // gs
    w_ref = (q - zeros[rows]).float() * scales[rows]
    return dict(q=q, zeros=zeros, scales=scales, w=w_ref,
                qweight=pack_n(q, 4, ORDER_AWQ), qzeros=pack_n(zeros, 4, ORDER_AWQ))


def make_x(g: torch.Generator, m: int, k: int, dtype: torch.dtype, three_d: bool,
           strided: bool) -> torch.Tensor:
    lead = (2, m) if three_d else (m,)
    if strided:     # every other column of a buffer twice as wide
        return torch.randn(*lead, 2 * k, generator=g).to(dtype)[..., ::2]
    return torch.randn(*lead, k, generator=g).to(dtype)


def ref_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype or x.dtype)


def _kn(bits: int, group: int, groups: int, blocks: int) -> tuple[int, int]:
    """K and an odd multiple of what the format needs for N."""
    k = (8 * (2 * groups + 3) if bits == 4 else 16 * (groups + 2)) if group == -1 \
        else group * groups
    return k, (8 if bits == 4 else 4) * blocks


# ----------------------------------------------------------------- vLLM: gptq_gemm


@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64, 128, -1]),
       groups=st.sampled_from([1, 3]), blocks=st.sampled_from([1, 3, 5]),
       act_order=st.booleans(), v2=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       m=st.sampled_from([1, 5]), three_d=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**31))
def test_gptq_gemm_matches_reference(bits, group, groups, blocks, act_order, v2, dtype, m,
                                     three_d, strided, seed):
    g = _gen(seed)
    k, n = _kn(bits, group, groups, blocks)
    L = make_gptq(g, k, n, group, bits, act_order, v2)
    x = make_x(g, m, k, dtype, three_d, strided)
    g_idx = L["g_idx"] if act_order or seed % 2 else EMPTY
    y = ops.gptq_gemm(x, L["qweight"], L["qzeros"], L["scales"].to(dtype), g_idx, False, v2,
                      bits)
    assert_close(y, ref_mm(x, L["w"]))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_gemm_runs_minikernels_ops(bits):
    g = _gen(bits)
    L = make_gptq(g, 128, 24, 32, bits, True, False)
    x = torch.randn(3, 128, generator=g).half()
    name = "int4_matmul" if bits == 4 else "int8_matmul"
    with mock.patch.object(mk.ops, name, wraps=getattr(mk.ops, name)) as spy:
        y = ops.gptq_gemm(x, L["qweight"], L["qzeros"], L["scales"].half(), L["g_idx"],
                          False, False, bits)
    assert spy.call_count == 1
    assert_close(y, ref_mm(x, L["w"]))


def test_gptq_gemm_uneven_groups_and_legacy_signature():
    """A g_idx whose groups are not K / groups rows each (vLLM's kernel takes any) runs the
    exact fallback; the 7-argument form of older vLLM (no use_v2_format) is v1."""
    g = _gen(3)
    k, n, groups = 64, 16, 4
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 17, (groups, n), generator=g)
    scales = _scales(g, (groups, n), 4)
    g_idx = torch.randint(0, groups, (k,), generator=g, dtype=torch.int32)
    w = (q - zeros[g_idx]).float() * scales[g_idx]
    x = torch.randn(4, k, generator=g).half()
    args = (x, pack_k(q, 4), pack_n(zeros - 1, 4), scales.half(), g_idx, False)
    assert_close(ops.gptq_gemm(*args, False, 4), ref_mm(x, w))
    assert torch.equal(ops.gptq_gemm(*args, 4), ops.gptq_gemm(*args, False, 4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 7])
def test_gptq_shuffle_then_exllama_equals_unshuffled(bits, act_order, m):
    g = _gen(bits * 10 + act_order + m)
    L = make_gptq(g, 256, 40 if bits == 4 else 20, 64, bits, act_order, False)
    x = torch.randn(m, 256, generator=g).half()
    perm = torch.argsort(L["g_idx"]).to(torch.int32) if act_order else EMPTY
    shuffled = L["qweight"].clone()
    assert ops.gptq_shuffle(shuffled, perm, bits) is None
    # the layout the real kernel writes: rows made sequential by perm, then (4-bit) the
    # nibbles of each word shuffled
    rows = pack_k(L["q"][perm.long()] if act_order else L["q"], bits)
    assert torch.equal(shuffled, exllama_shuffle_ref(rows) if bits == 4 else rows)
    y_ex = ops.gptq_gemm(x, shuffled, L["qzeros"], L["scales"].half(), perm, True, False, bits)
    y_alt = ops.gptq_gemm(x, L["qweight"], L["qzeros"], L["scales"].half(), L["g_idx"], False,
                          False, bits)
    assert_close(y_ex, y_alt)
    assert_close(y_ex, ref_mm(x, L["w"]))
    # fp32 activations and scales: the exact fallback reads the shuffled weight the same way
    y32 = ops.gptq_gemm(x.float(), shuffled, L["qzeros"], L["scales"], perm, True, False, bits)
    assert_close(y32, ref_mm(x.float(), L["w"]))
    dec = ops.decode_gptq(shuffled, L["qzeros"], L["scales"], perm, True, False, bits)
    assert torch.equal(dec.dequantize(), L["w"])


def test_gptq_shuffle_writes_strided_view_in_place():
    g = _gen(5)
    L = make_gptq(g, 64, 16, 32, 4, False, False)
    buf = torch.full((8, 20), 7, dtype=torch.int32)
    view = buf[:, 2:18]
    view.copy_(L["qweight"])
    ops.gptq_shuffle(view, EMPTY, 4)
    assert torch.equal(view, exllama_shuffle_ref(L["qweight"]))
    assert (buf[:, :2] == 7).all() and (buf[:, 18:] == 7).all()


# ----------------------------------------------------------------- vLLM: AWQ


@given(group=st.sampled_from([32, 64, 128, -1]), groups=st.sampled_from([1, 2]),
       blocks=st.sampled_from([1, 3, 5]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       fp16_scales=st.booleans(), m=st.sampled_from([1, 5]), three_d=st.booleans(),
       strided=st.booleans(), split_k=st.sampled_from([1, 8]), seed=st.integers(0, 2**31))
def test_awq_gemm_and_dequantize_match_reference(group, groups, blocks, dtype, fp16_scales, m,
                                                 three_d, strided, split_k, seed):
    g = _gen(seed)
    k, n = (40 if group == -1 else group * groups), 8 * blocks
    L = make_awq(g, k, n, group)
    sdtype = torch.float16 if fp16_scales else dtype
    scales = L["scales"].to(sdtype)
    w = ops.awq_dequantize(L["qweight"], scales, L["qzeros"], 0, 0, 0)
    assert w.dtype == sdtype and torch.equal(w, L["w"].to(sdtype))
    x = make_x(g, m, k, dtype, three_d, strided)
    y = ops.awq_gemm(x, L["qweight"], scales, L["qzeros"], split_k)
    assert_close(y, ref_mm(x, L["w"]))


def test_awq_dequantize_random_words():
    """vLLM's kernel-test inputs: random words over the whole int32 range."""
    g = _gen(11)
    qweight = torch.randint(-2**31, 2**31 - 1, (256, 12), generator=g, dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (2, 12), generator=g, dtype=torch.int32)
    scales = torch.rand(2, 96, generator=g).half()
    q, z = unpack_n(qweight, 4, ORDER_AWQ), unpack_n(qzeros, 4, ORDER_AWQ)
    ref = ((q - z.repeat_interleave(128, 0)).float() * scales.float().repeat_interleave(128, 0))
    assert torch.equal(ops.awq_dequantize(qweight, scales, qzeros, 0, 0, 0), ref.half())
    assert torch.equal(dequantize_gemm(qweight, qzeros, scales, 4, 128), ref.half())


def test_awq_gemm_runs_int4_matmul():
    g = _gen(2)
    L = make_awq(g, 128, 24, 64)
    x = torch.randn(2, 128, generator=g).bfloat16()
    with mock.patch.object(mk.ops, "int4_matmul", wraps=mk.ops.int4_matmul) as spy:
        y = ops.awq_gemm(x, L["qweight"], L["scales"].bfloat16(), L["qzeros"], 1)
    assert spy.call_count == 1
    assert_close(y, ref_mm(x, L["w"]))


@pytest.mark.parametrize("fn", ["gptq4", "gptq8", "awq"])
def test_triton_kernels_interpreter(fn):
    g = _gen(4)
    x = torch.randn(3, 64, generator=g).half()
    with mk.backend.use_backend("triton"):
        if fn.startswith("gptq"):
            bits = int(fn[-1])
            L = make_gptq(g, 64, 16, 32, bits, True, False)
            y = ops.gptq_gemm(x, L["qweight"], L["qzeros"], L["scales"].half(), L["g_idx"],
                              False, False, bits)
        else:
            L = make_awq(g, 64, 16, 32)
            y = ops.awq_gemm(x, L["qweight"], L["scales"].half(), L["qzeros"], 1)
    assert_close(y, ref_mm(x, L["w"]))


@pytest.mark.parametrize("m", [1, 3, 33])
def test_on_device(device, m):
    """Each entry point on ``device`` (on a GPU: the Triton / CUDA kernels, whose W is
    rounded to x's dtype before the dot product; M <= 16 is their GEMV, 33 their GEMM)."""
    g = _gen(m)
    for bits in (4, 8):
        L = make_gptq(g, 256, 72 if bits == 4 else 36, 64, bits, True, False)
        x = torch.randn(m, 256, generator=g).half()
        ref = ref_mm(x, L["w"])
        perm = torch.argsort(L["g_idx"]).to(torch.int32)
        shuffled = L["qweight"].to(device, copy=True)
        ops.gptq_shuffle(shuffled, perm.to(device), bits)
        for w, idx, ex in ((L["qweight"], L["g_idx"], False), (shuffled, perm, True)):
            y = ops.gptq_gemm(x.to(device), w.to(device), L["qzeros"].to(device),
                              L["scales"].half().to(device), idx.to(device), ex, False, bits)
            assert_close(y.cpu(), ref)
        lin, L = _fake_quantized_linear(g, 256, 40, 128, bits, True, torch.float16, True)
        layer = QuantLinear(bits, 128, 256, 40, True)
        layer.pack(lin, L["scales"].t(), L["zeros"].t(), L["g_idx"])
        layer = layer.to(device)
        x = torch.randn(2, m, 256, generator=g).half()
        assert_close(layer(x.to(device)).cpu(), ref_mm(x, L["w"], lin.bias.detach()))
    A = make_awq(g, 256, 40, 128)
    x = torch.randn(m, 256, generator=g).bfloat16()
    y = ops.awq_gemm(x.to(device), A["qweight"].to(device), A["scales"].bfloat16().to(device),
                     A["qzeros"].to(device), 8)
    assert_close(y.cpu(), ref_mm(x, A["w"]))
    lin = nn.Linear(256, 40).half()
    lin.weight.data = A["w"].t().half()
    layer = WQLinear_GEMM.from_linear(lin, 4, 128, scales=A["scales"], zeros=A["zeros"])
    layer = layer.to(device)
    assert_close(layer(x.to(device)).cpu(), ref_mm(x.half(), A["w"], lin.bias.detach()
                                                  ).bfloat16())


# ----------------------------------------------------------------- AutoGPTQ


def _fake_quantized_linear(g: torch.Generator, k: int, n: int, group: int, bits: int,
                           act_order: bool, dtype: torch.dtype, bias: bool):
    """A linear whose weight lies on a GPTQ grid, plus the grid (AutoGPTQ's pack inputs:
    scales / zeros [N, groups])."""
    L = make_gptq(g, k, n, group, bits, act_order, False)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(L["w"].t().to(dtype))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g).to(dtype))
    return lin, L


@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 128, -1]),
       act_order=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16,
                                                       torch.float32]),
       bias=st.booleans(), three_d=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**31))
def test_quantlinear_pack_round_trip(bits, group, act_order, dtype, bias, three_d, strided,
                                     seed):
    if bits == 8 and dtype == torch.bfloat16:
        dtype = torch.float16     # bf16 cannot hold (q - z) * s of 8-bit values exactly
    g = _gen(seed)
    k, n = (128 if group != 128 else 256), (40 if bits == 4 else 20)
    lin, L = _fake_quantized_linear(g, k, n, group, bits, act_order, dtype, bias)
    layer = QuantLinear(bits, group, k, n, bias)
    groups = L["scales"].shape[0]
    layer.pack(lin, L["scales"].t(), L["zeros"].t(), L["g_idx"] if act_order else None)
    # AutoGPTQ's buffers, shapes and dtypes
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (k * bits // 32, n)
    assert layer.qzeros.dtype == torch.int32 and layer.qzeros.shape == (groups, n * bits // 32)
    assert layer.scales.dtype == dtype and layer.scales.shape == (groups, n)
    assert layer.g_idx.dtype == torch.int32 and torch.equal(layer.g_idx, L["g_idx"])
    assert (layer.bias is not None) == bias
    assert torch.equal(unpack_k(layer.qweight, bits), L["q"])
    assert torch.equal(unpack_n(layer.qzeros, bits), L["zeros"] - 1)    # v1
    # forward against the grid the linear's weight was quantized to (its weight is that
    # grid rounded to the linear's dtype)
    x = make_x(g, 3, k, dtype, three_d, strided)
    b = lin.bias.detach() if bias else None
    assert_close(layer(x), ref_mm(x, L["w"], b))
    if dtype != torch.float32:    # the other activation dtype: exact fallback, x's dtype out
        x32 = x.float()
        assert_close(layer(x32), ref_mm(x32, L["w"], b))
    # state dict round trip into a fresh layer
    fresh = QuantLinear(bits, group, k, n, bias, weight_dtype=dtype)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


def test_quantlinear_autogptq_q4_recipe_and_cache():
    """AutoGPTQ's test_q4 recipe (random qweight assigned, scales + 0.002, qzeros
    incremented in place), against the v1 formula; the cached weight follows the buffers."""
    k = n = 256
    cls = dynamically_import_QuantLinear(use_triton=False, desc_act=False, group_size=128,
                                         bits=4, disable_exllama=True)
    layer = cls(bits=4, group_size=128, infeatures=k, outfeatures=n, bias=False)
    torch.manual_seed(42)
    layer.qweight = torch.randint(-100, 100, size=layer.qweight.shape, dtype=torch.int32)
    layer.scales = layer.scales + 0.002
    layer = autogptq_post_init(layer.eval(), use_act_order=False)
    x = torch.rand(1, 1, k, dtype=torch.float16)

    def ref(stored_zero: int) -> torch.Tensor:
        q = unpack_k(layer.qweight, 4)
        w = (q - (stored_zero + 1)).float() * 0.002
        return ref_mm(x, w, dtype=torch.float16)

    assert_close(layer(x), ref(0))
    layer.qzeros += 0b00010001000100010001000100010001
    assert_close(layer(x), ref(1))
    layer.qweight = torch.randint(-100, 100, size=layer.qweight.shape, dtype=torch.int32)
    assert_close(layer(x), ref(1))


def test_dequantize_weight_repacking_recipe():
    """AutoGPTQ's test_repacking: symmetric grid packed with zeros 8, read back by
    dequantize_weight."""
    g = _gen(8)
    k, n, gs = 256, 64, 128
    q = torch.randint(0, 16, (k, n), generator=g)
    s = _scales(g, (k // gs, n), 4)
    ref = ((q - 8).float() * s.repeat_interleave(gs, 0)).half()
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = ref.t()
    layer = QuantLinear(bits=4, group_size=gs, infeatures=k, outfeatures=n, bias=False)
    layer.pack(lin, s.half().t(), torch.full((k // gs, n), 8, dtype=torch.int32).t(),
               g_idx=None)
    w, zeros = dequantize_weight(layer)
    assert (zeros == 8).all() and zeros.shape == (k, n)
    assert w.dtype == torch.float16 and torch.equal(w, ref.t())
    uq, uz = unpack_4bit_to_32bit_signed(layer.qweight, layer.qzeros)
    assert torch.equal(uq.long(), q) and (uz == 8).all()


def test_quantlinear_partial_last_group():
    """ceil(K / G) groups with a partial last one (AutoGPTQ's buffers allow it)."""
    g = _gen(9)
    k, n, gs = 96, 16, 64
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 17, (2, n), generator=g)
    s = _scales(g, (2, n), 4)
    rows = torch.arange(k) // gs
    w = (q - zeros[rows]).float() * s[rows]
    lin = nn.Linear(k, n, bias=False).half()
    lin.weight.data = w.t().half()
    layer = QuantLinear(4, gs, k, n, False)
    layer.pack(lin, s.t(), zeros.t())
    x = torch.randn(2, k, generator=g).half()
    assert_close(layer(x), ref_mm(x, w))


# ----------------------------------------------------------------- AutoAWQ


@given(group=st.sampled_from([32, 64, -1]), dtype=st.sampled_from(
    [torch.float16, torch.bfloat16, torch.float32]), bias=st.booleans(),
       three_d=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31))
def test_wqlinear_gemm_from_linear_round_trip(group, dtype, bias, three_d, strided, seed):
    g = _gen(seed)
    k, n = 128, 40
    L = make_awq(g, k, n, group)
    lin = nn.Linear(k, n, bias=bias).half()
    with torch.no_grad():
        lin.weight.copy_(L["w"].t().half())
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g).half())
    layer = WQLinear_GEMM.from_linear(lin, 4, group, scales=L["scales"], zeros=L["zeros"])
    groups = L["scales"].shape[0]
    assert layer.qweight.shape == (k, n // 8) and layer.qweight.dtype == torch.int32
    assert layer.qzeros.shape == (groups, n // 8) and layer.qzeros.dtype == torch.int32
    assert layer.scales.shape == (groups, n) and layer.scales.dtype == torch.float16
    assert torch.equal(unpack_n(layer.qweight, 4, ORDER_AWQ), L["q"])
    assert torch.equal(unpack_n(layer.qzeros, 4, ORDER_AWQ), L["zeros"])
    x = make_x(g, 3, k, dtype, three_d, strided)
    # AutoAWQ computes in fp16 and casts back to x's dtype
    ref = ref_mm(x.half(), L["w"], lin.bias.detach() if bias else None).to(dtype)
    assert_close(layer(x), ref, **TOL[torch.float16] if dtype == torch.float32 else {})
    assert torch.equal(layer(x), layer(x.half()).to(dtype))
    empty = WQLinear_GEMM.from_linear(lin, 4, group, init_only=True)
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty(x), layer(x))


def test_awq_packing_utils():
    g = _gen(12)
    k, n, gs = 128, 24, 32
    L = make_awq(g, k, n, gs)
    L["zeros"].clamp_(min=1)        # a zero of 0 has no GPTQ v1 form (AutoAWQ writes -1)
    qzeros = pack_n(L["zeros"], 4, ORDER_AWQ)
    raw_w, raw_z = unpack_awq(L["qweight"], qzeros, 4)
    # AutoAWQ's unpack does not mask: slot i is the int32 word shifted right by 4i
    # (arithmetic: sign bits come in) cut to int8, its low 8 bits
    words = L["qweight"].to(torch.int64)
    for i in range(8):
        low8 = (words >> (4 * i)) & 0xFF
        assert torch.equal(raw_w[:, i::8].long(), torch.where(low8 > 127, low8 - 256, low8))
    iw, iz = reverse_awq_order(raw_w, raw_z, 4)
    assert iw.dtype == torch.int8 and torch.equal((iw & 0xF).long(), L["q"])
    assert torch.equal((iz & 0xF).long(), L["zeros"])
    w = (L["q"] - L["zeros"].repeat_interleave(gs, 0)).float() * \
        L["scales"].repeat_interleave(gs, 0)
    assert torch.equal(dequantize_gemm(L["qweight"], qzeros, L["scales"].half(), 4, gs),
                       w.half())
    qweight, gq_zeros = unpack_reorder_pack(L["qweight"], qzeros, 4)
    assert torch.equal(qweight, pack_k(L["q"], 4))
    assert torch.equal(gq_zeros, pack_n(L["zeros"] - 1, 4))
    x = torch.randn(3, k, generator=g).half()
    y_gptq = ops.gptq_gemm(x, qweight, gq_zeros, L["scales"].half(), EMPTY, False, False, 4)
    y_awq = ops.awq_gemm(x, L["qweight"], L["scales"].half(), qzeros, 1)
    assert torch.equal(y_gptq, y_awq)


# ----------------------------------------------------------------- errors


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_errors_name_the_argument():
    g = _gen(1)
    L = make_gptq(g, 64, 16, 32, 4, False, False)
    x = torch.randn(2, 64, generator=g).half()
    w, z, s = L["qweight"], L["qzeros"], L["scales"].half()
    _raises(ValueError, "bit", ops.gptq_gemm, x, w, z, s, EMPTY, False, False, 3)
    _raises(NotImplementedError, "bit", ops.gptq_gemm, x, w, z, s, EMPTY, False, False, 2)
    _raises(TypeError, "bit", ops.gptq_gemm, x, w, z, s, EMPTY, False, True)
    _raises(TypeError, "use_exllama", ops.gptq_gemm, x, w, z, s, EMPTY, 1, False, 4)
    _raises(ValueError, "^a ", ops.gptq_gemm, x[:, :32], w, z, s, EMPTY, False, False, 4)
    _raises(TypeError, "^a ", ops.gptq_gemm, x.int(), w, z, s, EMPTY, False, False, 4)
    _raises(ValueError, "b_gptq_qzeros", ops.gptq_gemm, x, w, z[:, :1], s, EMPTY, False,
            False, 4)
    _raises(ValueError, "b_gptq_scales", ops.gptq_gemm, x, w, z, s[:, :8], EMPTY, False,
            False, 4)
    _raises(TypeError, "b_q_weight", ops.gptq_gemm, x, w.float(), z, s, EMPTY, False, False,
            4)
    _raises(ValueError, "b_g_idx", ops.gptq_gemm, x, w, z, s, torch.zeros(64, dtype=torch.int32),
            True, False, 4)
    _raises(ValueError, "b_g_idx", ops.gptq_gemm, x, w, z, s, torch.full((64,), 2,
            dtype=torch.int32), False, False, 4)
    _raises(ValueError, "b_g_idx", ops.gptq_gemm, x, w, z, s, L["g_idx"][:32], False, False, 4)
    _raises(ValueError, "q_perm", ops.gptq_shuffle, w.clone(), torch.zeros(64,
            dtype=torch.int32), 4)
    _raises(ValueError, "bit", ops.gptq_shuffle, w.clone(), EMPTY, 3)
    A = make_awq(g, 64, 16, 32)
    aw, az, as_ = A["qweight"], A["qzeros"], A["scales"].half()
    _raises(ValueError, "split_k_iters", ops.awq_gemm, x, aw, as_, az, 0)
    _raises(ValueError, "^qzeros", ops.awq_gemm, x, aw, as_, az[:1], 1)
    _raises(ValueError, "^scales", ops.awq_gemm, x, aw, as_[:, :8], az, 1)
    _raises(ValueError, "^scales", ops.awq_gemm, x, aw, as_.repeat(3, 1)[:3], az, 1)
    _raises(ValueError, "^input", ops.awq_gemm, x[:, :8], aw, as_, az, 1)
    _raises(ValueError, "^zeros", ops.awq_dequantize, aw, as_, az[:1], 0, 0, 0)
    _raises(ValueError, "thx", ops.awq_dequantize, aw, as_, az, 0, -1, 0)
    # AutoGPTQ
    _raises(ValueError, "bits", QuantLinear, 3, 128, 256, 256, False)
    _raises(NotImplementedError, "bits", QuantLinear, 5, 128, 256, 256, False)
    _raises(ValueError, "infeatures", QuantLinear, 4, 128, 36, 256, False)
    _raises(ValueError, "outfeatures", QuantLinear, 4, 128, 256, 12, False)
    _raises(ValueError, "trainable", QuantLinear, 4, 128, 256, 256, False, trainable=True)
    _raises(TypeError, "weight_dtype", QuantLinear, 4, 128, 256, 256, False,
            weight_dtype=torch.int8)
    layer = QuantLinear(4, 32, 64, 16, False)
    lin = nn.Linear(64, 16, bias=False)
    zeros = torch.full((16, 2), 8)
    scales = torch.full((16, 2), 0.01)
    _raises(ValueError, "^linear", layer.pack, lin, scales, zeros)   # not on the grid
    lin.weight.data.zero_()
    _raises(ValueError, "^zeros", layer.pack, lin, scales, torch.zeros(16, 2))   # v1: 0
    _raises(ValueError, "^zeros", layer.pack, lin, scales, torch.full((16, 2), 7.5))
    _raises(ValueError, "^scales", layer.pack, lin, scales.t(), zeros)
    _raises(ValueError, "^g_idx", layer.pack, lin, scales, zeros,
            torch.full((64,), 5, dtype=torch.int32))
    _raises(TypeError, "^linear", layer.pack, object(), scales, zeros)
    _raises(ValueError, "^x", layer, torch.randn(2, 32))
    # AutoAWQ
    _raises(ValueError, "w_bit", WQLinear_GEMM, 8, 128, 256, 256, False, "cpu")
    _raises(NotImplementedError, "w_bit", WQLinear_GEMM, 3, 128, 256, 256, False, "cpu")
    _raises(ValueError, "group_size", WQLinear_GEMM, 4, 96, 256, 256, False, "cpu")
    _raises(ValueError, "out_features", WQLinear_GEMM, 4, 128, 256, 12, False, "cpu")
    lin = nn.Linear(64, 16)
    _raises(ValueError, "scales", WQLinear_GEMM.from_linear, lin, 4, 32)
    _raises(ValueError, "^scales", WQLinear_GEMM.from_linear, lin, 4, 32,
            scales=torch.ones(16, 2), zeros=torch.ones(2, 16))
    _raises(ValueError, "^linear", WQLinear_GEMM.from_linear, lin, 4, 32,
            scales=torch.full((2, 16), 1e-4), zeros=torch.full((2, 16), 8.0))
    _raises(ValueError, "group_size", dequantize_gemm, aw, az, as_, 4, 16)
