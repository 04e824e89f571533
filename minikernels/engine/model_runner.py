"""Model runner: owns the KV pool, builds each step's AttentionMetadata, runs the model.

Step inputs (see :class:`minikernels.models.AttentionMetadata`) are built on the host
from the scheduled batch, validated there (block ids and slots in range, block tables
long enough), copied to the device in one go, and the model runs with the op-level
data-dependent index checks off (they would each sync the device).

CUDA graphs: a step whose tokens are all single decode tokens (the common case at high
load) replays a graph captured for the smallest bucket size >= its batch size. Graphs
read static input buffers; rows past the real batch are padding: slot -1 (the KV write
skips it), seq_len 0 (attention returns zeros) and token 0. With speculative decoding
(``num_speculative_tokens`` k > 0), a verification step whose rows all score 1..k drafts
(up to 1 + k query tokens over a paged prefix each) replays a graph of its own
(:class:`_VerifyGraphs`). Other mixed or prefill steps, CPU runs and
``enforce_eager=True`` run eagerly.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .. import _validation
from ..models.kv_cache_dtype import resolve_kv_cache_dtype
from ..models.kv_layout import KVCacheLayout
from ..models.metadata import AttentionMetadata
from .block_manager import hybrid_blocks_needed
from .scheduler import ScheduledBatch

if TYPE_CHECKING:
    from .sequence import Sequence

logger = logging.getLogger("minikernels.engine")

CPU_KV_POOL_BYTES = 1 << 30          # default KV pool on the CPU: 1 GiB ...
CPU_MAX_BLOCKS = 4096                # ... but at most this many blocks
#: attention-free models (Mamba): their blocks hold no KV, only the block manager's
#: bookkeeping (positions, prefix-cache hashes): enough for every sequence at full length,
#: at most this many
ATTENTION_FREE_MAX_BLOCKS = 1 << 16
MAX_GRAPH_BATCH = 512


@contextlib.contextmanager
def index_checks_off() -> Iterator[None]:
    """Disable the ops' device-syncing index checks inside the block, for this thread."""
    with _validation.index_checks(False):
        yield


def graph_batch_sizes(max_num_seqs: int, limit: int = MAX_GRAPH_BATCH) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_num_seqs."""
    top = max(1, min(max_num_seqs, limit))
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


def pick_graph_size(n: int, sizes: list[int]) -> int | None:
    """Smallest captured size >= n, or None when n is larger than all of them."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def capture_cuda_graph(fn: Callable[[], Any], device: torch.device, pool: Any = None
                       ) -> tuple[Callable[[], Any], Any]:
    """Warm ``fn`` up on a side stream, capture it into a CUDA graph (in ``pool``, or a
    new pool) -> (replay: runs the graph and returns fn's static outputs, the pool)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()                                                # warm-up (lazy init, compiles)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    torch.cuda.synchronize(device)

    def replay() -> Any:
        graph.replay()
        return out
    return replay, (graph.pool() if pool is None else pool)


@dataclass
class StepInputs:
    """Host-built inputs of one step (tensors on the target device).

    sample_rows: for each logits row, the index into batch.seqs of the sequence it
    belongs to (sequences that reach their last token this step).
    pending_dst / pending_src: input tokens still on the device (async scheduling):
    ``input_ids[pending_dst] = previous step's sampled tokens[pending_src]`` (None: none).
    prompt_lp: prompt-logprob rows, after the sampling rows in the logits: per entry
    (index into batch.seqs, first position, count): the logits at positions
    ``[first, first + count)`` of that prompt, whose next tokens (``prompt_lp_targets``,
    in the same order) are prompt tokens.
    spec: speculative rows, per entry (index into batch.seqs, k drafts): their first k
    positions' logits rows follow the sampling rows (before the prompt-logprob rows), in
    this order; the last position's row is the sequence's sampling row.
    """

    input_ids: Tensor
    meta: AttentionMetadata
    sample_rows: list[int]
    decode_only: bool
    pending_dst: Tensor | None = None
    pending_src: Tensor | None = None
    prompt_lp: list[tuple[int, int, int]] | None = None
    prompt_lp_targets: Tensor | None = None
    spec: list[tuple[int, int]] | None = None
    lora_slots: Tensor | None = None     # int32 [T]: each token's LoRA slot (-1: none)


def _tables_from_lists(seqs: list["Sequence"]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A block-table array built from the sequences' lists (callers without a mirror)."""
    width = max((len(s.block_table) for s in seqs), default=1) or 1
    table = np.zeros((max(1, len(seqs)), width), dtype=np.int32)
    for r, s in enumerate(seqs):
        table[r, :len(s.block_table)] = s.block_table
    return table, np.array([len(s.block_table) for s in seqs] or [0]), list(range(len(seqs)))


