"""minikernels.hf.kernelize: fused norms / residual / MLP (and int4) keep transformers' answers;
a kernelized StaticCache decode step compiles with fullgraph=True."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from test_model_support import make_hf_model

import minikernels.hf as mkhf
from minikernels.nn import Int4Linear, quantize_model

KINDS = ["llama", "qwen2-window", "qwen3", "mistral-window"]
TOL = dict(atol=3e-5, rtol=3e-5)


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (b, s), generator=torch.Generator().manual_seed(seed))


def _left_mask(b: int, s: int) -> torch.Tensor:
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :3] = 0
    return mask


@pytest.mark.parametrize("kind", KINDS)
def test_kernelize_matches_and_summarizes(kind: str) -> None:
    model = make_hf_model(kind)
    model.set_attn_implementation("sdpa")
    ids, mask = _ids(2, 9), _left_mask(2, 9)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    gate_w = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    norm_w = model.model.layers[0].input_layernorm.weight
    summary = mkhf.kernelize(model)
    layers = model.config.num_hidden_layers
    per_layer = 4 if kind.startswith("qwen3") else 2      # + q_norm, k_norm
    assert len(summary.rms_norm) == layers * per_layer + 1
    assert len(summary.fused_residual) == layers and len(summary.mlp) == layers
    assert model.kernelize_summary is summary and "kernelize:" in str(summary)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, mkhf.RMSNorm)
    assert layer.input_layernorm.weight is norm_w          # the same Parameter, shared
    assert isinstance(layer.mlp, mkhf.GateUpMLP)
    torch.testing.assert_close(layer.mlp.gate_up_proj.weight[:gate_w.shape[0]], gate_w)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("minikernels")
        got_mk = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], **TOL)
    torch.testing.assert_close(got_mk[valid], want[valid], **TOL)


def test_kernelize_generate_dense_and_int4() -> None:
    """Greedy tokens: kernelized + minikernels attention == sdpa (dense); int4-kernelized +
    minikernels attention == quantize_model + sdpa (the same int4 weights)."""
    ids, mask = _ids(2, 8, seed=1), _left_mask(2, 8)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = make_hf_model("qwen2-window")
    base.set_attn_implementation("sdpa")
    want = base.generate(ids, **kw)
    mkhf.kernelize(base)
    base.set_attn_implementation("minikernels")
    assert torch.equal(base.generate(ids, **kw), want)

    ref4 = quantize_model(make_hf_model("qwen2-window"), group_size=32)
    ref4.set_attn_implementation("sdpa")
    want4 = ref4.generate(ids, **kw)
    ours4 = make_hf_model("qwen2-window")
    summary = mkhf.kernelize(ours4, quantize="int4", group_size=32)
    assert isinstance(ours4.model.layers[0].mlp.gate_up_proj, Int4Linear)
    assert isinstance(ours4.model.layers[0].self_attn.q_proj, Int4Linear)
    assert type(ours4.lm_head) is nn.Linear and summary.quantization is not None
    ours4.set_attn_implementation("minikernels")
    assert torch.equal(ours4.generate(ids, **kw), want4)


def test_kernelize_refuses_training_and_bad_args() -> None:
    model = make_hf_model("llama").train()
    with pytest.raises(RuntimeError, match="inference only"):
        mkhf.kernelize(model)
    with pytest.raises(ValueError, match="quantize"):
        mkhf.kernelize(model.eval(), quantize="int3")
    model.train().requires_grad_(False)          # training mode without grads: allowed
    mkhf.kernelize(model)


def _tiny_gemma(cfg_cls: type, model_cls: type, attn: str) -> tuple:
    """A 2-layer random Gemma-family model (norm weights random too: trained Gemma norms
    are not all zeros), token ids, and its logits before kernelize."""
    cfg = cfg_cls(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.set_attn_implementation(attn)
    ids = _ids(2, 9)
    with torch.no_grad():
        want = model(ids).logits
    return model, ids, want


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_kernelize_gemma2_gemma3_norms(family: str) -> None:
    """Gemma 2 / 3 (four (1 + weight) norms per layer, Gemma 3's q_norm / k_norm): every
    norm runs on rms_norm with offset 1, the sandwich-norm layers keep their own forward
    (named in the summary), and the logits stay the same."""
    import transformers

    cfg_cls, model_cls = {
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[family]
    model, ids, want = _tiny_gemma(cfg_cls, model_cls, "eager")
    summary = mkhf.kernelize(model)
    assert len(summary.rms_norm) == {"gemma2": 9, "gemma3": 13}[family]
    assert all(model.get_submodule(n).weight_offset == 1.0 for n in summary.rms_norm)
    assert not summary.fused_residual and "not the Llama-style" in summary.skipped[
        "model.layers.0"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, **TOL)


def test_kernelize_skips_lookalikes_and_unknown_layers() -> None:
    """A mean-centred norm (LayerNorm without bias: not an RMSNorm) and a QuickGELU MLP
    (no fused kernel) are not swapped, a (1 + weight) norm (Gemma-style) is, with its
    offset; an unknown decoder layer keeps its forward; each is named in the summary."""

    class OnePlusNorm(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n) * 0.2)
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    class CentredNorm(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(n) + 0.5)
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x - x.mean(-1, keepdim=True)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class Norm(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(n) + 0.5)
            self.variance_epsilon = 1e-5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))

    class GeluMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(16, 32), nn.Linear(16, 32)
            self.down_proj = nn.Linear(32, 16)
            self.act_fn = lambda t: t * torch.sigmoid(1.702 * t)        # quick_gelu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Identity()
            self.post_attention_layernorm = Norm(16)
            self.gemma_norm = OnePlusNorm(16)
            self.centred_norm = CentredNorm(16)
            self.mlp = GeluMLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.self_attn(x)
            h = self.centred_norm(self.gemma_norm(h))
            return h + self.mlp(self.post_attention_layernorm(h))

    model = nn.Sequential(Layer()).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
    summary = mkhf.kernelize(model)
    assert summary.rms_norm == ["0.post_attention_layernorm", "0.gemma_norm"]
    assert not summary.mlp and not summary.fused_residual
    assert "not the Llama-style" in summary.skipped["0"]
    assert "is not SiLU or GELU" in summary.skipped["0.mlp"]
    assert isinstance(model[0].centred_norm, CentredNorm)
    assert model[0].gemma_norm.weight_offset == 1.0
    assert model[0].post_attention_layernorm.weight_offset == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **TOL)


def test_rms_norm_dtype_follows_transformers() -> None:
    """bf16 activations with an fp32 weight give fp32, like ``weight * x.to(bf16)``."""
    norm = mkhf.RMSNorm(nn.Parameter(torch.rand(32) + 0.5), 1e-6)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.float32
    y, h = norm(x, x)
    assert y.dtype == torch.float32 and h.dtype == torch.bfloat16


def test_compile_fullgraph_static_cache_decode() -> None:
    """torch.compile(model.forward, fullgraph=True) of a kernelized decode step with a
    StaticCache and minikernels attention (left-padded batch, a sliding-window layer): no
    graph break, logits equal to eager SDPA, and the minikernels ops are in the graph."""
    from transformers import StaticCache

    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = make_hf_model("qwen2-window")
    ids, mask = _ids(2, 7, seed=2), _left_mask(2, 7)

    @torch.no_grad()
    def run(impl: str, compiled: bool) -> torch.Tensor:
        model.set_attn_implementation(impl)
        cache = StaticCache(config=model.config, max_cache_len=16)
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        fwd = torch.compile(model.forward, fullgraph=True, backend=backend) if compiled \
            else model.forward
        logits, tok, am = [out.logits[:, -1]], out.logits[:, -1:].argmax(-1), mask
        for _ in range(3):
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            out = fwd(tok, attention_mask=am, cache=cache,
                      position_ids=am.sum(-1, keepdim=True) - 1, use_cache=True)
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    want = run("sdpa", False)
    mkhf.kernelize(model)
    torch._dynamo.reset()
    got = run("minikernels", True)
    torch.testing.assert_close(got, want, **TOL)
    ops = " ".join(seen)
    for op in ("minikernels.paged_decode_attention", "minikernels.fused_add_rms_norm",
               "minikernels.rms_norm", "minikernels.silu_and_mul"):
        assert op in ops, op
    assert "scaled_dot_product_attention" not in ops


@pytest.mark.parametrize("act,want", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"),
                                      ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"),
                                      ("gelu_new", "gelu_tanh"), (nn.SiLU(), "silu")])
def test_kernelize_gated_gelu_mlps(act, want: str) -> None:
    """GeGLU MLPs (exact and tanh GELU, transformers' activations by name) become GateUpMLP
    on gelu_and_mul and keep the module's output."""
    from transformers.activations import ACT2FN

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(16, 40), nn.Linear(16, 40)
            self.down_proj = nn.Linear(40, 16)
            self.act_fn = ACT2FN[act] if isinstance(act, str) else act

        def forward(self, x):   # transformers' MLP forward, verbatim (kernelize checks it)
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj

    model = nn.Sequential(MLP()).eval()
    x = 3 * torch.randn(5, 16)
    with torch.no_grad():
        ref = model(x)
    summary = mkhf.kernelize(model)
    assert summary.mlp == ["0"] and isinstance(model[0], mkhf.GateUpMLP)
    assert model[0].act == want
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, **TOL)


def test_kernelize_gemma_geglu_model() -> None:
    """A Gemma model (gelu_pytorch_tanh MLPs, (1 + weight) norms): every MLP is fused onto
    gelu_and_mul, every norm runs on rms_norm with weight_offset 1 (the decoder layers'
    residual adds fused into their post-attention norms), and the logits stay the same."""
    from transformers import GemmaConfig, GemmaForCausalLM

    model, ids, want = _tiny_gemma(GemmaConfig, GemmaForCausalLM, "sdpa")
    summary = mkhf.kernelize(model)
    assert len(summary.mlp) == 2
    assert len(summary.rms_norm) == 5        # 2 per layer + the final norm
    assert all(model.get_submodule(n).weight_offset == 1.0 for n in summary.rms_norm)
    assert summary.fused_residual == ["model.layers.0", "model.layers.1"]
    assert all(model.model.layers[i].mlp.act == "gelu_tanh" for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, **TOL)
