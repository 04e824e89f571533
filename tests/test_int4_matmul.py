"""int4_matmul: every kernel vs dequantize-then-matmul on random shapes, errors, opcheck."""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, kernel_backends, requires_cuda
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import int4 as int4_op

HALF = [torch.float16, torch.bfloat16]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make_case(m, n, k, group_size, dtype, device, bias=True, seed=0, lead=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    g = k if group_size == -1 else group_size
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen).to(dtype)
    w4 = mk.quant.pack_int4(q, scales, zeros, group_size)
    shape = (*(lead or ()), m, k) if lead else (m, k)
    x = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(w4.qweight), to(w4.scales), to(w4.zeros), to(b)


def check_against_dequant(y, x, qweight, scales, zeros, group_size, bias):
    """Kernel = x @ W^T with W rounded to x.dtype, fp32 accumulation, one final rounding.

    Bound: 2 eps * (|x| @ |W|^T + |b|), covering W's rounding to the activation dtype,
    the output's rounding and any fp32 summation order.
    """
    w = mk.ops.reference.dequantize_int4(qweight, scales, zeros, group_size)
    wd = w.to(x.dtype).float()
    ref = x.float() @ wd.t()
    mag = x.float().abs() @ w.abs().t()
    if bias is not None:
        ref = ref + bias.float()
        mag = mag + bias.float().abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "NaN in output (unwritten element?)"
    err = (y.float() - ref).abs()
    bound = 2 * EPS[x.dtype] * mag + 1e-6
    assert torch.all(err <= bound), f"max err {err.max():.3g}, worst ratio " \
        f"{(err / bound).max():.3g}"


def run_backend(backend, *args, path=None, split_k=None):
    if backend == "triton" and path is not None:
        from minikernels.ops.triton import int4_matmul as tri
        x, qw, s, z, gs, b = args
        return tri.int4_matmul(x, qw, s, z, gs, b, path=path, split_k=split_k)
    with mk.use_backend(backend):
        return mk.ops.int4_matmul(*args)


# ----------------------------------------------------------------------- kernels

@pytest.mark.parametrize("path", ["gemm", "gemv"])
@given(m=st.integers(1, 16), n8=st.integers(1, 6), groups=st.integers(1, 3),
       g=st.sampled_from([32, 64, 128, -1]), dtype=st.sampled_from(HALF),
       bias=st.booleans(), split=st.sampled_from([None, 1, 2, 3]))
def test_triton_paths_small_m(device, path, m, n8, groups, g, dtype, bias, split):
    k = (g if g != -1 else 64) * groups
    args = make_case(m, 8 * n8, k, g, dtype, device, bias, seed=m * 31 + n8)
    y = run_backend("triton", *args[:4], g, args[4], path=path, split_k=split)
    check_against_dequant(y, *args[:4], g, args[4])


@given(m=st.integers(17, 80), n8=st.integers(1, 20), k8=st.integers(1, 24),
       dtype=st.sampled_from(HALF), bias=st.booleans())
def test_triton_gemm_odd_shapes(device, m, n8, k8, dtype, bias):
    # odd K (multiple of 8 only) with group size 8 * something that divides it: per channel
    k = 8 * k8
    args = make_case(m, 8 * n8, k, -1, dtype, device, bias, seed=m + k)
    y = run_backend("triton", *args[:4], -1, args[4])
    check_against_dequant(y, *args[:4], -1, args[4])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k,g", [(1, 64, 256, 128), (3, 40, 96, 32), (8, 24, 64, -1),
                                     (16, 136, 256, 64), (9, 16, 96, 48), (1, 8, 8, 8)])
def test_int4_matmul_backends(device, backend, dtype, m, n, k, g):
    if backend == "cuda" and k % 32:
        pytest.skip("the CUDA kernel needs K % 32 == 0 (falls back to Triton otherwise)")
    args = make_case(m, n, k, g, dtype, device)
    y = run_backend(backend, *args[:4], g, args[4])
    check_against_dequant(y, *args[:4], g, args[4])


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_leading_dims_and_empty(device, backend):
    x, qw, s, z, b = make_case(3, 16, 64, 32, torch.float16, device, lead=(2,))
    with mk.use_backend(backend):
        y = mk.ops.int4_matmul(x, qw, s, z, 32, b)
        assert y.shape == (2, 3, 16)
        check_against_dequant(y.reshape(6, 16), x.reshape(6, 64), qw, s, z, 32, b)
        y0 = mk.ops.int4_matmul(x[:, :0], qw, s, z, 32, b)
        assert y0.shape == (2, 0, 16)
        # strided rows (last dim contiguous)
        xs = torch.randn(5, 128, dtype=torch.float16, device=device)[:, :64]
        ys = mk.ops.int4_matmul(xs, qw, s, z, 32)
        check_against_dequant(ys, xs, qw, s, z, 32, None)


def test_reference_backend_matches_spec(device):
    x, qw, s, z, b = make_case(4, 16, 64, 32, torch.bfloat16, device)
    with mk.use_backend("reference"):
        y = mk.ops.int4_matmul(x, qw, s, z, 32, b)
    assert torch.equal(y, mk.ops.reference.int4_matmul(x, qw, s, z, 32, b))


