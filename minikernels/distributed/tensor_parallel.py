"""Tensor-parallel model step across processes: rank 0 is the engine's process.

    engine process (rank 0)                      worker process (rank r = 1..N-1)
    scheduler, sampler, KV block manager
    TensorParallelModel.forward(ids, meta, kv)
      queue.put(header) to every worker   --->   header = queue.get()
      dist.broadcast(each step tensor)     <-->   dist.broadcast(into empty tensors)
      shard forward (all-reduces, gather)  <-->   shard forward on its own KV cache
      -> full-vocab logits                        (logits dropped)

The header (command, tensor shapes / dtypes, ints) goes through a multiprocessing queue,
not a collective, so an idle engine never hits a collective timeout; the tensors go through
``dist.broadcast`` on the model's group (gloo on CPU, NCCL on GPU: no host round trip).
Commands: "forward", "alloc" (KV caches), "stop". A worker whose engine process dies
exits at its next poll.

Loading: every rank builds and reads only its own shard (``load_model(tensor_parallel=)``);
a load error on any rank is gathered and raised on rank 0.
"""
from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..models.metadata import AttentionMetadata
from ..models.parallel import TensorParallel

logger = logging.getLogger("minikernels")

_META_TENSORS = ("positions", "slot_mapping", "decode_block_table", "decode_seq_lens",
                 "cu_seqlens_q", "cu_seqlens_k", "prefill_block_table", "logits_indices")
