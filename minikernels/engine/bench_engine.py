"""Moved to :mod:`minikernels.benchmarks.engine` (every benchmark lives in
minikernels/benchmarks/); this alias keeps old imports working."""
from ..benchmarks.engine import *  # noqa: F401,F403
from ..benchmarks.engine import BenchTokenizer, PhaseTimer, StubModel, _build  # noqa: F401
