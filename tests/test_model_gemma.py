"""Gemma 1 / 2 / 3 (text) in the native decoder, beyond the transformers comparisons that
tests/test_model_hf.py runs for every CASES kind (gemma, gemma2-window-softcap, gemma3):
hub config.json files as published (transformers 4.x spelling) parse to the right flags,
what is not supported is refused by name, half precision stays close to transformers,
dummy weights give unit norm scales, RTN int4 and the engine run these models."""
from __future__ import annotations

import pytest
import torch
from test_model_support import hf_dirs, hf_logits, random_tokens, rel_err, text_logits_err

from minikernels.engine import LLM, SamplingParams
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.config import DecoderConfig, UnsupportedModelError, builtin_config
from minikernels.models.generate import generate_tokens

__all__ = ["hf_dirs"]  # the fixture, re-exported for pytest

# config.json as published on the hub (transformers 4.x keys; weights not needed).
GEMMA_3_1B_IT = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "vocab_size": 262144}
GEMMA_2_2B_IT = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "vocab_size": 256000}
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "bos_token_id": 2, "eos_token_id": 1,
    "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "intermediate_size": 16384,
    "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "vocab_size": 256000}


@pytest.mark.parametrize(("hub", "builtin"), [(GEMMA_3_1B_IT, "gemma-3-1b"),
                                              (GEMMA_2_2B_IT, "gemma-2-2b")])
def test_hub_configs_parse_to_the_builtin_shapes(hub, builtin):
    got = DecoderConfig.from_hf(hub).to_dict()
    want = builtin_config(builtin).to_dict()
    for key in ("torch_dtype", "hf_architecture"):
        got.pop(key), want.pop(key)
    assert got == want


def test_hub_config_flags():
    g3 = DecoderConfig.from_hf(GEMMA_3_1B_IT)
    assert [g3.window_left(i) for i in range(7)] == [511] * 5 + [-1, 511]
    assert g3.sliding_rope_theta == 1e4 and g3.rope_theta == 1e6 and g3.rope_scaling is None
    assert g3.qk_norm and g3.sandwich_norm and g3.norm_weight_offset == 1.0
    assert g3.attn_logit_softcapping is None and g3.final_logit_softcapping is None
    g2 = DecoderConfig.from_hf(GEMMA_2_2B_IT)
    assert [g2.window_left(i) for i in range(3)] == [4095, -1, 4095]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    assert g2.sliding_rope_theta is None and not g2.qk_norm
    g1 = DecoderConfig.from_hf(GEMMA_2B)
    # Gemma 1's legacy "gelu" means the tanh approximation (transformers maps it so).
    assert g1.hidden_act == "gelu_pytorch_tanh" and g1.activation == "gelu_tanh"
    assert not g1.sandwich_norm and g1.sliding_window is None and g1.attention_scale is None
    assert g1.softmax_scale == 256 ** -0.5 and g1.embed_scale == 2048 ** 0.5
    assert g1.tie_word_embeddings   # transformers' default for Gemma
    # Gemma 2 with an exact gelu stays exact.
    exact = DecoderConfig.from_hf({**GEMMA_2_2B_IT, "hidden_activation": "gelu"})
    assert exact.activation == "gelu"
    # A 4.x Gemma 3 config with rope scaling: it applies to the global layers only.
    scaled = DecoderConfig.from_hf({**GEMMA_3_1B_IT, "rope_scaling": {
        "rope_type": "linear", "factor": 8.0}})
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert scaled.sliding_rope_theta == 1e4


