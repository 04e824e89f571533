"""The decoder against transformers: tiny random models of every family (CASES in
tests/test_model_support.py: Llama, Qwen2 / 3, Mistral, Gemma 1-3, Granite, Phi-3,
SmolLM3, OLMo 2, GLM / GLM-4, and the mixtures of experts Qwen2-MoE, Qwen3-MoE, Mixtral,
Granite-MoE, OLMoE) saved with save_pretrained, loaded with minikernels.models.load_model (fp32, CPU
reference ops), must give transformers' logits (relative error <= 1e-4) on varlen batches through
every path of the forward contract, and the same greedy continuation."""
from __future__ import annotations

import pytest
import torch
from test_model_support import (CASES, hf_dirs, hf_logits, random_tokens, randomize_, rel_err,
                                run_schedule, text_logits_err)

from minikernels.models import AttentionMetadata, load_model
from minikernels.models.generate import generate_tokens

__all__ = ["hf_dirs"]  # the fixture, re-exported for pytest

TOL = 1e-4
KINDS = list(CASES)
LENGTHS = [7, 12, 3]


def _seqs(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    return [random_tokens(n, vocab, seed + i) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("kind", KINDS)
def test_cacheless_varlen_matches_transformers(hf_dirs, kind):
    hf, path = hf_dirs[kind]
    model = load_model(path, dtype="float32", device="cpu")
    seqs = _seqs(hf.config.vocab_size)
    ids = torch.tensor([t for s in seqs for t in s])
    logits = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), hf.config.vocab_size)
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(logits, ref) <= TOL

    # logits_indices: only the last row of each prompt.
    last = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs], last_only=True),
                 None)
    assert last.shape == (len(seqs), hf.config.vocab_size)
    assert rel_err(last, torch.stack([hf_logits(hf, s)[-1] for s in seqs])) <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_paged_prefill_decode_and_chunked_prefill(hf_dirs, kind):
    """Whole-prompt prefill, decode steps, chunked prefill and mixed decode+prefill steps
    over a paged cache with shuffled blocks give transformers' logits row for row."""
    hf, path = hf_dirs[kind]
    model = load_model(path, dtype="float32", device="cpu")
    seqs = _seqs(hf.config.vocab_size, lengths=[14, 19, 9], seed=10)
    refs = [hf_logits(hf, s) for s in seqs]
    plan = [
        [("p", 0, 11), ("p", 1, 5)],                  # a prompt and a first chunk
        [("d", 0), ("p", 1, 6), ("p", 2, 4)],          # mixed: a decode + chunks
        [("d", 0), ("p", 1, 8), ("p", 2, 3)],          # seq 1's prompt completes
        [("d", 0), ("d", 2)],                          # decode-only steps
        [("d", 2)],
    ]
    rows = run_schedule(model, seqs, plan, block_size=8)
    covered = sorted((i, p) for i, p, _ in rows)
    assert covered == [(i, p) for i, s in enumerate(seqs) for p in range(len(s))]
    got = torch.stack([r for _, _, r in rows])
    ref = torch.stack([refs[i][p] for i, p, _ in rows])
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("kind", ["llama3-rope-tied", "qwen2-tied", "qwen3", "mistral-window",
                                  "gemma2-window-softcap", "gemma3", "granite", "olmo2",
                                  "olmo3-window", "exaone4-hybrid", "qwen3-moe",
                                  "qwen2-moe", "mixtral",
                                  "granitemoe", "olmoe", "gpt_neox", "gpt2", "gpt_neo", "opt", "bloom",
                                  "gptj", "falcon-7b", "falcon-new", "mpt", "granite_swa", "lfm2", "qwen3_5", "granite4-h",
                                  "granite4-h-moe", "falcon_h1", "falcon_h1-norm", "nemotron_h",
                                  "qwen3_5_moe", "lfm2_moe", "bamba", "olmo_hybrid", "olmo_hybrid-rope",
                                  "jamba", "jamba-moe", "mamba", "falcon_mamba", "lfm3",
                                  "zamba2", "zamba2-plain", "exaone", "granitemoeshared",
                                  "gemma4", "gemma4-plain", "gemma4-moe", "gemma3n",
                                  "nemotron_h-moe", "nemotron_h-latent", "mamba2",
                                  "mamba2-tied", "zamba"])
def test_greedy_generation_matches_transformers(hf_dirs, kind):
    hf, path = hf_dirs[kind]
    model = load_model(path, dtype="float32", device="cpu")
    prompts = _seqs(hf.config.vocab_size, lengths=[5, 9], seed=3)
    eos = model.config.eos_token_ids
    ours = generate_tokens(model, prompts, max_new_tokens=10, eos_token_ids=eos, block_size=8)
    for p, out in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
        assert out == ref


