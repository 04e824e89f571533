"""AsyncLLM: the streaming interface a server drives (asyncio front, one engine thread).

    llm = AsyncLLM.from_args("qwen2.5-0.5b", max_num_seqs=128)
    async for out in llm.generate("Hello", SamplingParams(max_tokens=64), "req-1"):
        print(out.outputs[0].delta_text, end="")
    await llm.abort("req-2")                 # frees its KV blocks; its stream ends "abort"
    llm.stats()                              # queue lengths, KV usage, throughput
    await llm.shutdown()

Threading model. One background thread owns the LLMEngine and is the only code that
touches it: it drains a command queue (add / abort), runs engine steps while requests
are unfinished, and posts each updated request's cumulative RequestOutput to that
request's stream via ``loop.call_soon_threadsafe``. The forward therefore never blocks
the event loop. A consumer slower than the engine sees snapshots coalesced (only the
newest is kept); ``delta_text`` / ``delta_token_ids`` of each yielded snapshot are
computed against the previous snapshot *yielded*, so concatenating deltas always gives
the full output. Streamed text never retracts: a tail that could still become a stop
string is held back until it is resolved.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from .llm_engine import LLM, LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("minikernels.engine")


class EngineOverloaded(RuntimeError):
    """Raised by AsyncLLM.generate when max_queue requests are already waiting."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served any more."""


class _Stream:
    """One request's mailbox between the engine thread and its asyncio consumer."""

    __slots__ = ("loop", "event", "latest", "error", "taken", "sent_text", "sent_tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.taken = True  # the consumer has taken the latest snapshot
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}

    # -- called on the event loop (scheduled by the engine thread)
    def _put(self, out: RequestOutput | None, error: BaseException | None) -> None:
        if error is not None:
            self.error = error
        if out is not None:
            self.latest = out
        self.event.set()

    def post(self, out: RequestOutput | None = None, error: BaseException | None = None) -> None:
        """From the engine thread: deliver a snapshot (or an error)."""
        self.taken = False
        try:
            self.loop.call_soon_threadsafe(self._put, out, error)
        except RuntimeError:  # the consumer's loop is closed: nobody listens any more
            pass

    async def next(self) -> RequestOutput:
        while True:
            if self.latest is not None:
                out, self.latest = self.latest, None
                self.taken = True
                return self._with_deltas(out)
            if self.error is not None:
                raise self.error
            self.event.clear()
            await self.event.wait()

    def _with_deltas(self, out: RequestOutput) -> RequestOutput:
        outs = []
        for c in out.outputs:
            t0, n0 = self.sent_text.get(c.index, 0), self.sent_tokens.get(c.index, 0)
            outs.append(dataclasses.replace(c, delta_text=c.text[t0:],
                                            delta_token_ids=c.token_ids[n0:]))
            self.sent_text[c.index], self.sent_tokens[c.index] = len(c.text), len(c.token_ids)
        return dataclasses.replace(out, outputs=outs)


