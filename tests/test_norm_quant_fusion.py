"""W8A8 models: each decoder layer's RMSNorm quantizes its output for the one linear that
reads it (ops.rms_norm_quant) and each gated MLP's activation for its down_proj
(ops.act_and_mul_quant; models.decoder.fuse_w8a8_inputs). The fused forward equals the
unfused one bit for bit on the reference backend and within the kernels' rounding on the
Triton kernels; the linears' own quantizers no longer run; layers whose norm output has
other readers, LoRA and non-W8A8 models stay unfused."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from test_model_support import rel_err

import minikernels as mk
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.decoder import fuse_w8a8_inputs
from minikernels.models.moe import SparseMoE
from minikernels.nn.layers import QuantizedActivation


def _forward(m, backend="reference"):
    ids = torch.arange(1, 20)
    with mk.use_backend(backend):
        return m(ids, AttentionMetadata.for_prompts([12, 7]), None)


def _fused_norms(m):
    return [n for n in m.modules() if n.__dict__.get("_quantize_for") is not None]


def _fused_mlps(m):
    return [n for n in m.modules() if n.__dict__.get("_quantize_down") is not None]


@pytest.mark.parametrize("quantization", ["int8", "fp8_w8a8"])
def test_fused_forward_equals_unfused(quantization):
    m = load_model("tiny", dtype="bfloat16", device="cpu", quantization=quantization)
    layers = len(m.layers)
    assert len(_fused_norms(m)) == 2 * layers       # qkv and gate_up inputs, every layer
    assert len(_fused_mlps(m)) == layers            # and down_proj's
    fused = _forward(m)
    assert fuse_w8a8_inputs(m, enabled=False) == 0 and not _fused_norms(m)
    assert not _fused_mlps(m)
    plain = _forward(m)
    assert torch.equal(fused, plain)
    plain_kernels = _forward(m, "triton")
    assert fuse_w8a8_inputs(m) == 3 * layers
    got = _forward(m, "triton")
    if got.is_cuda:     # the kernels' fp32 sums may add in another order than rms_norm's
        assert rel_err(got.float(), plain_kernels.float()) < 5e-3
    else:               # the interpreter: the same arithmetic, to the bit
        assert torch.equal(got, plain_kernels)


def test_linears_take_the_quantized_activation():
    """With fusion the qkv / gate_up / down linears quantize nothing themselves: the int8
    quantizer runs only for o_proj's input (1 per layer, not 4)."""
    m = load_model("tiny", dtype="float32", device="cpu", quantization="int8")
    seen = []
    real = mk.ops.scaled_int8_quant
    with mock.patch.object(mk.ops, "scaled_int8_quant",
                           side_effect=lambda *a, **k: seen.append(1) or real(*a, **k)):
        _forward(m)
        assert len(seen) == len(m.layers)
        fuse_w8a8_inputs(m, enabled=False)
        seen.clear()
        _forward(m)
        assert len(seen) == 4 * len(m.layers)
    layer = m.layers[0]
    qa = layer.input_layernorm(torch.randn(3, m.config.hidden_size))
    fuse_w8a8_inputs(m)
    qa = layer.input_layernorm(torch.randn(3, m.config.hidden_size))
    assert isinstance(qa, QuantizedActivation) and qa.q.dtype == torch.int8
    assert qa.shape == (3, m.config.hidden_size) and qa.scales.shape == (3, 1)


def test_not_fused_where_it_would_change_results():
    dense = load_model("tiny", dtype="float32", device="cpu")
    assert not _fused_norms(dense) and not _fused_mlps(dense)     # no W8A8 linear
    int4 = load_model("tiny", dtype="float32", device="cpu", quantization="int4")
    assert not _fused_norms(int4) and not _fused_mlps(int4)   # weight-only: 16-bit inputs
    fp8 = load_model("tiny", dtype="float32", device="cpu", quantization="fp8")
    assert not _fused_norms(fp8) and not _fused_mlps(fp8)     # W8A16
    moe = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", quantization="int8")
    sparse = [layer for layer in moe.layers if isinstance(layer.mlp, SparseMoE)]
    assert sparse
    for layer in sparse:                            # the router also reads the MLP's input
        assert [lin for _, lin in layer.norm_consumers()] == [layer.self_attn.qkv_proj]


def test_lora_reads_the_unquantized_input():
    """A linear carrying LoRA adapters gets the plain normed input (the adapters read it),
    so the forward is the unfused one."""
    m = load_model("tiny", dtype="float32", device="cpu", quantization="int8")
    want = _forward(m)
    qkv = m.layers[0].self_attn.qkv_proj
    down = m.layers[0].mlp.down_proj
    norm = m.layers[0].input_layernorm
    lora = mock.Mock()
    lora.add.side_effect = lambda x, y: (x, y)[1] if not isinstance(x, QuantizedActivation) \
        else pytest.fail("LoRA got a quantized input")
    qkv.__dict__["lora"] = down.__dict__["lora"] = lora
    try:
        assert not isinstance(norm(torch.randn(2, m.config.hidden_size)), QuantizedActivation)
        assert torch.equal(_forward(m), want)
        assert lora.add.call_count == 2             # qkv and down_proj of layer 0
    finally:
        del qkv.__dict__["lora"], down.__dict__["lora"]


def test_drop_in_rmsnorm_feeds_an_int8_linear(device):
    """The drop-in modules: RMSNorm.quantize_for(Int8Linear) gives what the linear would
    have computed from the plain norm (exactly on the reference backend), and undoing it
    restores the plain output."""
    from minikernels.nn import Int8Linear, RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    lin = Int8Linear.from_linear(torch.nn.Linear(64, 40).to(torch.bfloat16).to(device))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, device=device)
    r = torch.randn_like(x)
    with mk.use_backend("reference"):
        plain, plain_h = norm(x, r)
        want = lin(plain)
        norm.quantize_for(lin, torch.int8)
        qa, h = norm(x, r)
        assert isinstance(qa, QuantizedActivation) and qa.q.shape == (2, 5, 64)
        assert torch.equal(h, plain_h) and torch.equal(lin(qa), want)
        norm.quantize_for(None)
        assert torch.equal(norm(x), mk.ops.rms_norm(x, norm.weight, 1e-6))
    with pytest.raises(ValueError, match="one scale per token"):
        lin(QuantizedActivation(qa.q, torch.ones(2, 5, 2, device=device), qa.dtype))
