"""GPT-OSS (``GptOssForCausalLM``) against transformers: a tiny random model (4 layers
alternating sliding (window 4, so windows matter on short prompts) / full attention, GQA
4 / 2 heads of 16, q / k / v / o biases, a learned sink per head, YaRN, 8 biased experts
top-2 behind a biased router, the clamped SwiGLU with a limit of 0.5 so the clamps bite)
saved with save_pretrained and loaded by minikernels.models.load_model (fp32, CPU).

Checked: cache-less varlen logits, paged prefill + decode + chunked prefill over shuffled
blocks, greedy generation (the plain loop and ``LLM.generate`` with its hybrid KV pools,
chunked prefill, prefix caching) equal transformers'; the config reader (transformers'
defaults for what a hub config.json omits; refusals by field); MXFP4 checkpoints (the
official format) built from exactly representable weights load to the same model as the
dense checkpoint: kept native MXFP4 by default (uint8 blocks, ops.fused_moe_mxfp4), or
dequantized / RTN-quantized when asked, and the dequantization equals transformers' own;
RTN int4 experts on load (biases and swigluoai through fused_moe_int4); ``load_weights``
with transformers' names; tensor parallel (TP=2 over gloo: sharded expert biases, sinks, the MXFP4
checkpoint) equal to TP=1; the built-in ``tiny-gpt-oss``."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_model_support import (hf_logits, random_tokens, randomize_, rel_err, run_schedule,
                                save_hf)

import minikernels as mk
from minikernels.models import AttentionMetadata, DecoderConfig, load_model
from minikernels.models.config import UnsupportedModelError
from minikernels.models.generate import generate_tokens
from minikernels.models.loader import CheckpointError

TOL = 1e-4
VOCAB = 300
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
              num_experts_per_tok=2, sliding_window=4, swiglu_limit=0.5,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False,
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "rope_theta": 10000.0,
                               "original_max_position_embeddings": 16})


def make_gpt_oss(seed: int = 0, **overrides) -> torch.nn.Module:
    """transformers' GptOssForCausalLM with CONFIG, random weights (fp32, eager)."""
    import transformers

    config = transformers.GptOssConfig(**{**CONFIG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(transformers.GptOssForCausalLM(config).float().eval(), seed + 1)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[torch.nn.Module, str]:
    hf = make_gpt_oss()
    return hf, save_hf(hf, str(tmp_path_factory.mktemp("gpt_oss")))


def _seqs(lengths, seed=0):
    return [random_tokens(n, VOCAB, seed + i) for i, n in enumerate(lengths)]


def test_config_and_layout(dense):
    """The decoder's flags from the saved config; experts stacked de-interleaved: w13's
    gate rows are transformers' even columns, the up rows the odd ones (and the biases)."""
    hf, path = dense
    model = load_model(path, dtype="float32", device="cpu")
    c = model.config
    assert (c.architecture, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.moe_activation, c.swiglu_limit, c.swiglu_alpha, c.norm_topk_prob) == \
        ("gpt_oss", 8, 2, 64, "swigluoai", 0.5, 1.702, True)
    assert c.attention_sinks and c.qkv_bias and c.o_bias and c.moe_router_bias
    assert [c.window_left(i) for i in range(4)] == [3, -1, 3, -1]
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["truncate"] is False
    ex, ref = model.layers[1].mlp.experts, hf.model.layers[1].mlp.experts
    assert torch.equal(ex.w13[:, :64], ref.gate_up_proj[..., 0::2].transpose(1, 2))
    assert torch.equal(ex.w13[:, 64:], ref.gate_up_proj[..., 1::2].transpose(1, 2))
    assert torch.equal(ex.w2, ref.down_proj.transpose(1, 2))
    assert torch.equal(ex.w13_bias, torch.cat([ref.gate_up_proj_bias[:, 0::2],
                                               ref.gate_up_proj_bias[:, 1::2]], 1))
    assert torch.equal(ex.w2_bias, ref.down_proj_bias)
    gate = model.layers[1].mlp.gate
    assert torch.equal(gate.bias, hf.model.layers[1].mlp.router.bias)


def test_cacheless_varlen_matches_transformers(dense):
    hf, path = dense
    model = load_model(path, dtype="float32", device="cpu")
    seqs = _seqs([7, 12, 3])
    ids = torch.tensor([t for s in seqs for t in s])
    logits = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs]), None)
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert rel_err(logits, ref) <= TOL
    last = model(ids, AttentionMetadata.for_prompts([len(s) for s in seqs], last_only=True))
    assert rel_err(last, torch.stack([hf_logits(hf, s)[-1] for s in seqs])) <= TOL
    # the clamp bites: the same weights with transformers' default limit give other logits
    loose = make_gpt_oss(swiglu_limit=7.0)
    assert rel_err(torch.cat([hf_logits(loose, s) for s in seqs]), ref) > 1e-2