def test_olmo3_config_and_hybrid_pools(hf_dirs):
    """OLMo 3: OLMo 2's flags, a sliding layer rotating with the plain base while the full
    layer takes YaRN, and (in the engine) hybrid KV pools."""
    import minikernels as mk

    _, path = hf_dirs["olmo3-window"]
    c = load_model(path, dtype="float32", device="cpu").config
    assert (c.architecture, c.qk_norm, c.qk_norm_full, c.post_norm) == \
        ("olmo3", True, True, True)
    assert [c.window_left(i) for i in range(2)] == [5, -1]
    assert c.sliding_rope_theta == c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "yarn"
    llm = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=64,
                 block_size=4)
    assert llm.llm_engine.kv_layout is not None
    # a hub config.json (4.x spelling: rope_theta + rope_scaling, for the full layers)
    hub = {"architectures": ["Olmo3ForCausalLM"], "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 4, "intermediate_size": 128,
           "vocab_size": 300, "rope_theta": 500000, "sliding_window": 4096,
           "max_position_embeddings": 65536,
           "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                            "original_max_position_embeddings": 8192},
           "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
    h = mk.models.DecoderConfig.from_hf(hub)
    assert h.sliding_window_layers == [0, 1, 2] and h.sliding_rope_theta == 500000.0
    assert h.rope_scaling["factor"] == 8.0 and h.rope_theta == 500000.0


def test_exaone4_config(hf_dirs):
    """EXAONE 4: post-norm, per-head q / k norms; hybrid models skip rope on the global
    layers (local / global from layer_types or the "LLLG" pattern), others rotate all."""
    import minikernels as mk

    _, path = hf_dirs["exaone4-hybrid"]
    c = load_model(path, dtype="float32", device="cpu").config
    assert (c.architecture, c.qk_norm, c.qk_norm_full, c.post_norm) == \
        ("exaone4", True, False, True)
    assert [c.window_left(i) for i in range(2)] == [5, -1] and c.nope_layers == [1]
    hub = {"architectures": ["Exaone4ForCausalLM"], "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 8, "intermediate_size": 128,
           "vocab_size": 300, "sliding_window": 4096, "sliding_window_pattern": "LLLG"}
    h = mk.models.DecoderConfig.from_hf(hub)
    assert h.sliding_window_layers == [0, 1, 2, 4, 5, 6] and h.nope_layers == [3, 7]
    plain = mk.models.DecoderConfig.from_hf({**hub, "sliding_window": None})
    assert plain.sliding_window is None and not plain.nope_layers


def test_granite4_configs():
    """Granite 4.0: the dense attention models load as Granite (rope or NoPE by
    position_embedding_type); the H models' Mamba-2 layers ("mamba" / "linear_attention")
    with their shapes; experts beside an ungated shared MLP; unknown layer types are
    refused by name."""
    import minikernels as mk
    from minikernels.models.config import UnsupportedModelError

    hub = {"architectures": ["GraniteMoeHybridForCausalLM"], "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 3, "intermediate_size": 512,
           "shared_intermediate_size": 96, "vocab_size": 300, "num_local_experts": 0,
           "layer_types": ["attention"] * 3, "position_embedding_type": "rope",
           "attention_multiplier": 0.1, "embedding_multiplier": 3.0}
    c = mk.models.DecoderConfig.from_hf(hub)
    assert (c.architecture, c.intermediate_size, c.softmax_scale) == \
        ("granite_hybrid", 96, 0.1) and not c.nope_layers
    assert mk.models.DecoderConfig.from_hf({**hub, "position_embedding_type": None}
                                           ).nope_layers == [0, 1, 2]
    h = mk.models.DecoderConfig.from_hf({**hub, "layer_types": [
        "mamba", "attention", "linear_attention"], "mamba_n_heads": 8, "mamba_d_state": 16,
        "mamba_n_groups": 2, "mamba_d_conv": 3, "time_step_limit": [0.0, 5.0]})
    assert h.layer_mixers == ["mamba2", "attention", "mamba2"] and h.is_recurrent
    assert (h.mamba_num_heads, h.mamba_head_dim, h.mamba_num_groups, h.mamba_state_size,
            h.conv_kernel, h.conv_bias, h.mamba_dt_limit) == (8, 16, 2, 16, 3, True,
                                                              (0.0, 5.0))
    with pytest.raises(UnsupportedModelError, match="layer types"):
        mk.models.DecoderConfig.from_hf({**hub, "layer_types": ["mamba", "moe", "attention"]})
    moe = mk.models.DecoderConfig.from_hf({**hub, "num_local_experts": 4,
                                           "num_experts_per_tok": 2})
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size,
            moe.shared_expert_intermediate_size, moe.shared_expert_gated,
            moe.norm_topk_prob, moe.moe_layers) == (4, 2, 512, 96, False, True, [0, 1, 2])


def test_chunked_generation_equals_whole_prefill(hf_dirs):
    hf, path = hf_dirs["qwen3"]
    model = load_model(path, dtype="float32", device="cpu")
    prompts = _seqs(hf.config.vocab_size, lengths=[13, 6], seed=5)
    whole = generate_tokens(model, prompts, max_new_tokens=6, block_size=8)
    chunked = generate_tokens(model, prompts, max_new_tokens=6, block_size=16, prefill_chunk=4)
    assert whole == chunked


def test_config_fields(hf_dirs):
    _, path = hf_dirs["llama3-rope-tied"]
    model = load_model(path, dtype="float32", device="cpu")
    c = model.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim) == ("llama", 300, 64, 2, 4, 2, 16)
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_theta == 500000.0
    assert c.tie_word_embeddings and c.eos_token_ids == [2] and c.bos_token_id == 1
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    _, qpath = hf_dirs["qwen2-window"]
    q = load_model(qpath, dtype="float32", device="cpu").config
    assert q.qkv_bias and not q.o_bias and q.sliding_window == 6
    assert [q.window_left(i) for i in range(2)] == [-1, 5]
    _, mpath = hf_dirs["mistral-window"]
    assert load_model(mpath, dtype="float32", device="cpu").config.window_left(0) == 5
    _, npath = hf_dirs["ministral-window"]
    n = load_model(npath, dtype="float32", device="cpu").config
    assert n.architecture == "ministral" and [n.window_left(i) for i in range(2)] == [-1, 5]


def test_kv_cache_api_and_sizes(hf_dirs):
    _, path = hf_dirs["qwen3"]
    model = load_model(path, dtype="float32", device="cpu")
    c = model.config
    assert model.kv_cache_shape(10, 16) == (10, 16, c.num_kv_heads, c.head_dim)
    caches = model.allocate_kv_caches(10, 16)
    assert len(caches) == c.num_layers
    assert caches[0][0].shape == (10, 16, 2, 32) and caches[0][0].dtype == torch.float32
    assert model.kv_bytes_per_token() == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    n_params = sum(p.numel() for p in model.parameters())
    assert model.weight_bytes() == n_params * 4
    assert model.allocate_kv_caches(4, 12)[0][0].shape[1] == 12   # any size in [1, 256]
    with pytest.raises(ValueError, match="block_size"):
        model.allocate_kv_caches(4, 257)
    fp8 = model.allocate_kv_caches(10, 16, dtype=torch.float8_e4m3fn)
    assert fp8[0][1].dtype == torch.float8_e4m3fn
    assert model.kv_bytes_per_token(torch.float8_e4m3fn) * 4 == model.kv_bytes_per_token()
    with pytest.raises(ValueError, match="KV cache dtype"):
        model.allocate_kv_caches(4, 16, dtype=torch.float16)


