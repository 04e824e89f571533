"""``minikernels serve MODEL``: run the OpenAI-compatible server on uvicorn.

    minikernels serve ./my-hf-model --port 8000 --api-key secret --dtype bfloat16

API keys: ``--api-key`` (repeatable), ``--api-key-file`` (one per line), else the
``MINIKERNELS_API_KEY`` environment variable. Engine options are mk.LLM's keyword
arguments. SIGTERM / SIGINT drain the server (see :mod:`.http`) and exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any, Optional

from ..models.kv_cache_dtype import KV_CACHE_DTYPE_NAMES
from .settings import API_KEY_ENV, REASONING_PARSERS, TOOL_CALL_PARSERS, ServerLimits

# The app, uvicorn glue, auth and limits (fastapi, torch) load in run(), so --help is quick.

logger = logging.getLogger("minikernels.server")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``serve``'s arguments to ``parser``."""
    parser.add_argument("model", help="hub id (org/name), HF checkpoint directory or "
                                      "built-in model name (dummy weights)")
    parser.add_argument("--revision", default=None,
                        help="hub branch, tag or commit of a hub id (default: main)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", action="append", default=None,
                      help=f"accept 'Authorization: Bearer KEY' on /v1/*; repeat for several "
                           f"keys (default: ${API_KEY_ENV}, else no auth)")
    http.add_argument("--api-key-file", default=None,
                      help="file with one API key per line (# comments allowed)")
    http.add_argument("--shared-prefix-cache", action="store_true",
                      help="let different API keys share prefix-cache entries (by default "
                           "each key's cache is kept apart)")
    http.add_argument("--allowed-hosts", default=None,
                      help="comma-separated Host header values to accept ('*' = any, "
                           "'*.example.com' = subdomains); default: the bound address and "
                           "localhost (no check when bound to 0.0.0.0 / ::)")
    http.add_argument("--served-model-name", default=None,
                      help="model id clients use (default: MODEL's directory name)")
    http.add_argument("--max-queue", type=int, default=1024,
                      help="requests queued beyond this get HTTP 429")
    http.add_argument("--max-request-bytes", type=_positive_int,
                      default=ServerLimits.max_body_bytes, help="largest request body (413)")
    http.add_argument("--max-prompts-per-request", type=_positive_int,
                      default=ServerLimits.max_prompts,
                      help="most prompts in one completions request (400)")
    http.add_argument("--request-header-timeout", type=_positive_float,
                      default=ServerLimits.header_timeout_s,
                      help="seconds a client has to send its request headers")
    http.add_argument("--request-body-timeout", type=_positive_float,
                      default=ServerLimits.body_timeout_s,
                      help="seconds a client has to send its request body (408)")
    http.add_argument("--shutdown-grace", type=float, default=5.0,
                      help="on SIGTERM, seconds in-flight requests get to finish before "
                           "they are aborted (each stream still ends with [DONE])")
    http.add_argument("--chat-template", default=None,
                      help="a Jinja chat template file (or the template itself, inline) "
                           "rendering every chat in place of the model's own; for base "
                           "models without one (vLLM's flag)")
    http.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                      help="parse tool calls out of the output for tool_choice 'auto' "
                           "(hermes: <tool_call> tags, Qwen2.5 / Qwen3; llama3_json: "
                           "Llama 3.1; pythonic: Llama 3.2 / 4; mistral; granite; "
                           "phi4_mini_json)")
    http.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                      help="split <think>...</think> into reasoning_content (chat) / a "
                           "reasoning item (responses): qwen3, deepseek_r1")
    http.add_argument("--structured-outputs-in-reasoning", action="store_true",
                      help="with --reasoning-parser: apply a request's response_format / "
                           "structured_outputs / forced tool choice to the thinking too "
                           "(default: the model thinks freely and the constraint governs "
                           "the answer after </think>, as vLLM)")
    http.add_argument("--responses-store-size", type=int, default=0, metavar="N",
                      help="keep the latest N responses of /v1/responses in memory (per API "
                           "key) for previous_response_id and GET / DELETE "
                           "/v1/responses/{id}; 0 (default) stores none, as vLLM")
    http.add_argument("--log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug"])
    http.add_argument("--no-access-log", dest="access_log", action="store_false",
                      help="no access log line per request")
    eng = parser.add_argument_group("engine")
    eng.add_argument("--task", default="generate", choices=["generate", "embed", "classify"],
                     help="generate: text (completions, chat, responses); embed: an "
                          "embedding model (/v1/embeddings; pooling from the checkpoint's "
                          "sentence-transformers files, else the last token, normalized); "
                          "classify: a sequence classifier, reward model or cross-encoder "
                          "reranker (/classify, /score, /rerank)")
    eng.add_argument("--classifier-from-token", nargs="+", default=None, metavar="TOKEN",
                     help="--task classify on a generative checkpoint: the labels are these "
                          "tokens' logits; two tokens (e.g. 'no yes' for Qwen3-Reranker) "
                          "score logit(yes) - logit(no)")
    eng.add_argument("--dtype", default="bfloat16",
                     choices=["bfloat16", "float16", "float32", "auto"])
    eng.add_argument("--quantization", default=None,
                     choices=["int4", "gptq", "awq", "fp8", "fp8_w8a8", "int8", "mxfp4", "dense"],
                     help="int4: RTN-quantize the weights at load; gptq / awq: load an "
                          "int4 checkpoint; fp8: block-wise fp8 weights (RTN at load, or "
                          "an fp8 checkpoint as is), W8A16; fp8_w8a8: the same run W8A8; "
                          "int8: INT8 W8A8 (per-channel RTN at load, or a compressed-tensors "
                          "int8 checkpoint as is); mxfp4 / dense: a GPT-OSS MXFP4 "
                          "checkpoint's experts kept MXFP4 (its default) or dequantized")
    eng.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--block-size", type=int, default=64,
                     help="KV block size in tokens, 1..256 (default 64: docs/engine.md)")
    eng.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_NAMES,
                     help="auto = the model's dtype; fp8 = e4m3 KV cache (twice the tokens "
                          "of bf16; logit error in docs/models.md); fp8_e5m2 = e5m2")
    eng.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                     help="one block table for all layers, even for models that interleave "
                          "sliding-window and full attention (Gemma 2 / 3), whose sliding "
                          "layers otherwise hand back the blocks behind their window")
    eng.add_argument("--state-checkpoint-interval", type=_positive_int, default=None,
                     help="hybrid recurrent models (LFM2, Qwen3.5, Mamba-2 hybrids) with "
                          "prefix caching: checkpoint their states every this many tokens "
                          "(a multiple of --block-size; default the first >= 512)")
    eng.add_argument("--state-checkpoint-slots", type=_positive_int, default=None,
                     help="hybrid recurrent models: how many state checkpoints prefix "
                          "caching keeps (default --max-num-seqs, 4 .. 32)")
    eng.add_argument("--num-kv-blocks", type=int, default=None)
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    eng.add_argument("--enable-prefix-caching", dest="enable_prefix_caching",
                     action=argparse.BooleanOptionalAction, default=True)
    eng.add_argument("--enforce-eager", action="store_true",
                     help="no CUDA graphs / torch.compile")
    eng.add_argument("--speculative-config", type=_json_dict, default=None,
                     help='speculative decoding, as JSON (vLLM\'s flag), e.g. '
                          '\'{"method": "ngram", "num_speculative_tokens": 4}\'; methods '
                          'ngram, draft_model, eagle, eagle3 '
                          '(docs/engine.md, "Speculative decoding")')
    eng.add_argument("--structured-outputs-config", type=_json_dict, default=None,
                     help='structured outputs, as JSON (vLLM\'s flag): '
                          '\'{"backend": "outlines"}\' matches regexes, choices and JSON '
                          'schemas as token automata (needs outlines-core); default '
                          'xgrammar (docs/engine.md, "Structured outputs")')
    eng.add_argument("--generation-config", default="auto",
                     help="default sampling of requests that leave a field unset: auto = "
                          "the checkpoint's generation_config.json (temperature, top_p, "
                          "top_k, min_p, repetition_penalty, max_new_tokens; vLLM's "
                          "default), vllm = ignore it, or a directory holding one")
    eng.add_argument("--seed", type=int, default=0,
                     help="seed of unseeded sampling (and of a built-in model's weights)")
    eng.add_argument("--enable-lora", action="store_true",
                     help="serve LoRA adapters (PEFT format) per request: --lora-modules")
    eng.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                     type=_lora_module,
                     help="LoRA adapters clients select with \"model\": NAME (implies "
                          "--enable-lora)")
    eng.add_argument("--allow-runtime-lora-updating", action="store_true",
                     help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter: API "
                          "clients may load adapters from server paths (vLLM's "
                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING; implies --enable-lora)")
    eng.add_argument("--enable-sleep-mode", action="store_true",
                     help="serve POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping, "
                          "POST /reset_prefix_cache (vLLM's dev-mode routes) and POST "
                          "/update_weights_from_disk (SGLang's), for RL loops: API clients "
                          "may free the server's GPU memory and name checkpoint directories "
                          "on the server; each call waits for the running requests")
    eng.add_argument("--max-loras", type=int, default=4,
                     help="adapters on the device at once (a request for another waits)")
    eng.add_argument("--max-lora-rank", type=int, default=16)
    eng.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                     help="shard the model over this many GPUs / processes "
                          "(torch.distributed; docs/parallel.md)")
    eng.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                     help="engine replicas behind this server (replica i on GPU i), "
                          "routed by fewest outstanding tokens or a cached prefix")


