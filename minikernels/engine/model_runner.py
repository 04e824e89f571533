"""Model runner: owns the KV pool, builds each step's AttentionMetadata, runs the model.

Step inputs (see :class:`minikernels.models.AttentionMetadata`) are built on the host
from the scheduled batch, validated there (block ids and slots in range, block tables
long enough), copied to the device in one go, and the model runs with the op-level
data-dependent index checks off (they would each sync the device).

CUDA graphs: a step whose tokens are all single decode tokens (the common case at high
load) replays a graph captured for the smallest bucket size >= its batch size. Graphs
read static input buffers; rows past the real batch are padding: slot -1 (the KV write
skips it), seq_len 0 (attention returns zeros) and token 0. Mixed or prefill steps, CPU
runs and ``enforce_eager=True`` run eagerly.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import _validation
from ..models.metadata import AttentionMetadata
from .scheduler import ScheduledBatch

logger = logging.getLogger("minikernels.engine")

CPU_KV_POOL_BYTES = 1 << 30          # default KV pool on the CPU: 1 GiB ...
CPU_MAX_BLOCKS = 4096                # ... but at most this many blocks
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


@dataclass
class StepInputs:
    """Host-built inputs of one step (tensors on the target device).

    sample_rows: for each logits row, the index into batch.seqs of the sequence it
    belongs to (sequences that reach their last token this step).
    """

    input_ids: Tensor
    meta: AttentionMetadata
    sample_rows: list[int]
    decode_only: bool


def build_step_inputs(batch: ScheduledBatch, block_size: int, num_blocks: int,
                      device: torch.device | str = "cpu",
                      block_table_width: int | None = None,
                      upload: Callable[[Tensor], Tensor] | None = None) -> StepInputs:
    """Flatten a scheduled batch into (input_ids, AttentionMetadata) for one forward.

    Decode entries (one new token each) come first, then prefill chunks; the batch is
    already ordered that way by the scheduler. Raises RuntimeError if a block table does
    not cover its tokens or holds an id outside the pool (an engine bug, caught on the
    host before the device sees it).
    """
    nd = batch.num_decode
    seqs, counts = batch.seqs, batch.num_new_tokens
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    tables: list[list[int]] = []
    logits_idx: list[int] = []
    sample_rows: list[int] = []
    seq_lens: list[int] = []
    cu_q, cu_k = [0], [0]
    max_q = max_k = 0
    t = 0
    for i, (seq, n) in enumerate(zip(seqs, counts)):
        c = seq.num_computed_tokens
        end = c + n
        table = seq.block_table
        if len(table) * block_size < end or n < 1 or end > seq.num_tokens:
            raise RuntimeError(f"{seq}: {n} new tokens after {c} computed do not fit its "
                               f"{len(table)} blocks of {block_size}")
        ids.extend(seq.token_ids[c:end])
        pos.extend(range(c, end))
        if n == 1:
            slots.append(table[c // block_size] * block_size + c % block_size)
        else:
            p = np.arange(c, end)
            slots.extend((np.asarray(table)[p // block_size] * block_size
                          + p % block_size).tolist())
        tables.append(table)
        if i < nd:
            seq_lens.append(end)
        else:
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            max_q, max_k = max(max_q, n), max(max_k, end)
        t += n
        if end == seq.num_tokens:
            logits_idx.append(t - 1)
            sample_rows.append(i)
    width = max((len(tb) for tb in tables), default=1)
    if block_table_width is not None:
        width = max(width, block_table_width)
    # One flat int64 host buffer (numpy fills it without per-element Python objects)
    # -> one host-to-device copy; the metadata tensors are views of it.
    num_prefill = len(seqs) - nd
    parts = [ids, pos, slots, logits_idx, seq_lens, cu_q if num_prefill else [],
             cu_k if num_prefill else []]
    sizes = [len(p) for p in parts] + [len(seqs) * width]
    host = np.zeros(sum(sizes), dtype=np.int64)
    o = 0
    for part in parts:
        host[o:o + len(part)] = part
        o += len(part)
    tab = host[o:].reshape(len(seqs), width)
    for r, tb in enumerate(tables):
        tab[r, :len(tb)] = tb
    if tables and (tab.min() < 0 or tab.max() >= num_blocks):
        raise RuntimeError(f"block table holds ids outside [0, {num_blocks})")
    flat_host = torch.from_numpy(host)
    flat = upload(flat_host) if upload is not None else flat_host.to(device)
    views = list(torch.split(flat, sizes))
    ids_t, pos_t, slots_t, lidx_t, lens_t, cuq_t, cuk_t, tab_t = views
    tab_t = tab_t.to(torch.int32).reshape(len(seqs), width)
    meta = AttentionMetadata(
        positions=pos_t, slot_mapping=slots_t, num_decode=nd,
        decode_block_table=tab_t[:nd] if nd else None,
        decode_seq_lens=lens_t.to(torch.int32) if nd else None,
        cu_seqlens_q=cuq_t.to(torch.int32) if num_prefill else None,
        cu_seqlens_k=cuk_t.to(torch.int32) if num_prefill else None,
        max_seqlen_q=max_q, max_seqlen_k=max_k,
        prefill_block_table=tab_t[nd:] if num_prefill else None,
        logits_indices=lidx_t)
    return StepInputs(input_ids=ids_t, meta=meta, sample_rows=sample_rows,
                      decode_only=(nd == len(seqs)))


class _PinnedUploader:
    """Host->device copies through one reusable pinned buffer (grown on demand).

    The copy is asynchronous, so before the buffer is overwritten we wait for the event
    recorded after the previous copy. Usually that is already done (a step that samples
    ends with a device->host sync), but a step of non-final prefill chunks samples
    nothing and does not sync: without the wait, the next step could overwrite inputs the
    device has not read yet.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buf = torch.empty(0, dtype=torch.int64)
        self.copied: torch.cuda.Event | None = None   # recorded after the last copy

    def __call__(self, host: Tensor) -> Tensor:
        n = host.numel()
        if self.copied is not None:
            self.copied.synchronize()
        if self.buf.numel() < n:
            self.buf = torch.empty(max(n, 2 * self.buf.numel(), 1 << 16), dtype=torch.int64,
                                   pin_memory=True)
        staged = self.buf[:n]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        if self.copied is None:
            self.copied = torch.cuda.Event()
        self.copied.record(torch.cuda.current_stream(self.device))
        return out


