"""Start tensor-parallel workers on this machine (torch.multiprocessing, spawn).

Workers start with ``spawn`` by default. ``MK_WORKER_MULTIPROC_METHOD=forkserver`` (as
vLLM's VLLM_WORKER_MULTIPROC_METHOD) forks them from a server process that imported torch
and minikernels once, so every launch after the first skips that import (~2-4 s a worker
on a CPU; the test suite uses it). Either way a worker runs with the launching process's
environment as it was at the launch (:func:`worker_context`, :func:`run_with_environment`).

One launch holds ``dp`` tensor-parallel groups of ``tp`` ranks each (``dp = 1``: plain
tensor parallel; ``dp > 1``: data parallel x tensor parallel in one server). This process
is global rank 0 and rank 0 of *every* group (it runs each replica's engine); the workers
are the other ranks:

    world size     1 + dp * (tp - 1)         one TCP rendezvous, one free port per launch
    group i        global ranks [0] + [1 + i*(tp-1) + (r-1) for r in 1..tp-1]
    devices        replica i's rank r on cuda:(i*tp + r) (rank 0's shard of replica i on
                   cuda:i*tp, in this process); all on the CPU with gloo

With ``dp == 1`` the group is the default group; otherwise every process creates all the
groups (``dist.new_group``, the same calls in the same order) and keeps its own.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models.parallel import TensorParallel
from .tensor_parallel import QueueLink, TensorParallelModel, queue_inbox, serve_steps

logger = logging.getLogger("minikernels")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, world_size: int, port: int, device_type: str,
                       timeout_s: float = 600.0, device_index: int | None = None
                       ) -> TensorParallel:
    """The default process group over a TCP rendezvous on 127.0.0.1:port (NCCL for cuda,
    else gloo) -> a :class:`TensorParallel` over all of it. device_index: this process's
    GPU (default: its rank)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank if device_index is None else device_index)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, world_size, None)


#: Worker start methods (MK_WORKER_MULTIPROC_METHOD); "spawn" is the default.
WORKER_START_METHODS = ("spawn", "forkserver")
#: What a forkserver imports once, before it forks any worker.
FORKSERVER_PRELOAD = ["torch", "minikernels.distributed.launch", "minikernels.models.loader"]


def worker_start_method() -> str:
    """MK_WORKER_MULTIPROC_METHOD: "spawn" (default) or "forkserver"."""
    method = os.environ.get("MK_WORKER_MULTIPROC_METHOD", "") or "spawn"
    if method not in WORKER_START_METHODS:
        raise ValueError(f"MK_WORKER_MULTIPROC_METHOD must be one of "
                         f"{', '.join(WORKER_START_METHODS)}, got {method!r}")
    return method


def worker_context() -> Any:
    """The multiprocessing context workers start from (:func:`worker_start_method`); a
    forkserver preloads FORKSERVER_PRELOAD. Start workers through
    :func:`run_with_environment` so that a forked one sees the current environment (the
    server's is the one it had when it started)."""
    method = worker_start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def run_with_environment(target: Any, environ: dict[str, str], *args: Any) -> Any:
    """Process entry: replace os.environ with ``environ`` (the launcher's, taken at the
    launch), then ``target(*args)``."""
    os.environ.clear()
    os.environ.update(environ)
    return target(*args)


def rank_device(device_type: str, index: int) -> torch.device:
    return torch.device("cuda", index) if device_type == "cuda" else torch.device("cpu")


def load_shard(tp: TensorParallel, device: torch.device, load_kwargs: dict[str, Any]
               ) -> tuple[torch.nn.Module | None, str | None]:
    """(this rank's shard, None) or (None, the error as text for rank 0 to raise)."""
    from ..models.loader import load_model

    try:
        return load_model(device=device, tensor_parallel=tp, **load_kwargs), None
    except Exception as exc:  # reported to rank 0, which raises it
        return None, f"rank {tp.rank}: {type(exc).__name__}: {exc}"


def gather_errors(error: str | None, world: int, group: Any = None) -> list[str]:
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error, group=group)
    return [e for e in errors if e]


@dataclass(frozen=True)
class Layout:
    """Ranks and devices of ``dp`` tensor-parallel groups of ``tp`` (module docstring)."""

    tp: int
    dp: int = 1

    @property
    def world(self) -> int:
        return 1 + self.dp * (self.tp - 1)

    def global_rank(self, replica: int, rank: int) -> int:
        return 0 if rank == 0 else 1 + replica * (self.tp - 1) + rank - 1

    def group_ranks(self, replica: int) -> list[int]:
        return [self.global_rank(replica, r) for r in range(self.tp)]

    def place(self, global_rank: int) -> tuple[int, int]:
        """(replica, rank in its group) of a worker's global rank (>= 1)."""
        replica, off = divmod(global_rank - 1, self.tp - 1)
        return replica, off + 1

    def device_index(self, replica: int, rank: int) -> int:
        return replica * self.tp + rank

    def make_groups(self) -> list[Any]:
        """Every replica's group (None = the default group when dp == 1); every process
        of the launch calls this once, in the same order."""
        if self.dp == 1:
            return [None]
        return [dist.new_group(self.group_ranks(i)) for i in range(self.dp)]


