"""Op family: short convolutions. Op: ``minikernels::causal_conv1d`` (mutates conv_state).

The depthwise causal conv1d of Mamba / LFM2 / Qwen3.5's Gated DeltaNet layers over varlen
sequences (prefill chunks and single decode tokens in one call), with a per-sequence state
pool: conv_state [S, D, W - 1] holds each sequence's last W - 1 inputs (oldest first); a
sequence starts from its slot (or from zeros: has_initial_state False, or no pool), and
its slot is rewritten with its new last W - 1 inputs. state_indices -1 marks a padding row
(CUDA-graph padding): zero outputs, slot untouched. Spec: ``reference.causal_conv1d``.
Backends: reference, triton (ops/triton/causal_conv1d.py; auto's choice on CUDA).
Tests: tests/test_causal_conv1d.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor, index_checks_active
from . import reference

#: conv widths the kernels support (Mamba 4, Qwen3.5 / Qwen3-Next 4, LFM2 3)
MIN_WIDTH, MAX_WIDTH = 2, 8
_INDEX_DTYPES = (torch.int32, torch.int64)
_ACTIVATIONS = (None, "silu", "swish")


@torch.library.custom_op("minikernels::causal_conv1d", mutates_args=("conv_state",))
def _causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, cu_seqlens: Tensor,
                   conv_state: Tensor | None, state_indices: Tensor | None,
                   has_initial_state: Tensor | None, silu: bool, max_seqlen: int) -> Tensor:
    if _backend.resolve("causal_conv1d", x.device) == "triton":
        from .triton import causal_conv1d as triton_conv
        return triton_conv.causal_conv1d(x, weight, bias, cu_seqlens, conv_state,
                                         state_indices, has_initial_state, silu, max_seqlen)
    return reference.causal_conv1d(x, weight, bias, cu_seqlens=cu_seqlens,
                                   conv_state=conv_state, state_indices=state_indices,
                                   has_initial_state=has_initial_state,
                                   activation="silu" if silu else None).contiguous()


@_causal_conv1d.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, cu_seqlens: Tensor,
      conv_state: Tensor | None, state_indices: Tensor | None,
      has_initial_state: Tensor | None, silu: bool, max_seqlen: int) -> Tensor:
    return torch.empty((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)


def _check_cu_seqlens(cu: Tensor, total: int) -> None:
    if cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have N + 1 >= 1 entries, got shape "
                         f"{list(cu.shape)}")
    if not index_checks_active(cu):
        return
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu[0])}")
    if cu.shape[0] > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] ({int(cu[-1])}) must equal the number of tokens "
                         f"(x.shape[0] = {total})")


def _check_state_indices(state_indices: Tensor, slots: int) -> None:
    """Values in [-1, S); the non-padding ones distinct (when index checks are active)."""
    if not index_checks_active(state_indices):
        return
    lo, hi = int(state_indices.min()), int(state_indices.max())
    if lo < -1 or hi >= slots:
        raise ValueError(f"state_indices values must be -1 (padding) or in [0, {slots}), got "
                         f"min {lo} and max {hi}")
    used = state_indices[state_indices >= 0]
    if torch.unique(used).numel() != used.numel():
        raise ValueError("state_indices must be distinct (apart from -1 padding rows): two "
                         "sequences would share a conv_state slot")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  cu_seqlens: Tensor, conv_state: Tensor | None = None,
                  state_indices: Tensor | None = None, has_initial_state: Tensor | None = None,
                  activation: str | None = None, max_seqlen: int | None = None) -> Tensor:
    """Depthwise causal conv1d over varlen sequences: out [T, D] in x.dtype.

    x [T, D] fp32/fp16/bf16 (token-major, any strides; T may be 0); weight [D, W] with
    2 <= W <= 8, in x's dtype or fp32; bias [D] (x's dtype or fp32) or None; cu_seqlens
    int32/int64 [N + 1] (cu[0] = 0, non-decreasing, cu[N] = T; sequence i is rows
    cu[i] .. cu[i+1] - 1, empty sequences allowed).

    conv_state: None (every sequence starts from zeros, nothing is written) or
    [S, D, W - 1] (x's dtype or fp32, any strides), updated in place: slot
    state_indices[i] (int32/int64 [N], required with conv_state; -1 = padding row: zero
    outputs, slot neither read nor written; others distinct, in [0, S)) holds sequence i's
    initial state and receives its last W - 1 inputs (oldest first; a sequence shorter than
    W - 1 shifts the old state in). has_initial_state: bool [N] or None (all True); False
    starts that sequence from zeros whatever its slot holds.

    out[t, d] = act(bias[d] + sum_k weight[d, k] * xx[p + k, d]) with xx = (initial
    state, then the sequence's inputs) and p the position of t in its sequence; act =
    activation: None or "silu" (alias "swish"). fp32 math, rounded once.
    max_seqlen: an optional host upper bound of the sequence lengths (sizes the Triton
    grid without a device sync); None = computed from cu_seqlens (the number of tokens
    where index checks are off, e.g. under CUDA-graph capture).
    See :func:`minikernels.ops.reference.causal_conv1d`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    dev, (total, dim) = x.device, x.shape
    float_like = tuple(dict.fromkeys((x.dtype, torch.float32)))
    check_tensor("weight", weight, dtypes=float_like, ndim=2, device=dev)
    if weight.shape[0] != dim:
        raise ValueError(f"weight must have shape [D = {dim}, W], got {list(weight.shape)}")
    width = weight.shape[1]
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"weight's width W (its dim 1) must be in [{MIN_WIDTH}, "
                         f"{MAX_WIDTH}], got shape {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=float_like, ndim=1, device=dev)
        if bias.shape[0] != dim:
            raise ValueError(f"bias must have shape [D = {dim}], got {list(bias.shape)}")
    check_tensor("cu_seqlens", cu_seqlens, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
    _check_cu_seqlens(cu_seqlens, total)
    n = cu_seqlens.shape[0] - 1
    if activation is not None and (not isinstance(activation, str)
                                   or activation not in _ACTIVATIONS):
        raise ValueError(f"activation must be None or 'silu' (alias 'swish'), got "
                         f"{activation!r}")
    if conv_state is None:
        for name, t in (("state_indices", state_indices),
                        ("has_initial_state", has_initial_state)):
            if t is not None:
                raise ValueError(f"{name} needs conv_state (without a state pool every "
                                 "sequence starts from zeros)")
    else:
        check_tensor("conv_state", conv_state, dtypes=float_like, ndim=3, device=dev)
        if conv_state.shape[1] != dim or conv_state.shape[2] != width - 1:
            raise ValueError(f"conv_state must have shape [S, D = {dim}, W - 1 = "
                             f"{width - 1}], got {list(conv_state.shape)}")
        if state_indices is None:
            raise ValueError("state_indices is required with conv_state (each sequence's "
                             "slot; -1 = padding row)")
        check_tensor("state_indices", state_indices, dtypes=_INDEX_DTYPES, ndim=1,
                     device=dev)
        if state_indices.shape[0] != n:
            raise ValueError(f"state_indices must have one entry per sequence (N = {n}, "
                             f"from cu_seqlens), got shape {list(state_indices.shape)}")
        _check_state_indices(state_indices, conv_state.shape[0])
        if has_initial_state is not None:
            check_tensor("has_initial_state", has_initial_state, dtypes=(torch.bool,),
                         ndim=1, device=dev)
            if has_initial_state.shape[0] != n:
                raise ValueError(f"has_initial_state must have one entry per sequence "
                                 f"(N = {n}), got shape {list(has_initial_state.shape)}")
    if max_seqlen is None:
        max_seqlen = total
        if n and index_checks_active(cu_seqlens):
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    else:
        if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
            raise TypeError(f"max_seqlen must be an int or None, got "
                            f"{type(max_seqlen).__name__}")
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
        if n and index_checks_active(cu_seqlens):
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            if longest > max_seqlen:
                raise ValueError(f"max_seqlen ({max_seqlen}) is below a sequence length "
                                 f"({longest})")
    return torch.ops.minikernels.causal_conv1d(
        x, weight, bias, cu_seqlens, conv_state, state_indices, has_initial_state,
        activation is not None, max_seqlen)
