"""KV-cache block manager: ref-counted blocks, a free list, and a prefix cache.

The KV pool is ``num_blocks`` blocks of ``block_size`` token slots. A sequence holds a
block table (block ids in token order); token ``t`` lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Prefix caching. A *full* block is identified by a chained hash
``h_i = SHA-256(h_{i-1} || tokens of block i as little-endian uint32)``
(token ids are validated against the vocabulary first, so they fit; 4 bytes per token
hash in ~2/3 the time of 8), so equal hashes
mean equal whole prefixes (SHA-256 is cryptographic on purpose: with a predictable hash a
crafted prompt could collide with another user's prefix and be served its K/V; with
SHA-256 an equal digest is an equal prefix, so hits are not re-compared token by token).
A request's ``SamplingParams.cache_salt`` replaces ``h_{-1}`` (zeros) by
``SHA-256("minikernels-cache-salt" || salt)``, so requests with different salts never
share a block (a server salts per API key: no cross-user timing probe of the cache).
A request that asks for ``prompt_logprobs`` never reads the cache (its prompt tokens'
logits must be computed) but still offers its blocks to it.
A prompt's block hashes are computed once, when its request is added
(:meth:`BlockManager.hash_prompt`), outside the scheduling step. When a sequence's tokens
covering a full block are scheduled (and known on the host), the block is registered
under its hash. A new sequence first looks up its prompt's full blocks: each hit is
shared (ref_count + 1) instead of recomputed. A block whose ref_count drops to 0 goes to
the free list but keeps its hash and contents, so a later request can still hit it; it
is evicted (hash dropped) only when the free list hands it out again, least recently
freed first.

Block tables. ``seq.block_table`` (a list) is mirrored in ``table``, one numpy row per
sequence holding blocks (``seq.block_row``); every change goes through this class, so
the two never disagree. The model runner gathers a step's block table from the rows in
one numpy call instead of copying each sequence's list.

Sliding-window groups (hybrid KV pools, models/kv_layout.py; ``sliding_groups`` = m > 0).
The m sliding-window KV groups hold, for each block of ``seq.block_table``, a tuple of m
more ids from the same pool (``seq.swa_blocks``, mirrored in ``swa_table[g]``). A step
whose first new token is at position c reads keys from c - window + 1 on, so
``allocate`` first returns the tuples wholly before that block to the pool (their table
entries become ``null_block``: one reserved, zeroed block, never written, that kernels
never read inside a window). Full blocks' tuples are offered to their own prefix cache
under the same chained hashes; a prefix hit of k blocks needs group 0's k blocks and the
sliding groups' blocks of the window before token k * block_size, so ``lookup_prefix``
returns the longest k that has both.

Accounting: every block is either in the free list (ref_count 0) or referenced by
``ref_count`` block-table entries of live sequences (the null block: by the manager).
``check_invariants`` asserts it.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .sequence import Sequence

_ZERO_HASH = b"\x00" * 32


def chain_hash(prev_hash: bytes | None, token_ids: Seq[int]) -> bytes:
    """SHA-256 digest of a full block, chained to the digest of the block before it
    (None for the first block)."""
    data = struct.pack(f"<{len(token_ids)}I", *token_ids)
    return hashlib.sha256((prev_hash if prev_hash is not None else _ZERO_HASH) + data).digest()


def salt_root(salt: str | None) -> bytes | None:
    """The chain's root for a cache salt (``h_{-1}``; None = unsalted, zeros).

    Domain-separated from block hashes; equal roots mean equal salts (SHA-256)."""
    if salt is None:
        return None
    return hashlib.sha256(b"minikernels-cache-salt\0"
                          + salt.encode("utf-8", "surrogatepass")).digest()


def hash_blocks(token_ids: Seq[int], block_size: int, first_block: int, num_blocks: int,
                prev_hash: bytes | None) -> list[bytes]:
    """chain_hash of blocks [first_block, first_block + num_blocks) of token_ids, chained
    from prev_hash (the hash of block first_block - 1). One pack for all tokens, one
    sha256 call per block: ~0.5 us per block plus ~6 ns per token."""
    if num_blocks <= 0:
        return []
    lo, hi = first_block * block_size, (first_block + num_blocks) * block_size
    data = struct.pack(f"<{hi - lo}I", *token_ids[lo:hi])
    sha = hashlib.sha256
    w = 4 * block_size
    prev = prev_hash if prev_hash is not None else _ZERO_HASH
    out = []
    for o in range(0, len(data), w):
        prev = sha(prev + data[o:o + w]).digest()
        out.append(prev)
    return out


def hybrid_blocks_needed(num_tokens: int, block_size: int, sliding_groups: int, window: int,
                         max_chunk: int) -> int:
    """Blocks one sequence of num_tokens tokens may hold at once in a pool with
    ``sliding_groups`` sliding-window groups (0: plain), prefilled in chunks of at most
    max_chunk tokens: its full-attention blocks, and per sliding group the blocks of the
    longest span a step reads (a chunk and the window before it)."""
    full = -(-num_tokens // block_size)
    if not sliding_groups:
        return full
    span = min(full, -(-(max_chunk + window - 1) // block_size) + 1)
    return full + sliding_groups * span


class Block:
    """One KV block: its id, its prefix-cache hash, and (a view of) its reference count,
    which lives in the manager's ``ref`` array so whole block tables are counted at once."""

    __slots__ = ("block_id", "hash", "_refs")

    def __init__(self, block_id: int, refs: np.ndarray | None = None) -> None:
        self.block_id = block_id
        self.hash: bytes | None = None
        self._refs = refs if refs is not None else np.zeros(block_id + 1, dtype=np.int32)

    @property
    def ref_count(self) -> int:
        return int(self._refs[self.block_id])

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


