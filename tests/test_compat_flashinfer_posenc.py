"""minikernels.compat.flashinfer's ``pos_encoding_mode`` "ALIBI" and "ROPE_LLAMA".

Every entry point that takes FlashInfer's pos_encoding_mode (single decode / prefill, the
batch decode, paged and ragged prefill wrappers, their deprecated ``forward``, the cascade
wrapper) is checked against an fp64 reference written in this file from FlashInfer's
definitions (variants.cuh DefaultAttention, decode.cuh, prefill.cuh, utils.py):

- ALIBI: the score of query row i (its index among its request's qo_len queries; 0 in
  decode) and key j (its index among the request's kv_len keys) is
  ``sm_scale * q.k + slope_h * (j - i)``, slopes ``get_alibi_slopes(num_qo_heads)``
  (2^(-8k/n) for the largest power of two n <= heads, then 2^(-4(2k-1)/n)); signed, so
  without causal masking later keys gain. The LSE is taken over these scores (base 2).
- ROPE_LLAMA: q row i rotated at kv_len - qo_len + i (decode: kv_len - 1), key j at j,
  pairs (d, d + D/2), angle pos * rope_theta^(-2d/D) / rope_scale.

The recipes are FlashInfer's tests' in this file's words: tests/test_alibi.py (single
decode over seq lens, single prefill over q / kv lens, causal or not, several head counts)
and the batch decode / prefill tests run with ROPE_LLAMA (paged and ragged, causal or not,
GQA, rope_scale / rope_theta). The caller's q and caches must be unchanged after a
ROPE_LLAMA run (FlashInfer rotates in registers). One small case per mode runs on the
Triton kernels (the interpreter on the CPU).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

import minikernels as mk
from minikernels.compat import flashinfer as fi

LOG2E = math.log2(math.e)
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# ------------------------------------------------------------------------- references


def slopes_ref(num_heads):
    """FlashInfer's get_alibi_slopes, in fp64 from its formula."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    s = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    s += [2.0 ** (-4.0 * (2 * k - 1) / n) for k in range(1, num_heads - n + 1)]
    return torch.tensor(s, dtype=torch.float64)


def rotate_ref(x, pos, rope_scale, rope_theta):
    """Llama RoPE in fp64: x [L, H, D] at positions [L], pairs (d, d + D/2)."""
    half = x.shape[-1] // 2
    inv = rope_theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    ang = pos.double()[:, None, None] * (inv / rope_scale)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


def attend_ref(q, k, v, mode="NONE", causal=False, window_left=-1, scale=None,
               rope_scale=1.0, rope_theta=1e4):
    """FlashInfer's attention of one request, fp64 on the CPU: q [Lq, Hq, D] (the last Lq
    of the Lk positions), k / v [Lk, Hkv, D] -> (out [Lq, Hq, D], natural LSE [Lq, Hq]);
    a row that sees no key: 0 and -inf."""
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    i, j = torch.arange(lq), torch.arange(lk)
    pos = i + lk - lq
    qd, kd, vd = q.double().cpu(), k.double().cpu(), v.double().cpu()
    if mode == "ROPE_LLAMA":
        qd = rotate_ref(qd, pos, rope_scale, rope_theta)
        kd = rotate_ref(kd, j, rope_scale, rope_theta)
    kd = kd.repeat_interleave(hq // hkv, dim=1)
    vd = vd.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * scale
    if mode == "ALIBI":
        s = s + slopes_ref(hq)[:, None, None] * (j[None, :] - i[:, None])
    seen = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        seen &= j[None, :] <= pos[:, None]
    if window_left >= 0:
        seen &= j[None, :] >= pos[:, None] - window_left
    s = s.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", w, vd), lse.t()


def batch_ref(q, qo, ks, vs, **kw):
    """attend_ref per request (q rows qo[b]:qo[b+1]), concatenated."""
    refs = [attend_ref(q[qo[b]:qo[b + 1]], ks[b], vs[b], **kw) for b in range(len(ks))]
    return torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs])


