"""minikernels.compat.causal_conv1d / .fla / .mamba_ssm (the recurrent-kernel packages'
APIs) against independent fp64 loops written here from the packages' documented semantics
and against transformers' own PyTorch fallbacks; and ``kernelize(model)``'s routing of
transformers' hybrid models (Qwen3.5, LFM2, Granite 4.0-H) to them: same logits, same
greedy tokens, minikernels' ops really called."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import minikernels as mk
from minikernels.compat import causal_conv1d as cc
from minikernels.compat import fla
from minikernels.compat import mamba_ssm as ms

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


# ------------------------------------------------------------------ causal_conv1d (Dao)


def _conv_ref(x, w, b, init, silu, seq_idx=None):
    """fp64 loop: out [B, D, L], final [B, D, W - 1]. seq_idx: a window only sees its own
    sub-sequence; seq_idx < 0 -> 0 (the package's kernels)."""
    x, w = x.double().cpu(), w.double().cpu()
    bsz, dim, seqlen = x.shape
    width = w.shape[1]
    out = torch.zeros(bsz, dim, seqlen, dtype=torch.float64)
    finals = []
    for r in range(bsz):
        start = (torch.zeros(dim, width - 1, dtype=torch.float64) if init is None
                 else init[r].double().cpu())
        buf = torch.cat([start, x[r]], 1)
        for t in range(seqlen):
            acc = torch.zeros(dim, dtype=torch.float64) if b is None else b.double().cpu()
            for j in range(width):
                pos = t - (width - 1) + j
                if seq_idx is not None and (pos < 0 or seq_idx[r, pos] != seq_idx[r, t]):
                    continue
                acc = acc + w[:, j] * buf[:, t + j]
            if silu:
                acc = acc * torch.sigmoid(acc)
            if seq_idx is not None and seq_idx[r, t] < 0:
                acc = acc * 0
            out[r, :, t] = acc
        finals.append(buf[:, buf.shape[1] - (width - 1):])
    return out, torch.stack(finals)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_last", [False, True])
def test_causal_conv1d_fn(device, dtype, channel_last) -> None:
    g = _g(1)
    bsz, dim, width = 3, 10, 4
    for seqlen in (7, 2):                                 # 2 < W - 1: state shifts in
        x = _rand(g, bsz, seqlen, dim, device=device).to(dtype).transpose(1, 2)
        if not channel_last:
            x = x.contiguous()
        w = _rand(g, dim, width, device=device).to(dtype)
        b = _rand(g, dim, device=device)                  # fp32 bias with bf16 x
        init = _rand(g, bsz, dim, width - 1, device=device).to(dtype)
        keep = init.clone()
        for act in (None, "silu", "swish"):
            got = cc.causal_conv1d_fn(x, w, b, activation=act)
            want, _ = _conv_ref(x, w, b, None, act is not None)
            assert got.shape == x.shape and got.dtype == dtype
            assert (got.stride(1) == 1) == channel_last   # the package's empty_like(x)
            _close(got, want, dtype)
        out, final = cc.causal_conv1d_fn(x, w, None, initial_states=init,
                                          return_final_states=True, activation="silu")
        want, want_final = _conv_ref(x, w, None, init, True)
        _close(out, want, dtype)
        assert final.dtype == dtype and torch.equal(final.double().cpu(), want_final)
        assert torch.equal(init, keep)                     # read, never written
        buf = torch.full((bsz, dim, width - 1), 7.0, dtype=dtype, device=device)
        out2, final2 = cc.causal_conv1d_fn(x, w, None, None, None, True, buf, "silu")
        assert final2 is buf
        assert torch.equal(buf.double().cpu(), _conv_ref(x, w, None, None, True)[1])


def test_causal_conv1d_fn_seq_idx(device) -> None:
    g = _g(2)
    dim, width = 6, 3
    x = _rand(g, 2, dim, 9, device=device)
    w, b = _rand(g, dim, width, device=device), _rand(g, dim, device=device)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2],
                            [-1, -1, 5, 5, 5, 5, 7, 7, 7]], dtype=torch.int32, device=device)
    got = cc.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu")
    _close(got, _conv_ref(x, w, b, None, True, seq_idx.cpu())[0], torch.float32)
    with pytest.raises(ValueError, match="initial_states"):
        cc.causal_conv1d_fn(x, w, b, seq_idx=seq_idx,
                            initial_states=torch.zeros(2, dim, 2, device=device))
    with pytest.raises(ValueError, match="return_final_states"):
        cc.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, return_final_states=True)
    with pytest.raises(NotImplementedError, match="seq_idx"):
        cc.causal_conv1d_fn(x, w, b, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2, 2]] * 2,
                                                          device=device))
    with pytest.raises(NotImplementedError, match="activation"):
        cc.causal_conv1d_fn(x, w, b, activation="gelu")


