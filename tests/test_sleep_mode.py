"""Sleep mode (engine/sleep.py; vLLM's LLM.sleep / wake_up): an idle engine empties its
weights, KV pools and CUDA graphs in place and gets them back. Level 1: the same tokens
after waking up; level 2 with a weight update in between (wake_up(["weights"]),
load_weights, wake_up(["kv_cache"])): the new weights' tokens; a draft model and an EAGLE
head sleep with the target; LoRA adapter slots sleep too; refusals (requests running,
generate while asleep).
CPU, tiny models: the tensors really are emptied (numel 0) while asleep."""
from __future__ import annotations

import pytest
from test_eagle import _save_head
from test_lora import ALL, make_adapter
from test_engine import assert_all_free, tokens
from test_model_support import make_hf_model, save_hf

from minikernels.engine import LLM, SamplingParams

PROMPTS = [[5, 9, 13, 21] * 5, [3, 4, 5], list(range(40, 70))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sleep")
    a, b = make_hf_model("llama", seed=0), make_hf_model("llama", seed=7)
    _save_head(root / "head", "eagle", 1, own_embed=True)
    make_adapter(a, str(root / "lora"), r=4, alpha=8, targets=ALL, seed=3)
    return {"a": save_hf(a, str(root / "a")), "b": save_hf(b, str(root / "b")),
            "b_model": b, "head": str(root / "head"), "lora": str(root / "lora")}


def _llm(path, **kw):
    return LLM(path, dtype="float32", device="cpu", tokenizer=None, block_size=4, **kw)


def _asleep(llm) -> bool:
    eng = llm.llm_engine
    weights = all(p.numel() == 0 for p in eng.model.parameters())
    kv = all(t.numel() == 0 for pair in eng.runner.kv_caches for t in pair)
    return weights and kv


@pytest.mark.parametrize("spec", [None, "ngram", "draft", "eagle"])
def test_level1_wakes_up_with_the_same_tokens(dirs, spec):
    cfg = {None: None, "ngram": {"method": "ngram", "num_speculative_tokens": 3},
           "draft": {"method": "draft_model", "model": dirs["a"], "num_speculative_tokens": 3},
           "eagle": {"method": "eagle", "model": dirs["head"], "num_speculative_tokens": 3}
           }[spec]
    llm = _llm(dirs["a"], speculative_config=cfg)
    want = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    llm.sleep(level=1)
    assert llm.is_sleeping and _asleep(llm)
    with pytest.raises(RuntimeError, match="sleeping"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.wake_up()
    assert not llm.is_sleeping and not _asleep(llm)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
    assert_all_free(llm)


def test_level2_then_new_weights(dirs):
    want_b = tokens(_llm(dirs["b"]).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = _llm(dirs["a"])
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.sleep(level=2)
    with pytest.raises(RuntimeError, match="asleep"):
        llm.load_weights(dirs["b_model"].named_parameters())
    llm.wake_up(["weights"])
    assert llm.is_sleeping
    llm.load_weights(dirs["b_model"].named_parameters())
    llm.wake_up(["kv_cache"])
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want_b


def test_refusals(dirs):
    llm = _llm(dirs["a"])
    with pytest.raises(ValueError, match="level"):
        llm.sleep(level=3)
    llm.llm_engine.add_request("x", [1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="still running"):
        llm.sleep()
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(["gpu"])


def test_lora_slots_sleep_and_come_back(dirs):
    """The adapter slots are emptied with the weights and refilled (a host copy at both
    levels): the same tokens with and without the adapter after waking up, also after
    level 2 + a weight reload."""
    from minikernels.engine import LoRARequest

    which = [LoRARequest("a", 1, dirs["lora"]), None, LoRARequest("a", 1, dirs["lora"])]
    llm = _llm(dirs["a"], enable_lora=True, max_lora_rank=4)

    def run():
        return [o.outputs[0].token_ids for o in llm.generate(
            PROMPTS, GREEDY, use_tqdm=False, lora_request=which)]

    want = run()
    base = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert base[1] == want[1] and (base[0], base[2]) != (want[0], want[2])
    llm.sleep(level=1)
    assert all(t.numel() == 0 for t in llm.llm_engine.lora.manager.tensors())
    llm.wake_up()
    assert run() == want
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    llm.load_weights(make_hf_model("llama", seed=0).named_parameters())
    llm.wake_up(["kv_cache"])
    assert run() == want
    assert_all_free(llm)
