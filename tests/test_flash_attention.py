"""flash_attention (varlen / paged prefill): the Triton kernel against the fp32 reference and
torch SDPA, every feature (bottom-right causal, GQA/MQA, window, softcap, LSE, paged prefix,
head dims, dtypes), rows that see no key, input validation, opcheck, and sm_90a wgmma.

Without a GPU the kernel runs under the Triton interpreter with 16x16 tiles (plus other tile
shapes patched in), so sequences of a few dozen tokens already cross many tiles.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import examples, assert_close, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels import _validation
from minikernels.ops import reference
from minikernels.ops.triton import flash_attn as fa


# ------------------------------------------------------------------------------ helpers


def cu(lens: list[int], device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def make_batch(lens_q, lens_k, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype).to(device)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype).to(device)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype).to(device)
    return q, k, v, cu(lens_q, device), cu(lens_k, device)


def to_paged(k, v, lens_k, block_size, seed=0, spare_blocks=3):
    """Scatter each sequence's keys into shuffled cache blocks; NaN everywhere unused (a
    kernel that reads an unused slot or block then produces NaN)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [max(1, math.ceil(n / block_size)) for n in lens_k]
    num_blocks = sum(per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    hkv, d = k.shape[1], k.shape[2]
    kc = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=k.dtype,
                    device=k.device)
    vc = torch.full_like(kc, float("nan"))
    table = torch.full((len(lens_k), max(per_seq) + 1), 0, dtype=torch.int32)
    start = 0
    for b, n in enumerate(lens_k):
        blocks = [perm.pop() for _ in range(per_seq[b])]
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for t in range(n):
            kc[blocks[t // block_size], t % block_size] = k[start + t]
            vc[blocks[t // block_size], t % block_size] = v[start + t]
        start += n
    return kc, vc, table.to(k.device)


def expected(q, k, v, cu_q, cu_k, causal=True, scale=None, window_left=-1, softcap=0.0,
             window_right=-1, alibi_slopes=None, sinks=None):
    """fp32 reference on the same (rounded) inputs -> (out in q.dtype, lse)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = reference.flash_attention(q.float(), k.float(), v.float(), cu_q, cu_k, 0, 0,
                                         causal, scale, window_left, softcap, None,
                                         window_right, alibi_slopes=alibi_slopes,
                                         sinks=sinks)
    return out.to(q.dtype), lse


def run_triton(*args, **kwargs):
    with mk.use_backend("triton"):
        return mk.ops.flash_attention(*args, return_lse=True, **kwargs)


def check(out, lse, ref_out, ref_lse, scale=2.0):
    assert_close(out, ref_out, scale=scale)
    assert not torch.isnan(lse).any(), "NaN in LSE (unwritten element?)"
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


@contextlib.contextmanager
def tiles(block_m: int, block_n: int):
    """Interpreter tile shape (the GPU path keeps its per-arch tables)."""
    with mock.patch.object(fa, "INTERPRETER_CONFIG", fa.FlashConfig(block_m, block_n, 4, 1)):
        yield


@contextlib.contextmanager
def no_index_checks():
    with _validation.index_checks(False):
        yield


# ------------------------------------------------------------------- random varlen batches

LENGTHS = st.sampled_from([0, 1, 2, 3, 5, 16, 17, 31, 32, 33, 47, 64])  # primes, tile +-1


@st.composite
def varlen_case(draw):
    causal = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    lens_k, lens_q = [], []
    for _ in range(batch):
        lk = draw(LENGTHS)
        lq = draw(LENGTHS)  # causal with Lq > Lk too (FlashAttention >= 2.1)
        lens_k.append(lk)
        lens_q.append(lq)
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1), (3, 1)]))
    return dict(
        lens_q=lens_q, lens_k=lens_k, hq=hq, hkv=hkv, causal=causal,
        d=draw(st.sampled_from([16, 32, 64, 40, 59, 3])),   # any d <= 256, as FlashAttention
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        window_left=draw(st.sampled_from([-1, -1, 0, 6, 19])),
        window_right=draw(st.sampled_from([-1, -1, 0, 3, 20])),
        softcap=draw(st.sampled_from([0.0, 0.0, 2.5])),
        paged=draw(st.sampled_from([0, 0, 1, 5, 8, 12, 16, 32])),
        tile=draw(st.sampled_from([(16, 16), (32, 16), (16, 32)])),
        alibi=draw(st.sampled_from([None, None, "head", "batch_head"])),
        sinks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)))


def sink_logits(hq, device, seed=0):
    """Per-head attention-sink logits [Hq], a strided view (every other element)."""
    g = torch.Generator().manual_seed(seed + 7)
    return (torch.randn(2 * hq, generator=g) * 2).to(device)[::2]


def alibi_slopes(kind, batch, hq, device, seed=0):
    """None, [Hq] or [B, Hq] fp32 slopes (the [B, Hq] one a strided view: own row stride)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "head":
        return torch.rand(hq, generator=g).to(device)
    return torch.rand(batch, hq + 3, generator=g).to(device)[:, 1:hq + 1]


@settings(max_examples=examples(24))
@given(case=varlen_case())
def test_random_varlen_matches_reference(device, case):
    c = case
    q, k, v, cu_q, cu_k = make_batch(c["lens_q"], c["lens_k"], c["hq"], c["hkv"], c["d"],
                                     c["dtype"], device, c["seed"])
    slopes = alibi_slopes(c["alibi"], len(c["lens_q"]), c["hq"], device, c["seed"])
    sinks = sink_logits(c["hq"], device, c["seed"]) if c["sinks"] else None
    ref_out, ref_lse = expected(q, k, v, cu_q, cu_k, c["causal"], None, c["window_left"],
                                c["softcap"], c["window_right"], slopes, sinks)
    kw = dict(causal=c["causal"], window_left=c["window_left"], softcap=c["softcap"],
              window_right=c["window_right"], alibi_slopes=slopes, sinks=sinks)
    kk, vv, table = k, v, None
    if c["paged"]:
        kk, vv, table = to_paged(k, v, c["lens_k"], c["paged"], c["seed"])
    with tiles(*c["tile"]):
        out, lse = run_triton(q, kk, vv, cu_q, cu_k, max(c["lens_q"]), max(c["lens_k"]),
                              block_table=table, **kw)
    check(out, lse, ref_out, ref_lse)


# ------------------------------------------------------------------------ each feature


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dims(device, d, dtype):
    lens_q, lens_k = [1, 19], [13, 37]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 4, 2, d, dtype, device, seed=d)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 19, 37)
    check(out, lse, *expected(q, k, v, cu_q, cu_k))


@pytest.mark.parametrize("d", [8, 24])
def test_small_unpadded_head_dims(device, d):
    q, k, v, cu_q, cu_k = make_batch([7, 23], [7, 29], 2, 1, d, torch.float16, device)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 23, 29)
    check(out, lse, *expected(q, k, v, cu_q, cu_k))


# FlashAttention's own test dims that are not multiples of 8 (it pads them), and the ends.
@pytest.mark.parametrize("d,dtype", [(1, torch.float16), (3, torch.bfloat16),
                                     (59, torch.float16), (111, torch.bfloat16),
                                     (160, torch.float16), (224, torch.bfloat16),
                                     (300, torch.bfloat16)])
def test_any_head_dim(device, d, dtype):
    """Rows of an odd head dim are not 16-byte aligned: the kernel runs without vector
    hints (varlen, a paged prefix, and strided views of a fused qkv)."""
    lens_q, lens_k = [1, 19], [13, 37]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 4, 2, d, dtype, device, seed=d)
    ref_out, ref_lse = expected(q, k, v, cu_q, cu_k, window_left=9)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 19, 37, window_left=9)
    check(out, lse, ref_out, ref_lse)
    kc, vc, table = to_paged(k, v, lens_k, 5, seed=d)
    out, lse = run_triton(q, kc, vc, cu_q, cu_k, 19, 37, window_left=9, block_table=table)
    check(out, lse, ref_out, ref_lse)
    # q / k / v as views of one fused [tokens, heads, 3d] tensor (odd strides everywhere)
    qkv = torch.randn(20, 6, 3 * d, device=device).to(dtype)
    qv, kv, vv = qkv[:, :4, :d], qkv[:, 4:, d:2 * d], qkv[:, 4:, 2 * d:]
    c20 = cu([20], device)
    out, lse = run_triton(qv, kv, vv, c20, c20, 20, 20)
    check(out, lse, *expected(qv.contiguous(), kv.contiguous(), vv.contiguous(), c20, c20))