def test_forward_input_errors(hf_dirs):
    _, path = hf_dirs["llama"]
    model = load_model(path, dtype="float32", device="cpu")
    meta = AttentionMetadata.for_prompts([4])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 4, dtype=torch.int64), meta, None)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(5, dtype=torch.int64), meta, None)
    with pytest.raises(ValueError, match="one \\(k, v\\) pair per layer"):
        model(torch.zeros(4, dtype=torch.int64), meta, model.allocate_kv_caches(2, 8)[:1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(hf_dirs, dtype):
    hf, path = hf_dirs["qwen2-tied"]
    model = load_model(path, dtype=dtype, device="cpu")
    assert model.embed_tokens.weight.dtype == dtype and model.dtype == dtype
    seqs = _seqs(hf.config.vocab_size)
    ids = torch.tensor([t for s in seqs for t in s])
    logits = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    assert logits.dtype == torch.float32
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(logits, ref) <= (0.05 if dtype == torch.bfloat16 else 0.01)


def test_smollm3_nope_layers_from_the_config():
    """SmolLM3: ``no_rope_layers`` flags (1 = rope), else transformers' default of one NoPE
    layer every ``no_rope_layer_interval``; the NoPE layers get no rotary module."""
    from minikernels.models.config import DecoderConfig

    base = dict(architectures=["SmolLM3ForCausalLM"], hidden_size=64, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=300,
                num_hidden_layers=8)
    assert DecoderConfig.from_hf(base).nope_layers == [3, 7]
    assert DecoderConfig.from_hf({**base, "no_rope_layer_interval": 3}).nope_layers == [2, 5]
    flags = [1, 0, 1, 1, 1, 1, 1, 0]
    assert DecoderConfig.from_hf({**base, "no_rope_layers": flags}).nope_layers == [1, 7]
    with pytest.raises(ValueError, match="no_rope_layers"):
        DecoderConfig.from_hf({**base, "no_rope_layers": [1, 0]})
    assert DecoderConfig.from_hf({**base, "no_rope_layers": [1] * 8}).nope_layers is None


def test_olmo2_flags_and_tensor_parallel_norm_shards(hf_dirs):
    """OLMo 2: post-norm layers (no input_layernorm), q / k norms over all heads; under
    tensor parallel each rank keeps its heads' slice of the norm weights (the all-reduced
    norm itself: tests/test_tensor_parallel.py)."""
    from minikernels.models.parallel import TensorParallel

    _, path = hf_dirs["olmo2"]
    model = load_model(path, dtype="float32", device="cpu")
    c = model.config
    assert c.post_norm and c.qk_norm and c.qk_norm_full
    assert model.layers[0].input_layernorm is None
    assert model.layers[0].self_attn.q_norm.weight.shape == (c.num_heads * c.head_dim,)
    full_q = model.layers[0].self_attn.q_norm.weight
    full_k = model.layers[0].self_attn.k_norm.weight
    half_q, half_k = full_q.shape[0] // 2, full_k.shape[0] // 2
    for rank in range(2):
        attn = load_model(path, dtype="float32", device="cpu",
                          tensor_parallel=TensorParallel(rank, 2)).layers[0].self_attn
        assert torch.equal(attn.q_norm.weight, full_q[rank * half_q:(rank + 1) * half_q])
        assert torch.equal(attn.k_norm.weight, full_k[rank * half_k:(rank + 1) * half_k])


def test_qwen3_moe_layout_stacked_names_and_refusals(hf_dirs, tmp_path):
    """Qwen3-MoE: sparse layers from mlp_only_layers / decoder_sparse_step (num_experts or
    transformers 5's num_local_experts); transformers 5's stacked expert tensors load as
    the hub's per-expert ones do; RTN int4 quantizes the experts; LoRA slots skip the
    experts; a tensor_parallel_size that does not divide moe_intermediate_size is refused
    by name."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from minikernels.models import AttentionMetadata, CausalLM, DecoderConfig
    from minikernels.models.lora import LoRAManager
    from minikernels.models.moe import SparseMoE
    from minikernels.models.parallel import TensorParallel

    hf, path = hf_dirs["qwen3-moe"]
    model = load_model(path, dtype="float32", device="cpu")
    c = model.config
    assert (c.architecture, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.norm_topk_prob, c.moe_layers) == ("qwen3_moe", 6, 2, 48, True, [0])
    assert isinstance(model.layers[0].mlp, SparseMoE)
    assert not isinstance(model.layers[1].mlp, SparseMoE)
    base = json.load(open(f"{path}/config.json"))
    every_2nd = {**base, "num_hidden_layers": 4, "mlp_only_layers": [],
                 "decoder_sparse_step": 2}
    every_2nd.pop("num_local_experts", None)
    every_2nd["num_experts"] = 6
    assert DecoderConfig.from_hf(every_2nd).moe_layers == [1, 3]
    # transformers 5's stacked names: experts.gate_up_proj [E, 2I, H], experts.down_proj
    stacked = str(tmp_path / "stacked")
    shutil.copytree(path, stacked)
    tensors = load_file(f"{stacked}/model.safetensors")
    pre = "model.layers.0.mlp.experts."
    for proj, parts in (("gate_up_proj", ("gate_proj", "up_proj")),
                        ("down_proj", ("down_proj",))):
        tensors[pre + proj] = torch.stack([torch.cat([tensors.pop(f"{pre}{e}.{p}.weight")
                                                      for p in parts]) for e in range(6)])
    save_file(tensors, f"{stacked}/model.safetensors", metadata={"format": "pt"})
    seqs = _seqs(300, lengths=[7, 4], seed=9)
    again = load_model(stacked, dtype="float32", device="cpu")
    meta_ids = torch.tensor([t for s in seqs for t in s])
    meta = AttentionMetadata.for_prompts([len(s) for s in seqs], device="cpu")
    assert torch.equal(again(meta_ids, meta, None), model(meta_ids, meta, None))
    rtn = load_model(path, dtype="float32", device="cpu", quantization="int4")
    assert len(rtn.layers[0].self_attn.qkv_proj.int4_parts) > 0
    assert rtn.layers[0].mlp.experts.is_int4
    assert bool(torch.isfinite(rtn(meta_ids, meta, None)).all())
    odd = DecoderConfig.from_hf({**base, "moe_intermediate_size": 50})   # 4 ranks: 12.5
    with pytest.raises(ValueError, match=r"must divide moe_intermediate_size \(50\)"):
        CausalLM(odd, dtype=torch.float32, device="meta", tp=TensorParallel(0, 4))
    # LoRA slots on every attention projection and the dense layer's MLP, not the experts
    lora = LoRAManager(model, max_loras=1, max_lora_rank=8)
    assert "layers.0.self_attn.qkv_proj" in lora._layers
    assert "layers.1.mlp.gate_up_proj" in lora._layers
    assert "layers.0.mlp.gate_up_proj" not in lora._layers
    # an int4 checkpoint whose experts were left dense (modules_to_not_convert): they load
    # dense, as a dense linear of such a checkpoint does
    gptq = str(tmp_path / "gptq")
    shutil.copytree(path, gptq)
    json.dump({**base, "quantization_config": {"quant_method": "gptq", "bits": 4,
                                                "group_size": 32}},
              open(f"{gptq}/config.json", "w"))
    left = load_model(gptq, dtype="float32", device="cpu")
    assert not left.layers[0].mlp.experts.is_int4
    assert torch.equal(left(meta_ids, meta, None), model(meta_ids, meta, None))


@pytest.mark.parametrize(("kind", "group"), [("qwen3-moe", -1), ("qwen2-moe", 32),
                                             ("granitemoe", -1)])
def test_moe_int4_experts(hf_dirs, tmp_path, kind, group):
    """quantization="int4" (RTN on load) makes the experts int4 too, streamed expert by
    expert (hub per-expert names; Granite-MoE's stacked tensors): each expert's
    dequantized weights equal quantize_int4 of its dense projection (one group size for
    H and I: 32 where it divides both, else one group per row), and the layer's output
    equals the dense experts' on those dequantized weights (the int4 op rounds fp32
    activations to fp16 first); greedy generation runs."""
    from minikernels.models.moe import SparseMoE
    from minikernels.quant import quantize_int4

    _, path = hf_dirs[kind]
    dense = load_model(path, dtype="float32", device="cpu")
    q = load_model(path, dtype="float32", device="cpu", quantization="int4", group_size=32)
    ex, ref = q.layers[0].mlp.experts, dense.layers[0].mlp.experts
    assert ex.is_int4 and ex.w13 is None and ex.group_size == group
    w13, w2 = ex.dequantized()
    for e in range(ex.num_experts):
        assert torch.equal(w13[e], quantize_int4(ref.w13[e], group).dequantize())
        assert torch.equal(w2[e], quantize_int4(ref.w2[e], group).dequantize())
    layer = q.layers[0].mlp
    twin = SparseMoE(dense.config, torch.float32, "cpu")
    twin.load_state_dict(dense.layers[0].mlp.state_dict())
    with torch.no_grad():
        twin.experts.w13.copy_(w13)
        twin.experts.w2.copy_(w2)
        if layer.shared_expert is not None:   # int4 too: compare the experts alone
            layer.shared_expert = twin.shared_expert = None
        x = torch.randn(11, dense.config.hidden_size, generator=torch.Generator().manual_seed(3))
        want = twin(x.half().float())
        assert rel_err(layer(x), want) <= 2e-3
    out = generate_tokens(q, _seqs(300, lengths=[5], seed=4), max_new_tokens=4, block_size=8)
    assert len(out[0]) == 4


@pytest.mark.parametrize(("method", "group"), [("gptq", 16), ("awq", 16),
                                               ("compressed-tensors", -1)])
def test_moe_int4_checkpoints(tmp_path, method, group):
    """GPTQ / AWQ / compressed-tensors MoE checkpoints (the hub's per-expert qweight /
    qzeros / scales, as Qwen3-30B-A3B-GPTQ-Int4) load onto the int4 experts losslessly:
    each expert's dequantized weights equal the known integers' W, and logits match
    transformers running those dequantized weights (activations rounded to fp16 for the
    int4 ops); under tensor parallel each rank's experts are the TP=1 experts' slices.
    Act-order experts and K slices off group boundaries are refused by name."""
    from test_model_support import make_hf_model, write_quantized_checkpoint

    from minikernels.models.loader import CheckpointError
    from minikernels.models.parallel import TensorParallel

    hf = make_hf_model("qwen3-moe", moe_intermediate_size=32)
    dense = write_quantized_checkpoint(hf, str(tmp_path / "q"), method, group=group)
    model = load_model(str(tmp_path / "q"), dtype="float32", device="cpu")
    ex = model.layers[0].mlp.experts
    assert ex.is_int4 and ex.group_size == group
    w13, w2 = ex.dequantized()
    assert torch.equal(w13, dense["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(w2, dense["model.layers.0.mlp.experts.down_proj"])
    seqs = _seqs(300, lengths=[9, 4], seed=2)
    ids = torch.tensor([t for s in seqs for t in s])
    got = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    want = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(got, want) <= 0.02
    # tensor parallel: each rank reads its intermediate slice of every expert (gate / up
    # output rows, down K at group boundaries), exactly the TP=1 experts' slices
    i = hf.config.moe_intermediate_size
    for rank in range(2):
        part = load_model(str(tmp_path / "q"), dtype="float32", device="cpu",
                          tensor_parallel=TensorParallel(rank, 2)).layers[0].mlp.experts
        assert part.is_int4 and part.inter == i // 2
        p13, p2 = part.dequantized()
        half, up = slice(rank * i // 2, (rank + 1) * i // 2), slice(i + rank * i // 2,
                                                                    i + (rank + 1) * i // 2)
        assert torch.equal(p13, torch.cat([w13[:, half], w13[:, up]], dim=1))
        assert torch.equal(p2, w2[:, :, half])
    if group > 0:       # 4 ranks: K slices of 8 in groups of 16 (per-channel: any slice)
        with pytest.raises(CheckpointError, match="group boundaries"):
            load_model(str(tmp_path / "q"), dtype="float32", device="cpu",
                       tensor_parallel=TensorParallel(0, 4))
    if method == "gptq":
        write_quantized_checkpoint(make_hf_model("qwen3-moe", moe_intermediate_size=32),
                                   str(tmp_path / "act"), "gptq", group=16, act_order=True)
        with pytest.raises(CheckpointError, match="act-order"):
            load_model(str(tmp_path / "act"), dtype="float32", device="cpu")


def test_mistral3_multimodal_checkpoint_serves_its_ministral3_text_decoder(tmp_path):
    """A Mistral3ForConditionalGeneration checkpoint (Pixtral tower + projector +
    Ministral 3 text decoder): text prompts give transformers' logits; the vision
    tensors are not read."""
    import transformers
    from test_model_support import BASE, CASES

    _, text = CASES["ministral3-yarn"]
    text_config = transformers.Ministral3Config(**{**BASE, **text})
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              image_size=28, patch_size=14, head_dim=16)
    cfg = transformers.Mistral3Config(text_config=text_config, vision_config=vision,
                                      image_token_index=299)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = randomize_(transformers.Mistral3ForConditionalGeneration(cfg).float().eval(), 1)
    hf.save_pretrained(str(tmp_path))
    model = load_model(str(tmp_path), dtype="float32", device="cpu")
    c = model.config
    assert (c.architecture, c.hf_architecture) == ("ministral3",
                                                   "Mistral3ForConditionalGeneration")
    assert (c.llama4_scaling_beta, c.llama4_scaling_length) == (0.5, 8)
    assert text_logits_err(model, hf, [random_tokens(n, 290, 70 + n) for n in (21, 9)]) \
        <= 1e-4


@pytest.mark.parametrize("kind", ["qwen3_vl", "qwen2_5_vl", "qwen2_5_vl_flat"])
def test_qwen_vl_checkpoints_serve_their_text_decoder(tmp_path, kind):
    """Qwen3-VL / Qwen2.5-VL (nested text_config, or 4.x's flat config with visual.*
    tensors): text prompts give transformers' logits (M-RoPE with one position on every
    axis is plain rope); the vision tower is not read."""
    import json

    import transformers
    from safetensors.torch import load_file, save_file

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": [4, 2, 2]})
    if kind == "qwen3_vl":
        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, patch_size=14, deepstack_visual_indexes=[0])
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                         image_token_id=299, video_token_id=298,
                                         vision_start_token_id=297, vision_end_token_id=296)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, patch_size=14, fullatt_block_indexes=[0])
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                            image_token_id=299, video_token_id=298,
                                            vision_start_token_id=297,
                                            vision_end_token_id=296)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    hf = randomize_(cls(cfg).float().eval(), 1)
    hf.save_pretrained(str(tmp_path))
    if kind == "qwen2_5_vl_flat":      # the 4.x hub layout: text fields and tensors flat
        c = json.loads((tmp_path / "config.json").read_text())
        flat = {**{k: v for k, v in c.items() if k != "text_config"}, **c["text_config"],
                "model_type": "qwen2_5_vl",
                "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}}
        flat.pop("rope_parameters", None)
        flat["rope_theta"] = 1e6
        (tmp_path / "config.json").write_text(json.dumps(flat))
        path = next(tmp_path.glob("*.safetensors"))
        tensors = load_file(str(path))
        renamed = {k.replace("model.language_model.", "model.").replace("model.visual.",
                                                                        "visual."): v
                   for k, v in tensors.items()}
        save_file(renamed, str(path), metadata={"format": "pt"})
    model = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert model.config.architecture == ("qwen3" if kind == "qwen3_vl" else "qwen2")
    assert text_logits_err(model, hf, [random_tokens(n, 290, 80 + n) for n in (17, 6)]) \
        <= 1e-4


def test_gpt_neox_hub_checkpoint_spelling(hf_dirs, tmp_path):
    """A Pythia checkpoint as the hub stores it: transformers 4.x's config spelling
    (rotary_pct, rotary_emb_base, no rope_parameters) and the causal-mask buffers
    (attention.bias / masked_bias) older exports carry; same logits as transformers."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    hf, path = hf_dirs["gpt_neox"]
    d = tmp_path / "pythia"
    shutil.copytree(path, d)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(d / "model.safetensors"))
    for i in range(hf.config.num_hidden_layers):
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8).bool().tril()
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(str(d), dtype="float32", device="cpu")
    c = model.config
    assert (c.architecture, c.rotary_dim, c.norm_type, c.parallel_residual,
            c.parallel_mlp_norm, c.mlp_gated) == ("gpt_neox", 8, "layer", True, True, False)
    seq = random_tokens(11, hf.config.vocab_size, 5)
    logits = model(torch.tensor(seq), AttentionMetadata.for_prompts([len(seq)]), None)
    assert rel_err(logits, hf_logits(hf, seq)) <= TOL


