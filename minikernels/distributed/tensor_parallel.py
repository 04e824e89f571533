"""Tensor-parallel model step across processes: rank 0 is the engine's process.

    engine process (rank 0)                      worker process (rank r = 1..N-1)
    scheduler, sampler, KV block manager
    TensorParallelModel.forward(ids, meta, kv)
      link.send(header) to every worker   --->   header = inbox.recv()
      dist.broadcast(each step tensor)     <-->   dist.broadcast(into empty tensors)
      shard forward (all-reduces, gather)  <-->   shard forward on its own KV cache
      -> full-vocab logits                        (logits dropped)

The header (command, tensor shapes / dtypes, ints) travels on a *link*: a multiprocessing
queue per worker when the engine spawned its workers (:mod:`.launch`; not a collective, so
an idle engine never hits a collective timeout), or ``broadcast_object_list`` on a gloo
control group with a long timeout under torchrun (:mod:`.torchrun`). The tensors go
through ``dist.broadcast`` on the model's group (gloo on CPU, NCCL on GPU: no host round
trip).

Commands, in the order rank 0 sends them (every rank executes the same sequence):
  ("alloc", num_blocks, block_size, dtype, layout, num_state_slots)
                                                  allocate this rank's KV caches (and its
                                                  recurrent state slots: hybrid models)
  ("copy_states", src, dst)                       copy recurrent state slots src[i] ->
                                                  dst[i] (state checkpoints, snapshots)
  ("lora_init", max_loras, max_lora_rank)         LoRA slots on this rank's shard
  ("lora_activate", slot, adapter)                write an adapter's shard into a slot
  ("lora_deactivate", slot)                       zero a slot
  ("forward", spec, ints, use_cache)              one eager step
  ("graphs", runner_cls, sizes, width, vocab, with_lora, layout, with_state)
                                                  capture decode CUDA graphs (:mod:`.graphs`)
  ("replay", spec, ints, True)                    one decode step through those graphs
  ("load_weights", [(name, shape, dtype), ...])   receive full HF-named tensors (one
                                                  broadcast each) and copy this rank's
                                                  shard of each in place (RL weight sync)
  ("sleep", level)                                drop the graphs, empty the weights (a
                                                  host copy at level 1), LoRA slots (a
                                                  host copy) and KV caches in place
  ("wake", tags)                                  refill "weights" / "kv_cache" (zeroed)
  ("stop",)                                       leave the loop
A step's spec carries "lora_slots" (each token's adapter slot, int32 [T]) when the step
has adapters; a worker with LoRA slots runs a step without it on the base model.
"""
from __future__ import annotations

import logging
import queue as queue_mod
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.metadata import AttentionMetadata
from ..models.parallel import TensorParallel

logger = logging.getLogger("minikernels")

_META_TENSORS = ("positions", "slot_mapping", "decode_block_table", "decode_seq_lens",
                 "cu_seqlens_q", "cu_seqlens_k", "prefill_block_table", "logits_indices",
                 "state_indices", "has_initial_state")
_META_INTS = ("num_decode", "max_seqlen_q", "max_seqlen_k")
#: a hybrid KV pool's per-group tensors (AttentionMetadata.group_meta), sent as
#: "group<g>.<name>"
_GROUP_TENSORS = ("slot_mapping", "decode_block_table", "prefill_block_table")
POLL_S = 2.0


# --------------------------------------------------------------------- header links
class Link(Protocol):
    """Rank 0's side of the header channel: ``send`` one command to every worker."""

    def send(self, cmd: tuple) -> None: ...


class QueueLink:
    """Headers to local workers, one multiprocessing queue each."""

    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def send(self, cmd: tuple) -> None:
        for q in self.queues:
            q.put(cmd)


def queue_inbox(commands: Any, parent: Any) -> Callable[[], tuple | None]:
    """A worker's receive function over its queue: None once ``parent`` (the engine's
    process) has died, so an orphaned worker exits at its next poll."""
    def recv() -> tuple | None:
        while True:
            try:
                return commands.get(timeout=POLL_S)
            except queue_mod.Empty:
                if parent is not None and not parent.is_alive():
                    return None
    return recv


