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
