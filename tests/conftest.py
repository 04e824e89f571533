"""Shared test setup.

- Without a CUDA device, Triton kernels run on CPU tensors under the Triton interpreter
  (TRITON_INTERPRET=1 is set here, before anything imports triton).
- ``device`` is "cuda" when a GPU is present, else "cpu": the same tests run on both.
- Kernel outputs are poisoned (NaN-filled) before kernels write them.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Tensor-parallel workers (the library's launches and tests' spawn_ranks) fork from one
# forkserver that imported torch and minikernels once, instead of importing them afresh
# in each spawned process (~4 s a worker here); the default, spawn, is tested explicitly.
# CPU only: on a GPU machine the workers keep spawn (a process that may have touched the
# CUDA driver is not forked from).
if not HAS_CUDA:
    os.environ.setdefault("MK_WORKER_MULTIPROC_METHOD", "forkserver")


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


def _speed_up_interpreter() -> None:
    """Remove three costs of the Triton interpreter that do no work; results are unchanged.

    Measured with cProfile on this suite's kernel tests (test_moe_lora_op,
    test_flash_attention, test_paged_decode), they were roughly half the interpreter's
    time. Interpreter only: compiled kernels never reach this code, and each patch is
    skipped when the triton at hand lacks what it replaces."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_mk_sped_up", False):
        return
    interpreter._mk_sped_up = True
    _patch_language_once_per_launch(interpreter)
    _cache_numpy_dtypes(interpreter)
    _skip_dead_overflow_sanitizer(interpreter)


def _patch_language_once_per_launch(interpreter) -> None:
    """A launch remaps triton.language's builtins to numpy versions (and restores them
    after), but every call of a @triton.jit helper inside the kernel runs the remapping
    again: ``inspect.getmembers`` over tl, tl.tensor and tl.math, finding nothing left to
    patch, once per helper call per program instance (~20-25% of test_moe_lora_op's
    interpreter time). Here a helper call inside a launch that already patched the
    helper's language modules is skipped; every other call runs upstream's code."""
    import inspect
    import threading

    import triton.language as tl

    upstream = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if upstream is None or scope_type is None or executor is None:
        return
    local = threading.local()  # .launches: per launch in progress in this thread, the
    # language modules it has patched (per thread, so overlapping launches in two threads
    # behave as upstream's do)
    modules_of: dict = {}  # jit function -> the language modules its globals hold

    def lang_modules(fn) -> frozenset:
        found = modules_of.get(fn)
        if found is None:
            found = modules_of[fn] = frozenset(
                id(v) for v in fn.__globals__.values()
                if inspect.ismodule(v) and (v is tl or v is tl.core))
        return found

    def patch_lang(fn):
        langs = lang_modules(fn)
        launches = getattr(local, "launches", None)
        if launches and langs <= launches[-1]:
            return scope_type()  # this launch patched them already: nothing to record
        scope = upstream(fn)
        if launches:
            launches[-1] = launches[-1] | langs
        return scope

    launch = executor.__call__

    def launch_and_track(self, *args, **kwargs):
        launches = getattr(local, "launches", None)
        if launches is None:
            launches = local.launches = []
        launches.append(frozenset())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_lang
    executor.__call__ = launch_and_track


def _cache_numpy_dtypes(interpreter) -> None:
    """``_get_np_dtype`` rebuilds its dtype table on every call (~6% of the interpreter's
    time); the same answers from a table built once."""
    import numpy as np
    import triton.language as tl

    upstream = getattr(interpreter, "_get_np_dtype", None)
    if upstream is None:
        return
    table = {}
    for name in ("int1", "float16", "float32", "float64", "int8", "uint8", "int16", "uint16",
                 "int32", "uint32", "int64", "uint64", "bfloat16", "float8e5", "float8e5b16",
                 "float8e4nv", "float8e4b8", "float8e4b15"):
        if hasattr(tl, name):
            table[getattr(tl, name)] = upstream(getattr(tl, name))
    pointer_type, block_type, uint64 = tl.pointer_type, tl.block_type, np.dtype(np.uint64)

    def np_dtype(tt_dtype):
        if isinstance(tt_dtype, block_type):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, pointer_type):
            return uint64
        found = table.get(tt_dtype)
        return found if found is not None else upstream(tt_dtype)

    interpreter._get_np_dtype = np_dtype


