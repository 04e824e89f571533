"""Decode CUDA graphs under tensor parallel: every rank captures and replays in lock step.

The engine's ModelRunner builds its decode graphs with ``model.decode_graphs_class``; for
a :class:`~.tensor_parallel.TensorParallelModel` that is :class:`TensorParallelDecodeGraphs`:

capture   rank 0 sends ("graphs", runner_cls, sizes, width, vocab, with_lora, layout,
          with_state), then every
          rank builds ``runner_cls(its shard, its KV caches, sizes, width, vocab)`` (with
          ``lora=`` its own LoRA slots when the engine has adapters) -- by default the
          engine's own single-GPU runner (model_runner._DecodeGraphs). The same class with
          the same arguments makes the same warm-up forwards and captures the same buckets
          in the same order on every rank, so the collectives inside them (NCCL all-reduces
          and the logits all-gather, which are capturable) match one to one.
replay    for a decode-only step that fits a bucket, rank 0 sends ("replay", header) and
          broadcasts the step's tensors (as an eager step does, the step's LoRA slots
          included); then every rank's runner copies them into its static buffers (the
          graphs read each token's slot from one) and replays the same bucket (the choice
          depends only on the batch size and the block-table width, both in the header).
          The replayed graphs' collectives meet each other.
otherwise rank 0 returns None and the ModelRunner runs the step eagerly (a "forward").

Only NCCL collectives can be captured: the engine keeps a gloo (CPU) model eager, and the
ModelRunner captures nothing off CUDA anyway. Tests drive this protocol on CPU with a
runner class that computes eagerly what a graph would (tests/test_tensor_parallel_tp4.py).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .tensor_parallel import TensorParallelModel


def default_runner_class() -> type:
    """The single-GPU decode-graph runner every rank uses (the engine's own)."""
    from ..engine.model_runner import _DecodeGraphs

    return _DecodeGraphs


def _bucket(sizes: list[int], n: int) -> int | None:
    from ..engine.model_runner import pick_graph_size

    return pick_graph_size(n, sizes)


class TensorParallelDecodeGraphs:
    """Rank 0's decode graphs; drives the workers' copies (module docstring).

    Same constructor and ``run`` as the ModelRunner's single-GPU runner. runner_cls: the
    per-rank runner (picklable by reference: it travels to the workers in the command).
    """

    def __init__(self, model: TensorParallelModel, kv_caches: list, sizes: list[int],
                 max_blocks_per_seq: int, vocab: int, runner_cls: type | None = None,
                 lora: Any = None, kv_layout: Any = None, with_state: bool = False) -> None:
        runner_cls = runner_cls or default_runner_class()
        self.model = model
        self.sizes = list(sizes)
        self.width = int(max_blocks_per_seq)
        model.send(("graphs", runner_cls, self.sizes, self.width, int(vocab),
                    lora is not None, kv_layout, bool(with_state)))
        # lora: the engine's TensorParallelLoRA; rank 0's runner reads its local slots
        extra = {"lora": lora.local} if lora is not None else {}
        if kv_layout is not None:     # hybrid KV pools: the groups' static buffers
            extra["kv_layout"] = kv_layout
        if with_state:                # recurrent layers: each row's state slot
            extra["with_state"] = True
        self.inner = runner_cls(model.model, kv_caches, self.sizes, self.width, int(vocab),
                                **extra)

    def fits(self, num_decode: int, width: int) -> bool:
        """Whether a decode-only step of this batch size / block-table width replays."""
        return _bucket(self.sizes, num_decode) is not None and width <= self.width

    def run(self, inputs: Any) -> Tensor | None:
        """Replay on every rank; None (nothing sent) when no bucket fits."""
        meta = inputs.meta
        if not self.fits(int(meta.num_decode), int(meta.decode_block_table.shape[1])):
            return None
        self.model.send_step("replay", inputs.input_ids, meta, True,
                             getattr(inputs, "lora_slots", None))
        out = self.inner.run(inputs)
        if out is None:   # the workers have replayed: this rank must have too
            raise RuntimeError("tensor-parallel decode graphs out of lock step: rank 0 "
                               "found no bucket for a step its workers replayed")
        return out
