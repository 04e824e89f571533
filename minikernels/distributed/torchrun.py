"""Tensor parallel under an existing torchrun process group (one node or several).

``torchrun`` starts every rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; each runs the same program (e.g. ``minikernels serve MODEL -tp N``, or a
script calling ``LLM(MODEL, tensor_parallel_size=N)``). :func:`attach_tensor_parallel`
(called by ``launch_tensor_parallel`` when it sees that environment):

- joins the default group with ``init_method="env://"`` (NCCL on cuda:LOCAL_RANK, gloo on
  the CPU) unless the program already did, and builds this rank's shard of the model
  (tensor parallel over the whole world: WORLD_SIZE must equal tensor_parallel_size);
- creates a gloo *control group* (long timeout) for the step headers, which travel by
  ``broadcast_object_list`` from rank 0 (there is no shared queue across machines);
- rank 0 returns the :class:`TensorParallelModel` its engine drives; every other rank
  runs the worker loop until rank 0 stops it, then exits the process (``SystemExit(0)``:
  the rest of the program, e.g. the HTTP server, runs on rank 0 only).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..models.parallel import TensorParallel
from .launch import gather_errors, load_shard
from .tensor_parallel import CollectiveLink, TensorParallelModel, serve_steps

logger = logging.getLogger("minikernels")

# An idle server sends no header for as long as nobody asks; the control group must not
# time out meanwhile.
CONTROL_TIMEOUT = timedelta(days=30)
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_torchrun() -> bool:
    """True when this process is one rank of a torchrun (or equivalent env://) launch of
    more than one process."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def _device(device: str | torch.device | None) -> torch.device:
    from ..models.loader import default_device

    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def attach_tensor_parallel(model: str, tensor_parallel_size: int, *,
                           device: str | torch.device | None = None,
                           **load_kwargs: Any) -> TensorParallelModel:
    """Rank 0: the model (module docstring). Other ranks: serve, then ``SystemExit(0)``."""
    from ..models.loader import resolve_model

    dev = _device(device)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                init_method="env://")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != int(tensor_parallel_size):
        raise ValueError(f"under torchrun tensor_parallel_size ({tensor_parallel_size}) must "
                         f"equal the world size ({world})")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    tp = TensorParallel.from_default_group()
    model = resolve_model(model, load_kwargs.pop("revision", None))  # each node its own
    shard, error = load_shard(tp, dev, dict(load_kwargs, model=model))
    errors = gather_errors(error, world, group=control)
    if errors:
        dist.destroy_process_group()
        raise RuntimeError("tensor-parallel load failed: " + "; ".join(errors))
    link = CollectiveLink(control)
    if rank != 0:
        try:
            serve_steps(shard, tp, dev, link.recv)
            # meet rank 0's _stop: no rank tears its group down while a peer still
            # talks on it (gloo aborts a process whose peer vanishes mid-collective)
            dist.barrier(group=control)
        finally:
            dist.destroy_process_group()
        raise SystemExit(0)
    shard.name_or_path = model
    logger.info("minikernels: tensor parallel over %d torchrun ranks (%s)", world,
                dist.get_backend())
    return TensorParallelModel(shard, tp, link, lambda: _stop(link))


def _stop(link: CollectiveLink) -> None:
    if not dist.is_initialized():
        return
    try:
        link.send(("stop",))
        dist.barrier(group=link.group)      # every rank has left its loop (see above)
    finally:
        dist.destroy_process_group()
