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
On the loop, a consumer already waiting gets its output at once: ``generate`` returns a
:class:`RequestStream` whose waiting iteration is a single future, resolved with the
output by that per-step callback (one future and one task wake-up per request per step).
Otherwise the delta is queued, and the consumer's next iteration merges what is queued
into one output (so a consumer slower than the engine sees outputs coalesced). Outputs
are shaped by ``SamplingParams.output_kind``:

- CUMULATIVE (default, vLLM's): text / token_ids / logprobs so far (copies), plus
  delta_text / delta_token_ids since the previous yield;
- DELTA: text / token_ids / logprobs hold only what is new (delta_* equal them) -- the
  cheapest, what a streaming server wants;
- FINAL_ONLY: one output when the request finishes.

Concatenating the deltas always gives the full output. Streamed text never retracts: a
tail that could still become a stop string is held back until it is resolved.

Host cost: see docs/engine.md ("Streaming, step by step"): flat tuple payloads, slotted
outputs, ``stream_interval``, and the garbage-collection policy while busy (_BusyGC).
"""
from __future__ import annotations

import asyncio
import dataclasses
import concurrent.futures
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .detokenizer import make_detokenizer
from .llm_engine import LLM, LLMEngine, salted_for_lora
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


# One step's news for one request, built on the engine thread: a flat tuple
#   (mailbox, samples, finished, first_token_time, finish_time, num_cached_tokens,
#    num_preemptions, prompt_logprobs or None)
# with samples a tuple of (index, new token ids, new text, new logprobs or None,
# finish_reason, stop_reason, cumulative_logprob) per sequence. Tuples, not objects:
# a step at batch 256 builds 256 of them, and everything here is allocation-bound.
_P_SAMPLES, _P_FINISHED, _P_FIRST, _P_FINISH_T, _P_CACHED, _P_PREEMPT, _P_PLP = range(1, 8)


def _payload(req: Request, box: "_Mailbox") -> tuple:
    """The delta of ``req`` since the previous payload for ``box`` (engine thread)."""
    seqs = req.seqs
    if len(seqs) == 1:
        s = seqs[0]
        ids, text, lps = s.take_delta()
        samples: tuple = ((s.index, ids, text, lps, s.finish_reason, s.stop_reason,
                           s.cumulative_logprob),)
        cached, preempt = s.num_cached_tokens, s.num_preemptions
    else:
        out = []
        for s in seqs:
            ids, text, lps = s.take_delta()
            out.append((s.index, ids, text, lps, s.finish_reason, s.stop_reason,
                        s.cumulative_logprob))
        samples = tuple(out)
        cached = req.num_cached_tokens
        preempt = sum(s.num_preemptions for s in seqs)
    finished = req.num_finished == len(seqs)
    plp = None
    if box.wants_plp and (req.first_token_time is not None or finished):
        plp = req.prompt_logprobs
        if plp is not None:
            plp = list(plp)
            if box.kind is not _CUMULATIVE:
                box.wants_plp = False          # DELTA: once, with the first tokens
    return (box, samples, finished, req.first_token_time, req.finish_time, cached, preempt,
            plp)


def _never_started_abort(cmd: tuple) -> tuple:
    """The last payload of a request aborted before the engine saw it (an "add" command
    that waited behind ``call_when_idle``): no tokens, finish_reason "abort"."""
    _, rid, prompt, ids, params, box, arrival, _ = cmd
    if box.kind is _FINAL:
        outs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
                for i in range(params.n)]
        return (box, None, True, RequestOutput(
            request_id=rid, prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=list(ids), outputs=outs, finished=True,
            metrics={"arrival_time": arrival}, num_cached_tokens=0))
    samples = tuple((i, [], "", None, "abort", None, 0.0) for i in range(params.n))
    return (box, samples, True, None, time.perf_counter(), 0, 0, None)


def _final_payload(req: Request, box: "_Mailbox") -> tuple:
    """A finished request's full snapshot (FINAL_ONLY, and aborts of FINAL_ONLY)."""
    return (box, None, True, req.to_output())


class _Mailbox:
    """One request's inbox on its event loop (see the module docstring).

    The engine thread holds it while the request runs; the consumer's handle
    (:class:`RequestStream`) holds it too. ``waiter`` is the future the consumer awaits
    (one per iteration that has to wait); a delivery resolves it with the output itself,
    so a waiting consumer costs one future and one task wake-up per step.
    """

    __slots__ = ("loop", "request_id", "prompt", "prompt_token_ids", "params", "kind",
                 "arrival_time", "queued", "waiter", "error", "done", "abandoned",
                 "acc_ids", "acc_text", "acc_lps", "acc_plp", "wants_plp", "registry",
                 "skipped", "send")

    def __init__(self, loop: asyncio.AbstractEventLoop, request_id: str,
                 prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, registry: dict[str, "_Mailbox"],
                 send: Any = None) -> None:
        self.loop = loop
        self.registry = registry           # AsyncLLM._streams: ids in use (loop side)
        self.send = send                   # AsyncLLM._send (aborts)
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.kind = params.output_kind
        self.arrival_time = arrival_time
        self.queued: list[tuple] = []      # payloads not handed out yet
        self.waiter: asyncio.Future | None = None
        self.error: BaseException | None = None
        self.done = False                  # the finished output was handed out
        self.abandoned = False             # the consumer went away (abort sent)
        # CUMULATIVE: everything so far, per sample index.
        self.acc_ids: dict[int, list[int]] = {}
        self.acc_text: dict[int, str] = {}
        self.acc_lps: dict[int, list[dict[int, Logprob]]] = {}
        self.acc_plp: list | None = None
        # Engine thread only: prompt logprobs still to send (DELTA: with the first tokens);
        # steps since the last post (stream_interval; the first tokens go at once).
        self.wants_plp = getattr(params, "prompt_logprobs", None) is not None
        self.skipped = 1 << 30

    # -- engine thread
    def post(self, payload: tuple | None = None, error: BaseException | None = None) -> None:
        """From the engine thread, for this one stream (errors, aborts)."""
        try:
            self.loop.call_soon_threadsafe(self.push, payload, error)
        except RuntimeError:  # the consumer's loop is closed: nobody listens any more
            pass

    # -- event loop
    def push(self, payload: tuple | None, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
        if payload is not None:
            self.queued.append(payload)
        if self.error is not None and self.registry.get(self.request_id) is self:
            del self.registry[self.request_id]
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                if self.queued:
                    queued, self.queued = self.queued, []
                    w.set_result(self.merge(queued))
                elif self.error is not None:
                    w.set_exception(self.error)

    def merge(self, payloads: list[tuple]) -> RequestOutput:
        """One output from one or more payloads (a slow consumer gets them coalesced)."""
        last = payloads[-1]
        if last[_P_SAMPLES] is None:          # a full snapshot (FINAL_ONLY)
            self._done()
            return last[3]
        samples = last[_P_SAMPLES]
        plp = last[_P_PLP]
        if len(payloads) > 1:
            merged = []
            for j, (index, ids, text, lps, reason, stop, cum_lp) in enumerate(samples):
                ids = [t for p in payloads for t in p[_P_SAMPLES][j][1]]
                text = "".join([p[_P_SAMPLES][j][2] for p in payloads])
                if lps is not None:
                    lps = [x for p in payloads for x in p[_P_SAMPLES][j][3]]
                merged.append((index, ids, text, lps, reason, stop, cum_lp))
            samples = merged
            if plp is None:
                plp = next((p[_P_PLP] for p in payloads if p[_P_PLP] is not None), None)
        finished = last[_P_FINISHED]
        if finished:
            self._done()
        if self.kind is _CUMULATIVE:
            outs = self._cumulative(samples)
            if plp is not None:
                self.acc_plp = plp
            plp = self.acc_plp
        else:
            outs = [CompletionOutput(index, text, ids, cum_lp if lps is not None else None,
                                     lps, reason, stop, text, ids)
                    for index, ids, text, lps, reason, stop, cum_lp in samples]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             finished,
                             {"arrival_time": self.arrival_time,
                              "first_token_time": last[_P_FIRST],
                              "finished_time": last[_P_FINISH_T],
                              "num_preemptions": last[_P_PREEMPT]},
                             last[_P_CACHED], plp)

    def abandon(self) -> None:
        """The consumer went away (cancelled while waiting): abort the request."""
        if not self.abandoned and not self.done and self.error is None:
            self.abandoned = True
            if self.registry.get(self.request_id) is self:
                del self.registry[self.request_id]
            self.send(("abort", self.request_id, None))

    def _done(self) -> None:
        self.done = True
        if self.registry.get(self.request_id) is self:
            del self.registry[self.request_id]

    def _cumulative(self, samples: Any) -> list[CompletionOutput]:
        outs = []
        for index, ids, text, lps, reason, stop, cum_lp in samples:
            acc = self.acc_ids.setdefault(index, [])
            acc += ids
            full_text = self.acc_text.get(index, "") + text
            self.acc_text[index] = full_text
            if lps is not None:
                acc_lps = self.acc_lps.setdefault(index, [])
                acc_lps += lps
                lps = list(acc_lps)
            outs.append(CompletionOutput(index, full_text, list(acc),
                                         cum_lp if lps is not None else None, lps, reason,
                                         stop, text, ids))
        return outs


def _deliver(items: list[tuple]) -> None:
    """On an event loop: hand one engine step's payloads to their mailboxes.

    The hot path of streaming: a consumer already waiting gets its output built and its
    future resolved here; any other payload is queued for its next iteration. A DELTA
    output of a one-sample request is built inline (the common case of a server).
    """
    for p in items:
        box = p[0]
        w = box.waiter
        if w is not None and not box.queued:
            box.waiter = None
            if w.done():                      # its consumer was cancelled: abort
                box.queued.append(p)
                box.abandon()
                continue
            samples = p[1]
            try:
                if box.kind is _DELTA and len(samples) == 1 and not p[2]:
                    index, ids, text, lps, reason, stop, cum = samples[0]
                    out = RequestOutput(
                        box.request_id, box.prompt, box.prompt_token_ids,
                        [CompletionOutput(index, text, ids,
                                          cum if lps is not None else None, lps, reason,
                                          stop, text, ids)],
                        False, {"arrival_time": box.arrival_time, "first_token_time": p[3],
                                "finished_time": p[4], "num_preemptions": p[6]},
                        p[5], p[7])
                else:
                    out = box.merge((p,))
                w.set_result(out)
            except Exception as exc:  # noqa: BLE001 - that consumer fails, not all
                w.set_exception(exc)
            continue
        box.queued.append(p)


def _use_engine_device(engine: LLMEngine) -> None:
    """Make the engine's GPU the engine thread's current device: Triton kernels and
    stream / event look-ups use the current device, and a data-parallel replica on
    cuda:i must not launch under cuda:0. (The thread is this class's own.)"""
    device = getattr(getattr(engine, "runner", None), "device", None)
    if device is not None and device.type == "cuda" and device.index is not None:
        import torch

        torch.cuda.set_device(device)


class RequestStream:
    """What :meth:`AsyncLLM.generate` returns: an async iterator of one request's outputs.

    The request is validated and queued on the first iteration. Leaving early
    (``aclose()``, or dropping the iterator, e.g. when the consuming task is cancelled)
    aborts the request.
    """

    __slots__ = ("_engine", "_args", "_box", "_closed", "__weakref__")

    def __init__(self, engine: "AsyncLLM", args: tuple) -> None:
        self._engine = engine
        self._args = args
        self._box: _Mailbox | None = None
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    def __anext__(self) -> Any:
        box = self._box
        if box is None:
            if self._closed:
                raise StopAsyncIteration
            self._closed = True             # a failed start ends the stream
            box = self._box = self._engine._start(*self._args)
            self._closed = False
        if box.queued:
            queued, box.queued = box.queued, []
            fut = box.loop.create_future()
            fut.set_result(box.merge(queued))
            return fut
        if box.done or self._closed:
            self._finish()
            raise StopAsyncIteration
        if box.error is not None:
            self._finish()
            raise box.error
        box.waiter = fut = box.loop.create_future()
        return fut

    def _finish(self) -> None:
        """The consumer is done with this stream (finished, failed or left)."""
        box = self._box
        if box is None or self._closed:
            self._closed = True
            return
        self._closed = True
        eng = self._engine
        if box.registry.get(box.request_id) is box:
            del box.registry[box.request_id]
        if not box.done and box.error is None and not box.abandoned and eng._dead is None:
            box.abandoned = True
            eng._send(("abort", box.request_id, None))

    async def aclose(self) -> None:
        """Stop iterating; an unfinished request is aborted."""
        self._finish()

    def __del__(self) -> None:
        # Dropped without finishing (e.g. its task was cancelled): abort. SimpleQueue.put
        # is safe here (reentrant); the engine loop drains it within a step / 50 ms.
        box = self._box
        if box is not None and not self._closed and not box.done and not box.abandoned \
                and box.error is None:
            box.abandoned = True
            eng = self._engine
            if box.registry.get(box.request_id) is box:
                box.registry.pop(box.request_id, None)
            if eng._dead is None and not eng._closed:
                eng._cmds.put(("abort", box.request_id, None))


class _BusyGC:
    """Garbage collection while engines are busy (process-wide, reference-counted).

    A decode step at batch 256 allocates a few thousand short-lived objects (outputs,
    futures, tuples); with CPython's default gen-0 threshold (700) that is one young
    collection per step, each scanning every object alive at that moment (~0.3 ms).
    And a full collection traverses every token list of every running sequence (~10 ms
    at 256 x 1k tokens). So while any engine has work: the gen-0 threshold is raised to
    ``YOUNG`` (young collections every ~10 steps instead of every step; they still run,
    so cyclic garbage never piles up in the young generations) and automatic full
    collections are off. Full collections then run on the engine thread at chosen
    points: when the last busy engine goes idle, and under continuous load after
    ``FULL_EVERY_FINISHED`` finished requests or ``FULL_EVERY_S`` seconds (whichever
    comes later), so the cycles of finished requests are still freed. The thresholds
    in force before are restored when no engine is busy.
    """

    YOUNG = 20_000
    FULL_EVERY_FINISHED = 1024
    FULL_EVERY_S = 30.0
    _lock = threading.Lock()
    _busy = 0
    _saved: tuple[int, ...] | None = None

    def __init__(self) -> None:
        self.active = False
        self.finished = 0            # requests finished since the last full collection
        self.last_full = time.monotonic()

    def busy(self) -> None:
        if self.active:
            return
        self.active = True
        cls = type(self)
        with cls._lock:
            if cls._busy == 0:
                cls._saved = gc.get_threshold()
                t0, t1 = cls._saved[0], cls._saved[1] if len(cls._saved) > 1 else 10
                if t0 > 0:                  # 0: the user disabled automatic collection
                    gc.set_threshold(max(t0, cls.YOUNG), t1, 1 << 30)
            cls._busy += 1

    def on_finished(self, n: int) -> None:
        self.finished += n
        if self.finished >= self.FULL_EVERY_FINISHED and \
                time.monotonic() - self.last_full >= self.FULL_EVERY_S:
            self.collect()

    def collect(self) -> None:
        gc.collect()
        self.finished = 0
        self.last_full = time.monotonic()

    def idle(self) -> None:
        if not self.active:
            return
        self.active = False
        cls = type(self)
        with cls._lock:
            cls._busy -= 1
            last = cls._busy == 0
            if last and cls._saved is not None:
                gc.set_threshold(*cls._saved)
                cls._saved = None
        if self.finished and last:
            self.collect()


class AsyncLLM:
    """Async streaming front of an :class:`LLM` (see the module docstring).

    Args:
        llm: the LLM whose engine this drives (do not call llm.generate concurrently).
        max_queue: most requests waiting for admission; beyond it generate raises
            EngineOverloaded.
        tune_gc: while the engine is busy, raise the gen-0 GC threshold and run full
            collections on the engine thread at chosen points instead of automatically
            (see ``_BusyGC``; process-wide, restored when idle).
        stream_interval: post a running request's new tokens every ``stream_interval``
            engine steps (vLLM's and SGLang's knob; 1 = every step). The first tokens
            and the final output go out at once; larger values cut the per-token host
            cost of streaming (fewer wake-ups and outputs) at the price of burstier
            streams.
    """

    # generate() yields what SamplingParams.output_kind asks for (the server relies on
    # it to stream DELTA outputs).
    honors_output_kind = True

    def __init__(self, llm: LLM, max_queue: int = 1024, tune_gc: bool = True,
                 stream_interval: int = 1) -> None:
        if not isinstance(llm, LLM):
            raise TypeError(f"llm must be a minikernels LLM, got {type(llm).__name__}")
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if not isinstance(stream_interval, int) or isinstance(stream_interval, bool) \
                or stream_interval < 1:
            raise ValueError(f"stream_interval must be an int >= 1, got {stream_interval!r}")
        self.stream_interval = stream_interval
        self.llm = llm
        self.engine: LLMEngine = llm.llm_engine
        self.max_queue = max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Mailbox] = {}          # event-loop side (ids in use)
        self._engine_streams: dict[str, _Mailbox] = {}   # engine-thread side
        self._pending = 0                                # adds not yet seen by the engine
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Set (under _send_lock) when the engine loop stops taking commands; a command
        # sent after that is answered at once instead of waiting forever.
        self._closed = False
        self._send_lock = threading.Lock()
        self._dead: BaseException | None = None
        # call_when_idle: calls waiting for the running requests to finish, and the adds
        # that arrived meanwhile (they run after the calls)
        self._calls: list[tuple[Callable[[LLMEngine], Any], concurrent.futures.Future]] = []
        self._deferred: list[tuple] = []
        self._stats: dict[str, Any] = self.engine.stats()
        self._stats_time = 0.0
        self._gc: _BusyGC | None = _BusyGC() if tune_gc else None
        if self.engine.tokenizer is not None:
            # Build the detokenizer's per-tokenizer tables now, not on the first request.
            try:
                make_detokenizer(self.engine.tokenizer, [])
            except Exception:  # noqa: BLE001 - the first request will report it
                pass

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
    def sampling_defaults(self) -> dict[str, Any]:
        """The checkpoint's recommended sampling fields (``LLM.sampling_defaults``): a
        server fills the fields a request leaves unset from these."""
        return dict(self.engine.sampling_defaults)

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
        return self.engine.scheduler.num_waiting + self._pending + len(self._deferred)

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
        elif cmd[0] == "call" and not cmd[2].done():
            cmd[2].set_exception(EngineDeadError(
                f"the engine loop stopped on an error: {self._dead!r}"
                if self._dead is not None else "the engine stopped"))

    def _payload(self, req: Request, box: _Mailbox) -> tuple | None:
        """The payload to post for an updated request (None: nothing for this consumer)."""
        if box.kind is _FINAL:
            return _final_payload(req, box) if req.finished else None
        return _payload(req, box)

    def _drain(self) -> None:
        cmds = self._cmds
        while not cmds.empty():
            try:
                cmd = cmds.get_nowait()
            except queue.Empty:
                return
            kind = cmd[0]
            if kind == "add":
                if self._calls:            # after the waiting calls (call_when_idle)
                    self._deferred.append(cmd)
                    with self._pending_lock:
                        self._pending -= 1
                    continue
                self._add(cmd, counted=True)
            elif kind == "call":
                self._calls.append((cmd[1], cmd[2]))
            elif kind == "abort":
                _, rid, fut = cmd
                waiting = next((c for c in self._deferred if c[1] == rid), None)
                if waiting is not None:    # never added: its stream ends "abort" here
                    self._deferred.remove(waiting)
                    waiting[5].post(_never_started_abort(waiting))
                    if fut is not None and not fut.done():
                        fut.set_result(True)
                    continue
                req = self.engine.abort_request(rid)
                self._stats = self.engine.stats()  # before anyone is told it is done
                self._stats_time = time.perf_counter()
                box = self._engine_streams.pop(rid, None)
                if req is not None and box is not None:
                    box.post(self._payload(req, box))
                if fut is not None and not fut.done():
                    fut.set_result(req is not None)

    def _add(self, cmd: tuple, counted: bool) -> None:
        """Add one request to the engine (engine thread); an error goes to its stream."""
        _, rid, prompt, ids, params, box, arrival, hashes = cmd
        if counted:
            with self._pending_lock:
                self._pending -= 1
        try:
            self.engine.add_request(rid, prompt, params, arrival_time=arrival,
                                    stream=params.output_kind is not _FINAL,
                                    prompt_token_ids=ids, prompt_block_hashes=hashes)
            self._engine_streams[rid] = box
        except Exception as exc:  # noqa: BLE001 - reported to that request only
            box.post(error=exc)

    def _run_calls(self) -> None:
        """The engine is idle: run the waiting calls in order, then the adds that arrived
        meanwhile (engine thread)."""
        calls, self._calls = self._calls, []
        for fn, fut in calls:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)
        self._stats = self.engine.stats()
        self._stats_time = time.perf_counter()
        deferred, self._deferred = self._deferred, []
        for cmd in deferred:
            self._add(cmd, counted=False)

    def _post_step(self, updated: list[Request]) -> int:
        """Post one step's payloads: one call_soon_threadsafe per event loop. Returns
        the number of requests that finished."""
        streams = self._engine_streams
        items: list[tuple] = []
        loop = None
        other: dict[asyncio.AbstractEventLoop, list[tuple]] | None = None
        num_finished = 0
        interval = self.stream_interval
        for req in updated:
            box = streams.get(req.request_id)
            if box is None:
                continue
            if req.num_finished == len(req.seqs):
                del streams[req.request_id]
                num_finished += 1
                p = _final_payload(req, box) if box.kind is _FINAL else _payload(req, box)
            elif box.kind is _FINAL:
                continue
            else:
                if interval > 1:               # stream_interval: every interval-th step
                    box.skipped += 1
                    if box.skipped < interval:
                        continue
                    box.skipped = 0
                p = _payload(req, box)
            if box.loop is loop or loop is None:
                loop = box.loop
                items.append(p)
            else:                                  # consumers on several event loops
                if other is None:
                    other = {}
                other.setdefault(box.loop, []).append(p)
        if num_finished or time.perf_counter() - self._stats_time > 0.02:
            # Before posting: a consumer that sees its final output sees these counters.
            self._stats = self.engine.stats()
            self._stats_time = time.perf_counter()
        posts = [(loop, items)] if loop is not None else []
        if other:
            posts += list(other.items())
        for lp, its in posts:
            try:
                lp.call_soon_threadsafe(_deliver, its)
            except RuntimeError:  # that loop is closed: nobody listens any more
                pass
        return num_finished

    def _loop(self) -> None:
        engine = self.engine
        gcp = self._gc
        try:
            _use_engine_device(engine)
            while not self._stopping:
                self._drain()
                if self._calls and not engine.has_unfinished():
                    self._run_calls()
                    continue
                if not engine.has_unfinished():
                    self._stats = engine.stats()
                    if gcp is not None:
                        gcp.idle()
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                if gcp is not None:
                    gcp.busy()
                n = self._post_step(engine.step())
                if n and gcp is not None:
                    gcp.on_finished(n)
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop died")
            self._dead = exc
            err = EngineDeadError(f"the engine loop stopped on an error: {exc!r}")
            for rid, stream in list(self._engine_streams.items()):
                stream.post(error=err)
            self._engine_streams.clear()
        finally:
            if gcp is not None:
                gcp.idle()
            # Shut down (or died): finish every request, then answer pending (and later)
            # commands. Each abort is guarded: after an error the engine state may be
            # broken, and nobody may be left waiting because of that.
            for rid in list(engine.requests):
                stream = self._engine_streams.pop(rid, None)
                try:
                    req = engine.abort_request(rid)
                    if stream is not None and req is not None:
                        stream.post(self._payload(req, stream))
                        stream = None
                except Exception:  # noqa: BLE001
                    logger.exception("abort of %s failed while stopping", rid)
                if stream is not None:
                    stream.post(error=EngineDeadError("the engine stopped"))
            for stream in self._engine_streams.values():
                stream.post(error=EngineDeadError("the engine stopped"))
            self._engine_streams.clear()
            for cmd in self._deferred:
                cmd[5].post(error=EngineDeadError("the engine stopped"))
            self._deferred.clear()
            for _, fut in self._calls:
                if not fut.done():
                    fut.set_exception(EngineDeadError("the engine stopped"))
            self._calls.clear()
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
    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str, lora_request: Any = None) -> RequestStream:
        """Stream the outputs of one request (``async for out in engine.generate(...)``),
        shaped by ``params.output_kind`` (see the module docstring: CUMULATIVE snapshots,
        DELTA outputs, or FINAL_ONLY).

        Every output carries delta_text / delta_token_ids since the previous one
        yielded; the last has finished=True and a finish_reason ("stop", "length" or
        "abort"). Validation errors (ValueError /
        TypeError: bad prompt, prompt + max_tokens > max_model_len, duplicate id) and
        EngineOverloaded are raised on the first iteration, before anything is queued.
        Leaving the iteration early (``aclose()``, or dropping the iterator, e.g. on
        cancellation) aborts the request. lora_request: a LoRARequest (the engine built
        with enable_lora=True), or None.
        """
        if lora_request is not None and isinstance(params, SamplingParams):
            params = dataclasses.replace(params, lora_request=lora_request)
        return RequestStream(self, (prompt, params, request_id))

    def _start(self, prompt: str | list[int], params: SamplingParams,
               request_id: str) -> _Mailbox:
        """Validate and queue a request (on the first iteration of its stream)."""
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.engine.tokenize(prompt, params.truncate_prompt_tokens)
        self.engine.validate(len(ids), params)
        params = salted_for_lora(params)     # (before hashing: the salt is in the hashes)
        self._ensure_started()
        if self.num_waiting() >= self.max_queue:
            raise EngineOverloaded(f"{self.num_waiting()} requests are waiting (max_queue="
                                   f"{self.max_queue}); retry later")
        # The prompt's prefix-cache block hashes are computed here, with its tokens, so
        # admitting it costs the engine thread no pass over the prompt (vLLM hashes on
        # its input thread too).
        hashes = self.engine.block_manager.prompt_block_hashes(ids, params.cache_salt)
        arrival = time.perf_counter()
        box = _Mailbox(asyncio.get_running_loop(), request_id, text, ids, params, arrival,
                       self._streams, self._send)
        self._streams[request_id] = box
        with self._pending_lock:
            self._pending += 1
        self._send(("add", request_id, prompt, ids, params, box, arrival, hashes))
        return box

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

    async def call_when_idle(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread once no request is unfinished (the
        running ones finish first; requests added meanwhile wait and start after it);
        returns its result or raises its exception. For what needs an idle engine:
        ``sleep`` / ``wake_up``, ``load_weights``, ``reset_prefix_cache``."""
        self._ensure_started()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    @property
    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    async def shutdown(self) -> None:
        """Stop the engine thread; unfinished requests end with finish_reason "abort"."""
        self._stopping = True
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
