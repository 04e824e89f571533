"""The ``minikernels`` command (also ``python -m minikernels``).

Each subcommand's arguments live beside the code it drives and are imported only when
that subcommand is used, so ``minikernels --help`` does not import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

DESCRIPTION = """\
Inference kernels for small LLMs, a batched engine and an OpenAI-compatible server.

examples:
  minikernels generate --model Qwen/Qwen2.5-0.5B-Instruct --prompt "Hello" --chat
  minikernels serve Qwen/Qwen2.5-0.5B-Instruct --port 8000 --api-key secret
  minikernels bench serve            # end-to-end serving benchmark (dummy weights)

MODEL is a Hugging Face hub id (org/name; HF_HOME, HF_HUB_OFFLINE, HF_TOKEN apply),
a local HF checkpoint directory, or a built-in name (random weights, e.g. tiny)."""

# name -> (module, add-arguments function, run function, help)
COMMANDS = {
    "generate": ("minikernels.models.generate", "add_generate_arguments", "run_generate",
                 "generate text from a model (hub id, HF directory or built-in name)"),
    "serve": ("minikernels.server.cli", "add_arguments", "run",
              "OpenAI-compatible HTTP server"),
}
BENCHES = {
    "ops": ("minikernels.benchmarks.ops", "add_arguments", "run",
            "time every op on each backend of this device (default)"),
    "serve": ("minikernels.benchmarks.serve", "add_arguments", "run",
              "end-to-end serving throughput and latency (the main job)"),
    "engine": ("minikernels.benchmarks.engine_cli", "add_arguments", "run",
               "engine host overhead per step (stub forward), overlap, block sizes"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default shown unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text.lower()
                and action.default not in (None, False, argparse.SUPPRESS)
                and action.nargs != 0 and not isinstance(action.default, list)):
            text = (text + " " if text else "") + "(default: %(default)s)"
        elif isinstance(action, argparse.BooleanOptionalAction) and \
                "default" not in text.lower():
            text = (text + " " if text else "") + \
                f"(default: {'on' if action.default else 'off'})"
        return text


def _fail(message: str) -> int:
    print(f"minikernels: error: {message}", file=sys.stderr)
    return 2


def _attach(parser: argparse.ArgumentParser, spec: tuple[str, str, str, str]) -> None:
    module = importlib.import_module(spec[0])
    getattr(module, spec[1])(parser)
    parser.set_defaults(_run=getattr(module, spec[2]))
    for action in parser._actions:  # argparse prints no help line (no default) without help
        if action.option_strings and not action.help and action.default not in \
                (None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"


def _sub(sub: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                          formatter_class=HelpFormatter, **kw)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="minikernels", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{generate,serve,bench}")
    for name, spec in COMMANDS.items():
        p = _sub(sub, name, spec[3])
        if argv[:1] == [name]:
            _attach(p, spec)
    bench = _sub(sub, "bench", "benchmarks: ops (default), serve or engine")
    bench_sub = bench.add_subparsers(dest="bench", metavar="{ops,serve,engine}")
    chosen = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    for name, spec in BENCHES.items():
        p = _sub(bench_sub, name, spec[3])
        if argv[:1] == ["bench"] and chosen == name:
            _attach(p, spec)
    if argv[:1] == ["bench"] and chosen not in BENCHES and not \
            any(a in ("-h", "--help") for a in argv[1:2]):
        _attach(bench, BENCHES["ops"])
    return parser


def check_device(device: str | None) -> str | None:
    """One line when ``device`` asks for CUDA that this torch cannot use, else None."""
    if not device or not str(device).startswith("cuda"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from .models.loader import no_cuda_message

    return no_cuda_message(str(device))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ._extras import missing_extra_message

    try:
        parser = build_parser(argv)
    except ImportError as exc:
        what = f"minikernels {' '.join(argv[:2] if argv[:1] == ['bench'] else argv[:1])}"
        message = missing_extra_message(exc, what)
        if message is None:
            raise
        return _fail(message)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    problem = check_device(getattr(args, "device", None))
    if problem:
        return _fail(problem)
    try:
        return int(run(args) or 0)
    except ImportError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
