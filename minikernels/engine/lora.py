"""LoRA adapters in the engine: ``LoRARequest`` (vLLM's) and the slots they run in.

    llm = LLM(model, enable_lora=True, max_loras=4, max_lora_rank=16)
    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "path/to/adapter"))

A request names its adapter with a LoRARequest (``lora_int_id`` identifies it; the
adapter is read from ``lora_path`` the first time that id is seen, kept on the host after
that). Up to ``max_loras`` adapters are on the device at once, in the slots of
:class:`minikernels.models.lora.LoRAManager`; a waiting request is admitted only when its
adapter is in a slot or a slot can take it (a slot no running sequence uses: the least
recently used is rewritten), so a step never mixes more than ``max_loras`` adapters;
requests whose adapter must wait are skipped, not blocking the queue behind them. Each
step's tokens carry their sequence's slot (-1: the base model). Different adapters never
share prefix-cache entries: the adapter's id salts the request's cache key.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..models.lora import LoRAAdapter, LoRAError, LoRAManager

if TYPE_CHECKING:
    from .scheduler import ScheduledBatch
    from .sequence import Sequence


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter for a request (vLLM's names): its name, a positive id that
    identifies it (the same id must always mean the same adapter), its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty str")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) \
                or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an int >= 1, got "
                             f"{self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("LoRARequest.lora_path must be a non-empty str")


class EngineLoRA:
    """The engine's adapter slots (see the module docstring)."""

    def __init__(self, model: Any, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int | None = None) -> None:
        # a tensor-parallel model brings slots kept the same on every rank
        make = getattr(model, "lora_manager", None)
        self.manager = (make(max_loras, max_lora_rank) if make is not None
                        else LoRAManager(model, max_loras, max_lora_rank))
        self.config = model.config
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or 0, max_loras, 8)
        self._adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._paths: dict[int, str] = {}
        self.slot_of: dict[int, int] = {}
        self.in_slot: list[int | None] = [None] * max_loras
        self._used_at = [0] * max_loras
        self._clock = 0
        self.running: Any = ()        # the scheduler's running sequences (set by the engine)

    # ------------------------------------------------------------------ requests
    def check(self, request: LoRARequest) -> None:
        """Load (once per id) and validate a request's adapter: LoRAError / ValueError
        naming what is wrong, before the request is queued."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got "
                            f"{type(request).__name__}")
        known = self._paths.get(request.lora_int_id)
        if known is not None and known != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} already names the adapter at "
                             f"{known!r}, not {request.lora_path!r}")
        self._adapter(request)

    def _adapter(self, request: LoRARequest) -> LoRAAdapter:
        lid = request.lora_int_id
        adapter = self._adapters.get(lid)
        if adapter is None:
            adapter = LoRAAdapter.load(request.lora_path, self.config, request.lora_name)
            if adapter.needed_rank() > self.manager.max_lora_rank:
                raise LoRAError(f"adapter {request.lora_name!r} needs max_lora_rank >= "
                                f"{adapter.needed_rank()} (rank {adapter.rank}), above "
                                f"max_lora_rank {self.manager.max_lora_rank}")
            self._adapters[lid] = adapter
            self._paths[lid] = request.lora_path
            while len(self._adapters) > self.max_cpu_loras:
                old, _ = self._adapters.popitem(last=False)
                if old not in self.slot_of:
                    self._paths.pop(old, None)
        self._adapters.move_to_end(lid)
        return adapter

    # ------------------------------------------------------------------ scheduling
    @staticmethod
    def _id(seq: "Sequence") -> int | None:
        lr = seq.request.params.lora_request
        return None if lr is None else lr.lora_int_id

    def admit(self, seq: "Sequence") -> bool:
        """Whether a waiting sequence can run now (its adapter is, or can be, in a slot);
        rewrites a free slot when needed."""
        lid = self._id(seq)
        if lid is None:
            return True
        self._clock += 1
        slot = self.slot_of.get(lid)
        if slot is not None:
            self._used_at[slot] = self._clock
            return True
        busy = {self.slot_of[i] for i in map(self._id, self.running)
                if i is not None and i in self.slot_of}
        free = [s for s in range(self.max_loras) if s not in busy]
        if not free:
            return False
        slot = min(free, key=lambda s: (self.in_slot[s] is not None, self._used_at[s]))
        old = self.in_slot[slot]
        if old is not None:
            del self.slot_of[old]
        self.manager.activate(slot, self._adapter(seq.request.params.lora_request))
        self.in_slot[slot] = lid
        self.slot_of[lid] = slot
        self._used_at[slot] = self._clock
        return True

    def token_slots(self, batch: "ScheduledBatch", device: torch.device) -> Tensor | None:
        """Each input token's slot for this step's batch (int32 [T]), None when no
        sequence in it has an adapter."""
        ids = [self._id(s) for s in batch.seqs]
        if all(i is None for i in ids):
            return None
        per_seq = np.array([-1 if i is None else self.slot_of[i] for i in ids],
                           dtype=np.int32)
        slots = np.repeat(per_seq, np.asarray(batch.num_new_tokens, dtype=np.int64))
        return torch.from_numpy(slots).to(device, non_blocking=True)