def _update_ref(x, state, w, b, silu, cache_seqlens=None, indices=None):
    """fp64 loop of the package's causal_conv1d_update; returns (out [B, D, L], new state)."""
    x, w, state = x.double().cpu(), w.double().cpu(), state.double().cpu().clone()
    bsz, dim, seqlen = x.shape
    width, state_len = w.shape[1], state.shape[2]
    out = torch.zeros(bsz, dim, seqlen, dtype=torch.float64)
    for r in range(bsz):
        s = r if indices is None else int(indices[r])
        if s < 0:
            continue
        if cache_seqlens is None:
            buf = torch.cat([state[s], x[r]], 1)
            window = buf[:, state_len - (width - 1):]
            state[s] = buf[:, buf.shape[1] - state_len:]
        else:
            c = int(cache_seqlens[r])
            old = [state[s][:, (c - (width - 1) + j) % state_len] for j in range(width - 1)]
            window = torch.cat([torch.stack(old, 1), x[r]], 1)
            for t in range(seqlen):
                state[s][:, (c + t) % state_len] = x[r][:, t]
        for t in range(seqlen):
            acc = (w * window[:, t:t + width]).sum(1)
            if b is not None:
                acc = acc + b.double().cpu()
            out[r, :, t] = acc * torch.sigmoid(acc) if silu else acc
    return out, state


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_update(device, dtype) -> None:
    g = _g(3)
    bsz, dim, width = 3, 8, 4
    w = _rand(g, dim, width, device=device).to(dtype)
    b = _rand(g, dim, device=device).to(dtype)
    for state_len in (width - 1, width, 6):               # the op's layout, longer buffers
        for seqlen in (None, 1, 3):                       # None: x [batch, dim]
            x3 = _rand(g, bsz, dim, seqlen or 1, device=device).to(dtype)
            x = x3[..., 0] if seqlen is None else x3
            state = _rand(g, bsz, dim, state_len, device=device).to(dtype)
            want, want_state = _update_ref(x3, state, w, b, True)
            got = cc.causal_conv1d_update(x, state, w, b, "silu")
            assert got.shape == x.shape and got.dtype == dtype
            _close(got.reshape(x3.shape), want, dtype)
            assert torch.equal(state.double().cpu(), want_state)
    # a pool with conv_state_indices (negative = padding row) and a circular buffer
    pool = _rand(g, 5, dim, 6, device=device).to(dtype)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    cache_seqlens = torch.tensor([2, 0, 9], dtype=torch.int32, device=device)
    x3 = _rand(g, bsz, dim, 3, device=device).to(dtype)
    for circ in (None, cache_seqlens):
        p = pool.clone()
        want, want_pool = _update_ref(x3, p, w, None, False, circ, idx.cpu())
        got = cc.causal_conv1d_update(x3, p, w, None, None, circ, idx)
        _close(got, want, dtype)
        assert torch.equal(got[1].float().cpu(), torch.zeros(dim, 3))
        assert torch.equal(p.double().cpu(), want_pool)
    with pytest.raises(ValueError, match="conv_state"):
        cc.causal_conv1d_update(x3, pool[:, :, :2], w)


