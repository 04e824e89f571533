"""mamba_ssm's scan API on :func:`minikernels.ops.mamba2_scan` (Mamba-2) and
:func:`minikernels.ops.selective_scan` (Mamba-1), so code written against it (Mamba-2
layers, transformers' Granite 4.0-H / Bamba / Falcon-H1 / Nemotron-H / Zamba2 / Mamba-2
models; Mamba-1 layers, transformers' Mamba / FalconMamba / Jamba / Zamba models) swaps one
import:

    from minikernels.compat.mamba_ssm import (mamba_chunk_scan_combined, selective_scan_fn,
                                              selective_state_update)
    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=D,
                                         dt_bias=dt_bias, dt_softplus=True,
                                         return_final_states=True)
    y = selective_state_update(state, x_t, dt_t, A_hpn, B_t, C_t, D_hp, dt_bias=bias_hp,
                               dt_softplus=True)            # state updated in place
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                  return_last_state=True)   # Mamba-1 prefill

mamba_ssm's names, defaults, layouts and returns (``mamba_ssm/ops/triton/ssd_combined.py``,
``selective_state_update.py``, ``selective_scan_interface.py``):

    mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, inf),
                              return_final_states=False, return_varlen_states=False)
        x [b, l, h, p], dt [b, l, h], A [h], B / C [b, l, g, n] (g groups dividing h),
        D [h] or [h, p], z [b, l, h, p] (out = y * silu(z)), dt_bias [h], initial_states
        [b, h, p, n] (read, not written), seq_idx [b, l] (sub-sequence ids: the scan
        restarts from zero where the id changes; each id one contiguous run per row),
        cu_seqlens [N + 1] (b = 1; used for return_varlen_states, and must mark the same
        sequences as seq_idx). Returns out [b, l, h, p] in x's dtype; with
        return_final_states also each row's final state fp32 [b, h, p, n] (the state after
        its last token, i.e. of its last sub-sequence); with return_varlen_states also each
        cu_seqlens sequence's final state [N, h, p, n] in C's dtype: out, (out, final),
        (out, varlen) or (out, final, varlen), as mamba_ssm. chunk_size (a positive int)
        only tiles mamba_ssm's kernels: the result does not depend on it.
    selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None)
        the decode step: Mamba-2's head form state [S, h, p, n] (fp32 / fp16 / bf16,
        updated in place), x / dt / z [batch, h, p], A [h, p, n], B / C [batch, g, n], D /
        dt_bias [h, p]; or Mamba-1's per-channel form state [S, dim, n], x / dt / z
        [batch, dim], A [dim, n], B / C [batch, n], D / dt_bias [dim];
        state_batch_indices [batch] (None: row i uses state i). Returns out shaped like x
        in x's dtype. No dt_limit (as mamba_ssm's).
    selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False, cu_seqlens=None)
        Mamba-1's scan over whole sequences from zeros: u / delta / z [b, dim, l] (any
        strides), A [dim, n] (real), B / C [b, n, l] (one group), [b, g, n, l] (g groups
        dividing dim; one group beside g is broadcast) or both [dim, n] (time-invariant:
        dim groups, a stride-0 view over the tokens), D / delta_bias [dim]; cu_seqlens
        [k + 1] (mamba_ssm's newer keyword: 0, ..., l; every row's scan restarts from zero
        at the inner boundaries). Returns out [b, dim, l] in u's dtype (a transposed view
        of the op's token-major output), or (out, last_state fp32 [b, dim, n]: the state
        after each row's last token), as mamba_ssm (its last_state is A's fp32 dtype).
        Batch rows are the op's sequences, flattened token-major: a view where the strides
        allow (transformers' transposed [b, l, d] activations do), else one copy (a
        contiguous [b, dim, l] delta with b > 1).

Per head, in fp32 with S [p, n]: d = clamp(softplus?(dt + dt_bias), dt_limit);
S = S * exp(d * A) + d * outer(x, B); y = S @ C + D * x; out = y (* silu(z)), rounded once
to x's dtype (z gating is done in fp32 before the rounding, as mamba_ssm's kernels).
Per channel (Mamba-1), the same with a state row s [n] and the channel's A [n], dt, D.

What maps and what is refused: mamba2_scan takes one A / dt / D / dt_bias value per head.
mamba_ssm's expanded Mamba-2 views (A [h, p, n], dt [batch, h, p], D / dt_bias [h, p] with
equal values along p / n, what every Mamba-2 model passes) run on it; a decode step whose
values vary along p or n (Mamba-1's per-channel A, the 3-D Mamba-1 form) runs on
selective_scan over h * p channels. mamba_chunk_scan_combined refuses a per-channel D
[h, p] (NotImplementedError naming it). selective_scan_fn refuses a complex A and a
time-invariant B beside a time-varying C (or the reverse) (NotImplementedError naming the
argument). Also refused (NotImplementedError): initial_states together with seq_idx,
cu_seqlens of several sequences without seq_idx (mamba_ssm's scan does not restart
between them then), seq_idx ids that reappear in a row. Errors are ValueError / TypeError
naming mamba_ssm's argument.

Differences, by design: no backward (inference); a -1 entry of state_batch_indices is a
padding row (zero output, no state touched; mamba_ssm has no padding and would index out
of bounds); fp16 / bf16 state pools are read into fp32 and rounded back once per call
(mamba_ssm rounds per step: the same for one token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._validation import FLOAT_DTYPES, check_shape, check_tensor, index_checks_active
from . import vllm_ops
from .vllm_ops import _per_head

__all__ = ["mamba_chunk_scan_combined", "selective_scan_fn", "selective_state_update"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _one_per_head(name: str, t: Tensor, keep: int, dims: str) -> Tensor:
    """An expanded per-head value -> its per-head values; varying values do not map."""
    try:
        return _per_head(name, t, keep, dims)
    except ValueError as exc:
        raise NotImplementedError(str(exc)) from None


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                           dt_bias: Tensor | None = None, dt_softplus: bool = False,
                           state_batch_indices: Tensor | None = None) -> Tensor:
    """mamba_ssm's selective_state_update (one decode step; state updated in place) ->
    out shaped like x. See the module docstring."""
    _bool("dt_softplus", dt_softplus)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    for name, t in (("B", B), ("C", C), ("z", z)):
        if t is not None:
            check_tensor(name, t, dtypes=FLOAT_DTYPES, device=x.device)
    if z is not None:
        check_shape("z", z, list(x.shape))
    out_dtype = x.dtype
    if z is not None or B.dtype != x.dtype or C.dtype != x.dtype:
        # fp32 through the op: the z gate (and mixed dtypes) before the one rounding
        x, B, C = x.float(), B.float(), C.float()
    like = (torch.float32, x.dtype)          # the op's dtypes for dt / A / D / dt_bias
    dt, A, D, dt_bias = (t if not isinstance(t, Tensor) or t.dtype in like else t.float()
                         for t in (dt, A, D, dt_bias))
    y = vllm_ops.selective_state_update(state, x, dt, A, B, C, D, None, dt_bias, dt_softplus,
                                        state_batch_indices, pad_slot_id=-1)
    if z is not None:
        y = y.float() * F.silu(z.float())
    return y.to(out_dtype)


def _scan_bc(name: str, t: Tensor, b: int, dim: int, n: int, l: int, dev: torch.device
             ) -> tuple[Tensor, bool]:
    """mamba_ssm's B / C -> (token-major [b * l, groups, n], time-invariant?): [dim, n]
    (time-invariant: one row per channel, i.e. dim groups, broadcast over the tokens by a
    stride-0 view), [b, n, l] (one group) or [b, groups, n, l]."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=(2, 3, 4), device=dev)
    if t.dim() == 2:
        check_shape(name, t, [dim, n])
        return t[None].expand(b * l, dim, n), True
    t4 = t.unsqueeze(1) if t.dim() == 3 else t
    check_shape(name, t4, [b, None, n, l])
    return t4.permute(0, 3, 1, 2).reshape(b * l, t4.shape[1], n), False