def _lora_module(text: str) -> tuple[str, str]:
    """argparse type: NAME=PATH of a LoRA adapter."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _json_dict(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """mk.LLM keyword arguments from parsed ``args`` (unset optional ones omitted)."""
    kwargs: dict[str, Any] = dict(
        dtype=args.dtype, quantization=args.quantization, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        seed=args.seed, kv_cache_dtype=args.kv_cache_dtype)
    if args.disable_hybrid_kv_cache_manager:
        kwargs["disable_hybrid_kv_cache_manager"] = True
    for name in ("state_checkpoint_interval", "state_checkpoint_slots"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if args.device is not None:
        kwargs["device"] = args.device
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if getattr(args, "speculative_config", None) is not None:
        kwargs["speculative_config"] = args.speculative_config
    if getattr(args, "structured_outputs_config", None) is not None:
        kwargs["structured_outputs_config"] = args.structured_outputs_config
    if getattr(args, "generation_config", "auto") != "auto":
        kwargs["generation_config"] = args.generation_config
    if getattr(args, "tensor_parallel_size", 1) != 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "enable_lora", False) or getattr(args, "lora_modules", None) or \
            getattr(args, "allow_runtime_lora_updating", False):
        kwargs.update(enable_lora=True, max_loras=args.max_loras,
                      max_lora_rank=args.max_lora_rank)
    return kwargs


def build_engine(args: argparse.Namespace) -> Any:
    """The AsyncLLM for ``args`` (loads the model); an Embedder with ``--task embed``, a
    Classifier with ``--task classify``."""
    from minikernels.engine import AsyncLLM
    from minikernels.models.hub import resolve_model

    path = resolve_model(args.model, getattr(args, "revision", None))
    task = getattr(args, "task", "generate")
    if getattr(args, "classifier_from_token", None) and task != "classify":
        raise ValueError("--classifier-from-token needs --task classify")
    if task in ("embed", "classify"):
        from minikernels.engine import Classifier, Embedder

        kw = {k: v for k, v in engine_kwargs(args).items()
              if k in ("dtype", "quantization", "device", "max_model_len", "seed",
                       "max_num_batched_tokens")}
        if task == "embed":
            return Embedder(path, **kw)
        return Classifier(path, classifier_from_token=args.classifier_from_token, **kw)
    if getattr(args, "data_parallel_size", 1) != 1:
        from .data_parallel import DataParallelEngine

        return DataParallelEngine.from_args(path, args.data_parallel_size,
                                            max_queue=args.max_queue, **engine_kwargs(args))
    return AsyncLLM.from_args(path, max_queue=args.max_queue, **engine_kwargs(args))


def served_name(args: argparse.Namespace) -> str:
    """``--served-model-name``, else MODEL's directory name (never a filesystem path)."""
    if args.served_model_name:
        return args.served_model_name
    if os.path.isdir(args.model):
        return os.path.basename(os.path.normpath(os.path.abspath(args.model)))
    return args.model