@pytest.mark.parametrize(("kind", "rename"), [
    # the hub's gpt2 / distilgpt2: GPT2Model's names (no "transformer."), causal-mask buffers
    ("gpt2", lambda n: n[len("transformer."):] if n.startswith("transformer.") else n),
    # the hub's facebook/opt-*: OPTModel's names ("decoder.", no "model.")
    ("opt", lambda n: n[len("model."):] if n.startswith("model.") else n),
    # the hub's bigscience/bloom-*: BloomModel's names (no "transformer.")
    ("bloom", lambda n: n[len("transformer."):] if n.startswith("transformer.") else n),
])
def test_no_rope_models_hub_spelling(hf_dirs, tmp_path, kind, rename):
    import shutil

    from safetensors.torch import load_file, save_file

    hf, path = hf_dirs[kind]
    d = tmp_path / kind
    shutil.copytree(path, d)
    tensors = {rename(k): v for k, v in load_file(str(d / "model.safetensors")).items()}
    if kind == "gpt2":
        for i in range(hf.config.num_hidden_layers):
            tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
            tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(str(d), dtype="float32", device="cpu")
    c = model.config
    assert c.nope_layers == [0, 1] and c.tie_word_embeddings
    if kind == "bloom":
        assert c.position_embedding == "alibi" and model.embed_norm is not None
    else:
        assert c.position_embedding == "learned" and c.position_offset == (2 if kind == "opt"
                                                                           else 0)
        assert model.embed_positions.weight.shape[0] == \
            c.max_position_embeddings + c.position_offset
    seq = random_tokens(11, hf.config.vocab_size, 6)
    logits = model(torch.tensor(seq), AttentionMetadata.for_prompts([len(seq)]), None)
    assert rel_err(logits, hf_logits(hf, seq)) <= TOL


