"""Tensor parallel over 4 gloo ranks on CPU (oversubscribed on 2 cores: the models are
tiny). TP=4 logits equal TP=1 within fp32 tolerance (dense) and int4 tolerance for two
families whose 2 KV heads are fewer than the 4 ranks (each kv head replicated on 2 ranks;
split KV heads are covered at TP=2); greedy ``LLM.generate`` token-identical, its decode
steps through the lock-step decode-graph protocol with an eager stand-in for CUDA graphs.

One spawn of 4 ranks runs every logits case; the generate test launches its own 3
workers through ``LLM(tensor_parallel_size=4)``."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_ranks
from test_model_support import make_hf_model, random_tokens, save_hf
from test_tensor_parallel import _rank_main, check_logits

from minikernels.engine.model_runner import pick_graph_size
from minikernels.models import AttentionMetadata

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


@pytest.mark.slow   # spawns worker processes (small: run in CI)
def test_tp4_logits_equal_tp1(tp4_dirs, tmp_path):
    from minikernels.distributed import free_port

    spawn_ranks(_rank_main, (4, free_port(), tp4_dirs, str(tmp_path), {}, (None, "int4"),
                             GROUP4), 4)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(4)]
    check_logits(ranks, tp4_dirs, (None, "int4"), GROUP4)


class EagerGraphs:
    """The decode-graph runner's stand-in on CPU (same constructor and ``run`` as
    model_runner._DecodeGraphs): "capture" runs each bucket's forward from the static
    buffers, largest first (its collectives must meet the other ranks'); "replay" copies
    the step into the static buffers, pads the bucket (slot -1, seq_len 0) and runs it
    eagerly -- what the graph would compute. Every event goes to $MK_TP_GRAPH_LOG/rank{r}.
    ``lora``: the rank's LoRA slots, read from a static slot buffer as the graphs do;
    ``with_state``: recurrent layers' state slots, from a static buffer too."""

    def __init__(self, model: torch.nn.Module, kv_caches: list, sizes: list[int],
                 width: int, vocab: int, lora: object = None, with_state: bool = False) -> None:
        top = sizes[-1]
        self.model, self.kv_caches, self.sizes, self.width = model, kv_caches, sizes, width
        self.lora = lora
        self.state_indices = torch.full((top,), -1, dtype=torch.int32) if with_state else None
        self.lora_slots = torch.full((top,), -1, dtype=torch.int32)
        self.input_ids = torch.zeros(top, dtype=torch.int64)
        self.positions = torch.zeros(top, dtype=torch.int64)
        self.slots = torch.full((top,), -1, dtype=torch.int64)
        self.block_table = torch.zeros(top, width, dtype=torch.int32)
        self.seq_lens = torch.zeros(top, dtype=torch.int32)
        for bs in reversed(sizes):
            self._forward(bs)
            self._log("capture", bs)

    def _log(self, *event: object) -> None:
        path = os.path.join(os.environ["MK_TP_GRAPH_LOG"], f"rank{dist.get_rank()}")
        with open(path, "a") as f:
            f.write(" ".join(map(str, event)) + "\n")

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(positions=self.positions[:bs], slot_mapping=self.slots[:bs],
                                 num_decode=bs, decode_block_table=self.block_table[:bs],
                                 decode_seq_lens=self.seq_lens[:bs], logits_indices=None,
                                 state_indices=None if self.state_indices is None else
                                 self.state_indices[:bs])
        if self.lora is not None:
            self.lora.set_token_slots(self.lora_slots[:bs])
        return self.model(self.input_ids[:bs], meta, self.kv_caches)

    def run(self, inputs: object) -> torch.Tensor | None:
        meta = inputs.meta
        n, w = meta.num_decode, meta.decode_block_table.shape[1]
        bs = pick_graph_size(n, self.sizes)
        if bs is None or w > self.width:
            return None
        self.input_ids[:n] = inputs.input_ids
        self.positions[:n] = meta.positions
        self.slots[:n] = meta.slot_mapping
        self.slots[n:bs] = -1
        self.seq_lens[:n] = meta.decode_seq_lens
        self.seq_lens[n:bs] = 0
        self.block_table[:n, :w] = meta.decode_block_table
        if self.state_indices is not None:
            self.state_indices[:n] = meta.state_indices
            self.state_indices[n:bs] = -1
        if self.lora is not None:
            self.lora_slots[:bs] = -1
            if inputs.lora_slots is not None:
                self.lora_slots[:n] = inputs.lora_slots
            self._log("replay", bs, n, "lora", self.lora_slots[:bs].tolist())
            return self._forward(bs).index_select(0, meta.logits_indices)
        self._log("replay", bs, n)
        return self._forward(bs).index_select(0, meta.logits_indices)


@pytest.mark.slow   # spawns worker processes (small: run in CI)
def test_llm_generate_tp4_token_identical(tp4_dirs, tmp_path, monkeypatch):
    """LLM(tensor_parallel_size=4), 2 kv heads over 4 ranks: greedy tokens equal TP=1
    through chunked prefill, a cached prefix and batched decode -- with the decode steps
    going through the lock-step decode-graph protocol (distributed/graphs.py) with
    :class:`EagerGraphs` standing in for CUDA graphs: every rank logs the same captures
    and the same replays in the same order."""
    import minikernels as mk
    from minikernels.distributed.graphs import TensorParallelDecodeGraphs
    from minikernels.engine.model_runner import graph_batch_sizes

    monkeypatch.setenv("MK_TP_GRAPH_LOG", str(tmp_path))   # before the workers spawn
    path = tp4_dirs["llama-kv2"]
    prompts = [random_tokens(n, 300, 40 + n) for n in (6, 19)]
    prompts.append(prompts[1][:13] + [9])                # shares a cached prefix
    params = mk.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", tokenizer=None, block_size=4, num_kv_blocks=48,
              max_num_batched_tokens=12, max_num_seqs=3)
    want = [o.outputs[0].token_ids for o in mk.LLM(path, **kw).generate(prompts, params)]
    llm = mk.LLM(path, tensor_parallel_size=4, **kw)
    try:
        model, runner = llm.llm_engine.model, llm.llm_engine.runner
        assert model.tensor_parallel_size == 4 and not model.supports_cuda_graphs
        assert runner.graphs is None                       # gloo: the engine stays eager
        runner.graphs = TensorParallelDecodeGraphs(
            model, runner.kv_caches, graph_batch_sizes(3), runner.max_blocks_per_seq,
            model.config.vocab_size, runner_cls=EagerGraphs)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.llm_engine.model.close()
    assert got == want
    logs = [open(os.path.join(tmp_path, f"rank{r}")).read().split("\n") for r in range(4)]
    assert all(log == logs[0] for log in logs), logs
    assert logs[0][:3] == ["capture 3", "capture 2", "capture 1"]
    assert sum(e.startswith("replay") for e in logs[0]) >= 4, logs[0]
