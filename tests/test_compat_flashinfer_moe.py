"""FlashInfer's fused-MoE API (minikernels.compat.flashinfer_moe: cutlass_fused_moe,
fused_topk_deepseek) on minikernels' MoE ops, tested with the recipes of FlashInfer's
tests/moe/test_trtllm_cutlass_fused_moe.py (its compute_routing / compute_with_experts
torch references, rewritten here in fp64, with FlashInfer's [up; gate] fc1 split and its
SwiGLU-bias variant): fp16 / bf16 experts, expert parallelism (the ranks' outputs sum to
the full result), tensor parallelism (sharded w3 / w1 / w2, fc2 bias on rank 0 only),
biases, GPT-OSS's clamped SwiGLU (uniform and per-expert parameters), the other
activations, DeepSeek FP8 block-scale experts, per-tensor FP8 experts, the ``output``
buffer, and the refused features and bad inputs (errors name the argument). Where the
compat layer only reorders FlashInfer's inputs, the result is also checked bit for bit
against minikernels' own op."""
from __future__ import annotations

from enum import IntEnum

import pytest
import torch
import torch.nn.functional as F

import minikernels as mk
from minikernels import ops
from minikernels.compat import flashinfer_moe as fused_moe
from minikernels.compat.flashinfer_moe import ActivationType

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


# ------------------------------------------------------------------- FlashInfer's recipes


def compute_routing(router_logits, top_k):
    """FlashInfer's test routing: softmax in fp32, top-k, renormalized."""
    weights = torch.softmax(router_logits.float(), dim=1)
    weights, experts = torch.topk(weights, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).float(), experts


def _act(h, activation, alpha=None, beta=None, limit=None):
    """One expert's activation in fp64 on fc1's output h: gated ones split h into its
    up half (first, FlashInfer's w3) and its gate half (second, w1)."""
    if activation in ("gelu", "silu", "relu2"):
        return {"gelu": F.gelu, "silu": F.silu, "relu2": lambda v: F.relu(v) ** 2}[
            activation](h)
    up, gate = h.chunk(2, dim=-1)
    if activation == "swiglu_bias":  # FlashInfer's SwigluBiasAdaptor
        g = gate.clamp(max=limit)
        return g * torch.sigmoid(alpha * g) * (up.clamp(-limit, limit) + beta)
    fn = {"swiglu": F.silu, "geglu": F.gelu,
          "geglu_tanh": lambda v: F.gelu(v, approximate="tanh")}[activation]
    return fn(gate) * up


def compute_with_experts(x, w31, w2, experts, weights, activation="swiglu", b31=None,
                         b2=None, alpha=None, beta=None, limit=None, first_expert=0):
    """FlashInfer's compute_with_experts in fp64: each local expert e (global id
    first_expert + e) over the tokens that chose it; per-expert alpha / beta / limit
    lists for the SwiGLU-bias variant."""
    x = x.double()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for e in range(w2.shape[0]):
        tok, slot = torch.where(experts == first_expert + e)
        if not len(tok):
            continue
        h = x[tok] @ w31[e].double().T
        if b31 is not None:
            h = h + b31[e].double()
        kw = {} if alpha is None else dict(alpha=alpha[e], beta=beta[e], limit=limit[e])
        y = _act(h, activation, **kw) @ w2[e].double().T
        if b2 is not None:
            y = y + b2[e].double()
        out.index_add_(0, tok, weights[tok, slot, None].double() * y)
    return out


def dynamic_per_tensor_fp8_quant(x):
    """FlashInfer's test quantizer: one scale max|x| / 448 for the whole tensor."""
    scale = x.abs().max().float() / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def cast_to_representable(x):
    q, s = dynamic_per_tensor_fp8_quant(x)
    return (q.float() * s).to(x.dtype)


