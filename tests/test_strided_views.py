"""Every op honours each tensor argument's own strides, on every backend.

Each tensor argument is handed over as a view into a larger tensor (padded rows, an offset
start, a permuted storage order, and for read-only inputs a strided last dim), each with
strides of its own. The result must equal the fp32 reference on compact copies. Caches are
views of vLLM's fused [num_blocks, 2, block_size, Hkv, D] layout, or of differently padded
tensors for k and v, so k and v never share strides (the paged-decode bug of issue 13).
"""
from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends
from helpers import assert_close

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", *kernel_backends()]


def view_of(t: torch.Tensor, gen: torch.Generator, *, step_last: bool = False,
            permute: bool = False) -> torch.Tensor:
    """A view with t's values inside a larger tensor: every dim padded and offset by one,
    storage order of the first two dims swapped (permute), last dim strided (step_last,
    always for 1-D tensors)."""
    shape = list(t.shape)
    last = len(shape) - 1
    step_last = step_last or len(shape) == 1   # 1-D: an offset alone keeps stride 1
    big_shape = [s + 3 for s in shape]
    if step_last and shape:
        big_shape[last] = 2 * shape[last] + 3
    order = list(range(len(shape)))
    if permute and len(shape) >= 2:
        order[0], order[1] = order[1], order[0]
    stored = [big_shape[i] for i in order]
    if t.dtype.is_floating_point:
        big = torch.randn(stored, generator=gen).to(t.dtype)
    else:
        big = torch.randint(-5, 5, stored, generator=gen).to(t.dtype)
    big = big.to(t.device).permute(*[order.index(i) for i in range(len(shape))])
    idx = [slice(1, 1 + s) for s in shape]
    if step_last and shape:
        idx[last] = slice(1, 1 + 2 * shape[last], 2)
    view = big[tuple(idx)]
    view.copy_(t)
    assert view.shape == t.shape and (t.dim() == 0 or not view.is_contiguous())
    return view


