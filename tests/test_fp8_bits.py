"""The software fp8 conversions (minikernels/ops/triton/fp8_bits.py) against torch's
float8_e4m3fn / float8_e5m2: every e4m3 byte decodes to its value / 256 (NaN to NaN);
every fp32 value in range encodes to the byte torch rounds it to (nearest even),
including ties, values just past them, the subnormal range, the subnormal -> normal
carry, +-0 and the largest finite value (448 / 57344)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from minikernels.ops.triton import fp8_bits


@triton.jit
def _decode_kernel(b_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(b_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + offs, fp8_bits.e4m3_bytes_to(b, DTYPE), mask=offs < n)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, E5M2: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    if E5M2:
        b = fp8_bits.e5m2_bytes_from(x)
    else:
        b = fp8_bits.e4m3_bytes_from(x)
    tl.store(out_ptr + offs, b, mask=offs < n)


def _decode(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full(b.shape, 7.0, dtype=dtype, device=b.device)
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                torch.float32: tl.float32}[dtype]
    _decode_kernel[(triton.cdiv(b.numel(), 256),)](b, out, b.numel(), DTYPE=tl_dtype,
                                                    BLOCK=256)
    return out


def _encode(x: torch.Tensor, fmt: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    out = torch.full(x.shape, 0x55, dtype=torch.uint8, device=x.device)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(),
                                                     E5M2=fmt == torch.float8_e5m2, BLOCK=1024)
    return out


@pytest.mark.parametrize("byte_dtype", [torch.uint8, torch.int8])   # weights / KV caches
def test_every_byte_decodes_to_its_value_over_256(device, byte_dtype):
    b = torch.arange(256, dtype=torch.uint8, device=device)
    want = b.view(torch.float8_e4m3fn).float() / fp8_bits.BYTE_SCALE
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = _decode(b.view(byte_dtype), dtype).float()
        nan = want.isnan()
        assert nan.sum() == 2 and got[nan].isnan().all(), dtype
        torch.testing.assert_close(got[~nan], want[~nan], rtol=0, atol=0)
        assert (torch.signbit(got[~nan]) == torch.signbit(want[~nan])).all()  # -0 kept


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_encode_rounds_as_torch_does(device, fmt):
    top = torch.finfo(fmt).max
    finite = torch.arange(256, dtype=torch.uint8).view(fmt).float()
    finite = finite[finite.isfinite()].unique()
    mids = (finite[1:] + finite[:-1]) / 2                    # exact ties (fp32 has room)
    nudged = torch.cat([mids.nextafter(finite[1:]), mids.nextafter(finite[:-1])])
    gen = torch.Generator().manual_seed(0)
    rand = (torch.rand(20000, generator=gen) * 2 - 1) * top
    low = float(finite[finite > 0].min()) * 8                # around the subnormal range
    tiny = (torch.rand(20000, generator=gen) * 2 - 1) * low
    spread = torch.randn(20000, generator=gen) * torch.exp2(
        torch.randint(-20 if fmt == torch.float8_e5m2 else -12, 16, (20000,), generator=gen))
    x = torch.cat([finite, mids, nudged, rand, tiny, spread.clamp(-top, top),
                   torch.tensor([0.0, -0.0, top, -top, 1e-30, low / 8 * 0.49])])
    x = torch.cat([x, -x]).contiguous()
    got = _encode(x.to(device), fmt).cpu()
    want = x.to(fmt).view(torch.uint8)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), got[i].item(), want[i].item()) for i in bad[:8]]


def test_nan_encodes_to_the_nan_byte(device):
    x = torch.tensor([float("nan"), -float("nan"), 1.0], device=device)
    for fmt, one in ((torch.float8_e4m3fn, 0x38), (torch.float8_e5m2, 0x3C)):
        got = _encode(x, fmt).cpu()
        assert got[:2].view(fmt).float().isnan().all() and got[2] == one


def test_only_fp8_caches_on_old_gpus_or_forced_take_bytes():
    cache = torch.zeros(2, 3, dtype=torch.float8_e4m3fn)
    assert not fp8_bits.kv_cache_as_bytes(cache)                  # the CPU: native (interpreter)
    assert not fp8_bits.kv_cache_as_bytes(torch.zeros(2, dtype=torch.bfloat16))
    with fp8_bits.emulated_e4m3():
        assert fp8_bits.kv_cache_as_bytes(cache)
        view = fp8_bits.kernel_view(cache[:, 1:])
        assert view.dtype == torch.int8 and view.stride() == (3, 1)
        assert view.data_ptr() == cache[:, 1:].data_ptr()
        assert not fp8_bits.kv_cache_as_bytes(torch.zeros(2, dtype=torch.float16))
    assert fp8_bits.kernel_view(cache) is cache