def per_block_cast_to_fp8(w, block=128):
    """A [N, K] weight in 128 x 128 blocks (N, K multiples of 128): fp8 values and fp32
    scales [N / 128, K / 128], scale = max(amax, 1e-4) / 448 (FlashInfer's recipe)."""
    n, k = w.shape
    v = w.float().view(n // block, block, k // block, block)
    amax = v.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4)
    q = (v * (FP8_MAX / amax)).to(FP8).view(n, k)
    return q, (amax / FP8_MAX).view(n // block, k // block)


def dequant_blocks(q, s, block=128):
    return q.float() * s.repeat_interleave(block, -2).repeat_interleave(block, -1)


def per_token_group_dequant(x, group=128):
    """x as FlashInfer's test sees it after per_token_group_quant_fp8 (eps 1e-10)."""
    g = x.float().view(x.shape[0], -1, group)
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    return ((g / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s).view_as(x)


# ------------------------------------------------------------------------------ helpers


def make_moe(t, h, inter, e, k, dtype, seed, gated=True, x_scale=1.0):
    """x [T, H], w31 [E, 2I (or I), H] (FlashInfer's [up; gate]), w2 [E, H, I], FlashInfer
    routing; weights scaled so expert outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, h, generator=gen) * x_scale).to(dtype)
    w31 = (torch.randn(e, (2 if gated else 1) * inter, h, generator=gen) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) / inter ** 0.5).to(dtype)
    weights, experts = compute_routing(torch.randn(t, e, generator=gen), k)
    return x, w31, w2, weights, experts.to(torch.int32)


def gate_first(w):
    """FlashInfer's [up; gate] halves -> minikernels' [gate; up]."""
    up, gate = w.chunk(2, dim=1)
    return torch.cat((gate, up), dim=1)


def assert_moe_close(got, want, tol=2e-2):
    """Within tol of the fp64 reference, relative to the output's scale."""
    got = got.double().cpu()
    assert got.shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=tol)


def run(x, w31, w2, weights, experts, device, **kw):
    """cutlass_fused_moe on device with FlashInfer's positional call; -> its output."""
    dev = [t.to(device) for t in (x, experts, weights, w31, w2)]
    out = fused_moe.cutlass_fused_moe(*dev, kw.pop("output_dtype", x.dtype),
                                      kw.pop("quant_scales", None), **kw)
    assert isinstance(out, list) and len(out) == 1
    return out[0]


# ---------------------------------------------------------------------- 16-bit experts


SHAPES = [(1, 128, 128, 4, 2), (17, 256, 128, 8, 2), (6, 128, 128, 8, 4)]  # T, H, I, E, k


@pytest.mark.parametrize("backend, dtype, shape", [
    *(("reference", dtype, shape) for dtype in (torch.bfloat16, torch.float16)
      for shape in SHAPES),
    # one Triton shape per dtype keeps the interpreter run short
    *(("triton", dtype, SHAPES[1]) for dtype in (torch.bfloat16, torch.float16))])
def test_moe_matches_flashinfer_reference(device, backend, dtype, shape):
    """FlashInfer's test_moe (Swiglu): against compute_with_experts, and bit for bit
    against ops.fused_moe on the gate-first fc1."""
    t, h, inter, e, k = shape
    x, w31, w2, weights, experts = make_moe(t, h, inter, e, k, dtype, seed=t + e)
    with mk.use_backend(backend):
        got = run(x, w31, w2, weights, experts, device)
        want = ops.fused_moe(x.to(device), gate_first(w31).to(device), w2.to(device),
                             weights.to(device), experts.to(device))
    assert got.dtype == dtype and got.shape == (t, h)
    assert torch.equal(got, want)
    assert_moe_close(got, compute_with_experts(x, w31, w2, experts, weights))


def test_output_buffer_is_written_and_returned(device):
    x, w31, w2, weights, experts = make_moe(5, 128, 128, 4, 2, torch.bfloat16, seed=1)
    buf = torch.full((5, 128), float("nan"), dtype=torch.bfloat16, device=device)
    got = fused_moe.cutlass_fused_moe(x.to(device), experts.to(device), weights.to(device),
                                      w31.to(device), w2.to(device), torch.bfloat16,
                                      quant_scales=None, output=buf)
    assert got[0] is buf
    assert torch.equal(buf, run(x, w31, w2, weights, experts, device))


def test_no_final_scales_means_weight_one(device):
    x, w31, w2, weights, experts = make_moe(4, 128, 128, 4, 2, torch.bfloat16, seed=2)
    got = fused_moe.cutlass_fused_moe(x.to(device), experts.to(device), None,
                                      w31.to(device), w2.to(device), x.dtype, None)[0]
    assert torch.equal(got, run(x, w31, w2, torch.ones_like(weights), experts, device))


def test_zero_tokens(device):
    x, w31, w2, weights, experts = make_moe(0, 128, 128, 4, 2, torch.bfloat16, seed=3)
    assert run(x, w31, w2, weights, experts, device).shape == (0, 128)


def test_tuning_knobs_change_nothing(device):
    """tune_max_num_tokens / enable_pdl / use_fused_finalize / profile_ids /
    workspace_buffer / swizzled_input_sf only tune FlashInfer's kernels."""
    x, w31, w2, weights, experts = make_moe(6, 128, 128, 4, 2, torch.float16, seed=4)
    want = run(x, w31, w2, weights, experts, device)
    got = run(x, w31, w2, weights, experts, device, tune_max_num_tokens=64, enable_pdl=True,
              use_fused_finalize=False, profile_ids=[-1, -1], swizzled_input_sf=False,
              workspace_buffer=torch.empty(64, dtype=torch.uint8, device=device))
    assert torch.equal(got, want)


# ------------------------------------------------------------------------- parallelism


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_ranks_sum_to_full(device, ep_size):
    """FlashInfer's test_moe_expert_parallel: each rank gets its slice of experts and the
    global ids; the ranks' outputs sum to the full result; a token none of whose experts
    live on a rank gets a zero row there."""
    e, t = 8, 9
    x, w31, w2, weights, experts = make_moe(t, 128, 128, e, 2, torch.bfloat16, seed=ep_size)
    per = e // ep_size
    outs = []
    for rank in range(ep_size):
        sl = slice(rank * per, (rank + 1) * per)
        out = run(x, w31[sl], w2[sl], weights, experts, device, ep_size=ep_size,
                  ep_rank=rank).float().cpu()
        away = ((experts < rank * per) | (experts >= (rank + 1) * per)).all(dim=1)
        assert torch.equal(out[away], torch.zeros_like(out[away]))
        outs.append(out)
    assert_moe_close(sum(outs), compute_with_experts(x, w31, w2, experts, weights))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_ranks_sum_to_full(device, tp_size):
    """FlashInfer's test_moe_tensor_parallel: w3 and w1 sharded separately along I and
    restacked [w3_shard; w1_shard], w2 along I; with biases, fc1's sharded alike and
    fc2's added on tp_rank 0 only, so the ranks' outputs sum to the full result."""
    e, inter = 4, 128
    x, w31, w2, weights, experts = make_moe(7, 128, inter, e, 2, torch.bfloat16, seed=tp_size)
    gen = torch.Generator().manual_seed(10)
    b31 = (torch.randn(e, 2 * inter, generator=gen) * 0.5).bfloat16()
    b2 = (torch.randn(e, 128, generator=gen) * 0.5).bfloat16()
    w3, w1 = w31.chunk(2, dim=1)
    b3, b1 = b31.chunk(2, dim=1)
    shard = inter // tp_size
    outs = []
    for rank in range(tp_size):
        sl = slice(rank * shard, (rank + 1) * shard)
        w31_local = torch.cat([w3[:, sl], w1[:, sl]], dim=1)
        b31_local = torch.cat([b3[:, sl], b1[:, sl]], dim=1)
        outs.append(run(x, w31_local, w2[:, :, sl].contiguous(), weights, experts, device,
                        tp_size=tp_size, tp_rank=rank, fc1_expert_biases=b31_local.to(device),
                        fc2_expert_biases=b2.to(device)).float().cpu())
    assert_moe_close(sum(outs), compute_with_experts(x, w31, w2, experts, weights, b31=b31,
                                                     b2=b2))


def test_expert_and_tensor_parallel(device):
    """FlashInfer's test_moe_tensor_expert_parallel: 2 EP x 2 TP ranks."""
    e, inter, ep_size, tp_size = 8, 128, 2, 2
    x, w31, w2, weights, experts = make_moe(5, 128, inter, e, 2, torch.float16, seed=11)
    per, shard = e // ep_size, inter // tp_size
    total = 0
    for ep_rank in range(ep_size):
        w3, w1 = w31[ep_rank * per:(ep_rank + 1) * per].chunk(2, dim=1)
        w2_ep = w2[ep_rank * per:(ep_rank + 1) * per]
        for tp_rank in range(tp_size):
            sl = slice(tp_rank * shard, (tp_rank + 1) * shard)
            total = total + run(x, torch.cat([w3[:, sl], w1[:, sl]], dim=1),
                                w2_ep[:, :, sl].contiguous(), weights, experts, device,
                                tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size,
                                ep_rank=ep_rank).float().cpu()
    assert_moe_close(total, compute_with_experts(x, w31, w2, experts, weights))


def test_ids_outside_every_rank_add_nothing(device):
    """FlashInfer skips choices of experts not on this rank, -1 padding included."""
    x, w31, w2, weights, experts = make_moe(4, 128, 128, 4, 2, torch.bfloat16, seed=12)
    bad = experts.clone()
    bad[:, 1] = torch.tensor([-1, 4, 100, -7], dtype=torch.int32)
    kept = weights.clone()
    kept[:, 1] = 0
    assert torch.equal(run(x, w31, w2, weights, bad, device),
                       run(x, w31, w2, kept, experts, device))


# ------------------------------------------------------------------ biases, activations


def test_biases(device):
    """fc1 biases [E, 2I] in fc1's [up; gate] order, fc2 biases [E, H]."""
    e, inter = 4, 128
    x, w31, w2, weights, experts = make_moe(7, 128, inter, e, 2, torch.bfloat16, seed=13)
    gen = torch.Generator().manual_seed(13)
    b31 = (torch.randn(e, 2 * inter, generator=gen) * 0.5).bfloat16()
    b2 = (torch.randn(e, 128, generator=gen) * 0.5).bfloat16()
    got = run(x, w31, w2, weights, experts, device, fc1_expert_biases=b31.to(device),
              fc2_expert_biases=b2.to(device))
    assert_moe_close(got, compute_with_experts(x, w31, w2, experts, weights, b31=b31, b2=b2))
    want = ops.fused_moe(*(v.to(device) for v in (x, gate_first(w31), w2, weights, experts)),
                         w13_bias=gate_first(b31).to(device), w2_bias=b2.to(device))
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_swiglu_bias_variant_is_gpt_oss_swiglu(device, backend):
    """FlashInfer's SwiGLU-bias branch with GPT-OSS's parameters (alpha 1.702, beta 1,
    limit 7; inputs large enough that the clamps engage) is ops' swigluoai."""
    e = 4
    x, w31, w2, weights, experts = make_moe(9, 128, 128, e, 2, torch.bfloat16, seed=14,
                                            x_scale=8.0)
    params = {n: torch.full((e,), v, device=device) for n, v in
              (("swiglu_alpha", 1.702), ("swiglu_beta", 1.0), ("swiglu_limit", 7.0))}
    with mk.use_backend(backend):
        got = run(x, w31, w2, weights, experts, device, **params)
        want = ops.fused_moe(*(v.to(device) for v in (x, gate_first(w31), w2, weights,
                                                       experts)),
                             activation="swigluoai", alpha=1.702, limit=7.0)
    assert torch.equal(got, want)
    ref = compute_with_experts(x, w31, w2, experts, weights, "swiglu_bias", alpha=[1.702] * e,
                               beta=[1.0] * e, limit=[7.0] * e)
    assert_moe_close(got, ref)


def test_swiglu_parameters_per_expert(device):
    """Different alpha / limit per expert (beta 1; one expert without a limit, one at
    FlashInfer's defaults alpha 1 / beta 0 / no limit: plain SwiGLU)."""
    e = 4
    x, w31, w2, weights, experts = make_moe(12, 128, 128, e, 3, torch.bfloat16, seed=15,
                                            x_scale=8.0)
    alpha, beta = [1.702, 1.0, 1.702, 1.0], [1.0, 1.0, 1.0, 0.0]
    limit = [7.0, 7.0, 3.0, float("inf")]
    got = run(x, w31, w2, weights, experts, device,
              swiglu_alpha=torch.tensor(alpha, device=device),
              swiglu_beta=torch.tensor(beta, device=device),
              swiglu_limit=torch.tensor(limit, device=device))
    ref = compute_with_experts(x, w31, w2, experts, weights, "swiglu_bias", alpha=alpha,
                               beta=beta, limit=limit)
    assert_moe_close(got, ref)


def test_swiglu_defaults_are_plain_swiglu(device):
    x, w31, w2, weights, experts = make_moe(5, 128, 128, 4, 2, torch.bfloat16, seed=16)
    got = run(x, w31, w2, weights, experts, device,
              swiglu_alpha=torch.ones(4, device=device),
              swiglu_beta=torch.zeros(4, device=device))
    assert torch.equal(got, run(x, w31, w2, weights, experts, device))


@pytest.mark.parametrize("beta, alpha, limit", [(0.5, 1.702, 7.0), (0.0, 1.702, 7.0),
                                                (0.0, 1.0, 7.0)])
def test_swiglu_variants_without_a_minikernels_activation(device, beta, alpha, limit):
    x, w31, w2, weights, experts = make_moe(3, 128, 128, 4, 2, torch.bfloat16, seed=17)
    with pytest.raises(NotImplementedError, match="swiglu_beta"):
        run(x, w31, w2, weights, experts, device,
            swiglu_alpha=torch.full((4,), alpha, device=device),
            swiglu_beta=torch.full((4,), beta, device=device),
            swiglu_limit=torch.full((4,), limit, device=device))


@pytest.mark.parametrize("activation_type, ref, op_activation, gated", [
    (ActivationType.Geglu, "geglu", "gelu", True),
    (ActivationType.GegluTanh, "geglu_tanh", "gelu_tanh", True),
    (ActivationType.Gelu, "gelu", "gelu", False), (ActivationType.Silu, "silu", "silu", False),
    (ActivationType.Relu2, "relu2", "relu2", False)])
def test_other_activations(device, activation_type, ref, op_activation, gated):
    """Gated GELU (erf: CUTLASS's GELU in FlashInfer's activation kernel) / tanh-GELU
    (FlashInfer's compute_with_experts_gelu_tanh); the non-gated activations take fc1
    [E, I, H], passed to the op as is."""
    x, w31, w2, weights, experts = make_moe(7, 128, 128, 4, 2, torch.bfloat16, seed=18,
                                            gated=gated)
    got = run(x, w31, w2, weights, experts, device, activation_type=activation_type)
    assert_moe_close(got, compute_with_experts(x, w31, w2, experts, weights, ref))
    w13 = gate_first(w31) if gated else w31
    want = ops.fused_moe(*(v.to(device) for v in (x, w13, w2, weights, experts)),
                         activation=op_activation, gated=gated)
    assert torch.equal(got, want)


def test_activation_type_by_int_and_by_foreign_enum(device):
    """Ints 0..6 read as FlashInfer's values; another ActivationType class (FlashInfer's
    own) is read by member name."""
    class Foreign(IntEnum):  # values as an older FlashInfer might number them
        Swiglu = 30
        GegluTanh = 31

    x, w31, w2, weights, experts = make_moe(4, 128, 128, 4, 2, torch.bfloat16, seed=19)
    want = run(x, w31, w2, weights, experts, device)
    assert torch.equal(run(x, w31, w2, weights, experts, device, activation_type=3), want)
    assert torch.equal(run(x, w31, w2, weights, experts, device,
                           activation_type=Foreign.Swiglu), want)
    assert torch.equal(run(x, w31, w2, weights, experts, device,
                           activation_type=Foreign.GegluTanh),
                       run(x, w31, w2, weights, experts, device,
                           activation_type=ActivationType.GegluTanh))
    with pytest.raises(ValueError, match="activation_type 8"):
        run(x, w31, w2, weights, experts, device, activation_type=8)
    with pytest.raises(TypeError, match="activation_type"):
        run(x, w31, w2, weights, experts, device, activation_type="swiglu")


@pytest.mark.parametrize("activation_type", [ActivationType.Relu, ActivationType.Identity,
                                             ActivationType.SwigluStep])
def test_refused_activations(device, activation_type):
    x, w31, w2, weights, experts = make_moe(3, 128, 128, 4, 2, torch.bfloat16, seed=20)
    with pytest.raises(NotImplementedError, match=f"activation_type {activation_type.name}"):
        run(x, w31, w2, weights, experts, device, activation_type=activation_type)


# -------------------------------------------------------------------------- fp8 experts


def make_fp8_block_experts(e, h, inter, seed):
    x, w31, w2, weights, experts = make_moe(5, h, inter, e, 2, torch.bfloat16, seed=seed)
    q31, s31 = zip(*(per_block_cast_to_fp8(w) for w in w31))
    q2, s2 = zip(*(per_block_cast_to_fp8(w) for w in w2))
    return x, torch.stack(q31), torch.stack(s31), torch.stack(q2), torch.stack(s2), \
        weights, experts


@pytest.mark.parametrize("backend, h, inter", [("reference", 128, 128),
                                              ("reference", 256, 256),
                                              ("triton", 128, 128)])
def test_fp8_block_scale_experts(device, backend, h, inter):
    """FlashInfer's test_moe_fp8_block_scaling: bf16 input, fp8 weights with 128 x 128
    block scales, quant_scales [w31 scales, w2 scales]; against compute_with_experts on
    the dequantized weights and the per-token-group-quantized input (rtol / atol 1e-1,
    FlashInfer's), and bit for bit against ops.fused_moe_fp8_w8a8 with the halves
    (weights and block-scale rows) swapped."""
    e = 4
    x, q31, s31, q2, s2, weights, experts = make_fp8_block_experts(e, h, inter, seed=h)
    with mk.use_backend(backend):
        got = run(x, q31, q2, weights, experts, device, use_deepseek_fp8_block_scale=True,
                  quant_scales=[s31.to(device), s2.to(device)])
        want = ops.fused_moe_fp8_w8a8(
            x.to(device), gate_first(q31.view(torch.uint8)).view(FP8).to(device),
            gate_first(s31).to(device), q2.to(device), s2.to(device), weights.to(device),
            experts.to(device), [128, 128])
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    ref = compute_with_experts(per_token_group_dequant(x), dequant_blocks(q31, s31),
                               dequant_blocks(q2, s2), experts, weights)
    assert_moe_close(got, ref, tol=1e-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_per_tensor_experts(device, dtype):
    """FlashInfer's test_moe_fp8: input and weights quantized per tensor (per expert),
    quant_scales [w1_scale * input_scale, 1.0, w2_scale, input_scale]; against
    compute_with_experts on the dequantized tensors (rtol / atol 1e-1); exactly
    ops.fused_moe_fp8 (W8A16) with one scale per expert and matrix."""
    e, h, inter = 4, 128, 128
    x, w31, w2, weights, experts = make_moe(6, h, inter, e, 2, dtype, seed=21)
    x = cast_to_representable(x)
    x_q, x_scale = dynamic_per_tensor_fp8_quant(x)
    q31, s31 = zip(*(dynamic_per_tensor_fp8_quant(w) for w in w31))
    q2, s2 = zip(*(dynamic_per_tensor_fp8_quant(w) for w in w2))
    q31, q2, s31, s2 = torch.stack(q31), torch.stack(q2), torch.stack(s31), torch.stack(s2)
    fc1_dequant = (s31 * x_scale).float()
    quant_scales = [fc1_dequant.to(device), torch.tensor(1.0, device=device),
                    s2.float().to(device), x_scale.to(device)]
    got = run(x_q, q31, q2, weights, experts, device, output_dtype=dtype,
              quant_scales=quant_scales)
    assert got.dtype == dtype
    ref = compute_with_experts(x, q31.float() * s31.view(e, 1, 1),
                               q2.float() * s2.view(e, 1, 1), experts, weights)
    assert_moe_close(got, ref, tol=1e-1)
    want = ops.fused_moe_fp8(x_q.to(dtype).to(device),
                             gate_first(q31.view(torch.uint8)).view(FP8).to(device),
                             fc1_dequant.view(e, 1, 1).to(device), q2.to(device),
                             s2.float().view(e, 1, 1).to(device), weights.to(device),
                             experts.to(device), [2 * inter, h])
    assert torch.equal(got, want)


# -------------------------------------------------------------------- refusals, errors


def _args(device, t=3, dtype=torch.bfloat16, e=4, inter=128):
    x, w31, w2, weights, experts = make_moe(t, 128, inter, e, 2, dtype, seed=30)
    return [v.to(device) for v in (x, experts, weights, w31, w2)]


@pytest.mark.parametrize("name, kwargs", [
    ("input_sf", {"input_sf": torch.ones(1)}),
    ("enable_alltoall", {"enable_alltoall": True}),
    ("use_w4_group_scaling", {"use_w4_group_scaling": True}),
    ("use_mxfp8_act_scaling", {"use_mxfp8_act_scaling": True}),
    ("min_latency_mode", {"min_latency_mode": True}),
    ("use_packed_weights", {"use_packed_weights": True}),
    ("use_wfp4afp8_humming", {"use_wfp4afp8_humming": True}),
    ("cluster_size", {"cluster_size": 2}),
])
def test_refused_features_name_the_argument(device, name, kwargs):
    x, ids, w, w31, w2 = _args(device)
    with pytest.raises(NotImplementedError, match=name):
        fused_moe.cutlass_fused_moe(x, ids, w, w31, w2, x.dtype, None, **kwargs)


@pytest.mark.parametrize("dtype, what", [(torch.int8, "int8"), (torch.int64, "NVFP4"),
                                         (torch.uint8, "W4A16")])
def test_refused_weight_formats(device, dtype, what):
    x, ids, w, _, _ = _args(device)
    fc1 = torch.zeros(4, 256, 64, dtype=dtype, device=device)
    fc2 = torch.zeros(4, 128, 64, dtype=dtype, device=device)
    with pytest.raises(NotImplementedError, match=f"fc1_expert_weights.*{what}"):
        fused_moe.cutlass_fused_moe(x, ids, w, fc1, fc2, x.dtype, [])


def test_refused_output_dtype(device):
    x, ids, w, w31, w2 = _args(device)
    with pytest.raises(NotImplementedError, match="output_dtype"):
        fused_moe.cutlass_fused_moe(x, ids, w, w31, w2, FP8, None)


def _bad_calls(device):
    """(name the error must mention, error type, call) for FlashInfer-style bad inputs."""
    x, ids, w, w31, w2 = _args(device)
    e, dt = 4, x.dtype
    fp8 = dict(fc1_expert_weights=w31.to(FP8), fc2_expert_weights=w2.to(FP8))
    block = dict(use_deepseek_fp8_block_scale=True, **fp8)
    base = dict(input=x, token_selected_experts=ids, token_final_scales=w,
                fc1_expert_weights=w31, fc2_expert_weights=w2, output_dtype=dt,
                quant_scales=None)

    def call(**kw):
        return lambda: fused_moe.cutlass_fused_moe(**{**base, **kw})

    return [
        ("token_selected_experts", TypeError, call(token_selected_experts=ids.float())),
        ("token_selected_experts", ValueError, call(token_selected_experts=ids[:2])),
        ("token_final_scales", TypeError, call(token_final_scales=w.bfloat16())),
        ("token_final_scales", ValueError, call(token_final_scales=w[:, :1])),
        ("fc2_expert_weights", ValueError, call(fc2_expert_weights=w2[:, :64])),
        ("fc1_expert_weights", ValueError, call(fc1_expert_weights=w31[:, :64])),
        ("fc1_expert_weights", TypeError, call(fc1_expert_weights=w31.half())),
        ("input", ValueError, call(input=x[None])),
        ("output_dtype", ValueError, call(output_dtype=torch.float16)),
        ("output", ValueError, call(output=torch.empty(2, 128, dtype=dt, device=device))),
        ("output", TypeError, call(output=torch.empty(3, 128, device=device))),
        ("ep_rank", ValueError, call(ep_size=2, ep_rank=2)),
        ("tp_size", ValueError, call(tp_size=0)),
        ("swiglu_alpha", ValueError, call(swiglu_alpha=torch.ones(e + 1, device=device))),
        ("swiglu_limit", TypeError, call(swiglu_limit=torch.ones(e, dtype=dt, device=device))),
        ("swiglu_limit", ValueError, call(swiglu_beta=torch.ones(e, device=device),
                                          swiglu_limit=torch.zeros(e, device=device))),
        ("swiglu_alpha", ValueError, call(swiglu_alpha=torch.ones(e, device=device),
                                          activation_type=ActivationType.Geglu)),
        ("fc2_expert_biases", ValueError,
         call(fc1_expert_biases=torch.zeros(e, 256, dtype=dt, device=device))),
        ("fc1_expert_biases", TypeError,
         call(fc1_expert_biases=torch.zeros(e, 256, device=device),
              fc2_expert_biases=torch.zeros(e, 128, device=device))),
        ("quant_scales", ValueError, call(quant_scales=[torch.ones(e, device=device)])),
        ("use_deepseek_fp8_block_scale", ValueError, call(**fp8)),
        ("quant_scales", ValueError, call(**block)),
        (r"quant_scales\[0\]", ValueError,
         call(quant_scales=[torch.ones(e, 1, 1, device=device)] * 2, **block)),
        ("profile_ids", ValueError, call(profile_ids=[1])),
        ("activation_type", TypeError, call(activation_type="swiglu")),
    ]


def test_bad_inputs_name_the_argument(device):
    for name, error, call in _bad_calls(device):
        with pytest.raises(error, match=name):
            call()


def test_deepseek_fp8_needs_multiples_of_128(device):
    x, ids, w, w31, w2 = _args(device, inter=64)
    with pytest.raises(ValueError, match="I a multiple of 128"):
        fused_moe.cutlass_fused_moe(x, ids, w, w31.to(FP8), w2.to(FP8), x.dtype,
                                    [torch.ones(4, 1, 1), torch.ones(4, 1, 1)],
                                    use_deepseek_fp8_block_scale=True)


# ------------------------------------------------------------------------------ routing


def deepseek_routing(scores, bias, n_group, topk_group, topk, factor):
    """DeepSeek-V3's no-aux routing in torch (FlashInfer's fused_topk_deepseek doc)."""
    s = torch.sigmoid(scores.float())
    biased = s + bias.float()
    t, e = s.shape
    groups = biased.view(t, n_group, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1).indices, 1.0)
    masked = biased.masked_fill(~keep.bool().repeat_interleave(e // n_group, 1), float("-inf"))
    ids = masked.topk(topk, dim=-1).indices
    w = s.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * factor, ids


def test_fused_topk_deepseek(device):
    gen = torch.Generator().manual_seed(40)
    t, e, n_group, topk_group, topk = 6, 32, 4, 2, 4
    scores = torch.randn(t, e, generator=gen)
    bias = torch.randn(e, generator=gen) * 0.1
    values = torch.empty(t, topk, device=device)
    indices = torch.empty(t, topk, dtype=torch.int32, device=device)
    replay = torch.full((t + 2, topk), -1, dtype=torch.int16, device=device)
    assert fused_moe.fused_topk_deepseek(scores.to(device), bias.to(device), n_group,
                                         topk_group, topk, 2.5, values, indices,
                                         routing_replay_out=replay) is None
    want_w, want_ids = deepseek_routing(scores, bias, n_group, topk_group, topk, 2.5)
    got_ids, order = indices.cpu().long().sort(dim=1)
    want_sorted, want_order = want_ids.sort(dim=1)
    assert torch.equal(got_ids, want_sorted)
    torch.testing.assert_close(values.cpu().gather(1, order), want_w.gather(1, want_order))
    assert torch.equal(replay[:t].cpu().long(), indices.cpu().long())
    assert (replay[t:] == -1).all()
    with pytest.raises(ValueError, match="topk_group"):
        fused_moe.fused_topk_deepseek(scores.to(device), bias.to(device), 4, 5, topk, 1.0,
                                      values, indices)
    with pytest.raises(TypeError, match="topk_indices"):
        fused_moe.fused_topk_deepseek(scores.to(device), bias.to(device), n_group,
                                      topk_group, topk, 1.0, values, indices.long())


def test_routing_method_type_names():
    assert fused_moe.RoutingMethodType.DeepSeekV3 == 2
    assert fused_moe.RoutingMethodType.Renormalize.name == "Renormalize"