def test_paged_prefill_decode_and_chunked_prefill(dense):
    hf, path = dense
    model = load_model(path, dtype="float32", device="cpu")
    seqs = _seqs([14, 19, 9], seed=10)
    refs = [hf_logits(hf, s) for s in seqs]
    plan = [[("p", 0, 11), ("p", 1, 5)], [("d", 0), ("p", 1, 6), ("p", 2, 4)],
            [("d", 0), ("p", 1, 8), ("p", 2, 3)], [("d", 0), ("d", 2)], [("d", 2)]]
    rows = run_schedule(model, seqs, plan, block_size=4)
    got = torch.stack([r for _, _, r in rows])
    ref = torch.stack([refs[i][p] for i, p, _ in rows])
    assert rel_err(got, ref) <= TOL


@torch.no_grad()
def _hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_and_engine_match_transformers(dense):
    """The plain paged loop and the engine (hybrid KV pools: the sliding layers keep
    their window's blocks; chunked prefill of 8 tokens; a prefix-cache hit) give
    transformers' greedy tokens."""
    hf, path = dense
    prompts = _seqs([5, 9, 13], seed=3)
    want = [_hf_greedy(hf, p, 8) for p in prompts]
    model = load_model(path, dtype="float32", device="cpu")
    assert generate_tokens(model, prompts, max_new_tokens=8, eos_token_ids=[],
                           block_size=4) == want
    llm = mk.LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4,
                 num_kv_blocks=64, max_num_batched_tokens=8, max_num_seqs=4)
    assert llm.llm_engine.kv_layout is not None           # hybrid pools (sliding layers)
    params = mk.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    again = llm.generate(prompts[2:], params, use_tqdm=False)       # a prefix hit
    assert again[0].outputs[0].token_ids == want[2] and again[0].num_cached_tokens > 0


def test_load_weights_with_transformers_names(dense, tmp_path):
    """LLM.load_weights' path (models/weight_update.py): a model loaded from another
    checkpoint, given transformers' named parameters, computes that model's logits."""
    from minikernels.models.weight_update import load_weights

    hf, _ = dense
    other = save_hf(make_gpt_oss(seed=7), str(tmp_path / "other"))
    model = load_model(other, dtype="float32", device="cpu")
    assert load_weights(model, hf.named_parameters()) == len(list(hf.parameters()))
    seq = _seqs([10], seed=4)[0]
    got = model(torch.tensor(seq), AttentionMetadata.for_prompts([len(seq)]))
    assert rel_err(got, hf_logits(hf, seq)) <= TOL


