"""Mamba-1's selective scan (Mamba, FalconMamba, Jamba's Mamba layers) in Triton.

The op (minikernels/ops/selective_scan.py) runs, per sequence and channel c, an [N] fp32
state s through its tokens (g = c // (Dm / G) the B / C group of channel c):

    d = dt_t[c] + dt_bias[c];  d = softplus(d) if DT_SOFTPLUS
    s = s * exp(d * A[c, :]) + (d * x_t[c]) * B_t[g]      decay per state, rank-1 write
    y_t[c] = (s . C_t[g] + D[c] * x_t[c]) * silu(z_t[c])  read, skip connection, gate

Algorithm: a grid over (sequence, BLOCK_D channels). Channels are independent (each has
its own decay per state and its own step size: no head structure to batch into matmuls),
so each program owns a [BLOCK_D, BLOCK_N >= N] fp32 tile of states in registers, beside
the matching tile of A, for its whole sequence: it loads the tile from its state slot once
(or starts from zeros), loops over the sequence's tokens in order (its BLOCK_D slice of
x_t, dt_t, z_t; B_t and C_t of the block's group, or of each channel's group when a block
straddles groups; the decay, the rank-1 write, the output slice as a row sum over N), and
stores the final tile back to the slot once. A padding row (slot -1) reads no state,
computes on zeros (x, z, B, C masked to 0, d forced to 0), writes zero outputs and no
state. One token per step, no tensor cores; every output row of every sequence is
written (padding rows too). Prefill launches prefetch: token t + 1's inputs load during
step t (they do not depend on the state), so the serial chain is arithmetic only; launches
with few programs (a few long prompts) take smaller channel blocks (launch_config).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

#: the largest state tile (BLOCK_D * BLOCK_N fp32 values) one program keeps in registers
#: (the A tile beside it doubles that)
MAX_TILE = 2048
#: launches with fewer programs get smaller channel blocks (about 2 per SM of an H200)
MIN_PROGRAMS = 256


@triton.jit
def _token_inputs(x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, t, eos, d_in, N, offs_d, offs_n,
                  b_off, c_off, stride_xt, stride_xd, stride_dtt, stride_dtd, stride_zt,
                  stride_zd, stride_bt, stride_ct, SAME_GROUP: tl.constexpr,
                  HAS_Z: tl.constexpr):
    """Token t's x, dt, z slices and its B / C rows in fp32; zeros past the sequence's end
    (t >= eos) or for a padding row (d_in = 0): the masks are bounds, no scalar bools."""
    d_bound = tl.where(t < eos, d_in, 0)
    n_bound = tl.where(d_bound > 0, N, 0)
    d_live = offs_d < d_bound
    x = tl.load(x_ptr + t * stride_xt + offs_d * stride_xd, mask=d_live, other=0.0
                ).to(tl.float32)
    dt = tl.load(dt_ptr + t * stride_dtt + offs_d * stride_dtd, mask=d_live, other=0.0
                 ).to(tl.float32)
    zv = tl.zeros_like(x)
    if HAS_Z:
        zv = tl.load(z_ptr + t * stride_zt + offs_d * stride_zd, mask=d_live, other=0.0
                     ).to(tl.float32)
    if SAME_GROUP:
        bc_mask = offs_n < n_bound
    else:
        bc_mask = d_live[:, None] & (offs_n < n_bound)[None, :]
    b = tl.load(b_ptr + t * stride_bt + b_off, mask=bc_mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + t * stride_ct + c_off, mask=bc_mask, other=0.0).to(tl.float32)
    return x, dt, zv, b, c


@triton.jit
def selective_scan_kernel(
        x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, dt_bias_ptr, y_ptr, cu_ptr,
        state_ptr, slot_ptr, init_ptr, DM, N, CPG,
        stride_xt, stride_xd, stride_dtt, stride_dtd, stride_ad, stride_an, stride_bt,
        stride_bg, stride_bn, stride_ct, stride_cg, stride_cn, stride_d, stride_zt,
        stride_zd, stride_dtb, stride_yt, stride_ss, stride_sd, stride_sn,
        SAME_GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
        DT_SOFTPLUS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
        PREFETCH: tl.constexpr, RNE_BF16: tl.constexpr):
    seq = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < DM
    n_ok = offs_n < N
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)

    # the initial state tile: the sequence's slot, or zeros. A padding row (slot -1) masks
    # every load and store by bounds of 0 (the interpreter takes no scalar-bool masks).
    s = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    d_in = DM
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        d_in = tl.where(slot >= 0, DM, 0)
        d_read = d_in
        if HAS_INIT_FLAGS:
            d_read = tl.where(tl.load(init_ptr + seq) != 0, d_in, 0)
        s_ptrs = (state_ptr + slot * stride_ss + offs_d[:, None] * stride_sd
                  + offs_n[None, :] * stride_sn)
        s = tl.load(s_ptrs, mask=(offs_d < d_read)[:, None] & n_ok[None, :], other=0.0)
    a = tl.load(a_ptr + offs_d[:, None] * stride_ad + offs_n[None, :] * stride_an,
                mask=d_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    d_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        d_skip = tl.load(d_ptr + offs_d * stride_d, mask=d_ok, other=0.0).to(tl.float32)
    dt_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DT_BIAS:
        dt_b = tl.load(dt_bias_ptr + offs_d * stride_dtb, mask=d_ok, other=0.0).to(tl.float32)
    if SAME_GROUP:   # the block lies in one group: one B / C row per token
        g_off = ((tl.program_id(1) * BLOCK_D) // CPG).to(tl.int64)
        b_off = g_off * stride_bg + offs_n * stride_bn
        c_off = g_off * stride_cg + offs_n * stride_cn
    else:            # channels of several groups: a B / C row per channel
        g_off = (offs_d // CPG).to(tl.int64)
        b_off = g_off[:, None] * stride_bg + offs_n[None, :] * stride_bn
        c_off = g_off[:, None] * stride_cg + offs_n[None, :] * stride_cn

    # PREFETCH (prefill launches): token t's inputs were loaded during step t - 1 (they do
    # not depend on the state), so a step waits on its arithmetic, not on global memory.
    # Decode launches (one token a sequence) load in the step and keep fewer registers.
    if PREFETCH:
        x, dt, zv, b, c = _token_inputs(x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, bos, eos, d_in,
                                        N, offs_d, offs_n, b_off, c_off, stride_xt,
                                        stride_xd, stride_dtt, stride_dtd, stride_zt,
                                        stride_zd, stride_bt, stride_ct, SAME_GROUP, HAS_Z)
    for t in range(bos, eos):
        if PREFETCH:
            x_nx, dt_nx, z_nx, b_nx, c_nx = _token_inputs(
                x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, t + 1, eos, d_in, N, offs_d, offs_n,
                b_off, c_off, stride_xt, stride_xd, stride_dtt, stride_dtd, stride_zt,
                stride_zd, stride_bt, stride_ct, SAME_GROUP, HAS_Z)
        else:
            x, dt, zv, b, c = _token_inputs(
                x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, t, eos, d_in, N, offs_d, offs_n, b_off,
                c_off, stride_xt, stride_xd, stride_dtt, stride_dtd, stride_zt, stride_zd,
                stride_bt, stride_ct, SAME_GROUP, HAS_Z)
        dt = dt + dt_b
        if DT_SOFTPLUS:   # torch's softplus (threshold 20), log1p(u) = log(w) u / (w - 1)
            u = tl.exp(tl.minimum(dt, 20.0))
            w = 1.0 + u
            sp = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
            dt = tl.where(dt > 20.0, dt, sp)
        if HAS_STATE:   # padding: zeros in (s = 0, x = B = C = 0, d = 0), zeros out
            dt = tl.where(offs_d < d_in, dt, 0.0)
        if SAME_GROUP:
            b2 = b[None, :]
            c2 = c[None, :]
        else:
            b2 = b
            c2 = c
        s = s * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * b2    # decay, rank-1 write
        y = tl.sum(s * c2, axis=1) + d_skip * x                      # s . C_t + D x_t
        if HAS_Z:
            y = y * (zv / (1.0 + tl.exp(-zv)))                       # * silu(z_t)
        if RNE_BF16:   # interpreter only (see interpreter_rounding)
            y = rne_bf16(y)
        tl.store(y_ptr + t * stride_yt + offs_d, y.to(y_ptr.dtype.element_ty), mask=d_ok)
        if PREFETCH:
            x, dt, zv, b, c = x_nx, dt_nx, z_nx, b_nx, c_nx

    if HAS_STATE:
        tl.store(s_ptrs, s, mask=(offs_d < d_in)[:, None] & (offs_n < tl.where(
            d_in > 0, N, 0))[None, :])


def launch_config(dm: int, n: int, channels_per_group: int, n_seq: int = MIN_PROGRAMS,
                  longest: int = 1) -> dict[str, int | bool]:
    """BLOCK_N = next power of two >= N (the whole state row: s . C_t is a full row sum);
    BLOCK_D = as many channels as keep the tile <= MAX_TILE fp32 values (128 at N 16, 8 at
    N 256), at most Dm rounded up to a power of two, halved (down to 16) while the launch
    would have fewer than MIN_PROGRAMS programs (a few long prompts: more, smaller programs
    walk their tokens side by side on more SMs). SAME_GROUP: every block lies in one B / C
    group (one group, or BLOCK_D divides the channels per group), so a token's B / C is one
    row. PREFETCH: the longest sequence has 2+ tokens. Warps: one per 256 tile values (8
    state values and 8 of A per thread) for decode; one per 128 with PREFETCH (its
    prefetched inputs take registers, and shorter per-thread chains shorten each serial
    step), at least 4; at most 8."""
    block_n = triton.next_power_of_2(n)
    block_d = min(triton.next_power_of_2(dm), max(1, MAX_TILE // block_n))
    while block_d > 16 and n_seq * triton.cdiv(dm, block_d) < MIN_PROGRAMS:
        block_d //= 2
    same = channels_per_group == dm or channels_per_group % block_d == 0
    prefetch = longest >= 2
    per_warp = 128 if prefetch else 256
    # (prefetching tiles of <= 512 values get 4 warps: at 2, ptxas spills on sm_90a for
    # some shapes - [16 x 16] with N = 12 and strides of 12 - where 1 or 4 warps do not)
    least = 4 if prefetch else 1
    return {"BLOCK_D": block_d, "BLOCK_N": block_n, "SAME_GROUP": same, "PREFETCH": prefetch,
            "num_warps": max(least, min(8, block_d * block_n // per_warp))}


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, cu_seqlens: torch.Tensor, D: torch.Tensor | None,
                   z: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
                   state: torch.Tensor | None, state_indices: torch.Tensor | None,
                   has_initial_state: torch.Tensor | None, max_seqlen: int = -1
                   ) -> torch.Tensor:
    """Inputs validated by the op (x / dt / z [T, Dm], A [Dm, N], B / C [T, G, N], D /
    dt_bias [Dm], state [S, Dm, N]: any strides; cu_seqlens / state_indices /
    has_initial_state contiguous) -> y [T, Dm] in x.dtype (every row written); the state
    pool updated in place. max_seqlen (a host hint, -1 = unknown) picks PREFETCH (when
    unknown: ceil(T / N_seq) >= 2, which holds whenever a sequence has 2+ tokens unless
    empty sequences pull the mean down). No launch when there is no sequence, or no token
    and no pool (empty sequences with a pool still (re)write their slots)."""
    from .. import _alloc

    total, dm = x.shape
    groups, n_state = B.shape[1], B.shape[2]
    y = _alloc.empty((total, dm), x.dtype, x.device)
    n = cu_seqlens.shape[0] - 1
    if n == 0 or (total == 0 and state is None):
        return y
    cpg = dm // groups
    longest = max_seqlen if max_seqlen >= 0 else -(-total // n)
    cfg = launch_config(dm, n_state, cpg, n, longest)
    grid = (n, triton.cdiv(dm, cfg["BLOCK_D"]))
    has_state = state is not None
    st = state if has_state else y                   # unused pointers: any tensor
    st_strides = state.stride() if has_state else (0, 0, 0)
    selective_scan_kernel[grid](
        x, dt, A, B, C, D if D is not None else A, z if z is not None else x,
        dt_bias if dt_bias is not None else A, y, cu_seqlens, st,
        state_indices if has_state else cu_seqlens,
        has_initial_state if has_initial_state is not None else cu_seqlens,
        dm, n_state, cpg, *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        D.stride(0) if D is not None else 0, *(z.stride() if z is not None else (0, 0)),
        dt_bias.stride(0) if dt_bias is not None else 0, y.stride(0), *st_strides,
        SAME_GROUP=cfg["SAME_GROUP"], BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=dt_softplus, HAS_STATE=has_state,
        HAS_INIT_FLAGS=has_state and has_initial_state is not None, PREFETCH=cfg["PREFETCH"],
        RNE_BF16=splitk.interpreter_bf16(y), num_warps=cfg["num_warps"], num_stages=1)
    return y


# Mamba-1 layers (Mamba 2.8B: Dm 5120; FalconMamba 7B / Jamba: Dm 8192; N 16, one B / C
# group), bf16 and fp16, with a state pool and has_initial_state flags, D, z, dt_bias and
# softplus; A / D / dt_bias fp32 (the models' -exp(A_log).float()), dt in x's dtype; unit
# feature strides (as Triton's run-time specialization sees contiguous rows). Decode (256
# sequences, no prefetch) and prefill (4 x 1024 tokens: 64-channel blocks; one 4096-token
# prompt: 32-channel blocks; prefetch) launches; beside them N 256 (the largest state) and
# per-channel B / C groups (mamba_ssm's time-invariant B / C as G = Dm groups: a block
# straddles groups).
_UNIT = ("stride_xd", "stride_dtd", "stride_an", "stride_bn", "stride_cn", "stride_d",
         "stride_zd", "stride_dtb", "stride_sn")
_STRIDES = ("stride_xt", "stride_xd", "stride_dtt", "stride_dtd", "stride_ad", "stride_an",
            "stride_bt", "stride_bg", "stride_bn", "stride_ct", "stride_cg", "stride_cn",
            "stride_d", "stride_zt", "stride_zd", "stride_dtb", "stride_yt", "stride_ss",
            "stride_sd", "stride_sn")
_FLAGS = ("SAME_GROUP", "BLOCK_D", "BLOCK_N", "HAS_D", "HAS_Z", "HAS_DT_BIAS",
          "DT_SOFTPLUS", "HAS_STATE", "HAS_INIT_FLAGS", "PREFETCH", "RNE_BF16")
for _dt, _dm, _n, _cpg, _seqs, _len in (
        ("bf16", 5120, 16, 5120, 256, 1), ("bf16", 5120, 16, 5120, 4, 1024),
        ("fp16", 8192, 16, 8192, 256, 1), ("fp16", 8192, 16, 8192, 1, 4096),
        ("bf16", 5120, 256, 5120, 4, 1024), ("bf16", 5120, 16, 1, 4, 1024)):
    _cfg = launch_config(_dm, _n, _cpg, _seqs, _len)
    _sig = {"x_ptr": f"*{_dt}", "dt_ptr": f"*{_dt}", "a_ptr": "*fp32", "b_ptr": f"*{_dt}",
            "c_ptr": f"*{_dt}", "d_ptr": "*fp32", "z_ptr": f"*{_dt}", "dt_bias_ptr": "*fp32",
            "y_ptr": f"*{_dt}", "cu_ptr": "*i32", "state_ptr": "*fp32", "slot_ptr": "*i32",
            "init_ptr": "*i1", "DM": "i32", "N": "i32", "CPG": "i32"}
    for _name in _STRIDES:
        _sig[_name] = "constexpr" if _name in _UNIT else "i64"
    for _name in _FLAGS:
        _sig[_name] = "constexpr"
    _const = {"SAME_GROUP": _cfg["SAME_GROUP"], "BLOCK_D": _cfg["BLOCK_D"],
              "BLOCK_N": _cfg["BLOCK_N"], "HAS_D": True, "HAS_Z": True, "HAS_DT_BIAS": True,
              "DT_SOFTPLUS": True, "HAS_STATE": True, "HAS_INIT_FLAGS": True,
              "PREFETCH": _cfg["PREFETCH"], "RNE_BF16": False, **{_name: 1 for _name in _UNIT}}
    register(KernelSpec(
        name=(f"selective_scan[{_dt},Dm={_dm},N={_n},G={'Dm' if _cpg == 1 else 1},"
              f"{_seqs}x{_len},BLOCK_D={_cfg['BLOCK_D']}]"),
        fn=selective_scan_kernel, signature=_sig, constexprs=_const,
        num_warps=int(_cfg["num_warps"]), num_stages=1))
    if _len == 1:   # the decode steps the engine launches: no has_initial_state flags
        register(KernelSpec(
            name=(f"selective_scan[{_dt},Dm={_dm},N={_n},G=1,{_seqs}x{_len},"
                  f"BLOCK_D={_cfg['BLOCK_D']},init=False]"),
            fn=selective_scan_kernel, signature=_sig,
            constexprs={**_const, "HAS_INIT_FLAGS": False},
            num_warps=int(_cfg["num_warps"]), num_stages=1))
