"""fp8_matmul (W8A16, e4m3 weight with block scales): kernels vs the reference and vs an
independent fp64 formula on random shapes, block sizes, dtypes and strided views; every
finite e4m3 byte; quantize_fp8; empty shapes; errors; opcheck; torch.compile."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import examples, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from matmul_test_utils import strided

import minikernels as mk
from minikernels._validation import last_dim_contiguous
from minikernels.ops import reference as R

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
FINITE_BYTES = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)


# ----------------------------------------------------------------------- helpers

def e4m3_fp64(weight: torch.Tensor) -> torch.Tensor:
    """Decode float8_e4m3fn bit patterns by hand (not torch's cast): sign, 4-bit exponent
    (bias 7), 3-bit mantissa; exponent 0 is subnormal."""
    b = weight.view(torch.uint8).to(torch.int64)
    sign = 1.0 - 2.0 * (b >> 7).double()
    e = ((b >> 3) & 0xF).double()
    m = (b & 0x7).double()
    mag = torch.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * torch.exp2(e - 7))
    return sign * mag


def expected_fp64(x, weight, scale, block, bias):
    """(y, mag) in fp64: y = x @ W^T + b with W decoded by hand, scales expanded by
    repeat_interleave; mag = |x| @ |W|^T + |b| (the size of the sum, for error bounds)."""
    n, k = weight.shape
    bn, bk = min(block[0], max(n, 1)), min(block[1], max(k, 1))
    s = scale.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    w = e4m3_fp64(weight) * s
    xd = x.double().reshape(-1, k)
    y, mag = xd @ w.t(), xd.abs() @ w.abs().t()
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    return y.reshape(*x.shape[:-1], n), mag.reshape(*x.shape[:-1], n)


def check_fp64(y, x, weight, scale, block, bias):
    """The kernel's error: one rounding of the output (unit u of x.dtype) plus fp32
    accumulation over K (and the per-tile scale products); x and W/256 are exact."""
    ref, mag = expected_fp64(x, weight, scale, block, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "NaN in output (unwritten element?)"
    k = weight.shape[1]
    err = (y.double() - ref).abs()
    bound = 1.01 * UNIT[x.dtype] * ref.abs() + 2 * (k + 8) * 2.0**-24 * mag + 1e-7
    assert torch.all(err <= bound), (f"max err {err.max():.3g}, worst ratio "
                                     f"{(err / bound).max():.3g}")


def random_fp8(n, k, gen, lo=0):
    """Random finite e4m3 bytes (every code, subnormals included)."""
    idx = torch.randint(lo, FINITE_BYTES.numel(), (n, k), generator=gen)
    return FINITE_BYTES[idx].view(torch.float8_e4m3fn)


def make_case(m, n, k, block, dtype, device, bias="x", seed=0, lead=()):
    gen = torch.Generator().manual_seed(seed)
    bn, bk = block
    weight = random_fp8(n, k, gen)
    scale = torch.rand(-(-n // bn), -(-k // bk), generator=gen) / 224 + 1e-3
    x = torch.randn(*lead, m, k, generator=gen).to(dtype)
    b = None
    if bias is not None:
        b = torch.randn(n, generator=gen).to(dtype if bias == "x" else torch.float32)
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(weight), to(scale), to(b)


def run(backend, x, weight, scale, block, bias, path=None, split_k=None):
    if backend == "triton" and path is not None:
        from minikernels.ops.triton import fp8_matmul as tri
        return tri.fp8_matmul(x, weight, scale, block, bias, path=path, split_k=split_k)
    with mk.use_backend(backend):
        return mk.ops.fp8_matmul(x, weight, scale, block, bias)


def _block(kind: str, n: int, k: int, rnd: int) -> tuple[int, int]:
    return {"128x128": (128, 128), "64x32": (64, 32), "channel": (1, k),
            "tensor": (n, k), "16x48": (16, 48), "odd_n": (rnd, 16 * (1 + rnd % 3)),
            "wide": (n + rnd, k + rnd)}[kind]


# ----------------------------------------------------------------------- kernels

def test_e4m3_bits_to_fp16_is_value_over_256():
    """((b & 0x80) << 8) | ((b & 0x7F) << 7) as fp16 bits = e4m3(b) / 256 exactly, for all
    254 finite bytes (normals and subnormals), and converts exactly to bf16."""
    b = FINITE_BYTES.to(torch.int32)
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    h = bits.to(torch.int16).view(torch.float16)     # two's complement keeps the 16 bits
    want = FINITE_BYTES.view(torch.float8_e4m3fn).double()
    assert torch.equal(h.double() * 256, want)
    assert torch.equal(e4m3_fp64(FINITE_BYTES.view(torch.float8_e4m3fn)), want)
    assert torch.equal(h.to(torch.bfloat16).double() * 256, want)
    assert want.abs().min() == 0 and (want.abs() > 0).sum() == 252   # +-0 and 126 pairs


@pytest.mark.parametrize("path", ["gemm", "gemv"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_finite_byte_through_the_kernel(device, dtype, path):
    """W holds each finite byte once; x = I, scale 2^-3 (exact) -> y = W^T exactly."""
    codes = torch.cat([FINITE_BYTES, torch.zeros(2, dtype=torch.uint8)])   # 256 cells
    weight = codes.view(16, 16).view(torch.float8_e4m3fn).to(device)
    scale = torch.full((1, 1), 0.125, device=device)
    x = torch.eye(16, dtype=dtype, device=device)
    y = run("triton", x, weight, scale, (16, 16), None, path=path)
    want = (weight.float() * 0.125).t().to(dtype)
    assert torch.equal(y, want)


@settings(max_examples=examples(40))
@given(m=st.sampled_from([0, 1, 2, 3, 7, 16, 17, 33, 70]), n=st.integers(1, 70),
       k=st.integers(1, 200), kind=st.sampled_from(["128x128", "64x32", "channel", "tensor",
                                                     "16x48", "odd_n", "wide"]),
       rnd=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       bias=st.sampled_from([None, "x", "fp32"]),
       sx=st.sampled_from(["none", "rows", "t", "lead"]), sw=st.sampled_from(["none", "rows", "t"]),
       ss=st.sampled_from(["none", "t", "every2"]), sb=st.sampled_from(["none", "every2"]),
       seed=st.integers(0, 2**16))
def test_fp8_matmul_random(device, m, n, k, kind, rnd, dtype, bias, sx, sw, ss, sb, seed):
    block = _block(kind, n, k, rnd)
    if block[1] % 16 and block[1] < k:
        block = (block[0], k)
    lead = (2,) if sx == "lead" else ()
    x, w, s, b = make_case(m, n, k, block, dtype, device, bias, seed=seed, lead=lead)
    xv = strided(x, "none" if sx == "lead" else sx)
    wv, sv, bv = strided(w, sw), strided(s, ss), strided(b, sb)
    y = run("triton", xv, wv, sv, block, bv)
    assert y.shape == (*lead, m, n)
    check_fp64(y, x, w, s, block, b)
    assert_close(y, R.fp8_matmul(x, w, s, block, b))
    if m <= 16:     # the other path on the same input
        x2 = last_dim_contiguous(xv.reshape(-1, k))     # what the op hands the kernels
        y2 = run("triton", x2, wv, sv, block, bv, path="gemm")
        check_fp64(y2.reshape(y.shape), x, w, s, block, b)


@settings(max_examples=examples(30))
@given(m=st.integers(1, 16), n=st.integers(1, 150), kt=st.integers(1, 12),
       kind=st.sampled_from(["128x128", "64x32", "channel", "16x48"]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       split=st.sampled_from([None, 1, 2, 3, 5]))
def test_decode_split_k(device, m, n, kt, kind, dtype, bias, split):
    """The decode path with every split count: partial sums reduced in a fixed order."""
    k = 16 * kt + (7 if kind == "channel" else 0)
    block = _block(kind, n, k, 1)
    x, w, s, b = make_case(m, n, k, block, dtype, device, "x" if bias else None, seed=m * n + k)
    y = run("triton", x, w, s, block, b, path="gemv", split_k=split)
    check_fp64(y, x, w, s, block, b)
    assert_close(y, R.fp8_matmul(x, w, s, block, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,block", [(40, 136, 256, (128, 128)), (130, 72, 384, (128, 128)),
                                         (70, 40, 256, (1, 256)), (1, 200, 512, (128, 128)),
                                         (16, 72, 256, (64, 64)), (24, 48, 256, (48, 1000))])
def test_aligned_configs(device, dtype, m, n, k, block):
    """The dispatched (16-byte aligned, K % 16 == 0) configs: 128-wide tiles, BLOCK_K 64 or
    128, one scale per K tile or one for all of K; and their unaligned twins (padded rows)."""
    from helpers import spy_launches

    from minikernels.ops.triton import fp8_matmul as tri
    x, w, s, b = make_case(m, n, k, block, dtype, device, seed=m + n)
    kernel = "fp8_gemv_kernel" if m <= 16 else "fp8_gemm_kernel"
    for wv, want in ((w, True), (strided(w, "rows"), False)):
        with spy_launches(tri, kernel, "ALIGNED") as seen:
            y = run("triton", x, wv, s, block, b)
        assert seen == [want]
        check_fp64(y, x, w, s, block, b)
        assert_close(y, R.fp8_matmul(x, w, s, block, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_k_is_deterministic(device, dtype):
    x, w, s, b = make_case(3, 40, 256, (32, 32), dtype, device, seed=5)
    runs = [run("triton", x, w, s, (32, 32), b, path="gemv", split_k=4) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_shapes(device, backend, dtype):
    """M = 0 rows, N = 0 outputs and K = 0 (y = bias, or zeros)."""
    x, w, s, b = make_case(3, 24, 40, (16, 16), dtype, device, lead=(2,))
    y0 = run(backend, x[:, :0], w, s, (16, 16), b)
    assert y0.shape == (2, 0, 24) and y0.dtype == dtype
    yn = run(backend, x, w[:0], s[:0], (16, 16), b[:0])
    assert yn.shape == (2, 3, 0)
    yk = run(backend, x[..., :0], w[:, :0], s[:, :0], (16, 16), b)
    assert torch.equal(yk, b.expand(2, 3, 24))
    yk = run(backend, x[..., :0], w[:, :0], s[:, :0], (16, 16), None)
    assert torch.equal(yk, torch.zeros(2, 3, 24, dtype=dtype, device=device))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_leading_dims_and_expanded_rows(device, backend):
    x, w, s, b = make_case(1, 24, 64, (128, 128), torch.float16, device)
    xe = x.expand(5, 64)                       # row stride 0
    y = run(backend, xe, w, s, [128, 128], b)  # block_size as a list
    check_fp64(y, xe.contiguous(), w, s, (128, 128), b)


def test_reference_dequantize_matches_hand_decoding():
    gen = torch.Generator().manual_seed(1)
    w = random_fp8(37, 50, gen)
    s = torch.rand(3, 4, generator=gen)
    got = R.dequantize_fp8(w, s, (16, 16))
    want = torch.empty(37, 50, dtype=torch.float64)
    for i in range(37):
        for j in range(50):
            want[i, j] = e4m3_fp64(w[i:i + 1, j:j + 1]).item() * s[i // 16, j // 16].item()
    torch.testing.assert_close(got.double(), want, rtol=2**-24, atol=0)


def test_reference_backend_is_the_spec(device):
    x, w, s, b = make_case(4, 16, 64, (8, 32), torch.bfloat16, device)
    with mk.use_backend("reference"):
        y = mk.ops.fp8_matmul(x, w, s, (8, 32), b)
    assert torch.equal(y, R.fp8_matmul(x, w, s, (8, 32), b))


# ------------------------------------------------------------------- quantize_fp8

@given(n=st.integers(1, 70), k=st.integers(1, 90),
       block=st.sampled_from([(128, 128), (16, 32), (1, 1000), (1000, 1000), (5, 7)]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_quantize_fp8(n, k, block, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4).to(dtype)
    w[0, : k // 2] = 0                                           # zero runs / blocks
    q, s = R.quantize_fp8(w, block)
    bn, bk = block
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (-(-n // bn), -(-k // bk))
    assert not torch.isnan(q.float()).any() and bool((s > 0).all())
    d = R.dequantize_fp8(q, s, block).double()
    se = s.double().repeat_interleave(min(bn, n), 0)[:n].repeat_interleave(min(bk, k), 1)[:, :k]
    # round to nearest in e4m3: error <= half a step (2^-4 relative, 2^-10 * scale subnormal)
    err = (d - w.double()).abs()
    assert torch.all(err <= w.double().abs() * 2**-4 * 1.0001 + se * 2**-10 * 1.0001)
    # each block's largest |w| maps to 448 (unless the block is all zero)
    amax = (q.float().abs() * (w != 0)).double()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = amax[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            assert blk.max() in (0.0, 448.0)


def test_quantize_fp8_saturates_and_rounds_to_even():
    # scale = 448 / 448 = 1: values between e4m3 neighbours round to nearest, ties to even
    w = torch.tensor([[448.0, 1.0625, 1.1875, -3.0, 0.0, 2.0**-10, 1.0]])
    q, s = R.quantize_fp8(w, (1, 7))
    assert s.item() == 1.0
    assert q.float().tolist() == [[448.0, 1.0, 1.25, -3.0, 0.0, 0.0, 1.0]]
    q0, s0 = R.quantize_fp8(torch.zeros(3, 5), (2, 2))
    assert torch.equal(q0.float(), torch.zeros(3, 5)) and bool((s0 > 0).all())
    qe, se = R.quantize_fp8(torch.zeros(0, 5), (2, 2))
    assert qe.shape == (0, 5) and se.shape == (0, 3)


def test_quantized_weight_through_the_op(device):
    """quantize_fp8 -> fp8_matmul approximates the dense matmul (the model's use)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen) / 16
    x = torch.randn(5, 256, generator=gen)
    q, s = R.quantize_fp8(w, (16, 128))
    y = run("triton", x.to(device), q.to(device), s.to(device), (16, 128), None)
    dense = x @ w.t()
    assert (y.cpu() - dense).abs().max() < 0.05 * dense.abs().max()


# ------------------------------------------------------------------------ errors

def test_bad_inputs_raise_clear_errors():
    x, w, s, b = make_case(2, 24, 64, (16, 32), torch.float16, "cpu")
    op = mk.ops.fp8_matmul
    with pytest.raises(TypeError, match="x must have dtype"):
        op(x.to(torch.int32), w, s, (16, 32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        op(x.tolist(), w, s, (16, 32))
    with pytest.raises(TypeError, match="weight must have dtype"):
        op(x, w.half(), s, (16, 32))
    with pytest.raises(TypeError, match="weight must have dtype"):
        op(x, w.view(torch.uint8), s, (16, 32))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        op(x, w[0], s, (16, 32))
    with pytest.raises(TypeError, match="weight_scale must have dtype"):
        op(x, w, s.half(), (16, 32))
    with pytest.raises(ValueError, match=r"weight_scale must have shape \[2, 2\]"):
        op(x, w, s[:, :1], (16, 32))
    with pytest.raises(ValueError, match=r"weight_scale must have shape \[1, 2\], got \[2, 2\]"):
        op(x, w, s, (32, 32))          # N = 24 rows: one block of 32
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        op(x, w, s, (16, 64))
    with pytest.raises(ValueError, match="block_size bk .24. must be a multiple of 16"):
        op(x, w, torch.ones(2, 3), (16, 24))
    with pytest.raises(ValueError, match="block_size must be positive"):
        op(x, w, s, (0, 32))
    for bad in ((16,), (16, 32, 1), "16,32", (16.0, 32), (True, 32), 16):
        with pytest.raises(TypeError, match="block_size"):
            op(x, w, s, bad)
    with pytest.raises(ValueError, match="x last dim"):
        op(x[:, :32], w, s, (16, 32))
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, w, s, (16, 32), b[:8])
    with pytest.raises(TypeError, match="bias must have dtype"):
        op(x, w, s, (16, 32), b.bfloat16())
    with pytest.raises(ValueError, match="weight must be on meta"):
        op(x.to("meta"), w, s, (16, 32))
    with pytest.raises(ValueError, match="weight_scale must be on meta"):
        op(x.to("meta"), w.to("meta"), s, (16, 32))
    # bk not a multiple of 16 is fine when one block spans K; fp32 bias with fp16 x is fine
    op(x, w, torch.ones(2, 1), (16, 64), b.float())
    op(x, w, torch.ones(2, 1), (16, 70))


# --------------------------------------------------------------- op contract

def test_opcheck(device):
    x, w, s, b = make_case(3, 24, 64, (16, 32), torch.bfloat16, device)
    for backend in ("reference", "triton"):
        with mk.use_backend(backend):
            # the op takes the weight's bytes (see minikernels/ops/fp8.py)
            torch.library.opcheck(torch.ops.minikernels.fp8_matmul,
                                  (x, w.view(torch.uint8), s, [16, 32], b))
            torch.library.opcheck(torch.ops.minikernels.fp8_matmul,
                                  (x.float(), w.view(torch.uint8), s.new_ones(3, 1), [8, 64], None))


def test_torch_compile_fullgraph(device):
    x, w, s, b = make_case(5, 24, 64, (16, 32), torch.float16, device, lead=(2,))

    def f(x, w, s, b):
        return torch.relu(mk.ops.fp8_matmul(x, w, s, (16, 32), b)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(x, w, s, b)
        want = f(x, w, s, b)
    assert torch.equal(got, want)


def test_block_k_never_straddles_a_scale_block():
    from minikernels.ops.triton.fp8_matmul import block_k_for, gemm_config, gemv_config
    for bk in (16, 32, 48, 64, 80, 128, 144, 256, 384):
        for want in (32, 64, 128, 256):
            b, one = block_k_for(want, bk, 10_000)
            assert not one and bk % b == 0 and 16 <= b <= want
    assert block_k_for(128, 300, 300) == (128, True)
    assert block_k_for(128, 7, 5) == (16, True)
    assert gemm_config(4096, 8192, 8192, 128, 90, False)["BLOCK_K"] == 64
    assert gemm_config(4096, 8192, 8192, 8192, 90, False)["ONE_KBLOCK"]
    assert gemv_config(1, 8192, 8192, 128, 132, None)["SPLIT"] > 1


# ------------------------------------------------------------------- GPU only

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 64, 300])
@pytest.mark.parametrize("n,k,block", [(4096, 4096, (128, 128)), (1000, 2112, (1, 2112)),
                                       (264, 1056, (64, 32)), (130, 4160, (7, 4160))])
def test_large_shapes_gpu(dtype, m, n, k, block):
    x, w, s, b = make_case(m, n, k, block, dtype, "cuda", seed=m)
    y = run("triton", x, w, s, block, b)
    check_fp64(y.cpu(), x.cpu(), w.cpu(), s.cpu(), block, b.cpu())


@requires_cuda
def test_cuda_graph_capture():
    x, w, s, b = make_case(1, 512, 1024, (128, 128), torch.bfloat16, "cuda")
    y = mk.ops.fp8_matmul(x, w, s, (128, 128), b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = mk.ops.fp8_matmul(x, w, s, (128, 128), b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, yg)