@pytest.mark.parametrize("d", [512, 320])
def test_wide_head_dims_every_feature(device, d):
    """Head dims in (256, 512] (Gemma 4's full-attention layers: 512; 320 pads to BLOCK_D
    512 with masked columns): a paged prefix with window + softcap + ALiBi + sinks, two-sided
    local attention without causal, and the padded-batch form, against the reference."""
    lens_q, lens_k = [3, 17], [21, 17]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 4, 2, d, torch.bfloat16, device, seed=d)
    kc, vc, table = to_paged(k, v, lens_k, 16, seed=d)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    sinks = torch.tensor([0.5, -1.0, 1.5, 0.0], device=device)
    kw = dict(window_left=9, softcap=20.0, alibi_slopes=slopes, sinks=sinks)
    out, lse = run_triton(q, kc, vc, cu_q, cu_k, 17, 21, block_table=table, **kw)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, True, None, 9, 20.0, alibi_slopes=slopes,
                              sinks=sinks))
    out, lse = run_triton(q, k, v, cu_q, cu_k, 17, 21, causal=False, window_left=4,
                          window_right=3)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, False, window_left=4, window_right=3))
    qb, kb = q[:12].view(2, 6, 4, d), k[:16].view(2, 8, 2, d)
    vb = v[:16].view(2, 8, 2, d)
    with mk.use_backend("triton"):
        out = mk.ops.flash_attention_bshd(qb, kb, vb, causal=True)
    ref, _ = expected(qb.reshape(12, 4, d), kb.reshape(16, 2, d), vb.reshape(16, 2, d),
                      cu([6, 6], device), cu([8, 8], device))
    assert_close(out.reshape(12, 4, d), ref, scale=2.0)


