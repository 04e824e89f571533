"""Command line: ``minikernels generate | serve | bench [ops|serve|engine]`` (also ``python -m minikernels``).

Each subcommand's arguments and runner live beside the code they drive and are imported
only when that subcommand is used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, add-arguments function, run function, help)
COMMANDS = {
    "generate": ("minikernels.models.generate", "add_generate_arguments", "run_generate",
                 "generate text from a model (HF dir or built-in name)"),
    "serve": ("minikernels.server.cli", "add_arguments", "run",
              "OpenAI-compatible HTTP server"),
}
BENCHES = {
    "ops": ("minikernels.op_bench", "add_arguments", "run",
            "time every op on each backend of this device (default)"),
    "serve": ("minikernels.engine.bench_serve", "add_arguments", "run",
              "end-to-end serving throughput and latency (the main job)"),
    "engine": ("minikernels.engine.bench_engine", "add_arguments", "run",
               "engine host overhead per step (stub forward), overlap, block sizes"),
}


def _attach(parser: argparse.ArgumentParser, spec: tuple[str, str, str, str]) -> None:
    module = importlib.import_module(spec[0])
    getattr(module, spec[1])(parser)
    parser.set_defaults(_run=getattr(module, spec[2]))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minikernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="{generate,serve,bench}")
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec[3])
        if argv[:1] == [name]:
            _attach(p, spec)
    bench = sub.add_parser("bench", help="benchmarks: ops (default) or serve")
    bench_sub = bench.add_subparsers(dest="bench", metavar="{ops,serve,engine}")
    chosen = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    for name, spec in BENCHES.items():
        p = bench_sub.add_parser(name, help=spec[3])
        if argv[:1] == ["bench"] and chosen == name:
            _attach(p, spec)
    if argv[:1] == ["bench"] and chosen not in BENCHES:
        _attach(bench, BENCHES["ops"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
