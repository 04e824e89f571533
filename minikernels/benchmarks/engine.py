"""``minikernels bench engine``: the engine's host overhead per step, with a stub forward.

The model is a stub whose forward costs ~nothing (preallocated logits, rotated so tokens
vary), so what is measured is the engine's own work per step: scheduling, input building,
sampling calls, reading tokens back, stop checks, detokenization and (streaming path)
posting deltas and the asyncio consumers. Times are thread CPU time (``time.thread_time``)
of every thread doing per-step work, medians over many steps, so a noisy shared CPU
changes little. The tokenizer is a real byte-level BPE (``tokenizers``, trained in-process
on this package's source text) so detokenization costs what it costs with a HF tokenizer.

Workloads (``--workloads``):
    steady      batch 256, 128-token prompts, 1024 output tokens; the decode steps.
    nanovllm    nano-vllm's bench shape: 256 requests, prompt / output lengths uniform in
                100..1024, temperature 0.6; every step.
    prefix      1024 requests sharing a 2048-token prefix (+ 32 own tokens), 32 outputs;
                every step after the first (warm-up), and the admission cost.
Paths: ``generate`` (LLM.generate's loop) and ``stream`` (AsyncLLM with one asyncio
consumer per request, DELTA outputs; engine thread + event loop CPU per step; ``--loop``:
uvloop when installed, as the server runs, else asyncio's own loop).

``--gpu-ms T`` simulates a device step of T ms that does not hold the GIL (the stub's
completion event sleeps until the simulated device is done), so overlap is measured on
a CPU: throughput vs the GPU-only ceiling (batch / T), async_scheduling on and off.
``--block-sizes`` sweeps the KV block size: host cost per decode step, prefix-cache hit
rate on a shared-system-prompt workload, and the admission cost of a 2k-token request.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..engine.llm_engine import LLM
from ..engine.sampling_params import RequestOutputKind, SamplingParams
from .engine_cli import add_arguments  # noqa: F401 - the CLI's options (no torch)

VOCAB = 512


# ---------------------------------------------------------------------------- stub model
class _SimEvent:
    """Completion event of a simulated device step: waits (sleeping, GIL free) until it."""

    __slots__ = ("ready_at",)

    def __init__(self, ready_at: float) -> None:
        self.ready_at = ready_at

    def synchronize(self) -> None:
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def query(self) -> bool:
        return time.perf_counter() >= self.ready_at


class StubModel(torch.nn.Module):
    """A CausalLM stand-in whose forward returns preallocated logits.

    gpu_ms > 0: each forward also occupies a simulated device for gpu_ms (serially, like
    a CUDA stream); ``completion_event()`` completes when the device is done.
    device: where the logits live ("cuda": the engine runs its real device path - input
    copies, sampling kernels, read-backs - around a forward that costs nothing).
    """

    def __init__(self, vocab: int = VOCAB, max_positions: int = 8192, max_rows: int = 8192,
                 gpu_ms: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"
                 ) -> None:
        super().__init__()
        self._device = torch.device(device)
        if self._device.type != "cpu" and gpu_ms > 0:
            raise ValueError("gpu_ms simulates a device on the CPU; with a real device "
                             "leave it 0")
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=max_positions,
                                      eos_token_ids=[vocab - 1])
        g = torch.Generator().manual_seed(seed)
        self.pool = [torch.randn(max_rows, vocab, generator=g).to(self._device)
                     for _ in range(7)]
        self.calls = 0
        self.gpu_s = gpu_ms / 1e3
        self.device_free_at = 0.0
        if gpu_ms > 0:
            self.completion_event = self._completion_event

    @property
    def device(self) -> torch.device:
        return self._device

    def kv_bytes_per_token(self, dtype: Any = None) -> int:
        return 64

    def allocate_kv_caches(self, num_blocks: int, block_size: int) -> list:
        return []

    def forward(self, input_ids: torch.Tensor, meta: Any, kv_caches: Any) -> torch.Tensor:
        self.calls += 1
        if self.gpu_s:
            self.device_free_at = max(time.perf_counter(), self.device_free_at) + self.gpu_s
        n = meta.logits_indices.shape[0] if meta.logits_indices is not None \
            else input_ids.shape[0]
        return self.pool[self.calls % len(self.pool)][:n]

    def _completion_event(self) -> _SimEvent:
        return _SimEvent(self.device_free_at)


class BenchTokenizer:
    """A byte-level BPE (``tokenizers``) trained on this package's source text."""

    def __init__(self, vocab: int = VOCAB) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        root = Path(__file__).resolve().parents[1]
        corpus = [p.read_text(encoding="utf-8", errors="replace")
                  for p in sorted(root.rglob("*.py"))[:80]]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        self.backend_tokenizer = tok
        self.clean_up_tokenization_spaces = False
        self.vocab_size = tok.get_vocab_size()
        self.eos_token_ids = [tok.token_to_id("<eos>")]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------- workloads