class PrefixHits(list):
    """lookup_prefix's result: group 0's cached block ids, and (hybrid pools) the sliding
    groups' tuples for the same blocks (None for blocks before the window)."""

    sliding: list[tuple[int, ...] | None] | None = None


class BlockManager:
    """Allocates KV blocks to sequences (see the module docstring).

    Args:
        num_blocks: blocks in the pool (>= 1).
        block_size: token slots per block (>= 1).
        enable_prefix_caching: share full blocks of equal prefixes between sequences.
        max_blocks_per_seq: width of the block-table mirror (grown on demand if None or
            too small).
        sliding_groups: m sliding-window KV groups beside group 0 (hybrid pools; 0 = none).
        sliding_window: their window in tokens (a query sees itself and window - 1 keys
            before it).
        max_rows: at most this many sequences hold blocks at once (None = no limit): a
            sequence's mirror row ``block_row`` is then in [0, max_rows), which a hybrid
            recurrent model uses as its state slot. Taking one more row raises.
    """

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True,
                 max_blocks_per_seq: int | None = None, sliding_groups: int = 0,
                 sliding_window: int = 0, max_rows: int | None = None) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        # ref[b]: block-table entries of live sequences that hold block b (numpy, so a
        # sequence's whole table is counted in one call: admitting or finishing 256
        # sequences of 33 blocks each is a few ms as per-block Python, ~0.3 ms so).
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        self.blocks = [Block(i, self.ref) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be an int >= 1 or None, got {max_rows!r}")
        self.max_rows = max_rows
        rows = 16 if max_rows is None else max_rows
        # Block-table mirror: row r holds the block ids of the sequence with block_row r.
        self.table = np.zeros((rows, max(1, max_blocks_per_seq or 16)), dtype=np.int32)
        self.row_blocks = np.zeros(rows, dtype=np.int64)   # len(block_table) per row
        self._free_rows: list[int] = list(range(rows - 1, -1, -1))
        # Counters (prefix-cache efficiency, in tokens): looked up when a sequence is
        # admitted (with prefix caching on) and served from the cache.
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0
        # EAGLE heads keep their K/V in these blocks; a hit's last block is recomputed
        # (its last position's head K/V depends on the token after the block)
        self.drop_last_hit = False
        # hybrid recurrent models: (seq, hits) -> how many hits to keep (those ending at
        # a recurrent-state checkpoint; engine/state_cache.py)
        self.hit_filter: Callable[["Sequence", list[int]], int] | None = None
        # Sliding-window groups (hybrid pools): tuples of m ids per block, their mirror,
        # their prefix cache, and the reserved null block behind every window.
        self.sliding_groups = int(sliding_groups)
        self.window = int(sliding_window)
        self.null_block = -1
        self.swa_table = np.zeros((0, rows, self.table.shape[1]), dtype=np.int32)
        self.swa_cached: dict[bytes, tuple[int, ...]] = {}
        if self.sliding_groups:
            if self.sliding_groups < 0 or self.window < 1 or num_blocks < 2:
                raise ValueError(f"sliding groups need a window >= 1 and >= 2 blocks, got "
                                 f"{sliding_groups} groups, window {sliding_window}, "
                                 f"{num_blocks} blocks")
            self.null_block = num_blocks - 1
            del self.free[self.null_block]
            self.ref[self.null_block] = 1
            self.swa_table = np.full((self.sliding_groups, rows, self.table.shape[1]),
                                     self.null_block, dtype=np.int32)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks sequences can hold (all but the null block of hybrid pools)."""
        return self.num_blocks - (1 if self.sliding_groups else 0)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - len(self.free) / self.num_usable_blocks

    def max_blocks_for(self, num_tokens: int, max_chunk: int) -> int:
        """Blocks one sequence of num_tokens tokens may hold at once, prefilled in chunks
        of at most max_chunk tokens (hybrid: a chunk's sliding blocks span its window)."""
        return hybrid_blocks_needed(num_tokens, self.block_size, self.sliding_groups,
                                    self.window, max_chunk)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prompt_block_hashes(self, token_ids: Seq[int], cache_salt: str | None) -> list[bytes]:
        """The chain hashes of the full blocks of a prompt ([] without prefix caching).

        Reads only ``block_size`` and ``enable_prefix_caching`` (fixed at construction), so
        any thread may call it: AsyncLLM hashes a prompt on the caller's thread, with its
        tokenization, and the engine thread's admission then only checks the count."""
        if not self.enable_prefix_caching:
            return []
        return hash_blocks(token_ids, self.block_size, 0, len(token_ids) // self.block_size,
                           salt_root(cache_salt))

    def hash_prompt(self, seq: "Sequence", hashes: list[bytes] | None = None) -> None:
        """Hash the full blocks of seq's prompt now (called when its request is added).

        hashes: the prompt's ``prompt_block_hashes`` computed ahead (taken, not copied)."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_prompt_tokens // self.block_size
        if hashes is not None and not seq.block_hashes:
            if len(hashes) != full:
                raise ValueError(f"prompt_block_hashes has {len(hashes)} hashes for a "
                                 f"prompt of {full} full blocks of {self.block_size}")
            seq.block_hashes = hashes
            return
        self._seq_hashes(seq, full)

    def _seq_hashes(self, seq: "Sequence", num_full_blocks: int) -> list[bytes]:
        """Extend seq.block_hashes to cover its first ``num_full_blocks`` full blocks."""
        hashes = seq.block_hashes
        have = len(hashes)
        if have < num_full_blocks:
            prev = hashes[-1] if hashes else salt_root(seq.params.cache_salt)
            hashes += hash_blocks(seq.token_ids, self.block_size, have, num_full_blocks - have,
                                  prev)
        return hashes

    def hashes_up_to(self, seq: "Sequence", num_full_blocks: int) -> list[bytes]:
        """seq's chained block hashes, extended to cover its first ``num_full_blocks``
        full blocks (their tokens must be known)."""
        return self._seq_hashes(seq, num_full_blocks)

    def lookup_prefix(self, seq: "Sequence") -> list[int]:
        """Block ids caching the longest prefix of ``seq``'s full blocks (no refs taken).

        At least one token is always left to compute (the last one gives the logits), so
        hits stop at block ``(num_tokens - 1) // block_size``. A sequence asking for
        prompt logprobs gets no hits (those tokens' logits must be computed).
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        max_blocks = min((seq.num_tokens + seq.num_pending - 1) // self.block_size,
                         seq.num_tokens // self.block_size)
        hashes = self._seq_hashes(seq, max_blocks)
        # One C-level pass over the hashes; hits end at the first miss.
        hits = PrefixHits(map(self.cached.get, hashes[:max_blocks]))
        if None in hits:
            del hits[hits.index(None):]
        if self.drop_last_hit and hits:
            hits.pop()
        if self.sliding_groups and hits:
            k, hits.sliding = self._sliding_hits(hashes, len(hits))
            del hits[k:]
        if self.hit_filter is not None and hits:
            del hits[self.hit_filter(seq, hits):]
        return hits

    def _sliding_hits(self, hashes: list[bytes], k: int
                      ) -> tuple[int, list[tuple[int, ...] | None]]:
        """The longest hit of at most k blocks whose window is cached in the sliding
        groups too, and their tuples (None before the window)."""
        bs, cached = self.block_size, self.swa_cached
        while k > 0:
            lo = self._window_start(k * bs)
            missing = [j for j in range(lo, k) if hashes[j] not in cached]
            if not missing:
                return k, [None] * lo + [cached[hashes[j]] for j in range(lo, k)]
            k = missing[-1]          # a hit must end before its last missing block
        return 0, []

    def _window_start(self, first_token: int) -> int:
        """The first block a step whose first new token is ``first_token`` reads in a
        sliding-window layer."""
        return max(0, first_token - self.window + 1) // self.block_size

    # ------------------------------------------------------------------ block tables
    def _row(self, seq: "Sequence") -> int:
        """seq's row in the table mirror (assigned on first use)."""
        if seq.block_row < 0:
            if not self._free_rows:
                if self.max_rows is not None:   # pragma: no cover - an engine bug
                    raise RuntimeError(f"more than max_rows ({self.max_rows}) sequences "
                                       "hold blocks")
                n = self.table.shape[0]
                self.table = np.concatenate([self.table, np.zeros_like(self.table)])
                self.row_blocks = np.concatenate([self.row_blocks,
                                                  np.zeros_like(self.row_blocks)])
                self.swa_table = np.concatenate(
                    [self.swa_table, np.full_like(self.swa_table, self.null_block)], axis=1)
                self._free_rows = list(range(2 * n - 1, n - 1, -1))
            seq.block_row = self._free_rows.pop()
        return seq.block_row

    def _append_blocks(self, seq: "Sequence", block_ids: list[int]) -> None:
        row = self._row(seq)
        lo = len(seq.block_table)
        hi = lo + len(block_ids)
        if hi > self.table.shape[1]:
            width = max(hi, 2 * self.table.shape[1])
            grown = np.zeros((self.table.shape[0], width), dtype=np.int32)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
            swa = np.full((self.sliding_groups, self.table.shape[0], width), self.null_block,
                          dtype=np.int32)
            swa[:, :, :self.swa_table.shape[2]] = self.swa_table
            self.swa_table = swa
        self.table[row, lo:hi] = block_ids
        self.row_blocks[row] = hi
        seq.block_table += block_ids

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> int:
        """Pop the least recently freed block (evicting its hash); the caller sets its
        reference count."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            elif block_id in self.swa_cached.get(block.hash, ()):
                del self.swa_cached[block.hash]      # (its tuple's other blocks go stale)
            block.hash = None
        return block_id

    def allocate(self, seq: "Sequence", num_new_tokens: int, cached_blocks: list[int] = (),
                 reserve_blocks: int = 0, register: bool = True) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq`` (after its computed ones).

        cached_blocks (only for a sequence holding no blocks): prefix-cache hits from
        lookup_prefix; they are shared and count as computed tokens. reserve_blocks: fail
        unless this many blocks stay free afterwards (admission watermark). register:
        offer the full blocks of the scheduled tokens to the prefix cache (False: room
        only, e.g. for an EAGLE head's drafted positions before the step is scheduled).
        Returns False when the pool is too small, changing nothing but (hybrid pools)
        returning the sliding blocks behind the window, which are never read again.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if cached_blocks and seq.block_table:
            raise ValueError("cached_blocks can only be given for a sequence with no blocks")
        bs = self.block_size
        num_computed = len(cached_blocks) * bs if cached_blocks else seq.num_computed_tokens
        total = num_computed + num_new_tokens
        have = len(cached_blocks) if cached_blocks else len(seq.block_table)
        need = max(0, -(-total // bs) - have)
        ref = self.ref
        idle_count = 0
        if cached_blocks:
            hit_ids = np.asarray(cached_blocks, dtype=np.int64)
            swa_hits = getattr(cached_blocks, "sliding", None) if self.sliding_groups else None
            if swa_hits:
                hit_ids = np.concatenate([hit_ids, np.asarray(
                    [b for t in swa_hits if t is not None for b in t], dtype=np.int64)])
            idle = hit_ids[ref[hit_ids] == 0]       # cached but in the free list
            idle_count = len(idle)
        swa_new = 0
        if self.sliding_groups:
            lo = self._window_start(num_computed)
            if not cached_blocks:
                self._release_behind_window(seq, lo)
            held = len(cached_blocks) if cached_blocks else len(seq.swa_blocks)
            swa_new = max(0, -(-total // bs) - max(held, lo))
        if need + self.sliding_groups * swa_new + idle_count + reserve_blocks > len(self.free):
            return False
        if not seq.block_table and self.enable_prefix_caching \
                and seq.params.prompt_logprobs is None:
            self.num_queried_tokens += seq.num_tokens
        new: list[int] = []
        if cached_blocks:
            free = self.free
            for b in idle.tolist():
                del free[b]
            ref[hit_ids] += 1                # a table holds a block once: no repeats
            new = list(cached_blocks)
            seq.num_computed_tokens = num_computed
            seq.num_registered_blocks = len(cached_blocks)
            self.num_hit_tokens += num_computed
        if need:
            fresh = [self._take_free() for _ in range(need)]
            ref[fresh] = 1
            new += fresh
        if new:
            self._append_blocks(seq, new)
        if self.sliding_groups:
            if cached_blocks:
                self._append_sliding(seq, list(swa_hits or [None] * len(cached_blocks)))
            if swa_new:
                self._take_sliding(seq, swa_new, lo)
        if self.enable_prefix_caching and register:
            self.register_full_blocks(seq, total)
        return True

    # ------------------------------------------------------------------ sliding groups
    def _append_sliding(self, seq: "Sequence", tuples: list[tuple[int, ...] | None]) -> None:
        """Append entries to seq.swa_blocks and the sliding mirror (its row exists);
        leading None entries (blocks behind the window) move ``swa_lo`` past them."""
        lo = len(seq.swa_blocks)
        if lo == seq.swa_lo:
            while seq.swa_lo - lo < len(tuples) and tuples[seq.swa_lo - lo] is None:
                seq.swa_lo += 1
        seq.swa_blocks += tuples
        cols = [lo + i for i, t in enumerate(tuples) if t is not None]
        if cols:
            self.swa_table[:, self._row(seq), cols] = np.asarray(
                [t for t in tuples if t is not None], dtype=np.int32).T

    def _take_sliding(self, seq: "Sequence", count: int, lo: int) -> None:
        """Give seq fresh tuples for its next ``count`` blocks, the first of them at block
        ``lo`` at the earliest (blocks skipped before it are behind the window)."""
        m = self.sliding_groups
        fresh = [self._take_free() for _ in range(m * count)]
        self.ref[fresh] = 1
        pad = max(0, lo - len(seq.swa_blocks))
        self._append_sliding(seq, [None] * pad + [tuple(fresh[i * m:(i + 1) * m])
                                                  for i in range(count)])

    def _release_behind_window(self, seq: "Sequence", lo: int) -> None:
        """Return seq's sliding tuples of blocks before ``lo`` to the pool."""
        if lo <= seq.swa_lo or not seq.swa_blocks:
            return
        hi = min(lo, len(seq.swa_blocks))
        ids = [b for t in seq.swa_blocks[seq.swa_lo:hi] if t is not None for b in t]
        for j in range(seq.swa_lo, hi):
            seq.swa_blocks[j] = None
        if seq.block_row >= 0:
            self.swa_table[:, seq.block_row, seq.swa_lo:hi] = self.null_block
        seq.swa_lo = lo
        self._release(ids)

    def _free_sliding(self, seq: "Sequence", keep: int = 0) -> None:
        """Release seq's sliding tuples from block ``keep`` on."""
        if not seq.swa_blocks:
            return
        ids = [b for t in seq.swa_blocks[keep:] if t is not None for b in t]
        if seq.block_row >= 0:
            self.swa_table[:, seq.block_row, keep:len(seq.swa_blocks)] = self.null_block
        del seq.swa_blocks[keep:]
        seq.swa_lo = min(seq.swa_lo, keep)
        self._release(ids)

    def register_full_blocks(self, seq: "Sequence", num_scheduled_tokens: int) -> None:
        """Offer seq's full blocks among its first num_scheduled_tokens tokens to the
        prefix cache (blocks holding a token still on the device wait for a later call).

        Called when the tokens filling them are scheduled: their K/V is written by the
        same forward, before any layer attends, so a sequence scheduled later in the
        same step may already share them.
        """
        num_full = min(num_scheduled_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_registered_blocks or not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes(seq, num_full)
        cached, blocks, table = self.cached, self.blocks, seq.block_table
        for i in range(seq.num_registered_blocks, num_full):
            h = hashes[i]
            block = blocks[table[i]]
            if block.hash is None and h not in cached:
                block.hash = h
                cached[h] = block.block_id
        if self.sliding_groups:
            swa, swa_cached = seq.swa_blocks, self.swa_cached
            for i in range(seq.num_registered_blocks, min(num_full, len(swa))):
                t, h = swa[i], hashes[i]
                if t is not None and h not in swa_cached and blocks[t[0]].hash is None:
                    for b in t:
                        blocks[b].hash = h
                    swa_cached[h] = t
        seq.num_registered_blocks = num_full

    def _release(self, block_ids: list[int]) -> None:
        """Drop one reference to each of ``block_ids`` (distinct); those left unreferenced
        join the free list's tail in reverse order (a sequence's last block first, so
        prefixes are evicted last)."""
        if not block_ids:
            return
        ids = np.asarray(block_ids[::-1], dtype=np.int64)
        ref = self.ref
        ref[ids] -= 1
        left = ref[ids]
        if left.min() < 0:  # pragma: no cover - a bug, never user input
            raise RuntimeError(f"block {int(ids[np.argmin(left)])} freed more often than "
                               "allocated")
        free = self.free
        for block_id in ids[left == 0].tolist():
            free[block_id] = None

    def free_seqs(self, seqs: list["Sequence"]) -> None:
        """Release the blocks of several sequences, as ``free_seq`` on each in turn would
        (the same reference counts, the same free-list order), in a fixed number of numpy
        calls: a step that finishes 256 sequences of 33 blocks costs ~0.1 ms so, ~2 ms one
        by one. Blocks come from the table mirror (row ``seq.block_row``)."""
        if len(seqs) < 8:
            for seq in seqs:
                self.free_seq(seq)
            return
        if self.sliding_groups:
            for seq in seqs:
                self._free_sliding(seq)
        held = [s for s in seqs if s.block_row >= 0]
        if held:
            rows = np.fromiter((s.block_row for s in held), dtype=np.int64, count=len(held))
            lens = self.row_blocks[rows]
            width = int(lens.max())
            # column of each row's j-th block from its end: the ids, sequence by sequence,
            # each sequence's last block first (free_seq's order)
            col = lens[:, None] - 1 - np.arange(width)
            valid = col >= 0
            ids = np.take_along_axis(self.table[rows, :max(width, 1)], np.maximum(col, 0),
                                     axis=1)[valid].astype(np.int64)
            ref = self.ref
            counts = np.bincount(ids)          # shared prefix blocks appear several times
            ref[:len(counts)] -= counts.astype(ref.dtype)
            left = ref[ids]
            if len(left) and left.min() < 0:  # pragma: no cover - a bug, never user input
                raise RuntimeError(f"block {int(ids[np.argmin(left)])} freed more often "
                                   "than allocated")
            zero = ids[left == 0]
            if len(zero):
                # a block several of them share is freed by its last holder: keep each
                # freed id at its last occurrence
                _, first_rev = np.unique(zero[::-1], return_index=True)
                freed = zero[np.sort(len(zero) - 1 - first_rev)]
                free = self.free
                for block_id in freed.tolist():   # (OrderedDict.update is ~20x slower)
                    free[block_id] = None
            self.table[rows, :max(width, 1)] = 0
            self.row_blocks[rows] = 0
            self._free_rows.extend(rows.tolist())
        for seq in seqs:
            seq.block_row = -1
            seq.block_table = []
            seq.num_computed_tokens = 0
            seq.num_registered_blocks = 0

    def free_seq(self, seq: "Sequence") -> None:
        """Release all of seq's blocks (last block first, so prefixes are evicted last)."""
        if self.sliding_groups:
            self._free_sliding(seq)
        self._release(seq.block_table)
        if seq.block_row >= 0:
            self.table[seq.block_row, :len(seq.block_table)] = 0
            self.row_blocks[seq.block_row] = 0
            self._free_rows.append(seq.block_row)
            seq.block_row = -1
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def trim(self, seq: "Sequence", num_tokens: int) -> None:
        """Release seq's blocks past those holding its first ``num_tokens`` tokens (the
        slots of rejected draft tokens; they were never offered to the prefix cache, whose
        blocks hold known tokens only). Freed blocks go to the tail of the free list."""
        keep = max(self.blocks_needed(num_tokens), seq.num_registered_blocks)
        if self.sliding_groups and len(seq.swa_blocks) > keep:
            self._free_sliding(seq, keep)
        extra = seq.block_table[keep:]
        if not extra:
            return
        self._release(extra)
        del seq.block_table[keep:]
        self.table[seq.block_row, keep:keep + len(extra)] = 0
        self.row_blocks[seq.block_row] = keep

    def reset_prefix_cache(self) -> None:
        """Forget all cached hashes (blocks in use keep their contents)."""
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        self.swa_cached.clear()

    # ------------------------------------------------------------------ checks
    def check_invariants(self, live_seqs: list["Sequence"] = ()) -> None:
        """Raise AssertionError if the accounting is inconsistent (tests, debugging).

        live_seqs: every sequence currently holding blocks.
        """
        refs = [0] * self.num_blocks
        if self.sliding_groups:
            refs[self.null_block] = 1
        rows = set()
        for seq in live_seqs:
            for b in seq.block_table:
                refs[b] += 1
            if self.sliding_groups:
                assert len(seq.swa_blocks) <= len(seq.block_table), f"{seq}: sliding entries"
                for j, t in enumerate(seq.swa_blocks):
                    assert t is None or j >= seq.swa_lo, f"{seq}: a block before swa_lo"
                    want = [self.null_block] * self.sliding_groups if t is None else list(t)
                    assert self.swa_table[:, seq.block_row, j].tolist() == want, \
                        f"{seq}: sliding mirror disagrees at block {j}"
                    for b in t or ():
                        refs[b] += 1
            if seq.block_table:
                assert seq.block_row >= 0 and seq.block_row not in rows, f"{seq}: bad row"
                assert self.max_rows is None or seq.block_row < self.max_rows, \
                    f"{seq}: row {seq.block_row} past max_rows {self.max_rows}"
                rows.add(seq.block_row)
                assert self.table[seq.block_row, :len(seq.block_table)].tolist() == \
                    seq.block_table, f"{seq}: block-table mirror disagrees with its list"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], \
                f"{block}: ref_count {block.ref_count} != {refs[block.block_id]} table refs"
            assert (block.ref_count == 0) == (block.block_id in self.free), \
                f"{block}: free-list membership disagrees with ref_count"
        for h, b in self.cached.items():
            assert self.blocks[b].hash == h, f"cached hash {h} -> {self.blocks[b]}"
        for h, t in self.swa_cached.items():
            assert all(self.blocks[b].hash == h for b in t), f"sliding hash {h} -> {t}"
        assert self.null_block < 0 or self.null_block not in self.free, "null block freed"
        if self.max_rows is not None:     # rows are state slots: none may leak
            held = set(range(self.table.shape[0])) - set(self._free_rows)
            assert held == rows, f"rows held {sorted(held)} != rows of live sequences " \
                                 f"{sorted(rows)}"
