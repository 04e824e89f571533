"""FP8 weights in the decoder: fp8 checkpoints (block-wise like Qwen3-*-FP8, per-tensor,
compressed-tensors per channel / block) and block-wise RTN fp8 on load.

The checkpoints are written here from known random e4m3 bytes and scales, per the
published layouts, independently of minikernels.quant.fp8; the transformers model gets
the dequantized weights and is the reference. RTN is checked against a quantizer written
here from its definition (amax / 448 per block, round to nearest even, saturate).
"""
from __future__ import annotations

import json
import os
from typing import Any
from unittest import mock

import pytest
import torch
from test_model_support import (check_rank1_of_2, hf_logits, make_hf_model, random_tokens,
                                rel_err, save_hf, write_known_checkpoint)

from minikernels.engine import LLM, SamplingParams
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.config import UnsupportedModelError
from minikernels.models.generate import generate_tokens
import minikernels as mk
from minikernels.models.loader import CheckpointError, quantize_linears
from minikernels.models.moe import set_fp8_expert_activations
from minikernels.models.parallel import TensorParallel
from minikernels.quant.fp8 import Fp8Weight, fp8_from_checkpoint, fp8_scheme, merge_fp8

FP8 = torch.float8_e4m3fn
MOE_TOL = 1e-4      # fused_moe_fp8 runs fp32 activations as they are


def _logits(model, seqs):
    ids = torch.tensor([t for s in seqs for t in s], device=model.device)
    return model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)


def _seqs(vocab=300):
    return [random_tokens(9, vocab, 1), random_tokens(4, vocab, 2)]


