"""Dao-AILab's ``causal_conv1d`` package API on :func:`minikernels.ops.causal_conv1d`, so
code written against it (Mamba / Mamba-2 layers, transformers' hybrid models) swaps one
import:

    from minikernels.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    out = causal_conv1d_fn(x, weight, bias, activation="silu")        # x [batch, dim, seqlen]
    out = causal_conv1d_update(x, conv_state, weight, bias, "silu")   # conv_state in place

Names, argument order, defaults, layouts and return values are the package's
(``causal_conv1d/causal_conv1d_interface.py``):

    causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, final_states_out=None, activation=None)
        x [batch, dim, seqlen] (channel-first or channel-last strides), weight [dim, width]
        (2 <= width <= 8), bias [dim]; initial_states [batch, dim, width - 1] (read, not
        written); returns out [batch, dim, seqlen] in x's dtype (channel-last strides when x
        is channel-last, else contiguous), or (out, final_states) with return_final_states:
        each row's last width - 1 inputs [batch, dim, width - 1] in x's dtype (zeros /
        initial_states shifted in for rows shorter than width - 1), written into
        final_states_out when given. seq_idx [batch, seqlen] (int32 / int64): sub-sequence
        ids; a token's window only sees tokens of its own sub-sequence, tokens with
        seq_idx < 0 are padding (zero outputs); each id must form one contiguous run per row.
        As the package: seq_idx excludes initial_states and return_final_states.
    causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         cache_seqlens=None, conv_state_indices=None)
        x [batch, dim] or [batch, dim, seqlen]; conv_state [num_states, dim, state_len >=
        width - 1] updated in place: without cache_seqlens the whole buffer shifts left by
        seqlen (new inputs at the end; the window is its last width - 1 columns); with
        cache_seqlens [batch] it is a circular buffer (window = the width - 1 entries before
        cache_seqlens % state_len, inputs written from there). conv_state_indices [batch]
        (None: row i uses state i) selects each row's state; negative entries are padding
        rows (zero outputs, state untouched). Returns out shaped like x in x's dtype.

activation: None, "silu" or "swish" (anything else: NotImplementedError, as the
package). The math is one fp32 pass of the op (reference on the CPU, Triton on CUDA),
rounded once to x's dtype; weight / bias may be fp32 or any float dtype (widened to fp32,
exactly, when they differ from x's).

Differences, by design: no backward (inference); return_final_states works for any x
layout (the package wants channel-last); conv_state may also be fp32 with fp16 / bf16 x;
widths 5..8 work in fp32 too. Errors are ValueError / TypeError naming the argument.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._validation import FLOAT_DTYPES, check_shape, check_tensor, index_checks_active
from ..ops._state_pool import check_slot_values
from .vllm_ops import _vllm_names as _renamed

__all__ = ["causal_conv1d_fn", "causal_conv1d_update"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _activation(activation: object) -> str | None:
    if activation is None:
        return None
    if isinstance(activation, str) and activation in ("silu", "swish"):
        return "silu"
    raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got "
                              f"{activation!r}")


def _weights(weight: object, bias: object, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """weight [dim, width] / bias [dim] of any float dtype; widened to fp32 (exact) when
    they are neither x's dtype nor fp32 (the op's two choices)."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    if weight.dtype not in (x.dtype, torch.float32):
        weight = weight.float()
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
        if bias.dtype not in (x.dtype, torch.float32):
            bias = bias.float()
    return weight, bias


