"""minikernels.compat.flash_attn3: FlashAttention 3's interface (hopper/flash_attn_interface.py),
checked against an independent fp64 reference written here, following FlashAttention 3's
own test recipes: the return convention (out, or (out, softmax_lse) with
return_attn_probs), LSE as FA3 returns it (natural log, [B, H, Sq] / [H, total_q]), varlen
with seqused_q / seqused_k, kvcache with page_table and cache_seqlens, bottom-right causal
and local windows, softcap, GQA; one case on the Triton kernels; errors naming the argument.
"""
from __future__ import annotations

import math

import pytest
import torch

import minikernels as mk
from minikernels.compat import flash_attn3 as fa3

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lk: list[int],
                  causal: bool = False, window: tuple[int, int] = (-1, -1),
                  softcap: float = 0.0, scale: float | None = None,
                  lq: list[int] | None = None):
    """fp64 attention. q [B, Sq, H, D], k / v [B, Sk, Hk, D]; sequence b has its first
    lq[b] queries and lk[b] keys valid; query i sits at i + lk - lq (bottom right).
    Returns out [B, Sq, H, D] (0 for invalid / keyless rows) and lse [B, H, Sq] (-inf)."""
    b_, sq, h, d = q.shape
    hk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    kd = kd.repeat_interleave(h // hk, dim=2)
    vd = vd.repeat_interleave(h // hk, dim=2)
    out = torch.zeros(b_, sq, h, d, dtype=torch.float64)
    lse = torch.full((b_, h, sq), -math.inf, dtype=torch.float64)
    for b in range(b_):
        nq = sq if lq is None else lq[b]
        nk = lk[b]
        s = torch.einsum("qhd,khd->hqk", qd[b, :nq], kd[b, :nk]) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(nq).unsqueeze(1) + nk - nq
        j = torch.arange(nk).unsqueeze(0)
        ok = torch.ones(nq, nk, dtype=torch.bool)
        right = 0 if causal else window[1]
        if right >= 0:
            ok &= j <= i + right
        if window[0] >= 0:
            ok &= j >= i - window[0]
        s = s.masked_fill(~ok, -math.inf)
        row_lse = torch.logsumexp(s, dim=-1)                       # [H, nq]
        p = torch.exp(s - row_lse.unsqueeze(-1)).nan_to_num(0.0)
        out[b, :nq] = torch.einsum("hqk,khd->qhd", p, vd[b, :nk])
        lse[b, :, :nq] = row_lse
    return out, lse


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    a, b = a.double().cpu(), b.double().cpu()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), "non-finite pattern differs"
    torch.testing.assert_close(a[fin], b[fin], atol=tol, rtol=tol)


TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


# ------------------------------------------------------------------------ flash_attn_func


@pytest.mark.parametrize("causal,window,softcap", [
    (False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (3, 1), 0.0),
    (True, (2, -1), 5.0), (False, (-1, -1), 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_func_masks_softcap_gqa(causal, window, softcap, dtype):
    g = torch.Generator().manual_seed(0)
    b, sq, sk, h, hk, d = 2, 5, 9, 4, 2, 16
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    out = fa3.flash_attn_func(q.to(DEV), k.to(DEV), v.to(DEV), causal=causal,
                              window_size=window, softcap=softcap)
    assert isinstance(out, torch.Tensor) and out.shape == (b, sq, h, d) and out.dtype == dtype
    out2, lse = fa3.flash_attn_func(q.to(DEV), k.to(DEV), v.to(DEV), None, causal,
                                    window_size=window, softcap=softcap, num_splits=3,
                                    pack_gqa=True, sm_margin=4, deterministic=True,
                                    return_attn_probs=True)
    ro, rl = ref_attention(q, k, v, [sk] * b, causal, window, softcap)
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    close(out, ro, TOL[dtype])
    close(out2, ro, TOL[dtype])
    close(lse, rl, 1e-4 if dtype == torch.float32 else 2e-2)


def test_func_positional_order_and_scale():
    """FA3's order: (q, k, v, softmax_scale, causal, qv, q_descale, k_descale, v_descale,
    window_size, attention_chunk, softcap, num_splits, pack_gqa, deterministic, sm_margin,
    return_attn_probs)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g) for _ in range(3))
    out, lse = fa3.flash_attn_func(q, k, v, 0.3, True, None, None, None, None, (-1, -1), 0,
                                   0.0, 1, None, False, 0, True)
    ro, rl = ref_attention(q, k, v, [4], causal=True, scale=0.3)
    close(out, ro, 1e-4)
    close(lse, rl, 1e-4)


def test_func_fp8_descale():
    g = torch.Generator().manual_seed(2)
    b, s, h, hk, d = 2, 4, 4, 2, 16
    q = torch.randn(b, s, h, d, generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(b, s, hk, d, generator=g).to(torch.float8_e4m3fn)
    v = torch.randn(b, s, hk, d, generator=g).to(torch.float8_e4m3fn)
    qd, kd, vd = (torch.rand(b, hk, generator=g) + 0.5 for _ in range(3))
    out = fa3.flash_attn_func(q, k, v, causal=True, q_descale=qd, k_descale=kd, v_descale=vd)
    assert out.dtype == torch.bfloat16
    deq = lambda x, s_: x.double() * s_.double().repeat_interleave(  # noqa: E731
        x.shape[2] // hk, 1)[:, None, :, None]
    ro, _ = ref_attention(deq(q, qd), deq(k, kd), deq(v, vd), [s] * b, causal=True)
    close(out, ro, 5e-2)


# ------------------------------------------------------------------------ varlen


def _pad(x: torch.Tensor, cu: list[int], width: int) -> torch.Tensor:
    out = torch.zeros(len(cu) - 1, width, *x.shape[1:], dtype=x.dtype)
    for b in range(len(cu) - 1):
        out[b, :cu[b + 1] - cu[b]] = x[cu[b]:cu[b + 1]]
    return out


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (False, (2, 0))])
def test_varlen_seqused_q_k(causal, window):
    g = torch.Generator().manual_seed(3)
    h, hk, d = 4, 1, 8
    cu_q, cu_k = [0, 3, 8, 10], [0, 6, 9, 16]
    used_q, used_k = [2, 5, 1], [4, 3, 0]            # last sequence sees no key
    q = torch.randn(cu_q[-1], h, d, generator=g)
    k = torch.randn(cu_k[-1], hk, d, generator=g)
    v = torch.randn(cu_k[-1], hk, d, generator=g)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEV)  # noqa: E731
    out, lse = fa3.flash_attn_varlen_func(
        q.to(DEV), k.to(DEV), v.to(DEV), i32(cu_q), i32(cu_k), 5, 7, seqused_q=i32(used_q),
        seqused_k=i32(used_k), causal=causal, window_size=window, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (h, cu_q[-1])
    ro, rl = ref_attention(_pad(q, cu_q, 5), _pad(k, cu_k, 7), _pad(v, cu_k, 7), used_k,
                           causal, window, lq=used_q)
    for b in range(3):
        n = cu_q[b + 1] - cu_q[b]
        close(out[cu_q[b]:cu_q[b + 1]], ro[b, :n], 1e-4)
        close(lse[:, cu_q[b]:cu_q[b + 1]], rl[b, :, :n], 1e-4)
    assert float(out.abs().max()) > 0
    # without return_attn_probs: out only (FA3's current convention)
    plain = fa3.flash_attn_varlen_func(q.to(DEV), k.to(DEV), v.to(DEV), i32(cu_q),
                                       i32(cu_k), 5, 7, causal=causal, window_size=window)
    assert isinstance(plain, torch.Tensor)
    ro2, _ = ref_attention(_pad(q, cu_q, 5), _pad(k, cu_k, 7), _pad(v, cu_k, 7),
                           [6, 3, 7], causal, window, lq=[3, 5, 2])
    for b in range(3):
        close(plain[cu_q[b]:cu_q[b + 1]], ro2[b, :cu_q[b + 1] - cu_q[b]], 1e-4)


def test_varlen_padded_kv_with_seqused_k():
    """cu_seqlens_k=None: k / v padded [B, Sk, Hk, D], seqused_k the valid keys."""
    g = torch.Generator().manual_seed(4)
    h, d, sk = 2, 8, 6
    cu_q, used_k = [0, 2, 5], [6, 3]
    q = torch.randn(cu_q[-1], h, d, generator=g)
    k = torch.randn(2, sk, h, d, generator=g)
    v = torch.randn(2, sk, h, d, generator=g)
    out = fa3.flash_attn_varlen_func(q, k, v, torch.tensor(cu_q, dtype=torch.int32), None,
                                     3, sk, seqused_k=torch.tensor(used_k, dtype=torch.int32),
                                     causal=True)
    ro, _ = ref_attention(_pad(q, cu_q, 3), k, v, used_k, causal=True, lq=[2, 3])
    for b in range(2):
        close(out[cu_q[b]:cu_q[b + 1]], ro[b, :cu_q[b + 1] - cu_q[b]], 1e-4)


# ------------------------------------------------------------------------ kvcache


@pytest.mark.parametrize("sq", [1, 3])
def test_kvcache_page_table_cache_seqlens(sq):
    g = torch.Generator().manual_seed(5)
    b, h, hk, d, page, sn = 2, 4, 2, 8, 3, 2
    num_pages, per_seq = 8, 4
    lens = [4, 7]
    k_cache = torch.randn(num_pages, page, hk, d, generator=g)
    v_cache = torch.randn(num_pages, page, hk, d, generator=g)
    table = torch.randperm(num_pages, generator=g)[:b * per_seq].view(b, per_seq).int()
    q = torch.randn(b, sq, h, d, generator=g)
    kn = torch.randn(b, sn, hk, d, generator=g)
    vn = torch.randn(b, sn, hk, d, generator=g)
    # expected contiguous caches after the append
    def gather(c):
        return c[table.long()].reshape(b, per_seq * page, hk, d).clone()
    kf, vf = gather(k_cache), gather(v_cache)
    for i in range(b):
        kf[i, lens[i]:lens[i] + sn] = kn[i]
        vf[i, lens[i]:lens[i] + sn] = vn[i]
    kc, vc = k_cache.to(DEV), v_cache.to(DEV)
    res = fa3.flash_attn_with_kvcache(
        q.to(DEV), kc, vc, kn.to(DEV), vn.to(DEV),
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEV),
        page_table=table.to(DEV), causal=True, window_size=(4, -1), softcap=3.0,
        return_softmax_lse=True)
    assert len(res) == 4 and res[2].numel() == 0 and res[3].numel() == 0
    out, lse = res[0], res[1]
    ro, rl = ref_attention(q, kf, vf, [n + sn for n in lens], True, (4, -1), 3.0)
    close(out, ro, 1e-4)
    close(lse, rl, 1e-4)
    # the append landed in the caller's paged cache
    after = kc.cpu()[table.long()].reshape(b, per_seq * page, hk, d)
    for i in range(b):
        torch.testing.assert_close(after[i, lens[i]:lens[i] + sn], kn[i])
    # no new tokens: cache_seqlens is the whole length now cached
    now = torch.tensor([n + sn for n in lens], dtype=torch.int32, device=DEV)
    plain = fa3.flash_attn_with_kvcache(q.to(DEV), kc, vc, cache_seqlens=now,
                                        page_table=table.to(DEV), causal=True,
                                        window_size=(4, -1), softcap=3.0)
    assert isinstance(plain, torch.Tensor)
    close(plain, ro, 1e-4)


def test_triton_backend_small():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 3, 2, 16, generator=g, dtype=torch.float16)
    k = torch.randn(1, 5, 1, 16, generator=g, dtype=torch.float16)
    v = torch.randn(1, 5, 1, 16, generator=g, dtype=torch.float16)
    with mk.use_backend("triton"):
        out, lse = fa3.flash_attn_func(q.to(DEV), k.to(DEV), v.to(DEV), causal=True,
                                       return_attn_probs=True)
    ro, rl = ref_attention(q, k, v, [5], causal=True)
    close(out, ro, 3e-3)
    close(lse, rl, 3e-3)


# ------------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 2, 8)
    k = torch.randn(1, 2, 2, 8)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="qv"):
        fa3.flash_attn_func(q, k, k, qv=q)
    with pytest.raises(NotImplementedError, match="attention_chunk"):
        fa3.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 2, 2, attention_chunk=4)
    with pytest.raises(ValueError, match="q_descale"):
        fa3.flash_attn_func(q, k, k, q_descale=torch.ones(1, 2))
    with pytest.raises(ValueError, match="num_splits"):
        fa3.flash_attn_func(q, k, k, num_splits=-1)
    with pytest.raises(ValueError, match="seqused_q"):
        fa3.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 2, 2,
                                   seqused_q=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fa3.flash_attn_varlen_func(q[0], k[0], k[0], cu, None, 2, 2)
    for name in ("cu_seqlens_q", "rotary_seqlens", "cu_seqlens_k_new"):
        with pytest.raises(NotImplementedError, match=name):
            fa3.flash_attn_with_kvcache(q, k, k, **{name: cu})
    with pytest.raises(NotImplementedError, match="max_seqlen_q"):
        fa3.flash_attn_with_kvcache(q, k, k, max_seqlen_q=2)
    with pytest.raises(NotImplementedError, match="k_descale"):
        fa3.flash_attn_with_kvcache(q, k, k, k_descale=torch.ones(1, 2))
    with pytest.raises(NotImplementedError, match="qv"):
        fa3.flash_attn_with_kvcache(q, k, k, qv=q)
