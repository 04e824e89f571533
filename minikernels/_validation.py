"""Input checks run once at each op boundary. Errors name the argument and what was expected.

Kernels assume their inputs passed these checks.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor with an allowed dtype, rank and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got "
                        f"{str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must be {want}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Check ``t.shape`` against ``expected`` (None = any size in that dim)."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].dtype
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != first:
            raise TypeError(f"{n} must have the same dtype as {names[0]} ({first}), got {t.dtype}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides "
                         f"{tuple(t.stride())}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A read-only input whose last dim is strided -> a compact copy (kernels read rows with
    unit stride); any other view passes through with its own strides."""
    if t.numel() > 0 and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides "
                         f"{tuple(t.stride())}")


def check_positive_float(name: str, value: float, allow_zero: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def check_finite_float(name: str, value: float) -> float:
    """A real number (not bool, NaN or infinite) as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


_index_checks = True
_local = threading.local()


def set_index_checks(enabled: bool) -> None:
    """Turn the data-dependent index checks (block ids, positions, slots) on or off globally.

    They read values back from the device (a sync). Prefer the thread-local
    :func:`index_checks` context manager for a scoped change (what the engine uses around
    its forward after validating its metadata on the host). Checks are skipped
    automatically during CUDA-graph capture and torch.compile tracing.
    """
    global _index_checks
    _index_checks = bool(enabled)


@contextlib.contextmanager
def index_checks(enabled: bool) -> Iterator[None]:
    """Turn index checks on or off inside the block, for this thread only."""
    prev = getattr(_local, "override", None)
    _local.override = bool(enabled)
    try:
        yield
    finally:
        _local.override = prev


def index_checks_enabled() -> bool:
    override = getattr(_local, "override", None)
    return _index_checks if override is None else override


def index_checks_active(t: torch.Tensor) -> bool:
    if not index_checks_enabled() or t.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_index_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Check low <= t < high elementwise (when index checks are active)."""
    if not index_checks_active(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} values must be in [{low}, {high}), got min {lo} and max {hi}")
