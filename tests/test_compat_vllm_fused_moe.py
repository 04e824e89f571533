"""vLLM's fused-MoE Python API (fused_topk / fused_experts / fused_moe) on minikernels'
MoE ops: vLLM's tests/kernels/moe/test_moe.py reference (torch_moe) for dense experts
with and without expert parallelism (expert_map), int8 W8A16 and fp8 (block, per-channel,
per-tensor) experts against the dequantized reference, int8 W8A8 experts against vLLM's
test_int8_kernel.py reference (torch_w8a8_per_column_moe), top-1 router weight on the input,
inplace, custom / grouped / sigmoid routing, and the refused formats."""
from __future__ import annotations

import pytest
import torch

import minikernels as mk
from minikernels.compat import vllm_ops

FP8 = torch.float8_e4m3fn


def torch_moe(a, w1, w2, score, topk, expert_map=None):
    """vLLM's test reference: softmax top-k (not renormalized), SwiGLU experts."""
    b, d = a.shape
    a = a.view(b, -1, d).repeat(1, topk, 1).reshape(-1, d)
    out = torch.zeros(b * topk, w2.shape[1], dtype=a.dtype, device=a.device)
    score = torch.softmax(score, dim=-1, dtype=torch.float32)
    topk_weight, topk_ids = torch.topk(score, topk)
    topk_weight, topk_ids = topk_weight.view(-1), topk_ids.view(-1)
    if expert_map is not None:
        topk_ids = expert_map[topk_ids]
    n = w1.shape[1] // 2
    for i in range(w1.shape[0]):
        mask = topk_ids == i
        if mask.sum():
            h = a[mask] @ w1[i].t()
            out[mask] = (torch.nn.functional.silu(h[:, :n]) * h[:, n:]) @ w2[i].t()
    return (out.view(b, -1, w2.shape[1]) * topk_weight.view(b, -1, 1).to(out.dtype)).sum(1)


def _experts(e, n, k, dtype, gen):
    """Experts whose outputs are O(1) for O(1) inputs (a test at vLLM's 1/10 scales would
    compare numbers far below its tolerance)."""
    w1 = (torch.randn(e, 2 * n, k, generator=gen) / k ** 0.5).to(dtype)
    w2 = (torch.randn(e, k, n, generator=gen) / n ** 0.5).to(dtype)
    return w1, w2