def _tokens(x: Tensor) -> Tensor:
    """[batch, dim, seqlen] -> token-major [batch * seqlen, dim] (a view if channel-last)."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1])


def _like_x(out: Tensor, x: Tensor) -> Tensor:
    """Token-major out [batch * seqlen, dim] -> [batch, dim, seqlen] with the package's
    ``empty_like(x)`` layout: channel-last strides for channel-last x, else contiguous."""
    batch, dim, seqlen = x.shape
    y = out.view(batch, seqlen, dim).transpose(1, 2)
    channel_last = x.stride(1) == 1 and x.stride(2) != 1
    return y if channel_last else y.contiguous()


def _seq_idx_runs(seq_idx: Tensor, batch: int, seqlen: int) -> tuple[Tensor, Tensor]:
    """seq_idx [batch, seqlen] -> (cu_seqlens over the flattened tokens, one sequence per
    run of equal ids in a row; the padding mask of the tokens, seq_idx < 0)."""
    dev = seq_idx.device
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=dev)
    if seqlen > 1:
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    flat = starts.reshape(-1)
    if index_checks_active(seq_idx):
        rows = torch.arange(batch, device=dev).repeat_interleave(seqlen)[flat]
        pairs = torch.stack([rows, seq_idx.reshape(-1)[flat].long()], 1)
        if torch.unique(pairs, dim=0).shape[0] != pairs.shape[0]:
            raise NotImplementedError(
                "seq_idx with an id that reappears after another id in the same row is not "
                "supported by minikernels (each sub-sequence must be one contiguous run)")
    bounds = flat.nonzero().flatten().to(torch.int32)
    total = torch.tensor([batch * seqlen], dtype=torch.int32, device=dev)
    return torch.cat([bounds, total]), (seq_idx < 0).reshape(-1)


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     seq_idx: Tensor | None = None, initial_states: Tensor | None = None,
                     return_final_states: bool = False, final_states_out: Tensor | None = None,
                     activation: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The package's causal_conv1d_fn (see the module docstring): out [batch, dim, seqlen],
    or (out, final_states [batch, dim, width - 1]) with return_final_states."""
    act = _activation(activation)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)
    batch, dim, seqlen = x.shape
    weight, bias = _weights(weight, bias, x)
    width = weight.shape[1]
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool, got "
                        f"{type(return_final_states).__name__}")
    tokens = _tokens(x)
    if seq_idx is not None:
        if initial_states is not None:
            raise ValueError("initial_states must be None if seq_idx is not None (as "
                             "causal_conv1d's)")
        if return_final_states:
            raise ValueError("return_final_states must be False if seq_idx is not None (as "
                             "causal_conv1d's: no final states for sub-sequences)")
        check_tensor("seq_idx", seq_idx, dtypes=_INDEX_DTYPES, ndim=2, device=x.device)
        check_shape("seq_idx", seq_idx, [batch, seqlen])
        cu, pad = _seq_idx_runs(seq_idx, batch, seqlen)
        out = ops.causal_conv1d(tokens, weight, bias, cu_seqlens=cu, activation=act,
                                max_seqlen=seqlen)
        out = out.masked_fill(pad[:, None], 0.0)
        return _like_x(out, x)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=x.device) * seqlen
    pool = None
    if initial_states is not None:
        check_tensor("initial_states", initial_states, dtypes=FLOAT_DTYPES, ndim=3,
                     device=x.device)
        check_shape("initial_states", initial_states, [batch, dim, width - 1])
        # the op rewrites its state pool: work on a copy (the package only reads it)
        pool = (initial_states.clone() if initial_states.dtype in (x.dtype, torch.float32)
                else initial_states.float())
    elif return_final_states:
        pool = torch.zeros(batch, dim, width - 1, dtype=x.dtype, device=x.device)
    slots = None if pool is None else torch.arange(batch, device=x.device)
    with _renamed({"conv_state": "initial_states"}):
        out = ops.causal_conv1d(tokens, weight, bias, cu_seqlens=cu, conv_state=pool,
                                state_indices=slots, activation=act, max_seqlen=seqlen)
    out = _like_x(out, x)
    if not return_final_states:
        return out
    final = pool.to(x.dtype)
    if final_states_out is not None:
        check_tensor("final_states_out", final_states_out, dtypes=(x.dtype,),
                     device=x.device)
        check_shape("final_states_out", final_states_out, [batch, dim, width - 1])
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor,
                         bias: Tensor | None = None, activation: str | None = None,
                         cache_seqlens: Tensor | None = None,
                         conv_state_indices: Tensor | None = None) -> Tensor:
    """The package's causal_conv1d_update (see the module docstring): out shaped like x;
    conv_state updated in place."""
    act = _activation(activation)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    dev = x.device
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    batch, dim, seqlen = x3.shape
    weight, bias = _weights(weight, bias, x)
    width = weight.shape[1]
    check_tensor("conv_state", conv_state, dtypes=tuple(dict.fromkeys((x.dtype,
                                                                       torch.float32))),
                 ndim=3, device=dev)
    check_shape("conv_state", conv_state, [None, dim, None])
    state_len, keep = conv_state.shape[2], width - 1
    if state_len < keep:
        raise ValueError(f"conv_state must have shape [*, {dim}, state_len >= width - 1 = "
                         f"{keep}], got {list(conv_state.shape)}")
    if conv_state_indices is None:
        if conv_state.shape[0] < batch:
            raise ValueError(f"conv_state must have a state per row (batch = {batch}) when "
                             f"conv_state_indices is None, got {list(conv_state.shape)}")
        slots = torch.arange(batch, device=dev)
    else:
        check_tensor("conv_state_indices", conv_state_indices, dtypes=_INDEX_DTYPES, ndim=1,
                     device=dev)
        check_shape("conv_state_indices", conv_state_indices, [batch])
        slots = torch.where(conv_state_indices < 0, -1, conv_state_indices.long())
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
        check_shape("cache_seqlens", cache_seqlens, [batch])
    tokens = x3.transpose(1, 2).reshape(batch * seqlen, dim)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev) * seqlen
    if cache_seqlens is None and state_len == keep:
        # the op's own layout: each row's window is its whole state, updated in place
        with _renamed({"state_indices": "conv_state_indices"}):
            out = ops.causal_conv1d(tokens, weight, bias, cu_seqlens=cu,
                                    conv_state=conv_state, state_indices=slots,
                                    activation=act, max_seqlen=seqlen)
    else:
        # a longer or circular buffer: run the op on each live row's window (a copy), then
        # write the buffer's new contents back (plain indexing, exact copies of x)
        with _renamed({"state_indices": "conv_state_indices"}):
            check_slot_values(slots, conv_state.shape[0], "conv_state")
        live = slots >= 0
        used = slots[live]
        rows = conv_state[used]                                   # [n, dim, state_len]
        new = x3[live].to(conv_state.dtype)                       # [n, dim, seqlen]
        if cache_seqlens is None:
            window = rows[:, :, state_len - keep:]
            rows = torch.cat([rows, new], dim=2)[:, :, -state_len:]
        else:
            start = cache_seqlens[live].long() % state_len        # [n]
            offs = torch.arange(-keep, 0, device=dev)
            at = (start[:, None] + offs) % state_len
            window = rows.gather(2, at[:, None, :].expand(-1, dim, -1))
            first = max(seqlen - state_len, 0)                    # later writes win
            at = (start[:, None] + torch.arange(first, seqlen, device=dev)) % state_len
            rows = rows.scatter(2, at[:, None, :].expand(-1, dim, -1), new[:, :, first:])
        local = torch.full((batch,), -1, dtype=torch.int64, device=dev)
        local[live] = torch.arange(used.shape[0], device=dev)
        out = ops.causal_conv1d(tokens, weight, bias, cu_seqlens=cu,
                                conv_state=window.contiguous(), state_indices=local,
                                activation=act, max_seqlen=seqlen)
        conv_state[used] = rows
    if x.dim() == 2:
        return out.view(batch, dim)
    return _like_x(out, x3)
