"""Block-wise FP8 W8A8 (vLLM's per_token_group_quant_fp8 + w8a8_block_fp8_matmul): the
Triton kernels vs the reference and an independent fp64 formula, on random shapes, block
sizes, output dtypes and strided views of every tensor argument; the quantizer bit for
bit (random data, the +-448 boundary, round-to-nearest-even ties, all-zero groups, UE8M0
scales), vLLM's native formula, scale layouts; opcheck, torch.compile, errors, and the
end-to-end quantize -> matmul check vLLM does."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import fp8_w8a8 as fp8_op
from minikernels.ops import reference

FP8 = torch.float8_e4m3fn
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IN_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BLOCKS = [[128, 128], [64, 64], [32, 64]]
# one unit in the last place relative to the value (rounding to the output dtype)
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rand_fp8(shape, gen, spread: float = 1.0) -> torch.Tensor:
    """Random fp8 values over much of e4m3's range (subnormals to 448)."""
    v = torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape, generator=gen) * 2)
    return (v * 16 * spread).clamp(-448, 448).to(FP8)


def poisoned_view(t: torch.Tensor, gen: torch.Generator, mode: str) -> torch.Tensor:
    """t's values in a view of a larger NaN-filled tensor (padded rows, offset start):
    "rows" row-major with padded rows; "cols" column-major storage; "step" a strided
    last dim; "plain" t itself. A kernel reading outside the view meets NaN."""
    if mode == "plain" or t.dim() != 2:
        return t
    r, c = t.shape
    fill = torch.tensor(float("nan")).to(t.dtype)     # fp8: 0x7F, e4m3fn's NaN
    if mode == "rows":
        big = fill.repeat(r + 2, c + 5)
        view = big[1:1 + r, 3:3 + c]
    elif mode == "cols":
        big = fill.repeat(c + 3, r + 2)
        view = big[1:1 + c, 2:2 + r].t()
    else:  # step
        big = fill.repeat(r + 1, 2 * c + 3)
        view = big[1:, 1:1 + 2 * c:2]
    view.copy_(t)
    assert view.shape == t.shape
    return view