def _worker_main(global_rank: int, layout: Layout, port: int, device_type: str,
                 load_kwargs: dict[str, Any], commands: Any) -> None:
    """A worker: join the launch's groups, load this rank's shard, serve the steps."""
    replica, rank = layout.place(global_rank)
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.world))
    index = layout.device_index(replica, rank)
    init_process_group(global_rank, layout.world, port, device_type, device_index=index)
    try:
        tp = TensorParallel(rank, layout.tp, layout.make_groups()[replica])
        device = rank_device(device_type, index)
        model, error = load_shard(tp, device, load_kwargs)
        if gather_errors(error, layout.world):
            return
        serve_steps(model, tp, device, queue_inbox(commands, mp.parent_process()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Launch:
    """Rank 0's handle on the launch's workers: each replica's model closes its own
    workers; the process group is left when the last one closes."""

    def __init__(self, queues: list[list[Any]], procs: list[list[Any]]) -> None:
        self.queues = queues
        self.procs = procs
        self.open = len(queues)

    def closer(self, replica: int) -> Any:
        return lambda: self.close(replica)

    def close(self, replica: int) -> None:
        _stop(self.queues[replica], self.procs[replica])
        self.open -= 1
        if self.open <= 0 and dist.is_initialized():
            dist.destroy_process_group()

    def close_all(self) -> None:
        for i in range(len(self.queues)):
            _stop(self.queues[i], self.procs[i])
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(queues: list[Any], procs: list[Any]) -> None:
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


def launch_tensor_parallel_groups(model: str, tensor_parallel_size: int,
                                  data_parallel_size: int = 1, *,
                                  device: str | torch.device | None = None,
                                  **load_kwargs: Any) -> list[TensorParallelModel]:
    """``data_parallel_size`` tensor-parallel models of ``tensor_parallel_size`` ranks
    each, one launch (module docstring): spawn the workers, load rank 0's shards here.

    model: a HF directory, hub id or built-in name (as ``load_model``); load_kwargs:
    dtype, quantization, seed, group_size, revision ... of ``load_model``. device: "cuda"
    (NCCL) or "cpu" (gloo). This process becomes rank 0 of the default process group,
    which must not exist yet.
    """
    from ..models.loader import default_device, resolve_model

    n, m = int(tensor_parallel_size), int(data_parallel_size)
    if n < 2 or m < 1:
        raise ValueError(f"a tensor-parallel launch needs tensor_parallel_size >= 2 and "
                         f"data_parallel_size >= 1, got {n} and {m}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; "
                           "tensor_parallel_size > 1 starts its own process group")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and torch.cuda.device_count() < n * m:
        raise ValueError(f"tensor_parallel_size {n} x data_parallel_size {m} needs {n * m} "
                         f"GPUs, {torch.cuda.device_count()} visible")
    model = resolve_model(model, load_kwargs.pop("revision", None))  # download once, here
    load_kwargs = dict(load_kwargs, model=model)
    layout = Layout(n, m)
    port = free_port()
    ctx = worker_context()
    queues = [[ctx.Queue() for _ in range(n - 1)] for _ in range(m)]
    procs: list[list[Any]] = [[] for _ in range(m)]
    launch = _Launch(queues, procs)
    for i in range(m):
        for r in range(1, n):
            g = layout.global_rank(i, r)
            p = ctx.Process(target=run_with_environment, daemon=True,
                            name=f"minikernels-tp{g}",
                            args=(_worker_main, dict(os.environ), g, layout, port, dev.type,
                                  load_kwargs, queues[i][r - 1]))
            p.start()
            procs[i].append(p)
    try:
        init_process_group(0, layout.world, port, dev.type, device_index=0)
        groups = layout.make_groups()
        shards, errors = [], []
        for i in range(m):
            tp = TensorParallel(0, n, groups[i])
            shard, error = load_shard(tp, rank_device(dev.type, layout.device_index(i, 0)),
                                      load_kwargs)
            shards.append((shard, tp))
            errors.append(error)
        joined = "; ".join(e for e in errors if e) or None
        errors = gather_errors(joined, layout.world)
    except BaseException:
        launch.close_all()
        raise
    if errors:
        launch.close_all()
        raise RuntimeError("tensor-parallel load failed: " + "; ".join(errors))
    logger.info("minikernels: tensor parallel over %d ranks x %d replicas (%s)", n, m,
                "nccl" if dev.type == "cuda" else "gloo")
    models = []
    for i, (shard, tp) in enumerate(shards):
        shard.name_or_path = model
        models.append(TensorParallelModel(shard, tp, QueueLink(queues[i]), launch.closer(i)))
    return models


def launch_tensor_parallel(model: str, tensor_parallel_size: int, *,
                           device: str | torch.device | None = None,
                           **load_kwargs: Any) -> TensorParallelModel:
    """One tensor-parallel model: under torchrun (RANK / WORLD_SIZE / MASTER_ADDR set)
    join its process group (:func:`.torchrun.attach_tensor_parallel`; on ranks > 0 that
    serves the steps and exits); else start ranks 1..N-1 here as spawned workers."""
    from .torchrun import attach_tensor_parallel, in_torchrun

    if in_torchrun():
        return attach_tensor_parallel(model, tensor_parallel_size, device=device,
                                      **load_kwargs)
    return launch_tensor_parallel_groups(model, tensor_parallel_size, 1, device=device,
                                         **load_kwargs)[0]