def test_unsupported_gemma_configs_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        DecoderConfig.from_hf({**GEMMA_3_1B_IT, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="sliding-window layers"):
        DecoderConfig.from_hf({**GEMMA_3_1B_IT, "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                  "rope_theta": 1e4}}})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'relu'"):
        DecoderConfig.from_hf({**GEMMA_2_2B_IT, "hidden_activation": "relu"})
    with pytest.raises(UnsupportedModelError, match="multimodal architecture"):
        DecoderConfig.from_hf({"architectures": ["Gemma3ForCausalLM"],
                               "text_config": GEMMA_3_1B_IT})
    with pytest.raises(ValueError, match="attention_scale"):
        DecoderConfig(**{**builtin_config("tiny-gemma3").to_dict(), "attention_scale": -1.0})


@pytest.mark.parametrize("kind", ["gemma", "gemma2-window-softcap", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_close_as_transformers_own(hf_dirs, kind, dtype):
    """Half-precision logits are about as far from transformers' fp32 ones as
    transformers' own model in that dtype is (the embedding scale rounded to the model
    dtype, (1 + w) norms in fp32, softcaps)."""
    import copy

    hf, path = hf_dirs[kind]
    model = load_model(path, dtype=dtype, device="cpu")
    seqs = [random_tokens(n, hf.config.vocab_size, 40 + n) for n in (9, 14)]
    ids = torch.tensor([t for s in seqs for t in s])
    logits = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    hf_half = copy.deepcopy(hf).to(dtype)
    hf_err = rel_err(torch.cat([hf_logits(hf_half, s) for s in seqs]), ref)
    assert 0 < rel_err(logits, ref) <= 1.5 * hf_err + 0.005


def test_int4_rtn_on_load(hf_dirs):
    """RTN int4 on load: the int4 model equals the dense model with each linear layer's
    weight replaced by its dequantized int4 weight (so the Gemma-specific parts around
    the int4 matmuls are unchanged), and equals quantizing after loading."""
    import minikernels as mk
    from minikernels.models.linear import FusedLinear

    hf, path = hf_dirs["gemma3"]
    q = load_model(path, dtype="float32", device="cpu", quantization="int4", group_size=32)
    assert q.layers[0].mlp.gate_up_proj.is_int4 and q.layers[1].self_attn.o_proj.is_int4
    dense = load_model(path, dtype="float32", device="cpu")
    ids = torch.tensor(random_tokens(12, hf.config.vocab_size, 7))
    meta = AttentionMetadata.for_prompts([12])
    want_dense = dense(ids, meta, None)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, mod in dense.named_modules():
            if isinstance(mod, FusedLinear) and qmods[name].is_int4:
                mod.weight.copy_(torch.cat([p.dequantize() for p in qmods[name].int4_parts]))
    got = q(ids, meta, None)
    # (the int4 matmul itself differs from fp32 x dequantized weight by ~4e-4 per layer)
    assert rel_err(got, dense(ids, meta, None)) <= 1e-2
    assert rel_err(got, want_dense) > 1e-3            # int4 did change the weights
    after = mk.quantize_model(load_model(path, dtype="float32", device="cpu"), group_size=32)
    assert torch.equal(after(ids, meta, None), got)


def test_dummy_weights_have_unit_norm_scales():
    """Gemma norms store w with scale 1 + w: dummy weights store 0 (scale 1), like the
    Llama family's stored 1; tensor-parallel dummy shards draw the same."""
    from minikernels.models.parallel import TensorParallel

    m = load_model("tiny-gemma3", dtype="float32", device="cpu")
    norms = [p for n, p in m.named_parameters() if "norm" in n]
    assert len(norms) == 2 * 6 + 1 and all(torch.all(p == 0) for p in norms)
    part = load_model("tiny-gemma3", dtype="float32", device="cpu",
                      tensor_parallel=TensorParallel(1, 2))
    assert all(torch.all(p == 0) for n, p in part.named_parameters() if "norm" in n)
    llama = load_model("tiny", dtype="float32", device="cpu")
    assert all(torch.all(p == 1) for n, p in llama.named_parameters() if "norm" in n)


def test_engine_generates_what_the_plain_loop_does():
    """LLM on the built-in tiny-gemma3 (a window of 8 crossed by the prompts) gives the
    same greedy tokens as the plain paged loop, through chunked prefill too."""
    llm = LLM("tiny-gemma3", dtype="float32", device="cpu", num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=16)
    prompts = [[256] + random_tokens(n, 256, n) for n in (5, 19, 30)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                ignore_eos=True), use_tqdm=False)
    model = load_model("tiny-gemma3", dtype="float32", device="cpu")
    ref = generate_tokens(model, prompts, max_new_tokens=12, block_size=8)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_exact_gelu_mlp_matches_transformers(tmp_path):
    """hidden_activation "gelu" (erf) runs gelu_and_mul without the tanh approximation."""
    from test_model_support import make_hf_model, save_hf

    hf = make_hf_model("gemma2-window-softcap", hidden_activation="gelu")
    model = load_model(save_hf(hf, str(tmp_path)), dtype="float32", device="cpu")
    assert model.config.activation == "gelu"
    seq = random_tokens(11, hf.config.vocab_size, 3)
    got = model(torch.tensor(seq), AttentionMetadata.for_prompts([11]), None)
    assert rel_err(got, hf_logits(hf, seq)) <= 1e-4


# gemma-3-4b-it's config.json as published (vision_config shortened): the text_config
# lists only what differs from transformers' Gemma3TextConfig defaults.
GEMMA_3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                    "model_type": "gemma3_text", "num_hidden_layers": 34,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type": "siglip_vision_model",
                      "num_hidden_layers": 27, "patch_size": 14}}


def test_multimodal_gemma3_config_gives_its_text_decoder():
    c = DecoderConfig.from_hf(GEMMA_3_4B_IT)
    assert (c.architecture, c.hf_architecture) == ("gemma3", "Gemma3ForConditionalGeneration")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == \
        (262208, 2560, 10240, 34)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (8, 4, 256)
    assert c.eos_token_ids == [1, 106] and c.bos_token_id == 2 and c.tie_word_embeddings
    assert c.rope_theta == 1e6 and c.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert c.sliding_rope_theta == 1e4 and c.window_left(0) == 1023 and c.window_left(5) == -1
    assert c.torch_dtype == "bfloat16" and c.softmax_scale == 256 ** -0.5
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        DecoderConfig.from_hf({"architectures": ["LlavaForConditionalGeneration"],
                               "text_config": {"model_type": "llama"}})


@pytest.fixture(scope="module")
def multimodal_gemma3(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower + projector + Gemma 3 text
    decoder) saved with save_pretrained."""
    import transformers
    from test_model_support import BASE, CASES

    _, text = CASES["gemma3"]
    text_config = {**{k: v for k, v in BASE.items() if k not in ("bos_token_id",
                                                                 "eos_token_id")}, **text}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text_config, vision_config=vision,
                                    mm_tokens_per_image=4, boi_token_index=297,
                                    eoi_token_index=298, image_token_index=299)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "language_model" in name:
                scale = 0.5 if "norm" in name else 0.08
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    path = str(tmp_path_factory.mktemp("gemma3mm"))
    hf.save_pretrained(path)
    return hf, path


def test_multimodal_gemma3_text_logits_match_transformers(multimodal_gemma3, caplog):
    """Text-only prompts through the text decoder of a multimodal checkpoint give
    transformers' Gemma3ForConditionalGeneration logits; the vision tensors are skipped
    (not read, not reported as unexpected)."""
    import logging

    hf, path = multimodal_gemma3
    with caplog.at_level(logging.INFO, logger="minikernels"):
        model = load_model(path, dtype="float32", device="cpu")
    assert "vision tensors not loaded" in caplog.text and "unexpected" not in caplog.text
    assert model.config.hf_architecture == "Gemma3ForConditionalGeneration"
    seqs = [random_tokens(n, 297, 60 + n) for n in (13, 8)]
    assert text_logits_err(model, hf, seqs) <= 1e-4
    llm = LLM(path, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=32,
              block_size=8)
    out = llm.generate([seqs[0]], SamplingParams(temperature=0, max_tokens=6,
                                                 ignore_eos=True), use_tqdm=False)
    ref_ids = hf.generate(torch.tensor([seqs[0]]), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(seqs[0]):].tolist()
    assert out[0].outputs[0].token_ids == ref_ids
