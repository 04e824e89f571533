"""minikernels.compat.flashinfer: FlashInfer's API against plain-PyTorch references here.

Attention is checked against padded fp64 attention written in this file (bottom-right
causal mask, window_left, soft cap, GQA), on the ragged K / V the paged caches were filled
from, so page tables, layouts and cache forms are exercised independently. FlashInfer's
LSE is base 2 (its kernels write m + log2(d) with m in log2 units; cascade.cuh: "Both s_a
and s_b are logsumexp values with base 2"): every LSE is compared with
torch.logsumexp(scores) * log2(e). Tensor arguments are views into larger tensors (their
own strides, offset storage); caches are (k, v) tuples of padded views or one
[P, 2, ...] tensor, NHD and HND.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import examples, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from minikernels import ops as mk_ops
from minikernels.compat import flashinfer as fi

LOG2E = math.log2(math.e)
# (num_qo_heads, num_kv_heads, head_dim): MHA, GQA, MQA, odd head dims
HEADS = [(2, 2, 16), (4, 2, 8), (6, 1, 12), (3, 3, 7), (4, 1, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------- references


def attend_ref(q, k, v, causal=False, window_left=-1, cap=None, scale=None):
    """One request: q [Lq, Hq, D], k / v [Lk, Hkv, D] -> (out fp64 [Lq, Hq, D], natural
    LSE fp64 [Lq, Hq]). Query i sits at i + Lk - Lq; rows that see no key: 0 and -inf."""
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    qpos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    kpos = torch.arange(lk, device=q.device)[None, :]
    seen = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        seen &= kpos <= qpos
    if window_left >= 0:
        seen &= kpos >= qpos - window_left
    s = s.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                          # [H, Lq]
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", w, vv), lse.t()


def padded_view(t):
    """t's values in a view of a larger tensor: every dim but the last padded by 2 and
    offset by 1 (own strides, non-zero storage offset, contiguous last dim)."""
    big = torch.zeros([s + 2 for s in t.shape[:-1]] + [t.shape[-1]], dtype=t.dtype,
                      device=t.device)
    view = big[tuple(slice(1, 1 + s) for s in t.shape[:-1])]
    view.copy_(t)
    return view


def check_attn(out, lse, ref_out, ref_lse, dtype):
    assert_close(out, ref_out.to(dtype), scale=2.0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse, (ref_lse * LOG2E).float(), atol=tol, rtol=1e-3)


def randn(shape, gen, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def make_paged(lens, page_size, hkv, d, dtype, layout, form, device, gen, idx_dtype):
    """Random K / V per request written into shuffled pages of a cache.

    Returns (cache in FlashInfer's form, [K_b], [V_b], indptr, indices, last_page_len);
    unused slots hold random values (a wrong page or length shows).
    """
    npages = [-(-n // page_size) for n in lens]
    num_pages = sum(npages) + 2
    indices = torch.randperm(num_pages, generator=gen)[:sum(npages)]
    indptr = torch.tensor([0, *torch.tensor(npages).cumsum(0).tolist()])
    last = torch.tensor([n - (m - 1) * page_size if m else 0 for n, m in zip(lens, npages)])
    kc = randn((num_pages, page_size, hkv, d), gen, dtype)
    vc = randn((num_pages, page_size, hkv, d), gen, dtype)
    ks = [randn((n, hkv, d), gen, dtype) for n in lens]
    vs = [randn((n, hkv, d), gen, dtype) for n in lens]
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        pages = indices[indptr[b] + pos // page_size]
        kc[pages, pos % page_size] = ks[b]
        vc[pages, pos % page_size] = vs[b]
    if layout == "HND":
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    if form == "tuple":
        cache = (padded_view(kc.to(device)), padded_view(vc.to(device)))
    else:
        big = torch.zeros(num_pages + 1, 2, *kc.shape[1:], dtype=dtype, device=device)
        cache = big[1:]
        cache[:, 0], cache[:, 1] = kc, vc
    ints = [padded_view(t.to(idx_dtype).to(device)) for t in (indptr, indices, last)]
    return (cache, [t.to(device) for t in ks], [t.to(device) for t in vs], *ints)


def workspace(device):
    return torch.empty(1024, dtype=torch.uint8, device=device)


# ------------------------------------------------------------------------- attention


@settings(max_examples=examples(20))
@given(data=st.data())
def test_batch_decode_wrapper(device, data):
    """Page sizes 1 / 3 / 16, lengths 0..40 (last page partly full), GQA / MQA, NHD / HND,
    tuple / single-tensor caches, window, soft cap, scale, dtypes, base-2 LSE."""
    hq, hkv, d = data.draw(st.sampled_from(HEADS))
    page_size = data.draw(st.sampled_from([1, 3, 16]))
    lens = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
    layout = data.draw(st.sampled_from(["NHD", "HND"]))
    form = data.draw(st.sampled_from(["tuple", "single"]))
    dtype = data.draw(st.sampled_from(DTYPES))
    window = data.draw(st.sampled_from([-1, 0, 5]))
    cap = data.draw(st.sampled_from([None, 4.0]))
    scale = data.draw(st.sampled_from([None, 0.3]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    idx_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    cache, ks, vs, indptr, indices, last = make_paged(lens, page_size, hkv, d, dtype, layout,
                                                      form, device, gen, idx_dtype)
    q = padded_view(randn((len(lens), hq, d), gen, dtype, device))
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), layout)
    w.plan(indptr, indices, last, hq, hkv, d, page_size, window_left=window,
           logits_soft_cap=cap, sm_scale=scale, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    assert out.shape == (len(lens), hq, d) and out.dtype == dtype
    refs = [attend_ref(q[b:b + 1], ks[b], vs[b], True, window, cap, scale)
            for b in range(len(lens))]
    check_attn(out, lse, torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs]),
               dtype)
    assert_close(w.run(q, cache), out)                 # return_lse=False: the same output


@settings(max_examples=examples(20))
@given(data=st.data())
def test_batch_prefill_paged_wrapper(device, data):
    hq, hkv, d = data.draw(st.sampled_from(HEADS))
    page_size = data.draw(st.sampled_from([1, 5, 16]))
    lens = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=3))
    qlens = [data.draw(st.integers(0, n)) for n in lens]
    layout = data.draw(st.sampled_from(["NHD", "HND"]))
    form = data.draw(st.sampled_from(["tuple", "single"]))
    dtype = data.draw(st.sampled_from(DTYPES))
    causal = data.draw(st.booleans())
    window = data.draw(st.sampled_from([-1, 0, 4]))
    cap = data.draw(st.sampled_from([None, 3.0]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    cache, ks, vs, indptr, indices, last = make_paged(lens, page_size, hkv, d, dtype, layout,
                                                      form, device, gen, torch.int32)
    qo_indptr = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = padded_view(randn((sum(qlens), hq, d), gen, dtype, device))
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), layout)
    w.plan(qo_indptr.to(device), indptr, indices, last, hq, hkv, d, page_size, causal=causal,
           window_left=window, logits_soft_cap=cap, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    at = qo_indptr.tolist()
    refs = [attend_ref(q[at[b]:at[b + 1]], ks[b], vs[b], causal, window, cap)
            for b in range(len(lens))]
    check_attn(out, lse, torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs]),
               dtype)


@pytest.mark.parametrize("layout,form,page_size", [("NHD", "tuple", 300), ("HND", "tuple", 3),
                                                   ("NHD", "single", 5), ("HND", "single", 4)])
def test_wrappers_on_triton_kernels(device, layout, form, page_size):
    """The views the wrappers hand the kernels (HND transposes, [P, 2, ...] halves, pages
    over 256 split into sub-blocks) run on the Triton kernels too (the interpreter on the
    CPU): decode and paged prefill against the reference."""
    import minikernels as mk

    gen = torch.Generator().manual_seed(11)
    lens = [7, 0, 13]
    cache, ks, vs, indptr, indices, last = make_paged(lens, page_size, 2, 16, torch.float32,
                                                      layout, form, device, gen, torch.int32)
    q = randn((3, 4, 16), gen, torch.float32, device)
    with mk.use_backend("triton"):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), layout)
        w.plan(indptr, indices, last, 4, 2, 16, page_size, q_data_type=torch.float32)
        out, lse = w.run(q, cache, return_lse=True)
        qlens = [2, 0, 3]
        qo = torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=device)
        qp = randn((5, 4, 16), gen, torch.float32, device)
        p = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), layout)
        p.plan(qo, indptr, indices, last, 4, 2, 16, page_size, causal=True,
               q_data_type=torch.float32)
        pout, plse = p.run(qp, cache, return_lse=True)
    refs = [attend_ref(q[b:b + 1], ks[b], vs[b], True) for b in range(3)]
    check_attn(out, lse, torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs]),
               torch.float32)
    at = [0, 2, 2, 5]
    prefs = [attend_ref(qp[at[b]:at[b + 1]], ks[b], vs[b], True) for b in range(3)
             if qlens[b]]
    check_attn(pout, plse, torch.cat([r[0] for r in prefs]),
               torch.cat([r[1] for r in prefs]), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_head_dim_512_wrappers(device, backend):
    """head_dim 512 (Gemma 4's full-attention layers; FlashInfer's fa2 backend takes it
    too): paged decode and prefill wrappers, HND bf16, on both backends."""
    import minikernels as mk

    gen = torch.Generator().manual_seed(12)
    lens, d = [9, 20], 512
    cache, ks, vs, indptr, indices, last = make_paged(lens, 16, 2, d, torch.bfloat16, "HND",
                                                      "single", device, gen, torch.int32)
    q = randn((2, 8, d), gen, torch.bfloat16, device)
    qp = randn((5, 8, d), gen, torch.bfloat16, device)
    qo = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), "HND")
        w.plan(indptr, indices, last, 8, 2, d, 16, q_data_type=torch.bfloat16)
        out, lse = w.run(q, cache, return_lse=True)
        p = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device), "HND")
        p.plan(qo, indptr, indices, last, 8, 2, d, 16, causal=True, logits_soft_cap=30.0,
               q_data_type=torch.bfloat16)
        pout, plse = p.run(qp, cache, return_lse=True)
    refs = [attend_ref(q[b:b + 1], ks[b], vs[b], True) for b in range(2)]
    check_attn(out, lse, torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs]),
               torch.bfloat16)
    prefs = [attend_ref(qp[a:z], ks[b], vs[b], True, cap=30.0)
             for b, (a, z) in enumerate([(0, 2), (2, 5)])]
    check_attn(pout, plse, torch.cat([r[0] for r in prefs]),
               torch.cat([r[1] for r in prefs]), torch.bfloat16)


@settings(max_examples=examples(20))
@given(data=st.data())
def test_batch_prefill_ragged_wrapper(device, data):
    hq, hkv, d = data.draw(st.sampled_from(HEADS))
    lens = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=3))
    qlens = [data.draw(st.integers(0, n)) for n in lens]
    layout = data.draw(st.sampled_from(["NHD", "HND"]))
    dtype = data.draw(st.sampled_from(DTYPES))
    causal = data.draw(st.booleans())
    window = data.draw(st.sampled_from([-1, 2]))
    cap = data.draw(st.sampled_from([None, 3.0]))
    scale = data.draw(st.sampled_from([None, 0.5]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    k = randn((sum(lens), hkv, d), gen, dtype, device)
    v = randn((sum(lens), hkv, d), gen, dtype, device)
    q = padded_view(randn((sum(qlens), hq, d), gen, dtype, device))
    cu_q = [0, *torch.tensor(qlens).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(lens).cumsum(0).tolist()]
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(device), layout)
    w.plan(torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), hq,
           hkv, d, causal=causal, window_left=window, logits_soft_cap=cap, sm_scale=scale,
           q_data_type=dtype)
    kin, vin = ((padded_view(k), padded_view(v)) if layout == "NHD" else
                (padded_view(k.transpose(0, 1).contiguous()),
                 padded_view(v.transpose(0, 1).contiguous())))
    out, lse = w.run(q, kin, vin, return_lse=True)
    refs = [attend_ref(q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]],
                       causal, window, cap, scale) for b in range(len(lens))]
    check_attn(out, lse, torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs]),
               dtype)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 8), (3, 1, 7)])
def test_single_decode(device, layout, dtype, hq, hkv, d):
    gen = torch.Generator().manual_seed(1)
    for kv_len, window, cap in ((1, -1, None), (19, 4, None), (33, -1, 2.5)):
        q = padded_view(randn((hq, d), gen, dtype, device))
        k = randn((kv_len, hkv, d), gen, dtype, device)
        v = randn((kv_len, hkv, d), gen, dtype, device)
        kin, vin = ((k, v) if layout == "NHD" else
                    (padded_view(k.transpose(0, 1).contiguous()),
                     padded_view(v.transpose(0, 1).contiguous())))
        out, lse = fi.single_decode_with_kv_cache(q, kin, vin, kv_layout=layout,
                                                  window_left=window, logits_soft_cap=cap,
                                                  return_lse=True)
        ref_o, ref_l = attend_ref(q[None], k, v, False, window, cap)
        assert out.shape == (hq, d) and lse.shape == (hq,)
        check_attn(out, lse, ref_o[0], ref_l[0], dtype)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [False, True])
def test_single_prefill(device, layout, causal):
    gen = torch.Generator().manual_seed(2)
    for (lq, lk), window, dtype in (((1, 1), -1, torch.float32), ((7, 13), -1, torch.float16),
                                    ((13, 13), 3, torch.bfloat16), ((5, 9), 0, torch.float32)):
        q = padded_view(randn((lq, 4, 8), gen, dtype, device))
        k = randn((lk, 2, 8), gen, dtype, device)
        v = randn((lk, 2, 8), gen, dtype, device)
        kin, vin = (k, v) if layout == "NHD" else (k.transpose(0, 1), v.transpose(0, 1))
        out, lse = fi.single_prefill_with_kv_cache(q, kin, vin, causal=causal,
                                                   kv_layout=layout, window_left=window,
                                                   sm_scale=0.2, return_lse=True)
        check_attn(out, lse, *attend_ref(q, k, v, causal, window, None, 0.2), dtype)
        out2, lse2 = fi.single_prefill_with_kv_cache_return_lse(q, kin, vin, causal=causal,
                                                                kv_layout=layout,
                                                                window_left=window,
                                                                sm_scale=0.2)
        assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_lse_is_base_2(device):
    """FlashInfer's LSE is log2(sum 2^(s log2 e)) = natural LSE * log2(e), not natural."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn(s, gen, device=device) * 3 for s in ((2, 16), (40, 2, 16), (40, 2, 16)))
    _, lse = fi.single_decode_with_kv_cache(q, k, v, return_lse=True)
    scores = torch.einsum("hd,khd->hk", q.double(), k.double()) / 4.0
    base2 = torch.log2(torch.exp2(scores * LOG2E).sum(-1))
    torch.testing.assert_close(lse.double(), base2, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(lse.double(), torch.logsumexp(scores, -1), atol=0.1)


def test_split_keys_merge_to_full_attention(device):
    """Attention over two key halves, merged by merge_state on the returned (base-2) LSEs,
    equals attention over all keys, LSE included: the LSE base is consistent end to end."""
    gen = torch.Generator().manual_seed(4)
    q = randn((6, 4, 8), gen, device=device)
    k, v = randn((21, 2, 8), gen, device=device), randn((21, 2, 8), gen, device=device)
    full_o, full_s = fi.single_prefill_with_kv_cache(q, k, v, return_lse=True)
    a_o, a_s = fi.single_prefill_with_kv_cache(q, k[:8], v[:8], return_lse=True)
    b_o, b_s = fi.single_prefill_with_kv_cache(q, k[8:], v[8:], return_lse=True)
    m_o, m_s = fi.merge_state(a_o, a_s, b_o, b_s)
    assert_close(m_o, full_o)
    torch.testing.assert_close(m_s, full_s, atol=1e-4, rtol=1e-5)
    # merge_state_in_place, with a mask that leaves row 0 alone
    mask = torch.ones(6, dtype=torch.bool, device=device)
    mask[0] = False
    v_, s_ = a_o.clone(), a_s.clone()
    fi.merge_state_in_place(v_, s_, b_o, b_s, mask=mask)
    assert_close(v_[1:], full_o[1:])
    torch.testing.assert_close(s_[1:], full_s[1:], atol=1e-4, rtol=1e-5)
    assert torch.equal(v_[0], a_o[0]) and torch.equal(s_[0], a_s[0])
    # merge_states over three splits
    c = [(0, 5), (5, 13), (13, 21)]
    parts = [fi.single_prefill_with_kv_cache(q, k[i:j], v[i:j], return_lse=True)
             for i, j in c]
    m_o, m_s = fi.merge_states(torch.stack([p[0] for p in parts], 1),
                               torch.stack([p[1] for p in parts], 1))
    assert_close(m_o, full_o)
    torch.testing.assert_close(m_s, full_s, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_state_formula(device, dtype):
    """merge_state against the base-2 formula, including -inf (empty) states."""
    gen = torch.Generator().manual_seed(5)
    va, vb = randn((5, 3, 8), gen, dtype, device), randn((5, 3, 8), gen, dtype, device)
    sa, sb = randn((5, 3), gen, device=device) * 4, randn((5, 3), gen, device=device) * 4
    sa[0, 0] = float("-inf")
    sa[1, 1] = sb[1, 1] = float("-inf")
    v, s = fi.merge_state(padded_view(va), padded_view(sa), vb, sb)
    wa, wb = torch.exp2(sa.double()), torch.exp2(sb.double())
    tot = wa + wb
    ref = ((wa[..., None] * va.double() + wb[..., None] * vb.double())
           / tot.clamp_min(1e-300)[..., None])
    assert_close(v, ref.to(dtype))
    torch.testing.assert_close(s.double(), torch.log2(tot), atol=1e-5, rtol=1e-5)
    sv = torch.stack([sa, sb], 1)
    mv, ms = fi.merge_states(torch.stack([va, vb], 1), sv)
    assert_close(mv, ref.to(dtype))
    torch.testing.assert_close(ms.double(), torch.log2(tot), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_scales_fold_into_scores_and_output(device, layout):
    """q_scale / k_scale multiply sm_scale, v_scale the output (FlashInfer's convention),
    for plain caches; fp8 caches dequantize with the same numbers."""
    gen = torch.Generator().manual_seed(6)
    lens, ps, hq, hkv, d = [9, 4], 4, 4, 2, 8
    cache, ks, vs, indptr, indices, last = make_paged(lens, ps, hkv, d, torch.float32,
                                                      layout, "tuple", device, gen,
                                                      torch.int32)
    q = randn((2, hq, d), gen, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), layout)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")
    out = w.run(q, cache, q_scale=0.5, k_scale=1.5, v_scale=2.0)
    for b in range(2):
        ref, _ = attend_ref(q[b:b + 1], ks[b], vs[b], scale=0.75 / math.sqrt(d))
        assert_close(out[b:b + 1], (2.0 * ref).float())
    # an fp8 cache holding the same numbers: keys are k8 * k_scale, values v8 * v_scale
    for fmt, tol in ((torch.float8_e4m3fn, 0.1), (torch.float8_e5m2, 0.2)):
        k8 = tuple(c.to(fmt) for c in cache)
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32",
               kv_data_type=fmt)
        out8 = w.run(q, k8, q_scale=0.5, k_scale=1.5, v_scale=2.0)
        want8 = torch.cat([2.0 * attend_ref(q[b:b + 1], ks[b].to(fmt).float(),
                                            vs[b].to(fmt).float(),
                                            scale=0.75 / math.sqrt(d))[0] for b in range(2)])
        assert_close(out8, want8.float())       # exactly the fp8 numbers' attention
        assert_close(out8, out, atol=1.5 * tol, rtol=tol)


def test_out_lse_buffers_and_o_data_type(device):
    gen = torch.Generator().manual_seed(7)
    cache, _, _, indptr, indices, last = make_paged([5, 7], 4, 2, 8, torch.float32, "NHD",
                                                    "single", device, gen, torch.int32)
    q = randn((2, 2, 8), gen, device=device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 2, 2, 8, 4, q_data_type=torch.float32,
           o_data_type=torch.float16)
    out_buf = torch.empty(2, 2, 8, dtype=torch.float16, device=device)
    lse_buf = torch.empty(2, 2, device=device)
    out, lse = w.run(q, cache, out=out_buf, lse=lse_buf, return_lse=True)
    assert out is out_buf and lse is lse_buf
    o2, l2 = w.run_return_lse(q, cache)
    assert torch.equal(o2, out) and torch.equal(l2, lse)
    assert torch.equal(w.forward(q, cache), out)


@pytest.mark.parametrize("kind", ["decode", "prefill", "append"])
def test_pages_above_256_tokens(device, kind):
    """page_size 300: split into two 150-token blocks (contiguous NHD tuple cache)."""
    gen = torch.Generator().manual_seed(8)
    lens, ps = [301, 7, 450], 300
    cache, ks, vs, indptr, indices, last = make_paged(lens, ps, 1, 4, torch.float32, "NHD",
                                                      "tuple", device, gen, torch.int32)
    cache = tuple(c.contiguous() for c in cache)
    if kind == "decode":
        w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
        w.plan(indptr, indices, last, 2, 1, 4, ps, q_data_type=torch.float32)
        q = randn((3, 2, 4), gen, device=device)
        out = w.run(q, cache)
        for b in range(3):
            assert_close(out[b:b + 1], attend_ref(q[b:b + 1], ks[b], vs[b])[0].float())
    elif kind == "prefill":
        w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
        qo = torch.tensor([0, 3, 4, 6], dtype=torch.int32, device=device)
        w.plan(qo, indptr, indices, last, 2, 1, 4, ps, causal=True, q_data_type="float32")
        q = randn((6, 2, 4), gen, device=device)
        out = w.run(q, cache)
        at = qo.tolist()
        ref = torch.cat([attend_ref(q[at[b]:at[b + 1]], ks[b], vs[b], True)[0]
                         for b in range(3)])
        assert_close(out, ref.float())
    else:
        empty = tuple(torch.zeros_like(c) for c in cache)
        seq = fi.get_seq_lens(indptr, last, ps)
        nnz = sum(lens)
        append_indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],
                                     dtype=torch.int32, device=device)
        bi, pos = fi.get_batch_indices_positions(append_indptr, seq, nnz)
        fi.append_paged_kv_cache(torch.cat(ks), torch.cat(vs), bi, pos, empty, indices,
                                 indptr, last)
        for b in range(3):
            p = torch.arange(lens[b], device=device)
            pages = indices[indptr[b] + p // ps].long()
            assert torch.equal(empty[0][pages, p % ps], ks[b])
            assert torch.equal(empty[1][pages, p % ps], vs[b])


@pytest.mark.parametrize("layout,form", [("HND", "tuple"), ("NHD", "single")])
def test_pages_above_256_tokens_not_back_to_back(device, layout, form):
    """A page of 300 tokens whose sub-blocks are not evenly spaced in memory (HND with 2
    heads, or the k half of a [P, 2, ...] tensor): attention reads a contiguous copy (the
    reference's result); an append, which must write in place, is refused naming
    page_size."""
    gen = torch.Generator().manual_seed(16)
    cache, ks, vs, indptr, indices, last = make_paged([301], 300, 2, 4, torch.float32,
                                                      layout, form, device, gen, torch.int32)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), layout)
    w.plan(indptr, indices, last, 2, 2, 4, 300, q_data_type=torch.float32)
    q = randn((1, 2, 4), gen, device=device)
    out, lse = w.run(q, cache, return_lse=True)
    ref = attend_ref(q, ks[0], vs[0], True)
    check_attn(out, lse, ref[0], ref[1], torch.float32)
    kv = randn((1, 2, 4), gen, device=device)
    with pytest.raises(ValueError, match="page_size"):
        fi.append_paged_kv_cache(kv, kv, torch.zeros(1, dtype=torch.int32, device=device),
                                 torch.zeros(1, dtype=torch.int32, device=device), cache,
                                 indices, indptr, last, kv_layout=layout)