def build_step_inputs(batch: ScheduledBatch, block_size: int, num_blocks: int,
                      device: torch.device | str = "cpu",
                      block_table_width: int | None = None,
                      upload: Callable[[Tensor], Tensor] | None = None,
                      table: np.ndarray | None = None,
                      row_blocks: np.ndarray | None = None,
                      swa_table: np.ndarray | None = None,
                      layer_group: tuple[int, ...] | None = None,
                      with_state: bool = False) -> StepInputs:
    """Flatten a scheduled batch into (input_ids, AttentionMetadata) for one forward.

    Decode entries (one new token each) come first, then prefill chunks; the batch is
    already ordered that way by the scheduler. Decode rows are built column-wise (one
    list comprehension per field, numpy for slots and block tables), so their cost per
    row is a few attribute reads. table / row_blocks: the block manager's block-table
    mirror (row ``seq.block_row``); None builds one from the sequences' lists.
    A sequence asking for prompt logprobs (``Sequence.wants_prompt_logprobs``) adds the
    logits rows of its chunk's prompt positions not launched before
    (``seq.prompt_lp_next``) after the sampling rows (``StepInputs.prompt_lp``).
    Hybrid KV pools: swa_table (the block manager's sliding-group mirror [m, rows,
    width]) and layer_group (models/kv_layout.py) add each sliding group's slot mapping and
    block tables (``AttentionMetadata.group_meta``), from the same rows and positions.
    with_state (hybrid recurrent models): each sequence's state slot is its mirror row
    (``AttentionMetadata.state_indices``), and a chunk starting at position 0 starts from
    a zero state (``has_initial_state``).
    Raises RuntimeError if a block table does not cover its tokens or holds an id
    outside the pool (an engine bug, caught on the host before the device sees it).
    """
    nd = batch.num_decode
    seqs, counts = batch.seqs, batch.num_new_tokens
    from_lists = table is None or row_blocks is None
    if swa_table is not None and (from_lists or layer_group is None):
        raise ValueError("swa_table needs the block-table mirror and layer_group")
    if from_lists:
        if with_state:
            raise ValueError("with_state needs the block-table mirror (rows are state slots)")
        table, row_blocks, rows = _tables_from_lists(seqs)
    else:
        rows = [s.block_row for s in seqs]
    dec = seqs[:nd]
    # ---- decode rows: input position = num_computed_tokens
    dpos = np.array([s.num_computed_tokens for s in dec], dtype=np.int64)
    # Input token: the last known one, or (async scheduling) the in-flight step's sample
    # for that row, patched in on the device.
    prow = np.array([s.pending_row if s.num_pending else -1 for s in dec], dtype=np.int64)
    pending = prow >= 0
    if nd and pending.all():
        ids: list[int] | np.ndarray = np.zeros(nd, dtype=np.int64)
        pend_dst: list[int] | np.ndarray = np.arange(nd)
        pend_src: list[int] | np.ndarray = prow
    else:
        ids = [s.token_ids[-1] for s in dec]
        pend_dst = np.flatnonzero(pending)
        pend_src = prow[pending]
    drows = np.array(rows[:nd], dtype=np.int64)
    dslots = table[drows, dpos // block_size].astype(np.int64) * block_size \
        + dpos % block_size
    prefill_ends: list[int] = []
    parts_pos = [dpos]
    parts_slots = [dslots]
    parts_rows = [drows]
    # ---- prefill chunks
    logits_idx: list[int] = list(range(nd))
    sample_rows: list[int] = list(range(nd))
    cu_q, cu_k = [0], [0]
    max_q = max_k = 0
    t = nd
    pend_flat: list[int] = []
    pend_flat_src: list[int] = []
    plp: list[tuple[int, int, int]] = []
    plp_idx: list[int] = []
    plp_targets: list[int] = []
    spec: list[tuple[int, int]] = []
    spec_idx: list[int] = []
    chunk_starts: list[int] = []      # first position of each chunk (rows nd..)
    if len(seqs) > nd:
        ids = list(ids)
    for i in range(nd, len(seqs)):
        seq, n = seqs[i], counts[i]
        c = seq.num_computed_tokens
        end = c + n
        known = len(seq.token_ids)
        drafts = seq.spec_token_ids
        if drafts:     # speculative row: the last token, then the drafts
            if seq.num_pending or c != known - 1 or n != 1 + len(drafts):
                raise RuntimeError(f"{seq}: bad speculative row ({n} tokens, "
                                   f"{len(drafts)} drafts)")
            ids.append(seq.token_ids[-1])
            ids.extend(drafts)
            chunk_starts.append(c)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            max_q, max_k = max(max_q, n), max(max_k, end)
            spec_idx.extend(range(t, t + n - 1))
            spec.append((i, n - 1))
            t += n
            logits_idx.append(t - 1)
            sample_rows.append(i)
            prefill_ends.append(end)
            continue
        if n < 1 or end > known + seq.num_pending:
            raise RuntimeError(f"{seq}: {n} new tokens after {c} computed exceed its tokens")
        if seq.index == 0 and seq.params.prompt_logprobs is not None:
            # Logits at prompt positions [lo, hi) score prompt tokens lo+1 .. hi.
            lo, hi = max(c, seq.prompt_lp_next), min(end, seq.num_prompt_tokens - 1)
            if hi > lo:
                plp.append((i, lo, hi - lo))
                plp_idx.extend(range(t + lo - c, t + hi - c))
                plp_targets.extend(seq.token_ids[lo + 1:hi + 1])
        ids.extend(seq.token_ids[c:min(end, known)])
        if end > known:      # its last token is still on the device
            ids.append(0)
            pend_flat.append(t + n - 1)
            pend_flat_src.append(seq.pending_row)
        chunk_starts.append(c)
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + end)
        max_q, max_k = max(max_q, n), max(max_k, end)
        t += n
        if end == known + seq.num_pending:
            logits_idx.append(t - 1)
            sample_rows.append(i)
        prefill_ends.append(end)
    if chunk_starts:
        # Every chunk's positions and slots at once: chunk j covers positions
        # start_j .. start_j + len_j - 1 of its row's block table.
        lens = np.diff(np.asarray(cu_q, dtype=np.int64))
        p = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(
            np.asarray(chunk_starts, dtype=np.int64) - (np.cumsum(lens) - lens), lens)
        prows = np.repeat(np.asarray(rows[nd:], dtype=np.int64), lens)
        parts_rows.append(prows)
        parts_pos.append(p)
        parts_slots.append(table[prows, p // block_size].astype(np.int64) * block_size
                           + p % block_size)
    ends = np.concatenate([dpos + 1, np.array(prefill_ends, dtype=np.int64)])
    all_rows = np.array(rows, dtype=np.int64)
    if len(seqs):
        if (row_blocks[all_rows] * block_size < ends).any():
            bad = int(np.argmax(row_blocks[all_rows] * block_size < ends))
            raise RuntimeError(f"{seqs[bad]}: its {len(seqs[bad].block_table)} blocks of "
                               f"{block_size} do not cover its scheduled tokens")
    width = int(-(-int(ends.max()) // block_size)) if len(seqs) else 1
    if block_table_width is not None:
        width = max(width, block_table_width)
    tab = table[all_rows, :width] if width <= table.shape[1] else np.pad(
        table[all_rows], ((0, 0), (0, width - table.shape[1])))
    # (The block manager's mirror holds only ids it took from its own pool.)
    if from_lists and len(seqs) and (tab.min() < 0 or tab.max() >= num_blocks):
        raise RuntimeError(f"block table holds ids outside [0, {num_blocks})")
    # One flat int64 host buffer -> one host-to-device copy; the metadata tensors are
    # views of it.
    num_prefill = len(seqs) - nd
    if pend_flat:
        pend_dst = np.concatenate([pend_dst, np.array(pend_flat, dtype=np.int64)])
        pend_src = np.concatenate([pend_src, np.array(pend_flat_src, dtype=np.int64)])
    pos_all = np.concatenate(parts_pos) if len(parts_pos) > 1 else parts_pos[0]
    slots_all = np.concatenate(parts_slots) if len(parts_slots) > 1 else parts_slots[0]
    if spec:
        logits_idx = logits_idx + spec_idx
    if plp:
        logits_idx = logits_idx + plp_idx
    parts = [ids, pos_all, slots_all, logits_idx, ends[:nd], cu_q if num_prefill else [],
             cu_k if num_prefill else [], pend_dst, pend_src, plp_targets]
    if with_state:      # (after the fixed parts: their indices below stay)
        state_parts = [all_rows, [1] * nd + [int(c > 0) for c in chunk_starts]]
    else:
        state_parts = []
    tabs = [tab]
    if swa_table is not None:
        # each sliding group's slots and tables, from the same rows and positions
        tok_rows = np.concatenate(parts_rows) if len(parts_rows) > 1 else parts_rows[0]
        swa_slots = swa_table[:, tok_rows, pos_all // block_size].astype(np.int64) \
            * block_size + pos_all % block_size
        parts += list(swa_slots)
        swa_tab = swa_table[:, all_rows, :width] if width <= swa_table.shape[2] else np.pad(
            swa_table[:, all_rows], ((0, 0), (0, 0), (0, width - swa_table.shape[2])))
        tabs += list(swa_tab)
    parts += state_parts
    sizes = [len(p) for p in parts] + [t.size for t in tabs]
    host = np.empty(sum(sizes), dtype=np.int64)
    o = 0
    for part in parts:
        host[o:o + len(part)] = part
        o += len(part)
    for t in tabs:
        host[o:o + t.size] = t.reshape(-1)
        o += t.size
    flat_host = torch.from_numpy(host)
    flat = upload(flat_host) if upload is not None else flat_host.to(device)
    pieces = torch.split(flat, sizes)
    ids_t, pos_t, slots_t, lidx_t, lens_t, cuq_t, cuk_t, pdst_t, psrc_t, plpt_t = pieces[:10]
    m = len(tabs) - 1
    ns = len(state_parts)
    tab_t = pieces[10 + m + ns].to(torch.int32).reshape(len(seqs), width)
    meta = AttentionMetadata(
        positions=pos_t, slot_mapping=slots_t, num_decode=nd,
        decode_block_table=tab_t[:nd] if nd else None,
        decode_seq_lens=lens_t.to(torch.int32) if nd else None,
        cu_seqlens_q=cuq_t.to(torch.int32) if num_prefill else None,
        cu_seqlens_k=cuk_t.to(torch.int32) if num_prefill else None,
        max_seqlen_q=max_q, max_seqlen_k=max_k,
        prefill_block_table=tab_t[nd:] if num_prefill else None,
        logits_indices=lidx_t)
    if ns:
        meta.state_indices = pieces[10 + m].to(torch.int32)
        meta.has_initial_state = pieces[11 + m].to(torch.bool)
    if m:
        swa_tabs = [t.to(torch.int32).reshape(len(seqs), width)
                    for t in pieces[11 + m + ns:]]
        meta.with_group_tables(list(pieces[10:10 + m]),
                               [t[:nd] if nd else None for t in swa_tabs],
                               [t[nd:] if num_prefill else None for t in swa_tabs],
                               layer_group)
    return StepInputs(input_ids=ids_t, meta=meta, sample_rows=sample_rows,
                      decode_only=(nd == len(seqs)),
                      pending_dst=pdst_t if len(pend_dst) else None,
                      pending_src=psrc_t if len(pend_dst) else None,
                      prompt_lp=plp or None, prompt_lp_targets=plpt_t if plp else None,
                      spec=spec or None)


class _PinnedUploader:
    """Host->device copies through two pinned buffers used in turn (grown on demand).

    A copy is asynchronous: before a buffer is overwritten we wait for the event
    recorded after its previous copy. With two buffers that copy is two steps old, so
    with async scheduling (step N+1 prepared while step N runs) the wait is free.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def __call__(self, host: Tensor) -> Tensor:
        i = self.turn
        self.turn ^= 1
        n = host.numel()
        if self.copied[i] is not None:
            self.copied[i].synchronize()
        if self.bufs[i].numel() < n:
            self.bufs[i] = torch.empty(max(n, 2 * self.bufs[i].numel(), 1 << 16),
                                       dtype=torch.int64, pin_memory=True)
        staged = self.bufs[i][:n]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        if self.copied[i] is None:
            self.copied[i] = torch.cuda.Event()
        self.copied[i].record(torch.cuda.current_stream(self.device))
        return out


class _Done:
    """The completion event of work that already finished (CPU forwards run inline)."""

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_DONE = _Done()


class _DecodeGraphs:
    """CUDA graphs of decode-only forwards, one per batch-size bucket, sharing a pool."""

    def __init__(self, model: torch.nn.Module, kv_caches: list, sizes: list[int],
                 max_blocks_per_seq: int, vocab: int, lora: Any = None,
                 kv_layout: KVCacheLayout | None = None, with_state: bool = False) -> None:
        dev = model.device
        top = sizes[-1]
        # recurrent layers: each row's state slot (-1 on padding rows: not touched)
        self.state_indices = torch.full((top,), -1, dtype=torch.int32, device=dev) \
            if with_state else None
        # hybrid KV pools: each sliding group's slots and block table
        self.kv_layout = kv_layout
        m = kv_layout.num_sliding_groups if kv_layout is not None else 0
        self.swa_slots = torch.full((m, top), -1, dtype=torch.int64, device=dev)
        self.swa_tables = torch.zeros(m, top, max_blocks_per_seq, dtype=torch.int32,
                                      device=dev)
        # LoRA: the graphs read each token's slot from this buffer (-1 = none)
        self.lora = lora
        self.lora_slots = torch.full((top,), -1, dtype=torch.int32, device=dev)
        self.sizes = sizes
        self.width = max_blocks_per_seq
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self.model, self.kv_caches = model, kv_caches
        self.graphs: dict[int, Callable[[], Tensor]] = {}
        self.pool: Any = None     # the verification graphs capture into it too
        with torch.inference_mode(), index_checks_off():
            for bs in reversed(sizes):  # largest first: later graphs reuse its memory
                if lora is not None:
                    lora.set_token_slots(self.lora_slots[:bs])
                self.graphs[bs] = self._capture(bs)
        if lora is not None:
            lora.set_token_slots(None)

    def _forward(self, bs: int) -> Tensor:
        """The model on bucket bs's static buffers -> logits of its bs rows."""
        return self.model(self.input_ids[:bs], self._meta(bs), self.kv_caches)

    def _capture(self, bs: int) -> Callable[[], Tensor]:
        """Capture bucket bs (after a warm-up forward); returns its replay. The only
        CUDA-specific part: a CPU stand-in may return an eager closure instead."""
        replay, self.pool = capture_cuda_graph(lambda: self._forward(bs), self.model.device,
                                               self.pool)
        return replay

    def _meta(self, bs: int) -> AttentionMetadata:
        meta = AttentionMetadata(positions=self.positions[:bs], slot_mapping=self.slots[:bs],
                                 num_decode=bs, decode_block_table=self.block_table[:bs],
                                 decode_seq_lens=self.seq_lens[:bs], logits_indices=None)
        if self.state_indices is not None:
            meta.state_indices = self.state_indices[:bs]
        if self.kv_layout is not None:
            m = self.kv_layout.num_sliding_groups
            meta.with_group_tables([self.swa_slots[g, :bs] for g in range(m)],
                                   [self.swa_tables[g, :bs] for g in range(m)], [None] * m,
                                   self.kv_layout.layer_group)
        return meta

    def run(self, inputs: StepInputs) -> Tensor | None:
        """Replay the bucket for a decode-only step; None if no bucket is large enough."""
        meta = inputs.meta
        n = meta.num_decode
        bs = pick_graph_size(n, self.sizes)
        if bs is None or meta.decode_block_table.shape[1] > self.width:
            return None
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(meta.positions, non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slots[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(meta.decode_seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(0)
        w = meta.decode_block_table.shape[1]
        self.block_table[:n, :w].copy_(meta.decode_block_table, non_blocking=True)
        if self.state_indices is not None:
            self.state_indices[:n].copy_(meta.state_indices, non_blocking=True)
            self.state_indices[n:bs].fill_(-1)
        for g, gm in enumerate(meta.group_meta or ()):
            self.swa_slots[g, :n].copy_(gm.slot_mapping, non_blocking=True)
            self.swa_slots[g, n:bs].fill_(-1)
            self.swa_tables[g, :n, :w].copy_(gm.decode_block_table, non_blocking=True)
        if self.lora is not None:
            if inputs.lora_slots is None:
                self.lora_slots[:bs].fill_(-1)
            else:
                self.lora_slots[:n].copy_(inputs.lora_slots, non_blocking=True)
                self.lora_slots[n:bs].fill_(-1)
        out = self.graphs[bs]()
        return out.index_select(0, meta.logits_indices)


class _VerifyGraphs:
    """CUDA graphs of speculative verification steps, one per batch-size bucket.

    A verification step (every row a sequence's last token plus 1..k drafts: up to 1 + k
    query tokens over its paged prefix; no decode rows, no prefill chunks) of n rows
    replays the smallest bucket bs >= n; rows with fewer drafts are left-padded (``run``). Static buffers (bs * (1 + k) tokens): input ids,
    positions, slots, block table ``[bs, max_blocks_per_seq]``, ``cu_seqlens_q`` fixed to
    ``arange(bs + 1) * (1 + k)`` and ``cu_seqlens_k`` (device values). Padding rows (n..bs)
    get slot -1 (the KV write skips them) and ``cu_seqlens_k`` repeating the last real
    entry: no keys, so attention reads nothing for them and returns zeros. The Python ints
    the attention path takes are frozen at capture: ``max_seqlen_q = 1 + k`` (the flash
    kernel's grid) and ``max_seqlen_k = max_model_len`` (an upper bound only: the kernels'
    loops run to each sequence's own ``cu_seqlens_k`` length). The graph returns all
    bs * (1 + k) positions' logits; ``run`` gathers the step's ``logits_indices`` (mapped
    from the eager layout to the padded one).

    ``_capture`` is the only CUDA-specific part: a subclass may return a closure that runs
    ``self._forward(bs)`` eagerly on the same static buffers (the tests' CPU stand-in).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list, sizes: list[int],
                 max_blocks_per_seq: int, num_spec_tokens: int, max_model_len: int,
                 pool: Any = None, kv_layout: KVCacheLayout | None = None) -> None:
        dev = model.device
        self.model, self.kv_caches = model, kv_caches
        self.sizes = list(sizes)
        self.width = int(max_blocks_per_seq)
        self.k = int(num_spec_tokens)
        self.q = q = 1 + self.k
        self.max_model_len = int(max_model_len)
        top = self.sizes[-1]
        self.input_ids = torch.zeros(top * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top * q, dtype=torch.int64, device=dev)
        self.slots = torch.full((top * q,), -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(top, self.width, dtype=torch.int32, device=dev)
        # hybrid KV pools: each sliding group's slots and block table
        self.kv_layout = kv_layout
        m = kv_layout.num_sliding_groups if kv_layout is not None else 0
        self.swa_slots = torch.full((m, top * q), -1, dtype=torch.int64, device=dev)
        self.swa_tables = torch.zeros(m, top, self.width, dtype=torch.int32, device=dev)
        self.cu_q = (torch.arange(top + 1, dtype=torch.int32) * q).to(dev)
        self.cu_k = torch.zeros(top + 1, dtype=torch.int32, device=dev)
        self.pool = pool
        self.num_replays = 0
        self.graphs: dict[int, Callable[[], Tensor]] = {}
        with torch.inference_mode(), index_checks_off():
            for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory
                self.graphs[bs] = self._capture(bs)

    def _meta(self, bs: int) -> AttentionMetadata:
        t = bs * self.q
        meta = AttentionMetadata(positions=self.positions[:t], slot_mapping=self.slots[:t],
                                 num_decode=0, cu_seqlens_q=self.cu_q[:bs + 1],
                                 cu_seqlens_k=self.cu_k[:bs + 1], max_seqlen_q=self.q,
                                 max_seqlen_k=self.max_model_len,
                                 prefill_block_table=self.block_table[:bs],
                                 logits_indices=None)
        if self.kv_layout is not None:
            m = self.kv_layout.num_sliding_groups
            meta.with_group_tables([self.swa_slots[g, :t] for g in range(m)], [None] * m,
                                   [self.swa_tables[g, :bs] for g in range(m)],
                                   self.kv_layout.layer_group)
        return meta

    def _forward(self, bs: int) -> Tensor:
        """The model on bucket bs's static buffers -> logits of all bs * (1 + k) tokens."""
        return self.model(self.input_ids[:bs * self.q], self._meta(bs), self.kv_caches)

    def _capture(self, bs: int) -> Callable[[], Tensor]:
        """Capture bucket bs; returns its replay (-> the static logits)."""
        replay, self.pool = capture_cuda_graph(lambda: self._forward(bs), self.model.device,
                                               self.pool)
        return replay

    def bucket(self, inputs: StepInputs) -> int | None:
        """The bucket a step replays, or None (not a verification step of at most k
        drafts per row, or too large / too long for the captured shapes). A row with
        0 drafts (one token; a draft model's catch-up) is left-padded like short rows."""
        meta, spec = inputs.meta, inputs.spec
        if spec is None or meta.num_decode or meta.prefill_block_table is None:
            return None
        n = len(spec)
        if meta.prefill_block_table.shape[0] != n or meta.prefill_block_table.shape[1] > \
                self.width or any(not 0 <= k <= self.k for _, k in spec):
            return None
        return pick_graph_size(n, self.sizes)

    def run(self, inputs: StepInputs) -> Tensor | None:
        """Replay the bucket of a verification step; None when it does not fit one.

        Row i's tokens go to static positions ``[i * (1 + k), (i + 1) * (1 + k))``; a row
        with fewer drafts (k_i < k) is left-padded: its 1 + k_i tokens take the last
        positions of its span, so with ``cu_seqlens_k`` its true length the bottom-right
        causal alignment puts each real query at its true position (the pad queries in
        front see only the row's prefix; slot -1, their logits are never gathered).
        """
        bs = self.bucket(inputs)
        if bs is None:
            return None
        meta = inputs.meta
        n, q = len(inputs.spec), self.q
        t, total = int(inputs.input_ids.shape[0]), bs * q
        lidx = meta.logits_indices
        groups = meta.group_meta or ()
        if t == n * q:   # every row has k drafts: the eager layout is the static one
            self.input_ids[:t].copy_(inputs.input_ids, non_blocking=True)
            self.positions[:t].copy_(meta.positions, non_blocking=True)
            self.slots[:t].copy_(meta.slot_mapping, non_blocking=True)
            self.slots[t:total].fill_(-1)
            for g, gm in enumerate(groups):
                self.swa_slots[g, :t].copy_(gm.slot_mapping, non_blocking=True)
                self.swa_slots[g, t:total].fill_(-1)
        else:            # token e of row i -> e + (i + 1) * (1 + k) - cu_seqlens_q[i + 1]
            cu = meta.cu_seqlens_q
            shift = (self.cu_q[1:n + 1] - cu[1:]).long()
            dst = torch.repeat_interleave(shift, (cu[1:] - cu[:-1]).long(), output_size=t)
            dst += torch.arange(t, device=dst.device)
            self.slots[:total].fill_(-1)
            self.input_ids.index_copy_(0, dst, inputs.input_ids)
            self.positions.index_copy_(0, dst, meta.positions)
            self.slots.index_copy_(0, dst, meta.slot_mapping)
            for g, gm in enumerate(groups):
                self.swa_slots[g, :total].fill_(-1)
                self.swa_slots[g].index_copy_(0, dst, gm.slot_mapping)
            lidx = dst.index_select(0, lidx)
        self.cu_k[:n + 1].copy_(meta.cu_seqlens_k, non_blocking=True)
        if bs > n:   # padding rows: no keys
            self.cu_k[n + 1:bs + 1].copy_(meta.cu_seqlens_k[n:].expand(bs - n))
        tab = meta.prefill_block_table
        self.block_table[:n, :tab.shape[1]].copy_(tab, non_blocking=True)
        for g, gm in enumerate(groups):
            self.swa_tables[g, :n, :tab.shape[1]].copy_(gm.prefill_block_table,
                                                        non_blocking=True)
        out = self.graphs[bs]()
        self.num_replays += 1
        capture = getattr(self.model, "hidden_capture", None)
        if capture is not None and t != n * q:
            # an EAGLE head reads the step's hidden states in the eager token order
            capture.buffer[:t].copy_(capture.buffer.index_select(0, dst))
        return out.index_select(0, lidx)


class ModelRunner:
    """Runs the model for scheduled batches over a paged KV pool.

    Args:
        model: a CausalLM (forward contract of minikernels.models.AttentionMetadata).
        block_size: token slots per KV block.
        num_kv_blocks: pool size in blocks; None = from free GPU memory
            (gpu_memory_utilization) on CUDA, or a fixed default on the CPU.
        gpu_memory_utilization: fraction of the GPU's memory this engine may use in all.
        max_num_seqs, max_num_batched_tokens: scheduler limits (used for profiling and
            for the CUDA-graph buckets).
        max_model_len: longest sequence; None = min(model max positions, pool tokens).
        enforce_eager: never capture CUDA graphs.
        kv_cache_dtype: "auto" (the model's dtype), "fp8" / "fp8_e4m3" (e4m3 with the
            attention layers' k_scale / v_scale: half the bytes of bf16 per token) or
            "fp8_e5m2" (e5m2, the same scales).
        extra_kv_bytes_per_token: KV bytes per token of another pool sized with this one
            (a speculative draft model's, engine/draft_model.py): automatic sizing divides
            the budget by (this model's + these) bytes, so both pools get ``num_blocks``
            blocks out of the same memory. 0 = none.
        num_speculative_tokens: k > 0 (speculative decoding configured): also capture
            CUDA graphs of verification steps (rows of 1 + k tokens, :class:`_VerifyGraphs`)
            for batches up to ``max_spec_batch`` (the engine's ``disable_by_batch_size``),
            in the decode graphs' memory pool. Not under tensor parallel (a model with its
            own ``decode_graphs_class``): verification steps run eagerly there.
        num_state_slots: recurrent models (``config.is_recurrent``): the state pool's
            slots, one per sequence running at once (the block manager's ``max_rows``;
            each sequence's slot is its block-table row). 0 for attention-only models.
    """

    def __init__(self, model: torch.nn.Module, block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, enforce_eager: bool = False,
                 kv_cache_dtype: str = "auto", extra_kv_bytes_per_token: int = 0,
                 num_speculative_tokens: int = 0, max_spec_batch: int = 32,
                 lora: Any = None, kv_layout: KVCacheLayout | None = None,
                 num_state_slots: int = 0) -> None:
        self.model = model
        # hybrid recurrent models (LFM2): one state slot per sequence the block manager
        # holds (its block-table row), beside the KV pool
        self.num_state_slots = int(num_state_slots)
        if getattr(model.config, "is_recurrent", False) and self.num_state_slots < 1:
            raise ValueError(f"num_state_slots must be >= 1 for a recurrent model "
                             f"({model.config.architecture}), got {num_state_slots!r}")
        self.kv_layout = kv_layout if kv_layout is not None and kv_layout.hybrid else None
        self.lora = lora      # a LoRAManager: each step's token slots are set on it
        self.config = model.config
        self.device = torch.device(model.device)
        self.block_size = block_size
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.extra_kv_bytes_per_token = int(extra_kv_bytes_per_token)
        self.num_speculative_tokens = int(num_speculative_tokens)
        self.max_spec_batch = int(max_spec_batch)
        self.num_blocks = self._pick_num_blocks(num_kv_blocks, gpu_memory_utilization)
        pool_tokens = self.longest_fitting_sequence()
        max_pos = int(self.config.max_position_embeddings)
        if max_model_len is None:
            max_model_len = min(max_pos, pool_tokens)
        elif max_model_len > max_pos:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({max_pos})")
        elif max_model_len > pool_tokens:
            raise ValueError(f"max_model_len ({max_model_len}) does not fit the KV pool "
                             f"({self.num_blocks} blocks x {block_size}: {pool_tokens} "
                             f"tokens per sequence at most); raise num_kv_blocks / "
                             f"gpu_memory_utilization or lower max_model_len")
        self.max_model_len = int(max_model_len)
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.kv_caches = self._allocate_kv_pool()
        self._upload = _PinnedUploader(self.device) if self.device.type == "cuda" else None
        self.graphs: _DecodeGraphs | None = None
        self.verify_graphs: _VerifyGraphs | None = None
        self.enforce_eager = bool(enforce_eager) or self.device.type != "cuda"
        self.capture_graphs()

    def longest_fitting_sequence(self) -> int:
        """Tokens of the longest sequence the pool holds alone (hybrid pools: its
        full-attention blocks plus its sliding groups' window blocks, less the null
        block)."""
        if self.kv_layout is None:
            return self.num_blocks * self.block_size
        lay, bs = self.kv_layout, self.block_size
        usable = self.num_blocks - 1

        def blocks(n: int) -> int:
            return hybrid_blocks_needed(n, bs, lay.num_sliding_groups, lay.window,
                                        self.max_num_batched_tokens)
        lo, hi = 0, usable * bs
        while lo < hi:                      # the largest n with blocks(n) <= usable
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if blocks(mid) <= usable else (lo, mid - 1)
        return lo

    def capture_graphs(self) -> None:
        """Capture the decode graphs and (speculation) the verification graphs, unless
        eager; called by the constructor and after :meth:`restore`."""
        if self.enforce_eager:
            return
        model, lora = self.model, self.lora
        # a model may bring its own runner (tensor parallel: every rank in lock step)
        graphs_cls = getattr(model, "decode_graphs_class", _DecodeGraphs)
        extra: dict[str, Any] = {"lora": lora} if lora is not None else {}
        if self.kv_layout is not None:
            extra["kv_layout"] = self.kv_layout
        if self.num_state_slots:
            extra["with_state"] = True
        with self.on_device():
            self.graphs = graphs_cls(model, self.kv_caches,
                                     graph_batch_sizes(self.max_num_seqs),
                                     self.max_blocks_per_seq, self.config.vocab_size, **extra)
        if (self.num_speculative_tokens > 0 and not hasattr(model, "decode_graphs_class")
                and lora is None and not self.num_state_slots):
            # (recurrent models verify eagerly: their rows' state slots and snapshots)
            # (with LoRA, verification steps run eagerly: their token slots vary per step)
            try:
                self.capture_verify_graphs()
            except Exception as e:  # noqa: BLE001 - an op that cannot be captured: stay eager
                self.verify_graphs = None
                logger.warning("verification CUDA graphs not captured (%s: %s); "
                               "speculative steps run eagerly", type(e).__name__, e)

    def copy_state_slots(self, src: list[int], dst: list[int]) -> None:
        """Recurrent models: copy each state slot ``src[i]`` to ``dst[i]`` in every state
        tensor (speculative rows' snapshots before a verification step, and their
        restores after a rejection)."""
        if not src:
            return
        self.model.copy_state_slots(self.kv_caches, src, dst)

    def release(self) -> None:
        """Sleep: drop the CUDA graphs and free the KV pool's memory (its tensors stay,
        empty, so every holder keeps them); :meth:`restore` reallocates it, zeroed."""
        from .sleep import empty_kv_caches

        self.graphs = self.verify_graphs = None
        self._kv_shapes = empty_kv_caches(self.kv_caches)

    def restore(self) -> None:
        """Wake up: a zeroed KV pool of the same shapes (graphs: :meth:`capture_graphs`)."""
        from .sleep import refill_kv_caches

        refill_kv_caches(self.kv_caches, self._kv_shapes)

    def verify_graph_sizes(self) -> list[int]:
        """Verification-graph buckets: up to the largest batch that drafts (at most
        ``max_spec_batch`` rows, and as many rows of 1 + k tokens as the step budget
        holds); [] without speculation."""
        q = 1 + self.num_speculative_tokens
        top = min(self.max_num_seqs, self.max_spec_batch, self.max_num_batched_tokens // q)
        if self.num_speculative_tokens <= 0 or top < 1:
            return []
        return graph_batch_sizes(top)

    def capture_verify_graphs(self, graphs_cls: type | None = None) -> _VerifyGraphs | None:
        """Capture the verification graphs (called by the constructor on CUDA).
        graphs_cls: a :class:`_VerifyGraphs` subclass (tests: a CPU stand-in that runs the
        padded static buffers eagerly)."""
        sizes = self.verify_graph_sizes()
        if not sizes:
            return None
        cls = graphs_cls or _VerifyGraphs
        with self.on_device():
            extra = {"kv_layout": self.kv_layout} if self.kv_layout is not None else {}
            self.verify_graphs = cls(self.model, self.kv_caches, sizes,
                                     self.max_blocks_per_seq, self.num_speculative_tokens,
                                     self.max_model_len,
                                     pool=getattr(self.graphs, "pool", None), **extra)
        return self.verify_graphs

    def on_device(self) -> contextlib.AbstractContextManager:
        """Make this runner's GPU the thread's current device for a block (graph capture,
        Triton launches and stream look-ups use the current device, so an engine on
        cuda:1, e.g. a data-parallel replica, must not run under cuda:0). A no-op on the
        CPU and when it already is current."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        index = self.device.index if self.device.index is not None else \
            torch.cuda.current_device()
        if torch.cuda.current_device() == index:
            return contextlib.nullcontext()
        return torch.cuda.device(index)

    # ------------------------------------------------------------------ KV pool
    def _allocate_kv_pool(self) -> list:
        """The paged KV cache: per layer (k_cache, v_cache), each
        ``[num_blocks, block_size, kv_heads, head_dim]`` in the model's dtype or fp8."""
        extra: dict[str, Any] = {"layout": self.kv_layout} if self.kv_layout is not None \
            else {}
        if self.num_state_slots:
            extra["num_state_slots"] = self.num_state_slots
        if self.kv_cache_dtype is None:
            return self.model.allocate_kv_caches(self.num_blocks, self.block_size, **extra)
        return self.model.allocate_kv_caches(self.num_blocks, self.block_size,
                                             dtype=self.kv_cache_dtype, **extra)

    def _pick_num_blocks(self, num_kv_blocks: int | None, util: float) -> int:
        if num_kv_blocks is not None:
            if (not isinstance(num_kv_blocks, int) or isinstance(num_kv_blocks, bool)
                    or num_kv_blocks < 1):
                raise ValueError(f"num_kv_blocks must be an int >= 1, got {num_kv_blocks!r}")
            return num_kv_blocks
        if not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        extra = {"layout": self.kv_layout} if self.kv_layout is not None else {}
        bytes_per_block = (self.model.kv_bytes_per_token(self.kv_cache_dtype, **extra)
                           + self.extra_kv_bytes_per_token) * self.block_size
        if bytes_per_block == 0:
            return self._attention_free_blocks()
        if self.device.type != "cuda":
            return max(16, min(CPU_MAX_BLOCKS, CPU_KV_POOL_BYTES // bytes_per_block))
        peak = self._profile_peak_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        # Budget: util * total, minus what is held now (weights, other processes),
        # minus the forward's peak activations, minus room for graphs and the sampler.
        sampler = 4 * 4 * self.max_num_seqs * self.config.vocab_size
        # verification graphs keep their bs * (1 + k) fp32 logits rows in the graph pool
        sampler += 4 * (1 + self.num_speculative_tokens) * self.config.vocab_size * max(
            self.verify_graph_sizes() or [0])
        states = self.num_state_slots * self.model.state_bytes_per_slot() \
            if self.num_state_slots else 0
        budget = (util * total - used_by_others - torch.cuda.memory_allocated(self.device)
                  - peak - sampler - states - (256 << 20))
        blocks = int(budget // bytes_per_block)
        if blocks < 1:
            held = (f"; the recurrent state slots take {states / 2**30:.2f} GiB "
                    f"({self.num_state_slots} slots: lower max_num_seqs)") if states else ""
            raise ValueError(f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f}"
                             f" GiB at gpu_memory_utilization={util}{held}); raise it or lower "
                             f"max_num_batched_tokens")
        logger.info("KV pool: %d blocks (%.2f GiB)%s", blocks, blocks * bytes_per_block / 2**30,
                    f"; recurrent states: {self.num_state_slots} slots ({states / 2**30:.2f} "
                    f"GiB)" if states else "")
        return blocks

    def _attention_free_blocks(self) -> int:
        """An attention-free model's pool (no KV bytes): blocks for max_num_seqs sequences
        of the model's full length (at most ATTENTION_FREE_MAX_BLOCKS); its state slots are
        all the memory it takes, checked against the device's free memory."""
        per_seq = -(-int(self.config.max_position_embeddings) // self.block_size)
        blocks = max(16, min(ATTENTION_FREE_MAX_BLOCKS, self.max_num_seqs * per_seq))
        states = self.num_state_slots * self.model.state_bytes_per_slot()
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if states > free:
                raise ValueError(f"the recurrent state slots take {states / 2**30:.2f} GiB "
                                 f"({self.num_state_slots} slots), more than the "
                                 f"{free / 2**30:.2f} GiB free: lower max_num_seqs")
        logger.info("attention-free model: %d bookkeeping blocks; recurrent states: %d slots "
                    "(%.2f GiB)", blocks, self.num_state_slots, states / 2**30)
        return blocks

    def _profile_peak_bytes(self) -> int:
        """Extra memory one forward of max_num_batched_tokens tokens needs (CUDA only)."""
        n = min(self.max_num_batched_tokens, int(self.config.max_position_embeddings))
        rows = min(self.max_num_seqs, n)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        meta = AttentionMetadata.for_prompts([n], device=self.device)
        meta.logits_indices = torch.arange(n - rows, n, device=self.device)
        with torch.inference_mode(), index_checks_off(), self.on_device():
            self.model(ids, meta, None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return int(peak)

    # ------------------------------------------------------------------ run
    def prepare(self, batch: ScheduledBatch, table: np.ndarray | None = None,
                row_blocks: np.ndarray | None = None,
                swa_table: np.ndarray | None = None) -> StepInputs:
        """Step inputs from the block manager's mirrors (swa_table: hybrid pools)."""
        hybrid = self.kv_layout is not None
        return build_step_inputs(batch, self.block_size, self.num_blocks, self.device,
                                 with_state=self.num_state_slots > 0,
                                 upload=self._upload, table=table, row_blocks=row_blocks,
                                 swa_table=swa_table if hybrid else None,
                                 layer_group=self.kv_layout.layer_group if hybrid else None)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, prev_tokens: Tensor | None = None) -> Tensor:
        """Launch one forward -> fp32 logits of the sampling rows (on the device; no sync).

        prev_tokens: the previous step's sampled tokens (device), for input tokens that
        are still only there (inputs.pending_*).
        """
        with self.on_device():
            return self._forward(inputs, prev_tokens)

    def _forward(self, inputs: StepInputs, prev_tokens: Tensor | None) -> Tensor:
        if inputs.pending_dst is not None:
            if prev_tokens is None:
                raise RuntimeError("step inputs need the previous step's sampled tokens")
            inputs.input_ids.index_copy_(0, inputs.pending_dst,
                                         prev_tokens.index_select(0, inputs.pending_src))
        logits = None
        with index_checks_off():
            if self.graphs is not None and inputs.decode_only:
                logits = self.graphs.run(inputs)
            elif self.verify_graphs is not None and inputs.spec is not None:
                logits = self.verify_graphs.run(inputs)
            if logits is None:
                if self.lora is not None:
                    self.lora.set_token_slots(inputs.lora_slots)
                logits = self.model(inputs.input_ids, inputs.meta, self.kv_caches)
        return logits

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[Tensor, list[int]]:
        """Prepare + forward in one call (no pending inputs): (logits, their seq indices)."""
        inputs = self.prepare(batch)
        return self.forward(inputs), inputs.sample_rows

    def to_host_async(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """Start device->host copies (pinned, non-blocking on CUDA; as is elsewhere)."""
        if self.device.type != "cuda":
            return tensors
        return [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]

    def completion_event(self) -> Any:
        """An event that completes when the work launched so far is done.

        ``synchronize()`` waits for it. CUDA: an event on the current stream. A model may
        provide ``completion_event()`` itself (the engine benchmark's simulated GPU);
        otherwise work on the CPU is already done.
        """
        own = getattr(self.model, "completion_event", None)
        if own is not None:
            return own()
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return _DONE