def test_learned_position_models_refuse_what_they_lack():
    """Variants of GPT-2 / OPT this decoder does not have are refused by name."""
    from minikernels.models.config import DecoderConfig, UnsupportedModelError

    gpt2 = dict(architectures=["GPT2LMHeadModel"], vocab_size=300, n_embd=64, n_layer=2,
                n_head=4, n_positions=64)
    assert DecoderConfig.from_hf(gpt2).intermediate_size == 256        # 4 * n_embd
    assert DecoderConfig.from_hf({**gpt2, "scale_attn_weights": False}).softmax_scale == 1.0
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        DecoderConfig.from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})
    opt = dict(architectures=["OPTForCausalLM"], vocab_size=300, hidden_size=64,
               num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
               max_position_embeddings=64, word_embed_proj_dim=64)
    c = DecoderConfig.from_hf(opt)
    assert (c.activation, c.mlp_gated, c.num_kv_heads) == ("relu", False, 4)
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before"):
        DecoderConfig.from_hf({**opt, "do_layer_norm_before": False})        # opt-350m
    with pytest.raises(UnsupportedModelError, match="word_embed_proj_dim"):
        DecoderConfig.from_hf({**opt, "word_embed_proj_dim": 32})
    neo = dict(architectures=["GPTNeoForCausalLM"], vocab_size=300, hidden_size=64,
               num_layers=4, num_heads=4, max_position_embeddings=64, window_size=32,
               attention_types=[[["global", "local"], 2]])      # the hub's compact form
    c = DecoderConfig.from_hf(neo)
    assert (c.sliding_window, c.sliding_window_layers, c.softmax_scale, c.qkv_bias,
            c.o_bias, c.intermediate_size) == (32, [1, 3], 1.0, False, True, 256)
    with pytest.raises(UnsupportedModelError, match="only global / local"):
        DecoderConfig.from_hf({**neo, "attention_types": [[["global", "sparse"], 2]]})
    # the hub's older spellings: mosaicml's MPTForCausalLM, tiiuae's RWForCausalLM
    assert DecoderConfig.from_hf(dict(architectures=["MPTForCausalLM"], vocab_size=300,
                                      d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                      attn_config={"alibi": True})).architecture == "mpt"
    rw = DecoderConfig.from_hf(dict(architectures=["RWForCausalLM"], vocab_size=300,
                                    hidden_size=64, n_head=4, n_layer=2, multi_query=True,
                                    parallel_attn=True, bias=False))
    assert (rw.architecture, rw.num_heads, rw.num_kv_heads, rw.num_layers) == \
        ("falcon", 4, 1, 2)
    with pytest.raises(UnsupportedModelError, match="alibi"):
        DecoderConfig.from_hf(dict(architectures=["FalconForCausalLM"], vocab_size=300,
                                   hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, alibi=True))
    with pytest.raises(UnsupportedModelError, match="ReLU-gated"):
        DecoderConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=300,
                                   hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   hidden_act="relu"))


