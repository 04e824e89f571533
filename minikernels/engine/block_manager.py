"""KV-cache block manager: ref-counted blocks, a free list, and a prefix cache.

The KV pool is ``num_blocks`` blocks of ``block_size`` token slots. A sequence holds a
block table (block ids in token order); token ``t`` lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Prefix caching. A *full* block is identified by a chained hash
``h_i = SHA-256(h_{i-1} || tokens of block i as int64)``, so equal hashes mean equal whole
prefixes.
When a sequence's tokens covering a full block are scheduled, the block is registered
under its hash. A new sequence first looks up its prompt's full blocks: each hit is
shared (ref_count + 1) instead of recomputed. A block whose ref_count drops to 0 goes to
the free list but keeps its hash and contents, so a later request can still hit it; it
is evicted (hash dropped) only when the free list hands it out again, least recently
freed first. Hits are also verified against the block's stored token ids. The tokens
before the block are trusted to the chained hash, which is cryptographic: a predictable
hash (Python's ``hash``) would let a crafted prompt collide with another user's prefix
and be served its K/V.

Accounting: every block is either in the free list (ref_count 0) or referenced by
``ref_count`` block-table entries of live sequences. ``check_invariants`` asserts it.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .sequence import Sequence


def chain_hash(prev_hash: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 digest of a full block, chained to the digest of the block before it
    (None for the first block)."""
    h = hashlib.sha256(prev_hash if prev_hash is not None else b"\x00" * 32)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


class BlockManager:
    """Allocates KV blocks to sequences (see the module docstring).

    Args:
        num_blocks: blocks in the pool (>= 1).
        block_size: token slots per block (>= 1).
        enable_prefix_caching: share full blocks of equal prefixes between sequences.
    """

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        # Counters (prefix-cache efficiency).
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _seq_hashes(self, seq: "Sequence", num_full_blocks: int) -> list[bytes]:
        """Extend seq.block_hashes to cover its first ``num_full_blocks`` full blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            prev = hashes[-1] if hashes else None
            hashes.append(chain_hash(prev, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes

    def lookup_prefix(self, seq: "Sequence") -> list[int]:
        """Block ids caching the longest prefix of ``seq``'s full blocks (no refs taken).

        At least one token is always left to compute (the last one gives the logits), so
        hits stop at block ``(num_tokens - 1) // block_size``.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._seq_hashes(seq, max_blocks)
        hits: list[int] = []
        bs = self.block_size
        for i in range(max_blocks):
            block_id = self.cached.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # hash collision: never serve another prefix's K/V
            hits.append(block_id)
        return hits

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            block.token_ids = None
        block.ref_count = 1
        return block

    def allocate(self, seq: "Sequence", num_new_tokens: int, cached_blocks: list[int] = (),
                 reserve_blocks: int = 0) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq`` (after its computed ones).

        cached_blocks (only for a sequence holding no blocks): prefix-cache hits from
        lookup_prefix; they are shared and count as computed tokens. reserve_blocks: fail
        unless this many blocks stay free afterwards (admission watermark). Returns False,
        changing nothing, when the pool is too small.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if cached_blocks and seq.block_table:
            raise ValueError("cached_blocks can only be given for a sequence with no blocks")
        num_computed = len(cached_blocks) * self.block_size if cached_blocks \
            else seq.num_computed_tokens
        total = num_computed + num_new_tokens
        have = len(cached_blocks) if cached_blocks else len(seq.block_table)
        need = max(0, self.blocks_needed(total) - have)
        hits_in_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if need + hits_in_free + reserve_blocks > len(self.free):
            return False
        if not seq.block_table:
            self.num_queried_tokens += seq.num_tokens
        if cached_blocks:
            for b in cached_blocks:
                block = self.blocks[b]
                if block.ref_count == 0:
                    del self.free[b]
                block.ref_count += 1
            seq.block_table = list(cached_blocks)
            seq.num_computed_tokens = num_computed
            seq.num_registered_blocks = len(cached_blocks)
            self.num_hit_tokens += num_computed
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, total // self.block_size)
        return True

    def _register_full_blocks(self, seq: "Sequence", num_full: int) -> None:
        """Offer seq's blocks [num_registered, num_full) to the prefix cache.

        Called when the tokens filling them are scheduled: their K/V is written by the
        same forward, before any layer attends, so a sequence scheduled later in the
        same step may already share them.
        """
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._seq_hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            h = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached[h] = block.block_id
        seq.num_registered_blocks = num_full

    def free_seq(self, seq: "Sequence") -> None:
        """Release all of seq's blocks (last block first, so prefixes are evicted last)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
            elif block.ref_count < 0:  # pragma: no cover - a bug, never user input
                raise RuntimeError(f"block {block_id} freed more often than allocated")
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget all cached hashes (blocks in use keep their contents)."""
        for block in self.blocks:
            block.hash = None
            block.token_ids = None
        self.cached.clear()

    # ------------------------------------------------------------------ checks
    def check_invariants(self, live_seqs: list["Sequence"] = ()) -> None:
        """Raise AssertionError if the accounting is inconsistent (tests, debugging).

        live_seqs: every sequence currently holding blocks.
        """
        refs = [0] * self.num_blocks
        for seq in live_seqs:
            for b in seq.block_table:
                refs[b] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], \
                f"{block}: ref_count {block.ref_count} != {refs[block.block_id]} table refs"
            assert (block.ref_count == 0) == (block.block_id in self.free), \
                f"{block}: free-list membership disagrees with ref_count"
        for h, b in self.cached.items():
            assert self.blocks[b].hash == h, f"cached hash {h} -> {self.blocks[b]}"
