"""INT8 W8A8 (vLLM's scaled_int8_quant + cutlass_scaled_mm): the Triton kernels vs the
reference and vLLM's own test formulas, on random shapes, dtypes and strided views of
every tensor argument; the quantizer bit for bit (dynamic / static, symmetric /
asymmetric, ties to even, saturation, all-zero and constant rows, rows longer than one
tile); the GEMM exact for int8 (per-tensor / per-token / per-channel scales, bias,
split-K), fp8 e4m3 inputs; opcheck, torch.compile, errors, and the end-to-end quantized
linear vLLM checks."""
from __future__ import annotations

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import int8_w8a8 as int8_op
from minikernels.ops import reference

FP8 = torch.float8_e4m3fn
IN_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}
VIEWS = ["plain", "rows", "cols", "step"]


def strided_view(t: torch.Tensor, mode: str) -> torch.Tensor:
    """t's values in a view of a larger poisoned tensor (NaN for floats, 0x7F / 0xA5 bytes
    for int8 / fp8): "rows" padded rows and an offset, "cols" column-major storage, "step"
    a strided last dim (1-D: every mode is a strided, offset view); "plain" t itself."""
    if mode == "plain":
        return t
    if t.dtype == torch.int8:
        fill = torch.tensor(-91, dtype=torch.int8)
    else:
        fill = torch.tensor(float("nan")).to(t.dtype)
    if t.dim() == 1:
        big = fill.repeat(2 * t.shape[0] + 3).to(t.device)
        view = big[1:1 + 2 * t.shape[0]:2]
    else:
        r, c = t.shape
        if mode == "rows":
            view = fill.repeat(r + 2, c + 5).to(t.device)[1:1 + r, 3:3 + c]
        elif mode == "cols":
            view = fill.repeat(c + 3, r + 2).to(t.device)[1:1 + c, 2:2 + r].t()
        else:
            view = fill.repeat(r + 1, 2 * c + 3).to(t.device)[1:, 1:1 + 2 * c:2]
    view.copy_(t)
    assert view.shape == t.shape
    return view


def random_activations(shape, dtype, gen):
    v = torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape, generator=gen) * 2)
    return v.to(dtype)


def quant(backend, *args, **kw):
    with mk.use_backend(backend):
        return mk.ops.scaled_int8_quant(*args, **kw)


def mm(backend, *args, **kw):
    with mk.use_backend(backend):
        return mk.ops.scaled_mm(*args, **kw)


def assert_quant_equal(got, want) -> None:
    """(x_q, scales, azp) equal bit for bit (azp None on both or equal)."""
    q, s, z = (t.cpu() if isinstance(t, torch.Tensor) else t for t in got)
    rq, rs, rz = want
    assert q.dtype == torch.int8 and q.shape == rq.shape and q.is_contiguous()
    diff = q != rq
    assert not diff.any(), f"{int(diff.sum())} int8 values differ, e.g. got " \
        f"{q[diff][:4].tolist()} want {rq[diff][:4].tolist()}"
    assert s.dtype == torch.float32 and s.shape == rs.shape and torch.equal(s, rs)
    assert (z is None) == (rz is None)
    if z is not None:
        assert z.dtype == torch.int32 and z.shape == rz.shape and torch.equal(z, rz)


# -------------------------------------------------------------------- quantization

def vllm_sym_formula(x: torch.Tensor):
    """vLLM's test_dynamic_scaled_int8_quant reference, written out."""
    scales = x.abs().amax(-1, keepdim=True).float() / 127
    q = (x / scales).round().clamp(-128, 127).to(torch.int8)
    return q, scales


def vllm_azp_formula(x: torch.Tensor):
    """vLLM's test_dynamic_scaled_int8_azp_quant reference, written out."""
    hi = x.float().amax(-1, keepdim=True)
    lo = x.float().amin(-1, keepdim=True)
    scales = (hi - lo) / torch.tensor(255.0)
    azps = torch.round(torch.tensor(-128.0) - lo / scales).to(torch.int32)
    q = ((x / scales).round() + azps).clamp(-128, 127).to(torch.int8)
    return q, scales, azps