def test_alibi_slopes_equal_transformers():
    """ALiBi slopes for every head count up to 128 (powers of two and the extra odd powers
    beyond them) equal BLOOM's in transformers, bit for bit."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from minikernels.nn.layers import alibi_slopes

    for n in range(1, 129):
        assert torch.equal(alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu"))), n
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


def test_mpt_alibi_slopes_equal_transformers():
    """MPT's slopes (the next power of two's, odd then even for other head counts) equal
    transformers' build_mpt_alibi_tensor bit for bit at alibi_bias_max 8 (transformers
    always uses 8; the decoder follows the config's alibi_bias_max, as MPT's own code)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from minikernels.models.config import DecoderConfig, UnsupportedModelError
    from minikernels.nn.layers import mpt_alibi_slopes

    for n in range(1, 129):
        ref = -build_mpt_alibi_tensor(n, 2)[:, 0, 0]          # slope x (0 - 1)
        assert torch.equal(mpt_alibi_slopes(n), ref.float()), n
    assert torch.allclose(mpt_alibi_slopes(4, 16.0), torch.tensor([1 / 16, 1 / 256,
                                                                   2.0 ** -12, 2.0 ** -16]))
    mpt = dict(architectures=["MptForCausalLM"], vocab_size=300, d_model=64, n_heads=4,
               n_layers=2, max_seq_len=64, attn_config={"alibi_bias_max": 16})
    c = DecoderConfig.from_hf(mpt)
    assert (c.alibi_max_bias, c.intermediate_size, c.norm_bias, c.qkv_bias) == \
        (16.0, 256, False, False)
    for bad, match in ((dict(attn_config={"clip_qkv": 6}), "clip_qkv"),
                       (dict(attn_config={"qk_ln": True}), "qk_ln"),
                       (dict(no_bias=False), "no_bias")):
        with pytest.raises(UnsupportedModelError, match=match):
            DecoderConfig.from_hf({**mpt, **bad})


