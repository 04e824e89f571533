"""Depthwise causal conv1d over varlen sequences with a per-sequence state pool, in Triton.

Algorithm: a 3-D grid over (token tile, channel block, sequence); each program owns
BLOCK_T positions x BLOCK_D channels of one sequence. For each of the W taps k it loads
the input tile shifted by k - (W - 1) rows: rows at or after the sequence start come
from x, rows before it (positions -(W - 1) .. -1) from the sequence's conv_state slot
(zeros without a pool or with has_initial_state False), both as masked loads. The taps
are accumulated in fp32 with the per-channel weights, the bias is added first, SiLU
applied, and the tile is rounded once and stored. Padding rows (slot -1) store zeros.

State update, race-free: the new state of sequence i is the last W - 1 columns of
(old state ++ x_i). Only token tile 0 reads the old state (BLOCK_T >= min(W - 1,
max_seqlen), so every position that reaches back before the sequence start lies in
tile 0), and that same program writes the new state: its columns come from x, or, for
a sequence shorter than W - 1, from the old state it has loaded. A CTA barrier between
its loads and its state stores keeps one thread's store from overwriting a value another
thread of the program has not read yet. Slots are distinct per sequence, so no two
programs touch the same slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backend as _backend
from .. import _alloc
from .interpreter_rounding import rne_bf16
from .registry import KernelSpec, register

#: CUDA's limit on grid dims 1 and 2: longer batches are launched in chunks of sequences
_MAX_GRID_SEQS = 65535


@triton.jit
def causal_conv1d_kernel(x_ptr, w_ptr, b_ptr, cu_ptr, state_ptr, idx_ptr, init_ptr, out_ptr,
                         dim, stride_xt, stride_xd, stride_wd, stride_wk, stride_b,
                         stride_ss, stride_sd, stride_sc,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                         HAS_INIT_FLAGS: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         LONG_OFFSETS: tl.constexpr, RNE_BF16: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(2)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = (tl.load(cu_ptr + seq + 1).to(tl.int64) - start).to(tl.int32)
    t0 = tile * BLOCK_T
    # tile 0 always runs (it owns the state update, also of an empty sequence)
    if (tile == 0) | (t0 < length):
        x_seq = x_ptr + start * stride_xt                # the sequence's first row
        out_seq = out_ptr + start * dim
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        offs_t = t0 + tl.arange(0, BLOCK_T)              # positions in the sequence
        if LONG_OFFSETS:                                 # position * row stride >= 2^31
            offs_t = offs_t.to(tl.int64)
        mask_t = offs_t < length
        out_ptrs = out_seq + offs_t[:, None] * dim + offs_d[None, :]
        out_mask = mask_t[:, None] & mask_d[None, :]
        slot = tl.full([], -1, tl.int64)
        use_init = tl.full([], 0, tl.int32)              # 1: start from the slot's state
        pad = tl.full([], 0, tl.int1)
        if HAS_STATE:
            slot = tl.load(idx_ptr + seq).to(tl.int64)
            pad = slot < 0
            use_init = tl.where(slot >= 0, 1, 0)
            if HAS_INIT_FLAGS:
                use_init = tl.where(tl.load(init_ptr + seq) != 0, use_init, 0)
        state_base = state_ptr + slot * stride_ss
        if pad:
            # padding row (CUDA-graph padding): zero outputs, its slot untouched
            tl.store(out_ptrs, tl.zeros([BLOCK_T, BLOCK_D], tl.float32), mask=out_mask)
        else:
            acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + offs_d * stride_b, mask=mask_d, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            # tap k reads position p - (W - 1) + k: from x when it is >= 0
            for k in tl.static_range(W):
                j = offs_t - (W - 1) + k
                rows = (mask_t & (j >= 0))[:, None] & mask_d[None, :]
                v = tl.load(x_seq + j[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                            mask=rows, other=0.0)
                wk = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d,
                             other=0.0)
                acc += v.to(tl.float32) * wk.to(tl.float32)[None, :]
            if HAS_STATE:
                if tile == 0:
                    # as vectors: the interpreter cannot AND a scalar into a mask
                    init_t = (tl.zeros([BLOCK_T], tl.int32) + use_init) != 0
                    init_s = (tl.zeros([BLOCK_S], tl.int32) + use_init) != 0
                    # ... and from the old state's column W - 1 + j when j < 0 (taps
                    # k < W - 1 of positions p < W - 1: all inside tile 0)
                    for k in tl.static_range(W - 1):
                        j = offs_t - (W - 1) + k
                        old = (mask_t & (j < 0) & init_t)[:, None] & mask_d[None, :]
                        v = tl.load(state_base + offs_d[None, :] * stride_sd
                                    + (W - 1 + j)[:, None] * stride_sc, mask=old, other=0.0)
                        wk = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk,
                                     mask=mask_d, other=0.0)
                        acc += v.to(tl.float32) * wk.to(tl.float32)[None, :]
                    # new state column c = position length - (W - 1) + c of (old ++ x)
                    col = tl.arange(0, BLOCK_S)
                    src = length - (W - 1) + col
                    keep = col < W - 1
                    from_x = mask_d[:, None] & (keep & (src >= 0))[None, :]
                    from_s = mask_d[:, None] & (keep & (src < 0) & init_s)[None, :]
                    nx = tl.load(x_seq + src[None, :] * stride_xt
                                 + offs_d[:, None] * stride_xd, mask=from_x, other=0.0)
                    ns = tl.load(state_base + offs_d[:, None] * stride_sd
                                 + (W - 1 + src)[None, :] * stride_sc, mask=from_s,
                                 other=0.0)
                    new = nx.to(tl.float32) + ns.to(tl.float32)   # one of them is 0
                    # every old-state read of this program happens before any state write
                    tl.debug_barrier()
                    tl.store(state_base + offs_d[:, None] * stride_sd
                             + col[None, :] * stride_sc,
                             new.to(state_ptr.dtype.element_ty),
                             mask=mask_d[:, None] & keep[None, :])
            if SILU:
                acc = acc * tl.sigmoid(acc)
            if RNE_BF16:
                acc = rne_bf16(acc)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def launch_config(max_seqlen: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a batch whose longest sequence is max_seqlen:
    decode (1 token) one row x 512 channels; short chunks (speculative tokens) 8 x 128;
    prefill 64 x 64 on 8 warps (16 elements a thread: no spills with any strides).
    BLOCK_T is >= min(W - 1, max_seqlen) for every W <= 8."""
    if max_seqlen <= 1:
        return 1, 512, 4
    if max_seqlen <= 8:
        return 8, 128, 4
    return 64, 64, 8


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  cu_seqlens: torch.Tensor, conv_state: torch.Tensor | None,
                  state_indices: torch.Tensor | None, has_initial_state: torch.Tensor | None,
                  silu: bool, max_seqlen: int) -> torch.Tensor:
    """Inputs as validated by ops.conv.causal_conv1d (any strides); returns out [T, D]."""
    total, dim = x.shape
    width = weight.shape[1]
    out = _alloc.empty((total, dim), x.dtype, x.device)
    n = cu_seqlens.shape[0] - 1
    if n == 0 or dim == 0 or (total == 0 and conv_state is None):
        return out
    has_state = conv_state is not None
    cu = cu_seqlens.contiguous()
    idx = state_indices.contiguous() if has_state else cu
    flags = has_initial_state.contiguous() if has_initial_state is not None and has_state \
        else cu
    state = conv_state if has_state else x
    ss = conv_state.stride() if has_state else (0, 0, 0)
    block_t, block_d, warps = launch_config(max_seqlen)
    grid_t = max(1, triton.cdiv(max_seqlen, block_t))
    rne = x.dtype == torch.bfloat16 and _backend.interpreter_enabled()
    # offsets inside a sequence are int32 unless a position times a row stride may not fit
    long_offsets = (max_seqlen + 1) * max(abs(x.stride(0)), dim) + dim * abs(x.stride(1)) \
        >= 2**31
    for s0 in range(0, n, _MAX_GRID_SEQS):
        s1 = min(n, s0 + _MAX_GRID_SEQS)
        causal_conv1d_kernel[(grid_t, triton.cdiv(dim, block_d), s1 - s0)](
            x, weight, bias if bias is not None else weight, cu[s0:], state,
            idx[s0:] if has_state else idx, flags[s0:] if flags is not cu else flags, out,
            dim, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, ss[0], ss[1], ss[2],
            W=width, HAS_BIAS=bias is not None, HAS_STATE=has_state,
            HAS_INIT_FLAGS=has_state and has_initial_state is not None, SILU=bool(silu),
            BLOCK_T=block_t, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(max(width - 1, 1)), LONG_OFFSETS=long_offsets,
            RNE_BF16=rne,
            num_warps=warps)
    return out


