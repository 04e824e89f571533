"""minikernels.compat.vllm_attention: vLLM's Triton attention entry points
(unified_attention, context_attention_fwd, decode_attention_fwd) checked against an
independent fp64 reference written here.

The recipes are vLLM's own tests, scaled down (tests/kernels/attention/
test_triton_unified_attention.py, test_prefix_prefill.py, test_triton_decode_attention.py):
random paged caches read through random block tables, sequences given as (new tokens,
tokens in the cache), a decode in every batch, GQA / MQA, sliding windows, softcap, ALiBi,
sinks, fp8 caches with descales. The reference (``ref_seq``) follows vLLM's
``ref_paged_attn``: gather each sequence's keys, scores q.k * scale, softcap, a causal mask
aligned to the last key, a window, ALiBi as vLLM's unified kernel adds it
(slope * (key - context_len)), one sink logit per head, softmax, @ v.

The CPU runs the reference backend; one small case per entry point also runs the Triton
kernels under the interpreter (the views built here: split-off k / v caches of vLLM's
[num_blocks, 2, ...] layout, pages over 256 tokens, token buffers cut into pages).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.compat import vllm_attention as va

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
#: where the entry points run (the GPU when present); references run on the CPU in fp64
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
          ) -> None:
    tol = TOL[dtype] * scale
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), atol=tol, rtol=tol)


# ------------------------------------------------------------------------ reference


def ref_seq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
            causal: bool = True, window: int = -1, softcap: float = 0.0,
            alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in fp64: q [Lq, Hq, D] (its new tokens, the last Lq of its Lk keys),
    k, v [Lk, Hkv, D] -> (out [Lq, Hq, D], lse [Lq, Hq] of the scores without the sink).
    window >= 0: a query at position p sees keys j with p - j <= window."""
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    qd = q.double()
    kd = k.double().repeat_interleave(hq // hkv, dim=1)
    vd = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    ctx = lk - lq
    pos = (ctx + torch.arange(lq)).view(-1, 1)
    key = torch.arange(lk).view(1, -1)
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        visible &= key <= pos
    if window >= 0:
        visible &= pos - key <= window
    if alibi is not None:
        s = s + alibi.double().view(hq, 1, 1) * (key - ctx)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1).t()                                 # [Lq, Hq]
    if sinks is not None:
        sink_col = sinks.double().view(hq, 1, 1).expand(hq, lq, 1)
        s = torch.cat([s, sink_col], dim=-1)
    p = torch.nan_to_num(torch.softmax(s, dim=-1))[..., :lk]         # no key: zeros
    return torch.einsum("hqk,khd->qhd", p, vd), lse