def test_rotary_fraction_gives_rotary_dim_exactly():
    """GPT-J's rotary_dim as a partial_rotary_factor: int(head_dim * factor) is rotary_dim
    for every even rotary_dim of every head_dim up to 256 (rotary_dim / head_dim alone
    rounds below for some: 30 / 44 * 44 = 29.99...)."""
    from minikernels.models.config import UnsupportedModelError, _rotary_fraction

    for d in range(2, 257):
        for r in range(2, d + 1, 2):
            assert int(d * _rotary_fraction(r, d)) == r, (r, d)
    with pytest.raises(UnsupportedModelError, match="rotary_dim"):
        _rotary_fraction(80, 64)


def test_qwen3_5_multimodal_checkpoint_serves_its_hybrid_text_decoder(tmp_path):
    """Qwen3.5 as the hub publishes it (Qwen3_5ForConditionalGeneration: text_config,
    model.language_model.* tensors, a vision tower, and the multi-token-prediction head's
    mtp.* tensors, which are not served): text prompts give transformers' logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    _, extra = CASES["qwen3_5"]
    text = {**dict(vocab_size=300, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rms_norm_eps=1e-5), **extra}
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2, 1, 1],
                               "mrope_interleaved": True}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=14)
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision,
                                     image_token_id=299, video_token_id=298,
                                     vision_start_token_id=297, vision_end_token_id=296)
    torch.manual_seed(0)
    hf = randomize_(transformers.Qwen3_5ForConditionalGeneration(cfg).float().eval(), 1)
    hf.save_pretrained(str(tmp_path))
    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(path))
    assert any(k.startswith("model.visual.") for k in tensors)
    tensors["mtp.fc.weight"] = torch.zeros(64, 128)
    tensors["mtp.layers.0.mlp.gate_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert model.config.architecture == "qwen3_5" and model.config.layer_mixers == [
        "gated_deltanet", "attention", "gated_deltanet"]
    assert text_logits_err(model, hf, [random_tokens(n, 290, 80 + n) for n in (17, 6)]) \
        <= 1e-4


def test_nemotron_h_hub_pattern_and_refusals():
    """Nemotron-H's hub spelling (hybrid_override_pattern, mamba_* aliases, attention_head_dim):
    one layer per block; Nemotron 3's expert blocks; unknown block letters refused."""
    import minikernels as mk
    from minikernels.models.config import UnsupportedModelError

    hub = {"architectures": ["NemotronHForCausalLM"], "hidden_size": 64, "vocab_size": 300,
           "num_attention_heads": 4, "num_key_value_heads": 2, "attention_head_dim": 16,
           "intermediate_size": 96, "num_hidden_layers": 4, "hybrid_override_pattern": "M-*-",
           "mamba_num_heads": 8, "mamba_head_dim": 16, "mamba_n_groups": 2,
           "ssm_state_size": 12, "mamba_d_conv": 3, "mlp_hidden_act": "relu2",
           "time_step_min": 0.002}
    c = mk.models.DecoderConfig.from_hf(hub)
    assert c.layer_mixers == ["mamba2", "none", "attention", "none"]
    assert c.layer_mlps == [False, True, False, True] and c.head_dim == 16
    assert (c.mamba_num_groups, c.conv_kernel, c.mamba_dt_limit[0], c.activation) == \
        (2, 3, 0.002, "relu2") and c.nope_layers == [0, 1, 2, 3]
    # Nemotron 3: "E" blocks are expert blocks (an MLP of experts, no mixer)
    moe = mk.models.DecoderConfig.from_hf({**hub, "hybrid_override_pattern": "M-*E",
                                           "n_routed_experts": 8, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 16, "n_group": 2,
                                           "topk_group": 1})
    assert moe.layer_mixers[3] == "none" and moe.layer_mlps[3] and moe.moe_layers == [3]
    assert (moe.moe_router, moe.moe_gated_experts, moe.moe_num_groups) == \
        ("group_sigmoid", False, 2)
    with pytest.raises(ValueError, match="moe_num_groups"):
        mk.models.DecoderConfig.from_hf({**hub, "hybrid_override_pattern": "M-*E",
                                         "n_routed_experts": 8, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 16, "n_group": 3})
    with pytest.raises(UnsupportedModelError, match="block types"):
        mk.models.DecoderConfig.from_hf({**hub, "hybrid_override_pattern": "M-*X"})


def test_zamba2_shared_blocks_must_be_equal_copies(tmp_path):
    """Zamba2's hybrid layers call their shared blocks in turn: a checkpoint holding two
    different copies of one block (transformers 5 leaves them untied in memory when
    tie_word_embeddings is False) is refused by name rather than loaded half-shared."""
    from test_model_support import make_hf_model, save_hf

    from minikernels.models.loader import CheckpointError

    hf = make_hf_model("zamba2-plain", tie_word_embeddings=False)
    path = save_hf(hf, str(tmp_path / "untied"))
    with pytest.raises(CheckpointError, match="copy of the same shared block"):
        load_model(path, dtype="float32", device="cpu")


def test_exaone3_hub_config_and_names(hf_dirs, tmp_path):
    """EXAONE 3.x as the hub ships it: architectures ExaoneForCausalLM, num_layers /
    layer_norm_epsilon / activation_function / rope_theta keys, GPT-2-style tensor names
    (what transformers also writes): the same logits as the transformers model."""
    import json
    import shutil

    import minikernels as mk

    hf, path = hf_dirs["exaone"]
    hub = str(tmp_path / "hub")
    shutil.copytree(path, hub)
    with open(f"{hub}/config.json") as fh:
        cfg = json.load(fh)
    rope = cfg.pop("rope_parameters")
    cfg.update(architectures=["ExaoneForCausalLM"], num_layers=cfg.pop("num_hidden_layers"),
               layer_norm_epsilon=cfg.pop("rms_norm_eps"),
               activation_function=cfg.pop("hidden_act"), rope_theta=rope.pop("rope_theta"),
               rope_scaling=rope)
    with open(f"{hub}/config.json", "w") as fh:
        json.dump(cfg, fh)
    model = load_model(hub, dtype="float32", device="cpu")
    c = model.config
    assert (c.architecture, c.num_layers, c.rope_theta) == ("exaone", 2, 1e6)
    assert c.rope_scaling["rope_type"] == "llama3"
    assert mk.models.DecoderConfig.from_hf({k: v for k, v in cfg.items()
                                            if k != "rope_theta"}).rope_theta == 5e5
    seqs = [random_tokens(n, 300, 70 + n) for n in (6, 11)]
    assert text_logits_err(model, hf, seqs) <= TOL


