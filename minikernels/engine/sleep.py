"""Sleep mode: free an idle engine's GPU memory and get it back (vLLM's ``LLM.sleep`` /
``LLM.wake_up``), e.g. for an RL loop that trains on the same GPU between generations.

Level 1 copies every weight to host memory (page-locked on CUDA) and frees it on the
device; level 2 frees the weights without a copy (they come back zeroed: load new ones
with ``LLM.load_weights``; buffers such as rotary tables are kept on the host either way). Both free the KV pool (and an EAGLE head's, a draft model's)
and drop the CUDA graphs. Tensors are emptied in place (``t.data`` set to an empty
tensor), never replaced, so every module and cache list keeps its references; waking up
refills them (weights from the host copies, caches zeroed) and captures the graphs
again. The prefix cache is reset (the K/V is gone).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _Offloaded:
    tensor: Tensor
    shape: torch.Size
    host: Tensor | None          # None: discarded (level 2)


def offload(module: nn.Module, keep: bool) -> list[_Offloaded]:
    """Empty every parameter and buffer of ``module`` in place (each shared tensor once),
    keeping a host copy of the parameters when ``keep`` and of the buffers always (rotary
    tables, fp8 KV scales: nothing a weight update brings back; vLLM keeps them too)."""
    params = {id(p) for p in module.parameters()}
    return offload_tensors(itertools.chain(module.parameters(), module.buffers()),
                           lambda t: keep or id(t) not in params)


def offload_tensors(tensors: "Iterable[Tensor]", keep: "Callable[[Tensor], bool]"
                    ) -> list[_Offloaded]:
    """Empty each of ``tensors`` in place (each shared tensor once), keeping a host copy
    (page-locked on CUDA) of those ``keep`` selects; LoRA slots: every one."""
    out, seen = [], set()
    for t in tensors:
        if id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        host = None
        if keep(t):
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                               pin_memory=t.device.type == "cuda")
            host.copy_(t.detach())
        out.append(_Offloaded(t, t.shape, host))
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return out


def empty_kv_caches(kv_caches: list) -> list[tuple[torch.Size, torch.dtype]]:
    """Free a KV pool's memory in place (its tensors stay, empty, so every holder keeps
    them); returns each entry's (shape, dtype) for :func:`refill_kv_caches`."""
    shapes = [(t.shape, t.dtype) for pair in kv_caches for t in pair]
    for pair in kv_caches:
        for t in pair:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return shapes


def refill_kv_caches(kv_caches: list, shapes: list[tuple[torch.Size, torch.dtype]]) -> None:
    """Give :func:`empty_kv_caches`'s pool back, zeroed (hybrid pools share tensors
    between layers: each is refilled once, from its first entry's shape)."""
    it = iter(shapes)
    done: set[int] = set()
    for pair in kv_caches:
        for t in pair:
            shape, dtype = next(it)
            if id(t) not in done:
                done.add(id(t))
                t.data = torch.zeros(shape, dtype=dtype, device=t.device)


def reload(saved: list[_Offloaded]) -> None:
    """Refill what :func:`offload` emptied (from the host copies, else zeroed)."""
    for s in saved:
        t = s.tensor
        if s.host is None:
            t.data = torch.zeros(s.shape, dtype=t.dtype, device=t.device)
        else:
            t.data = s.host.to(t.device, non_blocking=True)
    saved.clear()
