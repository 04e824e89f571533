"""The engine requests behind one HTTP request, and how their outputs reach the client.

A :class:`Group` holds one engine request per prompt (its ``n`` samples are the engine's
``SamplingParams.n``) and the response :class:`Choice` objects they feed. A *pump* task
per engine request reads the engine's outputs into per-sample accumulators
(:class:`Sample`). An engine that honours ``SamplingParams.output_kind`` (``AsyncLLM``
says so with ``honors_output_kind``) is asked for DELTA outputs: each carries only the
new token ids, text and logprobs, so a step costs O(new) here and in the engine however
long the output is, and a slow client never queues outputs (the engine coalesces what a
slow consumer has not taken yet). Other engines send cumulative snapshots; the latest
one is kept.

:class:`SSEResponse` sends server-sent events while a watcher listens for the client
going away, and always runs the group's close (which aborts unfinished engine requests,
freeing their KV blocks). :func:`stream_events` turns a group into ``data: {json}``
events, the usage chunk and ``data: [DONE]``; it ends normally when the engine requests
are aborted by a graceful shutdown, so the client still gets a final chunk and
``[DONE]``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.sampling_params import RequestOutputKind
from .errors import engine_error_to_api

logger = logging.getLogger("minikernels.server")


class ClientGone(Exception):
    """The client disconnected before we answered."""


async def wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return once the client has disconnected."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` unless the client disconnects first (-> :class:`ClientGone`)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
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
    raise ClientGone()


class Sample:
    """Everything one sample (one ``CompletionOutput.index``) produced so far, read from
    DELTA outputs (appended, O(new) per output) or cumulative snapshots (replaced). It
    has the attributes of a ``CompletionOutput`` the routes read: ``index``,
    ``token_ids``, ``logprobs``, ``text``, ``finish_reason``, ``stop_reason``,
    ``cumulative_logprob``."""

    __slots__ = ("index", "token_ids", "logprobs", "chunks", "num_chars", "version",
                 "_joined", "_joined_key", "finish_reason", "stop_reason",
                 "cumulative_logprob")

    def __init__(self, index: int) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.logprobs: Optional[list] = None
        self.chunks: list[str] = []         # the text, as received (never rewritten)
        self.num_chars = 0
        self.version = 0                    # bumped when a snapshot replaces everything
        self._joined = ""
        self._joined_key = (0, 0)
        self.finish_reason: Optional[str] = None
        self.stop_reason: Any = None
        self.cumulative_logprob: Optional[float] = None

    def add(self, out: Any) -> None:
        """A DELTA output: append what is new."""
        self.token_ids += out.token_ids
        if out.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += out.logprobs
        text = out.text
        if text:
            self.chunks.append(text)
            self.num_chars += len(text)
        self.finish_reason = out.finish_reason
        self.stop_reason = out.stop_reason
        self.cumulative_logprob = out.cumulative_logprob

    def replace(self, out: Any) -> None:
        """A cumulative snapshot: it is the whole output so far."""
        self.token_ids = list(out.token_ids or [])
        self.logprobs = out.logprobs
        text = out.text or ""
        self.chunks = [text] if text else []
        self.num_chars = len(text)
        self.version += 1
        self.finish_reason = out.finish_reason
        self.stop_reason = out.stop_reason
        self.cumulative_logprob = out.cumulative_logprob

    @property
    def text(self) -> str:
        key = (self.version, len(self.chunks))
        if key != self._joined_key:
            self._joined = "".join(self.chunks)
            self._joined_key = key
        return self._joined


@dataclass
class EngineRequest:
    """One engine request (one prompt, ``params.n`` samples); fed by one pump task."""

    request_id: str
    prompt_ids: list[int]
    params: Any
    prompt_text: Optional[str] = None   # the text prompt (for echo), if it was text
    latest: Any = None              # latest RequestOutput (prompt-level fields)
    done: bool = False              # pump ended (finished, error, or cancelled)
    samples: dict = field(default_factory=dict)   # index -> Sample
    prompt_logprobs: Any = None     # kept from the output that carried them

    @property
    def finished(self) -> bool:
        return self.latest is not None and bool(self.latest.finished)

    def sample(self, index: int) -> Sample:
        s = self.samples.get(index)
        if s is None:
            s = self.samples[index] = Sample(index)
        return s

    def take(self, out: Any, delta: bool) -> None:
        """Record one engine output (a DELTA output or a cumulative snapshot)."""
        for o in out.outputs:
            sample = self.samples.get(o.index)
            if sample is None:
                sample = self.sample(o.index)
            if delta:
                sample.add(o)
            else:
                sample.replace(o)
        plp = getattr(out, "prompt_logprobs", None)
        if plp is not None:
            self.prompt_logprobs = plp
        elif self.prompt_logprobs is not None:
            try:    # a DELTA stream sends them once; the routes read them from latest
                out.prompt_logprobs = self.prompt_logprobs
            except AttributeError:
                pass
        self.latest = out


@dataclass
class Choice:
    """Choice ``index`` of the response: sample ``sample`` of engine request ``req``."""

    index: int
    req: EngineRequest
    sample: int = 0
    sent_text: int = 0              # characters of text already streamed
    sent_tokens: int = 0            # tokens whose logprobs were already streamed
    started: bool = False           # first stream chunk (role / echo) sent
    reported_finish: bool = False
    _read: tuple = (0, 0, 0)        # (sample version, chunks, chars) already in a delta

    @property
    def output(self) -> Optional[Sample]:
        """Everything this choice's sample produced so far (None before any output)."""
        return self.req.samples.get(self.sample) if self.req.latest is not None else None

    @property
    def text(self) -> str:
        out = self.output
        return out.text if out is not None else ""

    @property
    def num_tokens(self) -> int:
        out = self.output
        return len(out.token_ids) if out is not None else 0

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
        reason = out.finish_reason if out is not None else None
        return reason if reason is not None else ("abort" if self.ended else None)

    def new_delta(self) -> tuple[str, int, int]:
        """(new text, token start, token end) since this choice's last chunk; the caller
        adds len(text) to sent_text. O(new) for DELTA outputs."""
        out = self.output
        if out is None:
            return "", self.sent_tokens, self.sent_tokens
        end = max(self.sent_tokens, len(out.token_ids))
        if out.num_chars <= self.sent_text:
            return "", self.sent_tokens, end
        version, n_read, chars = self._read
        chunks = out.chunks
        if version == out.version and chars == self.sent_text:
            rest = len(chunks) - n_read
            delta = chunks[n_read] if rest == 1 else "".join(chunks[n_read:])
        else:                   # a new snapshot, or the caller skipped text: by characters
            delta = out.text[self.sent_text:]
        self._read = (out.version, len(chunks), out.num_chars)
        return delta, self.sent_tokens, end