def test_head_dim_513_is_refused_by_name(device):
    q = torch.zeros(4, 2, 513, dtype=torch.float16, device=device)
    c = cu([4], device)
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 512\].*got 513"):
        mk.ops.flash_attention(q, q, q, c, c, 4, 4)
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 512\].*got 513"):
        mk.ops.flash_attention_bshd(q[None], q[None], q[None])


@pytest.mark.parametrize("hq,hkv", [(8, 1), (8, 2), (6, 6)], ids=["mqa", "gqa4", "mha"])
def test_gqa_matches_sdpa(device, hq, hkv):
    """Independent check: torch SDPA (enable_gqa) with a bottom-right causal mask, fp32."""
    lens_q, lens_k = [1, 11, 29], [5, 11, 53]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, hq, hkv, 64, torch.bfloat16, device)
    out = run_triton(q, k, v, cu_q, cu_k, 29, 53)[0]
    for b in range(3):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        lq, lk = lens_q[b], lens_k[b]
        mask = (torch.arange(lk, device=device)[None, :]
                <= torch.arange(lq, device=device)[:, None] + (lk - lq))
        ref = F.scaled_dot_product_attention(
            q[qs].float().transpose(0, 1)[None], k[ks].float().transpose(0, 1)[None],
            v[ks].float().transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        assert_close(out[qs], ref[0].transpose(0, 1).to(q.dtype), scale=2.0)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_matches_flash_attn_bias(device, causal):
    """ALiBi against an independent formula: FlashAttention's test reference adds the bias
    -slope * |i + Sk - Sq - j| to the scaled scores (here SDPA with that float mask), per
    head ([Hq]) and per sequence and head ([B, Hq]); Sq < Sk as in chunked prefill."""
    b, sq, sk, hq, hkv, d = 2, 21, 45, 4, 2, 32
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, sq, hq, d, generator=g).half().to(device)
    k = torch.randn(b, sk, hkv, d, generator=g).half().to(device)
    v = torch.randn(b, sk, hkv, d, generator=g).half().to(device)
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    dist = (i + sk - sq - j).abs().float().to(device)               # [Sq, Sk]
    for slopes in (torch.rand(hq, generator=g).to(device),
                   torch.rand(b, hq, generator=g).to(device)):
        sl = slopes.expand(b, hq) if slopes.ndim == 1 else slopes
        bias = -sl.view(b, hq, 1, 1) * dist                           # [B, Hq, Sq, Sk]
        if causal:
            bias = bias.masked_fill(j.to(device) > i.to(device) + sk - sq, float("-inf"))
        ref = F.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
            attn_mask=bias, enable_gqa=True).transpose(1, 2)
        with mk.use_backend("triton"):
            out = mk.ops.flash_attention_bshd(q, k, v, causal=causal, alibi_slopes=slopes)
        assert_close(out, ref.half(), scale=2.0)


