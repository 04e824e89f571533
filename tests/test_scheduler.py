"""Scheduler: token budget, chunked prefill mixed with decode, preemption; step metadata."""
from __future__ import annotations

import pytest
import torch

from minikernels.engine.block_manager import BlockManager
from minikernels.engine.model_runner import build_step_inputs, graph_batch_sizes, pick_graph_size
from minikernels.engine.sampling_params import SamplingParams
from minikernels.engine.scheduler import Scheduler
from minikernels.engine.sequence import Request, Sequence, SequenceStatus

_ids = iter(range(10**9))


def make_seq(n_tokens: int, start: int = 0) -> Sequence:
    req = Request(f"r{next(_ids)}", None, list(range(start, start + n_tokens)),
                  SamplingParams())
    seq = Sequence(next(_ids), req, 0)
    req.seqs.append(seq)
    return seq


def run_step(sched: Scheduler):
    """Schedule one step and pretend it ran: sampling sequences get token 1."""
    batch = sched.schedule()
    samplers = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
    sched.advance(batch)
    for s in samplers:
        s.token_ids.append(1)
    return batch


def test_budget_mixes_decode_with_chunked_prefill():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10, watermark=0.0)
    a, b = make_seq(3), make_seq(4, 100)
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    assert batch.num_new_tokens == [3, 4] and batch.num_decode == 0
    long = make_seq(30, 200)
    sched.add(long)
    batch = run_step(sched)
    # Two decode tokens first, then an 8-token chunk of the long prompt.
    assert batch.seqs[:2] == [a, b] and batch.num_decode == 2
    assert batch.num_new_tokens == [1, 1, 8]
    assert not batch.samples(2)
    n = 8
    while long.num_computed_tokens < 30:
        batch = run_step(sched)
        assert batch.num_tokens <= 10
        n += batch.num_new_tokens[-1] if batch.seqs[-1] is long else 0
    assert long.num_output_tokens == 1  # sampled exactly once, at its last prompt token
    for s in (a, b, long):
        sched.finish(s, "length")
    bm.check_invariants([])


def test_max_num_seqs_caps_running():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(3, 10 * i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = run_step(sched)
    assert len(batch.seqs) == 2 and sched.num_waiting == 2


def test_preemption_frees_newest_and_requeues_it_first():
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.0)
    a, b = make_seq(7), make_seq(7, 50)   # 2 blocks each: pool full after admission
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert bm.num_free_blocks == 0
    # a: 8 tokens, computed 7 -> fits its 2 blocks; then 9 tokens needs a third block.
    run_step(sched)
    batch = sched.schedule()
    assert batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and sched.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.num_output_tokens == 2  # generated tokens are kept for the recompute
    assert batch.seqs == [a]
    sched.advance(batch)
    bm.check_invariants([a])
    sched.finish(a, "length")
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [b.num_tokens]
    sched.finish(b, "abort")
    bm.check_invariants([])


def test_lone_sequence_preempts_itself_then_resumes():
    bm = BlockManager(3, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.0)
    a = make_seq(12)  # all 3 blocks
    sched.add(a)
    run_step(sched)
    batch = sched.schedule()  # needs a 4th block: nobody to preempt but itself
    assert batch.preempted == [a] and batch.is_empty
    bm.check_invariants([])


def test_step_metadata_layout():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=9, watermark=0.0)
    a = make_seq(5)
    sched.add(a)
    run_step(sched)                 # a prefilled (5 tokens) and sampled
    b = make_seq(10, 100)
    sched.add(b)
    batch = sched.schedule()        # a decodes 1, b prefills a chunk of 8
    inputs = build_step_inputs(batch, 4, 32)
    m = inputs.meta
    assert m.num_decode == 1 and inputs.input_ids.tolist()[0] == a.token_ids[5]
    assert m.positions.tolist() == [5] + list(range(8))
    slots = [a.block_table[5 // 4] * 4 + 1] + [b.block_table[p // 4] * 4 + p % 4
                                                for p in range(8)]
    assert m.slot_mapping.tolist() == slots
    assert m.decode_seq_lens.tolist() == [6]
    assert m.cu_seqlens_q.tolist() == [0, 8] and m.cu_seqlens_k.tolist() == [0, 8]
    assert m.decode_block_table.dtype == torch.int32
    assert m.prefill_block_table.shape[0] == 1
    assert m.logits_indices.tolist() == [0] and inputs.sample_rows == [0]
    assert not inputs.decode_only


def test_graph_buckets():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = graph_batch_sizes(256)
    assert sizes[-1] == 256 and 48 in sizes
    assert pick_graph_size(3, sizes) == 4
    assert pick_graph_size(17, sizes) == 32
    assert pick_graph_size(257, sizes) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_upload_is_not_overwritten_before_the_device_reads_it():
    # A step of non-final prefill chunks samples nothing, so nothing syncs the device
    # before the next step refills the pinned staging buffer: the uploader must wait for
    # its previous (asynchronous) copy first.
    from minikernels.engine.model_runner import _PinnedUploader

    up = _PinnedUploader(torch.device("cuda"))
    a = torch.arange(4096, dtype=torch.int64)
    up(a)
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)      # keep the stream busy: the next copy is queued
    first = up(a)
    second = up(a + 1)                  # refills the staging buffer
    torch.cuda.synchronize()
    assert torch.equal(first.cpu(), a) and torch.equal(second.cpu(), a + 1)


def make_prio_seq(n_tokens: int, priority: int, start: int = 0) -> Sequence:
    req = Request(f"r{next(_ids)}", None, list(range(start, start + n_tokens)),
                  SamplingParams(priority=priority))
    seq = Sequence(next(_ids), req, 0)
    req.seqs.append(seq)
    return seq


def test_waiting_and_running_are_ordered_by_priority_then_arrival():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100, watermark=0.0)
    seqs = [make_prio_seq(3, p, 10 * i) for i, p in enumerate([2, 0, 2, -1, 0])]
    for s in seqs:
        sched.add(s)
    assert list(sched.waiting) == [seqs[3], seqs[1], seqs[4], seqs[0], seqs[2]]
    batch = run_step(sched)
    assert batch.seqs == [seqs[3], seqs[1]] and sched.running == [seqs[3], seqs[1]]
    sched.finish(seqs[1], "length")
    batch = run_step(sched)           # seqs[4] admitted behind the running seqs[3]
    assert sched.running == [seqs[3], seqs[4]]
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s, "abort")
    bm.check_invariants([])


def test_preemption_takes_lowest_priority_even_if_older():
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.0)
    low, high = make_prio_seq(7, 1), make_prio_seq(7, 0, 50)   # low arrived first
    sched.add(low)
    sched.add(high)
    run_step(sched)
    run_step(sched)
    batch = sched.schedule()          # the pool is full: one of them must go
    assert batch.preempted == [low] and batch.seqs == [high]
    assert sched.waiting[0] is low
    sched.advance(batch)
    for s in (high, low):
        sched.finish(s, "abort")
    bm.check_invariants([])