def make_requests(workload: str, seed: int = 0, scale: float = 1.0,
                  vocab: int = VOCAB) -> tuple[list[list[int]], list[SamplingParams]]:
    """(prompts as token ids, params) of a workload; scale < 1 shrinks it (tests)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(vocab - 1) for _ in range(n)]  # noqa: E731
    if workload == "steady":
        n, out = max(1, int(256 * scale)), max(2, int(1024 * scale))
        return [tok(128) for _ in range(n)], [SamplingParams(
            temperature=0.0, max_tokens=out, ignore_eos=True)] * n
    if workload == "nanovllm":
        n = max(1, int(256 * scale))
        hi = max(101, int(1024 * scale))
        prompts = [tok(rng.randint(100, hi)) for _ in range(n)]
        return prompts, [SamplingParams(temperature=0.6, ignore_eos=True,
                                        max_tokens=rng.randint(100, hi)) for _ in range(n)]
    if workload == "prefix":
        n = max(2, int(1024 * scale))
        shared = tok(max(64, int(2048 * scale)))
        return [shared + tok(32) for _ in range(n)], [SamplingParams(
            temperature=0.0, max_tokens=32, ignore_eos=True)] * n
    raise ValueError(f"unknown workload {workload!r}")


def _build(block_size: int, gpu_ms: float = 0.0, async_scheduling: bool = True,
           max_len: int = 4096, tokenizer: Any = None, num_blocks: int | None = None,
           structured_backend: str = "xgrammar", device: str = "cpu") -> LLM:
    model = StubModel(gpu_ms=gpu_ms, max_positions=max_len, device=device)
    blocks = num_blocks or (256 * -(-max_len // block_size) + 64)
    # (no CUDA graphs: the stub's forward launches nothing worth capturing)
    return LLM(model, block_size=block_size, num_kv_blocks=blocks, max_num_seqs=256,
               max_num_batched_tokens=8192, max_model_len=max_len, device=device,
               tokenizer=tokenizer, async_scheduling=async_scheduling,
               structured_outputs_config={"backend": structured_backend},
               enforce_eager=True)


class PhaseTimer:
    """Thread CPU time per engine phase, by wrapping the engine's methods (no engine code
    changes; ~0.3 us per wrapped call)."""

    PHASES = ("schedule", "prepare", "forward", "sample", "finish", "stand_in")

    def __init__(self, llm: LLM) -> None:
        eng = llm.llm_engine
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.steps: list[float] = []       # thread CPU seconds per engine.step()
        self.walls: list[float] = []
        self.enabled = False
        # The sampler's tensor math when every row samples alike (greedy: one argmax over
        # [batch, vocab]; temperature: softmax + exponential race): device work that runs
        # on the CPU here only because the stub has no GPU (on a GPU: a few kernel
        # launches). steps_excl: each step's CPU time without it.
        self.steps_excl: list[float] = []
        self._stand_in = 0.0
        self._wrap(eng.scheduler, "schedule", "schedule")
        self._wrap(eng.runner, "prepare", "prepare")
        self._wrap(eng.runner, "forward", "forward")
        self._wrap(eng.sampler, "sample", "sample")
        self._wrap(eng, "_finish", "finish")
        if eng.device.type == "cpu":     # on a real device these are its launches
            self._wrap(eng.sampler, "_sample_uniform", "stand_in")
        step = eng.step

        def timed_step() -> Any:
            self._stand_in = 0.0
            t0, w0 = time.thread_time(), time.perf_counter()
            out = step()
            if self.enabled:
                dt = time.thread_time() - t0
                self.steps.append(dt)
                self.steps_excl.append(dt - self._stand_in)
                self.walls.append(time.perf_counter() - w0)
            return out
        eng.step = timed_step

    def _wrap(self, obj: Any, name: str, phase: str) -> None:
        fn = getattr(obj, name)
        totals = self.totals

        def wrapped(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                dt = time.thread_time() - t0
                totals[phase] += dt
                if phase == "stand_in":
                    self._stand_in += dt
        setattr(obj, name, wrapped)

    def reset(self) -> None:
        for k in self.totals:
            self.totals[k] = 0.0
        self.steps.clear()
        self.steps_excl.clear()
        self.walls.clear()


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


class GcPauses:
    """Longest garbage-collection pause while ``timer.enabled`` (gc.callbacks)."""

    def __init__(self, timer: "PhaseTimer") -> None:
        self.timer = timer
        self.max_s = 0.0
        self.count = 0
        self._t0 = 0.0

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self.timer.enabled:
            self.count += 1
            self.max_s = max(self.max_s, time.perf_counter() - self._t0)


def _row(workload: str, path: str, llm: LLM, timer: PhaseTimer, extra_cpu_s: float,
         tokens: int, wall_s: float, gcp: GcPauses, **kw: Any) -> dict[str, Any]:
    n = max(1, len(timer.steps))
    eng = llm.llm_engine
    row = {"workload": workload, "path": path, "block_size": eng.block_manager.block_size,
           "async": eng.async_scheduling, "steps": len(timer.steps),
           "host_ms_median": 1e3 * statistics.median(timer.steps) if timer.steps else None,
           "host_ms_p99": 1e3 * _pct(timer.steps, 0.99),
           "host_ms_max": 1e3 * max(timer.steps) if timer.steps else None,
           "loop_ms_per_step": 1e3 * extra_cpu_s / n if extra_cpu_s else None,
           "tok_s": tokens / wall_s if wall_s else None,
           "gc_max_ms": 1e3 * gcp.max_s}
    for k, v in timer.totals.items():
        row[f"{k}_ms"] = 1e3 * v / n
    if timer.steps_excl:
        row["host_ms_excl_stand_in"] = 1e3 * statistics.median(timer.steps_excl)
    row.update(kw)
    return row


# ---------------------------------------------------------------------------- runs
def run_generate(workload: str, block_size: int = 16, async_scheduling: bool = True,
                 gpu_ms: float = 0.0, scale: float = 1.0, tokenizer: Any = None,
                 skip_steps: int = 0, device: str = "cpu") -> dict[str, Any]:
    """LLM.generate's loop over a workload. Steps before ``skip_steps`` (and, for steady,
    every step that is not a pure decode) are left out of the statistics."""
    prompts, params = make_requests(workload, scale=scale)
    max_len = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params)) + block_size
    llm = _build(block_size, gpu_ms, async_scheduling, max_len, tokenizer, device=device)
    eng = llm.llm_engine
    timer = PhaseTimer(llm)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", p, sp)
    with GcPauses(timer) as gcp:
        t0 = time.perf_counter()
        gen0 = eng.generation_tokens_total
        k = 0
        while eng.has_unfinished():
            steady = workload != "steady" or (eng.scheduler.num_waiting == 0 and all(
                s.num_computed_tokens >= s.num_prompt_tokens for s in eng.scheduler.running))
            timer.enabled = k >= skip_steps and steady
            if workload == "steady" and eng.requests and len(eng.requests) < len(prompts):
                timer.enabled = False            # requests finishing: not steady any more
            eng.step()
            k += 1
        wall = time.perf_counter() - t0
    return _row(workload, "generate", llm, timer, 0.0, eng.generation_tokens_total - gen0,
                wall, gcp, gpu_ms=gpu_ms or None, device=device)


def run_stream(workload: str, block_size: int = 16, async_scheduling: bool = True,
               gpu_ms: float = 0.0, scale: float = 1.0, tokenizer: Any = None,
               kind: RequestOutputKind = RequestOutputKind.DELTA,
               loop: str = "auto", device: str = "cpu") -> dict[str, Any]:
    """AsyncLLM with one asyncio consumer per request (what a server does). CPU per step
    counts the engine thread and the event loop, over the steady window (from the step
    after the last admission to the first finish)."""
    from ..engine.async_llm import AsyncLLM

    prompts, params = make_requests(workload, scale=scale)
    params = [SamplingParams(**{**_fields(sp), "output_kind": kind}) for sp in params]
    max_len = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params)) + block_size
    llm = _build(block_size, gpu_ms, async_scheduling, max_len, tokenizer, device=device)
    eng = llm.llm_engine
    timer = PhaseTimer(llm)
    eng_post = [0.0]          # engine-thread CPU spent posting deltas

    async def main() -> tuple[float, int, float, int]:
        engine = AsyncLLM(llm, max_queue=len(prompts) + 1)
        real_post = engine._post_step

        def timed_post(updated: list) -> Any:
            t0 = time.thread_time()
            result = real_post(updated)   # the finished-request count the GC policy uses
            if timer.enabled:
                eng_post[0] += time.thread_time() - t0
            return result
        engine._post_step = timed_post
        done = [0]
        text_chars = [0]

        async def consume(i: int) -> None:
            async for out in engine.generate(prompts[i], params[i], f"r{i}"):
                text_chars[0] += len(out.outputs[0].text)
            done[0] += 1
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(consume(i)) for i in range(len(prompts))]
        # Steady window: every request decoding, none finished.
        while len(eng.requests) < len(prompts) or eng.scheduler.num_waiting or any(
                s.num_computed_tokens < s.num_prompt_tokens for s in list(eng.scheduler.running)):
            await asyncio.sleep(0.002)
        timer.reset()
        eng_post[0] = 0.0
        timer.enabled = True
        loop0, gen0, wall0 = time.thread_time(), eng.generation_tokens_total, time.perf_counter()
        while len(eng.requests) == len(prompts) and not done[0]:   # until one finishes
            await asyncio.sleep(0.005)
        timer.enabled = False
        loop_cpu = time.thread_time() - loop0
        toks, wall = eng.generation_tokens_total - gen0, time.perf_counter() - wall0
        await asyncio.gather(*tasks)
        await engine.shutdown()
        return loop_cpu, toks, wall, text_chars[0]

    loop_name, run_loop = loop_runner(loop)
    with GcPauses(timer) as gcp:
        loop_cpu, toks, wall, _ = run_loop(main())
    row = _row(workload, "stream", llm, timer, loop_cpu, toks, wall, gcp,
               gpu_ms=gpu_ms or None, output_kind=kind.name, event_loop=loop_name, device=device)
    n = max(1, len(timer.steps))
    row["post_ms"] = 1e3 * eng_post[0] / n
    row["total_cpu_ms_per_step"] = (row["host_ms_median"] or 0.0) + row["post_ms"] + \
        (row["loop_ms_per_step"] or 0.0)
    row["loop_floor_ms"] = asyncio_floor_ms(len(prompts), loop=loop)
    return row


def loop_runner(kind: str = "auto") -> tuple[str, Any]:
    """(name, run(coro)) of an event loop: "uvloop", "asyncio", or "auto" = uvloop when
    installed (uvicorn's default, so the server's loop), else asyncio's."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return "uvloop", uvloop.run
    return "asyncio", asyncio.run


