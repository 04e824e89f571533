"""``minikernels bench engine``'s options, importable without torch (``--help`` stays
quick); :func:`run` loads :mod:`.engine`, where the benchmark lives."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", default="steady,nanovllm,prefix",
                   help="comma-separated: steady, nanovllm, prefix")
    p.add_argument("--paths", default="generate,stream", help="generate, stream")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size (default: the engine's default)")
    p.add_argument("--gpu-ms", type=float, default=5.0,
                   help="simulated GPU step for the overlap run (0: skip it)")
    p.add_argument("--block-sizes", default="16,32,64,128,256",
                   help="block sizes to sweep ('' to skip)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the workloads (< 1)")
    p.add_argument("--device", default="cpu",
                   help="where the stub's logits live: cpu (default; the sampler's math is "
                        "the stand-in) or cuda (a GPU host: sampling, masks and read-backs "
                        "are real device launches; --gpu-ms is then skipped)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop of the streaming path: auto = uvloop when installed "
                        "(what `minikernels serve` runs on, as uvicorn picks it), else "
                        "asyncio's")
    from .plumbing import add_result_arguments

    add_result_arguments(p, "engine")


def run(args: argparse.Namespace) -> int:
    from .engine import run as run_engine_bench

    return run_engine_bench(args)