class CollectiveLink:
    """Headers by ``broadcast_object_list`` from global rank 0 on a (gloo) control group:
    works across machines (torchrun). Rank 0 calls :meth:`send`, the others :meth:`recv`."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def send(self, cmd: tuple) -> None:
        dist.broadcast_object_list([cmd], src=0, group=self.group)

    def recv(self) -> tuple | None:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


# --------------------------------------------------------------------- the step RPC
def step_header(command: str, input_ids: Tensor, meta: AttentionMetadata,
                use_cache: bool, lora_slots: Tensor | None = None) -> tuple:
    """(command, [(name, shape, dtype)], ints, use_cache) of one step."""
    spec = [("input_ids", tuple(input_ids.shape), input_ids.dtype)]
    for name, t in _named_tensors(meta):
        spec.append((name, tuple(t.shape), t.dtype))
    if lora_slots is not None:
        spec.append(("lora_slots", tuple(lora_slots.shape), lora_slots.dtype))
    ints: dict[str, Any] = {name: int(getattr(meta, name)) for name in _META_INTS}
    if meta.layer_group is not None:             # hybrid KV pools (models/kv_layout.py)
        ints["layer_group"] = tuple(meta.layer_group)
    return (command, spec, ints, use_cache)


def _named_tensors(meta: AttentionMetadata) -> list[tuple[str, Tensor]]:
    """The step's metadata tensors by name (groups' as "group<g>.<name>"), in send order."""
    out = [(n, getattr(meta, n)) for n in _META_TENSORS if getattr(meta, n) is not None]
    for g, gm in enumerate(meta.group_meta or ()):
        out += [(f"group{g}.{n}", getattr(gm, n)) for n in _GROUP_TENSORS
                if getattr(gm, n) is not None]
    return out


def step_tensors(input_ids: Tensor, meta: AttentionMetadata,
                 lora_slots: Tensor | None = None) -> list[Tensor]:
    """The tensors of a step, in the order of :func:`step_header`'s spec."""
    tensors = [input_ids] + [t for _, t in _named_tensors(meta)]
    return tensors if lora_slots is None else tensors + [lora_slots]


def broadcast_step(tensors: list[Tensor], group: Any = None) -> None:
    """Every tensor from global rank 0 to the group (in place on the receivers)."""
    for t in tensors:
        dist.broadcast(t, src=0, group=group)


def receive_step(spec: list, ints: dict[str, int], device: torch.device,
                 group: Any = None) -> "Step":
    """A worker's side of :func:`broadcast_step`: the step's ids, metadata, LoRA slots."""
    tensors = [torch.empty(shape, dtype=dt, device=device) for _, shape, dt in spec]
    broadcast_step(tensors, group)
    fields = {name: t for (name, _, _), t in zip(spec, tensors)}
    ids = fields.pop("input_ids")
    lora_slots = fields.pop("lora_slots", None)
    ints = dict(ints)
    layer_group = ints.pop("layer_group", None)
    groups: dict[int, dict[str, Tensor]] = {}
    for name in [n for n in fields if n.startswith("group")]:
        g, field = name[len("group"):].split(".", 1)
        groups.setdefault(int(g), {})[field] = fields.pop(name)
    meta = AttentionMetadata(**fields, **ints)
    if layer_group is not None:
        order = [groups.get(g, {}) for g in range(max(layer_group))]
        meta.with_group_tables([d.get("slot_mapping") for d in order],
                               [d.get("decode_block_table") for d in order],
                               [d.get("prefill_block_table") for d in order], layer_group)
    return Step(ids, meta, lora_slots)


@dataclass
class Step:
    """What a decode-graph runner's ``run`` reads (ModelRunner's StepInputs has these)."""

    input_ids: Tensor
    meta: AttentionMetadata
    lora_slots: Tensor | None = None     # int32 [T]: each token's LoRA slot (-1: none)


