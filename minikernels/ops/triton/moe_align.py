"""MoE alignment (vLLM's ``moe_align_block_size``) in Triton: the T*k (token, slot) pairs
sorted by expert into block_size tiles for the grouped MoE GEMMs, with no host sync.

Algorithm. Pair p = t * k + j has the key e = topk_ids[t, j] (expert_map[e] when invalid
experts are ignored); a pair left out (an id outside [0, E), an expert off this rank) gets
the key E, which is counted in a bin of its own and never placed. Keys are read straight
from topk_ids with its strides, whenever needed (no copy).
  1. Histogram: counts[e] = pairs of expert e (``tl.histogram`` per CHUNK pairs).
  2. Layout: padded[e] = counts[e] rounded up to block_size; start = exclusive
     ``tl.cumsum`` of padded; num_tokens_post_pad = sum(padded). Block b's expert is the
     number of runs ending at or before b (a [blocks, experts] compare-sum); -1 past the
     used blocks. Every slot of sorted_token_ids first gets the sentinel n = T*k.
  3. Placement, PLACE pairs at a time in pair order, with base[e] = the slot of expert e's
     next pair: pair i of the step goes to base[key_i] (a ``tl.gather``) + its rank, the
     number of earlier pairs of the step with the same key (a [PLACE, SUB] compare-sum per
     SUB lanes); then base += the step's histogram. So each expert keeps increasing pair
     order (stable, deterministic).
Small n (decode): ``moe_align_single_kernel``, one program doing 1-3 in turn (a barrier
between the sentinel fill and the placement). Large n (prefill), four launches:
``moe_align_hist_kernel`` (one histogram row per CHUNK pairs), ``moe_align_scan_kernel``
(per expert: exclusive prefix over the rows in place, and the totals),
``moe_align_table_kernel`` (layout, expert_ids, sentinels, num_tokens_post_pad) and
``moe_align_place_kernel`` (one CHUNK each: base = start + its row's prefix). Both paths
give the same output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..reference import moe_align_length
from .registry import KernelSpec, register

SINGLE_PROGRAM_MAX_PAIRS = 4096   # n up to this: one program; above: the 4-launch path
CHUNK = 1024                      # pairs per histogram row / placement program
PLACE = 128                       # pairs per placement step
SUB = 32                          # lanes per step of the rank compare-sum
SCAN_ROWS = 32                    # histogram rows per step of the scan kernel
SCAN_EXPERTS = 32                 # experts per program of the scan kernel
TABLE_SLOTS = 4096                # sentinel slots per program of the table kernel


def experts_padded(num_experts: int) -> int:
    """Histogram bins: a power of 2 > E (bin E counts the pairs left out), at least 32."""
    return max(32, triton.next_power_of_2(num_experts + 1))


def blocks_per_step(e_pad: int) -> int:
    """Blocks per step of the expert_ids compare-sum (a [blocks, E_PAD] tile of 4096)."""
    return max(1, 4096 // e_pad)


def warps_for(e_pad: int) -> int:
    """Warps of the kernels holding [E_PAD] vectors: 8 from 1024 bins (no spills)."""
    return 4 if e_pad <= 512 else 8


# ------------------------------------------------------------------------ jit helpers

@triton.jit
def _expert_keys(ids_ptr, map_ptr, pairs, n, top_k, s_t, s_j, E,
                 MAP_KEYS: tl.constexpr):
    """The key of each pair (int32): its expert, or E for a pair that is not placed."""
    ok = pairs < n
    tok = pairs // top_k
    slot = pairs - tok * top_k
    e = tl.load(ids_ptr + tok.to(tl.int64) * s_t + slot.to(tl.int64) * s_j, mask=ok,
                other=0)
    ok = ok & (e >= 0) & (e < E)           # compared in the ids' own dtype (int64 safe)
    e = e.to(tl.int32)
    if MAP_KEYS:                           # expert_map[e]; -1 (not on this rank) dropped
        e = tl.load(map_ptr + e, mask=ok, other=-1)
        ok = ok & (e >= 0) & (e < E)
    return tl.where(ok, e, E)


@triton.jit
def _padded_layout(counts, block_size, E, E_PAD: tl.constexpr):
    """(start, end, padded) of each expert's run in sorted_token_ids, [E_PAD] int32."""
    experts = tl.arange(0, E_PAD)
    padded = tl.where(experts < E, (counts + block_size - 1) // block_size * block_size, 0)
    end = tl.cumsum(padded, 0)
    return end - padded, end, padded


@triton.jit
def _store_expert_ids(expert_ids_ptr, map_ptr, blocks, num_blocks, end_blk, used_blk,
                      MAP_IDS: tl.constexpr):
    """expert_ids[b] for the given blocks: the number of runs ending at or before b (so
    the expert whose run holds b), mapped through expert_map if asked; -1 past the end."""
    ex = tl.sum((end_blk[None, :] <= blocks[:, None]).to(tl.int32), axis=1)
    live = blocks < used_blk
    if MAP_IDS:
        ex = tl.load(map_ptr + ex, mask=live, other=-1)
    tl.store(expert_ids_ptr + blocks, tl.where(live, ex, -1), mask=blocks < num_blocks)


@triton.jit
def _place_pairs(sorted_ptr, ids_ptr, map_ptr, p0, base, n, top_k, s_t, s_j, E,
                 MAP_KEYS: tl.constexpr, PLACE: tl.constexpr, SUB: tl.constexpr,
                 E_PAD: tl.constexpr):
    """Write pairs p0 .. p0 + PLACE - 1 to their slots; base [E_PAD] is the slot of each
    expert's next pair. Returns base advanced past this step's pairs."""
    lanes = tl.arange(0, PLACE)
    keys = _expert_keys(ids_ptr, map_ptr, p0 + lanes, n, top_k, s_t, s_j, E, MAP_KEYS)
    rank = tl.zeros([PLACE], dtype=tl.int32)     # earlier pairs of the step, same expert
    for j0 in tl.static_range(0, PLACE, SUB):
        sub = j0 + tl.arange(0, SUB)
        keys_j = _expert_keys(ids_ptr, map_ptr, p0 + sub, n, top_k, s_t, s_j, E, MAP_KEYS)
        same = (keys_j[None, :] == keys[:, None]) & (sub[None, :] < lanes[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    tl.store(sorted_ptr + tl.gather(base, keys, 0) + rank, p0 + lanes, mask=keys < E)
    return base + tl.histogram(keys, E_PAD)


# -------------------------------------------------------------------------- kernels

@triton.jit
def moe_align_single_kernel(ids_ptr, map_ptr, sorted_ptr, expert_ids_ptr, post_pad_ptr,
                            n, top_k, s_t, s_j, E, block_size, max_padded, num_blocks,
                            CHUNK: tl.constexpr, PLACE: tl.constexpr, SUB: tl.constexpr,
                            E_PAD: tl.constexpr, BB: tl.constexpr,
                            MAP_KEYS: tl.constexpr, MAP_IDS: tl.constexpr):
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        keys = _expert_keys(ids_ptr, map_ptr, c0 + lanes, n, top_k, s_t, s_j, E, MAP_KEYS)
        counts += tl.histogram(keys, E_PAD)
    start, end, padded = _padded_layout(counts, block_size, E, E_PAD)
    total = tl.sum(padded, 0)
    tl.store(post_pad_ptr, total)
    end_blk = end // block_size
    for b0 in range(0, num_blocks, BB):
        _store_expert_ids(expert_ids_ptr, map_ptr, b0 + tl.arange(0, BB), num_blocks,
                          end_blk, total // block_size, MAP_IDS)
    for s0 in range(0, max_padded, CHUNK):
        tl.store(sorted_ptr + s0 + lanes, tl.full([CHUNK], 0, tl.int32) + n,
                 mask=s0 + lanes < max_padded)
    tl.debug_barrier()       # every sentinel store lands before any pair is placed
    base = start
    for p0 in range(0, n, PLACE):
        base = _place_pairs(sorted_ptr, ids_ptr, map_ptr, p0, base, n, top_k, s_t, s_j, E,
                            MAP_KEYS, PLACE, SUB, E_PAD)


@triton.jit
def moe_align_hist_kernel(ids_ptr, map_ptr, hist_ptr, n, top_k, s_t, s_j, E,
                          CHUNK: tl.constexpr, E_PAD: tl.constexpr,
                          MAP_KEYS: tl.constexpr):
    c = tl.program_id(0)
    pairs = c * CHUNK + tl.arange(0, CHUNK)
    keys = _expert_keys(ids_ptr, map_ptr, pairs, n, top_k, s_t, s_j, E, MAP_KEYS)
    tl.store(hist_ptr + c.to(tl.int64) * E_PAD + tl.arange(0, E_PAD),
             tl.histogram(keys, E_PAD))


@triton.jit
def moe_align_scan_kernel(hist_ptr, totals_ptr, num_chunks,
                          E_PAD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """hist [chunks, E_PAD] -> in place, the pairs of each expert in the earlier chunks;
    totals[e] = all pairs of expert e. One program per COLS experts."""
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    running = tl.zeros([COLS], dtype=tl.int32)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ptrs = hist_ptr + rows[:, None].to(tl.int64) * E_PAD + cols[None, :]
        ok = rows[:, None] < num_chunks
        tile = tl.load(ptrs, mask=ok, other=0)
        tl.store(ptrs, running[None, :] + tl.cumsum(tile, 0) - tile, mask=ok)
        running += tl.sum(tile, 0)
    tl.store(totals_ptr + cols, running)


@triton.jit
def moe_align_table_kernel(totals_ptr, map_ptr, sorted_ptr, expert_ids_ptr, post_pad_ptr,
                           n, E, block_size, max_padded, num_blocks,
                           E_PAD: tl.constexpr, BB: tl.constexpr, SLOTS: tl.constexpr,
                           MAP_IDS: tl.constexpr):
    """Program i: expert_ids of blocks [i * BB, (i + 1) * BB), sentinels in slots
    [i * SLOTS, (i + 1) * SLOTS); program 0 also num_tokens_post_pad."""
    pid = tl.program_id(0)
    counts = tl.load(totals_ptr + tl.arange(0, E_PAD))
    _, end, padded = _padded_layout(counts, block_size, E, E_PAD)
    total = tl.sum(padded, 0)
    if pid == 0:
        tl.store(post_pad_ptr, total)
    _store_expert_ids(expert_ids_ptr, map_ptr, pid * BB + tl.arange(0, BB), num_blocks,
                      end // block_size, total // block_size, MAP_IDS)
    slots = pid * SLOTS + tl.arange(0, SLOTS)
    tl.store(sorted_ptr + slots, tl.full([SLOTS], 0, tl.int32) + n, mask=slots < max_padded)


@triton.jit
def moe_align_place_kernel(ids_ptr, map_ptr, hist_ptr, totals_ptr, sorted_ptr,
                           n, top_k, s_t, s_j, E, block_size,
                           CHUNK: tl.constexpr, PLACE: tl.constexpr, SUB: tl.constexpr,
                           E_PAD: tl.constexpr, MAP_KEYS: tl.constexpr):
    """Program c places pairs [c * CHUNK, (c + 1) * CHUNK): after the table kernel."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    start, _, _ = _padded_layout(tl.load(totals_ptr + experts), block_size, E, E_PAD)
    base = start + tl.load(hist_ptr + c.to(tl.int64) * E_PAD + experts)
    for p0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, n), PLACE):
        base = _place_pairs(sorted_ptr, ids_ptr, map_ptr, p0, base, n, top_k, s_t, s_j, E,
                            MAP_KEYS, PLACE, SUB, E_PAD)


# --------------------------------------------------------------------------- launcher

def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                         expert_map: torch.Tensor | None = None, pad_sorted_ids: bool = False,
                         ignore_invalid_experts: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See minikernels.ops.moe_align_block_size (inputs checked there). topk_ids int32 /
    int64 [T, k], any strides; expert_map int32 [E] contiguous, or None. Returns
    (sorted_token_ids int32 [S], expert_ids int32 [ceil(S / block_size)],
    num_tokens_post_pad int32 [1]), S = reference.moe_align_length(...)."""
    t, top_k = topk_ids.shape
    n = t * top_k
    dev = topk_ids.device
    size = moe_align_length(n, num_experts, block_size, pad_sorted_ids)
    num_blocks = -(-size // block_size)
    sorted_ids = _alloc.empty((size,), torch.int32, dev)
    expert_ids = _alloc.empty((num_blocks,), torch.int32, dev)
    post_pad = _alloc.empty((1,), torch.int32, dev)
    has_map = expert_map is not None
    flags = {"MAP_KEYS": has_map and ignore_invalid_experts}
    map_ids = has_map and not ignore_invalid_experts
    map_arg = expert_map if has_map else post_pad       # a placeholder pointer, never read
    e_pad = experts_padded(num_experts)
    bb = blocks_per_step(e_pad)
    warps = warps_for(e_pad)
    s_t, s_j = topk_ids.stride()
    keys = (topk_ids, map_arg)
    shape = (n, top_k, s_t, s_j, num_experts)
    if n <= SINGLE_PROGRAM_MAX_PAIRS:
        moe_align_single_kernel[(1,)](
            *keys, sorted_ids, expert_ids, post_pad, *shape, block_size, size, num_blocks,
            CHUNK=CHUNK, PLACE=PLACE, SUB=SUB, E_PAD=e_pad, BB=bb, MAP_IDS=map_ids, **flags,
            num_warps=warps)
        return sorted_ids, expert_ids, post_pad
    num_chunks = -(-n // CHUNK)
    hist = torch.empty((num_chunks, e_pad), dtype=torch.int32, device=dev)
    totals = torch.empty((e_pad,), dtype=torch.int32, device=dev)
    moe_align_hist_kernel[(num_chunks,)](*keys, hist, *shape, CHUNK=CHUNK, E_PAD=e_pad,
                                         **flags, num_warps=warps)
    moe_align_scan_kernel[(e_pad // SCAN_EXPERTS,)](
        hist, totals, num_chunks, E_PAD=e_pad, ROWS=SCAN_ROWS, COLS=SCAN_EXPERTS,
        num_warps=4)
    grid = max(triton.cdiv(num_blocks, bb), triton.cdiv(size, TABLE_SLOTS), 1)
    moe_align_table_kernel[(grid,)](
        totals, map_arg, sorted_ids, expert_ids, post_pad, n, num_experts, block_size, size,
        num_blocks, E_PAD=e_pad, BB=bb, SLOTS=TABLE_SLOTS, MAP_IDS=map_ids, num_warps=warps)
    moe_align_place_kernel[(num_chunks,)](
        *keys, hist, totals, sorted_ids, *shape, block_size, CHUNK=CHUNK, PLACE=PLACE,
        SUB=SUB, E_PAD=e_pad, **flags, num_warps=warps)
    return sorted_ids, expert_ids, post_pad


# --------------------------------------------------------------------------- registry
# Per kernel, ids dtype (the kernels that read topk_ids) and histogram size: E_PAD 256
# (E < 256: Qwen3-MoE's 128, OLMoE's 64) and 2048 (E up to 1024, the op's limit: the largest tiles;
# compiled with the expert_map variants, whose extra gathers cost registers).
_IDS_ARGS = {"n": "i32", "top_k": "i32", "s_t": "i32", "s_j": "i32", "E": "i32"}
_STEPS = {"CHUNK": CHUNK, "PLACE": PLACE, "SUB": SUB}


def _spec(name: str, fn, args: dict[str, str], constexprs: dict, warps: int) -> None:
    register(KernelSpec(name=name, fn=fn,
                        signature={**args, **{c: "constexpr" for c in constexprs}},
                        constexprs=constexprs, num_warps=warps, num_stages=1))


for _e_pad in (256, 2048):
    _big = _e_pad == 2048
    for _ids in ("i32", "i64"):
        _tag = f"ids={_ids},E_PAD={_e_pad}" + (",expert_map" if _big else "")
        _keys = {"ids_ptr": f"*{_ids}", "map_ptr": "*i32"}
        _spec(f"moe_align_single[{_tag}]", moe_align_single_kernel,
              {**_keys, "sorted_ptr": "*i32", "expert_ids_ptr": "*i32",
               "post_pad_ptr": "*i32", **_IDS_ARGS, "block_size": "i32",
               "max_padded": "i32", "num_blocks": "i32"},
              {**_STEPS, "E_PAD": _e_pad, "BB": blocks_per_step(_e_pad), "MAP_KEYS": _big,
               "MAP_IDS": False}, warps_for(_e_pad))
        _spec(f"moe_align_hist[{_tag}]", moe_align_hist_kernel,
              {**_keys, "hist_ptr": "*i32", **_IDS_ARGS},
              {"CHUNK": CHUNK, "E_PAD": _e_pad, "MAP_KEYS": _big}, warps_for(_e_pad))
        _spec(f"moe_align_place[{_tag}]", moe_align_place_kernel,
              {**_keys, "hist_ptr": "*i32", "totals_ptr": "*i32", "sorted_ptr": "*i32",
               **_IDS_ARGS, "block_size": "i32"},
              {**_STEPS, "E_PAD": _e_pad, "MAP_KEYS": _big}, warps_for(_e_pad))
    _spec(f"moe_align_scan[E_PAD={_e_pad}]", moe_align_scan_kernel,
          {"hist_ptr": "*i32", "totals_ptr": "*i32", "num_chunks": "i32"},
          {"E_PAD": _e_pad, "ROWS": SCAN_ROWS, "COLS": SCAN_EXPERTS}, 4)
    _spec(f"moe_align_table[E_PAD={_e_pad}" + (",expert_map]" if _big else "]"),
          moe_align_table_kernel,
          {"totals_ptr": "*i32", "map_ptr": "*i32", "sorted_ptr": "*i32",
           "expert_ids_ptr": "*i32", "post_pad_ptr": "*i32", "n": "i32", "E": "i32",
           "block_size": "i32", "max_padded": "i32", "num_blocks": "i32"},
          {"E_PAD": _e_pad, "BB": blocks_per_step(_e_pad), "SLOTS": TABLE_SLOTS,
           "MAP_IDS": _big}, warps_for(_e_pad))