@settings(max_examples=examples(30))
@given(rows=st.sampled_from([0, 1, 2, 5, 17, 40]), k=st.integers(1, 300),
       dtype=st.sampled_from(IN_DTYPES), symmetric=st.booleans(),
       view=st.sampled_from(VIEWS), seed=st.integers(0, 2**16))
def test_dynamic_quant_bit_exact_random(device, rows, k, dtype, symmetric, view, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_activations((rows, k), dtype, gen)
    if rows > 2:
        x[1] = 0                                    # an all-zero row
    want = reference.scaled_int8_quant(x, symmetric=symmetric)
    got = quant("triton", strided_view(x.to(device), view), symmetric=symmetric)
    assert_quant_equal(got, want)
    assert got[1].shape == (rows, 1)


@given(rows=st.sampled_from([1, 3, 8]), k=st.integers(1, 200), dtype=st.sampled_from(IN_DTYPES),
       symmetric=st.booleans(), view=st.sampled_from(VIEWS), seed=st.integers(0, 2**16))
def test_static_quant_bit_exact_random(device, rows, k, dtype, symmetric, view, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_activations((rows, k), dtype, gen)
    scale = torch.rand(1, generator=gen) * 0.05 + 1e-3
    azp = None if symmetric else torch.randint(-20, 20, (1,), generator=gen,
                                               dtype=torch.int32)
    rq, _, _ = reference.scaled_int8_quant(x, scale, azp, symmetric)
    sv = strided_view(scale.to(device), view)
    zv = None if azp is None else strided_view(azp.to(device), view)
    q, s, z = quant("triton", strided_view(x.to(device), view), sv, zv, symmetric=symmetric)
    assert s is sv and z is zv                       # returned as given (vLLM)
    assert torch.equal(q.cpu(), rq)


@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_reference_matches_vllm_formulas(dtype):
    gen = torch.Generator().manual_seed(0)
    x = random_activations((33, 257), dtype, gen)
    q, s, z = reference.scaled_int8_quant(x)
    vq, vs = vllm_sym_formula(x)
    assert z is None and torch.equal(q, vq) and torch.equal(s, vs)
    q, s, z = reference.scaled_int8_quant(x, symmetric=False)
    vq, vs, vz = vllm_azp_formula(x)
    assert torch.equal(s, vs) and torch.equal(z, vz) and torch.equal(q, vq)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_quant_properties(device, backend, dtype):
    """Dynamic: the absmax element maps to +-127, |x - s * x_q| <= s / 2 (inside the
    range); asymmetric: min -> -128, max -> 127, |x - s * (x_q - azp)| <= s / 2."""
    gen = torch.Generator().manual_seed(1)
    x = random_activations((9, 200), dtype, gen)
    q, s, z = quant(backend, x.to(device))
    q, s, xf = q.cpu().float(), s.cpu(), x.float()
    assert z is None and torch.all(q.abs().amax(-1) == 127)
    assert torch.all((xf - s * q).abs() <= s / 2 * (1 + 2**-20))
    q, s, z = quant(backend, x.to(device), symmetric=False)
    q, s, z = q.cpu().float(), s.cpu(), z.cpu().float()
    assert torch.all(q.amin(-1) == -128) and torch.all(q.amax(-1) == 127)
    assert torch.all((xf - s * (q - z)).abs() <= s / 2 * (1 + 2**-8))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_quant_ties_to_even_and_saturation(device, backend, dtype):
    """scale 1 (and 16 on x * 16): x / s lands on exact .5 ties -> round half to even
    (torch.round); scale 2^-4 saturates at -128 / 127; with azp the sum saturates too."""
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5, 3.0, -3.0])
    x = torch.stack([ties, ties * 16]).to(dtype)
    one = torch.ones(1, device=device)
    q, _, _ = quant(backend, x[:1].to(device), one)
    assert q.cpu().tolist() == [[0, 2, 2, 0, -2, -2, 126, -128, 3, -3]]
    q, _, _ = quant(backend, x.to(device), one / 16)             # row 0 saturates
    assert q.cpu()[0].tolist() == [8, 24, 40, -8, -24, -40, 127, -128, 48, -48]
    q, _, _ = quant(backend, x.to(device), one * 16)             # row 1: the ties again
    assert q.cpu()[1].tolist() == [0, 2, 2, 0, -2, -2, 126, -128, 3, -3]
    azp = torch.tensor([100], dtype=torch.int32, device=device)
    q, _, _ = quant(backend, x[:1].to(device), one, azp, symmetric=False)
    assert q.cpu().tolist() == [[100, 102, 102, 100, 98, 98, 127, -28, 103, 97]]
    # dynamic: x / s exactly +-127 for the absmax element, whatever its magnitude
    y = torch.tensor([[1e-3, -3.3e-4, 2e-4], [-6e4, 1.0, 5e4]]).to(dtype)
    qy, _, _ = quant(backend, y.to(device))
    assert qy.cpu()[:, 0].tolist() == [127, -127]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quant_zero_and_constant_rows(device, backend):
    """Documented edge cases: all-zero rows (symmetric: s 0, q 0; asymmetric: s 0, azp
    -128, q -128) and constant rows c (asymmetric: the range widened to [min(c, 0),
    max(c, 0)], s = |c| / 255, q 127 / -128): no NaN / inf, s * (q - azp) reproduces the
    row (0 error for zeros)."""
    x = torch.zeros(4, 37)
    x[1] = 3.0
    x[2] = -0.75
    x[3, 5] = 2.0                                    # 0 / 2: an ordinary row
    q, s, _ = quant(backend, x.to(device))
    q, s = q.cpu(), s.cpu()
    assert s[0].item() == 0 and torch.all(q[0] == 0)
    assert torch.all(q[1] == 127) and torch.all(q[2] == -127)
    q, s, z = quant(backend, x.to(device), symmetric=False)
    q, s, z = q.cpu(), s.cpu(), z.cpu()
    assert torch.isfinite(s).all()
    assert s[0].item() == 0 and z[0].item() == -128 and torch.all(q[0] == -128)
    assert s[1].item() == torch.tensor(3.0) / 255 and z[1].item() == -128
    assert torch.all(q[1] == 127)
    assert s[2].item() == torch.tensor(0.75) / 255 and z[2].item() == 127
    assert torch.all(q[2] == -128)
    deq = s * (q.float() - z.float())
    assert torch.equal(deq[0], x[0])
    torch.testing.assert_close(deq[1:3], x[1:3], rtol=1e-6, atol=0)
    assert_quant_equal((q, s, z), reference.scaled_int8_quant(x, symmetric=False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_long_rows_leading_dims_and_empty(device, backend, symmetric):
    """Rows longer than one 4096 tile (two-pass kernel), [..., K] inputs, M = 0, K = 0."""
    gen = torch.Generator().manual_seed(2)
    x = random_activations((3, 5000), torch.bfloat16, gen)
    x[1, 4500] = 300.0                               # the extreme lies in the second tile
    x[2, 4999] = -300.0
    got = quant(backend, strided_view(x.to(device), "rows"), symmetric=symmetric)
    assert_quant_equal(got, reference.scaled_int8_quant(x, symmetric=symmetric))
    x3 = random_activations((2, 3, 40), torch.float16, gen)
    q, s, z = quant(backend, x3.to(device), symmetric=symmetric)
    assert q.shape == (2, 3, 40) and s.shape == (6, 1)
    assert_quant_equal((q.view(6, 40), s, z), reference.scaled_int8_quant(
        x3.view(6, 40), symmetric=symmetric))
    q0, s0, z0 = quant(backend, x3[:, :0].to(device), symmetric=symmetric)
    assert q0.shape == (2, 0, 40) and s0.shape == (0, 1)
    assert (z0 is None) == symmetric
    qk, sk, _ = quant(backend, x3[..., :0].to(device), symmetric=symmetric)
    assert qk.shape == (2, 3, 0) and sk.shape == (6, 1) and torch.all(sk.cpu() == 0)
    q1, _, _ = quant(backend, x3[0, 0].to(device), symmetric=symmetric)   # 1-D x
    assert q1.shape == (40,)


# ------------------------------------------------------------------------- scaled_mm

def make_mm_case(m, n, k, gen, per_token=True, per_channel=True, bias_dtype=None,
                 dtype=torch.int8):
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        a = (torch.randn(m, k, generator=gen) * 16).clamp(-448, 448).to(FP8)
        w = (torch.randn(n, k, generator=gen) * 16).clamp(-448, 448).to(FP8)
    sa = torch.rand(m if per_token else 1, 1, generator=gen) * 1e-2 + 1e-4
    sb = torch.rand(1, n if per_channel else 1, generator=gen) * 1e-2 + 1e-4
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype)
    return a, w.t(), sa, sb, bias                 # b = weight.t(): column-major [K, N]


def exact_fp64(a, b, sa, sb, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's test formula in fp64: torch.mm(scale_a * a, scale_b * b) (+ bias), and its
    magnitude (for the fp32 summation bound)."""
    ad, bd = a.double(), b.double()
    sa, sb = sa.double().reshape(-1, 1), sb.double().reshape(1, -1)
    out = torch.mm(sa * ad, sb * bd)
    mag = torch.mm(sa * ad.abs(), sb * bd.abs())
    if bias is not None:
        out = out + bias.double()
        mag = mag + bias.double().abs()
    return out, mag


def check_mm(c: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor,
             k: int, out_dtype: torch.dtype, int8: bool) -> None:
    """c within 1 ulp of out_dtype of the reference (which is exact before its scaling
    for int8), and within out_dtype's rounding + fp32 error of the fp64 formula."""
    assert c.dtype == out_dtype and c.shape == ref.shape
    c64 = c.double()
    assert not torch.isnan(c64).any(), "NaN in output (unwritten element or read past a view?)"
    ulp = ULP[out_dtype]
    # below out_dtype's smallest normal the spacing is fixed (fp16: 2^-24): an absolute term
    sub = torch.finfo(out_dtype).smallest_normal * ulp
    err = (c64 - ref.double()).abs()
    assert torch.all(err <= ulp * ref.double().abs() + sub + 2.0**-24 * (mag + 1e-30)), \
        f"vs reference: max err {err.max():.3g}"
    terms = 4 if int8 else k + 4                    # fp32 roundings of the epilogue / sum
    bound = ulp * exact.abs() + sub + terms * 2.0**-24 * mag + 1e-30
    err = (c64 - exact).abs()
    assert torch.all(err <= bound), f"vs fp64: max err {err.max():.3g}, " \
        f"worst ratio {(err / bound).max():.3g}"


@settings(max_examples=examples(30))
@given(m=st.sampled_from([0, 1, 2, 5, 16, 17, 33, 70]), n=st.integers(1, 150),
       k=st.integers(1, 300), out_dtype=st.sampled_from(OUT_DTYPES),
       per_token=st.booleans(), per_channel=st.booleans(), has_bias=st.booleans(),
       va=st.sampled_from(VIEWS), vb=st.sampled_from(VIEWS), vs=st.sampled_from(VIEWS),
       seed=st.integers(0, 2**16))
def test_mm_random_shapes_scales_and_views(device, m, n, k, out_dtype, per_token,
                                           per_channel, has_bias, va, vb, vs, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b, sa, sb, bias = make_mm_case(m, n, k, gen, per_token, per_channel,
                                      out_dtype if has_bias else None)
    ref = reference.scaled_mm(a, b, sa, sb, out_dtype, bias)
    exact, mag = exact_fp64(a, b, sa, sb, bias)
    args = [strided_view(t.to(device), v) for t, v in ((a, va), (b, vb), (sa, vs), (sb, vs))]
    bv = None if bias is None else strided_view(bias.to(device), vs)
    c = mm("triton", *args, out_dtype, bias=bv)
    assert c.shape == (m, n)
    check_mm(c.cpu(), ref, exact, mag, k, out_dtype, int8=True)
    if device == "cpu":        # the interpreter has no FMA contraction: the same bits
        assert torch.equal(c, ref)


@pytest.mark.parametrize("split", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_mm_split_k_exact_and_deterministic(device, split, m):
    """The decode path's K split writes exact int32 partials: any split count gives the
    same bits as no split, run to run."""
    from minikernels.ops.triton import int8_w8a8 as tri
    gen = torch.Generator().manual_seed(split + m)
    a, b, sa, sb, bias = make_mm_case(m, 90, 600, gen, bias_dtype=torch.bfloat16)
    a, b, sa, sb, bias = (t.to(device) for t in (a, b, sa, sb, bias))
    sa1, sb1 = sa.reshape(-1), sb.reshape(-1)
    one = tri.scaled_mm(a, b, sa1, sb1, torch.bfloat16, bias, split_k=1)
    c = tri.scaled_mm(a, b, sa1, sb1, torch.bfloat16, bias, split_k=split)
    assert torch.equal(c, one)
    assert torch.equal(tri.scaled_mm(a, b, sa1, sb1, torch.bfloat16, bias, split_k=split), c)
    ref = reference.scaled_mm(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), torch.bfloat16, bias.cpu())
    exact, mag = exact_fp64(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), bias.cpu())
    check_mm(c.cpu(), ref, exact, mag, 600, torch.bfloat16, int8=True)


@pytest.mark.parametrize("m", [1, 16, 70])
def test_mm_large_k_exact_int32(device, m):
    """Extreme int8 values over K = 2000 (|acc| up to 2^25: past fp32's exact range, so an
    fp32 accumulator would round): the int32 accumulator is exact, the result equals the
    reference's (exact integer -> fp32) in fp32 out."""
    a = torch.full((m, 2000), -128, dtype=torch.int8)
    a[:, 1::7] = 127
    w = torch.full((24, 2000), -128, dtype=torch.int8)
    w[::3, 5::11] = 127
    one = torch.ones(1)
    ref = reference.scaled_mm(a, w.t(), one, one, torch.float32)
    c = mm("triton", a.to(device), w.t().to(device), one.to(device), one.to(device),
           torch.float32)
    assert torch.equal(c.cpu(), ref)
    assert torch.equal(ref.double(), (a.double() @ w.double().t()).float().double())


@given(m=st.sampled_from([1, 3, 16, 20]), n=st.integers(1, 100), k=st.integers(1, 200),
       out_dtype=st.sampled_from(OUT_DTYPES), per_token=st.booleans(),
       per_channel=st.booleans(), vb=st.sampled_from(VIEWS), seed=st.integers(0, 2**16))
def test_mm_fp8_inputs(device, m, n, k, out_dtype, per_token, per_channel, vb, seed):
    """float8_e4m3fn a and b: fp32 accumulation, within fp32 summation + out_dtype
    rounding of the fp64 formula (fp8 tensor cores on sm_89+; the interpreter here)."""
    if device == "cuda" and not int8_op.fp8_tensor_cores(torch.device("cuda")):
        pytest.skip("fp8 tensor cores need sm_89+ (the op falls back to the reference)")
    gen = torch.Generator().manual_seed(seed)
    a, b, sa, sb, bias = make_mm_case(m, n, k, gen, per_token, per_channel,
                                      out_dtype, dtype=FP8)
    ref = reference.scaled_mm(a, b, sa, sb, out_dtype, bias)
    exact, mag = exact_fp64(a, b, sa, sb, bias)
    c = mm("triton", a.to(device), strided_view(b.to(device), vb), sa.to(device),
           sb.to(device), out_dtype, bias.to(device))
    check_mm(c.cpu(), ref, exact, mag, k, out_dtype, int8=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mm_leading_dims_and_empty(device, backend):
    gen = torch.Generator().manual_seed(3)
    a, b, sa, sb, bias = make_mm_case(6, 40, 100, gen, bias_dtype=torch.float16)
    to = (lambda *ts: [t.to(device) for t in ts])
    c = mm(backend, *to(a.view(2, 3, 100), b, sa.view(2, 3, 1), sb), torch.float16,
           bias.to(device))
    assert c.shape == (2, 3, 40) and c.dtype == torch.float16
    ref = reference.scaled_mm(a, b, sa, sb, torch.float16, bias)
    exact, mag = exact_fp64(a, b, sa, sb, bias)
    check_mm(c.reshape(6, 40).cpu(), ref, exact, mag, 100, torch.float16, int8=True)
    c0 = mm(backend, *to(a[:0], b, sa[:0], sb), torch.bfloat16)         # M = 0
    assert c0.shape == (0, 40) and c0.dtype == torch.bfloat16
    c0 = mm(backend, *to(a[:0], b, sa[:1], sb), torch.bfloat16)         # per tensor
    assert c0.shape == (0, 40)
    c1 = mm(backend, *to(a[0], b, sa[0], sb), torch.float32)            # 1-D token
    assert c1.shape == (40,)
    ck = mm(backend, *to(a[:, :0], b[:0], sa, sb), torch.float16, bias.to(device))   # K = 0
    assert torch.equal(ck.cpu(), bias.expand(6, 40))
    cn = mm(backend, *to(a, b[:, :0], sa, sb[:, :0]), torch.float16)    # N = 0
    assert cn.shape == (6, 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_end_to_end_quantized_linear(device, backend):
    """vLLM's int8 linear: dynamic per-token activations, per-channel weight; vs the
    dequantized matmul in fp32 (only the output rounding) and vs the dense bf16 linear
    (int8 quantization error)."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 33, 96, 256
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    w_s = w.abs().amax(-1, keepdim=True) / 127                   # [N, 1] per channel
    w_q = torch.round(w / w_s).clamp(-128, 127).to(torch.int8)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    with mk.use_backend(backend):
        x_q, x_s, _ = mk.ops.scaled_int8_quant(x.to(device))
        y = mk.ops.scaled_mm(x_q, w_q.to(device).t(), x_s, w_s.to(device), torch.bfloat16,
                             bias.to(device))
    y = y.cpu().float()
    deq = (x_q.cpu().float() * x_s.cpu()) @ (w_q.float() * w_s).t() + bias.float()
    torch.testing.assert_close(y, deq, rtol=2**-7, atol=1e-4)
    dense = x.float() @ w.t() + bias.float()
    rel = (y - dense).abs().mean() / dense.abs().mean()
    assert rel < 0.02, rel


# -------------------------------------------------------------- contract and errors

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(device, backend):
    gen = torch.Generator().manual_seed(4)
    a, b, sa, sb, bias = make_mm_case(3, 40, 96, gen, bias_dtype=torch.bfloat16)
    a, b, sa, sb, bias = (t.to(device) for t in (a, b, sa, sb, bias))
    x = random_activations((3, 64), torch.bfloat16, gen).to(device)
    s = torch.tensor([0.01], device=device)
    z = torch.tensor([3], dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        for args in ((a, b, sa.reshape(-1), sb.reshape(-1), torch.bfloat16, bias),
                     (a, b, sa[:1].reshape(-1), sb.reshape(-1), torch.float32, None)):
            torch.library.opcheck(torch.ops.minikernels.scaled_mm, args)
        for args in ((x, None, None, True), (x, None, None, False), (x, s, None, True),
                     (x, s, z, False)):
            torch.library.opcheck(torch.ops.minikernels.scaled_int8_quant, args)


def test_torch_compile_fullgraph():
    def linear(x, wq, ws):
        xq, xs, _ = mk.ops.scaled_int8_quant(x)
        return mk.ops.scaled_mm(xq, wq.t(), xs, ws, torch.bfloat16)

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
    wq = torch.randint(-128, 128, (40, 128), generator=gen, dtype=torch.int8)
    ws = torch.rand(40, 1, generator=gen) / 100
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, wq, ws), linear(x, wq, ws))


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(0)
    a, b, sa, sb, bias = make_mm_case(4, 24, 64, gen, bias_dtype=torch.float16)
    op = mk.ops.scaled_mm
    f16 = torch.float16
    with pytest.raises(TypeError, match="a must have dtype"):
        op(a.float(), b, sa, sb, f16)
    with pytest.raises(TypeError, match="b must have dtype"):
        op(a, b.to(FP8), sa, sb, f16)
    with pytest.raises(TypeError, match="b must have dtype"):
        op(a.to(FP8), b, sa, sb, f16)
    with pytest.raises(ValueError, match="b must be 2-D"):
        op(a, b[None], sa, sb, f16)
    with pytest.raises(ValueError, match="a's last dim"):
        op(a[:, :32], b, sa, sb, f16)
    with pytest.raises(TypeError, match="scale_a must have dtype"):
        op(a, b, sa.half(), sb, f16)
    with pytest.raises(ValueError, match="scale_a must have numel 1"):
        op(a, b, sa[:3], sb, f16)
    with pytest.raises(TypeError, match="scale_b must have dtype"):
        op(a, b, sa, sb.double(), f16)
    with pytest.raises(ValueError, match="scale_b must have numel 1"):
        op(a, b, sa, sb[:, :5], f16)
    with pytest.raises(TypeError, match="bias must have dtype"):
        op(a, b, sa, sb, torch.bfloat16, bias)
    with pytest.raises(ValueError, match=r"bias must have shape \[24\]"):
        op(a, b, sa, sb, f16, bias[:5])
    with pytest.raises(TypeError, match="out_dtype"):
        op(a, b, sa, sb, torch.int32)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        op(a.tolist(), b, sa, sb, f16)
    with pytest.raises(TypeError, match="scale_a must be a torch.Tensor"):
        op(a, b, 0.5, sb, f16)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="b must be on"):
            op(a.cuda(), b, sa.cuda(), sb.cuda(), f16)
        with pytest.raises(ValueError, match="scale_b must be on"):
            op(a.cuda(), b.cuda(), sa.cuda(), sb, f16)
    x = torch.randn(3, 64)
    q = mk.ops.scaled_int8_quant
    s = torch.tensor([0.1])
    z = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(TypeError, match="x must have dtype"):
        q(x.to(torch.int8))
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        q(torch.tensor(1.0))
    with pytest.raises(TypeError, match="scale must have dtype"):
        q(x, s.half())
    with pytest.raises(ValueError, match="scale must have numel 1"):
        q(x, torch.ones(3))
    with pytest.raises(ValueError, match="azp must be given"):
        q(x, s, symmetric=False)
    with pytest.raises(ValueError, match="azp must only be given for asymmetric"):
        q(x, s, z)
    with pytest.raises(ValueError, match="azp must only be given with a static scale"):
        q(x, None, z, symmetric=False)
    with pytest.raises(TypeError, match="azp must have dtype"):
        q(x, s, z.long(), symmetric=False)
    with pytest.raises(ValueError, match="azp must have numel 1"):
        q(x, s, z.repeat(2), symmetric=False)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        q(x, symmetric=1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="scale must be on"):
            q(x.cuda(), s)


def test_dispatch_fp8_needs_fp8_tensor_cores(monkeypatch):
    """On CUDA: int8 runs triton on any capability; fp8 only on >= (8, 9)."""
    from minikernels.ops import fp8_w8a8 as fp8_op
    monkeypatch.setattr(mk.backend, "triton_available", lambda: True)
    dev = torch.device("cuda", 0)
    fp8_op._capability.cache_clear()
    try:
        for cap, want in (((8, 0), "reference"), ((8, 9), "triton"), ((9, 0), "triton")):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=cap: c)
            fp8_op._capability.cache_clear()
            with mk.use_backend("triton"):
                assert int8_op._which("scaled_mm", dev, FP8) == want, cap
                assert int8_op._which("scaled_mm", dev, torch.int8) == "triton", cap
            with mk.use_backend("reference"):
                assert int8_op._which("scaled_mm", dev, torch.int8) == "reference"
    finally:
        fp8_op._capability.cache_clear()


# ------------------------------------------------- asymmetric activations (zero points)

@settings(max_examples=examples(20))
@given(m=st.sampled_from([0, 1, 5, 16, 17, 70]), n=st.integers(1, 100), k=st.integers(1, 300),
       per_token_azp=st.booleans(), has_bias=st.booleans(), split=st.sampled_from([None, 3]),
       view=st.sampled_from(VIEWS), seed=st.integers(0, 2**16))
def test_mm_azp_exact(device, m, n, k, per_token_azp, has_bias, split, view, seed):
    """acc - azp * azp_adj in int32 (vLLM's cutlass_scaled_mm_azp), per-token zero points
    or a per-tensor one folded into azp_adj, with and without the decode K split: the same
    bits as the reference, which is exact (fp64) before its scaling."""
    from minikernels.ops.triton import int8_w8a8 as tri
    gen = torch.Generator().manual_seed(seed)
    a, b, sa, sb, bias = make_mm_case(m, n, k, gen, bias_dtype=torch.bfloat16 if has_bias
                                      else None)
    adj = b.to(torch.int32).sum(0, dtype=torch.int32)
    azp = torch.randint(-128, 128, (m,), generator=gen, dtype=torch.int32)
    if not per_token_azp:
        adj, azp = adj * int(azp[0]) if m else adj * 7, None
    ref = reference.scaled_mm(a, b, sa, sb, torch.bfloat16, bias, adj, azp)
    a_real = a.to(torch.int64) - (azp.reshape(-1, 1) if azp is not None else 0)
    if azp is None:   # the per-tensor zero point is in adj: check the formula directly
        want = (a.double() @ b.double() - adj.double()) * sa.double() * sb.double()
    else:
        want = (a_real.double() @ b.double()) * sa.double() * sb.double()
    if bias is not None:
        want = want + bias.double()
    assert torch.allclose(ref.double(), want, rtol=2**-7, atol=1e-6)
    dev = [strided_view(t.to(device), view) for t in (a, b, sa, sb)]
    sa_d, sb_d = dev[2].reshape(-1), dev[3].reshape(-1)
    c = tri.scaled_mm(dev[0], dev[1], sa_d, sb_d, torch.bfloat16,
                      None if bias is None else bias.to(device), adj.to(device),
                      None if azp is None else azp.to(device), split_k=split)
    if device == "cpu":
        assert torch.equal(c, ref)
    else:
        assert torch.allclose(c.cpu().double(), ref.double(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("m,n,k", [(32, 16, 64), (64, 64, 256), (7, 33, 100)])
@pytest.mark.parametrize("azp_per_token", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_vllm_cutlass_int8_azp(device, backend, m, n, k, azp_per_token, use_bias):
    """vLLM's tests/kernels/quantization/test_cutlass_scaled_mm.py::test_cutlass_int8_azp,
    through the compat layer."""
    from minikernels.compat import vllm_ops
    torch.manual_seed(0)
    out_dtype = torch.bfloat16
    m_azp = m if azp_per_token else 1
    scale_a = torch.randn((m_azp, 1), dtype=torch.float32) / 10
    scale_b = torch.randn((1, n), dtype=torch.float32) / 10
    aq_i8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    bq_i8 = torch.randint(-128, 128, (n, k), dtype=torch.int8).t()
    azp_a = torch.rand((m_azp, 1), dtype=torch.float32) * 10 + 1.5
    azp_aq_i8 = (azp_a / scale_a).to(dtype=torch.int8)
    a_dq = scale_a * (aq_i8.to(torch.int32) - azp_aq_i8).to(torch.float32)
    b_dq = scale_b * bq_i8.to(torch.float32)
    bias = torch.rand((1, n), dtype=out_dtype) * 10 + 2.5 if use_bias else \
        torch.zeros((1, n), dtype=out_dtype)
    baseline_dq = (torch.mm(a_dq, b_dq) + bias).to(out_dtype)
    azp_adj = bq_i8.to(torch.int32).sum(dim=0, keepdim=True, dtype=torch.int32)
    azp_i32 = azp_aq_i8.to(torch.int32)
    with mk.use_backend(backend):
        args = [t.to(device) for t in (aq_i8, bq_i8, scale_a, scale_b)]
        func_bias = bias[0].to(device) if use_bias else None
        if azp_per_token:
            out = vllm_ops.cutlass_scaled_mm_azp(*args, out_dtype, azp_adj.to(device),
                                                 azp_i32.to(device), func_bias)
        else:
            out = vllm_ops.cutlass_scaled_mm_azp(*args, out_dtype,
                                                 (azp_i32 * azp_adj).to(device), None,
                                                 func_bias)
    torch.testing.assert_close(out.cpu(), baseline_dq, rtol=1e-2, atol=1e-3)


def test_mm_azp_bad_inputs():
    a = torch.randint(-128, 128, (3, 8), dtype=torch.int8)
    b = torch.randint(-128, 128, (8, 5), dtype=torch.int8)
    s = torch.ones(1)
    adj = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="azp_adj"):
        mk.ops.scaled_mm(a, b, s, s, torch.bfloat16, None, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="azp_adj"):
        mk.ops.scaled_mm(a, b, s, s, torch.bfloat16, None, adj.float())
    with pytest.raises(ValueError, match="azp must have numel"):
        mk.ops.scaled_mm(a, b, s, s, torch.bfloat16, None, adj, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="azp needs azp_adj"):
        mk.ops.scaled_mm(a, b, s, s, torch.bfloat16, None, None, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8"):
        mk.ops.scaled_mm(a.float().to(FP8), b.float().to(FP8), s, s, torch.bfloat16, None, adj)
