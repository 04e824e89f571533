"""paged_decode_attention: kernels against the reference, split-KV, batch invariance, errors.

Block tables are shuffled (pages scattered over the pool, not in order), seq_lens start at 1
and are rarely multiples of the block size. On the CPU the Triton kernel runs in the
interpreter, so shapes stay small.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_backends, requires_cuda
from helpers import assert_close, spy_launches
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import kv_cache, reference

# (Hq, Hkv, D): GQA ratios 1, 4, 8 and 7 (Qwen2.5); head dims 64, 128, 256, Gemma 4's 512
# (full-attention layers), and 59 (any d <= 512: unaligned rows, the Triton kernel runs
# without vector hints)
HEADS = [(2, 2, 64), (8, 2, 128), (8, 1, 256), (7, 1, 64), (4, 2, 59), (8, 2, 512)]


def make_case(lens, hq, hkv, d, block_size=16, dtype=torch.float16, device="cpu",
              extra_blocks=3, table_width=None, seed=0):
    """Random q and caches; block tables are random disjoint pages of a shuffled pool."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    width = table_width or max(1, max(need))
    num_blocks = sum(need) + extra_blocks
    pool = torch.randperm(num_blocks, generator=g)
    table = torch.randint(0, num_blocks, (len(lens), width), generator=g, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = pool[at:at + n].int()
        at += n
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    kc = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q, kc, vc, table, sl)]


def run(backend, q, kc, vc, bt, sl, **kw):
    with mk.use_backend(backend):
        return mk.ops.paged_decode_attention(q, kc, vc, bt, sl, **kw)


def ref(q, kc, vc, bt, sl, softmax_scale=None, window_left=-1, softcap=0.0,
        alibi_slopes=None, sinks=None, **_):
    return reference.paged_decode_attention(q, kc, vc, bt, sl, softmax_scale, window_left,
                                            softcap, alibi_slopes=alibi_slopes,
                                            sinks=sinks)[0]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_matches_reference(backend, device, hq, hkv, d):
    if backend == "cuda" and d not in (64, 128, 256):
        pytest.skip("CUDA kernel head dims")
    lens = [1, 37, 100, 16]
    case = make_case(lens, hq, hkv, d, device=device, dtype=torch.bfloat16)
    out = run(backend, *case)
    assert out.is_contiguous()
    assert_close(out, ref(*case))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("d", [512, 300])
def test_wide_head_dims_every_feature(backend, device, d):
    """D in (256, 512] (300: BLOCK_D 512, rows not 16-byte aligned): split-KV on and off,
    window, softcap, ALiBi, sinks and the LSE against the reference. The CUDA kernel stops
    at D = 256, so the op runs Triton even under use_backend("cuda")."""
    case = make_case([1, 45, 70], 8, 2, d, block_size=16, device=device,
                     dtype=torch.bfloat16, seed=d)
    slopes = torch.rand(8, generator=torch.Generator().manual_seed(d)).to(device)
    sinks = torch.linspace(-1.0, 1.0, 8, device=device)
    for kw in (dict(num_splits=1), dict(num_splits=3, window_left=30, softcap=20.0),
               dict(split_size=32, alibi_slopes=slopes, sinks=sinks)):
        out, lse = run(backend, *case, return_lse=True, **kw)
        ref_kw = {k: v for k, v in kw.items() if k not in ("num_splits", "split_size")}
        ref_out, ref_lse = reference.paged_decode_attention(*case, **ref_kw)
        assert_close(out, ref_out, scale=2.0)
        torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


def test_cuda_kernel_routing_by_head_dim():
    """auto / "cuda" send D > 256 (and D outside {64, 128, 256}) to Triton: the CUDA C++
    decode kernel is built for those three only."""
    for d, ok in ((64, True), (128, True), (256, True), (512, False), (320, False),
                  (96, False)):
        q, kc, vc, *_ = make_case([5], 8, 2, d)
        assert kv_cache._cuda_decode_ok(q, kc, vc, None) is ok, d
    q, kc, vc, *_ = make_case([5], 8, 2, 128)
    assert not kv_cache._cuda_decode_ok(q.float(), kc.float(), vc.float(), None)
    assert not kv_cache._cuda_decode_ok(q, kc, vc, torch.ones(8))