@pytest.mark.parametrize("causal", [True, False])
def test_bshd_matches_sdpa(device, causal):
    b, s, hq, hkv, d = 2, 37, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, s, hq, d, generator=g).half().to(device)
    k = torch.randn(b, s, hkv, d, generator=g).half().to(device)
    v = torch.randn(b, s, hkv, d, generator=g).half().to(device)
    with mk.use_backend("triton"):
        out, lse = mk.ops.flash_attention_bshd(q, k, v, causal=causal, return_lse=True)
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), is_causal=causal,
                                         enable_gqa=True).transpose(1, 2)
    assert out.shape == (b, s, hq, d) and lse.shape == (b, hq, s)
    assert_close(out, ref.half(), scale=2.0)
    qv, kv, vv = (t.reshape(-1, t.shape[2], d) for t in (q, k, v))
    ref_lse = expected(qv, kv, vv, cu([s] * b, device), cu([s] * b, device), causal)[1]
    torch.testing.assert_close(lse, ref_lse.view(hq, b, s).transpose(0, 1), atol=2e-3,
                               rtol=1e-3)


@pytest.mark.parametrize("window_left", [0, 1, 15, 16, 40])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(device, window_left, causal):
    lens_q, lens_k = [33, 64], ([50, 70] if causal else [21, 70])
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 2, 1, 32, torch.float16, device)
    with tiles(32, 16):
        out, lse = run_triton(q, k, v, cu_q, cu_k, 64, 70, causal=causal,
                              window_left=window_left)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, causal, None, window_left))


@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_softcap_and_scale(device, softcap):
    q, k, v, cu_q, cu_k = make_batch([17, 40], [29, 40], 4, 2, 64, torch.bfloat16, device)
    q = q * 4  # large scores: the cap matters
    out, lse = run_triton(q, k, v, cu_q, cu_k, 40, 40, softmax_scale=0.3, softcap=softcap)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, True, 0.3, -1, softcap))


def test_fp32(device):
    q, k, v, cu_q, cu_k = make_batch([5, 31], [9, 31], 4, 1, 64, torch.float32, device)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 31, 31, window_left=7, softcap=5.0)
    ref_out, ref_lse = expected(q, k, v, cu_q, cu_k, True, None, 7, 5.0)
    assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_paged_prefix_chunked_prefill(device, block_size):
    """Prefill of new tokens over a cached prefix: the cache holds prefix + new tokens (the
    engine writes new K/V first); paged result == contiguous result == reference."""
    prefix, new = [0, 21, 40, 3], [9, 14, 1, 30]
    lens_k = [p + n for p, n in zip(prefix, new)]
    q, k, v, cu_q, cu_k = make_batch(new, lens_k, 4, 2, 64, torch.bfloat16, device, seed=5)
    kc, vc, table = to_paged(k, v, lens_k, block_size, seed=block_size)
    with tiles(16, 32):
        out_p, lse_p = run_triton(q, kc, vc, cu_q, cu_k, 30, 61, block_table=table)
        out_c, lse_c = run_triton(q, k, v, cu_q, cu_k, 30, 61)
    check(out_p, lse_p, *expected(q, k, v, cu_q, cu_k))
    torch.testing.assert_close(out_p, out_c, atol=0, rtol=0)
    torch.testing.assert_close(lse_p, lse_c, atol=0, rtol=0)


def test_paged_window_softcap(device):
    lens_q, lens_k = [4, 25], [50, 25]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 2, 2, 32, torch.float16, device, seed=9)
    kc, vc, table = to_paged(k, v, lens_k, 8, seed=3)
    out, lse = run_triton(q, kc, vc, cu_q, cu_k, 25, 50, block_table=table, window_left=10,
                          softcap=4.0)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, True, None, 10, 4.0))


def test_strided_and_misaligned_inputs(device):
    """q/k/v as views of one fused qkv projection, and a view at an odd element offset."""
    t, hq, hkv, d = 45, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).half().to(device)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    cu_q = cu_k = cu([20, 25], device)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 25, 25)
    check(out, lse, *expected(q, k, v, cu_q, cu_k))
    flat = torch.randn(t * hq * d + 1, generator=g).half().to(device)
    q_odd = flat[1:].view(t, hq, d)  # data_ptr 2 bytes off alignment
    out2, lse2 = run_triton(q_odd, k, v, cu_q, cu_k, 25, 25)
    check(out2, lse2, *expected(q_odd, k, v, cu_q, cu_k))


