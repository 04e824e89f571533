"""minikernels.compat.flash_attn: FlashAttention 2's interface, checked against an
independent padded-batch reference written here (FlashAttention's own test semantics:
bottom-right causal, local windows over the valid keys, left padding, ALiBi after softcap,
rotary at cache_seqlens), on random shapes, dtypes and strided views.

The CPU runs the reference backend; one small case per entry point also runs the Triton
kernels under the interpreter, so the views built here (token-strided caches, split pages,
head-major layouts) are proven on the kernels too.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.compat import flash_attn as fa

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
#: where the entry points run (the GPU when present); references run on the CPU
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEV)


# ------------------------------------------------------------------------ reference


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: list[int],
                  key_end: list[int], causal: bool, window: tuple[int, int], softcap: float,
                  alibi: torch.Tensor | None, scale: float | None = None):
    """Padded attention in fp32. q [B, Sq, H, D]; k, v [B, Sk, Hk, D]; sequence b's keys
    are columns [key_start[b], key_end[b]) (Lk of them); query i sits at i + Lk - Sq.
    Returns (out [B, Sq, H, D] fp32, lse [B, H, Sq], probs [B, H, Sq, Sk])."""
    b_, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(h // hk, dim=2)
    vf = v.float().repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    if causal:
        right = 0
    out = torch.zeros(b_, sq, h, d)
    lse = torch.full((b_, h, sq), float("-inf"))
    probs = torch.zeros(b_, h, sq, sk)
    for b in range(b_):
        lk = key_end[b] - key_start[b]
        col = torch.arange(sk) - key_start[b]                 # key index among the valid
        row = torch.arange(sq).unsqueeze(1) + lk - sq         # query position
        vis = (col >= 0) & (col < lk)
        vis = vis & torch.ones(sq, 1, dtype=torch.bool)
        if right >= 0:
            vis = vis & (col <= row + right)
        if left >= 0:
            vis = vis & (col >= row - left)
        sb = s[b]
        if alibi is not None:
            slope = (alibi if alibi.dim() == 1 else alibi[b]).view(h, 1, 1)
            sb = sb - slope * (row - col).abs()
        sb = sb.masked_fill(~vis, float("-inf"))
        l_b = torch.logsumexp(sb, -1)
        p = torch.where(vis, torch.exp(sb - l_b.unsqueeze(-1)), torch.zeros(()))
        p = torch.nan_to_num(p)
        probs[b] = p
        lse[b] = l_b
        out[b] = torch.einsum("hqk,khd->qhd", p, vf[b])
    return out, lse, probs


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """x [B, S, H, D] rotated at pos [B, S] by cos / sin [N, rot/2] (fp32 math)."""
    rot = cos.shape[1] * 2
    xf = x.float()
    c = cos.float()[pos].unsqueeze(2)                         # [B, S, 1, rot/2]
    s = sin.float()[pos].unsqueeze(2)
    r = xf[..., :rot]
    if interleaved:
        x1, x2 = r[..., 0::2], r[..., 1::2]
        y = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = r[..., :rot // 2], r[..., rot // 2:]
        y = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([y, xf[..., rot:]], dim=-1).to(x.dtype)


def strided(t: torch.Tensor, how: int) -> torch.Tensor:
    """A tensor equal to t with its own strides: 0 contiguous, 1 a slice of a wider buffer
    (padded last dims), 2 head-major storage transposed back."""
    if how == 0:
        return t.contiguous()
    if how == 1:
        wide = torch.randn(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype, device=t.device)
        wide = torch.cat([wide, wide[:1]], dim=0) if t.dim() > 1 else wide
        view = wide[:t.shape[0], ..., 2:2 + t.shape[-1]]
        view.copy_(t)
        return view
    if t.dim() < 3:
        return t.contiguous()
    return t.transpose(-3, -2).contiguous().transpose(-3, -2)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=TOL[dtype],
                               rtol=TOL[dtype])


def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


window_st = st.sampled_from([(-1, -1), (-1, -1), (2, -1), (0, 0), (3, 1), (-1, 2)])
dtype_st = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
heads_st = st.sampled_from([(2, 2), (4, 2), (3, 1)])


# ------------------------------------------------------------------------ padded / varlen


@given(b=st.integers(1, 3), sq=st.integers(1, 7), sk=st.integers(1, 9), heads=heads_st,
       d=st.sampled_from([8, 12, 32]), causal=st.booleans(), window=window_st,
       softcap=st.sampled_from([0.0, 0.0, 5.0]), alibi=st.booleans(), dtype=dtype_st,
       layout=st.integers(0, 2))
def test_flash_attn_func_matches_reference(b, sq, sk, heads, d, causal, window, softcap,
                                           alibi, dtype, layout):
    h, hk = heads
    q, k, v = rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), \
        rand(b, sk, hk, d, dtype=dtype)
    slopes = torch.rand(b, h) * 0.3 if alibi else None
    out, lse, probs = fa.flash_attn_func(strided(dev(q), layout), strided(dev(k), 2 - layout),
                                         strided(dev(v), layout), causal=causal,
                                         window_size=window, softcap=softcap,
                                         alibi_slopes=dev(slopes), return_attn_probs=True)
    lse, probs = lse.cpu(), probs.cpu()
    ref, ref_lse, ref_probs = ref_attention(q, k, v, [0] * b, [sk] * b, causal, window,
                                            softcap, slopes)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, ref, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(probs, ref_probs, atol=1e-3, rtol=1e-3)
    plain = fa.flash_attn_func(dev(q), dev(k), dev(v), causal=causal, window_size=window,
                               softcap=softcap, alibi_slopes=dev(slopes))
    close(plain, out, dtype)


def test_default_is_not_causal_and_packed_forms_agree():
    torch.manual_seed(0)
    qkv = rand(2, 5, 3, 4, 16)
    out = fa.flash_attn_qkvpacked_func(qkv)
    q, k, v = qkv.unbind(2)
    ref = ref_attention(q, k, v, [0, 0], [5, 5], False, (-1, -1), 0.0, None)[0]
    close(out, ref, torch.float32)
    assert not torch.allclose(out, fa.flash_attn_func(q, k, v, causal=True))
    kv = torch.stack([k, v], dim=2)
    assert torch.equal(fa.flash_attn_kvpacked_func(q, kv, causal=True),
                       fa.flash_attn_func(q, k, v, causal=True))
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    flat = qkv.reshape(10, 3, 4, 16)
    close(fa.flash_attn_varlen_qkvpacked_func(flat, cu, 5).view(2, 5, 4, 16), out,
          torch.float32)
    out_v = fa.flash_attn_varlen_kvpacked_func(q.reshape(10, 4, 16), kv.reshape(10, 2, 4, 16),
                                               cu, cu, 5, 5, causal=True)
    close(out_v.view(2, 5, 4, 16), fa.flash_attn_func(q, k, v, causal=True), torch.float32)


@given(lens=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=1, max_size=4),
       heads=heads_st, causal=st.booleans(), window=window_st, dtype=dtype_st,
       page=st.sampled_from([None, 1, 3, 16, 300]), alibi=st.booleans())
def test_flash_attn_varlen_func_matches_reference(lens, heads, causal, window, dtype, page,
                                                  alibi):
    h, hk = heads
    d = 16
    b = len(lens)
    lq = [a for a, _ in lens]
    lk = [c for _, c in lens]
    max_q, max_k = max(max(lq), 1), max(max(lk), 1)
    qp = rand(b, max_q, h, d, dtype=dtype)
    kp = rand(b, max_k, hk, d, dtype=dtype)
    vp = rand(b, max_k, hk, d, dtype=dtype)
    q = torch.cat([qp[i, :lq[i]] for i in range(b)])
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0).to(torch.int32)
    slopes = torch.rand(h) * 0.3 if alibi else None
    if page is None:
        k = torch.cat([kp[i, :lk[i]] for i in range(b)])
        v = torch.cat([vp[i, :lk[i]] for i in range(b)])
        table = None
    else:
        per = -(-max_k // page)
        perm = torch.randperm(b * per + 2)
        k = rand(b * per + 2, page, hk, d, dtype=dtype)
        v = rand(b * per + 2, page, hk, d, dtype=dtype)
        table = perm[:b * per].view(b, per).to(torch.int32)
        for i in range(b):
            for t in range(lk[i]):
                k[table[i, t // page], t % page] = kp[i, t]
                v[table[i, t // page], t % page] = vp[i, t]
    out, lse, probs = fa.flash_attn_varlen_func(dev(q), dev(k), dev(v), dev(cu_q), dev(cu_k),
                                                max_q, max_k, causal=causal,
                                                window_size=window, alibi_slopes=dev(slopes),
                                                return_attn_probs=True, block_table=dev(table))
    out, lse, probs = out.cpu(), lse.cpu(), probs.cpu()
    ref, ref_lse, ref_probs = ref_attention(qp, kp, vp, [0] * b, lk, causal, window, 0.0,
                                            slopes)
    for i in range(b):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        # a varlen sequence's queries are the last lq of the padded reference's max_q rows
        # only when lq == max_q: compare against a reference of its own length instead
        r, rl, rp = ref_attention(qp[i:i + 1, :lq[i]], kp[i:i + 1], vp[i:i + 1], [0], [lk[i]],
                                  causal, window, 0.0,
                                  None if slopes is None else slopes)
        close(out[rows], r[0], dtype)
        torch.testing.assert_close(lse[:, rows], rl[0], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(probs[i, :, :lq[i], :lk[i]], rp[0, :, :, :lk[i]],
                                   atol=1e-3, rtol=1e-3)
        assert not probs[i, :, lq[i]:].any() and not probs[i, :, :, lk[i]:].any()
    del ref, ref_lse, ref_probs


# ------------------------------------------------------------------------ KV cache


def _kvcache_case(b, sq, sk, hq, hk, d, new_kv, seqlen_new, paged, page, batch_idx, leftpad,
                  rotary_frac, interleaved, causal, window, alibi, dtype, layout, gen):
    """Builds one flash_attn_with_kvcache case (FlashAttention's test recipe) and checks
    the output and the in-place cache update against the reference."""
    bc = b * 2 if batch_idx else b
    q = rand(b, sq, hq, d, dtype=dtype)
    k = rand(b, seqlen_new, hk, d, dtype=dtype) if new_kv else None
    v = rand(b, seqlen_new, hk, d, dtype=dtype) if new_kv else None
    k_full = rand(bc, sk, hk, d, dtype=dtype)
    v_full = rand(bc, sk, hk, d, dtype=dtype)
    rot = int(rotary_frac * d) // 2 * 2 if new_kv else 0
    need = (sq if (causal or window != (-1, -1)) and rot else seqlen_new) if new_kv else 0
    seqlens = torch.randint(0 if new_kv else 1, sk - need + 1, (b,), generator=gen,
                            dtype=torch.int32)
    lp = None
    if leftpad:
        lp = torch.tensor([int(torch.randint(0, max(int(s), 1), (1,), generator=gen))
                           for s in seqlens], dtype=torch.int32)
    rows = (torch.randperm(bc, generator=gen)[:b].to(torch.int32) if batch_idx else None)
    cos = sin = None
    if rot:
        angle = torch.rand(sk + sq, rot // 2, generator=gen) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    # expected cache rows after the append, and the rotated q
    sel = rows.long() if rows is not None else torch.arange(b)
    k_exp, v_exp = k_full[sel].clone(), v_full[sel].clone()
    q_ro, k_ro = q, k
    if rot:
        base = seqlens.long().unsqueeze(1)
        local = causal or window != (-1, -1)
        q_ro = rotary_ref(q, cos, sin, base + torch.arange(sq) if local
                          else base.expand(b, sq), interleaved)
        k_ro = rotary_ref(k, cos, sin, base + torch.arange(seqlen_new), interleaved)
    if new_kv:
        for i in range(b):
            s0 = int(seqlens[i])
            k_exp[i, s0:s0 + seqlen_new] = k_ro[i]
            v_exp[i, s0:s0 + seqlen_new] = v[i]
    starts = lp.tolist() if lp is not None else [0] * b
    ends = [int(s) + (seqlen_new if new_kv else 0) for s in seqlens]
    slopes = torch.rand(b, hq) * 0.3 if alibi else None
    ref, ref_lse, _ = ref_attention(q_ro, k_exp, v_exp, starts, ends, causal, window, 0.0,
                                    slopes)

    if paged:
        per = -(-sk // page)
        nblocks = b * per + 3
        table = torch.randperm(nblocks, generator=gen)[:b * per].view(b, per).to(torch.int32)
        kc = rand(nblocks, page, hk, d, dtype=dtype)
        vc = rand(nblocks, page, hk, d, dtype=dtype)
        for i in range(b):
            for t in range(sk):
                kc[table[i, t // page], t % page] = k_full[i, t]
                vc[table[i, t // page], t % page] = v_full[i, t]
        kc, vc = strided(dev(kc), layout), strided(dev(vc), layout)
        out, lse = fa.flash_attn_with_kvcache(
            dev(q), kc, vc, dev(k), dev(v), rotary_cos=dev(cos), rotary_sin=dev(sin),
            cache_seqlens=dev(seqlens), block_table=dev(table), causal=causal,
            window_size=window, rotary_interleaved=interleaved, alibi_slopes=dev(slopes),
            return_softmax_lse=True)
        kc, vc = kc.cpu(), vc.cpu()
        got_k = torch.stack([kc[table[i].long()].reshape(-1, hk, d)[:sk] for i in range(b)])
        got_v = torch.stack([vc[table[i].long()].reshape(-1, hk, d)[:sk] for i in range(b)])
    else:
        kc, vc = strided(dev(k_full), layout), strided(dev(v_full), 2 - layout)
        out, lse = fa.flash_attn_with_kvcache(
            dev(q), kc, vc, dev(k), dev(v), rotary_cos=dev(cos), rotary_sin=dev(sin),
            cache_seqlens=dev(seqlens), cache_batch_idx=dev(rows), cache_leftpad=dev(lp),
            causal=causal, window_size=window, rotary_interleaved=interleaved,
            alibi_slopes=dev(slopes), return_softmax_lse=True)
        got_k, got_v = kc.cpu()[sel], vc.cpu()[sel]
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == q.shape and out.dtype == dtype
    close(out, ref, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)
    if new_kv:
        # appended rows are exactly k (rotated in fp32, rounded once) and v
        close(got_k, k_exp, dtype)
        assert torch.equal(got_v, v_exp)


@given(b=st.integers(1, 3), sq=st.integers(1, 4), sk=st.integers(4, 12), heads=heads_st,
       new_kv=st.booleans(), new_eq_q=st.booleans(), paged=st.booleans(),
       page=st.sampled_from([1, 4, 5, 16]), batch_idx=st.booleans(), leftpad=st.booleans(),
       rotary_frac=st.sampled_from([0.0, 0.5, 1.0]), interleaved=st.booleans(),
       causal=st.booleans(), window=window_st, alibi=st.booleans(), dtype=dtype_st,
       layout=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_flash_attn_with_kvcache_matches_reference(b, sq, sk, heads, new_kv, new_eq_q, paged,
                                                   page, batch_idx, leftpad, rotary_frac,
                                                   interleaved, causal, window, alibi, dtype,
                                                   layout, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if sq > sk and new_kv:
        sq = sk
    seqlen_new = sq if new_eq_q else int(torch.randint(1, sq + 1, (1,), generator=gen))
    _kvcache_case(b, sq, sk, heads[0], heads[1], 16, new_kv, seqlen_new, paged, page,
                  batch_idx and not paged, leftpad and not paged, rotary_frac, interleaved,
                  causal, window, alibi, dtype, layout, gen)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (False, (2, 1))])
@pytest.mark.parametrize("interleaved", [False, True])
def test_kvcache_rotary_positions(causal, window, interleaved):
    """q rotates at cache_seqlens + i when causal or local, else every q token at
    cache_seqlens (FlashAttention's rule); k always at cache_seqlens + i."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    _kvcache_case(2, 3, 9, 4, 2, 16, True, 3, False, 4, True, False, 0.5, interleaved, causal,
                  window, False, torch.float32, 0, gen)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_decode_loop_equals_full_attention(paged):
    """Appending one token at a time reproduces causal attention over the whole sequence
    (incremental decoding), with int cache_seqlens and a page over 256 tokens."""
    torch.manual_seed(1)
    b, n, h, d = 2, 6, 2, 8
    q, k, v = dev(rand(b, n, h, d)), dev(rand(b, n, h, d)), dev(rand(b, n, h, d))
    page = 512
    if paged:
        kc, vc = torch.zeros(3, page, h, d, device=DEV), torch.zeros(3, page, h, d, device=DEV)
        table = torch.tensor([[2], [0]], dtype=torch.int32, device=DEV)
    else:
        kc, vc = torch.zeros(b, 9, h, d, device=DEV), torch.zeros(b, 9, h, d, device=DEV)
        table = None
    outs = []
    for t in range(n):
        outs.append(fa.flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1],
                                               v[:, t:t + 1], cache_seqlens=t,
                                               block_table=table, causal=True))
    close(torch.cat(outs, 1), fa.flash_attn_func(q, k, v, causal=True), torch.float32)