def test_causal_conv1d_matches_transformers_fallbacks() -> None:
    """transformers' own PyTorch fallbacks (what a model runs without the package)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q

    g = _g(4)
    x = _rand(g, 2, 5, 12).transpose(1, 2)
    w, b = _rand(g, 12, 4), _rand(g, 12)
    torch.testing.assert_close(cc.causal_conv1d_fn(x, w, b, activation="silu"),
                               q.causal_conv1d_fn.__wrapped__(x, w, b, activation="silu"))
    state = _rand(g, 2, 12, 4)
    theirs = state.clone()
    x1 = _rand(g, 2, 12, 1)
    torch.testing.assert_close(cc.causal_conv1d_update(x1, state, w, b, "silu"),
                               q.causal_conv1d_update.__wrapped__(x1, theirs, w, b, "silu"))
    assert torch.equal(state, theirs)


# ------------------------------------------------------------ gated delta rule (FLA)


def _gdr_ref(q, k, v, g, beta, scale, h0, l2norm, cu):
    """fp64 loop per sequence / value head: (o [T, HV, V], final [N, HV, K, V])."""
    q, k, v, g, beta = (t.double().cpu() for t in (q, k, v, g, beta))
    hk, dk = q.shape[1], q.shape[2]
    hv, dv = v.shape[1], v.shape[2]
    o = torch.zeros(v.shape, dtype=torch.float64)
    finals = []
    for i in range(len(cu) - 1):
        s = (torch.zeros(hv, dk, dv, dtype=torch.float64) if h0 is None
             else h0[i].double().cpu().clone())
        for t in range(cu[i], cu[i + 1]):
            for h in range(hv):
                qt, kt = q[t, h // (hv // hk)], k[t, h // (hv // hk)]
                if l2norm:
                    qt = qt / torch.sqrt((qt * qt).sum() + 1e-6)
                    kt = kt / torch.sqrt((kt * kt).sum() + 1e-6)
                s[h] = s[h] * math.exp(float(g[t, h]))
                s[h] = s[h] + torch.outer(kt, beta[t, h] * (v[t, h] - kt @ s[h]))
                o[t, h] = (scale * qt) @ s[h]
        finals.append(s)
    return o, torch.stack(finals)


def _gdr_inputs(gen, b, t, hk, hv, dk, dv, dtype, device):
    q = _rand(gen, b, t, hk, dk, device=device).to(dtype)
    k = _rand(gen, b, t, hk, dk, device=device).to(dtype)
    v = _rand(gen, b, t, hv, dv, device=device).to(dtype)
    g = -torch.rand(b, t, hv, generator=gen).to(device) * 0.5
    beta = torch.rand(b, t, hv, generator=gen).to(device).to(dtype)
    return q, k, v, g, beta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", ["chunk", "fused_recurrent"])
def test_fla_gated_delta_rule(device, dtype, func) -> None:
    fn = (fla.chunk_gated_delta_rule if func == "chunk"
          else fla.fused_recurrent_gated_delta_rule)
    gen = _g(5)
    b, t, hk, hv, dk, dv = 2, 6, 2, 4, 8, 6
    q, k, v, g, beta = _gdr_inputs(gen, b, t, hk, hv, dk, dv, dtype, device)
    h0 = _rand(gen, b, hv, dk, dv, device=device)
    keep = h0.clone()
    cu = [0, t, 2 * t]
    flat = [x.flatten(0, 1) for x in (q, k, v, g, beta)]
    for l2 in (False, True):
        o, final = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                      use_qk_l2norm_in_kernel=l2)
        want_o, want_final = _gdr_ref(*flat, dk ** -0.5, h0, l2, cu)
        assert o.shape == v.shape and o.dtype == dtype and final.dtype == torch.float32
        _close(o.flatten(0, 1), want_o, dtype)
        _close(final, want_final, torch.float32 if dtype == torch.float32 else dtype)
        assert torch.equal(h0, keep)                      # FLA never writes initial_state
    o, final = fn(q, k, v, g, beta, scale=0.3)            # zeros start, no final state
    assert final is None
    _close(o.flatten(0, 1), _gdr_ref(*flat, 0.3, None, False, cu)[0], dtype)
    # varlen: B = 1, N sequences (one empty), one initial state each
    cu = [0, 3, 3, 8]
    q, k, v, g, beta = _gdr_inputs(gen, 1, 8, hk, hv, dk, dv, dtype, device)
    h0 = _rand(gen, 3, hv, dk, dv, device=device)
    o, final = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                  cu_seqlens=torch.tensor(cu, device=device), use_qk_l2norm_in_kernel=True)
    want_o, want_final = _gdr_ref(*(x[0] for x in (q, k, v, g, beta)), dk ** -0.5, h0,
                                  True, cu)
    _close(o[0], want_o, dtype)
    _close(final, want_final, torch.float32 if dtype == torch.float32 else dtype)
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, g, beta, initial_state=h0[:2], cu_seqlens=torch.tensor(cu, device=device))
    with pytest.raises(ValueError, match="batch size"):
        fn(*(torch.cat([x, x]) for x in (q, k, v, g, beta)),
           cu_seqlens=torch.tensor(cu, device=device))


def test_fla_refusals_and_transformers_fallbacks() -> None:
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    gen = _g(6)
    q, k, v, g, beta = _gdr_inputs(gen, 2, 7, 2, 4, 8, 6, torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="head_first"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, head_first=True)
    for name in ("gk", "gv"):
        with pytest.raises(NotImplementedError, match=name):
            fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **{name: g})
    with pytest.raises(NotImplementedError, match="beta"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, v)
    h0 = _rand(gen, 2, 4, 8, 6)
    for ours, theirs, extra in (
            (fla.chunk_gated_delta_rule, m.torch_chunk_gated_delta_rule, {"chunk_size": 4}),
            (fla.fused_recurrent_gated_delta_rule, m.torch_recurrent_gated_delta_rule, {})):
        o, s = ours(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                    use_qk_l2norm_in_kernel=True)
        ro, rs = theirs.__wrapped__(q, k, v, g=g, beta=beta, initial_state=h0,
                                    output_final_state=True, use_qk_l2norm_in_kernel=True,
                                    **extra)
        torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ Mamba-2 (mamba_ssm)


def _ssd_ref(x, dt, A, B, C, D, z, dt_bias, softplus, dt_limit, init, starts):
    """fp64 loop over [T, H, P] tokens; ``starts``: token -> True where the state restarts
    from zero. Returns (y [T, H, P], the state after each token [T, H, P, N])."""
    x, dt, B, C = (t.double().cpu() for t in (x, dt, B, C))
    total, h, p = x.shape
    grp, n = B.shape[1], B.shape[2]
    a = A.double().cpu()
    d = dt + (0 if dt_bias is None else dt_bias.double().cpu())
    d = F.softplus(d) if softplus else d
    d = d.clamp(*dt_limit)
    s = torch.zeros(h, p, n, dtype=torch.float64) if init is None else init.double().cpu()
    ys, states = torch.zeros(total, h, p, dtype=torch.float64), []
    for t in range(total):
        if starts[t] and t > 0:
            s = torch.zeros(h, p, n, dtype=torch.float64)
        for hh in range(h):
            gi = hh // (h // grp)
            s[hh] = (s[hh] * torch.exp(d[t, hh] * a[hh])
                     + d[t, hh] * torch.outer(x[t, hh], B[t, gi]))
            ys[t, hh] = s[hh] @ C[t, gi]
        if D is not None:
            ys[t] += D.double().cpu().reshape(h, -1) * x[t]
        states.append(s.clone())
    if z is not None:
        ys = ys * F.silu(z.double().cpu())
    return ys, torch.stack(states)


def _ssd_inputs(gen, b, l, h, p, grp, n, dtype, device):
    x = _rand(gen, b, l, h, p, device=device).to(dtype)
    dt = _rand(gen, b, l, h, device=device)
    A = -(torch.rand(h, generator=gen) + 0.3).to(device)
    B = _rand(gen, b, l, grp, n, device=device).to(dtype)
    C = _rand(gen, b, l, grp, n, device=device).to(dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_chunk_scan_combined(device, dtype) -> None:
    gen = _g(7)
    b, l, h, p, grp, n = 2, 7, 4, 3, 2, 5
    x, dt, A, B, C = _ssd_inputs(gen, b, l, h, p, grp, n, dtype, device)
    D, dt_bias = _rand(gen, h, device=device), _rand(gen, h, device=device)
    z = _rand(gen, b, l, h, p, device=device).to(dtype)
    init = _rand(gen, b, h, p, n, device=device)
    keep = init.clone()
    for D_arg, z_arg, lim in ((D, None, (0.0, math.inf)),
                              (D[:, None].expand(h, p), z, (0.1, 1.5)),   # Mamba-2's views
                              (None, z, (0.0, math.inf))):
        out, final = ms.mamba_chunk_scan_combined(
            x, dt, A, B, C, 4, D=D_arg, z=z_arg, dt_bias=dt_bias, initial_states=init,
            dt_softplus=True, dt_limit=lim, return_final_states=True)
        assert out.shape == x.shape and out.dtype == dtype and final.dtype == torch.float32
        for r in range(b):
            ys, states = _ssd_ref(x[r], dt[r], A, B[r], C[r], D_arg,
                                  None if z_arg is None else z_arg[r], dt_bias, True, lim,
                                  init[r], [False] * l)
            _close(out[r], ys, dtype)
            _close(final[r], states[-1], torch.float32 if dtype == torch.float32 else dtype)
        assert torch.equal(init, keep)
    out = ms.mamba_chunk_scan_combined(x, dt, A, B, C, 256)       # a tensor, not a tuple
    assert isinstance(out, torch.Tensor)
    _close(out[1], _ssd_ref(x[1], dt[1], A, B[1], C[1], None, None, None, False,
                            (0.0, math.inf), None, [False] * l)[0], dtype)


def test_mamba_chunk_scan_seq_idx_and_varlen_states(device) -> None:
    gen = _g(8)
    h, p, grp, n = 4, 2, 1, 3
    x, dt, A, B, C = _ssd_inputs(gen, 1, 9, h, p, grp, n, torch.float32, device)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32, device=device)
    out, final, varlen = ms.mamba_chunk_scan_combined(
        x, dt, A, B, C, 4, seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True,
        return_final_states=True, return_varlen_states=True)
    starts = [t in (0, 3, 5) for t in range(9)]
    ys, states = _ssd_ref(x[0], dt[0], A, B[0], C[0], None, None, None, True,
                          (0.0, math.inf), None, starts)
    _close(out[0], ys, torch.float32)
    _close(final[0], states[-1], torch.float32)
    assert varlen.shape == (3, h, p, n)
    _close(varlen, states[[2, 4, 8]], torch.float32)
    out2, varlen2 = ms.mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=seq_idx,
                                                 cu_seqlens=cu, dt_softplus=True,
                                                 return_varlen_states=True)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(varlen2, varlen)
    # what does not map is refused, naming the argument
    cases = [
        (NotImplementedError, "initial_states", dict(
            seq_idx=seq_idx, initial_states=torch.zeros(1, h, p, n, device=device))),
        (NotImplementedError, "cu_seqlens", dict(cu_seqlens=cu, return_varlen_states=True)),
        (ValueError, "cu_seqlens", dict(return_varlen_states=True)),
        (ValueError, "cu_seqlens", dict(seq_idx=seq_idx, return_varlen_states=True,
                                        cu_seqlens=torch.tensor([0, 4, 9], device=device))),
        (NotImplementedError, "D", dict(D=torch.arange(h * p, dtype=torch.float32,
                                                       device=device).view(h, p))),
        (NotImplementedError, "seq_idx", dict(seq_idx=torch.tensor(
            [[0, 0, 1, 1, 0, 0, 2, 2, 2]], device=device))),
        (ValueError, "chunk_size", dict(chunk_size=0)),
    ]
    for exc, name, kwargs in cases:
        args = dict(chunk_size=4) | kwargs
        with pytest.raises(exc, match=name):
            ms.mamba_chunk_scan_combined(x, dt, A, B, C, **args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_state_update(device, dtype) -> None:
    gen = _g(9)
    bsz, h, p, grp, n = 3, 4, 3, 2, 5
    x = _rand(gen, bsz, h, p, device=device).to(dtype)
    dt = _rand(gen, bsz, h, device=device)[..., None].expand(bsz, h, p)
    A = -(torch.rand(h, generator=gen) + 0.3).to(device)
    B = _rand(gen, bsz, grp, n, device=device).to(dtype)
    C = _rand(gen, bsz, grp, n, device=device).to(dtype)
    D, dt_bias = _rand(gen, h, device=device), _rand(gen, h, device=device)
    z = _rand(gen, bsz, h, p, device=device).to(dtype)
    state = _rand(gen, 5, h, p, n, device=device)
    idx = torch.tensor([3, -1, 0], device=device)
    for z_arg in (None, z):
        pool = state.clone()
        y = ms.selective_state_update(pool, x, dt, A[:, None, None].expand(h, p, n), B, C,
                                      D[:, None].expand(h, p), z_arg,
                                      dt_bias[:, None].expand(h, p), True, idx)
        assert y.shape == x.shape and y.dtype == dtype
        for r, s in ((0, 3), (2, 0)):
            ys, states = _ssd_ref(x[r:r + 1], dt[r:r + 1, :, 0], A, B[r:r + 1], C[r:r + 1], D,
                                  None if z_arg is None else z_arg[r:r + 1], dt_bias, True,
                                  (-math.inf, math.inf), state[s], [False])
            _close(y[r], ys[0], dtype)
            _close(pool[s], states[0], torch.float32)
        assert torch.equal(y[1].float().cpu(), torch.zeros(h, p))   # padding row
        assert torch.equal(pool[[1, 2, 4]], state[[1, 2, 4]])
    # Mamba-1's per-channel form: tests/test_compat_selective_scan.py


def test_mamba_ssm_matches_transformers_fallbacks() -> None:
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as m

    gen = _g(10)
    b, l, h, p, grp, n = 2, 6, 4, 3, 2, 5
    x, dt, A, B, C = _ssd_inputs(gen, b, l, h, p, grp, n, torch.float32, "cpu")
    D, dt_bias, init = _rand(gen, h), _rand(gen, h), _rand(gen, b, h, p, n)
    args = dict(D=D, dt_bias=dt_bias, dt_softplus=True, initial_states=init,
                return_final_states=True, dt_limit=(0.0, math.inf))
    o, s = ms.mamba_chunk_scan_combined(x, dt, A, B, C, 4, **args)
    ro, rs = m.mamba2_chunk_scan.__wrapped__(x, dt, A, B, C, chunk_size=4, **args)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-5)
    state = _rand(gen, b, h, p, n)
    theirs = state.clone()
    step = (x[:, 0], dt[:, 0, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n),
            B[:, 0], C[:, 0], D[:, None].expand(h, p))
    y = ms.selective_state_update(state, *step, dt_bias=dt_bias[:, None].expand(h, p),
                                  dt_softplus=True)
    ry = m.mamba2_selective_state_update.__wrapped__(theirs, *step, z=None,
                                                     dt_bias=dt_bias[:, None].expand(h, p),
                                                     dt_softplus=True)
    torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- transformers models, routed


def _hf_model(kind: str):
    from test_model_support import make_hf_model

    if kind == "granite4-h":
        return make_hf_model(kind, num_hidden_layers=2, layer_types=["mamba", "attention"])
    return make_hf_model(kind)


_ROUTED = {
    "qwen3_5": ["causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule",
                "fused_recurrent_gated_delta_rule"],
    "lfm2": ["causal_conv1d_fn", "causal_conv1d_update"],
    "granite4-h": ["causal_conv1d_fn", "causal_conv1d_update", "mamba_chunk_scan_combined",
                   "selective_state_update"],
}
_ROUTED["mamba2"] = _ROUTED["granite4-h"]
_OPS = {"qwen3_5": ("causal_conv1d", "gated_delta_rule"), "lfm2": ("causal_conv1d",),
        "granite4-h": ("causal_conv1d", "mamba2_scan"), "mamba2": ("causal_conv1d", "mamba2_scan")}


@pytest.mark.parametrize("kind", ["qwen3_5", "lfm2", "granite4-h", "mamba2"])
def test_kernelize_routes_recurrent_kernels(kind, monkeypatch) -> None:
    pytest.importorskip("transformers")
    import minikernels.hf as mkhf
    from minikernels.hf.kernelize import unroute_recurrent

    model = _hf_model(kind)
    ids = torch.randint(3, 300, (2, 9), generator=_g(11))
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    calls = dict.fromkeys(_OPS[kind], 0)
    for op in calls:
        orig = getattr(mk.ops, op)

        def counted(*a, _op=op, _orig=orig, **kw):
            calls[_op] += 1
            return _orig(*a, **kw)
        monkeypatch.setattr(mk.ops, op, counted)
    summary = mkhf.kernelize(model, rms_norm=False, mlp=False)
    mixers = {"qwen3_5": ["model.layers.0.linear_attn", "model.layers.2.linear_attn"],
              "lfm2": ["model.layers.0.conv", "model.layers.2.conv"],
              "granite4-h": ["model.layers.0.mamba"],
              "mamba2": ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]}[kind]
    assert summary.recurrent == {name: _ROUTED[kind] for name in mixers}
    assert "recurrent mixers -> minikernels.compat" in str(summary)
    with torch.no_grad():
        got = model(ids).logits
        assert all(calls.values()), calls              # prefill ran on minikernels' ops
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, ref_tokens)
    # idempotent; reversible (the class forward again: minikernels' ops no longer called)
    assert mkhf.kernelize(model, rms_norm=False, mlp=False).recurrent == summary.recurrent
    assert unroute_recurrent(model) == mixers
    calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    assert not any(calls.values())


def test_kernelize_default_on_granite_h_keeps_gated_norm() -> None:
    """With one group, Granite's gated Mamba norm (forward(x, gate=None)) looks like an
    RMSNorm on a one-input probe; kernelize must not swap it (the gate would be lost)."""
    import minikernels.hf as mkhf
    from test_model_support import make_hf_model

    model = make_hf_model("granite4-h", num_hidden_layers=2,
                          layer_types=["mamba", "attention"], mamba_n_groups=1)
    ids = torch.randint(3, 300, (1, 7), generator=_g(12))
    with torch.no_grad():
        ref = model(ids).logits
    summary = mkhf.kernelize(model)
    assert "model.layers.0.mamba.norm" not in summary.rms_norm and summary.recurrent
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)


def test_kernelize_default_on_mamba2_keeps_gated_norm() -> None:
    """transformers' Mamba2 (attention-free; one group): kernelize's defaults route the
    block norms and the mixers, not the mixers' gated norms; logits and greedy tokens stay
    transformers'."""
    import minikernels.hf as mkhf
    from test_model_support import make_hf_model

    model = make_hf_model("mamba2-tied")
    ids = torch.randint(3, 300, (2, 7), generator=_g(13))
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    summary = mkhf.kernelize(model)
    assert sorted(summary.rms_norm) == ["backbone.layers.0.norm", "backbone.layers.1.norm",
                                        "backbone.layers.2.norm", "backbone.norm_f"]
    assert len(summary.recurrent) == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), ref_tokens)


# Mamba-1 mixers (selective_scan_fn / selective_state_update): tests/test_hf_kernelize_mamba1.py
