"""Argument checks shared by the ops over varlen sequences with a per-sequence state pool
(``causal_conv1d``, ``gated_delta_rule``, ``mamba2_scan``): ``cu_seqlens`` int32 / int64
[N + 1], the pool's ``state_indices`` [N] (-1 = padding row) and ``has_initial_state``
bool [N], and the host-side ``max_seqlen``. Data-dependent checks (values, not shapes)
run only when the op-level index checks are active (not under graph capture / compile,
not on meta tensors), as for every op (``minikernels._validation``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_tensor, index_checks_active

INDEX_DTYPES = (torch.int32, torch.int64)


def readable(t: Tensor) -> bool:
    """Whether the data-dependent checks run on ``t`` (index checks on, real values)."""
    return t.device.type != "meta" and index_checks_active(t)


def check_cu_seqlens(cu: object, total: int, device: torch.device,
                     tokens: str = "T") -> Tensor:
    """``cu_seqlens`` [N + 1], 0 first, non-decreasing, ``total`` last (contiguous)."""
    cu = check_tensor("cu_seqlens", cu, dtypes=INDEX_DTYPES, ndim=1, device=device)
    if cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have N + 1 >= 1 entries, got shape "
                         f"{list(cu.shape)}")
    cu = cu.contiguous()
    if readable(cu):
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu[0])}")
        if cu.shape[0] > 1 and bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if int(cu[-1]) != total:
            raise ValueError(f"cu_seqlens[-1] ({int(cu[-1])}) must equal the number of tokens "
                             f"({tokens} = {total})")
    return cu


def refuse_slots_without_pool(pool_name: str, state_indices: Tensor | None,
                              has_initial_state: Tensor | None) -> None:
    """Without a pool every sequence starts from zeros: slot arguments are an error."""
    for name, t in (("state_indices", state_indices), ("has_initial_state", has_initial_state)):
        if t is not None:
            raise ValueError(f"{name} needs {pool_name} (without a state pool every sequence "
                             f"starts from zeros; got {pool_name}=None)")


def check_pool(pool_name: str, pool: Tensor, dims: dict[str, int],
               dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    """A state pool [S, *dims] (any strides) of one of ``dtypes`` on ``device``; ``dims``
    names each trailing dim for the error (e.g. {"Hv": 16, "dk": 128, "dv": 128})."""
    check_tensor(pool_name, pool, dtypes=dtypes, ndim=1 + len(dims), device=device)
    if tuple(pool.shape[1:]) != tuple(dims.values()):
        want = ", ".join(f"{k} = {v}" for k, v in dims.items())
        raise ValueError(f"{pool_name} must have shape [S, {want}], got {list(pool.shape)}")


def check_slots(pool_name: str, pool: Tensor, state_indices: Tensor | None,
                has_initial_state: Tensor | None, n: int, device: torch.device
                ) -> tuple[Tensor, Tensor | None]:
    """``state_indices`` int32 / int64 [N] (values -1 or in [0, S), the non-padding ones
    distinct) and ``has_initial_state`` bool [N] or None, for a pool of S = pool.shape[0]
    slots; returns them contiguous."""
    if state_indices is None:
        raise ValueError(f"state_indices is required with {pool_name} (each sequence's slot; "
                         f"-1 = padding row)")
    check_tensor("state_indices", state_indices, dtypes=INDEX_DTYPES, ndim=1, device=device)
    if state_indices.shape[0] != n:
        raise ValueError(f"state_indices must have shape [N = {n}] (one entry per sequence "
                         f"of cu_seqlens), got {list(state_indices.shape)}")
    state_indices = state_indices.contiguous()
    check_slot_values(state_indices, pool.shape[0], pool_name)
    if has_initial_state is not None:
        check_tensor("has_initial_state", has_initial_state, dtypes=(torch.bool,), ndim=1,
                     device=device)
        if has_initial_state.shape[0] != n:
            raise ValueError(f"has_initial_state must have shape [N = {n}] (one entry per "
                             f"sequence of cu_seqlens), got {list(has_initial_state.shape)}")
        has_initial_state = has_initial_state.contiguous()
    return state_indices, has_initial_state


def check_optional_pool(pool_name: str, pool: Tensor | None, dims: dict[str, int],
                        dtypes: tuple[torch.dtype, ...], state_indices: Tensor | None,
                        has_initial_state: Tensor | None, n: int, device: torch.device
                        ) -> tuple[Tensor | None, Tensor | None]:
    """An op's optional state pool (op argument ``pool_name``) with its slot arguments,
    for N = ``n`` sequences: None refuses ``state_indices`` / ``has_initial_state``
    (:func:`refuse_slots_without_pool`); a pool is checked as [S, *dims] in one of
    ``dtypes`` (:func:`check_pool`) and its slots as :func:`check_slots` does. Returns
    (state_indices, has_initial_state), contiguous with a pool."""
    if pool is None:
        refuse_slots_without_pool(pool_name, state_indices, has_initial_state)
        return state_indices, has_initial_state
    check_pool(pool_name, pool, dims, dtypes, device)
    return check_slots(pool_name, pool, state_indices, has_initial_state, n, device)


def check_slot_values(state_indices: Tensor, slots: int, pool_name: str = "state") -> None:
    """Values -1 (padding) or in [0, slots), the non-padding ones distinct (when the
    index checks are active)."""
    if not state_indices.numel() or not readable(state_indices):
        return
    lo, hi = int(state_indices.min()), int(state_indices.max())
    if lo < -1 or hi >= slots:
        raise ValueError(f"state_indices values must be -1 (padding) or in [0, {slots}), "
                         f"got min {lo} and max {hi}")
    used = state_indices[state_indices >= 0]
    if torch.unique(used).numel() != used.numel():
        raise ValueError(f"state_indices must be distinct (apart from -1 padding rows): two "
                         f"sequences would share a {pool_name} slot")


def resolve_max_seqlen(max_seqlen: object, cu_seqlens: Tensor, n: int, unknown: int) -> int:
    """The launch's longest sequence: ``max_seqlen`` checked (an int >= 0, not below a
    sequence's length when the values are readable), or read from ``cu_seqlens`` (a
    device sync) when None and readable, else ``unknown`` (the op's own fallback)."""
    longest = None
    if readable(cu_seqlens):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if n > 0 else 0
    if max_seqlen is None:
        return unknown if longest is None else longest
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if longest is not None and longest > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is below a sequence length ({longest})")
    return max_seqlen
