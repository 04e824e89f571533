"""moe_align_block_size (vLLM's MoE alignment): the Triton kernels (one-program and
multi-program paths) against the reference, and both against an independent per-pair loop,
over random shapes, id dtypes, strided topk_ids views, block sizes, expert maps and
pad_sorted_ids; vLLM's documented example; sizes; dropped ids; errors; opcheck."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import _alloc, reference
from minikernels.ops.triton import moe_align

PATHS = ["single", "multi"]


@contextlib.contextmanager
def _path(name: str) -> Iterator[None]:
    """Force the one-program path, or the multi-program one with small chunks (several
    histogram rows, scan steps and placement steps even for a few hundred pairs)."""
    if name == "single":
        yield
        return
    with mock.patch.multiple(moe_align, SINGLE_PROGRAM_MAX_PAIRS=-1, CHUNK=64, PLACE=32,
                             SUB=16, SCAN_ROWS=4, TABLE_SLOTS=64):
        yield


def _by_hand(ids: torch.Tensor, block_size: int, num_experts: int,
             expert_map: torch.Tensor | None, pad_sorted_ids: bool,
             ignore_invalid_experts: bool) -> tuple[list[int], list[int], int]:
    """Independent spec: one pair at a time into per-expert lists, then laid out."""
    flat = [int(v) for v in ids.reshape(-1).tolist()]
    emap = None if expert_map is None else [int(v) for v in expert_map.tolist()]
    n = len(flat)
    runs: dict[int, list[int]] = {}
    for p, e in enumerate(flat):
        if not 0 <= e < num_experts:
            continue                                   # only with index checks off
        key = e
        if emap is not None and ignore_invalid_experts:
            key = emap[e]
            if key == -1:
                continue
        runs.setdefault(key, []).append(p)
    out: list[int] = []
    experts: list[int] = []
    for key in sorted(runs):
        blocks = -(-len(runs[key]) // block_size)
        out += runs[key] + [n] * (blocks * block_size - len(runs[key]))
        label = emap[key] if emap is not None and not ignore_invalid_experts else key
        experts += [label] * blocks
    used = len(out)
    size = n + num_experts * (block_size - 1)
    if pad_sorted_ids:
        size = -(-size // block_size) * block_size
    size = min(size, n * block_size)
    out += [n] * (size - used)
    experts += [-1] * (-(-size // block_size) - len(experts))
    return out, experts, used


def _assert_matches(got, want) -> None:
    names = ("sorted_token_ids", "expert_ids", "num_tokens_post_pad")
    for g, w, name in zip(got, want, names):
        assert g.dtype == torch.int32, name
        assert g.shape == w.shape and torch.equal(g.cpu(), w.cpu()), \
            f"{name}: got {g.tolist()[:64]} want {w.tolist()[:64]}"


def _as_tensors(hand, device) -> tuple[torch.Tensor, ...]:
    out, experts, used = hand
    return tuple(torch.tensor(v, dtype=torch.int32, device=device)
                 for v in (out, experts, [used]))


def _topk_view(ids: torch.Tensor, kind: str) -> torch.Tensor:
    """ids' values in a view with strides of its own."""
    t, k = ids.shape
    if kind == "columns":                      # a column slice of a wider tensor
        big = torch.zeros(t, k + 3, dtype=ids.dtype, device=ids.device)
        big[:, 2:2 + k] = ids
        return big[:, 2:2 + k]
    if kind == "transposed":                   # [k, T] storage seen as [T, k]
        return ids.t().contiguous().t()
    if kind == "rows":                         # every other row
        big = torch.zeros(2 * t, k, dtype=ids.dtype, device=ids.device)
        big[::2] = ids
        return big[::2]
    return ids