def serve_steps(model: torch.nn.Module, tp: TensorParallel, device: torch.device,
                recv: Callable[[], tuple | None]) -> None:
    """A worker's loop: run every command rank 0 sends until "stop" (or recv -> None)."""
    from .. import _validation
    from ..models.lora import LoRAManager

    kv_caches = None
    graphs = None
    lora: LoRAManager | None = None
    asleep = _WorkerSleep()
    while True:
        cmd = recv()
        if cmd is None or cmd[0] == "stop":
            return
        kind = cmd[0]
        if kind == "alloc":
            _, num_blocks, block_size, dtype, layout, num_state_slots = cmd
            extra = {"layout": layout} if layout is not None else {}
            if num_state_slots:
                extra["num_state_slots"] = num_state_slots
            kv_caches = model.allocate_kv_caches(num_blocks, block_size, dtype=dtype, **extra)
        elif kind == "copy_states":
            model.copy_state_slots(kv_caches, cmd[1], cmd[2])
        elif kind == "lora_init":
            lora = LoRAManager(model, cmd[1], cmd[2])
        elif kind == "lora_activate":
            lora.activate(cmd[1], cmd[2])
        elif kind == "lora_deactivate":
            lora.deactivate(cmd[1])
        elif kind == "graphs":
            _, runner_cls, sizes, width, vocab, with_lora, layout, with_state = cmd
            extra = {"lora": lora} if with_lora else {}
            if layout is not None:
                extra["kv_layout"] = layout
            if with_state:
                extra["with_state"] = True
            graphs = runner_cls(model, kv_caches, sizes, width, vocab, **extra)
        elif kind == "load_weights":
            from ..models.weight_update import load_weights

            for name, shape, dtype in cmd[1]:
                t = torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(t, src=0, group=tp.group)
                with torch.inference_mode(False):
                    load_weights(model, [(name, t)])
        elif kind == "sleep":
            graphs = None
            asleep.sleep(model, lora, kv_caches, cmd[1])
        elif kind == "wake":
            asleep.wake(kv_caches, cmd[1])
        elif kind in ("forward", "replay"):
            _, spec, ints, use_cache = cmd
            step = receive_step(spec, ints, device, tp.group)
            with torch.inference_mode(), _validation.index_checks(False):
                if kind == "replay":
                    if graphs is None or graphs.run(step) is None:
                        raise RuntimeError("replay without a captured bucket for it")
                else:
                    if lora is not None:
                        lora.set_token_slots(step.lora_slots)
                    model(step.input_ids, step.meta, kv_caches if use_cache else None)
        else:
            raise RuntimeError(f"unknown tensor-parallel command {kind!r}")


class _WorkerSleep:
    """A worker's side of sleep mode (engine/sleep.py): what it emptied, to refill."""

    def __init__(self) -> None:
        self.weights: list = []
        self.kv_shapes: list | None = None

    def sleep(self, model: torch.nn.Module, lora: Any, kv_caches: list | None,
              level: int) -> None:
        from ..engine.sleep import empty_kv_caches, offload, offload_tensors

        self.weights = offload(model, keep=level == 1)
        if lora is not None:
            self.weights += offload_tensors(lora.tensors(), lambda t: True)
        if kv_caches is not None:
            self.kv_shapes = empty_kv_caches(kv_caches)
        if torch.cuda.is_available():     # hand the freed memory back to the device
            torch.cuda.empty_cache()

    def wake(self, kv_caches: list | None, tags: list[str]) -> None:
        from ..engine.sleep import refill_kv_caches, reload

        if "weights" in tags:
            reload(self.weights)
        if "kv_cache" in tags and self.kv_shapes is not None:
            refill_kv_caches(kv_caches, self.kv_shapes)
            self.kv_shapes = None


