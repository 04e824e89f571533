"""selective_scan (Mamba-1's selective scan: Mamba, FalconMamba, Jamba): the op against
transformers' mamba_selective_scan (prefill, D / z / dt_bias / softplus variants) and
mamba_selective_state_update (decode steps) on equal-length batches; the Triton kernel
(interpreter on CPU) against the reference over random varlen batches (odd Dm, N from 1 to
256, groups, blocks straddling groups, empty and length-1 sequences, T = 0; every tensor
argument a view with strides of its own, the state pool included), padding rows and stale
(NaN) slots ignored, a prefill split in two calls equal to one; bad-input errors; opcheck.
Outputs are poisoned (NaN-filled) before the kernels write them (conftest)."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels.ops import reference

BACKENDS = ["reference", "triton"]   # no CUDA C++ kernel: "cuda" would fall back to triton
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN = float("nan")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """t's values in a view with strides of its own: a noise-filled buffer whose first two
    dims are stored swapped, every dim offset by one, the last dim strided by 3."""
    shape = list(t.shape)
    big = [s + 2 for s in shape]
    big[-1] = 3 * shape[-1] + 2
    order = list(range(len(shape)))
    if len(shape) >= 2:
        order[0], order[1] = 1, 0
    stored = [big[i] for i in order]
    if t.dtype.is_floating_point:
        buf = torch.randn(stored, generator=gen).to(t.dtype)
    else:
        buf = torch.randint(0, 2, stored, generator=gen).to(t.dtype)
    buf = buf.to(t.device).permute(*[order.index(i) for i in range(len(shape))])
    idx = [slice(1, 1 + s) for s in shape]
    idx[-1] = slice(1, 1 + 3 * shape[-1], 3)
    view = buf[tuple(idx)]
    view.copy_(t)
    assert view.shape == t.shape and view.storage_offset() > 0
    return view


def _params(dm: int, n: int, gen: torch.Generator, device="cpu"):
    """A [Dm, N] (negative, -exp(A_log), S4D-like spread over the states), D, dt_bias [Dm]
    in fp32."""
    a = -torch.exp(torch.rand(dm, n, generator=gen) * 2.0 - 1.0)      # [-2.7, -0.37]
    d = torch.randn(dm, generator=gen)
    bias = torch.randn(dm, generator=gen) * 0.5
    return a.to(device), d.to(device), bias.to(device)


def _inputs(lens, dm, g, n, dtype, gen, device="cpu"):
    """x, z [T, Dm] (x's dtype), dt [T, Dm] (fp32, before bias / softplus), B, C [T, G, N],
    cu_seqlens int32."""
    total = sum(lens)
    x = torch.randn(total, dm, generator=gen)
    z = torch.randn(total, dm, generator=gen)
    dt = torch.randn(total, dm, generator=gen) - 1.0
    b = torch.randn(total, g, n, generator=gen)
    c = torch.randn(total, g, n, generator=gen) * n ** -0.5
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()],
                      dtype=torch.int32)
    return (x.to(dtype).to(device), z.to(dtype).to(device), dt.to(device),
            b.to(dtype).to(device), c.to(dtype).to(device), cu.to(device))


# ---------------------------------------------------------------- against transformers
VARIANTS = {   # D, z, dt_bias, dt_softplus
    "mamba": (True, True, True, True),
    "no_gate": (True, False, True, True),
    "raw_dt": (False, True, False, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers_scan(backend, device, variant):
    """Prefill from zeros: outputs and final states equal transformers' mamba_selective_scan
    (the PyTorch fallback of mamba_ssm's selective_scan_fn) on [batch, Dm, L] layouts."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    gen = _gen(0)
    b, length, dm, n = 3, 6, 10, 5
    with_d, with_z, with_bias, softplus = VARIANTS[variant]
    x, z, dt, bm, cm, cu = _inputs([length] * b, dm, 1, n, torch.float32, gen)
    a, d, bias = _params(dm, n, gen)
    d, bias, z = (d if with_d else None), (bias if with_bias else None), (z if with_z else None)
    bdl = lambda t: t.view(b, length, -1).transpose(1, 2)          # noqa: E731
    want_y, want_s = mamba_selective_scan.__wrapped__(
        bdl(x), bdl(dt), a, bdl(bm[:, 0]), bdl(cm[:, 0]), D=d,
        z=None if z is None else bdl(z), delta_bias=bias, delta_softplus=softplus,
        return_last_state=True)

    pool = torch.full((b + 2, dm, n), NAN, device=device)
    slots = torch.tensor([3, 0, 1], device=device)
    dev = lambda t: None if t is None else t.to(device)            # noqa: E731
    with mk.use_backend(backend):
        y = mk.ops.selective_scan(
            *(t.to(device) for t in (x, dt, a, bm, cm)), cu_seqlens=cu.to(device), D=dev(d),
            z=dev(z), dt_bias=dev(bias), dt_softplus=softplus, state=pool,
            state_indices=slots, has_initial_state=torch.zeros(b, dtype=torch.bool,
                                                               device=device))
        y2 = mk.ops.selective_scan(                                # no pool at all
            *(t.to(device) for t in (x, dt, a, bm, cm)), cu_seqlens=cu.to(device), D=dev(d),
            z=dev(z), dt_bias=dev(bias), dt_softplus=softplus)
    assert_close(y.cpu().view(b, length, dm).transpose(1, 2), want_y, scale=10)
    assert_close(y2.cpu().view(b, length, dm).transpose(1, 2), want_y, scale=10)
    assert_close(pool[slots].cpu(), want_s.float(), scale=10)
    assert torch.isnan(pool[[2, 4]]).all()                         # other slots untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_decode(backend, device):
    """Decode steps (one token per sequence per call, the state in a pool) equal
    transformers' mamba_selective_state_update; one prefill call over the same tokens gives
    the same outputs and final states."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_state_update

    gen = _gen(1)
    b, steps, dm, n = 3, 4, 9, 16
    x, z, dt, bm, cm, _ = _inputs([steps] * b, dm, 1, n, torch.float32, gen)
    a, d, bias = _params(dm, n, gen)
    x, z, dt, bm, cm = (t.view(b, steps, *t.shape[1:]) for t in (x, z, dt, bm, cm))
    h0 = torch.randn(b, dm, n, generator=gen)
    ref_state = h0.clone()
    want = [mamba_selective_state_update.__wrapped__(
                ref_state, x[:, t], dt[:, t], a, bm[:, t, 0], cm[:, t, 0], d, z=z[:, t],
                dt_bias=bias, dt_softplus=True) for t in range(steps)]

    slots = torch.tensor([4, 0, 2], device=device)
    pool = torch.full((5, dm, n), NAN, device=device)
    pool[slots] = h0.to(device)
    prefill_pool = pool.clone()
    dev = lambda t: t.to(device)                                   # noqa: E731
    kw = dict(D=dev(d), dt_bias=dev(bias), dt_softplus=True)
    with mk.use_backend(backend):
        for t in range(steps):
            y = mk.ops.selective_scan(
                dev(x[:, t]), dev(dt[:, t]), dev(a), dev(bm[:, t]), dev(cm[:, t]),
                cu_seqlens=torch.arange(b + 1, dtype=torch.int32, device=device),
                z=dev(z[:, t]), state=pool, state_indices=slots, **kw)
            assert_close(y.cpu(), want[t], scale=2)
        y_all = mk.ops.selective_scan(
            *(dev(t.flatten(0, 1)) for t in (x, dt)), dev(a),
            *(dev(t.flatten(0, 1)) for t in (bm, cm)), z=dev(z.flatten(0, 1)),
            cu_seqlens=torch.arange(0, b * steps + 1, steps, dtype=torch.int32, device=device),
            state=prefill_pool, state_indices=slots, **kw)
    assert_close(pool[slots].cpu(), ref_state, scale=2)
    assert_close(y_all.cpu().view(b, steps, dm), torch.stack(want, 1), scale=2)
    assert_close(prefill_pool[slots].cpu(), ref_state, scale=2)


# ---------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference(backend, device, data):
    gen = _gen(data.draw(st.integers(0, 2**16)))
    n_seq = data.draw(st.integers(0, 4))
    lens = data.draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 6]), min_size=n_seq,
                              max_size=n_seq))
    if n_seq and data.draw(st.integers(0, 4)) == 0:
        lens[0] = 23                                             # a longer prefill
    g = data.draw(st.sampled_from([1, 2, 3]))
    dm = g * data.draw(st.sampled_from([1, 3, 5, 12]))           # odd Dm; groups of 1 .. 12
    n = data.draw(st.sampled_from([1, 3, 16, 64, 256]))
    if n == 256:
        dm = g * data.draw(st.sampled_from([1, 3, 5]))           # a block straddles groups
    dtype = data.draw(st.sampled_from(DTYPES))
    x, z, dt, bm, cm, cu = _inputs(lens, dm, g, n, dtype, gen, device=device)
    a, d, bias = _params(dm, n, gen, device)
    if data.draw(st.booleans()):                               # dt in x's dtype
        dt = dt.to(dtype)
    if data.draw(st.booleans()):                               # A / D / dt_bias in x's dtype
        a, d, bias = a.to(dtype), d.to(dtype), bias.to(dtype)
    d = d if data.draw(st.booleans()) else None
    z = z if data.draw(st.booleans()) else None
    bias = bias if data.draw(st.booleans()) else None
    softplus = data.draw(st.booleans())
    cu = cu.to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    with_state = data.draw(st.booleans())
    state = slots = flags = None
    if with_state:
        pool_size = n_seq + 2
        state = torch.randn(pool_size, dm, n, generator=gen).to(device)
        slots = torch.randperm(pool_size, generator=gen)[:n_seq]
        pad = torch.rand(n_seq, generator=gen) < 0.25           # padding rows
        slots = torch.where(pad, -1, slots)
        if data.draw(st.booleans()):
            flags = torch.rand(n_seq, generator=gen) < 0.6
            state[slots[(slots >= 0) & ~flags]] = NAN            # stale, never read
        unused = [i for i in range(pool_size) if i not in slots.tolist()]
        state[unused] = NAN                                      # untouched
        slots = slots.to(data.draw(st.sampled_from([torch.int32, torch.int64]))).to(device)
        flags = None if flags is None else flags.to(device)
    if not softplus:   # a raw dt must stay positive (a negative one makes the state grow)
        dt = dt.abs() * 0.5
        bias = None if bias is None else bias.abs()
    want_state = None if state is None else state.clone()
    want = reference.selective_scan(x, dt, a, bm, cm, cu, D=d, z=z, dt_bias=bias,
                                    dt_softplus=softplus, state=want_state,
                                    state_indices=slots, has_initial_state=flags)
    if data.draw(st.booleans()):                               # every argument a view
        x, dt, a, bm, cm, cu = (_strided(t, gen) for t in (x, dt, a, bm, cm, cu))
        d, bias, z = (None if t is None else _strided(t, gen) for t in (d, bias, z))
        if with_state:
            state, slots = _strided(state, gen), _strided(slots, gen)
            flags = None if flags is None else _strided(flags, gen)
    with mk.use_backend(backend):
        got = mk.ops.selective_scan(x, dt, a, bm, cm, cu_seqlens=cu, D=d, z=z, dt_bias=bias,
                                    dt_softplus=softplus, state=state, state_indices=slots,
                                    has_initial_state=flags)
    assert_close(got, want, scale=2)
    if with_state:
        torch.testing.assert_close(state, want_state, atol=5e-5, rtol=5e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend, device):
    """T = 0: no sequences at all, or only empty ones (which still (re)write their slots:
    the initial state, or zeros where has_initial_state is False)."""
    gen = _gen(2)
    dm, g, n = 6, 1, 4
    a, d, bias = _params(dm, n, gen, device)
    x, z, dt, bm, cm, _ = _inputs([], dm, g, n, torch.bfloat16, gen, device=device)
    pool = torch.randn(3, dm, n, generator=gen).to(device)
    before = pool.clone()
    with mk.use_backend(backend):
        y0 = mk.ops.selective_scan(x, dt, a, bm, cm, D=d, z=z,
                                   cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device))
        y1 = mk.ops.selective_scan(x, dt, a, bm, cm, D=d, dt_bias=bias,
                                   cu_seqlens=torch.zeros(3, dtype=torch.int32, device=device),
                                   state=pool, state_indices=torch.tensor([2, 0], device=device),
                                   has_initial_state=torch.tensor([True, False], device=device))
    assert y0.shape == y1.shape == (0, dm) and y1.dtype == torch.bfloat16
    assert torch.equal(pool[[1, 2]], before[[1, 2]])
    assert torch.equal(pool[0], torch.zeros_like(pool[0]))


# ---------------------------------------------------------- serving: slots, padding, chunks
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_and_stale_slots(backend, device):
    """-1 rows: zero outputs (even from NaN inputs, z included), slot untouched;
    has_initial_state False: the slot's stale (NaN) contents are ignored and overwritten."""
    gen = _gen(3)
    dm, g, n = 13, 1, 16
    x, z, dt, bm, cm, cu = _inputs([3, 2, 1], dm, g, n, torch.bfloat16, gen, device=device)
    a, d, bias = _params(dm, n, gen, device)
    for t in (x, z, dt, bm, cm):
        t[3:5] = NAN                                             # the padding row
    pool = torch.randn(4, dm, n, generator=gen).to(device)
    pool[2] = NAN                                                # stale, not to be read
    before = pool.clone()
    slots = torch.tensor([2, -1, 0], device=device)
    flags = torch.tensor([False, True, True], device=device)
    kw = dict(D=d, dt_bias=bias, dt_softplus=True)
    with mk.use_backend(backend):
        y = mk.ops.selective_scan(x, dt, a, bm, cm, cu_seqlens=cu, z=z, state=pool,
                                  state_indices=slots, has_initial_state=flags, **kw)
    assert torch.equal(y[3:5], torch.zeros_like(y[3:5]))
    assert torch.equal(pool[[1, 3]], before[[1, 3]])
    zero_start = reference.selective_scan(x[:3], dt[:3], a, bm[:3], cm[:3], cu[:2], z=z[:3],
                                          **kw)
    assert_close(y[:3], zero_start)
    fresh = torch.zeros(1, dm, n, device=device)
    reference.selective_scan(x[:3], dt[:3], a, bm[:3], cm[:3], cu[:2], state=fresh,
                             state_indices=torch.tensor([0], device=device), **kw)
    torch.testing.assert_close(pool[2], fresh[0])
    want_state = before.clone()
    want = reference.selective_scan(x[5:], dt[5:], a, bm[5:], cm[5:],
                                    torch.tensor([0, 1], device=device), z=z[5:],
                                    state=want_state,
                                    state_indices=torch.tensor([0], device=device), **kw)
    assert_close(y[5:], want)
    torch.testing.assert_close(pool[0], want_state[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_round_trip(backend, device, dtype):
    """A sequence run in two calls (the second continuing from its slot, batched with a
    decode row of another sequence) equals running it whole: outputs and final state."""
    gen = _gen(4)
    dm, g, n = 12, 2, 16
    x, z, dt, bm, cm, _ = _inputs([9], dm, g, n, dtype, gen, device=device)
    dx, dz, ddt, dbm, dcm, _ = _inputs([1], dm, g, n, dtype, gen, device=device)
    a, d, bias = _params(dm, n, gen, device)
    pool = torch.randn(3, dm, n, generator=gen).to(device)
    whole_pool = pool.clone()
    kw = dict(D=d, dt_bias=bias, dt_softplus=True)
    idx = lambda *s: torch.tensor(s, device=device)              # noqa: E731
    cat = lambda u, v: torch.cat([u, v])                         # noqa: E731
    with mk.use_backend(backend):
        whole = mk.ops.selective_scan(x, dt, a, bm, cm, z=z, cu_seqlens=idx(0, 9).int(),
                                      state=whole_pool, state_indices=idx(1),
                                      has_initial_state=idx(False), **kw)
        decode_pool = whole_pool.clone()
        want_decode = mk.ops.selective_scan(dx, ddt, a, dbm, dcm, z=dz,
                                            cu_seqlens=idx(0, 1).int(), state=decode_pool,
                                            state_indices=idx(2), **kw)
        first = mk.ops.selective_scan(x[:4], dt[:4], a, bm[:4], cm[:4], z=z[:4],
                                      cu_seqlens=idx(0, 4).int(), state=pool,
                                      state_indices=idx(1), has_initial_state=idx(False),
                                      **kw)
        second = mk.ops.selective_scan(cat(dx, x[4:]), cat(ddt, dt[4:]), a, cat(dbm, bm[4:]),
                                       cat(dcm, cm[4:]), z=cat(dz, z[4:]),
                                       cu_seqlens=idx(0, 1, 6).int(), state=pool,
                                       state_indices=idx(2, 1),
                                       has_initial_state=idx(True, True), **kw)
    assert_close(torch.cat([first, second[1:]]), whole, scale=2)
    assert_close(second[:1], want_decode)
    torch.testing.assert_close(pool[1], whole_pool[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pool[2], decode_pool[2], atol=2e-5, rtol=2e-5)


def test_triton_launch_config():
    """The state tile stays within MAX_TILE fp32 values; a block lies in one B / C group
    (one row per token) unless the groups are narrower than a block."""
    from minikernels.ops.triton.selective_scan import MAX_TILE, launch_config

    assert launch_config(5120, 16, 5120, 256, 1) == {"BLOCK_D": 128, "BLOCK_N": 16,
                                                     "SAME_GROUP": True, "PREFETCH": False,
                                                     "num_warps": 8}
    for dm, n, cpg in ((5, 256, 5), (8192, 256, 1024), (24, 3, 8), (3, 1, 1), (4096, 16, 1)):
        cfg = launch_config(dm, n, cpg, 256, 1)
        assert cfg["BLOCK_D"] * cfg["BLOCK_N"] <= MAX_TILE and cfg["BLOCK_N"] >= n
        assert cfg["SAME_GROUP"] == (cpg == dm or cpg % cfg["BLOCK_D"] == 0)
    assert not launch_config(24, 3, 8, 256, 1)["SAME_GROUP"]
    assert launch_config(8192, 16, 1024, 256, 1)["SAME_GROUP"]
    # few long prompts: smaller channel blocks (more programs), prefetching inputs
    assert launch_config(4096, 16, 4096, 4, 1024) == {"BLOCK_D": 64, "BLOCK_N": 16,
                                                      "SAME_GROUP": True, "PREFETCH": True,
                                                      "num_warps": 8}
    assert launch_config(4096, 16, 4096, 1, 4096)["BLOCK_D"] == 16
    # prefetching launches take at least 4 warps (2 spilled on sm_90a for a small tile)
    assert launch_config(128, 12, 128, 2, 8)["num_warps"] == 4
    assert launch_config(128, 12, 128, 2, 1)["num_warps"] == 1
    assert not launch_config(4096, 16, 4096, 256, 1)["PREFETCH"]


@pytest.mark.parametrize("checks", [True, False], ids=["max_seqlen_read", "unknown"])
def test_triton_prefetch_choice(device, checks):
    """Decode-only launches load each token in its step; a launch with a longer sequence
    prefetches (max_seqlen read from cu_seqlens, or, unknown, ceil(T / N_seq) >= 2)."""
    from helpers import spy_launches

    from minikernels._validation import index_checks
    from minikernels.ops.triton import selective_scan as tss

    gen = _gen(7)
    a, d, bias = _params(6, 4, gen, device)
    seen = []
    for lens in ([1, 1, 1], [1, 2, 1], [0, 1, 1]):
        x, z, dt, bm, cm, cu = _inputs(lens, 6, 1, 4, torch.float32, gen, device=device)
        with mk.use_backend("triton"), index_checks(checks), \
                spy_launches(tss, "selective_scan_kernel", "PREFETCH") as flags:
            y = mk.ops.selective_scan(x, dt, a, bm, cm, cu_seqlens=cu, D=d, z=z)
        assert_close(y, reference.selective_scan(x, dt, a, bm, cm, cu, D=d, z=z))
        seen += flags
    assert seen == [False, True, False]


# ---------------------------------------------------------------------- errors, opcheck
def test_errors():
    gen = _gen(5)
    x, z, dt, bm, cm, cu = _inputs([2, 1], 4, 2, 5, torch.float32, gen)
    a, d, bias = _params(4, 5, gen)
    pool = torch.zeros(3, 4, 5)
    slots = torch.tensor([0, 2])
    f = mk.ops.selective_scan

    def call(**over):
        kw = dict(x=x, dt=dt, A=a, B=bm, C=cm, cu_seqlens=cu, D=d, z=z, dt_bias=bias,
                  state=pool, state_indices=slots)
        kw.update(over)
        args = [kw.pop(name) for name in ("x", "dt", "A", "B", "C")]
        return f(*args, **kw)

    call()
    meta = {k: t.to("meta") for k, t in dict(x=x, dt=dt, A=a, B=bm, C=cm, cu_seqlens=cu, D=d,
                                                 z=z, dt_bias=bias).items()}
    cases = [
        (TypeError, "x must be a torch.Tensor", dict(x=[1.0])),
        (TypeError, "x must have dtype", dict(x=x.int())),
        (ValueError, "x must be 2-D", dict(x=x[0])),
        (ValueError, "x must have Dm >= 1 channels", dict(x=x[:, :0])),
        (TypeError, "dt must have dtype", dict(x=x.half(), B=bm.half(), C=cm.half(),
                                               z=z.half(), dt=dt.bfloat16())),
        (ValueError, r"dt must have shape \[T = 3, Dm = 4\]", dict(dt=dt[:, :2])),
        (ValueError, "dt must be 2-D", dict(dt=dt[..., None])),
        (TypeError, "A must have dtype", dict(A=a.long())),
        (ValueError, "A must be 2-D", dict(A=a[:, 0])),
        (ValueError, r"A must have shape \[Dm = 4, N = 5\]", dict(A=a[:, :3])),
        (TypeError, "B must have dtype", dict(B=bm.half())),
        (TypeError, "C must have dtype", dict(C=cm.double())),
        (ValueError, "B must be 3-D", dict(B=bm[0])),
        (ValueError, "B must have T = 3 rows", dict(B=bm[:2], C=cm[:2])),
        (ValueError, r"B's groups \(G = 3\) must divide x's channels \(Dm = 4\)",
         dict(B=torch.zeros(3, 3, 5), C=torch.zeros(3, 3, 5))),
        (ValueError, "B's state size N", dict(B=torch.zeros(3, 2, 257),
                                              C=torch.zeros(3, 2, 257),
                                              A=torch.zeros(4, 257), state=None,
                                              state_indices=None)),
        (ValueError, "C must have the shape of B", dict(C=cm[:, :1])),
        (ValueError, r"D must have shape \[Dm = 4\]", dict(D=d[:2])),
        (TypeError, "dt_bias must have dtype", dict(dt_bias=bias.long())),
        (TypeError, "dt_bias must be a torch.Tensor", dict(dt_bias=0.5)),
        (TypeError, "z must have dtype", dict(z=z.half())),
        (ValueError, "z must have the shape of x", dict(z=z[:, :2])),
        (TypeError, "dt_softplus must be a bool", dict(dt_softplus=1)),
        (TypeError, "cu_seqlens must have dtype", dict(cu_seqlens=cu.float())),
        (ValueError, "cu_seqlens must be 1-D", dict(cu_seqlens=cu[None])),
        (ValueError, "cu_seqlens must have N", dict(cu_seqlens=cu[:0])),
        (ValueError, r"cu_seqlens\[0\] must be 0", dict(cu_seqlens=torch.tensor(
            [1, 2, 3], dtype=torch.int32))),
        (ValueError, "cu_seqlens must be non-decreasing", dict(cu_seqlens=torch.tensor(
            [0, 3, 2, 3], dtype=torch.int32), state_indices=torch.tensor([0, 1, 2]))),
        (ValueError, r"cu_seqlens\[-1\] \(2\) must equal", dict(cu_seqlens=torch.tensor(
            [0, 1, 2], dtype=torch.int32))),
        (TypeError, "state must have dtype", dict(state=pool.half())),
        (ValueError, r"state must have shape \[S, Dm = 4, N = 5\]",
         dict(state=pool[:, :, :2])),
        (ValueError, "state_indices is required", dict(state_indices=None)),
        (ValueError, "state_indices needs state", dict(state=None)),
        (ValueError, "has_initial_state needs state", dict(
            state=None, state_indices=None, has_initial_state=torch.tensor([True, True]))),
        (TypeError, "state_indices must have dtype", dict(state_indices=slots.float())),
        (ValueError, r"state_indices must have shape \[N = 2\]",
         dict(state_indices=slots[:1])),
        (ValueError, r"state_indices values must be -1 \(padding\) or in \[0, 3\)",
         dict(state_indices=torch.tensor([0, 3]))),
        (ValueError, "state_indices values must be", dict(state_indices=torch.tensor([-2, 0]))),
        (ValueError, "state_indices must be distinct", dict(state_indices=torch.tensor([1, 1]))),
        (TypeError, "has_initial_state must have dtype", dict(
            has_initial_state=torch.tensor([1, 0]))),
        (ValueError, r"has_initial_state must have shape \[N = 2\]", dict(
            has_initial_state=torch.tensor([True]))),
        (TypeError, "max_seqlen must be an int", dict(max_seqlen=2.0)),
        (ValueError, "max_seqlen must be >= 0", dict(max_seqlen=-1)),
        (ValueError, r"max_seqlen \(1\) is below a sequence length \(2\)", dict(max_seqlen=1)),
        (ValueError, "state must be on meta", meta),
        (ValueError, "D must be on meta", dict(meta, D=d, state=None, state_indices=None)),
    ]
    for exc, msg, over in cases:
        with pytest.raises(exc, match=msg):
            call(**over)
    call(state_indices=torch.tensor([-1, -1]))                   # repeated padding is fine
    call(state=None, state_indices=None, D=None, z=None, dt_bias=None, max_seqlen=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    gen = _gen(6)
    x, z, dt, bm, cm, cu = _inputs([3, 0, 2], 6, 2, 5, torch.bfloat16, gen, device=device)
    a, d, bias = _params(6, 5, gen, device)
    pool = torch.randn(4, 6, 5, generator=gen).to(device)
    op = torch.ops.minikernels.selective_scan
    with mk.use_backend(backend):
        torch.library.opcheck(op, (x, dt, a, bm, cm, cu, d, z, bias, True, pool,
                                   torch.tensor([3, -1, 0], device=device),
                                   torch.tensor([True, False, False], device=device)))
        torch.library.opcheck(op, (x, dt.bfloat16(), a, bm, cm, cu, None, None, None, False,
                                   None, None, None))
