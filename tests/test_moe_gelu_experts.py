"""GELU-gated experts in the model's MoE block (minikernels.models.moe): a config whose
hidden_act is a GELU (Gemma 4's ``gelu_pytorch_tanh``, or erf ``gelu``) builds SparseMoE /
FusedExperts that pass ``activation=`` to the fused MoE ops, and Qwen2-MoE's shared
expert follows it; against a plain-torch MoE written here (router, per-expert GELU MLPs),
dense experts and int4 / fp8 / int8 ones (against the same formula on their dequantized
weights), both backends; other activations are still refused by name."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minikernels as mk
from minikernels.models.config import DecoderConfig, UnsupportedModelError
from minikernels.models.moe import SparseMoE

BACKENDS = ["reference", "triton"]


def _config(hidden_act: str, shared: int = 0) -> DecoderConfig:
    return DecoderConfig(architecture="qwen2_moe" if shared else "qwen3_moe",
                         vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16,
                         norm_topk_prob=True, hidden_act=hidden_act,
                         shared_expert_intermediate_size=shared)


def _fill(moe: SparseMoE, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in moe.parameters():
        if p.dtype.is_floating_point:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _by_hand(moe: SparseMoE, x: torch.Tensor, act: str, w13=None, w2=None) -> torch.Tensor:
    """The block in fp32 torch: the module's own routing, each chosen expert's
    act(gate) * up (torch's gelu; approximate="tanh" for gelu_tanh) through down, the
    router-weighted sum, and the shared expert with the same activation."""
    def gated(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        if act == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none") * up

    weights, ids = moe.route(x)
    w13 = moe.experts.w13.float() if w13 is None else w13
    w2 = moe.experts.w2.float() if w2 is None else w2
    xf = x.float()
    out = torch.zeros_like(xf)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            out[t] += weights[t, j] * (w2[e] @ gated(w13[e] @ xf[t]))
    if moe.shared_expert is not None:
        se = moe.shared_expert
        y = gated(xf @ se.gate_up_proj.weight.float().t()) @ se.down_proj.weight.float().t()
        out = out + torch.sigmoid(xf @ moe.shared_expert_gate.weight.float().t()) * y
    return out


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("hidden_act", "act"), [("gelu_pytorch_tanh", "gelu_tanh"),
                                                  ("gelu", "gelu"), ("silu", "silu")])
def test_dense_experts_follow_hidden_act(hidden_act, act, backend):
    config = _config(hidden_act, shared=24)
    assert config.activation == act
    moe = SparseMoE(config, torch.float32, "cpu")
    assert moe.experts.activation == moe.shared_expert.activation == act
    _fill(moe, 1)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2)) * 2
    with mk.use_backend(backend):
        y = moe(x)
    assert _rel(y, _by_hand(moe, x, act)) <= 1e-5
    if act != "silu":                         # the activation matters here
        assert _rel(y, _by_hand(moe, x, "silu")) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int4", "fp8", "int8"])
def test_quantized_experts_follow_hidden_act(kind, backend):
    """RTN-quantized experts (int4 / fp8 / int8 on load) of a gelu_pytorch_tanh config:
    the block matches the formula on the dequantized experts with GELU-tanh."""
    config = _config("gelu_pytorch_tanh")
    dense = SparseMoE(config, torch.float16, "cpu")
    _fill(dense, 3)
    moe = SparseMoE(config, torch.float16, "cpu", dense=False)
    moe.gate.weight.copy_(dense.gate.weight)
    for e in range(config.num_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = dense.experts.part(e, name)
            if kind == "int4":
                moe.experts.quantize_part_(e, name, w, 16)
            elif kind == "fp8":
                moe.experts.quantize_fp8_part_(e, name, w, (16, 16))
            else:
                moe.experts.quantize_int8_part_(e, name, w)
    assert moe.experts.activation == "gelu_tanh"
    w13, w2 = moe.experts.dequantized()
    x = (torch.randn(7, 32, generator=torch.Generator().manual_seed(4)) * 2).half()
    with mk.use_backend(backend):
        y = moe(x)
    assert _rel(y, _by_hand(moe, x, "gelu_tanh", w13, w2)) <= 5e-3
    assert _rel(y, _by_hand(moe, x, "silu", w13, w2)) > 2e-2


def test_other_expert_activations_are_refused_by_name():
    for act in ("relu", "relu2"):
        with pytest.raises(UnsupportedModelError, match=act):
            _config(act)