def test_head_dim_513_is_refused_by_name(device):
    q, kc, vc, bt, sl = make_case([5], 4, 2, 513, device=device)
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 512\].*got 513"):
        mk.ops.paged_decode_attention(q, kc, vc, bt, sl)


@pytest.mark.parametrize("backend", kernel_backends())
@given(data=st.data())
def test_random_configs(backend, device, data):
    """Window, softcap, scale, block size, splits and dtype drawn together."""
    hq, hkv, d = data.draw(st.sampled_from(HEADS))
    dtype = data.draw(st.sampled_from(
        [torch.float16, torch.bfloat16] + ([] if device == "cuda" else [torch.float32])))
    block_size = data.draw(st.sampled_from([1, 8, 12, 16, 32, 64, 100, 256]))
    lens = data.draw(st.lists(st.integers(0, 200), min_size=1, max_size=3))
    window = data.draw(st.sampled_from([-1, 0, 5, 40]))
    softcap = data.draw(st.sampled_from([0.0, 2.0, 30.0]))
    scale = data.draw(st.sampled_from([None, 0.3]))
    num_splits = data.draw(st.sampled_from([0, 1, 3]))
    split_size = data.draw(st.sampled_from([0, 0, 64, 100]))
    alibi = data.draw(st.sampled_from([None, None, "head", "batch_head"]))
    with_sinks = data.draw(st.booleans())
    case = make_case(lens, hq, hkv, d, block_size=block_size, dtype=dtype, device=device,
                     seed=data.draw(st.integers(0, 1000)))
    slopes = None if alibi is None else (
        torch.rand(hq) if alibi == "head" else torch.rand(len(lens), hq + 2)[:, 1:-1]
    )   # [B, Hq]: a view with its own row stride
    kw = dict(softmax_scale=scale, window_left=window, softcap=softcap,
              num_splits=num_splits, split_size=split_size,
              alibi_slopes=None if slopes is None else slopes.to(device),
              # attention sinks [Hq]: a strided view
              sinks=(torch.randn(2 * hq) * 2)[::2].to(device) if with_sinks else None)
    if backend == "cuda" and (dtype == torch.float32 or d not in (64, 128, 256)):
        pytest.skip("outside the CUDA kernel's support")
    assert_close(run(backend, *case, **kw), ref(*case, **kw), scale=2.0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("num_splits,split_size", [(1, 0), (2, 0), (7, 0), (0, 64), (0, 96)])
def test_splits_match_reference(backend, device, num_splits, split_size):
    lens = [300, 1, 129, 64]
    case = make_case(lens, 8, 2, 64, block_size=16, device=device)
    out = run(backend, *case, num_splits=num_splits, split_size=split_size)
    assert_close(out, ref(*case))


@pytest.mark.parametrize("backend", kernel_backends())
def test_strided_seq_lens_and_block_table(backend, device):
    """seq_lens / block_table views with non-unit inner strides (the kernels index them flat)."""
    q, kc, vc, bt, sl = make_case([37, 100, 5], 8, 2, 64, device=device)
    sl_view = torch.stack([sl, torch.zeros_like(sl)], dim=1)[:, 0]          # stride (2,)
    bt_view = bt.t().contiguous().t()                                        # stride (1, B)
    assert sl_view.stride() == (2,) and bt_view.stride(1) != 1
    for kw in (dict(num_splits=1), dict(num_splits=3)):
        out = run(backend, q, kc, vc, bt_view, sl_view, **kw)
        assert_close(out, ref(q, kc, vc, bt, sl))


@pytest.mark.parametrize("backend", kernel_backends())
def test_zero_length_gives_zeros(backend, device):
    case = make_case([0, 5, 0], 4, 2, 64, device=device)
    for kw in (dict(num_splits=1), dict(num_splits=3), dict(split_size=64)):
        out = run(backend, *case, **kw)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        assert_close(out, ref(*case))


@pytest.mark.parametrize("backend", kernel_backends())
def test_fully_windowed_and_long_window(backend, device):
    """window_left=0: only the newest token (output = its V); a window longer than the
    sequence changes nothing."""
    case = make_case([1, 77, 200], 8, 2, 64, device=device, dtype=torch.float32
                     if device == "cpu" else torch.float16)
    q, kc, vc, bt, sl = case
    out = run(backend, *case, window_left=0, num_splits=2)
    assert_close(out, ref(*case, window_left=0))
    last = torch.stack([reference.gather_paged(vc, bt[b], int(sl[b]))[-1] for b in range(3)])
    assert_close(out, last.repeat_interleave(4, dim=1))
    assert_close(run(backend, *case, window_left=10_000), ref(*case))


# ------------------------------------------------------------------- batch invariance


def _embed(case, other, position):
    """Put sequence 0 of ``case`` at ``position`` in a batch with the sequences of ``other``
    (same cache pool appended), with a wider block table."""
    q, kc, vc, bt, sl = case
    q2, kc2, vc2, bt2, sl2 = other
    nb = kc.shape[0]
    width = max(bt.shape[1], bt2.shape[1]) + 2
    rows = []
    for b in range(bt2.shape[0]):
        r = torch.zeros(width, dtype=torch.int32, device=bt.device)
        r[:bt2.shape[1]] = bt2[b] + nb
        rows.append(r)
    mine = torch.zeros(width, dtype=torch.int32, device=bt.device)
    mine[:bt.shape[1]] = bt[0]
    rows.insert(position, mine)
    qs = list(q2.unbind(0))
    qs.insert(position, q[0])
    lens = list(sl2.unbind(0))
    lens.insert(position, sl[0])
    return (torch.stack(qs), torch.cat([kc, kc2]), torch.cat([vc, vc2]), torch.stack(rows),
            torch.stack(lens))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kw", [dict(split_size=64), dict(num_splits=3), dict(num_splits=1)],
                         ids=["split_size", "num_splits3", "num_splits1"])
