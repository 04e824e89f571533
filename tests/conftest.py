"""Shared test setup.

- Without a CUDA device, Triton kernels run on CPU tensors under the Triton interpreter
  (TRITON_INTERPRET=1 is set here, before anything imports triton).
- ``device`` is "cuda" when a GPU is present, else "cpu": the same tests run on both.
- Kernel outputs are poisoned (NaN-filled) before kernels write them.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _patch_old_interpreter_index() -> None:
    """Triton 3.6's interpreter converts a scalar to int with int(1-element array), which
    numpy 2 refuses ("only 0-dimensional arrays can be converted"), so range() bounds loaded
    from memory fail. Interpreter only (compiled code is unaffected). This applies 3.9's
    version (squeeze first) to older tritons, so the GPU image's triton 3.6 runs the kernel
    tests on CPU (bench/NOTES.md)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import triton
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9):
        return
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_patch_old_interpreter_index()

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=12, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
settings.register_profile(
    "ci", deadline=None, max_examples=10, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
# A bug hunt (HYPOTHESIS_PROFILE=hunt pytest tests/test_x.py): many more random cases
settings.register_profile(
    "hunt", deadline=None, max_examples=300, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") else
                      os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel tests run: the GPU when present, else the CPU (Triton interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs_and_check_state():
    """Poison kernel outputs; fail a test that leaves index checks globally disabled."""
    from minikernels import _validation
    from minikernels.ops import _alloc

    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)
    leaked = not _validation._index_checks
    _validation.set_index_checks(True)
    assert not leaked, "test left minikernels index checks disabled (use index_checks())"


# ---------------------------------------------------------------- AOT compile, overlapped
# tests/test_aot_compile.py compiles every Triton kernel family for sm_80 / sm_90a: a
# pairwise covering subset of the registered configurations by default (~810 compiles of
# ~1950, aot.covering_subset), every configuration with MK_AOT_ALL=1. Most other tests
# keep one core busy, so the compile runs in a background process from the end of
# collection on, at a lower priority, and the AOT tests are moved to the end of the run,
# where they read its results (their fixture waits for it).
AOT_ALL = os.environ.get("MK_AOT_ALL", "0") not in ("", "0")
AOT_TEST_FILE = "test_aot_compile.py"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list) -> None:
    aot = [it for it in items if it.fspath.basename == AOT_TEST_FILE]
    if not aot or os.environ.get("MK_AOT_INLINE"):
        return
    items[:] = [it for it in items if it.fspath.basename != AOT_TEST_FILE] + aot
    if any("aot_results" in getattr(it, "fixturenames", ()) for it in aot):
        config._mk_aot = start_aot_compile()


def pytest_unconfigure(config: pytest.Config) -> None:
    """A run that ended early leaves no compile behind."""
    started = getattr(config, "_mk_aot", None)
    if started is not None and started[0].poll() is None:
        started[0].kill()


def start_aot_compile() -> tuple:
    """Start ``python -m minikernels.ops.triton.aot --json OUT [--covering]`` in the
    background (niced, TRITON_INTERPRET unset) -> (process, output path, log path)."""
    import subprocess
    import tempfile

    out_dir = tempfile.mkdtemp(prefix="mk-aot-")
    out, log = os.path.join(out_dir, "aot.json"), os.path.join(out_dir, "aot.log")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "minikernels.ops.triton.aot", "--json", out]
    if not AOT_ALL:
        cmd.append("--covering")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice")
                                else None)
    return proc, out, log


def kernel_backends() -> list:
    """Backends to test kernels on: triton always (interpreter on CPU); cuda on a GPU."""
    return ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="CUDA C++ kernels run only on a GPU"))]


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
