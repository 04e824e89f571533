"""A gated activation fused with int8 / fp8 quantization (ops.act_and_mul_quant; vLLM's
silu_and_mul_quant / silu_and_mul_per_block_quant): the Triton kernel equals the unfused
Triton pair (silu_and_mul / gelu_and_mul, then the quantizer's math) bit for bit, and the
fp32 reference within one quantization step (the activation's exp / erf may differ by an
ulp), over random shapes, modes, dtypes and strided views; rows that stream; vLLM's
formulas through the compat layer; opcheck and errors."""
from __future__ import annotations

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rms_norm_quant import (assert_kernel_matches, assert_within_a_step, codes,
                                 strided)

import minikernels as mk
from minikernels.compat import vllm_ops
from minikernels.ops import reference

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QUANT = [torch.int8, FP8]
ACTS = ["silu", "gelu", "gelu_tanh"]


def run(backend, *args, **kw):
    with mk.use_backend(backend):
        return mk.ops.act_and_mul_quant(*args, **kw)


def unfused_kernels(x, quant, act, scale, group, ub, min_scale):
    """The Triton activation, then the reference quantizer on exactly its output."""
    with mk.use_backend("triton"):
        y = mk.ops.silu_and_mul(x) if act == "silu" else \
            mk.ops.gelu_and_mul(x, "tanh" if act == "gelu_tanh" else "none")
    y2 = y.reshape(-1, y.shape[-1]).float().cpu()
    q, s = reference.quantize_rows(y2, quant, scale, group or 0, ub, min_scale)
    return q.view(y.shape), s.view(*y.shape[:-1], s.shape[-1]) if scale is None else s


def assert_dequantizes_near(got, x, act, quant, group, round_to_input=True) -> None:
    """q * scale is within one quantization step of the fp32 activation (plus a rounding
    of the input dtype): the kernel against the formula, robust to an ulp of exp / erf."""
    q, s = (t.cpu().float() for t in got)
    xf = x.float().reshape(-1, x.shape[-1])
    d = xf.shape[-1] // 2
    gate = xf[:, :d]
    a = torch.nn.functional.silu(gate) if act == "silu" else \
        torch.nn.functional.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")
    y = a * xf[:, d:]
    g = group or d
    step = s.reshape(y.shape[0], -1).repeat_interleave(g, dim=1)
    deq = q.reshape(y.shape) * step
    err = (deq - y).abs()
    # the input dtype's rounding, and the fp32 formula's absolute error in a far tail
    # (gelu at g = -5: 1 + erf(g / sqrt 2) cancels to ~6e-7, known to ~1e-7), times |up|
    rounding = (2.0**-7 if round_to_input else 2.0**-20) * y.abs() + \
        1e-6 * (1 + (gate * xf[:, d:]).abs())
    if quant == torch.int8:
        assert (err <= step + rounding).all(), float((err - step - rounding).max())
    else:
        assert (err <= y.abs() / 8 + step * 2.0**-8 + rounding).all()


@settings(max_examples=examples(24), deadline=None)
@given(rows=st.integers(0, 4), inter=st.sampled_from([1, 7, 64, 96, 130, 384]),
       dtype=st.sampled_from(DTYPES), quant=st.sampled_from(QUANT), act=st.sampled_from(ACTS),
       mode=st.sampled_from(["token", "group", "static"]), ub=st.booleans(),
       view=st.sampled_from(["plain", "rows", "step"]), seed=st.integers(0, 2**16))
def test_equals_the_unfused_kernels(device, rows, inter, dtype, quant, act, mode, ub, view,
                                    seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * inter, generator=gen) * 3).to(dtype)
    group = next(g for g in (32, 48, 7, 1) if inter % g == 0) if mode == "group" else None
    scale = torch.tensor([0.05]) if mode == "static" else None
    scale_ub = torch.tensor([1.5]) if ub and mode != "static" else None
    min_scale = mk.ops.norm_quant.default_min_scale(quant, group)
    want = unfused_kernels(x.to(device), quant, act, scale, group, scale_ub, min_scale)
    got = run("triton", strided(x.to(device), view), quant, act,
              scale=None if scale is None else scale.to(device), group_size=group,
              scale_ub=None if scale_ub is None else scale_ub.to(device))
    if mode == "static":
        got, want = got[:1], want[:1]
    assert_kernel_matches(got, want, dtype, static=mode == "static")
    if mode == "token" and not ub and rows and inter:
        assert_dequantizes_near(run("triton", x.to(device), quant, act), x, act, quant, None)
    elif mode == "group" and not ub and rows:
        assert_dequantizes_near(run("triton", x.to(device), quant, act, group_size=group), x,
                                act, quant, group)


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("mode,inter", [("token", 9000), ("group", 10240), ("static", 8200),
                                        ("token", 5000)])
