"""int8_matmul (W8A16, uint8 weight with group-wise scales and zero points): both Triton
paths vs the reference and vs an independent fp64 formula on random shapes, group sizes,
dtypes and strided views; the dispatch boundary; split-K; the RTN packer; empty shapes;
errors; opcheck; torch.compile."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import examples, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st
from matmul_test_utils import strided

import minikernels as mk
from minikernels._validation import last_dim_contiguous
from minikernels.ops import reference as R
from minikernels.ops.triton import int8_matmul as tri

HALF = [torch.float16, torch.bfloat16]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# ----------------------------------------------------------------------- helpers

def expected_fp64(x, qweight, scales, zeros, group_size, bias):
    """(y, mag, mag_q) in fp64, written independently of the reference: each column k's
    group is k // G by integer division (G = K for -1), W = (q - z) * s gathered per
    element. mag = |x| @ |W|^T + |b| (the size of the sum); mag_q = |x| @ (|s| (q + |z|))^T
    + |b| (the size of the sums the M = 1 path forms before it subtracts z * sum x)."""
    n, k = qweight.shape
    g = k if group_size == -1 else group_size
    col_group = torch.arange(k) // max(g, 1)
    q = qweight.cpu().to(torch.int64).double()
    s = scales.cpu().double()[:, col_group]
    z = zeros.cpu().double()[:, col_group]
    w = (q - z) * s
    xd = x.cpu().double().reshape(-1, k)
    y, mag, mag_q = xd @ w.t(), xd.abs() @ w.abs().t(), xd.abs() @ (s.abs() * (q + z.abs())).t()
    if bias is not None:
        b = bias.cpu().double()
        y, mag, mag_q = y + b, mag + b.abs(), mag_q + b.abs()
    shape = (*x.shape[:-1], n)
    return y.reshape(shape), mag.reshape(shape), mag_q.reshape(shape)


def check_fp64(y, x, qweight, scales, zeros, group_size, bias):
    """The kernel's error: W rounded once to x.dtype (unit u), the output rounded once,
    fp32 dequantization and accumulation over K."""
    ref, mag, mag_q = expected_fp64(x, qweight, scales, zeros, group_size, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "NaN in output (unwritten element?)"
    u, k = UNIT[x.dtype], qweight.shape[1]
    err = (y.cpu().double() - ref).abs()
    bound = 1.01 * u * ref.abs() + 1.01 * u * mag + 2 * (k + 8) * 2.0**-24 * mag_q + 1e-6
    assert torch.all(err <= bound), (f"max err {err.max():.3g}, worst ratio "
                                     f"{(err / bound).max():.3g}")


def check_reference(y, x, qweight, scales, zeros, group_size, bias):
    """Against the op's reference (fp32 W, unrounded): the same bound, taken twice (the
    reference has its own output rounding)."""
    want = R.int8_matmul(x, qweight, scales, zeros, group_size, bias)
    _, mag, mag_q = expected_fp64(x, qweight, scales, zeros, group_size, bias)
    u, k = UNIT[x.dtype], qweight.shape[1]
    err = (y.cpu().double() - want.cpu().double()).abs()
    bound = 2.02 * u * (want.cpu().double().abs() + mag) + 4 * (k + 8) * 2.0**-24 * mag_q + 1e-6
    assert torch.all(err <= bound), (f"max err {err.max():.3g}, worst ratio "
                                     f"{(err / bound).max():.3g}")


def make_case(m, n, k, group_size, dtype, device, bias="x", zeros="int", seed=0, lead=()):
    """Random uint8 q (every code), positive scales; zeros: "int" (0..255), "sym" (128),
    "real" (any value in [0, 255]); bias None, "x" (x.dtype) or "fp32"."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    groups = 1 if group_size == -1 else k // g
    q = torch.randint(0, 256, (n, k), generator=gen).to(torch.uint8)
    s = (torch.rand(n, groups, generator=gen) * 0.01 + 0.001).to(dtype)
    if zeros == "int":
        z = torch.randint(0, 256, (n, groups), generator=gen).to(dtype)
    elif zeros == "sym":
        z = torch.full((n, groups), 128.0).to(dtype)
    else:
        z = (torch.rand(n, groups, generator=gen) * 255).to(dtype)
    x = torch.randn(*lead, m, k, generator=gen).to(dtype)
    b = None
    if bias is not None:
        b = torch.randn(n, generator=gen).to(dtype if bias == "x" else torch.float32)
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(q), to(s), to(z), to(b)


