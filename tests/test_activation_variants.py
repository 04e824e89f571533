"""fatrelu_and_mul, swigluoai_and_mul and the pointwise GELU variants (gelu_fast / gelu_new /
gelu_quick): the Triton kernels against the fp32 reference over many shapes (empty, one
row, odd widths, > one 1024-column block), dtypes and row-strided views; the reference
against the formulas written the way vLLM's layers and transformers write them; and the
vLLM compat out-parameter forms."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.compat import vllm_ops
from minikernels.ops import reference as ref

ROWS = st.sampled_from([0, 1, 3, 7])
WIDTH = st.sampled_from([1, 8, 33, 100, 1030])
dtypes = st.sampled_from(DTYPES)


def _x(rows, width, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(rows, width, generator=g)).to(device, dtype)


@given(rows=ROWS, inter=WIDTH, dtype=dtypes, threshold=st.sampled_from([0.0, 0.37, -1.0]),
       seed=st.integers(0, 2**31))
def test_fatrelu_and_mul_matches_reference(device, rows, inter, dtype, threshold, seed):
    x = _x(rows, 2 * inter, dtype, device, seed)
    with mk.use_backend("triton"):
        y = mk.ops.fatrelu_and_mul(x, threshold)
    assert y.shape == (rows, inter) and y.dtype == dtype
    assert_close(y, ref.fatrelu_and_mul(x, threshold))


@given(rows=ROWS, inter=WIDTH, dtype=dtypes, params=st.sampled_from([(1.702, 7.0),
                                                                     (1.0, 0.5)]),
       seed=st.integers(0, 2**31))
def test_swigluoai_and_mul_matches_reference(device, rows, inter, dtype, params, seed):
    x = _x(rows, 2 * inter, dtype, device, seed, scale=6.0)     # past the clamp too
    with mk.use_backend("triton"):
        y = mk.ops.swigluoai_and_mul(x, *params)
    assert y.shape == (rows, inter) and y.dtype == dtype
    assert_close(y, ref.swigluoai_and_mul(x, *params))


@given(rows=ROWS, width=WIDTH, dtype=dtypes,
       kind=st.sampled_from(["gelu_fast", "gelu_new", "gelu_quick"]),
       seed=st.integers(0, 2**31))
def test_gelu_variants_match_reference(device, rows, width, dtype, kind, seed):
    x = _x(rows, width, dtype, device, seed)
    with mk.use_backend("triton"):
        y = mk.ops.gelu_variant(x, kind)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, ref.gelu_variant(x, kind))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_formulas_as_vllm_and_transformers_write_them(backend, device):
    """Against the formulas of vLLM's layers' forward_native (FatreluAndMul, SwigluOAIAndMul
    on interleaved columns, FastGELU, NewGELU, QuickGELU) and transformers' ACT2FN, with
    saturating inputs, a row-strided view and 3-D input, in fp32."""
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 4, 2, 64, generator=g).to(device) * 4
    big[0, 0, 0, :8] = torch.tensor([-30.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 30.0, 80.0])
    x = big[:, :, 0, :]                                     # [3, 4, 64], rows strided
    gate, up = x[..., :32], x[..., 32:]
    with mk.use_backend(backend):
        fat = mk.ops.fatrelu_and_mul(x, 0.5)
        oai = mk.ops.swigluoai_and_mul(x)
        fast, new, quick = mk.ops.gelu_fast(x), mk.ops.gelu_new(x), mk.ops.gelu_quick(x)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fat, torch.nn.functional.threshold(gate, 0.5, 0.0) * up, **tol)
    g2, u2 = x[..., 0::2].clamp(max=7.0), x[..., 1::2].clamp(-7.0, 7.0)
    torch.testing.assert_close(oai, (u2 + 1) * (g2 * torch.sigmoid(g2 * 1.702)), **tol)
    torch.testing.assert_close(
        fast, 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
        **tol)
    torch.testing.assert_close(new, ACT2FN["gelu_new"](x), **tol)
    torch.testing.assert_close(quick, ACT2FN["quick_gelu"](x), **tol)
    assert fast.isfinite().all() and new.isfinite().all() and quick.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vllm_compat_out_parameters(device, dtype):
    """vllm_ops' out-first forms write the caller's tensor (a strided view included), with
    vLLM's defaults (fatrelu threshold 0, swigluoai alpha 1.702 / limit 7)."""
    x = _x(5, 48, dtype, device, 3)
    buf = torch.full((5, 2, 24), float("nan"), dtype=dtype, device=device)
    out = buf[:, 1]                                         # a strided out
    vllm_ops.fatrelu_and_mul(out, x)
    assert_close(out, ref.fatrelu_and_mul(x, 0.0))
    assert buf[:, 0].isnan().all()
    vllm_ops.swigluoai_and_mul(out, x, 1.702, 7.0)
    assert_close(out, ref.swigluoai_and_mul(x, 1.702, 7.0))
    for name in ("gelu_fast", "gelu_new", "gelu_quick"):
        full = torch.empty_like(x)
        getattr(vllm_ops, name)(full, x)
        assert_close(full, ref.gelu_variant(x, name))
    with pytest.raises(ValueError, match="out must have shape"):
        vllm_ops.gelu_quick(torch.empty(5, 47, dtype=dtype, device=device), x)
    with pytest.raises(ValueError, match="out must have shape"):
        vllm_ops.fatrelu_and_mul(torch.empty(5, 48, dtype=dtype, device=device), x, 0.1)


def test_opcheck(device):
    x = torch.randn(3, 2, 20, device=device)
    for backend in ("reference", "triton"):
        with mk.use_backend(backend):
            torch.library.opcheck(torch.ops.minikernels.fatrelu_and_mul, (x, 0.2))
            torch.library.opcheck(torch.ops.minikernels.swigluoai_and_mul, (x, 1.702, 7.0))
            torch.library.opcheck(torch.ops.minikernels.gelu_variant, (x, "gelu_quick"))