def describe_engine(engine: Any, args: argparse.Namespace) -> str:
    """The startup line's engine facts: dtype, device, KV capacity, max_model_len."""
    inner = getattr(engine, "engine", None)
    device = getattr(inner, "device", None) or args.device or "?"
    dtype = getattr(inner, "dtype", None)
    if dtype is None:
        model = getattr(inner, "model", None)
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        dtype = getattr(param, "dtype", None) or args.dtype
    try:
        stats = engine.stats()
    except Exception:  # noqa: BLE001 - the log line must not stop the server
        stats = {}
    block = getattr(getattr(inner, "block_manager", None), "block_size", None) \
        or args.block_size
    blocks = stats.get("kv_blocks_total")
    kv = f"{int(blocks) * int(block)} tokens ({blocks} blocks of {block})" \
        if isinstance(blocks, int) else "unknown"
    layout = getattr(inner, "kv_layout", None)
    if layout is not None and getattr(layout, "hybrid", False):
        # a block holds one KV group's layers: full-attention tokens, or a sliding window's
        kv += (f", hybrid: {layout.num_groups} KV groups of {layout.num_slots} layers, "
               f"sliding window {layout.window}")
    return (f"dtype {str(dtype).replace('torch.', '')}, device {device}, KV cache {kv}, "
            f"max_model_len {getattr(engine, 'max_model_len', '?')}")