def _skip_dead_overflow_sanitizer(interpreter) -> None:
    """Every int32 add / sub / mul also runs the overflow sanitizer: both operands cast to
    int64, the op redone, two compares, and then ``device_assert``, which returns at once
    unless the options ask for debug (the interpreter's never do), so its result is never
    looked at (~30% of the interpreter's time on the attention tests). Skipped unless the
    options ask for debug, when upstream's check runs."""
    semantic = getattr(interpreter, "interpreter_semantic", None)
    sanitize = getattr(semantic, "binary_op_sanitize_overflow_impl", None)
    if sanitize is None:
        return

    def sanitize_overflow(lhs, rhs, binary_op):
        if semantic.builder.options.debug:
            sanitize(lhs, rhs, binary_op)

    semantic.binary_op_sanitize_overflow_impl = sanitize_overflow


_speed_up_interpreter()


def _dot_out_dtype_as_in_triton_3_6() -> None:
    """Kernels are held to triton 3.6's ``tl.dot`` (the H200 image's triton): there
    ``out_dtype`` defaults to fp32 and an accumulator of another type (int32 for int8
    inputs, fp16) must be named by ``out_dtype``, or the kernel fails to compile; 3.9
    takes the accumulator's type. Under the interpreter the tests call a ``tl.dot``
    with 3.6's default, so a kernel leaning on 3.9's leniency fails here, not on the
    GPU. Interpreter only (compiled code, and the AOT compile, use triton's own)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import functools
    import inspect

    import triton.language as tl
    from triton.language import core

    dot = core.dot
    if getattr(dot, "_mk_fp32_default", False) or \
            inspect.signature(dot).parameters["out_dtype"].default is not None:
        return                                   # patched, or already 3.6's default

    @functools.wraps(dot)
    def dot_fp32_default(input, other, acc=None, input_precision=None, allow_tf32=None,
                         max_num_imprecise_acc=None, out_dtype=None, _semantic=None):
        if out_dtype is None:
            out_dtype = core.float32
        return dot(input, other, acc, input_precision, allow_tf32, max_num_imprecise_acc,
                   out_dtype, _semantic=_semantic)

    dot_fp32_default._mk_fp32_default = True
    core.dot = tl.dot = dot_fp32_default


_dot_out_dtype_as_in_triton_3_6()

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
# tests/test_aot_compile.py compiles every Triton kernel family for sm_80 / sm_90a. Which
# of the registered configurations (MK_AOT): "values" (default: every configuration value
# compiled at least once, ~390 builds, aot.covering_subset strength 1), "pairs" (every
# pair of values, ~850) or "all" (~2080; also MK_AOT_ALL=1). The compile runs once, in a
# background process (niced) started when collection ends, so it overlaps the other
# tests; the AOT tests are moved to the end of the run, where they read its results
# (their fixture waits for it). Under pytest-xdist (-n N) the controller starts it, once,
# when the first worker has collected, and every worker reads the same result files.
AOT_SUBSET = os.environ.get("MK_AOT") or (
    "all" if os.environ.get("MK_AOT_ALL", "0") not in ("", "0") else "values")
if AOT_SUBSET not in ("values", "pairs", "all"):
    raise pytest.UsageError(f"MK_AOT must be values, pairs or all, got {AOT_SUBSET!r}")
AOT_TEST_FILE = "test_aot_compile.py"
AOT_COMPILE_TEST = AOT_TEST_FILE + "::test_compiles_without_spills"


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _is_xdist_worker(config):
        # Two workers share two cores: one intra-op thread each keeps them off each other.
        torch.set_num_threads(1)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list) -> None:
    aot = [it for it in items if it.fspath.basename == AOT_TEST_FILE]
    if not aot:
        return
    items[:] = [it for it in items if it.fspath.basename != AOT_TEST_FILE] + aot
    if os.environ.get("MK_AOT_INLINE") or _is_xdist_worker(config):
        return
    if any("aot_results" in getattr(it, "fixturenames", ()) for it in aot):
        config._mk_aot_dir = tempfile.mkdtemp(prefix="mk-aot-")
        config._mk_aot = start_aot_compile(config._mk_aot_dir)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller: every worker learns where the one AOT compile writes."""
    config = node.config
    if not hasattr(config, "_mk_aot_dir"):
        config._mk_aot_dir = tempfile.mkdtemp(prefix="mk-aot-")
    node.workerinput["mk_aot_dir"] = config._mk_aot_dir


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list) -> None:
    """xdist controller: start the compile once a worker has collected the AOT tests."""
    config = node.config
    if getattr(config, "_mk_aot", None) is None and not os.environ.get("MK_AOT_INLINE") \
            and any(AOT_COMPILE_TEST in i for i in ids):
        config._mk_aot = start_aot_compile(config._mk_aot_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A run that ended early leaves no compile behind; the result files go too."""
    started = getattr(config, "_mk_aot", None)
    if started is not None and started.poll() is None:
        os.killpg(started.pid, signal.SIGKILL)
    out_dir = getattr(config, "_mk_aot_dir", None)
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)


def aot_paths(out_dir: str) -> tuple[str, str, str]:
    """(results JSON, log, exit-status file) of the AOT compile writing into out_dir."""
    return tuple(os.path.join(out_dir, n) for n in ("aot.json", "aot.log", "aot.rc"))


def start_aot_compile(out_dir: str) -> subprocess.Popen:
    """Start ``python -m minikernels.ops.triton.aot --json OUT [--covering N]`` in the
    background (niced, TRITON_INTERPRET unset, its own process group); when it ends, its
    exit status is written to the ``aot.rc`` file (aot_paths), which readers wait for."""
    out, log, rc = aot_paths(out_dir)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "minikernels.ops.triton.aot", "--json", out]
    if AOT_SUBSET != "all":
        cmd += ["--covering", "1" if AOT_SUBSET == "values" else "2"]
    script = '"$@" > "$MK_AOT_LOG" 2>&1; echo $? > "$MK_AOT_RC.tmp"; mv "$MK_AOT_RC.tmp" "$MK_AOT_RC"'
    env.update(MK_AOT_LOG=log, MK_AOT_RC=rc)
    return subprocess.Popen(["sh", "-c", script, "sh", *cmd], env=env, start_new_session=True,
                            preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None)


def wait_for_aot_compile(config: pytest.Config, timeout_s: float = 1800) -> str:
    """Wait for the background AOT compile (starting it here when nothing did: a run of
    the AOT tests alone with MK_AOT_INLINE=1) -> the results JSON's path. Fails the
    calling test when the compile failed or ran past timeout_s."""
    if _is_xdist_worker(config) and not os.environ.get("MK_AOT_INLINE"):
        out_dir = config.workerinput["mk_aot_dir"]
    else:
        if getattr(config, "_mk_aot", None) is None:
            config._mk_aot_dir = tempfile.mkdtemp(prefix="mk-aot-")
            config._mk_aot = start_aot_compile(config._mk_aot_dir)
        out_dir = config._mk_aot_dir
    out, log, rc = aot_paths(out_dir)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(rc):
        if time.monotonic() > deadline:
            pytest.fail(f"AOT compile run did not finish in {timeout_s:.0f} s")
        time.sleep(1.0)
    if not os.path.exists(out):
        with open(log) as f:
            pytest.fail(f"AOT compile run failed:\n{f.read()[-6000:]}")
    return out


def kernel_backends() -> list:
    """Backends to test kernels on: triton always (interpreter on CPU); cuda on a GPU."""
    return ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="CUDA C++ kernels run only on a GPU"))]


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
