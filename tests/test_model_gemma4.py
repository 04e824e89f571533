"""Gemma 4's text decoder in the engine (the decoder itself against transformers:
tests/test_model_hf.py, cases "gemma4" and "gemma4-plain").

What is new to the engine: layers of different KV shapes (the full layers' wider head dim
and fewer kv heads) and layers that read an earlier layer's K / V instead of writing
their own. Proof: the pool's layout (the reading layers hold no cache; each reads its
source's pair and block table), the bytes a token takes, and greedy tokens and logprobs
equal to transformers' with the hybrid KV pools on and off, chunked prefill, prefix
hits and async scheduling."""
from __future__ import annotations

import pytest
import torch
from test_model_support import make_hf_model, random_tokens, save_hf

import minikernels as mk
from minikernels.models import load_model
from minikernels.models.kv_layout import plan_kv_layout

LENGTHS = [5, 23, 14, 3, 31]
PARAMS = mk.SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0, logprobs=0)


def _reference(kind: str, tmp_path_factory):
    """(checkpoint, prompts, transformers' greedy tokens, their logprobs)."""
    hf = make_hf_model(kind, seed=4)
    path = save_hf(hf, str(tmp_path_factory.mktemp(kind)))
    prompts = [random_tokens(n, hf.config.vocab_size, 90 + n) for n in LENGTHS]
    tokens, logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            full = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                               eos_token_id=[], pad_token_id=0)[0]
            lp = torch.log_softmax(hf(full[None]).logits[0].float(), -1)
            new = full[len(p):]
            tokens.append(new.tolist())
            logprobs.append(lp[len(p) - 1:-1].gather(1, new[:, None])[:, 0])
    return path, prompts, tokens, logprobs


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    return _reference("gemma4", tmp_path_factory)


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory):
    return _reference("gemma3n", tmp_path_factory)


def test_layout_and_pool_of_kv_reading_layers(gemma4):
    """Layers 4 / 5 read layers 2 / 3's K / V: their slot and group are their sources',
    their cache views are the sources' tensors, and a token's bytes count only the layers
    that write (sliding 2 x 16, full 1 x 32 per K and V)."""
    path = gemma4[0]
    model = load_model(path, dtype="float32", device="cpu")
    c = model.config
    assert c.kv_shared_from == [None, None, None, None, 2, 3]
    assert c.layer_head_dims == [16, 32] * 3 and c.layer_num_kv_heads == [2, 1] * 3
    assert c.layer_intermediate_sizes == [96] * 4 + [192] * 2
    lay = plan_kv_layout(c)
    assert lay.hybrid and lay.num_groups == 2
    for reader, source in ((4, 2), (5, 3)):
        assert (lay.layer_slot[reader], lay.layer_group[reader]) == \
            (lay.layer_slot[source], lay.layer_group[source])
    caches = model.allocate_kv_caches(10, 4, layout=lay)
    assert caches[4][0] is caches[2][0] and caches[5][1] is caches[3][1]
    assert caches[1][0].shape == (10, 4, 1, 32) and caches[0][0].shape == (10, 4, 2, 16)
    # one slot holds a sliding and a full layer: blocks sized for the wider of the two
    assert caches[0][0].untyped_storage().data_ptr() == caches[1][0].untyped_storage().data_ptr()
    # two slots, each a sliding (2 x 16) and a full (1 x 32) layer: 32 elements each
    assert model.kv_bytes_per_token(layout=lay) == 2 * 4 * (32 + 32)
    uniform = plan_kv_layout(c, hybrid=False)
    assert model.kv_bytes_per_token(layout=uniform) == 2 * 4 * (2 * 32 + 2 * 32)
    # fp8 caches: a reading layer dequantizes with its writer's scales (one tensor)
    assert model.layers[4].self_attn.attn.k_scale is model.layers[2].self_attn.attn.k_scale
    # a reading layer's K / V weights are not needed (and would be refused if required)
    assert model.layers[4].self_attn.k_norm is None
    assert len(model.layers[4].self_attn.qkv_proj.output_sizes) == 1
    assert len(model.layers[1].self_attn.qkv_proj.output_sizes) == 2        # K = V


