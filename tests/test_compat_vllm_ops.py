"""minikernels.compat.vllm_ops (vLLM's ``_custom_ops`` API) against independent fp32
formulas written here (vLLM's kernel-test references): out-parameters and in-place
arguments really written (strided views of bigger buffers included, the rest of the buffer
untouched), vLLM's layouts and dtypes, one token and odd sizes, and errors that name
vLLM's arguments."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, TOL, assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.compat import vllm_ops as ops

FP8 = torch.float8_e4m3fn
SENTINEL = -7.0
dtypes = st.sampled_from(DTYPES)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
           strided: bool = False) -> torch.Tensor:
    """A random tensor; strided: a view of the first half of a buffer twice as wide."""
    if not strided:
        return torch.randn(*shape, generator=g).to(dtype)
    big = torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(dtype)
    return big[..., :shape[-1]]


def _out_view(shape: tuple[int, ...], dtype: torch.dtype, strided: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """An out buffer filled with SENTINEL: (view to pass, whole buffer)."""
    if not strided:
        buf = torch.full(shape, SENTINEL).to(dtype)
        return buf, buf
    buf = torch.full((*shape[:-1], shape[-1] + 3), SENTINEL).to(dtype)
    return buf[..., 1:shape[-1] + 1], buf


def _untouched_margins(buf: torch.Tensor, view: torch.Tensor) -> None:
    if buf.shape != view.shape:
        margins = torch.cat([buf[..., :1], buf[..., -2:]], dim=-1).float()
        assert (margins == SENTINEL).all()


# -------------------------------------------------------------------------- norms


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0):
    xf = x.double()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            * (w.double() + offset)).to(x.dtype)


@given(rows=st.sampled_from([1, 3, 7]), hidden=st.sampled_from([1, 8, 33]), dtype=dtypes,
       strided_in=st.booleans(), strided_out=st.booleans(), weightless=st.booleans(),
       seed=st.integers(0, 2**31))
def test_rms_norm_writes_out(rows, hidden, dtype, strided_in, strided_out, weightless, seed):
    g = _gen(seed)
    x = _randn(g, rows, hidden, dtype=dtype, strided=strided_in)
    w = None if weightless else (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    out, buf = _out_view((rows, hidden), dtype, strided_out)
    x_before = x.clone()
    assert ops.rms_norm(out, x, w, 1e-5) is None
    ref = _rms_ref(x, torch.ones(hidden) if w is None else w, 1e-5)
    assert_close(out, ref)
    assert torch.equal(x, x_before)
    _untouched_margins(buf, out)


@given(rows=st.sampled_from([1, 2, 5]), hidden=st.sampled_from([8, 17]), dtype=dtypes,
       strided=st.booleans(), gemma=st.booleans(), seed=st.integers(0, 2**31))
def test_fused_add_rms_norm_in_place(rows, hidden, dtype, strided, gemma, seed):
    g = _gen(seed)
    x = _randn(g, rows, hidden, dtype=dtype, strided=strided)
    residual = _randn(g, rows, hidden, dtype=dtype, strided=strided)
    w = (torch.rand(hidden, generator=g) * 0.2 + (0.0 if gemma else 0.9)).to(dtype)
    h_ref = (x.float() + residual.float()).to(dtype)        # the sum rounded once
    y_ref = _rms_ref(h_ref, w, 1e-6, 1.0 if gemma else 0.0)
    fn = ops.fused_add_gemma_rms_norm if gemma else ops.fused_add_rms_norm
    assert fn(x, residual, w, 1e-6) is None
    assert_close(residual, h_ref)     # one rounding of the sum (an ulp on interpreters)
    assert_close(x, y_ref)


def test_gemma_rms_norm_fp32_weight_bf16_input():
    g = _gen(0)
    x = _randn(g, 4, 24, dtype=torch.bfloat16)
    w = torch.randn(24, generator=g) * 0.1            # Gemma keeps an fp32 weight
    out = torch.empty_like(x)
    ops.gemma_rms_norm(out, x, w, 1e-6)
    assert_close(out, _rms_ref(x, w, 1e-6, 1.0))


# --------------------------------------------------------------------- activations

ACTS = {
    "silu_and_mul": lambda a, b: torch.nn.functional.silu(a) * b,
    "mul_and_silu": lambda a, b: a * torch.nn.functional.silu(b),
    "gelu_and_mul": lambda a, b: torch.nn.functional.gelu(a) * b,
    "gelu_tanh_and_mul": lambda a, b: torch.nn.functional.gelu(a, approximate="tanh") * b,
}


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 14), (2, 3, 10)])
def test_gated_activations(name, dtype, shape):
    g = _gen(hash((name, shape)) % 2**31)
    x = _randn(g, *shape, dtype=dtype, strided=len(shape) == 3)
    d = shape[-1] // 2
    out, buf = _out_view((*shape[:-1], d), dtype, strided=shape[0] == 3)
    getattr(ops, name)(out, x)
    xf = x.float()
    assert_close(out, ACTS[name](xf[..., :d], xf[..., d:]).to(dtype))
    _untouched_margins(buf, out)


# -------------------------------------------------------------------------- rotary


def _rope_ref(x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, neox: bool,
              offset: int, inverse: bool) -> torch.Tensor:
    """x [..., H, D] rotated on dims offset .. offset + rot, one pair at a time (fp64)."""
    rot = cache.shape[1]
    half = rot // 2
    out = x.double().clone()
    cs = cache.double()[pos.long()]                      # [..., rot]
    for i in range(half):
        a, b = (offset + i, offset + half + i) if neox else (offset + 2 * i, offset + 2 * i + 1)
        cos = cs[..., i].unsqueeze(-1)
        sin = cs[..., half + i].unsqueeze(-1) * (-1 if inverse else 1)
        xa, xb = x[..., a].double(), x[..., b].double()
        out[..., a] = xa * cos - xb * sin
        out[..., b] = xb * cos + xa * sin
    return out.to(x.dtype)


@given(layout=st.sampled_from(["flat", "heads", "padded"]), batched=st.booleans(),
       tokens=st.sampled_from([1, 5]), head_size=st.sampled_from([8, 12]),
       rot=st.sampled_from([None, 4]), offset=st.sampled_from([0, 2]),
       neox=st.booleans(), use_key=st.booleans(), inverse=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), seed=st.integers(0, 2**31))
def test_rotary_embedding_in_place(layout, batched, tokens, head_size, rot, offset, neox,
                                   use_key, inverse, dtype, seed):
    rot = head_size - offset if rot is None else rot
    g = _gen(seed)
    lead = (2, tokens) if batched else (tokens,)
    max_pos = 40
    positions = torch.randint(0, max_pos, lead, generator=g)
    cache = torch.randn(max_pos, rot, generator=g)
    hq, hk = 3, 1

    def make(heads: int) -> torch.Tensor:
        if layout == "flat":
            return _randn(g, *lead, heads * head_size, dtype=dtype)
        if layout == "heads":
            return _randn(g, *lead, heads, head_size, dtype=dtype)
        return _randn(g, *lead, heads, head_size + 5, dtype=dtype)[..., :head_size]

    query = make(hq)
    key = make(hk) if use_key else None
    q_ref = _rope_ref(query.reshape(*lead, hq, head_size), positions, cache, neox, offset,
                      inverse)
    k_ref = None if key is None else _rope_ref(key.reshape(*lead, hk, head_size), positions,
                                               cache, neox, offset, inverse)
    assert ops.rotary_embedding(positions, query, key, head_size, cache, neox, offset,
                                inverse) is None
    assert_close(query.reshape(*lead, hq, head_size), q_ref)
    if key is not None:
        assert_close(key.reshape(*lead, hk, head_size), k_ref)


def _vllm_rms_norm_native(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's RMSNorm.forward_native: x * rsqrt(mean(x^2) + eps) rounded to x's dtype,
    then times the weight in that dtype."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * w


def _rope_native(x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor,
                 neox: bool) -> torch.Tensor:
    """x [T, H, D]: the first rot dims rotated in fp32 (vLLM's forward_native)."""
    rot = cache.shape[1]
    cos, sin = cache[pos].float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    r = xf[..., :rot]
    if neox:
        x1, x2 = r[..., :rot // 2], r[..., rot // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = r[..., 0::2], r[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, xf[..., rot:]], dim=-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_ratio", [1.0, 0.5])
@pytest.mark.parametrize("tokens,heads", [(1, (4, 2)), (9, (8, 1))])
def test_fused_qk_norm_rope(dtype, neox, rotary_ratio, tokens, heads):
    """vLLM's test_fused_qk_norm_rope recipe: the fused op in place on qkv (v untouched)
    equals q_norm / k_norm (forward_native) then rotary (forward_native) within vLLM's
    tolerances (fp16 2e-3, bf16 1e-2)."""
    g = _gen(7)
    hq, hkv = heads
    d, eps = 64, 1e-6
    rot = int(d * rotary_ratio)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d + 5, generator=g).to(dtype)[:, 2:-3]
    before = qkv.clone()
    qw = torch.normal(1.0, 0.1, (d,), generator=g).to(dtype)
    kw = torch.normal(1.0, 0.1, (d,), generator=g).to(dtype)
    cache = mk.ops.build_rope_cache(rot, 256).to(dtype)
    pos = torch.randint(0, 256, (tokens,), generator=g)
    q = before[:, :hq * d].reshape(tokens, hq, d)
    k = before[:, hq * d:(hq + hkv) * d].reshape(tokens, hkv, d)
    want = torch.cat([
        _rope_native(_vllm_rms_norm_native(q, qw, eps), pos, cache, neox).flatten(1),
        _rope_native(_vllm_rms_norm_native(k, kw, eps), pos, cache, neox).flatten(1),
        before[:, (hq + hkv) * d:]], dim=1)
    ops.fused_qk_norm_rope(qkv, hq, hkv, hkv, d, eps, qw, kw, cache, neox, pos)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(qkv, want, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (hq + hkv) * d:], before[:, (hq + hkv) * d:])
    with pytest.raises(ValueError, match="columns"):
        ops.fused_qk_norm_rope(qkv, hq, hkv, hkv + 1, d, eps, qw, kw, cache, neox, pos)
    with pytest.raises(ValueError, match="position_ids"):
        ops.fused_qk_norm_rope(qkv, hq, hkv, hkv, d, eps, qw, kw, cache, neox, pos[:0])


