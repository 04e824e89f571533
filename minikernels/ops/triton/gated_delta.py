"""Gated DeltaNet linear attention (Qwen3-Next / Qwen3.5), the recurrent form, in Triton.

The op (minikernels/ops/gated_delta.py) runs, per sequence and value head, a [dk, dv] fp32
state S through its tokens:

    S = S * exp(g_t)                        decay (g_t <= 0 in practice: a gate)
    delta = beta_t * (v_t - k_t^T S)        what S predicts for k_t, corrected toward v_t
    S = S + outer(k_t, delta)               rank-1 write
    o_t = (scale * q_t)^T S                 read

Algorithm: a grid over (sequence, value head, BLOCK_V columns of dv). The columns of S are
independent (each update and read mixes only rows), so each program owns a
[BLOCK_K >= dk, BLOCK_V] fp32 tile of S in registers for its whole sequence: it loads the
tile from its state slot once (or starts from zeros), loops over the sequence's tokens
(q_t and k_t in fp32, L2-normalized in-kernel when asked, its BLOCK_V slice of v_t, g_t,
beta_t; decay, k^T S as a column sum, rank-1 update, the output slice as another column
sum), and stores the final tile back to the slot once. A padding row (slot -1) reads no
state, computes on zeros, writes zero outputs and no state. One token per step, no tensor
cores: the decode path, and correct (not fast) for prefill.
The chunked prefill (WY representation of 64-token chunks, tensor-core products) is in
gated_delta_chunked.py; :func:`gated_delta_rule` below picks it for launches whose
max_seqlen is >= CHUNKED_MIN_SEQLEN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import splitk
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

#: the largest state tile (BLOCK_K * BLOCK_V fp32 values) one program keeps in registers
MAX_TILE = 2048


@triton.jit
def gated_delta_rule_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, cu_ptr, state_ptr, slot_ptr, init_ptr,
        scale, DK, DV,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_bt, stride_bh,
        stride_ot, stride_oh, stride_ss, stride_sh, stride_sk, stride_sv,
        GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
        USE_L2NORM: tl.constexpr, HAS_STATE: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
        RNE_BF16: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)                       # value head; q / k head = head // GROUP
    qk_head = head // GROUP
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < DV
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)

    # the initial state tile: the sequence's slot, or zeros. A padding row (slot -1) masks
    # every load and store by bounds of 0 (the interpreter takes no scalar-bool masks).
    s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    dk_in = DK
    dv_in = DV
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        dk_in = tl.where(slot >= 0, DK, 0)
        dv_in = tl.where(slot >= 0, DV, 0)
        dk_read = dk_in
        if HAS_INIT_FLAGS:
            dk_read = tl.where(tl.load(init_ptr + seq) != 0, dk_in, 0)
        s_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv)
        s = tl.load(s_ptrs, mask=(offs_k < dk_read)[:, None] & v_ok[None, :], other=0.0)
    k_in = offs_k < dk_in
    v_in = offs_v < dv_in

    for t in range(bos, eos):
        # row pointers (scalars) + lane offsets: no loop-invariant pointer vectors held
        q = tl.load(q_ptr + t * stride_qt + qk_head * stride_qh + offs_k * stride_qd,
                    mask=k_in, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt + qk_head * stride_kh + offs_k * stride_kd,
                    mask=k_in, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + offs_v * stride_vd,
                    mask=v_in, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * stride_gt + head * stride_gh).to(tl.float32)
        beta = tl.load(beta_ptr + t * stride_bt + head * stride_bh).to(tl.float32)
        if HAS_STATE:   # padding: zeros in (S = 0, k = 0), zeros out
            g = tl.where(dk_in > 0, g, 0.0)
            beta = tl.where(dk_in > 0, beta, 0.0)
        if USE_L2NORM:   # transformers' / FLA's l2norm: x * rsqrt(sum(x^2) + 1e-6)
            q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6))
            k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6))
        q = q * scale
        s = s * tl.exp(g)                                       # decay
        kv = tl.sum(s * k[:, None], axis=0)                     # k^T S: [BLOCK_V]
        delta = (v - kv) * beta
        s = s + k[:, None] * delta[None, :]                     # rank-1 update
        o = tl.sum(s * q[:, None], axis=0)                      # (scale q)^T S
        if RNE_BF16:   # interpreter only (see interpreter_rounding)
            o = rne_bf16(o)
        tl.store(o_ptr + t * stride_ot + head * stride_oh + offs_v,
                 o.to(o_ptr.dtype.element_ty), mask=v_ok)

    if HAS_STATE:
        tl.store(s_ptrs, s, mask=k_in[:, None] & v_in[None, :])


def launch_config(dk: int, dv: int) -> dict[str, int]:
    """BLOCK_K = next power of two >= dk (the whole key dim: k^T S is a full column sum);
    BLOCK_V = as many dv columns as keep the tile <= MAX_TILE fp32 values (16 at dk 128,
    8 at dk 256): small tiles give a decode step many programs (N * Hv * dv / BLOCK_V).
    One warp per 512 tile values: each thread then holds 16 state values plus its share of
    q / k (about 120 registers at dk 128 on sm_80 / sm_90a; 2 warps take ~200, and 1 warp
    with twice the values spills)."""
    block_k = triton.next_power_of_2(dk)
    block_v = min(triton.next_power_of_2(dv), max(1, MAX_TILE // block_k))
    return {"BLOCK_K": block_k, "BLOCK_V": block_v,
            "num_warps": max(1, block_k * block_v // 512)}


#: the chunked prefill path (gated_delta_chunked.py) runs when a launch's max_seqlen is at
#: least this (a module attribute read per call: tests lower it to force that path)
CHUNKED_MIN_SEQLEN = 32


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, cu_seqlens: torch.Tensor,
                     state: torch.Tensor | None, state_indices: torch.Tensor | None,
                     has_initial_state: torch.Tensor | None, scale: float,
                     use_qk_l2norm: bool, max_seqlen: int = -1) -> torch.Tensor:
    """Inputs validated by the op (any strides; cu_seqlens / state_indices /
    has_initial_state contiguous) -> o [T, Hv, dv] in v.dtype; state updated in place.
    max_seqlen (a host bound of the sequence lengths, -1 = unknown) picks the path: the
    chunked tensor-core kernels from CHUNKED_MIN_SEQLEN on, else the recurrent kernel."""
    from .. import _alloc

    if max_seqlen >= 0 and max_seqlen >= CHUNKED_MIN_SEQLEN:
        from .gated_delta_chunked import gated_delta_rule_chunked
        return gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state, state_indices,
                                        has_initial_state, scale, use_qk_l2norm, max_seqlen)
    total, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    o = _alloc.empty((total, hv, dv), v.dtype, v.device)
    n = cu_seqlens.shape[0] - 1
    if n == 0 or (total == 0 and state is None):
        return o
    cfg = launch_config(dk, dv)
    grid = (n, hv, triton.cdiv(dv, cfg["BLOCK_V"]))
    has_state = state is not None
    st = state if has_state else o                   # unused pointers: any tensor
    st_strides = state.stride() if has_state else (0, 0, 0, 0)
    gated_delta_rule_kernel[grid](
        q, k, v, g, beta, o, cu_seqlens, st,
        state_indices if has_state else cu_seqlens,
        has_initial_state if has_initial_state is not None else cu_seqlens,
        scale, dk, dv, *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
        o.stride(0), o.stride(1), *st_strides,
        GROUP=hv // hk, BLOCK_K=cfg["BLOCK_K"], BLOCK_V=cfg["BLOCK_V"],
        USE_L2NORM=use_qk_l2norm, HAS_STATE=has_state,
        HAS_INIT_FLAGS=has_state and has_initial_state is not None,
        RNE_BF16=splitk.interpreter_bf16(o), num_warps=cfg["num_warps"], num_stages=1)
    return o


# Qwen3-Next / Qwen3.5 (dk = dv = 128, Hv = 2 Hk), bf16 and fp16, with a state pool and
# has_initial_state flags, with and without the in-kernel l2norm; unit feature strides (as
# Triton's run-time specialization sees contiguous rows); g / beta in fp32 or x's dtype;
# dk = dv = 256 and a state-less (zero initial state) call on one dtype each.
_UNIT = ("stride_qd", "stride_kd", "stride_vd", "stride_gh", "stride_bh", "stride_sv")
for _dt in ("bf16", "fp16"):
    for _d, _l2, _gdt, _state in ((128, True, "fp32", True), (128, False, _dt, True),
                                  (256, True, "fp32", True), (128, True, "fp32", False)):
        if _dt == "fp16" and _d == 256:
            continue
        _cfg = launch_config(_d, _d)
        _sig = {"q_ptr": f"*{_dt}", "k_ptr": f"*{_dt}", "v_ptr": f"*{_dt}",
                "g_ptr": f"*{_gdt}", "beta_ptr": f"*{_gdt}", "o_ptr": f"*{_dt}",
                "cu_ptr": "*i32", "state_ptr": "*fp32", "slot_ptr": "*i32", "init_ptr": "*i1",
                "scale": "fp32", "DK": "i32", "DV": "i32"}
        for _name in ("stride_qt", "stride_qh", "stride_qd", "stride_kt", "stride_kh",
                      "stride_kd", "stride_vt", "stride_vh", "stride_vd", "stride_gt",
                      "stride_gh", "stride_bt", "stride_bh", "stride_ot", "stride_oh",
                      "stride_ss", "stride_sh", "stride_sk", "stride_sv"):
            _sig[_name] = "constexpr" if _name in _UNIT else "i64"
        _const = {"GROUP": 2, "BLOCK_K": _cfg["BLOCK_K"], "BLOCK_V": _cfg["BLOCK_V"],
                  "USE_L2NORM": _l2, "HAS_STATE": _state, "HAS_INIT_FLAGS": _state,
                  "RNE_BF16": False, **{_name: 1 for _name in _UNIT}}
        for _name in ("GROUP", "BLOCK_K", "BLOCK_V", "USE_L2NORM", "HAS_STATE",
                      "HAS_INIT_FLAGS", "RNE_BF16"):
            _sig[_name] = "constexpr"
        register(KernelSpec(
            name=f"gated_delta_rule[{_dt},dk=dv={_d},g={_gdt},l2norm={int(_l2)},"
                 f"state={int(_state)}]",
            fn=gated_delta_rule_kernel, signature=_sig, constexprs=_const,
            num_warps=_cfg["num_warps"], num_stages=1))
        if _d == 128 and _l2 and _state:   # the decode steps the engine launches: no init flags
            register(KernelSpec(
                name=f"gated_delta_rule[{_dt},dk=dv={_d},g={_gdt},l2norm=1,state=1,init=0]",
                fn=gated_delta_rule_kernel, signature=_sig,
                constexprs={**_const, "HAS_INIT_FLAGS": False},
                num_warps=_cfg["num_warps"], num_stages=1))