def test_batch_invariance_bitwise(backend, device, kw):
    hq, hkv, d = 8, 2, 128
    alone = make_case([173], hq, hkv, d, device=device, dtype=torch.bfloat16, seed=1)
    base = run(backend, *alone, **kw)[0]
    for position, other_lens, seed in ((0, [5, 300], 2), (2, [250, 1, 64, 90], 3),
                                       (1, [1], 4)):
        other = make_case(other_lens, hq, hkv, d, device=device, dtype=torch.bfloat16,
                          seed=seed)
        batch = _embed(alone, other, position)
        out = run(backend, *batch, **kw)
        assert torch.equal(out[position], base), f"differs at position {position}"


@pytest.mark.parametrize("backend", kernel_backends())
def test_split_size_ignores_num_splits(backend, device):
    """With a fixed split_size the result is bitwise the same for any num_splits; and a
    sequence shorter than one split gives the same bits in direct (1 split) and merged
    (several splits) launches."""
    case = make_case([150, 40], 8, 2, 64, device=device, dtype=torch.float16, seed=5)
    outs = [run(backend, *case, split_size=64, num_splits=n) for n in (0, 1, 4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    short = make_case([50, 3], 8, 2, 64, device=device, dtype=torch.float16, seed=6)
    one = run(backend, *short, num_splits=1)
    assert torch.equal(one, run(backend, *short, num_splits=4))
    assert torch.equal(one, run(backend, *short, split_size=64))


# ------------------------------------------------------------------------ heuristics


def test_plan_splits():
    dev = torch.device("cpu")  # plans as for 132 SMs
    assert kv_cache.plan_splits(256, 8, 4096, 128, 0, 0, dev) == (1, 1, 0, False)
    n, _, _, split = kv_cache.plan_splits(1, 8, 32768, 128, 0, 0, dev)
    assert split and 32 <= n <= 128
    assert kv_cache.plan_splits(1, 8, 512, 128, 0, 0, dev)[0] == 1    # too short to split
    assert kv_cache.plan_splits(4, 8, 4096, 128, 5, 0, dev) == (5, 5, 0, True)
    assert kv_cache.plan_splits(4, 8, 4096, 128, 1, 0, dev) == (1, 1, 0, False)
    # split_size rounds up to the tile and overrides num_splits
    assert kv_cache.plan_splits(4, 8, 4096, 128, 3, 100, dev) == (32, 1, 128, True)
    assert kv_cache.plan_splits(4, 8, 4096, 256, 0, 20, dev) == (128, 1, 32, True)


def test_tile_matches_triton_kernel():
    from minikernels.ops.triton import paged_attention
    for d in (64, 80, 128, 256):
        assert paged_attention.block_n(d) == kv_cache.tile_tokens(d)


# ---------------------------------------------------------------------------- errors


def test_errors(device):
    q, kc, vc, bt, sl = make_case([20, 33], 4, 2, 64, device=device)
    f = mk.ops.paged_decode_attention
    with pytest.raises(ValueError, match="block_table \\(used entries\\) values must be in"):
        bad = bt.clone()
        bad[1, 0] = kc.shape[0]
        f(q, kc, vc, bad, sl)
    with pytest.raises(ValueError, match="exceeds block_table capacity"):
        f(q, kc, vc, bt, torch.tensor([20, bt.shape[1] * 16 + 1], dtype=torch.int32,
                                      device=device))
    with pytest.raises(ValueError, match="seq_lens values must be in"):
        f(q, kc, vc, bt, torch.tensor([20, -1], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="block_table must have dtype"):
        f(q, kc, vc, bt.long(), sl)
    with pytest.raises(TypeError, match="seq_lens must have dtype"):
        f(q, kc, vc, bt, sl.long())
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        f(q, kc.bfloat16(), vc.bfloat16(), bt, sl)
    with pytest.raises(ValueError, match="multiple of cache kv heads"):
        f(q[:, :3], kc, vc, bt, sl)
    with pytest.raises(ValueError, match="head dim"):
        f(q[..., :32], kc, vc, bt, sl)
    with pytest.raises(TypeError, match="alibi_slopes"):
        f(q, kc, vc, bt, sl, alibi_slopes=torch.ones(q.shape[1], dtype=torch.float16,
                                                     device=device))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        f(q, kc, vc, bt, sl, alibi_slopes=torch.ones(q.shape[1] + 1, device=device))
    with pytest.raises(ValueError, match="block_table must have 2 rows"):
        f(q, kc, vc, bt[:1], sl)
    with pytest.raises(ValueError, match="num_splits"):
        f(q, kc, vc, bt, sl, num_splits=-1)
    with pytest.raises(ValueError, match="split_size"):
        f(q, kc, vc, bt, sl, split_size=-5)
    with pytest.raises(ValueError, match="window_left"):
        f(q, kc, vc, bt, sl, window_left=-2)
    with pytest.raises(ValueError, match="softcap"):
        f(q, kc, vc, bt, sl, softcap=-1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        f(q, kc, vc, bt, sl, softmax_scale=0.0)


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_opcheck(backend, device):
    q, kc, vc, bt, sl = make_case([9, 40], 4, 2, 64, device=device)
    with mk.use_backend(backend):
        for splits, size in ((1, 0), (2, 0), (0, 64)):
            torch.library.opcheck(torch.ops.minikernels.paged_decode_attention,
                                  (q, kc, vc, bt, sl, 0.125, -1, 0.0, splits, size))
        torch.library.opcheck(torch.ops.minikernels.paged_decode_attention,
                              (q, kc, vc, bt, sl, 0.125, -1, 0.0, 2, 0, None, None,
                               torch.rand(4, device=device)))


@pytest.mark.parametrize("backend", kernel_backends())
def test_alibi_matches_vllm_bias(backend, device):
    """ALiBi against an independent formula, vLLM's decode bias: key j of a sequence of
    length L gets slope * (j - L + 1) added to its scaled score (SDPA with that float mask
    over the gathered context), slopes per head [Hq] and per sequence and head [B, Hq],
    with split-KV on and off. The CUDA kernel has no ALiBi: the op runs Triton instead."""
    lens = [1, 37, 100, 200]
    q, kc, vc, bt, sl = make_case(lens, 8, 2, 64, device=device, seed=4)
    g = torch.Generator().manual_seed(4)
    for slopes in (torch.rand(8, generator=g), torch.rand(4, 8, generator=g)):
        slopes = slopes.to(device)
        for kw in (dict(num_splits=1), dict(num_splits=3)):
            out = run(backend, q, kc, vc, bt, sl, alibi_slopes=slopes, **kw)
            for b, n in enumerate(lens):
                blocks = bt[b, :(n + 15) // 16].long()
                keys = kc[blocks].reshape(-1, 2, 64)[:n].float().repeat_interleave(4, 1)
                vals = vc[blocks].reshape(-1, 2, 64)[:n].float().repeat_interleave(4, 1)
                s_b = slopes if slopes.ndim == 1 else slopes[b]
                bias = s_b.view(8, 1, 1) * (torch.arange(n, device=device) - n + 1).float()
                want = F.scaled_dot_product_attention(
                    q[b].float().view(8, 1, 64), keys.transpose(0, 1), vals.transpose(0, 1),
                    attn_mask=bias)
                assert_close(out[b], want.view(8, 64).to(q.dtype))


# ----------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("backend", kernel_backends())
def test_gpu_long_context_bf16(backend):
    """Realistic shapes: Hq=32, Hkv=8, D=128, block 16, contexts up to 8k, every split mode."""
    lens = [8000, 1, 4097, 513, 2048, 17]
    case = make_case(lens, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    expect = ref(*case)
    for kw in (dict(), dict(num_splits=1), dict(num_splits=16), dict(split_size=512)):
        assert_close(run(backend, *case, **kw), expect)


@requires_cuda
@pytest.mark.parametrize("backend", kernel_backends())
def test_gpu_cuda_graph_capture(backend):
    """The op captures into a CUDA graph (no host sync) and replays with new seq_lens."""
    case = make_case([300, 1000], 32, 8, 128, dtype=torch.bfloat16, device="cuda",
                     table_width=80)
    q, kc, vc, bt, sl = case
    with mk.use_backend(backend):
        mk.ops.paged_decode_attention(q, kc, vc, bt, sl)   # warm up (compile)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mk.ops.paged_decode_attention(q, kc, vc, bt, sl)
    sl.copy_(torch.tensor([299, 1001], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref(q, kc, vc, bt, sl))


@requires_cuda
def test_gpu_backends_agree():
    """Triton and CUDA C++ kernels agree with each other at the bf16 tolerance."""
    case = make_case([3000, 77, 1024], 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert_close(run("cuda", *case), run("triton", *case))



# ------------------------------------------------------ LSE, merging, any block size


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kw", [dict(num_splits=1), dict(num_splits=3), dict(split_size=64),
                                dict(window_left=30, num_splits=2),
                                dict(softcap=5.0, num_splits=1)],
                         ids=["one_split", "three_splits", "split_size", "window", "softcap"])
def test_return_lse_matches_reference(backend, device, kw):
    case = make_case([0, 1, 77, 200], 8, 2, 64, device=device, dtype=torch.bfloat16, seed=9)
    out, lse = run(backend, *case, return_lse=True, **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("window_left", "softcap")}
    ref_out, ref_lse = reference.paged_decode_attention(*case, None, **ref_kw)
    assert lse.shape == (4, 8) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_close(out, ref_out)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1:]).all()
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)
    # the same output with and without the LSE
    assert torch.equal(out, run(backend, *case, **kw))


@pytest.mark.parametrize("backend", kernel_backends())
def test_merge_split_context_equals_whole(backend, device):
    """Cascade attention: a shared prefix and per-sequence suffixes attended separately and
    merged by their LSEs give attention over the whole context."""
    q, kc, vc, bt, sl = make_case([96, 150, 40], 8, 2, 64, block_size=16, device=device,
                                  dtype=torch.float16, seed=12)
    cut = torch.tensor([32, 64, 16], dtype=torch.int32, device=device)  # block multiples
    prefix_bt = bt
    suffix_bt = torch.zeros_like(bt)
    for b in range(3):
        nb = int(cut[b]) // 16
        suffix_bt[b, :bt.shape[1] - nb] = bt[b, nb:]
    with mk.use_backend(backend):
        o1, l1 = mk.ops.paged_decode_attention(q, kc, vc, prefix_bt, cut, num_splits=1,
                                               return_lse=True)
        o2, l2 = mk.ops.paged_decode_attention(q, kc, vc, suffix_bt, sl - cut, num_splits=2,
                                               return_lse=True)
    merged, lse = mk.ops.merge_attn_states(o1, l1, o2, l2)
    whole_out, whole_lse = reference.paged_decode_attention(q, kc, vc, bt, sl)
    assert_close(merged, whole_out, scale=2.0)
    torch.testing.assert_close(lse, whole_lse, atol=2e-3, rtol=1e-3)
    # a state over no keys (lse -inf) changes nothing
    empty_o, empty_l = torch.zeros_like(o1), torch.full_like(l1, float("-inf"))
    same, same_l = mk.ops.merge_attn_states(o1, l1, empty_o, empty_l)
    assert torch.equal(same, o1) and torch.equal(same_l, l1)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("block_size", [1, 3, 24, 100, 256])
def test_any_block_size(backend, device, block_size):
    case = make_case([1, 77, 260], 8, 2, 128, block_size=block_size, device=device,
                     dtype=torch.bfloat16, seed=block_size)
    for kw in (dict(num_splits=1), dict(num_splits=3), dict(split_size=64, window_left=100)):
        ref_kw = {k: v for k, v in kw.items() if k == "window_left"}
        assert_close(run(backend, *case, **kw), ref(*case, **ref_kw))


@pytest.mark.parametrize("d,offset", [(64, 0), (64, 3), (111, 0), (5, 0)])
def test_vector_hints_only_on_aligned_rows(d, offset):
    """The kernel's 16-byte vector hints (ALIGNED) are on exactly when every cache row is
    16-byte aligned: odd head dims and caches that are views at an odd offset run without
    them (on a GPU a false hint is a misaligned vector load), and match the reference."""
    from minikernels.ops.triton import paged_attention as tp
    q, kc, vc, bt, sl = make_case([9, 40], 4, 2, d, block_size=8)
    if offset:   # caches as views into a bigger buffer, shifted by `offset` elements
        buf_k = torch.randn(kc.numel() + offset).half()
        buf_v = torch.randn(vc.numel() + offset).half()
        kc = buf_k[offset:].view(kc.shape).copy_(kc)
        vc = buf_v[offset:].view(vc.shape).copy_(vc)
    with spy_launches(tp, "paged_decode_kernel", "ALIGNED") as seen:
        out = run("triton", q, kc, vc, bt, sl, num_splits=1)
    assert seen == [d % 8 == 0 and offset % 8 == 0]
    assert_close(out, ref(q, kc, vc, bt, sl))


def test_merge_attn_states_errors():
    o, lse = torch.zeros(2, 4, 8), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        mk.ops.merge_attn_states(o, lse, o, lse[:1])
    with pytest.raises(TypeError, match="lse_a must have dtype"):
        mk.ops.merge_attn_states(o, lse.half(), o, lse)
    with pytest.raises(ValueError, match="out_b must have shape"):
        mk.ops.merge_attn_states(o, lse, o[:1], lse)


@pytest.mark.parametrize("backend", kernel_backends())
def test_sinks_lse_and_empty_rows(backend, device):
    """With sinks the returned lse includes each head's sink (equal to the reference's),
    and a seq_len-0 row keeps zeros with the sink as its lse."""
    case = make_case([0, 9, 33], 4, 2, 64, device=device, dtype=torch.bfloat16)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=device)
    out, lse = run(backend, *case, sinks=sinks, return_lse=True)
    ref_out, ref_lse = reference.paged_decode_attention(*case, sinks=sinks)
    assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)
    assert torch.equal(out[0].float(), torch.zeros_like(out[0], dtype=torch.float32))
    assert torch.equal(lse[0], sinks)
