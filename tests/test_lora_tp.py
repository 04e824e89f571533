"""LoRA adapters under tensor parallel (gloo, spawned ranks): each rank's slots hold its
shard of every adapter (column-parallel B rows, row-parallel A columns), slot changes
reach every rank, and each step's token slots ride with the step. Greedy tokens of mixed
requests (two adapters + the base model, one slot so adapters swap mid-run) equal TP=1,
eagerly and through the lock-step decode-graph protocol with a CPU stand-in for the
graphs; the shard math checked against slices of the whole adapter without processes."""
from __future__ import annotations

import os

import pytest
import torch
from test_lora import ALL, make_adapter
from test_model_support import make_hf_model, random_tokens, save_hf

from minikernels.models import load_model
from minikernels.models.lora import LoRAAdapter, LoRAManager
from minikernels.models.parallel import TensorParallel

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _greedy(llm, prompts: list, params, which: list) -> list[list[int]]:
    return [o.outputs[0].token_ids
            for o in llm.generate(prompts, params, use_tqdm=False, lora_request=which)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # one kv head on two ranks: k / v rows of B are replicated, not split
    hf = make_hf_model("qwen2-tied", seed=5, num_key_value_heads=1)
    base = save_hf(hf, str(tmp_path_factory.mktemp("base")))
    paths = []
    for i, (r, targets) in enumerate([(4, ALL), (8, ["k_proj", "o_proj", "up_proj",
                                                     "down_proj"])]):
        path = str(tmp_path_factory.mktemp(f"lora{i}"))
        make_adapter(hf, path, r=r, alpha=3 * r, targets=targets, seed=20 + i)
        paths.append(path)
    return base, paths


def test_rank_slots_are_slices_of_the_whole_adapter(setup):
    """Without processes: each rank's slot weights are the matching rows / columns of the
    TP=1 slot weights (q rows split, the one kv head's rows whole on both ranks, gate / up
    rows and o / down columns split)."""
    base, paths = setup
    adapter = None
    whole = load_model(base, dtype=torch.float32, device="cpu")
    adapter = LoRAAdapter.load(paths[0], whole.config, "a")
    full = LoRAManager(whole, max_loras=2, max_lora_rank=8)
    full.activate(1, adapter)
    c = whole.config
    hd, nq = c.head_dim, c.num_heads
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        shard = load_model(base, dtype=torch.float32, device="cpu", tensor_parallel=tp)
        mgr = LoRAManager(shard, max_loras=2, max_lora_rank=8)
        mgr.activate(1, adapter)
        for name, lora in mgr._layers.items():
            ref = full._layers[name]
            a, b, ra, rb = lora.a[1], lora.b[1], ref.a[1], ref.b[1]
            if name.endswith("qkv_proj"):
                q = slice(rank * nq // 2 * hd, (rank + 1) * nq // 2 * hd)
                want_b = torch.cat([rb[q], rb[nq * hd:]])        # q rows split, kv whole
                assert torch.equal(a, ra) and torch.equal(b, want_b), name
            elif name.endswith("gate_up_proj"):
                i = c.intermediate_size
                half = slice(rank * i // 2, (rank + 1) * i // 2)
                want_b = torch.cat([rb[half], rb[i:][half]])
                assert torch.equal(a, ra) and torch.equal(b, want_b), name
            else:                                               # o_proj, down_proj
                k = ra.shape[1] // 2
                assert torch.equal(a, ra[:, rank * k:(rank + 1) * k]) and torch.equal(b, rb)


@pytest.mark.slow   # spawns a worker process (small: run in CI)
def test_tp2_lora_requests_token_identical_to_tp1(setup, tmp_path, monkeypatch):
    import minikernels as mk
    from minikernels.distributed.graphs import TensorParallelDecodeGraphs
    from minikernels.engine import LoRARequest
    from minikernels.engine.model_runner import graph_batch_sizes
    from test_tensor_parallel_tp4 import EagerGraphs

    monkeypatch.setenv("MK_TP_GRAPH_LOG", str(tmp_path))   # before the worker spawns
    base, paths = setup
    lora = [LoRARequest("first", 1, paths[0]), LoRARequest("second", 2, paths[1])]
    prompts = [random_tokens(n, 300, 60 + n) for n in (9, 6, 14, 7)]
    which = [lora[0], None, lora[1], lora[0]]
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=64,
              max_num_batched_tokens=16, max_num_seqs=3, enable_lora=True, max_loras=1,
              max_lora_rank=8)

    want = _greedy(mk.LLM(base, **kw), prompts, params, which)
    llm = mk.LLM(base, tensor_parallel_size=2, **kw)
    try:
        eager = _greedy(llm, prompts, params, which)
        # the same through the decode-graph protocol (every rank's runner reads its slots
        # from a static buffer, as CUDA graphs do)
        model, runner = llm.llm_engine.model, llm.llm_engine.runner
        runner.graphs = TensorParallelDecodeGraphs(
            model, runner.kv_caches, graph_batch_sizes(3), runner.max_blocks_per_seq,
            model.config.vocab_size, runner_cls=EagerGraphs, lora=llm.llm_engine.lora.manager)
        replayed = _greedy(llm, prompts, params, which)
    finally:
        llm.llm_engine.model.close()
    assert eager == want
    assert replayed == want
    logs = [open(os.path.join(tmp_path, f"rank{r}")).read().split("\n") for r in range(2)]
    assert logs[0] == logs[1]
    lora_replays = [e for e in logs[0] if e.startswith("replay") and "lora" in e]
    assert len(lora_replays) >= 4 and any(" 0" in e.split("lora")[1] for e in lora_replays)


@pytest.mark.slow   # spawns a worker process (small: run in CI)
def test_tp2_expert_adapters_token_identical_to_tp1(tmp_path):
    """Qwen3-MoE with PEFT's adapter on every projection (the experts' part on their
    stacked parameters): each rank adds its intermediate slice's expert updates, summed by
    the layer's all-reduce; greedy tokens equal TP=1."""
    import minikernels as mk
    from minikernels.engine import LoRARequest

    hf = make_hf_model("qwen3-moe", seed=7)
    base = save_hf(hf, str(tmp_path / "base"))
    make_adapter(hf, str(tmp_path / "lora"), r=4, alpha=8, targets=ALL, seed=8)
    prompts = [random_tokens(n, 300, 80 + n) for n in (8, 5)]
    which = [LoRARequest("experts", 1, str(tmp_path / "lora")), None]
    params = mk.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=48,
              enable_lora=True, max_lora_rank=4)

    want = _greedy(mk.LLM(base, **kw), prompts, params, which)
    llm = mk.LLM(base, tensor_parallel_size=2, **kw)
    try:
        assert _greedy(llm, prompts, params, which) == want
    finally:
        llm.llm_engine.model.close()


@pytest.mark.slow   # spawns a worker process (small: run in CI)
def test_tp2_sleep_wake_and_weight_sync(setup, tmp_path):
    """An RL loop under TP=2 with an adapter: sleep level 1 -> the same tokens (every
    rank refills its weights, adapter slots and KV pool); level 2, wake the weights,
    load_weights(another checkpoint's full HF tensors: each rank copies its shard),
    wake the pool -> the new checkpoint's tokens, with and without the adapter (TP=1)."""
    import minikernels as mk
    from minikernels.engine import LoRARequest

    base, paths = setup
    other = make_hf_model("qwen2-tied", seed=9, num_key_value_heads=1)
    other_dir = save_hf(other, str(tmp_path / "other"))
    prompts = [random_tokens(n, 300, 90 + n) for n in (9, 6, 13)]
    which = [LoRARequest("first", 1, paths[0]), None, LoRARequest("first", 1, paths[0])]
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=48,
              enable_lora=True, max_loras=1, max_lora_rank=8)
    want = _greedy(mk.LLM(base, **kw), prompts, params, which)
    want_other = _greedy(mk.LLM(other_dir, **kw), prompts, params, which)
    assert want != want_other
    llm = mk.LLM(base, tensor_parallel_size=2, **kw)
    try:
        assert _greedy(llm, prompts, params, which) == want
        llm.sleep(level=1)
        eng = llm.llm_engine
        assert all(p.numel() == 0 for p in eng.model.parameters())
        assert all(t.numel() == 0 for t in eng.lora.manager.tensors())
        llm.wake_up()
        assert _greedy(llm, prompts, params, which) == want
        llm.sleep(level=2)
        llm.wake_up(["weights"])
        assert llm.load_weights(other.named_parameters()) > 0
        llm.wake_up(["kv_cache"])
        assert _greedy(llm, prompts, params, which) == want_other
    finally:
        llm.llm_engine.model.close()
