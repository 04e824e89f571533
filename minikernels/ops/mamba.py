"""Op family: state-space models. Op: ``minikernels::mamba2_scan`` (state updated in place).

Mamba-2's selective state-space scan (SSD) of Granite 4.0-H / Falcon-H1 / Nemotron-H / Bamba /
Zamba2's Mamba layers over varlen sequences (FlashAttention's cu_seqlens layout) with a
per-sequence state pool, as a serving engine calls it: prefill chunks and single decode tokens
in one call, each sequence reading its initial state from its slot of the pool and writing its
final state back there. Spec: :func:`minikernels.ops.reference.mamba2_scan`. Backends:
reference, triton (auto's choice on CUDA): ops/triton/mamba.py, the recurrent form, and
ops/triton/mamba_chunked.py, the chunked (SSD) prefill form for launches whose max_seqlen
reaches a threshold. Tests: tests/test_mamba2_scan.py, tests/test_mamba2_scan_chunked.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor
from . import reference
from ._ssm import check_bc, check_optional_vectors
from ._state_pool import check_cu_seqlens, check_optional_pool, resolve_max_seqlen

#: the largest SSM state size N (the kernels keep a whole row of the state in registers)
MAX_STATE = 256


@torch.library.custom_op("minikernels::mamba2_scan", mutates_args=("state",))
def _mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor,
                 D: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
                 dt_min: float, dt_max: float, state: Tensor | None,
                 state_indices: Tensor | None, has_initial_state: Tensor | None,
                 max_seqlen: int = -1) -> Tensor:
    if _backend.resolve("mamba2_scan", x.device) == "triton":
        from .triton import mamba as triton_mamba
        return triton_mamba.mamba2_scan(x, dt, A, B, C, cu_seqlens, D, dt_bias, dt_softplus,
                                        dt_min, dt_max, state, state_indices,
                                        has_initial_state, max_seqlen)
    return reference.mamba2_scan(x, dt, A, B, C, cu_seqlens, D=D, dt_bias=dt_bias,
                                 dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max),
                                 state=state, state_indices=state_indices,
                                 has_initial_state=has_initial_state).contiguous()


@_mamba2_scan.register_fake
def _(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor,
      D: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, dt_min: float,
      dt_max: float, state: Tensor | None, state_indices: Tensor | None,
      has_initial_state: Tensor | None, max_seqlen: int = -1) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _check_dt_limit(dt_limit: object) -> tuple[float, float]:
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit must be a (min, max) pair of numbers, got {dt_limit!r}")
    lo, hi = dt_limit
    for name, v in (("dt_limit[0]", lo), ("dt_limit[1]", hi)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        if math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
    if lo > hi:
        raise ValueError(f"dt_limit must have min <= max, got {tuple(dt_limit)}")
    return float(lo), float(hi)


def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                cu_seqlens: Tensor, D: Tensor | None = None, dt_bias: Tensor | None = None,
                dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
                state: Tensor | None = None, state_indices: Tensor | None = None,
                has_initial_state: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
    """Mamba-2's selective state-space scan over varlen sequences -> y [T, H, P] in x.dtype.

    x [T, H, P] (fp32 / fp16 / bf16, any strides; T may be 0); dt [T, H] (x's dtype or fp32);
    A [H] (fp32 or x's dtype; negative: -exp(A_log)); B, C [T, G, N] in x's dtype (G groups
    dividing H: head h reads group h // (H // G); state size N in [1, 256]); D, dt_bias [H]
    (fp32 or x's dtype) or None; cu_seqlens int32 / int64 [N_seq + 1] (0, non-decreasing, T;
    empty sequences allowed). Per sequence and head, with S [P, N] in fp32, per token in order:
        d = dt_t + dt_bias;  d = softplus(d) if dt_softplus;  d = clamp(d, *dt_limit)
        S = S * exp(d * A) + d * outer(x_t, B_t);   y_t = S @ C_t (+ D * x_t)
    fp32 math, y rounded once to x.dtype.

    state: None (every sequence starts from zeros; no state is written) or an fp32 pool
    [S, H, P, N] (any strides) updated IN PLACE: sequence i starts from
    state[state_indices[i]] (or zeros where has_initial_state[i] is False) and its final S
    is written there. state_indices int32 / int64 [N_seq] (required with state): distinct
    slots in [0, S), or -1 for a padding row (zero outputs, slot neither read nor written).
    has_initial_state bool [N_seq] (None = all True). max_seqlen: an optional host upper
    bound on the sequence lengths (checked when index checks are on); the Triton backend
    runs its chunked (SSD) prefill kernels when it is >= 32, the recurrent kernel
    otherwise. None: the longest length read from cu_seqlens when index checks run (a host
    sync they do anyway), else unknown (chunked only when T / N_seq >= 32).
    See :func:`minikernels.ops.reference.mamba2_scan`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)
    dev = x.device
    total, h, p = x.shape
    if h == 0 or p == 0:
        raise ValueError(f"x must have H >= 1 heads and head dim P >= 1, got shape "
                         f"{list(x.shape)}")
    float_like = tuple(dict.fromkeys((torch.float32, x.dtype)))
    check_tensor("dt", dt, dtypes=float_like, ndim=2, device=dev)
    if tuple(dt.shape) != (total, h):
        raise ValueError(f"dt must have shape [T = {total}, H = {h}], got {list(dt.shape)}")
    check_tensor("A", A, dtypes=float_like, ndim=1, device=dev)
    if A.shape[0] != h:
        raise ValueError(f"A must have shape [H = {h}], got {list(A.shape)}")
    _, dstate = check_bc(B, C, x, units="heads", dim="H", size=h, max_state=MAX_STATE)
    check_optional_vectors({"D": D, "dt_bias": dt_bias}, "H", h, float_like, dev)
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    dt_min, dt_max = _check_dt_limit(dt_limit)
    cu_seqlens = check_cu_seqlens(cu_seqlens, total, dev)
    n = cu_seqlens.shape[0] - 1
    state_indices, has_initial_state = check_optional_pool(
        "state", state, {"H": h, "P": p, "N": dstate}, (torch.float32,), state_indices,
        has_initial_state, n, dev)
    # (unknown without index checks: see triton/mamba.py's dispatch)
    max_seqlen = resolve_max_seqlen(max_seqlen, cu_seqlens, n, unknown=-1)
    return torch.ops.minikernels.mamba2_scan(x, dt, A, B, C, cu_seqlens, D, dt_bias,
                                             dt_softplus, dt_min, dt_max, state,
                                             state_indices, has_initial_state, max_seqlen)