def exact_fp64(A, B, As, Bs, block_size) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-scaled product in fp64 by padding K to whole blocks (independent of the
    reference's loop), and its magnitude sum_j |partial_j| * |scale_j| for error bounds."""
    bn, bk = block_size
    m, k = A.shape
    n = B.shape[0]
    kb = cdiv(k, bk)
    a = torch.zeros(m, kb * bk, dtype=torch.float64)
    b = torch.zeros(n, kb * bk, dtype=torch.float64)
    a[:, :k] = A.double()
    b[:, :k] = B.double()
    part = torch.einsum("mjk,njk->mnj", a.view(m, kb, bk), b.view(n, kb, bk))
    mag = torch.einsum("mjk,njk->mnj", a.abs().view(m, kb, bk), b.abs().view(n, kb, bk))
    scale = As.double()[:, None, :] * Bs.double()[torch.arange(n) // bn][None, :, :]
    return (part * scale).sum(-1), (mag * scale.abs()).sum(-1)


def check_matmul(c: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor, k: int,
                 out_dtype: torch.dtype) -> None:
    """|c - exact| <= 1 ulp of the output dtype + the fp32 summation bound (K terms)."""
    assert c.dtype == out_dtype and c.shape == exact.shape
    c64 = c.double()
    assert not torch.isnan(c64).any(), "NaN in output (unwritten element or read past a view?)"
    bound = ULP[out_dtype] * exact.abs() + (k + 2) * 2.0**-24 * mag + 2.0**-24
    err = (c64 - exact).abs()
    assert torch.all(err <= bound), \
        f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def make_matmul_case(m, n, k, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    bn, bk = block_size
    A = rand_fp8((m, k), gen)
    B = rand_fp8((n, k), gen)
    As = torch.rand(m, cdiv(k, bk), generator=gen) * 1e-2 + 1e-4
    Bs = torch.rand(cdiv(n, bn), cdiv(k, bk), generator=gen) * 1e-2 + 1e-4
    return A, B, As, Bs


def run(backend, *args, **kw):
    with mk.use_backend(backend):
        return mk.ops.w8a8_block_fp8_matmul(*args, **kw)


# ------------------------------------------------------------------------ matmul

VIEWS = ["plain", "rows", "cols", "step"]


@given(m=st.sampled_from([0, 1, 2, 5, 16, 17, 33]), n=st.integers(1, 150),
       k=st.integers(1, 300), block=st.sampled_from(BLOCKS),
       out_dtype=st.sampled_from(OUT_DTYPES), va=st.sampled_from(VIEWS),
       vb=st.sampled_from(VIEWS), vas=st.sampled_from(VIEWS), vbs=st.sampled_from(VIEWS),
       seed=st.integers(0, 2**16))
def test_matmul_random_shapes_and_views(device, m, n, k, block, out_dtype, va, vb, vas, vbs,
                                        seed):
    A, B, As, Bs = make_matmul_case(m, n, k, block, seed)
    exact, mag = exact_fp64(A, B, As, Bs, block)
    gen = torch.Generator().manual_seed(seed + 1)
    views = [poisoned_view(t, gen, v) for t, v in ((A, va), (B, vb), (As, vas), (Bs, vbs))]
    args = [t.to(device) for t in views]
    c = run("triton", *args, block, out_dtype)
    check_matmul(c.cpu(), exact, mag, k, out_dtype)
    ref = reference.w8a8_block_fp8_matmul(A, B, As, Bs, block, out_dtype)
    check_matmul(ref, exact, mag, k, out_dtype)


@pytest.mark.parametrize("arg", ["A", "B", "As", "Bs"])
@pytest.mark.parametrize("mode", ["rows", "cols", "step"])
def test_matmul_each_argument_strided(device, arg, mode):
    """Each tensor argument alone as a NaN-padded view (row padding, column-major storage,
    a strided last dim), K spanning several tiles: equal to the fp32 reference."""
    block = [32, 64]
    case = dict(zip(["A", "B", "As", "Bs"], make_matmul_case(5, 70, 200, block, seed=9)))
    exact, mag = exact_fp64(*case.values(), block)
    case[arg] = poisoned_view(case[arg], torch.Generator().manual_seed(0), mode)
    c = run("triton", *[t.to(device) for t in case.values()], block, torch.float32)
    check_matmul(c.cpu(), exact, mag, 200, torch.float32)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("k", [256, 200])          # K a multiple of bk, and not
def test_matmul_large_m_tile_config(device, block, k):
    """M > 64 takes the 128 x 128 tile config."""
    A, B, As, Bs = make_matmul_case(130, 72, k, block, seed=k)
    exact, mag = exact_fp64(A, B, As, Bs, block)
    c = run("triton", A.to(device), B.to(device), As.to(device), Bs.to(device), block,
            torch.bfloat16)
    check_matmul(c.cpu(), exact, mag, k, torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matmul_leading_dims_and_empty(device, backend):
    block = [32, 64]
    A, B, As, Bs = make_matmul_case(6, 40, 128, block, seed=3)
    A3, As3 = A.view(2, 3, 128), As.view(2, 3, 2)
    to = (lambda *ts: [t.to(device) for t in ts])
    c = run(backend, *to(A3, B, As3, Bs), block, output_dtype=torch.float32)
    assert c.shape == (2, 3, 40)
    exact, mag = exact_fp64(A, B, As, Bs, block)
    check_matmul(c.reshape(6, 40).cpu(), exact, mag, 128, torch.float32)
    c0 = run(backend, *to(A3[:, :0], B, As3[:, :0], Bs), block)
    assert c0.shape == (2, 0, 40) and c0.dtype == torch.float16
    c1 = run(backend, *to(A[0], B, As[0], Bs), block)       # a single 1-D token
    assert c1.shape == (40,)
    check_matmul(c1[None].cpu(), exact[:1], mag[:1], 128, torch.float16)


def test_reference_backend_is_the_spec():
    A, B, As, Bs = make_matmul_case(4, 24, 96, [32, 64], seed=1)
    c = run("reference", A, B, As, Bs, [32, 64], torch.bfloat16)
    assert torch.equal(c, reference.w8a8_block_fp8_matmul(A, B, As, Bs, [32, 64],
                                                          torch.bfloat16))


def test_matmul_matches_vllm_native_formula():
    """vLLM's native_w8a8_block_matmul (tiles of A and B, C_tile += (a @ b.T) * (As * Bs))
    written out here: equal to the reference bit for bit in fp32."""
    A, B, As, Bs = make_matmul_case(5, 70, 200, [32, 64], seed=7)
    bn, bk = 32, 64
    c = torch.zeros(5, 70)
    for i in range(cdiv(200, bk)):
        for j in range(cdiv(70, bn)):
            a = A[:, i * bk:(i + 1) * bk].float()
            b = B[j * bn:(j + 1) * bn, i * bk:(i + 1) * bk].float()
            c[:, j * bn:(j + 1) * bn] += (a @ b.t()) * (As[:, i:i + 1] * Bs[j][i])
    ref = reference.w8a8_block_fp8_matmul(A, B, As, Bs, [bn, bk], torch.float32)
    torch.testing.assert_close(ref, c, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------- quantization

def vllm_native_quant(x: torch.Tensor, group_size: int, eps: float = 1e-10):
    """vLLM's native_per_token_group_quant_fp8, written out (absmax clamped in x's dtype)."""
    x_ = x.reshape(x.numel() // group_size, group_size)
    amax = x_.abs().max(dim=-1, keepdim=True)[0].clamp(min=eps).to(torch.float32)
    x_s = amax / 448.0
    x_q = (x_ / x_s).clamp(min=-448.0, max=448.0).to(FP8)
    return x_q.reshape(x.shape), x_s.reshape(*x.shape[:-1], x.shape[-1] // group_size)


def quant(backend, x, group_size, **kw):
    with mk.use_backend(backend):
        return mk.ops.per_token_group_quant_fp8(x, group_size, **kw)


def assert_bits_equal(q: torch.Tensor, ref: torch.Tensor) -> None:
    assert q.dtype == FP8 and q.shape == ref.shape
    diff = q.view(torch.uint8) != ref.view(torch.uint8)
    assert not diff.any(), f"{int(diff.sum())} fp8 values differ, e.g. got " \
        f"{q[diff][:4].float().tolist()} want {ref[diff][:4].float().tolist()}"


def random_activations(shape, dtype, gen):
    v = torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape, generator=gen) * 3)
    return v.to(dtype)


@given(rows=st.integers(0, 40), groups=st.integers(1, 4),
       group_size=st.sampled_from([128, 64, 32, 48, 16]), dtype=st.sampled_from(IN_DTYPES),
       layout=st.sampled_from(["row", "col", "tma"]), view=st.sampled_from(["plain", "rows",
                                                                              "step"]),
       seed=st.integers(0, 2**16))
def test_quant_bit_exact_random(device, rows, groups, group_size, dtype, layout, view, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_activations((rows, groups * group_size), dtype, gen)
    if rows > 2:
        x[1, :group_size] = 0                                  # an all-zero group: eps
    ref_q, ref_s = reference.per_token_group_quant_fp8(x, group_size)
    xv = poisoned_view(x, gen, view).to(device)
    q, s = quant("triton", xv, group_size, column_major_scales=layout != "row",
                 tma_aligned_scales=layout == "tma")
    assert_bits_equal(q.cpu(), ref_q)
    assert s.dtype == torch.float32 and torch.equal(s.cpu(), ref_s)
    if layout != "row" and rows > 1 and groups > 1:      # column-major storage
        assert s.stride() == (1, cdiv(rows, 4) * 4 if layout == "tma" else rows)


@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_quant_reference_matches_vllm_native(dtype):
    gen = torch.Generator().manual_seed(0)
    x = random_activations((33, 512), dtype, gen)
    q, s = reference.per_token_group_quant_fp8(x, 128)
    vq, vs = vllm_native_quant(x, 128)
    assert_bits_equal(q, vq)
    assert torch.equal(s, vs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_quant_properties(device, backend, dtype):
    """x_s = max|x| / 448 exactly; the absmax element maps to +-448; x_q * x_s ~= x
    (e4m3: 2^-4 relative, subnormal steps 2^-9 * x_s); all-zero groups give 0 and eps/448."""
    gen = torch.Generator().manual_seed(1)
    x = random_activations((9, 256), dtype, gen)
    x[4, 128:] = 0
    q, s = quant(backend, x.to(device), 128)
    q, s = q.cpu().float(), s.cpu()
    groups = x.float().view(9, 2, 128)
    absmax = groups.abs().amax(-1)
    want_s = torch.where(absmax > 0, absmax, torch.tensor(1e-10)) / 448.0
    assert torch.equal(s, want_s)
    assert torch.all(q.view(9, 2, 128).abs().amax(-1)[absmax > 0] == 448)
    assert torch.all(q[4, 128:] == 0) and s[4, 1] == torch.tensor(1e-10) / 448
    deq = q.view(9, 2, 128) * s[..., None]
    err = (deq - groups).abs()
    assert torch.all(err <= groups.abs() * 2.0**-4 + s[..., None] * 2.0**-10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_quant_boundary_and_ties(device, backend, dtype):
    """absmax = 448 gives x_s = 1: every value quantizes as itself, so exact fp8 midpoints
    (ties, to even) and values just above / below 448 are checked against torch's cast;
    a group whose x / x_s lands just above 448 must saturate, not become NaN."""
    grid = torch.arange(0, 126, dtype=torch.uint8).view(FP8).float()     # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mids, -mids, grid, -grid, torch.tensor([447.9, -447.9, 440.0, 432.0])])
    rows = cdiv(vals.numel(), 127)
    x = torch.zeros(rows * 127)
    x[:vals.numel()] = vals
    x = torch.cat([torch.full((rows, 1), 448.0), x.view(rows, 127)], 1)   # absmax 448
    x = x.to(dtype)                      # every value here is exact in fp16 / bf16
    q, s = quant(backend, x.to(device), 128)
    assert torch.all(s.cpu() == 1.0)
    assert_bits_equal(q.cpu(), x.float().to(FP8))
    # x / x_s above 448 by rounding: absmax values that do not divide evenly by 448
    y = torch.tensor([[1e-3 * 3.3, -1e-3 * 3.3 * 0.9999], [6.1e4, -6.1e4]]).to(dtype)
    y = y.repeat_interleave(64, dim=1)
    qy, _ = quant(backend, y.to(device), 128)
    assert torch.all(qy.cpu().float().abs() <= 448) and not torch.isnan(qy.cpu().float()).any()
    assert_bits_equal(qy.cpu(), reference.per_token_group_quant_fp8(y, 128)[0])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quant_eps_ue8m0_and_leading_dims(device, backend):
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(2, 3, 128, generator=gen) - 0.5).to(torch.bfloat16)   # |x| < 1
    q, s = quant(backend, x.to(device), 64, eps=1.0)          # eps dominates every group
    assert q.shape == (2, 3, 128) and s.shape == (2, 3, 2)
    assert torch.all(s.cpu() == torch.tensor(1.0) / 448)
    q8, s8 = quant(backend, x.to(device), 64, use_ue8m0=True)
    ref_q, ref_s = reference.per_token_group_quant_fp8(x, 64, use_ue8m0=True)
    assert_bits_equal(q8.cpu(), ref_q)
    assert torch.equal(s8.cpu(), ref_s)
    mant, _ = torch.frexp(s8.cpu())
    assert torch.all(mant == 0.5)                              # powers of two
    plain = reference.per_token_group_quant_fp8(x, 64)[1]
    assert torch.all((s8.cpu() >= plain) & (s8.cpu() < 2 * plain))
    _, sc = quant(backend, x.to(device), 64, column_major_scales=True)
    assert sc.shape == (2, 3, 2) and torch.equal(sc.cpu(), plain)
    q0, s0 = quant(backend, x[:, :0].to(device), 64)
    assert q0.shape == (2, 0, 128) and s0.shape == (2, 0, 2)
    # a group size that is not a power of two (the kernel pads the tile and masks)
    y = random_activations((5, 192), torch.float16, gen)
    q48, s48 = quant(backend, y.to(device), 48)
    ref_q, ref_s = reference.per_token_group_quant_fp8(y, 48)
    assert_bits_equal(q48.cpu(), ref_q)
    assert torch.equal(s48.cpu(), ref_s)


# ------------------------------------------------------------------------ end to end

def block_quant_weight(w: torch.Tensor, bn: int, bk: int):
    """Per-block fp8 weight (vLLM's per_block_cast_to_fp8): absmax / 448 per bn x bk block."""
    n, k = w.shape
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    pad = torch.zeros(nb * bn, kb * bk)
    pad[:n, :k] = w.float()
    blocks = pad.view(nb, bn, kb, bk)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-10) / 448.0
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).to(FP8)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), s


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_end_to_end_quantized_linear(device, backend):
    """Quantize bf16 activations per token group and a weight per 128 x 128 block, multiply,
    and compare with the bf16 matmul of the dequantized tensors (vLLM's rel-diff check) and
    with the unquantized bf16 matmul (fp8 quantization error)."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 33, 200, 384
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    wq, ws = block_quant_weight(w, 128, 128)
    with mk.use_backend(backend):
        xq, xs = mk.ops.per_token_group_quant_fp8(x.to(device), 128)
        y = mk.ops.w8a8_block_fp8_matmul(xq, wq.to(device), xs, ws.to(device), [128, 128],
                                         output_dtype=torch.bfloat16)
    y = y.cpu().float()
    x_dq = (xq.cpu().float().view(m, 3, 128) * xs.cpu()[..., None]).view(m, k)
    w_dq = wq.float() * ws.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    ref = (x_dq.to(torch.bfloat16) @ w_dq.to(torch.bfloat16).t()).float()
    rel = (y - ref).abs().mean() / ref.abs().mean()
    assert rel < 4e-3, rel
    dense = (x @ w.t()).float()
    rel_dense = (y - dense).abs().mean() / dense.abs().mean()
    assert rel_dense < 0.06, rel_dense


# -------------------------------------------------------------- contract and errors

# torch's schema check compares each input before and after the call with allclose,
# which fp8 tensors lack; the inputs are compared bit for bit here instead
FP8_INPUT_OPCHECK = ("test_autograd_registration", "test_faketensor",
                     "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(device, backend):
    A, B, As, Bs = make_matmul_case(3, 40, 96, [32, 64], seed=4)
    to = (lambda *ts: [t.to(device) for t in ts])
    x = random_activations((3, 128), torch.bfloat16, torch.Generator().manual_seed(0))
    args = (*to(A, B, As.t().contiguous().t(), Bs), [32, 64], torch.bfloat16)
    before = [t.clone() for t in args[:4]]
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.minikernels.w8a8_block_fp8_matmul, args,
                              test_utils=FP8_INPUT_OPCHECK)
        torch.ops.minikernels.w8a8_block_fp8_matmul(*args)
        for old, new in zip(before, args[:4]):
            assert torch.equal(old.view(torch.uint8) if old.dtype == FP8 else old,
                               new.view(torch.uint8) if new.dtype == FP8 else new)
        for col, tma in ((False, False), (True, False), (True, True)):
            torch.library.opcheck(torch.ops.minikernels.per_token_group_quant_fp8,
                                  (x.to(device), 64, 1e-10, col, tma, False))


def test_torch_compile_fullgraph():
    def linear(x, wq, ws):
        xq, xs = mk.ops.per_token_group_quant_fp8(x, 64, column_major_scales=True)
        return mk.ops.w8a8_block_fp8_matmul(xq, wq, xs, ws, [32, 64],
                                            output_dtype=torch.bfloat16)

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
    wq, ws = block_quant_weight(torch.randn(40, 128, generator=gen) / 10, 32, 64)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, wq, ws), linear(x, wq, ws))


def test_bad_inputs_raise_clear_errors():
    A, B, As, Bs = make_matmul_case(2, 40, 128, [32, 64], seed=0)
    op = mk.ops.w8a8_block_fp8_matmul
    with pytest.raises(TypeError, match="A must have dtype"):
        op(A.float(), B, As, Bs, [32, 64])
    with pytest.raises(TypeError, match="B must have dtype"):
        op(A, B.to(torch.float8_e5m2), As, Bs, [32, 64])
    with pytest.raises(TypeError, match="As must have dtype"):
        op(A, B, As.half(), Bs, [32, 64])
    with pytest.raises(TypeError, match="Bs must have dtype"):
        op(A, B, As, Bs.double(), [32, 64])
    with pytest.raises(ValueError, match="A's last dim"):
        op(A[:, :64], B, As, Bs, [32, 64])
    with pytest.raises(ValueError, match=r"As must have shape \[2, 2\]"):
        op(A, B, As[:, :1], Bs, [32, 64])
    with pytest.raises(ValueError, match=r"Bs must have shape \[2, 2\]"):
        op(A, B, As, Bs[:1], [32, 64])
    with pytest.raises(ValueError, match="B must be 2-D"):
        op(A, B[None], As, Bs, [32, 64])
    with pytest.raises(ValueError, match="block_k"):
        op(A, B, As, Bs, [32, 40])
    with pytest.raises(ValueError, match="block_n"):
        op(A, B, As, Bs, [0, 64])
    with pytest.raises(TypeError, match="block_size"):
        op(A, B, As, Bs, [32])
    with pytest.raises(TypeError, match="block_size"):
        op(A, B, As, Bs, (32.0, 64))
    with pytest.raises(TypeError, match="output_dtype"):
        op(A, B, As, Bs, [32, 64], output_dtype=torch.int32)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        op(A.tolist(), B, As, Bs, [32, 64])
    x = torch.randn(3, 128)
    q = mk.ops.per_token_group_quant_fp8
    with pytest.raises(ValueError, match="group_size"):
        q(x, 48)
    with pytest.raises(ValueError, match="group_size"):
        q(x, 0)
    with pytest.raises(TypeError, match="group_size"):
        q(x, 64.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        q(x.to(torch.int32), 64)
    with pytest.raises(TypeError, match="dtype must be torch.float8_e4m3fn"):
        q(x, 64, dtype=torch.float8_e5m2)
    with pytest.raises(ValueError, match="eps"):
        q(x, 64, eps=0.0)
    with pytest.raises(TypeError, match="column_major_scales"):
        q(x, 64, column_major_scales=1)


def test_dispatch_needs_fp8_tensor_cores(monkeypatch):
    """On CUDA, triton only on capability >= (8, 9); older GPUs take the reference path."""
    monkeypatch.setattr(mk.backend, "triton_available", lambda: True)
    dev = torch.device("cuda", 0)
    fp8_op._capability.cache_clear()
    try:
        for cap, want in (((8, 0), "reference"), ((8, 6), "reference"), ((8, 9), "triton"),
                          ((9, 0), "triton")):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=cap: c)
            fp8_op._capability.cache_clear()
            with mk.use_backend("triton"):
                assert fp8_op._which("w8a8_block_fp8_matmul", dev) == want, cap
            with mk.use_backend("reference"):
                assert fp8_op._which("w8a8_block_fp8_matmul", dev) == "reference"
    finally:
        fp8_op._capability.cache_clear()
