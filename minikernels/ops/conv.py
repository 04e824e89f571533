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
from .._validation import FLOAT_DTYPES, check_tensor
from ._state_pool import check_cu_seqlens, check_optional_pool, resolve_max_seqlen
from . import reference

#: conv widths the kernels support (Mamba 4, Qwen3.5 / Qwen3-Next 4, LFM2 3)
MIN_WIDTH, MAX_WIDTH = 2, 8
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
    cu_seqlens = check_cu_seqlens(cu_seqlens, total, dev, tokens="x.shape[0]")
    n = cu_seqlens.shape[0] - 1
    if activation is not None and (not isinstance(activation, str)
                                   or activation not in _ACTIVATIONS):
        raise ValueError(f"activation must be None or 'silu' (alias 'swish'), got "
                         f"{activation!r}")
    state_indices, has_initial_state = check_optional_pool(
        "conv_state", conv_state, {"D": dim, "W - 1": width - 1}, float_like, state_indices,
        has_initial_state, n, dev)
    # (unknown without index checks: the grid covers every token)
    max_seqlen = resolve_max_seqlen(max_seqlen, cu_seqlens, n, unknown=total)
    return torch.ops.minikernels.causal_conv1d(
        x, weight, bias, cu_seqlens, conv_state, state_indices, has_initial_state,
        activation is not None, max_seqlen)
