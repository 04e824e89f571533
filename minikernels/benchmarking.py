"""Benchmark plumbing shared by `minikernels bench` and the scripts in bench/: device naming, ceilings, timing and result files.

Every benchmark measures its peers side by side in one process, re-measures the machine's
ceilings (copy bandwidth, dense bf16 matmul) in the same run, reports each result as a
fraction of them, and writes bench/results/<device>/<name>.{json,md,png}.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]
# In a checkout results go to bench/results/<device>; an installed package writes to the cwd.
RESULTS_DIR = (_REPO_ROOT / "bench" / "results" if (_REPO_ROOT / "bench").is_dir()
               else Path.cwd() / "bench_results")
L2_FLUSH_BYTES = 64 << 20  # larger than any current L2 (H100/H200: 50 MB)


def device_name(device: torch.device | str | None = None) -> str:
    """Short lower-case name of the device, e.g. "h200", "a100-sxm4-80gb", "cpu"."""
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


def time_fn(fn: Callable[[], Any], *, warmup: int = 5, rep: int = 50,
            flush_l2: bool = False, device: torch.device | str | None = None) -> float:
    """Median seconds per call. CUDA events on a GPU (optionally flushing L2 before each
    call, outside the timed region); perf_counter on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
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
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def measure_copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), warmup=3, rep=20, device=device)
    return 2 * src.numel() / seconds


def measure_matmul_flops(device: torch.device | str = "cuda", n: int = 8192,
                         dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul throughput (FLOP/s) of torch.matmul on random n x n x n inputs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, warmup=3, rep=20, device=device)
    return 2 * n**3 / seconds


def ceilings(device: torch.device | str = "cuda") -> dict[str, float]:
    """The run's ceilings: {"copy_bytes_per_s", "bf16_matmul_flops"} (0 on the CPU)."""
    if torch.device(device).type != "cuda":
        return {"copy_bytes_per_s": 0.0, "bf16_matmul_flops": 0.0}
    return {"copy_bytes_per_s": measure_copy_bandwidth(device),
            "bf16_matmul_flops": measure_matmul_flops(device)}


def environment() -> dict[str, Any]:
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


def write_results(name: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                  columns: Sequence[str] | None = None, title: str | None = None,
                  plot: Callable[[Path], None] | None = None,
                  out_dir: Path | str | None = None) -> dict[str, Path]:
    """Write <out_dir or bench/results/<device>>/<name>.json, .md and (if plot) .png.

    plot(path) draws the figure and saves it to ``path`` (matplotlib, Agg backend).
    MINIKERNELS_BENCH_OUT overrides the output folder (e.g. $OUT on the device machine).
    """
    base = Path(out_dir or os.environ.get("MINIKERNELS_BENCH_OUT") or
                RESULTS_DIR / device_name())
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
        import matplotlib
        matplotlib.use("Agg")
        paths["png"] = base / f"{name}.png"
        plot(paths["png"])
    return paths