def run(backend, x, q, s, z, g, b, path=None, split_k=None):
    if backend == "triton" and path is not None:
        return tri.int8_matmul(x, q, s, z, g, b, path=path, split_k=split_k)
    with mk.use_backend(backend):
        return mk.ops.int8_matmul(x, q, s, z, g, b)


# ----------------------------------------------------------------------- kernels

@given(m=st.sampled_from([0, 1, 2, 3, 7, 16, 17, 33]), n=st.integers(1, 70),
       g=st.sampled_from([32, 64, 128, -1]), groups=st.integers(1, 3), kpc=st.integers(1, 200),
       dtype=st.sampled_from(HALF), bias=st.sampled_from([None, "x", "fp32"]),
       zeros=st.sampled_from(["int", "sym", "real"]),
       sx=st.sampled_from(["none", "rows", "t", "lead"]), sw=st.sampled_from(["none", "rows", "t"]),
       seed=st.integers(0, 2**16))
def test_int8_matmul_random(device, m, n, g, groups, kpc, dtype, bias, zeros, sx, sw, seed):
    """Auto dispatch on random shapes (K not a multiple of 16 per channel, any N), every
    argument possibly a view; then the other path on the same input."""
    k = kpc if g == -1 else g * groups
    lead = (2,) if sx == "lead" else ()
    x, q, s, z, b = make_case(m, n, k, g, dtype, device, bias, zeros, seed, lead)
    xv, qv = strided(x, "none" if sx == "lead" else sx), strided(q, sw)
    y = run("triton", xv, qv, s, z, g, b)
    assert y.shape == (*lead, m, n)
    check_fp64(y, x, q, s, z, g, b)
    check_reference(y, x, q, s, z, g, b)
    if 0 < m <= 16:     # the GEMM on the same decode-sized input
        x2 = last_dim_contiguous(xv.reshape(-1, k))     # what the op hands the kernels
        y2 = run("triton", x2, qv, s, z, g, b, path="gemm")
        check_fp64(y2.reshape(y.shape), x, q, s, z, g, b)


@settings(max_examples=examples(20))
@given(m=st.integers(1, 16), n=st.integers(1, 150), g=st.sampled_from([32, 64, 128, -1]),
       kt=st.integers(1, 6), dtype=st.sampled_from(HALF), bias=st.booleans(),
       split=st.sampled_from([None, 1, 2, 3, 5]))
def test_decode_split_k(device, m, n, g, kt, dtype, bias, split):
    """The decode path with every split count: partial sums reduced in a fixed order."""
    k = 16 * kt + 5 if g == -1 else g * kt
    x, q, s, z, b = make_case(m, n, k, g, dtype, device, "x" if bias else None,
                              seed=m * n + k)
    y = run("triton", x, q, s, z, g, b, path="gemv", split_k=split)
    check_fp64(y, x, q, s, z, g, b)
    check_reference(y, x, q, s, z, g, b)


@pytest.mark.parametrize("dtype", HALF)
def test_dispatch_boundary(device, dtype):
    """M <= 16 takes the decode kernel (BLOCK_M 1 at M = 1, else 16), M = 17 the GEMM."""
    with mk.use_backend("triton"), \
            spy_launches(tri, "int8_gemv_kernel", "BLOCK_M") as gemv, \
            spy_launches(tri, "int8_gemm_kernel", "BLOCK_M") as gemm:
        for m in (1, 2, 16, 17):
            x, q, s, z, b = make_case(m, 40, 256, 128, dtype, device, seed=m)
            y = mk.ops.int8_matmul(x, q, s, z, 128, b)
            check_fp64(y, x, q, s, z, 128, b)
    assert gemv == [1, 16, 16] and len(gemm) == 1
    with pytest.raises(ValueError, match="decode path handles M <= 16"):
        run("triton", *make_case(17, 8, 32, 32, dtype, device)[:4], 32, None, path="gemv")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("path", ["gemm", "gemv"])
