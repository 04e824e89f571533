"""Op micro-benchmarks as pytest-benchmark tests, beside the scripts:

    pytest bench/ --benchmark-only                      # every op on each backend here
    pytest bench/ --benchmark-only -k int4 --benchmark-compare

The cases are `minikernels bench ops`'s (full shapes on a GPU, downsized on the CPU) on
every backend this device has; pytest-benchmark does the repetitions, statistics and
comparisons between saved runs. Not part of `pytest -q` (testpaths = tests).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from minikernels.backend import cuda_extension, use_backend  # noqa: E402
from minikernels.benchmarks.ops import op_cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = op_cases(DEVICE, torch.bfloat16, small=DEVICE == "cpu")


def _backends(case) -> list[str]:
    if DEVICE == "cpu":
        return ["reference"]
    have_cuda = cuda_extension() is not None
    return [b for b in case.backends if b != "cuda" or have_cuda] + \
        (["torch"] if case.peer is not None else [])


PARAMS = [pytest.param(case, backend, id=f"{case.op}[{case.shape}]-{backend}")
          for case in CASES for backend in _backends(case)]


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_op(benchmark, case, backend):
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(bytes=case.nbytes, flops=case.flops, device=DEVICE)
    fn = case.peer if backend == "torch" else case.run

    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    with use_backend("auto" if backend == "torch" else backend):
        out = benchmark(call)
    first = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(first.float()).all()
