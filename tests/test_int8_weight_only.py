"""Weight-only INT8 (W8A16) checkpoints in the decoder: GPTQ 8-bit (Qwen's ``*-GPTQ-Int8``
layout: v1 / v2, act-order), compressed-tensors ``pack-quantized`` 8-bit and
``int-quantized`` without activation quantization -- every layer holds exactly the
checkpoint's integers, scales and zeros (``Int8WoWeight``, ``ops.int8_matmul``), logits
follow transformers on the dequantized weights, tensor-parallel ranks read their slices,
the engine runs them. The op itself: tests/test_int8_matmul.py."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_int8_model import _ct_config, _logits, _seqs
from test_model_support import (check_rank1_of_2, gptq_tensors, hf_logits, make_hf_model,
                                random_tokens, rel_err, write_quantized_checkpoint)

from minikernels.engine import LLM, SamplingParams
from minikernels.models import load_model
from minikernels.models.config import UnsupportedModelError
from minikernels.models.generate import generate_tokens
from minikernels.models.loader import CheckpointError
from minikernels.quant import from_gptq
from minikernels.quant.int8 import Int8WoWeight, int8_scheme, int8_wo_from_checkpoint

#: fp32 models run W8A16 with fp16 activations (the scales' dtype): ~1e-3 of rounding
TOL = 5e-3

CASES = {   # name -> write_quantized_checkpoint arguments
    "gptq-g32": dict(method="gptq", group=32),
    "gptq-v2-act-order": dict(method="gptq", group=32, act_order=True,
                              checkpoint_format="gptq_v2"),
    "gptq-channel": dict(method="gptq", group=-1),
    "ct-g32": dict(method="compressed-tensors", group=32),
    "ct-channel": dict(method="compressed-tensors", group=-1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_8bit_checkpoints(tmp_path, case):
    hf = make_hf_model("qwen3", seed=3)
    d = str(tmp_path / case)
    known = write_quantized_checkpoint(hf, d, bits=8, **CASES[case])
    m = load_model(d, dtype="float32", device="cpu")
    qkv = m.layers[1].self_attn.qkv_proj
    assert qkv.is_int8_wo and not qkv.is_int4 and not qkv.is_int8 and qkv.weight is None
    want = torch.cat([known[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.dense_weight(), want)
    # parts with the same permutation and group size share one matmul
    assert len(qkv.int8_wo_parts) == (3 if CASES[case].get("act_order") else 1)
    assert qkv.int8_wo_parts[0].qweight.dtype == torch.uint8
    assert torch.equal(m.layers[0].mlp.down_proj.dense_weight(),
                       known["model.layers.0.mlp.down_proj.weight"])
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    err = rel_err(_logits(m, seqs), ref)
    assert err < TOL, err
    mb = load_model(d, dtype="bfloat16", device="cpu")
    assert rel_err(_logits(mb, seqs).float(), ref) < 0.05
    if CASES[case].get("act_order"):
        return        # (row-parallel act-order layers are refused under TP, as for int4)
    check_rank1_of_2(d, known)   # TP rank 1 of 2: its rows of q / k / v, its K columns


def test_gptq8_import_is_lossless_and_checked():
    g = torch.Generator().manual_seed(0)
    n, k, gs = 24, 64, 16
    q = torch.randint(0, 256, (n, k), generator=g)
    zeros = torch.randint(1, 256, (n, k // gs), generator=g)
    scales = (torch.rand(n, k // gs, generator=g) * 0.01).half()
    g_idx = torch.randperm(k, generator=g) % (k // gs)
    t = gptq_tensors(q, zeros, scales, g_idx, v1=True, bits=8)
    w = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=8)
    assert isinstance(w, Int8WoWeight) and w.perm is not None
    gi = g_idx.long()
    want = (q.float() - zeros.float()[:, gi]) * scales.float()[:, gi]
    assert torch.equal(w.dequantize(), want)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], bits=3)
    with pytest.raises(ValueError, match="qzeros"):
        from_gptq(t["qweight"], t["qzeros"][:, :-1], t["scales"], bits=8)
    with pytest.raises(ValueError, match="group_size"):
        Int8WoWeight(w.qweight, w.scales[:, :1].repeat(1, 8), w.zeros[:, :1].repeat(1, 8), 8)


def test_int_quantized_weight_only(tmp_path):
    """compressed-tensors int-quantized without input_activations (W8A16): signed int8
    weights + per-channel or per-group scales run weight-only (q = w + 128, zero 128)."""
    qc = _ct_config()
    qc["config_groups"]["group_0"]["input_activations"] = None
    assert int8_scheme(qc)["activations"] is None
    qc["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=8)
    with pytest.raises(ValueError, match="group_size 8"):
        int8_scheme(qc)
    w8 = torch.randint(-128, 128, (6, 64), dtype=torch.int8)
    s = torch.rand(6, 2)
    w = int8_wo_from_checkpoint(w8, s.half())
    assert w.group_size == 32 and torch.equal(w.qweight.int() - 128, w8.int())
    assert torch.equal(w.dequantize(), w8.float() * s.half().float().repeat_interleave(32, 1))
    # a whole checkpoint (per channel, fp32 scales): exact layers, W8A16 logits
    from safetensors.torch import save_file
    hf = make_hf_model("qwen3", seed=3)
    gen = torch.Generator().manual_seed(1)
    tensors, known = {}, {}
    for name, p in hf.state_dict().items():
        if ".layers." in name and name.endswith("_proj.weight"):
            n, kk = p.shape
            q = torch.randint(-127, 128, (n, kk), generator=gen, dtype=torch.int8)
            scale = (torch.rand(n, 1, generator=gen) * 3e-4 + 1e-4).half()
            tensors[name] = q
            tensors[name[:-len("weight")] + "weight_scale"] = scale
            known[name] = q.float() * scale.float()
            with torch.no_grad():
                hf.get_parameter(name).copy_(known[name])
        else:
            tensors[name] = p.contiguous()
    d = tmp_path / "w8a16"
    os.makedirs(d)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    qc = _ct_config()
    qc["config_groups"]["group_0"]["input_activations"] = None
    cfg["quantization_config"] = qc
    json.dump(cfg, open(d / "config.json", "w"))
    m = load_model(str(d), dtype="float32", device="cpu")
    down = m.layers[0].mlp.down_proj
    assert down.is_int8_wo and not down.is_int8
    assert torch.equal(down.dense_weight(), known["model.layers.0.mlp.down_proj.weight"])
    seqs = _seqs()
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(_logits(m, seqs), ref) < TOL


def test_8bit_errors_and_engine(tmp_path):
    d = str(tmp_path / "gptq8")
    write_quantized_checkpoint(make_hf_model("llama", seed=5), d, "gptq", group=32, bits=8)
    with pytest.raises(CheckpointError, match="quantization='int8' but .* 8-bit checkpoint"):
        load_model(d, dtype="float32", device="cpu", quantization="int8")
    # the engine: greedy = the plain loop on the same model, with and without overlap
    model = load_model(d, dtype="float32", device="cpu")
    # (prompts whose greedy steps have top-2 logit margins >= 0.03 on this model: the
    # chunked schedule rounds the fp16 activations in other places, so a near tie may flip)
    prompts = [random_tokens(n, 300, n) for n in (6, 21)]
    ref = generate_tokens(model, prompts, max_new_tokens=6, block_size=8)
    for kw in (dict(async_scheduling=True), dict(max_num_batched_tokens=16)):
        llm = LLM(d, dtype="float32", device="cpu", num_kv_blocks=64, block_size=8, **kw)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                    ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref, kw
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"].update(quant_method="awq", bits=8, version="gemm",
                                      zero_point=True)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="awq with 8 bits"):
        load_model(d, dtype="float32", device="cpu")
    cfg["quantization_config"].update(quant_method="gptq", group_size=8)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="group_size 8"):
        load_model(d, dtype="float32", device="cpu")
    # 8-bit weight-only experts: refused by name
    moe = str(tmp_path / "moe8")
    write_quantized_checkpoint(make_hf_model("qwen3-moe", seed=5, moe_intermediate_size=64),
                               moe, "gptq", group=32, bits=8)
    with pytest.raises(CheckpointError, match="8-bit weight-only experts"):
        load_model(moe, dtype="float32", device="cpu")


def test_gptq8_model_on_the_triton_kernels(tmp_path):
    """A GPTQ 8-bit model on int8_matmul's Triton kernels (the interpreter here) equals
    the reference backend within the weight tile's fp16 rounding, prefill and M = 1."""
    import minikernels as mk
    from minikernels.models import AttentionMetadata

    d = str(tmp_path / "gptq8")
    write_quantized_checkpoint(make_hf_model("llama", seed=5), d, "gptq", group=32, bits=8)
    m = load_model(d, dtype="float32", device="cpu")
    for lens in ([12, 7], [1]):
        ids = torch.arange(1, 1 + sum(lens))
        meta = AttentionMetadata.for_prompts(lens)
        with mk.use_backend("reference"):
            want = m(ids, meta, None)
        with mk.use_backend("triton"):
            got = m(ids, meta, None)
        assert rel_err(got, want) < TOL, lens