def gather(cache: torch.Tensor, row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence of a [num_blocks, block, H, D] cache."""
    bs = cache.shape[1]
    pos = torch.arange(length)
    return cache.cpu()[row.cpu().long()[pos // bs], pos % bs]


def paged(kv_lens: list[int], block: int, hkv: int, d: int, dtype: torch.dtype,
          extra_blocks: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's recipe: random caches [num_blocks, block, Hkv, D] (the k and v views of one
    [num_blocks, 2, block, Hkv, D] tensor, as vLLM's backend splits its cache) and a random
    block table (torch.randint: blocks may repeat)."""
    width = max(1, max(-(-n // block) for n in kv_lens))
    num_blocks = len(kv_lens) * width + extra_blocks
    kv = torch.randn(num_blocks, 2, block, hkv, d).to(dtype)
    table = torch.randint(0, num_blocks, (len(kv_lens), width), dtype=torch.int32)
    k, v = kv.to(DEV).unbind(1)
    return k, v, table.to(DEV)


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


def alibi_slopes(h: int) -> torch.Tensor:
    """vLLM's test recipe (BLOOM's slopes)."""
    p2 = 2 ** math.floor(math.log2(h))
    base = 2 ** (-(2 ** -(math.log2(p2) - 3)))
    slopes = [base ** i for i in range(1, p2 + 1)]
    if p2 != h:
        extra = 2 ** (-(2 ** -(math.log2(2 * p2) - 3)))
        slopes += [extra ** i for i in range(1, 2 * (h - p2), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


# ------------------------------------------------------------------- unified_attention


def run_unified(seq_lens: list[tuple[int, int]], heads: tuple[int, int], d: int, block: int,
                dtype: torch.dtype, *, window: int | None = None, softcap: float = 0.0,
                alibi: bool = False, sinks: bool = False, fp8: torch.dtype | None = None,
                out_fp8: bool = False, extra_rows: int = 0, check: bool = True,
                scratch: bool = False) -> torch.Tensor:
    """vLLM's test_triton_unified_attn, scaled down: builds the case, runs
    unified_attention into a NaN-poisoned strided ``out`` and checks it against ref_seq.
    extra_rows: q / out rows past cu_seqlens_q[-1] (they must stay untouched)."""
    hq, hkv = heads
    q_lens = [a for a, _ in seq_lens]
    kv_lens = [b for _, b in seq_lens]
    tokens = sum(q_lens) + extra_rows
    # q as vLLM slices it from the qkv projection: token-strided
    qkv = torch.randn(tokens, hq + 2 * hkv, d).to(dtype)
    q = qkv.to(DEV)[:, :hq]
    k, v, table = paged(kv_lens, block, hkv, d, dtype)
    k_descale = v_descale = None
    kr, vr = k.cpu().double(), v.cpu().double()
    if fp8 is not None:
        ks, vs = torch.tensor(0.5), torch.tensor(0.25)
        k = (k.float() / ks.to(DEV)).to(fp8)
        v = (v.float() / vs.to(DEV)).to(fp8)
        kr, vr = k.cpu().double() * ks.double(), v.cpu().double() * vs.double()
        # vLLM's backend: the layer's scalar scale expanded to [num_seqs, num_kv_heads]
        k_descale = ks.to(DEV).expand(len(seq_lens), hkv)
        v_descale = vs.to(DEV).expand(len(seq_lens), hkv)
    slopes = alibi_slopes(hq) if alibi else None
    sink = torch.randn(hq) if sinks else None
    out_dtype = FP8 if out_fp8 else dtype
    wide = torch.full((tokens, hq, d + 3), float("nan"), dtype=torch.float32, device=DEV)
    out = wide.to(out_dtype)[..., 1:1 + d]                       # strided, poisoned
    if out_fp8:
        out.fill_(-1.0)
    out_scale = torch.tensor(0.05, device=DEV) if out_fp8 else None
    hints = {}
    if scratch:  # vLLM's 3D-kernel scratch: accepted, never written
        hints = dict(seq_threshold_3D=8, num_par_softmax_segments=4,
                     softmax_segm_output=torch.empty(8, hq, 4, 16, device=DEV),
                     softmax_segm_max=torch.empty(8, hq, 4, device=DEV),
                     softmax_segm_expsum=torch.empty(8, hq, 4, device=DEV))
    before = out.clone()
    scale = d ** -0.5
    va.unified_attention(
        q=q, k=k, v=v, out=out, cu_seqlens_q=cu(q_lens).to(DEV),
        max_seqlen_q=max(q_lens), seqused_k=torch.tensor(kv_lens, dtype=torch.int32,
                                                         device=DEV),
        max_seqlen_k=max(kv_lens), softmax_scale=scale, causal=True,
        window_size=(window - 1, 0) if window else (-1, -1), block_table=table,
        softcap=softcap, q_descale=None, k_descale=k_descale, v_descale=v_descale,
        alibi_slopes=None if slopes is None else slopes.to(DEV), output_scale=out_scale,
        sinks=None if sink is None else sink.to(DEV),
        kv_quant_mode=va.KVQuantMode.FP8_PER_TENSOR if fp8 else va.KVQuantMode.NONE,
        **hints)
    n = sum(q_lens)
    if extra_rows:
        assert torch.equal(out[n:].float().nan_to_num(7.0).cpu(),
                           before[n:].float().nan_to_num(7.0).cpu())
    if not check:
        return out
    starts = cu(q_lens).tolist()
    for b, (lq, lk) in enumerate(seq_lens):
        if lq == 0:
            continue
        kb, vb = gather(kr, table[b], lk), gather(vr, table[b], lk)
        ref, _ = ref_seq(q[starts[b]:starts[b + 1]].cpu(), kb, vb, scale,
                         window=window - 1 if window else -1, softcap=softcap,
                         alibi=slopes, sinks=sink)
        got = out[starts[b]:starts[b + 1]]
        if out_fp8:
            want = (ref / 0.05).clamp(-448, 448).to(FP8).double()
            torch.testing.assert_close(got.double().cpu(), want, atol=0.0, rtol=0.13)
        else:
            close(got, ref, dtype)
    return out


@given(seq_lens=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 10)).map(
           lambda t: (min(t), max(t))), min_size=1, max_size=3),
       heads=st.sampled_from([(4, 4), (8, 2), (5, 1)]),
       block=st.sampled_from([1, 3, 16]), d=st.sampled_from([8, 24]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       window=st.sampled_from([None, None, 1, 3]), softcap=st.sampled_from([0.0, 0.0, 5.0]),
       alibi=st.booleans(), sinks=st.booleans())
def test_unified_attention_matches_reference(seq_lens, heads, block, d, dtype, window,
                                             softcap, alibi, sinks):
    """Random batches (query length <= cached length, 0 new tokens and length 1 allowed)
    over the recipe's GQA / MQA heads, block sizes, windows, softcap, ALiBi and sinks."""
    if seq_lens[0][1] == 0:
        seq_lens[0] = (0, 1)
    run_unified(seq_lens, heads, d, block, dtype, window=window, softcap=softcap,
                alibi=alibi, sinks=sinks)


@pytest.mark.parametrize("seq_lens", [[(1, 13), (5, 5), (7, 19)],        # mixed batch
                                      [(1, 13), (1, 1), (1, 40)]])       # all decode
@pytest.mark.parametrize("fp8", [FP8, torch.float8_e5m2])
def test_unified_attention_fp8_caches(seq_lens, fp8):
    """vLLM's bf16-query / fp8-cache test: descales [num_seqs, num_kv_heads] expanded from
    one value, kv_quant_mode FP8_PER_TENSOR; sliding window and softcap on; the decode-only
    batch takes the split-KV decode op."""
    run_unified(seq_lens, (8, 2), 16, 16, torch.bfloat16, fp8=fp8, window=6, softcap=20.0,
                scratch=True)


def test_unified_attention_sinks_with_alibi_are_vllms():
    """vLLM's ALiBi bias slope * (key - context_len) shifts every row by slope * i: with a
    sink the shift shows (the sink's share changes), so it is applied exactly."""
    torch.manual_seed(1)
    run_unified([(6, 9), (1, 4), (3, 3)], (4, 2), 16, 4, torch.float32, alibi=True,
                sinks=True)
    run_unified([(1, 9), (1, 4)], (4, 2), 16, 4, torch.float32, alibi=True, sinks=True)


def test_unified_attention_out_rows_fp8_output_and_big_pages():
    """Rows past cu_seqlens_q[-1] (CUDA-graph padding) stay untouched; output_scale
    writes an fp8 out; pages over 256 tokens (vLLM's hybrid-model block sizes) are split."""
    torch.manual_seed(2)
    run_unified([(3, 5), (1, 7)], (4, 2), 16, 4, torch.float16, extra_rows=3)
    run_unified([(3, 5), (2, 2)], (4, 1), 16, 3, torch.float32, out_fp8=True)
    run_unified([(4, 290), (1, 300)], (2, 1), 8, 300, torch.float32, window=50)


def test_unified_attention_on_triton_kernels():
    """One small case per path (prefill / mixed, decode-only, fp8) on the Triton kernels
    (interpreter on the CPU)."""
    torch.manual_seed(3)
    with mk.use_backend("triton"):
        run_unified([(3, 7), (1, 5), (0, 4)], (4, 2), 16, 4, torch.float32, window=4,
                    sinks=True, alibi=True)
        run_unified([(1, 7), (1, 5)], (4, 2), 16, 4, torch.float32, sinks=True)
        run_unified([(2, 9)], (4, 2), 16, 8, torch.bfloat16, fp8=FP8)


def _unified_args(**over):
    torch.manual_seed(0)
    k, v, table = paged([5, 3], 4, 2, 8, torch.float32)
    q = torch.randn(4, 4, 8, device=DEV)
    args = dict(q=q, k=k, v=v, out=torch.empty_like(q),
                cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32, device=DEV),
                max_seqlen_q=3,
                seqused_k=torch.tensor([5, 3], dtype=torch.int32, device=DEV),
                max_seqlen_k=5, softmax_scale=0.3, causal=True, window_size=(-1, -1),
                block_table=table, softcap=0.0, q_descale=None, k_descale=None,
                v_descale=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(q_descale=torch.ones(1)), NotImplementedError, "q_descale"),
    (dict(qq_bias=torch.zeros(4, 4)), NotImplementedError, "qq_bias"),
    (dict(mm_prefix_range=torch.zeros(2, 1, 2, dtype=torch.int32)), NotImplementedError,
     "mm_prefix_range"),
    (dict(prefix_lens=torch.zeros(2, dtype=torch.int32)), NotImplementedError,
     "prefix_lens"),
    (dict(use_alibi_sqrt=True), NotImplementedError, "use_alibi_sqrt"),
    (dict(kv_quant_mode=2), NotImplementedError, "kv_quant_mode"),
    (dict(k_scale_cache=torch.ones(1)), NotImplementedError, "k_scale_cache"),
    (dict(kv_quant_mode=1), ValueError, "kv_quant_mode FP8_PER_TENSOR needs fp8"),
    (dict(seq_threshold_3D=torch.ones(4)), TypeError, "seq_threshold_3D"),
    (dict(softmax_segm_max=torch.ones(4)), ValueError, "softmax_segm_max"),
    (dict(q=torch.zeros(4, 4, 8, dtype=torch.int32)), TypeError, "q must have dtype"),
    (dict(k=torch.zeros(6, 4, 2, 8, dtype=torch.float16)), TypeError, "^k must have"),
    (dict(v=torch.zeros(6, 4, 2, 4)), ValueError, "v must have the shape of k"),
    (dict(q=torch.zeros(4, 3, 8)), ValueError, "multiple of k's kv heads"),
    (dict(out=torch.zeros(4, 4, 8, dtype=torch.float16)), TypeError, "out must have dtype"),
    (dict(out=torch.zeros(3, 4, 8)), ValueError, "out must have shape"),
    (dict(output_scale=torch.ones(1)), TypeError, "out must have dtype"),
    (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must have shape"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32)), ValueError,
     "exceeds q's tokens"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 4])), TypeError, "cu_seqlens_q must have dtype"),
    (dict(seqused_k=torch.tensor([5, -1], dtype=torch.int32)), ValueError, "seqused_k"),
    (dict(seqused_k=torch.tensor([5, 30], dtype=torch.int32)), ValueError, "seqused_k"),
    (dict(block_table=torch.full((2, 2), 99, dtype=torch.int32)), ValueError, "block_table"),
    (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "block_table"),
    (dict(max_seqlen_q=2), ValueError, "max_seqlen_q"),
    (dict(max_seqlen_k=4), ValueError, "max_seqlen_k"),
    (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(4), causal=False), ValueError, "alibi_slopes"),
    (dict(sinks=torch.ones(3)), ValueError, "sinks"),
])
def test_unified_attention_bad_arguments_are_named(over, exc, match):
    args = _unified_args()
    args.update({k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                 for k, v in over.items()})
    with pytest.raises(exc, match=match):
        va.unified_attention(**args)


