"""Mamba-2's selective state-space scan (SSD; Granite 4.0-H, Falcon-H1, Nemotron-H, Bamba,
Zamba2), the recurrent form, in Triton.

The op (minikernels/ops/mamba.py) runs, per sequence and head h, a [P, N] fp32 state S
through its tokens (g = h // (H / G) the B / C group of head h):

    d = dt_t[h] + dt_bias[h];  d = softplus(d);  d = clamp(d, dt_min, dt_max)
    S = S * exp(d * A[h]) + outer(d * x_t[h], B_t[g])     decay, rank-1 write
    y_t[h] = S @ C_t[g] + D[h] * x_t[h]                   read, skip connection

Algorithm: a grid over (sequence, head, BLOCK_P rows of P). The rows of S are independent
(the decay is a scalar per head and token, the write and the read mix only columns), so
each program owns a [BLOCK_P, BLOCK_N >= N] fp32 tile of S in registers for its whole
sequence: it loads the tile from its state slot once (or starts from zeros), loops over the
sequence's tokens (its BLOCK_P slice of x_t, all of B_t and C_t, dt_t; the decay, the
rank-1 update, the output slice as a row sum over N), and stores the final tile back to the
slot once. A padding row (slot -1) reads no state, computes on zeros, writes zero outputs
and no state. One token per step, no tensor cores: the decode path (and short chunks).

Dispatch (:func:`mamba2_scan`): a launch whose longest sequence (max_seqlen, a host int)
has CHUNKED_MIN_SEQLEN tokens or more runs the chunked SSD form instead
(mamba_chunked.py: intra-chunk C B^T masked by the decay and the chunk states as
tensor-core GEMMs, the state passed between chunks); shorter ones run this kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

#: the largest state tile (BLOCK_P * BLOCK_N fp32 values) one program keeps in registers
MAX_TILE = 2048
#: launches whose longest sequence has this many tokens or more take the chunked path
CHUNKED_MIN_SEQLEN = 32


@triton.jit
def mamba2_scan_kernel(
        x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, y_ptr, cu_ptr,
        state_ptr, slot_ptr, init_ptr, dt_min, dt_max, P, N,
        stride_xt, stride_xh, stride_xp, stride_dtt, stride_dth, stride_a, stride_bt,
        stride_bg, stride_bn, stride_ct, stride_cg, stride_cn, stride_d, stride_dtb,
        stride_yt, stride_yh, stride_ss, stride_sh, stride_sp, stride_sn,
        HEADS_PER_GROUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
        HAS_STATE: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr, RNE_BF16: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_ok = offs_p < P
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    a = tl.load(a_ptr + head * stride_a).to(tl.float32)
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(d_ptr + head * stride_d).to(tl.float32)
    dt_b = 0.0
    if HAS_DT_BIAS:
        dt_b = tl.load(dt_bias_ptr + head * stride_dtb).to(tl.float32)

    # the initial state tile: the sequence's slot, or zeros. A padding row (slot -1) masks
    # every load and store by bounds of 0 (the interpreter takes no scalar-bool masks).
    s = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    p_in = P
    n_in = N
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        p_in = tl.where(slot >= 0, P, 0)
        n_in = tl.where(slot >= 0, N, 0)
        p_read = p_in
        if HAS_INIT_FLAGS:
            p_read = tl.where(tl.load(init_ptr + seq) != 0, p_in, 0)
        s_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_p[:, None] * stride_sp + offs_n[None, :] * stride_sn)
        s = tl.load(s_ptrs, mask=(offs_p < p_read)[:, None] & (offs_n < N)[None, :],
                    other=0.0)
    p_live = offs_p < p_in
    n_live = offs_n < n_in

    for t in range(bos, eos):
        # row pointers (scalars) + lane offsets: no loop-invariant pointer vectors held
        x = tl.load(x_ptr + t * stride_xt + head * stride_xh + offs_p * stride_xp,
                    mask=p_live, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t * stride_bt + group * stride_bg + offs_n * stride_bn,
                    mask=n_live, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t * stride_ct + group * stride_cg + offs_n * stride_cn,
                    mask=n_live, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + t * stride_dtt + head * stride_dth).to(tl.float32) + dt_b
        if DT_SOFTPLUS:   # torch's softplus (threshold 20), log1p(u) = log(w) u / (w - 1)
            u = tl.exp(tl.minimum(dt, 20.0))
            w = 1.0 + u
            sp = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
            dt = tl.where(dt > 20.0, dt, sp)
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        if HAS_STATE:   # padding: zeros in (S = 0, x = B = C = 0), zeros out
            dt = tl.where(n_in > 0, dt, 0.0)
        s = s * tl.exp(dt * a) + (x * dt)[:, None] * b[None, :]     # decay, rank-1 write
        y = tl.sum(s * c[None, :], axis=1) + d_skip * x               # S C_t + D x_t
        if RNE_BF16:   # interpreter only (see interpreter_rounding)
            y = rne_bf16(y)
        tl.store(y_ptr + t * stride_yt + head * stride_yh + offs_p,
                 y.to(y_ptr.dtype.element_ty), mask=p_ok)

    if HAS_STATE:
        tl.store(s_ptrs, s, mask=p_live[:, None] & n_live[None, :])


def launch_config(p: int, n: int) -> dict[str, int]:
    """BLOCK_N = next power of two >= N (the whole state row: S C_t is a full row sum);
    BLOCK_P = as many rows of P as keep the tile <= MAX_TILE fp32 values (16 at N 128):
    small tiles give a decode step many programs (N_seq * H * P / BLOCK_P). One warp per
    512 tile values (16 state values per thread)."""
    block_n = triton.next_power_of_2(n)
    block_p = min(triton.next_power_of_2(p), max(1, MAX_TILE // block_n))
    return {"BLOCK_P": block_p, "BLOCK_N": block_n,
            "num_warps": max(1, block_p * block_n // 512)}


def mamba2_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, cu_seqlens: torch.Tensor, D: torch.Tensor | None,
                dt_bias: torch.Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float,
                state: torch.Tensor | None, state_indices: torch.Tensor | None,
                has_initial_state: torch.Tensor | None, max_seqlen: int = -1) -> torch.Tensor:
    """Inputs validated by the op (any strides; cu_seqlens / state_indices /
    has_initial_state contiguous) -> y [T, H, P] in x.dtype; state updated in place.
    max_seqlen: the longest sequence (a host int; -1 = unknown) picks the path: the
    chunked one (mamba_chunked) from CHUNKED_MIN_SEQLEN tokens on, else the recurrent
    kernel. Unknown: chunked only when the mean length T / N_seq (a lower bound of the
    longest) reaches the threshold."""
    from .. import _alloc

    total, h, p = x.shape
    groups, n_state = B.shape[1], B.shape[2]
    y = _alloc.empty((total, h, p), x.dtype, x.device)
    n = cu_seqlens.shape[0] - 1
    if n == 0 or (total == 0 and state is None):
        return y
    longest = max_seqlen if max_seqlen >= 0 else total // n
    if longest >= CHUNKED_MIN_SEQLEN:
        from . import mamba_chunked
        return mamba_chunked.mamba2_scan_chunked(
            x, dt, A, B, C, cu_seqlens, D, dt_bias, dt_softplus, dt_min, dt_max, state,
            state_indices, has_initial_state, y)
    cfg = launch_config(p, n_state)
    grid = (n, h, triton.cdiv(p, cfg["BLOCK_P"]))
    has_state = state is not None
    st = state if has_state else y                   # unused pointers: any tensor
    st_strides = state.stride() if has_state else (0, 0, 0, 0)
    mamba2_scan_kernel[grid](
        x, dt, A, B, C, D if D is not None else A, dt_bias if dt_bias is not None else A, y,
        cu_seqlens, st, state_indices if has_state else cu_seqlens,
        has_initial_state if has_initial_state is not None else cu_seqlens,
        dt_min, dt_max, p, n_state, *x.stride(), *dt.stride(), A.stride(0), *B.stride(),
        *C.stride(), D.stride(0) if D is not None else 0,
        dt_bias.stride(0) if dt_bias is not None else 0, y.stride(0), y.stride(1),
        *st_strides,
        HEADS_PER_GROUP=h // groups, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_STATE=has_state, HAS_INIT_FLAGS=has_state and has_initial_state is not None,
        RNE_BF16=splitk.interpreter_bf16(y), num_warps=cfg["num_warps"], num_stages=1)
    return y


# Granite 4.0-H / Bamba / Nemotron-H layers (P = 64, N = 128; H = 128 heads in G = 1 group,
# or G = 8 groups of 16), bf16 and fp16, with a state pool and has_initial_state flags, D,
# dt_bias and softplus; unit feature strides (as Triton's run-time specialization sees
# contiguous rows); dt in x's dtype or fp32.
_UNIT = ("stride_xp", "stride_dth", "stride_a", "stride_bn", "stride_cn", "stride_d",
         "stride_dtb", "stride_sn")
_STRIDES = ("stride_xt", "stride_xh", "stride_xp", "stride_dtt", "stride_dth", "stride_a",
            "stride_bt", "stride_bg", "stride_bn", "stride_ct", "stride_cg", "stride_cn",
            "stride_d", "stride_dtb", "stride_yt", "stride_yh", "stride_ss", "stride_sh",
            "stride_sp", "stride_sn")
_FLAGS = ("HEADS_PER_GROUP", "BLOCK_P", "BLOCK_N", "HAS_D", "HAS_DT_BIAS", "DT_SOFTPLUS",
          "HAS_STATE", "HAS_INIT_FLAGS", "RNE_BF16")
for _dt in ("bf16", "fp16"):
    for _groups, _dtdt in ((1, _dt), (8, "fp32")):
        _cfg = launch_config(64, 128)
        _sig = {"x_ptr": f"*{_dt}", "dt_ptr": f"*{_dtdt}", "a_ptr": "*fp32", "b_ptr": f"*{_dt}",
                "c_ptr": f"*{_dt}", "d_ptr": "*fp32", "dt_bias_ptr": "*fp32",
                "y_ptr": f"*{_dt}", "cu_ptr": "*i32", "state_ptr": "*fp32", "slot_ptr": "*i32",
                "init_ptr": "*i1", "dt_min": "fp32", "dt_max": "fp32", "P": "i32", "N": "i32"}
        for _name in _STRIDES:
            _sig[_name] = "constexpr" if _name in _UNIT else "i64"
        for _name in _FLAGS:
            _sig[_name] = "constexpr"
        _const = {"HEADS_PER_GROUP": 128 // _groups, "BLOCK_P": _cfg["BLOCK_P"],
                  "BLOCK_N": _cfg["BLOCK_N"], "HAS_D": True, "HAS_DT_BIAS": True,
                  "DT_SOFTPLUS": True, "HAS_STATE": True, "HAS_INIT_FLAGS": True,
                  "RNE_BF16": False, **{_name: 1 for _name in _UNIT}}
        register(KernelSpec(
            name=f"mamba2_scan[{_dt},P=64,N=128,G={_groups},dt={_dtdt},state=1]",
            fn=mamba2_scan_kernel, signature=_sig, constexprs=_const,
            num_warps=_cfg["num_warps"], num_stages=1))
        # the decode steps the engine launches: a state pool without has_initial_state flags
        register(KernelSpec(
            name=f"mamba2_scan[{_dt},P=64,N=128,G={_groups},dt={_dtdt},state=1,init=0]",
            fn=mamba2_scan_kernel, signature=_sig, constexprs={**_const, "HAS_INIT_FLAGS": False},
            num_warps=_cfg["num_warps"], num_stages=1))
