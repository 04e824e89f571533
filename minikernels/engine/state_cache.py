"""Prefix caching for hybrid recurrent models: recurrent states checkpointed at aligned
positions.

A prefix-cache hit on the attention layers' KV blocks is useless to a recurrent layer
(LFM2's conv, Qwen3.5's Gated DeltaNet, Mamba-2) unless its state *at the end of the
hit* is known too. So every ``interval`` tokens (a multiple of the block size) a
sequence's state slot is copied into a checkpoint slot, keyed by the chained hash of the
block that ends there (the same hashes as the KV prefix cache: a key names the whole
prefix and its cache salt). A new sequence's KV hits are cut back to the longest prefix
that ends at a checkpoint; its slot starts from that checkpoint's copy.

- **Where checkpoints are taken.** The scheduler ends prefill chunks at interval
  boundaries (``align_chunk``), so after a step a sequence's slot holds its state exactly
  at one; decode steps reach boundaries on their own. The engine copies those slots right
  after launching the forward (stream order: before the next step changes them) and keys
  them once the tokens that end the boundary are known on the host (async scheduling can
  leave the last one on the device for a step): :meth:`register_pending`. Speculative
  rows are never checkpointed (their slot may hold rejected drafts).
- **Slots.** ``num_slots`` fixed slots of the state pool after the running sequences'
  (and the speculative snapshots'); the least recently used checkpoint is overwritten when
  none is free. A checkpoint whose KV blocks were evicted is simply not hit (hits are cut
  to the KV hits first).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .block_manager import BlockManager
    from .sequence import Sequence


class StateCheckpoints:
    """Checkpoint slots ``first_slot .. first_slot + num_slots - 1`` of the state pool,
    one every ``interval_blocks`` blocks of ``block_size`` tokens (see the module
    docstring)."""

    def __init__(self, first_slot: int, num_slots: int, interval_blocks: int,
                 block_size: int) -> None:
        if num_slots < 1 or interval_blocks < 1:
            raise ValueError(f"state checkpoints need >= 1 slot and an interval >= 1 block, "
                             f"got {num_slots} slots, {interval_blocks} blocks")
        self.interval_blocks = int(interval_blocks)
        self.block_size = int(block_size)
        self.interval = self.interval_blocks * self.block_size      # tokens
        self.free: list[int] = list(range(first_slot + num_slots - 1, first_slot - 1, -1))
        self.by_hash: OrderedDict[bytes, int] = OrderedDict()   # LRU order, oldest first
        self.slot_key: dict[int, bytes] = {}
        # copied but not keyed yet: (sequence, blocks up to the boundary, slot)
        self.pending: list[tuple[Sequence, int, int]] = []
        self.num_hits = 0

    # ------------------------------------------------------------------ scheduling
    def align_chunk(self, computed: int, n: int) -> int:
        """A prefill chunk of ``n`` tokens after ``computed`` ones, cut to end at the next
        checkpoint boundary when it would run past it."""
        boundary = (computed // self.interval + 1) * self.interval
        return min(n, boundary - computed)

    def cut_hits(self, seq: "Sequence", hits: list[int], bm: "BlockManager") -> int:
        """How many of ``seq``'s KV hits to keep: the longest prefix ending at a keyed
        checkpoint (0: none). Remembers the checkpoint's slot in ``seq.state_restore``."""
        self.register_pending(bm)
        seq.state_restore = -1
        k = (len(hits) // self.interval_blocks) * self.interval_blocks
        hashes = seq.block_hashes
        while k > 0:
            slot = self.by_hash.get(hashes[k - 1])
            if slot is not None:
                self.by_hash.move_to_end(hashes[k - 1])
                seq.state_restore = slot
                return k
            k -= self.interval_blocks
        return 0

    # ------------------------------------------------------------------ checkpoints
    def take(self) -> int | None:
        """A slot to copy a new checkpoint into: a free one, else the least recently used
        checkpoint's (forgotten); None when every slot waits to be keyed."""
        if self.free:
            return self.free.pop()
        if not self.by_hash:
            return None
        key, slot = self.by_hash.popitem(last=False)
        del self.slot_key[slot]
        return slot

    def add_pending(self, seq: "Sequence", num_blocks: int, slot: int) -> None:
        self.pending.append((seq, num_blocks, slot))

    def register_pending(self, bm: "BlockManager") -> None:
        """Key the copied checkpoints whose boundary tokens are all known now."""
        if not self.pending:
            return
        bs, keep = self.block_size, []
        for seq, nb, slot in self.pending:
            if len(seq.token_ids) < nb * bs:
                keep.append((seq, nb, slot))
                continue
            key = bm.hashes_up_to(seq, nb)[nb - 1]
            if key in self.by_hash:              # (already checkpointed: a duplicate)
                self.free.append(slot)
                self.by_hash.move_to_end(key)
                continue
            self.by_hash[key] = slot
            self.slot_key[slot] = key
        self.pending = keep

    def checkpoints_to_take(self, seqs: "list[Sequence]", ends: list[int],
                            skip: Callable[[int], bool]) -> list[tuple[int, int]]:
        """(row of ``seqs``, blocks) for each sequence this step brings exactly to a
        boundary (``ends[i]``: its computed tokens after the step), except rows ``skip``
        names."""
        iv = self.interval
        return [(i, e // self.block_size) for i, e in enumerate(ends)
                if e and e % iv == 0 and not skip(i)]

    def clear(self) -> None:
        """Forget every checkpoint (their slots' contents are gone: sleep, a reset)."""
        self.free.extend(self.by_hash.values())
        self.free.extend(slot for _, _, slot in self.pending)
        self.by_hash.clear()
        self.slot_key.clear()
        self.pending.clear()
