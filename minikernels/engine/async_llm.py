"""AsyncLLM: the streaming interface a server drives (asyncio front, one engine thread).

    llm = AsyncLLM.from_args("qwen2.5-0.5b", max_num_seqs=128)
    params = SamplingParams(max_tokens=64, output_kind=RequestOutputKind.DELTA)
    async for out in llm.generate("Hello", params, "req-1"):
        print(out.outputs[0].text, end="")   # DELTA: only the new text
    await llm.abort("req-2")                 # frees its KV blocks; its stream ends "abort"
    llm.stats()                              # queue lengths, KV usage, throughput
    await llm.shutdown()

Threading model. One background thread owns the LLMEngine and is the only code that
touches it: it drains a command queue (add / abort) and runs engine steps while requests
are unfinished. After each step it takes every updated request's *delta* (new token ids,
new text, new logprobs: O(new), never a copy of the whole output) and hands the step's
deltas to each event loop with one ``loop.call_soon_threadsafe`` (not one per request).
On the loop, each request's stream queues its deltas; its consumer, when it next
iterates, merges what is queued into one output (so a consumer slower than the engine
sees outputs coalesced) shaped by ``SamplingParams.output_kind``:

- CUMULATIVE (default, vLLM's): text / token_ids / logprobs so far (copies), plus
  delta_text / delta_token_ids since the previous yield;
- DELTA: text / token_ids / logprobs hold only what is new (delta_* equal them) -- the
  cheapest, what a streaming server wants;
- FINAL_ONLY: one output when the request finishes.

Concatenating the deltas always gives the full output. Streamed text never retracts: a
tail that could still become a stop string is held back until it is resolved.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from .llm_engine import LLM, LLMEngine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .sequence import Request

logger = logging.getLogger("minikernels.engine")

_CUMULATIVE, _DELTA, _FINAL = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA,
                               RequestOutputKind.FINAL_ONLY)


class EngineOverloaded(RuntimeError):
    """Raised by AsyncLLM.generate when max_queue requests are already waiting."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served any more."""


class RequestDelta:
    """What one engine step added to one request (built on the engine thread).

    samples: per sequence (index, new token ids, new text, new logprobs or None,
    finish_reason, stop_reason, cumulative_logprob).
    """

    __slots__ = ("samples", "finished", "first_token_time", "finish_time", "num_cached_tokens",
                 "num_preemptions", "final")

    def __init__(self, req: Request) -> None:
        samples = []
        for s in req.seqs:
            ids, text, lps = s.take_delta()
            samples.append((s.index, ids, text, lps, s.finish_reason, s.stop_reason,
                            s.cumulative_logprob))
        self.samples = samples
        self.finished = finished = req.num_finished == len(samples)
        self.first_token_time = req.first_token_time
        self.finish_time = req.finish_time
        seq0 = req.seqs[0]
        if finished or len(samples) > 1:
            self.num_cached_tokens = req.num_cached_tokens
            self.num_preemptions = sum(s.num_preemptions for s in req.seqs)
        else:
            self.num_cached_tokens = seq0.num_cached_tokens
            self.num_preemptions = seq0.num_preemptions
        self.final: RequestOutput | None = None