def test_unified_attention_fp8_descale_errors():
    args = _unified_args()
    args["k"], args["v"] = args["k"].to(FP8), args["v"].to(FP8)
    with pytest.raises(ValueError, match="k_descale is required"):
        va.unified_attention(**args)
    args["k_descale"] = torch.tensor([[0.5, 0.5], [0.5, 0.7]], device=DEV)
    args["v_descale"] = torch.ones(1, device=DEV)
    with pytest.raises(ValueError, match="k_descale .*same for every sequence"):
        va.unified_attention(**args)
    args["k_descale"] = torch.tensor([0.0], device=DEV)
    with pytest.raises(ValueError, match="k_descale must be finite and > 0"):
        va.unified_attention(**args)
    # per kv head (every sequence the same row) is taken: keys scaled per head
    args["k_descale"] = torch.tensor([[0.5, 2.0], [0.5, 2.0]], device=DEV)
    va.unified_attention(**args)
    per_head = args["out"].clone()
    k2 = args["k"].float()
    k2[:, :, 1] *= 4.0                               # head 1's keys at scale 0.5 instead
    args["k"] = k2.to(FP8)
    args["k_descale"] = torch.tensor([0.5], device=DEV)
    va.unified_attention(**args)
    close(per_head, args["out"], torch.float32)