def asyncio_floor_ms(consumers: int, rounds: int = 500, loop: str = "auto") -> float:
    """Event-loop CPU (ms) per round of the least a stream of one task per request can
    cost: every consumer is an ``async for`` over an iterator whose ``__anext__`` returns
    a fresh future, and each round one callback resolves all of them (one future and one
    task wake-up per consumer, no output built). The streaming path's loop time per step
    cannot go below this with one asyncio task per request."""
    async def main() -> float:
        loop = asyncio.get_running_loop()
        waiters: list[Any] = [None] * consumers

        class Stream:
            def __init__(self, i: int) -> None:
                self.i = i

            def __aiter__(self) -> "Stream":
                return self

            def __anext__(self) -> Any:
                fut = waiters[self.i] = loop.create_future()
                return fut

        async def consume(i: int) -> None:
            async for item in Stream(i):
                if item is None:
                    return
        tasks = [asyncio.ensure_future(consume(i)) for i in range(consumers)]
        await asyncio.sleep(0)
        times = []
        for _ in range(rounds):
            t0 = time.thread_time()
            for fut in waiters:
                fut.set_result(1)
            await asyncio.sleep(0)        # the consumers run
            times.append(time.thread_time() - t0)
            await asyncio.sleep(0)
        for fut in waiters:
            fut.set_result(None)
        await asyncio.gather(*tasks)
        return 1e3 * statistics.median(times)
    return loop_runner(loop)[1](main())


