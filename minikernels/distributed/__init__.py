"""Running the decoder on several processes with torch.distributed (docs/parallel.md).

- :func:`launch_tensor_parallel`: start ranks 1..N-1 as worker processes
  (torch.multiprocessing, spawn) and make this process rank 0 -- or, under torchrun,
  join its process group (:mod:`.torchrun`); returns a :class:`TensorParallelModel` the
  engine drives like a CausalLM.
- :func:`launch_tensor_parallel_groups`: several tensor-parallel models in one launch
  (data parallel x tensor parallel in one server).
- :func:`init_process_group`: gloo on CPU, NCCL on CUDA, a TCP rendezvous on 127.0.0.1.
- :mod:`.graphs`: decode CUDA graphs captured and replayed in lock step on every rank.
- The sharded model itself: :mod:`minikernels.models.parallel`.
"""
from __future__ import annotations

from .launch import (free_port, init_process_group, launch_tensor_parallel,
                     launch_tensor_parallel_groups)
from .tensor_parallel import TensorParallelModel

__all__ = ["TensorParallelModel", "free_port", "init_process_group", "launch_tensor_parallel",
           "launch_tensor_parallel_groups"]