# ------------------------------------------------------------------------------ MXFP4
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(n_rows: int, k: int, experts: int, g: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MXFP4 experts written from the format's definition: (blocks uint8
    [E, N, K/32, 16], scales uint8 [E, N, K/32], W fp32 [E, N, K] = code value * 2 **
    (scale - 127); element 2b of a block in byte b's low nibble, 2b + 1 in its high)."""
    codes = torch.randint(0, 16, (experts, n_rows, k // 32, 32), generator=g)
    scales = torch.randint(119, 124, (experts, n_rows, k // 32), generator=g)
    w = FP4[codes] * torch.pow(2.0, scales.double() - 127).float()[..., None]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, scales.to(torch.uint8), w.reshape(experts, n_rows, k)


def write_mxfp4_checkpoint(hf: torch.nn.Module, path: str, seed: int = 0) -> None:
    """Save ``hf`` as the official releases store it: every expert stack as MXFP4 blocks /
    scales (from exactly representable random weights, which ``hf`` takes too, so it stays
    the reference), everything else dense, an mxfp4 quantization_config."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in hf.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, k, n = p.shape                        # x @ W: [E, in, out]
            blocks, scales, w = _mxfp4(n, k, e, g)   # stored per output row
            with torch.no_grad():
                hf.get_parameter(name).copy_(w.transpose(1, 2))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = p.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def mxfp4_dirs(tmp_path_factory) -> tuple[torch.nn.Module, str, str]:
    """(the reference model, its MXFP4 checkpoint, the same weights saved dense)."""
    hf = make_gpt_oss(seed=3)
    mx = str(tmp_path_factory.mktemp("gpt_oss_mxfp4"))
    write_mxfp4_checkpoint(hf, mx)
    return hf, mx, save_hf(hf, str(tmp_path_factory.mktemp("gpt_oss_mxfp4_dense")))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_checkpoint_keeps_native_experts(mxfp4_dirs, dtype):
    """By default an MXFP4 checkpoint's experts stay MXFP4 (uint8 blocks / scales, 4.25
    bits per weight, ops.fused_moe_mxfp4): dequantized they are exactly the dense
    checkpoint's experts, and the logits match the dense model's (and transformers' in
    fp32); one MoE block through the Triton kernel (interpreter) matches the reference."""
    hf, mx, dense_dir = mxfp4_dirs
    a = load_model(mx, dtype=dtype, device="cpu")
    b = load_model(dense_dir, dtype=dtype, device="cpu")
    assert a.quantization == "mxfp4"
    for la, lb in zip(a.layers, b.layers):
        ex = la.mlp.experts
        assert ex.is_mxfp4 and ex.w13 is None and not ex.is_int4
        assert ex.w13_blocks.dtype == ex.w2_blocks.dtype == torch.uint8
        assert ex.w13_block_scales.dtype == torch.uint8
        e, i, h = ex.num_experts, ex.inter, ex.hidden
        assert ex.w13_blocks.shape == (e, 2 * i, h // 32, 16)
        assert ex.w2_blocks.shape == (e, h, i // 32, 16)
        nbytes = sum(getattr(ex, n).numel() for n in ("w13_blocks", "w13_block_scales",
                                                      "w2_blocks", "w2_block_scales"))
        assert nbytes * 8 / (3 * e * i * h) == 4.25
        assert not any(p.dtype.is_floating_point and p.dim() == 3 for p in ex.parameters())
        w13, w2 = ex.dequantized()
        assert torch.equal(w13, lb.mlp.experts.w13.float())
        assert torch.equal(w2, lb.mlp.experts.w2.float())
    seqs = _seqs([9, 5], seed=6)
    ids = torch.tensor([t for s in seqs for t in s])
    meta = AttentionMetadata.for_prompts([len(s) for s in seqs])
    got, want = a(ids, meta), b(ids, meta)
    assert rel_err(got, want) <= (TOL if dtype == "float32" else 2e-2)
    if dtype == "float32":
        assert rel_err(got, torch.cat([hf_logits(hf, s) for s in seqs])) <= TOL
    moe = a.layers[1].mlp
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2)).to(moe.gate.weight.dtype)
    with mk.use_backend("triton"):
        y = moe(x)
    assert rel_err(y, moe(x)) <= (1e-5 if dtype == "float32" else 1e-2)


def test_mxfp4_checkpoint_dequantized_when_asked(mxfp4_dirs):
    """quantization="dense" dequantizes the MXFP4 experts on load (the former default):
    exactly the dense checkpoint's experts and logits; "int4" RTN-quantizes the
    dequantized experts (fused_moe_int4). "mxfp4" / "dense" on another checkpoint are
    refused by name."""
    hf, mx, dense_dir = mxfp4_dirs
    a = load_model(mx, dtype="float32", device="cpu", quantization="dense")
    b = load_model(dense_dir, dtype="float32", device="cpu")
    for la, lb in zip(a.layers, b.layers):
        assert not la.mlp.experts.is_mxfp4
        assert torch.equal(la.mlp.experts.w13, lb.mlp.experts.w13)
        assert torch.equal(la.mlp.experts.w2, lb.mlp.experts.w2)
    seqs = _seqs([6], seed=7)
    ids = torch.tensor(seqs[0])
    meta = AttentionMetadata.for_prompts([6])
    assert torch.equal(a(ids, meta), b(ids, meta))
    q = load_model(mx, dtype="float32", device="cpu", quantization="int4", group_size=32)
    for lq, lb in zip(q.layers, b.layers):
        ex = lq.mlp.experts
        assert ex.w13 is None and not ex.is_mxfp4 and ex.group_size == 32
        assert rel_err(ex.dequantized()[0], lb.mlp.experts.w13) <= 0.1
    assert torch.isfinite(q(ids, meta)).all()
    for quant in ("mxfp4", "dense"):
        with pytest.raises(CheckpointError, match=f"quantization='{quant}' is for GPT-OSS "
                                                  "MXFP4 checkpoints"):
            load_model(dense_dir, dtype="float32", device="cpu", quantization=quant)


def test_mxfp4_tensor_parallel_slices():
    """shard_mxfp4: each rank's de-interleaved gate and up rows of w13 and its whole
    blocks of w2's columns, equal to slicing the dequantized experts; an I / P that is
    not a multiple of 32 is refused."""
    from minikernels.models.gpt_oss import Mxfp4Stack, mxfp4_native, shard_mxfp4
    from minikernels.ops.reference import dequantize_mxfp4_experts as deq

    g = torch.Generator().manual_seed(4)
    e, h, i = 2, 64, 128
    w13 = Mxfp4Stack(*_mxfp4(2 * i, h, e, g)[:2])
    w2 = Mxfp4Stack(*_mxfp4(h, i, e, g)[:2])
    full13 = deq(*mxfp4_native("gate_up_proj", w13))
    full2 = deq(*w2)
    stored13 = deq(*w13)
    assert torch.equal(full13[:, :i], stored13[:, 0::2])          # gate rows first
    for p in (2, 4):
        for r in range(p):
            lo, hi = r * i // p, (r + 1) * i // p
            s13 = shard_mxfp4("gate_up_proj", mxfp4_native("gate_up_proj", w13), r, p)
            assert torch.equal(deq(*s13), torch.cat([full13[:, lo:hi],
                                                     full13[:, i + lo:i + hi]], 1))
            assert torch.equal(deq(*shard_mxfp4("down_proj", w2, r, p)), full2[:, :, lo:hi])
    with pytest.raises(ValueError, match="multiple of 32"):
        shard_mxfp4("down_proj", w2, 0, 8)
    with pytest.raises(ValueError, match="multiple of 32"):
        shard_mxfp4("gate_up_proj", mxfp4_native("gate_up_proj", w13), 0, 3)


def test_mxfp4_dequantize_equals_transformers():
    """minikernels' MXFP4 dequantization against transformers' own
    (``convert_moe_packed_tensors``: the [E, K, N] parameter layout) on random bytes,
    every code and a wide scale range, bf16 and fp32."""
    from minikernels.models.gpt_oss import dequantize_mxfp4, mxfp4_expert_weight

    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 24, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 24, 4), generator=g, dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        want = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(mxfp4_expert_weight(blocks, scales, dtype), want)
    one = dequantize_mxfp4(torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8),
                           torch.tensor([128], dtype=torch.uint8), torch.float32)
    assert one[:3].tolist() == [1.0, 2.0, 0.0]     # low nibble first, times 2 ** (128 - 127)


def test_load_weights_on_native_mxfp4_experts(mxfp4_dirs):
    """RL weight sync into a model with native MXFP4 experts: the dense tensors load, a
    dense expert tensor is refused by name before anything is copied."""
    from minikernels.models.weight_update import load_weights

    hf, mx, _ = mxfp4_dirs
    model = load_model(mx, dtype="float32", device="cpu")
    state = hf.state_dict()
    before = model.layers[0].mlp.experts.w13_blocks.clone()
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.gate_up_proj.*mxfp4"):
        load_weights(model, state)
    assert torch.equal(model.layers[0].mlp.experts.w13_blocks, before)
    dense = {k: v for k, v in state.items() if ".experts." not in k}
    assert load_weights(model, dense) == len(dense)


def test_mxfp4_and_config_refusals(mxfp4_dirs, tmp_path):
    """An MXFP4 blocks tensor without its scales; mxfp4 on another family; GPT-OSS with
    another quant_method; config fields this decoder cannot serve - each named."""
    from safetensors.torch import load_file, save_file

    _, mx, _ = mxfp4_dirs
    bad = tmp_path / "incomplete"
    bad.mkdir()
    tensors = load_file(os.path.join(mx, "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.down_proj_scales"]
    save_file(tensors, str(bad / "model.safetensors"))
    with open(os.path.join(mx, "config.json")) as f:
        cfg = json.load(f)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.experts\.down_proj_scales"):
        load_model(str(bad), dtype="float32", device="cpu")
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "gptq", "bits": 4}}))
    with pytest.raises(UnsupportedModelError, match="GPT-OSS.*'gptq'"):
        load_model(str(bad), dtype="float32", device="cpu")
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
             "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 64,
             "vocab_size": 300, "quantization_config": {"quant_method": "mxfp4"}}
    (bad / "config.json").write_text(json.dumps(llama))
    with pytest.raises(UnsupportedModelError, match="mxfp4.*GPT-OSS only"):
        load_model(str(bad), dtype="float32", device="cpu")
    base = {**cfg, "quantization_config": None}
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        DecoderConfig.from_hf({**base, "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ValueError, match="layer_types must list one type per layer"):
        DecoderConfig.from_hf({**base, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="num_local_experts"):
        DecoderConfig.from_hf({**base, "num_local_experts": 0})
    with pytest.raises(ValueError, match="swiglu_limit"):
        DecoderConfig.from_hf({**base, "swiglu_limit": -1.0})


def test_hub_config_defaults():
    """A hub config.json (4.x spelling: rope_theta + rope_scaling) and one that omits what
    transformers' GptOssConfig defaults: window 128 on the even layers, biases, YaRN
    factor 32 over 4096 positions at base 150000, eps 1e-5, alpha 1.702."""
    hub = {"architectures": ["GptOssForCausalLM"], "hidden_size": 2880,
           "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
           "num_hidden_layers": 24, "intermediate_size": 2880, "vocab_size": 201088,
           "num_local_experts": 32, "experts_per_token": 4, "max_position_embeddings": 131072,
           "rope_theta": 150000, "rope_scaling": {
               "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
               "original_max_position_embeddings": 4096, "truncate": False},
           "sliding_window": 128, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5,
           "eos_token_id": 200002}
    c = DecoderConfig.from_hf(hub)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (32, 4, 2880)
    assert c.sliding_window_layers == list(range(0, 24, 2)) and c.window_left(0) == 127
    assert c.rope_theta == 150000.0 and c.rope_scaling["factor"] == 32.0
    bare = {k: v for k, v in hub.items()
            if k not in ("rope_theta", "rope_scaling", "sliding_window", "rms_norm_eps",
                         "swiglu_limit")}
    d = DecoderConfig.from_hf(bare)
    assert (d.sliding_window, d.rope_theta, d.rms_norm_eps, d.swiglu_alpha, d.swiglu_limit,
            d.qkv_bias, d.o_bias) == (128, 150000.0, 1e-5, 1.702, 7.0, True, True)
    assert d.rope_scaling == {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False,
                              "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_experts_on_load_and_builtin(dense, quantization):
    """RTN int4 / fp8 on load quantizes the experts (fused_moe_int4 / _fp8 with the dense
    biases and swigluoai): each layer's MoE block equals the fused_moe reference on its
    dequantized experts (the int4 path's fp16 activations included); the built-in
    tiny-gpt-oss loads and generates through the engine."""
    from minikernels.ops import reference

    _, path = dense
    q = load_model(path, dtype="float32", device="cpu", quantization=quantization,
                   group_size=32)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5))
    for layer in q.layers:
        moe = layer.mlp
        ex = moe.experts
        assert ex.w13 is None and ex.w13_bias is not None
        w13, w2 = ex.dequantized()
        weights, ids = moe.route(x)
        half = quantization == "int4"          # (int4: fp16 activations, fp16 weights)
        xin = x.half() if half else x
        cast = (lambda t: t.half()) if half else (lambda t: t)
        want = reference.fused_moe(xin, cast(w13), cast(w2), weights, ids,
                                   activation="swigluoai", w13_bias=cast(ex.w13_bias),
                                   w2_bias=cast(ex.w2_bias), limit=ex.swiglu_limit)
        assert rel_err(moe(x), want) <= (1e-3 if half else 1e-5)
    seq = _seqs([11], seed=8)[0]
    assert torch.isfinite(q(torch.tensor(seq), AttentionMetadata.for_prompts([11]))).all()
    if quantization == "fp8":
        return
    llm = mk.LLM("tiny-gpt-oss", dtype="float32", device="cpu", num_kv_blocks=32,
                 block_size=4)
    out = llm.generate([[256, 72, 105, 33, 12, 40, 9, 8, 7, 6]],
                       mk.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_tensor_parallel_tp2_equals_tp1(dense, mxfp4_dirs, tmp_path):
    """TP=2 over gloo (spawned ranks; tests/test_tensor_parallel.py's runner): each rank
    its heads' sinks, its I/P slice of every expert and of the w13 bias, the w2 bias on
    rank 0; dense and RTN int4 (group 32 divides each rank's I = 32), and the MXFP4
    checkpoint read by slices; logits equal TP=1 (cache-less and paged)."""
    from helpers import spawn_ranks
    from test_tensor_parallel import _free_port, _logits, _rank_main, check_logits

    _, path = dense
    _, mx, _ = mxfp4_dirs
    dirs, qdirs = {"gpt_oss": path}, {"gpt_oss-mxfp4": mx}
    spawn_ranks(_rank_main, (2, _free_port(), dirs, str(tmp_path), qdirs, (None, "int4"), 32),
                2)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    ref = _logits(load_model(mx, dtype="float32", device="cpu"))
    for res in ranks:
        for got, want in zip(res[("gpt_oss-mxfp4", "ckpt")], ref):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    check_logits(ranks, dirs, (None, "int4"), 32)