@pytest.mark.parametrize("kw", [
    {"max_num_batched_tokens": 16, "max_num_seqs": 3},              # chunked, slots reused
    {"disable_hybrid_kv_cache_manager": True},
    {"async_scheduling": False, "block_size": 2},
], ids=["chunked", "one-table", "sync-block2"])
def test_engine_greedy_equals_transformers(gemma4, kw):
    path, prompts, want, want_lp = gemma4
    kw = {"block_size": 4, **kw}
    llm = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, **kw)
    assert (llm.llm_engine.kv_layout is None) == ("disable_hybrid_kv_cache_manager" in kw)
    outs = [o.outputs[0] for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
    llm.llm_engine.check_no_leaks()
    assert [c.token_ids for c in outs] == want
    for c, lp in zip(outs, want_lp):
        got = torch.tensor([d[t].logprob for t, d in zip(c.token_ids, c.logprobs)])
        assert (got - lp).abs().max() <= 1e-4


@pytest.mark.parametrize("kw", [{"max_num_batched_tokens": 16, "max_num_seqs": 3},
                                {"disable_hybrid_kv_cache_manager": True}],
                         ids=["chunked", "one-table"])
def test_gemma3n_engine_greedy_equals_transformers(gemma3n, kw):
    """Gemma 3n (AltUp streams, LAuReL, sparse MLP gates, K / V sharing) in the engine."""
    test_engine_greedy_equals_transformers(gemma3n, kw)


def test_prefix_hits_read_the_shared_kv(gemma4):
    """A request whose prefix hits the cache: the reading layers attend over the cached
    blocks their sources wrote for the earlier request."""
    path, prompts, _, _ = gemma4
    shared = random_tokens(24, 300, 5)
    batch = [shared + random_tokens(n, 300, 40 + n) for n in (3, 7)]
    cold = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                  enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in cold.generate(batch, PARAMS, use_tqdm=False)]
    llm = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4)
    got = [llm.generate([p], PARAMS, use_tqdm=False)[0] for p in batch]
    assert [o.outputs[0].token_ids for o in got] == want
    assert got[1].num_cached_tokens >= 20
    llm.llm_engine.check_no_leaks()


def test_gemma4_configs_and_refusals(tmp_path):
    import json

    from minikernels.models.config import DecoderConfig, UnsupportedModelError

    hf = make_hf_model("gemma4-plain")
    cfg = json.loads(hf.config.to_json_string())
    cfg["architectures"] = ["Gemma4ForCausalLM"]
    moe = DecoderConfig.from_hf({**cfg, "enable_moe_block": True, "num_experts": 4,
                                 "top_k_experts": 2, "moe_intermediate_size": 8})
    assert moe.moe_beside_mlp and moe.moe_router == "gemma4" and not moe.is_moe(0)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        DecoderConfig.from_hf({**cfg, "enable_moe_block": True, "num_experts": 4,
                               "top_k_experts": 5, "moe_intermediate_size": 8})
    with pytest.raises(UnsupportedModelError, match="num_kv_shared_layers"):
        DecoderConfig.from_hf({**cfg, "num_kv_shared_layers": 4})
    # the hub's spelling: global_head_dim / num_global_key_value_heads, no per_layer_config
    hub = {k: v for k, v in cfg.items() if k != "per_layer_config"}
    c = DecoderConfig.from_hf({**hub, "global_head_dim": 24, "num_global_key_value_heads": 1,
                               "attention_k_eq_v": True})
    assert c.layer_head_dims == [16, 16, 24, 24] and c.layer_num_kv_heads == [2, 2, 1, 1]
    assert c.k_eq_v_layers == [2, 3]
    # keys a config leaves out mean transformers' defaults (PLE of 256, its rope)
    sparse = {k: v for k, v in cfg.items()
              if k not in ("hidden_size_per_layer_input", "rope_parameters", "sliding_window")}
    d = DecoderConfig.from_hf(sparse)
    assert d.per_layer_input_size == 256 and d.sliding_window == 512
    assert d.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25}
    assert (d.rope_theta, d.sliding_rope_theta) == (1e6, 1e4)