class AsyncLLM:
    """Async streaming front of an :class:`LLM` (see the module docstring).

    Args:
        llm: the LLM whose engine this drives (do not call llm.generate concurrently).
        max_queue: most requests waiting for admission; beyond it generate raises
            EngineOverloaded.
    """

    def __init__(self, llm: LLM, max_queue: int = 1024) -> None:
        if not isinstance(llm, LLM):
            raise TypeError(f"llm must be a minikernels LLM, got {type(llm).__name__}")
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        self.llm = llm
        self.engine: LLMEngine = llm.llm_engine
        self.max_queue = max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}          # event-loop side
        self._engine_streams: dict[str, _Stream] = {}   # engine-thread side
        self._pending = 0                                # adds not yet seen by the engine
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Set (under _send_lock) when the engine loop stops taking commands; a command
        # sent after that is answered at once instead of waiting forever.
        self._closed = False
        self._send_lock = threading.Lock()
        self._dead: BaseException | None = None
        self._stats: dict[str, Any] = self.engine.stats()

    @classmethod
    def from_args(cls, model: str, max_queue: int = 1024, **llm_kwargs: Any) -> "AsyncLLM":
        """Build the LLM (same keyword arguments as :class:`LLM`) and wrap it."""
        return cls(LLM(model, **llm_kwargs), max_queue=max_queue)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self._pending

    def stats(self) -> dict[str, Any]:
        """Engine counters: num_running, num_waiting, kv_usage (fraction), kv_blocks_free,
        kv_blocks_total, prompt_tokens_total, generation_tokens_total, tokens_per_s
        (generated, last 10 s), plus prefix-cache and preemption counters."""
        if self._thread is None or not self._thread.is_alive():
            s = self.engine.stats()
        else:
            s = dict(self._stats)
        s["num_waiting"] = s.get("num_waiting", 0) + self._pending
        return s

    # ------------------------------------------------------------------ engine thread
    def _ensure_started(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped on an error: {self._dead!r}")
        if self._stopping:
            raise RuntimeError("AsyncLLM is shut down")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minikernels-engine",
                                            daemon=True)
            self._thread.start()

    def _send(self, cmd: tuple) -> None:
        with self._send_lock:
            if not self._closed:
                self._cmds.put(cmd)
                self._wakeup.set()
                return
        self._refuse(cmd)  # the loop already ended (e.g. right after our liveness check)

    def _refuse(self, cmd: tuple) -> None:
        """Answer a command the engine loop will never run."""
        if cmd[0] == "add":
            with self._pending_lock:
                self._pending -= 1
            cmd[5].post(error=EngineDeadError(
                f"the engine loop stopped on an error: {self._dead!r}"
                if self._dead is not None else "the engine stopped"))
        elif cmd[0] == "abort" and cmd[2] is not None and not cmd[2].done():
            cmd[2].set_result(False)

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            kind = cmd[0]
            if kind == "add":
                _, rid, prompt, ids, params, stream, arrival = cmd
                with self._pending_lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(rid, prompt, params, arrival_time=arrival,
                                            stream=True, prompt_token_ids=ids)
                    self._engine_streams[rid] = stream
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    stream.post(error=exc)
            elif kind == "abort":
                _, rid, fut = cmd
                req = self.engine.abort_request(rid)
                self._stats = self.engine.stats()  # before anyone is told it is done
                stream = self._engine_streams.pop(rid, None)
                if req is not None and stream is not None:
                    stream.post(req.to_output())
                if fut is not None and not fut.done():
                    fut.set_result(req is not None)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._drain()
                if not engine.has_unfinished():
                    self._stats = engine.stats()
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                updated = engine.step()
                self._stats = engine.stats()  # before posting: a final output sees it
                for req in updated:
                    stream = self._engine_streams.get(req.request_id)
                    if stream is None:
                        continue
                    if req.finished:
                        del self._engine_streams[req.request_id]
                        stream.post(req.to_output())
                    elif stream.taken:  # skip snapshots the consumer would not see
                        stream.post(req.to_output())
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop died")
            self._dead = exc
            err = EngineDeadError(f"the engine loop stopped on an error: {exc!r}")
            for rid, stream in list(self._engine_streams.items()):
                stream.post(error=err)
            self._engine_streams.clear()
        finally:
            # Shut down (or died): finish every request, then answer pending (and later)
            # commands. Each abort is guarded: after an error the engine state may be
            # broken, and nobody may be left waiting because of that.
            for rid in list(engine.requests):
                stream = self._engine_streams.pop(rid, None)
                try:
                    req = engine.abort_request(rid)
                    if stream is not None and req is not None:
                        stream.post(req.to_output())
                        stream = None
                except Exception:  # noqa: BLE001
                    logger.exception("abort of %s failed while stopping", rid)
                if stream is not None:
                    stream.post(error=EngineDeadError("the engine stopped"))
            for stream in self._engine_streams.values():
                stream.post(error=EngineDeadError("the engine stopped"))
            self._engine_streams.clear()
            with self._send_lock:
                self._closed = True
            while True:
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                self._refuse(cmd)
            try:
                self._stats = engine.stats()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ public API
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream cumulative RequestOutput snapshots of one request.

        Every snapshot carries the text and token_ids so far, and delta_text /
        delta_token_ids since the previous one yielded; the last has finished=True and
        a finish_reason ("stop", "length" or "abort"). Validation errors (ValueError /
        TypeError: bad prompt, prompt + max_tokens > max_model_len, duplicate id) and
        EngineOverloaded are raised on the first iteration, before anything is queued.
        Leaving the iteration early (break + aclose, or cancellation) aborts the request.
        """
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.engine.tokenize(prompt)
        self.engine.validate(len(ids), params)
        self._ensure_started()
        if self.num_waiting() >= self.max_queue:
            raise EngineOverloaded(f"{self.num_waiting()} requests are waiting (max_queue="
                                   f"{self.max_queue}); retry later")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._pending_lock:
            self._pending += 1
        self._send(("add", request_id, prompt, ids, params, stream, time.perf_counter()))
        finished = False
        try:
            while True:
                out = await stream.next()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None:
                self._send(("abort", request_id, None))

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with finish_reason "abort" and its KV blocks
        are free when this returns. Unknown or finished ids are ignored."""
        if self._thread is None or not self._thread.is_alive():
            if self._dead is None and not self._stopping:
                self.engine.abort_request(request_id)
            return
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("abort", request_id, fut))
        await asyncio.wrap_future(fut)

    async def shutdown(self) -> None:
        """Stop the engine thread; unfinished requests end with finish_reason "abort"."""
        self._stopping = True
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