def assert_moe_close(got, want, tol=2e-2):
    """Within tol of the reference, relative to the output's scale (its largest value)."""
    got = got.float().cpu()
    assert got.shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=tol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("ep_size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_matches_vllm_reference(device, backend, m, ep_size, dtype):
    """vLLM's test_fused_moe: fused_moe(a, w1, w2, score, topk, global_num_experts=e,
    expert_map=e_map, renormalize=False) against torch_moe, atol 2e-2."""
    gen = torch.Generator().manual_seed(m + ep_size)
    e, n, k, topk = 8, 64, 48, 2
    a = torch.randn(m, k, generator=gen).to(dtype)
    w1, w2 = _experts(e, n, k, dtype, gen)
    # fp32 router logits: bf16 ones tie now and then, and torch.topk breaks ties its own way
    score = torch.randn(m, e, generator=gen)
    e_map = None
    if ep_size > 1:
        local = e // ep_size
        e_ids = torch.randperm(e, generator=gen)[:local]
        e_map = torch.full((e,), -1, dtype=torch.int32)
        e_map[e_ids] = torch.arange(local, dtype=torch.int32)
        w1, w2 = w1[e_ids], w2[e_ids]
    want = torch_moe(a.float(), w1.float(), w2.float(), score.float(), topk,
                     None if e_map is None else e_map.long())
    dev = [t.to(device) for t in (a, w1, w2, score)]
    with mk.use_backend(backend):
        got = vllm_ops.fused_moe(*dev, topk, global_num_experts=e,
                                 expert_map=None if e_map is None else e_map.to(device),
                                 renormalize=False)
    assert got.dtype == dtype and got.shape == (m, k)
    assert_moe_close(got, want)


def test_quantized_experts_match_the_dequantized_reference(device):
    gen = torch.Generator().manual_seed(3)
    e, n, k, topk, m = 4, 64, 128, 2, 9
    a = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
    score = torch.randn(m, e, generator=gen).to(device)
    # int8 W8A16: per-row scales [E, 2N, 1] / [E, K, 1] (weights ~ 1 / sqrt(K))
    q1 = torch.randint(-127, 128, (e, 2 * n, k), generator=gen, dtype=torch.int8)
    q2 = torch.randint(-127, 128, (e, k, n), generator=gen, dtype=torch.int8)
    s1 = (torch.rand(e, 2 * n, 1, generator=gen) + 0.5) / (73 * k ** 0.5)
    s2 = (torch.rand(e, k, 1, generator=gen) + 0.5) / (73 * n ** 0.5)
    want = torch_moe(a.float().cpu(), q1.float() * s1, q2.float() * s2, score.cpu(), topk)
    got = vllm_ops.fused_moe(a, q1.to(device), q2.to(device), score, topk, False,
                             use_int8_w8a16=True, w1_scale=s1.to(device), w2_scale=s2.to(device))
    assert_moe_close(got, want)
    # fp8: block-wise [64, 64], per channel, per tensor (weights ~ 50 * scale)
    f1 = (torch.randn(e, 2 * n, k, generator=gen) * 50).clamp(-448, 448).to(FP8)
    f2 = (torch.randn(e, k, n, generator=gen) * 50).clamp(-448, 448).to(FP8)

    def sc(*shape, fan):
        return (torch.rand(*shape, generator=gen) + 0.5) / (50 * fan ** 0.5)
    cases = {
        "block": (sc(e, 2, 2, fan=k), sc(e, 2, 1, fan=n), [64, 64]),
        "channel": (sc(e, 2 * n, 1, fan=k), sc(e, k, 1, fan=n), None),
        "tensor": (sc(e, fan=k), sc(e, fan=n), None),
    }
    for name, (c1, c2, block) in cases.items():
        if block is None:
            d1 = f1.float() * c1.reshape(e, -1, 1)
            d2 = f2.float() * c2.reshape(e, -1, 1)
        else:
            d1 = f1.float() * c1.repeat_interleave(64, 1).repeat_interleave(64, 2)
            d2 = f2.float() * c2.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :, :n]
        want = torch_moe(a.float().cpu(), d1, d2, score.cpu(), topk)
        got = vllm_ops.fused_moe(a, f1.to(device), f2.to(device), score, topk, False,
                                 use_fp8_w8a8=True, w1_scale=c1.to(device),
                                 w2_scale=c2.to(device), block_shape=block)
        if block is None:           # W8A16: the dequantized product up to bf16 rounding
            assert_moe_close(got, want)
            continue
        # block scales run W8A8 as vLLM does (ops.fused_moe_fp8_w8a8): fp8 activations
        # add their rounding (~2^-4 of a group's largest entry per element)
        assert_moe_close(got, want, tol=0.1)
        tw, ids, _ = vllm_ops.fused_topk(a, score, topk, False)
        w8a8 = mk.ops.fused_moe_fp8_w8a8(a, f1.to(device), c1.to(device), f2.to(device),
                                         c2.to(device), tw, ids, block)
        assert torch.equal(got, w8a8)
        w8a16 = mk.ops.fused_moe_fp8(a, f1.to(device), c1.to(device), f2.to(device),
                                     c2.to(device), tw, ids, block)
        assert not torch.equal(got, w8a16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_per_channel_w8a8_experts(device, dtype):
    """use_fp8_w8a8 with per_channel_quant (compressed-tensors FP8-dynamic MoE: per-channel
    fp8 weights, per-token fp8 activations, vLLM's per-token-quant path): against a torch
    recipe written here (x and the intermediate quantized per token to e4m3, the fp8
    products scaled by both scales), and exactly ops.fused_moe_fp8_w8a8 with one block
    per row; per-tensor weight scales [E] equal per-channel ones that repeat a value;
    without per_channel_quant (per-tensor activations) the experts run W8A16."""
    gen = torch.Generator().manual_seed(11)
    e, n, k, topk, m = 4, 64, 96, 2, 13
    a = torch.randn(m, k, generator=gen).to(dtype)
    score = torch.randn(m, e, generator=gen)
    w1 = (torch.randn(e, 2 * n, k, generator=gen) * 50).clamp(-448, 448).to(FP8)
    w2 = (torch.randn(e, k, n, generator=gen) * 50).clamp(-448, 448).to(FP8)
    s1 = (torch.rand(e, 2 * n, 1, generator=gen) + 0.5) / (50 * k ** 0.5)
    s2 = (torch.rand(e, k, 1, generator=gen) + 0.5) / (50 * n ** 0.5)

    def per_token(v):
        sc = v.float().abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448.0
        return (v.float() / sc).clamp(-448, 448).to(FP8).float(), sc

    tw, ids, _ = vllm_ops.fused_topk(a, score, topk, False)
    want = torch.zeros(m, k)
    aq, asc = per_token(a)
    for t in range(m):
        for j in range(topk):
            i = int(ids[t, j])
            h = (asc[t] * (aq[t] @ w1[i].float().t()) * s1[i, :, 0]).float()
            act = (torch.nn.functional.silu(h[:n]) * h[n:]).to(dtype)
            hq, hs = per_token(act[None])
            want[t] += float(tw[t, j]) * (hs[0] * (hq[0] @ w2[i].float().t()) * s2[i, :, 0])
    dev = [v.to(device) for v in (a, w1, w2, score, s1, s2)]
    got = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, False, use_fp8_w8a8=True,
                             per_channel_quant=True, w1_scale=dev[4], w2_scale=dev[5])
    assert_moe_close(got, want, tol=1e-2)
    tw_d, ids_d = tw.to(device), ids.to(device)
    direct = mk.ops.fused_moe_fp8_w8a8(dev[0], dev[1], dev[4], dev[2], dev[5], tw_d, ids_d,
                                       (1, k))
    assert torch.equal(got, direct)
    per_tensor = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, False,
                                    use_fp8_w8a8=True, per_channel_quant=True,
                                    w1_scale=dev[4][:, :1, 0].reshape(e),
                                    w2_scale=dev[5][:, :1, 0].reshape(e))
    expanded = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, False,
                                  use_fp8_w8a8=True, per_channel_quant=True,
                                  w1_scale=dev[4][:, :1].expand(e, 2 * n, 1),
                                  w2_scale=dev[5][:, :1].expand(e, k, 1))
    assert torch.equal(per_tensor, expanded)
    w8a16 = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, False,
                               use_fp8_w8a8=True, w1_scale=dev[4], w2_scale=dev[5])
    assert torch.equal(w8a16, mk.ops.fused_moe_fp8(dev[0], dev[1], dev[4], dev[2], dev[5],
                                                   tw_d, ids_d, (1, k)))
    assert not torch.equal(w8a16, got)


