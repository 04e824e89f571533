"""LoRA requests through the engine (``LLM(enable_lora=True)``, vLLM's ``lora_request``):
greedy tokens equal PEFT's own generation for each adapter and transformers' for the base
model in one ``generate`` call; with one slot for two adapters the scheduler runs them
in turn (a request waiting for a slot does not block the others); adapters never share
prefix-cache entries; errors before anything is queued."""
from __future__ import annotations

import asyncio

import pytest
import torch
from test_lora import ALL, make_adapter
from test_model_support import make_hf_model, random_tokens, save_hf

from minikernels.engine import LLM, AsyncLLM, LoRARequest, SamplingParams
from minikernels.models.lora import LoRAError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = make_hf_model("llama", seed=3)
    base = save_hf(hf, str(tmp_path_factory.mktemp("base")))
    paths, refs = [], []
    for i, (r, targets) in enumerate([(4, ALL), (2, ["q_proj", "v_proj", "down_proj"])]):
        path = str(tmp_path_factory.mktemp(f"lora{i}"))
        refs.append(make_adapter(hf, path, r=r, alpha=2 * r, targets=targets, seed=i + 1))
        paths.append(path)
    return hf, base, paths, refs


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], n: int = 6) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("max_loras", [2, 1])
def test_mixed_requests_match_peft_and_base(setup, max_loras):
    hf, base, paths, refs = setup
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=128,
              block_size=8, enable_lora=True, max_loras=max_loras, max_lora_rank=8)
    lora = [LoRARequest("first", 1, paths[0]), LoRARequest("second", 2, paths[1])]
    prompts = [random_tokens(n, 300, 40 + n) for n in (9, 6, 11, 7)]
    which = [lora[0], None, lora[1], lora[0]]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=which)
    models = {None: hf, 1: refs[0], 2: refs[1]}
    for prompt, lr, out in zip(prompts, which, outs):
        want = _hf_greedy(models[None if lr is None else lr.lora_int_id], prompt)
        assert out.outputs[0].token_ids == want, (lr, max_loras)
    # at most max_loras adapters held slots at once; with one slot, the second adapter
    # waited for the first's requests to finish and then took its slot
    assert len(llm.llm_engine.lora.slot_of) <= max_loras
    if max_loras == 1:
        assert llm.llm_engine.lora.in_slot == [2]
    assert llm.llm_engine.block_manager.num_free_blocks == \
        llm.llm_engine.block_manager.num_blocks


def test_adapters_never_share_prefix_cache(setup):
    hf, base, paths, refs = setup
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=128,
              block_size=8, enable_lora=True, max_loras=2, max_lora_rank=8)
    first = LoRARequest("first", 1, paths[0])
    prompt = random_tokens(25, 300, 7)
    a = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=first)[0]
    again = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=first)[0]
    plain = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    other = llm.generate([prompt], GREEDY, use_tqdm=False,
                         lora_request=LoRARequest("second", 2, paths[1]))[0]
    assert again.num_cached_tokens >= 16          # the same adapter reuses its blocks
    assert plain.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert a.outputs[0].token_ids == again.outputs[0].token_ids == _hf_greedy(refs[0], prompt)
    assert plain.outputs[0].token_ids == _hf_greedy(hf, prompt)
    assert other.outputs[0].token_ids == _hf_greedy(refs[1], prompt)


def test_async_engine_lora_request(setup):
    hf, base, paths, refs = setup
    engine = AsyncLLM.from_args(base, dtype="float32", device="cpu", tokenizer=None,
                                num_kv_blocks=64, block_size=8, enable_lora=True,
                                max_loras=1, max_lora_rank=8)
    prompt = random_tokens(8, 300, 3)

    async def run(lr):
        last = None
        async for out in engine.generate(prompt, GREEDY, f"r{id(lr)}", lora_request=lr):
            last = out
        return last.outputs[0].token_ids

    async def both():
        return await asyncio.gather(run(LoRARequest("first", 1, paths[0])), run(None),
                                    run(LoRARequest("second", 2, paths[1])))

    try:
        got = asyncio.run(both())
    finally:
        asyncio.run(engine.shutdown())
    assert got == [_hf_greedy(refs[0], prompt), _hf_greedy(hf, prompt),
                   _hf_greedy(refs[1], prompt)]


def test_errors_before_anything_is_queued(setup, tmp_path):
    hf, base, paths, _ = setup
    plain = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=32)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate([[1, 2]], GREEDY, use_tqdm=False,
                       lora_request=LoRARequest("x", 1, paths[0]))
    llm = LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=32,
              enable_lora=True, max_loras=1, max_lora_rank=2)
    with pytest.raises(LoRAError, match="max_lora_rank"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("big", 1, paths[0]))
    with pytest.raises(LoRAError, match="adapter_config.json"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("none", 3, str(tmp_path)))
    llm.generate([[1, 2]], GREEDY, use_tqdm=False, lora_request=LoRARequest("s", 2, paths[1]))
    with pytest.raises(ValueError, match="already names"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("s", 2, paths[0]))
    assert not llm.llm_engine.requests
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, paths[0])
    with pytest.raises(ValueError, match="speculative"):
        LLM(base, dtype="float32", device="cpu", tokenizer=None, num_kv_blocks=32,
            enable_lora=True, speculative_config={"method": "ngram",
                                                  "num_speculative_tokens": 2})
