"""Continuous-batching scheduler: which tokens of which sequences run in the next step.

One step has a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). Scheduling, in order:

Both queues are ordered by ``(SamplingParams.priority, arrival)`` (lower priority
value first; arrival = the order requests were added, i.e. the sequence id), like vLLM's
``scheduling_policy="priority"``; with every priority 0 this is first come first served.

1. Running sequences, in that order. Each gets all its uncomputed tokens up to the
   remaining budget: 1 for a decoding sequence, a chunk for one still in (chunked)
   prefill. When the pool has no block for it, the last running sequence (the lowest
   priority, then the latest arrival; never one already scheduled in this step) is
   preempted (blocks freed, back to the waiting queue, recomputed later; its generated
   tokens are kept so its output does not change); if none is left, the sequence
   preempts itself.
2. Waiting sequences, in order, while budget and seats remain and no preemption
   happened in this step. Each first takes its prefix-cache hits, then a prompt chunk as
   large as the budget allows (chunked prefill); a new sequence is admitted only if a
   small watermark of blocks stays free. Admission stops at the first sequence that does
   not fit (no lower-priority request overtakes it).

The step's batch lists the sequences whose one new token is their last known token
first (decode tokens; they go through paged decode attention), then the chunks
(prefill; a chunk may be a single prompt token when the budget leaves only one).
A running sequence with draft tokens (``seq.spec_token_ids``, set by the engine's
speculative decoding) is a chunk of 1 + k tokens (its last token and the drafts; the
drafts are cut to the budget, or dropped when no block is free for them).
"""
from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes ``num_new_tokens[i]`` tokens.

    The first ``num_decode`` entries have exactly one new token.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decode: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether seqs[i] reaches its last token in this step (so it samples a new one)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    """Waiting and running queues over a BlockManager (see the module docstring).

    Args:
        block_manager: the KV pool.
        max_num_seqs: most sequences running at once (>= 1).
        max_num_batched_tokens: token budget of one step (>= 1).
        watermark: fraction of blocks kept free when admitting new sequences.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, watermark: float = 0.01) -> None:
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        # admission test of a waiting sequence (LoRA: its adapter needs a slot); None = all
        self.admit: Callable[[Sequence], bool] | None = None
        # (computed, n) -> the chunk to schedule: hybrid recurrent models with prefix
        # caching end chunks at state-checkpoint boundaries (engine/state_cache.py)
        self.align_chunk: Callable[[int, int], int] | None = None
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished_holding: list[Sequence] | None = None   # see batched_frees

    # ------------------------------------------------------------------ queues
    @staticmethod
    def order_key(seq: Sequence) -> tuple[int, int]:
        """Queue order: (priority, arrival); lower first. Sequence ids follow arrival."""
        return seq.params.priority, seq.seq_id

    @staticmethod
    def _insert(queue: "deque[Sequence] | list[Sequence]", seq: Sequence) -> None:
        """Insert seq in queue (sorted by order_key); O(1) at either end."""
        key = Scheduler.order_key
        k = key(seq)
        if not queue or k > key(queue[-1]):
            queue.append(seq)
        elif k < key(queue[0]):
            if isinstance(queue, deque):
                queue.appendleft(seq)
            else:
                queue.insert(0, seq)
        else:
            queue.insert(bisect_right(queue, k, key=key), seq)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._insert(self.waiting, seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._insert(self.waiting, seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark seq finished and free its blocks (it leaves whichever queue holds it)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass  # not queued yet
        if self._finished_holding is not None:
            self._finished_holding.append(seq)      # released when batched_frees ends
        else:
            self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.request.num_finished += 1
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    @contextmanager
    def batched_frees(self) -> Iterator[None]:
        """Sequences finished inside this block release their blocks together when it
        ends (``BlockManager.free_seqs``: the same counts and free-list order, one numpy
        pass instead of one per sequence). The engine reads a step back inside it; no
        block is allocated meanwhile, so nothing can observe the delay."""
        if self._finished_holding is not None:     # nested: the outer block releases
            yield
            return
        self._finished_holding = []
        try:
            yield
        finally:
            seqs, self._finished_holding = self._finished_holding, None
            self.bm.free_seqs(seqs)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> ScheduledBatch:
        """Pick this step's work (see the module docstring). May preempt sequences.

        A sequence's work is its tokens not yet computed, counting a token still on the
        device (async scheduling: the step in flight sampled it; its id reaches the
        forward on the device). A sequence the in-flight step brings to its length limit
        is left out: it finishes when that step is read back.
        """
        budget = self.max_num_batched_tokens
        decode: list[Sequence] = []
        chunks: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        running = self.running
        bm = self.bm
        bs = bm.block_size
        caching = bm.enable_prefix_caching

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            c = seq.num_computed_tokens
            total = len(seq.token_ids) + seq.num_pending
            n = total - c
            if seq.spec_token_ids:
                # Speculative decoding: last token + drafts as one multi-token row (the
                # engine drafts only for steady-decode rows with no token in flight).
                k = min(len(seq.spec_token_ids), budget - 1)
                if n == 1 and k > 0 and bm.allocate(seq, 1 + k):
                    del seq.spec_token_ids[k:]
                    chunks.append((seq, 1 + k))
                    budget -= 1 + k
                    i += 1
                    continue
                seq.spec_token_ids = []      # no room: a plain decode row
            if n == 1 and c < len(seq.block_table) * bs:
                # Steady decode: its block has room; register a block it just filled.
                if seq.num_pending and total >= seq.max_total_tokens:
                    i += 1    # finishes by length when the step in flight is read back
                    continue
                if caching and total // bs > seq.num_registered_blocks:
                    bm.register_full_blocks(seq, total)
                decode.append(seq)
                budget -= 1
                i += 1
                continue
            n = min(n, budget)
            if self.align_chunk is not None and n > 1:
                n = self.align_chunk(c, n)
            if n <= 0 or (seq.num_pending and total >= seq.max_total_tokens):
                i += 1  # finishing in the step in flight (or nothing to compute)
                continue
            while not bm.allocate(seq, n):
                # Lowest priority, latest arrival; not scheduled yet in this step.
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._take(seq, n, decode, chunks)
                budget -= n
                i += 1

        skipped: list[Sequence] = []
        if not preempted:
            while self.waiting and budget > 0 and len(running) < self.max_num_seqs:
                seq = self.waiting[0]
                if self.admit is not None and not self.admit(seq):
                    # (its LoRA adapter has no slot now): later requests may still run
                    skipped.append(self.waiting.popleft())
                    continue
                hits = bm.lookup_prefix(seq) if not seq.block_table else []
                computed = len(hits) * bs if hits else seq.num_computed_tokens
                n = min(seq.num_tokens + seq.num_pending - computed, budget)
                if self.align_chunk is not None:
                    n = self.align_chunk(computed, n)
                if not bm.allocate(seq, n, hits, reserve_blocks=self.watermark_blocks):
                    if not running and not decode and not chunks:
                        # Nothing else holds blocks: the watermark must not block it.
                        if not bm.allocate(seq, n, hits):
                            raise RuntimeError(
                                f"{seq} cannot fit in an empty KV pool of "
                                f"{bm.num_blocks} blocks (requests are validated "
                                f"against the pool size, so this is a bug)")
                    else:
                        break
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self._insert(running, seq)
                self._take(seq, n, decode, chunks)
                budget -= n

        self.waiting.extendleft(reversed(skipped))
        # Decode tokens (one new token) first, then prefill chunks.
        return ScheduledBatch(seqs=decode + [s for s, _ in chunks],
                              num_new_tokens=[1] * len(decode) + [n for _, n in chunks],
                              num_decode=len(decode), preempted=preempted)

    @staticmethod
    def _take(seq: Sequence, n: int, decode: list[Sequence],
              chunks: list[tuple[Sequence, int]]) -> None:
        # A decode row's input is its last token: one token in the middle of a prompt
        # (the budget left only one) is a one-token prefill chunk.
        if n == 1 and seq.num_computed_tokens + 1 == len(seq.token_ids) + seq.num_pending:
            decode.append(seq)
        else:
            chunks.append((seq, n))

    def advance(self, batch: ScheduledBatch) -> None:
        """Once the step is launched: its scheduled tokens count as computed.

        Nothing finishes or is preempted between ``schedule`` and this call (the same
        thread launches the batch it scheduled), so every sequence in it is running.
        Decode rows (the first ``num_decode``) advance by one token each."""
        seqs = batch.seqs
        nd = batch.num_decode
        for seq in seqs[:nd] if nd < len(seqs) else seqs:
            seq.num_computed_tokens += 1
        if nd < len(seqs):
            for seq, n in zip(seqs[nd:], batch.num_new_tokens[nd:]):
                seq.num_computed_tokens += n