def _expert_map(num_experts: int, g: torch.Generator, device) -> torch.Tensor:
    """About half the experts on this rank, in a shuffled local order."""
    local = torch.randperm(num_experts, generator=g)[:max(1, num_experts // 2)]
    emap = torch.full((num_experts,), -1, dtype=torch.int32)
    emap[local] = torch.randperm(local.numel(), generator=g).to(torch.int32)
    return emap.to(device)


@st.composite
def _cases(draw, max_t: int = 300, max_e: int = 300):
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    t = draw(st.integers(0, max_t))
    k = draw(st.integers(1, 8))
    e = draw(st.integers(1, max_e))
    skew = draw(st.booleans())              # most pairs on a few experts (long runs)
    hi = min(e, 3) if skew else e
    ids = torch.randint(0, hi, (t, k), generator=g)
    return {"ids": ids.to(draw(st.sampled_from([torch.int32, torch.int64]))),
            "block_size": draw(st.sampled_from([1, 16, 64, 128, 24])), "num_experts": e,
            "expert_map": _expert_map(e, g, "cpu") if draw(st.booleans()) else None,
            "pad_sorted_ids": draw(st.booleans()),
            "ignore_invalid_experts": draw(st.booleans()),
            "view": draw(st.sampled_from(["contiguous", "columns", "transposed", "rows"]))}


@settings(max_examples=examples(60), deadline=None)
@given(case=_cases())
def test_reference_matches_by_hand(case):
    view = case.pop("view")
    ids = _topk_view(case.pop("ids"), view)
    args = (case["block_size"], case["num_experts"], case["expert_map"],
            case["pad_sorted_ids"], case["ignore_invalid_experts"])
    _assert_matches(reference.moe_align_block_size(ids, *args),
                    _as_tensors(_by_hand(ids, *args), "cpu"))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=examples(8), deadline=None)
@given(case=_cases())
def test_triton_matches_reference(path, device, case):
    assert _alloc.poison_enabled()            # outputs start poisoned: all must be written
    view = case.pop("view")
    ids = _topk_view(case.pop("ids").to(device), view)
    emap = case["expert_map"]
    args = (case["block_size"], case["num_experts"],
            None if emap is None else emap.to(device), case["pad_sorted_ids"],
            case["ignore_invalid_experts"])
    with mk.use_backend("triton"), _path(path):
        got = mk.ops.moe_align_block_size(ids, *args)
    _assert_matches(got, reference.moe_align_block_size(ids, *args))
    _assert_matches(got, _as_tensors(_by_hand(ids.cpu(), *args[:2],
                                              None if emap is None else emap.cpu(),
                                              *args[3:]), device))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_experts", [256, 1024])
def test_many_experts(path, num_experts, device):
    """Histograms of 512 and 2048 bins (E = 1024: the largest tiles, 8 warps)."""
    g = torch.Generator().manual_seed(num_experts)
    ids = torch.randint(0, num_experts, (40, 8), generator=g).to(device)
    emap = _expert_map(num_experts, g, device)
    for args in ((16, num_experts, None, False, False), (64, num_experts, emap, True, False),
                 (32, num_experts, emap, False, True)):
        with mk.use_backend("triton"), _path(path):
            got = mk.ops.moe_align_block_size(ids, *args)
        _assert_matches(got, reference.moe_align_block_size(ids, *args))


def test_prefill_sized_dispatch(device):
    """Past SINGLE_PROGRAM_MAX_PAIRS the launcher takes the multi-program path with the
    registered chunk sizes (several full CHUNK rows and a ragged last one)."""
    ids = torch.randint(0, 128, (700, 8), generator=torch.Generator().manual_seed(7))
    ids = ids.to(device)
    assert ids.numel() > moe_align.SINGLE_PROGRAM_MAX_PAIRS
    with mk.use_backend("triton"):
        got = mk.ops.moe_align_block_size(ids, 64, 128)
    _assert_matches(got, reference.moe_align_block_size(ids, 64, 128))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_vllm_docstring_example(backend, device):
    """vLLM's documented example (experts 1..4, so E = 5 here), block_size 4."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], device=device)
    with mk.use_backend(backend):
        sorted_ids, expert_ids, post_pad = mk.ops.moe_align_block_size(ids, 4, 5)
    assert sorted_ids.tolist()[:16] == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert sorted_ids.shape == (12 + 5 * 3,) and set(sorted_ids.tolist()[16:]) == {12}
    assert expert_ids.tolist() == [1, 2, 3, 4] + [-1] * 3
    assert post_pad.tolist() == [16]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sizes_follow_vllm(backend, device):
    """len = n + E * (bs - 1) (rounded up to bs with pad_sorted_ids), at most n * bs;
    expert_ids has ceil(len / bs) entries. T = 0 gives empty outputs and 0 used."""
    cases = [((0, 4), 8, 16, False, 0), ((3, 2), 8, 16, False, 6 * 16),
             ((30, 8), 8, 16, False, 240 + 8 * 15), ((30, 8), 7, 16, True, 352),
             ((5, 1), 3, 1, True, 5), ((0, 0), 2, 4, True, 0)]
    for shape, e, bs, pad, size in cases:
        ids = torch.zeros(shape, dtype=torch.int32, device=device)
        with mk.use_backend(backend):
            sorted_ids, expert_ids, post_pad = mk.ops.moe_align_block_size(ids, bs, e,
                                                                           pad_sorted_ids=pad)
        n = shape[0] * shape[1]
        assert sorted_ids.shape == (size,) and expert_ids.shape == (-(-size // bs),)
        assert post_pad.tolist() == [-(-n // bs) * bs]


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_ids_are_left_out(path, device):
    """With index checks off (as under CUDA graphs) ids outside [0, E) are never placed,
    and nothing is written out of bounds."""
    ids = torch.tensor([[0, 5], [-1, 2], [2, 99], [4, 0]], device=device)
    from minikernels._validation import index_checks
    with index_checks(False), mk.use_backend("triton"), _path(path):
        got = mk.ops.moe_align_block_size(ids, 4, 5)
    want = reference.moe_align_block_size(ids, 4, 5)
    _assert_matches(got, want)
    assert sorted(v for v in got[0].tolist() if v < 8) == [0, 3, 4, 6, 7]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_expert_map_modes(backend, device):
    """By default pairs are grouped by global expert and off-rank blocks read -1; with
    ignore_invalid_experts off-rank pairs are left out and blocks hold local ids."""
    ids = torch.tensor([[0, 1], [2, 3], [1, 0]], device=device)
    emap = torch.tensor([-1, 1, 0, -1], dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        sorted_ids, expert_ids, post_pad = mk.ops.moe_align_block_size(ids, 2, 4, emap)
        assert sorted_ids.tolist()[:8] == [0, 5, 1, 4, 2, 6, 3, 6]
        assert expert_ids.tolist()[:4] == [-1, 1, 0, -1] and post_pad.tolist() == [8]
        sorted_ids, expert_ids, post_pad = mk.ops.moe_align_block_size(
            ids, 2, 4, emap.long(), ignore_invalid_experts=True)
        assert sorted_ids.tolist()[:4] == [2, 6, 1, 4] and post_pad.tolist() == [4]
        assert expert_ids.tolist()[:2] == [0, 1] and set(expert_ids.tolist()[2:]) == {-1}


def test_fused_moe_sort_uses_the_alignment(device):
    """sort_pairs_by_expert (the fused MoE kernels' sort) = the op with pad_sorted_ids."""
    from minikernels.ops.triton.moe import sort_pairs_by_expert
    ids = torch.randint(0, 6, (9, 2), generator=torch.Generator().manual_seed(3)).to(device)
    sorted_ids, block_expert = sort_pairs_by_expert(ids, 6, 16)
    want = reference.moe_align_block_size(ids, 16, 6, pad_sorted_ids=True)
    assert torch.equal(sorted_ids, want[0]) and torch.equal(block_expert, want[1])
    assert block_expert.shape == (7,) and sorted_ids.shape == (7 * 16,)   # ceil(108 / 16)


def test_errors(device):
    ids = torch.zeros(3, 2, dtype=torch.int32, device=device)
    f = mk.ops.moe_align_block_size
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        f(ids.float(), 16, 4)
    with pytest.raises(ValueError, match="topk_ids must be 2-D"):
        f(ids[0], 16, 4)
    with pytest.raises(ValueError, match=r"topk_ids values must be in \[0, 4\)"):
        f(ids + 4, 16, 4)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        f(ids, 0, 4)
    with pytest.raises(TypeError, match="block_size must be an int"):
        f(ids, 16.0, 4)
    with pytest.raises(TypeError, match="block_size must be an int"):
        f(ids, True, 4)
    with pytest.raises(ValueError, match="num_experts must be >= 1 and <= 1024"):
        f(ids, 16, 0)
    with pytest.raises(ValueError, match="num_experts must be >= 1 and <= 1024"):
        f(ids, 16, 1025)
    with pytest.raises(TypeError, match="pad_sorted_ids must be a bool"):
        f(ids, 16, 4, pad_sorted_ids=1)
    with pytest.raises(ValueError, match="overflow int32"):
        f(ids, 2**30, 4)
    emap = torch.tensor([0, -1, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"expert_map must have shape \[num_experts = 4\]"):
        f(ids, 16, 4, emap[:3])
    with pytest.raises(TypeError, match="expert_map must have dtype"):
        f(ids, 16, 4, emap.float())
    with pytest.raises(ValueError, match=r"expert_map values must be in \[-1, 4\)"):
        f(ids, 16, 4, emap - 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, device):
    ids = torch.tensor([[1, 3], [0, 0], [2, 1]], device=device)
    emap = torch.tensor([1, -1, 0, 2], dtype=torch.int32, device=device)
    op = torch.ops.minikernels.moe_align_block_size
    with mk.use_backend(backend):
        torch.library.opcheck(op, (ids, 4, 4, None, False, False))
        torch.library.opcheck(op, (ids.int(), 16, 4, emap, True, False))
        torch.library.opcheck(op, (ids, 2, 4, emap, False, True))
        torch.library.opcheck(op, (ids[:0], 16, 4, None, True, False))
