"""Running the decoder on several processes with torch.distributed (docs/parallel.md).

- :func:`launch_tensor_parallel`: start ranks 1..N-1 as worker processes
  (torch.multiprocessing, spawn) and make this process rank 0; returns a
  :class:`TensorParallelModel` the engine drives like a CausalLM.
- :func:`init_process_group`: gloo on CPU, NCCL on CUDA, a TCP rendezvous on 127.0.0.1.
- The sharded model itself: :mod:`minikernels.models.parallel`.
"""
from __future__ import annotations

from .tensor_parallel import (TensorParallelModel, free_port, init_process_group,
                              launch_tensor_parallel)

__all__ = ["TensorParallelModel", "free_port", "init_process_group", "launch_tensor_parallel"]