def build_server(app: Any, host: str, port: int, **kw: Any) -> Any:
    """The uvicorn server for ``app`` (minikernels.server.http; imported on first use)."""
    from .http import build_server as build

    return build(app, host, port, **kw)


def _limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(max_body_bytes=args.max_request_bytes,
                        body_timeout_s=args.request_body_timeout,
                        header_timeout_s=args.request_header_timeout,
                        max_prompts=args.max_prompts_per_request)


def _allowed_hosts(args: argparse.Namespace) -> Optional[tuple[str, ...]]:
    from .limits import default_allowed_hosts

    if args.allowed_hosts:
        return tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    return default_allowed_hosts(args.host)


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGTERM / SIGINT. Returns the exit code."""
    from .app import create_app, engine_supports_cache_salt
    from .auth import collect_keys
    from .chat import load_chat_template

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("minikernels.access").setLevel(
        logging.INFO if args.access_log else logging.WARNING)
    try:
        keys = collect_keys(args.api_key, args.api_key_file)
    except (OSError, ValueError) as exc:
        logger.error("cannot read API keys: %s", exc)
        return 2
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key", args.host)
    if len(keys) > 1 and args.enable_prefix_caching and not args.shared_prefix_cache \
            and not engine_supports_cache_salt():
        logger.error("several API keys would share the prefix cache (a timing side channel "
                     "between users) and this engine cannot keep them apart yet: pass "
                     "--shared-prefix-cache to allow it, or --no-enable-prefix-caching")
        return 2
    chat_template = None
    if getattr(args, "chat_template", None) is not None:
        try:
            chat_template = load_chat_template(args.chat_template)
        except (OSError, ValueError) as exc:
            logger.error("%s", exc)
            return 2
    try:
        engine = build_engine(args)
    except (FileNotFoundError, ValueError, TypeError, OSError) as exc:
        logger.error("cannot load %s: %s", args.model, exc)
        return 2
    name = served_name(args)
    try:
        app = create_app(engine, api_key=keys, served_model_name=name, shutdown_engine=True,
                         limits=_limits(args), allowed_hosts=_allowed_hosts(args),
                         shared_prefix_cache=args.shared_prefix_cache,
                         model_aliases=[args.model],
                         tool_call_parser=getattr(args, "tool_call_parser", None),
                         responses_store_size=getattr(args, "responses_store_size", 0),
                         reasoning_parser=getattr(args, "reasoning_parser", None),
                         structured_outputs_in_reasoning=getattr(
                             args, "structured_outputs_in_reasoning", False),
                         lora_modules=dict(getattr(args, "lora_modules", None) or []),
                         allow_runtime_lora_updating=getattr(
                             args, "allow_runtime_lora_updating", False),
                         enable_sleep_mode=getattr(args, "enable_sleep_mode", False),
                         chat_template=chat_template)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("serving %s on http://%s:%d/v1: %s; %d API key(s)", name, args.host,
                args.port, describe_engine(engine, args), len(keys))
    defaults = app.state.server.sampling_defaults
    if defaults:
        logger.info("default sampling from the model's generation_config.json (requests "
                    "override each field; --generation-config vllm ignores it): %s",
                    ", ".join(f"{k}={v}" for k, v in sorted(defaults.items())))
    server = build_server(app, args.host, args.port, log_level=args.log_level,
                          header_timeout_s=args.request_header_timeout,
                          drain_s=args.shutdown_grace)
    # uvicorn re-raises the signal it handled once it has shut down; a no-op SIGTERM
    # handler makes that a clean exit 0 instead of a kill by the default handler.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn re-raises the SIGINT it handled: a clean stop
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
