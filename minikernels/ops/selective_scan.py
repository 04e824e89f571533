"""Op family: state-space models. Op: ``minikernels::selective_scan`` (state updated in place).

Mamba-1's selective scan (Mamba, FalconMamba, Jamba's Mamba layers) over varlen sequences
(FlashAttention's cu_seqlens layout) with a per-sequence state pool, as a serving engine calls
it: prefill chunks and single decode tokens in one call, each sequence reading its initial
state from its slot of the pool and writing its final state back there. Unlike Mamba-2
(:mod:`minikernels.ops.mamba`), every channel has its own decay per state (A [Dm, N]) and its
own step size, so there is no head structure to batch into matmuls: the scan is a
recurrence per channel. Spec: :func:`minikernels.ops.reference.selective_scan`. Backends:
reference, triton (auto's choice on CUDA): ops/triton/selective_scan.py.
Tests: tests/test_selective_scan.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, check_tensor
from . import reference
from ._ssm import check_bc, check_optional_vectors
from ._state_pool import check_cu_seqlens, check_optional_pool, resolve_max_seqlen

#: the largest SSM state size N (the kernel keeps a channel block's whole state in registers)
MAX_STATE = 256


@torch.library.custom_op("minikernels::selective_scan", mutates_args=("state",))
def _selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    cu_seqlens: Tensor, D: Tensor | None, z: Tensor | None,
                    dt_bias: Tensor | None, dt_softplus: bool, state: Tensor | None,
                    state_indices: Tensor | None, has_initial_state: Tensor | None,
                    max_seqlen: int = -1) -> Tensor:
    if _backend.resolve("selective_scan", x.device) == "triton":
        from .triton import selective_scan as triton_selective_scan
        return triton_selective_scan.selective_scan(x, dt, A, B, C, cu_seqlens, D, z, dt_bias,
                                                    dt_softplus, state, state_indices,
                                                    has_initial_state, max_seqlen)
    return reference.selective_scan(x, dt, A, B, C, cu_seqlens, D=D, z=z, dt_bias=dt_bias,
                                    dt_softplus=dt_softplus, state=state,
                                    state_indices=state_indices,
                                    has_initial_state=has_initial_state).contiguous()


@_selective_scan.register_fake
def _(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor,
      D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
      state: Tensor | None, state_indices: Tensor | None, has_initial_state: Tensor | None,
      max_seqlen: int = -1) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                   cu_seqlens: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                   dt_bias: Tensor | None = None, dt_softplus: bool = False,
                   state: Tensor | None = None, state_indices: Tensor | None = None,
                   has_initial_state: Tensor | None = None,
                   max_seqlen: int | None = None) -> Tensor:
    """Mamba-1's selective state-space scan over varlen sequences -> y [T, Dm] in x.dtype.

    x [T, Dm] (fp32 / fp16 / bf16, any strides; T may be 0); dt [T, Dm] (x's dtype or fp32);
    A [Dm, N] (fp32 or x's dtype; negative: -exp(A_log); state size N in [1, 256]);
    B, C [T, G, N] in x's dtype (G groups dividing Dm: channel c reads group c // (Dm // G);
    Mamba-1 models have G = 1); D, dt_bias [Dm] (fp32 or x's dtype) or None; z [T, Dm] in
    x's dtype or None; cu_seqlens int32 / int64 [N_seq + 1] (0, non-decreasing, T; empty
    sequences allowed). Per sequence and channel, with s [N] in fp32, per token in order:
        d = dt_t + dt_bias;  d = softplus(d) if dt_softplus
        s = s * exp(d * A) + d * x_t * B_t;   y_t = s . C_t (+ D * x_t);  y_t *= silu(z_t)
    fp32 math, y rounded once to x.dtype. dt_softplus defaults to False, as mamba_ssm's
    ``selective_scan_fn`` (Mamba models pass True with their dt_proj bias as dt_bias).

    state: None (every sequence starts from zeros; no state is written) or an fp32 pool
    [S, Dm, N] (any strides) updated IN PLACE: sequence i starts from
    state[state_indices[i]] (or zeros where has_initial_state[i] is False) and its final s
    is written there. state_indices int32 / int64 [N_seq] (required with state): distinct
    slots in [0, S), or -1 for a padding row (zero outputs, slot neither read nor written).
    has_initial_state bool [N_seq] (None = all True). max_seqlen: an optional host upper
    bound on the sequence lengths (checked when index checks are on; None: read from
    cu_seqlens when index checks run, else unknown), a launch hint for the kernel.
    See :func:`minikernels.ops.reference.selective_scan`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    dev = x.device
    total, dm = x.shape
    if dm == 0:
        raise ValueError(f"x must have Dm >= 1 channels, got shape {list(x.shape)}")
    float_like = tuple(dict.fromkeys((torch.float32, x.dtype)))
    check_tensor("dt", dt, dtypes=float_like, ndim=2, device=dev)
    if tuple(dt.shape) != (total, dm):
        raise ValueError(f"dt must have shape [T = {total}, Dm = {dm}], got {list(dt.shape)}")
    check_tensor("A", A, dtypes=float_like, ndim=2, device=dev)
    _, dstate = check_bc(B, C, x, units="channels", dim="Dm", size=dm,
                         max_state=MAX_STATE)
    if tuple(A.shape) != (dm, dstate):
        raise ValueError(f"A must have shape [Dm = {dm}, N = {dstate}], got {list(A.shape)}")
    check_optional_vectors({"D": D, "dt_bias": dt_bias}, "Dm", dm, float_like, dev)
    if z is not None:
        check_tensor("z", z, dtypes=(x.dtype,), ndim=2, device=dev)
        if tuple(z.shape) != (total, dm):
            raise ValueError(f"z must have the shape of x {list(x.shape)}, got "
                             f"{list(z.shape)}")
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    cu_seqlens = check_cu_seqlens(cu_seqlens, total, dev)
    n = cu_seqlens.shape[0] - 1
    state_indices, has_initial_state = check_optional_pool(
        "state", state, {"Dm": dm, "N": dstate}, (torch.float32,), state_indices,
        has_initial_state, n, dev)
    max_seqlen = resolve_max_seqlen(max_seqlen, cu_seqlens, n, unknown=-1)
    return torch.ops.minikernels.selective_scan(x, dt, A, B, C, cu_seqlens, D, z, dt_bias,
                                                dt_softplus, state, state_indices,
                                                has_initial_state, max_seqlen)
