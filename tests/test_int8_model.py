"""INT8 W8A8 in the model: per-channel RTN int8 on load, compressed-tensors int8 W8A8
checkpoints (llm-compressor's ``int-quantized`` format), Int8Linear / quantize_model,
tensor-parallel shards, the engine. The ops themselves: tests/test_int8_w8a8.py."""
from __future__ import annotations

import json
import os
from typing import Any
from unittest import mock

import pytest
import torch
from test_model_support import (check_rank1_of_2, hf_logits, make_hf_model, random_tokens,
                                rel_err, save_hf, write_known_checkpoint)

import minikernels as mk
from minikernels.engine import LLM, SamplingParams
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.config import UnsupportedModelError
from minikernels.models.generate import generate_tokens
from minikernels.models.loader import CheckpointError, quantize_linears
from minikernels.models.moe import set_int8_expert_activations
from minikernels.models.parallel import TensorParallel
from minikernels.nn import Int8Linear
from minikernels.quant import Int8Weight, int8_scheme, quantize_int8
from minikernels.quant.int8 import int8_from_checkpoint


def _logits(model, seqs):
    ids = torch.tensor([t for s in seqs for t in s], device=model.device)
    return model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)


def _seqs(vocab=300):
    return [random_tokens(9, vocab, 1), random_tokens(4, vocab, 2)]


def _rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 from its definition, one row at a time."""
    q = torch.empty(w.shape, dtype=torch.int8)
    s = torch.empty(w.shape[0])
    for i, row in enumerate(w.float()):
        s[i] = row.abs().max() / 127
        q[i] = torch.round(row / s[i]).clamp(-128, 127) if s[i] > 0 else 0
    return q, s


def _w8a8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T in W8A8, written out: x per token to int8 (absmax / 127, half to
    even), an exact integer dot product, both scales applied (float64 here)."""
    xf = x.reshape(-1, x.shape[-1]).double()
    xs = xf.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(xs > 0, torch.round(xf / torch.where(xs > 0, xs, 1)), 0).clamp(-128, 127)
    acc = xq @ q.double().t()                               # exact: integers below 2^53
    return (xs * (s.double()[None, :] * acc)).view(*x.shape[:-1], q.shape[0])


# ----------------------------------------------------------------- the container
def test_quantize_int8_matches_its_definition(monkeypatch):
    w = torch.randn(37, 45) * torch.rand(37, 1) * 3
    w[5] = 0                                                # a zero row: scale 0, zeros
    got = quantize_int8(w.bfloat16())
    q, s = _rtn(w.bfloat16())
    assert got.weight.dtype == torch.int8 and torch.equal(got.weight, q)
    assert got.scale.dtype == torch.float32 and torch.equal(got.scale, s)
    assert got.scale[5] == 0 and not got.weight[5].any()
    assert torch.allclose(got.dequantize(), w.bfloat16().float(), atol=float(s.max()) / 2)
    import minikernels.quant.int8 as qi8
    monkeypatch.setattr(qi8, "_CHUNK_ELEMENTS", 100)        # row chunks: bit-identical
    chunked = quantize_int8(w.bfloat16())
    assert torch.equal(chunked.weight, q) and torch.equal(chunked.scale, s)
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(q)
    with pytest.raises(ValueError, match="one per output channel"):
        Int8Weight(q, s[:3])


def test_checkpoint_scales_become_row_scales():
    q = torch.randint(-127, 128, (6, 32), dtype=torch.int8)
    w = int8_from_checkpoint(q, torch.full((1,), 0.5, dtype=torch.bfloat16))
    assert torch.equal(w.scale, torch.full((6,), 0.5))
    s = torch.rand(6, 1)
    assert torch.equal(int8_from_checkpoint(q, s).scale, s.view(6))
    with pytest.raises(ValueError, match="N = 6"):
        int8_from_checkpoint(q, torch.rand(5, 1))
    with pytest.raises(ValueError, match="int8"):
        int8_from_checkpoint(q.float(), s)