def test_rotary_inverse_undoes_forward():
    g = _gen(1)
    positions = torch.tensor([0, 7, 3])
    cache = torch.randn(10, 8, generator=g)
    q = torch.randn(3, 2 * 8, generator=g)
    k = torch.randn(3, 8, generator=g)
    q0, k0 = q.clone(), k.clone()
    ops.rotary_embedding(positions, q, k, 8, cache, False)
    assert not torch.allclose(q, q0)
    # the cache holds unit (cos, sin) pairs only when built from angles: use real ones
    angles = torch.randn(10, 4, generator=g)
    cache = torch.cat([angles.cos(), angles.sin()], dim=1)
    q, k = q0.clone(), k0.clone()
    ops.rotary_embedding(positions, q, k, 8, cache, True)
    ops.rotary_embedding(positions, q, k, 8, cache, True, inverse=True)
    assert_close(q, q0)
    assert_close(k, k0)


# ------------------------------------------------------------------------ KV cache


def _caches(nb: int, bs: int, h: int, d: int, dtype: torch.dtype, hnd: bool):
    """Key / value caches [nb, bs, h, d] (an HND buffer permuted when hnd), zero-filled."""
    shape = (nb, h, bs, d) if hnd else (nb, bs, h, d)
    k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    return (k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)) if hnd else (k, v)


