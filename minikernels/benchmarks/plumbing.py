"""Benchmark plumbing shared by `minikernels bench` and the scripts in bench/: device naming,
ceilings, timing (with the spread of repeated runs) and result files.

Every benchmark measures its peers side by side in one process, re-measures the machine's
ceilings (copy bandwidth, dense bf16 matmul) in the same run, reports each result as a
fraction of them, and writes <results>/<device>/<name>.{json,md,png}: <results> is
bench/results in a checkout, ./bench/results under the current directory when installed
from a wheel, or $MINIKERNELS_BENCH_OUT / --result-dir.

torch is imported inside the functions that use it, so a benchmark's --help stays quick.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


_REPO_ROOT = Path(__file__).resolve().parents[2]  # minikernels/benchmarks/plumbing.py -> the checkout
# In a checkout results go to bench/results/<device>; installed from a wheel, to
# ./bench/results/<device> under the current directory (the same relative path).
RESULTS_DIR = (_REPO_ROOT / "bench" / "results" if (_REPO_ROOT / "bench").is_dir()
               else Path("bench") / "results")
RESULTS_ENV = "MINIKERNELS_BENCH_OUT"
L2_FLUSH_BYTES = 64 << 20  # larger than any current L2 (H100/H200: 50 MB)
CPU_NOTE = ("CPU timings swing with machine load (often 10x or more on a shared machine): "
            "read the spread column, and compare rows of one run only")


def device_name(device: torch.device | str | None = None) -> str:
    """Short lower-case name of the device, e.g. "h200", "a100-sxm4-80gb", "cpu"."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    for short in ("h200", "h100", "a100", "l40s", "a10g", "rtx 4090"):
        if short in name:
            return short.replace(" ", "-")
    return name.replace(" ", "-")


def results_dir(device: torch.device | str | None = None,
                out_dir: Path | str | None = None) -> Path:
    """Where result files go: out_dir, else $MINIKERNELS_BENCH_OUT, else
    bench/results/<device> (in the checkout, or under the current directory)."""
    return Path(out_dir or os.environ.get(RESULTS_ENV) or RESULTS_DIR / device_name(device))


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path.resolve()) if not path.is_absolute() or \
            path.resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:  # pragma: no cover - another drive
        return str(path)


def add_result_arguments(parser: Any, name: str) -> None:
    """--result-dir, --output-json, --no-save (the same in every benchmark; old spellings
    --out, --out-dir and --output stay as hidden aliases). The help shows the real default."""
    import argparse

    where = (f"{_shown(Path(os.environ[RESULTS_ENV]))}" if os.environ.get(RESULTS_ENV)
             else f"{_shown(RESULTS_DIR)}/<device>")
    parser.add_argument("--result-dir", dest="result_dir", default=None,
                        help=f"folder for {name}.json, {name}.md and {name}.png (default: "
                             f"{where}; ${RESULTS_ENV} overrides)")
    parser.add_argument("--out", "--out-dir", dest="result_dir", help=argparse.SUPPRESS)
    parser.add_argument("--output-json", dest="output_json", default=None,
                        help="also write the JSON results to this file")
    parser.add_argument("--output", dest="output_json", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true",
                        help=f"write no {name}.* files (print only)")


@dataclass
class Timing:
    """Seconds per call over repeated runs: median and the spread around it."""

    median: float
    p10: float
    p90: float
    min: float
    max: float
    runs: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: 0.05 = a tight 5% band; > 1 = load noise dominates."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else float("nan")

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        v = sorted(samples)
        return cls(statistics.median(v), percentile(v, 10), percentile(v, 90), v[0], v[-1],
                   len(v))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated q-th percentile (nan for no values)."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def time_fn(fn: Callable[[], Any], *, warmup: int = 5, rep: int = 50,
            flush_l2: bool = False, device: torch.device | str | None = None) -> float:
    """Median seconds per call. CUDA events on a GPU (optionally flushing L2 before each
    call, outside the timed region); perf_counter on the CPU."""
    return time_stats(fn, warmup=warmup, rep=rep, flush_l2=flush_l2, device=device).median


def time_stats(fn: Callable[[], Any], *, warmup: int = 5, rep: int = 50,
               flush_l2: bool = False, device: torch.device | str | None = None) -> Timing:
    """:func:`time_fn` with the spread of the ``rep`` runs (:class:`Timing`)."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return Timing.of(times)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for i in range(rep):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return Timing.of([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def measure_copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), warmup=3, rep=20, device=device)
    return 2 * src.numel() / seconds


def measure_matmul_flops(device: torch.device | str = "cuda", n: int = 8192,
                         dtype: torch.dtype | None = None) -> float:
    """Dense matmul throughput (FLOP/s) of torch.matmul on random n x n x n inputs (bf16)."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, warmup=3, rep=20, device=device)
    return 2 * n**3 / seconds


def ceilings(device: torch.device | str = "cuda") -> dict[str, float]:
    """The run's ceilings: {"copy_bytes_per_s", "bf16_matmul_flops"} (0 on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return {"copy_bytes_per_s": 0.0, "bf16_matmul_flops": 0.0}
    return {"copy_bytes_per_s": measure_copy_bandwidth(device),
            "bf16_matmul_flops": measure_matmul_flops(device)}


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device": device_name()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path | str, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """The results JSON ({"meta": {environment, ...}, "rows": [...]}) at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {"environment": environment(), **meta},
                                "rows": list(rows)}, indent=2, default=str))
    return path


def write_results(name: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                  columns: Sequence[str] | None = None, title: str | None = None,
                  plot: Callable[[Path], None] | None = None,
                  out_dir: Path | str | None = None) -> dict[str, Path]:
    """Write <out_dir or results_dir()>/<name>.json, .md and (if plot) .png.

    plot(path) draws the figure and saves it to ``path`` (matplotlib, Agg backend; without
    matplotlib, i.e. without the [bench] extra, the plot is skipped with one line).
    MINIKERNELS_BENCH_OUT overrides the output folder (e.g. $OUT on the device machine).
    """
    base = results_dir(None, out_dir)
    base.mkdir(parents=True, exist_ok=True)
    meta = {"environment": environment(), **meta}
    paths = {"json": base / f"{name}.json", "md": base / f"{name}.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2,
                                        default=str))
    header = f"# {title or name}\n\n" + "".join(
        f"- {k}: {v}\n" for k, v in meta.items() if k != "environment")
    header += f"- environment: {meta['environment']}\n\n"
    paths["md"].write_text(header + markdown_table(rows, columns))
    if plot is not None:
        try:
            import matplotlib
        except ImportError:
            print("no plot: matplotlib is missing (pip install -e '.[bench]')")
            return paths
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths["png"] = base / f"{name}.png"
        plot(paths["png"])
        plt.close("all")
    return paths