def _fields(sp: SamplingParams) -> dict[str, Any]:
    return {k: getattr(sp, k) for k in ("temperature", "max_tokens", "ignore_eos", "seed")}


def admission_cost(block_size: int, prompt_len: int = 2048, reps: int = 200) -> dict[str, float]:
    """Median thread CPU (us) of admitting a prompt_len-token prompt on a prefix hit, as
    AsyncLLM does it: ``hash_us``, the prompt's block hashes (on the caller's thread, with
    tokenization); ``add_us``, add_request with the validated ids and those hashes, and
    ``admit_us``, the schedule() call that admits it (both on the engine thread)."""
    llm = _build(block_size, max_len=prompt_len + 64, num_blocks=4 * -(-prompt_len // block_size)
                 + 64)
    eng = llm.llm_engine
    rng = random.Random(1)
    prefix = [rng.randrange(VOCAB - 1) for _ in range(prompt_len)]
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    eng.add_request("warm", prefix + [1], sp)
    while eng.has_unfinished():
        eng.step()
    hashing, adds, scheds = [], [], []
    for i in range(reps):
        ids = prefix + [i % (VOCAB - 1)]
        t0 = time.thread_time()
        hashes = eng.block_manager.prompt_block_hashes(ids, sp.cache_salt)
        t1 = time.thread_time()
        eng.add_request(f"a{i}", ids, sp, prompt_token_ids=ids, prompt_block_hashes=hashes)
        t2 = time.thread_time()
        eng.scheduler.schedule()
        t3 = time.thread_time()
        hashing.append(t1 - t0)
        adds.append(t2 - t1)
        scheds.append(t3 - t2)
        eng.abort_request(f"a{i}")
    return {"hash_us": 1e6 * statistics.median(hashing), "add_us": 1e6 * statistics.median(adds),
            "admit_us": 1e6 * statistics.median(scheds)}


def hit_rate(block_size: int, seed: int = 0, num_requests: int = 512) -> float:
    """Prefix-cache hit rate (hit tokens / prompt tokens) on num_requests requests that
    share one of 16 system prompts (100..1500 tokens) followed by 20..200 own tokens."""
    rng = random.Random(seed)
    systems = [[rng.randrange(VOCAB - 1) for _ in range(rng.randint(100, 1500))]
               for _ in range(16)]
    prompts = [rng.choice(systems) + [rng.randrange(VOCAB - 1)
                                      for _ in range(rng.randint(20, 200))]
               for _ in range(num_requests)]
    llm = _build(block_size, max_len=1760)
    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"h{i}", p, sp)
    while eng.has_unfinished():
        eng.step()
    st = eng.stats()
    return st["prefix_cache_hit_tokens"] / max(1, st["prompt_tokens_total"])


