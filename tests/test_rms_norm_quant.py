"""RMSNorm fused with int8 / fp8 quantization (ops.rms_norm_quant; vLLM's
rms_norm_dynamic_per_token_quant / rms_norm_per_block_quant / rms_norm_static_fp8_quant and
their residual forms): the Triton kernel against the fp32 reference over random shapes,
modes, dtypes and strided views of every tensor argument (bit for bit on inputs whose sum
of squares is exact; within one quantization step otherwise); fused == unfused (rms_norm
then scaled_int8_quant / per_token_group_quant_fp8 / static fp8); rows that stream;
vLLM's own test formulas through the compat layer; opcheck and errors."""
from __future__ import annotations

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels.compat import vllm_ops
from minikernels.ops import reference

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QUANT = [torch.int8, FP8]
VIEWS = ["plain", "rows", "step"]


def grid_values(shape, dtype, gen, lo=-12, hi=12):
    """Multiples of 1/4 in [lo/4, hi/4]: sums of their squares are exact in fp32 in any
    order, so a kernel's reduction order cannot change a bit."""
    return (torch.randint(lo, hi + 1, shape, generator=gen) / 4).to(dtype)


def strided(t: torch.Tensor, mode: str) -> torch.Tensor:
    """t's values in a view of a larger NaN-filled tensor ("rows": padded rows and an
    offset; "step": a strided last dim; a 1-D t gets a strided, offset view)."""
    if mode == "plain":
        return t
    nan = torch.tensor(float("nan"), dtype=t.dtype)
    if t.dim() == 1:
        view = nan.repeat(2 * t.shape[0] + 3).to(t.device)[1:1 + 2 * t.shape[0]:2]
    elif mode == "rows":
        r, c = t.shape
        view = nan.repeat(r + 2, c + 5).to(t.device)[1:1 + r, 3:3 + c]
    else:
        r, c = t.shape
        view = nan.repeat(r + 1, 2 * c + 3).to(t.device)[1:, 1:1 + 2 * c:2]
    view.copy_(t)
    return view


def run(backend, *args, **kw):
    with mk.use_backend(backend):
        return mk.ops.rms_norm_quant(*args, **kw)


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8) if q.dtype == FP8 else q


