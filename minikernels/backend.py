"""Backend selection: which implementation of an op runs.

Backends:
    ``reference``  plain PyTorch, fp32 math (minikernels.ops.reference): the spec and the CPU path.
    ``triton``     Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
    ``cuda``       hand-written CUDA C++ in the compiled extension ``minikernels._C``.
    ``auto``       per device and shape: CPU -> reference; CUDA -> Triton, or the op's own
                   policy (e.g. int4 decode M<=16 -> cuda) once a GPU run has validated
                   that op's CUDA kernel (``CUDA_VALIDATED``).

Override with ``minikernels.use_backend(name)`` (a context manager, thread-local) or the
``MINIKERNELS_BACKEND`` environment variable. Asking for ``cuda`` where the extension is
missing, or where an op has no CUDA kernel, falls back to Triton with one log line.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

logger = logging.getLogger("minikernels")

BACKENDS = ("auto", "reference", "triton", "cuda")
_local = threading.local()
_logged: set[str] = set()
_cuda_ext: ModuleType | None | bool = False  # False = not looked up yet

# Ops whose CUDA C++ kernel a GPU run has checked against the reference (its results
# committed under bench/results/<gpu>/, the run named in bench/NOTES.md). ``auto`` follows
# an op's prefer-CUDA policy only for these; every other CUDA kernel is opt-in
# (``use_backend("cuda")``) and ``auto`` keeps the Triton kernels, which are compiled ahead
# of time for sm_80 / sm_90a and proven under the interpreter. No GPU run yet: empty.
CUDA_VALIDATED: frozenset[str] = frozenset()


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def current_backend() -> str:
    """The requested backend: innermost ``use_backend`` or MINIKERNELS_BACKEND, else 'auto'."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("MINIKERNELS_BACKEND", "").strip().lower()
    return _check_name(env, "MINIKERNELS_BACKEND") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (auto|reference|triton|cuda)."""
    _check_name(name, "use_backend(name)")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def cuda_extension() -> ModuleType | None:
    """The compiled extension ``minikernels._C``, or None (logged once) when absent."""
    global _cuda_ext
    if _cuda_ext is False:
        try:
            _cuda_ext = importlib.import_module("minikernels._C")
        except ImportError as exc:
            _cuda_ext = None
            logger.info("minikernels: CUDA extension not available (%s)", exc)
    return _cuda_ext  # type: ignore[return-value]


def resolve(op: str, device: torch.device, *, cuda_ok: bool | Callable[[], bool] = False,
            prefer_cuda: bool | Callable[[], bool] = False) -> str:
    """Pick the backend that runs ``op`` on ``device`` now.

    cuda_ok:     this call can run on the op's CUDA kernel (shape/dtype supported).
    prefer_cuda: 'auto' should pick that CUDA kernel over Triton for this call (honoured
                 only for ops in ``CUDA_VALIDATED``).
    Returns one of 'reference', 'triton', 'cuda'.
    """
    want = current_backend()
    if want == "reference":
        return "reference"
    if device.type != "cuda":
        if want == "auto":
            return "reference"
        if want == "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors, got device {device}")
        if not interpreter_enabled():
            raise RuntimeError(f"{op}: backend 'triton' on {device} tensors needs the Triton "
                               "interpreter (set TRITON_INTERPRET=1 before importing triton)")
        return "triton"
    if not triton_available():
        _log_once("no-triton", "minikernels: triton is not installed; using reference ops")
        return "reference"
    if want == "triton" or (want == "auto" and op not in CUDA_VALIDATED):
        return "triton"
    ok = cuda_ok() if callable(cuda_ok) else cuda_ok
    if want == "auto" and not ok:
        return "triton"
    if want == "cuda" and not ok:
        _log_once(f"cuda-unsupported:{op}",
                  f"minikernels: {op} has no CUDA kernel for this input; using Triton")
        return "triton"
    if cuda_extension() is None:
        if want == "cuda":
            _log_once("no-ext", "minikernels: compiled extension minikernels._C is missing; "
                      "falling back to Triton")
        return "triton"
    if want == "cuda":
        return "cuda"
    prefer = prefer_cuda() if callable(prefer_cuda) else prefer_cuda
    return "cuda" if prefer else "triton"
