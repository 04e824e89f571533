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


# ------------------------------------------------------------------ quantized experts
QUANT_TOL = {"int8": 0.03, "fp8": 0.06, "int4": 0.15}     # logits vs the dense model


def _dense(experts):
    """The dense (w13, w2) stacks of a transformers experts module."""
    gated = getattr(experts, "has_gate", True)
    return (experts.gate_up_proj if gated else experts.up_proj).detach(), \
        experts.down_proj.detach()


@torch.no_grad()
@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("kind", ["qwen3-moe", "nemotron_h-moe"])
def test_quantize_experts(kind, method):
    """quantize_experts: each experts module's stacks become the RTN of the dense ones,
    computed here per expert with minikernels.quant (int8 per row, fp8 128 x 128 blocks,
    int4 groups that divide H and I); the module then computes exactly the reference op
    on those weights (int8 W8A8, fp8 / int4 W8A16), the logits stay within the rounding
    of the dense model's, the experts implementation is "minikernels", and the
    quantized model's state_dict loads into another quantized copy."""
    from minikernels.hf.experts import quantize_experts
    from minikernels.ops import reference
    from minikernels.quant.fp8 import quantize_fp8
    from minikernels.quant.int4 import quantize_int4
    from minikernels.quant.int8 import quantize_int8

    model = make_hf_model(kind, seed=6).eval()
    ids = torch.tensor([random_tokens(11, 300, 3)])
    want = model(ids).logits
    name, experts = next((n, m) for n, m in model.named_modules()
                         if type(m).__name__.endswith("Experts"))
    w13, w2 = _dense(experts)
    gated = getattr(experts, "has_gate", True)
    quant = copy.deepcopy(model)
    done = quantize_experts(quant, method, group_size=32)
    assert done[name] == method and set(done.values()) == {method}
    assert quant.config._experts_implementation == "minikernels"
    q = quant.get_submodule(name)
    assert not hasattr(q, "down_proj") and not any(
        isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in q.parameters())
    x = torch.randn(5, w13.shape[2])
    idx = torch.randint(0, w13.shape[0], (5, 2))
    tw = torch.rand(5, 2)
    kw = {"activation": "silu" if gated else "relu2", "gated": gated}
    e = w13.shape[0]
    if method == "int8":
        parts = [[quantize_int8(w[i]) for i in range(e)] for w in (w13, w2)]
        stacks = [(torch.stack([p.weight for p in ps]), torch.stack([p.scale for p in ps]))
                  for ps in parts]
        exact = reference.fused_moe_int8_w8a8(x, *stacks[0], *stacks[1], tw, idx, **kw)
    elif method == "fp8":
        parts = [[quantize_fp8(w[i], (128, 128)) for i in range(e)] for w in (w13, w2)]
        stacks = [(torch.stack([p.weight for p in ps]), torch.stack([p.scale for p in ps]))
                  for ps in parts]
        exact = reference.fused_moe_fp8(x, *stacks[0], *stacks[1], tw, idx, (128, 128), **kw)
    else:
        g = q.minikernels_group_size            # 32 halved until it divides H and I
        assert g % 8 == 0 and w13.shape[2] % g == 0 and w2.shape[2] % g == 0 and (
            g == 32 or w13.shape[2] % (2 * g) or w2.shape[2] % (2 * g))
        parts = [[quantize_int4(w[i], g) for i in range(e)] for w in (w13, w2)]
        deq = [torch.stack([p.dequantize().float() for p in ps]) for ps in parts]
        exact = reference.fused_moe(x.half(), deq[0], deq[1], tw, idx, **kw).float()
    got = experts_forward(q, x, idx, tw)
    tol = 1e-5 if method != "int4" else 2e-3
    assert rel_err(got, exact) <= tol, rel_err(got, exact)
    err = rel_err(quant(ids).logits, want)
    assert 0 < err < QUANT_TOL[method], err
    again = copy.deepcopy(model)
    quantize_experts(again, method, group_size=32)
    for buf in again.get_submodule(name).buffers():
        buf.zero_()
    again.load_state_dict(quant.state_dict())
    assert torch.equal(again(ids).logits, quant(ids).logits)


@torch.no_grad()
def test_kernelize_quantizes_the_experts_too():
    """kernelize(quantize="int8") on a mixture of experts: the Linears become Int8Linear
    and the experts int8 (W8A8 on fused_moe_int8_w8a8), the summary says so; experts=False
    leaves them dense, and quantize_model records and warns that it did, naming the
    function that quantizes them; bad methods are refused by name; a model whose experts cannot be
    read by the fused ops keeps them dense, with the reason."""
    import minikernels.hf as mkhf
    from minikernels.hf.experts import quantize_experts

    model = make_hf_model("qwen3-moe", seed=7).eval()
    ids = torch.tensor([random_tokens(9, 300, 4)])
    want = model(ids).logits
    quant = copy.deepcopy(model)
    summary = mkhf.kernelize(quant, quantize="int8")
    assert summary.experts == {"model.layers.0.mlp.experts": "int8"}
    assert "1 of 1 experts modules quantized" in str(summary)
    assert 0 < rel_err(quant(ids).logits, want) < 0.05
    assert not summary.quantization.kept_dense.get("model.layers.0.mlp.experts")
    kept = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="quantize_experts"):
        kept_summary = mkhf.kernelize(kept, quantize="int8", experts=False)
    assert kept_summary.experts == {}
    assert "quantize_experts" in kept_summary.quantization.kept_dense[
        "model.layers.0.mlp.experts"]
    assert isinstance(kept.model.layers[0].mlp.experts.down_proj, torch.nn.Parameter)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_experts(copy.deepcopy(model), "int3")
    biased = copy.deepcopy(model)
    biased.model.layers[0].mlp.experts.has_bias = True
    done = quantize_experts(biased, "int8")
    assert done["model.layers.0.mlp.experts"].startswith("kept dense") and \
        "has_bias" in done["model.layers.0.mlp.experts"]
