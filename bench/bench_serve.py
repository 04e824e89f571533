"""Thin script: the benchmark lives in minikernels/benchmarks/serve_vs_hf.py (see its docstring).

    python -m bench.bench_serve [--smoke] [--result-dir DIR]      (or: python bench/bench_serve.py ...)
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minikernels.benchmarks.serve_vs_hf import *  # noqa: E402,F401,F403
from minikernels.benchmarks.serve_vs_hf import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
