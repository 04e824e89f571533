"""Mamba-1's peer APIs on ops.selective_scan: mamba_ssm's ``selective_scan_fn`` and the
per-channel form of ``selective_state_update`` (minikernels.compat.mamba_ssm), vLLM's
``selective_scan_fwd`` / ``selective_scan_fn`` and the Mamba-1 form of its
``selective_state_update`` (minikernels.compat.vllm_ops): against an fp64 loop written here
from the peers' documented semantics (mamba_ssm's ``selective_scan_ref`` /
``selective_state_update_ref``: layouts, groups, time-invariant B / C, restarts at
cu_seqlens, dtypes of out and last_state; vLLM: output into delta / z, padding, slots,
has_initial_state, empty sequences, state pools in u's dtype) and against transformers' own
PyTorch fallbacks; errors name the peer's argument."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minikernels as mk
from minikernels.compat import mamba_ssm as ms
from minikernels.compat import vllm_ops as vo

DTYPES = [torch.float32, torch.bfloat16]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int, device: str = "cpu", scale: float = 1.0
          ) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(device)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: tight; bf16: about one rounding of the output (fp32 math inside)."""
    got, want = got.double().cpu(), want.double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        tol = 2e-2 * max(float(want.abs().max()), 1.0)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=tol)


def _scan_ref(x, dt, A, B, C, D=None, z=None, bias=None, softplus=False, h0=None):
    """One sequence in fp64: x, dt, z [L, d]; A [d, n]; B, C [L, d, n] (each channel's row);
    D, bias [d]; h0 [d, n] or None (zeros). Returns (y [L, d], final state [d, n])."""
    x, dt, A, B, C = (t.double().cpu() for t in (x, dt, A, B, C))
    d = dt + (0 if bias is None else bias.double().cpu())
    d = F.softplus(d) if softplus else d
    s = torch.zeros(A.shape, dtype=torch.float64) if h0 is None else h0.double().cpu().clone()
    ys = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        s = s * torch.exp(d[t, :, None] * A) + (d[t] * x[t])[:, None] * B[t]
        ys[t] = (s * C[t]).sum(-1)
    if D is not None:
        ys = ys + D.double().cpu() * x
    if z is not None:
        ys = ys * F.silu(z.double().cpu())
    return ys, s