def _scan_sequences(cu_seqlens: Tensor | None, b: int, l: int, dev: torch.device
                    ) -> tuple[Tensor, Tensor]:
    """The op's sequences over the b * l flattened tokens: one per row, or, with
    cu_seqlens [k + 1] (0, ..., l: the boundaries where every row's scan restarts from
    zero), k per row. Returns (cu_seqlens of the flattened tokens, the index of each row's
    sequence holding its last token)."""
    if cu_seqlens is None:
        return torch.arange(b + 1, dtype=torch.int32, device=dev) * l, torch.arange(b,
                                                                                  device=dev)
    check_tensor("cu_seqlens", cu_seqlens, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
    k = cu_seqlens.shape[0] - 1
    if k < 1:
        raise ValueError(f"cu_seqlens must have k + 1 >= 2 entries, got shape "
                         f"{list(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if index_checks_active(cu) and (int(cu[0]) != 0 or int(cu[-1]) != l
                                    or bool((cu[1:] < cu[:-1]).any())):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to seqlen = {l}, got "
                         f"{cu_seqlens.tolist()}")
    rows = torch.arange(b, device=dev)[:, None]
    flat = torch.cat([(rows * l + cu[None, :-1]).reshape(-1),
                      torch.tensor([b * l], device=dev)]).to(torch.int32)
    nonempty = (cu[1:] > cu[:-1]).long() * torch.arange(k, device=dev)
    return flat, rows[:, 0] * k + nonempty.max()


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Tensor | None = None, z: Tensor | None = None,
                      delta_bias: Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, cu_seqlens: Tensor | None = None
                      ) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's selective_scan_fn (Mamba-1's scan over whole sequences, from zeros) on
    :func:`minikernels.ops.selective_scan` -> out, or (out, last_state) with
    return_last_state. See the module docstring."""
    _bool("delta_softplus", delta_softplus)
    _bool("return_last_state", return_last_state)
    check_tensor("u", u, dtypes=FLOAT_DTYPES, ndim=3)
    dev = u.device
    b, dim, l = u.shape
    check_tensor("delta", delta, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    check_shape("delta", delta, [b, dim, l])
    if isinstance(A, Tensor) and A.is_complex():
        raise NotImplementedError("A complex (S4D-Lin's complex Mamba) is not supported by "
                                  "minikernels: pass a real A [dim, dstate]")
    check_tensor("A", A, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    check_shape("A", A, [dim, None])
    n = A.shape[1]
    (bt, b_fixed), (ct, c_fixed) = (_scan_bc(name, t, b, dim, n, l, dev)
                                    for name, t in (("B", B), ("C", C)))
    if b_fixed != c_fixed:
        name = "B" if b_fixed else "C"
        raise NotImplementedError(
            f"{name} of shape [dim, dstate] (time-invariant) beside a time-varying "
            f"{'C' if b_fixed else 'B'} is not supported by minikernels (the op reads B and "
            f"C in the same groups); pass both time-invariant or both time-varying")
    if bt.shape[1] != ct.shape[1]:          # one group beside g groups: broadcast the one
        g = max(bt.shape[1], ct.shape[1])
        if min(bt.shape[1], ct.shape[1]) != 1:
            raise ValueError(f"C must have B's groups ({bt.shape[1]}), got shape "
                             f"{list(C.shape)}")
        bt, ct = (t.expand(t.shape[0], g, n) for t in (bt, ct))
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=1, device=dev)
            check_shape(name, t, [dim])
    if z is not None:
        check_tensor("z", z, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
        check_shape("z", z, [b, dim, l])
    cu, last = _scan_sequences(cu_seqlens, b, l, dev)
    # the op wants B / C / z in u's dtype: otherwise all in fp32 (exact), one rounding
    wide = any(t is not None and t.dtype != u.dtype for t in (bt, ct, z))
    dtype = torch.float32 if wide else u.dtype
    tokens = lambda t: t.transpose(1, 2).reshape(b * l, dim).to(dtype)   # noqa: E731
    like = (torch.float32, dtype)
    dt = delta.transpose(1, 2).reshape(b * l, dim)
    dt, A, D, delta_bias = (t if t is None or t.dtype in like else t.float()
                            for t in (dt, A, D, delta_bias))
    n_seq = cu.shape[0] - 1
    pool = slots = None
    if return_last_state:
        pool = torch.zeros(n_seq, dim, n, dtype=torch.float32, device=dev)
        slots = torch.arange(n_seq, device=dev)
    y = ops.selective_scan(tokens(u), dt, A, bt.to(dtype), ct.to(dtype), cu_seqlens=cu, D=D,
                           z=None if z is None else tokens(z), dt_bias=delta_bias,
                           dt_softplus=delta_softplus, state=pool, state_indices=slots,
                           max_seqlen=l if cu_seqlens is None else None)
    out = y.to(u.dtype).view(b, l, dim).transpose(1, 2)
    return (out, pool[last]) if return_last_state else out


def _runs(seq_idx: Tensor, b: int, l: int) -> tuple[Tensor, Tensor]:
    """seq_idx [b, l] -> (cu_seqlens of the flattened tokens, one sequence per run of equal
    ids in a row; the index of each row's last sequence)."""
    dev = seq_idx.device
    starts = torch.ones(b, l, dtype=torch.bool, device=dev)
    if l > 1:
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    flat = starts.reshape(-1)
    if index_checks_active(seq_idx):
        rows = torch.arange(b, device=dev).repeat_interleave(l)[flat]
        pairs = torch.stack([rows, seq_idx.reshape(-1)[flat].long()], 1)
        if torch.unique(pairs, dim=0).shape[0] != pairs.shape[0]:
            raise NotImplementedError(
                "seq_idx with an id that reappears after another id in the same row is not "
                "supported by minikernels (each sub-sequence must be one contiguous run)")
    bounds = flat.nonzero().flatten()
    cu = torch.cat([bounds, torch.tensor([b * l], device=dev)]).to(torch.int32)
    last = starts.sum(1).cumsum(0) - 1
    return cu, last


def mamba_chunk_scan_combined(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              chunk_size: int, D: Tensor | None = None,
                              z: Tensor | None = None, dt_bias: Tensor | None = None,
                              initial_states: Tensor | None = None,
                              seq_idx: Tensor | None = None, cu_seqlens: Tensor | None = None,
                              dt_softplus: bool = False,
                              dt_limit: tuple[float, float] = (0.0, math.inf),
                              return_final_states: bool = False,
                              return_varlen_states: bool = False
                              ) -> Tensor | tuple[Tensor, ...]:
    """mamba_ssm's mamba_chunk_scan_combined (the Mamba-2 scan over whole sequences) -> out,
    (out, final_states), (out, varlen_states) or (out, final_states, varlen_states). See
    the module docstring."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, value in (("dt_softplus", dt_softplus),
                        ("return_final_states", return_final_states),
                        ("return_varlen_states", return_varlen_states)):
        _bool(name, value)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=4)
    dev = x.device
    b, l, h, p = x.shape
    check_tensor("dt", dt, dtypes=FLOAT_DTYPES, ndim=3, device=dev)
    check_shape("dt", dt, [b, l, h])
    check_tensor("A", A, dtypes=FLOAT_DTYPES, ndim=1, device=dev)
    check_shape("A", A, [h])
    check_tensor("B", B, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    check_shape("B", B, [b, l, None, None])
    g, n = B.shape[2], B.shape[3]
    check_tensor("C", C, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    check_shape("C", C, list(B.shape))
    if z is not None:
        check_tensor("z", z, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
        check_shape("z", z, list(x.shape))
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, dtypes=FLOAT_DTYPES, ndim=1, device=dev)
        check_shape("dt_bias", dt_bias, [h])
    if D is not None:
        check_tensor("D", D, dtypes=FLOAT_DTYPES, ndim=(1, 2), device=dev)
        if D.dim() == 2:
            check_shape("D", D, [h, p])
            D = _one_per_head("D", D, 1, "head_dim")
        check_shape("D", D, [h])
    # fp32 through the op when z gates the output or B / C are not x's dtype (the op wants
    # them alike): exact widening, one rounding at the end
    wide = z is not None or B.dtype != x.dtype or C.dtype != x.dtype
    xw, Bw, Cw = (t.float() for t in (x, B, C)) if wide else (x, B, C)
    like = (torch.float32, xw.dtype)
    dt, A, D, dt_bias = (t if t is None or t.dtype in like else t.float()
                         for t in (dt, A, D, dt_bias))

    # the sequences: one per batch row, or one per run of seq_idx
    last = torch.arange(b, device=dev)
    if seq_idx is None:
        cu = torch.arange(b + 1, dtype=torch.int32, device=dev) * l
    else:
        if initial_states is not None:
            raise NotImplementedError(
                "initial_states together with seq_idx is not supported by minikernels "
                "(mamba_ssm applies it to the first sub-sequence only); pass one of them")
        check_tensor("seq_idx", seq_idx, dtypes=_INDEX_DTYPES, ndim=2, device=dev)
        check_shape("seq_idx", seq_idx, [b, l])
        cu, last = _runs(seq_idx, b, l)
    if return_varlen_states:
        if cu_seqlens is None:
            raise ValueError("return_varlen_states=True needs cu_seqlens (the sequences "
                             "whose final states to return)")
        check_tensor("cu_seqlens", cu_seqlens, dtypes=_INDEX_DTYPES, ndim=1, device=dev)
        if b != 1:
            raise ValueError(f"x must have batch size 1 with return_varlen_states (the "
                             f"sequences flattened into l), got shape {list(x.shape)}")
        if seq_idx is None and cu_seqlens.shape[0] > 2:
            raise NotImplementedError(
                "cu_seqlens of several sequences without seq_idx is not supported by "
                "minikernels (mamba_ssm's scan then runs across the sequence boundaries); "
                "pass seq_idx marking the same sequences")
        if index_checks_active(cu_seqlens) and (
                cu_seqlens.shape != cu.shape or bool((cu_seqlens.to(cu.dtype) != cu).any())):
            raise ValueError(f"cu_seqlens ({cu_seqlens.tolist()}) must mark the sequences "
                             f"seq_idx marks ({cu.tolist()})")
    n_seq = cu.shape[0] - 1
    pool = slots = None
    if initial_states is not None:
        check_tensor("initial_states", initial_states, dtypes=FLOAT_DTYPES, ndim=4,
                     device=dev)
        check_shape("initial_states", initial_states, [b, h, p, n])
        pool = initial_states.to(torch.float32, copy=True)   # mamba_ssm never writes it
    elif return_final_states or return_varlen_states:
        pool = torch.zeros(n_seq, h, p, n, dtype=torch.float32, device=dev)
    if pool is not None:
        slots = torch.arange(n_seq, device=dev)
    y = ops.mamba2_scan(xw.reshape(b * l, h, p), dt.reshape(b * l, h), A,
                        Bw.reshape(b * l, g, n), Cw.reshape(b * l, g, n), cu_seqlens=cu,
                        D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                        state=pool, state_indices=slots,
                        max_seqlen=l if seq_idx is None else None)
    y = y.view(b, l, h, p)
    if z is not None:
        y = y.float() * F.silu(z.float())
    out = y.to(x.dtype)
    result: tuple[Tensor, ...] = (out,)
    if return_final_states:
        result += (pool[last],)
    if return_varlen_states:
        result += (pool.to(C.dtype),)
    return result[0] if len(result) == 1 else result
