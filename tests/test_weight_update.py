"""LLM.load_weights (models/weight_update.py): an RL loop's weight sync. A running engine
built from checkpoint A, given checkpoint B's tensors under their Hugging Face names (a
trainer's named_parameters or state dict), generates exactly what an engine built from B
does, with the prefix cache reset (the same prompts again must not hit K/V of A); and back
to A. Fused-in-HF layouts (Phi-3), tied embeddings, biases, Gemma, mixture-of-experts
(per-expert and stacked tensors); errors name the tensor. CPU, tiny models."""
from __future__ import annotations

import pytest
import torch
from test_engine import assert_all_free, tokens
from test_model_support import make_hf_model, save_hf

from minikernels.engine import LLM, SamplingParams

PROMPTS = [[5, 9, 13, 21] * 5, [5, 9, 13, 21] * 5 + [7, 8], [3, 4, 5], list(range(40, 70))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied", "phi3-longrope-partial", "gemma3",
                                  "qwen3-moe", "mixtral"])
def test_loaded_weights_generate_like_a_fresh_engine(tmp_path, kind):
    a, b = make_hf_model(kind, seed=0), make_hf_model(kind, seed=7)
    pa, pb = save_hf(a, str(tmp_path / "a")), save_hf(b, str(tmp_path / "b"))
    want_a = tokens(_llm(pa).generate(PROMPTS, GREEDY, use_tqdm=False))
    want_b = tokens(_llm(pb).generate(PROMPTS, GREEDY, use_tqdm=False))
    assert want_a != want_b
    llm = _llm(pa)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_a
    n = llm.load_weights(b.named_parameters())                 # (name, tensor) pairs
    assert n > 0
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_b
    llm.load_weights(a.state_dict())                            # a state dict, back to A
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_a
    assert_all_free(llm)


