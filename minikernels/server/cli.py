"""``minikernels serve MODEL``: run the OpenAI-compatible server on uvicorn.

    minikernels serve ./my-hf-model --port 8000 --api-key secret --dtype bfloat16

The API key may also come from the ``MINIKERNELS_API_KEY`` environment variable (the
flag wins). Engine options are mk.LLM's keyword arguments.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .app import API_KEY_ENV, create_app

logger = logging.getLogger("minikernels.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``serve``'s arguments to ``parser``."""
    parser.add_argument("model", help="HF checkpoint directory or built-in model name")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=None,
                      help=f"require 'Authorization: Bearer KEY' on /v1/* (default: "
                           f"${API_KEY_ENV}, else no auth)")
    http.add_argument("--served-model-name", default=None,
                      help="model id clients use (default: MODEL as given)")
    http.add_argument("--max-queue", type=int, default=1024,
                      help="requests queued beyond this get HTTP 429")
    http.add_argument("--log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug"])
    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", default="bfloat16",
                     choices=["bfloat16", "float16", "float32", "auto"])
    eng.add_argument("--quantization", default=None, choices=["int4", "gptq", "awq"],
                     help="int4: RTN-quantize the weights at load; gptq / awq: load an "
                          "int4 checkpoint")
    eng.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--block-size", type=int, default=16)
    eng.add_argument("--num-kv-blocks", type=int, default=None)
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    eng.add_argument("--enable-prefix-caching", dest="enable_prefix_caching",
                     action=argparse.BooleanOptionalAction, default=True)
    eng.add_argument("--enforce-eager", action="store_true",
                     help="no CUDA graphs / torch.compile")
    eng.add_argument("--seed", type=int, default=0,
                     help="seed of unseeded sampling (and of a built-in model's weights)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """mk.LLM keyword arguments from parsed ``args`` (unset optional ones omitted)."""
    kwargs: dict[str, Any] = dict(
        dtype=args.dtype, quantization=args.quantization, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        seed=args.seed)
    if args.device is not None:
        kwargs["device"] = args.device
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    return kwargs


def build_engine(args: argparse.Namespace) -> Any:
    """The AsyncLLM for ``args`` (loads the model)."""
    from minikernels.engine import AsyncLLM

    return AsyncLLM.from_args(args.model, max_queue=args.max_queue, **engine_kwargs(args))


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted. Returns the exit code."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key", args.host)
    try:
        engine = build_engine(args)
    except (FileNotFoundError, ValueError, TypeError, OSError) as exc:
        logger.error("cannot load %s: %s", args.model, exc)
        return 2
    app = create_app(engine, api_key=api_key,
                     served_model_name=args.served_model_name or args.model,
                     shutdown_engine=True)
    logger.info("serving %s on http://%s:%d/v1", args.served_model_name or args.model,
                args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:   # uvicorn re-raises the SIGINT it handled: a clean stop
        pass
    return 0
