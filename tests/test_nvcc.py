"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a without register spills, and the
torch bindings file compiles (syntax) against the installed torch headers."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

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


def test_kernel_files_include_no_torch():
    for path in CU_FILES + glob.glob(os.path.join(CSRC, "*.h")):
        text = open(path).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), \
            f"{os.path.basename(path)} includes torch headers; only bindings.cpp may"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90a(cu: str, tmp_path):
    # --threads: the two -gencode targets compile in parallel (this machine has 2 cores)
    cmd = [NVCC, "-c", "-std=c++20", "-O3", "--threads", "2", "-I", CSRC,
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", cu, "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    spills = [ln for ln in res.stderr.splitlines()
              if re.search(r"[1-9]\d* bytes spill (stores|loads)", ln)]
    assert not spills, "register spills:\n" + "\n".join(spills)


@needs_nvcc
def test_bindings_compile_against_torch_headers():
    gxx = shutil.which("g++")
    inc = cuda_include_dir()
    if gxx is None or inc is None:
        pytest.skip("g++ or the CUDA runtime headers are missing")
    from torch.utils.cpp_extension import include_paths

    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=_C",
           "-I", CSRC, "-I", inc, "-I", sysconfig.get_paths()["include"]]
    for p in include_paths():
        cmd += ["-I", p]
    res = subprocess.run(cmd + [os.path.join(CSRC, "bindings.cpp")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-4000:]
