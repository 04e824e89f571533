"""OpenAI-compatible HTTP API over an :class:`~minikernels.engine.AsyncLLM`.

    app = create_app(engine, api_key="secret", served_model_name="tiny")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(streaming as server-sent events), ``GET /health``, ``GET /metrics`` (Prometheus text).

How one HTTP request runs:
  1. Parse and validate the JSON body (-> 400 in OpenAI's error shape on any problem).
  2. Build one engine request per prompt (its ``n`` samples are the engine's
     ``SamplingParams.n``; choice ``i`` of a seeded request uses ``seed + i``) and start
     a *pump* task per engine request that copies the engine's cumulative snapshots into
     a :class:`_Group`. Snapshots are cumulative, so a slow client never queues them:
     it reads the latest one.
  3. Wait until every engine request produced its first output, watching for a client
     disconnect meanwhile. Engine errors surface here, before any byte is sent, so
     overload -> 429 and too-long prompts -> 400 also hold for streaming requests.
  4. Non-streaming: wait for all choices to finish (still watching for disconnect) and
     answer once. Streaming: send deltas as ``data: {json}`` events, then the usage
     chunk (``stream_options.include_usage``) and ``data: [DONE]``.
  5. Whatever happens (finish, error, disconnect, server shutdown), unfinished engine
     requests are aborted so their KV blocks are freed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineOverloaded, SamplingParams
from ..engine.async_llm import EngineDeadError
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                       validation_to_api_error)

logger = logging.getLogger("minikernels.server")

API_KEY_ENV = "MINIKERNELS_API_KEY"
_KNOWN_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
                "/metrics", "/version"}


# --------------------------------------------------------------------------- helpers


def _engine_error_to_api(exc: BaseException) -> APIError:
    """Map an exception raised by the engine for one request to an HTTP error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return APIError(f"server overloaded: {exc}" if str(exc) else "server overloaded, "
                        "retry later", status=429, type="rate_limit_error",
                        code="rate_limit_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(f"engine unavailable: {exc}", status=503, type="server_error",
                        code="engine_dead")
    if isinstance(exc, (ValueError, TypeError)):
        msg = str(exc) or type(exc).__name__
        low = msg.lower()
        param = ("max_tokens" if ("max_model_len" in low or "max_tokens" in low
                                  or "too long" in low) else
                 "prompt" if "prompt" in low else None)
        code = "context_length_exceeded" if "max_model_len" in low else "invalid_value"
        return APIError(msg, param=param, code=code)
    logger.error("engine error", exc_info=exc)
    return APIError(f"internal engine error: {type(exc).__name__}", status=500,
                    type="server_error", code="internal_error")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _to_token_list(result: Any) -> list[int]:
    """apply_chat_template's result (list, dict with input_ids, tensor) -> list[int]."""
    if isinstance(result, dict) or hasattr(result, "keys"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], list):   # batched form [[...]]
        result = result[0]
    return [int(t) for t in result]


