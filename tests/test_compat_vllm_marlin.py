"""vLLM's Marlin compat (minikernels.compat.vllm_marlin): the layout helpers, the repack
ops and ``gptq_marlin_gemm``.

The test builds its own reference of the Marlin layout, written from vLLM's description
(marlin_utils_test.py / marlin_utils.py) as explicit index arithmetic, not the module's
reshape / permute code: ``ref_layout_index`` gives, for every entry of the unpacked Marlin
weight, the (row, column) of q it holds; ``ref_pack`` packs value i of each word at bits
num_bits * i; the scale / zero-point / bias permutations are vLLM's lists written out
here. Every GEMM result is checked against vLLM's test criterion (relative mean error
< 0.04 against a @ w_ref) and, tighter, against an fp32 matmul with W decoded from the
Marlin tensors by this file's reference decoder."""
from __future__ import annotations

import re
from unittest import mock

import pytest
import torch

import minikernels as mk
from minikernels.compat import vllm_marlin as M
from minikernels.compat.vllm_marlin import MarlinUnsupportedError, scalar_types

AWQ_ORDER = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
INTERLEAVE = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
TIGHT = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------ the test's reference layout


def ref_weight_perm(bits: int, is_a_8bit: bool = False) -> torch.Tensor:
    """vLLM's get_weight_perm, written out."""
    out = []
    for i in range(32):
        col = i // 4
        if is_a_8bit:
            base = [4 * (i % 4) + d for d in range(4)] + [4 * (i % 4 + 4) + d for d in range(4)]
            reps, step = 2, 512
        else:
            base = [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1]
            reps, step = 4, 256
        lane = []
        for block in (0, 1):
            for row in base:
                lane.append(16 * row + col + 8 * block)
        for j in range(reps):
            out += [p + step * j for p in lane]
    if is_a_8bit:
        inter = [0, 4, 1, 5, 2, 6, 3, 7] if bits == 4 else [0, 1, 2, 3]
    else:
        inter = list(INTERLEAVE[bits])
    res = []
    for start in range(0, len(out), len(inter)):
        res += [out[start + t] for t in inter]
    return torch.tensor(res)