class _DecodeGraphs:
    """CUDA graphs of decode-only forwards, one per batch-size bucket, sharing a pool."""

    def __init__(self, model: torch.nn.Module, kv_caches: list, sizes: list[int],
                 max_blocks_per_seq: int, vocab: int) -> None:
        dev = model.device
        top = sizes[-1]
        self.sizes = sizes
        self.width = max_blocks_per_seq
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        pool = None
        with torch.inference_mode(), index_checks_off():
            for bs in reversed(sizes):  # largest first: later graphs reuse its memory
                meta = self._meta(bs)
                stream = torch.cuda.Stream(device=dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    model(self.input_ids[:bs], meta, kv_caches)  # warm-up (lazy init)
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(self.input_ids[:bs], meta, kv_caches)
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(dev)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(positions=self.positions[:bs], slot_mapping=self.slots[:bs],
                                 num_decode=bs, decode_block_table=self.block_table[:bs],
                                 decode_seq_lens=self.seq_lens[:bs], logits_indices=None)

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
        graph, out = self.graphs[bs]
        graph.replay()
        return out.index_select(0, meta.logits_indices)


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
    """

    def __init__(self, model: torch.nn.Module, block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, enforce_eager: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.device = torch.device(model.device)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_blocks = self._pick_num_blocks(num_kv_blocks, gpu_memory_utilization)
        pool_tokens = self.num_blocks * block_size
        max_pos = int(self.config.max_position_embeddings)
        if max_model_len is None:
            max_model_len = min(max_pos, pool_tokens)
        elif max_model_len > max_pos:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({max_pos})")
        elif max_model_len > pool_tokens:
            raise ValueError(f"max_model_len ({max_model_len}) does not fit the KV pool "
                             f"({self.num_blocks} blocks x {block_size} = {pool_tokens} "
                             f"tokens); raise num_kv_blocks / gpu_memory_utilization or "
                             f"lower max_model_len")
        self.max_model_len = int(max_model_len)
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.kv_caches = model.allocate_kv_caches(self.num_blocks, block_size)
        self._upload = _PinnedUploader(self.device) if self.device.type == "cuda" else None
        self.graphs: _DecodeGraphs | None = None
        self.enforce_eager = bool(enforce_eager) or self.device.type != "cuda"
        if not self.enforce_eager:
            self.graphs = _DecodeGraphs(model, self.kv_caches,
                                        graph_batch_sizes(max_num_seqs),
                                        self.max_blocks_per_seq, self.config.vocab_size)

    # ------------------------------------------------------------------ KV pool size
    def _pick_num_blocks(self, num_kv_blocks: int | None, util: float) -> int:
        if num_kv_blocks is not None:
            if (not isinstance(num_kv_blocks, int) or isinstance(num_kv_blocks, bool)
                    or num_kv_blocks < 1):
                raise ValueError(f"num_kv_blocks must be an int >= 1, got {num_kv_blocks!r}")
            return num_kv_blocks
        if not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        bytes_per_block = self.model.kv_bytes_per_token() * self.block_size
        if self.device.type != "cuda":
            return max(16, min(CPU_MAX_BLOCKS, CPU_KV_POOL_BYTES // bytes_per_block))
        peak = self._profile_peak_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        # Budget: util * total, minus what is held now (weights, other processes),
        # minus the forward's peak activations, minus room for graphs and the sampler.
        sampler = 4 * 4 * self.max_num_seqs * self.config.vocab_size
        budget = (util * total - used_by_others - torch.cuda.memory_allocated(self.device)
                  - peak - sampler - (256 << 20))
        blocks = int(budget // bytes_per_block)
        if blocks < 1:
            raise ValueError(f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f}"
                             f" GiB at gpu_memory_utilization={util}); raise it or lower "
                             f"max_num_batched_tokens")
        logger.info("KV pool: %d blocks (%.2f GiB)", blocks, blocks * bytes_per_block / 2**30)
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
        with torch.inference_mode(), index_checks_off():
            self.model(ids, meta, None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return int(peak)

    # ------------------------------------------------------------------ run
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        return build_step_inputs(batch, self.block_size, self.num_blocks, self.device,
                                 upload=self._upload)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[Tensor, list[int]]:
        """One forward over the batch -> (fp32 logits of sampling rows, their seq indices)."""
        inputs = self.prepare(batch)
        logits = None
        with index_checks_off():
            if self.graphs is not None and inputs.decode_only:
                logits = self.graphs.run(inputs)
            if logits is None:
                logits = self.model(inputs.input_ids, inputs.meta, self.kv_caches)
        return logits, inputs.sample_rows
