"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a without register spills; those
objects and csrc/bindings.cpp link into a real ``minikernels._C`` against this CPU build of
torch and the CUDA runtime; and the Python ops, routed to that extension, call it with
arguments its bindings accept and its launchers take (see "bindings contract" below)."""
from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def cuda_include_dir() -> str | None:
    if NVCC is None:
        return None
    out = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null"], capture_output=True,
                         text=True).stderr
    m = re.search(r"-I\"?([^\s\"]+/include)\"?", out)
    if m and os.path.exists(os.path.join(m.group(1), "cuda_runtime.h")):
        return m.group(1)
    for cand in ("/usr/local/cuda/include", "/usr/local/cuda-13.0/include"):
        if os.path.exists(os.path.join(cand, "cuda_runtime.h")):
            return cand
    return None


def object_path(cu: str) -> str:
    """Where a .cu's object goes (one folder per process, shared by the tests here)."""
    return os.path.join(OBJ_DIR, os.path.basename(cu)[:-3] + ".o")


OBJ_DIR = tempfile.mkdtemp(prefix="minikernels_nvcc_")
atexit.register(shutil.rmtree, OBJ_DIR, True)
_EXTENSION: dict[str, object] = {}


def build_extension() -> object:
    """Build ``_C`` as setup.py would (csrc/*.cu + bindings.cpp) with this torch and load it
    -> the module, or a reason to skip (str). Objects the compile tests above made are
    reused; missing ones compile here as sm_90a PTX only (no ptxas: the host launchers are
    what the bindings tests run). Built once per process."""
    if "ext" in _EXTENSION:
        return _EXTENSION["ext"]
    _EXTENSION["ext"] = ext = _build_extension()
    return ext