def test_vector_hints_only_on_aligned_rows():
    """ALIGNED (16-byte vector hints) is on exactly when every row the kernel reads or
    writes is aligned: an unaligned varlen view is copied (so it is on), an unaligned paged
    cache is never copied (a whole pool: off), an odd head dim cannot be aligned (off)."""
    def shifted(t):   # the same values in a view 1 element off 16-byte alignment
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        return flat[1:].view(t.shape).copy_(t)
    lens = [7, 12]
    for d, paged, odd, want in [(32, False, False, True), (32, False, True, True),
                                (32, True, False, True), (32, True, True, False),
                                (59, False, False, False), (59, True, False, False)]:
        q, k, v, cu_q, cu_k = make_batch(lens, lens, 2, 1, d, torch.float16, "cpu")
        ref_out, ref_lse = expected(q, k, v, cu_q, cu_k)
        kk, vv, table = k, v, None
        if paged:
            kk, vv, table = to_paged(k, v, lens, 4)
        if odd:
            kk, vv = shifted(kk), shifted(vv)
        with spy_launches(fa, "flash_attn_fwd_kernel", "ALIGNED") as seen:
            out, lse = run_triton(q, kk, vv, cu_q, cu_k, 12, 12, block_table=table)
        assert seen == [want], (d, paged, odd)
        check(out, lse, ref_out, ref_lse)


# ------------------------------------------------------------ rows with no visible key


def test_no_visible_key_rows(device):
    """Lk = 0 (non-causal) and, with index checks off, causal Lq > Lk: out 0, LSE -inf."""
    lens_q, lens_k = [5, 0, 7], [0, 0, 12]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 2, 1, 32, torch.float16, device)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 7, 12, causal=False)
    ref_out, ref_lse = expected(q, k, v, cu_q, cu_k, causal=False)
    check(out, lse, ref_out, ref_lse)
    assert (out[:5] == 0).all() and torch.isneginf(lse[:, :5]).all()

    lens_q, lens_k = [20, 3], [6, 3]  # causal, Lq > Lk: queries 0..13 see nothing
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 2, 1, 32, torch.bfloat16, device)
    out, lse = run_triton(q, k, v, cu_q, cu_k, 20, 6)
    check(out, lse, *expected(q, k, v, cu_q, cu_k))
    assert (out[:14] == 0).all() and torch.isneginf(lse[:, :14]).all()
    assert torch.isfinite(lse[:, 14:]).all()


@pytest.mark.parametrize("paged", [0, 7])
def test_causal_more_queries_than_keys_matches_sdpa(device, paged):
    """FlashAttention >= 2.1: causal aligned bottom-right with Lq > Lk (and Lk = 0); checked
    against an explicit SDPA mask, rows that see nothing give 0 / LSE -inf."""
    lens_q, lens_k = [40, 9, 5], [17, 9, 0]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 4, 2, 32, torch.float16, device, seed=4)
    kk, vv, table = (k, v, None) if not paged else to_paged(k, v, lens_k, paged)
    with tiles(16, 16):
        out, lse = run_triton(q, kk, vv, cu_q, cu_k, 40, 17, block_table=table)
    check(out, lse, *expected(q, k, v, cu_q, cu_k))
    qs, ks = slice(0, 40), slice(0, 17)
    mask = torch.arange(17, device=device)[None, :] <= torch.arange(40, device=device)[:, None] - 23
    ref = F.scaled_dot_product_attention(
        q[qs].float().transpose(0, 1)[None], k[ks].float().transpose(0, 1)[None],
        v[ks].float().transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)[0]
    seen = mask.any(1)
    assert_close(out[qs][seen], ref.transpose(0, 1)[seen].half(), scale=2.0)
    assert (out[qs][~seen] == 0).all() and torch.isneginf(lse[:, qs][:, ~seen]).all()
    assert (out[49:] == 0).all()   # Lk = 0


@pytest.mark.parametrize("window_left,window_right", [(-1, 0), (-1, 5), (3, 3), (0, 0),
                                                      (10, -1), (4, 40)])
def test_two_sided_window_matches_sdpa(device, window_left, window_right):
    """Non-causal local attention, FlashAttention's window_size=(left, right): key j is
    visible to query i (at p = i + Lk - Lq) when p - left <= j <= p + right."""
    lens_q, lens_k = [33, 20], [50, 20]
    q, k, v, cu_q, cu_k = make_batch(lens_q, lens_k, 2, 1, 32, torch.bfloat16, device, seed=8)
    with tiles(16, 16):
        out, lse = run_triton(q, k, v, cu_q, cu_k, 33, 50, causal=False,
                              window_left=window_left, window_right=window_right)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, False, None, window_left, 0.0,
                              window_right))
    for b in range(2):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        lq, lk = lens_q[b], lens_k[b]
        p = torch.arange(lq, device=device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=device)[None, :]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
        if window_left >= 0:
            mask &= j >= p - window_left
        if window_right >= 0:
            mask &= j <= p + window_right
        ref = F.scaled_dot_product_attention(
            q[qs].float().transpose(0, 1)[None], k[ks].float().transpose(0, 1)[None],
            v[ks].float().transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)[0]
        assert_close(out[qs], ref.transpose(0, 1).to(q.dtype), scale=2.0)
    # causal wins over window_right (FlashAttention sets the right window to 0)
    with tiles(16, 16):
        a = run_triton(q, k, v, cu_q, cu_k, 33, 50, causal=True, window_right=7)[0]
        b = run_triton(q, k, v, cu_q, cu_k, 33, 50, causal=True)[0]
    assert torch.equal(a, b)


