"""LoRA adapter slots on every rank of a tensor-parallel model.

The engine's :class:`~minikernels.engine.lora.EngineLoRA` drives one object with
LoRAManager's interface (``activate`` / ``deactivate`` / ``set_token_slots`` /
``token_slots`` / ``names``). Under tensor parallel that object is a
:class:`TensorParallelLoRA`: rank 0 keeps a LoRAManager on its own shard, and every slot
change travels to the workers as a command ("lora_activate", slot, adapter) /
("lora_deactivate", slot), which each worker applies to its own LoRAManager, so all ranks
hold the same adapters in the same slots, each its shard of them
(:mod:`minikernels.models.lora`: column-parallel B rows, row-parallel A columns). Each
step's token slots ride with the step's tensors (``TensorParallelModel.send_step``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..models.lora import LoRAAdapter, LoRAManager

if TYPE_CHECKING:
    from .tensor_parallel import TensorParallelModel


class TensorParallelLoRA:
    """Rank 0's LoRA slots plus the commands that keep the workers' slots the same."""

    def __init__(self, model: "TensorParallelModel", max_loras: int,
                 max_lora_rank: int) -> None:
        self.local = LoRAManager(model.model, max_loras, max_lora_rank)  # checks the args
        self.model = model
        model.send(("lora_init", max_loras, max_lora_rank))

    @property
    def max_loras(self) -> int:
        return self.local.max_loras

    @property
    def max_lora_rank(self) -> int:
        return self.local.max_lora_rank

    @property
    def names(self) -> list[str | None]:
        return self.local.names

    def activate(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write ``adapter`` into ``slot`` on every rank (rank 0 first: a bad slot or rank
        raises here before any worker changes)."""
        self.local.activate(slot, adapter)
        self.model.send(("lora_activate", slot, adapter))

    def deactivate(self, slot: int) -> None:
        self.local.deactivate(slot)
        self.model.send(("lora_deactivate", slot))

    def tensors(self) -> list[Tensor]:
        """Rank 0's slot tensors (each worker empties its own on "sleep")."""
        return self.local.tensors()

    def set_token_slots(self, token_slots: Tensor | None) -> None:
        """The next steps' token slots (sent to the workers with each step)."""
        self.local.set_token_slots(token_slots)

    @property
    def token_slots(self) -> Tensor | None:
        return self.local.token_slots