# ---------------------------------------------------------------------------- CLI
def _default_block_size() -> int:
    import inspect

    return inspect.signature(LLM.__init__).parameters["block_size"].default


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    tok = BenchTokenizer()
    bs = args.block_size or _default_block_size()
    rows: list[dict[str, Any]] = []

    def show(r: dict[str, Any]) -> None:
        rows.append(r)
        keys = ("workload", "path", "event_loop", "block_size", "async", "gpu_ms",
                "host_ms_median",
                "host_ms_excl_stand_in", "host_ms_p99", "host_ms_max", "loop_ms_per_step",
                "loop_floor_ms", "total_cpu_ms_per_step",
                "tok_s", "gc_max_ms", "hash_us", "add_us", "admit_us", "hit_rate")
        print({k: (round(v, 4) if isinstance(v, float) else v) for k in keys
               if (v := r.get(k)) is not None}, flush=True)

    paths = [p for p in args.paths.split(",") if p]
    for w in [w for w in args.workloads.split(",") if w]:
        if "generate" in paths:
            show(run_generate(w, bs, scale=args.scale, tokenizer=tok,
                              skip_steps=1 if w == "prefix" else 0, device=args.device))
        if "stream" in paths and w == "steady":
            show(run_stream(w, bs, scale=args.scale, tokenizer=tok, loop=args.loop,
                            device=args.device))
    if args.gpu_ms > 0 and args.device == "cpu":
        for on in (True, False):
            r = run_generate("steady", bs, async_scheduling=on, gpu_ms=args.gpu_ms,
                             scale=args.scale, tokenizer=tok)
            batch = max(1, int(256 * args.scale))
            r["ceiling_tok_s"] = batch / (args.gpu_ms / 1e3)
            r["of_ceiling"] = r["tok_s"] / r["ceiling_tok_s"]
            show(r)
        if "stream" in paths:
            r = run_stream("steady", bs, gpu_ms=args.gpu_ms, scale=args.scale, tokenizer=tok,
                           loop=args.loop)
            r["ceiling_tok_s"] = max(1, int(256 * args.scale)) / (args.gpu_ms / 1e3)
            r["of_ceiling"] = r["tok_s"] / r["ceiling_tok_s"]
            show(r)
    for b in [int(x) for x in args.block_sizes.split(",") if x]:
        r = run_generate("steady", b, scale=min(args.scale, 0.25), tokenizer=tok)
        r["workload"] = "block-sweep"
        r.update(admission_cost(b, reps=max(20, int(200 * args.scale))))
        r["hit_rate"] = hit_rate(b, num_requests=max(32, int(512 * args.scale)))
        show(r)
    meta = {"default_block_size": bs, "stub_vocab": VOCAB, "scale": args.scale,
            "cpu_threads": torch.get_num_threads(),
            "command": "minikernels bench engine " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k not in ("output_json", "result_dir", "no_save", "_run") and v is not None
                and not isinstance(v, bool))}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2,
                                                     default=str))
    if not args.no_save:
        from .plumbing import write_results
        cols = ["workload", "path", "event_loop", "block_size", "async", "gpu_ms", "steps",
                "host_ms_median",
                "stand_in_ms", "host_ms_excl_stand_in", "host_ms_p99", "host_ms_max",
                "schedule_ms", "prepare_ms", "sample_ms",
                "finish_ms", "post_ms", "loop_ms_per_step", "loop_floor_ms",
                "total_cpu_ms_per_step", "tok_s",
                "of_ceiling", "gc_max_ms", "hash_us", "add_us", "admit_us", "hit_rate"]
        paths_out = write_results("engine", rows, meta, columns=cols,
                                  title="Engine host overhead per step (stub forward)",
                                  plot=lambda path: _plot(rows, path),
                                  out_dir=args.result_dir)
        print("wrote", ", ".join(str(p) for p in paths_out.values()))
    return 0


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    phases = ["schedule_ms", "prepare_ms", "sample_ms", "finish_ms", "post_ms",
              "loop_ms_per_step"]
    main = [r for r in rows if r["workload"] != "block-sweep" and not r.get("gpu_ms")]
    labels = [f"{r['workload']}\n{r['path']}" for r in main]
    bottom = [0.0] * len(main)
    for ph in phases:
        vals = [r.get(ph) or 0.0 for r in main]
        axes[0].bar(labels, vals, bottom=bottom, label=ph.replace("_ms", "").replace(
            "_per_step", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[0].set_ylabel("thread CPU ms per step (mean by phase)")
    axes[0].set_title("host work per step, by phase")
    axes[0].legend(fontsize=7)
    ov = [r for r in rows if r.get("gpu_ms")]
    axes[1].bar([f"{r['path']}\nasync={r['async']}" for r in ov],
                [r["tok_s"] for r in ov], color="tab:green")
    if ov:
        axes[1].axhline(ov[0]["ceiling_tok_s"], color="k", ls="--", label="GPU-only ceiling")
        axes[1].axhline(0.95 * ov[0]["ceiling_tok_s"], color="gray", ls=":", label="95%")
        axes[1].legend(fontsize=7)
    axes[1].set_ylabel("output tok/s")
    axes[1].set_title(f"simulated {ov[0]['gpu_ms'] if ov else '-'} ms GPU step, batch 256")
    sw = [r for r in rows if r["workload"] == "block-sweep"]
    if sw:
        bs = [r["block_size"] for r in sw]
        ax = axes[2]
        ax.plot(bs, [r["host_ms_median"] for r in sw], "o-", label="decode step host ms")
        ax.plot(bs, [r["admit_us"] / 1e3 for r in sw], "s-", label="2k admit ms")
        ax.plot(bs, [r["add_us"] / 1e3 for r in sw], "^-", label="2k add ms")
        ax.plot(bs, [r["hash_us"] / 1e3 for r in sw], "v-", label="2k hash ms (caller)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size")
        ax2 = ax.twinx()
        ax2.plot(bs, [r["hit_rate"] for r in sw], "d--", color="tab:red", label="hit rate")
        ax2.set_ylabel("prefix-cache hit rate")
        ax.legend(fontsize=7, loc="upper center")
        ax2.legend(fontsize=7, loc="lower center")
        ax.set_title("block size sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