def _build_extension() -> object:
    import importlib.machinery
    import importlib.util

    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    gxx, inc = shutil.which("g++"), cuda_include_dir()
    if NVCC is None or gxx is None or inc is None:
        return "nvcc, g++ or the CUDA runtime headers are missing"
    cudart_dir = next((d for d in (os.path.join(os.path.dirname(inc), sub)
                                   for sub in ("lib64", "lib", os.path.join("targets",
                                               "x86_64-linux", "lib")))
                       if os.path.exists(os.path.join(d, "libcudart.so"))), None)
    if cudart_dir is None:
        return "libcudart.so is missing"
    objects = []
    for cu in CU_FILES:
        obj = object_path(cu)
        if not os.path.exists(obj):
            res = subprocess.run([NVCC, "-c", "-std=c++20", "-I", CSRC, "-Xcompiler", "-fPIC",
                                  "-gencode=arch=compute_90a,code=compute_90a", cu, "-o", obj],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-4000:]
        objects.append(obj)
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [gxx, "-std=c++20", "-O0", "-fPIC", "-w", "-DTORCH_EXTENSION_NAME=_C",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", CSRC, "-I", inc,
           "-I", sysconfig.get_paths()["include"]]
    for p in include_paths():
        cmd += ["-I", p]
    bindings = os.path.join(OBJ_DIR, "bindings.o")
    res = subprocess.run(cmd + ["-c", os.path.join(CSRC, "bindings.cpp"), "-o", bindings],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    so = os.path.join(OBJ_DIR, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    link = [gxx, "-shared", "-o", so, bindings, *objects]
    for d in library_paths():
        link += ["-L", d, f"-Wl,-rpath,{d}"]
    link += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-L", cudart_dir,
             f"-Wl,-rpath,{cudart_dir}", "-lcudart"]
    res = subprocess.run(link, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    loader = importlib.machinery.ExtensionFileLoader("_C", so)
    spec = importlib.util.spec_from_file_location("_C", so, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_kernel_files_include_no_torch():
    for path in CU_FILES + glob.glob(os.path.join(CSRC, "*.h")):
        text = open(path).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), \
            f"{os.path.basename(path)} includes torch headers; only bindings.cpp may"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90a(cu: str):
    # --threads: the two -gencode targets compile in parallel (this machine has 2 cores).
    # Position-independent, into the shared object folder: the extension links these.
    cmd = [NVCC, "-c", "-std=c++20", "-O3", "--threads", "2", "-I", CSRC,
           "-Xcompiler", "-fPIC",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", cu, "-o", object_path(cu)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    spills = [ln for ln in res.stderr.splitlines()
              if re.search(r"[1-9]\d* bytes spill (stores|loads)", ln)]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_bindings_compile_and_link_into_an_importable_extension():
    """bindings.cpp compiles against this torch's headers, links with the kernels' objects,
    torch's libraries and the CUDA runtime, and the module loads on a machine with no GPU
    and exports every function the Python ops call."""
    ext = build_extension()
    if isinstance(ext, str):
        pytest.skip(ext)
    names = {n for n in dir(ext) if not n.startswith("_")}
    assert {"rms_norm", "int4_gemv", "write_kv_cache", "paged_decode_attention"} <= names


# ------------------------------------------------------------------ bindings contract
# The Python ops call minikernels._C with CPU tensors here, routed to "cuda": the real
# extension converts every argument (a wrong count, type or order is pybind's TypeError),
# reads data pointers (a wrong dtype is a c10 error), and its launcher checks the shapes
# and alignment it supports before launching; only the launch itself fails, with "CUDA
# driver version is insufficient" (no GPU here). A launcher refusing a call the Python side
# routes to it ("invalid argument", "misaligned address") would be an error on the GPU.
# The layouts bindings.cpp documents but cannot see (a last dim read as contiguous, ...)
# are checked on the way in by _ContractChecked.

_LAUNCHED = re.compile(r"minikernels\._C\.\w+ failed: (CUDA driver version is insufficient|"
                       r"no CUDA-capable device)")


def _unit_last(name: str, t) -> None:
    assert t.shape[-1] <= 1 or t.stride(-1) == 1, f"{name}: last dim not contiguous {t.stride()}"


def _contiguous(name: str, t) -> None:
    assert t.is_contiguous(), f"{name}: must be contiguous, strides {t.stride()}"


class _ContractChecked:
    """The built extension behind the layout preconditions stated in bindings.cpp."""

    def __init__(self, ext) -> None:
        self.ext = ext
        self.calls: list[str] = []

    def rms_norm(self, y, x, weight, eps, residual, residual_out, stream):
        _contiguous("y", y)
        _unit_last("x", x)
        _contiguous("weight", weight)
        assert weight.shape == (x.shape[1],) and y.shape == x.shape
        assert y.dtype == x.dtype == weight.dtype
        if residual is not None:
            _unit_last("residual", residual)
            _contiguous("residual_out", residual_out)
            assert residual.shape == x.shape == residual_out.shape
        self.calls.append("rms_norm")
        return self.ext.rms_norm(y, x, weight, eps, residual, residual_out, stream)

    def int4_gemv(self, y, x, qweight, scales, zeros, bias, group_size, stream):
        import torch

        _contiguous("y", y)
        _unit_last("x", x)
        assert x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0, "x rows 16-byte aligned"
        _contiguous("qweight", qweight)
        assert qweight.dtype == torch.int32 and qweight.data_ptr() % 16 == 0
        for name, t in (("scales", scales), ("zeros", zeros)):
            _contiguous(name, t)
            assert t.dtype == x.dtype, name
        if bias is not None:
            _contiguous("bias", bias)
            assert bias.dtype == x.dtype and bias.shape == (qweight.shape[0],)
        self.calls.append("int4_gemv")
        return self.ext.int4_gemv(y, x, qweight, scales, zeros, bias, group_size, stream)

    def write_kv_cache(self, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, stream):
        import torch

        for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
            _unit_last(name, t)
        _contiguous("slot_mapping", slot_mapping)
        assert slot_mapping.dtype in (torch.int32, torch.int64)
        fp8 = k_cache.dtype == torch.float8_e4m3fn
        assert (k_scale is not None) == fp8 == (v_scale is not None)
        self.calls.append("write_kv_cache")
        return self.ext.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                       stream)

    def paged_decode_attention(self, out, lse, q, k_cache, v_cache, block_table, seq_lens,
                               o_partial, lse_partial, k_scale, v_scale, *args):
        import torch

        _contiguous("out", out)
        _contiguous("lse", lse)
        _unit_last("q", q)
        _unit_last("k_cache", k_cache)
        _unit_last("v_cache", v_cache)
        _unit_last("block_table", block_table)
        _contiguous("seq_lens", seq_lens)
        for name, t in (("o_partial", o_partial), ("lse_partial", lse_partial)):
            if t is not None:
                _contiguous(name, t)
        self.calls.append("paged_decode_attention")
        return self.ext.paged_decode_attention(out, lse, q, k_cache, v_cache, block_table,
                                               seq_lens, o_partial, lse_partial, k_scale,
                                               v_scale, *args)


class _NotRoutedToCuda(Exception):
    pass


@pytest.fixture
def cuda_routed(monkeypatch):
    """The ops' backend choice forced to "cuda" wherever their cuda_ok allows it (else
    _NotRoutedToCuda), the built extension behind the contract checks, stream 0."""
    import types

    import torch

    from minikernels import backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: these launches would run on host pointers (the "
                    "kernel tests run the CUDA kernels there)")
    ext = build_extension()
    if isinstance(ext, str):
        pytest.skip(ext)
    checked = _ContractChecked(ext)

    def resolve(op, device, *, cuda_ok=False, prefer_cuda=False):
        if not (cuda_ok() if callable(cuda_ok) else cuda_ok):
            raise _NotRoutedToCuda(op)
        return "cuda"

    monkeypatch.setattr(backend, "_cuda_ext", checked)
    monkeypatch.setattr(backend, "resolve", resolve)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return checked


def _launches(fn) -> None:
    """fn reaches the kernel launch (the only failure: no GPU on this machine)."""
    with pytest.raises(RuntimeError, match=_LAUNCHED):
        fn()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rms_norm_calls_reach_the_launch(cuda_routed, dtype):
    import torch

    from minikernels import ops

    dt = getattr(torch, dtype)
    for rows, hidden in ((1, 64), (7, 896), (3, 4096), (2, 100)):
        x = torch.randn(rows, hidden + 8, dtype=dt)[:, :hidden]       # strided rows
        w = torch.ones(hidden, dtype=dt)
        _launches(lambda: ops.rms_norm(x, w, 1e-6))
        _launches(lambda: ops.rms_norm(x, w, 1e-6, residual=torch.randn(rows, hidden,
                                                                          dtype=dt)))
        x3 = torch.randn(2, rows, hidden, dtype=dt)                      # leading dims
        _launches(lambda: ops.rms_norm(x3, w, 1e-6))
    empty = ops.rms_norm(torch.empty(0, 64, dtype=dt), torch.ones(64, dtype=dt), 1e-6)
    assert empty.shape == (0, 64)
    assert cuda_routed.calls.count("rms_norm") == 13


def _int4_weight(n: int, k: int, group: int, dtype):
    import torch

    groups = 1 if group == -1 else k // group
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32)
    return qweight, torch.rand(n, groups).to(dtype), torch.rand(n, groups).to(dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_int4_gemv_calls_reach_the_launch(cuda_routed, dtype):
    import torch

    from minikernels import ops

    dt = getattr(torch, dtype)
    for m, n, k, group, bias in ((1, 4096, 4096, 128, False), (5, 136, 8192, 32, True),
                                 (16, 264, 1056, -1, False), (3, 40, 4192, 32, True),
                                 (2, 24, 160, 40, False), (1, 16, 256, 64, True)):
        qw, s, z = _int4_weight(n, k, group, dt)
        x = torch.randn(m, k, dtype=dt)
        b = torch.randn(n, dtype=torch.float32) if bias else None   # cast for the kernel
        _launches(lambda: ops.int4_matmul(x, qw, s, z, group, b))
    assert cuda_routed.calls.count("int4_gemv") == 6


def test_int4_gemv_routes_only_what_the_launcher_takes(cuda_routed):
    """M > 16 or K not a multiple of 32: not routed to the CUDA kernel, whose launcher
    refuses both (N % 8 and the group size the op itself checks)."""
    import torch

    from minikernels import ops

    for m, k, group in ((17, 64, 32), (4, 40, 8)):
        qw, s, z = _int4_weight(64, k, group, torch.float16)
        with pytest.raises(_NotRoutedToCuda):
            ops.int4_matmul(torch.randn(m, k, dtype=torch.float16), qw, s, z, group)
    assert cuda_routed.calls == []


@pytest.mark.parametrize("cache", ["bfloat16", "float16", "float8_e4m3fn"])
def test_write_kv_cache_calls_reach_the_launch(cuda_routed, cache):
    import torch

    from minikernels import ops

    dt = torch.float16 if cache == "float16" else torch.bfloat16
    cdt = getattr(torch, cache)
    for hkv, d, bs, slots in ((2, 64, 16, torch.int32), (8, 128, 64, torch.int64),
                              (1, 256, 32, torch.int32), (4, 80, 16, torch.int64)):
        qkv = torch.randn(5, (4 + 2 * hkv) * d, dtype=dt)       # k, v: views of a fused qkv
        k = qkv[:, 4 * d:(4 + hkv) * d].view(5, hkv, d)
        v = qkv[:, (4 + hkv) * d:].view(5, hkv, d)
        k_cache = torch.zeros(8, bs, hkv, d, dtype=cdt)
        v_cache = torch.zeros(8, bs, hkv, d, dtype=cdt)
        slot = torch.tensor([0, 3, -1, bs + 1, 7 * bs], dtype=slots)
        scales = ({"k_scale": torch.full((hkv,), 0.5), "v_scale": 0.25}
                  if cache == "float8_e4m3fn" else {})
        _launches(lambda: ops.write_kv_cache(k, v, k_cache, v_cache, slot, **scales))
    assert cuda_routed.calls.count("write_kv_cache") == 4


@pytest.mark.parametrize("cache", ["bfloat16", "float16", "float8_e4m3fn"])
def test_paged_decode_calls_reach_the_launch(cuda_routed, cache):
    import torch

    from minikernels import ops

    dt = torch.float16 if cache == "float16" else torch.bfloat16
    cdt = getattr(torch, cache)
    cases = [  # (batch, hq, hkv, d, block size, kwargs)
        (1, 8, 8, 64, 16, {}),
        (4, 32, 8, 128, 64, {"num_splits": 4}),
        (3, 14, 2, 64, 16, {"softcap": 30.0, "window_left": 40}),
        (2, 16, 2, 256, 32, {"split_size": 64}),
        (64, 32, 8, 128, 16, {}),                         # the heuristic splits the KV
        (2, 6, 3, 128, 48, {"return_lse": True}),         # block size not a power of 2
    ]
    for b, hq, hkv, d, bs, kw in cases:
        q = torch.randn(b, hq + 2, d, dtype=dt)[:, :hq]             # strided heads
        k_cache = torch.zeros(64, bs, hkv, d, dtype=cdt)
        v_cache = torch.zeros(64, bs, hkv, d, dtype=cdt)
        table = torch.randint(0, 64, (b, 12), dtype=torch.int32)
        lens = torch.randint(1, 12 * bs, (b,), dtype=torch.int32)
        if cache == "float8_e4m3fn":
            kw = {**kw, "k_scale": 0.5, "v_scale": torch.full((hkv,), 0.25)}
        _launches(lambda: ops.paged_decode_attention(q, k_cache, v_cache, table, lens, **kw))
    assert cuda_routed.calls.count("paged_decode_attention") == len(cases)


def test_paged_decode_routes_only_what_the_launcher_takes(cuda_routed):
    """Misaligned cache rows, D outside {64, 128, 256}, a GQA group over 8, ALiBi or fp32:
    not routed to the CUDA kernel (its launcher, or its instantiations, refuse them)."""
    import torch

    from minikernels import ops

    def call(hq=8, hkv=2, d=128, dtype=torch.bfloat16, misaligned=False, **kw):
        numel = 16 * 16 * hkv * d
        flat = torch.zeros(numel + 1, dtype=dtype)
        cache = (flat[1:] if misaligned else flat[:numel]).view(16, 16, hkv, d)
        q = torch.randn(2, hq, d, dtype=dtype)
        table = torch.zeros(2, 4, dtype=torch.int32)
        lens = torch.tensor([5, 30], dtype=torch.int32)
        return ops.paged_decode_attention(q, cache, cache, table, lens, **kw)

    for kw in ({"misaligned": True}, {"d": 96}, {"d": 512}, {"hq": 32, "hkv": 2},
               {"alibi_slopes": torch.ones(8)}, {"dtype": torch.float32}):
        with pytest.raises(_NotRoutedToCuda):
            call(**kw)
    _launches(call)
    assert cuda_routed.calls == ["paged_decode_attention"]