class _Stream:
    """One request's mailbox on its event loop: queued deltas, merged on the next yield."""

    __slots__ = ("loop", "request_id", "prompt", "prompt_token_ids", "params", "kind",
                 "arrival_time", "queued", "waiter", "error", "acc_ids", "acc_text",
                 "acc_lps")

    def __init__(self, loop: asyncio.AbstractEventLoop, request_id: str,
                 prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float) -> None:
        self.loop = loop
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.kind = params.output_kind
        self.arrival_time = arrival_time
        self.queued: list[RequestDelta] = []
        self.waiter: asyncio.Future | None = None
        self.error: BaseException | None = None
        # CUMULATIVE: everything so far, per sample index.
        self.acc_ids: dict[int, list[int]] = {}
        self.acc_text: dict[int, str] = {}
        self.acc_lps: dict[int, list[dict[int, Logprob]]] = {}

    # -- on the event loop
    def push(self, delta: RequestDelta | None, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
        if delta is not None:
            self.queued.append(delta)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def post(self, delta: RequestDelta | None = None,
             error: BaseException | None = None) -> None:
        """From the engine thread, for one stream (errors, aborts)."""
        try:
            self.loop.call_soon_threadsafe(self.push, delta, error)
        except RuntimeError:  # the consumer's loop is closed: nobody listens any more
            pass

    async def next(self) -> RequestOutput:
        """The merged output of everything queued (waits for the first delta)."""
        while True:
            if self.queued:
                deltas, self.queued = self.queued, []
                return self._merge(deltas)
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None

    def _merge(self, deltas: list[RequestDelta]) -> RequestOutput:
        last = deltas[-1]
        if last.final is not None:    # FINAL_ONLY (or an abort): a full snapshot
            return last.final
        cumulative = self.kind is _CUMULATIVE
        outs = []
        for j, (index, ids, text, lps, reason, stop, cum_lp) in enumerate(last.samples):
            if len(deltas) > 1:
                ids = [t for d in deltas for t in d.samples[j][1]]
                text = "".join(d.samples[j][2] for d in deltas)
                if lps is not None:
                    lps = [x for d in deltas for x in d.samples[j][3]]
            want_lp = lps is not None
            if cumulative:
                acc = self.acc_ids.setdefault(index, [])
                acc += ids
                full_text = self.acc_text.get(index, "") + text
                self.acc_text[index] = full_text
                if want_lp:
                    acc_lps = self.acc_lps.setdefault(index, [])
                    acc_lps += lps
                    lps = list(acc_lps)
                outs.append(CompletionOutput(
                    index=index, text=full_text, token_ids=list(acc),
                    cumulative_logprob=cum_lp if want_lp else None, logprobs=lps,
                    finish_reason=reason, stop_reason=stop, delta_text=text,
                    delta_token_ids=ids))
            else:
                outs.append(CompletionOutput(
                    index=index, text=text, token_ids=ids,
                    cumulative_logprob=cum_lp if want_lp else None, logprobs=lps,
                    finish_reason=reason, stop_reason=stop, delta_text=text,
                    delta_token_ids=ids))
        metrics = {"arrival_time": self.arrival_time, "first_token_time": last.first_token_time,
                   "finished_time": last.finish_time, "num_preemptions": last.num_preemptions}
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=outs,
                             finished=last.finished, metrics=metrics,
                             num_cached_tokens=last.num_cached_tokens)


def _deliver(items: list[tuple[_Stream, RequestDelta]]) -> None:
    """On an event loop: hand one engine step's deltas to their streams."""
    for stream, delta in items:
        stream.push(delta)


def _final_delta(req: Request) -> RequestDelta:
    """A finished request's delta carrying its full snapshot (FINAL_ONLY and aborts)."""
    d = RequestDelta(req)
    d.final = req.to_output()
    return d


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

    def _delta(self, req: Request, stream: _Stream) -> RequestDelta | None:
        """The delta to post for an updated request (None: nothing for this consumer)."""
        if stream.kind is _FINAL:
            return _final_delta(req) if req.finished else None
        return RequestDelta(req)

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
                                            stream=params.output_kind is not _FINAL,
                                            prompt_token_ids=ids)
                    self._engine_streams[rid] = stream
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    stream.post(error=exc)
            elif kind == "abort":
                _, rid, fut = cmd
                req = self.engine.abort_request(rid)
                self._stats = self.engine.stats()  # before anyone is told it is done
                stream = self._engine_streams.pop(rid, None)
                if req is not None and stream is not None:
                    stream.post(self._delta(req, stream))
                if fut is not None and not fut.done():
                    fut.set_result(req is not None)

    def _post_step(self, updated: list[Request]) -> None:
        """Post one step's deltas: one call_soon_threadsafe per event loop."""
        streams = self._engine_streams
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestDelta]]] = {}
        for req in updated:
            stream = streams.get(req.request_id)
            if stream is None:
                continue
            if req.finished:
                del streams[req.request_id]
            delta = self._delta(req, stream)
            if delta is not None:
                items = by_loop.get(stream.loop)
                if items is None:
                    items = by_loop[stream.loop] = []
                items.append((stream, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody listens any more
                pass

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
                self._post_step(updated)
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
                        stream.post(self._delta(req, stream))
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
        """Stream the outputs of one request, shaped by ``params.output_kind`` (see the
        module docstring: CUMULATIVE snapshots, DELTA outputs, or FINAL_ONLY).

        Every output carries delta_text / delta_token_ids since the previous one
        yielded; the last has finished=True and a finish_reason ("stop", "length" or
        "abort"). Validation errors (ValueError /
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
        arrival = time.perf_counter()
        stream = _Stream(asyncio.get_running_loop(), request_id, text, ids, params, arrival)
        self._streams[request_id] = stream
        with self._pending_lock:
            self._pending += 1
        self._send(("add", request_id, prompt, ids, params, stream, arrival))
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