@pytest.mark.parametrize("round_to_input", [True, False])
def test_long_rows_stream(device, quant, mode, inter, round_to_input):
    """Outputs past one register tile (streamed; 5000 is one padded tile)."""
    gen = torch.Generator().manual_seed(inter)
    x = torch.randn(2, 2 * inter, generator=gen).to(torch.float16)
    group = 128 if mode == "group" else None
    scale = torch.tensor([0.02]) if mode == "static" else None
    got = run("triton", x.to(device), quant, "silu", scale=scale if scale is None else
              scale.to(device), group_size=group, round_to_input=round_to_input)
    want = run("reference", x, quant, "silu", scale=scale, group_size=group,
               round_to_input=round_to_input)
    if mode == "static":
        q, rq = codes(got[0].cpu()), codes(want[0])
        assert (q != rq).float().mean() <= 0.01
    else:
        assert_within_a_step(got, want, torch.float16)
        assert_dequantizes_near(got, x, "silu", quant, group, round_to_input)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_equals_the_unfused_ops(device, backend):
    """act_and_mul_quant == silu_and_mul then the op a W8A8 down_proj runs, exactly."""
    torch.manual_seed(1)
    x = torch.randn(5, 2 * 256, device=device, dtype=torch.bfloat16)
    dt = torch.bfloat16
    with mk.use_backend(backend):
        y = mk.ops.silu_and_mul(x)
        assert_kernel_matches(mk.ops.act_and_mul_quant(x, torch.int8),
                              tuple(t.cpu() for t in mk.ops.scaled_int8_quant(y)[:2]), dt)
        assert_kernel_matches(mk.ops.act_and_mul_quant(x, FP8, group_size=128),
                              tuple(t.cpu() for t in mk.ops.per_token_group_quant_fp8(y, 128)),
                              dt)
        y = mk.ops.gelu_and_mul(x, "tanh")
        assert_kernel_matches(mk.ops.act_and_mul_quant(x, torch.int8, "gelu_tanh"),
                              tuple(t.cpu() for t in mk.ops.scaled_int8_quant(y)[:2]), dt)


def test_shapes_and_zero_rows(device):
    x = torch.zeros(2, 3, 128, device=device)
    q, s = run("triton", x, torch.int8, group_size=16)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 4) and (q == 0).all() and (s == 0).all()
    q, s = run("triton", x[:, :0], FP8)
    assert q.shape == (2, 0, 64) and s.shape == (2, 0, 1)
    q, s = run("triton", torch.zeros(3, 0, device=device), FP8)
    assert q.shape == (3, 0) and s.shape == (3, 1)


def test_opcheck(device):
    x = torch.randn(3, 128, device=device, dtype=torch.bfloat16)
    op = torch.ops.minikernels.act_and_mul_quant
    torch.library.opcheck(op, (x, "silu", torch.int8, None, 16, None, 0.0, True))
    torch.library.opcheck(op, (x, "gelu", torch.int8, torch.tensor([0.1], device=device), 0,
                               None, 0.0, False))


def test_bad_inputs():
    f = mk.ops.act_and_mul_quant
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="even"):
        f(torch.randn(3, 63))
    with pytest.raises(ValueError, match="activation"):
        f(x, torch.int8, "relu")
    with pytest.raises(TypeError, match="quant_dtype"):
        f(x, torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        f(x, torch.int8, group_size=5)
    with pytest.raises(ValueError, match="static"):
        f(x, torch.int8, scale=torch.tensor([1.0]), scale_ub=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="round_to_input"):
        f(x, torch.int8, round_to_input=1)
    with pytest.raises(ValueError, match="scale_ub"):
        vllm_ops.silu_and_mul_per_block_quant(x, 16, torch.int8, torch.ones(1))
    with pytest.raises(ValueError, match="out"):
        vllm_ops.silu_and_mul_quant(torch.empty(3, 64, dtype=FP8), x, torch.ones(1))


# ------------------------------------------------------------ vLLM's semantics, written out

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("transposed", [False, True])
def test_vllm_silu_and_mul_per_block_quant(device, backend, quant, transposed):
    """vLLM's silu_and_mul_per_block_quant: the fp32 product silu(gate) * up (not rounded to
    the dtype), per token and group, s = max(min(max |y|, ub) / qmax, 1 / (qmax * 512))."""
    torch.manual_seed(0)
    x = torch.randn(7, 2 * 256, dtype=torch.bfloat16)
    ub = torch.tensor([0.5]) if quant == FP8 else None
    xf = x.float()
    y = torch.nn.functional.silu(xf[:, :256]) * xf[:, 256:]
    g = y.view(7, -1, 64)
    qmax = 127.0 if quant == torch.int8 else 448.0
    amax = g.abs().amax(-1)
    if ub is not None:
        amax = amax.clamp(max=float(ub))
    s = (amax / qmax).clamp(min=1 / (qmax * 512))
    v = (g / s[..., None]).clamp(-qmax, qmax)
    want_q = (v.round() if quant == torch.int8 else v).to(quant).view(7, 256)
    with mk.use_backend(backend):
        q, got_s = vllm_ops.silu_and_mul_per_block_quant(
            x.to(device), 64, quant, None if ub is None else ub.to(device), transposed)
    assert got_s.shape == (7, 4) and got_s.t().is_contiguous() == transposed
    torch.testing.assert_close(got_s.cpu(), s, rtol=1e-6, atol=0)
    diff = (q.cpu().float() - want_q.float()).abs()
    assert (diff <= (want_q.float().abs() / 8 + 1)).all()
    assert (codes(q.cpu()) != codes(want_q)).float().mean() < 0.01


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0])
def test_vllm_silu_and_mul_quant_static(device, backend, scale):
    """torch.ops._C.silu_and_mul_quant against silu_and_mul then static_scaled_fp8_quant
    (vLLM's fusion tests compare those two)."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 2 * 100, dtype=torch.bfloat16, device=device)
    s = torch.tensor([scale], device=device)
    with mk.use_backend(backend):
        out = torch.empty(5, 2, 100, dtype=FP8, device=device)
        vllm_ops.silu_and_mul_quant(out, x, s)
        y = torch.empty(5, 2, 100, dtype=torch.bfloat16, device=device)
        vllm_ops.silu_and_mul(y, x)
        want = torch.empty(10, 100, dtype=FP8, device=device)
        vllm_ops.static_scaled_fp8_quant(want, y.view(10, 100), s)
    assert torch.equal(codes(out.view(10, 100)), codes(want))