def test_lora_adapters_per_layer_shapes(tmp_path):
    """PEFT adapters on every projection of Gemma 4: each layer's own shapes (the full
    layers' wider heads, the double-wide MLPs), no k / v adapters where a layer has no k /
    v projection; greedy tokens equal PEFT's."""
    from test_lora import make_adapter

    from minikernels.engine import LoRARequest

    hf = make_hf_model("gemma4", seed=6)
    base = save_hf(hf, str(tmp_path / "base"))
    path = str(tmp_path / "lora")
    ref = make_adapter(hf, path, r=4, alpha=8, seed=2, targets=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    llm = mk.LLM(base, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                 enable_lora=True, max_lora_rank=8)
    prompts = [random_tokens(n, 300, 60 + n) for n in (9, 6)]
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False,
                        lora_request=LoRARequest("a", 1, path))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = ref.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == want


def test_multimodal_checkpoint_serves_its_text_decoder(tmp_path):
    """Gemma4ForConditionalGeneration (text_config, model.language_model.* tensors) loads
    as its text decoder: transformers' logits for text prompts."""
    import transformers
    from test_model_support import BASE, CASES, randomize_, text_logits_err

    text = transformers.Gemma4TextConfig(**{**BASE, **CASES["gemma4"][1]})
    cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None,
                                    audio_config=None)
    torch.manual_seed(0)
    hf = randomize_(transformers.Gemma4ForConditionalGeneration(cfg).float().eval(), 3)
    path = save_hf(hf, str(tmp_path / "mm"))
    model = load_model(path, dtype="float32", device="cpu")
    assert model.config.per_layer_input_size == 8
    seqs = [random_tokens(n, 300, 30 + n) for n in (7, 12)]
    assert text_logits_err(model, hf, seqs) <= 1e-4


def test_triton_kernels_read_the_shaped_and_shared_caches(gemma4):
    """The engine on the Triton kernels (interpreter): the cache views of mixed-shape
    slots (block stride wider than the layer's block) and the reading layers' borrowed
    pairs give the reference backend's tokens and logprobs (chunked prefill, decode)."""
    path, prompts, _, _ = gemma4
    params = mk.SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0, logprobs=0)
    ref = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4)
    short = [prompts[0], prompts[3]]          # (5 and 3 tokens: the interpreter is slow)
    want = [o.outputs[0] for o in ref.generate(short, params, use_tqdm=False)]
    with mk.use_backend("triton"):
        llm = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                     max_num_batched_tokens=4)
        got = [o.outputs[0] for o in llm.generate(short, params, use_tqdm=False)]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for g, w in zip(got, want):
        assert max(abs(a[t].logprob - b[t].logprob)
                   for a, b, t in zip(g.logprobs, w.logprobs, g.token_ids)) <= 1e-4


def test_source_layers_fuse_qk_norm_and_rope(gemma4, monkeypatch):
    """Layers that write their own K / V run q / k norms and RoPE as one qk_norm_rope
    launch (k's norm on the raw k projection, which is also v's before v_norm); the
    greedy tokens still equal transformers'."""
    from minikernels.nn.layers import RotaryEmbedding

    path, prompts, want, _ = gemma4
    calls = []
    real = RotaryEmbedding.norm_and_rotate

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(RotaryEmbedding, "norm_and_rotate", counted)
    llm = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4)
    layers = llm.llm_engine.model.layers
    writers = sum(1 for layer in layers if layer.self_attn.kv_source is None)
    assert 0 < writers < len(layers)
    outs = llm.generate(prompts[:2], PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want[:2]
    assert calls and len(calls) % writers == 0
