"""write_kv_cache: kernels (Triton; CUDA on a GPU) against the reference, skip slots, errors."""
from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference


def _caches(num_blocks: int, block_size: int, hkv: int, d: int, dtype, device):
    kc = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    return kc, torch.randn_like(kc)


def _tokens(t: int, hkv: int, d: int, dtype, device, strided: bool):
    if strided:  # k, v as views into a fused qkv projection: token stride > Hkv * D
        qkv = torch.randn(t, 3 * hkv, d, dtype=dtype, device=device)
        return qkv[:, hkv:2 * hkv], qkv[:, 2 * hkv:]
    return (torch.randn(t, hkv, d, dtype=dtype, device=device),
            torch.randn(t, hkv, d, dtype=dtype, device=device))


@pytest.mark.parametrize("backend", kernel_backends())
@given(data=st.data())
def test_write_matches_reference(backend, device, data):
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    block_size = data.draw(st.sampled_from([1, 5, 8, 16, 24, 32]))
    hkv = data.draw(st.sampled_from([1, 2, 3]))
    d = data.draw(st.sampled_from([64, 80, 128, 512]))     # 512: Gemma 4's full layers
    num_blocks = data.draw(st.integers(2, 6))
    t = data.draw(st.integers(0, 2 * block_size))
    strided = data.draw(st.booleans())
    idx_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    # distinct slots (a slot written twice has no defined winner), some -1
    perm = torch.randperm(num_blocks * block_size)[:t]
    skip = torch.rand(t) < 0.25
    slots = torch.where(skip, torch.full_like(perm, -1), perm).to(idx_dtype).to(device)
    k, v = _tokens(t, hkv, d, dtype, device, strided)
    kc, vc = _caches(num_blocks, block_size, hkv, d, dtype, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.write_kv_cache(k, v, kc_ref, vc_ref, slots)
    with mk.use_backend(backend):
        mk.ops.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("backend", kernel_backends())
def test_write_round_trip_and_skip(backend, device):
    """Written tokens read back through gather_paged; -1 slots leave the cache untouched."""
    block_size, hkv, d, dtype = 16, 2, 64, torch.bfloat16
    kc, vc = _caches(6, block_size, hkv, d, dtype, device)
    before_k, before_v = kc.clone(), vc.clone()
    row = torch.tensor([4, 1, 3], dtype=torch.int32, device=device)   # the sequence's pages
    length = 40
    pos = torch.arange(length, device=device)
    slots = (row.long()[pos // block_size] * block_size + pos % block_size)
    slots[::7] = -1
    k, v = _tokens(length, hkv, d, dtype, device, strided=True)
    with mk.use_backend(backend):
        mk.ops.write_kv_cache(k, v, kc, vc, slots)
    keep = slots >= 0
    assert torch.equal(reference.gather_paged(kc, row, length)[keep], k[keep])
    assert torch.equal(reference.gather_paged(vc, row, length)[keep], v[keep])
    touched = torch.zeros(kc.shape[0] * block_size, dtype=torch.bool, device=device)
    touched[slots[keep]] = True
    untouched = ~touched.view(kc.shape[0], block_size)
    assert torch.equal(kc[untouched], before_k[untouched])
    assert torch.equal(vc[untouched], before_v[untouched])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("d,hkv", [(512, 4), (320, 3)])
def test_write_wide_head_dims(backend, device, d, hkv):
    """Head dims in (256, 512] (Gemma 4's full layers: 512; 320 pads to a 512 tile):
    strided k / v from a fused qkv row into a cache block size that is not a power of two,
    skips honoured, equal to the reference."""
    kc, vc = _caches(5, 12, hkv, d, torch.bfloat16, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    k, v = _tokens(20, hkv, d, torch.bfloat16, device, strided=True)
    slots = torch.randperm(5 * 12, generator=torch.Generator().manual_seed(d))[:20].to(device)
    slots[3] = -1
    reference.write_kv_cache(k, v, kc_ref, vc_ref, slots)
    with mk.use_backend(backend):
        mk.ops.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("backend", kernel_backends())
def test_write_all_skipped_and_empty(backend, device):
    kc, vc = _caches(2, 8, 1, 64, torch.float16, device)
    before = kc.clone()
    k, v = _tokens(5, 1, 64, torch.float16, device, strided=False)
    with mk.use_backend(backend):
        mk.ops.write_kv_cache(k, v, kc, vc, torch.full((5,), -1, dtype=torch.int32,
                                                       device=device))
        mk.ops.write_kv_cache(k[:0], v[:0], kc, vc,
                              torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("backend", kernel_backends())
def test_write_strided_slot_mapping(backend, device):
    """A slot_mapping view with stride 2 (the kernels index it flat)."""
    kc, vc = _caches(4, 8, 2, 64, torch.float16, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    k, v = _tokens(4, 2, 64, torch.float16, device, strided=False)
    both = torch.tensor([[3, 30], [9, 31], [-1, 0], [17, 1]], device=device)
    slots = both[:, 0]
    assert slots.stride() == (2,)
    reference.write_kv_cache(k, v, kc_ref, vc_ref, slots)
    with mk.use_backend(backend):
        mk.ops.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_write_errors(device):
    kc, vc = _caches(2, 8, 2, 64, torch.float16, device)
    k, v = _tokens(3, 2, 64, torch.float16, device, strided=False)
    ok = torch.tensor([0, 5, -1], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="slot_mapping values must be in"):
        mk.ops.write_kv_cache(k, v, kc, vc, torch.tensor([0, 16, 1], dtype=torch.int32,
                                                         device=device))
    with pytest.raises(ValueError, match="slot_mapping values must be in"):
        mk.ops.write_kv_cache(k, v, kc, vc, torch.tensor([0, -2, 1], dtype=torch.int32,
                                                         device=device))
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        mk.ops.write_kv_cache(k, v, kc, vc, ok.float())
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        mk.ops.write_kv_cache(k, v, kc.bfloat16(), vc.bfloat16(), ok)
    with pytest.raises(ValueError, match="heads"):
        mk.ops.write_kv_cache(k[:, :1], v[:, :1], kc, vc, ok)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        mk.ops.write_kv_cache(k, v, kc, vc, ok[:2])
    with pytest.raises(ValueError, match="block_size"):
        bad = torch.zeros(1, 257, 2, 64, dtype=torch.float16, device=device)
        mk.ops.write_kv_cache(k, v, bad, bad.clone(), ok)
    with pytest.raises(ValueError, match="k_cache must be contiguous in its last dim"):
        wide = torch.zeros(2, 8, 2, 128, dtype=torch.float16, device=device)
        mk.ops.write_kv_cache(k, v, wide[..., ::2], vc, ok)
    with pytest.raises(ValueError, match="k_scale is only for fp8 caches"):
        mk.ops.write_kv_cache(k, v, kc, vc, ok, k_scale=1.0, v_scale=1.0)
    f8 = kc.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_scale is required"):
        mk.ops.write_kv_cache(k, v, f8, f8.clone(), ok)
    with pytest.raises(ValueError, match="v_scale must have 1 .* or 2"):
        mk.ops.write_kv_cache(k, v, f8, f8.clone(), ok, k_scale=1.0,
                              v_scale=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="k_scale must have dtype"):
        mk.ops.write_kv_cache(k, v, f8, f8.clone(), ok, v_scale=1.0,
                              k_scale=torch.ones(2, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        mk.ops.write_kv_cache(k, v, f8, f8.clone(), ok, k_scale=0.0, v_scale=1.0)
    with pytest.raises(TypeError, match="v_cache must have the dtype of k_cache"):
        mk.ops.write_kv_cache(k, v, f8, vc, ok, k_scale=1.0, v_scale=1.0)


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_write_opcheck(backend, device):
    kc, vc = _caches(3, 8, 2, 64, torch.float16, device)
    k, v = _tokens(4, 2, 64, torch.float16, device, strided=False)
    slots = torch.tensor([3, -1, 17, 9], dtype=torch.int64, device=device)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.write_kv_cache, (k, v, kc, vc, slots))
