"""BlockManager: ref counts, free list, prefix caching by chained block hashes."""
from __future__ import annotations

import struct

import pytest

from minikernels.engine.block_manager import BlockManager
from minikernels.engine.sampling_params import SamplingParams
from minikernels.engine.sequence import Request, Sequence

_ids = iter(range(10**9))


def make_seq(tokens: list[int]) -> Sequence:
    req = Request(f"r{next(_ids)}", None, tokens, SamplingParams())
    seq = Sequence(next(_ids), req, 0)
    req.seqs.append(seq)
    return seq


def admit(bm: BlockManager, seq: Sequence, n: int | None = None) -> bool:
    hits = bm.lookup_prefix(seq)
    computed = len(hits) * bm.block_size
    return bm.allocate(seq, (seq.num_tokens - computed) if n is None else n, hits)


def test_allocate_and_free_accounting():
    bm = BlockManager(8, 4)
    a, b = make_seq(list(range(10))), make_seq(list(range(100, 105)))
    assert admit(bm, a) and admit(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 3
    bm.check_invariants([a, b])
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free_blocks == 8 and a.block_table == [] and a.num_computed_tokens == 0
    bm.check_invariants([])


def test_allocate_failure_changes_nothing():
    bm = BlockManager(2, 4, enable_prefix_caching=False)
    a = make_seq(list(range(12)))  # needs 3 blocks
    assert not admit(bm, a)
    assert bm.num_free_blocks == 2 and a.block_table == []
    bm.check_invariants([])


def test_incremental_allocation_grows_table():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    s = make_seq(list(range(4)))
    assert bm.allocate(s, 4)
    s.num_computed_tokens = 4
    s.token_ids.append(7)
    assert bm.allocate(s, 1)
    assert len(s.block_table) == 2
    bm.free_seq(s)
    bm.check_invariants([])


def test_shared_prefix_is_shared_and_ref_counted():
    bm = BlockManager(16, 4)
    prefix = list(range(1, 9))                      # two full blocks
    a = make_seq(prefix + [50, 51, 52])
    b = make_seq(prefix + [60])
    assert admit(bm, a)
    assert admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 0  # set by the scheduler
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.num_hit_tokens == 8
    bm.check_invariants([a, b])
    bm.free_seq(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free_seq(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16
    # Freed but still cached: a new sequence hits the blocks from the free list.
    c = make_seq(prefix + [70, 71])
    hits = bm.lookup_prefix(c)
    assert len(hits) == 2
    assert bm.allocate(c, c.num_tokens - 8, hits)
    assert bm.num_free_blocks == 16 - 3
    bm.free_seq(c)
    bm.check_invariants([])


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(8, 4)
    tokens = list(range(1, 9))  # exactly two blocks
    a = make_seq(tokens)
    assert admit(bm, a)
    b = make_seq(list(tokens))
    hits = bm.lookup_prefix(b)
    assert len(hits) == 1       # block 2 holds the last token: recomputed
    assert bm.allocate(b, 4, hits)
    assert b.num_computed_tokens == 4
    for s in (a, b):
        bm.free_seq(s)
    bm.check_invariants([])


def test_eviction_drops_hash_and_lru_order():
    bm = BlockManager(3, 2)
    a = make_seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    bm.free_seq(a)
    assert len(bm.cached) == 2
    # A different 6-token prompt takes all 3 blocks: every cached block is evicted.
    b = make_seq([9, 9, 9, 9, 9, 9])
    assert admit(bm, b)
    assert set(bm.cached.values()) <= set(b.block_table)   # a's hashes are all gone
    assert len(bm.cached) == 3                              # chained: 3 distinct hashes
    c = make_seq([1, 2, 3, 4, 5])
    assert bm.lookup_prefix(c) == []
    bm.free_seq(b)
    bm.check_invariants([])


def test_equal_block_after_a_different_prefix_is_not_served():
    bm = BlockManager(8, 2)
    a = make_seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    b = make_seq([7, 7, 3, 4, 5])          # block 1 is equal, the prefix before it is not
    assert bm.lookup_prefix(b) == []
    c = make_seq([1, 2, 9, 9, 5])
    assert bm.lookup_prefix(c) == a.block_table[:1]
    bm.free_seq(a)
    bm.check_invariants([])


def test_hash_blocks_matches_chain_hash_and_is_split_invariant():
    from minikernels.engine.block_manager import chain_hash, hash_blocks

    ids = list(range(1000, 1037))
    want, prev = [], None
    for i in range(37 // 4):
        prev = chain_hash(prev, ids[4 * i:4 * i + 4])
        want.append(prev)
    assert hash_blocks(ids, 4, 0, 9, None) == want
    assert hash_blocks(ids, 4, 0, 3, None) + hash_blocks(ids, 4, 3, 6, want[2]) == want


def test_prompt_block_hashes_computed_ahead_equal_the_managers_own():
    bm = BlockManager(16, 4)
    ids = list(range(50, 61))                      # 2 full blocks + 3 tokens
    own = make_seq(ids)
    bm.hash_prompt(own)
    ahead = bm.prompt_block_hashes(ids, None)
    assert ahead == own.block_hashes and len(ahead) == 2
    seq = make_seq(ids)
    bm.hash_prompt(seq, ahead)
    assert seq.block_hashes is ahead               # taken, not recomputed
    # a salt changes every hash; prefix caching off hashes nothing
    assert set(bm.prompt_block_hashes(ids, "user-a")).isdisjoint(ahead)
    assert BlockManager(16, 4, enable_prefix_caching=False).prompt_block_hashes(ids, None) == []
    # a later prompt whose hashes came ahead hits the blocks the first one registered
    assert admit(bm, own)
    bm.register_full_blocks(own, own.num_tokens)
    again = make_seq(ids)
    bm.hash_prompt(again, bm.prompt_block_hashes(ids, None))
    assert bm.lookup_prefix(again) == own.block_table[:2]
    with pytest.raises(ValueError, match="prompt_block_hashes has 1 hashes"):
        bm.hash_prompt(make_seq(ids), ahead[:1])


def test_prompt_hashed_at_add_and_output_blocks_registered_when_known():
    bm = BlockManager(8, 2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.hash_prompt(a)
    assert len(a.block_hashes) == 2
    assert admit(bm, a)
    assert len(bm.cached) == 2
    # A pending token (still on the device) fills block 2: not registered until known.
    a.num_pending = 1
    assert bm.allocate(a, 1)
    bm.register_full_blocks(a, 6)
    assert len(bm.cached) == 2 and a.num_registered_blocks == 2
    a.token_ids.append(6)
    a.num_pending = 0
    bm.register_full_blocks(a, 6)
    assert len(bm.cached) == 3 and a.num_registered_blocks == 3
    bm.check_invariants([a])
    bm.free_seq(a)
    bm.check_invariants([])


def test_block_table_mirror_follows_allocations_and_rows_are_reused():
    bm = BlockManager(128, 2)
    seqs = [make_seq(list(range(10 * i, 10 * i + 7))) for i in range(20)]   # > 16 rows
    for s in seqs:
        assert admit(bm, s)
    bm.check_invariants(seqs)
    assert len({s.block_row for s in seqs}) == 20
    freed_rows = {s.block_row for s in seqs[::2]}
    for s in seqs[::2]:
        bm.free_seq(s)
        assert s.block_row == -1
    live = seqs[1::2]
    bm.check_invariants(live)
    again = make_seq([99, 98, 97])
    assert admit(bm, again)
    assert again.block_row in freed_rows
    assert (bm.table[again.block_row, 2:] == 0).all()        # a reused row starts clean
    bm.check_invariants(live + [again])


def test_prefix_caching_disabled_shares_nothing():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a, b = make_seq([1, 2, 3, 4, 5]), make_seq([1, 2, 3, 4, 5])
    assert admit(bm, a) and admit(bm, b)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert not bm.cached
    for s in (a, b):
        bm.free_seq(s)
    bm.check_invariants([])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(bad, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, bad)


def test_chain_hash_is_cryptographic_and_chained():
    from minikernels.engine.block_manager import chain_hash

    a = chain_hash(None, (1, 2, 3, 4))
    assert isinstance(a, bytes) and len(a) == 32
    assert chain_hash(None, (1, 2, 3, 4)) == a                       # deterministic
    assert chain_hash(a, (5, 6, 7, 8)) != chain_hash(None, (5, 6, 7, 8))  # depends on prefix
    assert chain_hash(None, (1, 2, 3, 5)) != a
    # token ids are hashed as uint32 (validated against the vocabulary before): an id
    # that does not fit is refused, never wrapped onto another id's bytes
    assert chain_hash(None, (0,)) != chain_hash(None, (1,))
    assert chain_hash(None, (2**32 - 1,)) != chain_hash(None, (2**31 - 1,))
    for bad in (-1, 2**32):
        with pytest.raises(struct.error):
            chain_hash(None, (bad,))


def test_cache_salt_changes_every_hash_and_separates_hits():
    def salted(tokens: list[int], salt) -> Sequence:
        req = Request(f"r{next(_ids)}", None, tokens, SamplingParams(cache_salt=salt))
        seq = Sequence(next(_ids), req, 0)
        req.seqs.append(seq)
        return seq

    bm = BlockManager(32, 4)
    tokens = list(range(13))                     # 3 full blocks
    seqs = {salt: salted(tokens, salt) for salt in (None, "a", "b")}
    for s in seqs.values():
        bm.hash_prompt(s)
    hashes = {salt: s.block_hashes for salt, s in seqs.items()}
    assert all(len(h) == 3 for h in hashes.values())
    for i in range(3):      # every block's hash differs between the salts
        assert len({h[i] for h in hashes.values()}) == 3
    twin = salted(tokens, "a")
    bm.hash_prompt(twin)
    assert twin.block_hashes == hashes["a"]
    assert admit(bm, seqs["a"])
    assert bm.lookup_prefix(salted(tokens, "b")) == []
    assert bm.lookup_prefix(salted(tokens, None)) == []
    assert bm.lookup_prefix(twin) == seqs["a"].block_table[:3]
    assert bm.num_queried_tokens == 13


def test_prompt_logprobs_sequence_never_reads_the_cache():
    bm = BlockManager(32, 4)
    a = make_seq(list(range(13)))
    assert admit(bm, a)
    req = Request("plp", None, list(range(13)), SamplingParams(prompt_logprobs=1))
    b = Sequence(next(_ids), req, 0)
    req.seqs.append(b)
    assert bm.lookup_prefix(b) == []
    assert admit(bm, b)
    assert bm.num_hit_tokens == 0 and bm.num_queried_tokens == 13
    bm.check_invariants([a, b])


@pytest.mark.parametrize("seed", range(6))
def test_free_seqs_equals_free_seq_one_by_one(seed):
    """Releasing many sequences at once (a step finishing them) gives the same reference
    counts, free-list order, table mirror and rows as releasing them one after another:
    shared prefix blocks, sequences with no blocks, fewer and more than the batch cut."""
    import random

    def world():
        rng = random.Random(seed)
        bm = BlockManager(600, 4)
        prefixes = [[rng.randrange(50) for _ in range(rng.choice((0, 4, 9, 16)))]
                    for _ in range(3)]
        seqs, live = [], []
        for i in range(rng.randrange(3, 40)):
            seq = make_seq(rng.choice(prefixes) + [rng.randrange(50)
                                                   for _ in range(rng.randrange(1, 12))])
            bm.hash_prompt(seq)
            if rng.random() < 0.15:            # never scheduled: holds no blocks
                seqs.append(seq)
                continue
            assert admit(bm, seq)
            seqs.append(seq)
        rng.shuffle(seqs)
        done = seqs[:rng.randrange(len(seqs) + 1)]
        return bm, done, [s for s in seqs if s not in done]

    bm1, done1, live1 = world()
    for s in done1:
        bm1.free_seq(s)
    bm2, done2, live2 = world()
    bm2.free_seqs(done2)
    assert list(bm2.free) == list(bm1.free)
    assert (bm2.ref == bm1.ref).all() and (bm2.table == bm1.table).all()
    assert (bm2.row_blocks == bm1.row_blocks).all()
    assert sorted(bm2._free_rows) == sorted(bm1._free_rows)
    assert all(s.block_table == [] and s.block_row == -1 and s.num_computed_tokens == 0
               for s in done2)
    bm2.check_invariants(live2)