class _ClientGone(Exception):
    """The client disconnected before we answered."""


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _until_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` unless the client disconnects first (-> :class:`_ClientGone`)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    with suppress(BaseException):
        await work
    raise _ClientGone()


# ----------------------------------------------------------------- request groups


@dataclass
class _EngineRequest:
    """One engine request (one prompt, ``params.n`` samples); fed by one pump task."""

    request_id: str
    prompt: Union[str, list[int]]
    params: Any
    latest: Any = None              # latest cumulative RequestOutput
    done: bool = False              # pump ended (finished, error, or cancelled)

    @property
    def finished(self) -> bool:
        return self.latest is not None and bool(self.latest.finished)


@dataclass
class _Choice:
    """Choice ``index`` of the response: sample ``sample`` of engine request ``req``."""

    index: int
    req: _EngineRequest
    sample: int = 0
    sent_text: int = 0              # characters of text already streamed
    sent_tokens: int = 0            # tokens whose logprobs were already streamed
    started: bool = False           # first stream chunk (role / echo) sent
    reported_finish: bool = False

    @property
    def prompt(self) -> Union[str, list[int]]:
        return self.req.prompt

    @property
    def output(self) -> Any:
        latest = self.req.latest
        if latest is None:
            return None
        outs = latest.outputs
        if self.sample < len(outs) and getattr(outs[self.sample], "index", self.sample) \
                == self.sample:
            return outs[self.sample]
        return next((o for o in outs if o.index == self.sample), None)

    @property
    def finished(self) -> bool:
        out = self.output
        return self.req.finished or (out is not None and out.finish_reason is not None)

    @property
    def ended(self) -> bool:
        """Finished, or its engine request stopped (error / cancel) without finishing."""
        return self.finished or self.req.done

    @property
    def finish_reason(self) -> Optional[str]:
        out = self.output
        reason = getattr(out, "finish_reason", None) if out is not None else None
        return reason if reason is not None else ("abort" if self.ended else None)


class _Group:
    """The engine requests behind one HTTP request and the response choices they feed."""

    def __init__(self, engine: Any, requests: list[_EngineRequest]) -> None:
        self.engine = engine
        self.requests = requests
        self.choices: list[_Choice] = []
        for req in requests:
            for j in range(req.params.n):
                self.choices.append(_Choice(index=len(self.choices), req=req, sample=j))
        self.error: Optional[BaseException] = None
        self.changed = asyncio.Event()
        self.t_start = time.monotonic()
        self.t_first: Optional[float] = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._pump(r)) for r in self.requests]

    async def _pump(self, req: _EngineRequest) -> None:
        try:
            async for out in self.engine.generate(req.prompt, req.params, req.request_id):
                req.latest = out
                if self.t_first is None:
                    self.t_first = time.monotonic()
                self.changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - surfaced to the HTTP layer
            if self.error is None:
                self.error = exc
        finally:
            req.done = True
            self.changed.set()

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if ready():
                return
            self.changed.clear()
            await self.changed.wait()

    async def wait_primed(self) -> None:
        """Every choice has its first output (raises the first engine error)."""
        await self._wait_for(lambda: all(r.latest is not None or r.done for r in self.requests))

    async def wait_finished(self) -> None:
        await self._wait_for(lambda: all(r.done or r.finished for r in self.requests))

    async def next_update(self) -> None:
        """Wait for any change since the last call (raises engine errors)."""
        if self.error is not None:
            raise self.error
        if not self.changed.is_set():
            await self.changed.wait()
        self.changed.clear()
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        """Cancel pumps and abort every unfinished engine request (idempotent)."""
        if self._closed:
            return
        self._closed = True
        pending = [r for r in self.requests if not r.finished]
        for t in self._tasks:
            if not t.done():
                t.cancel()
        for t in self._tasks:
            with suppress(BaseException):
                await t
        for r in pending:
            try:
                await self.engine.abort(r.request_id)
            except Exception:  # noqa: BLE001 - abort must never mask the real outcome
                logger.warning("abort of %s failed", r.request_id, exc_info=True)

    async def close_shielded(self) -> None:
        """:meth:`close` that completes even when the caller is being cancelled."""
        task = asyncio.ensure_future(self.close())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with suppress(BaseException):
                await task
            raise

    def usage(self) -> dict[str, int]:
        prompt = sum(len(r.latest.prompt_token_ids or []) for r in self.requests
                     if r.latest is not None)
        completion = sum(len(c.output.token_ids or []) for c in self.choices
                         if c.output is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


# -------------------------------------------------------------------- SSE response


class _SSEResponse(StreamingResponse):
    """Streams ``events`` as server-sent events; runs ``on_close`` however it ends.

    A watcher task listens for ``http.disconnect`` while events are produced, so a
    client that goes away mid-stream is noticed at once (not at the next write), and
    ``on_close`` (which aborts the engine requests) always runs.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 on_disconnect: Callable[[], None]) -> None:
        super().__init__(content=events, status_code=200, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close
        self._on_disconnect = on_disconnect

    async def _produce(self, send: Callable[[dict], Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for event in self._events:
            await send({"type": "http.response.body", "body": event.encode("utf-8"),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        produce = asyncio.ensure_future(self._produce(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({produce, watch}, return_when=asyncio.FIRST_COMPLETED)
            if produce in done:
                exc = produce.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
            else:
                self._on_disconnect()
        finally:
            for t in (produce, watch):
                t.cancel()
            for t in (produce, watch):
                with suppress(BaseException):
                    await t
            with suppress(BaseException):
                await self._events.aclose()   # type: ignore[attr-defined]
            await self._on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------ the app


@dataclass
class _ServerState:
    engine: Any
    model_names: list[str]
    api_key: Optional[str]
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def served_name(self) -> str:
        return self.model_names[0]


class _MetricsMiddleware:
    """Pure ASGI middleware counting responses by path and status (streaming-safe)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            self.metrics.count_http(scope.get("method", ""),
                                    path if path in _KNOWN_PATHS else "other", status["code"])


def create_app(engine: Any, api_key: Optional[str] = None,
               served_model_name: Optional[Union[str, list[str]]] = None,
               shutdown_engine: bool = False) -> FastAPI:
    """Build the FastAPI app serving ``engine`` (an AsyncLLM or anything with its API).

    Args:
        engine: ``generate(prompt, params, request_id)`` async iterator of cumulative
            RequestOutputs, ``abort``, ``stats``, ``tokenizer``, ``model_name``,
            ``max_model_len``.
        api_key: required as ``Authorization: Bearer <key>`` on ``/v1/*``; ``None``
            disables auth. (/health and /metrics stay open.)
        served_model_name: the model id(s) clients use; the first is reported by
            ``/v1/models``. Defaults to ``engine.model_name``. ``engine.model_name`` is
            always accepted too.
        shutdown_engine: call ``engine.shutdown()`` when the app stops (the CLI owns
            its engine; tests usually own theirs).
    """
    names: list[str]
    if served_model_name is None:
        names = [str(getattr(engine, "model_name", "model"))]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name)
    engine_name = getattr(engine, "model_name", None)
    if engine_name is not None and str(engine_name) not in names:
        names.append(str(engine_name))
    state = _ServerState(engine=engine, model_names=names, api_key=api_key or None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if shutdown_engine and hasattr(engine, "shutdown"):
            with suppress(Exception):
                await engine.shutdown()

    app = FastAPI(title="minikernels OpenAI-compatible server", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)

    # ---- error handlers: every error in OpenAI's shape, never a bare 422/500 page
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _internal_error(_req: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return _error_response(APIError(f"internal server error: {type(exc).__name__}",
                                        status=500, type="server_error",
                                        code="internal_error"))

    # ---- helpers bound to this app
    def check_auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), state.api_key.encode()):
            raise APIError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                           status=401, type="invalid_request_error", code="invalid_api_key")

    async def parse(request: Request, model_cls: type) -> Any:
        check_auth(request)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(f"malformed JSON body: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError("request body must be a JSON object", code="invalid_json")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_to_api_error(exc) from None
        if req.model is not None and req.model not in state.model_names:
            raise APIError(f"the model '{req.model}' does not exist; this server serves "
                           f"'{state.served_name}'", param="model", code="model_not_found")
        req.check()
        return req

    def max_model_len() -> Optional[int]:
        value = getattr(engine, "max_model_len", None)
        return int(value) if value else None

    def make_params(req: Any, max_tokens: int, logprobs: Optional[int]) -> Any:
        """SamplingParams for one prompt; the engine samples ``n`` choices of it, choice
        ``i`` seeded with ``seed + i``."""
        kwargs: dict[str, Any] = dict(max_tokens=max_tokens, n=req.n,
                                      ignore_eos=req.ignore_eos)
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise APIError(f"invalid sampling parameters: {exc}") from None

    def token_str(tid: int) -> str:
        try:
            return engine.tokenizer.decode([tid])
        except Exception:  # noqa: BLE001 - a token without text is shown as ""
            return ""

    def token_logprobs(out: Any, start: int, end: int, k: int) -> list[tuple]:
        """Generated tokens [start, end) as (text, logprob, [(text, logprob)] * k).

        ``out.logprobs[i]`` is ``{token_id: Logprob}`` holding the sampled token and the
        engine's top alternatives; the top list is the k most likely (k = 0: the sampled
        token alone, like vLLM).
        """
        entries = getattr(out, "logprobs", None) or []
        ids = list(out.token_ids or [])
        rows = []
        for i in range(start, min(end, len(ids), len(entries))):
            tid, entry = ids[i], entries[i]
            items = []
            for key, v in (entry.items() if isinstance(entry, dict) else ()):
                text = getattr(v, "decoded_token", None)
                items.append((int(key), float(getattr(v, "logprob", v)),
                              text if text is not None else token_str(int(key))))
            by_id = {t: (lp, text) for t, lp, text in items}
            lp, text = by_id.get(tid, (-math.inf, token_str(tid)))
            top = sorted(items, key=lambda x: -x[1])[:k] if k > 0 else [(tid, lp, text)]
            rows.append((text, _finite(lp), [(t_text, _finite(t_lp))
                                             for _, t_lp, t_text in top]))
        return rows

    def _finite(x: float) -> float:
        return x if math.isfinite(x) else -9999.0

    def completion_logprobs(c: _Choice, start: int, end: int, k: int,
                            text_offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = text_offset
        for text, lp, top in token_logprobs(c.output, start, end, k):
            tokens.append(text)
            lps.append(lp)
            tops.append(dict(top))
            offsets.append(pos)
            pos += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

    def chat_logprobs(c: _Choice, start: int, end: int, k: int) -> dict:
        content = []
        for text, lp, top in token_logprobs(c.output, start, end, k):
            content.append({
                "token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                 for t, v in top] if k > 0 else [],
            })
        return {"content": content}

    async def run_group(request: Request, group: _Group, stream: bool) -> None:
        group.start()
        try:
            await _until_disconnect(request, group.wait_primed())
        except _ClientGone:
            state.metrics.count_disconnect()
            await group.close_shielded()
            raise
        except BaseException as exc:
            await group.close_shielded()
            if isinstance(exc, Exception):
                raise _engine_error_to_api(exc) from None
            raise
        if group.t_first is not None:
            state.metrics.observe_ttft(group.t_first - group.t_start)
        if stream:
            return
        try:
            await _until_disconnect(request, group.wait_finished())
        except _ClientGone:
            state.metrics.count_disconnect()
            raise
        except Exception as exc:
            raise _engine_error_to_api(exc) from None
        finally:
            await group.close_shielded()
        finish(group)

    def finish(group: _Group) -> None:
        state.metrics.observe_e2e(time.monotonic() - group.t_start)
        for c in group.choices:
            state.metrics.count_finished(c.finish_reason)

    def gone_response() -> Response:
        return Response(status_code=499)

    async def stream_events(group: _Group, make_chunk: Callable[[_Choice, bool], list[dict]],
                            base: dict, include_usage: bool) -> AsyncIterator[str]:
        """SSE events for a primed group: per-choice deltas, usage chunk, [DONE]."""
        try:
            while True:
                for c in group.choices:
                    final = c.ended and not c.reported_finish
                    chunks = make_chunk(c, final)
                    if final:
                        c.reported_finish = True
                    for chunk in chunks:
                        yield _sse({**base, "choices": [chunk]})
                if all(c.reported_finish for c in group.choices):
                    break
                try:
                    await group.next_update()
                except Exception as exc:  # noqa: BLE001 - headers are already sent
                    err = _engine_error_to_api(exc)
                    yield _sse(err.body())
                    break
            finish(group)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": group.usage()})
            yield "data: [DONE]\n\n"
        finally:
            await group.close_shielded()

    def new_delta(c: _Choice) -> tuple[str, int, int]:
        """(new text, token start, token end) since the last chunk of choice ``c``."""
        out = c.output
        if out is None:
            return "", c.sent_tokens, c.sent_tokens
        text = out.text or ""
        delta = text[c.sent_text:] if len(text) > c.sent_text else ""
        n_tok = len(out.token_ids or [])
        return delta, c.sent_tokens, n_tok

    # ---- routes
    @app.get("/health")
    async def health() -> Response:
        errored = getattr(engine, "errored", False)
        if callable(errored):
            errored = errored()
        if errored:
            return JSONResponse({"status": "error"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        from minikernels import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = dict(engine.stats())
        except Exception:  # noqa: BLE001 - metrics must not fail the scrape
            logger.warning("engine.stats() failed", exc_info=True)
            stats = {}
        return Response(state.metrics.render(state.served_name, stats),
                        media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created,
                "owned_by": "minikernels", "root": str(engine_name or name),
                "max_model_len": max_model_len()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        check_auth(request)
        return {"object": "list", "data": [model_card(state.served_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        check_auth(request)
        if model_id not in state.model_names:
            raise APIError(f"the model '{model_id}' does not exist", status=404,
                           type="invalid_request_error", param="model",
                           code="model_not_found")
        return model_card(model_id)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompts = req.prompts()   # token ids are range-checked by the engine
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        rid = f"cmpl-{uuid.uuid4().hex}"
        params = make_params(req, max_tokens, req.logprobs)
        group = _Group(engine, [_EngineRequest(f"{rid}-{i}", prompt, params)
                                for i, prompt in enumerate(prompts)])
        try:
            await run_group(request, group, req.stream)
        except _ClientGone:
            return gone_response()
        model = req.model or state.served_name
        created = int(time.time())

        def echo_text(c: _Choice) -> str:
            if not req.echo:
                return ""
            if isinstance(c.prompt, str):
                return c.prompt
            return engine.tokenizer.decode(c.prompt)

        if not req.stream:
            out_choices = []
            for c in group.choices:
                text = c.output.text or ""
                lp = None
                if req.logprobs is not None:
                    lp = completion_logprobs(c, 0, len(c.output.token_ids or []),
                                             req.logprobs, 0)
                out_choices.append({"index": c.index, "text": echo_text(c) + text,
                                    "logprobs": lp, "finish_reason": c.finish_reason})
            return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                                 "model": model, "choices": out_choices,
                                 "usage": group.usage()})

        base = {"id": rid, "object": "text_completion", "created": created, "model": model}

        def make_chunk(c: _Choice, final: bool) -> list[dict]:
            prefix = ""
            if not c.started:
                c.started = True
                prefix = echo_text(c)
            delta, t0, t1 = new_delta(c)
            if not (prefix or delta or final or t1 > t0):
                return []
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(c, t0, t1, req.logprobs, c.sent_text)
            c.sent_text += len(delta)
            c.sent_tokens = t1
            return [{"index": c.index, "text": prefix + delta, "logprobs": lp,
                     "finish_reason": c.finish_reason if final else None}]

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _SSEResponse(stream_events(group, make_chunk, base, include_usage),
                            on_close=group.close_shielded,
                            on_disconnect=state.metrics.count_disconnect)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        messages = req.template_messages()
        kwargs = dict(req.chat_template_kwargs or {})
        try:
            ids = _to_token_list(engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, **kwargs))
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors are the client's
            raise APIError(f"cannot apply the chat template: {exc}", param="messages") \
                from None
        if not ids:
            raise APIError("messages produced an empty prompt", param="messages")
        limit = max_model_len()
        wanted = req.wanted_max_tokens()
        if wanted is None:
            wanted = (limit - len(ids)) if limit else 256
            if wanted < 1:
                raise APIError(f"prompt is {len(ids)} tokens; this model's maximum context "
                               f"length is {limit}", param="messages",
                               code="context_length_exceeded")
        elif limit and len(ids) + wanted > limit:
            raise APIError(f"prompt ({len(ids)} tokens) + max_tokens ({wanted}) exceeds the "
                           f"maximum context length {limit}", param="max_tokens",
                           code="context_length_exceeded")
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        group = _Group(engine, [_EngineRequest(f"{rid}-0", ids,
                                               make_params(req, wanted, top_k))])
        try:
            await run_group(request, group, req.stream)
        except _ClientGone:
            return gone_response()
        model = req.model or state.served_name
        created = int(time.time())

        if not req.stream:
            out_choices = []
            for c in group.choices:
                lp = None
                if req.logprobs:
                    lp = chat_logprobs(c, 0, len(c.output.token_ids or []), top_k or 0)
                out_choices.append({"index": c.index,
                                    "message": {"role": "assistant",
                                                "content": c.output.text or ""},
                                    "logprobs": lp, "finish_reason": c.finish_reason})
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                                 "model": model, "choices": out_choices,
                                 "usage": group.usage()})

        base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model}

        def make_chunk(c: _Choice, final: bool) -> list[dict]:
            chunks = []
            if not c.started:
                c.started = True
                chunks.append({"index": c.index, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None})
            delta, t0, t1 = new_delta(c)
            if delta or final or t1 > t0:
                lp = chat_logprobs(c, t0, t1, top_k or 0) if req.logprobs else None
                c.sent_text += len(delta)
                c.sent_tokens = t1
                chunks.append({"index": c.index, "delta": {"content": delta} if delta else {},
                               "logprobs": lp,
                               "finish_reason": c.finish_reason if final else None})
            return chunks

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _SSEResponse(stream_events(group, make_chunk, base, include_usage),
                            on_close=group.close_shielded,
                            on_disconnect=state.metrics.count_disconnect)

    return app
