"""Speculative decoding with an EAGLE head: ``{"method": "eagle" | "eagle3", "model": ...}``.

The head (models/eagle.py) drafts from the target's hidden states: draft position p
pairs the target's state at p with token p + 1 and predicts token p + 2. The engine
verifies the drafts exactly as a draft model's (engine/llm_engine.py ``_verify``).

What the proposer owns:

- the head, on the target's device and dtype;
- one K/V cache layer for it, ``[num_blocks, block_size, Hkv, D]`` each for k and v,
  indexed by the **target's** block tables: the head's K/V for position p sits in the
  target's slot for p. So prefix-cache hits cover the head's K/V too (the block manager
  then recomputes the last hit block: its last position's head K/V depends on the token
  after the block, which a hit does not match), and the target's trim after a
  verification frees both. Automatic pool sizing counts its bytes per token
  (``ModelRunner(extra_kv_bytes_per_token=)``);
- per sequence, the target's hidden states it has not consumed yet (:class:`_EagleSeq`).

The target forward writes every input token's hidden states into a fixed buffer
(``CausalLM.hidden_capture``, captured into CUDA graphs too); right after each launch
:meth:`EagleProposer.observe` keeps a copy of them with each sequence's position range.

One ``propose`` call (before the engine schedules):

1. Catch-up: one varlen forward of the head, for every tracked sequence, over the
   positions whose target state is kept and whose next token is on the host (p <=
   len(tokens) - 2): new prompts, accepted drafts and the target's own token. It runs
   every step, also when the batch is too large to draft (those rows only catch up), so a
   sequence can draft again when the batch shrinks. At most ``max_num_batched_tokens``
   positions per call.
2. Drafting rows (caught up to position len(tokens) - 2, whose logits give the first
   draft) then run k - 1 single-token steps, each fed the previous draft and the head's
   own output state, writing the head's K/V at positions len - 1 .. len + k - 3 of the
   target's blocks (allocated here, never offered to the prefix cache). On CUDA these
   steps replay graphs (:class:`HeadDecodeGraphs`), and so does the catch-up when every
   row drafts and catches up at most k + 1 positions (:class:`HeadCatchUpGraphs`: steady
   decode); other catch-ups (prompts, chunks, rows that only catch up) run eagerly.

Drafts sampled beyond the target's acceptance leave head K/V that the next catch-up
overwrites (it always restarts at the first position without a target state), so no
rollback is needed. A sequence whose target states were not observed for some positions
(e.g. over more than ``MAX_RECORDS`` steps without a propose call) cannot catch up; it
is marked stale and gets no drafts (counted in ``num_stale``); verification keeps the
output exact whatever the head proposes.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..models.eagle import EagleHead
from ..models.metadata import AttentionMetadata
from .block_manager import BlockManager
from .draft_model import DraftSampler, _ranges, _Row
from .model_runner import (capture_cuda_graph, graph_batch_sizes, index_checks_off,
                           pick_graph_size)
from .sampler import Sampler
from .sequence import SequenceStatus
from .spec_decode import SpeculativeConfig

if TYPE_CHECKING:
    from .scheduler import ScheduledBatch
    from .sequence import Sequence

logger = logging.getLogger("minikernels.engine")

MAX_RECORDS = 8     # steps a sequence's target states may wait for a propose call


class _HeadGraphs:
    """What the head's graph runners share: static buffers for ``q`` token slots per row
    of the largest bucket (input ids, input states ``[., H]``, positions, slots -1 = no
    K/V write) and a block table ``[bs, max_blocks_per_seq]``; one CUDA graph per bucket,
    captured largest first (later graphs reuse its memory pool). ``_capture`` is the only
    CUDA-specific part: a subclass may return a closure that runs ``self._forward(bs)``
    eagerly on the same buffers (the tests' CPU stand-in). Subclasses add their own
    buffers (``_more_buffers``) and metadata (``_meta``)."""

    q = 1

    def __init__(self, head: EagleHead, kv: tuple[Tensor, Tensor], sizes: list[int],
                 max_blocks_per_seq: int) -> None:
        dev = head.device
        self.head, self.kv = head, kv
        self.sizes = list(sizes)
        self.width = int(max_blocks_per_seq)
        top = self.sizes[-1]
        t = top * self.q
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(t, head.config.hidden_size, dtype=head.dtype, device=dev)
        self.positions = torch.zeros(t, dtype=torch.int64, device=dev)
        self.slots = torch.full((t,), -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(top, self.width, dtype=torch.int32, device=dev)
        self._more_buffers(top, dev)
        self.pool = None
        self.num_replays = 0
        self.graphs: dict[int, Callable[[], tuple[Tensor, Tensor]]] = {}
        with torch.inference_mode(), index_checks_off():
            for bs in reversed(self.sizes):
                self.graphs[bs] = self._capture(bs)

    def _more_buffers(self, top: int, dev: torch.device) -> None:
        pass

    def _meta(self, bs: int) -> AttentionMetadata:
        raise NotImplementedError

    def _forward(self, bs: int) -> tuple[Tensor, Tensor]:
        t = bs * self.q
        return self.head(self.input_ids[:t], self.hidden[:t], self._meta(bs), self.kv)

    def _capture(self, bs: int) -> Callable[[], tuple[Tensor, Tensor]]:
        replay, self.pool = capture_cuda_graph(lambda: self._forward(bs), self.head.device,
                                               self.pool)
        return replay


class HeadDecodeGraphs(_HeadGraphs):
    """CUDA graphs of the head's draft steps (one token per row over the paged prefix),
    one per batch-size bucket; a step of n rows replays the smallest bucket bs >= n.

    Buffers (:class:`_HeadGraphs`) plus seq_lens; padding rows get slot -1 (no K/V
    write) and seq_len 0 (attention reads nothing, returns zeros). A replay returns the
    static (logits, output states); ``run`` hands back their first n rows.
    """

    def _more_buffers(self, top: int, dev: torch.device) -> None:
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(positions=self.positions[:bs], slot_mapping=self.slots[:bs],
                                 num_decode=bs, decode_block_table=self.block_table[:bs],
                                 decode_seq_lens=self.seq_lens[:bs], logits_indices=None)

    def run(self, ids: Tensor, hidden: Tensor, meta: AttentionMetadata
            ) -> tuple[Tensor, Tensor] | None:
        """Replay a draft step of n rows (decode metadata); None when no bucket fits."""
        n = int(ids.shape[0])
        bs = pick_graph_size(n, self.sizes)
        w = meta.decode_block_table.shape[1]
        if bs is None or w > self.width:
            return None
        self.input_ids[:n].copy_(ids, non_blocking=True)
        self.hidden[:n].copy_(hidden, non_blocking=True)
        self.positions[:n].copy_(meta.positions, non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slots[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(meta.decode_seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(0)
        self.block_table[:n, :w].copy_(meta.decode_block_table, non_blocking=True)
        logits, g = self.graphs[bs]()
        self.num_replays += 1
        return logits[:n], g[:n]


class HeadCatchUpGraphs(_HeadGraphs):
    """CUDA graphs of the head's steady catch-up: every row drafts and catches up at
    most q = k + 1 positions (the accepted drafts and the target's own token), as a
    varlen prefill over the paged prefix; one graph per batch-size bucket.

    Row i occupies static positions ``[i * q, (i + 1) * q)``; a row of t < q positions
    is left-padded (its t positions take the last slots of its span), so with
    ``cu_seqlens_k`` its true length the bottom-right causal alignment puts each real
    query at its true position; pad queries get slot -1 (no K/V write) and their outputs
    are never read. The logits / output states are computed for each row's last position
    only (static ``logits_indices`` = i * q + q - 1), which is where a drafting row's
    first draft comes from. Padding rows (n..bs) attend to nothing (``cu_seqlens_k``
    repeats the last real entry). Buffers and capture: :class:`_HeadGraphs`.
    """

    def __init__(self, head: EagleHead, kv: tuple[Tensor, Tensor], sizes: list[int],
                 max_blocks_per_seq: int, q: int, max_model_len: int) -> None:
        self.q = int(q)
        self.max_model_len = int(max_model_len)
        super().__init__(head, kv, sizes, max_blocks_per_seq)

    def _more_buffers(self, top: int, dev: torch.device) -> None:
        self.cu_q = (torch.arange(top + 1, dtype=torch.int32) * self.q).to(dev)
        self.cu_k = torch.zeros(top + 1, dtype=torch.int32, device=dev)
        self.last = (torch.arange(top, dtype=torch.int64) * self.q + self.q - 1).to(dev)

    def _meta(self, bs: int) -> AttentionMetadata:
        t = bs * self.q
        return AttentionMetadata(positions=self.positions[:t], slot_mapping=self.slots[:t],
                                 num_decode=0, cu_seqlens_q=self.cu_q[:bs + 1],
                                 cu_seqlens_k=self.cu_k[:bs + 1], max_seqlen_q=self.q,
                                 max_seqlen_k=self.max_model_len,
                                 prefill_block_table=self.block_table[:bs],
                                 logits_indices=self.last[:bs])

    def run(self, ids: Tensor, hidden: Tensor, meta: AttentionMetadata, takes: list[int]
            ) -> tuple[Tensor, Tensor] | None:
        """Replay a catch-up of ``len(takes)`` drafting rows (row i: ``takes[i]``
        positions, prefill metadata in the eager layout) -> (logits, output states) of
        each row's last position; None when no bucket fits."""
        n = len(takes)
        bs = pick_graph_size(n, self.sizes)
        tab = meta.prefill_block_table
        if bs is None or tab.shape[1] > self.width or max(takes) > self.q:
            return None
        q, t = self.q, bs * self.q
        lens = np.asarray(takes, dtype=np.int64)
        dst = torch.from_numpy(_ranges(np.arange(n, dtype=np.int64) * q + q - lens, lens)
                               ).to(ids.device, non_blocking=True)
        self.slots[:t].fill_(-1)
        self.input_ids.index_copy_(0, dst, ids)
        self.hidden.index_copy_(0, dst, hidden.to(self.hidden.dtype))
        self.positions.index_copy_(0, dst, meta.positions)
        self.slots.index_copy_(0, dst, meta.slot_mapping)
        self.cu_k[:n + 1].copy_(meta.cu_seqlens_k, non_blocking=True)
        if bs > n:   # padding rows: no keys
            self.cu_k[n + 1:bs + 1].copy_(meta.cu_seqlens_k[n:].expand(bs - n))
        self.block_table[:n, :tab.shape[1]].copy_(tab, non_blocking=True)
        logits, g = self.graphs[bs]()
        self.num_replays += 1
        return logits[:n], g[:n]


class _Record:
    """Target hidden states of one step for one sequence: positions [pos, pos + count)
    are rows [row, row + count) of ``hidden`` ([T, width], the step's copy)."""

    __slots__ = ("hidden", "row", "pos", "count")

    def __init__(self, hidden: Tensor, row: int, pos: int, count: int) -> None:
        self.hidden, self.row, self.pos, self.count = hidden, row, pos, count

    @property
    def end(self) -> int:
        return self.pos + self.count


class _EagleSeq:
    """The head's state for one target sequence: positions [0, computed) have head K/V
    made from target states (or sit in prefix-cache blocks); records: the target states
    not consumed yet, in position order; stale: a gap, no more drafts."""

    __slots__ = ("seq", "computed", "records", "stale")

    def __init__(self, seq: "Sequence", computed: int) -> None:
        self.seq = seq
        self.computed = computed
        self.records: list[_Record] = []
        self.stale = False

    @property
    def covered(self) -> int:
        """First position with neither head K/V nor a kept target state."""
        return self.records[-1].end if self.records else self.computed

    def __repr__(self) -> str:
        return (f"_EagleSeq(seq={self.seq.seq_id}, computed={self.computed}, "
                f"covered={self.covered}, stale={self.stale})")


class EagleProposer(DraftSampler):
    """Drafts with an EAGLE head over the target's block tables (see the module).

    Args:
        cfg: the validated config (method "eagle" / "eagle3").
        head: the loaded head; its target must already write ``hidden_capture``.
        block_manager: the target's (its tables index the head's K/V; drafted positions
            are allocated in it).
        block_size, num_blocks: the target pool's.
        max_model_len: the target's.
        max_num_batched_tokens: bounds one catch-up forward.
        seed: seeds the generator of drafts of unseeded requests.
        eos_token_ids: the target's EOS ids (masked in drafts before min_tokens).
        max_num_seqs, max_blocks_per_seq, enforce_eager: the engine's; on CUDA (unless
            eager) the draft steps replay CUDA graphs (:class:`HeadDecodeGraphs`) for
            batches up to min(max_num_seqs, disable_by_batch_size).
    """

    def __init__(self, cfg: SpeculativeConfig, head: EagleHead, *,
                 block_manager: BlockManager, block_size: int, num_blocks: int,
                 max_model_len: int, max_num_batched_tokens: int, seed: int = 0,
                 eos_token_ids: list[int] = (), max_num_seqs: int = 256,
                 max_blocks_per_seq: int | None = None, enforce_eager: bool = True) -> None:
        capture = head.target.hidden_capture
        if capture is None:
            raise ValueError("the target model does not capture hidden states for the EAGLE "
                             "head (set target.hidden_capture = head.capture(...))")
        self.k = cfg.num_speculative_tokens
        self.head = head
        self.capture = capture
        self.vocab_size = self.common_vocab = int(head.target.config.vocab_size)
        self.device = head.device
        self.block_size = block_size
        self.bm = block_manager
        self.kv = head.allocate_kv_cache(num_blocks, block_size)
        self.max_len = max_model_len
        self.max_catch_up = max_num_batched_tokens
        self.sampler = Sampler(self.vocab_size, self.device, seed + 1)
        self.eos_token_ids = list(eos_token_ids)
        self.states: dict[int, _EagleSeq] = {}     # target seq_id -> head state
        # counters (tests, stats)
        self.num_forwards = 0
        self.num_catch_up_tokens = 0
        self.num_stale = 0
        self.graph_sizes = graph_batch_sizes(min(max_num_seqs, cfg.disable_by_batch_size))
        self.max_blocks_per_seq = max_blocks_per_seq or -(-max_model_len // block_size)
        self.graphs: HeadDecodeGraphs | None = None
        self.catch_up_graphs: HeadCatchUpGraphs | None = None
        if not enforce_eager and self.device.type == "cuda":
            try:
                self.capture_graphs()
            except Exception as e:  # noqa: BLE001 - an op that cannot be captured: eager
                self.graphs = self.catch_up_graphs = None
                logger.warning("EAGLE draft-step CUDA graphs not captured (%s: %s); they "
                               "run eagerly", type(e).__name__, e)

    # ------------------------------------------------------------------ sleep mode
    def release_pool(self) -> None:
        """Sleep: drop the graphs, free the head's K/V (see engine/sleep.py)."""
        self._had_graphs = self.graphs is not None
        self.graphs = self.catch_up_graphs = None
        self.states.clear()
        self._kv_shape = self.kv[0].shape
        for t in self.kv:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def restore_pool(self) -> None:
        """Wake up: zeroed K/V, graphs again if there were."""
        for t in self.kv:
            t.data = torch.zeros(self._kv_shape, dtype=t.dtype, device=t.device)
        if self._had_graphs:
            self.capture_graphs()

    def capture_graphs(self, graphs_cls: type | None = None,
                       catch_up_cls: type | None = None) -> HeadDecodeGraphs:
        """Capture the draft steps' and the steady catch-up's graphs (the constructor does
        on CUDA); graphs_cls / catch_up_cls: :class:`HeadDecodeGraphs` /
        :class:`HeadCatchUpGraphs` subclasses (tests: CPU stand-ins)."""
        # (on the head's GPU: a data-parallel replica's engine may live on cuda:1)
        where = torch.cuda.device(self.device) if self.device.type == "cuda" else \
            contextlib.nullcontext()
        with where:
            self.graphs = (graphs_cls or HeadDecodeGraphs)(self.head, self.kv,
                                                           self.graph_sizes,
                                                           self.max_blocks_per_seq)
            self.catch_up_graphs = (catch_up_cls or HeadCatchUpGraphs)(
                self.head, self.kv, self.graph_sizes, self.max_blocks_per_seq, self.k + 1,
                self.max_len)
        return self.graphs

    # ------------------------------------------------------------------ bookkeeping
    def release(self, seq: "Sequence") -> None:
        self.states.pop(seq.seq_id, None)

    def _sweep(self) -> None:
        dead = [sid for sid, st in self.states.items()
                if st.seq.status is not SequenceStatus.RUNNING]
        for sid in dead:
            del self.states[sid]

    def check_invariants(self) -> None:
        for st in self.states.values():
            assert st.computed <= len(st.seq.token_ids), st
            pos = st.computed
            for rec in st.records:
                assert rec.pos <= pos < rec.end, (st, rec.pos, rec.end)
                pos = rec.end

    def _mark_stale(self, st: _EagleSeq) -> None:
        st.stale = True
        st.records = []
        self.num_stale += 1

    # ------------------------------------------------------------------ observe
    def observe(self, batch: "ScheduledBatch") -> None:
        """Keep the target states of the forward just launched for ``batch`` (call before
        the scheduler advances it: positions start at each ``num_computed_tokens``)."""
        hidden = self.capture.buffer[:batch.num_tokens].clone()
        row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            pos = seq.num_computed_tokens
            st = self.states.get(seq.seq_id)
            if st is None:
                # positions before pos: prefix-cache blocks (their head K/V came with them)
                st = self.states[seq.seq_id] = _EagleSeq(seq, pos)
            if not st.stale:
                if pos > st.covered:
                    self._mark_stale(st)
                else:
                    # a newer state wins from pos on (e.g. after rejected drafts)
                    st.computed = min(st.computed, pos)
                    while st.records and st.records[-1].pos >= pos:
                        st.records.pop()
                    if st.records and st.records[-1].end > pos:
                        st.records[-1].count = pos - st.records[-1].pos
                    st.records.append(_Record(hidden, row, pos, n))
                    if len(st.records) > MAX_RECORDS:
                        self._mark_stale(st)
            row += n

    # ------------------------------------------------------------------ propose
    @torch.inference_mode()
    def propose(self, seqs: "list[Sequence]", max_tokens: list[int]
                ) -> tuple[list[list[int]], Tensor | None]:
        """Drafts for ``seqs`` (see the module); every other tracked sequence catches up.
        ``propose([], [])`` only catches up."""
        self._sweep()
        drafts: list[list[int]] = [[] for _ in seqs]
        want = {s.seq_id: (i, room) for i, (s, room) in enumerate(zip(seqs, max_tokens))}
        plan: list[_Row] = []
        budget = self.max_catch_up
        for st in self.states.values():
            if st.stale or budget <= 0:
                continue
            seq = st.seq
            n = len(seq.token_ids)
            recs = st.records
            take = (min(n - 1, recs[-1].pos + recs[-1].count) if recs else 0) - st.computed
            if take <= 0:
                continue
            i, room = want.get(seq.seq_id, (-1, 0))
            k = min(self.k, room, self.max_len - n + 1) if i >= 0 else 0
            if take > budget:
                take, k = budget, 0
            if st.computed + take != n - 1:
                k = 0
            if k > 1 and not self.bm.allocate(seq, k - 1, register=False):
                k = 0         # no block for the drafted positions: catch up only
            budget -= take
            plan.append(_Row(i, st, st.computed, take, k, n))
        if not plan:
            return drafts, None
        logits, hid = self._catch_up(plan)
        self.num_catch_up_tokens += sum(r.take for r in plan)
        for r in plan:   # positions below start + take now have head K/V
            st = r.st
            st.computed = upto = r.start + r.take
            recs = st.records
            while recs and recs[0].pos + recs[0].count <= upto:
                recs.pop(0)
        rows = [r for r in plan if r.k > 0]
        if not rows:
            return drafts, None

        def decode(active: list[int], j: int, prev: Tensor) -> Tensor:
            idx = None if len(active) == len(rows) else \
                torch.tensor(active, dtype=torch.int64).to(self.device)
            h_in = hid if idx is None else hid.index_select(0, idx)
            step = self._decode_inputs([rows[a] for a in active], j, prev, h_in)
            res = self.graphs.run(*step) if self.graphs is not None else None
            if res is None:
                out, h_out = self._forward(*step)
            else:
                out, h_out = res
                self.num_forwards += 1
            if idx is None:
                hid.copy_(h_out)
            else:
                hid.index_copy_(0, idx, h_out)
            return out

        tokens, probs = self._draft(rows, len(seqs), logits, decode)
        for r, d in zip(rows, tokens):
            drafts[r.i] = d
        return drafts, probs

    def _catch_up(self, plan: list[_Row]) -> tuple[Tensor, Tensor]:
        """The catch-up forward -> (logits, output states) of the drafting rows' last
        positions: a graph replay in steady decode (every row drafts, at most k + 1
        positions each), else eager."""
        ids, hidden, meta = self._catch_up_inputs(plan)
        cg = self.catch_up_graphs
        if cg is not None and all(r.k > 0 for r in plan):
            res = cg.run(ids, hidden, meta, [r.take for r in plan])
            if res is not None:
                self.num_forwards += 1
                return res
        return self._forward(ids, hidden, meta)

    def catch_up(self) -> None:
        """Consume the kept target states of every tracked sequence (no drafts)."""
        self.propose([], [])

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids: Tensor, hidden: Tensor, meta: AttentionMetadata
                 ) -> tuple[Tensor, Tensor]:
        self.num_forwards += 1
        return self.head(ids, hidden, meta, self.kv)

    def _gather_states(self, plan: list[_Row]) -> Tensor:
        """The kept target states of every row's positions [start, start + take), in plan
        order: [sum take, width]. One index_select per source step (typically one: the
        last step's copy), then one reordering gather when there are several."""
        sources: dict[int, tuple[Tensor, list[int]]] = {}
        order: list[int] = []       # per segment: the source's id, in plan order
        seg_rows: list[tuple[int, int]] = []
        for r in plan:
            st, pos, end = r.st, r.start, r.start + r.take
            for rec in st.records:
                rec_end = rec.pos + rec.count
                if rec_end <= pos:
                    continue
                hi = end if end < rec_end else rec_end
                key = id(rec.hidden)
                if key not in sources:
                    sources[key] = (rec.hidden, [])
                sources[key][1].append(len(seg_rows))
                order.append(key)
                seg_rows.append((rec.row + pos - rec.pos, hi - pos))
                pos = hi
                if pos >= end:
                    break
            if pos < end:
                raise RuntimeError(f"{st}: no target state for positions [{pos}, {end})")
        starts = np.array([a for a, _ in seg_rows], dtype=np.int64)
        lens = np.array([n for _, n in seg_rows], dtype=np.int64)
        if len(sources) == 1:
            hidden = next(iter(sources.values()))[0]
            return hidden.index_select(0, self._upload([_ranges(starts, lens)])[0])
        parts = []
        offset = 0
        perm_src = np.empty(int(lens.sum()), dtype=np.int64)
        seg_out = np.concatenate([[0], np.cumsum(lens)])
        for hidden, segs in sources.values():
            segs_a = np.asarray(segs)
            rows = _ranges(starts[segs_a], lens[segs_a])
            parts.append(hidden.index_select(0, self._upload([rows])[0]))
            # where each of these segments' rows land in plan order
            perm_src[_ranges(seg_out[segs_a], lens[segs_a])] = offset + np.arange(len(rows))
            offset += len(rows)
        return torch.cat(parts).index_select(0, self._upload([perm_src])[0])

    def _table(self, rows: list[_Row], width: int) -> np.ndarray:
        """The rows' target block tables, ``width`` blocks each (the block manager's
        mirror rows; entries past a row's blocks are never read)."""
        return self.bm.table[[r.st.seq.block_row for r in rows], :width]

    def _catch_up_inputs(self, plan: list[_Row]) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Prefill rows: position p takes token p + 1 and the target's state at p, over
        the head's K/V of positions < p; logits of the last position of drafting rows."""
        ids_t, meta = self._catch_up_meta(plan, shift=1)
        return ids_t, self.head.combine(self._gather_states(plan)), meta

    def _decode_inputs(self, rows: list[_Row], j: int, ids: Tensor, hidden: Tensor
                       ) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Draft step j (j >= 1): draft j - 1 (on the device) and the head's previous
        output state at position n - 2 + j of each sequence."""
        bs = self.block_size
        pos = np.array([r.n - 2 + j for r in rows], dtype=np.int64)
        width = -(-int(pos.max() + 1) // bs)
        tab = self._table(rows, width)
        slots = tab[np.arange(len(rows)), pos // bs].astype(np.int64) * bs + pos % bs
        pos_t, slots_t, lens_t, tab_t = self._upload(
            [pos, slots, pos + 1, tab.reshape(-1)])
        meta = AttentionMetadata(
            positions=pos_t, slot_mapping=slots_t, num_decode=len(rows),
            decode_block_table=tab_t.to(torch.int32).reshape(len(rows), width),
            decode_seq_lens=lens_t.to(torch.int32), logits_indices=None)
        return ids, hidden, meta
