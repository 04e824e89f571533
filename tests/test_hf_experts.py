"""``experts_implementation="minikernels"`` (minikernels.hf.experts): transformers' own MoE
models (Qwen3-MoE, Mixtral, OLMoE) with their experts on ``mk.ops.fused_moe`` give the
eager experts' logits and greedy tokens (fp32; bf16 within its rounding), set at load or
on a loaded model; layouts the op does not compute raise, naming what."""
from __future__ import annotations

import copy

import pytest
import torch
from test_model_support import make_hf_model, random_tokens, rel_err

import minikernels as mk
import minikernels.hf  # noqa: F401  (registers "minikernels")
from minikernels.hf.experts import experts_forward

# (Gemma 4: GELU-tanh experts; Nemotron 3: non-gated squared-ReLU experts)
KINDS = ["qwen3-moe", "mixtral", "olmoe", "gemma4-moe", "nemotron_h-moe"]


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_greedy_equal_eager(kind):
    eager = make_hf_model(kind, seed=4)
    fused = copy.deepcopy(eager)
    fused.set_experts_implementation("minikernels")
    assert fused.config._experts_implementation == "minikernels"
    ids = torch.tensor([random_tokens(13, 300, 1), random_tokens(13, 300, 2)])
    want = eager(ids).logits
    assert rel_err(fused(ids).logits, want) <= 1e-5
    prompt = ids[:1, :6]
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(fused.generate(prompt, **greedy), eager.generate(prompt, **greedy))
    half = copy.deepcopy(eager).to(torch.bfloat16)
    half_fused = copy.deepcopy(half)
    half_fused.set_experts_implementation("minikernels")
    drift = rel_err(half(ids).logits, want)        # transformers' own bf16 drift
    assert rel_err(half_fused(ids).logits, want) <= 1.5 * drift + 0.01


@torch.no_grad()
def test_every_backend_and_load_time_selection(tmp_path):
    eager = make_hf_model("qwen3-moe", seed=5)
    eager.save_pretrained(str(tmp_path))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                  experts_implementation="minikernels")
    ids = torch.tensor([random_tokens(9, 300, 7)])
    want = eager(ids).logits
    for backend in ("reference", "triton"):
        with mk.use_backend(backend):
            assert rel_err(loaded(ids).logits, want) <= 1e-4, backend


def test_unsupported_layouts_raise():
    experts = make_hf_model("qwen3-moe").model.layers[0].mlp.experts
    x = torch.randn(3, 64)
    idx = torch.tensor([[0, 1], [2, 3], [5, 0]])
    w = torch.rand(3, 2)
    assert experts_forward(experts, x, idx, w).shape == (3, 64)
    for attr, value, words in (("has_bias", True, "has_bias"),
                               ("is_transposed", True, "is_transposed"),
                               ("is_concatenated", False, "interleaved"),
                               ("act_fn", torch.nn.ReLU(), "activation other than SiLU")):
        broken = copy.deepcopy(experts)
        setattr(broken, attr, value)
        with pytest.raises(NotImplementedError, match=words):
            experts_forward(broken, x, idx, w)


@torch.no_grad()
def test_gelu_experts_run_gelu():
    """A GELU (exact) experts module computes GELU-gated experts, not SiLU ones."""
    experts = copy.deepcopy(make_hf_model("qwen3-moe").model.layers[0].mlp.experts)
    experts.act_fn = torch.nn.GELU()
    x = torch.randn(4, 64)
    idx = torch.tensor([[0, 1], [2, 3], [5, 0], [1, 1]])
    w = torch.rand(4, 2)
    want = torch.zeros(4, 64)
    for t in range(4):
        for j in range(2):
            e = int(idx[t, j])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            want[t] += w[t, j] * (experts.down_proj[e] @ (torch.nn.functional.gelu(gate) * up))
    assert rel_err(experts_forward(experts, x, idx, w), want) <= 1e-5