for _dt in ("fp16", "bf16"):
    _sig = {"x_ptr": f"*{_dt}", "w_ptr": f"*{_dt}", "b_ptr": f"*{_dt}", "cu_ptr": "*i32",
            "state_ptr": f"*{_dt}", "idx_ptr": "*i32", "init_ptr": "*i1", "out_ptr": f"*{_dt}",
            "dim": "i32", "stride_xt": "i32", "stride_xd": "i32", "stride_wd": "i32",
            "stride_wk": "i32", "stride_b": "i32", "stride_ss": "i32", "stride_sd": "i32",
            "stride_sc": "i32", "W": "constexpr", "HAS_BIAS": "constexpr",
            "HAS_STATE": "constexpr", "HAS_INIT_FLAGS": "constexpr", "SILU": "constexpr",
            "BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "BLOCK_S": "constexpr",
            "LONG_OFFSETS": "constexpr", "RNE_BF16": "constexpr"}
    for _w in (3, 4):
        for _state in (False, True):
            for _max_seqlen in (1, 8, 4096):
                _bt, _bd, _warps = launch_config(_max_seqlen)
                register(KernelSpec(
                    name=f"causal_conv1d[{_dt},W={_w},state={_state},T={_bt},D={_bd}]",
                    fn=causal_conv1d_kernel, signature=_sig,
                    constexprs={"W": _w, "HAS_BIAS": True, "HAS_STATE": _state,
                                "HAS_INIT_FLAGS": _state, "SILU": True, "BLOCK_T": _bt,
                                "BLOCK_D": _bd, "BLOCK_S": triton.next_power_of_2(_w - 1),
                                "LONG_OFFSETS": False, "RNE_BF16": False},
                    num_warps=_warps, num_stages=1))
    # the steps the engine launches with every bias / SiLU choice: decode (a state pool
    # without has_initial_state flags) and prefill chunks (with them)
    for _bias in (False, True):
        for _silu in (False, True):
            for _init, _max_seqlen in ((False, 1), (True, 4096)):
                if _init and _bias and _silu:
                    continue                      # the loop above builds it
                _bt, _bd, _warps = launch_config(_max_seqlen)
                register(KernelSpec(
                    name=f"causal_conv1d[{_dt},W=4,state=True,T={_bt},D={_bd},init={_init},"
                         f"bias={_bias},silu={_silu}]",
                    fn=causal_conv1d_kernel, signature=_sig,
                    constexprs={"W": 4, "HAS_BIAS": _bias, "HAS_STATE": True,
                                "HAS_INIT_FLAGS": _init, "SILU": _silu, "BLOCK_T": _bt,
                                "BLOCK_D": _bd, "BLOCK_S": triton.next_power_of_2(4 - 1),
                                "LONG_OFFSETS": False, "RNE_BF16": False},
                    num_warps=_warps, num_stages=1))
