"""minikernels.compat.flashinfer: cascade attention, packbits and the temperature softmax.

FlashInfer's recipes (tests/attention/test_shared_prefix_kernels.py,
tests/utils/test_quantization.py, tests/utils/test_sampling.py), in this file's own code:

- cascade attention over a shared prefix (and, with 3 levels, a per-group middle part)
  plus each request's unique suffix equals one attention over the concatenated keys, here
  against fp64 attention written below on the raw K / V the pages were filled from, and
  against the one-level prefill wrapper over the concatenated page lists; the deprecated
  shared-prefix wrappers equal the 2-level cascade;
- with a window the levels mask on their own (FlashInfer plans every level as its own
  prefill): the reference is one softmax over the union of each level's visible keys;
- packbits / segment_packbits against numpy.packbits; softmax against torch.softmax of
  logits / temperature.

All pages of one test live in one cache (shuffled page ids, unused slots random, so a
wrong page or length shows), NHD / HND, a (k, v) tuple of strided views or one
[P, 2, ...] tensor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, paged_kv_cache_form

from minikernels.compat import flashinfer as fi

LOG2E = math.log2(math.e)


# ------------------------------------------------------------------------- references


def union_attention_ref(q, levels, causal=False, window_left=-1, cap=None, scale=None):
    """fp64 attention of each query row over the union of its keys on every level.

    q [T, Hq, D]; levels: per level (qo_indptr list, [(K_g, V_g)] per group), K_g / V_g
    [L_g, Hkv, D]. Within a group, query i of Lq sits at position i + L_g - Lq; causal
    masks the last level only, window_left every level. One softmax over all visible keys.
    Returns (out fp64 [T, Hq, D], natural LSE fp64 [T, Hq]; rows without keys: 0, -inf).
    """
    t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores, values = [], []
    for lvl, (qo, groups) in enumerate(levels):
        for g, (k, v) in enumerate(groups):
            lk, hkv = k.shape[0], k.shape[1]
            a, z = qo[g], qo[g + 1]
            s = torch.full((hq, t, lk), float("-inf"), dtype=torch.float64)
            kk = k.double().cpu().repeat_interleave(hq // hkv, dim=1)
            part = torch.einsum("qhd,khd->hqk", q[a:z].double().cpu(), kk) * scale
            if cap:
                part = cap * torch.tanh(part / cap)
            qpos = torch.arange(z - a)[:, None] + (lk - (z - a))
            kpos = torch.arange(lk)[None, :]
            seen = torch.ones(z - a, lk, dtype=torch.bool)
            if causal and lvl == len(levels) - 1:
                seen &= kpos <= qpos
            if window_left >= 0:
                seen &= kpos >= qpos - window_left
            s[:, a:z] = part.masked_fill(~seen, float("-inf"))
            scores.append(s)
            values.append(v.double().cpu().repeat_interleave(hq // hkv, dim=1))
    s = torch.cat(scores, dim=2)
    vv = torch.cat(values, dim=0)
    lse = torch.logsumexp(s, dim=-1)
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", w, vv), lse.t()


def concat_attention_ref(q_b, k_b, v_b, causal):
    """fp64 attention of one request over its concatenated keys (bottom-right causal)."""
    return union_attention_ref(q_b, [([0, q_b.shape[0]], [(k_b, v_b)])], causal)[0]


# ------------------------------------------------------------------------------ pages


class Pool:
    """One paged cache [num_pages, page_size, Hkv, D] with random contents; add() writes
    a sequence into fresh pages (shuffled ids) and returns them."""

    def __init__(self, num_pages, page_size, hkv, d, dtype, gen):
        self.page_size = page_size
        self.k = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
        self.v = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
        self.free = torch.randperm(num_pages, generator=gen).tolist()

    def add(self, k, v):
        n = k.shape[0]
        pages = [self.free.pop() for _ in range(-(-n // self.page_size))]
        for j, p in enumerate(pages):
            part = slice(j * self.page_size, min(n, (j + 1) * self.page_size))
            self.k[p, :part.stop - part.start] = k[part]
            self.v[p, :part.stop - part.start] = v[part]
        return pages

    def table(self, page_lists, lens, device, idx_dtype=torch.int32):
        """FlashInfer's CSR page table (indptr, indices, last_page_len) of page lists."""
        ptr = np.cumsum([0] + [len(p) for p in page_lists]).tolist()
        idx = [p for pages in page_lists for p in pages]
        last = [n - (len(p) - 1) * self.page_size if p else 0
                for n, p in zip(lens, page_lists)]
        return tuple(torch.tensor(x, dtype=idx_dtype, device=device) for x in (ptr, idx, last))

    def cache(self, layout, form, device):
        return paged_kv_cache_form(self.k, self.v, layout, form, device)


