"""Tensor parallel over 4 gloo ranks on CPU (oversubscribed on 2 cores: the models are
tiny). TP=4 logits equal TP=1 within fp32 tolerance (dense) and int4 tolerance for two
families whose 2 KV heads are fewer than the 4 ranks (each kv head replicated on 2 ranks;
split KV heads are covered at TP=2); greedy ``LLM.generate`` token-identical.

One spawn of 4 ranks runs every logits case; the generate test launches its own 3
workers through ``LLM(tensor_parallel_size=4)``."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_model_support import make_hf_model, random_tokens, save_hf
from test_tensor_parallel import _rank_main, check_logits

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TP4_CASES = {
    "llama-kv2": ("llama", {}),                       # 4 heads, 2 kv heads: replicated
    "qwen3-kv2": ("qwen3", {}),                       # q/k norm, head_dim 32, replicated
}
# 16 divides every per-rank K at 4 ranks (o_proj: 1 head of 16 / 32; down: 128 / 4 = 32),
# so each rank's int4 weights are slices of the TP=1 int4 weights at group 16.
GROUP4 = 16


@pytest.fixture(scope="module")
def tp4_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {name: save_hf(make_hf_model(kind, **over), str(tmp_path_factory.mktemp(name)))
            for name, (kind, over) in TP4_CASES.items()}


def test_tp4_logits_equal_tp1(tp4_dirs, tmp_path):
    from minikernels.distributed import free_port

    mp.spawn(_rank_main, args=(4, free_port(), tp4_dirs, str(tmp_path), {}, (None, "int4"),
                               GROUP4), nprocs=4, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(4)]
    check_logits(ranks, tp4_dirs, (None, "int4"), GROUP4)


def test_llm_generate_tp4_token_identical(tp4_dirs):
    """LLM(tensor_parallel_size=4), 2 kv heads over 4 ranks: greedy tokens equal TP=1
    through chunked prefill, a cached prefix and batched decode."""
    import minikernels as mk

    path = tp4_dirs["llama-kv2"]
    prompts = [random_tokens(n, 300, 40 + n) for n in (6, 19)]
    prompts.append(prompts[1][:13] + [9])                # shares a cached prefix
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=48,
              max_num_batched_tokens=12, max_num_seqs=3)
    want = [o.outputs[0].token_ids for o in mk.LLM(path, **kw).generate(prompts, params)]
    llm = mk.LLM(path, tensor_parallel_size=4, **kw)
    try:
        assert llm.llm_engine.model.tensor_parallel_size == 4
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.llm_engine.model.close()
    assert got == want