def _ct_config(weights: dict[str, Any] | None = None, acts: dict[str, Any] | None = None,
               fmt: str = "int-quantized") -> dict[str, Any]:
    w = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
         "strategy": "channel", **(weights or {})}
    a = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
         "strategy": "token", **(acts or {})}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                          "input_activations": a}}}


def test_int8_scheme_parsing():
    assert int8_scheme(_ct_config()) == {"method": "compressed-tensors",
                                         "strategy": "channel", "activations": "dynamic",
                                         "group_size": -1, "activation_symmetric": True}
    assert int8_scheme(_ct_config(None, {"symmetric": False}))["activation_symmetric"] \
        is False
    assert int8_scheme(_ct_config({"strategy": "tensor"},
                                  {"dynamic": False, "strategy": "tensor"}))["activations"] \
        == "static"
    assert int8_scheme(_ct_config(fmt="pack-quantized")) is None      # int4: not ours
    assert int8_scheme({"quant_method": "gptq", "bits": 4}) is None
    for weights, acts, match in (
            ({"symmetric": False}, None, "asymmetric int8 weights"),
            ({"strategy": "block"}, None, "strategy 'block'"),
            ({"num_bits": 4}, None, "4-bit"),
            (None, {"num_bits": 16}, "16-bit")):
        with pytest.raises(ValueError, match=match):
            int8_scheme(_ct_config(weights, acts))
    qc = _ct_config({"strategy": "group", "group_size": 128})
    with pytest.raises(ValueError, match="group-wise int8 weights with activation"):
        int8_scheme(qc)
    qc["config_groups"]["group_0"]["input_activations"] = None      # weight-only: W8A16
    assert int8_scheme(qc) == {"method": "compressed-tensors", "strategy": "group",
                               "activations": None, "group_size": 128,
                               "activation_symmetric": True}