def merge_ref(a, b):
    """Two fp64 states (out, natural LSE) over disjoint keys -> one."""
    lse = torch.logaddexp(a[1], b[1])
    wa = torch.exp(a[1] - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(b[1] - lse).nan_to_num(0.0)[..., None]
    return wa * a[0] + wb * b[0], lse


def check(out, lse, ref, dtype, lse_tol=None):
    """out against the reference at dtype's tolerance; lse is base 2 (FlashInfer's)."""
    assert_close(out.cpu(), ref[0].to(dtype), scale=2.0)
    tol = lse_tol or {F32: 1e-4, F16: 1e-2, BF16: 4e-2}[dtype]
    assert lse.dtype == F32 and lse.shape == ref[1].shape
    torch.testing.assert_close(lse.cpu(), (ref[1] * LOG2E).float(), atol=tol, rtol=1e-3)


def rnd(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def paged(lens, page_size, hkv, d, dtype, layout, single, gen, device):
    """Random K / V per request written into shuffled pages (unused slots random).
    Returns (cache: a [P, 2, ...] tensor or a (k, v) tuple, [K_b], [V_b], indptr, indices,
    last_page_len)."""
    npages = [-(-n // page_size) for n in lens]
    total = sum(npages) + 1
    indices = torch.randperm(total, generator=gen)[:sum(npages)]
    indptr = torch.tensor([0, *torch.tensor(npages).cumsum(0).tolist()])
    last = torch.tensor([n - (m - 1) * page_size if m else 0 for n, m in zip(lens, npages)])
    kc = torch.randn(total, page_size, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(total, page_size, hkv, d, generator=gen).to(dtype)
    ks = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lens]
    for b, n in enumerate(lens):
        p = torch.arange(n)
        kc[indices[indptr[b] + p // page_size], p % page_size] = ks[b]
        vc[indices[indptr[b] + p // page_size], p % page_size] = vs[b]
    if layout == "HND":
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    cache = (torch.stack([kc, vc], 1).to(device) if single
             else (kc.to(device), vc.to(device)))
    ints = [t.to(torch.int32).to(device) for t in (indptr, indices, last)]
    return (cache, ks, vs, *ints)


def snapshot(cache):
    return [t.clone() for t in cache] if isinstance(cache, tuple) else [cache.clone()]


def unchanged(cache, before):
    now = list(cache) if isinstance(cache, tuple) else [cache]
    assert all(torch.equal(a, b) for a, b in zip(now, before)), "the cache was written"


def ws(device):
    return torch.empty(1024, dtype=torch.uint8, device=device)


def indptr(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


# ------------------------------------------------------------------------------ ALIBI


def test_alibi_slopes_are_flashinfers():
    for h in (1, 2, 3, 4, 5, 6, 7, 8, 12, 32, 40):
        got = fi._alibi_slopes(h, torch.device("cpu"))
        assert got.dtype == F32 and got.shape == (h,)
        torch.testing.assert_close(got, slopes_ref(h).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seq_len,hq,hkv,layout,dtype", [
    (1, 4, 4, "NHD", F16), (9, 6, 2, "HND", BF16), (40, 8, 1, "NHD", F32),
    (33, 3, 3, "HND", F16)])
def test_single_decode_alibi(device, seq_len, hq, hkv, layout, dtype):
    """test_alibi.py's decode recipe: the query after seq_len keys, bias slope * j."""
    gen = torch.Generator().manual_seed(seq_len)
    q, k, v = (rnd(s, gen, dtype, device) for s in ((hq, 16), (seq_len, hkv, 16),
                                                    (seq_len, hkv, 16)))
    kl, vl = (t.transpose(0, 1) for t in (k, v)) if layout == "HND" else (k, v)
    out, lse = fi.single_decode_with_kv_cache(q, kl, vl, kv_layout=layout,
                                              pos_encoding_mode="ALIBI", return_lse=True)
    ref = attend_ref(q[None], k, v, "ALIBI")
    check(out[None], lse[None], ref, dtype)


@pytest.mark.parametrize("q_len,kv_len,causal,window,dtype", [
    (1, 17, False, -1, F32), (17, 17, True, -1, F16), (17, 17, False, -1, BF16),
    (5, 33, True, -1, F32), (5, 33, False, -1, F16), (9, 4, False, -1, F32),
    (9, 4, True, -1, F32), (12, 20, True, 5, F16)])
def test_single_prefill_alibi(device, q_len, kv_len, causal, window, dtype):
    """test_alibi.py's prefill recipe (queries the last q_len of kv_len positions, causal
    bottom-right) plus q_len > kv_len and a window; GQA."""
    gen = torch.Generator().manual_seed(q_len * 100 + kv_len)
    q = rnd((q_len, 4, 16), gen, dtype, device)
    k, v = rnd((kv_len, 2, 16), gen, dtype, device), rnd((kv_len, 2, 16), gen, dtype, device)
    out, lse = fi.single_prefill_with_kv_cache(q, k, v, causal=causal, window_left=window,
                                               pos_encoding_mode="ALIBI", return_lse=True)
    check(out, lse, attend_ref(q, k, v, "ALIBI", causal, window), dtype)


@pytest.mark.parametrize("page_size,layout,single,window,dtype", [
    (3, "NHD", False, -1, F16), (16, "HND", True, 4, F32), (1, "HND", False, -1, BF16)])
def test_batch_decode_alibi(device, page_size, layout, single, window, dtype):
    """The decode wrapper over a paged cache (empty request, partial pages, GQA)."""
    gen = torch.Generator().manual_seed(page_size)
    lens = [0, 1, 7, 20]
    cache, ks, vs, ptr, idx, last = paged(lens, page_size, 2, 16, dtype, layout, single,
                                          gen, device)
    q = rnd((4, 6, 16), gen, dtype, device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws(device), layout)
    w.plan(ptr, idx, last, 6, 2, 16, page_size, pos_encoding_mode="ALIBI",
           window_left=window, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    ref = batch_ref(q, list(range(5)), ks, vs, mode="ALIBI", causal=True,
                    window_left=window)
    check(out, lse, ref, dtype)
    w.plan(ptr, idx, last, 6, 2, 16, page_size, q_data_type=dtype)       # "NONE"
    out2, lse2 = w.forward_return_lse(q, cache, pos_encoding_mode="ALIBI",
                                      window_left=window)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("kind", ["paged", "ragged"])
@pytest.mark.parametrize("causal,window,dtype", [(True, -1, F16), (False, -1, F32),
                                                 (True, 3, BF16), (False, -1, F16)])
def test_batch_prefill_alibi(device, kind, causal, window, dtype):
    """Paged and ragged prefill: query rows are the last of their request's keys; the
    bias uses each row's index within its request (not its position)."""
    gen = torch.Generator().manual_seed(int(causal) * 10 + window + 7)
    qlens, klens = [3, 0, 7, 1], [5, 0, 7, 18]
    qo = indptr(qlens, device)
    q = rnd((sum(qlens), 4, 8), gen, dtype, device)
    if kind == "paged":
        cache, ks, vs, ptr, idx, last = paged(klens, 4, 2, 8, dtype, "NHD", False, gen,
                                              device)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws(device))
        w.plan(qo, ptr, idx, last, 4, 2, 8, 4, causal=causal, window_left=window,
               pos_encoding_mode="ALIBI", q_data_type=dtype)
        out, lse = w.run(q, cache, return_lse=True)
    else:
        ks = [rnd((n, 2, 8), gen, dtype, device) for n in klens]
        vs = [rnd((n, 2, 8), gen, dtype, device) for n in klens]
        w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws(device), "HND")
        w.plan(qo, indptr(klens, device), 4, 2, 8, causal=causal, window_left=window,
               pos_encoding_mode="ALIBI", q_data_type=dtype)
        out, lse = w.run(q, torch.cat(ks).transpose(0, 1), torch.cat(vs).transpose(0, 1),
                         return_lse=True)
    ref = batch_ref(q, qo.tolist(), ks, vs, mode="ALIBI", causal=causal,
                    window_left=window)
    check(out, lse, ref, dtype)


def test_alibi_refusals(device):
    """What the ops cannot reproduce exactly is refused by name."""
    q, k = torch.randn(3, 4, 8, device=device), torch.randn(5, 2, 8, device=device)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        fi.single_prefill_with_kv_cache(q, k, k, pos_encoding_mode="ALIBI",
                                        logits_soft_cap=5.0)
    with pytest.raises(ValueError, match="window_left"):
        fi.single_prefill_with_kv_cache(q, k, k, pos_encoding_mode="ALIBI", window_left=2)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws(device))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        w.plan(indptr([3], device), indptr([5], device), 4, 2, 8, causal=True,
               pos_encoding_mode="ALIBI", logits_soft_cap=2.0, q_data_type=F32)
    w.plan(indptr([3], device), indptr([5], device), 4, 2, 8, causal=True,
           pos_encoding_mode="ALIBI", q_data_type=F32)
    with pytest.raises(ValueError, match="sinks"):
        w.run(q, k, k, sinks=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        fi.single_decode_with_kv_cache(q[0], k, k, pos_encoding_mode="alibi")


# ------------------------------------------------------------------------- ROPE_LLAMA


@pytest.mark.parametrize("layout,rope_scale,rope_theta,dtype", [
    ("NHD", None, None, F32), ("HND", 2.0, 500.0, F16)])
def test_single_decode_rope(device, layout, rope_scale, rope_theta, dtype):
    """q at kv_len - 1, key j at j; q and k are not written."""
    gen = torch.Generator().manual_seed(3)
    q = rnd((4, 16), gen, dtype, device)
    k, v = rnd((13, 2, 16), gen, dtype, device), rnd((13, 2, 16), gen, dtype, device)
    kl, vl = (t.transpose(0, 1) for t in (k, v)) if layout == "HND" else (k, v)
    q0, k0 = q.clone(), k.clone()
    out, lse = fi.single_decode_with_kv_cache(q, kl, vl, kv_layout=layout,
                                              pos_encoding_mode="ROPE_LLAMA",
                                              rope_scale=rope_scale, rope_theta=rope_theta,
                                              return_lse=True)
    ref = attend_ref(q[None], k, v, "ROPE_LLAMA", rope_scale=rope_scale or 1.0,
                     rope_theta=rope_theta or 1e4)
    check(out[None], lse[None], ref, dtype)
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize("q_len,kv_len,causal,dtype", [(6, 19, True, BF16),
                                                       (6, 19, False, F32),
                                                       (19, 19, True, F16)])
def test_single_prefill_rope(device, q_len, kv_len, causal, dtype):
    gen = torch.Generator().manual_seed(q_len + kv_len)
    q = rnd((q_len, 4, 32), gen, dtype, device)
    k, v = rnd((kv_len, 1, 32), gen, dtype, device), rnd((kv_len, 1, 32), gen, dtype, device)
    out, lse = fi.single_prefill_with_kv_cache(q, k, v, causal=causal,
                                               pos_encoding_mode="ROPE_LLAMA",
                                               rope_theta=1e3, return_lse=True)
    check(out, lse, attend_ref(q, k, v, "ROPE_LLAMA", causal, rope_theta=1e3), dtype)


@pytest.mark.parametrize("page_size,layout,single,fp8", [(5, "HND", True, False),
                                                         (4, "NHD", False, True)])
def test_batch_decode_rope(device, page_size, layout, single, fp8):
    """The decode wrapper rotates copies of the planned requests' keys; the cache (fp8
    too: FlashInfer's decode rotates fp8 keys after casting) is not written."""
    gen = torch.Generator().manual_seed(page_size)
    lens = [0, 4, 17]
    dtype = F16
    cache, ks, vs, ptr, idx, last = paged(lens, page_size, 2, 16, dtype, layout, single,
                                          gen, device)
    kw = {}
    if fp8:
        cache = tuple(t.to(torch.float8_e4m3fn) for t in cache)
        ks = [t.to(torch.float8_e4m3fn).to(F32) * 0.5 for t in ks]
        vs = [t.to(torch.float8_e4m3fn).to(F32) * 2.0 for t in vs]
        kw = dict(k_scale=0.5, v_scale=2.0)
    q = rnd((3, 4, 16), gen, dtype, device)
    before = snapshot(cache)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws(device), layout)
    w.plan(ptr, idx, last, 4, 2, 16, page_size, pos_encoding_mode="ROPE_LLAMA",
           rope_scale=1.5, rope_theta=1e3, q_data_type=dtype,
           kv_data_type=torch.float8_e4m3fn if fp8 else None)
    out, lse = w.run(q, cache, return_lse=True, **kw)
    unchanged(cache, before)
    ref = batch_ref(q, list(range(4)), ks, vs, mode="ROPE_LLAMA", causal=True,
                    rope_scale=1.5, rope_theta=1e3)
    check(out, lse, ref, dtype)


@pytest.mark.parametrize("kind", ["paged", "ragged"])
@pytest.mark.parametrize("causal,window,dtype", [(True, -1, F16), (False, -1, BF16),
                                                 (True, 4, F32)])
def test_batch_prefill_rope(device, kind, causal, window, dtype):
    """Paged and ragged prefill with ROPE_LLAMA (rope_scale 2, rope_theta 1e3), GQA:
    query row i of a request at kv_len - qo_len + i; the caller's cache / k untouched."""
    gen = torch.Generator().manual_seed(int(causal) + window + 20)
    qlens, klens = [4, 0, 9, 2], [6, 3, 9, 21]
    qo = indptr(qlens, device)
    q = rnd((sum(qlens), 4, 16), gen, dtype, device)
    pe = dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, rope_theta=1e3)
    if kind == "paged":
        cache, ks, vs, ptr, idx, last = paged(klens, 3, 2, 16, dtype, "HND", False, gen,
                                              device)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws(device), "HND")
        w.plan(qo, ptr, idx, last, 4, 2, 16, 3, causal=causal, window_left=window,
               q_data_type=dtype, **pe)
    else:
        ks = [rnd((n, 2, 16), gen, dtype, device) for n in klens]
        vs = [rnd((n, 2, 16), gen, dtype, device) for n in klens]
        cache = (torch.cat(ks), torch.cat(vs))
        w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws(device))
        w.plan(qo, indptr(klens, device), 4, 2, 16, causal=causal, window_left=window,
               q_data_type=dtype, **pe)
    before, q0 = snapshot(cache), q.clone()
    out, lse = w.run(q, *((cache,) if kind == "paged" else cache), return_lse=True)
    unchanged(cache, before)
    assert torch.equal(q, q0)
    ref = batch_ref(q, qo.tolist(), ks, vs, mode="ROPE_LLAMA", causal=causal,
                    window_left=window, rope_scale=2.0, rope_theta=1e3)
    check(out, lse, ref, dtype)
    # FlashInfer's deprecated forward takes the mode and the RoPE parameters per call
    w.plan(*((qo, ptr, idx, last, 4, 2, 16, 3) if kind == "paged"
             else (qo, indptr(klens, device), 4, 2, 16)), q_data_type=dtype)
    got = w.forward_return_lse(q, *((cache,) if kind == "paged" else cache), causal=causal,
                               window_left=window, **pe)
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)


def test_rope_refusals(device):
    q, k = torch.randn(3, 2, 7, device=device), torch.randn(5, 2, 7, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        fi.single_prefill_with_kv_cache(q, k, k, pos_encoding_mode="ROPE_LLAMA")
    q, k = torch.randn(3, 2, 8, device=device), torch.randn(5, 2, 8, device=device)
    with pytest.raises(ValueError, match="rope_scale"):
        fi.single_prefill_with_kv_cache(q, k, k, pos_encoding_mode="ROPE_LLAMA",
                                        rope_scale=0.0)
    with pytest.raises(TypeError, match="rope_theta"):
        fi.single_decode_with_kv_cache(q[0], k, k, pos_encoding_mode="ROPE_LLAMA",
                                       rope_theta="1e4")


# ---------------------------------------------------------------------------- cascade


@pytest.mark.parametrize("mode", ["ALIBI", "ROPE_LLAMA"])
def test_cascade_levels_take_the_mode(device, mode):
    """A 2-level cascade (a shared prefix for all queries, non-causal; each request's own
    pages, causal): FlashInfer plans every level with the mode, positions counted within
    each level's keys; the levels' states merge through the LSE."""
    gen = torch.Generator().manual_seed(5)
    prefix, suffix, qlens = 7, [5, 9], [2, 3]
    cache, ks, vs, ptr, idx, last = paged([prefix, *suffix], 4, 1, 16, F32, "NHD", True,
                                          gen, device)
    q = rnd((sum(qlens), 2, 16), gen, F32, device)
    ptr, last = ptr.tolist(), last.tolist()
    i32 = dict(dtype=torch.int32, device=device)
    w = fi.MultiLevelCascadeAttentionWrapper(2, ws(device))
    w.plan([torch.tensor([0, sum(qlens)], **i32), indptr(qlens, device)],
           [torch.tensor(ptr[:2], **i32), torch.tensor(ptr[1:], **i32) - ptr[1]],
           [idx[:ptr[1]], idx[ptr[1]:]],
           [torch.tensor(last[:1], **i32), torch.tensor(last[1:], **i32)],
           2, 1, 16, 4, causal=True, pos_encoding_mode=mode, rope_theta=500.0,
           q_data_type=F32)
    out = w.run(q, cache)
    kw = dict(mode=mode, rope_theta=500.0)
    shared = attend_ref(q, ks[0], vs[0], **kw)
    own = batch_ref(q, [0, 2, 5], ks[1:], vs[1:], causal=True, **kw)
    assert_close(out.cpu(), merge_ref(shared, own)[0].float(), scale=2.0)


# ----------------------------------------------------------------------------- triton


def test_modes_on_triton_kernels(device):
    """One small case per mode on the Triton kernels (the interpreter on the CPU): ALIBI
    decode, causal paged prefill and non-causal ragged prefill (per-row decodes over
    one-token pages); ROPE_LLAMA decode and paged prefill."""
    gen = torch.Generator().manual_seed(9)
    lens, qlens = [6, 3], [2, 3]
    cache, ks, vs, ptr, idx, last = paged(lens, 4, 1, 16, F32, "NHD", False, gen, device)
    qd = rnd((2, 2, 16), gen, F32, device)
    qp = rnd((5, 2, 16), gen, F32, device)
    qo = indptr(qlens, device)
    results = {}
    with mk.use_backend("triton"):
        for mode in ("ALIBI", "ROPE_LLAMA"):
            d = fi.BatchDecodeWithPagedKVCacheWrapper(ws(device))
            d.plan(ptr, idx, last, 2, 1, 16, 4, pos_encoding_mode=mode, q_data_type=F32)
            p = fi.BatchPrefillWithPagedKVCacheWrapper(ws(device))
            p.plan(qo, ptr, idx, last, 2, 1, 16, 4, causal=True, pos_encoding_mode=mode,
                   q_data_type=F32)
            results[mode] = (d.run(qd, cache, return_lse=True),
                             p.run(qp, cache, return_lse=True))
        r = fi.BatchPrefillWithRaggedKVCacheWrapper(ws(device))
        r.plan(qo, indptr(lens, device), 2, 1, 16, pos_encoding_mode="ALIBI",
               q_data_type=F32)
        ragged = r.run(qp, torch.cat(ks).to(device), torch.cat(vs).to(device),
                       return_lse=True)
    for mode, (dec, pre) in results.items():
        check(*dec, batch_ref(qd, [0, 1, 2], ks, vs, mode=mode, causal=True), F32)
        check(*pre, batch_ref(qp, [0, 2, 5], ks, vs, mode=mode, causal=True), F32)
    check(*ragged, batch_ref(qp, [0, 2, 5], ks, vs, mode="ALIBI"), F32)