@given(kv_dtype=st.sampled_from(["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]), hnd=st.booleans(),
       per_head=st.booleans(), uint8=st.booleans(), pad_rows=st.sampled_from([0, 2]),
       dtype=dtypes, bs=st.sampled_from([1, 4]), seed=st.integers(0, 2**31))
def test_reshape_and_cache_flash(kv_dtype, hnd, per_head, uint8, pad_rows, dtype, bs, seed):
    g = _gen(seed)
    n, h, d, nb = 5, 2, 8, 3
    qkv = _randn(g, n + pad_rows, 3, h, d, dtype=dtype)
    _, key, value = qkv.unbind(1)                     # strided views, like vLLM's test
    slots = torch.randperm(nb * bs, generator=g)[:n]
    slots[1] = -1                                     # a skipped (padding) token
    fp8 = kv_dtype != "auto"
    fmt = torch.float8_e5m2 if kv_dtype == "fp8_e5m2" else FP8
    cache_dtype = (torch.uint8 if uint8 else fmt) if fp8 else dtype
    key_cache, value_cache = _caches(nb, bs, h, d, cache_dtype, hnd)
    k_scale = (key.float().abs().amax(dim=(0, 2)) / 64 if per_head
               else key.float().abs().amax() / 64).reshape(-1)
    v_scale = (value.float().abs().amax() / 64).reshape(())
    ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slots.long(), kv_dtype,
                                k_scale, v_scale)
    for src, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        got = cache.view(fmt).float() if fp8 else cache
        want = torch.zeros(got.shape, dtype=got.dtype)
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            row = src[t].float()
            if fp8:
                s = scale.reshape(-1, 1)
                row = _fp8_round(row, s, fmt).float()
            want[slot // bs, slot % bs] = row.to(want.dtype)
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_reshape_and_cache_flash_mixed_scale_counts(device, backend):
    """A per-head k_scale next to a per-tensor v_scale (and the reverse): each cache gets
    its own scale (the Triton kernel alone would read v_scale per head)."""
    g = _gen(6)
    key = _randn(g, 3, 2, 16).to(device)
    value = _randn(g, 3, 2, 16).to(device)
    slots = torch.tensor([4, 0, 2], device=device)
    per_head = torch.tensor([0.01, 0.02], device=device)
    per_tensor = torch.tensor([0.03], device=device)
    for k_scale, v_scale in ((per_head, per_tensor), (per_tensor, per_head)):
        kc, vc = (torch.zeros(3, 2, 2, 16, dtype=torch.uint8, device=device) for _ in "kv")
        with mk.use_backend(backend):
            ops.reshape_and_cache_flash(key, value, kc, vc, slots, "fp8", k_scale, v_scale)
        for src, cache, scale in ((key, kc, k_scale), (value, vc, v_scale)):
            want = (src.float() / scale.reshape(-1, 1)).clamp(-448, 448).to(FP8).float()
            got = cache.view(FP8).float().reshape(6, 2, 16)[slots]
            assert torch.equal(got, want)


@pytest.mark.parametrize("kv_dtype,fmt", [("fp8", FP8), ("fp8_e5m2", torch.float8_e5m2)])
def test_convert_fp8_round_trip(kv_dtype, fmt):
    g = _gen(2)
    x = torch.randn(3, 4, 8, generator=g).to(torch.bfloat16) * 1000    # e4m3 saturates
    q = torch.empty(3, 4, 8, dtype=torch.uint8)
    ops.convert_fp8(q, x, 0.05, kv_dtype)
    want = _fp8_round(x, torch.tensor(0.05), fmt)
    assert torch.equal(q.view(fmt).float(), want.float())
    back = torch.empty(3, 4, 8, dtype=torch.float32)
    ops.convert_fp8(back, q, 0.05, kv_dtype)
    assert torch.equal(back, want.float() * 0.05)
    assert back.isfinite().all()


# ------------------------------------------------------ legacy paged caches (x-split)


def _x_of(dtype: torch.dtype) -> int:
    """vLLM's x: 16 bytes of the cache dtype."""
    return 16 // torch.empty(0, dtype=dtype).element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.uint8, FP8) else t


def _sentinel(dtype: torch.dtype) -> torch.Tensor:
    """SENTINEL in a cache dtype (uint8: the bytes of its fp8 value)."""
    return _bytes(torch.tensor(SENTINEL).to(FP8)) if dtype == torch.uint8 else \
        torch.tensor(SENTINEL).to(dtype)


def _legacy_buffers(nb: int, h: int, d: int, bs: int, dtype: torch.dtype, strided: bool):
    """SENTINEL-filled legacy caches: (key_cache [nb, h, d / x, bs, x], value_cache
    [nb, h, d, bs], key buffer, value buffer); strided: views inside wider buffers."""
    x = _x_of(dtype)
    fill = _sentinel(dtype)
    pad = 2 if strided else 0
    kbuf = fill.expand(nb, h, d // x, bs, x + pad).clone()
    vbuf = fill.expand(nb, h, d, bs + pad).clone()
    lo = pad // 2
    return kbuf[..., lo:lo + x], vbuf[..., lo:lo + bs], kbuf, vbuf


def _fp8_round(t: torch.Tensor, scale: torch.Tensor, fmt: torch.dtype = FP8) -> torch.Tensor:
    top = torch.finfo(fmt).max
    return (t.float() / scale).clamp(-top, top).to(fmt)


@given(kv_dtype=st.sampled_from(["auto", "fp8", "fp8_e4m3"]), uint8=st.booleans(),
       per_head=st.booleans(), pad_rows=st.sampled_from([0, 2]), dtype=dtypes,
       bs=st.sampled_from([8, 16]), d_mult=st.sampled_from([1, 3]), strided=st.booleans(),
       seed=st.integers(0, 2**31))
def test_reshape_and_cache_legacy_layout(kv_dtype, uint8, per_head, pad_rows, dtype, bs,
                                         d_mult, strided, seed):
    g = _gen(seed)
    fp8 = kv_dtype != "auto"
    cache_dtype = (torch.uint8 if uint8 else FP8) if fp8 else dtype
    x = _x_of(cache_dtype)
    n, h, d, nb = 6, 2, d_mult * x, 3
    qkv = _randn(g, n + pad_rows, 3, h, d, dtype=dtype)
    _, key, value = qkv.unbind(1)                     # strided views, like vLLM's test
    slots = torch.randperm(nb * bs, generator=g)[:n]
    slots[2] = -1                                     # a skipped (padding) token
    key_cache, value_cache, kbuf, vbuf = _legacy_buffers(nb, h, d, bs, cache_dtype, strided)
    k_scale = ((key.float().abs().amax(dim=(0, 2)) if per_head
                else key.float().abs().amax().reshape(1)) / 64)
    v_scale = (value.float().abs().amax() / 64).reshape(())        # 0-d, as vLLM's tests
    want_k, want_v = key_cache.contiguous().flatten(), value_cache.contiguous().flatten()
    k_before, v_before = kbuf.clone(), vbuf.clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache,
                          slots.int() if pad_rows else slots, kv_dtype, k_scale, v_scale)
    # vLLM's kernel: element e of head hh of token t at flat index (contiguous layouts)
    # key: (((block * h + hh) * (D / x) + e / x) * bs + offset) * x + e % x
    # value: ((block * h + hh) * D + e) * bs + offset
    hh, dd = torch.arange(h)[:, None], torch.arange(d)[None, :]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        kidx = (((blk * h + hh) * (d // x) + dd // x) * bs + off) * x + dd % x
        vidx = ((blk * h + hh) * d + dd) * bs + off
        for want, src, idx, scale in ((want_k, key, kidx, k_scale), (want_v, value, vidx,
                                                                    v_scale)):
            row = _bytes(_fp8_round(src[t], scale.reshape(-1, 1))) if fp8 else src[t]
            _bytes(want)[idx] = row
    assert torch.equal(_bytes(key_cache.contiguous().flatten()), _bytes(want_k))
    assert torch.equal(_bytes(value_cache.contiguous().flatten()), _bytes(want_v))
    if strided:                                       # the buffers' margins untouched
        assert torch.equal(_bytes(kbuf[..., 0]), _bytes(k_before[..., 0]))
        assert torch.equal(_bytes(vbuf[..., -1]), _bytes(v_before[..., -1]))
    # the same tokens through reshape_and_cache_flash: the same bytes, in the other layout
    flash_k, flash_v = (_sentinel(cache_dtype).expand(nb, bs, h, d).clone() for _ in "kv")
    ops.reshape_and_cache_flash(key, value, flash_k, flash_v, slots, kv_dtype, k_scale, v_scale)
    assert torch.equal(_bytes(key_cache.permute(0, 3, 1, 2, 4).reshape(nb, bs, h, d)),
                       _bytes(flash_k))
    assert torch.equal(_bytes(value_cache.permute(0, 3, 1, 2)), _bytes(flash_v))


def _legacy_attention_ref(query, key_cache, value_cache, block_tables, seq_lens, scale,
                          alibi_slopes, k_scale=None, v_scale=None):
    """vLLM's test formula in fp64: gather each sequence's keys / values token by token
    from the legacy layouts, repeat kv heads for GQA, ALiBi bias slope * (j - seq_len + 1),
    softmax."""
    hkv, d, bs = value_cache.shape[1], value_cache.shape[2], value_cache.shape[3]

    def deq(t, s):
        return t.double() if s is None else t.view(FP8).double() * float(s)
    out = torch.zeros(query.shape, dtype=torch.float64)
    for i, n in enumerate(seq_lens.tolist()):
        ks, vs = [], []
        for j in range(n):
            blk, off = int(block_tables[i, j // bs]), j % bs
            ks.append(deq(key_cache[blk, :, :, off, :], k_scale).reshape(hkv, d))
            vs.append(deq(value_cache[blk, :, :, off], v_scale))
        rep = query.shape[1] // hkv
        k = torch.stack(ks).repeat_interleave(rep, 1)                  # [n, Hq, D]
        v = torch.stack(vs).repeat_interleave(rep, 1)
        s = scale * torch.einsum("hd,nhd->hn", query[i].double(), k)
        if alibi_slopes is not None:
            s = s + alibi_slopes.double()[:, None] * (torch.arange(n) - n + 1).double()
        out[i] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


@given(version=st.sampled_from(["v1", "v2"]), dtype=dtypes, bs=st.sampled_from([8, 16]),
       heads=st.sampled_from([(4, 2), (3, 1), (2, 2)]), d_mult=st.sampled_from([1, 3]),
       alibi=st.booleans(), kv_dtype=st.sampled_from(["auto", "fp8"]), uint8=st.booleans(),
       many_blocks=st.booleans(), strided_out=st.booleans(), seed=st.integers(0, 2**31))
def test_paged_attention_legacy_layout(version, dtype, bs, heads, d_mult, alibi, kv_dtype,
                                       uint8, many_blocks, strided_out, seed):
    g = _gen(seed)
    hq, hkv = heads
    fp8 = kv_dtype == "fp8"
    cache_dtype = (torch.uint8 if uint8 else FP8) if fp8 else dtype
    d = d_mult * _x_of(cache_dtype)
    lens = [1, bs + 3, 2 * bs]                        # one token, a partial block, full
    nb = 20 if many_blocks else 4                     # block copy: table's / whole cache
    width = -(-max(lens) // bs) + 1                   # and one column no length reaches
    table = torch.randint(0, nb, (len(lens), width), generator=g, dtype=torch.int32)
    table[:, -1] = 10**6                              # never read: may be anything
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(0.03)
    kc = torch.randn(nb, hkv, d // _x_of(cache_dtype), bs, _x_of(cache_dtype), generator=g)
    vc = torch.randn(nb, hkv, d, bs, generator=g)
    if fp8:
        kc, vc = _fp8_round(kc, k_scale), _fp8_round(vc, v_scale)
        kc, vc = (kc.view(torch.uint8), vc.view(torch.uint8)) if uint8 else (kc, vc)
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
    # slots no sequence reads hold NaN (fp8: byte 0x7F): the result must not see them
    read = torch.zeros(nb, bs, dtype=torch.bool)
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        read[table[i, pos // bs].long(), pos % bs] = True
    nan = torch.tensor(0x7F, dtype=torch.uint8) if fp8 else torch.tensor(math.nan).to(dtype)
    for blk, off in (~read).nonzero().tolist():
        _bytes(kc)[blk, :, :, off, :] = nan
        _bytes(vc)[blk, :, :, off] = nan
    query = _randn(g, len(lens), hq, d, dtype=dtype)
    slopes = torch.rand(hq, generator=g) * 0.5 if alibi else None
    scale = d ** -0.5
    out, buf = _out_view((len(lens), hq, d), dtype, strided_out)
    args = (query, kc, vc, hkv, scale, table, seq_lens, bs, max(lens) + 5, slopes, kv_dtype,
            k_scale, v_scale)
    if version == "v1":
        ops.paged_attention_v1(out, *args)
    else:
        parts = -(-(max(lens) + 5) // 512)
        exp_sum = torch.full((len(lens), hq, parts), SENTINEL)
        max_logits = torch.full((len(lens), hq, parts), SENTINEL)
        tmp_out = torch.full((len(lens), hq, parts, d), SENTINEL).to(dtype)
        ops.paged_attention_v2(out, exp_sum, max_logits, tmp_out, *args)
        for t in (exp_sum, max_logits, tmp_out):        # only out is defined
            assert (t.float() == SENTINEL).all()
    want = _legacy_attention_ref(query, kc, vc, table, seq_lens, scale, slopes,
                                 k_scale if fp8 else None, v_scale if fp8 else None)
    assert_close(out, want.to(dtype))
    _untouched_margins(buf, out)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_then_paged_attention_round_trip(device, backend, kv_dtype, dtype):
    """Prefill writes every token with reshape_and_cache; a decode step over the cache
    equals attention over the original key / value (fp8: over their fp8 roundings), on
    the reference and on the Triton decode kernel (the interpreter on a CPU)."""
    g = _gen(7)
    bs, hq, hkv, nb = 8, 4, 2, 12
    fp8 = kv_dtype != "auto"
    fmt = torch.float8_e5m2 if kv_dtype == "fp8_e5m2" else FP8
    cache_dtype = torch.uint8 if fp8 else dtype
    d = 2 * _x_of(cache_dtype)
    lens = [1, 11, 21]
    blocks = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), 3, dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(lens):
        need = -(-n // bs)
        table[i, :need] = blocks[used:used + need].int()
        used += need
        slots += [int(table[i, j // bs]) * bs + j % bs for j in range(n)]
    key = _randn(g, sum(lens), hkv, d, dtype=dtype)
    value = _randn(g, sum(lens), hkv, d, dtype=dtype)
    kc, vc, _, _ = _legacy_buffers(nb, hkv, d, bs, cache_dtype, strided=False)
    k_scale, v_scale = torch.tensor([0.02]), torch.tensor([0.03])
    query = _randn(g, len(lens), hq, d, dtype=dtype)
    slopes = torch.rand(hq, generator=g)
    on = [t.to(device) for t in (key, value, kc, vc, k_scale, v_scale, query, slopes, table)]
    with mk.use_backend(backend):
        ops.reshape_and_cache(*on[:4], torch.tensor(slots, device=device), kv_dtype, *on[4:6])
        out = torch.empty_like(on[6])
        ops.paged_attention_v1(out, on[6], on[2], on[3], hkv, 0.3, on[8],
                               torch.tensor(lens, dtype=torch.int32, device=device), bs,
                               max(lens), on[7], kv_dtype, *on[4:6])
    if fp8:
        key = _fp8_round(key, k_scale, fmt).float() * k_scale
        value = _fp8_round(value, v_scale, fmt).float() * v_scale
    want, start = [], 0
    for i, n in enumerate(lens):
        k = key[start:start + n].double().repeat_interleave(hq // hkv, 1)
        v = value[start:start + n].double().repeat_interleave(hq // hkv, 1)
        s = 0.3 * torch.einsum("hd,nhd->hn", query[i].double(), k)
        s = s - slopes.double()[:, None] * (n - 1 - torch.arange(n)).double()
        want.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
        start += n
    assert_close(out.cpu(), torch.stack(want).to(dtype))


# ---------------------------------------------------------------- merge attn states


def _merge_ref(p_out, p_lse, s_out, s_lse, ctx):
    """vLLM's test formula (lse [H, T]; +inf means empty), in fp64, tokens >= ctx: suffix."""
    p = p_lse.double().masked_fill(p_lse == math.inf, -math.inf)
    s = s_lse.double().masked_fill(s_lse == math.inf, -math.inf)
    mx = torch.maximum(p, s)
    pe, se = torch.exp(p - mx), torch.exp(s - mx)
    total = pe + se
    lse = torch.log(total) + mx
    out = p_out.double() * (pe / total).t().unsqueeze(-1) + \
        s_out.double() * (se / total).t().unsqueeze(-1)
    out[ctx:] = s_out[ctx:].double()
    lse[:, ctx:] = s_lse[:, ctx:].double()
    return out, lse.float()


@given(tokens=st.sampled_from([1, 6]), heads=st.sampled_from([1, 3]),
       head_size=st.sampled_from([4, 10]), dtype=dtypes, with_lse=st.booleans(),
       ctx=st.sampled_from([None, 0, 2]), fp8_out=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**31))
def test_merge_attn_states(tokens, heads, head_size, dtype, with_lse, ctx, fp8_out, strided,
                           seed):
    g = _gen(seed)
    p_out = _randn(g, tokens, heads, head_size, dtype=dtype, strided=strided)
    s_out = _randn(g, tokens, heads, head_size, dtype=dtype)
    p_lse = torch.randn(heads, tokens, generator=g)
    s_lse = torch.randn(tokens, heads, generator=g).t()       # a transposed view
    mask = torch.rand(heads, tokens, generator=g)
    p_lse[mask < 0.2] = math.inf                              # FA2's empty rows
    s_lse[(mask > 0.8)] = -math.inf
    scale = torch.tensor([0.05]) if fp8_out else None
    output, buf = _out_view((tokens, heads, head_size), FP8 if fp8_out else dtype, strided)
    lse_buf = torch.full((heads, tokens + 1), SENTINEL)
    output_lse = lse_buf[:, 1:] if with_lse else None
    ops.merge_attn_states(output, p_out, p_lse, s_out, s_lse, output_lse, ctx, scale)
    want, want_lse = _merge_ref(p_out, p_lse, s_out, s_lse, tokens if ctx is None else ctx)
    if fp8_out:
        q = (want.float() / 0.05).clamp(-448, 448).to(FP8)
        # at most one e4m3 step (3 mantissa bits; 2^-9 below the normal range) apart
        torch.testing.assert_close(output.float(), q.float(), atol=2.0**-9, rtol=0.125)
    else:
        assert_close(output, want.to(dtype))
    _untouched_margins(buf, output)
    if with_lse:
        torch.testing.assert_close(output_lse, want_lse, **TOL[torch.float32])
        assert (lse_buf[:, 0] == SENTINEL).all()


def test_merge_attn_states_both_empty_gives_zero():
    out = torch.full((1, 1, 4), SENTINEL)
    lse = torch.zeros(1, 1)
    inf = torch.full((1, 1), math.inf)
    ops.merge_attn_states(out, torch.ones(1, 1, 4), inf, torch.ones(1, 1, 4), -inf, lse)
    assert torch.equal(out, torch.zeros(1, 1, 4)) and lse.item() == -math.inf


# ------------------------------------------------------------------- int8 / fp8 W8A8


def test_scaled_int8_quant_and_cutlass_scaled_mm():
    g = _gen(3)
    x = _randn(g, 5, 24, dtype=torch.bfloat16, strided=True)
    x_q, x_s, azp = ops.scaled_int8_quant(x)
    assert azp is None and x_q.dtype == torch.int8 and list(x_s.shape) == [5, 1]
    s_ref = x.float().abs().amax(-1, keepdim=True) / 127
    assert torch.equal(x_s, s_ref)
    assert torch.equal(x_q, torch.round(x.float() / s_ref).clamp(-128, 127).to(torch.int8))
    # asymmetric, static
    sc, zp = torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32)
    q2, s2, z2 = ops.scaled_int8_quant(x, sc, zp, symmetric=False)
    assert s2 is sc and z2 is zp
    assert torch.equal(q2, (torch.round(x.float() / 0.02) + 3).clamp(-128, 127).to(torch.int8))
    # GEMM: b = weight.t() (column-major), per-token x per-channel scales, bias
    w_q = torch.randint(-128, 128, (7, 24), generator=g, dtype=torch.int8)
    w_s = torch.rand(7, 1, generator=g) / 100
    bias = torch.randn(7, generator=g).to(torch.bfloat16)
    y = ops.cutlass_scaled_mm(x_q, w_q.t(), x_s, w_s, torch.bfloat16, bias)
    ref = (x_s * (x_q.double() @ w_q.double().t()).float() * w_s.t() + bias.float())
    assert_close(y, ref.to(torch.bfloat16))


def test_cutlass_scaled_mm_block_fp8():
    g = _gen(4)
    m, k, n = 3, 256, 200                                    # N not a multiple of 128
    a = (torch.randn(m, k, generator=g) * 4).to(FP8)
    b = (torch.randn(n, k, generator=g) * 4).to(FP8).t()     # [K, N] column-major
    sa = torch.rand(m, 2, generator=g) + 0.5
    sb = torch.rand(2, 2, generator=g) + 0.5
    bias = torch.randn(n, generator=g).to(torch.float16)
    y = ops.cutlass_scaled_mm(a, b, sa, sb, torch.float16, bias)
    af = a.float() * sa.repeat_interleave(128, 1)
    bf = b.float() * sb.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :n]
    assert_close(y, (af.double() @ bf.double() + bias.double()).to(torch.float16))


def _fp8_ref(x: torch.Tensor, s: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    v = x.float() * (1.0 / s) if reciprocal else x.float() / s
    return v.clamp(-448, 448).to(FP8)


@given(m=st.sampled_from([1, 4]), n=st.sampled_from([3, 16]), dtype=dtypes,
       mode=st.sampled_from(["tensor", "token", "token_ub", "static", "channel", "group"]),
       strided=st.booleans(), padding=st.sampled_from([None, 6]), seed=st.integers(0, 2**31))
def test_scaled_fp8_quant(m, n, dtype, mode, strided, padding, seed):
    g = _gen(seed)
    x = (_randn(g, m, n, dtype=torch.float32, strided=strided) * 30).to(dtype)
    xf = x.float()
    kw: dict = {"num_token_padding": padding}
    if mode == "tensor":
        s = (xf.abs().amax() / 448).reshape(1)
        want, recip = s, True
    elif mode.startswith("token"):
        amax = xf.abs().amax(-1, keepdim=True)
        kw["use_per_token_if_dynamic"] = True
        if mode == "token_ub":
            kw["scale_ub"] = torch.tensor([10.0])
            amax = amax.clamp(max=10.0)
        s = (amax / 448).clamp(min=1 / (448 * 512))
        want, recip = s, False
    else:
        want = {"static": torch.tensor([0.07]), "channel": torch.rand(n, generator=g) + 0.01,
                "group": torch.rand(m, 1, generator=g) + 0.01}[mode]
        kw["scale"] = want
        s, recip = (want.reshape(1, -1) if mode == "channel" else want), True
    out, scale = ops.scaled_fp8_quant(x, **kw)
    rows = max(m, padding or 0)
    assert out.dtype == FP8 and list(out.shape) == [rows, n]
    assert torch.equal(out[:m].float(), _fp8_ref(x, s, recip).float())
    assert (out[m:].float() == 0).all()
    if "scale" in kw:
        assert scale is want
    else:
        assert torch.equal(scale[:m].reshape(s.shape), s)
        if mode != "tensor":
            assert list(scale.shape) == [rows, 1]


def test_scaled_fp8_quant_output_buffer_and_zero_input():
    buf = torch.zeros(3, 10, dtype=FP8)
    view = buf[:, 2:7]
    x = torch.zeros(3, 5, dtype=torch.float16)
    x[1, 2] = 4.0
    out, s = ops.scaled_fp8_quant(x, output=view)
    assert out is view and torch.equal(s, torch.tensor([4.0]) / 448)
    assert view[1, 2].float().item() == 448 and buf[:, :2].float().abs().sum() == 0
    out, s = ops.scaled_fp8_quant(torch.zeros(2, 4))          # all zero: scale 0, q 0
    assert s.item() == 0 and (out.float() == 0).all()
    grouped, _ = ops.scaled_fp8_quant(x.float() * 0 + 1, torch.tensor([[0.5], [0.25]]),
                                      group_shape=(2, -1))    # rows 0-1 and 2 (ceil)
    assert grouped[:, 0].float().tolist() == [2.0, 2.0, 4.0]


# ----------------------------------------------------------------------------- MoE


def _align_ref(ids: torch.Tensor, e: int, bs: int, expert_map=None):
    """Per-expert runs of pair ids, each padded with the sentinel to block_size."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    sorted_ids, experts = [], []
    for ex in range(e):
        run = [p for p, v in enumerate(flat) if v == ex]
        if not run:
            continue
        blocks = -(-len(run) // bs)
        sorted_ids += run + [n] * (blocks * bs - len(run))
        experts += [ex if expert_map is None else int(expert_map[ex])] * blocks
    return sorted_ids, experts


@given(tokens=st.sampled_from([1, 3, 9]), topk=st.sampled_from([1, 2]),
       e=st.sampled_from([4, 7]), bs=st.sampled_from([2, 8]), extra=st.sampled_from([0, 5]),
       use_map=st.booleans(), int64=st.booleans(), seed=st.integers(0, 2**31))
def test_moe_align_block_size_fills_buffers(tokens, topk, e, bs, extra, use_map, int64, seed):
    g = _gen(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(tokens)])
    ids = ids.to(torch.int64 if int64 else torch.int32)
    n = ids.numel()
    size = min(n + e * (bs - 1), n * bs) + extra              # vLLM's size, or bigger
    sorted_ids = torch.full((size,), -5, dtype=torch.int32)
    expert_buf = torch.full((2 * (-(-size // bs)),), -5, dtype=torch.int32)
    expert_ids = expert_buf[::2]                              # a strided out buffer
    post = torch.zeros(1, dtype=torch.int32)
    emap = torch.tensor([i // 2 if i % 2 == 0 else -1 for i in range(e)], dtype=torch.int32)
    ops.moe_align_block_size(ids, e, bs, sorted_ids, expert_ids, post,
                             emap if use_map else None)
    want_ids, want_experts = _align_ref(ids, e, bs, emap if use_map else None)
    used = len(want_ids)
    assert post.item() == used
    assert sorted_ids.tolist() == want_ids + [n] * (size - used)
    assert expert_ids.tolist() == want_experts + [-1] * (expert_ids.numel() - len(want_experts))
    assert (expert_buf[1::2] == -5).all()


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_softmax_fills_buffers(renormalize, ids_dtype, dtype):
    g = _gen(5)
    t, e, k = 5, 9, 3
    logits = _randn(g, t, e, dtype=dtype, strided=True)
    weights, w_buf = _out_view((t, k), torch.float32, strided=True)
    ids = torch.empty(t, k, dtype=ids_dtype)
    tei = torch.empty(t, k, dtype=torch.int32)
    ops.topk_softmax(weights, ids, tei, logits, renormalize)
    probs = torch.softmax(logits.double(), -1)
    top = probs.topk(k, -1)
    want = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    assert torch.equal(ids, top.indices.to(ids_dtype))
    torch.testing.assert_close(weights.double(), want, atol=1e-6, rtol=1e-5)
    assert tei.tolist() == [[j * t + i for j in range(k)] for i in range(t)]
    _untouched_margins(w_buf, weights)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_sigmoid_fills_buffers(renormalize, with_bias):
    """vLLM's topk_sigmoid: choose on sigmoid(logits) + e_score_correction_bias, weights
    the unbiased scores (renormalize: over their sum), written into strided buffers."""
    g = _gen(6)
    t, e, k = 5, 9, 3
    logits = _randn(g, t, e, dtype=torch.float32, strided=True)
    bias = _randn(g, e) * 0.5 if with_bias else None
    weights, w_buf = _out_view((t, k), torch.float32, strided=True)
    ids = torch.empty(t, k, dtype=torch.int64)
    tei = torch.empty(t, k, dtype=torch.int32)
    ops.topk_sigmoid(weights, ids, tei, logits, renormalize, bias)
    s = torch.sigmoid(logits.double())
    choice = s + bias.double() if with_bias else s
    top = choice.topk(k, -1).indices
    want = s.gather(1, top)
    want = want / want.sum(-1, keepdim=True) if renormalize else want
    assert torch.equal(ids, top)
    torch.testing.assert_close(weights.double(), want, atol=1e-6, rtol=1e-5)
    assert tei.tolist() == [[j * t + i for j in range(k)] for i in range(t)]
    _untouched_margins(w_buf, weights)


def test_grouped_topk_sigmoid():
    """vLLM's grouped_topk with sigmoid scoring and a correction bias: the experts come
    from the topk_group best groups (two best biased scores each), weights unbiased,
    renormalized, scaled; softmax scoring is refused by name."""
    g = _gen(8)
    t, e, k, groups, keep = 6, 16, 3, 4, 2
    logits = _randn(g, t, e)
    bias = _randn(g, e) * 0.2
    w, ids = ops.grouped_topk(torch.zeros(t, 8), logits, k, True, groups, keep, "sigmoid",
                              2.5, bias)
    s = torch.sigmoid(logits.double())
    choice = s + bias.double()
    gs = choice.view(t, groups, -1).topk(2, -1).values.sum(-1)
    mask = torch.zeros(t, groups, dtype=torch.bool).scatter_(1, gs.topk(keep, -1).indices,
                                                             True)
    choice = choice.masked_fill(~mask.repeat_interleave(e // groups, 1), float("-inf"))
    want_ids = choice.topk(k, -1).indices
    want = s.gather(1, want_ids)
    want = want / want.sum(-1, keepdim=True) * 2.5
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="scoring_func must be 'sigmoid'"):
        ops.grouped_topk(torch.zeros(t, 8), logits, k, True, groups, keep)


# -------------------------------------------------------------------------- errors


def _x(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def _i32(*rows):
    return torch.tensor(rows, dtype=torch.int32)


def _paged(version="v1", **change):
    """A paged_attention_v1 / v2 call on valid legacy fp32 caches (x = 4, block_size 4),
    one argument changed."""
    kw = {"out": _x(1, 2, 8), "query": _x(1, 2, 8), "key_cache": _x(3, 1, 2, 4, 4),
          "value_cache": _x(3, 1, 8, 4), "num_kv_heads": 1, "scale": 0.5,
          "block_tables": _i32([0, 2]), "seq_lens": torch.tensor([5], dtype=torch.int32),
          "block_size": 4, "max_seq_len": 5, "alibi_slopes": None, "kv_cache_dtype": "auto",
          "k_scale": _x(1), "v_scale": _x(1)}
    if version == "v2":
        kw.update(exp_sum=_x(1, 2, 1), max_logits=_x(1, 2, 1), tmp_out=_x(1, 2, 1, 8))
    kw.update(change)
    return lambda: getattr(ops, f"paged_attention_{version}")(**kw)


def _legacy_write(**change):
    kw = {"key": _x(2, 1, 8), "value": _x(2, 1, 8), "key_cache": _x(3, 1, 2, 4, 4),
          "value_cache": _x(3, 1, 8, 4), "slot_mapping": torch.tensor([0, 5]),
          "kv_cache_dtype": "auto", "k_scale": _x(1), "v_scale": _x(1)}
    kw.update(change)
    return lambda: ops.reshape_and_cache(**kw)


@pytest.mark.parametrize("call, name", [
    (lambda: ops.rms_norm(_x(2, 4), _x(2, 4), _x(5), 1e-6), "weight"),
    (lambda: ops.rms_norm(_x(2, 5), _x(2, 4), _x(4), 1e-6), "out"),
    (lambda: ops.rms_norm(_x(2, 4, dtype=torch.float16), _x(2, 4), _x(4), 1e-6), "out"),
    (lambda: ops.rms_norm(_x(2, 4), _x(2, 4), _x(4), -1.0), "epsilon"),
    (lambda: ops.fused_add_rms_norm(_x(2, 4), _x(3, 4), _x(4), 1e-6), "residual"),
    (lambda: ops.gemma_rms_norm(_x(2, 4), _x(2, 4), None, 1e-6), "weight"),
    (lambda: ops.silu_and_mul(_x(2, 3), _x(2, 6)[:, :5]), "input"),
    (lambda: ops.gelu_and_mul(_x(2, 4), _x(2, 6)), "out"),
    (lambda: ops.rotary_embedding(_x(3, dtype=torch.int64), _x(3, 10), None, 4,
                                  _x(8, 4), True), "query"),
    (lambda: ops.rotary_embedding(_x(3, dtype=torch.int64), _x(3, 8), _x(2, 8), 4,
                                  _x(8, 4), True), "key"),
    (lambda: ops.rotary_embedding(_x(3), _x(3, 8), None, 4, _x(8, 4), True), "positions"),
    (lambda: ops.rotary_embedding(_x(3, dtype=torch.int64), _x(3, 8), None, 4, _x(8, 4),
                                  True, 2), "rope_dim_offset"),
    (lambda: ops.rotary_embedding(torch.tensor([9]), _x(1, 8), None, 4, _x(8, 4), True),
     "positions"),
    (lambda: ops.reshape_and_cache_flash(_x(2, 1, 4), _x(2, 1, 4), _x(3, 2, 1, 4),
                                         _x(3, 2, 1, 4), torch.tensor([0, 1]), "fp8_inc",
                                         _x(1), _x(1)), "kv_cache_dtype"),
    (lambda: ops.reshape_and_cache_flash(_x(2, 1, 4), _x(2, 1, 4), _x(3, 2, 1, 4),
                                         _x(3, 2, 1, 4), torch.tensor([0, 1]), "fp8",
                                         _x(1), _x(1)), "key_cache"),
    (lambda: ops.reshape_and_cache_flash(_x(2, 1, 4), _x(2, 1, 4), _x(3, 2, 1, 4),
                                         _x(3, 2, 1, 4), torch.tensor([0, 1, 2]), "auto",
                                         _x(1), _x(1)), "slot_mapping"),
    (lambda: ops.reshape_and_cache_flash(_x(2, 1, 4), _x(2, 1, 4), _x(3, 2, 1, 4),
                                         _x(3, 2, 1, 4), torch.tensor([0, 9]), "auto",
                                         _x(1), _x(1)), "slot_mapping"),
    (_legacy_write(key_cache=_x(3, 1, 2, 4, 3)), "key_cache"),       # x = 3 does not divide 8
    (_legacy_write(value_cache=_x(3, 1, 8, 5)), "key_cache"),         # block sizes differ
    (_legacy_write(slot_mapping=torch.tensor([0, 12])), "slot_mapping"),
    (_legacy_write(kv_cache_dtype="fp8"), "key_cache"),              # fp32 caches for fp8
    (_legacy_write(interleaved_v=True), "interleaved_v"),
    (_paged(blocksparse_vert_stride=8), "blocksparse_vert_stride"),
    (_paged("v2", blocksparse_vert_stride=2), "blocksparse_vert_stride"),
    (_paged(block_size=8), "block_size"),
    (_paged(num_kv_heads=2), "num_kv_heads"),
    (_paged(max_seq_len=4), "max_seq_len"),
    (_paged(block_tables=_i32([0, 3])), "block_tables"),             # block 3 of 3
    (_paged(block_tables=_i32([0, 2]).long()), "block_tables"),
    (_paged(seq_lens=torch.tensor([5])), "seq_lens"),                # int64
    (_paged(scale=0.0), "scale"),
    (_paged(out=_x(1, 2, 8, dtype=torch.float16)), "out"),
    (_paged("v2", exp_sum=_x(1, 2, 1, dtype=torch.float16)), "exp_sum"),
    (_paged("v2", tmp_out=_x(1, 2, 2, 8)), "tmp_out"),
    (lambda: ops.merge_attn_states(_x(2, 1, 4), _x(2, 1, 4), _x(2, 1), _x(2, 1, 4),
                                   _x(1, 2)), "prefix_lse"),
    (lambda: ops.merge_attn_states(_x(2, 1, 4), _x(2, 1, 4), _x(1, 2), _x(2, 1, 4),
                                   _x(1, 2), output_scale=_x(1)), "output"),
    (lambda: ops.scaled_int8_quant(_x(2, 4, dtype=torch.int8)), "input"),
    (lambda: ops.cutlass_scaled_mm(_x(2, 4, dtype=torch.int8), _x(4, 3, dtype=torch.int8),
                                   _x(3), _x(1), torch.float16), "scale_a"),
    (lambda: ops.scaled_fp8_quant(_x(2, 4), scale=_x(3)), "scale"),
    (lambda: ops.scaled_fp8_quant(_x(2, 4), scale_ub=torch.ones(1)), "scale_ub"),
    (lambda: ops.scaled_fp8_quant(_x(2, 4), output=_x(2, 4)), "output"),
    (lambda: ops.moe_align_block_size(torch.zeros(2, 2, dtype=torch.int32), 4, 4,
                                      torch.empty(3, dtype=torch.int32),
                                      torch.empty(8, dtype=torch.int32),
                                      torch.empty(1, dtype=torch.int32)), "sorted_token_ids"),
    (lambda: ops.moe_align_block_size(torch.zeros(2, 2, dtype=torch.int32), 4, 4,
                                      torch.empty(16, dtype=torch.int32),
                                      torch.empty(4, dtype=torch.int64),
                                      torch.empty(1, dtype=torch.int32)), "experts_ids"),
    (lambda: ops.moe_align_block_size(torch.zeros(2, 2, dtype=torch.int32), 4, 4,
                                      torch.empty(16, dtype=torch.int32),
                                      torch.empty(4, dtype=torch.int32),
                                      torch.empty(1, dtype=torch.int32),
                                      scatter_idx=_x(4)), "scatter_idx"),
    (lambda: ops.topk_softmax(_x(2, 5), torch.empty(2, 5, dtype=torch.int32),
                              torch.empty(2, 5, dtype=torch.int32), _x(2, 4)), "topk_weights"),
    (lambda: ops.topk_softmax(_x(2, 2), torch.empty(2, 2, dtype=torch.int32),
                              torch.empty(2, 2, dtype=torch.int64), _x(2, 4)),
     "token_expert_indices"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert name in str(err.value)


# ------------------------------------------ fused_recurrent_gated_delta_rule (FLA / vLLM)
def _gdr_loop(q, k, v, g, beta, h0, scale, l2norm):
    """One sequence, token by token in fp64: q, k [L, H, K], v [L, HV, V], g / beta
    [L, HV], h0 [HV, K, V] -> (o [L, HV, V], final state)."""
    q, k, v, g, beta, h = (x.double() for x in (q, k, v, g, beta, h0))
    rep = v.shape[1] // q.shape[1]
    if l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    o = torch.zeros(v.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        for hv in range(v.shape[1]):
            qt, kt = q[t, hv // rep] * scale, k[t, hv // rep]
            h[hv] = h[hv] * math.exp(float(g[t, hv]))
            h[hv] += torch.outer(kt, float(beta[t, hv]) * (v[t, hv] - kt @ h[hv]))
            o[t, hv] = qt @ h[hv]
    return o, h


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_fused_recurrent_gated_delta_rule_pool(backend, pool_dtype, device):
    """Prefill chunks and decode rows in one varlen call (B = 1, cu_seqlens), states from
    and to a pool through ssm_state_indices, a -1 padding row; bf16 pools rounded back."""
    g_ = _gen(40)
    lens, h, hv, kd, vd = [3, 1, 0, 2], 1, 2, 5, 6
    tt = sum(lens)
    q = torch.randn(1, tt, h, kd, generator=g_).to(torch.bfloat16)
    k = torch.randn(1, tt, h, kd, generator=g_).to(torch.bfloat16)
    v = torch.randn(1, tt, hv, vd, generator=g_).to(torch.bfloat16)
    g = -torch.rand(1, tt, hv, generator=g_)
    beta = torch.rand(1, tt, hv, generator=g_)
    pool = torch.randn(5, hv, kd, vd, generator=g_).to(pool_dtype)
    before = pool.clone()
    slots = torch.tensor([4, -1, 0, 2], dtype=torch.int32)
    cu = torch.tensor([0, 3, 4, 4, 6], dtype=torch.int32)
    dev = [x.to(device) for x in (q, k, v, g, beta, pool, cu, slots)]
    with mk.use_backend(backend):
        o, final = ops.fused_recurrent_gated_delta_rule(
            *dev[:5], scale=0.5, initial_state=dev[5], cu_seqlens=dev[6],
            ssm_state_indices=dev[7], use_qk_l2norm_in_kernel=True)
    assert final is dev[5] and o.shape == (1, tt, hv, vd) and o.dtype == torch.bfloat16
    o, final = o.cpu()[0], final.cpu()
    for i, slot in enumerate(slots.tolist()):
        a, b = int(cu[i]), int(cu[i + 1])
        if slot < 0:
            assert torch.equal(o[a:b], torch.zeros_like(o[a:b]))
            continue
        want_o, want_h = _gdr_loop(q[0, a:b], k[0, a:b], v[0, a:b], g[0, a:b], beta[0, a:b],
                                   before[slot].float(), 0.5, True)
        assert_close(o[a:b], want_o.to(torch.bfloat16))
        assert_close(final[slot], want_h.to(pool_dtype),
                     scale=10 if pool_dtype == torch.float32 else 1)
    assert torch.equal(final[[1, 3]], before[[1, 3]])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_recurrent_gated_delta_rule_batch(backend, device):
    """Equal-length rows (no cu_seqlens): with initial_state (slot i per row, in place)
    and without (a new fp32 final state); beta None = ones; GVA (HV = 2 H)."""
    g_ = _gen(41)
    b, tt, h, hv, kd, vd = 2, 3, 1, 2, 8, 4
    q, k = (torch.randn(b, tt, h, kd, generator=g_) * kd ** -0.5 for _ in range(2))
    v = torch.randn(b, tt, hv, vd, generator=g_)
    g = -torch.rand(b, tt, hv, generator=g_)
    h0 = torch.randn(b, hv, kd, vd, generator=g_)
    dev = [x.to(device) for x in (q, k, v, g)]
    state = h0.clone().to(device)                              # written in place
    with mk.use_backend(backend):
        o1, f1 = ops.fused_recurrent_gated_delta_rule(*dev, initial_state=state)
        o0, f0 = ops.fused_recurrent_gated_delta_rule(*dev)
    assert f1 is state and f0.shape == (b, hv, kd, vd) and f0.dtype == torch.float32
    for i in range(b):
        ones = torch.ones(tt, hv)
        for h_init, o, f in ((h0[i], o1, f1), (torch.zeros_like(h0[i]), o0, f0)):
            want_o, want_h = _gdr_loop(q[i], k[i], v[i], g[i], ones, h_init, kd ** -0.5,
                                       False)
            assert_close(o[i].cpu(), want_o.float())
            assert_close(f[i].cpu(), want_h.float())


@pytest.mark.parametrize(("kwargs", "name", "exc"), [
    (dict(num_accepted_tokens=torch.ones(2, dtype=torch.int32)), "num_accepted_tokens",
     NotImplementedError),
    (dict(retrieve_parent_token=torch.zeros(2, 1, dtype=torch.int32)),
     "retrieve_parent_token", NotImplementedError),
    (dict(inplace_final_state=False), "inplace_final_state", NotImplementedError),
    (dict(ssm_state_indices=torch.zeros(2, 2, dtype=torch.int32)), "ssm_state_indices",
     NotImplementedError),
    (dict(beta=torch.rand(1, 3, 2, 4)), "beta", NotImplementedError),
    (dict(ssm_state_indices=torch.tensor([0, 3])), "ssm_state_indices", ValueError),
    (dict(ssm_state_indices=torch.tensor([1, 1])), "ssm_state_indices", ValueError),
    (dict(ssm_state_indices=torch.tensor([0])), "ssm_state_indices", ValueError),
    (dict(initial_state=torch.zeros(3, 2, 8, 5)), "initial_state", ValueError),
    (dict(initial_state=torch.zeros(3, 2, 8, 4, dtype=torch.int32)), "initial_state",
     TypeError),
    (dict(initial_state=None), "ssm_state_indices", ValueError),
    (dict(cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32)), "cu_seqlens", ValueError),
    (dict(cu_seqlens=torch.tensor([0.0, 1.0, 3.0])), "cu_seqlens", TypeError),
    (dict(g=torch.rand(1, 3, 1)), "g", ValueError),
    (dict(k=torch.randn(1, 3, 1, 4)), "k", ValueError),
    (dict(use_qk_l2norm_in_kernel=1), "use_qk_l2norm_in_kernel", TypeError),
])
def test_fused_recurrent_gated_delta_rule_errors(kwargs, name, exc):
    args = dict(q=torch.randn(1, 3, 1, 8), k=torch.randn(1, 3, 1, 8),
                v=torch.randn(1, 3, 2, 4), g=-torch.rand(1, 3, 2), beta=torch.rand(1, 3, 2),
                initial_state=torch.zeros(3, 2, 8, 4),
                cu_seqlens=torch.tensor([0, 2, 3], dtype=torch.int32),
                ssm_state_indices=torch.tensor([2, 0]))
    ops.fused_recurrent_gated_delta_rule(**args)
    args.update(kwargs)
    with pytest.raises(exc) as err:
        ops.fused_recurrent_gated_delta_rule(**args)
    assert name in str(err.value)


# ------------------------------------------------------- causal conv1d (Mamba / GDN)


def _conv_by_hand(xs: list[torch.Tensor], weight: torch.Tensor, bias, inits: list,
                  silu: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sequence: x_i [dim, L], init [dim, W - 1] -> (F.conv1d over cat(init, x_i) in
    fp32 [dim, L], the new state = its last W - 1 columns)."""
    outs, states = [], []
    for x, init in zip(xs, inits):
        xx = torch.cat([init.float(), x.float()], dim=1)
        y = torch.zeros(x.shape)
        if x.shape[1]:
            y = torch.nn.functional.conv1d(xx[None], weight.float()[:, None, :],
                                           None if bias is None else bias.float(),
                                           groups=weight.shape[0])[0]
        outs.append(torch.nn.functional.silu(y) if silu else y)
        states.append(xx[:, xx.shape[1] - (weight.shape[1] - 1):])
    return outs, states


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_causal_conv1d_fn_varlen_with_cache_lines(backend, dtype, device):
    """vLLM's prefill call: x [dim, tokens] as a channel-last view, conv_states stored
    [lines, state_len, dim] and passed transposed (vLLM's layout, state_len > W - 1: the
    extra columns stay), cache_indices with pad_slot_id rows, has_initial_state mixed."""
    g = _gen(21)
    dim, width, lens = 12, 4, [5, 1, 0, 9, 2]
    x = _randn(g, sum(lens), dim, dtype=dtype).to(device).t()        # [dim, T], strides (1, dim)
    weight = _randn(g, dim, width, dtype=dtype).to(device)
    bias = _randn(g, dim, dtype=dtype).to(device)
    states = _randn(g, 8, width, dim, dtype=dtype).to(device).transpose(1, 2)   # [8, dim, 4]
    before = states.clone()
    qsl = torch.tensor([0, 5, 6, 6, 15, 17], dtype=torch.int32, device=device)
    cache_indices = torch.tensor([6, 99, 2, 0, 5], dtype=torch.int32, device=device)
    has_init = torch.tensor([True, True, False, True, False], device=device)
    with mk.use_backend(backend):
        out = ops.causal_conv1d_fn(x, weight, bias, states, qsl, cache_indices, has_init,
                                   activation=True, pad_slot_id=99)
    assert out.shape == x.shape and out.dtype == dtype
    xs = [x[:, a:b].cpu() for a, b in zip(qsl[:-1].tolist(), qsl[1:].tolist())]
    inits = [before[s, :, :width - 1].cpu() if h else torch.zeros(dim, width - 1)
             for s, h in zip([6, 0, 2, 0, 5], has_init.tolist())]
    outs, new = _conv_by_hand(xs, weight.cpu(), bias.cpu(), inits, silu=True)
    for i, (a, b) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        if i == 1:                                                 # padding row
            assert torch.equal(out[:, a:b].cpu(), torch.zeros(dim, b - a, dtype=dtype))
            continue
        assert_close(out[:, a:b].cpu(), outs[i].to(dtype))
    want = before.clone()
    for i, slot in enumerate([6, 99, 2, 0, 5]):
        if slot != 99:
            want[slot, :, :width - 1] = new[i].to(dtype)
    assert torch.equal(states, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("seqlen", [None, 1, 3])
@pytest.mark.parametrize("activation", [None, "silu", "swish", True, False])
def test_causal_conv1d_update_decode(backend, seqlen, activation, device):
    """vLLM's decode call: x [batch, dim] (or [batch, dim, seqlen]); conv_state_indices
    (None: line i) with a pad_slot_id row; the state shifts by the new tokens."""
    g = _gen(22)
    batch, dim, width = 3, 10, 4
    shape = (batch, dim) if seqlen is None else (batch, dim, seqlen)
    x = _randn(g, *shape, dtype=torch.float16).to(device)
    weight = _randn(g, dim, width, dtype=torch.float16).to(device)
    silu = activation in ("silu", "swish", True)
    for indices in (None, torch.tensor([4, -1, 1], device=device)):
        state = _randn(g, 5, dim, width - 1, dtype=torch.float16).to(device)
        before = state.clone()
        with mk.use_backend(backend):
            out = ops.causal_conv1d_update(x, state, weight, None, activation, indices)
        assert out.shape == x.shape and out.dtype == x.dtype
        slots = [0, 1, 2] if indices is None else [4, -1, 1]
        xs = [(x[b] if x.dim() == 3 else x[b, :, None]).cpu() for b in range(batch)]
        outs, new = _conv_by_hand(xs, weight.cpu(), None,
                                  [before[s].cpu() for s in slots], silu)
        want = before.clone()
        for b, s in enumerate(slots):
            got = out[b] if x.dim() == 3 else out[b, :, None]
            if s < 0:
                assert (got == 0).all()
                continue
            assert_close(got.cpu(), outs[b].to(x.dtype))
            want[s] = new[b].to(want.dtype)
        assert torch.equal(state, want)


def test_causal_conv1d_fn_then_update_equals_one_prefill():
    """Prefill through causal_conv1d_fn, then decode steps through causal_conv1d_update,
    gives the outputs and state of one prefill over the whole sequence."""
    g = _gen(23)
    dim, width = 6, 3
    x = _randn(g, dim, 11)
    weight, bias = _randn(g, dim, width), _randn(g, dim)
    qsl = lambda n: torch.tensor([0, n], dtype=torch.int32)  # noqa: E731
    whole_state = torch.zeros(1, dim, width - 1)
    whole = ops.causal_conv1d_fn(x, weight, bias, whole_state, qsl(11))
    state = torch.zeros(1, dim, width - 1)
    parts = [ops.causal_conv1d_fn(x[:, :8], weight, bias, state, qsl(8))]
    for t in range(8, 11):
        parts.append(ops.causal_conv1d_update(x[:, t][None], state, weight, bias, "silu")
                     .t())
    assert_close(torch.cat(parts, dim=1), whole)
    assert torch.equal(state, whole_state)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(activation="relu"), "activation"),
    (dict(query_start_loc=torch.tensor([0, 2, 5])), "query_start_loc"),
    (dict(cache_indices=torch.tensor([0, 0], dtype=torch.int32)), "cache_indices"),
    (dict(cache_indices=torch.tensor([0, 7], dtype=torch.int32)), "cache_indices"),
    (dict(has_initial_state=torch.ones(3, dtype=torch.bool)), "has_initial_state"),
    (dict(conv_states=torch.zeros(4, 6, 1)), "conv_states"),
    (dict(conv_states=torch.zeros(4, 5, 2)), "conv_states"),
    (dict(num_computed_tokens=torch.zeros(2, dtype=torch.int32)), "num_computed_tokens"),
])
def test_causal_conv1d_fn_bad_input_names_the_argument(kwargs, name):
    args = dict(x=torch.zeros(6, 4), weight=torch.zeros(6, 3), bias=None,
                conv_states=torch.zeros(4, 6, 2),
                query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as err:
        ops.causal_conv1d_fn(**args)
    assert name in str(err.value)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(conv_state=torch.zeros(1, 6, 2)), "conv_state"),                 # 1 line, batch 2
    (dict(conv_state_indices=torch.tensor([1, 1])), "conv_state_indices"),
    (dict(conv_state_indices=torch.tensor([0])), "conv_state_indices"),
    (dict(num_accepted_tokens=torch.ones(2, dtype=torch.int32)), "num_accepted_tokens"),
    (dict(x=torch.zeros(2, 6, 1, 1)), "x"),
    (dict(activation="gelu"), "activation"),
])
def test_causal_conv1d_update_bad_input_names_the_argument(kwargs, name):
    args = dict(x=torch.zeros(2, 6), conv_state=torch.zeros(3, 6, 2),
                weight=torch.zeros(6, 3))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as err:
        ops.causal_conv1d_update(**args)
    assert name in str(err.value)


# ------------------------------------------- selective_state_update (vLLM's Mamba-2 decode)
def _ssu_loop(state, x, dt, A, B, C, D, z, dt_bias, softplus):
    """vLLM's selective_state_update semantics in fp64, one row at a time, on its full
    (per-channel) shapes: state [H, P, N] per row, x / dt / z [H, P], A [H, P, N], B / C
    [G, N], D / dt_bias [H, P] -> (y [H, P], new state)."""
    s = state.double().clone()
    h, g = x.shape[0], B.shape[0]
    d = dt.double() + (0 if dt_bias is None else dt_bias.double())
    if softplus:
        d = torch.nn.functional.softplus(d)
    y = torch.zeros(x.shape, dtype=torch.float64)
    for head in range(h):
        grp = head // (h // g)
        s[head] = (s[head] * torch.exp(d[head][:, None] * A[head].double())
                   + (d[head] * x[head].double())[:, None] * B[grp].double()[None, :])
        y[head] = s[head] @ C[grp].double()
        if D is not None:
            y[head] += D[head].double() * x[head].double()
    if z is not None:
        y = y * torch.nn.functional.silu(z.double())
    return y, s


def _ssu_args(g_, batch, h, groups, p, n, dtype):
    """Decode inputs as vLLM's Mamba-2 mixer passes them: A / dt / D / dt_bias per head,
    expanded with stride 0 to [H, P, N] / [batch, H, P] / [H, P]."""
    x = _randn(g_, batch, h, p, dtype=dtype)
    dt = (_randn(g_, batch, h) - 1).to(dtype)[:, :, None].expand(batch, h, p)
    a = (-torch.rand(h, generator=g_) - 0.2)[:, None, None].expand(h, p, n)
    b = _randn(g_, batch, groups, n, dtype=dtype)
    c = _randn(g_, batch, groups, n, dtype=dtype)
    d = _randn(g_, h)[:, None].expand(h, p)
    bias = (_randn(g_, h) * 0.5)[:, None].expand(h, p)
    z = _randn(g_, batch, h, p, dtype=dtype)
    return x, dt, a, b, c, d, z, bias


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_selective_state_update_pool(backend, pool_dtype, device):
    """A decode batch on a state pool through state_batch_indices with a pad_slot_id row,
    z gate, D, dt_bias, softplus, an out buffer; bf16 pools rounded back once."""
    g_ = _gen(50)
    batch, h, groups, p, n = 4, 4, 2, 6, 8
    x, dt, a, b, c, d, z, bias = _ssu_args(g_, batch, h, groups, p, n, torch.bfloat16)
    pool = torch.randn(7, h, p, n, generator=g_).to(pool_dtype)
    before = pool.clone()
    idx = torch.tensor([3, 99, 0, 5], dtype=torch.int32)
    out = torch.full((batch, h, p), float("nan"), dtype=torch.bfloat16, device=device)
    dev = lambda t: t.to(device)                                # noqa: E731
    state = dev(pool)
    with mk.use_backend(backend):
        got = ops.selective_state_update(
            state, dev(x), dev(dt), dev(a), dev(b), dev(c), D=dev(d), z=dev(z),
            dt_bias=dev(bias), dt_softplus=True, state_batch_indices=dev(idx),
            pad_slot_id=99, out=out)
    assert got is out
    want_pool = before.clone()
    for i, slot in enumerate(idx.tolist()):
        if slot == 99:
            assert torch.equal(out[i].cpu(), torch.zeros(h, p, dtype=torch.bfloat16))
            continue
        y, s = _ssu_loop(before[slot].float(), x[i], dt[i], a, b[i], c[i], d, z[i], bias,
                         True)
        assert_close(out[i].cpu(), y.to(torch.bfloat16))
        want_pool[slot] = s.to(pool_dtype)
    torch.testing.assert_close(state.cpu(), want_pool,
                               **(TOL[torch.bfloat16] if pool_dtype == torch.bfloat16
                                  else dict(atol=1e-5, rtol=1e-5)))
    assert torch.equal(state.cpu()[[1, 2, 4, 6]], before[[1, 2, 4, 6]])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_selective_state_update_forms(backend, device):
    """The 2-D (one head) form without indices (slot i, a new output returned); the varlen
    form (cu_seqlens: multi-token rows) with separate destination slots; materialized
    (not stride-0) but constant A / dt accepted."""
    g_ = _gen(51)
    batch, p, n = 3, 5, 4
    x = _randn(g_, batch, p)
    dt = _randn(g_, batch)[:, None].expand(batch, p)
    a = torch.full((p, n), -0.7)                                 # contiguous, constant
    b, c = _randn(g_, batch, n), _randn(g_, batch, n)
    state = torch.randn(batch + 1, p, n, generator=g_)
    before = state.clone()
    dev = lambda t: t.to(device)                                # noqa: E731
    st_dev = dev(state)
    with mk.use_backend(backend):
        y = ops.selective_state_update(st_dev, dev(x), dev(dt.contiguous()), dev(a), dev(b),
                                       dev(c), dt_softplus=True)
    assert y.shape == x.shape
    for i in range(batch):
        want_y, want_s = _ssu_loop(before[i][None], x[i][None], dt[i][None], a[None],
                                   b[i][None], c[i][None], None, None, None, True)
        assert_close(y[i].cpu(), want_y[0].float())
        assert_close(st_dev[i].cpu(), want_s[0].float())
    assert torch.equal(st_dev[batch].cpu(), before[batch])

    # varlen: rows 0..2 one sequence, row 3 another; read slots 1, 0, written to 3, 2
    h, groups, p, n = 2, 1, 3, 4
    x, dt, a, b, c, d, z, bias = _ssu_args(g_, 4, h, groups, p, n, torch.float32)
    pool = torch.randn(4, h, p, n, generator=g_)
    before = pool.clone()
    pool_dev = dev(pool)
    with mk.use_backend(backend):
        y = ops.selective_state_update(
            pool_dev, dev(x), dev(dt), dev(a), dev(b), dev(c), D=dev(d), dt_bias=dev(bias),
            state_batch_indices=torch.tensor([[1], [0]], device=device),
            dst_state_batch_indices=torch.tensor([3, 2], device=device),
            cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32, device=device))
    for rows, src, dst in ((range(0, 3), 1, 3), (range(3, 4), 0, 2)):
        s = before[src].float()
        for r in rows:
            want_y, s = _ssu_loop(s, x[r], dt[r], a, b[r], c[r], d, None, bias, False)
            s = s.float()
            assert_close(y[r].cpu(), want_y.float())
        assert_close(pool_dev[dst].cpu(), s)
    assert torch.equal(pool_dev[[0, 1]].cpu(), before[[0, 1]])


# (A / dt / D / dt_bias varying along the head dim, and B / C in another dtype than x, run:
# per-channel values on ops.selective_scan, tests/test_compat_selective_scan.py)
@pytest.mark.parametrize(("kwargs", "name", "exc"), [
    (dict(num_accepted_tokens=torch.ones(2, dtype=torch.int32)), "num_accepted_tokens",
     NotImplementedError),
    (dict(enable_stochastic_rounding=True), "enable_stochastic_rounding",
     NotImplementedError),
    (dict(state_batch_indices=torch.tensor([0, 5])), "state_batch_indices", ValueError),
    (dict(state_batch_indices=torch.tensor([1, 1])), "state_batch_indices", ValueError),
    (dict(state_batch_indices=torch.tensor([1])), "state_batch_indices", ValueError),
    (dict(state_batch_indices=torch.tensor([0.0, 1.0])), "state_batch_indices", TypeError),
    (dict(state=torch.zeros(3, 2, 3, 5)), "A", ValueError),
    (dict(state=torch.zeros(3, 2, 3, 4, dtype=torch.int32)), "state", TypeError),
    (dict(B=torch.zeros(2, 3, 4)), "B", ValueError),
    (dict(C=torch.zeros(2, 1, 5)), "C", ValueError),
    (dict(z=torch.zeros(2, 2, 4)), "z", ValueError),
    (dict(out=torch.zeros(2, 2, 3, dtype=torch.float16)), "out", TypeError),
    (dict(x=torch.zeros(2, 2, 3, 1)), "x", ValueError),
    (dict(dt_softplus=1), "dt_softplus", TypeError),
    (dict(cu_seqlens=torch.tensor([0, 1], dtype=torch.int32)), "cu_seqlens", ValueError),
])
def test_selective_state_update_errors(kwargs, name, exc):
    args = dict(state=torch.zeros(3, 2, 3, 4), x=torch.randn(2, 2, 3),
                dt=torch.rand(2, 2, 1).expand(2, 2, 3),
                A=torch.tensor([-1.0, -0.5])[:, None, None].expand(2, 3, 4),
                B=torch.randn(2, 1, 4), C=torch.randn(2, 1, 4),
                D=torch.ones(2, 1).expand(2, 3), dt_bias=torch.zeros(2, 1).expand(2, 3),
                state_batch_indices=torch.tensor([2, 0]))
    ops.selective_state_update(**args)
    args.update(kwargs)
    with pytest.raises(exc) as err:
        ops.selective_state_update(**args)
    assert name in str(err.value)


def test_per_token_group_quant_fp8_and_int8():
    """vLLM's fp8_utils / int8_utils group quantizers: the fp8 one is ops'; the int8 one
    against vLLM's formula (max(max|x|, eps) / 127, q within 1 of vLLM's truncation)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 256, dtype=torch.bfloat16) * 4
    q, s = ops.per_token_group_quant_fp8(x, 64)
    q2, s2 = mk.ops.per_token_group_quant_fp8(x, 64)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    x[0, 0, :64] = 0                                       # an all-zero group: eps floor
    q, s = ops.per_token_group_quant_int8(x, 64)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (5, 3, 4)
    g = x.float().reshape(5, 3, 4, 64)
    want_s = g.abs().amax(-1).clamp_min(1e-10) / 127
    assert torch.equal(s, want_s)
    vllm_q = (g / want_s[..., None]).clamp(-128, 127).to(torch.int8).reshape(x.shape)
    assert (q.int() - vllm_q.int()).abs().max() <= 1
    assert torch.equal(q, torch.round(g / want_s[..., None]).to(torch.int8).reshape(x.shape))
    assert (q[0, 0, :64] == 0).all()
    with pytest.raises(ValueError, match="group_size"):
        ops.per_token_group_quant_int8(x, 48)
    with pytest.raises(TypeError, match="dtype"):
        ops.per_token_group_quant_int8(x, 64, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_apply_repetition_penalties(dtype, strided):
    """vLLM's test_apply_repetition_penalties recipe: in place, penalties only where the
    token is in the prompt or the output; positive logits scaled by 1 / penalty, the rest
    by the penalty (vLLM's torch formula, written out here)."""
    g = _gen(11)
    n, vocab = 5, 67
    logits = _randn(g, n, vocab, dtype=dtype, strided=strided)
    prompt = torch.rand(n, vocab, generator=g) < 0.2
    output = torch.rand(n, vocab, generator=g) < 0.2
    pen = torch.rand(n, generator=g) * 1.5 + 0.5
    before = logits.clone()
    rep = pen[:, None].expand(n, vocab)
    rep = torch.where(prompt | output, rep, 1.0)
    want = (before.float() * torch.where(before > 0, 1.0 / rep, rep)).to(dtype)
    ops.apply_repetition_penalties(logits, prompt, output, pen)
    assert torch.equal(logits, want)
    untouched = ~(prompt | output)
    assert torch.equal(logits[untouched], before[untouched])
    with pytest.raises(ValueError, match="prompt_mask"):
        ops.apply_repetition_penalties(logits, prompt[:2], output, pen)
    with pytest.raises(TypeError, match="output_mask"):
        ops.apply_repetition_penalties(logits, prompt, output.int(), pen)
    with pytest.raises(ValueError, match="repetition_penalties"):
        ops.apply_repetition_penalties(logits, prompt, output, pen[:3])


@pytest.mark.parametrize("symmetric", [True, False])
def test_scaled_int8_quant_out_forms(symmetric):
    """torch.ops._C's static / dynamic_scaled_int8_quant write out (and scales, azp) as
    scaled_int8_quant returns them."""
    g = _gen(12)
    x = _randn(g, 6, 40, dtype=torch.bfloat16, strided=True) * 3
    out = torch.full((6, 40), 5, dtype=torch.int8)
    scales = torch.full((6, 1), -1.0)
    azp = None if symmetric else torch.full((6, 1), 7, dtype=torch.int32)
    ops.dynamic_scaled_int8_quant(out, x, scales, azp)
    q, s, z = mk.ops.scaled_int8_quant(x, symmetric=symmetric)
    assert torch.equal(out, q) and torch.equal(scales, s)
    if not symmetric:
        assert torch.equal(azp, z)
    st_scale = torch.tensor([0.05])
    st_azp = None if symmetric else torch.tensor([3], dtype=torch.int32)
    out_t = torch.full((6, 40), 5, dtype=torch.int8).t().contiguous().t()   # strided out
    ops.static_scaled_int8_quant(out_t, x, st_scale, st_azp)
    want = mk.ops.scaled_int8_quant(x, st_scale, st_azp, symmetric)[0]
    assert torch.equal(out_t, want)
    with pytest.raises(TypeError, match="out"):
        ops.static_scaled_int8_quant(out.float(), x, st_scale, st_azp)
    with pytest.raises(ValueError, match="scales"):
        ops.dynamic_scaled_int8_quant(out, x, scales[:3], azp)


@pytest.mark.parametrize("in_dtype", [torch.int8, FP8])
@pytest.mark.parametrize("per_token,per_channel", [(False, False), (True, True)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_scaled_mm(in_dtype, per_token, per_channel, with_bias):
    """vLLM's test_triton_scaled_mm recipe: (scale_a * a) @ (scale_b * b) (+ bias) in fp32,
    one rounding to out_dtype."""
    g = _gen(21)
    m, k, n = 7, 48, 24
    if in_dtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
        b = torch.randint(-127, 128, (k, n), generator=g).to(torch.int8)
    else:
        a = torch.randn(m, k, generator=g).clamp(-4, 4).to(FP8)
        b = torch.randn(k, n, generator=g).clamp(-4, 4).to(FP8)
    sa = torch.rand(m if per_token else 1, 1, generator=g) / 50 + 0.01
    sb = torch.rand(n if per_channel else 1, 1, generator=g) / 50 + 0.01
    bias = torch.randn(n, generator=g) if with_bias else None
    want = (sa * a.float()) @ (sb.view(1, -1) * b.float())
    if bias is not None:
        want = want + bias
    got = ops.triton_scaled_mm(a, b, sa, sb, torch.bfloat16, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=1e-2,
                               atol=1e-2)
    with pytest.raises(TypeError, match="weight"):
        ops.triton_scaled_mm(a, b.float(), sa, sb, torch.bfloat16)
    with pytest.raises(ValueError, match="block_size_m"):
        ops.triton_scaled_mm(a, b, sa, sb, torch.bfloat16, block_size_m=0)


def test_w8a8_block_fp8_matmul_and_per_token_quant_int8():
    """vLLM's fp8_utils / int8_utils names: test_block_fp8's native block matmul formula;
    per_token_quant_int8's scales [..., 1] and q within one step of x / scale."""
    g = _gen(22)
    m, n, k, bn, bk = 5, 40, 72, 16, 32
    a = torch.randn(m, k, generator=g).to(FP8)
    b = torch.randn(n, k, generator=g).to(FP8)
    kb, nb = -(-k // bk), -(-n // bn)
    a_s = torch.rand(m, kb, generator=g) / 10 + 0.01
    b_s = torch.rand(nb, kb, generator=g) / 10 + 0.01
    want = torch.zeros(m, n)
    for j in range(kb):
        ks = slice(j * bk, (j + 1) * bk)
        part = a[:, ks].float() @ b[:, ks].float().t()
        want += part * a_s[:, j:j + 1] * b_s[:, j].repeat_interleave(bn)[:n][None, :]
    for fn in (ops.w8a8_block_fp8_matmul, ops.w8a8_triton_block_scaled_mm):
        got = fn(a, b, a_s, b_s, [bn, bk], torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    x = torch.randn(3, 4, 40, generator=g).bfloat16()
    q, s = ops.per_token_quant_int8(x)
    assert q.dtype == torch.int8 and s.shape == (3, 4, 1) and s.dtype == torch.float32
    assert torch.allclose(s, x.float().abs().amax(-1, keepdim=True) / 127)
    assert (q.float() - x.float() / s).abs().max() <= 0.5 + 1e-3


@pytest.mark.parametrize("shape", [(5, 40, 72), (1, 16, 32)])
def test_w8a8_block_int8_matmul(shape):
    """vLLM's test_block_int8 recipe: the native block matmul formula (per K block: int
    dot, times the token-group scale and the weight block's scale), fp32 sums."""
    g = _gen(23)
    m, n, k = shape
    bn, bk = 16, 32
    a = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    kb, nb = -(-k // bk), -(-n // bn)
    a_s = torch.rand(m, kb, generator=g) / 100 + 1e-3
    b_s = torch.rand(nb, kb, generator=g) / 100 + 1e-3
    want = torch.zeros(m, n)
    for j in range(kb):
        ks = slice(j * bk, (j + 1) * bk)
        part = a[:, ks].float() @ b[:, ks].float().t()
        want += part * a_s[:, j:j + 1] * b_s[:, j].repeat_interleave(bn)[:n][None, :]
    got = ops.w8a8_block_int8_matmul(a, b, a_s, b_s, [bn, bk], torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    half = ops.w8a8_block_int8_matmul(a, b, a_s, b_s, [bn, bk])
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="Bs"):
        ops.w8a8_block_int8_matmul(a, b, a_s, torch.ones(nb + 1, kb), [bn, bk])
    with pytest.raises(TypeError, match="B"):
        ops.w8a8_block_int8_matmul(a, b.float(), a_s, b_s, [bn, bk])