def ref_scale_perms() -> tuple[list[int], list[int]]:
    perm = []
    for i in range(8):
        perm += [i + 8 * j for j in range(8)]
    single = []
    for i in range(4):
        single += [2 * i + j for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm, single


def ref_layout_index(k: int, n: int, bits: int, is_a_8bit: bool = False) -> torch.Tensor:
    """int64 [K / 16, N * 16]: flat index (row * N + col) into q of each entry of the
    unpacked Marlin weight."""
    tk = 32 if is_a_8bit else 16
    f = torch.arange(k * n).reshape(k // 16, n * 16)     # position in the tile-major array
    blk, rem = f // (n * tk), f % (n * tk)                  # (K/tk, N/16, tk, 16) row-major
    nt, within = rem // (tk * 16), rem % (tk * 16)
    row = blk * tk + within // 16
    col = nt * 16 + within % 16
    tiled = row * n + col
    perm = ref_weight_perm(bits, is_a_8bit)
    return tiled.reshape(-1, perm.numel())[:, perm].reshape(k // 16, n * 16)


def _wrap32(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def ref_pack(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., C * pack] -> int32 [..., C]; value i of word c (bits * i..) = column pack*c+i."""
    pack = 32 // bits
    v = vals.to(torch.int64).cpu()
    words = torch.zeros(*v.shape[:-1], v.shape[-1] // pack, dtype=torch.int64)
    for i in range(pack):
        words |= v[..., i::pack] << (bits * i)
    return _wrap32(words)


def ref_unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    pack = 32 // bits
    w = words.to(torch.int64).cpu() & 0xFFFFFFFF
    out = torch.zeros(*w.shape[:-1], w.shape[-1] * pack, dtype=torch.int64)
    for i in range(pack):
        out[..., i::pack] = (w >> (bits * i)) & (2**bits - 1)
    return out


def ref_marlin_weights(q: torch.Tensor, bits: int, is_a_8bit: bool = False) -> torch.Tensor:
    k, n = q.shape
    idx = ref_layout_index(k, n, bits, is_a_8bit)
    return ref_pack(q.cpu().reshape(-1)[idx], bits)


def ref_unmarlin_weights(words: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor:
    vals = ref_unpack(words, bits)
    q = torch.empty(k * n, dtype=torch.int64)
    q[ref_layout_index(k, n, bits).reshape(-1)] = vals.reshape(-1)
    return q.reshape(k, n)


def ref_unpermute(t: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """t was built as orig.reshape(-1, L)[:, perm]; give orig back."""
    t = t.cpu()
    out = torch.empty_like(t).reshape(-1, len(perm))
    out[:, perm] = t.reshape(-1, len(perm))
    return out.reshape(t.shape)


def ref_marlin_zero_points(zp: torch.Tensor, bits: int) -> torch.Tensor:
    perm, _ = ref_scale_perms()
    z = zp.cpu().reshape(-1, 64)[:, perm].reshape(-1, len(INTERLEAVE[bits]))
    z = z[:, list(INTERLEAVE[bits])].reshape(zp.shape)
    return ref_pack(z, bits)


def ref_unmarlin_zero_points(words: torch.Tensor, bits: int) -> torch.Tensor:
    z = ref_unpack(words, bits)
    z = ref_unpermute(z, list(INTERLEAVE[bits]))
    return ref_unpermute(z, ref_scale_perms()[0])


def pack_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [K / pack, N]: value i of word (r, n) = q[pack * r + i, n]."""
    return ref_pack(q.cpu().t(), bits).t().contiguous()


def pack_awq(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoAWQ [K, N / pack]: slot i of word c = column pack * c + AWQ_ORDER[i]."""
    order = AWQ_ORDER[bits]
    pack = len(order)
    v = q.cpu().reshape(q.shape[0], -1, pack)[..., list(order)].reshape(q.shape)
    return ref_pack(v, bits)


def ref_decode(marlin_q_w: torch.Tensor, marlin_s: torch.Tensor, k: int, n: int,
               qtype, g_idx: torch.Tensor | None = None, perm: torch.Tensor | None = None,
               marlin_zp: torch.Tensor | None = None) -> torch.Tensor:
    """W [K, N] fp32 in input row order, from the Marlin tensors."""
    bits = qtype.size_bits
    q = ref_unmarlin_weights(marlin_q_w, k, n, bits).double()
    groups = marlin_s.shape[0]
    sp, single = ref_scale_perms()
    s = ref_unpermute(marlin_s.float(), sp if groups > 1 else single).double()
    if marlin_zp is not None:
        z = ref_unmarlin_zero_points(marlin_zp, bits).double()
    else:
        z = torch.full((groups, n), float(qtype.bias), dtype=torch.float64)
    if g_idx is not None and g_idx.numel():
        rg = g_idx.long().cpu()
    else:
        rg = torch.arange(k) // (k // groups)
    w_stored = (q - z[rg]) * s[rg]
    if perm is not None and perm.numel():
        w = torch.empty_like(w_stored)
        w[perm.long().cpu()] = w_stored
        w_stored = w
    return w_stored.float()


def rel_mean_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """vLLM's compute_max_diff."""
    return float((y.float() - ref.float()).abs().mean() / ref.float().abs().mean())


def assert_tight(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TIGHT[dtype]
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), rtol=tol,
                               atol=tol * float(ref.abs().max()))


def gemm(a, q, s, qtype, n, k, zp=None, g_idx=None, perm=None, bias=None, c=None,
         is_k_full=True):
    ws = M.marlin_make_workspace_new(a.device)
    return M.gptq_marlin_gemm(a, c, q, bias, s, None, None, zp, g_idx, perm, ws, qtype,
                              a.shape[0], n, k, is_k_full=is_k_full, use_atomic_add=False,
                              use_fp32_reduce=True, is_zp_float=False)


# --------------------------------------------------------------------- layout helpers


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("is_a_8bit", [False, True])
def test_weight_and_scale_perms_match_vllms_lists(bits, is_a_8bit):
    perm = M.get_weight_perm(bits, is_a_8bit)
    assert perm.numel() == 1024
    assert torch.equal(perm, ref_weight_perm(bits, is_a_8bit))
    assert sorted(perm.tolist()) == list(range(1024))
    assert M.get_scale_perms() == ref_scale_perms()
    assert len(ref_scale_perms()[0]) == 64 and len(ref_scale_perms()[1]) == 32
    assert M.GPTQ_MARLIN_TILE == 16


def test_scalar_types_stand_in():
    st = scalar_types
    assert (st.uint4b8.size_bits, st.uint4b8.bias, st.uint4b8.has_bias()) == (4, 8, True)
    assert (st.uint8b128.size_bits, st.uint8b128.bias) == (8, 128)
    assert (st.uint4.size_bits, st.uint4.has_bias()) == (4, False)
    assert st.uint4 != st.uint4b8 and st.uint4b8 == st.uint4b8
    assert (st.uint4b8.min(), st.uint4b8.max(), st.uint4.max()) == (-8, 7, 15)
    assert str(st.uint8b128) == "uint8b128" and st.float8_e4m3fn.is_floating_point()
    assert M.query_marlin_supported_quant_types(False, False) == [st.uint4b8, st.uint8b128]
    assert M.query_marlin_supported_quant_types(True) == [st.uint4]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order,is_a_8bit", [(False, False), (True, False),
                                                 (False, True)])
@pytest.mark.parametrize("k,n", [(128, 64), (256, 192), (384, 128)])
def test_gptq_marlin_repack_equals_marlin_weights(device, bits, act_order, is_a_8bit, k, n):
    """vLLM's test_gptq_marlin_repack: repack of the GPTQ words == marlin_weights of the
    (sorted) integers, here also == the test's own layout."""
    g = torch.Generator().manual_seed(k + n + bits)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    q_gptq = pack_k(q, bits).to(device)
    sort_idx = torch.empty(0, dtype=torch.int32)
    q_sorted = q
    if act_order:
        g_idx = torch.randperm(k, generator=g) // 128
        sort_idx = torch.argsort(g_idx).to(torch.int32)
        q_sorted = q[sort_idx.long()]
    out = M.gptq_marlin_repack(q_gptq, sort_idx.to(device), k, n, bits, is_a_8bit)
    assert out.dtype == torch.int32 and out.device.type == torch.device(device).type
    assert out.shape == (k // 16, n * 16 // (32 // bits))
    expected = ref_marlin_weights(q_sorted, bits, is_a_8bit)
    assert torch.equal(out.cpu(), expected)
    mk_weights = M.marlin_weights(q_sorted.to(device), k, n, bits,
                                  M.get_weight_perm(bits, is_a_8bit), is_a_8bit)
    assert torch.equal(mk_weights.cpu(), expected)
    if not is_a_8bit:
        assert torch.equal(M.unpack_marlin_weights(out, k, n, bits).cpu(), q_sorted.int())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("is_a_8bit", [False, True])
@pytest.mark.parametrize("k,n", [(128, 64), (256, 320)])
def test_awq_marlin_repack_equals_marlin_weights(device, bits, is_a_8bit, k, n):
    g = torch.Generator().manual_seed(7 * k + n + bits)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    q_awq = pack_awq(q, bits).to(device)
    assert torch.equal(M.awq_pack(q.int(), bits, k, n), q_awq.cpu())
    out = M.awq_marlin_repack(q_awq, k, n, bits, is_a_8bit)
    assert torch.equal(out.cpu(), ref_marlin_weights(q, bits, is_a_8bit))


def test_moe_repacks_loop_over_experts():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (2, 128, 64), generator=g)
    perm = torch.stack([torch.randperm(128, generator=g) for _ in range(2)]).int()
    gptq = torch.stack([pack_k(q[e], 4) for e in range(2)])
    out = M.gptq_marlin_moe_repack(gptq, perm, 128, 64, 4)
    for e in range(2):
        assert torch.equal(out[e], ref_marlin_weights(q[e][perm[e].long()], 4))
    awq = torch.stack([pack_awq(q[e], 4) for e in range(2)])
    out = M.awq_marlin_moe_repack(awq, torch.empty(0), 128, 64, 4)
    for e in range(2):
        assert torch.equal(out[e], ref_marlin_weights(q[e], 4))


@pytest.mark.parametrize("groups", [1, 4])
def test_scale_and_bias_permutations_round_trip(device, groups):
    k, n = 256, 192
    s = torch.randn(groups, n, dtype=torch.float16, device=device)
    group_size = -1 if groups == 1 else k // groups
    ms = M.marlin_permute_scales(s, k, n, group_size)
    perm, single = ref_scale_perms()
    expected = s.cpu().reshape(-1, 64 if groups > 1 else 32)[:, perm if groups > 1 else single]
    assert torch.equal(ms.cpu(), expected.reshape(groups, n))
    assert torch.equal(ref_unpermute(ms, perm if groups > 1 else single), s.cpu())
    assert torch.equal(M.marlin_unpermute_scales(ms, k, n, group_size), s)
    # group_size == size_k is channelwise too; is_a_8bit always uses the single perm
    assert torch.equal(M.marlin_permute_scales(s[:1], k, n, k),
                       M.marlin_permute_scales(s[:1], k, n, -1))
    if groups > 1:
        a8 = M.marlin_permute_scales(s, k, n, group_size, is_a_8bit=True)
        assert torch.equal(a8.cpu(), s.cpu().reshape(-1, 32)[:, single].reshape(groups, n))
    bias = torch.randn(n, dtype=torch.bfloat16, device=device)
    mb = M.marlin_permute_bias(bias)
    assert torch.equal(mb.cpu(), bias.cpu().reshape(-1, 32)[:, single].reshape(n))
    assert torch.equal(M.marlin_unpermute_bias(mb), bias)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_zero_point_layouts_round_trip(device, bits, groups):
    n = 128
    g = torch.Generator().manual_seed(bits * groups)
    zp = torch.randint(0, 2**bits, (groups, n), generator=g).int()
    mz = M.marlin_zero_points(zp.to(device), groups, n, bits)
    assert mz.dtype == torch.int32 and mz.shape == (groups, n * bits // 32)
    assert torch.equal(mz.cpu(), ref_marlin_zero_points(zp, bits))
    assert torch.equal(ref_unmarlin_zero_points(mz, bits), zp.long())
    assert torch.equal(M.unpack_marlin_zero_points(mz, groups, n, bits).cpu(), zp)
    assert torch.equal(M.awq_to_marlin_zero_points(pack_awq(zp, bits).to(device), groups,
                                                   n, bits).cpu(), mz.cpu())
    # is_a_8bit: no interleave
    mz8 = M.marlin_zero_points(zp, groups, n, bits, is_a_8bit=True)
    perm, _ = ref_scale_perms()
    assert torch.equal(mz8, ref_pack(zp.reshape(-1, 64)[:, perm].reshape(groups, n), bits))
    assert torch.equal(M.unpack_marlin_zero_points(mz8, groups, n, bits, is_a_8bit=True), zp)


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_utils_packers(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (64, 64), generator=g).int()
    assert torch.equal(M.gptq_pack(q, bits, 64, 64), pack_k(q, bits))
    assert torch.equal(M.pack_cols(q, bits, 64, 64), ref_pack(q, bits))
    assert torch.equal(M.unpack_cols(M.pack_cols(q, bits, 64, 64), bits, 64, 64), q)
    assert M.get_pack_factor(bits) == 32 // bits


# ----------------------------------------------------------------------------- GEMM


def _gptq_cases():
    for qtype in (scalar_types.uint4b8, scalar_types.uint8b128):
        for group in (-1, 32, 64, 128):
            for act in (False, True):
                if act and group == -1:
                    continue
                yield qtype, group, act


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype,group,act_order", list(_gptq_cases()),
                         ids=lambda v: str(v))
def test_gptq_marlin_gemm_matches_reference(device, qtype, group, act_order, dtype):
    """vLLM's test_marlin_gemm recipe (marlin_quantize, M = 1 / 7 / 33) plus the exact
    decoded weight."""
    k, n = 256, 128
    torch.manual_seed(group + 3 * act_order + qtype.size_bits)
    w = torch.randn(k, n, dtype=dtype, device=device)
    w_ref, q, s, g_idx, sort_idx, rand_perm = M.marlin_quantize(w, qtype, group, act_order)
    assert q.shape == (k // 16, n * 16 * qtype.size_bits // 32) and s.dtype == dtype
    assert (g_idx.numel(), sort_idx.numel(), rand_perm.numel()) == ((k,) * 3 if act_order
                                                                    else (0, 0, 0))
    w_exact = ref_decode(q, s, k, n, qtype, g_idx, sort_idx)
    assert torch.equal(w_exact.to(dtype), w_ref.cpu())            # w_ref = one rounding
    for m in (1, 7, 33):
        a = torch.randn(m, k, dtype=dtype, device=device)
        y = gemm(a, q, s, qtype, n, k, g_idx=g_idx, perm=sort_idx)
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel_mean_err(y, a @ w_ref) < 0.04
        assert_tight(y, a.float().cpu() @ w_exact, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype,group", [(scalar_types.uint4, -1), (scalar_types.uint4, 32),
                                         (scalar_types.uint4, 128), (scalar_types.uint8, 64)],
                         ids=str)
def test_awq_marlin_gemm_with_zero_points(device, qtype, group, dtype):
    k, n = 256, 192
    torch.manual_seed(5 + group)
    w = torch.randn(k, n, dtype=dtype, device=device)
    w_ref, q, s, zp = M.awq_marlin_quantize(w, qtype, group)
    assert zp.dtype == torch.int32 and zp.shape == (s.shape[0], n * qtype.size_bits // 32)
    w_exact = ref_decode(q, s, k, n, qtype, marlin_zp=zp)
    assert torch.equal(w_exact.to(dtype), w_ref.cpu())
    for m in (1, 7, 33):
        a = torch.randn(m, k, dtype=dtype, device=device)
        y = gemm(a, q, s, qtype, n, k, zp=zp)
        assert rel_mean_err(y, a @ w_ref) < 0.04
        assert_tight(y, a.float().cpu() @ w_exact, dtype)


def test_awq_checkpoint_repacked_runs_like_awq_gemm(device):
    """An AutoAWQ checkpoint through awq_marlin_repack / awq_to_marlin_zero_points /
    marlin_permute_scales gives the fp32 (q - z) * s product."""
    k, n, group = 256, 128, 64
    g = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // group, n), generator=g)
    s = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).half()
    mq = M.awq_marlin_repack(pack_awq(q, 4).to(device), k, n, 4)
    mz = M.awq_to_marlin_zero_points(pack_awq(z, 4).to(device), k // group, n, 4)
    ms = M.marlin_permute_scales(s.to(device), k, n, group)
    a = torch.randn(5, k, dtype=torch.float16, device=device)
    y = gemm(a, mq, ms, scalar_types.uint4, n, k, zp=mz)
    w = (q - z.repeat_interleave(group, 0)).float() * s.float().repeat_interleave(group, 0)
    assert_tight(y, a.float().cpu() @ w, torch.float16)


def test_row_parallel_act_order_shards_with_is_k_full_false(device):
    """is_k_full=False: a row-parallel act-order shard whose g_idx indexes the full set of
    groups; the two shards' partial products add up to the full product."""
    k, n, group = 256, 64, 32
    torch.manual_seed(2)
    w = torch.randn(k, n, dtype=torch.float16, device=device)
    w_ref, q_sorted, s, g_idx_sorted, sort_idx, _ = M.marlin_quantize(
        w, scalar_types.uint4b8, group, True)
    # back to checkpoint row order, then split K in two shards
    q_full = ref_unmarlin_weights(q_sorted, k, n, 4)
    q_ckpt = torch.empty_like(q_full)
    q_ckpt[sort_idx.long().cpu()] = q_full
    g_ckpt = torch.empty_like(g_idx_sorted.cpu())
    g_ckpt[sort_idx.long().cpu()] = g_idx_sorted.cpu()
    a = torch.randn(3, k, dtype=torch.float16, device=device)
    total = torch.zeros(3, n)
    half = k // 2
    for lo in (0, half):
        rows = slice(lo, lo + half)
        gi_sorted, perm = M.marlin_sort_g_idx(g_ckpt[rows].to(device))
        mq = M.gptq_marlin_repack(pack_k(q_ckpt[rows], 4).to(device), perm, half, n, 4)
        y = gemm(a[:, rows], mq, s, scalar_types.uint4b8, n, half, g_idx=gi_sorted,
                 perm=perm, is_k_full=False)
        total += y.float().cpu()
    assert rel_mean_err(total, a.float() @ w_ref.float()) < 0.04
    assert_tight(total, (a.float() @ w_ref.float()).cpu(), torch.float16)


def test_bias_out_param_strided_input_and_empty_m(device):
    k, n = 128, 128
    torch.manual_seed(9)
    w = torch.randn(k, n, dtype=torch.float16, device=device)
    w_ref, q, s, g_idx, sort_idx, _ = M.marlin_quantize(w, scalar_types.uint4b8, 128, False)
    bias = torch.randn(n, dtype=torch.float16, device=device) * 10
    base = torch.randn(9, 2 * k, dtype=torch.float16, device=device)
    a = base[1:8, ::2]                                          # strided view [7, K]
    c = torch.empty(7, n, dtype=torch.float16, device=device)
    out = gemm(a, q, s, scalar_types.uint4b8, n, k, g_idx=g_idx, perm=sort_idx,
               bias=M.marlin_permute_bias(bias), c=c)
    assert out is c
    ref = a.float() @ w_ref.float() + bias.float()
    assert rel_mean_err(c, ref) < 0.04
    w_exact = ref_decode(q, s, k, n, scalar_types.uint4b8)
    assert_tight(c, a.float().cpu() @ w_exact + bias.float().cpu(), torch.float16)
    empty = gemm(a[:0], q, s, scalar_types.uint4b8, n, k)
    assert empty.shape == (0, n)


def test_older_signatures_give_the_same_result(device):
    k, n = 128, 64
    torch.manual_seed(4)
    w = torch.randn(k, n, dtype=torch.float16, device=device)
    _, q, s, g_idx, sort_idx, _ = M.marlin_quantize(w, scalar_types.uint4b8, 32, True)
    a = torch.randn(3, k, dtype=torch.float16, device=device)
    ws = M.marlin_make_workspace(n, device)
    t = scalar_types.uint4b8
    cur = M.gptq_marlin_gemm(a, None, q, None, s, None, None, None, g_idx, sort_idx, ws, t,
                             3, n, k, True, False, True, False)
    assert torch.equal(M.marlin_gemm(a, None, q, None, s, None, None, None, g_idx, sort_idx,
                                     ws, t, size_m=3, size_n=n, size_k=k), cur)
    no_a_scales = M.gptq_marlin_gemm(a, None, q, None, s, None, None, g_idx, sort_idx, ws,
                                     t, 3, n, k, is_k_full=True)
    no_bias = M.gptq_marlin_gemm(a, None, q, s, None, None, g_idx, sort_idx, ws, t, 3, n, k)
    has_zp = M.gptq_marlin_gemm(a, q, s, torch.empty(0, dtype=torch.int32), g_idx,
                                sort_idx, ws, t, 3, n, k, True, False, True)
    keywords = M.gptq_marlin_gemm(a=a, c=None, b_q_weight=q, b_bias=None, b_scales=s,
                                  a_scales=None, global_scale=None, b_zeros=None,
                                  g_idx=g_idx, perm=sort_idx, workspace=ws, b_q_type=t,
                                  size_m=3, size_n=n, size_k=k)
    for other in (no_a_scales, no_bias, has_zp, keywords):
        assert torch.equal(other, cur)
    # Marlin v1: marlin_gemm(a, b_q_weight, b_scales, workspace, size_m, size_n, size_k)
    _, q1, s1, _, _, _ = M.marlin_quantize(w, 4, 128, False)
    v1 = M.marlin_gemm(a, q1, s1, ws, 3, n, k)
    assert torch.equal(v1, gemm(a, q1, s1, t, n, k))


@pytest.mark.parametrize("qtype,op", [(scalar_types.uint4b8, "int4_matmul"),
                                      (scalar_types.uint8b128, "int8_matmul"),
                                      (scalar_types.uint4, "int4_matmul")], ids=str)
def test_gemm_runs_minikernels_ops(device, qtype, op):
    k, n = 128, 64
    w = torch.randn(k, n, dtype=torch.bfloat16, device=device)
    if qtype.has_bias():
        _, q, s, _, _, _ = M.marlin_quantize(w, qtype, 64, False)
        zp = None
    else:
        _, q, s, zp = M.awq_marlin_quantize(w, qtype, 64)
    a = torch.randn(2, k, dtype=torch.bfloat16, device=device)
    with mock.patch.object(mk.ops, op, wraps=getattr(mk.ops, op)) as spy:
        gemm(a, q, s, qtype, n, k, zp=zp)
    assert spy.call_count == 1


def test_decode_marlin_gives_the_weight(device):
    k, n = 256, 64
    torch.manual_seed(6)
    w = torch.randn(k, n, dtype=torch.float16, device=device)
    w_ref, q, s, g_idx, sort_idx, _ = M.marlin_quantize(w, scalar_types.uint8b128, 64, True)
    dw = M.decode_marlin(q, s, None, g_idx, sort_idx, scalar_types.uint8b128, k, n)
    assert torch.equal(dw.dequantize().to(torch.float16), w_ref)


# ----------------------------------------------------------------------------- errors


@pytest.fixture()
def small(device):
    k, n = 128, 64
    torch.manual_seed(1)
    w = torch.randn(k, n, dtype=torch.float16, device=device)
    _, q, s, g_idx, sort_idx, _ = M.marlin_quantize(w, scalar_types.uint4b8, 32, True)
    a = torch.randn(2, k, dtype=torch.float16, device=device)
    return dict(a=a, c=None, b_q_weight=q, b_bias=None, b_scales=s, a_scales=None,
                global_scale=None, b_zeros=None, g_idx=g_idx, perm=sort_idx,
                workspace=M.marlin_make_workspace(n, device), b_q_type=scalar_types.uint4b8,
                size_m=2, size_n=n, size_k=k)


@pytest.mark.parametrize("change,exc,name", [
    (dict(b_q_type=scalar_types.float8_e4m3fn), MarlinUnsupportedError, "b_q_type"),
    (dict(b_q_type=scalar_types.float4_e2m1f), MarlinUnsupportedError, "b_q_type"),
    (dict(b_q_type=scalar_types.int4), ValueError, "b_q_type"),
    (dict(b_q_type="uint4b8"), TypeError, "b_q_type"),
    (dict(global_scale=torch.ones(1)), MarlinUnsupportedError, "global_scale"),
    (dict(a_scales=torch.ones(2)), MarlinUnsupportedError, "a_scales"),
    (dict(is_zp_float=True), MarlinUnsupportedError, "is_zp_float"),
    (dict(is_k_full=1), TypeError, "is_k_full"),
    (dict(b_zeros=torch.zeros(4, 8, dtype=torch.int32)), ValueError, "b_zeros"),
    (dict(b_q_type=scalar_types.uint4), ValueError, "b_zeros"),
    (dict(size_n=128), ValueError, "b_q_weight"),
    (dict(size_n=96), ValueError, "size_n"),
    (dict(size_k=120), ValueError, "a"),
    (dict(size_m=3), ValueError, "a"),
    (dict(perm=torch.empty(0, dtype=torch.int32)), ValueError, "g_idx and perm"),
    (dict(b_scales=torch.ones(4, 32, dtype=torch.float16)), ValueError, "b_scales"),
    (dict(b_bias=torch.ones(32, dtype=torch.float16)), ValueError, "b_bias"),
    (dict(workspace=None), TypeError, "workspace"),
])
def test_gemm_errors_name_the_argument(small, change, exc, name):
    args = dict(small)
    for key, value in change.items():
        args[key] = value.to(small["a"].device) if isinstance(value, torch.Tensor) else value
    with pytest.raises(exc, match=rf"^{re.escape(name)}\b"):
        M.gptq_marlin_gemm(**args)


def test_gemm_errors_on_values(small):
    dev = small["a"].device
    bad = dict(small, perm=torch.zeros_like(small["perm"]))
    with pytest.raises(ValueError, match="^perm must be a permutation"):
        M.gptq_marlin_gemm(**bad)
    bad = dict(small, g_idx=torch.full_like(small["g_idx"], 99))
    with pytest.raises(ValueError, match=r"^g_idx values must be in \[0, 4\)"):
        M.gptq_marlin_gemm(**bad)
    with pytest.raises(MarlinUnsupportedError, match="^a of dtype"):
        M.gptq_marlin_gemm(**dict(small, a=small["a"].to(torch.int8)))
    with pytest.raises(TypeError, match="^c must have dtype"):
        M.gptq_marlin_gemm(**dict(small, c=torch.empty(2, 64, device=dev)))
    with pytest.raises(TypeError, match="needs b_q_type"):
        M.gptq_marlin_gemm(small["a"], None, small["b_q_weight"])
    err = MarlinUnsupportedError("x")
    assert isinstance(err, NotImplementedError) and isinstance(err, ValueError)


def test_repack_and_helper_errors():
    w = torch.zeros(16, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="^num_bits=3"):
        M.gptq_marlin_repack(w, None, 128, 64, 3)
    with pytest.raises(ValueError, match="^b_q_weight must"):
        M.gptq_marlin_repack(w, None, 256, 64, 4)
    with pytest.raises(ValueError, match="^size_n must"):
        M.gptq_marlin_repack(w, None, 128, 48, 4)
    with pytest.raises(ValueError, match="^size_k must be a multiple of 32"):
        M.gptq_marlin_repack(w[:2], None, 16, 64, 4, is_a_8bit=True)
    with pytest.raises(ValueError, match="^perm must be a permutation"):
        M.gptq_marlin_repack(w, torch.zeros(128, dtype=torch.int32), 128, 64, 4)
    with pytest.raises(TypeError, match="^b_q_weight must"):
        M.awq_marlin_repack(w.float(), 128, 64, 4)
    with pytest.raises(ValueError, match="^q_w values"):
        M.marlin_weights(torch.full((16, 64), 16), 16, 64, 4, M.get_weight_perm(4))
    with pytest.raises(MarlinUnsupportedError, match="^input_dtype"):
        M.marlin_quantize(torch.randn(128, 64), scalar_types.uint4b8, 128, False,
                          input_dtype=torch.int8)
    with pytest.raises(ValueError, match="^quant_type"):
        M.marlin_quantize(torch.randn(128, 64), scalar_types.uint4, 128, False)
    with pytest.raises(ValueError, match="^group_size must be -1"):
        M.marlin_quantize(torch.randn(128, 64), scalar_types.uint4b8, 48, False)
    with pytest.raises(ValueError, match="^group_size must be less.*act_order"):
        M.marlin_quantize(torch.randn(128, 64), scalar_types.uint4b8, -1, True)