def assert_same(got, want) -> None:
    """Outputs equal bit for bit (q as codes, scales, the residual sum)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        diff = codes(g) != codes(w)
        if g.dtype.is_floating_point and g.dtype != FP8:
            diff = diff & ~(torch.isnan(g) & torch.isnan(w))
        assert not diff.any(), f"{int(diff.sum())} of {g.numel()} differ: got " \
            f"{g[diff][:4].float().tolist()} want {w[diff][:4].float().tolist()}"


def assert_within_a_step(got, want, x_dtype) -> None:
    """Random inputs: the kernel's fp32 sum may add in another order than torch's, which
    can move a normalized value by one ulp of x's dtype: scales within that, q within one
    quantization step of the reference, and the residual sum exact."""
    q, s = got[0].cpu(), got[1].cpu()
    rq, rs = want[0], want[1]
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}[x_dtype]
    torch.testing.assert_close(s, rs, rtol=ulp, atol=0)
    if q.dtype == torch.int8:
        assert (q.int() - rq.int()).abs().max() <= 1 if q.numel() else True
    else:
        a, b = q.float(), rq.float()
        assert ((a - b).abs() <= b.abs() / 8 + 2.0**-9).all()
    assert int((codes(q) != codes(rq)).sum()) <= max(1, 0.01 * q.numel())
    if len(got) == 3:
        assert_same(got[2:], want[2:])


def assert_kernel_matches(got, want, x_dtype, static: bool = False) -> None:
    """The kernel against the reference (or another kernel path): bit for bit under the
    interpreter, where its rsqrt and sums are numpy's exact ones on these inputs; on a GPU
    tl.rsqrt is the hardware approximation (~2^-22), which can move a normalized value by
    one ulp of x's dtype, so within one quantization step there (the residual sum, which
    has no rsqrt, stays exact)."""
    if got[0].device.type == "cpu":
        assert_same(got, want)
    elif not static:                        # (q, scales[, residual sum])
        assert_within_a_step(got, want, x_dtype)
    else:                                   # (q[, residual sum]): rare one-step differences
        q, rq = codes(got[0].cpu()), codes(want[0])
        assert int((q != rq).sum()) <= max(1, 0.01 * q.numel())
        assert_same(got[1:], want[1:])


MODES = ["token", "group", "static"]


@settings(max_examples=examples(24), deadline=None)
@given(rows=st.integers(0, 4), hidden=st.sampled_from([1, 7, 64, 96, 130, 384]),
       dtype=st.sampled_from(DTYPES), quant=st.sampled_from(QUANT),
       mode=st.sampled_from(MODES), residual=st.booleans(), vllm_rounding=st.booleans(),
       ub=st.booleans(), x_view=st.sampled_from(VIEWS), r_view=st.sampled_from(VIEWS),
       w_view=st.sampled_from(["plain", "step"]), w_fp32=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16))
def test_matches_reference(device, rows, hidden, dtype, quant, mode, residual,
                           vllm_rounding, ub, x_view, r_view, w_view, w_fp32, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    group = {"token": None, "static": None,
             "group": next(g for g in (32, 48, 7, 1) if hidden % g == 0)}[mode]
    x = grid_values((rows, hidden), dtype, gen)
    r = grid_values((rows, hidden), dtype, gen) if residual else None
    w = (torch.rand(hidden, generator=gen) + 0.5).to(torch.float32 if w_fp32 else dtype)
    kw = dict(residual=r, group_size=group, weight_offset=offset, vllm_rounding=vllm_rounding,
              scale=torch.tensor([0.03]) if mode == "static" else None,
              scale_ub=torch.tensor([2.5]) if ub and mode != "static" else None)
    want = run("reference", x, w, 1e-6, quant, **kw)
    dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if r is not None:
        dev["residual"] = strided(r.to(device), r_view)
    got = run("triton", strided(x.to(device), x_view), strided(w.to(device), w_view), 1e-6,
              quant, **dev)
    if mode == "static":
        assert got[1] is dev["scale"]
        got, want = (got[0], *got[2:]), (want[0], *want[2:])
    assert_kernel_matches(got, want, dtype, static=mode == "static")


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("mode,hidden", [("token", 9000), ("group", 10240),
                                         ("static", 8200), ("token", 5137)])
def test_long_rows_stream(device, quant, mode, hidden):
    """Rows past one register tile (streamed in slices; 5137 is one padded tile)."""
    gen = torch.Generator().manual_seed(hidden)
    x = grid_values((2, hidden), torch.bfloat16, gen)
    r = grid_values((2, hidden), torch.bfloat16, gen)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(torch.bfloat16)
    kw = dict(residual=r, group_size=128 if mode == "group" else None,
              scale=torch.tensor([0.02]) if mode == "static" else None)
    want = run("reference", x, w, 1e-5, quant, **kw)
    dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got = run("triton", x.to(device), w.to(device), 1e-5, quant, **dev)
    if mode == "static":
        got, want = (got[0], got[2]), (want[0], want[2])
    assert_kernel_matches(got, want, torch.bfloat16, static=mode == "static")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", QUANT)
def test_random_inputs_within_a_step(device, dtype, quant):
    """Inputs off the grid: the kernel's sum of squares may round differently."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 1000, generator=gen) * 3).to(dtype)
    r = torch.randn(6, 1000, generator=gen).to(dtype)
    w = (torch.rand(1000, generator=gen) + 0.5).to(dtype)
    for group in (None, 100):
        want = run("reference", x, w, 1e-6, quant, residual=r, group_size=group)
        got = run("triton", x.to(device), w.to(device), 1e-6, quant, residual=r.to(device),
                  group_size=group)
        assert_within_a_step(got, want, dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_equals_unfused(device, backend, dtype):
    """rms_norm_quant == rms_norm then the unfused quantizer (what a W8A8 linear runs)."""
    gen = torch.Generator().manual_seed(3)
    x = grid_values((5, 256), dtype, gen).to(device)
    r = grid_values((5, 256), dtype, gen).to(device)
    w = (torch.rand(256, generator=gen) + 0.5).to(dtype).to(device)
    # (on a GPU the two kernels' fp32 sums may add in different orders: within a step)
    with mk.use_backend(backend):
        y, h = mk.ops.rms_norm(x, w, 1e-6, residual=r)
        q, s, h2 = mk.ops.rms_norm_quant(x, w, 1e-6, torch.int8, residual=r)
        assert_kernel_matches((q, s, h2), tuple(
            t.cpu() for t in mk.ops.scaled_int8_quant(y)[:2]) + (h.cpu(),), dtype)
        q, s = mk.ops.rms_norm_quant(x, w, 1e-6, FP8, group_size=128)
        want = mk.ops.per_token_group_quant_fp8(mk.ops.rms_norm(x, w, 1e-6), 128)
        assert_kernel_matches((q, s), tuple(t.cpu() for t in want), dtype)
        q, s = mk.ops.rms_norm_quant(x, w, 1e-6, FP8, group_size=256)   # the whole row
        want = mk.ops.per_token_group_quant_fp8(mk.ops.rms_norm(x, w, 1e-6), 256)
        assert_kernel_matches((q, s), tuple(t.cpu() for t in want), dtype)
        q, s = mk.ops.rms_norm_quant(x, w, 1e-6, FP8)
        want = vllm_ops.scaled_fp8_quant(mk.ops.rms_norm(x, w, 1e-6),
                                         use_per_token_if_dynamic=True)
        assert_kernel_matches((q, s), tuple(t.cpu() for t in want), dtype)


def test_reference_rounds_like_vllm():
    """vllm_rounding: vLLM's RMSNorm.forward_native (fp32 sum, the normalized value rounded
    to the dtype, then times the weight in the dtype) then its quantizers, exactly."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 80, generator=gen).to(torch.bfloat16)
    r = torch.randn(4, 80, generator=gen).to(torch.bfloat16)
    w = torch.randn(80, generator=gen).to(torch.bfloat16)
    total = x.float() + r.float()
    norm = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6)
    y = norm.to(torch.bfloat16) * w
    amax = y.float().abs().amax(-1, keepdim=True)
    q, s, h = mk.ops.rms_norm_quant(x, w, 1e-6, torch.int8, residual=r, vllm_rounding=True)
    assert torch.equal(h, total.to(torch.bfloat16))
    assert torch.equal(s, amax / 127)
    assert torch.equal(q, torch.round(y.float() / (amax / 127)).clamp(-128, 127).to(torch.int8))
    # a static scale reads the rounded sum (vLLM's fused_add_rms_norm_static_fp8_quant)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
    q, _, _ = mk.ops.rms_norm_quant(x, w, 1e-6, FP8, residual=r, vllm_rounding=True,
                                    scale=torch.tensor([0.05]))
    want = (y.float() * (1 / torch.tensor(0.05))).clamp(-448, 448).to(FP8)
    assert torch.equal(codes(q), codes(want))


def test_zero_rows_and_empty_shapes(device):
    w = torch.ones(64, device=device)
    for quant in QUANT:
        x = torch.zeros(3, 64, device=device)
        q, s = run("triton", x, w, 1e-6, quant)
        assert (q.float() == 0).all()
        assert torch.equal(s.cpu(), torch.full((3, 1), 0.0 if quant == torch.int8
                                               else 1 / (448 * 512)))
        q, s = run("triton", x[:0], w, 1e-6, quant, group_size=16)
        assert q.shape == (0, 64) and s.shape == (0, 4)
        q, s = run("triton", torch.zeros(2, 0, device=device), w[:0], 1e-6, quant)
        assert q.shape == (2, 0) and s.shape == (2, 1)
    q, s = run("triton", torch.ones(2, 3, 64, device=device), w, 1e-6, torch.int8,
               group_size=32)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 2)


def test_opcheck(device):
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    w = torch.rand(64, device=device, dtype=torch.bfloat16)
    op = torch.ops.minikernels.rms_norm_quant
    torch.library.opcheck(op, (x, w, torch.randn_like(x), 1e-6, 0.0, torch.int8, None, 16,
                               None, 0.0, False))
    torch.library.opcheck(op, (x, w, None, 1e-6, 1.0, torch.int8,
                               torch.tensor([0.1], device=device), 0, None, 0.0, True))


def test_bad_inputs():
    x = torch.randn(3, 64)
    w = torch.ones(64)
    f = mk.ops.rms_norm_quant
    with pytest.raises(TypeError, match="quant_dtype"):
        f(x, w, 1e-6, torch.float16)
    with pytest.raises(ValueError, match="group_size"):
        f(x, w, 1e-6, torch.int8, group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        f(torch.randn(2, 3 * 16384), torch.ones(3 * 16384), 1e-6, torch.int8, group_size=16384)
    with pytest.raises(ValueError, match="static"):
        f(x, w, 1e-6, torch.int8, scale=torch.tensor([1.0]), group_size=16)
    with pytest.raises(ValueError, match="scale must have 1 element"):
        f(x, w, 1e-6, FP8, scale=torch.ones(2))
    with pytest.raises(TypeError, match="scale_ub"):
        f(x, w, 1e-6, FP8, scale_ub=torch.ones(1, dtype=torch.float16))
    with pytest.raises(TypeError, match="residual"):
        f(x, w, 1e-6, FP8, residual=x.half())
    with pytest.raises(ValueError, match="weight"):
        f(x, torch.ones(63), 1e-6, FP8)
    with pytest.raises(ValueError, match="eps"):
        f(x, w, -1.0, FP8)
    with pytest.raises(ValueError, match="min_scale"):
        f(x, w, 1e-6, FP8, min_scale=-1.0)
    with pytest.raises(ValueError, match="scale_ub"):
        vllm_ops.rms_norm_dynamic_per_token_quant(x, w, 1e-6, torch.int8,
                                                  scale_ub=torch.ones(1))
    with pytest.raises(ValueError, match="group_size"):
        vllm_ops.rms_norm_per_block_quant(x, w, 1e-6, FP8, 128)


# ------------------------------------------------------------ vLLM's tests, written out

def _vllm_rms_norm(x, w, r):
    """vLLM's RMSNorm.forward_native: (y, the new residual or None)."""
    xf = x.float()
    if r is not None:
        xf = xf + r.float()
        r = xf.to(x.dtype)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w, r


def _vllm_ref(x, w, r, quant, scale_ub, group):
    """vLLM's ref_dynamic_per_token_or_block_quant: RMSNorm.forward_native, then
    scaled_fp8_quant (per token) / scaled_int8_quant / per_token_group_quant_*."""
    y, r = _vllm_rms_norm(x, w, r)
    yf = y.float()
    if group is not None:
        g = yf.reshape(yf.shape[0], -1, group)
        qmax = 448.0 if quant == FP8 else 127.0
        s = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / qmax
        v = (g / s).clamp(-qmax, qmax)
        q = v.to(FP8) if quant == FP8 else v.to(torch.int8)
        return q.reshape(yf.shape), s.squeeze(-1), r
    if quant == FP8:
        return vllm_ops.scaled_fp8_quant(y, scale_ub=scale_ub, use_per_token_if_dynamic=True
                                         ) + (r,)
    q, s, _ = vllm_ops.scaled_int8_quant(y)
    return q, s, r


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 1027), (5, 1024), (3, 5137)])
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("group", [None, 64])
def test_vllm_fused_quant_layernorm(device, backend, tokens, hidden, quant, group):
    """vLLM's tests/kernels/core/test_fused_quant_layernorm.py: residual and not, scale_ub
    (fp8 per token), strided input, transposed scales; its tolerances."""
    if group is not None and hidden % group:
        pytest.skip("vLLM skips groups that do not divide the row")
    torch.manual_seed(0)
    dt = torch.bfloat16
    w = torch.empty(hidden, dtype=dt).normal_(mean=1.0, std=0.1)
    x = (torch.randn(tokens, 2 * hidden, dtype=dt) / hidden)[:, :hidden]
    r = torch.randn(tokens, hidden, dtype=dt) / hidden
    for residual in (None, r):
        ub = None
        if quant == FP8 and group is None:       # vLLM: the mean of the norm's output
            ub = torch.mean(_vllm_rms_norm(x, w, residual)[0]).to(torch.float32)
        rq, rs, rr = _vllm_ref(x, w, residual, quant, ub, group)
        res_dev = residual.clone().to(device) if residual is not None else None
        with mk.use_backend(backend):
            if group is None:
                q, s = vllm_ops.rms_norm_dynamic_per_token_quant(
                    x.to(device), w.to(device), 1e-6, quant,
                    ub.to(device) if ub is not None else None, res_dev)
            else:
                q, s = vllm_ops.rms_norm_per_block_quant(
                    x.to(device), w.to(device), 1e-6, quant, [1, group], None, res_dev, True)
                assert s.t().is_contiguous()
        q, s = q.cpu(), s.cpu()
        assert q.dtype == quant
        if quant == torch.int8:
            assert torch.allclose(rs, s, atol=1e-6)
            assert torch.allclose(rq.float(), q.float(), atol=1)
        else:
            assert torch.allclose(rs, s)
            a, b = rq.float(), q.float()
            if not torch.allclose(a, b, atol=1e-6):
                sa = rs.repeat_interleave(group, 1) if group else rs
                sb = s.repeat_interleave(group, 1) if group else s
                assert torch.allclose(a * sa, b * sb, rtol=5e-2, atol=5e-2)
        if residual is not None:
            assert torch.allclose(rr, res_dev.cpu())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tokens,hidden", [(1, 8), (7, 769), (4, 5120)])