# ----------------------------------------------------------------- Int8Linear
def test_int8_linear_and_quantize_model(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(45, 19)
    q8 = Int8Linear.from_linear(lin)
    q, s = _rtn(lin.weight.detach())
    assert torch.equal(q8.weight, q) and torch.equal(q8.weight_scale.view(-1), s)
    x = torch.randn(2, 3, 45)
    want = _w8a8(x, q, s) + lin.bias.double()
    torch.testing.assert_close(q8(x).double(), want, rtol=1e-5, atol=1e-5)
    assert q8(x.bfloat16()).dtype == torch.bfloat16
    assert rel_err(q8(x), lin(x).detach()) < 0.03                # only 8-bit rounding
    xt = torch.randn(45, 6).t()                                  # a strided input
    torch.testing.assert_close(q8(xt).double(), _w8a8(xt, q, s) + lin.bias.double(),
                               rtol=1e-5, atol=1e-5)
    # state_dict round trip through safetensors
    from safetensors.torch import load_file, save_file
    save_file(q8.state_dict(), str(tmp_path / "l.safetensors"))
    back = Int8Linear(45, 19, dtype=torch.float32)
    back.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    assert torch.equal(back(x), q8(x))
    with pytest.raises(ValueError, match="in_features"):
        q8(torch.randn(3, 44))
    # quantize_model: every nn.Linear but the skipped ones
    model = torch.nn.Sequential(torch.nn.Linear(45, 30), torch.nn.ReLU(),
                                torch.nn.Linear(30, 7))
    ref = model(x).detach()
    mk.quantize_model(model, method="int8", skip=("2",))
    assert isinstance(model[0], Int8Linear) and type(model[2]) is torch.nn.Linear
    assert model.quantization_summary.converted == {"0": "channel"}
    with torch.no_grad():
        assert rel_err(model(x), ref) < 0.03
    # minikernels' own decoder quantizes itself through the hook
    m = load_model("tiny", dtype="float32", device="cpu", seed=2)
    mk.quantize_model(m, method="int8")
    assert m.layers[0].self_attn.qkv_proj.is_int8 and m.lm_head.weight is not None


# ----------------------------------------------------------------- RTN on load
def test_rtn_int8_on_load_and_builtins(tmp_path):
    """quantization='int8' of a dense checkpoint: every layer's bytes and scales equal the
    definition's (parts concatenated: one matmul), the linears compute W8A8 as written
    out here, logits move only by the 8-bit rounding; a built-in equals its dense
    build quantized afterwards; a TP rank quantizes exactly its own shard."""
    hf = make_hf_model("qwen3", seed=5, hidden_size=160, intermediate_size=272)
    d = save_hf(hf, str(tmp_path / "dense"))
    m = load_model(d, dtype="float32", device="cpu", quantization="int8")
    assert m.quantization == "int8"
    sd = hf.state_dict()
    qkv = m.layers[1].self_attn.qkv_proj
    assert qkv.is_int8 and not qkv.is_int4 and not qkv.is_fp8 and qkv.weight is None
    assert len(qkv.int8_parts) == 1
    q, s = _rtn(torch.cat([sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(qkv.int8_parts[0].weight, q) and torch.equal(qkv.int8_parts[0].scale, s)
    x = torch.randn(5, 160)
    torch.testing.assert_close(qkv(x).double(), _w8a8(x, q, s), rtol=1e-5, atol=1e-5)
    assert m.lm_head.weight is not None                          # opt-in only
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    err = rel_err(_logits(m, seqs), ref)       # weights and activations rounded: ~0.05
    assert 0 < err < 0.08, err
    mb = load_model(d, dtype="bfloat16", device="cpu", quantization="int8")
    assert rel_err(_logits(mb, seqs).float(), ref) < 0.1
    # tensor parallel rank 1 of 2: its rows of q / k / v (and their scales), its columns
    # of down (each row's scale over its own K slice)
    part = load_model(d, dtype="float32", device="cpu", quantization="int8",
                      tensor_parallel=TensorParallel(1, 2))
    down = sd["model.layers.0.mlp.down_proj.weight"]
    q, s = _rtn(down[:, down.shape[1] // 2:])
    got = part.layers[0].mlp.down_proj.int8_parts[0]
    assert torch.equal(got.weight, q) and torch.equal(got.scale, s)
    # built-ins
    dense = load_model("tiny", dtype="float32", device="cpu", seed=2)
    quantize_linears(dense, scheme="int8")
    built = load_model("tiny", dtype="float32", device="cpu", seed=2, quantization="int8")
    for (name, a), (_, b) in zip(dense.linear_layers(), built.linear_layers()):
        assert a.is_int8 == b.is_int8, name
        assert torch.equal(a.dense_weight(), b.dense_weight()), name
    assert torch.equal(_logits(dense, _seqs(256)), _logits(built, _seqs(256)))
    head = load_model("tiny", dtype="float32", device="cpu", seed=2, quantization="int8",
                      quantize_lm_head=True)
    assert head.lm_head.is_int8 and head.embed_tokens.weight.dtype == torch.float32
    rank = load_model("tiny", dtype="float32", device="cpu", seed=2, quantization="int8",
                      tensor_parallel=TensorParallel(0, 2))
    full_qkv = built.layers[0].self_attn.qkv_proj.dense_weight()
    got = rank.layers[0].self_attn.qkv_proj.dense_weight()
    hd = 16                                                      # tiny: head_dim 16
    want = torch.cat([full_qkv[:2 * hd], full_qkv[4 * hd:5 * hd], full_qkv[6 * hd:7 * hd]])
    assert torch.equal(got, want)


# ----------------------------------------------------------------- checkpoints
def write_int8_checkpoint(hf: torch.nn.Module, path: str, style: str,
                          seed: int = 0, asymmetric: bool = False) -> dict[str, torch.Tensor]:
    """Save ``hf`` as a compressed-tensors int8 W8A8 checkpoint (known random int8 bytes
    and scales in every decoder linear; ``hf`` gets the dequantized weights). style:
    "channel" (fp32 [N, 1] scales, dynamic per-token activations) or "tensor" (one bf16
    scale per layer and a static ``input_scale``, llm-compressor's static preset).
    Returns {name: W}."""
    g = torch.Generator().manual_seed(seed)

    def int8_matrix(tensors: dict, base: str, n: int, k: int) -> torch.Tensor:
        """Known random int8 bytes and scale(s) of one [n, k] matrix under ``base`` -> W."""
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        if style == "channel":
            scale = torch.rand(n, 1, generator=g) * 3e-4 + 1e-4
        else:
            scale = (torch.rand(1, generator=g) * 3e-4 + 1e-4).bfloat16()
            tensors[f"{base}.input_scale"] = torch.tensor([0.02])    # unused: per token
            if asymmetric:
                tensors[f"{base}.input_zero_point"] = torch.tensor([3], dtype=torch.int8)
        tensors[f"{base}.weight"] = q
        tensors[f"{base}.weight_scale"] = scale
        return q.float() * scale.float().expand(n, 1)

    acts = {} if style == "channel" else {"dynamic": False, "strategy": "tensor"}
    if asymmetric:
        acts["symmetric"] = False
    return write_known_checkpoint(hf, path, int8_matrix, _ct_config(
        {"strategy": style}, acts or None))


@pytest.mark.parametrize("style", ["channel", "tensor"])
def test_int8_checkpoints(tmp_path, style):
    """Every layer holds exactly the checkpoint's bytes and scales; logits are within
    8-bit activation rounding of transformers on the dequantized model and equal a model
    computing each linear by the W8A8 formula; TP rank 1 of 2 reads its rows / columns
    with their scales."""
    hf = make_hf_model("qwen3", seed=3)
    d = str(tmp_path / style)
    known = write_int8_checkpoint(hf, d, style)
    m = load_model(d, dtype="float32", device="cpu")
    assert m.quantization == "compressed-tensors"
    layer = m.layers[1]
    qkv = layer.self_attn.qkv_proj
    assert qkv.is_int8 and len(qkv.int8_parts) == 1 and qkv.weight is None
    want = torch.cat([known[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.dense_weight(), want)
    assert torch.equal(layer.mlp.down_proj.dense_weight(),
                       known["model.layers.1.mlp.down_proj.weight"])
    assert not m.lm_head.is_int8 and m.lm_head.weight is not None     # ignored: dense
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    err = rel_err(_logits(m, seqs), ref)       # activation rounding only: ~0.004
    assert 0 < err < 0.02, err
    assert rel_err(_logits(load_model(d, dtype="bfloat16", device="cpu", quantization="int8"),
                           seqs).float(), ref) < 0.05
    check_rank1_of_2(d, known)


@pytest.mark.parametrize("style", ["channel", "tensor"])
def test_int8_checkpoint_with_asymmetric_activations(tmp_path, style):
    """input_activations symmetric: false (llm-compressor's asymmetric W8A8): each token is
    quantized with its own zero point (scaled_int8_quant(symmetric=False)) and the GEMM
    subtracts zero point x the weight's row sums in int32 (scaled_mm's azp_adj); a static
    input_scale / input_zero_point is read past (per token instead). Logits are within
    activation rounding of transformers on the dequantized model, no worse than the
    symmetric run, and the norm / activation before such a linear do not quantize for it
    (rms_norm_quant has no zero point)."""
    hf = make_hf_model("qwen3", seed=3)
    d = str(tmp_path / style)
    write_int8_checkpoint(hf, d, style, asymmetric=True)
    m = load_model(d, dtype="float32", device="cpu")
    part = m.layers[1].self_attn.qkv_proj.int8_parts[0]
    assert part.symmetric is False
    assert torch.equal(part.azp_adj, part.weight.to(torch.int32).sum(1))
    assert m.layers[1].self_attn.qkv_proj.input_quantization() is None
    assert not any(n.__dict__.get("_quantize_for") for n in m.modules())
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    err = rel_err(_logits(m, seqs), ref)
    assert 0 < err < 0.02, err
    x = torch.randn(5, part.in_features) + 0.7        # skewed rows: the zero point helps
    q, s, z = mk.ops.scaled_int8_quant(x, symmetric=False)
    want = (s * (q.double() - z)) @ part.dequantize().double().t()
    got = part(x)
    assert rel_err(got, want.float()) < 1e-5
    with mk.use_backend("triton"):
        assert rel_err(part(x), want.float()) < 1e-5
    exact = (x.double() @ part.dequantize().double().t()).float()
    assert rel_err(got, exact) <= rel_err(_symmetric(part)(x), exact) * 1.05
    # tensor parallel: each rank's parts keep the row sums of their own rows / K slice
    rank = load_model(d, dtype="float32", device="cpu", tensor_parallel=TensorParallel(1, 2))
    for mod in (rank.layers[1].self_attn.qkv_proj, rank.layers[1].mlp.down_proj):
        p = mod.int8_parts[0]
        assert p.symmetric is False
        assert torch.equal(p.azp_adj, p.weight.to(torch.int32).sum(1))


def _symmetric(part):
    twin = type(part)(part.weight, part.scale)
    twin.set_symmetric(True)
    return twin


def test_int8_checkpoint_errors(tmp_path):
    hf = make_hf_model("qwen3", seed=3)
    d = str(tmp_path / "ck")
    write_int8_checkpoint(hf, d, "channel")
    for q in ("int4", "fp8"):
        with pytest.raises(CheckpointError, match=r"int8 (W8A8 )?checkpoint"):
            load_model(d, dtype="float32", device="cpu", quantization=q)
    from safetensors.torch import load_file, save_file
    f = os.path.join(d, "model.safetensors")
    t = load_file(f)
    scale = t.pop("model.layers.0.mlp.down_proj.weight_scale")
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.*int8 layer incomplete"):
        load_model(d, dtype="float32", device="cpu")
    t["model.layers.0.mlp.down_proj.weight_scale"] = scale[:5]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.*weight_scale"):
        load_model(d, dtype="float32", device="cpu")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="asymmetric int8 weights"):
        load_model(d, dtype="float32", device="cpu")
    del cfg["quantization_config"]                     # int8 tensors, no config: refused
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="int8 tensor but config.json"):
        load_model(d, dtype="float32", device="cpu")
    # quantization='int8' of another quantized checkpoint
    from test_model_support import write_quantized_checkpoint
    g = str(tmp_path / "gptq")
    write_quantized_checkpoint(make_hf_model("llama", seed=5), g, "gptq", group=32)
    with pytest.raises(CheckpointError, match="quantization='int8' but .* 4-bit checkpoint"):
        load_model(g, dtype="float32", device="cpu", quantization="int8")


# ----------------------------------------------------------------- mixture of experts
def test_int8_moe_rtn_and_engine():
    """quantization='int8' on a mixture of experts: every expert row is the RTN of the
    dense build's, run W8A8 like the linears (ops.fused_moe_int8_w8a8; W8A16,
    ops.fused_moe_int8, when switched off), the router stays dense, logits move only by
    the rounding; the engine's greedy tokens equal the plain loop."""
    dense = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3)
    m = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3,
                   quantization="int8")
    ex, dex = m.layers[0].mlp.experts, dense.layers[0].mlp.experts
    assert ex.is_int8 and not ex.is_int4 and ex.w13 is None
    for mine, full in zip(ex.dequantized(), (dex.w13, dex.w2)):
        for e in range(full.shape[0]):
            q, s = _rtn(full[e])
            assert torch.equal(mine[e], q.float() * s[:, None])
    assert m.layers[0].mlp.gate.weight.dtype == torch.float32
    seqs = _seqs(256)
    assert ex.int8_activations
    calls = []
    real = mk.ops.fused_moe_int8_w8a8
    with mock.patch.object(mk.ops, "fused_moe_int8_w8a8",
                           lambda *a, **k: calls.append(1) or real(*a, **k)):
        w8a8 = _logits(m, seqs)
    assert calls
    err = rel_err(w8a8, _logits(dense, seqs))
    assert 0 < err < 0.05, err
    assert set_int8_expert_activations(m, False) == 1      # one MoE layer (of two)
    w8a16 = _logits(m, seqs)
    assert 0 < rel_err(w8a16, _logits(dense, seqs)) < err   # activations unrounded: closer
    assert not torch.equal(w8a16, w8a8)
    set_int8_expert_activations(m, True)
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19)]
    ref = generate_tokens(m, prompts, max_new_tokens=6, block_size=8)
    llm = LLM("tiny-qwen3-moe", dtype="float32", device="cpu", num_kv_blocks=64,
              block_size=8, quantization="int8", seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_int8_moe_checkpoint(tmp_path):
    """A compressed-tensors int8 mixture of experts (per-expert int8 tensors as the hub
    stores them): every expert holds exactly the checkpoint's bytes and scales, the
    logits are within 8-bit activation rounding of transformers on the dequantized
    weights, and TP rank 1 of 2 reads its intermediate slice of every expert."""
    hf = make_hf_model("qwen3-moe", seed=5, moe_intermediate_size=64)
    d = str(tmp_path / "moe")
    known = write_int8_checkpoint(hf, d, "channel")
    m = load_model(d, dtype="float32", device="cpu")
    ex = m.layers[0].mlp.experts                      # (layer 1 is a dense MLP)
    assert ex.is_int8 and ex.int8_activations         # W8A8, as the checkpoint's linears
    w13, w2 = ex.dequantized()
    assert torch.equal(w13, known["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(w2, known["model.layers.0.mlp.experts.down_proj"])
    assert m.layers[1].mlp.down_proj.is_int8
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    err = rel_err(_logits(m, seqs), ref)
    assert 0 < err < 0.05, err
    part = load_model(d, dtype="float32", device="cpu", tensor_parallel=TensorParallel(1, 2))
    p13, p2 = part.layers[0].mlp.experts.dequantized()
    full13 = known["model.layers.0.mlp.experts.gate_up_proj"]
    i = full13.shape[1] // 2
    assert torch.equal(p13, torch.cat([full13[:, i // 2:i], full13[:, i + i // 2:]], dim=1))
    assert torch.equal(p2, known["model.layers.0.mlp.experts.down_proj"][:, :, i // 2:])


# ----------------------------------------------------------------- engine
def test_engine_int8_equals_the_plain_loop():
    """LLM(quantization='int8') greedy = the plain paged loop on the same model, with and
    without overlap scheduling and chunked prefill."""
    model = load_model("tiny", dtype="float32", device="cpu", quantization="int8")
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19, 30)]
    ref = generate_tokens(model, prompts, max_new_tokens=8, block_size=8)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for kw in (dict(async_scheduling=True), dict(max_num_batched_tokens=16)):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
                  quantization="int8", **kw)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref, kw
        llm.llm_engine.check_no_leaks()


def test_int8_on_a_transformers_model():
    """kernelize(quantize="int8") on a transformers model: the fused gate_up and the
    attention projections are Int8Linear with the rows of gate / up quantized apart, and
    the logits stay within 8-bit rounding of the original."""
    import minikernels.hf  # noqa: F401

    hf = make_hf_model("qwen2-window", seed=2)
    ids = random_tokens(9, 300, 5)
    ref = hf_logits(hf, ids)
    gate = hf.model.layers[0].mlp.gate_proj.weight.detach().clone()
    summary = minikernels.hf.kernelize(hf, quantize="int8")
    assert summary.quantization.method == "int8"
    gate_up = hf.model.layers[0].mlp.gate_up_proj
    assert isinstance(gate_up, Int8Linear)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, Int8Linear)
    q, s = _rtn(gate)
    assert torch.equal(gate_up.weight[:gate.shape[0]], q)
    assert torch.equal(gate_up.weight_scale[:gate.shape[0]].view(-1), s)
    assert type(hf.lm_head) is torch.nn.Linear                   # kept dense
    err = rel_err(hf_logits(hf, ids), ref)
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-moe"])
def test_int8_models_on_the_triton_kernels(name):
    """The whole int8 model (W8A8 linears, int8 experts) on the Triton kernels (the
    interpreter here, the GPU there) equals the reference backend's forward."""
    m = load_model(name, dtype="float32", device="cpu", quantization="int8")
    ids = torch.arange(1, 20)
    meta = AttentionMetadata.for_prompts([12, 7])
    with mk.use_backend("reference"):
        want = m(ids, meta, None)
    with mk.use_backend("triton"):
        got = m(ids, meta, None)
    assert rel_err(got, want) < 1e-5