def _grid_scale(scale: torch.Tensor, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """The per-element scale [n, k] of a block grid (written out with index arithmetic)."""
    rows = torch.arange(n) // bn
    cols = torch.arange(k) // bk
    return scale[rows[:, None], cols[None, :]]


def _rtn(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block RTN from its definition: scale = amax / 448 (amax 0 -> a tiny scale), stored
    = clamp(w / scale, +-448) cast (round to nearest even)."""
    n, k = w.shape
    gn, gk = -(-n // bn), -(-k // bk)
    scale = torch.empty(gn, gk)
    for i in range(gn):
        for j in range(gk):
            amax = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max().float()
            scale[i, j] = torch.clamp(amax, min=1e-12) / 448.0
    q = (w.float() / _grid_scale(scale, n, k, bn, bk)).clamp(-448, 448).to(FP8)
    return q, scale


STYLES = ["block", "block-unaligned", "tensor", "ct-channel", "ct-block", "fbgemm"]


def write_fp8_checkpoint(hf: torch.nn.Module, path: str, style: str,
                         seed: int = 0, linears: tuple[str, ...] = ("_proj",)
                         ) -> dict[str, torch.Tensor]:
    """Save ``hf`` as an fp8 checkpoint (known random e4m3 bytes and scales in every
    decoder linear); ``hf`` gets the dequantized weights. Returns {name: W}."""
    g = torch.Generator().manual_seed(seed)
    block = {"block": (32, 32), "block-unaligned": (48, 32), "ct-block": (32, 64)}.get(style)

    def fp8_matrix(tensors: dict, base: str, n: int, k: int) -> torch.Tensor:
        """Known random e4m3 bytes and scales of one [n, k] matrix under ``base`` -> W."""
        q = (torch.randn(n, k, generator=g) * 120).clamp(-448, 448).to(FP8)
        if block is not None:
            bn, bk = block
            scale = torch.rand(-(-n // bn), -(-k // bk), generator=g) * 3e-4 + 1e-4
            full = _grid_scale(scale, n, k, bn, bk)
            tensors[f"{base}.weight_scale" if style == "ct-block"
                    else f"{base}.weight_scale_inv"] = scale
        elif style == "tensor":
            scale = torch.rand((), generator=g) * 3e-4 + 1e-4
            full = scale.expand(n, k)
            tensors[f"{base}.weight_scale"] = scale
            tensors[f"{base}.input_scale"] = torch.tensor(0.01)   # static: unused (W8A16)
        else:                                                      # per channel
            scale = torch.rand(n, 1, generator=g) * 3e-4 + 1e-4
            full = scale.expand(n, k)
            tensors[f"{base}.weight_scale"] = scale
            if style == "fbgemm":
                tensors[f"{base}.input_scale_ub"] = torch.tensor([1200.0])   # unused
        tensors[f"{base}.weight"] = q
        return q.float() * full

    if style == "fbgemm":         # Meta's FP8 Llama 3.1 checkpoints
        qc: dict[str, Any] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                              "modules_to_not_convert": ["lm_head"]}
    elif style.startswith("ct-"):
        w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
             "strategy": "channel" if style == "ct-channel" else "block"}
        if style == "ct-block":
            w["block_structure"] = list(block)
        qc = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "ignore": ["lm_head"], "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": w,
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                      "strategy": "token", "symmetric": True}}}}
    else:
        qc = {"quant_method": "fp8", "fmt": "e4m3",
              "activation_scheme": "dynamic" if block else "static"}
        if block:
            qc["weight_block_size"] = list(block)
    return write_known_checkpoint(hf, path, fp8_matrix, qc, linears)


@pytest.mark.parametrize("style", STYLES)
def test_fp8_checkpoints(tmp_path, style):
    """Every layer dequantizes to exactly the known W; logits equal transformers on the
    dequantized model (fp32: 1e-4; bf16 activations: 0.05)."""
    hf = make_hf_model("qwen3", seed=3)
    d = str(tmp_path / style)
    known = write_fp8_checkpoint(hf, d, style)
    m = load_model(d, dtype="float32", device="cpu")
    assert m.quantization == ("compressed-tensors" if style.startswith("ct-") else
                              "fbgemm_fp8" if style == "fbgemm" else "fp8")
    layer = m.layers[1]
    qkv = layer.self_attn.qkv_proj
    assert qkv.is_fp8 and not qkv.is_int4 and qkv.weight is None
    want = torch.cat([known[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.dense_weight(), want)
    # parts fuse into one matmul: aligned blocks keep their rows, others go to bn = 1
    assert len(qkv.fp8_parts) == 1
    bn = qkv.fp8_parts[0].block_size[0]
    assert bn == {"block": 32, "ct-block": 32}.get(style, 1)
    assert torch.equal(layer.mlp.down_proj.dense_weight(),
                       known["model.layers.1.mlp.down_proj.weight"])
    assert not m.lm_head.is_fp8 and m.lm_head.weight is not None     # left dense
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(_logits(m, seqs), ref) <= 1e-4
    mb = load_model(d, dtype="bfloat16", device="cpu", quantization="fp8")
    assert rel_err(_logits(mb, seqs).float(), ref) <= 0.05
    # tensor parallel: rank 1 of 2 reads its rows of q / k / v, gate / up and its columns
    # of o / down, with their scales (block scales cut at block boundaries)
    if style == "block-unaligned":      # rank rows [64, 128) of q: not on 48-row blocks
        with pytest.raises(CheckpointError, match="fp8 block boundaries"):
            load_model(d, dtype="float32", device="cpu", tensor_parallel=TensorParallel(1, 2))
        return
    check_rank1_of_2(d, known)


def test_fp8_checkpoint_errors(tmp_path):
    hf = make_hf_model("qwen3", seed=3)
    d = str(tmp_path / "ck")
    write_fp8_checkpoint(hf, d, "block")
    with pytest.raises(CheckpointError, match="quantization='int4'"):
        load_model(d, dtype="float32", device="cpu", quantization="int4")
    # a layer's scale missing: named
    from safetensors.torch import load_file, save_file
    f = os.path.join(d, "model.safetensors")
    t = load_file(f)
    del t["model.layers.0.mlp.down_proj.weight_scale_inv"]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.*incomplete.*weight_scale_inv"):
        load_model(d, dtype="float32", device="cpu")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["quantization_config"]["fmt"] = "e5m2"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(UnsupportedModelError, match="e5m2"):
        load_model(d, dtype="float32", device="cpu")


def test_rtn_fp8_on_load(tmp_path):
    """quantization='fp8' of a dense checkpoint: each part's bytes and scales equal the
    definition's (128 x 128 blocks, q / k / v apart), logits equal the model on the
    dequantized weights, and a TP rank quantizes exactly its own shard."""
    hf = make_hf_model("qwen3", seed=5, hidden_size=160, intermediate_size=272)
    d = save_hf(hf, str(tmp_path / "dense"))
    m = load_model(d, dtype="float32", device="cpu", quantization="fp8")
    sd = {k: v.clone() for k, v in hf.state_dict().items()}    # (hf changes below)
    for i in range(2):
        qkv = m.layers[i].self_attn.qkv_proj
        parts = [sd[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        want = [_rtn(w, 128, 128) for w in parts]
        # q has 128 rows (a whole row block) but k / v 64: the parts go to bn = 1
        assert len(qkv.fp8_parts) == 1 and qkv.fp8_parts[0].block_size == (1, 128)
        got = qkv.fp8_parts[0]
        assert torch.equal(got.weight.view(torch.uint8),
                           torch.cat([q for q, _ in want]).view(torch.uint8))
        exp_scale = torch.cat([s.repeat_interleave(128, 0)[:w.shape[0]]
                               for (_, s), w in zip(want, parts)])
        assert torch.equal(got.scale, exp_scale)
        down = m.layers[i].mlp.down_proj.fp8_parts[0]            # K = 272: a partial block
        q, s = _rtn(sd[f"model.layers.{i}.mlp.down_proj.weight"], 128, 128)
        assert down.block_size == (128, 128)
        assert torch.equal(down.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(down.scale, s)
    assert m.lm_head.weight is not None                           # opt-in only
    # the model equals transformers running the dequantized weights
    with torch.no_grad():
        for name, lin in m.linear_layers():
            if lin.is_fp8:
                w = lin.dense_weight()
                start = 0
                hf_names = _hf_parts(name)
                for hn, size in zip(hf_names, lin.output_sizes):
                    hf.get_parameter(hn).copy_(w[start:start + size])
                    start += size
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(_logits(m, seqs), ref) <= 1e-4
    # rank 1 of 2: its rows of q / k / v and gate / up, its columns of o / down
    part = load_model(d, dtype="float32", device="cpu", quantization="fp8",
                      tensor_parallel=TensorParallel(1, 2))
    down = sd["model.layers.0.mlp.down_proj.weight"]
    q, s = _rtn(down[:, down.shape[1] // 2:], 128, 128)
    got = part.layers[0].mlp.down_proj.fp8_parts[0]
    assert torch.equal(got.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got.scale, s)


def _hf_parts(name: str) -> list[str]:
    prefix, fused = name.rsplit(".", 1)
    parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj",
                                                                          "up_proj"]}
    return [f"model.{prefix}.{p}.weight" for p in parts.get(fused, [fused])]


def test_fp8_builtin_and_lm_head():
    """A built-in with quantization='fp8' is the dense built-in of the same seed quantized;
    quantize_lm_head quantizes a tied lm_head into its own copy."""
    dense = load_model("tiny", dtype="float32", device="cpu", seed=2)
    quantize_linears(dense, quantize_lm_head=False, scheme="fp8")
    q = load_model("tiny", dtype="float32", device="cpu", seed=2, quantization="fp8")
    for (name, a), (_, b) in zip(dense.linear_layers(), q.linear_layers()):
        assert a.is_fp8 == b.is_fp8, name
        assert torch.equal(a.dense_weight(), b.dense_weight()), name
    seqs = _seqs(256)
    assert torch.equal(_logits(dense, seqs), _logits(q, seqs))
    h = load_model("tiny", dtype="float32", device="cpu", seed=2, quantization="fp8",
                   quantize_lm_head=True)
    assert h.lm_head.is_fp8
    assert h.embed_tokens.weight.dtype == torch.float32          # the table stays dense


def test_engine_fp8_equals_the_plain_loop():
    """LLM(quantization='fp8') greedy = the plain paged loop on the same model, with and
    without overlap scheduling and chunked prefill."""
    model = load_model("tiny", dtype="float32", device="cpu", quantization="fp8")
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19, 30)]
    ref = generate_tokens(model, prompts, max_new_tokens=8, block_size=8)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for kw in (dict(async_scheduling=True), dict(max_num_batched_tokens=16)):
        llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
                  quantization="fp8", **kw)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref, kw
        llm.llm_engine.check_no_leaks()


# ----------------------------------------------------------------- the container
def test_per_tensor_and_channel_scales_become_row_scales():
    w = (torch.randn(6, 32) * 50).to(FP8)
    t = fp8_from_checkpoint(w, torch.tensor(0.5), {"strategy": "tensor"})
    assert t.block_size == (1, 32) and torch.equal(t.dequantize(), w.float() * 0.5)
    c = fp8_from_checkpoint(w, torch.arange(1, 7).float().reshape(6, 1),
                            {"strategy": "channel"})
    assert torch.equal(c.dequantize(), w.float() * torch.arange(1, 7).float()[:, None])


@pytest.mark.parametrize("sizes,bn,fused_bn", [((64, 32, 32), 32, 32), ((64, 40), 32, 32),
                                               ((40, 64), 32, 1), ((48, 48), 32, 1),
                                               ((30,), 16, 16)])
def test_merge_fp8_is_lossless(sizes, bn, fused_bn):
    g = torch.Generator().manual_seed(0)
    parts = []
    for n in sizes:
        w = (torch.randn(n, 48, generator=g) * 100).clamp(-448, 448).to(FP8)
        s = torch.rand(-(-n // bn), 3, generator=g) + 0.5
        parts.append(Fp8Weight(w, s, (bn, 16)))
    merged = merge_fp8(parts)
    assert len(merged) == 1 and merged[0].block_size == (fused_bn, 16)
    assert torch.equal(merged[0].dequantize(), torch.cat([p.dequantize() for p in parts]))
    other = Fp8Weight(parts[0].weight, torch.ones(-(-sizes[0] // bn), 1), (bn, 48))
    assert len(merge_fp8([parts[0], other])) == 2                 # different K blocks


def test_fp8_scheme_parsing():
    assert fp8_scheme({"quant_method": "fp8", "weight_block_size": [128, 128]}) == {
        "method": "fp8", "strategy": "block", "block_size": (128, 128),
        "scale": "weight_scale_inv"}
    assert fp8_scheme({"quant_method": "fp8", "activation_scheme": "static"})["strategy"] \
        == "tensor"
    assert fp8_scheme({"quant_method": "gptq", "bits": 4}) is None
    int4 = {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}
    assert fp8_scheme(int4) is None                               # the int4 importer's
    for bad, msg in [({"quant_method": "fp8", "weight_block_size": [128, 100]}, "multiple"),
                     ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive"),
                     ({"quant_method": "compressed-tensors", "config_groups": {"g": {
                         "weights": {"num_bits": 8, "type": "float",
                                     "strategy": "group"}}}}, "strategy 'group'")]:
        with pytest.raises(ValueError, match=msg):
            fp8_scheme(bad)


# ------------------------------------------------------------- mixture of experts
@pytest.mark.parametrize("style", ["block", "ct-channel", "tensor"])
def test_fp8_moe_checkpoints(tmp_path, style):
    """The hub's per-expert fp8 tensors (Qwen3-30B-A3B-FP8's layout) load onto the fp8
    experts losslessly (I = 48 is not a multiple of the 32-row block: rows go to bn = 1),
    logits equal transformers on the dequantized weights; a TP rank reads its intermediate
    slice of every expert with its scales (a 24-row slice does not fall on 32-row blocks:
    refused by name)."""
    hf = make_hf_model("qwen3-moe", seed=2)
    d = str(tmp_path / style)
    known = write_fp8_checkpoint(hf, d, style)
    m = load_model(d, dtype="float32", device="cpu")
    ex = m.layers[0].mlp.experts
    assert ex.is_fp8 and not ex.is_int4
    w13, w2 = ex.dequantized()
    assert torch.equal(w13, known["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(w2, known["model.layers.0.mlp.experts.down_proj"])
    assert m.layers[1].mlp.down_proj.is_fp8                       # the dense layer's MLP
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(_logits(m, seqs), ref) <= MOE_TOL
    if style == "block":
        with pytest.raises(CheckpointError, match="fp8 block boundaries"):
            load_model(d, dtype="float32", device="cpu", tensor_parallel=TensorParallel(1, 2))
        return
    part = load_model(d, dtype="float32", device="cpu", tensor_parallel=TensorParallel(1, 2))
    p13, p2 = part.layers[0].mlp.experts.dequantized()
    w13 = known["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(p13, torch.cat([w13[:, 24:48], w13[:, 72:]], dim=1))
    assert torch.equal(p2, known["model.layers.0.mlp.experts.down_proj"][:, :, 24:])


def test_fp8_moe_rtn_and_engine():
    """quantization='fp8' quantizes the experts expert by expert (each part = RTN of the
    dense built-in's, 128 x 128 blocks); the engine's greedy tokens equal the plain loop;
    a TP rank quantizes its own intermediate slice."""
    dense = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3)
    q = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3,
                   quantization="fp8")
    ex, dx = q.layers[0].mlp.experts, dense.layers[0].mlp.experts
    assert ex.is_fp8 and ex.fp8_block == (1, 128)            # I = 64: not whole row blocks
    for e in (0, 5):
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = dx.part(e, name)
            qw, s = _rtn(w, 128, 128)
            deq = qw.float() * _grid_scale(s, *w.shape, 128, 128)
            rows = slice(None) if name == "down_proj" else \
                slice(0, 64) if name == "gate_proj" else slice(64, 128)
            got = ex.dequantized()[1 if name == "down_proj" else 0][e, rows]
            assert torch.equal(got, deq), (e, name)
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19)]
    ref = generate_tokens(q, prompts, max_new_tokens=6, block_size=8)
    llm = LLM("tiny-qwen3-moe", dtype="float32", device="cpu", num_kv_blocks=64,
              block_size=8, quantization="fp8", seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    part = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3,
                      quantization="fp8", tensor_parallel=TensorParallel(1, 2))
    pe = part.layers[0].mlp.experts
    assert pe.inter == 32
    w = dx.part(2, "down_proj")[:, 32:]
    qw, s = _rtn(w, 128, 128)
    assert torch.equal(pe.dequantized()[1][2], qw.float() * _grid_scale(s, *w.shape, 128, 128))


# ------------------------------------------------------------------- W8A8 (opt-in)
def test_fp8_w8a8():
    """quantization='fp8_w8a8': the weights of 'fp8', and each linear runs W8A8 (x per
    token and K group to e4m3, fp32 block-scaled dots) -- checked against that formula
    written here; the logits move only by the activation rounding; the engine's greedy
    tokens equal the plain loop on the same model."""
    w16 = load_model("tiny", dtype="float32", device="cpu", quantization="fp8", seed=4)
    w8 = load_model("tiny", dtype="float32", device="cpu", quantization="fp8_w8a8", seed=4)
    assert w8.quantization == "fp8_w8a8"
    for (name, a), (_, b) in zip(w16.linear_layers(), w8.linear_layers()):
        assert torch.equal(a.dense_weight(), b.dense_weight()), name
    part = w8.layers[0].mlp.down_proj.fp8_parts[0]
    assert part.activations == "dynamic" and part.supports_w8a8
    k = part.in_features
    bn, bk = part.block_size[0], min(part.block_size[1], k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    xg = x.view(5, k // bk, bk)
    xs = xg.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
    xq = (xg / xs).clamp(-448, 448).to(FP8).double()
    wd = part.weight.double().view(part.out_features, k // bk, bk)
    ws = part.scale.double()[torch.arange(part.out_features) // bn]          # [N, K/bk]
    want = torch.einsum("mjk,njk,mj,nj->mn", xq, wd, xs.squeeze(-1).double(), ws)
    torch.testing.assert_close(part(x).double(), want, rtol=1e-5, atol=1e-5)
    seqs = _seqs(256)
    a, b = _logits(w16, seqs), _logits(w8, seqs)
    assert 0 < rel_err(b, a) < 0.05
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19)]
    ref = generate_tokens(w8, prompts, max_new_tokens=6, block_size=8)
    llm = LLM("tiny", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
              quantization="fp8_w8a8", seed=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_fp8_w8a8_moe_experts():
    """quantization='fp8_w8a8' on a mixture of experts: the experts (block (1, 128) over
    H = I = 64: one activation group per row) run W8A8 too (ops.fused_moe_fp8_w8a8),
    their logits within fp8 activation rounding of the W8A16 experts'; switched off
    they are exactly the 'fp8' model's; the engine's greedy tokens equal the plain loop."""
    w16 = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3,
                     quantization="fp8")
    w8 = load_model("tiny-qwen3-moe", dtype="float32", device="cpu", seed=3,
                    quantization="fp8_w8a8")
    ex = w8.layers[0].mlp.experts
    assert ex.is_fp8 and ex.fp8_activations and not w16.layers[0].mlp.experts.fp8_activations
    seqs = _seqs(256)
    calls = []
    real = mk.ops.fused_moe_fp8_w8a8
    with mock.patch.object(mk.ops, "fused_moe_fp8_w8a8",
                           lambda *a, **k: calls.append(1) or real(*a, **k)):
        b = _logits(w8, seqs)
    assert calls
    assert set_fp8_expert_activations(w8, False) == 0
    mid = _logits(w8, seqs)                  # W8A8 linears, W8A16 experts
    assert set_fp8_expert_activations(w8, True) == 1       # one MoE layer (of two)
    a = _logits(w16, seqs)
    assert 0 < rel_err(b, a) < 0.05 and not torch.equal(b, mid)
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19)]
    ref = generate_tokens(w8, prompts, max_new_tokens=6, block_size=8)
    llm = LLM("tiny-qwen3-moe", dtype="float32", device="cpu", num_kv_blocks=64,
              block_size=8, quantization="fp8_w8a8", seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref


@pytest.mark.parametrize("style", ["block", "tensor", "ct-channel"])
def test_fp8_fused_qkv_checkpoints(tmp_path, style):
    """Phi-3 stores q/k/v and gate/up fused: the fp8 weight splits by rows and its scale
    with it (per channel: rows; block: row blocks; one value: shared by the parts)."""
    hf = make_hf_model("phi3-longrope-partial", seed=2)
    d = str(tmp_path / style)
    known = write_fp8_checkpoint(hf, d, style)
    m = load_model(d, dtype="float32", device="cpu")
    assert torch.equal(m.layers[1].self_attn.qkv_proj.dense_weight(),
                       known["model.layers.1.self_attn.qkv_proj.weight"])
    assert torch.equal(m.layers[0].mlp.gate_up_proj.dense_weight(),
                       known["model.layers.0.mlp.gate_up_proj.weight"])
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(_logits(m, seqs), ref) <= 1e-4


@pytest.mark.parametrize(("kind", "style"), [("gpt_neox", "ct-channel"), ("bloom", "tensor"),
                                             ("falcon-new", "ct-channel")])
def test_fp8_checkpoints_of_grouped_fused_qkv(tmp_path, kind, style):
    """Per-channel fp8 scales of a grouped fused q / k / v (GPT-NeoX, BLOOM, Falcon's new
    architecture) are regrouped with their rows: logits equal transformers on the
    dequantized weights."""
    hf = make_hf_model(kind, seed=3)
    d = str(tmp_path / kind)
    write_fp8_checkpoint(hf, d, style,
                         linears=("query_key_value", "dense", "_4h", "_4h_to_h"))
    m = load_model(d, dtype="float32", device="cpu")
    assert m.layers[0].self_attn.qkv_proj.is_fp8
    seqs = [random_tokens(n, 300, n) for n in (7, 12)]
    got = torch.cat([m(torch.tensor(s), AttentionMetadata.for_prompts([len(s)]), None)
                     for s in seqs])
    assert rel_err(got, torch.cat([hf_logits(hf, s) for s in seqs])) <= 2e-3