@pytest.mark.parametrize("quant_scale", [0.01, 1.0, 10.0])
def test_vllm_fused_rms_norm_static_quant(device, backend, tokens, hidden, quant_scale):
    """vLLM's tests/kernels/core/test_layernorm.py::test_fused_rms_norm_quant: the fused
    static fp8 ops against rms_norm / fused_add_rms_norm then static_scaled_fp8_quant."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    w = torch.empty(hidden, dtype=dt).normal_(mean=1.0, std=0.1).to(device)
    x_base = torch.randn(tokens, 2 * hidden, dtype=dt).to(device)
    x = x_base[:, :hidden]
    x *= 1 / (2 * hidden)
    scale = torch.tensor(quant_scale, dtype=torch.float32, device=device)
    with mk.use_backend(backend):
        for add_residual in (False, True):
            out_fused = torch.zeros(tokens, hidden, dtype=FP8, device=device)
            out = torch.zeros_like(out_fused)
            if add_residual:
                residual = torch.randn_like(x) / (2 * hidden)
                residual_fused = residual.clone()
                vllm_ops.fused_add_rms_norm_static_fp8_quant(out_fused, x, residual_fused, w,
                                                             scale, 1e-6)
                x_unfused = x.clone()
                vllm_ops.fused_add_rms_norm(x_unfused, residual, w, 1e-6)
                vllm_ops.static_scaled_fp8_quant(out, x_unfused.contiguous(), scale)
                torch.testing.assert_close(residual_fused, residual, atol=1e-2, rtol=1e-2)
            else:
                vllm_ops.rms_norm_static_fp8_quant(out_fused, x, w, scale, 1e-6)
                out_norm = torch.empty_like(x)
                vllm_ops.rms_norm(out_norm, x, w, 1e-6)
                vllm_ops.static_scaled_fp8_quant(out, out_norm, scale)
            torch.testing.assert_close(out.float(), out_fused.float(), atol=1e-3, rtol=1e-3)


def test_vllm_fp8_quant_out_forms(device):
    x = torch.randn(5, 40, device=device, dtype=torch.bfloat16)
    out = torch.empty(5, 40, dtype=FP8, device=device)
    s = torch.empty(1, device=device)
    vllm_ops.dynamic_scaled_fp8_quant(out, x, s)
    q, want_s = vllm_ops.scaled_fp8_quant(x)
    assert torch.equal(s, want_s) and torch.equal(codes(out), codes(q))
    scales = torch.empty(5, 1, device=device)
    ub = torch.tensor([1.0], device=device)
    vllm_ops.dynamic_per_token_scaled_fp8_quant(out, x, scales, ub)
    q, want_s = vllm_ops.scaled_fp8_quant(x, scale_ub=ub, use_per_token_if_dynamic=True)
    assert torch.equal(scales, want_s) and torch.equal(codes(out), codes(q))
    with pytest.raises(ValueError, match="scales"):
        vllm_ops.dynamic_per_token_scaled_fp8_quant(out, x, torch.empty(4, device=device))


def test_reference_checked_against_the_formula():
    """The reference itself: int8 per token by hand."""
    x = torch.tensor([[3.0, -4.0, 0.0, 1.0]])
    w = torch.tensor([1.0, 2.0, 1.0, 1.0])
    q, s, _ = reference.rms_norm_quant(x, w, None, 0.0, 0.0, torch.int8, None, 0, None, 0.0)
    y = x * torch.rsqrt(x.pow(2).mean()) * w
    assert torch.equal(s, y.abs().amax(-1).reshape(1, 1) / 127)
    assert q.tolist() == [[round(float(v)) for v in (y / s)[0]]]