_META_INTS = ("num_decode", "max_seqlen_q", "max_seqlen_k")
_POLL_S = 2.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, world_size: int, port: int, device_type: str,
                       timeout_s: float = 600.0) -> TensorParallel:
    """The default process group over a TCP rendezvous on 127.0.0.1:port (NCCL for cuda,
    else gloo) -> this rank's :class:`TensorParallel`."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, world_size, None)


def _rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _load(tp: TensorParallel, device: torch.device, load_kwargs: dict[str, Any]
          ) -> tuple[torch.nn.Module | None, str | None]:
    from ..models.loader import load_model

    try:
        return load_model(device=device, tensor_parallel=tp, **load_kwargs), None
    except Exception as exc:  # reported to rank 0, which raises it
        return None, f"rank {tp.rank}: {type(exc).__name__}: {exc}"


def _gather_errors(error: str | None, world: int) -> list[str]:
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error)
    return [e for e in errors if e]


# --------------------------------------------------------------------- the step RPC
def _header(input_ids: Tensor, meta: AttentionMetadata, use_cache: bool) -> tuple:
    spec = [("input_ids", tuple(input_ids.shape), input_ids.dtype)]
    for name in _META_TENSORS:
        t = getattr(meta, name)
        if t is not None:
            spec.append((name, tuple(t.shape), t.dtype))
    ints = {name: int(getattr(meta, name)) for name in _META_INTS}
    return ("forward", spec, ints, use_cache)


def _broadcast_step(tensors: list[Tensor]) -> None:
    for t in tensors:
        dist.broadcast(t, src=0)


def _worker_main(rank: int, world: int, port: int, device_type: str,
                 load_kwargs: dict[str, Any], commands: Any) -> None:
    """Rank r's loop: load the shard, then run every command rank 0 sends."""
    from .. import _validation

    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    tp = init_process_group(rank, world, port, device_type)
    device = _rank_device(device_type, rank)
    model, error = _load(tp, device, load_kwargs)
    if _gather_errors(error, world):
        dist.destroy_process_group()
        return
    kv_caches = None
    parent = mp.parent_process()
    try:
        while True:
            try:
                cmd = commands.get(timeout=_POLL_S)
            except queue_mod.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if cmd is None or cmd[0] == "stop":
                return
            if cmd[0] == "alloc":
                _, num_blocks, block_size, dtype = cmd
                kv_caches = model.allocate_kv_caches(num_blocks, block_size, dtype=dtype)
                continue
            _, spec, ints, use_cache = cmd
            tensors = [torch.empty(shape, dtype=dt, device=device) for _, shape, dt in spec]
            _broadcast_step(tensors)
            fields = {name: t for (name, _, _), t in zip(spec, tensors)}
            ids = fields.pop("input_ids")
            meta = AttentionMetadata(**fields, **ints)
            with torch.inference_mode(), _validation.index_checks(False):
                model(ids, meta, kv_caches if use_cache else None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class TensorParallelModel(torch.nn.Module):
    """Rank 0's shard plus the RPC to the other ranks; the engine drives it like a
    CausalLM (forward, allocate_kv_caches, kv_bytes_per_token, config, device, dtype).

    ``forward`` sends the step to every worker, broadcasts its tensors and runs rank 0's
    shard; it returns the full-vocab logits. KV caches: each rank holds its own heads'
    caches; the list the engine gets is rank 0's. :meth:`close` stops the workers (also at
    garbage collection and interpreter exit).
    """

    def __init__(self, model: torch.nn.Module, queues: list[Any], procs: list[Any]) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.tensor_parallel_size = len(queues) + 1
        self.name_or_path = getattr(model, "name_or_path", None)
        self.quantization = getattr(model, "quantization", None)
        self._queues = queues
        self._finalizer = weakref.finalize(self, _shutdown, queues, procs)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _send(self, cmd: tuple) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("the tensor-parallel workers were stopped (close() was called)")
        for q in self._queues:
            q.put(cmd)

    def forward(self, input_ids: Tensor, meta: AttentionMetadata,
                kv_caches: list | None = None) -> Tensor:
        self._send(_header(input_ids, meta, kv_caches is not None))
        tensors = [input_ids] + [getattr(meta, n) for n in _META_TENSORS
                                 if getattr(meta, n) is not None]
        _broadcast_step([t.contiguous() for t in tensors])
        return self.model(input_ids, meta, kv_caches)

    def allocate_kv_caches(self, num_blocks: int, block_size: int,
                           dtype: torch.dtype | None = None) -> list:
        caches = self.model.allocate_kv_caches(num_blocks, block_size, dtype=dtype)
        self._send(("alloc", int(num_blocks), int(block_size), dtype))
        return caches

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return self.model.kv_cache_shape(num_blocks, block_size)

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Per rank (each rank's pool holds its own kv heads)."""
        return self.model.kv_bytes_per_token(dtype)

    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    def linear_layers(self) -> list:
        return self.model.linear_layers()

    def close(self) -> None:
        """Stop the workers and leave the process group."""
        self._finalizer()


def _shutdown(queues: list[Any], procs: list[Any]) -> None:
    for q in queues:
        try:
            q.put(("stop",))
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_tensor_parallel(model: str, tensor_parallel_size: int, *,
                           device: str | torch.device | None = None,
                           **load_kwargs: Any) -> TensorParallelModel:
    """Start ranks 1..N-1 (spawned processes) and load rank 0's shard here.

    model: a HF directory, hub id or built-in name (as ``load_model``); load_kwargs:
    dtype, quantization, seed, group_size, ... of ``load_model``. device: "cuda" (rank r
    on cuda:r; NCCL) or "cpu" (gloo). This process becomes rank 0 of the default process
    group, which must not exist yet.
    """
    from ..models.loader import default_device, resolve_model

    n = int(tensor_parallel_size)
    if n < 2:
        raise ValueError(f"launch_tensor_parallel needs tensor_parallel_size >= 2, got {n}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; "
                           "tensor_parallel_size > 1 starts its own process group")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"tensor_parallel_size {n} needs {n} GPUs, "
                         f"{torch.cuda.device_count()} visible")
    model = resolve_model(model, load_kwargs.pop("revision", None))  # download once, here
    load_kwargs = dict(load_kwargs, model=model)
    port = free_port()
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(n - 1)]
    procs = []
    for rank in range(1, n):
        p = ctx.Process(target=_worker_main, daemon=True, name=f"minikernels-tp{rank}",
                        args=(rank, n, port, dev.type, load_kwargs, queues[rank - 1]))
        p.start()
        procs.append(p)
    try:
        tp = init_process_group(0, n, port, dev.type)
        shard, error = _load(tp, _rank_device(dev.type, 0), load_kwargs)
        errors = _gather_errors(error, n)
    except BaseException:
        _shutdown(queues, procs)
        raise
    if errors:
        _shutdown(queues, procs)
        raise RuntimeError("tensor-parallel load failed: " + "; ".join(errors))
    shard.name_or_path = load_kwargs["model"]
    logger.info("minikernels: tensor parallel over %d ranks (%s)", n,
                "nccl" if dev.type == "cuda" else "gloo")
    return TensorParallelModel(shard, queues, procs)