def test_mamba2_hub_config_attention_free_and_refusals(hf_dirs):
    """Mamba-2: a Mamba-Codestral-style config.json (norm_before_gate / rms_norm /
    residual_in_fp32 keys, an infinite time_step_limit) maps onto the Mamba-2 mixer with
    its norm after the gate; the model allocates no KV cache, only two state tensors per
    layer; shapes and options it cannot run are refused naming the field."""
    import minikernels as mk
    from minikernels.models.config import ATTENTION_FREE_MAX_LEN, UnsupportedModelError

    hub = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 64,
           "vocab_size": 300, "num_hidden_layers": 3, "num_heads": 4, "head_dim": 32,
           "expand": 2, "n_groups": 2, "state_size": 16, "conv_kernel": 4, "chunk_size": 256,
           "norm_before_gate": True, "rms_norm": True, "residual_in_fp32": True,
           "time_step_limit": [0.0, float("inf")], "use_bias": False, "use_conv_bias": True,
           "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "eos_token_id": 0}
    c = mk.models.DecoderConfig.from_hf(hub)
    assert c.architecture == "mamba2" and c.layer_mixers == ["mamba2"] * 3
    assert not any(c.has_attention(i) or c.has_mlp(i) for i in range(3))
    assert (c.mamba_num_heads, c.mamba_head_dim, c.mamba_num_groups, c.mamba_state_size,
            c.conv_kernel, c.conv_bias, c.mamba_proj_bias, c.mamba_dt_limit) == \
        (4, 32, 2, 16, 4, True, False, (0.0, float("inf")))
    assert c.mamba_rms_norm and not c.mamba_norm_before_gate and c.rms_norm_eps == 1e-5
    assert c.max_position_embeddings == ATTENTION_FREE_MAX_LEN and not c.tie_word_embeddings
    # (by model_type alone, with transformers' defaults)
    assert mk.models.DecoderConfig.from_hf({k: v for k, v in hub.items()
                                            if k != "architectures"}).architecture == "mamba2"
    for bad, match in (({"head_dim": 16}, r"num_heads \(4\) x head_dim \(16\)"),
                       ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"rms_norm": False}, "rms_norm"),
                       ({"time_step_limit": [0.0]}, "time_step_limit")):
        with pytest.raises((ValueError, UnsupportedModelError), match=match):
            mk.models.DecoderConfig.from_hf({**hub, **bad})

    hf, path = hf_dirs["mamba2"]
    model = load_model(path, dtype="float32", device="cpu")
    assert model.kv_bytes_per_token() == 0
    caches = model.allocate_kv_caches(4, 8, num_state_slots=3)
    inner, conv_dim = 8 * 16, 8 * 16 + 2 * 2 * 12
    assert [[tuple(t.shape) for t in entry] for entry in caches] == \
        [[(3, conv_dim, 3), (3, 8, 16, 12)]] * 2
    assert model.state_bytes_per_slot() == 2 * 4 * (conv_dim * 3 + inner * 12)


def test_zamba_hub_config_and_refusals(hf_dirs, tmp_path):
    """Zamba (v1): transformers' default layer pattern when a config.json names none
    (checked against ZambaConfig's own), its defaults for omitted keys, the shared block's
    shapes and softmax scale; attention_hidden_size other than 2 H, a non-SiLU Mamba
    activation and unknown layer kinds refused by name; a checkpoint
    without a per-head projection names the missing tensor."""
    import json
    import shutil

    import transformers

    import minikernels as mk
    from minikernels.models.config import UnsupportedModelError
    from minikernels.models.loader import CheckpointError

    hub = {"architectures": ["ZambaForCausalLM"], "hidden_size": 64, "vocab_size": 300,
           "num_hidden_layers": 12, "intermediate_size": 128, "mamba_dt_rank": "auto",
           "attn_layer_period": 4, "attn_layer_offset": 2}
    c = mk.models.DecoderConfig.from_hf(hub)
    theirs = transformers.ZambaConfig(**{k: v for k, v in hub.items() if k != "architectures"})
    assert c.layer_mixers == ["zamba_hybrid" if k == "hybrid" else "mamba"
                              for k in theirs.layers_block_type]
    assert c.layer_mixers.count("zamba_hybrid") == 3 and c.zamba_mamba == "mamba"
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.mamba1_num_heads, c.mamba_inner_size,
            c.mamba_dt_rank, c.mamba_state_size, c.conv_kernel, c.activation) == \
        (16, 16, 8, 2, 128, 4, 16, 4, "gelu")
    assert c.softmax_scale == 0.5 and c.nope_layers == list(range(12))
    assert c.tie_word_embeddings and c.zamba_adapter_rank == 0 and c.zamba_shared_blocks == 1
    for bad, match in (({"attention_hidden_size": 96}, "attention_hidden_size"),
                       ({"hidden_mamba_act": "gelu"}, "hidden_mamba_act"),
                       ({"layers_block_type": ["mamba"] * 11 + ["moe"]}, "layer types"),
                       ({"n_mamba_heads": 3}, "mamba1_num_heads")):
        with pytest.raises((ValueError, UnsupportedModelError), match=match):
            mk.models.DecoderConfig.from_hf({**hub, **bad})

    _, path = hf_dirs["zamba"]      # (tensor parallel: tests/test_tensor_parallel_hybrid.py)
    broken = str(tmp_path / "broken")
    shutil.copytree(path, broken)
    from safetensors.torch import load_file, save_file
    tensors = load_file(f"{broken}/model.safetensors")
    del tensors["model.layers.2.mamba.x_proj_weight"]
    save_file(tensors, f"{broken}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mamba\.x_proj_weight"):
        load_model(broken, dtype="float32", device="cpu")
    with open(f"{path}/config.json") as fh:
        assert json.load(fh)["layers_block_type"][1] == "hybrid"