class Group:
    """The engine requests behind one HTTP request and the response choices they feed."""

    def __init__(self, engine: Any, requests: list[EngineRequest]) -> None:
        self.engine = engine
        self.requests = requests
        # Ask for DELTA outputs where the engine honours SamplingParams.output_kind.
        self.delta = getattr(engine, "honors_output_kind", False) is True
        if self.delta:
            kinds: dict[int, Any] = {}
            for r in requests:
                p = r.params
                if getattr(p, "output_kind", None) is not RequestOutputKind.DELTA:
                    if id(p) not in kinds:
                        kinds[id(p)] = replace(p, output_kind=RequestOutputKind.DELTA)
                    r.params = kinds[id(p)]
        self.choices: list[Choice] = []
        for req in requests:
            for j in range(req.params.n):
                self.choices.append(Choice(index=len(self.choices), req=req, sample=j))
        self.error: Optional[BaseException] = None
        self.changed = asyncio.Event()
        self.t_start = time.monotonic()
        self.t_first: Optional[float] = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.on_close: Optional[Callable[["Group"], None]] = None

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._pump(r)) for r in self.requests]

    async def _pump(self, req: EngineRequest) -> None:
        try:
            delta = self.delta
            async for out in self.engine.generate(req.prompt_ids, req.params, req.request_id):
                req.take(out, delta)
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

    async def abort_engine_requests(self) -> None:
        """Abort unfinished engine requests but keep the pumps: each stream then gets its
        final ("abort") output and ends normally (graceful shutdown)."""
        for r in self.requests:
            if not r.finished and not r.done:
                try:
                    await self.engine.abort(r.request_id)
                except Exception:  # noqa: BLE001
                    logger.warning("abort of %s failed", r.request_id, exc_info=True)

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
        if self.on_close is not None:
            self.on_close(self)

    async def close_shielded(self) -> None:
        """:meth:`close` that completes even when the caller is being cancelled."""
        task = asyncio.ensure_future(self.close())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with suppress(BaseException):
                await task
            raise

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object, with the prompt tokens served by the prefix cache."""
        prompt = sum(len(r.latest.prompt_token_ids or []) if r.latest is not None
                     else len(r.prompt_ids) for r in self.requests)
        cached = sum(int(getattr(r.latest, "num_cached_tokens", 0) or 0)
                     for r in self.requests if r.latest is not None)
        completion = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj: Any) -> str:
    """One server-sent event line holding ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_events(group: Group, make_chunks: Callable[[Choice, bool], list[dict]],
                        base: dict, include_usage: bool,
                        on_finish: Callable[[Group], None]) -> AsyncIterator[str]:
    """SSE events for a primed group: per-choice chunks, the usage chunk, ``[DONE]``."""
    try:
        while True:
            for c in group.choices:
                final = c.ended and not c.reported_finish
                chunks = make_chunks(c, final)
                if final:
                    c.reported_finish = True
                for chunk in chunks:
                    yield sse({**base, "choices": [chunk]})
            if all(c.reported_finish for c in group.choices):
                break
            try:
                await group.next_update()
            except Exception as exc:  # noqa: BLE001 - headers are already sent
                yield sse(engine_error_to_api(exc).body())
                break
        on_finish(group)
        if include_usage:
            yield sse({**base, "choices": [], "usage": group.usage()})
        yield "data: [DONE]\n\n"
    finally:
        await group.close_shielded()


class SSEResponse(StreamingResponse):
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
        watch = asyncio.ensure_future(wait_disconnect(receive))
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