def test_exact_weights_match_reference_closely(device, dtype, path):
    """Scales powers of two and integer zeros: W is exact in x.dtype, so the kernels
    differ from the reference only by fp32 summation order (and one output rounding)."""
    gen = torch.Generator().manual_seed(3)
    m, n, k, g = (5 if path == "gemv" else 40), 72, 256, 64
    x, q, _, z, b = make_case(m, n, k, g, dtype, device, seed=4)
    s = torch.exp2(-torch.randint(6, 10, (n, k // g), generator=gen).double()).to(dtype)
    s = s.to(device)
    y = run("triton", x, q, s, z, g, b, path=path)
    want = R.int8_matmul(x, q, s, z, g, b)
    ref, mag, _ = expected_fp64(x, q, s, z, g, b)
    err = (y.cpu().double() - want.cpu().double()).abs()
    assert torch.all(err <= 2.02 * UNIT[dtype] * ref.abs() + 2 * k * 2.0**-24 * mag + 1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_decode_split_k_is_deterministic(device, dtype):
    x, q, s, z, b = make_case(3, 40, 256, 32, dtype, device, seed=5)
    runs = [run("triton", x, q, s, z, 32, b, path="gemv", split_k=4) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("m", [1, 16, 40])
def test_aligned_and_unaligned_weights(device, m):
    """A contiguous weight takes the vector-load (ALIGNED) configs; padded rows and a
    transposed buffer the byte-load ones; both match."""
    x, q, s, z, b = make_case(m, 136, 256, 128, torch.float16, device, seed=m)
    kernel = "int8_gemv_kernel" if m <= 16 else "int8_gemm_kernel"
    for qv, want in ((q, True), (strided(q, "rows"), False), (strided(q, "t"), False)):
        with spy_launches(tri, kernel, "ALIGNED") as seen:
            y = run("triton", x, qv, s, z, 128, b)
        assert seen == [want]
        check_fp64(y, x, q, s, z, 128, b)


def test_configs_match_registered_specs():
    """K tiles never straddle a group, and the dispatched 8192^2 configs are the AOT specs."""
    from minikernels.ops.triton.registry import all_kernels
    for g in (16, 32, 48, 64, 80, 128, 144, 256):
        for want in (32, 64, 128, 256):
            b = tri.block_k_for(want, g, 10_000)
            assert g % b == 0 and 16 <= b <= want
    assert tri.block_k_for(128, 300, 300) == 128 and tri.block_k_for(256, 7, 7) == 16
    assert tri.gemv_config(1, 8192, 8192, 128, 132, None)["SPLIT"] > 1
    specs = {s.name: s for s in all_kernels() if s.name.startswith("int8_matmul")}
    for dt in ("fp16", "bf16"):
        for g in (128, 32, -1):
            gg = 8192 if g == -1 else g
            for arch, m in ((90, 64), (90, 4096), (80, 32), (80, 4096)):
                name = f"int8_matmul_gemm[{dt},sm{arch}cfg,M={m},g={g}]"
                if g == -1 and m != 4096:
                    continue
                cfg = tri.gemm_config(m, 8192, 8192, gg, arch)
                assert specs[name].constexprs["BLOCK_K"] == cfg["BLOCK_K"]
                assert specs[name].num_warps == cfg["num_warps"]
                assert specs[name].tensor_core and specs[name].wgmma_expected == (arch >= 90)
            for m in (1, 16):
                cfg = tri.gemv_config(m, 8192, 8192, gg, 132, None)
                spec = specs[f"int8_matmul_gemv[{dt},M={m},g={g}]"]
                assert spec.constexprs["BLOCK_K"] == cfg["BLOCK_K"]
                assert spec.constexprs["SPLIT"] == cfg["SPLIT"]


# ----------------------------------------------------------------- shapes, spec

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", HALF)
def test_empty_shapes(device, backend, dtype):
    """M = 0 rows, N = 0 outputs and K = 0 (per channel: y = bias, or zeros)."""
    x, q, s, z, b = make_case(3, 24, 64, 32, dtype, device, lead=(2,))
    y0 = run(backend, x[:, :0], q, s, z, 32, b)
    assert y0.shape == (2, 0, 24) and y0.dtype == dtype
    yn = run(backend, x, q[:0], s[:0], z[:0], 32, b[:0])
    assert yn.shape == (2, 3, 0)
    yk = run(backend, x[..., :0], q[:, :0], s[:, :1], z[:, :1], -1, b)
    assert torch.equal(yk, b.expand(2, 3, 24))
    yk = run(backend, x[..., :0], q[:, :0], s[:, :1], z[:, :1], -1, None)
    assert torch.equal(yk, torch.zeros(2, 3, 24, dtype=dtype, device=device))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_leading_dims_and_expanded_rows(device, backend):
    x, q, s, z, b = make_case(1, 24, 64, -1, torch.bfloat16, device)
    xe = x.expand(5, 64)                       # row stride 0
    y = run(backend, xe, q, s, z, -1, b)
    check_fp64(y, xe.contiguous(), q, s, z, -1, b)


def test_reference_is_the_spec(device):
    """reference.dequantize_int8 = the layout by hand; the reference backend = the spec."""
    q = torch.tensor([[0, 255, 128, 7]], dtype=torch.uint8)
    s = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    z = torch.tensor([[128.0, 7.5]], dtype=torch.float16)
    w = R.dequantize_int8(q, s, z, 2)      # (a group of 2: the spec alone does not check)
    assert w.tolist() == [[-64.0, 63.5, 241.0, -1.0]]
    x, q, s, z, b = make_case(4, 16, 64, 32, torch.bfloat16, device)
    with mk.use_backend("reference"):
        y = mk.ops.int8_matmul(x, q, s, z, 32, b)
    assert torch.equal(y, R.int8_matmul(x, q, s, z, 32, b))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g", [32, 128, -1])
@pytest.mark.parametrize("dtype", HALF)
def test_quantize_int8_grouped(symmetric, g, dtype):
    """RTN: zeros 128 (symmetric) or integers in 0..255 with 0 representable; every
    element within half a step of the weight, except at the range's ends, where the stored
    scale's rounding (relative u) can push q one past 255 before the clamp: 255 u more."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 256, generator=gen) * 0.05 + (0.02 if not symmetric else 0.0)
    q, s, z = R.quantize_int8_grouped(w.to(dtype), g, symmetric=symmetric)
    groups = 1 if g == -1 else 256 // g
    assert q.dtype == torch.uint8 and q.shape == (24, 256)
    assert s.dtype == z.dtype == dtype and s.shape == z.shape == (24, groups)
    if symmetric:
        assert torch.all(z == 128) and int(q.min()) >= 1
    else:
        assert torch.equal(z.float(), z.float().round()) and 0 <= z.min() and z.max() <= 255
    wd = R.dequantize_int8(q, s, z, g)
    step = s.float().repeat_interleave(256 // groups, dim=1)
    err = (wd - w.to(dtype).float()).abs()
    assert torch.all(err <= (0.5 + 255 * UNIT[dtype]) * step * 1.01 + 1e-7), (err / step).max()
    assert (err <= 0.5 * step * 1.01 + 1e-7).float().mean() > 0.99
    zq = z.to(torch.uint8).repeat_interleave(256 // groups, dim=1)     # q = z -> W = 0
    assert torch.all(R.dequantize_int8(zq, s, z, g) == 0)
    with pytest.raises(ValueError, match="group_size"):
        R.quantize_int8_grouped(w, 24)


def test_quantized_weight_through_the_op(device):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 128, generator=gen) * 0.02
    q, s, z = R.quantize_int8_grouped(w.to(torch.bfloat16), 64)
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
    q, s, z, x = (t.to(device) for t in (q, s, z, x))
    y = run("triton", x, q, s, z, 64, None)
    check_fp64(y, x, q, s, z, 64, None)
    dense = (x.float() @ w.to(device).t()).cpu()
    assert (y.float().cpu() - dense).abs().max() < 0.02 * dense.abs().max()


# ------------------------------------------------------------------------ errors

def test_bad_inputs_raise_clear_errors():
    x, q, s, z, b = make_case(2, 16, 64, 32, torch.float16, "cpu")
    op = mk.ops.int8_matmul
    op(x, q, s, z, 32, b.float())                   # fp32 bias is fine
    with pytest.raises(TypeError, match="x must have dtype"):
        op(x.float(), q, s, z, 32)
    with pytest.raises(TypeError, match="qweight must have dtype"):
        op(x, q.to(torch.int8), s, z, 32)
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        op(x, q[None], s, z, 32)
    with pytest.raises(ValueError, match="x last dim"):
        op(x[:, :32], q, s, z, 32)
    with pytest.raises(ValueError, match="group_size"):
        op(x, q, s, z, 24)
    with pytest.raises(ValueError, match="group_size"):
        op(x, q, s, z, 0)
    with pytest.raises(ValueError, match=r"K \(64\) must be a multiple of group_size \(48\)"):
        op(x, q, s, z, 48)
    with pytest.raises(TypeError, match="group_size must be an int"):
        op(x, q, s, z, "32")
    with pytest.raises(ValueError, match=r"scales must have shape \[16, 2\]"):
        op(x, q, s[:, :1], z, 32)
    with pytest.raises(TypeError, match="scales must have dtype"):
        op(x, q, s.float(), z, 32)
    with pytest.raises(TypeError, match="zeros must have dtype"):
        op(x, q, s, z.to(torch.bfloat16), 32)
    with pytest.raises(ValueError, match=r"zeros must have shape \[16, 2\]"):
        op(x, q, s, z[:8], 32)
    with pytest.raises(ValueError, match=r"bias must have shape \[16\]"):
        op(x, q, s, z, 32, bias=b[:8])
    with pytest.raises(TypeError, match="bias must have dtype"):
        op(x, q, s, z, 32, bias=b.double())
    with pytest.raises(ValueError, match="qweight must be on meta"):
        op(x.to("meta"), q, s, z, 32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        op(x.tolist(), q, s, z, 32)
    # odd N is fine (masked), a strided last dim is honoured (a compact copy)
    op(x, q[:13], s[:13], z[:13], 32)
    torch.testing.assert_close(op(x.t().contiguous().t(), q, s, z, 32), op(x, q, s, z, 32))


# --------------------------------------------------------------- op contract

def test_opcheck(device):
    x, q, s, z, b = make_case(3, 24, 64, 32, torch.bfloat16, device)
    for backend in ("reference", "triton"):
        with mk.use_backend(backend):
            torch.library.opcheck(torch.ops.minikernels.int8_matmul, (x, q, s, z, 32, b))
            torch.library.opcheck(torch.ops.minikernels.int8_matmul,
                                  (x, q, s[:, :1].contiguous(), z[:, :1].contiguous(), -1,
                                   None))


def test_torch_compile_fullgraph(device):
    x, q, s, z, b = make_case(5, 24, 64, 32, torch.float16, device, lead=(2,))

    def f(x, q, s, z, b):
        return torch.relu(mk.ops.int8_matmul(x, q, s, z, 32, b)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, q, s, z, b)
        want = f(x, q, s, z, b)
    assert torch.equal(got, want)


# ------------------------------------------------------------------- GPU only

@requires_cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 64, 300])
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 128), (1000, 2112, -1), (264, 1056, 32),
                                   (130, 4160, 64)])
def test_large_shapes_gpu(dtype, m, n, k, g):
    x, q, s, z, b = make_case(m, n, k, g, dtype, "cuda", seed=m)
    y = run("triton", x, q, s, z, g, b)
    check_fp64(y, x, q, s, z, g, b)


@requires_cuda
def test_cuda_graph_capture():
    x, q, s, z, b = make_case(1, 512, 1024, 128, torch.bfloat16, "cuda")
    y = mk.ops.int8_matmul(x, q, s, z, 128, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = mk.ops.int8_matmul(x, q, s, z, 128, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, yg)
