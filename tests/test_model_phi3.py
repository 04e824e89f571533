"""Phi-3 / Phi-3.5 / Phi-4-mini in the decoder, beyond what tests/test_model_hf.py runs for
the CASES kinds ("phi3-longrope-partial": fused checkpoint tensors, partial rotary, the
short LongRoPE factors, a window; "qwen2-yarn"): the long LongRoPE factors against
transformers on sequences past the original context, the rope caches against
transformers' own formulas, hub config.json files as published, fused-tensor errors, and
the model through the engine."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_support import hf_logits, make_hf_model, rel_err, run_schedule, save_hf

from minikernels.engine import LLM, SamplingParams
from minikernels.models import AttentionMetadata, load_model
from minikernels.models.config import DecoderConfig, UnsupportedModelError
from minikernels.models.generate import generate_tokens
from minikernels.models.loader import CheckpointError
from minikernels.ops.rotary import build_rope_cache

SHORT = [1.0, 1.5, 2.0, 3.0]
LONG = [2.0, 4.0, 8.0, 16.0]


@pytest.fixture(scope="module")
def phi3_long(tmp_path_factory):
    """Original context 8, max_position_embeddings 256: LongRoPE's long factors and its
    attention factor sqrt(1 + ln(32) / ln(8)) (transformers takes them for a sequence
    past 8 tokens; minikernels always, as vLLM at its default max_model_len)."""
    hf = make_hf_model("phi3-longrope-partial", original_max_position_embeddings=8,
                       sliding_window=None)
    return hf, save_hf(hf, str(tmp_path_factory.mktemp("phi3long")))


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def test_long_factors_match_transformers_past_the_original_context(phi3_long):
    hf, path = phi3_long
    model = load_model(path, dtype="float32", device="cpu")
    assert model.config.rope_scaling["rope_type"] == "longrope"
    assert model.config.rotary_dim == 8
    seqs = [_tokens(n, n) for n in (12, 21, 9)]          # all longer than 8
    refs = [hf_logits(hf, s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s])
    got = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    assert rel_err(got, torch.cat(refs)) <= 1e-4
    plan = [[("p", 0, 7), ("p", 1, 11)], [("d", 0), ("p", 1, 10), ("p", 2, 9)],
            [("d", 0)], [("d", 0)], [("d", 0)], [("d", 0)]]
    rows = run_schedule(model, seqs, plan, block_size=4)
    got = torch.stack([r for _, _, r in rows])
    ref = torch.stack([refs[i][p] for i, p, _ in rows])
    assert rel_err(got, ref) <= 1e-4
    # Greedy continuation of a prompt already past 8 tokens: transformers stays on the
    # long factors too.
    prompt = _tokens(10, 5)
    ours = generate_tokens(model, [prompt], max_new_tokens=8, block_size=4)[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("kind", ["yarn", "longrope-long", "longrope-short"])
def test_rope_caches_match_transformers_formulas(kind):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind == "yarn":
        cfg = transformers.Qwen2Config(
            hidden_size=256, num_attention_heads=2, max_position_embeddings=512,
            rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16,
                                          "original_max_position_embeddings": 128})
        inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        dim, seq_len = 128, None
    else:
        cfg = transformers.Phi3Config(
            hidden_size=128, num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
            max_position_embeddings=512, original_max_position_embeddings=64,
            partial_rotary_factor=0.5, rope_scaling={
                "rope_type": "longrope", "short_factor": [1 + 0.1 * i for i in range(16)],
                "long_factor": [2 + 0.5 * i for i in range(16)]})
        dim = 32
        seq_len = 500 if kind == "longrope-long" else None
        inv, att = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=seq_len)
    params = dict(cfg.rope_parameters)
    max_pos = cfg.max_position_embeddings if kind != "longrope-short" else 64
    cache = build_rope_cache(dim, max_pos, params.pop("rope_theta"), params)
    pos = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    want = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    if kind != "longrope-short":     # a 64-position model has factor 1: no attention factor
        want = want * att
    assert att > 1.0
    assert (cache - want).abs().max() <= 1e-6


PHI_3_5_MINI = {
    "architectures": ["Phi3ForCausalLM"], "bos_token_id": 1, "eos_token_id": 32000,
    "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
    "pad_token_id": 32000, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.08] * 48, "short_factor": [1.0] * 48,
                     "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32064}
PHI_4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "bos_token_id": 199999,
    "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3",
    "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096, "pad_token_id": 199999,
    "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0] * 48, "short_factor": [1.0] * 48,
                     "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "vocab_size": 200064}


def test_hub_configs_parse():
    p35 = DecoderConfig.from_hf(PHI_3_5_MINI)
    assert (p35.architecture, p35.head_dim, p35.rotary_dim) == ("phi3", 96, 96)
    assert p35.rope_scaling["rope_type"] == "longrope"
    assert p35.rope_scaling["original_max_position_embeddings"] == 4096
    assert p35.window_left(0) == 262143 and not p35.qkv_bias and not p35.tie_word_embeddings
    p4 = DecoderConfig.from_hf(PHI_4_MINI)
    assert (p4.head_dim, p4.rotary_dim, p4.num_kv_heads) == (128, 96, 8)
    assert p4.tie_word_embeddings and p4.partial_rotary_factor == 0.75
    # "su" is LongRoPE's first name
    su = DecoderConfig.from_hf({**PHI_3_5_MINI, "rope_scaling": {
        **PHI_3_5_MINI["rope_scaling"], "type": "su"}})
    assert su.rope_scaling["rope_type"] == "longrope"
    with pytest.raises(UnsupportedModelError, match="short_factor"):
        DecoderConfig.from_hf({**PHI_3_5_MINI, "rope_scaling": {"type": "longrope",
                                                                "long_factor": [1.0] * 48}})
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        DecoderConfig.from_hf({**PHI_4_MINI, "partial_rotary_factor": 0.01})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        DecoderConfig.from_hf({**PHI_3_5_MINI, "rope_scaling": {"type": "dynamic",
                                                                "factor": 2.0}})


def test_fused_tensor_errors_name_the_tensor(tmp_path):
    hf = make_hf_model("phi3-longrope-partial")
    d = save_hf(hf, str(tmp_path / "m"))
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    assert "model.layers.0.self_attn.qkv_proj.weight" in tensors   # fused, as Phi-3 ships
    bad = dict(tensors)
    bad["model.layers.1.mlp.gate_up_proj.weight"] = torch.zeros(200, 64)
    save_file(bad, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"gate_up_proj\.weight: shape mismatch.*256"):
        load_model(d, dtype="float32", device="cpu")
    d2 = str(tmp_path / "q")
    shutil.copytree(d, d2)
    q = dict(tensors)
    q["model.layers.0.self_attn.qkv_proj.qweight"] = torch.zeros(8, 128, dtype=torch.int32)
    save_file(q, os.path.join(d2, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"qkv_proj\.qweight.*fused"):
        load_model(d2, dtype="float32", device="cpu")


def test_engine_greedy_equals_the_plain_loop(phi3_long):
    _, path = phi3_long
    llm = LLM(path, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=64,
              block_size=4, max_num_batched_tokens=16)
    prompts = [_tokens(n, 30 + n) for n in (5, 19, 26)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7,
                                                ignore_eos=True), use_tqdm=False)
    model = load_model(path, dtype="float32", device="cpu")
    assert [o.outputs[0].token_ids for o in outs] == \
        generate_tokens(model, prompts, max_new_tokens=7, block_size=4)