# ------------------------------------------------------------------------ errors

def test_bad_inputs_raise_clear_errors():
    x, qw, s, z, b = make_case(2, 16, 64, 32, torch.float16, "cpu")
    op = mk.ops.int4_matmul
    with pytest.raises(TypeError, match="x"):
        op(x.float(), qw, s, z, 32)
    with pytest.raises(TypeError, match="qweight"):
        op(x, qw.to(torch.int64), s, z, 32)
    with pytest.raises(ValueError, match="x last dim"):
        op(x[:, :32], qw, s, z, 32)
    with pytest.raises(ValueError, match="group_size"):
        op(x, qw, s, z, 24)
    with pytest.raises(TypeError, match="group_size"):
        op(x, qw, s, z, "32")
    with pytest.raises(ValueError, match="scales"):
        op(x, qw, s[:, :1], z, 32)
    with pytest.raises(TypeError, match="zeros"):
        op(x, qw, s, z.to(torch.bfloat16), 32)
    with pytest.raises(ValueError, match="bias"):
        op(x, qw, s, z, 32, bias=b[:8])
    with pytest.raises(ValueError, match="N .*multiple of 8"):
        op(x, qw[:12], s[:12], z[:12], 32)
    # a strided last dim is honoured (a compact copy), not refused
    torch.testing.assert_close(op(x.t().contiguous().t(), qw, s, z, 32), op(x, qw, s, z, 32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        op(x.tolist(), qw, s, z, 32)


def test_opcheck():
    x, qw, s, z, b = make_case(3, 16, 64, 32, torch.float16, "cpu")
    torch.library.opcheck(torch.ops.minikernels.int4_matmul, (x, qw, s, z, 32, b))
    torch.library.opcheck(torch.ops.minikernels.int4_matmul, (x, qw, s, z, -1, None))


def test_dispatch_policy():
    """The CUDA kernel takes M <= 16 with K % 32 == 0 (auto picks it there once a GPU run has
    validated it: backend.CUDA_VALIDATED), larger M -> Triton."""
    x, qw, s, z, _ = make_case(4, 16, 64, 32, torch.float16, "cpu")
    assert int4_op._cuda_ok(x, qw, s, 32)
    assert not int4_op._cuda_ok(torch.randn(17, 64).half(), qw, s, 32)
    assert not int4_op._cuda_ok(torch.randn(4, 40).half(), qw[:, :5], s, 8)  # K % 32


# ------------------------------------------------------------------- AOT / GPU only

def test_large_m_gemm_config_is_compiled_ahead_of_time():
    """The large-M GEMM configs the GPU run times (M=4096, bf16, g128; the sm_90 and sm_80
    tiles) are registered for both archs as tensor-core kernels and pinned in the AOT
    subsets (aot.HOT_PATH_SPECS), so test_aot_compile.py compiles them on every run:
    wgmma on sm_90a, mma.sync on sm_80, no spills. (This replaced a test that compiled
    the sm_90 config in its own subprocess: ~13 s of suite time for the same check.)"""
    from minikernels.ops.triton.aot import HOT_PATH_SPECS
    from minikernels.ops.triton.registry import all_kernels

    by_name = {s.name: s for s in all_kernels()}
    for tile in ("sm90cfg", "sm80cfg"):
        name = f"int4_gemm[bf16,{tile},M=4096,g=128]"
        assert name in HOT_PATH_SPECS and name in by_name, name
        spec = by_name[name]
        assert spec.tensor_core and spec.archs == (80, 90), name
    assert by_name["int4_gemm[bf16,sm90cfg,M=4096,g=128]"].wgmma_expected


@requires_cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 128), (136, 8192, 32), (264, 1056, -1),
                                   (128, 96, 32), (40, 4192, 32), (24, 160, 40)])
def test_cuda_kernel_large_shapes(dtype, m, n, k, g):
    if mk.backend.cuda_extension() is None:
        pytest.skip("minikernels._C not built")
    args = make_case(m, n, k, g, dtype, "cuda", seed=m)
    for backend in ("cuda", "triton"):
        y = run_backend(backend, *args[:4], g, args[4])
        check_against_dequant(y.cpu(), *(a.cpu() for a in args[:4]), g, args[4].cpu())


@requires_cuda
@pytest.mark.parametrize("m", [1, 16, 17, 64, 300])
def test_triton_large_shapes_gpu(m):
    args = make_case(m, 1024, 2048, 128, torch.bfloat16, "cuda", seed=m)
    y = run_backend("triton", *args[:4], 128, args[4])
    check_against_dequant(y.cpu(), *(a.cpu() for a in args[:4]), 128, args[4].cpu())


@requires_cuda
def test_cuda_graph_capture():
    args = make_case(1, 256, 512, 128, torch.float16, "cuda")
    y = mk.ops.int4_matmul(*args[:4], 128, args[4])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = mk.ops.int4_matmul(*args[:4], 128, args[4])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, yg)


_ = HAS_CUDA