def test_bshd_window_right(device):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 9, 2, 32, generator=g).half().to(device)
    k = torch.randn(2, 13, 2, 32, generator=g).half().to(device)
    with mk.use_backend("triton"):
        out = mk.ops.flash_attention_bshd(q, k, k, causal=False, window_left=2, window_right=1)
    qv, kv = q.reshape(-1, 2, 32), k.reshape(-1, 2, 32)
    ref = expected(qv, kv, kv, cu([9, 9], device), cu([13, 13], device), False, None, 2, 0.0,
                   1)[0]
    assert_close(out.reshape(-1, 2, 32), ref, scale=2.0)


@pytest.mark.parametrize("block_size", [1, 3, 24, 100, 256])
def test_paged_any_block_size(device, block_size):
    """Block (page) sizes that are not powers of two (FlashInfer / FA3 accept any)."""
    prefix, new = [0, 21, 130], [9, 14, 3]
    lens_k = [p + n for p, n in zip(prefix, new)]
    q, k, v, cu_q, cu_k = make_batch(new, lens_k, 4, 2, 32, torch.float16, device, seed=6)
    kc, vc, table = to_paged(k, v, lens_k, block_size, seed=block_size)
    with tiles(16, 32):
        out, lse = run_triton(q, kc, vc, cu_q, cu_k, 14, 133, block_table=table,
                              window_left=50)
    check(out, lse, *expected(q, k, v, cu_q, cu_k, True, None, 50))


def test_empty_batch(device):
    q = torch.empty(0, 2, 64, dtype=torch.float16, device=device)
    k = v = torch.empty(0, 1, 64, dtype=torch.float16, device=device)
    z = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = run_triton(q, k, v, z, z, 0, 0)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)


# ------------------------------------------------------------------------- validation