def test_prefix_cache_is_reset(tmp_path):
    """The second generate repeats the prompts: with the cache kept it would reuse K/V
    written under the old weights."""
    a, b = make_hf_model("llama", seed=0), make_hf_model("llama", seed=7)
    pa, pb = save_hf(a, str(tmp_path / "a")), save_hf(b, str(tmp_path / "b"))
    want_b = tokens(_llm(pb).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = _llm(pa)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    hits = llm.llm_engine.block_manager.num_hit_tokens
    llm.load_weights(b.state_dict())
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_b
    # only hits among the new requests themselves (prompts 0 and 1 share 20 tokens)
    assert llm.llm_engine.block_manager.num_hit_tokens - hits <= 2 * 20


def test_errors_name_the_tensor(tmp_path):
    a = make_hf_model("llama", seed=0)
    pa = save_hf(a, str(tmp_path / "a"))
    llm = _llm(pa)
    with pytest.raises(ValueError, match="model.layers.0.bogus.weight"):
        llm.load_weights([("model.layers.0.bogus.weight", torch.zeros(3))])
    bad = a.state_dict()["model.layers.1.mlp.down_proj.weight"][:, :5]
    with pytest.raises(ValueError, match="down_proj.*shape mismatch"):
        llm.load_weights([("model.layers.1.mlp.down_proj.weight", bad)])
    with pytest.raises(ValueError, match="dense floating-point"):
        llm.load_weights([("model.norm.weight", torch.ones(64, dtype=torch.int64))])
    q = _llm(pa, quantization="int4")
    with pytest.raises(ValueError, match="q_proj.*quantized"):
        q.load_weights(a.named_parameters())
    llm.llm_engine.add_request("x", [1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="requests are still running"):
        llm.load_weights(a.named_parameters())


def _meta(weights) -> list:
    """(name, meta tensor) of each pair: shapes and dtypes only, as from a safetensors header."""
    return [(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in weights]


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, changed


def _error(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kw)
    return str(info.value)


def _bad_tensors(kind: str, sd: dict) -> list:
    """Tensors the real load refuses: one per check (name mapping, dtype, dense and fused
    linear shapes, Phi-3's fused rows, experts' range and shapes, KV-cache scales)."""
    bad = [("model.layers.0.bogus.weight", torch.zeros(3)),
           ("model.norm.weight", torch.ones(65)),
           ("model.norm.weight", torch.ones(64, dtype=torch.int64)),
           ("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 127)),
           ("model.layers.0.self_attn.k_scale", torch.ones(3))]
    if kind.startswith("phi3"):
        bad.append(("model.layers.1.self_attn.qkv_proj.weight", torch.zeros(127, 64)))
    else:
        bad += [("model.layers.1.self_attn.k_proj.weight", torch.zeros(33, 64)),
                ("lm_head.bias", torch.zeros(300))]
    if kind in ("qwen3-moe", "mixtral"):
        e, two_i, h = sd["model.layers.0.mlp.experts.gate_up_proj"].shape
        bad = [b for b in bad if "down_proj" not in b[0]]
        bad += [("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(e, two_i + 2, h)),
                ("model.layers.0.mlp.experts.down_proj", torch.zeros(e + 1, h, two_i // 2)),
                ("model.layers.0.mlp.experts.1.up_proj.weight", torch.zeros(two_i // 2, h + 1)),
                ("model.layers.0.mlp.experts.99.gate_proj.weight", torch.zeros(two_i // 2, h))]
    return bad


@pytest.mark.parametrize("kind", ["llama", "phi3-longrope-partial", "qwen3-moe", "mixtral"])
def test_check_weights_on_meta_tensors(tmp_path, kind):
    """check_weights / load_weights(dry_run=True): the real load's checks on meta tensors
    (a checkpoint's safetensors headers), copying nothing: a whole checkpoint passes and
    counts what the load then loads; each tensor the load refuses raises the load's very
    error."""
    from minikernels.models import load_model
    from minikernels.models.weight_update import check_weights, load_weights

    a, b = make_hf_model(kind, seed=0), make_hf_model(kind, seed=7)
    model = load_model(save_hf(a, str(tmp_path / "a")), dtype="float32", device="cpu")
    before = _snapshot(model)
    n = check_weights(model, _meta(b.named_parameters()))
    assert n > 0
    assert load_weights(model, _meta(b.state_dict().items()), dry_run=True) == n
    assert load_weights(model, b.state_dict(), dry_run=True) == n      # real tensors too
    for name, tensor in _bad_tensors(kind, b.state_dict()):
        want = _error(load_weights, model, [(name, tensor)])
        assert name in want
        assert _error(check_weights, model, _meta([(name, tensor)])) == want
    neg = [("model.layers.1.self_attn.v_scale", -torch.ones(1))]     # values: real only
    assert "finite and > 0" in _error(check_weights, model, neg)
    assert check_weights(model, _meta(neg)) == 1
    _assert_unchanged(model, before)
    assert load_weights(model, b.named_parameters()) == n


def test_check_weights_on_a_tensor_parallel_shard(tmp_path):
    """A rank's shard (TP=2, rank 1, no process group needed) checks full tensors through
    the loader's shard_tensor, as the real load reads them."""
    from minikernels.models import load_model
    from minikernels.models.parallel import TensorParallel
    from minikernels.models.weight_update import check_weights, load_weights

    a, b = make_hf_model("qwen3-moe", seed=0), make_hf_model("qwen3-moe", seed=7)
    part = load_model(save_hf(a, str(tmp_path / "a")), dtype="float32", device="cpu",
                      tensor_parallel=TensorParallel(1, 2))
    before = _snapshot(part)
    n = check_weights(part, _meta(b.named_parameters()))
    assert n > 0
    bad = [("model.layers.1.self_attn.o_proj.weight", torch.zeros(65, 64)),
           ("model.layers.0.mlp.experts.down_proj", torch.zeros(6, 65, 48)),
           ("model.embed_tokens.weight", torch.zeros(300, 63))]
    for name, tensor in bad:
        want = _error(load_weights, part, [(name, tensor)])
        assert name in want and "shape mismatch" in want
        assert _error(check_weights, part, _meta([(name, tensor)])) == want
    _assert_unchanged(part, before)
    assert load_weights(part, b.named_parameters()) == n


@pytest.mark.parametrize("form", ["list", "generator", "state_dict"])
def test_a_bad_tensor_leaves_the_model_unchanged(tmp_path, form):
    """All or nothing: B's valid tensors followed by a wrong-shaped or unknown one raise
    naming it, and not one of the valid ones was copied; dry_run needs no idle engine."""
    a, b = make_hf_model("llama", seed=0), make_hf_model("llama", seed=7)
    llm = _llm(save_hf(a, str(tmp_path / "a")))
    model = llm.llm_engine.model
    before = _snapshot(model)
    good = list(b.state_dict().items())
    for bad in [("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 127)),
                ("model.layers.1.mlp.bogus.weight", torch.zeros(4))]:
        weights = good + [bad]
        given = {"list": weights, "generator": iter(weights), "state_dict": dict(weights)}
        with pytest.raises(ValueError, match=bad[0]):
            llm.load_weights(given[form])
        _assert_unchanged(model, before)
        with pytest.raises(ValueError, match=bad[0]):
            llm.load_weights(_meta(weights), dry_run=True)
    llm.llm_engine.add_request("x", [1, 2, 3], GREEDY)          # a dry run may overlap it
    assert llm.load_weights(_meta(good), dry_run=True) == len(good)
    while llm.llm_engine.has_unfinished():
        llm.llm_engine.step()
    assert llm.load_weights(iter(good), stream=True) == len(good)
    assert torch.equal(model.state_dict()["norm.weight"], b.state_dict()["model.norm.weight"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_tensor_parallel_bad_tensor_reaches_no_rank(tmp_path):
    """TP=2 (CPU, gloo): the whole set is checked against rank 0's shard before the first
    tensor is loaded or broadcast, so after a refused update every rank still holds A
    (greedy tokens as before); dry_run checks meta tensors; then B loads on every rank."""
    a, b = make_hf_model("llama", seed=0), make_hf_model("llama", seed=7)
    pa, pb = save_hf(a, str(tmp_path / "a")), save_hf(b, str(tmp_path / "b"))
    want_a = tokens(_llm(pa).generate(PROMPTS, GREEDY, use_tqdm=False))
    want_b = tokens(_llm(pb).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = _llm(pa, tensor_parallel_size=2)
    try:
        good = list(b.state_dict().items())
        bad = good + [("model.layers.1.self_attn.o_proj.weight", torch.zeros(65, 64))]
        with pytest.raises(ValueError, match="o_proj.*shape mismatch"):
            llm.load_weights(bad)
        with pytest.raises(ValueError, match="o_proj.*shape mismatch"):
            llm.load_weights(_meta(bad), dry_run=True)
        assert llm.load_weights(_meta(good), dry_run=True) == len(good)
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_a
        assert llm.load_weights(good) == len(good)
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_b
    finally:
        llm.llm_engine.model.close()