def fused_kv_views(kc: torch.Tensor, vc: torch.Tensor, gen: torch.Generator, fused: bool):
    """k and v cache views with their own strides (last dim contiguous): vLLM's fused
    [NB, 2, BS, Hkv, D] tensor, or two differently padded tensors."""
    if fused:
        nb, bs, hkv, d = kc.shape
        kv = torch.empty(nb, 2, bs, hkv, d, dtype=kc.dtype, device=kc.device)
        kv[:, 0].copy_(kc)
        kv[:, 1].copy_(vc)
        return kv[:, 0], kv[:, 1]
    return view_of(kc, gen), view_of(vc, gen, permute=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step_last", [False, True], ids=["rows", "strided_last"])
def test_small_ops(backend, device, step_last):
    g = _gen(5 + step_last)
    dt = torch.bfloat16
    x = torch.randn(5, 3, 64, generator=g).to(dt).to(device)
    w = torch.randn(64, generator=g).to(dt).to(device)
    r = torch.randn(5, 3, 64, generator=g).to(dt).to(device)
    xv, wv, rv = (view_of(t, g, step_last=step_last, permute=True) for t in (x, w, r))
    with mk.use_backend(backend):
        y = mk.ops.rms_norm(xv, wv, 1e-6)
        y2, h2 = mk.ops.rms_norm(xv, wv, 1e-6, residual=rv)
        yg, hg = mk.ops.gemma_rms_norm(xv, wv, 1e-6, residual=rv)
        a = mk.ops.silu_and_mul(xv)
        gl = mk.ops.gelu_and_mul(xv)
        gt = mk.ops.gelu_tanh_and_mul(xv)
    assert_close(y, reference.rms_norm(x, w, 1e-6))
    ref_y2, ref_h2 = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert_close(y2, ref_y2)
    assert_close(h2, ref_h2)
    ref_yg, _ = reference.fused_add_rms_norm(x, r, w, 1e-6, 1.0)
    assert_close(yg, ref_yg)
    assert_close(hg, ref_h2)
    assert_close(a, reference.silu_and_mul(x))
    assert_close(gl, reference.gelu_and_mul(x, "none"))
    assert_close(gt, reference.gelu_and_mul(x, "tanh"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step_last", [False, True], ids=["rows", "strided_last"])
@pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_rotary(backend, device, step_last, is_neox_style, pos_dtype):
    # q, k, positions and cache all views; partial rotary (rot_dim 32 of head dim 48)
    g = _gen(9 + step_last)
    dt = torch.bfloat16
    q = torch.randn(7, 4, 48, generator=g).to(dt).to(device)
    k = torch.randn(7, 2, 48, generator=g).to(dt).to(device)
    pos = torch.randint(0, 40, (7,), generator=g).to(pos_dtype).to(device)
    cache = mk.ops.build_rope_cache(32, 40, 10000.0, device=device)
    qv, kv = view_of(q, g, step_last=step_last), view_of(k, g, permute=True)
    posv, cachev = view_of(pos, g), view_of(cache, g, step_last=step_last)
    with mk.use_backend(backend):
        qo, ko = mk.ops.rotary_embedding(qv, kv, posv, cachev, is_neox_style=is_neox_style)
    rq, rk = reference.rotary_embedding(q, k, pos, cache, is_neox_style)
    assert_close(qo, rq)
    assert_close(ko, rk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_matmul(backend, device):
    g = _gen(7)
    n, k, gs = 32, 128, 32
    w = torch.randn(n, k, generator=g)
    w4 = mk.quant.quantize_int4(w.to(device).half(), group_size=gs)
    x = torch.randn(3, k, generator=g).half().to(device)
    bias = torch.randn(n, generator=g).half().to(device)
    args = [view_of(x, g, step_last=True), view_of(w4.qweight, g),
            view_of(w4.scales, g, permute=True), view_of(w4.zeros, g, step_last=True)]
    with mk.use_backend(backend):
        y = mk.ops.int4_matmul(*args, gs, bias=view_of(bias, g, step_last=True))
    assert_close(y, reference.int4_matmul(x, w4.qweight, w4.scales, w4.zeros, gs, bias),
                 scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gs", [32, -1])
def test_int8_matmul(backend, device, gs):
    # every tensor argument a view (the weight with padded rows, permuted storage and, at
    # gs = -1, a strided K: the kernels' unaligned byte-load configs); odd N and K
    g = _gen(8)
    n, k = 37, (96 if gs != -1 else 100)
    q, s, z = reference.quantize_int8_grouped(torch.randn(n, k, generator=g).half(), gs)
    x = torch.randn(3, k, generator=g).half()
    bias = torch.randn(n, generator=g).half()
    q, s, z, x, bias = (t.to(device) for t in (q, s, z, x, bias))
    args = [view_of(x, g, step_last=True), view_of(q, g, permute=True, step_last=gs == -1),
            view_of(s, g, permute=gs != -1), view_of(z, g, step_last=True)]
    with mk.use_backend(backend):
        y = mk.ops.int8_matmul(*args, gs, bias=view_of(bias, g, step_last=True))
    assert_close(y, reference.int8_matmul(x, q, s, z, gs, bias), scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused,d", [(True, 64), (False, 64), (True, 512)],
                         ids=["fused_kv", "padded_kv", "fused_kv_d512"])
def test_paged_kv_ops(backend, device, fused, d):
    """write_kv_cache, paged_decode_attention and paged flash_attention on cache views
    (d 512: Gemma 4's full-attention layers)."""
    g = _gen(3 + fused)
    dt, nb, bs, hkv, hq = torch.float16, 7, 12, 2, 4
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(dt).to(device)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(dt).to(device)
    kcv, vcv = fused_kv_views(kc, vc, g, fused)
    assert kcv.stride() != vcv.stride() or kcv.data_ptr() != vcv.data_ptr()

    # write: k / v views of a fused qkv row, slot_mapping strided
    t = 9
    qkv = torch.randn(t, hq + 2 * hkv, d, generator=g).to(dt).to(device)
    k_new, v_new = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    slots = torch.randperm(nb * bs, generator=g)[:t].to(torch.int32).to(device)
    slots[2] = -1
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.write_kv_cache(k_new.contiguous(), v_new.contiguous(), kc_ref, vc_ref, slots)
    with mk.use_backend(backend):
        mk.ops.write_kv_cache(view_of(k_new, g, step_last=True), v_new, kcv, vcv,
                              view_of(slots, g))
    assert torch.equal(kcv, kc_ref) and torch.equal(vcv, vc_ref)

    # decode over the written caches
    bt = torch.stack([torch.randperm(nb, generator=g)[:5] for _ in range(3)]).int().to(device)
    sl = torch.tensor([1, 29, 60], dtype=torch.int32, device=device)
    q = torch.randn(3, hq, d, generator=g).to(dt).to(device)
    with mk.use_backend(backend):
        out, lse = mk.ops.paged_decode_attention(
            view_of(q, g, step_last=True), kcv, vcv, view_of(bt, g, permute=True),
            view_of(sl, g), num_splits=2, return_lse=True)
    ref_out, ref_lse = reference.paged_decode_attention(q, kc_ref, vc_ref, bt, sl)
    assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)

    # prefill of the last tokens over the paged prefix
    lens_q = [1, 7, 4]
    cu_q = torch.tensor([0, 1, 8, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 1, 30, 90], dtype=torch.int32, device=device)
    qp = torch.randn(12, hq, d, generator=g).to(dt).to(device)
    with mk.use_backend(backend):
        out = mk.ops.flash_attention(view_of(qp, g, step_last=True), kcv, vcv,
                                     view_of(cu_q, g), view_of(cu_k, g), max(lens_q), 60,
                                     block_table=view_of(bt, g))
    ref_out, _ = reference.flash_attention(qp, kc_ref, vc_ref, cu_q, cu_k, 7, 60,
                                           block_table=bt)
    assert_close(out, ref_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [32, 512])
def test_flash_attention_varlen_views(backend, device, d):
    g = _gen(11)
    dt, hq, hkv = torch.bfloat16, 4, 2
    q = torch.randn(20, hq, d, generator=g).to(dt).to(device)
    k = torch.randn(26, hkv, d, generator=g).to(dt).to(device)
    v = torch.randn(26, hkv, d, generator=g).to(dt).to(device)
    cu_q = torch.tensor([0, 8, 20], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 10, 26], dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        out, lse = mk.ops.flash_attention(
            view_of(q, g, step_last=True), view_of(k, g, permute=True),
            view_of(v, g, step_last=True), view_of(cu_q, g), view_of(cu_k, g), 12, 16,
            return_lse=True)
    ref_out, ref_lse = reference.flash_attention(q, k, v, cu_q, cu_k, 12, 16)
    assert_close(out, ref_out, scale=2.0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step_last", [False, True], ids=["rows", "strided_last"])
def test_topk_softmax(backend, device, step_last):
    g = _gen(13 + step_last)
    logits = torch.randn(9, 60, generator=g).to(torch.bfloat16).to(device)
    view = view_of(logits, g, step_last=step_last, permute=True)
    with mk.use_backend(backend):
        w, ids = mk.ops.topk_softmax(view, 4, renormalize=True)
    ref_w, ref_ids = reference.topk_softmax(logits, 4, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int8_w8a8(backend, device, symmetric):
    """scaled_int8_quant on views of x (dynamic; static scale / azp views too) and
    scaled_mm on views of a, b (weight.t() of a padded weight, or b row-major), scale_a
    [M, 1], scale_b [1, N] and bias: bit for bit the reference on compact copies (int8
    accumulation is exact; the output within its dtype's rounding)."""
    g = _gen(17 + symmetric)
    x = torch.randn(5, 3, 72, generator=g).to(torch.bfloat16).to(device)
    xv = view_of(x, g, step_last=True, permute=True)
    scale = torch.tensor([0.02], device=device)
    azp = None if symmetric else torch.tensor([-7], dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        q, s, z = mk.ops.scaled_int8_quant(xv, symmetric=symmetric)
        # numel-1 scale / azp: views at an offset into a larger tensor (always "contiguous")
        qs, _, _ = mk.ops.scaled_int8_quant(
            xv, torch.cat([scale + 1, scale, scale - 1])[1:2],
            None if azp is None else torch.cat([azp + 1, azp, azp - 1])[1:2],
            symmetric=symmetric)
    rq, rs, rz = reference.scaled_int8_quant(x, symmetric=symmetric)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert (z is None and rz is None) or torch.equal(z, rz)
    assert torch.equal(qs, reference.scaled_int8_quant(x, scale, azp, symmetric)[0])

    n, k = 40, 72
    a = q.reshape(15, k)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    sa = torch.rand(15, 1, generator=g).to(device) / 50
    sb = torch.rand(1, n, generator=g).to(device) / 50
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    ref = reference.scaled_mm(a, w.t(), sa, sb, torch.bfloat16, bias)
    for b in (view_of(w, g).t(), view_of(w.t().contiguous(), g, step_last=True)):
        with mk.use_backend(backend):
            y = mk.ops.scaled_mm(view_of(a, g, step_last=True, permute=True), b,
                                 view_of(sa, g), view_of(sb, g, step_last=True),
                                 torch.bfloat16, bias=view_of(bias, g))
        assert_close(y, ref, scale=0.5)
        if device == "cpu":
            assert torch.equal(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step_last", [False, True], ids=["rows", "strided_last"])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_moe_int8(backend, device, step_last, dt):
    """Every tensor argument of fused_moe_int8 (x, int8 experts, their row scales, the
    routing) a view: padded rows and an offset, the weights' and scales' storage order
    permuted, and (strided_last) every last dim strided."""
    g = _gen(17 + step_last)
    t, h, inter, e, k = 7, 48, 24, 3, 2
    x = torch.randn(t, h, generator=g).to(dt).to(device)
    w13 = torch.randint(-128, 128, (e, 2 * inter, h), generator=g).to(torch.int8).to(device)
    s13 = (torch.rand(e, 2 * inter, generator=g) / (64 * h ** 0.5)).to(device)
    w2 = torch.randint(-128, 128, (e, h, inter), generator=g).to(torch.int8).to(device)
    s2 = (torch.rand(e, h, generator=g) / (64 * inter ** 0.5)).to(device)
    tw = torch.rand(t, k, generator=g).to(device)
    ids = torch.randint(0, e, (t, k), generator=g).to(device)
    args = (x, w13, s13, w2, s2, tw, ids)
    views = [view_of(x, g, step_last=step_last), view_of(w13, g, step_last=step_last,
                                                          permute=True),
             view_of(s13, g, step_last=step_last, permute=True),
             view_of(w2, g, step_last=step_last, permute=True),
             view_of(s2, g, step_last=step_last), view_of(tw, g, step_last=step_last),
             view_of(ids, g, step_last=step_last, permute=True)]
    with mk.use_backend(backend):
        y = mk.ops.fused_moe_int8(*views)
    assert_close(y, reference.fused_moe_int8(*args), scale=2.0)
