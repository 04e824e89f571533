"""int4 format: packing, RTN quantizer, lossless GPTQ / AWQ import (exact), errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.quant import AWQ_ORDER, Int4Weight, pack_nibbles, unpack_nibbles

HALF = [torch.float16, torch.bfloat16]


def _gptq_pack_qweight(q_kn: torch.Tensor) -> torch.Tensor:
    """Published GPTQ rule, written out word by word: qweight[r, n] |= q[8r + j, n] << 4j."""
    k, n = q_kn.shape
    out = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        out |= q_kn[j::8].to(torch.int64) << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _pack_cols(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """Pack along the last dim: word c slot i = q[..., 8c + order[i]] (GPTQ qzeros, AWQ)."""
    rows, cols = q.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        out |= q[:, col::8].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _expected(q_nk, z_ng, s_ng, g):
    gs = q_nk.shape[1] // z_ng.shape[1]
    return (q_nk.float() - z_ng.float().repeat_interleave(gs, 1)) * \
        s_ng.float().repeat_interleave(gs, 1)


def test_pack_unpack_roundtrip_and_layout():
    q = torch.randint(0, 16, (3, 24), dtype=torch.int32)
    words = pack_nibbles(q)
    assert words.dtype == torch.int32 and words.shape == (3, 3)
    assert torch.equal(unpack_nibbles(words), q)
    # nibble j of word w is column 8w + j (lowest nibble first), including the sign nibble
    q2 = torch.zeros(1, 8, dtype=torch.int32)
    q2[0, 7] = 15
    q2[0, 0] = 1
    assert pack_nibbles(q2).item() == (0xF0000001 - 2**32)
    assert torch.equal(unpack_nibbles(pack_nibbles(q, AWQ_ORDER), AWQ_ORDER), q)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_int4_rtn(dtype, group_size, symmetric):
    torch.manual_seed(0)
    n, k = 24, 256
    w = torch.randn(n, k, dtype=dtype)
    q4 = mk.quant.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    g = k if group_size == -1 else group_size
    assert q4.shape == (n, k) and q4.group_size == group_size
    assert q4.qweight.shape == (n, k // 8) and q4.qweight.dtype == torch.int32
    assert q4.scales.shape == (n, k // g) and q4.scales.dtype == dtype
    assert q4.zeros.dtype == dtype
    if symmetric:
        assert torch.all(q4.zeros == 8)
    else:
        z = q4.zeros.float()
        assert torch.all((z >= 0) & (z <= 15) & (z == z.round()))
    deq = q4.dequantize()
    assert deq.dtype == torch.float32
    assert torch.equal(deq, mk.ops.reference.dequantize_int4(q4.qweight, q4.scales, q4.zeros,
                                                             group_size))
    # RTN: every weight within half a step (+ the zero's rounding for asymmetric)
    step = q4.scales.float().repeat_interleave(g, 1)
    err = (deq - w.float()).abs()
    assert torch.all(err <= step * (0.5 if symmetric else 1.0) + 1e-6)
    assert deq.dtype == torch.float32 and q4.dequantize(dtype).dtype == dtype


def test_quantize_int4_edge_cases():
    w = torch.zeros(8, 32)
    q4 = mk.quant.quantize_int4(w, 32)
    assert torch.all(q4.dequantize() == 0)
    assert q4.scales.dtype == torch.float16          # fp32 weights -> fp16 scales
    w = torch.full((8, 32), 3.0)                      # constant positive group
    assert torch.allclose(mk.quant.quantize_int4(w, 32).dequantize(), w, atol=0.2)


@given(n8=st.integers(1, 4), groups=st.integers(1, 3), g=st.sampled_from([32, 64, 128]),
       fmt=st.sampled_from(["gptq", "gptq_v2"]), dtype=st.sampled_from(HALF),
       act_order=st.booleans())
def test_from_gptq_exact(n8, groups, g, fmt, dtype, act_order):
    n, k = 8 * n8, g * groups
    gen = torch.Generator().manual_seed(n * 1000 + k)
    q_kn = torch.randint(0, 16, (k, n), generator=gen)          # q[k, n]
    lo = 1 if fmt == "gptq" else 0                                # v1 cannot store zero 0
    zeros = torch.randint(lo, 16, (groups, n), generator=gen)     # true zero points
    scales = (torch.rand(groups, n, generator=gen) * 0.1 + 0.01).to(dtype)
    stored = zeros - 1 if fmt == "gptq" else zeros
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    w4 = mk.quant.from_gptq(_gptq_pack_qweight(q_kn), _pack_cols(stored), scales,
                            g_idx.to(torch.int32), checkpoint_format=fmt)
    # expected W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]
    want = (q_kn.float() - zeros.float()[g_idx]) * scales.float()[g_idx]
    assert torch.equal(w4.dequantize(), want.t())
    assert (w4.perm is not None) == (act_order and not torch.equal(g_idx, torch.arange(k) // g))
    assert w4.group_size == (-1 if groups == 1 else g)
    # round trip back to the checkpoint tensors
    back = mk.quant.to_gptq(w4, fmt)
    w4b = mk.quant.from_gptq(back["qweight"], back["qzeros"], back["scales"], back["g_idx"],
                             checkpoint_format=fmt)
    assert torch.equal(w4b.dequantize(), want.t())


def test_from_gptq_v1_zero_offset_and_no_gidx():
    k, n, g = 64, 8, 32
    q = torch.full((k, n), 9)
    stored = torch.full((2, n), 7)                                # v1: zero = 8
    s = torch.full((2, n), 0.5, dtype=torch.float16)
    w4 = mk.quant.from_gptq(_gptq_pack_qweight(q), _pack_cols(stored), s)
    assert torch.all(w4.zeros == 8) and torch.all(w4.dequantize() == 0.5)
    w4v2 = mk.quant.from_gptq(_gptq_pack_qweight(q), _pack_cols(stored), s,
                              checkpoint_format="gptq_v2")
    assert torch.all(w4v2.dequantize() == 1.0)


@given(n8=st.integers(1, 4), groups=st.integers(1, 3), g=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(HALF))
def test_from_awq_exact(n8, groups, g, dtype):
    n, k = 8 * n8, g * groups
    gen = torch.Generator().manual_seed(n * 7 + k)
    q_kn = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.1 + 0.01).to(dtype)
    w4 = mk.quant.from_awq(_pack_cols(q_kn, AWQ_ORDER), _pack_cols(zeros, AWQ_ORDER), scales)
    want = (q_kn.float() - zeros.float().repeat_interleave(g, 0)) * \
        scales.float().repeat_interleave(g, 0)
    assert torch.equal(w4.dequantize(), want.t())
    back = mk.quant.to_awq(w4)
    assert torch.equal(back["qweight"], _pack_cols(q_kn, AWQ_ORDER))
    assert torch.equal(back["qzeros"], _pack_cols(zeros, AWQ_ORDER))


def test_awq_order_is_the_published_one():
    # AutoAWQ packs column 8c + order[i] into nibble i with order 0,2,4,6,1,3,5,7
    q = torch.arange(8).reshape(1, 8)                            # column j holds value j
    word = _pack_cols(q, AWQ_ORDER).item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    w4 = mk.quant.from_awq(torch.tensor([[word - 2**32 if word >= 2**31 else word]] * 32,
                                        dtype=torch.int32),
                           torch.zeros(1, 1, dtype=torch.int32),
                           torch.ones(1, 8, dtype=torch.float16))
    assert torch.equal(w4.dequantize()[:, 0], torch.arange(8).float())


def test_bad_inputs_name_the_argument():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="group_size"):
        mk.quant.quantize_int4(w, group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        mk.quant.quantize_int4(w, group_size=0)
    with pytest.raises(TypeError, match="group_size"):
        mk.quant.quantize_int4(w, group_size=32.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        mk.quant.quantize_int4(torch.randn(8, 12), group_size=-1)
    with pytest.raises(ValueError, match="weight"):
        mk.quant.quantize_int4(torch.randn(8))
    with pytest.raises(TypeError, match="weight"):
        mk.quant.quantize_int4([[1.0]])
    qw = torch.zeros(8, 8, dtype=torch.int32)
    with pytest.raises(TypeError, match="qweight"):
        mk.quant.from_gptq(qw.float(), torch.zeros(2, 1, dtype=torch.int32),
                           torch.ones(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="qzeros"):
        mk.quant.from_gptq(qw, torch.zeros(2, 2, dtype=torch.int32),
                           torch.ones(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="g_idx"):
        mk.quant.from_gptq(qw, torch.zeros(2, 1, dtype=torch.int32),
                           torch.ones(2, 8, dtype=torch.float16),
                           g_idx=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="checkpoint_format"):
        mk.quant.from_gptq(qw, torch.zeros(2, 1, dtype=torch.int32),
                           torch.ones(2, 8, dtype=torch.float16), checkpoint_format="exl2")
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(qw, torch.ones(8, 3, dtype=torch.float16),
                   torch.ones(8, 3, dtype=torch.float16), 32)
