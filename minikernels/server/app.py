"""OpenAI-compatible HTTP API over an :class:`~minikernels.engine.AsyncLLM`.

    app = create_app(engine, api_key=["key-a", "key-b"], served_model_name="tiny")
    build_server(app, "127.0.0.1", 8000).run()        # see .http

Routes (:mod:`.routes`): ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming as server-sent events), ``GET /health``,
``GET /metrics`` (Prometheus text), ``GET /version``.

How one HTTP request runs:
  1. :class:`~.access.AccessLogMiddleware` times it, counts it and logs one line;
     :class:`~.limits.RequestGuard` checks Host / Origin / content type and bounds the
     body's size and read time.
  2. The route checks the API key, decodes and validates the JSON body (-> 400 in
     OpenAI's error shape naming the parameter), then tokenizes the prompt off the event
     loop with the length checks first (:mod:`.prompts`, :mod:`.chat`).
  3. One engine request per prompt is started (:mod:`.streaming`); the route waits for
     every first output, so overload -> 429 and engine validation -> 400 also hold for
     streaming requests, then answers once or streams deltas, the usage chunk and
     ``[DONE]``.
  4. Whatever happens (finish, error, disconnect, shutdown), unfinished engine requests
     are aborted so their KV blocks are freed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from fastapi import FastAPI

from ..engine import SamplingParams
from .access import AccessLogMiddleware
from .auth import API_KEY_ENV, APIKeys
from .chat import check_chat_template
from .errors import install_error_handlers
from .limits import LOOPBACK_HOSTS, RequestGuard, ServerLimits
from .logprobs import TokenText
from .lora_routes import engine_lora_slots
from .metrics import ServerMetrics
from .prompts import PromptTokenizer
from .reasoning import ReasoningParser
from .response_store import ResponseStore
from .routes import register_routes
from .streaming import Group
from .tool_parsers import get_parser

logger = logging.getLogger("minikernels.server")

__all__ = ["API_KEY_ENV", "ServerState", "create_app"]


def engine_supports_cache_salt() -> bool:
    """Whether SamplingParams carries a prefix-cache salt the engine honours."""
    return any(f.name == "cache_salt" for f in dataclasses.fields(SamplingParams))


@dataclass
class ServerState:
    """Everything the routes share: engine, names, keys, limits, metrics, live requests."""

    engine: Any
    model_names: list[str]                 # served names; the first is listed
    aliases: list[str]                     # also accepted as "model", never listed
    keys: APIKeys
    limits: ServerLimits
    prompts: PromptTokenizer
    token_text: TokenText
    shared_prefix_cache: bool = False
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    groups: set = field(default_factory=set)
    draining: bool = False
    cache_salt_supported: bool = field(default_factory=engine_supports_cache_salt)
    tool_call_parser: Optional[str] = None    # --tool-call-parser: tool_choice "auto"
    reasoning_parser: Optional[str] = None    # --reasoning-parser: <think> -> reasoning
    # --structured-outputs-in-reasoning: constraints cover the <think> block too
    structured_outputs_in_reasoning: bool = False
    # --lora-modules: the "model" name a client selects -> its LoRARequest
    lora_modules: dict = field(default_factory=dict)
    # --allow-runtime-lora-updating: /v1/load_lora_adapter and /v1/unload_lora_adapter;
    # lora_next_id: the id the next loaded adapter gets (an id never names two adapters)
    allow_runtime_lora_updating: bool = False
    lora_next_id: int = 1
    # serve /sleep, /wake_up, /is_sleeping, /reset_prefix_cache (.sleep_routes)
    enable_sleep_mode: bool = False
    # The checkpoint's recommended sampling (generation_config.json): SamplingParams
    # fields a request's unset ones take (vLLM's --generation-config auto).
    sampling_defaults: dict = field(default_factory=dict)
    # /v1/responses kept for previous_response_id (--responses-store-size; 0 = none)
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(0))

    @property
    def task(self) -> str:
        """The engine's task: ``"generate"`` (an AsyncLLM), ``"embed"`` (an Embedder:
        /v1/embeddings only) or ``"classify"`` (a Classifier: /classify, /score,
        /rerank)."""
        return str(getattr(self.engine, "task", "generate"))

    @property
    def served_name(self) -> str:
        return self.model_names[0]

    @property
    def max_model_len(self) -> Optional[int]:
        value = getattr(self.engine, "max_model_len", None)
        return int(value) if value else None

    def track(self, group: Group) -> None:
        """Register a running group (graceful shutdown aborts what is still running)."""
        self.groups.add(group)
        group.on_close = self.groups.discard

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, let running ones finish for ``grace_s`` seconds, then
        abort the rest in the engine so every stream ends with a final chunk."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.groups and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.groups:
            logger.info("shutting down: aborting %d in-flight request(s)", len(self.groups))
        for group in list(self.groups):
            await group.abort_engine_requests()
        deadline = time.monotonic() + 2.0
        while self.groups and time.monotonic() < deadline:   # let the streams finish
            await asyncio.sleep(0.02)


def _sampling_defaults(engine: Any) -> dict:
    """``engine.sampling_defaults`` when it has them (an AsyncLLM does; test engines
    may not)."""
    value = getattr(engine, "sampling_defaults", None)
    return dict(value) if isinstance(value, dict) else {}


def _lora_requests(engine: Any, modules: dict[str, str], names: list[str]) -> dict:
    """name -> LoRARequest for --lora-modules, each adapter loaded and checked now (a bad
    one stops the server at startup, naming it)."""
    if not modules:
        return {}
    from ..engine.lora import LoRARequest

    # one engine, or data-parallel replicas (each checks the adapters it will load)
    slots = engine_lora_slots(engine)
    if not slots:
        raise ValueError("lora_modules need an engine built with enable_lora=True "
                         "(minikernels serve --enable-lora)")
    out = {}
    for i, (name, path) in enumerate(modules.items()):
        if name in names:
            raise ValueError(f"LoRA module name {name!r} is the served model's name")
        req = LoRARequest(name, i + 1, path)
        for lora in slots:
            lora.check(req)
        out[name] = req
    return out


def create_app(engine: Any, api_key: Union[None, str, Sequence[str]] = None,
               served_model_name: Optional[Union[str, list[str]]] = None,
               shutdown_engine: bool = False, *, limits: Optional[ServerLimits] = None,
               allowed_hosts: Optional[Sequence[str]] = LOOPBACK_HOSTS,
               shared_prefix_cache: bool = False,
               model_aliases: Sequence[str] = (),
               tool_call_parser: Optional[str] = None,
               responses_store_size: int = 0,
               reasoning_parser: Optional[str] = None,
               structured_outputs_in_reasoning: bool = False,
               lora_modules: Optional[dict[str, str]] = None,
               allow_runtime_lora_updating: bool = False,
               enable_sleep_mode: bool = False,
               chat_template: Optional[str] = None) -> FastAPI:
    """Build the FastAPI app serving ``engine`` (an AsyncLLM or anything with its API).

    Args:
        engine: ``generate(prompt_ids, params, request_id)`` async iterator of cumulative
            RequestOutputs, ``abort``, ``stats``, ``tokenizer``, ``model_name``,
            ``max_model_len`` (and optionally ``max_queue``).
        api_key: one key or several, each accepted as ``Authorization: Bearer <key>`` on
            ``/v1/*``; ``None`` / empty disables auth. (/health, /metrics stay open.)
        served_model_name: the model id(s) clients use; the first is listed by
            ``/v1/models``. Defaults to ``engine.model_name``.
        shutdown_engine: call ``engine.shutdown()`` when the app stops (the CLI owns
            its engine; tests usually own theirs).
        limits: request bounds (:class:`ServerLimits`; defaults when ``None``).
        allowed_hosts: accepted ``Host`` header values (``"*"`` any, ``"*.example.com"``
            subdomains); ``None`` disables the check. Default: the loopback names.
        shared_prefix_cache: with several API keys, let them share prefix-cache entries
            (otherwise each key's cache is salted apart when the engine supports it).
        model_aliases: extra ids accepted in ``"model"`` but never listed (e.g. the
            checkpoint path the server was started with).
        tool_call_parser: how model output is parsed into ``tool_calls`` for
            ``tool_choice="auto"`` (``"hermes"``, ``"llama3_json"``); None: "auto" tool
            choice is refused ("required" and named functions work without one).
        responses_store_size: keep the latest N /v1/responses results per API key for
            ``previous_response_id`` and ``GET`` / ``DELETE /v1/responses/{id}``
            (:mod:`.response_store`); 0 stores none.
        reasoning_parser: ``"qwen3"`` / ``"deepseek_r1"`` split a thinking model's
            ``<think>`` block from its answer (:mod:`.reasoning`); None: all content.
            A request's constraint (response_format, structured_outputs, a forced tool
            choice) then starts after ``</think>`` unless the prompt already closed the
            block (``StructuredOutputsParams.start_after``), as vLLM.
        structured_outputs_in_reasoning: with a reasoning parser, constrain the whole
            output, thinking included (vLLM's ``enable_in_reasoning``).
        lora_modules: name -> PEFT adapter directory (an engine built with
            enable_lora=True): a request whose ``"model"`` is the name runs through that
            adapter; ``/v1/models`` lists them. Each adapter is loaded and checked here.
        allow_runtime_lora_updating: serve ``/v1/load_lora_adapter`` and
            ``/v1/unload_lora_adapter`` (:mod:`.lora_routes`): clients name a server-side
            adapter directory; off by default.
        enable_sleep_mode: serve ``/sleep``, ``/wake_up``, ``/is_sleeping`` and
            ``/reset_prefix_cache`` (:mod:`.sleep_routes`, for RL loops); off by default.
        chat_template: a Jinja chat template (the text; ``--chat-template`` reads a file)
            rendering every chat in place of the model's own, or for a model without one
            (a base model); needs a Hugging Face tokenizer (ValueError otherwise, or when
            it does not render a user turn).
    """
    if tool_call_parser is not None:
        get_parser(tool_call_parser)          # ValueError naming the choices
    if reasoning_parser is not None:
        ReasoningParser(reasoning_parser)     # ValueError naming the choices
    if served_model_name is None:
        names = [str(getattr(engine, "model_name", "model"))]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name)
    tokenizer = getattr(engine, "tokenizer", None)
    if chat_template is not None:
        check_chat_template(tokenizer, chat_template)
    max_len = getattr(engine, "max_model_len", None)
    state = ServerState(
        engine=engine, model_names=names,
        aliases=[a for a in model_aliases if a not in names], keys=APIKeys(api_key),
        limits=limits or ServerLimits(),
        prompts=PromptTokenizer(tokenizer, int(max_len) if max_len else None,
                                chat_template=chat_template),
        token_text=TokenText(tokenizer), shared_prefix_cache=shared_prefix_cache,
        tool_call_parser=tool_call_parser, sampling_defaults=_sampling_defaults(engine),
        responses=ResponseStore(responses_store_size), reasoning_parser=reasoning_parser,
        structured_outputs_in_reasoning=structured_outputs_in_reasoning,
        lora_modules=_lora_requests(engine, lora_modules or {}, names),
        allow_runtime_lora_updating=allow_runtime_lora_updating,
        lora_next_id=len(lora_modules or {}) + 1, enable_sleep_mode=enable_sleep_mode)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        state.prompts.close()
        if shutdown_engine and hasattr(engine, "shutdown"):
            with suppress(Exception):
                await engine.shutdown()

    app = FastAPI(title="minikernels OpenAI-compatible server", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    # Added last = outermost: the access log sees every response, including refusals.
    app.add_middleware(RequestGuard, limits=state.limits,
                       allowed_hosts=tuple(allowed_hosts) if allowed_hosts is not None
                       else None)
    app.add_middleware(AccessLogMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    register_routes(app, state)
    return app