def _bad_cases(device):
    q, k, v, cu_q, cu_k = make_batch([4, 6], [4, 6], 4, 2, 64, torch.float16, device)
    kc, vc, table = to_paged(k, v, [4, 6], 8)

    def call(**over):
        a = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6,
                 max_seqlen_k=6)
        a.update(over)
        return lambda: mk.ops.flash_attention(**a)

    return [
        ("cu_q int64", call(cu_seqlens_q=cu_q.long()), TypeError, "cu_seqlens_q"),
        ("cu_k float", call(cu_seqlens_k=cu_k.float()), TypeError, "cu_seqlens_k"),
        ("cu_q not monotone", call(cu_seqlens_q=torch.tensor([0, 7, 10], dtype=torch.int32,
                                                              device=device)[[0, 2, 1]]),
         ValueError, "non-decreasing"),
        ("cu_q[0] != 0", call(cu_seqlens_q=cu_q + 1), ValueError, r"cu_seqlens_q\[0\]"),
        ("cu_q total", call(cu_seqlens_q=cu([4, 5], device)), ValueError, "total_q"),
        ("heads", call(k=k[:, :1].expand(-1, 3, -1).contiguous(),
                       v=v[:, :1].expand(-1, 3, -1).contiguous()), ValueError,
         "multiple of k/v heads"),
        ("head dim 0", call(q=q[..., :0], k=k[..., :0], v=v[..., :0]), ValueError,
         "head dim"),
        ("head dim 513", call(q=torch.zeros(10, 4, 513, dtype=q.dtype, device=device)),
         ValueError, r"head dim must be in \[1, 512\].*got 513"),
        ("k bf16", call(k=k.bfloat16()), TypeError, "k must have dtype"),
        ("v fp32", call(v=v.float()), TypeError, "v must have dtype"),
        ("q int", call(q=q.to(torch.int32)), TypeError, "q must have dtype"),
        ("k/v head dim", call(k=k[..., :32], v=v[..., :32]), ValueError, "head dim"),
        ("max_seqlen_q small", call(max_seqlen_q=5), ValueError, "max_seqlen_q"),
        ("window", call(window_left=-2), ValueError, "window_left"),
        ("window_right", call(window_right=-3), ValueError, "window_right"),
        ("alibi fp16", call(alibi_slopes=torch.rand(4, device=device).half()), TypeError,
         "alibi_slopes"),
        ("alibi list", call(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes"),
        ("alibi shape", call(alibi_slopes=torch.rand(3, device=device)), ValueError,
         r"alibi_slopes must have shape \[4\]"),
        ("alibi batch", call(alibi_slopes=torch.rand(3, 4, device=device)), ValueError,
         "alibi_slopes"),
        ("alibi nan", call(alibi_slopes=torch.full((4,), float("nan"), device=device)),
         ValueError, "alibi_slopes must be finite"),
        ("window_right type", call(window_right=1.5), TypeError, "window_right"),
        ("block_size 300", call(k=torch.zeros(2, 300, 2, 64, dtype=q.dtype, device=device),
                                v=torch.zeros(2, 300, 2, 64, dtype=q.dtype, device=device),
                                block_table=table[:, :1]), ValueError, "block_size"),
        ("k_scale unpaged", call(k_scale=1.0, v_scale=1.0), ValueError, "fp8 paged"),
        ("fp8 unpaged", call(k=k.to(torch.float8_e4m3fn)), TypeError, "k must have dtype"),
        ("fp8 no scale", call(k=kc.to(torch.float8_e4m3fn), v=vc.to(torch.float8_e4m3fn),
                              block_table=table), ValueError, "k_scale is required"),
        ("softcap", call(softcap=-1.0), ValueError, "softcap"),
        ("block_table int64", call(k=kc, v=vc, block_table=table.long()), TypeError,
         "block_table"),
        ("block_table rows", call(k=kc, v=vc, block_table=table[:1]), ValueError,
         "block_table"),
        ("block_table range", call(k=kc, v=vc, block_table=table + 100), ValueError,
         "block_table"),
        ("paged k 3-D", call(block_table=table), ValueError, "k must be 4-D"),
        ("q 2-D", call(q=q[:, 0]), ValueError, "q must be 3-D"),
        ("paged k last dim strided", call(k=kc.transpose(2, 3).contiguous().transpose(2, 3),
                                          v=vc, block_table=table),
         ValueError, "contiguous in its last dim"),
    ]


def test_bad_inputs_raise_clear_errors(device):
    failures = []
    for name, fn, exc, pattern in _bad_cases(device):
        try:
            fn()
            failures.append(f"{name}: no error")
        except exc as e:
            if not re.search(pattern, str(e)):
                failures.append(f"{name}: message {str(e)!r} lacks {pattern!r}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_bshd_validation(device):
    q = torch.zeros(2, 5, 4, 32, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="batch"):
        mk.ops.flash_attention_bshd(q, q[:1], q[:1])
    with pytest.raises(ValueError, match="4-D"):
        mk.ops.flash_attention_bshd(q[0], q[0], q[0])


# ------------------------------------------------------------------ op contract, AOT


def test_opcheck(device):
    q, k, v, cu_q, cu_k = make_batch([3, 18], [5, 18], 4, 2, 32, torch.float16, device)
    kc, vc, table = to_paged(k, v, [5, 18], 8)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    slopes = torch.rand(4, device=device)
    with mk.use_backend("triton"):
        for args in ((q, k, v, cu_q, cu_k, 18, 18, True, 0.2, -1, 0.0, None),
                     (q, kc, vc, cu_q, cu_k, 18, 18, True, 0.2, 4, 3.0, table),
                     (q, k, v, cu_q, cu_k, 18, 18, False, 0.2, -1, 0.0, None, -1, None, None,
                      slopes)):
            torch.library.opcheck(torch.ops.minikernels.flash_attention.default, args)


def test_auto_backend_on_cpu_is_reference():
    q, k, v, cu_q, cu_k = make_batch([3], [3], 1, 1, 16, torch.float32, "cpu")
    with mock.patch.object(fa, "flash_attention", side_effect=AssertionError("triton ran")):
        out = mk.ops.flash_attention(q, k, v, cu_q, cu_k, 3, 3)
    assert_close(out, expected(q, k, v, cu_q, cu_k)[0])


def test_sm90_d128_kernel_is_compiled_ahead_of_time():
    """The d128 tile config the GPU run times is registered for both archs as a tensor-core
    kernel and pinned in the AOT subsets (aot.HOT_PATH_SPECS), so test_aot_compile.py
    compiles it on every run: wgmma on sm_90a, mma.sync on sm_80, no spills."""
    from minikernels.ops.triton.aot import HOT_PATH_SPECS
    from minikernels.ops.triton.registry import all_kernels

    cfg = fa.SM90_CONFIGS[128]
    name = (f"flash_attn[bf16,d128,m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}"
            f"s{cfg.num_stages},causal]")
    assert name in HOT_PATH_SPECS
    spec = next(s for s in all_kernels() if s.name == name)
    assert spec.tensor_core and spec.wgmma_expected and spec.archs == (80, 90)
    assert (spec.num_warps, spec.num_stages) == (cfg.num_warps, cfg.num_stages)


class _Props:
    def __init__(self, smem: int):
        self.shared_memory_per_block_optin = smem


@pytest.mark.parametrize("cap,smem", [((9, 0), 232448), ((8, 0), 166912), ((8, 6), 101376),
                                      ((8, 9), 101376)])
@pytest.mark.parametrize("d", [64, 80, 128, 256, 264, 512])
def test_pick_config_fits_shared_memory(cap, smem, d):
    dev = torch.device("cuda", 0)
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=cap), \
            mock.patch.object(torch.cuda, "get_device_properties", return_value=_Props(smem)):
        for dtype in (torch.bfloat16, torch.float32):
            cfg = fa.pick_config(d, dtype, dev)
            elem = 4 if dtype == torch.float32 else 2
            assert fa._smem_bytes(cfg, fa.block_d(d), elem) <= smem, (cfg, cap, d)
        if cap == (9, 0):
            assert fa.pick_config(d, torch.bfloat16, dev) == fa.SM90_CONFIGS[fa.block_d(d)]
        if cap == (8, 0):
            assert fa.pick_config(d, torch.bfloat16, dev) == fa.SM80_CONFIGS[fa.block_d(d)]
        with mock.patch.dict(os.environ, {"MINIKERNELS_FLASH_CONFIG": "64,32,4,2"}):
            assert fa.pick_config(d, torch.bfloat16, dev) == fa.FlashConfig(64, 32, 4, 2)
        with mock.patch.dict(os.environ, {"MINIKERNELS_FLASH_CONFIG": "64,32"}):
            with pytest.raises(ValueError, match="MINIKERNELS_FLASH_CONFIG"):
                fa.pick_config(d, torch.bfloat16, dev)


# ------------------------------------------------------------------------ attention sinks
def test_sinks_reference_is_a_softmax_with_one_more_logit():
    """The spec: a sink is one more logit in each head's softmax (GPT-OSS's eager
    attention: concatenate it to the scores, softmax, drop it), taking mass but no value."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 2, 8, generator=g) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0])
    out, lse = reference._attend(q, k, v, 0.3, True, -1, 0.0, sinks=sinks)
    s = torch.einsum("qhd,khd->hqk", q, k) * 0.3
    s = s.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    full = torch.cat([s, sinks.view(2, 1, 1).expand(2, 5, 1)], dim=-1)
    p = torch.softmax(full, dim=-1)[..., :-1]
    torch.testing.assert_close(out, torch.einsum("hqk,khd->qhd", p, v))
    torch.testing.assert_close(lse, torch.logsumexp(full, dim=-1))


def test_sinks_bshd_no_key_rows_and_errors(device):
    """bshd takes sinks; a row that sees no key keeps output 0 and its lse is the sink;
    bad sinks are refused naming the argument."""
    q = torch.randn(1, 4, 2, 16, device=device, dtype=torch.float16)
    k = torch.randn(1, 2, 2, 16, device=device, dtype=torch.float16)
    sinks = torch.tensor([1.0, -2.0], device=device)
    with mk.use_backend("triton"):
        out, lse = mk.ops.flash_attention_bshd(q, k, k, causal=True, return_lse=True,
                                               sinks=sinks)
    assert torch.equal(out[0, :2].float(), torch.zeros(2, 2, 16, device=device))
    assert torch.equal(lse[0, :, :2], sinks.view(2, 1).expand(2, 2))
    ref, ref_lse = reference._attend(q[0].float(), k[0].float(), k[0].float(), 0.25, True, -1,
                                     0.0, sinks=sinks)
    assert_close(out[0], ref.to(out.dtype))
    torch.testing.assert_close(lse[0], ref_lse, atol=2e-3, rtol=1e-3)
    for bad, err in ((torch.zeros(3, device=device), ValueError),
                     (torch.zeros(2, dtype=torch.int32, device=device), TypeError),
                     ([0.0, 0.0], TypeError)):
        with pytest.raises(err, match="sinks"):
            mk.ops.flash_attention_bshd(q, k, k, sinks=bad)