def _wn16(w, bits, group, has_zp, gen):
    """vLLM's test_fused_moe_wn16 packing of one expert matrix w [rows, K] (fp32): RTN per
    row and group (asymmetric with zero points, else the symmetric 8 / 128 zero), then
    two 4-bit values a byte (low nibble the even column), zero points packed along rows.
    Returns (the dequantized w, qweight, scales, qzeros or None)."""
    rows, k = w.shape
    top = (1 << bits) - 1
    g = w.reshape(rows, k // group, group)
    if has_zp:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / top).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, top)
    else:
        scale = (g.abs().amax(-1, keepdim=True) / (top // 2)).clamp_min(1e-8)
        zero = torch.full_like(scale, float(top // 2 + 1))
    q = torch.round(g / scale + zero).clamp(0, top)
    deq = ((q - zero) * scale).reshape(rows, k)
    q = q.reshape(rows, k).to(torch.uint8)
    z = zero[..., 0].to(torch.uint8)
    if bits == 4:
        q = q[:, 1::2] * 16 + q[:, ::2]
        z = z[1::2, :] * 16 + z[::2, :]
    return deq, q, scale[..., 0], z if has_zp else None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("has_zp", [False, True])
def test_fused_moe_wn16(device, bits, has_zp):
    """vLLM's test_fused_moe_wn16: group-quantized uint8 experts (block_shape [0, G]),
    with and without zero points, against torch_moe on the dequantized weights."""
    gen = torch.Generator().manual_seed(bits + has_zp)
    e, n, k, topk, m, group, dtype = 4, 64, 128, 2, 7, 32, torch.bfloat16
    a = torch.randn(m, k, generator=gen).to(dtype)
    score = torch.randn(m, e, generator=gen)
    w1, w2 = _experts(e, n, k, torch.float32, gen)
    packs = [[_wn16(w[i], bits, group, has_zp, gen) for i in range(e)] for w in (w1, w2)]
    deq = [torch.stack([p[0] for p in ps]) for ps in packs]
    qws = [torch.stack([p[1] for p in ps]).to(device) for ps in packs]
    scs = [torch.stack([p[2] for p in ps]).to(dtype).to(device) for ps in packs]
    zps = [torch.stack([p[3] for p in ps]).to(device) if has_zp else None for ps in packs]
    # vLLM's kernel converts the weights to the activations' dtype: so does the reference
    want = torch_moe(a.float(), deq[0].to(dtype).float(), deq[1].to(dtype).float(),
                     score, topk)
    got = vllm_ops.fused_moe(a.to(device), qws[0], qws[1], score.to(device), topk, False,
                             use_int4_w4a16=bits == 4, use_int8_w8a16=bits == 8,
                             w1_scale=scs[0], w2_scale=scs[1], w1_zp=zps[0], w2_zp=zps[1],
                             block_shape=[0, group])
    assert_moe_close(got, want)


def test_routing_variants_inplace_and_router_weight_on_input(device):
    gen = torch.Generator().manual_seed(5)
    e, n, k, m = 8, 32, 48, 6
    a = torch.randn(m, k, generator=gen).to(device)
    w1, w2 = (t.to(device) for t in _experts(e, n, k, torch.float32, gen))
    score = torch.randn(m, e, generator=gen).to(device)
    weights, ids, _ = vllm_ops.fused_topk(a, score, 2, True)
    want = mk.ops.fused_moe(a, w1, w2, weights, ids)
    assert torch.equal(vllm_ops.fused_moe(a, w1, w2, score, 2, True), want)
    calls = []

    def custom(hidden, gating, topk, renormalize):
        calls.append(topk)
        return vllm_ops.fused_topk(hidden, gating, topk, renormalize)[:2]
    assert torch.equal(vllm_ops.fused_moe(a, w1, w2, score, 2, True,
                                          custom_routing_function=custom), want)
    assert calls == [2]
    w, i = mk.ops.topk_sigmoid(score, 2, True, None)
    assert torch.equal(vllm_ops.fused_moe(a, w1, w2, score, 2, True, scoring_func="sigmoid"),
                       mk.ops.fused_moe(a, w1, w2, w, i))
    w, i = vllm_ops.grouped_topk(a, score, 2, True, 4, 2, "sigmoid")
    assert torch.equal(vllm_ops.fused_moe(a, w1, w2, score, 2, True, use_grouped_topk=True,
                                          num_expert_group=4, topk_group=2,
                                          scoring_func="sigmoid"),
                       mk.ops.fused_moe(a, w1, w2, w, i))
    # top-1 with the router weight on the input: w2(act(w1 (g x))) instead of g w2(...)
    w1t, i1 = vllm_ops.fused_topk(a, score, 1, False)[:2]
    got = vllm_ops.fused_experts(a, w1, w2, w1t, i1, apply_router_weight_on_input=True)
    want = mk.ops.fused_moe(a * w1t, w1, w2, torch.ones_like(w1t), i1)
    assert torch.equal(got, want)
    x = a.clone()
    out = vllm_ops.fused_experts(x, w1, w2, weights, ids, inplace=True)
    assert out is x and torch.equal(x, mk.ops.fused_moe(a, w1, w2, weights, ids))


def _per_token_quant_int8(x, half_even=False):
    """vLLM's per_token_quant_int8 (its test helper's math): scale = max|x| / 127,
    q = round(x * 127 / max|x|) (half away from zero, libdevice's round); half_even:
    round(x / scale) half to even (minikernels' scaled_int8_quant)."""
    xf = x.float()
    absmax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-10)
    if half_even:
        return torch.round(xf / (absmax / 127.0)).clamp(-128, 127), absmax / 127.0
    v = xf * (127.0 / absmax)
    return (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-128, 127), absmax / 127.0


def torch_w8a8_per_column_moe(a, w1, w2, w1_s, w2_s, score, topk, half_even=False):
    """vLLM's test_int8_kernel.py reference: per-token int8 activations (again for the
    intermediate), per-column weight scales, softmax top-k."""
    b, d = a.shape
    a_q, a_s = _per_token_quant_int8(a, half_even)
    a_q = a_q.view(b, -1, d).repeat(1, topk, 1).reshape(-1, d)
    a_s = a_s.view(b, -1, 1).repeat(1, topk, 1).reshape(-1, 1)
    out = torch.zeros(b * topk, w2.shape[1], dtype=a.dtype)
    score = torch.softmax(score, dim=-1, dtype=torch.float32)
    topk_weight, topk_ids = torch.topk(score, topk)
    topk_weight, topk_ids = topk_weight.view(-1), topk_ids.view(-1)
    n = w1.shape[1] // 2
    for i in range(w1.shape[0]):
        mask = topk_ids == i
        if mask.sum():
            h = (a_s[mask] * (a_q[mask] @ w1[i].float().t()) * w1_s[i].view(1, -1)).to(a.dtype)
            act = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
            h_q, h_s = _per_token_quant_int8(act, half_even)
            out[mask] = (h_s * (h_q @ w2[i].float().t()) * w2_s[i].view(1, -1)).to(a.dtype)
    return (out.view(b, -1, w2.shape[1]) * topk_weight.view(b, -1, 1).to(out.dtype)).sum(1)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int8_w8a8_experts_match_vllm_reference(device, m, dtype, backend):
    """vLLM's test_w8a8_int8_fused_moe: fused_moe(..., use_int8_w8a8=True,
    per_channel_quant=True) against torch_w8a8_per_column_moe, relative error < 0.05
    (here 2e-2 of the output's scale: both quantize the same way up to ties)."""
    gen = torch.Generator().manual_seed(m)
    e, n, k, topk = 6, 32, 48, 2
    a = (torch.randn(m, k, generator=gen)).to(dtype)
    w1 = torch.randint(-127, 128, (e, 2 * n, k), generator=gen).to(torch.int8)
    w2 = torch.randint(-127, 128, (e, k, n), generator=gen).to(torch.int8)
    # O(1) outputs: weights of std ~1 / sqrt(fan_in)
    w1_s = (torch.rand(e, 2 * n, 1, generator=gen) + 0.5) * 2 / (127 * k ** 0.5)
    w2_s = (torch.rand(e, k, 1, generator=gen) + 0.5) * 2 / (127 * n ** 0.5)
    score = torch.randn(m, e, generator=gen).to(dtype)
    want = torch_w8a8_per_column_moe(a, w1, w2, w1_s, w2_s, score, topk)
    dev = [t.to(device) for t in (a, w1, w2, score, w1_s, w2_s)]
    with mk.use_backend(backend):
        got = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, renormalize=False,
                                 use_int8_w8a8=True, per_channel_quant=True,
                                 w1_scale=dev[4], w2_scale=dev[5])
    assert got.dtype == dtype
    assert_moe_close(got, want.float())
    # fp32 activations, the same quantization steps (ties to even, as scaled_int8_quant):
    # equal up to fp32 rounding (a missed or extra quantization step shows at ~1e-2)
    a32, score32 = a.float(), score.float()
    exact = torch_w8a8_per_column_moe(a32, w1, w2, w1_s, w2_s, score32, topk, half_even=True)
    with mk.use_backend(backend):
        got32 = vllm_ops.fused_moe(a32.to(device), dev[1], dev[2], score32.to(device), topk,
                                   False, use_int8_w8a8=True, per_channel_quant=True,
                                   w1_scale=dev[4], w2_scale=dev[5])
    assert_moe_close(got32, exact, tol=1e-4)
    # per-tensor weight scales [E] equal per-channel scales that repeat one value
    s1, s2 = w1_s[:, :1, 0], w2_s[:, :1, 0]
    with mk.use_backend(backend):
        per_tensor = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, False,
                                        use_int8_w8a8=True, per_channel_quant=True,
                                        w1_scale=s1.reshape(e).to(device),
                                        w2_scale=s2.reshape(e).to(device))
        expanded = vllm_ops.fused_moe(dev[0], dev[1], dev[2], dev[3], topk, False,
                                      use_int8_w8a8=True, per_channel_quant=True,
                                      w1_scale=s1.expand(e, 2 * n).to(device),
                                      w2_scale=s2.expand(e, k).to(device))
    assert torch.equal(per_tensor, expanded)


def _group_quant_int8(x, group):
    """Per token and group of columns: scale = max|x| / 127, q = round(x / scale) (half to
    even, as minikernels' quantizers; vLLM's native helper truncates)."""
    g = x.float().unflatten(-1, (-1, group))
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127
    return torch.round(g / s).clamp(-128, 127).flatten(-2), s[..., 0]


def _block_matmul(q, w, qs, ws, block):
    """vLLM's native_w8a8_block_matmul: per K block the int dot times the activation
    group's scale and the weight block's scale, in fp32."""
    bn, bk = block
    n, k = w.shape
    out = torch.zeros(q.shape[0], n)
    for j in range(-(-k // bk)):
        cols = slice(j * bk, (j + 1) * bk)
        part = q[:, cols].float() @ w[:, cols].float().t()
        out += part * qs[:, j:j + 1] * ws[:, j].repeat_interleave(bn)[:n][None, :]
    return out


def torch_w8a8_block_int8_moe(a, w1, w2, w1_s, w2_s, score, topk, block):
    """vLLM's test_block_int8.py reference: activations and the intermediate quantized
    per token and group of block_k, block-scaled int8 weights, softmax top-k."""
    b, d = a.shape
    a = a.view(b, -1, d).repeat(1, topk, 1).reshape(-1, d)
    out = torch.zeros(b * topk, w2.shape[1], dtype=a.dtype)
    score = torch.softmax(score, dim=-1, dtype=torch.float32)
    topk_weight, topk_ids = torch.topk(score, topk)
    topk_weight, topk_ids = topk_weight.view(-1), topk_ids.view(-1)
    a_q, a_s = _group_quant_int8(a, block[1])
    n = w1.shape[1] // 2
    for i in range(w1.shape[0]):
        mask = topk_ids == i
        if mask.sum():
            h = _block_matmul(a_q[mask], w1[i], a_s[mask], w1_s[i], block).to(a.dtype)
            act = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
            h_q, h_s = _group_quant_int8(act, block[1])
            out[mask] = _block_matmul(h_q, w2[i], h_s, w2_s[i], block).to(a.dtype)
    return (out.view(b, -1, w2.shape[1]) * topk_weight.view(b, -1, 1).to(out.dtype)).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_w8a8_block_experts_match_vllm_reference(dtype):
    """vLLM's test_w8a8_block_int8_fused_moe: fused_moe(..., use_int8_w8a8=True,
    block_shape=[bn, bk]) against torch_w8a8_block_int8_moe (fp32: up to fp32 rounding;
    bf16: within 2e-2 of the output's scale)."""
    gen = torch.Generator().manual_seed(5)
    e, n, k, topk, block = 4, 32, 64, 2, [16, 32]
    m = 9
    a = torch.randn(m, k, generator=gen).to(dtype)
    w1 = torch.randint(-127, 128, (e, 2 * n, k), generator=gen).to(torch.int8)
    w2 = torch.randint(-127, 128, (e, k, n), generator=gen).to(torch.int8)
    w1_s = (torch.rand(e, 2 * n // 16, k // 32, generator=gen) + 0.5) * 2 / (127 * k ** 0.5)
    w2_s = (torch.rand(e, k // 16, n // 32, generator=gen) + 0.5) * 2 / (127 * n ** 0.5)
    score = torch.randn(m, e, generator=gen).to(dtype)
    want = torch_w8a8_block_int8_moe(a, w1, w2, w1_s, w2_s, score, topk, block).float()
    got = vllm_ops.fused_moe(a, w1, w2, score, topk, False, use_int8_w8a8=True,
                             block_shape=block, w1_scale=w1_s, w2_scale=w2_s)
    assert got.dtype == dtype
    assert_moe_close(got, want, tol=1e-4 if dtype == torch.float32 else 2e-2)


def test_refused_formats_name_the_argument():
    a = torch.randn(2, 16)
    w1, w2 = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    w, i = torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="use_mxfp4_w4a4"):
        vllm_ops.fused_experts(a, w1, w2, w, i, use_mxfp4_w4a4=True)
    q1, q2 = w1.to(torch.int8), w2.to(torch.int8)
    with pytest.raises(ValueError, match="per_channel_quant"):
        vllm_ops.fused_experts(a, q1, q2, w, i, use_int8_w8a8=True,
                               w1_scale=torch.ones(2, 8), w2_scale=torch.ones(2, 16))
    with pytest.raises(ValueError, match="w2_scale"):
        vllm_ops.fused_experts(a, q1, q2, w, i, use_int8_w8a8=True, per_channel_quant=True,
                               w1_scale=torch.ones(2, 8), w2_scale=torch.ones(2, 7))
    with pytest.raises(TypeError, match="int8"):
        vllm_ops.fused_experts(a, w1, w2, w, i, use_int8_w8a8=True, per_channel_quant=True,
                               w1_scale=torch.ones(2, 8), w2_scale=torch.ones(2, 16))
    with pytest.raises(ValueError, match="activation"):
        vllm_ops.fused_experts(a, q1, q2, w, i, use_int8_w8a8=True, per_channel_quant=True,
                               w1_scale=torch.ones(2, 8), w2_scale=torch.ones(2, 16),
                               activation="relu2")
    with pytest.raises(TypeError, match="use_int4_w4a16"):
        vllm_ops.fused_experts(a, w1, w2, w, i, use_int4_w4a16=True)
    u1, u2 = torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2, 16, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block_shape"):
        vllm_ops.fused_experts(a, u1, u2, w, i, use_int4_w4a16=True,
                               w1_scale=torch.ones(2, 8, 1), w2_scale=torch.ones(2, 16, 1))
    with pytest.raises(NotImplementedError, match="w1_zp"):
        vllm_ops.fused_experts(a, w1, w2, w, i, w1_zp=torch.zeros(1))
    with pytest.raises(ValueError, match="topk == 1"):
        vllm_ops.fused_experts(a, w1, w2, torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.int32),
                               apply_router_weight_on_input=True)
    with pytest.raises(ValueError, match="w1_scale"):
        vllm_ops.fused_experts(a, w1.to(FP8), w2.to(FP8), w, i, use_fp8_w8a8=True)
    with pytest.raises(ValueError, match="scoring_func"):
        vllm_ops.fused_moe(a, w1, w2, torch.randn(2, 2), 1, False, scoring_func="relu")
    with pytest.raises(ValueError, match="global_num_experts"):
        vllm_ops.fused_experts(a, w1, w2, w, i, global_num_experts=5,
                               expert_map=torch.tensor([0, 1, -1], dtype=torch.int32))