def test_head_major_and_sliced_caches_are_views_not_copies():
    """A cache sliced from a longer buffer, or stored head-major, is read in place: the
    appended token lands in the caller's storage and attention sees it."""
    torch.manual_seed(2)
    big = torch.zeros(2, 20, 2, 8, device=DEV)
    kc, vc = big[:, :7], big.clone()[:, :7]
    hm = torch.zeros(2, 2, 7, 8, device=DEV).transpose(1, 2)   # [B, S, H, D], head-major
    q, k, v = dev(rand(2, 1, 2, 8)), dev(rand(2, 1, 2, 8)), dev(rand(2, 1, 2, 8))
    for cache_k, cache_v in ((kc, vc), (hm, hm.clone())):
        for sq in (1, 2):   # the decode kernel and the flash kernel
            cache_k[:, 3:].zero_()
            out = fa.flash_attn_with_kvcache(q.expand(2, sq, 2, 8), cache_k, cache_v, k, v,
                                             cache_seqlens=3)
            assert torch.equal(cache_k[:, 3], k[:, 0])
            ref = ref_attention(q.expand(2, sq, 2, 8).cpu(), cache_k.cpu(), cache_v.cpu(),
                                [0, 0], [4, 4], False, (-1, -1), 0.0, None)[0]
            close(out, ref, torch.float32)
    assert torch.equal(big[:, 3], k[:, 0])


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_on_triton_kernels(paged):
    """The views this module builds (token-strided, split pages, left padding) run on the
    Triton kernels (interpreter on the CPU): decode (Sq = 1) and prefill (Sq > 1)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    with mk.use_backend("triton"):
        for sq in (1, 3):
            _kvcache_case(2, sq, 9, 4, 2, 16, True, sq, paged, 4, not paged, not paged, 0.5,
                          False, True, (-1, -1), False, torch.float32, 2, gen)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_head_dim_512_beyond_flash_attention_2(backend):
    """FlashAttention 2 refuses head dims over 256; this module takes what the ops take,
    up to 512 (Gemma 4's full-attention layers): flash_attn_func and a paged
    flash_attn_with_kvcache (decode and prefill, with rotary and an append) on both
    backends. 513 is refused naming the head dim."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    q, k, v = (rand(1, 5, 4, 512, dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    with mk.use_backend(backend):
        out = fa.flash_attn_func(dev(q), dev(k), dev(v), causal=True, softcap=10.0)
        close(out, ref_attention(q, k, v, [0], [5], True, (-1, -1), 10.0, None)[0],
              torch.bfloat16)
        for sq in (1, 3):   # fp32: bf16 rotary may round an ulp off the fp32 reference's
            _kvcache_case(2, sq, 9, 4, 2, 512, True, sq, True, 4, False, False, 0.5, False,
                          True, (-1, -1), False, torch.float32, 0, gen)
    bad = torch.zeros(1, 2, 1, 513)
    with pytest.raises(ValueError, match="head dim must be in .*got 513"):
        fa.flash_attn_func(bad, bad, bad)


# ------------------------------------------------------------------------ errors


def test_bad_arguments_are_named():
    q, k = rand(1, 2, 2, 8), rand(1, 2, 2, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attn_func(q, k, k, dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, k, k, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, k, k, window_size=3)
    with pytest.raises(ValueError, match="qkv"):
        fa.flash_attn_qkvpacked_func(rand(1, 2, 2, 2, 8))
    kc = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k and v"):
        fa.flash_attn_with_kvcache(q, kc, kc, k=k, cache_seqlens=0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(q, kc, kc, k, k)
    with pytest.raises(ValueError, match="exceeds the cache"):
        fa.flash_attn_with_kvcache(q, kc, kc, k, k, cache_seqlens=3)
    with pytest.raises(ValueError, match="rotary_cos"):
        fa.flash_attn_with_kvcache(q, kc, kc, rotary_cos=torch.ones(4, 2),
                                   rotary_sin=torch.ones(4, 2))
    with pytest.raises(ValueError, match="cache_leftpad"):
        fa.flash_attn_with_kvcache(q, kc, kc, block_table=torch.zeros(1, 1, dtype=torch.int32),
                                   cache_leftpad=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_batch_idx=torch.tensor([1],
                                                                            dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=2,
                                   cache_leftpad=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(TypeError, match="k_cache"):
        fa.flash_attn_with_kvcache(q, kc.half(), kc.half())
    with pytest.raises(ValueError, match="q heads"):
        fa.flash_attn_with_kvcache(rand(1, 2, 3, 8), kc, kc)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("paged", [False, True])
def test_varlen_seqused_k_and_out(paged, backend):
    """vLLM / FlashAttention 3 keyword extras: seqused_k (each sequence uses its first
    seqused_k[b] keys; cu_seqlens_k may be None with a block table) and out= (in place)."""
    torch.manual_seed(6)
    lk, used, lq = [9, 5, 12], [7, 5, 1], [3, 2, 1]
    h, d = 2, 16
    kp, vp = rand(3, 12, h, d), rand(3, 12, h, d)
    q = rand(sum(lq), 4, d)
    cu_q = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    used_t = torch.tensor(used, dtype=torch.int32)
    if paged:
        k = kp.reshape(9, 4, h, d)                  # sequence b: blocks 3b .. 3b + 2
        v = vp.reshape(9, 4, h, d)
        table = torch.arange(9, dtype=torch.int32).view(3, 3)
        cu_k = None
    else:
        k = torch.cat([kp[b, :lk[b]] for b in range(3)])
        v = torch.cat([vp[b, :lk[b]] for b in range(3)])
        table = None
        cu_k = torch.tensor([0, 9, 14, 26], dtype=torch.int32)
    buf = torch.full((sum(lq), 4, d + 3), float("nan"))
    out_view = buf[..., :d]
    with mk.use_backend(backend):
        got = fa.flash_attn_varlen_func(dev(q), dev(k), dev(v), dev(cu_q), dev(cu_k), 3, 12,
                                        causal=True, block_table=dev(table),
                                        seqused_k=dev(used_t), out=dev(out_view))
    if DEV == "cpu":
        assert got is out_view and not out_view.isnan().any()
    for b in range(3):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        ref = ref_attention(q[rows].unsqueeze(0), kp[b:b + 1], vp[b:b + 1], [0], [used[b]],
                            True, (-1, -1), 0.0, None)[0][0]
        close(got[rows], ref, torch.float32)
    with pytest.raises(ValueError, match="seqused_k"):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 12, block_table=table,
                                  seqused_k=used_t[:2])
    if not paged:
        with pytest.raises(ValueError, match="cu_seqlens_k"):
            fa.flash_attn_varlen_func(q, k, v, cu_q, None, 3, 12, seqused_k=used_t)
