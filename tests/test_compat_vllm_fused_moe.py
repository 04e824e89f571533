"""vLLM's fused-MoE Python API (fused_topk / fused_experts / fused_moe) on minikernels'
MoE ops: vLLM's tests/kernels/moe/test_moe.py reference (torch_moe) for dense experts
with and without expert parallelism (expert_map), int8 W8A16 and fp8 (block, per-channel,
per-tensor) experts against the dequantized reference, top-1 router weight on the input,
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
    w1 = (torch.randn(e, 2 * n, k, generator=gen) / 10).to(dtype)
    w2 = (torch.randn(e, k, n, generator=gen) / 10).to(dtype)
    return w1, w2


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("ep_size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_matches_vllm_reference(device, backend, m, ep_size, dtype):
    """vLLM's test_fused_moe: fused_moe(a, w1, w2, score, topk, global_num_experts=e,
    expert_map=e_map, renormalize=False) against torch_moe, atol 2e-2."""
    gen = torch.Generator().manual_seed(m + ep_size)
    e, n, k, topk = 8, 64, 48, 2
    a = (torch.randn(m, k, generator=gen) / 10).to(dtype)
    w1, w2 = _experts(e, n, k, dtype, gen)
    score = torch.randn(m, e, generator=gen).to(dtype)
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
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=0)


def test_quantized_experts_match_the_dequantized_reference(device):
    gen = torch.Generator().manual_seed(3)
    e, n, k, topk, m = 4, 64, 128, 2, 9
    a = (torch.randn(m, k, generator=gen) / 10).to(torch.bfloat16).to(device)
    score = torch.randn(m, e, generator=gen).to(device)
    # int8 W8A16: per-row scales [E, 2N, 1] / [E, K, 1]
    q1 = torch.randint(-127, 128, (e, 2 * n, k), generator=gen, dtype=torch.int8)
    q2 = torch.randint(-127, 128, (e, k, n), generator=gen, dtype=torch.int8)
    s1, s2 = torch.rand(e, 2 * n, 1, generator=gen) / 500, torch.rand(e, k, 1, generator=gen) / 500
    want = torch_moe(a.float().cpu(), q1.float() * s1, q2.float() * s2, score.cpu(), topk)
    got = vllm_ops.fused_moe(a, q1.to(device), q2.to(device), score, topk, False,
                             use_int8_w8a16=True, w1_scale=s1.to(device), w2_scale=s2.to(device))
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)
    # fp8: block-wise [64, 64], per channel, per tensor
    f1 = (torch.randn(e, 2 * n, k, generator=gen) * 50).clamp(-448, 448).to(FP8)
    f2 = (torch.randn(e, k, n, generator=gen) * 50).clamp(-448, 448).to(FP8)
    cases = {
        "block": (torch.rand(e, 2, 2, generator=gen) / 2000,
                  torch.rand(e, 2, 1, generator=gen) / 2000, [64, 64]),
        "channel": (torch.rand(e, 2 * n, 1, generator=gen) / 2000,
                    torch.rand(e, k, 1, generator=gen) / 2000, None),
        "tensor": (torch.rand(e, generator=gen) / 2000, torch.rand(e, generator=gen) / 2000,
                   None),
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
        torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2, msg=name)


def test_routing_variants_inplace_and_router_weight_on_input(device):
    gen = torch.Generator().manual_seed(5)
    e, n, k, m = 8, 32, 48, 6
    a = (torch.randn(m, k, generator=gen) / 10).to(device)
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


def test_refused_formats_name_the_argument():
    a = torch.randn(2, 16)
    w1, w2 = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    w, i = torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.int32)
    for flag in ("use_int8_w8a8", "use_int4_w4a16", "use_mxfp4_w4a4"):
        with pytest.raises(NotImplementedError, match=flag):
            vllm_ops.fused_experts(a, w1, w2, w, i, **{flag: True})
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
