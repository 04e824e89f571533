"""FP8 (e4m3, and e5m2) KV cache: quantizing write, dequantizing paged decode and paged
prefill.

vLLM's convention: the cache holds fp8(clamp(x / scale, +-448)) (round to nearest even,
saturating) with a float32 scale per tensor or per kv head, and attention reads
stored * scale. The reference (minikernels.ops.reference) defines it; the kernels must write
the same bytes and attend to the same dequantized values.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import kernel_backends
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference
from minikernels.ops.triton import fp8_bits

FP8 = torch.float8_e4m3fn
#: "triton-bytes": the Triton kernels reading and writing the cache as bytes, converting
#: e4m3 in software, as they do on GPUs without e4m3 conversions (A100, sm_80);
#: ":e5m2": the same backend over float8_e5m2 caches (vLLM's "fp8_e5m2")
KERNELS = [*kernel_backends(), "triton-bytes", "triton:e5m2"]   # (e5m2 has no CUDA kernel)
BACKENDS = ["reference", "reference:e5m2", *KERNELS]


def _fmt(backend: str) -> torch.dtype:
    return torch.float8_e5m2 if backend.endswith(":e5m2") else FP8


@contextlib.contextmanager
def _use(backend: str):
    name = backend.removesuffix(":e5m2")
    with mk.use_backend(name.removesuffix("-bytes")), \
            fp8_bits.emulated_e4m3(True if name.endswith("-bytes") else None):
        yield


def _scales(hkv: int, per_head: bool, g: torch.Generator, device) -> tuple:
    n = hkv if per_head else 1
    ks = (torch.rand(n, generator=g) * 0.05 + 0.005).to(device)
    vs = (torch.rand(n, generator=g) * 0.05 + 0.005).to(device)
    return ks, vs


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("backend", KERNELS)
@given(data=st.data())
def test_write_quantizes_like_reference(backend, device, data):
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    hkv = data.draw(st.sampled_from([1, 2, 3]))
    d = data.draw(st.sampled_from([64, 128, 512]))     # 512: Gemma 4's full layers
    block_size = data.draw(st.sampled_from([1, 5, 16]))
    per_head = data.draw(st.booleans())
    fused = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    nb = 6
    t = data.draw(st.integers(0, min(12, nb * block_size)))
    ks, vs = _scales(hkv, per_head, g, device)
    # values spanning the fp8 range, beyond it (saturation) and rounding carries
    k = (torch.randn(t, hkv, d, generator=g) * 8).to(dtype).to(device)
    v = (torch.randn(t, hkv, d, generator=g) * 30).to(dtype).to(device)
    if fused:   # vLLM's [NB, 2, BS, Hkv, D] cache split into k and v views
        kv = torch.zeros(nb, 2, block_size, hkv, d, dtype=_fmt(backend), device=device)
        kc, vc = kv[:, 0], kv[:, 1]
    else:
        kc = torch.zeros(nb, block_size, hkv, d, dtype=_fmt(backend), device=device)
        vc = torch.zeros_like(kc)
    slots = torch.randperm(nb * block_size, generator=g)[:t].to(device)
    if t > 2:
        slots[1] = -1
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.write_kv_cache(k, v, kc_ref, vc_ref, slots, ks, vs)
    with _use(backend):
        mk.ops.write_kv_cache(k, v, kc, vc, slots, k_scale=ks, v_scale=vs)
    assert torch.equal(_bytes(kc), _bytes(kc_ref)) and torch.equal(_bytes(vc), _bytes(vc_ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_rounding_and_saturation(backend, device):
    """Round to nearest even (also where rounding carries into the next binade), saturate
    to +-max * scale (448 e4m3, 57344 e5m2), keep subnormals and signed zeros."""
    fmt = _fmt(backend)
    top = torch.finfo(fmt).max
    vals = torch.tensor([31.6, -31.6, 126.3, 447.0, 448.0, 465.0, 1e6, -1e6, 0.0, -0.0,
                         0.0019, 3 * 2.0 ** -10, 1.0625, 1.1875, 19.0, 17.0, 1.125 + 2**-20,
                         6e4, 2.0 ** -17, 3 * 2.0 ** -17], dtype=torch.float32)
    d = len(vals)
    x = vals.view(1, 1, d)
    x = x.to(device)
    kc = torch.zeros(1, 1, 1, d, dtype=fmt, device=device)
    vc = torch.zeros_like(kc)
    one = torch.ones(1, device=device)
    with _use(backend):
        mk.ops.write_kv_cache(x, -x, kc, vc, torch.zeros(1, dtype=torch.int32, device=device),
                              k_scale=one, v_scale=one)
    want = x.clamp(-top, top).to(fmt).view(1, 1, 1, d)
    assert torch.equal(_bytes(kc), _bytes(want))
    got = kc.float().flatten()
    assert got[6] == top and got[7] == -top and torch.signbit(got[9])     # saturation, -0
    if fmt == FP8:
        assert got[0] == 32.0 and got[1] == -32.0 and got[2] == 128.0   # carries
        assert got[5] == 448.0                                          # saturation
        assert got[12] == 1.0 and got[13] == 1.25 and got[14] == 20.0 and got[15] == 16.0
        assert got[10] == 2.0 ** -9 and got[11] == 2.0 ** -8            # subnormals
    else:   # e5m2: 2 mantissa bits, subnormal step 2^-16
        assert got[0] == 32.0 and got[2] == 128.0 and got[5] == 448.0 and got[17] == 57344.0
        assert got[16] == 1.25                  # just past a tie: rounds up (one rounding)
        assert got[12] == 1.0 and got[14] == 20.0 and got[15] == 16.0   # ties to even
        assert got[18] == 0.0 and got[19] == 2.0 ** -15                 # subnormal ties
    assert torch.equal(vc.float(), -kc.float())


def _fp8_case(lens, hq, hkv, d, block_size, per_head, device, seed=0, fmt=FP8):
    """bf16 q; fp8 caches written through the reference quantizer, their scales, and the
    bf16 caches they were quantized from."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, -(-n // block_size)) for n in lens]
    nb = sum(need) + 2
    pool = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = pool[at:at + n].int()
        at += n
    ks, vs = _scales(hkv, per_head, g, "cpu")
    k16 = (torch.randn(nb, block_size, hkv, d, generator=g) * 3).bfloat16()
    v16 = torch.randn(nb, block_size, hkv, d, generator=g).bfloat16()
    kc = reference.quantize_kv(k16, ks, fmt)
    vc = reference.quantize_kv(v16, vs, fmt)
    q = torch.randn(len(lens), hq, d, generator=g).bfloat16()
    sl = torch.tensor(lens, dtype=torch.int32)
    mv = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return mv(q, kc, vc, table, sl, ks, vs, k16, v16)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_decode_matches_reference(backend, device, data):
    hq, hkv, d = data.draw(st.sampled_from([(4, 2, 64), (8, 1, 128), (2, 2, 128),
                                             (8, 2, 512)]))
    block_size = data.draw(st.sampled_from([1, 7, 16, 32]))
    lens = data.draw(st.lists(st.integers(0, 150), min_size=1, max_size=3))
    per_head = data.draw(st.booleans())
    kw = dict(window_left=data.draw(st.sampled_from([-1, 20])),
              softcap=data.draw(st.sampled_from([0.0, 10.0])),
              num_splits=data.draw(st.sampled_from([0, 1, 3])))
    q, kc, vc, bt, sl, ks, vs, *_ = _fp8_case(lens, hq, hkv, d, block_size, per_head, device,
                                              seed=data.draw(st.integers(0, 999)),
                                              fmt=_fmt(backend))
    with _use(backend):
        out, lse = mk.ops.paged_decode_attention(q, kc, vc, bt, sl, return_lse=True,
                                                 k_scale=ks, v_scale=vs, **kw)
    ref_out, ref_lse = reference.paged_decode_attention(
        q, kc, vc, bt, sl, None, kw["window_left"], kw["softcap"], ks, vs)
    assert_close(out, ref_out, scale=2.0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_prefill_over_fp8_prefix_matches_reference(backend, device, per_head):
    lens_k, lens_q = [40, 9, 70], [5, 9, 1]
    q, kc, vc, bt, _, ks, vs, *_ = _fp8_case(lens_k, 8, 2, 64, 16, per_head, device, seed=3,
                                             fmt=_fmt(backend))
    g = torch.Generator().manual_seed(1)
    qp = torch.randn(sum(lens_q), 8, 64, generator=g).bfloat16().to(device)
    cu_q = torch.tensor([0, 5, 14, 15], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 49, 119], dtype=torch.int32, device=device)
    with _use(backend):
        out, lse = mk.ops.flash_attention(qp, kc, vc, cu_q, cu_k, 9, 70, block_table=bt,
                                          return_lse=True, k_scale=ks, v_scale=vs,
                                          window_left=30, softcap=20.0)
    ref_out, ref_lse = reference.flash_attention(qp, kc, vc, cu_q, cu_k, 9, 70, True, None,
                                                 30, 20.0, bt, -1, ks, vs)
    assert_close(out, ref_out, scale=2.0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_head_dim_write_decode_prefill(backend, device):
    """D = 512 (Gemma 4's full-attention layers) through an fp8 cache: the quantizing write
    gives the reference's bytes, decode (split-KV) and prefill over the fp8 prefix attend
    like the reference, per-head scales."""
    d, hkv, hq = 512, 2, 8
    q, kc, vc, bt, sl, ks, vs, k16, v16 = _fp8_case([33, 7], hq, hkv, d, 16, True, device,
                                                    seed=5, fmt=_fmt(backend))
    slots = torch.arange(0, 10, dtype=torch.int32, device=device) * 3
    new_k, new_v = k16[:1, :10].reshape(10, hkv, d), v16[:1, :10].reshape(10, hkv, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.write_kv_cache(new_k, new_v, kc_ref, vc_ref, slots, ks, vs)
    with _use(backend):
        mk.ops.write_kv_cache(new_k, new_v, kc, vc, slots, k_scale=ks, v_scale=vs)
    assert torch.equal(_bytes(kc), _bytes(kc_ref)) and torch.equal(_bytes(vc), _bytes(vc_ref))
    with _use(backend):
        out, lse = mk.ops.paged_decode_attention(q, kc, vc, bt, sl, return_lse=True,
                                                 k_scale=ks, v_scale=vs, num_splits=2)
    ref_out, ref_lse = reference.paged_decode_attention(q, kc, vc, bt, sl, None, -1, 0.0,
                                                        ks, vs)
    assert_close(out, ref_out, scale=2.0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)
    qp = torch.randn(9, hq, d, generator=torch.Generator().manual_seed(2)).bfloat16()
    qp = qp.to(device)
    cu_q = torch.tensor([0, 5, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 33, 40], dtype=torch.int32, device=device)
    with _use(backend):
        pre, pre_lse = mk.ops.flash_attention(qp, kc, vc, cu_q, cu_k, 5, 33, block_table=bt,
                                              return_lse=True, k_scale=ks, v_scale=vs)
    ref_pre, ref_pre_lse = reference.flash_attention(qp, kc, vc, cu_q, cu_k, 5, 33, True,
                                                     None, -1, 0.0, bt, -1, ks, vs)
    assert_close(pre, ref_pre, scale=2.0)
    torch.testing.assert_close(pre_lse, ref_pre_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("per_head_k", [False, True])
def test_mixed_per_head_and_per_tensor_scales(backend, device, per_head_k):
    """A per-head k_scale with a per-tensor v_scale (or the reverse): each cache uses its
    own scales in the write, decode and prefill kernels (they share one per-head flag,
    so the boundary expands the per-tensor one)."""
    q, kc, vc, bt, sl, ks, vs, k16, v16 = _fp8_case([40, 9], 4, 2, 64, 16, True, device,
                                                    seed=5, fmt=_fmt(backend))
    if per_head_k:
        vs = vs[:1].clone()
    else:
        ks = ks[:1].clone()
    fmt = _fmt(backend)
    kc, vc = reference.quantize_kv(k16, ks, fmt), reference.quantize_kv(v16, vs, fmt)
    k_new, v_new = k16[0, :3].float(), v16[0, :3].float()
    slots = torch.tensor([5, 6, 7], device=device)
    kw_, vw_ = kc.clone(), vc.clone()
    with _use(backend):
        mk.ops.write_kv_cache(k_new, v_new, kw_, vw_, slots, k_scale=ks, v_scale=vs)
        out = mk.ops.paged_decode_attention(q, kc, vc, bt, sl, k_scale=ks, v_scale=vs)
        cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 40, 49], dtype=torch.int32, device=device)
        qp = torch.cat([q, q[:1]])
        pre = mk.ops.flash_attention(qp, kc, vc, cu, cu_k, 2, 40, block_table=bt,
                                     k_scale=ks, v_scale=vs)
    kr, vr = kc.clone(), vc.clone()
    reference.write_kv_cache(k_new, v_new, kr, vr, slots, ks, vs)
    assert torch.equal(_bytes(kw_), _bytes(kr)) and torch.equal(_bytes(vw_), _bytes(vr))
    ref = reference.paged_decode_attention(q, kc, vc, bt, sl, None, -1, 0.0, ks, vs)[0]
    assert_close(out, ref, scale=2.0)
    ref_pre = reference.flash_attention(qp, kc, vc, cu, cu_k, 2, 40, True, None, -1, 0.0,
                                        bt, -1, ks, vs)[0]
    assert_close(pre, ref_pre, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_attention_stays_close_to_bf16(backend, device):
    """Quantization error only: decode over the fp8 cache vs over the bf16 cache it came from."""
    fmt = _fmt(backend)
    q, kc, vc, bt, sl, ks, vs, k16, v16 = _fp8_case([300, 64], 8, 2, 128, 16, True, device,
                                                    fmt=fmt)
    top = torch.finfo(fmt).max                          # calibrated scales: no saturation
    ks.fill_(float(k16.float().abs().amax()) / top)
    vs.fill_(float(v16.float().abs().amax()) / top)
    kc, vc = reference.quantize_kv(k16, ks, fmt), reference.quantize_kv(v16, vs, fmt)
    with _use(backend):
        out8 = mk.ops.paged_decode_attention(q, kc, vc, bt, sl, k_scale=ks, v_scale=vs)
    out16 = reference.paged_decode_attention(q, k16, v16, bt, sl)[0]
    err = (out8.float() - out16.float()).norm() / out16.float().norm()
    # e4m3 keeps 3 mantissa bits, e5m2 2 (twice the rounding step)
    assert err < (0.06 if fmt == FP8 else 0.12), f"relative error {err:.3f}"


# opcheck's test_schema compares inputs with allclose, which torch lacks for fp8 on the CPU
OPCHECKS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_fp8_opcheck(device):
    q, kc, vc, bt, sl, ks, vs, *_ = _fp8_case([9, 40], 4, 2, 64, 16, True, device)
    with mk.use_backend(kernel_backends()[0]):
        torch.library.opcheck(torch.ops.minikernels.paged_decode_attention,
                              (q, kc, vc, bt, sl, 0.125, -1, 0.0, 2, 0, ks, vs),
                              test_utils=OPCHECKS)
        k = torch.randn(3, 2, 64, device=device).bfloat16()
        slots = torch.tensor([0, 5, -1], device=device)
        torch.library.opcheck(torch.ops.minikernels.write_kv_cache,
                              (k, k.clone(), kc.clone(), vc.clone(), slots, ks, vs),
                              test_utils=OPCHECKS)


def test_float_scales_and_errors(device):
    q, kc, vc, bt, sl, ks, vs, *_ = _fp8_case([9], 4, 2, 64, 16, False, device)
    out = mk.ops.paged_decode_attention(q, kc, vc, bt, sl, k_scale=float(ks), v_scale=float(vs))
    assert_close(out, mk.ops.paged_decode_attention(q, kc, vc, bt, sl, k_scale=ks, v_scale=vs))
    with pytest.raises(ValueError, match="k_scale is required"):
        mk.ops.paged_decode_attention(q, kc, vc, bt, sl)
    with pytest.raises(ValueError, match="v_scale must have 1 .* or 2"):
        mk.ops.paged_decode_attention(q, kc, vc, bt, sl, k_scale=ks,
                                      v_scale=torch.ones(4, device=device))
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        mk.ops.paged_decode_attention(q, kc, vc, bt, sl, k_scale=float("nan"), v_scale=vs)
    with pytest.raises(TypeError, match="v_cache must have the dtype of k_cache"):
        mk.ops.paged_decode_attention(q, kc, vc.bfloat16(), bt, sl, k_scale=ks, v_scale=vs)