def ws(device):
    return torch.empty(1024, dtype=torch.uint8, device=device)


def rand(shape, gen, dtype):
    return torch.randn(shape, generator=gen).to(dtype)


def build_cascade(gen, *, num_levels, groups, prefix_len, mid_lens, unique_lens, qlens,
                  page_size, hq, hkv, d, dtype):
    """A batch whose requests share a prefix (level 0), a per-group middle part (level 1
    of 3) and own a unique suffix (last level). Returns (pool, q, levels for
    union_attention_ref, per-level (qo_indptr, page lists, lens), per-request
    (K, V) concatenations)."""
    num_req = len(unique_lens)
    total_pages = sum(-(-n // page_size) for n in [prefix_len, *mid_lens, *unique_lens]) + 3
    pool = Pool(total_pages, page_size, hkv, d, dtype, gen)
    q = rand((sum(qlens), hq, d), gen, dtype)
    qo_req = np.cumsum([0] + qlens).tolist()
    shared = [(rand((prefix_len, hkv, d), gen, dtype), rand((prefix_len, hkv, d), gen, dtype))]
    mids = [(rand((n, hkv, d), gen, dtype), rand((n, hkv, d), gen, dtype)) for n in mid_lens]
    uniq = [(rand((n, hkv, d), gen, dtype), rand((n, hkv, d), gen, dtype))
            for n in unique_lens]
    parts = [([0, qo_req[-1]], shared)]
    if num_levels == 3:
        bounds = np.cumsum([0] + groups).tolist()      # requests per middle group
        parts.append(([qo_req[b] for b in bounds], mids))
    parts.append((qo_req, uniq))
    parts = parts[-num_levels:]                        # 1 level: the unique part only
    levels, plans = [], []
    for qo, kvs in parts:
        pages = [pool.add(k, v) for k, v in kvs]
        levels.append((qo, kvs))
        plans.append((qo, pages, [k.shape[0] for k, _ in kvs]))
    group_of = [g for g, n in enumerate(groups) for _ in range(n)] if num_levels == 3 else []
    concat = []
    for b in range(num_req):
        seq = ([shared[0]] if num_levels >= 2 else []) + (
            [mids[group_of[b]]] if num_levels == 3 else []) + [uniq[b]]
        concat.append((torch.cat([k for k, _ in seq]), torch.cat([v for _, v in seq])))
    return pool, q, levels, plans, concat


def plan_cascade(w, pool, plans, device, hq, hkv, d, idx_dtype=torch.int32, **kw):
    tables = [pool.table(pages, lens, device, idx_dtype) for _, pages, lens in plans]
    w.plan([torch.tensor(qo, dtype=idx_dtype, device=device) for qo, _, _ in plans],
           [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables],
           hq, hkv, d, pool.page_size, **kw)


# ------------------------------------------------------------------ cascade wrappers


CASES = [  # num_levels, layout, form, page_size, causal, dtype, (hq, hkv, d), qlens
    (2, "NHD", "single", 16, False, torch.float16, (4, 4, 16), [1, 1, 1]),
    (2, "HND", "tuple", 3, True, torch.bfloat16, (4, 2, 8), [2, 3, 1]),
    (2, "NHD", "tuple", 1, True, torch.float32, (6, 2, 8), [3, 1, 2]),
    (3, "HND", "single", 3, True, torch.float16, (4, 1, 12), [2, 1, 2]),
    (3, "NHD", "tuple", 16, False, torch.bfloat16, (2, 2, 16), [1, 3, 2]),
    (3, "HND", "tuple", 1, False, torch.float32, (4, 2, 8), [1, 1, 1]),
    (1, "NHD", "single", 3, True, torch.float32, (4, 2, 8), [2, 2, 1]),
    (1, "HND", "tuple", 16, False, torch.float16, (2, 1, 8), [1, 2, 3]),
]


@pytest.mark.parametrize("num_levels,layout,form,page_size,causal,dtype,heads,qlens", CASES)
def test_cascade_equals_attention_over_concatenated_keys(device, num_levels, layout, form,
                                                         page_size, causal, dtype, heads,
                                                         qlens):
    """1 / 2 / 3 levels (shared prefix, per-group middle, unique suffixes; lengths not
    page-aligned), NHD / HND, tuple / one-tensor caches, GQA / MQA, page sizes 1 / 3 / 16,
    causal on the last level (queries are the suffixes' last tokens), fp32 / fp16 / bf16:
    the output equals fp64 attention over each request's concatenated keys."""
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(hash((num_levels, page_size, causal)) % 2**31)
    pool, q, _, plans, concat = build_cascade(
        gen, num_levels=num_levels, groups=[2, 1], prefix_len=11, mid_lens=[5, 4],
        unique_lens=[4, 6, 3], qlens=qlens, page_size=page_size, hq=hq, hkv=hkv, d=d,
        dtype=dtype)
    w = fi.MultiLevelCascadeAttentionWrapper(num_levels, ws(device), layout)
    plan_cascade(w, pool, plans, device, hq, hkv, d, causal=causal, q_data_type=dtype)
    out = w.run(q.to(device), pool.cache(layout, form, device))
    assert out.shape == q.shape and out.dtype == dtype and out.device.type == device
    at = np.cumsum([0] + qlens).tolist()
    ref = torch.cat([concat_attention_ref(q[at[b]:at[b + 1]], *concat[b], causal)
                     for b in range(len(qlens))])
    assert_close(out.cpu(), ref.to(dtype), scale=2.0)
    assert_close(w.forward(q.to(device), pool.cache(layout, form, device)), out)  # alias


@pytest.mark.parametrize("num_levels,window,cap,scale", [(2, 3, None, None), (3, 0, 5.0, 0.2),
                                                         (2, -1, 2.0, 0.5)])
def test_cascade_windows_soft_cap_and_scale_per_level(device, num_levels, window, cap, scale):
    """window_left / logits_soft_cap / sm_scale go to every level's plan (positions within
    each level's own keys, FlashInfer's per-level prefill), causal to the last: one
    softmax over the union of each level's visible keys."""
    gen = torch.Generator().manual_seed(7 + num_levels)
    pool, q, levels, plans, _ = build_cascade(
        gen, num_levels=num_levels, groups=[1, 2], prefix_len=9, mid_lens=[6, 2],
        unique_lens=[5, 3, 7], qlens=[2, 1, 3], page_size=3, hq=4, hkv=2, d=8,
        dtype=torch.float32)
    w = fi.MultiLevelCascadeAttentionWrapper(num_levels, ws(device), "HND")
    plan_cascade(w, pool, plans, device, 4, 2, 8, causal=True, window_left=window,
                 logits_soft_cap=cap, sm_scale=scale, q_data_type="float32")
    out = w.run(q.to(device), pool.cache("HND", "single", device))
    ref, _ = union_attention_ref(q, levels, True, window, cap, scale)
    assert_close(out.cpu(), ref.float(), scale=2.0)


def test_cascade_equals_one_level_over_concatenated_pages(device):
    """FlashInfer's recipe: with a page-aligned shared prefix, the 2-level cascade equals
    the plain paged prefill wrapper over [prefix pages + unique pages] per request, and
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper (prefix as its own k / v) equals both;
    int64 page tables."""
    gen = torch.Generator().manual_seed(3)
    ps, hq, hkv, d, dtype = 4, 4, 2, 8, torch.float16
    pool, q, _, plans, _ = build_cascade(
        gen, num_levels=2, groups=[3], prefix_len=8, mid_lens=[], unique_lens=[5, 4, 9],
        qlens=[3, 1, 4], page_size=ps, hq=hq, hkv=hkv, d=d, dtype=dtype)
    cache = pool.cache("NHD", "tuple", device)
    q = q.to(device)
    w = fi.MultiLevelCascadeAttentionWrapper(2, ws(device))
    plan_cascade(w, pool, plans, device, hq, hkv, d, torch.int64, causal=True,
                 q_data_type=dtype)
    out = w.run(q, cache)
    (_, prefix_pages, _), (qo, uniq_pages, uniq_lens) = plans
    one = fi.BatchPrefillWithPagedKVCacheWrapper(ws(device))
    ptr, idx, last = pool.table([prefix_pages[0] + p for p in uniq_pages],
                                [8 + n for n in uniq_lens], device, torch.int64)
    one.plan(torch.tensor(qo, device=device), ptr, idx, last, hq, hkv, d, ps, causal=True,
             q_data_type=dtype)
    assert_close(out, one.run(q, cache), scale=2.0)
    sp = fi.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(ws(device))
    uptr, uidx, ulast = pool.table(uniq_pages, uniq_lens, device)
    sp.begin_forward(torch.tensor(qo, dtype=torch.int32, device=device), uptr, uidx, ulast,
                     hq, hkv, d, ps)
    k_shared = pool.k[prefix_pages[0]].reshape(8, hkv, d).to(device)
    v_shared = pool.v[prefix_pages[0]].reshape(8, hkv, d).to(device)
    assert_close(sp.forward(q, k_shared, v_shared, cache, causal=True), out, scale=2.0)


@pytest.mark.parametrize("layout,page_size,dtype", [("NHD", 1, torch.bfloat16),
                                                    ("HND", 3, torch.float16),
                                                    ("NHD", 16, torch.float32)])
def test_shared_prefix_decode_wrapper(device, layout, page_size, dtype):
    """BatchDecodeWithSharedPrefixPagedKVCacheWrapper: one query per request over the
    prefix (its own k / v, kv_layout's layout) and the request's paged suffix (one of length
    0); equals fp64 attention over the concatenation and the 2-level cascade."""
    gen = torch.Generator().manual_seed(page_size)
    hq, hkv, d = 4, 2, 8
    pool, q, _, plans, concat = build_cascade(
        gen, num_levels=2, groups=[3], prefix_len=7, mid_lens=[], unique_lens=[4, 0, 6],
        qlens=[1, 1, 1], page_size=page_size, hq=hq, hkv=hkv, d=d, dtype=dtype)
    (_, _, _), (_, uniq_pages, uniq_lens) = plans
    w = fi.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(ws(device), layout)
    w.begin_forward(*pool.table(uniq_pages, uniq_lens, device), hq, hkv, d, page_size,
                    data_type=dtype)
    k_shared, v_shared = (t.to(device) for t in concat[1])        # request 1: prefix only
    if layout == "HND":
        k_shared, v_shared = k_shared.transpose(0, 1), v_shared.transpose(0, 1)
    cache = pool.cache(layout, "single", device)
    out = w.forward(q.to(device), k_shared, v_shared, cache)
    ref = torch.cat([concat_attention_ref(q[b:b + 1], *concat[b], False) for b in range(3)])
    assert_close(out.cpu(), ref.to(dtype), scale=2.0)
    casc = fi.MultiLevelCascadeAttentionWrapper(2, ws(device), layout)
    plan_cascade(casc, pool, plans, device, hq, hkv, d, q_data_type=dtype)
    assert_close(casc.run(q.to(device), cache), out, scale=2.0)


@pytest.mark.parametrize("causal,dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_shared_prefix_prefill_wrapper(device, causal, dtype):
    """BatchPrefillWithSharedPrefixPagedKVCacheWrapper.forward(causal=): the whole prefix
    visible, causal (bottom-right) within each suffix; q's dtype (FlashInfer's
    begin_forward has none); sm_scale."""
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d = 2, 1, 16
    pool, q, _, plans, concat = build_cascade(
        gen, num_levels=2, groups=[2], prefix_len=5, mid_lens=[], unique_lens=[6, 3],
        qlens=[4, 3], page_size=3, hq=hq, hkv=hkv, d=d, dtype=dtype)
    (_, prefix_pages, _), (qo, uniq_pages, uniq_lens) = plans
    w = fi.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(ws(device), "HND")
    w.begin_forward(torch.tensor(qo, dtype=torch.int32, device=device),
                    *pool.table(uniq_pages, uniq_lens, device), hq, hkv, d, 3)
    k_sh = pool.k[prefix_pages[0]].reshape(-1, hkv, d)[:5].transpose(0, 1).to(device)
    v_sh = pool.v[prefix_pages[0]].reshape(-1, hkv, d)[:5].transpose(0, 1).to(device)
    out = w.forward(q.to(device), k_sh, v_sh, pool.cache("HND", "tuple", device),
                    causal=causal, sm_scale=0.3)
    at = [0, 4, 7]
    levels = [([0, 7], [(pool.k[prefix_pages[0]].reshape(-1, hkv, d)[:5],
                         pool.v[prefix_pages[0]].reshape(-1, hkv, d)[:5])]),
              (at, [(concat[b][0][5:], concat[b][1][5:]) for b in range(2)])]
    ref, _ = union_attention_ref(q, levels, causal, scale=0.3)
    assert_close(out.cpu(), ref.to(dtype), scale=2.0)


def test_cascade_levels_without_keys(device):
    """A request without pages on a level takes nothing from it (LSE -inf merges as
    zero weight; no NaN): 3 levels where request 1 has no middle part and request 2 no
    unique suffix."""
    gen = torch.Generator().manual_seed(9)
    pool, q, levels, plans, _ = build_cascade(
        gen, num_levels=3, groups=[1, 1, 1], prefix_len=4, mid_lens=[3, 0, 5],
        unique_lens=[2, 3, 0], qlens=[1, 1, 1], page_size=2, hq=2, hkv=2, d=8,
        dtype=torch.float32)
    w = fi.MultiLevelCascadeAttentionWrapper(3, ws(device))
    plan_cascade(w, pool, plans, device, 2, 2, 8, q_data_type=torch.float32)
    out = w.run(q.to(device), pool.cache("NHD", "single", device))
    ref, _ = union_attention_ref(q, levels)
    assert_close(out.cpu(), ref.float(), scale=2.0)


def test_cascade_on_triton_kernels(device):
    """The per-level prefill and the merge on the Triton kernels (the interpreter on the
    CPU): a small 2-level HND tuple case against the fp64 reference."""
    import minikernels as mk

    gen = torch.Generator().manual_seed(13)
    pool, q, levels, plans, _ = build_cascade(
        gen, num_levels=2, groups=[2], prefix_len=5, mid_lens=[], unique_lens=[3, 4],
        qlens=[1, 2], page_size=4, hq=2, hkv=1, d=16, dtype=torch.float32)
    with mk.use_backend("triton"):
        w = fi.MultiLevelCascadeAttentionWrapper(2, ws(device), "HND")
        plan_cascade(w, pool, plans, device, 2, 1, 16, causal=True, q_data_type="float32")
        out = w.run(q.to(device), pool.cache("HND", "tuple", device))
    ref, _ = union_attention_ref(q, levels, True)
    assert_close(out.cpu(), ref.float(), scale=2.0)


# ---------------------------------------------------------------------- packbits


@pytest.mark.parametrize("bitorder", ["big", "little"])
def test_packbits_matches_numpy(device, bitorder):
    """Lengths 0 / 1 / 7 / 8 / 9 / 99 / 1000 (padding bits 0), bool and non-bool inputs
    (nonzero = 1), FlashInfer's docstring example; the top-level and namespace names."""
    gen = torch.Generator().manual_seed(1)
    for n in (0, 1, 7, 8, 9, 99, 1000):
        x = torch.rand(n, generator=gen) < 0.5
        want = torch.from_numpy(np.packbits(x.numpy(), bitorder=bitorder))
        got = fi.quantization.packbits(x.to(device), bitorder)
        assert got.dtype == torch.uint8 and got.device.type == device
        assert torch.equal(got.cpu(), want)
        as_float = x.float() * torch.randn(n, generator=gen).sign()     # +-1, 0
        assert torch.equal(fi.packbits(as_float.to(device), bitorder=bitorder).cpu(), want)
    x = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool, device=device)
    assert fi.packbits(x).tolist() == [0b10110011]


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_segment_packbits_matches_numpy(device, idx_dtype):
    """Each segment packed on its own (empty segments, lengths across byte boundaries,
    indptr[0] > 0, x longer than indptr[-1]); the returned indptr is int32 with
    new_indptr[i+1] - new_indptr[i] = (len_i + 7) // 8; FlashInfer's docstring example."""
    gen = torch.Generator().manual_seed(2)
    lens = [0, 1, 8, 9, 0, 17, 3, 64, 0]
    indptr = torch.tensor(np.cumsum([2] + lens).tolist(), dtype=idx_dtype)
    x = torch.rand(int(indptr[-1]) + 5, generator=gen) < 0.5
    for bitorder in ("big", "little"):
        y, new = fi.quantization.segment_packbits(x.to(device), indptr.to(device), bitorder)
        assert new.dtype == torch.int32 and y.dtype == torch.uint8
        assert new.tolist() == np.cumsum([0] + [(n + 7) // 8 for n in lens]).tolist()
        for i in range(len(lens)):
            seg = x[int(indptr[i]):int(indptr[i + 1])].numpy()
            want = np.packbits(seg, bitorder=bitorder)
            assert y[new[i]:new[i + 1]].cpu().numpy().tolist() == want.tolist()
    x = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool, device=device)
    y, new = fi.segment_packbits(x, torch.tensor([0, 4, 7, 11], device=device))
    assert y.tolist() == [0b10110000, 0b100000, 0b11010000] and new.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_temperature(device, dtype):
    """Scalar and per-row temperatures (FlashInfer's test: torch.softmax(logits /
    temperature)), -inf logits, fp32 output; None is temperature 1; temperature 0 gives
    FlashInfer's kernel's uniform row (inv_temp 0), not a one-hot."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(5, 33, generator=gen) * 3).to(dtype)
    logits[1, ::3] = float("-inf")
    x = logits.float()
    for temp in (1.0, 0.5, 2):
        got = fi.sampling.softmax(logits.to(device), temperature=temp)
        assert got.dtype == torch.float32 and got.shape == logits.shape
        torch.testing.assert_close(got.cpu(), torch.softmax(x / temp, dim=-1), atol=1e-6,
                                   rtol=1e-5)
    temps = torch.tensor([0.1, 0.7, 1.0, 1.5, 4.0])
    for t in (temps, temps.half(), temps.double()):
        got = fi.softmax(logits.to(device), t.to(device))
        torch.testing.assert_close(got.cpu(), torch.softmax(x / t.float()[:, None], dim=-1),
                                   atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fi.softmax(logits.to(device)).cpu(), torch.softmax(x, -1))
    zero = fi.softmax(torch.randn(2, 4, device=device), torch.zeros(2, device=device))
    torch.testing.assert_close(zero.cpu(), torch.full((2, 4), 0.25))


# ------------------------------------------------------------------------ errors


def test_errors_name_the_argument(device):
    w = fi.MultiLevelCascadeAttentionWrapper(2, ws(device))
    i32 = torch.int32
    qo = [torch.tensor([0, 2], dtype=i32), torch.tensor([0, 1, 2], dtype=i32)]
    ptr = [torch.tensor([0, 1], dtype=i32), torch.tensor([0, 1, 2], dtype=i32)]
    idx = [torch.tensor([0], dtype=i32), torch.tensor([1, 2], dtype=i32)]
    last = [torch.tensor([2], dtype=i32), torch.tensor([1, 2], dtype=i32)]
    args = (2, 2, 8, 2)
    with pytest.raises(ValueError, match="num_levels"):
        fi.MultiLevelCascadeAttentionWrapper(0, ws(device))
    with pytest.raises(ValueError, match="use_cuda_graph"):
        fi.MultiLevelCascadeAttentionWrapper(2, ws(device), use_cuda_graph=True)
    with pytest.raises(ValueError, match="kv_layout"):
        fi.MultiLevelCascadeAttentionWrapper(2, ws(device), "NDH")
    with pytest.raises(RuntimeError, match="plan"):
        w.run(torch.randn(2, 2, 8), torch.zeros(3, 2, 2, 2, 8))
    with pytest.raises(ValueError, match="paged_kv_indptr_arr"):
        w.plan(qo, ptr[:1], idx, last, *args)
    with pytest.raises(TypeError, match="qo_indptr_arr"):
        w.plan(qo[0], ptr, idx, last, *args)
    with pytest.raises(TypeError, match=r"paged_kv_indices_arr\[1\]"):
        w.plan(qo, ptr, [idx[0], idx[1].float()], last, *args)
    with pytest.raises(ValueError, match=r"paged_kv_last_page_len\[1\]"):
        w.plan(qo, ptr, idx, [last[0], torch.tensor([1, 3], dtype=i32)], *args)
    with pytest.raises(ValueError, match=r"qo_indptr_arr\[1\]"):
        w.plan([qo[0], torch.tensor([0, 2], dtype=i32)], ptr, idx, last, *args)
    with pytest.raises(ValueError, match="qo_indptr_arr"):
        w.plan([qo[0], torch.tensor([0, 1, 3], dtype=i32)], ptr, idx, last, *args)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        w.plan(qo, ptr, idx, last, *args, pos_encoding_mode="ROPE")
    w.plan(qo, ptr, idx, last, *args, q_data_type=torch.float32)
    cache = torch.randn(3, 2, 2, 2, 8, device=device)
    with pytest.raises(ValueError, match="q_data_type"):
        w.run(torch.randn(2, 2, 8, device=device).half(), cache)
    with pytest.raises(ValueError, match=r"paged_kv_indices_arr\[1\]"):
        w.run(torch.randn(2, 2, 8, device=device), cache[:2])          # page 2 out of range
    with pytest.raises(ValueError, match="int_workspace_buffers"):
        w.reset_workspace_buffer(ws(device), [ws(device)])
    with pytest.raises(ValueError, match="variant"):
        w.prewarm_paged_kv_stride_variant("shared")

    d = fi.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(ws(device))
    with pytest.raises(RuntimeError, match="plan"):
        d.forward(torch.randn(2, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), cache)
    with pytest.raises(ValueError, match="data_type"):
        d.begin_forward(ptr[1], idx[1], last[1], *args, data_type=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="unique_kv_last_page_len"):
        d.begin_forward(ptr[1], idx[1], torch.tensor([1, 5], dtype=i32), *args)
    d.begin_forward(ptr[1], idx[1], last[1], *args, data_type="float32")
    with pytest.raises(ValueError, match="k_shared"):
        d.forward(torch.randn(2, 2, 8, device=device), torch.randn(3, 1, 8, device=device),
                  torch.randn(3, 1, 8, device=device), cache)
    p = fi.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(ws(device))
    with pytest.raises(ValueError, match="qo_indptr"):
        p.begin_forward(torch.tensor([0, 2, 1], dtype=i32), ptr[1], idx[1], last[1], *args)
    p.begin_forward(qo[1], ptr[1], idx[1], last[1], *args)
    with pytest.raises(TypeError, match="q"):
        p.forward(torch.zeros(2, 2, 8, dtype=torch.int32), torch.randn(3, 2, 8),
                  torch.randn(3, 2, 8), cache)
    with pytest.raises(ValueError, match="v_shared"):
        p.forward(torch.randn(2, 2, 8, device=device), torch.randn(3, 2, 8, device=device),
                  torch.randn(2, 3, 8, device=device), cache)
    with pytest.raises(ValueError, match="sm_scale"):
        p.forward(torch.randn(2, 2, 8, device=device), torch.randn(3, 2, 8, device=device),
                  torch.randn(3, 2, 8, device=device), cache, sm_scale=-1.0)

    with pytest.raises(ValueError, match="bitorder"):
        fi.packbits(torch.ones(3, dtype=torch.bool), "middle")
    with pytest.raises(ValueError, match="x"):
        fi.packbits(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="x"):
        fi.packbits([1, 0, 1])
    with pytest.raises(ValueError, match="indptr"):
        fi.segment_packbits(torch.ones(5, dtype=torch.bool), torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="indptr"):
        fi.segment_packbits(torch.ones(5, dtype=torch.bool), torch.tensor([0, 6]))
    with pytest.raises(TypeError, match="indptr"):
        fi.segment_packbits(torch.ones(5, dtype=torch.bool), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="bitorder"):
        fi.segment_packbits(torch.ones(5, dtype=torch.bool), torch.tensor([0, 2]), "BIG")

    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="temperature"):
        fi.softmax(logits, torch.ones(2))
    with pytest.raises(ValueError, match="temperature"):
        fi.softmax(logits, torch.ones(3, 1))
    with pytest.raises(TypeError, match="temperature"):
        fi.softmax(logits, torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="temperature"):
        fi.softmax(logits, True)
    with pytest.raises(TypeError, match="temperature"):
        fi.softmax(logits, "1.0")
    with pytest.raises(ValueError, match="temperature"):
        fi.softmax(logits, float("nan"))
    with pytest.raises(ValueError, match="logits"):
        fi.softmax(torch.randn(5))


def test_names_and_aliases():
    """FlashInfer's names: top level, the cascade / sampling / quantization namespaces, and
    the begin_forward / forward aliases."""
    mlc = fi.MultiLevelCascadeAttentionWrapper
    assert fi.cascade.MultiLevelCascadeAttentionWrapper is mlc
    assert mlc.begin_forward is mlc.plan and mlc.forward is mlc.run
    assert (fi.cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper
            is fi.BatchDecodeWithSharedPrefixPagedKVCacheWrapper)
    assert (fi.cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper
            is fi.BatchPrefillWithSharedPrefixPagedKVCacheWrapper)
    assert fi.sampling.softmax is fi.softmax
    assert fi.quantization.packbits is fi.packbits
    assert fi.quantization.segment_packbits is fi.segment_packbits
    for name in ("MultiLevelCascadeAttentionWrapper", "packbits", "segment_packbits",
                 "softmax", "quantization"):
        assert name in fi.__all__


def test_ragged_prefill_deprecated_forward(device):
    """BatchPrefillWithRaggedKVCacheWrapper.forward / forward_return_lse (FlashInfer's
    deprecated forms): their causal / window / soft cap / scale replace the planned ones,
    so they equal a plan with those values then run."""
    gen = torch.Generator().manual_seed(5)
    qo = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device=device)
    kv = torch.tensor([0, 5, 6, 12], dtype=torch.int32, device=device)
    q = torch.randn(9, 4, 16, generator=gen).half().to(device)
    k = torch.randn(12, 2, 16, generator=gen).half().to(device)
    v = torch.randn(12, 2, 16, generator=gen).half().to(device)
    ws = torch.empty(8, dtype=torch.uint8, device=device)
    old = fi.BatchPrefillWithRaggedKVCacheWrapper(ws)
    old.plan(qo, kv, 4, 2, 16, q_data_type=torch.float16)
    new = fi.BatchPrefillWithRaggedKVCacheWrapper(ws)
    new.plan(qo, kv, 4, 2, 16, causal=True, window_left=3, logits_soft_cap=5.0,
             sm_scale=0.2, q_data_type=torch.float16)
    want_o, want_lse = new.run(q, k, v, return_lse=True)
    got = old.forward(q, k, v, causal=True, window_left=3, logits_soft_cap=5.0, sm_scale=0.2)
    assert torch.equal(got, want_o)
    got_o, got_lse = old.forward_return_lse(q, k, v, causal=True, window_left=3,
                                            logits_soft_cap=5.0, sm_scale=0.2)
    assert torch.equal(got_o, want_o) and torch.equal(got_lse, want_lse)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        old.forward(q, k, v, pos_encoding_mode="LLAMA")
