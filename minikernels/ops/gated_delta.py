"""Op family: linear attention. Op: ``minikernels::gated_delta_rule`` (state updated in place).

The Gated DeltaNet recurrence of Qwen3-Next / Qwen3.5's linear-attention layers over varlen
sequences (FlashAttention's cu_seqlens layout) with a per-sequence state pool, as a serving
engine calls it: prefill chunks and single decode tokens in one call, each sequence reading
its initial state from its slot of the pool and writing its final state back there.
Spec: :func:`minikernels.ops.reference.gated_delta_rule`. Backends: reference, triton
(ops/triton/gated_delta.py, the recurrent form; ops/triton/gated_delta_chunked.py, the
chunked prefill form, for launches whose max_seqlen reaches a threshold). Tests:
tests/test_gated_delta_rule.py, tests/test_gated_delta_rule_chunked.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_finite_float, check_tensor
from . import reference
from ._state_pool import check_cu_seqlens, check_optional_pool, resolve_max_seqlen

MAX_HEAD_DIM = 256


@torch.library.custom_op("minikernels::gated_delta_rule", mutates_args=("state",))
def _gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                      cu_seqlens: Tensor, state: Tensor | None, state_indices: Tensor | None,
                      has_initial_state: Tensor | None, scale: float,
                      use_qk_l2norm: bool, max_seqlen: int = -1) -> Tensor:
    if _backend.resolve("gated_delta_rule", v.device) == "triton":
        from .triton import gated_delta as triton_gated_delta
        return triton_gated_delta.gated_delta_rule(q, k, v, g, beta, cu_seqlens, state,
                                                   state_indices, has_initial_state, scale,
                                                   use_qk_l2norm, max_seqlen)
    return reference.gated_delta_rule(q, k, v, g, beta, cu_seqlens, state, state_indices,
                                      has_initial_state, scale, use_qk_l2norm)


@_gated_delta_rule.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor,
      state: Tensor | None, state_indices: Tensor | None, has_initial_state: Tensor | None,
      scale: float, use_qk_l2norm: bool, max_seqlen: int = -1) -> Tensor:
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                     cu_seqlens: Tensor, state: Tensor | None = None,
                     state_indices: Tensor | None = None,
                     has_initial_state: Tensor | None = None, scale: float | None = None,
                     use_qk_l2norm: bool = False, max_seqlen: int | None = None) -> Tensor:
    """Gated DeltaNet linear attention over varlen sequences -> o [T, Hv, dv] in v.dtype.

    q, k [T, Hk, dk], v [T, Hv, dv] (fp32 / fp16 / bf16, one dtype, any strides; Hv a
    multiple of Hk: value head h reads q / k head h // (Hv // Hk); dk, dv in [1, 256]);
    g [T, Hv] log-decay and beta [T, Hv] (the sigmoided write strength), fp32 or v.dtype;
    cu_seqlens int32 / int64 [N + 1] (0, non-decreasing, T; empty sequences allowed).
    Per sequence and value head, with S [dk, dv] in fp32, for each token in order:
        S = S * exp(g_t);  S = S + outer(k_t, beta_t * (v_t - k_t^T S));  o_t = (scale q_t)^T S
    (q and k L2-normalized per head first when use_qk_l2norm; scale default dk ** -0.5).

    state: None (every sequence starts from zeros; no state is written) or an fp32 pool
    [S, Hv, dk, dv] (any strides) updated IN PLACE: sequence i starts from
    state[state_indices[i]] (or zeros where has_initial_state[i] is False) and its final S
    is written there. state_indices int32 / int64 [N] (required with state): distinct slots
    in [0, S), or -1 for a padding row (zero outputs, slot neither read nor written).
    has_initial_state bool [N] (None = all True). max_seqlen: an optional host upper bound
    on the sequence lengths (checked when index checks are on); the Triton backend runs its
    chunked prefill kernels when it is >= 32, the recurrent kernel otherwise. None: the
    longest length read from cu_seqlens when index checks run (a host sync they do anyway),
    else unknown (the recurrent kernel, which needs no bound).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    dev = q.device
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    total, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {list(q.shape)}, got {list(k.shape)}")
    if v.shape[0] != total:
        raise ValueError(f"v must have T = {total} rows like q, got shape {list(v.shape)}")
    if hk == 0 or hv == 0 or hv % hk != 0:
        raise ValueError(f"v's heads (Hv = {hv}) must be a positive multiple of q / k's heads "
                         f"(Hk = {hk})")
    for name, d in (("q / k head dim dk", dk), ("v head dim dv", dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {d}")
    for name, t in (("g", g), ("beta", beta)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
        if t.dtype not in (torch.float32, v.dtype):
            raise TypeError(f"{name} must be float32 or v's dtype ({v.dtype}), got {t.dtype}")
        if tuple(t.shape) != (total, hv):
            raise ValueError(f"{name} must have shape [T = {total}, Hv = {hv}], got "
                             f"{list(t.shape)}")
    cu_seqlens = check_cu_seqlens(cu_seqlens, total, dev)
    n = cu_seqlens.shape[0] - 1
    state_indices, has_initial_state = check_optional_pool(
        "state", state, {"Hv": hv, "dk": dk, "dv": dv}, (torch.float32,), state_indices,
        has_initial_state, n, dev)
    scale = dk ** -0.5 if scale is None else check_finite_float("scale", scale)
    if not isinstance(use_qk_l2norm, bool):
        raise TypeError(f"use_qk_l2norm must be a bool, got {type(use_qk_l2norm).__name__}")
    # (unknown without index checks: the recurrent kernel)
    max_seqlen = resolve_max_seqlen(max_seqlen, cu_seqlens, n, unknown=-1)
    return torch.ops.minikernels.gated_delta_rule(q, k, v, g, beta, cu_seqlens, state,
                                                  state_indices, has_initial_state,
                                                  float(scale), use_qk_l2norm, max_seqlen)