class TensorParallelModel(torch.nn.Module):
    """Rank 0's shard plus the RPC to the other ranks; the engine drives it like a
    CausalLM (forward, allocate_kv_caches, kv_bytes_per_token, config, device, dtype).

    ``forward`` sends the step to every worker, broadcasts its tensors and runs rank 0's
    shard; it returns the full-vocab logits. KV caches: each rank holds its own heads'
    caches; the list the engine gets is rank 0's. :meth:`close` stops the workers (also at
    garbage collection and interpreter exit). ``decode_graphs_class``: the ModelRunner
    builds its decode CUDA graphs with it, so the workers capture and replay in lock step.
    """

    def __init__(self, model: torch.nn.Module, tp: TensorParallel, link: Link,
                 closer: Callable[[], None]) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.tp = tp
        self.tensor_parallel_size = tp.size
        self.name_or_path = getattr(model, "name_or_path", None)
        self.quantization = getattr(model, "quantization", None)
        self._link = link
        self._finalizer = weakref.finalize(self, closer)
        self.lora: Any = None     # a TensorParallelLoRA once lora_manager() made one

    @property
    def decode_graphs_class(self) -> type:
        from .graphs import TensorParallelDecodeGraphs

        return TensorParallelDecodeGraphs

    @property
    def supports_cuda_graphs(self) -> bool:
        """NCCL collectives are capturable; gloo (CPU) ones are not."""
        return (self.device.type == "cuda" and dist.is_initialized()
                and dist.get_backend(self.tp.group) == "nccl")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_capture(self) -> Any:
        """Rank 0's shard's (models/decoder.py ``HiddenCapture``): its residual stream
        and final norm are whole after each all-reduce, so an EAGLE head on rank 0 reads
        the states there."""
        return self.model.hidden_capture

    @hidden_capture.setter
    def hidden_capture(self, capture: Any) -> None:
        self.model.hidden_capture = capture

    @property
    def device(self) -> torch.device:
        return self.model.device

    def send(self, cmd: tuple) -> None:
        """One command to every worker (see the module docstring)."""
        if not self._finalizer.alive:
            raise RuntimeError("the tensor-parallel workers were stopped (close() was called)")
        self._link.send(cmd)

    def send_step(self, command: str, input_ids: Tensor, meta: AttentionMetadata,
                  use_cache: bool, lora_slots: Tensor | None = None) -> None:
        """Header + broadcast of one step's tensors (the workers then run it)."""
        self.send(step_header(command, input_ids, meta, use_cache, lora_slots))
        broadcast_step([t.contiguous() for t in step_tensors(input_ids, meta, lora_slots)],
                       self.tp.group)

    def forward(self, input_ids: Tensor, meta: AttentionMetadata,
                kv_caches: list | None = None) -> Tensor:
        slots = self.lora.token_slots if self.lora is not None else None
        self.send_step("forward", input_ids, meta, kv_caches is not None, slots)
        return self.model(input_ids, meta, kv_caches)

    def lora_manager(self, max_loras: int, max_lora_rank: int) -> Any:
        """LoRA slots on every rank (:class:`.lora.TensorParallelLoRA`): the engine's
        EngineLoRA uses this instead of a LoRAManager on the model."""
        from .lora import TensorParallelLoRA

        self.lora = TensorParallelLoRA(self, max_loras, max_lora_rank)
        return self.lora

    def load_weights(self, weights: Any) -> int:
        """RL weight sync on every rank (models/weight_update.py ``load_weights``): each
        full HF-named tensor is loaded into rank 0's shard first (a bad name, dtype or
        shape raises there, before any worker sees it), then broadcast to the workers,
        which copy their own rows / columns of it. Returns how many tensors rank 0
        loaded."""
        from collections.abc import Mapping

        from ..models.weight_update import load_weights

        items = weights.items() if isinstance(weights, Mapping) else weights
        count, batch = 0, []
        try:
            for name, tensor in items:
                if not isinstance(tensor, Tensor):
                    raise ValueError(f"load_weights: {name!r} is not a tensor")
                t = tensor.detach().to(self.device).contiguous()
                n = load_weights(self.model, [(name, t)])
                if n:          # (ignored names, a tied lm_head: nothing to send)
                    count += n
                    batch.append((name, t))
                if len(batch) == 32:
                    self._send_weights(batch)
                    batch = []
        finally:       # what rank 0 loaded, the workers load too
            self._send_weights(batch)
        return count

    def _send_weights(self, batch: list[tuple[str, Tensor]]) -> None:
        if batch:
            self.send(("load_weights", [(n, tuple(t.shape), t.dtype) for n, t in batch]))
            for _, t in batch:
                dist.broadcast(t, src=0, group=self.tp.group)

    def sleep(self, level: int) -> None:
        """The workers' side of ``LLMEngine.sleep`` (rank 0 empties its own shard)."""
        self.send(("sleep", int(level)))

    def wake_up(self, tags: list[str]) -> None:
        """The workers' side of ``LLMEngine.wake_up`` (before graphs are captured)."""
        self.send(("wake", sorted(tags)))

    def allocate_kv_caches(self, num_blocks: int, block_size: int,
                           dtype: torch.dtype | None = None, layout: Any = None,
                           num_state_slots: int = 0) -> list:
        """Every rank's pool (its own kv heads), with the same (hybrid) layout, and its
        recurrent state slots (each rank's channels / heads of every state)."""
        extra: dict[str, Any] = {"layout": layout} if layout is not None else {}
        if num_state_slots:
            extra["num_state_slots"] = int(num_state_slots)
        caches = self.model.allocate_kv_caches(num_blocks, block_size, dtype=dtype, **extra)
        self.send(("alloc", int(num_blocks), int(block_size), dtype, layout,
                   int(num_state_slots)))
        return caches

    def copy_state_slots(self, kv_caches: list, src: list[int], dst: list[int]) -> None:
        """Recurrent state slots src[i] -> dst[i] on every rank (in command order, so
        between the same steps everywhere)."""
        self.send(("copy_states", list(src), list(dst)))
        self.model.copy_state_slots(kv_caches, src, dst)

    def state_tensors(self, kv_caches: list) -> list[Tensor]:
        return self.model.state_tensors(kv_caches)

    def state_bytes_per_slot(self) -> int:
        """Per rank (each rank's slots hold its own channels / heads of a state)."""
        return self.model.state_bytes_per_slot()

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return self.model.kv_cache_shape(num_blocks, block_size)

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None, layout: Any = None) -> int:
        """Per rank (each rank's pool holds its own kv heads)."""
        return self.model.kv_bytes_per_token(dtype, **({"layout": layout} if layout else {}))

    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    def linear_layers(self) -> list:
        return self.model.linear_layers()

    def close(self) -> None:
        """Stop the workers (and leave the process group once nothing else uses it)."""
        self._finalizer()