def test_get_batch_indices_positions_flashinfer_example(device):
    """The example of FlashInfer's docstring."""
    indptr = torch.tensor([0, 1, 3, 6, 10], dtype=torch.int32, device=device)
    bi, pos = fi.get_batch_indices_positions(indptr, torch.tensor([5, 5, 5, 5]), 10)
    assert bi.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3] and bi.dtype == torch.int32
    assert pos.tolist() == [4, 3, 4, 2, 3, 4, 1, 2, 3, 4] and pos.dtype == torch.int32
    assert fi.page.get_seq_lens is fi.get_seq_lens


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["tuple", "single"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_append_then_decode(device, layout, form, dtype):
    """append_paged_kv_cache writes each token at its page slot (page_size 5, partly full
    last pages, appends at the end of existing tokens); the decode wrapper then reads them."""
    gen = torch.Generator().manual_seed(9)
    lens, ps, hkv, d = [6, 1, 12], 5, 2, 8
    cache, ks, vs, indptr, indices, last = make_paged(lens, ps, hkv, d, dtype, layout, form,
                                                      device, gen, torch.int32)
    new = [2, 1, 3]                       # the last tokens of each request get rewritten
    nk = [randn((n, hkv, d), gen, dtype, device) for n in new]
    nv = [randn((n, hkv, d), gen, dtype, device) for n in new]
    append_indptr = torch.tensor([0, 2, 3, 6], dtype=torch.int32, device=device)
    bi, pos = fi.get_batch_indices_positions(append_indptr, fi.get_seq_lens(indptr, last, ps),
                                             6)
    fi.append_paged_kv_cache(padded_view(torch.cat(nk)), torch.cat(nv), bi, pos, cache,
                             indices, indptr, last, kv_layout=layout)
    for b, n in enumerate(new):
        ks[b][-n:], vs[b][-n:] = nk[b], nv[b]
    q = randn((3, 4, d), gen, dtype, device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device), layout)
    w.plan(indptr, indices, last, 4, hkv, d, ps, q_data_type=dtype)
    out = w.run(q, cache)
    ref = torch.cat([attend_ref(q[b:b + 1], ks[b], vs[b])[0] for b in range(3)])
    assert_close(out, ref.to(dtype), scale=2.0)