# --------------------------------------------------------------- context_attention_fwd


def legacy_caches(k: torch.Tensor, v: torch.Tensor, x: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's prefix-prefill test: [num_blocks, block, H, D] caches permuted to the
    legacy k_cache [num_blocks, H, D / x, block, x] and v_cache [num_blocks, H, D, block]."""
    nb, bs, h, d = k.shape
    kc = k.reshape(nb, bs, h, d // x, x).permute(0, 2, 3, 1, 4).contiguous()
    vc = v.permute(0, 2, 3, 1).contiguous()
    return kc, vc


def run_context(query_lens: list[int], ctx_lens: list[int], heads: tuple[int, int], d: int,
                block: int, dtype: torch.dtype, *, kv_cache_dtype: str = "auto",
                sliding_window: int = 0, alibi: bool = False, sinks: bool = False,
                skip_decode: bool = False, out_fp8: bool = False, causal: bool = True,
                softcap: float = 0.0, block_ptrs: bool = False, x: int = 8) -> None:
    """vLLM's test_contexted_kv_attention, scaled down: each sequence's keys / values are
    drawn whole; the first ctx_len go to the paged cache (random distinct blocks), the
    rest are the new tokens' k / v; the reference is attention over the whole sequence."""
    hq, hkv = heads
    seq_lens = [a + b for a, b in zip(query_lens, ctx_lens)]
    batch = len(query_lens)
    width = max(1, max(-(-c // block) for c in ctx_lens))
    num_blocks = batch * width + 2
    kv_full = [torch.randn(n, 2, hkv, d).to(dtype) for n in seq_lens]
    k_flash = torch.zeros(num_blocks, block, hkv, d, dtype=dtype)
    v_flash = torch.zeros_like(k_flash)
    table = torch.randperm(num_blocks)[:batch * width].view(batch, width).to(torch.int32)
    for b, c in enumerate(ctx_lens):
        pos = torch.arange(c)
        k_flash[table[b, pos // block].long(), pos % block] = kv_full[b][:c, 0]
        v_flash[table[b, pos // block].long(), pos % block] = kv_full[b][:c, 1]
    ks = vs = torch.tensor(1.0)
    if kv_cache_dtype.startswith("fp8"):
        fmt = torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else FP8
        ks, vs = torch.tensor(0.5), torch.tensor(0.25)
        k_q, v_q = (k_flash.float() / ks).to(fmt), (v_flash.float() / vs).to(fmt)
        # the reference sees what vLLM's kernel reads: (cache * scale) in q's dtype
        deq_k = (k_q.float() * ks).to(dtype)
        deq_v = (v_q.float() * vs).to(dtype)
        for b, c in enumerate(ctx_lens):
            pos = torch.arange(c)
            kv_full[b][:c, 0] = deq_k[table[b, pos // block].long(), pos % block]
            kv_full[b][:c, 1] = deq_v[table[b, pos // block].long(), pos % block]
        k_flash, v_flash = k_q.view(torch.uint8), v_q.view(torch.uint8)   # vLLM's storage
    k_cache, v_cache = legacy_caches(k_flash, v_flash, x)
    k_cache, v_cache = k_cache.to(DEV), v_cache.to(DEV)
    tokens = sum(query_lens)
    new_k = torch.cat([kv[c:, 0] for kv, c in zip(kv_full, ctx_lens)])
    new_v = torch.cat([kv[c:, 1] for kv, c in zip(kv_full, ctx_lens)])
    qkv = torch.randn(tokens, hq + 2 * hkv, d).to(dtype).to(DEV)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]   # strided, as vLLM's
    k.copy_(new_k)
    v.copy_(new_v)
    out_dtype = FP8 if out_fp8 else dtype
    o = torch.full((tokens, hq, d + 2), float("nan"), device=DEV).to(out_dtype)[..., :d]
    before = o.clone()
    slopes = alibi_slopes(hq) if alibi else None
    sink = torch.randn(hq) if sinks else None
    b_loc = table.to(DEV)
    if block_ptrs:   # vLLM's is_block_table_ptr: each block's byte address
        stride = k_cache.stride(0) * k_cache.element_size()
        b_loc = (b_loc.long() * stride + k_cache.data_ptr())
    start = cu(query_lens)
    va.context_attention_fwd(
        q, k, v, o, kv_cache_dtype, k_cache, v_cache, b_loc, start.to(DEV),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEV), max(seq_lens),
        max(query_lens), ks.to(DEV), vs.to(DEV),
        alibi_slopes=None if slopes is None else slopes.to(DEV),
        sliding_window=sliding_window, skip_decode=skip_decode,
        fp8_out_scale=torch.tensor(0.05, device=DEV) if out_fp8 else None,
        sinks=None if sink is None else sink.to(DEV), is_block_table_ptr=block_ptrs,
        causal=causal, softcap=softcap)
    scale = d ** -0.5
    for b, lq in enumerate(query_lens):
        rows = slice(int(start[b]), int(start[b + 1]))
        if lq == 0:
            continue
        if skip_decode and lq == 1:
            assert o[rows].float().isnan().all()
            continue
        ref, _ = ref_seq(q[rows].cpu(), kv_full[b][:, 0], kv_full[b][:, 1], scale,
                         causal=causal, window=sliding_window - 1 if sliding_window else -1,
                         softcap=softcap, alibi=slopes, sinks=sink)
        if out_fp8:
            want = (ref / 0.05).clamp(-448, 448).to(FP8).double()
            torch.testing.assert_close(o[rows].double().cpu(), want, atol=0.0, rtol=0.13)
        else:
            close(o[rows], ref, dtype)
    assert torch.equal(o[tokens:].cpu(), before[tokens:].cpu())


@given(lens=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=1,
                     max_size=3),
       heads=st.sampled_from([(4, 4), (8, 2), (4, 1)]), block=st.sampled_from([1, 4, 16]),
       d=st.sampled_from([8, 24]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       kv_cache_dtype=st.sampled_from(["auto", "auto", "fp8", "fp8_e5m2"]),
       sliding_window=st.sampled_from([0, 0, 2, 5]), sinks=st.booleans())
def test_context_attention_fwd_matches_reference(lens, heads, block, d, dtype,
                                                 kv_cache_dtype, sliding_window, sinks):
    """Random context / new-token lengths (a sequence with no new tokens, one new token,
    no context), GQA / MQA, block sizes, fp8 caches stored as uint8, sliding windows,
    sinks."""
    query_lens = [a for a, _ in lens]
    query_lens[-1] = max(query_lens[-1], 1)
    run_context(query_lens, [c for _, c in lens], heads, d, block, dtype,
                kv_cache_dtype=kv_cache_dtype, sliding_window=sliding_window, sinks=sinks)


def test_context_attention_fwd_alibi_and_options():
    """vLLM's ALiBi test (BLOOM slopes, bias -slope * (pos - key)); skip_decode leaves the
    decode rows alone; fp8 output; the later releases' causal=False and softcap;
    is_block_table_ptr (block byte addresses); the dtype-name kv_cache_dtype vLLM's test
    passes ("float16"); an fp32 x of 4."""
    torch.manual_seed(4)
    run_context([5, 1, 3], [7, 12, 0], (8, 2), 16, 4, torch.float16, alibi=True,
                kv_cache_dtype="float16")
    run_context([5, 1, 3], [7, 12, 2], (4, 2), 16, 4, torch.float32, skip_decode=True,
                x=4)
    run_context([4, 2], [3, 9], (4, 1), 16, 8, torch.bfloat16, out_fp8=True,
                kv_cache_dtype="fp8")
    run_context([4, 3], [3, 9], (4, 2), 16, 4, torch.float32, causal=False, softcap=3.0,
                block_ptrs=True, x=4)


def test_context_attention_fwd_on_triton_kernels():
    torch.manual_seed(5)
    with mk.use_backend("triton"):
        run_context([4, 1], [6, 5], (4, 2), 16, 4, torch.float32, sliding_window=5,
                    sinks=True, kv_cache_dtype="fp8", x=4)


def _context_args(**over):
    torch.manual_seed(0)
    q = torch.randn(4, 4, 8, device=DEV)
    k = torch.randn(4, 2, 8, device=DEV)
    kc, vc = legacy_caches(torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8), 4)
    args = dict(q=q, k=k, v=k.clone(), o=torch.empty_like(q), kv_cache_dtype="auto",
                k_cache=kc.to(DEV), v_cache=vc.to(DEV),
                b_loc=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEV),
                b_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32, device=DEV),
                b_seq_len=torch.tensor([8, 2], dtype=torch.int32, device=DEV),
                max_seq_len=8, max_input_len=3, k_scale=torch.ones(1, device=DEV),
                v_scale=torch.ones(1, device=DEV))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype"),
    (dict(kv_cache_dtype="bfloat16"), ValueError, "kv_cache_dtype"),
    (dict(kv_cache_dtype="fp8"), TypeError, "k_cache must have dtype"),
    (dict(k_cache=torch.zeros(6, 2, 3, 4, 3)), ValueError, "x .* must divide head_size"),
    (dict(v_cache=torch.zeros(6, 2, 8, 5)), ValueError, "k_cache must have shape"),
    (dict(v_cache=torch.zeros(6, 3, 8, 4)), ValueError, "v_cache must have shape"),
    (dict(k=torch.zeros(4, 3, 8)), ValueError, "v must have shape"),
    (dict(o=torch.zeros(4, 4, 4)), ValueError, "o must have shape"),
    (dict(fp8_out_scale=torch.ones(1)), TypeError, "o must have dtype"),
    (dict(b_start_loc=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "b_start_loc"),
    (dict(b_start_loc=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError,
     "b_start_loc"),
    (dict(b_start_loc=torch.tensor([1, 3, 4], dtype=torch.int32)), ValueError,
     "b_start_loc"),
    (dict(b_seq_len=torch.tensor([2, 2], dtype=torch.int32)), ValueError, "b_seq_len"),
    (dict(b_seq_len=torch.tensor([8, 2.0])), TypeError, "b_seq_len"),
    (dict(b_seq_len=torch.tensor([20, 2], dtype=torch.int32)), ValueError, "b_loc"),
    (dict(b_loc=torch.tensor([[0, 7], [2, 3]], dtype=torch.int32)), ValueError, "b_loc"),
    (dict(b_loc=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "b_loc"),
    (dict(max_input_len=2), ValueError, "max_input_len"),
    (dict(max_seq_len=-1), ValueError, "max_seq_len"),
    (dict(sm_scale=-1.0), ValueError, "sm_scale"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(skip_decode=1), TypeError, "skip_decode"),
    (dict(sliding_window=2.5), TypeError, "sliding_window"),
    (dict(sinks=torch.ones(2)), ValueError, "sinks"),
    (dict(alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(4), sliding_window=4), ValueError, "sliding_window"),
    (dict(alibi_slopes=torch.ones(4), sinks=torch.ones(4)), ValueError, "sinks"),
    (dict(alibi_slopes=torch.ones(4), causal=False), ValueError, "causal"),
    (dict(causal=False, sliding_window=4), NotImplementedError, "sliding_window"),
])
def test_context_attention_fwd_bad_arguments_are_named(over, exc, match):
    args = _context_args()
    args.update({k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                 for k, v in over.items()})
    with pytest.raises(exc, match=match):
        va.context_attention_fwd(**args)


def test_context_attention_fwd_fp8_scale_errors():
    args = _context_args(kv_cache_dtype="fp8")
    args["k_cache"] = args["k_cache"].to(FP8)
    args["v_cache"] = args["v_cache"].to(FP8)
    args["k_scale"] = torch.tensor([0.0], device=DEV)
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        va.context_attention_fwd(**args)
    args["k_scale"] = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="k_scale must have"):
        va.context_attention_fwd(**args)


# --------------------------------------------------------------- decode_attention_fwd


def test_decode_attention_fwd_recipe():
    """vLLM's test_decode_attention, scaled down: a token buffer read through token slots
    (page size 1), then the same buffer viewed as pages read through page ids give the
    same o; both match the reference; lse (natural log) is written, here into bf16 as
    vLLM's test allocates it; int64 b_seq_len and a [B, pages, 1] page table as vLLM's."""
    torch.manual_seed(6)
    b, hq, hkv, d, page, cache = 3, 8, 2, 16, 4, 64
    seq = [9, 1, 13]
    dtype = torch.bfloat16
    pages = max(-(-n // page) for n in seq)
    req_to_page = torch.randperm(cache // page)[:b * pages].view(b, pages, 1)
    req_to_token = (req_to_page * page + torch.arange(page)).view(b, -1)
    q = torch.randn(b, hq, d).to(dtype).to(DEV)
    k_buffer = torch.randn(cache, hkv, d).to(dtype).to(DEV)
    v_buffer = torch.randn(cache, hkv, d).to(dtype).to(DEV)
    o = torch.full((b, hq, d), float("nan"), dtype=dtype, device=DEV)
    lse = torch.zeros(b, hq, dtype=dtype, device=DEV)
    b_seq_len = torch.tensor(seq, device=DEV)                          # int64
    splits = 4
    attn_logits = torch.empty(b, hq, splits, d + 1, device=DEV)
    scale = d ** -0.5
    va.decode_attention_fwd(q, k_buffer, v_buffer, o, lse, req_to_token.to(DEV), b_seq_len,
                            attn_logits, splits, scale)
    for i, n in enumerate(seq):
        rows = req_to_token[i, :n]
        ref, ref_lse = ref_seq(q[i:i + 1].cpu(), k_buffer.cpu()[rows], v_buffer.cpu()[rows],
                               scale)
        close(o[i:i + 1], ref, dtype)
        close(lse[i:i + 1], ref_lse, dtype, scale=20)       # bf16 storage of ~5
    o1, lse1 = torch.zeros_like(o), torch.zeros_like(lse)
    va.decode_attention_fwd(q, k_buffer.view(cache // page, page, hkv, d),
                            v_buffer.view(cache // page, page, hkv, d), o1, lse1,
                            req_to_page.to(DEV), b_seq_len, attn_logits, splits, scale, page)
    close(o1, o, dtype)
    o2 = torch.zeros_like(o)                  # the token buffer cut into pages directly
    va.decode_attention_fwd(q, k_buffer, v_buffer, o2, lse1, req_to_page.to(DEV), b_seq_len,
                            attn_logits, splits, scale, page)
    close(o2, o, dtype)


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_attention_fwd_scales_cap_and_old_signature(fp8):
    """k_scale dequantizes both k and v (vLLM's kernel uses it for both), for an fp8
    buffer and, as vLLM's kernel also does, a bf16 one; logit_cap; GQA / MQA; the older
    signature without lse; a 4-D paged buffer that is a strided view ([num_pages, 2, page,
    H, D] split), which vLLM's kernel would misread."""
    torch.manual_seed(7)
    b, hq, hkv, d, page = 2, 4, 1, 16, 3
    seq = [7, 5]
    kv = torch.randn(6, 2, page, hkv, d, device=DEV)
    ks = 0.5
    if fp8:
        stored = (kv / ks).to(FP8)
        kv_read = stored.float() * ks
    else:
        stored = kv.to(torch.float32)
        kv_read = stored * ks
    k_buf, v_buf = stored.unbind(1)
    table = torch.tensor([[4, 0, 2], [1, 5, 0]], dtype=torch.int32, device=DEV)
    q = torch.randn(b, hq, d, device=DEV)
    o = torch.full((b, hq, d), float("nan"), device=DEV)
    lse = torch.full((b, hq), float("nan"), device=DEV)
    logits = torch.empty(b, hq, 2, d + 1, device=DEV)
    scale = 0.3
    va.decode_attention_fwd(q, k_buf, v_buf, o, lse, table, torch.tensor(seq, device=DEV),
                            logits, 2, scale, page, 2.5, torch.tensor([ks], device=DEV))
    for i, n in enumerate(seq):
        kr = gather(kv_read[:, 0], table[i], n)
        vr = gather(kv_read[:, 1], table[i], n)
        ref, ref_lse = ref_seq(q[i:i + 1].cpu(), kr, vr, scale, softcap=2.5)
        close(o[i:i + 1], ref, torch.float32)
        close(lse[i:i + 1], ref_lse, torch.float32)
    if not fp8:    # the older form: (q, k_buffer, v_buffer, o, req_to_token, b_seq_len,
        o_old = torch.zeros_like(o)   # attn_logits, num_kv_splits, sm_scale, page_size, cap)
        va.decode_attention_fwd(q, k_buf, v_buf, o_old, table, torch.tensor(seq, device=DEV),
                                logits, 2, scale * ks, page, 2.5)
        close(o_old * ks, o, torch.float32)
        o_kw = torch.zeros_like(o)
        va.decode_attention_fwd(q=q, k_buffer=k_buf, v_buffer=v_buf, o=o_kw,
                                req_to_token=table, b_seq_len=torch.tensor(seq, device=DEV),
                                attn_logits=logits, num_kv_splits=2, sm_scale=scale * ks,
                                page_size=page, logit_cap=2.5)
        close(o_kw, o_old, torch.float32)


def test_decode_attention_fwd_seq_len_zero_and_triton():
    """A sequence with no tokens gives zeros and lse -inf (vLLM's kernel: NaN); the
    Triton decode kernel (interpreter) on a token buffer with page_size 1 and fp8."""
    torch.manual_seed(8)
    q = torch.randn(2, 4, 16, device=DEV)
    kb = torch.randn(20, 2, 16, device=DEV).to(FP8)
    vb = torch.randn(20, 2, 16, device=DEV).to(FP8)
    table = torch.randperm(20)[:16].view(2, 8).to(DEV)
    o = torch.full((2, 4, 16), float("nan"), device=DEV)
    lse = torch.full((2, 4), float("nan"), device=DEV)
    logits = torch.empty(2, 4, 3, 17, device=DEV)
    for backend in ("auto", "triton"):
        with mk.use_backend(backend):
            va.decode_attention_fwd(q, kb, vb, o, lse, table, torch.tensor([8, 0], device=DEV),
                                    logits, 3, 0.25, 1, 0.0, torch.tensor([0.5], device=DEV))
        rows = table[0].cpu()
        ref, ref_lse = ref_seq(q[:1].cpu(), kb.cpu()[rows].double() * 0.5,
                               vb.cpu()[rows].double() * 0.5, 0.25)
        close(o[:1], ref, torch.float32)
        close(lse[:1], ref_lse, torch.float32)
        assert not o[1].any() and bool((lse[1] == float("-inf")).all())


def _decode_args(**over):
    q = torch.randn(2, 4, 8, device=DEV)
    args = dict(q=q, k_buffer=torch.randn(16, 2, 8, device=DEV),
                v_buffer=torch.randn(16, 2, 8, device=DEV), o=torch.empty_like(q),
                lse=torch.empty(2, 4, device=DEV),
                req_to_token=torch.arange(16, device=DEV).view(2, 8),
                b_seq_len=torch.tensor([8, 3], device=DEV),
                attn_logits=torch.empty(2, 4, 2, 9, device=DEV), num_kv_splits=2,
                sm_scale=0.3)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(v_buffer=torch.randn(16, 2, 4)), NotImplementedError, "v_buffer's head size"),
    (dict(q=torch.randn(2, 4, 576), k_buffer=torch.randn(16, 2, 576)), NotImplementedError,
     "576"),
    (dict(k_buffer=torch.randn(16, 2, 8, dtype=torch.float16)), TypeError, "k_buffer"),
    (dict(k_buffer=torch.randn(16, 3, 8), v_buffer=torch.randn(16, 3, 8)), ValueError,
     "multiple of k_buffer's kv heads"),
    (dict(v_buffer=torch.randn(15, 2, 8)), ValueError, "v_buffer must have"),
    (dict(o=torch.empty(2, 4, 9)), ValueError, "o must have shape"),
    (dict(lse=torch.empty(2, 3)), ValueError, "lse must have shape"),
    (dict(attn_logits=torch.empty(2, 4, 3, 9)), ValueError, "attn_logits"),
    (dict(num_kv_splits=0), ValueError, "num_kv_splits"),
    (dict(sm_scale=0.0), ValueError, "sm_scale"),
    (dict(logit_cap=-1.0), ValueError, "logit_cap"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(k_buffer=torch.randn(4, 4, 2, 8), v_buffer=torch.randn(4, 4, 2, 8),
          page_size=2), ValueError, "page_size"),
    (dict(req_to_token=torch.arange(16).view(2, 8) * 2), ValueError, "req_to_token"),
    (dict(req_to_token=torch.zeros(2, 8, 2, dtype=torch.int32)), ValueError,
     "req_to_token"),
    (dict(req_to_token=torch.zeros(2, 8)), TypeError, "req_to_token"),
    (dict(b_seq_len=torch.tensor([9, 3])), ValueError, "b_seq_len"),
    (dict(b_seq_len=torch.tensor([8])), ValueError, "b_seq_len"),
    (dict(k_scale=torch.tensor([0.0])), ValueError, "k_scale"),
    (dict(k_scale=torch.ones(2)), ValueError, "k_scale"),
])
def test_decode_attention_fwd_bad_arguments_are_named(over, exc, match):
    args = _decode_args()
    args.update({k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                 for k, v in over.items()})
    with pytest.raises(exc, match=match):
        va.decode_attention_fwd(**args)
    with pytest.raises(TypeError, match="decode_attention_fwd"):
        va.decode_attention_fwd(args["q"], args["k_buffer"])
