"""minikernels.compat.flashinfer: FlashInfer's unified ``BatchAttention`` and
``BatchAttentionWithAttentionSinkWrapper``.

FlashInfer's recipe (tests/attention/test_batch_attention.py: mixed decode / prefill
batches, page sizes, GQA, NHD / HND, causal or not, soft cap, v_scale, fp16 / bf16, and
its comparison with the paged prefill wrapper planned with last-page lengths), in this
file's own code and at CPU sizes, against fp64 attention written below on the raw K / V
the pages were filled from:

- request b's queries are the last qo_len of its kv_len tokens (bottom-right causal);
  ``kv_len_arr`` gives the kv lengths (partial last pages, empty requests, pages listed
  past a request's length are not read);
- the returned LSE is base 2 (natural LSE * log2 e), float32 [total_q, num_qo_heads];
  ``out`` / ``lse`` buffers are written in place; ``run()``'s soft cap is the one used;
- the sink wrapper: one more logit per q head (``softmax([s, sink])``, no value), the
  LSE including it, ``run()``'s sm_scale;
- one case on the Triton kernels (the interpreter on the CPU); errors name the argument.

All pages of a test live in one cache (shuffled page ids, unused slots random, so a wrong
page or length shows).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, paged_kv_cache_form

from minikernels.compat import flashinfer as fi

LOG2E = math.log2(math.e)

#: (kv_len, qo_len) per request: FlashInfer's configs' shapes at CPU sizes: decode only,
#: prefill only, decode + speculative / chunked prefill, a request with more queries
#: than keys, an empty request.
MIXED = [(37, 1), (16, 1), (1, 1), (50, 7), (33, 33), (5, 9), (0, 2), (20, 1)]
DECODE = [(29, 1)] * 4 + [(1, 1), (17, 1)]
PREFILL = [(41, 19), (26, 26)]


# ------------------------------------------------------------------------- reference


def attention_ref(q, ks, vs, qo_lens, *, causal, scale, cap=0.0, sink=None, v_scale=1.0):
    """fp64 attention per request. q [T, Hq, D] (requests back to back), ks / vs: one
    [kv_len, Hkv, D] per request. Query i of qo_len sits at kv_len - qo_len + i (causal:
    sees keys j <= that). Score ``scale * q.k``, capped to ``cap * tanh(s / cap)``;
    ``sink`` [Hq]: one more logit per head with no value. Returns (out fp64 [T, Hq, D]
    times v_scale, natural LSE fp64 [T, Hq]); a row with nothing to attend: 0, -inf."""
    hq, d = q.shape[1], q.shape[2]
    outs, lses, start = [], [], 0
    for k, v, lq in zip(ks, vs, qo_lens):
        qb = q[start:start + lq].double().cpu()
        start += lq
        lk, group = k.shape[0], hq // k.shape[1]
        kk = k.double().cpu().repeat_interleave(group, dim=1)
        vv = v.double().cpu().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kk) * scale
        if cap:
            s = cap * torch.tanh(s / cap)
        if causal:
            pos = torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(torch.arange(lk)[None, :] > pos, float("-inf"))
        if sink is not None:
            col = sink.double().cpu()[:, None, None].expand(hq, lq, 1)
            s = torch.cat([s, col], dim=2)
            vv = torch.cat([vv, vv.new_zeros(1, hq, d)])
        lse = torch.logsumexp(s, dim=-1)
        w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        outs.append(torch.einsum("hqk,khd->qhd", w, vv) * v_scale)
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses)


# ----------------------------------------------------------------------------- batch


class Batch:
    """Requests' raw q / K / V and one paged cache holding the K / V.

    ``pairs``: (kv_len, qo_len) per request; ``spare``: extra pages listed at the end of
    request 0's page list (not read: past its kv_len)."""

    def __init__(self, pairs, *, page_size, hq, hkv, d, dtype, seed, spare=0):
        gen = torch.Generator().manual_seed(seed)
        self.page_size, self.hq, self.hkv, self.d, self.dtype = page_size, hq, hkv, d, dtype
        self.kv_lens = [kv for kv, _ in pairs]
        self.qo_lens = [qo for _, qo in pairs]
        need = [-(-kv // page_size) for kv in self.kv_lens]
        num_pages = sum(need) + spare + 3
        self.k_pages = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
        self.v_pages = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
        free = torch.randperm(num_pages, generator=gen).tolist()
        self.ks, self.vs, self.page_lists = [], [], []
        for kv, n in zip(self.kv_lens, need):
            k = torch.randn(kv, hkv, d, generator=gen).to(dtype)
            v = torch.randn(kv, hkv, d, generator=gen).to(dtype)
            pages = [free.pop() for _ in range(n)]
            for j, p in enumerate(pages):
                part = slice(j * page_size, min(kv, (j + 1) * page_size))
                self.k_pages[p, :part.stop - part.start] = k[part]
                self.v_pages[p, :part.stop - part.start] = v[part]
            self.ks.append(k)
            self.vs.append(v)
            self.page_lists.append(pages)
        self.page_lists[0] += [free.pop() for _ in range(spare)]
        self.q = torch.randn(sum(self.qo_lens), hq, d, generator=gen).to(dtype)

    def plan_inputs(self, device, idx_dtype=torch.int32):
        """(qo_indptr, kv_indptr, kv_indices, kv_len_arr), FlashInfer's."""
        def t(x):
            return torch.tensor(x, dtype=idx_dtype, device=device)
        qo = [0]
        for n in self.qo_lens:
            qo.append(qo[-1] + n)
        ptr = [0]
        for p in self.page_lists:
            ptr.append(ptr[-1] + len(p))
        idx = [p for pages in self.page_lists for p in pages]
        return t(qo), t(ptr), t(idx), t(self.kv_lens)

    def cache(self, layout, form, device, dtype=None):
        """The cache in FlashInfer's forms: one [P, 2, ...] tensor or a (k, v) tuple of
        strided views (their own offsets and strides); HND transposes pages."""
        k, v = self.k_pages, self.v_pages
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        return paged_kv_cache_form(k, v, layout, form, device)

    def ref(self, **kwargs):
        kwargs.setdefault("scale", 1.0 / math.sqrt(self.d))
        return attention_ref(self.q, self.ks, self.vs, self.qo_lens, **kwargs)


def planned(batch, device, layout="NHD", *, causal=False, idx_dtype=torch.int32, **kwargs):
    w = fi.BatchAttention(kv_layout=layout, device=device)
    kwargs.setdefault("q_data_type", batch.dtype)
    kwargs.setdefault("kv_data_type", batch.dtype)
    w.plan(*batch.plan_inputs(device, idx_dtype), batch.hq, batch.hkv, batch.d, batch.d,
           batch.page_size, causal=causal, **kwargs)
    return w


def check(out, lse, ref_out, ref_lse, dtype, scale=2.0):
    """out against the reference in out's dtype; lse float32, base 2 (-inf rows equal)."""
    assert_close(out.cpu(), ref_out.to(dtype), scale=scale)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse.cpu(), (ref_lse * LOG2E).float(), atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cap", [0.0, 50.0])
def test_batch_attention_matches_reference(device, page_size, layout, causal, cap):
    """FlashInfer's recipe: a mixed decode / prefill batch (one decode request with a
    single token, one with more queries than keys, an empty one), GQA groups 1 / 4 / 3,
    both cache forms, fp16 / bf16, v_scale, against fp64 attention; the LSE base 2."""
    case = (page_size == 16) * 4 + (layout == "HND") * 2 + causal
    hq, hkv = [(4, 4), (8, 2), (6, 2), (4, 1)][case % 4]
    dtype = [torch.float16, torch.bfloat16][case % 2]
    v_scale = 2.0 if case % 3 == 0 else None
    b = Batch(MIXED, page_size=page_size, hq=hq, hkv=hkv, d=32, dtype=dtype, seed=case)
    w = planned(b, device, layout, causal=causal, logits_soft_cap=cap or None)
    out, lse = w.run(b.q.to(device), b.cache(layout, ["single", "tuple"][case % 2], device),
                     v_scale=v_scale, logits_soft_cap=cap)
    assert out.shape == b.q.shape and out.dtype == dtype and out.device.type == device
    ref_out, ref_lse = b.ref(causal=causal, cap=cap, v_scale=v_scale or 1.0)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("pairs", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_decode_only_and_prefill_only_batches(device, pairs):
    """The recipe's decode-only and prefill-only batches (causal, page 16, GQA 4, int64
    indptrs), and FlashInfer's own check: the same as BatchPrefillWithPagedKVCacheWrapper
    planned with last_page_len = (kv_len - 1) % page_size + 1."""
    b = Batch(pairs, page_size=16, hq=8, hkv=2, d=64, dtype=torch.bfloat16, seed=3)
    cache = b.cache("NHD", "single", device)
    w = planned(b, device, causal=True, idx_dtype=torch.int64)
    out, lse = w.run(b.q.to(device), cache)
    check(out, lse, *b.ref(causal=True), torch.bfloat16)
    qo, ptr, idx, kv_len = b.plan_inputs(device)
    old = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty(8, dtype=torch.uint8,
                                                             device=device))
    old.plan(qo, ptr, idx, (kv_len - 1) % 16 + 1, 8, 2, 64, 16, causal=True,
             q_data_type=torch.bfloat16)
    old_out, old_lse = old.run(b.q.to(device), cache, return_lse=True)
    torch.testing.assert_close(out, old_out)
    torch.testing.assert_close(lse, old_lse)


def test_out_and_lse_buffers_written_in_place(device):
    """run(out=, lse=) writes the caller's buffers and returns them (FlashInfer's); the
    LSE is log2(sum_j 2^(s_j log2 e)), float32 [total_q, num_qo_heads]."""
    b = Batch(MIXED[:5], page_size=16, hq=4, hkv=2, d=16, dtype=torch.float16, seed=5)
    w = planned(b, device, "HND", causal=True)
    out_buf = torch.full_like(b.q, float("nan"), device=device)
    lse_buf = torch.full((b.q.shape[0], 4), float("nan"), device=device)
    out, lse = w.run(b.q.to(device), b.cache("HND", "tuple", device), out=out_buf,
                     lse=lse_buf)
    assert out is out_buf and lse is lse_buf
    ref_out, ref_lse = b.ref(causal=True)
    check(out_buf, lse_buf, ref_out, ref_lse, torch.float16)
    # the base, by hand: request 0 is a decode over 37 keys; q head 0 reads kv head 0
    scores = b.ks[0][:, 0].double() @ b.q[0, 0].double() / math.sqrt(16)
    want = math.log2(torch.exp2(scores * LOG2E).sum().item())
    assert abs(lse_buf[0, 0].item() - want) < 1e-3


def test_kv_len_arr_replaces_last_page_len(device):
    """kv_len_arr is each request's token count: partial last pages, an empty request, a
    request listing more pages than its kv_len needs (FlashInfer's kernel reads only the
    tokens below kv_len: the spare pages, random, must not count); int64 lengths."""
    pairs = [(5, 1), (0, 1), (16, 3), (17, 2), (3, 3)]
    b = Batch(pairs, page_size=4, hq=2, hkv=1, d=8, dtype=torch.float32, seed=7, spare=2)
    assert len(b.page_lists[0]) == 2 + 2                      # 5 tokens: 2 pages, + 2
    qo, ptr, idx, _ = b.plan_inputs(device)
    w = fi.BatchAttention("NHD", device)
    w.plan(qo, ptr, idx, torch.tensor(b.kv_lens, device=device), 2, 1, 8, 8, 4,
           q_data_type=torch.float32, kv_data_type=torch.float32)
    out, lse = w.run(b.q.to(device), b.cache("NHD", "single", device))
    ref_out, ref_lse = b.ref(causal=False)
    check(out, lse, ref_out, ref_lse, torch.float32, scale=1.0)
    assert torch.all(out[1].cpu() == 0) and torch.all(lse[1].cpu() == float("-inf"))


def test_soft_cap_and_scales(device):
    """run()'s logits_soft_cap is the one used (plan's only enables it, as in FlashInfer);
    sm_scale; k_scale folds into the scores, v_scale into the output (numbers or
    1-element tensors)."""
    b = Batch(MIXED[:4], page_size=16, hq=4, hkv=2, d=16, dtype=torch.float32, seed=11)
    w = planned(b, device, causal=True, logits_soft_cap=50.0, sm_scale=0.3)
    out, lse = w.run(b.q.to(device), b.cache("NHD", "single", device), logits_soft_cap=2.0,
                     k_scale=torch.tensor([1.5]), v_scale=0.5)
    ref_out, ref_lse = b.ref(causal=True, cap=2.0, scale=0.3 * 1.5, v_scale=0.5)
    check(out, lse, ref_out, ref_lse, torch.float32, scale=1.0)


def test_fp8_cache_with_scales(device):
    """FlashInfer's per-tensor fp8 recipe: an e4m3 cache with k_scale / v_scale equals
    attention over the dequantized K / V."""
    b = Batch(MIXED[:5], page_size=16, hq=4, hkv=2, d=16, dtype=torch.float16, seed=13)
    k_scale, v_scale = 0.02, 0.03
    fp8 = torch.float8_e4m3fn
    kq = (b.k_pages.float() / k_scale).to(fp8)
    vq = (b.v_pages.float() / v_scale).to(fp8)
    w = planned(b, device, causal=True, kv_data_type=fp8)
    out, lse = w.run(b.q.to(device), (kq.to(device), vq.to(device)), k_scale=k_scale,
                     v_scale=v_scale)
    b.k_pages, b.v_pages = kq.float() * k_scale, vq.float() * v_scale
    b.ks = [b.k_pages[p].flatten(0, 1)[:n] for p, n in zip(b.page_lists, b.kv_lens)]
    b.vs = [b.v_pages[p].flatten(0, 1)[:n] for p, n in zip(b.page_lists, b.kv_lens)]
    check(out, lse, *b.ref(causal=True), torch.float16)


def test_on_triton_kernels(device):
    """One small mixed batch on the Triton kernels (the interpreter on the CPU)."""
    import minikernels as mk

    b = Batch([(6, 1), (9, 3)], page_size=4, hq=2, hkv=1, d=16, dtype=torch.float32, seed=17)
    with mk.use_backend("triton"):
        w = planned(b, device, "HND", causal=True)
        out, lse = w.run(b.q.to(device), b.cache("HND", "tuple", device))
    check(out, lse, *b.ref(causal=True), torch.float32, scale=1.0)


def test_namespaces():
    assert fi.attention.BatchAttention is fi.BatchAttention
    assert (fi.attention.BatchAttentionWithAttentionSinkWrapper
            is fi.BatchAttentionWithAttentionSinkWrapper)
    assert issubclass(fi.BatchAttentionWithAttentionSinkWrapper,
                      fi.BatchPrefillWithPagedKVCacheWrapper)
    assert {"BatchAttention", "BatchAttentionWithAttentionSinkWrapper",
            "attention"} <= set(fi.__all__)


def test_errors_name_the_argument(device):
    b = Batch([(5, 1), (9, 2)], page_size=4, hq=4, hkv=2, d=8, dtype=torch.float16, seed=19)
    qo, ptr, idx, kv_len = b.plan_inputs(device)
    cache = b.cache("NHD", "single", device)
    q = b.q.to(device)

    def plan(**kw):
        w = fi.BatchAttention(device=device)
        args = dict(qo_indptr=qo, kv_indptr=ptr, kv_indices=idx, kv_len_arr=kv_len,
                    num_qo_heads=4, num_kv_heads=2, head_dim_qk=8, head_dim_vo=8,
                    page_size=4, q_data_type=torch.float16, kv_data_type=torch.float16)
        args.update(kw)
        w.plan(**args)
        return w

    with pytest.raises(ValueError, match="kv_layout"):
        fi.BatchAttention("NDH", device)
    with pytest.raises(ValueError, match="device"):
        fi.BatchAttention("NHD", "nonsense")
    with pytest.raises(RuntimeError, match="plan"):
        fi.BatchAttention(device=device).run(q, cache)
    with pytest.raises(ValueError, match="use_profiler"):
        plan(use_profiler=True)
    with pytest.raises(ValueError, match="head_dim_vo"):
        plan(head_dim_vo=16)
    with pytest.raises(ValueError, match="head_dim_qk"):
        plan(head_dim_qk=0, head_dim_vo=0)
    with pytest.raises(ValueError, match="kv_data_type"):      # FlashInfer's default: bf16
        plan(kv_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match=r"kv_len_arr\[1\] = 13"):   # 13 tokens, 3 pages
        plan(kv_len_arr=kv_len + torch.tensor([0, 4], dtype=kv_len.dtype, device=device))
    with pytest.raises(ValueError, match="kv_len_arr"):
        plan(kv_len_arr=kv_len[:1])
    with pytest.raises(ValueError, match="kv_len_arr"):
        plan(kv_len_arr=-kv_len)
    with pytest.raises(TypeError, match="kv_len_arr"):
        plan(kv_len_arr=kv_len.float())
    with pytest.raises(ValueError, match="kv_indptr"):
        plan(kv_indptr=ptr.flip(0))
    with pytest.raises(ValueError, match="qo_indptr"):
        plan(qo_indptr=qo[:2])
    with pytest.raises(ValueError, match="page_size"):
        plan(page_size=0)
    w = plan()
    with pytest.raises(ValueError, match="kv_cache_sf"):
        w.run(q, cache, kv_cache_sf=torch.ones(1, device=device))
    with pytest.raises(ValueError, match="logits_soft_cap"):      # FlashInfer's check
        w.run(q, cache, logits_soft_cap=30.0)
    with pytest.raises(ValueError, match="q"):
        w.run(q.float(), cache)
    with pytest.raises(ValueError, match="kv_cache"):
        w.run(q, cache[:, :, :2])
    with pytest.raises(ValueError, match="kv_cache"):
        w.run(q, [cache])
    with pytest.raises(TypeError, match="kv_cache"):
        w.run(q, "kv_cache")
    with pytest.raises(ValueError, match="kv_indices"):           # page id out of range
        w.run(q, cache[:2])
    with pytest.raises(ValueError, match="out"):
        w.run(q, cache, out=torch.empty(2, 4, 8, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match="lse"):
        w.run(q, cache, lse=torch.empty(q.shape[0], 4, dtype=torch.float16, device=device))
    capped = plan(logits_soft_cap=30.0)
    with pytest.raises(ValueError, match="logits_soft_cap"):     # run() without the cap
        capped.run(q, cache)


# --------------------------------------------------------------------- attention sinks


def sink_wrapper(batch, device, **plan_kwargs):
    w = fi.BatchAttentionWithAttentionSinkWrapper(
        torch.empty(8, dtype=torch.uint8, device=device), kv_layout="HND", backend="fa2",
        q_data_type=batch.dtype, kv_data_type=batch.dtype, head_dim_qk=batch.d,
        head_dim_vo=batch.d)
    qo, ptr, idx, kv_len = batch.plan_inputs(device)
    last = torch.where(kv_len > 0, (kv_len - 1) % batch.page_size + 1, 0)
    w.plan(qo, ptr, idx, last, batch.hq, batch.hkv, batch.d, batch.page_size, causal=True,
           q_data_type=batch.dtype, kv_data_type=batch.dtype, **plan_kwargs)
    return w


def test_sink_wrapper_matches_reference(device):
    """run(q, cache, sink, sm_scale) (FlashInfer's positional form) over a mixed batch:
    softmax with one more logit per q head and no value; the LSE includes it; run()'s
    sm_scale is the one used; sinks= is taken too."""
    b = Batch(MIXED[:6], page_size=16, hq=4, hkv=2, d=16, dtype=torch.bfloat16, seed=23)
    sink = torch.tensor([0.5, -1.0, 2.0, 4.0], device=device)
    cache = b.cache("HND", "single", device)
    w = sink_wrapper(b, device)
    out, lse = w.run(b.q.to(device), cache, sink, 0.2, return_lse=True)
    check(out, lse, *b.ref(causal=True, scale=0.2, sink=sink), torch.bfloat16)
    out2 = w.run(b.q.to(device), cache, sinks=sink)             # planned sm_scale: 1/4
    assert_close(out2.cpu(), b.ref(causal=True, sink=sink)[0].to(torch.bfloat16), scale=2.0)


def test_sink_wrapper_errors(device):
    b = Batch(MIXED[:3], page_size=16, hq=4, hkv=2, d=16, dtype=torch.float16, seed=29)
    ws = torch.empty(8, dtype=torch.uint8, device=device)
    cls = fi.BatchAttentionWithAttentionSinkWrapper
    with pytest.raises(ValueError, match="backend"):
        cls(ws, backend="trtllm-gen")
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        cls(ws, pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(ValueError, match="head_dim_vo"):
        cls(ws, head_dim_qk=64, head_dim_vo=128)
    with pytest.raises(TypeError, match="q_data_type"):
        cls(ws, q_data_type=3)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        sink_wrapper(b, device, logits_soft_cap=20.0)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        sink_wrapper(b, device, pos_encoding_mode="ALIBI")
    w = sink_wrapper(b, device)
    q, cache = b.q.to(device), b.cache("HND", "single", device)
    sink = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="sink"):
        w.run(q, cache)
    with pytest.raises(ValueError, match="sink"):
        w.run(q, cache, torch.zeros(3, device=device), 0.25)
    with pytest.raises(ValueError, match="sinks"):
        w.run(q, cache, sink, sinks=sink)
    with pytest.raises(ValueError, match="sm_scale"):
        w.run(q, cache, sink, -1.0)
    w.run(q, cache, sink, 0.25)                 # a failed run leaves the plan usable