def _channels(bc: torch.Tensor, dim: int) -> torch.Tensor:
    """B / C of one sequence, [L, g, n] -> each channel's row [L, dim, n]."""
    return bc.repeat_interleave(dim // bc.shape[1], dim=1)


# ------------------------------------------------------------ mamba_ssm: selective_scan_fn
BC_FORMS = ["bnl", "bgnl", "fixed"]    # [b, n, l], [b, g, n, l], time-invariant [dim, n]


def _bc(form: str, gen, b, dim, g, n, l, dtype, device):
    """B, C in mamba_ssm's layout, and each row's per-channel rows [b][l, dim, n]."""
    if form == "fixed":
        B, C = _rand(gen, dim, n, device=device), _rand(gen, dim, n, device=device)
        rows = [(B[None].expand(l, dim, n), C[None].expand(l, dim, n))] * b
        return B, C, rows
    groups = 1 if form == "bnl" else g
    B = _rand(gen, b, groups, n, l, device=device).to(dtype)
    C = _rand(gen, b, groups, n, l, device=device).to(dtype)
    rows = [tuple(_channels(t[r].permute(2, 0, 1), dim) for t in (B, C)) for r in range(b)]
    if form == "bnl":
        B, C = B[:, 0], C[:, 0]
    return B, C, rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", BC_FORMS)
def test_selective_scan_fn(device, dtype, form) -> None:
    gen = _g(0)
    b, dim, g, n, l = 2, 6, 2, 5, 7
    u = _rand(gen, b, dim, l, device=device).to(dtype)
    delta = (_rand(gen, b, dim, l, device=device) - 1.0).to(dtype)
    A = -(torch.rand(dim, n, generator=gen) + 0.3).to(device)
    B, C, rows = _bc(form, gen, b, dim, g, n, l, dtype, device)
    D, bias = _rand(gen, dim, device=device), _rand(gen, dim, device=device, scale=0.5)
    z = _rand(gen, b, dim, l, device=device).to(dtype)
    for D_arg, z_arg, bias_arg, softplus in ((D, z, bias, True), (None, None, None, False),
                                             (D, None, bias, True)):
        out, last = ms.selective_scan_fn(u, delta.abs() if not softplus else delta, A, B, C,
                                         D_arg, z_arg, bias_arg, softplus,
                                         return_last_state=True)
        assert out.shape == u.shape and out.dtype == dtype
        assert last.shape == (b, dim, n) and last.dtype == torch.float32
        for r in range(b):
            ys, s = _scan_ref(u[r].t(), (delta.abs() if not softplus else delta)[r].t(), A,
                              *rows[r], D_arg, None if z_arg is None else z_arg[r].t(),
                              bias_arg, softplus)
            _close(out[r].t(), ys, dtype)
            _close(last[r], s, dtype)
    alone = ms.selective_scan_fn(u, delta, A, B, C, D, z, bias, True)
    assert isinstance(alone, torch.Tensor)
    torch.testing.assert_close(alone, ms.selective_scan_fn(u, delta, A, B, C, D, z, bias,
                                                           True, True)[0])


def test_selective_scan_fn_cu_seqlens(device) -> None:
    """cu_seqlens (mamba_ssm's newer keyword): every row's scan restarts from zero at the
    inner boundaries; last_state is the state after each row's last token."""
    gen = _g(1)
    b, dim, n, l = 2, 4, 3, 9
    u, delta = _rand(gen, b, dim, l, device=device), _rand(gen, b, dim, l, device=device)
    A = -(torch.rand(dim, n, generator=gen) + 0.3).to(device)
    B, C = _rand(gen, b, n, l, device=device), _rand(gen, b, n, l, device=device)
    for bounds in ([0, 3, 3, 7, 9], [0, 4, 9, 9]):          # an empty sequence; a last one
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        out, last = ms.selective_scan_fn(u, delta, A, B, C, delta_softplus=True,
                                         return_last_state=True, cu_seqlens=cu)
        for r in range(b):
            s = None
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                if hi == lo:
                    continue
                ys, s = _scan_ref(u[r, :, lo:hi].t(), delta[r, :, lo:hi].t(), A,
                                  *(_channels(t[r, :, lo:hi].t()[:, None], dim)
                                    for t in (B, C)), softplus=True)
                _close(out[r, :, lo:hi].t(), ys, torch.float32)
            _close(last[r], s, torch.float32)


def test_selective_scan_fn_matches_transformers_fallback() -> None:
    """transformers' mamba_selective_scan (its PyTorch fallback of selective_scan_fn) on the
    strided views its Mamba mixer passes (transposed [b, l, d] activations)."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    gen = _g(2)
    b, dim, n, l = 2, 8, 4, 6
    hs = _rand(gen, b, l, dim)                       # [b, l, d]: the mixer's layouts
    proj = _rand(gen, b, l, 2 * n + 3)
    dt = _rand(gen, b, dim, l)
    z = _rand(gen, b, l, 2 * dim)[..., dim:]
    A = -torch.exp(torch.rand(dim, n, generator=gen))
    D, bias = _rand(gen, dim), _rand(gen, dim, scale=0.5)
    args = (hs.transpose(1, 2), dt, A, proj[..., 3:3 + n].transpose(1, 2),
            proj[..., 3 + n:].transpose(1, 2))
    kw = dict(D=D, z=z.transpose(1, 2), delta_bias=bias, delta_softplus=True,
              return_last_state=True)
    out, last = ms.selective_scan_fn(*args, **kw)
    rout, rlast = mamba_selective_scan.__wrapped__(*args, **kw)
    torch.testing.assert_close(out, rout, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, rlast.float(), rtol=1e-4, atol=1e-5)


def test_selective_scan_fn_triton(device) -> None:
    """The Triton kernel (interpreter on CPU) under the mamba_ssm API: groups, z, last
    state, bf16."""
    gen = _g(3)
    b, dim, g, n, l = 2, 6, 2, 16, 5
    u = _rand(gen, b, dim, l, device=device).to(torch.bfloat16)
    delta = _rand(gen, b, dim, l, device=device).to(torch.bfloat16)
    A = -(torch.rand(dim, n, generator=gen) + 0.3).to(device)
    B, C, rows = _bc("bgnl", gen, b, dim, g, n, l, torch.bfloat16, device)
    z = _rand(gen, b, dim, l, device=device).to(torch.bfloat16)
    with mk.use_backend("triton"):
        out, last = ms.selective_scan_fn(u, delta, A, B, C, None, z, None, True, True)
    for r in range(b):
        ys, s = _scan_ref(u[r].t(), delta[r].t(), A, *rows[r], z=z[r].t(), softplus=True)
        _close(out[r].t(), ys, torch.bfloat16)
        _close(last[r], s, torch.bfloat16)


def test_selective_scan_fn_refusals() -> None:
    gen = _g(4)
    b, dim, n, l = 1, 4, 3, 5
    u, delta = _rand(gen, b, dim, l), _rand(gen, b, dim, l)
    A = -torch.rand(dim, n, generator=gen)
    B, C = _rand(gen, b, n, l), _rand(gen, b, n, l)
    cases = [
        (NotImplementedError, "A complex", dict(A=torch.complex(A, A))),
        (NotImplementedError, "B of shape .dim, dstate.", dict(B=_rand(gen, dim, n))),
        (NotImplementedError, "C of shape .dim, dstate.", dict(C=_rand(gen, dim, n))),
        (ValueError, r"A must have shape \[4, \*\]", dict(A=A[:3])),
        (ValueError, r"delta must have shape \[1, 4, 5\]", dict(delta=delta[..., :4])),
        (ValueError, "B must have shape", dict(B=B[..., :4])),
        (ValueError, "C must have B's groups", dict(B=_rand(gen, b, 2, n, l),
                                                     C=_rand(gen, b, 4, n, l))),
        (ValueError, r"D must have shape \[4\]", dict(D=torch.ones(3))),
        (ValueError, "z must have shape", dict(z=u[:, :2])),
        (TypeError, "delta_softplus must be a bool", dict(delta_softplus=1)),
        (ValueError, "cu_seqlens must be non-decreasing from 0 to seqlen = 5",
         dict(cu_seqlens=torch.tensor([0, 3, 4]))),
        (ValueError, "cu_seqlens must have k", dict(cu_seqlens=torch.tensor([0]))),
    ]
    for exc, msg, over in cases:
        kw = dict(u=u, delta=delta, A=A, B=B, C=C) | over
        with pytest.raises(exc, match=msg):
            ms.selective_scan_fn(**kw)


# ------------------------------------------------ mamba_ssm: selective_state_update, Mamba-1
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_selective_state_update_mamba1(device, dtype, pool_dtype) -> None:
    """state [S, dim, dstate] (in place), x / dt / z [batch, dim], per-channel A [dim,
    dstate], B / C [batch, dstate], D / dt_bias [dim]; -1 = padding row."""
    gen = _g(5)
    bsz, dim, n = 3, 6, 4
    x = _rand(gen, bsz, dim, device=device).to(dtype)
    dt = _rand(gen, bsz, dim, device=device).to(dtype)
    A = -(torch.rand(dim, n, generator=gen) + 0.3).to(device)
    B, C = (_rand(gen, bsz, n, device=device).to(dtype) for _ in range(2))
    D, bias = _rand(gen, dim, device=device), _rand(gen, dim, device=device, scale=0.5)
    z = _rand(gen, bsz, dim, device=device).to(dtype)
    state = _rand(gen, 5, dim, n, device=device).to(pool_dtype)
    idx = torch.tensor([3, -1, 0], device=device)
    for z_arg in (None, z):
        pool = state.clone()
        y = ms.selective_state_update(pool, x, dt, A, B, C, D, z_arg, bias, True, idx)
        assert y.shape == x.shape and y.dtype == dtype
        for r, slot in ((0, 3), (2, 0)):
            ys, s = _scan_ref(x[r:r + 1], dt[r:r + 1], A, B[r:r + 1, None].expand(1, dim, n),
                              C[r:r + 1, None].expand(1, dim, n), D,
                              None if z_arg is None else z_arg[r:r + 1], bias, True,
                              state[slot])
            _close(y[r], ys[0], dtype)
            _close(pool[slot], s, pool_dtype)
        assert torch.equal(y[1].float().cpu(), torch.zeros(dim))        # padding row
        assert torch.equal(pool[[1, 2, 4]], state[[1, 2, 4]])


def test_selective_state_update_mamba1_matches_transformers() -> None:
    from transformers.models.mamba.modeling_mamba import mamba_selective_state_update

    gen = _g(6)
    bsz, dim, n = 2, 8, 4
    x, dt, z = _rand(gen, bsz, dim), _rand(gen, bsz, dim), _rand(gen, bsz, dim)
    A = -torch.exp(torch.rand(dim, n, generator=gen))
    B, C = _rand(gen, bsz, n), _rand(gen, bsz, n)
    D, bias = _rand(gen, dim), _rand(gen, dim, scale=0.5)
    ours, theirs = (_rand(_g(7), bsz, dim, n) for _ in range(2))
    for _ in range(3):                                   # three decode steps, state carried
        y = ms.selective_state_update(ours, x, dt, A, B, C, D, z=z, dt_bias=bias,
                                      dt_softplus=True)
        ry = mamba_selective_state_update.__wrapped__(theirs, x, dt, A, B, C, D, z=z,
                                                      dt_bias=bias, dt_softplus=True)
        torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_selective_state_update_heads_with_per_channel_values(device) -> None:
    """The head form with A / dt / D / dt_bias varying along the head dim (vLLM's
    non-TIE_HDIM case) runs on selective_scan: h * p channels, g groups of heads."""
    gen = _g(8)
    bsz, h, p, g, n = 2, 4, 3, 2, 5
    x = _rand(gen, bsz, h, p, device=device)
    dt = _rand(gen, bsz, h, p, device=device)
    A = -(torch.rand(h, p, n, generator=gen) + 0.3).to(device)
    B, C = (_rand(gen, bsz, g, n, device=device) for _ in range(2))
    D, bias = _rand(gen, h, p, device=device), _rand(gen, h, p, device=device, scale=0.5)
    state = _rand(gen, 3, h, p, n, device=device)
    pool = state.clone()
    with mk.use_backend("triton"):
        y = ms.selective_state_update(pool, x, dt, A, B, C, D, None, bias, True,
                                      torch.tensor([2, 0], device=device))
    for r, slot in ((0, 2), (1, 0)):
        rows = (t[r:r + 1].repeat_interleave(h // g, 1)[:, :, None].expand(1, h, p, n)
                .reshape(1, h * p, n) for t in (B, C))
        ys, s = _scan_ref(x[r:r + 1].flatten(1), dt[r:r + 1].flatten(1), A.flatten(0, 1),
                          *rows, D.flatten(), None, bias.flatten(), True,
                          state[slot].flatten(0, 1))
        _close(y[r].flatten(), ys[0], torch.float32)
        _close(pool[slot].flatten(0, 1), s, torch.float32)


# --------------------------------------------------------------------- vLLM: Mamba-1 ops
def _vllm_inputs(gen, lens, dim, g, n, dtype, device):
    total = sum(lens)
    u = _rand(gen, dim, total, device=device).to(dtype)
    delta = (_rand(gen, dim, total, device=device) * 0.5).to(dtype)
    A = -(torch.rand(dim, n, generator=gen) * 0.5 + 0.2).to(device)
    B = _rand(gen, g, n, total, device=device).to(dtype)
    C = _rand(gen, g, n, total, device=device).to(dtype)
    D, bias = _rand(gen, dim, device=device), torch.rand(dim, generator=gen).to(device) * 0.5
    z = _rand(gen, dim, total, device=device).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    return u, delta, A, B, C, D, bias, z, cu


def _vllm_expected(u, delta, A, B, C, D, bias, z, cu, slots, init, states, pad):
    """vLLM's varlen semantics per sequence: y (ungated) and y * silu(z) per token, the
    final state per used slot; padding rows and empty sequences skipped."""
    dim = u.shape[0]
    ys = torch.zeros(dim, u.shape[1], dtype=torch.float64)
    gated = torch.zeros_like(ys)
    new = states.double().cpu().clone()
    bounds = cu.tolist()
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        slot = int(slots[i])
        if slot == pad or hi == lo:
            continue
        h0 = states[slot] if bool(init[i]) else None
        rows = [_channels(t[:, :, lo:hi].permute(2, 0, 1), dim) for t in (B, C)]
        y, s = _scan_ref(u[:, lo:hi].t(), delta[:, lo:hi].t(), A, *rows, D, None, bias, True,
                         h0)
        ys[:, lo:hi] = y.t()
        gated[:, lo:hi] = (y * F.silu(z[:, lo:hi].t().double().cpu())).t()
        new[slot] = s
    return ys, gated, new


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", ["fp32", "like_u"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_vllm_selective_scan_fn_varlen(device, dtype, state_dtype, backend) -> None:
    """vLLM's varlen prefill: out into delta (and z, gated), padding rows (pad_slot_id),
    has_initial_state, an empty sequence (its slot untouched), a pool in u's dtype."""
    gen = _g(9)
    lens, dim, g, n = [3, 2, 0, 4, 1], 6, 2, 16
    u, delta, A, B, C, D, bias, z, cu = _vllm_inputs(gen, lens, dim, g, n, dtype, device)
    pool_dtype = torch.float32 if state_dtype == "fp32" else dtype
    states = _rand(gen, 8, dim, n, device=device).to(pool_dtype)
    pad = 7
    slots = torch.tensor([5, pad, 2, 0, 3], dtype=torch.int32, device=device)
    init = torch.tensor([True, True, False, False, True], device=device)
    want_y, want_z, want_s = _vllm_expected(u, delta, A, B, C, D, bias, z, cu, slots, init,
                                            states, pad)
    for with_z in (False, True):
        pool, d_buf, z_buf = states.clone(), delta.clone(), z.clone()
        with mk.use_backend(backend):
            ret = vo.selective_scan_fn(u, pool, d_buf, A, B, C, D, z_buf if with_z else None,
                                       bias, True, cu, slots, init, pad_slot_id=pad)
        assert ret is (z_buf if with_z else d_buf)
        live = torch.ones(u.shape[1], dtype=torch.bool)
        live[3:5] = False                                    # the padding row's tokens
        _close(d_buf.cpu()[:, live], want_y[:, live], dtype)
        assert torch.equal(d_buf.cpu()[:, ~live].float(), torch.zeros(dim, 2))
        if with_z:
            _close(z_buf.cpu()[:, live], want_z[:, live], dtype)
        _close(pool.float(), want_s, pool_dtype)
        assert torch.equal(pool[[1, 4, 6, 7]], states[[1, 4, 6, 7]])   # 2: empty sequence
        assert torch.equal(pool[2], states[2])


def test_vllm_selective_scan_fwd_chunks_and_batch_layout(device) -> None:
    """A prompt run in two calls (the second from its slot, has_initial_state True) equals
    one call (vLLM's scan_chunks test), in the non-varlen [batch, dim, seqlen] layout with
    cache_indices None (row i in slot i) and B / C [batch, dstate, seqlen]."""
    gen = _g(10)
    b, dim, n, l = 2, 5, 4, 8
    u, delta = _rand(gen, b, dim, l, device=device), _rand(gen, b, dim, l, device=device)
    A = -(torch.rand(dim, n, generator=gen) + 0.3).to(device)
    B, C = _rand(gen, b, n, l, device=device), _rand(gen, b, n, l, device=device)
    z, bias = _rand(gen, b, dim, l, device=device), _rand(gen, dim, device=device, scale=0.3)
    whole = torch.zeros(b, dim, n, device=device)
    out_whole = vo.selective_scan_fn(u, whole, delta.clone(), A, B, C, None, z.clone(), bias,
                                     True)
    split = torch.zeros(b, dim, n, device=device)
    parts = []
    for lo, hi, init in ((0, 3, None), (3, 8, torch.ones(b, dtype=torch.bool,
                                                          device=device))):
        parts.append(vo.selective_scan_fn(u[..., lo:hi], split, delta[..., lo:hi].clone(),
                                          A, B[..., lo:hi], C[..., lo:hi], None,
                                          z[..., lo:hi].clone(), bias, True,
                                          has_initial_state=init))
    torch.testing.assert_close(torch.cat(parts, -1), out_whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    for r in range(b):
        ys, s = _scan_ref(u[r].t(), delta[r].t(), A, *(_channels(t[r].t()[:, None], dim)
                                                       for t in (B, C)),
                          None, z[r].t(), bias, True)
        _close(out_whole[r].t(), ys, torch.float32)
        _close(whole[r], s, torch.float32)


def test_vllm_selective_scan_fwd_refusals(device) -> None:
    gen = _g(11)
    u, delta, A, B, C, D, bias, z, cu = _vllm_inputs(gen, [2, 3], 4, 1, 3, torch.float32,
                                                     device)
    states = torch.zeros(3, 4, 3, device=device)
    base = dict(u=u, delta=delta, A=A, B=B, C=C, D_=D, z_=z, delta_bias_=bias,
                delta_softplus=True, query_start_loc=cu, cache_indices=None,
                has_initial_state=None, ssm_states=states, pad_slot_id=-1)
    cases = [
        (ValueError, "block_idx_first_scheduled_token", dict(
            block_idx_first_scheduled_token=torch.zeros(2, dtype=torch.int32))),
        (ValueError, "initial_state_idx", dict(initial_state_idx=torch.zeros(2))),
        (ValueError, "cu_chunk_seqlen", dict(cu_chunk_seqlen=cu)),
        (TypeError, "delta must have dtype", dict(delta=delta.half())),
        (ValueError, "ssm_states must have shape", dict(ssm_states=states[:, :2])),
        (ValueError, r"query_start_loc\[-1\]", dict(query_start_loc=torch.tensor(
            [0, 1, 1], dtype=torch.int32, device=device))),
        (ValueError, "cache_indices values must be", dict(
            cache_indices=torch.tensor([0, 5], dtype=torch.int32, device=device))),
        (ValueError, "cache_indices must be distinct", dict(
            cache_indices=torch.tensor([1, 1], dtype=torch.int32, device=device))),
        (ValueError, "B must have shape", dict(B=B[..., :3])),
        (TypeError, "pad_slot_id must be an int", dict(pad_slot_id=None)),
    ]
    for exc, msg, over in cases:
        with pytest.raises(exc, match=msg):
            vo.selective_scan_fwd(**(base | over))


@pytest.mark.parametrize("itype", DTYPES)
def test_vllm_selective_state_update_mamba1(device, itype) -> None:
    """vLLM's Mamba-1 decode step as its tests call it: state [S, dim, dstate] in x's dtype,
    B / C fp32 beside bf16 x, out=, padded state_batch_indices (pad_slot_id 0: vLLM's null
    block), separate dst slots, and the varlen form (cu_seqlens: tokens continue)."""
    gen = _g(12)
    bsz, dim, n, pad = 3, 8, 4, 0
    state = _rand(gen, 6, dim, n, device=device).to(itype)
    x = _rand(gen, bsz + 1, dim, device=device).to(itype)
    dt = _rand(gen, bsz + 1, dim, device=device).to(itype)
    A = -(torch.rand(dim, n, generator=gen) + 1.0).to(device)
    B, C = _rand(gen, bsz + 1, n, device=device), _rand(gen, bsz + 1, n, device=device)
    D, bias = _rand(gen, dim, device=device), (torch.rand(dim, generator=gen) - 2.0).to(device)
    z = _rand(gen, bsz + 1, dim, device=device).to(itype)
    src = torch.tensor([4, 2, 5, pad], dtype=torch.int32, device=device)
    dst = torch.tensor([1, 3, 5, pad], dtype=torch.int32, device=device)
    pool, out = state.clone(), torch.empty_like(x)
    ret = vo.selective_state_update(pool, x, dt, A, B, C, D=D, z=z, dt_bias=bias,
                                    dt_softplus=True, state_batch_indices=src,
                                    dst_state_batch_indices=dst, pad_slot_id=pad, out=out)
    assert ret is out
    for r in range(bsz):
        ys, s = _scan_ref(x[r:r + 1], dt[r:r + 1], A, B[r:r + 1, None].expand(1, dim, n),
                          C[r:r + 1, None].expand(1, dim, n), D, z[r:r + 1], bias, True,
                          state[int(src[r])].float())
        _close(out[r], ys[0], itype)
        _close(pool[int(dst[r])].float(), s, itype)
    assert torch.equal(out[bsz].float().cpu(), torch.zeros(dim))      # padding row
    assert torch.equal(pool[[0, 2, 4]], state[[0, 2, 4]])
    # varlen: sequence i's tokens continue its slot one after another
    cu = torch.tensor([0, 2, 3, 4], dtype=torch.int32, device=device)
    pool = state.clone()
    y = vo.selective_state_update(pool, x, dt, A, B, C, D=D, z=z, dt_bias=bias,
                                  dt_softplus=True, state_batch_indices=src[:3],
                                  cu_seqlens=cu)
    for i, (lo, hi) in enumerate(((0, 2), (2, 3), (3, 4))):
        ys, s = _scan_ref(x[lo:hi], dt[lo:hi], A, B[lo:hi, None].expand(hi - lo, dim, n),
                          C[lo:hi, None].expand(hi - lo, dim, n), D, z[lo:hi], bias, True,
                          state[int(src[i])].float())
        _close(y[lo:hi], ys, itype)
        _close(pool[int(src[i])].float(), s, itype)
