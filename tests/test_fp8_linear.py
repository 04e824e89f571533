"""Fp8Linear and quantize_model(method="fp8"): drop-in behaviour, serialization, a
transformers model, minikernels' own CausalLM through its hook, kernelize(quantize="fp8")."""
from __future__ import annotations

import os

import pytest
import torch
from test_model_support import hf_logits, make_hf_model, random_tokens, rel_err
from torch import nn

import minikernels as mk
from minikernels.nn import Fp8Linear, quantize_model

FP8 = torch.float8_e4m3fn


def _rtn_dequant(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """Block RTN from its definition, dequantized (fp32)."""
    n, k = w.shape
    out = torch.empty(n, k)
    for i in range(0, n, bn):
        for j in range(0, k, bk):
            blk = w[i:i + bn, j:j + bk].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            out[i:i + bn, j:j + bk] = (blk / s).clamp(-448, 448).to(FP8).float() * s
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block", [(128, 128), (32, 48), (1, 200)])
def test_from_linear_forward_and_state_dict(tmp_path, bias, block):
    torch.manual_seed(0)
    lin = nn.Linear(200, 72, bias=bias)
    q = Fp8Linear.from_linear(lin, block)
    assert q.weight.dtype == FP8 and q.block_size == block
    want_w = _rtn_dequant(lin.weight.detach(), *block)
    assert torch.equal(q.dequantize(), want_w)
    x = torch.randn(3, 5, 200)
    want = x @ want_w.T + (lin.bias.detach() if bias else 0)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert rel_err(q(x.bfloat16()).float(), want) < 1e-2
    from safetensors.torch import load_file, save_file
    path = os.path.join(tmp_path, "l.safetensors")
    save_file(q.state_dict(), path)
    r = Fp8Linear(200, 72, bias=bias, block_size=block, dtype=torch.float32)
    r.load_state_dict(load_file(path))
    assert torch.equal(r(x), q(x))


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        Fp8Linear(200, 72, block_size=(128, 100))
    with pytest.raises(TypeError, match="nn.Linear"):
        Fp8Linear.from_linear(nn.Conv1d(2, 2, 1))


def test_quantize_model_fp8_on_a_transformers_model():
    """Every Linear but lm_head becomes the Fp8Linear of its RTN weights; the logits equal
    the dense model running those dequantized weights."""
    import copy

    hf = make_hf_model("llama", seed=3)
    ref_model = copy.deepcopy(hf)
    dense = {n: m.weight.detach().clone() for n, m in hf.named_modules()
             if isinstance(m, nn.Linear)}
    ids = random_tokens(11, 300, 4)
    quantize_model(hf, method="fp8", block_size=(32, 32))
    converted = hf.quantization_summary.converted
    assert set(converted) == {n for n in dense if n != "lm_head"}
    assert hf.quantization_summary.kept_dense == {"lm_head": "skip"}
    assert "to fp8" in str(hf.quantization_summary)
    for name in converted:
        mod = hf.get_submodule(name)
        assert isinstance(mod, Fp8Linear)
        assert torch.equal(mod.dequantize(), _rtn_dequant(dense[name], 32, 32)), name
        with torch.no_grad():
            ref_model.get_submodule(name).weight.copy_(mod.dequantize())
    assert rel_err(hf_logits(hf, ids), hf_logits(ref_model, ids)) < 1e-5
    with pytest.raises(ValueError, match="method"):
        quantize_model(hf, method="int3")


def test_quantize_model_fp8_on_a_causal_lm_uses_its_hook():
    """FusedLinear's quantize_fp8_ hook: the same weights as load_model(quantization="fp8")."""
    from minikernels.models import load_model

    m = load_model("tiny", dtype="float32", device="cpu", seed=1)
    quantize_model(m, method="fp8")
    q = load_model("tiny", dtype="float32", device="cpu", seed=1, quantization="fp8")
    for (name, a), (_, b) in zip(m.linear_layers(), q.linear_layers()):
        assert a.is_fp8 == b.is_fp8 == (name != "lm_head"), name
        assert torch.equal(a.dense_weight(), b.dense_weight()), name


def test_kernelize_fp8():
    """kernelize(quantize="fp8"): the fused gate_up and the attention projections are
    Fp8Linear; logits equal the plain model running the dequantized weights (gate / up
    rows of the fused one)."""
    import copy

    import minikernels.hf  # noqa: F401

    hf = make_hf_model("qwen2-window", seed=2)
    ref_model = copy.deepcopy(hf)
    ids = random_tokens(9, 300, 5)
    summary = minikernels.hf.kernelize(hf, quantize="fp8")
    assert isinstance(hf.model.layers[0].mlp.gate_up_proj, Fp8Linear)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert summary.quantization.method == "fp8"
    inter = hf.config.intermediate_size
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if not isinstance(mod, Fp8Linear):
                continue
            w = mod.dequantize()
            if name.endswith("gate_up_proj"):
                mlp = name.rsplit(".", 1)[0]
                ref_model.get_submodule(mlp + ".gate_proj").weight.copy_(w[:inter])
                ref_model.get_submodule(mlp + ".up_proj").weight.copy_(w[inter:])
            else:
                ref_model.get_submodule(name).weight.copy_(w)
    assert rel_err(hf_logits(hf, ids), hf_logits(ref_model, ids)) < 1e-4
    assert mk.quant.Fp8Weight is not None
