"""Int4Linear and quantize_model: drop-in behaviour, serialization, HF Llama, torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import minikernels as mk
from minikernels.nn import Int4Linear


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_dequantized(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=bias).to(dtype)
    q = Int4Linear.from_linear(lin, group_size=64)
    assert q.scales.dtype == dtype and (q.bias is not None) == bias
    x = torch.randn(2, 3, 128, dtype=dtype)
    w = q.dequantize()
    ref = x.float() @ w.t() + (lin.bias.float() if bias else 0)
    y = q(x)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    # quantization error vs the dense layer is that of RTN int4
    assert (w - lin.weight.float()).abs().max() <= q.scales.float().max() * 1.01


def test_fp32_input_is_cast_in_and_out():
    lin = nn.Linear(64, 16)
    q = Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(4, 64)
    y = q(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, q(x.half()).float())


def test_state_dict_and_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    q = Int4Linear.from_linear(nn.Linear(64, 32).half(), group_size=32, symmetric=True)
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}
    save_file(sd, str(tmp_path / "w.safetensors"))
    q2 = Int4Linear(64, 32, bias=True, group_size=32, dtype=torch.float16)
    q2.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(q(x), q2(x))
    torch.save(q.state_dict(), tmp_path / "w.pt")
    q3 = Int4Linear(64, 32, group_size=32)
    q3.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.equal(q(x), q3(x))


def test_act_order_layer_permutes_x():
    torch.manual_seed(0)
    k, n, g = 64, 16, 32
    w = torch.randn(n, k)
    perm = torch.randperm(k)
    w4 = mk.quant.quantize_int4(w[:, perm], g)          # packed columns in perm order
    w4.perm = perm
    lin = Int4Linear.from_int4_weight(w4)
    assert "perm" in lin.state_dict()
    x = torch.randn(5, k, dtype=torch.float16)
    ref = x.float() @ w4.dequantize().t()
    torch.testing.assert_close(lin(x).float(), ref, atol=2e-2, rtol=2e-2)
    assert (w4.dequantize() - w).abs().max() < 0.5       # dequantize undoes perm


def test_bad_construction():
    with pytest.raises(ValueError, match="multiples of 8"):
        Int4Linear(60, 16)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(64, 16, group_size=48)
    with pytest.raises(TypeError, match="linear"):
        Int4Linear.from_linear(nn.Conv1d(4, 4, 1))


def test_quantize_model_generic_module():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                          nn.Sequential(nn.Linear(64, 30), nn.Linear(30, 8)))
    model.lm_head = nn.Linear(8, 8)
    with pytest.warns(UserWarning, match="kept dense"):
        mk.quantize_model(model, group_size=32)
    assert isinstance(model[0], Int4Linear)
    assert type(model[2][0]) is nn.Linear            # N = 30: not a multiple of 8
    assert type(model[2][1]) is nn.Linear            # K = 30
    assert type(model.lm_head) is nn.Linear          # skipped by name


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.05)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


# Stated bound: for this tiny random Llama (weights ~N(0, 0.05), g32 asymmetric RTN), the
# quantized logits stay within 25% of the dense logits in relative Frobenius norm and the
# top-1 token agrees on at least 60% of positions.
LOGIT_REL_BOUND = 0.25


def test_quantize_hf_llama_logits_and_generate():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    mk.quantize_model(model, group_size=32)
    n_int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    assert n_int4 == 2 * 7                             # q k v o gate up down per layer
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        quant = model(ids).logits
    rel = (quant - dense).norm() / dense.norm()
    assert rel < LOGIT_REL_BOUND, rel
    agree = (quant.argmax(-1) == dense.argmax(-1)).float().mean()
    assert agree >= 0.6, agree
    out = model.generate(ids[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64)).half()
    mk.quantize_model(model, group_size=32)
    x = torch.randn(3, 64, dtype=torch.float16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)


# ------------------------------------------------- quantize_model on minikernels' CausalLM
def _lm_logits(model, seqs):
    from minikernels.models import AttentionMetadata

    ids = torch.tensor([t for s in seqs for t in s])
    return model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)


def test_quantize_model_on_causal_lm_matches_int4_on_load():
    """FusedLinear exposes the duck-typed hook quantize_int4_, so mk.quantize_model works on
    minikernels' own CausalLM (it used to be a no-op: no nn.Linear inside) and gives the
    same int4 weights as load_model(quantization="int4"), incl. its group fallback
    (hidden 64: group 128 -> 64)."""
    from minikernels.models import load_model

    seqs = [[256, 72, 105, 33, 9], [256, 1, 2]]
    dense = load_model("tiny", dtype="float32", device="cpu", seed=5)
    d_logits = _lm_logits(dense, seqs)
    dense_bytes = dense.weight_bytes()
    assert mk.quantize_model(dense) is dense
    linears = dict(dense.linear_layers())
    assert all(lin.is_int4 for n, lin in linears.items() if n != "lm_head")
    assert not linears["lm_head"].is_int4                     # skip=("lm_head",)
    assert linears["layers.0.mlp.down_proj"].int4_parts[0].group_size == 128  # K = 128
    assert linears["layers.0.self_attn.qkv_proj"].int4_parts[0].group_size == 64  # K = 64
    assert not any(isinstance(m, Int4Linear) for m in dense.modules())
    assert dense.weight_bytes() < dense_bytes
    ref = load_model("tiny", dtype="float32", device="cpu", seed=5, quantization="int4")
    q_logits = _lm_logits(dense, seqs)
    assert torch.equal(q_logits, _lm_logits(ref, seqs))
    assert not torch.equal(q_logits, d_logits)
    # Quantizing again is a no-op; int4 layers keep their weights.
    mk.quantize_model(dense, skip=())
    assert dense.lm_head.is_int4
    assert torch.equal(dense.layers[1].mlp.gate_up_proj.int4_parts[0].qweight,
                       ref.layers[1].mlp.gate_up_proj.int4_parts[0].qweight)


def test_quantize_model_hook_honours_skip_and_owns_its_children():
    from minikernels.models import load_model

    m = load_model("tiny-qwen3", dtype="bfloat16", device="cpu")
    mk.quantize_model(m, group_size=32, symmetric=True,
                      skip=("lm_head", "down_proj", "layers.1.self_attn"))
    lin = dict(m.linear_layers())
    assert lin["layers.0.self_attn.qkv_proj"].is_int4
    assert lin["layers.0.mlp.gate_up_proj"].is_int4
    assert not lin["layers.0.mlp.down_proj"].is_int4 and not lin["layers.1.mlp.down_proj"].is_int4
    assert not lin["layers.1.self_attn.qkv_proj"].is_int4
    assert not lin["layers.1.self_attn.o_proj"].is_int4
    assert not lin["lm_head"].is_int4 and m.lm_head.weight is m.embed_tokens.weight
    part = lin["layers.0.self_attn.qkv_proj"].int4_parts[0]
    assert part.group_size == 32 and part.scales.dtype == torch.bfloat16
    assert bool((part.zeros == 8).all())                        # symmetric

    class SelfQuantizing(nn.Module):        # any module with the hook; its nn.Linear is its own
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(64, 64)
            self.calls = []

        def quantize_int4_(self, group_size, symmetric):
            self.calls.append((group_size, symmetric))
            return True

    model = nn.Sequential(SelfQuantizing(), nn.Linear(64, 64), SelfQuantizing())
    mk.quantize_model(model, group_size=32, skip=("2",))
    assert model[0].calls == [(32, False)] and type(model[0].inner) is nn.Linear
    assert isinstance(model[1], Int4Linear)
    assert model[2].calls == []                                  # skipped by name
