"""vLLM's block-level cache utilities (minikernels.compat.vllm_ops: swap_blocks, copy_blocks,
copy_blocks_mla, concat_and_cache_mla, cp_gather_cache, gather_and_maybe_dequant_cache)
against per-row loops in the shape of vLLM's tests/kernels/attention/test_cache.py, with
uint8 / float8 caches, both call forms where vLLM has two, strided caches, and errors."""
from __future__ import annotations

import random

import pytest
import torch

from minikernels.compat import vllm_ops as ops

FMTS = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _cache(shape, kv_cache_dtype, dtype, device, seed=0):
    """Random contents: fp8 caches as uint8 bytes of fp8 values (vLLM's storage)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(*shape, generator=g)
    if kv_cache_dtype == "auto":
        return vals.to(dtype).to(device)
    return vals.to(FMTS[kv_cache_dtype]).view(torch.uint8).to(device)


@pytest.mark.parametrize("form", ["3-arg", "4-arg"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("layout", ["flash", "mla"])
def test_swap_blocks(device, form, kv_cache_dtype, layout):
    random.seed(0)
    nb = 12
    shape = (nb, 4, 2, 8) if layout == "flash" else (nb, 4, 24)
    src = _cache(shape, kv_cache_dtype, torch.bfloat16, device, seed=1)
    dst = _cache(shape, kv_cache_dtype, torch.bfloat16, "cpu", seed=2)   # offload: to host
    src_ids = random.sample(range(nb), 5)
    dst_ids = random.sample(range(nb), 5)
    mapping = torch.tensor(list(zip(src_ids, dst_ids)), dtype=torch.int64)
    before = dst.clone()
    if form == "3-arg":
        ops.swap_blocks(src, dst, mapping)
    else:
        ops.swap_blocks(src, dst, src.element_size() * src.stride(0), mapping)
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(dst[d], src[s].cpu())
    untouched = sorted(set(range(nb)) - set(dst_ids))
    assert torch.equal(dst[untouched], before[untouched])
    back = torch.zeros_like(src)                                            # and back
    ops.swap_blocks(dst, back, mapping[:, [1, 0]].contiguous())
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(back[s], src[s])


def test_copy_blocks_one_source_to_two_destinations(device):
    """vLLM's test: each source block copied to two destinations, every layer; a
    destination never reads a block another copy of the same call wrote."""
    random.seed(3)
    nb, layers = 16, 2
    srcs = random.sample(range(nb), 4)
    dsts = random.sample(sorted(set(range(nb)) - set(srcs)), 8)
    pairs = [(s, dsts[2 * i + k]) for i, s in enumerate(srcs) for k in range(2)]
    mapping = torch.tensor(pairs, dtype=torch.int64, device=device)
    x = 16 // 2
    keys = [_cache((nb, 2, 8 // x, 4, x), "auto", torch.float16, device, seed=i)
            for i in range(layers)]                                   # vLLM's legacy layout
    values = [_cache((nb, 2, 8, 4), "auto", torch.float16, device, seed=9 + i)
              for i in range(layers)]
    want = [c.clone() for c in keys + values]
    for c in want:
        for s, d in pairs:
            c[d] = c[s]
    ops.copy_blocks(keys, values, mapping)
    for got, exp in zip(keys + values, want):
        assert torch.equal(got, exp)
    # MLA: one latent cache per layer, fp8 bytes
    mla = [_cache((nb, 4, 24), "fp8", None, device, seed=20 + i) for i in range(layers)]
    want = [c.clone() for c in mla]
    for c in want:
        for s, d in pairs:
            c[d] = c[s]
    ops.copy_blocks_mla(mla, mapping)
    assert all(torch.equal(a, b) for a, b in zip(mla, want))
    # a chain (a destination that is also a source) reads the blocks as they were
    chain = [_cache((4, 3), "auto", torch.float32, device)]
    old = chain[0].clone()
    ops.copy_blocks_mla(chain, torch.tensor([[0, 1], [1, 2]], device=device))
    assert torch.equal(chain[0][1], old[0]) and torch.equal(chain[0][2], old[1])


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("uint8", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_concat_and_cache_mla(device, kv_cache_dtype, uint8, dtype):
    random.seed(4)
    rank, rope, tokens, bs, nb = 32, 8, 9, 4, 5
    g = torch.Generator().manual_seed(5)
    kv_c = torch.randn(tokens + 2, rank, generator=g).to(dtype).to(device)  # + padding
    k_pe = torch.randn(tokens + 2, rope, generator=g).to(dtype).to(device)
    slots = random.sample(range(nb * bs), tokens)
    slots[3] = -1
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    scale = torch.tensor(0.1, dtype=torch.float32, device=device)
    fp8 = kv_cache_dtype != "auto"
    cache_dtype = (torch.uint8 if uint8 else FMTS[kv_cache_dtype]) if fp8 else dtype
    kv_cache = torch.zeros(nb, bs, rank + rope, dtype=cache_dtype, device=device)
    want = kv_cache.clone()
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        row = torch.cat([kv_c[t], k_pe[t]])
        if fp8:
            fmt = FMTS[kv_cache_dtype]
            top = torch.finfo(fmt).max
            row = (row.float() / 0.1).clamp(-top, top).to(fmt)
            row = row.view(torch.uint8) if uint8 else row
        want[slot // bs, slot % bs] = row
    ops.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)
    assert torch.equal(kv_cache.view(torch.uint8) if fp8 else kv_cache,
                       want.view(torch.uint8) if fp8 else want)


def test_concat_and_cache_mla_strided_cache(device):
    """A cache view with its own strides (every other block of a bigger buffer)."""
    buf = torch.zeros(10, 2, 6, device=device)
    cache = buf[::2]
    kv_c, k_pe = torch.ones(2, 4, device=device), torch.full((2, 2), 2.0, device=device)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, torch.tensor([3, 8], device=device), "auto",
                             torch.tensor(1.0, device=device))
    assert torch.equal(buf[2, 1], torch.tensor([1, 1, 1, 1, 2, 2.0], device=device))
    assert torch.equal(buf[8, 0], buf[2, 1]) and buf.sum() == 2 * 8


def _gather_case(device, kv_cache_dtype, batch=4, bs=4, nb=12, entry=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = _cache((nb, bs, entry), kv_cache_dtype, torch.float32, device, seed=seed)
    lens = torch.randint(0, 3 * bs + 1, (batch,), generator=g)
    lens[1] = 0                                                   # an empty sequence
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    table = torch.stack([torch.randperm(nb, generator=g) for _ in range(batch)]).int()
    rows = []
    for b in range(batch):
        for i in range(int(lens[b])):
            rows.append(src[int(table[b, i // bs]), i % bs].cpu())
    want = torch.stack(rows) if rows else torch.zeros(0, entry, dtype=src.dtype)
    return src, cu.to(device), table.to(device), lens, want


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cp_gather_cache(device, kv_cache_dtype):
    src, cu, table, lens, want = _gather_case(device, kv_cache_dtype)
    dst = torch.zeros(int(lens.sum()) + 3, 6, dtype=src.dtype, device=device)
    ops.cp_gather_cache(src, dst, table, cu, 4)
    assert torch.equal(dst[:want.shape[0]].cpu(), want)
    assert (dst[want.shape[0]:] == 0).all()                       # past the tokens: untouched


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("form", ["token_to_seq", "batch_size"])
def test_gather_and_maybe_dequant_cache(device, kv_cache_dtype, form):
    src, cu, table, lens, want = _gather_case(device, kv_cache_dtype, seed=2)
    scale = torch.tensor(0.25, device=device)
    if kv_cache_dtype != "auto":
        want = want.view(FMTS[kv_cache_dtype]).float() * 0.25
    total = int(lens.sum())
    dst = torch.zeros(total, 6, device=device)
    if form == "token_to_seq":
        token_to_seq = torch.repeat_interleave(torch.arange(4, dtype=torch.int32),
                                               lens).to(device)
        ops.gather_and_maybe_dequant_cache(src, dst, table, cu, token_to_seq,
                                           torch.tensor(total), kv_cache_dtype, scale, None)
    else:
        ops.gather_and_maybe_dequant_cache(src, dst, table, cu, 4, kv_cache_dtype, scale)
    assert torch.equal(dst.cpu(), want)


def test_gather_seq_starts_skip_whole_blocks(device):
    src, cu, table, lens, _ = _gather_case(device, "auto", seed=5)
    starts = torch.tensor([4, 0, 9, 2], device=device)           # 9 // 4 = 2 blocks in
    dst = torch.zeros(int(lens.sum()), 6, device=device)
    ops.cp_gather_cache(src, dst, table, cu, 4, starts)
    at = 0
    for b in range(4):
        skip = int(starts[b]) // 4
        for i in range(int(lens[b])):
            blk = int(table[b, skip + i // 4])
            assert torch.equal(dst[at], src[blk, i % 4])
            at += 1


@pytest.mark.parametrize("call,name", [
    (lambda d: ops.swap_blocks(torch.zeros(4, 2), torch.zeros(4, 3),
                               torch.tensor([[0, 1]])), "dst"),
    (lambda d: ops.swap_blocks(torch.zeros(4, 2), torch.zeros(4, 2),
                               torch.tensor([[0, 4]])), "block_mapping"),
    (lambda d: ops.swap_blocks(torch.zeros(4, 2), torch.zeros(4, 2), 7,
                               torch.tensor([[0, 1]])), "block_size_in_bytes"),
    (lambda d: ops.swap_blocks(torch.zeros(4, 2), torch.zeros(4, 2),
                               torch.tensor([[0, 1]], dtype=torch.int32)), "block_mapping"),
    (lambda d: ops.copy_blocks([torch.zeros(4, 2)], [], torch.tensor([[0, 1]])),
     "key_caches and value_caches"),
    (lambda d: ops.copy_blocks_mla([torch.zeros(4, 2), torch.zeros(5, 2)],
                                   torch.tensor([[0, 1]])), r"kv_caches\[1\]"),
    (lambda d: ops.concat_and_cache_mla(torch.zeros(2, 4), torch.zeros(2, 2),
                                        torch.zeros(3, 2, 6, dtype=torch.uint8),
                                        torch.tensor([0, 1]), "fp8_ds_mla",
                                        torch.tensor(1.0)), "kv_cache_dtype"),
    (lambda d: ops.concat_and_cache_mla(torch.zeros(2, 4), torch.zeros(2, 2),
                                        torch.zeros(3, 2, 7), torch.tensor([0, 1]), "auto",
                                        torch.tensor(1.0)), "kv_cache"),
    (lambda d: ops.concat_and_cache_mla(torch.zeros(2, 4), torch.zeros(2, 2),
                                        torch.zeros(3, 2, 6, dtype=torch.uint8),
                                        torch.tensor([0, 6]), "fp8",
                                        torch.tensor(1.0)), "slot_mapping"),
    (lambda d: ops.concat_and_cache_mla(torch.zeros(2, 4), torch.zeros(2, 2),
                                        torch.zeros(3, 2, 6, dtype=torch.uint8),
                                        torch.tensor([0, 1]), "fp8",
                                        torch.tensor([1.0, 2.0])), "scale"),
    (lambda d: ops.cp_gather_cache(torch.zeros(3, 2, 4), torch.zeros(9, 4),
                                   torch.tensor([[0, 5]], dtype=torch.int32),
                                   torch.tensor([0, 3], dtype=torch.int32), 1),
     "block_table"),
    (lambda d: ops.cp_gather_cache(torch.zeros(3, 2, 4), torch.zeros(1, 4),
                                   torch.tensor([[0, 1]], dtype=torch.int32),
                                   torch.tensor([0, 3], dtype=torch.int32), 1), "dst"),
    (lambda d: ops.gather_and_maybe_dequant_cache(
        torch.zeros(3, 2, 4, dtype=torch.uint8), torch.zeros(3, 4),
        torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
        torch.zeros(3, dtype=torch.int32), 2, "fp8", torch.tensor(1.0)), "num_tokens"),
])
def test_bad_input_names_the_argument(device, call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(device)