# ------------------------------------------------------------------ norms, activations


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(device, dtype):
    """FlashInfer's layernorm(input, gemma, beta, eps) against an fp64 LayerNorm, with
    fp32 scale / shift (FlashInfer's) and a strided input view."""
    gen = torch.Generator().manual_seed(12)
    for shape in ((1, 1), (5, 33), (3, 2, 16)):
        x = padded_view(randn(shape, gen, dtype, device)) + 2.0
        g = randn(shape[-1:], gen, torch.float32, device)
        b = randn(shape[-1:], gen, torch.float32, device)
        xf = x.double()
        mean = xf.mean(-1, keepdim=True)
        ref = (xf - mean) / torch.sqrt((xf - mean).pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = ref * g.double() + b.double()
        out = fi.layernorm(x, g, b)
        assert out.dtype == dtype
        assert_close(out, ref.to(dtype))
        assert fi.norm.layernorm is fi.layernorm
    with pytest.raises(ValueError, match="beta"):
        fi.layernorm(x, g, b[:3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rmsnorm(device, dtype, gemma):
    gen = torch.Generator().manual_seed(10)
    for shape in ((1, 1), (5, 33), (3, 2, 16)):
        x = padded_view(randn(shape, gen, dtype, device))
        w = randn(shape[-1:], gen, dtype, device)
        xf = x.double()
        ref = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (
            w.double() + (1.0 if gemma else 0.0))
        fn = fi.gemma_rmsnorm if gemma else fi.rmsnorm
        assert_close(fn(x, w), ref.to(dtype))
        out = torch.empty(shape, dtype=dtype, device=device)
        assert fn(x, w, 1e-6, out=out) is out
        assert_close(out, ref.to(dtype))
        # fused add, in place: residual += input; input = rmsnorm(residual)
        res = padded_view(randn(shape, gen, dtype, device))
        s = (x.float() + res.float()).to(dtype)
        sf = s.double()
        ref2 = sf / torch.sqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5) * (
            w.double() + (1.0 if gemma else 0.0))
        fused = fi.gemma_fused_add_rmsnorm if gemma else fi.fused_add_rmsnorm
        assert fused(x, res, w, eps=1e-5) is None
        assert torch.equal(res, s)
        assert_close(x, ref2.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations(device, dtype):
    gen = torch.Generator().manual_seed(11)
    x = padded_view(randn((3, 2, 22), gen, dtype, device))
    g, u = x.double()[..., :11], x.double()[..., 11:]
    for fn, act in ((fi.silu_and_mul, F.silu), (fi.gelu_and_mul, F.gelu),
                    (fi.gelu_tanh_and_mul, lambda t: F.gelu(t, approximate="tanh"))):
        ref = (act(g) * u).to(dtype)
        assert_close(fn(x), ref)
        out = torch.empty(3, 2, 11, dtype=dtype, device=device)
        assert fn(x, out=out) is out
        assert_close(out, ref)
    assert fi.activation.silu_and_mul is fi.silu_and_mul


# -------------------------------------------------------------------------------- rope


def rope_ref(x, pos, rot, interleave, freq):
    """x [n, h, d] rotated in fp64: angle = pos * freq[i] for pair i."""
    ang = pos.double()[:, None] * freq.double().to(x.device)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    out = x.double().clone()
    i1, i2 = ((slice(0, rot, 2), slice(1, rot, 2)) if interleave
              else (slice(0, rot // 2), slice(rot // 2, rot)))
    x1, x2 = out[..., i1].clone(), out[..., i2].clone()
    out[..., i1] = x1 * cos - x2 * sin
    out[..., i2] = x2 * cos + x1 * sin
    return out


def llama31_freq(rot, scale, theta, low, high, old):
    """Llama 3.1 scaling, transformers' piecewise form (independent of the clamp form)."""
    freq = theta ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    out = []
    for f in freq.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / scale)
        else:
            sm = (old / wavelen - low) / (high - low)
            out.append((1 - sm) * f / scale + sm * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rot", [None, 4])
def test_apply_rope(device, interleave, rot):
    gen = torch.Generator().manual_seed(12)
    q = padded_view(randn((7, 3, 8), gen, device=device))
    k = randn((7, 1, 8), gen, device=device)
    pos = torch.tensor([0, 5, 2, 99, 1, 3, 4], device=device)
    r = 8 if rot is None else rot
    freq = 1e4 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r) / 2.0
    qr, kr = fi.apply_rope_pos_ids(q, k, pos, rotary_dim=rot, interleave=interleave,
                                   rope_scale=2.0)
    assert_close(qr, rope_ref(q, pos, r, interleave, freq).float())
    assert_close(kr, rope_ref(k, pos, r, interleave, freq).float())
    # ragged form: segments [0, 3) and [3, 7) at offsets 10 and 0
    indptr = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    offsets = torch.tensor([10, 0], dtype=torch.int32, device=device)
    seg = torch.tensor([10, 11, 12, 0, 1, 2, 3], device=device)
    qa, ka = fi.apply_rope(q, k, indptr, offsets, rotary_dim=rot, interleave=interleave,
                           rope_scale=2.0)
    assert_close(qa, rope_ref(q, seg, r, interleave, freq).float())
    q2, k2 = q.clone(), k.clone()
    fi.apply_rope_inplace(q2, k2, indptr, offsets, rot, interleave, 2.0)
    assert torch.equal(q2, qa) and torch.equal(k2, ka)
    # Llama 3.1 (FlashInfer's defaults)
    lf = llama31_freq(r, 8.0, 5e5, 1.0, 4.0, 8192.0)
    big = torch.tensor([0, 9000, 40000, 7, 20000, 5, 6], device=device)
    ql, kl = fi.apply_llama31_rope_pos_ids(q, k, big, rotary_dim=rot, interleave=interleave)
    assert_close(ql, rope_ref(q, big, r, interleave, lf).float(), atol=2e-3)
    assert_close(kl, rope_ref(k, big, r, interleave, lf).float(), atol=2e-3)
    q3, k3 = q.clone(), k.clone()
    fi.apply_llama31_rope_inplace(q3, k3, indptr, offsets, rot, interleave)
    assert_close(q3, rope_ref(q, seg, r, interleave, lf).float())
    fi.apply_rope_pos_ids_inplace(q, k, pos, rot, interleave, 2.0)
    assert torch.equal(q, qr) and torch.equal(k, kr)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_with_cos_sin_cache(device, is_neox, dtype):
    gen = torch.Generator().manual_seed(13)
    head, rot, nnz = 8, 6, 5
    freq = 1e4 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(32, dtype=torch.float64)[:, None] * freq
    cache = torch.cat([ang.cos(), ang.sin()], -1).float().to(device)
    pos = torch.tensor([3, 0, 31, 7, 7], device=device)
    query = padded_view(randn((nnz, 3 * head), gen, dtype, device))
    key = randn((nnz, 1 * head), gen, dtype, device)
    qo, ko = fi.apply_rope_with_cos_sin_cache(pos, query, key, head, cache, is_neox)
    assert qo.shape == query.shape and ko.shape == key.shape
    ref_q = rope_ref(query.view(nnz, 3, head), pos, rot, not is_neox, freq).view(nnz, -1)
    assert_close(qo, ref_q.to(dtype))
    assert_close(ko, rope_ref(key.view(nnz, 1, head), pos, rot, not is_neox,
                              freq).view(nnz, -1).to(dtype))
    fi.apply_rope_with_cos_sin_cache_inplace(pos, query, key, head, cache, is_neox)
    assert torch.equal(query, qo) and torch.equal(key, ko)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        fi.apply_rope_with_cos_sin_cache(pos, query, key, head, cache.half(), is_neox)


# ---------------------------------------------------------------------------- sampling


def test_top_k_mask_logits_and_renorm_ties(device):
    """Ties with the k-th value are kept (FlashInfer's pivot rule), per-row k, k >= V."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, float("-inf")],
                           [0.5, 0.125, 0.75, 0.75, 0.25],
                           [4.0, 1.0, 2.0, 3.0, 0.0]], device=device)
    masked = fi.top_k_mask_logits(padded_view(logits), 2)
    inf = float("-inf")
    assert masked.tolist() == [[inf, 3.0, 3.0, inf, inf], [inf, inf, 0.75, 0.75, inf],
                               [4.0, inf, inf, 3.0, inf]]
    per_row = fi.top_k_mask_logits(logits, torch.tensor([1, 3, 9], device=device))
    assert per_row.tolist() == [[inf, 3.0, 3.0, inf, inf], [0.5, inf, 0.75, 0.75, inf],
                                logits[2].tolist()]
    probs = torch.softmax(logits, -1)
    renorm = fi.top_k_renorm_probs(probs, 2)
    torch.testing.assert_close(renorm, torch.softmax(masked, -1))
    assert renorm.dtype == torch.float32
    assert fi.sampling.top_k_renorm_prob is fi.top_k_renorm_probs


def test_top_p_renorm_probs(device):
    """A token stays when the strictly larger tokens hold < top_p of the mass."""
    gen = torch.Generator().manual_seed(14)
    probs = torch.softmax(randn((6, 13), gen) * 2, -1)
    probs[0, :4] = probs[0, 4]                              # ties
    probs = (probs / probs.sum(-1, keepdim=True)).to(device)
    top_p = torch.tensor([0.1, 0.5, 0.9, 1.0, 0.0, 0.3], device=device)
    ref = torch.zeros_like(probs)
    for r in range(6):
        row = probs[r].double()
        for j in range(13):
            if row[row > row[j]].sum() < top_p[r] or row[j] == row.max():
                ref[r, j] = row[j]
    ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(fi.top_p_renorm_probs(probs, top_p), ref)
    torch.testing.assert_close(fi.top_p_renorm_probs(probs, 0.5)[1], ref[1])
    # the boundary, exactly (FlashInfer's kernel keeps probs > its pivot, the largest value
    # with sum(probs > pivot) >= top_p): 0.5 + 0.25 reaches 0.75, so the 0.125s go
    exact = torch.tensor([[0.125, 0.5, 0.125, 0.25]], device=device)
    torch.testing.assert_close(fi.top_p_renorm_probs(exact, 0.75),
                               torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]], device=device))
    torch.testing.assert_close(fi.top_p_renorm_probs(exact, 0.76), exact)


def test_samplers_draw_inside_their_filters(device):
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]], device=device)
    rows = torch.zeros(3000, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def support(samples):
        return sorted(set(samples.tolist()))

    s = fi.sampling_from_probs(probs, indices=rows, generator=gen)
    assert s.dtype == torch.int64 and support(s) == [0, 1, 2, 3, 4]
    freq = torch.bincount(s, minlength=5).float() / len(s)
    torch.testing.assert_close(freq, probs[0], atol=0.04, rtol=0)
    assert support(fi.top_k_sampling_from_probs(probs, 2, indices=rows,
                                                generator=gen)) == [1, 2]
    assert support(fi.top_p_sampling_from_probs(probs, 0.6, indices=rows,
                                                generator=gen)) == [1, 2]
    assert support(fi.min_p_sampling_from_probs(probs, 0.3, indices=rows,
                                                generator=gen)) == [1, 2, 3]
    # top_k_first: top-p over the renormalized top-3 (0.47, 0.35, 0.18) -> 2 tokens at 0.8;
    # joint: top-p 0.8 over the original keeps 1, 2, 3 (mass before 3 is 0.7)
    for order, want in (("top_k_first", [1, 2]), ("joint", [1, 2, 3])):
        got = fi.top_k_top_p_sampling_from_probs(probs, 3, 0.8, indices=rows,
                                                 filter_apply_order=order, generator=gen)
        assert support(got) == want, order
    logits = probs.log().expand(3000, 5)
    got = fi.top_k_top_p_sampling_from_logits(logits, 3, 0.8, generator=gen)
    assert got.dtype == torch.int32 and support(got) == [1, 2]
    assert support(fi.sampling_from_logits(logits, generator=gen)) == [0, 1, 2, 3, 4]
    a = fi.sampling_from_probs(probs.expand(50, 5),
                               generator=torch.Generator(device=device).manual_seed(7))
    b = fi.sampling_from_probs(probs.expand(50, 5),
                               generator=torch.Generator(device=device).manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_quant(device, dtype):
    """FlashInfer's tests/test_norm.py::test_norm_quant / test_fused_add_rmsnorm_quant
    formula: fp8(rmsnorm(x) * w / scale) within one fp8 step; the residual updated;
    the block form's q, TMA-aligned scales and normed_out."""
    torch.manual_seed(0)
    b, h = 5, 256
    x = torch.randn(b, h, device=device, dtype=dtype)
    w = torch.randn(h, device=device, dtype=dtype)
    r = torch.randn(b, h, device=device, dtype=dtype)
    for scale in (0.5, torch.tensor([0.02], device=device)):
        s = float(scale)
        out = torch.empty(b, h, dtype=torch.float8_e4m3fn, device=device)
        fi.rmsnorm_quant(out, x, w, scale)
        xf = x.float()
        ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float())
        want = (ref.to(dtype).float() / s).clamp(-448, 448)
        assert ((out.float() - want).abs() <= want.abs() / 8 + 2.0**-9).all()
        res = r.clone()
        fi.norm.fused_add_rmsnorm_quant(out, x, res, w, scale)
        summed = (x.float() + r.float()).to(dtype)
        assert torch.equal(res, summed)
        hf = summed.float()
        ref = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float())
        want = (ref.to(dtype).float() / s).clamp(-448, 448)
        assert ((out.float() - want).abs() <= want.abs() / 8 + 2.0**-9).all()
    res = r.clone()
    normed = torch.empty_like(x)
    block_scale = torch.full((h // 128, 8), float("nan"), device=device)
    fi.fused_add_rmsnorm_fp8_block_quant(out, block_scale, normed, x, res, w)
    assert torch.equal(res, summed)
    assert_close(normed, ref.to(dtype))
    q, sc = mk_ops.per_token_group_quant_fp8(normed, 128)
    assert torch.equal(out.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(block_scale.t()[:b], sc)
    with pytest.raises(ValueError, match="block_scale"):
        fi.fused_add_rmsnorm_fp8_block_quant(out, block_scale[:, :5], normed, x, res, w)
    with pytest.raises(TypeError, match="out"):
        fi.rmsnorm_quant(out.float(), x, w, 1.0)
    with pytest.raises(ValueError, match="scale"):
        fi.rmsnorm_quant(out, x, w, torch.ones(2, device=device))


@pytest.mark.parametrize("onehot_target", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_chain_speculative_sampling_flashinfer_checks(device, onehot_target, n):
    """FlashInfer's tests/test_sampling.py::test_chain_speculative_sampling checks: a
    one-hot target reproduces its tokens; otherwise the accepted prefix equals the drafts,
    -1 follows the drawn token, emitted + 1 == tokens written; counts add into buffers."""
    gen = torch.Generator().manual_seed(n)
    b, v = 99, 111
    draft = torch.rand(b, n, v, generator=gen)
    draft = (draft / draft.sum(-1, keepdim=True)).to(device)
    draft_ids = torch.randint(v, (b, n), generator=gen).to(device)
    if onehot_target:
        target_ids = torch.randint(v, (b, n + 1), generator=gen).to(device)
        target_ids[:, :n] = draft_ids
        target = torch.zeros(b, n + 1, v, device=device)
        target.scatter_(2, target_ids.unsqueeze(-1), 1)
    else:
        target = torch.rand(b, n + 1, v, generator=gen)
        target = (target / target.sum(-1, keepdim=True)).to(device)
    for _ in range(3):
        accepted = torch.zeros(b, dtype=torch.int32, device=device)
        emitted = torch.zeros(b, dtype=torch.int32, device=device)
        out, acc, emi = fi.chain_speculative_sampling(draft, draft_ids, target, accepted,
                                                      emitted)
        assert acc is accepted and emi is emitted and out.dtype == torch.int32
        assert out.shape == (b, n + 1)
        if onehot_target:
            assert torch.equal(out, target_ids.to(torch.int32))
            assert (acc == n).all() and (emi == n).all()
        else:
            assert ((out >= 0) & (out < v) | (out == -1)).all()
            for row in range(b):
                mismatch = (out[row, :-1] != draft_ids[row]).nonzero()[:, 0]
                if len(mismatch):
                    assert torch.equal(mismatch, torch.arange(mismatch[0], n, device=device))
                    assert (out[row, mismatch[0] + 1:] == -1).all()
        assert torch.equal(emi + 1, (out != -1).sum(1).to(torch.int32))
        assert ((acc >= emi) & (acc <= n)).all()
    again, acc2, _ = fi.chain_speculative_sampling(draft, draft_ids, target, accepted)
    assert torch.equal(acc2, accepted) and (accepted >= acc).all()        # added in place
    fi.sampling.chain_speculative_sampling(draft, draft_ids, target)       # the namespace
    with pytest.raises(ValueError, match="target_probs"):
        fi.chain_speculative_sampling(draft, draft_ids, target[:, :n])
    with pytest.raises(ValueError, match="draft_token_ids"):
        fi.chain_speculative_sampling(draft, draft_ids + v, target)
    with pytest.raises(ValueError, match="maybe_output_accepted_token_num"):
        fi.chain_speculative_sampling(draft, draft_ids, target, accepted[:3])


def test_chain_speculative_sampling_distribution(device):
    """Every emitted token follows the target distribution: the first token of a row
    (accepted draft or the drawn one) is distributed as target row 0, and the number of
    accepted drafts follows the acceptance probabilities sum(min(q, p))."""
    gen = torch.Generator().manual_seed(5)
    rows, v = 20000, 6
    q = torch.rand(2, v, generator=gen) ** 3
    q /= q.sum(-1, keepdim=True)
    p = torch.rand(3, v, generator=gen) ** 3
    p /= p.sum(-1, keepdim=True)
    ids = torch.multinomial(q, rows, replacement=True, generator=gen).t().contiguous()
    out, _, emitted = fi.chain_speculative_sampling(
        q.expand(rows, 2, v).to(device), ids.to(device), p.expand(rows, 3, v).to(device),
        generator=torch.Generator(device=device).manual_seed(1))
    first = torch.bincount(out[:, 0].long().cpu(), minlength=v).float() / rows
    torch.testing.assert_close(first, p[0], atol=0.015, rtol=0)
    a0, a1 = torch.minimum(q, p[:2]).sum(-1)
    want = torch.stack([1 - a0, a0 * (1 - a1), a0 * a1])
    got = torch.bincount(emitted.long().cpu(), minlength=3).float() / rows
    torch.testing.assert_close(got, want, atol=0.015, rtol=0)


# ------------------------------------------------------------------------------ errors


def planned_decode(device, **kw):
    gen = torch.Generator().manual_seed(15)
    cache, _, _, indptr, indices, last = make_paged([5, 3], 4, 2, 8, torch.float32, "NHD",
                                                    "single", device, gen, torch.int32)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 8, 4, q_data_type=torch.float32, **kw)
    return w, cache, torch.randn(2, 4, 8, device=device)


def test_errors_name_the_argument(device):
    ws = workspace(device)
    ptr = torch.tensor([0, 1], dtype=torch.int32)
    idx = torch.tensor([0], dtype=torch.int32)
    one = torch.tensor([1], dtype=torch.int32)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        w.plan(ptr, idx, one, 2, 2, 8, 4, pos_encoding_mode="ROPE")
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        fi.single_decode_with_kv_cache(torch.randn(2, 8), torch.randn(3, 2, 8),
                                       torch.randn(3, 2, 8), pos_encoding_mode="alibi")
    with pytest.raises(ValueError, match="num_qo_heads"):
        w.plan(ptr, idx, one, 3, 2, 8, 4)
    with pytest.raises(ValueError, match="indptr"):
        w.plan(torch.tensor([0, 2, 1], dtype=torch.int32), idx, one.repeat(2), 2, 2, 8, 4)
    with pytest.raises(ValueError, match="last_page_len"):
        w.plan(ptr, idx, torch.tensor([5], dtype=torch.int32), 2, 2, 8, 4)
    with pytest.raises(TypeError, match="indices"):
        w.plan(ptr, idx.float(), one, 2, 2, 8, 4)
    with pytest.raises(ValueError, match="kv_layout"):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NDH")
    with pytest.raises(ValueError, match="use_cuda_graph"):
        fi.BatchPrefillWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
    with pytest.raises(RuntimeError, match="plan"):
        fi.BatchDecodeWithPagedKVCacheWrapper(ws).run(torch.randn(1, 2, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="custom_mask"):
        fi.single_prefill_with_kv_cache(torch.randn(2, 2, 8), torch.randn(3, 2, 8),
                                        torch.randn(3, 2, 8),
                                        custom_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="custom_mask"):
        fi.BatchPrefillWithRaggedKVCacheWrapper(ws).plan(ptr, ptr, 2, 2, 8,
                                                         custom_mask=torch.ones(1))
    w, cache, q = planned_decode(device)
    with pytest.raises(ValueError, match="q_data_type"):
        w.run(q.half(), cache)
    with pytest.raises(ValueError, match="paged_kv_cache"):
        w.run(q, cache[:, :, :, :1])
    with pytest.raises(ValueError, match="q"):
        w.run(q[:1], cache)
    with pytest.raises(ValueError, match="paged_kv_indices"):
        pw = fi.BatchPrefillWithPagedKVCacheWrapper(ws)
        pw.plan(ptr, ptr, torch.tensor([99], dtype=torch.int32), one, 2, 2, 8, 4,
                q_data_type="float32")
        pw.run(torch.randn(1, 2, 8, device=device), cache[:, :, :, :2])
    with pytest.raises(ValueError, match="sinks"):
        w.run(q, cache, sinks=torch.zeros(3, device=device))      # not one per q head
    with pytest.raises(ValueError, match="weight"):
        fi.rmsnorm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="input"):
        fi.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="top_k"):
        fi.top_k_renorm_probs(torch.rand(2, 5), 0)
    with pytest.raises(ValueError, match="top_p"):
        fi.top_p_renorm_probs(torch.rand(2, 5), 1.5)
    with pytest.raises(ValueError, match="s_b"):
        fi.merge_state(torch.randn(3, 2, 4), torch.randn(3, 2), torch.randn(3, 2, 4),
                       torch.randn(3, 3))
    with pytest.raises(ValueError, match="rotary_dim"):
        fi.apply_rope_pos_ids(torch.randn(2, 1, 8), torch.randn(2, 1, 8),
                              torch.arange(2), rotary_dim=5)
    with pytest.raises(ValueError, match="filter_apply_order"):
        fi.top_k_top_p_sampling_from_probs(torch.rand(2, 5), 2, 0.5,
                                           filter_apply_order="top_p_first")


def test_wrappers_take_attention_sinks(device):
    """run(sinks=) (GPT-OSS's sinks, as vLLM passes them): the decode wrapper's output equals
    the softmax with one more logit per head (the reference), and with sinks of -1e4 the
    output without sinks."""
    from minikernels.ops import reference

    gen = torch.Generator().manual_seed(15)
    cache, _, _, indptr, indices, last = make_paged([5, 3], 4, 2, 8, torch.float32, "NHD",
                                                    "single", device, gen, torch.int32)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 8, 4, q_data_type=torch.float32)
    q = torch.randn(2, 4, 8, device=device)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=device)
    out = w.run(q, cache, sinks=sinks)
    plain = w.run(q, cache)
    torch.testing.assert_close(w.run(q, cache, sinks=torch.full_like(sinks, -1e4)), plain)
    kc, vc = cache[:, 0], cache[:, 1]           # the FlashInfer page table, as a block table
    ip = indptr.tolist()
    table = torch.zeros(2, 2, dtype=torch.int32)
    for b in range(2):
        table[b, :ip[b + 1] - ip[b]] = indices[ip[b]:ip[b + 1]].cpu()
    lens = torch.tensor([(ip[b + 1] - ip[b] - 1) * 4 + int(last[b]) for b in range(2)],
                        dtype=torch.int32)
    ref, _ = reference.paged_decode_attention(q, kc, vc, table.to(device), lens.to(device),
                                              sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain)
